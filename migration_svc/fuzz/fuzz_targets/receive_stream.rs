//! Untrusted stream bytes into a receiving migration session (the destination's
//! state machine and record decoder, executed on the fake core): it must never panic,
//! a discarded session must leave no domain behind, and a complete one exactly one,
//! whose memory matches the digest the stream carried.
//!
//! Half the inputs are raw bytes; the other half patch bytes of a valid stream (so the
//! fuzzer gets past the checksums and reaches the order and count checks). The valid
//! stream is version 2: it carries every machine-state record (clock, FPU, MSRs,
//! devices, console), so their order rules and the core's loading are fuzzed too.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migration_svc::ReceiveSession;
use migration_svc::testing::FakeCore;
use wire::ReceiveState;
use wire::migration::{
    ConsoleRing, CpuidPolicy, DeviceEntry, DeviceStates, GuestClock, MIGRATION_STREAM_VERSION, MemoryDigest, PageBatch,
    Record, StreamEnd, StreamHeader, VcpuFpu, VcpuMsrs, VcpuState,
};

fn valid_stream() -> &'static [u8] {
    static STREAM: OnceLock<Vec<u8>> = OnceLock::new();
    STREAM.get_or_init(|| {
        let mut mem = vec![0u8; 3 * 4096];
        mem[..4096].fill(0x5a);
        mem[8192..].fill(0x11);
        let mut batch = PageBatch::new();
        for (pfn, page) in mem.chunks(4096).enumerate() {
            batch.push(pfn as u64, page).expect("a page fits");
        }
        let records = [
            Record::Header(StreamHeader {
                stream_version: MIGRATION_STREAM_VERSION,
                source_featureset: vec![1, 2],
                name: "fz".into(),
                memory_bytes: mem.len() as u64,
                vcpus: 1,
                cmdline: String::new(),
            }),
            Record::CpuidPolicy(CpuidPolicy { policy: b"policy".to_vec() }),
            Record::PageBatch(batch),
            Record::GuestClock(GuestClock { tsc: 1 << 33, ns: 4_000_000_000, tsc_hz: 2_000_000_000 }),
            Record::VcpuState(VcpuState { index: 0, registers: vec![1, 2, 3] }),
            Record::VcpuFpu(VcpuFpu { index: 0, xcr0: 7, area: vec![0; 576] }),
            Record::VcpuMsrs(VcpuMsrs { index: 0, msrs: vec![(0x10, 1 << 33), (0x2ff, 0xc06)] }),
            Record::DeviceStates(DeviceStates {
                devices: vec![DeviceEntry { kind: 8, instance: 0, version: 1, bytes: vec![0; 24] }],
            }),
            Record::ConsoleRing(ConsoleRing { total_bytes: 3, ring: b"ok\n".to_vec() }),
            Record::MemoryDigest(MemoryDigest::of_pages(&mem)),
            Record::End(StreamEnd { pages_sent: 3, rounds: 0 }),
        ];
        let mut out = Vec::new();
        for r in records {
            r.encode(&mut out).expect("a valid record encodes");
        }
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&split, rest)) = rest.split_first() else { return };
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        // Patches: (offset u16 LE, xor u8) triples over the valid stream.
        let mut s = valid_stream().to_vec();
        for p in rest.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([p[0], p[1]])) % s.len();
            s[at] ^= p[2];
        }
        if mode & 2 != 0 {
            s.truncate(usize::from(split) * 97 % (s.len() + 1));
        }
        s
    };
    let mut core = FakeCore::new();
    let mut session = ReceiveSession::new(1, &mut core);
    for chunk in stream.chunks(usize::from(split).max(1)) {
        session.write(&mut core, chunk);
        if session.is_over() {
            break;
        }
    }
    let status = session.status();
    match status.state {
        ReceiveState::Discarded => assert!(core.domains.is_empty(), "a discarded stream left a domain: {status:?}"),
        ReceiveState::Complete => {
            assert_eq!(core.domains.len(), 1, "{status:?}");
            let d = core.domains.values().next().expect("one domain");
            assert!(!d.paused, "a complete domain runs");
            assert!(d.machine.clock.is_some() && d.machine.devices.is_some(), "complete without machine state");
            assert!(
                d.machine.fpus.iter().all(Option::is_some) && d.machine.msrs.iter().all(Option::is_some),
                "complete without every vCPU's FPU state and MSRs"
            );
            if let Some(digest) = status.memory_digest {
                assert_eq!(MemoryDigest::of_pages(&d.mem).digest, digest);
            }
        }
        ReceiveState::AwaitPolicy | ReceiveState::Receiving => {
            assert!(core.domains.len() <= 1, "{status:?}");
            // The relay gives up: nothing may remain.
            session.abort(&mut core, "fuzz: relay gone".into());
            assert!(core.domains.is_empty(), "an aborted session left a domain");
        }
    }
});
