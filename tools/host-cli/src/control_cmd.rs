//! `hvctl info` and `hvctl ping`: talk to a running hypervisor over its control port.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use wire::{Request, Response};

use crate::transport::{Client, Options};
use crate::{CliError, connection_err, remote_err};

/// `hvctl info`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `hvctl ping`
#[derive(Debug, Args)]
pub struct PingArgs {
    /// Number of pings.
    #[arg(short, long, default_value_t = 4)]
    count: u32,
    /// Payload bytes per ping.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Milliseconds between pings.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn expect<T>(response: Response, what: &str, pick: impl FnOnce(Response) -> Option<T>) -> Result<T, CliError> {
    if let Response::Error(e) = &response {
        return Err(remote_err(format!("the hypervisor refused {what}: {e}")));
    }
    pick(response).ok_or_else(|| connection_err(format!("the hypervisor answered {what} with the wrong message")))
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// Print the hypervisor's self-description.
pub fn info(opts: &Options, args: InfoArgs) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(opts)?;
    let info = expect(client.call(&Request::Info)?, "info", |r| match r {
        Response::Info(i) => Some(*i),
        _ => None,
    })?;
    let sockets = socket_cpus(&info.cpu_list);
    if args.json {
        let caps: serde_json::Map<String, serde_json::Value> =
            info.capabilities.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let services: Vec<_> = info
            .services
            .iter()
            .map(|s| {
                json!({
                    "service": s.service.name(), "state": s.state.name(), "handled": s.handled,
                    "errors": s.errors, "queue_depth": s.queue_depth, "queue_capacity": s.queue_capacity,
                })
            })
            .collect();
        let c = client.connection();
        let mut connected = json!({ "transport": c.transport, "target": c.target, "framing": c.framing });
        if let Some(s) = c.serial {
            connected["max_packet"] = json!(s.max_packet);
            connected["packets"] = json!(s.packets);
            connected["dropped_packets"] = json!(s.dropped);
            connected["bad_crc"] = json!(s.bad_crc);
        }
        let out = json!({
            "target": client.target.to_string(),
            "connected": connected,
            "control": info.control,
            "hv_version": info.hv_version,
            "protocol_version": info.protocol_version,
            "uptime_ns": info.uptime_ns,
            "cpus": info.cpus,
            "cpu_list": info
                .cpu_list
                .iter()
                .map(|c| json!({
                    "apic_id": c.apic_id, "state": c.state.as_str(), "package": c.package, "socket": c.socket,
                }))
                .collect::<Vec<_>>(),
            "sockets": sockets.len(),
            "socket_cpus": sockets,
            "memory_bytes": info.memory_bytes,
            "memory_use": {
                "heap_bytes": info.memory_use.heap_bytes,
                "heap_used_bytes": info.memory_use.heap_used_bytes,
                "heap_peak_bytes": info.memory_use.heap_peak_bytes,
                "heap_refused": info.memory_use.heap_refused,
                "frames_total": info.memory_use.frames_total,
                "frames_free": info.memory_use.frames_free,
            },
            "capabilities": caps,
            "services": services,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("hypervisor    hv {}", info.hv_version);
    println!("connected     {}", client.connection());
    match info.control.split_first() {
        None => println!("control       (none reported)"),
        Some((first, rest)) => {
            println!("control       {first}");
            for c in rest {
                println!("              {c}");
            }
        }
    }
    println!("protocol      {}", info.protocol_version);
    println!("uptime        {:.1} s", info.uptime_ns as f64 / 1e9);
    println!("cpus          {}", info.cpus);
    if !sockets.is_empty() {
        println!("sockets       {}: {}", sockets.len(), format_sockets(&sockets));
    }
    if !info.cpu_list.is_empty() {
        println!("  APIC   STATE    SOCKET  PACKAGE");
        let or_dash = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        for c in &info.cpu_list {
            println!("  {:<6} {:<8} {:<7} {}", c.apic_id, c.state.as_str(), or_dash(c.socket), or_dash(c.package));
        }
    }
    println!("memory        {}", human_bytes(info.memory_bytes));
    let m = &info.memory_use;
    println!(
        "heap          {} of {} in use, peak {}{}",
        human_bytes(m.heap_used_bytes),
        human_bytes(m.heap_bytes),
        human_bytes(m.heap_peak_bytes),
        if m.heap_refused > 0 { format!(", {} allocations refused", m.heap_refused) } else { String::new() }
    );
    println!("frame pool    {} of {} free", human_bytes(m.frames_free * 4096), human_bytes(m.frames_total * 4096));
    println!("capabilities");
    let width = info.capabilities.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &info.capabilities {
        println!("  {k:<width$}  {v}");
    }
    println!("services");
    println!("  {:<10} {:<9} {:>8} {:>7} {:>7}", "SERVICE", "STATE", "HANDLED", "ERRORS", "QUEUE");
    for s in &info.services {
        println!(
            "  {:<10} {:<9} {:>8} {:>7} {:>7}",
            s.service.name(),
            s.state.name(),
            s.handled,
            s.errors,
            format!("{}/{}", s.queue_depth, s.queue_capacity)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Measure round trips.
pub fn ping(opts: &Options, args: PingArgs) -> Result<ExitCode, CliError> {
    if args.count == 0 {
        return Err(crate::err("--count must be at least 1"));
    }
    if args.size > wire::MAX_FRAME_LEN - 16 {
        return Err(crate::err(format!("--size must be at most {} bytes", wire::MAX_FRAME_LEN - 16)));
    }
    let mut client = Client::connect(opts)?;
    let mut rtts = Vec::new();
    for i in 0..args.count {
        let payload: Vec<u8> = (0..args.size).map(|j| (i as usize + j) as u8).collect();
        let start = Instant::now();
        let response = client.call(&Request::Ping { payload: payload.clone() })?;
        let rtt = start.elapsed();
        let echoed = expect(response, "ping", |r| match r {
            Response::Pong { payload } => Some(payload),
            _ => None,
        })?;
        if echoed != payload {
            return Err(connection_err("the hypervisor echoed different bytes"));
        }
        if !args.json {
            println!(
                "pong from {}: seq={} bytes={} time={:.3} ms",
                client.target,
                i + 1,
                args.size,
                rtt.as_secs_f64() * 1e3
            );
        }
        rtts.push(rtt);
        if args.interval_ms > 0 && i + 1 < args.count {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    let mut sorted = rtts.clone();
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if args.json {
        let out = json!({
            "target": client.target.to_string(),
            "count": rtts.len(),
            "size": args.size,
            "rtt_us": rtts.iter().map(|d| us(*d)).collect::<Vec<_>>(),
            "min_us": us(sorted[0]),
            "median_us": us(pct(0.5)),
            "p99_us": us(pct(0.99)),
            "max_us": us(sorted[sorted.len() - 1]),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!(
            "{} pings: min {:.3} ms, median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            rtts.len(),
            us(sorted[0]) / 1e3,
            us(pct(0.5)) / 1e3,
            us(pct(0.99)) / 1e3,
            us(sorted[sorted.len() - 1]) / 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The APIC IDs of each socket's CPUs, by socket number, from a CPU list (CPUs whose
/// socket is unknown, those that never started, are in none).
pub fn socket_cpus(cpus: &[wire::CpuInfo]) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for c in cpus {
        if let Some(s) = c.socket {
            let s = s as usize;
            if out.len() <= s {
                out.resize(s + 1, Vec::new());
            }
            out[s].push(c.apic_id);
        }
    }
    out
}

/// `socket 0: APIC 0-1; socket 1: APIC 2-3` (`hvctl info`, `hvctl monitor hwinfo`).
pub fn format_sockets(sockets: &[Vec<u32>]) -> String {
    sockets
        .iter()
        .enumerate()
        .map(|(i, cpus)| {
            let list = if cpus.is_empty() { "none".to_string() } else { wire::cpulist::format(Some(cpus)) };
            format!("socket {i}: APIC {list}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    fn cpu(apic_id: u32, socket: Option<u32>) -> wire::CpuInfo {
        wire::CpuInfo { apic_id, state: wire::CpuState::Started, package: socket.map(|s| s * 2), socket }
    }

    #[test]
    fn cpus_are_grouped_by_socket_number() {
        let list = [cpu(0, Some(0)), cpu(2, Some(1)), cpu(1, Some(0)), cpu(3, None), cpu(4, Some(1))];
        let sockets = socket_cpus(&list);
        assert_eq!(sockets, vec![vec![0, 1], vec![2, 4]]);
        assert_eq!(format_sockets(&sockets), "socket 0: APIC 0-1; socket 1: APIC 2,4");
        assert!(socket_cpus(&[cpu(0, None)]).is_empty());
    }
}
