//! The destination's machine-state loaders, fuzzed: the records a migration stream
//! carries after memory (a vCPU's registers, its FPU area and MSRs, every device
//! model's saved state, the console ring) are decoded by wire and loaded into a
//! destination domain (`hv::fuzzing::StateTarget`) as a real destination would.
//! Nothing may panic; a destination that took records must still save; and when every
//! record loaded, what it saves must load into another fresh destination (a migrated
//! domain can be migrated on).
//!
//! The first byte picks the input's form:
//! - even: records built from the input, `type | len u16 | payload` each (type chosen
//!   among the six loader records), framed with a valid header and CRC so the fuzzer
//!   works past the checksum;
//! - odd: a fresh domain's own well-formed save, with the input's `record | offset u16
//!   | xor` triples applied to the payloads: near-valid states reach deep into each
//!   device model's loader, which random bytes rarely do.
//!
//! Run: `cd hv/fuzz && cargo +nightly fuzz run state_loaders -- -max_total_time=60`.
#![no_main]

use hv::fuzzing::StateTarget;
use libfuzzer_sys::fuzz_target;
use wire::migration::{Decoded, Record, RecordDecoder, encode_raw};

/// The records the loaders take (wire's type numbers): VcpuState, GuestClock,
/// VcpuFpu, VcpuMsrs, DeviceStates, ConsoleRing.
const LOADER_TYPES: [u16; 6] = [5, 8, 9, 10, 11, 12];
/// Record header (type, flags, length) and CRC sizes.
const HEADER: usize = 8;
const CRC: usize = 4;

/// `payload` framed as a valid record of `record_type`, decoded; `None` where wire
/// refuses the payload (that refusal is wire's own fuzz target's business).
fn decode(record_type: u16, flags: u16, payload: &[u8]) -> Option<Record> {
    let mut framed = Vec::new();
    encode_raw(record_type, flags, payload, &mut framed).ok()?;
    let mut decoder = RecordDecoder::new();
    decoder.push(&framed).ok()?;
    match decoder.next_record() {
        Ok(Some(Decoded::Record(r))) => Some(r),
        _ => None,
    }
}

/// Records from `type | len u16 | payload` groups.
fn built(mut input: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    while let [ty, lo, hi, rest @ ..] = input {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (payload, next) = rest.split_at(len);
        input = next;
        let record_type = LOADER_TYPES[usize::from(*ty) % LOADER_TYPES.len()];
        if let Some(r) = decode(record_type, 1, payload) {
            records.push(r);
        }
    }
    records
}

/// A fresh domain's save with `record | offset u16 | xor` triples applied.
fn mutated(input: &[u8]) -> Vec<Record> {
    let saved = StateTarget::new().saved().expect("a fresh domain saves");
    let mut encoded: Vec<Vec<u8>> = saved.iter().map(|r| r.encode_to_vec().expect("a saved record encodes")).collect();
    for t in input.chunks_exact(4) {
        let bytes = &mut encoded[usize::from(t[0]) % saved.len()];
        let payload_len = bytes.len() - HEADER - CRC;
        if payload_len > 0 {
            bytes[HEADER + usize::from(u16::from_le_bytes([t[1], t[2]])) % payload_len] ^= t[3];
        }
    }
    encoded
        .iter()
        .filter_map(|b| {
            let ty = u16::from_le_bytes([b[0], b[1]]);
            let flags = u16::from_le_bytes([b[2], b[3]]);
            decode(ty, flags, &b[HEADER..b.len() - CRC])
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, input)) = data.split_first() else { return };
    let records = if form & 1 == 0 { built(input) } else { mutated(input) };
    let mut target = StateTarget::new();
    let all_loaded = records.iter().all(|r| target.load(r).is_ok());
    let saved = target.saved();
    if all_loaded {
        let saved = saved.expect("a destination that took every record saves");
        let mut next = StateTarget::new();
        for r in &saved {
            if let Err(e) = next.load(r) {
                panic!("a destination's own save does not load: {e}\nrecord: {r:?}");
            }
        }
    }
});
