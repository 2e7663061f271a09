//! `hvctl domain create|list|pause|unpause|destroy|pin|console`: manage guest domains on
//! a running hypervisor. Kernels and initrds that do not fit one request are uploaded in
//! chunks first (`upload`); `console --interactive` is in `console`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use wire::{DomainSpec, ImageKind, ImageRef, Request, Response};

use crate::migrate_cmd::ProgressLine;
use crate::transport::{Client, Options};
use crate::upload::{self, UploadOptions};
use crate::{CliError, connection_err, console, err, interrupt, remote_err};

/// `hvctl domain ...`
#[derive(Debug, Args)]
pub struct DomainArgs {
    #[command(subcommand)]
    command: DomainCommand,
}

#[derive(Debug, Subcommand)]
enum DomainCommand {
    /// Create and start a domain from a guest kernel (an x86-64 ELF executable linked
    /// for guest_abi; bzImage and multiboot once the hypervisor loads them) and an
    /// optional initrd. Images that do not fit one request are uploaded in checksummed
    /// chunks first, with a progress line; Ctrl-C cancels the upload.
    Create {
        /// The kernel file.
        #[arg(long)]
        kernel: PathBuf,
        /// An initial ramdisk (bzImage and multiboot kernels only).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Draw the upload progress line even when stderr is not a terminal.
        #[arg(long)]
        progress: bool,
        /// Testing: corrupt upload chunk N (0-based) after its checksum is computed.
        #[arg(long, hide = true, value_name = "N")]
        debug_corrupt_chunk: Option<usize>,
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
        /// Physical CPUs (APIC IDs) the domain's vCPUs may run on: `1-3`, `0,2`,
        /// `0-1,3`, or `all` (the default: any CPU). The hypervisor refuses a CPU that
        /// does not run vCPUs.
        #[arg(long, value_name = "LIST")]
        cpus: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List domains: id, name, state, vCPUs, memory, exits, the CPUs they may run on.
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
    /// Pin a domain's vCPUs to physical CPUs, or unpin them with `all`. The hypervisor
    /// refuses a CPU that does not run vCPUs.
    Pin {
        /// Domain id.
        id: u32,
        /// APIC IDs of the physical CPUs: `1-3`, `0,2`, `0-1,3`, or `all` (unpin: any CPU).
        #[arg(value_name = "LIST")]
        cpus: String,
    },
    /// Print a domain's console.
    Console {
        /// Domain id.
        id: u32,
        /// Keep printing new output until the domain is gone (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Attach: keystrokes go to the guest's UART, output keeps streaming, Ctrl-]
        /// leaves. Raw mode on a terminal; from a pipe, its bytes are sent and hvctl
        /// leaves once the console has been quiet for 1.5 s after the input's end.
        #[arg(long, conflicts_with = "follow")]
        interactive: bool,
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

// One parser and printer of CPU lists for hvctl and the hypervisor's DOMAINS.CFG.
pub use wire::cpulist::{format as format_cpu_list, parse as parse_cpu_list};

fn done(response: Response, what: &str) -> Result<Response, CliError> {
    match response {
        Response::Error(e) => Err(remote_err(format!("{what}: {e}"))),
        other => Ok(other),
    }
}

/// Run a `domain` subcommand.
pub fn run(opts: &Options, args: DomainArgs) -> Result<ExitCode, CliError> {
    match args.command {
        DomainCommand::Create {
            kernel,
            initrd,
            progress,
            debug_corrupt_chunk,
            name,
            memory,
            vcpus,
            cpuid,
            cmdline,
            cpus,
            json,
        } => {
            let cpus = match cpus {
                Some(list) => parse_cpu_list(&list).map_err(|e| err(format!("--cpus {list}: {e}")))?,
                None => None,
            };
            let size = |p: &PathBuf| -> Result<usize, CliError> {
                let len = std::fs::metadata(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?.len();
                if len == 0 {
                    return Err(err(format!("{} is empty", p.display())));
                }
                if len > wire::MAX_IMAGE_LEN {
                    return Err(err(format!(
                        "{} is {len} bytes; the protocol carries images of at most {} bytes",
                        p.display(),
                        wire::MAX_IMAGE_LEN
                    )));
                }
                usize::try_from(len).map_err(|_| err(format!("{} is too large for this machine", p.display())))
            };
            let kernel_len = size(&kernel)?;
            let initrd_len = initrd.as_ref().map(size).transpose()?;
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
            let mut client = Client::connect(opts)?;
            // Small enough for one request: inline, one round trip. Else upload.
            let inline_limit = wire::MAX_FRAME_LEN - 1024;
            let inline =
                debug_corrupt_chunk.is_none() && kernel_len + initrd_len.unwrap_or(0) + cmdline.len() <= inline_limit;
            let sizes = (kernel_len, initrd_len);
            let (kernel_ref, initrd_ref) = if inline {
                let read = |p: &PathBuf| std::fs::read(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())));
                (ImageRef::Inline(read(&kernel)?), initrd.as_ref().map(read).transpose()?.map(ImageRef::Inline))
            } else {
                interrupt::install()?;
                let mut line = ProgressLine::new(progress);
                let uopts = UploadOptions { corrupt_chunk: debug_corrupt_chunk };
                let k = upload::upload(&mut client, ImageKind::Kernel, &kernel, uopts, &mut line)?;
                let i = match &initrd {
                    Some(path) => match upload::upload(&mut client, ImageKind::Initrd, path, uopts, &mut line) {
                        Ok(i) => Some(ImageRef::Uploaded(i)),
                        Err(e) => {
                            let _ = client.call(&Request::ImageCancel { upload: k });
                            return Err(e);
                        }
                    },
                    None => None,
                };
                (ImageRef::Uploaded(k), i)
            };
            let spec = DomainSpec {
                name: name.clone(),
                kernel: kernel_ref,
                initrd: initrd_ref,
                memory_bytes,
                vcpus,
                cpuid,
                cmdline,
                cpus,
            };
            match done(client.call(&Request::DomainCreate(spec))?, "create")? {
                Response::DomainCreated { id } => {
                    if json {
                        println!(
                            "{}",
                            json!({
                                "id": id, "name": name, "kernel_bytes": sizes.0, "initrd_bytes": sizes.1,
                                "uploaded": !inline,
                            })
                        );
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
                            "unclaimed": unclaimed, "cpus": d.cpus,
                        })
                    })
                    .collect();
                let out =
                    json!({ "domains": domains, "free_frames": list.free_frames, "total_frames": list.total_frames });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:>4}  {:<16} {:>5} {:>8} {:>10} {:>10}  {:<12} STATE",
                "ID", "NAME", "VCPUS", "MEMORY", "EXITS", "RUNTIME", "CPUS"
            );
            for d in &list.domains {
                println!(
                    "{:>4}  {:<16} {:>5} {:>7}M {:>10} {:>9.2}s  {:<12} {}",
                    d.id,
                    d.name,
                    d.vcpus,
                    d.memory_bytes >> 20,
                    d.exits.iter().map(|(_, v)| v).sum::<u64>(),
                    d.runtime_ns as f64 / 1e9,
                    format_cpu_list(d.cpus.as_deref()),
                    d.state
                );
            }
            println!("frame pool: {} of {} frames free", list.free_frames, list.total_frames);
            Ok(ExitCode::SUCCESS)
        }
        DomainCommand::Pause { id } => simple(opts, Request::DomainPause { id }, "paused", id),
        DomainCommand::Unpause { id } => simple(opts, Request::DomainUnpause { id }, "unpaused", id),
        DomainCommand::Destroy { id } => simple(opts, Request::DomainDestroy { id }, "destroyed", id),
        DomainCommand::Pin { id, cpus: list } => {
            let cpus = parse_cpu_list(&list).map_err(|e| err(format!("pin {id} {list}: {e}")))?;
            let shown = match &cpus {
                Some(c) => format!("pinned to CPUs {}", format_cpu_list(Some(c))),
                None => "unpinned (any CPU)".into(),
            };
            let mut client = Client::connect(opts)?;
            match done(client.call(&Request::DomainPin { id, cpus })?, "pin")? {
                Response::Done => {
                    println!("domain {id} {shown}");
                    Ok(ExitCode::SUCCESS)
                }
                _ => Err(connection_err("the hypervisor answered pin with the wrong message")),
            }
        }
        DomainCommand::Console { id, interactive: true, .. } => console::interactive(opts, id),
        DomainCommand::Console { id, follow, interactive: false } => {
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
