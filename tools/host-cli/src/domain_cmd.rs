//! `hvctl domain create|list|pause|unpause|destroy|console`: manage guest domains on a
//! running hypervisor.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use wire::{DomainSpec, Request, Response};

use crate::transport::{Client, Options};
use crate::{CliError, connection_err, err, remote_err};

/// `hvctl domain ...`
#[derive(Debug, Args)]
pub struct DomainArgs {
    #[command(subcommand)]
    command: DomainCommand,
}

#[derive(Debug, Subcommand)]
enum DomainCommand {
    /// Create and start a domain from a guest kernel (an x86-64 ELF executable linked
    /// for guest_abi; it is uploaded with the request, so it must fit one 64 KiB frame).
    Create {
        /// The kernel file.
        #[arg(long)]
        kernel: PathBuf,
        /// Name (default: the kernel file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Guest memory, with K/M/G suffix.
        #[arg(long, default_value = "16M")]
        memory: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// CPUID policy: levelling's text form (e.g. `base=host-max,-avx2`) or a file
        /// written by `hvctl cpuid policy -o`. Default: the host's max.
        #[arg(long)]
        cpuid: Option<String>,
        /// Guest command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List domains: id, name, state, vCPUs, memory, exits.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop scheduling a domain.
    Pause {
        /// Domain id.
        id: u32,
    },
    /// Resume a paused domain.
    Unpause {
        /// Domain id.
        id: u32,
    },
    /// Destroy a domain and return its memory.
    Destroy {
        /// Domain id.
        id: u32,
    },
    /// Print a domain's console.
    Console {
        /// Domain id.
        id: u32,
        /// Keep printing new output until the domain is gone (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
    },
}

/// Parse a size with an optional K/M/G suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn done(response: Response, what: &str) -> Result<Response, CliError> {
    match response {
        Response::Error(e) => Err(remote_err(format!("{what}: {e}"))),
        other => Ok(other),
    }
}

/// Run a `domain` subcommand.
pub fn run(opts: &Options, args: DomainArgs) -> Result<ExitCode, CliError> {
    match args.command {
        DomainCommand::Create { kernel, name, memory, vcpus, cpuid, cmdline, json } => {
            let image = std::fs::read(&kernel).map_err(|e| err(format!("cannot read {}: {e}", kernel.display())))?;
            let limit = wire::MAX_FRAME_LEN - 1024;
            if image.len() > limit {
                return Err(err(format!(
                    "{} is {} bytes; a kernel must fit one request (at most {limit} bytes): strip it",
                    kernel.display(),
                    image.len()
                )));
            }
            let memory_bytes = parse_size(&memory).ok_or_else(|| err(format!("--memory {memory}: not a size")))?;
            let cpuid = match cpuid {
                Some(c) if std::path::Path::new(&c).is_file() => {
                    Some(std::fs::read_to_string(&c).map_err(|e| err(format!("cannot read {c}: {e}")))?)
                }
                other => other,
            };
            let name = name.unwrap_or_else(|| {
                kernel.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "domain".into())
            });
            let spec = DomainSpec { name: name.clone(), kernel: image, memory_bytes, vcpus, cpuid, cmdline };
            let mut client = Client::connect(opts)?;
            match done(client.call(&Request::DomainCreate(spec))?, "create")? {
                Response::DomainCreated { id } => {
                    if json {
                        println!("{}", json!({ "id": id, "name": name }));
                    } else {
                        println!("created domain {id} ({name})");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                _ => Err(connection_err("the hypervisor answered create with the wrong message")),
            }
        }
        DomainCommand::List { json } => {
            let mut client = Client::connect(opts)?;
            let Response::DomainList(list) = done(client.call(&Request::DomainList)?, "list")? else {
                return Err(connection_err("the hypervisor answered list with the wrong message"));
            };
            if json {
                let domains: Vec<_> = list
                    .domains
                    .iter()
                    .map(|d| {
                        let exits: serde_json::Map<String, serde_json::Value> =
                            d.exits.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                        let unclaimed: Vec<_> = d
                            .unclaimed
                            .iter()
                            .map(|u| {
                                json!({
                                    "space": if u.mmio { "mmio" } else { "port" },
                                    "addr": format!("{:#x}", u.addr), "reads": u.reads, "writes": u.writes,
                                })
                            })
                            .collect();
                        json!({
                            "id": d.id, "name": d.name, "state": d.state, "vcpus": d.vcpus,
                            "memory_bytes": d.memory_bytes, "exits": exits,
                            "exits_total": d.exits.iter().map(|(_, v)| v).sum::<u64>(), "runtime_ns": d.runtime_ns,
                            "unclaimed": unclaimed,
                        })
                    })
                    .collect();
                let out =
                    json!({ "domains": domains, "free_frames": list.free_frames, "total_frames": list.total_frames });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:>4}  {:<16} {:>5} {:>8} {:>10} {:>10}  STATE",
                "ID", "NAME", "VCPUS", "MEMORY", "EXITS", "RUNTIME"
            );
            for d in &list.domains {
                println!(
                    "{:>4}  {:<16} {:>5} {:>7}M {:>10} {:>9.2}s  {}",
                    d.id,
                    d.name,
                    d.vcpus,
                    d.memory_bytes >> 20,
                    d.exits.iter().map(|(_, v)| v).sum::<u64>(),
                    d.runtime_ns as f64 / 1e9,
                    d.state
                );
            }
            println!("frame pool: {} of {} frames free", list.free_frames, list.total_frames);
            Ok(ExitCode::SUCCESS)
        }
        DomainCommand::Pause { id } => simple(opts, Request::DomainPause { id }, "paused", id),
        DomainCommand::Unpause { id } => simple(opts, Request::DomainUnpause { id }, "unpaused", id),
        DomainCommand::Destroy { id } => simple(opts, Request::DomainDestroy { id }, "destroyed", id),
        DomainCommand::Console { id, follow } => {
            use std::io::Write;
            let mut client = Client::connect(opts)?;
            let mut offset = 0u64;
            loop {
                let chunk = match client.call(&Request::DomainConsole { id, offset })? {
                    Response::Console(c) => c,
                    Response::Error(e) if follow && offset > 0 => {
                        eprintln!("hvctl: domain {id} is gone ({e})");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Response::Error(e) => return Err(remote_err(format!("console: {e}"))),
                    _ => return Err(connection_err("the hypervisor answered console with the wrong message")),
                };
                if chunk.offset > offset {
                    eprintln!("hvctl: [{} older console bytes were overwritten]", chunk.offset - offset);
                }
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&chunk.data);
                let _ = out.flush();
                offset = chunk.total;
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn simple(opts: &Options, request: Request, verb: &str, id: u32) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(opts)?;
    match done(client.call(&request)?, verb)? {
        Response::Done => {
            println!("domain {id} {verb}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(connection_err(format!("the hypervisor answered {verb} with the wrong message"))),
    }
}
