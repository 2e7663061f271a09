//! Migration service task: log-dirty rounds, stream records, convergence policy,
//! send and receive.
//!
//! It talks to the core only through `wire` frames (postcard-encoded messages) that
//! the hypervisor's task runtime delivers from its bounded mailbox, and never touches
//! hardware itself. Today [`MigrationService`] answers [`wire::Request::ServiceStatus`]
//! truthfully and refuses everything else with `NotImplemented`; the pure core of a
//! migration is here, host-tested, for the core to drive:
//!
//! | module | what it is for |
//! |---|---|
//! | [`convergence`] | the downtime-target policy: continue, throttle, stop-and-copy or fail, from measured bandwidth and dirty rate |
//! | [`source`] | the source state machine: events in, actions (send, peek-and-clean, pause, merge back, …) out |
//! | [`dest`] | the destination state machine: stream bytes in, actions (create, accept/refuse policy, write pages, complete, discard) out |
//! | [`send`] | packing pages and dirty rounds into [`wire::migration`] records |
//!
//! None of them does I/O, reads a clock or touches guest memory: the core executes the
//! actions and reports what happened (bytes, milliseconds, bitmaps) as events. The
//! stream format itself is [`wire::migration`].
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![deny(missing_docs)]

extern crate alloc;

pub mod convergence;
pub mod dest;
pub mod send;
pub mod source;

use alloc::vec::Vec;

use wire::service::{QueueInfo, ServiceCounters};
use wire::{Frame, ServiceId, ServiceStatus};

pub use crate::convergence::{ConvergenceError, Decision, Policy, RoundStats};
pub use crate::dest::{DestAction, DestError, DestState, DestSummary, Destination};
pub use crate::send::{PageBatcher, encode_dirty_round};
pub use crate::source::{DomainInfo, Failure, Outcome, Source, SourceAction, SourceEvent, SourceState, Summary};

/// The service's state.
#[derive(Debug)]
pub struct MigrationService {
    counters: ServiceCounters,
}

impl Default for MigrationService {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationService {
    /// This service's id on the wire.
    pub const ID: ServiceId = ServiceId::Migration;

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
