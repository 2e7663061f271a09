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

use wire::{ErrorCode, ErrorReply, Frame, Request, Response, ServiceId, ServiceState, ServiceStatus};

/// The mailbox as the runtime sees it when it delivers a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Messages still waiting after this one.
    pub depth: u32,
    /// Mailbox capacity.
    pub capacity: u32,
}

/// The monitoring service's state.
#[derive(Debug)]
pub struct MonitorService {
    state: ServiceState,
    handled: u64,
    errors: u64,
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
        Self { state: ServiceState::Running, handled: 0, errors: 0 }
    }

    /// Handle one request frame; returns the encoded response frame (same request id).
    pub fn handle(&mut self, frame: &Frame, queue: Queue) -> Vec<u8> {
        let response = match wire::decode_request(frame) {
            Ok(Request::ServiceStatus { service }) if service == Self::ID => {
                // Count this request before reporting, so the answer includes itself.
                self.handled += 1;
                return encode(frame.request_id, &Response::ServiceStatus(self.status(queue)));
            }
            Ok(other) => Response::Error(ErrorReply::new(
                ErrorCode::NotImplemented,
                alloc::format!("the monitoring service does not handle {} requests yet", other.name()),
            )),
            Err(reply) => Response::Error(reply),
        };
        self.handled += 1;
        self.errors += 1;
        encode(frame.request_id, &response)
    }

    /// Current status.
    pub fn status(&self, queue: Queue) -> ServiceStatus {
        ServiceStatus {
            service: Self::ID,
            state: self.state,
            handled: self.handled,
            errors: self.errors,
            queue_depth: queue.depth,
            queue_capacity: queue.capacity,
        }
    }
}

fn encode(request_id: u64, response: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    if wire::encode_response(request_id, response, &mut out).is_err() {
        // A status or error reply is far below MAX_FRAME_LEN; should encoding still
        // fail, answer with a fixed internal error rather than nothing.
        out.clear();
        let fallback = Response::Error(ErrorReply::new(ErrorCode::Internal, "monitoring service: cannot encode reply"));
        let _ = wire::encode_response(request_id, &fallback, &mut out);
    }
    out
}
