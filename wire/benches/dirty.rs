//! Criterion benchmarks of the dirty bitmap of a 64 GiB guest (16,777,216 pages, a
//! 2 MiB bitmap) at 1%, 10% and 100% dirty, with pages dirty at random or in clusters.
//! Run with `cargo bench -p wire --bench dirty`.
//!
//! Every group reports against the same baseline, a plain `copy_from_slice` of the
//! bitmap's 2 MiB: the least any conversion that reads the whole bitmap can cost.
//!
//! - `to_records`: bitmap → wire records ([`DirtyBitmap::to_records`]), the
//!   conversion cloud-hypervisor reports 12 ms for at 64 GiB / 10% dirty (its
//!   `MemoryRangeTable::from_dirty_bitmap`, after its optimisation).
//! - `from_records`: records → a fresh bitmap, every record checked first.
//! - `runs`: bitmap → a reused `Vec` of dirty runs ([`DirtyBitmap::runs`]), the same
//!   output as cloud-hypervisor's range table, for a like-for-like comparison on this
//!   machine.
//! - `peek_and_clean`: take the whole bitmap (copy out, then clear).
//!
//! The encoded size of each pattern's records is printed once per pattern, and at the
//! end one line per pattern with `to_records` / memcpy (see `ratios`).
//!
//! # `to_records` on the shared 2-core VM (AMD EPYC, load 5-12), issue 13
//!
//! Target: 64 GiB at 10% random in <= 4 ms, against 7.7 ms reported: not reached. One
//! run before and one after of `cargo bench -p wire --bench dirty -- 'memcpy|to_records'`
//! (criterion means; the ratio is against the memcpy of the same run). Wall times on
//! this machine move by 2x with the other helpers' load, so they compare badly across
//! runs:
//!
//! | pattern | before | / memcpy | after | / memcpy |
//! |---|---|---|---|---|
//! | memcpy 2 MiB | 124 us | 1 | 94.7 us | 1 |
//! | random 1% | 8.65 ms | 70x | 5.40 ms | 57x |
//! | random 10% | 20.8 ms | 168x | 12.7 ms | 135x |
//! | clustered 1% | 456 us | 3.7x | 251 us | 2.7x |
//! | clustered 10% | 963 us | 7.8x | 554 us | 5.8x |
//! | 100% | 187 us | 1.5x | 180 us | 1.9x |
//!
//! What the load does not move is CPU time, new encoder against the reference copy of
//! the old one, alternately in one process (`cargo test --release -p wire --lib speed --
//! --ignored --nocapture`): 0.80-0.86x at 10% random, 0.84-0.90x at 1%, 0.95-1.07x
//! at 100% (one run 1.9x: the one record's zeroed 64 KiB buffer, page faults included).
//! Under callgrind at 10% (commit 7006d97): 71M instructions per call against 81M, 0.43M mispredicted
//! branches against 0.52M.
//!
//! What changed, and what is left (for whoever tries next):
//! - A record's operations are written into a zeroed buffer of budget + 512 bytes
//!   through a per-word window with masked indices (no `Vec::push` per byte, no
//!   bounds check left); a run's `ONE`/`DIRTY` pair is one 16-bit store, `DIRTY`
//!   counted only when the run is longer than a page.
//! - Runs are walked by two bit sets (first and last page of each run), two
//!   `trailing_zeros` and two clear-lowest-bit per run.
//! - Clean words and words that go as runs are encoded by one loop over locals
//!   (`Records::run_words`); everything else goes through the general path as before.
//! - The raw-word estimate is one (software) popcount of `starts | second pages`.
//! - Still ~30 instructions per run and ~1 mispredicted loop exit per word; a 2x needs
//!   a different walk (no per-run loop exit), or `popcnt`/BMI in the target.
//! - Any faster encoder must pass `dirty::record::reference`'s property tests, which
//!   compare it byte for byte with a copy of the old encoder.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use wire::dirty::{DirtyBitmap, DirtyRecord};

/// 64 GiB of 4 KiB pages.
const PAGES: u64 = 1 << 24;

/// xorshift64*: deterministic, so every run measures the same bitmaps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Each page dirty with probability `percent` / 100.
fn random(percent: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(PAGES).expect("64 GiB fits");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ percent);
    let threshold = u64::MAX / 100 * percent;
    for pfn in 0..PAGES {
        if percent == 100 || rng.next() < threshold {
            b.set(pfn).expect("in range");
        }
    }
    b
}

/// Runs of 1 to 512 pages (256 on average) at random places until about `percent` of
/// the pages are dirty.
fn clustered(percent: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(PAGES).expect("64 GiB fits");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ percent);
    let target = PAGES / 100 * percent;
    while b.count_ones() < target {
        for _ in 0..256 {
            let start = rng.next() % PAGES;
            let len = 1 + rng.next() % 512;
            b.set_range(start..(start + len).min(PAGES)).expect("in range");
        }
    }
    b
}

fn patterns() -> Vec<(String, DirtyBitmap)> {
    let mut out = vec![
        ("random 1%".to_string(), random(1)),
        ("random 10%".to_string(), random(10)),
        ("clustered 1%".to_string(), clustered(1)),
        ("clustered 10%".to_string(), clustered(10)),
        ("100%".to_string(), random(100)),
    ];
    for (name, b) in &mut out {
        let records = b.to_records();
        let bytes: usize = records.iter().map(DirtyRecord::encoded_len).sum();
        let runs = b.runs().count();
        eprintln!(
            "{name:>14}: {:6.2}% dirty, {runs:>8} runs, {:>4} records, {bytes:>8} bytes encoded ({:.3} of the bitmap's {})",
            b.count_ones() as f64 * 100.0 / PAGES as f64,
            records.len(),
            bytes as f64 / (PAGES / 8) as f64,
            PAGES / 8,
        );
        assert_eq!(&DirtyBitmap::from_records(b.pfns(), &records).expect("valid"), b);
    }
    out
}

fn dirty_64gib(c: &mut Criterion) {
    let patterns = patterns();
    let mut g = c.benchmark_group("dirty 64 GiB");
    g.throughput(Throughput::Bytes(PAGES / 8));

    let src = patterns[1].1.words().to_vec();
    let mut dst = vec![0u64; src.len()];
    g.bench_function("memcpy 2 MiB bitmap", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });

    for (name, bitmap) in &patterns {
        g.bench_with_input(BenchmarkId::new("to_records", name), bitmap, |b, bitmap| b.iter(|| bitmap.to_records()));
    }
    for (name, bitmap) in &patterns {
        let records = bitmap.to_records();
        g.bench_with_input(BenchmarkId::new("from_records", name), &records, |b, records| {
            b.iter(|| DirtyBitmap::from_records(0..PAGES, records).expect("valid"))
        });
    }
    let mut table = Vec::new();
    for (name, bitmap) in &patterns {
        g.bench_with_input(BenchmarkId::new("runs", name), bitmap, |b, bitmap| {
            b.iter(|| {
                // A reused table, as cloud-hypervisor's optimised version reuses its buffer.
                table.clear();
                table.extend(bitmap.runs());
                table.len()
            })
        });
    }
    let ten = &patterns[1].1;
    g.bench_function("peek_and_clean random 10%", |b| {
        b.iter_batched_ref(
            || ten.clone(),
            |log| log.peek_and_clean(0..PAGES).expect("in range"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
    ratios(&patterns);
}

/// The summary line per pattern: `to_records` against the memcpy of the same bitmap,
/// timed here in alternation (so that the load of the moment weighs on both alike), the
/// median of [`ROUNDS`] rounds each. Each round's memcpy is the fastest of
/// [`COPIES`] back-to-back copies, as warm as criterion's; one right after an encode
/// would time a cold copy. Then the verdict on issue 13's target, with the load
/// average: wall times on a shared machine depend on it.
fn ratios(patterns: &[(String, DirtyBitmap)]) {
    const ROUNDS: usize = 31;
    const COPIES: usize = 8;
    let src = patterns[1].1.words().to_vec();
    let mut dst = vec![0u64; src.len()];
    let median = |mut t: Vec<Duration>| {
        t.sort();
        t[t.len() / 2]
    };
    let load = || std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split(' ').next().map(str::to_string));
    let load_before = load().unwrap_or_else(|| "?".into());
    eprintln!("to_records / memcpy of the 2 MiB bitmap, median of {ROUNDS} alternated rounds:");
    let mut ten = None;
    for (name, bitmap) in patterns {
        let (mut copy, mut encode) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let fastest = (0..COPIES)
                .map(|_| {
                    let t = Instant::now();
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                    t.elapsed()
                })
                .min();
            copy.push(fastest.unwrap_or_default());
            let t = Instant::now();
            black_box(black_box(bitmap).to_records());
            encode.push(t.elapsed());
        }
        let (copy, encode) = (median(copy), median(encode));
        eprintln!(
            "{name:>14}: to_records {:8.3} ms, memcpy {:6.3} ms, ratio {:6.1}",
            encode.as_secs_f64() * 1e3,
            copy.as_secs_f64() * 1e3,
            encode.as_secs_f64() / copy.as_secs_f64(),
        );
        if name == TARGET_PATTERN {
            ten = Some((encode, copy));
        }
    }
    let load_after = load().unwrap_or_else(|| "?".into());
    if let Some((encode, copy)) = ten {
        eprintln!(
            "issue 13 target, 64 GiB at 10% random in <= {} ms: {} ({:.3} ms median, {:.1}x memcpy; {} ms is {:.1}x \
             this run's memcpy), load average {load_before} before, {load_after} after",
            TARGET.as_millis(),
            if encode <= TARGET { "met" } else { "NOT met" },
            encode.as_secs_f64() * 1e3,
            encode.as_secs_f64() / copy.as_secs_f64(),
            TARGET.as_millis(),
            TARGET.as_secs_f64() / copy.as_secs_f64(),
        );
    }
}

/// Issue 13's target for `to_records` of [`TARGET_PATTERN`].
const TARGET: Duration = Duration::from_millis(4);
const TARGET_PATTERN: &str = "random 10%";

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = dirty_64gib
}
criterion_main!(benches);
