//! The source side of a live migration as a state machine with no I/O: the core feeds
//! it [`SourceEvent`]s and executes the [`SourceAction`]s it returns, in order.
//!
//! # Actions and the events that answer them
//!
//! | action | the core does | answered by |
//! |---|---|---|
//! | `SendHeader(h)`, `SendPolicy(p)`, `SendEnd(e)` | encode the record, send it | — |
//! | `WaitPolicyAck` | wait for the destination's verdict on the policy | `PolicyAccepted` or `Abort(PeerRefused(reason))` |
//! | `StartLogDirty` | start log-dirty over all of the domain's memory | `LogDirtyStarted` |
//! | `SendAllPages { pfns }` | send every page of `pfns` (zero pages as pfn only, see [`PageBatcher`](crate::send::PageBatcher)) | `PagesSent { bytes, elapsed_ms }` |
//! | `PeekAndClean` | drain PML, take and clean the log-dirty bits of all memory | `Dirty(bitmap)` |
//! | `Throttle { percent }` | throttle the domain's vCPUs (0 = off) | — |
//! | `SendPages { round, pages }` | send a [`DirtyRound`](wire::migration::DirtyRound) record, then the pages | `PagesSent { bytes, elapsed_ms }` |
//! | `Pause` | pause the domain | `Paused` |
//! | `SendVcpuState` | send one `VcpuState` record per vCPU | `VcpuStateSent { bytes, elapsed_ms }` |
//! | `WaitAck` | wait for the destination's acknowledgement of `End` | `Acked` |
//! | `MergeBackDirty(bitmap)` | OR the bits back into the domain's log-dirty bitmap | — |
//! | `Resume` | unpause the domain | — |
//! | `StopLogDirty` | stop log-dirty | — |
//! | `Done(outcome)` | report; on success destroy the (paused) source domain | — |
//!
//! At most one action of a batch awaits an answer, and it is the last one. Any event may
//! instead be `Abort(failure)` (cancel, broken connection, checksum error, destination
//! refusal, a failed core operation); an event the machine does not expect is a failure
//! too. A failure at any point returns the clean-up, in this order:
//! `MergeBackDirty(bits taken and not yet sent)` (if any), `Throttle { percent: 0 }` (if
//! throttled), `Resume` (if `Pause` was asked for), `StopLogDirty` (only if this
//! migration asked to start it), `Done(Failed(..))`. The source domain keeps running and
//! no dirty bit is lost. Because a failure can replace the answer to `Pause` or
//! `StartLogDirty`, `Resume` and `StopLogDirty` may reach a domain that is already
//! running or not logging; the core treats those as no-ops.
//!
//! The bits a `PeekAndClean` took are data, not a status: the core always reports them
//! with `Dirty`, even when it is about to abort (then `Dirty` first, `Abort` next, without
//! executing the actions `Dirty` returned), so that the source can give them back.
//!
//! When log-dirty was already running before the migration (`log_dirty_active`), the
//! migration neither starts nor stops it: the merged-back bits stay in the running log.
//!
//! # Sequence
//!
//! ```text
//!  Start → SendHeader, SendPolicy, WaitPolicyAck → PolicyAccepted → StartLogDirty →
//!  LogDirtyStarted → SendAllPages × n → PagesSent × n → PeekAndClean → Dirty(d) →
//!    decide: Continue/Throttle → SendPages(d) → PagesSent → PeekAndClean → …
//!            StopAndCopy → Pause → Paused → PeekAndClean → Dirty(f) → SendPages(d ∪ f)
//!              → PagesSent → SendVcpuState → VcpuStateSent → SendEnd, WaitAck → Acked
//!              → StopLogDirty, Done(Completed)
//!            Fail → MergeBackDirty(d), …, Done(Failed(NotConverging))
//! ```
//!
//! The bits of a dirty round stay "in flight" from the peek that took them until their
//! pages are sent; in the final round, until the destination acknowledges `End`.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use wire::dirty::{DirtyBitmap, PFN_LIMIT};
use wire::migration::{CpuidPolicy, MIGRATION_STREAM_VERSION, StreamEnd, StreamHeader};

use crate::convergence::{ConvergenceError, Decision, PAGE_SIZE, Policy, RoundStats};

/// Pages per `SendAllPages` action by default (128 MiB).
pub const DEFAULT_PAGES_PER_STEP: u64 = 32 * 1024;

/// What the core tells the source about the domain when a migration starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain's name.
    pub name: String,
    /// Its memory size in bytes (a non-zero multiple of 4096).
    pub memory_bytes: u64,
    /// Its vCPU count.
    pub vcpus: u32,
    /// Its kernel command line.
    pub cmdline: String,
    /// The source host's featureset words.
    pub featureset: Vec<u32>,
    /// The postcard bytes of the domain's `levelling` policy.
    pub policy: Vec<u8>,
    /// Whether log-dirty is already running on the domain (then the migration neither
    /// starts nor stops it).
    pub log_dirty_active: bool,
}

/// What the core reports to the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Start migrating this domain.
    Start(DomainInfo),
    /// The destination accepted the CPUID policy.
    PolicyAccepted,
    /// Log-dirty is running.
    LogDirtyStarted,
    /// The pages of the last `SendAllPages`/`SendPages` were sent.
    PagesSent {
        /// Bytes written to the connection for them.
        bytes: u64,
        /// Time that took, in ms.
        elapsed_ms: u64,
    },
    /// The bits `PeekAndClean` took (covering pfns `0..pages`).
    Dirty(DirtyBitmap),
    /// The domain is paused.
    Paused,
    /// The vCPU state records were sent.
    VcpuStateSent {
        /// Bytes written.
        bytes: u64,
        /// Time that took, in ms.
        elapsed_ms: u64,
    },
    /// The destination acknowledged `End`: it has the domain.
    Acked,
    /// Something failed; clean up.
    Abort(Failure),
}

/// Why a migration failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The operator cancelled it.
    Cancelled,
    /// The connection to the destination broke.
    ConnectionBroken(String),
    /// The destination refused (its reason, e.g. a CPUID policy its host cannot run).
    PeerRefused(String),
    /// A record or chunk failed its checksum (either side noticed).
    Checksum(String),
    /// A core operation failed (log-dirty, pause, reading memory).
    CoreFailed(String),
    /// Pre-copy does not converge.
    NotConverging(ConvergenceError),
    /// The domain cannot be migrated as described.
    BadDomain(String),
    /// An event that does not answer the last action.
    UnexpectedEvent {
        /// The state the source was in.
        state: SourceState,
        /// The event's name.
        event: &'static str,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("migration cancelled"),
            Self::ConnectionBroken(r) => write!(f, "connection to the destination broke: {r}"),
            Self::PeerRefused(r) => write!(f, "destination refused the migration: {r}"),
            Self::Checksum(r) => write!(f, "checksum error: {r}"),
            Self::CoreFailed(r) => write!(f, "core operation failed: {r}"),
            Self::NotConverging(e) => write!(f, "{e}"),
            Self::BadDomain(r) => write!(f, "domain cannot be migrated: {r}"),
            Self::UnexpectedEvent { state, event } => write!(f, "unexpected event {event} in state {state:?}"),
        }
    }
}

/// What the core is to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Send the header record.
    SendHeader(StreamHeader),
    /// Send the CPUID policy record.
    SendPolicy(CpuidPolicy),
    /// Wait for the destination's verdict on the policy.
    WaitPolicyAck,
    /// Start log-dirty over all memory.
    StartLogDirty,
    /// Send every page of `pfns` (round 0).
    SendAllPages {
        /// The pfns.
        pfns: Range<u64>,
    },
    /// Drain PML, take and clean the log-dirty bits of all memory.
    PeekAndClean,
    /// Throttle the vCPUs to `percent` (0 = off).
    Throttle {
        /// Percent of vCPU time taken away.
        percent: u8,
    },
    /// Send a dirty-round record and the pages it marks.
    SendPages {
        /// The round, from 1.
        round: u32,
        /// The pages.
        pages: DirtyBitmap,
    },
    /// Pause the domain.
    Pause,
    /// Send the vCPU state records.
    SendVcpuState,
    /// Send the end record.
    SendEnd(StreamEnd),
    /// Wait for the destination's acknowledgement.
    WaitAck,
    /// OR these bits back into the domain's log-dirty bitmap.
    MergeBackDirty(DirtyBitmap),
    /// Unpause the domain.
    Resume,
    /// Stop log-dirty.
    StopLogDirty,
    /// The migration is over.
    Done(Outcome),
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination has the domain.
    Completed(Summary),
    /// The source domain keeps running.
    Failed(Failure),
}

/// Figures of a migration (so far).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Summary {
    /// Dirty rounds after the full copy, including the final one.
    pub rounds: u32,
    /// Pages sent, zero or not, in all rounds.
    pub pages_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Time spent sending, in ms.
    pub send_ms: u64,
    /// The downtime estimated when stop-and-copy was decided, in ms.
    pub estimated_downtime_ms: u64,
    /// The measured time from `Paused` to `Acked`'s last send, in ms (sending only).
    pub downtime_send_ms: u64,
    /// The highest throttle applied, in percent.
    pub max_throttle_percent: u8,
}

/// Where the source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Not started.
    Idle,
    /// Waiting for the destination's policy verdict.
    AwaitPolicy,
    /// Waiting for log-dirty to start.
    StartingLogDirty,
    /// Sending all memory; `next` is the first pfn not yet asked for.
    FullCopy {
        /// The first pfn of the next step.
        next: u64,
    },
    /// Waiting for the bits of a peek-and-clean.
    Peeking,
    /// Sending a dirty round.
    SendingRound,
    /// Waiting for the domain to pause.
    Pausing,
    /// Waiting for the final peek-and-clean.
    FinalPeek,
    /// Sending the final round.
    FinalSend,
    /// Sending vCPU state.
    SendingVcpus,
    /// Waiting for the acknowledgement.
    AwaitAck,
    /// Over.
    Done,
}

/// The source state machine; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Source {
    policy: Policy,
    step: u64,
    state: SourceState,
    pages: u64,
    /// Whether this migration is to start (and stop) log-dirty.
    owns_log: bool,
    /// Whether it asked for log-dirty to start (a failure from then on stops it).
    log_requested: bool,
    paused: bool,
    throttle: u8,
    round: u32,
    /// Bits taken from the log whose pages are not yet (acknowledged as) sent.
    in_flight: Option<DirtyBitmap>,
    /// Send time since the last peek (the round's duration).
    round_ms: u64,
    /// What the last decision was made on.
    last: RoundStats,
    summary: Summary,
    outcome: Option<Outcome>,
}

impl Source {
    /// A source that will follow `policy`.
    pub const fn new(policy: Policy) -> Self {
        Self::with_step(policy, DEFAULT_PAGES_PER_STEP)
    }

    /// A source whose full copy asks for `step` pages per `SendAllPages` (at least 1).
    pub const fn with_step(policy: Policy, step: u64) -> Self {
        Self {
            policy,
            step: if step == 0 { 1 } else { step },
            state: SourceState::Idle,
            pages: 0,
            owns_log: false,
            log_requested: false,
            paused: false,
            throttle: 0,
            round: 0,
            in_flight: None,
            round_ms: 0,
            last: RoundStats { round: 0, bytes_sent: 0, send_ms: 0, dirty_pages: 0, round_ms: 0, throttle_percent: 0 },
            summary: Summary {
                rounds: 0,
                pages_sent: 0,
                bytes_sent: 0,
                send_ms: 0,
                estimated_downtime_ms: 0,
                downtime_send_ms: 0,
                max_throttle_percent: 0,
            },
            outcome: None,
        }
    }

    /// Where the source is.
    pub const fn state(&self) -> SourceState {
        self.state
    }

    /// The bits taken from the log and not yet sent (what a failure now gives back).
    pub const fn in_flight(&self) -> Option<&DirtyBitmap> {
        self.in_flight.as_ref()
    }

    /// What the last convergence decision was made on (zeros before the first).
    pub const fn last_round(&self) -> RoundStats {
        self.last
    }

    /// Figures so far.
    pub const fn summary(&self) -> &Summary {
        &self.summary
    }

    /// How it ended, once it has.
    pub const fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Feed one event; returns the actions to execute, in order.
    pub fn on(&mut self, event: SourceEvent) -> Vec<SourceAction> {
        use SourceEvent as E;
        use SourceState as S;
        match (self.state, event) {
            (S::Done, _) => Vec::new(),
            (_, E::Abort(failure)) => self.fail(failure),
            (S::Idle, E::Start(info)) => self.start(info),
            (S::AwaitPolicy, E::PolicyAccepted) => {
                if self.owns_log {
                    self.log_requested = true;
                    self.state = S::StartingLogDirty;
                    vec![SourceAction::StartLogDirty]
                } else {
                    self.full_copy_step(0)
                }
            }
            (S::StartingLogDirty, E::LogDirtyStarted) => self.full_copy_step(0),
            (S::FullCopy { next }, E::PagesSent { bytes, elapsed_ms }) => {
                self.sent(bytes, elapsed_ms);
                if next < self.pages {
                    self.full_copy_step(next)
                } else {
                    self.summary.pages_sent += self.pages;
                    self.peek(S::Peeking)
                }
            }
            (S::Peeking, E::Dirty(bits)) => self.decide(bits),
            (S::SendingRound, E::PagesSent { bytes, elapsed_ms }) => {
                self.sent(bytes, elapsed_ms);
                if let Some(done) = self.in_flight.take() {
                    self.summary.pages_sent += done.count_ones();
                }
                self.peek(S::Peeking)
            }
            (S::Pausing, E::Paused) => {
                self.paused = true;
                self.peek(S::FinalPeek)
            }
            (S::FinalPeek, E::Dirty(bits)) => self.final_round(bits),
            (S::FinalSend, E::PagesSent { bytes, elapsed_ms }) => {
                self.sent(bytes, elapsed_ms);
                self.summary.downtime_send_ms += elapsed_ms;
                self.summary.pages_sent += self.in_flight.as_ref().map_or(0, DirtyBitmap::count_ones);
                self.state = S::SendingVcpus;
                vec![SourceAction::SendVcpuState]
            }
            (S::SendingVcpus, E::VcpuStateSent { bytes, elapsed_ms }) => {
                self.sent(bytes, elapsed_ms);
                self.summary.downtime_send_ms += elapsed_ms;
                self.state = S::AwaitAck;
                let end = StreamEnd { pages_sent: self.summary.pages_sent, rounds: self.round };
                vec![SourceAction::SendEnd(end), SourceAction::WaitAck]
            }
            (S::AwaitAck, E::Acked) => {
                self.in_flight = None;
                self.summary.rounds = self.round;
                let outcome = Outcome::Completed(self.summary);
                let mut actions = Vec::new();
                if self.log_requested {
                    actions.push(SourceAction::StopLogDirty);
                }
                self.finish(outcome, actions)
            }
            (state, event) => self.fail(Failure::UnexpectedEvent { state, event: event_name(&event) }),
        }
    }

    fn start(&mut self, info: DomainInfo) -> Vec<SourceAction> {
        if info.memory_bytes == 0 || !info.memory_bytes.is_multiple_of(PAGE_SIZE) {
            return self.fail(Failure::BadDomain(alloc::format!(
                "memory size {} bytes is not a non-zero multiple of 4096",
                info.memory_bytes
            )));
        }
        let pages = info.memory_bytes / PAGE_SIZE;
        if pages > PFN_LIMIT {
            return self.fail(Failure::BadDomain(alloc::format!("{pages} pages exceed the pfn limit")));
        }
        if info.vcpus == 0 {
            return self.fail(Failure::BadDomain("no vCPUs".into()));
        }
        self.pages = pages;
        self.owns_log = !info.log_dirty_active;
        self.state = SourceState::AwaitPolicy;
        let header = StreamHeader {
            stream_version: MIGRATION_STREAM_VERSION,
            source_featureset: info.featureset,
            name: info.name,
            memory_bytes: info.memory_bytes,
            vcpus: info.vcpus,
            cmdline: info.cmdline,
        };
        vec![
            SourceAction::SendHeader(header),
            SourceAction::SendPolicy(CpuidPolicy { policy: info.policy }),
            SourceAction::WaitPolicyAck,
        ]
    }

    fn full_copy_step(&mut self, from: u64) -> Vec<SourceAction> {
        let to = from.saturating_add(self.step).min(self.pages);
        self.state = SourceState::FullCopy { next: to };
        vec![SourceAction::SendAllPages { pfns: from..to }]
    }

    fn sent(&mut self, bytes: u64, elapsed_ms: u64) {
        self.summary.bytes_sent = self.summary.bytes_sent.saturating_add(bytes);
        self.summary.send_ms = self.summary.send_ms.saturating_add(elapsed_ms);
        self.round_ms = self.round_ms.saturating_add(elapsed_ms);
    }

    fn peek(&mut self, next: SourceState) -> Vec<SourceAction> {
        self.state = next;
        vec![SourceAction::PeekAndClean]
    }

    /// Check the bits a peek returned; a wrong shape is a core bug, and the bits are
    /// still given back on failure.
    fn check_bits(&self, bits: &DirtyBitmap) -> Result<(), Failure> {
        if bits.pfns() == (0..self.pages) {
            Ok(())
        } else {
            Err(Failure::CoreFailed(alloc::format!(
                "peek-and-clean returned pfns {:#x}..{:#x}, expected 0..{:#x}",
                bits.pfns().start,
                bits.pfns().end,
                self.pages
            )))
        }
    }

    fn decide(&mut self, bits: DirtyBitmap) -> Vec<SourceAction> {
        let check = self.check_bits(&bits);
        let stats = RoundStats {
            round: self.round,
            bytes_sent: self.summary.bytes_sent,
            send_ms: self.summary.send_ms,
            dirty_pages: bits.count_ones(),
            round_ms: self.round_ms,
            throttle_percent: self.throttle,
        };
        self.last = stats;
        self.in_flight = Some(bits.clone());
        if let Err(f) = check {
            return self.fail(f);
        }
        self.round_ms = 0;
        let mut actions = Vec::new();
        match self.policy.decide(&stats) {
            Decision::StopAndCopy { estimated_downtime_ms } => {
                self.summary.estimated_downtime_ms = estimated_downtime_ms;
                self.state = SourceState::Pausing;
                // Counted as paused from the request on: a failure before `Paused`
                // still resumes (resuming a running domain is a no-op for the core).
                self.paused = true;
                return vec![SourceAction::Pause];
            }
            Decision::Fail(e) => return self.fail(Failure::NotConverging(e)),
            Decision::Throttle { percent } => {
                self.throttle = percent;
                self.summary.max_throttle_percent = self.summary.max_throttle_percent.max(percent);
                actions.push(SourceAction::Throttle { percent });
            }
            Decision::Continue => {}
        }
        self.round += 1;
        self.state = SourceState::SendingRound;
        actions.push(SourceAction::SendPages { round: self.round, pages: bits });
        actions
    }

    fn final_round(&mut self, bits: DirtyBitmap) -> Vec<SourceAction> {
        let check = self.check_bits(&bits);
        let merged = match (self.in_flight.take(), check) {
            (Some(mut pending), Ok(())) => match pending.or_merge(&bits) {
                Ok(()) => Ok(pending),
                Err(e) => {
                    self.in_flight = Some(pending);
                    Err((bits, Failure::CoreFailed(alloc::format!("{e}"))))
                }
            },
            (None, Ok(())) => Ok(bits),
            (pending, Err(f)) => {
                self.in_flight = pending;
                Err((bits, f))
            }
        };
        match merged {
            Ok(all) => {
                self.round += 1;
                self.in_flight = Some(all.clone());
                self.state = SourceState::FinalSend;
                vec![SourceAction::SendPages { round: self.round, pages: all }]
            }
            Err((bits, f)) => {
                // Give back both the pending bits and the final peek's bits.
                let mut actions = Vec::new();
                actions.push(SourceAction::MergeBackDirty(bits));
                let mut rest = self.fail(f);
                actions.append(&mut rest);
                actions
            }
        }
    }

    fn fail(&mut self, failure: Failure) -> Vec<SourceAction> {
        let mut actions = Vec::new();
        if let Some(bits) = self.in_flight.take()
            && !bits.is_clean()
        {
            actions.push(SourceAction::MergeBackDirty(bits));
        }
        if self.throttle > 0 {
            self.throttle = 0;
            actions.push(SourceAction::Throttle { percent: 0 });
        }
        if self.paused {
            self.paused = false;
            actions.push(SourceAction::Resume);
        }
        if self.log_requested {
            actions.push(SourceAction::StopLogDirty);
        }
        self.summary.rounds = self.round;
        self.finish(Outcome::Failed(failure), actions)
    }

    fn finish(&mut self, outcome: Outcome, mut actions: Vec<SourceAction>) -> Vec<SourceAction> {
        self.state = SourceState::Done;
        self.outcome = Some(outcome.clone());
        actions.push(SourceAction::Done(outcome));
        actions
    }
}

fn event_name(event: &SourceEvent) -> &'static str {
    match event {
        SourceEvent::Start(_) => "Start",
        SourceEvent::PolicyAccepted => "PolicyAccepted",
        SourceEvent::LogDirtyStarted => "LogDirtyStarted",
        SourceEvent::PagesSent { .. } => "PagesSent",
        SourceEvent::Dirty(_) => "Dirty",
        SourceEvent::Paused => "Paused",
        SourceEvent::VcpuStateSent { .. } => "VcpuStateSent",
        SourceEvent::Acked => "Acked",
        SourceEvent::Abort(_) => "Abort",
    }
}
