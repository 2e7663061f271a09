//! System tests of hvctl over the serial control channel on Bochs: VMX with EPT, A/D
//! bits and PML, the platform without vsock. Before the serial channel, the control,
//! dirty-logging and monitoring commands had never run on Intel's virtualization; here
//! they run through `hvctl --connect unix:PATH` (Bochs' COM2 socket, behind xtask's relay).
//!
//! Bochs emulates the UART's baud rate (about 11 KB/s at 115200 baud), so the guests are
//! small and their kernels (~20 KiB) are uploaded over the line like any other.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::control_tests;
use crate::emulator::{Platform, RunConfig, Session};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::systest::{NamedTest, build_hvctl, run_each, select, stopped_serving, wait_serving};
use crate::{Result, tools};

const TESTS: &[NamedTest<control_tests::Ctx>] = &[
    ("bochs-serial-info-names-the-transport", info_over_serial),
    ("bochs-serial-domain-lifecycle", control_tests::domain_lifecycle),
    ("bochs-serial-monitor-hwinfo-attach-events-export", control_tests::monitor_events),
    ("bochs-serial-dirty-pml-stream-heatmap", dirty_pml_over_serial),
];

/// Boot Bochs once with COM2 on a socket and run the tests matching `filter`.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected = select(TESTS, filter);
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let platform = Platform::Bochs { model: "corei7_skylake_x".into() };
    tools::ensure(&platform)?;
    let hvctl = build_hvctl()?;
    let config = RunConfig {
        name: "bochs-serial".into(),
        timeout: Duration::from_secs(platform.default_timeout_secs()),
        cmdline: String::new(),
        echo: false,
        // On Bochs: COM2 on a socket behind the relay, no vsock.
        vsock: true,
        domains: None,
    };
    println!("systest bochs-serial-* on {platform} with the serial control channel (COM2) ...");
    let start = Instant::now();
    let mut session = Session::spawn(&platform, esp, &config)?;
    let serving = wait_serving(&mut session, config.timeout);
    let Some(socket) = session.serial_socket.clone() else {
        return Err("the Bochs session has no COM2 socket".into());
    };
    if let Err(wait) = serving {
        println!("systest bochs-serial-* ... FAILED: the serial control channel did not come up ({wait})");
        print_log(&session);
        return Ok((0, selected.len()));
    }
    println!("  serving on COM2 after {:.1} s", start.elapsed().as_secs_f64());
    let log = SerialLog::new(&session.serial());
    let ctx = control_tests::Ctx {
        socket: socket.clone(),
        target: format!("unix:{}", socket.display()),
        hvctl,
        caps: log.caps().unwrap_or_default(),
        guests: esp.dir.join("EFI").join("HV"),
    };
    let (passed, mut failed) = run_each(&selected, &ctx);
    failed += stopped_serving("bochs-serial-*", "hypervisor", &session);
    if failed > 0 {
        print_log(&session);
    }
    session.stop();
    Ok((passed, failed))
}

fn print_log(session: &Session) {
    println!(
        "---- serial log of bochs-serial ({}) ----\n{}\n---- end of serial log ----",
        session.dir.display(),
        clean(&session.serial())
    );
}

fn json(ctx: &control_tests::Ctx, args: &[&str]) -> Result<serde_json::Value> {
    let text = control_tests::hvctl(ctx, args)?;
    serde_json::from_str(&text).map_err(|e| format!("hvctl {}: not JSON ({e}): {text}", args.join(" ")))
}

/// `hvctl info` over the line: VMX, the serial channel named on both sides.
fn info_over_serial(ctx: &control_tests::Ctx) -> Result<String> {
    let info = json(ctx, &["info", "--json"])?;
    let control: Vec<String> = info["control"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    if !control.iter().any(|c| c.contains("serial")) || control.iter().any(|c| c.contains("vsock")) {
        return Err(format!("Bochs serves serial only, and info must say so: {info}"));
    }
    let caps = &info["capabilities"];
    let virt = caps.as_object().and_then(|o| o.get("virt")).and_then(|v| v.as_str()).unwrap_or("");
    let virt = if virt.is_empty() { ctx.caps.get("virt").map_or("", String::as_str) } else { virt };
    if virt != "vmx" {
        return Err(format!("expected VMX on Bochs: {info}"));
    }
    let text = control_tests::hvctl(ctx, &["info"])?;
    if !text.to_lowercase().contains("serial") {
        return Err(format!("hvctl info must name the transport it used:\n{text}"));
    }
    Ok(format!("control: {}", control.join(", ")))
}

/// PML on VMX through hvctl: the log sees exactly the writer's pages, a recorded
/// stream of 4 rounds renders as a heatmap.
fn dirty_pml_over_serial(ctx: &control_tests::Ctx) -> Result<String> {
    // 64 pages at 0x1000..0x1040 (pfn), rewritten forever.
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    let created = json(
        ctx,
        &[
            "domain",
            "create",
            "--kernel",
            &kernel,
            "--name",
            "pw",
            "--memory",
            "24M",
            "--cmdline",
            "pages=64 rounds=100000000 every=8",
            "--json",
        ],
    )?;
    let id = created["id"].as_u64().ok_or_else(|| format!("no id: {created}"))?;
    let ids = id.to_string();
    control_tests::hvctl(ctx, &["dirty", "start", &ids, "--mode", "pml"])?;
    std::thread::sleep(Duration::from_millis(500));
    control_tests::hvctl(ctx, &["dirty", "clean", &ids])?;
    // Bochs runs the writer slowly: give it time for a few rounds over its 64 pages.
    std::thread::sleep(Duration::from_secs(2));
    let round = json(ctx, &["dirty", "clean", &ids, "--json"])?;
    let runs: Vec<(u64, u64)> = round["runs"].as_array().map_or_else(Vec::new, |r| {
        r.iter().map(|r| (r["pfn"].as_u64().unwrap_or(0), r["pages"].as_u64().unwrap_or(0))).collect()
    });
    let dirty = round["dirty"].as_u64().unwrap_or(0);
    if !runs.iter().any(|&(pfn, n)| pfn <= 0x1000 && pfn + n >= 0x1040) || dirty > 64 + 16 {
        return Err(format!("expected the 64 written pages (and few others) dirty: {round}"));
    }
    let stats = json(ctx, &["dirty", "stats", &ids, "--json"])?;
    if stats["mode"] != "pml" || stats["rounds"].as_u64() != Some(2) {
        return Err(format!("stats must say pml and 2 rounds: {stats}"));
    }
    let dir = std::env::temp_dir().join(format!("hv-bochs-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (stream, png): (PathBuf, PathBuf) = (dir.join("d.stream"), dir.join("heat.png"));
    control_tests::hvctl(
        ctx,
        &["dirty", "stream", &ids, "--interval", "300", "--rounds", "4", "--out", &stream.display().to_string()],
    )?;
    control_tests::check_heatmap(ctx, &stream, &png, id)?;
    let after = json(ctx, &["dirty", "stats", &ids, "--json"])?;
    control_tests::hvctl(ctx, &["dirty", "stop", &ids])?;
    control_tests::hvctl(ctx, &["domain", "destroy", &ids])?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "pml: {dirty} dirty pages in a 2 s round; {} logging exits; 4-round stream rendered",
        after["logging_exits"]
    ))
}
