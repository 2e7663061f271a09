//! `hvctl monitor ...`: per-domain cache/memory-bandwidth monitoring (Intel RDT CMT/MBM,
//! AMD PQoS) and software events. Hardware counters exist only on bare metal with
//! RDT/PQoS monitoring; on the emulators `hwinfo` says why they are absent, while the
//! software events (VM exits, CPUID exits, guest run time, ...) work everywhere.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use wire::{ErrorCode, MonitorDomainStats, MonitorHwInfo, MonitorValue, Request, Response};

use crate::transport::{Client, Options};
use crate::watch::{self, Poll, Row, WatchArgs};
use crate::{CliError, connection_err, remote_err};

/// `hvctl monitor ...`
#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(subcommand)]
    command: MonitorCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Show {
    /// L3 cache occupancy (KB).
    CacheOccupancy,
    /// Total memory bandwidth (KB/s).
    TotalMemBandwidth,
    /// Local memory bandwidth (KB/s).
    LocalMemBandwidth,
}

#[derive(Debug, Subcommand)]
enum MonitorCommand {
    /// Monitoring hardware: present or why not, RMIDs, L3 size, upscaling, counter width, events.
    Hwinfo {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a domain (or some vCPUs, e.g. --vcpus 0,2) its own RMID.
    Attach {
        /// Domain id.
        domain: u32,
        /// vCPU list (default: all).
        #[arg(long, value_delimiter = ',')]
        vcpus: Option<Vec<u32>>,
    },
    /// Take a domain's RMIDs back (they drain in limbo before reuse).
    Detach {
        /// Domain id.
        domain: u32,
    },
    /// Enable or disable events of a domain (comma-separated names; see `hwinfo`).
    Events {
        /// Domain id.
        domain: u32,
        /// Events to enable.
        #[arg(long, value_delimiter = ',')]
        enable: Vec<String>,
        /// Events to disable.
        #[arg(long, value_delimiter = ',')]
        disable: Vec<String>,
    },
    /// Every enabled event of one domain or all, once, or with --watch as a table
    /// refreshed with the counters' rates.
    Stats {
        /// Domain id (default: all domains with an enabled event).
        domain: Option<u32>,
        #[command(flatten)]
        watch: WatchArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A table like `xl psr-cmt-show`: rows = domains, columns = sockets.
    Show {
        /// What to show.
        what: Show,
        /// Domain id (default: all).
        domain: Option<u32>,
    },
    /// Every enabled event of every domain as OpenMetrics text (for a Prometheus scrape).
    Export {
        /// OpenMetrics / Prometheus text format (the only format so far).
        #[arg(long)]
        prometheus: bool,
    },
}

fn call(client: &mut Client, request: &Request, what: &str) -> Result<Response, CliError> {
    match client.call(request)? {
        Response::Error(e) => Err(remote_err(format!("{what}: {e}"))),
        other => Ok(other),
    }
}

/// `2 (socket 0: APIC 0; socket 1: APIC 1)`: the count and, when the hypervisor
/// said, each socket's CPUs.
fn sockets_line(h: &MonitorHwInfo) -> String {
    if h.socket_cpus.is_empty() {
        h.sockets.to_string()
    } else {
        format!("{} ({})", h.sockets, crate::control_cmd::format_sockets(&h.socket_cpus))
    }
}

fn hwinfo(client: &mut Client) -> Result<MonitorHwInfo, CliError> {
    match call(client, &Request::MonitorHwInfo, "hwinfo")? {
        Response::MonitorHwInfo(h) => Ok(h),
        _ => Err(connection_err("the hypervisor answered hwinfo with the wrong message")),
    }
}

fn stats(client: &mut Client, domain: Option<u32>) -> Result<Vec<MonitorDomainStats>, CliError> {
    match call(client, &Request::MonitorStats { domain }, "stats")? {
        Response::MonitorStats(s) => Ok(s),
        _ => Err(connection_err("the hypervisor answered stats with the wrong message")),
    }
}

fn value_json(v: &MonitorValue) -> serde_json::Value {
    match v {
        MonitorValue::Count(n) => json!(n),
        MonitorValue::ByReason(list) => {
            json!(list.iter().map(|(k, n)| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>())
        }
        MonitorValue::Occupancy { bytes, residual_bytes, per_socket } => {
            json!({ "bytes": bytes, "residual_bytes": residual_bytes, "per_socket": per_socket })
        }
        MonitorValue::Bandwidth { bytes, bytes_per_sec, per_socket } => {
            json!({ "bytes": bytes, "bytes_per_sec": bytes_per_sec, "per_socket_bytes_per_sec": per_socket })
        }
        MonitorValue::NotAvailable(reason) => json!({ "not_available": reason }),
    }
}

fn value_text(v: &MonitorValue) -> String {
    match v {
        MonitorValue::Count(n) => n.to_string(),
        MonitorValue::ByReason(list) => list.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" "),
        MonitorValue::Occupancy { bytes, residual_bytes, .. } => {
            format!("{} KB (+{} KB residual in limbo)", bytes / 1024, residual_bytes / 1024)
        }
        MonitorValue::Bandwidth { bytes, bytes_per_sec, .. } => match bytes_per_sec {
            Some(r) => format!("{} KB, {} KB/s", bytes / 1024, r / 1024),
            None => format!("{} KB, rate not yet known", bytes / 1024),
        },
        MonitorValue::NotAvailable(reason) => format!("not available: {reason}"),
    }
}

/// OpenMetrics text for `stats` (families, then `# EOF`).
pub fn openmetrics(stats: &[MonitorDomainStats]) -> String {
    let mut families: std::collections::BTreeMap<String, (String, String, Vec<String>)> = Default::default();
    let mut add = |family: &str, kind: &str, help: &str, sample: String| {
        families
            .entry(family.to_string())
            .or_insert_with(|| (kind.to_string(), help.to_string(), Vec::new()))
            .2
            .push(sample);
    };
    for d in stats {
        for (name, v) in &d.events {
            let dom = d.domain;
            match v {
                MonitorValue::Count(n) if name == "guest_runtime_ns" => add(
                    "hv_guest_runtime_seconds",
                    "counter",
                    "Time the domain's vCPUs ran",
                    format!("hv_guest_runtime_seconds_total{{domain=\"{dom}\"}} {}", *n as f64 / 1e9),
                ),
                MonitorValue::Count(n) => add(
                    &format!("hv_{name}"),
                    "counter",
                    &format!("Domain event {name}"),
                    format!("hv_{name}_total{{domain=\"{dom}\"}} {n}"),
                ),
                MonitorValue::ByReason(list) => {
                    for (reason, n) in list {
                        add(
                            &format!("hv_{name}"),
                            "counter",
                            &format!("Domain event {name}, by exit reason"),
                            format!("hv_{name}_total{{domain=\"{dom}\",reason=\"{reason}\"}} {n}"),
                        );
                    }
                }
                MonitorValue::Occupancy { per_socket, residual_bytes, .. } => {
                    for (socket, b) in per_socket.iter().enumerate() {
                        add(
                            "hv_llc_occupancy_bytes",
                            "gauge",
                            "L3 cache occupancy",
                            format!("hv_llc_occupancy_bytes{{domain=\"{dom}\",socket=\"{socket}\"}} {b}"),
                        );
                    }
                    add(
                        "hv_llc_residual_bytes",
                        "gauge",
                        "L3 occupancy still under RMIDs the domain left in limbo",
                        format!("hv_llc_residual_bytes{{domain=\"{dom}\"}} {residual_bytes}"),
                    );
                }
                MonitorValue::Bandwidth { bytes, per_socket, .. } => {
                    add(
                        &format!("hv_{name}_bytes"),
                        "counter",
                        &format!("Memory traffic ({name})"),
                        format!("hv_{name}_bytes_total{{domain=\"{dom}\"}} {bytes}"),
                    );
                    for (socket, r) in per_socket.iter().enumerate() {
                        add(
                            &format!("hv_{name}_bytes_per_second"),
                            "gauge",
                            &format!("Memory bandwidth ({name})"),
                            format!("hv_{name}_bytes_per_second{{domain=\"{dom}\",socket=\"{socket}\"}} {r}"),
                        );
                    }
                }
                MonitorValue::NotAvailable(_) => {}
            }
        }
    }
    let mut out = String::new();
    for (family, (kind, help, samples)) in families {
        out.push_str(&format!("# TYPE {family} {kind}\n# HELP {family} {help}\n"));
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

fn stats_json(s: &[MonitorDomainStats]) -> String {
    let out: Vec<_> = s
        .iter()
        .map(|d| {
            let events: serde_json::Map<String, serde_json::Value> =
                d.events.iter().map(|(n, v)| (n.clone(), value_json(v))).collect();
            json!({ "domain": d.domain, "events": events })
        })
        .collect();
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

/// `monitor stats [D] --watch`: one row per domain and event; the plain counts get rates.
/// A watched domain that is refused or no longer listed ends the watch.
fn watch_stats(client: &mut Client, domain: Option<u32>, args: &WatchArgs, json: bool) -> Result<ExitCode, CliError> {
    let what = domain.map_or_else(|| "monitoring of all domains".to_string(), |d| format!("domain {d} monitoring"));
    watch::run(args, &what, || {
        let s = match client.call(&Request::MonitorStats { domain })? {
            Response::MonitorStats(s) => s,
            Response::Error(e) if e.code == ErrorCode::Refused && domain.is_some() => {
                return Ok(Poll::Gone(format!("the hypervisor says {}", e.message)));
            }
            Response::Error(e) => return Err(remote_err(format!("stats: {e}"))),
            _ => return Err(connection_err("the hypervisor answered stats with the wrong message")),
        };
        if let Some(d) = domain
            && !s.iter().any(|x| x.domain == d)
        {
            return Ok(Poll::Gone(format!("domain {d} is no longer listed")));
        }
        if json {
            return Ok(Poll::Text(stats_json(&s)));
        }
        let rows = s
            .iter()
            .flat_map(|d| {
                d.events.iter().map(|(name, v)| Row {
                    cells: vec![d.domain.to_string(), name.clone()],
                    value: value_text(v),
                    // Exits by reason: the rate of all of them together.
                    counter: match v {
                        MonitorValue::Count(n) => Some(*n),
                        MonitorValue::ByReason(list) => Some(list.iter().map(|(_, n)| n).sum()),
                        _ => None,
                    },
                })
            })
            .collect();
        Ok(Poll::Table(vec!["domain", "event"], rows))
    })
}

/// Run a `monitor` subcommand.
pub fn run(opts: &Options, args: MonitorArgs) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(opts)?;
    match args.command {
        MonitorCommand::Hwinfo { json } => {
            let h = hwinfo(&mut client)?;
            if json {
                let out = json!({
                    "present": h.present, "reason": h.reason, "usable_rmids": h.usable_rmids, "max_rmid": h.max_rmid,
                    "sockets": h.sockets, "socket_cpus": h.socket_cpus, "l3_bytes": h.l3_bytes, "upscaling_factor": h.upscaling_factor,
                    "counter_width": h.counter_width, "hw_events": h.hw_events, "all_events": h.all_events,
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else if h.present {
                println!("Cache Monitoring Technology (CMT) / Memory Bandwidth Monitoring (MBM):");
                println!("  Enabled         : 1");
                println!("  Total RMID      : {} (usable {}; RMID 0 is reserved)", h.max_rmid, h.usable_rmids);
                println!("  Sockets         : {}", sockets_line(&h));
                println!("  L3 size/socket  : {} KB", h.l3_bytes / 1024);
                println!("  Upscaling factor: {}", h.upscaling_factor);
                println!("  Counter width   : {} bits", h.counter_width);
                println!("  Hardware events : {}", h.hw_events.join(", "));
                println!("  All events      : {}", h.all_events.join(", "));
            } else {
                println!(
                    "Cache/memory-bandwidth monitoring: not available: {}",
                    h.reason.as_deref().unwrap_or("unknown")
                );
                println!("  Sockets         : {}", sockets_line(&h));
                println!(
                    "  Software events : {}",
                    h.all_events
                        .iter()
                        .filter(|e| !e.starts_with("llc") && !e.starts_with("mbm"))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("  (CMT/MBM counters need bare metal with Intel RDT or AMD PQoS monitoring.)");
            }
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Attach { domain, vcpus } => {
            call(&mut client, &Request::MonitorAttach { domain, vcpus }, "attach")?;
            println!("domain {domain} attached");
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Detach { domain } => {
            call(&mut client, &Request::MonitorDetach { domain }, "detach")?;
            println!("domain {domain} detached");
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Events { domain, enable, disable } => {
            if enable.is_empty() && disable.is_empty() {
                return Err(crate::err("give --enable and/or --disable with event names (see hvctl monitor hwinfo)"));
            }
            call(&mut client, &Request::MonitorEvents { domain, enable, disable }, "events")?;
            println!("domain {domain}: events updated");
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Stats { domain, watch, json } if watch.watch.is_some() => {
            watch_stats(&mut client, domain, &watch, json)
        }
        MonitorCommand::Stats { domain, watch: _, json } => {
            let s = stats(&mut client, domain)?;
            if json {
                println!("{}", stats_json(&s));
            } else {
                if s.is_empty() {
                    println!("no domain has an enabled event (hvctl monitor events DOMAIN --enable ...)");
                }
                for d in &s {
                    println!("domain {}", d.domain);
                    for (n, v) in &d.events {
                        println!("  {n:<20} {}", value_text(v));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Show { what, domain } => {
            let h = hwinfo(&mut client)?;
            if !h.present {
                return Err(remote_err(format!("not available: {}", h.reason.unwrap_or_default())));
            }
            let event = match what {
                Show::CacheOccupancy => "llc_occupancy",
                Show::TotalMemBandwidth => "mbm_total",
                Show::LocalMemBandwidth => "mbm_local",
            };
            println!("Total RMID: {}", h.max_rmid);
            let sockets = h.sockets as usize;
            print!("{:<8}", "Domain");
            for s in 0..sockets {
                print!(" {:>18}", format!("Socket {s}"));
            }
            println!();
            print!("{:<8}", "L3 size");
            for _ in 0..sockets {
                print!(" {:>15} KB", h.l3_bytes / 1024);
            }
            println!();
            for d in stats(&mut client, domain)? {
                let Some((_, v)) = d.events.iter().find(|(n, _)| n == event) else { continue };
                print!("{:<8}", d.domain);
                let (unit, per_socket) = match v {
                    MonitorValue::Occupancy { per_socket, .. } => ("KB", per_socket.clone()),
                    MonitorValue::Bandwidth { per_socket, .. } => ("KB/s", per_socket.clone()),
                    MonitorValue::NotAvailable(r) => {
                        println!(" not available: {r}");
                        continue;
                    }
                    _ => ("", Vec::new()),
                };
                for s in 0..sockets {
                    print!(" {:>15} {unit}", per_socket.get(s).copied().unwrap_or(0) / 1024);
                }
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        MonitorCommand::Export { prometheus: _ } => {
            print!("{}", openmetrics(&stats(&mut client, None)?));
            Ok(ExitCode::SUCCESS)
        }
    }
}
