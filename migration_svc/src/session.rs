//! Migration sessions: the [`Source`] and [`Destination`] state machines driven by the
//! relay's requests (`MigrateRead`, `MigrateWrite`, …) and executed through the core's
//! [`MigrationCore`] operations.
//!
//! The source produces its stream lazily: `SendAllPages`/`SendPages` become a job that
//! reads and encodes pages only as the relay asks for bytes, so memory stays bounded (at
//! most one read's worth plus one page batch) and the measured bandwidth is the relay's.
//! A job's `PagesSent` is reported when its last byte has been handed out.
//!
//! A session whose relay goes quiet for [`RELAY_TIMEOUT_NS`] fails: the source domain
//! resumes with its dirty bits given back, the partial destination domain is discarded.
//! Nothing waits forever.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use wire::dirty::DirtyBitmap;
use wire::migration::{
    ConsoleRing, DeviceStates, GuestClock, MemoryDigest, Record, RecordError, StreamEnd, StreamHeader, VcpuFpu,
    VcpuMsrs, VcpuState,
};
use wire::{MigrateOptions, MigrateProgress, MigrateReport, PeerVerdict, ReceiveState, ReceiveStatus, SendState};

use crate::convergence::{PAGE_SIZE, Policy};
use crate::dest::{DestAction, DestError, Destination, StateRecord};
use crate::send::{PageBatcher, encode_dirty_round};
use crate::source::{DomainInfo, Failure, Outcome, Source, SourceAction, SourceEvent, SourceState};

/// A session with no request from its relay for this long fails (10 s), counted from
/// when the session last answered (a request that took long itself, such as the source's
/// memory digest, does not eat into it).
pub const RELAY_TIMEOUT_NS: u64 = 10_000_000_000;

/// What the source adds to [`RELAY_TIMEOUT_NS`] per guest page while it waits for the
/// acknowledgement of a `verify_memory` migration: the destination digests all of its
/// memory before it answers, which takes seconds for 1 GiB under emulation (more on a
/// busy host); 100 µs a page allows 26 s for 1 GiB.
pub const VERIFY_NS_PER_PAGE: u64 = 100_000;

/// Pages a job encodes per step: one page-batch record, so the session's output
/// buffer holds at most one record beyond what the relay asked for.
const PAGES_PER_STEP: u64 = crate::send::SEND_BATCH_PAGES as u64;

/// Pages the source digests per read of a `verify_memory` migration's end (16 MiB): a
/// read answers within a fraction of a second even under emulation.
const DIGEST_PAGES_PER_STEP: u64 = 4096;

/// The destination's CPUID policy check: `Ok(())` if this host can run the policy
/// (its postcard bytes), `Err(reason)` otherwise.
pub type PolicyCheck = Box<dyn FnMut(&[u8]) -> Result<(), String> + Send>;

/// The paused domain's state beyond its memory and basic registers (stream version
/// 2), read by the core for the source right after [`MigrationCore::vcpu_states`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// The guest's clocks at pause.
    pub clock: GuestClock,
    /// One FPU/XSAVE area per vCPU, in index order.
    pub fpus: Vec<VcpuFpu>,
    /// One MSR list per vCPU, in index order.
    pub msrs: Vec<VcpuMsrs>,
    /// Every device model's state.
    pub devices: DeviceStates,
    /// The console ring, if the core keeps one.
    pub console: Option<ConsoleRing>,
}

impl MachineState {
    /// Its records in stream order, the vCPU `states` (blobs from
    /// [`MigrationCore::vcpu_states`]) interleaved: clock; per vCPU its state, FPU
    /// area and MSRs; devices; console. Refused when the per-vCPU lists do not have
    /// one entry per vCPU in index order.
    pub fn records(self, states: Vec<Vec<u8>>) -> Result<Vec<Record>, String> {
        let n = states.len();
        if self.fpus.len() != n || self.msrs.len() != n {
            return Err(alloc::format!(
                "the core gave {n} vCPU states but {} FPU states and {} MSR lists",
                self.fpus.len(),
                self.msrs.len()
            ));
        }
        let mut out = Vec::new();
        out.try_reserve(3 + 3 * n).map_err(|_| String::from("out of memory for the machine-state records"))?;
        out.push(Record::GuestClock(self.clock));
        for ((index, registers), (fpu, msrs)) in (0u32..).zip(states).zip(self.fpus.into_iter().zip(self.msrs)) {
            if fpu.index != index || msrs.index != index {
                return Err(alloc::format!(
                    "the core's machine state for vCPU {index} is vCPU {}'s FPU and vCPU {}'s MSRs",
                    fpu.index,
                    msrs.index
                ));
            }
            out.push(Record::VcpuState(VcpuState { index, registers }));
            out.push(Record::VcpuFpu(fpu));
            out.push(Record::VcpuMsrs(msrs));
        }
        out.push(Record::DeviceStates(self.devices));
        if let Some(console) = self.console {
            out.push(Record::ConsoleRing(console));
        }
        Ok(out)
    }
}

/// What the service asks of the core. Every operation names its domain; errors are
/// human sentences that end up in the migration's failure message.
pub trait MigrationCore {
    /// Monotonic time in ns (`None` if the clock is not calibrated).
    fn now_ns(&self) -> Option<u64>;
    /// What the source needs to know about `domain`.
    fn domain_info(&mut self, domain: u32) -> Result<DomainInfo, String>;
    /// Start log-dirty over all of `domain`'s memory.
    fn start_log_dirty(&mut self, domain: u32) -> Result<(), String>;
    /// Stop log-dirty.
    fn stop_log_dirty(&mut self, domain: u32) -> Result<(), String>;
    /// Drain PML, take and clean the log-dirty bits of all memory (pfns `0..pages`).
    fn peek_and_clean(&mut self, domain: u32) -> Result<DirtyBitmap, String>;
    /// OR `bits` back into the log-dirty bitmap.
    fn merge_back(&mut self, domain: u32, bits: &DirtyBitmap) -> Result<(), String>;
    /// Copy page `pfn` of `domain` into `out`.
    fn read_page(&mut self, domain: u32, pfn: u64, out: &mut [u8]) -> Result<(), String>;
    /// Pause or unpause.
    fn set_paused(&mut self, domain: u32, paused: bool) -> Result<(), String>;
    /// Take `percent` of the vCPUs' time away (0 = off).
    fn throttle(&mut self, domain: u32, percent: u8) -> Result<(), String>;
    /// The encoded state of every vCPU of the paused domain, in index order.
    fn vcpu_states(&mut self, domain: u32) -> Result<Vec<Vec<u8>>, String>;
    /// The rest of the paused domain's state: clock, FPU areas, MSRs, devices, console.
    fn machine_state(&mut self, domain: u32) -> Result<MachineState, String>;
    /// The digest of all of `domain`'s memory ([`MemoryDigest`]).
    fn memory_digest(&mut self, domain: u32) -> Result<MemoryDigest, String>;
    /// Destroy `domain` (the source after completion; a discarded destination).
    fn destroy(&mut self, domain: u32) -> Result<(), String>;
    /// The policy check of this host, for a receiving session.
    fn policy_check(&mut self) -> PolicyCheck;
    /// Create an empty, paused domain as `header` describes; its id.
    fn create_domain(&mut self, header: &StreamHeader) -> Result<u32, String>;
    /// Install the (accepted) CPUID policy.
    fn set_policy(&mut self, domain: u32, policy: &[u8]) -> Result<(), String>;
    /// Write page `pfn`: `None` = all zeros.
    fn write_page(&mut self, domain: u32, pfn: u64, data: Option<&[u8]>) -> Result<(), String>;
    /// Load vCPU `index`'s state.
    fn set_vcpu_state(&mut self, domain: u32, index: u32, state: &[u8]) -> Result<(), String>;
    /// Load one machine-state record into the incoming domain (records come in stream
    /// order: the clock first). An error discards the domain and refuses the migration
    /// with it, so it must say what cannot be restored and why.
    fn load_machine_state(&mut self, domain: u32, record: &StateRecord) -> Result<(), String>;
}

/// Work the source hands out as the relay reads.
#[derive(Debug)]
enum Job {
    /// Pages `next..end`, then `PagesSent`.
    Range { next: u64, end: u64 },
    /// The set pages of `bits` from `next` on, then `PagesSent`.
    Bits { bits: DirtyBitmap, next: u64 },
    /// Nothing more to encode; `VcpuStateSent` once drained.
    Vcpus,
    /// The source's memory digest of a `verify_memory` migration, pages `next..` on,
    /// then the `MemoryDigest` and `End` records. Stepped like the others, a bounded
    /// number of pages per read, so digesting 1 GiB (seconds under emulation) neither
    /// holds one relay request past its timeout nor stops the hypervisor's other work;
    /// no source event follows it (the source already waits for the acknowledgement).
    Digest { next: u64, digest: MemoryDigest, end: StreamEnd },
}

/// What the relay is to bring next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    Nothing,
    PolicyVerdict,
    Ack,
}

/// A sending migration.
pub struct SendSession {
    id: u32,
    domain: u32,
    options: MigrateOptions,
    source: Source,
    pages: u64,
    out: Vec<u8>,
    out_at: usize,
    job: Option<Job>,
    job_bytes: u64,
    job_start_ns: u64,
    /// Time this job spent reading pages that went out as zero pages: taken out of the
    /// job's elapsed time, because the source's bandwidth estimate is for the pages
    /// that are left to send, and dirtied pages are data pages. Without this, a full
    /// copy of a large, mostly empty guest (1 GiB: 2 MB of zero-page entries, seconds
    /// of scanning under emulation) looks like a 0.7 MB/s link, and nothing converges.
    zero_scan_ns: u64,
    /// The job encoded its last page; its event fires once `out` is drained.
    job_done: bool,
    batcher: PageBatcher,
    awaiting: Awaiting,
    handed_out: u64,
    started_ns: u64,
    last_request_ns: u64,
    paused_ns: Option<u64>,
    state: SendState,
    failure: Option<String>,
    report: Option<MigrateReport>,
    /// Clean-up steps that failed (named in the failure message, never swallowed).
    cleanup_errors: Vec<String>,
    page_buf: Vec<u8>,
    digest: Option<u64>,
    /// Bandwidth-cap tokens (bytes) and when they were last topped up.
    bucket: u64,
    bucket_ns: u64,
}

impl core::fmt::Debug for SendSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendSession")
            .field("id", &self.id)
            .field("domain", &self.domain)
            .field("state", &self.state)
            .field("source", &self.source.state())
            .finish_non_exhaustive()
    }
}

impl SendSession {
    /// Start sending `domain`: header and policy are encoded at once.
    pub fn start(id: u32, domain: u32, options: MigrateOptions, core: &mut dyn MigrationCore) -> Self {
        let now = core.now_ns().unwrap_or(0);
        let bucket = options_bucket(&options);
        let policy = Policy {
            downtime_target_ms: options.downtime_ms,
            max_rounds: options.max_rounds,
            throttle: options.throttle,
        };
        let mut s = Self {
            id,
            domain,
            options,
            source: Source::new(policy),
            pages: 0,
            out: Vec::new(),
            out_at: 0,
            job: None,
            job_bytes: 0,
            job_start_ns: now,
            zero_scan_ns: 0,
            job_done: false,
            batcher: PageBatcher::new(),
            awaiting: Awaiting::Nothing,
            handed_out: 0,
            started_ns: now,
            last_request_ns: now,
            paused_ns: None,
            state: SendState::AwaitPolicyVerdict,
            failure: None,
            report: None,
            cleanup_errors: Vec::new(),
            page_buf: alloc::vec![0; PAGE_SIZE as usize],
            digest: None,
            bucket,
            bucket_ns: now,
        };
        let event = match core.domain_info(domain) {
            Ok(info) => {
                s.pages = info.memory_bytes / PAGE_SIZE;
                SourceEvent::Start(info)
            }
            Err(e) => SourceEvent::Abort(Failure::BadDomain(e)),
        };
        s.feed(core, event);
        s
    }

    /// The session id.
    pub const fn id(&self) -> u32 {
        self.id
    }

    /// The domain being sent.
    pub const fn domain(&self) -> u32 {
        self.domain
    }

    /// Whether it is over.
    pub const fn is_over(&self) -> bool {
        self.state.is_over()
    }

    /// Hand out at most `max` stream bytes.
    pub fn read(&mut self, core: &mut dyn MigrationCore, max: usize) -> Vec<u8> {
        let now = core.now_ns().unwrap_or(0);
        self.last_request_ns = now;
        let max = max.min(self.bandwidth_allowance(now));
        let taken = self.read_at_most(core, max);
        // The quiet time starts when this answer goes out.
        self.last_request_ns = core.now_ns().unwrap_or(now).max(now);
        taken
    }

    /// [`Self::read`]'s work: encode and hand out at most `max` bytes.
    fn read_at_most(&mut self, core: &mut dyn MigrationCore, max: usize) -> Vec<u8> {
        let mut taken = Vec::new();
        while taken.len() < max && !self.is_over() {
            let want = max - taken.len();
            if self.buffered() < want
                && let Some(job) = self.job.take()
            {
                let digesting = matches!(job, Job::Digest { .. });
                match self.step(core, job) {
                    Ok(next) => self.job = next,
                    Err(f) => {
                        self.feed(core, SourceEvent::Abort(f));
                        break;
                    }
                }
                // One digest step per read: the answer goes out, the relay asks again.
                if digesting && self.job.is_some() {
                    break;
                }
                continue;
            }
            let n = want.min(self.buffered());
            let end = self.out_at + n;
            taken.extend_from_slice(self.out.get(self.out_at..end).unwrap_or_default());
            self.out_at = end;
            if self.buffered() == 0 {
                self.out.clear();
                self.out_at = 0;
                if !self.job_finished(core) {
                    break;
                }
            }
        }
        // Drop what was handed out: records rarely end where a read does, so without
        // this `out` would never be empty and would grow with the whole stream.
        self.out.drain(..self.out_at);
        self.out_at = 0;
        self.handed_out += taken.len() as u64;
        self.bucket = self.bucket.saturating_sub(taken.len() as u64);
        taken
    }

    /// The relay brings the destination's verdict.
    pub fn verdict(&mut self, core: &mut dyn MigrationCore, verdict: PeerVerdict) -> Result<(), String> {
        self.last_request_ns = core.now_ns().unwrap_or(0);
        let event = match (self.awaiting, verdict) {
            (_, PeerVerdict::Refused(r)) => SourceEvent::Abort(Failure::PeerRefused(r)),
            (Awaiting::Ack, PeerVerdict::Failed(r)) => {
                self.strand(&alloc::format!("the relay failed before the destination confirmed: {r}"));
                return Ok(());
            }
            (_, PeerVerdict::Failed(r)) => SourceEvent::Abort(Failure::ConnectionBroken(r)),
            (Awaiting::PolicyVerdict, PeerVerdict::PolicyAccepted) => SourceEvent::PolicyAccepted,
            (Awaiting::Ack, PeerVerdict::Acked) if self.buffered() == 0 => SourceEvent::Acked,
            (awaiting, v) => {
                return Err(alloc::format!(
                    "verdict {v:?} does not answer this migration now (it awaits {})",
                    match awaiting {
                        Awaiting::Nothing => "no verdict",
                        Awaiting::PolicyVerdict => "the policy verdict",
                        Awaiting::Ack => "the acknowledgement",
                    }
                ));
            }
        };
        self.awaiting = Awaiting::Nothing;
        self.feed(core, event);
        Ok(())
    }

    /// Cancel: the domain runs on with its dirty bits (unless everything was sent and
    /// the destination may already run it: see [`Self::strand`]).
    pub fn cancel(&mut self, core: &mut dyn MigrationCore) {
        if self.awaiting == Awaiting::Ack {
            self.strand("migration cancelled after the whole domain was sent");
            return;
        }
        self.feed(core, SourceEvent::Abort(Failure::Cancelled));
    }

    /// Give up while waiting for the destination's acknowledgement, without resuming:
    /// the destination has everything and may be running the domain already, and two
    /// running copies would be worse than a paused one. The operator decides.
    fn strand(&mut self, why: &str) {
        self.job = None;
        self.awaiting = Awaiting::Nothing;
        self.state = SendState::Failed;
        self.failure = Some(alloc::format!(
            "{why}; domain {d} stays paused here because the destination may already run it: if it does, destroy \
             this copy (hvctl domain destroy {d}), otherwise unpause it (hvctl domain unpause {d})",
            d = self.domain
        ));
    }

    /// Fail if the relay went quiet for too long.
    pub fn tick(&mut self, core: &mut dyn MigrationCore) {
        let Some(now) = core.now_ns() else { return };
        let quiet = now.saturating_sub(self.last_request_ns);
        if self.awaiting == Awaiting::Ack && !self.is_over() {
            let limit = self.ack_timeout_ns();
            if quiet > limit {
                self.strand(&alloc::format!(
                    "no acknowledgement from the relay within {} s",
                    limit.div_ceil(1_000_000_000)
                ));
            }
            return;
        }
        if !self.is_over() && quiet > RELAY_TIMEOUT_NS {
            self.feed(
                core,
                SourceEvent::Abort(Failure::ConnectionBroken(alloc::format!(
                    "no request from the relay for {} s",
                    RELAY_TIMEOUT_NS / 1_000_000_000
                ))),
            );
        }
    }

    /// How long the source waits for the acknowledgement after the end of the stream:
    /// [`RELAY_TIMEOUT_NS`], plus [`VERIFY_NS_PER_PAGE`] per page when the destination
    /// digests its memory first.
    fn ack_timeout_ns(&self) -> u64 {
        let verify = if self.options.verify_memory { self.pages.saturating_mul(VERIFY_NS_PER_PAGE) } else { 0 };
        RELAY_TIMEOUT_NS.saturating_add(verify)
    }

    /// The state now.
    pub fn progress(&self) -> MigrateProgress {
        let s = self.source.summary();
        let last = self.source.last_round();
        MigrateProgress {
            session: self.id,
            domain: self.domain,
            state: Some(self.state),
            round: last.round,
            pages_total: self.pages,
            pages_sent: s.pages_sent,
            bytes_sent: self.handed_out,
            dirty_pages: last.dirty_pages,
            dirty_pages_per_sec: last.dirty_pages_per_sec(),
            bandwidth_bytes_per_sec: last.bandwidth_bytes_per_sec(),
            estimated_downtime_ms: last.estimated_downtime_ms(),
            throttle_percent: last.throttle_percent,
            failure: self.failure.clone(),
            report: self.report.clone(),
        }
    }

    fn buffered(&self) -> usize {
        self.out.len() - self.out_at
    }

    /// The bytes the bandwidth cap allows now: a token bucket filled at the cap's rate
    /// and holding at most 100 ms of it (at least 64 KiB), so a pause of the relay is
    /// not made up for by a burst above the cap. It starts with 64 KiB: the header and
    /// the policy go out at once.
    fn bandwidth_allowance(&mut self, now: u64) -> usize {
        match self.options.bandwidth_bytes_per_sec {
            None | Some(0) => usize::MAX,
            Some(rate) => {
                let cap = (rate / 10).max(64 * 1024);
                let elapsed = u128::from(now.saturating_sub(self.bucket_ns));
                let earned = u64::try_from(elapsed * u128::from(rate) / 1_000_000_000).unwrap_or(u64::MAX);
                self.bucket = self.bucket.saturating_add(earned).min(cap);
                self.bucket_ns = now;
                usize::try_from(self.bucket).unwrap_or(usize::MAX)
            }
        }
    }

    /// Encode the next step of `job` into `out`; the job if not finished.
    fn step(&mut self, core: &mut dyn MigrationCore, job: Job) -> Result<Option<Job>, Failure> {
        let before = self.out.len();
        let next = match job {
            Job::Range { next, end } => {
                let stop = next.saturating_add(PAGES_PER_STEP).min(end);
                for pfn in next..stop {
                    self.push_page(core, pfn)?;
                }
                if stop < end { Some(Job::Range { next: stop, end }) } else { None }
            }
            Job::Bits { bits, next } => {
                let mut cursor = next;
                let mut taken = 0;
                while taken < PAGES_PER_STEP {
                    let Some(pfn) = next_set(&bits, cursor) else {
                        cursor = bits.pfns().end;
                        break;
                    };
                    self.push_page(core, pfn)?;
                    cursor = pfn + 1;
                    taken += 1;
                }
                if cursor < bits.pfns().end { Some(Job::Bits { bits, next: cursor }) } else { None }
            }
            Job::Vcpus => None,
            Job::Digest { next, mut digest, end } => {
                let stop = next.saturating_add(DIGEST_PAGES_PER_STEP).min(self.pages);
                for pfn in next..stop {
                    core.read_page(self.domain, pfn, &mut self.page_buf).map_err(Failure::CoreFailed)?;
                    digest.add_page(&self.page_buf);
                }
                if stop < self.pages {
                    return Ok(Some(Job::Digest { next: stop, digest, end }));
                }
                self.digest = Some(digest.digest);
                Record::MemoryDigest(digest).encode(&mut self.out).map_err(record_failure)?;
                Record::End(end).encode(&mut self.out).map_err(record_failure)?;
                return Ok(None);
            }
        };
        // An unfinished job stays; a finished one reports once its bytes are out.
        if next.is_none() {
            self.batcher.flush(&mut self.out).map_err(record_failure)?;
            self.job_done = true;
        }
        self.job_bytes += (self.out.len() - before) as u64;
        Ok(next)
    }

    fn push_page(&mut self, core: &mut dyn MigrationCore, pfn: u64) -> Result<(), Failure> {
        let start = core.now_ns();
        let zeros = self.batcher.zero_pages();
        core.read_page(self.domain, pfn, &mut self.page_buf).map_err(Failure::CoreFailed)?;
        self.batcher.push(pfn, &self.page_buf, &mut self.out).map_err(record_failure)?;
        if self.batcher.zero_pages() > zeros
            && let (Some(start), Some(end)) = (start, core.now_ns())
        {
            self.zero_scan_ns += end.saturating_sub(start);
        }
        Ok(())
    }
}

impl SendSession {
    /// `out` is drained: if the job behind it is done, report it to the source and run
    /// what follows. Returns whether more bytes may now be produced at once.
    fn job_finished(&mut self, core: &mut dyn MigrationCore) -> bool {
        // A finished job is no longer in `self.job`.
        if !self.job_done {
            return self.job.is_some();
        }
        self.job_done = false;
        let now = core.now_ns().unwrap_or(0);
        let scanning = core::mem::take(&mut self.zero_scan_ns);
        let elapsed_us = now.saturating_sub(self.job_start_ns).saturating_sub(scanning).div_ceil(1000);
        let bytes = core::mem::take(&mut self.job_bytes);
        let event = match self.source.state() {
            SourceState::SendingVcpus => SourceEvent::VcpuStateSent { bytes, elapsed_us },
            _ => SourceEvent::PagesSent { bytes, elapsed_us },
        };
        self.feed(core, event);
        self.job.is_some() || self.buffered() > 0
    }

    fn begin_job(&mut self, core: &dyn MigrationCore, job: Job) {
        self.job_start_ns = core.now_ns().unwrap_or(0);
        self.zero_scan_ns = 0;
        self.job_done = false;
        self.job = Some(job);
    }

    /// Feed `event` to the source and execute the actions, feeding the answers of the
    /// synchronous ones back in, until the source waits for the relay or a job.
    fn feed(&mut self, core: &mut dyn MigrationCore, event: SourceEvent) {
        let mut queue: VecDeque<SourceAction> = self.source.on(event).into();
        while let Some(action) = queue.pop_front() {
            if let Some(answer) = self.execute(core, action) {
                queue.extend(self.source.on(answer));
            }
        }
    }

    fn encode(&mut self, record: Record) -> Option<SourceEvent> {
        let before = self.out.len();
        match record.encode(&mut self.out) {
            Ok(()) => {
                self.job_bytes += (self.out.len() - before) as u64;
                None
            }
            Err(e) => Some(SourceEvent::Abort(record_failure(e))),
        }
    }

    /// Execute one action; the event that answers it, if it is answered at once.
    fn execute(&mut self, core: &mut dyn MigrationCore, action: SourceAction) -> Option<SourceEvent> {
        let d = self.domain;
        let core_failed = |e: String| Some(SourceEvent::Abort(Failure::CoreFailed(e)));
        match action {
            SourceAction::SendHeader(h) => self.encode(Record::Header(h)),
            SourceAction::SendPolicy(p) => self.encode(Record::CpuidPolicy(p)),
            SourceAction::WaitPolicyAck => {
                self.awaiting = Awaiting::PolicyVerdict;
                None
            }
            SourceAction::StartLogDirty => match core.start_log_dirty(d) {
                Ok(()) => Some(SourceEvent::LogDirtyStarted),
                Err(e) => core_failed(e),
            },
            SourceAction::SendAllPages { pfns } => {
                self.state = SendState::Precopy;
                self.begin_job(core, Job::Range { next: pfns.start, end: pfns.end });
                None
            }
            SourceAction::PeekAndClean => match core.peek_and_clean(d) {
                Ok(bits) => Some(SourceEvent::Dirty(bits)),
                Err(e) => core_failed(e),
            },
            SourceAction::Throttle { percent } => match core.throttle(d, percent) {
                Ok(()) => None,
                // Throttling down is part of a clean-up: note it, carry on.
                Err(e) if percent == 0 => {
                    self.cleanup_errors.push(alloc::format!("unthrottle: {e}"));
                    None
                }
                Err(e) => core_failed(e),
            },
            SourceAction::SendPages { round, pages } => {
                self.job_start_ns = core.now_ns().unwrap_or(0);
                self.zero_scan_ns = 0;
                self.job_done = false;
                let before = self.out.len();
                if let Err(e) = encode_dirty_round(round, &pages, &mut self.out) {
                    self.job = None;
                    return Some(SourceEvent::Abort(record_failure(e)));
                }
                self.job_bytes += (self.out.len() - before) as u64;
                let start = pages.pfns().start;
                self.job = Some(Job::Bits { bits: pages, next: start });
                None
            }
            SourceAction::Pause => match core.set_paused(d, true) {
                Ok(()) => {
                    self.state = SendState::StopAndCopy;
                    self.paused_ns = core.now_ns();
                    Some(SourceEvent::Paused)
                }
                Err(e) => core_failed(e),
            },
            SourceAction::SendVcpuState => {
                self.begin_job(core, Job::Vcpus);
                let records = core.vcpu_states(d).and_then(|states| core.machine_state(d)?.records(states));
                let records = match records {
                    Ok(records) => records,
                    Err(e) => {
                        self.job = None;
                        return core_failed(e);
                    }
                };
                for record in records {
                    if let Some(abort) = self.encode(record) {
                        self.job = None;
                        return Some(abort);
                    }
                }
                None
            }
            SourceAction::SendEnd(end) => {
                if self.options.verify_memory {
                    // Digested a step per read (Job::Digest), then MemoryDigest and End.
                    self.job = Some(Job::Digest { next: 0, digest: MemoryDigest::new(), end });
                    return None;
                }
                self.encode(Record::End(end))
            }
            SourceAction::WaitAck => {
                self.state = SendState::AwaitAck;
                self.awaiting = Awaiting::Ack;
                None
            }
            SourceAction::MergeBackDirty(bits) => {
                if let Err(e) = core.merge_back(d, &bits) {
                    self.cleanup_errors.push(alloc::format!("merge back {} dirty pages: {e}", bits.count_ones()));
                }
                None
            }
            SourceAction::Resume => {
                if let Err(e) = core.set_paused(d, false) {
                    self.cleanup_errors.push(alloc::format!("resume: {e}"));
                }
                None
            }
            SourceAction::StopLogDirty => {
                if let Err(e) = core.stop_log_dirty(d) {
                    self.cleanup_errors.push(alloc::format!("stop log-dirty: {e}"));
                }
                None
            }
            SourceAction::Done(outcome) => {
                self.finish(core, outcome);
                None
            }
        }
    }

    fn finish(&mut self, core: &mut dyn MigrationCore, outcome: Outcome) {
        let now = core.now_ns().unwrap_or(0);
        self.job = None;
        self.awaiting = Awaiting::Nothing;
        // A finished session is kept for its status only: give its buffers back.
        self.out = Vec::new();
        self.out_at = 0;
        self.page_buf = Vec::new();
        self.batcher = PageBatcher::new();
        match outcome {
            Outcome::Completed(summary) => {
                let mut report = MigrateReport {
                    rounds: summary.rounds,
                    pages_sent: summary.pages_sent,
                    pages_resent: summary.pages_sent.saturating_sub(self.pages),
                    bytes_sent: self.handed_out,
                    duration_ms: now.saturating_sub(self.started_ns) / 1_000_000,
                    downtime_ms: self.paused_ns.map_or(0, |p| now.saturating_sub(p).div_ceil(1_000_000)),
                    estimated_downtime_ms: summary.estimated_downtime_ms,
                    max_throttle_percent: summary.max_throttle_percent,
                    memory_digest: self.digest,
                };
                // The destination runs the domain now; the source copy must go.
                if let Err(e) = core.destroy(self.domain) {
                    self.cleanup_errors.push(alloc::format!("destroy the source domain: {e}"));
                }
                report.bytes_sent = self.handed_out;
                self.report = Some(report);
                self.state = SendState::Completed;
                if !self.cleanup_errors.is_empty() {
                    self.failure = Some(alloc::format!("completed, but: {}", self.cleanup_errors.join("; ")));
                }
            }
            Outcome::Failed(failure) => {
                let mut message = failure.to_string();
                if !self.cleanup_errors.is_empty() {
                    message.push_str(" (and clean-up failed: ");
                    message.push_str(&self.cleanup_errors.join("; "));
                    message.push(')');
                }
                self.failure = Some(message);
                self.state = SendState::Failed;
            }
        }
    }
}

/// What a relay tells the source after the destination answered with `status`: the
/// rule every relay follows (hvctl, local migration). A discarded domain or a refused
/// policy is the destination's own verdict (`Refused`: the source resumes, even after
/// everything was sent); `PolicyAccepted` once (`policy_told` remembers it); `Acked`
/// when complete; otherwise nothing yet.
pub fn verdict_for(status: &ReceiveStatus, policy_told: &mut bool) -> Option<PeerVerdict> {
    match (&status.state, &status.policy) {
        (ReceiveState::Discarded, _) => {
            Some(PeerVerdict::Refused(status.error.clone().unwrap_or_else(|| "no reason given".into())))
        }
        (_, Some(Err(reason))) => Some(PeerVerdict::Refused(reason.clone())),
        (ReceiveState::Complete, _) => Some(PeerVerdict::Acked),
        (_, Some(Ok(()))) if !*policy_told => {
            *policy_told = true;
            Some(PeerVerdict::PolicyAccepted)
        }
        _ => None,
    }
}

/// The bandwidth bucket a session starts with: 64 KiB, enough for the header and the
/// policy at once (see `SendSession::bandwidth_allowance`).
fn options_bucket(options: &MigrateOptions) -> u64 {
    options.bandwidth_bytes_per_sec.map_or(0, |_| 64 * 1024)
}

/// The first set pfn of `bits` at or after `from`.
fn next_set(bits: &DirtyBitmap, from: u64) -> Option<u64> {
    let pfns = bits.pfns();
    if from >= pfns.end {
        return None;
    }
    let rel = from.saturating_sub(pfns.start);
    let mut word_index = (rel / 64) as usize;
    let mut mask = !0u64 << (rel % 64);
    let words = bits.words();
    while let Some(&w) = words.get(word_index) {
        let hit = w & mask;
        if hit != 0 {
            let pfn = pfns.start + word_index as u64 * 64 + u64::from(hit.trailing_zeros());
            return (pfn < pfns.end).then_some(pfn);
        }
        word_index += 1;
        mask = !0;
    }
    None
}

fn record_failure(e: RecordError) -> Failure {
    Failure::CoreFailed(alloc::format!("cannot encode a stream record: {e}"))
}

/// A receiving migration.
pub struct ReceiveSession {
    id: u32,
    dest: Destination<PolicyCheck>,
    domain: Option<u32>,
    policy: Option<Result<(), String>>,
    bytes: u64,
    last_request_ns: u64,
    digest: Option<u64>,
    /// A core failure after the stream was complete (the domain could not be started):
    /// the session counts as discarded.
    local_error: Option<String>,
}

impl core::fmt::Debug for ReceiveSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReceiveSession")
            .field("id", &self.id)
            .field("dest", &self.dest)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ReceiveSession {
    /// Open a session that checks policies with this host's check.
    pub fn new(id: u32, core: &mut dyn MigrationCore) -> Self {
        Self {
            id,
            dest: Destination::new(core.policy_check()),
            domain: None,
            policy: None,
            bytes: 0,
            last_request_ns: core.now_ns().unwrap_or(0),
            digest: None,
            local_error: None,
        }
    }

    /// The session id.
    pub const fn id(&self) -> u32 {
        self.id
    }

    /// Whether it is over (complete or discarded).
    pub const fn is_over(&self) -> bool {
        self.dest.is_over()
    }

    /// Take stream bytes.
    pub fn write(&mut self, core: &mut dyn MigrationCore, data: &[u8]) {
        self.last_request_ns = core.now_ns().unwrap_or(0);
        self.bytes += data.len() as u64;
        let actions = self.dest.push(data);
        self.run(core, actions);
        // The quiet time starts when this write is done (loading the end of a stream
        // digests all memory with verify_memory, which takes seconds for 1 GiB).
        self.last_request_ns = core.now_ns().unwrap_or(self.last_request_ns).max(self.last_request_ns);
    }

    /// Give up: discard the partial domain.
    pub fn abort(&mut self, core: &mut dyn MigrationCore, reason: String) {
        let actions = self.dest.abort(DestError::ConnectionBroken(reason));
        self.run(core, actions);
    }

    /// Discard if the relay went quiet for too long.
    pub fn tick(&mut self, core: &mut dyn MigrationCore) {
        let Some(now) = core.now_ns() else { return };
        if !self.is_over() && now.saturating_sub(self.last_request_ns) > RELAY_TIMEOUT_NS {
            self.abort(core, alloc::format!("no request from the relay for {} s", RELAY_TIMEOUT_NS / 1_000_000_000));
        }
    }

    /// The state now.
    pub fn status(&self) -> ReceiveStatus {
        let state = match self.dest.state() {
            _ if self.local_error.is_some() => ReceiveState::Discarded,
            crate::dest::DestState::AwaitHeader | crate::dest::DestState::AwaitPolicy => ReceiveState::AwaitPolicy,
            crate::dest::DestState::Complete => ReceiveState::Complete,
            crate::dest::DestState::Discarded => ReceiveState::Discarded,
            _ => ReceiveState::Receiving,
        };
        ReceiveStatus {
            session: self.id,
            state,
            domain: self.domain,
            policy: self.policy.clone(),
            pages_received: self.dest.summary().pages_received,
            bytes_received: self.bytes,
            error: self.local_error.clone().or_else(|| self.dest.error().map(ToString::to_string)),
            memory_digest: self.digest,
        }
    }

    fn run(&mut self, core: &mut dyn MigrationCore, actions: Vec<DestAction>) {
        let mut queue: VecDeque<DestAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            if let Err(e) = self.execute(core, action, &mut queue) {
                queue.clear();
                let discard = self.dest.abort(DestError::CoreFailed(e.clone()));
                if discard.is_empty() {
                    // Already complete or discarded: nothing in the stream to undo, so
                    // the core's failure is the news, and the domain goes.
                    let mut message = e;
                    if let Some(d) = self.domain.take()
                        && let Err(e2) = core.destroy(d)
                    {
                        message = alloc::format!("{message}; destroy the domain {d}: {e2}");
                    }
                    self.local_error = Some(message);
                }
                queue.extend(discard);
            }
        }
    }

    fn execute(
        &mut self,
        core: &mut dyn MigrationCore,
        action: DestAction,
        queue: &mut VecDeque<DestAction>,
    ) -> Result<(), String> {
        let domain = || self.domain.ok_or_else(|| String::from("no domain was created"));
        match action {
            DestAction::CreateDomain(header) => {
                self.domain = Some(core.create_domain(&header)?);
            }
            DestAction::AcceptPolicy(policy) => {
                core.set_policy(domain()?, &policy)?;
                self.policy = Some(Ok(()));
            }
            DestAction::Refuse { reason } => self.policy = Some(Err(reason)),
            DestAction::WritePages(batch) => {
                let d = domain()?;
                for (pfn, data) in batch.pages() {
                    core.write_page(d, pfn, data)?;
                }
            }
            DestAction::SetVcpuState(v) => core.set_vcpu_state(domain()?, v.index, &v.registers)?,
            DestAction::LoadState(record) => core.load_machine_state(domain()?, &record)?,
            DestAction::VerifyMemory(_) => {
                let found = core.memory_digest(domain()?)?;
                self.digest = Some(found.digest);
                queue.extend(self.dest.memory_verified(found.digest));
            }
            DestAction::Complete(_) => core.set_paused(domain()?, false)?,
            DestAction::Discard(error) => {
                if let Some(d) = self.domain.take()
                    && let Err(e) = core.destroy(d)
                {
                    // The stream's error is the news; a failed destroy is added to it.
                    self.local_error = Some(alloc::format!("{error}; destroy the partial domain {d}: {e}"));
                }
            }
        }
        Ok(())
    }
}
