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
//! | `SendAllPages { pfns }` | send every page of `pfns` (zero pages as pfn only, see [`PageBatcher`](crate::send::PageBatcher)) | `PagesSent { bytes, elapsed_us }` |
//! | `PeekAndClean` | drain PML, take and clean the log-dirty bits of all memory | `Dirty(bitmap)` |
//! | `Throttle { percent }` | throttle the domain's vCPUs (0 = off) | — |
//! | `SendPages { round, pages }` | send a [`DirtyRound`](wire::migration::DirtyRound) record, then the pages | `PagesSent { bytes, elapsed_us }` |
//! | `Pause` | pause the domain | `Paused` |
//! | `SendVcpuState` | send one `VcpuState` record per vCPU | `VcpuStateSent { bytes, elapsed_us }` |
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
//! `MergeBackDirty(bits taken and not yet delivered)` (if any: the rest of the round and
//! the bits carried to the next one, in one bitmap), `Throttle { percent: 0 }` (if
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
//!    decide: Continue/Throttle → SendPages(part of d) → PagesSent → … → PeekAndClean → …
//!            StopAndCopy → Pause → Paused → PeekAndClean → Dirty(f) → SendPages(d ∪ f)
//!              → PagesSent → SendVcpuState → VcpuStateSent → SendEnd, WaitAck → Acked
//!              → StopLogDirty, Done(Completed)
//!            Fail → MergeBackDirty(d), …, Done(Failed(NotConverging))
//! ```
//!
//! # Rounds in chunks, mid-round peeks
//!
//! A round (the full copy too) is sent in chunks, each a `SendAllPages` or a `SendPages`
//! over a sub-range of the round's bits (the destination takes several dirty-round
//! records with the same number). The first chunk is all but what fits bandwidth ×
//! downtime target; once the rest fits (give or take one tail chunk), a `PeekAndClean`
//! follows every chunk, and each chunk is what the last peek found the stop needs: the
//! pages over the target, scaled by how fast the pending set grew per page sent since
//! the peek before, at most [`TAIL_CHUNK_MS`] of send time. Stopping as soon as the
//! target allows sends the fewest pages twice. A mid-round peek's bits at or past
//! the cursor (the first pfn not yet sent) join the round: those pages are not read
//! yet, so they go once. Its bits behind the cursor are carried into the next round.
//! If everything pending (the rest of the round and the carried bits) then fits the
//! target, the source stops and copies at once: the final round is the rest ∪ the
//! carried bits ∪ the final peek's (stopped in the full copy, every pfn not yet copied).
//! Only stop-and-copy is decided mid-round; throttling and giving up wait for the
//! end-of-round peek, which sees the round's new bits and the carried ones.
//!
//! Bits stay "in flight" from the peek that took them until their pages are delivered
//! (the `PagesSent` of a chunk that sends them after that peek); in the final round,
//! until the destination acknowledges `End`. A failure gives back all of them.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use wire::dirty::{DirtyBitmap, DirtyError, PFN_LIMIT};
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
        /// Time that took, in µs (rounded up). Microseconds, not ms: the source sums the
        /// sends of a migration, hundreds of 50 ms chunks among them, and whole ms
        /// rounded up each time sank its bandwidth estimate by a share of a percent.
        elapsed_us: u64,
    },
    /// The bits `PeekAndClean` took (covering pfns `0..pages`).
    Dirty(DirtyBitmap),
    /// The domain is paused.
    Paused,
    /// The vCPU state records were sent.
    VcpuStateSent {
        /// Bytes written.
        bytes: u64,
        /// Time that took, in µs (rounded up). Microseconds, not ms: the source sums the
        /// sends of a migration, hundreds of 50 ms chunks among them, and whole ms
        /// rounded up each time sank its bandwidth estimate by a share of a percent.
        elapsed_us: u64,
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
    /// Waiting for the bits of the peek-and-clean at the end of a round.
    Peeking,
    /// Waiting for the bits of a peek-and-clean in the middle of a round.
    MidPeek,
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
    /// Bits taken from the log at or past `cursor` and not yet delivered. In a dirty
    /// round: the round's pages still to send (the chunk in flight included). In the
    /// full copy: the bits mid-round peeks took ahead of the copy (the copy sends those
    /// pages anyway). In the final round: everything it sends, until `Acked`.
    ahead: Option<DirtyBitmap>,
    /// Bits mid-round peeks took behind `cursor`: pages sent before they were dirtied
    /// again, carried into the next round.
    carry: Option<DirtyBitmap>,
    /// The first pfn of the round not yet delivered (the chunk in flight starts here).
    cursor: u64,
    /// The end of the chunk in flight.
    chunk_end: u64,
    /// Pages of the chunk in flight.
    chunk_pages: u64,
    /// Pages of the dirty round at or past `cursor` (set bits of `ahead`).
    remaining: u64,
    /// Whether this round had a mid-round peek (its chunks are then tail-sized).
    tail: bool,
    /// Pages of the next tail chunk, as the last mid-round peek sized it (0: a whole
    /// [`TAIL_CHUNK_MS`] of send time).
    tail_len: u64,
    /// Pages pending (the rest of the round and the carried bits) after the last peek.
    pending_mark: u64,
    /// Pages delivered since the last peek.
    sent_since_peek: u64,
    /// Pages this dirty round took in at its mid-round peeks (dirtied again before it
    /// sent them, or dirtied for the first time ahead of its cursor).
    joined: u64,
    /// Stop-and-copy was decided in the middle of the full copy: the final round also
    /// sends every pfn from `cursor` on.
    full_rest: bool,
    /// Send time since the last end-of-round peek (the round's duration), in µs.
    round_us: u64,
    /// Send time since the migration started, in µs (`summary.send_ms`, rounded up).
    send_us: u64,
    /// Send time of the final round and the vCPU state, in µs.
    downtime_us: u64,
    /// What the last decision was made on.
    last: RoundStats,
    summary: Summary,
    outcome: Option<Outcome>,
}

/// After a mid-round peek, a round goes on in chunks of this much send time (at the
/// measured bandwidth), each followed by a peek: QEMU's `MAX_WAIT`.
pub const TAIL_CHUNK_MS: u64 = 50;

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
            ahead: None,
            carry: None,
            cursor: 0,
            chunk_end: 0,
            chunk_pages: 0,
            remaining: 0,
            tail: false,
            tail_len: 0,
            pending_mark: 0,
            sent_since_peek: 0,
            joined: 0,
            full_rest: false,
            round_us: 0,
            send_us: 0,
            downtime_us: 0,
            last: RoundStats {
                round: 0,
                bytes_sent: 0,
                send_ms: 0,
                dirty_pages: 0,
                dirtied_pages: 0,
                round_ms: 0,
                throttle_percent: 0,
            },
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

    /// The bits taken from the log and not yet delivered (what a failure now gives
    /// back): the rest of the round and the bits carried to the next one.
    pub fn in_flight(&self) -> Option<DirtyBitmap> {
        match (&self.ahead, &self.carry) {
            (None, None) => None,
            (Some(a), None) => Some(a.clone()),
            (None, Some(c)) => Some(c.clone()),
            (Some(a), Some(c)) => {
                let mut all = a.clone();
                // Both cover the domain's pfns; a failed merge would leave `a` alone.
                let _ = all.or_merge(c);
                Some(all)
            }
        }
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
            (S::FullCopy { next }, E::PagesSent { bytes, elapsed_us }) => {
                self.sent(bytes, elapsed_us);
                self.summary.pages_sent += next.saturating_sub(self.cursor);
                self.sent_since_peek = self.sent_since_peek.saturating_add(next.saturating_sub(self.cursor));
                if let Some(ahead) = &mut self.ahead {
                    // Delivered: the copy read those pages after the peek took them.
                    let _ = ahead.clean(self.cursor..next);
                }
                self.cursor = next;
                let remaining = self.pages.saturating_sub(next);
                if remaining == 0 {
                    self.ahead = None;
                    self.peek(S::Peeking)
                } else if self.mid_peek_due(remaining) {
                    self.peek(S::MidPeek)
                } else {
                    self.full_copy_step(next)
                }
            }
            (S::Peeking, E::Dirty(bits)) => self.decide(bits),
            (S::MidPeek, E::Dirty(bits)) => self.mid_round(bits),
            (S::SendingRound, E::PagesSent { bytes, elapsed_us }) => {
                self.sent(bytes, elapsed_us);
                self.summary.pages_sent += self.chunk_pages;
                self.sent_since_peek = self.sent_since_peek.saturating_add(self.chunk_pages);
                if let Some(ahead) = &mut self.ahead {
                    let _ = ahead.clean(self.cursor..self.chunk_end);
                }
                self.remaining = self.remaining.saturating_sub(self.chunk_pages);
                self.chunk_pages = 0;
                self.cursor = self.chunk_end;
                if self.remaining == 0 {
                    self.ahead = None;
                    self.peek(S::Peeking)
                } else if self.mid_peek_due(self.remaining) {
                    self.peek(S::MidPeek)
                } else {
                    self.send_chunk()
                }
            }
            (S::Pausing, E::Paused) => {
                self.paused = true;
                self.peek(S::FinalPeek)
            }
            (S::FinalPeek, E::Dirty(bits)) => self.final_round(bits),
            (S::FinalSend, E::PagesSent { bytes, elapsed_us }) => {
                self.sent(bytes, elapsed_us);
                self.downtime_us = self.downtime_us.saturating_add(elapsed_us);
                self.summary.downtime_send_ms = ms_up(self.downtime_us);
                self.summary.pages_sent += self.ahead.as_ref().map_or(0, DirtyBitmap::count_ones);
                self.state = S::SendingVcpus;
                vec![SourceAction::SendVcpuState]
            }
            (S::SendingVcpus, E::VcpuStateSent { bytes, elapsed_us }) => {
                self.sent(bytes, elapsed_us);
                self.downtime_us = self.downtime_us.saturating_add(elapsed_us);
                self.summary.downtime_send_ms = ms_up(self.downtime_us);
                self.state = S::AwaitAck;
                let end = StreamEnd { pages_sent: self.summary.pages_sent, rounds: self.round };
                vec![SourceAction::SendEnd(end), SourceAction::WaitAck]
            }
            (S::AwaitAck, E::Acked) => {
                self.ahead = None;
                self.carry = None;
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
        self.pending_mark = pages;
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
        self.cursor = from;
        let want = self.chunk_len(self.pages.saturating_sub(from)).min(self.step);
        let to = from.saturating_add(want).min(self.pages);
        self.state = SourceState::FullCopy { next: to };
        vec![SourceAction::SendAllPages { pfns: from..to }]
    }

    /// The measured bandwidth in pages/s (0 before anything was sent).
    fn bandwidth_pages(&self) -> u64 {
        RoundStats { bytes_sent: self.summary.bytes_sent, send_ms: self.summary.send_ms, ..RoundStats::default() }
            .bandwidth_pages_per_sec()
    }

    /// Pages the downtime target allows at the measured bandwidth.
    fn target_pages(&self) -> u64 {
        self.bandwidth_pages().saturating_mul(self.policy.downtime_target_ms) / 1000
    }

    /// Pages [`TAIL_CHUNK_MS`] of send time take at the measured bandwidth (at least 1).
    fn tail_pages(&self) -> u64 {
        (self.bandwidth_pages().saturating_mul(TAIL_CHUNK_MS) / 1000).max(1)
    }

    /// Pages of the next chunk of a round with `remaining` pages left: all but what fits
    /// the downtime target (then a mid-round peek is due), then tail chunks as the last
    /// mid-round peek sized them (see [`tail_chunk`]).
    fn chunk_len(&self, remaining: u64) -> u64 {
        let target = self.target_pages();
        let want = if remaining > target && !self.tail {
            remaining - target
        } else if self.tail_len > 0 {
            self.tail_len
        } else {
            self.tail_pages()
        };
        want.min(remaining).max(1)
    }

    /// Whether a mid-round peek is due with `remaining` pages of the round left: when
    /// they fit the downtime target and one tail chunk. The slack of a tail chunk keeps
    /// a bandwidth estimate that sinks a little after the first chunk (a slower moment
    /// of the link, the rounding of the send time to whole ms) from asking for a string
    /// of tiny chunks that chase the shrinking target.
    fn mid_peek_due(&self, remaining: u64) -> bool {
        remaining > 0 && remaining <= self.target_pages().saturating_add(self.tail_pages())
    }

    /// The next chunk of a dirty round: the set bits of `ahead` from `cursor` on, as
    /// many as [`Self::chunk_len`] says.
    fn send_chunk(&mut self) -> Vec<SourceAction> {
        let want = self.chunk_len(self.remaining);
        let chunk = self.ahead.as_ref().map(|a| {
            let end = end_after(a, self.cursor, want);
            (end, a.peek(self.cursor..end))
        });
        match chunk {
            Some((end, Ok(pages))) => {
                self.chunk_end = end;
                self.chunk_pages = pages.count_ones();
                self.state = SourceState::SendingRound;
                vec![SourceAction::SendPages { round: self.round, pages }]
            }
            Some((_, Err(e))) => self.fail(Failure::CoreFailed(alloc::format!("{e}"))),
            None => self.fail(Failure::CoreFailed("a dirty round without bits".into())),
        }
    }

    fn sent(&mut self, bytes: u64, elapsed_us: u64) {
        self.summary.bytes_sent = self.summary.bytes_sent.saturating_add(bytes);
        self.send_us = self.send_us.saturating_add(elapsed_us);
        self.summary.send_ms = ms_up(self.send_us);
        self.round_us = self.round_us.saturating_add(elapsed_us);
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

    /// Fail, giving back `bits` (taken, not yet absorbed) as well as everything in flight.
    fn fail_with(&mut self, bits: DirtyBitmap, failure: Failure) -> Vec<SourceAction> {
        if let Err((bits, _)) = absorb(&mut self.carry, bits) {
            let mut actions = vec![SourceAction::MergeBackDirty(bits)];
            actions.append(&mut self.fail(failure));
            return actions;
        }
        self.fail(failure)
    }

    /// The end-of-round peek: the next round is its bits and those carried.
    fn decide(&mut self, bits: DirtyBitmap) -> Vec<SourceAction> {
        if let Err(f) = self.check_bits(&bits) {
            return self.fail_with(bits, f);
        }
        if let Err((bits, e)) = absorb(&mut self.carry, bits) {
            return self.fail_with(bits, Failure::CoreFailed(alloc::format!("{e}")));
        }
        let Some(bits) = self.carry.take() else {
            return self.fail(Failure::CoreFailed("no dirty bits after a peek".into()));
        };
        let dirty = bits.count_ones();
        self.ahead = Some(bits);
        self.cursor = 0;
        self.remaining = dirty;
        self.tail = false;
        self.tail_len = 0;
        self.pending_mark = dirty;
        self.sent_since_peek = 0;
        self.full_rest = false;
        let stats = RoundStats {
            round: self.round,
            bytes_sent: self.summary.bytes_sent,
            send_ms: self.summary.send_ms,
            dirty_pages: dirty,
            dirtied_pages: self.joined.saturating_add(dirty),
            round_ms: ms_up(self.round_us),
            throttle_percent: self.throttle,
        };
        self.last = stats;
        self.round_us = 0;
        self.joined = 0;
        let mut actions = Vec::new();
        match self.policy.decide(&stats) {
            Decision::StopAndCopy { estimated_downtime_ms } => return self.stop(estimated_downtime_ms),
            Decision::Fail(e) => return self.fail(Failure::NotConverging(e)),
            Decision::Throttle { percent } => {
                self.throttle = percent;
                self.summary.max_throttle_percent = self.summary.max_throttle_percent.max(percent);
                actions.push(SourceAction::Throttle { percent });
            }
            Decision::Continue => {}
        }
        self.round += 1;
        actions.append(&mut self.send_chunk());
        actions
    }

    /// A peek in the middle of a round: bits ahead of the cursor join the round (their
    /// pages are not sent yet, so they go once), bits behind it are carried to the next
    /// round. If all that is pending now fits the target, stop and copy at once.
    fn mid_round(&mut self, bits: DirtyBitmap) -> Vec<SourceAction> {
        if let Err(f) = self.check_bits(&bits) {
            return self.fail_with(bits, f);
        }
        let mut behind = bits.clone();
        let mut front = bits;
        if let Err(e) = behind.clean(self.cursor..self.pages).and_then(|()| front.clean(0..self.cursor)) {
            return self.fail_with(behind, Failure::CoreFailed(alloc::format!("{e}")));
        }
        if let Err((front, e)) = absorb(&mut self.ahead, front) {
            // `behind` ∪ `front` is all the peek took.
            let mut actions = vec![SourceAction::MergeBackDirty(front)];
            actions.append(&mut self.fail_with(behind, Failure::CoreFailed(alloc::format!("{e}"))));
            return actions;
        }
        if let Err((behind, e)) = absorb(&mut self.carry, behind) {
            return self.fail_with(behind, Failure::CoreFailed(alloc::format!("{e}")));
        }
        self.tail = true;
        let full_copy = self.round == 0;
        let rest = if full_copy {
            self.pages.saturating_sub(self.cursor)
        } else {
            let before = self.remaining;
            self.remaining = self.ahead.as_ref().map_or(0, DirtyBitmap::count_ones);
            self.joined = self.joined.saturating_add(self.remaining.saturating_sub(before));
            self.remaining
        };
        let pending = rest.saturating_add(self.carry.as_ref().map_or(0, DirtyBitmap::count_ones));
        let stats = RoundStats {
            round: self.round,
            bytes_sent: self.summary.bytes_sent,
            send_ms: self.summary.send_ms,
            dirty_pages: pending,
            dirtied_pages: 0,
            round_ms: ms_up(self.round_us),
            throttle_percent: self.throttle,
        };
        // Only the stop is decided here; the round's other decisions wait for its end.
        if let Decision::StopAndCopy { estimated_downtime_ms } = self.policy.decide(&stats) {
            self.last = stats;
            self.full_rest = full_copy;
            return self.stop(estimated_downtime_ms);
        }
        self.tail_len =
            tail_chunk(pending, self.pending_mark, self.sent_since_peek, self.target_pages(), self.tail_pages());
        self.pending_mark = pending;
        self.sent_since_peek = 0;
        if full_copy { self.full_copy_step(self.cursor) } else { self.send_chunk() }
    }

    fn stop(&mut self, estimated_downtime_ms: u64) -> Vec<SourceAction> {
        self.summary.estimated_downtime_ms = estimated_downtime_ms;
        self.state = SourceState::Pausing;
        // Counted as paused from the request on: a failure before `Paused` still
        // resumes (resuming a running domain is a no-op for the core).
        self.paused = true;
        vec![SourceAction::Pause]
    }

    /// The final round: the rest of the round, the carried bits and the final peek's.
    fn final_round(&mut self, bits: DirtyBitmap) -> Vec<SourceAction> {
        if let Err(f) = self.check_bits(&bits) {
            return self.fail_with(bits, f);
        }
        if let Err((bits, e)) = absorb(&mut self.ahead, bits) {
            return self.fail_with(bits, Failure::CoreFailed(alloc::format!("{e}")));
        }
        if let Some(carry) = self.carry.take()
            && let Err((carry, e)) = absorb(&mut self.ahead, carry)
        {
            return self.fail_with(carry, Failure::CoreFailed(alloc::format!("{e}")));
        }
        let rest = self.cursor..self.pages;
        let all = match self.ahead.as_mut() {
            Some(all) if self.full_rest => all.set_range(rest).map(|()| all.clone()),
            Some(all) => Ok(all.clone()),
            None => return self.fail(Failure::CoreFailed("no dirty bits for the final round".into())),
        };
        match all {
            Ok(all) => {
                self.full_rest = false;
                self.round += 1;
                self.state = SourceState::FinalSend;
                vec![SourceAction::SendPages { round: self.round, pages: all }]
            }
            Err(e) => self.fail(Failure::CoreFailed(alloc::format!("{e}"))),
        }
    }

    fn fail(&mut self, failure: Failure) -> Vec<SourceAction> {
        let mut actions = Vec::new();
        let mut back = self.ahead.take();
        if let Some(carry) = self.carry.take()
            && let Err((carry, _)) = absorb(&mut back, carry)
        {
            actions.push(SourceAction::MergeBackDirty(carry));
        }
        if let Some(bits) = back
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

/// Pages of the next tail chunk after a mid-round peek that left `pending` pages (the
/// rest of the round and the carried bits), over `target` (what the downtime target
/// allows), when the peek before left `pending_mark` and `sent` pages went out since:
/// just enough for the next peek to stop and copy, at most `max` (a whole
/// [`TAIL_CHUNK_MS`]).
///
/// Each page sent takes one off the pending set, and the guest adds `grown / sent`
/// meanwhile (`grown`: what the set grew by beyond `pending_mark − sent`), so
/// `(pending − target) / (1 − grown / sent)` pages bring it to the target; a 64th and
/// 4 pages more absorb the noise (each page over costs about `grown / sent` pages). A longer chunk would send pages the final round
/// sends anyway and give the guest time to dirty again pages already sent (the stop
/// comes no sooner than the target allows); a shorter one costs another peek. The
/// stop itself is still decided on what the next peek finds.
fn tail_chunk(pending: u64, pending_mark: u64, sent: u64, target: u64, max: u64) -> u64 {
    let max = max.max(1);
    let excess = pending.saturating_sub(target);
    if sent == 0 || excess == 0 {
        return max;
    }
    let grown = pending.saturating_sub(pending_mark.saturating_sub(sent));
    if grown >= sent {
        return max;
    }
    let need = u128::from(excess) * u128::from(sent) / u128::from(sent - grown);
    let want = need.saturating_add(need / 64).saturating_add(4);
    u64::try_from(want).unwrap_or(u64::MAX).clamp(1, max)
}

/// µs in whole ms, rounded up.
const fn ms_up(us: u64) -> u64 {
    us.div_ceil(1000)
}

/// OR `bits` into `slot` (or put them there); on failure `bits` come back unmerged.
fn absorb(slot: &mut Option<DirtyBitmap>, bits: DirtyBitmap) -> Result<(), (DirtyBitmap, DirtyError)> {
    match slot {
        None => {
            *slot = Some(bits);
            Ok(())
        }
        Some(s) => s.or_merge(&bits).map_err(|e| (bits, e)),
    }
}

/// The pfn just past the `want`-th set bit of `bits` at or after `from` (the end of
/// `bits` if there are fewer).
fn end_after(bits: &DirtyBitmap, from: u64, want: u64) -> u64 {
    let pfns = bits.pfns();
    if from >= pfns.end {
        return pfns.end;
    }
    let rel = from.saturating_sub(pfns.start);
    let mut left = want.max(1);
    let mut mask = !0u64 << (rel % 64);
    for (i, &w) in (0u64..).zip(bits.words().iter().skip((rel / 64) as usize)) {
        let mut hit = w & mask;
        mask = !0;
        let ones = u64::from(hit.count_ones());
        if ones < left {
            left -= ones;
            continue;
        }
        // The `left`-th set bit of this word.
        for _ in 1..left {
            hit &= hit - 1;
        }
        let bit = u64::from(hit.trailing_zeros());
        let pfn = pfns.start + (rel / 64 + i) * 64 + bit;
        return (pfn + 1).min(pfns.end);
    }
    pfns.end
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of a `pages`-page domain through its full copy of all memory in one
    /// step, sent in `copy_ms`; returns it waiting for the end-of-round peek.
    fn copied(pages: u64, copy_ms: u64, policy: Policy) -> Source {
        let mut s = Source::with_step(policy, u64::MAX);
        let info = DomainInfo {
            name: "t".into(),
            memory_bytes: pages * PAGE_SIZE,
            vcpus: 1,
            cmdline: String::new(),
            featureset: Vec::new(),
            policy: Vec::new(),
            log_dirty_active: false,
        };
        let _ = s.on(SourceEvent::Start(info));
        let _ = s.on(SourceEvent::PolicyAccepted);
        let full = s.on(SourceEvent::LogDirtyStarted);
        assert_eq!(full, [SourceAction::SendAllPages { pfns: 0..pages }]);
        let peek = s.on(SourceEvent::PagesSent { bytes: pages * PAGE_SIZE, elapsed_us: copy_ms * 1000 });
        assert_eq!(peek, [SourceAction::PeekAndClean]);
        s
    }

    fn bits(pages: u64, set: Range<u64>) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages).unwrap_or_else(|e| unreachable!("{e}"));
        b.set_range(set).unwrap_or_else(|e| unreachable!("{e}"));
        b
    }

    fn sent_pages(actions: &[SourceAction]) -> Option<u64> {
        match actions {
            [SourceAction::SendPages { pages, .. }] => Some(pages.count_ones()),
            _ => None,
        }
    }

    /// 100000 pages copied in 10 s: 10000 pages/s, the 300 ms target is 3000 pages, a
    /// tail chunk 500. Round 1 has 5000 pages: a first chunk of 2000, then a peek.
    fn in_round_one() -> Source {
        let mut s = copied(100_000, 10_000, Policy::default());
        let first = s.on(SourceEvent::Dirty(bits(100_000, 0..5000)));
        assert_eq!(sent_pages(&first), Some(2000), "{first:?}");
        s
    }

    #[test]
    fn a_sinking_bandwidth_estimate_does_not_chase_the_target_in_tiny_chunks() {
        let mut s = in_round_one();
        // The first chunk took 300 ms instead of 200 (rounding, a slower moment): the
        // estimate sinks to 9902 pages/s, the target to 2970 pages, below the 3000 left.
        // Peek now rather than send the 30 pages over the target (and again, and again,
        // if the estimate sinks on).
        let next = s.on(SourceEvent::PagesSent { bytes: 2000 * PAGE_SIZE, elapsed_us: 300 * 1000 });
        assert_eq!(next, [SourceAction::PeekAndClean]);
        assert_eq!(s.state(), SourceState::MidPeek);
    }

    #[test]
    fn a_tail_chunk_is_just_what_the_stop_needs() {
        let mut s = in_round_one();
        let _ = s.on(SourceEvent::PagesSent { bytes: 2000 * PAGE_SIZE, elapsed_us: 300 * 1000 });
        // Nothing new dirtied: 3000 pending, 30 over the target. 30 + 1/64 + 4 = 34
        // pages, not a whole tail chunk of 495 (whose extra pages the final round
        // would send anyway, after the guest had 50 ms more to dirty sent ones).
        let chunk = s.on(SourceEvent::Dirty(DirtyBitmap::new(100_000).unwrap_or_else(|e| unreachable!("{e}"))));
        assert_eq!(sent_pages(&chunk), Some(34), "{chunk:?}");
        let peek = s.on(SourceEvent::PagesSent { bytes: 34 * PAGE_SIZE, elapsed_us: 4 * 1000 });
        assert_eq!(peek, [SourceAction::PeekAndClean]);
        let stop = s.on(SourceEvent::Dirty(DirtyBitmap::new(100_000).unwrap_or_else(|e| unreachable!("{e}"))));
        assert_eq!(stop, [SourceAction::Pause]);
    }

    #[test]
    fn the_round_counts_the_pages_it_took_in_as_dirtied() {
        // A 10 ms target: 100 pages at 10000 pages/s, a tail chunk 500. Round 1 has
        // 5000 pages: a first chunk of 4900, then a peek.
        let mut s = copied(100_000, 10_000, Policy { downtime_target_ms: 10, ..Policy::default() });
        let first = s.on(SourceEvent::Dirty(bits(100_000, 0..5000)));
        assert_eq!(sent_pages(&first), Some(4900), "{first:?}");
        let peek = s.on(SourceEvent::PagesSent { bytes: 4900 * PAGE_SIZE, elapsed_us: 490 * 1000 });
        assert_eq!(peek, [SourceAction::PeekAndClean]);
        // 400 new pages ahead of the cursor join the round, 1000 behind it are carried.
        let mut mid = bits(100_000, 10_000..10_400);
        mid.set_range(0..1000).unwrap_or_else(|e| unreachable!("{e}"));
        let mut actions = s.on(SourceEvent::Dirty(mid));
        let mut sent = 0;
        while s.state() != SourceState::Peeking {
            actions = match (actions.as_slice(), s.state()) {
                ([SourceAction::SendPages { pages, .. }], _) => {
                    let n = pages.count_ones();
                    sent += n;
                    s.on(SourceEvent::PagesSent { bytes: n * PAGE_SIZE, elapsed_us: (n / 10) * 1000 })
                }
                ([SourceAction::PeekAndClean], SourceState::MidPeek) => {
                    s.on(SourceEvent::Dirty(DirtyBitmap::new(100_000).unwrap_or_else(|e| unreachable!("{e}"))))
                }
                (other, state) => unreachable!("{other:?} in {state:?}"),
            };
        }
        assert_eq!(sent, 500);
        // The end-of-round peek: 10 more. Left dirty: 1010; dirtied in the round: 1410.
        let _ = s.on(SourceEvent::Dirty(bits(100_000, 2000..2010)));
        let last = s.last_round();
        assert_eq!((last.round, last.dirty_pages, last.dirtied_pages), (1, 1010, 1410));
    }

    #[test]
    fn send_times_are_summed_in_us_then_rounded() {
        // 1.5 µs a page, a 1 ms target: steps of 1000 pages, then what the stop needs,
        // up to the pause. The source sums the µs and rounds up once; per-send whole ms
        // would count 2 ms for each 1.5 ms step and sink the bandwidth estimate.
        let mut s = Source::with_step(Policy { downtime_target_ms: 1, ..Policy::default() }, 1000);
        let info = DomainInfo {
            name: "t".into(),
            memory_bytes: 3000 * PAGE_SIZE,
            vcpus: 1,
            cmdline: String::new(),
            featureset: Vec::new(),
            policy: Vec::new(),
            log_dirty_active: true,
        };
        let _ = s.on(SourceEvent::Start(info));
        let mut actions = s.on(SourceEvent::PolicyAccepted);
        let (mut steps, mut us, mut per_send_ms) = (Vec::new(), 0, 0);
        loop {
            actions = match actions.as_slice() {
                [SourceAction::SendAllPages { pfns }] => {
                    steps.push(pfns.clone());
                    let pages = pfns.end - pfns.start;
                    let elapsed_us = (pages * 3).div_ceil(2);
                    us += elapsed_us;
                    per_send_ms += elapsed_us.div_ceil(1000);
                    s.on(SourceEvent::PagesSent { bytes: pages * PAGE_SIZE, elapsed_us })
                }
                [SourceAction::PeekAndClean] => {
                    s.on(SourceEvent::Dirty(DirtyBitmap::new(3000).unwrap_or_else(|e| unreachable!("{e}"))))
                }
                [SourceAction::Pause] => break,
                other => unreachable!("{other:?}"),
            };
        }
        assert_eq!(steps, [0..1000, 1000..2000, 2000..2343, 2343..2420]);
        assert_eq!((us, per_send_ms), (3631, 6));
        assert_eq!((s.summary().send_ms, s.last_round().send_ms, s.last_round().round_ms), (4, 4, 4));
    }

    #[test]
    fn tail_chunk_sizes() {
        // Nothing grew: the excess plus a 64th and 4.
        assert_eq!(tail_chunk(3000, 5000, 2000, 2970, 495), 34);
        // Half of what was sent came back: twice the excess is needed.
        assert_eq!(tail_chunk(9500, 10_000, 1000, 9000, 5000), 1019);
        // Capped at a whole tail chunk; growing as fast as it is sent, or no measure yet:
        // a whole tail chunk.
        assert_eq!(tail_chunk(20_000, 20_000, 1000, 9000, 5000), 5000);
        assert_eq!(tail_chunk(10_000, 10_000, 1000, 9000, 5000), 5000);
        assert_eq!(tail_chunk(10_000, 10_000, 0, 9000, 5000), 5000);
        // Nothing over the target, or a zero cap: still at least one page.
        assert_eq!(tail_chunk(100, 1000, 900, 9000, 0), 1);
        assert_eq!(tail_chunk(u64::MAX, u64::MAX, u64::MAX, 0, u64::MAX), u64::MAX);
        assert_eq!(tail_chunk(u64::MAX, 0, 1, 0, 7), 7);
    }

    #[test]
    fn end_after_counts_set_bits_from_the_cursor() {
        let mut b = DirtyBitmap::new(200).unwrap_or_else(|e| unreachable!("{e}"));
        for pfn in [3, 64, 65, 130, 199] {
            let _ = b.set(pfn);
        }
        assert_eq!(end_after(&b, 0, 1), 4);
        assert_eq!(end_after(&b, 0, 2), 65);
        assert_eq!(end_after(&b, 4, 2), 66);
        assert_eq!(end_after(&b, 65, 2), 131);
        assert_eq!(end_after(&b, 66, 9), 200);
        assert_eq!(end_after(&b, 200, 1), 200);
    }
}
