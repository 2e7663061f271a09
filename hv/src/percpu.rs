//! The state that belongs to one physical CPU, in one [`PerCpu`] value per CPU.
//!
//! What lives here is what differs between CPUs and would otherwise be a static that
//! silently assumes there is only one: the descriptor tables this CPU loaded, its
//! local APIC timer (base and calibration), its package (socket) ID, the VMCS that VMPTRLD made current on it,
//! the RMID its IA32_PQR_ASSOC holds, and SVM's host VMSAVE page. Every CPU runs the
//! shared scheduler (`domain::sched::Shared`); the others are started by [`crate::smp`]. Each CPU
//! calls [`install`] first: [`crate::init`] for the bootstrap CPU, `smp::ap_entry`
//! for an application processor.
//!
//! A CPU finds its own value through its GS base (IA32_GS_BASE, which the hypervisor
//! does not use otherwise): the first quadword of the value holds its own address, so
//! [`this`] is one `mov` from `gs:[0]`. Both backends keep the host's GS base across a
//! guest's run: VMX loads it from the VMCS host-state area at every exit (SDM Vol. 3C
//! 28.5.2, HOST_GS_BASE written from the live MSR), SVM restores it with VMLOAD of
//! the host save area before interrupts are enabled again (APM Vol. 2 15.5.2).
//!
//! Every field is immutable after [`install`] or an atomic (or a lock only its own
//! CPU takes), so another CPU (a future
//! `hvctl info` listing CPUs) may read a value while its owner changes it.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::drivers::lapic::HostLapic;
use crate::drivers::tables::TableBases;
use crate::platform::topology::CpuTopology as Topology;

/// IA32_GS_BASE (SDM Vol. 4 Table 2-2).
#[cfg(not(any(test, fuzzing)))]
const MSR_GS_BASE: u32 = 0xc000_0101;

/// One physical CPU's state.
#[repr(C)]
#[derive(Debug)]
pub struct PerCpu {
    /// This value's own address: `gs:[0]` (must stay the first field).
    own_address: u64,
    /// The order in which CPUs joined, 0 for the bootstrap CPU.
    pub index: u32,
    /// The CPU's initial APIC ID (CPUID leaf 1 EBX[31:24], SDM Vol. 2A CPUID).
    pub apic_id: u32,
    /// Its package (socket), from its own CPUID at [`install`].
    pub topology: Topology,
    /// The GDT, IDT and TSS this CPU loaded (the VMX host-state area names them).
    pub tables: TableBases,
    /// This CPU's local APIC timer.
    pub lapic: HostLapic,
    /// The VMCS VMPTRLD made current on this CPU (0: none); VMX only.
    current_vmcs: AtomicU64,
    /// The RMID this CPU's IA32_PQR_ASSOC holds (0: not monitored).
    current_rmid: AtomicU32,
    /// SVM only: the page VMSAVE keeps this CPU's host FS/GS/TR/LDTR and syscall MSRs
    /// in while a guest runs (0: SVM not enabled here), so a vCPU can run on any CPU.
    host_save_page: AtomicU64,
    /// What this CPU prints while it holds locks an exit path needs, written when it
    /// gives them up (`drivers::console::hold_output`). Only this CPU touches it.
    pub held_output: spin::Mutex<String>,
}

impl PerCpu {
    fn new(index: u32, apic_id: u32, tables: TableBases) -> Self {
        Self {
            own_address: 0,
            index,
            apic_id,
            topology: this_topology(),
            tables,
            lapic: HostLapic::new(),
            current_vmcs: AtomicU64::new(0),
            current_rmid: AtomicU32::new(0),
            host_save_page: AtomicU64::new(0),
            held_output: spin::Mutex::new(String::new()),
        }
    }

    /// The VMCS current on this CPU (0: none).
    pub fn current_vmcs(&self) -> u64 {
        self.current_vmcs.load(Ordering::Relaxed)
    }

    /// Record that VMPTRLD made `vmcs` current (0 after VMCLEAR of the current one).
    pub fn set_current_vmcs(&self, vmcs: u64) {
        self.current_vmcs.store(vmcs, Ordering::Relaxed);
    }

    /// Forget `vmcs` if it is the current one (it was VMCLEARed).
    pub fn clear_current_vmcs(&self, vmcs: u64) {
        let _ = self.current_vmcs.compare_exchange(vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// SVM: this CPU's host VMSAVE page (0: SVM was not enabled on it).
    pub fn host_save_page(&self) -> u64 {
        self.host_save_page.load(Ordering::Relaxed)
    }

    /// SVM: record the host VMSAVE page `enable` made on this CPU.
    pub fn set_host_save_page(&self, page: u64) {
        self.host_save_page.store(page, Ordering::Relaxed);
    }

    /// The RMID IA32_PQR_ASSOC holds on this CPU.
    pub fn current_rmid(&self) -> u32 {
        self.current_rmid.load(Ordering::Relaxed)
    }

    /// Record the RMID just written to IA32_PQR_ASSOC.
    pub fn set_current_rmid(&self, rmid: u32) {
        self.current_rmid.store(rmid, Ordering::Relaxed);
    }
}

/// Every CPU that called [`install`], in order.
static CPUS: spin::Mutex<Vec<&'static PerCpu>> = spin::Mutex::new(Vec::new());

/// Make a [`PerCpu`] for the CPU this runs on and point its GS base at it. Call once
/// per CPU, first thing after loading its descriptor tables and before anything that
/// calls [`this`] (the interrupt handler, the backends, the RMID switch).
pub fn install(tables: TableBases) -> &'static PerCpu {
    let mut cpus = CPUS.lock();
    let index = cpus.len() as u32;
    let cpu: &'static mut PerCpu = Box::leak(Box::new(PerCpu::new(index, initial_apic_id(), tables)));
    cpu.own_address = cpu as *const PerCpu as u64;
    set_gs_base(cpu.own_address);
    cpus.push(cpu);
    cpu
}

/// The CPUs that joined so far.
pub fn all() -> Vec<&'static PerCpu> {
    CPUS.lock().clone()
}

/// This CPU's state. [`install`] must have run on this CPU.
#[cfg(not(any(test, fuzzing)))]
pub fn this() -> &'static PerCpu {
    let address: u64;
    // SAFETY: `install` ran on this CPU first, so gs:[0] holds the address of a leaked
    // PerCpu (the backends restore the host GS base after a guest); it is only shared
    // immutably (its mutable fields are atomics).
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) address, options(nostack, readonly, preserves_flags));
        &*(address as *const PerCpu)
    }
}

/// Host tests and fuzzing have no GS base to use: each thread gets its own value.
#[cfg(any(test, fuzzing))]
pub fn this() -> &'static PerCpu {
    std::thread_local! {
        static CPU: &'static PerCpu = Box::leak(Box::new(PerCpu::new(0, 0, TableBases { gdt: 0, idt: 0, tss: 0 })));
    }
    CPU.with(|c| *c)
}

#[cfg(not(any(test, fuzzing)))]
fn set_gs_base(address: u64) {
    // SAFETY: IA32_GS_BASE exists in long mode; the hypervisor uses GS for nothing
    // but this pointer (no TLS, no SWAPGS), so nothing else depends on its value.
    unsafe { x86::msr::wrmsr(MSR_GS_BASE, address) };
}

#[cfg(any(test, fuzzing))]
fn set_gs_base(_: u64) {}

#[cfg(not(any(test, fuzzing)))]
fn initial_apic_id() -> u32 {
    // SDM Vol. 2A CPUID leaf 01H: EBX[31:24] is the initial APIC ID.
    raw_cpuid::CpuId::new().get_feature_info().map_or(0, |f| u32::from(f.initial_local_apic_id()))
}

#[cfg(any(test, fuzzing))]
fn initial_apic_id() -> u32 {
    0
}

#[cfg(not(any(test, fuzzing)))]
fn this_topology() -> Topology {
    Topology::this_cpu()
}

/// Host tests: one package, as a CPU without HTT reports it.
#[cfg(any(test, fuzzing))]
fn this_topology() -> Topology {
    Topology { apic_id: 0, package: 0, package_shift: 0, source: crate::platform::topology::Source::Single }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmcs_cache_forgets_only_the_cleared_vmcs() {
        let cpu = PerCpu::new(0, 0, TableBases { gdt: 0, idt: 0, tss: 0 });
        cpu.set_current_vmcs(0x1000);
        cpu.clear_current_vmcs(0x2000);
        assert_eq!(cpu.current_vmcs(), 0x1000, "another VMCS's VMCLEAR must not forget the current one");
        cpu.clear_current_vmcs(0x1000);
        assert_eq!(cpu.current_vmcs(), 0);
    }

    #[test]
    fn installed_cpus_are_numbered_in_order_and_listed() {
        let before = all().len() as u32;
        let cpu = install(TableBases { gdt: 1, idt: 2, tss: 3 });
        assert_eq!(cpu.index, before);
        assert_eq!(cpu.own_address, cpu as *const PerCpu as u64, "gs:[0] must hold the value's own address");
        assert!(all().iter().any(|c| core::ptr::eq(*c, cpu)));
    }
}
