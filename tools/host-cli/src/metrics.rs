//! Prometheus metrics for a set of hypervisors: collecting them over the control
//! protocol ([`collect`]), rendering them as OpenMetrics 1.0 or the Prometheus text
//! format 0.0.4 ([`Metrics::render`]), and a small HTTP/1.1 server for `GET /metrics`
//! ([`serve`]). `hvctl metrics serve|scrape` runs it over plain targets
//! ([`TargetSet`]); the host agent plugs in its own [`HypervisorSet`] (it owns the
//! connections, one per hypervisor, since a serial line carries one session).
//!
//! Not for: alerting rules, history or rates (Prometheus computes `rate()` from the
//! counters), nor TLS (the agent terminates it in front of [`serve_connection`], with
//! [`accept_loop`]'s limits).
//!
//! Every hypervisor of the set is reported: one that cannot be reached is `hv_up 0`
//! with no other series, never a failed scrape and never left out; one request that
//! fails on a reachable hypervisor is `hv_scrape_request_ok{request=...} 0`. Hardware
//! figures the hypervisor reports as not available (RDT occupancy and bandwidth on
//! QEMU) are absent, not zero.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use wire::{
    DirtyStatsReport, DomainListReport, ErrorCode, InfoReport, MigrateProgress, MonitorDomainStats, MonitorHwInfo,
    MonitorValue, Request, Response,
};

use crate::transport::{self, Client};
use crate::{CliError, connection_err, err};

/// The hypervisors one exporter covers. `call` sends one request to one of them and
/// returns its answer (a [`Response::Error`] is an answer, not an `Err`); `Err` means
/// it could not be reached or spoke nonsense.
pub trait HypervisorSet {
    /// The hypervisors' names (the `hypervisor` label), in the order to report them.
    fn names(&self) -> Vec<String>;
    /// One request to hypervisor `name`.
    fn call(&self, name: &str, req: &Request) -> Result<Response, CliError>;
    /// Sending migrations of hypervisor `name` that the set knows of: their latest
    /// progress. The control protocol has no request that lists them (the relay that
    /// drives a migration sees every `MigrateProgress`), so the agent, which relays
    /// host-to-host migrations, reports what it relays; plain targets know none.
    fn migrations(&self, name: &str) -> Vec<MigrateProgress> {
        let _ = name;
        Vec::new()
    }
}

/// The two text formats [`serve`] offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0`): counter
    /// families named without `_total`, `# UNIT` lines, `# EOF` last.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`): counter
    /// families named with `_total`, no `# UNIT`, no `# EOF`.
    Prometheus,
}

impl Format {
    /// The `Content-Type` of this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics if it lists
    /// `application/openmetrics-text` with a non-zero quality, else 0.0.4 (what
    /// Prometheus falls back to, and what a browser or curl gets).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_om = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or("");
                let zero_q = parts
                    .any(|p| p.strip_prefix("q=").and_then(|q| q.trim().parse::<f64>().ok()).is_some_and(|q| q <= 0.0));
                media.eq_ignore_ascii_case("application/openmetrics-text") && !zero_q
            })
        });
        if wants_om { Format::OpenMetrics } else { Format::Prometheus }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// One metric family: its metadata and samples (label pairs, value).
#[derive(Debug)]
struct Family {
    kind: Kind,
    unit: Option<&'static str>,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, String)>,
}

/// Collected metrics, families in the order first seen (a family's samples always
/// render together, as both formats require).
#[derive(Debug, Default)]
pub struct Metrics {
    order: Vec<&'static str>,
    families: BTreeMap<&'static str, Family>,
    /// The hypervisors that did not answer (`hv_up 0`), in order.
    pub down: Vec<String>,
}

/// Escape a label value (both formats): backslash, double quote, newline.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

impl Metrics {
    /// Add a sample to family `name` (a counter's name without `_total`).
    fn add(
        &mut self,
        name: &'static str,
        kind: Kind,
        unit: Option<&'static str>,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: impl ToString,
    ) {
        let fam = self.families.entry(name).or_insert_with(|| {
            self.order.push(name);
            Family { kind, unit, help, samples: Vec::new() }
        });
        fam.samples.push((labels, value.to_string()));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: Vec<(&'static str, String)>, v: impl ToString) {
        let unit = unit_of(name);
        self.add(name, Kind::Gauge, unit, help, labels, v);
    }

    fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        v: impl ToString,
    ) {
        let unit = unit_of(name);
        self.add(name, Kind::Counter, unit, help, labels, v);
    }

    /// Append `other`'s samples, family by family (new families after ours).
    fn merge(&mut self, other: Metrics) {
        let Metrics { order, mut families, down } = other;
        for name in order {
            let Some(f) = families.remove(name) else { continue };
            match self.families.get_mut(name) {
                Some(mine) => mine.samples.extend(f.samples),
                None => {
                    self.order.push(name);
                    self.families.insert(name, f);
                }
            }
        }
        self.down.extend(down);
    }

    /// The text of `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        for name in &self.order {
            let Some(f) = self.families.get(name) else { continue };
            let (kind, sample_name) = match f.kind {
                Kind::Gauge => ("gauge", name.to_string()),
                Kind::Counter => ("counter", format!("{name}_total")),
            };
            // OpenMetrics names a counter family without `_total`; 0.0.4 names it
            // after its samples (promtool checks that counters end in `_total`).
            let family = if format == Format::OpenMetrics { name.to_string() } else { sample_name.clone() };
            let help = f.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} {kind}");
            if let (Format::OpenMetrics, Some(unit)) = (format, f.unit) {
                let _ = writeln!(out, "# UNIT {family} {unit}");
            }
            for (labels, value) in &f.samples {
                out.push_str(&sample_name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            }
        }
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

/// OpenMetrics wants `# UNIT` only when the name ends in `_<unit>`; ours are the base
/// units `bytes` and `seconds`.
fn unit_of(name: &str) -> Option<&'static str> {
    ["bytes", "seconds"].into_iter().find(|u| name.ends_with(&format!("_{u}")))
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The first word of a domain state ("crashed: triple fault ..." is `crashed`): a
/// label value with few values, the sentence being in the console and `domain list`.
fn state_word(state: &str) -> String {
    state.split([':', ' ', '(']).next().unwrap_or(state).to_string()
}

/// Collect every hypervisor of `set`, all at once (one thread each), so a hypervisor
/// that takes its connect timeout to fail delays the scrape by that once, not once
/// per unreachable hypervisor.
pub fn collect(set: &(dyn HypervisorSet + Sync)) -> Metrics {
    let names = set.names();
    let parts: Vec<(Metrics, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                scope.spawn(move || {
                    let mut m = Metrics::default();
                    let started = Instant::now();
                    let up = collect_one(set, name, &mut m);
                    m.gauge(
                        "hv_scrape_duration_seconds",
                        "How long the exporter took to ask this hypervisor everything in this scrape",
                        vec![("hypervisor", name.clone())],
                        started.elapsed().as_secs_f64(),
                    );
                    (m, up)
                })
            })
            .collect();
        // A collecting thread that panicked is a hypervisor not reported: down.
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut all = Metrics::default();
    for (name, (m, up)) in names.into_iter().zip(parts) {
        all.merge(m);
        if !up {
            all.down.push(name);
        }
    }
    all
}

/// [`collect`], rendered as OpenMetrics: the host agent's entry point (hvctl's own
/// commands use [`collect`] to learn which hypervisors are down as well).
#[cfg_attr(not(test), allow(dead_code))]
pub fn scrape(set: &(dyn HypervisorSet + Sync)) -> String {
    collect(set).render(Format::OpenMetrics)
}

/// What one request returned, for `hv_scrape_request_ok`: `None` when it failed (the
/// failure is reported as a 0 sample).
fn ask<T>(
    set: &dyn HypervisorSet,
    hv: &str,
    m: &mut Metrics,
    req: &Request,
    pick: impl FnOnce(Response) -> Option<T>,
) -> Option<T> {
    let got = match set.call(hv, req) {
        Ok(Response::Error(_)) | Err(_) => None,
        Ok(r) => pick(r),
    };
    let labels = vec![("hypervisor", hv.to_string()), ("request", req.name().to_string())];
    m.gauge("hv_scrape_request_ok", REQUEST_OK_HELP, labels, u8::from(got.is_some()));
    got
}

const REQUEST_OK_HELP: &str =
    "Whether the exporter's request to the hypervisor succeeded in this scrape (0: run hvctl to see the error)";

/// Collect hypervisor `hv` into `m`; false if it did not answer.
fn collect_one(set: &dyn HypervisorSet, hv: &str, m: &mut Metrics) -> bool {
    let l = |extra: &[(&'static str, String)]| {
        let mut v = vec![("hypervisor", hv.to_string())];
        v.extend_from_slice(extra);
        v
    };
    // Reachable means: it answers (even with an error). Nothing else is asked of one
    // that does not.
    let info = set.call(hv, &Request::Info);
    m.gauge("hv_up", "Whether the hypervisor answered the exporter (1) or not (0)", l(&[]), u8::from(info.is_ok()));
    let Ok(info) = info else { return false };
    let ok = matches!(info, Response::Info(_));
    m.gauge("hv_scrape_request_ok", REQUEST_OK_HELP, l(&[("request", String::from("info"))]), u8::from(ok));
    if let Response::Info(info) = info {
        info_metrics(&info, &l, m);
    }
    if let Some(list) = ask(set, hv, m, &Request::DomainList, |r| match r {
        Response::DomainList(d) => Some(d),
        _ => None,
    }) {
        domain_metrics(&list, &l, m);
        for d in &list.domains {
            // Refused: this domain is not in log-dirty mode (or just went away): no
            // series. Anything else is a failure, reported as such.
            match set.call(hv, &Request::DirtyStats { domain: d.id }) {
                Ok(Response::DirtyStats(s)) => dirty_metrics(&s, &l, m),
                Ok(Response::Error(e)) if e.code == ErrorCode::Refused => {}
                _ => m.gauge(
                    "hv_scrape_request_ok",
                    REQUEST_OK_HELP,
                    l(&[("request", String::from("dirty-stats")), ("domain", d.id.to_string())]),
                    0,
                ),
            }
        }
    }
    if let Some(hw) = ask(set, hv, m, &Request::MonitorHwInfo, |r| match r {
        Response::MonitorHwInfo(h) => Some(h),
        _ => None,
    }) {
        hwinfo_metrics(&hw, &l, m);
    }
    if let Some(stats) = ask(set, hv, m, &Request::MonitorStats { domain: None }, |r| match r {
        Response::MonitorStats(s) => Some(s),
        _ => None,
    }) {
        monitor_metrics(&stats, &l, m);
    }
    for p in set.migrations(hv) {
        migration_metrics(&p, &l, m);
    }
    true
}

type Labels<'a> = &'a dyn Fn(&[(&'static str, String)]) -> Vec<(&'static str, String)>;

fn info_metrics(i: &InfoReport, l: Labels<'_>, m: &mut Metrics) {
    m.gauge(
        "hv_info",
        "The hypervisor's version and the protocol it speaks (always 1)",
        l(&[("version", i.hv_version.clone()), ("protocol", i.protocol_version.to_string())]),
        1,
    );
    m.gauge("hv_uptime_seconds", "Time since the hypervisor took the machine", l(&[]), secs(i.uptime_ns));
    m.gauge("hv_cpus", "Logical CPUs the hypervisor runs on", l(&[]), i.cpus);
    m.gauge("hv_memory_bytes", "Memory the hypervisor manages", l(&[]), i.memory_bytes);
    let u = &i.memory_use;
    m.gauge("hv_heap_size_bytes", "The hypervisor's heap", l(&[]), u.heap_bytes);
    m.gauge("hv_heap_used_bytes", "Heap in use", l(&[]), u.heap_used_bytes);
    m.gauge("hv_heap_peak_bytes", "The most heap in use at once since boot", l(&[]), u.heap_peak_bytes);
    m.counter("hv_heap_refused_allocations", "Allocations the heap refused since boot", l(&[]), u.heap_refused);
    m.gauge("hv_frames", "4 KiB frames in the hypervisor's frame pool", l(&[]), u.frames_total);
    m.gauge("hv_frames_free", "Free frames of the pool", l(&[]), u.frames_free);
    for s in &i.services {
        let sl = || l(&[("service", s.service.name().to_string())]);
        let mut state = sl();
        state.push(("state", s.state.name().to_string()));
        m.gauge("hv_service_state", "A service task's life-cycle state (always 1)", state, 1);
        m.counter("hv_service_requests", "Requests a service answered", sl(), s.handled);
        m.counter("hv_service_errors", "Requests a service answered with an error", sl(), s.errors);
        m.gauge("hv_service_queue_depth", "Requests waiting in a service's mailbox", sl(), s.queue_depth);
    }
}

fn domain_metrics(list: &DomainListReport, l: Labels<'_>, m: &mut Metrics) {
    m.gauge("hv_domains", "Domains on the hypervisor, in any state", l(&[]), list.domains.len());
    for d in &list.domains {
        let dl = || l(&[("domain", d.id.to_string())]);
        let mut info = dl();
        info.push(("name", d.name.clone()));
        m.gauge("hv_domain_info", "A domain's name (always 1)", info, 1);
        let mut state = dl();
        state.push(("state", state_word(&d.state)));
        m.gauge("hv_domain_state", "A domain's state: running, paused, crashed, ... (always 1)", state, 1);
        m.gauge("hv_domain_vcpus", "A domain's vCPUs", dl(), d.vcpus);
        m.gauge("hv_domain_memory_bytes", "A domain's guest memory", dl(), d.memory_bytes);
        m.counter("hv_domain_runtime_seconds", "Time a domain's vCPUs ran in the guest", dl(), secs(d.runtime_ns));
        for (reason, n) in &d.exits {
            let mut r = dl();
            r.push(("reason", reason.clone()));
            m.counter("hv_domain_vm_exits", "A domain's VM exits, by exit reason", r, n);
        }
    }
}

fn dirty_metrics(s: &DirtyStatsReport, l: Labels<'_>, m: &mut Metrics) {
    let dl = || l(&[("domain", s.domain.to_string()), ("mode", s.mode.clone())]);
    m.counter(
        "hv_domain_dirty_pages_logged",
        "Pages newly logged dirty since log-dirty mode started (rate() is the dirty rate)",
        dl(),
        s.pages_dirtied,
    );
    m.gauge("hv_domain_dirty_pages", "Pages dirty now (not yet cleaned)", dl(), s.dirty_now);
    m.counter("hv_domain_dirty_rounds", "Log-dirty peek-and-clean rounds", dl(), s.rounds);
    m.counter("hv_domain_dirty_logging_exits", "VM exits log-dirty mode caused", dl(), s.logging_exits);
    m.gauge("hv_domain_dirty_tracked_pages", "Pages log-dirty mode tracks", dl(), s.range_pages);
}

fn hwinfo_metrics(hw: &MonitorHwInfo, l: Labels<'_>, m: &mut Metrics) {
    m.gauge(
        "hv_monitor_hw_present",
        "Whether the CPU monitors L3 occupancy and memory bandwidth (RDT CMT/MBM, AMD PQoS)",
        l(&[]),
        u8::from(hw.present),
    );
    if hw.present {
        m.gauge("hv_monitor_rmids_usable", "RMIDs the hypervisor can hand to domains", l(&[]), hw.usable_rmids);
    }
}

fn monitor_metrics(stats: &[MonitorDomainStats], l: Labels<'_>, m: &mut Metrics) {
    for d in stats {
        for (event, v) in &d.events {
            let el = || l(&[("domain", d.domain.to_string()), ("event", event.clone())]);
            match v {
                MonitorValue::Count(n) => {
                    m.counter("hv_domain_monitor_events", "A domain's enabled monitoring event counts", el(), n);
                }
                MonitorValue::ByReason(list) => {
                    for (reason, n) in list {
                        let mut r = el();
                        r.push(("reason", reason.clone()));
                        m.counter(
                            "hv_domain_monitor_events_by_reason",
                            "A domain's enabled monitoring event counts, by exit reason",
                            r,
                            n,
                        );
                    }
                }
                MonitorValue::Occupancy { residual_bytes, per_socket, .. } => {
                    let dl = || l(&[("domain", d.domain.to_string())]);
                    for (socket, b) in per_socket.iter().enumerate() {
                        let mut s = dl();
                        s.push(("socket", socket.to_string()));
                        m.gauge("hv_domain_llc_occupancy_bytes", "A domain's L3 cache occupancy, per socket", s, b);
                    }
                    m.gauge(
                        "hv_domain_llc_residual_bytes",
                        "L3 occupancy still under RMIDs a domain left in limbo",
                        dl(),
                        residual_bytes,
                    );
                }
                MonitorValue::Bandwidth { bytes, bytes_per_sec, per_socket } => {
                    m.counter(
                        "hv_domain_memory_traffic_bytes",
                        "A domain's memory traffic since the event was enabled (mbm_total, mbm_local)",
                        el(),
                        bytes,
                    );
                    // Per-socket rates are 0 while unknown: only report known ones.
                    if bytes_per_sec.is_some() {
                        for (socket, r) in per_socket.iter().enumerate() {
                            let mut s = el();
                            s.push(("socket", socket.to_string()));
                            m.gauge(
                                "hv_domain_memory_bandwidth_bytes_per_second",
                                "A domain's memory bandwidth over the latest sample, per socket",
                                s,
                                r,
                            );
                        }
                    }
                }
                MonitorValue::NotAvailable(_) => {}
            }
        }
    }
}

fn migration_metrics(p: &MigrateProgress, l: Labels<'_>, m: &mut Metrics) {
    let ml = || l(&[("domain", p.domain.to_string()), ("session", p.session.to_string())]);
    let mut state = ml();
    state.push(("state", p.state.map_or("unknown", |s| s.name()).to_string()));
    m.gauge("hv_migration_state", "A sending migration's state (always 1)", state, 1);
    m.gauge("hv_migration_round", "A sending migration's dirty round (0: the full copy)", ml(), p.round);
    m.gauge("hv_migration_pages", "The migrating domain's pages", ml(), p.pages_total);
    m.counter("hv_migration_pages_sent", "Pages sent so far, all rounds", ml(), p.pages_sent);
    m.counter("hv_migration_sent_bytes", "Stream bytes sent so far", ml(), p.bytes_sent);
    m.gauge("hv_migration_dirty_pages", "Pages the last peek found dirty", ml(), p.dirty_pages);
    m.gauge("hv_migration_bandwidth_bytes_per_second", "Measured migration bandwidth", ml(), p.bandwidth_bytes_per_sec);
    m.gauge(
        "hv_migration_estimated_downtime_seconds",
        "The downtime a stop now would take",
        ml(),
        p.estimated_downtime_ms as f64 / 1e3,
    );
}

/// One job for a [`TargetSet`] worker: a request and where to send its answer.
type Job = (Request, mpsc::Sender<Result<Response, CliError>>);

/// A [`HypervisorSet`] over `--connect` targets: one worker thread per hypervisor
/// owns its connection (a `Client` is not `Send`, and a serial line carries one
/// session), connects on first use and again after any failure.
pub struct TargetSet {
    hvs: Vec<(String, Mutex<mpsc::Sender<Job>>)>,
}

impl TargetSet {
    /// Workers for `(name, target)` pairs; `timeout` bounds each connection attempt.
    /// Names must be unique and not empty; targets must parse.
    pub fn new(pairs: &[(String, String)], timeout: Duration) -> Result<TargetSet, CliError> {
        let mut hvs = Vec::new();
        for (i, (name, target)) in pairs.iter().enumerate() {
            if name.is_empty() {
                return Err(err(format!("--hypervisor ={target}: the name is empty (NAME=TARGET)")));
            }
            if pairs.iter().take(i).any(|(n, _)| n == name) {
                return Err(err(format!("--hypervisor {name}: the name is given twice")));
            }
            transport::parse_target(target).map_err(|e| err(format!("--hypervisor {name}: {e}")))?;
            let (tx, rx) = mpsc::channel::<Job>();
            let opts = transport::Options { connect: Some(target.clone()), timeout };
            std::thread::Builder::new()
                .name(format!("hv-{name}"))
                .spawn(move || worker(&opts, &rx))
                .map_err(|e| err(format!("cannot start a thread for {name}: {e}")))?;
            hvs.push((name.clone(), Mutex::new(tx)));
        }
        Ok(TargetSet { hvs })
    }
}

fn worker(opts: &transport::Options, jobs: &mpsc::Receiver<Job>) {
    let mut client: Option<Client> = None;
    while let Ok((req, reply)) = jobs.recv() {
        let result = match client.take() {
            Some(c) => Ok(c),
            None => Client::connect(opts),
        }
        .and_then(|mut c| {
            let r = c.call(&req);
            if r.is_ok() {
                client = Some(c);
            }
            r
        });
        let _ = reply.send(result);
    }
}

impl HypervisorSet for TargetSet {
    fn names(&self) -> Vec<String> {
        self.hvs.iter().map(|(n, _)| n.clone()).collect()
    }

    fn call(&self, name: &str, req: &Request) -> Result<Response, CliError> {
        let (_, tx) = self
            .hvs
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| err(format!("no hypervisor named {name} in this exporter")))?;
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.lock()
            .map_err(|_| connection_err(format!("{name}: its connection thread failed")))?
            .send((req.clone(), reply_tx))
            .map_err(|_| connection_err(format!("{name}: its connection thread stopped")))?;
        reply_rx.recv().map_err(|_| connection_err(format!("{name}: its connection thread stopped")))?
    }
}

/// Parse `--hypervisor NAME=TARGET`.
pub fn parse_hypervisor(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, t)) if !n.is_empty() && !t.is_empty() => Ok((n.to_string(), t.to_string())),
        _ => Err(format!("expected NAME=TARGET (e.g. a=unix:/tmp/hv.vsock:5000), not {s:?}")),
    }
}

/// The most bytes of a request head (request line and headers) [`serve`] reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head, in all.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 at once and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpRequest {
    /// `GET /metrics` (or HEAD), with its `Accept` header.
    Metrics {
        /// The `Accept` header, if any.
        accept: Option<String>,
        /// HEAD: headers only.
        head: bool,
    },
    /// Anything else: the status code and reason to answer with.
    Refuse(u16, &'static str),
}

/// Parse a complete request head (up to and including the blank line). Bounded by
/// its input, allocation-light, and total: any bytes give an answer, never a panic.
pub fn parse_request(head: &[u8]) -> HttpRequest {
    let Ok(text) = std::str::from_utf8(head) else { return HttpRequest::Refuse(400, "Bad Request") };
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return HttpRequest::Refuse(400, "Bad Request");
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return HttpRequest::Refuse(505, "HTTP Version Not Supported");
    }
    let mut accept = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else { return HttpRequest::Refuse(400, "Bad Request") };
        if k.trim().eq_ignore_ascii_case("accept") {
            accept = Some(v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return HttpRequest::Refuse(404, "Not Found");
    }
    match method {
        "GET" => HttpRequest::Metrics { accept, head: false },
        "HEAD" => HttpRequest::Metrics { accept, head: true },
        _ => HttpRequest::Refuse(405, "Method Not Allowed"),
    }
}

/// A stream [`serve_connection`] answers on: plain TCP, or the agent's TLS stream over
/// it. Timeouts are set on the socket underneath (a TLS read that times out is the
/// socket's read timing out).
pub trait HttpStream: Read + Write {
    /// The TCP socket carrying it.
    fn socket(&self) -> &TcpStream;
}

impl HttpStream for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

/// Read a request head from `stream`: the bytes up to the blank line, or the status
/// to refuse with (too large, too slow, closed).
pub fn read_head(stream: &mut impl HttpStream) -> Result<Vec<u8>, (u16, &'static str)> {
    let start = Instant::now();
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let left = REQUEST_DEADLINE.checked_sub(start.elapsed()).ok_or((408, "Request Timeout"))?;
        stream
            .socket()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|_| (500, "Internal Server Error"))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err((400, "Bad Request")),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err((408, "Request Timeout"));
            }
            Err(_) => return Err((400, "Bad Request")),
        };
        head.extend_from_slice(buf.get(..n).unwrap_or(&[]));
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if end + 4 > MAX_REQUEST_HEAD {
                return Err((431, "Request Header Fields Too Large"));
            }
            head.truncate(end + 4);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err((431, "Request Header Fields Too Large"));
        }
    }
}

/// Write one whole answer (the connection closes after it).
pub fn respond(
    stream: &mut impl HttpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) {
    let header = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.socket().set_write_timeout(Some(REQUEST_DEADLINE));
    let _ = stream.write_all(header.as_bytes());
    if !head_only {
        let _ = stream.write_all(body.as_bytes());
    }
    let _ = stream.flush();
}

/// Serve one HTTP request on `stream` and answer it; the caller closes the
/// connection. Public so the agent can call it on the plain side of its TLS streams.
pub fn serve_connection(stream: &mut impl HttpStream, set: &(dyn HypervisorSet + Sync)) {
    match read_head(stream).map(|h| parse_request(&h)) {
        Ok(HttpRequest::Metrics { accept, head }) => {
            let format = Format::negotiate(accept.as_deref());
            let body = collect(set).render(format);
            respond(stream, 200, "OK", format.content_type(), &body, head);
        }
        Ok(HttpRequest::Refuse(code, reason)) | Err((code, reason)) => {
            let body = format!("{code} {reason}: this exporter serves GET /metrics\n");
            respond(stream, code, reason, "text/plain; charset=utf-8", &body, false);
        }
    }
}

/// Serve `GET /metrics` on `listener` for ever: each connection on its own thread
/// (one slow client never holds up another), at most [`MAX_CONNECTIONS`] at once.
/// Does not return while the listener lives.
pub fn serve(listener: TcpListener, set: Arc<dyn HypervisorSet + Send + Sync>) -> Result<(), CliError> {
    let full = |mut stream: TcpStream| {
        let body = "too many connections\n";
        respond(&mut stream, 503, "Service Unavailable", "text/plain; charset=utf-8", body, false);
    };
    accept_loop(listener, MAX_CONNECTIONS, full, move |mut stream| serve_connection(&mut stream, set.as_ref()));
    Ok(())
}

/// Accept on `listener` for ever and run `each` on every connection in a thread of its
/// own, at most `max` at once; a connection over the limit goes to `full` (on the
/// accepting thread, so `full` must not wait for the client). The agent's TLS
/// `/metrics` uses it with its own `each` (handshake, identity) and `full`.
pub fn accept_loop(
    listener: TcpListener,
    max: usize,
    full: impl Fn(TcpStream),
    each: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let each = Arc::new(each);
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            // A client that went away between SYN and accept: not the server's problem.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            // Out of file descriptors and the like pass: say so, back off, go on
            // serving the clients that are already connected and the next ones.
            Err(e) => {
                eprintln!("hvctl metrics: accept failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= max {
            active.fetch_sub(1, Ordering::SeqCst);
            full(stream);
            continue;
        }
        let (conn_each, conn_active) = (Arc::clone(&each), Arc::clone(&active));
        let spawned = std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
            conn_each(stream);
            conn_active.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The thread never ran, so nobody else gives its slot back.
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Arguments of `hvctl metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    #[command(subcommand)]
    command: MetricsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MetricsCommand {
    /// Serve GET /metrics (OpenMetrics or Prometheus text, by the Accept header) for
    /// these hypervisors until killed.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:9100.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// A hypervisor to cover, NAME=TARGET (any --connect form); repeat for more.
        #[arg(long = "hypervisor", value_name = "NAME=TARGET", required = true, value_parser = parse_hypervisor)]
        hypervisors: Vec<(String, String)>,
    },
    /// Print one scrape of these hypervisors.
    Scrape {
        /// A hypervisor to cover, NAME=TARGET; repeat for more.
        #[arg(long = "hypervisor", value_name = "NAME=TARGET", required = true, value_parser = parse_hypervisor)]
        hypervisors: Vec<(String, String)>,
        /// `openmetrics` or `prometheus` (the text format 0.0.4).
        #[arg(long, default_value = "openmetrics", value_parser = ["openmetrics", "prometheus"])]
        format: String,
    },
}

/// Run `hvctl metrics …`; `timeout` is `--connect-timeout` (each connection attempt).
pub fn run(timeout: Duration, args: MetricsArgs) -> Result<std::process::ExitCode, CliError> {
    match args.command {
        MetricsCommand::Serve { listen, hypervisors } => {
            let set = TargetSet::new(&hypervisors, timeout)?;
            let listener = TcpListener::bind(&listen).map_err(|e| err(format!("cannot listen on {listen}: {e}")))?;
            let addr = listener.local_addr().map_or(listen, |a| a.to_string());
            println!("hvctl metrics: serving http://{addr}/metrics for {} hypervisor(s)", hypervisors.len());
            let _ = std::io::stdout().flush();
            serve(listener, Arc::new(set))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        MetricsCommand::Scrape { hypervisors, format } => {
            let set = TargetSet::new(&hypervisors, timeout)?;
            let m = collect(&set);
            let format = if format == "prometheus" { Format::Prometheus } else { Format::OpenMetrics };
            print!("{}", m.render(format));
            // The text says which are down; the exit code says it too, for scripts.
            if m.down.is_empty() {
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                let down: Vec<String> =
                    hypervisors.iter().filter(|(n, _)| m.down.contains(n)).map(|(n, t)| format!("{n} ({t})")).collect();
                Err(connection_err(format!("not reachable: {} (reported as hv_up 0)", down.join(", "))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{DomainInfo, ErrorReply, MemoryUse, ServiceId, ServiceState, ServiceStatus};

    /// How a fake hypervisor answers.
    type Answer = Box<dyn Fn(&Request) -> Response + Send + Sync>;

    /// A set whose hypervisors answer from fixed responses; `None` is unreachable.
    struct Fake {
        hvs: Vec<(String, Option<Answer>)>,
    }

    impl HypervisorSet for Fake {
        fn names(&self) -> Vec<String> {
            self.hvs.iter().map(|(n, _)| n.clone()).collect()
        }
        fn call(&self, name: &str, req: &Request) -> Result<Response, CliError> {
            match self.hvs.iter().find(|(n, _)| n == name) {
                Some((_, Some(f))) => Ok(f(req)),
                _ => Err(connection_err(format!("{name}: connection refused"))),
            }
        }
    }

    /// A set that relays one migration of hypervisor `a`, as the agent will.
    struct Relaying(Fake);

    impl HypervisorSet for Relaying {
        fn names(&self) -> Vec<String> {
            self.0.names()
        }
        fn call(&self, name: &str, req: &Request) -> Result<Response, CliError> {
            self.0.call(name, req)
        }
        fn migrations(&self, name: &str) -> Vec<MigrateProgress> {
            if name != "a" {
                return Vec::new();
            }
            vec![MigrateProgress {
                session: 3,
                domain: 1,
                state: Some(wire::SendState::Precopy),
                round: 2,
                pages_total: 2048,
                pages_sent: 2100,
                bytes_sent: 9_000_000,
                estimated_downtime_ms: 40,
                ..Default::default()
            }]
        }
    }

    #[test]
    fn migrations_the_set_relays_are_reported() {
        let text = collect(&Relaying(one("a", answer(Vec::new(), Vec::new())))).render(Format::Prometheus);
        for line in [
            "hv_migration_state{hypervisor=\"a\",domain=\"1\",session=\"3\",state=\"precopy\"} 1",
            "hv_migration_round{hypervisor=\"a\",domain=\"1\",session=\"3\"} 2",
            "hv_migration_pages_sent_total{hypervisor=\"a\",domain=\"1\",session=\"3\"} 2100",
            "hv_migration_sent_bytes_total{hypervisor=\"a\",domain=\"1\",session=\"3\"} 9000000",
            "hv_migration_estimated_downtime_seconds{hypervisor=\"a\",domain=\"1\",session=\"3\"} 0.04",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Plain targets know no migration: no series at all.
        let plain = collect(&one("a", answer(Vec::new(), Vec::new()))).render(Format::Prometheus);
        assert!(!plain.contains("hv_migration_"), "{plain}");
    }

    fn info() -> InfoReport {
        InfoReport {
            hv_version: "0.1.0 (abc)".into(),
            protocol_version: 7,
            uptime_ns: 2_500_000_000,
            capabilities: Vec::new(),
            cpus: 1,
            memory_bytes: 512 << 20,
            services: vec![ServiceStatus {
                service: ServiceId::Monitor,
                state: ServiceState::Running,
                handled: 9,
                errors: 1,
                queue_depth: 0,
                queue_capacity: 8,
            }],
            memory_use: MemoryUse {
                heap_bytes: 4096,
                heap_used_bytes: 1024,
                heap_peak_bytes: 2048,
                heap_refused: 0,
                frames_total: 100,
                frames_free: 60,
            },
            control: Vec::new(),
            cpu_list: Vec::new(),
        }
    }

    fn domain(id: u32, name: &str, state: &str) -> DomainInfo {
        DomainInfo {
            id,
            name: name.into(),
            state: state.into(),
            vcpus: 1,
            memory_bytes: 8 << 20,
            exits: vec![("io".into(), 5), ("hypercall".into(), 2)],
            runtime_ns: 1_000_000,
            unclaimed: Vec::new(),
            cpus: None,
        }
    }

    fn answer(domains: Vec<DomainInfo>, stats: Vec<MonitorDomainStats>) -> impl Fn(&Request) -> Response {
        move |req| match req {
            Request::Info => Response::Info(Box::new(info())),
            Request::DomainList => {
                Response::DomainList(DomainListReport { domains: domains.clone(), free_frames: 60, total_frames: 100 })
            }
            Request::DirtyStats { domain: 1 } => Response::DirtyStats(DirtyStatsReport {
                domain: 1,
                mode: "wp".into(),
                pages_dirtied: 40,
                dirty_now: 3,
                rounds: 2,
                logging_exits: 41,
                range_start: 0,
                range_pages: 2048,
            }),
            Request::DirtyStats { domain } => Response::Error(ErrorReply::new(
                ErrorCode::Refused,
                format!("domain {domain} is not in log-dirty mode"),
            )),
            Request::MonitorHwInfo => Response::MonitorHwInfo(MonitorHwInfo {
                present: false,
                reason: Some("CPUID.7.0:EBX.PQM = 0".into()),
                usable_rmids: 0,
                max_rmid: 0,
                sockets: 1,
                socket_cpus: vec![vec![0]],
                l3_bytes: 0,
                upscaling_factor: 0,
                counter_width: 0,
                hw_events: Vec::new(),
                all_events: Vec::new(),
            }),
            Request::MonitorStats { .. } => Response::MonitorStats(stats.clone()),
            other => Response::Error(ErrorReply::new(ErrorCode::NotImplemented, other.name())),
        }
    }

    fn one(name: &str, f: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Fake {
        Fake { hvs: vec![(name.into(), Some(Box::new(f)))] }
    }

    #[test]
    fn a_small_case_renders_exactly() {
        let set = one("a", answer(vec![domain(1, "w", "running")], Vec::new()));
        let text = collect(&set).render(Format::Prometheus);
        let expected = "\
# HELP hv_up Whether the hypervisor answered the exporter (1) or not (0)
# TYPE hv_up gauge
hv_up{hypervisor=\"a\"} 1
# HELP hv_scrape_request_ok Whether the exporter's request to the hypervisor succeeded in this scrape (0: run hvctl to see the error)
# TYPE hv_scrape_request_ok gauge
hv_scrape_request_ok{hypervisor=\"a\",request=\"info\"} 1
hv_scrape_request_ok{hypervisor=\"a\",request=\"domain-list\"} 1
hv_scrape_request_ok{hypervisor=\"a\",request=\"monitor-hwinfo\"} 1
hv_scrape_request_ok{hypervisor=\"a\",request=\"monitor-stats\"} 1
# HELP hv_info The hypervisor's version and the protocol it speaks (always 1)
# TYPE hv_info gauge
hv_info{hypervisor=\"a\",version=\"0.1.0 (abc)\",protocol=\"7\"} 1
# HELP hv_uptime_seconds Time since the hypervisor took the machine
# TYPE hv_uptime_seconds gauge
hv_uptime_seconds{hypervisor=\"a\"} 2.5
";
        assert_eq!(text.get(..expected.len()), Some(expected), "{text}");
        for line in [
            "hv_heap_used_bytes{hypervisor=\"a\"} 1024",
            "hv_frames_free{hypervisor=\"a\"} 60",
            "# TYPE hv_heap_refused_allocations_total counter",
            "hv_service_requests_total{hypervisor=\"a\",service=\"monitor\"} 9",
            "hv_service_state{hypervisor=\"a\",service=\"monitor\",state=\"running\"} 1",
            "hv_domain_state{hypervisor=\"a\",domain=\"1\",state=\"running\"} 1",
            "# TYPE hv_domain_vm_exits_total counter",
            "hv_domain_vm_exits_total{hypervisor=\"a\",domain=\"1\",reason=\"io\"} 5",
            "hv_domain_vm_exits_total{hypervisor=\"a\",domain=\"1\",reason=\"hypercall\"} 2",
            "hv_domain_runtime_seconds_total{hypervisor=\"a\",domain=\"1\"} 0.001",
            "hv_domain_dirty_pages_logged_total{hypervisor=\"a\",domain=\"1\",mode=\"wp\"} 40",
            "hv_domain_dirty_pages{hypervisor=\"a\",domain=\"1\",mode=\"wp\"} 3",
            "hv_monitor_hw_present{hypervisor=\"a\"} 0",
            "hv_scrape_request_ok{hypervisor=\"a\",request=\"monitor-stats\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // No RDT on this machine: no occupancy or bandwidth series at all, not zeros.
        assert!(
            !text.lines().any(|l| l.starts_with("hv_domain_llc")
                || l.starts_with("hv_domain_memory_traffic")
                || (!l.starts_with('#') && l.contains("bandwidth"))),
            "{text}"
        );
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let set = one("a", answer(vec![domain(1, "w", "running")], Vec::new()));
        let text = scrape(&set);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        let block = "# HELP hv_domain_vm_exits A domain's VM exits, by exit reason\n\
                     # TYPE hv_domain_vm_exits counter\n\
                     hv_domain_vm_exits_total{hypervisor=\"a\",domain=\"1\",reason=\"io\"} 5\n";
        assert!(text.contains(block), "{text}");
        assert!(text.contains("# TYPE hv_heap_used_bytes gauge\n# UNIT hv_heap_used_bytes bytes\n"), "{text}");
        // Each family's samples are together: a family's TYPE line appears once.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let set = one("we\"ird", answer(vec![domain(2, "x\\y\"\nz", "crashed: triple fault at 0x10")], Vec::new()));
        let text = collect(&set).render(Format::OpenMetrics);
        assert!(
            text.lines()
                .any(|l| l == "hv_domain_info{hypervisor=\"we\\\"ird\",domain=\"2\",name=\"x\\\\y\\\"\\nz\"} 1"),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l == "hv_domain_state{hypervisor=\"we\\\"ird\",domain=\"2\",state=\"crashed\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn an_unreachable_hypervisor_is_up_0_and_nothing_else() {
        let mut set = one("a", answer(Vec::new(), Vec::new()));
        set.hvs.push(("b".into(), None));
        let m = collect(&set);
        assert_eq!(m.down, ["b"]);
        let text = m.render(Format::Prometheus);
        assert!(text.lines().any(|l| l == "hv_up{hypervisor=\"a\"} 1"), "{text}");
        assert!(text.lines().any(|l| l == "hv_up{hypervisor=\"b\"} 0"), "{text}");
        let b: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("hypervisor=\"b\"") && !l.starts_with("hv_scrape_duration_seconds{"))
            .collect();
        assert_eq!(b, ["hv_up{hypervisor=\"b\"} 0"]);
    }

    #[test]
    fn hypervisors_are_asked_at_once() {
        // Each takes 400 ms to answer Info (a slow link): four cost 400 ms, not 1.6 s.
        let slow = || -> Option<Answer> {
            Some(Box::new(|req: &Request| {
                if matches!(req, Request::Info) {
                    std::thread::sleep(Duration::from_millis(400));
                }
                Response::Error(ErrorReply::new(ErrorCode::Timeout, "slow"))
            }))
        };
        let set = Fake { hvs: (0..4).map(|i| (format!("h{i}"), slow())).collect() };
        let started = Instant::now();
        let text = collect(&set).render(Format::Prometheus);
        assert!(started.elapsed() < Duration::from_millis(1200), "{:?}", started.elapsed());
        let ups: Vec<&str> = text.lines().filter(|l| l.starts_with("hv_up{")).collect();
        assert_eq!(
            ups,
            [
                "hv_up{hypervisor=\"h0\"} 1",
                "hv_up{hypervisor=\"h1\"} 1",
                "hv_up{hypervisor=\"h2\"} 1",
                "hv_up{hypervisor=\"h3\"} 1"
            ]
        );
    }

    #[test]
    fn a_failing_request_is_reported_not_skipped() {
        let set = one("a", |req: &Request| match req {
            Request::Info => Response::Info(Box::new(info())),
            other => Response::Error(ErrorReply::new(ErrorCode::Busy, other.name())),
        });
        let text = collect(&set).render(Format::Prometheus);
        for r in ["domain-list", "monitor-hwinfo", "monitor-stats"] {
            let line = format!("hv_scrape_request_ok{{hypervisor=\"a\",request=\"{r}\"}} 0");
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn rdt_figures_appear_where_the_hardware_reports_them() {
        let stats = vec![MonitorDomainStats {
            domain: 1,
            events: vec![
                (
                    "llc_occupancy".into(),
                    MonitorValue::Occupancy { bytes: 3 << 20, residual_bytes: 0, per_socket: vec![3 << 20] },
                ),
                (
                    "mbm_total".into(),
                    MonitorValue::Bandwidth { bytes: 1000, bytes_per_sec: Some(50), per_socket: vec![50] },
                ),
                ("mbm_local".into(), MonitorValue::Bandwidth { bytes: 10, bytes_per_sec: None, per_socket: vec![0] }),
                ("halts".into(), MonitorValue::Count(7)),
                ("vm_exits".into(), MonitorValue::ByReason(vec![("io".into(), 4)])),
                ("cpuid_exits".into(), MonitorValue::NotAvailable("not enabled".into())),
            ],
        }];
        let set = one("a", answer(vec![domain(1, "w", "running")], stats));
        let text = collect(&set).render(Format::Prometheus);
        for line in [
            "hv_domain_llc_occupancy_bytes{hypervisor=\"a\",domain=\"1\",socket=\"0\"} 3145728",
            "hv_domain_memory_traffic_bytes_total{hypervisor=\"a\",domain=\"1\",event=\"mbm_total\"} 1000",
            "hv_domain_memory_bandwidth_bytes_per_second{hypervisor=\"a\",domain=\"1\",event=\"mbm_total\",socket=\"0\"} 50",
            "hv_domain_monitor_events_total{hypervisor=\"a\",domain=\"1\",event=\"halts\"} 7",
            "hv_domain_monitor_events_by_reason_total{hypervisor=\"a\",domain=\"1\",event=\"vm_exits\",reason=\"io\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // mbm_local's rate is not known yet: no rate sample (a 0 would be a lie).
        assert!(!text.contains("event=\"mbm_local\",socket"), "{text}");
        assert!(!text.contains("cpuid_exits"), "{text}");
    }

    #[test]
    fn accept_headers_choose_the_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                    text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("application/openmetrics-text; q=0")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
    }

    #[test]
    fn request_heads_parse_or_are_refused() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n";
        assert_eq!(
            parse_request(get),
            HttpRequest::Metrics { accept: Some("application/openmetrics-text".into()), head: false }
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            HttpRequest::Metrics { accept: None, head: false }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), HttpRequest::Refuse(404, "Not Found"));
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), HttpRequest::Refuse(405, "Method Not Allowed"));
        assert_eq!(
            parse_request(b"GET /metrics HTTP/2\r\n\r\n"),
            HttpRequest::Refuse(505, "HTTP Version Not Supported")
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"),
            HttpRequest::Refuse(400, "Bad Request")
        );
        assert_eq!(parse_request(&[0xff, 0xfe, b'\r', b'\n']), HttpRequest::Refuse(400, "Bad Request"));
        // Arbitrary bytes never panic (a cheap deterministic fuzz: xorshift input).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [b'G', b'E', b'T', b' ', b'/', b'\r', b'\n', b':', (x >> 8) as u8][(x % 9) as usize]
                })
                .collect();
            let _ = parse_request(&bytes);
        }
    }

    fn http(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_negotiates_refuses_and_survives_a_slow_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let set: Arc<dyn HypervisorSet + Send + Sync> = Arc::new(one("a", answer(Vec::new(), Vec::new())));
        std::thread::spawn(move || serve(listener, set));
        // A slowloris: connects, sends half a line, and waits.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /met").unwrap();
        let started = Instant::now();
        let om = http(addr, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n");
        assert!(started.elapsed() < Duration::from_secs(5), "the slow client held up another");
        assert!(om.starts_with("HTTP/1.1 200 OK\r\n"), "{om}");
        assert!(
            om.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        let (head, body) = om.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
        let plain = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(plain.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{plain}");
        assert!(plain.contains("\nhv_up{hypervisor=\"a\"} 1\n") && !plain.contains("# EOF"), "{plain}");
        assert!(http(addr, b"GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 Not Found\r\n"));
        // An oversized head is refused without reading it all.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        big.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&big);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        drop(slow);
    }
}
