//! `hvctl agent serve`: the daemon that serves this host's hypervisors to remote
//! clients over TLS 1.3 with mutual certificates (protocol in [`super::proto`]).
//!
//! One thread per connection, at most `max_connections` at once (more are closed at
//! once), each with a handshake deadline (TLS and hello) and an idle deadline per frame
//! (a frame must arrive whole within it: a client that trickles bytes is cut off), so a
//! bad client only ever costs its own thread. The agent holds one [`Client`] per
//! hypervisor behind a mutex, because a serial line allows one session: each forwarded
//! request is one call under that lock (the client's id restored in the answer), and a
//! connection that dropped is opened again by the next request.
//!
//! Every request is classified read-only or admin by [`classify`] (an exhaustive match,
//! so a new `wire::Request` does not compile until someone decides) and audited: one
//! JSON line on stderr and in `--audit-log`, with the time, peer, identity, hypervisor,
//! request, decision and result.
//!
//! Host-to-host migration ([`super::proto::AgentRequest::Migrate`]) runs the relay of
//! `migrate_cmd` here, between the local hypervisor and another agent that this agent
//! connects to with its own certificate; the operator only gets progress and the
//! outcome.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::{ServerConnection, StreamOwned};
use serde_json::json;
use wire::{MigrateProgress, Request, Response};

use super::config::AgentConfig;
use super::proto::{
    self, AgentMsg, AgentRequest, AgentResponse, AgentStats, ClientMsg, FrameFault, HypervisorEntry, MigrateOrder,
    PeerStats, Role,
};
use super::tls::{self, ServerStream};
use crate::migrate_cmd::{self, Endpoint, Track, Watch};
use crate::transport::{self, Client, Options};
use crate::{CliError, err, metrics};

/// What a request needs and its name in the audit log. Exhaustive on purpose: a new
/// request is unclassified until someone writes its line here.
pub fn classify(r: &Request) -> (&'static str, Role) {
    use Role::{Admin, ReadOnly};
    match r {
        Request::Ping { .. } => ("ping", ReadOnly),
        Request::Info => ("info", ReadOnly),
        Request::ServiceStatus { .. } => ("service-status", ReadOnly),
        Request::DomainList => ("domain-list", ReadOnly),
        Request::DomainConsole { .. } => ("domain-console", ReadOnly),
        Request::MonitorHwInfo => ("monitor-hwinfo", ReadOnly),
        Request::MonitorStats { .. } => ("monitor-stats", ReadOnly),
        Request::DirtyStats { .. } => ("dirty-stats", ReadOnly),
        Request::DirtyPeek { clean: false, .. } => ("dirty-peek", ReadOnly),
        Request::DirtyPeek { clean: true, .. } => ("dirty-peek-clean", Admin),
        Request::DirtyTrackPeek { clean: false, .. } => ("dirty-track-peek", ReadOnly),
        Request::DirtyTrackPeek { clean: true, .. } => ("dirty-track-peek-clean", Admin),
        Request::DomainCreate(_) => ("domain-create", Admin),
        Request::DomainPause { .. } => ("domain-pause", Admin),
        Request::DomainUnpause { .. } => ("domain-unpause", Admin),
        Request::DomainDestroy { .. } => ("domain-destroy", Admin),
        // Changes where a domain runs, like pause/unpause change whether it runs.
        Request::DomainPin { .. } => ("domain-pin", Admin),
        Request::DomainConsoleInput { .. } => ("domain-console-input", Admin),
        Request::MonitorAttach { .. } => ("monitor-attach", Admin),
        Request::MonitorDetach { .. } => ("monitor-detach", Admin),
        Request::MonitorEvents { .. } => ("monitor-events", Admin),
        Request::DirtyStart { .. } => ("dirty-start", Admin),
        Request::DirtyStop { .. } => ("dirty-stop", Admin),
        Request::DirtyTrack { .. } => ("dirty-track", Admin),
        Request::DirtyTrackStop { .. } => ("dirty-track-stop", Admin),
        Request::MigrateSend { .. } => ("migrate-send", Admin),
        Request::MigrateRead { .. } => ("migrate-read", Admin),
        Request::MigrateVerdict { .. } => ("migrate-verdict", Admin),
        Request::MigrateCancel { .. } => ("migrate-cancel", Admin),
        Request::MigrateReceive => ("migrate-receive", Admin),
        Request::MigrateWrite { .. } => ("migrate-write", Admin),
        Request::MigrateAbort { .. } => ("migrate-abort", Admin),
        Request::ImageBegin { .. } => ("image-begin", Admin),
        Request::ImageChunk { .. } => ("image-chunk", Admin),
        Request::ImageCancel { .. } => ("image-cancel", Admin),
        Request::HostCpuid => ("host-cpuid", ReadOnly),
        // Transport benchmark: changes nothing, costs what a ping of the same size does.
        Request::BenchFill { .. } => ("bench-fill", ReadOnly),
        Request::BenchDiscard { .. } => ("bench-discard", ReadOnly),
    }
}

/// The same for the agent's own requests.
pub fn classify_agent(r: &AgentRequest) -> (&'static str, Role) {
    match r {
        AgentRequest::List => ("agent-list", Role::ReadOnly),
        AgentRequest::Stats => ("agent-stats", Role::ReadOnly),
        AgentRequest::Migrate(_) => ("agent-migrate", Role::Admin),
    }
}

/// One hypervisor this agent serves, and the one connection to it.
#[derive(Debug)]
struct Hypervisor {
    name: String,
    options: Options,
    client: Mutex<Option<Client>>,
}

/// Locks that a panicking thread left poisoned still hold consistent data here (an
/// `Option<Client>` or counters), so take them.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hypervisor {
    /// One call under the lock; a lost connection is dropped so the next call opens a
    /// new one (a failed change is not repeated: it may have been carried out).
    fn call(&self, request: &Request) -> Result<Response, CliError> {
        let mut slot = lock(&self.client);
        let reused = slot.is_some();
        let answer = Self::call_on(&mut slot, &self.options, request);
        // A held connection can go stale (the hypervisor restarted, another client
        // took the serial session over): a read is safe to repeat once on a new one.
        if reused && matches!(&answer, Err(e) if e.1 == 3) && classify(request).1 == Role::ReadOnly {
            return Self::call_on(&mut slot, &self.options, request);
        }
        answer
    }

    fn call_on(slot: &mut Option<Client>, options: &Options, request: &Request) -> Result<Response, CliError> {
        if slot.is_none() {
            *slot = Some(Client::connect(options)?);
        }
        let client = slot.as_mut().ok_or_else(|| err("no connection"))?;
        let answer = client.call(request);
        if matches!(&answer, Err(e) if e.1 == 3) {
            *slot = None;
        }
        answer
    }

    fn transport(&self) -> &'static str {
        transport::resolve(&self.options).map_or("vsock", |t| t.transport())
    }
}

/// The relay's view of a local hypervisor: every call takes the lock for just that
/// call, so other clients are served between two pieces of a migration.
struct Shared(Arc<Hypervisor>);

impl Endpoint for Shared {
    fn call(&mut self, request: &Request) -> Result<Response, CliError> {
        self.0.call(request)
    }
    fn transport(&self) -> &'static str {
        self.0.transport()
    }
}

/// The audit log: one JSON line per event, on stderr and in the file if given.
#[derive(Debug)]
struct Audit {
    file: Option<Mutex<File>>,
    quiet: bool,
}

impl Audit {
    fn record(&self, v: serde_json::Value) {
        let line = v.to_string();
        if !self.quiet {
            eprintln!("{line}");
        }
        if let Some(f) = &self.file {
            let _ = writeln!(lock(f), "{line}");
        }
    }
}

/// RFC 3339 UTC with milliseconds (the watch tables' civil date, plus the millisecond).
fn utc_now() -> String {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let seconds = crate::watch::utc_text(d.as_secs());
    format!("{}.{:03}Z", seconds.trim_end_matches('Z'), d.subsec_millis())
}

/// Everything the connection threads share.
struct Agent {
    config: AgentConfig,
    tls: Arc<rustls::ServerConfig>,
    hypervisors: BTreeMap<String, Arc<Hypervisor>>,
    audit: Audit,
    open: AtomicUsize,
    refused: AtomicU64,
    peers: Mutex<HashMap<(String, &'static str), PeerStats>>,
    /// Outbound links of migrations running now (peer address, counters): counted
    /// live, folded into `peers` when the migration ends.
    outbound: Mutex<Vec<(String, Arc<transport::Traffic>)>>,
    /// Host-to-host migrations this agent relays now, by (source hypervisor, agent
    /// request id): their latest progress, for `/metrics` (the control protocol has no
    /// request that lists a hypervisor's migrations).
    relaying: Mutex<BTreeMap<(String, u64), MigrateProgress>>,
}

/// `/metrics` covers the agent's hypervisors through the same shared connections the
/// TLS clients use (each call under its hypervisor's lock), and the migrations it
/// relays.
impl metrics::HypervisorSet for Agent {
    fn names(&self) -> Vec<String> {
        self.hypervisors.keys().cloned().collect()
    }

    fn call(&self, name: &str, req: &Request) -> Result<Response, CliError> {
        // Only reads: the endpoint has no identity to check, so it must not change anything.
        if classify(req).1 != Role::ReadOnly {
            return Err(err(format!("/metrics asked for {}, which is not a read", classify(req).0)));
        }
        let hv = self.hypervisors.get(name).ok_or_else(|| err(format!("no hypervisor {name:?} on this agent")))?;
        hv.call(req)
    }

    fn migrations(&self, name: &str) -> Vec<MigrateProgress> {
        lock(&self.relaying).iter().filter(|((hv, _), _)| hv == name).map(|(_, p)| p.clone()).collect()
    }
}

impl Agent {
    /// Audit a refused `/metrics` connection (the plain endpoint has no identity and
    /// refuses nobody but for its limits, so only the TLS one calls this).
    fn metrics_refused(&self, peer: &str, identity: Option<&str>, reason: &str) {
        self.refused.fetch_add(1, Ordering::SeqCst);
        self.audit.record(json!({
            "time": utc_now(), "peer": peer, "identity": identity, "event": "metrics", "request": "metrics",
            "decision": "refused", "reason": reason,
        }));
    }

    fn count(&self, peer: &str, direction: &'static str, f: impl FnOnce(&mut PeerStats)) {
        let mut peers = lock(&self.peers);
        let e = peers.entry((peer.to_string(), direction)).or_insert_with(|| PeerStats {
            peer: peer.to_string(),
            direction: direction.to_string(),
            ..PeerStats::default()
        });
        f(e);
    }

    fn stats(&self) -> AgentStats {
        // The same lock order as the fold at a migration's end: outbound, then peers.
        let live = lock(&self.outbound);
        let mut merged = lock(&self.peers).clone();
        for (peer, t) in live.iter() {
            let e = merged.entry((peer.clone(), "outbound")).or_insert_with(|| PeerStats {
                peer: peer.clone(),
                direction: "outbound".into(),
                ..PeerStats::default()
            });
            e.bytes_sent += t.sent.load(Ordering::Relaxed);
            e.bytes_received += t.received.load(Ordering::Relaxed);
        }
        drop(live);
        let mut peers: Vec<PeerStats> = merged.into_values().collect();
        peers.sort_by(|a, b| (&a.peer, &a.direction).cmp(&(&b.peer, &b.direction)));
        AgentStats {
            connections_open: self.open.load(Ordering::SeqCst) as u64,
            connections_refused: self.refused.load(Ordering::SeqCst),
            peers,
        }
    }
}

/// `hvctl agent serve` options.
#[derive(Debug)]
pub struct ServeOptions {
    /// The config file.
    pub config: PathBuf,
    /// `NAME=TARGET` pairs added to the config's hypervisors.
    pub hypervisors: Vec<String>,
    /// Overrides the config's `listen`.
    pub listen: Option<String>,
    /// Also append audit lines here.
    pub audit_log: Option<PathBuf>,
    /// Audit only to the file.
    pub quiet: bool,
    /// Overrides the config's `metrics_listen`.
    pub metrics: Option<String>,
    /// Sets the config's `metrics_tls`.
    pub metrics_tls: bool,
}

/// Run the agent until killed.
pub fn serve(o: ServeOptions) -> Result<std::process::ExitCode, CliError> {
    let mut config = AgentConfig::load(&o.config)?;
    if let Some(l) = o.listen {
        config.listen = l;
    }
    if let Some(m) = o.metrics {
        config.metrics_listen = Some(m);
    }
    config.metrics_tls |= o.metrics_tls;
    if config.metrics_tls && config.metrics_listen.is_none() {
        return Err(err(
            "metrics_tls (--metrics-tls) needs an address to serve /metrics on: metrics_listen in the config or --metrics ADDR:PORT",
        ));
    }
    for pair in &o.hypervisors {
        let (name, target) = pair.split_once('=').filter(|(n, t)| !n.is_empty() && !t.is_empty()).ok_or_else(|| {
            err(format!("--hypervisor {pair:?}: expected NAME=TARGET, e.g. h=unix:/run/vm.vsock:5000"))
        })?;
        config.hypervisors.insert(name.to_string(), target.to_string());
    }
    if config.hypervisors.is_empty() {
        return Err(err("the agent serves no hypervisor: pass --hypervisor NAME=TARGET or list them in the config"));
    }
    let mut hypervisors = BTreeMap::new();
    for (name, target) in &config.hypervisors {
        transport::parse_target(target).map_err(|e| err(format!("hypervisor {name}: {e}")))?;
        let options = Options { connect: Some(target.clone()), timeout: Duration::from_secs(2) };
        hypervisors
            .insert(name.clone(), Arc::new(Hypervisor { name: name.clone(), options, client: Mutex::new(None) }));
    }
    let tls = tls::server_config(&config.cert, &config.key, &config.ca)?;
    let metrics_tls = if config.metrics_tls {
        Some(tls::metrics_server_config(&config.cert, &config.key, &config.ca)?)
    } else {
        None
    };
    // Towards other agents (host-to-host migration) this agent is a client with its
    // own certificate.
    transport::set_tls(config.as_client());
    let file = match &o.audit_log {
        Some(p) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| err(format!("cannot open the audit log {}: {e}", p.display())))?,
        )),
        None => None,
    };
    let listener =
        TcpListener::bind(&config.listen).map_err(|e| err(format!("cannot listen on {}: {e}", config.listen)))?;
    let local = listener.local_addr().map_err(|e| err(e.to_string()))?;
    let agent = Arc::new(Agent {
        config,
        tls,
        hypervisors,
        audit: Audit { file, quiet: o.quiet },
        open: AtomicUsize::new(0),
        refused: AtomicU64::new(0),
        peers: Mutex::new(HashMap::new()),
        outbound: Mutex::new(Vec::new()),
        relaying: Mutex::new(BTreeMap::new()),
    });
    if let Some(addr) = &agent.config.metrics_listen {
        let metrics_listener =
            TcpListener::bind(addr).map_err(|e| err(format!("cannot listen for /metrics on {addr}: {e}")))?;
        let at = metrics_listener.local_addr().map_or_else(|_| addr.clone(), |a| a.to_string());
        let shared = Arc::clone(&agent);
        let scheme = if metrics_tls.is_some() { "https" } else { "http" };
        std::thread::Builder::new()
            .name("agent-metrics".into())
            .spawn(move || match metrics_tls {
                Some(config) => serve_metrics_tls(shared, metrics_listener, config),
                None => {
                    let set: Arc<dyn metrics::HypervisorSet + Send + Sync> = shared;
                    let _ = metrics::serve(metrics_listener, set);
                }
            })
            .map_err(|e| err(format!("cannot start the /metrics thread: {e}")))?;
        agent.audit.record(json!({"time": utc_now(), "event": "metrics", "address": at, "tls": scheme == "https"}));
        println!("AGENT metrics on {scheme}://{at}/metrics");
    }
    let names: Vec<&str> = agent.hypervisors.keys().map(String::as_str).collect();
    agent.audit.record(json!({
        "time": utc_now(), "event": "listening", "address": local.to_string(), "hypervisors": names,
    }));
    // The line tests and scripts wait for.
    println!("AGENT listening on {local}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let sock = match conn {
            Ok(s) => s,
            Err(e) => {
                // E.g. out of file descriptors: say so and give the others a moment
                // to close, rather than spin on accept.
                agent.audit.record(json!({"time": utc_now(), "event": "accept", "error": e.to_string()}));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = sock.peer_addr().map_or_else(|_| "unknown".to_string(), |a| a.to_string());
        if agent.open.load(Ordering::SeqCst) >= agent.config.max_connections {
            agent.refused.fetch_add(1, Ordering::SeqCst);
            agent.audit.record(json!({
                "time": utc_now(), "peer": peer, "event": "connect", "decision": "refused",
                "reason": format!("{} connections open, the limit", agent.config.max_connections),
            }));
            continue; // dropping the socket closes it
        }
        agent.open.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&agent);
        let spawned = std::thread::Builder::new().name(format!("agent {peer}")).spawn(move || {
            let addr = sock.peer_addr().ok();
            Connection::serve(&shared, sock, addr);
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            // The thread never ran, so nobody else gives its slot back.
            agent.open.fetch_sub(1, Ordering::SeqCst);
            agent.audit.record(json!({
                "time": utc_now(), "peer": peer, "event": "connect", "decision": "refused",
                "reason": format!("cannot start a thread: {e}"),
            }));
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `/metrics` over TLS: [`metrics::accept_loop`]'s limits (a thread per connection, at
/// most [`metrics::MAX_CONNECTIONS`]), then per connection the handshake within
/// `handshake_timeout_secs`, the allow-list, and [`metrics::serve_connection`]'s
/// bounded request head on the plain side.
fn serve_metrics_tls(agent: Arc<Agent>, listener: TcpListener, config: Arc<rustls::ServerConfig>) {
    let full_agent = Arc::clone(&agent);
    // Over the limit: closed unanswered (an HTTP 503 would be garbage to a TLS client),
    // as the agent's own port does.
    let full = move |sock: TcpStream| {
        let reason = format!("{} /metrics connections open, the limit", metrics::MAX_CONNECTIONS);
        full_agent.metrics_refused(&peer_of(&sock), None, &reason);
    };
    metrics::accept_loop(listener, metrics::MAX_CONNECTIONS, full, move |sock| {
        metrics_tls_connection(&agent, &config, sock);
    });
}

fn peer_of(sock: &TcpStream) -> String {
    sock.peer_addr().map_or_else(|_| "unknown".to_string(), |a| a.to_string())
}

/// The first byte of a TLS connection is a handshake record's content type.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One scrape over TLS: the handshake, the identity, the request, the answer, close.
fn metrics_tls_connection(agent: &Agent, config: &Arc<rustls::ServerConfig>, mut sock: TcpStream) {
    let peer = peer_of(&sock);
    let deadline = Instant::now() + agent.config.handshake_timeout();
    let _ = sock.set_nodelay(true);
    // A plain-HTTP scrape of the TLS port (`scheme: http` left in prometheus.yml) gets
    // an HTTP answer that says so, as Go's net/http does, instead of a TLS alert its
    // HTTP parser shows as garbage.
    let mut first = [0u8; 1];
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    match sock.set_read_timeout(Some(left)).and_then(|()| sock.peek(&mut first)) {
        // Connected and closed (a port check): nothing asked, nothing refused.
        Ok(0) => return,
        Ok(_) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(_) if first[0].is_ascii_uppercase() => {
            // The head first: closing with it unread would reset the connection and
            // could lose the answer on the way.
            let _ = metrics::read_head(&mut sock);
            let body = format!(
                "400 Bad Request: this endpoint serves /metrics over TLS: scrape https://{}/metrics with a client certificate\n",
                sock.local_addr().map_or_else(|_| "HOST:PORT".to_string(), |a| a.to_string())
            );
            metrics::respond(&mut sock, 400, "Bad Request", "text/plain; charset=utf-8", &body, false);
            return agent.metrics_refused(&peer, None, "plain HTTP on the TLS /metrics port (scheme: https is needed)");
        }
        // Anything else: the handshake below fails on it and says why.
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            let reason = format!(
                "TLS handshake failed: the client sent nothing within {} s",
                agent.config.handshake_timeout().as_secs_f64()
            );
            return agent.metrics_refused(&peer, None, &reason);
        }
        Err(e) => return agent.metrics_refused(&peer, None, &format!("TLS handshake failed: {e}")),
    }
    let mut conn = match ServerConnection::new(Arc::clone(config)) {
        Ok(c) => c,
        Err(e) => return agent.metrics_refused(&peer, None, &format!("TLS setup: {e}")),
    };
    if let Err(e) = tls::handshake(&mut conn, &mut sock, deadline) {
        let reason = format!("TLS handshake failed: {}", tls::explain(&e, "the scraper"));
        return agent.metrics_refused(&peer, None, &reason);
    }
    let names = conn.peer_certificates().and_then(|c| c.first()).map(tls::names).unwrap_or_default();
    let mut stream = StreamOwned::new(conn, sock);
    if agent.config.role_of(&names).is_some() {
        // Any role: every request `/metrics` sends is a read (checked again in `call`).
        metrics::serve_connection(&mut stream, agent);
    } else {
        let shown = names.first().cloned().unwrap_or_else(|| "(no name)".into());
        let reason = format!("identity {shown:?} is not on this agent's allow-list");
        let _ = metrics::read_head(&mut stream);
        let body = format!("403 Forbidden: {reason}\n");
        metrics::respond(&mut stream, 403, "Forbidden", "text/plain; charset=utf-8", &body, false);
        agent.metrics_refused(&peer, Some(&shown), &reason);
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

/// One client's connection.
struct Connection<'a> {
    agent: &'a Agent,
    stream: ServerStream,
    peer: String,
    identity: String,
    role: Role,
    hypervisor: Option<Arc<Hypervisor>>,
}

impl<'a> Connection<'a> {
    fn serve(agent: &'a Agent, sock: TcpStream, addr: Option<SocketAddr>) {
        let peer = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let refuse = |reason: String| {
            agent.refused.fetch_add(1, Ordering::SeqCst);
            agent.audit.record(json!({
                "time": utc_now(), "peer": peer, "event": "connect", "decision": "refused", "reason": reason,
            }));
        };
        let deadline = Instant::now() + agent.config.handshake_timeout();
        let mut sock = sock;
        let _ = sock.set_nodelay(true);
        let mut conn = match ServerConnection::new(Arc::clone(&agent.tls)) {
            Ok(c) => c,
            Err(e) => return refuse(format!("TLS setup: {e}")),
        };
        if let Err(e) = tls::handshake(&mut conn, &mut sock, deadline) {
            return refuse(format!("TLS handshake failed: {}", tls::explain(&e, "the client")));
        }
        let names = conn.peer_certificates().and_then(|c| c.first()).map(tls::names).unwrap_or_default();
        // The handshake left its remaining time as the write timeout: a client that
        // stops reading now gets the idle timeout, not a leftover.
        if let Err(e) = sock.set_write_timeout(Some(agent.config.idle_timeout())) {
            return refuse(format!("socket setup: {e}"));
        }
        let mut stream = StreamOwned::new(conn, sock);
        // The hello first, even from a stranger: closing a socket with its hello unread
        // would reset the connection and could lose the refusal on the way.
        let hello = proto::read_msg::<_, ClientMsg>(&mut stream, agent.config.max_frame, deadline);
        let Some((identity, role)) = agent.config.role_of(&names) else {
            let shown = names.first().cloned().unwrap_or_else(|| "(no name)".into());
            let reason = format!("identity {shown:?} is not on this agent's allow-list");
            let _ = proto::write_msg(&mut stream, &AgentMsg::Refused { reason: reason.clone() });
            stream.conn.send_close_notify();
            let _ = stream.flush();
            return refuse(reason);
        };
        agent.count(&identity, "inbound", |s| s.connections += 1);
        let mut c = Connection { agent, stream, peer: peer.clone(), identity, role, hypervisor: None };
        let (version, wanted) = match hello {
            Ok((ClientMsg::Hello { version, hypervisor }, n)) => {
                c.received(n);
                (version, hypervisor)
            }
            Ok(_) => return c.refuse_hello("the first message must be a hello".into()),
            Err(e) => return c.refuse_hello(format!("no hello: {e}")),
        };
        if version != proto::PROTOCOL_VERSION {
            return c.refuse_hello(format!(
                "agent protocol {version} is not spoken here (this agent speaks {})",
                proto::PROTOCOL_VERSION
            ));
        }
        let chosen = match wanted {
            Some(name) => match agent.hypervisors.get(&name) {
                Some(h) => Some(Arc::clone(h)),
                None => {
                    let known: Vec<&str> = agent.hypervisors.keys().map(String::as_str).collect();
                    return c
                        .refuse_hello(format!("no hypervisor {name:?} here (this agent serves {})", known.join(", ")));
                }
            },
            // Without a name, the only hypervisor if there is one.
            None if agent.hypervisors.len() == 1 => agent.hypervisors.values().next().cloned(),
            None => None,
        };
        c.hypervisor = chosen;
        let welcome = AgentMsg::Welcome {
            identity: c.identity.clone(),
            role: c.role,
            hypervisor: c.hypervisor.as_ref().map(|h| h.name.clone()),
            hypervisors: agent.hypervisors.keys().cloned().collect(),
        };
        c.audit("hello", "allowed", None, "ok");
        if c.send(&welcome).is_err() {
            return;
        }
        c.run();
    }

    fn refuse_hello(mut self, reason: String) {
        self.agent.refused.fetch_add(1, Ordering::SeqCst);
        self.audit("hello", "refused", Some(&reason), "closed");
        let _ = self.send(&AgentMsg::Refused { reason });
    }

    fn received(&self, n: usize) {
        self.agent.count(&self.identity, "inbound", |s| s.bytes_received += n as u64);
    }

    fn send(&mut self, msg: &AgentMsg) -> std::io::Result<()> {
        let n = proto::write_msg(&mut self.stream, msg)?;
        self.agent.count(&self.identity, "inbound", |s| s.bytes_sent += n as u64);
        Ok(())
    }

    fn audit(&self, request: &str, decision: &str, reason: Option<&str>, result: &str) {
        self.agent.audit.record(json!({
            "time": utc_now(),
            "peer": self.peer,
            "identity": self.identity,
            "role": self.role.name(),
            "hypervisor": self.hypervisor.as_ref().map(|h| h.name.as_str()),
            "request": request,
            "decision": decision,
            "reason": reason,
            "result": result,
        }));
    }

    /// Frames until the client leaves, idles out or breaks the protocol.
    fn run(&mut self) {
        let max = self.agent.config.max_frame;
        loop {
            let deadline = Instant::now() + self.agent.config.idle_timeout();
            let msg = match proto::read_msg::<_, ClientMsg>(&mut self.stream, max, deadline) {
                Ok((msg, n)) => {
                    self.received(n);
                    msg
                }
                Err(FrameFault::Closed) => return self.audit("disconnect", "allowed", None, "closed"),
                Err(fault) => {
                    let reason = match &fault {
                        FrameFault::Timeout => format!(
                            "no complete frame for {} s: closing the connection",
                            self.agent.config.idle_timeout().as_secs_f64()
                        ),
                        FrameFault::Oversize(n) => format!("a frame of {n} bytes is over this agent's limit of {max}"),
                        other => format!("{other}: closing the connection"),
                    };
                    self.audit("frame", "refused", Some(&reason), "closed");
                    let _ = self.send(&AgentMsg::Fatal { reason });
                    return;
                }
            };
            let sent = match msg {
                ClientMsg::Hello { .. } => {
                    let reason = "a second hello".to_string();
                    self.audit("hello", "refused", Some(&reason), "closed");
                    let _ = self.send(&AgentMsg::Fatal { reason });
                    return;
                }
                ClientMsg::Hv { id, request } => self.forward(id, &request),
                ClientMsg::Agent { id, request } => self.agent_request(id, request),
            };
            if sent.is_err() {
                return self.audit("disconnect", "allowed", None, "the client went away");
            }
        }
    }

    fn forward(&mut self, id: u64, request: &Request) -> std::io::Result<()> {
        self.agent.count(&self.identity, "inbound", |s| s.requests += 1);
        let (kind, needed) = classify(request);
        let Some(hv) = self.hypervisor.clone() else {
            let reason = "no hypervisor chosen: connect to tls://HOST:PORT/NAME (hvctl agent list names them)";
            self.audit(kind, "refused", Some(reason), "not forwarded");
            return self.send(&AgentMsg::Denied { id, reason: reason.into() });
        };
        if !self.role.allows(needed) {
            let reason =
                format!("identity {:?} is {} on this agent; {kind} needs admin", self.identity, self.role.name());
            self.audit(kind, "refused", Some(&reason), "not forwarded");
            return self.send(&AgentMsg::Denied { id, reason });
        }
        let answer = hv.call(request);
        let (msg, result) = match answer {
            Ok(response) => {
                let result = match &response {
                    Response::Error(e) => format!("error: {e}"),
                    _ => "ok".into(),
                };
                (AgentMsg::Hv { id, response }, result)
            }
            Err(e) => {
                let reason = format!("the agent cannot reach hypervisor {}: {e}", hv.name);
                (AgentMsg::Unreachable { id, reason: reason.clone() }, format!("error: {reason}"))
            }
        };
        // Streams are audited by their opening and closing requests; every piece too,
        // but bulk pieces say only their kind.
        self.audit(kind, "allowed", None, &result);
        self.send(&msg)
    }

    fn agent_request(&mut self, id: u64, request: AgentRequest) -> std::io::Result<()> {
        self.agent.count(&self.identity, "inbound", |s| s.requests += 1);
        let (kind, needed) = classify_agent(&request);
        if !self.role.allows(needed) {
            let reason =
                format!("identity {:?} is {} on this agent; {kind} needs admin", self.identity, self.role.name());
            self.audit(kind, "refused", Some(&reason), "not done");
            return self.send(&AgentMsg::Denied { id, reason });
        }
        let response = match request {
            AgentRequest::List => AgentResponse::Hypervisors(
                self.agent
                    .hypervisors
                    .values()
                    .map(|h| HypervisorEntry {
                        name: h.name.clone(),
                        target: h.options.connect.clone().unwrap_or_default(),
                        connected: h.client.try_lock().map_or(true, |c| c.is_some()),
                    })
                    .collect(),
            ),
            AgentRequest::Stats => AgentResponse::Stats(self.agent.stats()),
            AgentRequest::Migrate(order) => self.migrate(id, order),
        };
        let result = match &response {
            AgentResponse::Error(e) => format!("error: {e}"),
            AgentResponse::MigrateFailed { message, .. } => format!("failed: {message}"),
            _ => "ok".into(),
        };
        self.audit(kind, "allowed", None, &result);
        self.send(&AgentMsg::Agent { id, response })
    }

    /// Host-to-host migration: relay from the local hypervisor to the other agent.
    fn migrate(&mut self, id: u64, order: MigrateOrder) -> AgentResponse {
        let Some(src) = self.agent.hypervisors.get(&order.source).cloned() else {
            return AgentResponse::Error(format!("no hypervisor {:?} on this agent", order.source));
        };
        let target = match transport::parse_target(&order.destination) {
            Ok(t @ transport::Target::Tls { .. }) => t,
            Ok(other) => {
                return AgentResponse::Error(format!(
                    "the destination {other} is not an agent (tls://HOST:PORT/NAME): the stream goes agent to agent"
                ));
            }
            Err(e) => return AgentResponse::Error(e.0),
        };
        self.audit(
            "agent-migrate",
            "allowed",
            None,
            &format!("started: domain {} of {} to {target}", order.domain, order.source),
        );
        let dst_options = Options { connect: Some(order.destination.clone()), timeout: Duration::from_secs(5) };
        let mut dst = match Client::connect(&dst_options) {
            Ok(c) => c,
            Err(e) => return AgentResponse::Error(format!("this agent cannot reach {target}: {}", e.0)),
        };
        let name = match &target {
            transport::Target::Tls { host, port, .. } => format!("{host}:{port}"),
            other => other.to_string(),
        };
        let traffic = dst.traffic().unwrap_or_default();
        lock(&self.agent.outbound).push((name.clone(), traffic.clone()));
        self.agent.count(&name, "outbound", |s| s.connections += 1);
        let mut shared = Shared(src);
        let mut track = Track::default();
        let agent = self.agent;
        let source = order.source.clone();
        let mut watch = AgentWatch { conn: self, id, source: source.clone(), last: None, broken: false };
        let result = migrate_cmd::relay_between(
            &mut shared,
            &mut dst,
            order.domain,
            order.options,
            order.corrupt_byte,
            &mut track,
            &mut watch,
        );
        lock(&agent.relaying).remove(&(source, id));
        // From the live list into the totals, under both locks so stats never count
        // them twice or not at all.
        {
            let mut live = lock(&agent.outbound);
            live.retain(|(_, t)| !Arc::ptr_eq(t, &traffic));
            agent.count(&name, "outbound", |s| {
                s.bytes_sent += traffic.sent.load(Ordering::Relaxed);
                s.bytes_received += traffic.received.load(Ordering::Relaxed);
            });
        }
        match result {
            Ok(done) => {
                AgentResponse::Migrated { report: done.report, progress: Box::new(done.progress), status: done.status }
            }
            Err(e) => AgentResponse::MigrateFailed {
                message: e.0,
                exit_code: e.1,
                progress: track.progress.map(Box::new),
                status: track.status,
            },
        }
    }
}

/// How often progress goes to the operator at most (state changes go at once): the
/// operator's progress line redraws at 10 Hz anyway.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The relay's progress, sent to the operator; a send that fails means the operator
/// went away, which cancels the migration like Ctrl-C would.
struct AgentWatch<'c, 'a> {
    conn: &'c mut Connection<'a>,
    id: u64,
    /// The source hypervisor's name, under which `/metrics` shows the progress.
    source: String,
    last: Option<Instant>,
    broken: bool,
}

impl Watch for AgentWatch<'_, '_> {
    fn progress(&mut self, p: &MigrateProgress, serial_rate: Option<f64>, state_changed: bool) {
        lock(&self.conn.agent.relaying).insert((self.source.clone(), self.id), p.clone());
        if self.broken || (!state_changed && self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY)) {
            return;
        }
        self.last = Some(Instant::now());
        let response = AgentResponse::MigrateProgress { progress: Box::new(p.clone()), serial_rate, state_changed };
        if self.conn.send(&AgentMsg::Agent { id: self.id, response }).is_err() {
            self.broken = true;
        }
    }

    fn finish(&mut self) {}

    fn cancelled(&mut self) -> Option<&'static str> {
        self.broken.then_some("the operator's disconnect")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_read_only_and_changes_need_admin() {
        let read_only = [
            Request::Ping { payload: vec![] },
            Request::Info,
            Request::DomainList,
            Request::DomainConsole { id: 1, offset: 0 },
            Request::MonitorStats { domain: None },
            Request::DirtyStats { domain: 1 },
            Request::DirtyPeek { domain: 1, clean: false },
            Request::DirtyTrackPeek { domain: 1, clean: false },
            Request::HostCpuid,
            Request::BenchFill { len: 4 },
            Request::BenchDiscard { bytes: vec![0; 4] },
        ];
        for r in &read_only {
            assert_eq!(classify(r).1, Role::ReadOnly, "{r:?}");
        }
        let admin = [
            Request::DomainDestroy { id: 1 },
            Request::DomainPause { id: 1 },
            Request::DomainPin { id: 1, cpus: Some(vec![0]) },
            Request::DomainPin { id: 1, cpus: None },
            Request::DirtyPeek { domain: 1, clean: true },
            Request::DirtyTrackPeek { domain: 1, clean: true },
            Request::MigrateReceive,
            Request::MigrateCancel { domain: 1 },
            Request::DomainConsoleInput { id: 1, bytes: vec![] },
            Request::MonitorEvents { domain: 1, enable: vec![], disable: vec![] },
        ];
        for r in &admin {
            assert_eq!(classify(r).1, Role::Admin, "{r:?}");
        }
        assert_eq!(classify_agent(&AgentRequest::Stats).1, Role::ReadOnly);
        assert_eq!(classify_agent(&AgentRequest::List).1, Role::ReadOnly);
    }

    #[test]
    fn audit_times_are_rfc3339_utc() {
        let t = utc_now();
        assert_eq!(t.len(), "2026-12-01T22:30:00.000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        let year: u32 = t[..4].parse().unwrap();
        assert!(year >= 2024, "{t}");
    }
}
