//! The wire adapters: the control requests of `tasks::DomainOps` (create, list, pause,
//! destroy, console output and input, log-dirty, counters, the pool uploads are staged
//! in) carried out on the [`Machine`], with its errors turned into typed `wire` error
//! replies.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::config::{self, DomainConfig};
use super::{Domain, DomainError, DomainState, Machine, dirty};
use crate::arch::Backend;
use crate::devices::DeviceCtx;
use crate::mm::MmError;

impl<B: Backend> Domain<B> {
    /// Console input from the control channel into the domain's UART receiver: as many
    /// bytes as its FIFO has room for (never an overrun), with its interrupt line
    /// driven through the domain's router and the messages that makes delivered to the
    /// vCPUs' LAPICs, as a port access from the guest would. A domain that halted
    /// waiting for this wakes up. Returns how many bytes were taken; the caller sends
    /// the rest again later.
    pub(crate) fn console_input(&mut self, bytes: &[u8]) -> Result<usize, DomainError> {
        match self.state {
            DomainState::Running | DomainState::Paused | DomainState::Halted => {}
            DomainState::Finished { .. } | DomainState::Crashed { .. } => {
                return Err(DomainError::WrongState { id: self.id, state: alloc::format!("{}", self.state) });
            }
        }
        let now = self.guest_now_ns();
        let mut dctx = DeviceCtx::new(now, &mut self.irq);
        let taken = self
            .devices
            .console_input(bytes, &mut dctx)
            .ok_or(DomainError::Unavailable("console input: the domain has no UART"))?;
        let effects = dctx.effects;
        self.route_messages();
        // Taking input makes no effects today; should a model ever make one (a byte
        // echoed in loopback), it is carried out like any other.
        let _ = self.apply_effects(&effects, super::exit::Action::Continue);
        if taken > 0 && self.state == DomainState::Halted {
            self.state = DomainState::Running;
        }
        Ok(taken)
    }
}

impl<B: Backend> Machine<B> {
    fn dirty_report(&mut self, id: u32, slot: usize) -> Result<wire::DirtyStatsReport, wire::ErrorReply> {
        let s = self.log_stats(id, slot).map_err(domain_reply)?;
        Ok(wire::DirtyStatsReport {
            domain: id,
            mode: String::from(s.mode.name()),
            pages_dirtied: s.pages_dirtied,
            dirty_now: s.dirty_now,
            rounds: s.rounds,
            logging_exits: s.logging_exits,
            range_start: s.range.0,
            range_pages: s.range.1,
        })
    }
}

fn reply(code: wire::ErrorCode, e: impl fmt::Display) -> wire::ErrorReply {
    wire::ErrorReply::new(code, alloc::format!("{e}"))
}

fn domain_reply(e: DomainError) -> wire::ErrorReply {
    let code = match &e {
        DomainError::Memory(
            MmError::OutOfFrames { .. } | MmError::NotEnoughFrames { .. } | MmError::OutOfHeap { .. },
        ) => wire::ErrorCode::OutOfMemory,
        DomainError::Memory(_) | DomainError::Arch(_) => wire::ErrorCode::Internal,
        _ => wire::ErrorCode::Refused,
    };
    reply(code, e)
}

impl<B: Backend> crate::services::tasks::DomainOps for Machine<B> {
    fn create(
        &mut self,
        spec: &wire::DomainSpec,
        kernel: &[u8],
        initrd: Option<&[u8]>,
    ) -> Result<u32, wire::ErrorReply> {
        let cfg = DomainConfig {
            name: spec.name.clone(),
            kernel: String::from("(uploaded)"),
            // The control path has no initrd upload yet (chunked uploads are separate
            // work): a Linux or multiboot kernel boots without one, and an initrd is
            // never silently dropped because none can be given here.
            initrd: None,
            memory: spec.memory_bytes,
            vcpus: spec.vcpus,
            cpuid: spec.cpuid.clone(),
            cmdline: spec.cmdline.clone(),
            cpus: spec.cpus.clone(),
        };
        config::validate(&cfg).map_err(|e| reply(wire::ErrorCode::Refused, e))?;
        if self.name_taken(&cfg.name, None) {
            return Err(reply(wire::ErrorCode::Refused, alloc::format!("a domain named `{}` exists", cfg.name)));
        }
        Machine::create(self, &cfg, kernel, initrd.unwrap_or_default()).map_err(domain_reply)
    }

    fn list(&self) -> wire::DomainListReport {
        let hz = crate::drivers::time::tsc_hz().unwrap_or(1);
        let domains = self
            .domains()
            .iter()
            .map(|cell| {
                let cpus = cell.pinned();
                let d = cell.lock();
                wire::DomainInfo {
                    cpus,
                    id: d.id,
                    name: d.name.clone(),
                    state: alloc::format!("{}", d.state),
                    vcpus: d.vcpu_count,
                    memory_bytes: if d.mem.is_some() { d.memory_bytes } else { 0 },
                    exits: d.exits_by_kind().iter().map(|(k, v)| (alloc::format!("{k}"), *v)).collect(),
                    runtime_ns: crate::drivers::time::ticks_to_ns(d.runtime_ticks, hz),
                    unclaimed: d
                        .unclaimed()
                        .iter()
                        .map(|u| wire::UnclaimedAccess {
                            mmio: u.space == crate::devices::bus::Space::Mmio,
                            addr: u.addr,
                            reads: u.reads,
                            writes: u.writes,
                        })
                        .collect(),
                }
            })
            .collect();
        // One guard: two in one expression would be held together (a deadlock).
        let pool = self.pool();
        wire::DomainListReport {
            domains,
            free_frames: pool.free_frames() as u64,
            total_frames: pool.total_frames() as u64,
        }
    }

    fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), wire::ErrorReply> {
        Machine::set_paused(self, id, paused).map_err(domain_reply)
    }

    fn pin(&mut self, id: u32, cpus: Option<Vec<u32>>) -> Result<(), wire::ErrorReply> {
        Machine::pin(self, id, cpus).map_err(domain_reply)
    }

    fn destroy(&mut self, id: u32) -> Result<(), wire::ErrorReply> {
        Machine::destroy(self, id).map_err(domain_reply)
    }

    fn counters(&self) -> Vec<crate::services::tasks::DomainCounters> {
        let hz = crate::drivers::time::tsc_hz().unwrap_or(1);
        self.domains()
            .iter()
            .map(|cell| {
                let d = cell.lock();
                crate::services::tasks::DomainCounters {
                    id: d.id,
                    vcpus: d.vcpu_count,
                    exits: d.exits_by_kind(),
                    runtime_ns: crate::drivers::time::ticks_to_ns(d.runtime_ticks, hz),
                }
            })
            .collect()
    }

    fn dirty_start(
        &mut self,
        id: u32,
        slot: usize,
        mode: &str,
        range: Option<(u64, u64)>,
    ) -> Result<wire::DirtyStatsReport, wire::ErrorReply> {
        let mode = dirty::Mode::parse(mode).map_err(domain_reply)?;
        let range = range.map(|(start, pages)| start..start.saturating_add(pages));
        self.log_start(id, slot, mode, range).map_err(domain_reply)?;
        self.dirty_report(id, slot)
    }

    fn dirty_stop(&mut self, id: u32, slot: usize) -> Result<wire::DirtyStatsReport, wire::ErrorReply> {
        let report = self.dirty_report(id, slot)?;
        self.log_stop(id, slot).map_err(domain_reply)?;
        Ok(report)
    }

    fn dirty_stats(&mut self, id: u32, slot: usize) -> Result<wire::DirtyStatsReport, wire::ErrorReply> {
        self.dirty_report(id, slot)
    }

    fn dirty_peek(&mut self, id: u32, slot: usize, clean: bool) -> Result<wire::DirtyBitmapReport, wire::ErrorReply> {
        let bitmap = if clean { self.log_peek_clean(id, slot, None) } else { self.log_peek(id, slot, None) }
            .map_err(domain_reply)?;
        Ok(wire::DirtyBitmapReport {
            domain: id,
            pages: bitmap.pages(),
            dirty: bitmap.count_ones(),
            records: bitmap.to_records(),
        })
    }

    fn migration(&mut self) -> Option<&mut dyn migration_svc::MigrationCore> {
        Some(self)
    }

    fn frames(&self) -> (u64, u64) {
        let pool = self.pool();
        (pool.total_frames() as u64, pool.free_frames() as u64)
    }
    fn set_rmids(&mut self, id: u32, rmids: Vec<u32>) {
        // A domain that went away in the meantime has no vCPUs to bind.
        let _ = self.with_domain(id, |d| {
            for (slot, rmid) in d.vcpus.iter_mut().zip(rmids) {
                slot.rmid = rmid;
            }
        });
    }

    fn console_input(&mut self, id: u32, bytes: &[u8]) -> Result<u32, wire::ErrorReply> {
        self.with_domain(id, |d| d.console_input(bytes).map(|n| n as u32)).and_then(|r| r).map_err(domain_reply)
    }

    fn staging(&mut self) -> Option<spin::MutexGuard<'_, crate::mm::frames::FramePool>> {
        Some(self.pool())
    }

    fn console(&self, id: u32, offset: u64) -> Result<wire::ConsoleChunk, wire::ErrorReply> {
        self.with_domain(id, |d| {
            let (from, data) = d.console.since(offset);
            wire::ConsoleChunk { id, offset: from, data, total: d.console.bytes }
        })
        .map_err(domain_reply)
    }
}
