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
