//! The destination side of a live migration as a state machine with no I/O: the core
//! pushes the stream's bytes (or decoded records) in and executes the [`DestAction`]s
//! that come out.
//!
//! # Rules
//!
//! - The first record is the header, the second the CPUID policy. The policy is handed
//!   to the caller's check (the core plugs in `levelling`'s compatibility check against
//!   its host); a refusal returns `Refuse { reason }` and `Discard` before any page is
//!   accepted.
//! - Then page batches and dirty rounds, in any number. Every pfn must lie inside the
//!   domain's memory. Dirty rounds are numbered 1, 2, … (a round may span several
//!   records with the same number); a round's pages are expected again in a later batch.
//! - Then the machine state (stream version 2): the guest clock first (after it, no
//!   more pages), then for every vCPU its state, FPU area and MSRs (each exactly once,
//!   in any order), the device states (once), the console ring (at most once), and
//!   optionally a memory digest, then `End`. Each is handed to the core to load as it
//!   arrives (`LoadState`); a record the core cannot load discards the domain, with the
//!   core's reason, and the source resumes.
//! - At `End`: every page of memory arrived at least once, every page a dirty round
//!   announced arrived after it, the clock, every vCPU's three records and the device
//!   states arrived, and the counts in `End`
//!   match what arrived. Then `Complete`, or, when the stream carried a memory digest,
//!   `VerifyMemory` first: the core computes the digest of its copy and reports it with
//!   [`Destination::memory_verified`], which answers `Complete` or (on a mismatch) `Discard`.
//! - Any error (a bad record, a checksum mismatch, a broken order, a failed check, a
//!   broken connection via [`Destination::abort`]) returns `Discard(error)`: the core
//!   throws the partial domain away. After `Complete` or `Discard` every input is ignored.
//!
//! | action | the core does |
//! |---|---|
//! | `CreateDomain(header)` | create an empty, paused domain with that memory and vCPUs |
//! | `AcceptPolicy(policy)` | install the policy and tell the source it is accepted |
//! | `Refuse { reason }` | tell the source why (a `Discard` follows) |
//! | `WritePages(batch)` | copy the pages into the domain's memory (zero pages: clear) |
//! | `SetVcpuState(state)` | load the registers of that vCPU |
//! | `LoadState(record)` | load the clock, a vCPU's FPU area or MSRs, the device states or the console ring |
//! | `VerifyMemory(digest)` | compute the memory's digest, report it with [`Destination::memory_verified`] |
//! | `Complete(summary)` | acknowledge `End` to the source; the domain may run |
//! | `Discard(error)` | destroy the partial domain |

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use wire::dirty::{DirtyBitmap, DirtyError, PFN_LIMIT};
use wire::migration::{
    ConsoleRing, Decoded, DeviceStates, GuestClock, MemoryDigest, PageBatch, Record, RecordDecoder, RecordError,
    StreamHeader, VcpuFpu, VcpuMsrs, VcpuState,
};

use crate::convergence::PAGE_SIZE;

/// The most vCPUs a migrated domain may declare.
pub const MAX_VCPUS: u32 = 1024;

/// What the core is to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAction {
    /// Create an empty, paused domain.
    CreateDomain(StreamHeader),
    /// Install this CPUID policy and tell the source it is accepted.
    AcceptPolicy(Vec<u8>),
    /// Tell the source the migration is refused, and why.
    Refuse {
        /// The check's reason.
        reason: String,
    },
    /// Copy these pages into the domain's memory.
    WritePages(PageBatch),
    /// Load one vCPU's registers.
    SetVcpuState(VcpuState),
    /// Load one machine-state record.
    LoadState(StateRecord),
    /// Compute the digest of the domain's memory and report it with
    /// [`Destination::memory_verified`]; the domain must not run before.
    VerifyMemory(MemoryDigest),
    /// Acknowledge `End`; the domain is complete.
    Complete(DestSummary),
    /// Throw the partial domain away.
    Discard(DestError),
}

/// A machine-state record (stream version 2) for the core to load into the incoming
/// domain, in stream order: the clock before everything that keeps time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateRecord {
    /// The guest's clocks at pause: rebase the domain's TSC and device clock on them.
    Clock(GuestClock),
    /// One vCPU's FPU/XSAVE area and XCR0.
    Fpu(VcpuFpu),
    /// One vCPU's MSRs.
    Msrs(VcpuMsrs),
    /// Every device model's state.
    Devices(DeviceStates),
    /// The console ring.
    Console(ConsoleRing),
}

/// What arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DestSummary {
    /// Pages received, counting repeats.
    pub pages_received: u64,
    /// Zero pages among them.
    pub zero_pages: u64,
    /// The last dirty round seen.
    pub rounds: u32,
    /// Unknown optional records skipped.
    pub skipped_records: u64,
}

/// Why the destination discards the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestError {
    /// The stream does not decode (checksum, size, unknown mandatory record, …).
    Stream(RecordError),
    /// A record out of its place.
    OutOfOrder {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        found: &'static str,
    },
    /// The CPUID policy check refused.
    PolicyRefused(String),
    /// The header describes a domain this side cannot create.
    BadHeader(String),
    /// A page outside the domain's memory.
    PfnOutOfRange {
        /// The pfn.
        pfn: u64,
        /// The domain's pages.
        pages: u64,
    },
    /// A dirty round that does not apply.
    BadDirtyRound {
        /// The round.
        round: u32,
        /// Why.
        error: DirtyError,
    },
    /// A dirty round out of sequence.
    RoundSequence {
        /// The round expected.
        expected: u32,
        /// The round found.
        found: u32,
    },
    /// A vCPU index outside the domain's vCPUs, or sent twice.
    BadVcpu {
        /// The index.
        index: u32,
        /// The domain's vCPUs.
        vcpus: u32,
    },
    /// The memory digest of the source and of this copy differ.
    MemoryMismatch {
        /// The source's digest.
        expected: u64,
        /// This copy's.
        found: u64,
    },
    /// A memory digest over a different number of pages than the domain has.
    DigestPages {
        /// Pages the digest covers.
        digest: u64,
        /// The domain's pages.
        pages: u64,
    },
    /// A core operation failed (creating the domain, writing pages, loading state).
    CoreFailed(String),
    /// `End` arrived before pages did.
    PagesMissing {
        /// How many.
        count: u64,
        /// The first.
        first_pfn: u64,
    },
    /// `End` arrived before a vCPU's state did.
    VcpuMissing {
        /// The vCPU.
        index: u32,
        /// Which of its records: "state", "FPU state" or "MSRs".
        what: &'static str,
    },
    /// `End` arrived before a domain-wide machine-state record did.
    StateMissing {
        /// Which: "guest clock" or "device states".
        what: &'static str,
    },
    /// `End` disagrees with what arrived.
    CountMismatch {
        /// Which count.
        what: &'static str,
        /// What `End` says.
        sent: u64,
        /// What arrived.
        received: u64,
    },
    /// The stream stopped before `End`, or the connection broke.
    ConnectionBroken(String),
    /// The migration was cancelled.
    Cancelled,
}

impl fmt::Display for DestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(e) => write!(f, "{e}"),
            Self::OutOfOrder { expected, found } => write!(f, "expected a {expected} record, got a {found} record"),
            Self::PolicyRefused(r) => write!(f, "CPUID policy refused: {r}"),
            Self::BadHeader(r) => write!(f, "cannot create the domain: {r}"),
            Self::PfnOutOfRange { pfn, pages } => {
                write!(f, "page {pfn:#x} is outside the domain's {pages} pages")
            }
            Self::BadDirtyRound { round, error } => write!(f, "dirty round {round} does not apply: {error}"),
            Self::RoundSequence { expected, found } => write!(f, "dirty round {found} where round {expected} was due"),
            Self::BadVcpu { index, vcpus } => {
                write!(f, "vCPU state for vCPU {index} is out of range or repeated (the domain has {vcpus})")
            }
            Self::MemoryMismatch { expected, found } => write!(
                f,
                "memory differs from the source's at pause: digest {found:#018x}, the source sent {expected:#018x}"
            ),
            Self::DigestPages { digest, pages } => {
                write!(f, "the memory digest covers {digest} pages, the domain has {pages}")
            }
            Self::CoreFailed(e) => write!(f, "the destination hypervisor failed: {e}"),
            Self::PagesMissing { count, first_pfn } => {
                write!(f, "stream ended with {count} pages missing, the first {first_pfn:#x}")
            }
            Self::VcpuMissing { index, what } => write!(f, "stream ended without the {what} of vCPU {index}"),
            Self::StateMissing { what } => write!(f, "stream ended without the {what} record"),
            Self::CountMismatch { what, sent, received } => {
                write!(f, "end record says {sent} {what}, {received} arrived")
            }
            Self::ConnectionBroken(r) => write!(f, "connection broken: {r}"),
            Self::Cancelled => f.write_str("migration cancelled"),
        }
    }
}

/// Where the destination is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestState {
    /// Waiting for the header.
    AwaitHeader,
    /// Waiting for the CPUID policy.
    AwaitPolicy,
    /// Receiving pages and dirty rounds.
    Memory,
    /// Receiving the machine state (the guest clock arrived).
    Vcpus,
    /// `End` arrived; waiting for the core's digest of its memory.
    Verifying,
    /// The domain is complete.
    Complete,
    /// The domain was discarded.
    Discarded,
}

/// The tracking state once the header has arrived.
#[derive(Clone, Debug)]
struct Domain {
    header: StreamHeader,
    pages: u64,
    /// Pages received at least once.
    seen: DirtyBitmap,
    /// Pages a dirty round announced that have not arrived since.
    expected: DirtyBitmap,
    vcpus_seen: Vec<bool>,
    fpus_seen: Vec<bool>,
    msrs_seen: Vec<bool>,
    devices_seen: bool,
    console_seen: bool,
    /// The source's memory digest, if it sent one.
    digest: Option<MemoryDigest>,
}

/// The destination state machine; see the [module docs](self). `check` is the CPUID
/// policy check: `Ok(())` if this host can run the policy, `Err(reason)` otherwise.
pub struct Destination<F> {
    check: F,
    state: DestState,
    decoder: RecordDecoder,
    domain: Option<Domain>,
    summary: DestSummary,
    error: Option<DestError>,
}

impl<F> fmt::Debug for Destination<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("state", &self.state)
            .field("summary", &self.summary)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<F: FnMut(&[u8]) -> Result<(), String>> Destination<F> {
    /// A destination waiting for a stream, with the policy check to run.
    pub const fn new(check: F) -> Self {
        Self {
            check,
            state: DestState::AwaitHeader,
            decoder: RecordDecoder::new(),
            domain: None,
            summary: DestSummary { pages_received: 0, zero_pages: 0, rounds: 0, skipped_records: 0 },
            error: None,
        }
    }

    /// Where it is.
    pub const fn state(&self) -> DestState {
        self.state
    }

    /// What arrived so far.
    pub const fn summary(&self) -> &DestSummary {
        &self.summary
    }

    /// Why it discarded the domain, if it did.
    pub const fn error(&self) -> Option<&DestError> {
        self.error.as_ref()
    }

    /// Whether it is over (complete or discarded).
    pub const fn is_over(&self) -> bool {
        matches!(self.state, DestState::Complete | DestState::Discarded)
    }

    /// Push received stream bytes (in any split); returns the actions of every record
    /// they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<DestAction> {
        let mut actions = Vec::new();
        if self.is_over() {
            return actions;
        }
        if let Err(e) = self.decoder.push(bytes) {
            actions.append(&mut self.discard(DestError::Stream(e)));
            return actions;
        }
        loop {
            match self.decoder.next_record() {
                Ok(None) => break,
                Ok(Some(Decoded::Skipped { .. })) => self.summary.skipped_records += 1,
                Ok(Some(Decoded::Record(record))) => {
                    actions.append(&mut self.on_record(record));
                    if self.is_over() || self.state == DestState::Verifying {
                        break;
                    }
                }
                Err(e) => {
                    actions.append(&mut self.discard(DestError::Stream(e)));
                    break;
                }
            }
        }
        actions
    }

    /// The stream's transport ended: discard unless `End` was accepted.
    pub fn finish(&mut self) -> Vec<DestAction> {
        if self.is_over() {
            return Vec::new();
        }
        let reason = match self.decoder.finish() {
            Err(e) => alloc::format!("{e}"),
            Ok(()) => "stream ended before the end record".into(),
        };
        self.discard(DestError::ConnectionBroken(reason))
    }

    /// Stop now (connection broken, cancelled): discard unless complete.
    pub fn abort(&mut self, error: DestError) -> Vec<DestAction> {
        if self.is_over() { Vec::new() } else { self.discard(error) }
    }

    /// The core's digest of its copy, answering `VerifyMemory`: `Complete` if it equals
    /// the source's, else `Discard(MemoryMismatch)`.
    pub fn memory_verified(&mut self, found: u64) -> Vec<DestAction> {
        if self.state != DestState::Verifying {
            return Vec::new();
        }
        let expected = self.domain.as_ref().and_then(|d| d.digest).map(|d| d.digest);
        match expected {
            Some(expected) if expected == found => {
                self.complete();
                vec![DestAction::Complete(self.summary)]
            }
            Some(expected) => self.discard(DestError::MemoryMismatch { expected, found }),
            None => self.discard(DestError::OutOfOrder { expected: "memory digest", found: "none" }),
        }
    }

    /// Feed one decoded record.
    pub fn on_record(&mut self, record: Record) -> Vec<DestAction> {
        if self.is_over() {
            return Vec::new();
        }
        match self.apply(record) {
            Ok(actions) => actions,
            Err(e) => self.discard(e),
        }
    }

    fn apply(&mut self, record: Record) -> Result<Vec<DestAction>, DestError> {
        let found = record_name(&record);
        match (self.state, record) {
            (DestState::AwaitHeader, Record::Header(h)) => {
                let domain = new_domain(h.clone())?;
                self.domain = Some(domain);
                self.state = DestState::AwaitPolicy;
                Ok(vec![DestAction::CreateDomain(h)])
            }
            (DestState::AwaitHeader, _) => Err(DestError::OutOfOrder { expected: "header", found }),
            (DestState::AwaitPolicy, Record::CpuidPolicy(p)) => match (self.check)(&p.policy) {
                Ok(()) => {
                    self.state = DestState::Memory;
                    Ok(vec![DestAction::AcceptPolicy(p.policy)])
                }
                Err(reason) => {
                    let mut actions = vec![DestAction::Refuse { reason: reason.clone() }];
                    actions.append(&mut self.discard(DestError::PolicyRefused(reason)));
                    Ok(actions)
                }
            },
            (DestState::AwaitPolicy, _) => Err(DestError::OutOfOrder { expected: "CPUID policy", found }),
            (DestState::Memory, Record::PageBatch(batch)) => {
                self.pages(&batch)?;
                Ok(vec![DestAction::WritePages(batch)])
            }
            (DestState::Memory, Record::DirtyRound(round)) => {
                let last = self.summary.rounds;
                let d = self.domain_mut()?;
                let bits = round
                    .to_bitmap(0..d.pages)
                    .map_err(|error| DestError::BadDirtyRound { round: round.round, error })?;
                // A round may span several records (same number); else the next one.
                let expected = last.saturating_add(1);
                if round.round != expected && (round.round != last || round.round == 0) {
                    return Err(DestError::RoundSequence { expected, found: round.round });
                }
                d.expected.or_merge(&bits).map_err(|error| DestError::BadDirtyRound { round: round.round, error })?;
                self.summary.rounds = round.round;
                Ok(Vec::new())
            }
            (DestState::Memory, Record::GuestClock(clock)) => {
                self.state = DestState::Vcpus;
                Ok(vec![DestAction::LoadState(StateRecord::Clock(clock))])
            }
            (DestState::Vcpus, Record::VcpuState(v)) => {
                let d = self.domain_mut()?;
                once_per_vcpu(&mut d.vcpus_seen, v.index, d.header.vcpus)?;
                Ok(vec![DestAction::SetVcpuState(v)])
            }
            (DestState::Vcpus, Record::VcpuFpu(f)) => {
                let d = self.domain_mut()?;
                once_per_vcpu(&mut d.fpus_seen, f.index, d.header.vcpus)?;
                Ok(vec![DestAction::LoadState(StateRecord::Fpu(f))])
            }
            (DestState::Vcpus, Record::VcpuMsrs(m)) => {
                let d = self.domain_mut()?;
                once_per_vcpu(&mut d.msrs_seen, m.index, d.header.vcpus)?;
                Ok(vec![DestAction::LoadState(StateRecord::Msrs(m))])
            }
            (DestState::Vcpus, Record::DeviceStates(devices)) => {
                let d = self.domain_mut()?;
                if core::mem::replace(&mut d.devices_seen, true) || d.digest.is_some() {
                    return Err(DestError::OutOfOrder { expected: "vCPU record, console ring, digest or end", found });
                }
                Ok(vec![DestAction::LoadState(StateRecord::Devices(devices))])
            }
            (DestState::Vcpus, Record::ConsoleRing(ring)) => {
                let d = self.domain_mut()?;
                if core::mem::replace(&mut d.console_seen, true) || d.digest.is_some() {
                    return Err(DestError::OutOfOrder { expected: "vCPU record, device states, digest or end", found });
                }
                Ok(vec![DestAction::LoadState(StateRecord::Console(ring))])
            }
            (DestState::Vcpus, Record::MemoryDigest(digest)) => {
                let d = self.domain_mut()?;
                if digest.pages != d.pages {
                    return Err(DestError::DigestPages { digest: digest.pages, pages: d.pages });
                }
                if d.digest.replace(digest).is_some() {
                    return Err(DestError::OutOfOrder { expected: "end", found });
                }
                Ok(Vec::new())
            }
            (DestState::Memory, Record::End(_)) => Err(DestError::StateMissing { what: "guest clock" }),
            (DestState::Vcpus, Record::End(end)) => {
                let summary = self.summary;
                let d = self.domain_mut()?;
                for (seen, what) in [(&d.vcpus_seen, "state"), (&d.fpus_seen, "FPU state"), (&d.msrs_seen, "MSRs")] {
                    if let Some(index) = seen.iter().position(|s| !s) {
                        return Err(DestError::VcpuMissing { index: index as u32, what });
                    }
                }
                if !d.devices_seen {
                    return Err(DestError::StateMissing { what: "device states" });
                }
                let missing = d.pages - d.seen.count_ones();
                if missing > 0 {
                    let first_pfn = (0..d.pages).find(|&p| !d.seen.test(p).unwrap_or(true)).unwrap_or(0);
                    return Err(DestError::PagesMissing { count: missing, first_pfn });
                }
                if let Some(first_pfn) = d.expected.ones().next() {
                    return Err(DestError::PagesMissing { count: d.expected.count_ones(), first_pfn });
                }
                if end.pages_sent != summary.pages_received {
                    return Err(DestError::CountMismatch {
                        what: "pages",
                        sent: end.pages_sent,
                        received: summary.pages_received,
                    });
                }
                if summary.rounds > 0 && end.rounds != summary.rounds {
                    return Err(DestError::CountMismatch {
                        what: "rounds",
                        sent: u64::from(end.rounds),
                        received: u64::from(summary.rounds),
                    });
                }
                if let Some(digest) = d.digest {
                    self.state = DestState::Verifying;
                    return Ok(vec![DestAction::VerifyMemory(digest)]);
                }
                self.complete();
                Ok(vec![DestAction::Complete(summary)])
            }
            (
                DestState::Memory,
                Record::VcpuState(_)
                | Record::VcpuFpu(_)
                | Record::VcpuMsrs(_)
                | Record::DeviceStates(_)
                | Record::ConsoleRing(_)
                | Record::MemoryDigest(_),
            ) => Err(DestError::OutOfOrder { expected: "guest clock", found }),
            (DestState::Memory, _) => Err(DestError::OutOfOrder { expected: "page batch or guest clock", found }),
            (DestState::Vcpus, _) => Err(DestError::OutOfOrder { expected: "machine state or end", found }),
            (DestState::Verifying, _) => Err(DestError::OutOfOrder { expected: "nothing after end", found }),
            (DestState::Complete | DestState::Discarded, _) => Ok(Vec::new()),
        }
    }

    fn domain_mut(&mut self) -> Result<&mut Domain, DestError> {
        // The states that call this are only reached with a domain.
        self.domain.as_mut().ok_or(DestError::OutOfOrder { expected: "header", found: "other" })
    }

    fn pages(&mut self, batch: &PageBatch) -> Result<(), DestError> {
        batch.check().map_err(|fault| {
            DestError::Stream(RecordError::BadPayload {
                record_type: wire::migration::RecordType::PageBatch as u16,
                fault,
            })
        })?;
        let d = self.domain_mut()?;
        if let Some(&pfn) = batch.pfns.iter().find(|&&p| p >= d.pages) {
            return Err(DestError::PfnOutOfRange { pfn, pages: d.pages });
        }
        for &pfn in &batch.pfns {
            // In range: checked above.
            let _ = d.seen.set(pfn);
            let _ = d.expected.clean(pfn..pfn + 1);
        }
        let zero = batch.zero.iter().filter(|z| **z).count() as u64;
        self.summary.pages_received += batch.pfns.len() as u64;
        self.summary.zero_pages += zero;
        Ok(())
    }

    /// Complete: what only served the checks (the page bitmaps, the decoder's buffer)
    /// goes back to the heap; a finished session is kept for its status alone.
    fn complete(&mut self) {
        self.state = DestState::Complete;
        self.domain = None;
        self.decoder = RecordDecoder::new();
    }

    fn discard(&mut self, error: DestError) -> Vec<DestAction> {
        self.state = DestState::Discarded;
        self.domain = None;
        self.decoder = RecordDecoder::new();
        self.error = Some(error.clone());
        vec![DestAction::Discard(error)]
    }
}

fn new_domain(header: StreamHeader) -> Result<Domain, DestError> {
    if header.memory_bytes == 0 || !header.memory_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(DestError::BadHeader(alloc::format!(
            "memory size {} bytes is not a non-zero multiple of 4096",
            header.memory_bytes
        )));
    }
    let pages = header.memory_bytes / PAGE_SIZE;
    if pages > PFN_LIMIT {
        return Err(DestError::BadHeader(alloc::format!("{pages} pages exceed the pfn limit")));
    }
    if header.vcpus == 0 || header.vcpus > MAX_VCPUS {
        return Err(DestError::BadHeader(alloc::format!("{} vCPUs (1..={MAX_VCPUS} allowed)", header.vcpus)));
    }
    let bitmap = || DirtyBitmap::new(pages).map_err(|e| DestError::BadHeader(alloc::format!("{e}")));
    Ok(Domain {
        pages,
        seen: bitmap()?,
        expected: bitmap()?,
        vcpus_seen: vec![false; header.vcpus as usize],
        fpus_seen: vec![false; header.vcpus as usize],
        msrs_seen: vec![false; header.vcpus as usize],
        devices_seen: false,
        console_seen: false,
        digest: None,
        header,
    })
}

/// Mark vCPU `index`'s record seen; refused when out of range or seen before.
fn once_per_vcpu(seen: &mut [bool], index: u32, vcpus: u32) -> Result<(), DestError> {
    match seen.get_mut(index as usize) {
        Some(s) if !*s => {
            *s = true;
            Ok(())
        }
        _ => Err(DestError::BadVcpu { index, vcpus }),
    }
}

fn record_name(record: &Record) -> &'static str {
    match record {
        Record::Header(_) => "header",
        Record::CpuidPolicy(_) => "CPUID policy",
        Record::PageBatch(_) => "page batch",
        Record::DirtyRound(_) => "dirty round",
        Record::VcpuState(_) => "vCPU state",
        Record::End(_) => "end",
        Record::MemoryDigest(_) => "memory digest",
        Record::GuestClock(_) => "guest clock",
        Record::VcpuFpu(_) => "vCPU FPU state",
        Record::VcpuMsrs(_) => "vCPU MSRs",
        Record::DeviceStates(_) => "device states",
        Record::ConsoleRing(_) => "console ring",
    }
}
