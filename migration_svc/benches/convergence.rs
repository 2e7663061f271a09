//! Acceptance benchmark of the pre-copy convergence policy: one deterministic run that
//! prints, side by side, what our [`Policy`] and two baselines (Xen's count rule and a
//! model of QEMU's pre-copy) do over synthetic dirty traces, and exits non-zero if ours
//! misses rule (c) of issue 13 item 4 anywhere: wherever either baseline meets the
//! downtime target, ours meets it with no more bytes than the cheaper of them.
//!
//! # Model
//!
//! - A guest of 1 GiB (262144 pages of 4096 bytes) writes `rate` pages per simulated
//!   second, `rate = ratio × B / 4096` for a dirty-rate/bandwidth ratio (a throttle of
//!   p % scales it by (100 − p) / 100). Traces, all from a fixed xorshift seed:
//!   *uniform* (every write to a random page), *hot-set* (90 % of writes to a random
//!   page of a hot 5 % of memory, 10 % to a random page of the rest), *sweep* (writes
//!   walk memory page by page and wrap).
//! - A link of bandwidth B bytes/s. Sending n pages takes n × 4096 / B seconds of
//!   simulated time (no wall clock), during which the guest keeps writing into a
//!   log-dirty bitmap. Only page payload is counted (no record headers, no zero-page
//!   elision): the same for every rule.
//! - Ours is the real `Source` state machine ([`migrate_source`]): its actions are
//!   executed against the model, so its chunked rounds and mid-round peeks are the
//!   product's. Xen's rule works in whole rounds: round 0 sends all memory (in 128 MiB
//!   steps); round n sends the pages dirtied during round n − 1 (the bits of the peek
//!   after it).
//! - The policy sees the [`RoundStats`] the real `Source` would build: `bytes_sent`
//!   and `send_ms` cumulative, `dirty_pages` and `round_ms` of the round just finished,
//!   from each send's µs rounded up as the core reports them (the Xen rule's sums
//!   rounded up to whole ms as the `Source` does).
//! - Stop-and-copy pauses the guest right after the peek (no writes in between), so the
//!   final round sends exactly the last dirty set. Downtime = its send time + 8 KiB of
//!   vCPU state (2 vCPUs × 4 KiB) at the same bandwidth.
//!
//! # Rules
//!
//! - *ours*: `Policy::default()` (300 ms target, 30 rounds, throttle off), and in the
//!   second set of tables the same with throttle on.
//! - *Xen*: a count rule like the default pre-copy policy of Xen's libxc: stop and copy
//!   when fewer than 50 pages are dirty or after 5 dirty rounds, otherwise continue; it
//!   never gives up and never throttles.
//! - *QEMU*: see [`migrate_qemu`] — iterate until the expected downtime is under
//!   `downtime-limit` (300 ms), with auto-converge off in the first set of tables and on
//!   in the second, cancelled after the same 30 dirty passes our policy is allowed.
//!
//! When ours returns `Fail` (or QEMU's model is cancelled) the guest keeps running on
//! the source and is never paused for longer than the target: that row is reported as
//! *refused*, not as met; Xen's downtime in it shows what pausing anyway costs.
//!
//! # Checks
//!
//! Per row, with throttle off (ours, Xen, QEMU without auto-converge) and on (ours with
//! throttle, Xen, QEMU with auto-converge):
//!
//! - *vs Xen* (guard): wherever Xen meets the 300 ms target, ours meets it too, with no
//!   more bytes (the bench's rule before QEMU's model was added, when it covered the
//!   throttle-off tables only).
//! - *vs QEMU*: wherever QEMU meets the target, ours bytes / QEMU bytes if ours meets
//!   it too; `refused` if ours gave up (its reason is in the `refused` column: the
//!   guest kept running and was never paused, a safe outcome, reported in the summary);
//!   `MISS` if ours paused the guest for longer than the target (guard).
//! - *rule (c)* of issue 13 item 4 (guard): wherever either baseline meets the target,
//!   ours meets it too, with no more bytes than the cheaper of those that do. A refusal
//!   where a baseline meets the target fails it (the guest is safe, but the baseline
//!   did better). It holds in every row since ours measures send times in µs; where
//!   both rules chase a sweep page by page, the margin is a few pages in millions.
//!
//! The exit status is non-zero when a guard fails (`GUARD FAILURE` lines). `-- --strict`
//! (what made rule (c) the exit status before it held) is accepted and changes nothing.
//!
//! # Limits
//!
//! One seed per trace, stationary traces (a fixed rate and access pattern for the whole
//! run), an ideal link (constant bandwidth, no latency), no time between the last peek
//! and the pause. Bytes include the vCPU state of completed runs; a refused run's bytes
//! are what it sent before giving up.

use std::fmt::Write as _;
use std::process;

use migration_svc::convergence::{ConvergenceError, Decision, PAGE_SIZE, Policy, RoundStats};
use migration_svc::source::{DEFAULT_PAGES_PER_STEP, DomainInfo, Failure, Outcome, Source, SourceAction, SourceEvent};
use wire::dirty::DirtyBitmap;

/// Guest memory in pages (1 GiB).
const PAGES: u64 = 262_144;
/// Bytes of vCPU state sent during the downtime (2 vCPUs × 4 KiB).
const VCPU_STATE_BYTES: u64 = 2 * 4096;
/// The hot set of the hot-set trace: 5 % of memory.
const HOT_PAGES: u64 = PAGES / 20;
/// The Xen baseline's thresholds.
const BASELINE_MIN_DIRTY: u64 = 50;
const BASELINE_MAX_ROUNDS: u32 = 5;
/// QEMU's `downtime-limit` default, ms.
const QEMU_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's `throttle-trigger-threshold` default, percent.
const QEMU_THROTTLE_TRIGGER: u64 = 50;
/// QEMU's `cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle` defaults.
const QEMU_THROTTLE_INITIAL: u8 = 20;
const QEMU_THROTTLE_INCREMENT: u8 = 10;
const QEMU_THROTTLE_MAX: u8 = 99;
/// `ram_save_iterate` returns after at most `MAX_WAIT` = 50 ms of sending.
const QEMU_ITERATE_NS: u64 = 50_000_000;
/// The dirty passes QEMU's model is given before it is cancelled: our `max_rounds`.
const QEMU_MAX_PASSES: u32 = 30;
/// A cap on rounds for any rule, so that the simulation always ends.
const HARD_ROUND_CAP: u32 = 200;
/// Dirty-rate / bandwidth ratios, in pages/s over pages/s.
const RATIOS: [f64; 7] = [0.01, 0.1, 0.3, 0.6, 0.9, 1.5, 3.0];
/// Link bandwidths, bytes/s.
const BANDWIDTHS: [u64; 2] = [1_000_000_000, 100_000_000];
const NS_PER_SEC: u128 = 1_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Trace {
    Uniform,
    HotSet,
    Sweep,
}

impl Trace {
    const ALL: [Trace; 3] = [Trace::Uniform, Trace::HotSet, Trace::Sweep];

    fn name(self) -> &'static str {
        match self {
            Trace::Uniform => "uniform",
            Trace::HotSet => "hot-set (90 % of writes to 5 % of pages)",
            Trace::Sweep => "sequential sweep",
        }
    }
}

/// A guest writing pages into a log-dirty bitmap.
struct Guest {
    trace: Trace,
    /// Page writes per second at no throttle.
    rate: u64,
    bits: Vec<u64>,
    dirty: u64,
    rng: u64,
    cursor: u64,
    /// Writes owed, in writes × ns (carried between runs).
    carry: u128,
}

impl Guest {
    fn new(trace: Trace, rate: u64) -> Self {
        Guest {
            trace,
            rate,
            bits: vec![0; (PAGES / 64) as usize],
            dirty: 0,
            rng: 0x2545_f491_4f6c_dd1d,
            cursor: 0,
            carry: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn write(&mut self, pfn: u64) {
        let (word, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        if self.bits[word] & bit == 0 {
            self.bits[word] |= bit;
            self.dirty += 1;
        }
    }

    /// Let `ns` of guest time pass with the vCPUs throttled by `throttle` percent.
    fn run(&mut self, ns: u64, throttle: u8) {
        let rate = u128::from(self.rate) * u128::from(100 - throttle) / 100;
        self.carry += rate * u128::from(ns);
        let writes = self.carry / NS_PER_SEC;
        self.carry %= NS_PER_SEC;
        for _ in 0..writes {
            let pfn = match self.trace {
                Trace::Uniform => self.next() % PAGES,
                Trace::HotSet => {
                    if self.next() % 10 < 9 {
                        self.next() % HOT_PAGES
                    } else {
                        HOT_PAGES + self.next() % (PAGES - HOT_PAGES)
                    }
                }
                Trace::Sweep => {
                    self.cursor = (self.cursor + 1) % PAGES;
                    self.cursor
                }
            };
            self.write(pfn);
        }
    }

    /// Peek and clean: the number of dirty pages, bitmap cleared.
    fn peek_and_clean(&mut self) -> u64 {
        self.bits.fill(0);
        std::mem::take(&mut self.dirty)
    }

    /// Peek and clean as the core does it: the bits, bitmap cleared.
    fn take_bits(&mut self) -> DirtyBitmap {
        let words = std::mem::replace(&mut self.bits, vec![0; (PAGES / 64) as usize]);
        self.dirty = 0;
        match DirtyBitmap::from_words(0..PAGES, words) {
            Ok(bits) => bits,
            Err(e) => unreachable!("a bitmap of {PAGES} pages: {e}"),
        }
    }

    /// QEMU's bitmap sync: OR the log into `bitmap` and clean it; returns the pages
    /// newly set in `bitmap` (what `num_dirty_pages_period` and
    /// `migration_dirty_pages` grow by).
    fn sync_into(&mut self, bitmap: &mut [u64]) -> u64 {
        let mut new = 0;
        for (dst, src) in bitmap.iter_mut().zip(self.bits.iter_mut()) {
            new += u64::from((*src & !*dst).count_ones());
            *dst |= *src;
            *src = 0;
        }
        self.dirty = 0;
        new
    }
}

/// How one migration ended.
#[derive(Clone, Copy)]
enum End {
    /// Paused and copied; downtime in ns.
    Completed { downtime_ns: u64 },
    /// The rule gave up (or was cancelled); the guest was never paused.
    Refused(&'static str),
}

#[derive(Clone, Copy)]
struct Run {
    /// Dirty rounds (QEMU: passes over the bitmap) after the full copy, including the
    /// final one (as `Summary::rounds`).
    rounds: u32,
    bytes: u64,
    end: End,
    max_throttle: u8,
    /// QEMU: bitmap syncs after the first (peeks, in our terms); 0 for the round rules.
    syncs: u32,
}

impl Run {
    fn bytes_per_ram(&self) -> f64 {
        self.bytes as f64 / (PAGES * PAGE_SIZE) as f64
    }

    fn downtime_ns(&self) -> Option<u64> {
        match self.end {
            End::Completed { downtime_ns } => Some(downtime_ns),
            End::Refused(_) => None,
        }
    }

    fn met(&self, target_ms: u64) -> bool {
        self.downtime_ns().is_some_and(|ns| ns <= target_ms * 1_000_000)
    }

    fn refused(&self) -> bool {
        matches!(self.end, End::Refused(_))
    }
}

/// Time to send `bytes` at `bw` bytes/s, in ns (rounded up).
fn link_ns(bytes: u64, bw: u64) -> u64 {
    let ns = (u128::from(bytes) * NS_PER_SEC).div_ceil(u128::from(bw));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// A send's elapsed time as the core reports it: whole µs, rounded up.
fn reported_us(ns: u64) -> u64 {
    ns.div_ceil(1000)
}

/// The link: its bandwidth and what the source has measured on it so far.
struct Link {
    /// Bytes/s.
    bw: u64,
    /// Bytes sent since the migration started.
    bytes: u64,
    /// Their send time as reported, in µs.
    send_us: u64,
}

impl Link {
    /// Send `pages` while the guest runs; returns the reported µs.
    fn send(&mut self, guest: &mut Guest, pages: u64, throttle: u8) -> u64 {
        let bytes = pages * PAGE_SIZE;
        let ns = link_ns(bytes, self.bw);
        guest.run(ns, throttle);
        self.bytes += bytes;
        self.send_us += reported_us(ns);
        reported_us(ns)
    }
}

fn guest_rate(ratio: f64, bw: u64) -> u64 {
    (ratio * (bw / PAGE_SIZE) as f64).round() as u64
}

fn refusal(e: &ConvergenceError) -> &'static str {
    match e {
        ConvergenceError::NotConverging { .. } => "not converging",
        ConvergenceError::RoundLimit { .. } => "round limit",
        ConvergenceError::TooSlow { .. } => "too slow",
    }
}

/// One simulated migration of a fresh guest under a round-based rule `decide`.
fn migrate(trace: Trace, ratio: f64, bw: u64, decide: &dyn Fn(&RoundStats) -> Decision) -> Run {
    let mut guest = Guest::new(trace, guest_rate(ratio, bw));
    let mut link = Link { bw, bytes: 0, send_us: 0 };
    let (mut round, mut round_us, mut throttle, mut max_throttle) = (0u32, 0u64, 0u8, 0u8);
    // Round 0: the full copy, in the steps the source asks for.
    let mut next = 0;
    while next < PAGES {
        let step = DEFAULT_PAGES_PER_STEP.min(PAGES - next);
        round_us += link.send(&mut guest, step, 0);
        next += step;
    }
    loop {
        let dirty = guest.peek_and_clean();
        let stats = RoundStats {
            round,
            bytes_sent: link.bytes,
            send_ms: link.send_us.div_ceil(1000),
            dirty_pages: dirty,
            dirtied_pages: dirty,
            round_ms: round_us.div_ceil(1000),
            throttle_percent: throttle,
        };
        let decision = if round >= HARD_ROUND_CAP {
            Decision::StopAndCopy { estimated_downtime_ms: stats.estimated_downtime_ms() }
        } else {
            decide(&stats)
        };
        match decision {
            Decision::StopAndCopy { .. } => {
                // Paused right after the peek: the final round is exactly `dirty`.
                let final_bytes = dirty * PAGE_SIZE + VCPU_STATE_BYTES;
                return Run {
                    rounds: round + 1,
                    bytes: link.bytes + final_bytes,
                    end: End::Completed { downtime_ns: link_ns(final_bytes, bw) },
                    max_throttle,
                    syncs: 0,
                };
            }
            Decision::Fail(e) => {
                return Run {
                    rounds: round,
                    bytes: link.bytes,
                    end: End::Refused(refusal(&e)),
                    max_throttle,
                    syncs: 0,
                };
            }
            Decision::Throttle { percent } => {
                throttle = percent;
                max_throttle = max_throttle.max(percent);
            }
            Decision::Continue => {}
        }
        round += 1;
        round_us = link.send(&mut guest, dirty, throttle);
    }
}

/// Ours: the real [`Source`] state machine (`Policy` and its chunked rounds with
/// mid-round peeks), its actions executed against the model: sends take link time
/// while the guest writes, `PeekAndClean` takes the guest's log, `Pause` stops it. The
/// final round and the vCPU state are the downtime. `syncs` counts the peeks.
fn migrate_source(trace: Trace, ratio: f64, bw: u64, policy: Policy) -> Run {
    let mut guest = Guest::new(trace, guest_rate(ratio, bw));
    let mut link = Link { bw, bytes: 0, send_us: 0 };
    let mut source = Source::new(policy);
    let (mut throttle, mut paused, mut peeks, mut final_bytes) = (0u8, false, 0u32, 0u64);
    let info = DomainInfo {
        name: "bench".into(),
        memory_bytes: PAGES * PAGE_SIZE,
        vcpus: 2,
        cmdline: String::new(),
        featureset: Vec::new(),
        policy: Vec::new(),
        log_dirty_active: false,
    };
    let mut actions = source.on(SourceEvent::Start(info));
    loop {
        let mut answer = None;
        for action in actions {
            answer = match action {
                SourceAction::SendHeader(_)
                | SourceAction::SendPolicy(_)
                | SourceAction::SendEnd(_)
                | SourceAction::MergeBackDirty(_)
                | SourceAction::Resume
                | SourceAction::StopLogDirty => None,
                SourceAction::Throttle { percent } => {
                    throttle = percent;
                    None
                }
                SourceAction::WaitPolicyAck => Some(SourceEvent::PolicyAccepted),
                SourceAction::StartLogDirty => Some(SourceEvent::LogDirtyStarted),
                SourceAction::SendAllPages { pfns } => {
                    let pages = pfns.end - pfns.start;
                    let elapsed_us = link.send(&mut guest, pages, throttle);
                    Some(SourceEvent::PagesSent { bytes: pages * PAGE_SIZE, elapsed_us })
                }
                SourceAction::PeekAndClean => {
                    peeks += 1;
                    Some(SourceEvent::Dirty(guest.take_bits()))
                }
                SourceAction::SendPages { pages, .. } => {
                    let pages = pages.count_ones();
                    let bytes = pages * PAGE_SIZE;
                    let elapsed_us = if paused {
                        final_bytes += bytes;
                        reported_us(link_ns(bytes, bw))
                    } else {
                        link.send(&mut guest, pages, throttle)
                    };
                    Some(SourceEvent::PagesSent { bytes, elapsed_us })
                }
                SourceAction::Pause => {
                    paused = true;
                    Some(SourceEvent::Paused)
                }
                SourceAction::SendVcpuState => {
                    final_bytes += VCPU_STATE_BYTES;
                    let elapsed_us = reported_us(link_ns(VCPU_STATE_BYTES, bw));
                    Some(SourceEvent::VcpuStateSent { bytes: VCPU_STATE_BYTES, elapsed_us })
                }
                SourceAction::WaitAck => Some(SourceEvent::Acked),
                SourceAction::Done(outcome) => {
                    let summary = source.summary();
                    let end = match &outcome {
                        Outcome::Completed(_) => End::Completed { downtime_ns: link_ns(final_bytes, bw) },
                        Outcome::Failed(Failure::NotConverging(e)) => End::Refused(refusal(e)),
                        Outcome::Failed(f) => unreachable!("the model fails nothing but convergence: {f}"),
                    };
                    return Run {
                        rounds: summary.rounds,
                        bytes: link.bytes + final_bytes,
                        end,
                        max_throttle: summary.max_throttle_percent,
                        syncs: peeks,
                    };
                }
            };
        }
        match answer {
            Some(event) => actions = source.on(event),
            None => unreachable!("the source waits for nothing"),
        }
    }
}

/// The count-based baseline (Xen's simple pre-copy policy).
fn baseline(stats: &RoundStats) -> Decision {
    if stats.dirty_pages < BASELINE_MIN_DIRTY || stats.round >= BASELINE_MAX_ROUNDS {
        Decision::StopAndCopy { estimated_downtime_ms: stats.estimated_downtime_ms() }
    } else {
        Decision::Continue
    }
}

/// A model of QEMU's pre-copy (QEMU 7–8, `migration/migration.c` and
/// `migration/ram.c`, from memory of their logic; device state other than the vCPUs',
/// xbzrle, compression, multifd and postcopy left out):
///
/// - `ram_init_bitmaps` sets every page in the migration bitmap (the bulk stage) and
///   starts dirty logging; `migration_dirty_pages` counts the set bits.
/// - The migration thread loops over `migration_iteration_run`: the pending estimate is
///   `migration_dirty_pages × 4096`; when it is ≤ `threshold_size` it syncs the bitmap
///   (`migration_bitmap_sync`: the dirty log OR-ed into the migration bitmap, the log
///   cleaned, the newly set pages added to `migration_dirty_pages` and to
///   `num_dirty_pages_period`). If then pending < `threshold_size` (or is 0) it
///   completes: `vm_stop`, a final sync (empty here: nothing runs between the two),
///   the rest of the bitmap and the device state sent while the guest is stopped.
///   Otherwise `ram_save_iterate` sends dirty pages, walking the bitmap from where it
///   left off and wrapping, for up to 50 ms (`MAX_WAIT`).
/// - `threshold_size = bandwidth × downtime_limit`, the bandwidth measured over the
///   last 100 ms: the link's B here (ideal link), with `max-bandwidth` at or above the
///   link (QEMU's default 128 MiB/s would cap the 1 GB/s link; libvirt lifts it).
/// - So QEMU syncs once per pass when the bitmap runs low, then again every 50 ms
///   while what is left stays under the threshold, and stops as soon as a sync leaves
///   less than `threshold_size`: it need not finish a pass to stop, and a page still
///   unsent in the bitmap when it is re-dirtied is sent once.
/// - Auto-converge (`migration_trigger_throttle`, called from a sync at least 1 s after
///   the last period ended): when the bytes dirtied in the period exceed
///   `throttle-trigger-threshold` (50 %) of the bytes transferred in it,
///   `dirty_rate_high_cnt` counts up, and at 2 it resets and `mig_throttle_guest_down`
///   throttles (20 % first, +10 % per step, at most 99 %; no tail-slow). As in the
///   code, a period below the threshold does not reset the count, so "two periods"
///   need not be consecutive. The period counters reset whether or not it throttled.
/// - QEMU never gives up by itself (a management layer cancels it); the model is
///   cancelled when a 31st dirty pass would start, the budget our policy gets.
///
/// `rounds` is the passes over the bitmap after the bulk one, counting the final send.
fn migrate_qemu(trace: Trace, ratio: f64, bw: u64, auto_converge: bool) -> Run {
    let mut guest = Guest::new(trace, guest_rate(ratio, bw));
    let threshold_bytes = u128::from(bw) * u128::from(QEMU_DOWNTIME_LIMIT_MS) / 1000;
    let iterate_pages = (u128::from(bw) * u128::from(QEMU_ITERATE_NS) / NS_PER_SEC) as u64 / PAGE_SIZE;
    let words = (PAGES / 64) as usize;
    let mut bitmap = vec![u64::MAX; words];
    let mut dirty_pages = PAGES;
    let (mut word, mut passes, mut syncs) = (0usize, 0u32, 0u32);
    let (mut now_ns, mut transferred) = (0u64, 0u64);
    let (mut throttle, mut max_throttle) = (0u8, 0u8);
    let (mut period_start_ns, mut xfer_prev, mut dirty_period, mut high_cnt) = (0u64, 0u64, 0u64, 0u32);
    loop {
        if u128::from(dirty_pages * PAGE_SIZE) <= threshold_bytes {
            let new = guest.sync_into(&mut bitmap);
            syncs += 1;
            dirty_pages += new;
            dirty_period += new;
            if now_ns > period_start_ns + 1_000_000_000 {
                if auto_converge {
                    let xfer = transferred - xfer_prev;
                    if dirty_period * PAGE_SIZE > xfer * QEMU_THROTTLE_TRIGGER / 100 {
                        high_cnt += 1;
                        if high_cnt >= 2 {
                            high_cnt = 0;
                            throttle = if throttle == 0 {
                                QEMU_THROTTLE_INITIAL
                            } else {
                                (throttle + QEMU_THROTTLE_INCREMENT).min(QEMU_THROTTLE_MAX)
                            };
                            max_throttle = max_throttle.max(throttle);
                        }
                    }
                }
                period_start_ns = now_ns;
                dirty_period = 0;
                xfer_prev = transferred;
            }
        }
        let pending = u128::from(dirty_pages * PAGE_SIZE);
        if pending == 0 || pending < threshold_bytes {
            let final_bytes = dirty_pages * PAGE_SIZE + VCPU_STATE_BYTES;
            return Run {
                rounds: passes + 1,
                bytes: transferred + final_bytes,
                end: End::Completed { downtime_ns: link_ns(final_bytes, bw) },
                max_throttle,
                syncs,
            };
        }
        // One `ram_save_iterate`: up to 50 ms of pages from the bitmap, in pfn order.
        let mut sent = 0;
        while sent < iterate_pages && dirty_pages > 0 {
            let Some(w) = bitmap.get_mut(word) else {
                word = 0;
                passes += 1;
                if passes > QEMU_MAX_PASSES {
                    return Run {
                        rounds: passes - 1,
                        bytes: transferred,
                        end: End::Refused("cancelled"),
                        max_throttle,
                        syncs,
                    };
                }
                continue;
            };
            let take = (w.count_ones() as u64).min(iterate_pages - sent);
            for _ in 0..take {
                *w &= *w - 1;
            }
            sent += take;
            dirty_pages -= take;
            if *w == 0 {
                word += 1;
            }
        }
        let ns = link_ns(sent * PAGE_SIZE, bw);
        guest.run(ns, throttle);
        now_ns += ns;
        transferred += sent * PAGE_SIZE;
    }
}

fn fmt_downtime(run: &Run) -> String {
    match run.downtime_ns() {
        Some(ns) => format!("{:.1}", ns as f64 / 1e6),
        None => "-".into(),
    }
}

fn fmt_refused(run: &Run) -> &'static str {
    match run.end {
        End::Completed { .. } => "-",
        End::Refused(why) => why,
    }
}

fn fmt_met(run: &Run, target: u64) -> &'static str {
    if run.refused() {
        "-"
    } else if run.met(target) {
        "yes"
    } else {
        "NO"
    }
}

fn bw_name(bw: u64) -> String {
    if bw >= 1_000_000_000 { format!("{} GB/s", bw / 1_000_000_000) } else { format!("{} MB/s", bw / 1_000_000) }
}

/// Rule (c) of issue 13 item 4 for one row: `None` if no baseline meets the target,
/// else `Some(Ok(()))` or `Some(Err(reason))`.
fn check(ours: &Run, baselines: &[(&str, &Run)], target: u64) -> Option<Result<(), String>> {
    let best = baselines.iter().filter(|(_, b)| b.met(target)).min_by_key(|(_, b)| b.bytes)?;
    if !ours.met(target) {
        let what = match ours.end {
            End::Refused(why) => format!("ours refuses ({why})"),
            End::Completed { .. } => format!("ours misses the target ({} ms)", fmt_downtime(ours)),
        };
        return Some(Err(format!("{what}; {} meets it", best.0)));
    }
    if ours.bytes > best.1.bytes {
        return Some(Err(format!(
            "ours sends {:.3}x RAM > {} {:.3}x",
            ours.bytes_per_ram(),
            best.0,
            best.1.bytes_per_ram()
        )));
    }
    Some(Ok(()))
}

/// The guard against Xen's count rule (the bench's rule before QEMU's model was added,
/// now applied to the throttle-on tables too): where Xen meets the target, ours meets
/// it with no more bytes. `None` where Xen misses.
fn check_xen(ours: &Run, xen: &Run, target: u64) -> Option<bool> {
    xen.met(target).then(|| ours.met(target) && ours.bytes <= xen.bytes)
}

/// Ours against QEMU's model, in a row where QEMU meets the target.
#[derive(Clone, Copy)]
enum VsQemu {
    /// Both meet it: ours bytes / QEMU bytes, and whether ours sends no more bytes.
    Met { ratio: f64, no_more: bool },
    /// Ours gave up (the reason is in the table): the guest kept running and was never
    /// paused. A safe outcome, but rule (c) and its guard count it as a loss.
    Refused(&'static str),
    /// Ours paused the guest for longer than the target where QEMU did not: a guard
    /// failure.
    Missed,
}

fn vs_qemu(ours: &Run, qemu: &Run, target: u64) -> Option<VsQemu> {
    if !qemu.met(target) {
        return None;
    }
    Some(match ours.end {
        End::Refused(why) => VsQemu::Refused(why),
        End::Completed { .. } if ours.met(target) => {
            VsQemu::Met { ratio: ours.bytes as f64 / qemu.bytes as f64, no_more: ours.bytes <= qemu.bytes }
        }
        End::Completed { .. } => VsQemu::Missed,
    })
}

/// One row of a table: (ours, Xen, QEMU) runs and the checks.
struct Row {
    ratio: f64,
    ours: Run,
    xen: Run,
    qemu: Run,
    xen_guard: Option<bool>,
    vs_qemu: Option<VsQemu>,
    check: Option<Result<(), String>>,
}

/// A row's place, for the summaries.
fn where_(trace: Trace, ratio: f64, bw: u64, throttle: bool) -> String {
    let trace = match trace {
        Trace::Uniform => "uniform",
        Trace::HotSet => "hot-set",
        Trace::Sweep => "sweep",
    };
    format!("{trace} {ratio} @ {}, throttle {}", bw_name(bw), if throttle { "on" } else { "off" })
}

fn main() {
    let target = Policy::default().downtime_target_ms;
    let mut out = String::new();
    let mut checks = Vec::new();
    // Totals over all tables.
    let (mut xen_rows, mut xen_ok) = (0u32, 0u32);
    let (mut qemu_rows, mut qemu_met, mut qemu_le) = (0u32, 0u32, 0u32);
    let (mut c_rows, mut c_ok) = (0u32, 0u32);
    let mut worst: Option<(f64, String)> = None;
    let mut refused_rows = Vec::new();
    let mut guard_failures = Vec::new();
    let _ = writeln!(
        out,
        "pre-copy convergence: 1 GiB guest, downtime target {target} ms; ours = Policy::default() (throttle off, then \
         on); Xen = stop at < {BASELINE_MIN_DIRTY} dirty pages or after {BASELINE_MAX_ROUNDS} dirty rounds; QEMU = \
         stop when dirty bytes < bandwidth x {QEMU_DOWNTIME_LIMIT_MS} ms, auto-converge off (then on), cancelled \
         after {QEMU_MAX_PASSES} dirty passes\nratio = dirty rate / bandwidth (pages/s); rounds = dirty rounds \
         (QEMU: passes) incl. the final one; downtime includes {VCPU_STATE_BYTES} B of vCPU state; thr = highest \
         throttle %\nvs Xen (guard): where Xen meets the target, ours meets it with no more bytes\nvs QEMU (guard: no \
         MISS): where QEMU meets it, ours bytes / QEMU bytes if ours meets it, 'refused' if ours gave up (the guest \
         was never paused; reason in the table), MISS if ours paused for longer than the target\nrule (c) (issue 13 \
         item 4, guard): where Xen or QEMU meets the target, ours meets it with no more bytes than the cheaper of \
         those that do"
    );
    for throttle in [false, true] {
        let ours = Policy { throttle, ..Policy::default() };
        let mode =
            if throttle { "throttle on (QEMU auto-converge on)" } else { "throttle off (QEMU auto-converge off)" };
        for &bw in &BANDWIDTHS {
            for trace in Trace::ALL {
                let _ = writeln!(out, "\n== {} @ {}, {mode} ==", trace.name(), bw_name(bw));
                let _ = writeln!(out, "{:>5} | {:<45} | {:<27} | {:<51} |", "", "ours", "Xen count rule", "QEMU");
                let _ = writeln!(
                    out,
                    "{:>5} | {:>6} {:>9} {:>8} {:>3} {:>4} {:>10} | {:>6} {:>9} {:>8} {:>3} | {:>6} {:>5} {:>9} {:>8} {:>3} \
                     {:>4} {:>10} | {:>6} {:>8} | rule (c)",
                    "ratio",
                    "rounds",
                    "bytes/RAM",
                    "down ms",
                    "met",
                    "thr",
                    "refused",
                    "rounds",
                    "bytes/RAM",
                    "down ms",
                    "met",
                    "passes",
                    "syncs",
                    "bytes/RAM",
                    "down ms",
                    "met",
                    "thr",
                    "refused",
                    "vs Xen",
                    "vs QEMU",
                );
                let mut rows = Vec::new();
                for &ratio in &RATIOS {
                    let o = migrate_source(trace, ratio, bw, ours);
                    let x = migrate(trace, ratio, bw, &baseline);
                    let q = migrate_qemu(trace, ratio, bw, throttle);
                    let check = check(&o, &[("Xen", &x), ("QEMU", &q)], target);
                    let xen_guard = check_xen(&o, &x, target);
                    let vs_qemu = vs_qemu(&o, &q, target);
                    let here = where_(trace, ratio, bw, throttle);
                    if let Some(Err(why)) = &check {
                        guard_failures.push(format!("{here}: rule (c) not met: {why}"));
                    }
                    if xen_guard == Some(false) {
                        guard_failures
                            .push(format!("{here}: ours does not meet the target with no more bytes where Xen does"));
                    }
                    match vs_qemu {
                        Some(VsQemu::Missed) => guard_failures
                            .push(format!("{here}: ours pauses longer than the target where QEMU meets it")),
                        Some(VsQemu::Refused(why)) => refused_rows.push(format!("{here} ({why})")),
                        Some(VsQemu::Met { ratio, .. }) if worst.as_ref().is_none_or(|(w, _)| ratio > *w) => {
                            worst = Some((ratio, here))
                        }
                        _ => {}
                    }
                    rows.push(Row { ratio, ours: o, xen: x, qemu: q, xen_guard, vs_qemu, check });
                }
                for r in &rows {
                    let check = match &r.check {
                        None => "n/a (no baseline meets)".to_string(),
                        Some(Ok(())) => "ok".to_string(),
                        Some(Err(why)) => format!("not met: {why}"),
                    };
                    let vs_xen = match r.xen_guard {
                        None => "-",
                        Some(true) => "ok",
                        Some(false) => "FAIL",
                    };
                    let vs_qemu = match r.vs_qemu {
                        None => "-".to_string(),
                        Some(VsQemu::Met { ratio, .. }) => format!("{ratio:.4}x"),
                        Some(VsQemu::Refused(_)) => "refused".to_string(),
                        Some(VsQemu::Missed) => "MISS".to_string(),
                    };
                    let _ = writeln!(
                        out,
                        "{:>5} | {:>6} {:>9.3} {:>8} {:>3} {:>4} {:>10} | {:>6} {:>9.3} {:>8} {:>3} | {:>6} {:>5} {:>9.3} \
                         {:>8} {:>3} {:>4} {:>10} | {vs_xen:>6} {vs_qemu:>8} | {check}",
                        r.ratio,
                        r.ours.rounds,
                        r.ours.bytes_per_ram(),
                        fmt_downtime(&r.ours),
                        fmt_met(&r.ours, target),
                        r.ours.max_throttle,
                        fmt_refused(&r.ours),
                        r.xen.rounds,
                        r.xen.bytes_per_ram(),
                        fmt_downtime(&r.xen),
                        fmt_met(&r.xen, target),
                        r.qemu.rounds,
                        r.qemu.syncs,
                        r.qemu.bytes_per_ram(),
                        fmt_downtime(&r.qemu),
                        fmt_met(&r.qemu, target),
                        r.qemu.max_throttle,
                        fmt_refused(&r.qemu),
                    );
                }
                let n_xen = rows.iter().filter(|r| r.xen_guard.is_some()).count() as u32;
                let ok_xen = rows.iter().filter(|r| r.xen_guard == Some(true)).count() as u32;
                let n_qemu = rows.iter().filter(|r| r.vs_qemu.is_some()).count() as u32;
                let met_qemu = rows.iter().filter(|r| matches!(r.vs_qemu, Some(VsQemu::Met { .. }))).count() as u32;
                let le_qemu =
                    rows.iter().filter(|r| matches!(r.vs_qemu, Some(VsQemu::Met { no_more: true, .. }))).count() as u32;
                let missed_qemu = rows.iter().any(|r| matches!(r.vs_qemu, Some(VsQemu::Missed)));
                let n_c = rows.iter().filter(|r| r.check.is_some()).count() as u32;
                let ok_c = rows.iter().filter(|r| matches!(r.check, Some(Ok(())))).count() as u32;
                let refused = rows.iter().filter(|r| r.ours.refused()).count();
                (xen_rows, xen_ok) = (xen_rows + n_xen, xen_ok + ok_xen);
                (qemu_rows, qemu_met, qemu_le) = (qemu_rows + n_qemu, qemu_met + met_qemu, qemu_le + le_qemu);
                (c_rows, c_ok) = (c_rows + n_c, c_ok + ok_c);
                checks.push((
                    format!(
                        "{} @ {}, {mode}: Xen meets the target in {n_xen}/{n} rows, ours with no more bytes in \
                         {ok_xen}; QEMU meets it in {n_qemu}, ours in {met_qemu} of them, with no more bytes in \
                         {le_qemu}; ours refuses in {refused}; rule (c) in {ok_c} of {n_c}",
                        trace.name(),
                        bw_name(bw),
                        n = RATIOS.len()
                    ),
                    ok_xen == n_xen && !missed_qemu && ok_c == n_c,
                    ok_c == n_c,
                ));
            }
        }
    }
    let _ = writeln!(out, "\n== per table (guard: vs Xen, no MISS vs QEMU, rule (c) of issue 13 item 4) ==");
    for (line, guard, c) in &checks {
        let _ = writeln!(
            out,
            "guard {} rule (c) {} | {line}",
            if *guard { "PASS" } else { "FAIL" },
            if *c { "met" } else { "not met" }
        );
    }
    let _ = writeln!(out, "\n== summary ==");
    let _ = writeln!(
        out,
        "Xen rule (guard): ours meets the target with no more bytes in {xen_ok} of {xen_rows} rows where Xen meets it; {}",
        if xen_ok == xen_rows { "holds" } else { "BROKEN" }
    );
    let _ = writeln!(
        out,
        "QEMU rule (issue 13 item 4): ours meets the target in {qemu_met} of {qemu_rows} rows where QEMU does, with no \
         more bytes in {qemu_le} of them; {}",
        if qemu_met == qemu_rows && qemu_le == qemu_rows { "met" } else { "not yet met" }
    );
    if let Some((ratio, here)) = &worst {
        let _ = writeln!(out, "  largest ours bytes / QEMU bytes where both meet the target: {ratio:.4}x ({here})");
    }
    let _ = writeln!(
        out,
        "  ours refuses where QEMU meets the target (the guest is never paused; a guard failure through rule (c)): {}",
        if refused_rows.is_empty() { "none".to_string() } else { refused_rows.join("; ") }
    );
    let _ = writeln!(
        out,
        "rule (c) (issue 13 item 4, guard): where Xen or QEMU meets the target, ours meets it with no more bytes \
         than the cheaper in {c_ok} of {c_rows} rows; {}",
        if c_ok == c_rows { "met" } else { "NOT met" }
    );
    for failure in &guard_failures {
        let _ = writeln!(out, "GUARD FAILURE: {failure}");
    }
    print!("{out}");
    if !guard_failures.is_empty() {
        println!("FAILED: the guard is broken in {} rows (see GUARD FAILURE above).", guard_failures.len());
        process::exit(1);
    }
    println!(
        "PASSED: rule (c) of issue 13 item 4 holds in all {c_rows} rows where a baseline meets the target (and ours \
         never pauses longer than the target where QEMU's rule meets it)."
    );
}
