//! The generic per-domain event API: which events are enabled for which domain, the
//! software counters the core reports, and the shape of one stats answer.
//!
//! Every event is off for every domain until enabled: software counts the core reports
//! for an event that is not enabled are dropped (and the core is told which events to
//! count, see [`crate::monitor`]), hardware events get no RMID sampling. Disabling an
//! event forgets what it collected; enabling it again starts from zero.
//!
//! Hardware events (L3 occupancy, total and local memory bandwidth) are read through
//! RMIDs ([`crate::rmid`], [`crate::counters`]); on a CPU without RDT monitoring they
//! can still be enabled and report `not available: <reason>`, while the software
//! events work everywhere.
//!
//! Not for: reading hardware ([`crate::monitor`] combines this with the counters).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::DomainId;
use crate::counters::CounterError;
use crate::platform::HwEvent;
use crate::rmid::{GroupId, Vcpus};

/// Why a vCPU exited, without its details: the key of the per-reason exit counts. The
/// core maps its arch-neutral exit reason onto this (dropping addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    /// VMCALL / VMMCALL.
    Hypercall,
    /// HLT.
    Hlt,
    /// Triple fault / shutdown.
    TripleFault,
    /// EPT violation / NPT fault inside guest RAM (log-dirty write faults).
    NestedPageFault,
    /// An EPT violation / NPT fault outside guest RAM: an MMIO access the core
    /// emulated (or refused).
    Mmio,
    /// An intercepted exception, by vector.
    Exception(u8),
    /// CPUID.
    Cpuid,
    /// IN/OUT.
    Io,
    /// RDMSR/WRMSR.
    Msr,
    /// XSETBV (the guest sets XCR0).
    Xsetbv,
    /// PML buffer full (VMX exit reason 62).
    PmlFull,
    /// The guest opened an interrupt window the core asked for (to inject an interrupt).
    InterruptWindow,
    /// A VMX/SVM instruction the guest executed (it gets #UD).
    VirtualizationInstruction,
    /// The time slice ended (preemption timer / timer interrupt).
    TimeSlice,
    /// Any other exit, by the vendor's code.
    Other(u64),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hypercall => f.write_str("hypercall"),
            Self::Hlt => f.write_str("hlt"),
            Self::TripleFault => f.write_str("triple-fault"),
            Self::NestedPageFault => f.write_str("nested-page-fault"),
            Self::Mmio => f.write_str("mmio"),
            Self::Exception(v) => write!(f, "exception({v})"),
            Self::Cpuid => f.write_str("cpuid"),
            Self::Io => f.write_str("io"),
            Self::Msr => f.write_str("msr"),
            Self::Xsetbv => f.write_str("xsetbv"),
            Self::PmlFull => f.write_str("pml-full"),
            Self::InterruptWindow => f.write_str("interrupt-window"),
            Self::VirtualizationInstruction => f.write_str("virtualization-instruction"),
            Self::TimeSlice => f.write_str("time-slice"),
            Self::Other(code) => write!(f, "other({code:#x})"),
        }
    }
}

/// An event a domain can have enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// L3 occupancy in bytes (hardware, CMT).
    LlcOccupancy,
    /// Total memory bandwidth (hardware, MBM).
    MbmTotal,
    /// Local memory bandwidth (hardware, MBM).
    MbmLocal,
    /// VM exits, counted by reason.
    VmExits,
    /// CPUID exits.
    CpuidExits,
    /// EPT violations / NPT faults.
    NestedPageFaults,
    /// PML-full exits.
    PmlFullExits,
    /// Pages logged dirty.
    DirtyPagesLogged,
    /// Time the guest ran, in nanoseconds.
    GuestRuntimeNs,
    /// HLT exits.
    Halts,
}

impl EventKind {
    /// Every event, in the order stats report them.
    pub const ALL: [EventKind; 10] = [
        Self::LlcOccupancy,
        Self::MbmTotal,
        Self::MbmLocal,
        Self::VmExits,
        Self::CpuidExits,
        Self::NestedPageFaults,
        Self::PmlFullExits,
        Self::DirtyPagesLogged,
        Self::GuestRuntimeNs,
        Self::Halts,
    ];

    /// The name users type and see.
    pub const fn name(self) -> &'static str {
        match self {
            Self::LlcOccupancy => "llc_occupancy",
            Self::MbmTotal => "mbm_total",
            Self::MbmLocal => "mbm_local",
            Self::VmExits => "vm_exits",
            Self::CpuidExits => "cpuid_exits",
            Self::NestedPageFaults => "nested_page_faults",
            Self::PmlFullExits => "pml_full_exits",
            Self::DirtyPagesLogged => "dirty_pages_logged",
            Self::GuestRuntimeNs => "guest_runtime_ns",
            Self::Halts => "halts",
        }
    }

    /// The event named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The hardware event behind it, if it is one.
    pub const fn hardware(self) -> Option<HwEvent> {
        match self {
            Self::LlcOccupancy => Some(HwEvent::LlcOccupancy),
            Self::MbmTotal => Some(HwEvent::MbmTotal),
            Self::MbmLocal => Some(HwEvent::MbmLocal),
            _ => None,
        }
    }

    const fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something the core counted for a domain, reported as a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftwareCount {
    /// `n` exits of this kind (feeds [`EventKind::VmExits`], and [`EventKind::CpuidExits`],
    /// [`EventKind::NestedPageFaults`], [`EventKind::PmlFullExits`], [`EventKind::Halts`]
    /// for the matching kinds).
    Exits(ExitKind, u64),
    /// `n` pages logged dirty.
    DirtyPages(u64),
    /// `n` nanoseconds of guest run time.
    RuntimeNs(u64),
}

/// An enable/disable request that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// No event has this name.
    UnknownEvent {
        /// The name given.
        name: String,
    },
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownEvent { name } => {
                write!(f, "there is no event named {name:?}; events are: ")?;
                for (i, k) in EventKind::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(k.name())?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DomainEvents {
    enabled: u16,
    exits: BTreeMap<ExitKind, u64>,
    dirty_pages: u64,
    runtime_ns: u64,
}

impl DomainEvents {
    const fn is_enabled(&self, kind: EventKind) -> bool {
        self.enabled & kind.bit() != 0
    }

    fn count_exit(&self, kind: ExitKind) -> u64 {
        self.exits.get(&kind).copied().unwrap_or(0)
    }

    /// Forget what `kind` collected.
    fn clear(&mut self, kind: EventKind) {
        match kind {
            EventKind::VmExits
            | EventKind::CpuidExits
            | EventKind::NestedPageFaults
            | EventKind::PmlFullExits
            | EventKind::Halts => {
                // The per-reason map feeds several events; keep what an enabled one still needs.
                let keep = |k: &ExitKind| match k {
                    _ if self.is_enabled(EventKind::VmExits) => true,
                    ExitKind::Cpuid => self.is_enabled(EventKind::CpuidExits),
                    ExitKind::NestedPageFault => self.is_enabled(EventKind::NestedPageFaults),
                    ExitKind::PmlFull => self.is_enabled(EventKind::PmlFullExits),
                    ExitKind::Hlt => self.is_enabled(EventKind::Halts),
                    _ => false,
                };
                let kept = self.exits.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (*k, *v)).collect();
                self.exits = kept;
            }
            EventKind::DirtyPagesLogged => self.dirty_pages = 0,
            EventKind::GuestRuntimeNs => self.runtime_ns = 0,
            EventKind::LlcOccupancy | EventKind::MbmTotal | EventKind::MbmLocal => {}
        }
    }
}

/// Which events each domain has enabled, and the software counts collected for them.
#[derive(Debug, Clone, Default)]
pub struct EventRegistry {
    domains: BTreeMap<DomainId, DomainEvents>,
}

impl EventRegistry {
    /// Nothing enabled anywhere.
    pub const fn new() -> Self {
        Self { domains: BTreeMap::new() }
    }

    /// Enable `kind` for `domain`; returns whether it was off before.
    pub fn enable(&mut self, domain: DomainId, kind: EventKind) -> bool {
        let d = self.domains.entry(domain).or_default();
        let was_off = !d.is_enabled(kind);
        d.enabled |= kind.bit();
        was_off
    }

    /// Disable `kind` for `domain` and forget what it collected; returns whether it was on.
    pub fn disable(&mut self, domain: DomainId, kind: EventKind) -> bool {
        let Some(d) = self.domains.get_mut(&domain) else {
            return false;
        };
        let was_on = d.is_enabled(kind);
        d.enabled &= !kind.bit();
        d.clear(kind);
        if d.enabled == 0 {
            self.domains.remove(&domain);
        }
        was_on
    }

    /// Forget `domain` entirely (it was destroyed).
    pub fn remove_domain(&mut self, domain: DomainId) {
        self.domains.remove(&domain);
    }

    /// Whether `kind` is enabled for `domain`.
    pub fn is_enabled(&self, domain: DomainId, kind: EventKind) -> bool {
        self.domains.get(&domain).is_some_and(|d| d.is_enabled(kind))
    }

    /// The events enabled for `domain`, in [`EventKind::ALL`] order.
    pub fn enabled(&self, domain: DomainId) -> Vec<EventKind> {
        EventKind::ALL.into_iter().filter(|k| self.is_enabled(domain, *k)).collect()
    }

    /// Domains with at least one event enabled.
    pub fn domains(&self) -> impl Iterator<Item = DomainId> + '_ {
        self.domains.keys().copied()
    }

    /// Whether the core should count `count`'s kind for `domain` at all.
    pub fn wants(&self, domain: DomainId, count: SoftwareCount) -> bool {
        let Some(d) = self.domains.get(&domain) else {
            return false;
        };
        match count {
            SoftwareCount::Exits(kind, _) => {
                d.is_enabled(EventKind::VmExits)
                    || match kind {
                        ExitKind::Cpuid => d.is_enabled(EventKind::CpuidExits),
                        ExitKind::NestedPageFault => d.is_enabled(EventKind::NestedPageFaults),
                        ExitKind::PmlFull => d.is_enabled(EventKind::PmlFullExits),
                        ExitKind::Hlt => d.is_enabled(EventKind::Halts),
                        _ => false,
                    }
            }
            SoftwareCount::DirtyPages(_) => d.is_enabled(EventKind::DirtyPagesLogged),
            SoftwareCount::RuntimeNs(_) => d.is_enabled(EventKind::GuestRuntimeNs),
        }
    }

    /// Add a delta the core reported. Returns `false` (and collects nothing) when no
    /// enabled event of `domain` wants it.
    pub fn record(&mut self, domain: DomainId, count: SoftwareCount) -> bool {
        if !self.wants(domain, count) {
            return false;
        }
        let Some(d) = self.domains.get_mut(&domain) else {
            return false;
        };
        match count {
            SoftwareCount::Exits(kind, n) => {
                let slot = d.exits.entry(kind).or_insert(0);
                *slot = slot.saturating_add(n);
            }
            SoftwareCount::DirtyPages(n) => d.dirty_pages = d.dirty_pages.saturating_add(n),
            SoftwareCount::RuntimeNs(n) => d.runtime_ns = d.runtime_ns.saturating_add(n),
        }
        true
    }

    /// The value of software event `kind` for `domain` (`None` for hardware events or
    /// when it is not enabled).
    pub fn software_value(&self, domain: DomainId, kind: EventKind) -> Option<EventValue> {
        let d = self.domains.get(&domain).filter(|d| d.is_enabled(kind))?;
        Some(match kind {
            EventKind::VmExits => EventValue::ByReason(d.exits.iter().map(|(k, v)| (*k, *v)).collect()),
            EventKind::CpuidExits => EventValue::Count(d.count_exit(ExitKind::Cpuid)),
            EventKind::NestedPageFaults => EventValue::Count(d.count_exit(ExitKind::NestedPageFault)),
            EventKind::PmlFullExits => EventValue::Count(d.count_exit(ExitKind::PmlFull)),
            EventKind::Halts => EventValue::Count(d.count_exit(ExitKind::Hlt)),
            EventKind::DirtyPagesLogged => EventValue::Count(d.dirty_pages),
            EventKind::GuestRuntimeNs => EventValue::Count(d.runtime_ns),
            EventKind::LlcOccupancy | EventKind::MbmTotal | EventKind::MbmLocal => return None,
        })
    }
}

/// One socket's reading of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketReading {
    /// The socket (L3 monitoring domain).
    pub socket: u32,
    /// Bytes (occupancy now, or bytes counted since enabled for MBM), or why not.
    pub bytes: Result<u64, CounterError>,
    /// MBM: bytes per second over the latest sampling interval.
    pub bytes_per_sec: Option<u64>,
}

/// One monitoring group's share of a hardware event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReading {
    /// The group.
    pub group: GroupId,
    /// Its vCPUs.
    pub vcpus: Vcpus,
    /// Its RMID.
    pub rmid: u32,
    /// Per socket.
    pub sockets: Vec<SocketReading>,
}

/// The value of one enabled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventValue {
    /// A count (or nanoseconds for [`EventKind::GuestRuntimeNs`]).
    Count(u64),
    /// Counts by exit reason, in [`ExitKind`] order.
    ByReason(Vec<(ExitKind, u64)>),
    /// L3 occupancy.
    Occupancy {
        /// Sum over the domain's groups and sockets that could be read.
        bytes: u64,
        /// Occupancy still under RMIDs this domain's detached groups left in limbo.
        residual_bytes: u64,
        /// Per group and socket.
        groups: Vec<GroupReading>,
    },
    /// Memory bandwidth.
    Bandwidth {
        /// Bytes since the event was enabled (including groups since detached).
        bytes: u64,
        /// Bytes per second over the latest sampling interval, summed over groups.
        bytes_per_sec: Option<u64>,
        /// TSC of the latest sample.
        sampled_at_tsc: Option<u64>,
        /// Per group and socket.
        groups: Vec<GroupReading>,
    },
    /// The event cannot be collected here.
    NotAvailable {
        /// Why, as a phrase (displayed as `not available: {reason}`).
        reason: String,
    },
}

impl fmt::Display for EventValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::ByReason(list) => {
                for (i, (k, n)) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "{k}={n}")?;
                }
                Ok(())
            }
            Self::Occupancy { bytes, residual_bytes, .. } => {
                write!(f, "{bytes} bytes (+{residual_bytes} bytes residual in limbo)")
            }
            Self::Bandwidth { bytes, bytes_per_sec: Some(rate), .. } => write!(f, "{bytes} bytes, {rate} bytes/s"),
            Self::Bandwidth { bytes, bytes_per_sec: None, .. } => write!(f, "{bytes} bytes, rate not yet known"),
            Self::NotAvailable { reason } => write!(f, "not available: {reason}"),
        }
    }
}

/// One enabled event and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStat {
    /// The event.
    pub kind: EventKind,
    /// Its value.
    pub value: EventValue,
}

/// Every enabled event of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStats {
    /// The domain.
    pub domain: DomainId,
    /// The enabled events, in [`EventKind::ALL`] order.
    pub events: Vec<EventStat>,
}

impl DomainStats {
    /// The value of `kind`, if it is enabled.
    pub fn get(&self, kind: EventKind) -> Option<&EventValue> {
        self.events.iter().find(|e| e.kind == kind).map(|e| &e.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DomainId = DomainId(1);

    #[test]
    fn nothing_is_collected_until_enabled() {
        let mut r = EventRegistry::new();
        assert!(!r.record(D, SoftwareCount::Exits(ExitKind::Cpuid, 5)));
        assert!(!r.record(D, SoftwareCount::DirtyPages(5)));
        assert!(r.enable(D, EventKind::CpuidExits));
        assert!(!r.enable(D, EventKind::CpuidExits), "second enable is a no-op");
        assert!(r.record(D, SoftwareCount::Exits(ExitKind::Cpuid, 2)));
        assert!(!r.record(D, SoftwareCount::Exits(ExitKind::Io, 2)), "io exits feed no enabled event");
        assert!(!r.record(D, SoftwareCount::DirtyPages(5)));
        assert_eq!(r.software_value(D, EventKind::CpuidExits), Some(EventValue::Count(2)));
        assert_eq!(r.software_value(D, EventKind::DirtyPagesLogged), None);
        assert_eq!(r.enabled(D), [EventKind::CpuidExits]);
    }

    #[test]
    fn exits_by_reason_and_derived_counts_share_the_map() {
        let mut r = EventRegistry::new();
        r.enable(D, EventKind::VmExits);
        r.enable(D, EventKind::Halts);
        for c in [
            SoftwareCount::Exits(ExitKind::Hlt, 3),
            SoftwareCount::Exits(ExitKind::Io, 4),
            SoftwareCount::Exits(ExitKind::Hlt, 1),
            SoftwareCount::Exits(ExitKind::Other(0x30), 1),
        ] {
            assert!(r.record(D, c));
        }
        assert_eq!(
            r.software_value(D, EventKind::VmExits),
            Some(EventValue::ByReason(alloc::vec![(ExitKind::Hlt, 4), (ExitKind::Io, 4), (ExitKind::Other(0x30), 1)]))
        );
        // Disabling the per-reason event keeps the halts but forgets the rest.
        assert!(r.disable(D, EventKind::VmExits));
        assert_eq!(r.software_value(D, EventKind::Halts), Some(EventValue::Count(4)));
        r.enable(D, EventKind::VmExits);
        assert_eq!(
            r.software_value(D, EventKind::VmExits),
            Some(EventValue::ByReason(alloc::vec![(ExitKind::Hlt, 4)]))
        );
        // Disabling then re-enabling starts from zero.
        r.disable(D, EventKind::VmExits);
        r.disable(D, EventKind::Halts);
        r.enable(D, EventKind::Halts);
        assert_eq!(r.software_value(D, EventKind::Halts), Some(EventValue::Count(0)));
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_events() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
        assert_eq!(EventKind::from_name("cache"), None);
        let e = EventError::UnknownEvent { name: "cache".into() };
        let shown = alloc::format!("{e}");
        assert!(
            shown.starts_with("there is no event named \"cache\"; events are: llc_occupancy, mbm_total"),
            "{shown}"
        );
    }
}
