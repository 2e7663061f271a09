//! Property tests: every message survives encode → arbitrary splits → decode; arbitrary
//! bytes never panic the decoder or the message helpers; the decoder stays bounded.

use proptest::collection::vec;
use proptest::prelude::*;
use wire::{
    CpuInfo, CpuState, ErrorCode, ErrorReply, Event, Frame, FrameDecoder, FrameKind, InfoReport, LogLevel, MemoryUse,
    PROTOCOL_VERSION, Request, Response, ServiceId, ServiceState, ServiceStatus, StreamChunk,
};

#[derive(Clone, Debug, PartialEq)]
enum Msg {
    Request(Request),
    Response(Response),
    Event(Event),
    Chunk(StreamChunk),
}

fn service_id() -> impl Strategy<Value = ServiceId> {
    prop::sample::select(ServiceId::ALL.to_vec())
}

fn service_state() -> impl Strategy<Value = ServiceState> {
    prop::sample::select(vec![ServiceState::Starting, ServiceState::Running, ServiceState::Stopped])
}

fn status() -> impl Strategy<Value = ServiceStatus> {
    (service_id(), service_state(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(service, state, handled, errors, queue_depth, queue_capacity)| ServiceStatus {
            service,
            state,
            handled,
            errors,
            queue_depth,
            queue_capacity,
        },
    )
}

fn info() -> impl Strategy<Value = InfoReport> {
    (
        ".{0,20}",
        any::<u16>(),
        any::<u64>(),
        vec(("[a-z.]{1,10}", "[ -~]{0,10}"), 0..8),
        any::<u32>(),
        any::<u64>(),
        vec(status(), 0..4),
        any::<[u64; 6]>(),
        vec("[ -~]{0,20}", 0..3),
        vec(
            (
                any::<u32>(),
                prop_oneof![Just(CpuState::Boot), Just(CpuState::Started), Just(CpuState::Failed)],
                any::<Option<u32>>(),
                any::<Option<u32>>(),
            )
                .prop_map(|(apic_id, state, package, socket)| CpuInfo { apic_id, state, package, socket }),
            0..5,
        ),
    )
        .prop_map(
            |(
                hv_version,
                protocol_version,
                uptime_ns,
                capabilities,
                cpus,
                memory_bytes,
                services,
                m,
                control,
                cpu_list,
            )| {
                let [heap_bytes, heap_used_bytes, heap_peak_bytes, heap_refused, frames_total, frames_free] = m;
                let memory_use =
                    MemoryUse { heap_bytes, heap_used_bytes, heap_peak_bytes, heap_refused, frames_total, frames_free };
                InfoReport {
                    hv_version,
                    protocol_version,
                    uptime_ns,
                    capabilities,
                    cpus,
                    memory_bytes,
                    services,
                    memory_use,
                    control,
                    cpu_list,
                }
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        vec(any::<u8>(), 0..300).prop_map(|payload| Request::Ping { payload }),
        Just(Request::Info),
        service_id().prop_map(|service| Request::ServiceStatus { service }),
        (any::<bool>(), any::<u64>(), any::<u32>()).prop_map(|(k, total_len, crc32c)| Request::ImageBegin {
            kind: if k { wire::ImageKind::Kernel } else { wire::ImageKind::Initrd },
            total_len,
            crc32c
        }),
        (any::<u32>(), any::<u64>(), vec(any::<u8>(), 0..2000), any::<u32>())
            .prop_map(|(upload, offset, bytes, crc32c)| Request::ImageChunk { upload, offset, bytes, crc32c }),
        (any::<u32>(), vec(any::<u8>(), 0..300)).prop_map(|(id, bytes)| Request::DomainConsoleInput { id, bytes }),
        Just(Request::HostCpuid),
        any::<u32>().prop_map(|len| Request::BenchFill { len }),
        vec(any::<u8>(), 0..2000).prop_map(|bytes| Request::BenchDiscard { bytes }),
        (any::<u32>(), proptest::option::of(vec(any::<u32>(), 1..=wire::MAX_PIN_CPUS)))
            .prop_map(|(id, cpus)| Request::DomainPin { id, cpus }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        vec(any::<u8>(), 0..300).prop_map(|payload| Response::Pong { payload }),
        info().prop_map(|i| Response::Info(Box::new(i))),
        status().prop_map(Response::ServiceStatus),
        (prop::sample::select(ErrorCode::ALL.to_vec()), ".{0,40}")
            .prop_map(|(code, message)| Response::Error(ErrorReply { code, message })),
        (".{0,40}", vec((any::<u32>(), any::<u32>(), any::<[u32; 4]>()), 0..200)).prop_map(|(source, recs)| {
            let records =
                recs.into_iter().map(|(leaf, subleaf, regs)| wire::CpuidLeaf { leaf, subleaf, regs }).collect();
            Response::HostCpuid(wire::HostCpuidReport { source, records })
        }),
        vec(any::<u8>(), 0..2000).prop_map(|bytes| Response::BenchData { bytes }),
        any::<u32>().prop_map(|len| Response::BenchDiscarded { len }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let level =
        prop::sample::select(vec![LogLevel::Error, LogLevel::Warn, LogLevel::Info, LogLevel::Debug, LogLevel::Trace]);
    prop_oneof![
        (level, ".{0,40}").prop_map(|(level, message)| Event::Log { level, message }),
        (service_id(), service_state()).prop_map(|(service, state)| Event::ServiceState { service, state }),
    ]
}

fn chunk() -> impl Strategy<Value = StreamChunk> {
    (any::<u32>(), any::<u32>(), any::<bool>(), vec(any::<u8>(), 0..2000))
        .prop_map(|(id, seq, last, data)| StreamChunk::new(id, seq, last, data))
}

fn msg() -> impl Strategy<Value = (u64, Msg)> {
    (
        1..=u64::MAX,
        prop_oneof![
            request().prop_map(Msg::Request),
            response().prop_map(Msg::Response),
            event().prop_map(Msg::Event),
            chunk().prop_map(Msg::Chunk),
        ],
    )
}

fn encode(id: u64, m: &Msg, out: &mut Vec<u8>) {
    match m {
        Msg::Request(r) => wire::encode_request(id, r, out),
        Msg::Response(r) => wire::encode_response(id, r, out),
        Msg::Event(e) => wire::encode_event(id, e, out),
        Msg::Chunk(c) => wire::encode_stream_chunk(id, c, out),
    }
    .unwrap();
}

fn decode(f: &Frame) -> Result<Msg, ErrorReply> {
    Ok(match f.kind {
        FrameKind::Request => Msg::Request(wire::decode_request(f)?),
        FrameKind::Response => Msg::Response(wire::decode_response(f)?),
        FrameKind::Event => Msg::Event(wire::decode_event(f)?),
        FrameKind::StreamChunk => Msg::Chunk(wire::decode_stream_chunk(f)?),
    })
}

/// Feed `bytes` in pieces of the given sizes (cycled), collecting every result.
fn feed(bytes: &[u8], sizes: &[usize]) -> Vec<Result<Frame, wire::FrameError>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    let mut input = bytes;
    let mut i = 0;
    loop {
        let size = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(usize::MAX).min(input.len());
        i += 1;
        let n = dec.push(&input[..size]);
        assert!(n <= size);
        assert!(dec.buffered() <= FrameDecoder::BUFFER_LIMIT);
        input = &input[n..];
        while let Some(r) = dec.next_frame() {
            out.push(r);
        }
        if input.is_empty() || dec.is_poisoned() {
            break;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn messages_round_trip_through_arbitrary_splits(
        msgs in vec(msg(), 1..8),
        sizes in vec(1usize..600, 1..10),
    ) {
        let mut bytes = Vec::new();
        for (id, m) in &msgs {
            encode(*id, m, &mut bytes);
        }
        let frames = feed(&bytes, &sizes);
        prop_assert_eq!(frames.len(), msgs.len());
        for (r, (id, m)) in frames.iter().zip(&msgs) {
            let f = r.as_ref().unwrap();
            prop_assert_eq!(f.request_id, *id);
            prop_assert_eq!(f.version, PROTOCOL_VERSION);
            let got = decode(f).unwrap();
            prop_assert_eq!(&got, m);
            if let Msg::Chunk(c) = got {
                prop_assert!(c.verify().is_ok());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in vec(any::<u8>(), 0..4000),
        sizes in vec(1usize..300, 1..10),
    ) {
        for f in feed(&bytes, &sizes).into_iter().flatten() {
            let _ = decode(&f);
        }
    }

    /// Arbitrary bytes behind a valid header: the decoder delivers exactly them, and
    /// every helper either decodes or gives a typed error (never a panic); whatever
    /// decodes re-encodes to the same bytes (one encoding per value).
    #[test]
    fn arbitrary_payloads_decode_or_give_typed_errors(
        payload in vec(any::<u8>(), 0..300),
        kind in 1u8..=4,
        id in 1..=u64::MAX,
    ) {
        let kind = FrameKind::from_u8(kind).unwrap();
        let mut bytes = Vec::new();
        wire::encode_frame(kind, id, &payload, &mut bytes).unwrap();
        let frames = feed(&bytes, &[7]);
        prop_assert_eq!(frames.len(), 1);
        let f = frames[0].as_ref().unwrap();
        prop_assert_eq!(&f.payload, &payload);
        match decode(f) {
            Ok(m) => {
                let mut again = Vec::new();
                encode(id, &m, &mut again);
                prop_assert_eq!(again, bytes);
            }
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownRequest), "{e}"),
        }
    }

    #[test]
    fn crc_detects_any_single_bit_flip(c in chunk(), bit in any::<prop::sample::Index>()) {
        let mut bad = c.clone();
        let nbits = bad.data.len() * 8;
        if nbits == 0 {
            bad.seq ^= 1;
        } else {
            let b = bit.index(nbits);
            bad.data[b / 8] ^= 1 << (b % 8);
        }
        prop_assert!(c.verify().is_ok());
        prop_assert!(bad.verify().is_err());
    }
}
