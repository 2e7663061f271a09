//! The scheduler of this physical CPU: which vCPU runs next (round robin over every
//! runnable vCPU of every running domain), for how long (time slices), what a
//! migration's throttle withholds, and what the scheduler does with each exit's
//! [`Action`] (halt, finish, crash).

use super::exit::{self, Action};
use super::{DomainState, Machine, RunState};
use crate::arch::{Backend, Vcpu};
use crate::println;

impl<B: Backend> Machine<B> {
    /// Whether any vCPU can run.
    pub fn has_runnable(&self) -> bool {
        self.domains
            .iter()
            .any(|d| d.state == DomainState::Running && d.vcpus.iter().any(|v| v.state == RunState::Runnable))
    }

    /// Run the next runnable vCPU (round robin over all domains) for one time slice.
    /// Returns false when nothing is runnable.
    pub fn run_slice(&mut self) -> bool {
        let total: usize = self.domains.iter().map(|d| d.vcpus.len()).sum();
        for _ in 0..total {
            let pick = self.cursor % total.max(1);
            self.cursor = self.cursor.wrapping_add(1);
            let Some((di, vi)) = self.locate(pick) else { continue };
            let d = &mut self.domains[di];
            if d.state != DomainState::Running || d.vcpus[vi].state != RunState::Runnable {
                continue;
            }
            // A throttled domain earns (100 - throttle)% of a slice per turn and runs
            // a slice per 100% earned: it gets that share of its turns.
            if d.throttle > 0 {
                d.throttle_credit += 100 - u32::from(d.throttle.min(99));
                if d.throttle_credit < 100 {
                    continue;
                }
                d.throttle_credit -= 100;
            }
            self.run_vcpu(di, vi);
            return true;
        }
        false
    }

    fn locate(&self, flat: usize) -> Option<(usize, usize)> {
        let mut n = flat;
        for (di, d) in self.domains.iter().enumerate() {
            if n < d.vcpus.len() {
                return Some((di, n));
            }
            n -= d.vcpus.len();
        }
        None
    }

    fn run_vcpu(&mut self, di: usize, vi: usize) {
        let slice = self.slice_ticks;
        let start = crate::drivers::time::now_ticks();
        let budget = slice.unwrap_or(u64::MAX);
        loop {
            let used = crate::drivers::time::now_ticks().wrapping_sub(start);
            if used >= budget {
                break;
            }
            let d = &mut self.domains[di];
            let slot = &mut d.vcpus[vi];
            crate::platform::rdt::switch_rmid(slot.rmid);
            let entered = crate::drivers::time::now_ticks();
            let result = slot.vcpu.run(&mut slot.regs, slice.map(|s| s - used));
            d.runtime_ticks += crate::drivers::time::now_ticks().wrapping_sub(entered);
            let next = match result {
                Ok(exit) => {
                    d.count(&exit.reason);
                    let mut ctx = exit::ExitCtx { d: &mut *d, vi, pool: &mut self.pool, mechanisms: &self.mechanisms };
                    exit::handle(&mut ctx, &exit)
                }
                Err(e) => Action::Crash(alloc::format!("vCPU {vi}: {e}")),
            };
            match next {
                Action::Continue => {}
                Action::Yield => break,
                Action::Halt => {
                    d.vcpus[vi].state = RunState::Halted;
                    if d.vcpus.iter().all(|v| v.state == RunState::Halted) {
                        d.state = DomainState::Halted;
                        println!("DOMAIN {} HALTED (every vCPU executed HLT with nothing to wake it)", d.id);
                    }
                    break;
                }
                Action::Finish(code) => {
                    d.state = DomainState::Finished { code };
                    println!("DOMAIN {} EXIT code={code} exits={}", d.id, d.total_exits());
                    break;
                }
                Action::Crash(reason) => {
                    println!("DOMAIN {} CRASHED {reason}", d.id);
                    d.state = DomainState::Crashed { reason };
                    if let Err(e) = d.release(&mut self.pool) {
                        println!("FAIL: returning domain {}'s memory: {e}", d.id);
                    }
                    break;
                }
            }
        }
    }
}
