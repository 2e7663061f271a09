//! The scheduler of this physical CPU: which vCPU runs next (round robin over every
//! runnable vCPU of every running domain), for how long (time slices), what a
//! migration's throttle withholds, and what the scheduler does with each exit's
//! [`Action`] (halt, finish, crash).
//!
//! Interrupts and time: before each entry the vCPU's local APIC catches up with guest
//! time (its timer fires into the IRR), and the highest pending interrupt is injected
//! if the guest can take it (RFLAGS.IF, no interrupt shadow) or an interrupt-window
//! exit is asked for. A slice never runs past the LAPIC timer's deadline. A halted
//! vCPU sleeps until an interrupt is pending or its timer is due; a domain whose vCPUs
//! all halted with no timer armed has nothing left to wake it and is halted.
//!
//! Application processors: a vCPU waiting for a start-up IPI
//! (`RunState::WaitForSipi`: an AP of a Linux or multiboot domain until the OS starts
//! it, or after an INIT) is never scheduled or woken here. When a SIPI has reached it
//! (`RunState::StartUp`, see `platform::route_ipi`), its next turn first loads the
//! real-mode start state ([`start_on_sipi`]) and then runs it like any other.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::exit::{self, Action};
use super::platform::{Pending, Router, pending};
use super::{Domain, DomainCell, DomainGuard, DomainRef, DomainState, RunState, VcpuSlot, boot, dirty, kick};
use crate::arch::{ArchError, Backend, Vcpu};
use crate::drivers::console::HeldOutput;
use crate::mm::frames::FramePool;
use crate::println;

/// Fire the LAPIC timer if it is due at `now`, and deliver what is pending: inject the
/// highest interrupt the guest can take now (the LAPIC's, else the 8259's through
/// LINT0, acknowledged with an INTA cycle), or ask for an exit as soon as it can.
pub(super) fn deliver<V: Vcpu>(slot: &mut VcpuSlot<V>, irq: &mut Router, now: u64) -> Result<(), ArchError> {
    slot.lapic.advance_to(now);
    let want_window = match pending(slot, irq) {
        Some(p) if slot.vcpu.can_inject_interrupt()? => {
            match p {
                Pending::Lapic(vector) => {
                    slot.vcpu.inject_interrupt(vector)?;
                    slot.lapic.ack(vector);
                }
                Pending::Pic => slot.vcpu.inject_interrupt(irq.pic_acknowledge())?,
            }
            false
        }
        Some(_) => true,
        None => false,
    };
    if want_window != slot.window {
        slot.vcpu.request_interrupt_window(want_window)?;
        slot.window = want_window;
    }
    Ok(())
}

/// Start the vCPU in `slot` if a start-up IPI reached it while it waited
/// (`RunState::StartUp`): load [`boot::sipi_snapshot`] with EDX = `signature` and make
/// it runnable. Its TSC offset (the domain's, set at creation) is not part of the
/// snapshot and stays. Anything else is left as it is.
pub(super) fn start_on_sipi<V: Vcpu>(slot: &mut VcpuSlot<V>, signature: u32) -> Result<(), ArchError> {
    let RunState::StartUp(vector) = slot.state else { return Ok(()) };
    slot.vcpu.load_state(&mut slot.regs, &boot::sipi_snapshot(vector, signature))?;
    slot.state = RunState::Runnable;
    Ok(())
}

/// Whether something would wake a halted vCPU at `now`: a pending interrupt (its timer
/// due, or a device's line).
fn wakes<V>(slot: &mut VcpuSlot<V>, irq: &Router, now: u64) -> bool {
    slot.lapic.advance_to(now);
    pending(slot, irq).is_some()
}

/// TSC ticks in `ns` nanoseconds (at least 1), for capping a slice at a deadline.
fn ns_to_ticks(ns: u64) -> u64 {
    let hz = crate::drivers::time::tsc_hz().unwrap_or(1_000_000_000);
    u64::try_from(u128::from(ns) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX).max(1)
}

/// What every physical CPU's scheduler shares: the domains, the frame pool, the round
/// robin's position and the time slice. Each CPU calls [`Shared::run_slice`] in its
/// own loop (the bootstrap CPU between control requests, the others in
/// `init::ap_schedule`); a CPU takes a domain's lock for one slice of one of its
/// vCPUs and skips domains another CPU holds, so every CPU runs a different domain.
pub struct Shared<B: Backend> {
    /// Frames for everything. Held only for short steps (an exit's handling, a
    /// control request's change), never while a guest runs.
    pool: spin::Mutex<FramePool>,
    /// Every domain, in creation order.
    pub(super) domains: spin::Mutex<Vec<DomainRef<B>>>,
    /// The round robin's next position (a flat vCPU index over all domains).
    cursor: AtomicUsize,
    slice_ticks: Option<u64>,
    /// A shorter slice asked for now (`cap_slice`; 0: none).
    slice_cap: AtomicU64,
    pub(super) mechanisms: dirty::Mechanisms,
    /// Whether a domain's vCPUs may run at the same time on different CPUs
    /// ([`Shared::set_parallel_vcpus`]); otherwise they take turns.
    parallel_vcpus: core::sync::atomic::AtomicBool,
}

impl<B: Backend> core::fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl<B: Backend> Shared<B> {
    pub(super) fn new(pool: FramePool, slice_ticks: Option<u64>, mechanisms: dirty::Mechanisms) -> Self {
        Self {
            pool: spin::Mutex::new(pool),
            domains: spin::Mutex::new(Vec::new()),
            cursor: AtomicUsize::new(0),
            slice_ticks,
            slice_cap: AtomicU64::new(0),
            mechanisms,
            parallel_vcpus: core::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The frame pool, locked. In host tests a second lock on the same thread (which
    /// would spin for ever on the hypervisor) fails the test at once instead.
    pub(super) fn lock_pool(&self) -> spin::MutexGuard<'_, FramePool> {
        #[cfg(test)]
        return self.pool.try_lock().expect("the frame pool is locked already: a deadlock on one CPU");
        #[cfg(not(test))]
        self.pool.lock()
    }

    /// Let a domain's vCPUs be spread over CPUs and run at the same time (`true`), or
    /// keep them on one CPU, taking turns (`false`, the default). Off by default
    /// because under QEMU TCG a guest whose two vCPUs sat on two CPUs now and then
    /// resumed with corrupted state (the hypervisor's CR3 and RIP in its VMCB, or a bad
    /// RSP), even when they took turns; the cause is not found. Different domains run
    /// on different CPUs either way.
    pub fn set_parallel_vcpus(&self, on: bool) {
        self.parallel_vcpus.store(on, Ordering::Relaxed);
    }

    /// See [`Shared::set_parallel_vcpus`].
    pub(super) fn parallel_vcpus(&self) -> bool {
        self.parallel_vcpus.load(Ordering::Relaxed)
    }

    /// See [`Machine::cap_slice`].
    pub(super) fn cap_slice(&self, ticks: Option<u64>) {
        self.slice_cap.store(ticks.map_or(0, |t| t.max(1)), Ordering::Relaxed);
    }

    /// Host tests: the `i`th domain, the pool and the mechanisms, where nothing else can
    /// hold them.
    #[cfg(test)]
    pub(super) fn parts_mut(&mut self, i: usize) -> (&mut Domain<B>, &mut FramePool, &dirty::Mechanisms) {
        let d = DomainCell::get_mut(&mut self.domains.get_mut()[i]);
        (d, self.pool.get_mut(), &self.mechanisms)
    }

    /// The slice in force: the machine's, or the cap if shorter.
    pub(super) fn slice(&self) -> Option<u64> {
        match (self.slice_ticks, self.slice_cap.load(Ordering::Relaxed)) {
            (Some(slice), cap) if cap != 0 => Some(slice.min(cap)),
            (slice, _) => slice,
        }
    }

    /// The domains now (a snapshot: each is locked on its own).
    fn cells(&self) -> Vec<DomainRef<B>> {
        self.domains.lock().clone()
    }

    /// Whether any vCPU can run, now or when its LAPIC timer or a device's timer fires.
    /// A domain another CPU holds counts as runnable (it is running).
    pub fn has_runnable(&self) -> bool {
        self.cells().iter().any(|c| {
            let Some(d) = c.try_lock_for_slice() else { return true };
            d.state == DomainState::Running
                && (d.next_device_event_ns().is_some()
                    || d.vcpus.iter().any(|v| {
                        matches!(v.state, RunState::Runnable | RunState::StartUp(_))
                            || (v.state == RunState::Halted && v.lapic.next_timer_ns().is_some())
                    }))
        })
    }

    /// How long this CPU may sleep when no vCPU can run now: TSC ticks until the
    /// earliest LAPIC timer of a sleeping vCPU or device timer of a running domain
    /// (`None`: nothing is armed; `Some(0)`: something is due already). A domain
    /// another CPU holds is looked at again in a millisecond.
    pub fn idle_ticks(&self) -> Option<u64> {
        let now = crate::drivers::time::uptime_ns().unwrap_or(0);
        let mut earliest: Option<u64> = None;
        for c in self.cells() {
            let Some(d) = c.try_lock_for_slice() else {
                let again = now.saturating_add(1_000_000);
                earliest = Some(earliest.map_or(again, |e| e.min(again)));
                continue;
            };
            if d.state != DomainState::Running {
                continue;
            }
            let lapics = d.vcpus.iter().filter_map(|v| v.lapic.next_timer_ns());
            for t in lapics.chain(d.next_device_event_ns()) {
                let at = d.started_ns.wrapping_add(t);
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        earliest.map(|at| if at <= now { 0 } else { ns_to_ticks(at - now) })
    }

    /// Run the next runnable vCPU (round robin over all domains' vCPUs) for one time
    /// slice on this CPU, skipping vCPUs another CPU runs and domains locked or being
    /// stopped. Returns false when nothing was run.
    pub fn run_slice(&self) -> bool {
        let cells = self.cells();
        let total: usize = cells.iter().map(|c| c.vcpus).sum();
        for _ in 0..total {
            let pick = self.cursor.fetch_add(1, Ordering::Relaxed) % total.max(1);
            let Some((cell, vi)) = locate(&cells, pick) else { continue };
            if !cell.runs_on(vi, crate::percpu::this().apic_id) {
                continue;
            }
            // The slice's log lines are written after the domain's lock is given up, and
            // before another CPU takes the domain for a turn (`output_pending`): a
            // vCPU's lines stay in order when it moves between CPUs.
            let held = HeldOutput::new();
            let Some(d) = cell.try_lock_for_slice() else { continue };
            let Some(d) = self.turn(cell, d, vi) else { continue };
            cell.set_output_pending(true);
            drop(d);
            drop(held);
            cell.set_output_pending(false);
            return true;
        }
        false
    }

    /// Vcpu `vi` of the locked domain `d`: run it for a slice if it can run. If it ran
    /// (or the domain ended), the domain, still locked; `None` if it did not.
    fn turn<'a>(&self, cell: &'a DomainCell<B>, mut d: DomainGuard<'a, B>, vi: usize) -> Option<DomainGuard<'a, B>> {
        if d.state != DomainState::Running || vi >= d.vcpus.len() || d.vcpus[vi].vcpu.out_on().is_some() {
            return None;
        }
        // Taking turns: no vCPU goes out while another of the domain's is out.
        if cell.out_now() > 0 && !self.parallel_vcpus.load(Ordering::Relaxed) {
            return None;
        }
        match d.vcpus[vi].state {
            RunState::WaitForSipi => return None,
            RunState::StartUp(vector) => {
                let signature = d.processor_signature();
                if let Err(e) = start_on_sipi(&mut d.vcpus[vi], signature) {
                    self.crash(cell, &mut d, alloc::format!("vCPU {vi}: starting at SIPI vector {vector:#x}: {e}"));
                    return Some(d);
                }
            }
            RunState::Runnable | RunState::Halted => {}
        }
        if d.vcpus[vi].state == RunState::Halted {
            let now = d.guest_now_ns();
            match d.advance_devices(now) {
                Action::Continue => {}
                // A device ended the domain while its vCPUs slept.
                ended => {
                    self.end(cell, &mut d, ended);
                    return Some(d);
                }
            }
            let dom = &mut *d;
            if !wakes(&mut dom.vcpus[vi], &dom.irq, now) {
                return None;
            }
            d.vcpus[vi].state = RunState::Runnable;
        }
        // A throttled domain waits after each turn for `throttle`% of the time: held
        // back by time, not by turns, since an idle machine gives a halting guest
        // thousands of turns a second (counting turns, a Linux guest at 99% still
        // dirtied 415 pages/s and its migration did not converge).
        if d.throttle > 0 && crate::drivers::time::now_ticks() < d.throttle_until {
            return None;
        }
        let cpu = crate::percpu::this();
        let first_here = cpu.index < 64 && d.vcpus[vi].cpus_seen & (1 << cpu.index) == 0;
        if cpu.index < 64 {
            d.vcpus[vi].cpus_seen |= 1 << cpu.index;
        }
        if first_here {
            println!("DOMAIN {} VCPU {vi} ON CPU apic={}", d.id, cpu.apic_id);
        }
        let started = crate::drivers::time::now_ticks();
        let mut d = self.run_vcpu(cell, d, vi);
        if d.throttle > 0 {
            // It ran `ran` ticks: held back for ran × t / (100 − t), so it runs (100 − t)%.
            let now = crate::drivers::time::now_ticks();
            let t = u64::from(d.throttle.min(99));
            let ran = now.wrapping_sub(started);
            d.throttle_until = now.saturating_add(ran.saturating_mul(t) / (100 - t));
        }
        Some(d)
    }

    /// Run vCPU `vi` of `d` for a slice: before each entry (domain locked) the devices
    /// catch up and interrupts are delivered; then the vCPU is taken out and the lock
    /// given up while the guest runs, so the domain's other vCPUs run and exit on other
    /// CPUs meanwhile; after the exit it is locked again, the vCPU put back and the
    /// exit handled. The slice ends early when a control request waits for the domain.
    fn run_vcpu<'a>(&self, cell: &'a DomainCell<B>, mut d: DomainGuard<'a, B>, vi: usize) -> DomainGuard<'a, B> {
        let slice = self.slice();
        let start = crate::drivers::time::now_ticks();
        let budget = slice.unwrap_or(u64::MAX);
        let me = crate::percpu::this().apic_id;
        loop {
            let used = crate::drivers::time::now_ticks().wrapping_sub(start);
            if used >= budget || cell.stopping() {
                break;
            }
            let now = d.guest_now_ns();
            match d.advance_devices(now) {
                Action::Continue => {}
                ended => {
                    self.end(cell, &mut d, ended);
                    break;
                }
            }
            let device_event = d.next_device_event_ns();
            if d.vcpus[vi].msrs.kvmclock_stale() {
                // A migrated domain: its kvm-clock structure has the source's TSC scale.
                let rewritten = exit::msr::write_kvmclock(
                    &mut d,
                    vi,
                    &mut self.lock_pool(),
                    crate::devices::kvmclock::MSR_SYSTEM_TIME,
                    true,
                );
                if let Err(e) = rewritten {
                    self.crash(cell, &mut d, alloc::format!("vCPU {vi}: rewriting its kvm-clock after migration: {e}"));
                    break;
                }
                println!("DOMAIN {} KVMCLOCK vCPU {vi} rewritten at this host's TSC rate", d.id);
            }
            let dom = &mut *d;
            if let Err(e) = deliver(&mut dom.vcpus[vi], &mut dom.irq, now) {
                self.crash(cell, &mut d, alloc::format!("vCPU {vi}: delivering an interrupt: {e}"));
                break;
            }
            // A device's interrupt for a vCPU running elsewhere: make it exit to take it.
            kick_pending(&d);
            let slot = &mut d.vcpus[vi];
            // Exit by the next timer's deadline (the LAPIC's or a device's), so its
            // interrupt is delivered on time.
            let mut this_slice = slice.map(|s| s - used);
            let deadline = [slot.lapic.next_timer_ns(), device_event].into_iter().flatten().min();
            if let (Some(s), Some(t)) = (this_slice, deadline) {
                this_slice = Some(s.min(ns_to_ticks(t.saturating_sub(now))));
            }
            crate::platform::rdt::switch_rmid(slot.rmid);
            let Some(mut vcpu) = slot.vcpu.take_out(me) else { break };
            let mut regs = slot.regs;
            cell.count_out(true);
            drop(d);
            let entered = crate::drivers::time::now_ticks();
            let result = vcpu.run(&mut regs, this_slice);
            let ran = crate::drivers::time::now_ticks().wrapping_sub(entered);
            d = cell.lock_to_check_in();
            // Its slot is still there: the domain's vCPUs and memory are released only
            // when none is out (`crash`, `DomainCell::lock`).
            let slot = &mut d.vcpus[vi];
            slot.vcpu.put_back(vcpu);
            slot.regs = regs;
            cell.count_out(false);
            d.runtime_ticks += ran;
            if d.state != DomainState::Running {
                // Paused by a control request, or ended by another vCPU's exit while
                // this one ran: the last vCPU back returns a crashed domain's memory.
                self.release_if_crashed(cell, &mut d);
                break;
            }
            let next = match result {
                Ok(exit) => {
                    d.count(&exit.reason);
                    let others_running = cell.out_now() > 0;
                    let mut next = self.handle_exit(&mut d, vi, &exit, others_running);
                    if next == Action::StopOthers {
                        // Every other vCPU back first (kicked out of their guests), then
                        // the same exit again; none goes out until this lock is given up.
                        drop(d);
                        d = cell.lock();
                        next = self.handle_exit(&mut d, vi, &exit, false);
                    }
                    next
                }
                Err(e) => Action::Crash(alloc::format!("vCPU {vi}: {e}")),
            };
            // An IPI this exit sent to a vCPU running elsewhere.
            kick_pending(&d);
            match next {
                // An INIT to itself (a broadcast including self) stops it here.
                Action::Continue if d.vcpus[vi].state == RunState::WaitForSipi => break,
                Action::Continue => {}
                // Handled above with the others stopped; never the second answer.
                Action::Yield | Action::StopOthers => break,
                Action::Halt => {
                    let now = d.guest_now_ns();
                    let dom = &mut *d;
                    if wakes(&mut dom.vcpus[vi], &dom.irq, now) {
                        // An interrupt is already pending: HLT ends at once.
                        continue;
                    }
                    d.vcpus[vi].state = RunState::Halted;
                    // Application processors waiting for INIT/SIPI do not keep it alive.
                    let asleep = |v: &VcpuSlot<B::Vcpu>| match v.state {
                        RunState::WaitForSipi => true,
                        RunState::Halted => v.lapic.next_timer_ns().is_none(),
                        RunState::Runnable | RunState::StartUp(_) => false,
                    };
                    if d.next_device_event_ns().is_none() && d.vcpus.iter().all(asleep) {
                        d.state = DomainState::Halted;
                        println!("DOMAIN {} HALTED (every vCPU executed HLT with nothing to wake it)", d.id);
                    }
                    break;
                }
                ended @ (Action::Finish(_) | Action::Crash(_)) => {
                    self.end(cell, &mut d, ended);
                    break;
                }
            }
        }
        d
    }

    /// The exit policy on vCPU `vi`'s exit, with the pool locked.
    fn handle_exit(&self, d: &mut Domain<B>, vi: usize, exit: &crate::arch::Exit, others_running: bool) -> Action {
        let mut pool = self.lock_pool();
        let mut ctx = exit::ExitCtx { d, vi, pool: &mut pool, mechanisms: &self.mechanisms, others_running };
        exit::handle(&mut ctx, exit)
    }

    /// Carry out an action that ends domain `d` (finish or crash); others do nothing.
    fn end(&self, cell: &DomainCell<B>, d: &mut Domain<B>, action: Action) {
        match action {
            Action::Finish(code) => {
                d.state = DomainState::Finished { code };
                println!("DOMAIN {} EXIT code={code} exits={}", d.id, d.total_exits());
                // Its other vCPUs stop at their next exit; a kick makes that now.
                kick(d.vcpus.iter().filter_map(|v| v.vcpu.out_on()));
            }
            Action::Crash(reason) => self.crash(cell, d, reason),
            Action::Continue | Action::Yield | Action::Halt | Action::StopOthers => {}
        }
    }

    /// Stop domain `d` for `reason`; its memory goes back to the pool at once, or when
    /// its last vCPU running elsewhere is back (kicked out of the guest now).
    fn crash(&self, cell: &DomainCell<B>, d: &mut Domain<B>, reason: alloc::string::String) {
        println!("DOMAIN {} CRASHED {reason}", d.id);
        d.state = DomainState::Crashed { reason };
        kick(d.vcpus.iter().filter_map(|v| v.vcpu.out_on()));
        self.release_if_crashed(cell, d);
    }

    /// Return a crashed domain's vCPUs and memory to the pool once none of its vCPUs
    /// is out (guest memory must not be reused while a guest may still write it).
    fn release_if_crashed(&self, cell: &DomainCell<B>, d: &mut Domain<B>) {
        if !matches!(d.state, DomainState::Crashed { .. }) || cell.out_now() != 0 || d.mem.is_none() {
            return;
        }
        if let Err(e) = d.release(&mut self.lock_pool()) {
            println!("FAIL: returning domain {}'s memory: {e}", d.id);
        }
    }
}

/// Kick the CPUs running a vCPU of `d` that has an interrupt pending (an IPI or a
/// device's), so it exits and takes it at its next entry.
fn kick_pending<B: Backend>(d: &Domain<B>) {
    kick(d.vcpus.iter().filter(|v| pending(v, &d.irq).is_some()).filter_map(|v| v.vcpu.out_on()));
}

/// The domain and vCPU index of flat position `flat` in `cells`.
fn locate<B: Backend>(cells: &[DomainRef<B>], flat: usize) -> Option<(&DomainCell<B>, usize)> {
    let mut n = flat;
    for c in cells {
        if n < c.vcpus {
            return Some((c, n));
        }
        n -= c.vcpus;
    }
    None
}

#[cfg(test)]
mod tests {
    //! The scheduler and the control paths over shared domains. Host tests have one
    //! thread per machine, so a lock taken twice panics (`DomainCell::lock`,
    //! `Shared::lock_pool`) where the hypervisor would spin for ever: every request
    //! here proves it takes each lock once, in order.
    use alloc::vec;

    use migration_svc::MigrationCore;

    use crate::domain::dirty::Mechanisms;
    use crate::domain::testing::{FakeBackend, machine};
    use crate::domain::{DomainState, Machine};
    use crate::mm::PAGE_SIZE;
    use crate::mm::frames::testing::pool;
    use crate::services::tasks::DomainOps;

    fn one_domain() -> Machine<FakeBackend> {
        machine(pool(2048), 4 << 20, Mechanisms { pml: false, dbit: true })
    }

    #[test]
    fn every_control_request_takes_each_lock_once() {
        let mut m = one_domain();
        let list = DomainOps::list(&m);
        assert_eq!((list.domains.len(), list.domains[0].state.as_str()), (1, "running"));
        assert!(0 < list.free_frames && list.free_frames < list.total_frames);
        assert_eq!(DomainOps::frames(&m), (list.total_frames, list.free_frames));
        assert_eq!(DomainOps::counters(&m)[0].id, 1);
        assert_eq!(DomainOps::console(&m, 1, 0).unwrap().total, 0);
        DomainOps::set_paused(&mut m, 1, true).unwrap();
        assert_eq!(DomainOps::list(&m).domains[0].state, "paused");
        DomainOps::set_paused(&mut m, 1, false).unwrap();
        DomainOps::set_rmids(&mut m, 1, vec![5]);
        assert_eq!(m.dom(0).vcpus[0].rmid, 5);
        assert_eq!(DomainOps::console_input(&mut m, 1, b"x").unwrap(), 1);
        DomainOps::dirty_start(&mut m, 1, 0, "auto", None).unwrap();
        assert_eq!(DomainOps::dirty_peek(&mut m, 1, 0, true).unwrap().pages, 1024);
        DomainOps::dirty_stop(&mut m, 1, 0).unwrap();
        assert!(DomainOps::staging(&mut m).is_some());
        // The migration service's view of the same domain.
        assert_eq!(m.domain_info(1).unwrap().memory_bytes, 4 << 20);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        m.write_page(1, 3, Some(&[7u8; 4096])).unwrap();
        m.read_page(1, 3, &mut page).unwrap();
        assert_eq!(page, [7u8; 4096]);
        m.memory_digest(1).unwrap();
        assert_eq!(m.vcpu_states(1).unwrap().len(), 1);
        m.throttle(1, 50).unwrap();
        MigrationCore::set_paused(&mut m, 1, true).unwrap();
        DomainOps::destroy(&mut m, 1).unwrap();
        assert!(m.domains().is_empty());
        assert_eq!(m.pool().free_frames(), list.total_frames as usize, "all memory is back");
        assert!(DomainOps::destroy(&mut m, 1).is_err(), "destroyed once");
    }

    #[test]
    fn a_slice_of_a_failing_vcpu_crashes_its_domain_and_returns_the_memory() {
        let m = one_domain();
        let free = m.pool().free_frames();
        assert!(m.has_runnable());
        assert!(m.run_slice(), "the fake vCPU's failure is a turn");
        let cell = m.domains()[0].clone();
        let d = cell.try_peek().unwrap();
        assert!(matches!(&d.state, DomainState::Crashed { reason } if reason.contains("does not run")));
        drop(d);
        assert!(m.pool().free_frames() > free);
        assert!(!m.has_runnable());
        assert!(!m.run_slice(), "nothing is left to run");
    }

    #[test]
    fn a_pinned_domain_runs_only_on_its_cpus_and_bad_pins_are_refused() {
        let mut m = one_domain();
        m.set_vcpu_cpus(vec![0, 5]);
        let e = alloc::format!("{}", m.pin(1, Some(vec![3])).unwrap_err());
        assert_eq!(e, "CPU 3 runs no vCPUs (there is no such CPU); vCPUs run on CPUs 0,5");
        assert!(m.pin(2, None).is_err(), "no domain 2");
        m.pin(1, Some(vec![5])).unwrap();
        assert_eq!(DomainOps::list(&m).domains[0].cpus, Some(vec![5]));
        assert!(!m.run_slice(), "this thread is CPU 0: the domain is not run here");
        m.pin(1, None).unwrap();
        assert_eq!(DomainOps::list(&m).domains[0].cpus, None);
        assert_eq!(m.domains()[0].homes(), vec![5], "unpinned, a vCPU keeps a home it may still have");
        m.pin(1, Some(vec![0])).unwrap();
        assert!(m.run_slice(), "pinned here, it runs here");
    }

    /// Each domain's home CPUs, by id.
    fn homes(m: &Machine<FakeBackend>) -> alloc::vec::Vec<(u32, alloc::vec::Vec<u32>)> {
        m.domains().iter().map(|c| (c.id, c.homes())).collect()
    }

    #[test]
    fn a_cpu_emptied_by_destroys_takes_vcpus_from_the_busiest_within_their_pins() {
        // Domain 1, placed on CPU 0 while it was the only one.
        let mut m = machine(pool(8192), 1 << 20, Mechanisms { pml: false, dbit: true });
        m.set_vcpu_cpus(vec![0, 1]);
        for id in 2..=5 {
            crate::domain::testing::add_domain(&mut m, id, 1 << 20);
        }
        // Least loaded first, the lower APIC ID on a tie.
        assert_eq!(homes(&m), [(1, vec![0]), (2, vec![1]), (3, vec![0]), (4, vec![1]), (5, vec![0])]);
        DomainOps::destroy(&mut m, 2).unwrap();
        // CPU 0 had 3, CPU 1 one: the first domain on CPU 0 moves, evening them out.
        assert_eq!(homes(&m), [(1, vec![1]), (3, vec![0]), (4, vec![1]), (5, vec![0])]);
        DomainOps::destroy(&mut m, 4).unwrap();
        assert_eq!(homes(&m), [(1, vec![1]), (3, vec![0]), (5, vec![0])], "2 against 1: no move narrows that");

        // A domain that can no longer run holds no CPU, and a pinned one moves only
        // within its pins.
        m.pin(3, Some(vec![0])).unwrap();
        m.pin(5, Some(vec![0])).unwrap();
        let cell = m.domains().iter().find(|c| c.id == 1).unwrap().clone();
        cell.try_peek().unwrap().state = DomainState::Finished { code: 0 };
        crate::domain::testing::add_domain(&mut m, 6, 1 << 20);
        assert_eq!(homes(&m)[3], (6, vec![1]), "CPU 1 holds only a finished domain: it counts as empty");
        crate::domain::testing::add_domain(&mut m, 7, 1 << 20);
        crate::domain::testing::add_domain(&mut m, 8, 1 << 20);
        assert_eq!(homes(&m)[4..], [(7, vec![1]), (8, vec![0])]);
        DomainOps::destroy(&mut m, 6).unwrap();
        DomainOps::destroy(&mut m, 7).unwrap();
        // CPU 0: 3, 5 (pinned there) and 8; CPU 1: nothing that runs. 8 moves, 3 and 5 stay.
        assert_eq!(homes(&m), [(1, vec![1]), (3, vec![0]), (5, vec![0]), (8, vec![1])]);
    }

    #[test]
    fn a_domain_another_cpu_holds_is_skipped_and_counts_as_running() {
        let m = one_domain();
        let cell = m.domains()[0].clone();
        let held = cell.try_peek().unwrap();
        assert!(!m.run_slice(), "skipped, not waited for");
        assert!(m.has_runnable(), "it is running elsewhere");
        assert!(m.idle_ticks().is_some_and(|t| t > 0), "looked at again soon");
        drop(held);
        assert!(m.run_slice());
    }
}

#[cfg(test)]
mod concurrency_tests {
    //! The check-out protocol with a second thread standing in for the CPU that runs
    //! a vCPU: a control request waits for the vCPU to come back, kicking its CPU.
    use std::time::Duration;

    use crate::domain::dirty::Mechanisms;
    use crate::domain::testing::machine;
    use crate::domain::{DomainState, KICKS};
    use crate::mm::frames::testing::pool;

    #[test]
    fn a_control_request_kicks_the_cpu_running_a_vcpu_and_waits_for_it() {
        let mut m = machine(pool(2048), 4 << 20, Mechanisms { pml: false, dbit: true });
        let cell = m.domains()[0].clone();
        // "CPU 7" takes vCPU 0 out, as `run_vcpu` does before entering the guest.
        let vcpu = {
            let mut d = cell.try_peek().unwrap();
            let v = d.vcpus[0].vcpu.take_out(7).unwrap();
            cell.count_out(true);
            v
        };
        assert!(!m.run_slice(), "a vCPU that is out is not run twice");
        let runner = {
            let cell = cell.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                // Its exit: back in, and the slice ends because a request waits.
                let stopping = cell.stopping();
                let mut d = cell.lock_to_check_in();
                d.vcpus[0].vcpu.put_back(vcpu);
                cell.count_out(false);
                stopping
            })
        };
        KICKS.with(|k| k.borrow_mut().clear());
        m.set_paused(1, true).unwrap();
        assert!(runner.join().unwrap(), "the running CPU saw the request waiting");
        assert!(KICKS.with(|k| k.borrow().contains(&7)), "CPU 7 was kicked");
        let d = cell.try_peek().unwrap();
        assert_eq!(d.state, DomainState::Paused);
        assert!(d.vcpus[0].vcpu.out_on().is_none());
    }

    #[test]
    fn a_crashed_domain_keeps_its_memory_until_its_last_vcpu_is_back() {
        let m = machine(pool(2048), 4 << 20, Mechanisms { pml: false, dbit: true });
        let free = m.pool().free_frames();
        let cell = m.domains()[0].clone();
        let mut d = cell.try_peek().unwrap();
        let vcpu = d.vcpus[0].vcpu.take_out(7).unwrap();
        cell.count_out(true);
        KICKS.with(|k| k.borrow_mut().clear());
        m.shared().crash(&cell, &mut d, "test".into());
        assert!(d.mem.is_some(), "a guest may still write its memory");
        assert_eq!(m.pool().free_frames(), free);
        assert!(KICKS.with(|k| k.borrow().contains(&7)), "its CPU was kicked");
        d.vcpus[0].vcpu.put_back(vcpu);
        cell.count_out(false);
        m.shared().release_if_crashed(&cell, &mut d);
        assert!(d.mem.is_none());
        drop(d);
        assert!(m.pool().free_frames() > free, "returned once it was back");
    }
}
