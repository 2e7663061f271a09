//! `hvctl completions SHELL` and `hvctl man [--out DIR]`: shell completion scripts
//! (clap_complete) and man pages (clap_mangen) generated from the same clap definitions
//! that parse the command line, so they cannot fall out of step with it. Needs no
//! hypervisor; what to install where is the packager's business (see the README).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

use crate::{CliError, err};

/// `hvctl completions ...`
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    shell: Shell,
}

/// `hvctl man ...`
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command and subcommand (hvctl.1, hvctl-dirty.1,
    /// hvctl-dirty-heatmap.1, ...) into this directory instead of hvctl.1 to stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// The completion script for `args.shell` on stdout.
pub fn completions(mut cli: clap::Command, args: CompletionsArgs) -> Result<ExitCode, CliError> {
    let name = cli.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cli, name, &mut out);
    write_stdout(&out)
}

/// The man page(s).
pub fn man(cli: clap::Command, args: ManArgs) -> Result<ExitCode, CliError> {
    // `help` as a subcommand is clap's, not ours: no page for it.
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    match args.out {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cli).render(&mut out).map_err(|e| err(format!("rendering the man page: {e}")))?;
            write_stdout(&out)
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
            let mut written = Vec::new();
            pages(&cli, &dir, &mut written)?;
            let mut listing = format!("{} man pages written to {}\n", written.len(), dir.display());
            for path in written {
                listing.push_str(&format!("  {}\n", path.display()));
            }
            write_stdout(listing.as_bytes())
        }
    }
}

/// `cmd`'s page and its visible subcommands' pages, depth first, into `dir`.
fn pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), CliError> {
    let path = clap_mangen::Man::new(cmd.clone())
        .generate_to(dir)
        .map_err(|e| err(format!("writing the man page of {} into {}: {e}", cmd.get_name(), dir.display())))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, dir, written)?;
    }
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> Result<ExitCode, CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| err(format!("writing to stdout: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
