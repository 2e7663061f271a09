//! One verified policy for a pool of hosts, of one vendor or of several: what a guest
//! may see so that it can run on, and migrate between, every host of the pool.
//!
//! [`level_pool`] is [`crate::level()`] over the hosts' guest `max` featuresets, then
//! the pool rules of [`crate::crossvendor::RULES`]: features whose XSAVE component the
//! hosts lay out differently are dropped (with what requires them), as are bits in
//! leaves some host does not report; the maximum leaves and the physical address width
//! are the pool's minimum; vendor, signature, brand string and cache descriptors are
//! those of the first host of the presented vendor. The result verifies on every host
//! of the pool ([`crate::Policy::verify`]; checked before it is returned, and
//! property-tested over every pair and triple of the checked-in dumps), and carries
//! the pool's vendors ([`crate::Policy::host_vendors`]) when they are mixed.
//!
//! A pool that cannot be levelled says why ([`PoolError`]). Same-vendor pools get the
//! same answer as before plus the XSAVE-layout rule, which they need too.

use crate::crossvendor::Caveat;
use crate::features::Feature;
use crate::featureset::{Featureset, WORDS, word};
use crate::host::{HostCpu, Unfit, Vendor, VendorSet, XstateComponent};
use crate::level::{Levelled, level};
use crate::policy::{POLICY_BASIC_MAX, POLICY_EXT_MAX, Policy, Rejection, XSTATE_FEATURES, xstate_mask};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a feature every host's `max` has is not in the pool's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolDrop {
    /// Its XSAVE component has a different size, offset or alignment on two hosts.
    XstateLayout {
        /// The component.
        component: u8,
        /// The host whose layout the policy would present (the presented host).
        host: usize,
        /// Its layout there.
        layout: Option<XstateComponent>,
        /// The first host that differs.
        other: usize,
        /// Its layout there.
        other_layout: Option<XstateComponent>,
    },
    /// It lives in a leaf above the pool's maximum leaf in that range.
    LeafAboveMax {
        /// The pool's maximum leaf.
        max_leaf: u32,
    },
    /// A (deep) requirement was dropped.
    MissingDependency(Feature),
}

impl PoolDrop {
    /// The reason as a sentence, naming hosts with `name(index)`.
    pub fn describe(&self, name: impl Fn(usize) -> String) -> String {
        match self {
            PoolDrop::XstateLayout { component, host, layout, other, other_layout } => {
                let l = |c: &Option<XstateComponent>| {
                    c.map_or_else(|| String::from("nothing"), |c| format!("size {} at offset {}", c.size, c.offset))
                };
                format!(
                    "XSAVE component {component} (CPUID 0xd[{component}]) is laid out differently: {} on {} but {} on {} (a guest's XSAVE image moves as bytes)",
                    l(layout),
                    name(*host),
                    l(other_layout),
                    name(*other)
                )
            }
            PoolDrop::LeafAboveMax { max_leaf } => {
                format!("its leaf is above {max_leaf:#x}, the highest leaf every host of the pool reports")
            }
            PoolDrop::MissingDependency(m) => {
                format!("requires {}, which the pool dropped", m.info().map_or("unnamed", |i| i.name))
            }
        }
    }
}

impl fmt::Display for PoolDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(|i| format!("host #{i}")))
    }
}

/// A caveat and the hosts of the pool it applies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCaveat {
    /// The caveat.
    pub caveat: Caveat,
    /// Indices of the hosts (of another vendor than the presented one) where it applies.
    pub hosts: Vec<usize>,
}

/// The levelled policy of a pool and what it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    /// The policy (1 vCPU; the domain sets its count). Verifies on every host.
    pub policy: Policy,
    /// The host whose signature, brand string, caches and XSAVE layout it presents.
    pub presented_from: usize,
    /// The featureset levelling of the hosts' guest `max`, before the pool rules.
    pub levelled: Levelled,
    /// Per host, in order: the bits of its guest `max` the policy lacks.
    pub lost: Vec<Featureset>,
    /// Bits of `levelled.common` the pool rules dropped, each with its reason.
    pub dropped: Vec<(Feature, PoolDrop)>,
    /// What running on the hosts of another vendor costs (empty for one vendor).
    pub caveats: Vec<PoolCaveat>,
}

/// Why a pool cannot be levelled into one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// No hosts.
    Empty,
    /// A host that cannot run guests at all is not part of any pool.
    HostCannotRunGuests {
        /// Its index.
        host: usize,
        /// Why.
        why: Unfit,
    },
    /// The presented vendor has no host in the pool, so there is no real CPU of that
    /// vendor to take the signature, brand string and caches from.
    NoHostOfVendor {
        /// The vendor asked for.
        vendor: Vendor,
        /// The pool's vendors.
        pool: VendorSet,
    },
    /// The levelled policy does not verify on a host (a bug in the pool rules: every
    /// rule is meant to make this impossible; reported rather than hidden).
    DoesNotVerify {
        /// The host.
        host: usize,
        /// Why.
        rejection: Rejection,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Empty => f.write_str("the pool has no hosts"),
            PoolError::HostCannotRunGuests { host, why } => {
                write!(f, "host #{host} cannot be in a pool: this host cannot run guests: {why}")
            }
            PoolError::NoHostOfVendor { vendor, pool } => write!(
                f,
                "no host of the pool ({pool}) is {vendor}, so there is no {vendor} CPU to present (signature, brand string, caches)"
            ),
            PoolError::DoesNotVerify { host, rejection } => {
                write!(f, "the levelled policy does not verify on host #{host}: {rejection}")
            }
        }
    }
}

/// Level `hosts` into one policy presenting `presented` (default: the first host's
/// vendor), verified on every host. See the module docs for the rules.
pub fn level_pool(hosts: &[HostCpu], presented: Option<Vendor>) -> Result<PoolPolicy, PoolError> {
    let first = hosts.first().ok_or(PoolError::Empty)?;
    for (host, h) in hosts.iter().enumerate() {
        if let Some(why) = h.cannot_run_guests() {
            return Err(PoolError::HostCannotRunGuests { host, why });
        }
    }
    let vendor = presented.unwrap_or(first.vendor);
    let pool_vendors = hosts.iter().fold(VendorSet::EMPTY, |s, h| s.with(h.vendor));
    let from = hosts
        .iter()
        .position(|h| h.vendor == vendor)
        .ok_or(PoolError::NoHostOfVendor { vendor, pool: pool_vendors })?;
    let ph = hosts.get(from).ok_or(PoolError::Empty)?;

    let maxes: Vec<Featureset> = hosts.iter().map(|h| h.max().set).collect();
    let levelled = level(&maxes);
    let mut fs = levelled.common.clone();
    let mut dropped = Vec::new();

    // Maximum leaves: the pool's minimum (crossvendor: "maximum basic and extended leaves").
    let basic_max = hosts.iter().map(|h| h.basic_max).min().unwrap_or(0).min(POLICY_BASIC_MAX);
    let ext_min = hosts.iter().map(|h| h.ext_max).min().unwrap_or(0);
    for (w, b) in levelled.common.bits() {
        let Some(loc) = WORDS.get(w) else { continue };
        let max_leaf = if loc.leaf >= 0x8000_0000 { ext_min } else { basic_max };
        if loc.leaf > max_leaf || (loc.leaf >= 0x8000_0000 && max_leaf < 0x8000_0000) {
            fs.set_bit(w, b, false);
            dropped.push((Feature::new(w, b), PoolDrop::LeafAboveMax { max_leaf }));
        }
    }
    crate::guest::close_over_dependencies(&mut fs, &mut dropped, PoolDrop::MissingDependency);

    // XSAVE layouts: every enabled component the same on every host. Each round drops
    // at least one feature, so this ends.
    loop {
        let mask = xstate_mask(&fs);
        let mut changed = false;
        for (i, comp_features) in XSTATE_FEATURES {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            let layout = ph.xstate_component(*i).copied();
            let differs = hosts.iter().position(|h| h.xstate_component(*i).copied() != layout);
            if let Some(other) = differs {
                let other_layout = hosts.get(other).and_then(|h| h.xstate_component(*i)).copied();
                for f in comp_features.iter() {
                    if !f.is_in(&fs) {
                        continue;
                    }
                    fs.set_bit(f.word(), f.bit(), false);
                    dropped
                        .push((*f, PoolDrop::XstateLayout { component: *i, host: from, layout, other, other_layout }));
                    changed = true;
                }
            }
        }
        crate::guest::close_over_dependencies(&mut fs, &mut dropped, PoolDrop::MissingDependency);
        if !changed {
            break;
        }
    }

    let mut policy = Policy::from_host(ph, fs, 1);
    policy.basic_max = basic_max;
    let ext_cap = if policy.features.word(word::E21_EAX) != 0 { POLICY_EXT_MAX } else { 0x8000_0008 };
    policy.ext_max = if ext_min >= 0x8000_0000 { ext_min.min(ext_cap) } else { 0 };
    policy.phys_bits = hosts.iter().map(|h| h.phys_bits).min().unwrap_or(ph.phys_bits);
    policy.host_vendors = pool_vendors.normalized_for(vendor);

    for (host, h) in hosts.iter().enumerate() {
        policy.verify(h).map_err(|rejection| PoolError::DoesNotVerify { host, rejection })?;
    }
    let lost = maxes.iter().map(|m| m.and_not(&policy.features)).collect();
    let mut caveats: Vec<PoolCaveat> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        for c in policy.caveats_on(h) {
            match caveats.iter_mut().find(|p| p.caveat == c) {
                Some(p) => p.hosts.push(i),
                None => caveats.push(PoolCaveat { caveat: c, hosts: alloc::vec![i] }),
            }
        }
    }
    Ok(PoolPolicy { policy, presented_from: from, levelled, lost, dropped, caveats })
}
