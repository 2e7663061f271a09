//! hvctl: the host command line for the hypervisor.
//!
//! Each command group lives in its own module (`cpuid_cmd` for `hvctl cpuid …`);
//! this file only parses the command line and turns errors into the one-line
//! `hvctl: error: …` form. Exit codes: see [`EXIT_CODES`].

mod agent;
mod console;
mod control_cmd;
mod cpuid_cmd;
mod dirty_cmd;
mod docs_cmd;
mod domain_cmd;
mod heatmap;
mod interrupt;
mod metrics;
mod migrate_cmd;
mod monitor_cmd;
mod progress;
mod serial_link;
mod transport;
mod upload;
mod watch;

use clap::{CommandFactory, Parser, Subcommand};
use std::fmt;
use std::process::ExitCode;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "Exit codes: 0 success; 1 a negative verdict (cpuid check/policy: incompatible or rejected); \
2 usage or input error; 3 cannot reach the hypervisor (connection refused, timeout, protocol error); \
4 the hypervisor answered with an error.";

/// hvctl: control and inspect the hypervisor from the host.
#[derive(Debug, Parser)]
#[command(name = "hvctl", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Where the hypervisor listens. vsock: `unix:PATH:PORT` (vhost-device-vsock's
    /// hybrid socket, as `cargo xtask run` prints) or `vsock:CID:PORT` (AF_VSOCK). Its
    /// COM2 serial port: `unix:PATH` or `tcp:HOST:PORT` (an emulator's serial backend),
    /// or `serial:DEVICE[@BAUD]` (a serial line, e.g. serial:/dev/ttyS1@115200; default
    /// 115200 baud). Default: $HVCTL_CONNECT, else the file target/xtask/hvctl.connect
    /// that `cargo xtask run` writes.
    #[arg(long, global = true, value_name = "TARGET")]
    connect: Option<String>,
    /// Seconds to keep retrying the connection.
    #[arg(long, global = true, default_value_t = 5.0, value_name = "SECS")]
    connect_timeout: f64,
    /// Client certificate (PEM) for tls:// targets. Default: the context's.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA (PEM) that signed the agent's certificate.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// A context of hvctl's config ($HVCTL_CONFIG, else ~/.config/hvctl/config.toml):
    /// an agent URL with its certificate, key and CA. Default: its current-context,
    /// when no --connect or $HVCTL_CONNECT is given.
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// CPUID featuresets, policies and cross-host levelling, from files, this machine or
    /// hypervisors over the wire.
    Cpuid(cpuid_cmd::CpuidArgs),
    /// The hypervisor's version, uptime, capabilities, CPUs, memory and services.
    Info(control_cmd::InfoArgs),
    /// Round-trip time to the hypervisor.
    Ping(control_cmd::PingArgs),
    /// Guest domains: create (uploads a kernel), list, pause, unpause, destroy, console.
    Domain(domain_cmd::DomainArgs),
    /// Per-domain monitoring: RDT cache/bandwidth (bare metal) and software events.
    Monitor(monitor_cmd::MonitorArgs),
    /// Log-dirty mode: start, stats, peek, clean, stream, heatmap, stop.
    Dirty(dirty_cmd::DirtyArgs),
    /// Live-migrate a domain from one hypervisor (--from) to another (--to): hvctl
    /// relays the stream between them. Or --cancel a running migration.
    Migrate(migrate_cmd::MigrateArgs),
    /// Save a domain to a file (its migration stream). The domain is destroyed on the
    /// hypervisor once the file is complete, like `xl save`.
    Save(migrate_cmd::SaveArgs),
    /// Create a domain from a file written by `hvctl save`; prints its id.
    Restore(migrate_cmd::RestoreArgs),
    /// Shell completions (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs_cmd::CompletionsArgs),
    /// The man page hvctl.1 on stdout, or one page per subcommand with --out DIR.
    Man(docs_cmd::ManArgs),
    /// The host agent: serve hypervisors over TLS (serve), make certificates (init),
    /// and ask an agent for its stats or hypervisors.
    Agent(agent::AgentArgs),
    /// Prometheus metrics of hypervisors: serve GET /metrics, or print one scrape.
    Metrics(metrics::MetricsArgs),
}

/// A command failure: printed as one line, with its exit code (see [`EXIT_CODES`]).
#[derive(Debug)]
pub struct CliError(pub String, pub u8);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A usage or input error (exit 2).
pub fn err(msg: impl Into<String>) -> CliError {
    CliError(msg.into(), 2)
}

/// The hypervisor could not be reached or spoke nonsense (exit 3).
pub fn connection_err(msg: impl Into<String>) -> CliError {
    CliError(msg.into(), 3)
}

/// The hypervisor answered with an error (exit 4).
pub fn remote_err(msg: impl Into<String>) -> CliError {
    CliError(msg.into(), 4)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                // Help and version go to stdout as clap formats them.
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let rendered = e.render().to_string();
            let mut lines = rendered.lines();
            let first = lines.next().unwrap_or("invalid command line");
            let mut first = first.strip_prefix("error: ").unwrap_or(first).to_string();
            // "the following required arguments were not provided:" lists them on the
            // indented lines that follow: keep them on the one line.
            if first.ends_with(':') {
                let items: Vec<&str> =
                    lines.take_while(|l| l.starts_with("  ")).map(str::trim).filter(|l| !l.is_empty()).collect();
                if !items.is_empty() {
                    first = format!("{first} {}", items.join(", "));
                }
            }
            eprintln!("hvctl: error: {first} (see hvctl --help)");
            return ExitCode::from(2);
        }
    };
    let connect = match tls_setup(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hvctl: error: {e}");
            return ExitCode::from(e.1);
        }
    };
    let cli = Cli { connect, ..cli };
    let result = match cli.command {
        Command::Cpuid(args) => {
            cpuid_cmd::run(cli.connect.clone(), std::time::Duration::from_secs_f64(cli.connect_timeout.max(0.0)), args)
        }
        Command::Info(args) => control_cmd::info(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Ping(args) => control_cmd::ping(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Domain(args) => domain_cmd::run(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Monitor(args) => monitor_cmd::run(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Dirty(args) => dirty_cmd::run(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Migrate(args) => migrate_cmd::migrate(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Save(args) => migrate_cmd::save(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Metrics(args) => metrics::run(std::time::Duration::from_secs_f64(cli.connect_timeout.max(0.0)), args),
        Command::Restore(args) => migrate_cmd::restore(&cli_target(&cli.connect, cli.connect_timeout), args),
        Command::Completions(args) => docs_cmd::completions(Cli::command(), args),
        Command::Man(args) => docs_cmd::man(Cli::command(), args),
        Command::Agent(args) => agent::run(&cli_target(&cli.connect, cli.connect_timeout), args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hvctl: error: {e}");
            ExitCode::from(e.1)
        }
    }
}

fn cli_target(connect: &Option<String>, timeout: f64) -> transport::Options {
    transport::Options { connect: connect.clone(), timeout: std::time::Duration::from_secs_f64(timeout.max(0.0)) }
}

/// The certificate files for tls:// targets (flags over the context) and the target:
/// `--connect`, else the context's agent when a context is chosen (`--context`, or the
/// config's current-context when neither --connect nor $HVCTL_CONNECT is given).
fn tls_setup(cli: &Cli) -> Result<Option<String>, CliError> {
    let env_connect = std::env::var("HVCTL_CONNECT").is_ok_and(|c| !c.trim().is_empty());
    let (config, path) = agent::config::ClientConfig::load()?;
    let implicit = cli.connect.is_none() && !env_connect;
    let context = match (&cli.context, implicit) {
        (Some(name), _) => config.pick(Some(name), &path)?,
        (None, true) => config.pick(None, &path)?,
        (None, false) => config.pick(None, &path).ok().flatten(),
    };
    let files = agent::tls::TlsFiles {
        cert: cli.tls_cert.clone().or_else(|| context.and_then(|c| c.cert.clone())),
        key: cli.tls_key.clone().or_else(|| context.and_then(|c| c.key.clone())),
        ca: cli.tls_ca.clone().or_else(|| context.and_then(|c| c.ca.clone())),
    };
    transport::set_tls(files);
    let from_context = if cli.context.is_some() || implicit { context.map(|c| c.agent.clone()) } else { None };
    Ok(cli.connect.clone().or(from_context))
}
