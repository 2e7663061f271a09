//! Arbitrary bytes, delivered in arbitrary chunks, through the frame decoder and every
//! message decoder: nothing may panic, the decoder never holds more than one maximal
//! frame, always makes progress, and whatever decodes re-encodes to the same bytes.
//!
//! Input layout: the first byte seeds the chunk sizes, the rest is the byte stream.
//! Run: `cd wire/fuzz && cargo +nightly fuzz run frame_decoder -- -max_total_time=60`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{
    FrameDecoder, FrameKind, HEADER_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION, StreamReassembler, decode_event,
    decode_request, decode_response, decode_stream_chunk, encode_event, encode_request, encode_response,
    encode_stream_chunk,
};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else { return };
    let mut rng = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        rng
    };

    let mut dec = FrameDecoder::new();
    let mut input = stream;
    while !input.is_empty() && !dec.is_poisoned() {
        // Mostly small pieces, sometimes everything that is left.
        let r = next();
        let size = if r % 8 == 0 { input.len() } else { (r as usize >> 3) % 64 + 1 }.min(input.len());
        let n = dec.push(&input[..size]);
        assert!(n <= size);
        assert!(n > 0, "a decoder that was drained must accept at least one byte");
        assert!(dec.buffered() <= FrameDecoder::BUFFER_LIMIT);
        input = &input[n..];
        while let Some(r) = dec.next_frame() {
            match r {
                Ok(frame) => {
                    assert_eq!(frame.version, PROTOCOL_VERSION);
                    assert!(frame.payload.len() <= MAX_FRAME_LEN);
                    check(frame.kind, frame.request_id, &frame.payload);
                }
                Err(e) => {
                    assert!(dec.is_poisoned());
                    let _ = e.to_string();
                    let mut reply = Vec::new();
                    e.encode_reply(&mut reply).expect("an error reply always encodes");
                }
            }
        }
    }
    if dec.is_poisoned() {
        assert_eq!(dec.push(input), input.len());
        assert!(dec.next_frame().is_none());
    }

    // The same bytes as the payload of every kind of frame, to reach the message
    // decoders without having to find a valid header first.
    for kind in [FrameKind::Request, FrameKind::Response, FrameKind::Event, FrameKind::StreamChunk] {
        check(kind, 1, stream);
    }
});

/// Decode `payload` as a message of `kind`; if it decodes, it must re-encode to exactly
/// the same bytes (there is one accepted encoding per value).
fn check(kind: FrameKind, request_id: u64, payload: &[u8]) {
    let frame = wire::Frame { kind, version: PROTOCOL_VERSION, request_id, payload: payload.to_vec() };
    let mut out = Vec::new();
    let encoded = match kind {
        FrameKind::Request => decode_request(&frame).map(|m| {
            let _ = (m.service(), m.name());
            // (v10) A decoded CPU list is never empty and never longer than the bound.
            let cpus = match &m {
                wire::Request::DomainPin { cpus, .. } => cpus.as_deref(),
                wire::Request::DomainCreate(spec) => spec.cpus.as_deref(),
                _ => None,
            };
            assert!(cpus.is_none_or(|c| !c.is_empty() && c.len() <= wire::MAX_PIN_CPUS));
            encode_request(request_id, &m, &mut out)
        }),
        FrameKind::Response => decode_response(&frame).map(|m| encode_response(request_id, &m, &mut out)),
        FrameKind::Event => decode_event(&frame).map(|m| encode_event(request_id, &m, &mut out)),
        FrameKind::StreamChunk => decode_stream_chunk(&frame).map(|c| {
            let _ = c.verify();
            let _ = StreamReassembler::new(c.stream_id).accept(&c).map_err(|e| e.to_string());
            encode_stream_chunk(request_id, &c, &mut out)
        }),
    };
    match encoded {
        Ok(r) => {
            r.expect("a decoded message re-encodes");
            assert_eq!(&out[HEADER_LEN..], payload, "decoded {kind} re-encodes differently");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
