//! `cargo xtask bench relay` (issue 13, item 5): how close `hvctl migrate`'s relay
//! gets to what the control transport itself carries, in one run on one pair of QEMU
//! instances (the migration tests' pair, `migration_tests::start_pair`).
//!
//! Before each migration, over one vsock connection to each hypervisor that stays open
//! for the whole run (the same vhost-device-vsock socket and control port the relay's
//! own connections use), the raw rates in the two directions the relay moves the
//! stream: `BenchFill` (hypervisor → host, a `MigrateRead`'s direction) from the
//! source, where the writer runs as it does during the pre-copy, and `BenchDiscard`
//! (host → hypervisor, a `MigrateWrite`'s direction) into the destination, each in
//! pieces of `MAX_BENCH_DATA` (the relay's 60 KiB), one request at a time as the relay
//! sends them, and with [`WINDOW`] requests in flight to show what pipelining would
//! give. Then a live migration of a memwriter rewriting [`WRITER_MIB`] MiB of a
//! [`GUEST_MEMORY`] guest, relayed by the release hvctl, as pages/s and bytes/s; the
//! next run migrates it back (both directions of the pair are exercised).
//!
//! The ratios printed: relay / the slower raw direction (what a perfectly overlapped
//! relay could reach), and relay / the stop-and-wait bound `1 / (1/read + 1/write)`
//! (what a relay that reads a piece, then writes it, one at a time, can reach). The
//! second says how much of the gap is the relay's serialization, the rest is the
//! hypervisors' own work on the stream (encoding and decoding records, reading and
//! writing guest memory).
//!
//! The agent's relay against hvctl's is `cargo xtask bench agent` (agent_tests.rs).

use std::io::Write;
use std::time::{Duration, Instant};

use wire::{MAX_BENCH_DATA, Request, Response};

use crate::Result;
use crate::client::RawClient;
use crate::emulator::Session;
use crate::migration_tests::{self, Ctx};

/// Guest size and the part the writer rewrites, round after round.
const GUEST_MEMORY: &str = "128M";
const WRITER_MIB: u64 = 64;
/// Dirty rounds before the pause and a downtime allowance the writer fits in (a writer
/// this size never converges on TCG: the bench measures the stream, not convergence).
const MAX_ROUNDS: &str = "2";
const DOWNTIME_MS: &str = "30000";
/// Raw pieces per measurement (each MAX_BENCH_DATA bytes: 6 MB), and measurements per
/// figure (the median is kept: a loaded core stalls one of them now and then).
const RAW_PIECES: usize = 100;
const RAW_REPEATS: usize = 3;
/// Requests in flight for the pipelined raw figure (the core answers up to 4 per turn).
const WINDOW: usize = 4;

/// One raw measurement: bytes per second.
#[derive(Clone, Copy, Debug)]
struct Raw {
    fill: f64,
    discard: f64,
    fill_pipelined: f64,
    discard_pipelined: f64,
}

fn mbs(bytes_per_sec: f64) -> String {
    format!("{:.2} MB/s", bytes_per_sec / 1e6)
}

fn fill_request() -> Request {
    Request::BenchFill { len: MAX_BENCH_DATA as u32 }
}

fn discard_request() -> Request {
    Request::BenchDiscard { bytes: vec![0x5a; MAX_BENCH_DATA] }
}

/// Check one answer to a bench request: the bytes it moved.
fn moved(response: &Response) -> Result<usize> {
    match response {
        Response::BenchData { bytes } if bytes.len() == MAX_BENCH_DATA => Ok(bytes.len()),
        Response::BenchDiscarded { len } if *len as usize == MAX_BENCH_DATA => Ok(MAX_BENCH_DATA),
        Response::Error(e) => Err(format!("the hypervisor refused the bench request: {e}")),
        other => Err(format!("unexpected answer to a bench request: {other:?}")),
    }
}

/// `pieces` requests made by `make` on `client`, `window` in flight at a time; the
/// payload bytes moved per second.
fn rate(client: &mut RawClient, make: fn() -> Request, pieces: usize, window: usize) -> Result<f64> {
    // Ids of their own (the client's counter is private); answers come back in order.
    const FIRST_ID: u64 = 1 << 40;
    let mut frame = Vec::new();
    let started = Instant::now();
    let (mut sent, mut answered, mut bytes) = (0usize, 0usize, 0usize);
    while answered < pieces {
        while sent < pieces && sent - answered < window.max(1) {
            frame.clear();
            wire::encode_request(FIRST_ID + sent as u64, &make(), &mut frame).map_err(|e| e.to_string())?;
            client.stream.write_all(&frame).map_err(|e| format!("write: {e}"))?;
            sent += 1;
        }
        let f = client.read_frame()?.ok_or("the hypervisor closed the bench connection")?;
        if f.request_id != FIRST_ID + answered as u64 {
            return Err(format!("answer {} arrived for request {}", f.request_id, FIRST_ID + answered as u64));
        }
        let response = wire::decode_response(&f).map_err(|e| format!("bad response: {e}"))?;
        bytes += moved(&response)?;
        answered += 1;
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Fill from `from` (the source, its writer running), discard into `to` (the
/// destination, idle), stop-and-wait and pipelined, interleaved; each the median of
/// [`RAW_REPEATS`] measurements.
fn raw(from: &mut RawClient, to: &mut RawClient) -> Result<Raw> {
    let mut all: [Vec<f64>; 4] = Default::default();
    for _ in 0..RAW_REPEATS {
        all[0].push(rate(from, fill_request, RAW_PIECES, 1)?);
        all[1].push(rate(to, discard_request, RAW_PIECES, 1)?);
        all[2].push(rate(from, fill_request, RAW_PIECES, WINDOW)?);
        all[3].push(rate(to, discard_request, RAW_PIECES, WINDOW)?);
    }
    let [fill, discard, fill_pipelined, discard_pipelined] = all.map(|mut v| median(&mut v));
    Ok(Raw { fill, discard, fill_pipelined, discard_pipelined })
}

fn connect(session: &Session) -> Result<RawClient> {
    let socket = session.vsock_socket.as_deref().ok_or("the instance has no vsock socket")?;
    let client = RawClient::connect(socket, wire::CONTROL_PORT)?;
    client.stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    Ok(client)
}

/// Median of `v` (sorted in place; the mean of the middle two for an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match (v.get(n / 2), n % 2) {
        (Some(hi), 0) => v.get(n / 2 - 1).map_or(f64::NAN, |lo| (lo + hi) / 2.0),
        (Some(m), _) => *m,
        (None, _) => f64::NAN,
    }
}

/// One run's figures.
struct Run {
    raw: Raw,
    pages_per_sec: f64,
    bytes_per_sec: f64,
}

impl Run {
    /// What a relay that reads a piece, then writes it, one at a time, can reach.
    fn serial_bound(&self) -> f64 {
        1.0 / (1.0 / self.raw.fill + 1.0 / self.raw.discard)
    }

    fn slower_raw(&self) -> f64 {
        self.raw.fill.min(self.raw.discard)
    }
}

/// `cargo xtask bench relay [--runs N]` (default 2: there and back).
pub fn bench(runs: usize) -> Result<()> {
    let esp = crate::image::build(true)?;
    let Some(mut ctx) = migration_tests::start_pair(&esp, "bench-relay")? else {
        return Err("the hypervisors did not come up".into());
    };
    let result = run(&mut ctx, runs.max(1));
    migration_tests::finish_pair(&mut ctx, "bench-relay", usize::from(result.is_err()));
    result
}

fn run(ctx: &mut Ctx, runs: usize) -> Result<()> {
    // hvctl as a host runs it: optimized.
    ctx.hvctl = crate::systest::build_hvctl_profile(true)?;
    let mut a = connect(&ctx.src)?;
    let mut b = connect(&ctx.dst)?;
    let pages = WRITER_MIB * 256;
    let cmdline = format!("pages={pages} rounds=100000000 seed=7 base=0x300000 every=256");
    let (code, id) = migration_tests::create_writer(ctx, &ctx.src, "relay", GUEST_MEMORY, &cmdline)?;
    let mut id = id.map_err(|e| format!("creating the writer: exit {code:?}: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "bench relay: memwriter rewriting {WRITER_MIB} MiB of {GUEST_MEMORY}, hvctl migrate --max-rounds {MAX_ROUNDS} \
         --downtime {DOWNTIME_MS}; raw: medians of {RAW_REPEATS} × {RAW_PIECES} pieces of {MAX_BENCH_DATA} bytes each \
         way per run, one at a time and {WINDOW} in flight, on one connection per hypervisor held for the whole run"
    );
    let mut results = Vec::new();
    let mut on_src = true;
    for i in 0..runs {
        let (from, to) = if on_src { (&ctx.src, &ctx.dst) } else { (&ctx.dst, &ctx.src) };
        let (from_name, to_name) = if on_src { ("A", "B") } else { ("B", "A") };
        let raw = if on_src { raw(&mut a, &mut b)? } else { raw(&mut b, &mut a)? };
        println!(
            "run {} raw: read from {from_name} (writer running) {} ({} with {WINDOW} in flight), write to \
             {to_name} {} ({} with {WINDOW} in flight)",
            i + 1,
            mbs(raw.fill),
            mbs(raw.fill_pipelined),
            mbs(raw.discard),
            mbs(raw.discard_pipelined)
        );
        let started = Instant::now();
        let report = migration_tests::migrate_between(
            ctx,
            from,
            to,
            id,
            &["--max-rounds", MAX_ROUNDS, "--downtime", DOWNTIME_MS],
        )?;
        let wall = started.elapsed();
        if report["outcome"] != "completed" {
            return Err(format!("migration {} did not complete: {report}", i + 1));
        }
        let bytes = report["bytes_sent"].as_f64().unwrap_or(0.0);
        let pages_sent = report["pages_sent"].as_f64().unwrap_or(0.0);
        let secs = report["duration_ms"].as_f64().unwrap_or(0.0).max(1.0) / 1e3;
        let r = Run { raw, pages_per_sec: pages_sent / secs, bytes_per_sec: bytes / secs };
        println!(
            "run {} relay {from_name} → {to_name}: {pages_sent} pages, {bytes} bytes in {:.0} ms (wall {:.0} ms, \
             downtime {} ms): {:.0} pages/s, {}; relay/raw {:.2} (of the slower direction), {:.2} of the \
             stop-and-wait bound {}",
            i + 1,
            secs * 1e3,
            wall.as_secs_f64() * 1e3,
            report["downtime_ms"],
            r.pages_per_sec,
            mbs(r.bytes_per_sec),
            r.bytes_per_sec / r.slower_raw(),
            r.bytes_per_sec / r.serial_bound(),
            mbs(r.serial_bound())
        );
        results.push(r);
        id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
        on_src = !on_src;
    }
    let pick = |f: &dyn Fn(&Run) -> f64| median(&mut results.iter().map(f).collect::<Vec<_>>());
    let (pages_s, bytes_s) = (pick(&|r| r.pages_per_sec), pick(&|r| r.bytes_per_sec));
    let (fill, discard) = (pick(&|r| r.raw.fill), pick(&|r| r.raw.discard));
    let (fill_p, discard_p) = (pick(&|r| r.raw.fill_pipelined), pick(&|r| r.raw.discard_pipelined));
    let ratio = pick(&|r| r.bytes_per_sec / r.slower_raw());
    let ratio_bound = pick(&|r| r.bytes_per_sec / r.serial_bound());
    println!(
        "relay, medians of {} runs: {pages_s:.0} pages/s, {}; raw over the same vsock: read {} and write {} one \
         piece at a time ({} and {} with {WINDOW} in flight); relay/raw {ratio:.2} (of the slower direction), \
         {ratio_bound:.2} of the stop-and-wait bound",
        results.len(),
        mbs(bytes_s),
        mbs(fill),
        mbs(discard),
        mbs(fill_p),
        mbs(discard_p),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(super::median(&mut [3.0, 1.0]), 2.0);
        assert_eq!(super::median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert!(super::median(&mut []).is_nan());
    }
}
