//! `hvctl agent …`: the host agent that serves this host's hypervisors to remote
//! hvctl's over TLS 1.3 with mutual certificates (`serve`), the certificates to try it
//! (`init`), and the agent's own requests from the operator's side (`stats`, `list`).
//! Remote hvctl itself (`--connect tls://…`) lives in `transport`; the relay a
//! host-to-host migration runs is `migrate_cmd`'s.
//!
//! | module | what |
//! |---|---|
//! | [`proto`] | the agent protocol: messages and length-prefixed frames |
//! | [`tls`] | rustls configs, PEM files, certificate names, TLS errors as sentences |
//! | [`config`] | the agent's TOML config and hvctl's contexts |
//! | [`server`] | the daemon: connections, limits, access, audit, stats, migration |
//! | [`remote`] | the operator's side of host-to-host migration and stats |
//! | [`init`] | `hvctl agent init` (rcgen) |

pub mod config;
pub mod init;
pub mod proto;
pub mod remote;
pub mod server;
pub mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::CliError;
use crate::transport::Options;

/// `hvctl agent ...`
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Serve this host's hypervisors over TLS 1.3 with mutual certificates.
    Serve {
        /// The agent's config file (address, certificate, allow-list, limits).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// A hypervisor to serve, as NAME=TARGET (TARGET as for --connect). Repeatable.
        #[arg(long = "hypervisor", value_name = "NAME=TARGET")]
        hypervisors: Vec<String>,
        /// Listen here instead of the config's `listen` (ADDR:PORT).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Also append the audit log (JSON lines) to FILE.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Audit only to --audit-log, not stderr.
        #[arg(long, requires = "audit_log")]
        quiet: bool,
        /// Also serve Prometheus' GET /metrics here (read-only) for every hypervisor of
        /// this agent; overrides the config's `metrics_listen`.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<String>,
        /// Serve /metrics over TLS 1.3 with the agent's certificate, to scrapers with a
        /// client certificate from the agent's CA whose identity is on the allow-list
        /// (as the config's `metrics_tls = true`).
        #[arg(long)]
        metrics_tls: bool,
    },
    /// Make a CA, agent and client certificates (PEM), agent configs and an hvctl config.
    Init {
        /// Where to write them.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// An agent and its address, NAME=HOST:PORT (the address goes in its certificate). Repeatable.
        #[arg(long = "agent", value_name = "NAME=HOST:PORT")]
        agents: Vec<String>,
        /// A client identity and its role, NAME=admin or NAME=read-only. Repeatable.
        #[arg(long = "client", value_name = "NAME=ROLE")]
        clients: Vec<String>,
    },
    /// Bytes and requests per peer of the agent at --connect tls://HOST:PORT.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hypervisors of the agent at --connect tls://HOST:PORT.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run `hvctl agent ...`.
pub fn run(opts: &Options, a: AgentArgs) -> Result<ExitCode, CliError> {
    match a.command {
        AgentCommand::Serve { config, hypervisors, listen, audit_log, quiet, metrics, metrics_tls } => {
            server::serve(server::ServeOptions { config, hypervisors, listen, audit_log, quiet, metrics, metrics_tls })
        }
        AgentCommand::Init { dir, agents, clients } => init::init(init::InitOptions { dir, agents, clients }),
        AgentCommand::Stats { json } => remote::stats(opts, json),
        AgentCommand::List { json } => remote::list(opts, json),
    }
}
