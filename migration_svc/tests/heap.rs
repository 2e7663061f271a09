//! Heap use of migration sessions, measured with a counting allocator: a session must
//! hold no more than a few records' worth of memory whatever the guest's size, while it
//! runs and after it has finished (finished sessions are kept for their status).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use migration_svc::MigrationService;
use migration_svc::testing::FakeCore;
use wire::service::QueueInfo;
use wire::{FrameDecoder, MigrateOptions, PeerVerdict, Request, Response, SendState};

struct Counting;
static USED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator with the caller's layout; the
// counters are statistics only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let used = USED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(used, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        USED.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn call(svc: &mut MigrationService, core: &mut FakeCore, id: &mut u64, req: Request) -> Response {
    *id += 1;
    let mut bytes = Vec::new();
    wire::encode_request(*id, &req, &mut bytes).unwrap();
    let mut d = FrameDecoder::new();
    d.push(&bytes);
    let frame = d.next_frame().unwrap().unwrap();
    let reply = svc.handle_with(&frame, QueueInfo { depth: 0, capacity: 16 }, core);
    let mut d = FrameDecoder::new();
    d.push(&reply);
    wire::decode_response(&d.next_frame().unwrap().unwrap()).unwrap()
}

/// Send a paused 24 MiB guest of non-zero pages (like `hvctl save`) to a sink that
/// acknowledges the policy and the end. Returns the session's heap while it ran
/// (peak above the start) and what it kept after it finished.
#[test]
fn a_session_holds_a_few_records_of_heap_while_running_and_after() {
    let pages = 24 << 20 >> 12;
    let mut core = FakeCore::with_domain(pages);
    for (p, page) in core.domains.get_mut(&1).unwrap().mem.chunks_mut(4096).enumerate() {
        page[7] = p as u8 | 1;
    }
    core.domains.get_mut(&1).unwrap().paused = true;
    let mut svc = MigrationService::new();
    let mut id = 0;
    let base = USED.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let options = MigrateOptions::default();
    let session = match call(&mut svc, &mut core, &mut id, Request::MigrateSend { domain: 1, options }) {
        Response::MigrateProgress(p) => p.session,
        other => panic!("{other:?}"),
    };
    let mut verdict = Some(PeerVerdict::PolicyAccepted);
    let mut sent = 0usize;
    for _ in 0..100_000 {
        let p = match call(&mut svc, &mut core, &mut id, Request::MigrateRead { session, max_bytes: 60 * 1024 }) {
            Response::MigrateData { data, progress } => {
                sent += data.len();
                progress
            }
            other => panic!("{other:?}"),
        };
        if p.state.is_some_and(SendState::is_over) {
            break;
        }
        if p.state == Some(SendState::AwaitAck) {
            verdict = Some(PeerVerdict::Acked);
        }
        if let Some(v) = verdict.take() {
            match call(&mut svc, &mut core, &mut id, Request::MigrateVerdict { session, verdict: v }) {
                Response::MigrateProgress(p) if p.state == Some(SendState::Completed) => break,
                Response::MigrateProgress(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(sent > 24 << 20, "the whole guest went out ({sent} bytes)");
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept = USED.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("session heap: peak {peak} bytes while running, {kept} bytes kept after it finished");
    assert!(peak < 512 << 10, "a running session took {peak} bytes of heap");
    assert!(kept < 64 << 10, "a finished session keeps {kept} bytes of heap");
}
