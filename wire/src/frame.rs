//! Framing: the 18-byte header (diagram in the crate docs), [`encode_frame`] and the
//! streaming [`FrameDecoder`].
//!
//! This module moves opaque payloads; it does not know the messages (see
//! [`message`](crate::message)) and does no I/O: the caller feeds the bytes it read
//! and writes the bytes it was given.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;

use crate::error::{ErrorCode, ErrorReply};
use crate::{HEADER_LEN, MAGIC, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// What a frame's payload is. The numeric values are the `kind` byte of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A [`Request`](crate::Request).
    Request = 1,
    /// A [`Response`](crate::Response) to the request with the same id.
    Response = 2,
    /// An unsolicited [`Event`](crate::Event).
    Event = 3,
    /// One [`StreamChunk`](crate::StreamChunk) of a bulk stream.
    StreamChunk = 4,
}

impl FrameKind {
    /// The `kind` byte.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind with this `kind` byte, if any.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Event),
            4 => Some(Self::StreamChunk),
            _ => None,
        }
    }

    /// A lower-case name ("request", "stream chunk", ...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Event => "event",
            Self::StreamChunk => "stream chunk",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One decoded frame: its header fields and its (still postcard-encoded) payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The protocol version from the header; [`FrameDecoder`] only returns frames of
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The request id from the header.
    pub request_id: u64,
    /// The payload bytes, at most [`MAX_FRAME_LEN`].
    pub payload: Vec<u8>,
}

/// Why the sending side could not encode a frame. Nothing was written to `out`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The payload would exceed [`MAX_FRAME_LEN`]. For bulk data, split it into
    /// [`StreamChunk`](crate::StreamChunk)s of at most [`MAX_CHUNK_DATA`](crate::MAX_CHUNK_DATA).
    PayloadTooLarge {
        /// The payload's length in bytes.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// Request id 0 is reserved for frames that answer no request.
    ReservedRequestId,
    /// Postcard could not serialize the message.
    Encode(postcard::Error),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PayloadTooLarge { len, max } => {
                write!(f, "cannot frame a {len}-byte payload: the maximum is {max} bytes")
            }
            Self::ReservedRequestId => {
                f.write_str("cannot send a request with id 0: it is reserved for frames that answer no request")
            }
            Self::Encode(e) => write!(f, "cannot encode the message: {e}"),
        }
    }
}

impl core::error::Error for WireError {}

/// Why [`FrameDecoder`] refused the byte stream. Every case is decided from the header
/// alone, without waiting for the payload or allocating for it. After one of these the decoder is
/// poisoned and the connection is to be closed, after answering with
/// [`FrameError::encode_reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with [`MAGIC`]: the peer does not speak this protocol
    /// or the stream lost sync.
    BadMagic {
        /// The two bytes found instead.
        found: [u8; 2],
    },
    /// The header's protocol version is not [`PROTOCOL_VERSION`].
    UnsupportedVersion {
        /// The version the peer speaks.
        version: u16,
        /// The frame's request id, to answer it.
        request_id: u64,
    },
    /// The header's kind byte is not a [`FrameKind`].
    UnknownKind {
        /// The kind byte found.
        kind: u8,
        /// The frame's request id, to answer it.
        request_id: u64,
    },
    /// The header sets flags this version reserves (they must be 0).
    ReservedFlags {
        /// The flags byte found.
        flags: u8,
        /// The frame's request id, to answer it.
        request_id: u64,
    },
    /// The header declares a payload longer than [`MAX_FRAME_LEN`].
    TooLarge {
        /// The declared payload length.
        len: u32,
        /// The frame's request id, to answer it.
        request_id: u64,
    },
}

impl FrameError {
    /// The request id of the refused frame, when its header was readable.
    pub const fn request_id(&self) -> Option<u64> {
        match *self {
            Self::BadMagic { .. } => None,
            Self::UnsupportedVersion { request_id, .. }
            | Self::UnknownKind { request_id, .. }
            | Self::ReservedFlags { request_id, .. }
            | Self::TooLarge { request_id, .. } => Some(request_id),
        }
    }

    /// The code to answer with.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::BadMagic { .. } | Self::UnknownKind { .. } | Self::ReservedFlags { .. } => ErrorCode::BadFrame,
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
        }
    }

    /// The typed error to answer with: [`code`](Self::code) and this error's text.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply::new(self.code(), self.to_string())
    }

    /// Append the reply frame for this error to `out`: a
    /// [`Response::Error`](crate::Response::Error) in this side's protocol version,
    /// addressed to [`request_id`](Self::request_id) (0 when unreadable). Send it, then
    /// close the connection.
    pub fn encode_reply(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        crate::encode_response(self.request_id().unwrap_or(0), &crate::Response::Error(self.to_reply()), out)
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic { found } => write!(
                f,
                "bad frame magic {:#04x} {:#04x} (expected {:#04x} {:#04x}, \"HV\"): the peer does not speak \
                 the hv control protocol",
                found[0], found[1], MAGIC[0], MAGIC[1]
            ),
            Self::UnsupportedVersion { version, request_id } => write!(
                f,
                "frame with request id {request_id} uses protocol version {version}, but this side speaks \
                 version {PROTOCOL_VERSION}: use an hvctl and hypervisor built from the same wire crate"
            ),
            Self::UnknownKind { kind, request_id } => {
                write!(f, "frame with request id {request_id} has unknown kind {kind} (known: 1 to 4)")
            }
            Self::ReservedFlags { flags, request_id } => write!(
                f,
                "frame with request id {request_id} sets reserved flags {flags:#04x} (must be 0 in protocol \
                 version {PROTOCOL_VERSION})"
            ),
            Self::TooLarge { len, request_id } => write!(
                f,
                "frame with request id {request_id} declares a {len}-byte payload, more than the maximum of \
                 {MAX_FRAME_LEN} bytes"
            ),
        }
    }
}

impl core::error::Error for FrameError {}

/// The header fields after validation.
struct Header {
    kind: FrameKind,
    request_id: u64,
    len: usize,
}

fn header_bytes(kind: FrameKind, request_id: u64, len: u32) -> [u8; HEADER_LEN] {
    let [v0, v1] = PROTOCOL_VERSION.to_le_bytes();
    let [i0, i1, i2, i3, i4, i5, i6, i7] = request_id.to_le_bytes();
    let [l0, l1, l2, l3] = len.to_le_bytes();
    let [m0, m1] = MAGIC;
    [m0, m1, v0, v1, kind.as_u8(), 0, i0, i1, i2, i3, i4, i5, i6, i7, l0, l1, l2, l3]
}

/// Check a complete header. The order of checks is part of the contract: magic,
/// version, kind, flags, length.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let [m0, m1, v0, v1, kind, flags, i0, i1, i2, i3, i4, i5, i6, i7, l0, l1, l2, l3] = *h;
    if [m0, m1] != MAGIC {
        return Err(FrameError::BadMagic { found: [m0, m1] });
    }
    let version = u16::from_le_bytes([v0, v1]);
    let request_id = u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { version, request_id });
    }
    let Some(kind) = FrameKind::from_u8(kind) else {
        return Err(FrameError::UnknownKind { kind, request_id });
    };
    if flags != 0 {
        return Err(FrameError::ReservedFlags { flags, request_id });
    }
    let len32 = u32::from_le_bytes([l0, l1, l2, l3]);
    match usize::try_from(len32) {
        Ok(len) if len <= MAX_FRAME_LEN => Ok(Header { kind, request_id, len }),
        _ => Err(FrameError::TooLarge { len: len32, request_id }),
    }
}

/// Append one frame (header, then `payload`) to `out`.
///
/// Fails with [`WireError::PayloadTooLarge`] when `payload` exceeds
/// [`MAX_FRAME_LEN`]; `out` is then left as it was. Any request id is accepted here
/// (the message helpers refuse request id 0 for requests).
pub fn encode_frame(kind: FrameKind, request_id: u64, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let len = match u32::try_from(payload.len()) {
        Ok(len) if payload.len() <= MAX_FRAME_LEN => len,
        _ => return Err(WireError::PayloadTooLarge { len: payload.len(), max: MAX_FRAME_LEN }),
    };
    out.reserve(HEADER_LEN.saturating_add(payload.len()));
    out.extend_from_slice(&header_bytes(kind, request_id, len));
    out.extend_from_slice(payload);
    Ok(())
}

/// Write the header for a payload that was appended after a placeholder header at
/// `start`. Used by the message helpers, which serialize straight into `out`.
pub(crate) fn finish_header(
    out: &mut Vec<u8>,
    start: usize,
    kind: FrameKind,
    request_id: u64,
) -> Result<(), WireError> {
    let payload_len = out.len().saturating_sub(start).saturating_sub(HEADER_LEN);
    let len = match u32::try_from(payload_len) {
        Ok(len) if payload_len <= MAX_FRAME_LEN => len,
        _ => {
            out.truncate(start);
            return Err(WireError::PayloadTooLarge { len: payload_len, max: MAX_FRAME_LEN });
        }
    };
    match out.get_mut(start..).and_then(|s| s.first_chunk_mut::<HEADER_LEN>()) {
        Some(h) => {
            *h = header_bytes(kind, request_id, len);
            Ok(())
        }
        None => {
            out.truncate(start);
            Err(WireError::Encode(postcard::Error::SerializeBufferFull))
        }
    }
}

/// A streaming frame decoder for one connection: feed it whatever the transport
/// delivered with [`push`](Self::push), take frames with
/// [`next_frame`](Self::next_frame).
///
/// - It buffers at most [`BUFFER_LIMIT`](Self::BUFFER_LIMIT) bytes (one maximal frame),
///   whatever a header claims: an oversized length is refused from the header before
///   anything is allocated for it.
/// - A header error ([`FrameError`]) is reported as soon as the header is complete
///   (bad magic as soon as two bytes are there), even if its payload never arrives.
/// - A frame whose payload has not fully arrived is simply pending: `next_frame`
///   returns `None`, never an error and never a panic.
/// - **Poisoning**: after `next_frame` has returned an error, the decoder is poisoned
///   for good: `next_frame` returns `None` and `push` discards everything it is given.
///   Answer with [`FrameError::encode_reply`] and close the connection; a byte stream
///   that broke framing once cannot be resynchronized.
///
/// ```
/// use wire::{FrameDecoder, Request};
/// let mut bytes = Vec::new();
/// wire::encode_request(1, &Request::Info, &mut bytes)?;
/// wire::encode_request(2, &Request::Ping { payload: vec![7] }, &mut bytes)?;
///
/// let mut dec = FrameDecoder::new();
/// let mut input = &bytes[..];
/// let mut got = Vec::new();
/// while !input.is_empty() {
///     let n = dec.push(input);
///     input = &input[n..];
///     while let Some(frame) = dec.next_frame() {
///         let frame = frame.expect("well-formed");
///         got.push((frame.request_id, wire::decode_request(&frame).expect("decodes")));
///     }
/// }
/// assert_eq!(got, [(1, Request::Info), (2, Request::Ping { payload: vec![7] })]);
/// # Ok::<(), wire::WireError>(())
/// ```
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    /// Buffered bytes; `buf[start..]` is not yet returned as frames.
    buf: Vec<u8>,
    start: usize,
    /// The header error that poisoned the decoder (already returned by `next_frame`).
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// The most bytes the decoder ever holds: one header and a maximal payload.
    pub const BUFFER_LIMIT: usize = HEADER_LEN + MAX_FRAME_LEN;

    /// A decoder at the start of a connection.
    pub const fn new() -> Self {
        Self { buf: Vec::new(), start: 0, failed: None }
    }

    /// Buffer bytes from the transport; returns how many were consumed.
    ///
    /// Consumes as much as fits in [`BUFFER_LIMIT`](Self::BUFFER_LIMIT) minus what is
    /// already buffered; returns less than `bytes.len()` (possibly 0) when the buffer is
    /// full, in which case call [`next_frame`](Self::next_frame) and push the rest
    /// again. A poisoned decoder consumes and discards everything.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if self.is_poisoned() {
            return bytes.len();
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let room = Self::BUFFER_LIMIT.saturating_sub(self.buf.len());
        let take = bytes.get(..room.min(bytes.len())).unwrap_or_default();
        let want = self.buf.len().saturating_add(take.len());
        if want > self.buf.capacity() {
            // Grow geometrically, but never past the limit.
            let target = want.max(self.buf.capacity().saturating_mul(2)).min(Self::BUFFER_LIMIT);
            self.buf.reserve_exact(target.saturating_sub(self.buf.len()));
        }
        self.buf.extend_from_slice(take);
        take.len()
    }

    /// The next complete frame, a header error, or `None` when more bytes are needed
    /// (or the decoder is poisoned and its error was already returned).
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        if self.failed.is_some() {
            return None;
        }
        let avail = self.buf.get(self.start..).unwrap_or_default();
        if let Some(&[m0, m1]) = avail.first_chunk::<2>()
            && [m0, m1] != MAGIC
        {
            return Some(Err(self.fail(FrameError::BadMagic { found: [m0, m1] })));
        }
        let header = avail.first_chunk::<HEADER_LEN>()?;
        let h = match parse_header(header) {
            Ok(h) => h,
            Err(e) => return Some(Err(self.fail(e))),
        };
        let end = HEADER_LEN.saturating_add(h.len);
        let payload = avail.get(HEADER_LEN..end)?.to_vec();
        self.start = self.start.saturating_add(end);
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Some(Ok(Frame { kind: h.kind, version: PROTOCOL_VERSION, request_id: h.request_id, payload }))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        self.buf = Vec::new();
        self.start = 0;
        e
    }

    /// Whether a header error was found; the connection is to be closed.
    pub const fn is_poisoned(&self) -> bool {
        self.failed.is_some()
    }

    /// The header error that poisoned the decoder, if any.
    pub const fn error(&self) -> Option<&FrameError> {
        self.failed.as_ref()
    }

    /// Bytes buffered but not yet returned as frames (a partial frame, or frames
    /// waiting for `next_frame`). Non-zero at end of stream means a truncated frame.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }
}
