//! The hypervisor on a multiprocessor machine (issue 16, item 1 "Bring-up"): every
//! physical CPU the firmware reports is started with INIT-SIPI-SIPI and parks
//! (`hv/src/smp.rs`); and (item 2) guests' vCPUs run on more than one of them. Not the
//! guest's SMP (that is `smp_tests.rs`, the `linux-smp-*` tests).
//!
//! | test | machine | boot option | passes when |
//! |---|---|---|---|
//! | `smp-qemu-all-cpus-start` | QEMU TCG -cpu EPYC -smp 2 | — | `SMP cpus=2 started=2 failed=0`, `hvctl info --json` lists APIC 0 boot and APIC 1 started, a memwriter finishes |
//! | `smp-qemu-failed-ap-reported` | QEMU TCG -cpu EPYC -smp 2 | `smp-fail-ap=1` | `SMP cpu apic=1 failed to start: …`, `SMP cpus=2 started=1 failed=1`, info lists APIC 1 failed, a memwriter finishes |
//! | `smp-qemu-ap-without-virtualization-reported` | QEMU TCG -cpu EPYC -smp 2 | `smp-fail-virt=1` | `SMP cpu apic=1 cannot run guests: …`, `SMP cpus=2 started=1 failed=1`, info lists APIC 1 failed, a memwriter finishes |
//! | `smp-qemu-two-memwriters-two-cpus` | QEMU TCG -cpu EPYC -smp 2 | — | as `smp-qemu-all-cpus-start`, and two boot-time memwriters (1024 pages × 16 rounds) that ran concurrently both end `finished(0)` with every round's checksum right, and their `DOMAIN <id> VCPU <v> ON CPU apic=<A>` placement lines cover APIC 0 and APIC 1 (else it fails naming the APIC IDs seen) |
//! | `smp-qemu-rebalance-after-destroy` | QEMU TCG -cpu EPYC -smp 2 | — | as `smp-qemu-all-cpus-start`, and three spinners created with `hvctl domain create` are placed two on one CPU and one on the other; destroying the lone one moves one of the pair to the emptied CPU (`DOMAIN d HOMES vcpu->cpu 0->b (moved from CPU a: 2 vCPUs there, 0 on b)`), where it runs (`DOMAIN d VCPU 0 ON CPU apic=b`) and keeps running (its exits grow) |
//! | `smp-qemu-dirty-exact-two-vcpus-two-cpus` (not by default) | QEMU TCG -cpu EPYC -smp 2 | `smp-vcpus=parallel` | two 2-vCPU `dirtypair` domains, D-bit and write-protect: in each vCPU 1 writes on one CPU and vCPU 0 peeks and cleans 20 times on the other (at the same time); no page missing or extra, each domain's vCPUs on two different APIC IDs |
//! | `smp-qemu-dirty-exact-two-vcpus-two-cpus-one-thread` | the same, both CPUs on one host thread (`-accel tcg,thread=single`: QEMU runs them in turn) | `smp-vcpus=parallel` | two 2-vCPU `dirtypair` domains, D-bit and write-protect: in each vCPU 1 writes on one CPU and vCPU 0 peeks and cleans 20 times on the other (at the same time); no page missing or extra, each domain's vCPUs on two different APIC IDs |
//! | `smp-qemu-two-sockets-reported` | QEMU TCG -cpu EPYC -smp 2,sockets=2,cores=1,threads=1 | — | as `smp-qemu-all-cpus-start`, and the boot log's `SMP sockets=2:`, `hvctl info --json` and `hvctl monitor hwinfo --json` put APIC 0 in socket 0 and APIC 1 in socket 1 (RDT is absent on QEMU; the topology is reported all the same), and `SMP socket 1 (package 1) reached: a job on CPU apic=1 …`: the boot CPU reached socket 1 the way monitoring MSR accesses go |
//! | `smp-qemu-two-sockets-failed-ap-still-placed` | the same two sockets | `smp-fail-virt=1` | APIC 1 failed but checked in, so it is still listed in socket 1 and `SMP socket 1 (package 1) unreachable: none of its CPUs (APIC 1) runs: …` (a monitoring access there is refused, never answered by socket 0) |
//! | `smp-bochs-all-cpus-start` | Bochs corei7_skylake_x, `cpu: count=2` | — | the marker shows 2 started and `hvctl info --json` (over COM2) lists both |
//! | `smp-bochs-rebalance-after-destroy` | Bochs corei7_skylake_x, `cpu: count=2` | — | as `smp-qemu-rebalance-after-destroy`, on VMX: the moved vCPU's VMCS, VMCLEARed on its old CPU, runs on the new one |
//!
//! Every QEMU scenario also checks the sockets (`SMP sockets=N:` line, `hvctl info
//! --json` `socket_cpus`, `hvctl monitor hwinfo --json` `socket_cpus`): a default
//! `-smp 2` is one socket of APIC 0 and 1 (a never-started AP is in none).
//!
//! Every AP listed as started must also have turned on virtualization with its own
//! frames, run the guest round trip on itself and slept on its own calibrated LAPIC
//! timer: `SMP cpu apic=N ready: Guest round trip (svm|vmx): … ok; local APIC timer …
//! ticks/ms, a 1 ms sleep took … µs`.
//!
//! Each boots its own machine (they differ in CPUs and command line) and prints the
//! serial log when it fails. The two-writer test's workload and its checks are those
//! of `cargo xtask bench smp` (`smp_bench.rs`), which measures what the second CPU buys.

use std::time::{Duration, Instant};

use std::collections::{BTreeMap, BTreeSet};

use crate::control_tests::{self, Ctx};
use crate::domain_tests::parse_domains;
use crate::emulator::{Platform, RunConfig, Session, TcgThreads};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::smp_bench::{self, Writers};
use crate::systest::{build_hvctl, wait_for, wait_serving};
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
    /// Boot-time memwriters (DOMAINS.CFG) that must finish correct and whose vCPUs must
    /// have been placed on every CPU of the machine.
    writers: Option<Writers>,
    /// Boot-time `dirtypair` domains (name, log-dirty mode): log-dirty exact under
    /// concurrency.
    pairs: &'static [(&'static str, u64)],
    /// Run by `cargo xtask test` without a filter.
    by_default: bool,
    /// QEMU `-smp N,sockets=S,cores=N/S,threads=1`; `None`: the default topology.
    sockets: Option<u32>,
    /// The APIC IDs of each socket that `hvctl info --json` and `hvctl monitor hwinfo
    /// --json` must report (`socket_cpus`), and the `SMP sockets=` line must count;
    /// `None`: not checked (Bochs).
    socket_cpus: Option<&'static [&'static [u32]]>,
    /// Create three spinners over the control channel, destroy the one alone on its
    /// CPU, and require one of the other two to move there and run
    /// ([`rebalanced_after_destroy`]).
    rebalance: bool,
    /// How QEMU's TCG threads the CPUs (Bochs: always one thread).
    threads: TcgThreads,
}

/// Log-dirty under concurrency (issue 16, Acceptance): a 2-vCPU domain per mode SVM
/// has (D-bit, which `auto` picks there, and write-protect), both at once; in each the
/// writer vCPU writes on one CPU while the other vCPU peeks and cleans the log 20 times
/// on the other CPU; see `guests/kernels/src/bin/dirtypair.rs`.
const PAIRS: &[(&str, u64)] = &[("pair-dbit", 2), ("pair-wp", 3)];
const PAIR_ROUNDS: u64 = 20;
/// On Bochs (VMX), PML too: every mode the platform has.
const BOCHS_PAIRS: &[(&str, u64)] = &[("pair-pml", 1), ("pair-dbit", 2), ("pair-wp", 3)];

fn pairs_cfg(pairs: &[(&str, u64)]) -> String {
    pairs
        .iter()
        .map(|(name, mode)| {
            format!("name={name} kernel=dirtypair.elf memory=16M vcpus=2 cmdline=mode={mode} rounds={PAIR_ROUNDS}\n")
        })
        .collect()
}

/// Each vCPU's placement lines (`DOMAIN id VCPU v ON CPU apic=A`) of domain `id`: the
/// APIC IDs each of its vCPUs ran on.
fn vcpu_placements(serial: &str, id: u32) -> BTreeMap<u32, BTreeSet<u32>> {
    let mut out: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for line in clean(serial).lines() {
        if let ["DOMAIN", d, "VCPU", v, "ON", "CPU", apic] = line.split_whitespace().collect::<Vec<_>>().as_slice()
            && d.parse() == Ok(id)
            && let (Ok(v), Some(Ok(apic))) = (v.parse(), apic.strip_prefix("apic=").map(str::parse))
        {
            out.entry(v).or_default().insert(apic);
        }
    }
    out
}

/// What the `dirtypair` domains reported, checked: each ended 0 with its mode, 20
/// rounds, nothing missing or extra, and its two vCPUs on two different CPUs.
fn pairs_checked(serial: &str, pairs: &[(&str, u64)]) -> Result<String> {
    let domains = parse_domains(serial);
    let ids = created_ids(serial);
    let mut out = Vec::new();
    for (name, mode) in pairs {
        let d = domains.get(*name).ok_or_else(|| format!("{name} never started"))?;
        if let Some(c) = &d.crashed {
            return Err(format!("{name}: {c}"));
        }
        let get = |k: &str| d.reports.iter().rev().find(|(t, _)| t == k).map(|(_, v)| *v);
        let (missing, extra) = (get("missing"), get("extra"));
        if get("mode") != Some(*mode) || get("rounds") != Some(PAIR_ROUNDS) || missing != Some(0) || extra != Some(0) {
            return Err(format!(
                "{name}: mode {:?} (want {mode}), rounds {:?}, missing {missing:?}, extra {extra:?}, exit {:?}",
                get("mode"),
                get("rounds"),
                d.exit
            ));
        }
        if d.exit != Some(0) {
            return Err(format!("{name}: exit {:?}", d.exit));
        }
        let id = *ids.get(*name).ok_or_else(|| format!("no CREATED line for {name}"))?;
        let placed = vcpu_placements(serial, id);
        let (v0, v1) = (placed.get(&0).cloned().unwrap_or_default(), placed.get(&1).cloned().unwrap_or_default());
        if v0.is_empty() || v1.is_empty() || !v0.is_disjoint(&v1) {
            return Err(format!("{name}: its vCPUs did not run on different CPUs: vCPU 0 on {v0:?}, vCPU 1 on {v1:?}"));
        }
        out.push(format!(
            "{name}: {PAIR_ROUNDS} rounds, {} writes, {} raced a clean, none missing or extra, vCPU 0 on APIC {v0:?}, vCPU 1 on {v1:?}",
            get("writes").unwrap_or(0),
            get("raced").unwrap_or(0)
        ));
    }
    Ok(out.join("; "))
}

/// Domain ids by name, from the `DOMAIN n CREATED name=…` lines.
fn created_ids(serial: &str) -> BTreeMap<String, u32> {
    clean(serial)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["DOMAIN", id, "CREATED", name, ..] => Some((name.strip_prefix("name=")?.to_string(), id.parse().ok()?)),
            _ => None,
        })
        .collect()
}

/// The two-CPU test's writers: long enough to share many 10 ms slices.
const TWO_WRITERS: Writers = Writers { count: 2, pages: 1024, rounds: 16 };
/// The four-CPU test's: one per CPU.
const FOUR_WRITERS: Writers = Writers { count: 4, pages: 1024, rounds: 16 };

/// Two 2-vCPU `dirtypair` domains on QEMU -smp 2 with `smp-vcpus=parallel`: each
/// domain's vCPU 1 writes on one CPU while its vCPU 0 peeks and cleans on the other.
/// Opt-in on multi-threaded TCG (the README's MTTCG fault); the one-thread form of it
/// runs by default.
const DIRTY_PAIRS_TWO_CPUS: Scenario = Scenario {
    name: "smp-qemu-dirty-exact-two-vcpus-two-cpus",
    bochs: false,
    cpus: 2,
    cmdline: "smp-vcpus=parallel",
    marker: "SMP cpus=2 started=2 failed=0",
    failed: &[],
    list: &[(0, "boot"), (1, "started")],
    memwriter: false,
    writers: None,
    pairs: PAIRS,
    by_default: false,
    sockets: None,
    socket_cpus: Some(&[&[0, 1]]),
    rebalance: false,
    threads: TcgThreads::OnePerCpu,
};

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
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0, 1]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
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
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
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
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0, 1]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        name: "smp-qemu-two-memwriters-two-cpus",
        bochs: false,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: false,
        writers: Some(TWO_WRITERS),
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0, 1]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        // -smp 4 under multi-threaded TCG on this 2-core machine: four vCPU threads
        // share two host cores, so it checks placement and correctness, not speed.
        name: "smp-qemu-four-memwriters-four-cpus",
        bochs: false,
        cpus: 4,
        cmdline: "",
        marker: "SMP cpus=4 started=4 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started"), (2, "started"), (3, "started")],
        memwriter: false,
        writers: Some(FOUR_WRITERS),
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0, 1, 2, 3]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
    DIRTY_PAIRS_TWO_CPUS,
    Scenario {
        name: "smp-qemu-rebalance-after-destroy",
        bochs: false,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: false,
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: Some(&[&[0, 1]]),
        rebalance: true,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        name: "smp-qemu-two-sockets-reported",
        bochs: false,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: true,
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: Some(2),
        socket_cpus: Some(&[&[0], &[1]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        name: "smp-qemu-two-sockets-failed-ap-still-placed",
        bochs: false,
        cpus: 2,
        cmdline: "smp-fail-virt=1",
        marker: "SMP cpus=2 started=1 failed=1",
        failed: &[1],
        list: &[(0, "boot"), (1, "failed")],
        memwriter: false,
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: Some(2),
        socket_cpus: Some(&[&[0], &[1]]),
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
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
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: None,
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        // A VMX vCPU moved to another CPU: its VMCS was VMCLEARed on the old one, and
        // the new one writes its own host state into it before the first entry.
        name: "smp-bochs-rebalance-after-destroy",
        bochs: true,
        cpus: 2,
        cmdline: "",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: false,
        writers: None,
        pairs: &[],
        by_default: true,
        sockets: None,
        socket_cpus: None,
        rebalance: true,
        threads: TcgThreads::OnePerCpu,
    },
    Scenario {
        // The scenario above with both CPUs on one host thread: QEMU runs them in
        // turn, which its MTTCG fault (README, SMP) needs not to strike, so it runs by
        // default; the domain's vCPUs still live on two CPUs and every peek and clean
        // stops the other one across CPUs.
        name: "smp-qemu-dirty-exact-two-vcpus-two-cpus-one-thread",
        by_default: true,
        threads: TcgThreads::One,
        ..DIRTY_PAIRS_TWO_CPUS
    },
    Scenario {
        // VMX vCPUs on both CPUs: each dirtypair domain's vCPU 1 writes on one CPU
        // while its vCPU 0 peeks and cleans on the other, PML's buffer drained there
        // with vCPU 1 stopped.
        name: "smp-bochs-dirty-exact-two-vcpus-two-cpus",
        bochs: true,
        cpus: 2,
        cmdline: "smp-vcpus=parallel",
        marker: "SMP cpus=2 started=2 failed=0",
        failed: &[],
        list: &[(0, "boot"), (1, "started")],
        memwriter: false,
        writers: None,
        pairs: BOCHS_PAIRS,
        by_default: true,
        sockets: None,
        socket_cpus: None,
        rebalance: false,
        threads: TcgThreads::OnePerCpu,
    },
];

/// Run the scenarios whose name contains `filter`.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected: Vec<&Scenario> =
        SCENARIOS.iter().filter(|s| filter.map_or(s.by_default, |f| s.name.contains(f))).collect();
    if filter.is_none() {
        for s in SCENARIOS.iter().filter(|s| !s.by_default) {
            println!("systest {} ... not run by default (cargo xtask test --system-only --filter {})", s.name, s.name);
        }
    }
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
            domains: if s.pairs.is_empty() { s.writers.map(|w| w.domains_cfg()) } else { Some(pairs_cfg(s.pairs)) },
        };
        let mut session = Session::spawn_sockets(&platform, esp, &config, &[], s.cpus, s.sockets, s.threads)?;
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
    let marker = smp_bench::smp_marker(&serial).ok_or("no `SMP cpus=` line")?;
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
    let mut sockets_detail = String::new();
    if let Some(want) = s.socket_cpus {
        sockets_detail = sockets_reported(&ctx, &serial, &v, want)?;
    }
    let table = control_tests::hvctl(&ctx, &["info"])?;
    if !table.lines().any(|l| l.contains("APIC") && l.contains("STATE")) {
        return Err(format!("`hvctl info` shows no CPU table:\n{table}"));
    }
    let ready_aps = serial.lines().filter(|l| l.trim().starts_with("SMP cpu apic=") && l.contains(" ready: ")).count();
    let mut detail = format!(
        "READY at {ready:.1} s, `{marker}`, cpu_list {list:?}, {ready_aps} AP(s) ran a guest with their own \
         {arch}{sockets_detail}"
    );
    if s.memwriter {
        control_tests::small_writer_finished(&ctx, "smpw", 60)?;
        detail.push_str(", memwriter finished(0)");
    }
    if let Some(w) = &s.writers {
        detail.push_str(&writers_placed(&ctx, session, w, s.cpus)?);
    }
    if !s.pairs.is_empty() {
        let names: Vec<&str> = s.pairs.iter().map(|(n, _)| *n).collect();
        // Bochs runs a guest some 20 times slower than QEMU.
        let limit = if s.bochs { 900 } else { 180 };
        wait_for("the dirtypair domains to end", limit, || {
            let list = control_tests::domain_list(&ctx)?;
            let domains = list["domains"].as_array().cloned().unwrap_or_default();
            Ok(names.iter().all(|n| {
                domains.iter().any(|d| {
                    d["name"] == *n
                        && d["state"].as_str().is_some_and(|st| st.starts_with("finished") || st.starts_with("crashed"))
                })
            }))
        })?;
        detail.push_str(&format!(", {}", pairs_checked(&session.serial(), s.pairs)?));
    }
    if s.rebalance {
        detail.push_str(&rebalanced_after_destroy(&ctx, session)?);
    }
    for marker in ["FAIL:", "FATAL:", "SHUTDOWN"] {
        if let Some(l) = clean(&session.serial()).lines().find(|l| l.contains(marker)) {
            return Err(format!("the hypervisor stopped serving: {l}"));
        }
    }
    Ok(detail)
}

/// The sockets `want` (APIC IDs per socket number) in all three places: the boot log's
/// `SMP sockets=N:` line, `hvctl info --json` (`sockets`, `socket_cpus`, and each
/// CPU's `socket`) and `hvctl monitor hwinfo --json` (`sockets`, `socket_cpus`), which
/// reports them although QEMU has no RDT.
fn sockets_reported(ctx: &Ctx, serial: &str, info: &serde_json::Value, want: &[&[u32]]) -> Result<String> {
    let want_json = serde_json::json!(want);
    let n = want.len();
    let line = serial
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SMP sockets="))
        .ok_or("no `SMP sockets=` line in the boot log")?;
    if !line.starts_with(&format!("SMP sockets={n}:")) {
        return Err(format!("boot log `{line}`, expected {n} socket(s) {want:?}"));
    }
    if info["sockets"].as_u64() != Some(n as u64) || info["socket_cpus"] != want_json {
        return Err(format!(
            "info --json: sockets {} socket_cpus {}, expected {n} {want_json}",
            info["sockets"], info["socket_cpus"]
        ));
    }
    for (socket, cpus) in want.iter().enumerate() {
        for apic in *cpus {
            let c = info["cpu_list"].as_array().and_then(|l| l.iter().find(|c| c["apic_id"] == *apic));
            if c.map(|c| c["socket"].clone()) != Some(serde_json::json!(socket)) {
                return Err(format!("info --json: APIC {apic} is {c:?}, expected in socket {socket}"));
            }
        }
    }
    // Each socket but the boot CPU's is reached by a job on its first started CPU, the
    // way monitoring MSR accesses go; a socket without one is reported unreachable.
    let mut probes = Vec::new();
    for (socket, cpus) in want.iter().enumerate().skip(1) {
        let prefix = format!("SMP socket {socket} (package ");
        let l = serial
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))
            .ok_or_else(|| format!("no `{prefix}…` line: socket {socket} was not probed"))?;
        let started = cpus.iter().any(|a| {
            info["cpu_list"].as_array().is_some_and(|l| l.iter().any(|c| c["apic_id"] == *a && c["state"] == "started"))
        });
        let ok = if started { l.contains(" reached: a job on CPU apic=") } else { l.contains(" unreachable: ") };
        if !ok {
            return Err(format!("socket {socket}: `{l}`"));
        }
        probes.push(format!("`{l}`"));
    }
    let text = control_tests::hvctl(ctx, &["monitor", "hwinfo", "--json"])?;
    let h: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("monitor hwinfo --json: {e}"))?;
    if h["sockets"].as_u64() != Some(n as u64) || h["socket_cpus"] != want_json {
        return Err(format!(
            "monitor hwinfo --json: sockets {} socket_cpus {}, expected {n} {want_json}",
            h["sockets"], h["socket_cpus"]
        ));
    }
    Ok(format!(
        ", `{line}`, {}info and monitor hwinfo (present={}) report sockets {want_json}",
        probes.iter().map(|p| format!("{p}, ")).collect::<String>(),
        h["present"]
    ))
}

/// The home CPU of every vCPU of domain `id`, from its last `DOMAIN id HOMES vcpu->cpu
/// 0->A 1->B …` line.
fn last_homes(serial: &str, id: u64) -> Option<Vec<u32>> {
    let prefix = format!("DOMAIN {id} HOMES vcpu->cpu ");
    let line = serial.lines().map(str::trim).rfind(|l| l.starts_with(&prefix))?;
    let pairs = line[prefix.len()..].split(" (").next()?;
    pairs.split_whitespace().map(|p| p.split_once("->")?.1.parse().ok()).collect()
}

/// Three spinners created over the control channel are placed two on one CPU and one
/// on the other; destroying the lone one makes one of the pair move (`… (moved from
/// CPU a: 2 vCPUs there, 0 on b)`), run there (`DOMAIN d VCPU 0 ON CPU apic=b`) and
/// keep running (its exits grow).
fn rebalanced_after_destroy(ctx: &Ctx, session: &Session) -> Result<String> {
    let kernel = ctx.guests.join("spinner.elf").display().to_string();
    let mut ids = Vec::new();
    for i in 0..3 {
        let name = format!("rb{i}");
        let out = control_tests::hvctl(
            ctx,
            &["domain", "create", "--kernel", &kernel, "--name", &name, "--memory", "8M", "--json"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}"))?;
        ids.push(v["id"].as_u64().ok_or("create gave no id")?);
    }
    // The serial log reaches us a little after the control reply.
    wait_for("the spinners' HOMES lines", 10, || {
        let serial = clean(&session.serial());
        Ok(ids.iter().all(|&id| last_homes(&serial, id).is_some()))
    })?;
    let serial = clean(&session.serial());
    let homes: Vec<(u64, u32)> = ids
        .iter()
        .map(|&id| match last_homes(&serial, id).as_deref() {
            Some([home]) => Ok((id, *home)),
            other => Err(format!("domain {id}: HOMES line {other:?}, expected one vCPU's home")),
        })
        .collect::<Result<_>>()?;
    let on = |cpu: u32| homes.iter().filter(|(_, h)| *h == cpu).map(|(id, _)| *id).collect::<Vec<_>>();
    let (pair_cpu, lone_cpu) = if on(0).len() == 2 { (0, 1) } else { (1, 0) };
    let (pair, lone) = (on(pair_cpu), on(lone_cpu));
    let [lone] = lone[..] else {
        return Err(format!("placement {homes:?}: expected two spinners on one CPU and one on the other"));
    };
    if pair.len() != 2 {
        return Err(format!("placement {homes:?}: expected two spinners on one CPU and one on the other"));
    }
    control_tests::hvctl(ctx, &["domain", "destroy", &lone.to_string()])?;
    let want = format!("(moved from CPU {pair_cpu}: 2 vCPUs there, 0 on {lone_cpu})");
    let mut moved = None;
    wait_for("a spinner to move to the emptied CPU and run there", 30, || {
        let serial = clean(&session.serial());
        moved = pair.iter().copied().find(|&id| {
            let homed =
                serial.lines().any(|l| l.trim().starts_with(&format!("DOMAIN {id} HOMES")) && l.contains(&want));
            let ran = serial.lines().any(|l| l.trim() == format!("DOMAIN {id} VCPU 0 ON CPU apic={lone_cpu}"));
            homed && ran && last_homes(&serial, id) == Some(vec![lone_cpu])
        });
        Ok(moved.is_some())
    })?;
    let moved = moved.ok_or("no spinner moved")?;
    let exits = || -> Result<(Option<String>, u64)> {
        let list = control_tests::domain_list(ctx)?;
        let d = list["domains"].as_array().and_then(|d| d.iter().find(|d| d["id"] == moved).cloned());
        let d = d.ok_or(format!("domain {moved} is gone"))?;
        Ok((d["state"].as_str().map(String::from), d["exits_total"].as_u64().unwrap_or_default()))
    };
    let before = exits()?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = exits()?;
    if after.0.as_deref() != Some("running") || after.1 <= before.1 {
        return Err(format!(
            "domain {moved} after its move: {before:?} then {after:?}, expected running with exits growing"
        ));
    }
    for id in ids.iter().filter(|&&id| id != lone) {
        control_tests::hvctl(ctx, &["domain", "destroy", &id.to_string()])?;
    }
    Ok(format!(
        ", spinners {homes:?} (domain, CPU); destroying {lone} moved {moved} from CPU {pair_cpu} to {lone_cpu}, \
         where it ran (exits {} -> {})",
        before.1, after.1
    ))
}

/// The boot-time writers `w` end `finished(0)` (`hvctl domain list`), ran concurrently
/// (each started before any ended), every round's checksum is right, and their vCPUs'
/// placement lines cover APIC 0 … `cpus - 1` (these machines number their CPUs so).
fn writers_placed(ctx: &Ctx, session: &Session, w: &Writers, cpus: u32) -> Result<String> {
    let names: Vec<String> = (0..w.count).map(Writers::name).collect();
    let states = || -> Result<Vec<Option<String>>> {
        let list = control_tests::domain_list(ctx)?;
        let domains = list["domains"].as_array().cloned().unwrap_or_default();
        Ok(names
            .iter()
            .map(|n| {
                domains.iter().find(|d| d["name"] == n.as_str()).and_then(|d| d["state"].as_str()).map(String::from)
            })
            .collect())
    };
    let ended =
        |s: &Option<String>| s.as_deref().is_some_and(|s| s.starts_with("finished") || s.starts_with("crashed"));
    wait_for("the writers to end", 120, || Ok(states()?.iter().all(ended)))?;
    let got = states()?;
    if let Some((n, st)) = names.iter().zip(&got).find(|(_, st)| st.as_deref() != Some("finished(0)")) {
        return Err(format!("writer {n} ended {st:?}, expected finished(0)"));
    }
    let serial = session.serial();
    w.check_results(&serial)?;
    let text = clean(&serial);
    let spans = w.spans(text.lines().enumerate())?;
    let last_start = spans.iter().map(|s| s.0).max().unwrap_or_default();
    if spans.iter().any(|s| s.1 < last_start) {
        return Err(format!("the writers did not run concurrently: one ended before another started ({spans:?})"));
    }
    let ids = smp_bench::writer_ids(&serial, w);
    let placed = smp_bench::placements(&serial);
    let seen: std::collections::BTreeSet<u32> =
        placed.iter().filter(|(id, _)| ids.contains(id)).flat_map(|(_, a)| a.iter().copied()).collect();
    let want: std::collections::BTreeSet<u32> = (0..cpus).collect();
    if !want.is_subset(&seen) {
        let detail = if seen.is_empty() {
            "none at all: no `DOMAIN <id> VCPU <v> ON CPU apic=<A>` line for them".to_string()
        } else {
            format!("only APIC ID(s) {seen:?}")
        };
        return Err(format!(
            "the writers' vCPU placement lines show {detail}; expected APIC IDs {want:?}: the writers did not run \
             on {cpus} CPUs (domains {ids:?}, placements {placed:?})"
        ));
    }
    Ok(format!(
        ", {} writers × {} rounds × {} pages finished(0) correct, concurrently, placed on APIC {seen:?}",
        w.count, w.rounds, w.pages
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_log(missing: u64, v1_apic: u32) -> String {
        [
            "DOMAIN 1 CREATED name=pair-dbit memory=16M vcpus=2".to_string(),
            "DOMAIN 1 VCPU 0 ON CPU apic=0".into(),
            format!("DOMAIN 1 VCPU 1 ON CPU apic={v1_apic}"),
            "DOMAIN 1 REPORT mode=0x2".into(),
            "DOMAIN 1 REPORT rounds=0x14".into(),
            format!("DOMAIN 1 REPORT missing={missing:#x}"),
            "DOMAIN 1 REPORT extra=0x0".into(),
            "DOMAIN 1 REPORT raced=0x5".into(),
            "DOMAIN 1 REPORT writes=0x1000".into(),
            format!("DOMAIN 1 EXIT code={} exits=10", u64::from(missing > 0)),
        ]
        .join("\n")
    }

    const DBIT_ONLY: &[(&str, u64)] = &[("pair-dbit", 2)];

    #[test]
    fn last_homes_reads_the_latest_line_with_or_without_a_reason() {
        let log = "DOMAIN 2 HOMES vcpu->cpu 0->0\nDOMAIN 3 HOMES vcpu->cpu 0->1 1->0\n\
                   DOMAIN 2 HOMES vcpu->cpu 0->1 (moved from CPU 0: 2 vCPUs there, 0 on 1)\n";
        assert_eq!(last_homes(log, 2), Some(vec![1]));
        assert_eq!(last_homes(log, 3), Some(vec![1, 0]));
        assert_eq!(last_homes(log, 4), None);
        assert_eq!(last_homes("DOMAIN 5 HOMES vcpu->cpu 0->x\n", 5), None);
    }

    #[test]
    fn a_pair_passes_only_exact_and_on_two_cpus() {
        let ok = pairs_checked(&pair_log(0, 1), DBIT_ONLY).unwrap();
        assert!(ok.contains("none missing or extra") && ok.contains("vCPU 1 on {1}"), "{ok}");
        let lost = pairs_checked(&pair_log(1, 1), DBIT_ONLY).unwrap_err();
        assert!(lost.contains("missing Some(1)"), "{lost}");
        let one_cpu = pairs_checked(&pair_log(0, 0), DBIT_ONLY).unwrap_err();
        assert!(one_cpu.contains("did not run on different CPUs"), "{one_cpu}");
        assert!(pairs_checked("", DBIT_ONLY).unwrap_err().contains("never started"));
        assert_eq!(vcpu_placements(&pair_log(0, 1), 1).get(&1).cloned(), Some(BTreeSet::from([1])));
    }

    #[test]
    fn scenario_names_are_unique_and_lists_match_markers() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        for s in SCENARIOS {
            assert!(s.marker.starts_with(&format!("SMP cpus={} ", s.cpus)), "{}", s.name);
            assert_eq!(s.list.len() as u32, s.cpus, "{}", s.name);
            // Every QEMU boot checks its sockets; each listed CPU in at most one.
            assert_eq!(s.socket_cpus.is_some(), !s.bochs, "{}", s.name);
            let placed: Vec<u32> = s.socket_cpus.unwrap_or_default().iter().flat_map(|c| c.iter().copied()).collect();
            assert!(placed.iter().all(|a| s.list.iter().any(|(id, _)| id == a)), "{}", s.name);
            assert_eq!(placed.len(), placed.iter().collect::<BTreeSet<_>>().len(), "{}", s.name);
        }
    }
}
