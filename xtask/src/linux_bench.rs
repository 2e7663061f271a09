//! `cargo xtask bench linux`: Debian's cloud kernel under the hypervisor against the
//! same kernel, initramfs and command line on the bare emulator, in one run.
//!
//! 1. Boot time. `runs` boots of each, interleaved (hypervisor, bare, hypervisor, …):
//!    QEMU+OVMF with the image and one boot-time Linux domain (256 MiB,
//!    `hv.test=boot`), timed from spawning QEMU to `READY`, to `DOMAIN n CREATED` and
//!    to the domain's `HV-LINUX-INIT`; and `qemu-system-x86_64 -M microvm -m 256` with
//!    `-kernel/-initrd/-append`, timed from spawning it to `HV-LINUX-INIT`. Medians and
//!    their ratio from emulator start and from domain start (the firmware and the
//!    hypervisor's own boot left out). Times are first sightings in the serial log,
//!    which is polled every 50 ms.
//! 2. Exits. One QEMU with a vsock device, no boot-time domains; a 64 MiB Linux guest
//!    with `hv.test=shell` uploaded with `hvctl domain create`; its exits by reason from
//!    creation (all counters 0) to the first sighting of its `HV-LINUX-INIT`, and over
//!    10 s of idle shell (two `hvctl domain list --json` snapshots, as a rate).
//! 3. Density. More such guests on the same instance (2 GiB), one after another, each
//!    waited for until its init runs, until creation is refused, a guest does not reach
//!    its init, or `cap` guests run; then the exits/s of all of them idle.
//!
//! Every number is printed with the load average, as a table, and written as JSON to
//! target/xtask/runs/bench-linux.json. The goals (≤ 1.5× boot time, < 300 exits/s
//! idle) are reported as met or not; the bench never fails for missing them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::emulator::{Echo, Platform, RunConfig, Session};
use crate::image::{self, Esp};
use crate::linux::{self, LinuxAssets};
use crate::linux_tests::{self, BareRun};
use crate::serial::clean;
use crate::systest::{build_hvctl, hvctl_output, wait_serving};
use crate::{Result, tools};

/// Boot-time goal: the guest under the hypervisor at most this many times the bare
/// emulator's time to init.
const BOOT_GOAL: f64 = 1.5;
/// Idle goal: exits per second of one idle guest.
const IDLE_GOAL: f64 = 300.0;
/// How long idle exits are counted.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Memory of the guests of the exit and density parts: the first size with which the
/// first guest reaches its init (64 MiB is what was asked for; Debian's 6.12 cloud
/// kernel needs pref_address 16 MiB + init_size 56 MiB, so the hypervisor refuses it).
const DENSITY_MEMORY: &[&str] = &["64M", "80M", "96M", "128M"];
/// How long one guest may take to reach its init (a loaded 2-core host is slow).
const INIT_TIMEOUT: Duration = Duration::from_secs(300);

/// What one boot of the hypervisor with a Linux domain showed, from emulator start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HvBoot {
    /// `READY` (the firmware and the hypervisor's boot done).
    pub ready: Duration,
    /// `DOMAIN n CREATED name=linux`.
    pub created: Duration,
    /// The domain's `HV-LINUX-INIT`.
    pub init: Duration,
    /// The guest's uptime in that line.
    pub uptime: Option<f64>,
    /// Linux gave up calibrating its TSC (it then runs on the ACPI PM timer).
    pub tsc_unstable: bool,
}

/// The markers of a boot found in a serial log so far (pure; see [`Timeline`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BootMarks {
    /// `READY` appeared.
    pub ready: bool,
    /// The id of the domain `name`, once `DOMAIN <id> CREATED name=<name>` appeared.
    pub created: Option<u32>,
    /// Its `HV-LINUX-INIT` line appeared: with the `uptime=` it carries.
    pub init: Option<Option<f64>>,
    /// It ended or could not be created: the hypervisor's line.
    pub ended: Option<String>,
    /// Its console said the TSC could not be calibrated.
    pub tsc_unstable: bool,
}

impl BootMarks {
    /// The markers of domain `name` (by name, before its id is known) in `serial`.
    pub fn parse(serial: &str, name: &str) -> Self {
        let mut m = BootMarks::default();
        let created = format!("name={name}");
        let failed = format!("name={name}:");
        for line in clean(serial).lines().map(str::trim) {
            if line.starts_with("READY") {
                m.ready = true;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["DOMAIN", id, "CREATED", n, ..] if *n == created => m.created = id.parse().ok(),
                ["DOMAIN-CREATE-FAILED", n, ..] if *n == failed => m.ended = Some(line.to_string()),
                _ => {}
            }
            if let Some(id) = m.created {
                m.observe_domain_line(id, line);
            }
        }
        m
    }

    /// The markers of domain `id` in `serial` (a domain created over the control channel).
    pub fn parse_id(serial: &str, id: u32) -> Self {
        let mut m = BootMarks { created: Some(id), ..BootMarks::default() };
        for line in clean(serial).lines().map(str::trim) {
            m.observe_domain_line(id, line);
        }
        m
    }

    fn observe_domain_line(&mut self, id: u32, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["DOMAIN", d, what, ..] = words.as_slice()
            && d.parse() == Ok(id)
            && ["EXIT", "CRASHED", "HALTED", "DESTROYED"].contains(what)
        {
            self.ended.get_or_insert_with(|| line.to_string());
        }
        if let Some(text) = line.strip_prefix(&format!("[dom{id}] ")) {
            let text = text.trim();
            if text.contains(linux_tests::TSC_UNCALIBRATED) {
                self.tsc_unstable = true;
            }
            if self.init.is_none()
                && let Some(rest) = text.strip_prefix("HV-LINUX-INIT")
            {
                self.init =
                    Some(rest.split_whitespace().find_map(|w| w.strip_prefix("uptime=")).and_then(|u| u.parse().ok()));
            }
        }
    }
}

/// When each marker of a [`BootMarks`] was first seen: fed the serial log at each poll.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Timeline {
    /// `READY`.
    pub ready: Option<Duration>,
    /// The domain's creation line.
    pub created: Option<Duration>,
    /// Its init's first line.
    pub init: Option<Duration>,
}

impl Timeline {
    /// Record the markers of `m` not seen before as seen at `now`.
    pub fn observe(&mut self, m: &BootMarks, now: Duration) {
        if m.ready {
            self.ready.get_or_insert(now);
        }
        if m.created.is_some() {
            self.created.get_or_insert(now);
        }
        if m.init.is_some() {
            self.init.get_or_insert(now);
        }
    }
}

/// One domain of a `hvctl domain list --json` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainExits {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// State.
    pub state: String,
    /// Exits by reason.
    pub exits: BTreeMap<String, u64>,
}

/// The domains of `hvctl domain list --json` output.
pub fn parse_domain_list(text: &str) -> Result<Vec<DomainExits>> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("hvctl domain list --json is not JSON: {e}: {text:?}"))?;
    let domains = v["domains"].as_array().ok_or_else(|| format!("no domains array in {v}"))?;
    domains
        .iter()
        .map(|d| {
            let id = d["id"].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| format!("no id in {d}"))?;
            let exits = d["exits"]
                .as_object()
                .ok_or_else(|| format!("domain {id}: no exits object in {d}"))?
                .iter()
                .map(|(k, n)| n.as_u64().map(|n| (k.clone(), n)).ok_or_else(|| format!("domain {id}: exits.{k} = {n}")))
                .collect::<Result<BTreeMap<_, _>>>()?;
            Ok(DomainExits {
                id,
                name: d["name"].as_str().unwrap_or_default().to_string(),
                state: d["state"].as_str().unwrap_or_default().to_string(),
                exits,
            })
        })
        .collect()
}

/// Exits by reason summed over the domains of `list` whose id `keep` accepts.
pub fn sum_exits(list: &[DomainExits], keep: impl Fn(u32) -> bool) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for d in list.iter().filter(|d| keep(d.id)) {
        for (k, n) in &d.exits {
            *sum.entry(k.clone()).or_insert(0) += n;
        }
    }
    sum
}

/// Exits per second by reason between two snapshots `secs` apart, highest first; an
/// error if a counter went down (a domain was replaced between them).
pub fn exit_rates(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    secs: f64,
) -> Result<Vec<(String, f64)>> {
    if secs <= 0.0 {
        return Err(format!("snapshots {secs} s apart: no rate"));
    }
    let mut rates = Vec::new();
    for (k, &b) in before {
        if after.get(k).copied().unwrap_or(0) < b {
            return Err(format!("exit counter {k} went down from {b} to {:?} between the snapshots", after.get(k)));
        }
    }
    for (k, &a) in after {
        let d = a - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            rates.push((k.clone(), d as f64 / secs));
        }
    }
    rates.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    Ok(rates)
}

/// The median of `xs` (the lower middle one of an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// The load average (1, 5 and 15 minutes) from /proc/loadavg.
pub(crate) fn load() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn rates_text(rates: &[(String, f64)]) -> String {
    if rates.is_empty() {
        return "none".into();
    }
    rates.iter().map(|(k, r)| format!("{k} {r:.1}")).collect::<Vec<_>>().join(", ")
}

fn total(rates: &[(String, f64)]) -> f64 {
    rates.iter().map(|r| r.1).sum()
}

/// One boot of the image with a 256 MiB Linux domain (`hv.test=boot`).
fn hv_boot(esp: &Esp, assets: &LinuxAssets, i: usize) -> Result<HvBoot> {
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    let config = RunConfig {
        name: format!("bench-linux-hv-{i}"),
        timeout: INIT_TIMEOUT,
        cmdline: String::new(),
        echo: false,
        vsock: false,
        domains: Some(linux_tests::domains_line("256M", "boot")),
    };
    let mut session = Session::spawn_staged(&platform, esp, &config, &linux_tests::staged(assets))?;
    let start = session.start;
    let mut timeline = Timeline::default();
    let mut marks = BootMarks::default();
    let wait = session.wait_until(INIT_TIMEOUT, &mut Echo::new(false), |log| {
        marks = BootMarks::parse(&log.text(), "linux");
        timeline.observe(&marks, start.elapsed());
        marks.init.is_some() || marks.ended.is_some() || log.outcome().is_some()
    });
    session.stop();
    let dir = session.dir.clone();
    let (Some(ready), Some(created), Some(init)) = (timeline.ready, timeline.created, timeline.init) else {
        let text = clean(&session.serial());
        let lines: Vec<&str> = text.lines().collect();
        return Err(format!(
            "hypervisor run {i}: no {} ({wait:?}, {}); serial log {}/serial.log ends:\n{}",
            if timeline.ready.is_none() {
                "READY"
            } else if timeline.created.is_none() {
                "DOMAIN CREATED"
            } else {
                "HV-LINUX-INIT"
            },
            marks.ended.as_deref().unwrap_or("the domain did not end"),
            dir.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        ));
    };
    Ok(HvBoot { ready, created, init, uptime: marks.init.flatten(), tsc_unstable: marks.tsc_unstable })
}

/// One bare boot, booted again (up to `CALIBRATION_ATTEMPTS` times) while Linux fails
/// to calibrate its TSC against QEMU's PIT, after which it hangs; (run, retries), or
/// (None, retries) when every attempt failed so (a busy host): that run has no sample.
fn bare_boot(assets: &LinuxAssets, cmdline: &str, i: usize) -> Result<(Option<BareRun>, usize)> {
    for attempt in 1..=linux_tests::CALIBRATION_ATTEMPTS {
        let run = linux_tests::run_bare_qemu_linux(assets, cmdline, 256, INIT_TIMEOUT)?;
        if !run.calibration_failed {
            if run.init_after.is_none() {
                let lines: Vec<&str> = run.output.lines().collect();
                return Err(format!(
                    "bare run {i}: no HV-LINUX-INIT within {} s; last lines:\n{}",
                    INIT_TIMEOUT.as_secs(),
                    lines[lines.len().saturating_sub(20)..].join("\n")
                ));
            }
            return Ok((Some(run), attempt - 1));
        }
        println!(
            "  bare run {i}: Linux could not calibrate its TSC against QEMU's PIT (load {}); booting again",
            load()
        );
    }
    println!(
        "  bare run {i}: no sample: in {} boots Linux never calibrated its TSC against QEMU's PIT (`{}`); the host \
         is too busy; serial output: {}",
        linux_tests::CALIBRATION_ATTEMPTS,
        linux_tests::TSC_UNCALIBRATED,
        linux_tests::baseline_dir().join("qemu.stdout").display()
    );
    Ok((None, linux_tests::CALIBRATION_ATTEMPTS))
}

/// The control-channel context of parts 2 and 3.
struct Control {
    hvctl: PathBuf,
    target: String,
}

impl Control {
    fn run(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = hvctl_output(&self.hvctl, &[&["--connect", self.target.as_str()], args].concat())?;
        if code != Some(0) {
            return Err(format!("hvctl {} failed ({code:?}): {}", args.join(" "), err.trim()));
        }
        Ok(out)
    }

    fn list(&self) -> Result<Vec<DomainExits>> {
        parse_domain_list(&self.run(&["domain", "list", "--json"])?)
    }

    /// Two snapshots `IDLE_WINDOW` apart: exits/s by reason of the domains `keep` accepts.
    fn idle_rates(&self, keep: impl Fn(u32) -> bool + Copy) -> Result<Vec<(String, f64)>> {
        let a = self.list()?;
        let t = Instant::now();
        std::thread::sleep(IDLE_WINDOW);
        let b = self.list()?;
        let secs = t.elapsed().as_secs_f64();
        exit_rates(&sum_exits(&a, keep), &sum_exits(&b, keep), secs)
    }
}

/// A guest of parts 2 and 3 that reached its init.
#[derive(Debug)]
struct Guest {
    id: u32,
    /// From the create request's answer to the first sighting of HV-LINUX-INIT.
    boot: Duration,
    /// Its exits at that sighting.
    exits: BTreeMap<String, u64>,
    tsc_unstable: bool,
}

/// Upload and create guest `n`; wait for its init. `Err` says why it did not get there.
fn add_guest(session: &mut Session, ctl: &Control, assets: &LinuxAssets, n: usize, memory: &str) -> Result<Guest> {
    let kernel = assets.kernel.display().to_string();
    let initrd = assets.initrd.display().to_string();
    let name = format!("linux{n}");
    let cmdline = format!("{} panic=-1", linux_tests::guest_cmdline("shell"));
    let out = ctl.run(&[
        "domain",
        "create",
        "--name",
        &name,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--memory",
        memory,
        "--cmdline",
        &cmdline,
        "--json",
    ])?;
    let created = Instant::now();
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}: {out}"))?;
    let id = v["id"].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| format!("create gave no id: {v}"))?;
    let mut marks = BootMarks::default();
    let deadline = session.start.elapsed() + INIT_TIMEOUT;
    let wait = session.wait_until(deadline, &mut Echo::new(false), |log| {
        marks = BootMarks::parse_id(&log.text(), id);
        marks.init.is_some() || marks.ended.is_some() || log.outcome().is_some()
    });
    let boot = created.elapsed();
    if marks.init.is_none() {
        return Err(format!(
            "guest {name} (domain {id}) did not reach its init within {} s: {}",
            INIT_TIMEOUT.as_secs(),
            marks.ended.unwrap_or_else(|| format!("{wait:?}"))
        ));
    }
    let list = ctl.list()?;
    let exits = list.iter().find(|d| d.id == id).map(|d| d.exits.clone()).unwrap_or_default();
    Ok(Guest { id, boot, exits, tsc_unstable: marks.tsc_unstable })
}

/// `cargo xtask bench linux`: `runs` interleaved boots per side, then the exit and
/// density parts with at most `cap` guests.
pub fn bench(runs: usize, cap: usize) -> Result<()> {
    let assets = linux::ensure_linux_assets()?;
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let esp = image::build(true)?;
    let hvctl = build_hvctl()?;
    let cmdline = linux_tests::guest_cmdline("boot");
    println!(
        "bench linux: Linux {} ({} bytes), initramfs {} bytes, cmdline `{cmdline}`, QEMU TCG -cpu EPYC; load {}",
        assets.kernel_release,
        std::fs::metadata(&assets.kernel).map(|m| m.len()).unwrap_or(0),
        std::fs::metadata(&assets.initrd).map(|m| m.len()).unwrap_or(0),
        load()
    );

    // Part 1: boot time, interleaved.
    let (mut hv, mut bare, mut retries) = (Vec::new(), Vec::new(), 0);
    let mut boots_json = Vec::new();
    for i in 1..=runs.max(1) {
        let load_before = load();
        let h = hv_boot(&esp, &assets, i)?;
        println!(
            "  run {i} hypervisor: READY {:.2} s, domain created {:.2} s, HV-LINUX-INIT {:.2} s ({:.2} s after \
             creation, guest uptime {:.2} s{}); load {load_before}",
            h.ready.as_secs_f64(),
            h.created.as_secs_f64(),
            h.init.as_secs_f64(),
            (h.init - h.created).as_secs_f64(),
            h.uptime.unwrap_or(f64::NAN),
            if h.tsc_unstable { ", Linux marked its TSC unstable" } else { "" }
        );
        let load_before = load();
        let (b, r) = bare_boot(&assets, &cmdline, i)?;
        retries += r;
        let b_init = b.as_ref().and_then(|b| b.init_after).map(|t| t.as_secs_f64());
        let b_uptime = b.as_ref().and_then(|b| b.guest_uptime);
        if let Some(t) = b_init {
            println!(
                "  run {i} bare -M microvm: HV-LINUX-INIT {t:.2} s (guest uptime {:.2} s); load {load_before}",
                b_uptime.unwrap_or(f64::NAN)
            );
            bare.push(t);
        }
        boots_json.push(json!({
            "run": i,
            "hv_ready_s": h.ready.as_secs_f64(), "hv_created_s": h.created.as_secs_f64(),
            "hv_init_s": h.init.as_secs_f64(), "hv_uptime_s": h.uptime, "hv_tsc_unstable": h.tsc_unstable,
            "bare_init_s": b_init, "bare_uptime_s": b_uptime, "load": load_before,
        }));
        hv.push(h);
    }
    if bare.is_empty() {
        return Err(format!(
            "no bare-emulator sample in {} runs: Linux never calibrated its TSC against QEMU's PIT; no ratio",
            hv.len()
        ));
    }
    let med = |f: &dyn Fn(&HvBoot) -> f64| median(&hv.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    let (m_ready, m_created, m_init) =
        (med(&|h| h.ready.as_secs_f64()), med(&|h| h.created.as_secs_f64()), med(&|h| h.init.as_secs_f64()));
    let m_from_domain = med(&|h| (h.init - h.created).as_secs_f64());
    let m_bare = median(&bare).unwrap_or(f64::NAN);
    let (ratio_start, ratio_domain) = (m_init / m_bare, m_from_domain / m_bare);
    let load_boot = load();

    // Parts 2 and 3: one instance with vsock, guests uploaded one after another.
    let config = RunConfig {
        name: "bench-linux-density".into(),
        timeout: Duration::from_secs(platform.default_timeout_secs()),
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    let mut session = Session::spawn(&platform, &esp, &config)?;
    wait_serving(&mut session, config.timeout).map_err(|w| {
        format!("the control channel did not come up ({w}); serial log {}/serial.log", session.dir.display())
    })?;
    let socket = session.vsock_socket.clone().ok_or("no vsock socket")?;
    let ctl = Control { hvctl, target: format!("unix:{}:{}", socket.display(), wire::CONTROL_PORT) };
    let mut smaller = Vec::new();
    let (first, memory) = loop {
        let Some(&memory) = DENSITY_MEMORY.get(smaller.len()) else {
            return Err(format!(
                "no guest reached its init with any of {DENSITY_MEMORY:?}: {smaller:?}; serial log {}/serial.log",
                session.dir.display()
            ));
        };
        match add_guest(&mut session, &ctl, &assets, 1 + smaller.len(), memory) {
            Ok(g) => break (g, memory),
            Err(e) => {
                println!("  guest of {memory}: {e}");
                smaller.push(json!({"memory": memory, "error": e}));
            }
        }
    };
    let boot_exits: u64 = first.exits.values().sum();
    println!(
        "  guest 1 ({memory}, uploaded): init {:.2} s after creation, {boot_exits} exits: {}; load {}",
        first.boot.as_secs_f64(),
        first.exits.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        load()
    );
    // Let the shell come up before counting idle exits.
    std::thread::sleep(Duration::from_secs(3));
    let load_idle = load();
    let idle = ctl.idle_rates(|id| id == first.id)?;
    println!(
        "  guest 1 idle over {} s: {:.1} exits/s ({}); load {load_idle}",
        IDLE_WINDOW.as_secs(),
        total(&idle),
        rates_text(&idle)
    );

    let mut guests = vec![first];
    let mut stopped_by = format!("the cap of {cap} guests");
    for n in 2..=cap {
        match add_guest(&mut session, &ctl, &assets, n + smaller.len(), memory) {
            Ok(g) => {
                println!(
                    "  guest {n}: init {:.2} s after creation, {} boot exits{}; load {}",
                    g.boot.as_secs_f64(),
                    g.exits.values().sum::<u64>(),
                    if g.tsc_unstable { ", TSC unstable" } else { "" },
                    load()
                );
                guests.push(g);
            }
            Err(e) => {
                println!("  guest {n}: {e}");
                stopped_by = e;
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let load_all = load();
    let ids: Vec<u32> = guests.iter().map(|g| g.id).collect();
    let all_idle = ctl.idle_rates(|id| ids.contains(&id))?;
    let states: Vec<String> =
        ctl.list()?.iter().filter(|d| ids.contains(&d.id)).map(|d| format!("{}={}", d.name, d.state)).collect();
    println!(
        "  {} guests idle over {} s: {:.1} exits/s ({}); load {load_all}",
        guests.len(),
        IDLE_WINDOW.as_secs(),
        total(&all_idle),
        rates_text(&all_idle)
    );
    session.stop();

    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let tsc_unstable_hv = hv.iter().filter(|h| h.tsc_unstable).count();
    println!("\nbench linux summary ({} runs each side, medians; load {load_boot} after part 1)", hv.len());
    println!("| measure                                         | value |");
    println!("|---|---|");
    println!("| bare -M microvm: emulator start -> init         | {m_bare:.2} s |");
    println!("| hypervisor: emulator start -> READY             | {m_ready:.2} s |");
    println!("| hypervisor: emulator start -> domain created    | {m_created:.2} s |");
    println!("| hypervisor: emulator start -> init              | {m_init:.2} s |");
    println!("| hypervisor: domain created -> init              | {m_from_domain:.2} s |");
    println!(
        "| ratio from emulator start (goal <= {BOOT_GOAL})       | {ratio_start:.2}x ({}) |",
        met(ratio_start <= BOOT_GOAL)
    );
    println!(
        "| ratio from domain start (goal <= {BOOT_GOAL})         | {ratio_domain:.2}x ({}) |",
        met(ratio_domain <= BOOT_GOAL)
    );
    println!("| hypervisor boots where Linux marked TSC unstable | {tsc_unstable_hv} of {} |", hv.len());
    println!("| bare boots retried (failed PIT calibration)     | {retries} |");
    for r in &smaller {
        println!(
            "| guest of {} refused or failed                    | {} |",
            r["memory"].as_str().unwrap_or("?"),
            r["error"].as_str().unwrap_or("?")
        );
    }
    println!("| exits, domain creation -> init ({memory} guest)     | {boot_exits} |");
    println!(
        "| idle exits/s, one guest (goal < {IDLE_GOAL})          | {:.1} ({}) |",
        total(&idle),
        met(total(&idle) < IDLE_GOAL)
    );
    println!("| guests of {memory} that reached init on 2 GiB       | {} |", guests.len());
    println!("| density stopped by                              | {stopped_by} |");
    println!("| idle exits/s, all guests                        | {:.1} |", total(&all_idle));

    let rates_json =
        |r: &[(String, f64)]| r.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>();
    let report = json!({
        "kernel": assets.kernel_release, "cmdline": cmdline, "emulator": "qemu-system-x86_64 TCG -cpu EPYC",
        "boot": {
            "runs": boots_json,
            "median_bare_init_s": m_bare, "median_hv_ready_s": m_ready, "median_hv_created_s": m_created,
            "median_hv_init_s": m_init, "median_hv_created_to_init_s": m_from_domain,
            "ratio_from_emulator_start": ratio_start, "ratio_from_domain_start": ratio_domain,
            "goal": BOOT_GOAL, "bare_retries_after_failed_calibration": retries,
            "hv_boots_with_tsc_unstable": tsc_unstable_hv, "load_after": load_boot,
        },
        "exits": {
            "guest_memory": memory, "smaller_sizes_failed": smaller, "boot_exits_total": boot_exits, "boot_exits": first_exits_json(&guests),
            "idle_window_s": IDLE_WINDOW.as_secs(), "idle_per_s": rates_json(&idle), "idle_total_per_s": total(&idle),
            "goal_per_s": IDLE_GOAL, "load": load_idle,
        },
        "density": {
            "guest_memory": memory, "qemu_memory": "2G", "cap": cap, "guests": guests.len(),
            "stopped_by": stopped_by,
            "boot_s": guests.iter().map(|g| g.boot.as_secs_f64()).collect::<Vec<_>>(),
            "idle_per_s": rates_json(&all_idle), "idle_total_per_s": total(&all_idle), "states": states,
            "load": load_all,
        },
    });
    let path = report_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| format!("bench report: {e}"))?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("bench linux: written to {}", path.display());
    Ok(())
}

fn first_exits_json(guests: &[Guest]) -> serde_json::Value {
    guests.first().map(|g| json!(g.exits)).unwrap_or(serde_json::Value::Null)
}

/// target/xtask/runs/bench-linux.json (under CARGO_TARGET_DIR when that is set).
fn report_path() -> PathBuf {
    runs_dir().join("bench-linux.json")
}

/// target/xtask/runs (under CARGO_TARGET_DIR when that is set): where benches write.
pub(crate) fn runs_dir() -> PathBuf {
    linux::cache_dir().parent().unwrap_or(Path::new(".")).join("xtask").join("runs")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "BdsDxe: loading\r\nREADY arch=svm exit=hypercall value=0x1\r\n\
                       DOMAIN 1 CREATED name=linux memory=256M vcpus=1\r\n\
                       [dom1] [    0.05] tsc: Marking TSC unstable due to could not calculate TSC khz\r\n\
                       [dom2] HV-LINUX-INIT uptime=9.9 kernel=other\r\n\
                       [dom1] HV-LINUX-INIT uptime=5.34 kernel=6.12\r\nDOMAIN 1 EXIT code=0 exits=51000\r\n";

    #[test]
    fn boot_marks_follow_the_named_domain_only() {
        let m = BootMarks::parse(LOG, "linux");
        assert!(m.ready);
        assert_eq!(m.created, Some(1));
        assert_eq!(m.init, Some(Some(5.34)));
        assert!(m.tsc_unstable);
        assert_eq!(m.ended.as_deref(), Some("DOMAIN 1 EXIT code=0 exits=51000"));
        assert_eq!(BootMarks::parse_id(LOG, 2).init, Some(Some(9.9)));
        assert!(!BootMarks::parse_id(LOG, 2).tsc_unstable);
        let early =
            BootMarks::parse("READY arch=svm\r\nDOMAIN 1 CREATED name=other\r\n[dom1] HV-LINUX-INIT uptime=1", "linux");
        assert_eq!((early.created, early.init), (None, None));
        let failed = BootMarks::parse("READY\nDOMAIN-CREATE-FAILED name=linux: out of memory\n", "linux");
        assert_eq!(failed.ended.as_deref(), Some("DOMAIN-CREATE-FAILED name=linux: out of memory"));
    }

    #[test]
    fn a_timeline_keeps_first_sightings() {
        let mut t = Timeline::default();
        let s = Duration::from_secs;
        t.observe(&BootMarks::parse("READY\n", "linux"), s(4));
        t.observe(&BootMarks::parse("READY\nDOMAIN 1 CREATED name=linux\n", "linux"), s(5));
        t.observe(&BootMarks::parse(LOG, "linux"), s(16));
        t.observe(&BootMarks::parse(LOG, "linux"), s(17));
        assert_eq!(t, Timeline { ready: Some(s(4)), created: Some(s(5)), init: Some(s(16)) });
    }

    const LIST_A: &str = r#"{"domains":[{"id":1,"name":"linux1","state":"running","vcpus":1,
        "exits":{"hlt":200,"io":1000,"mmio":30},"exits_total":1230,"runtime_ns":5},
        {"id":2,"name":"linux2","state":"running","exits":{"io":7}}],"free_frames":10}"#;
    const LIST_B: &str = r#"{"domains":[{"id":1,"name":"linux1","state":"running",
        "exits":{"hlt":300,"io":1800,"mmio":30,"msr":5}},
        {"id":2,"name":"linux2","state":"running","exits":{"io":27}}],"free_frames":10}"#;

    #[test]
    fn exit_rates_are_the_difference_of_two_snapshots() {
        let (a, b) = (parse_domain_list(LIST_A).unwrap(), parse_domain_list(LIST_B).unwrap());
        assert_eq!(a[0].name, "linux1");
        assert_eq!(a[0].exits["io"], 1000);
        let one = exit_rates(&sum_exits(&a, |id| id == 1), &sum_exits(&b, |id| id == 1), 10.0).unwrap();
        assert_eq!(one, vec![("io".to_string(), 80.0), ("hlt".to_string(), 10.0), ("msr".to_string(), 0.5)]);
        let all = exit_rates(&sum_exits(&a, |_| true), &sum_exits(&b, |_| true), 10.0).unwrap();
        assert_eq!(all[0], ("io".to_string(), 82.0));
        assert!((total(&all) - 92.5).abs() < 1e-9);
        // A counter that went down means the domain was replaced: no rate.
        let err = exit_rates(&sum_exits(&b, |_| true), &sum_exits(&a, |_| true), 10.0).unwrap_err();
        assert!(err.contains("went down"), "{err}");
        assert!(exit_rates(&BTreeMap::new(), &BTreeMap::new(), 0.0).is_err());
    }

    #[test]
    fn a_malformed_list_is_an_error_with_the_text() {
        assert!(parse_domain_list("not json").unwrap_err().contains("not JSON"));
        assert!(parse_domain_list(r#"{"domains":[{"id":1,"exits":{"io":-1}}]}"#).unwrap_err().contains("exits.io"));
        assert!(parse_domain_list(r#"{"free_frames":1}"#).unwrap_err().contains("no domains"));
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
