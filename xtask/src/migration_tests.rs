//! System tests of live migration between two hypervisors: two QEMU instances, each
//! with its own vsock backend, and `hvctl migrate` relaying the stream between them.
//!
//! The destination runs on `-cpu EPYC,-avx2`, so a domain whose CPUID policy has AVX2
//! (the source's default, host-max) must be refused there before any page moves, and
//! the `memwriter` used for the other tests is created with `base=host-max,-avx2`.
//! The failure tests run first on that writer (corrupted record, cancel mid-round), so
//! the successful migration at the end is also the retry the issue asks for.
//!
//! The Linux guest (Debian's kernel, `hv.test=workload`) has its own pairs: one for
//! `migrate-linux-workload-between-instances`, one for the group
//! `migrate-linux-failures-and-save-restore` (the same refusals, corrupt record and
//! cancel, then `hvctl save` on the source and `hvctl restore` on the destination); and
//! `bochs-linux-local-migration-pml` moves it within one Bochs hypervisor (VMX, PML).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::emulator::{Platform, RunConfig, Session, TcgThreads};
use crate::image::Esp;
use crate::serial::clean;
use crate::systest::{NamedTest, build_hvctl, hvctl_output, run_each, select, stopped_serving, wait_for, wait_serving};
use crate::{Result, tools};

/// The writer's parameters: 64 pages at 3 MiB, a practically endless number of rounds.
pub(crate) const WRITER_SEED: u64 = 7;
pub(crate) const WRITER_PAGES: u64 = 64;
pub(crate) const WRITER_CMDLINE: &str = "pages=64 rounds=100000000 seed=7 base=0x300000";
/// The writer's CPUID policy: what the AVX2-less destination can run.
pub(crate) const WRITER_CPUID: &str = "base=host-max,-avx2";

pub(crate) struct Ctx {
    pub(crate) hvctl: PathBuf,
    pub(crate) guests: PathBuf,
    pub(crate) src: Session,
    pub(crate) dst: Session,
    /// The memwriter on the source, once created.
    writer: std::cell::Cell<Option<u64>>,
    /// When set, every hvctl of these tests talks to the hypervisors through their host
    /// agents (agent_tests.rs), never to them directly.
    pub(crate) remote: Option<Remote>,
}

/// The agents' URLs for the source and destination and the operator's certificate flags.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    pub(crate) src: String,
    pub(crate) dst: String,
    pub(crate) tls: Vec<String>,
}

const TESTS: &[NamedTest<Ctx>] = &[
    ("migrate-policy-refused-before-any-page", policy_refused),
    ("migrate-corrupt-record-refused-source-runs", corrupt_record),
    ("migrate-cancel-mid-round-source-runs", cancel_mid_round),
    ("migrate-memwriter-while-writing", live_memwriter),
    ("migrate-machine-state-apictimer-fpustate-mid-run", machine_state_mid_run),
    ("migrate-save-restore-file", save_restore),
    ("migrate-stress-8m-to-1g-until-full", stress),
];

/// The Linux migration test (about a minute: Linux boots under the hypervisor first);
/// `--no-linux` leaves it out with the other Linux tests.
const LINUX_TEST: &str = "migrate-linux-workload-between-instances";

/// The Linux guest's failure tests and its save and restore, in this order on one pair
/// of instances (booting Linux costs about a minute): `--filter` with a part of
/// [`LINUX_GROUP`] runs them all, with a part of a test's name that test (the tests
/// after a failure still run: each judges only its own step).
const LINUX_GROUP: &str = "migrate-linux-failures-and-save-restore";
const LINUX_GROUP_TESTS: &[NamedTest<Ctx>] = &[
    ("migrate-linux-policy-refused-source-ticks", linux_policy_refused),
    ("migrate-linux-corrupt-record-refused-source-ticks", linux_corrupt_record),
    ("migrate-linux-cancel-mid-round-source-ticks", linux_cancel_mid_round),
    ("migrate-linux-save-restore-other-instance", linux_save_restore),
];

/// Issue 16's SMP Linux migration: a 2-vCPU workload guest between two `-smp 2` instances.
const LINUX_SMP_TEST: &str = "migrate-linux-smp-two-vcpus-between-smp-instances";

/// The source's second Linux domain in [`LINUX_GROUP`]: the workload under the default
/// CPUID policy (host-max on EPYC, with AVX2), which the destination cannot run.
const LINUX_HOST_MAX: &str = "linux-host-max";

/// Boot a source and a destination and run the migration tests matching `filter`
/// (`linux`: the Linux guest's test too).
pub fn run(esp: &Esp, filter: Option<&str>, linux: bool) -> Result<(usize, usize)> {
    let (mut lp, mut lf) = (0, 0);
    if linux && filter.is_none_or(|f| LINUX_TEST.contains(f)) {
        (lp, lf) = run_linux(esp)?;
    }
    if linux && filter.is_none_or(|f| LINUX_SMP_TEST.contains(f)) {
        let (p, f) = run_linux_smp(esp)?;
        (lp, lf) = (lp + p, lf + f);
    }
    if linux && filter.is_none_or(|f| BOCHS_LOCAL_TEST.contains(f)) {
        (lp, lf) = match run_bochs_linux_local(esp)? {
            Ok(()) => (lp + 1, lf),
            Err(()) => (lp, lf + 1),
        };
    }
    if linux {
        let selected = if filter.is_some_and(|f| LINUX_GROUP.contains(f)) {
            select(LINUX_GROUP_TESTS, None)
        } else {
            select(LINUX_GROUP_TESTS, filter)
        };
        if !selected.is_empty() {
            let (p, f) = run_linux_group(esp, &selected)?;
            (lp, lf) = (lp + p, lf + f);
        }
    }
    let (p, f) = run_suite(esp, filter)?;
    Ok((p + lp, f + lf))
}

/// Issue 13's Linux live migration: Debian's kernel, 256 MiB, boots on the source with
/// `hv.test=workload` (a 64 MiB tmpfs file of known sha256, a counter every 100 ms
/// with the uptime, and a shell on ttyS0) and is migrated with `--verify` (the memory
/// digests must be equal) while the counter runs. On the destination the counter must
/// continue with no gap and no repeat, the uptime it prints must never go back, the
/// file's sha256 must verify, the shell must answer a command typed into its console
/// (UART, its interrupt and the LAPIC/I/O APIC that carry it, the scheduler's timers),
/// and `poweroff -f` must end it there (finished(0)).
fn run_linux(esp: &Esp) -> Result<(usize, usize)> {
    let ctx = start_linux_pair(esp, LINUX_TEST, "migrate-linux")?;
    Ok(judge_linux_pair(LINUX_TEST, ctx, linux_workload))
}

/// Run `body` on a Linux pair and say its verdict as `test`; the pair is stopped after.
fn judge_linux_pair(test: &str, ctx: Option<Ctx>, body: fn(&Ctx) -> Result<String>) -> (usize, usize) {
    let Some(mut ctx) = ctx else { return (0, 1) };
    let started = std::time::Instant::now();
    let ok = match body(&ctx) {
        Ok(detail) => {
            println!("systest {test} ... ok ({:.1} s; {detail})", started.elapsed().as_secs_f64());
            true
        }
        Err(e) => {
            println!("systest {test} ... FAILED\n  - {e}");
            print_log("source", &ctx.src);
            print_log("destination", &ctx.dst);
            false
        }
    };
    ctx.src.stop();
    ctx.dst.stop();
    if ok { (1, 0) } else { (0, 1) }
}

/// Boot a source (`-cpu EPYC`) whose boot-time domain 1 is Debian's kernel in 256 MiB
/// with `hv.test=workload`, and a destination (`-cpu EPYC,-avx2`), as `PREFIX-src` and
/// `PREFIX-dst`; `None` (said as a failure of `test`, logs printed) when one does not serve.
pub(crate) fn start_linux_pair(esp: &Esp, test: &str, prefix: &str) -> Result<Option<Ctx>> {
    start_linux_pair_with(esp, test, prefix, "")
}

/// [`start_linux_pair`] with `more` DOMAINS.CFG lines after domain 1's on the source.
fn start_linux_pair_with(esp: &Esp, test: &str, prefix: &str, more: &str) -> Result<Option<Ctx>> {
    start_linux_pair_smp(esp, test, prefix, more, 1, 1)
}

/// [`start_linux_pair_with`] on two instances of `cpus` CPUs each, domain 1 with `vcpus` vCPUs.
fn start_linux_pair_smp(esp: &Esp, test: &str, prefix: &str, more: &str, cpus: u32, vcpus: u32) -> Result<Option<Ctx>> {
    let assets = crate::linux::ensure_linux_assets()?;
    let src_platform = Platform::Qemu { cpu: "EPYC".into() };
    let dst_platform = Platform::Qemu { cpu: "EPYC,-avx2".into() };
    tools::ensure(&src_platform)?;
    let hvctl = build_hvctl()?;
    let timeout = Duration::from_secs(1200);
    let config = |name: String, domains: Option<String>| RunConfig {
        name,
        timeout,
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains,
    };
    let smp = if cpus > 1 { format!(", {cpus} CPUs each, a {vcpus}-vCPU guest") } else { String::new() };
    println!("systest {test} on {src_platform} -> {dst_platform} (Linux {}{smp}) ...", assets.kernel_release);
    let line = crate::linux_tests::domain_line_vcpus("linux", "256M", vcpus, "workload", Some(WRITER_CPUID), "") + more;
    let staged = crate::linux_tests::staged(&assets);
    let src_config = config(format!("{prefix}-src"), Some(line));
    let mut src = Session::spawn_cpus(&src_platform, esp, &src_config, &staged, cpus)?;
    let mut dst = Session::spawn_cpus(&dst_platform, esp, &config(format!("{prefix}-dst"), None), &[], cpus)?;
    let mut down = false;
    for (what, session) in [("source", &mut src), ("destination", &mut dst)] {
        if let Err(wait) = wait_serving(session, Duration::from_secs(300)) {
            println!("systest {test} ... FAILED: the {what}'s control channel did not come up ({wait})");
            print_log(what, session);
            down = true;
            break;
        }
    }
    if down {
        src.stop();
        dst.stop();
        return Ok(None);
    }
    let writer = std::cell::Cell::new(None);
    Ok(Some(Ctx { hvctl, guests: esp.dir.join("EFI").join("HV"), src, dst, writer, remote: None }))
}

/// The uptime in the `HV-LINUX-INIT uptime=…` line of `text`.
pub(crate) fn init_uptime(text: &str) -> Option<f64> {
    clean(text).lines().find_map(|l| l.split("HV-LINUX-INIT uptime=").nth(1)?.split_whitespace().next()?.parse().ok())
}

/// The `HV-TICK <n> <uptime>` lines of a console, in order. The kernel's own printk
/// can land on the same console line right after the uptime, before the tick's
/// newline (`HV-TICK 78 36.10[   36.845368] clocksource: …`, seen with a 1 GiB guest
/// around a migration): the uptime is the number the word starts with.
pub(crate) fn ticks(text: &str) -> Vec<(u64, f64)> {
    clean(text)
        .lines()
        .filter_map(|l| {
            let mut f = l.split("HV-TICK ").nth(1)?.split_whitespace();
            let n = f.next()?.parse().ok()?;
            let word = f.next()?;
            let end = word.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(word.len());
            Some((n, word[..end].parse().ok()?))
        })
        .collect()
}

/// The sha256 (hex) of 64 MiB of `y`, the workload's file, computed on the host.
pub(crate) fn workload_sha256() -> Result<String> {
    workload_sha256_of(64)
}

/// The sha256 (hex) of `mib` MiB of `y` (the workload's file with `hv.wl.mib=MIB`).
fn workload_sha256_of(mib: u64) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("head -c {} /dev/zero | tr '\\0' y | sha256sum", mib << 20)])
        .output()
        .map_err(|e| format!("cannot run sha256sum on the host: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    if !out.status.success() || hex.len() != 64 {
        return Err(format!("the host's sha256sum failed: {text} {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(hex.into())
}

/// The last `prefix <word>` word of a console.
pub(crate) fn marker<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().rev().find_map(|l| l.split(prefix).nth(1)?.split_whitespace().next())
}

/// A 2-vCPU Linux running the workload on a `-smp 2` source migrates, live, to a
/// `-smp 2` destination: everything [`workload_moved`] checks, and there `nproc` is 2
/// and two sha256sum runs at once keep both of its vCPUs busy (each one's user+system
/// time in /proc/stat grows by half a second at least).
fn run_linux_smp(esp: &Esp) -> Result<(usize, usize)> {
    let ctx = start_linux_pair_smp(esp, LINUX_SMP_TEST, "migrate-linux-smp", "", 2, 2)?;
    Ok(judge_linux_pair(LINUX_SMP_TEST, ctx, linux_smp_workload))
}

/// The user+system clock ticks of cpu0 and cpu1 (from /proc/stat), before and after
/// two sha256sums in parallel, and `nproc`, on one line.
const SMP_BUSY_TYPED: &str = "b0=$(awk '/^cpu[01] / { printf \"%d \", $2 + $3 + $4 }' /proc/stat); \
     sha256sum /tmp/data > /dev/null & sha256sum /tmp/data > /dev/null & wait; \
     echo HV-SMP-AFTER $(nproc) $b0 $(awk '/^cpu[01] / { printf \"%d \", $2 + $3 + $4 }' /proc/stat)\n";

/// Clock ticks (USER_HZ, 100 a second) each vCPU must have been busy for.
const SMP_BUSY_MIN_TICKS: i64 = 50;

fn linux_smp_workload(ctx: &Ctx) -> Result<String> {
    let before = workload_up(ctx, 1)?;
    let serial = clean(&ctx.src.serial());
    if !serial.contains("DOMAIN 1 VCPU 1 ON CPU") {
        return Err("vCPU 1 of the Linux guest never ran on the source (no `DOMAIN 1 VCPU 1 ON CPU` line)".into());
    }
    let (id, report) = migrate_running_linux(ctx)?;
    let (after, text) = workload_moved_typing(ctx, id, &before, SMP_BUSY_TYPED)?;
    let busy = smp_busy(&text)?;
    Ok(format!(
        "2 vCPUs on -smp 2 -> -smp 2, --verify --throttle ({} pages, downtime {} ms); ticks {}..{} consecutive; \
         on the destination nproc 2, two sha256sums kept cpu0 busy {} and cpu1 {} ticks; powered off there",
        report["pages_sent"], report["downtime_ms"], after.first, after.last, busy.0, busy.1
    ))
}

/// The `HV-SMP-AFTER` line of the moved guest's console: nproc must be 2 and each CPU
/// busy for [`SMP_BUSY_MIN_TICKS`] at least; (cpu0, cpu1) busy ticks.
fn smp_busy(text: &str) -> Result<(i64, i64)> {
    let line = text
        .lines()
        .filter_map(|l| l.split("HV-SMP-AFTER ").nth(1))
        .find(|rest| rest.split_whitespace().count() == 5)
        .ok_or_else(|| format!("no complete HV-SMP-AFTER line on the destination's console: {text}"))?;
    let n: Vec<i64> = line
        .split_whitespace()
        .map(|w| w.parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("HV-SMP-AFTER {line:?}: {e}"))?;
    if n[0] != 2 {
        return Err(format!("nproc is {} on the destination, not 2", n[0]));
    }
    let (cpu0, cpu1) = (n[3] - n[1], n[4] - n[2]);
    if cpu0 < SMP_BUSY_MIN_TICKS || cpu1 < SMP_BUSY_MIN_TICKS {
        return Err(format!(
            "two sha256sums on the destination kept cpu0 busy {cpu0} and cpu1 {cpu1} clock ticks \
             (each must reach {SMP_BUSY_MIN_TICKS}): a vCPU does not run after the move"
        ));
    }
    Ok((cpu0, cpu1))
}

/// Migrate the source's running Linux domain 1 with `--verify --throttle`: it must
/// complete with equal memory digests; the destination's domain ID and hvctl's report.
fn migrate_running_linux(ctx: &Ctx) -> Result<(u64, serde_json::Value)> {
    // --throttle: the ticking shell loop dirties ~300-700 pages/s, and on a loaded
    // 2-core host two TCG instances relay as little as ~300-500 pages/s; without
    // auto-converge the source then (rightly) gives up with "does not converge". With
    // it, it slows the guest down until the rest fits, as a user of a busy guest would.
    let (code, report, stderr) = migrate(ctx, 1, &["--verify", "--throttle"])?;
    if code != Some(0) || report["outcome"] != "completed" {
        return Err(format!("migrating the running Linux guest did not complete: exit {code:?}, {report}; {stderr}"));
    }
    if report["digests_match"] != true {
        return Err(format!("the memory digests of source and destination differ (or were not taken): {report}"));
    }
    let id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
    Ok((id, report))
}

fn linux_workload(ctx: &Ctx) -> Result<String> {
    linux_workload_report(ctx).map(|(summary, _)| summary)
}

/// The running workload guest (domain 1 of [`start_linux_pair`]'s source) migrates
/// and everything the Linux acceptance lists holds on the destination; the summary and
/// hvctl's report.
pub(crate) fn linux_workload_report(ctx: &Ctx) -> Result<(String, serde_json::Value)> {
    let before = workload_up(ctx, 1)?;
    let (id, report) = migrate_running_linux(ctx)?;
    let after = workload_moved(ctx, id, &before)?;
    let summary = format!(
        "migrated running, --verify --throttle ({} pages, {} bytes, downtime {} ms, throttle up to {} %); ticks \
         {}..{} consecutive across the source's last {}, largest uptime step {:.2} s; sha256 verified; kvm-clock \
         rewritten; it answered at uptime {:.2} s (init at {:.2} s) and powered off there",
        report["pages_sent"],
        report["bytes_sent"],
        report["downtime_ms"],
        report["max_throttle_percent"],
        after.first,
        after.last,
        before.last_tick,
        after.max_step,
        after.uptime,
        before.booted_at
    );
    Ok((summary, report))
}

/// What the workload guest showed on the source before it moved.
pub(crate) struct WorkloadBefore {
    /// The host's sha256 of the workload's file, which the guest printed too.
    pub(crate) sha: String,
    /// The guest's uptime at init.
    pub(crate) booted_at: f64,
    /// The last tick the source's console showed before the move.
    pub(crate) last_tick: u64,
}

/// What the moved workload guest showed on the destination.
pub(crate) struct WorkloadAfter {
    /// The first and last tick of the destination's console.
    pub(crate) first: u64,
    pub(crate) last: u64,
    /// The largest uptime step between two ticks.
    pub(crate) max_step: f64,
    /// The uptime when the shell answered.
    pub(crate) uptime: f64,
}

/// The workload guest `id` on the source ticks (20 ticks at least), its shell is up and
/// its file has the host's sha256.
pub(crate) fn workload_up(ctx: &Ctx, id: u64) -> Result<WorkloadBefore> {
    let console = |s: &Session, id: u64| hvctl_on(ctx, s, &["domain", "console", &id.to_string()]);
    let sha = workload_sha256()?;
    wait_for(&format!("the workload and shell of domain {id} to come up on the source"), 900, || {
        Ok(ticks(&console(&ctx.src, id)?).len() >= 20 && console(&ctx.src, id)?.contains("HV-SHELL-READY"))
    })?;
    let before = console(&ctx.src, id)?;
    let booted_at = init_uptime(&before).ok_or("no HV-LINUX-INIT line on the source")?;
    let sha_before = marker(&before, "HV-WL-SHA256 ").ok_or("no HV-WL-SHA256 line on the source")?.to_string();
    if sha_before != sha {
        return Err(format!("the guest's file has sha256 {sha_before} on the source, the host computes {sha}"));
    }
    let last_tick = ticks(&before).last().map(|t| t.0).unwrap_or_default();
    Ok(WorkloadBefore { sha, booted_at, last_tick })
}

/// Ticks `ticks` (of one console) are consecutive and their uptime never goes back;
/// the largest uptime step.
pub(crate) fn consecutive(ticks: &[(u64, f64)], around: &str) -> Result<f64> {
    let mut max_step = 0f64;
    for pair in ticks.windows(2) {
        let ((a, ua), (b, ub)) = (pair[0], pair[1]);
        if b != a + 1 {
            return Err(format!("the counter went from {a} to {b} (a gap or a repeat) around {around}"));
        }
        if ub < ua {
            return Err(format!("the guest's clock went back around {around}: tick {a} at {ua} s, tick {b} at {ub} s"));
        }
        max_step = max_step.max(ub - ua);
    }
    Ok(max_step)
}

/// The workload guest, moved to the destination as domain `id` (migrated, or saved and
/// restored): its counter continues from the source's last tick with no gap and no
/// repeat and a clock that never goes back, the file's sha256 typed into its console
/// verifies, a command typed there answers, and `poweroff -f` ends it as finished(0).
pub(crate) fn workload_moved(ctx: &Ctx, id: u64, before: &WorkloadBefore) -> Result<WorkloadAfter> {
    workload_moved_typing(ctx, id, before, "").map(|(after, _)| after)
}

/// [`workload_moved`], typing `extra` (shell lines) into the moved guest's console
/// first; what is checked there, and the console's text before it powered off.
fn workload_moved_typing(ctx: &Ctx, id: u64, before: &WorkloadBefore, extra: &str) -> Result<(WorkloadAfter, String)> {
    let console = |s: &Session, id: u64| hvctl_on(ctx, s, &["domain", "console", &id.to_string()]);
    let (expected_sha, booted_at, last_on_source) = (&before.sha, before.booted_at, before.last_tick);
    // Two seconds of ticks on the destination after the last one the source showed.
    wait_for("the counter to continue on the destination", 300, || {
        Ok(ticks(&console(&ctx.dst, id)?).last().is_some_and(|t| t.0 >= last_on_source + 20))
    })?;
    let after = ticks(&console(&ctx.dst, id)?);
    let first = after.first().map(|t| t.0).unwrap_or_default();
    if first > last_on_source {
        return Err(format!(
            "the destination's console starts at tick {first}, after the source's last tick {last_on_source}"
        ));
    }
    let max_step = consecutive(&after, "the move")?;
    let target = endpoint(ctx, &ctx.dst);
    let tls: Vec<&str> = ctx.remote.as_ref().map(|r| r.tls.iter().map(String::as_str).collect()).unwrap_or_default();
    let mut child = Command::new(&ctx.hvctl)
        .args(&tls)
        .args(["--connect", &target, "domain", "console", &id.to_string(), "--interactive"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run hvctl: {e}"))?;
    let sha_after;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        stdin
            .write_all(extra.as_bytes())
            .and_then(|()| stdin.write_all(b"echo HV-WL-AFTER $(sha256sum < /tmp/data | cut -d' ' -f1)\n"))
            .and_then(|()| stdin.write_all(b"echo HV-ALIVE $((6*7)) $(cut -d' ' -f1 /proc/uptime)\n"))
            .map_err(|e| format!("writing hvctl's stdin: {e}"))?;
        let alive = wait_for("the moved shell to answer on the destination", 300, || {
            Ok(console(&ctx.dst, id)?.contains("HV-ALIVE 42 "))
        });
        if let Err(e) = alive {
            let _ = child.kill();
            return Err(format!("{e}; console: {}", console(&ctx.dst, id).unwrap_or_default()));
        }
        let text = clean(&console(&ctx.dst, id)?);
        sha_after = marker(&text, "HV-WL-AFTER ").unwrap_or_default().to_string();
        stdin.write_all(b"poweroff -f\n").map_err(|e| format!("writing hvctl's stdin: {e}"))?;
    }
    wait_for("the moved Linux guest to power off on the destination", 300, || {
        Ok(domains(ctx, &ctx.dst)?.into_iter().any(|d| d.0 == id && d.2.starts_with("finished")))
    })?;
    let _ = child.kill();
    let _ = child.wait();
    if sha_after != *expected_sha {
        return Err(format!("the tmpfs file's sha256 on the destination is {sha_after:?}, expected {expected_sha}"));
    }
    let text = console(&ctx.dst, id)?;
    let uptime: f64 = clean(&text)
        .lines()
        .find_map(|l| l.strip_prefix("HV-ALIVE 42 ")?.trim().parse().ok())
        .ok_or_else(|| format!("no uptime in the HV-ALIVE line: {text}"))?;
    if uptime < booted_at {
        return Err(format!("the guest's uptime went back: {uptime} s on the destination, {booted_at} s at init"));
    }
    // Its kvm-clock structure was written again on the destination (at this host's TSC rate).
    let rewritten = format!("DOMAIN {id} KVMCLOCK vCPU 0 rewritten");
    if !clean(&ctx.dst.serial()).contains(&rewritten) {
        return Err(format!("the destination did not rewrite the guest's kvm-clock (no `{rewritten}` line)"));
    }
    let state = domains(ctx, &ctx.dst)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
    if state.as_deref() != Some("finished(0)") {
        return Err(format!("the moved Linux guest ended {state:?}"));
    }
    let last = after.last().map(|t| t.0).unwrap_or_default();
    Ok((WorkloadAfter { first, last, max_step, uptime }, clean(&text)))
}

/// Issue 13's failure tests and save/restore with the Linux guest, on one pair: the
/// source boots two workload guests, domain 1 (`base=host-max,-avx2`, what the
/// destination can run) and [`LINUX_HOST_MAX`] (the default policy, with AVX2).
fn run_linux_group(esp: &Esp, selected: &[&NamedTest<Ctx>]) -> Result<(usize, usize)> {
    let second = crate::linux_tests::domain_line(LINUX_HOST_MAX, "256M", "workload", None, " quiet");
    let Some(mut ctx) = start_linux_pair_with(esp, LINUX_GROUP, "migrate-linux-group", &second)? else {
        return Ok((0, selected.len()));
    };
    let (passed, failed) = run_each(selected, &ctx);
    Ok((passed, failed + finish_pair(&mut ctx, "migrate-linux-*", failed)))
}

/// The id of the domain named `name` on the source.
fn domain_named(ctx: &Ctx, name: &str) -> Result<u64> {
    domains(ctx, &ctx.src)?
        .into_iter()
        .find(|d| d.1 == name)
        .map(|d| d.0)
        .ok_or_else(|| format!("no domain {name} on the source"))
}

/// After a failed migration of workload guest `id` (its last tick before was
/// `before`): it is running on the source, its counter goes on (10 ticks more) and its
/// console, which still holds tick `before`, shows no gap, no repeat and a clock that
/// never went back; the destination holds no domain. The newest tick and the largest
/// uptime step.
fn source_ticks_on(ctx: &Ctx, id: u64, before: u64, what: &str) -> Result<(u64, f64)> {
    let console = || hvctl_on(ctx, &ctx.src, &["domain", "console", &id.to_string()]);
    wait_for(&format!("domain {id} to tick on the source after {what}"), 120, || {
        Ok(ticks(&console()?).last().is_some_and(|t| t.0 >= before + 10))
    })?;
    let seen = ticks(&console()?);
    if seen.first().is_none_or(|t| t.0 > before) {
        return Err(format!("the source's console no longer holds tick {before}, the last one before {what}"));
    }
    let max_step = consecutive(&seen, what)?;
    let state = domains(ctx, &ctx.src)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
    if state.as_deref() != Some("running") {
        return Err(format!("after {what} the source domain {id} is {state:?}, not running"));
    }
    no_domain_on_destination(ctx, what)?;
    Ok((seen.last().map_or(0, |t| t.0), max_step))
}

/// The last tick domain `id` shows on the source.
fn last_tick(ctx: &Ctx, id: u64) -> Result<u64> {
    Ok(ticks(&hvctl_on(ctx, &ctx.src, &["domain", "console", &id.to_string()])?).last().map_or(0, |t| t.0))
}

/// The workload guest under the default policy (AVX2) is refused by the AVX2-less
/// destination at the policy record, before any page, and ticks on at the source.
fn linux_policy_refused(ctx: &Ctx) -> Result<String> {
    let id = domain_named(ctx, LINUX_HOST_MAX)?;
    workload_up(ctx, id)?;
    let before = last_tick(ctx, id)?;
    let started = std::time::Instant::now();
    let (code, report, stderr) = migrate(ctx, id, &["--verify"])?;
    let took = started.elapsed();
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if code != Some(4) || report["outcome"] != "failed" || !error.contains("avx2") {
        return Err(format!("expected a refusal naming avx2 (exit 4), got exit {code:?}: {report}; {stderr}"));
    }
    if report["destination_pages_received"].as_u64() != Some(0) {
        return Err(format!("the destination took pages before refusing: {report}"));
    }
    let (last, step) = source_ticks_on(ctx, id, before, "the refusal")?;
    // It has done its part: its CPU time goes to domain 1 from here on.
    hvctl_on(ctx, &ctx.src, &["domain", "destroy", &id.to_string()])?;
    Ok(format!(
        "refused in {:.2} s after {} bytes, 0 pages at the destination: {}; ticks {before}..{last} consecutive on \
         the source, largest uptime step {step:.2} s",
        took.as_secs_f64(),
        report["bytes_sent"],
        error.chars().take(120).collect::<String>()
    ))
}

/// A record of domain 1's stream corrupted on the way: the destination refuses it
/// (checksum), discards its partial copy, and the guest ticks on at the source.
fn linux_corrupt_record(ctx: &Ctx) -> Result<String> {
    workload_up(ctx, 1)?;
    let before = last_tick(ctx, 1)?;
    let started = std::time::Instant::now();
    // Byte 150000 lies in the full copy's first page batches.
    let (code, report, stderr) = migrate(ctx, 1, &["--verify", "--fault-corrupt-byte", "150000"])?;
    let took = started.elapsed();
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if code != Some(4) || !error.to_lowercase().contains("checksum") {
        return Err(format!("expected a checksum refusal (exit 4), got exit {code:?}: {report}; {stderr}"));
    }
    let (last, step) = source_ticks_on(ctx, 1, before, "the corrupted record")?;
    Ok(format!(
        "refused in {:.2} s after {} bytes ({} pages received): {}; ticks {before}..{last} consecutive on the \
         source, largest uptime step {step:.2} s",
        took.as_secs_f64(),
        report["bytes_sent"],
        report["destination_pages_received"],
        error.chars().take(120).collect::<String>()
    ))
}

/// Domain 1's migration cancelled in its full copy (0.1 MB/s, cancelled after 3 s): the
/// destination discards its partial copy and the guest ticks on at the source.
fn linux_cancel_mid_round(ctx: &Ctx) -> Result<String> {
    let before = last_tick(ctx, 1)?;
    let (from, to) = (target(&ctx.src), target(&ctx.dst));
    let started = std::time::Instant::now();
    let relay = Command::new(&ctx.hvctl)
        .args(["migrate", "1", "--from", &from, "--to", &to, "--bandwidth", "0.1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run hvctl: {e}"))?;
    std::thread::sleep(Duration::from_secs(3));
    let cancel = hvctl_on(ctx, &ctx.src, &["migrate", "--cancel", "1", "--from", &from, "--json"])?;
    let out = relay.wait_with_output().map_err(|e| format!("hvctl migrate: {e}"))?;
    let took = started.elapsed();
    let report = json(&String::from_utf8_lossy(&out.stdout), "hvctl migrate --json")?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if out.status.code() != Some(4) || !error.contains("cancelled") {
        return Err(format!(
            "the relay did not end with the cancellation: exit {:?}, {report}; cancel said {cancel}; {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if report["rounds"].as_u64().unwrap_or(0) != 0 {
        return Err(format!("the cancel did not land in the full copy (round 0): {report}"));
    }
    let (last, step) = source_ticks_on(ctx, 1, before, "the cancel")?;
    Ok(format!(
        "cancelled in round {} after {} bytes, relay over in {:.2} s; ticks {before}..{last} consecutive on the \
         source, largest uptime step {step:.2} s",
        report["rounds"],
        report["bytes_sent"],
        took.as_secs_f64()
    ))
}

/// Domain 1 saved to a file on the source (`hvctl save`: the domain is destroyed there)
/// and restored on the destination (`hvctl restore`); there it passes every check of
/// the migration test: ticks from the saved point with no gap or repeat, the clock
/// never back, the file's sha256, a typed command answered, `poweroff` finished(0).
fn linux_save_restore(ctx: &Ctx) -> Result<String> {
    let before = workload_up(ctx, 1)?;
    let file = ctx.src.dir.join("linux.hvmig");
    let _ = std::fs::remove_file(&file);
    let file_arg = file.display().to_string();
    let started = std::time::Instant::now();
    let saved = json(&hvctl_on(ctx, &ctx.src, &["save", "1", &file_arg, "--json"])?, "save --json")?;
    let save_took = started.elapsed();
    // Ticks after the last one `workload_up` saw went into the file with the console ring.
    if domains(ctx, &ctx.src)?.iter().any(|d| d.0 == 1) {
        return Err("the saved domain still exists on the source".into());
    }
    let size = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
    let started = std::time::Instant::now();
    let restored = json(&hvctl_on(ctx, &ctx.dst, &["restore", &file_arg, "--json"])?, "restore --json")?;
    let restore_took = started.elapsed();
    let id = restored["domain"].as_u64().ok_or_else(|| format!("restore gave no domain id: {restored}"))?;
    let after = workload_moved(ctx, id, &before)?;
    let _ = std::fs::remove_file(&file);
    Ok(format!(
        "saved {size} bytes ({} pages, {} rounds) in {:.1} s (downtime {} ms), restored as domain {id} in {:.1} s; \
         ticks {}..{} consecutive across the source's last {}, largest uptime step {:.2} s; sha256 verified; it \
         answered at uptime {:.2} s and powered off there",
        saved["pages_sent"],
        saved["rounds"],
        save_took.as_secs_f64(),
        saved["downtime_ms"],
        restore_took.as_secs_f64(),
        after.first,
        after.last,
        before.last_tick,
        after.max_step,
        after.uptime
    ))
}

/// Issue 13's "on Bochs, it is migrated locally with PML": the workload guest on
/// Bochs (VMX, EPT, PML), migrated within the hypervisor by the boot option
/// `migrate-local=linux@console:HV-SHELL-READY` once its counter runs (8 to 10 min
/// measured on a loaded 2-core machine; in `cargo xtask test` unless `--no-linux`).
const BOCHS_LOCAL_TEST: &str = "bochs-linux-local-migration-pml";
/// Its guest: 128 MiB (two copies must fit in Bochs' 512 MiB), a 16 MiB file (Bochs
/// runs Linux at a few MIPS), the default policy (AVX-512 state migrates with it;
/// the hypervisor leaves out Bochs 2.7's faulty xsavec, see linux_tests'
/// BOCHS_XSAVEC_FAULT).
const BOCHS_LOCAL_MIB: u64 = 16;

/// The first `[domN] HV-TICK <n>` the serial log echoed (`last`: the last one).
fn echoed_tick(serial: &str, id: &str, last: bool) -> Option<u64> {
    let prefix = format!("[dom{id}] HV-TICK ");
    let mut it = clean(serial)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(prefix.as_str())?.split_whitespace().next()?.parse().ok())
        .collect::<Vec<u64>>()
        .into_iter();
    if last { it.next_back() } else { it.next() }
}

/// Boot Bochs with the workload guest and `migrate-local`, judge [`bochs_linux_local`];
/// `Err(())` when it failed (said, with the serial log).
fn run_bochs_linux_local(esp: &Esp) -> Result<std::result::Result<(), ()>> {
    let assets = crate::linux::ensure_linux_assets()?;
    let platform = Platform::Bochs { model: "corei7_skylake_x".into() };
    tools::ensure(&platform)?;
    let hvctl = build_hvctl()?;
    println!("systest {BOCHS_LOCAL_TEST} on {platform} (Linux {}, hv.test=workload) ...", assets.kernel_release);
    let extra = format!(" quiet hv.wl.mib={BOCHS_LOCAL_MIB}");
    let line = crate::linux_tests::domain_line("linux", "128M", "workload", None, &extra);
    let config = RunConfig {
        name: BOCHS_LOCAL_TEST.into(),
        timeout: Duration::from_secs(3600),
        cmdline: "migrate-local=linux@console:HV-SHELL-READY".into(),
        echo: false,
        vsock: true,
        domains: Some(line),
    };
    let started = std::time::Instant::now();
    let mut session = Session::spawn_staged(&platform, esp, &config, &crate::linux_tests::staged(&assets))?;
    let result = bochs_linux_local(&mut session, &hvctl);
    let ok = match result {
        Ok(detail) => {
            println!("systest {BOCHS_LOCAL_TEST} ... ok ({:.1} s; {detail})", started.elapsed().as_secs_f64());
            true
        }
        Err(e) => {
            println!("systest {BOCHS_LOCAL_TEST} ... FAILED after {:.1} s\n  - {e}", started.elapsed().as_secs_f64());
            print_log("Bochs run", &session);
            false
        }
    };
    session.stop();
    Ok(if ok { Ok(()) } else { Err(()) })
}

/// The local migration ran with PML dirty logging and equal digests; the moved
/// guest's console ring (read over COM2) holds ticks without gap or repeat from
/// before the move (the last the source echoed) to 20 past the first the destination
/// echoed; the file's sha256 typed into its console verifies; `poweroff -f` ends it
/// as finished(0).
fn bochs_linux_local(session: &mut Session, hvctl: &Path) -> Result<String> {
    let wait = session.wait_until(Duration::from_secs(3000), &mut crate::emulator::Echo::new(false), |l| {
        l.line("MIGRATE-LOCAL DONE").is_some() || l.line("MIGRATE-LOCAL FAILED").is_some() || l.outcome().is_some()
    });
    let serial = session.serial();
    let log = crate::serial::SerialLog::new(&serial);
    let done = log
        .line("MIGRATE-LOCAL DONE")
        .ok_or_else(|| format!("no MIGRATE-LOCAL DONE ({wait:?}); {:?}", log.line("MIGRATE-LOCAL FAILED")))?
        .to_string();
    let field = |k: &str| {
        done.split_whitespace().find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or("?")
    };
    let (from, to) = (field("from").to_string(), field("to").to_string());
    if field("digest") != field("destination_digest") || field("digest") == "0x0" {
        return Err(format!("memory at pause differs: {done}"));
    }
    if from == to {
        return Err(format!("the domain did not move: {done}"));
    }
    let text = log.text();
    let start_at = text.find("MIGRATE-LOCAL START").ok_or("no MIGRATE-LOCAL START")?;
    let pml = format!("DOMAIN {from} DIRTY-START mode=");
    let mode = text[start_at..]
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(pml.as_str())?.split_whitespace().next())
        .ok_or_else(|| format!("no `{pml}…` line after MIGRATE-LOCAL START"))?
        .to_string();
    if mode != "pml" {
        return Err(format!("the migration logged dirty pages with mode {mode}, not pml"));
    }
    let source_last =
        echoed_tick(&serial, &from, true).ok_or_else(|| format!("the source domain {from} echoed no HV-TICK line"))?;
    let dest_first = echoed_tick(&serial, &to, false);
    let socket = session.serial_socket.clone().ok_or("the Bochs run has no COM2 socket")?;
    let target = format!("unix:{}", socket.display());
    let console = || -> Result<String> {
        let (code, out, err) = hvctl_output(hvctl, &["--connect", &target, "domain", "console", &to])?;
        if code != Some(0) {
            return Err(format!("hvctl domain console {to} exited {code:?}: {err}"));
        }
        Ok(out)
    };
    wait_for("the moved guest to tick 20 past its first echoed tick", 600, || {
        let want = dest_first.unwrap_or(source_last) + 20;
        Ok(ticks(&console()?).last().is_some_and(|t| t.0 >= want))
    })?;
    let ring = ticks(&console()?);
    let first = ring.first().map_or(0, |t| t.0);
    if first > source_last {
        return Err(format!(
            "the moved guest's console ring starts at tick {first}, after the source's last echoed tick {source_last}"
        ));
    }
    let max_step = consecutive(&ring, "the local migration")?;
    let expected_sha = workload_sha256_of(BOCHS_LOCAL_MIB)?;
    let before = clean(&console()?);
    let sha_before = marker(&before, "HV-WL-SHA256 ");
    let mut child = Command::new(hvctl)
        .args(["--connect", &target, "domain", "console", &to, "--interactive"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run hvctl: {e}"))?;
    // COM2 serves one client at a time: what the guest answers is read from this
    // hvctl's own output, which it leaves by itself when the domain ends.
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    {
        use std::io::Write;
        stdin
            .write_all(b"echo HV-WL-AFTER $(sha256sum < /tmp/data | cut -d' ' -f1)\n")
            .and_then(|()| stdin.write_all(b"echo HV-ALIVE $((6*7)) $(cut -d' ' -f1 /proc/uptime)\n"))
            .and_then(|()| stdin.write_all(b"poweroff -f\n"))
            .map_err(|e| format!("writing hvctl's stdin: {e}"))?;
    }
    let exit = format!("DOMAIN {to} EXIT code=0");
    let off = wait_for("the moved guest to answer and power off", 900, || {
        Ok(session.serial().contains(&exit) || child.try_wait().ok().flatten().is_some())
    });
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    let answered = clean(&reader.join().unwrap_or_default());
    off?;
    if !session.serial().contains(&exit) {
        return Err(format!("the moved guest did not power off with code 0; hvctl printed: {answered}"));
    }
    let sha_after = marker(&answered, "HV-WL-AFTER ").unwrap_or_default().to_string();
    if sha_after != expected_sha || sha_before != Some(expected_sha.as_str()) {
        return Err(format!(
            "sha256 of the file: {sha_before:?} before, {sha_after:?} after the move; the host computes {expected_sha}"
        ));
    }
    let uptime: f64 = answered
        .lines()
        .find_map(|l| l.split("HV-ALIVE 42 ").nth(1)?.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no HV-ALIVE answer in hvctl's output: {answered}"))?;
    Ok(format!(
        "domain {from} -> {to} with dirty logging mode=pml, {} dirty rounds, {} pages ({} resent), {} bytes, \
         downtime {} ms (Bochs' emulated time), digests equal; ticks {first}..{} consecutive across the source's \
         last echoed {source_last}, largest uptime step {max_step:.2} s; sha256 of {BOCHS_LOCAL_MIB} MiB verified; \
         it answered at uptime {uptime:.2} s and powered off",
        field("rounds"),
        field("pages"),
        field("resent"),
        field("bytes"),
        field("downtime_ms"),
        ring.last().map_or(0, |t| t.0)
    ))
}

/// Boot a source and a destination and run the migration tests of [`TESTS`] matching `filter`.
fn run_suite(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected = select(TESTS, filter);
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let Some(mut ctx) = start_pair(esp, "migrate")? else { return Ok((0, selected.len())) };
    let (passed, failed) = run_each(&selected, &ctx);
    Ok((passed, failed + finish_pair(&mut ctx, "migrate-*", failed)))
}

/// Boot the source (`-cpu EPYC`) and the destination (`-cpu EPYC,-avx2`), named
/// `PREFIX-src` and `PREFIX-dst`; `None` (said and logged) when one does not serve.
pub(crate) fn start_pair(esp: &Esp, prefix: &str) -> Result<Option<Ctx>> {
    start_pair_cpus(esp, prefix, 1)
}

/// [`start_pair`] on machines of `cpus` physical CPUs each (QEMU `-smp N`, multi-threaded TCG).
pub(crate) fn start_pair_cpus(esp: &Esp, prefix: &str, cpus: u32) -> Result<Option<Ctx>> {
    start_pair_threads(esp, prefix, cpus, TcgThreads::OnePerCpu)
}

/// [`start_pair_cpus`] with QEMU's TCG `threads` chosen.
pub(crate) fn start_pair_threads(esp: &Esp, prefix: &str, cpus: u32, threads: TcgThreads) -> Result<Option<Ctx>> {
    let src_platform = Platform::Qemu { cpu: "EPYC".into() };
    let dst_platform = Platform::Qemu { cpu: "EPYC,-avx2".into() };
    tools::ensure(&src_platform)?;
    let hvctl = build_hvctl()?;
    let timeout = Duration::from_secs(src_platform.default_timeout_secs());
    let config =
        |name: String| RunConfig { name, timeout, cmdline: String::new(), echo: false, vsock: true, domains: None };
    let threading = match threads {
        TcgThreads::OnePerCpu if cpus > 1 => ", one host thread per CPU",
        TcgThreads::OnePerCpu => "",
        TcgThreads::One => ", all CPUs on one host thread",
    };
    println!(
        "systest {prefix}-* on {src_platform} -> {dst_platform}, two instances of {cpus} CPU(s){threading} with virtio-vsock ..."
    );
    let mut src = Session::spawn_threads(&src_platform, esp, &config(format!("{prefix}-src")), &[], cpus, threads)?;
    let mut dst = Session::spawn_threads(&dst_platform, esp, &config(format!("{prefix}-dst")), &[], cpus, threads)?;
    for (what, session) in [("source", &mut src), ("destination", &mut dst)] {
        if let Err(wait) = wait_serving(session, timeout) {
            println!("systest {prefix}-* ... FAILED: the {what}'s control channel did not come up ({wait})");
            print_log(what, session);
            return Ok(None);
        }
    }
    let writer = std::cell::Cell::new(None);
    Ok(Some(Ctx { hvctl, guests: esp.dir.join("EFI").join("HV"), src, dst, writer, remote: None }))
}

/// After the tests: both must still serve (a failure each if not); the logs when
/// anything failed; stop both. The failures it adds.
pub(crate) fn finish_pair(ctx: &mut Ctx, what: &str, failed: usize) -> usize {
    let mut more = stopped_serving(what, "source", &ctx.src);
    more += stopped_serving(what, "destination", &ctx.dst);
    if failed + more > 0 {
        print_log("source", &ctx.src);
        print_log("destination", &ctx.dst);
    }
    ctx.src.stop();
    ctx.dst.stop();
    more
}

pub(crate) fn print_log(what: &str, session: &Session) {
    println!(
        "---- serial log of the {what} ({}) ----\n{}\n---- end of serial log ----",
        session.dir.display(),
        clean(&session.serial())
    );
}

pub(crate) fn target(session: &Session) -> String {
    let socket = session.vsock_socket.as_deref().unwrap_or(Path::new("/nonexistent"));
    format!("unix:{}:{}", socket.display(), wire::CONTROL_PORT)
}

/// Where hvctl reaches `session`: directly, or through its agent.
fn endpoint(ctx: &Ctx, session: &Session) -> String {
    match &ctx.remote {
        Some(r) if std::ptr::eq(session, &ctx.src) => r.src.clone(),
        Some(r) => r.dst.clone(),
        None => target(session),
    }
}

/// Run hvctl (with the operator's certificate when through agents); (exit code,
/// stdout, stderr).
pub(crate) fn hvctl_raw(ctx: &Ctx, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let mut all: Vec<&str> =
        ctx.remote.as_ref().map(|r| r.tls.iter().map(String::as_str).collect()).unwrap_or_default();
    all.extend_from_slice(args);
    hvctl_output(&ctx.hvctl, &all)
}

/// Run hvctl against `session`, requiring success; its stdout.
pub(crate) fn hvctl_on(ctx: &Ctx, session: &Session, args: &[&str]) -> Result<String> {
    let t = endpoint(ctx, session);
    let mut all = vec!["--connect", t.as_str()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = hvctl_raw(ctx, &all)?;
    if code != Some(0) {
        return Err(format!("hvctl {} exited with {code:?}: {}", args.join(" "), stderr.trim()));
    }
    Ok(stdout)
}

pub(crate) fn json(text: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| format!("{what}: not JSON ({e}): {text}"))
}

/// The domains on `session` as (id, name, state).
pub(crate) fn domains(ctx: &Ctx, session: &Session) -> Result<Vec<(u64, String, String)>> {
    let list = json(&hvctl_on(ctx, session, &["domain", "list", "--json"])?, "domain list")?;
    Ok(list["domains"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    (
                        d["id"].as_u64().unwrap_or(0),
                        d["name"].as_str().unwrap_or("").to_string(),
                        d["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

fn create(ctx: &Ctx, kernel: &str, name: &str, cpuid: Option<&str>, cmdline: &str) -> Result<u64> {
    let kernel = ctx.guests.join(format!("{kernel}.elf")).display().to_string();
    let mut args = vec!["domain", "create", "--kernel", &kernel, "--name", name, "--memory", "8M", "--json"];
    if let Some(c) = cpuid {
        args.extend(["--cpuid", c]);
    }
    if !cmdline.is_empty() {
        args.extend(["--cmdline", cmdline]);
    }
    let out = json(&hvctl_on(ctx, &ctx.src, &args)?, "domain create")?;
    out["id"].as_u64().ok_or_else(|| format!("domain create gave no id: {out}"))
}

/// The values domain `id` reported on `session`'s serial log, in order: (tag, value).
pub(crate) fn reports(session: &Session, id: u64) -> Vec<(String, u64)> {
    let prefix = format!("DOMAIN {id} REPORT ");
    let serial = session.serial();
    // Only whole lines: the guest may be writing the last one right now.
    let complete = serial.rfind('\n').map_or("", |end| &serial[..end]);
    clean(complete)
        .lines()
        .filter_map(|line| {
            let (tag, value) = line.trim().strip_prefix(&prefix)?.split_once('=')?;
            Some((tag.to_string(), u64::from_str_radix(value.trim_start_matches("0x"), 16).ok()?))
        })
        .collect()
}

/// (round, checksum) pairs from a writer's reports. A migration can fall between the
/// two reports of a round, so the caller joins the source's and the destination's
/// reports before pairing them.
pub(crate) fn pairs(reports: &[(String, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut round = None;
    for (tag, value) in reports {
        match tag.as_str() {
            "round" => round = Some(*value),
            "checksum" => {
                if let Some(r) = round.take() {
                    out.push((r, *value));
                }
            }
            _ => {}
        }
    }
    out
}

/// The (round, checksum) pairs domain `id` completed on `session` alone.
pub(crate) fn rounds(session: &Session, id: u64) -> Vec<(u64, u64)> {
    pairs(&reports(session, id))
}

/// The source writer still runs: it reports new rounds after `since`.
fn writer_keeps_running(ctx: &Ctx, id: u64, what: &str) -> Result<u64> {
    let before = rounds(&ctx.src, id).last().map_or(0, |r| r.0);
    wait_for(&format!("the source writer to report rounds after {what}"), 30, || {
        Ok(rounds(&ctx.src, id).last().is_some_and(|r| r.0 >= before + 2))
    })?;
    let state = domains(ctx, &ctx.src)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
    if state.as_deref() != Some("running") {
        return Err(format!("after {what} the source domain is {state:?}, not running"));
    }
    Ok(before)
}

fn no_domain_on_destination(ctx: &Ctx, what: &str) -> Result<()> {
    let left = domains(ctx, &ctx.dst)?;
    if !left.is_empty() {
        return Err(format!("after {what} the destination still has domains: {left:?}"));
    }
    Ok(())
}

/// The writer on the source, created (and seen writing) the first time it is needed.
pub(crate) fn writer(ctx: &Ctx) -> Result<u64> {
    if let Some(id) = ctx.writer.get() {
        return Ok(id);
    }
    let id = create(ctx, "memwriter", "mw", Some(WRITER_CPUID), WRITER_CMDLINE)?;
    wait_for("the writer's first rounds", 30, || Ok(rounds(&ctx.src, id).len() >= 2))?;
    ctx.writer.set(Some(id));
    Ok(id)
}

/// `hvctl migrate ID --from SRC --to DST --json EXTRA…`: (exit code, its JSON report, stderr).
pub(crate) fn migrate(ctx: &Ctx, id: u64, extra: &[&str]) -> Result<(Option<i32>, serde_json::Value, String)> {
    let (from, to) = (endpoint(ctx, &ctx.src), endpoint(ctx, &ctx.dst));
    let id = id.to_string();
    let mut args = vec!["migrate", id.as_str(), "--from", from.as_str(), "--to", to.as_str(), "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = hvctl_raw(ctx, &args)?;
    let report = json(&stdout, "hvctl migrate --json").map_err(|e| format!("{e}; stderr: {stderr}"))?;
    Ok((code, report, stderr))
}

fn policy_refused(ctx: &Ctx) -> Result<String> {
    // The default policy (host-max on EPYC) has AVX2; the destination's host does not.
    let id = create(ctx, "spinner", "needs-avx2", None, "")?;
    let dst_serial_before = clean(&ctx.dst.serial()).len();
    let (code, report, stderr) = migrate(ctx, id, &[])?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if code != Some(4) || report["outcome"] != "failed" || !error.contains("avx2") {
        return Err(format!("expected a refusal naming avx2 (exit 4), got exit {code:?}: {report}; {stderr}"));
    }
    if report["destination_pages_received"].as_u64() != Some(0) {
        return Err(format!("the destination took pages before refusing: {report}"));
    }
    let dst_log = clean(&ctx.dst.serial());
    if dst_log.get(dst_serial_before..).is_some_and(|l| l.contains("REPORT")) {
        return Err("the refused domain ran on the destination".into());
    }
    no_domain_on_destination(ctx, "the refusal")?;
    let state = domains(ctx, &ctx.src)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
    if state.as_deref() != Some("running") {
        return Err(format!("after the refusal the source domain is {state:?}"));
    }
    hvctl_on(ctx, &ctx.src, &["domain", "destroy", &id.to_string()])?;
    Ok(format!("refused with: {}", error.chars().take(140).collect::<String>()))
}

fn corrupt_record(ctx: &Ctx) -> Result<String> {
    let id = writer(ctx)?;
    // Byte 150000 lies in the full copy's page data (the writer alone has 256 KiB).
    let (code, report, stderr) = migrate(ctx, id, &["--fault-corrupt-byte", "150000"])?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if code != Some(4) || !error.to_lowercase().contains("checksum") {
        return Err(format!("expected a checksum refusal (exit 4), got exit {code:?}: {report}; {stderr}"));
    }
    writer_keeps_running(ctx, id, "the corrupted record")?;
    no_domain_on_destination(ctx, "the corrupted record")?;
    Ok(format!("destination: {}", error.chars().take(120).collect::<String>()))
}

fn cancel_mid_round(ctx: &Ctx) -> Result<String> {
    let id = writer(ctx)?;
    let (from, to) = (target(&ctx.src), target(&ctx.dst));
    // 0.1 MB/s: the full copy alone takes seconds, so the cancel lands mid-stream.
    let relay = Command::new(&ctx.hvctl)
        .args(["migrate", &id.to_string(), "--from", &from, "--to", &to, "--bandwidth", "0.1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run hvctl: {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let cancel = hvctl_on(ctx, &ctx.src, &["migrate", "--cancel", &id.to_string(), "--from", &from, "--json"])?;
    let out = relay.wait_with_output().map_err(|e| format!("hvctl migrate: {e}"))?;
    let report = json(&String::from_utf8_lossy(&out.stdout), "hvctl migrate --json")?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if out.status.code() != Some(4) || !error.contains("cancelled") {
        return Err(format!(
            "the relay did not end with the cancellation: exit {:?}, {report}; cancel said {cancel}; {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let sent = report["bytes_sent"].as_u64().unwrap_or(0);
    writer_keeps_running(ctx, id, "the cancel")?;
    no_domain_on_destination(ctx, "the cancel")?;
    Ok(format!("cancelled after {sent} bytes; the writer kept running"))
}

/// The apictimer's parameters: 2500 periodic LAPIC timer interrupts of 1 ms.
const TIMER_TICKS: u64 = 2500;
const TIMER_PERIOD_US: u64 = 1000;
/// The fpustate guest's rounds: each fills the vector registers, yields, spins and
/// reads them back; enough that a migration falls in the middle.
const FPU_ROUNDS: u64 = 4000;

/// Issue 13 item 3: the whole guest moves. An `apictimer` (x2APIC mode, periodic LAPIC
/// timer, `sti; hlt` between interrupts) and an `fpustate` (YMM registers and XCR0 held
/// across yields) are migrated while they run. Without the LAPIC's state the timer
/// guest would sleep forever on the destination; without the FPU area and XCR0 the
/// other would read back reset registers (or fault on its first AVX instruction).
/// Both must finish with code 0 on the destination, the timer guest with all its
/// ticks and a TSC delta (read before and after the move) that neither went backwards
/// nor jumped, and their console rings must hold what they printed on the source.
fn machine_state_mid_run(ctx: &Ctx) -> Result<String> {
    let started = std::time::Instant::now();
    let timer_cmdline = format!("ticks={TIMER_TICKS} period_us={TIMER_PERIOD_US}");
    let timer = create(ctx, "apictimer", "timer-mid", Some(WRITER_CPUID), &timer_cmdline)?;
    let fpu = create(ctx, "fpustate", "fpu-mid", Some(WRITER_CPUID), &format!("seed=5 rounds={FPU_ROUNDS}"))?;
    // Both print their first line before the work starts: then they are mid-run.
    wait_for("both guests to print their first console line on the source", 60, || {
        let t = hvctl_on(ctx, &ctx.src, &["domain", "console", &timer.to_string()])?;
        let f = hvctl_on(ctx, &ctx.src, &["domain", "console", &fpu.to_string()])?;
        Ok(t.contains("apictimer: x2APIC id") && f.contains("fpustate: seed 5"))
    })?;
    std::thread::sleep(Duration::from_millis(700));
    let mut moved = Vec::new();
    for (id, what) in [(timer, "apictimer"), (fpu, "fpustate")] {
        let state = domains(ctx, &ctx.src)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
        if state.as_deref() != Some("running") {
            return Err(format!("the {what} guest is {state:?} before its migration: it must move mid-run"));
        }
        let (code, report, stderr) = migrate(ctx, id, &["--verify"])?;
        if code != Some(0) || report["outcome"] != "completed" {
            return Err(format!("migrating the {what} guest did not complete: exit {code:?}, {report}; {stderr}"));
        }
        let new_id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
        moved.push((new_id, what, report["downtime_ms"].as_u64().unwrap_or(0)));
    }
    let finished = |id: u64| -> Result<Option<String>> {
        let state = domains(ctx, &ctx.dst)?.into_iter().find(|d| d.0 == id).map(|d| d.2);
        Ok(state.filter(|s| s.starts_with("finished") || s.starts_with("crashed")))
    };
    for &(id, what, _) in &moved {
        wait_for(&format!("the migrated {what} guest to finish on the destination"), 240, || {
            Ok(finished(id)?.is_some())
        })?;
        let state = finished(id)?.unwrap_or_default();
        if state != "finished(0)" {
            let console = hvctl_on(ctx, &ctx.dst, &["domain", "console", &id.to_string()]).unwrap_or_default();
            return Err(format!("the migrated {what} guest ended {state} on the destination; console:\n{console}"));
        }
    }
    let wall_us = started.elapsed().as_micros() as u64;
    let (timer_dst, _, timer_downtime) = moved[0];
    let (fpu_dst, _, fpu_downtime) = moved[1];
    let get = |id: u64, tag: &str| reports(&ctx.dst, id).into_iter().rev().find(|(t, _)| t == tag).map(|(_, v)| v);
    let ticks = get(timer_dst, "ticks").ok_or("the timer guest reported no ticks on the destination")?;
    if ticks != TIMER_TICKS {
        return Err(format!("the timer guest took {ticks} ticks, not {TIMER_TICKS}"));
    }
    let tsc_khz: u64 = clean(&ctx.dst.serial())
        .lines()
        .find_map(|l| l.split_once("TSC ")?.1.split_once(" kHz")?.0.trim().parse().ok())
        .ok_or("the destination printed no TSC frequency")?;
    let tsc = get(timer_dst, "tsc").ok_or("the timer guest reported no TSC delta")?;
    let tsc_us = tsc / tsc_khz.max(1) * 1000 + tsc % tsc_khz.max(1) * 1000 / tsc_khz.max(1);
    // Programmed: ticks × period. The guest's TSC must show at least that much (it did
    // not go back or restart), and no more than the test's whole wall time (it did not
    // jump by the source's or the destination's uptime).
    if tsc_us < (TIMER_TICKS - 1) * TIMER_PERIOD_US || tsc_us > wall_us {
        return Err(format!(
            "the timer guest's TSC delta across the migration is {tsc_us} µs: expected {} µs to {wall_us} µs              (the test's wall time)",
            (TIMER_TICKS - 1) * TIMER_PERIOD_US
        ));
    }
    let (rounds, bad) = (get(fpu_dst, "rounds"), get(fpu_dst, "bad"));
    if rounds != Some(FPU_ROUNDS) || bad != Some(0) {
        return Err(format!("the fpustate guest reported rounds {rounds:?} and bad {bad:?} on the destination"));
    }
    let xcr0 = get(fpu_dst, "xcr0").unwrap_or(0);
    for (id, line) in [(timer_dst, "apictimer: x2APIC id"), (fpu_dst, "fpustate: seed 5")] {
        let console = hvctl_on(ctx, &ctx.dst, &["domain", "console", &id.to_string()])?;
        if !console.contains(line) {
            return Err(format!("the console ring of domain {id} lost `{line}`, printed on the source: {console}"));
        }
    }
    for &(id, _, _) in &moved {
        hvctl_on(ctx, &ctx.dst, &["domain", "destroy", &id.to_string()])?;
    }
    Ok(format!(
        "apictimer: {ticks} ticks, TSC delta {tsc_us} µs across the move (downtime {timer_downtime} ms); fpustate: {FPU_ROUNDS} rounds, 0 bad registers, XCR0 {xcr0:#x} (downtime {fpu_downtime} ms); console rings moved"
    ))
}

fn live_memwriter(ctx: &Ctx) -> Result<String> {
    live_memwriter_report(ctx, &["--verify"]).map(|(summary, _)| summary)
}

/// The writer migrates while it writes and continues on the destination with the
/// right checksums; the summary and hvctl's report.
pub(crate) fn live_memwriter_report(ctx: &Ctx, flags: &[&str]) -> Result<(String, serde_json::Value)> {
    let id = writer(ctx)?;
    let (code, report, stderr) = migrate(ctx, id, flags)?;
    if code != Some(0) || report["outcome"] != "completed" {
        return Err(format!("the migration did not complete: exit {code:?}, {report}; {stderr}"));
    }
    let (src_digest, dst_digest) = (&report["source_digest"], &report["destination_digest"]);
    if src_digest.is_null() || src_digest != dst_digest {
        return Err(format!("memory at pause differs: source {src_digest}, destination {dst_digest}"));
    }
    let new_id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
    if domains(ctx, &ctx.src)?.iter().any(|d| d.0 == id) {
        return Err("the source domain still exists after the migration".into());
    }
    wait_for("the migrated writer to report 3 rounds on the destination", 60, || {
        Ok(rounds(&ctx.dst, new_id).len() >= 3)
    })?;
    let before = reports(&ctx.src, id);
    let after = reports(&ctx.dst, new_id);
    let joined: Vec<(String, u64)> = before.iter().chain(after.iter()).cloned().collect();
    let all = pairs(&joined);
    let source_rounds = pairs(&before).len();
    let describe = |r: &[(String, u64)]| {
        let rounds: Vec<u64> = r.iter().filter(|(t, _)| t == "round").map(|(_, v)| *v).collect();
        match (rounds.first(), rounds.last()) {
            (Some(a), Some(b)) => format!("rounds {a}..={b} ({} reports)", r.len()),
            _ => format!("no rounds ({} reports)", r.len()),
        }
    };
    for (i, (round, checksum)) in all.iter().enumerate() {
        if *round != i as u64 {
            return Err(format!(
                "the rounds do not continue at pair {i} (round {round}): source {}, destination {}",
                describe(&before),
                describe(&after)
            ));
        }
        let want = guest_abi::memwriter::round_checksum(WRITER_SEED, *round, WRITER_PAGES);
        if *checksum != want {
            let side = if i < source_rounds { "source" } else { "destination" };
            return Err(format!("round {round} on the {side} read back {checksum:#x}, expected {want:#x}"));
        }
    }
    if all.len() < source_rounds + 3 {
        return Err(format!("the destination completed fewer than 3 rounds: {}", describe(&after)));
    }
    let state = domains(ctx, &ctx.dst)?.into_iter().find(|d| d.0 == new_id).map(|d| d.2);
    if state.as_deref() != Some("running") {
        return Err(format!("the migrated domain is {state:?} on the destination"));
    }
    hvctl_on(ctx, &ctx.dst, &["domain", "destroy", &new_id.to_string()])?;
    let summary = format!(
        "source {}, destination {}, {} rounds in sequence with the right checksums; {} dirty rounds, {} pages \
         ({} resent), {} bytes in {} ms, downtime {} ms (estimated {} ms), digest {}",
        describe(&before),
        describe(&after),
        all.len(),
        report["rounds"],
        report["pages_sent"],
        report["pages_resent"],
        report["bytes_sent"],
        report["duration_ms"],
        report["downtime_ms"],
        report["estimated_downtime_ms"],
        src_digest
    );
    Ok((summary, report))
}

fn save_restore(ctx: &Ctx) -> Result<String> {
    let id = create(ctx, "memwriter", "saved", Some(WRITER_CPUID), WRITER_CMDLINE)?;
    wait_for("the writer's first rounds", 30, || Ok(rounds(&ctx.src, id).len() >= 2))?;
    let file = ctx.src.dir.join("saved.hvmig");
    let _ = std::fs::remove_file(&file);
    let file_arg = file.display().to_string();
    let saved = json(&hvctl_on(ctx, &ctx.src, &["save", &id.to_string(), &file_arg, "--json"])?, "save --json")?;
    if domains(ctx, &ctx.src)?.iter().any(|d| d.0 == id) {
        return Err("the saved domain still exists on the source".into());
    }
    let size = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
    let restored = json(&hvctl_on(ctx, &ctx.dst, &["restore", &file_arg, "--json"])?, "restore --json")?;
    let new_id = restored["domain"]
        .as_u64()
        .or_else(|| restored["destination_domain"].as_u64())
        .ok_or_else(|| format!("restore gave no domain id: {restored}"))?;
    wait_for("the restored writer to report 3 rounds", 60, || Ok(rounds(&ctx.dst, new_id).len() >= 3))?;
    let before = reports(&ctx.src, id);
    let joined: Vec<(String, u64)> = before.iter().chain(reports(&ctx.dst, new_id).iter()).cloned().collect();
    let all = pairs(&joined);
    for (i, (round, checksum)) in all.iter().enumerate() {
        let want = guest_abi::memwriter::round_checksum(WRITER_SEED, *round, WRITER_PAGES);
        if *round != i as u64 || *checksum != want {
            return Err(format!("after the restore, pair {i} is round {round} with checksum {checksum:#x}"));
        }
    }
    hvctl_on(ctx, &ctx.dst, &["domain", "destroy", &new_id.to_string()])?;
    Ok(format!(
        "saved {size} bytes ({} pages), restored as domain {new_id}; {} rounds in sequence",
        saved["pages_sent"],
        all.len()
    ))
}

/// Guest sizes the stress test moves: from the tests' own size to what people run.
const STRESS_SIZES: &[&str] = &["8M", "64M", "256M", "512M", "1G"];

/// Heap bytes in use and free frames of `session` (`hvctl info --json`).
pub(crate) fn memory_use(ctx: &Ctx, session: &Session) -> Result<(u64, u64)> {
    let info = json(&hvctl_on(ctx, session, &["info", "--json"])?, "info --json")?;
    let m = &info["memory_use"];
    match (m["heap_used_bytes"].as_u64(), m["frames_free"].as_u64()) {
        (Some(heap), Some(frames)) => Ok((heap, frames)),
        _ => Err(format!("info --json has no memory_use: {info}")),
    }
}

/// Heap and frames are back where they were: every frame, and the heap within what
/// the finished migration sessions keep for their status.
pub(crate) fn back_to_baseline(ctx: &Ctx, what: &str, base_src: (u64, u64), base_dst: (u64, u64)) -> Result<()> {
    const HEAP_SLACK: u64 = 64 * 1024;
    for (side, session, (heap0, frames0)) in [("source", &ctx.src, base_src), ("destination", &ctx.dst, base_dst)] {
        let (heap, frames) = memory_use(ctx, session)?;
        if frames != frames0 || heap > heap0 + HEAP_SLACK {
            return Err(format!(
                "after {what} the {side} has {frames} free frames and {heap} heap bytes in use; before: {frames0} \
                 frames and {heap0} bytes"
            ));
        }
    }
    Ok(())
}

/// Create a memwriter of `memory` on `session`; (exit code, id or the error text).
pub(crate) fn create_sized(
    ctx: &Ctx,
    session: &Session,
    name: &str,
    memory: &str,
) -> Result<(Option<i32>, Result<u64>)> {
    create_writer(ctx, session, name, memory, WRITER_CMDLINE)
}

/// Create a memwriter of `memory` with `cmdline` on `session`; (exit code, id or the error text).
pub(crate) fn create_writer(
    ctx: &Ctx,
    session: &Session,
    name: &str,
    memory: &str,
    cmdline: &str,
) -> Result<(Option<i32>, Result<u64>)> {
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    let t = target(session);
    let args = [
        "--connect",
        &t,
        "domain",
        "create",
        "--kernel",
        &kernel,
        "--name",
        name,
        "--memory",
        memory,
        "--cpuid",
        WRITER_CPUID,
        "--cmdline",
        cmdline,
        "--json",
    ];
    let (code, stdout, stderr) = hvctl_raw(ctx, &args)?;
    if code != Some(0) {
        return Ok((code, Err(stderr.trim().to_string())));
    }
    let out = json(&stdout, "domain create")?;
    Ok((code, out["id"].as_u64().ok_or_else(|| format!("domain create gave no id: {out}"))))
}

pub(crate) fn migrate_between(
    ctx: &Ctx,
    from: &Session,
    to: &Session,
    id: u64,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let (f, t) = (target(from), target(to));
    let id = id.to_string();
    let mut args = vec!["migrate", id.as_str(), "--from", f.as_str(), "--to", t.as_str(), "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = hvctl_raw(ctx, &args)?;
    let mut report = json(&stdout, "hvctl migrate --json").map_err(|e| format!("{e}; stderr: {stderr}"))?;
    report["exit_code"] = code.into();
    Ok(report)
}

/// The writer `id` on `session` reports at least two more rounds, each read back right.
fn writes_right(session: &Session, id: u64, what: &str) -> Result<()> {
    let before = rounds(session, id).len();
    wait_for(&format!("the writer to report rounds {what}"), 60, || Ok(rounds(session, id).len() >= before + 2))?;
    for (round, checksum) in rounds(session, id) {
        let want = guest_abi::memwriter::round_checksum(WRITER_SEED, round, WRITER_PAGES);
        if checksum != want {
            return Err(format!("{what}, round {round} read back {checksum:#x}, expected {want:#x}"));
        }
    }
    Ok(())
}

/// Issue 13 item 2: guests of 8 MiB to 1 GiB created, migrated (with a memory digest),
/// saved and restored; then the source's pool filled until creation is refused, and a
/// migration into the full hypervisor refused. Every refusal is a clear error, both
/// hypervisors keep serving, and their heap and frames come back to the baseline.
fn stress(ctx: &Ctx) -> Result<String> {
    let (base_src, base_dst) = (memory_use(ctx, &ctx.src)?, memory_use(ctx, &ctx.dst)?);
    let mut notes = Vec::new();
    for size in STRESS_SIZES {
        let name = format!("stress-{}", size.to_lowercase());
        let (code, id) = create_sized(ctx, &ctx.src, &name, size)?;
        let id = id.map_err(|e| format!("creating a {size} writer failed (exit {code:?}): {e}"))?;
        writes_right(&ctx.src, id, &format!("on the source ({size})"))?;
        // `--throttle`: this test is about sizes and the pool, not convergence; on a loaded
        // 2-core host the 256M writer dirties pages faster than TCG sends them, and the
        // source would give up ("does not converge") instead of slowing the writer.
        let report = migrate_between(ctx, &ctx.src, &ctx.dst, id, &["--verify", "--throttle"])?;
        if report["outcome"] != "completed" || report["source_digest"] != report["destination_digest"] {
            return Err(format!("migrating the {size} writer did not complete with equal digests: {report}"));
        }
        let moved = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
        writes_right(&ctx.dst, moved, &format!("after the {size} migration"))?;
        let file = ctx.dst.dir.join(format!("{name}.hvmig"));
        let _ = std::fs::remove_file(&file);
        let file_arg = file.display().to_string();
        let saved = json(&hvctl_on(ctx, &ctx.dst, &["save", &moved.to_string(), &file_arg, "--json"])?, "save")?;
        let restored = json(&hvctl_on(ctx, &ctx.src, &["restore", &file_arg, "--json"])?, "restore --json")?;
        let back = restored["domain"]
            .as_u64()
            .or_else(|| restored["destination_domain"].as_u64())
            .ok_or_else(|| format!("restore gave no domain id: {restored}"))?;
        writes_right(&ctx.src, back, &format!("after the {size} save and restore"))?;
        hvctl_on(ctx, &ctx.src, &["domain", "destroy", &back.to_string()])?;
        let _ = std::fs::remove_file(&file);
        notes.push(format!(
            "{size}: migrate {} ms (downtime {} ms, {} bytes), save {} ms",
            report["duration_ms"], report["downtime_ms"], report["bytes_sent"], saved["duration_ms"]
        ));
    }
    back_to_baseline(ctx, "moving every size", base_src, base_dst)?;

    // Fill the source until it refuses: a 1 GiB guest, then 256 MiB ones.
    let mut held = Vec::new();
    let mut refusal = None;
    for i in 0..16 {
        let size = if i == 0 { "1G" } else { "256M" };
        match create_sized(ctx, &ctx.src, &format!("fill-{i}"), size)? {
            (_, Ok(id)) => held.push(id),
            (code, Err(e)) => {
                if code != Some(4) || !e.contains("out of memory") {
                    return Err(format!(
                        "the full pool refused with exit {code:?} and `{e}`, not an out-of-memory error"
                    ));
                }
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.ok_or("16 guests fit; the pool never filled")?;
    memory_use(ctx, &ctx.src).map_err(|e| format!("the full source stopped answering: {e}"))?;
    // A migration into the full source: refused there, the guest runs on here.
    let (code, id) = create_sized(ctx, &ctx.dst, "into-full", "512M")?;
    let id = id.map_err(|e| format!("creating the 512M writer on the destination failed (exit {code:?}): {e}"))?;
    let report = migrate_between(ctx, &ctx.dst, &ctx.src, id, &[])?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    if report["exit_code"] != 4 || !error.contains("out of memory") {
        return Err(format!("migrating into the full hypervisor was not refused for want of memory: {report}"));
    }
    writes_right(&ctx.dst, id, "after the refused migration")?;
    hvctl_on(ctx, &ctx.dst, &["domain", "destroy", &id.to_string()])?;
    for id in &held {
        hvctl_on(ctx, &ctx.src, &["domain", "destroy", &id.to_string()])?;
    }
    back_to_baseline(ctx, "filling the pool", base_src, base_dst)?;
    let short = |t: &str| t.chars().take(110).collect::<String>();
    Ok(format!(
        "{}; pool full after {} guests: `{}`; migration into it refused: `{}`; heap and frames back to baseline",
        notes.join("; "),
        held.len(),
        short(&refusal),
        short(&error)
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_survive_a_printk_on_the_same_line() {
        let console = "HV-TICK 77 34.68\nHV-TICK 78 36.10[   36.845368] clocksource: Long readout\nHV-TICK 79 36.91\n";
        assert_eq!(super::ticks(console), vec![(77, 34.68), (78, 36.10), (79, 36.91)]);
        assert_eq!(super::ticks("HV-TICK 80 [garbage\nHV-TICK x 1.0\n"), vec![], "no uptime, no tick");
    }

    #[test]
    fn smp_busy_wants_two_cpus_both_busy() {
        assert_eq!(super::smp_busy("x\nHV-SMP-AFTER 2 10 20 90 100\n"), Ok((80, 80)));
        assert!(super::smp_busy("HV-SMP-AFTER 1 10 20 90 100").unwrap_err().contains("nproc is 1"));
        assert!(super::smp_busy("HV-SMP-AFTER 2 10 20 90 30").unwrap_err().contains("and cpu1 10 clock ticks"));
        assert!(super::smp_busy("HV-SMP-AFTER 2 10").is_err(), "an incomplete line is not a pass");
        assert!(super::smp_busy("").is_err());
    }
}
