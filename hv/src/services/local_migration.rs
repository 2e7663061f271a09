//! Migration of a domain within this hypervisor ("localhost migration", as with Xen's
//! `xl migrate DOMAIN localhost`): the very sessions of a migration between two
//! hypervisors (dirty logging, the record stream, vCPU state saved and loaded into a
//! new vCPU), relayed in memory instead of by `hvctl`. It is what proves the path where
//! no vsock exists (Bochs, whose VMX backend has no other way to be migrated), and what
//! an operator can use to check a host.
//!
//! Boot option `migrate-local=NAME@ROUND`: once domain NAME has reported round ROUND
//! (`guest_abi` report `round`), migrate it with memory verification. A guest that
//! makes no reports (Linux) is named by its console instead:
//! `migrate-local=NAME@console:MARKER` migrates NAME once its console has shown
//! MARKER (no spaces: the boot command line is split at them). Serial markers:
//! `MIGRATE-LOCAL START`, then `MIGRATE-LOCAL DONE …` or `MIGRATE-LOCAL FAILED …`.

use alloc::boxed::Box;
use alloc::string::String;

use migration_svc::{ReceiveSession, SendSession};
use wire::{MigrateOptions, SendState};

use crate::arch::Backend;
use crate::domain::Machine;
use crate::println;

/// Reads of at most `wire::MAX_MIGRATE_DATA` relayed per step.
const RELAY_READS_PER_STEP: usize = 34;

/// A local migration that waits for its moment, runs, or is over.
#[derive(Debug)]
pub struct LocalMigration {
    name: String,
    at: Trigger,
    state: State,
}

/// When the migration starts.
#[derive(Debug)]
enum Trigger {
    /// Once the domain has reported this round.
    Round(u64),
    /// Once the domain's console has shown `marker`; `scanned` console bytes (of
    /// [`crate::domain::Console::bytes`]) were looked at already.
    Console { marker: String, scanned: u64 },
}

#[derive(Debug)]
enum State {
    Waiting,
    Running { from: u32, send: Box<SendSession>, recv: Box<ReceiveSession>, policy_told: bool },
    Done,
}

impl LocalMigration {
    /// The `migrate-local=NAME@ROUND` option of the command line, if given.
    pub fn from_cmdline(cmdline: &str) -> Option<Result<Self, String>> {
        let value = cmdline.split_whitespace().find_map(|w| w.strip_prefix("migrate-local="))?;
        let (name, when) = match value.split_once('@') {
            Some((name, when)) if !name.is_empty() => (name, when),
            _ => return Some(Err(alloc::format!("migrate-local={value}: expected NAME@ROUND or NAME@console:MARKER"))),
        };
        let at = match when.strip_prefix("console:") {
            Some("") => return Some(Err(alloc::format!("migrate-local={value}: the console marker is empty"))),
            Some(marker) => Trigger::Console { marker: marker.into(), scanned: 0 },
            None => match when.parse() {
                Ok(round) => Trigger::Round(round),
                Err(_) => return Some(Err(alloc::format!("migrate-local={value}: `{when}` is not a round number"))),
            },
        };
        Some(Ok(Self { name: name.into(), at, state: State::Waiting }))
    }

    /// Whether it still has work (waiting for its domain, or migrating it).
    pub fn active(&self) -> bool {
        !matches!(self.state, State::Done)
    }

    /// Whether it is migrating now (the machine must keep going while both domains
    /// are paused).
    pub fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// One step: start when the domain is ready; else relay up to 2 MiB and carry the
    /// destination's verdicts. Returns whether anything happened.
    pub fn step<B: Backend>(&mut self, machine: &mut Machine<B>) -> bool {
        match &mut self.state {
            State::Done => false,
            State::Waiting => {
                let cells = machine.domains();
                let Some(cell) = cells.iter().find(|c| c.name == self.name) else { return false };
                // Looked at when no CPU runs it (a poll must not kick its vCPUs out of
                // every slice); the guard goes before the machine is used below.
                let Some(d) = cell.try_peek() else { return false };
                let from = d.id;
                let ready = match &mut self.at {
                    Trigger::Round(round) => d.report(b"round").is_some_and(|r| r >= *round),
                    Trigger::Console { marker, scanned } => {
                        let total = d.console.bytes;
                        if total == *scanned {
                            false
                        } else {
                            // From a marker's length before the new bytes: it may straddle them.
                            let (_, bytes) = d.console.since(scanned.saturating_sub(marker.len() as u64));
                            *scanned = total;
                            bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
                        }
                    }
                };
                drop(d);
                if !ready {
                    return false;
                }
                match &self.at {
                    Trigger::Round(round) => {
                        println!("MIGRATE-LOCAL START domain={from} name={} round={round}", self.name)
                    }
                    Trigger::Console { marker, .. } => {
                        println!("MIGRATE-LOCAL START domain={from} name={} console={marker}", self.name)
                    }
                }
                machine.allow_incoming_name_of(Some(from));
                let options = MigrateOptions { verify_memory: true, ..MigrateOptions::default() };
                let send = SendSession::start(1, from, options, machine);
                let recv = ReceiveSession::new(2, machine);
                self.state = State::Running { from, send: Box::new(send), recv: Box::new(recv), policy_told: false };
                true
            }
            State::Running { from, send, recv, policy_told } => {
                // Up to 2 MiB per step: the guest gets a time slice between steps, and
                // a trickle would make the link look slower than the guest.
                for _ in 0..RELAY_READS_PER_STEP {
                    let data = send.read(machine, wire::MAX_MIGRATE_DATA);
                    if data.is_empty() {
                        break;
                    }
                    recv.write(machine, &data);
                }
                let status = recv.status();
                if let Some(v) = migration_svc::session::verdict_for(&status, policy_told)
                    && !send.is_over()
                    && let Err(e) = send.verdict(machine, v)
                {
                    println!("MIGRATE-LOCAL FAILED domain={from}: the source took no verdict: {e}");
                }
                let progress = send.progress();
                match progress.state {
                    Some(SendState::Completed) => {
                        let r = progress.report.unwrap_or_default();
                        println!(
                            "MIGRATE-LOCAL DONE from={from} to={} rounds={} pages={} resent={} bytes={} downtime_ms={} \
                             digest={:#x} destination_digest={:#x}",
                            status.domain.unwrap_or(0),
                            r.rounds,
                            r.pages_sent,
                            r.pages_resent,
                            r.bytes_sent,
                            r.downtime_ms,
                            r.memory_digest.unwrap_or(0),
                            status.memory_digest.unwrap_or(0)
                        );
                    }
                    Some(SendState::Failed) => {
                        let why = progress.failure.unwrap_or_default();
                        recv.abort(machine, why.clone());
                        println!("MIGRATE-LOCAL FAILED domain={from}: {why}");
                    }
                    _ => return true,
                }
                machine.allow_incoming_name_of(None);
                self.state = State::Done;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_triggers() {
        let round = LocalMigration::from_cmdline("x migrate-local=mw@50 y").and_then(Result::ok);
        assert!(matches!(round, Some(LocalMigration { at: Trigger::Round(50), .. })));
        let console = LocalMigration::from_cmdline("migrate-local=linux@console:HV-SHELL-READY").and_then(Result::ok);
        match console {
            Some(LocalMigration { name, at: Trigger::Console { marker, scanned: 0 }, .. }) => {
                assert_eq!((name.as_str(), marker.as_str()), ("linux", "HV-SHELL-READY"));
            }
            other => panic!("not a console trigger: {other:?}"),
        }
        assert!(LocalMigration::from_cmdline("quiet").is_none());
        for bad in ["migrate-local=mw", "migrate-local=@5", "migrate-local=mw@x", "migrate-local=mw@console:"] {
            assert!(matches!(LocalMigration::from_cmdline(bad), Some(Err(_))), "{bad}");
        }
    }
}
