//! Streamed responses for bulk data (dirty bitmaps, migration records): numbered,
//! checksummed [`StreamChunk`]s, the [`StreamSender`] that numbers them and the
//! [`StreamReassembler`] that checks them on arrival.
//!
//! A stream is identified by its `stream_id` (chosen by the sender, unique per
//! connection) and travels in frames of kind [`FrameKind::StreamChunk`] that carry the
//! id of the request that opened it. Chunks are numbered from 0 without gaps; the
//! final chunk has `last = true` (it may be empty). There is no retransmission: the
//! transport is reliable, so any error here means a bug or corruption and the stream
//! is to be abandoned. What the bytes of a stream mean (bitmap words, page records)
//! is the business of the service that produces them, not of this module.
//!
//! The CRC-32C of a chunk covers its identity as well as its data:
//!
//! ```text
//! crc32c = CRC-32C( stream_id u32 LE | seq u32 LE | last u8 (0 or 1) | data )
//! ```
//!
//! so a chunk delivered to the wrong stream or position fails the check too.

use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::MAX_FRAME_LEN;
use crate::codec::{decode_message, encode_message};
use crate::crc32c::Crc32c;
use crate::error::{ErrorCode, ErrorReply};
use crate::frame::{Frame, FrameKind, WireError};

/// The most data one chunk may carry so that its frame stays within
/// [`MAX_FRAME_LEN`]: 64 KiB minus 32 bytes for the chunk's other fields (at most 19
/// bytes in postcard). [`StreamSender`] refuses larger chunks.
pub const MAX_CHUNK_DATA: usize = MAX_FRAME_LEN - 32;

/// One piece of a stream.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Which stream.
    pub stream_id: u32,
    /// Position in the stream, from 0.
    pub seq: u32,
    /// Whether this is the final chunk.
    pub last: bool,
    /// CRC-32C over `stream_id`, `seq`, `last` and `data` (see the module docs).
    pub crc32c: u32,
    /// The chunk's bytes.
    #[serde(with = "crate::bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for StreamChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A 60 KiB chunk printed byte by byte helps nobody.
        let mut d = f.debug_struct("StreamChunk");
        d.field("stream_id", &self.stream_id)
            .field("seq", &self.seq)
            .field("last", &self.last)
            .field("crc32c", &format_args!("{:#010x}", self.crc32c));
        match self.data.get(..16) {
            Some(head) if self.data.len() > 16 => {
                d.field("data", &format_args!("{} bytes {:02x?}...", self.data.len(), head))
            }
            _ => d.field("data", &self.data),
        };
        d.finish()
    }
}

impl StreamChunk {
    /// A chunk with its CRC computed.
    pub fn new(stream_id: u32, seq: u32, last: bool, data: Vec<u8>) -> Self {
        let crc32c = Self::compute_crc(stream_id, seq, last, &data);
        Self { stream_id, seq, last, crc32c, data }
    }

    /// The CRC-32C a chunk with these fields must carry.
    pub fn compute_crc(stream_id: u32, seq: u32, last: bool, data: &[u8]) -> u32 {
        let mut c = Crc32c::new();
        c.update(&stream_id.to_le_bytes());
        c.update(&seq.to_le_bytes());
        c.update(&[u8::from(last)]);
        c.update(data);
        c.finish()
    }

    /// Check the carried CRC against the chunk's contents.
    pub fn verify(&self) -> Result<(), StreamError> {
        let computed = Self::compute_crc(self.stream_id, self.seq, self.last, &self.data);
        if computed == self.crc32c {
            Ok(())
        } else {
            Err(StreamError::CrcMismatch { stream_id: self.stream_id, seq: self.seq, carried: self.crc32c, computed })
        }
    }
}

/// Why a chunk was refused. Every case means the stream is to be abandoned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The carried CRC does not match the chunk's contents.
    CrcMismatch {
        /// The chunk's stream.
        stream_id: u32,
        /// The chunk's sequence number.
        seq: u32,
        /// The CRC the chunk carries.
        carried: u32,
        /// The CRC of its contents.
        computed: u32,
    },
    /// The chunk belongs to another stream.
    WrongStream {
        /// The stream this reassembler checks.
        expected: u32,
        /// The chunk's stream.
        found: u32,
    },
    /// A chunk already received (its sequence number is below the next expected one).
    Duplicate {
        /// The stream.
        stream_id: u32,
        /// The chunk's sequence number.
        seq: u32,
        /// The next sequence number expected.
        expected: u32,
    },
    /// A chunk ahead of its turn: one or more chunks before it are missing.
    OutOfOrder {
        /// The stream.
        stream_id: u32,
        /// The chunk's sequence number.
        seq: u32,
        /// The next sequence number expected.
        expected: u32,
    },
    /// A chunk after the chunk marked `last`.
    AfterLast {
        /// The stream.
        stream_id: u32,
        /// The chunk's sequence number.
        seq: u32,
    },
    /// Sequence number `u32::MAX` was reached without `last`: the stream is too long.
    SeqExhausted {
        /// The stream.
        stream_id: u32,
    },
    /// The chunk's data exceeds [`MAX_CHUNK_DATA`].
    TooLarge {
        /// The stream.
        stream_id: u32,
        /// The data's length.
        len: usize,
    },
}

impl StreamError {
    /// The typed error to report to the stream's peer.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply::new(ErrorCode::BadRequest, alloc::string::ToString::to_string(self))
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::CrcMismatch { stream_id, seq, carried, computed } => write!(
                f,
                "stream {stream_id} chunk {seq} is corrupt: it carries CRC-32C {carried:#010x} but its contents \
                 give {computed:#010x}"
            ),
            Self::WrongStream { expected, found } => {
                write!(f, "chunk of stream {found} arrived where stream {expected} was expected")
            }
            Self::Duplicate { stream_id, seq, expected } => write!(
                f,
                "stream {stream_id} chunk {seq} arrived twice (chunks up to {} were already received)",
                expected.saturating_sub(1)
            ),
            Self::OutOfOrder { stream_id, seq, expected } => {
                write!(f, "stream {stream_id} chunk {seq} arrived out of order: chunk {expected} is missing")
            }
            Self::AfterLast { stream_id, seq } => {
                write!(f, "stream {stream_id} chunk {seq} arrived after the stream's last chunk")
            }
            Self::SeqExhausted { stream_id } => {
                write!(f, "stream {stream_id} reached chunk number {} without ending", u32::MAX)
            }
            Self::TooLarge { stream_id, len } => {
                write!(f, "stream {stream_id}: a chunk of {len} bytes exceeds the maximum of {MAX_CHUNK_DATA} bytes")
            }
        }
    }
}

impl core::error::Error for StreamError {}

/// The sending side of one stream: numbers chunks from 0 and computes their CRC.
///
/// ```
/// use wire::{StreamReassembler, StreamSender};
/// let mut tx = StreamSender::new(7);
/// let mut rx = StreamReassembler::new(7);
/// let mut got = Vec::new();
/// for (data, last) in [(vec![1, 2], false), (vec![3], false), (vec![], true)] {
///     let chunk = tx.chunk(data, last)?;
///     got.extend_from_slice(rx.accept(&chunk)?);
/// }
/// assert!(rx.is_finished());
/// assert_eq!(got, [1, 2, 3]);
/// # Ok::<(), wire::StreamError>(())
/// ```
#[derive(Clone, Debug)]
pub struct StreamSender {
    stream_id: u32,
    next_seq: Option<u32>,
    finished: bool,
}

impl StreamSender {
    /// A stream that has sent nothing yet.
    pub const fn new(stream_id: u32) -> Self {
        Self { stream_id, next_seq: Some(0), finished: false }
    }

    /// The next chunk, carrying `data`; `last` ends the stream.
    pub fn chunk(&mut self, data: Vec<u8>, last: bool) -> Result<StreamChunk, StreamError> {
        let stream_id = self.stream_id;
        let Some(seq) = self.next_seq else {
            return Err(StreamError::SeqExhausted { stream_id });
        };
        if self.finished {
            return Err(StreamError::AfterLast { stream_id, seq });
        }
        if data.len() > MAX_CHUNK_DATA {
            return Err(StreamError::TooLarge { stream_id, len: data.len() });
        }
        let next = seq.checked_add(1);
        if next.is_none() && !last {
            return Err(StreamError::SeqExhausted { stream_id });
        }
        self.next_seq = next;
        self.finished = last;
        Ok(StreamChunk::new(stream_id, seq, last, data))
    }

    /// The stream's id.
    pub const fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Whether the last chunk was produced.
    pub const fn is_finished(&self) -> bool {
        self.finished
    }
}

/// The receiving side of one stream: accepts chunks strictly in order, each exactly
/// once, none after the last, each with a correct CRC. A refused chunk leaves the state
/// unchanged (but the stream is to be abandoned).
#[derive(Clone, Debug)]
pub struct StreamReassembler {
    stream_id: u32,
    next_seq: u32,
    finished: bool,
    chunks: u64,
    bytes: u64,
}

impl StreamReassembler {
    /// Expect stream `stream_id` from chunk 0.
    pub const fn new(stream_id: u32) -> Self {
        Self { stream_id, next_seq: 0, finished: false, chunks: 0, bytes: 0 }
    }

    /// Check `chunk` and take it; returns its data, to be appended to what came before.
    pub fn accept<'c>(&mut self, chunk: &'c StreamChunk) -> Result<&'c [u8], StreamError> {
        let stream_id = self.stream_id;
        if chunk.stream_id != stream_id {
            return Err(StreamError::WrongStream { expected: stream_id, found: chunk.stream_id });
        }
        if self.finished {
            return Err(StreamError::AfterLast { stream_id, seq: chunk.seq });
        }
        let expected = self.next_seq;
        if chunk.seq < expected {
            return Err(StreamError::Duplicate { stream_id, seq: chunk.seq, expected });
        }
        if chunk.seq > expected {
            return Err(StreamError::OutOfOrder { stream_id, seq: chunk.seq, expected });
        }
        chunk.verify()?;
        match (expected.checked_add(1), chunk.last) {
            (_, true) => self.finished = true,
            (Some(next), false) => self.next_seq = next,
            (None, false) => return Err(StreamError::SeqExhausted { stream_id }),
        }
        self.chunks = self.chunks.saturating_add(1);
        self.bytes = self.bytes.saturating_add(chunk.data.len() as u64);
        Ok(&chunk.data)
    }

    /// The stream's id.
    pub const fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Whether the last chunk was accepted.
    pub const fn is_finished(&self) -> bool {
        self.finished
    }

    /// The sequence number expected next (meaningless once finished).
    pub const fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Chunks accepted so far.
    pub const fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Data bytes accepted so far.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Append `chunk` as a stream-chunk frame to `out`; `request_id` is that of the request
/// that opened the stream. On error `out` is left as it was.
pub fn encode_stream_chunk(request_id: u64, chunk: &StreamChunk, out: &mut Vec<u8>) -> Result<(), WireError> {
    encode_message(FrameKind::StreamChunk, request_id, chunk, out)
}

/// The chunk in `frame`, or why it is not one. The CRC is not checked here:
/// [`StreamReassembler::accept`] (or [`StreamChunk::verify`]) does that.
pub fn decode_stream_chunk(frame: &Frame) -> Result<StreamChunk, ErrorReply> {
    decode_message(frame, FrameKind::StreamChunk, "stream chunk", None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn sequence_numbers_run_out_cleanly() {
        let mut tx = StreamSender { stream_id: 1, next_seq: Some(u32::MAX), finished: false };
        assert_eq!(tx.chunk(vec![], false), Err(StreamError::SeqExhausted { stream_id: 1 }));
        let c = tx.chunk(vec![1], true).unwrap();
        assert_eq!((c.seq, c.last), (u32::MAX, true));
        assert_eq!(tx.chunk(vec![], true), Err(StreamError::SeqExhausted { stream_id: 1 }));

        let mut rx = StreamReassembler { next_seq: u32::MAX, ..StreamReassembler::new(1) };
        let not_last = StreamChunk::new(1, u32::MAX, false, vec![]);
        assert_eq!(rx.accept(&not_last), Err(StreamError::SeqExhausted { stream_id: 1 }));
        assert!(!rx.is_finished());
        assert_eq!(rx.accept(&c), Ok(&[1u8][..]));
        assert!(rx.is_finished());
    }
}
