//! System tests of fleet levelling and Prometheus scraping (issue 15 items 4 and 5),
//! with two hosts simulated on one machine: QEMU `-cpu EPYC` (AMD) as hypervisor `a`
//! and QEMU `-cpu Dhyana` (Hygon) as `b`, each with its own vsock backend.
//!
//! - `fleet-*`: `hvctl cpuid dump --connect` must give exactly the dump the boot image
//!   recorded for that CPU model (`levelling/testdata/qemu-7.2-tcg-*.cpuid`, captured
//!   without any guest); `cpuid level --from A,B` must equal `cpuid level` over the two
//!   fetched dumps; `cpuid check --on` must accept the levelled policy on both hosts
//!   and refuse EPYC's host-max on the Hygon host.
//! - `prometheus-*`: each hypervisor runs a memwriter and is served by its host agent
//!   (`hvctl agent serve --metrics`, certificates by `hvctl agent init`) on its own
//!   loopback address, 127.0.0.2 and 127.0.0.3, TLS and `/metrics` alike;
//!   `promtool check metrics` must accept both formats; a real Prometheus (Debian's
//!   package, started here with a generated configuration, a 1 s scrape interval and
//!   its storage under the run directory, on 127.0.0.1) scrapes both, and its HTTP API
//!   must show each domain's `hv_domain_vm_exits_total` increasing between scrapes.
//!
//! Every process started here is killed when the test ends, failed or not ([`Procs`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent_tests::{AgentProcess, free_port, operator_tls, spawn_agent};
use crate::emulator::{Platform, RunConfig, Session};
use crate::image::Esp;
use crate::serial::clean;
use crate::systest::{NamedTest, build_hvctl, hvctl_output, run_each, select, stopped_serving, wait_for, wait_serving};
use crate::{Result, tools};

/// The CPU models, their names in the tests, and the dump the boot image recorded.
const HOSTS: [(&str, &str, &str); 2] =
    [("a", "EPYC", "qemu-7.2-tcg-epyc.cpuid"), ("b", "Dhyana", "qemu-7.2-tcg-dhyana.cpuid")];
/// The agents' loopback addresses, one per host (Linux routes all of 127/8 to lo).
const EXPORTER_IPS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];
/// A memwriter that runs practically for ever, yielding (a VM exit) every page.
const WRITER_CMDLINE: &str = "pages=16 rounds=100000000 seed=5 base=0x300000 every=1";

struct Ctx {
    hvctl: PathBuf,
    guests: PathBuf,
    /// Where the tests write their files (dumps, Prometheus' configuration and data).
    dir: PathBuf,
    sessions: [Session; 2],
}

const TESTS: &[NamedTest<Ctx>] = &[
    ("fleet-cpuid-dump-live-equals-the-recorded-dump", dump_live),
    ("fleet-cpuid-level-from-two-hypervisors-equals-level-of-their-dumps", level_from),
    ("fleet-cpuid-check-on-a-hypervisor", check_on),
    ("fleet-cpuid-level-and-check-through-two-agents", through_agents),
    ("prometheus-promtool-accepts-both-formats", promtool_formats),
    ("prometheus-server-scrapes-two-agents-vm-exits-increase", prometheus_server),
];

/// Boot the two hosts and run the tests matching `filter`.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let selected = select(TESTS, filter);
    if selected.is_empty() {
        return Ok((0, 0));
    }
    let platforms = HOSTS.map(|(_, cpu, _)| Platform::Qemu { cpu: cpu.into() });
    tools::ensure(&platforms[0])?;
    if selected.iter().any(|(n, _)| n.starts_with("prometheus-")) {
        tools::ensure_prometheus()?;
    }
    let hvctl = build_hvctl()?;
    let timeout = Duration::from_secs(platforms[0].default_timeout_secs() + 600);
    let config = |name: &str| RunConfig {
        name: format!("fleet-{name}"),
        timeout,
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    println!("systest fleet-*/prometheus-* on {} (a) and {} (b), virtio-vsock ...", platforms[0], platforms[1]);
    let sessions = [
        Session::spawn(&platforms[0], esp, &config(HOSTS[0].0))?,
        Session::spawn(&platforms[1], esp, &config(HOSTS[1].0))?,
    ];
    let dir = sessions[0].dir.parent().unwrap_or(Path::new(".")).join("fleet-tests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut ctx = Ctx { hvctl, guests: esp.dir.join("EFI").join("HV"), dir, sessions };
    for (i, session) in ctx.sessions.iter_mut().enumerate() {
        if let Err(wait) = wait_serving(session, Duration::from_secs(platforms[i].default_timeout_secs())) {
            println!("systest fleet-* ... FAILED: {}'s control channel did not come up ({wait})", HOSTS[i].0);
            print_logs(&ctx);
            return Ok((0, selected.len()));
        }
    }
    let (passed, mut failed) = run_each(&selected, &ctx);
    for (i, s) in ctx.sessions.iter().enumerate() {
        failed += stopped_serving("fleet-*", HOSTS[i].0, s);
    }
    if failed > 0 {
        print_logs(&ctx);
    }
    for s in &mut ctx.sessions {
        s.stop();
    }
    Ok((passed, failed))
}

fn print_logs(ctx: &Ctx) {
    for (i, s) in ctx.sessions.iter().enumerate() {
        println!(
            "---- serial log of {} ({}) ----\n{}\n---- end of serial log ----",
            HOSTS[i].0,
            s.dir.display(),
            clean(&s.serial())
        );
    }
}

fn target(session: &Session) -> String {
    let socket = session.vsock_socket.as_deref().unwrap_or(Path::new("/nonexistent"));
    format!("unix:{}:{}", socket.display(), wire::CONTROL_PORT)
}

/// Run hvctl with `args`, requiring exit code `want`; its stdout.
fn hvctl_expect(ctx: &Ctx, args: &[&str], want: i32) -> Result<String> {
    let (code, stdout, stderr) = hvctl_output(&ctx.hvctl, args)?;
    if code != Some(want) {
        return Err(format!("hvctl {} exited with {code:?} (want {want}): {}", args.join(" "), stderr.trim()));
    }
    Ok(stdout)
}

fn data_lines(dump: &str) -> Vec<&str> {
    dump.lines().filter(|l| !l.starts_with('#')).collect()
}

/// Fields that mirror the reading OS's control registers rather than the CPU (leaf,
/// subleaf, register index in EAX..EDX, mask): 1.ECX[27] OSXSAVE (CR4.OSXSAVE),
/// 7.0.ECX[4] OSPKE (CR4.PKE), and 0xD.0.EBX / 0xD.1.EBX, the XSAVE area size for the
/// features XCR0 (and XSS) enable now (SDM Vol. 2A CPUID leaf 0DH). The recorded dumps
/// were read early in boot (`cpuid-dump`), `HostCpuid`'s after the hypervisor turned
/// XSAVE and AVX state on; everything else must be equal.
const OS_BITS: [(u32, u32, usize, u32); 4] =
    [(1, 0, 2, 1 << 27), (7, 0, 2, 1 << 4), (0xd, 0, 1, u32::MAX), (0xd, 1, 1, u32::MAX)];

/// The data records of a dump as numbers, with [`OS_BITS`] cleared.
fn os_bits_cleared(dump: &str) -> Vec<[u32; 6]> {
    data_lines(dump)
        .iter()
        .map(|l| {
            let mut r = [0u32; 6];
            for (slot, h) in r.iter_mut().zip(l.split(' ')) {
                *slot = u32::from_str_radix(h, 16).unwrap_or(u32::MAX);
            }
            for (leaf, sub, reg, mask) in OS_BITS {
                if r[0] == leaf && r[1] == sub {
                    r[2 + reg] &= !mask;
                }
            }
            r
        })
        .collect()
}

/// Fetch both hosts' dumps live into files; their paths.
fn fetch_dumps(ctx: &Ctx) -> Result<[PathBuf; 2]> {
    let mut out = [PathBuf::new(), PathBuf::new()];
    for (i, s) in ctx.sessions.iter().enumerate() {
        let path = ctx.dir.join(format!("{}.cpuid", HOSTS[i].0));
        let p = path.display().to_string();
        hvctl_expect(ctx, &["cpuid", "dump", "--connect", &target(s), "-o", &p], 0)?;
        out[i] = path;
    }
    Ok(out)
}

fn dump_live(ctx: &Ctx) -> Result<String> {
    let files = fetch_dumps(ctx)?;
    let mut detail = Vec::new();
    for (i, (name, cpu, recorded)) in HOSTS.iter().enumerate() {
        let live = std::fs::read_to_string(&files[i]).map_err(|e| format!("{}: {e}", files[i].display()))?;
        let path = tools::root().join("levelling/testdata").join(recorded);
        let want = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (l, w) = (os_bits_cleared(&live), os_bits_cleared(&want));
        if l != w {
            let first = l.iter().zip(&w).position(|(a, b)| a != b).unwrap_or(l.len().min(w.len()));
            return Err(format!(
                "{name} (-cpu {cpu}): the live dump differs from {recorded} (OS bits aside) at record {first}: live \
                 {:x?}, recorded {:x?} ({} and {} records)",
                l.get(first),
                w.get(first),
                l.len(),
                w.len()
            ));
        }
        // The vendor string, read from leaf 0 of the live dump (EBX, EDX, ECX).
        let leaf0 = l.first().copied().unwrap_or_default();
        let vendor: String =
            [leaf0[3], leaf0[5], leaf0[4]].iter().flat_map(|v| v.to_le_bytes()).map(char::from).collect();
        let want_vendor = if *cpu == "EPYC" { "AuthenticAMD" } else { "HygonGenuine" };
        if vendor != want_vendor {
            return Err(format!("{name}: vendor {vendor:?} in the live dump, expected {want_vendor}"));
        }
        // Leaf 1 ECX as read: the hypervisor runs with CR4.OSXSAVE, the early reading not.
        fn leaf1_ecx(d: &str) -> Option<&str> {
            d.lines().find(|r| r.starts_with("00000001 "))?.split(' ').nth(4)
        }
        detail.push(format!(
            "{name}: {} records = {recorded} but OS bits, {vendor}, max basic leaf {:#x}, 1.ECX {} live / {} recorded",
            l.len(),
            leaf0[2],
            leaf1_ecx(&live).unwrap_or("?"),
            leaf1_ecx(&want).unwrap_or("?")
        ));
    }
    Ok(detail.join("; "))
}

/// `cpuid level --json` without the host labels (file names or targets).
fn level_json(ctx: &Ctx, args: &[&str]) -> Result<serde_json::Value> {
    level_json_with(ctx, &[], args)
}

/// The same with global arguments (`global`, e.g. the TLS flags) first.
fn level_json_with(ctx: &Ctx, global: &[&str], args: &[&str]) -> Result<serde_json::Value> {
    let mut all = global.to_vec();
    all.extend(["cpuid", "level", "--json"]);
    all.extend_from_slice(args);
    let out = hvctl_expect(ctx, &all, 0)?;
    let mut v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("level --json: {e}: {out}"))?;
    v["presented"]["from"] = serde_json::Value::Null;
    for h in v["hosts"].as_array_mut().into_iter().flatten() {
        h["host"] = serde_json::Value::Null;
        h["source"] = serde_json::Value::Null;
    }
    for c in v["caveats"].as_array_mut().into_iter().flatten() {
        c["hosts"] = serde_json::Value::Null;
    }
    Ok(v)
}

fn level_from(ctx: &Ctx) -> Result<String> {
    let files = fetch_dumps(ctx)?;
    let from = format!("{},{}", target(&ctx.sessions[0]), target(&ctx.sessions[1]));
    let live = level_json(ctx, &["--from", &from])?;
    let f: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let over_files = level_json(ctx, &[&f[0], &f[1]])?;
    if live != over_files {
        return Err(format!("level --from differs from level over the dumps:\n{live}\n{over_files}"));
    }
    if live["hosts"].as_array().map(Vec::len) != Some(2) {
        return Err(format!("level --from levelled {} hosts, not 2", live["hosts"]));
    }
    Ok(format!("policy hash {} over AMD and Hygon: {}", live["policy_hash"], live["spec"]))
}

fn check_on(ctx: &Ctx) -> Result<String> {
    let [ta, tb] = [target(&ctx.sessions[0]), target(&ctx.sessions[1])];
    let levelled = ctx.dir.join("levelled.policy").display().to_string();
    hvctl_expect(ctx, &["cpuid", "level", "--from", &format!("{ta},{tb}"), "-o", &levelled], 0)?;
    for t in [&ta, &tb] {
        let out = hvctl_expect(ctx, &["cpuid", "check", &levelled, "--on", t], 0)?;
        if !out.starts_with(&format!("compatible: {levelled} can run on {t}")) {
            return Err(format!("check --on {t}: {out}"));
        }
    }
    let max = ctx.dir.join("epyc-max.policy").display().to_string();
    hvctl_expect(ctx, &["cpuid", "policy", "base=host-max", "--on", &ta, "-o", &max], 0)?;
    let out = hvctl_expect(ctx, &["cpuid", "check", &max, "--on", &tb], 1)?;
    let reasons = out.lines().filter(|l| l.starts_with("  - ")).count();
    if !out.starts_with(&format!("incompatible: {max} cannot run on {tb}")) || reasons == 0 {
        return Err(format!("EPYC's host-max on the Hygon host: {out}"));
    }
    Ok(format!("levelled policy runs on both; EPYC host-max refused on Hygon ({reasons} reasons)"))
}

/// Fleet levelling as an operator elsewhere does it: `cpuid level --from` and `cpuid
/// check --on` over `tls://` URLs of the two host agents (hvctl talks only to them);
/// the levelled policy must equal the one levelled from the hypervisors directly.
fn through_agents(ctx: &Ctx) -> Result<String> {
    let fleet = start_agents(ctx)?;
    let tls: Vec<&str> = fleet.tls.iter().map(String::as_str).collect();
    let [ua, ub] = &fleet.urls;
    let over_agents = level_json_with(ctx, &tls, &["--from", &format!("{ua},{ub}")])?;
    let direct = level_json(ctx, &["--from", &format!("{},{}", target(&ctx.sessions[0]), target(&ctx.sessions[1]))])?;
    if over_agents != direct {
        return Err(format!(
            "level --from over the agents differs from level --from the hypervisors:\n{over_agents}\n{direct}"
        ));
    }
    let levelled = ctx.dir.join("levelled-agents.policy").display().to_string();
    fn with<'a>(tls: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
        [tls, args].concat()
    }
    hvctl_expect(ctx, &with(&tls, &["cpuid", "level", "--from", &format!("{ua},{ub}"), "-o", &levelled]), 0)?;
    for u in [ua, ub] {
        let out = hvctl_expect(ctx, &with(&tls, &["cpuid", "check", &levelled, "--on", u]), 0)?;
        if !out.starts_with(&format!("compatible: {levelled} can run on {u}")) {
            return Err(format!("check --on {u}: {out}"));
        }
    }
    let max = ctx.dir.join("epyc-max-agents.policy").display().to_string();
    hvctl_expect(ctx, &with(&tls, &["cpuid", "policy", "base=host-max", "--on", ua, "-o", &max]), 0)?;
    let out = hvctl_expect(ctx, &with(&tls, &["cpuid", "check", &max, "--on", ub]), 1)?;
    if !out.starts_with(&format!("incompatible: {max} cannot run on {ub}")) {
        return Err(format!("EPYC's host-max on the Hygon host through agent b: {out}"));
    }
    Ok(format!(
        "policy hash {} levelled over {ua} and {ub} equals the direct one; it checks on both, EPYC host-max is refused on b",
        over_agents["policy_hash"]
    ))
}

/// Children that are killed (and reaped) when this goes out of scope, whatever
/// happened: the Prometheus server.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.0 GET (no chunked encoding, the server closes): (status, body).
fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}{path}: no HTTP head: {text}"))?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad status: {head}"))?;
    Ok((status, body.to_string()))
}

/// The two host agents as the operator and Prometheus reach them.
struct Fleet {
    /// Each agent's `/metrics`.
    metrics: [SocketAddr; 2],
    /// Each agent's hypervisor, `tls://HOST:PORT/NAME`.
    urls: [String; 2],
    /// The operator's `--tls-cert/--tls-key/--tls-ca` (identity `ops`, admin).
    tls: Vec<String>,
    /// Killed when dropped.
    _agents: Vec<AgentProcess>,
}

/// A memwriter on each host (once), then certificates (`hvctl agent init`) and a host
/// agent per host on its loopback address serving that host's hypervisor over TLS and
/// `/metrics` over HTTP.
fn start_agents(ctx: &Ctx) -> Result<Fleet> {
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    for s in &ctx.sessions {
        let t = target(s);
        let list = hvctl_expect(ctx, &["--connect", &t, "domain", "list", "--json"], 0)?;
        if !list.contains("\"metrics-writer\"") {
            let args = [
                "--connect",
                &t,
                "domain",
                "create",
                "--kernel",
                &kernel,
                "--name",
                "metrics-writer",
                "--memory",
                "8M",
            ];
            hvctl_expect(ctx, &[&args[..], &["--cmdline", WRITER_CMDLINE]].concat(), 0)?;
        }
    }
    let certs = ctx.dir.join("agents");
    let _ = std::fs::remove_dir_all(&certs);
    let tls: Vec<String> =
        EXPORTER_IPS.iter().map(|ip| Ok(format!("{ip}:{}", free_port(ip)?))).collect::<Result<_>>()?;
    let d = certs.display().to_string();
    let (a, b) = (format!("{}={}", HOSTS[0].0, tls[0]), format!("{}={}", HOSTS[1].0, tls[1]));
    hvctl_expect(ctx, &["agent", "init", "--dir", &d, "--agent", &a, "--agent", &b, "--client", "ops=admin"], 0)?;
    let mut addrs = Vec::new();
    let mut agents = Vec::new();
    for (i, s) in ctx.sessions.iter().enumerate() {
        let ip = EXPORTER_IPS[i];
        let addr: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse().map_err(|e| format!("{e}"))?;
        let (name, hypervisor) = (HOSTS[i].0, format!("{}={}", HOSTS[i].0, target(s)));
        agents.push(spawn_agent(&ctx.hvctl, &certs, name, &tls[i], &hypervisor, &["--metrics", &addr.to_string()])?);
        wait_for(&format!("agent {name}'s /metrics on {addr}"), 20, || Ok(TcpStream::connect(addr).is_ok()))?;
        addrs.push(addr);
    }
    Ok(Fleet {
        metrics: [addrs[0], addrs[1]],
        urls: [0, 1].map(|i| format!("tls://{}/{}", tls[i], HOSTS[i].0)),
        tls: operator_tls(&certs, "ops"),
        _agents: agents,
    })
}

/// `promtool check metrics` on `text`: (exit code, findings).
fn promtool(text: &str) -> Result<(Option<i32>, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    child.stdin.take().ok_or("no stdin")?.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok((o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))))
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

fn promtool_formats(ctx: &Ctx) -> Result<String> {
    let fleet = start_agents(ctx)?;
    let addrs = fleet.metrics;
    let mut detail = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let started = Instant::now();
        let (status, plain) = http_get(*addr, "/metrics", None)?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        if status != 200 {
            return Err(format!("{addr}: GET /metrics gave {status}: {plain}"));
        }
        if !plain.lines().any(|l| l == format!("hv_up{{hypervisor=\"{}\"}} 1", HOSTS[i].0)) {
            return Err(format!("{addr}: hv_up is not 1:\n{plain}"));
        }
        let (code, findings) = promtool(&plain)?;
        if code != Some(0) || !findings.trim().is_empty() {
            return Err(format!("promtool on the 0.0.4 text of {addr} ({code:?}): {findings}"));
        }
        let (_, om) = http_get(*addr, "/metrics", Some(OPENMETRICS))?;
        let samples = crate::control_tests::check_openmetrics(&om)?;
        // promtool 2.42 lints with the 0.0.4 parser, which reads an OpenMetrics counter
        // family `x` (samples `x_total`) as an untyped `x_total` without HELP: that
        // finding, once per counter family, is the only one allowed.
        let (code, findings) = promtool(&om)?;
        let expected: Vec<String> = om
            .lines()
            .filter_map(|l| {
                l.strip_prefix("# TYPE ")?.strip_suffix(" counter").map(|f| format!("{f}_total no help text"))
            })
            .collect();
        let other: Vec<&str> = findings.lines().filter(|l| !expected.iter().any(|e| e == l)).collect();
        if !other.is_empty() || !matches!(code, Some(0 | 3)) {
            return Err(format!("promtool on the OpenMetrics text of {addr} ({code:?}): {}", other.join("; ")));
        }
        let asking: f64 = plain
            .lines()
            .find_map(|l| l.strip_prefix(&format!("hv_scrape_duration_seconds{{hypervisor=\"{}\"}} ", HOSTS[i].0)))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{addr}: no hv_scrape_duration_seconds"))?;
        detail.push(format!(
            "{}: 0.0.4 clean, OpenMetrics {samples} samples ({} counter families read as untyped by promtool), \
             GET /metrics {took:.1} ms of which asking the hypervisor {:.1} ms",
            HOSTS[i].0,
            expected.len(),
            asking * 1e3
        ));
    }
    Ok(detail.join("; "))
}

/// Percent-encode a PromQL query for a URL.
fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An instant query: each result's labels and value.
fn query(addr: SocketAddr, q: &str) -> Result<Vec<(serde_json::Value, f64)>> {
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={}", url_encode(q)), None)?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("query {q}: {e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("query {q}: {status} {body}"));
    }
    Ok(v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse().ok()?)))
        .collect())
}

fn prometheus_server(ctx: &Ctx) -> Result<String> {
    let fleet = start_agents(ctx)?;
    let addrs = fleet.metrics;
    let mut procs = Procs(Vec::new());
    let dir = ctx.dir.join("prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = dir.join("prometheus.yml");
    let targets: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    let yml = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
         - job_name: hv\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(&config, yml).map_err(|e| format!("{}: {e}", config.display()))?;
    let web: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse().map_err(|e| format!("{e}"))?;
    let log = std::fs::File::create(dir.join("prometheus.log")).map_err(|e| e.to_string())?;
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start prometheus: {e}"))?;
    procs.0.push(("prometheus".into(), child));
    let log_tail = || {
        let text = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    // Both targets up, as Prometheus sees them.
    let ups = wait_for("Prometheus to scrape both agents (up == 1)", 60, || {
        Ok(query(web, "up == 1").map(|r| r.len() == 2).unwrap_or(false))
    });
    if let Err(e) = ups {
        return Err(format!("{e}; up: {:?}; prometheus log:\n{}", query(web, "up"), log_tail()));
    }
    let q = "sum by (hypervisor, domain) (hv_domain_vm_exits_total)";
    let series = |r: &[(serde_json::Value, f64)]| -> Vec<(String, String, f64)> {
        let mut v: Vec<(String, String, f64)> = r
            .iter()
            .map(|(m, x)| {
                (m["hypervisor"].as_str().unwrap_or("").into(), m["domain"].as_str().unwrap_or("").into(), *x)
            })
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    };
    let mut first = Vec::new();
    wait_for("each hypervisor's domain in hv_domain_vm_exits_total", 30, || {
        first = series(&query(web, q)?);
        Ok(HOSTS.iter().all(|(n, _, _)| first.iter().any(|s| s.0 == *n)))
    })
    .map_err(|e| format!("{e}: {first:?}"))?;
    let t0 = Instant::now();
    let mut second = Vec::new();
    wait_for("every domain's vm exits to increase in Prometheus", 30, || {
        second = series(&query(web, q)?);
        Ok(first.iter().all(|(h, d, v)| second.iter().any(|s| &s.0 == h && &s.1 == d && s.2 > *v)))
    })
    .map_err(|e| format!("{e}: first {first:?}, then {second:?}"))?;
    let after = t0.elapsed().as_secs_f64();
    // hv_up as Prometheus stored it, per hypervisor label.
    let up = query(web, "hv_up")?;
    if up.len() != 2 || up.iter().any(|(_, v)| *v != 1.0) {
        return Err(format!("hv_up in Prometheus: {up:?}"));
    }
    let shown: Vec<String> =
        first.iter().zip(&second).map(|(a, b)| format!("{} domain {}: {} -> {}", a.0, a.1, a.2, b.2)).collect();
    Ok(format!(
        "Prometheus {web} scraping agents' /metrics {} and {}: {} (within {after:.1} s)",
        addrs[0],
        addrs[1],
        shown.join(", ")
    ))
}
