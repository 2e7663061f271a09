//! The frame decoder and the message helpers at their edges: partial input, several
//! frames at once, every header error, poisoning, garbage payloads, size limits.

use wire::{
    ErrorCode, Event, Frame, FrameDecoder, FrameError, FrameKind, HEADER_LEN, LogLevel, MAX_FRAME_LEN,
    PROTOCOL_VERSION, Request, Response, ServiceId, WireError,
};

fn frames() -> (Vec<u8>, Vec<(u64, Request)>) {
    let reqs = vec![
        (1, Request::Ping { payload: vec![1, 2, 3] }),
        (2, Request::Info),
        (3, Request::ServiceStatus { service: ServiceId::Monitor }),
        (u64::MAX, Request::Ping { payload: vec![0xaa; 1000] }),
    ];
    let mut bytes = Vec::new();
    for (id, r) in &reqs {
        wire::encode_request(*id, r, &mut bytes).unwrap();
    }
    (bytes, reqs)
}

fn drain(dec: &mut FrameDecoder, got: &mut Vec<(u64, Request)>) {
    while let Some(f) = dec.next_frame() {
        let f = f.unwrap();
        got.push((f.request_id, wire::decode_request(&f).unwrap()));
    }
}

/// A raw header, for frames the encoder would never produce.
fn header(magic: [u8; 2], version: u16, kind: u8, flags: u8, id: u64, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.push(kind);
    h.push(flags);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    assert_eq!(h.len(), HEADER_LEN);
    h
}

fn request_frame(payload: &[u8], id: u64) -> Frame {
    Frame { kind: FrameKind::Request, version: PROTOCOL_VERSION, request_id: id, payload: payload.to_vec() }
}

#[test]
fn byte_by_byte() {
    let (bytes, reqs) = frames();
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &bytes {
        assert_eq!(dec.push(std::slice::from_ref(b)), 1);
        drain(&mut dec, &mut got);
    }
    assert_eq!(got, reqs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn several_frames_in_one_push() {
    let (bytes, reqs) = frames();
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.push(&bytes), bytes.len());
    let mut got = Vec::new();
    drain(&mut dec, &mut got);
    assert_eq!(got, reqs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn every_split_point() {
    let (bytes, reqs) = frames();
    for split in 0..=bytes.len() {
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for part in [&bytes[..split], &bytes[split..]] {
            assert_eq!(dec.push(part), part.len());
            drain(&mut dec, &mut got);
        }
        assert_eq!(got, reqs, "split at {split}");
    }
}

#[test]
fn push_is_bounded_and_resumes() {
    // Three maximal frames: more than the decoder may hold at once.
    let mut bytes = Vec::new();
    let mut reqs = Vec::new();
    for id in 1..=3u64 {
        // Ping payload: variant byte + 3-byte varint length + data = MAX_FRAME_LEN.
        let r = Request::Ping { payload: vec![id as u8; MAX_FRAME_LEN - 4] };
        wire::encode_request(id, &r, &mut bytes).unwrap();
        reqs.push((id, r));
    }
    assert_eq!(bytes.len(), 3 * FrameDecoder::BUFFER_LIMIT);
    let mut dec = FrameDecoder::new();
    let mut input = &bytes[..];
    let mut got = Vec::new();
    while !input.is_empty() {
        let n = dec.push(input);
        assert!(dec.buffered() <= FrameDecoder::BUFFER_LIMIT);
        input = &input[n..];
        drain(&mut dec, &mut got);
    }
    assert_eq!(got, reqs);
    // A full buffer refuses more until a frame is taken.
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.push(&bytes), FrameDecoder::BUFFER_LIMIT);
    assert_eq!(dec.push(&bytes), 0);
    assert!(dec.next_frame().unwrap().is_ok());
    assert_eq!(dec.push(&bytes[FrameDecoder::BUFFER_LIMIT..]), FrameDecoder::BUFFER_LIMIT);
}

#[test]
fn oversize_length_is_refused_from_the_header_alone() {
    for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.push(&header(*b"HV", PROTOCOL_VERSION, 1, 0, 77, len)), HEADER_LEN);
        let err = dec.next_frame().unwrap().unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len, request_id: 77 });
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(err.request_id(), Some(77));
        assert!(dec.is_poisoned());
        assert_eq!(dec.buffered(), 0);
    }
    // Exactly the maximum is fine (and pending until the payload arrives).
    let mut dec = FrameDecoder::new();
    dec.push(&header(*b"HV", PROTOCOL_VERSION, 1, 0, 1, MAX_FRAME_LEN as u32));
    assert_eq!(dec.next_frame(), None);
    assert!(!dec.is_poisoned());
}

#[test]
fn bad_magic_is_refused_after_two_bytes() {
    let mut dec = FrameDecoder::new();
    dec.push(b"G");
    assert_eq!(dec.next_frame(), None);
    dec.push(b"E");
    let err = dec.next_frame().unwrap().unwrap_err();
    assert_eq!(err, FrameError::BadMagic { found: *b"GE" });
    assert_eq!(err.request_id(), None);
    assert_eq!(err.code(), ErrorCode::BadFrame);

    let mut dec = FrameDecoder::new();
    dec.push(b"GET / HTTP/1.1\r\nHost: hv\r\n\r\n");
    assert_eq!(dec.next_frame(), Some(Err(FrameError::BadMagic { found: *b"GE" })));
}

#[test]
fn wrong_version_reports_the_request_id_and_gets_a_typed_reply() {
    let mut dec = FrameDecoder::new();
    // Only the header: the decision must not wait for the payload.
    dec.push(&header(*b"HV", 99, 1, 0, 0x1234, 5));
    let err = dec.next_frame().unwrap().unwrap_err();
    assert_eq!(err, FrameError::UnsupportedVersion { version: 99, request_id: 0x1234 });
    assert!(err.to_string().contains("protocol version 99"), "{err}");

    // What the server sends back, as the client sees it.
    let mut reply = Vec::new();
    err.encode_reply(&mut reply).unwrap();
    let mut client = FrameDecoder::new();
    client.push(&reply);
    let frame = client.next_frame().unwrap().unwrap();
    assert_eq!(frame.request_id, 0x1234);
    let resp = wire::decode_response(&frame).unwrap();
    let e = resp.error().unwrap();
    assert_eq!(e.code, ErrorCode::UnsupportedVersion);
    assert!(e.code.closes_connection());
    assert!(e.message.contains("request id 4660"), "{e}");
}

#[test]
fn unknown_kind_and_reserved_flags() {
    let mut dec = FrameDecoder::new();
    dec.push(&header(*b"HV", PROTOCOL_VERSION, 9, 0, 5, 0));
    assert_eq!(dec.next_frame(), Some(Err(FrameError::UnknownKind { kind: 9, request_id: 5 })));
    let mut dec = FrameDecoder::new();
    dec.push(&header(*b"HV", PROTOCOL_VERSION, 0, 0, 5, 0));
    assert_eq!(dec.next_frame(), Some(Err(FrameError::UnknownKind { kind: 0, request_id: 5 })));
    let mut dec = FrameDecoder::new();
    dec.push(&header(*b"HV", PROTOCOL_VERSION, 1, 0x80, 6, 0));
    assert_eq!(dec.next_frame(), Some(Err(FrameError::ReservedFlags { flags: 0x80, request_id: 6 })));
}

#[test]
fn header_errors_come_in_a_fixed_order() {
    // Everything wrong at once: the version is reported (the magic is right).
    let mut dec = FrameDecoder::new();
    // A version this build does not speak, whatever the current one is.
    let other = PROTOCOL_VERSION + 1;
    dec.push(&header(*b"HV", other, 99, 0xff, 1, u32::MAX));
    assert_eq!(dec.next_frame(), Some(Err(FrameError::UnsupportedVersion { version: other, request_id: 1 })));
}

#[test]
fn poisoned_decoder_reports_once_then_discards() {
    let (good, _) = frames();
    let mut dec = FrameDecoder::new();
    let mut bytes = header(*b"HV", PROTOCOL_VERSION, 1, 0, 1, u32::MAX);
    bytes.extend_from_slice(&good);
    dec.push(&bytes);
    let err = dec.next_frame().unwrap().unwrap_err();
    assert!(dec.is_poisoned());
    assert_eq!(dec.error(), Some(&err));
    assert_eq!(dec.next_frame(), None);
    assert_eq!(dec.push(&good), good.len(), "a poisoned decoder swallows input");
    assert_eq!(dec.next_frame(), None);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn truncated_payload_stays_pending() {
    let mut bytes = Vec::new();
    wire::encode_request(9, &Request::Ping { payload: vec![5; 100] }, &mut bytes).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(&bytes[..bytes.len() - 1]);
    for _ in 0..3 {
        assert_eq!(dec.next_frame(), None);
    }
    assert!(!dec.is_poisoned());
    assert_eq!(dec.buffered(), bytes.len() - 1);
    dec.push(&bytes[bytes.len() - 1..]);
    assert_eq!(dec.next_frame().unwrap().unwrap().request_id, 9);
}

#[test]
fn garbage_payload_is_a_bad_request() {
    // Ping claims 200 bytes, has 1.
    let e = wire::decode_request(&request_frame(&[0, 200, 1], 3)).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("request id 3"), "{e}");
    // Empty payload.
    assert_eq!(wire::decode_request(&request_frame(&[], 3)).unwrap_err().code, ErrorCode::BadRequest);
    // ServiceStatus with service 7.
    assert_eq!(wire::decode_request(&request_frame(&[2, 7], 3)).unwrap_err().code, ErrorCode::BadRequest);
    // A valid Info with a trailing byte.
    let e = wire::decode_request(&request_frame(&[1, 0], 3)).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("1 unexpected bytes"), "{e}");
}

#[test]
fn non_canonical_encodings_are_refused() {
    // Postcard would read these as ServiceStatus { Core }, Info and Ping { [1, 2] }.
    for payload in [&[2u8, 0x80, 0x00][..], &[0x81, 0x00], &[0, 0x82, 0x00, 1, 2]] {
        let e = wire::decode_request(&request_frame(payload, 4)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{payload:?}: {e}");
        assert!(e.message.contains("canonical"), "{e}");
    }
}

#[test]
fn unknown_request_type() {
    // Request::VARIANTS is the first unknown variant index.
    for payload in [&[Request::VARIANTS as u8][..], &[0x80, 0x01], &[0xff, 0xff, 0xff, 0xff, 0x0f]] {
        let e = wire::decode_request(&request_frame(payload, 4)).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownRequest, "{payload:?}: {e}");
    }
}

/// (v10) CPU lists are bounded by `MAX_PIN_CPUS` and may not be empty, in `DomainPin`
/// and in `DomainCreate`; the refusal names the field and the bound.
#[test]
fn cpu_lists_are_bounded() {
    let frame_of = |r: &Request| {
        let mut out = Vec::new();
        wire::encode_request(5, r, &mut out).unwrap();
        request_frame(&out[wire::HEADER_LEN..], 5)
    };
    let pin = |cpus: Option<Vec<u32>>| Request::DomainPin { id: 2, cpus };
    for ok in [pin(None), pin(Some(vec![7])), pin(Some((0..wire::MAX_PIN_CPUS as u32).collect()))] {
        assert_eq!(wire::decode_request(&frame_of(&ok)), Ok(ok));
    }
    let e = wire::decode_request(&frame_of(&pin(Some((0..257).collect())))).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.message, "DomainPin.cpus lists 257 CPUs; at most 256 are allowed");
    let e = wire::decode_request(&frame_of(&pin(Some(vec![])))).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("DomainPin.cpus is an empty CPU list"), "{e}");
    let spec = wire::DomainSpec {
        name: "d".into(),
        kernel: wire::ImageRef::Inline(vec![1]),
        initrd: None,
        memory_bytes: 1 << 20,
        vcpus: 1,
        cpuid: None,
        cmdline: String::new(),
        cpus: Some(vec![0; 300]),
    };
    let e = wire::decode_request(&frame_of(&Request::DomainCreate(spec))).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.message, "DomainCreate.cpus lists 300 CPUs; at most 256 are allowed");
}

#[test]
fn wrong_frame_kind_or_version_for_the_helper() {
    let mut frame = request_frame(&[1], 3);
    assert_eq!(wire::decode_request(&frame), Ok(Request::Info));
    frame.kind = FrameKind::Event;
    let e = wire::decode_request(&frame).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadFrame);
    assert_eq!(e.message, "expected a request frame, got an event frame (request id 3)");
    frame.kind = FrameKind::Request;
    frame.version = wire::PROTOCOL_VERSION + 1;
    assert_eq!(wire::decode_request(&frame).unwrap_err().code, ErrorCode::UnsupportedVersion);
}

#[test]
fn request_id_zero_is_reserved() {
    let mut out = vec![0xee];
    assert_eq!(wire::encode_request(0, &Request::Info, &mut out), Err(WireError::ReservedRequestId));
    assert_eq!(out, [0xee]);
    assert_eq!(wire::decode_request(&request_frame(&[1], 0)).unwrap_err().code, ErrorCode::BadRequest);
    // Events and error replies may use id 0.
    wire::encode_event(0, &Event::Log { level: LogLevel::Info, message: "x".into() }, &mut out).unwrap();
}

#[test]
fn oversized_messages_are_refused_by_the_sender_and_leave_out_untouched() {
    let mut out = vec![1, 2, 3];
    let big = Request::Ping { payload: vec![0; MAX_FRAME_LEN] };
    assert_eq!(
        wire::encode_request(1, &big, &mut out),
        Err(WireError::PayloadTooLarge { len: MAX_FRAME_LEN + 4, max: MAX_FRAME_LEN })
    );
    assert_eq!(out, [1, 2, 3]);
    assert_eq!(
        wire::encode_frame(FrameKind::Event, 0, &vec![0; MAX_FRAME_LEN + 1], &mut out),
        Err(WireError::PayloadTooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN })
    );
    assert_eq!(out, [1, 2, 3]);
    // The largest payload that fits.
    wire::encode_frame(FrameKind::Event, 0, &vec![0; MAX_FRAME_LEN], &mut out).unwrap();
    assert_eq!(out.len(), 3 + HEADER_LEN + MAX_FRAME_LEN);
}

#[test]
fn displays_read_as_sentences() {
    let cases: Vec<(String, &str)> = vec![
        (FrameError::BadMagic { found: *b"GE" }.to_string(), "bad frame magic 0x47 0x45"),
        (FrameError::TooLarge { len: 70000, request_id: 2 }.to_string(), "declares a 70000-byte payload"),
        (FrameError::UnknownKind { kind: 9, request_id: 2 }.to_string(), "unknown kind 9"),
        (FrameError::ReservedFlags { flags: 1, request_id: 2 }.to_string(), "reserved flags 0x01"),
        (WireError::PayloadTooLarge { len: 9, max: 8 }.to_string(), "cannot frame a 9-byte payload"),
        (ErrorCode::Busy.to_string(), "the service is busy"),
    ];
    for (text, want) in cases {
        assert!(text.contains(want), "{text:?} lacks {want:?}");
    }
    for code in ErrorCode::ALL {
        assert!(!code.to_string().is_empty());
    }
}

#[test]
fn router_table() {
    assert_eq!(Request::Ping { payload: vec![] }.service(), ServiceId::Core);
    assert_eq!(Request::Info.service(), ServiceId::Core);
    for s in ServiceId::ALL {
        assert_eq!(Request::ServiceStatus { service: s }.service(), s);
    }
}

#[test]
fn pong_echoes_and_errors_decode_on_the_client() {
    let mut out = Vec::new();
    wire::encode_response(8, &Response::Pong { payload: vec![9; 10] }, &mut out).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(&out);
    let f = dec.next_frame().unwrap().unwrap();
    assert_eq!(wire::decode_response(&f), Ok(Response::Pong { payload: vec![9; 10] }));
}
