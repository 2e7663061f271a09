//! Dirty bitmaps and their records: every operation against a plain set of pfns,
//! record round trips of random bitmaps (identity), peek-and-clean, OR-merge after a
//! failed consumer, range errors, malformed records, and the exact bytes of the
//! encoding.

use std::collections::BTreeSet;
use std::ops::Range;

use proptest::collection::vec;
use proptest::prelude::*;
use wire::dirty::{
    DecodeFault, DirtyBitmap, DirtyError, DirtyRecord, MAX_RECORD_OPS, MIN_RECORD_OPS, PFN_LIMIT, RecordFault,
};
use wire::{ErrorCode, MAX_CHUNK_DATA, StreamChunk, StreamReassembler, StreamSender};

// ---------------------------------------------------------------------------------------
// Strategies

/// One word of a random bitmap, in one of the shapes that choose different encodings.
fn word() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        2 => Just(u64::MAX),
        // ~1.5%, ~12%, 50%, ~88% of bits
        1 => (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(a, b, c, d, e, f)| a & b & c & d & e & f),
        2 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| a & b & c),
        1 => any::<u64>(),
        1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| a | b | c),
        // single bits and single runs, at the word's edges too
        1 => (0u32..64).prop_map(|b| 1u64 << b),
        1 => (0u32..64, 1u32..=64).prop_map(|(lo, len)| (u64::MAX >> (64 - len)) << lo.min(64 - len)),
    ]
}

/// A bitmap of 0 to ~3000 pages at a random (often unaligned) base, random density.
fn bitmap() -> impl Strategy<Value = DirtyBitmap> {
    (prop_oneof![Just(0u64), 0u64..200, (PFN_LIMIT - 5000)..(PFN_LIMIT - 3200)], 0u64..3000)
        .prop_flat_map(|(base, pages)| (Just(base), Just(pages), vec(word(), pages.div_ceil(64) as usize)))
        .prop_map(|(base, pages, mut words)| {
            if let Some(last) = words.last_mut()
                && !pages.is_multiple_of(64)
            {
                *last &= (1u64 << (pages % 64)) - 1;
            }
            DirtyBitmap::from_words(base..base + pages, words).unwrap()
        })
}

/// A bitmap and a range inside it.
fn bitmap_and_range() -> impl Strategy<Value = (DirtyBitmap, Range<u64>)> {
    bitmap().prop_flat_map(|b| {
        let r = b.pfns();
        (Just(b), r.start..=r.end, r.start..=r.end).prop_map(|(b, x, y)| (b, x.min(y)..x.max(y)))
    })
}

fn set_of(b: &DirtyBitmap) -> BTreeSet<u64> {
    b.ones().collect()
}

/// The runs of a sorted set of pfns.
fn runs_of(set: &BTreeSet<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &p in set {
        match out.last_mut() {
            Some(r) if r.end == p => r.end += 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

fn round_trip(b: &DirtyBitmap, budget: usize) -> (Vec<DirtyRecord>, DirtyBitmap) {
    let records: Vec<DirtyRecord> = b.records(budget).unwrap().collect();
    let back = DirtyBitmap::from_records(b.pfns(), &records).unwrap();
    (records, back)
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Records → bitmap is the identity, with every budget; every record respects its
    /// budget, survives postcard, and holds at least one operation.
    #[test]
    fn record_round_trip_is_identity(b in bitmap(), budget in prop_oneof![
        Just(MAX_RECORD_OPS), MIN_RECORD_OPS..64usize, 64usize..2048,
    ]) {
        let (records, back) = round_trip(&b, budget);
        prop_assert_eq!(&back, &b);
        prop_assert_eq!(records.is_empty(), b.is_clean());
        for r in &records {
            prop_assert!(!r.ops.is_empty());
            prop_assert!(r.ops.len() <= budget, "{} > {budget}", r.ops.len());
            let bytes = r.encode_to_vec();
            prop_assert!(bytes.len() <= MAX_CHUNK_DATA);
            prop_assert_eq!(&bytes, &postcard::to_allocvec(r).unwrap());
            prop_assert_eq!(&DirtyRecord::decode(&bytes).unwrap(), r);
        }
        // Records are in pfn order and do not overlap: each applies alone, and together
        // they are the whole bitmap in any order.
        let mut reversed = records.clone();
        reversed.reverse();
        prop_assert_eq!(&DirtyBitmap::from_records(b.pfns(), &reversed).unwrap(), &b);
        prop_assert!(records.windows(2).all(|w| w[0].start < w[1].start));
    }

    /// Records apply into any bitmap that covers their pages, whatever its alignment.
    #[test]
    fn records_apply_at_any_alignment(b in bitmap(), below in 0u64..130, above in 0u64..130) {
        let Some(start) = b.pfns().start.checked_sub(below) else { return Ok(()) };
        let Ok(mut wide) = DirtyBitmap::covering(start..b.pfns().end + above) else { return Ok(()) };
        wide.or_merge_records(&b.to_records()).unwrap();
        prop_assert_eq!(wide.peek(b.pfns()).unwrap(), b.clone());
        prop_assert_eq!(wide.count_ones(), b.count_ones());
        let mut wide2 = DirtyBitmap::covering(wide.pfns()).unwrap();
        wide2.or_merge(&b).unwrap();
        prop_assert_eq!(wide2, wide);
    }

    /// The bitmap agrees with a set of pfns on every read.
    #[test]
    fn reads_agree_with_a_set(b in bitmap()) {
        let set = set_of(&b);
        prop_assert_eq!(b.count_ones(), set.len() as u64);
        prop_assert_eq!(b.is_clean(), set.is_empty());
        prop_assert_eq!(b.runs().collect::<Vec<_>>(), runs_of(&set));
        for p in b.pfns().step_by(7) {
            prop_assert_eq!(b.test(p).unwrap(), set.contains(&p));
        }
        prop_assert_eq!(DirtyBitmap::from_words(b.pfns(), b.words().to_vec()).unwrap(), b.clone());
    }

    /// Writes agree with a set of pfns.
    #[test]
    fn writes_agree_with_a_set((b, r) in bitmap_and_range(), set_not_clean in any::<bool>()) {
        let mut set = set_of(&b);
        let mut b2 = b.clone();
        if set_not_clean {
            b2.set_range(r.clone()).unwrap();
            set.extend(r.clone());
        } else {
            b2.clean(r.clone()).unwrap();
            set.retain(|p| !r.contains(p));
        }
        prop_assert_eq!(set_of(&b2), set);
    }

    /// Peek-and-clean returns exactly what was set in the range, leaves the range clean
    /// and everything else as it was; merging it back restores the bitmap.
    #[test]
    fn peek_and_clean_takes_exactly_the_range((b, r) in bitmap_and_range()) {
        let before = set_of(&b);
        let mut b2 = b.clone();
        let peeked = b2.peek(r.clone()).unwrap();
        let taken = b2.peek_and_clean(r.clone()).unwrap();
        prop_assert_eq!(&taken, &peeked);
        prop_assert_eq!(taken.pfns(), r.clone());
        prop_assert_eq!(set_of(&taken), before.iter().copied().filter(|p| r.contains(p)).collect::<BTreeSet<_>>());
        prop_assert!(b2.peek(r.clone()).unwrap().is_clean());
        prop_assert_eq!(set_of(&b2), before.iter().copied().filter(|p| !r.contains(p)).collect::<BTreeSet<_>>());
        // Taking an already clean range takes nothing.
        prop_assert!(b2.peek_and_clean(r.clone()).unwrap().is_clean());
        b2.or_merge(&taken).unwrap();
        prop_assert_eq!(b2, b);
    }

    /// A consumer takes a range, the guest keeps writing, the consumer fails and gives
    /// the bits back (as a bitmap or as records): no dirty page is lost.
    #[test]
    fn or_merge_restores_after_a_failed_consumer(
        (b, r) in bitmap_and_range(),
        writes in vec(any::<prop::sample::Index>(), 0..20),
        as_records in any::<bool>(),
    ) {
        let mut log = b.clone();
        let taken = log.peek_and_clean(r.clone()).unwrap();
        let mut expected = set_of(&b);
        let pfns = log.pfns();
        if pfns.end > pfns.start {
            for w in &writes {
                let p = pfns.start + w.index((pfns.end - pfns.start) as usize) as u64;
                log.set(p).unwrap();
                expected.insert(p);
            }
        }
        if as_records {
            log.or_merge_records(&taken.to_records()).unwrap();
        } else {
            log.or_merge(&taken).unwrap();
        }
        prop_assert_eq!(set_of(&log), expected);
    }

    /// Out-of-range pfns and ranges are errors and change nothing.
    #[test]
    fn out_of_range_is_an_error(b in bitmap(), off in 1u64..200) {
        let r = b.pfns();
        let mut b2 = b.clone();
        let past = r.end + off - 1;
        prop_assert_eq!(b2.set(past), Err(DirtyError::PfnOutOfRange { pfn: past, bitmap: r.clone() }));
        prop_assert_eq!(b2.test(past), Err(DirtyError::PfnOutOfRange { pfn: past, bitmap: r.clone() }));
        let wide = r.start..r.end + off;
        let oob = DirtyError::RangeOutOfBounds { range: wide.clone(), bitmap: r.clone() };
        prop_assert_eq!(b2.set_range(wide.clone()), Err(oob.clone()));
        prop_assert_eq!(b2.clean(wide.clone()), Err(oob.clone()));
        prop_assert_eq!(b2.peek(wide.clone()), Err(oob.clone()));
        prop_assert_eq!(b2.peek_and_clean(wide.clone()), Err(oob));
        if let Some(before) = r.start.checked_sub(off) {
            prop_assert_eq!(b2.set(before), Err(DirtyError::PfnOutOfRange { pfn: before, bitmap: r.clone() }));
            prop_assert!(b2.clean(before..r.end).is_err());
        }
        let backwards = r.end..r.start.saturating_sub(1);
        if backwards.start > backwards.end {
            prop_assert_eq!(b2.clean(backwards.clone()), Err(DirtyError::BadRange { range: backwards }));
        }
        // A bitmap that covers more is refused by or_merge, its records too if they
        // reach outside.
        let mut bigger = DirtyBitmap::covering(r.start..r.end + off).unwrap();
        bigger.set(past).unwrap();
        let refused = matches!(b2.or_merge(&bigger), Err(DirtyError::RangeOutOfBounds { .. }));
        prop_assert!(refused);
        prop_assert_eq!(
            b2.or_merge_records(&bigger.to_records()),
            Err(DirtyError::RecordOutOfRange { start: past, pfn: past, bitmap: r })
        );
        prop_assert_eq!(b2, b);
    }

    /// Arbitrary records never panic; a refused batch leaves the bitmap unchanged, an
    /// accepted one only adds pages.
    #[test]
    fn arbitrary_records_are_checked(
        b in bitmap(),
        raw in vec((prop_oneof![any::<u64>(), 0u64..4000], vec(any::<u8>(), 0..40)), 0..4),
    ) {
        let records: Vec<DirtyRecord> = raw.into_iter().map(|(start, ops)| DirtyRecord { start, ops }).collect();
        let mut b2 = b.clone();
        match b2.or_merge_records(&records) {
            Ok(()) => prop_assert!(set_of(&b).is_subset(&set_of(&b2))),
            Err(_) => prop_assert_eq!(b2, b),
        }
    }

    /// Arbitrary bytes never panic the record decoder; what decodes re-encodes to the
    /// same bytes.
    #[test]
    fn arbitrary_bytes_decode_or_fail(bytes in vec(any::<u8>(), 0..64)) {
        if let Ok(r) = DirtyRecord::decode(&bytes) {
            prop_assert_eq!(r.encode_to_vec(), bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Examples

#[test]
fn zero_pages_and_partial_words() {
    let b = DirtyBitmap::new(0).unwrap();
    assert!(b.is_clean());
    assert_eq!(b.words(), &[] as &[u64]);
    assert!(b.to_records().is_empty());
    assert_eq!(b.peek(0..0).unwrap(), b);
    assert_eq!(b.runs().next(), None);
    assert_eq!(b.ones().next(), None);

    let mut b = DirtyBitmap::new(65).unwrap();
    b.set(64).unwrap();
    assert_eq!(b.words(), &[0, 1]);
    assert_eq!(b.set(65), Err(DirtyError::PfnOutOfRange { pfn: 65, bitmap: 0..65 }));
    b.set_range(0..65).unwrap();
    assert_eq!(b.words(), &[u64::MAX, 1]);
    assert_eq!(DirtyBitmap::from_records(0..65, &b.to_records()).unwrap(), b);
}

#[test]
fn construction_errors() {
    let backwards = Range { start: 5, end: 4 };
    assert_eq!(DirtyBitmap::covering(backwards.clone()), Err(DirtyError::BadRange { range: backwards }));
    assert_eq!(DirtyBitmap::new(PFN_LIMIT + 1), Err(DirtyError::TooLarge { pfns: 0..PFN_LIMIT + 1 }));
    assert_eq!(
        DirtyBitmap::from_words(0..65, vec![0]),
        Err(DirtyError::WordCount { pages: 65, expected: 2, found: 1 })
    );
    assert_eq!(DirtyBitmap::from_words(0..65, vec![0, 2]), Err(DirtyError::TrailingBits { pages: 65, word: 2 }));
    assert!(DirtyBitmap::from_words(0..65, vec![0, 1]).is_ok());
    let b = DirtyBitmap::new(10).unwrap();
    assert_eq!(b.records(MIN_RECORD_OPS - 1).err(), Some(DirtyError::BudgetOutOfRange { budget: 15 }));
    assert_eq!(b.records(MAX_RECORD_OPS + 1).err(), Some(DirtyError::BudgetOutOfRange { budget: MAX_RECORD_OPS + 1 }));
}

#[test]
fn errors_read_as_sentences() {
    let cases = [
        (
            DirtyError::PfnOutOfRange { pfn: 0x400, bitmap: 0..0x400 },
            "pfn 0x400 is outside the dirty bitmap, which covers pfns 0x0..0x400",
        ),
        (
            DirtyError::RangeOutOfBounds { range: 0x10..0x500, bitmap: 0..0x400 },
            "pfn range 0x10..0x500 is not inside the dirty bitmap, which covers pfns 0x0..0x400",
        ),
        (
            DirtyError::BadRecord { start: 0x40, offset: 3, fault: RecordFault::ZeroCount },
            "the dirty record starting at pfn 0x40 is malformed at byte 3: an operation has a count of 0",
        ),
        (
            DirtyError::RecordOutOfRange { start: 0x40, pfn: 0x400, bitmap: 0..0x400 },
            "the dirty record starting at pfn 0x40 marks pfn 0x400 dirty, outside the bitmap's pfns 0x0..0x400",
        ),
        (
            DirtyError::Decode { len: 5, fault: DecodeFault::TrailingBytes { extra: 2 } },
            "5 bytes are not a dirty record: 2 unexpected bytes follow the record",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
        assert_eq!(e.to_reply().code, ErrorCode::BadRequest);
    }
}

#[test]
fn malformed_records_are_refused() {
    let mut b = DirtyBitmap::new(1000).unwrap();
    b.set(3).unwrap();
    let before = b.clone();
    let bad = |start, ops: &[u8]| DirtyRecord { start, ops: ops.to_vec() };
    let cases: [(DirtyRecord, DirtyError); 8] = [
        // DIRTY 0
        (bad(0, &[0x01]), DirtyError::BadRecord { start: 0, offset: 0, fault: RecordFault::ZeroCount }),
        // CLEAN 0 after a valid ONE 0
        (bad(0, &[0x02, 0x00]), DirtyError::BadRecord { start: 0, offset: 1, fault: RecordFault::ZeroCount }),
        // WORDS 0
        (bad(0, &[0x03]), DirtyError::BadRecord { start: 0, offset: 0, fault: RecordFault::ZeroCount }),
        // WORDS 1 with 7 of 8 bytes
        (
            bad(0, &[0x07, 1, 2, 3, 4, 5, 6, 7]),
            DirtyError::BadRecord { start: 0, offset: 0, fault: RecordFault::Truncated },
        ),
        // an unfinished varint
        (bad(0, &[0x02, 0x80]), DirtyError::BadRecord { start: 0, offset: 1, fault: RecordFault::Truncated }),
        // an over-long varint (ONE 0 as 82 00)
        (bad(0, &[0x82, 0x00]), DirtyError::BadRecord { start: 0, offset: 0, fault: RecordFault::BadVarint }),
        // CLEAN past u64::MAX
        (
            bad(u64::MAX - 1, &[0x08]),
            DirtyError::BadRecord { start: u64::MAX - 1, offset: 0, fault: RecordFault::Overflow },
        ),
        // a page past the bitmap, after a good one: nothing is applied
        (bad(10, &[0x02, 0xfe, 0x1f]), DirtyError::RecordOutOfRange { start: 10, pfn: 1034, bitmap: 0..1000 }),
    ];
    for (record, err) in cases {
        assert_eq!(b.or_merge_record(&record), Err(err), "{record:?}");
        assert_eq!(b, before);
    }
    // A raw word with a bit past the end of a partial last word.
    let mut small = DirtyBitmap::new(70).unwrap();
    let r = bad(64, &[0x07, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(small.or_merge_record(&r), Err(DirtyError::RecordOutOfRange { start: 64, pfn: 70, bitmap: 0..70 }));
    assert!(small.is_clean());
    // A good record first, a bad one second: the batch is refused as a whole.
    let good = bad(5, &[0x02]);
    assert!(b.or_merge_records(&[good.clone(), bad(0, &[0x01])]).is_err());
    assert_eq!(b, before);
    b.or_merge_records(&[good]).unwrap();
    assert!(b.test(5).unwrap());

    // Bytes that are not one canonical record.
    assert_eq!(
        DirtyRecord::decode(&[0x80, 0x00, 0x00]),
        Err(DirtyError::Decode { len: 3, fault: DecodeFault::NotCanonical })
    );
    assert_eq!(
        DirtyRecord::decode(&[0x00, 0x00, 0x00]),
        Err(DirtyError::Decode { len: 3, fault: DecodeFault::TrailingBytes { extra: 1 } })
    );
    assert!(matches!(
        DirtyRecord::decode(&[0x00, 0x05, 0x00]),
        Err(DirtyError::Decode { len: 3, fault: DecodeFault::Postcard(_) })
    ));
    assert!(DirtyRecord::decode(&[]).is_err());
}

/// The exact bytes of the encoding, one of each operation, as a test vector. These are
/// new types, so no protocol version changes; but once a consumer exists this is the
/// format it relies on, and this test is the guard.
#[test]
fn encoding_is_byte_exact() {
    let mut b = DirtyBitmap::new(512).unwrap();
    b.set(3).unwrap(); // ONE 3
    b.set_range(10..20).unwrap(); // ONE 6, DIRTY 9
    for p in (128..192).step_by(2) {
        b.set(p).unwrap(); // 32 isolated pages in one word: CLEAN 108, WORDS 1 + 8 bytes
    }
    b.set_range(256..512).unwrap(); // ONE 64, DIRTY 255
    let records = b.to_records();
    assert_eq!(records.len(), 1);
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x03,                   // start: pfn 3
        0x12,                   // 18 bytes of operations
        0x02,                   // ONE 0           (pfn 3)
        0x1a,                   // ONE 6           (pfn 10)
        0x25,                   // DIRTY 9         (pfns 11..20)
        0xb0, 0x03,             // CLEAN 108       (pfns 20..128)
        0x07,                   // WORDS 1         (pfns 128..192)
        0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
        0x82, 0x02,             // ONE 64          (pfns 192..256 clean, 256 dirty)
        0xfd, 0x07,             // DIRTY 255       (pfns 257..512)
    ];
    assert_eq!(records[0].encode_to_vec(), expected);
    assert_eq!(DirtyRecord::decode(expected).unwrap(), records[0]);
    assert_eq!(DirtyBitmap::from_records(0..512, &records).unwrap(), b);

    // A fully dirty 64 GiB guest is one 7-byte record.
    let mut all = DirtyBitmap::new(1 << 24).unwrap();
    all.set_range(0..1 << 24).unwrap();
    let records = all.to_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].encode_to_vec(), [0x00, 0x05, 0x02, 0xfd, 0xff, 0xff, 0x1f]);
}

/// Budgets split records at page boundaries.
#[test]
fn records_split_at_the_budget() {
    let mut b = DirtyBitmap::covering(1000..1000 + 64 * 1024).unwrap();
    for p in (1000..1000 + 64 * 1024).step_by(3) {
        b.set(p).unwrap();
    }
    for budget in [MIN_RECORD_OPS, 17, 100, 4096, MAX_RECORD_OPS] {
        let records: Vec<_> = b.records(budget).unwrap().collect();
        assert!(records.iter().all(|r| r.ops.len() <= budget && b.pfns().contains(&r.start)), "{budget}");
        assert_eq!(DirtyBitmap::from_records(b.pfns(), &records).unwrap(), b, "{budget}");
    }
    // Raw words (1 in 3 pages is above the break-even) at 8 bytes per 64 pages.
    let total: usize = b.to_records().iter().map(DirtyRecord::encoded_len).sum();
    assert!(total < 64 * 1024 / 8 + 64, "{total}");
}

/// The compactness the module docs promise.
#[test]
fn sizes_per_form() {
    let size = |b: &DirtyBitmap| b.to_records().iter().map(DirtyRecord::encoded_len).sum::<usize>();
    let pages = 1u64 << 20;
    // Sparse: one page in 20 is dirty, gaps below 32: one byte per dirty page.
    let mut b = DirtyBitmap::new(pages).unwrap();
    for p in (0..pages).step_by(20) {
        b.set(p).unwrap();
    }
    let dirty = b.count_ones() as usize;
    assert!(size(&b) <= dirty + dirty / 50, "{} for {dirty}", size(&b));
    // Runs: 256-page runs every 1024 pages: 4 bytes per run.
    let mut b = DirtyBitmap::new(pages).unwrap();
    for p in (0..pages).step_by(1024) {
        b.set_range(p..p + 256).unwrap();
    }
    assert!(size(&b) <= 4 * 1024 + 16, "{}", size(&b));
    // Dense: every other page: raw words, 1/8 byte per page plus a header per record.
    let mut b = DirtyBitmap::new(pages).unwrap();
    for p in (0..pages).step_by(2) {
        b.set(p).unwrap();
    }
    assert!(size(&b) <= pages as usize / 8 + 64, "{}", size(&b));
    // Random at 10%: nearly every word goes raw (more than 4 operations), in long
    // stretches, so the records come to the bitmap's size or a little less; sparse
    // words make up for the stretches' headers.
    let mut b = DirtyBitmap::new(pages).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(10) {
            b.set(p).unwrap();
        }
    }
    let dirty = b.count_ones() as usize;
    assert!(dirty > pages as usize / 11 && dirty < pages as usize / 9, "{dirty}");
    assert!(size(&b) <= pages as usize / 8, "{} for {dirty} dirty of {pages}", size(&b));
    assert!(size(&b) > pages as usize / 8 * 9 / 10, "{} for {dirty} dirty of {pages}", size(&b));
}

/// Records travel one per stream chunk.
#[test]
fn records_travel_in_stream_chunks() {
    let mut b = DirtyBitmap::new(1 << 22).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.set(x % (1 << 22)).unwrap();
    }
    let mut tx = StreamSender::new(9);
    let mut chunks: Vec<StreamChunk> =
        b.to_records().iter().map(|r| tx.chunk(r.encode_to_vec(), false).unwrap()).collect();
    assert!(chunks.len() > 1);
    chunks.push(tx.chunk(Vec::new(), true).unwrap());
    let mut rx = StreamReassembler::new(9);
    let mut got = DirtyBitmap::new(1 << 22).unwrap();
    for c in &chunks {
        let data = rx.accept(c).unwrap();
        assert!(data.len() <= MAX_CHUNK_DATA);
        if !data.is_empty() {
            got.or_merge_record(&DirtyRecord::decode(data).unwrap()).unwrap();
        }
    }
    assert!(rx.is_finished());
    assert_eq!(got, b);
}
