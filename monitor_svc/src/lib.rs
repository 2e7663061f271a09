//! Monitoring service task: RMID allocation, CMT/MBM sampling, generic per-domain
//! events and stats.
//!
//! It talks to the core only through `wire` frames (postcard-encoded messages) that
//! the hypervisor's task runtime delivers from its bounded mailbox, and never touches
//! hardware itself. On the wire it answers [`wire::Request::ServiceStatus`] and refuses
//! everything else with `NotImplemented` until the monitoring messages exist; the
//! logic behind them is here and host-tested:
//!
//! | module | what it is for |
//! |---|---|
//! | [`caps`] | decode CPUID (leaves 7, 0xF, 4, 0x8000001D, 0x80000006) into [`caps::MonitorCaps`] |
//! | [`platform`] | the three RDT MSRs, their layouts, the allow-list, the [`platform::MsrAccess`] trait |
//! | [`counters`] | IA32_QM_CTR decoding, scaling to bytes, MBM wrap-proof accumulators, rates |
//! | [`rmid`] | RMID allocation per domain and vCPU group, limbo, LRU reuse, residual attribution |
//! | [`events`] | the per-domain event registry, software counts, the stats answer |
//! | [`monitor`] | the engine tying them together, driven by requests and two timers |
//!
//! The hardware is reached only through [`platform::MsrAccess`], which the core
//! implements by message on the real system; the host tests implement it with a
//! documented hardware model (`tests/model/mod.rs`).
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

extern crate alloc;

pub mod caps;
pub mod counters;
pub mod events;
pub mod monitor;
pub mod platform;
pub mod rmid;

use alloc::vec::Vec;
use core::fmt;

use wire::service::{QueueInfo, ServiceCounters};
use wire::{Frame, ServiceId, ServiceStatus};

/// A guest domain, as the core numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u32);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "domain {}", self.0)
    }
}

/// The service's state.
#[derive(Debug)]
pub struct MonitorService {
    counters: ServiceCounters,
    monitor: Option<monitor::Monitor>,
}

impl Default for MonitorService {
    fn default() -> Self {
        Self::new()
    }
}

impl MonitorService {
    /// This service's id on the wire.
    pub const ID: ServiceId = ServiceId::Monitor;

    /// A running service with zeroed counters.
    pub const fn new() -> Self {
        Self { counters: ServiceCounters::new(Self::ID), monitor: None }
    }

    /// A running service with a monitoring engine for `caps` on `sockets` L3
    /// monitoring domains (the core decodes CPUID with [`caps::MonitorCaps::from_cpuid`]).
    pub fn with_caps(caps: caps::MonitorCaps, sockets: u32, timing: monitor::Timing) -> Self {
        Self { counters: ServiceCounters::new(Self::ID), monitor: Some(monitor::Monitor::new(caps, sockets, timing)) }
    }

    /// A running service with a monitoring engine for `caps` on one socket per entry
    /// of `socket_cpus`, the APIC IDs of that socket's CPUs (`hvctl monitor hwinfo`
    /// shows them).
    pub fn with_socket_cpus(caps: caps::MonitorCaps, socket_cpus: Vec<Vec<u32>>, timing: monitor::Timing) -> Self {
        Self {
            counters: ServiceCounters::new(Self::ID),
            monitor: Some(monitor::Monitor::with_socket_cpus(caps, socket_cpus, timing)),
        }
    }

    /// The monitoring engine, if the service was built with capabilities.
    pub const fn monitor(&self) -> Option<&monitor::Monitor> {
        self.monitor.as_ref()
    }

    /// The monitoring engine, mutably (timers, the core's software counts).
    pub const fn monitor_mut(&mut self) -> Option<&mut monitor::Monitor> {
        self.monitor.as_mut()
    }

    /// Handle one request frame from the mailbox (`queue` as it is now); returns the
    /// encoded response frame with the same request id.
    pub fn handle(&mut self, frame: &Frame, queue: QueueInfo) -> Vec<u8> {
        let counters = self.counters.clone();
        self.counters.answer(frame, queue, |request, status| counters.status_only(request, status))
    }

    /// Current status.
    pub fn status(&self, queue: QueueInfo) -> ServiceStatus {
        self.counters.status(queue)
    }
}

/// The wire side of the engine: monitoring requests from `hvctl`, answered with the
/// core's MSR access (`msr`, the allow-listed IA32_QM_* / PQR_ASSOC) and the TSC.
impl MonitorService {
    /// Handle one request frame like [`MonitorService::handle`], with hardware access
    /// for the monitoring requests. Without an engine, monitoring requests are
    /// answered `NotImplemented`.
    pub fn handle_with(
        &mut self,
        frame: &Frame,
        queue: QueueInfo,
        msr: &mut impl platform::MsrAccess,
        now_tsc: u64,
    ) -> Vec<u8> {
        let counters = self.counters.clone();
        let monitor = &mut self.monitor;
        self.counters.answer(frame, queue, |request, status| match (request, monitor.as_mut()) {
            (request @ wire::Request::ServiceStatus { .. }, _) | (request, None) => {
                counters.status_only(request, status)
            }
            (request, Some(m)) => wire_ops::answer(m, request, msr, now_tsc),
        })
    }
}

mod wire_ops {
    //! Monitoring requests ↔ the engine.

    use alloc::string::{String, ToString};
    use alloc::vec::Vec;

    use wire::{ErrorCode, ErrorReply, MonitorDomainStats, MonitorValue, Request, Response};

    use crate::DomainId;
    use crate::caps::MonitorCaps;
    use crate::events::{EventKind, EventValue};
    use crate::monitor::Monitor;
    use crate::platform::MsrAccess;
    use crate::rmid::Vcpus;

    fn refused(message: impl ToString) -> Response {
        Response::Error(ErrorReply::new(ErrorCode::Refused, message.to_string()))
    }

    /// The refusal is boxed: a `Response` is large (clippy::result_large_err).
    fn kind(name: &str) -> Result<EventKind, alloc::boxed::Box<Response>> {
        EventKind::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
            alloc::boxed::Box::new(refused(alloc::format!("unknown event `{name}` (known: {})", known.join(", "))))
        })
    }

    fn value(v: &EventValue) -> MonitorValue {
        let per_socket = |groups: &[crate::events::GroupReading], rate: bool| {
            let mut sums: Vec<u64> = Vec::new();
            for g in groups {
                for s in &g.sockets {
                    let i = s.socket as usize;
                    if sums.len() <= i {
                        sums.resize(i + 1, 0);
                    }
                    let add = if rate { s.bytes_per_sec.unwrap_or(0) } else { s.bytes.as_ref().map_or(0, |b| *b) };
                    if let Some(slot) = sums.get_mut(i) {
                        *slot = slot.saturating_add(add);
                    }
                }
            }
            sums
        };
        match v {
            EventValue::Count(n) => MonitorValue::Count(*n),
            EventValue::ByReason(list) => {
                MonitorValue::ByReason(list.iter().map(|(k, n)| (k.to_string(), *n)).collect())
            }
            EventValue::Occupancy { bytes, residual_bytes, groups } => MonitorValue::Occupancy {
                bytes: *bytes,
                residual_bytes: *residual_bytes,
                per_socket: per_socket(groups, false),
            },
            EventValue::Bandwidth { bytes, bytes_per_sec, groups, .. } => MonitorValue::Bandwidth {
                bytes: *bytes,
                bytes_per_sec: *bytes_per_sec,
                per_socket: per_socket(groups, true),
            },
            EventValue::NotAvailable { reason } => MonitorValue::NotAvailable(reason.clone()),
        }
    }

    /// Answer one monitoring request.
    pub fn answer(m: &mut Monitor, request: Request, msr: &mut impl MsrAccess, now_tsc: u64) -> Response {
        match request {
            Request::MonitorHwInfo => {
                let all_events = EventKind::ALL.iter().map(|k| String::from(k.name())).collect();
                let sockets = m.sockets();
                let socket_cpus = m.socket_cpus().to_vec();
                Response::MonitorHwInfo(match m.caps() {
                    MonitorCaps::Absent { reason } => wire::MonitorHwInfo {
                        present: false,
                        reason: Some(String::from(*reason)),
                        usable_rmids: 0,
                        max_rmid: 0,
                        sockets,
                        socket_cpus,
                        l3_bytes: 0,
                        upscaling_factor: 0,
                        counter_width: 0,
                        hw_events: Vec::new(),
                        all_events,
                    },
                    MonitorCaps::Present(c) => wire::MonitorHwInfo {
                        present: true,
                        reason: None,
                        usable_rmids: c.usable_rmids,
                        max_rmid: c.max_rmid_l3,
                        sockets,
                        socket_cpus,
                        l3_bytes: c.l3_bytes,
                        upscaling_factor: c.upscaling_factor,
                        counter_width: c.mbm_width,
                        hw_events: [
                            (c.llc_occupancy, "llc_occupancy"),
                            (c.mbm_total, "mbm_total"),
                            (c.mbm_local, "mbm_local"),
                        ]
                        .iter()
                        .filter(|(has, _)| *has)
                        .map(|(_, n)| String::from(*n))
                        .collect(),
                        all_events,
                    },
                })
            }
            Request::MonitorAttach { domain, vcpus } => {
                let vcpus = match vcpus {
                    None => Vcpus::All,
                    Some(mut list) => {
                        list.sort_unstable();
                        list.dedup();
                        Vcpus::Only(list)
                    }
                };
                match m.attach(DomainId(domain), vcpus) {
                    Ok(_) => Response::Done,
                    Err(e) => refused(e),
                }
            }
            Request::MonitorDetach { domain } => {
                let groups: Vec<_> = m.rmids().groups_of(DomainId(domain)).map(|g| g.id).collect();
                if groups.is_empty() {
                    return refused(alloc::format!("domain {domain} has no monitoring group"));
                }
                for g in groups {
                    if let Err(e) = m.detach(DomainId(domain), g, msr, now_tsc) {
                        return refused(e);
                    }
                }
                Response::Done
            }
            Request::MonitorEvents { domain, enable, disable } => {
                let mut on = Vec::new();
                let mut off = Vec::new();
                for n in &enable {
                    match kind(n) {
                        Ok(k) => on.push(k),
                        Err(r) => return *r,
                    }
                }
                for n in &disable {
                    match kind(n) {
                        Ok(k) => off.push(k),
                        Err(r) => return *r,
                    }
                }
                for k in on {
                    if let Err(e) = m.enable(DomainId(domain), k) {
                        return refused(alloc::format!("cannot enable {k} for domain {domain}: {e}"));
                    }
                }
                for k in off {
                    m.disable(DomainId(domain), k, msr, now_tsc);
                }
                Response::Done
            }
            Request::MonitorStats { domain } => {
                let domains: Vec<DomainId> = match domain {
                    Some(d) => alloc::vec![DomainId(d)],
                    None => m.events().domains().collect(),
                };
                Response::MonitorStats(
                    domains
                        .into_iter()
                        .map(|d| {
                            let stats = m.stats(d, msr);
                            MonitorDomainStats {
                                domain: d.0,
                                events: stats
                                    .events
                                    .iter()
                                    .map(|e| (String::from(e.kind.name()), value(&e.value)))
                                    .collect(),
                            }
                        })
                        .collect(),
                )
            }
            other => Response::Error(ErrorReply::new(
                ErrorCode::NotImplemented,
                alloc::format!("the monitoring service does not handle {} requests", other.name()),
            )),
        }
    }
}
