//! Multiprocessor Linux guests: the application processors of a Linux domain start
//! through INIT-SIPI-SIPI (the hypervisor's `domain::platform::route_ipi` and
//! `domain::sched::start_on_sipi`), time-sliced on the one physical CPU.
//!
//! | test | hv.test | run by default | passes when |
//! |---|---|---|---|
//! | `linux-smp-nproc-2` | cpuinfo | yes | a `vcpus=2` Linux domain prints `HV-NPROC 2` and powers off cleanly |
//!
//! Like the other Linux tests it runs on QEMU TCG -cpu EPYC (SVM) with the kernel and
//! initramfs of `linux.rs`, and prints the tail of the serial log when it fails. By
//! hand (`cargo xtask run [--bochs] --domains FILE --stage VMLINUZ=… --stage
//! INITRD.GZ=…` with this test's line) the same guest also brings up 2 CPUs on Bochs
//! (VMX, the AP's real-mode start under unrestricted guest), and 4 CPUs with
//! `vcpus=4` on QEMU.

use std::time::{Duration, Instant};

use crate::emulator::{Echo, Platform, RunConfig, Session, Wait};
use crate::image::Esp;
use crate::linux;
use crate::serial::clean;
use crate::{Result, tools};

/// Two vCPUs on one TCG CPU: slower than the one-vCPU tests' limit.
const TIMEOUT: Duration = Duration::from_secs(420);
/// How much of the serial log a failing test prints.
const TAIL_LINES: usize = 80;

/// The DOMAINS.CFG line: the Linux tests' guest with two vCPUs.
fn domains_line(vcpus: u32) -> String {
    format!(
        "name=linux kernel=VMLINUZ initrd=INITRD.GZ memory=256M vcpus={vcpus} \
         cmdline=console=ttyS0 earlyprintk=serial,ttyS0,115200 hv.test=cpuinfo\n"
    )
}

/// What the serial log says: the domain's id, its `HV-NPROC` value, and its end line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    id: Option<u32>,
    nproc: Option<String>,
    end: Option<String>,
}

fn parse(serial: &str) -> Seen {
    let mut s = Seen::default();
    for line in clean(serial).lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["DOMAIN", id, "CREATED", "name=linux", ..] => s.id = id.parse().ok(),
            ["DOMAIN-CREATE-FAILED", ..] => s.end = Some(line.to_string()),
            ["DOMAIN", id, "EXIT" | "CRASHED" | "HALTED", ..] if id.parse().ok() == s.id && s.id.is_some() => {
                s.end = Some(line.to_string());
            }
            _ => {
                let text = s.id.and_then(|id| line.strip_prefix(&format!("[dom{id}] ")));
                if let Some(n) = text.and_then(|t| t.trim_start().strip_prefix("HV-NPROC")) {
                    s.nproc.get_or_insert_with(|| n.trim().to_string());
                }
            }
        }
    }
    s
}

/// The problems of a run that should have shown `HV-NPROC <vcpus>` and exited with 0.
fn problems(s: &Seen, vcpus: u32, timed_out: bool, serial: &str) -> Vec<String> {
    let mut p = Vec::new();
    if timed_out {
        p.push(format!("timed out after {} s", TIMEOUT.as_secs()));
    }
    for marker in ["PANIC", "FAIL:"] {
        if let Some(l) = clean(serial).lines().find(|l| l.contains(marker) && !l.starts_with("[dom")) {
            p.push(format!("failure marker: {l}"));
        }
    }
    if s.id.is_none() {
        p.push("no `DOMAIN N CREATED name=linux`".into());
    }
    let want = vcpus.to_string();
    if s.nproc.as_deref() != Some(want.as_str()) {
        p.push(format!("HV-NPROC {:?}, expected {vcpus} (vcpus={vcpus})", s.nproc));
    }
    match &s.end {
        Some(l) if l.contains("EXIT code=0") => {}
        Some(l) => p.push(format!("the domain ended: {l}")),
        None if !timed_out => p.push("the domain never ended".into()),
        None => {}
    }
    p
}

/// Run the tests `filter` selects (all without a filter).
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    const NAME: &str = "linux-smp-nproc-2";
    if filter.is_some_and(|f| !NAME.contains(f)) {
        return Ok((0, 0));
    }
    let assets = linux::ensure_linux_assets()?;
    println!(
        "systest {NAME} on QEMU TCG -cpu EPYC (Linux {}, vcpus=2, up to {} s) ...",
        assets.kernel_release,
        TIMEOUT.as_secs()
    );
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let config = RunConfig {
        name: NAME.into(),
        timeout: TIMEOUT,
        cmdline: String::new(),
        echo: false,
        vsock: false,
        domains: Some(domains_line(2)),
    };
    let start = Instant::now();
    let mut session = Session::spawn_staged(&platform, esp, &config, &crate::linux_tests::staged(&assets))?;
    let wait = session
        .wait_until(TIMEOUT, &mut Echo::new(false), |log| parse(&log.text()).end.is_some() || log.outcome().is_some());
    session.stop();
    let serial = session.serial();
    let seen = parse(&serial);
    let found = problems(&seen, 2, wait == Wait::TimedOut, &serial);
    let elapsed = start.elapsed().as_secs_f64();
    if found.is_empty() {
        println!("systest {NAME} ... ok (HV-NPROC 2; {elapsed:.1} s)");
        return Ok((1, 0));
    }
    println!("systest {NAME} ... FAILED after {elapsed:.1} s");
    for p in &found {
        println!("  - {p}");
    }
    crate::linux_tests::print_serial_tail(&serial, &session.dir, TAIL_LINES);
    Ok((0, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_processors_and_a_clean_exit_pass() {
        let log = "READY arch=svm\r\nDOMAIN 1 CREATED name=linux vcpus=2\r\n[dom1] smpboot: Allowing 2 CPUs\r\n\
                   [dom1] HV-NPROC 2\r\nDOMAIN 1 EXIT code=0 exits=5\r\n";
        let s = parse(log);
        assert_eq!(s.nproc.as_deref(), Some("2"));
        assert_eq!(problems(&s, 2, false, log), Vec::<String>::new());
    }

    #[test]
    fn one_processor_or_a_crash_fails_with_the_reason() {
        let log = "DOMAIN 1 CREATED name=linux vcpus=2\n[dom1] HV-NPROC 1\nDOMAIN 1 CRASHED triple fault\n";
        let p = problems(&parse(log), 2, false, log);
        assert!(p.iter().any(|l| l.contains("HV-NPROC Some(\"1\")")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("CRASHED")), "{p:?}");
        assert!(domains_line(2).contains(" vcpus=2 "));
    }
}
