//! Bringing up the other physical CPUs (issue 16, item 1): every application processor
//! (AP) the firmware reported is started with INIT-SIPI-SIPI, runs a real-mode
//! trampoline into long mode on the bootstrap CPU's page tables, loads its own GDT,
//! TSS and IDT and its [`crate::percpu::PerCpu`], reports itself started and parks in
//! a HLT loop with interrupts on, so an IPI ([`WAKE_VECTOR`]) can wake it later.
//!
//! Work reaches a parked AP as a [`Job`] in its [`CpuSlot`] ([`run_on`]: post it, wake
//! the AP with [`WAKE_VECTOR`], wait for its answer with a timeout). An AP keeps what
//! its jobs leave it ([`Kept`]) between jobs. The first job, at boot
//! (`init::virtualize_aps`), turns on VMX or SVM on the AP with its own VMXON region or
//! host save area from its own frames and runs the guest round trip there; an AP that
//! cannot is reported and counted as failed. Scheduling stays on the bootstrap CPU:
//! no vCPU runs on an AP yet.
//!
//! Not for: deciding what runs where (the scheduler's, later), or the guest's own
//! INIT/SIPI (`domain::platform`, `domain::sched`).
//!
//! The sequence (SDM Vol. 3A 9.4.4.1, "Typical BSP Initialization Sequence", and
//! 9.4.3 "MP Initialization Protocol Algorithm"), one AP at a time:
//! 1. boot reserved one page below 1 MiB ([`crate::BootInfo::ap_trampoline`]) while
//!    boot services ran; the trampoline code and its parameters (the AP's stack, the
//!    bootstrap CPU's CR0/CR3/CR4/EFER, [`ap_entry`]'s address) are copied there;
//! 2. INIT IPI, 10 ms, STARTUP IPI with vector = page number, 200 µs, a second
//!    STARTUP IPI (SDM Vol. 3A 9.4.4.1: "INIT-SIPI-SIPI");
//! 3. wait up to [`CHECK_IN_MS`] for the AP to set its slot to started; an AP that does
//!    not is reported by APIC ID (`SMP cpu apic=N failed to start: ...`), sent INIT
//!    again so it stays in wait-for-SIPI, and the others carry on.
//!
//! The serial marker after bring-up and the boot's jobs ([`print_summary`]): `SMP
//! cpus=N started=S failed=F` (the bootstrap CPU counts as started: `started` is how
//! many CPUs run, with virtualization on). Boot options: `smp=off` starts no AP;
//! `smp-fail-ap=APICID` (repeatable) sends that AP no IPI at all, so its check-in
//! times out the way a dead CPU's would; `smp-fail-virt=APICID` (repeatable) starts it
//! but makes its boot job refuse to turn on virtualization (the system tests use both).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::any::Any;
use core::sync::atomic::{AtomicU32, Ordering};

/// A CPU as the firmware reported it (UEFI MP services, before ExitBootServices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareCpu {
    /// Its local APIC ID.
    pub apic_id: u32,
    /// The firmware's bootstrap processor (the CPU running boot).
    pub bsp: bool,
    /// Enabled (a disabled CPU is listed but never started).
    pub enabled: bool,
}

/// How long an AP has after the second STARTUP IPI to check in.
pub const CHECK_IN_MS: u64 = 200;

/// The vector a parked AP is woken with (its handler only acknowledges it).
pub const WAKE_VECTOR: u8 = 0xee;

/// Bytes of stack each AP gets.
#[cfg(not(test))]
const AP_STACK_BYTES: usize = 64 * 1024;

/// Where a CPU is in its bring-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuState {
    /// The bootstrap CPU (runs everything).
    Boot,
    /// Not yet started (or being started).
    Pending,
    /// Checked in and parked (after boot: with VMX/SVM on and the guest round trip
    /// passed).
    Started,
    /// Did not check in in time, could not be started at all, or could not turn on
    /// virtualization or run a guest.
    Failed,
}

impl CpuState {
    const fn to_u32(self) -> u32 {
        match self {
            Self::Boot => 0,
            Self::Pending => 1,
            Self::Started => 2,
            Self::Failed => 3,
        }
    }

    const fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Boot,
            2 => Self::Started,
            3 => Self::Failed,
            _ => Self::Pending,
        }
    }

    /// The wire's name for this state.
    pub fn to_wire(self) -> wire::CpuState {
        match self {
            Self::Boot => wire::CpuState::Boot,
            Self::Started => wire::CpuState::Started,
            Self::Failed => wire::CpuState::Failed,
            // Only seen during bring-up, before any control request is served.
            Self::Pending => wire::CpuState::Failed,
        }
    }
}

/// What an AP keeps between jobs: whatever its jobs leave it (after boot, its backend
/// and its frames).
pub type Kept = Option<Box<dyn Any + Send>>;

/// Work for an AP. It runs on the AP with interrupts off and answers with a line for
/// the log, or why it failed.
pub type Job = Box<dyn FnOnce(&mut Kept) -> Result<String, String> + Send>;

/// One CPU's entry in the machine's CPU table: the APIC ID it should have and its
/// state, which the AP itself sets to started; and its mailbox for [`Job`]s.
pub struct CpuSlot {
    /// Its local APIC ID.
    pub apic_id: u32,
    state: AtomicU32,
    /// Its package (socket) ID, which the CPU decodes from its own CPUID when it
    /// starts ([`NO_PACKAGE`] until then).
    package: AtomicU32,
    /// The job posted to it and not yet taken.
    job: spin::Mutex<Option<Job>>,
    /// The answer to its last job, until [`run_on`] takes it.
    answer: spin::Mutex<Option<Result<String, String>>>,
}

impl core::fmt::Debug for CpuSlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuSlot").field("apic_id", &self.apic_id).field("state", &self.state()).finish()
    }
}

impl CpuSlot {
    fn new(apic_id: u32, state: CpuState) -> Self {
        Self {
            apic_id,
            state: AtomicU32::new(state.to_u32()),
            package: AtomicU32::new(NO_PACKAGE),
            job: spin::Mutex::new(None),
            answer: spin::Mutex::new(None),
        }
    }

    /// Mark it failed: it cannot run work (its job's error says why).
    pub fn fail(&self) {
        self.set(CpuState::Failed);
    }

    /// On the AP: run the posted job, if any, and leave its answer. Whether there was one.
    #[cfg_attr(test, allow(dead_code))]
    fn take_and_run(&self, kept: &mut Kept) -> bool {
        // Taken out first: the job runs without the mailbox's lock held.
        let Some(job) = self.job.lock().take() else { return false };
        let answer = job(kept);
        *self.answer.lock() = Some(answer);
        true
    }

    /// Where it is now.
    pub fn state(&self) -> CpuState {
        CpuState::from_u32(self.state.load(Ordering::Acquire))
    }

    fn set(&self, state: CpuState) {
        self.state.store(state.to_u32(), Ordering::Release);
    }

    /// Its package ID, once it has run far enough to decode it.
    pub fn package(&self) -> Option<u32> {
        Some(self.package.load(Ordering::Acquire)).filter(|p| *p != NO_PACKAGE)
    }

    #[cfg_attr(test, allow(dead_code))]
    fn set_package(&self, package: u32) {
        self.package.store(package, Ordering::Release);
    }
}

/// [`CpuSlot`]'s package before the CPU recorded one.
const NO_PACKAGE: u32 = u32::MAX;

/// On a started AP inside a job that does not end (its scheduler loop): run a job
/// posted to it since, if any (such as a monitoring MSR access for its socket).
/// Whether there was one.
pub fn run_posted(kept: &mut Kept) -> bool {
    let here = crate::percpu::this().apic_id;
    cpus().iter().find(|s| s.apic_id == here).is_some_and(|s| s.take_and_run(kept))
}

/// Every CPU the firmware reported (enabled ones), the bootstrap CPU first.
static SLOTS: spin::Once<&'static [CpuSlot]> = spin::Once::new();

/// The CPU table (empty before [`start_aps`] ran).
pub fn cpus() -> &'static [CpuSlot] {
    SLOTS.get().copied().unwrap_or(&[])
}

/// The boot options this module reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootOptions {
    /// `smp=off`: start no AP.
    pub off: bool,
    /// `smp-fail-ap=APICID`: send these APs no IPI (simulates CPUs that never start).
    pub fail: Vec<u32>,
    /// `smp-fail-virt=APICID`: these APs start but their boot job refuses to turn on
    /// virtualization (simulates a CPU without VMX/SVM, or one whose round trip fails).
    pub fail_virt: Vec<u32>,
    /// `smp-vcpus=parallel`: a domain's vCPUs may run at the same time on different
    /// CPUs (off by default: see README, SMP).
    pub parallel_vcpus: bool,
}

impl BootOptions {
    /// Parse the words of the command line; unknown words are someone else's.
    pub fn parse(cmdline: &str) -> Self {
        let mut o = Self::default();
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("smp", "off")) => o.off = true,
                Some(("smp-vcpus", "parallel")) => o.parallel_vcpus = true,
                Some(("smp-fail-ap", n)) => o.fail.extend(parse_number(n)),
                Some(("smp-fail-virt", n)) => o.fail_virt.extend(parse_number(n)),
                _ => {}
            }
        }
        o
    }
}

fn parse_number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The table to start from: the bootstrap CPU (by its APIC ID, whether or not the
/// firmware's list has it) first, then every enabled AP in the firmware's order.
pub fn plan(firmware: &[FirmwareCpu], bsp_apic_id: u32) -> Vec<(u32, CpuState)> {
    let mut out = alloc::vec![(bsp_apic_id, CpuState::Boot)];
    for c in firmware {
        if c.enabled && c.apic_id != bsp_apic_id && !out.iter().any(|(id, _)| *id == c.apic_id) {
            out.push((c.apic_id, CpuState::Pending));
        }
    }
    out
}

/// The marker line: `SMP cpus=N started=S failed=F`; `started` counts the boot CPU.
pub fn summary(states: &[CpuState]) -> String {
    let started = states.iter().filter(|s| matches!(s, CpuState::Boot | CpuState::Started)).count();
    let failed = states.iter().filter(|s| **s == CpuState::Failed).count();
    alloc::format!("SMP cpus={} started={started} failed={failed}", states.len())
}

/// Start every AP of `firmware` through the trampoline page at `trampoline` (physical,
/// below 1 MiB, page-aligned; `None`: boot could not reserve one), print each failure
/// and the `SMP` marker line. Call on the bootstrap CPU, after its [`crate::percpu`]
/// value is installed and the TSC is calibrated, with interrupts off.
pub fn start_aps(firmware: &[FirmwareCpu], trampoline: Option<u64>, cmdline: &str) {
    let options = BootOptions::parse(cmdline);
    let bsp = crate::percpu::this().apic_id;
    let plan = plan(firmware, bsp);
    let slots: &'static [CpuSlot] =
        Box::leak(plan.iter().map(|(id, state)| CpuSlot::new(*id, *state)).collect::<Vec<_>>().into_boxed_slice());
    SLOTS.call_once(|| slots);
    slots[0].set_package(crate::percpu::this().topology.package);
    let aps = &slots[1..];
    if firmware.is_empty() {
        crate::println!("SMP: the firmware reported no CPU list (no UEFI MP services); only the boot CPU runs");
    } else if options.off && !aps.is_empty() {
        // INIT puts each in wait-for-SIPI (SDM Vol. 3A 9.4.4.1), where it executes
        // nothing: the firmware may have left it spinning in a wait loop, which costs
        // a host core on an emulator and made one-CPU comparisons unfair.
        let stopped = aps.iter().filter(|ap| hw::stop(ap.apic_id).is_ok()).count();
        crate::println!(
            "SMP: smp=off: {} application processor(s) left stopped ({stopped} sent INIT: waiting for a start-up IPI)",
            aps.len()
        );
        for ap in aps {
            ap.set(CpuState::Failed);
        }
    } else if !aps.is_empty() {
        match hw::Starter::new(trampoline) {
            Ok(starter) => {
                for (index, ap) in aps.iter().enumerate() {
                    let simulated = options.fail.contains(&ap.apic_id);
                    match starter.start(index + 1, ap, simulated) {
                        Ok(()) => ap.set(CpuState::Started),
                        Err(why) => {
                            ap.set(CpuState::Failed);
                            crate::println!("SMP cpu apic={} failed to start: {why}", ap.apic_id);
                        }
                    }
                }
            }
            Err(why) => {
                for ap in aps {
                    ap.set(CpuState::Failed);
                    crate::println!("SMP cpu apic={} failed to start: {why}", ap.apic_id);
                }
            }
        }
    }
}

/// Print the `SMP` marker line for the table as it stands (after [`start_aps`] and the
/// boot's jobs on the APs).
pub fn print_summary() {
    let states: Vec<CpuState> = cpus().iter().map(CpuSlot::state).collect();
    crate::println!("{}", summary(&states));
}

/// Hand `job` to the started AP of `slot` and wait up to `timeout_ms` for its answer.
/// Call on the bootstrap CPU, one job per AP at a time. A timeout leaves the job to
/// the AP (it may still run it): the caller reports the CPU as failed.
pub fn run_on(slot: &CpuSlot, job: Job, timeout_ms: u64) -> Result<String, String> {
    if slot.state() != CpuState::Started {
        return Err(alloc::format!("it is {:?}, not started", slot.state()));
    }
    slot.answer.lock().take();
    *slot.job.lock() = Some(job);
    hw::wake(slot.apic_id)?;
    let deadline = crate::drivers::time::ms_to_ticks(timeout_ms).unwrap_or(u64::MAX);
    let start = crate::drivers::time::now_ticks();
    loop {
        if let Some(answer) = slot.answer.lock().take() {
            return answer;
        }
        if crate::drivers::time::now_ticks().wrapping_sub(start) > deadline {
            return Err(alloc::format!("it did not answer within {timeout_ms} ms"));
        }
        core::hint::spin_loop();
    }
}

/// Hand `job` to the started AP of `slot` without waiting for an answer (a job that
/// never ends, such as the AP's scheduler loop). Call on the bootstrap CPU.
pub fn post(slot: &CpuSlot, job: Job) -> Result<(), String> {
    if slot.state() != CpuState::Started {
        return Err(alloc::format!("it is {:?}, not started", slot.state()));
    }
    *slot.job.lock() = Some(job);
    hw::wake(slot.apic_id)
}

/// Where a started AP's Rust life begins (the trampoline calls it on its own stack in
/// 64-bit mode, interrupts off): its own tables and PerCpu, check in, park.
#[cfg(not(test))]
extern "sysv64" fn ap_entry(slot: u64) -> ! {
    let tables = crate::drivers::tables::load();
    let cpu = crate::percpu::install(tables);
    cpu.lapic.enable_for_ipis();
    if let Some(s) = cpus().get(slot as usize)
        && s.apic_id == cpu.apic_id
    {
        s.set_package(cpu.topology.package);
        s.set(CpuState::Started);
    }
    // An AP whose APIC ID does not match its slot never checks in: the BSP reports
    // the slot as failed after its timeout, and this CPU still parks harmlessly.
    let mine = cpus().get(slot as usize).filter(|s| s.apic_id == cpu.apic_id);
    let mut kept: Kept = None;
    loop {
        // A job posted before the wake-up IPI is seen here; one posted after this check
        // comes with an IPI that ends the HLT below (it waits in the IRR until STI).
        if mine.is_some_and(|s| s.take_and_run(&mut kept)) {
            continue;
        }
        // STI's shadow covers HLT (SDM Vol. 2B STI): an IPI that arrives between the
        // two still wakes it. The interrupt stub acknowledges every vector from 32 up.
        // SAFETY: this CPU's IDT (loaded above) has a handler for every vector; the
        // handlers only touch this CPU's PerCpu (installed above) and its LAPIC.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

#[cfg(not(test))]
mod hw {
    //! The hardware half: the trampoline, its parameters, the IPIs.

    use super::{AP_STACK_BYTES, CHECK_IN_MS, CpuSlot, CpuState};
    use crate::drivers::{lapic, time};
    use alloc::boxed::Box;
    use alloc::string::String;

    /// Where in the trampoline page the parameters live (the code is smaller).
    const PARAMS: usize = 0xe00;
    // Offsets inside the parameter block (see `Params`).
    const P_GDT_PTR: usize = 0x00;
    const P_FAR32: usize = 0x10;
    const P_FAR64: usize = 0x18;
    const P_CR3: usize = 0x20;
    const P_EFER: usize = 0x28;
    const P_CR0: usize = 0x30;
    const P_CR4: usize = 0x38;
    const P_STACK: usize = 0x40;
    const P_SLOT: usize = 0x48;
    const P_ENTRY: usize = 0x50;
    const P_GDT: usize = 0x80;

    /// The temporary GDT's selectors (SDM Vol. 3A 3.4.5 descriptors).
    const SEL_CODE32: u16 = 0x08;
    const SEL_CODE64: u16 = 0x18;
    const GDT: [u64; 4] = [
        0,
        0x00cf_9a00_0000_ffff, // 0x08: 32-bit code, base 0, 4 GiB
        0x00cf_9200_0000_ffff, // 0x10: data, base 0, 4 GiB
        0x00af_9a00_0000_ffff, // 0x18: 64-bit code (L=1)
    ];

    const EFER: u32 = 0xc000_0080;
    const EFER_SCE: u64 = 1 << 0;
    const EFER_LME: u64 = 1 << 8;
    const EFER_NXE: u64 = 1 << 11;
    const CR4_VMXE: u64 = 1 << 13;

    unsafe extern "C" {
        static hv_ap_trampoline_start: u8;
        static hv_ap_trampoline_32: u8;
        static hv_ap_trampoline_64: u8;
        static hv_ap_trampoline_end: u8;
    }

    // The trampoline, copied to a page P below 1 MiB; a STARTUP IPI with vector P>>12
    // starts the AP in real mode at CS:IP = (P>>4):0 (SDM Vol. 3A 9.4.4.2, 11.6.1).
    // 16-bit: load the temporary GDT, set CR0.PE, far jump to 32-bit code (SDM Vol. 3A
    // 10.9.1 "Switching to Protected Mode"). 32-bit: CR4.PAE, CR3 = the bootstrap
    // CPU's PML4, EFER.LME (and NXE, which its page tables may use), then CR0 with PG
    // (SDM Vol. 3A 10.8.5 "Initializing IA-32e Mode": IA32_EFER.LMA becomes 1), far
    // jump to the 64-bit code segment. 64-bit: the full CR4, this AP's stack, call
    // `ap_entry(slot)`. EBX holds P's linear address throughout; every parameter is
    // read relative to it, so the code is position-independent.
    core::arch::global_asm!(
        ".balign 16",
        ".global hv_ap_trampoline_start",
        "hv_ap_trampoline_start:",
        ".code16",
        "cli",
        "cld",
        "mov %cs, %ax",
        "mov %ax, %ds",
        "movzwl %ax, %ebx",
        "shll $4, %ebx",
        "lgdtl {params}+{gdt_ptr}",
        "mov %cr0, %eax",
        "orl $1, %eax",
        "mov %eax, %cr0",
        "ljmpl *{params}+{far32}",
        ".code32",
        ".global hv_ap_trampoline_32",
        "hv_ap_trampoline_32:",
        "mov $0x10, %ax",
        "mov %ax, %ds",
        "mov %ax, %es",
        "mov %ax, %ss",
        "mov %ax, %fs",
        "mov %ax, %gs",
        "mov %cr4, %eax",
        "orl $0x20, %eax",
        "mov %eax, %cr4",
        "movl {params}+{cr3}(%ebx), %eax",
        "mov %eax, %cr3",
        "mov $0xc0000080, %ecx",
        "rdmsr",
        "orl {params}+{efer}(%ebx), %eax",
        "wrmsr",
        "movl {params}+{cr0}(%ebx), %eax",
        "mov %eax, %cr0",
        "ljmpl *{params}+{far64}(%ebx)",
        ".code64",
        ".global hv_ap_trampoline_64",
        "hv_ap_trampoline_64:",
        "movl %ebx, %ebx",
        "movq {params}+{cr4}(%rbx), %rax",
        "mov %rax, %cr4",
        "movq {params}+{stack}(%rbx), %rsp",
        "movq {params}+{slot}(%rbx), %rdi",
        "movq {params}+{entry}(%rbx), %rax",
        "call *%rax",
        "ud2",
        ".global hv_ap_trampoline_end",
        "hv_ap_trampoline_end:",
        params = const PARAMS,
        gdt_ptr = const P_GDT_PTR,
        far32 = const P_FAR32,
        far64 = const P_FAR64,
        cr3 = const P_CR3,
        efer = const P_EFER,
        cr0 = const P_CR0,
        cr4 = const P_CR4,
        stack = const P_STACK,
        slot = const P_SLOT,
        entry = const P_ENTRY,
        options(att_syntax),
    );

    /// The trampoline page, checked and filled with the code.
    pub(super) struct Starter {
        page: u64,
    }

    impl Starter {
        pub(super) fn new(trampoline: Option<u64>) -> Result<Self, &'static str> {
            let page = trampoline.ok_or("boot could not reserve a trampoline page below 1 MiB")?;
            if page >= 0x10_0000 || page & 0xfff != 0 {
                return Err("the trampoline page is not a page below 1 MiB");
            }
            if time::tsc_hz().is_none() {
                return Err("the TSC is not calibrated, so there is no timeout for the check-in");
            }
            // SAFETY: reading CR3 has no side effects.
            let cr3 = unsafe { x86::controlregs::cr3() };
            if cr3 >= 1 << 32 {
                return Err("the boot CPU's page tables lie above 4 GiB, out of a 32-bit MOV to CR3's reach");
            }
            // The labels of the global_asm block above, in order.
            let start = &raw const hv_ap_trampoline_start as u64;
            let code32 = &raw const hv_ap_trampoline_32 as u64;
            let code64 = &raw const hv_ap_trampoline_64 as u64;
            let end = &raw const hv_ap_trampoline_end as u64;
            let len = (end - start) as usize;
            assert!(len <= PARAMS, "the AP trampoline overlaps its parameters");
            // SAFETY: boot reserved this page (LOADER_CODE, so executable in the
            // firmware's identity map) for us alone; the source is our own code.
            unsafe { core::ptr::copy_nonoverlapping(start as *const u8, page as *mut u8, len) };
            let s = Self { page };
            // SAFETY: reading CR0, CR4 and IA32_EFER at CPL0 has no side effects.
            let (cr0, cr4, efer) = unsafe {
                (x86::controlregs::cr0().bits() as u64, x86::controlregs::cr4().bits() as u64, x86::msr::rdmsr(EFER))
            };
            for (i, entry) in GDT.iter().enumerate() {
                s.put(P_GDT + 8 * i, *entry);
            }
            let gdt_base = page + (PARAMS + P_GDT) as u64;
            s.put(P_GDT_PTR, ((GDT.len() * 8 - 1) as u64) | (gdt_base << 16));
            s.put(P_FAR32, (page + (code32 - start)) | (u64::from(SEL_CODE32) << 32));
            s.put(P_FAR64, (page + (code64 - start)) | (u64::from(SEL_CODE64) << 32));
            s.put(P_CR3, cr3);
            s.put(P_EFER, EFER_LME | (efer & (EFER_NXE | EFER_SCE)));
            s.put(P_CR0, cr0 & 0xffff_ffff);
            s.put(P_CR4, cr4 & !CR4_VMXE);
            s.put(P_ENTRY, super::ap_entry as extern "sysv64" fn(u64) -> ! as usize as u64);
            Ok(s)
        }

        fn put(&self, offset: usize, value: u64) {
            // SAFETY: offset < 0x1000 - 8 inside the reserved trampoline page.
            unsafe { core::ptr::write_volatile((self.page + (PARAMS + offset) as u64) as *mut u64, value) };
        }

        /// Start one AP into `slot` and wait for its check-in.
        pub(super) fn start(&self, slot: usize, ap: &CpuSlot, simulated_failure: bool) -> Result<(), &'static str> {
            let stack: &'static mut [u8] = Box::leak(alloc::vec![0u8; AP_STACK_BYTES].into_boxed_slice());
            let top = (stack.as_ptr() as u64 + AP_STACK_BYTES as u64) & !0xf;
            self.put(P_STACK, top);
            self.put(P_SLOT, slot as u64);
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            if !simulated_failure {
                let vector = (self.page >> 12) as u8;
                // SDM Vol. 3A 9.4.4.1: INIT IPI, wait 10 ms, STARTUP IPI, wait 200 µs,
                // STARTUP IPI (the second one in case the first was lost).
                lapic::send_init(ap.apic_id)?;
                wait_us(10_000);
                lapic::send_startup(ap.apic_id, vector)?;
                wait_us(200);
                if ap.state() != CpuState::Started {
                    lapic::send_startup(ap.apic_id, vector)?;
                }
            }
            let limit = time::ms_to_ticks(CHECK_IN_MS).unwrap_or(0);
            let begin = time::now_ticks();
            while ap.state() != CpuState::Started {
                if time::now_ticks().wrapping_sub(begin) > limit {
                    // Back to wait-for-SIPI, so a late AP cannot run the trampoline
                    // with the next AP's parameters.
                    if !simulated_failure {
                        let _ = lapic::send_init(ap.apic_id);
                    }
                    return Err("no check-in after 200 ms");
                }
                core::hint::spin_loop();
            }
            Ok(())
        }
    }

    /// Wake the parked AP `apic_id` (its HLT ends; it looks at its mailbox).
    pub(super) fn wake(apic_id: u32) -> Result<(), String> {
        lapic::send_fixed(apic_id, super::WAKE_VECTOR).map_err(String::from)
    }

    /// Put the AP `apic_id` in wait-for-SIPI (an INIT IPI).
    pub(super) fn stop(apic_id: u32) -> Result<(), &'static str> {
        lapic::send_init(apic_id)
    }

    fn wait_us(us: u64) {
        let ticks = time::ms_to_ticks(1).map_or(0, |per_ms| per_ms * us / 1000);
        let begin = time::now_ticks();
        while time::now_ticks().wrapping_sub(begin) < ticks {
            core::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod hw {
    use super::CpuSlot;
    use alloc::string::String;

    pub(super) struct Starter;

    pub(super) fn wake(_: u32) -> Result<(), String> {
        Err("no hardware in host tests".into())
    }

    pub(super) fn stop(_: u32) -> Result<(), &'static str> {
        Err("no hardware in host tests")
    }

    impl Starter {
        pub(super) fn new(_: Option<u64>) -> Result<Self, &'static str> {
            Err("no hardware in host tests")
        }

        pub(super) fn start(&self, _: usize, _: &CpuSlot, _: bool) -> Result<(), &'static str> {
            Err("no hardware in host tests")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_off_and_repeated_failures() {
        assert_eq!(BootOptions::parse(""), BootOptions::default());
        let o = BootOptions::parse("hv.serial=off smp-fail-ap=1 smp-fail-ap=0x3 smp-fail-ap=x smp-fail-virt=2");
        assert_eq!(
            o,
            BootOptions { off: false, fail: alloc::vec![1, 3], fail_virt: alloc::vec![2], parallel_vcpus: false }
        );
        assert!(BootOptions::parse("smp=off").off);
        assert!(BootOptions::parse("smp-vcpus=parallel").parallel_vcpus);
    }

    #[test]
    fn the_plan_puts_the_boot_cpu_first_and_skips_disabled_and_duplicate_cpus() {
        let c = |apic_id, bsp, enabled| FirmwareCpu { apic_id, bsp, enabled };
        let firmware = [c(2, false, true), c(0, true, true), c(5, false, false), c(2, false, true), c(1, false, true)];
        assert_eq!(plan(&firmware, 0), [(0, CpuState::Boot), (2, CpuState::Pending), (1, CpuState::Pending)]);
        assert_eq!(plan(&[], 7), [(7, CpuState::Boot)]);
    }

    #[test]
    fn the_summary_counts_started_and_failed_aps() {
        use CpuState::*;
        assert_eq!(summary(&[Boot, Started, Failed, Started]), "SMP cpus=4 started=3 failed=1");
        assert_eq!(summary(&[Boot]), "SMP cpus=1 started=1 failed=0");
    }

    #[test]
    fn states_survive_their_atomic_encoding() {
        for s in [CpuState::Boot, CpuState::Pending, CpuState::Started, CpuState::Failed] {
            assert_eq!(CpuState::from_u32(s.to_u32()), s);
        }
    }
}
