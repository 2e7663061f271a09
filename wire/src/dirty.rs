//! Dirty-page bitmaps for live migration and their compact wire records, written once
//! for the hypervisor core (which logs dirty pages into a [`DirtyBitmap`]) and for
//! `migration_svc` (which takes them with [`DirtyBitmap::peek_and_clean`], streams them
//! as [`DirtyRecord`]s and, when a round fails, gives them back with
//! [`DirtyBitmap::or_merge`] or [`DirtyBitmap::or_merge_records`]).
//!
//! This module is data structures and an encoding, nothing else: it does not drain PML
//! buffers, write-protect pages, lock anything or decide when a round ends. Every
//! operation is word-at-a-time (64 pages per step, whole-word fast paths for clean and
//! fully dirty words, `trailing_zeros` to find set bits), range-checked, and refused
//! with a typed [`DirtyError`] instead of panicking or dropping a bit.
//!
//! # The bitmap
//!
//! A [`DirtyBitmap`] covers a range of guest page frame numbers (4 KiB pages)
//! `base..base + pages`, one bit per page, bit `i % 64` of word `i / 64` for pfn
//! `base + i`; bits past the last page are always 0. Pfns are absolute everywhere: a
//! bitmap taken by [`DirtyBitmap::peek`] of `0x100..0x180` covers exactly those pfns, and
//! merging it back puts every bit where it came from. Bitmaps cover pfns below
//! [`PFN_LIMIT`] (2^40, a 52-bit guest-physical space).
//!
//! [`DirtyBitmap::peek_and_clean`] takes `&mut self`, so what it returns is exactly what
//! it cleared. The core is to call it after draining every vCPU's PML buffer, under the
//! same lock as the drain, so that no logged write falls between the two.
//!
//! # Records
//!
//! A bitmap travels as a sequence of [`DirtyRecord`]s, one per
//! [`StreamChunk`](crate::StreamChunk) of a stream. A record is self-contained: its
//! first pfn and a byte string of operations that walk a cursor forward from it. Records
//! never overlap and can be applied in any order; applying is an OR, so a record applied
//! twice does no harm. Pages no record mentions are clean.
//!
//! ```text
//!  postcard(DirtyRecord) = varint start | varint len | ops (len bytes)
//!
//!  op = varint (n << 2 | tag), then for WORDS 8·n bytes     cursor c starts at `start`
//!
//!  tag  name      meaning                                              cursor after
//!   0   CLEAN n   pages c .. c+n are clean (n ≥ 1)                      c + n
//!   1   DIRTY n   pages c .. c+n are dirty (n ≥ 1)                      c + n
//!   2   ONE n     pages c .. c+n are clean, page c+n is dirty (n ≥ 0)   c + n + 1
//!   3   WORDS n   n raw bitmap words follow, u64 little-endian:         c + 64·n
//!                 bit j of word k is page c + 64·k + j (n ≥ 1)
//! ```
//!
//! Varints are LEB128 as in postcard (7 bits per byte, least significant first, high bit
//! set on all but the last byte) and must be minimal. A header byte holds 5 bits of `n`,
//! so `n < 32` costs one byte, `n < 4096` two, `n < 2^19` three.
//!
//! This is the run-list, sparse-list and raw-words forms of a dirty log mixed at word
//! granularity, so that one record can describe a guest whose kernel text is clean, whose
//! heap is scattered and whose page cache is dirty in long runs, each part in a cheap
//! form:
//!
//! | form | ops | bytes | used for |
//! |---|---|---|---|
//! | runs | `ONE g`, then `DIRTY r-1` for a run of `r ≥ 2` pages after `g` clean ones | 2–4 per run, whatever its length | fully dirty words, and runs that make up words of at most 4 operations: a fully dirty 64 GiB guest is one 7-byte record |
//! | sparse | `ONE g` per isolated dirty page | 1 (gap < 32), 2 (< 4096), 3 (< 2^19) per page | words of at most 4 dirty pages (~6% density) |
//! | words | `CLEAN g` to the word, `WORDS n`, then the words | 8 per 64 pages, plus 1–3 per stretch | words of more than 4 operations, and the words after them of more than 2 |
//!
//! The encoder ([`DirtyBitmap::records`]) decides per bitmap word: a clean word costs
//! nothing (it lengthens the next gap), a fully dirty word lengthens the current run, and
//! a mixed word goes as its runs when they take at most 4 operations (one per run plus
//! one per run longer than a page), else it opens a stretch of raw words, which goes on
//! while the words that follow take more than 2. Those thresholds are chosen for speed,
//! not for the fewest bytes (which would be ~8 and ~5 operations): at 10% random density
//! nearly every word goes raw, copied 8 bytes at a time under one `WORDS` header per
//! stretch, instead of as ~6 one-byte `ONE`s found bit by bit. That costs 0.123 bytes per
//! page instead of the fewest, ~0.100 (2.05 MB instead of 1.69 MB for a 64 GiB guest, a
//! little under its 2 MiB bitmap, next to the ~6.9 GB of pages that round sends), and
//! takes a seventh of the time (see `wire/benches/dirty.rs`). Sparse bitmaps (1% random)
//! and clustered ones are encoded as before, within 0.2% of the fewest bytes.
//! Each record holds at most a byte budget of operations ([`MAX_RECORD_OPS`] by default,
//! so a record always fits one [`StreamChunk`](crate::StreamChunk)). A run is never split
//! between records; a stretch of raw words may be, at a word boundary. Each record starts
//! at its first dirty page (or raw word), so the gap before it costs nothing.
//!
//! Decoding checks every operation: truncation, non-minimal varints, zero counts, cursor
//! overflow, and dirty pages outside the target bitmap are refused with
//! [`DirtyError::BadRecord`] or [`DirtyError::RecordOutOfRange`] before any bit is set,
//! so a refused batch of records leaves the bitmap unchanged.
//!
//! # Checks
//!
//! - `cargo test -p wire --test dirty`: every read and write against a set of pfns;
//!   round trip bitmap → records → bitmap is the identity for random bitmaps (0 to 3000
//!   pages, any base, partial last words, every density shape, every budget);
//!   peek-and-clean takes exactly its range; OR-merge after a failed consumer loses
//!   nothing; range errors change nothing; arbitrary records and bytes are refused
//!   without panicking; the exact bytes of one record of each operation.
//! - `cargo bench -p wire --bench dirty`: a 64 GiB guest at 1%, 10% and 100% dirty,
//!   random and clustered, against a `memcpy` of its bitmap.
//!
//! # A round, and a failed one
//!
//! ```
//! use wire::dirty::{DirtyBitmap, DirtyRecord};
//! use wire::{StreamReassembler, StreamSender};
//!
//! // Core: the domain's log-dirty bitmap, 1 GiB of guest memory.
//! let mut log = DirtyBitmap::new(1 << 18)?;
//! log.set(7)?;
//! log.set_range(0x1000..0x1400)?;
//!
//! // migration_svc asks for peek-and-clean of a range; the core answers with the bits.
//! let taken = log.peek_and_clean(0..0x2000)?;
//! assert!(log.is_clean());
//!
//! // One record per chunk; the last chunk may be empty.
//! let mut tx = StreamSender::new(1);
//! let mut chunks = Vec::new();
//! for record in taken.to_records() {
//!     chunks.push(tx.chunk(record.encode_to_vec(), false)?);
//! }
//! chunks.push(tx.chunk(Vec::new(), true)?);
//!
//! // Receiver: a bitmap of the pages to expect.
//! let mut rx = StreamReassembler::new(1);
//! let mut expect = DirtyBitmap::new(1 << 18)?;
//! for chunk in &chunks {
//!     let data = rx.accept(chunk)?;
//!     if !data.is_empty() {
//!         expect.or_merge_record(&DirtyRecord::decode(data)?)?;
//!     }
//! }
//! assert_eq!(expect.peek(0..0x2000)?, taken);
//!
//! // Had the round failed, the sender gives the bits back; none is lost.
//! log.set(0x1fff)?; // written meanwhile
//! log.or_merge(&taken)?;
//! assert_eq!(log.count_ones(), 1 + 0x400 + 1);
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

mod error;
mod record;

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

pub use self::error::{DecodeFault, DirtyError, RecordFault};
pub use self::record::{DirtyRecord, MAX_RECORD_OPS, MIN_RECORD_OPS, Records};

/// The size of a guest page one bit stands for, in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// Bitmaps cover pfns below this: 2^40 pages of 4 KiB, a 52-bit guest-physical space
/// (the architectural maximum of EPT and NPT).
pub const PFN_LIMIT: u64 = 1 << 40;

const WORD_BITS: u64 = u64::BITS as u64;

/// One bit per guest page over a range of pfns; see the [module docs](self).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DirtyBitmap {
    base: u64,
    pages: u64,
    /// `pages.div_ceil(64)` words; bits at or past `pages` are 0.
    words: Vec<u64>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Two megabytes of words help nobody; the runs do, up to a point.
        let mut runs = self.runs();
        let shown: Vec<Range<u64>> = runs.by_ref().take(8).collect();
        let more = runs.count();
        f.debug_struct("DirtyBitmap")
            .field("pfns", &format_args!("{:#x}..{:#x}", self.base, self.end()))
            .field("dirty", &self.count_ones())
            .field("runs", &format_args!("{shown:x?}{}", if more > 0 { " ..." } else { "" }))
            .finish()
    }
}

impl DirtyBitmap {
    /// A clean bitmap over pfns `0..pages`.
    pub fn new(pages: u64) -> Result<Self, DirtyError> {
        Self::covering(0..pages)
    }

    /// A clean bitmap over `pfns`.
    pub fn covering(pfns: Range<u64>) -> Result<Self, DirtyError> {
        let pages = checked_len(&pfns)?;
        let words =
            usize::try_from(pages.div_ceil(WORD_BITS)).map_err(|_| DirtyError::TooLarge { pfns: pfns.clone() })?;
        Ok(Self { base: pfns.start, pages, words: zeroed_words(words)? })
    }

    /// A bitmap over `pfns` with the given words (bit `i % 64` of word `i / 64` is pfn
    /// `pfns.start + i`), e.g. one the core kept in its own buffer. There must be one
    /// word per 64 pages, rounded up, and no bit set past the last page.
    pub fn from_words(pfns: Range<u64>, words: Vec<u64>) -> Result<Self, DirtyError> {
        let pages = checked_len(&pfns)?;
        let expected = pages.div_ceil(WORD_BITS);
        if words.len() as u64 != expected {
            return Err(DirtyError::WordCount { pages, expected, found: words.len() });
        }
        if let Some(&word) = words.last()
            && word & !tail_mask(pages) != 0
        {
            return Err(DirtyError::TrailingBits { pages, word });
        }
        Ok(Self { base: pfns.start, pages, words })
    }

    /// The pfns this bitmap covers.
    pub const fn pfns(&self) -> Range<u64> {
        self.base..self.end()
    }

    /// The first pfn this bitmap covers.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// The number of pages (bits) this bitmap covers.
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// The words: bit `i % 64` of word `i / 64` is pfn `base + i`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, giving up the bitmap.
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Mark page `pfn` dirty.
    pub fn set(&mut self, pfn: u64) -> Result<(), DirtyError> {
        let bit = self.bit(pfn)?;
        if let Some(w) = self.words.get_mut(word_index(bit)) {
            *w |= 1 << (bit % WORD_BITS);
        }
        Ok(())
    }

    /// Mark dirty each pfn of `pfns` this bitmap covers (others are ignored); returns how
    /// many of them were clean before (a pfn given twice counts once). One comparison and
    /// one word per pfn, no `Result`: the PML drain marks up to 512 pages at a time here.
    pub fn set_each(&mut self, pfns: impl IntoIterator<Item = u64>) -> u64 {
        let mut newly = 0;
        for pfn in pfns {
            let bit = pfn.wrapping_sub(self.base);
            if bit < self.pages
                && let Some(w) = self.words.get_mut(word_index(bit))
            {
                let mask = 1 << (bit % WORD_BITS);
                newly += u64::from(*w & mask == 0);
                *w |= mask;
            }
        }
        newly
    }

    /// Mark every page in `pfns` dirty.
    pub fn set_range(&mut self, pfns: Range<u64>) -> Result<(), DirtyError> {
        let bits = self.bits(&pfns)?;
        fill(&mut self.words, bits, true);
        Ok(())
    }

    /// Whether page `pfn` is dirty.
    pub fn test(&self, pfn: u64) -> Result<bool, DirtyError> {
        let bit = self.bit(pfn)?;
        Ok(self.words.get(word_index(bit)).is_some_and(|w| (w >> (bit % WORD_BITS)) & 1 == 1))
    }

    /// The number of dirty pages.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// A copy of the bits of `pfns`, as a bitmap covering exactly `pfns`.
    pub fn peek(&self, pfns: Range<u64>) -> Result<DirtyBitmap, DirtyError> {
        let bits = self.bits(&pfns)?;
        let pages = bits.end - bits.start;
        // Lossless: at most PFN_LIMIT / 64 words, and this bitmap's own words fit `usize`.
        let n = pages.div_ceil(WORD_BITS) as usize;
        let first = word_index(bits.start);
        let mut words = zeroed_words(n)?;
        if bits.start.is_multiple_of(WORD_BITS) {
            if let Some(src) = self.words.get(first..first.saturating_add(n)) {
                words.copy_from_slice(src);
            }
        } else {
            for (k, w) in (0u64..).zip(words.iter_mut()) {
                *w = get_word(&self.words, bits.start + k * WORD_BITS);
            }
        }
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(pages);
        }
        Ok(DirtyBitmap { base: pfns.start, pages, words })
    }

    /// Mark every page in `pfns` clean.
    pub fn clean(&mut self, pfns: Range<u64>) -> Result<(), DirtyError> {
        let bits = self.bits(&pfns)?;
        fill(&mut self.words, bits, false);
        Ok(())
    }

    /// Take the bits of `pfns`: returns them as a bitmap covering exactly `pfns` and
    /// marks those pages clean. What is returned is exactly what was cleared.
    pub fn peek_and_clean(&mut self, pfns: Range<u64>) -> Result<DirtyBitmap, DirtyError> {
        let taken = self.peek(pfns.clone())?;
        let bits = self.bits(&pfns)?;
        fill(&mut self.words, bits, false);
        Ok(taken)
    }

    /// Mark dirty every page that is dirty in `other` (a bitmap taken from this one, say,
    /// that a consumer could not use). `other` must cover only pfns this bitmap covers.
    pub fn or_merge(&mut self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        let bits = self.bits(&other.pfns())?;
        if bits.start.is_multiple_of(WORD_BITS) {
            let first = word_index(bits.start);
            let dst = self.words.get_mut(first..).unwrap_or_default();
            for (d, s) in dst.iter_mut().zip(&other.words) {
                *d |= s;
            }
        } else {
            let mut at = bits.start;
            for &w in &other.words {
                or_word(&mut self.words, at, w);
                at += WORD_BITS;
            }
        }
        Ok(())
    }

    /// The dirty pages, lowest first.
    pub fn ones(&self) -> Ones<'_> {
        Ones { words: &self.words, base: self.base, idx: 0, cur: self.words.first().copied().unwrap_or(0) }
    }

    /// The maximal runs of dirty pages, lowest first.
    pub fn runs(&self) -> Runs<'_> {
        Runs { words: &self.words, base: self.base, idx: 0, cur: self.words.first().copied().unwrap_or(0) }
    }

    const fn end(&self) -> u64 {
        self.base + self.pages
    }

    /// The bit index of `pfn`.
    fn bit(&self, pfn: u64) -> Result<u64, DirtyError> {
        match pfn.checked_sub(self.base) {
            Some(bit) if bit < self.pages => Ok(bit),
            _ => Err(DirtyError::PfnOutOfRange { pfn, bitmap: self.pfns() }),
        }
    }

    /// The bit indices of `pfns`.
    fn bits(&self, pfns: &Range<u64>) -> Result<Range<u64>, DirtyError> {
        if pfns.start > pfns.end {
            return Err(DirtyError::BadRange { range: pfns.clone() });
        }
        if pfns.start < self.base || pfns.end > self.end() {
            return Err(DirtyError::RangeOutOfBounds { range: pfns.clone(), bitmap: self.pfns() });
        }
        Ok(pfns.start - self.base..pfns.end - self.base)
    }
}

/// The dirty pages of a bitmap, lowest first ([`DirtyBitmap::ones`]).
#[derive(Clone, Debug)]
pub struct Ones<'a> {
    words: &'a [u64],
    base: u64,
    idx: usize,
    /// The bits of `words[idx]` not yet returned.
    cur: u64,
}

impl Iterator for Ones<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.cur == 0 {
            self.idx = self.idx.checked_add(1)?;
            self.cur = *self.words.get(self.idx)?;
        }
        let bit = u64::from(self.cur.trailing_zeros());
        self.cur &= self.cur - 1;
        Some(self.base + self.idx as u64 * WORD_BITS + bit)
    }
}

/// The maximal runs of dirty pages of a bitmap, lowest first ([`DirtyBitmap::runs`]).
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    base: u64,
    idx: usize,
    /// The bits of `words[idx]` not yet returned.
    cur: u64,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        while self.cur == 0 {
            self.idx = self.idx.checked_add(1)?;
            self.cur = *self.words.get(self.idx)?;
        }
        let (lo, len) = first_run(self.cur);
        let start = self.base + self.idx as u64 * WORD_BITS + u64::from(lo);
        let mut end = start + u64::from(len);
        if lo + len < u64::BITS {
            self.cur &= !mask(lo, lo + len);
            return Some(start..end);
        }
        // The run reaches the end of the word: follow it through the next words.
        loop {
            self.idx = self.idx.saturating_add(1);
            match self.words.get(self.idx) {
                Some(&u64::MAX) => end += WORD_BITS,
                Some(&w) => {
                    let n = w.trailing_ones();
                    end += u64::from(n);
                    self.cur = if n == 0 { w } else { w & !mask(0, n) };
                    return Some(start..end);
                }
                None => {
                    self.cur = 0;
                    return Some(start..end);
                }
            }
        }
    }
}

/// The length of `pfns`, if a bitmap may cover them.
fn checked_len(pfns: &Range<u64>) -> Result<u64, DirtyError> {
    if pfns.start > pfns.end {
        return Err(DirtyError::BadRange { range: pfns.clone() });
    }
    if pfns.end > PFN_LIMIT {
        return Err(DirtyError::TooLarge { pfns: pfns.clone() });
    }
    Ok(pfns.end - pfns.start)
}

/// The index of the word holding bit `bit`. Lossless: bitmaps have at most `PFN_LIMIT / 64` words and their size was checked to
/// fit `usize` when they were made.
const fn word_index(bit: u64) -> usize {
    (bit / WORD_BITS) as usize
}

/// Bits `lo..hi` of a word, `lo < hi <= 64`.
const fn mask(lo: u32, hi: u32) -> u64 {
    (u64::MAX >> (u64::BITS - (hi - lo))) << lo
}

/// The bits of the last word of a `pages`-page bitmap that stand for pages.
const fn tail_mask(pages: u64) -> u64 {
    match pages % WORD_BITS {
        0 => u64::MAX,
        n => mask(0, n as u32),
    }
}

/// The lowest run of ones in `w != 0`: (its first bit, its length).
const fn first_run(w: u64) -> (u32, u32) {
    let lo = w.trailing_zeros();
    (lo, (w >> lo).trailing_ones())
}

/// Set (or clear) bits `bits` of `words`; they must be inside `words`.
fn fill(words: &mut [u64], bits: Range<u64>, value: bool) {
    if bits.start >= bits.end {
        return;
    }
    let apply = |w: &mut u64, m: u64| {
        if value {
            *w |= m;
        } else {
            *w &= !m;
        }
    };
    let (first, last) = (word_index(bits.start), word_index(bits.end - 1));
    let (lo, hi) = ((bits.start % WORD_BITS) as u32, ((bits.end - 1) % WORD_BITS) as u32 + 1);
    if first == last {
        if let Some(w) = words.get_mut(first) {
            apply(w, mask(lo, hi));
        }
        return;
    }
    if let Some(w) = words.get_mut(first) {
        apply(w, mask(lo, u64::BITS));
    }
    if let Some(middle) = words.get_mut(first + 1..last) {
        middle.fill(if value { u64::MAX } else { 0 });
    }
    if let Some(w) = words.get_mut(last) {
        apply(w, mask(0, hi));
    }
}

/// The 64 bits of `words` from bit `bit` on (bits past the end read as 0).
fn get_word(words: &[u64], bit: u64) -> u64 {
    let i = word_index(bit);
    let shift = (bit % WORD_BITS) as u32;
    let lo = words.get(i).copied().unwrap_or(0);
    if shift == 0 {
        return lo;
    }
    let hi = words.get(i + 1).copied().unwrap_or(0);
    lo >> shift | hi << (u64::BITS - shift)
}

/// OR `value` into the 64 bits of `words` from bit `bit` on. The caller has checked
/// that every set bit of `value` lands inside `words`.
fn or_word(words: &mut [u64], bit: u64, value: u64) {
    if value == 0 {
        return;
    }
    let i = word_index(bit);
    let shift = (bit % WORD_BITS) as u32;
    if let Some(w) = words.get_mut(i) {
        *w |= value << shift;
    }
    if shift != 0
        && let Some(w) = words.get_mut(i + 1)
    {
        *w |= value >> (u64::BITS - shift);
    }
}

/// `n` zero words, or [`DirtyError::OutOfMemory`]: a bitmap's size follows from a
/// request (a domain's size, a stream header), so its allocation must not abort the
/// hypervisor when the heap cannot hold it.
fn zeroed_words(n: usize) -> Result<Vec<u64>, DirtyError> {
    let mut words = Vec::new();
    words.try_reserve_exact(n).map_err(|_| DirtyError::OutOfMemory { bytes: n.saturating_mul(8) })?;
    words.resize(n, 0);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn set_each_marks_covered_pfns_and_counts_the_new_ones() {
        let mut b = DirtyBitmap::covering(100..300).unwrap();
        b.set(150).unwrap();
        // Outside (below, at the end, far above), already set, twice, both ends.
        let newly = b.set_each([99, 300, u64::MAX, 150, 164, 164, 100, 299, 200]);
        assert_eq!(newly, 4);
        assert_eq!(b.ones().collect::<Vec<_>>(), [100, 150, 164, 200, 299]);
        assert_eq!(b.set_each(core::iter::empty()), 0);
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0, 64), u64::MAX);
        assert_eq!(mask(0, 1), 1);
        assert_eq!(mask(63, 64), 1 << 63);
        assert_eq!(mask(4, 8), 0xf0);
        assert_eq!(tail_mask(0), u64::MAX);
        assert_eq!(tail_mask(64), u64::MAX);
        assert_eq!(tail_mask(65), 1);
        assert_eq!(tail_mask(3), 0b111);
        assert_eq!(first_run(0b0111_0100), (2, 1));
        assert_eq!(first_run(0b0111_0000), (4, 3));
        assert_eq!(first_run(u64::MAX), (0, 64));
        assert_eq!(first_run(1 << 63), (63, 1));
    }

    #[test]
    fn unaligned_word_access() {
        let words = [0x8000_0000_0000_0001, 0x0000_0000_0000_00ff];
        assert_eq!(get_word(&words, 0), words[0]);
        assert_eq!(get_word(&words, 63), 0x1ff);
        assert_eq!(get_word(&words, 64), 0xff);
        assert_eq!(get_word(&words, 120), 0);
        assert_eq!(get_word(&words, 1000), 0);
        let mut out = [0u64; 2];
        or_word(&mut out, 60, 0xff);
        assert_eq!(out, [0xf000_0000_0000_0000, 0xf]);
        or_word(&mut out, 64, 1 << 63);
        assert_eq!(out, [0xf000_0000_0000_0000, 0x8000_0000_0000_000f]);
    }

    #[test]
    fn fill_within_and_across_words() {
        let mut w = [0u64; 4];
        fill(&mut w, 3..5, true);
        assert_eq!(w, [0b11000, 0, 0, 0]);
        fill(&mut w, 60..200, true);
        assert_eq!(w, [0xf000_0000_0000_0018, u64::MAX, u64::MAX, 0xff]);
        fill(&mut w, 4..193, false);
        assert_eq!(w, [0b1000, 0, 0, 0xfe]);
        fill(&mut w, 10..10, true);
        assert_eq!(w, [0b1000, 0, 0, 0xfe]);
    }

    #[test]
    fn runs_cross_words() {
        let mut b = DirtyBitmap::covering(10..300).unwrap();
        b.set_range(70..200).unwrap();
        b.set(11).unwrap();
        b.set(299).unwrap();
        assert_eq!(b.runs().collect::<Vec<_>>(), [11..12, 70..200, 299..300]);
        assert_eq!(b.ones().count(), 132);
        assert_eq!(b.count_ones(), 132);
        let dbg = format!("{b:?}");
        assert_eq!(dbg, "DirtyBitmap { pfns: 0xa..0x12c, dirty: 132, runs: [b..c, 46..c8, 12b..12c] }");
    }
}
