//! System tests of the control channel over the serial line (COM2 as a unix socket:
//! QEMU's own chardev, Bochs' through [`crate::serial_relay`]).
//!
//! On QEMU, one boot with vsock and COM2: Ping and Info over serial (Info lists both
//! transports), requests on both transports at once, and a line abused in every way a
//! serial line can be (noise, dropped bytes, a bad header, a client gone mid-packet,
//! many clients in turn) while the hypervisor keeps answering. On Bochs, one boot with
//! COM2 alone and a spinner domain computing throughout: the control channel on
//! VMX, and the same abuse in small.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wire::serial::Packet;
use wire::{ErrorCode, Request, Response};

use crate::client::{RawClient, SerialClient};
use crate::emulator::{Echo, Platform, RunConfig, Session, Wait};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::systest::{NamedTest, run_each, select, stopped_serving};
use crate::{Result, tools};

struct Ctx {
    /// COM2's socket.
    serial: PathBuf,
    /// The vsock hybrid socket (QEMU only).
    vsock: Option<PathBuf>,
    caps: BTreeMap<String, String>,
    /// How long a serial answer may take (Bochs: ~11 KB/s of emulated time, and
    /// emulated time runs slower than ours).
    timeout: Duration,
    /// The run's serial log, for the session lines.
    log: PathBuf,
}

const QEMU_TESTS: &[NamedTest<Ctx>] = &[
    ("control-serial-ping-info", ping_info),
    ("control-serial-and-vsock-at-once", both_at_once),
    ("control-serial-abuse-contained", abuse),
];

const BOCHS_TESTS: &[NamedTest<Ctx>] =
    &[("bochs-control-serial-ping-info", ping_info), ("bochs-control-serial-abuse-contained", abuse_small)];

/// One boot and the tests run against it.
struct Group {
    tests: &'static [NamedTest<Ctx>],
    platform: Platform,
    name: &'static str,
    /// DOMAINS.CFG.
    domains: Option<&'static str>,
}

/// Run the serial control tests matching `filter`: the QEMU ones on one boot, the
/// Bochs ones on another.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let (mut passed, mut failed) = (0, 0);
    let groups = [
        Group {
            tests: QEMU_TESTS,
            platform: Platform::Qemu { cpu: "EPYC".into() },
            name: "control-serial",
            domains: None,
        },
        // A guest computing without exits for the whole run: its slices must end early
        // enough for the UART (init::SERIAL_POLL_US).
        Group {
            tests: BOCHS_TESTS,
            platform: Platform::Bochs { model: "corei7_skylake_x".into() },
            name: "bochs-control-serial",
            domains: Some("name=spin kernel=spinner.elf memory=8M\n"),
        },
    ];
    for Group { tests, platform, name, domains } in groups {
        let selected = select(tests, filter);
        if selected.is_empty() {
            continue;
        }
        let (p, f) = run_group(esp, &selected, platform, name, domains)?;
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

fn run_group(
    esp: &Esp,
    selected: &[&NamedTest<Ctx>],
    platform: Platform,
    name: &str,
    domains: Option<&str>,
) -> Result<(usize, usize)> {
    tools::ensure(&platform)?;
    let config = RunConfig {
        name: name.into(),
        timeout: Duration::from_secs(platform.default_timeout_secs()),
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: domains.map(String::from),
    };
    println!("systest {name}-* on {platform} with COM2 on a socket ...");
    let mut session = Session::spawn(&platform, esp, &config)?;
    let wait = session.wait_until(config.timeout, &mut Echo::new(false), |l| {
        l.line("CONTROL listening on serial").is_some() || l.line("CONTROL serial ").is_some() || l.outcome().is_some()
    });
    let log = SerialLog::new(&session.serial());
    let (Wait::Matched(_), Some(_), Some(serial)) =
        (wait, log.line("CONTROL listening on serial"), session.serial_socket.clone())
    else {
        println!("systest {name}-* ... FAILED: the serial control channel did not come up ({wait:?})");
        print_log(name, &session);
        return Ok((0, selected.len()));
    };
    let bochs = matches!(platform, Platform::Bochs { .. });
    let ctx = Ctx {
        serial,
        vsock: session.vsock_socket.clone(),
        caps: log.caps().unwrap_or_default(),
        timeout: Duration::from_secs(if bochs { 60 } else { 15 }),
        log: session.serial_path.clone(),
    };
    let (passed, mut failed) = run_each(selected, &ctx);
    failed += stopped_serving(&format!("{name}-*"), "hypervisor", &session);
    if failed > 0 {
        print_log(name, &session);
    }
    session.stop();
    Ok((passed, failed))
}

fn print_log(name: &str, session: &Session) {
    println!(
        "---- serial log of {name} ({}) ----\n{}\n---- end of serial log ----",
        session.dir.display(),
        clean(&session.serial())
    );
}

fn connect(ctx: &Ctx) -> Result<SerialClient> {
    SerialClient::connect(&ctx.serial, ctx.timeout)
}

fn expect_pong(client: &mut SerialClient, payload: &[u8], what: &str) -> Result<()> {
    match client.call(&Request::Ping { payload: payload.to_vec() })? {
        Response::Pong { payload: p } if p == payload => Ok(()),
        other => Err(format!("{what}: Ping answered with {other:?}")),
    }
}

/// The last `CONTROL serial session` line: the line's health as the hypervisor saw it.
fn last_session_line(ctx: &Ctx) -> Option<String> {
    let text = std::fs::read(&ctx.log).ok()?;
    let text = clean(&String::from_utf8_lossy(&text));
    text.lines().rev().find(|l| l.contains("CONTROL serial session ")).map(|l| l.trim().to_string())
}

/// The number before `what` in a session line (`12 overruns` → 12).
fn count_in(line: &str, what: &str) -> Option<u64> {
    let words: Vec<&str> = line.split([' ', ',', '(', ')']).filter(|w| !w.is_empty()).collect();
    words.windows(2).find(|w| w[1] == what).and_then(|w| w[0].parse().ok())
}

fn ping_info(ctx: &Ctx) -> Result<String> {
    let start = Instant::now();
    let mut c = connect(ctx)?;
    let opened = start.elapsed();
    expect_pong(&mut c, b"over the serial line", "first ping")?;
    // A payload larger than the UART's FIFO many times over, with zeros (COBS) in it.
    let big: Vec<u8> = (0..2000u32).map(|i| (i % 7) as u8).collect();
    expect_pong(&mut c, &big, "2000-byte ping")?;
    let info = match c.call(&Request::Info)? {
        Response::Info(info) => info,
        other => return Err(format!("Info answered with {other:?}")),
    };
    let caps: BTreeMap<String, String> = info.capabilities.iter().cloned().collect();
    if caps != ctx.caps {
        return Err(format!(
            "Info's capabilities differ from the CAPS line:\n  info:   {caps:?}\n  serial: {:?}",
            ctx.caps
        ));
    }
    let serial_line = info.control.iter().any(|l| l == "serial COM2 0x2f8 115200 baud");
    let vsock_line = info.control.iter().any(|l| l.starts_with("vsock port 5000"));
    if !serial_line || vsock_line != ctx.vsock.is_some() {
        return Err(format!("Info's control list is {:?} (vsock expected: {})", info.control, ctx.vsock.is_some()));
    }
    if c.bad_packets > 0 {
        return Err(format!("{} bad packets from the hypervisor on a clean line", c.bad_packets));
    }
    let health = last_session_line(ctx).ok_or("no CONTROL serial session line in the log")?;
    if count_in(&health, "overruns") != Some(0) {
        return Err(format!("the UART overran: {health}"));
    }
    Ok(format!(
        "opened in {:.2} s; ping, 2000-byte ping, info in {:.2} s; control = {:?}",
        opened.as_secs_f64(),
        start.elapsed().as_secs_f64() - opened.as_secs_f64(),
        info.control
    ))
}

fn both_at_once(ctx: &Ctx) -> Result<String> {
    const EACH: usize = 100;
    let vsock = ctx.vsock.clone().ok_or("no vsock socket")?;
    let start = Instant::now();
    let v = std::thread::spawn(move || -> Result<()> {
        let mut client = RawClient::connect(&vsock, wire::CONTROL_PORT)?;
        for i in 0..EACH {
            let payload = format!("vsock {i}").into_bytes();
            match client.call(&Request::Ping { payload: payload.clone() })? {
                Response::Pong { payload: p } if p == payload => {}
                other => return Err(format!("vsock request {i}: {other:?}")),
            }
        }
        Ok(())
    });
    let mut s = connect(ctx)?;
    for i in 0..EACH {
        expect_pong(&mut s, format!("serial {i}").as_bytes(), &format!("serial request {i}"))?;
    }
    v.join().map_err(|_| "the vsock client panicked")??;
    let concurrent = start.elapsed();
    // Interleaved from one thread, with several requests in flight on the line.
    let mut v = RawClient::connect(ctx.vsock.as_deref().ok_or("no vsock socket")?, wire::CONTROL_PORT)?;
    for round in 0..10 {
        let ids: Vec<u64> = (0..3).map(|_| s.next_id()).collect();
        for &id in &ids {
            s.write_raw(&SerialClient::request_packet(id, &Request::Ping { payload: id.to_le_bytes().to_vec() })?)?;
        }
        match v.call(&Request::Info)? {
            Response::Info(_) => {}
            other => return Err(format!("round {round}: vsock Info answered with {other:?}")),
        }
        for &id in &ids {
            match s.read_response(id)? {
                Response::Pong { payload } if payload == id.to_le_bytes() => {}
                other => return Err(format!("round {round}: serial request {id}: {other:?}")),
            }
        }
    }
    Ok(format!(
        "{EACH} pings on each at once in {:.2} s; 10 rounds of 3 pipelined serial pings around a vsock info",
        concurrent.as_secs_f64()
    ))
}

/// xorshift64*: reproducible noise without a crate.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Send `first` after `noise`, then a good request; the good one must be answered,
/// and `first` exactly when `first_survives`. Returns whether `first` was answered.
fn after_damage(c: &mut SerialClient, damaged: &[u8], first_id: u64, what: &str) -> Result<bool> {
    c.write_raw(damaged)?;
    let good = c.next_id();
    c.write_raw(&SerialClient::request_packet(good, &Request::Ping { payload: b"good".to_vec() })?)?;
    let mut first_answered = false;
    loop {
        match c.read_packet()?.ok_or_else(|| format!("{what}: the socket closed"))? {
            Ok(Packet::Frame(f)) if f.request_id == good => match wire::decode_response(&f) {
                Ok(Response::Pong { payload }) if payload == b"good" => return Ok(first_answered),
                other => return Err(format!("{what}: the good request was answered with {other:?}")),
            },
            Ok(Packet::Frame(f)) if f.request_id == first_id => first_answered = true,
            _ => {}
        }
    }
}

fn abuse(ctx: &Ctx) -> Result<String> {
    abuse_with(ctx, 20, 8)
}

fn abuse_small(ctx: &Ctx) -> Result<String> {
    abuse_with(ctx, 4, 3)
}

fn abuse_with(ctx: &Ctx, noise_rounds: usize, clients: usize) -> Result<String> {
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let mut noise = Noise(seed);
    let mut findings = Vec::new();
    let mut c = connect(ctx)?;

    // 1. Random bytes (zeros among them) between packets. The packet right after the
    //    noise survives exactly when the noise ended with 0x00; the one after it always.
    let mut clean_after_zero = 0;
    for round in 0..noise_rounds {
        let len = 1 + (noise.next() % 200) as usize;
        let mut bytes = noise.bytes(len);
        if round % 2 == 0 {
            bytes.push(0);
        } else if bytes.last() == Some(&0) {
            bytes.push(0x41);
        }
        let first = c.next_id();
        bytes.extend(SerialClient::request_packet(first, &Request::Ping { payload: vec![7; 20] })?);
        let answered = after_damage(&mut c, &bytes, first, &format!("noise round {round}"))?;
        if answered != (round % 2 == 0) {
            return Err(format!(
                "noise round {round} (seed {seed:#x}): the request after the noise was answered: {answered}, \
                 expected {}",
                round % 2 == 0
            ));
        }
        clean_after_zero += usize::from(answered);
    }
    findings.push(format!(
        "{noise_rounds} rounds of noise (seed {seed:#x}), {clean_after_zero} requests right after a 0x00 answered"
    ));

    // 2. Bytes dropped in the middle of a packet: only that packet is lost.
    for cut in [3usize, 17, 40] {
        let id = c.next_id();
        let mut packet = SerialClient::request_packet(id, &Request::Ping { payload: vec![0x33; 60] })?;
        packet.drain(cut..cut + 4);
        if after_damage(&mut c, &packet, id, &format!("4 bytes dropped at {cut}"))? {
            return Err(format!("a packet with 4 bytes dropped at {cut} was answered"));
        }
    }
    findings.push("3 packets with bytes dropped mid-frame lost alone".into());

    // 3. A good packet whose frame has a bad header: answered with the error.
    let mut frame = Vec::new();
    wire::encode_request(901, &Request::Info, &mut frame).map_err(|e| e.to_string())?;
    frame[2] = 0x7e; // the version's low byte
    let mut packet = Vec::new();
    wire::serial::encode_frame_packet(&frame, &mut packet);
    c.write_raw(&packet)?;
    match c.read_response(901)? {
        Response::Error(e) if e.code == ErrorCode::UnsupportedVersion => {}
        other => return Err(format!("a bad version in a good packet: expected UnsupportedVersion, got {other:?}")),
    }
    expect_pong(&mut c, b"after a bad header", "after the bad header")?;
    findings.push("bad header: UnsupportedVersion, line kept".into());

    // 4. A client that goes away mid-packet; the next one opens and is served.
    let id = c.next_id();
    let packet = SerialClient::request_packet(id, &Request::Ping { payload: vec![0x44; 80] })?;
    c.write_raw(&packet[..packet.len() / 2])?;
    drop(c);
    let mut c = connect(ctx)?;
    expect_pong(&mut c, b"after a disconnect mid-packet", "the next client")?;
    drop(c);
    findings.push("disconnect mid-packet, next client served".into());

    // 5. Clients one after another, each with its own session.
    for i in 0..clients {
        let mut c = connect(ctx)?;
        expect_pong(&mut c, format!("client {i}").as_bytes(), &format!("client {i}"))?;
        match c.call(&Request::Info)? {
            Response::Info(_) => {}
            other => return Err(format!("client {i}: Info answered with {other:?}")),
        }
    }
    findings.push(format!("{clients} clients in turn answered"));

    // Alive on every transport, and the UART never overran.
    let mut c = connect(ctx)?;
    expect_pong(&mut c, b"still there", "after the abuse")?;
    if let Some(vsock) = &ctx.vsock {
        match RawClient::connect(vsock, wire::CONTROL_PORT)?.call(&Request::Ping { payload: vec![1] })? {
            Response::Pong { .. } => {}
            other => return Err(format!("vsock after the serial abuse: {other:?}")),
        }
    }
    let health = last_session_line(ctx).ok_or("no CONTROL serial session line")?;
    if count_in(&health, "overruns") != Some(0) || count_in(&health, "bytes") != Some(0) {
        return Err(format!("the UART or its driver lost bytes: {health}"));
    }
    Ok(format!("{}; {health}", findings.join(", ")))
}

/// The line rate a 115200-baud 8N1 UART can carry, in bytes per second (10 bits per byte:
/// start, 8 data, stop).
const LINE_BYTES_PER_SEC: f64 = 115_200.0 / 10.0;

/// `cargo xtask bench serial`: on QEMU (vsock and COM2 in one boot), ping round trips
/// over serial against vsock, as a ratio, and the serial throughput; on Bochs (COM2
/// only, baud-rate timing emulated), the serial round trip and throughput. Throughput is
/// the bytes the line carried (request and response packets, COBS and CRC included)
/// per second of sequential 16 KiB pings, against the 11 520 B/s a 115200-baud line can
/// carry in one direction at a time.
pub fn bench(runs: usize) -> Result<()> {
    let esp = crate::image::build(true)?;
    let runs = runs.max(10);
    for platform in [Platform::Qemu { cpu: "EPYC".into() }, Platform::Bochs { model: "corei7_skylake_x".into() }] {
        tools::ensure(&platform)?;
        let config = RunConfig {
            name: "bench-serial".into(),
            timeout: Duration::from_secs(platform.default_timeout_secs()),
            cmdline: String::new(),
            echo: false,
            vsock: true,
            domains: None,
        };
        let mut session = Session::spawn(&platform, &esp, &config)?;
        let wait = session.wait_until(config.timeout, &mut Echo::new(false), |l| {
            l.line("CONTROL listening on serial").is_some() || l.outcome().is_some()
        });
        let socket = session.serial_socket.clone();
        let (Wait::Matched(_), Some(socket)) = (wait, socket) else {
            return Err(format!("{platform}: no serial control channel ({wait:?}):\n{}", clean(&session.serial())));
        };
        let mut serial = SerialClient::connect(&socket, Duration::from_secs(60))?;
        let ping = Request::Ping { payload: vec![7; 16] };
        let serial_rtt = round_trips(runs, || serial.call(&ping))?;
        println!("{platform}: serial ping (16 B), {runs} round trips: {}", serial_rtt.summary());
        if let Some(vsock) = session.vsock_socket.clone() {
            let mut client = RawClient::connect(&vsock, wire::CONTROL_PORT)?;
            let vsock_rtt = round_trips(runs, || client.call(&ping))?;
            println!("{platform}: vsock ping (16 B), {runs} round trips: {}", vsock_rtt.summary());
            println!(
                "{platform}: serial/vsock round trip, median: {:.2}x (same boot, same run)",
                serial_rtt.median / vsock_rtt.median
            );
        }
        let big = Request::Ping { payload: vec![0x5a; 16 * 1024] };
        let line_bytes = {
            let request = SerialClient::request_packet(1, &big)?.len();
            let mut frame = Vec::new();
            wire::encode_response(1, &Response::Pong { payload: vec![0x5a; 16 * 1024] }, &mut frame)
                .map_err(|e| e.to_string())?;
            let mut packet = Vec::new();
            wire::serial::encode_frame_packet(&frame, &mut packet);
            request + packet.len()
        };
        let count = if matches!(platform, Platform::Bochs { .. }) { 4 } else { 16 };
        let start = Instant::now();
        for _ in 0..count {
            match serial.call(&big)? {
                Response::Pong { payload } if payload.len() == 16 * 1024 => {}
                other => return Err(format!("{platform}: 16 KiB ping answered with {other:?}")),
            }
        }
        let rate = (line_bytes * count) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{platform}: serial throughput {rate:.0} B/s over {count} x 16 KiB pings ({line_bytes} line bytes each): \
             {:.2}x the {LINE_BYTES_PER_SEC:.0} B/s of 115200 baud{}",
            rate / LINE_BYTES_PER_SEC,
            if matches!(platform, Platform::Qemu { .. }) {
                " (QEMU's UART does not emulate the baud rate)"
            } else {
                " (Bochs times the line in emulated time)"
            }
        );
        session.stop();
    }
    Ok(())
}

/// Sorted round-trip times.
struct RoundTrips {
    median: f64,
    p99: f64,
    min: f64,
}

impl RoundTrips {
    fn summary(&self) -> String {
        format!("median {:.0} µs, p99 {:.0} µs, min {:.0} µs", self.median * 1e6, self.p99 * 1e6, self.min * 1e6)
    }
}

fn round_trips(runs: usize, mut call: impl FnMut() -> Result<Response>) -> Result<RoundTrips> {
    for _ in 0..runs / 10 {
        call()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        match call()? {
            Response::Error(e) => return Err(format!("ping: {e}")),
            _ => times.push(t.elapsed().as_secs_f64()),
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    Ok(RoundTrips { median: at(0.5), p99: at(0.99), min: at(0.0) })
}
