//! Acceptance benchmark of the pre-copy convergence policy: one deterministic run that
//! prints, side by side, what our [`Policy`] and a count-based baseline do over synthetic
//! dirty traces, and exits non-zero if ours loses where the baseline wins.
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
//!   elision): the same for both policies.
//! - Round 0 sends all memory (in 128 MiB steps, as `Source` asks for them); round n
//!   sends the pages dirtied during round n − 1 (the bits of the peek after it).
//! - The policy sees the [`RoundStats`] the real `Source` would build: `bytes_sent`
//!   and `send_ms` cumulative, `dirty_pages` and `round_ms` of the round just finished,
//!   each send's ms rounded up as the core reports them.
//! - Stop-and-copy pauses the guest right after the peek (no writes in between), so the
//!   final round sends exactly the last dirty set. Downtime = its send time + 8 KiB of
//!   vCPU state (2 vCPUs × 4 KiB) at the same bandwidth.
//!
//! # Policies
//!
//! - *ours*: `Policy::default()` (300 ms target, 30 rounds, throttle off).
//! - *baseline*: a count rule like the default pre-copy policy of Xen's libxc: stop and
//!   copy when fewer than 50 pages are dirty or after 5 dirty rounds, otherwise
//!   continue; it never gives up and never throttles.
//!
//! When ours returns `Fail` the guest keeps running on the source and is never paused
//! for longer than the target: that row is reported as *refused*, not as met, and the
//! baseline's downtime in it shows what pausing anyway costs.
//!
//! # Check
//!
//! Wherever the baseline meets the 300 ms target, ours must complete with a downtime
//! ≤ 300 ms and send no more bytes than the baseline. A final table runs ours with
//! throttling on for the ratios ≥ 1 (informational, not checked).
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
use migration_svc::source::DEFAULT_PAGES_PER_STEP;

/// Guest memory in pages (1 GiB).
const PAGES: u64 = 262_144;
/// Bytes of vCPU state sent during the downtime (2 vCPUs × 4 KiB).
const VCPU_STATE_BYTES: u64 = 2 * 4096;
/// The hot set of the hot-set trace: 5 % of memory.
const HOT_PAGES: u64 = PAGES / 20;
/// The baseline's thresholds.
const BASELINE_MIN_DIRTY: u64 = 50;
const BASELINE_MAX_ROUNDS: u32 = 5;
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
}

/// How one migration ended.
#[derive(Clone, Copy)]
enum End {
    /// Paused and copied; downtime in ns.
    Completed { downtime_ns: u64 },
    /// The policy gave up; the guest was never paused.
    Refused(ConvergenceError),
}

#[derive(Clone, Copy)]
struct Run {
    /// Dirty rounds after the full copy, including the final one (as `Summary::rounds`).
    rounds: u32,
    bytes: u64,
    end: End,
    max_throttle: u8,
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
}

/// Time to send `bytes` at `bw` bytes/s, in ns (rounded up).
fn link_ns(bytes: u64, bw: u64) -> u64 {
    let ns = (u128::from(bytes) * NS_PER_SEC).div_ceil(u128::from(bw));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// A send's elapsed time as the core reports it: whole ms, rounded up.
fn reported_ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// The link: its bandwidth and what the source has measured on it so far.
struct Link {
    /// Bytes/s.
    bw: u64,
    /// Bytes sent since the migration started.
    bytes: u64,
    /// Their send time as reported, in ms.
    send_ms: u64,
}

impl Link {
    /// Send `pages` while the guest runs; returns the reported ms.
    fn send(&mut self, guest: &mut Guest, pages: u64, throttle: u8) -> u64 {
        let bytes = pages * PAGE_SIZE;
        let ns = link_ns(bytes, self.bw);
        guest.run(ns, throttle);
        self.bytes += bytes;
        self.send_ms += reported_ms(ns);
        reported_ms(ns)
    }
}

/// One simulated migration of a fresh guest under `decide`.
fn migrate(trace: Trace, ratio: f64, bw: u64, decide: &dyn Fn(&RoundStats) -> Decision) -> Run {
    let rate = (ratio * (bw / PAGE_SIZE) as f64).round() as u64;
    let mut guest = Guest::new(trace, rate);
    let mut link = Link { bw, bytes: 0, send_ms: 0 };
    let (mut round, mut round_ms, mut throttle, mut max_throttle) = (0u32, 0u64, 0u8, 0u8);
    // Round 0: the full copy, in the steps the source asks for.
    let mut next = 0;
    while next < PAGES {
        let step = DEFAULT_PAGES_PER_STEP.min(PAGES - next);
        round_ms += link.send(&mut guest, step, 0);
        next += step;
    }
    loop {
        let dirty = guest.peek_and_clean();
        let stats = RoundStats {
            round,
            bytes_sent: link.bytes,
            send_ms: link.send_ms,
            dirty_pages: dirty,
            round_ms,
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
                };
            }
            Decision::Fail(e) => {
                return Run { rounds: round, bytes: link.bytes, end: End::Refused(e), max_throttle };
            }
            Decision::Throttle { percent } => {
                throttle = percent;
                max_throttle = max_throttle.max(percent);
            }
            Decision::Continue => {}
        }
        round += 1;
        round_ms = link.send(&mut guest, dirty, throttle);
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

fn fmt_downtime(run: &Run) -> String {
    match run.downtime_ns() {
        Some(ns) => format!("{:.1}", ns as f64 / 1e6),
        None => "-".into(),
    }
}

fn fmt_refused(run: &Run) -> &'static str {
    match run.end {
        End::Completed { .. } => "-",
        End::Refused(ConvergenceError::NotConverging { .. }) => "not converging",
        End::Refused(ConvergenceError::RoundLimit { .. }) => "round limit",
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn bw_name(bw: u64) -> String {
    if bw >= 1_000_000_000 { format!("{} GB/s", bw / 1_000_000_000) } else { format!("{} MB/s", bw / 1_000_000) }
}

fn main() {
    let ours = Policy::default();
    let ours_throttled = Policy { throttle: true, ..Policy::default() };
    let target = ours.downtime_target_ms;
    let mut out = String::new();
    let mut checks = Vec::new();
    let _ = writeln!(
        out,
        "pre-copy convergence: 1 GiB guest, downtime target {target} ms, ours = Policy::default() \
         (throttle off), baseline = stop at < {BASELINE_MIN_DIRTY} dirty pages or after {BASELINE_MAX_ROUNDS} \
         dirty rounds\nratio = dirty rate / bandwidth (pages/s); rounds = dirty rounds incl. the final one; \
         downtime includes {VCPU_STATE_BYTES} B of vCPU state"
    );
    for &bw in &BANDWIDTHS {
        for trace in Trace::ALL {
            let _ = writeln!(out, "\n== {} @ {} ==", trace.name(), bw_name(bw));
            let _ = writeln!(out, "{:>5} | {:<46} | {:<31} |", "", "ours", "baseline");
            let _ = writeln!(
                out,
                "{:>5} | {:>6} {:>9} {:>9} {:>4} {:>14} | {:>6} {:>9} {:>9} {:>4} | check",
                "ratio", "rounds", "bytes/RAM", "down ms", "met", "refused", "rounds", "bytes/RAM", "down ms", "met",
            );
            let (mut base_met, mut ok, mut ours_only, mut refused) = (0, 0, 0, 0);
            for &ratio in &RATIOS {
                let o = migrate(trace, ratio, bw, &|s| ours.decide(s));
                let b = migrate(trace, ratio, bw, &baseline);
                let check = if b.met(target) {
                    base_met += 1;
                    if o.met(target) && o.bytes <= b.bytes {
                        ok += 1;
                        "ok"
                    } else {
                        "VIOLATION"
                    }
                } else {
                    if o.met(target) {
                        ours_only += 1;
                    }
                    "n/a (baseline misses)"
                };
                if matches!(o.end, End::Refused(_)) {
                    refused += 1;
                }
                let _ = writeln!(
                    out,
                    "{:>5} | {:>6} {:>9.3} {:>9} {:>4} {:>14} | {:>6} {:>9.3} {:>9} {:>4} | {}",
                    ratio,
                    o.rounds,
                    o.bytes_per_ram(),
                    fmt_downtime(&o),
                    if matches!(o.end, End::Refused(_)) { "-" } else { yes_no(o.met(target)) },
                    fmt_refused(&o),
                    b.rounds,
                    b.bytes_per_ram(),
                    fmt_downtime(&b),
                    yes_no(b.met(target)),
                    check
                );
            }
            checks.push((
                format!(
                    "{} @ {}: baseline meets the target in {base_met}/{n} rows, ours meets it with no more bytes in \
                     {ok} of them; ours alone meets it in {ours_only}; ours refuses in {refused}",
                    trace.name(),
                    bw_name(bw),
                    n = RATIOS.len()
                ),
                ok == base_met,
            ));
        }
    }
    let _ = writeln!(out, "\n== ours with throttle on, ratios >= 1 (informational) ==");
    let _ = writeln!(
        out,
        "{:<42} {:>9} {:>5} | {:>6} {:>9} {:>9} {:>4} {:>14} {:>9}",
        "trace", "bandwidth", "ratio", "rounds", "bytes/RAM", "down ms", "met", "refused", "throttle"
    );
    for &bw in &BANDWIDTHS {
        for trace in Trace::ALL {
            for &ratio in RATIOS.iter().filter(|&&r| r >= 1.0) {
                let t = migrate(trace, ratio, bw, &|s| ours_throttled.decide(s));
                let _ = writeln!(
                    out,
                    "{:<42} {:>9} {:>5} | {:>6} {:>9.3} {:>9} {:>4} {:>14} {:>8}%",
                    trace.name(),
                    bw_name(bw),
                    ratio,
                    t.rounds,
                    t.bytes_per_ram(),
                    fmt_downtime(&t),
                    if matches!(t.end, End::Refused(_)) { "-" } else { yes_no(t.met(target)) },
                    fmt_refused(&t),
                    t.max_throttle
                );
            }
        }
    }
    let _ = writeln!(out, "\n== checks: where the baseline meets {target} ms, ours meets it with no more bytes ==");
    for (line, pass) in &checks {
        let _ = writeln!(out, "{} {line}", if *pass { "PASS" } else { "FAIL" });
    }
    print!("{out}");
    if checks.iter().any(|(_, pass)| !pass) {
        println!("FAILED: ours loses to the baseline somewhere (see VIOLATION rows)");
        process::exit(1);
    }
    println!("PASSED");
}
