//! [`DirtyError`]: every way a dirty-bitmap operation or a dirty record can be refused.

use core::fmt;
use core::ops::Range;

use crate::error::{ErrorCode, ErrorReply};

use super::{MAX_RECORD_OPS, MIN_RECORD_OPS, PFN_LIMIT};

/// Why a [`DirtyBitmap`](super::DirtyBitmap) operation or a
/// [`DirtyRecord`](super::DirtyRecord) was refused. A refused operation changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirtyError {
    /// A bitmap was asked to cover pfns at or above [`PFN_LIMIT`].
    TooLarge {
        /// The pfns asked for.
        pfns: Range<u64>,
    },
    /// A range whose start lies after its end.
    BadRange {
        /// The range as given.
        range: Range<u64>,
    },
    /// A pfn the bitmap does not cover.
    PfnOutOfRange {
        /// The pfn.
        pfn: u64,
        /// The pfns the bitmap covers.
        bitmap: Range<u64>,
    },
    /// A range that is not inside the pfns the bitmap covers.
    RangeOutOfBounds {
        /// The range asked for.
        range: Range<u64>,
        /// The pfns the bitmap covers.
        bitmap: Range<u64>,
    },
    /// [`DirtyBitmap::from_words`](super::DirtyBitmap::from_words) got the wrong number of
    /// words for its pages.
    WordCount {
        /// The pages the bitmap is to cover.
        pages: u64,
        /// The words that takes (one per 64 pages, rounded up).
        expected: u64,
        /// The words given.
        found: usize,
    },
    /// [`DirtyBitmap::from_words`](super::DirtyBitmap::from_words) got a last word with
    /// bits set beyond the bitmap's last page.
    TrailingBits {
        /// The pages the bitmap is to cover.
        pages: u64,
        /// The last word as given.
        word: u64,
    },
    /// A record byte budget outside [`MIN_RECORD_OPS`]`..=`[`MAX_RECORD_OPS`].
    BudgetOutOfRange {
        /// The budget asked for.
        budget: usize,
    },
    /// A record's operations do not decode.
    BadRecord {
        /// The record's first pfn.
        start: u64,
        /// Offset of the faulty operation in the record's `ops` bytes.
        offset: usize,
        /// What is wrong there.
        fault: RecordFault,
    },
    /// A record marks a page dirty that the bitmap it is applied to does not cover.
    RecordOutOfRange {
        /// The record's first pfn.
        start: u64,
        /// The first such page.
        pfn: u64,
        /// The pfns the bitmap covers.
        bitmap: Range<u64>,
    },
    /// The bytes given to [`DirtyRecord::decode`](super::DirtyRecord::decode) are not one
    /// record in canonical postcard form.
    Decode {
        /// The number of bytes given.
        len: usize,
        /// What is wrong with them.
        fault: DecodeFault,
    },
    /// The heap cannot hold a bitmap of this many bytes.
    OutOfMemory {
        /// The bytes asked for.
        bytes: usize,
    },
}

/// What is wrong inside a record's operation bytes (see the encoding in the
/// [module docs](super)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// The bytes end inside an operation.
    Truncated,
    /// A varint is longer than it needs to be or does not fit 64 bits.
    BadVarint,
    /// A `CLEAN`, `DIRTY` or `WORDS` operation with a count of 0.
    ZeroCount,
    /// The operation moves past pfn `u64::MAX`.
    Overflow,
}

/// What is wrong with the bytes of an encoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeFault {
    /// Postcard could not decode a record from them.
    Postcard(postcard::Error),
    /// A record decoded but bytes remain after it.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A record decoded but a varint in it is longer than needed.
    NotCanonical,
}

impl DirtyError {
    /// The typed error to report to the peer that sent the offending record or request.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply::new(ErrorCode::BadRequest, alloc::string::ToString::to_string(self))
    }
}

/// `0x10..0x20`, pfns in hex as in every hypervisor log.
struct Pfns<'a>(&'a Range<u64>);

impl fmt::Display for Pfns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.0.start, self.0.end)
    }
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { pfns } => write!(
                f,
                "a dirty bitmap over pfns {} reaches past pfn {PFN_LIMIT:#x}, the end of a 52-bit guest-physical space",
                Pfns(pfns)
            ),
            Self::BadRange { range } => write!(f, "pfn range {} starts after it ends", Pfns(range)),
            Self::PfnOutOfRange { pfn, bitmap } => {
                write!(f, "pfn {pfn:#x} is outside the dirty bitmap, which covers pfns {}", Pfns(bitmap))
            }
            Self::RangeOutOfBounds { range, bitmap } => write!(
                f,
                "pfn range {} is not inside the dirty bitmap, which covers pfns {}",
                Pfns(range),
                Pfns(bitmap)
            ),
            Self::WordCount { pages, expected, found } => {
                write!(f, "a dirty bitmap of {pages} pages takes {expected} words, but {found} were given")
            }
            Self::TrailingBits { pages, word } => write!(
                f,
                "the last word {word:#018x} of a dirty bitmap of {pages} pages has bits set beyond its last page"
            ),
            Self::BudgetOutOfRange { budget } => write!(
                f,
                "a dirty record budget of {budget} bytes is outside {MIN_RECORD_OPS}..={MAX_RECORD_OPS} bytes"
            ),
            Self::BadRecord { start, offset, fault } => {
                write!(f, "the dirty record starting at pfn {start:#x} is malformed at byte {offset}: {fault}")
            }
            Self::RecordOutOfRange { start, pfn, bitmap } => write!(
                f,
                "the dirty record starting at pfn {start:#x} marks pfn {pfn:#x} dirty, outside the bitmap's pfns {}",
                Pfns(bitmap)
            ),
            Self::Decode { len, fault } => write!(f, "{len} bytes are not a dirty record: {fault}"),
            Self::OutOfMemory { bytes } => {
                write!(f, "the hypervisor's heap cannot hold a dirty bitmap of {bytes} bytes")
            }
        }
    }
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Truncated => "the bytes end inside an operation",
            Self::BadVarint => "a varint is over-long or exceeds 64 bits",
            Self::ZeroCount => "an operation has a count of 0",
            Self::Overflow => "the operation moves past the largest pfn",
        })
    }
}

impl fmt::Display for DecodeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postcard(e) => write!(f, "{e}"),
            Self::TrailingBytes { extra } => write!(f, "{extra} unexpected bytes follow the record"),
            Self::NotCanonical => f.write_str("not in canonical form (an over-long varint)"),
        }
    }
}

impl core::error::Error for DirtyError {}
