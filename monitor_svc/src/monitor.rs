//! The monitoring engine: RMIDs, counters and the event registry put together, driven
//! through [`MsrAccess`] and TSC stamps so that it runs the same against the core (by
//! message) and against the hardware model in the host tests.
//!
//! What drives it:
//! - requests: [`Monitor::attach`], [`Monitor::detach`], [`Monitor::enable`],
//!   [`Monitor::disable`], [`Monitor::stats`], [`Monitor::domain_destroyed`];
//! - a timer every [`Monitor::mbm_sample_interval_ns`]: [`Monitor::sample_mbm`];
//! - a timer every [`LIMBO_RECHECK_NS`](crate::rmid::LIMBO_RECHECK_NS):
//!   [`Monitor::recheck_limbo`];
//! - the core's software counts: [`Monitor::record`].
//!
//! After attach/detach/enable/disable the service must tell the core the domain's new
//! vCPU → RMID map ([`Monitor::rmid_map`]) so that it loads IA32_PQR_ASSOC on vCPU
//! switch, and which software events to count ([`Monitor::software_events`]).
//!
//! Enabling a hardware event for a domain without a monitoring group attaches a
//! whole-domain group (and fails, with the allocator's error, if no RMID is free);
//! disabling the last hardware event detaches that automatic group again. Groups
//! attached explicitly stay until detached.
//!
//! Not for: wire messages (the service maps them onto these calls).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::DomainId;
use crate::caps::{MonitorCaps, NotAvailable};
use crate::counters::{self, CounterError, MbmAccumulator};
use crate::events::{
    DomainStats, EventKind, EventRegistry, EventStat, EventValue, GroupReading, SocketReading, SoftwareCount,
};
use crate::platform::{HwEvent, MsrAccess};
use crate::rmid::{Group, GroupId, LimboReport, RmidAllocator, RmidError, Vcpus};

/// Timing facts the engine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// TSC frequency in Hz (0 if unknown: no rates then).
    pub tsc_hz: u64,
    /// The highest memory bandwidth to plan MBM sampling for, in bytes per second.
    pub max_bytes_per_sec: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self { tsc_hz: 0, max_bytes_per_sec: DEFAULT_MAX_BYTES_PER_SEC }
    }
}

/// Bandwidth to plan MBM sampling for when none is configured: 1 TB/s, above any
/// socket's memory bandwidth today.
pub const DEFAULT_MAX_BYTES_PER_SEC: u64 = 1_000_000_000_000;

/// The longest MBM sampling period used even when the counters would allow more: 1 s
/// (SDM Vol. 3B 18.18.7 and Linux resctrl's MBM_OVERFLOW_INTERVAL).
pub const MBM_SAMPLE_MAX_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
struct SocketMbm {
    acc: MbmAccumulator,
    last_error: Option<CounterError>,
}

/// What one MBM sampling round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleReport {
    /// Counters read successfully.
    pub samples: usize,
    /// Counters that gave an error (kept per socket, shown in stats).
    pub errors: usize,
    /// Samples taken after an interval longer than the safe maximum.
    pub suspect: usize,
}

/// The engine. See the module docs.
#[derive(Debug, Clone)]
pub struct Monitor {
    caps: MonitorCaps,
    sockets: u32,
    /// The APIC IDs of each socket's CPUs, as the core reported them (for hwinfo).
    socket_cpus: Vec<Vec<u32>>,
    timing: Timing,
    rmids: RmidAllocator,
    events: EventRegistry,
    auto_groups: BTreeMap<DomainId, GroupId>,
    mbm: BTreeMap<(GroupId, HwEvent, u32), SocketMbm>,
    /// MBM bytes counted by groups since detached, per domain and event.
    retired: BTreeMap<(DomainId, HwEvent), u64>,
}

impl Monitor {
    /// An engine for `caps` on `sockets` L3 monitoring domains.
    pub fn new(caps: MonitorCaps, sockets: u32, timing: Timing) -> Self {
        Self {
            rmids: RmidAllocator::new(&caps, sockets),
            caps,
            sockets: sockets.max(1),
            socket_cpus: Vec::new(),
            timing,
            events: EventRegistry::new(),
            auto_groups: BTreeMap::new(),
            mbm: BTreeMap::new(),
            retired: BTreeMap::new(),
        }
    }

    /// L3 monitoring domains (sockets) it reads.
    pub const fn sockets(&self) -> u32 {
        self.sockets
    }

    /// An engine for `caps` on one socket per entry of `socket_cpus` (each the APIC
    /// IDs of that socket's CPUs, which hwinfo reports); at least one socket.
    pub fn with_socket_cpus(caps: MonitorCaps, socket_cpus: Vec<Vec<u32>>, timing: Timing) -> Self {
        let sockets = u32::try_from(socket_cpus.len()).unwrap_or(u32::MAX);
        Self { socket_cpus, ..Self::new(caps, sockets, timing) }
    }

    /// The APIC IDs of each socket's CPUs (empty when the core did not say).
    pub fn socket_cpus(&self) -> &[Vec<u32>] {
        &self.socket_cpus
    }

    /// The capabilities it was built with.
    pub const fn caps(&self) -> &MonitorCaps {
        &self.caps
    }

    /// The RMID allocator (read-only).
    pub const fn rmids(&self) -> &RmidAllocator {
        &self.rmids
    }

    /// The event registry (read-only).
    pub const fn events(&self) -> &EventRegistry {
        &self.events
    }

    /// Whether hardware event `event` can be collected on this CPU.
    pub fn hw_available(&self, event: HwEvent) -> Result<(), NotAvailable> {
        let rdt = self.caps.rdt()?;
        let (supported, reason) = match event {
            HwEvent::LlcOccupancy => {
                (rdt.llc_occupancy, "CPU has no L3 occupancy monitoring (CPUID.(EAX=0xF,ECX=1):EDX[0]=0)")
            }
            HwEvent::MbmTotal => (rdt.mbm_total, "CPU has no total MBM (CPUID.(EAX=0xF,ECX=1):EDX[1]=0)"),
            HwEvent::MbmLocal => (rdt.mbm_local, "CPU has no local MBM (CPUID.(EAX=0xF,ECX=1):EDX[2]=0)"),
        };
        if supported { Ok(()) } else { Err(NotAvailable { reason }) }
    }

    /// How often to call [`Monitor::sample_mbm`]: half the time the MBM counter takes to
    /// wrap at the planned bandwidth, and at most [`MBM_SAMPLE_MAX_NS`].
    pub fn mbm_sample_interval_ns(&self) -> u64 {
        match self.caps.rdt() {
            Ok(rdt) => counters::max_safe_sample_interval_ns(
                rdt.mbm_width,
                rdt.upscaling_factor,
                self.timing.max_bytes_per_sec,
            )
            .min(MBM_SAMPLE_MAX_NS),
            Err(_) => MBM_SAMPLE_MAX_NS,
        }
    }

    /// Attach a monitoring group for `vcpus` of `domain`.
    pub fn attach(&mut self, domain: DomainId, vcpus: Vcpus) -> Result<Group, RmidError> {
        self.rmids.attach(domain, vcpus)
    }

    /// Detach group `group` of `domain` at `now_tsc`; its RMID's occupancy is read at
    /// once to decide between the free list and limbo. Returns the freed RMID.
    pub fn detach(
        &mut self,
        domain: DomainId,
        group: GroupId,
        msr: &mut impl MsrAccess,
        now_tsc: u64,
    ) -> Result<u32, RmidError> {
        if self.rmids.group(group).is_none_or(|g| g.domain != domain) {
            return Err(RmidError::NotAttached { domain, group });
        }
        self.retire_mbm(domain, group);
        if self.auto_groups.get(&domain) == Some(&group) {
            self.auto_groups.remove(&domain);
        }
        let (factor, overflow) = self.scaling();
        self.rmids.detach(domain, group, now_tsc, |socket, rmid| {
            counters::read_occupancy_bytes(msr, socket, rmid, factor, overflow)
        })
    }

    /// The domain is gone: detach its groups (their RMIDs' residual occupancy stays
    /// charged to it in limbo) and forget its events.
    pub fn domain_destroyed(&mut self, domain: DomainId, msr: &mut impl MsrAccess, now_tsc: u64) {
        let ids: Vec<GroupId> = self.rmids.groups_of(domain).map(|g| g.id).collect();
        for id in ids {
            let _ = self.detach(domain, id, msr, now_tsc);
        }
        self.events.remove_domain(domain);
        self.retired.retain(|(d, _), _| *d != domain);
    }

    /// Enable `kind` for `domain`. A hardware event on a domain without a group attaches
    /// a whole-domain group; if that fails the event stays off and the error is returned.
    /// On a CPU without the event, enabling succeeds and stats report it not available.
    pub fn enable(&mut self, domain: DomainId, kind: EventKind) -> Result<bool, RmidError> {
        if let Some(hw) = kind.hardware()
            && self.hw_available(hw).is_ok()
            && self.rmids.groups_of(domain).next().is_none()
        {
            let group = self.rmids.attach(domain, Vcpus::All)?;
            self.auto_groups.insert(domain, group.id);
        }
        Ok(self.events.enable(domain, kind))
    }

    /// Disable `kind` for `domain` and forget what it collected. Disabling the last
    /// hardware event detaches an automatically attached group.
    pub fn disable(&mut self, domain: DomainId, kind: EventKind, msr: &mut impl MsrAccess, now_tsc: u64) -> bool {
        let was_on = self.events.disable(domain, kind);
        if let Some(hw) = kind.hardware() {
            if matches!(hw, HwEvent::MbmTotal | HwEvent::MbmLocal) {
                let groups: Vec<GroupId> = self.rmids.groups_of(domain).map(|g| g.id).collect();
                self.mbm.retain(|(g, e, _), _| !(*e == hw && groups.contains(g)));
                self.retired.remove(&(domain, hw));
            }
            let any_hw = EventKind::ALL.iter().any(|k| k.hardware().is_some() && self.events.is_enabled(domain, *k));
            if !any_hw && let Some(group) = self.auto_groups.get(&domain).copied() {
                let _ = self.detach(domain, group, msr, now_tsc);
            }
        }
        was_on
    }

    /// Add a software count the core reported; `false` if no enabled event wants it.
    pub fn record(&mut self, domain: DomainId, count: SoftwareCount) -> bool {
        self.events.record(domain, count)
    }

    /// The software events the core should count for `domain`.
    pub fn software_events(&self, domain: DomainId) -> Vec<EventKind> {
        self.events.enabled(domain).into_iter().filter(|k| k.hardware().is_none()).collect()
    }

    /// `domain`'s vCPU → RMID map for the core (IA32_PQR_ASSOC on vCPU switch); vCPUs
    /// in no group run with RMID 0.
    pub fn rmid_map(&self, domain: DomainId) -> Vec<(Vcpus, u32)> {
        self.rmids.groups_of(domain).map(|g| (g.vcpus.clone(), g.rmid)).collect()
    }

    /// The RMID for `vcpu` of `domain` (0 when not monitored).
    pub fn rmid_for(&self, domain: DomainId, vcpu: u32) -> u32 {
        self.rmids.rmid_for(domain, vcpu)
    }

    /// Read every enabled MBM counter of every group once (the sampling timer).
    pub fn sample_mbm(&mut self, msr: &mut impl MsrAccess, now_tsc: u64) -> SampleReport {
        let mut report = SampleReport::default();
        let Ok(rdt) = self.caps.rdt().copied() else {
            return report;
        };
        let max_ticks = self.max_interval_ticks();
        let mut work = Vec::new();
        for g in self.rmids.groups() {
            for hw in [HwEvent::MbmTotal, HwEvent::MbmLocal] {
                let kind = if hw == HwEvent::MbmTotal { EventKind::MbmTotal } else { EventKind::MbmLocal };
                if self.events.is_enabled(g.domain, kind) && self.hw_available(hw).is_ok() {
                    work.push((g.id, g.rmid, hw));
                }
            }
        }
        for (group, rmid, hw) in work {
            for socket in 0..self.sockets {
                let slot = self.mbm.entry((group, hw, socket)).or_insert_with(|| SocketMbm {
                    acc: MbmAccumulator::new(rdt.mbm_width, rdt.upscaling_factor),
                    last_error: None,
                });
                match counters::read_counter(msr, socket, hw, rmid, rdt.overflow_bit) {
                    Ok(data) => {
                        let s = slot.acc.sample(data.count, now_tsc, max_ticks);
                        slot.last_error = None;
                        report.samples = report.samples.saturating_add(1);
                        if s.suspect {
                            report.suspect = report.suspect.saturating_add(1);
                        }
                    }
                    Err(e) => {
                        slot.last_error = Some(e);
                        report.errors = report.errors.saturating_add(1);
                    }
                }
            }
        }
        report
    }

    /// Recheck the limbo list (the limbo timer).
    pub fn recheck_limbo(&mut self, msr: &mut impl MsrAccess) -> LimboReport {
        let (factor, overflow) = self.scaling();
        self.rmids.recheck_limbo(|socket, rmid| counters::read_occupancy_bytes(msr, socket, rmid, factor, overflow))
    }

    /// Every enabled event of `domain` with its value. Occupancy is read now; bandwidth
    /// is as of the latest [`Monitor::sample_mbm`].
    pub fn stats(&self, domain: DomainId, msr: &mut impl MsrAccess) -> DomainStats {
        let events = self
            .events
            .enabled(domain)
            .into_iter()
            .map(|kind| {
                let value = match kind.hardware() {
                    None => self.events.software_value(domain, kind).unwrap_or(EventValue::Count(0)),
                    Some(hw) => match self.hw_available(hw) {
                        Err(na) => EventValue::NotAvailable { reason: String::from(na.reason) },
                        Ok(()) if hw == HwEvent::LlcOccupancy => self.occupancy(domain, msr),
                        Ok(()) => self.bandwidth(domain, hw),
                    },
                };
                EventStat { kind, value }
            })
            .collect();
        DomainStats { domain, events }
    }

    fn occupancy(&self, domain: DomainId, msr: &mut impl MsrAccess) -> EventValue {
        let (factor, overflow) = self.scaling();
        let mut total = 0u64;
        let mut groups = Vec::new();
        for g in self.rmids.groups_of(domain) {
            let sockets: Vec<SocketReading> = (0..self.sockets)
                .map(|socket| {
                    let bytes = counters::read_occupancy_bytes(msr, socket, g.rmid, factor, overflow);
                    if let Ok(b) = bytes {
                        total = total.saturating_add(b);
                    }
                    SocketReading { socket, bytes, bytes_per_sec: None }
                })
                .collect();
            groups.push(GroupReading { group: g.id, vcpus: g.vcpus.clone(), rmid: g.rmid, sockets });
        }
        EventValue::Occupancy { bytes: total, residual_bytes: self.rmids.residual_bytes(domain), groups }
    }

    fn bandwidth(&self, domain: DomainId, hw: HwEvent) -> EventValue {
        let mut bytes = self.retired.get(&(domain, hw)).copied().unwrap_or(0);
        let mut rate: Option<u64> = None;
        let mut sampled_at_tsc: Option<u64> = None;
        let mut groups = Vec::new();
        for g in self.rmids.groups_of(domain) {
            let sockets: Vec<SocketReading> = (0..self.sockets)
                .filter_map(|socket| {
                    let slot = self.mbm.get(&(g.id, hw, socket))?;
                    bytes = bytes.saturating_add(slot.acc.bytes());
                    let r = slot.acc.bytes_per_sec(self.timing.tsc_hz);
                    if let Some(r) = r {
                        rate = Some(rate.unwrap_or(0).saturating_add(r));
                    }
                    sampled_at_tsc = sampled_at_tsc.max(slot.acc.last_tsc());
                    let value = match &slot.last_error {
                        Some(e) => Err(e.clone()),
                        None => Ok(slot.acc.bytes()),
                    };
                    Some(SocketReading { socket, bytes: value, bytes_per_sec: r })
                })
                .collect();
            groups.push(GroupReading { group: g.id, vcpus: g.vcpus.clone(), rmid: g.rmid, sockets });
        }
        EventValue::Bandwidth { bytes, bytes_per_sec: rate, sampled_at_tsc, groups }
    }

    /// Every RMID in limbo with the domain its residual occupancy is charged to.
    pub fn residuals(&self) -> Vec<(DomainId, u32, u64)> {
        self.rmids.limbo().iter().map(|e| (e.departed, e.rmid, e.residual_bytes())).collect()
    }

    /// A one-line summary of the RMID state, for logs and status.
    pub fn rmid_summary(&self) -> String {
        match self.caps.rdt() {
            Err(na) => na.to_string(),
            Ok(_) => alloc::format!(
                "{} usable RMIDs: {} free, {} in limbo, {} in use",
                self.rmids.usable(),
                self.rmids.free_count(),
                self.rmids.in_limbo(),
                self.rmids.groups().count()
            ),
        }
    }

    fn scaling(&self) -> (u32, bool) {
        self.caps.rdt().map_or((1, false), |r| (r.upscaling_factor, r.overflow_bit))
    }

    fn max_interval_ticks(&self) -> Option<u64> {
        let rdt = self.caps.rdt().ok()?;
        if self.timing.tsc_hz == 0 {
            return None;
        }
        let ns =
            counters::max_safe_sample_interval_ns(rdt.mbm_width, rdt.upscaling_factor, self.timing.max_bytes_per_sec);
        let ticks = u128::from(ns).saturating_mul(u128::from(self.timing.tsc_hz)) / 1_000_000_000;
        Some(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    /// Fold a leaving group's MBM bytes into its domain's totals and drop its accumulators.
    fn retire_mbm(&mut self, domain: DomainId, group: GroupId) {
        let mut keep = BTreeMap::new();
        for (key, slot) in core::mem::take(&mut self.mbm) {
            let (g, hw, _) = key;
            if g == group {
                let total = self.retired.entry((domain, hw)).or_insert(0);
                *total = total.saturating_add(slot.acc.bytes());
            } else {
                keep.insert(key, slot);
            }
        }
        self.mbm = keep;
    }
}
