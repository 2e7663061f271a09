//! The operator's side of the agent's own requests: a host-to-host migration that the
//! source's agent runs (hvctl only shows its progress and outcome, with the same code
//! as a local relay), and `hvctl agent stats` / `hvctl agent list`.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use wire::MigrateOptions;

use super::proto::{AgentRequest, AgentResponse, MigrateOrder};
use crate::migrate_cmd::{self, Done, Track, Watch};
use crate::transport::{self, Client, Options, Target};
use crate::{CliError, connection_err, err, remote_err};

/// How long hvctl waits for the next word from an agent running a migration: the
/// agent sends progress several times a second while it relays, and gives up itself
/// after the relay's idle timeout.
const MIGRATE_SILENCE: Duration = Duration::from_secs(migrate_cmd::IDLE_TIMEOUT.as_secs() + 15);

/// `hvctl migrate D --from tls://A/h --to tls://B/h`: A's agent streams to B's agent.
pub fn migrate(
    from: &Options,
    to: &Target,
    domain: u32,
    options: MigrateOptions,
    corrupt_byte: Option<u64>,
    track: &mut Track,
    line: &mut dyn Watch,
) -> Result<Done, CliError> {
    let mut client = Client::connect(from)?;
    let source = match &client.target {
        Target::Tls { name: Some(n), .. } => n.clone(),
        _ => client.agent_identity().and_then(|(_, _, h)| h.map(String::from)).ok_or_else(|| {
            err(format!("{} serves several hypervisors: name the source, tls://HOST:PORT/NAME", client.target))
        })?,
    };
    let order = MigrateOrder { source, domain, destination: to.to_string(), options, corrupt_byte };
    let id = client.agent_send(AgentRequest::Migrate(order))?;
    loop {
        if let Some(by) = line.cancelled() {
            line.finish();
            track.cancelled_by = Some(by);
            // Closing the connection is the cancel: the agent notices at its next
            // progress message and fails the migration on both hosts.
            drop(client);
            return Err(remote_err(format!(
                "migration cancelled by {by}: hvctl closed its connection to the source's agent, which cancels \
                 the migration on both hosts (the domain runs on at the source unless everything was sent)"
            )));
        }
        let (got, response) = client.agent_recv(MIGRATE_SILENCE)?;
        if got != id {
            continue;
        }
        match response {
            AgentResponse::MigrateProgress { progress, serial_rate, state_changed } => {
                line.progress(&progress, serial_rate, state_changed);
                track.progress = Some(*progress);
            }
            AgentResponse::Migrated { report, progress, status } => {
                return Ok(Done { report, progress: *progress, status });
            }
            AgentResponse::MigrateFailed { message, exit_code, progress, status } => {
                track.progress = progress.map(|p| *p).or(track.progress.take());
                track.status = status;
                return Err(CliError(message, exit_code));
            }
            AgentResponse::Error(e) => return Err(remote_err(format!("the source's agent: {e}"))),
            _ => return Err(connection_err("the source's agent answered the migration with the wrong message")),
        }
    }
}

/// `hvctl agent stats`.
pub fn stats(opts: &Options, as_json: bool) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(&agent_level(opts)?)?;
    let stats = match client.agent_call(AgentRequest::Stats)? {
        AgentResponse::Stats(s) => s,
        AgentResponse::Error(e) => return Err(remote_err(e)),
        _ => return Err(connection_err("the agent answered stats with the wrong message")),
    };
    if as_json {
        let peers: Vec<_> = stats
            .peers
            .iter()
            .map(|p| {
                json!({
                    "peer": p.peer, "direction": p.direction, "connections": p.connections,
                    "requests": p.requests, "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
                })
            })
            .collect();
        let v = json!({
            "agent": client.target.to_string(),
            "connections_open": stats.connections_open,
            "connections_refused": stats.connections_refused,
            "peers": peers,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("agent         {}", client.target);
    println!("connections   {} open, {} refused", stats.connections_open, stats.connections_refused);
    println!("{:<24} {:<9} {:>6} {:>9} {:>14} {:>14}", "PEER", "DIRECTION", "CONNS", "REQUESTS", "SENT", "RECEIVED");
    for p in &stats.peers {
        println!(
            "{:<24} {:<9} {:>6} {:>9} {:>14} {:>14}",
            p.peer, p.direction, p.connections, p.requests, p.bytes_sent, p.bytes_received
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `hvctl agent list`.
pub fn list(opts: &Options, as_json: bool) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(&agent_level(opts)?)?;
    let list = match client.agent_call(AgentRequest::List)? {
        AgentResponse::Hypervisors(l) => l,
        AgentResponse::Error(e) => return Err(remote_err(e)),
        _ => return Err(connection_err("the agent answered list with the wrong message")),
    };
    let (identity, role) = client.agent_identity().map(|(i, r, _)| (i.to_string(), r.name())).unwrap_or_default();
    if as_json {
        let hv: Vec<_> =
            list.iter().map(|h| json!({"name": h.name, "target": h.target, "connected": h.connected})).collect();
        let v = json!({"agent": client.target.to_string(), "identity": identity, "role": role, "hypervisors": hv});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("agent {} (you are {identity:?}, {role})", client.target);
    println!("{:<16} {:<10} TARGET", "NAME", "CONNECTED");
    for h in &list {
        println!("{:<16} {:<10} {}", h.name, if h.connected { "yes" } else { "no" }, h.target);
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent itself, whatever hypervisor the target names (agent-level requests do
/// not need one, and an agent with several refuses a hello without a known name).
fn agent_level(opts: &Options) -> Result<Options, CliError> {
    match transport::resolve(opts)? {
        Target::Tls { host, port, .. } => {
            let t = Target::Tls { host, port, name: None };
            Ok(Options { connect: Some(t.to_string()), timeout: opts.timeout })
        }
        other => Err(err(format!("{other} is not an agent: pass --connect tls://HOST:PORT"))),
    }
}
