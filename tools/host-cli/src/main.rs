//! hvctl: the host command line for the hypervisor.
//!
//! Each command group lives in its own module (`cpuid_cmd` for `hvctl cpuid …`);
//! this file only parses the command line and turns errors into the one-line
//! `hvctl: error: …` form. Exit codes: 0 success, 1 a negative verdict (e.g.
//! `cpuid check` found the policy incompatible), 2 usage or input errors.

mod cpuid_cmd;

use clap::{Parser, Subcommand};
use std::fmt;
use std::process::ExitCode;

/// hvctl: control and inspect the hypervisor from the host.
#[derive(Debug, Parser)]
#[command(name = "hvctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// CPUID featuresets, policies and cross-host levelling (no hypervisor needed).
    Cpuid(cpuid_cmd::CpuidArgs),
}

/// A command failure: printed as one line, exit code 2.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shorthand for building a [`CliError`].
pub fn err(msg: impl Into<String>) -> CliError {
    CliError(msg.into())
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
            let first = rendered.lines().next().unwrap_or("invalid command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("hvctl: error: {first} (see hvctl --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Cpuid(args) => cpuid_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hvctl: error: {e}");
            ExitCode::from(2)
        }
    }
}
