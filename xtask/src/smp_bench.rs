//! `cargo xtask bench smp [--runs N] [--writers N] [--json]`: what the hypervisor's
//! use of more than one physical CPU buys memory-bound guests (issue 16).
//!
//! Each run boots the image three times on QEMU TCG `-cpu EPYC` with N memwriter
//! domains in DOMAINS.CFG ([`Writers::domains_cfg`]), N = `--writers` (default 2),
//! so they are created together at boot and run concurrently:
//!
//! 1. `-smp N` (multi-threaded TCG: one host thread per emulated CPU), every CPU started;
//! 2. `-smp N` with the boot option `smp=off`: the same emulated machine, the
//!    hypervisor told to use its boot CPU only: the goal's baseline;
//! 3. `-smp 1`: a control. The CPUs `smp=off` leaves in the firmware's hands are still
//!    emulated, and here (QEMU 7.2 TCG, Debian's OVMF) their host thread was measured
//!    busy during the window, taking host time from the one CPU that works, so the
//!    `smp=off` baseline alone overstates what SMP buys.
//!
//! A boot's rate is all the pages the writers wrote (N × pages × rounds) over the time
//! from the moment the last of them had started (its console's `memwriter:` line) to
//! the moment the last of them had ended (the hypervisor's `DOMAIN n EXIT` line):
//! boot, firmware and domain creation are outside it. Times are first sightings of
//! those lines in the serial log, polled every 50 ms (the serial port reaches us as
//! the hypervisor writes it; the guests carry no clock of their own), against a window
//! of 5-10 s here. For each boot the bench also reports how many host cores each
//! emulator thread kept busy over the window (/proc/PID/task/*/stat).
//!
//! Every writer's checksums are checked against [`guest_abi::memwriter`] (a wrong
//! result is an error, not a number), and the `SMP cpus=…` marker must say that
//! all N CPUs started (or, with `smp=off`, only the boot CPU). The table gives both
//! rates and their ratio (N CPUs / one CPU), medians over `--runs` (default 3), the
//! APIC IDs the writers' vCPUs were placed on (the hypervisor's `DOMAIN <id> VCPU <v>
//! ON CPU apic=<A>` lines, none before vCPUs leave the boot CPU) and the goal, ≥ 1.7×
//! for 2 writers on a 2-core host; `--json` prints the same as JSON instead of the
//! table (progress goes to stderr either way). The report is also written to
//! target/xtask/runs/bench-smp.json. The goal counts as met only against both
//! baselines. It is not a correctness test:
//! `smp-qemu-two-memwriters-two-cpus` (host_smp_tests.rs) is, with the same helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::domain_tests::parse_domains;
use crate::emulator::{Echo, Platform, RunConfig, Session, Wait};
use crate::image::{self, Esp};
use crate::linux_bench::{load, median, runs_dir};
use crate::serial::{SerialLog, clean};
use crate::{Result, tools};

/// The goal: N-CPU rate / one-CPU rate, for 2 writers on a 2-core host.
const GOAL: f64 = 1.7;
/// Each bench writer rewrites this many pages (8 MiB) …
const PAGES: u64 = 2048;
/// … this many times (a window of 5-10 s; a run of three boots about 50 s here).
const ROUNDS: u64 = 400;
/// One boot, writers included, on a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// N memwriter domains created together at boot: `smpw0` … with seeds 100, 101, …
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writers {
    /// How many.
    pub count: u32,
    /// Pages each rewrites per round.
    pub pages: u64,
    /// Rounds each writes, reads back and reports.
    pub rounds: u64,
}

impl Writers {
    /// Writer `i`'s domain name.
    pub fn name(i: u32) -> String {
        format!("smpw{i}")
    }

    fn seed(i: u32) -> u64 {
        100 + u64::from(i)
    }

    /// Guest memory: the default base (16 MiB), the pages, the stack, rounded up to MiB.
    fn memory_mib(&self) -> u64 {
        16 + (self.pages * 4096).div_ceil(1 << 20) + 1
    }

    /// The DOMAINS.CFG lines (format in hv/src/domain/config.rs).
    pub fn domains_cfg(&self) -> String {
        (0..self.count)
            .map(|i| {
                format!(
                    "name={} kernel=memwriter.elf memory={}M cmdline=pages={} rounds={} seed={}\n",
                    Self::name(i),
                    self.memory_mib(),
                    self.pages,
                    self.rounds,
                    Self::seed(i)
                )
            })
            .collect()
    }

    /// Pages written by all of them together.
    fn total_pages(&self) -> u64 {
        u64::from(self.count) * self.pages * self.rounds
    }

    /// Every writer exited with 0 and reported the checksum of every round, each
    /// equal to what `guest_abi::memwriter` says its memory must have held.
    pub fn check_results(&self, serial: &str) -> Result<()> {
        let domains = parse_domains(serial);
        for i in 0..self.count {
            let name = Self::name(i);
            let d = domains.get(&name).ok_or_else(|| format!("writer {name} was never created"))?;
            if let Some(c) = &d.crashed {
                return Err(format!("writer {name}: {c}"));
            }
            if d.exit != Some(0) {
                return Err(format!("writer {name} did not exit with 0 ({:?})", d.exit));
            }
            let sums: Vec<u64> = d.reports.iter().filter(|(k, _)| k == "checksum").map(|(_, v)| *v).collect();
            if sums.len() as u64 != self.rounds {
                return Err(format!("writer {name} reported {} checksums for {} rounds", sums.len(), self.rounds));
            }
            for (round, got) in (0..).zip(&sums) {
                let want = guest_abi::memwriter::round_checksum(Self::seed(i), round, self.pages);
                if *got != want {
                    return Err(format!("writer {name}, round {round}: checksum {got:#x}, expected {want:#x}"));
                }
            }
        }
        Ok(())
    }

    /// When (at `T`, a time or a line number) each writer started, its console's
    /// `memwriter:` line, and ended, its `DOMAIN n EXIT`/`CRASHED` line, in writer
    /// order; an error naming the first writer that lacks either.
    pub fn spans<'a, T: Copy>(&self, lines: impl IntoIterator<Item = (T, &'a str)>) -> Result<Vec<(T, T)>> {
        let mut ids: BTreeMap<u32, u32> = BTreeMap::new();
        let mut started: BTreeMap<u32, T> = BTreeMap::new();
        let mut ended: BTreeMap<u32, T> = BTreeMap::new();
        for (at, line) in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["DOMAIN", id, "CREATED", name, ..] => {
                    let writer = (0..self.count).find(|&i| name.strip_prefix("name=") == Some(&Self::name(i)));
                    if let (Ok(id), Some(i)) = (id.parse(), writer) {
                        ids.insert(id, i);
                    }
                }
                ["DOMAIN", id, "EXIT" | "CRASHED", ..] => {
                    if let Some(i) = id.parse().ok().and_then(|id| ids.get(&id)) {
                        ended.entry(*i).or_insert(at);
                    }
                }
                [tag, "memwriter:", ..] => {
                    let id = tag.strip_prefix("[dom").and_then(|t| t.strip_suffix(']')).and_then(|t| t.parse().ok());
                    if let Some(i) = id.and_then(|id| ids.get(&id)) {
                        started.entry(*i).or_insert(at);
                    }
                }
                _ => {}
            }
        }
        (0..self.count)
            .map(|i| match (started.get(&i), ended.get(&i)) {
                (Some(s), Some(e)) => Ok((*s, *e)),
                (None, _) => Err(format!("writer {} never started (no `memwriter:` console line)", Self::name(i))),
                (Some(_), None) => Err(format!("writer {} never ended", Self::name(i))),
            })
            .collect()
    }
}

/// The APIC IDs each domain's vCPUs were placed on, by domain id: the hypervisor's
/// `DOMAIN <id> VCPU <v> ON CPU apic=<A>` lines (the first time a vCPU runs on a CPU).
pub fn placements(serial: &str) -> BTreeMap<u32, BTreeSet<u32>> {
    let mut by_domain: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for line in clean(serial).lines() {
        if let ["DOMAIN", id, "VCPU", _, "ON", "CPU", apic] = line.split_whitespace().collect::<Vec<_>>().as_slice()
            && let (Ok(id), Some(Ok(apic))) = (id.parse(), apic.strip_prefix("apic=").map(str::parse))
        {
            by_domain.entry(id).or_default().insert(apic);
        }
    }
    by_domain
}

/// The domain ids of the writers, by their `DOMAIN n CREATED name=smpwI` lines.
pub fn writer_ids(serial: &str, writers: &Writers) -> Vec<u32> {
    let names: BTreeSet<String> = (0..writers.count).map(|i| format!("name={}", Writers::name(i))).collect();
    clean(serial)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["DOMAIN", id, "CREATED", name, ..] if names.contains(*name) => id.parse().ok(),
            _ => None,
        })
        .collect()
}

/// The first `SMP cpus=…` marker line of a serial log.
pub fn smp_marker(serial: &str) -> Option<String> {
    clean(serial).lines().map(str::trim).find(|l| l.starts_with("SMP cpus=")).map(String::from)
}

/// Each complete serial line with the time it was first seen (the log as the wait
/// polls it; its last line may still be arriving, so it waits for the next poll).
#[derive(Debug, Default)]
struct Sightings {
    lines: Vec<(Duration, String)>,
}

impl Sightings {
    fn observe(&mut self, text: &str, now: Duration) {
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let new: Vec<(Duration, String)> =
            complete.lines().skip(self.lines.len()).map(|l| (now, l.trim().to_string())).collect();
        self.lines.extend(new);
    }

    fn iter(&self) -> impl Iterator<Item = (Duration, &str)> {
        self.lines.iter().map(|(t, l)| (*t, l.as_str()))
    }
}

/// Linux's clock ticks per second in /proc (USER_HZ: 100 on x86).
const USER_HZ: f64 = 100.0;

/// The QEMU process whose command line names `dir` (each boot has its own run
/// directory; the session keeps its child's id to itself).
fn qemu_pid(dir: &Path) -> Option<u32> {
    let needle = format!("fat:rw:{}", dir.join("esp").display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&needle).then_some(pid)
    })
}

/// User + system clock ticks of each thread of `pid` so far.
fn thread_ticks(pid: u32) -> BTreeMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return BTreeMap::new() };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Fields after the command name (which may hold spaces): state is field 3,
            // utime and stime fields 14 and 15.
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((tid, rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?))
        })
        .collect()
}

/// How many host cores each emulator thread kept busy between two samples `secs`
/// apart, the busiest first, leaving out threads under a twentieth of a core.
fn thread_cores(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>, secs: f64) -> Vec<f64> {
    let mut cores: Vec<f64> = after
        .iter()
        .map(|(tid, t)| t.saturating_sub(before.get(tid).copied().unwrap_or(0)) as f64 / USER_HZ / secs.max(1e-3))
        .filter(|c| *c >= 0.05)
        .collect();
    cores.sort_by(|a, b| b.total_cmp(a));
    cores
}

/// Which boot of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `-smp N`, every CPU started.
    All,
    /// `-smp N` with `smp=off`: the goal's baseline.
    SmpOff,
    /// `-smp 1`: one CPU and nothing else to emulate (a control for the baseline).
    OneCpuMachine,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::All => "all",
            Kind::SmpOff => "smp-off",
            Kind::OneCpuMachine => "smp1",
        }
    }
}

/// What one boot measured.
#[derive(Debug, Clone)]
struct Boot {
    /// From the last writer's start to the last writer's end.
    window: Duration,
    /// All writers' pages over the window.
    pages_per_sec: f64,
    /// The APIC IDs the writers' vCPUs were placed on (empty: no placement lines).
    apics: BTreeSet<u32>,
    marker: String,
    /// Host cores each busy emulator thread used over the window, busiest first.
    thread_cores: Vec<f64>,
}

impl Boot {
    fn to_json(&self) -> Value {
        json!({ "pages_per_sec": self.pages_per_sec, "window_s": self.window.as_secs_f64(), "apics": self.apics,
                "marker": self.marker, "emulator_thread_cores": self.thread_cores })
    }

    fn cores_text(&self) -> String {
        let each: Vec<String> = self.thread_cores.iter().map(|c| format!("{c:.2}")).collect();
        format!("emulator threads busy {} core(s)", if each.is_empty() { "0".into() } else { each.join(" + ") })
    }
}

/// One boot of `writers` on `-smp writers.count` (all CPUs, or `smp=off`) or `-smp 1`.
fn boot(esp: &Esp, writers: &Writers, kind: Kind, run: usize) -> Result<Boot> {
    let cpus = if kind == Kind::OneCpuMachine { 1 } else { writers.count };
    let config = RunConfig {
        name: format!("bench-smp-{}-{run}", kind.tag()),
        timeout: BOOT_TIMEOUT,
        cmdline: if kind == Kind::SmpOff { "smp=off".into() } else { String::new() },
        echo: false,
        vsock: false,
        domains: Some(writers.domains_cfg()),
    };
    let mut session = Session::spawn_cpus(&Platform::Qemu { cpu: "EPYC".into() }, esp, &config, &[], cpus)?;
    let start = session.start;
    let dir = session.dir.clone();
    let mut pid = None;
    let mut seen = Sightings::default();
    let mut ticks: Vec<(Duration, BTreeMap<u32, u64>)> = Vec::new();
    let wait = session.wait_until(BOOT_TIMEOUT, &mut Echo::new(false), |log| {
        let now = start.elapsed();
        seen.observe(&log.text(), now);
        pid = pid.or_else(|| qemu_pid(&dir));
        ticks.push((now, pid.map(thread_ticks).unwrap_or_default()));
        writers.spans(seen.iter()).is_ok() || log.outcome().is_some()
    });
    // When the machine powers off right after the last EXIT line, the wait can see the
    // emulator gone before it shows us the lines that came with it; they arrived within
    // one poll interval (50 ms) after the last poll.
    if wait == Wait::Exited {
        let late = ticks.last().map_or(start.elapsed(), |(t, _)| *t + Duration::from_millis(50));
        seen.observe(&format!("{}\n", SerialLog::new(&session.serial()).text()), late);
    }
    session.stop();
    let serial = session.serial();
    let fail = |why: String| format!("{why} ({wait:?}; serial log {})", session.serial_path.display());
    let marker = smp_marker(&serial).ok_or_else(|| fail("no `SMP cpus=` line".into()))?;
    let want = match kind {
        Kind::SmpOff => format!("SMP cpus={cpus} started=1 failed={}", cpus - 1),
        Kind::All | Kind::OneCpuMachine => format!("SMP cpus={cpus} started={cpus} failed=0"),
    };
    if marker != want {
        return Err(fail(format!("marker `{marker}`, expected `{want}`")));
    }
    let spans = writers.spans(seen.iter()).map_err(fail)?;
    writers.check_results(&serial).map_err(fail)?;
    let (Some(all_started), Some(all_ended)) = (spans.iter().map(|s| s.0).max(), spans.iter().map(|s| s.1).max())
    else {
        return Err(fail("no writers".into()));
    };
    if spans.iter().any(|s| s.1 <= all_started) {
        return Err(fail("a writer ended before the last one started: they did not run concurrently".into()));
    }
    let window = all_ended - all_started;
    let ids = writer_ids(&serial, writers);
    let apics = placements(&serial).into_iter().filter(|(id, _)| ids.contains(id)).flat_map(|(_, a)| a).collect();
    // The samples were taken at the same polls as the sightings. Each thread's last
    // count up to then: the vCPU threads may be gone by the time the last EXIT line is
    // seen complete (the machine powers off right after it).
    let upto = |t: Duration| {
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for (_, sample) in ticks.iter().filter(|(s, _)| *s <= t) {
            for (tid, n) in sample {
                last.entry(*tid).and_modify(|m| *m = (*m).max(*n)).or_insert(*n);
            }
        }
        last
    };
    let (before, after) = (upto(all_started), upto(all_ended));
    if before.is_empty() || after.is_empty() {
        eprintln!("bench smp: no thread times of the emulator (pid {pid:?}, {} samples)", ticks.len());
    }
    let thread_cores = thread_cores(&before, &after, window.as_secs_f64());
    Ok(Boot {
        window,
        pages_per_sec: writers.total_pages() as f64 / window.as_secs_f64().max(1e-3),
        apics,
        marker,
        thread_cores,
    })
}

/// `{0, 1}` as `0, 1`; none as `none`.
fn apic_text(apics: &BTreeSet<u32>) -> String {
    if apics.is_empty() {
        return "none".into();
    }
    apics.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// The goal line: met or not, or why it does not apply to this host and count. It is
/// met only against both baselines: a slowed `smp=off` alone can pass it (see the
/// module's doc) while every vCPU still runs on the boot CPU.
fn goal_text(writers: u32, cores: usize, ratio: f64, ratio_smp1: f64) -> String {
    let status = if writers != 2 || cores != 2 {
        format!("does not apply to {writers} writers on a {cores}-core host")
    } else if ratio >= GOAL && ratio_smp1 >= GOAL {
        "met".into()
    } else if ratio >= GOAL {
        "not met (only against smp=off, not against -smp 1)".into()
    } else {
        "not met".into()
    };
    format!(
        "goal: ≥ {GOAL}× for 2 writers on a 2-core host: {status} ({ratio:.2}× of smp=off, {ratio_smp1:.2}× of -smp 1)"
    )
}

/// `cargo xtask bench smp`: `runs` pairs of boots (N CPUs, then `smp=off`).
pub fn bench(runs: usize, writers: u32, as_json: bool) -> Result<()> {
    if writers == 0 {
        return Err("--writers must be at least 1".into());
    }
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let esp = image::build(true)?;
    let w = Writers { count: writers, pages: PAGES, rounds: ROUNDS };
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load_before = load();
    eprintln!(
        "bench smp: {writers} memwriter domain(s) × {PAGES} pages × {ROUNDS} rounds on {platform} -smp {writers} \
         (multi-threaded TCG), {} run(s) of: all CPUs, smp=off, then -smp 1; host has {cores} core(s), load {load_before}",
        runs.max(1)
    );
    let mut runs_done: Vec<[Boot; 3]> = Vec::new();
    for run in 1..=runs.max(1) {
        let all = boot(&esp, &w, Kind::All, run)?;
        let off = boot(&esp, &w, Kind::SmpOff, run)?;
        let smp1 = boot(&esp, &w, Kind::OneCpuMachine, run)?;
        for (what, b) in
            [(format!("-smp {writers}"), &all), (format!("-smp {writers} smp=off"), &off), ("-smp 1".into(), &smp1)]
        {
            eprintln!(
                "run {run}, {what}: {:.0} pages/s ({:.2} s; vCPUs on APIC {}; {})",
                b.pages_per_sec,
                b.window.as_secs_f64(),
                apic_text(&b.apics),
                b.cores_text()
            );
        }
        eprintln!(
            "run {run}: {:.2}× of smp=off, {:.2}× of -smp 1",
            all.pages_per_sec / off.pages_per_sec,
            all.pages_per_sec / smp1.pages_per_sec
        );
        runs_done.push([all, off, smp1]);
    }
    let of = |f: &dyn Fn(&[Boot; 3]) -> f64| median(&runs_done.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    let all_rate = of(&|r| r[0].pages_per_sec);
    let one_rate = of(&|r| r[1].pages_per_sec);
    let smp1_rate = of(&|r| r[2].pages_per_sec);
    // Each run's boots ran back to back under about the same load: the ratios are per run.
    let ratio = of(&|r| r[0].pages_per_sec / r[1].pages_per_sec);
    let ratio_smp1 = of(&|r| r[0].pages_per_sec / r[2].pages_per_sec);
    // The smp=off baseline's emulator: a second busy thread means CPUs the hypervisor
    // does not use still took host time from the one it does.
    let off_second = of(&|r| r[1].thread_cores.get(1).copied().unwrap_or(0.0));
    let apics: BTreeSet<u32> = runs_done.iter().flat_map(|r| r[0].apics.iter().copied()).collect();
    let load_after = load();
    let report = json!({
        "bench": "smp",
        "platform": platform.to_string(),
        "writers": writers,
        "pages_per_writer": PAGES,
        "rounds": ROUNDS,
        "host_cores": cores,
        "load": { "before": load_before, "after": load_after },
        "runs": runs_done.iter().map(|[a, o, s]| json!({
            "cpus": a.to_json(), "one_cpu": o.to_json(), "smp1": s.to_json(),
            "ratio": a.pages_per_sec / o.pages_per_sec, "ratio_smp1": a.pages_per_sec / s.pages_per_sec,
        })).collect::<Vec<Value>>(),
        "median": { "cpus_pages_per_sec": all_rate, "one_cpu_pages_per_sec": one_rate, "ratio": ratio,
                    "smp1_pages_per_sec": smp1_rate, "ratio_smp1": ratio_smp1,
                    "one_cpu_second_thread_cores": off_second },
        "goal": { "ratio": GOAL, "applies": writers == 2 && cores == 2, "met": ratio >= GOAL && ratio_smp1 >= GOAL },
    });
    let path = runs_dir().join("bench-smp.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    if as_json {
        println!("{text}");
    } else {
        println!(
            "\nbench smp: {writers} memwriters × {PAGES} pages × {ROUNDS} rounds, medians of {} run(s), from all \
             writers started to all ended (load {load_before} before, {load_after} after)",
            runs_done.len()
        );
        println!("| | {writers} CPUs | one CPU (smp=off) | {writers} CPUs / one CPU |");
        println!("|---|---:|---:|---:|");
        println!("| combined write rate | {all_rate:.0} pages/s | {one_rate:.0} pages/s | {ratio:.2}× |");
        println!("| control: one CPU on -smp 1 | | {smp1_rate:.0} pages/s | {ratio_smp1:.2}× |");
        println!("{}", goal_text(writers, cores, ratio, ratio_smp1));
        if writers > 1 && off_second >= 0.2 {
            println!(
                "note: during the smp=off windows a second emulator thread kept {off_second:.2} of a host core \
                 busy: the CPUs smp=off leaves to the firmware still run on this host and slow the baseline; \
                 the -smp 1 row is the baseline without them"
            );
        }
        println!("writers' vCPUs were placed on APIC(s): {}", apic_text(&apics));
        if writers > 1 && apics.len() < 2 {
            println!(
                "note: no writer's vCPU was seen on a second CPU (`DOMAIN <id> VCPU <v> ON CPU apic=<A>`): the \
                 hypervisor ran them all on one, so a ratio above 1 says more about the baseline than about SMP"
            );
        }
        println!("bench smp: written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Writers = Writers { count: 2, pages: 4, rounds: 2 };

    fn log(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\r\n")).collect()
    }

    #[test]
    fn the_domains_file_names_each_writer_with_its_own_seed_and_room_for_its_pages() {
        let cfg = Writers { count: 2, pages: 2048, rounds: 300 }.domains_cfg();
        assert_eq!(
            cfg,
            "name=smpw0 kernel=memwriter.elf memory=25M cmdline=pages=2048 rounds=300 seed=100\n\
             name=smpw1 kernel=memwriter.elf memory=25M cmdline=pages=2048 rounds=300 seed=101\n"
        );
    }

    #[test]
    fn spans_run_from_the_console_line_to_the_exit_line_of_each_writer() {
        let text = log(&[
            "DOMAIN 1 CREATED name=smpw0 memory=25M vcpus=1",
            "DOMAIN 2 CREATED name=smpw1 memory=25M vcpus=1",
            "DOMAIN 3 CREATED name=other memory=8M vcpus=1",
            "[dom3] memwriter: 4 pages",
            "[dom2] memwriter: 4 pages at 0x1000000, 2 rounds, seed 101",
            "[dom1] memwriter: 4 pages at 0x1000000, 2 rounds, seed 100",
            "DOMAIN 1 EXIT code=0 exits=9",
            "DOMAIN 3 EXIT code=0 exits=9",
            "DOMAIN 2 EXIT code=0 exits=9",
        ]);
        let spans = TWO.spans(clean(&text).lines().enumerate()).unwrap();
        assert_eq!(spans, vec![(5, 6), (4, 8)]);
        let err = TWO.spans(clean(&text).lines().take(7).enumerate()).unwrap_err();
        assert!(err.contains("smpw1 never ended"), "{err}");
    }

    #[test]
    fn results_are_checked_round_by_round() {
        let sum = |seed, round| guest_abi::memwriter::round_checksum(seed, round, 4);
        let mut lines = vec!["DOMAIN 1 CREATED name=smpw0".to_string(), "DOMAIN 2 CREATED name=smpw1".to_string()];
        for round in 0..2 {
            lines.push(format!("DOMAIN 1 REPORT checksum={:#x}", sum(100, round)));
            lines.push(format!("DOMAIN 2 REPORT checksum={:#x}", sum(101, round)));
        }
        lines.push("DOMAIN 1 EXIT code=0 exits=1".into());
        let mut good = lines.clone();
        good.push("DOMAIN 2 EXIT code=0 exits=1".into());
        let refs = |v: &[String]| log(&v.iter().map(String::as_str).collect::<Vec<_>>());
        TWO.check_results(&refs(&good)).unwrap();
        let mut bad = lines.clone();
        bad[5] = format!("DOMAIN 2 REPORT checksum={:#x}", sum(100, 1));
        bad.push("DOMAIN 2 EXIT code=0 exits=1".into());
        let err = TWO.check_results(&refs(&bad)).unwrap_err();
        assert!(err.contains("smpw1, round 1"), "{err}");
        let err = TWO.check_results(&refs(&lines)).unwrap_err();
        assert!(err.contains("smpw1 did not exit with 0"), "{err}");
    }

    #[test]
    fn placements_are_read_per_domain() {
        let text = log(&[
            "DOMAIN 1 CREATED name=smpw0",
            "DOMAIN 1 VCPU 0 ON CPU apic=0",
            "DOMAIN 2 VCPU 0 ON CPU apic=1",
            "DOMAIN 1 VCPU 0 ON CPU apic=1",
            "[dom1] DOMAIN 1 VCPU 0 ON CPU apic=7",
            "DOMAIN 2 VCPU 0 ON CPU apic=x",
        ]);
        let p = placements(&text);
        assert_eq!(p[&1], BTreeSet::from([0, 1]));
        assert_eq!(p[&2], BTreeSet::from([1]));
        assert_eq!(writer_ids(&text, &TWO), vec![1]);
    }

    #[test]
    fn sightings_wait_for_a_line_to_be_complete() {
        let mut s = Sightings::default();
        let t = Duration::from_millis;
        s.observe("READY\nDOMAIN 1 EX", t(50));
        s.observe("READY\nDOMAIN 1 EXIT code=0\nDOMAIN 1 FINAL", t(100));
        let seen: Vec<(Duration, &str)> = s.iter().collect();
        assert_eq!(seen, vec![(t(50), "READY"), (t(100), "DOMAIN 1 EXIT code=0")]);
    }

    #[test]
    fn thread_cores_are_tick_deltas_over_the_window() {
        let before = BTreeMap::from([(1, 100), (2, 50), (3, 7)]);
        let after = BTreeMap::from([(1, 300), (2, 150), (3, 8), (4, 40)]);
        // 2 s: 200 ticks are one core, 100 half a core; 1 tick is left out.
        assert_eq!(thread_cores(&before, &after, 2.0), vec![1.0, 0.5, 0.2]);
        assert!(!thread_ticks(std::process::id()).is_empty());
    }

    #[test]
    fn the_emulator_is_found_by_its_run_directory() {
        let dir = std::env::temp_dir().join(format!("smp-bench-{}", std::process::id()));
        let arg = format!("file=fat:rw:{}", dir.join("esp").display());
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 5; :", &arg]).spawn().unwrap();
        // Until the child has exec'd, /proc shows the parent's command line.
        let mut found = None;
        for _ in 0..100 {
            found = qemu_pid(&dir);
            if found.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
    }

    #[test]
    fn the_goal_applies_to_two_writers_on_two_cores() {
        assert!(goal_text(2, 2, 1.8, 1.75).contains(": met (1.80× of smp=off, 1.75× of -smp 1)"));
        assert!(goal_text(2, 2, 1.75, 0.98).contains("not met (only against smp=off"));
        assert!(goal_text(2, 2, 1.0, 1.0).contains("not met"));
        assert!(goal_text(4, 2, 3.0, 3.0).contains("does not apply to 4 writers on a 2-core host"));
    }
}
