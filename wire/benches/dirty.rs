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
//! The encoded size of each pattern's records is printed once per pattern.

use std::time::Duration;

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
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = dirty_64gib
}
criterion_main!(benches);
