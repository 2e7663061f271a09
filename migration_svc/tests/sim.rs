//! A whole migration simulated in memory: a fake guest whose dirty rate and a network
//! whose bandwidth the test controls, a core that executes the source's actions (reading
//! guest memory, encoding records, timing sends on a simulated clock), and the
//! destination state machine fed with the stream's bytes. Checks convergence, the
//! not-converging failure, throttling, a policy refusal before any page, a corrupted
//! record mid-stream, and cancellation at every step, each time that no dirty bit is
//! lost on the source and that the destination discards what it had.

use std::collections::BTreeSet;

use migration_svc::convergence::Policy;
use migration_svc::dest::{DestAction, DestError, Destination, StateRecord};
use migration_svc::send::{PageBatcher, encode_dirty_round};
use migration_svc::session::MachineState;
use migration_svc::source::{DomainInfo, Failure, Outcome, Source, SourceAction, SourceEvent, SourceState};
use wire::dirty::DirtyBitmap;
use wire::migration::{ConsoleRing, DeviceEntry, DeviceStates, GuestClock, Record, StreamHeader, VcpuFpu, VcpuMsrs};

const PAGE: usize = 4096;

/// The destination's CPUID policy check, as the core would plug it in.
type PolicyCheck = Box<dyn FnMut(&[u8]) -> Result<(), String>>;

struct Guest {
    pages: u64,
    mem: Vec<u8>,
    log: Option<DirtyBitmap>,
    /// Writes per second at no throttle.
    rate: u64,
    throttle: u8,
    paused: bool,
    rng: u64,
    /// Fractional writes carried to the next tick, in thousandths.
    carry: u64,
    counter: u64,
    /// Pfns written since the last peek.
    window_cur: BTreeSet<u64>,
    /// All pfns written since log-dirty started.
    since_log: BTreeSet<u64>,
}

impl Guest {
    fn new(pages: u64, rate: u64) -> Self {
        let mut g = Guest {
            pages,
            mem: vec![0; pages as usize * PAGE],
            log: None,
            rate,
            throttle: 0,
            paused: false,
            rng: 0x2545_f491_4f6c_dd1d,
            carry: 0,
            counter: 0,
            window_cur: BTreeSet::new(),
            since_log: BTreeSet::new(),
        };
        // Every other page holds data; the rest stay zero (sent as pfn only).
        for pfn in (0..pages).step_by(2) {
            g.write(pfn);
        }
        g.window_cur.clear();
        g
    }

    fn write(&mut self, pfn: u64) {
        self.counter += 1;
        let at = pfn as usize * PAGE;
        self.mem[at..at + 8].copy_from_slice(&self.counter.to_le_bytes());
        self.mem[at + 8..at + 16].copy_from_slice(&pfn.to_le_bytes());
        if let Some(log) = &mut self.log {
            log.set(pfn).unwrap();
            self.since_log.insert(pfn);
            self.window_cur.insert(pfn);
        }
    }

    /// Let `ms` of guest time pass.
    fn run(&mut self, ms: u64) {
        if self.paused {
            return;
        }
        let milli = self.rate * u64::from(100 - self.throttle) / 100 * ms + self.carry;
        self.carry = milli % 1000;
        for _ in 0..milli / 1000 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let pfn = self.rng % self.pages;
            self.write(pfn);
        }
    }

    fn page(&self, pfn: u64) -> &[u8] {
        &self.mem[pfn as usize * PAGE..(pfn as usize + 1) * PAGE]
    }
}

/// Where to inject a fault.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Flip a byte in the stream while sending dirty round `n`.
    CorruptRound(u32),
    /// Cancel instead of the `n`th answering event.
    CancelAtEvent(usize),
    /// The connection breaks while sending the full copy.
    BreakInFullCopy,
}

struct Sim {
    guest: Guest,
    bandwidth: u64,
    vcpus: u32,
    source: Source,
    dest: Destination<PolicyCheck>,
    fault: Fault,
    // Destination side.
    dest_mem: Vec<u8>,
    dest_vcpus: Vec<Option<Vec<u8>>>,
    /// The machine-state records the destination loaded, in order.
    dest_state: Vec<StateRecord>,
    policy_verdict: Option<Result<(), String>>,
    completed: bool,
    discarded: Option<DestError>,
    pages_written_at_dest: u64,
    // Observations.
    actions: Vec<SourceAction>,
    merged: Vec<DirtyBitmap>,
    log_at_stop: Option<DirtyBitmap>,
    last_peek: Option<DirtyBitmap>,
    /// Pfns some peek took whose pages were not delivered since (a send whose
    /// `PagesSent` reached the source; the final round's only with `Acked`).
    undelivered: BTreeSet<u64>,
    /// The pages of the send in flight, delivered if its `PagesSent` reaches the source.
    delivering: Option<Vec<u64>>,
    /// The source's state at each `PeekAndClean` (which kind of peek it was).
    peek_states: Vec<SourceState>,
    outcome: Option<Outcome>,
    events: usize,
}

impl Sim {
    fn new(pages: u64, rate: u64, bandwidth: u64, policy: Policy) -> Self {
        Sim {
            guest: Guest::new(pages, rate),
            bandwidth,
            vcpus: 2,
            source: Source::with_step(policy, 512),
            dest: Destination::new(Box::new(|_: &[u8]| Ok(()))),
            fault: Fault::None,
            dest_mem: Vec::new(),
            dest_vcpus: Vec::new(),
            dest_state: Vec::new(),
            policy_verdict: None,
            completed: false,
            discarded: None,
            pages_written_at_dest: 0,
            actions: Vec::new(),
            merged: Vec::new(),
            log_at_stop: None,
            last_peek: None,
            undelivered: BTreeSet::new(),
            delivering: None,
            peek_states: Vec::new(),
            outcome: None,
            events: 0,
        }
    }

    fn info(&self, log_dirty_active: bool) -> DomainInfo {
        DomainInfo {
            name: "guest-a".into(),
            memory_bytes: self.guest.pages * PAGE as u64,
            vcpus: self.vcpus,
            cmdline: "console=ttyS0".into(),
            featureset: vec![0x1234, 0x5678],
            policy: b"policy-bytes".to_vec(),
            log_dirty_active,
        }
    }

    /// Send `bytes` over the simulated network: the guest runs meanwhile, the destination
    /// gets them. Returns the elapsed ms.
    fn send(&mut self, mut bytes: Vec<u8>, corrupt: bool) -> u64 {
        let ms = (bytes.len() as u64 * 1000).div_ceil(self.bandwidth);
        self.guest.run(ms);
        if corrupt && !bytes.is_empty() {
            let i = bytes.len() / 2;
            bytes[i] ^= 0x10;
        }
        // Deliver in chunk-sized pieces, as stream chunks would.
        for part in bytes.chunks(wire::MAX_CHUNK_DATA) {
            let actions = self.dest.push(part);
            self.apply_dest(actions);
        }
        ms
    }

    fn apply_dest(&mut self, actions: Vec<DestAction>) {
        for a in actions {
            match a {
                DestAction::CreateDomain(h) => {
                    self.dest_mem = vec![0xee; h.memory_bytes as usize];
                    self.dest_vcpus = vec![None; h.vcpus as usize];
                }
                DestAction::AcceptPolicy(p) => {
                    assert_eq!(p, b"policy-bytes");
                    self.policy_verdict = Some(Ok(()));
                }
                DestAction::Refuse { reason } => self.policy_verdict = Some(Err(reason)),
                DestAction::WritePages(batch) => {
                    for (pfn, data) in batch.pages() {
                        let at = pfn as usize * PAGE;
                        match data {
                            Some(d) => self.dest_mem[at..at + PAGE].copy_from_slice(d),
                            None => self.dest_mem[at..at + PAGE].fill(0),
                        }
                        self.pages_written_at_dest += 1;
                    }
                }
                DestAction::SetVcpuState(v) => self.dest_vcpus[v.index as usize] = Some(v.registers),
                DestAction::LoadState(r) => self.dest_state.push(r),
                DestAction::VerifyMemory(d) => panic!("this simulation sends no memory digest, got {d:?}"),
                DestAction::Complete(_) => self.completed = true,
                DestAction::Discard(e) => {
                    self.dest_mem.clear();
                    self.discarded = Some(e);
                }
            }
        }
    }

    fn failure_event(&self) -> Option<SourceEvent> {
        self.discarded.as_ref().map(|e| match e {
            DestError::Stream(s) => SourceEvent::Abort(Failure::Checksum(s.to_string())),
            other => SourceEvent::Abort(Failure::PeerRefused(other.to_string())),
        })
    }

    /// Execute one action; returns the event that answers it, if it awaits one.
    fn execute(&mut self, action: SourceAction) -> Option<SourceEvent> {
        self.actions.push(action.clone());
        match action {
            SourceAction::SendHeader(h) => {
                self.check_header(&h);
                self.send(Record::Header(h).encode_to_vec().unwrap(), false);
                None
            }
            SourceAction::SendPolicy(p) => {
                self.send(Record::CpuidPolicy(p).encode_to_vec().unwrap(), false);
                None
            }
            SourceAction::WaitPolicyAck => Some(match self.policy_verdict.clone() {
                Some(Ok(())) => SourceEvent::PolicyAccepted,
                Some(Err(reason)) => SourceEvent::Abort(Failure::PeerRefused(reason)),
                None => self.failure_event().unwrap(),
            }),
            SourceAction::StartLogDirty => {
                self.guest.log = Some(DirtyBitmap::new(self.guest.pages).unwrap());
                Some(SourceEvent::LogDirtyStarted)
            }
            SourceAction::SendAllPages { pfns } => {
                self.delivering = Some(pfns.clone().collect());
                let mut out = Vec::new();
                let mut b = PageBatcher::new();
                for pfn in pfns {
                    let page = self.guest.page(pfn).to_vec();
                    b.push(pfn, &page, &mut out).unwrap();
                }
                b.flush(&mut out).unwrap();
                if self.fault == Fault::BreakInFullCopy && self.actions.len() > 6 {
                    let a = self.dest.abort(DestError::ConnectionBroken("reset by peer".into()));
                    self.apply_dest(a);
                    return Some(SourceEvent::Abort(Failure::ConnectionBroken("reset by peer".into())));
                }
                let bytes = out.len() as u64;
                let ms = self.send(out, false);
                Some(self.failure_event().unwrap_or(SourceEvent::PagesSent { bytes, elapsed_us: ms * 1000 }))
            }
            SourceAction::PeekAndClean => {
                self.peek_states.push(self.source.state());
                let log = self.guest.log.as_mut().unwrap();
                let bits = log.peek_and_clean(0..self.guest.pages).unwrap();
                assert_eq!(
                    bits.ones().collect::<BTreeSet<_>>(),
                    self.guest.window_cur,
                    "peek takes exactly the writes"
                );
                self.guest.window_cur.clear();
                self.undelivered.extend(bits.ones());
                self.last_peek = Some(bits.clone());
                Some(SourceEvent::Dirty(bits))
            }
            SourceAction::Throttle { percent } => {
                self.guest.throttle = percent;
                None
            }
            SourceAction::SendPages { round, pages } => {
                // The final round (sent paused) is delivered only with `Acked`.
                self.delivering = (!self.guest.paused).then(|| pages.ones().collect());
                let mut out = Vec::new();
                encode_dirty_round(round, &pages, &mut out).unwrap();
                let mut b = PageBatcher::new();
                for pfn in pages.ones() {
                    let page = self.guest.page(pfn).to_vec();
                    b.push(pfn, &page, &mut out).unwrap();
                }
                b.flush(&mut out).unwrap();
                let bytes = out.len() as u64;
                let ms = self.send(out, self.fault == Fault::CorruptRound(round));
                Some(self.failure_event().unwrap_or(SourceEvent::PagesSent { bytes, elapsed_us: ms * 1000 }))
            }
            SourceAction::Pause => {
                self.guest.paused = true;
                Some(SourceEvent::Paused)
            }
            SourceAction::SendVcpuState => {
                let mut out = Vec::new();
                let states = (0..self.vcpus).map(|index| format!("rip=0x{:x}", 0x1000 + index).into_bytes()).collect();
                for record in machine_state(self.vcpus).records(states).unwrap() {
                    record.encode(&mut out).unwrap();
                }
                let bytes = out.len() as u64;
                let ms = self.send(out, false);
                Some(self.failure_event().unwrap_or(SourceEvent::VcpuStateSent { bytes, elapsed_us: ms * 1000 }))
            }
            SourceAction::SendEnd(end) => {
                self.send(Record::End(end).encode_to_vec().unwrap(), false);
                None
            }
            SourceAction::WaitAck => {
                self.delivering = None;
                Some(if self.completed { SourceEvent::Acked } else { self.failure_event().unwrap() })
            }
            SourceAction::MergeBackDirty(bits) => {
                self.guest.log.as_mut().unwrap().or_merge(&bits).unwrap();
                self.merged.push(bits);
                None
            }
            SourceAction::Resume => {
                self.guest.paused = false;
                None
            }
            SourceAction::StopLogDirty => {
                self.log_at_stop = self.guest.log.take();
                None
            }
            SourceAction::Done(outcome) => {
                if let Outcome::Failed(_) = outcome {
                    let a = self.dest.abort(DestError::Cancelled);
                    self.apply_dest(a);
                }
                self.outcome = Some(outcome);
                None
            }
        }
    }

    fn check_header(&self, h: &StreamHeader) {
        assert_eq!(h.memory_bytes, self.guest.pages * PAGE as u64);
        assert_eq!(h.name, "guest-a");
    }

    fn run(&mut self, log_dirty_active: bool) -> Outcome {
        if log_dirty_active {
            self.guest.log = Some(DirtyBitmap::new(self.guest.pages).unwrap());
        }
        let mut actions = self.source.on(SourceEvent::Start(self.info(log_dirty_active)));
        for _ in 0..100_000 {
            let mut answer = None;
            let n = actions.len();
            for (i, a) in actions.into_iter().enumerate() {
                let e = self.execute(a);
                if e.is_some() {
                    assert_eq!(i, n - 1, "only the last action awaits an answer");
                }
                answer = e;
            }
            let Some(mut event) = answer else { break };
            self.events += 1;
            if self.fault == Fault::CancelAtEvent(self.events) {
                // A cancel replaces the answer, except that bits a peek took are data
                // and always reported first (the source's contract with the core); the
                // actions that answer them are then overtaken by the cancel.
                if let SourceEvent::Dirty(_) = event {
                    let _overtaken = self.source.on(event);
                }
                event = SourceEvent::Abort(Failure::Cancelled);
            }
            match &event {
                SourceEvent::PagesSent { .. } => {
                    for pfn in self.delivering.take().unwrap_or_default() {
                        self.undelivered.remove(&pfn);
                    }
                }
                SourceEvent::Acked => self.undelivered.clear(),
                _ => {}
            }
            actions = self.source.on(event);
        }
        assert_eq!(self.source.state(), SourceState::Done);
        self.outcome.clone().unwrap()
    }

    fn sent_page_batches(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, SourceAction::SendAllPages { .. } | SourceAction::SendPages { .. }))
            .count()
    }

    /// Every bit given back, as pfns.
    fn merged_pfns(&self) -> BTreeSet<u64> {
        self.merged.iter().flat_map(|m| m.ones().collect::<Vec<_>>()).collect()
    }

    /// After a failure: the guest runs, unthrottled, and what was given back is exactly
    /// every bit a peek took whose page was not delivered after it (a round runs from
    /// several peeks: the one before it, mid-round ones, and the final one), so the log
    /// (at stop, or now) holds those and every page written since the last peek.
    fn check_failure_safety(&self) {
        assert!(!self.guest.paused, "source domain keeps running");
        assert_eq!(self.guest.throttle, 0, "throttle lifted");
        assert!(self.discarded.is_some(), "destination discards its partial domain");
        assert!(self.dest_mem.is_empty());
        let log = self.log_at_stop.as_ref().or(self.guest.log.as_ref());
        let Some(log) = log else {
            // Log-dirty never started: nothing could be lost.
            assert!(self.merged.is_empty());
            return;
        };
        let have: BTreeSet<u64> = log.ones().collect();
        let merged = self.merged_pfns();
        assert!(merged.is_subset(&have), "merged bits are in the log");
        assert_eq!(merged, self.undelivered, "merged back = every bit taken and not delivered since");
        match &self.last_peek {
            None => assert_eq!(have, self.guest.since_log, "no peek yet: the log has every write"),
            Some(_) => {
                let want: BTreeSet<u64> = self.guest.window_cur.union(&self.undelivered).copied().collect();
                assert_eq!(
                    have, want,
                    "log ∪ merged-back = every page written since the last peek ∪ every bit taken and not delivered"
                );
            }
        }
    }
}

fn assert_copied(sim: &Sim) {
    assert!(sim.completed);
    assert!(sim.dest_mem == sim.guest.mem, "destination memory equals the paused source's");
    assert!(sim.dest_vcpus.iter().all(Option::is_some));
    assert_eq!(sim.dest_state, expected_dest_state(sim.vcpus), "the machine state arrived whole and in order");
    assert!(sim.guest.paused, "source stays paused for the core to destroy");
}

#[test]
fn converges_on_a_fast_network() {
    // 2048 pages (8 MiB), 5000 writes/s, 100 MB/s, a 5 ms target: a few rounds.
    let policy = Policy { downtime_target_ms: 5, ..Policy::default() };
    let mut sim = Sim::new(2048, 5000, 100_000_000, policy);
    let outcome = sim.run(false);
    let Outcome::Completed(summary) = outcome else { panic!("{outcome:?}") };
    assert_copied(&sim);
    assert!(summary.rounds >= 2, "{summary:?}");
    assert!(summary.estimated_downtime_ms <= 5);
    assert_eq!(summary.pages_sent, sim.pages_written_at_dest);
    assert_eq!(summary.max_throttle_percent, 0);
    assert!(sim.actions.contains(&SourceAction::StopLogDirty));
    // The order: header, policy and its verdict before any memory.
    assert!(matches!(sim.actions[0], SourceAction::SendHeader(_)));
    assert!(matches!(sim.actions[1], SourceAction::SendPolicy(_)));
    assert_eq!(sim.actions[2], SourceAction::WaitPolicyAck);
    assert_eq!(sim.actions[3], SourceAction::StartLogDirty);
    assert_eq!(sim.dest.summary().rounds, summary.rounds);
    assert!(sim.dest.summary().zero_pages > 0);
}

#[test]
fn converges_at_once_with_the_default_target() {
    let mut sim = Sim::new(1024, 1000, 100_000_000, Policy::default());
    let Outcome::Completed(summary) = sim.run(false) else { panic!() };
    assert_copied(&sim);
    assert_eq!(summary.rounds, 1, "only the final round after the full copy");
}

#[test]
fn fails_on_a_slow_network_without_throttle() {
    // 10 MB/s = 2441 pages/s against 20000 writes/s.
    let mut sim = Sim::new(2048, 20_000, 10_000_000, Policy::default());
    let outcome = sim.run(false);
    let Outcome::Failed(Failure::NotConverging(e)) = &outcome else { panic!("{outcome:?}") };
    let msg = e.to_string();
    let migration_svc::ConvergenceError::NotConverging { dirty_pages_per_sec, bandwidth_pages_per_sec } = *e else {
        panic!("{e:?}")
    };
    // 10 MB/s is 2441 pages/s; measured on whole milliseconds it comes out a little lower.
    assert!((2400..=2441).contains(&bandwidth_pages_per_sec), "{bandwidth_pages_per_sec}");
    assert!(dirty_pages_per_sec > bandwidth_pages_per_sec);
    assert_eq!(
        msg,
        format!(
            "does not converge: dirty rate {dirty_pages_per_sec} pages/s > bandwidth {bandwidth_pages_per_sec} pages/s"
        )
    );
    sim.check_failure_safety();
    assert_eq!(sim.merged.len(), 1, "the bits taken for the next round are given back");
    // Those of the last peek and those mid-round peeks carried over.
    let last: BTreeSet<u64> = sim.last_peek.as_ref().unwrap().ones().collect();
    assert!(last.is_subset(&sim.merged_pfns()));
}

#[test]
fn converges_with_throttle() {
    let policy = Policy { throttle: true, ..Policy::default() };
    let mut sim = Sim::new(2048, 20_000, 10_000_000, policy);
    let outcome = sim.run(false);
    let Outcome::Completed(summary) = outcome else { panic!("{outcome:?}") };
    assert_copied(&sim);
    assert!(summary.max_throttle_percent >= 20, "{summary:?}");
    assert!(sim.actions.iter().any(|a| matches!(a, SourceAction::Throttle { percent: 20 })));
}

#[test]
fn destination_refuses_the_policy_before_any_page() {
    let mut sim = Sim::new(256, 1000, 100_000_000, Policy::default());
    sim.dest = Destination::new(Box::new(|policy: &[u8]| {
        assert_eq!(policy, b"policy-bytes");
        Err("leaf 0x7.0 ebx bit 5 (avx2) is not available on this host".to_string())
    }));
    let outcome = sim.run(false);
    let Outcome::Failed(Failure::PeerRefused(reason)) = &outcome else { panic!("{outcome:?}") };
    assert_eq!(reason, "leaf 0x7.0 ebx bit 5 (avx2) is not available on this host");
    assert_eq!(sim.sent_page_batches(), 0, "no page moved");
    assert_eq!(sim.pages_written_at_dest, 0);
    assert!(!sim.actions.contains(&SourceAction::StartLogDirty));
    assert!(!sim.actions.contains(&SourceAction::StopLogDirty));
    assert!(matches!(sim.dest.error(), Some(DestError::PolicyRefused(_))));
    assert_eq!(
        Failure::PeerRefused(reason.clone()).to_string(),
        "destination refused the migration: leaf 0x7.0 ebx bit 5 (avx2) is not available on this host"
    );
    sim.check_failure_safety();
}

#[test]
fn corrupted_record_mid_stream_gives_the_round_back() {
    for log_dirty_active in [true, false] {
        let policy = Policy { downtime_target_ms: 5, ..Policy::default() };
        let mut sim = Sim::new(2048, 5000, 100_000_000, policy);
        sim.fault = Fault::CorruptRound(1);
        let outcome = sim.run(log_dirty_active);
        let Outcome::Failed(Failure::Checksum(msg)) = &outcome else { panic!("{outcome:?}") };
        assert!(msg.contains("failed its checksum"), "{msg}");
        assert_eq!(sim.merged.len(), 1);
        // Exactly the bits of the round in flight (checked against `undelivered`).
        sim.check_failure_safety();
        assert_eq!(sim.actions.contains(&SourceAction::StopLogDirty), !log_dirty_active);
        if log_dirty_active {
            assert!(sim.guest.log.is_some(), "a log the migration did not start keeps running");
        }
    }
}

#[test]
fn broken_connection_during_full_copy() {
    // A 5 ms target: with the default 300 ms, the rest of this 16 MiB guest fits the
    // target after the first step, and the source stops and copies from there.
    let policy = Policy { downtime_target_ms: 5, ..Policy::default() };
    let mut sim = Sim::new(4096, 5000, 100_000_000, policy);
    sim.fault = Fault::BreakInFullCopy;
    let outcome = sim.run(false);
    assert!(matches!(outcome, Outcome::Failed(Failure::ConnectionBroken(_))), "{outcome:?}");
    assert!(sim.merged.is_empty(), "no bits were taken yet");
    sim.check_failure_safety();
    assert!(matches!(sim.dest.error(), Some(DestError::ConnectionBroken(_))));
}

#[test]
fn cancel_at_every_step() {
    // Count the answering events of a clean run, then cancel at each one in turn.
    let policy = Policy { downtime_target_ms: 5, throttle: true, ..Policy::default() };
    for log_dirty_active in [false, true] {
        let mut clean = Sim::new(1024, 5000, 50_000_000, policy);
        assert!(matches!(clean.run(log_dirty_active), Outcome::Completed(_)));
        let steps = clean.events;
        assert!(steps > 6, "{steps}");
        // The last answer is `Acked`: the destination already has the domain then, and a
        // cancel is too late (the core delivers the ack).
        for at in 1..steps {
            let mut sim = Sim::new(1024, 5000, 50_000_000, policy);
            sim.fault = Fault::CancelAtEvent(at);
            let outcome = sim.run(log_dirty_active);
            assert_eq!(outcome, Outcome::Failed(Failure::Cancelled), "cancel at {at}");
            sim.check_failure_safety();
            let last = sim.actions.last().unwrap();
            assert!(matches!(last, SourceAction::Done(Outcome::Failed(Failure::Cancelled))));
            // Resume only if paused, MergeBackDirty before StopLogDirty.
            let pos = |f: &dyn Fn(&SourceAction) -> bool| sim.actions.iter().position(f);
            if let (Some(m), Some(s)) = (
                pos(&|a| matches!(a, SourceAction::MergeBackDirty(_))),
                pos(&|a| matches!(a, SourceAction::StopLogDirty)),
            ) {
                assert!(m < s, "merge back before stopping the log");
            }
        }
    }
}

#[test]
fn unexpected_event_is_a_failure_with_cleanup() {
    let mut s = Source::new(Policy::default());
    let info = DomainInfo {
        name: "x".into(),
        memory_bytes: 64 * 4096,
        vcpus: 1,
        cmdline: String::new(),
        featureset: vec![],
        policy: vec![],
        log_dirty_active: false,
    };
    assert_eq!(s.on(SourceEvent::Start(info)).len(), 3);
    assert_eq!(s.on(SourceEvent::PolicyAccepted), [SourceAction::StartLogDirty]);
    let actions = s.on(SourceEvent::Paused);
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[0], SourceAction::StopLogDirty);
    let SourceAction::Done(Outcome::Failed(f)) = &actions[1] else { panic!("{actions:?}") };
    assert_eq!(f.to_string(), "unexpected event Paused in state StartingLogDirty");
    assert!(s.on(SourceEvent::Acked).is_empty(), "nothing after Done");

    let mut s = Source::new(Policy::default());
    let bad = DomainInfo {
        name: "x".into(),
        memory_bytes: 100,
        vcpus: 1,
        cmdline: String::new(),
        featureset: vec![],
        policy: vec![],
        log_dirty_active: false,
    };
    let a = s.on(SourceEvent::Start(bad));
    assert!(matches!(&a[..], [SourceAction::Done(Outcome::Failed(Failure::BadDomain(_)))]), "{a:?}");
}

/// The rounds of `SendPages` chunks sent before the pause, and whether a peek came
/// between two chunks of one round.
fn chunked_rounds(sim: &Sim) -> (Vec<u32>, bool) {
    let mut rounds = Vec::new();
    let mut peek_between = false;
    let mut last_round = None;
    let mut peeked = false;
    for a in &sim.actions {
        match a {
            SourceAction::Pause => break,
            SourceAction::PeekAndClean => peeked = true,
            SourceAction::SendPages { round, .. } => {
                if last_round == Some(*round) {
                    rounds.push(*round);
                    peek_between |= peeked;
                }
                last_round = Some(*round);
                peeked = false;
            }
            _ => {}
        }
    }
    (rounds, peek_between)
}

#[test]
fn rounds_go_in_chunks_with_mid_round_peeks() {
    // 4096 pages, 10000 writes/s, 100 MB/s, 20 ms: dirty rounds of several chunks.
    let policy = Policy { downtime_target_ms: 20, ..Policy::default() };
    let mut sim = Sim::new(4096, 10_000, 100_000_000, policy);
    let outcome = sim.run(false);
    let Outcome::Completed(summary) = outcome else { panic!("{outcome:?}") };
    assert_copied(&sim);
    let (rounds, peek_between) = chunked_rounds(&sim);
    assert!(!rounds.is_empty() && peek_between, "{:?}", sim.actions.len());
    assert_eq!(summary.pages_sent, sim.pages_written_at_dest);
    assert_eq!(sim.dest.summary().rounds, summary.rounds);
    // Cancel at every answer of that run: every bit taken and not delivered goes back.
    for at in 1..sim.events {
        let mut c = Sim::new(4096, 10_000, 100_000_000, policy);
        c.fault = Fault::CancelAtEvent(at);
        assert_eq!(c.run(false), Outcome::Failed(Failure::Cancelled), "cancel at {at}");
        c.check_failure_safety();
    }
}

#[test]
fn stops_in_the_middle_of_a_round() {
    // Find a run whose stop-and-copy follows a mid-round peek; each run's destination
    // memory must equal the paused source's.
    let mut found = false;
    for rate in [2_000, 5_000, 10_000, 20_000] {
        for target in [5, 10, 20, 50] {
            let policy = Policy { downtime_target_ms: target, ..Policy::default() };
            let mut sim = Sim::new(4096, rate, 100_000_000, policy);
            let Outcome::Completed(summary) = sim.run(false) else { continue };
            assert_copied(&sim);
            assert_eq!(summary.pages_sent, sim.pages_written_at_dest);
            // The peek before the pause was a mid-round one: the final round holds
            // the rest of the round, the carried bits and the final peek's.
            let n = sim.peek_states.len();
            assert_eq!(sim.peek_states[n - 1], SourceState::FinalPeek);
            found |= sim.peek_states[n - 2] == SourceState::MidPeek && summary.estimated_downtime_ms <= target;
        }
    }
    assert!(found, "no run stopped after a mid-round peek");
}

/// The machine state the simulated source sends (and the destination must load, in order).
fn machine_state(vcpus: u32) -> MachineState {
    MachineState {
        clock: GuestClock { tsc: 123_456_789, ns: 61_728_394, tsc_hz: 2_000_000_000 },
        fpus: (0..vcpus).map(|index| VcpuFpu { index, xcr0: 3, area: vec![index as u8; 512] }).collect(),
        msrs: (0..vcpus).map(|index| VcpuMsrs { index, msrs: vec![(0x10, 1000 + u64::from(index))] }).collect(),
        devices: DeviceStates { devices: vec![DeviceEntry { kind: 1, instance: 0, version: 1, bytes: vec![7; 30] }] },
        console: Some(ConsoleRing { total_bytes: 3, ring: b"ok\n".to_vec() }),
    }
}

/// What the destination loads after a completed simulation: the clock first, then per
/// vCPU its FPU area and MSRs, then the devices and the console, equal to what was sent.
fn expected_dest_state(vcpus: u32) -> Vec<StateRecord> {
    let m = machine_state(vcpus);
    let mut v = vec![StateRecord::Clock(m.clock)];
    for (f, r) in m.fpus.into_iter().zip(m.msrs) {
        v.push(StateRecord::Fpu(f));
        v.push(StateRecord::Msrs(r));
    }
    v.push(StateRecord::Devices(m.devices));
    v.extend(m.console.map(StateRecord::Console));
    v
}
