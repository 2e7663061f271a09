//! Arbitrary bytes off a serial line through the packet decoder: nothing may panic, the
//! decoder never holds more than one maximal packet, and every packet that decodes
//! re-encodes to bytes that decode to the same packet.
//!
//! Run: `cd wire/fuzz && cargo +nightly fuzz run serial_packets -- -max_total_time=60`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::serial::{MAX_ENCODED_PACKET, Packet, PacketDecoder, encode_frame_packet, encode_open, encode_opened};

fuzz_target!(|data: &[u8]| {
    let mut decoder = PacketDecoder::new();
    for &byte in data {
        let result = decoder.push(byte);
        assert!(decoder.buffered() <= MAX_ENCODED_PACKET);
        let Some(Ok(packet)) = result else { continue };
        let mut again = Vec::new();
        match &packet {
            Packet::Frame(f) => {
                let mut bytes = Vec::new();
                wire::encode_frame(f.kind, f.request_id, &f.payload, &mut bytes).expect("a decoded frame re-encodes");
                encode_frame_packet(&bytes, &mut again);
            }
            Packet::Open { nonce } => encode_open(*nonce, &mut again),
            Packet::Opened { nonce, max_packet } => encode_opened(*nonce, *max_packet, &mut again),
        }
        let mut check = PacketDecoder::new();
        let decoded: Vec<_> = again.iter().filter_map(|&b| check.push(b)).collect();
        assert_eq!(decoded, vec![Ok(packet)]);
    }
});
