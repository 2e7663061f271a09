//! Domains: guest memory, vCPUs, a verified CPUID policy, a console and counters, and
//! their life cycle (create from a kernel image, pause, destroy).
//!
//! Where the rest lives: [`exit`] is the exit policy (one function over a context,
//! a file per kind of exit); `sched` picks the next vCPU and applies each exit's
//! action; `ops` adapts the control requests of `tasks::DomainOps` to the machine;
//! [`dirty`] is log-dirty mode; [`migrate`] is the migration service's view of a domain.
//!
//! Exit policy (the backends only decode): CPUID is answered from the domain's
//! `levelling::CpuidTable`, never from the host; the UART at 0x3F8 feeds the console;
//! MSRs outside the allow-list (`exit::msr`) get #GP; VMX/SVM instructions get #UD; a
//! triple fault, a double fault, an access outside guest memory or an exit we cannot
//! emulate stops the domain with the reason, and its memory goes back to the pool at
//! once. Nothing a guest does stops the hypervisor or another domain.

pub mod boot;
pub mod config;
pub mod dirty;
pub mod exit;
pub mod loader;
pub mod migrate;
mod ops;
mod platform;
pub mod sched;
#[cfg(any(test, fuzzing))]
pub(crate) mod testing;

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use levelling::{CpuidTable, HostCpu, VcpuState};

use crate::arch::{ArchError, Backend, ExitKind, ExitReason, GuestRegs, Vcpu};
use crate::devices::bus::DeviceBus;
use crate::devices::lapic::Lapic;
use crate::drivers::console::HeldOutput;
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::guest::GuestMemory;
use crate::println;

use self::config::DomainConfig;

/// Console bytes kept per domain.
pub const CONSOLE_BYTES: usize = 16 * 1024;
/// Console lines per domain echoed to the hypervisor's serial log; after that they
/// are only kept in the ring (a flooding guest cannot drown the log).
pub const CONSOLE_ECHO_LINES: u64 = 400;
/// Reports kept per domain.
pub(crate) const REPORTS_KEPT: usize = 256;

/// A domain's life-cycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// Its vCPUs are scheduled.
    Running,
    /// Stopped by the operator; can be unpaused.
    Paused,
    /// Every vCPU halted with nothing to wake it.
    Halted,
    /// The guest called the exit hypercall.
    Finished {
        /// Its exit code.
        code: u64,
    },
    /// Stopped by the hypervisor; its memory has been returned.
    Crashed {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainState::Running => f.write_str("running"),
            DomainState::Paused => f.write_str("paused"),
            DomainState::Halted => f.write_str("halted"),
            DomainState::Finished { code } => write!(f, "finished({code})"),
            DomainState::Crashed { reason } => write!(f, "crashed: {reason}"),
        }
    }
}

/// Why a domain could not be created or changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainError {
    /// The CPUID policy text does not parse or cannot run here (levelling's words).
    Policy(String),
    /// Not enough memory.
    Memory(MmError),
    /// The kernel image was refused.
    Load(loader::LoadError),
    /// The backend failed to create a vCPU.
    Arch(ArchError),
    /// No domain with that id.
    NoSuchDomain(u32),
    /// A feature this machine or domain does not have, as a phrase.
    Unavailable(&'static str),
    /// A page range outside the domain's memory.
    BadRange {
        /// Pages the domain has.
        pages: u64,
    },
    /// The domain's devices could not be set up.
    Devices(String),
    /// A CPU list naming a CPU that runs no vCPUs, as a sentence.
    Cpus(String),
    /// The operation does not apply in the domain's state.
    WrongState {
        /// Domain id.
        id: u32,
        /// Its state.
        state: String,
    },
}

impl From<MmError> for DomainError {
    fn from(e: MmError) -> Self {
        DomainError::Memory(e)
    }
}
impl From<ArchError> for DomainError {
    fn from(e: ArchError) -> Self {
        DomainError::Arch(e)
    }
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainError::Policy(e) => write!(f, "CPUID policy: {e}"),
            DomainError::Memory(e) => write!(f, "{e}"),
            DomainError::Load(e) => write!(f, "{e}"),
            DomainError::Arch(e) => write!(f, "{e}"),
            DomainError::NoSuchDomain(id) => write!(f, "no domain {id}"),
            DomainError::Unavailable(what) => write!(f, "not available: {what}"),
            DomainError::Devices(why) => write!(f, "cannot set up the domain's devices: {why}"),
            DomainError::BadRange { pages } => write!(f, "the range must lie within the domain's {pages} pages"),
            DomainError::WrongState { id, state } => write!(f, "domain {id} is {state}"),
            DomainError::Cpus(why) => f.write_str(why),
        }
    }
}

/// Whether a vCPU may be scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    /// It runs when its turn comes.
    Runnable,
    /// It executed HLT: it runs again when an interrupt is pending or its timer is due.
    Halted,
    /// Waiting for a start-up IPI (an application processor of a Linux or multiboot
    /// domain before the OS starts it, or any vCPU but the BSP after an INIT): it never
    /// runs, and no interrupt or timer wakes it.
    WaitForSipi,
    /// A start-up IPI with this vector arrived while it waited (`platform::route_ipi`):
    /// before it next runs, the scheduler loads the real-mode start state
    /// (`boot::sipi_snapshot`) and makes it runnable (`sched::start_on_sipi`).
    StartUp(u8),
}

/// A vCPU's backend half (its VMCB or VMCS, its FPU state), which the CPU that runs
/// the vCPU takes out of the domain while the guest runs: the domain's lock is not
/// held then, so the domain's other vCPUs run at the same time on other CPUs and
/// their exits are handled. Everything else of the vCPU (its LAPIC, its run state)
/// stays in the domain, where an IPI or a device reaches it.
///
/// Reaching the vCPU while it is out is a locking bug, not a guest's doing: control
/// requests lock the domain only once every vCPU is back (`DomainCell::lock`), and an
/// exit handler uses only its own vCPU, which is back while it is handled. It panics
/// rather than let two CPUs use one VMCB.
pub(crate) struct Held<V> {
    vcpu: Option<V>,
    /// The APIC ID of the CPU running it, while it is out.
    on: Option<u32>,
}

impl<V> Held<V> {
    fn new(vcpu: V) -> Self {
        Self { vcpu: Some(vcpu), on: None }
    }

    /// Take it out to run on the CPU with APIC ID `apic_id`.
    pub(crate) fn take_out(&mut self, apic_id: u32) -> Option<V> {
        let vcpu = self.vcpu.take()?;
        self.on = Some(apic_id);
        Some(vcpu)
    }

    /// Put it back after its run.
    pub(crate) fn put_back(&mut self, vcpu: V) {
        self.vcpu = Some(vcpu);
        self.on = None;
    }

    /// The CPU running it, if it is out.
    pub(crate) fn out_on(&self) -> Option<u32> {
        self.on
    }

    /// It, where it is not out (flushes that the CPU running it does at its next
    /// entry anyway).
    pub(crate) fn if_here(&mut self) -> Option<&mut V> {
        self.vcpu.as_mut()
    }

    fn into_inner(self) -> Option<V> {
        self.vcpu
    }
}

impl<V> core::ops::Deref for Held<V> {
    type Target = V;
    fn deref(&self) -> &V {
        self.vcpu.as_ref().expect("a vCPU used while it runs on another CPU (a locking bug)")
    }
}

impl<V> core::ops::DerefMut for Held<V> {
    fn deref_mut(&mut self) -> &mut V {
        self.vcpu.as_mut().expect("a vCPU used while it runs on another CPU (a locking bug)")
    }
}

/// One vCPU of a domain: the backend's vCPU and what the core keeps of it.
pub(crate) struct VcpuSlot<V> {
    pub(crate) vcpu: Held<V>,
    pub(crate) regs: GuestRegs,
    state: RunState,
    pub(crate) index: u32,
    /// RDT monitoring ID the monitoring service gave this vCPU (0: not monitored).
    rmid: u32,
    /// Its local APIC (x2APIC MSRs and the timer; interrupts it accepts are injected
    /// by the scheduler).
    pub(crate) lapic: Lapic,
    /// Whether the backend was asked for an interrupt-window exit.
    pub(crate) window: bool,
    /// The MSRs the core emulates itself (MTRRs, MISC_ENABLE, MCG_STATUS).
    pub(crate) msrs: exit::msr::MsrState,
    /// The physical CPUs (bit = `PerCpu::index`, the first 64) it has run on, so the
    /// log names each placement once.
    cpus_seen: u64,
}

impl<V> VcpuSlot<V> {
    /// A slot for vCPU `index` (APIC ID = index; vCPU 0 is the bootstrap processor).
    pub(crate) fn new(vcpu: V, regs: GuestRegs, index: u32) -> Self {
        let tsc_hz = crate::drivers::time::tsc_hz().unwrap_or(1_000_000_000);
        let lapic = Lapic::new(index, index == 0, tsc_hz);
        Self {
            vcpu: Held::new(vcpu),
            regs,
            state: RunState::Runnable,
            index,
            rmid: 0,
            lapic,
            window: false,
            msrs: exit::msr::MsrState::default(),
            cpus_seen: 0,
        }
    }
}

/// The console: a byte ring plus the line being assembled for the serial echo.
#[derive(Debug, Default)]
pub struct Console {
    ring: VecDeque<u8>,
    line: Vec<u8>,
    lines_echoed: u64,
    /// Bytes written in total.
    pub bytes: u64,
}

impl Console {
    fn push(&mut self, id: u32, byte: u8) {
        self.bytes += 1;
        if self.ring.len() == CONSOLE_BYTES {
            self.ring.pop_front();
        }
        self.ring.push_back(byte);
        if byte == b'\n' || self.line.len() >= 200 {
            if self.lines_echoed < CONSOLE_ECHO_LINES {
                println!("[dom{id}] {}", String::from_utf8_lossy(&self.line));
            } else if self.lines_echoed == CONSOLE_ECHO_LINES {
                println!("[dom{id}] (console echo stopped after {CONSOLE_ECHO_LINES} lines; the ring keeps the rest)");
            }
            self.lines_echoed += 1;
            self.line.clear();
        } else if byte != b'\r' {
            self.line.push(byte);
        }
    }

    /// The ring's contents.
    pub fn contents(&self) -> Vec<u8> {
        self.ring.iter().copied().collect()
    }

    /// Take a migrated domain's console: `total` bytes ever written, the last of them
    /// `ring` (its newest [`CONSOLE_BYTES`] are kept). New output is echoed again.
    pub(crate) fn restore(&mut self, total: u64, ring: &[u8]) {
        let keep = ring.get(ring.len().saturating_sub(CONSOLE_BYTES)..).unwrap_or_default();
        self.ring = keep.iter().copied().collect();
        self.bytes = total.max(keep.len() as u64);
        self.line.clear();
        self.lines_echoed = 0;
    }

    /// Bytes from number `offset` on (or from the oldest still kept): (first byte's
    /// number, bytes).
    pub fn since(&self, offset: u64) -> (u64, Vec<u8>) {
        let oldest = self.bytes - self.ring.len() as u64;
        let from = offset.clamp(oldest, self.bytes);
        (from, self.ring.iter().skip((from - oldest) as usize).copied().collect())
    }
}

/// Exit counters by reason; updated on every exit, so a hash map rather than a tree.
pub type ExitCounts = hashbrown::HashMap<ExitKind, u64>;

/// One domain.
pub struct Domain<B: Backend> {
    /// Id (never reused while the hypervisor runs).
    pub id: u32,
    /// Name.
    pub name: String,
    /// State.
    pub state: DomainState,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs configured.
    pub vcpu_count: u32,
    /// Exits by reason (unordered: [`Domain::exits_by_kind`] sorts them for display).
    pub exits: ExitCounts,
    /// Values the guest reported, oldest first (tag, value).
    pub reports: Vec<(u64, u64)>,
    /// TSC ticks spent in the guest.
    pub runtime_ticks: u64,
    /// The console.
    pub console: Console,
    mem: Option<GuestMemory<B::Paging>>,
    vcpus: Vec<VcpuSlot<B::Vcpu>>,
    cpuid: CpuidTable,
    /// The verified CPUID policy `cpuid` was built from (it travels with a migration).
    policy: levelling::Policy,
    /// The kernel command line it was created with.
    cmdline: String,
    /// Percent of the time its vCPUs are held back (migration auto-throttle).
    throttle: u8,
    /// A throttled domain runs again from this TSC value on (`sched`).
    throttle_until: u64,
    /// Log-dirty logs: [`dirty::MAIN`] and [`dirty::TRACK`].
    logs: [Option<dirty::LogDirty>; 2],
    /// Its PC's device models on their port and MMIO ranges (`devices::pc`).
    devices: DeviceBus,
    /// Its I/O APIC and 8259 pair, which the devices' interrupt lines drive
    /// (`platform`).
    irq: platform::Router,
    /// Interrupt messages and IPIs that reached no LAPIC (or NMI/SMI, not delivered).
    pub undelivered_interrupts: u64,
    /// The hypervisor's uptime when the domain's guest time was 0 (mod 2^64: a
    /// migrated domain's guest time may be older than this hypervisor's uptime).
    started_ns: u64,
    /// The TSC offset of the domain's TSC (every vCPU's until the guest writes
    /// IA32_TSC): 0 at creation, or continued from the source on migration.
    tsc_offset: u64,
    /// The source's guest clock at pause, for a domain that arrived by migration (the
    /// vCPUs' TSCs are continued relative to it).
    migrated_clock: Option<wire::migration::GuestClock>,
}

/// A new domain's clocks: guest time 0 and TSC 0 now.
pub(crate) fn new_clock() -> (u64, u64) {
    let started_ns = crate::drivers::time::uptime_ns().unwrap_or(0);
    (started_ns, 0u64.wrapping_sub(crate::drivers::time::tsc_at_uptime_ns(started_ns)))
}

impl<B: Backend> fmt::Debug for Domain<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain").field("id", &self.id).field("name", &self.name).field("state", &self.state).finish()
    }
}

impl<B: Backend> Domain<B> {
    /// Exits by reason, in the order of [`ExitKind`].
    pub fn exits_by_kind(&self) -> Vec<(ExitKind, u64)> {
        let mut exits: Vec<(ExitKind, u64)> = self.exits.iter().map(|(k, v)| (*k, *v)).collect();
        exits.sort_unstable();
        exits
    }

    /// Total exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().sum()
    }

    /// The last value reported under `name`.
    pub fn report(&self, name: &[u8]) -> Option<u64> {
        let t = guest_abi::tag(name);
        self.reports.iter().rev().find(|(tag, _)| *tag == t).map(|(_, v)| *v)
    }

    /// The guest's clock: nanoseconds since the domain was created (0 where the
    /// hypervisor has no calibrated clock, as in host tests).
    pub fn guest_now_ns(&self) -> u64 {
        crate::drivers::time::uptime_ns().unwrap_or(0).wrapping_sub(self.started_ns)
    }

    /// The TSC offset every vCPU of the domain starts with: the guest's TSC is 0 when
    /// the domain is created and then counts as `guest_now_ns` × TSC frequency, the
    /// clock the LAPIC's TSC-deadline timer converts with (`devices::lapic`). A
    /// migrated domain's continues from the source's (`migrate::rebase_clock`).
    pub fn base_tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    /// The processor signature (family, model, stepping: CPUID.1:EAX of its policy),
    /// which a processor holds in EDX after reset and after INIT (SDM Vol. 3A 10.1.2).
    pub fn processor_signature(&self) -> u32 {
        self.cpuid.lookup(1, 0)[0]
    }

    /// Unclaimed port and MMIO accesses of the guest.
    pub fn unclaimed(&self) -> &crate::devices::bus::UnclaimedStats {
        self.devices.unclaimed()
    }

    /// Whether `gpa` is guest RAM (backed from 0 up to the domain's memory size);
    /// anything else is MMIO.
    pub fn is_ram(&self, gpa: u64) -> bool {
        gpa < self.memory_bytes
    }

    /// Count an exit by kind; a nested page fault outside RAM is MMIO.
    fn count(&mut self, reason: &ExitReason) {
        let kind = match *reason {
            ExitReason::NestedPageFault { gpa, .. } if !self.is_ram(gpa) => ExitKind::Mmio,
            ref r => r.kind(),
        };
        *self.exits.entry(kind).or_insert(0) += 1;
    }

    /// Return every vCPU and all memory to the pool.
    fn release(&mut self, pool: &mut FramePool) -> Result<(), MmError> {
        // Callers make sure no vCPU is out (`DomainCell::lock`, `sched`'s last check-in).
        for slot in self.vcpus.drain(..) {
            if let Some(vcpu) = slot.vcpu.into_inner() {
                vcpu.destroy(pool)?;
            }
        }
        if let Some(mem) = self.mem.take() {
            mem.destroy(pool)?;
        }
        Ok(())
    }
}

/// One domain as every physical CPU shares it: behind its own lock, which a CPU holds
/// for the whole of a time slice of one of its vCPUs (so one domain's vCPUs take turns
/// and never run at the same instant; different domains run in parallel), and a
/// control request holds while it reads or changes the domain.
///
/// Lock order (DESIGN.md's locking rules; nothing takes them the other way round):
/// the machine's domain list, then one domain, then the frame pool, then the console.
/// A CPU never takes the list while it holds a domain.
pub struct DomainCell<B: Backend> {
    /// The domain's id (never changes, so it is read without the lock).
    pub id: u32,
    /// Its name (never changes either).
    pub name: String,
    /// Its vCPU count (fixed at creation), for the scheduler's round robin.
    vcpus: usize,
    /// How many of its vCPUs are out running on some CPU now (changed with the
    /// domain locked).
    out: AtomicU32,
    /// Control requests waiting for every vCPU to come back: no scheduler takes one
    /// out meanwhile, and those out come back at their next exit.
    stopping: AtomicU32,
    /// The CPU that last had a turn of it has not written that turn's log lines yet:
    /// no other turn starts until it has (the lines of a vCPU that moves between CPUs
    /// stay in order).
    output_pending: AtomicBool,
    /// The CPUs (APIC IDs) its vCPUs may run on; `None`: any (`Machine::pin`).
    pinned: spin::Mutex<Option<Vec<u32>>>,
    /// Each vCPU's home: the CPU (APIC ID) whose scheduler runs it (`Machine::place`;
    /// empty until placed: then any CPU may).
    homes: spin::Mutex<Vec<u32>>,
    domain: spin::Mutex<Domain<B>>,
}

/// A shared handle on a domain.
pub type DomainRef<B> = Arc<DomainCell<B>>;

/// A locked domain. When the guard goes, every vCPU in the domain (not out running)
/// first leaves this CPU ([`crate::arch::Vcpu::leave_cpu`]: VMX VMCLEARs a VMCS this
/// CPU made active), so whichever CPU takes the lock next may use any of them: the
/// rule that lets VMX vCPUs run on every CPU (SDM Vol. 3C 25.11.1).
pub struct DomainGuard<'a, B: Backend> {
    inner: Option<spin::MutexGuard<'a, Domain<B>>>,
}

impl<B: Backend> fmt::Debug for DomainGuard<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainGuard").field("id", &self.inner.as_ref().map(|d| d.id)).finish_non_exhaustive()
    }
}

impl<'a, B: Backend> DomainGuard<'a, B> {
    fn new(inner: spin::MutexGuard<'a, Domain<B>>) -> Self {
        Self { inner: Some(inner) }
    }
}

impl<B: Backend> core::ops::Deref for DomainGuard<'_, B> {
    type Target = Domain<B>;
    fn deref(&self) -> &Domain<B> {
        // `inner` is taken only in `drop`.
        self.inner.as_deref().expect("a domain guard holds its lock until dropped")
    }
}

impl<B: Backend> core::ops::DerefMut for DomainGuard<'_, B> {
    fn deref_mut(&mut self) -> &mut Domain<B> {
        self.inner.as_deref_mut().expect("a domain guard holds its lock until dropped")
    }
}

impl<B: Backend> Drop for DomainGuard<'_, B> {
    fn drop(&mut self) {
        let Some(mut d) = self.inner.take() else { return };
        let failed = leave_cpu(&mut d);
        // The report after the lock is given up (never log holding a domain).
        drop(d);
        if let Some(failure) = failed {
            println!("FAIL: {failure}");
        }
    }
}

/// `DOMAIN d HOMES vcpu->cpu 0->0 1->1` and why, when there is more than one CPU.
fn log_homes(id: u32, homes: &[u32], why: &str) {
    let list: Vec<String> = homes.iter().enumerate().map(|(v, c)| alloc::format!("{v}->{c}")).collect();
    println!("DOMAIN {id} HOMES vcpu->cpu {}{why}", list.join(" "));
}

/// A vCPU that could not leave the CPU its domain was held on (a VMCLEAR that failed).
struct LeaveFailure {
    domain: u32,
    vcpu: usize,
    cpu: u32,
    error: ArchError,
}

impl fmt::Display for LeaveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { domain, vcpu, cpu, error } = self;
        write!(f, "domain {domain} vCPU {vcpu}: giving it up on CPU apic={cpu}: {error}")
    }
}

/// Every vCPU of `d` that is in (not out running) leaves this CPU; the first failure.
fn leave_cpu<B: Backend>(d: &mut Domain<B>) -> Option<LeaveFailure> {
    let mut failed = None;
    for (vcpu, slot) in d.vcpus.iter_mut().enumerate() {
        if let Some(Err(error)) = slot.vcpu.if_here().map(|v| v.leave_cpu()) {
            let cpu = crate::percpu::this().apic_id;
            failed.get_or_insert(LeaveFailure { domain: d.id, vcpu, cpu, error });
        }
    }
    failed
}

impl<B: Backend> fmt::Debug for DomainCell<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainCell").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<B: Backend> DomainCell<B> {
    fn new(mut domain: Domain<B>, pinned: Option<Vec<u32>>) -> Self {
        // Made (and perhaps loaded from a snapshot) on this CPU: usable on any from here.
        if let Some(failure) = leave_cpu(&mut domain) {
            println!("FAIL: {failure}");
        }
        Self {
            pinned: spin::Mutex::new(pinned),
            homes: spin::Mutex::new(Vec::new()),
            id: domain.id,
            name: domain.name.clone(),
            vcpus: domain.vcpus.len(),
            out: AtomicU32::new(0),
            stopping: AtomicU32::new(0),
            output_pending: AtomicBool::new(false),
            domain: spin::Mutex::new(domain),
        }
    }

    /// Lock the domain for a control request, with every vCPU stopped: those running
    /// on other CPUs are kicked out of the guest (an IPI makes the vCPU exit, SVM's
    /// INTR intercept) and come back at that exit; none is taken out again until the
    /// guard goes. So a control request sees and changes a domain none of whose vCPUs
    /// runs anywhere, and a change to its nested tables is complete, every CPU's TLB
    /// flushed at its next entry (TLB_CONTROL on every VMRUN), before it answers.
    pub fn lock(&self) -> DomainGuard<'_, B> {
        self.stopping.fetch_add(1, Ordering::AcqRel);
        #[cfg(test)]
        let mut spins = 0u64;
        let guard = loop {
            let Some(guard) = self.domain.try_lock() else {
                // Others hold it only for short steps: a lock held this long in a host
                // test is one this thread took twice (on the hypervisor, a hang).
                #[cfg(test)]
                {
                    spins += 1;
                    assert!(spins < 200_000_000, "domain {} stays locked: a deadlock", self.id);
                }
                core::hint::spin_loop();
                continue;
            };
            if self.out.load(Ordering::Acquire) == 0 {
                break DomainGuard::new(guard);
            }
            let mut running_on = [u32::MAX; config::MAX_VCPUS as usize];
            for (to, slot) in running_on.iter_mut().zip(guard.vcpus.iter()) {
                *to = slot.vcpu.out_on().unwrap_or(u32::MAX);
            }
            // Unlocked while waiting: a vCPU coming back needs the lock to check in.
            drop(guard);
            kick(running_on.iter().copied().filter(|&a| a != u32::MAX));
            wait_until(|| self.out.load(Ordering::Acquire) == 0, KICK_AGAIN_US);
        };
        self.stopping.fetch_sub(1, Ordering::AcqRel);
        guard
    }

    /// Lock the domain for a scheduling step or an exit's handling, if no one holds it
    /// and no control request waits for it (a busy domain is skipped, not waited for).
    pub(crate) fn try_lock_for_slice(&self) -> Option<DomainGuard<'_, B>> {
        if self.stopping() || self.output_pending.load(Ordering::Acquire) {
            return None;
        }
        self.domain.try_lock().map(DomainGuard::new)
    }

    /// Whether vCPU `vi` runs on the CPU with APIC ID `apic_id`: its home is there (or
    /// it has none yet).
    pub(crate) fn runs_on(&self, vi: usize, apic_id: u32) -> bool {
        self.homes.lock().get(vi).is_none_or(|&home| home == apic_id)
    }

    /// Each vCPU's home CPU (APIC IDs, by vCPU index).
    pub fn homes(&self) -> Vec<u32> {
        self.homes.lock().clone()
    }

    /// The CPUs it is pinned to (`None`: any).
    pub fn pinned(&self) -> Option<Vec<u32>> {
        self.pinned.lock().clone()
    }

    /// See `output_pending`.
    pub(crate) fn set_output_pending(&self, pending: bool) {
        self.output_pending.store(pending, Ordering::Release);
    }

    /// Lock the domain to take a vCPU back in after its run (held by others only for
    /// short steps: control requests wait for this vCPU before they take it).
    pub(crate) fn lock_to_check_in(&self) -> DomainGuard<'_, B> {
        DomainGuard::new(self.domain.lock())
    }

    /// The domain if no one holds it now, without stopping any vCPU (for polls that
    /// can look again later, and tests).
    pub fn try_peek(&self) -> Option<DomainGuard<'_, B>> {
        self.domain.try_lock().map(DomainGuard::new)
    }

    /// Whether its vCPUs hold a CPU: it runs or is paused (and will run again), or a
    /// CPU holds it now. A halted, finished or crashed domain holds none.
    fn holds_a_cpu(&self) -> bool {
        self.try_peek().is_none_or(|d| matches!(d.state, DomainState::Running | DomainState::Paused))
    }

    /// Whether a control request waits for the vCPUs to come back.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) != 0
    }

    /// A vCPU went out (`true`) or came back (`false`); call with the domain locked.
    pub(crate) fn count_out(&self, out: bool) {
        if out {
            self.out.fetch_add(1, Ordering::AcqRel);
        } else {
            self.out.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// How many vCPUs are out now.
    pub(crate) fn out_now(&self) -> u32 {
        self.out.load(Ordering::Acquire)
    }

    /// The domain itself, where nothing else can hold the cell (host tests).
    #[cfg(test)]
    pub(super) fn get_mut(this: &mut DomainRef<B>) -> &mut Domain<B> {
        Arc::get_mut(this).expect("no other CPU holds the domain in a host test").domain.get_mut()
    }
}

/// How long a control request waits for kicked vCPUs before it kicks them again (an
/// IPI that reached a CPU just before it entered the guest is taken there, not in it).
const KICK_AGAIN_US: u64 = 1000;

/// Send the kick IPI to each of these CPUs (APIC IDs), except this one.
pub(crate) fn kick(cpus: impl Iterator<Item = u32>) {
    let me = crate::percpu::this().apic_id;
    for apic_id in cpus.filter(|&a| a != me) {
        #[cfg(not(test))]
        // A failed IPI only means the wait lasts until that vCPU's slice ends.
        let _ = crate::drivers::lapic::send_fixed(apic_id, crate::smp::WAKE_VECTOR);
        #[cfg(test)]
        KICKS.with(|k| k.borrow_mut().push(apic_id));
    }
}

#[cfg(test)]
std::thread_local! {
    /// Host tests: the CPUs this thread kicked.
    pub(crate) static KICKS: core::cell::RefCell<Vec<u32>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// Spin until `done` or `us` microseconds passed.
fn wait_until(done: impl Fn() -> bool, us: u64) {
    let limit = crate::drivers::time::ms_to_ticks(1).map_or(u64::MAX, |per_ms| per_ms * us / 1000);
    let start = crate::drivers::time::now_ticks();
    while !done() && crate::drivers::time::now_ticks().wrapping_sub(start) < limit {
        core::hint::spin_loop();
    }
}

/// The domains of the machine: creation and destruction, control requests, and the
/// scheduler state every physical CPU shares ([`sched::Shared`]).
pub struct Machine<B: Backend> {
    backend: B,
    host: HostCpu,
    shared: Arc<sched::Shared<B>>,
    next_id: u32,
    /// Map guest memory with 2 MiB nested pages where possible.
    large_pages: bool,
    /// A domain whose name an incoming migration may take too (local migration: the
    /// source goes away when the copy is complete).
    incoming_name_of: Option<u32>,
    /// The CPUs that run vCPUs ([`Machine::set_vcpu_cpus`]).
    vcpu_cpus: Vec<u32>,
}

impl<B: Backend> fmt::Debug for Machine<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine").field("domains", &self.shared.domains.lock().len()).finish_non_exhaustive()
    }
}

impl<B: Backend> Machine<B> {
    /// A machine with no domains. `slice_ticks` is the time slice in TSC ticks (None:
    /// no preemption available; vCPUs run until they exit).
    pub fn new(
        backend: B,
        pool: FramePool,
        host: HostCpu,
        slice_ticks: Option<u64>,
        mechanisms: dirty::Mechanisms,
        large_pages: bool,
    ) -> Self {
        Self {
            backend,
            host,
            shared: Arc::new(sched::Shared::new(pool, slice_ticks, mechanisms)),
            next_id: 1,
            large_pages,
            incoming_name_of: None,
            vcpu_cpus: alloc::vec![crate::percpu::this().apic_id],
        }
    }

    /// The scheduler state every CPU shares (for the other CPUs' schedulers).
    pub fn shared(&self) -> Arc<sched::Shared<B>> {
        self.shared.clone()
    }

    /// The frame pool, locked (status and leak checks; never held across a call that
    /// locks a domain: the lock order is domain, then pool).
    pub fn pool(&self) -> spin::MutexGuard<'_, FramePool> {
        self.shared.lock_pool()
    }

    /// End time slices after at most `ticks` (`None`: the slice the machine was made
    /// with), so the main loop comes round sooner: the serial control channel asks for
    /// it while a client uses the line (`init::SERIAL_POLL_US`). Without preemption
    /// (no slice at all) it changes nothing.
    pub fn cap_slice(&mut self, ticks: Option<u64>) {
        self.shared.cap_slice(ticks);
    }

    /// Run the next runnable vCPU for one slice on this CPU ([`sched::Shared::run_slice`]).
    pub fn run_slice(&self) -> bool {
        self.shared.run_slice()
    }

    /// Whether any vCPU can run ([`sched::Shared::has_runnable`]).
    pub fn has_runnable(&self) -> bool {
        self.shared.has_runnable()
    }

    /// How long this CPU may sleep ([`sched::Shared::idle_ticks`]).
    pub fn idle_ticks(&self) -> Option<u64> {
        self.shared.idle_ticks()
    }

    /// What log-dirty can use on this machine.
    pub(crate) fn mechanisms(&self) -> &dirty::Mechanisms {
        &self.shared.mechanisms
    }

    /// Every domain, in creation order (a snapshot of the list: lock each to read it).
    pub fn domains(&self) -> Vec<DomainRef<B>> {
        self.shared.domains.lock().clone()
    }

    /// Domain `id`'s cell.
    pub fn cell(&self, id: u32) -> Result<DomainRef<B>, DomainError> {
        self.shared.domains.lock().iter().find(|c| c.id == id).cloned().ok_or(DomainError::NoSuchDomain(id))
    }

    /// Run `f` on domain `id`, locked.
    pub fn with_domain<R>(&self, id: u32, f: impl FnOnce(&mut Domain<B>) -> R) -> Result<R, DomainError> {
        let cell = self.cell(id)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        Ok(f(&mut d))
    }

    /// Run `f` on domain `id` and the frame pool, both locked (domain first).
    pub fn with_domain_and_pool<R>(
        &self,
        id: u32,
        f: impl FnOnce(&mut Domain<B>, &mut FramePool) -> R,
    ) -> Result<R, DomainError> {
        let cell = self.cell(id)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        let mut pool = self.shared.lock_pool();
        Ok(f(&mut d, &mut pool))
    }

    /// Whether a domain has this name.
    fn name_taken(&self, name: &str, except: Option<u32>) -> bool {
        self.shared.domains.lock().iter().any(|c| Some(c.id) != except && c.name == name)
    }

    /// Make `domain` visible to every CPU's scheduler, its vCPUs on `cpus` (`None`: any).
    fn publish(&mut self, domain: Domain<B>, cpus: Option<Vec<u32>>) {
        let cell = Arc::new(DomainCell::new(domain, cpus));
        self.place(&cell);
        self.shared.domains.lock().push(cell);
    }

    /// Give each vCPU of `cell` a home CPU: among the CPUs it may run on (its pinning,
    /// else every CPU that runs vCPUs), the one with the fewest vCPUs homed there now;
    /// a vCPU already homed on one of those keeps its home.
    /// A vCPU stays on its home between placements: one that moved between CPUs every
    /// slice crashed a 2-vCPU Linux guest once in 12 runs on QEMU (the guest resumed
    /// with the host's CR3 and RIP, cause not found yet), so vCPUs do not migrate each
    /// slice; the balancing is done here, when a domain is created or pinned, and by
    /// [`Machine::rebalance`] when one is destroyed.
    fn place(&self, cell: &DomainCell<B>) {
        let allowed = cell.pinned().unwrap_or_else(|| self.vcpu_cpus.clone());
        let mut load = self.homed_load(&allowed, Some(cell.id));
        // A vCPU whose home is still allowed keeps it (a pin moves only what it must).
        let old = cell.homes();
        for home in &old {
            if let Some(l) = load.iter_mut().find(|(c, _)| c == home) {
                l.1 += 1;
            }
        }
        let mut homes = Vec::with_capacity(cell.vcpus);
        if !self.shared.parallel_vcpus() {
            // A domain's vCPUs all on one CPU (see `Shared::set_parallel_vcpus`): a
            // 2-vCPU guest spread over two CPUs now and then resumed with corrupted
            // state, even taking turns. The least loaded allowed CPU, or the one its
            // first vCPU already has.
            let keep = old.first().copied().filter(|h| allowed.contains(h) && old.iter().all(|o| o == h));
            let home = keep.or_else(|| load.iter().min_by_key(|(_, n)| *n).map(|(c, _)| *c));
            if let Some(home) = home {
                homes.resize(cell.vcpus, home);
            }
        } else {
            for vi in 0..cell.vcpus {
                if let Some(&home) = old.get(vi).filter(|h| allowed.contains(h)) {
                    homes.push(home);
                    continue;
                }
                let Some(least) = load.iter_mut().min_by_key(|(_, n)| *n) else { break };
                least.1 += 1;
                homes.push(least.0);
            }
        }
        if self.vcpu_cpus.len() > 1 {
            log_homes(cell.id, &homes, "");
        }
        *cell.homes.lock() = homes;
    }

    /// How many vCPUs are homed on each CPU of `cpus`, counting the domains that hold a
    /// CPU ([`DomainCell::holds_a_cpu`]) other than `except`.
    fn homed_load(&self, cpus: &[u32], except: Option<u32>) -> Vec<(u32, usize)> {
        let mut load: Vec<(u32, usize)> = cpus.iter().map(|&c| (c, 0)).collect();
        // The list, then one domain at a time (`holds_a_cpu` only tries its lock).
        for other in self.shared.domains.lock().iter().filter(|c| Some(c.id) != except && c.holds_a_cpu()) {
            for home in other.homes() {
                if let Some(l) = load.iter_mut().find(|(c, _)| *c == home) {
                    l.1 += 1;
                }
            }
        }
        load
    }

    /// Even out the CPUs' run queues after a domain is gone: while the busiest CPU has
    /// two or more vCPUs homed on it than the idlest, move there a domain homed on the
    /// busiest (with `smp-vcpus=parallel`, one vCPU of it) that may run on the idlest
    /// and whose move narrows the gap. Placement alone would leave a CPU idle for good
    /// once the domains on it are destroyed. A moved vCPU runs on its new home from its
    /// next turn: an SVM VMCB runs anywhere, and a VMX VMCS was VMCLEARed when its
    /// domain's lock was last given up (`DomainGuard`).
    fn rebalance(&self) {
        let parallel = self.shared.parallel_vcpus();
        // Each move narrows the gap between two CPUs, so this ends; the bound is a guard.
        for _ in 0..self.vcpu_cpus.len() * 8 {
            let load = self.homed_load(&self.vcpu_cpus, None);
            let busiest = load.iter().copied().max_by_key(|&(_, n)| n);
            let idlest = load.iter().copied().min_by_key(|&(_, n)| n);
            let (Some((busy, most)), Some((idle, least))) = (busiest, idlest) else { return };
            if most < least + 2 {
                return;
            }
            let movable = |c: &DomainCell<B>| {
                let homes = c.homes();
                let on_busy = homes.iter().filter(|&&h| h == busy).count();
                // By default a domain's vCPUs share one home and move together.
                let moving = if parallel { 1 } else { homes.len() };
                on_busy > 0
                    && (parallel || on_busy == homes.len())
                    && least + moving < most
                    && c.pinned().is_none_or(|p| p.contains(&idle))
                    && c.holds_a_cpu()
            };
            let Some(cell) = self.shared.domains.lock().iter().find(|c| movable(c)).cloned() else { return };
            let homes = {
                let mut homes = cell.homes.lock();
                for h in homes.iter_mut().filter(|h| **h == busy).take(if parallel { 1 } else { usize::MAX }) {
                    *h = idle;
                }
                homes.clone()
            };
            log_homes(
                cell.id,
                &homes,
                &alloc::format!(" (moved from CPU {busy}: {most} vCPUs there, {least} on {idle})"),
            );
        }
    }

    /// The CPUs that run vCPUs (APIC IDs): the boot CPU, and with a backend whose vCPUs
    /// may run anywhere ([`Backend::VCPU_ON_ANY_CPU`], both do) every AP that schedules
    /// them.
    pub fn set_vcpu_cpus(&mut self, cpus: Vec<u32>) {
        self.vcpu_cpus = cpus;
    }

    /// Refuse a pinning to a CPU that runs no vCPUs, saying which CPUs do.
    fn check_cpus(&self, cpus: Option<&[u32]>) -> Result<(), DomainError> {
        let Some(cpus) = cpus else { return Ok(()) };
        let here = wire::cpulist::format(Some(&self.vcpu_cpus));
        if cpus.is_empty() {
            return Err(DomainError::Cpus(alloc::format!("an empty CPU list; vCPUs run on CPUs {here}")));
        }
        match cpus.iter().find(|c| !self.vcpu_cpus.contains(c)) {
            None => Ok(()),
            Some(bad) => {
                let why = match crate::smp::cpus().iter().find(|s| s.apic_id == *bad) {
                    None => "there is no such CPU".into(),
                    Some(s) if s.state() == crate::smp::CpuState::Failed => {
                        alloc::string::String::from("it failed to start")
                    }
                    Some(_) => alloc::string::String::from("its scheduler did not start"),
                };
                Err(DomainError::Cpus(alloc::format!("CPU {bad} runs no vCPUs ({why}); vCPUs run on CPUs {here}")))
            }
        }
    }

    /// Pin domain `id`'s vCPUs to `cpus` (APIC IDs; `None`: any CPU). A vCPU running
    /// elsewhere now moves at the end of its slice.
    pub fn pin(&mut self, id: u32, cpus: Option<Vec<u32>>) -> Result<(), DomainError> {
        self.check_cpus(cpus.as_deref())?;
        let cell = self.cell(id)?;
        println!("DOMAIN {id} PINNED cpus={}", wire::cpulist::format(cpus.as_deref()));
        *cell.pinned.lock() = cpus;
        self.place(&cell);
        Ok(())
    }

    /// Host tests: the `i`th domain, where no other CPU can hold it.
    #[cfg(test)]
    pub(crate) fn dom(&mut self, i: usize) -> &mut Domain<B> {
        let shared = Arc::get_mut(&mut self.shared).expect("no other CPU shares the machine in a host test");
        DomainCell::get_mut(&mut shared.domains.get_mut()[i])
    }

    /// Host tests: the `i`th domain, the pool and the mechanisms, as an exit handler has them.
    #[cfg(test)]
    pub(crate) fn parts(&mut self, i: usize) -> (&mut Domain<B>, &mut FramePool, &dirty::Mechanisms) {
        Arc::get_mut(&mut self.shared).expect("no other CPU shares the machine in a host test").parts_mut(i)
    }

    /// Host tests: the slice in force.
    #[cfg(test)]
    pub(crate) fn slice(&self) -> Option<u64> {
        self.shared.slice()
    }

    /// Host tests: put a domain built by hand on the machine.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn push_domain(&mut self, domain: Domain<B>) {
        self.publish(domain, None);
    }

    /// Let an incoming migration take the name of domain `id` (local migration), or
    /// stop letting it (`None`).
    pub fn allow_incoming_name_of(&mut self, id: Option<u32>) {
        self.incoming_name_of = id;
    }

    /// Build the domain's CPUID view: its policy text (default `base=host-max`) on
    /// this host, verified; the levelling error text when it cannot run here.
    pub fn cpuid_table(&self, spec: Option<&str>, vcpus: u32) -> Result<(levelling::Policy, CpuidTable), DomainError> {
        let text = spec.unwrap_or("base=host-max");
        let spec = levelling::parse_spec(text).map_err(|e| DomainError::Policy(alloc::format!("{e}")))?;
        let (mut policy, notes) = spec.policy_on(&self.host);
        for n in notes {
            log::info!("cpuid policy `{text}`: {n}");
        }
        policy.vcpus = vcpus;
        let table = CpuidTable::build(&policy, &self.host).map_err(|e| DomainError::Policy(alloc::format!("{e}")))?;
        Ok((policy, table))
    }

    /// Create and start a domain from `kernel` (an ELF64 `guest_abi` kernel, a Linux
    /// bzImage or a multiboot kernel: [`boot`]) with `initrd` (empty: none).
    pub fn create(&mut self, cfg: &DomainConfig, kernel: &[u8], initrd: &[u8]) -> Result<u32, DomainError> {
        self.check_cpus(cfg.cpus.as_deref())?;
        let devices = new_devices()?;
        let (policy, cpuid) = self.cpuid_table(cfg.cpuid.as_deref(), cfg.vcpus)?;
        boot::check(kernel, initrd, cfg.memory).map_err(DomainError::Load)?;
        let id = self.next_id;
        // The pool is locked for the whole construction: the domain is not published
        // yet, so no other lock is held or needed.
        let shared = self.shared.clone();
        let _held = HeldOutput::new();
        let mut pool = shared.lock_pool();
        let mem = GuestMemory::<B::Paging>::new(&mut pool, cfg.memory, self.large_pages)?;
        let params = loader::BootParams { arch: B::ARCH, domain_id: id, vcpus: cfg.vcpus, cmdline: &cfg.cmdline };
        let loaded = match boot::load(&mut pool, &mem, kernel, initrd, params) {
            Ok(l) => l,
            Err(e) => {
                mem.destroy(&mut pool)?;
                return Err(DomainError::Load(e));
            }
        };
        let (started_ns, tsc_offset) = new_clock();
        let mut domain = Domain {
            id,
            name: cfg.name.clone(),
            state: DomainState::Running,
            memory_bytes: mem.bytes(),
            vcpu_count: cfg.vcpus,
            exits: ExitCounts::default(),
            reports: Vec::new(),
            runtime_ticks: 0,
            console: Console::default(),
            mem: None,
            vcpus: Vec::new(),
            cpuid,
            policy,
            cmdline: cfg.cmdline.clone(),
            throttle: 0,
            throttle_until: 0,
            logs: [None, None],
            devices,
            irq: platform::new_router(),
            undelivered_interrupts: 0,
            started_ns,
            tsc_offset,
            migrated_clock: None,
        };
        let root = mem.root();
        domain.mem = Some(mem);
        for index in 0..cfg.vcpus {
            if let Err(e) = self.add_vcpu(&mut pool, &mut domain, &loaded.vcpu_start(index, root), index) {
                domain.release(&mut pool)?;
                return Err(DomainError::Arch(e));
            }
        }
        drop(pool);
        self.next_id += 1;
        println!(
            "DOMAIN {id} CREATED name={} memory={}M vcpus={} kernel={} bytes format={} initrd={} bytes",
            cfg.name,
            domain.memory_bytes >> 20,
            cfg.vcpus,
            kernel.len(),
            loaded.format.name(),
            initrd.len()
        );
        self.publish(domain, cfg.cpus.clone());
        Ok(id)
    }

    /// Create vCPU `index` of `domain` as `start` says.
    fn add_vcpu(
        &mut self,
        pool: &mut FramePool,
        domain: &mut Domain<B>,
        start: &boot::VcpuStart,
        index: u32,
    ) -> Result<(), ArchError> {
        let mut vcpu = self.backend.create_vcpu(pool, &start.entry)?;
        let mut regs = start.regs;
        let loaded = match &start.snapshot {
            Some(snapshot) => vcpu.load_state(&mut regs, snapshot),
            None => Ok(()),
        };
        // The guest's TSC starts at 0 with the domain (`Domain::base_tsc_offset`).
        if let Err(e) = loaded.and_then(|()| vcpu.set_tsc_offset(domain.base_tsc_offset())) {
            vcpu.destroy(pool)?;
            return Err(e);
        }
        let mut slot = VcpuSlot::new(vcpu, regs, index);
        slot.state = start.run;
        domain.vcpus.push(slot);
        Ok(())
    }

    /// Destroy a domain in any state; its memory and vCPUs return to the pool.
    pub fn destroy(&mut self, id: u32) -> Result<(), DomainError> {
        let cell = {
            let mut list = self.shared.domains.lock();
            let i = list.iter().position(|c| c.id == id).ok_or(DomainError::NoSuchDomain(id))?;
            list.remove(i)
        };
        // Off the list, so no scheduler picks it again; one that holds it now gives it
        // up at its vCPU's next exit (the kick).
        let released = {
            let _held = HeldOutput::new();
            let mut d = cell.lock();
            let mut pool = self.shared.lock_pool();
            d.release(&mut pool)
        };
        released?;
        println!("DOMAIN {id} DESTROYED");
        self.rebalance();
        Ok(())
    }

    /// Pause (Running → Paused) or unpause (Paused → Running).
    pub fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), DomainError> {
        // Taking the lock stops whichever vCPU runs (the kick): once this returns, none
        // of its vCPUs runs anywhere until it is unpaused.
        self.with_domain(id, |d| {
            d.state = match (&d.state, paused) {
                (DomainState::Running, true) => DomainState::Paused,
                (DomainState::Paused, false) => DomainState::Running,
                (s, _) => return Err(DomainError::WrongState { id, state: alloc::format!("{s}") }),
            };
            Ok(())
        })?
    }
}

/// A new domain's devices (`devices::pc`); a mapping error is a bug of that table,
/// reported rather than unwrapped.
pub(crate) fn new_devices() -> Result<DeviceBus, DomainError> {
    crate::devices::pc::bus(crate::drivers::time::unix_time()).map_err(|e| DomainError::Devices(alloc::format!("{e}")))
}

/// The per-vCPU state CPUID answers depend on, as our guests start: APIC ID = the
/// vCPU index, CR4.OSXSAVE and PKE clear, APIC enabled, XCR0 = x87 only.
pub fn vcpu_state(index: u32) -> VcpuState {
    VcpuState { apic_id: index, cr4_osxsave: false, cr4_pke: false, apic_enabled: true, xcr0: 1, xss: 0 }
}

/// CR4.OSXSAVE (SDM Vol. 3A 2.5).
const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PKE.
const CR4_PKE: u64 = 1 << 22;
/// IA32_APIC_BASE.EN.
const APIC_BASE_EN: u64 = 1 << 11;

/// The state CPUID answers depend on for the vCPU in `slot` now: its CR4.OSXSAVE and
/// PKE, its XCR0, whether its local APIC is enabled. IA32_XSS is always 0 (XSAVES is
/// not offered).
pub(crate) fn vcpu_state_of<V: Vcpu>(slot: &mut VcpuSlot<V>) -> Result<VcpuState, ArchError> {
    let cr4 = slot.vcpu.control_state()?.cr4;
    Ok(VcpuState {
        apic_id: slot.index,
        cr4_osxsave: cr4 & CR4_OSXSAVE != 0,
        cr4_pke: cr4 & CR4_PKE != 0,
        apic_enabled: slot.lapic.read_apic_base() & APIC_BASE_EN != 0,
        xcr0: slot.vcpu.fpu().xcr0(),
        xss: 0,
    })
}
