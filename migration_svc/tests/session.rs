//! The migration service end to end on the host: two `MigrationService`s (source and
//! destination) answering real request frames, each over a fake core that keeps a
//! domain in a `Vec<u8>` and dirties pages as "time" passes, with an in-process relay
//! doing what `hvctl migrate` does. Checks the destination's memory and vCPU state,
//! the failure paths (refused policy, corrupted byte, cancel, quiet relay) and that the
//! source keeps running with its dirty bits given back.

use migration_svc::testing::{FakeCore, FakeDomain, FakeMachine};
use migration_svc::{MigrationCore, MigrationService};
use wire::migration::MemoryDigest;
use wire::service::QueueInfo;
use wire::{
    Frame, FrameDecoder, MigrateOptions, MigrateProgress, PeerVerdict, ReceiveState, ReceiveStatus, Request, Response,
    SendState,
};

const PAGE: usize = 4096;

/// One hypervisor: the service and its core.
struct Hv {
    svc: MigrationService,
    core: FakeCore,
    next_request: u64,
}

impl Hv {
    fn call(&mut self, req: Request) -> Response {
        self.next_request += 1;
        let mut bytes = Vec::new();
        wire::encode_request(self.next_request, &req, &mut bytes).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        let frame: Frame = d.next_frame().unwrap().unwrap();
        let reply = self.svc.handle_with(&frame, QueueInfo { depth: 0, capacity: 16 }, &mut self.core);
        let mut d = FrameDecoder::new();
        d.push(&reply);
        wire::decode_response(&d.next_frame().unwrap().unwrap()).unwrap()
    }

    fn progress(&mut self, req: Request) -> MigrateProgress {
        match self.call(req) {
            Response::MigrateProgress(p) => *p,
            other => panic!("expected progress, got {other:?}"),
        }
    }

    fn receive(&mut self, req: Request) -> ReceiveStatus {
        match self.call(req) {
            Response::ReceiveStatus(s) => s,
            other => panic!("expected a receive status, got {other:?}"),
        }
    }
}

struct Run {
    src: Hv,
    dst: Hv,
    /// Every stream byte the relay carried, in order.
    stream: Vec<u8>,
    /// The most source time one `MigrateRead` took (the fake clock's advance).
    longest_read_ns: u64,
}

impl Run {
    fn new(pages: usize) -> Self {
        Self {
            src: Hv { svc: MigrationService::new(), core: FakeCore::with_domain(pages), next_request: 0 },
            dst: Hv { svc: MigrationService::new(), core: FakeCore::new(), next_request: 0 },
            stream: Vec::new(),
            longest_read_ns: 0,
        }
    }

    /// Time passes on both hypervisors.
    fn advance(&mut self, ns: u64) {
        self.src.core.now_ns += ns;
        self.dst.core.now_ns += ns;
    }

    /// Relay like hvctl: `corrupt` flips a bit of that stream byte; `cancel_at` cancels
    /// once that many bytes went through; `writes_per_read` pages the guest dirties per
    /// read (and 1 ms passes). Returns the final progress and receive status.
    fn relay(
        &mut self,
        options: MigrateOptions,
        corrupt: Option<u64>,
        cancel_at: Option<u64>,
        writes_per_read: u64,
    ) -> (MigrateProgress, ReceiveStatus) {
        let p = self.src.progress(Request::MigrateSend { domain: 1, options });
        let session = p.session;
        let mut st = self.dst.receive(Request::MigrateReceive);
        let rsession = st.session;
        let mut relayed = 0u64;
        let mut policy_told = false;
        let mut salt = 0;
        for _ in 0..100_000 {
            salt += 1;
            self.advance(1_000_000);
            self.src.core.guest_writes(writes_per_read, salt);
            if cancel_at.is_some_and(|c| relayed >= c) {
                let p = self.src.progress(Request::MigrateCancel { domain: 1 });
                let st = self.dst.receive(Request::MigrateAbort { session: rsession, reason: "cancelled".into() });
                return (p, st);
            }
            let before = self.src.core.now_ns;
            let (mut data, p) = match self.src.call(Request::MigrateRead { session, max_bytes: 60 * 1024 }) {
                Response::MigrateData { data, progress } => (data, *progress),
                other => panic!("expected data, got {other:?}"),
            };
            self.longest_read_ns = self.longest_read_ns.max(self.src.core.now_ns - before);
            if let Some(at) = corrupt
                && (relayed..relayed + data.len() as u64).contains(&at)
            {
                data[(at - relayed) as usize] ^= 0x10;
            }
            relayed += data.len() as u64;
            self.stream.extend_from_slice(&data);
            if p.state == Some(SendState::Failed) {
                let st = self.dst.receive(Request::MigrateAbort {
                    session: rsession,
                    reason: p.failure.clone().unwrap_or_default(),
                });
                return (p, st);
            }
            if !data.is_empty() {
                st = self.dst.receive(Request::MigrateWrite { session: rsession, data });
            }
            let verdict = migration_svc::session::verdict_for(&st, &mut policy_told);
            if let Some(v) = verdict {
                let p = self.src.progress(Request::MigrateVerdict { session, verdict: v });
                if p.state.is_some_and(SendState::is_over) {
                    return (p, st);
                }
            }
        }
        panic!("the relay made no end");
    }
}

fn source_domain(run: &Run) -> &FakeDomain {
    run.src.core.domains.get(&1).expect("the source domain exists")
}

/// The 24 MiB guest that once exhausted a 4 MiB heap: every page non-zero. The stream
/// must come in records no larger than one 16-page batch, which is what either end
/// buffers at a time, whatever the guest's size.
#[test]
fn a_large_guest_streams_in_small_records() {
    let pages = 24 << 20 >> 12;
    let mut run = Run::new(pages);
    for (p, page) in run.src.core.domains.get_mut(&1).unwrap().mem.chunks_mut(PAGE).enumerate() {
        page[100] = p as u8 | 1;
    }
    let expected = run.src.core.domains.get(&1).unwrap().mem.clone();
    let options = MigrateOptions { verify_memory: true, ..MigrateOptions::default() };
    let (p, st) = run.relay(options, None, None, 0);
    assert_eq!(p.state, Some(SendState::Completed), "{:?}", p.failure);
    assert_eq!(st.state, ReceiveState::Complete);
    assert!(run.dst.core.domains.get(&1).unwrap().mem == expected, "the destination has the same memory");

    let mut dec = wire::migration::RecordDecoder::new();
    dec.push(&run.stream).unwrap();
    let (mut largest, mut batches) = (0usize, 0usize);
    let mut before = 0u64;
    while let Some(decoded) = dec.next_record().unwrap() {
        largest = largest.max((dec.bytes() - before) as usize);
        before = dec.bytes();
        if let wire::migration::Decoded::Record(wire::migration::Record::PageBatch(b)) = decoded {
            assert!(b.pfns.len() <= migration_svc::send::SEND_BATCH_PAGES, "a batch of {} pages", b.pfns.len());
            batches += 1;
        }
    }
    assert!(batches >= pages / migration_svc::send::SEND_BATCH_PAGES);
    let bound = 16 + 8 * migration_svc::send::SEND_BATCH_PAGES + PAGE * migration_svc::send::SEND_BATCH_PAGES;
    assert!(largest <= bound, "the largest record is {largest} bytes (bound {bound})");
}

/// A large, mostly empty guest whose pages are slow to read (emulation): the full
/// copy is mostly scanning zero pages, which says nothing about how fast the dirty
/// (data) pages left will go. The source must not take the scan for the link's speed
/// and give up as "not converging".
#[test]
fn scanning_zero_pages_is_not_taken_for_a_slow_link() {
    let pages = 16 * 1024;
    let mut run = Run::new(pages);
    let d = run.src.core.domains.get_mut(&1).unwrap();
    d.mem.fill(0);
    for p in 0..64 {
        d.mem[p * PAGE] = 1;
    }
    // 200 µs a page: 3.3 s to scan; reads of 60 KiB a ms: a 60 MB/s link; the guest
    // dirties 5 pages a read.
    run.src.core.read_page_ns = 200_000;
    let (p, st) = run.relay(MigrateOptions::default(), None, None, 5);
    assert_eq!(p.state, Some(SendState::Completed), "{:?}", p.failure);
    assert_eq!(st.state, ReceiveState::Complete);
}

/// The source's digest of a verified migration is spread over reads: 16 Ki pages at
/// 800 µs each take 13 s to digest, longer than hvctl waits for one answer (10 s),
/// and no read takes more than one digest step of 4096 pages (3.3 s here; ~0.2 s for
/// the ~40 µs a page TCG takes). CI once failed the 1 GiB stress test when the whole
/// digest ran inside one read on a loaded host. Every page is non-zero so that a
/// pre-copy read (60 KiB: 15 pages) is short and the longest read is a digest step.
#[test]
fn the_source_digest_is_spread_over_reads() {
    let pages = 16 * 1024;
    let mut run = Run::new(pages);
    let d = run.src.core.domains.get_mut(&1).unwrap();
    for p in 0..pages {
        d.mem[p * PAGE] = p as u8 | 1;
    }
    run.src.core.read_page_ns = 800_000;
    let options = MigrateOptions { verify_memory: true, ..MigrateOptions::default() };
    let (p, st) = run.relay(options, None, None, 0);
    assert_eq!(p.state, Some(SendState::Completed), "{:?}", p.failure);
    let report = p.report.expect("a report");
    assert_eq!(report.memory_digest, st.memory_digest);
    let dom = st.domain.expect("a destination domain");
    assert_eq!(report.memory_digest, Some(MemoryDigest::of_pages(&run.dst.core.domains[&dom].mem).digest));
    let step_ns = 4096 * 800_000 + 100_000_000;
    assert!(run.longest_read_ns < step_ns, "a read took {} ms", run.longest_read_ns / 1_000_000);
}

#[test]
fn completes_with_equal_memory_and_vcpus() {
    let mut run = Run::new(600);
    let options = MigrateOptions { verify_memory: true, ..MigrateOptions::default() };
    // Reads of 60 KiB at 1 ms each: ~60 MB/s, a guest dirtying 2 pages per ms.
    let (p, st) = run.relay(options, None, None, 2);
    assert_eq!(p.state, Some(SendState::Completed), "{p:?}");
    let report = p.report.expect("a report");
    assert_eq!(st.state, ReceiveState::Complete);
    let dom = st.domain.expect("a destination domain");
    let d = &run.dst.core.domains[&dom];
    assert!(!d.paused, "the destination runs the domain");
    assert_eq!(d.vcpus, [b"vcpu0-registers".to_vec(), b"vcpu1-registers".to_vec()]);
    assert_eq!(d.machine, FakeMachine::sample(2, 1), "clock, FPU areas, MSRs, devices and console all arrived");
    assert_eq!(d.policy, b"policy-with-avx2");
    assert!(run.src.core.domains.is_empty(), "the source copy is destroyed");
    assert_eq!(report.memory_digest, st.memory_digest);
    assert_eq!(report.memory_digest, Some(MemoryDigest::of_pages(&d.mem).digest));
    assert!(report.rounds >= 1 && report.pages_sent >= 600, "{report:?}");
    assert_eq!(report.pages_resent, report.pages_sent - 600);
    assert!(report.downtime_ms >= 1, "downtime is measured: {report:?}");
}

/// The source memory at the end of the migration is exactly the destination's: the
/// source is paused (then destroyed), so compare against a copy taken at its pause.
#[test]
fn destination_memory_is_the_source_memory_at_pause() {
    let mut run = Run::new(300);
    let (p, st) = run.relay(MigrateOptions::default(), None, None, 5);
    assert_eq!(p.state, Some(SendState::Completed), "{p:?}");
    let d = &run.dst.core.domains[&st.domain.unwrap()];
    // Every page written by the guest carries the salt of its last write in byte 1;
    // none of the destination's pages may still be the 0xee garbage it started with.
    assert!(d.mem.chunks(PAGE).all(|pg| pg[2..].iter().all(|&b| b != 0xee)));
    assert!(p.report.unwrap().pages_resent > 0, "the guest dirtied pages during pre-copy");
}

#[test]
fn refused_policy_moves_no_page_and_the_source_runs_on() {
    let mut run = Run::new(100);
    run.dst.core.refuse = Some((b"policy-with-avx2".to_vec(), "this host lacks avx2".into()));
    let (p, st) = run.relay(MigrateOptions::default(), None, None, 1);
    assert_eq!(p.state, Some(SendState::Failed));
    assert!(p.failure.as_deref().unwrap().contains("this host lacks avx2"), "{p:?}");
    assert_eq!(st.state, ReceiveState::Discarded);
    assert_eq!(st.pages_received, 0);
    assert_eq!(run.dst.core.pages_written, 0);
    assert!(run.dst.core.domains.is_empty(), "the partial domain is gone");
    let d = source_domain(&run);
    assert!(!d.paused && d.log.is_none(), "running, and the log this migration started is stopped");
}

#[test]
fn corrupted_byte_is_refused_and_a_retry_succeeds() {
    let mut run = Run::new(200);
    let (p, st) = run.relay(MigrateOptions::default(), Some(30_000), None, 1);
    assert_eq!(p.state, Some(SendState::Failed));
    assert_eq!(st.state, ReceiveState::Discarded);
    assert!(st.error.as_deref().unwrap().contains("checksum"), "{st:?}");
    assert!(p.failure.as_deref().unwrap().contains("checksum"), "{p:?}");
    assert!(!source_domain(&run).paused);
    assert!(run.dst.core.domains.is_empty());
    let (p, st) = run.relay(MigrateOptions { verify_memory: true, ..MigrateOptions::default() }, None, None, 1);
    assert_eq!(p.state, Some(SendState::Completed), "{p:?}");
    assert_eq!(p.report.unwrap().memory_digest, st.memory_digest);
}

#[test]
fn cancel_mid_stream_keeps_the_source_and_its_dirty_bits() {
    let mut run = Run::new(400);
    // Log-dirty already running (e.g. `hvctl dirty start`): the migration must leave
    // it running with every bit it took and did not deliver given back.
    run.src.core.start_log_dirty(1).unwrap();
    run.src.core.guest_writes(10, 99);
    let dirty_before: Vec<u64> = run.src.core.domains[&1].log.as_ref().unwrap().ones().collect();
    let (p, st) = run.relay(MigrateOptions::default(), None, Some(100_000), 3);
    assert_eq!(p.state, Some(SendState::Failed));
    assert!(p.failure.as_deref().unwrap().contains("cancelled"), "{p:?}");
    assert_eq!(st.state, ReceiveState::Discarded);
    let d = source_domain(&run);
    assert!(!d.paused);
    let log = d.log.as_ref().expect("the operator's log keeps running");
    for pfn in dirty_before {
        assert!(log.test(pfn).unwrap(), "pfn {pfn} was dirty before the migration and is lost");
    }
}

#[test]
fn a_quiet_relay_fails_the_source_and_discards_the_destination() {
    let mut run = Run::new(50);
    let p = run.src.progress(Request::MigrateSend { domain: 1, options: MigrateOptions::default() });
    let st = run.dst.receive(Request::MigrateReceive);
    let data = match run.src.call(Request::MigrateRead { session: p.session, max_bytes: 60 * 1024 }) {
        Response::MigrateData { data, .. } => data,
        other => panic!("{other:?}"),
    };
    run.dst.receive(Request::MigrateWrite { session: st.session, data });
    run.advance(migration_svc::session::RELAY_TIMEOUT_NS + 1);
    assert!(run.src.svc.active() && run.dst.svc.active());
    run.src.svc.tick(&mut run.src.core);
    run.dst.svc.tick(&mut run.dst.core);
    assert!(!run.src.svc.active() && !run.dst.svc.active());
    assert!(!source_domain(&run).paused);
    assert!(run.dst.core.domains.is_empty());
    let p = run.src.progress(Request::MigrateCancel { domain: 1 });
    assert!(p.failure.unwrap().contains("no request from the relay"));
}

#[test]
fn a_second_migration_of_the_same_domain_is_refused_while_one_runs() {
    let mut run = Run::new(50);
    run.src.progress(Request::MigrateSend { domain: 1, options: MigrateOptions::default() });
    match run.src.call(Request::MigrateSend { domain: 1, options: MigrateOptions::default() }) {
        Response::Error(e) => assert!(e.message.contains("already being migrated"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    match run.src.call(Request::MigrateRead { session: 99, max_bytes: 10 }) {
        Response::Error(e) => assert!(e.message.contains("no sending migration session 99"), "{e:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bandwidth_cap_limits_what_a_read_hands_out() {
    let mut run = Run::new(400);
    // 1 MB/s: the bucket starts with 64 KiB and holds at most 100 ms = 100 kB.
    let options = MigrateOptions { bandwidth_bytes_per_sec: Some(1_000_000), ..MigrateOptions::default() };
    let p = run.src.progress(Request::MigrateSend { domain: 1, options });
    let read = |run: &mut Run| match run.src.call(Request::MigrateRead { session: p.session, max_bytes: 60 * 1024 }) {
        Response::MigrateData { data, .. } => data.len() as u64,
        other => panic!("{other:?}"),
    };
    // Header and policy go out at once, then the source waits for the verdict.
    let head = read(&mut run);
    assert!(head > 0 && head < 1000, "{head}");
    run.src.progress(Request::MigrateVerdict { session: p.session, verdict: PeerVerdict::PolicyAccepted });
    // No time passes: what is left of the first 64 KiB, then nothing.
    let mut burst = 0;
    loop {
        let n = read(&mut run);
        if n == 0 {
            break;
        }
        burst += n;
    }
    assert_eq!(burst + head, 64 * 1024);
    // 50 ms later: 50 kB more, exactly.
    run.advance(50_000_000);
    assert_eq!(read(&mut run), 50_000);
    assert_eq!(read(&mut run), 0);
    // A 10 s pause of the relay earns no more than a full bucket.
    run.advance(10_000_000_000);
    let mut after_pause = 0;
    loop {
        let n = read(&mut run);
        if n == 0 {
            break;
        }
        after_pause += n;
    }
    assert_eq!(after_pause, 100_000);
}

/// A relay that fails after the whole domain was sent cannot know whether the
/// destination runs it: the source must stay paused rather than make two copies run.
#[test]
fn no_resume_while_the_destination_may_run_the_domain() {
    let mut run = Run::new(100);
    let p = run.src.progress(Request::MigrateSend { domain: 1, options: MigrateOptions::default() });
    let mut policy_told = false;
    let mut state = p.state;
    for _ in 0..10_000 {
        run.advance(1_000_000);
        let progress = match run.src.call(Request::MigrateRead { session: p.session, max_bytes: 60 * 1024 }) {
            Response::MigrateData { progress, .. } => *progress,
            other => panic!("{other:?}"),
        };
        state = progress.state;
        if state == Some(SendState::AwaitAck) {
            break;
        }
        if !policy_told {
            policy_told = true;
            run.src.progress(Request::MigrateVerdict { session: p.session, verdict: PeerVerdict::PolicyAccepted });
        }
    }
    assert_eq!(state, Some(SendState::AwaitAck));
    assert!(source_domain(&run).paused);
    // Cancel now: the domain stays paused, and the message says what to do.
    let p = run.src.progress(Request::MigrateCancel { domain: 1 });
    assert_eq!(p.state, Some(SendState::Failed));
    assert!(source_domain(&run).paused, "resumed while the destination may run it");
    let failure = p.failure.unwrap();
    assert!(failure.contains("stays paused") && failure.contains("hvctl domain unpause 1"), "{failure}");
}

/// A destination that cannot restore a machine-state record (here: the device
/// states) refuses with the core's reason, keeps nothing, and the source runs on.
#[test]
fn device_state_the_destination_cannot_load_is_refused_and_the_source_runs_on() {
    let mut run = Run::new(50);
    run.dst.core.refuse_devices = Some("Lapic state version 9 is not supported by this hypervisor".into());
    let (p, st) = run.relay(MigrateOptions::default(), None, None, 1);
    assert_eq!(p.state, Some(SendState::Failed));
    let failure = p.failure.as_deref().unwrap();
    assert!(failure.contains("Lapic state version 9 is not supported"), "{failure}");
    assert_eq!(st.state, ReceiveState::Discarded);
    assert!(run.dst.core.domains.is_empty(), "the partial domain is gone");
    let d = source_domain(&run);
    assert!(!d.paused, "the source resumed");
}

/// A source core whose machine state is incomplete fails the migration before `End`
/// (the destination never gets a domain without its clock), and the source runs on.
#[test]
fn a_source_without_its_machine_state_fails_and_runs_on() {
    let mut run = Run::new(50);
    run.src.core.domains.get_mut(&1).unwrap().machine.fpus[1] = None;
    let (p, st) = run.relay(MigrateOptions::default(), None, None, 1);
    assert_eq!(p.state, Some(SendState::Failed));
    assert!(p.failure.as_deref().unwrap().contains("no FPU state for a vCPU"), "{p:?}");
    assert_ne!(st.state, ReceiveState::Complete);
    assert!(!source_domain(&run).paused);
}

/// Drive a send of `options` to `AwaitAck` (no destination: the relay reads only).
fn to_await_ack(run: &mut Run, options: MigrateOptions) {
    let p = run.src.progress(Request::MigrateSend { domain: 1, options });
    let mut policy_told = false;
    for _ in 0..10_000 {
        run.advance(1_000_000);
        let progress = match run.src.call(Request::MigrateRead { session: p.session, max_bytes: 60 * 1024 }) {
            Response::MigrateData { progress, .. } => *progress,
            other => panic!("{other:?}"),
        };
        if progress.state == Some(SendState::AwaitAck) {
            return;
        }
        if !policy_told {
            policy_told = true;
            run.src.progress(Request::MigrateVerdict { session: p.session, verdict: PeerVerdict::PolicyAccepted });
        }
    }
    panic!("never reached AwaitAck");
}

/// The destination of a `verify_memory` migration digests all of its memory before it
/// acknowledges: the source waits 10 s plus VERIFY_NS_PER_PAGE per page for that, and
/// without verification only the 10 s.
#[test]
fn the_ack_wait_allows_for_the_destinations_digest() {
    use migration_svc::session::{RELAY_TIMEOUT_NS, VERIFY_NS_PER_PAGE};
    let pages = 4096u64;
    for (verify, limit) in [(false, RELAY_TIMEOUT_NS), (true, RELAY_TIMEOUT_NS + pages * VERIFY_NS_PER_PAGE)] {
        let mut run = Run::new(pages as usize);
        to_await_ack(&mut run, MigrateOptions { verify_memory: verify, ..MigrateOptions::default() });
        run.advance(limit - 1_000_000);
        run.src.svc.tick(&mut run.src.core);
        assert!(run.src.svc.active(), "verify={verify}: stranded before {limit} ns");
        run.advance(2_000_000);
        run.src.svc.tick(&mut run.src.core);
        assert!(!run.src.svc.active(), "verify={verify}: still waiting after {limit} ns");
        assert!(source_domain(&run).paused, "stranded, not resumed: the destination may run it");
    }
}
