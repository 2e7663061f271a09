//! System tests of live migration between vendors: one QEMU (`-cpu EPYC`: AMD SVM with
//! NPT, control over virtio-vsock) and one Bochs (`corei7_skylake_x`: Intel VMX with EPT
//! and PML, control over COM2 behind xtask's relay). `hvctl migrate` relays the stream
//! between them, so every byte to or from Bochs crosses its ~6 KB/s serial line; the
//! writer is kept small (4 written pages in 8 MiB, the rest zero and never sent).
//!
//! The writer's CPUID policy is `hvctl cpuid level` of the two recorded hosts: AMD
//! presented on both (`host-vendors=intel+amd`). It moves QEMU → Bochs → QEMU while it
//! writes; its rounds must continue in sequence with the right checksums on each side
//! and the memory digests at pause must be equal. An `fpustate` (YMM registers held
//! across yields) makes the same round trip and must never find a register changed. A
//! same-vendor policy (`host-max` on
//! EPYC) must be refused by Bochs for its vendor before any page moves, the source
//! domain running on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::emulator::{Platform, RunConfig, Session};
use crate::image::Esp;
use crate::serial::clean;
use crate::systest::{NamedTest, build_hvctl, hvctl_output, run_each, select, stopped_serving, wait_for, wait_serving};
use crate::{Result, tools};

const WRITER_SEED: u64 = 9;
const WRITER_PAGES: u64 = 4;
/// 4 pages at 4 MiB, rewritten practically forever, yielding after every page.
const WRITER_CMDLINE: &str = "pages=4 base=0x400000 rounds=100000000 seed=9 every=1";

struct Ctx {
    hvctl: PathBuf,
    guests: PathBuf,
    qemu: Session,
    bochs: Session,
    /// The levelled cross-vendor policy (`hvctl cpuid level`'s one-line spec).
    spec: String,
}

const TESTS: &[NamedTest<Ctx>] = &[
    ("xmig-same-vendor-policy-refused-before-any-page", same_vendor_refused),
    ("xmig-memwriter-svm-to-vmx-and-back", round_trip),
    ("xmig-fpustate-avx-svm-to-vmx-and-back", fpu_round_trip),
    ("xmig-save-on-svm-restore-on-vmx", save_restore),
];

/// Boot QEMU (EPYC) and Bochs (Skylake-X) and run the cross-vendor tests matching `filter`.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected = select(TESTS, filter);
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let qemu_platform = Platform::Qemu { cpu: "EPYC".into() };
    let bochs_platform = Platform::Bochs { model: "corei7_skylake_x".into() };
    tools::ensure(&qemu_platform)?;
    tools::ensure(&bochs_platform)?;
    let hvctl = build_hvctl()?;
    let spec = levelled_spec(&hvctl)?;
    let config = |name: &str, platform: &Platform| RunConfig {
        name: name.into(),
        // Long enough for both migrations over Bochs' serial line.
        timeout: Duration::from_secs(platform.default_timeout_secs() + 900),
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    println!("systest xmig-* on {qemu_platform} (vsock) <-> {bochs_platform} (COM2) ...");
    let mut qemu = Session::spawn(&qemu_platform, esp, &config("xmig-qemu", &qemu_platform))?;
    let mut bochs = Session::spawn(&bochs_platform, esp, &config("xmig-bochs", &bochs_platform))?;
    let mut down = None;
    for (what, session, platform) in [("QEMU", &mut qemu, &qemu_platform), ("Bochs", &mut bochs, &bochs_platform)] {
        if let Err(wait) = wait_listening(session, Duration::from_secs(platform.default_timeout_secs())) {
            println!("systest xmig-* ... FAILED: {what}'s control channel did not come up ({wait})");
            print_log(what, session);
            down = Some(what);
            break;
        }
    }
    if down.is_some() {
        qemu.stop();
        bochs.stop();
        return Ok((0, selected.len()));
    }
    let mut ctx = Ctx { hvctl, guests: esp.dir.join("EFI").join("HV"), qemu, bochs, spec };
    let (passed, mut failed) = run_each(&selected, &ctx);
    failed += stopped_serving("xmig-*", "QEMU", &ctx.qemu);
    failed += stopped_serving("xmig-*", "Bochs", &ctx.bochs);
    if failed > 0 {
        print_log("QEMU", &ctx.qemu);
        print_log("Bochs", &ctx.bochs);
    }
    ctx.qemu.stop();
    ctx.bochs.stop();
    Ok((passed, failed))
}

/// Wait for `CONTROL listening`. Not [`wait_serving`]: Bochs prints `CONTROL
/// unavailable: no virtio-vsock device` first, and that line alone ends its wait.
fn wait_listening(session: &mut Session, timeout: Duration) -> std::result::Result<(), String> {
    let wait = session.wait_until(timeout, &mut crate::emulator::Echo::new(false), |l| {
        l.line("CONTROL listening").is_some() || l.outcome().is_some()
    });
    if crate::serial::SerialLog::new(&session.serial()).line("CONTROL listening").is_some() {
        Ok(())
    } else {
        wait_serving(session, Duration::from_secs(1)).map_err(|e| format!("{wait:?}; {e}"))
    }
}

/// `hvctl cpuid level` of the recorded QEMU EPYC and Bochs Skylake-X hosts: the spec.
fn levelled_spec(hvctl: &Path) -> Result<String> {
    let data = tools::root().join("levelling").join("testdata");
    let (a, b) = (data.join("qemu-7.2-tcg-epyc.cpuid"), data.join("bochs-2.7-corei7-skylake-x.cpuid"));
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let (code, stdout, stderr) = hvctl_output(hvctl, &["cpuid", "level", &a, &b, "--json"])?;
    if code != Some(0) {
        return Err(format!("hvctl cpuid level exited {code:?}: {stderr}"));
    }
    let v: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| format!("cpuid level --json: {e}"))?;
    let spec = v["spec"].as_str().ok_or_else(|| format!("cpuid level --json has no spec: {stdout}"))?;
    if !spec.contains("host-vendors=") {
        return Err(format!("the levelled spec does not list both vendors: {spec}"));
    }
    Ok(spec.to_string())
}

fn print_log(what: &str, session: &Session) {
    println!(
        "---- serial log of {what} ({}) ----\n{}\n---- end of serial log ----",
        session.dir.display(),
        clean(&session.serial())
    );
}

/// The `--connect` target of `session`: vsock on QEMU, the COM2 relay on Bochs.
fn target(session: &Session) -> String {
    match (&session.vsock_socket, &session.serial_socket) {
        (Some(v), _) => format!("unix:{}:{}", v.display(), wire::CONTROL_PORT),
        (None, Some(s)) => format!("unix:{}", s.display()),
        (None, None) => "unix:/nonexistent".into(),
    }
}

fn hvctl_on(ctx: &Ctx, session: &Session, args: &[&str]) -> Result<String> {
    let t = target(session);
    let mut all = vec!["--connect", t.as_str()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = hvctl_output(&ctx.hvctl, &all)?;
    if code != Some(0) {
        return Err(format!("hvctl {} exited with {code:?}: {}", args.join(" "), stderr.trim()));
    }
    Ok(stdout)
}

fn json(text: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| format!("{what}: not JSON ({e}): {text}"))
}

/// The domains on `session` as (id, state).
fn domains(ctx: &Ctx, session: &Session) -> Result<Vec<(u64, String)>> {
    let list = json(&hvctl_on(ctx, session, &["domain", "list", "--json"])?, "domain list")?;
    Ok(list["domains"]
        .as_array()
        .map(|ds| {
            ds.iter().map(|d| (d["id"].as_u64().unwrap_or(0), d["state"].as_str().unwrap_or("").to_string())).collect()
        })
        .unwrap_or_default())
}

fn state_of(ctx: &Ctx, session: &Session, id: u64) -> Result<Option<String>> {
    Ok(domains(ctx, session)?.into_iter().find(|d| d.0 == id).map(|d| d.1))
}

fn create_writer(ctx: &Ctx, name: &str, cpuid: &str) -> Result<u64> {
    create(ctx, "memwriter", name, cpuid, WRITER_CMDLINE)
}

fn create(ctx: &Ctx, kernel: &str, name: &str, cpuid: &str, cmdline: &str) -> Result<u64> {
    let kernel = ctx.guests.join(format!("{kernel}.elf")).display().to_string();
    let args = [
        "domain",
        "create",
        "--kernel",
        &kernel,
        "--name",
        name,
        "--memory",
        "8M",
        "--cpuid",
        cpuid,
        "--cmdline",
        cmdline,
        "--json",
    ];
    let out = json(&hvctl_on(ctx, &ctx.qemu, &args)?, "domain create")?;
    out["id"].as_u64().ok_or_else(|| format!("domain create gave no id: {out}"))
}

/// The values domain `id` reported on `session`'s serial log, in order: (tag, value).
fn reports(session: &Session, id: u64) -> Vec<(String, u64)> {
    let prefix = format!("DOMAIN {id} REPORT ");
    let serial = session.serial();
    let complete = serial.rfind('\n').map_or("", |end| &serial[..end]);
    clean(complete)
        .lines()
        .filter_map(|line| {
            let (tag, value) = line.trim().strip_prefix(&prefix)?.split_once('=')?;
            Some((tag.to_string(), u64::from_str_radix(value.trim_start_matches("0x"), 16).ok()?))
        })
        .collect()
}

/// (round, checksum) pairs; a migration may fall between a round's two reports, so the
/// caller joins the reports of every host first.
fn pairs(reports: &[(String, u64)]) -> Vec<(u64, u64)> {
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

/// Every pair is round i with the checksum memwriter must have read back.
fn check_sequence(all: &[(u64, u64)], what: &str) -> Result<()> {
    for (i, (round, checksum)) in all.iter().enumerate() {
        if *round != i as u64 {
            return Err(format!("{what}: the rounds do not continue at pair {i} (round {round})"));
        }
        let want = guest_abi::memwriter::round_checksum(WRITER_SEED, *round, WRITER_PAGES);
        if *checksum != want {
            return Err(format!("{what}: round {round} read back {checksum:#x}, expected {want:#x}"));
        }
    }
    Ok(())
}

fn migrate(
    ctx: &Ctx,
    from: &Session,
    to: &Session,
    id: u64,
    extra: &[&str],
) -> Result<(Option<i32>, serde_json::Value, String)> {
    let (f, t) = (target(from), target(to));
    let id = id.to_string();
    let mut args = vec!["migrate", id.as_str(), "--from", f.as_str(), "--to", t.as_str(), "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = hvctl_output(&ctx.hvctl, &args)?;
    let report = json(&stdout, "hvctl migrate --json").map_err(|e| format!("{e}; stderr: {stderr}"))?;
    Ok((code, report, stderr))
}

/// A policy for AMD hosts only (`host-max` on EPYC names no other vendor): Bochs refuses
/// it for its vendor when the policy record arrives, before any page, and the writer
/// runs on on QEMU.
fn same_vendor_refused(ctx: &Ctx) -> Result<String> {
    let id = create_writer(ctx, "amd-only", "base=host-max")?;
    wait_for("the AMD-only writer's first rounds on QEMU", 60, || Ok(pairs(&reports(&ctx.qemu, id)).len() >= 2))?;
    let started = Instant::now();
    let (code, report, stderr) = migrate(ctx, &ctx.qemu, &ctx.bochs, id, &[])?;
    let error = report["error"].as_str().unwrap_or_default().to_string();
    let lower = error.to_lowercase();
    if code != Some(4) || report["outcome"] != "failed" || !(lower.contains("vendor") && lower.contains("intel")) {
        return Err(format!("expected a refusal naming the vendor (exit 4), got exit {code:?}: {report}; {stderr}"));
    }
    if report["destination_pages_received"].as_u64() != Some(0) {
        return Err(format!("Bochs took pages before refusing: {report}"));
    }
    let before = pairs(&reports(&ctx.qemu, id)).len();
    wait_for("the AMD-only writer to go on writing on QEMU", 60, || {
        Ok(pairs(&reports(&ctx.qemu, id)).len() >= before + 2)
    })?;
    if state_of(ctx, &ctx.qemu, id)?.as_deref() != Some("running") {
        return Err("after the refusal the source domain is not running".into());
    }
    let left = domains(ctx, &ctx.bochs)?;
    if !left.is_empty() {
        return Err(format!("after the refusal Bochs has domains: {left:?}"));
    }
    hvctl_on(ctx, &ctx.qemu, &["domain", "destroy", &id.to_string()])?;
    Ok(format!(
        "refused in {:.1} s with: {}",
        started.elapsed().as_secs_f64(),
        error.chars().take(200).collect::<String>()
    ))
}

/// One leg: migrate `id` from `from` to `to` with `--verify`; the new id and a summary.
fn leg(ctx: &Ctx, from: &Session, to: &Session, id: u64, what: &str) -> Result<(u64, String)> {
    let started = Instant::now();
    // Over ~6 KB/s the final round (the writer's pages, the vCPU and device records)
    // takes seconds: a pause of 300 ms is not possible on this line.
    let (code, report, stderr) = migrate(ctx, from, to, id, &["--verify", "--downtime", "20000"])?;
    if code != Some(0) || report["outcome"] != "completed" {
        return Err(format!("{what} did not complete: exit {code:?}, {report}; {stderr}"));
    }
    let (s, d) = (&report["source_digest"], &report["destination_digest"]);
    if s.is_null() || s != d {
        return Err(format!("{what}: memory at pause differs: source {s}, destination {d}"));
    }
    let new_id =
        report["destination_domain"].as_u64().ok_or_else(|| format!("{what}: no destination domain: {report}"))?;
    Ok((
        new_id,
        format!(
            "{what}: {:.1} s wall, {} ms in the source, downtime {} ms, {} pages ({} resent) in {} rounds, {} bytes, digest {s}",
            started.elapsed().as_secs_f64(),
            report["duration_ms"],
            report["downtime_ms"],
            report["pages_sent"],
            report["pages_resent"],
            report["rounds"],
            report["bytes_sent"],
        ),
    ))
}

/// QEMU (SVM) → Bochs (VMX) → QEMU while the writer writes.
fn round_trip(ctx: &Ctx) -> Result<String> {
    let id = create_writer(ctx, "xmw", &ctx.spec)?;
    wait_for("the writer's first rounds on QEMU", 60, || Ok(pairs(&reports(&ctx.qemu, id)).len() >= 2))?;
    let (on_bochs, there) = leg(ctx, &ctx.qemu, &ctx.bochs, id, "QEMU -> Bochs")?;
    let src1 = reports(&ctx.qemu, id);
    wait_for("the writer to report 3 rounds on Bochs", 180, || Ok(pairs(&reports(&ctx.bochs, on_bochs)).len() >= 3))?;
    let joined: Vec<_> = src1.iter().chain(reports(&ctx.bochs, on_bochs).iter()).cloned().collect();
    check_sequence(&pairs(&joined), "QEMU then Bochs")?;
    let (back, home) = leg(ctx, &ctx.bochs, &ctx.qemu, on_bochs, "Bochs -> QEMU")?;
    let mid = reports(&ctx.bochs, on_bochs);
    wait_for("the writer to report 3 rounds back on QEMU", 60, || Ok(pairs(&reports(&ctx.qemu, back)).len() >= 3))?;
    let joined: Vec<_> = src1.iter().chain(mid.iter()).chain(reports(&ctx.qemu, back).iter()).cloned().collect();
    let all = pairs(&joined);
    check_sequence(&all, "QEMU, Bochs, QEMU")?;
    if state_of(ctx, &ctx.qemu, back)?.as_deref() != Some("running") {
        return Err("the writer is not running back on QEMU".into());
    }
    hvctl_on(ctx, &ctx.qemu, &["domain", "destroy", &back.to_string()])?;
    Ok(format!(
        "{} rounds in sequence with the right checksums (QEMU {}, Bochs {}, QEMU {}); {there}; {home}",
        all.len(),
        pairs(&src1).len(),
        pairs(&mid).len(),
        all.len() - pairs(&src1).len() - pairs(&mid).len()
    ))
}

/// `fpustate`'s progress on `session`: (rounds done, registers changed so far) pairs.
fn fpu_progress(session: &Session, id: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut done = None;
    for (tag, value) in reports(session, id) {
        match tag.as_str() {
            "progress" => done = Some(value),
            "badsofar" => {
                if let Some(d) = done.take() {
                    out.push((d, value));
                }
            }
            _ => {}
        }
    }
    out
}

/// The FPU/XSAVE record across vendors: an `fpustate` holding YMM registers (the
/// levelled policy has AVX, XCR0 0x7) across yields moves QEMU → Bochs → QEMU while it
/// runs; on each host its rounds go on and no register ever comes back changed.
fn fpu_round_trip(ctx: &Ctx) -> Result<String> {
    let id = create(ctx, "fpustate", "xfpu", &ctx.spec, "seed=5 rounds=100000000 every=200")?;
    let console = |s: &Session, id: u64| hvctl_on(ctx, s, &["domain", "console", &id.to_string()]);
    wait_for("fpustate's progress on QEMU", 60, || Ok(fpu_progress(&ctx.qemu, id).len() >= 2))?;
    let first = console(&ctx.qemu, id)?;
    if !first.contains("XCR0 0x7, 32-byte vector registers") {
        return Err(format!("fpustate does not hold YMM registers with XCR0 0x7 on QEMU: {first}"));
    }
    let (on_bochs, there) = leg(ctx, &ctx.qemu, &ctx.bochs, id, "QEMU -> Bochs")?;
    let before = fpu_progress(&ctx.qemu, id);
    wait_for("fpustate's progress on Bochs", 180, || Ok(fpu_progress(&ctx.bochs, on_bochs).len() >= 2))?;
    let (back, home) = leg(ctx, &ctx.bochs, &ctx.qemu, on_bochs, "Bochs -> QEMU")?;
    let mid = fpu_progress(&ctx.bochs, on_bochs);
    wait_for("fpustate's progress back on QEMU", 60, || Ok(fpu_progress(&ctx.qemu, back).len() >= 2))?;
    let after = fpu_progress(&ctx.qemu, back);
    let all: Vec<(u64, u64)> = before.iter().chain(mid.iter()).chain(after.iter()).copied().collect();
    for (i, pair) in all.windows(2).enumerate() {
        if pair[1].0 != pair[0].0 + 200 {
            return Err(format!("fpustate's rounds do not continue at report {i}: {pair:?}"));
        }
    }
    if let Some((round, bad)) = all.iter().find(|p| p.1 != 0) {
        return Err(format!("fpustate found {bad} changed registers by round {round}: {all:?}"));
    }
    let text = console(&ctx.qemu, back)?;
    if !text.contains("fpustate: seed 5") {
        return Err(format!("the console ring lost fpustate's first line: {text}"));
    }
    hvctl_on(ctx, &ctx.qemu, &["domain", "destroy", &back.to_string()])?;
    Ok(format!(
        "YMM registers and XCR0 0x7 held through rounds {}..={} (QEMU to {}, Bochs to {}), 0 changed; {there}; {home}",
        all.first().map_or(0, |p| p.0),
        all.last().map_or(0, |p| p.0),
        before.last().map_or(0, |p| p.0),
        mid.last().map_or(0, |p| p.0),
    ))
}

/// `hvctl save` on QEMU (vsock), `hvctl restore` into Bochs (its writes sized to the
/// serial line): the writer goes on there in sequence.
fn save_restore(ctx: &Ctx) -> Result<String> {
    let id = create_writer(ctx, "xsaved", &ctx.spec)?;
    wait_for("the writer's first rounds on QEMU", 60, || Ok(pairs(&reports(&ctx.qemu, id)).len() >= 2))?;
    let file = ctx.qemu.dir.join("xsaved.hvmig");
    let _ = std::fs::remove_file(&file);
    let file_arg = file.display().to_string();
    let saved = json(&hvctl_on(ctx, &ctx.qemu, &["save", &id.to_string(), &file_arg, "--json"])?, "save --json")?;
    let size = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
    let started = Instant::now();
    let restored = json(&hvctl_on(ctx, &ctx.bochs, &["restore", &file_arg, "--json"])?, "restore --json")?;
    let took = started.elapsed().as_secs_f64();
    let new_id = restored["domain"]
        .as_u64()
        .or_else(|| restored["destination_domain"].as_u64())
        .ok_or_else(|| format!("restore gave no domain id: {restored}"))?;
    wait_for("the restored writer to report 3 rounds on Bochs", 180, || {
        Ok(pairs(&reports(&ctx.bochs, new_id)).len() >= 3)
    })?;
    let joined: Vec<_> = reports(&ctx.qemu, id).into_iter().chain(reports(&ctx.bochs, new_id)).collect();
    let all = pairs(&joined);
    check_sequence(&all, "saved on QEMU, restored on Bochs")?;
    hvctl_on(ctx, &ctx.bochs, &["domain", "destroy", &new_id.to_string()])?;
    let _ = std::fs::remove_file(&file);
    Ok(format!(
        "saved {size} bytes ({} pages) on QEMU, restored on Bochs in {took:.1} s ({:.1} KB/s over COM2); {} rounds in sequence",
        saved["pages_sent"],
        size as f64 / took / 1e3,
        all.len()
    ))
}
