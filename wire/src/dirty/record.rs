//! [`DirtyRecord`]: the wire form of a dirty bitmap, the encoder ([`Records`]) and the
//! checked decoder. The encoding and the reasons for it are in the [module docs](super).

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use serde::{Deserialize, Serialize};

use super::{DecodeFault, DirtyBitmap, DirtyError, RecordFault, WORD_BITS, fill, mask, or_word, word_index};
use crate::MAX_CHUNK_DATA;

/// The most operation bytes one record may hold so that its postcard encoding (start
/// varint up to 10 bytes, length varint 3 bytes) fits one
/// [`StreamChunk`](crate::StreamChunk): [`MAX_CHUNK_DATA`] minus 16.
pub const MAX_RECORD_OPS: usize = MAX_CHUNK_DATA - 16;

/// The least operation bytes a record budget may be: room for the largest single
/// operation pair (`ONE` and `DIRTY` with 42-bit counts, 6 bytes each) or one `WORDS`
/// header and word.
pub const MIN_RECORD_OPS: usize = 16;

const CLEAN: u64 = 0;
const DIRTY: u64 = 1;
const ONE: u64 = 2;
const WORDS: u64 = 3;
const WORD_BYTES: usize = 8;
/// Room for the operations of any one bitmap word (see `Records::mixed`).
const FAST_ROOM: usize = 6 + 32 * 4;
/// A mixed word (neither clean nor fully dirty) goes as runs when they take at most
/// this many operations, else it opens a stretch of raw words. Chosen for speed, not
/// the fewest bytes (which would be ~9): see the [module docs](super).
const RAW_OPS: u32 = 4;
/// A word right after a raw word goes raw too above this many operations (the fewest
/// bytes would be ~5), so that stretches are long and seldom broken.
const STAY_RAW_OPS: u32 = 2;

/// A stretch of a dirty bitmap in wire form: the first pfn and the operations that walk
/// from it (see the [module docs](super)). One record per
/// [`StreamChunk`](crate::StreamChunk), encoded with [`DirtyRecord::encode_to_vec`].
///
/// The fields are public so that anything can be built and sent; whatever arrives is
/// checked when it is applied ([`DirtyBitmap::or_merge_records`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirtyRecord {
    /// The pfn the operations start from.
    pub start: u64,
    /// The operations.
    #[serde(with = "crate::bytes")]
    pub ops: Vec<u8>,
}

impl fmt::Debug for DirtyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DirtyRecord");
        d.field("start", &format_args!("{:#x}", self.start));
        match self.ops.get(..16) {
            Some(head) if self.ops.len() > 16 => {
                d.field("ops", &format_args!("{} bytes {:02x?}...", self.ops.len(), head))
            }
            _ => d.field("ops", &format_args!("{:02x?}", self.ops)),
        };
        d.finish()
    }
}

impl DirtyRecord {
    /// The record's postcard encoding, the data of one stream chunk. At most
    /// [`MAX_CHUNK_DATA`] bytes when `ops` is at most [`MAX_RECORD_OPS`] bytes.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        put_varint(&mut out, self.start);
        put_varint(&mut out, self.ops.len() as u64);
        out.extend_from_slice(&self.ops);
        out
    }

    /// The length of [`encode_to_vec`](Self::encode_to_vec)'s output.
    pub fn encoded_len(&self) -> usize {
        varint_len(self.start) + varint_len(self.ops.len() as u64) + self.ops.len()
    }

    /// The record in `bytes`, which must hold exactly one in canonical form. The
    /// operations are not checked here but when the record is applied.
    pub fn decode(bytes: &[u8]) -> Result<Self, DirtyError> {
        let err = |fault| DirtyError::Decode { len: bytes.len(), fault };
        match postcard::take_from_bytes::<Self>(bytes) {
            Ok((record, [])) if record.encoded_len() == bytes.len() => Ok(record),
            Ok((_, [])) => Err(err(DecodeFault::NotCanonical)),
            Ok((_, rest)) => Err(err(DecodeFault::TrailingBytes { extra: rest.len() })),
            Err(e) => Err(err(DecodeFault::Postcard(e))),
        }
    }

    /// Walk the operations, handing each dirty stretch to `f` after checking the
    /// operation itself. Inlined so that `f` is too: it runs once per operation.
    #[inline(always)]
    fn walk<'a>(&'a self, mut f: impl FnMut(Piece<'a>) -> Result<(), DirtyError>) -> Result<(), DirtyError> {
        let mut at = 0usize;
        let mut cursor = self.start;
        while at < self.ops.len() {
            let op_at = at;
            let bad = |fault| DirtyError::BadRecord { start: self.start, offset: op_at, fault };
            let v = get_varint(&self.ops, &mut at).map_err(bad)?;
            let n = v >> 2;
            let tag = v & 3;
            if n == 0 && tag != ONE {
                return Err(bad(RecordFault::ZeroCount));
            }
            let overflow = || bad(RecordFault::Overflow);
            // `ONE` first: it is the most frequent operation, and a chain of compares
            // predicts better than the jump table a `match` becomes.
            if tag == ONE {
                let page = cursor.checked_add(n).ok_or_else(overflow)?;
                let end = page.checked_add(1).ok_or_else(overflow)?;
                f(Piece::Run(page..end))?;
                cursor = end;
            } else if tag == DIRTY {
                let end = cursor.checked_add(n).ok_or_else(overflow)?;
                f(Piece::Run(cursor..end))?;
                cursor = end;
            } else if tag == CLEAN {
                cursor = cursor.checked_add(n).ok_or_else(overflow)?;
            } else {
                let end = n.checked_mul(WORD_BITS).and_then(|pages| cursor.checked_add(pages));
                let end = end.ok_or_else(overflow)?;
                let bytes = usize::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_mul(WORD_BYTES))
                    .and_then(|len| self.ops.get(at..at.checked_add(len)?))
                    .ok_or(bad(RecordFault::Truncated))?;
                at += bytes.len();
                f(Piece::Words { start: cursor, bytes })?;
                cursor = end;
            }
        }
        Ok(())
    }
}

/// A dirty stretch described by one operation.
enum Piece<'a> {
    /// Every page in the range is dirty.
    Run(Range<u64>),
    /// Raw words, little-endian, the first bit standing for page `start`.
    Words { start: u64, bytes: &'a [u8] },
}

impl DirtyBitmap {
    /// The bitmap as records of at most `budget` operation bytes each (use
    /// [`MAX_RECORD_OPS`] for records that fill stream chunks), produced as they are
    /// needed: memory stays at about two records whatever the bitmap's size.
    pub fn records(&self, budget: usize) -> Result<Records<'_>, DirtyError> {
        if !(MIN_RECORD_OPS..=MAX_RECORD_OPS).contains(&budget) {
            return Err(DirtyError::BudgetOutOfRange { budget });
        }
        Ok(Records {
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
            used: 0,
            ready: VecDeque::new(),
            done: false,
        })
    }

    /// The bitmap as records that each fit one stream chunk (budget
    /// [`MAX_RECORD_OPS`]). A clean bitmap gives no record.
    pub fn to_records(&self) -> Vec<DirtyRecord> {
        self.records(MAX_RECORD_OPS).map(Iterator::collect).unwrap_or_default()
    }

    /// A bitmap over `pfns` with exactly the pages `records` mark dirty.
    pub fn from_records(pfns: Range<u64>, records: &[DirtyRecord]) -> Result<Self, DirtyError> {
        let mut b = Self::covering(pfns)?;
        b.or_merge_records(records)?;
        Ok(b)
    }

    /// Mark dirty every page `record` marks dirty; see
    /// [`or_merge_records`](Self::or_merge_records).
    pub fn or_merge_record(&mut self, record: &DirtyRecord) -> Result<(), DirtyError> {
        self.or_merge_records(core::slice::from_ref(record))
    }

    /// Mark dirty every page `records` mark dirty (records a consumer could not use, or
    /// that arrived from the source). Every record is checked before any bit is set: on
    /// error the bitmap is unchanged.
    pub fn or_merge_records(&mut self, records: &[DirtyRecord]) -> Result<(), DirtyError> {
        let pfns = self.pfns();
        for r in records {
            r.walk(|piece| {
                let out = |pfn| DirtyError::RecordOutOfRange { start: r.start, pfn, bitmap: pfns.clone() };
                match piece {
                    Piece::Run(run) if run.start < pfns.start || run.start >= pfns.end => Err(out(run.start)),
                    Piece::Run(run) if run.end > pfns.end => Err(out(pfns.end)),
                    Piece::Run(_) => Ok(()),
                    Piece::Words { start, bytes } => {
                        let (words, _) = bytes.as_chunks::<WORD_BYTES>();
                        for (k, w) in words.iter().enumerate() {
                            let w = u64::from_le_bytes(*w);
                            if w == 0 {
                                continue;
                            }
                            // `walk` checked that `start + 64 * words.len()` does not overflow.
                            let at = start + k as u64 * WORD_BITS;
                            let (lo, hi) = (at + u64::from(w.trailing_zeros()), at + 63 - u64::from(w.leading_zeros()));
                            if lo < pfns.start {
                                return Err(out(lo));
                            }
                            if hi >= pfns.end {
                                return Err(out(hi));
                            }
                        }
                        Ok(())
                    }
                }
            })?;
        }
        for r in records {
            r.walk(|piece| {
                match piece {
                    Piece::Run(run) => {
                        let bits = run.start - self.base..run.end - self.base;
                        if bits.end - bits.start == 1 {
                            if let Some(w) = self.words.get_mut(word_index(bits.start)) {
                                *w |= 1 << (bits.start % WORD_BITS);
                            }
                        } else {
                            fill(&mut self.words, bits, true);
                        }
                    }
                    Piece::Words { start, bytes } => {
                        let bit = start - self.base;
                        let (words, _) = bytes.as_chunks::<WORD_BYTES>();
                        if bit.is_multiple_of(WORD_BITS) {
                            let dst = self.words.get_mut(word_index(bit)..).unwrap_or_default();
                            for (d, s) in dst.iter_mut().zip(words) {
                                *d |= u64::from_le_bytes(*s);
                            }
                        } else {
                            for (k, s) in words.iter().enumerate() {
                                or_word(&mut self.words, bit + k as u64 * WORD_BITS, u64::from_le_bytes(*s));
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The records of a bitmap, lowest pfns first ([`DirtyBitmap::records`]).
pub struct Records<'a> {
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
    /// its operations: the first `used` bytes of `ops`, a zeroed buffer of `budget +
    /// SLACK` bytes (empty until the record's first operation), so that the operations
    /// of a word can be stored without a length check or a reallocation per byte.
    start: u64,
    cursor: u64,
    ops: Vec<u8>,
    used: usize,
    /// Finished records not yet returned.
    ready: VecDeque<DirtyRecord>,
    done: bool,
}

/// The bytes of a record's buffer past its budget: the operations of one word are
/// stored in a window of this size starting at the record's end (see `Records::runs`),
/// at indices masked with [`WRAP`] so that the compiler sees every store in bounds.
const SLACK: usize = 512;
const WRAP: usize = SLACK / 2 - 1;
const _: () = assert!(SLACK.is_power_of_two() && FAST_ROOM + 10 <= WRAP);

impl fmt::Debug for Records<'_> {
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

impl Iterator for Records<'_> {
    type Item = DirtyRecord;

    fn next(&mut self) -> Option<DirtyRecord> {
        while self.ready.is_empty() && !self.done {
            self.step();
        }
        self.ready.pop_front()
    }
}

impl Records<'_> {
    /// Encode words until a record is finished or the words end.
    fn step(&mut self) {
        let words = self.words;
        while self.ready.is_empty() {
            if self.lit_len == 0 && self.used > 0 {
                self.fast();
            }
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
        // Count the operations its runs take (one `ONE` per run, one `DIRTY` more per run
        // longer than a page; a run continuing from the previous word costs nothing): raw
        // above `RAW_OPS`, or above `STAY_RAW_OPS` right after a raw word, as in `fast`.
        let carry = !self.run.is_empty() && self.run.end == page;
        let starts = w & !(w << 1 | u64::from(carry));
        let ops = run_ops(starts, w);
        let continues = self.lit_len > 0 && self.lit_first + self.lit_len + 1 == self.next;
        if ops > if continues { STAY_RAW_OPS } else { RAW_OPS } {
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
        if !self.run.is_empty() {
            self.flush_run();
        }
        // With room for the worst case of a word (a 6-byte gap, then 32 runs of 4 bytes
        // at most), skip the budget check per run.
        if self.used > 0 && self.used + FAST_ROOM <= self.budget {
            self.runs(rest, page);
            return;
        }
        while rest != 0 {
            let lo = rest.trailing_zeros();
            let len = (rest >> lo).trailing_ones();
            let at = page + u64::from(lo);
            self.run = at..at + u64::from(len);
            if lo + len == u64::BITS {
                // It may go on into the next word.
                return;
            }
            // Clear the lowest run: adding its lowest bit carries through it.
            rest &= rest + (1 << lo);
            self.flush_run();
        }
    }

    /// Encode words into the current record while it has room to spare and no raw words
    /// are pending: every kind of word in one loop over locals (the common case, all but
    /// the last ~150 bytes of each record). Stops before a word it cannot be sure of
    /// fitting; [`step`](Self::step) and [`mixed`](Self::mixed) take it from there with
    /// a check per operation. Makes the same choices as they do, per word: clean words
    /// lengthen the gap, fully dirty ones the run, words of at most [`RAW_OPS`]
    /// operations go as runs, the others open a stretch of raw words, which takes every
    /// word that follows of more than [`STAY_RAW_OPS`] operations in one go.
    fn fast(&mut self) {
        let words = self.words;
        // Room for a pending run's operations (6 bytes each at most) and then a word's.
        let limit = self.budget.saturating_sub(FAST_ROOM + 12);
        let (mut next, mut cursor, mut used) = (self.next, self.cursor, self.used);
        let (mut rs, mut re) = (self.run.start, self.run.end);
        while used <= limit {
            let Some(&w) = words.get(next) else { break };
            let Some(Ok(out)) = self.ops.get_mut(used..used + SLACK).map(<&mut [u8; SLACK]>::try_from) else {
                // Not reached: a started record's buffer is `budget + SLACK` bytes.
                break;
            };
            let page = self.base + next as u64 * WORD_BITS;
            // The words of a sparse bitmap, clean or one dirty page (not the last, which
            // may start a run), with no run pending and a gap below 2^12: one path, no
            // branch between the two. A clean word stores a `ONE` it does not count.
            let lo = u64::from((w | 1 << 63).trailing_zeros());
            let gap = page + lo - cursor;
            if w & w.wrapping_sub(1) == 0 && w >> 63 == 0 && rs == re && gap < 1 << 12 {
                let dirty = w != 0;
                used += put_short(out, 0, gap << 2 | ONE) * usize::from(dirty);
                cursor = if dirty { page + lo + 1 } else { cursor };
                next += 1;
                continue;
            }
            if w == 0 {
                // A long clean stretch: skip it at once.
                let rest = words.get(next + 1..).unwrap_or_default();
                next += 1 + rest.iter().position(|&w| w != 0).unwrap_or(rest.len());
                continue;
            }
            let carry = rs != re && re == page;
            let starts = w & !(w << 1 | u64::from(carry));
            if w != u64::MAX && run_ops(starts, w) <= RAW_OPS {
                // As runs.
                next += 1;
                let mut rest = w;
                if carry && rest & 1 == 1 {
                    // The pending run goes on into this word (not to its end: `w` is mixed).
                    let n = rest.trailing_ones();
                    re += u64::from(n);
                    rest &= !mask(0, n);
                }
                if rest == 0 {
                    continue;
                }
                let mut n = 0;
                if rs != re {
                    n = put_run(out, n, rs..re, cursor);
                    cursor = re;
                    (rs, re) = (0, 0);
                }
                let (pending, c, m) = word_runs(out, rest, page, cursor, n);
                if let Some(r) = pending {
                    (rs, re) = (r.start, r.end);
                }
                used += m;
                cursor = c;
                continue;
            }
            // A fully dirty word or a stretch of raw ones: the pending run first, unless
            // the fully dirty words lengthen it.
            let mut n = 0;
            if rs != re && !(carry && w == u64::MAX) {
                n = put_run(out, n, rs..re, cursor);
                cursor = re;
                (rs, re) = (0, 0);
            }
            let rest = words.get(next + 1..).unwrap_or_default();
            if w == u64::MAX {
                let full = 1 + rest.iter().position(|&w| w != u64::MAX).unwrap_or(rest.len());
                if rs == re {
                    rs = page;
                }
                next += full;
                re = page + full as u64 * WORD_BITS;
                used += n;
                continue;
            }
            // The run is stored: count it, whatever follows.
            used += n;
            let gap = page - cursor;
            let mut h = 0;
            if gap > 0 {
                h = put_varint_at(out, h + n, gap << 2 | CLEAN) - n;
            }
            // As many raw words as follow and fit (at least 1: `limit` leaves room),
            // under one `WORDS` header of at most 3 bytes (the budget is below 2^16).
            let fit = self.budget.saturating_sub(used + h + 3) / WORD_BYTES;
            if fit == 0 {
                // Not reached; the general path would start a record for the word.
                break;
            }
            let more = rest.iter().take(fit - 1).position(|&w| !goes_raw(w));
            let count = 1 + more.unwrap_or(rest.len().min(fit - 1));
            h = put_varint_at(out, h + n, (count as u64) << 2 | WORDS) - n;
            let at = used + h;
            let (Some(src), Some(dst)) = (words.get(next..next + count), self.ops.get_mut(at..at + count * WORD_BYTES))
            else {
                // Not reached: `count` words are there and fit. The headers stay uncounted.
                break;
            };
            for (d, s) in dst.as_chunks_mut::<WORD_BYTES>().0.iter_mut().zip(src) {
                *d = s.to_le_bytes();
            }
            used = at + count * WORD_BYTES;
            next += count;
            cursor = page + count as u64 * WORD_BITS;
        }
        (self.next, self.cursor, self.used, self.run) = (next, cursor, used, rs..re);
    }

    /// Encode the runs of `rest` (not 0), the dirty pages from `page` on, into the
    /// current record, which has room for them; keep the last one pending if it reaches
    /// the word's end.
    #[inline]
    fn runs(&mut self, rest: u64, page: u64) {
        let at = self.used;
        let Some(Ok(out)) = self.ops.get_mut(at..at + SLACK).map(<&mut [u8; SLACK]>::try_from) else {
            // Not reached: a record's buffer is `budget + SLACK` bytes.
            return;
        };
        let (pending, cursor, n) = word_runs(out, rest, page, self.cursor, 0);
        if let Some(r) = pending {
            self.run = r;
        }
        self.used += n;
        self.cursor = cursor;
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
        self.put(gap << 2 | ONE);
        if more > 0 {
            self.put(more << 2 | DIRTY);
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
            let used = self.used + clean_len(gap) + header;
            let n = (self.budget.saturating_sub(used) / WORD_BYTES).clamp(1, left);
            if gap > 0 {
                self.put(gap << 2 | CLEAN);
            }
            self.put((n as u64) << 2 | WORDS);
            let words = self.words.get(first..first + n).unwrap_or_default();
            let at = self.used;
            let out = self.ops.get_mut(at..at + n * WORD_BYTES).unwrap_or_default();
            for (o, w) in out.as_chunks_mut::<WORD_BYTES>().0.iter_mut().zip(words) {
                *o = w.to_le_bytes();
            }
            self.used += n * WORD_BYTES;
            self.cursor = page + n as u64 * WORD_BITS;
            first += n;
            left -= n;
        }
    }

    /// Store `v` as a varint at the end of the current record (which has room for it).
    fn put(&mut self, v: u64) {
        let at = self.used;
        if let Some(Ok(out)) = self.ops.get_mut(at..at + SLACK).map(<&mut [u8; SLACK]>::try_from) {
            self.used += put_varint_at(out, 0, v);
        }
    }

    /// Make room for an operation anchored at page `at` whose size, given its gap from
    /// the cursor, is `size(gap)`: start a new record at `at` if the current one is
    /// empty or too full. Returns the gap to encode.
    fn room_for(&mut self, at: u64, size: impl Fn(u64) -> usize) -> u64 {
        if self.used > 0 && self.used + size(at - self.cursor) <= self.budget {
            return at - self.cursor;
        }
        self.finish_record();
        if self.ops.is_empty() {
            self.ops = vec![0; self.budget + SLACK];
        }
        self.start = at;
        self.cursor = at;
        0
    }

    fn finish_record(&mut self) {
        if self.used > 0 {
            let mut ops = core::mem::take(&mut self.ops);
            ops.truncate(self.used);
            self.used = 0;
            self.ready.push_back(DirtyRecord { start: self.start, ops });
        }
    }
}

/// The operations the runs of `w` take, `starts` being their first pages: one `ONE` per
/// run, one `DIRTY` more per run longer than a page. The second page of such a run is
/// never a start, so both counts are one popcount (a software one on the default x86-64
/// target, which has no `popcnt`).
const fn run_ops(starts: u64, w: u64) -> u32 {
    (starts | (starts << 1 & w)).count_ones()
}

/// Whether a word that follows a raw word goes raw too: it has more than
/// [`STAY_RAW_OPS`] operations as runs (so it is neither clean nor fully dirty).
#[inline(always)]
const fn goes_raw(w: u64) -> bool {
    run_ops(w & !(w << 1), w) > STAY_RAW_OPS
}

/// Store the operations of dirty pages `run` (not empty) at `out[n..]`, the cursor at
/// page `cursor`: `ONE gap`, then `DIRTY len-1` if longer than a page. Returns the index
/// past them.
#[inline(always)]
fn put_run(out: &mut [u8; SLACK], mut n: usize, run: Range<u64>, cursor: u64) -> usize {
    n = put_varint_at(out, n, (run.start - cursor) << 2 | ONE);
    if run.end - run.start > 1 {
        n = put_varint_at(out, n, (run.end - run.start - 1) << 2 | DIRTY);
    }
    n
}

/// The runs of `rest` (not 0), the dirty pages of the word at `page`, encoded into
/// `out` from byte `n` with the cursor at page `cursor`; a run reaching the word's end
/// is not encoded but returned, to go on into the next word. Returns (that run, the new
/// cursor, the new length). Shared by `Records::fast` and `Records::runs`; always
/// inlined, so each keeps its registers.
#[inline(always)]
fn word_runs(
    out: &mut [u8; SLACK],
    rest: u64,
    page: u64,
    cursor: u64,
    mut n: usize,
) -> (Option<Range<u64>>, u64, usize) {
    // One bit per run at its first page, one at its last.
    let mut starts = rest & !(rest << 1);
    let mut ends = rest & !(rest >> 1);
    let mut pending = None;
    if rest >> 63 == 1 {
        // The last run may go on into the next word.
        let lo = 63 - starts.leading_zeros();
        pending = Some(page + u64::from(lo)..page + u64::from(u64::BITS));
        starts &= !(1 << lo);
        ends &= !(1 << 63);
    }
    // The cursor as a bit of this word; before the word it wraps around, and so does
    // the first gap computed from it, back to its true value.
    let mut c = cursor.wrapping_sub(page);
    while starts != 0 {
        let (lo, hi) = (u64::from(starts.trailing_zeros()), u64::from(ends.trailing_zeros()));
        starts &= starts - 1;
        ends &= ends - 1;
        let (gap, more) = (lo.wrapping_sub(c), hi - lo);
        c = hi + 1;
        if gap | more < 32 {
            // One byte each; `DIRTY` is stored whether needed or not (the window has
            // room past it) and counted only when needed: no branch to mispredict.
            let i = n & WRAP;
            let pair = (gap * 4 + ONE) as u16 | ((more * 4 + DIRTY) as u16) << 8;
            if let Some(o) = out.get_mut(i..i + 2) {
                // Always: `i + 2 <= SLACK`; the compiler sees it, so no branch is left.
                o.copy_from_slice(&pair.to_le_bytes());
            }
            n += 2 - usize::from(more == 0);
        } else if gap < 1 << 12 {
            // One or two bytes each (`more` is below 64), stored the same way.
            n = put_short(out, n, gap << 2 | ONE);
            let m = put_short(out, n, more << 2 | DIRTY);
            n += (m - n) * usize::from(more > 0);
        } else {
            n = put_varint_at(out, n, gap << 2 | ONE);
            if more > 0 {
                n = put_varint_at(out, n, more << 2 | DIRTY);
            }
        }
    }
    (pending, page.wrapping_add(c), n)
}

/// Store `v < 2^14` as a one- or two-byte varint at `out[n..]`, without a branch;
/// returns the index past it. Indices wrap within the window.
#[inline(always)]
fn put_short(out: &mut [u8; SLACK], n: usize, v: u64) -> usize {
    let long = u64::from(v >= 0x80);
    let pair = (v & 0x7f | long << 7 | (v >> 7) << 8) as u16;
    let i = n & WRAP;
    if let Some(o) = out.get_mut(i..i + 2) {
        // Always: `i + 2 <= SLACK`.
        o.copy_from_slice(&pair.to_le_bytes());
    }
    n + 1 + long as usize
}

/// Store `v` as a varint at `out[n..]`; returns the index past it. Indices wrap within
/// the window, which holds more than any word's operations.
#[inline]
fn put_varint_at(out: &mut [u8; SLACK], mut n: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        if let Some(o) = out.get_mut(n & WRAP) {
            *o = v as u8 | 0x80;
        }
        v >>= 7;
        n += 1;
    }
    if let Some(o) = out.get_mut(n & WRAP) {
        *o = v as u8;
    }
    n + 1
}

/// The size of `CLEAN gap`, or 0 when there is no gap.
const fn clean_len(gap: u64) -> usize {
    if gap > 0 { varint_len(gap << 2 | CLEAN) } else { 0 }
}

/// The number of bytes of `v` as a LEB128 varint.
const fn varint_len(v: u64) -> usize {
    (u64::BITS - (v | 1).leading_zeros()).div_ceil(7) as usize
}

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    if v < 0x80 {
        out.push(v as u8);
        return;
    }
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The minimal LEB128 varint at `bytes[*at..]`; advances `at` past it.
#[inline]
fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, RecordFault> {
    if let Some(&b) = bytes.get(*at)
        && b < 0x80
    {
        *at += 1;
        return Ok(u64::from(b));
    }
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let &b = bytes.get(*at).ok_or(RecordFault::Truncated)?;
        *at += 1;
        let bits = u64::from(b & 0x7f);
        if shift == 63 && b > 1 {
            return Err(RecordFault::BadVarint);
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            // Minimal: only a single-byte varint may end in a zero byte.
            return if b == 0 && shift > 0 { Err(RecordFault::BadVarint) } else { Ok(v) };
        }
    }
    Err(RecordFault::BadVarint)
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn varints() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::from(u32::MAX), u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(out, postcard::to_allocvec(&v).unwrap(), "{v}");
            let mut at = 0;
            assert_eq!(get_varint(&out, &mut at), Ok(v));
            assert_eq!(at, out.len());
        }
        let mut at = 0;
        assert_eq!(get_varint(&[0x80, 0x00], &mut at), Err(RecordFault::BadVarint));
        at = 0;
        assert_eq!(get_varint(&[0x80], &mut at), Err(RecordFault::Truncated));
        at = 0;
        assert_eq!(
            get_varint(&[0xff; 9].iter().copied().chain([2]).collect::<Vec<_>>(), &mut at),
            Err(RecordFault::BadVarint)
        );
        at = 0;
        assert_eq!(get_varint(&[0xff; 11], &mut at), Err(RecordFault::BadVarint));
    }

    #[test]
    fn run_ops_counts_runs_and_longer_runs() {
        for w in [1u64, u64::MAX >> 1, 0x5555_5555_5555_5555, 0x8000_0000_0000_0001, 0x0123_4567_89ab_cdef, 0xf0f0] {
            for carry in [0, 1] {
                let starts = w & !(w << 1 | carry);
                let want = starts.count_ones() + (starts & w >> 1).count_ones();
                assert_eq!(run_ops(starts, w), want, "{w:#x} {carry}");
            }
        }
    }

    #[test]
    fn encode_matches_postcard() {
        let r = DirtyRecord { start: 0x1234_5678, ops: vec![1, 2, 3] };
        assert_eq!(r.encode_to_vec(), postcard::to_allocvec(&r).unwrap());
        assert_eq!(r.encoded_len(), r.encode_to_vec().len());
    }

    #[test]
    fn largest_ops_fit_the_smallest_budget() {
        let max = (super::super::PFN_LIMIT << 2) | 3;
        assert!(2 * varint_len(max) <= MIN_RECORD_OPS);
        let words = (super::super::PFN_LIMIT / 64) << 2 | 3;
        assert!(varint_len(words) + WORD_BYTES <= MIN_RECORD_OPS);
        // The encoded record fits a chunk.
        assert!(varint_len(u64::MAX) + varint_len(MAX_RECORD_OPS as u64) + MAX_RECORD_OPS <= MAX_CHUNK_DATA);
    }
}
