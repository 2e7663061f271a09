//! A copy of the encoder of [`DirtyBitmap::records`] as of issue 13, kept verbatim as
//! the reference for [`DirtyBitmap::records`], and the property tests that hold it to
//! it. Tests only.
//!
//! The reference picks, per mixed word, the fewer bytes (runs up to 8 operations, raw
//! above); today's encoder sends a word raw above [`RAW_OPS`](super::RAW_OPS)
//! operations (and keeps a stretch of raw words going above
//! [`STAY_RAW_OPS`](super::STAY_RAW_OPS)), for speed. Both write the same format, so
//! the tests ask: the same bitmap back; byte for byte the reference's records wherever
//! no word has more than `RAW_OPS` operations (so that both pick runs); and elsewhere
//! at most 3 times its bytes (a raw word costs 8 bytes where the reference pays at
//! least 3, and a stretch's headers ~5 bytes).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::{CLEAN, DIRTY, DirtyRecord, FAST_ROOM, ONE, WORD_BYTES, WORDS, clean_len, put_varint, varint_len};
use crate::dirty::{DirtyBitmap, WORD_BITS, mask};

impl DirtyBitmap {
    /// What [`DirtyBitmap::records`] gives, by the reference encoder; `budget` must be
    /// in range.
    pub(crate) fn records_reference(&self, budget: usize) -> ReferenceRecords<'_> {
        assert!((super::MIN_RECORD_OPS..=super::MAX_RECORD_OPS).contains(&budget));
        ReferenceRecords {
            words: &self.words,
            base: self.base,
            next: 0,
            budget,
            run: 0..0,
            lit_first: 0,
            lit_len: 0,
            start: 0,
            cursor: 0,
            ops: Vec::new(),
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// What [`DirtyBitmap::to_records`] gives, by the reference encoder.
    pub(crate) fn to_records_reference(&self) -> Vec<DirtyRecord> {
        self.records_reference(super::MAX_RECORD_OPS).collect()
    }
}

/// The reference encoder: [`super::Records`] as of issue 13, verbatim.
pub(crate) struct ReferenceRecords<'a> {
    words: &'a [u64],
    base: u64,
    /// The next word to look at.
    next: usize,
    budget: usize,
    /// A dirty run seen but not yet encoded (empty: none).
    run: Range<u64>,
    /// A stretch of words to send raw, seen but not yet encoded (`lit_len == 0`: none).
    lit_first: usize,
    lit_len: usize,
    /// The record being filled: its first pfn, the pfn its next operation starts from,
    /// its operations.
    start: u64,
    cursor: u64,
    ops: Vec<u8>,
    /// Finished records not yet returned.
    ready: VecDeque<DirtyRecord>,
    done: bool,
}

impl fmt::Debug for ReferenceRecords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the words: they are the whole bitmap.
        f.debug_struct("Records")
            .field("words", &self.words.len())
            .field("next", &self.next)
            .field("budget", &self.budget)
            .field("ready", &self.ready.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Iterator for ReferenceRecords<'_> {
    type Item = DirtyRecord;

    fn next(&mut self) -> Option<DirtyRecord> {
        while self.ready.is_empty() && !self.done {
            self.step();
        }
        self.ready.pop_front()
    }
}

impl ReferenceRecords<'_> {
    /// Encode words until a record is finished or the words end.
    fn step(&mut self) {
        let words = self.words;
        while self.ready.is_empty() {
            let Some(&w) = words.get(self.next) else {
                self.flush_literal();
                self.flush_run();
                self.finish_record();
                self.done = true;
                return;
            };
            let page = self.page_of(self.next);
            self.next += 1;
            match w {
                0 => {
                    // Clean words only lengthen the next gap: skip them all at once.
                    if self.lit_len > 0 {
                        self.flush_literal();
                    }
                    let rest = words.get(self.next..).unwrap_or_default();
                    self.next += rest.iter().position(|&w| w != 0).unwrap_or(rest.len());
                }
                u64::MAX => {
                    // Fully dirty words lengthen the run: take them all at once.
                    if self.lit_len > 0 {
                        self.flush_literal();
                    }
                    let rest = words.get(self.next..).unwrap_or_default();
                    let full = rest.iter().position(|&w| w != u64::MAX).unwrap_or(rest.len());
                    self.next += full;
                    self.push_run(page..self.page_of(self.next));
                }
                _ => self.mixed(w, page),
            }
        }
    }

    /// Encode a word that is neither clean nor fully dirty, standing for pages from
    /// `page` on.
    #[inline]
    fn mixed(&mut self, w: u64, page: u64) {
        // Estimate the operations its runs take (one `ONE` per run, one `DIRTY` more per
        // run longer than a page; a run continuing from the previous word costs nothing)
        // against 8 bytes as a raw word, 9 if that opens a stretch.
        let carry = !self.run.is_empty() && self.run.end == page;
        let starts = w & !(w << 1 | u64::from(carry));
        let ops = starts.count_ones() + (starts & w >> 1).count_ones();
        let continues = self.lit_len > 0 && self.lit_first + self.lit_len + 1 == self.next;
        if ops > if continues { 8 } else { 9 } {
            if continues {
                self.lit_len += 1;
            } else {
                self.flush_literal();
                self.flush_run();
                (self.lit_first, self.lit_len) = (self.next - 1, 1);
            }
            if self.lit_len * WORD_BYTES >= self.budget {
                self.flush_literal();
            }
            return;
        }
        if self.lit_len > 0 {
            self.flush_literal();
        }
        let mut rest = w;
        if carry && rest & 1 == 1 {
            // The pending run goes on into this word (not to its end: `w` is mixed).
            let n = rest.trailing_ones();
            self.run.end += u64::from(n);
            rest &= !mask(0, n);
        }
        if rest == 0 {
            return;
        }
        self.flush_run();
        // With room for the worst case of a word (a 6-byte gap, then 32 runs of 4 bytes
        // at most), skip the budget check per run.
        let fast = !self.ops.is_empty() && self.ops.len() + FAST_ROOM <= self.budget;
        while rest != 0 {
            let lo = rest.trailing_zeros();
            let len = (rest >> lo).trailing_ones();
            let at = page + u64::from(lo);
            if lo + len == u64::BITS {
                // It may go on into the next word.
                self.run = at..at + u64::from(len);
                return;
            }
            // Clear the lowest run: adding its lowest bit carries through it.
            rest &= rest + (1 << lo);
            if fast {
                put_varint(&mut self.ops, (at - self.cursor) << 2 | ONE);
                if len > 1 {
                    put_varint(&mut self.ops, u64::from(len - 1) << 2 | DIRTY);
                }
                self.cursor = at + u64::from(len);
            } else {
                self.run = at..at + u64::from(len);
                self.flush_run();
            }
        }
    }

    const fn page_of(&self, word: usize) -> u64 {
        self.base + word as u64 * WORD_BITS
    }

    /// Note dirty pages `run`, which start at or after every page noted so far.
    fn push_run(&mut self, run: Range<u64>) {
        if !self.run.is_empty() && self.run.end == run.start {
            self.run.end = run.end;
        } else {
            self.flush_run();
            self.run = run;
        }
    }

    /// Encode the pending run: `ONE gap`, then `DIRTY len-1` if longer than a page.
    fn flush_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let run = core::mem::replace(&mut self.run, 0..0);
        let more = run.end - run.start - 1;
        let more_len = if more > 0 { varint_len(more << 2 | DIRTY) } else { 0 };
        let gap = self.room_for(run.start, |gap| varint_len(gap << 2 | ONE) + more_len);
        put_varint(&mut self.ops, gap << 2 | ONE);
        if more > 0 {
            put_varint(&mut self.ops, more << 2 | DIRTY);
        }
        self.cursor = run.end;
    }

    /// Encode the pending stretch of raw words: `CLEAN gap` if needed, `WORDS n`, the
    /// words; split between records when it does not fit.
    fn flush_literal(&mut self) {
        let (mut first, mut left) = (self.lit_first, self.lit_len);
        self.lit_len = 0;
        while left > 0 {
            let page = self.page_of(first);
            // `n <= left` words take at most this header.
            let header = varint_len((left as u64) << 2 | WORDS);
            let gap = self.room_for(page, |gap| clean_len(gap) + header + WORD_BYTES);
            let used = self.ops.len() + clean_len(gap) + header;
            let n = (self.budget.saturating_sub(used) / WORD_BYTES).clamp(1, left);
            if gap > 0 {
                put_varint(&mut self.ops, gap << 2 | CLEAN);
            }
            put_varint(&mut self.ops, (n as u64) << 2 | WORDS);
            for w in self.words.get(first..first + n).unwrap_or_default() {
                self.ops.extend_from_slice(&w.to_le_bytes());
            }
            self.cursor = page + n as u64 * WORD_BITS;
            first += n;
            left -= n;
        }
    }

    /// Make room for an operation anchored at page `at` whose size, given its gap from
    /// the cursor, is `size(gap)`: start a new record at `at` if the current one is
    /// empty or too full. Returns the gap to encode.
    fn room_for(&mut self, at: u64, size: impl Fn(u64) -> usize) -> u64 {
        if !self.ops.is_empty() && self.ops.len() + size(at - self.cursor) <= self.budget {
            return at - self.cursor;
        }
        self.finish_record();
        if self.ops.capacity() == 0 {
            self.ops.reserve(self.budget);
        }
        self.start = at;
        self.cursor = at;
        0
    }

    fn finish_record(&mut self) {
        if !self.ops.is_empty() {
            let ops = core::mem::take(&mut self.ops);
            self.ready.push_back(DirtyRecord { start: self.start, ops });
        }
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;
    use alloc::vec::Vec;

    use proptest::collection::vec as vec_of;
    use proptest::prelude::*;

    use super::super::{DirtyRecord, MAX_RECORD_OPS, MIN_RECORD_OPS, RAW_OPS};
    use crate::dirty::{DirtyBitmap, PFN_LIMIT};

    /// Words in the shapes that pick different operations: clean, fully dirty,
    /// alternating, single bits and runs at the edges, and random densities from ~1.5%
    /// to ~88%.
    fn word() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => Just(0u64),
            2 => Just(u64::MAX),
            1 => prop_oneof![Just(0x5555_5555_5555_5555u64), Just(0xaaaa_aaaa_aaaa_aaaa)],
            1 => (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(a, b, c, d, e, f)| a & b & c & d & e & f),
            2 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| a & b & c),
            1 => any::<u64>(),
            1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| a | b | c),
            1 => (0u32..64).prop_map(|b| 1u64 << b),
            1 => (0u32..64, 1u32..=64).prop_map(|(lo, len)| (u64::MAX >> (64 - len)) << lo.min(64 - len)),
        ]
    }

    /// A bitmap of `words` at a base that is often unaligned, cut to `pages` (often not
    /// a multiple of 64).
    fn bitmap_of(base: u64, pages: u64, mut words: Vec<u64>) -> DirtyBitmap {
        words.truncate(pages.div_ceil(64) as usize);
        words.resize(pages.div_ceil(64) as usize, 0);
        if let Some(last) = words.last_mut()
            && !pages.is_multiple_of(64)
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        DirtyBitmap::from_words(base..base + pages, words).unwrap()
    }

    /// Random bitmaps of up to ~6000 pages: enough at the smallest budgets for runs,
    /// stretches of raw words and sparse pages to cross many record boundaries.
    fn bitmap() -> impl Strategy<Value = DirtyBitmap> {
        (prop_oneof![Just(0u64), 0u64..200, (PFN_LIMIT - 8000)..(PFN_LIMIT - 6200)], 0u64..6000)
            .prop_flat_map(|(base, pages)| (Just(base), Just(pages), vec_of(word(), pages.div_ceil(64) as usize)))
            .prop_map(|(base, pages, words)| bitmap_of(base, pages, words))
    }

    /// The same bitmap, in long stretches of one shape each (clean, full, dense,
    /// sparse), so that a stretch spans whole records.
    fn stretchy_bitmap() -> impl Strategy<Value = DirtyBitmap> {
        (0u64..100, vec_of((word(), 1usize..300), 1..12), 0u64..64).prop_map(|(base, stretches, cut)| {
            let words: Vec<u64> = stretches.iter().flat_map(|&(w, n)| core::iter::repeat_n(w, n)).collect();
            let pages = (words.len() as u64 * 64).saturating_sub(cut);
            bitmap_of(base, pages, words)
        })
    }

    fn budget() -> impl Strategy<Value = usize> {
        prop_oneof![Just(MIN_RECORD_OPS), MIN_RECORD_OPS..200, 200..4000usize, Just(MAX_RECORD_OPS)]
    }

    /// Whether `b` has no word that either encoder sends raw (none of more than
    /// [`RAW_OPS`] operations, so no stretch of raw words opens): then they agree byte
    /// for byte.
    fn no_raw_word(b: &DirtyBitmap) -> bool {
        b.words().iter().all(|&w| w == u64::MAX || super::super::run_ops(w & !(w << 1), w) <= RAW_OPS)
    }

    fn size(records: &[DirtyRecord]) -> usize {
        records.iter().map(DirtyRecord::encoded_len).sum()
    }

    fn check(b: &DirtyBitmap, budget: usize) -> Result<(), TestCaseError> {
        let records: Vec<_> = b.records(budget).unwrap().collect();
        let reference: Vec<_> = b.records_reference(budget).collect();
        prop_assert!(records.iter().all(|r| !r.ops.is_empty() && r.ops.len() <= budget));
        prop_assert_eq!(&DirtyBitmap::from_records(b.pfns(), &records).unwrap(), b);
        prop_assert_eq!(records.is_empty(), reference.is_empty());
        if no_raw_word(b) {
            prop_assert_eq!(&records, &reference);
        } else {
            prop_assert!(
                size(&records) <= 3 * size(&reference) + 64,
                "{} bytes against the reference's {}",
                size(&records),
                size(&reference)
            );
        }
        Ok(())
    }

    /// Words of at most two runs (at most 4 operations), clean or fully dirty: no
    /// encoder sends them raw.
    fn run_word() -> impl Strategy<Value = u64> {
        word().prop_map(|w| {
            let (mut out, mut rest) = (0, w);
            for _ in 0..2 {
                if rest == 0 || rest == u64::MAX {
                    return out | rest;
                }
                let lo = rest.trailing_zeros();
                let run = (rest >> lo).trailing_ones();
                let m = crate::dirty::mask(lo, lo + run);
                out |= m;
                rest &= !m;
            }
            out
        })
    }

    /// Bitmaps of [`run_word`]s, as [`bitmap`] makes them.
    fn run_bitmap() -> impl Strategy<Value = DirtyBitmap> {
        (prop_oneof![Just(0u64), 0u64..200, (PFN_LIMIT - 8000)..(PFN_LIMIT - 6200)], 0u64..6000)
            .prop_flat_map(|(base, pages)| (Just(base), Just(pages), vec_of(run_word(), pages.div_ceil(64) as usize)))
            .prop_map(|(base, pages, words)| bitmap_of(base, pages, words))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

        #[test]
        fn records_match_the_reference(b in bitmap(), budget in budget()) {
            check(&b, budget)?;
            check(&b, MAX_RECORD_OPS)?;
        }

        #[test]
        fn records_of_runs_are_the_reference_byte_for_byte(b in run_bitmap(), budget in budget()) {
            prop_assert!(no_raw_word(&b));
            check(&b, budget)?;
            prop_assert_eq!(b.to_records(), b.to_records_reference());
        }

        #[test]
        fn records_match_the_reference_in_stretches(b in stretchy_bitmap(), budget in budget()) {
            check(&b, budget)?;
        }
    }

    #[test]
    fn fixed_shapes_match_the_reference() {
        let pages: u64 = 64 * 1500 + 17;
        let n = pages.div_ceil(64) as usize;
        let shapes = [
            vec![0; n],
            vec![u64::MAX; n],
            vec![0x5555_5555_5555_5555; n],
            vec![0xaaaa_aaaa_aaaa_aaaa; n],
            (0..n).map(|i| if i % 2 == 0 { u64::MAX } else { 0 }).collect(),
            (0..n as u64).map(|i| 1 << (i % 64)).collect(),
            (0..n as u64).map(|i: u64| (1 << 63) | i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect(),
        ];
        for words in shapes {
            for base in [0, 3, 64] {
                let b = bitmap_of(base, pages, words.clone());
                for budget in [MIN_RECORD_OPS, 100, MAX_RECORD_OPS] {
                    check(&b, budget).unwrap();
                }
            }
        }
        let empty = DirtyBitmap::new(0).unwrap();
        assert!(empty.to_records().is_empty() && empty.to_records_reference().is_empty());
    }
}

#[cfg(test)]
mod speed {
    extern crate std;
    use alloc::vec::Vec;
    use std::time::Duration;

    use crate::dirty::DirtyBitmap;

    /// This thread's time on a CPU so far (Linux): less disturbed by other load than
    /// the wall clock.
    fn cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        Duration::from_nanos(stat.split(' ').next().unwrap().parse().unwrap())
    }

    /// `cargo test --release -p wire --lib speed -- --ignored --nocapture`: the reference
    /// and today's encoder on 64 GiB at 1%, 10% and 100% random, alternately, medians.
    #[test]
    #[ignore]
    fn speed_against_the_reference() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let only: Option<u64> = std::env::var("SPEED_PERCENT").ok().and_then(|p| p.parse().ok());
        for percent in [1u64, 10, 100].into_iter().filter(|p| only.is_none_or(|o| o == *p)) {
            let words: Vec<u64> = (0..1u64 << 18)
                .map(|_| {
                    let mut w = 0;
                    for bit in 0..64 {
                        x ^= x >> 12;
                        x ^= x << 25;
                        x ^= x >> 27;
                        if percent == 100 || x.wrapping_mul(0x2545_f491_4f6c_dd1d) < u64::MAX / 100 * percent {
                            w |= 1 << bit;
                        }
                    }
                    w
                })
                .collect();
            let b = DirtyBitmap::from_words(0..1 << 24, words).unwrap();
            let (records, reference) = (b.to_records(), b.to_records_reference());
            assert_eq!(DirtyBitmap::from_records(b.pfns(), &records).unwrap(), b);
            let size = |r: &[crate::dirty::DirtyRecord]| r.iter().map(|r| r.encoded_len()).sum::<usize>();
            std::eprintln!(
                "{percent:>3}%: {} bytes encoded, reference {} ({:.3}x)",
                size(&records),
                size(&reference),
                size(&records) as f64 / size(&reference) as f64
            );
            // Blocks of calls, alternately, each timed in CPU time (which advances in
            // scheduler ticks, hence blocks): the average per call.
            let rounds: u32 = std::env::var("SPEED_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(8);
            let calls = if percent == 100 { 400 } else { 16 };
            let (mut new, mut old) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..rounds {
                let t = cpu();
                for _ in 0..calls {
                    core::hint::black_box(b.to_records());
                }
                new += cpu() - t;
                let t = cpu();
                for _ in 0..calls {
                    core::hint::black_box(b.to_records_reference());
                }
                old += cpu() - t;
            }
            let (new, old) = (new / (rounds * calls), old / (rounds * calls));
            std::eprintln!(
                "{percent:>3}%: new {new:?}, reference {old:?} (CPU time per call), ratio {:.3}",
                new.as_secs_f64() / old.as_secs_f64()
            );
        }
    }
}
