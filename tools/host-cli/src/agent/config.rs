//! The two TOML files: the agent's (`hvctl agent serve --config agent.toml`: its
//! address, certificate, allow-list, limits, hypervisors) and hvctl's own
//! (`~/.config/hvctl/config.toml` or `$HVCTL_CONFIG`: named contexts, as kubectl's
//! kubeconfig, each an agent URL with the certificate, key and CA to reach it).
//! Relative paths in either are relative to the file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::proto::{DEFAULT_MAX_FRAME, Role};
use super::tls::TlsFiles;
use crate::{CliError, err};

/// One allowed client.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// The certificate's subject CN or one of its SANs.
    pub identity: String,
    /// What it may do.
    pub role: Role,
}

/// The agent's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// The agent's certificate (also its client certificate towards other agents).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signs clients' (and other agents') certificates.
    pub ca: PathBuf,
    /// Who may connect.
    #[serde(default)]
    pub allow: Vec<Allow>,
    /// Hypervisors by name (`--hypervisor NAME=TARGET` adds to these).
    #[serde(default)]
    pub hypervisors: BTreeMap<String, String>,
    /// Connections served at once; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The largest frame accepted, bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// Seconds a client has to finish the TLS handshake and its hello.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: f64,
    /// Seconds a connection may stay silent (and the most one frame may take).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: f64,
    /// `ADDR:PORT` to serve Prometheus' `GET /metrics` on (read-only: the same series
    /// as `hvctl metrics serve`, for every hypervisor of this agent). None: no metrics
    /// endpoint.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Serve `/metrics` over TLS 1.3 with the agent's certificate, to scrapers whose
    /// client certificate chains to `ca` and names an identity on the allow-list (any
    /// role: metrics are reads). False: plain HTTP, no identity.
    #[serde(default)]
    pub metrics_tls: bool,
}

fn default_max_connections() -> usize {
    64
}
fn default_max_frame() -> usize {
    DEFAULT_MAX_FRAME
}
fn default_handshake_timeout() -> f64 {
    5.0
}
fn default_idle_timeout() -> f64 {
    120.0
}

fn secs(v: f64, what: &str) -> Result<Duration, CliError> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(err(format!("{what} must be a positive number of seconds, not {v}")))
    }
}

fn relative_to(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}

impl AgentConfig {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        let mut c: AgentConfig =
            toml::from_str(&text).map_err(|e| err(format!("{}: {}", path.display(), one_line(&e.to_string()))))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        c.cert = relative_to(dir, &c.cert);
        c.key = relative_to(dir, &c.key);
        c.ca = relative_to(dir, &c.ca);
        if c.max_connections == 0 {
            return Err(err(format!("{}: max_connections must be at least 1", path.display())));
        }
        if c.max_frame < 1024 {
            return Err(err(format!("{}: max_frame must be at least 1024 bytes", path.display())));
        }
        secs(c.handshake_timeout_secs, "handshake_timeout_secs")?;
        secs(c.idle_timeout_secs, "idle_timeout_secs")?;
        Ok(c)
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }

    /// The role of a client whose certificate names `names` (CN first), and the name
    /// that matched; `None` when none is on the allow-list.
    pub fn role_of(&self, names: &[String]) -> Option<(String, Role)> {
        names.iter().find_map(|n| self.allow.iter().find(|a| &a.identity == n).map(|a| (n.clone(), a.role)))
    }

    /// The agent's own certificate as client files (towards another agent).
    pub fn as_client(&self) -> TlsFiles {
        TlsFiles { cert: Some(self.cert.clone()), key: Some(self.key.clone()), ca: Some(self.ca.clone()) }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One context of hvctl's config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// `tls://HOST:PORT[/NAME]`.
    pub agent: String,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
    /// The CA of the agent's certificate.
    pub ca: Option<PathBuf>,
}

/// hvctl's config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientConfig {
    /// The context used without `--context`.
    pub current_context: Option<String>,
    /// By name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where hvctl's config file is: `$HVCTL_CONFIG`, else `~/.config/hvctl/config.toml`.
pub fn client_config_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HVCTL_CONFIG")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hvctl").join("config.toml"))
}

impl ClientConfig {
    /// Read the config file; a missing file is an empty config unless it was named
    /// by `$HVCTL_CONFIG`.
    pub fn load() -> Result<(Self, PathBuf), CliError> {
        let Some(path) = client_config_path() else { return Ok((Self::default(), PathBuf::new())) };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("HVCTL_CONFIG").is_none() => {
                return Ok((Self::default(), path));
            }
            Err(e) => return Err(err(format!("cannot read the hvctl config {}: {e}", path.display()))),
        };
        let mut c: ClientConfig =
            toml::from_str(&text).map_err(|e| err(format!("{}: {}", path.display(), one_line(&e.to_string()))))?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        for ctx in c.contexts.values_mut() {
            for p in [&mut ctx.cert, &mut ctx.key, &mut ctx.ca].into_iter().flatten() {
                *p = relative_to(&dir, p);
            }
        }
        Ok((c, path))
    }

    /// The context `--context NAME` names, else the current one (if any).
    pub fn pick(&self, name: Option<&str>, path: &Path) -> Result<Option<&Context>, CliError> {
        match name.or(self.current_context.as_deref()) {
            None => Ok(None),
            Some(n) => self.contexts.get(n).map(Some).ok_or_else(|| {
                let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
                err(format!(
                    "no context {n:?} in {} (it has: {})",
                    path.display(),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_config_parses_with_defaults_and_matches_identities() {
        let dir = std::env::temp_dir().join(format!("hvctl-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            r#"listen = "127.0.0.2:7443"
cert = "a.pem"
key = "a.key"
ca = "/etc/ca.pem"
[[allow]]
identity = "ops"
role = "admin"
[[allow]]
identity = "viewer"
role = "read-only"
"#,
        )
        .unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert!(!c.metrics_tls, "plain HTTP unless asked");
        assert_eq!(c.cert, dir.join("a.pem"));
        assert_eq!(c.ca, PathBuf::from("/etc/ca.pem"));
        assert_eq!(c.max_frame, DEFAULT_MAX_FRAME);
        assert_eq!(c.role_of(&["nobody".into(), "viewer".into()]), Some(("viewer".into(), Role::ReadOnly)));
        assert_eq!(c.role_of(&["ops".into()]), Some(("ops".into(), Role::Admin)));
        assert_eq!(c.role_of(&["mallory".into()]), None);
        std::fs::write(&path, "listen = 1\n").unwrap();
        let e = AgentConfig::load(&path).unwrap_err();
        assert!(e.0.contains("agent.toml"), "{}", e.0);
        std::fs::write(
            &path,
            "listen = \"x\"\ncert=\"a\"\nkey=\"b\"\nca=\"c\"\n[[allow]]\nidentity=\"x\"\nrole=\"root\"\n",
        )
        .unwrap();
        let e = AgentConfig::load(&path).unwrap_err();
        assert!(e.0.contains("root"), "{}", e.0);
        std::fs::write(
            &path,
            "listen = \"x\"\ncert=\"a\"\nkey=\"b\"\nca=\"c\"\nmetrics_listen=\"127.0.0.1:9464\"\nmetrics_tls=true\n",
        )
        .unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert!(c.metrics_tls && c.metrics_listen.as_deref() == Some("127.0.0.1:9464"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
