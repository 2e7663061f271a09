//! Host agents for the tests: certificates from `hvctl agent init`, an agent config
//! written by the test (its allow-list is what a test is about), and `hvctl agent
//! serve` run as a child process on a loopback address, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on `ip` (bound and released: the agent binds it right after).
///
/// Not `bind(0)`: that picks from Linux's ephemeral range (32768-60999), where the
/// outgoing connections of the other tests running in parallel take their local ports
/// too, and one took a port between its release here and the agent's bind (CI:
/// "cannot listen for /metrics on 127.0.0.2:38285: Address already in use"). Below
/// that range no connection gets a port by itself, and within this process no port is
/// handed out twice.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // A different start per process, so two test binaries running at once rarely meet.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + start.wrapping_add(n) % SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on {ip} in {FIRST}..{}", FIRST + SPAN);
}

/// A fresh directory for one test's files.
pub fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvctl-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `hvctl agent init` into `dir` with these agents (`NAME=HOST:PORT`) and clients (`NAME=ROLE`).
pub fn init(dir: &Path, agents: &[String], clients: &[&str]) {
    let mut args = vec!["agent".to_string(), "init".into(), "--dir".into(), dir.display().to_string()];
    for a in agents {
        args.extend(["--agent".into(), a.clone()]);
    }
    for c in clients {
        args.extend(["--client".into(), c.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = super::hvctl(&args);
    assert_eq!(o.status.code(), Some(0), "agent init: {}", super::stderr(&o));
}

/// A running agent.
pub struct Agent {
    child: Child,
    /// `HOST:PORT`.
    pub addr: String,
    /// Its audit log.
    pub audit: PathBuf,
}

impl Agent {
    /// Write `NAME.conf.toml` beside the certificates (agent NAME's cert, `allow` as
    /// `(identity, role)`, `extra` appended) and serve `hypervisors` (`NAME=TARGET`).
    pub fn start(
        dir: &Path,
        name: &str,
        addr: &str,
        allow: &[(&str, &str)],
        extra: &str,
        hypervisors: &[String],
    ) -> Self {
        let mut conf =
            format!("listen = \"{addr}\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\nca = \"ca.pem\"\n{extra}\n");
        for (identity, role) in allow {
            conf.push_str(&format!("[[allow]]\nidentity = \"{identity}\"\nrole = \"{role}\"\n"));
        }
        let path = dir.join(format!("{name}.conf.toml"));
        std::fs::write(&path, conf).unwrap();
        let audit = dir.join(format!("{name}.audit.jsonl"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hvctl"));
        cmd.args(["agent", "serve", "--config"]).arg(&path).arg("--audit-log").arg(&audit).arg("--quiet");
        for h in hypervisors {
            cmd.args(["--hypervisor", h]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("AGENT listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let started = Instant::now();
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            panic!("agent {name} did not start listening within {:?}", started.elapsed());
        }
        Self { child, addr: addr.to_string(), audit }
    }

    /// `tls://ADDR/NAME`.
    pub fn url(&self, hypervisor: &str) -> String {
        format!("tls://{}/{hypervisor}", self.addr)
    }

    /// The audit log's lines.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--tls-cert/--tls-key/--tls-ca` for client `name` of the certificates in `dir`
/// (CA from `ca_dir`).
pub fn tls_args(dir: &Path, name: &str, ca_dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--tls-ca".into(),
        ca_dir.join("ca.pem").display().to_string(),
    ]
}
