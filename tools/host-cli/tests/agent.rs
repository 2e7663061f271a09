//! `hvctl agent serve` and remote hvctl (`--connect tls://…`) on the built binary,
//! against a fake hypervisor that keeps a list of domains: who is let in (mutual TLS,
//! the allow-list, roles), what is refused and that a refusal changes nothing, the
//! audit log, contexts, and that garbage, oversize frames and slowloris clients cost
//! only their own connection while other clients are served.
//!
//! Each test runs its own agent on 127.0.0.2 with a fresh port and certificates.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use wire::{ErrorCode, ErrorReply, Request, Response};

mod common;

use common::agent::{self, Agent, tls_args};
use common::{fake_hv, hvctl, stderr, stdout};

/// The fake hypervisor: domains by id, and every request it was asked, by name.
#[derive(Default)]
struct Hv {
    domains: Vec<u32>,
    requests: Vec<String>,
    /// Hang up on the next request instead of answering it.
    hang_up: bool,
}

fn answer(hv: &Mutex<Hv>, r: Request) -> Response {
    let mut h = hv.lock().unwrap();
    h.requests.push(r.name().to_string());
    match r {
        Request::Ping { payload } => Response::Pong { payload },
        Request::DomainList => {
            let domains = h
                .domains
                .iter()
                .map(|&id| wire::DomainInfo {
                    id,
                    name: format!("d{id}"),
                    state: "running".into(),
                    vcpus: 1,
                    memory_bytes: 8 << 20,
                    exits: Vec::new(),
                    runtime_ns: 0,
                    unclaimed: Vec::new(),
                    cpus: None,
                })
                .collect();
            Response::DomainList(wire::DomainListReport { domains, free_frames: 0, total_frames: 0 })
        }
        Request::DomainDestroy { id } => {
            if let Some(at) = h.domains.iter().position(|&d| d == id) {
                h.domains.remove(at);
                Response::Done
            } else {
                Response::Error(ErrorReply::new(ErrorCode::Refused, format!("no domain {id}")))
            }
        }
        other => Response::Error(ErrorReply::new(ErrorCode::NotImplemented, format!("fake: {}", other.name()))),
    }
}

/// One test's world: certificates (clients ops=admin, viewer=read-only, mallory
/// whom the agent does not list; and a second CA with its own "ops"), the fake
/// hypervisor with domains 1 and 2, and the agent serving it as `h`.
struct World {
    dir: PathBuf,
    other_ca: PathBuf,
    hv: Arc<Mutex<Hv>>,
    agent: Agent,
}

impl World {
    fn new(name: &str, extra: &str) -> Self {
        let dir = agent::dir(name);
        let addr = format!("127.0.0.2:{}", agent::free_port("127.0.0.2"));
        agent::init(&dir, &[format!("a={addr}")], &["ops=admin", "viewer=read-only", "mallory=admin"]);
        let other_ca = dir.join("other");
        agent::init(&other_ca, &[format!("a={addr}")], &["ops=admin"]);
        let hv = Arc::new(Mutex::new(Hv { domains: vec![1, 2], ..Hv::default() }));
        let (shared, hangs) = (hv.clone(), hv.clone());
        let socket = dir.join("hv.vsock");
        let typed = fake_hv::typed(move |r| answer(&shared, r));
        fake_hv::listen(&socket, move |frame| {
            if std::mem::take(&mut hangs.lock().unwrap().hang_up) { Vec::new() } else { typed(frame) }
        });
        let target = format!("h=unix:{}:{}", socket.display(), fake_hv::PORT);
        let allow = [("ops", "admin"), ("viewer", "read-only")];
        let agent = Agent::start(&dir, "a", &addr, &allow, extra, &[target]);
        Self { dir, other_ca, hv, agent }
    }

    /// hvctl as client `name` (its certificate from `cert_dir`, trusting `ca_dir`'s CA).
    fn hvctl_as(&self, name: &str, cert_dir: &Path, ca_dir: &Path, args: &[&str]) -> std::process::Output {
        let url = self.agent.url("h");
        let mut all: Vec<String> = vec!["--connect".into(), url];
        all.extend(tls_args(cert_dir, name, ca_dir));
        all.extend(args.iter().map(|s| s.to_string()));
        hvctl(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn hvctl(&self, name: &str, args: &[&str]) -> std::process::Output {
        self.hvctl_as(name, &self.dir, &self.dir, args)
    }

    fn domains(&self) -> Vec<u32> {
        self.hv.lock().unwrap().domains.clone()
    }

    fn requests(&self) -> Vec<String> {
        self.hv.lock().unwrap().requests.clone()
    }

    /// The audit lines that refused something.
    fn refusals(&self) -> Vec<Value> {
        self.agent.audit_lines().into_iter().filter(|l| l["decision"] == "refused").collect()
    }

    /// The refusals once one matches `want` (or after 5 s): the agent writes a refusal
    /// after it has dropped the connection, so the client can exit first.
    fn refusals_with(&self, want: impl Fn(&Value) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let refused = self.refusals();
            if refused.iter().any(&want) || start.elapsed() > Duration::from_secs(5) {
                return refused;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn one_line(s: &str) -> &str {
    assert_eq!(s.trim_end().lines().count(), 1, "one line: {s:?}");
    s.trim_end()
}

#[test]
fn roles_decide_and_a_read_only_destroy_changes_nothing() {
    let w = World::new("roles", "");
    let o = w.hvctl("viewer", &["domain", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("d1") && stdout(&o).contains("d2"), "{}", stdout(&o));

    let o = w.hvctl("viewer", &["domain", "destroy", "1"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = one_line(&stderr(&o)).to_string();
    assert!(e.contains("the agent refused") && e.contains("\"viewer\" is read-only"), "{e}");
    assert!(e.contains("domain-destroy needs admin"), "{e}");
    assert_eq!(w.domains(), vec![1, 2], "the domain is still there");
    assert!(!w.requests().iter().any(|r| r.contains("destroy")), "{:?}", w.requests());
    let want = |l: &Value| l["identity"] == "viewer" && l["request"] == "domain-destroy" && l["hypervisor"] == "h";
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");

    let o = w.hvctl("ops", &["domain", "destroy", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(w.domains(), vec![1]);
    let allowed = w.agent.audit_lines();
    let line = allowed.iter().find(|l| l["identity"] == "ops" && l["request"] == "domain-destroy").unwrap();
    assert_eq!(line["decision"], "allowed");
    assert_eq!(line["result"], "ok");
    assert!(line["time"].as_str().unwrap().ends_with('Z') && line["peer"].as_str().unwrap().starts_with("127."));

    // Pipelined pings come back in order (hvctl checks the echo).
    let o = w.hvctl("viewer", &["ping", "-c", "20", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn a_client_without_a_certificate_is_refused_and_nothing_happens() {
    let w = World::new("nocert", "");
    let ca = w.dir.join("ca.pem").display().to_string();
    let o = hvctl(&["--connect", &w.agent.url("h"), "--tls-ca", &ca, "domain", "destroy", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = one_line(&stderr(&o)).to_string();
    assert!(e.contains("requires a client certificate"), "{e}");
    assert_eq!(w.domains(), vec![1, 2]);
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let want = |l: &Value| l["reason"].as_str().unwrap_or("").contains("TLS handshake");
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_nothing_happens() {
    let w = World::new("otherca", "");
    // The same name "ops", signed by the other CA; the client trusts the real one.
    let o = w.hvctl_as("ops", &w.other_ca, &w.dir, &["domain", "destroy", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = one_line(&stderr(&o)).to_string();
    assert!(e.contains("refused our certificate"), "{e}");
    assert_eq!(w.domains(), vec![1, 2]);
    assert!(w.requests().is_empty(), "{:?}", w.requests());

    // And a client that trusts only the other CA does not accept the agent.
    let o = w.hvctl_as("ops", &w.dir, &w.other_ca, &["domain", "list"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("not signed by our CA (unknown issuer)"), "{}", stderr(&o));
    assert!(w.requests().is_empty(), "{:?}", w.requests());
}

#[test]
fn an_identity_not_on_the_allow_list_is_refused_and_nothing_happens() {
    let w = World::new("unlisted", "");
    let o = w.hvctl("mallory", &["domain", "destroy", "1"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = one_line(&stderr(&o)).to_string();
    assert!(e.contains("refused the connection") && e.contains("\"mallory\" is not on this agent's allow-list"), "{e}");
    assert_eq!(w.domains(), vec![1, 2]);
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let want = |l: &Value| l["reason"].as_str().unwrap_or("").contains("mallory");
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");
}

#[test]
fn missing_certificate_files_and_unknown_hypervisors_are_one_line_errors() {
    let w = World::new("files", "");
    let ca = w.dir.join("ca.pem").display().to_string();
    let o = hvctl(&[
        "--connect",
        &w.agent.url("h"),
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/c.key",
        "--tls-ca",
        &ca,
        "info",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("cannot read the client certificate /nonexistent/c.pem"), "{}", stderr(&o));
    let o = hvctl(&["--connect", &w.agent.url("h"), "info"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("needs the CA"), "{}", stderr(&o));
    let mut args = vec!["--connect".to_string(), w.agent.url("nope")];
    args.extend(tls_args(&w.dir, "ops", &w.dir));
    args.extend(["domain".into(), "list".into()]);
    let o = hvctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("no hypervisor \"nope\" here (this agent serves h)"), "{}", stderr(&o));
}

#[test]
fn contexts_name_the_agent_and_the_certificates() {
    let w = World::new("contexts", "");
    let config = w.dir.join("hvctl-config.toml");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hvctl"))
            .args(args)
            .env_remove("HVCTL_CONNECT")
            .env("HVCTL_CONFIG", &config)
            .output()
            .unwrap()
    };
    // The current context (ops@a, the first client and agent) without --connect.
    let o = run(&["domain", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("d1"), "{}", stdout(&o));
    let o = run(&["--context", "viewer@a", "domain", "destroy", "1"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("read-only"), "{}", stderr(&o));
    assert_eq!(w.domains(), vec![1, 2]);
    let o = run(&["--context", "nobody@a", "info"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("no context \"nobody@a\""), "{}", stderr(&o));
    let o = run(&["--context", "viewer@a", "agent", "stats", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ops = v["peers"].as_array().unwrap().iter().find(|p| p["peer"] == "ops").unwrap();
    assert!(ops["requests"].as_u64().unwrap() >= 1 && ops["bytes_received"].as_u64().unwrap() > 0, "{v}");
}

/// `ClientMsg::Hello { version: 1, hypervisor: Some("h") }` as a frame, by hand (postcard:
/// variant 0, varint 1, `Some`, length 1, "h"), so a wrong encoding on either side shows.
const HELLO_H: [u8; 9] = [0, 0, 0, 5, 0, 1, 1, 1, b'h'];

/// A TLS client that speaks whatever the test wants once the handshake is done.
fn tls_client(w: &World, name: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(w.dir.join("ca.pem")).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(w.dir.join(format!("{name}.pem"))).unwrap()],
            PrivateKeyDer::from_pem_file(w.dir.join(format!("{name}.key"))).unwrap(),
        )
        .unwrap();
    let sock = TcpStream::connect(&w.agent.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("127.0.0.2".to_string()).unwrap())
        .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Read until the agent closes; how long it took.
fn until_closed(r: &mut impl Read) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn garbage_oversize_frames_and_slowloris_cost_only_their_own_connection() {
    let w = World::new("abuse", "max_frame = 4096\nhandshake_timeout_secs = 1.5\nidle_timeout_secs = 2");
    // Slowloris: three clients that trickle a byte now and then during the handshake.
    let trickle: Vec<_> = (0..3)
        .map(|_| {
            let addr = w.agent.addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let start = Instant::now();
                for b in [0x16u8, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00, 0x00, 0x0c, 0x03] {
                    if s.write_all(&[b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                until_closed(&mut s);
                // From the first byte: the handshake deadline, not the trickle, decides.
                start.elapsed()
            })
        })
        .collect();
    // Garbage instead of a TLS handshake.
    let mut g = TcpStream::connect(&w.agent.addr).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(until_closed(&mut g) < Duration::from_secs(5));

    // Meanwhile an honest client is served, several times.
    for _ in 0..3 {
        let o = w.hvctl("viewer", &["ping", "-c", "3"]);
        assert_eq!(o.status.code(), Some(0), "served while others misbehave: {}", stderr(&o));
    }

    // An oversize frame from an authenticated client: the agent says so and closes.
    let mut big = tls_client(&w, "ops");
    big.write_all(&HELLO_H).unwrap();
    big.write_all(&1_000_000u32.to_be_bytes()).unwrap();
    big.flush().unwrap();
    assert!(until_closed(&mut big) < Duration::from_secs(5));
    // Garbage inside TLS: a frame that is not a message.
    let mut junk = tls_client(&w, "ops");
    junk.write_all(&HELLO_H).unwrap();
    junk.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).unwrap();
    junk.flush().unwrap();
    assert!(until_closed(&mut junk) < Duration::from_secs(5));
    // A silent authenticated client is cut off after the idle timeout.
    let mut idle = tls_client(&w, "ops");
    idle.write_all(&[]).unwrap();
    let _ = idle.conn.complete_io(&mut idle.sock);
    let took = until_closed(&mut idle);
    assert!(took < Duration::from_secs(6), "idle for {took:?}");

    for t in trickle {
        let took = t.join().unwrap();
        assert!(took < Duration::from_secs(6), "a slowloris client held on for {took:?}");
    }
    let o = w.hvctl("viewer", &["domain", "list"]);
    assert_eq!(o.status.code(), Some(0), "still served: {}", stderr(&o));
    assert_eq!(w.domains(), vec![1, 2]);

    let reason = |l: &Value| l["reason"].as_str().unwrap_or("").to_string();
    let reasons: Vec<String> =
        w.refusals_with(|l| reason(l).contains("TLS handshake failed")).iter().map(reason).collect();
    let has = |s: &str| reasons.iter().any(|r| r.contains(s));
    assert!(has("over this agent's limit of 4096"), "{reasons:?}");
    assert!(has("not an agent protocol message") || has("no hello"), "{reasons:?}");
    assert!(has("TLS handshake failed"), "{reasons:?}");
}

#[test]
fn connections_over_the_limit_are_closed_and_served_again_once_one_leaves() {
    let w = World::new("limit", "max_connections = 1");
    let mut holder = tls_client(&w, "viewer");
    holder.write_all(&HELLO_H).unwrap();
    holder.flush().unwrap();
    // Its welcome: the one slot is taken.
    let mut len = [0u8; 4];
    holder.read_exact(&mut len).unwrap();
    let o = w.hvctl("ops", &["ping"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("closed the connection"), "{}", stderr(&o));
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let want = |l: &Value| l["reason"] == "1 connections open, the limit";
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");
    drop(holder);
    let start = Instant::now();
    loop {
        let o = w.hvctl("ops", &["ping"]);
        if o.status.code() == Some(0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "not served after the holder left: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_hypervisor_the_agent_cannot_reach_is_a_connection_error_and_the_agent_serves_on() {
    let dir = agent::dir("unreachable");
    let addr = format!("127.0.0.2:{}", agent::free_port("127.0.0.2"));
    agent::init(&dir, &[format!("a={addr}")], &["ops=admin"]);
    let target = format!("h=unix:{}:{}", dir.join("nobody.vsock").display(), fake_hv::PORT);
    let a = Agent::start(&dir, "a", &addr, &[("ops", "admin")], "", &[target]);
    let mut args = vec!["--connect".to_string(), a.url("h")];
    args.extend(tls_args(&dir, "ops", &dir));
    args.push("info".into());
    let o = hvctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("the agent cannot reach hypervisor h"), "{}", stderr(&o));
    // The agent itself still answers.
    let mut args = vec!["--connect".to_string(), format!("tls://{addr}")];
    args.extend(tls_args(&dir, "ops", &dir));
    args.extend(["agent".into(), "list".into()]);
    let o = hvctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("h ") && stdout(&o).contains("no"), "{}", stdout(&o));
}

#[test]
fn a_stale_hypervisor_connection_is_reopened_reads_repeated_and_changes_not() {
    let w = World::new("stale", "");
    let o = w.hvctl("ops", &["ping"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The agent's held connection dies under a read: it reconnects and asks again.
    w.hv.lock().unwrap().hang_up = true;
    let o = w.hvctl("viewer", &["domain", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("d2"), "{}", stdout(&o));
    // Under a change it does not repeat it (it may have been carried out): hvctl is told.
    w.hv.lock().unwrap().hang_up = true;
    let o = w.hvctl("ops", &["domain", "destroy", "2"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_line(&stderr(&o)).contains("the agent cannot reach hypervisor h"), "{}", stderr(&o));
    assert_eq!(w.domains(), vec![1, 2]);
    let o = w.hvctl("ops", &["domain", "destroy", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(w.domains(), vec![1]);
}

/// One plain-HTTP `GET /metrics` (Prometheus' text 0.0.4) at `addr`: status line and body.
fn get_metrics(addr: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nAccept: text/plain\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

#[test]
fn the_agent_serves_metrics_of_its_hypervisors_and_asks_them_only_reads() {
    let metrics = format!("127.0.0.2:{}", agent::free_port("127.0.0.2"));
    let w = World::new("metrics", &format!("metrics_listen = \"{metrics}\""));
    let (status, body) = get_metrics(&metrics);
    assert!(status.contains(" 200 "), "{status}\n{body}");
    for line in [
        "hv_up{hypervisor=\"h\"} 1",
        "hv_domain_info{hypervisor=\"h\",domain=\"1\",name=\"d1\"} 1",
        "hv_domain_info{hypervisor=\"h\",domain=\"2\",name=\"d2\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }
    // A domain destroyed through the agent is gone from the next scrape.
    let o = w.hvctl("ops", &["domain", "destroy", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, body) = get_metrics(&metrics);
    assert!(!body.contains("domain=\"2\""), "{body}");
    // The endpoint has no identity: everything it asked is a read.
    let asked = w.requests();
    assert!(asked.iter().any(|r| r == "domain-list"), "{asked:?}");
    assert_eq!(asked.iter().filter(|r| *r == "domain-destroy").count(), 1, "only ops' destroy: {asked:?}");
    for r in &asked {
        assert!(
            !r.starts_with("migrate") && !r.starts_with("dirty-start") && r != "monitor-attach",
            "{r} in {asked:?}"
        );
    }
}

/// A rustls client config for the TLS `/metrics`: trusting the CA in `ca_dir`, offering
/// client `name`'s certificate from `cert_dir` (`None`: no certificate).
fn scraper(cert: Option<(&Path, &str)>, ca_dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca_dir.join("ca.pem")).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some((dir, name)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap()],
                PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    // As Prometheus (Go's net/http) offers them.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One `GET /metrics` over TLS at `addr` (the agent's certificate names 127.0.0.2),
/// asking for OpenMetrics as Prometheus does: the whole answer, or the error.
fn get_metrics_tls(addr: &str, config: Arc<rustls::ClientConfig>) -> std::io::Result<String> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("127.0.0.2".to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: agent\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n",
    )?;
    s.flush()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// A world whose agent serves `/metrics` over TLS (with `extra` config); its address.
fn tls_metrics_world(name: &str, extra: &str) -> (World, String) {
    let metrics = format!("127.0.0.2:{}", agent::free_port("127.0.0.2"));
    let w = World::new(name, &format!("metrics_listen = \"{metrics}\"\nmetrics_tls = true\n{extra}"));
    (w, metrics)
}

#[test]
fn metrics_over_tls_are_openmetrics_for_listed_scrapers_and_403_for_unlisted_ones() {
    let (w, metrics) = tls_metrics_world("metrics-tls", "");
    // A read-only identity is enough: metrics are reads.
    let reply = get_metrics_tls(&metrics, scraper(Some((&w.dir, "viewer")), &w.dir)).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
    assert_eq!(common::openmetrics_problems(body), Vec::<String>::new(), "{body}");
    for line in ["hv_up{hypervisor=\"h\"} 1", "hv_domain_info{hypervisor=\"h\",domain=\"2\",name=\"d2\"} 1"] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }

    // Signed by the agent's CA but not on the allow-list: refused in HTTP, said why,
    // audited, and the hypervisor is not asked anything.
    let asked = w.requests().len();
    let reply = get_metrics_tls(&metrics, scraper(Some((&w.dir, "mallory")), &w.dir)).unwrap();
    assert!(reply.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{reply}");
    assert!(reply.contains("identity \"mallory\" is not on this agent's allow-list"), "{reply}");
    assert_eq!(w.requests().len(), asked, "{:?}", w.requests());
    let want = |l: &Value| l["event"] == "metrics" && l["identity"] == "mallory";
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");
}

#[test]
fn plain_http_to_the_tls_metrics_port_is_told_to_use_https() {
    let (w, metrics) = tls_metrics_world("metrics-tls-plain", "");
    let started = Instant::now();
    let (status, body) = get_metrics(&metrics);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    assert!(body.contains(&format!("over TLS: scrape https://{metrics}/metrics")), "{body}");
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let want = |l: &Value| l["event"] == "metrics" && l["reason"].as_str().unwrap_or("").contains("plain HTTP");
    let refused = w.refusals_with(want);
    assert!(refused.iter().any(want), "{refused:?}");
}

#[test]
fn metrics_over_tls_refuse_a_foreign_or_missing_client_certificate() {
    let (w, metrics) = tls_metrics_world("metrics-tls-otherca", "");
    // "ops" is on the allow-list, but this "ops" is signed by the other CA.
    let foreign = get_metrics_tls(&metrics, scraper(Some((&w.other_ca, "ops")), &w.dir));
    assert!(foreign.is_err(), "served: {foreign:?}");
    let none = get_metrics_tls(&metrics, scraper(None, &w.dir));
    assert!(none.is_err(), "served: {none:?}");
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let reason = |l: &Value| l["reason"].as_str().unwrap_or("").to_string();
    let handshake = |l: &Value| l["event"] == "metrics" && reason(l).contains("TLS handshake failed");
    let refused = w.refusals_with(|l| w.refusals().iter().filter(|l| handshake(l)).count() >= 2 && handshake(l));
    let reasons: Vec<String> = refused.iter().filter(|l| handshake(l)).map(reason).collect();
    assert!(reasons.iter().any(|r| r.contains("not signed by our CA")), "{reasons:?}");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
}

#[test]
fn a_stalled_tls_handshake_on_metrics_does_not_hold_up_another_scrape() {
    let (w, metrics) = tls_metrics_world("metrics-tls-stall", "handshake_timeout_secs = 4");
    // One says nothing; one stops half-way through its ClientHello.
    let silent = TcpStream::connect(&metrics).unwrap();
    let mut half = TcpStream::connect(&metrics).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let reply = get_metrics_tls(&metrics, scraper(Some((&w.dir, "viewer")), &w.dir)).unwrap();
    let took = started.elapsed();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(took < Duration::from_millis(2500), "held up for {took:?} by the stalled handshakes");
    // And the stalled ones are cut off at the handshake deadline.
    for mut s in [silent, half] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        until_closed(&mut s);
        let open_for = started.elapsed();
        assert!(open_for < Duration::from_secs(8), "a stalled handshake held on for {open_for:?}");
    }
    let handshake = |l: &Value| l["event"] == "metrics" && l["reason"].as_str().unwrap_or("").contains("TLS handshake");
    let refused = w.refusals_with(|l| w.refusals().iter().filter(|l| handshake(l)).count() >= 2 && handshake(l));
    assert_eq!(refused.iter().filter(|l| handshake(l)).count(), 2, "{refused:?}");
}
