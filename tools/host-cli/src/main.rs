//! hvctl: the host command line for the hypervisor.
//!
//! Each command group lives in its own module (`cpuid_cmd` for `hvctl cpuid …`);
//! this file only parses the command line and turns errors into the one-line
//! `hvctl: error: …` form. Exit codes: see [`EXIT_CODES`].

mod console;
mod control_cmd;
mod cpuid_cmd;
mod dirty_cmd;
mod domain_cmd;
mod interrupt;
mod metrics;
mod migrate_cmd;
mod monitor_cmd;
mod serial_link;
mod transport;
mod upload;

use clap::{Parser, Subcommand};
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
