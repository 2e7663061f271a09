//! Typed errors carried in replies: a stable numeric [`ErrorCode`] and a human message.
//!
//! Every failure a peer can see ends up as an [`ErrorReply`] in a
//! [`Response::Error`](crate::Response::Error): frame errors, payloads that do not decode,
//! a full mailbox, a service that does not answer. This module is not for errors that
//! never cross the wire ([`WireError`](crate::WireError) is the sender's own failure).

use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a request or frame failed. The numeric values are part of the wire format
/// (encoded as a postcard varint `u16`) and never change within a protocol version;
/// 0 is never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame header is malformed (bad magic, unknown kind, reserved flags set) or
    /// the frame is of the wrong kind for where it arrived. The connection is closed.
    BadFrame = 1,
    /// The frame carries a protocol version this side does not speak. The connection
    /// is closed.
    UnsupportedVersion = 2,
    /// The frame declares a payload longer than [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN).
    /// The connection is closed.
    FrameTooLarge = 3,
    /// The owning service's mailbox is full (backpressure); retry later.
    Busy = 4,
    /// The payload names a message type this protocol version does not define.
    UnknownRequest = 5,
    /// The payload does not decode as the message it claims to be.
    BadRequest = 6,
    /// The request is understood but not implemented by this hypervisor build.
    NotImplemented = 7,
    /// The hypervisor failed internally while handling the request.
    Internal = 8,
    /// The service did not answer in time.
    Timeout = 9,
    /// The request was understood and refused: the message says why (no such domain,
    /// a CPUID policy this host cannot give, ...). Since protocol version 2.
    Refused = 10,
    /// The hypervisor has no memory for the request: its frame pool or its heap cannot
    /// hold what the request asks for. Nothing was changed and the hypervisor keeps
    /// serving; the same request may succeed once something is freed. Since protocol
    /// version 4.
    OutOfMemory = 11,
    /// (v5) An upload chunk was refused: out of order, overlapping, too long, past the
    /// announced end, or its CRC-32C does not match. The message says which and where
    /// the next chunk must start; the upload itself is kept unless the message says it
    /// was discarded (a whole-image checksum mismatch).
    BadChunk = 12,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 12] = [
        Self::BadFrame,
        Self::UnsupportedVersion,
        Self::FrameTooLarge,
        Self::Busy,
        Self::UnknownRequest,
        Self::BadRequest,
        Self::NotImplemented,
        Self::Internal,
        Self::Timeout,
        Self::Refused,
        Self::OutOfMemory,
        Self::BadChunk,
    ];

    /// The code's stable numeric value.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code with this numeric value, if this protocol version defines one.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::BadFrame,
            2 => Self::UnsupportedVersion,
            3 => Self::FrameTooLarge,
            4 => Self::Busy,
            5 => Self::UnknownRequest,
            6 => Self::BadRequest,
            7 => Self::NotImplemented,
            8 => Self::Internal,
            9 => Self::Timeout,
            10 => Self::Refused,
            11 => Self::OutOfMemory,
            12 => Self::BadChunk,
            _ => return None,
        })
    }

    /// A stable snake_case name, for logs and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::FrameTooLarge => "frame_too_large",
            Self::Busy => "busy",
            Self::UnknownRequest => "unknown_request",
            Self::BadRequest => "bad_request",
            Self::NotImplemented => "not_implemented",
            Self::Internal => "internal",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::OutOfMemory => "out_of_memory",
            Self::BadChunk => "bad_chunk",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Busy | Self::Timeout)
    }

    /// Whether the side that sent this error closes the connection after it (the byte
    /// stream can no longer be trusted).
    pub const fn closes_connection(self) -> bool {
        matches!(self, Self::BadFrame | Self::UnsupportedVersion | Self::FrameTooLarge)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadFrame => "the frame is malformed",
            Self::UnsupportedVersion => "the protocol version is not supported",
            Self::FrameTooLarge => "the frame is larger than the protocol allows",
            Self::Busy => "the service is busy (its mailbox is full), try again later",
            Self::UnknownRequest => "the message type is unknown to this protocol version",
            Self::BadRequest => "the message does not decode",
            Self::NotImplemented => "the request is not implemented by this hypervisor",
            Self::Internal => "the hypervisor failed internally",
            Self::Timeout => "the service did not answer in time",
            Self::Refused => "the request was refused",
            Self::OutOfMemory => "the hypervisor has no memory for the request",
            Self::BadChunk => "the upload chunk was refused",
        })
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u16::deserialize(d)?;
        Self::from_u16(v).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(u64::from(v)), &"an error code 1..=12")
        })
    }
}

/// A typed error with a human message, the payload of
/// [`Response::Error`](crate::Response::Error).
///
/// ```
/// use wire::{ErrorCode, ErrorReply};
/// let e = ErrorReply::new(ErrorCode::Busy, "monitor mailbox holds 16 of 16 requests");
/// assert_eq!(
///     e.to_string(),
///     "the service is busy (its mailbox is full), try again later: monitor mailbox holds 16 of 16 requests"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened, for a person: which request, service, limit or value.
    pub message: String,
}

impl ErrorReply {
    /// An error reply.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() { write!(f, "{}", self.code) } else { write!(f, "{}: {}", self.code, self.message) }
    }
}

impl core::error::Error for ErrorReply {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.as_u16() as usize, i + 1);
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(*c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16 + 1), None);
    }

    #[test]
    fn code_encodes_as_its_number() {
        let bytes = postcard::to_allocvec(&ErrorCode::Timeout).unwrap();
        assert_eq!(bytes, [9]);
        assert!(postcard::from_bytes::<ErrorCode>(&[0]).is_err());
        assert!(postcard::from_bytes::<ErrorCode>(&[ErrorCode::ALL.len() as u8 + 1]).is_err());
    }
}
