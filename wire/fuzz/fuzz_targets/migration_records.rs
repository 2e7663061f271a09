//! Arbitrary bytes, in arbitrary chunks, into the migration stream decoder: it must
//! never panic, never accept a record whose checksum or layout is wrong, and every
//! record it does accept must encode back to bytes that decode to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::migration::{Decoded, RecordDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let mut decoder = RecordDecoder::new();
    let step = usize::from(split).max(1);
    for chunk in bytes.chunks(step) {
        if decoder.push(chunk).is_err() {
            break;
        }
        loop {
            match decoder.next_record() {
                Ok(Some(Decoded::Record(record))) => {
                    let again = record.encode_to_vec().expect("an accepted record re-encodes");
                    let mut check = RecordDecoder::new();
                    check.push(&again).expect("one record fits the heap");
                    match check.next_record() {
                        Ok(Some(Decoded::Record(back))) => assert_eq!(back, record),
                        other => panic!("re-encoded record does not decode: {other:?}"),
                    }
                }
                Ok(Some(Decoded::Skipped { .. })) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if decoder.is_poisoned() {
            break;
        }
    }
});
