//! Monitoring service task: RMID allocation, CMT/MBM sampling, generic per-domain
//! events and stats.
//!
//! It talks to the core only through `wire` frames (postcard-encoded messages) that
//! the hypervisor's task runtime delivers from its bounded mailbox, and never touches
//! hardware itself. Today it answers [`wire::Request::ServiceStatus`] truthfully and
//! refuses everything else with `NotImplemented`; its real work (RMIDs, CMT, MBM,
//! events) arrives with the monitoring issue.
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

extern crate alloc;

use alloc::vec::Vec;

use wire::service::{QueueInfo, ServiceCounters};
use wire::{Frame, ServiceId, ServiceStatus};

/// The service's state.
#[derive(Debug)]
pub struct MonitorService {
    counters: ServiceCounters,
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
        Self { counters: ServiceCounters::new(Self::ID) }
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
