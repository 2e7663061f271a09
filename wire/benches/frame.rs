//! Criterion benchmarks: frame encode/decode throughput of a Ping and of a 60 KiB
//! stream chunk, and CRC-32C alone. Run with `cargo bench -p wire`.
//!
//! "decode" is what a receiver does per frame: push the bytes into a `FrameDecoder`,
//! take the frame, decode the message (and, for a chunk, check its CRC).

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use wire::{FrameDecoder, Request, StreamChunk, StreamReassembler};

fn ping(c: &mut Criterion) {
    let req = Request::Ping { payload: vec![0x5a; 16] };
    let mut frame = Vec::new();
    wire::encode_request(1, &req, &mut frame).expect("encodes");

    let mut g = c.benchmark_group("ping");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut out = Vec::with_capacity(frame.len());
    g.bench_function(BenchmarkId::new("encode", format!("{} B frame", frame.len())), |b| {
        b.iter(|| {
            out.clear();
            wire::encode_request(black_box(1), black_box(&req), &mut out).expect("encodes");
            out.len()
        })
    });
    let mut dec = FrameDecoder::new();
    g.bench_function(BenchmarkId::new("decode", format!("{} B frame", frame.len())), |b| {
        b.iter(|| {
            dec.push(black_box(&frame));
            let f = dec.next_frame().expect("complete").expect("valid");
            wire::decode_request(&f).expect("decodes")
        })
    });
    g.finish();
}

fn chunk(c: &mut Criterion) {
    let data: Vec<u8> = (0..60 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let chunk = StreamChunk::new(1, 0, false, data.clone());
    let mut frame = Vec::new();
    wire::encode_stream_chunk(1, &chunk, &mut frame).expect("encodes");

    let mut g = c.benchmark_group("stream chunk 60 KiB");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut out = Vec::with_capacity(frame.len());
    g.bench_function("encode (CRC precomputed)", |b| {
        b.iter(|| {
            out.clear();
            wire::encode_stream_chunk(black_box(1), black_box(&chunk), &mut out).expect("encodes");
            out.len()
        })
    });
    g.bench_function("new + encode (CRC computed)", |b| {
        b.iter(|| {
            out.clear();
            let c = StreamChunk::new(1, 0, false, black_box(&data).clone());
            wire::encode_stream_chunk(1, &c, &mut out).expect("encodes");
            out.len()
        })
    });
    let mut dec = FrameDecoder::new();
    g.bench_function("decode (no CRC check)", |b| {
        b.iter(|| {
            dec.push(black_box(&frame));
            let f = dec.next_frame().expect("complete").expect("valid");
            wire::decode_stream_chunk(&f).expect("decodes")
        })
    });
    g.bench_function("decode + reassembler accept (CRC checked)", |b| {
        b.iter(|| {
            dec.push(black_box(&frame));
            let f = dec.next_frame().expect("complete").expect("valid");
            let c = wire::decode_stream_chunk(&f).expect("decodes");
            StreamReassembler::new(1).accept(&c).expect("valid").len()
        })
    });
    g.bench_function("crc32c only", |b| b.iter(|| wire::crc32c(black_box(&data))));
    g.finish();
}

criterion_group!(benches, ping, chunk);
criterion_main!(benches);
