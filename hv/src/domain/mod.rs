//! Domains: guest memory, vCPUs, a verified CPUID policy, a console and counters;
//! creation from a kernel image, the arch-neutral handling of every exit, and
//! round-robin time slices across all runnable vCPUs.
//!
//! Exit policy (the backends only decode): CPUID is answered from the domain's
//! `levelling::CpuidTable`, never from the host; the UART at 0x3F8 feeds the console;
//! MSRs outside [`msr`]'s allow-list get #GP; VMX/SVM instructions get #UD; a triple
//! fault, a double fault, an access outside guest memory or an exit we cannot emulate
//! stops the domain with the reason, and its memory goes back to the pool at once.
//! Nothing a guest does stops the hypervisor or another domain.

pub mod config;
pub mod dirty;
pub mod loader;
pub mod migrate;
pub mod msr;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use levelling::{CpuidTable, HostCpu, VcpuState};

use crate::arch::{ArchError, Backend, Exit, ExitKind, ExitReason, GuestEntry, GuestRegs, Vcpu};
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
const REPORTS_KEPT: usize = 256;

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
            DomainError::BadRange { pages } => write!(f, "the range must lie within the domain's {pages} pages"),
            DomainError::WrongState { id, state } => write!(f, "domain {id} is {state}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Runnable,
    Halted,
}

struct VcpuSlot<V> {
    vcpu: V,
    regs: GuestRegs,
    state: RunState,
    index: u32,
    /// RDT monitoring ID the monitoring service gave this vCPU (0: not monitored).
    rmid: u32,
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

    /// Bytes from number `offset` on (or from the oldest still kept): (first byte's
    /// number, bytes).
    pub fn since(&self, offset: u64) -> (u64, Vec<u8>) {
        let oldest = self.bytes - self.ring.len() as u64;
        let from = offset.clamp(oldest, self.bytes);
        (from, self.ring.iter().skip((from - oldest) as usize).copied().collect())
    }
}

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
    /// Exits by reason.
    pub exits: BTreeMap<ExitKind, u64>,
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
    /// Percent of time slices withheld from its vCPUs (migration auto-throttle).
    throttle: u8,
    /// Slice credit in percent: a vCPU of a throttled domain runs when it reaches 100.
    throttle_credit: u32,
    /// Log-dirty logs: [`dirty::MAIN`] and [`dirty::TRACK`].
    logs: [Option<dirty::LogDirty>; 2],
}

impl<B: Backend> fmt::Debug for Domain<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain").field("id", &self.id).field("name", &self.name).field("state", &self.state).finish()
    }
}

impl<B: Backend> Domain<B> {
    /// Total exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().sum()
    }

    /// The last value reported under `name`.
    pub fn report(&self, name: &[u8]) -> Option<u64> {
        let t = guest_abi::tag(name);
        self.reports.iter().rev().find(|(tag, _)| *tag == t).map(|(_, v)| *v)
    }

    fn count(&mut self, reason: &ExitReason) {
        *self.exits.entry(reason.kind()).or_insert(0) += 1;
    }

    /// Return every vCPU and all memory to the pool.
    fn release(&mut self, pool: &mut FramePool) -> Result<(), MmError> {
        for slot in self.vcpus.drain(..) {
            slot.vcpu.destroy(pool)?;
        }
        if let Some(mem) = self.mem.take() {
            mem.destroy(pool)?;
        }
        Ok(())
    }
}

/// What handling one exit decided.
enum Next {
    /// Re-enter the same vCPU.
    Continue,
    /// Let others run.
    Yield,
    /// The vCPU halted.
    Halt,
    /// The guest is done.
    Finish(u64),
    /// Stop the domain.
    Crash(String),
    /// A log-dirty hypercall, for the machine to carry out (RIP already advanced).
    Dirty(guest_abi::Hypercall, u64, u64),
}

/// The domains of this physical CPU and its scheduler.
pub struct Machine<B: Backend> {
    backend: B,
    /// Frames for everything (public for status and leak checks).
    pub pool: FramePool,
    host: HostCpu,
    domains: Vec<Domain<B>>,
    next_id: u32,
    cursor: usize,
    slice_ticks: Option<u64>,
    mechanisms: dirty::Mechanisms,
    /// Map guest memory with 2 MiB nested pages where possible.
    large_pages: bool,
    /// A domain whose name an incoming migration may take too (local migration: the
    /// source goes away when the copy is complete).
    incoming_name_of: Option<u32>,
}

impl<B: Backend> fmt::Debug for Machine<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine").field("domains", &self.domains.len()).finish_non_exhaustive()
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
            pool,
            host,
            domains: Vec::new(),
            next_id: 1,
            cursor: 0,
            slice_ticks,
            mechanisms,
            large_pages,
            incoming_name_of: None,
        }
    }

    /// Let an incoming migration take the name of domain `id` (local migration), or
    /// stop letting it (`None`).
    pub fn allow_incoming_name_of(&mut self, id: Option<u32>) {
        self.incoming_name_of = id;
    }

    /// The domains.
    pub fn domains(&self) -> &[Domain<B>] {
        &self.domains
    }

    /// Look a domain up.
    pub fn domain(&self, id: u32) -> Option<&Domain<B>> {
        self.domains.iter().find(|d| d.id == id)
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

    /// Create and start a domain.
    pub fn create(&mut self, cfg: &DomainConfig, kernel: &[u8]) -> Result<u32, DomainError> {
        let (policy, cpuid) = self.cpuid_table(cfg.cpuid.as_deref(), cfg.vcpus)?;
        let id = self.next_id;
        let mem = GuestMemory::<B::Paging>::new(&mut self.pool, cfg.memory, self.large_pages)?;
        let params = loader::BootParams { arch: B::ARCH, domain_id: id, vcpus: cfg.vcpus, cmdline: &cfg.cmdline };
        let start = match loader::load(&mut self.pool, &mem, kernel, params) {
            Ok(s) => s,
            Err(e) => {
                mem.destroy(&mut self.pool)?;
                return Err(DomainError::Load(e));
            }
        };
        let mut domain = Domain {
            id,
            name: cfg.name.clone(),
            state: DomainState::Running,
            memory_bytes: mem.bytes(),
            vcpu_count: cfg.vcpus,
            exits: BTreeMap::new(),
            reports: Vec::new(),
            runtime_ticks: 0,
            console: Console::default(),
            mem: None,
            vcpus: Vec::new(),
            cpuid,
            policy,
            cmdline: cfg.cmdline.clone(),
            throttle: 0,
            throttle_credit: 0,
            logs: [None, None],
        };
        let root = mem.root();
        domain.mem = Some(mem);
        for index in 0..cfg.vcpus {
            // guest_abi: every vCPU starts at the entry point with RDI = boot info,
            // RSI = its index, and its own 8 KiB of the stack area.
            let rsp = start.rsp - u64::from(index) * (loader::STACK_BYTES / 8);
            let entry = GuestEntry { nested_root: root, cr3: start.cr3, rip: start.rip, rsp };
            match self.backend.create_vcpu(&mut self.pool, &entry) {
                Ok(vcpu) => {
                    let regs = GuestRegs { rdi: start.rdi, rsi: u64::from(index), ..GuestRegs::default() };
                    domain.vcpus.push(VcpuSlot { vcpu, regs, state: RunState::Runnable, index, rmid: 0 });
                }
                Err(e) => {
                    domain.release(&mut self.pool)?;
                    return Err(DomainError::Arch(e));
                }
            }
        }
        self.next_id += 1;
        println!(
            "DOMAIN {id} CREATED name={} memory={}M vcpus={} kernel={} bytes",
            cfg.name,
            domain.memory_bytes >> 20,
            cfg.vcpus,
            kernel.len()
        );
        self.domains.push(domain);
        Ok(id)
    }

    /// Destroy a domain in any state; its memory and vCPUs return to the pool.
    pub fn destroy(&mut self, id: u32) -> Result<(), DomainError> {
        let i = self.domains.iter().position(|d| d.id == id).ok_or(DomainError::NoSuchDomain(id))?;
        let mut d = self.domains.remove(i);
        d.release(&mut self.pool)?;
        println!("DOMAIN {id} DESTROYED");
        Ok(())
    }

    /// Pause (Running → Paused) or unpause (Paused → Running).
    pub fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), DomainError> {
        let d = self.domains.iter_mut().find(|d| d.id == id).ok_or(DomainError::NoSuchDomain(id))?;
        d.state = match (&d.state, paused) {
            (DomainState::Running, true) => DomainState::Paused,
            (DomainState::Paused, false) => DomainState::Running,
            (s, _) => return Err(DomainError::WrongState { id, state: alloc::format!("{s}") }),
        };
        Ok(())
    }

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
        let start = crate::time::now_ticks();
        let budget = slice.unwrap_or(u64::MAX);
        loop {
            let used = crate::time::now_ticks().wrapping_sub(start);
            if used >= budget {
                break;
            }
            let d = &mut self.domains[di];
            let slot = &mut d.vcpus[vi];
            crate::rdt::switch_rmid(slot.rmid);
            let entered = crate::time::now_ticks();
            let result = slot.vcpu.run(&mut slot.regs, slice.map(|s| s - used));
            d.runtime_ticks += crate::time::now_ticks().wrapping_sub(entered);
            let next = match result {
                Ok(exit) => {
                    d.count(&exit.reason);
                    handle_exit(d, &mut self.pool, vi, &exit)
                }
                Err(e) => Next::Crash(alloc::format!("vCPU {vi}: {e}")),
            };
            match next {
                Next::Continue => {}
                Next::Dirty(call, a, b) => {
                    let rax = self.dirty_hypercall(di, call, a, b);
                    self.domains[di].vcpus[vi].regs.rax = rax;
                }
                Next::Yield => break,
                Next::Halt => {
                    d.vcpus[vi].state = RunState::Halted;
                    if d.vcpus.iter().all(|v| v.state == RunState::Halted) {
                        d.state = DomainState::Halted;
                        println!("DOMAIN {} HALTED (every vCPU executed HLT with nothing to wake it)", d.id);
                    }
                    break;
                }
                Next::Finish(code) => {
                    d.state = DomainState::Finished { code };
                    println!("DOMAIN {} EXIT code={code} exits={}", d.id, d.total_exits());
                    break;
                }
                Next::Crash(reason) => {
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

impl<B: Backend> Machine<B> {
    /// The log-dirty hypercalls of guest_abi; returns RAX.
    fn dirty_hypercall(&mut self, di: usize, call: guest_abi::Hypercall, a: u64, b: u64) -> u64 {
        use guest_abi::{HYPERCALL_EINVAL, HYPERCALL_OK, Hypercall};
        let id = self.domains[di].id;
        let result = match call {
            Hypercall::DirtyStart => {
                let mode = match a {
                    0 => None,
                    1 => Some(dirty::Mode::Pml),
                    2 => Some(dirty::Mode::Dbit),
                    3 => Some(dirty::Mode::Wp),
                    _ => return HYPERCALL_EINVAL,
                };
                self.dirty_start(id, mode, None).map(|m| match m {
                    dirty::Mode::Pml => 1,
                    dirty::Mode::Dbit => 2,
                    dirty::Mode::Wp => 3,
                })
            }
            Hypercall::DirtyPeekClean => self.dirty_peek_clean(id, None).and_then(|bitmap| {
                // Word by word into the guest's buffer: no copy of the bitmap on the
                // heap, whose size the guest's memory size decides.
                let d = &mut self.domains[di];
                let mem = d.mem.as_ref().ok_or(DomainError::Unavailable("no memory"))?;
                let limit = b;
                let mut n = 0u64;
                for w in bitmap.words() {
                    if n >= limit {
                        break;
                    }
                    let bytes = w.to_le_bytes();
                    let take = (limit - n).min(8) as usize;
                    mem.write(&mut self.pool, a + n, &bytes[..take])?;
                    n += take as u64;
                }
                dirty::hypervisor_wrote(d, a..a + n);
                Ok(bitmap.count_ones())
            }),
            Hypercall::DirtyStop => self.dirty_stop(id).map(|_| HYPERCALL_OK),
            _ => return HYPERCALL_EINVAL,
        };
        result.unwrap_or_else(|e| {
            println!("DOMAIN {id} log-dirty hypercall failed: {e}");
            HYPERCALL_EINVAL
        })
    }
}

/// The arch-neutral exit policy.
fn handle_exit<B: Backend>(d: &mut Domain<B>, pool: &mut FramePool, vi: usize, exit: &Exit) -> Next {
    let id = d.id;
    let slot = &mut d.vcpus[vi];
    let skip = |slot: &mut VcpuSlot<B::Vcpu>| match slot.vcpu.skip_instruction(exit) {
        Ok(()) => Next::Continue,
        Err(e) => Next::Crash(alloc::format!("cannot continue after {} at RIP {:#x}: {e}", exit.reason, exit.rip)),
    };
    let inject = |slot: &mut VcpuSlot<B::Vcpu>, vector: u8, error: Option<u32>| match slot
        .vcpu
        .inject_exception(vector, error)
    {
        Ok(()) => Next::Continue,
        Err(e) => Next::Crash(alloc::format!("cannot inject exception {vector}: {e}")),
    };
    match exit.reason {
        ExitReason::Cpuid => {
            let (leaf, sub) = (slot.regs.rax as u32, slot.regs.rcx as u32);
            let r = d.cpuid.lookup_vcpu(leaf, sub, &vcpu_state(slot.index));
            slot.regs.rax = r[0].into();
            slot.regs.rbx = r[1].into();
            slot.regs.rcx = r[2].into();
            slot.regs.rdx = r[3].into();
            skip(slot)
        }
        ExitReason::Io { port, size, input, string } => {
            if string {
                return Next::Crash(alloc::format!("string I/O (INS/OUTS) on port {port:#x} is not emulated"));
            }
            let uart = guest_abi::UART_PORT;
            if input {
                // UART line status (port+5): transmitter empty; anything else reads as
                // all ones, like an unpopulated ISA port.
                let value: u64 = if port == uart + 5 { 0x60 } else { (1u64 << (8 * size)) - 1 };
                let mask = (1u64 << (8 * size)) - 1;
                slot.regs.rax = (slot.regs.rax & !mask) | value;
            } else if port == uart {
                let byte = slot.regs.rax as u8;
                let s = skip(slot);
                d.console.push(id, byte);
                return s;
            }
            skip(slot)
        }
        ExitReason::MsrRead => match msr::read(slot.regs.rcx as u32, slot.index) {
            Some(v) => {
                slot.regs.rax = v & 0xffff_ffff;
                slot.regs.rdx = v >> 32;
                skip(slot)
            }
            None => inject(slot, 13, Some(0)),
        },
        // No MSR is writable yet (see msr.rs): #GP, as for an unknown MSR on hardware.
        ExitReason::MsrWrite => inject(slot, 13, Some(0)),
        ExitReason::VirtualizationInstruction => inject(slot, 6, None),
        ExitReason::Hypercall => {
            let (nr, a, b) = (slot.regs.rax, slot.regs.rdi, slot.regs.rsi);
            let next = skip(slot);
            if !matches!(next, Next::Continue) {
                return next;
            }
            match guest_abi::Hypercall::from_u64(nr) {
                Some(guest_abi::Hypercall::Exit) => Next::Finish(a),
                Some(guest_abi::Hypercall::Report) => {
                    slot.regs.rax = guest_abi::HYPERCALL_OK;
                    let (name, len) = guest_abi::tag_name(a);
                    println!("DOMAIN {id} REPORT {}={b:#x}", String::from_utf8_lossy(&name[..len]));
                    if d.reports.len() == REPORTS_KEPT {
                        d.reports.remove(0);
                    }
                    d.reports.push((a, b));
                    Next::Continue
                }
                Some(guest_abi::Hypercall::Yield) => {
                    slot.regs.rax = guest_abi::HYPERCALL_OK;
                    Next::Yield
                }
                Some(call) => Next::Dirty(call, a, b),
                None => {
                    slot.regs.rax = guest_abi::HYPERCALL_EINVAL;
                    Next::Continue
                }
            }
        }
        ExitReason::Hlt => match skip(slot) {
            Next::Continue => Next::Halt,
            other => other,
        },
        ExitReason::TimeSliceEnd => Next::Yield,
        ExitReason::PmlFull => match dirty::pml_full(d, pool, vi) {
            Ok(()) => Next::Continue,
            Err(e) => Next::Crash(alloc::format!("draining the PML buffer: {e}")),
        },
        ExitReason::NestedPageFault { gpa, write: true } if d.logs.iter().any(Option::is_some) => {
            match dirty::write_fault(d, pool, gpa) {
                Ok(true) => Next::Continue,
                Ok(false) => Next::Crash(alloc::format!(
                    "write of guest-physical {gpa:#x}, outside its {} MiB of memory, at RIP {:#x}",
                    d.memory_bytes >> 20,
                    exit.rip
                )),
                Err(e) => Next::Crash(alloc::format!("logging a write fault: {e}")),
            }
        }
        ExitReason::TripleFault => Next::Crash(alloc::format!("triple fault (last RIP {:#x})", exit.rip)),
        ExitReason::NestedPageFault { gpa, write } => Next::Crash(alloc::format!(
            "{} of guest-physical {gpa:#x}, outside its {} MiB of memory, at RIP {:#x}",
            if write { "write" } else { "read" },
            d.memory_bytes >> 20,
            exit.rip
        )),
        ExitReason::Exception { vector: 8 } => Next::Crash(alloc::format!("double fault at RIP {:#x}", exit.rip)),
        ExitReason::Exception { vector } => {
            Next::Crash(alloc::format!("unexpected exception {vector} exit at RIP {:#x}", exit.rip))
        }
        ExitReason::Other { code } => {
            Next::Crash(alloc::format!("exit {code:#x} that the hypervisor does not emulate, at RIP {:#x}", exit.rip))
        }
    }
}

/// The per-vCPU state CPUID answers depend on, as our guests start: APIC ID = the
/// vCPU index, CR4.OSXSAVE and PKE clear, APIC enabled, XCR0 = x87 only.
pub fn vcpu_state(index: u32) -> VcpuState {
    VcpuState { apic_id: index, cr4_osxsave: false, cr4_pke: false, apic_enabled: true, xcr0: 1, xss: 0 }
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

impl<B: Backend> crate::tasks::DomainOps for Machine<B> {
    fn create(&mut self, spec: &wire::DomainSpec) -> Result<u32, wire::ErrorReply> {
        let cfg = DomainConfig {
            name: spec.name.clone(),
            kernel: String::from("(uploaded)"),
            memory: spec.memory_bytes,
            vcpus: spec.vcpus,
            cpuid: spec.cpuid.clone(),
            cmdline: spec.cmdline.clone(),
        };
        config::validate(&cfg).map_err(|e| reply(wire::ErrorCode::Refused, e))?;
        if self.domains.iter().any(|d| d.name == cfg.name) {
            return Err(reply(wire::ErrorCode::Refused, alloc::format!("a domain named `{}` exists", cfg.name)));
        }
        Machine::create(self, &cfg, &spec.kernel).map_err(domain_reply)
    }

    fn list(&self) -> wire::DomainListReport {
        let hz = crate::time::tsc_hz().unwrap_or(1);
        wire::DomainListReport {
            domains: self
                .domains
                .iter()
                .map(|d| wire::DomainInfo {
                    id: d.id,
                    name: d.name.clone(),
                    state: alloc::format!("{}", d.state),
                    vcpus: d.vcpu_count,
                    memory_bytes: if d.mem.is_some() { d.memory_bytes } else { 0 },
                    exits: d.exits.iter().map(|(k, v)| (alloc::format!("{k}"), *v)).collect(),
                    runtime_ns: crate::time::ticks_to_ns(d.runtime_ticks, hz),
                })
                .collect(),
            free_frames: self.pool.free_frames() as u64,
            total_frames: self.pool.total_frames() as u64,
        }
    }

    fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), wire::ErrorReply> {
        Machine::set_paused(self, id, paused).map_err(domain_reply)
    }

    fn destroy(&mut self, id: u32) -> Result<(), wire::ErrorReply> {
        Machine::destroy(self, id).map_err(domain_reply)
    }

    fn counters(&self) -> Vec<crate::tasks::DomainCounters> {
        let hz = crate::time::tsc_hz().unwrap_or(1);
        self.domains
            .iter()
            .map(|d| crate::tasks::DomainCounters {
                id: d.id,
                vcpus: d.vcpu_count,
                exits: d.exits.iter().map(|(k, v)| (*k, *v)).collect(),
                runtime_ns: crate::time::ticks_to_ns(d.runtime_ticks, hz),
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
        (self.pool.total_frames() as u64, self.pool.free_frames() as u64)
    }
    fn set_rmids(&mut self, id: u32, rmids: Vec<u32>) {
        if let Some(d) = self.domains.iter_mut().find(|d| d.id == id) {
            for (slot, rmid) in d.vcpus.iter_mut().zip(rmids) {
                slot.rmid = rmid;
            }
        }
    }

    fn console(&self, id: u32, offset: u64) -> Result<wire::ConsoleChunk, wire::ErrorReply> {
        let d = self.domain(id).ok_or_else(|| domain_reply(DomainError::NoSuchDomain(id)))?;
        let (from, data) = d.console.since(offset);
        Ok(wire::ConsoleChunk { id, offset: from, data, total: d.console.bytes })
    }
}
