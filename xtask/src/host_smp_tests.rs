//! The hypervisor on a multiprocessor machine (issue 16, item 1 "Bring-up"): every
//! physical CPU the firmware reports is started with INIT-SIPI-SIPI and parks
//! (`hv/src/smp.rs`); scheduling stays on the boot CPU. Not the guest's SMP (that is
//! `smp_tests.rs`, the `linux-smp-*` tests).
//!
//! | test | machine | boot option | passes when |
//! |---|---|---|---|
//! | `smp-qemu-all-cpus-start` | QEMU TCG -cpu EPYC -smp 2 | — | `SMP cpus=2 started=2 failed=0`, `hvctl info --json` lists APIC 0 boot and APIC 1 started, a memwriter finishes |
//! | `smp-qemu-failed-ap-reported` | QEMU TCG -cpu EPYC -smp 2 | `smp-fail-ap=1` | `SMP cpu apic=1 failed to start: …`, `SMP cpus=2 started=1 failed=1`, info lists APIC 1 failed, a memwriter finishes |
//! | `smp-qemu-ap-without-virtualization-reported` | QEMU TCG -cpu EPYC -smp 2 | `smp-fail-virt=1` | `SMP cpu apic=1 cannot run guests: …`, `SMP cpus=2 started=1 failed=1`, info lists APIC 1 failed, a memwriter finishes |
//! | `smp-bochs-all-cpus-start` | Bochs corei7_skylake_x, `cpu: count=2` | — | the marker shows 2 started and `hvctl info --json` (over COM2) lists both |
//!
//! Every AP listed as started must also have turned on virtualization with its own
//! frames, run the guest round trip on itself and slept on its own calibrated LAPIC
//! timer: `SMP cpu apic=N ready: Guest round trip (svm|vmx): … ok; local APIC timer …
//! ticks/ms, a 1 ms sleep took … µs`.
//!
//! Each boots its own machine (they differ in CPUs and command line) and prints the
//! serial log when it fails.

use std::time::{Duration, Instant};

use crate::control_tests::{self, Ctx};
use crate::emulator::{Platform, RunConfig, Session};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::systest::{build_hvctl, wait_serving};
use crate::{Result, tools};

struct Scenario {
    name: &'static str,
    bochs: bool,
    cpus: u32,
    cmdline: &'static str,
    /// The `SMP` marker line expected.
    marker: &'static str,
    /// APIC IDs whose failure line (`failed to start` / `cannot run guests`) must appear.
    failed: &'static [u32],
    /// (APIC ID, state) of `hvctl info --json`'s `cpu_list`, in order.
    list: &'static [(u32, &'static str)],
    /// Run a memwriter to completion too.
    memwriter: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smp-qemu-all-cpus-start",
        bochs: false,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: true,
    },
    Scenario {
        name: "smp-qemu-failed-ap-reported",
        bochs: false,
        cpus: 2,
        cmdline: "smp-fail-ap=1",
        marker: "SMP cpus=2 started=1 failed=1",
        failed: &[1],
        list: &[(0, "boot"), (1, "failed")],
        memwriter: true,
    },
    Scenario {
        name: "smp-qemu-ap-without-virtualization-reported",
        bochs: false,
        cpus: 2,
        cmdline: "smp-fail-virt=1",
        marker: "SMP cpus=2 started=1 failed=1",
        failed: &[1],
        list: &[(0, "boot"), (1, "failed")],
        memwriter: true,
    },
    Scenario {
        name: "smp-bochs-all-cpus-start",
        bochs: true,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: false,
    },
];

/// Run the scenarios whose name contains `filter`.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected: Vec<&Scenario> = SCENARIOS.iter().filter(|s| filter.is_none_or(|f| s.name.contains(f))).collect();
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let hvctl = build_hvctl()?;
    let (mut passed, mut failed) = (0, 0);
    for s in selected {
        let platform = if s.bochs {
            Platform::Bochs { model: "corei7_skylake_x".into() }
        } else {
            Platform::Qemu { cpu: "EPYC".into() }
        };
        tools::ensure(&platform)?;
        println!("systest {} on {platform} with {} CPUs ...", s.name, s.cpus);
        let start = Instant::now();
        let config = RunConfig {
            name: s.name.into(),
            timeout: Duration::from_secs(platform.default_timeout_secs()),
            cmdline: s.cmdline.into(),
            echo: false,
            vsock: true,
            domains: None,
        };
        let mut session = Session::spawn_cpus(&platform, esp, &config, &[], s.cpus)?;
        let result = check(s, &mut session, &config, &hvctl, esp);
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(detail) => {
                passed += 1;
                println!("systest {} ... ok ({secs:.1} s; {detail})", s.name);
            }
            Err(e) => {
                failed += 1;
                println!("systest {} ... FAILED ({secs:.1} s): {e}", s.name);
                println!(
                    "---- serial log of {} ({}) ----\n{}\n---- end of serial log ----",
                    s.name,
                    session.dir.display(),
                    clean(&session.serial())
                );
            }
        }
        session.stop();
    }
    Ok((passed, failed))
}

fn check(
    s: &Scenario,
    session: &mut Session,
    config: &RunConfig,
    hvctl: &std::path::Path,
    esp: &Esp,
) -> Result<String> {
    wait_serving(session, config.timeout).map_err(|w| format!("the control channel did not come up ({w})"))?;
    let ready = session.ready_after.map(|t| t.as_secs_f64()).unwrap_or_default();
    let serial = clean(&session.serial());
    let log = SerialLog::new(&session.serial());
    if !log.ready_at() {
        return Err(format!("no READY: {}", log.outcome_summary()));
    }
    let marker = serial.lines().map(str::trim).find(|l| l.starts_with("SMP cpus=")).ok_or("no `SMP cpus=` line")?;
    if marker != s.marker {
        return Err(format!("marker `{marker}`, expected `{}`", s.marker));
    }
    let why = if s.cmdline.contains("smp-fail-virt") { "cannot run guests:" } else { "failed to start:" };
    for id in s.failed {
        let prefix = format!("SMP cpu apic={id} {why}");
        if !serial.lines().any(|l| l.trim().starts_with(&prefix)) {
            return Err(format!("no `{prefix} …` line"));
        }
    }
    let failure = |l: &&str| l.contains("failed to start") || l.contains("cannot run guests");
    if let Some(l) = serial.lines().find(|l| failure(l) && s.failed.is_empty()) {
        return Err(format!("unexpected failure line: {l}"));
    }
    // Every started AP ran a guest on itself with its own VMX/SVM.
    let arch = if s.bochs { "vmx" } else { "svm" };
    for (id, _) in s.list.iter().skip(1).filter(|(_, st)| *st == "started") {
        let prefix = format!("SMP cpu apic={id} ready: Guest round trip ({arch}):");
        let ran = |l: &str| l.starts_with(&prefix) && l.contains(": ok; local APIC timer ") && l.ends_with(" µs");
        if !serial.lines().map(str::trim).any(ran) {
            return Err(format!("no `{prefix} … ok; local APIC timer …` line: that AP did not run a guest or time"));
        }
    }
    let target = if s.bochs {
        format!("unix:{}", session.serial_socket.as_ref().ok_or("no COM2 socket")?.display())
    } else {
        format!("unix:{}:{}", session.vsock_socket.as_ref().ok_or("no vsock socket")?.display(), wire::CONTROL_PORT)
    };
    let ctx = Ctx {
        socket: session.vsock_socket.clone().unwrap_or_default(),
        target,
        hvctl: hvctl.to_path_buf(),
        caps: log.caps().unwrap_or_default(),
        guests: esp.dir.join("EFI").join("HV"),
    };
    let text = control_tests::hvctl(&ctx, &["info", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("info --json: {e}"))?;
    let list: Vec<(u64, String)> = v["cpu_list"]
        .as_array()
        .ok_or("info --json has no cpu_list")?
        .iter()
        .map(|c| (c["apic_id"].as_u64().unwrap_or(u64::MAX), c["state"].as_str().unwrap_or("?").to_string()))
        .collect();
    let want: Vec<(u64, String)> = s.list.iter().map(|(id, st)| (u64::from(*id), st.to_string())).collect();
    if list != want {
        return Err(format!("cpu_list {list:?}, expected {want:?}"));
    }
    let running = want.iter().filter(|(_, st)| st != "failed").count() as u64;
    if v["cpus"].as_u64() != Some(running) {
        return Err(format!("cpus {}, expected {running}", v["cpus"]));
    }
    let table = control_tests::hvctl(&ctx, &["info"])?;
    if !table.lines().any(|l| l.contains("APIC") && l.contains("STATE")) {
        return Err(format!("`hvctl info` shows no CPU table:\n{table}"));
    }
    let ready_aps = serial.lines().filter(|l| l.trim().starts_with("SMP cpu apic=") && l.contains(" ready: ")).count();
    let mut detail = format!(
        "READY at {ready:.1} s, `{marker}`, cpu_list {list:?}, {ready_aps} AP(s) ran a guest with their own {arch}"
    );
    if s.memwriter {
        control_tests::small_writer_finished(&ctx, "smpw", 60)?;
        detail.push_str(", memwriter finished(0)");
    }
    for marker in ["FAIL:", "FATAL:", "SHUTDOWN"] {
        if let Some(l) = clean(&session.serial()).lines().find(|l| l.contains(marker)) {
            return Err(format!("the hypervisor stopped serving: {l}"));
        }
    }
    Ok(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique_and_lists_match_markers() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        for s in SCENARIOS {
            assert!(s.marker.starts_with(&format!("SMP cpus={} ", s.cpus)), "{}", s.name);
            assert_eq!(s.list.len() as u32, s.cpus, "{}", s.name);
        }
    }
}
