//! RMID allocation: which monitoring group of which domain counts under which RMID,
//! and when a freed RMID may be handed out again.
//!
//! - RMID 0 is "not monitored" (every logical processor's IA32_PQR_ASSOC.RMID resets
//!   to 0, SDM Vol. 3B 18.18.6) and is never handed out. Usable RMIDs are
//!   1..=[`RdtCaps::usable_rmids`](crate::caps::RdtCaps::usable_rmids).
//! - A domain has monitoring groups: one for the whole domain, or several for disjoint
//!   vCPU subsets (as libvirt's `<monitor vcpus='…'/>`); each group has its own RMID.
//!   A logical processor carries one RMID at a time, so the subsets must not overlap.
//!   [`RmidAllocator::rmid_for`] tells the core what to load into IA32_PQR_ASSOC on
//!   a vCPU switch (0 when the vCPU is not monitored).
//! - A detached group's RMID still tags the cache lines its vCPUs filled. Reusing it at
//!   once would charge that occupancy to the next owner, so the RMID goes to *limbo*
//!   until its occupancy on every socket falls below a threshold (default L3 size /
//!   number of RMIDs), rechecked periodically. Until then its remaining occupancy is
//!   attributed to the domain that left it ([`RmidAllocator::residual_bytes`]).
//!   This follows the design of Linux resctrl (fs/resctrl/monitor.c: an RMID is
//!   "busy" on each cache domain where occupancy is at or above
//!   `resctrl_rmid_realloc_threshold`, a worker rechecks about once a second, drained
//!   RMIDs join an LRU free list); the code here is our own.
//! - Allocation takes the least-recently-used clean RMID: RMIDs never used come first
//!   (lowest number first), then RMIDs in the order their groups were detached. The
//!   longer an RMID has been idle, the less of anything is left under it.
//! - When no clean RMID is left, attaching fails with [`RmidError::Exhausted`], which
//!   says how many are in limbo. There is no fallback to RMID 0.
//!
//! Not for: reading counters (the caller passes an occupancy closure) or telling the
//! core about IA32_PQR_ASSOC changes ([`crate::monitor`] and the service do that).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use crate::DomainId;
use crate::caps::MonitorCaps;
use crate::counters::CounterError;

/// A monitoring group, unique for the lifetime of the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {}", self.0)
    }
}

/// Which vCPUs of a domain a group covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Vcpus {
    /// Every vCPU, present and future.
    All,
    /// These vCPU ids (sorted, no duplicates, not empty once attached).
    Only(Vec<u32>),
}

impl Vcpus {
    /// Whether `vcpu` is covered.
    pub fn contains(&self, vcpu: u32) -> bool {
        match self {
            Self::All => true,
            Self::Only(list) => list.binary_search(&vcpu).is_ok(),
        }
    }

    /// The first vCPU both sets cover, `None` if they are disjoint. `All` overlaps
    /// anything (reported as `None` inside `Some`).
    fn overlap(&self, other: &Vcpus) -> Option<Option<u32>> {
        match (self, other) {
            (Self::Only(a), Self::Only(b)) => a.iter().find(|v| b.binary_search(v).is_ok()).map(|v| Some(*v)),
            _ => Some(None),
        }
    }
}

impl fmt::Display for Vcpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all vCPUs"),
            Self::Only(list) => {
                f.write_str("vCPUs ")?;
                for (i, v) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                Ok(())
            }
        }
    }
}

/// An attached monitoring group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// The domain it belongs to.
    pub domain: DomainId,
    /// The vCPUs it covers.
    pub vcpus: Vcpus,
    /// Its RMID (never 0).
    pub rmid: u32,
}

/// A freed RMID waiting for its occupancy to drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimboEntry {
    /// The RMID.
    pub rmid: u32,
    /// The domain whose group used it; its residual occupancy is charged there.
    pub departed: DomainId,
    /// The group that used it.
    pub group: GroupId,
    /// TSC when it was detached.
    pub freed_at_tsc: u64,
    /// Sockets where it is still dirty, with the last occupancy read there (bytes;
    /// `None` if the last read failed).
    pub dirty: Vec<(u32, Option<u64>)>,
    /// When it was released, in allocator order (its place in the LRU order).
    released: u64,
}

impl LimboEntry {
    /// The occupancy last measured on the sockets where it is still dirty.
    pub fn residual_bytes(&self) -> u64 {
        self.dirty.iter().filter_map(|(_, b)| *b).fold(0, u64::saturating_add)
    }
}

/// What a limbo recheck did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimboReport {
    /// RMIDs that drained on every socket and are free again, in the order they were detached.
    pub drained: Vec<u32>,
    /// RMIDs still in limbo.
    pub still_in_limbo: usize,
    /// Occupancy reads that failed (the RMID stays dirty on that socket).
    pub read_errors: usize,
}

/// Why an RMID operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RmidError {
    /// No clean RMID is free.
    Exhausted {
        /// The domain that asked.
        domain: DomainId,
        /// RMIDs waiting in limbo for their occupancy to drain.
        in_limbo: usize,
        /// Usable RMIDs in all (RMID 0 excluded).
        total: u32,
    },
    /// The vCPUs asked for are already covered by another group of the domain.
    AlreadyAttached {
        /// The domain.
        domain: DomainId,
        /// The first vCPU in both sets (`None` when one of them is the whole domain).
        vcpu: Option<u32>,
        /// The group that already covers it.
        group: GroupId,
        /// That group's RMID.
        rmid: u32,
    },
    /// The domain has no such group.
    NotAttached {
        /// The domain.
        domain: DomainId,
        /// The group asked for.
        group: GroupId,
    },
    /// An empty vCPU list was given.
    EmptyVcpuSet {
        /// The domain.
        domain: DomainId,
    },
    /// The CPU cannot monitor.
    NotAvailable {
        /// Why, as a phrase.
        reason: &'static str,
    },
}

impl fmt::Display for RmidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exhausted { domain, in_limbo, total } => write!(
                f,
                "cannot monitor {domain}: all {total} usable RMIDs are taken and {in_limbo} of them are in limbo, \
                 waiting for the cache occupancy of departed groups to drain; detach a group or retry later"
            ),
            Self::AlreadyAttached { domain, vcpu: Some(v), group, rmid } => {
                write!(f, "{domain} vCPU {v} is already monitored by {group} (RMID {rmid}); detach it first")
            }
            Self::AlreadyAttached { domain, vcpu: None, group, rmid } => write!(
                f,
                "{domain} already has {group} (RMID {rmid}) and a whole-domain group cannot share vCPUs with another \
                 group; detach it first"
            ),
            Self::NotAttached { domain, group } => write!(f, "{domain} has no monitoring {group}"),
            Self::EmptyVcpuSet { domain } => write!(f, "cannot monitor an empty vCPU set of {domain}"),
            Self::NotAvailable { reason } => write!(f, "not available: {reason}"),
        }
    }
}

/// Default limbo recheck period: 1 s, as Linux resctrl's CQM_LIMBOCHECK_INTERVAL.
pub const LIMBO_RECHECK_NS: u64 = 1_000_000_000;

/// The RMID allocator. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct RmidAllocator {
    unavailable: Option<&'static str>,
    usable: u32,
    sockets: u32,
    threshold: u64,
    /// Clean free RMIDs keyed by (last-use sequence number, rmid): the first is the
    /// least recently used. Never-used RMIDs have sequence 0.
    free: BTreeSet<(u64, u32)>,
    groups: BTreeMap<GroupId, Group>,
    limbo: Vec<LimboEntry>,
    next_group: u32,
    seq: u64,
}

impl RmidAllocator {
    /// An allocator for `caps` on a machine with `sockets` L3 monitoring domains (at least 1).
    pub fn new(caps: &MonitorCaps, sockets: u32) -> Self {
        let (unavailable, usable, threshold) = match caps {
            MonitorCaps::Present(rdt) => (None, rdt.usable_rmids, rdt.limbo_threshold_bytes),
            MonitorCaps::Absent { reason } => (Some(*reason), 0, 0),
        };
        Self {
            unavailable,
            usable,
            sockets: sockets.max(1),
            threshold,
            free: (1..=usable).map(|r| (0, r)).collect(),
            groups: BTreeMap::new(),
            limbo: Vec::new(),
            next_group: 1,
            seq: 0,
        }
    }

    /// Usable RMIDs in all (RMID 0 excluded).
    pub const fn usable(&self) -> u32 {
        self.usable
    }

    /// The limbo threshold in bytes.
    pub const fn threshold_bytes(&self) -> u64 {
        self.threshold
    }

    /// Change the limbo threshold (takes effect at the next recheck).
    pub fn set_threshold_bytes(&mut self, bytes: u64) {
        self.threshold = bytes;
    }

    /// Clean RMIDs ready to hand out.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// RMIDs waiting in limbo.
    pub fn in_limbo(&self) -> usize {
        self.limbo.len()
    }

    /// The limbo list.
    pub fn limbo(&self) -> &[LimboEntry] {
        &self.limbo
    }

    /// Attach a monitoring group covering `vcpus` of `domain`; returns the new group.
    /// A vCPU list is sorted and de-duplicated first.
    pub fn attach(&mut self, domain: DomainId, vcpus: Vcpus) -> Result<Group, RmidError> {
        if let Some(reason) = self.unavailable {
            return Err(RmidError::NotAvailable { reason });
        }
        let vcpus = match vcpus {
            Vcpus::All => Vcpus::All,
            Vcpus::Only(mut list) => {
                list.sort_unstable();
                list.dedup();
                if list.is_empty() {
                    return Err(RmidError::EmptyVcpuSet { domain });
                }
                Vcpus::Only(list)
            }
        };
        if let Some((group, vcpu)) = self.groups_of(domain).find_map(|g| g.vcpus.overlap(&vcpus).map(|vcpu| (g, vcpu)))
        {
            return Err(RmidError::AlreadyAttached { domain, vcpu, group: group.id, rmid: group.rmid });
        }
        let Some((_, rmid)) = self.free.pop_first() else {
            return Err(RmidError::Exhausted { domain, in_limbo: self.limbo.len(), total: self.usable });
        };
        // Group ids only wrap after 2^32 attaches; skip any still in use then.
        while self.groups.contains_key(&GroupId(self.next_group)) {
            self.next_group = self.next_group.wrapping_add(1).max(1);
        }
        let id = GroupId(self.next_group);
        self.next_group = self.next_group.wrapping_add(1).max(1);
        let group = Group { id, domain, vcpus, rmid };
        self.groups.insert(id, group.clone());
        Ok(group)
    }

    /// Detach group `group` of `domain` at TSC `now_tsc`. Its RMID's occupancy is read on
    /// every socket at once: sockets below the threshold are clean; if all are, the RMID
    /// is free again at once, otherwise it goes to limbo. Returns the freed RMID; the
    /// caller must have the core load RMID 0 (or the vCPUs' new group's RMID) for the
    /// group's vCPUs.
    pub fn detach(
        &mut self,
        domain: DomainId,
        group: GroupId,
        now_tsc: u64,
        occupancy_of: impl FnMut(u32, u32) -> Result<u64, CounterError>,
    ) -> Result<u32, RmidError> {
        let Some(g) = self.groups.get(&group).filter(|g| g.domain == domain) else {
            return Err(RmidError::NotAttached { domain, group });
        };
        let rmid = g.rmid;
        self.groups.remove(&group);
        let mut entry = LimboEntry {
            rmid,
            departed: domain,
            group,
            freed_at_tsc: now_tsc,
            dirty: (0..self.sockets).map(|s| (s, None)).collect(),
            released: 0,
        };
        self.seq = self.seq.saturating_add(1);
        let seq = self.seq;
        entry.released = seq;
        let threshold = self.threshold;
        let mut errors = 0;
        check_entry(&mut entry, threshold, occupancy_of, &mut errors);
        if entry.dirty.is_empty() {
            self.free.insert((seq, rmid));
        } else {
            self.limbo.push(entry);
        }
        Ok(rmid)
    }

    /// Detach every group of `domain`; returns the freed RMIDs.
    pub fn detach_domain(
        &mut self,
        domain: DomainId,
        now_tsc: u64,
        mut occupancy_of: impl FnMut(u32, u32) -> Result<u64, CounterError>,
    ) -> Vec<u32> {
        let ids: Vec<GroupId> = self.groups_of(domain).map(|g| g.id).collect();
        ids.into_iter().filter_map(|id| self.detach(domain, id, now_tsc, &mut occupancy_of).ok()).collect()
    }

    /// Re-read the occupancy of every limbo RMID on the sockets where it is still dirty
    /// (`occupancy_of(socket, rmid)` in bytes). RMIDs clean everywhere join the free
    /// list in the order they were freed (least recently used first). A failed read
    /// keeps the RMID dirty on that socket. Call every [`LIMBO_RECHECK_NS`] or so.
    pub fn recheck_limbo(
        &mut self,
        mut occupancy_of: impl FnMut(u32, u32) -> Result<u64, CounterError>,
    ) -> LimboReport {
        let mut report = LimboReport::default();
        let threshold = self.threshold;
        let mut still = Vec::new();
        for mut entry in core::mem::take(&mut self.limbo) {
            check_entry(&mut entry, threshold, &mut occupancy_of, &mut report.read_errors);
            if entry.dirty.is_empty() {
                report.drained.push(entry.rmid);
                // Its last use ended when it was detached: rank it by that, not by
                // when it drained, so that the free list stays least-recently-used first.
                self.free.insert((entry.released, entry.rmid));
            } else {
                still.push(entry);
            }
        }
        self.limbo = still;
        report.still_in_limbo = self.limbo.len();
        report
    }

    /// Residual occupancy (bytes, as last measured) of RMIDs in limbo that `domain` left.
    pub fn residual_bytes(&self, domain: DomainId) -> u64 {
        self.limbo.iter().filter(|e| e.departed == domain).map(LimboEntry::residual_bytes).fold(0, u64::saturating_add)
    }

    /// The groups of `domain`, in id order.
    pub fn groups_of(&self, domain: DomainId) -> impl Iterator<Item = &Group> {
        self.groups.values().filter(move |g| g.domain == domain)
    }

    /// Every attached group, in id order.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// A group by id.
    pub fn group(&self, id: GroupId) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// The RMID to load into IA32_PQR_ASSOC when `vcpu` of `domain` runs: its group's,
    /// or 0 (not monitored).
    pub fn rmid_for(&self, domain: DomainId, vcpu: u32) -> u32 {
        self.groups_of(domain).find(|g| g.vcpus.contains(vcpu)).map_or(0, |g| g.rmid)
    }
}

/// Read `entry`'s RMID on each dirty socket; drop the sockets that are below the threshold.
fn check_entry(
    entry: &mut LimboEntry,
    threshold: u64,
    mut occupancy_of: impl FnMut(u32, u32) -> Result<u64, CounterError>,
    errors: &mut usize,
) {
    let rmid = entry.rmid;
    entry.dirty.retain_mut(|(socket, last)| match occupancy_of(*socket, rmid) {
        Ok(bytes) if bytes < threshold => false,
        Ok(bytes) => {
            *last = Some(bytes);
            true
        }
        Err(_) => {
            *errors = errors.saturating_add(1);
            true
        }
    });
}
