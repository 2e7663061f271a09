//! Serial-line framing: the same wire frames over a byte stream that can drop, corrupt
//! or insert bytes and has no connect or disconnect (a 16550 UART, a null-modem cable,
//! IPMI serial-over-LAN, an emulator's socket backend for a serial port).
//!
//! vsock gives the control channel a reliable, connection-oriented stream, so a frame
//! there is just its length-prefixed bytes. A serial line gives neither, so each
//! frame travels in a *packet* that is delimited, checksummed and self-contained:
//!
//! ```text
//!  packet  = COBS(body) 0x00
//!  body    = kind u8 | content | CRC-32C(kind | content) u32 LE
//!
//!  kind 1  Frame   content = one whole wire frame (18-byte header and payload)
//!  kind 2  Open    content = nonce u64 LE             client → hv: a new session
//!  kind 3  Opened  content = nonce u64 LE | max u32 LE hv → client: the session is open;
//!                                                      max = largest packet it accepts
//! ```
//!
//! How it resynchronizes:
//! - COBS (Consistent Overhead Byte Stuffing, the `cobs` crate) keeps 0x00 out of the
//!   encoded body, so every 0x00 on the line ends a packet, whatever came before it.
//! - Random bytes between packets form a "packet" of their own that fails its COBS
//!   decoding or its CRC, and is dropped and counted.
//! - Bytes dropped in the middle of a packet make only that packet fail its CRC.
//! - A client that disconnects mid-packet leaves a partial packet in the receiver. The
//!   next client starts with a 0x00, which ends it; it then fails its CRC.
//! - An empty packet (0x00 0x00) is no packet: senders may send 0x00 freely to end
//!   whatever noise preceded them.
//! - Bytes past [`MAX_ENCODED_PACKET`] without a 0x00 are discarded up to the next
//!   0x00, so memory stays bounded whatever the line carries.
//!
//! Sessions: a serial line has no connect, so a client says `Open` with a fresh nonce
//! and waits for the `Opened` with the same nonce. The server then forgets the previous
//! client (its unfinished uploads, its partial input), and the client ignores every
//! packet from before its `Opened` (late answers to a previous client). Request ids are
//! then matched per session as on vsock.
//!
//! Pure logic: no I/O, no `unsafe`, no panic on any input (the `serial_packets` fuzz
//! target).

use alloc::vec::Vec;
use core::fmt;

use crate::crc32c::crc32c;
use crate::frame::{Frame, FrameDecoder, FrameError};
use crate::{HEADER_LEN, MAX_FRAME_LEN};

/// Largest body: kind, a maximal frame, CRC.
pub const MAX_BODY: usize = 1 + HEADER_LEN + MAX_FRAME_LEN + 4;
/// Largest packet on the line without its 0x00: COBS adds one byte per 254.
pub const MAX_ENCODED_PACKET: usize = cobs::max_encoding_length(MAX_BODY);

const KIND_FRAME: u8 = 1;
const KIND_OPEN: u8 = 2;
const KIND_OPENED: u8 = 3;

/// One packet read off the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// A wire frame, decoded as on vsock.
    Frame(Frame),
    /// A client opens a session.
    Open {
        /// Chosen by the client, echoed in [`Packet::Opened`].
        nonce: u64,
    },
    /// The server opened the session.
    Opened {
        /// The client's nonce.
        nonce: u64,
        /// The largest encoded packet the server accepts.
        max_packet: u32,
    },
}

/// Why a packet was dropped. The decoder itself is never poisoned: the next 0x00
/// starts a fresh packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// More than [`MAX_ENCODED_PACKET`] bytes came without a 0x00; they were discarded
    /// up to the next one.
    Oversize,
    /// The bytes are not valid COBS.
    BadEncoding,
    /// Fewer than the 5 bytes of kind and CRC.
    TooShort {
        /// Decoded body length.
        len: usize,
    },
    /// The CRC does not match: bytes were dropped, changed or inserted.
    BadCrc {
        /// CRC carried by the packet.
        carried: u32,
        /// CRC of what arrived.
        computed: u32,
    },
    /// A kind this version does not know.
    UnknownKind(u8),
    /// An `Open`/`Opened` whose content has the wrong length.
    BadControl {
        /// The kind byte.
        kind: u8,
        /// Content length.
        len: usize,
    },
    /// The frame inside has a bad header (answerable with
    /// [`FrameError::encode_reply`]; the line stays usable).
    Frame(FrameError),
    /// The frame inside is shorter than its header says.
    TruncatedFrame,
    /// Bytes follow the frame inside the packet.
    TrailingBytes,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oversize => write!(f, "more than {MAX_ENCODED_PACKET} bytes without a packet delimiter"),
            Self::BadEncoding => f.write_str("the packet is not valid COBS"),
            Self::TooShort { len } => write!(f, "a {len}-byte packet is shorter than its kind and CRC"),
            Self::BadCrc { carried, computed } => {
                write!(f, "packet CRC {carried:#010x} does not match its contents ({computed:#010x})")
            }
            Self::UnknownKind(k) => write!(f, "unknown packet kind {k}"),
            Self::BadControl { kind, len } => write!(f, "packet kind {kind} with a {len}-byte body"),
            Self::Frame(e) => write!(f, "the frame in the packet: {e}"),
            Self::TruncatedFrame => f.write_str("the frame in the packet is shorter than its header says"),
            Self::TrailingBytes => f.write_str("bytes follow the frame in the packet"),
        }
    }
}

impl core::error::Error for PacketError {}

/// Append `COBS(kind | content | crc) 0x00` to `out`.
fn encode_packet(kind: u8, content: &[u8], out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(content.len().saturating_add(5));
    body.push(kind);
    body.extend_from_slice(content);
    let crc = crc32c(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    let start = out.len();
    out.resize(start.saturating_add(cobs::max_encoding_length(body.len())), 0);
    let written = cobs::encode(&body, out.get_mut(start..).unwrap_or_default());
    out.truncate(start.saturating_add(written));
    out.push(0);
}

/// Append the packet carrying one encoded wire frame (the bytes
/// [`encode_frame`](crate::encode_frame) or an `encode_*` helper produced).
pub fn encode_frame_packet(frame_bytes: &[u8], out: &mut Vec<u8>) {
    encode_packet(KIND_FRAME, frame_bytes, out);
}

/// Append a packet for each complete wire frame in `bytes` (several frames
/// back to back, as a server's reply queue holds them). Bytes after the last complete
/// frame are returned unconsumed: the count of bytes used.
pub fn encode_frames(bytes: &[u8], out: &mut Vec<u8>) -> usize {
    let mut used = 0;
    while let Some(rest) = bytes.get(used..) {
        let Some(header) = rest.first_chunk::<HEADER_LEN>() else { break };
        let len = u32::from_le_bytes([header[14], header[15], header[16], header[17]]) as usize;
        let end = HEADER_LEN.saturating_add(len);
        let Some(frame) = rest.get(..end) else { break };
        encode_frame_packet(frame, out);
        used = used.saturating_add(end);
    }
    used
}

/// Append an `Open` packet, preceded by a 0x00 that ends whatever partial packet the
/// previous client left on the line.
pub fn encode_open(nonce: u64, out: &mut Vec<u8>) {
    out.push(0);
    encode_packet(KIND_OPEN, &nonce.to_le_bytes(), out);
}

/// Append an `Opened` packet.
pub fn encode_opened(nonce: u64, max_packet: u32, out: &mut Vec<u8>) {
    let mut content = [0u8; 12];
    content[..8].copy_from_slice(&nonce.to_le_bytes());
    content[8..].copy_from_slice(&max_packet.to_le_bytes());
    encode_packet(KIND_OPENED, &content, out);
}

/// What a [`PacketDecoder`] has seen, for logs and `hvctl info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    /// Packets decoded.
    pub packets: u64,
    /// Packets dropped (any [`PacketError`]).
    pub dropped: u64,
    /// Of those, CRC mismatches.
    pub bad_crc: u64,
    /// Bytes discarded because no delimiter came in time.
    pub discarded_bytes: u64,
}

/// Splits a byte stream into packets. Feed it every byte read off the line.
#[derive(Clone, Debug, Default)]
pub struct PacketDecoder {
    buf: Vec<u8>,
    /// Past the limit: discard until the next 0x00.
    overflowed: bool,
    /// What happened so far.
    pub counters: PacketCounters,
}

impl PacketDecoder {
    /// A decoder with nothing buffered.
    pub const fn new() -> Self {
        Self {
            buf: Vec::new(),
            overflowed: false,
            counters: PacketCounters { packets: 0, dropped: 0, bad_crc: 0, discarded_bytes: 0 },
        }
    }

    /// Bytes of a packet not yet ended by 0x00.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forget a partial packet (a new client starts with a clean slate).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflowed = false;
    }

    /// Take one byte; a packet or an error when it was the delimiter of a non-empty one.
    pub fn push(&mut self, byte: u8) -> Option<Result<Packet, PacketError>> {
        if byte != 0 {
            if self.overflowed {
                self.counters.discarded_bytes = self.counters.discarded_bytes.saturating_add(1);
            } else if self.buf.len() >= MAX_ENCODED_PACKET {
                self.counters.discarded_bytes = self.counters.discarded_bytes.saturating_add(self.buf.len() as u64 + 1);
                self.buf = Vec::new();
                self.overflowed = true;
            } else {
                self.buf.push(byte);
            }
            return None;
        }
        if core::mem::take(&mut self.overflowed) {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            return Some(Err(PacketError::Oversize));
        }
        if self.buf.is_empty() {
            return None;
        }
        let result = decode_body(&mut self.buf);
        self.buf.clear();
        match &result {
            Ok(_) => self.counters.packets = self.counters.packets.saturating_add(1),
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                if matches!(e, PacketError::BadCrc { .. }) {
                    self.counters.bad_crc = self.counters.bad_crc.saturating_add(1);
                }
            }
        }
        Some(result)
    }
}

/// Decode one COBS-encoded body (without its 0x00) in place.
fn decode_body(encoded: &mut [u8]) -> Result<Packet, PacketError> {
    let len = cobs::decode_in_place(encoded).map_err(|_| PacketError::BadEncoding)?;
    let body = encoded.get(..len).ok_or(PacketError::BadEncoding)?;
    let split = len.checked_sub(4).filter(|&n| n >= 1).ok_or(PacketError::TooShort { len })?;
    let (data, crc_bytes) = body.split_at(split);
    let carried = crc_bytes.first_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b));
    let computed = crc32c(data);
    if carried != computed {
        return Err(PacketError::BadCrc { carried, computed });
    }
    let (&kind, content) = data.split_first().ok_or(PacketError::TooShort { len })?;
    let bad = || PacketError::BadControl { kind, len: content.len() };
    match kind {
        KIND_FRAME => {
            let mut decoder = FrameDecoder::new();
            let taken = decoder.push(content);
            match decoder.next_frame() {
                Some(Ok(_)) if taken < content.len() || decoder.buffered() > 0 => Err(PacketError::TrailingBytes),
                Some(Ok(frame)) => Ok(Packet::Frame(frame)),
                Some(Err(e)) => Err(PacketError::Frame(e)),
                None => Err(PacketError::TruncatedFrame),
            }
        }
        KIND_OPEN => {
            let nonce = content.first_chunk::<8>().filter(|_| content.len() == 8).ok_or_else(bad)?;
            Ok(Packet::Open { nonce: u64::from_le_bytes(*nonce) })
        }
        KIND_OPENED => {
            if content.len() != 12 {
                return Err(bad());
            }
            let nonce = content.first_chunk::<8>().ok_or_else(bad)?;
            let max = content.get(8..).and_then(|m| m.first_chunk::<4>()).ok_or_else(bad)?;
            Ok(Packet::Opened { nonce: u64::from_le_bytes(*nonce), max_packet: u32::from_le_bytes(*max) })
        }
        other => Err(PacketError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, decode_request, encode_request};
    use alloc::vec;
    use proptest::prelude::*;

    fn frame_bytes(id: u64, request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(id, request, &mut out).unwrap();
        out
    }

    fn decode_all(decoder: &mut PacketDecoder, bytes: &[u8]) -> Vec<Result<Packet, PacketError>> {
        bytes.iter().filter_map(|&b| decoder.push(b)).collect()
    }

    fn requests(results: &[Result<Packet, PacketError>]) -> Vec<(u64, Request)> {
        results
            .iter()
            .filter_map(|r| match r {
                Ok(Packet::Frame(f)) => Some((f.request_id, decode_request(f).unwrap())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn frames_open_and_opened_round_trip() {
        let mut line = Vec::new();
        encode_open(77, &mut line);
        encode_frame_packet(&frame_bytes(1, &Request::Info), &mut line);
        encode_opened(77, 4096, &mut line);
        assert_eq!(line.iter().filter(|&&b| b == 0).count(), 4, "a leading 0x00 and one delimiter per packet");
        let got = decode_all(&mut PacketDecoder::new(), &line);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Ok(Packet::Open { nonce: 77 }));
        assert_eq!(requests(&got), vec![(1, Request::Info)]);
        assert_eq!(got[2], Ok(Packet::Opened { nonce: 77, max_packet: 4096 }));
    }

    #[test]
    fn a_maximal_frame_fits_and_zeros_in_it_survive() {
        let payload = vec![0u8; MAX_FRAME_LEN - 16];
        let bytes = frame_bytes(9, &Request::Ping { payload: payload.clone() });
        let mut line = Vec::new();
        encode_frame_packet(&bytes, &mut line);
        assert!(line.len() - 1 <= MAX_ENCODED_PACKET);
        assert_eq!(line.iter().filter(|&&b| b == 0).count(), 1, "only the delimiter is 0");
        let got = decode_all(&mut PacketDecoder::new(), &line);
        assert_eq!(requests(&got), vec![(9, Request::Ping { payload })]);
    }

    #[test]
    fn several_frames_from_a_reply_queue_become_packets() {
        let mut queue = frame_bytes(1, &Request::Info);
        queue.extend(frame_bytes(2, &Request::Ping { payload: vec![1, 2] }));
        let partial = frame_bytes(3, &Request::Info);
        queue.extend(&partial[..10]);
        let mut line = Vec::new();
        let used = encode_frames(&queue, &mut line);
        assert_eq!(used, queue.len() - 10);
        let got = decode_all(&mut PacketDecoder::new(), &line);
        assert_eq!(requests(&got), vec![(1, Request::Info), (2, Request::Ping { payload: vec![1, 2] })]);
    }

    #[test]
    fn a_dropped_byte_loses_only_its_packet() {
        let mut line = Vec::new();
        encode_frame_packet(&frame_bytes(1, &Request::Ping { payload: vec![5; 40] }), &mut line);
        let first_end = line.len();
        encode_frame_packet(&frame_bytes(2, &Request::Info), &mut line);
        for drop_at in 0..first_end - 1 {
            let mut damaged = line.clone();
            damaged.remove(drop_at);
            let mut decoder = PacketDecoder::new();
            let got = decode_all(&mut decoder, &damaged);
            assert_eq!(requests(&got), vec![(2, Request::Info)], "dropped byte {drop_at}");
            assert_eq!(decoder.counters.dropped, 1);
        }
    }

    #[test]
    fn a_disconnect_mid_packet_is_ended_by_the_next_open() {
        let mut line = Vec::new();
        encode_frame_packet(&frame_bytes(1, &Request::Info), &mut line);
        line.truncate(line.len() / 2);
        encode_open(5, &mut line);
        let mut decoder = PacketDecoder::new();
        let got = decode_all(&mut decoder, &line);
        assert_eq!(got.last(), Some(&Ok(Packet::Open { nonce: 5 })));
        assert_eq!(got.len(), 2);
        assert!(got[0].is_err());
    }

    #[test]
    fn an_endless_run_without_delimiter_is_bounded_and_recovers() {
        let mut decoder = PacketDecoder::new();
        for _ in 0..MAX_ENCODED_PACKET + 1000 {
            assert_eq!(decoder.push(0x41), None);
        }
        assert!(decoder.buffered() <= MAX_ENCODED_PACKET);
        assert_eq!(decoder.push(0), Some(Err(PacketError::Oversize)));
        let mut line = Vec::new();
        encode_frame_packet(&frame_bytes(3, &Request::Info), &mut line);
        assert_eq!(requests(&decode_all(&mut decoder, &line)), vec![(3, Request::Info)]);
    }

    #[test]
    fn a_bad_frame_header_inside_is_reported_not_fatal() {
        let mut bytes = frame_bytes(4, &Request::Info);
        bytes[2] = 99; // version
        let mut line = Vec::new();
        encode_frame_packet(&bytes, &mut line);
        encode_frame_packet(&frame_bytes(5, &Request::Info), &mut line);
        let got = decode_all(&mut PacketDecoder::new(), &line);
        assert!(matches!(got[0], Err(PacketError::Frame(FrameError::UnsupportedVersion { .. }))), "{got:?}");
        assert_eq!(requests(&got), vec![(5, Request::Info)]);
    }

    #[test]
    fn wrong_lengths_and_kinds_are_refused() {
        let cases: [(u8, &[u8]); 4] =
            [(KIND_OPEN, &[1, 2, 3]), (KIND_OPENED, &[0; 8]), (9, &[]), (KIND_FRAME, &[0x48])];
        for (kind, content) in cases {
            let mut line = Vec::new();
            encode_packet(kind, content, &mut line);
            let got = decode_all(&mut PacketDecoder::new(), &line);
            assert_eq!(got.len(), 1);
            assert!(got[0].is_err(), "kind {kind} {content:?}: {got:?}");
        }
        let mut line = frame_bytes(6, &Request::Info);
        line.push(1);
        let mut packet = Vec::new();
        encode_frame_packet(&line, &mut packet);
        assert_eq!(decode_all(&mut PacketDecoder::new(), &packet), vec![Err(PacketError::TrailingBytes)]);
    }

    proptest! {
        /// Noise between packets never loses a packet and never yields a false one.
        #[test]
        fn random_noise_between_packets(noise in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8)) {
            let mut line = Vec::new();
            let mut sent = Vec::new();
            for (i, n) in noise.iter().enumerate() {
                line.extend(n);
                // A sender ends noise with a 0x00 before its packet.
                line.push(0);
                let request = Request::Ping { payload: n.clone() };
                encode_frame_packet(&frame_bytes(i as u64 + 1, &request), &mut line);
                sent.push((i as u64 + 1, request));
            }
            let got = decode_all(&mut PacketDecoder::new(), &line);
            prop_assert_eq!(requests(&got), sent);
        }

        /// Any bytes at all: no panic, bounded memory.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut decoder = PacketDecoder::new();
            for b in bytes {
                let _ = decoder.push(b);
                prop_assert!(decoder.buffered() <= MAX_ENCODED_PACKET);
            }
        }
    }
}
