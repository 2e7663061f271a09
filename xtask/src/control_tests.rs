//! System tests of the control channel, on one QEMU instance with a virtio-vsock
//! device: `hvctl info --json` against the serial log, many concurrent clients, and
//! misbehaving clients while a well-behaved one keeps being served.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wire::{ErrorCode, Request, Response, ServiceId};

use crate::client::RawClient;
use crate::emulator::{Echo, Platform, RunConfig, Session, Wait};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::systest::{NamedTest, build_hvctl, hvctl_output, run_each, select, stopped_serving, wait_for, wait_serving};
use crate::{Result, tools};

/// A booted hypervisor the tests talk to. The hvctl-driven tests use `target` only, so
/// they also run over the serial channel on Bochs (`bochs_serial_tests`).
pub struct Ctx {
    /// The vsock hybrid socket, for the raw-client tests.
    pub socket: PathBuf,
    /// hvctl's `--connect` target.
    pub target: String,
    /// The hvctl binary.
    pub hvctl: PathBuf,
    /// The CAPS line's values.
    pub caps: BTreeMap<String, String>,
    /// The guest kernels (target/esp/EFI/HV).
    pub guests: PathBuf,
}

const TESTS: &[NamedTest<Ctx>] = &[
    ("control-info-json-matches-serial", info_json_matches_serial),
    ("control-8-clients-x-200-requests", concurrent_clients),
    ("control-misbehaving-clients-are-contained", misbehaving_clients),
    ("control-still-serving-after-abuse", still_serving),
    ("control-domain-lifecycle-with-hvctl", domain_lifecycle),
    ("control-domain-create-destroy-50x-no-leak", domain_churn),
    ("control-monitor-hwinfo-attach-events-export", monitor_events),
    ("control-dirty-logging-with-hvctl", dirty_hvctl),
    ("control-upload-14mb-kernel-runs", upload_large_kernel),
    ("control-upload-corrupt-chunk-refused", upload_corrupt_chunk),
    ("control-interactive-console-echo", interactive_console),
];

/// Boot once with a vsock device and run the control tests (those matching `filter`).
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected = select(TESTS, filter);
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let hvctl = build_hvctl()?;
    let config = RunConfig {
        name: "control".into(),
        timeout: Duration::from_secs(platform.default_timeout_secs()),
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    println!("systest control-* on {platform} with virtio-vsock ...");
    let mut session = Session::spawn(&platform, esp, &config)?;
    let serving = wait_serving(&mut session, config.timeout);
    let log = SerialLog::new(&session.serial());
    let socket = session.vsock_socket.clone().ok_or("no vsock socket")?;
    if let Err(wait) = serving {
        println!("systest control-* ... FAILED: the control channel did not come up ({wait})");
        print_log(&session);
        return Ok((0, selected.len()));
    }
    let target = format!("unix:{}:{}", socket.display(), wire::CONTROL_PORT);
    let ctx =
        Ctx { socket, target, hvctl, caps: log.caps().unwrap_or_default(), guests: esp.dir.join("EFI").join("HV") };
    let (passed, mut failed) = run_each(&selected, &ctx);
    failed += stopped_serving("control-*", "hypervisor", &session);
    if failed > 0 {
        print_log(&session);
    }
    session.stop();
    Ok((passed, failed))
}

fn print_log(session: &Session) {
    println!(
        "---- serial log of control ({}) ----\n{}\n---- end of serial log ----",
        session.dir.display(),
        clean(&session.serial())
    );
}

/// Run hvctl and return (exit code, stdout, stderr) without judging it.
pub fn hvctl_raw(ctx: &Ctx, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    hvctl_output(&ctx.hvctl, &[&["--connect", ctx.target.as_str()], args].concat())
}

/// Run hvctl against `ctx`; its stdout, or why it failed.
pub fn hvctl(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let (code, stdout, stderr) = hvctl_raw(ctx, args)?;
    if code != Some(0) {
        let status = code.map_or_else(|| "a signal".to_string(), |c| format!("exit status: {c}"));
        return Err(format!("hvctl {} exited with {status}: {}", args.join(" "), stderr.trim()));
    }
    Ok(stdout)
}

fn info_json_matches_serial(ctx: &Ctx) -> Result<String> {
    let text = hvctl(ctx, &["info", "--json"])?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("hvctl info --json is not JSON: {e}"))?;
    let caps: BTreeMap<String, String> = v["capabilities"]
        .as_object()
        .ok_or("no capabilities object")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
        .collect();
    if caps != ctx.caps {
        return Err(format!(
            "capabilities differ from the serial CAPS line:\n  hvctl:  {caps:?}\n  serial: {:?}",
            ctx.caps
        ));
    }
    if v["protocol_version"] != wire::PROTOCOL_VERSION {
        return Err(format!("protocol_version {} != {}", v["protocol_version"], wire::PROTOCOL_VERSION));
    }
    let services = v["services"].as_array().ok_or("no services")?;
    let names: Vec<&str> = services.iter().filter_map(|s| s["service"].as_str()).collect();
    if names != ["core", "monitor", "migration"] || services.iter().any(|s| s["state"] != "running") {
        return Err(format!("unexpected services: {services:?}"));
    }
    if v["uptime_ns"].as_u64().unwrap_or(0) == 0 || v["memory_bytes"].as_u64().unwrap_or(0) < 256 << 20 {
        return Err(format!("implausible uptime or memory: {v}"));
    }
    Ok(format!("{} capabilities equal", caps.len()))
}

fn concurrent_clients(ctx: &Ctx) -> Result<String> {
    const CLIENTS: u64 = 8;
    const REQUESTS: u64 = 200;
    let start = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = ctx.socket.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut client = RawClient::connect(&socket, wire::CONTROL_PORT)?;
                for i in 0..REQUESTS {
                    if i % 25 == 24 {
                        match client.call(&Request::ServiceStatus { service: ServiceId::Monitor })? {
                            Response::ServiceStatus(s) if s.service == ServiceId::Monitor => {}
                            other => return Err(format!("client {c}: status answered with {other:?}")),
                        }
                        continue;
                    }
                    let payload: Vec<u8> = format!("client {c} request {i}").into_bytes();
                    match client.call(&Request::Ping { payload: payload.clone() })? {
                        Response::Pong { payload: p } if p == payload => {}
                        other => return Err(format!("client {c} request {i}: wrong answer {other:?}")),
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "a client thread panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!("{} requests in {secs:.2} s", CLIENTS * REQUESTS))
}

/// Read frames until one arrives or the connection closes; returns the error reply
/// if the hypervisor sent one.
fn expect_error_then_close(client: &mut RawClient, what: &str) -> Result<Option<(u64, ErrorCode)>> {
    let mut error = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if Instant::now() > deadline {
            return Err(format!("{what}: the connection was not closed within 15 s"));
        }
        match client.read_frame() {
            Ok(None) => return Ok(error),
            Ok(Some(frame)) => match wire::decode_response(&frame) {
                Ok(Response::Error(e)) => error = Some((frame.request_id, e.code)),
                other => return Err(format!("{what}: unexpected answer {other:?}")),
            },
            Err(e) if e.contains("timed out") || e.contains("Resource temporarily unavailable") => {
                return Err(format!("{what}: no answer and no close: {e}"));
            }
            Err(_) => return Ok(error),
        }
    }
}

fn header(version: u16, kind: u8, request_id: u64, len: u32) -> Vec<u8> {
    let mut h = Vec::from(wire::MAGIC);
    h.extend_from_slice(&version.to_le_bytes());
    h.push(kind);
    h.push(0);
    h.extend_from_slice(&request_id.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

fn misbehaving_clients(ctx: &Ctx) -> Result<String> {
    // A well-behaved client pings throughout; it must never fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let good = {
        let (socket, stop, ok, bad) = (ctx.socket.clone(), stop.clone(), ok.clone(), bad.clone());
        std::thread::spawn(move || {
            let Ok(mut client) = RawClient::connect(&socket, wire::CONTROL_PORT) else {
                bad.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                match client.call(&Request::Ping { payload: b"steady".to_vec() }) {
                    Ok(Response::Pong { payload }) if payload == b"steady" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let socket: &Path = &ctx.socket;
    let port = wire::CONTROL_PORT;
    let mut findings = Vec::new();
    let result = (|| -> Result<()> {
        // 1. Garbage that is not our protocol at all.
        let mut c = RawClient::connect(socket, port)?;
        c.stream.write_all(b"GET / HTTP/1.1\r\nHost: hv\r\n\r\n").map_err(|e| e.to_string())?;
        match expect_error_then_close(&mut c, "garbage")? {
            Some((_, ErrorCode::BadFrame)) => findings.push("garbage: BadFrame + close"),
            other => return Err(format!("garbage: expected a BadFrame reply and a close, got {other:?}")),
        }
        // 2. A header announcing more than MAX_FRAME_LEN.
        let mut c = RawClient::connect(socket, port)?;
        c.stream
            .write_all(&header(wire::PROTOCOL_VERSION, 1, 41, wire::MAX_FRAME_LEN as u32 + 1))
            .map_err(|e| e.to_string())?;
        match expect_error_then_close(&mut c, "oversize")? {
            Some((41, ErrorCode::FrameTooLarge)) => findings.push("oversize: FrameTooLarge + close"),
            other => return Err(format!("oversize: expected FrameTooLarge for request 41, got {other:?}")),
        }
        // 3. A protocol version we do not speak.
        let mut c = RawClient::connect(socket, port)?;
        c.stream.write_all(&header(wire::PROTOCOL_VERSION + 7, 1, 77, 1)).map_err(|e| e.to_string())?;
        c.stream.write_all(&[1]).map_err(|e| e.to_string())?;
        match expect_error_then_close(&mut c, "wrong version")? {
            Some((77, ErrorCode::UnsupportedVersion)) => findings.push("wrong version: UnsupportedVersion + close"),
            other => return Err(format!("wrong version: expected UnsupportedVersion for request 77, got {other:?}")),
        }
        // 4. Half a frame, then silence: closed with Timeout after the stall limit.
        let mut c = RawClient::connect(socket, port)?;
        c.stream.write_all(&header(wire::PROTOCOL_VERSION, 1, 5, 100)).map_err(|e| e.to_string())?;
        c.stream.write_all(&[0u8; 10]).map_err(|e| e.to_string())?;
        let t = Instant::now();
        match expect_error_then_close(&mut c, "stalled half frame")? {
            Some((_, ErrorCode::Timeout)) => findings.push("stalled half frame: Timeout + close"),
            other => return Err(format!("stalled half frame: expected a Timeout reply, got {other:?}")),
        }
        if t.elapsed() < Duration::from_secs(4) {
            return Err(format!("stalled half frame closed too early ({:.1} s)", t.elapsed().as_secs_f64()));
        }
        // 5. Half a frame, then hang up.
        let mut c = RawClient::connect(socket, port)?;
        c.stream.write_all(&header(wire::PROTOCOL_VERSION, 1, 6, 100)).map_err(|e| e.to_string())?;
        c.stream.write_all(&[0u8; 3]).map_err(|e| e.to_string())?;
        drop(c);
        findings.push("disconnect mid-frame");
        // 6. A valid frame whose payload is not a request.
        let mut c = RawClient::connect(socket, port)?;
        let mut frame = header(wire::PROTOCOL_VERSION, 1, 9, 3);
        frame.extend_from_slice(&[0xee, 0xee, 0xee]);
        c.stream.write_all(&frame).map_err(|e| e.to_string())?;
        match c.read_frame()?.map(|f| (f.request_id, wire::decode_response(&f))) {
            Some((9, Ok(Response::Error(e)))) if e.code == ErrorCode::BadRequest => {
                findings.push("undecodable payload: BadRequest, connection kept")
            }
            other => return Err(format!("undecodable payload: expected BadRequest for request 9, got {other:?}")),
        }
        match c.call(&Request::Ping { payload: vec![1] })? {
            Response::Pong { .. } => {}
            other => return Err(format!("after BadRequest the connection should still serve: {other:?}")),
        }
        Ok(())
    })();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let _ = good.join();
    result?;
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    if bad > 0 || ok < 50 {
        return Err(format!("the well-behaved client was disturbed: {ok} answers, {bad} failures"));
    }
    Ok(format!("{}; the steady client got {ok} answers, 0 failures", findings.join(", ")))
}

fn still_serving(ctx: &Ctx) -> Result<String> {
    let out = hvctl(ctx, &["ping", "-c", "3", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("ping --json: {e}"))?;
    if v["count"] != 3 {
        return Err(format!("ping --json: {v}"));
    }
    let text = hvctl(ctx, &["info", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("info --json: {e}"))?;
    let core = v["services"].as_array().and_then(|s| s.first()).ok_or("no services")?;
    Ok(format!("core has handled {} requests", core["handled"]))
}

/// `cargo xtask bench control`: `runs` round trips each of Ping and Info over one
/// connection, after a warm-up; median and p99 (TCG timings: relative, not absolute).
pub fn bench(runs: usize) -> Result<()> {
    let esp = crate::image::build(true)?;
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let config = RunConfig {
        name: "bench-control".into(),
        timeout: Duration::from_secs(60),
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    let mut session = Session::spawn(&platform, &esp, &config)?;
    let wait = session.wait_until(config.timeout, &mut Echo::new(false), |l| l.line("CONTROL listening").is_some());
    if !matches!(wait, Wait::Matched(_)) {
        return Err(format!("the control channel did not come up ({wait:?}):\n{}", clean(&session.serial())));
    }
    let socket = session.vsock_socket.clone().ok_or("no vsock socket")?;
    let mut client = RawClient::connect(&socket, wire::CONTROL_PORT)?;
    let runs = runs.max(10);
    for (name, request) in [("ping (16 B)", Request::Ping { payload: vec![7; 16] }), ("info", Request::Info)] {
        for _ in 0..runs / 10 {
            client.call(&request)?;
        }
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            match client.call(&request)? {
                Response::Error(e) => return Err(format!("{name}: {e}")),
                _ => times.push(t.elapsed()),
            }
        }
        times.sort();
        let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
        println!(
            "{name:<12} {runs} round trips: median {:.0} µs, p99 {:.0} µs, min {:.0} µs, max {:.0} µs",
            at(0.5),
            at(0.99),
            at(0.0),
            at(1.0)
        );
    }
    session.stop();
    Ok(())
}

pub fn domain_list(ctx: &Ctx) -> Result<serde_json::Value> {
    let text = hvctl(ctx, &["domain", "list", "--json"])?;
    serde_json::from_str(&text).map_err(|e| format!("domain list --json: {e}"))
}

pub fn domain_state(list: &serde_json::Value, id: u64) -> Option<String> {
    list["domains"].as_array()?.iter().find(|d| d["id"] == id).and_then(|d| d["state"].as_str()).map(String::from)
}

/// Create a small memwriter (24 MiB, 2 rounds of 64 pages) named `name` and wait up to
/// `secs` for it to end as finished(0); its id.
pub fn small_writer_finished(ctx: &Ctx, name: &str, secs: u64) -> Result<u64> {
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    let args = ["domain", "create", "--kernel", &kernel, "--name", name, "--memory", "24M"];
    let out = hvctl(ctx, &[&args[..], &["--cmdline", "pages=64 rounds=2 seed=9", "--json"]].concat())?;
    let writer: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}"))?;
    let id = writer["id"].as_u64().ok_or("create gave no id")?;
    wait_for("the writer to finish", secs, || {
        Ok(domain_state(&domain_list(ctx)?, id).as_deref() == Some("finished(0)"))
    })?;
    Ok(id)
}

pub fn domain_lifecycle(ctx: &Ctx) -> Result<String> {
    let kernel = |name: &str| ctx.guests.join(format!("{name}.elf")).display().to_string();
    let before = domain_list(ctx)?["free_frames"].as_u64().ok_or("no free_frames")?;
    // A writer runs to completion; its console and state are visible.
    let wid = small_writer_finished(ctx, "lw", 30)?;
    let console = hvctl(ctx, &["domain", "console", &wid.to_string()])?;
    if !console.contains("memwriter: done") {
        return Err(format!("console of the writer lacks its last line: {console:?}"));
    }
    // A spinner can be paused (its exits stop growing) and unpaused.
    let out =
        hvctl(ctx, &["domain", "create", "--kernel", &kernel("spinner"), "--name", "ls", "--memory", "8M", "--json"])?;
    let spinner: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}"))?;
    let sid = spinner["id"].as_u64().ok_or("create gave no id")?;
    std::thread::sleep(Duration::from_millis(500));
    hvctl(ctx, &["domain", "pause", &sid.to_string()])?;
    let exits = |l: &serde_json::Value| {
        l["domains"].as_array().and_then(|d| d.iter().find(|d| d["id"] == sid)).map(|d| d["exits_total"].as_u64())
    };
    let paused_at = exits(&domain_list(ctx)?);
    std::thread::sleep(Duration::from_millis(700));
    let list = domain_list(ctx)?;
    if exits(&list) != paused_at || domain_state(&list, sid).as_deref() != Some("paused") {
        return Err(format!("the paused spinner kept running: {paused_at:?} -> {:?}", exits(&list)));
    }
    hvctl(ctx, &["domain", "unpause", &sid.to_string()])?;
    wait_for("the unpaused spinner to run", 10, || Ok(exits(&domain_list(ctx)?) > paused_at))?;
    // An infeasible policy is refused with levelling's explanation (exit code 4).
    let (code, _, err) = hvctl_raw(
        ctx,
        &["domain", "create", "--kernel", &kernel("cpuid-probe"), "--name", "bad", "--cpuid", "base=none,+avx2"],
    )?;
    if code != Some(4) || !err.contains("dependency chain: avx2 -> avx") {
        return Err(format!("an AVX2-without-AVX policy was not refused with the chain: exit {code:?}, {err}"));
    }
    for id in [wid, sid] {
        hvctl(ctx, &["domain", "destroy", &id.to_string()])?;
    }
    let (code, _, err) = hvctl_raw(ctx, &["domain", "destroy", &wid.to_string()])?;
    if code != Some(4) || !err.contains(&format!("no domain {wid}")) {
        return Err(format!("destroying a destroyed domain: exit {code:?}, {err}"));
    }
    let after = domain_list(ctx)?["free_frames"].as_u64().ok_or("no free_frames")?;
    if after != before {
        return Err(format!("free frames {before} before, {after} after"));
    }
    Ok(format!("create, console, pause/unpause, refused policy, destroy; free frames back to {after}"))
}

fn domain_churn(ctx: &Ctx) -> Result<String> {
    let kernel = std::fs::read(ctx.guests.join("memwriter.elf")).map_err(|e| format!("memwriter.elf: {e}"))?;
    let mut client = RawClient::connect(&ctx.socket, wire::CONTROL_PORT)?;
    let free = |client: &mut RawClient| -> Result<u64> {
        match client.call(&Request::DomainList)? {
            Response::DomainList(l) => Ok(l.free_frames),
            other => Err(format!("domain list: {other:?}")),
        }
    };
    let before = free(&mut client)?;
    for i in 0..50u32 {
        let spec = wire::DomainSpec {
            name: format!("churn{i}"),
            kernel: wire::ImageRef::Inline(kernel.clone()),
            initrd: None,
            memory_bytes: 16 << 20,
            vcpus: 1 + i % 2,
            cpuid: None,
            cmdline: "pages=16 rounds=1".into(),
            cpus: None,
        };
        let id = match client.call(&Request::DomainCreate(spec))? {
            Response::DomainCreated { id } => id,
            other => return Err(format!("create {i}: {other:?}")),
        };
        if i % 10 == 9 {
            // Let some of them run (and finish) before they go.
            std::thread::sleep(Duration::from_millis(100));
        }
        match client.call(&Request::DomainDestroy { id })? {
            Response::Done => {}
            other => return Err(format!("destroy {id}: {other:?}")),
        }
    }
    let after = free(&mut client)?;
    if after != before {
        return Err(format!(
            "{} frames leaked over 50 create/destroy cycles ({before} free before, {after} after)",
            before.abs_diff(after)
        ));
    }
    Ok(format!("50 create/destroy cycles, free frames {before} before and after"))
}

fn stats_of(ctx: &Ctx, domain: u64) -> Result<serde_json::Value> {
    let text = hvctl(ctx, &["monitor", "stats", &domain.to_string(), "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("monitor stats --json: {e}"))?;
    Ok(v[0]["events"].clone())
}

/// Check OpenMetrics text: families declared before their samples, counters' samples
/// end in `_total`, units the suffix of their family's name, every value a number,
/// `# EOF` last.
pub fn check_openmetrics(text: &str) -> Result<usize> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = 0;
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("OpenMetrics text must end with # EOF".into());
    }
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').ok_or(format!("bad TYPE line {line:?}"))?;
            if !["counter", "gauge"].contains(&kind) {
                return Err(format!("unexpected metric type in {line:?}"));
            }
            types.insert(family.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        // OpenMetrics: a UNIT names a declared family and is the suffix of its name.
        if let Some(rest) = line.strip_prefix("# UNIT ") {
            let (family, unit) = rest.split_once(' ').ok_or(format!("bad UNIT line {line:?}"))?;
            if !types.contains_key(family) || !family.ends_with(&format!("_{unit}")) {
                return Err(format!("{line:?}: not a declared family ending in _{unit}"));
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or(format!("bad sample {line:?}"))?;
        value.parse::<f64>().map_err(|_| format!("value of {line:?} is not a number"))?;
        let name = name_labels.split('{').next().unwrap_or("");
        let family = types
            .keys()
            .find(|f| name == f.as_str() || name == format!("{f}_total"))
            .ok_or(format!("sample {name} has no # TYPE before it"))?;
        if types[family] == "counter" && !name.ends_with("_total") {
            return Err(format!("counter sample {name} must end in _total"));
        }
        if name_labels.contains('{') && !name_labels.ends_with('}') {
            return Err(format!("unterminated labels in {line:?}"));
        }
        samples += 1;
    }
    Ok(samples)
}

pub fn monitor_events(ctx: &Ctx) -> Result<String> {
    // Monitoring hardware: absent on QEMU, with the CPUID field that says so.
    let hw: serde_json::Value = serde_json::from_str(&hvctl(ctx, &["monitor", "hwinfo", "--json"])?)
        .map_err(|e| format!("hwinfo --json: {e}"))?;
    let reason = hw["reason"].as_str().unwrap_or("");
    if hw["present"] != false || !reason.contains("CPUID.7.EBX[12]=0") {
        return Err(format!("hwinfo should say monitoring is absent and why: {hw}"));
    }
    let kernel = ctx.guests.join("spinner.elf").display().to_string();
    let out = hvctl(ctx, &["domain", "create", "--kernel", &kernel, "--name", "mon", "--memory", "8M", "--json"])?;
    let id =
        serde_json::from_str::<serde_json::Value>(&out).map_err(|e| e.to_string())?["id"].as_u64().ok_or("no id")?;
    let ids = id.to_string();
    // Attaching needs hardware: a clear refusal, never a silent RMID 0.
    let (code, _, err) = hvctl_raw(ctx, &["monitor", "attach", &ids])?;
    if code != Some(4) || !err.contains("not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)") {
        return Err(format!("attach on a CPU without RDT: exit {code:?}, {err}"));
    }
    // Nothing is collected until enabled.
    let before = stats_of(ctx, id)?;
    if before.as_object().is_some_and(|o| !o.is_empty()) {
        return Err(format!("events reported before any was enabled: {before}"));
    }
    hvctl(ctx, &["monitor", "events", &ids, "--enable", "vm_exits,guest_runtime_ns,halts"])?;
    std::thread::sleep(Duration::from_millis(300));
    let first = stats_of(ctx, id)?;
    std::thread::sleep(Duration::from_millis(700));
    let second = stats_of(ctx, id)?;
    let total = |v: &serde_json::Value| -> u64 {
        v["vm_exits"].as_object().map(|o| o.values().filter_map(|n| n.as_u64()).sum()).unwrap_or(0)
    };
    let runtime = |v: &serde_json::Value| v["guest_runtime_ns"].as_u64().unwrap_or(0);
    if !(total(&second) > total(&first) && runtime(&second) > runtime(&first)) {
        return Err(format!("software events did not grow between two stats calls: {first} then {second}"));
    }
    hvctl(ctx, &["monitor", "events", &ids, "--disable", "vm_exits"])?;
    std::thread::sleep(Duration::from_millis(500));
    let third = stats_of(ctx, id)?;
    if !third["vm_exits"].is_null() || runtime(&third) <= runtime(&second) {
        return Err(format!("after --disable vm_exits must be gone and runtime still counted: {third}"));
    }
    let text = hvctl(ctx, &["monitor", "export", "--prometheus"])?;
    let samples = check_openmetrics(&text)?;
    if !text.contains(&format!("hv_guest_runtime_seconds_total{{domain=\"{id}\"}}")) {
        return Err(format!("the export lacks the domain's runtime:\n{text}"));
    }
    hvctl(ctx, &["domain", "destroy", &ids])?;
    Ok(format!(
        "hwinfo: {reason}; attach refused; vm_exits {} -> {}, runtime grew, disabled event gone; {samples} OpenMetrics samples",
        total(&first),
        total(&second)
    ))
}

/// `hvctl dirty heatmap` of a recorded 4-round stream of domain `id`: a PNG at `png`,
/// and an SVG beside it that carries the title, both axes and the legend.
pub fn check_heatmap(ctx: &Ctx, stream: &Path, png: &Path, id: u64) -> Result<()> {
    let stream = stream.display().to_string();
    let out = hvctl(ctx, &["dirty", "heatmap", "--stream", &stream, "--out", &png.display().to_string()])?;
    let header = std::fs::read(png).map_err(|e| format!("heatmap: {e}"))?;
    if !header.starts_with(b"\x89PNG\r\n\x1a\n") || !out.contains("4 rounds") {
        return Err(format!("the heatmap is not a PNG of 4 rounds: {out}"));
    }
    let svg = png.with_extension("svg");
    hvctl(ctx, &["dirty", "heatmap", "--stream", &stream, "--out", &svg.display().to_string()])?;
    let text = std::fs::read_to_string(&svg).map_err(|e| format!("heatmap: {e}"))?;
    let title = format!("domain {id}: dirty pages by guest-physical address, 4 rounds of ");
    for want in [title.as_str(), "guest-physical address", "round", "dirty pages", "100 %", " MiB"] {
        if !text.contains(want) {
            return Err(format!("the SVG heatmap lacks {want:?}: {}", svg.display()));
        }
    }
    Ok(())
}

fn dirty_hvctl(ctx: &Ctx) -> Result<String> {
    // A writer that rewrites pages 0x1000..0x1200 (16 MiB, 512 pages) forever.
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    let out = hvctl(
        ctx,
        &[
            "domain",
            "create",
            "--kernel",
            &kernel,
            "--name",
            "dw",
            "--memory",
            "24M",
            "--cmdline",
            "pages=512 rounds=1000000 every=8",
            "--json",
        ],
    )?;
    let id =
        serde_json::from_str::<serde_json::Value>(&out).map_err(|e| e.to_string())?["id"].as_u64().ok_or("no id")?;
    let ids = id.to_string();
    let (code, _, err) = hvctl_raw(ctx, &["dirty", "start", &ids, "--mode", "pml"])?;
    if code != Some(4) || !err.contains("not available: PML") {
        return Err(format!("PML on SVM must be refused with the reason: exit {code:?} {err}"));
    }
    let mut seen = Vec::new();
    for mode in ["wp", "dbit"] {
        hvctl(ctx, &["dirty", "start", &ids, "--mode", mode])?;
        std::thread::sleep(Duration::from_millis(300));
        hvctl(ctx, &["dirty", "clean", &ids])?;
        std::thread::sleep(Duration::from_millis(800));
        let v: serde_json::Value = serde_json::from_str(&hvctl(ctx, &["dirty", "clean", &ids, "--json"])?)
            .map_err(|e| format!("dirty clean --json: {e}"))?;
        let covers_region = v["runs"].as_array().is_some_and(|runs| {
            runs.iter().any(|r| r["pfn"].as_u64() == Some(0x1000) && r["pages"].as_u64().is_some_and(|n| n >= 512))
        });
        let dirty = v["dirty"].as_u64().unwrap_or(0);
        // The writer's 512 pages, plus at most a few of its stack/data pages.
        if !covers_region || dirty > 512 + 16 {
            return Err(format!("{mode}: expected the 512-page region (and little else) dirty: {v}"));
        }
        let stats: serde_json::Value = serde_json::from_str(&hvctl(ctx, &["dirty", "stats", &ids, "--json"])?)
            .map_err(|e| format!("dirty stats --json: {e}"))?;
        if stats["mode"] != mode || stats["rounds"].as_u64() != Some(2) {
            return Err(format!("{mode}: stats {stats}"));
        }
        seen.push(format!("{mode}: {dirty} dirty pages, {} logging exits", stats["logging_exits"]));
        hvctl(ctx, &["dirty", "stop", &ids])?;
    }
    // Partial range, a recorded stream and its heatmap.
    hvctl(ctx, &["dirty", "start", &ids, "--mode", "wp", "--range", "0x1000000:0x80000"])?;
    let dir = std::env::temp_dir().join(format!("hv-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (stream, png) = (dir.join("d.stream"), dir.join("heat.png"));
    hvctl(
        ctx,
        &["dirty", "stream", &ids, "--interval", "100", "--rounds", "4", "--out", &stream.display().to_string()],
    )?;
    check_heatmap(ctx, &stream, &png, id)?;
    let stats: serde_json::Value = serde_json::from_str(&hvctl(ctx, &["dirty", "stats", &ids, "--json"])?)
        .map_err(|e| format!("dirty stats --json: {e}"))?;
    // pages_dirtied is cumulative over rounds; what is dirty at once stays inside the range.
    let v: serde_json::Value = serde_json::from_str(&hvctl(ctx, &["dirty", "peek", &ids, "--json"])?)
        .map_err(|e| format!("dirty peek --json: {e}"))?;
    let inside = v["runs"].as_array().is_some_and(|runs| {
        runs.iter().all(|r| {
            let (pfn, n) = (r["pfn"].as_u64().unwrap_or(0), r["pages"].as_u64().unwrap_or(u64::MAX));
            pfn >= 0x1000 && pfn + n <= 0x1000 + 128
        })
    });
    if stats["range_pages"].as_u64() != Some(128) || stats["range_start_pfn"].as_u64() != Some(0x1000) || !inside {
        return Err(format!("a 128-page range must report pages inside it only: {stats} {v}"));
    }
    hvctl(ctx, &["dirty", "stop", &ids])?;
    // Coexistence: the main log over the whole domain and a tracking log over 64 of the
    // writer's pages; each sees every write in its range, cleaning one leaves the other.
    hvctl(ctx, &["dirty", "start", &ids, "--mode", "wp"])?;
    hvctl(ctx, &["dirty", "track", &ids, "--range", "0x1010000:0x40000"])?;
    std::thread::sleep(Duration::from_millis(800));
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        serde_json::from_str(&hvctl(ctx, args)?).map_err(|e| format!("{args:?}: {e}"))
    };
    let tracked = json(&["dirty", "track-peek", &ids, "--clean", "--json"])?;
    let main = json(&["dirty", "peek", &ids, "--json"])?;
    let runs_of = |v: &serde_json::Value| -> Vec<(u64, u64)> {
        v["runs"].as_array().map_or_else(Vec::new, |r| {
            r.iter().map(|r| (r["pfn"].as_u64().unwrap_or(0), r["pages"].as_u64().unwrap_or(0))).collect()
        })
    };
    if runs_of(&tracked) != [(0x1010, 64)] {
        return Err(format!("the tracking log must report exactly its 64 pages: {tracked}"));
    }
    if !runs_of(&main).iter().any(|(pfn, n)| *pfn <= 0x1000 && pfn + n >= 0x1200) {
        return Err(format!("cleaning the tracking log must not clean the main log: {main}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let again = json(&["dirty", "track-peek", &ids, "--json"])?;
    if runs_of(&again) != [(0x1010, 64)] {
        return Err(format!("after its clean the tracking log must see the new writes: {again}"));
    }
    hvctl(ctx, &["dirty", "track-stop", &ids])?;
    let still = json(&["dirty", "clean", &ids, "--json"])?;
    if !runs_of(&still).iter().any(|(pfn, n)| *pfn <= 0x1000 && pfn + n >= 0x1200) {
        return Err(format!("the main log must keep logging after the tracking log stops: {still}"));
    }
    hvctl(ctx, &["dirty", "stop", &ids])?;
    hvctl(ctx, &["domain", "destroy", &ids])?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "pml refused; {}; 128-page range; 4-round stream rendered; main + tracking logs coexist",
        seen.join("; ")
    ))
}

/// `name`.elf from the ESP padded to `len` bytes with pseudo-random bytes after the ELF
/// (outside every loaded segment, so the guest runs as before), written under
/// target/xtask; its path.
fn padded_kernel(ctx: &Ctx, name: &str, len: usize) -> Result<PathBuf> {
    let mut bytes = std::fs::read(ctx.guests.join(format!("{name}.elf"))).map_err(|e| format!("{name}.elf: {e}"))?;
    let elf_len = bytes.len();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while bytes.len() < len {
        // xorshift64: incompressible, so no layer can shortcut the transfer.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len.max(elf_len));
    let dir = tools::root().join("target/xtask");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{name}-padded-{}.elf", len >> 20));
    std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn upload_large_kernel(ctx: &Ctx) -> Result<String> {
    const LEN: usize = 14 << 20;
    let kernel = padded_kernel(ctx, "memwriter", LEN)?;
    let before = domain_list(ctx)?["free_frames"].as_u64().ok_or("no free_frames")?;
    let started = Instant::now();
    let out = hvctl(
        ctx,
        &[
            "domain",
            "create",
            "--kernel",
            &kernel.display().to_string(),
            "--name",
            "big",
            "--memory",
            "32M",
            "--cmdline",
            "pages=32 rounds=1 seed=5",
            "--json",
        ],
    )?;
    let took = started.elapsed();
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}: {out}"))?;
    let id = v["id"].as_u64().ok_or("create gave no id")?;
    if v["uploaded"] != true || v["kernel_bytes"] != LEN {
        return Err(format!("expected an upload of {LEN} bytes: {v}"));
    }
    wait_for("the 14 MiB kernel to finish", 60, || {
        Ok(domain_state(&domain_list(ctx)?, id).as_deref() == Some("finished(0)"))
    })?;
    let console = hvctl(ctx, &["domain", "console", &id.to_string()])?;
    if !console.contains("memwriter: done") {
        return Err(format!("console of the padded kernel lacks its last line: {console:?}"));
    }
    hvctl(ctx, &["domain", "destroy", &id.to_string()])?;
    let after = domain_list(ctx)?["free_frames"].as_u64().ok_or("no free_frames")?;
    if after != before {
        return Err(format!("free frames {before} before, {after} after: the staging frames leaked"));
    }
    let secs = took.as_secs_f64();
    Ok(format!(
        "{LEN} bytes uploaded and created in {secs:.2} s ({:.2} MB/s), ran to finished(0); free frames back to {after}",
        LEN as f64 / secs / 1e6
    ))
}

fn upload_corrupt_chunk(ctx: &Ctx) -> Result<String> {
    let kernel = padded_kernel(ctx, "memwriter", 2 << 20)?;
    let before = domain_list(ctx)?;
    let (code, _, err) = hvctl_raw(
        ctx,
        &[
            "domain",
            "create",
            "--kernel",
            &kernel.display().to_string(),
            "--name",
            "corrupt",
            "--debug-corrupt-chunk",
            "5",
        ],
    )?;
    let at = 5 * wire::MAX_IMAGE_CHUNK;
    if code != Some(4) || !err.contains(&format!("CRC-32C mismatch in the chunk at offset {at}")) {
        return Err(format!("a corrupted chunk was not refused with the CRC error: exit {code:?}, {err}"));
    }
    let after = domain_list(ctx)?;
    if after["free_frames"] != before["free_frames"] || after["domains"] != before["domains"] {
        return Err(format!(
            "the refused upload left something behind: free frames {} -> {}, domains {} -> {}",
            before["free_frames"], after["free_frames"], before["domains"], after["domains"]
        ));
    }
    // An upload left half-done by a client that goes away is freed with its connection.
    let free = |l: &serde_json::Value| l["free_frames"].as_u64();
    let mut client = RawClient::connect(&ctx.socket, wire::CONTROL_PORT)?;
    let begin = Request::ImageBegin { kind: wire::ImageKind::Kernel, total_len: 8 << 20, crc32c: 0 };
    match client.call(&begin)? {
        Response::Upload(_) => {}
        other => return Err(format!("image-begin: {other:?}")),
    }
    let staged = free(&domain_list(ctx)?);
    if staged.zip(free(&before)).is_none_or(|(now, was)| was.saturating_sub(now) < 2048) {
        return Err(format!("an 8 MiB upload staged no frames: {staged:?} free, {:?} before", free(&before)));
    }
    drop(client);
    wait_for("the abandoned upload to be freed", 10, || Ok(free(&domain_list(ctx)?) == free(&before)))?;
    Ok(format!(
        "refused: {}; an abandoned 8 MiB upload was freed with its connection",
        err.trim().trim_start_matches("hvctl: error: ")
    ))
}

fn interactive_console(ctx: &Ctx) -> Result<String> {
    let kernel = ctx.guests.join("echo.elf").display().to_string();
    let out = hvctl(ctx, &["domain", "create", "--kernel", &kernel, "--name", "echo", "--memory", "8M", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}"))?;
    let id = v["id"].as_u64().ok_or("create gave no id")?;
    wait_for("the echo guest to be ready", 20, || {
        Ok(hvctl(ctx, &["domain", "console", &id.to_string()])?.contains("echo: ready"))
    })?;
    let mut child = std::process::Command::new(&ctx.hvctl)
        .args(["--connect", &ctx.target, "domain", "console", &id.to_string(), "--interactive"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run hvctl: {e}"))?;
    // More than the UART's 16-byte FIFO in one go: the rest must be retried.
    let line = "the quick brown fox jumps over the lazy dog 0123456789";
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(format!("{line}\nquit\n").as_bytes())
        .map_err(|e| format!("writing hvctl's stdin: {e}"))?;
    let o = child.wait_with_output().map_err(|e| format!("hvctl: {e}"))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        return Err(format!("hvctl console --interactive exited with {}: {stderr}", o.status));
    }
    for want in [format!("echo: line 1: {line}"), "echo: line 2: quit".to_string()] {
        if !stdout.contains(&want) {
            return Err(format!("the console lacks {want:?}: {stdout:?} (stderr {stderr:?})"));
        }
    }
    wait_for("the echo guest to finish", 20, || {
        Ok(domain_state(&domain_list(ctx)?, id).as_deref() == Some("finished(0)"))
    })?;
    hvctl(ctx, &["domain", "destroy", &id.to_string()])?;
    Ok(format!("{} bytes typed through a 16-byte FIFO came back in order; quit ended it", line.len() + 6))
}
