//! `cargo xtask bench migration-linux`: our live migration of a running Linux guest
//! side by side with QEMU's own live migration of the same guest, in one run on the
//! same machine.
//!
//! 1. **Ours.** Two hypervisor instances on QEMU TCG (`-cpu EPYC` → `-cpu EPYC,-avx2`,
//!    vsock each), started by [`migration_tests::start_linux_pair`]: the source's
//!    boot-time domain is Debian's kernel in 256 MiB with `hv.test=workload` (a
//!    counter every 100 ms, a 64 MiB tmpfs file of known sha256). Once its console
//!    shows the shell and 20 ticks ([`migration_tests::workload_up`]), `hvctl migrate 1
//!    --json` with hvctl's defaults (downtime 300 ms, no bandwidth cap, 30 rounds at
//!    most, no throttle, no `--verify`, which would add a pass over memory on each side
//!    to the downtime). Only if that does not converge (the guest runs on at the
//!    source) is it tried once more with `--throttle`, and the table says so. The
//!    moved guest must pass [`migration_tests::workload_moved`]: the counter continues
//!    with no gap or repeat, the file's sha256 verifies, the shell answers, `poweroff`.
//! 2. **The peer.** Two `qemu-system-x86_64 -M microvm` processes with the same kernel,
//!    initramfs, command line and memory ([`linux_tests::bare_qemu_command`]), a QMP
//!    socket each; the destination waits with `-incoming unix:PATH`. At the same point
//!    of the workload (the shell and 20 ticks on the source's serial port) the source
//!    gets `migrate` with `uri=unix:PATH` and `query-migrate` is polled every 50 ms
//!    until `completed` (or `failed`: QEMU's `error-desc` is the error; or 600 s:
//!    `migrate_cancel`). QEMU's parameters are its defaults, read back with
//!    `query-migrate-parameters` and written to the report. The move is checked the same
//!    way: the source's serial output followed by the destination's holds every tick from
//!    0 on, in sequence, with an uptime that never goes back; the sha256 typed into the
//!    destination's console equals the host's; `echo $((6*7))` answers; `poweroff -f`
//!    ends the destination QEMU.
//!
//! Under QEMU TCG our guest runs nested (under our SVM, which TCG emulates) and its
//! stream goes through two emulated vsock devices and hvctl; QEMU's guest runs on TCG
//! directly and its stream is a local unix socket. The comparison is of the whole
//! systems as they run here, not of the two pre-copy algorithms alone (`cargo xtask
//! bench migration` compares those on equal simulated links).
//!
//! The table (downtime, bytes, duration, bytes/RAM, ours/QEMU) is printed and written
//! as JSON to target/xtask/runs/bench-migration-linux.json. Every wait has a timeout,
//! and every QEMU this bench starts is killed on every path ([`PeerQemu`]'s `Drop`, the
//! hypervisor sessions' own). It is not a correctness test (the system tests are).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::emulator::Platform;
use crate::image::{self, Esp};
use crate::linux::{self, LinuxAssets};
use crate::linux_bench::{load, median, runs_dir};
use crate::linux_tests;
use crate::migration_tests::{self, Ctx, consecutive, marker, ticks};
use crate::serial::clean;
use crate::{Result, tools};

/// The guest's memory on both sides.
const MEMORY_MIB: u32 = 256;
/// The ticks the source must have shown before either migration starts (what
/// [`migration_tests::workload_up`] waits for).
const START_TICKS: usize = 20;
/// Ticks the destination must show after the source's last one.
const AFTER_TICKS: u64 = 20;
/// Booting the peer's source to its shell.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's migration, `migrate` to `completed`.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
/// One QMP answer; the QMP socket to appear.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// The moved guest's counter, console answers and power-off on the peer's destination.
const AFTER_TIMEOUT: Duration = Duration::from_secs(180);
/// hvctl migrate's flags: its defaults first; `--throttle` only if those did not converge.
const OUR_ATTEMPTS: &[&[&str]] = &[&[], &["--throttle"]];
/// What the table says our settings are (hvctl migrate's defaults, see its `--help`).
const OUR_SETTINGS: &str = "hvctl migrate defaults: --downtime 300 ms, no --bandwidth cap, --max-rounds 30, no \
                            --throttle, no --verify";

/// One side's measured migration.
#[derive(Debug, Clone, PartialEq)]
struct Measured {
    /// As the side reports it (ours: source pause to the destination's confirmation;
    /// QEMU: `downtime` of `query-migrate`).
    downtime_ms: f64,
    /// Stream bytes (ours: `bytes_sent`; QEMU: `ram.transferred`).
    bytes: u64,
    /// Start to completion (ours: `duration_ms`; QEMU: `total-time`).
    duration_ms: f64,
    /// Dirty rounds (ours: `rounds`; QEMU: `ram.dirty-sync-count`, which counts its
    /// first sync at setup too).
    rounds: u64,
    /// The last tick the source showed when the migration started.
    start_tick: u64,
    /// The largest uptime step between two consecutive ticks, over all the ticks from 0
    /// to the checks on the destination: how far the guest's progress was held back, by
    /// its own clock, which both sides hold for most of the pause (so it is not the downtime).
    max_step_s: f64,
    /// Everything else, for the JSON report.
    detail: Value,
}

impl Measured {
    fn bytes_per_ram(&self) -> f64 {
        self.bytes as f64 / f64::from(MEMORY_MIB << 20)
    }

    /// The stream's average rate, MB/s (10^6 bytes).
    fn rate_mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.duration_ms / 1e3)
    }
}

/// `cargo xtask bench migration-linux [--runs N]`: `runs` migrations on each side,
/// interleaved (QEMU first: it fails fast if the peer cannot run; then ours, QEMU, …),
/// medians in the table.
pub fn bench(runs: usize) -> Result<()> {
    let assets = linux::ensure_linux_assets()?;
    tools::ensure(&Platform::Qemu { cpu: "EPYC".into() })?;
    let qemu_version = qemu_version()?;
    let esp = image::build(true)?;
    let sha = migration_tests::workload_sha256()?;
    let cmdline = linux_tests::guest_cmdline("workload");
    let load_start = load();
    println!(
        "bench migration-linux: Linux {} in {MEMORY_MIB} MiB, cmdline `{cmdline}`, migrated once {START_TICKS} ticks \
         showed; {qemu_version}; load {load_start}",
        assets.kernel_release
    );
    let (mut ours_runs, mut peer_runs) = (Vec::new(), Vec::new());
    let (mut ours_json, mut peer_json) = (Vec::new(), Vec::new());
    for i in 1..=runs.max(1) {
        run_side(
            i,
            "QEMU",
            "two -M microvm processes, QMP `migrate` to -incoming unix:",
            &mut peer_runs,
            &mut peer_json,
            || peer(&assets, &cmdline, &sha, i),
        );
        run_side(i, "ours", "two hypervisor instances, `hvctl migrate`", &mut ours_runs, &mut ours_json, || {
            ours(&esp, i)
        });
    }
    let load_end = load();
    let ours_m = medians(&ours_runs);
    let peer_m = medians(&peer_runs);
    let peer_settings = peer_runs.first().map(|m| peer_settings_text(&m.detail)).unwrap_or_else(|| "-".into());
    let throttled = ours_runs.iter().filter(|m| m.detail["flags"].as_array().is_some_and(|f| !f.is_empty())).count();
    print_table(ours_m.as_ref(), peer_m.as_ref(), ours_runs.len(), peer_runs.len(), &load_start, &load_end);
    println!(
        "  ours: {OUR_SETTINGS}{}",
        if throttled > 0 { format!("; {throttled} run(s) needed --throttle") } else { String::new() }
    );
    println!("  QEMU: {peer_settings}");
    println!(
        "  ours runs nested under TCG (the guest under our SVM, emulated by TCG; the stream through two emulated \
         vsock devices and hvctl); QEMU's guest runs on TCG directly, its stream over a local unix socket"
    );

    let ratio = |f: fn(&Measured) -> f64| match (&ours_m, &peer_m) {
        (Some(o), Some(p)) if f(p) > 0.0 => json!(f(o) / f(p)),
        _ => Value::Null,
    };
    let report = json!({
        "kernel": assets.kernel_release, "cmdline": cmdline, "memory_mib": MEMORY_MIB, "start_ticks": START_TICKS,
        "qemu": qemu_version, "load_start": load_start, "load_end": load_end,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "ours": {"settings": OUR_SETTINGS, "nested_under_tcg": true, "runs": ours_json, "median": ours_m.as_ref().map(to_json)},
        "qemu_peer": {"settings": peer_settings, "runs": peer_json, "median": peer_m.as_ref().map(to_json)},
        "ours_over_qemu": {
            "downtime": ratio(|m| m.downtime_ms), "bytes": ratio(|m| m.bytes as f64),
            "duration": ratio(|m| m.duration_ms), "bytes_per_ram": ratio(Measured::bytes_per_ram),
            "rate": ratio(Measured::rate_mb_s),
        },
    });
    let path = runs_dir().join("bench-migration-linux.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| format!("bench report: {e}"))?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("bench migration-linux: written to {}", path.display());
    match (ours_runs.is_empty(), peer_runs.is_empty()) {
        (false, false) => Ok(()),
        (true, _) => Err("no measurement of our migration (see the FAILED lines above)".into()),
        (_, true) => Err("no measurement of QEMU's migration (see the FAILED lines above)".into()),
    }
}

fn summary(m: &Measured) -> String {
    format!(
        "downtime {:.0} ms, {} bytes ({:.3}x RAM), duration {:.0} ms, {} rounds, started at tick {}, largest tick \
         step {:.2} s",
        m.downtime_ms,
        m.bytes,
        m.bytes_per_ram(),
        m.duration_ms,
        m.rounds,
        m.start_tick,
        m.max_step_s
    )
}

fn to_json(m: &Measured) -> Value {
    json!({
        "downtime_ms": m.downtime_ms, "bytes": m.bytes, "duration_ms": m.duration_ms,
        "bytes_per_ram": m.bytes_per_ram(), "rate_mb_s": m.rate_mb_s(), "rounds": m.rounds, "start_tick": m.start_tick,
        "max_tick_step_s": m.max_step_s, "detail": m.detail,
    })
}

/// The median of each measure over `runs` (each on its own: not one run's figures).
fn medians(runs: &[Measured]) -> Option<Measured> {
    let first = runs.first()?;
    let of = |f: fn(&Measured) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    Some(Measured {
        downtime_ms: of(|m| m.downtime_ms),
        bytes: of(|m| m.bytes as f64) as u64,
        duration_ms: of(|m| m.duration_ms),
        rounds: of(|m| m.rounds as f64) as u64,
        start_tick: of(|m| m.start_tick as f64) as u64,
        max_step_s: of(|m| m.max_step_s),
        detail: if runs.len() == 1 { first.detail.clone() } else { json!({"runs": runs.len()}) },
    })
}

/// `a / b` as `1.23x`, or `-`.
fn ratio_text(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() { format!("{:.2}x", a / b) } else { "-".into() }
}

fn print_table(ours: Option<&Measured>, peer: Option<&Measured>, n_ours: usize, n_peer: usize, l0: &str, l1: &str) {
    let cell = |m: Option<&Measured>, f: &dyn Fn(&Measured) -> String| m.map(f).unwrap_or_else(|| "-".into());
    let ratio = |f: fn(&Measured) -> f64| match (ours, peer) {
        (Some(o), Some(p)) => ratio_text(f(o), f(p)),
        _ => "-".into(),
    };
    println!(
        "\nbench migration-linux summary ({n_ours} run(s) ours, {n_peer} QEMU; medians; load {l0} at the start, {l1} \
         at the end)"
    );
    println!("| measure | ours (hvctl migrate, nested under TCG) | QEMU (-M microvm, migrate to unix:) | ours/QEMU |");
    println!("|---|---|---|---|");
    println!(
        "| downtime | {} | {} | {} |",
        cell(ours, &|m| format!("{:.0} ms", m.downtime_ms)),
        cell(peer, &|m| format!("{:.0} ms", m.downtime_ms)),
        ratio(|m| m.downtime_ms)
    );
    println!(
        "| total bytes | {} | {} | {} |",
        cell(ours, &|m| format!("{} ({:.1} MiB)", m.bytes, m.bytes as f64 / 1048576.0)),
        cell(peer, &|m| format!("{} ({:.1} MiB)", m.bytes, m.bytes as f64 / 1048576.0)),
        ratio(|m| m.bytes as f64)
    );
    println!(
        "| duration | {} | {} | {} |",
        cell(ours, &|m| format!("{:.0} ms", m.duration_ms)),
        cell(peer, &|m| format!("{:.0} ms", m.duration_ms)),
        ratio(|m| m.duration_ms)
    );
    println!(
        "| bytes/RAM ({MEMORY_MIB} MiB) | {} | {} | {} |",
        cell(ours, &|m| format!("{:.3}", m.bytes_per_ram())),
        cell(peer, &|m| format!("{:.3}", m.bytes_per_ram())),
        ratio(Measured::bytes_per_ram)
    );
    println!(
        "| average rate (bytes / duration) | {} | {} | {} |",
        cell(ours, &|m| format!("{:.1} MB/s", m.rate_mb_s())),
        cell(peer, &|m| format!("{:.1} MB/s", m.rate_mb_s())),
        ratio(Measured::rate_mb_s)
    );
    println!(
        "| dirty rounds (ours: `rounds`; QEMU: `dirty-sync-count`, its first sync at setup included) | {} | {} | |",
        cell(ours, &|m| m.rounds.to_string()),
        cell(peer, &|m| m.rounds.to_string())
    );
    println!(
        "| largest uptime step between two ticks, whole run (guest clock, which both sides hold for most of the pause) | {} | {} | {} |",
        cell(ours, &|m| format!("{:.2} s", m.max_step_s)),
        cell(peer, &|m| format!("{:.2} s", m.max_step_s)),
        ratio(|m| m.max_step_s)
    );
    println!(
        "| migration started after tick | {} | {} | |",
        cell(ours, &|m| m.start_tick.to_string()),
        cell(peer, &|m| m.start_tick.to_string())
    );
}

/// `qemu-system-x86_64 --version`'s first line; a clear error when QEMU is missing.
fn qemu_version() -> Result<String> {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("qemu-system-x86_64 (no version)").trim().to_string())
}

// ---- Ours ----

/// Run one side (`who`: "QEMU" or "ours") of run `i`, print its line and keep its
/// measurement (or its error) in `runs` and `json`.
fn run_side(
    i: usize,
    who: &str,
    what: &str,
    runs: &mut Vec<Measured>,
    json: &mut Vec<serde_json::Value>,
    measure: impl FnOnce() -> Result<Measured>,
) {
    let load_before = load();
    println!("  run {i} {who}: {what} (load {load_before}) ...");
    match measure() {
        Ok(m) => {
            println!("  run {i} {who}: {}; load {}", summary(&m), load());
            json.push(json!({"run": i, "ok": true, "load_before": load_before, "load_after": load(), "measured": to_json(&m)}));
            runs.push(m);
        }
        Err(e) => {
            println!("  run {i} {who}: FAILED: {e}");
            json.push(json!({"run": i, "ok": false, "load_before": load_before, "error": e}));
        }
    }
}

/// One migration of the workload guest between two hypervisor instances.
fn ours(esp: &Esp, i: usize) -> Result<Measured> {
    let Some(mut ctx) =
        migration_tests::start_linux_pair(esp, "bench-migration-linux (ours)", &format!("bench-miglinux-{i}"))?
    else {
        return Err("the hypervisor instances did not serve (their serial logs are printed above)".into());
    };
    let result = ours_on(&ctx);
    ctx.src.stop();
    ctx.dst.stop();
    result
}

fn ours_on(ctx: &Ctx) -> Result<Measured> {
    let mut refused = Vec::new();
    for flags in OUR_ATTEMPTS {
        let before = migration_tests::workload_up(ctx, 1)?;
        let (code, report, stderr) = migration_tests::migrate(ctx, 1, flags)?;
        if code == Some(0) && report["outcome"] == "completed" {
            let id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
            let after = migration_tests::workload_moved(ctx, id, &before)?;
            let num = |k: &str| report[k].as_f64().ok_or_else(|| format!("hvctl migrate --json has no {k}: {report}"));
            return Ok(Measured {
                downtime_ms: num("downtime_ms")?,
                bytes: num("bytes_sent")? as u64,
                duration_ms: num("duration_ms")?,
                rounds: num("rounds")? as u64,
                start_tick: before.last_tick,
                max_step_s: after.max_step,
                detail: json!({
                    "flags": flags, "not_converged_first": refused, "hvctl_report": report,
                    "ticks_on_destination": [after.first, after.last], "answered_at_uptime_s": after.uptime,
                }),
            });
        }
        let why = report["error"].as_str().map(str::to_string).unwrap_or_else(|| format!("{report}"));
        println!("    hvctl migrate 1 {} did not complete (exit {code:?}): {why}", flags.join(" "));
        let running = migration_tests::domains(ctx, &ctx.src)?.into_iter().any(|d| d.0 == 1 && d.2 == "running");
        if !running {
            return Err(format!("our migration failed and the guest no longer runs on the source: {why}; {stderr}"));
        }
        refused.push(json!({"flags": flags, "error": why}));
    }
    Err(format!("our migration did not complete with any of {OUR_ATTEMPTS:?}: {refused:?}"))
}

// ---- The peer: QEMU's own migration ----

/// One `qemu-system-x86_64 -M microvm` of the peer: its serial port on stdio (output
/// collected as it comes, input typed into its console), killed when dropped.
struct PeerQemu {
    what: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    stderr_path: PathBuf,
}

impl Drop for PeerQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PeerQemu {
    /// Start the guest (`incoming`: as a destination waiting on that unix socket) with
    /// a QMP server at `qmp`.
    fn spawn(
        assets: &LinuxAssets,
        cmdline: &str,
        dir: &Path,
        what: &'static str,
        qmp: &Path,
        incoming: Option<&Path>,
    ) -> Result<PeerQemu> {
        let _ = std::fs::remove_file(qmp);
        let stderr_path = dir.join(format!("{what}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        let mut command = linux_tests::bare_qemu_command(assets, cmdline, MEMORY_MIB);
        command.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(socket) = incoming {
            let _ = std::fs::remove_file(socket);
            command.arg("-incoming").arg(format!("unix:{}", socket.display()));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"))?;
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().ok_or("qemu has no stdout pipe")?;
        let out = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&out);
        // Raw bytes, not lines: a line the source began before its pause ends on the
        // destination, and the two outputs joined must read as one console.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(PeerQemu { what, child, stdin, out, stderr_path })
    }

    /// Its serial output so far.
    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its exit status, once it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default().trim().to_string()
    }

    /// The last `n` lines of its serial output (cleaned), for errors.
    fn tail(&self, n: usize) -> String {
        let text = clean(&self.output());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Type `line` and a newline into its console.
    fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("no stdin pipe")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("typing into the {} QEMU's console: {e}", self.what))
    }

    /// Keep its serial output beside its stderr.
    fn save(&self, dir: &Path) {
        let _ = std::fs::write(dir.join(format!("{}.serial", self.what)), self.output());
    }

    /// Wait until `done` holds for its output; an error with its tail and stderr when it
    /// exits first or `timeout` passes.
    fn wait(&mut self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&clean(&self.output())) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "the {} QEMU exited ({status}) while waiting for {what}; stderr: {}; serial ends:\n{}",
                    self.what,
                    self.stderr(),
                    self.tail(20)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {} s waiting for {what} on the {} QEMU; serial ends:\n{}",
                    timeout.as_secs(),
                    self.what,
                    self.tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A QMP connection (one JSON object per line each way).
struct Qmp {
    what: &'static str,
    stream: BufReader<UnixStream>,
}

impl Qmp {
    /// Connect to `qemu`'s QMP socket at `path` (waiting for it to appear), read the
    /// greeting and leave capabilities negotiation.
    fn connect(path: &Path, qemu: &mut PeerQemu) -> Result<Qmp> {
        let what = qemu.what;
        let deadline = Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(status) = qemu.exited() {
                        return Err(format!(
                            "the {what} QEMU exited ({status}) before its QMP socket came up: {}",
                            qemu.stderr()
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("cannot connect to the {what} QEMU's QMP socket {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(|e| format!("QMP socket: {e}"))?;
        stream.set_write_timeout(Some(QMP_TIMEOUT)).map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp { what, stream: BufReader::new(stream) };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("the {what} QEMU's QMP socket did not greet with QMP: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).map_err(|e| format!("reading the {} QEMU's QMP: {e}", self.what))?;
        if n == 0 {
            return Err(format!("the {} QEMU closed its QMP socket", self.what));
        }
        serde_json::from_str(&line).map_err(|e| format!("the {} QEMU's QMP sent no JSON ({e}): {line}", self.what))
    }

    /// Run `command`; its `return`, or its `error` (class and QEMU's text) as the error.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut message = json!({"execute": command});
        if let Some(a) = arguments {
            message["arguments"] = a;
        }
        self.stream
            .get_mut()
            .write_all(format!("{message}\n").as_bytes())
            .map_err(|e| format!("writing to the {} QEMU's QMP: {e}", self.what))?;
        loop {
            let answer = self.read()?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(r) = answer.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = answer.get("error") {
                return Err(format!(
                    "QMP {command} on the {} QEMU failed: {}: {}",
                    self.what,
                    e["class"].as_str().unwrap_or("?"),
                    e["desc"].as_str().unwrap_or("?")
                ));
            }
        }
    }
}

/// Where the peer's sockets, serial logs and stderr go.
fn peer_dir() -> PathBuf {
    runs_dir().join("bench-migration-linux-peer")
}

/// Boot the peer's source until its workload's shell is up, again while Linux cannot
/// calibrate its TSC against QEMU's PIT (it hangs after that; PLATFORMS.md); with the
/// number of boots retried.
fn boot_peer_source(assets: &LinuxAssets, cmdline: &str, dir: &Path, qmp: &Path) -> Result<(PeerQemu, usize)> {
    for attempt in 1..=linux_tests::CALIBRATION_ATTEMPTS {
        let mut src = PeerQemu::spawn(assets, cmdline, dir, "source", qmp, None)?;
        src.wait("the workload's shell (HV-SHELL-READY) or a failed TSC calibration", BOOT_TIMEOUT, |out| {
            out.contains("HV-SHELL-READY") || out.contains(linux_tests::TSC_UNCALIBRATED)
        })?;
        if !clean(&src.output()).contains(linux_tests::TSC_UNCALIBRATED) {
            return Ok((src, attempt - 1));
        }
        println!("    QEMU source: Linux could not calibrate its TSC against the PIT (load {}); booting again", load());
    }
    Err(format!(
        "in {} boots Linux never calibrated its TSC against QEMU's PIT (`{}`): the host is too busy",
        linux_tests::CALIBRATION_ATTEMPTS,
        linux_tests::TSC_UNCALIBRATED
    ))
}

/// QEMU's parameters that decide the comparison, as a sentence.
fn peer_settings_text(detail: &Value) -> String {
    let p = &detail["parameters"];
    let on: Vec<&str> = detail["capabilities"]
        .as_array()
        .map(|caps| caps.iter().filter(|c| c["state"] == true).filter_map(|c| c["capability"].as_str()).collect())
        .unwrap_or_default();
    format!(
        "QEMU's defaults: downtime-limit {} ms, max-bandwidth {} bytes/s ({:.0} MiB/s), x-checkpoint-delay {}, \
         capabilities on: {}",
        p["downtime-limit"],
        p["max-bandwidth"],
        p["max-bandwidth"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
        p["x-checkpoint-delay"],
        if on.is_empty() { "none".to_string() } else { on.join(", ") }
    )
}

/// One QEMU-to-QEMU migration of the workload guest, checked on the destination.
fn peer(assets: &LinuxAssets, cmdline: &str, sha: &str, i: usize) -> Result<Measured> {
    let dir = peer_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (src_qmp, dst_qmp, socket) = (dir.join("src.qmp"), dir.join("dst.qmp"), dir.join("migrate.sock"));
    let (mut src, retries) = boot_peer_source(assets, cmdline, &dir, &src_qmp)?;
    let result = peer_with(assets, cmdline, sha, &dir, &mut src, (&src_qmp, &dst_qmp, &socket));
    src.save(&dir);
    let mut m = result.map_err(|e| format!("{e} (run {i}; serial logs and stderr in {})", dir.display()))?;
    m.detail["boots_retried_after_failed_tsc_calibration"] = json!(retries);
    Ok(m)
}

fn peer_with(
    assets: &LinuxAssets,
    cmdline: &str,
    sha: &str,
    dir: &Path,
    src: &mut PeerQemu,
    (src_qmp, dst_qmp, socket): (&Path, &Path, &Path),
) -> Result<Measured> {
    let out = clean(&src.output());
    let sha_before = marker(&out, "HV-WL-SHA256 ").ok_or("no HV-WL-SHA256 line on the source")?.to_string();
    if sha_before != sha {
        return Err(format!("the guest's file has sha256 {sha_before} on the source, the host computes {sha}"));
    }
    let mut dst = PeerQemu::spawn(assets, cmdline, dir, "destination", dst_qmp, Some(socket))?;
    let result = peer_migrate(sha, src, &mut dst, (src_qmp, dst_qmp, socket));
    dst.save(dir);
    result
}

fn peer_migrate(
    sha: &str,
    src: &mut PeerQemu,
    dst: &mut PeerQemu,
    (src_qmp, dst_qmp, socket): (&Path, &Path, &Path),
) -> Result<Measured> {
    let mut sq = Qmp::connect(src_qmp, src)?;
    let mut dq = Qmp::connect(dst_qmp, dst)?;
    let parameters = sq.execute("query-migrate-parameters", None)?;
    let capabilities = sq.execute("query-migrate-capabilities", None)?;
    let deadline = Instant::now() + QMP_TIMEOUT;
    while !socket.exists() {
        if Instant::now() >= deadline {
            return Err(format!("the destination QEMU never listened on {}: {}", socket.display(), dst.stderr()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same point of the workload as ours: the shell and START_TICKS ticks.
    src.wait(&format!("{START_TICKS} ticks"), BOOT_TIMEOUT, |out| ticks(out).len() >= START_TICKS)?;
    let start_tick = ticks(&clean(&src.output())).last().map(|t| t.0).unwrap_or_default();
    let started = Instant::now();
    sq.execute("migrate", Some(json!({"uri": format!("unix:{}", socket.display())})))?;
    let info = loop {
        let info = sq.execute("query-migrate", None)?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            s @ ("failed" | "cancelled") => {
                return Err(format!(
                    "QEMU's migration {s}: {}; destination stderr: {}",
                    info["error-desc"].as_str().unwrap_or("(no error-desc)"),
                    dst.stderr()
                ));
            }
            _ => {}
        }
        if started.elapsed() >= MIGRATE_TIMEOUT {
            let _ = sq.execute("migrate_cancel", None);
            return Err(format!(
                "QEMU's migration did not complete in {} s (cancelled): last query-migrate {info}",
                MIGRATE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let num = |k: &str| info[k].as_f64().ok_or_else(|| format!("query-migrate has no {k}: {info}"));
    let ram = |k: &str| info["ram"][k].as_f64().ok_or_else(|| format!("query-migrate has no ram.{k}: {info}"));
    let (downtime_ms, duration_ms, bytes, syncs) =
        (num("downtime")?, num("total-time")?, ram("transferred")? as u64, ram("dirty-sync-count")? as u64);

    // The destination runs the guest, whose counter continues the source's.
    let deadline = Instant::now() + QMP_TIMEOUT;
    let status = loop {
        let status = dq.execute("query-status", None)?;
        if status["status"] == "running" || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status["status"] != "running" {
        return Err(format!("after the migration the destination QEMU is not running: {status}"));
    }
    let source_status = sq.execute("query-status", None)?;
    let src_out = src.output();
    let last_on_source = ticks(&clean(&src_out)).last().map(|t| t.0).ok_or("no tick on the source")?;
    dst.wait(
        &format!("the counter to reach {} on the destination", last_on_source + AFTER_TICKS),
        AFTER_TIMEOUT,
        |out| ticks(out).last().is_some_and(|t| t.0 >= last_on_source + AFTER_TICKS),
    )?;
    // The source's output and then the destination's: one console, a line the source
    // began finished by the destination.
    let joined = ticks(&clean(&(src_out + &dst.output())));
    if joined.first().map(|t| t.0) != Some(0) {
        return Err(format!("the console does not begin at tick 0: {:?}", joined.first()));
    }
    let max_step_s = consecutive(&joined, "QEMU's migration")?;
    dst.type_line("echo HV-WL-AFTER $(sha256sum < /tmp/data | cut -d' ' -f1)")?;
    dst.type_line("echo HV-ALIVE $((6*7)) $(cut -d' ' -f1 /proc/uptime)")?;
    dst.wait("the moved shell to answer (HV-ALIVE 42)", AFTER_TIMEOUT, |out| out.contains("HV-ALIVE 42 "))?;
    let text = clean(&dst.output());
    let sha_after = marker(&text, "HV-WL-AFTER ").unwrap_or_default().to_string();
    if sha_after != sha {
        return Err(format!("the tmpfs file's sha256 on the destination is {sha_after:?}, expected {sha}"));
    }
    let answered: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("HV-ALIVE 42 ")?.trim().parse().ok())
        .ok_or("no uptime in the HV-ALIVE line")?;
    dst.type_line("poweroff -f")?;
    let deadline = Instant::now() + AFTER_TIMEOUT;
    let exit = loop {
        if let Some(status) = dst.exited() {
            break status;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the moved guest did not power off the destination QEMU; serial ends:\n{}",
                dst.tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !exit.success() {
        return Err(format!("the destination QEMU exited with {exit} after poweroff: {}", dst.stderr()));
    }
    let dst_ticks = ticks(&text);
    Ok(Measured {
        downtime_ms,
        bytes,
        duration_ms,
        rounds: syncs,
        start_tick,
        max_step_s,
        detail: json!({
            "query_migrate": info, "parameters": parameters, "capabilities": capabilities,
            "setup_time_ms": info["setup-time"], "wall_ms_migrate_to_completed": wall_ms,
            "source_status_after": source_status["status"], "last_tick_on_source": last_on_source,
            "ticks_on_destination": [dst_ticks.first().map(|t| t.0), dst_ticks.last().map(|t| t.0)],
            "answered_at_uptime_s": answered,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(downtime_ms: f64, bytes: u64) -> Measured {
        Measured {
            downtime_ms,
            bytes,
            duration_ms: 2.0 * downtime_ms,
            rounds: 1,
            start_tick: 20,
            max_step_s: 0.1,
            detail: json!({"flags": []}),
        }
    }

    #[test]
    fn medians_are_per_measure() {
        let m = medians(&[run(30.0, 100), run(10.0, 300), run(20.0, 200)]).unwrap();
        assert_eq!((m.downtime_ms, m.bytes, m.duration_ms), (20.0, 200, 40.0));
        assert_eq!(m.detail, json!({"runs": 3}));
        assert!(medians(&[]).is_none());
    }

    #[test]
    fn bytes_per_ram_is_of_the_guests_memory() {
        assert_eq!(run(1.0, 128 << 20).bytes_per_ram(), 0.5);
    }

    #[test]
    fn the_rate_is_bytes_over_duration() {
        // 2e6 bytes in 2 * 10 ms.
        assert_eq!(run(10.0, 2_000_000).rate_mb_s(), 100.0);
    }

    #[test]
    fn ratios_say_when_there_is_none() {
        assert_eq!(ratio_text(300.0, 100.0), "3.00x");
        assert_eq!(ratio_text(1.0, 0.0), "-");
        assert_eq!(ratio_text(f64::NAN, 1.0), "-");
    }

    #[test]
    fn qemus_settings_read_as_a_sentence() {
        let detail = json!({
            "parameters": {"downtime-limit": 300, "max-bandwidth": 134217728, "x-checkpoint-delay": 20000},
            "capabilities": [{"capability": "xbzrle", "state": false}, {"capability": "events", "state": true}],
        });
        let text = peer_settings_text(&detail);
        assert!(text.contains("downtime-limit 300 ms"), "{text}");
        assert!(text.contains("(128 MiB/s)"), "{text}");
        assert!(text.contains("capabilities on: events"), "{text}");
    }
}
