//! Shared plumbing of the message helpers: serialize a message with postcard straight
//! into the caller's buffer behind its frame header, and decode a frame's payload into
//! a message with a typed error for every way it can fail.

use alloc::format;
use alloc::vec::Vec;

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{Frame, FrameKind, WireError, finish_header};
use crate::{ErrorCode, ErrorReply, HEADER_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// A postcard flavor that appends to the caller's buffer, stops writing past `limit`
/// bytes and keeps counting, so an oversized message is reported with its size without
/// ever growing the buffer past one frame.
struct Append<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
    total: usize,
}

impl Flavor for Append<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.total = self.total.saturating_add(data.len());
        if self.total <= self.limit {
            self.out.extend_from_slice(data);
        }
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.total)
    }
}

/// Append `msg` as one frame of `kind` to `out`; on error `out` is left as it was.
pub(crate) fn encode_message<T: Serialize + ?Sized>(
    kind: FrameKind,
    request_id: u64,
    msg: &T,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    match postcard::serialize_with_flavor(msg, Append { out, limit: MAX_FRAME_LEN, total: 0 }) {
        Ok(total) if total <= MAX_FRAME_LEN => finish_header(out, start, kind, request_id),
        Ok(total) => {
            out.truncate(start);
            Err(WireError::PayloadTooLarge { len: total, max: MAX_FRAME_LEN })
        }
        Err(e) => {
            out.truncate(start);
            Err(WireError::Encode(e))
        }
    }
}

/// A postcard flavor that only counts bytes.
struct Count(usize);

impl Flavor for Count {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(data.len());
        Ok(())
    }

    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(1);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// "a request", "an event".
fn with_article(kind: FrameKind) -> alloc::string::String {
    match kind {
        FrameKind::Event => format!("an {kind}"),
        _ => format!("a {kind}"),
    }
}

/// The postcard varint at the start of `bytes` (an enum's variant index), if complete.
fn leading_varint(bytes: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().take(10).enumerate() {
        v |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Decode `frame`'s payload as a `T`, which must fill it exactly and be in canonical
/// form.
///
/// Postcard itself accepts over-long varints (`80 00` for 0); we do not, so that every
/// value has exactly one accepted encoding, the one in the test vectors. Every
/// non-canonical form is longer than the canonical one, so comparing the payload's
/// length with the value's encoded length (counted, not written) is enough.
///
/// `what` names the message for the error text ("request"); `variants` is the number
/// of variants when `T` is an enum, so that an unknown variant index gives
/// [`ErrorCode::UnknownRequest`] instead of [`ErrorCode::BadRequest`].
pub(crate) fn decode_message<T: DeserializeOwned + Serialize>(
    frame: &Frame,
    expected: FrameKind,
    what: &str,
    variants: Option<u32>,
) -> Result<T, ErrorReply> {
    let id = frame.request_id;
    if frame.version != PROTOCOL_VERSION {
        return Err(ErrorReply::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "{what} with request id {id} uses protocol version {}, but this side speaks version {PROTOCOL_VERSION}",
                frame.version
            ),
        ));
    }
    if frame.kind != expected {
        return Err(ErrorReply::new(
            ErrorCode::BadFrame,
            format!(
                "expected {} frame, got {} frame (request id {id})",
                with_article(expected),
                with_article(frame.kind)
            ),
        ));
    }
    match postcard::take_from_bytes::<T>(&frame.payload) {
        Ok((v, [])) => match postcard::serialize_with_flavor(&v, Count(0)) {
            Ok(len) if len == frame.payload.len() => Ok(v),
            _ => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("{what} with request id {id} is not in canonical form (an over-long varint)"),
            )),
        },
        Ok((_, rest)) => Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("{what} with request id {id} has {} unexpected bytes after the message", rest.len()),
        )),
        Err(e) => match (variants, leading_varint(&frame.payload)) {
            (Some(n), Some(index)) if index >= u64::from(n) => Err(ErrorReply::new(
                ErrorCode::UnknownRequest,
                format!(
                    "{what} with request id {id} has type {index}, unknown to protocol version {PROTOCOL_VERSION} \
                     (known: 0 to {})",
                    n.saturating_sub(1)
                ),
            )),
            _ => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("{what} with request id {id} ({} bytes) does not decode: {e}", frame.payload.len()),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint() {
        assert_eq!(leading_varint(&[]), None);
        assert_eq!(leading_varint(&[0]), Some(0));
        assert_eq!(leading_varint(&[0x7f, 1]), Some(127));
        assert_eq!(leading_varint(&[0x80, 0x01]), Some(128));
        assert_eq!(leading_varint(&[0x80]), None);
        assert_eq!(leading_varint(&[0xff; 11]), None);
    }
}
