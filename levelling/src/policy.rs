//! Guest CPUID policies: the full CPUID view a domain gets, built from a host and a
//! featureset, and verified against a host before it may be used.
//!
//! Verification never clamps. It returns every problem it finds, each naming the
//! leaf, register, bit and feature, and for dependency problems the chain. The
//! same check answers "can policy P run on host H", which is what migration asks.
//!
//! The exit-path lookup structure is [`crate::table::CpuidTable`]; this module only
//! describes and checks.
//!
//! # Vendors
//!
//! A policy presents one [`Vendor`] ([`Policy::vendor`]) and runs on hosts of that
//! vendor, and on hosts of the vendors in [`Policy::host_vendors`] if it was levelled
//! across them ([`crate::pool::level_pool`]; `host-vendors=amd+intel` in the text
//! form). On such a host the guest still sees only the presented vendor; what that
//! costs is in [`crate::crossvendor`], and [`Policy::caveats_on`] names it.
//!
//! # Postcard encoding
//!
//! The fields in declaration order, as serde derives them, then — only if
//! [`Policy::host_vendors`] is not empty — an extension: the vendor set as one byte.
//! A policy for one vendor's hosts therefore encodes (and hashes) exactly as before
//! the extension existed, and a reader that predates it decodes a cross-vendor policy
//! as a policy for its presented vendor's hosts only (postcard ignores trailing
//! bytes), which refuses the other vendor's hosts: the safe side. Later extensions
//! append after this one and must be safe to ignore in the same way. The migration
//! stream carries these bytes opaquely (`wire::migration::CpuidPolicy`), so its
//! version does not change with them.

use crate::crossvendor::{self, Caveat};
use crate::features::{self, *};
use crate::featureset::{Featureset, WORDS};
use crate::guest::{self, DropReason};
use crate::host::{HostCpu, Unfit, Vendor, VendorSet, XstateComponent};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Most vCPUs a policy may describe.
pub const MAX_VCPUS: u32 = 1024;
/// Most vCPUs addressable with 8-bit xAPIC IDs (more need x2APIC).
pub const MAX_XAPIC_VCPUS: u32 = 255;
/// Highest basic leaf the core synthesizes (0xD, XSAVE).
pub const POLICY_BASIC_MAX: u32 = 0xd;
/// Highest extended leaf the core synthesizes.
pub const POLICY_EXT_MAX: u32 = 0x8000_0021;
/// Size of the legacy XSAVE area plus header (SDM Vol. 1 13.4).
pub const XSAVE_LEGACY_AND_HEADER: u32 = 576;

/// XSAVE state components and the features that enable them (SDM Vol. 1 13.1,
/// Table 13-1). A component is in the policy's XCR0/XSS mask iff any listed feature is on.
pub const XSTATE_FEATURES: &[(u8, &[Feature])] = &[
    (2, &[AVX]),              // AVX: YMM_Hi128
    (3, &[MPX]),              // MPX: BNDREGS
    (4, &[MPX]),              // MPX: BNDCSR
    (5, &[AVX512F]),          // AVX-512: opmask
    (6, &[AVX512F]),          // AVX-512: ZMM_Hi256
    (7, &[AVX512F]),          // AVX-512: Hi16_ZMM
    (8, &[PROC_TRACE]),       // PT (supervisor)
    (9, &[PKU]),              // PKRU
    (10, &[ENQCMD]),          // PASID (supervisor)
    (11, &[CET_SS, CET_IBT]), // CET_U (supervisor)
    (12, &[CET_SS]),          // CET_S (supervisor)
    (15, &[ARCH_LBR]),        // LBR (supervisor)
    (16, &[HWP]),             // HWP (supervisor)
    (17, &[AMX_TILE]),        // AMX: TILECFG
    (18, &[AMX_TILE]),        // AMX: TILEDATA
];

/// The XSAVE components `features` enables (bits 2..=63; bits 0 and 1, x87 and SSE,
/// are implied by XSAVE).
pub fn xstate_mask(features: &Featureset) -> u64 {
    if !XSAVE.is_in(features) {
        return 0;
    }
    XSTATE_FEATURES
        .iter()
        .filter(|(_, fs)| fs.iter().any(|f| f.is_in(features)))
        .fold(0b11, |m, (i, _)| m | (1u64 << i))
}

/// Linear address bits a guest with `features` sees: 57 with LA57, else 48.
pub fn linear_bits(features: &Featureset) -> u8 {
    if LA57.is_in(features) { 57 } else { 48 }
}

/// The full CPUID view a guest gets. Serialized with postcard for the wire and the
/// migration stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Vendor.
    pub vendor: Vendor,
    /// CPUID.1:EAX.
    pub signature: u32,
    /// Brand string registers (0x8000_0002..=4).
    pub brand: [u32; 12],
    /// CLFLUSH line size in 8-byte units (1.EBX[15:8]).
    pub clflush_size: u8,
    /// Highest basic leaf reported (0.EAX).
    pub basic_max: u32,
    /// Highest extended leaf reported (8000_0000h.EAX).
    pub ext_max: u32,
    /// Number of vCPUs (one package, one thread per core).
    pub vcpus: u32,
    /// Physical address bits.
    pub phys_bits: u8,
    /// Linear address bits.
    pub virt_bits: u8,
    /// Feature words.
    pub features: Featureset,
    /// XSAVE components 2.. the features enable, with the host's layout.
    pub xstate: Vec<XstateComponent>,
    /// CPUID.4 cache descriptors (Intel; sharing fields rewritten for the topology).
    pub cache_leaf4: Vec<[u32; 4]>,
    /// 0x8000_0005.ECX/EDX, 0x8000_0006.ECX/EDX cache descriptors.
    pub cache_ext: [u32; 4],
    /// The vendors of the hosts this policy was levelled for, when it may run on
    /// hosts of a vendor other than [`Policy::vendor`]: then the set holds the
    /// presented vendor and at least one other. Empty: only the presented vendor's
    /// hosts (see [`VendorSet::normalized_for`]). Encoded as a postcard extension
    /// (module docs), hence skipped by serde.
    #[serde(skip)]
    pub host_vendors: VendorSet,
}

/// The postcard extension after the v1 fields (module docs).
#[derive(Serialize, Deserialize)]
struct PolicyExtension {
    host_vendors: VendorSet,
}

impl Policy {
    /// Build (without verifying) a policy for `vcpus` vCPUs on `host` with `features`.
    /// XSAVE components come from the host for every component the features enable;
    /// a component the host does not report is left out, and [`Policy::verify`] will
    /// say so.
    pub fn from_host(host: &HostCpu, features: Featureset, vcpus: u32) -> Policy {
        let mask = xstate_mask(&features);
        let xstate = host.xstate.iter().filter(|c| c.index < 64 && mask & (1u64 << c.index) != 0).copied().collect();
        let ext_max = if features.word(crate::featureset::word::E21_EAX) != 0 { POLICY_EXT_MAX } else { 0x8000_0008 };
        Policy {
            vendor: host.vendor,
            signature: host.signature,
            brand: host.brand,
            clflush_size: ((host.leaf1_ebx >> 8) & 0xff) as u8,
            basic_max: host.basic_max.min(POLICY_BASIC_MAX),
            ext_max: if host.ext_max >= 0x8000_0000 { host.ext_max.min(ext_max) } else { 0 },
            vcpus,
            phys_bits: host.phys_bits,
            virt_bits: linear_bits(&features),
            features,
            xstate,
            cache_leaf4: host.cache_leaf4.clone(),
            cache_ext: host.cache_ext,
            host_vendors: VendorSet::EMPTY,
        }
    }

    /// Postcard encoding (module docs: the fields, then the vendor extension if any).
    pub fn to_postcard(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut p = self.clone();
        p.features = p.features.normalized();
        let mut bytes = postcard::to_allocvec(&p)?;
        let host_vendors = self.host_vendors.normalized_for(self.vendor);
        if !host_vendors.is_empty() {
            bytes.extend_from_slice(&postcard::to_allocvec(&PolicyExtension { host_vendors })?);
        }
        Ok(bytes)
    }

    /// Decode from postcard, with or without the vendor extension (bytes after the
    /// known extensions are ignored, as older readers ignore the extension).
    pub fn from_postcard(bytes: &[u8]) -> Result<Policy, postcard::Error> {
        let (mut p, rest): (Policy, &[u8]) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            let (ext, _later): (PolicyExtension, &[u8]) = postcard::take_from_bytes(rest)?;
            p.host_vendors = ext.host_vendors.normalized_for(p.vendor);
        }
        Ok(p)
    }

    /// The vendors of the hosts this policy may run on: its own and
    /// [`Policy::host_vendors`].
    pub fn allowed_vendors(&self) -> VendorSet {
        self.host_vendors.with(self.vendor)
    }

    /// Whether the policy was levelled for hosts of a vendor other than its own.
    pub fn is_cross_vendor(&self) -> bool {
        !self.host_vendors.without(self.vendor).is_empty()
    }

    /// What running this policy on `host` costs beyond a host of the presented
    /// vendor ([`crate::crossvendor::RULES`]): empty on a host of its own vendor.
    pub fn caveats_on(&self, host: &HostCpu) -> Vec<Caveat> {
        crossvendor::caveats(self.vendor, &self.features, host.vendor, Some(&host.raw))
    }

    /// For every other vendor the policy may run on, the caveats there (those that
    /// depend on the host's features included, as they may apply).
    pub fn caveats(&self) -> Vec<(Vendor, Vec<Caveat>)> {
        self.allowed_vendors()
            .without(self.vendor)
            .iter()
            .map(|v| (v, crossvendor::caveats(self.vendor, &self.features, v, None)))
            .collect()
    }

    /// Stable hash: FNV-1a 64 over the postcard encoding (see [`crate::hash`]).
    pub fn stable_hash(&self) -> u64 {
        self.to_postcard().map_or(0, |b| crate::hash::fnv1a64(&b))
    }

    /// Verify this policy against `host`: the check made when a policy is set, and
    /// the answer to "can this policy run on that host". Returns every problem; on a
    /// host that cannot run guests at all ([`HostCpu::cannot_run_guests`]) only that.
    ///
    /// The host's vendor must be the policy's, AMD and Hygon included, unless the
    /// policy was levelled for that vendor's hosts too ([`Policy::host_vendors`]): a
    /// policy names one vendor, whose string, family numbering (Hygon's 0x18 is not an
    /// AMD family) and errata the guest keys on, and crossing to another vendor is a
    /// decision made when levelling, with its caveats ([`Policy::caveats_on`]). Beyond
    /// that a host of another vendor is checked like any host: every feature in its
    /// `max`, the same XSAVE layout, the leaves and address widths it can give.
    ///
    /// Bits with the `OR` flag (safe to show on a host without them) need not be in
    /// the host's `max`, so a levelled policy verifies on every host of its pool.
    pub fn verify(&self, host: &HostCpu) -> Result<(), Rejection> {
        if let Some(why) = host.cannot_run_guests() {
            return Err(Rejection { errors: alloc::vec![PolicyError::HostCannotRunGuests(why)] });
        }
        let mut errors = Vec::new();
        if !self.allowed_vendors().contains(host.vendor) {
            errors.push(PolicyError::VendorMismatch {
                policy: self.vendor,
                host: host.vendor,
                levelled_for: self.allowed_vendors(),
            });
        }
        // 1. Every bit must be in the host's max (OR bits: offerable ones may be absent).
        let max = host.max();
        let or_ok = features::flag_mask(features::OR).and_not(&features::attr_mask(features::Attr::N));
        for (w, b) in self.features.and_not(&max.set).and_not(&or_ok).bits() {
            let f = Feature::new(w, b);
            let reason = match guest::not_virtualizable_reason(f) {
                Some(r) => format!("it is never offered to guests ({r})"),
                None => match max.dropped.iter().find(|(g, _)| *g == f) {
                    Some((_, DropReason::MissingDependency(m))) => {
                        format!(
                            "this host lacks {}, which it requires",
                            m.info().map_or("an unnamed feature", |i| i.name)
                        )
                    }
                    Some((_, DropReason::Unknown)) | None if f.info().is_none() => {
                        String::from("this build does not know the bit")
                    }
                    Some((
                        _,
                        r @ (DropReason::XstateUndescribed { .. }
                        | DropReason::NoXsaveLeaf { .. }
                        | DropReason::HostFault(_)),
                    )) => {
                        format!("this host's max leaves it out ({r})")
                    }
                    _ => String::from("this host does not have it"),
                },
            };
            errors.push(PolicyError::NotOffered { feature: f, reason });
        }
        // 2. Deep dependencies.
        for (f, missing) in features::missing_dependencies(&self.features) {
            let chain = features::chain(f, missing).unwrap_or_default();
            errors.push(PolicyError::MissingDependency { feature: f, missing, chain });
        }
        // 3. Feature bits in leaves the policy does not report.
        for (w, b) in self.features.bits() {
            let Some(loc) = WORDS.get(w) else { continue };
            let max_leaf = if loc.leaf >= 0x8000_0000 { self.ext_max } else { self.basic_max };
            if loc.leaf > max_leaf || (loc.leaf >= 0x8000_0000 && max_leaf < 0x8000_0000) {
                errors.push(PolicyError::LeafBeyondMax { feature: Feature::new(w, b), max_leaf });
            }
        }
        if self.basic_max > POLICY_BASIC_MAX || self.basic_max > host.basic_max {
            errors.push(PolicyError::MaxLeaf { leaf: self.basic_max, limit: POLICY_BASIC_MAX.min(host.basic_max) });
        }
        if self.ext_max != 0
            && (self.ext_max < 0x8000_0000 || self.ext_max > POLICY_EXT_MAX || self.ext_max > host.ext_max)
        {
            errors.push(PolicyError::MaxLeaf { leaf: self.ext_max, limit: POLICY_EXT_MAX.min(host.ext_max) });
        }
        // 4. XSAVE layout.
        self.verify_xstate(host, &mut errors);
        // 5. Topology and address sizes.
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            errors.push(PolicyError::Vcpus { vcpus: self.vcpus, why: "must be between 1 and 1024" });
        } else if self.vcpus > MAX_XAPIC_VCPUS && !X2APIC.is_in(&self.features) {
            errors.push(PolicyError::Vcpus {
                vcpus: self.vcpus,
                why: "more than 255 vCPUs need x2apic (8-bit xAPIC IDs)",
            });
        }
        if self.phys_bits > host.phys_bits || self.phys_bits < 32 {
            errors.push(PolicyError::AddressBits { what: "physical", policy: self.phys_bits, host: host.phys_bits });
        }
        if self.virt_bits > host.virt_bits || self.virt_bits != linear_bits(&self.features) {
            errors.push(PolicyError::AddressBits { what: "linear", policy: self.virt_bits, host: host.virt_bits });
        }
        if errors.is_empty() { Ok(()) } else { Err(Rejection { errors }) }
    }

    fn verify_xstate(&self, host: &HostCpu, errors: &mut Vec<PolicyError>) {
        let mask = xstate_mask(&self.features);
        for (i, fs) in XSTATE_FEATURES {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            if !self.xstate.iter().any(|c| c.index == *i) {
                let feature = fs.iter().copied().find(|f| f.is_in(&self.features)).unwrap_or(XSAVE);
                errors.push(PolicyError::XstateMissing { component: *i, feature });
            }
        }
        for c in &self.xstate {
            if c.index >= 64 || mask & (1u64 << c.index) == 0 {
                errors.push(PolicyError::XstateUnexpected { component: c.index });
                continue;
            }
            match host.xstate_component(c.index) {
                Some(h) if h == c => {}
                h => errors.push(PolicyError::XstateLayout { component: c.index, policy: *c, host: h.copied() }),
            }
            let supervisor = c.flags & 1 != 0;
            if supervisor && !XSAVES.is_in(&self.features) {
                errors.push(PolicyError::XstateSupervisorWithoutXsaves { component: c.index });
            }
            if !supervisor
                && (c.offset < XSAVE_LEGACY_AND_HEADER || c.size == 0 || c.offset.checked_add(c.size).is_none())
            {
                errors.push(PolicyError::XstateBadComponent { component: c.index, size: c.size, offset: c.offset });
            }
        }
        let mut user: Vec<&XstateComponent> = self.xstate.iter().filter(|c| c.flags & 1 == 0).collect();
        user.sort_by_key(|c| c.offset);
        for pair in user.windows(2) {
            if let [a, b] = pair
                && a.offset.saturating_add(a.size) > b.offset
            {
                errors.push(PolicyError::XstateOverlap { a: a.index, b: b.index });
            }
        }
    }
}

/// One reason a policy cannot be used on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The host cannot run guests at all; reported alone.
    HostCannotRunGuests(Unfit),
    /// A bit is not in the host's `max`.
    NotOffered {
        /// The bit.
        feature: Feature,
        /// Why the host cannot offer it.
        reason: String,
    },
    /// A bit whose (deep) requirement is not set.
    MissingDependency {
        /// The bit that is set.
        feature: Feature,
        /// The requirement that is not.
        missing: Feature,
        /// `feature → … → missing`.
        chain: Vec<Feature>,
    },
    /// A bit in a leaf above the policy's maximum leaf.
    LeafBeyondMax {
        /// The bit.
        feature: Feature,
        /// The policy's maximum leaf in that range.
        max_leaf: u32,
    },
    /// A maximum leaf the core cannot or the host does not provide.
    MaxLeaf {
        /// The policy's maximum leaf.
        leaf: u32,
        /// The highest allowed.
        limit: u32,
    },
    /// A host of a vendor the policy was not levelled for.
    VendorMismatch {
        /// The policy's (presented) vendor.
        policy: Vendor,
        /// The host's vendor.
        host: Vendor,
        /// The vendors whose hosts the policy may run on ([`Policy::allowed_vendors`]).
        levelled_for: VendorSet,
    },
    /// An enabled feature needs an XSAVE component the policy does not describe.
    XstateMissing {
        /// Component index.
        component: u8,
        /// The feature that enables it.
        feature: Feature,
    },
    /// The policy describes an XSAVE component no enabled feature uses.
    XstateUnexpected {
        /// Component index.
        component: u8,
    },
    /// The policy's component layout differs from the host's.
    XstateLayout {
        /// Component index.
        component: u8,
        /// In the policy.
        policy: XstateComponent,
        /// On the host (`None`: the host does not have it).
        host: Option<XstateComponent>,
    },
    /// A user component overlapping the legacy area or with a zero size.
    XstateBadComponent {
        /// Component index.
        component: u8,
        /// Size.
        size: u32,
        /// Offset.
        offset: u32,
    },
    /// Two user components overlap.
    XstateOverlap {
        /// First.
        a: u8,
        /// Second.
        b: u8,
    },
    /// A supervisor component without XSAVES.
    XstateSupervisorWithoutXsaves {
        /// Component index.
        component: u8,
    },
    /// Bad vCPU count.
    Vcpus {
        /// The count.
        vcpus: u32,
        /// Why.
        why: &'static str,
    },
    /// Address width the host cannot give or inconsistent with LA57.
    AddressBits {
        /// "physical" or "linear".
        what: &'static str,
        /// In the policy.
        policy: u8,
        /// On the host.
        host: u8,
    },
}

/// `avx2 → avx → xsave`
#[derive(Debug)]
pub struct ChainDisplay<'a>(pub &'a [Feature]);

impl fmt::Display for ChainDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, x) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            f.write_str(x.info().map_or("unnamed", |i| i.name))?;
        }
        Ok(())
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::HostCannotRunGuests(why) => write!(f, "this host cannot run guests: {why}"),
            PolicyError::NotOffered { feature, reason } => write!(f, "{feature} is set, but {reason}"),
            PolicyError::MissingDependency { feature, missing, chain } => write!(
                f,
                "{feature} is set, but it requires {missing}, which is not set (dependency chain: {})",
                ChainDisplay(chain)
            ),
            PolicyError::LeafBeyondMax { feature, max_leaf } => {
                write!(f, "{feature} is set, but the policy's maximum leaf in that range is {max_leaf:#x}")
            }
            PolicyError::MaxLeaf { leaf, limit } => {
                write!(f, "maximum leaf {leaf:#x} is above the limit {limit:#x} (host and core)")
            }
            PolicyError::VendorMismatch { policy, host, levelled_for } => {
                write!(f, "the policy is for {policy} but the host is {host}, and it was levelled for ")?;
                for (i, v) in levelled_for.iter().enumerate() {
                    f.write_str(if i == 0 { "" } else { " and " })?;
                    write!(f, "{v}")?;
                }
                write!(
                    f,
                    " hosts only (a policy runs on another vendor's hosts only if levelled across both, host-vendors={}, as `hvctl cpuid level` writes for a mixed pool)",
                    levelled_for.with(*host)
                )
            }
            PolicyError::XstateMissing { component, feature } => write!(
                f,
                "CPUID 0xd[{component}] (XSAVE component {component}) is needed by {feature}, but the policy has no size for it (does the host report it?)"
            ),
            PolicyError::XstateUnexpected { component } => {
                write!(
                    f,
                    "CPUID 0xd[{component}] describes XSAVE component {component}, but no enabled feature uses it"
                )
            }
            PolicyError::XstateLayout { component, policy, host: Some(h) } => write!(
                f,
                "CPUID 0xd[{component}]: the policy has size {} offset {} but the host has size {} offset {}",
                policy.size, policy.offset, h.size, h.offset
            ),
            PolicyError::XstateLayout { component, host: None, .. } => {
                write!(f, "CPUID 0xd[{component}]: the host does not report XSAVE component {component}")
            }
            PolicyError::XstateBadComponent { component, size, offset } => write!(
                f,
                "CPUID 0xd[{component}]: size {size} at offset {offset} is inconsistent (user components live above the 576-byte legacy area and header)"
            ),
            PolicyError::XstateOverlap { a, b } => write!(f, "CPUID 0xd: XSAVE components {a} and {b} overlap"),
            PolicyError::XstateSupervisorWithoutXsaves { component } => {
                write!(f, "CPUID 0xd[{component}] is a supervisor component, but xsaves is not set")
            }
            PolicyError::Vcpus { vcpus, why } => write!(f, "{vcpus} vCPUs: {why}"),
            PolicyError::AddressBits { what, policy, host } => {
                write!(
                    f,
                    "{policy} {what} address bits are not possible here (host has {host}; linear bits are 57 with la57, else 48)"
                )
            }
        }
    }
}

/// Every reason a policy was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The problems, in the order found.
    pub errors: Vec<PolicyError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy rejected ({} problem{})", self.errors.len(), if self.errors.len() == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}
