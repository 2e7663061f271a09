//! Migration service task: log-dirty rounds, stream records, convergence policy,
//! send and receive.
//!
//! It talks to the core only through `wire` frames (postcard-encoded messages) that
//! the hypervisor's task runtime delivers from its bounded mailbox, and never touches
//! hardware itself. [`MigrationService`] answers the `Migrate*` requests of protocol v3
//! (see [`wire::migrate`]) by running [`session`]s, which execute their steps through the
//! core's [`MigrationCore`] operations (read a page, peek-and-clean, pause, …):
//!
//! | module | what it is for |
//! |---|---|
//! | [`convergence`] | the downtime-target policy: continue, throttle, stop-and-copy or fail, from measured bandwidth and dirty rate |
//! | [`source`] | the source state machine: events in, actions (send, peek-and-clean, pause, merge back, …) out |
//! | [`dest`] | the destination state machine: stream bytes in, actions (create, accept/refuse policy, write pages, complete, discard) out |
//! | [`send`] | packing pages and dirty rounds into [`wire::migration`] records |
//! | [`session`] | a sending or receiving migration: the state machines driven by the relay's requests, executed through [`MigrationCore`] |
//!
//! None of them does I/O or touches guest memory: the core executes the operations and
//! reports what happened. The stream format itself is [`wire::migration`].
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![deny(missing_docs)]

extern crate alloc;

pub mod convergence;
pub mod dest;
pub mod send;
pub mod session;
pub mod source;
#[cfg(feature = "testing")]
pub mod testing;

use alloc::string::String;
use alloc::vec::Vec;

use wire::service::{QueueInfo, ServiceCounters};
use wire::{ErrorCode, ErrorReply, Frame, Request, Response, ServiceId, ServiceStatus};

pub use crate::convergence::{ConvergenceError, Decision, Policy, RoundStats};
pub use crate::dest::{DestAction, DestError, DestState, DestSummary, Destination, StateRecord};
pub use crate::send::{PageBatcher, encode_dirty_round};
pub use crate::session::{MachineState, MigrationCore, PolicyCheck, ReceiveSession, SendSession};
pub use crate::source::{DomainInfo, Failure, Outcome, Source, SourceAction, SourceEvent, SourceState, Summary};

/// Finished sessions kept for their last status (the oldest go first).
const KEEP_FINISHED: usize = 8;

/// The service's state: its counters and the migration sessions.
#[derive(Debug)]
pub struct MigrationService {
    counters: ServiceCounters,
    sends: Vec<SendSession>,
    receives: Vec<ReceiveSession>,
    next_session: u32,
}

impl Default for MigrationService {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationService {
    /// This service's id on the wire.
    pub const ID: ServiceId = ServiceId::Migration;

    /// A running service with zeroed counters and no session.
    pub const fn new() -> Self {
        Self { counters: ServiceCounters::new(Self::ID), sends: Vec::new(), receives: Vec::new(), next_session: 1 }
    }

    /// Handle a request frame without core access (status only; migration requests
    /// are refused): what the core uses to gather `Info`.
    pub fn handle(&mut self, frame: &Frame, queue: QueueInfo) -> Vec<u8> {
        let counters = self.counters.clone();
        self.counters.answer(frame, queue, |request, status| counters.status_only(request, status))
    }

    /// Handle one request frame from the mailbox (`queue` as it is now), executing
    /// migration steps through `core`; returns the encoded response frame.
    pub fn handle_with(&mut self, frame: &Frame, queue: QueueInfo, core: &mut dyn MigrationCore) -> Vec<u8> {
        let counters = self.counters.clone();
        let mut sessions =
            Sessions { sends: &mut self.sends, receives: &mut self.receives, next: &mut self.next_session };
        self.counters.answer(frame, queue, |request, status| match request {
            request @ Request::ServiceStatus { .. } => counters.status_only(request, status),
            request => sessions.answer(request, core).unwrap_or_else(Response::Error),
        })
    }

    /// Periodic work: fail sessions whose relay went quiet.
    pub fn tick(&mut self, core: &mut dyn MigrationCore) {
        for s in self.sends.iter_mut() {
            s.tick(core);
        }
        for r in self.receives.iter_mut() {
            r.tick(core);
        }
    }

    /// Whether any session is running (the core then ticks the service often).
    pub fn active(&self) -> bool {
        self.sends.iter().any(|s| !s.is_over()) || self.receives.iter().any(|r| !r.is_over())
    }

    /// Current status.
    pub fn status(&self, queue: QueueInfo) -> ServiceStatus {
        self.counters.status(queue)
    }
}

struct Sessions<'a> {
    sends: &'a mut Vec<SendSession>,
    receives: &'a mut Vec<ReceiveSession>,
    next: &'a mut u32,
}

fn refused(message: String) -> ErrorReply {
    ErrorReply::new(ErrorCode::Refused, message)
}

impl Sessions<'_> {
    fn id(&mut self) -> u32 {
        let id = *self.next;
        *self.next = self.next.wrapping_add(1).max(1);
        id
    }

    fn send(&mut self, session: u32) -> Result<&mut SendSession, ErrorReply> {
        self.sends
            .iter_mut()
            .find(|s| s.id() == session)
            .ok_or_else(|| refused(alloc::format!("no sending migration session {session}")))
    }

    fn receive(&mut self, session: u32) -> Result<&mut ReceiveSession, ErrorReply> {
        self.receives
            .iter_mut()
            .find(|s| s.id() == session)
            .ok_or_else(|| refused(alloc::format!("no receiving migration session {session}")))
    }

    fn answer(&mut self, request: Request, core: &mut dyn MigrationCore) -> Result<Response, ErrorReply> {
        match request {
            Request::MigrateSend { domain, options } => {
                if let Some(s) = self.sends.iter().find(|s| s.domain() == domain && !s.is_over()) {
                    return Err(refused(alloc::format!(
                        "domain {domain} is already being migrated (session {}); cancel it first",
                        s.id()
                    )));
                }
                if options.max_rounds == 0 {
                    return Err(ErrorReply::new(ErrorCode::BadRequest, "max_rounds must be at least 1"));
                }
                let id = self.id();
                let session = SendSession::start(id, domain, options, core);
                let progress = session.progress();
                prune(self.sends, |s| s.is_over());
                self.sends.push(session);
                Ok(Response::MigrateProgress(progress.into()))
            }
            Request::MigrateRead { session, max_bytes } => {
                let s = self.send(session)?;
                let max = (max_bytes as usize).min(wire::MAX_MIGRATE_DATA);
                let data = s.read(core, max);
                Ok(Response::MigrateData { data, progress: s.progress().into() })
            }
            Request::MigrateVerdict { session, verdict } => {
                let s = self.send(session)?;
                s.verdict(core, verdict).map_err(refused)?;
                Ok(Response::MigrateProgress(s.progress().into()))
            }
            Request::MigrateCancel { domain } => {
                let s = self
                    .sends
                    .iter_mut()
                    .rev()
                    .find(|s| s.domain() == domain)
                    .ok_or_else(|| refused(alloc::format!("domain {domain} is not being migrated")))?;
                s.cancel(core);
                Ok(Response::MigrateProgress(s.progress().into()))
            }
            Request::MigrateReceive => {
                let id = self.id();
                let session = ReceiveSession::new(id, core);
                let status = session.status();
                prune(self.receives, |r| r.is_over());
                self.receives.push(session);
                Ok(Response::ReceiveStatus(status))
            }
            Request::MigrateWrite { session, data } => {
                if data.len() > wire::MAX_MIGRATE_DATA {
                    return Err(ErrorReply::new(
                        ErrorCode::BadRequest,
                        alloc::format!("{} bytes in one write; at most {}", data.len(), wire::MAX_MIGRATE_DATA),
                    ));
                }
                let r = self.receive(session)?;
                r.write(core, &data);
                Ok(Response::ReceiveStatus(r.status()))
            }
            Request::MigrateAbort { session, reason } => {
                let r = self.receive(session)?;
                r.abort(core, reason);
                Ok(Response::ReceiveStatus(r.status()))
            }
            other => Err(ErrorReply::new(
                ErrorCode::Internal,
                alloc::format!(
                    "{} reached the migration service, but it belongs to the {} service",
                    other.name(),
                    other.service().name()
                ),
            )),
        }
    }
}

/// Drop the oldest finished sessions beyond [`KEEP_FINISHED`].
fn prune<T>(sessions: &mut Vec<T>, over: impl Fn(&T) -> bool) {
    while sessions.iter().filter(|s| over(s)).count() >= KEEP_FINISHED {
        match sessions.iter().position(&over) {
            Some(i) => {
                sessions.remove(i);
            }
            None => break,
        }
    }
}
