//! Streams: numbering, the end marker, CRC-32C per chunk, and every refusal of the
//! reassembler.

use proptest::prelude::*;
use wire::{
    ErrorCode, FrameDecoder, MAX_CHUNK_DATA, MAX_FRAME_LEN, StreamChunk, StreamError, StreamReassembler, StreamSender,
};

fn chunks(stream_id: u32, parts: &[&[u8]]) -> Vec<StreamChunk> {
    let mut tx = StreamSender::new(stream_id);
    let n = parts.len();
    parts.iter().enumerate().map(|(i, p)| tx.chunk(p.to_vec(), i + 1 == n).unwrap()).collect()
}

#[test]
fn in_order_stream_is_reassembled() {
    let cs = chunks(3, &[b"dirty ", b"bitmap ", b"words", b""]);
    assert_eq!(cs.iter().map(|c| c.seq).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(cs.iter().map(|c| c.last).collect::<Vec<_>>(), [false, false, false, true]);
    let mut rx = StreamReassembler::new(3);
    let mut data = Vec::new();
    for c in &cs {
        assert!(!rx.is_finished());
        data.extend_from_slice(rx.accept(c).unwrap());
    }
    assert!(rx.is_finished());
    assert_eq!(data, b"dirty bitmap words");
    assert_eq!((rx.chunks(), rx.bytes()), (4, 18));
}

#[test]
fn out_of_order_is_refused() {
    let cs = chunks(1, &[b"a", b"b", b"c"]);
    let mut rx = StreamReassembler::new(1);
    assert_eq!(rx.accept(&cs[1]), Err(StreamError::OutOfOrder { stream_id: 1, seq: 1, expected: 0 }));
    // The refusal left the state as it was.
    assert_eq!(rx.accept(&cs[0]), Ok(&b"a"[..]));
    let e = rx.accept(&cs[2]).unwrap_err();
    assert_eq!(e, StreamError::OutOfOrder { stream_id: 1, seq: 2, expected: 1 });
    assert_eq!(e.to_string(), "stream 1 chunk 2 arrived out of order: chunk 1 is missing");
}

#[test]
fn duplicate_is_refused() {
    let cs = chunks(1, &[b"a", b"b"]);
    let mut rx = StreamReassembler::new(1);
    rx.accept(&cs[0]).unwrap();
    let e = rx.accept(&cs[0]).unwrap_err();
    assert_eq!(e, StreamError::Duplicate { stream_id: 1, seq: 0, expected: 1 });
    assert_eq!(e.to_string(), "stream 1 chunk 0 arrived twice (chunks up to 0 were already received)");
}

#[test]
fn chunk_after_last_is_refused() {
    let cs = chunks(1, &[b"a", b"b"]);
    let mut rx = StreamReassembler::new(1);
    rx.accept(&cs[0]).unwrap();
    rx.accept(&cs[1]).unwrap();
    let extra = StreamChunk::new(1, 2, false, b"c".to_vec());
    assert_eq!(rx.accept(&extra), Err(StreamError::AfterLast { stream_id: 1, seq: 2 }));
    // And the sender will not make one.
    let mut tx = StreamSender::new(1);
    tx.chunk(vec![], true).unwrap();
    assert!(tx.is_finished());
    assert_eq!(tx.chunk(vec![], false).unwrap_err(), StreamError::AfterLast { stream_id: 1, seq: 1 });
}

#[test]
fn crc_mismatch_is_refused() {
    let mut c = StreamChunk::new(1, 0, false, b"page record".to_vec());
    c.data[0] ^= 0x20;
    let mut rx = StreamReassembler::new(1);
    let e = rx.accept(&c).unwrap_err();
    assert!(matches!(e, StreamError::CrcMismatch { stream_id: 1, seq: 0, .. }), "{e:?}");
    assert!(e.to_string().starts_with("stream 1 chunk 0 is corrupt: it carries CRC-32C 0x"), "{e}");
    assert_eq!(e.to_reply().code, ErrorCode::BadRequest);
    assert_eq!(rx.next_seq(), 0);

    // The CRC binds the chunk's identity too: same data, other position.
    let good = StreamChunk::new(1, 0, false, b"x".to_vec());
    for moved in [
        StreamChunk { seq: 1, ..good.clone() },
        StreamChunk { stream_id: 2, ..good.clone() },
        StreamChunk { last: true, ..good.clone() },
    ] {
        assert!(matches!(moved.verify(), Err(StreamError::CrcMismatch { .. })));
    }
}

#[test]
fn wrong_stream_is_refused() {
    let c = StreamChunk::new(2, 0, true, vec![]);
    let mut rx = StreamReassembler::new(1);
    assert_eq!(rx.accept(&c), Err(StreamError::WrongStream { expected: 1, found: 2 }));
}

#[test]
fn crc_is_over_identity_and_data() {
    let c = StreamChunk::new(0x0102_0304, 5, true, b"123456789".to_vec());
    let mut covered = Vec::new();
    covered.extend_from_slice(&0x0102_0304u32.to_le_bytes());
    covered.extend_from_slice(&5u32.to_le_bytes());
    covered.push(1);
    covered.extend_from_slice(b"123456789");
    assert_eq!(c.crc32c, wire::crc32c(&covered));
}

#[test]
fn sender_limits() {
    let mut tx = StreamSender::new(4);
    assert_eq!(
        tx.chunk(vec![0; MAX_CHUNK_DATA + 1], false).unwrap_err(),
        StreamError::TooLarge { stream_id: 4, len: MAX_CHUNK_DATA + 1 }
    );
    // A maximal chunk with maximal header fields still fits in one frame.
    let c = StreamChunk::new(u32::MAX, u32::MAX, true, vec![0xff; MAX_CHUNK_DATA]);
    let mut out = Vec::new();
    wire::encode_stream_chunk(u64::MAX, &c, &mut out).unwrap();
    assert!(out.len() <= wire::HEADER_LEN + MAX_FRAME_LEN);
    let mut dec = FrameDecoder::new();
    dec.push(&out);
    let f = dec.next_frame().unwrap().unwrap();
    assert_eq!(wire::decode_stream_chunk(&f).unwrap(), c);
}

#[test]
fn chunk_debug_is_short() {
    let c = StreamChunk::new(1, 2, false, vec![7; 60 * 1024]);
    let s = format!("{c:?}");
    assert!(s.len() < 200, "{s}");
    assert!(s.contains("61440 bytes"), "{s}");
}

proptest! {
    #[test]
    fn sender_and_reassembler_agree(parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 1..20), id in any::<u32>()) {
        let mut tx = StreamSender::new(id);
        let mut rx = StreamReassembler::new(id);
        let mut got = Vec::new();
        let n = parts.len();
        for (i, p) in parts.iter().enumerate() {
            let c = tx.chunk(p.clone(), i + 1 == n).unwrap();
            // Through a frame and back.
            let mut out = Vec::new();
            wire::encode_stream_chunk(1, &c, &mut out).unwrap();
            let mut dec = FrameDecoder::new();
            dec.push(&out);
            let c = wire::decode_stream_chunk(&dec.next_frame().unwrap().unwrap()).unwrap();
            got.extend_from_slice(rx.accept(&c).unwrap());
        }
        prop_assert!(rx.is_finished());
        prop_assert_eq!(got, parts.concat());
    }
}
