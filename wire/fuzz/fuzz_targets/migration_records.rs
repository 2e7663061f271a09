//! Arbitrary bytes, in arbitrary chunks, into the migration stream decoder: it must
//! never panic, never accept a record whose checksum or layout is wrong, and every
//! record it does accept must encode back to bytes that decode to the same record.
//!
//! With the first byte's top bit set, the input is a record type and a payload
//! instead, framed with a correct header and CRC, so every type's payload decoder (the
//! machine-state records of stream version 2 included) is fuzzed past the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::migration::{Decoded, FLAG_MANDATORY, Record, RecordDecoder, encode_raw};

/// Decode `bytes` as one framed record; what it accepts must round-trip.
fn round_trip(record: &Record) {
    let again = record.encode_to_vec().expect("an accepted record re-encodes");
    let mut check = RecordDecoder::new();
    check.push(&again).expect("one record fits the heap");
    match check.next_record() {
        Ok(Some(Decoded::Record(back))) => assert_eq!(&back, record),
        other => panic!("re-encoded record does not decode: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    if split & 0x80 != 0 {
        let Some((&ty, payload)) = bytes.split_first() else { return };
        // Types 1..=12 and a few unknown ones.
        let record_type = u16::from(ty % 14) + 1;
        let mut framed = Vec::new();
        if encode_raw(record_type, FLAG_MANDATORY, payload, &mut framed).is_err() {
            return;
        }
        let mut decoder = RecordDecoder::new();
        decoder.push(&framed).expect("one record fits the heap");
        if let Ok(Some(Decoded::Record(record))) = decoder.next_record() {
            round_trip(&record);
        }
        return;
    }
    let mut decoder = RecordDecoder::new();
    let step = usize::from(split).max(1);
    for chunk in bytes.chunks(step) {
        if decoder.push(chunk).is_err() {
            break;
        }
        loop {
            match decoder.next_record() {
                Ok(Some(Decoded::Record(record))) => round_trip(&record),
                Ok(Some(Decoded::Skipped { .. })) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if decoder.is_poisoned() {
            break;
        }
    }
});
