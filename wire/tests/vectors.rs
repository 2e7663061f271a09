//! The checked-in test vectors: the exact bytes of every message, framed.
//!
//! `tests/vectors/v<PROTOCOL_VERSION>/<name>.hex` holds one frame per file as hex
//! (lines starting with `#` are comments). The test encodes every vector below and
//! compares byte for byte, then decodes the stored bytes and compares the value.
//!
//! Regenerate with `WIRE_REGENERATE_VECTORS=1 cargo test -p wire --test vectors`. It
//! writes missing files and refreshes comments, but refuses to change the bytes of an
//! existing vector: within a protocol version the format is frozen. To change it, bump
//! `PROTOCOL_VERSION` (the new `v<N>` directory is then written from scratch; older
//! directories stay and must be refused from their header).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use wire::{
    ConsoleChunk, CpuInfo, CpuState, CpuidLeaf, DirtyBitmapReport, DirtyStatsReport, DomainInfo, DomainListReport,
    DomainSpec, ErrorCode, ErrorReply, Event, Frame, FrameDecoder, FrameError, FrameKind, HEADER_LEN, HostCpuidReport,
    ImageKind, ImageRef, InfoReport, LogLevel, MemoryUse, MigrateOptions, MigrateProgress, MigrateReport,
    MonitorDomainStats, MonitorHwInfo, MonitorValue, PROTOCOL_VERSION, PeerVerdict, ReceiveState, ReceiveStatus,
    Request, Response, SendState, ServiceId, ServiceState, ServiceStatus, StreamChunk, UnclaimedAccess, UploadStatus,
};

#[derive(Debug, PartialEq)]
enum Msg {
    Request(Request),
    Response(Response),
    Event(Event),
    Chunk(StreamChunk),
}

struct Vector {
    name: String,
    request_id: u64,
    msg: Msg,
}

fn v(name: &str, request_id: u64, msg: Msg) -> Vector {
    Vector { name: name.to_string(), request_id, msg }
}

fn status(service: ServiceId, state: ServiceState, handled: u64, errors: u64, depth: u32) -> ServiceStatus {
    ServiceStatus { service, state, handled, errors, queue_depth: depth, queue_capacity: 16 }
}

/// Every vector. Each message variant, each service id, each error code and each log
/// level appears at least once.
fn vectors() -> Vec<Vector> {
    let info = InfoReport {
        hv_version: "0.1.0 (5a3cac6)".to_string(),
        protocol_version: 11,
        uptime_ns: 3_800_000_000,
        capabilities: [("v", "1"), ("vendor", "AuthenticAMD"), ("family", "23"), ("virt", "svm"), ("svm.npt", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cpus: 2,
        memory_bytes: 512 << 20,
        services: vec![
            status(ServiceId::Core, ServiceState::Running, 42, 1, 0),
            status(ServiceId::Monitor, ServiceState::Starting, 0, 0, 0),
            status(ServiceId::Migration, ServiceState::Stopped, 7, 7, 0),
        ],
        memory_use: MemoryUse {
            heap_bytes: 32 << 20,
            heap_used_bytes: 1_234_567,
            heap_peak_bytes: 2_345_678,
            heap_refused: 1,
            frames_total: 480_000,
            frames_free: 470_000,
        },
        control: vec!["vsock port 5000 (CID 3)".to_string(), "serial COM2 0x2f8 115200 baud".to_string()],
        cpu_list: vec![
            CpuInfo { apic_id: 0, state: CpuState::Boot, package: Some(0), socket: Some(0) },
            CpuInfo { apic_id: 1, state: CpuState::Started, package: Some(1), socket: Some(1) },
            CpuInfo { apic_id: 3, state: CpuState::Failed, package: None, socket: None },
        ],
    };
    let mut out = vec![
        v("request_ping", 1, Msg::Request(Request::Ping { payload: vec![0xde, 0xad, 0xbe, 0xef] })),
        v("request_ping_empty", 2, Msg::Request(Request::Ping { payload: vec![] })),
        v("request_info", 3, Msg::Request(Request::Info)),
        v("request_service_status_core", 4, Msg::Request(Request::ServiceStatus { service: ServiceId::Core })),
        v("request_service_status_monitor", 5, Msg::Request(Request::ServiceStatus { service: ServiceId::Monitor })),
        v(
            "request_service_status_migration",
            0x0123_4567_89ab_cdef,
            Msg::Request(Request::ServiceStatus { service: ServiceId::Migration }),
        ),
        v("response_pong", 1, Msg::Response(Response::Pong { payload: vec![0xde, 0xad, 0xbe, 0xef] })),
        v("response_info", 3, Msg::Response(Response::Info(Box::new(info)))),
        v(
            "response_service_status",
            5,
            Msg::Response(Response::ServiceStatus(status(ServiceId::Monitor, ServiceState::Running, 300, 2, 3))),
        ),
        v("event_log", 0, Msg::Event(Event::Log { level: LogLevel::Warn, message: "RDT monitoring absent".into() })),
        v(
            "event_service_state",
            0,
            Msg::Event(Event::ServiceState { service: ServiceId::Migration, state: ServiceState::Running }),
        ),
        v(
            "request_domain_create",
            10,
            Msg::Request(Request::DomainCreate(DomainSpec {
                name: "probe".into(),
                kernel: ImageRef::Inline(b"\x7fELF\x02\x01\x01".to_vec()),
                initrd: None,
                memory_bytes: 16 << 20,
                vcpus: 2,
                cpuid: Some("base=host-max,-avx2".into()),
                cmdline: "pages=3".into(),
                cpus: Some(vec![1, 2, 3]),
            })),
        ),
        v("request_domain_list", 11, Msg::Request(Request::DomainList)),
        v("request_domain_pause", 12, Msg::Request(Request::DomainPause { id: 3 })),
        v("request_domain_unpause", 13, Msg::Request(Request::DomainUnpause { id: 3 })),
        v("request_domain_destroy", 14, Msg::Request(Request::DomainDestroy { id: 3 })),
        v("request_domain_console", 15, Msg::Request(Request::DomainConsole { id: 3, offset: 300 })),
        v("response_domain_created", 10, Msg::Response(Response::DomainCreated { id: 3 })),
        v(
            "response_domain_list",
            11,
            Msg::Response(Response::DomainList(DomainListReport {
                domains: vec![DomainInfo {
                    id: 3,
                    name: "probe".into(),
                    state: "crashed: triple fault (last RIP 0x200010)".into(),
                    vcpus: 1,
                    memory_bytes: 0,
                    exits: vec![("cpuid".into(), 102), ("io".into(), 6000)],
                    runtime_ns: 12_345_678,
                    unclaimed: vec![
                        UnclaimedAccess { mmio: false, addr: 0x80, reads: 0, writes: 41 },
                        UnclaimedAccess { mmio: true, addr: 0xfed0_0000, reads: 2, writes: 0 },
                    ],
                    cpus: Some(vec![0, 2]),
                }],
                free_frames: 40_000,
                total_frames: 49_152,
            })),
        ),
        v("response_done", 12, Msg::Response(Response::Done)),
        v(
            "response_console",
            15,
            Msg::Response(Response::Console(ConsoleChunk {
                id: 3,
                offset: 300,
                data: b"hello\n".to_vec(),
                total: 306,
            })),
        ),
        v("request_monitor_hwinfo", 16, Msg::Request(Request::MonitorHwInfo)),
        v("request_monitor_attach", 17, Msg::Request(Request::MonitorAttach { domain: 3, vcpus: Some(vec![0, 2]) })),
        v("request_monitor_detach", 18, Msg::Request(Request::MonitorDetach { domain: 3 })),
        v(
            "request_monitor_events",
            19,
            Msg::Request(Request::MonitorEvents {
                domain: 3,
                enable: vec!["vm_exits".into(), "llc_occupancy".into()],
                disable: vec!["halts".into()],
            }),
        ),
        v("request_monitor_stats", 20, Msg::Request(Request::MonitorStats { domain: None })),
        v(
            "response_monitor_hwinfo",
            16,
            Msg::Response(Response::MonitorHwInfo(MonitorHwInfo {
                present: false,
                reason: Some("CPU has no RDT monitoring (CPUID.7.EBX[12]=0)".into()),
                usable_rmids: 0,
                max_rmid: 0,
                sockets: 2,
                socket_cpus: vec![vec![0], vec![1, 3]],
                l3_bytes: 0,
                upscaling_factor: 0,
                counter_width: 0,
                hw_events: vec![],
                all_events: vec!["llc_occupancy".into(), "vm_exits".into()],
            })),
        ),
        v(
            "response_monitor_stats",
            20,
            Msg::Response(Response::MonitorStats(vec![MonitorDomainStats {
                domain: 3,
                events: vec![
                    (
                        "llc_occupancy".into(),
                        MonitorValue::Occupancy { bytes: 1 << 20, residual_bytes: 4096, per_socket: vec![1 << 20, 0] },
                    ),
                    (
                        "mbm_total".into(),
                        MonitorValue::Bandwidth {
                            bytes: 1 << 30,
                            bytes_per_sec: Some(5 << 20),
                            per_socket: vec![5 << 20],
                        },
                    ),
                    (
                        "mbm_local".into(),
                        MonitorValue::NotAvailable("CPU has no RDT monitoring (CPUID.7.EBX[12]=0)".into()),
                    ),
                    ("vm_exits".into(), MonitorValue::ByReason(vec![("cpuid".into(), 102), ("io".into(), 7)])),
                    ("halts".into(), MonitorValue::Count(4)),
                ],
            }])),
        ),
        v(
            "request_dirty_start",
            21,
            Msg::Request(Request::DirtyStart { domain: 3, mode: "auto".into(), range: Some((1024, 256)) }),
        ),
        v("request_dirty_stop", 22, Msg::Request(Request::DirtyStop { domain: 3 })),
        v("request_dirty_stats", 23, Msg::Request(Request::DirtyStats { domain: 3 })),
        v("request_dirty_peek", 24, Msg::Request(Request::DirtyPeek { domain: 3, clean: true })),
        v("request_dirty_track", 25, Msg::Request(Request::DirtyTrack { domain: 3, range: (4096, 128) })),
        v("request_dirty_track_peek", 26, Msg::Request(Request::DirtyTrackPeek { domain: 3, clean: false })),
        v("request_dirty_track_stop", 27, Msg::Request(Request::DirtyTrackStop { domain: 3 })),
        v(
            "response_dirty_stats",
            23,
            Msg::Response(Response::DirtyStats(DirtyStatsReport {
                domain: 3,
                mode: "pml".into(),
                pages_dirtied: 4096,
                dirty_now: 12,
                rounds: 7,
                logging_exits: 8,
                range_start: 0,
                range_pages: 2048,
            })),
        ),
        v(
            "response_dirty_bitmap",
            24,
            Msg::Response(Response::DirtyBitmap({
                let mut b = wire::dirty::DirtyBitmap::new(2048).unwrap();
                b.set_range(100..164).unwrap();
                b.set(1500).unwrap();
                DirtyBitmapReport { domain: 3, pages: 2048, dirty: b.count_ones(), records: b.to_records() }
            })),
        ),
        v(
            "request_migrate_send",
            30,
            Msg::Request(Request::MigrateSend {
                domain: 2,
                options: MigrateOptions { bandwidth_bytes_per_sec: Some(50_000_000), ..MigrateOptions::default() },
            }),
        ),
        v("request_migrate_read", 31, Msg::Request(Request::MigrateRead { session: 1, max_bytes: 61440 })),
        v(
            "request_migrate_verdict",
            32,
            Msg::Request(Request::MigrateVerdict { session: 1, verdict: PeerVerdict::PolicyAccepted }),
        ),
        v(
            "request_migrate_verdict_refused",
            33,
            Msg::Request(Request::MigrateVerdict {
                session: 1,
                verdict: PeerVerdict::Refused("avx2 is not available on this host".into()),
            }),
        ),
        v("request_migrate_cancel", 34, Msg::Request(Request::MigrateCancel { domain: 2 })),
        v("request_migrate_receive", 35, Msg::Request(Request::MigrateReceive)),
        v("request_migrate_write", 36, Msg::Request(Request::MigrateWrite { session: 7, data: vec![1, 0, 1, 0] })),
        v(
            "request_migrate_abort",
            37,
            Msg::Request(Request::MigrateAbort { session: 7, reason: "source connection broke".into() }),
        ),
        v(
            "response_migrate_progress",
            30,
            Msg::Response(Response::MigrateProgress(Box::new(MigrateProgress {
                session: 1,
                domain: 2,
                state: Some(SendState::Completed),
                round: 3,
                pages_total: 1024,
                pages_sent: 1100,
                bytes_sent: 2_400_000,
                dirty_pages: 12,
                dirty_pages_per_sec: 400,
                bandwidth_bytes_per_sec: 9_000_000,
                estimated_downtime_ms: 6,
                throttle_percent: 0,
                failure: None,
                report: Some(MigrateReport {
                    rounds: 3,
                    pages_sent: 1100,
                    pages_resent: 76,
                    bytes_sent: 2_400_000,
                    duration_ms: 900,
                    downtime_ms: 41,
                    estimated_downtime_ms: 6,
                    max_throttle_percent: 0,
                    memory_digest: Some(0x0123_4567_89ab_cdef),
                }),
            }))),
        ),
        v(
            "response_migrate_data",
            31,
            Msg::Response(Response::MigrateData {
                data: vec![6, 0, 1, 0],
                progress: Box::new(MigrateProgress {
                    session: 1,
                    domain: 2,
                    state: Some(SendState::Failed),
                    failure: Some("migration cancelled".into()),
                    ..MigrateProgress::default()
                }),
            }),
        ),
        v(
            "response_receive_status",
            36,
            Msg::Response(Response::ReceiveStatus(ReceiveStatus {
                session: 7,
                state: ReceiveState::Receiving,
                domain: Some(1),
                policy: Some(Ok(())),
                pages_received: 512,
                bytes_received: 2_100_000,
                error: None,
                memory_digest: None,
            })),
        ),
        v(
            "request_domain_create_uploaded",
            40,
            Msg::Request(Request::DomainCreate(DomainSpec {
                name: "linux".into(),
                kernel: ImageRef::Uploaded(1),
                initrd: Some(ImageRef::Uploaded(2)),
                memory_bytes: 256 << 20,
                vcpus: 1,
                cpuid: None,
                cmdline: "console=ttyS0".into(),
                cpus: None,
            })),
        ),
        v(
            "request_image_begin",
            41,
            Msg::Request(Request::ImageBegin { kind: ImageKind::Kernel, total_len: 14_000_000, crc32c: 0xe306_9283 }),
        ),
        v(
            "request_image_begin_initrd",
            42,
            Msg::Request(Request::ImageBegin { kind: ImageKind::Initrd, total_len: 9, crc32c: 0xe306_9283 }),
        ),
        v(
            "request_image_chunk",
            43,
            Msg::Request(Request::ImageChunk {
                upload: 2,
                offset: 0,
                bytes: b"123456789".to_vec(),
                crc32c: wire::crc32c(b"123456789"),
            }),
        ),
        v("request_image_cancel", 44, Msg::Request(Request::ImageCancel { upload: 2 })),
        v(
            "request_domain_console_input",
            45,
            Msg::Request(Request::DomainConsoleInput { id: 3, bytes: b"echo $((6*7))\r".to_vec() }),
        ),
        v(
            "response_upload",
            43,
            Msg::Response(Response::Upload(UploadStatus {
                upload: 2,
                kind: ImageKind::Initrd,
                total_len: 9,
                received: 9,
                window: 4,
                complete: true,
            })),
        ),
        v("response_console_input", 45, Msg::Response(Response::ConsoleInput { id: 3, accepted: 14 })),
        v("request_host_cpuid", 46, Msg::Request(Request::HostCpuid)),
        v(
            "response_host_cpuid",
            46,
            Msg::Response(Response::HostCpuid(HostCpuidReport {
                source: "hv 0.1.0 (5a3cac6) on AuthenticAMD family 0x17".to_string(),
                records: vec![
                    CpuidLeaf { leaf: 0, subleaf: 0, regs: [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65] },
                    CpuidLeaf { leaf: 7, subleaf: 0, regs: [0, 0x219c_07ab, 0, 0] },
                ],
            })),
        ),
        v("request_bench_fill", 47, Msg::Request(Request::BenchFill { len: 4 })),
        v("response_bench_data", 47, Msg::Response(Response::BenchData { bytes: vec![0; 4] })),
        v("request_bench_discard", 48, Msg::Request(Request::BenchDiscard { bytes: vec![0xa5; 3] })),
        v("response_bench_discarded", 48, Msg::Response(Response::BenchDiscarded { len: 3 })),
        v("request_domain_pin", 49, Msg::Request(Request::DomainPin { id: 3, cpus: Some(vec![1, 3]) })),
        v("request_domain_unpin", 50, Msg::Request(Request::DomainPin { id: 3, cpus: None })),
        v("stream_chunk_first", 9, Msg::Chunk(StreamChunk::new(1, 0, false, (0u8..32).collect()))),
        v("stream_chunk_last", 9, Msg::Chunk(StreamChunk::new(1, 1, true, vec![]))),
    ];
    for level in [LogLevel::Error, LogLevel::Info, LogLevel::Debug, LogLevel::Trace] {
        let name = format!("event_log_{}", format!("{level:?}").to_lowercase());
        out.push(v(&name, 0, Msg::Event(Event::Log { level, message: String::new() })));
    }
    for code in ErrorCode::ALL {
        out.push(v(
            &format!("response_error_{}", code.name()),
            6,
            Msg::Response(Response::Error(ErrorReply::new(code, format!("example {}", code.name())))),
        ));
    }
    out
}

fn encode(v: &Vector) -> Vec<u8> {
    let mut out = Vec::new();
    let r = match &v.msg {
        Msg::Request(m) => wire::encode_request(v.request_id, m, &mut out),
        Msg::Response(m) => wire::encode_response(v.request_id, m, &mut out),
        Msg::Event(m) => wire::encode_event(v.request_id, m, &mut out),
        Msg::Chunk(m) => wire::encode_stream_chunk(v.request_id, m, &mut out),
    };
    r.unwrap_or_else(|e| panic!("vector {} does not encode: {e}", v.name));
    out
}

fn decode(frame: &Frame) -> Result<Msg, ErrorReply> {
    Ok(match frame.kind {
        FrameKind::Request => Msg::Request(wire::decode_request(frame)?),
        FrameKind::Response => Msg::Response(wire::decode_response(frame)?),
        FrameKind::Event => Msg::Event(wire::decode_event(frame)?),
        FrameKind::StreamChunk => Msg::Chunk(wire::decode_stream_chunk(frame)?),
    })
}

fn dir_for(version: u16) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(format!("v{version}"))
}

fn hex_line(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn render(v: &Vector, bytes: &[u8]) -> String {
    let (header, payload) = bytes.split_at(HEADER_LEN);
    let kind = match &v.msg {
        Msg::Request(_) => FrameKind::Request,
        Msg::Response(_) => FrameKind::Response,
        Msg::Event(_) => FrameKind::Event,
        Msg::Chunk(_) => FrameKind::StreamChunk,
    };
    let mut s = String::new();
    writeln!(s, "# wire test vector `{}`, protocol version {PROTOCOL_VERSION}", v.name).unwrap();
    writeln!(s, "# Generated by `WIRE_REGENERATE_VECTORS=1 cargo test -p wire --test vectors`; do not edit.").unwrap();
    writeln!(s, "# Frozen: changing these bytes requires a PROTOCOL_VERSION bump (see wire/src/lib.rs).").unwrap();
    let value = format!("{:?}", v.msg);
    writeln!(s, "# value: {}", if value.len() > 400 { format!("{}...", &value[..400]) } else { value }).unwrap();
    writeln!(
        s,
        "# header: magic \"HV\", version {PROTOCOL_VERSION}, kind {} ({kind}), flags 0, request id {:#x}, \
         payload length {}",
        kind.as_u8(),
        v.request_id,
        payload.len()
    )
    .unwrap();
    writeln!(s, "{}", hex_line(header)).unwrap();
    writeln!(s, "# payload (postcard)").unwrap();
    for line in payload.chunks(16) {
        writeln!(s, "{}", hex_line(line)).unwrap();
    }
    s
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        for tok in line.split_whitespace() {
            let b = u8::from_str_radix(tok, 16).map_err(|e| format!("line {}: {tok:?}: {e}", n + 1))?;
            if tok.len() != 2 {
                return Err(format!("line {}: {tok:?} is not two hex digits", n + 1));
            }
            out.push(b);
        }
    }
    Ok(out)
}

fn decode_one(bytes: &[u8]) -> Result<Frame, FrameError> {
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.push(bytes), bytes.len());
    let frame = dec.next_frame().expect("a complete frame")?;
    assert!(dec.next_frame().is_none(), "one frame per vector");
    assert_eq!(dec.buffered(), 0);
    Ok(frame)
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

#[test]
fn vectors_match_the_encoding_byte_for_byte() {
    let regenerate = std::env::var("WIRE_REGENERATE_VECTORS").is_ok_and(|v| v == "1");
    let dir = dir_for(PROTOCOL_VERSION);
    if regenerate {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let vectors = vectors();
    let mut problems = Vec::new();
    for v in &vectors {
        let bytes = encode(v);
        let path = dir.join(format!("{}.hex", v.name));
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse_hex(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        match &stored {
            Some(s) if *s != bytes => {
                let at = first_difference(s, &bytes);
                problems.push(format!(
                    "vector {} changed at byte {at}: the wire format of protocol version {PROTOCOL_VERSION} is \
                     frozen. Bump PROTOCOL_VERSION, then run WIRE_REGENERATE_VECTORS=1 cargo test -p wire --test \
                     vectors\n  stored:  {}\n  encoded: {}",
                    v.name,
                    hex_line(s),
                    hex_line(&bytes)
                ));
                continue;
            }
            None if !regenerate => {
                problems.push(format!(
                    "vector {} is missing ({}): run WIRE_REGENERATE_VECTORS=1 cargo test -p wire --test vectors",
                    v.name,
                    path.display()
                ));
                continue;
            }
            _ => {}
        }
        if regenerate {
            std::fs::write(&path, render(v, &bytes)).unwrap();
        }
        // The stored bytes decode back to the value.
        let frame = decode_one(&bytes).unwrap_or_else(|e| panic!("vector {}: {e}", v.name));
        assert_eq!(frame.request_id, v.request_id, "vector {}", v.name);
        assert_eq!(frame.version, PROTOCOL_VERSION);
        let msg = decode(&frame).unwrap_or_else(|e| panic!("vector {} does not decode: {e}", v.name));
        assert_eq!(msg, v.msg, "vector {}", v.name);
    }
    // No stale files: every stored vector is one of the above.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".hex").unwrap_or(&name);
            if !vectors.iter().any(|v| v.name == stem) {
                problems.push(format!(
                    "{}/{name} is not a known vector: remove it or add it to tests/vectors.rs",
                    dir.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Vectors of every other protocol version are refused from the header alone, with the
/// peer's version and request id, so the receiver can answer them.
#[test]
fn other_versions_are_refused_from_the_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let Some(version) = name.strip_prefix('v').and_then(|n| n.parse::<u16>().ok()) else { continue };
        if version == PROTOCOL_VERSION {
            continue;
        }
        for file in std::fs::read_dir(entry.path()).unwrap() {
            let path = file.unwrap().path();
            let bytes = parse_hex(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let request_id = u64::from_le_bytes(bytes[6..14].try_into().unwrap());
            let mut dec = FrameDecoder::new();
            dec.push(&bytes[..HEADER_LEN]);
            assert_eq!(
                dec.next_frame(),
                Some(Err(FrameError::UnsupportedVersion { version, request_id })),
                "{}",
                path.display()
            );
            seen += 1;
        }
    }
    // Until version 2 exists, check the same with a version-0 copy of a current vector.
    if seen == 0 {
        let mut bytes = encode(&vectors()[0]);
        bytes[2] = 0;
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(dec.next_frame(), Some(Err(FrameError::UnsupportedVersion { version: 0, request_id: 1 })));
    }
}

#[test]
fn vectors_cover_every_variant() {
    let vs = vectors();
    let first_payload_byte = |kind: FrameKind| -> Vec<u8> {
        let mut idx: Vec<u8> = vs.iter().map(encode).filter(|b| b[4] == kind.as_u8()).map(|b| b[HEADER_LEN]).collect();
        idx.sort();
        idx.dedup();
        idx
    };
    assert_eq!(first_payload_byte(FrameKind::Request), (0..Request::VARIANTS as u8).collect::<Vec<_>>());
    assert_eq!(first_payload_byte(FrameKind::Response), (0..Response::VARIANTS as u8).collect::<Vec<_>>());
    assert_eq!(first_payload_byte(FrameKind::Event), (0..Event::VARIANTS as u8).collect::<Vec<_>>());
    assert!(vs.iter().any(|v| matches!(v.msg, Msg::Chunk(_))));
}
