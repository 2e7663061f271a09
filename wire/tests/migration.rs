//! The migration stream records: byte-exact vectors of every record type, round trips
//! (fixed and property-based) through the streaming decoder in arbitrary splits,
//! truncation, corruption, size limits, unknown optional and mandatory records.
//!
//! The vectors below are the exact bytes of each record. To regenerate them after an
//! intended format change (which also bumps `MIGRATION_STREAM_VERSION`), run
//!
//! ```text
//! MIGRATION_PRINT_VECTORS=1 cargo test -p wire --test migration vectors -- --nocapture
//! ```
//!
//! and paste the printed hex over the old strings.

use proptest::collection::vec;
use proptest::prelude::*;
use wire::dirty::DirtyBitmap;
use wire::migration::{
    ConsoleRing, CpuidPolicy, Decoded, DeviceEntry, DeviceStates, DirtyRound, FLAG_MANDATORY, GuestClock,
    MAX_BATCH_PAGES, MAX_CONSOLE_RING, MAX_FPU_AREA, MAX_RECORD_PAYLOAD, MAX_VCPU_MSRS, MIGRATION_STREAM_VERSION,
    MemoryDigest, PageBatch, PayloadFault, Record, RecordDecoder, RecordError, StreamEnd, StreamHeader, VcpuFpu,
    VcpuMsrs, VcpuState, encode_raw,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header() -> StreamHeader {
    StreamHeader {
        stream_version: MIGRATION_STREAM_VERSION,
        source_featureset: vec![0x0000_0001, 0xdead_beef],
        name: "vm".into(),
        memory_bytes: 0x4000,
        vcpus: 2,
        cmdline: "q".into(),
    }
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; 4096]
}

fn small_batch() -> PageBatch {
    let mut b = PageBatch::new();
    b.push(1, &page(0)).unwrap(); // zero: pfn only
    b.push_zero(2).unwrap();
    b
}

/// One record of each type, with its exact bytes.
fn vectors() -> Vec<(&'static str, Record, &'static str)> {
    let mut dirty = DirtyBitmap::new(64).unwrap();
    dirty.set(3).unwrap();
    vec![
        (
            "header",
            Record::Header(header()),
            "01000100210000000200020001000000efbeadde0040000000000000020000000200766d0100000071f72eb546",
        ),
        ("cpuid_policy", Record::CpuidPolicy(CpuidPolicy { policy: vec![0xaa, 0xbb] }), "0200010002000000aabb6b9fa8f7"),
        (
            "page_batch_zero",
            Record::PageBatch(small_batch()),
            "03000100140000000200000001000000000000800200000000000080336d9474",
        ),
        (
            "dirty_round",
            Record::DirtyRound(DirtyRound::from_bitmap(1, &dirty)),
            "040000000f00000001000000010000000300000003010234effe3f",
        ),
        (
            "vcpu_state",
            Record::VcpuState(VcpuState { index: 1, registers: vec![1, 2, 3] }),
            "05000100070000000100000001020379b2b38c",
        ),
        (
            "end",
            Record::End(StreamEnd { pages_sent: 5, rounds: 2 }),
            "060001000c00000005000000000000000200000026411404",
        ),
        (
            "memory_digest",
            Record::MemoryDigest(MemoryDigest { pages: 2, digest: 0x0123_4567_89ab_cdef }),
            "07000000100000000200000000000000efcdab896745230130dd47df",
        ),
        (
            "guest_clock",
            Record::GuestClock(GuestClock { tsc: 0x1122_3344_5566, ns: 1_000_000_007, tsc_hz: 2_000_000_000 }),
            "0800010018000000665544332211000007ca9a3b000000000094357700000000b13cdd97",
        ),
        (
            "vcpu_fpu",
            Record::VcpuFpu(VcpuFpu { index: 1, xcr0: 7, area: vec![0x7f, 0x03, 0, 0] }),
            "0900010014000000010000000700000000000000040000007f030000a087e04e",
        ),
        (
            "vcpu_msrs",
            Record::VcpuMsrs(VcpuMsrs { index: 0, msrs: vec![(0x10, 0x1234), (0x2ff, 0xc06), (0xc000_0103, 5)] }),
            "0a0001002a000000000000000300100000003412000000000000ff020000060c000000000000030100c00500000000000000a80bdf1c",
        ),
        (
            "device_states",
            Record::DeviceStates(DeviceStates {
                devices: vec![
                    DeviceEntry { kind: 4, instance: 0, version: 1, bytes: vec![9, 8] },
                    DeviceEntry { kind: 8, instance: 1, version: 1, bytes: vec![] },
                ],
            }),
            "0b0001001c000000020004000000000001000200000009080800010000000100000000003e0d6689",
        ),
        (
            "console_ring",
            Record::ConsoleRing(ConsoleRing { total_bytes: 70_000, ring: b"ok\n".to_vec() }),
            "0c0000000f0000007011010000000000030000006f6b0aafc09153",
        ),
    ]
}

#[test]
fn vectors_are_exact() {
    let print = std::env::var_os("MIGRATION_PRINT_VECTORS").is_some();
    for (name, record, expected) in vectors() {
        let bytes = record.encode_to_vec().unwrap();
        if print {
            println!("{name}: \"{}\"", hex(&bytes));
            continue;
        }
        assert_eq!(hex(&bytes), expected, "vector {name}");
        let mut dec = RecordDecoder::new();
        dec.push(&bytes).unwrap();
        assert_eq!(dec.next_record().unwrap(), Some(Decoded::Record(record)), "vector {name}");
        dec.finish().unwrap();
    }
}

/// The layout of a batch with data: entries first, then 4096 bytes per non-zero page in
/// order, and the CRC over everything before it.
#[test]
fn page_batch_layout() {
    let mut b = PageBatch::new();
    b.push(7, &page(0x11)).unwrap();
    b.push(8, &page(0)).unwrap();
    b.push(9, &page(0x22)).unwrap();
    assert_eq!(b.zero, [false, true, false]);
    let bytes = Record::PageBatch(b.clone()).encode_to_vec().unwrap();
    let len = 4 + 3 * 8 + 2 * 4096;
    assert_eq!(bytes.len(), 8 + len + 4);
    assert_eq!(&bytes[..8], &[3, 0, 1, 0, (len & 0xff) as u8, (len >> 8) as u8, 0, 0]);
    assert_eq!(&bytes[8..12], &3u32.to_le_bytes());
    assert_eq!(&bytes[12..20], &7u64.to_le_bytes());
    assert_eq!(&bytes[20..28], &(8u64 | 1 << 63).to_le_bytes());
    assert_eq!(&bytes[28..36], &9u64.to_le_bytes());
    assert!(bytes[36..36 + 4096].iter().all(|&x| x == 0x11));
    assert!(bytes[36 + 4096..36 + 8192].iter().all(|&x| x == 0x22));
    let crc = wire::crc32c(&bytes[..8 + len]);
    assert_eq!(&bytes[8 + len..], &crc.to_le_bytes());
    let pages: Vec<_> = b.pages().map(|(pfn, d)| (pfn, d.map(|d| d[0]))).collect();
    assert_eq!(pages, [(7, Some(0x11)), (8, None), (9, Some(0x22))]);
}

fn all_records() -> Vec<Record> {
    let mut b = PageBatch::new();
    b.push(0x10, &page(0x5a)).unwrap();
    b.push_zero(0x11).unwrap();
    let mut v: Vec<Record> = vectors().into_iter().map(|(_, r, _)| r).collect();
    v.push(Record::PageBatch(b));
    v
}

fn stream_bytes(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        r.encode(&mut out).unwrap();
    }
    out
}

fn decode_all(bytes: &[u8], split: usize) -> Result<Vec<Decoded>, RecordError> {
    let mut dec = RecordDecoder::new();
    let mut got = Vec::new();
    for part in bytes.chunks(split.max(1)) {
        dec.push(part).unwrap();
        while let Some(d) = dec.next_record()? {
            got.push(d);
        }
    }
    dec.finish()?;
    Ok(got)
}

#[test]
fn stream_in_any_split() {
    let records = all_records();
    let bytes = stream_bytes(&records);
    let want: Vec<Decoded> = records.into_iter().map(Decoded::Record).collect();
    for split in [1, 2, 3, 7, 8, 12, 13, 100, 4096, bytes.len()] {
        assert_eq!(decode_all(&bytes, split).unwrap(), want, "split {split}");
    }
}

#[test]
fn truncation_at_every_byte() {
    let bytes = stream_bytes(&all_records()[..6]);
    let ends: Vec<usize> = {
        let mut at = 0;
        let mut v = vec![0];
        for r in &all_records()[..6] {
            at += r.encode_to_vec().unwrap().len();
            v.push(at);
        }
        v
    };
    for cut in 0..bytes.len() {
        let r = decode_all(&bytes[..cut], 5);
        if ends.contains(&cut) {
            assert!(r.is_ok(), "cut at a record boundary {cut}");
        } else {
            let Err(RecordError::Truncated { buffered }) = r else { panic!("cut {cut}: {r:?}") };
            assert!(buffered > 0);
        }
    }
}

#[test]
fn every_flipped_bit_is_refused() {
    let bytes = Record::Header(header()).encode_to_vec().unwrap();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            let r = decode_all(&b, 64);
            // A flip in the length makes the record look longer (truncated) or shorter
            // (CRC over the wrong bytes); flags may hit reserved bits; everything else is
            // a checksum mismatch. None may decode.
            assert!(r.is_err(), "byte {i} bit {bit} decoded: {r:?}");
        }
    }
}

#[test]
fn checksum_error_poisons() {
    let mut bytes = stream_bytes(&all_records());
    bytes[20] ^= 0x40;
    let mut dec = RecordDecoder::new();
    dec.push(&bytes).unwrap();
    let err = dec.next_record().unwrap_err();
    let RecordError::BadChecksum { record_type: 1, carried, computed } = err else { panic!("{err:?}") };
    assert_ne!(carried, computed);
    assert!(err.to_string().starts_with("migration record type 1 (header) failed its checksum"), "{err}");
    assert!(dec.is_poisoned());
    assert_eq!(dec.next_record(), Err(RecordError::Poisoned));
    assert_eq!(dec.finish(), Err(RecordError::Poisoned));
}

#[test]
fn oversize_refused_from_header() {
    let mut dec = RecordDecoder::new();
    let len = MAX_RECORD_PAYLOAD + 1;
    let mut head = vec![3, 0, 1, 0];
    head.extend_from_slice(&len.to_le_bytes());
    dec.push(&head).unwrap();
    assert_eq!(dec.next_record(), Err(RecordError::TooLarge { record_type: 3, len: u64::from(len) }));
    let mut out = Vec::new();
    let big = vec![0u8; MAX_RECORD_PAYLOAD as usize + 1];
    assert!(matches!(encode_raw(2, FLAG_MANDATORY, &big, &mut out), Err(RecordError::TooLarge { .. })));
    assert!(out.is_empty());
    let full = vec![0u8; MAX_RECORD_PAYLOAD as usize];
    encode_raw(200, 0, &full, &mut out).unwrap();
    assert_eq!(decode_all(&out, 65536).unwrap(), [Decoded::Skipped { record_type: 200, len: MAX_RECORD_PAYLOAD }]);
}

#[test]
fn unknown_records() {
    let mut bytes = Vec::new();
    encode_raw(0x7001, 0, b"future optional", &mut bytes).unwrap();
    Record::End(StreamEnd { pages_sent: 0, rounds: 0 }).encode(&mut bytes).unwrap();
    let got = decode_all(&bytes, 3).unwrap();
    assert_eq!(got[0], Decoded::Skipped { record_type: 0x7001, len: 15 });
    assert_eq!(got[1], Decoded::Record(Record::End(StreamEnd { pages_sent: 0, rounds: 0 })));

    let mut bytes = Vec::new();
    encode_raw(0x7002, FLAG_MANDATORY, b"future mandatory", &mut bytes).unwrap();
    let err = decode_all(&bytes, 64).unwrap_err();
    assert_eq!(err, RecordError::UnknownMandatory { record_type: 0x7002 });
    assert_eq!(
        err.to_string(),
        "migration record type 28674 is unknown to this hypervisor and marked mandatory; the stream needs a newer \
         destination"
    );
    // Type 0 is not a type either.
    let mut bytes = Vec::new();
    encode_raw(0, FLAG_MANDATORY, &[], &mut bytes).unwrap();
    assert_eq!(decode_all(&bytes, 64).unwrap_err(), RecordError::UnknownMandatory { record_type: 0 });
    // Reserved flags.
    let mut bytes = Vec::new();
    encode_raw(6, 0x8001, &[0; 12], &mut bytes).unwrap();
    assert_eq!(decode_all(&bytes, 64).unwrap_err(), RecordError::ReservedFlags { record_type: 6, flags: 0x8001 });
}

#[test]
fn malformed_payloads() {
    let raw = |ty: u16, payload: &[u8]| {
        let mut b = Vec::new();
        encode_raw(ty, FLAG_MANDATORY, payload, &mut b).unwrap();
        decode_all(&b, 64).unwrap_err()
    };
    let bad = |ty, fault| RecordError::BadPayload { record_type: ty, fault };
    assert_eq!(raw(6, &[0; 11]), bad(6, PayloadFault::Truncated));
    assert_eq!(raw(6, &[0; 13]), bad(6, PayloadFault::TrailingBytes { extra: 1 }));
    // Version 1 streams (memory and basic registers only) are refused, as is a future one.
    assert_eq!(raw(1, &[1, 0]), RecordError::UnsupportedVersion { found: 1 });
    assert_eq!(raw(1, &[3, 0]), RecordError::UnsupportedVersion { found: 3 });
    assert_eq!(
        RecordError::UnsupportedVersion { found: 1 }.to_string(),
        "migration stream version 1 is not supported (this hypervisor speaks version 2)"
    );
    // Header with a name that is not UTF-8.
    let mut h = Record::Header(header()).encode_to_vec().unwrap();
    let name_at = 8 + 2 + 2 + 8 + 8 + 4 + 2;
    h[name_at] = 0xff;
    let crc_at = h.len() - 4;
    let crc = wire::crc32c(&h[..crc_at]);
    h[crc_at..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_all(&h, 64).unwrap_err(), bad(1, PayloadFault::BadUtf8));
    // Page batch: a non-zero page without its data, too many pages, pfn too large.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u64.to_le_bytes());
    assert_eq!(raw(3, &p), bad(3, PayloadFault::DataLength { expected: 4096, found: 0 }));
    let p = (MAX_BATCH_PAGES as u32 + 1).to_le_bytes();
    assert_eq!(raw(3, &p), bad(3, PayloadFault::TooManyPages { count: MAX_BATCH_PAGES + 1 }));
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&(1u64 << 40 | 1 << 63).to_le_bytes());
    assert_eq!(raw(3, &p), bad(3, PayloadFault::PfnTooLarge { pfn: 1 << 40 }));
    // Dirty round whose record does not decode.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&[0x80, 0x80]);
    assert!(matches!(raw(4, &p), RecordError::BadPayload { record_type: 4, fault: PayloadFault::Dirty(_) }));
    // Encoding refuses inconsistent batches, leaving the output alone.
    let b = PageBatch { pfns: vec![1, 2], zero: vec![true], data: vec![] };
    let mut out = vec![9];
    assert!(Record::PageBatch(b).encode(&mut out).is_err());
    assert_eq!(out, [9]);
    let mut full = PageBatch::new();
    for pfn in 0..MAX_BATCH_PAGES as u64 {
        full.push_zero(pfn).unwrap();
    }
    assert!(full.is_full());
    assert_eq!(full.push_zero(9999), Err(PayloadFault::TooManyPages { count: MAX_BATCH_PAGES + 1 }));
    assert_eq!(PageBatch::new().push(1, &[0; 10]), Err(PayloadFault::DataLength { expected: 4096, found: 10 }));
}

fn arb_record() -> impl Strategy<Value = Record> {
    let header = (vec(any::<u32>(), 0..8), "[a-z0-9-]{0,20}", any::<u64>(), any::<u32>(), ".{0,40}").prop_map(
        |(source_featureset, name, memory_bytes, vcpus, cmdline)| {
            Record::Header(StreamHeader {
                stream_version: MIGRATION_STREAM_VERSION,
                source_featureset,
                name,
                memory_bytes,
                vcpus,
                cmdline,
            })
        },
    );
    let policy = vec(any::<u8>(), 0..300).prop_map(|policy| Record::CpuidPolicy(CpuidPolicy { policy }));
    let batch = vec((0u64..1 << 40, prop::option::of(1u8..=255)), 0..6).prop_map(|pages| {
        let mut b = PageBatch::new();
        for (pfn, fill) in pages {
            match fill {
                Some(f) => b.push(pfn, &page(f)).unwrap(),
                None => b.push_zero(pfn).unwrap(),
            }
        }
        Record::PageBatch(b)
    });
    let dirty = (any::<u32>(), vec(0u64..5000, 0..200)).prop_map(|(round, pfns)| {
        let mut bm = DirtyBitmap::covering(100..5100).unwrap();
        for p in pfns {
            bm.set(100 + p).unwrap();
        }
        Record::DirtyRound(DirtyRound::from_bitmap(round, &bm))
    });
    let vcpu = (any::<u32>(), vec(any::<u8>(), 0..600))
        .prop_map(|(index, registers)| Record::VcpuState(VcpuState { index, registers }));
    let end =
        (any::<u64>(), any::<u32>()).prop_map(|(pages_sent, rounds)| Record::End(StreamEnd { pages_sent, rounds }));
    let digest =
        (any::<u64>(), any::<u64>()).prop_map(|(pages, digest)| Record::MemoryDigest(MemoryDigest { pages, digest }));
    let clock = (any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(tsc, ns, tsc_hz)| Record::GuestClock(GuestClock { tsc, ns, tsc_hz }));
    let fpu = (any::<u32>(), any::<u64>(), vec(any::<u8>(), 0..3000))
        .prop_map(|(index, xcr0, area)| Record::VcpuFpu(VcpuFpu { index, xcr0, area }));
    let msrs = (any::<u32>(), prop::collection::btree_map(any::<u32>(), any::<u64>(), 0..40))
        .prop_map(|(index, m)| Record::VcpuMsrs(VcpuMsrs { index, msrs: m.into_iter().collect() }));
    let devices =
        prop::collection::btree_map((any::<u16>(), any::<u32>()), (any::<u16>(), vec(any::<u8>(), 0..200)), 0..12)
            .prop_map(|m| {
                Record::DeviceStates(DeviceStates {
                    devices: m
                        .into_iter()
                        .map(|((kind, instance), (version, bytes))| DeviceEntry { kind, instance, version, bytes })
                        .collect(),
                })
            });
    let console = (vec(any::<u8>(), 0..500), any::<u32>()).prop_map(|(ring, more)| {
        Record::ConsoleRing(ConsoleRing { total_bytes: ring.len() as u64 + u64::from(more), ring })
    });
    prop_oneof![header, policy, batch, dirty, vcpu, end, digest, clock, fpu, msrs, devices, console]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip(records in vec(arb_record(), 0..6), split in 1usize..5000) {
        let bytes = stream_bytes(&records);
        let want: Vec<Decoded> = records.into_iter().map(Decoded::Record).collect();
        prop_assert_eq!(decode_all(&bytes, split).unwrap(), want);
    }

    #[test]
    fn garbage_never_panics(bytes in vec(any::<u8>(), 0..2000), split in 1usize..300) {
        let _ = decode_all(&bytes, split);
    }

    #[test]
    fn corrupted_byte_is_refused(record in arb_record(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut bytes = record.encode_to_vec().unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        prop_assert!(decode_all(&bytes, 4096).is_err());
    }

    #[test]
    fn dirty_round_bits_survive(pfns in vec(0u64..5000, 0..300)) {
        let mut bm = DirtyBitmap::covering(0..5000).unwrap();
        for p in pfns {
            bm.set(p).unwrap();
        }
        let r = DirtyRound::from_bitmap(3, &bm);
        let bytes = Record::DirtyRound(r).encode_to_vec().unwrap();
        let got = decode_all(&bytes, 77).unwrap();
        let Some(Decoded::Record(Record::DirtyRound(d))) = got.into_iter().next() else { panic!() };
        prop_assert_eq!(d.to_bitmap(0..5000).unwrap(), bm);
    }
}

/// The memory digest covers every byte and every position: changing one byte, or
/// swapping two different pages, changes it.
#[test]
fn memory_digest_sees_every_page() {
    let mut mem = vec![0u8; 4 * 4096];
    mem[4096..8192].fill(7);
    let d = MemoryDigest::of_pages(&mem);
    assert_eq!(d.pages, 4);
    let mut stepwise = MemoryDigest::new();
    for p in mem.chunks(4096) {
        stepwise.add_page(p);
    }
    assert_eq!(stepwise, d);
    for at in [0, 4095, 4096 + 100, 4 * 4096 - 1] {
        let mut m = mem.clone();
        m[at] ^= 1;
        assert_ne!(MemoryDigest::of_pages(&m).digest, d.digest, "byte {at}");
    }
    let mut swapped = mem.clone();
    swapped.copy_within(4096..8192, 0);
    swapped[4096..8192].fill(0);
    assert_ne!(MemoryDigest::of_pages(&swapped).digest, d.digest);
}

/// The machine-state records of version 2: every length, count, order and
/// consistency rule refuses with its own fault, and the encoder refuses what the
/// decoder would.
#[test]
fn machine_state_payloads_are_checked() {
    let raw = |ty: u16, payload: &[u8]| {
        let mut b = Vec::new();
        encode_raw(ty, FLAG_MANDATORY, payload, &mut b).unwrap();
        decode_all(&b, 7).unwrap_err()
    };
    let bad = |ty, fault| RecordError::BadPayload { record_type: ty, fault };
    // Clock: exactly 24 bytes.
    assert_eq!(raw(8, &[0; 23]), bad(8, PayloadFault::Truncated));
    assert_eq!(raw(8, &[0; 25]), bad(8, PayloadFault::TrailingBytes { extra: 1 }));
    // FPU: an area longer than the limit, or than the payload.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&7u64.to_le_bytes());
    p.extend_from_slice(&(MAX_FPU_AREA as u32 + 1).to_le_bytes());
    assert_eq!(raw(9, &p), bad(9, PayloadFault::TooLong { field: "FPU area", len: MAX_FPU_AREA + 1 }));
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&7u64.to_le_bytes());
    p.extend_from_slice(&8u32.to_le_bytes());
    p.extend_from_slice(&[0; 7]);
    assert_eq!(raw(9, &p), bad(9, PayloadFault::Truncated));
    let big = VcpuFpu { index: 0, xcr0: 1, area: vec![0; MAX_FPU_AREA + 1] };
    assert!(matches!(Record::VcpuFpu(big).encode_to_vec(), Err(RecordError::BadPayload { record_type: 9, .. })));
    // MSRs: repeated or descending indices, too many.
    let msrs = |list: &[(u32, u64)]| {
        let mut p = 3u32.to_le_bytes().to_vec();
        p.extend_from_slice(&(list.len() as u16).to_le_bytes());
        for (m, v) in list {
            p.extend_from_slice(&m.to_le_bytes());
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    };
    assert_eq!(
        raw(10, &msrs(&[(0x10, 1), (0x10, 2)])),
        bad(10, PayloadFault::Unordered { field: "msrs", value: 0x10 })
    );
    assert_eq!(
        raw(10, &msrs(&[(0x2ff, 1), (0x200, 2)])),
        bad(10, PayloadFault::Unordered { field: "msrs", value: 0x200 })
    );
    let p = (MAX_VCPU_MSRS as u16 + 1).to_le_bytes();
    let mut q = 0u32.to_le_bytes().to_vec();
    q.extend_from_slice(&p);
    assert_eq!(raw(10, &q), bad(10, PayloadFault::TooLong { field: "msrs", len: MAX_VCPU_MSRS + 1 }));
    let unsorted = VcpuMsrs { index: 0, msrs: vec![(2, 0), (1, 0)] };
    assert!(Record::VcpuMsrs(unsorted).encode_to_vec().is_err(), "the encoder refuses what the decoder would");
    let sorted = VcpuMsrs { index: 0, msrs: vec![(0x10, 5), (0x277, 6)] };
    assert_eq!((sorted.get(0x277), sorted.get(0x10), sorted.get(0x11)), (Some(6), Some(5), None));
    // Devices: the same (kind, instance) twice; a state longer than the payload.
    let twice = DeviceStates {
        devices: vec![
            DeviceEntry { kind: 8, instance: 1, version: 1, bytes: vec![] },
            DeviceEntry { kind: 8, instance: 1, version: 1, bytes: vec![1] },
        ],
    };
    assert!(Record::DeviceStates(twice.clone()).encode_to_vec().is_err());
    let mut p = 2u16.to_le_bytes().to_vec();
    for e in &twice.devices {
        p.extend_from_slice(&e.kind.to_le_bytes());
        p.extend_from_slice(&e.instance.to_le_bytes());
        p.extend_from_slice(&e.version.to_le_bytes());
        p.extend_from_slice(&(e.bytes.len() as u32).to_le_bytes());
        p.extend_from_slice(&e.bytes);
    }
    assert_eq!(raw(11, &p), bad(11, PayloadFault::Unordered { field: "devices", value: 8 << 32 | 1 }));
    let mut p = 1u16.to_le_bytes().to_vec();
    p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 1, 0]);
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(raw(11, &p), bad(11, PayloadFault::Truncated));
    // Console: more bytes in the ring than were ever written, or over the limit.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(b"ab");
    assert!(matches!(raw(12, &p), RecordError::BadPayload { record_type: 12, fault: PayloadFault::Inconsistent(_) }));
    let mut p = u64::MAX.to_le_bytes().to_vec();
    p.extend_from_slice(&(MAX_CONSOLE_RING as u32 + 1).to_le_bytes());
    assert_eq!(raw(12, &p), bad(12, PayloadFault::TooLong { field: "console ring", len: MAX_CONSOLE_RING + 1 }));
    let liar = ConsoleRing { total_bytes: 1, ring: b"ab".to_vec() };
    assert!(Record::ConsoleRing(liar).encode_to_vec().is_err());
    // The console ring is optional: a destination that does not know type 12 may skip it.
    let ring = Record::ConsoleRing(ConsoleRing { total_bytes: 2, ring: b"ab".to_vec() }).encode_to_vec().unwrap();
    assert_eq!(u16::from_le_bytes([ring[2], ring[3]]) & FLAG_MANDATORY, 0);
    for ty in 8..=11u16 {
        let r = match ty {
            8 => Record::GuestClock(GuestClock { tsc: 1, ns: 2, tsc_hz: 3 }),
            9 => Record::VcpuFpu(VcpuFpu { index: 0, xcr0: 1, area: vec![] }),
            10 => Record::VcpuMsrs(VcpuMsrs { index: 0, msrs: vec![] }),
            _ => Record::DeviceStates(DeviceStates::default()),
        };
        let b = r.encode_to_vec().unwrap();
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), ty);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]) & FLAG_MANDATORY, FLAG_MANDATORY, "type {ty} is mandatory");
    }
}
