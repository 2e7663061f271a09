//! System tests: named scenarios that boot the image on an emulator and judge it by
//! its serial markers (never by the emulator's exit status: Bochs always exits 1).
//! A failing scenario prints its reasons and the full serial log.

use std::time::Duration;

use crate::emulator::{self, Platform, RunConfig, RunResult};
use crate::image::{self, Esp};
use crate::serial::SerialLog;
use crate::{Result, tools};

/// What a scenario must see.
enum Expect {
    /// `READY arch=<arch>` after a guest round trip, with these CAPS values.
    Ready { arch: &'static str, caps: &'static [(&'static str, &'static str)] },
    /// A one-line refusal containing `reason`, then shutdown; never READY.
    Refused { reason: &'static str, caps: &'static [(&'static str, &'static str)] },
}

struct Scenario {
    name: &'static str,
    platform: fn() -> Platform,
    expect: Expect,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "qemu-epyc-svm-npt-ready",
            platform: || Platform::Qemu { cpu: "EPYC".into() },
            expect: Expect::Ready {
                arch: "svm",
                caps: &[
                    ("vendor", "AuthenticAMD"),
                    ("virt", "svm"),
                    ("svm.npt", "1"),
                    ("rdt.monitoring", "0"),
                    ("usable", "1"),
                ],
            },
        },
        Scenario {
            // Hygon Dhyana (family 0x18): AMD-compatible with SVM and NPT; the
            // hypervisor must read its CPUID for guest policies (levelling's Vendor::Hygon).
            name: "qemu-dhyana-hygon-svm-npt-ready",
            platform: || Platform::Qemu { cpu: "Dhyana".into() },
            expect: Expect::Ready {
                arch: "svm",
                caps: &[
                    ("vendor", "HygonGenuine"),
                    ("family", "24"),
                    ("virt", "svm"),
                    ("svm.npt", "1"),
                    ("usable", "1"),
                ],
            },
        },
        Scenario {
            name: "qemu-no-virtualization-refused",
            platform: || Platform::Qemu { cpu: "qemu64,-svm".into() },
            expect: Expect::Refused {
                reason: "no hardware virtualization",
                caps: &[("virt", "none"), ("usable", "0")],
            },
        },
        Scenario {
            name: "qemu-svm-without-npt-refused",
            platform: || Platform::Qemu { cpu: "qemu64".into() },
            expect: Expect::Refused {
                reason: "SVM without nested paging",
                caps: &[("virt", "svm"), ("svm.npt", "0"), ("usable", "0")],
            },
        },
        Scenario {
            name: "bochs-skylake-x-vmx-ept-ad-pml-ready",
            platform: || Platform::Bochs { model: "corei7_skylake_x".into() },
            expect: Expect::Ready {
                arch: "vmx",
                caps: &[
                    ("vendor", "GenuineIntel"),
                    ("virt", "vmx"),
                    ("vmx.ept", "1"),
                    ("vmx.ept_ad", "1"),
                    ("vmx.pml", "1"),
                    ("vmx.feature_control_locked", "0"),
                    ("rdt.monitoring", "0"),
                    ("usable", "1"),
                ],
            },
        },
        Scenario {
            name: "bochs-haswell-vmx-no-pml-ready",
            platform: || Platform::Bochs { model: "corei7_haswell_4770".into() },
            expect: Expect::Ready {
                arch: "vmx",
                caps: &[
                    ("vendor", "GenuineIntel"),
                    ("virt", "vmx"),
                    ("vmx.ept", "1"),
                    ("vmx.pml", "0"),
                    ("usable", "1"),
                ],
            },
        },
    ]
}

/// Check a run against its expectation; the problems found, if any.
fn judge(run: &RunResult, expect: &Expect) -> Vec<String> {
    let log = SerialLog::new(&run.serial);
    let mut problems = Vec::new();
    if run.timed_out {
        problems.push(format!("timed out after {:.0} s", run.elapsed.as_secs_f64()));
    }
    for marker in ["FAIL:", "FATAL:"] {
        if let Some(l) = log.line(marker) {
            problems.push(format!("failure marker: {l}"));
        }
    }
    let expected_caps = match expect {
        Expect::Ready { caps, .. } | Expect::Refused { caps, .. } => caps,
    };
    match log.caps() {
        None => problems.push("no CAPS line".into()),
        Some(found) => {
            for (k, v) in expected_caps.iter() {
                match found.get(*k) {
                    Some(got) if got == v => {}
                    Some(got) => problems.push(format!("CAPS {k}={got}, expected {v}")),
                    None => problems.push(format!("CAPS has no {k}")),
                }
            }
        }
    }
    // The raw values the image read must decode, on the host, to exactly the CAPS line
    // it printed: the recording is complete and the decoding deterministic.
    match (log.line("PROBE-RAW "), log.line("CAPS ")) {
        (Some(raw), Some(caps_line)) => {
            match hv::platform::hw::Recorded::parse_line(raw.trim_start_matches("PROBE-RAW ")) {
                Ok(mut rec) => match hv::platform::caps::probe(&mut rec) {
                    Ok(caps) if caps.machine_line() == caps_line => {}
                    Ok(caps) => problems.push(format!(
                        "PROBE-RAW decodes on the host to a different CAPS line:\n  image: {caps_line}\n  host:  {}",
                        caps.machine_line()
                    )),
                    Err(e) => problems.push(format!("PROBE-RAW does not decode: {e}")),
                },
                Err(e) => problems.push(format!("PROBE-RAW unparsable: {e}")),
            }
        }
        _ => problems.push("no PROBE-RAW line".into()),
    }
    match expect {
        Expect::Ready { arch, .. } => {
            match log.line("READY") {
                Some(l) if l.split_whitespace().any(|t| t == format!("arch={arch}")) => {}
                Some(l) => problems.push(format!("READY for the wrong arch: {l}")),
                None => problems.push("no READY line".into()),
            }
            if log.outcome() != Some("Ready") {
                problems.push(format!("outcome {:?}, expected Ready", log.outcome()));
            }
        }
        Expect::Refused { reason, .. } => {
            match log.line("REFUSED:") {
                Some(l) if l.contains(reason) => {}
                Some(l) => problems.push(format!("refusal does not say {reason:?}: {l}")),
                None => problems.push("no REFUSED line".into()),
            }
            if log.ready_at() {
                problems.push("READY printed although the CPU was to be refused".into());
            }
            if log.outcome() != Some("Refused") {
                problems.push(format!("outcome {:?}, expected Refused (a clean shutdown)", log.outcome()));
            }
        }
    }
    problems
}

fn run_scenario(s: &Scenario, esp: &Esp) -> Result<(RunResult, Vec<String>)> {
    let platform = (s.platform)();
    tools::ensure(&platform)?;
    let config = RunConfig {
        name: s.name.into(),
        timeout: Duration::from_secs(platform.default_timeout_secs()),
        cmdline: String::new(),
        echo: false,
        vsock: false,
        domains: None,
    };
    let run = emulator::run(&platform, esp, &config)?;
    let problems = judge(&run, &s.expect);
    Ok((run, problems))
}

/// Run every scenario (or those whose name contains `filter`); the Linux guest ones
/// (linux_tests.rs, last: they are the slowest) only when `linux`.
pub fn run_all(filter: Option<&str>, linux: bool) -> Result<()> {
    let esp = image::build(true)?;
    println!("xtask: image {} ({} bytes)", esp.efi.display(), esp.size);
    let (mut passed, mut failed) = (0, 0);
    let (p, f) = crate::control_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::serial_control_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::bochs_serial_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::domain_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::migration_tests::run(&esp, filter, linux)?;
    passed += p;
    failed += f;
    let (p, f) = crate::xvendor_migration_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::agent_tests::run(&esp, filter, linux)?;
    passed += p;
    failed += f;
    let (p, f) = crate::prometheus_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::host_smp_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    let (p, f) = crate::smp_stress_tests::run(&esp, filter)?;
    passed += p;
    failed += f;
    for s in scenarios().iter().filter(|s| filter.is_none_or(|f| s.name.contains(f))) {
        println!("systest {} on {} ...", s.name, (s.platform)());
        let (run, problems) = run_scenario(s, &esp)?;
        if problems.is_empty() {
            passed += 1;
            let ready = run.ready_after.map(|t| format!(", READY at {:.1} s", t.as_secs_f64())).unwrap_or_default();
            println!("systest {} ... ok ({:.1} s{ready})", s.name, run.elapsed.as_secs_f64());
        } else {
            failed += 1;
            println!("systest {} ... FAILED", s.name);
            for p in &problems {
                println!("  - {p}");
            }
            println!("---- serial log of {} ({}) ----", s.name, run.dir.display());
            println!("{}", crate::serial::clean(&run.serial));
            println!("---- end of serial log ----");
        }
    }
    if linux {
        let (p, f) = crate::linux_tests::run(&esp, filter)?;
        passed += p;
        failed += f;
        let (p, f) = crate::smp_tests::run(&esp, filter)?;
        passed += p;
        failed += f;
        let (p, f) = crate::linux_console_tests::run(&esp, filter)?;
        passed += p;
        failed += f;
    } else {
        println!("systest linux-* ... left out (--no-linux)");
    }
    println!("systests: {passed} passed, {failed} failed");
    if failed > 0 { Err(format!("{failed} system test(s) failed")) } else { Ok(()) }
}

/// `cargo xtask bench boot`: time from emulator start to READY, `runs` times per
/// platform, median reported.
pub fn bench_boot(runs: usize) -> Result<()> {
    let esp = image::build(true)?;
    println!("image size: {} bytes ({} KiB)", esp.size, esp.size.div_ceil(1024));
    for platform in [Platform::Qemu { cpu: "EPYC".into() }, Platform::Bochs { model: "corei7_skylake_x".into() }] {
        tools::ensure(&platform)?;
        let mut times = Vec::new();
        for i in 0..runs.max(1) {
            let config = RunConfig {
                name: format!("bench-boot-{i}"),
                timeout: Duration::from_secs(platform.default_timeout_secs()),
                cmdline: String::new(),
                echo: false,
                vsock: false,
                domains: None,
            };
            let run = emulator::run(&platform, &esp, &config)?;
            let t = run.ready_after.ok_or_else(|| {
                format!("{platform}: no READY in run {i}: {}", SerialLog::new(&run.serial).outcome_summary())
            })?;
            println!("  {platform}: run {} READY at {:.2} s", i + 1, t.as_secs_f64());
            times.push(t);
        }
        times.sort();
        let median = times[times.len() / 2];
        println!("boot to READY on {platform}: median {:.2} s over {} runs", median.as_secs_f64(), times.len());
    }
    Ok(())
}

/// The hvctl binary the system tests drive, built first (`cargo build -p host-cli`).
pub fn build_hvctl() -> Result<std::path::PathBuf> {
    build_hvctl_profile(false)
}

/// hvctl built in the release profile (`release`) or the dev one; its path.
pub fn build_hvctl_profile(release: bool) -> Result<std::path::PathBuf> {
    let mut args = vec!["build", "--quiet", "-p", "host-cli"];
    if release {
        args.push("--release");
    }
    tools::cargo(&args)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tools::root().join("target"));
    Ok(target_dir.join(if release { "release" } else { "debug" }).join("hvctl"))
}

/// Run hvctl with `args`; (exit code, stdout, stderr), without judging them.
pub fn hvctl_output(hvctl: &std::path::Path, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(hvctl)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", hvctl.display()))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Wait until `session` serves its control channel (`CONTROL listening`); the wait's
/// outcome as text when it does not.
pub fn wait_serving(session: &mut emulator::Session, timeout: Duration) -> std::result::Result<(), String> {
    // Each transport prints its own CONTROL line, vsock's first: on Bochs "CONTROL
    // unavailable" (no vsock) comes before the serial line, so the first CONTROL line
    // alone does not decide. Done when one listens, or both said they do not.
    let wait = session.wait_until(timeout, &mut emulator::Echo::new(false), |l| {
        l.line("CONTROL listening").is_some()
            || (l.line("CONTROL unavailable").is_some() && l.line("CONTROL serial ").is_some())
            || l.outcome().is_some()
    });
    if matches!(wait, emulator::Wait::Matched(_))
        && SerialLog::new(&session.serial()).line("CONTROL listening").is_some()
    {
        Ok(())
    } else {
        Err(format!("{wait:?}"))
    }
}

/// A test against a context `C` (a booted hypervisor, or two): a detail line or why it failed.
pub type NamedTest<C> = (&'static str, fn(&C) -> Result<String>);

/// The tests of `tests` whose name contains `filter`.
pub fn select<'a, C>(tests: &'a [NamedTest<C>], filter: Option<&str>) -> Vec<&'a NamedTest<C>> {
    tests.iter().filter(|(n, _)| filter.is_none_or(|f| n.contains(f))).collect()
}

/// Run each test against `ctx`, printing `systest NAME ... ok (…)` or `FAILED`;
/// (passed, failed).
pub fn run_each<C>(tests: &[&NamedTest<C>], ctx: &C) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        let start = std::time::Instant::now();
        match test(ctx) {
            Ok(detail) => {
                passed += 1;
                println!("systest {name} ... ok ({:.1} s; {detail})", start.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!("systest {name} ... FAILED\n  - {e}");
            }
        }
    }
    (passed, failed)
}

/// The hypervisor of `session` (called `who`) must still be serving after the tests
/// of `group`: each failure marker in its log is printed and counted.
pub fn stopped_serving(group: &str, who: &str, session: &emulator::Session) -> usize {
    let log = SerialLog::new(&session.serial());
    let mut failed = 0;
    for marker in ["FAIL:", "FATAL:", "SHUTDOWN"] {
        if let Some(l) = log.line(marker) {
            failed += 1;
            println!("systest {group} ... FAILED: the {who} stopped serving: {l}");
        }
    }
    failed
}

/// Poll `check` every 200 ms for up to `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("timed out after {secs} s waiting for {what}"))
}
