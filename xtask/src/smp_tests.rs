//! Multiprocessor Linux guests: the application processors of a Linux domain start
//! through INIT-SIPI-SIPI (the hypervisor's `domain::platform::route_ipi` and
//! `domain::sched::start_on_sipi`), time-sliced on one physical CPU, or in parallel on
//! several (a vCPU is taken out of its domain while the guest runs).
//!
//! | test | host CPUs | hv.test | run by default | passes when |
//! |---|---|---|---|---|
//! | `linux-smp-nproc-2` | 1 | cpuinfo | yes | a `vcpus=2` Linux domain prints `HV-NPROC 2` and powers off cleanly |
//! | `linux-smp-two-cpus` | 2, `smp-vcpus=parallel` | cpuinfo | no | as `linux-smp-nproc-2`, and its vCPUs were placed on two APIC IDs |
//! | `linux-smp-parallel-two-cpus` | 2, boot option `smp-vcpus=parallel` | parallel | no (a 2-vCPU guest running at once now and then resumed with the hypervisor's state: README, SMP) | a `vcpus=2` domain prints `HV-NPROC 2`; its `DOMAIN N VCPU v ON CPU apic=A` lines name two APIC IDs; during two busy loops at once each guest CPU was busy >= 40% of the time; two loops took < 1.5 x one loop (time-sliced: ~2 x); it powers off cleanly |
//!
//! Not a benchmark: the parallel test's ratio depends on the host having two cores
//! free for QEMU's two vCPU threads (on a host busy with other work it can fail on
//! the ratio or the busy share); it prints what it measured either way.
//!
//! Like the other Linux tests it runs on QEMU TCG -cpu EPYC (SVM) with the kernel and
//! initramfs of `linux.rs`, and prints the tail of the serial log when it fails. By
//! hand (`cargo xtask run [--bochs] --domains FILE --stage VMLINUZ=… --stage
//! INITRD.GZ=…` with this test's line) the same guest also brings up 2 CPUs on Bochs
//! (VMX, the AP's real-mode start under unrestricted guest), and 4 CPUs with
//! `vcpus=4` on QEMU.

use std::collections::BTreeSet;
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

/// Each guest CPU must have been busy this share (percent) of the two-loop interval.
const MIN_BUSY_PERCENT: u64 = 40;
/// Two loops at once must take less than this many tenths of one loop alone.
const MAX_RATIO_TENTHS: u64 = 15;
/// One loop shorter than this (centiseconds) is too short to compare.
const MIN_ONE_CS: u64 = 100;

/// The DOMAINS.CFG line: the Linux tests' guest with `vcpus` vCPUs running `hv.test=test`.
fn domains_line(vcpus: u32, test: &str) -> String {
    format!(
        "name=linux kernel=VMLINUZ initrd=INITRD.GZ memory=256M vcpus={vcpus} \
         cmdline=console=ttyS0 earlyprintk=serial,ttyS0,115200 hv.test={test}\n"
    )
}

/// What the serial log says: the domain's id, its `HV-NPROC` value, its end line, and
/// for `hv.test=parallel` where its vCPUs ran and what the guest measured.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    id: Option<u32>,
    nproc: Option<String>,
    end: Option<String>,
    /// (vCPU, APIC ID) of each `DOMAIN <id> VCPU <v> ON CPU apic=<A>` line.
    placed: BTreeSet<(u32, u32)>,
    /// `HV-PAR-ONE`: centiseconds of one loop alone.
    one: Option<u64>,
    /// `HV-PAR-TWO`: centiseconds of two loops at once.
    two: Option<u64>,
    /// `HV-PAR-CPU <n> <jiffies>`: each guest CPU's busy jiffies during TWO.
    busy: Vec<(u32, u64)>,
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
            ["DOMAIN", id, "VCPU", v, "ON", "CPU", apic] if id.parse().ok() == s.id && s.id.is_some() => {
                if let (Ok(v), Some(Ok(a))) = (v.parse(), apic.strip_prefix("apic=").map(str::parse)) {
                    s.placed.insert((v, a));
                }
            }
            _ => {
                let Some(text) = s.id.and_then(|id| line.strip_prefix(&format!("[dom{id}] "))) else { continue };
                let words: Vec<&str> = text.split_whitespace().collect();
                match words.as_slice() {
                    ["HV-NPROC", n] => {
                        s.nproc.get_or_insert_with(|| n.to_string());
                    }
                    ["HV-PAR-ONE", cs] => s.one = s.one.or(cs.parse().ok()),
                    ["HV-PAR-TWO", cs] => s.two = s.two.or(cs.parse().ok()),
                    ["HV-PAR-CPU", n, j] => {
                        if let (Ok(n), Ok(j)) = (n.parse(), j.parse()) {
                            s.busy.push((n, j));
                        }
                    }
                    _ => {}
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

/// The verdict of `linux-smp-parallel-two-cpus` on what its log showed: the measured
/// numbers for the ok line, or every reason it failed. A run that exited cleanly with
/// `HV-NPROC 2` (see [`problems`]) must also show that the two vCPUs ran on two
/// physical CPUs and at the same time:
/// - the `DOMAIN N VCPU v ON CPU apic=A` lines name at least two APIC IDs;
/// - each guest CPU was busy >= [`MIN_BUSY_PERCENT`]% of the two-loop interval (busy
///   jiffies are USER_HZ = 100 ticks: centiseconds, like `HV-PAR-TWO`);
/// - TWO / ONE < [`MAX_RATIO_TENTHS`] / 10: time-sliced on one CPU two loops take
///   about twice as long as one, in parallel about as long.
fn parallel_verdict(s: &Seen, timed_out: bool, serial: &str) -> std::result::Result<String, Vec<String>> {
    let mut p = problems(s, 2, timed_out, serial);
    let apics: BTreeSet<u32> = s.placed.iter().map(|&(_, a)| a).collect();
    let placed: Vec<String> = s.placed.iter().map(|(v, a)| format!("vCPU {v} on APIC {a}")).collect();
    if apics.len() < 2 {
        p.push(format!(
            "the domain's vCPUs ran on {} physical CPU(s) ({}), expected 2",
            apics.len(),
            if placed.is_empty() { "no `DOMAIN N VCPU v ON CPU` line".into() } else { placed.join(", ") }
        ));
    }
    let (Some(one), Some(two)) = (s.one, s.two) else {
        p.push(format!("no HV-PAR-ONE/HV-PAR-TWO measurement (ONE {:?}, TWO {:?})", s.one, s.two));
        return Err(p);
    };
    if one < MIN_ONE_CS {
        p.push(format!("one loop took {one} cs, under {MIN_ONE_CS} cs: too short to compare (raise hv.par.n)"));
    }
    let ratio = if one == 0 { f64::INFINITY } else { two as f64 / one as f64 };
    if two * 10 >= one * MAX_RATIO_TENTHS {
        p.push(format!(
            "two loops at once took {two} cs, one alone {one} cs: ratio {ratio:.2}, not below {:.1} (not in parallel)",
            MAX_RATIO_TENTHS as f64 / 10.0
        ));
    }
    let mut shares = Vec::new();
    for cpu in 0..2u32 {
        let Some(&(_, jiffies)) = s.busy.iter().find(|(n, _)| *n == cpu) else {
            p.push(format!("no HV-PAR-CPU {cpu} line"));
            continue;
        };
        let percent = (jiffies * 100).checked_div(two).unwrap_or(0);
        shares.push(format!("cpu{cpu} {jiffies}/{two} = {percent}%"));
        if percent < MIN_BUSY_PERCENT {
            p.push(format!(
                "guest cpu{cpu} was busy {jiffies} of {two} cs ({percent}%) during the two loops, under \
                 {MIN_BUSY_PERCENT}%: the loops did not both run"
            ));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }
    Ok(format!(
        "HV-NPROC 2; {}; ONE {one} cs, TWO {two} cs, TWO/ONE {ratio:.2}; busy during TWO: {}",
        placed.join(", "),
        shares.join(", ")
    ))
}

/// Run the tests `filter` selects (all without a filter).
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    // (name, host CPUs, hv.test, hypervisor boot options, run by default)
    let tests = [
        ("linux-smp-nproc-2", 1, "cpuinfo", "", true),
        // Both vCPUs homed on different CPUs (`smp-vcpus=parallel`; by default a
        // domain stays on one CPU): the guest's IPIs and interrupts cross physical CPUs.
        // Not by default: see the next one.
        ("linux-smp-two-cpus", 2, "cpuinfo", "smp-vcpus=parallel", false),
        // At the same time (`smp-vcpus=parallel`): not by default, since a guest whose
        // two vCPUs sat on two CPUs now and then resumed with corrupted state under
        // QEMU TCG (README, SMP).
        ("linux-smp-parallel-two-cpus", 2, "parallel", "smp-vcpus=parallel", false),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, cpus, test, options, by_default) in tests {
        if !filter.map_or(by_default, |f| name.contains(f)) {
            if filter.is_none() {
                println!("systest {name} ... not run by default (cargo xtask test --system-only --filter {name})");
            }
            continue;
        }
        let (serial, timed_out, elapsed, dir) = boot(name, cpus, test, options, esp)?;
        let seen = parse(&serial);
        let verdict = if test == "parallel" {
            parallel_verdict(&seen, timed_out, &serial)
        } else {
            let mut found = problems(&seen, 2, timed_out, &serial);
            let placed = &seen.placed;
            let apics: std::collections::BTreeSet<u32> = placed.iter().map(|&(_, a)| a).collect();
            if cpus > 1 && apics.len() < 2 {
                found.push(format!("its vCPUs were not placed on two CPUs: (vCPU, APIC) {placed:?}"));
            }
            if found.is_empty() {
                Ok(if cpus > 1 { format!("HV-NPROC 2; (vCPU, APIC) {placed:?}") } else { "HV-NPROC 2".into() })
            } else {
                Err(found)
            }
        };
        match verdict {
            Ok(detail) => {
                passed += 1;
                println!("systest {name} ... ok ({detail}; {elapsed:.1} s)");
            }
            Err(found) => {
                failed += 1;
                println!("systest {name} ... FAILED after {elapsed:.1} s");
                for p in &found {
                    println!("  - {p}");
                }
                crate::linux_tests::print_serial_tail(&serial, &dir, TAIL_LINES);
            }
        }
    }
    Ok((passed, failed))
}

/// Boot a `vcpus=2` Linux domain running `hv.test=test` on a QEMU of `cpus` CPUs and
/// wait for the domain's end: (serial log, timed out, seconds, run directory).
fn boot(
    name: &str,
    cpus: u32,
    test: &str,
    options: &str,
    esp: &Esp,
) -> Result<(String, bool, f64, std::path::PathBuf)> {
    let assets = linux::ensure_linux_assets()?;
    let machine = if cpus > 1 { format!(" -smp {cpus}, multi-threaded") } else { String::new() };
    println!(
        "systest {name} on QEMU TCG -cpu EPYC{machine} (Linux {}, vcpus=2, hv.test={test}, up to {} s) ...",
        assets.kernel_release,
        TIMEOUT.as_secs()
    );
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let config = RunConfig {
        name: name.into(),
        timeout: TIMEOUT,
        cmdline: options.into(),
        echo: false,
        vsock: false,
        domains: Some(domains_line(2, test)),
    };
    let start = Instant::now();
    let mut session = Session::spawn_cpus(&platform, esp, &config, &crate::linux_tests::staged(&assets), cpus)?;
    let wait = session
        .wait_until(TIMEOUT, &mut Echo::new(false), |log| parse(&log.text()).end.is_some() || log.outcome().is_some());
    session.stop();
    Ok((session.serial(), wait == Wait::TimedOut, start.elapsed().as_secs_f64(), session.dir.clone()))
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
        assert!(domains_line(2, "cpuinfo").contains(" vcpus=2 "));
        assert!(domains_line(2, "parallel").ends_with(" hv.test=parallel\n"));
    }

    /// A `hv.test=parallel` log: vCPU 1 placed on `apic1`, the guest's numbers.
    fn parallel_log(apic1: u32, one: u64, two: u64, cpu0: u64, cpu1: u64) -> String {
        format!(
            "READY arch=svm\r\nDOMAIN 1 CREATED name=linux vcpus=2\r\nDOMAIN 1 VCPU 0 ON CPU apic=0\r\n\
             [dom1] smpboot: Allowing 2 CPUs\r\nDOMAIN 1 VCPU 1 ON CPU apic={apic1}\r\n\
             [dom1] HV-PAR-ONE {one}\r\n[dom1] HV-PAR-TWO {two}\r\n[dom1] HV-PAR-CPU 0 {cpu0}\r\n\
             [dom1] HV-PAR-CPU 1 {cpu1}\r\n[dom1] HV-NPROC 2\r\n[dom1] HV-LINUX-DONE\r\n\
             DOMAIN 1 EXIT code=0 exits=5\r\n"
        )
    }

    #[test]
    fn two_loops_in_parallel_on_two_cpus_pass_with_the_numbers() {
        let log = parallel_log(1, 400, 440, 430, 420);
        let s = parse(&log);
        assert_eq!(s.placed, BTreeSet::from([(0, 0), (1, 1)]));
        assert_eq!((s.one, s.two), (Some(400), Some(440)));
        assert_eq!(s.busy, vec![(0, 430), (1, 420)]);
        let ok = parallel_verdict(&s, false, &log).expect("passes");
        assert!(ok.contains("ONE 400 cs, TWO 440 cs, TWO/ONE 1.10"), "{ok}");
        assert!(ok.contains("cpu0 430/440 = 97%") && ok.contains("cpu1 420/440 = 95%"), "{ok}");
        assert!(ok.contains("vCPU 0 on APIC 0, vCPU 1 on APIC 1"), "{ok}");
    }

    #[test]
    fn time_sliced_loops_fail_on_the_ratio_and_the_placement() {
        // Both vCPUs on APIC 0, each guest CPU busy half the time: two loops take 2x.
        let log = parallel_log(0, 400, 800, 400, 400);
        let p = parallel_verdict(&parse(&log), false, &log).unwrap_err();
        assert!(p.iter().any(|l| l.contains("ratio 2.00, not below 1.5")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("ran on 1 physical CPU(s) (vCPU 0 on APIC 0, vCPU 1 on APIC 0)")), "{p:?}");
        assert!(!p.iter().any(|l| l.contains("busy")), "50% each is busy enough: {p:?}");
    }

    #[test]
    fn one_busy_cpu_fails_on_its_share() {
        let log = parallel_log(1, 400, 450, 440, 20);
        let p = parallel_verdict(&parse(&log), false, &log).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("guest cpu1 was busy 20 of 450 cs (4%)"), "{p:?}");
    }

    #[test]
    fn missing_measurements_or_a_short_loop_fail() {
        let log = "DOMAIN 1 CREATED name=linux vcpus=2\n[dom1] HV-NPROC 2\nDOMAIN 1 EXIT code=0\n";
        let p = parallel_verdict(&parse(log), false, log).unwrap_err();
        assert!(p.iter().any(|l| l.contains("no `DOMAIN N VCPU v ON CPU` line")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("no HV-PAR-ONE/HV-PAR-TWO")), "{p:?}");
        let log = parallel_log(1, 50, 55, 50, 50);
        let p = parallel_verdict(&parse(&log), false, &log).unwrap_err();
        assert!(p.iter().any(|l| l.contains("too short to compare")), "{p:?}");
        // Another domain's placement does not count.
        let log = parallel_log(1, 400, 440, 430, 420).replace("DOMAIN 1 VCPU 1", "DOMAIN 2 VCPU 1");
        let p = parallel_verdict(&parse(&log), false, &log).unwrap_err();
        assert!(p.iter().any(|l| l.contains("ran on 1 physical CPU(s)")), "{p:?}");
    }
}
