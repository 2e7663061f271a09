//! `hvctl agent init`: a small CA and the certificates to try a fleet with (rcgen,
//! ECDSA P-256), as PEM files, plus an agent config per agent and an hvctl config with
//! a context per client and agent. For trying and for tests; a real fleet uses its own
//! CA and only needs the PEM files and the two configs' shape.
//!
//! Agent certificates carry the agent's address as a SAN (an IP or DNS name, which
//! hvctl checks) and both server and client usage: an agent is a client of another
//! agent in a host-to-host migration. Each agent allows every client with its role and
//! every other agent as admin.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::proto::Role;
use crate::{CliError, err};

/// `hvctl agent init` arguments, parsed.
#[derive(Debug)]
pub struct InitOptions {
    /// Where the files go.
    pub dir: PathBuf,
    /// `NAME=HOST:PORT`.
    pub agents: Vec<String>,
    /// `NAME=ROLE`.
    pub clients: Vec<String>,
}

fn split<'a>(pair: &'a str, flag: &str, example: &str) -> Result<(&'a str, &'a str), CliError> {
    pair.split_once('=')
        .filter(|(n, v)| {
            !n.is_empty() && !v.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        .ok_or_else(|| err(format!("{flag} {pair:?}: expected {example} (a name of letters, digits, '-', '_', '.')")))
}

fn role(s: &str) -> Result<Role, CliError> {
    match s {
        "admin" => Ok(Role::Admin),
        "read-only" => Ok(Role::ReadOnly),
        other => Err(err(format!("unknown role {other:?}: use admin or read-only"))),
    }
}

fn cert_err(what: &str) -> impl Fn(rcgen::Error) -> CliError + '_ {
    move |e| err(format!("cannot make the {what} certificate: {e}"))
}

fn write(path: &Path, text: &str) -> Result<(), CliError> {
    std::fs::write(path, text).map_err(|e| err(format!("cannot write {}: {e}", path.display())))
}

fn leaf(name: &str, sans: Vec<SanType>, server: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    p
}

fn toml_str(s: &str) -> String {
    // TOML basic strings escape like JSON's.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Run `hvctl agent init`.
pub fn init(o: InitOptions) -> Result<ExitCode, CliError> {
    if o.agents.is_empty() {
        return Err(err("name at least one agent: --agent NAME=HOST:PORT (e.g. --agent a=127.0.0.2:7443)"));
    }
    let mut agents = Vec::new();
    for a in &o.agents {
        let (name, addr) = split(a, "--agent", "NAME=HOST:PORT")?;
        let (host, port) =
            addr.rsplit_once(':').ok_or_else(|| err(format!("--agent {a:?}: expected NAME=HOST:PORT")))?;
        port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| err(format!("--agent {a:?}: bad port {port:?}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        agents.push((name, host, addr));
    }
    let mut clients = Vec::new();
    for c in &o.clients {
        let (name, r) = split(c, "--client", "NAME=ROLE (admin or read-only)")?;
        clients.push((name, role(r)?));
    }
    std::fs::create_dir_all(&o.dir).map_err(|e| err(format!("cannot create {}: {e}", o.dir.display())))?;
    let ca_key = KeyPair::generate().map_err(cert_err("CA"))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "hvctl fleet CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err("CA"))?;
    write(&o.dir.join("ca.pem"), &ca_cert.pem())?;
    write(&o.dir.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let mut made = vec!["ca.pem".to_string(), "ca.key".to_string()];
    let mut issue = |name: &str, params: CertificateParams| -> Result<(), CliError> {
        let key = KeyPair::generate().map_err(cert_err(name))?;
        let cert = params.signed_by(&key, &issuer).map_err(cert_err(name))?;
        write(&o.dir.join(format!("{name}.pem")), &cert.pem())?;
        write(&o.dir.join(format!("{name}.key")), &key.serialize_pem())?;
        made.push(format!("{name}.pem, {name}.key"));
        Ok(())
    };
    for (name, host, _) in &agents {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*host).try_into().map_err(|e| err(format!("{host} is not a DNS name: {e}")))?),
        };
        issue(name, leaf(name, vec![san], true))?;
    }
    for (name, _) in &clients {
        let san = SanType::DnsName((*name).try_into().map_err(|e| err(format!("{name} is not a usable name: {e}")))?);
        issue(name, leaf(name, vec![san], false))?;
    }
    for (name, _, addr) in &agents {
        let mut t = String::new();
        let _ = writeln!(t, "# hvctl agent serve --config {name}.toml --hypervisor h=unix:/path/vm.vsock:5000");
        let _ = writeln!(t, "listen = {}", toml_str(addr));
        let _ = writeln!(
            t,
            "cert = {}\nkey = {}\nca = \"ca.pem\"",
            toml_str(&format!("{name}.pem")),
            toml_str(&format!("{name}.key"))
        );
        let _ = writeln!(
            t,
            "max_connections = 64\nmax_frame = 262144\nhandshake_timeout_secs = 5\nidle_timeout_secs = 120"
        );
        let _ = writeln!(
            t,
            "# Prometheus' GET /metrics (read-only), or --metrics ADDR:PORT; metrics_tls: over TLS, to\n# scrapers with a certificate from ca.pem on the allow-list (or --metrics-tls)\n# metrics_listen = \"127.0.0.1:9464\"\n# metrics_tls = true"
        );
        for (client, r) in &clients {
            let _ = writeln!(t, "\n[[allow]]\nidentity = {}\nrole = \"{}\"", toml_str(client), r.name());
        }
        for (other, _, _) in agents.iter().filter(|(o, _, _)| o != name) {
            let _ = writeln!(
                t,
                "\n# agent {other} migrates to this one\n[[allow]]\nidentity = {}\nrole = \"admin\"",
                toml_str(other)
            );
        }
        write(&o.dir.join(format!("{name}.toml")), &t)?;
        made.push(format!("{name}.toml"));
    }
    let mut h = String::new();
    let first = clients.first().zip(agents.first()).map(|((c, _), (a, _, _))| format!("{c}@{a}"));
    if let Some(f) = &first {
        let _ = writeln!(h, "current-context = {}", toml_str(f));
    }
    for (client, _) in &clients {
        for (agent, _, addr) in &agents {
            let _ = writeln!(
                h,
                "\n[contexts.{}]\nagent = {}\ncert = {}\nkey = {}\nca = \"ca.pem\"",
                toml_str(&format!("{client}@{agent}")),
                toml_str(&format!("tls://{addr}")),
                toml_str(&format!("{client}.pem")),
                toml_str(&format!("{client}.key"))
            );
        }
    }
    write(&o.dir.join("hvctl-config.toml"), &h)?;
    made.push("hvctl-config.toml".into());
    println!("wrote to {}: {}", o.dir.display(), made.join("; "));
    println!("keep ca.key safe (it signs new certificates); use the configs with:");
    if let Some((first, _, _)) = agents.first() {
        println!("  hvctl agent serve --config {}/{first}.toml --hypervisor h=TARGET", o.dir.display());
    }
    println!("  HVCTL_CONFIG={}/hvctl-config.toml hvctl --context CLIENT@AGENT info", o.dir.display());
    Ok(ExitCode::SUCCESS)
}
