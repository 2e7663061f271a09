//! System tests of guest domains, on QEMU (SVM) and Bochs (VMX): what a guest sees
//! through CPUID equals levelling's view of its policy, leaf by leaf; and domains run
//! concurrently under time slices (a spinning guest starves nobody) with their memory
//! holding exactly what they wrote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::emulator::{Echo, Platform, RunConfig, Session, Wait};
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::{Result, tools};

/// What the serial log says about each domain.
#[derive(Debug, Default)]
pub(crate) struct DomainLog {
    cpuid: Vec<(u32, u32, [u32; 4])>,
    /// Its `DOMAIN n REPORT key=value` lines, in order.
    pub(crate) reports: Vec<(String, u64)>,
    /// Its exit code (`DOMAIN n EXIT code=…`).
    pub(crate) exit: Option<u64>,
    /// Its `DOMAIN n CRASHED …` line.
    pub(crate) crashed: Option<String>,
}

/// Each domain's [`DomainLog`], by name.
pub(crate) fn parse_domains(serial: &str) -> BTreeMap<String, DomainLog> {
    let text = clean(serial);
    let mut by_id: BTreeMap<u32, String> = BTreeMap::new();
    let mut out: BTreeMap<String, DomainLog> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["DOMAIN", id, "CREATED", name, ..] => {
                let (Ok(id), Some(name)) = (id.parse::<u32>(), name.strip_prefix("name=")) else { continue };
                by_id.insert(id, name.to_string());
                out.insert(name.to_string(), DomainLog::default());
            }
            // A migrated domain keeps its name: its reports continue those of the source.
            ["DOMAIN", id, "INCOMING", name, ..] => {
                let (Ok(id), Some(name)) = (id.parse::<u32>(), name.strip_prefix("name=")) else { continue };
                by_id.insert(id, name.to_string());
                out.entry(name.to_string()).or_default();
            }
            ["DOMAIN", id, "REPORT", kv] => {
                if let (Some(d), Some((k, v))) = (id.parse().ok().and_then(|id| by_id.get(&id)), kv.split_once('=')) {
                    let v = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(u64::MAX);
                    out.entry(d.clone()).or_default().reports.push((k.to_string(), v));
                }
            }
            ["DOMAIN", id, "EXIT", code, ..] => {
                if let (Some(d), Some(c)) = (id.parse().ok().and_then(|id| by_id.get(&id)), code.strip_prefix("code="))
                {
                    out.entry(d.clone()).or_default().exit = c.parse().ok();
                }
            }
            ["DOMAIN", id, "CRASHED", ..] => {
                if let Some(d) = id.parse().ok().and_then(|id| by_id.get(&id)) {
                    out.entry(d.clone()).or_default().crashed = Some(line.to_string());
                }
            }
            [tag, "cpuid", leaf, sub, a, b, c, d] if tag.starts_with("[dom") => {
                let id: Option<u32> = tag.trim_start_matches("[dom").trim_end_matches(']').parse().ok();
                let hex = |s: &str| u32::from_str_radix(s, 16).ok();
                if let (Some(name), Some(l), Some(s), Some(a), Some(b), Some(c), Some(d)) =
                    (id.and_then(|i| by_id.get(&i)), hex(leaf), hex(sub), hex(a), hex(b), hex(c), hex(d))
                {
                    out.entry(name.clone()).or_default().cpuid.push((l, s, [a, b, c, d]));
                }
            }
            _ => {}
        }
    }
    out
}

/// The host CPU the hypervisor levels for, from its `cpuid-dump` and the features its
/// boot checks found faulty (`CPU-FAULT name: why; ...`), which records cannot show.
pub(crate) fn host_from_serial(serial: &str) -> Result<levelling::HostCpu> {
    let text = clean(serial);
    let dump = text
        .split_once("CPUID-DUMP-BEGIN\n")
        .and_then(|(_, rest)| rest.split_once("CPUID-DUMP-END"))
        .map(|(d, _)| d)
        .ok_or("no CPUID dump in the serial log")?;
    let dump = levelling::parse_dump(dump).map_err(|e| format!("host CPUID dump: {e}"))?;
    let mut host = levelling::HostCpu::from_records(&dump.records).map_err(|e| format!("host CPUID: {e}"))?;
    for (name, why) in cpu_faults(&text) {
        let f = levelling::features::Feature::from_name(name)
            .ok_or_else(|| format!("CPU-FAULT names {name}, no feature"))?;
        host.mark_faulty(f, why.to_string());
    }
    Ok(host)
}

/// The hypervisor's `CPU-FAULT name: why; guests are not offered name ...` lines.
pub(crate) fn cpu_faults(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| l.split_once("CPU-FAULT ")?.1.split_once(": "))
        .map(|(name, rest)| (name, rest.split_once("; guests are not offered").map_or(rest, |(w, _)| w)))
        .collect()
}

const POLICIES: &[(&str, &str)] = &[("noavx2", "base=host-max,-avx2"), ("maxleaf6", "base=host-max,max-leaf=6")];

fn cpuid_policies(session: &mut Session, timeout: Duration) -> Result<String> {
    cpuid_policies_on(session, timeout, None)
}

/// `cpuid_policies` on QEMU's Hygon Dhyana model: the host must read as Hygon and the
/// guests must see `HygonGenuine` (leaves 0 and 0x8000_0000) and AMD's layout of the
/// extended leaves, which the leaf-by-leaf comparison with levelling's table checks.
fn cpuid_policies_hygon(session: &mut Session, timeout: Duration) -> Result<String> {
    cpuid_policies_on(session, timeout, Some(levelling::Vendor::Hygon))
        .map(|detail| format!("{detail}; host and guests are HygonGenuine"))
}

fn cpuid_policies_on(session: &mut Session, timeout: Duration, vendor: Option<levelling::Vendor>) -> Result<String> {
    let wait = session.wait_until(timeout, &mut Echo::new(false), |l| l.outcome().is_some());
    if wait == Wait::TimedOut {
        return Err(format!("no power-off within {} s", timeout.as_secs()));
    }
    let serial = session.serial();
    let host = host_from_serial(&serial)?;
    if let Some(v) = vendor
        && host.vendor != v
    {
        return Err(format!("the host's CPUID reads as {}, expected {v}", host.vendor));
    }
    let domains = parse_domains(&serial);
    let mut checked = 0;
    for (name, spec) in POLICIES {
        let d = domains.get(*name).ok_or_else(|| format!("domain {name} never started"))?;
        if let Some(c) = &d.crashed {
            return Err(format!("{name}: {c}"));
        }
        if d.exit != Some(0) {
            return Err(format!("{name} did not exit with 0 ({:?})", d.exit));
        }
        let reported = d.reports.iter().find(|(k, _)| k == "lines").map(|(_, v)| *v);
        if reported != Some(d.cpuid.len() as u64) || d.cpuid.len() < 40 {
            return Err(format!("{name}: {} cpuid lines in the log, the guest reported {reported:?}", d.cpuid.len()));
        }
        let (mut policy, _) = levelling::parse_spec(spec).map_err(|e| e.to_string())?.policy_on(&host);
        policy.vcpus = 1;
        let table = levelling::CpuidTable::build(&policy, &host).map_err(|e| format!("{name}: {e}"))?;
        let vcpu = hv::domain::vcpu_state(0);
        for (leaf, sub, got) in &d.cpuid {
            // The hypervisor range is the core's, not the policy's: its own signature
            // at 0x4000_0000, KVM's clock at 0x4000_0100 (a booted hypervisor knows its
            // TSC rate) and zeros elsewhere (hv::domain::exit::cpuid).
            let want = if (0x4000_0000..0x5000_0000).contains(leaf) {
                hv::domain::exit::cpuid::hypervisor_leaf(*leaf, true)
            } else {
                table.lookup_vcpu(*leaf, *sub, &vcpu)
            };
            if *got != want {
                return Err(format!(
                    "{name} ({spec}): CPUID {leaf:#x}.{sub}: guest saw {got:08x?}, levelling says {want:08x?}"
                ));
            }
            checked += 1;
        }
        let leaf = |l: u32, s: u32| d.cpuid.iter().find(|(a, b, _)| *a == l && *b == s).map(|x| x.2);
        if let Some(v) = vendor {
            // [ebx, edx, ecx] of the vendor string, in leaf 0 and (AMD layout) 0x8000_0000.
            let r = v.regs();
            for l in [0, 0x8000_0000] {
                if leaf(l, 0).map(|x| [x[1], x[3], x[2]]) != Some(r) {
                    return Err(format!("{name}: CPUID {l:#x} does not carry the vendor string {v}"));
                }
            }
        }
        match *name {
            "noavx2" => {
                if leaf(7, 0).is_none_or(|r| r[1] & (1 << 5) != 0) {
                    return Err("noavx2: CPUID.7.0:EBX[5] (AVX2) is set or missing".into());
                }
            }
            _ => {
                if leaf(0, 0).map(|r| r[0]) != Some(6) || leaf(7, 0) != Some([0; 4]) {
                    return Err("maxleaf6: CPUID.0:EAX is not 6 or leaf 7 is not all zeros".into());
                }
            }
        }
    }
    Ok(format!("{checked} CPUID answers equal levelling's view in 2 policies"))
}

const WRITERS: &[(&str, u64)] = &[("w1", 11), ("w2", 22)];
const PAGES: u64 = 256;
const ROUNDS: u64 = 3;

fn concurrent(session: &mut Session, timeout: Duration) -> Result<String> {
    let done = |l: &SerialLog| {
        let d = parse_domains(&l.text());
        WRITERS.iter().all(|(n, _)| d.get(*n).is_some_and(|d| d.exit.is_some() || d.crashed.is_some()))
            && d.get("spin").is_some_and(|s| s.reports.iter().any(|(k, _)| k == "spins"))
    };
    let start = Instant::now();
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let domains = parse_domains(&session.serial());
    if !matches!(wait, Wait::Matched(_)) {
        return Err(format!("writers and spinner did not all make progress within {} s ({wait:?})", timeout.as_secs()));
    }
    for (name, seed) in WRITERS {
        let d = &domains[*name];
        if let Some(c) = &d.crashed {
            return Err(format!("{name}: {c}"));
        }
        let sums: Vec<u64> = d.reports.iter().filter(|(k, _)| k == "checksum").map(|(_, v)| *v).collect();
        let want: Vec<u64> = (0..ROUNDS).map(|r| guest_abi::memwriter::round_checksum(*seed, r, PAGES)).collect();
        if sums != want || d.exit != Some(0) {
            return Err(format!("{name}: checksums {sums:x?}, expected {want:x?}; exit {:?}", d.exit));
        }
    }
    let spins = domains["spin"].reports.iter().filter(|(k, _)| k == "spins").count();
    let spin_alive = domains["spin"].exit.is_none() && domains["spin"].crashed.is_none();
    if !spin_alive {
        return Err("the spinner stopped".into());
    }
    Ok(format!(
        "2 writers x {ROUNDS} rounds x {PAGES} pages read back correct, spinner reported {spins} times, {:.1} s",
        start.elapsed().as_secs_f64()
    ))
}

/// Misbehaving guests: (name, mode, expected outcome).
const MISBEHAVING: &[(&str, &str, Outcome)] = &[
    ("ud", "virt-insn", Outcome::Exit(106)),
    ("gpread", "msr-read", Outcome::Exit(113)),
    ("gpwrite", "msr-write", Outcome::Exit(113)),
    // Beyond RAM is MMIO: an unclaimed page drops writes and reads all ones (the guest
    // checks and exits 20 / 21); an instruction the emulation refuses stops the domain.
    ("oobwrite", "oob-write", Outcome::Exit(20)),
    ("oobread", "oob-read", Outcome::Exit(21)),
    ("mmiormw", "mmio-rmw", Outcome::Crash("is not emulated for MMIO")),
    // Bochs' VMX reports the #DF we intercept before it escalates; QEMU's SVM goes
    // straight to shutdown. Either way the domain is stopped with the reason.
    ("triple", "triple-fault", Outcome::Crash("triple fault|double fault")),
];

#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The guest's own handler saw the injected exception and exited with this code.
    Exit(u64),
    /// The hypervisor stopped the domain with a reason containing one of these
    /// (separated by `|`).
    Crash(&'static str),
}

fn misbehaving(session: &mut Session, timeout: Duration) -> Result<String> {
    let done = |l: &SerialLog| {
        let d = parse_domains(&l.text());
        let finished = |n: &str| d.get(n).is_some_and(|d| d.exit.is_some() || d.crashed.is_some());
        MISBEHAVING.iter().all(|(n, _, _)| finished(n))
            && finished("good")
            // The flooding domain comes right after the misbehaving ones.
            && l.line(&format!("[dom{}] (console echo stopped", MISBEHAVING.len() + 1)).is_some()
    };
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let serial = session.serial();
    let log = SerialLog::new(&serial);
    let domains = parse_domains(&serial);
    if !matches!(wait, Wait::Matched(_)) {
        return Err(format!("not every misbehaving guest was dealt with within {} s ({wait:?})", timeout.as_secs()));
    }
    for (name, mode, want) in MISBEHAVING {
        let d = domains.get(*name).ok_or_else(|| format!("{name} never started"))?;
        match (want, d.exit, &d.crashed) {
            (Outcome::Exit(code), Some(got), None) if got == *code => {}
            (Outcome::Crash(texts), None, Some(line)) if texts.split('|').any(|t| line.contains(t)) => {}
            _ => {
                return Err(format!("{name} ({mode}): expected {want:?}, got exit {:?} crash {:?}", d.exit, d.crashed));
            }
        }
    }
    let good = &domains["good"];
    let sums: Vec<u64> = good.reports.iter().filter(|(k, _)| k == "checksum").map(|(_, v)| *v).collect();
    let want: Vec<u64> = (0..2).map(|r| guest_abi::memwriter::round_checksum(5, r, 128)).collect();
    if good.exit != Some(0) || sums != want {
        return Err(format!("the well-behaved domain did not finish correctly: exit {:?}, sums {sums:x?}", good.exit));
    }
    if let Some(l) = log.line("FAIL:").or(log.line("FATAL:")) {
        return Err(format!("the hypervisor failed: {l}"));
    }
    if domains["flood"].crashed.is_some() || domains["flood"].exit.is_some() {
        return Err("the flooding guest should keep running (only its echo stops)".into());
    }
    Ok("#UD and #GP injected (3 guests' handlers exited 106/113/113), OOB write dropped and OOB read all ones (exits 20/21), \
        an unemulated MMIO add and a triple fault stopped with reasons, flood echo capped, the good domain finished correctly"
        .into())
}

/// Hostile guests that run beside a well-behaved memwriter: (name, command line, the
/// exit code the guest's own checks end with when the hypervisor did what
/// `misbehave.rs`'s table says). Each runs a bounded number of iterations.
const HOSTILE: &[(&str, &str, u64)] = &[
    ("storm", "mode=timer-storm ticks=5000", 30),
    ("garbage", "mode=garbage rounds=200 seed=7", 40),
    ("badvec", "mode=bad-vectors", 50),
    ("ipis", "mode=ipi-nowhere rounds=100", 60),
    ("nowhere", "mode=mmio-nowhere rounds=2000 seed=3", 70),
];
/// The timer storm's ticks (its `ticks=` above).
const STORM_TICKS: u64 = 5000;
/// The memwriter beside them: pages, rounds, seed.
const HOSTILE_WRITER: (u64, u64, u64) = (64, 3, 9);

/// Hostile guests are contained: each gets exactly the answers the platform defines
/// (its exit code), the minimum-period LAPIC timer is held to 100 µs and does not
/// starve the memwriter (which finishes, correct, while the storm still runs), and the
/// hypervisor outlives them all (no FAIL/FATAL line, then its idle power-off).
/// Scenarios that need a multiple of the platform's default timeout: the hostile guests
/// took 163 s of Bochs' 180 s on a loaded machine (its spins are bounded by the PM timer,
/// and Bochs is slow at port I/O), so a busier CI host would time out a passing run.
const SLOW_SCENARIOS: &[(&str, u64)] = &[("domains-hostile-contained", 3)];

fn hostile(session: &mut Session, timeout: Duration) -> Result<String> {
    let names = || HOSTILE.iter().map(|(n, _, _)| *n).chain(["good"]);
    let done = |l: &SerialLog| {
        let d = parse_domains(&l.text());
        names().all(|n| d.get(n).is_some_and(|d| d.exit.is_some() || d.crashed.is_some()))
    };
    let start = Instant::now();
    let wait = session.wait_until(timeout, &mut Echo::new(false), |l| done(l) && l.outcome().is_some());
    let serial = session.serial();
    let log = SerialLog::new(&serial);
    let domains = parse_domains(&serial);
    if !done(&log) {
        return Err(format!("not every hostile guest ended within {} s ({wait:?})", timeout.as_secs()));
    }
    let mut wrong = Vec::new();
    for (name, cmdline, code) in HOSTILE {
        let d = &domains[*name];
        if d.exit != Some(*code) {
            wrong.push(format!(
                "{name} ({cmdline}): exit {:?}, crash {:?}, expected exit {code}; reports {:?}",
                d.exit, d.crashed, d.reports
            ));
        }
    }
    let (pages, rounds, seed) = HOSTILE_WRITER;
    let good = &domains["good"];
    let sums: Vec<u64> = good.reports.iter().filter(|(k, _)| k == "checksum").map(|(_, v)| *v).collect();
    let want: Vec<u64> = (0..rounds).map(|r| guest_abi::memwriter::round_checksum(seed, r, pages)).collect();
    if good.exit != Some(0) || sums != want {
        wrong.push(format!(
            "the memwriter did not finish correctly: exit {:?}, crash {:?}, sums {sums:x?}, expected {want:x?}",
            good.exit, good.crashed
        ));
    }
    let get = |n: &str, k: &str| domains[n].reports.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
    // The storm's ticks came no faster than the 100 µs floor (TSC time).
    let tsc_khz: u64 = clean(&serial)
        .lines()
        .find_map(|l| l.split_once("TSC ")?.1.split_once(" kHz")?.0.trim().parse().ok())
        .ok_or("the hypervisor printed no TSC frequency")?;
    let storm_us = get("storm", "tsc").unwrap_or(0) * 1000 / tsc_khz.max(1);
    // The guest stops counting at STORM_TICKS, but ticks already pending when it masks
    // its timer (it may have lost the CPU to another domain in between) still arrive:
    // at least STORM_TICKS, and the floor applies to however many it counted.
    let ticks = get("storm", "ticks").unwrap_or(0);
    let floor_us = ticks * hv::devices::lapic::MIN_PERIODIC_NS / 1000;
    if ticks < STORM_TICKS || storm_us * 10 < floor_us * 9 {
        wrong.push(format!(
            "the timer storm took {:?} ticks in {storm_us} µs; {STORM_TICKS} ticks at the floor take at least {floor_us} µs",
            get("storm", "ticks")
        ));
    }
    // No starvation: the memwriter ended while the storm was still taking interrupts.
    let text = clean(&serial);
    let exit_line = |n: &str| {
        let id = text.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 3 && w[0] == "DOMAIN" && w[2] == "CREATED" && w[3] == format!("name={n}"))
                .then(|| w[1].to_string())
        })?;
        text.lines().position(|l| l.trim_start().starts_with(&format!("DOMAIN {id} EXIT ")))
    };
    match (exit_line("good"), exit_line("storm")) {
        (Some(g), Some(s)) if g < s => {}
        other => wrong.push(format!("the memwriter did not end before the timer storm (log lines {other:?})")),
    }
    if get("badvec", "esr").is_none_or(|e| e & (1 << 6) == 0) {
        wrong.push(format!("bad-vectors: ESR {:?} lacks Receive Illegal Vector", get("badvec", "esr")));
    }
    if let Some(l) = log.line("FAIL:").or(log.line("FATAL:")) {
        wrong.push(format!("the hypervisor failed: {l}"));
    }
    if log.line("IDLE: nothing left to run").is_none() {
        wrong.push(format!("the hypervisor did not reach its idle power-off: {}", log.outcome_summary()));
    }
    if !wrong.is_empty() {
        return Err(wrong.join("\n  - "));
    }
    Ok(format!(
        "{} hostile guests ended as defined (exits 30/40/50/60/70): storm {STORM_TICKS} ticks in {storm_us} µs (floor {floor_us}), \
         garbage {} #GP skipped, bad vectors ESR {:#x} and {} good ticks, IPIs to self {:?}/all {:?}/nowhere {:?}, \
         unclaimed MMIO all ones ({:?} bad); memwriter {rounds} x {pages} pages correct before the storm ended; {:.1} s",
        HOSTILE.len(),
        get("garbage", "gp").unwrap_or(0),
        get("badvec", "esr").unwrap_or(0),
        get("badvec", "good").unwrap_or(0),
        get("ipis", "self"),
        get("ipis", "all"),
        get("ipis", "nowhere"),
        get("nowhere", "bad"),
        start.elapsed().as_secs_f64()
    ))
}

/// The LAPIC timer guests: (name, ticks, period in µs). Two at once, so each sleeps in
/// HLT while the other runs or sleeps too.
const TIMERS: &[(&str, u64, u64)] = &[("t1ms", 20, 1000), ("t5ms", 8, 5000)];

fn lapic_timer(session: &mut Session, timeout: Duration) -> Result<String> {
    let done = |l: &SerialLog| {
        let d = parse_domains(&l.text());
        TIMERS.iter().all(|(n, _, _)| d.get(*n).is_some_and(|d| d.exit.is_some() || d.crashed.is_some()))
    };
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let serial = session.serial();
    // Without a control channel (Bochs) the hypervisor powers off once both finished.
    if !matches!(wait, Wait::Matched(_)) && !done(&SerialLog::new(&serial)) {
        return Err(format!("the timer guests did not finish within {} s ({wait:?})", timeout.as_secs()));
    }
    let text = clean(&serial);
    let tsc_khz: u64 = text
        .lines()
        .find_map(|l| l.split_once("TSC ")?.1.split_once(" kHz")?.0.trim().parse().ok())
        .ok_or("the hypervisor printed no TSC frequency")?;
    let domains = parse_domains(&serial);
    let mut out = Vec::new();
    for (name, ticks, period_us) in TIMERS {
        let d = &domains[*name];
        let get = |k: &str| d.reports.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
        // Exactly the ticks it waited for: its handler returns with IF clear, so each
        // `sti; hlt` takes one interrupt even when a lagging vCPU has the next tick
        // pending (guests/kernels/src/bin/apictimer.rs).
        let got = get("ticks").unwrap_or(0);
        if d.exit != Some(0) || got != *ticks {
            return Err(format!(
                "{name}: exit {:?} (crash {:?}), ticks {:?}, expected {ticks}",
                d.exit,
                d.crashed,
                get("ticks")
            ));
        }
        // Each HLT returns on an interrupt: a vCPU that HLT did not put to sleep would
        // come back thousands of times between ticks.
        let wakeups = get("wakeups").unwrap_or(u64::MAX);
        if wakeups > ticks + 2 {
            return Err(format!("{name}: HLT returned {wakeups} times for {ticks} interrupts: the vCPU did not sleep"));
        }
        // The ticks came no faster than programmed (TSC time; the timer may be late
        // under emulation, never early).
        let elapsed_us = get("tsc").unwrap_or(0) * 1000 / tsc_khz.max(1);
        let want_us = got * period_us;
        if elapsed_us * 10 < want_us * 9 {
            return Err(format!("{name}: {got} ticks of {period_us} µs took {elapsed_us} µs of TSC time"));
        }
        out.push(format!("{name}: {got} ticks, {wakeups} wakeups, {elapsed_us} µs for {want_us} µs"));
    }
    Ok(out.join("; "))
}

/// The FPU-state guests: (name, seed, CPUID policy). Two at once, each filling its
/// vector, x87 and MXCSR registers, yielding to the other, and reading them back; the
/// second runs without AVX (XCR0 = 3), so the switch also crosses different XCR0s.
const FPU_GUESTS: &[(&str, u64, &str)] = &[("fpu1", 1, "base=host-max"), ("fpu2", 2, "base=host-max,-avx")];
const FPU_ROUNDS: u64 = 20;

fn fpu_state(session: &mut Session, timeout: Duration) -> Result<String> {
    let done = |l: &SerialLog| {
        let d = parse_domains(&l.text());
        FPU_GUESTS.iter().all(|(n, _, _)| d.get(*n).is_some_and(|d| d.exit.is_some() || d.crashed.is_some()))
    };
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let serial = session.serial();
    if !matches!(wait, Wait::Matched(_)) && !done(&SerialLog::new(&serial)) {
        return Err(format!("the FPU guests did not finish within {} s ({wait:?})", timeout.as_secs()));
    }
    let domains = parse_domains(&serial);
    // QEMU 7.2's TCG does not implement the SVM XSETBV intercept (APM Vol. 2 15.9,
    // vector 4 bit 13): a guest's XSETBV goes straight to the emulated CPU, which
    // refuses only what the CPU itself cannot do; the hypervisor sees the new XCR0
    // after the next exit (`arch::fpu`) and keeps switching it. Bochs' VMX always
    // exits (reason 55), so there the policy's refusal is seen too.
    let intercepted = clean(&serial).contains("virt=vmx");
    let mut out = Vec::new();
    for (name, _, _) in FPU_GUESTS {
        let d = &domains[*name];
        let get = |k: &str| d.reports.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
        let (xcr0, width, gp, rounds, bad) = (get("xcr0"), get("width"), get("gp"), get("rounds"), get("bad"));
        if d.exit != Some(0) || bad != Some(0) || rounds != Some(FPU_ROUNDS) {
            return Err(format!(
                "{name}: exit {:?} (crash {:?}), {bad:?} registers changed in {rounds:?} rounds (xcr0 {xcr0:?}, width {width:?}, #GP {gp:?})",
                d.exit, d.crashed
            ));
        }
        let xcr0 = xcr0.unwrap_or(0);
        // The policy offers XSAVE on both emulators: AVX without SSE faulted, and where
        // the policy has no AVX, enabling AVX faulted too (the hypervisor's intercept:
        // both CPUs have AVX, so only the policy check refuses it).
        let want_gp = 1 + u64::from(xcr0 & 4 == 0 && intercepted);
        if xcr0 & 3 != 3 || gp != Some(want_gp) {
            return Err(format!(
                "{name}: XCR0 {xcr0:#x}, {gp:?} #GP for the refused XSETBVs (want x87|SSE, {want_gp})"
            ));
        }
        if *name == "fpu2" && xcr0 != 3 {
            return Err(format!("fpu2 (no AVX in its policy) set XCR0 {xcr0:#x}, not 3"));
        }
        out.push(format!(
            "{name}: XCR0 {xcr0:#x}, {want_gp} XSETBV refused, {}-byte registers x {FPU_ROUNDS} rounds intact",
            width.unwrap_or(0)
        ));
    }
    Ok(out.join("; "))
}

/// What the xapic-mmio guest must read through MMIO exits (see its module doc).
const XAPIC_MMIO: &[(&str, u64)] = &[
    ("base", 0xfee0_0900),
    ("id", 0),
    ("version", 0x5_0014),
    ("verbyte", 0x14),
    ("verword", 0x5),
    ("verhigh", 0x1122_3344_5566_1488),
    ("tpr", 0x20),
    ("tprreg", 0x30),
    ("none64", u64::MAX),
    ("nonesx", 0xffff_ffff),
];

/// The xAPIC through MMIO: every register read and write of the guest is a nested
/// page fault that the hypervisor decodes (several MOV/MOVZX/MOVSX forms, the AH
/// high-byte register) and emulates; an unclaimed page reads all ones.
fn xapic_mmio(session: &mut Session, timeout: Duration) -> Result<String> {
    let done =
        |l: &SerialLog| parse_domains(&l.text()).get("xapic").is_some_and(|d| d.exit.is_some() || d.crashed.is_some());
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let serial = session.serial();
    if !matches!(wait, Wait::Matched(_)) && !done(&SerialLog::new(&serial)) {
        return Err(format!("the xapic-mmio guest did not finish within {} s ({wait:?})", timeout.as_secs()));
    }
    let domains = parse_domains(&serial);
    let d = &domains["xapic"];
    let mut wrong = Vec::new();
    for (name, want) in XAPIC_MMIO {
        let got = d.reports.iter().find(|(t, _)| t == name).map(|(_, v)| *v);
        if got != Some(*want) {
            wrong.push(format!("{name}: {got:x?}, expected {want:#x}"));
        }
    }
    if d.exit != Some(0) || !wrong.is_empty() {
        return Err(format!("xapic: exit {:?} (crash {:?}); {}", d.exit, d.crashed, wrong.join("; ")));
    }
    Ok(format!("{} values read and written through MMIO exits, all as expected", XAPIC_MMIO.len()))
}

/// The multiboot guest's command line, which it prints back.
const MULTIBOOT_CMDLINE: &str = "mb-check=42 hello";

/// LAPIC timer interrupts the multiboot kernel waits for (its `TICKS`).
const MULTIBOOT_TICKS: u64 = 10;

/// What the multiboot kernel's exit codes mean ((v << 1) | 1 for its check v).
fn multiboot_verdict(code: Option<u64>) -> &'static str {
    match code.map(|c| c >> 1) {
        Some(0x21) => "every check passed",
        Some(1) => "EAX is not the multiboot magic",
        Some(2) => "the information's flags lack memory, cmdline or mmap",
        Some(3) => "mem_upper is 0",
        Some(4) => "CR0 is not protected mode with paging off",
        Some(5) => "CS is not the 32-bit code segment 0x08",
        Some(6) => "the LAPIC timer never fired",
        Some(7) => "the LAPIC timer fired once only (no periodic reload, or the EOI did not take)",
        Some(8) => "an interrupt or exception came on a vector other than the timer's",
        Some(_) => "an exit code the kernel does not use",
        None => "no exit",
    }
}

/// The multiboot kernel (guests/kernels/src/bin/multiboot.rs) boots in 32-bit protected
/// mode with paging off, finds the loader's magic and information, prints its command
/// line through the information's pointer, takes LAPIC timer interrupts through a
/// 32-bit IDT with the xAPIC programmed and acknowledged through MMIO, and exits
/// through port 0xF4 with 0x21.
fn multiboot(session: &mut Session, timeout: Duration) -> Result<String> {
    let done =
        |l: &SerialLog| parse_domains(&l.text()).get("mb").is_some_and(|d| d.exit.is_some() || d.crashed.is_some());
    let wait = session.wait_until(timeout, &mut Echo::new(false), done);
    let serial = session.serial();
    if !done(&SerialLog::new(&serial)) {
        return Err(format!("the multiboot guest did not finish within {} s ({wait:?})", timeout.as_secs()));
    }
    let text = clean(&serial);
    let created = text.lines().find(|l| l.contains("CREATED name=mb")).unwrap_or("");
    if !created.contains("format=multiboot") {
        return Err(format!("the kernel was not loaded as multiboot: `{created}`"));
    }
    let d = &parse_domains(&serial)["mb"];
    if d.exit != Some(0x43) {
        return Err(format!(
            "exit code {:?}: {} (crash {:?}); 67 means every check passed",
            d.exit,
            multiboot_verdict(d.exit),
            d.crashed
        ));
    }
    let want = format!("multiboot: 32-bit protected mode, paging off; cmdline: {MULTIBOOT_CMDLINE}");
    if !text.lines().any(|l| l.starts_with("[dom") && l.ends_with(&want)) {
        return Err(format!("no console line `{want}`"));
    }
    let timer = text
        .lines()
        .find_map(|l| l.split_once("multiboot: LAPIC timer: ").map(|(_, r)| r))
        .ok_or("no `multiboot: LAPIC timer:` console line")?;
    let (ticks, wakeups) = parse_timer_line(timer).ok_or_else(|| format!("cannot read the timer line `{timer}`"))?;
    if ticks != MULTIBOOT_TICKS {
        return Err(format!("{ticks} timer interrupts counted, expected {MULTIBOOT_TICKS}"));
    }
    // Two ticks come in the spin before the HLT loop; each HLT after that should end on
    // one tick (a few more if a slice ended in between), not return at once thousands
    // of times.
    if wakeups == 0 || wakeups > MULTIBOOT_TICKS + 2 {
        return Err(format!("HLT returned {wakeups} times for {} interrupts: the vCPU did not sleep", ticks - 2));
    }
    Ok(format!(
        "EAX magic, info flags, mem_upper, CR0 (PE, no PG), CS 0x08 checked; the cmdline came through; \
         {ticks} LAPIC timer interrupts via a 32-bit IDT and xAPIC MMIO EOIs, {wakeups} HLT wakeups; exit 67"
    ))
}

/// `0000000a interrupts, 00000008 wakeups` → (10, 8).
fn parse_timer_line(s: &str) -> Option<(u64, u64)> {
    let mut words = s.split_whitespace();
    let ticks = u64::from_str_radix(words.next()?, 16).ok()?;
    (words.next()? == "interrupts,").then_some(())?;
    let wakeups = u64::from_str_radix(words.next()?, 16).ok()?;
    (words.next()? == "wakeups").then_some((ticks, wakeups))
}

/// Log-dirty modes by guest_abi number, and whether each platform has them.
const DIRTY_MODES: &[(&str, u64)] = &[("pml", 1), ("dbit", 2), ("wp", 3)];

fn dirty_exact(session: &mut Session, timeout: Duration) -> Result<String> {
    let wait = session.wait_until(timeout, &mut Echo::new(false), |l| l.outcome().is_some());
    if wait == Wait::TimedOut {
        return Err(format!("no power-off within {} s", timeout.as_secs()));
    }
    let serial = session.serial();
    let bochs = clean(&serial).contains("virt=vmx");
    let domains = parse_domains(&serial);
    let mut summary = Vec::new();
    for (mode, number) in DIRTY_MODES {
        let name = format!("d{mode}");
        let d = domains.get(&name).ok_or_else(|| format!("{name} never started"))?;
        let get = |k: &str| d.reports.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
        if *mode == "pml" && !bochs {
            // QEMU has no VMX, so no PML: refused with the reason, never faked.
            if d.exit != Some(3) || !clean(&serial).contains("not available: PML") {
                return Err(format!("pml on SVM should be refused with the reason: exit {:?}", d.exit));
            }
            summary.push("pml refused (no VMX)".to_string());
            continue;
        }
        if let Some(c) = &d.crashed {
            return Err(format!("{name}: {c}"));
        }
        if get("mode") != Some(*number) || get("rounds") != Some(20) || get("mismatch") != Some(0) || d.exit != Some(0)
        {
            return Err(format!("{name}: reports {:?}, exit {:?}", d.reports, d.exit));
        }
        if get("hv_mark") != Some(20) {
            return Err(format!(
                "{name}: the hypervisor's own writes were not marked dirty in every round: {:?}",
                get("hv_mark")
            ));
        }
        summary.push(format!(
            "{mode}: 20 rounds exact, hypervisor writes marked, {} other pages (stack)",
            get("others").unwrap_or(0)
        ));
    }
    // 2 MiB nested mappings were split when logging started and merged back at stop.
    let text = clean(&serial);
    let numbers = |marker: &str, key: &str| -> Vec<u64> {
        text.lines()
            .filter(|l| l.contains(marker))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok()))
            .collect()
    };
    let (split, merged) = (numbers("DIRTY-START", "split_2m="), numbers("DIRTY-MERGE", "merged_2m="));
    if split.is_empty() || split.contains(&0) || split != merged {
        return Err(format!("2 MiB mappings: split {split:?} at start, merged {merged:?} at stop"));
    }
    summary.push(format!("2 MiB mappings split {split:?} and merged back {merged:?}"));
    Ok(summary.join("; "))
}

type Test = fn(&mut Session, Duration) -> Result<String>;

/// Run the domain scenarios on both emulators (those matching `filter`).
const LOCAL_PAGES: u64 = 64;
const LOCAL_ROUNDS: u64 = 1500;
const LOCAL_SEED: u64 = 3;
const LOCAL_CMDLINE: &str = "migrate-local=mw@50";

/// A writer migrated within one hypervisor (the boot option `migrate-local`) while it
/// writes: the same sessions, stream and vCPU save/load as between two hypervisors, so
/// the VMX backend's state save and load run too (Bochs has no vsock for two instances).
/// Every round, before and after, must read back exactly what it wrote, in sequence.
fn local_migration(session: &mut Session, timeout: Duration) -> Result<String> {
    let wait = session.wait_until(timeout, &mut Echo::new(false), |l| l.outcome().is_some());
    if wait == Wait::TimedOut {
        return Err(format!("no power-off within {} s", timeout.as_secs()));
    }
    let serial = session.serial();
    let log = SerialLog::new(&serial);
    let done = log
        .line("MIGRATE-LOCAL DONE")
        .ok_or_else(|| format!("no MIGRATE-LOCAL DONE; {:?}", log.line("MIGRATE-LOCAL FAILED")))?
        .to_string();
    let field = |k: &str| {
        done.split_whitespace().find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or("?")
    };
    if field("digest") != field("destination_digest") || field("digest") == "0x0" {
        return Err(format!("memory at pause differs: {done}"));
    }
    if field("from") == field("to") {
        return Err(format!("the domain did not move: {done}"));
    }
    let d = parse_domains(&serial);
    let mw = d.get("mw").ok_or("domain mw never started")?;
    if let Some(c) = &mw.crashed {
        return Err(c.clone());
    }
    if mw.exit != Some(0) {
        return Err(format!("the migrated writer did not exit with 0 ({:?})", mw.exit));
    }
    let rounds: Vec<u64> = mw.reports.iter().filter(|(k, _)| k == "round").map(|(_, v)| *v).collect();
    let sums: Vec<u64> = mw.reports.iter().filter(|(k, _)| k == "checksum").map(|(_, v)| *v).collect();
    let want_rounds: Vec<u64> = (0..LOCAL_ROUNDS).collect();
    if rounds != want_rounds {
        return Err(format!("rounds not 0..{LOCAL_ROUNDS} in sequence: {rounds:?}"));
    }
    for (r, got) in sums.iter().enumerate() {
        let want = guest_abi::memwriter::round_checksum(LOCAL_SEED, r as u64, LOCAL_PAGES);
        if *got != want {
            return Err(format!("round {r} read back {got:#x}, expected {want:#x}"));
        }
    }
    if sums.len() as u64 != LOCAL_ROUNDS {
        return Err(format!("{} checksums for {LOCAL_ROUNDS} rounds", sums.len()));
    }
    Ok(format!(
        "domain {} -> {} at round 50; {LOCAL_ROUNDS} rounds in sequence, all read back right; {} dirty rounds, {} pages \
         ({} resent), downtime {} ms, digests equal",
        field("from"),
        field("to"),
        field("rounds"),
        field("pages"),
        field("resent"),
        field("downtime_ms")
    ))
}

pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let cpuid_cfg: String =
        POLICIES.iter().map(|(n, p)| format!("name={n} kernel=cpuid-probe.elf memory=8M cpuid={p}\n")).collect();
    let mut writers_cfg: String = WRITERS
        .iter()
        .map(|(n, seed)| {
            format!("name={n} kernel=memwriter.elf memory=24M cmdline=pages={PAGES} rounds={ROUNDS} seed={seed}\n")
        })
        .collect();
    writers_cfg.push_str("name=spin kernel=spinner.elf memory=8M\n");
    let mut bad_cfg: String = MISBEHAVING
        .iter()
        .map(|(n, mode, _)| format!("name={n} kernel=misbehave.elf memory=4M cmdline=mode={mode}\n"))
        .collect();
    bad_cfg.push_str("name=flood kernel=misbehave.elf memory=4M cmdline=mode=flood\n");
    bad_cfg.push_str("name=good kernel=memwriter.elf memory=24M cmdline=pages=128 rounds=2 seed=5\n");
    let dirty_cfg: String = DIRTY_MODES
        .iter()
        .map(|(m, n)| format!("name=d{m} kernel=dirtytest.elf memory=8M cmdline=mode={n} rounds=20 pages=256\n"))
        .collect();
    let local_cfg = format!(
        "name=mw kernel=memwriter.elf memory=8M cmdline=pages={LOCAL_PAGES} rounds={LOCAL_ROUNDS} seed={LOCAL_SEED} \
         base=0x300000\n"
    );
    let timer_cfg: String = TIMERS
        .iter()
        .map(|(n, t, p)| format!("name={n} kernel=apictimer.elf memory=8M cmdline=ticks={t} period_us={p}\n"))
        .collect();
    let fpu_cfg: String = FPU_GUESTS
        .iter()
        .map(|(n, seed, policy)| {
            format!("name={n} kernel=fpustate.elf memory=8M cpuid={policy} cmdline=seed={seed} rounds={FPU_ROUNDS}\n")
        })
        .collect();
    let platforms = [Platform::Qemu { cpu: "EPYC".into() }, Platform::Bochs { model: "corei7_skylake_x".into() }];
    let mmio_cfg = String::from("name=xapic kernel=xapic-mmio.elf memory=8M\n");
    let multiboot_cfg = format!("name=mb kernel=multiboot.elf memory=8M cmdline={MULTIBOOT_CMDLINE}\n");
    let mut hostile_cfg: String = HOSTILE
        .iter()
        .map(|(n, cmdline, _)| format!("name={n} kernel=misbehave.elf memory=4M cmdline={cmdline}\n"))
        .collect();
    let (pages, rounds, seed) = HOSTILE_WRITER;
    hostile_cfg.push_str(&format!(
        "name=good kernel=memwriter.elf memory=24M cmdline=pages={pages} rounds={rounds} seed={seed}\n"
    ));
    let scenarios: [(&str, String, &str, Test); 10] = [
        ("domains-cpuid-policies", cpuid_cfg, "cpuid-dump", cpuid_policies),
        ("domains-concurrent-writers-and-spinner", writers_cfg, "", concurrent),
        ("domains-misbehaving-guests-contained", bad_cfg, "", misbehaving),
        ("domains-hostile-contained", hostile_cfg, "", hostile),
        ("dirty-logging-exact-every-mode", dirty_cfg, "", dirty_exact),
        ("domains-local-migration-while-writing", local_cfg, LOCAL_CMDLINE, local_migration),
        ("domains-lapic-timer-interrupts", timer_cfg, "", lapic_timer),
        ("domains-fpu-state-isolated", fpu_cfg, "", fpu_state),
        ("domains-xapic-mmio", mmio_cfg, "", xapic_mmio),
        ("domains-multiboot-protected-mode", multiboot_cfg, "", multiboot),
    ];
    let mut jobs: Vec<(Platform, String, String, &str, Test)> = Vec::new();
    for platform in &platforms {
        let prefix = match platform {
            Platform::Qemu { .. } => "qemu",
            Platform::Bochs { .. } => "bochs",
        };
        for (name, cfg, cmdline, test) in &scenarios {
            jobs.push((platform.clone(), format!("{prefix}-{name}"), cfg.clone(), cmdline, *test));
        }
    }
    // Hygon (HygonGenuine, family 0x18): QEMU's Dhyana model has SVM and NPT, and
    // levelling treats it as AMD-compatible; the same policies, checked leaf by leaf.
    jobs.push((
        Platform::Qemu { cpu: "Dhyana".into() },
        String::from("qemu-dhyana-domains-cpuid-policies"),
        scenarios[0].1.clone(),
        "cpuid-dump",
        cpuid_policies_hygon,
    ));
    let (mut passed, mut failed) = (0, 0);
    for (platform, full, cfg, cmdline, test) in &jobs {
        if !filter.is_none_or(|f| full.contains(f)) {
            continue;
        }
        tools::ensure(platform)?;
        let factor = SLOW_SCENARIOS.iter().find(|(n, _)| full.ends_with(n)).map_or(1, |&(_, f)| f);
        let timeout = Duration::from_secs(platform.default_timeout_secs() * factor);
        let config = RunConfig {
            name: full.clone(),
            timeout,
            cmdline: (*cmdline).into(),
            echo: false,
            vsock: false,
            domains: Some(cfg.clone()),
        };
        println!("systest {full} on {platform} ...");
        let mut session = Session::spawn(platform, esp, &config)?;
        let result = test(&mut session, timeout);
        session.stop();
        match result {
            Ok(detail) => {
                passed += 1;
                println!("systest {full} ... ok ({detail})");
            }
            Err(e) => {
                failed += 1;
                println!("systest {full} ... FAILED\n  - {e}");
                println!(
                    "---- serial log of {full} ({}) ----\n{}\n---- end of serial log ----",
                    session.dir.display(),
                    clean(&session.serial())
                );
            }
        }
    }
    Ok((passed, failed))
}

/// `cargo xtask bench exits`: a guest executes CPUID `loops` times (each one a full
/// exit, emulation from the domain's policy table and re-entry); exits per second from
/// the guest's own TSC delta and the hypervisor's TSC frequency, on each emulator.
pub fn bench_exits(loops: usize) -> Result<()> {
    let esp = crate::image::build(true)?;
    for platform in [Platform::Qemu { cpu: "EPYC".into() }, Platform::Bochs { model: "corei7_skylake_x".into() }] {
        tools::ensure(&platform)?;
        let config = RunConfig {
            name: "bench-exits".into(),
            timeout: Duration::from_secs(platform.default_timeout_secs() * 2),
            cmdline: String::new(),
            echo: false,
            vsock: false,
            domains: Some(format!("name=loop kernel=cpuid-probe.elf memory=8M cmdline=loop={loops}\n")),
        };
        let mut session = Session::spawn(&platform, &esp, &config)?;
        let wait = session.wait_until(config.timeout, &mut Echo::new(false), |l| l.outcome().is_some());
        let serial = session.serial();
        session.stop();
        if wait == Wait::TimedOut {
            return Err(format!("{platform}: the loop did not finish within {} s", config.timeout.as_secs()));
        }
        let d = parse_domains(&serial);
        let cycles = d.get("loop").and_then(|d| d.reports.iter().find(|(k, _)| k == "cycles")).map(|(_, v)| *v);
        let khz = clean(&serial).lines().find_map(|l| {
            l.split("TSC ").nth(1).and_then(|r| r.split(" kHz").next()).and_then(|n| n.trim().parse::<u64>().ok())
        });
        match (cycles, khz) {
            (Some(c), Some(k)) if c > 0 && k > 0 => {
                let secs = c as f64 / (k as f64 * 1000.0);
                println!(
                    "{platform}: {loops} CPUID exits in {:.3} s of guest time: {:.0} exits/s ({:.1} µs per exit)",
                    secs,
                    loops as f64 / secs,
                    secs * 1e6 / loops as f64
                );
            }
            _ => return Err(format!("{platform}: no cycles report or TSC frequency in the log:\n{}", clean(&serial))),
        }
    }
    Ok(())
}

/// `cargo xtask bench dirty`: the same guest writes `pages` fresh pages with logging
/// off and then on, once per mode; VM exits per 1,000 newly dirtied pages and the write
/// pass's speed relative to logging off (guest TSC), side by side. The guest then
/// peeks-and-cleans once and writes the pages again, and the hypervisor's own cost per
/// page of draining PML buffers into the logs and of re-arming reported pages is read
/// from the `DIRTY-STOP` line (its TSC: emulated instructions under Bochs).
pub fn bench_dirty(pages: usize) -> Result<()> {
    let esp = crate::image::build(true)?;
    let platform = Platform::Bochs { model: "corei7_skylake_x".into() };
    tools::ensure(&platform)?;
    let cfg: String = DIRTY_MODES
        .iter()
        .map(|(m, n)| format!("name=b{m} kernel=dirtytest.elf memory=24M cmdline=mode={n} bench={pages}\n"))
        .collect();
    let config = RunConfig {
        name: "bench-dirty".into(),
        timeout: Duration::from_secs(platform.default_timeout_secs() * 2),
        cmdline: String::new(),
        echo: false,
        vsock: false,
        domains: Some(cfg),
    };
    let mut session = Session::spawn(&platform, &esp, &config)?;
    let wait = session.wait_until(config.timeout, &mut Echo::new(false), |l| l.outcome().is_some());
    let serial = clean(&session.serial());
    session.stop();
    if wait == Wait::TimedOut {
        return Err(format!("the benchmark did not finish within {} s", config.timeout.as_secs()));
    }
    let domains = parse_domains(&serial);
    println!("{platform}, {pages} newly dirtied pages per mode (write pass timed in the guest's TSC; Bochs counts");
    println!("one tick per emulated instruction, the hypervisor's exit handling included, so the ratio is a");
    println!("worst case for tiny write passes, not a hardware figure):");
    println!("  {:<5} {:>14} {:>16} {:>22}", "mode", "logging exits", "exits/1000 pages", "write pass vs off");
    let mut costs = Vec::new();
    for (mode, _) in DIRTY_MODES {
        let name = format!("b{mode}");
        let d = domains.get(&name).ok_or_else(|| format!("{name} did not run"))?;
        let get = |k: &str| d.reports.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
        let id_line = serial
            .lines()
            .find(|l| l.contains("DIRTY-STOP") && l.contains(&format!("mode={mode}")))
            .ok_or_else(|| format!("no DIRTY-STOP line for {mode}"))?;
        let field = |k: &str| {
            id_line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (dirtied, exits) = (field("pages_dirtied"), field("logging_exits"));
        let (off, on) = (get("off").unwrap_or(0), get("on").unwrap_or(0));
        println!(
            "  {:<5} {:>14} {:>16.2} {:>21.4}x",
            mode,
            exits,
            exits as f64 * 1000.0 / dirtied.max(1) as f64,
            off as f64 / on.max(1) as f64
        );
        costs.push((
            mode,
            field("drain_cycles"),
            field("drained_entries"),
            field("rearm_cycles"),
            field("rearmed_pages"),
        ));
    }
    println!("Hypervisor cost per logged page (its TSC around the work; under Bochs, emulated instructions):");
    println!(
        "  {:<5} {:>15} {:>16} {:>13} {:>16}",
        "mode", "drained entries", "drain cycles/pg", "re-armed pgs", "re-arm cycles/pg"
    );
    for (mode, drain, entries, rearm, rearmed) in costs {
        let per = |c: u64, n: u64| if n == 0 { "-".to_string() } else { format!("{:.1}", c as f64 / n as f64) };
        println!(
            "  {:<5} {:>15} {:>16} {:>13} {:>16}",
            mode,
            entries,
            per(drain, entries),
            rearmed,
            per(rearm, rearmed)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_fault_lines_give_the_feature_and_the_finding() {
        let log = "SMP 2 CPUs\nCPU-FAULT xsavec: it wrote X at offset 416, not 576 (SDM 13.4.3), so it is wrong; guests are not offered xsavec (they save with xsaveopt or xsave)\nCPU xsavec checked: fine\n";
        assert_eq!(
            super::cpu_faults(log),
            vec![("xsavec", "it wrote X at offset 416, not 576 (SDM 13.4.3), so it is wrong")]
        );
        assert!(super::cpu_faults("READY arch=svm\nCPU xsavec checked: it writes the compacted format\n").is_empty());
    }

    use super::*;

    #[test]
    fn the_multiboot_timer_line_is_read_in_hex() {
        assert_eq!(parse_timer_line("0000000a interrupts, 0000000c wakeups"), Some((10, 12)));
        assert_eq!(parse_timer_line("0000000a interrupts 0000000c wakeups"), None);
        assert_eq!(parse_timer_line("0000000a interrupts, zz wakeups"), None);
    }

    #[test]
    fn multiboot_exit_codes_are_explained() {
        assert_eq!(multiboot_verdict(Some(0x43)), "every check passed");
        assert_eq!(multiboot_verdict(Some(13)), "the LAPIC timer never fired");
        assert_eq!(multiboot_verdict(None), "no exit");
    }
}
