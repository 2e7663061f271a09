//! Intel VMX backend (SDM Vol. 3C chapters 24-29): enter VMX operation, build a VMCS
//! for a 64-bit guest under EPT, launch it and decode VM exits into the arch-neutral
//! exit.
//!
//! Guest MSR state and how it is switched (every RDMSR/WRMSR exits: no MSR bitmap):
//! - EFER: VMCS guest field with "load IA32_EFER" on entry and "save/load IA32_EFER"
//!   on exit (25.7.1, 25.8.1).
//! - FS/GS base, SYSENTER_CS/ESP/EIP: VMCS guest-state fields, always loaded on entry
//!   and saved on exit (25.4.1, 27.3.2.1, 28.3.2); the host's come from the host-state
//!   fields (28.5.1).
//! - STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX and PAT: no (used) VMCS field.
//!   One page per vCPU holds the VM-entry MSR-load list, which is also the VM-exit
//!   MSR-store list (25.8.2, 25.7.2: the guest's values are loaded at entry and stored
//!   at exit, so SWAPGS's changes to KERNEL_GS_BASE are kept), and in its upper half
//!   the VM-exit MSR-load list with the host's values (28.6).
//! - The TSC: "use TSC offsetting" and the TSC offset field (26.6.5); RDTSCP and
//!   INVPCID are enabled where the CPU allows (secondary controls 3 and 12), since the
//!   policy offers them.
//! - x87/SSE/AVX state and XCR0: [`super::fpu`], around VM entry; XSETBV always exits
//!   (exit reason 55, 26.1.2).

pub mod vmcs;

use core::arch::global_asm;

use self::vmcs::Field;

use super::fpu::{GuestFpu, HostFpu};
use super::state::{self, DescriptorTable, PendingEvent, SegmentRegister, VcpuSnapshot};
use super::{
    ArchError, Backend, ControlState, Exit, ExitReason, GuestEntry, GuestMsr, GuestRegs, PagingState, SegmentBases,
    Vcpu,
};
use crate::drivers::tables::{CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::nested::Ept;
use crate::platform::caps::{Capabilities, MSR_IA32_FEATURE_CONTROL, Virtualization, VmxCaps};

pub use self::vmcs::instruction_error_text;

const MSR_IA32_VMX_CR0_FIXED0: u32 = 0x486;
const MSR_IA32_VMX_CR0_FIXED1: u32 = 0x487;
const MSR_IA32_VMX_CR4_FIXED0: u32 = 0x488;
const MSR_IA32_VMX_CR4_FIXED1: u32 = 0x489;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const CR4_VMXE: u64 = 1 << 13;
/// CR0.PE and CR0.PG (SDM Vol. 3A 2.5).
const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;
/// VM-entry control bit 9: IA-32e mode guest (25.8.1); must equal the guest's EFER.LMA
/// (27.3.1.1).
const ENTRY_IA32E_MODE_GUEST: u64 = 1 << 9;
/// Power-on IA32_PAT (SDM Vol. 3A 13.12.4).
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// A guest segment register's four VMCS fields: selector, base, limit, access rights.
type SegmentFields = (Field, Field, Field, Field);
const CS: SegmentFields = (vmcs::GUEST_CS_SELECTOR, vmcs::GUEST_CS_BASE, vmcs::GUEST_CS_LIMIT, vmcs::GUEST_CS_AR);
const DS: SegmentFields = (vmcs::GUEST_DS_SELECTOR, vmcs::GUEST_DS_BASE, vmcs::GUEST_DS_LIMIT, vmcs::GUEST_DS_AR);
const ES: SegmentFields = (vmcs::GUEST_ES_SELECTOR, vmcs::GUEST_ES_BASE, vmcs::GUEST_ES_LIMIT, vmcs::GUEST_ES_AR);
const FS: SegmentFields = (vmcs::GUEST_FS_SELECTOR, vmcs::GUEST_FS_BASE, vmcs::GUEST_FS_LIMIT, vmcs::GUEST_FS_AR);
const GS: SegmentFields = (vmcs::GUEST_GS_SELECTOR, vmcs::GUEST_GS_BASE, vmcs::GUEST_GS_LIMIT, vmcs::GUEST_GS_AR);
const SS: SegmentFields = (vmcs::GUEST_SS_SELECTOR, vmcs::GUEST_SS_BASE, vmcs::GUEST_SS_LIMIT, vmcs::GUEST_SS_AR);
const TR: SegmentFields = (vmcs::GUEST_TR_SELECTOR, vmcs::GUEST_TR_BASE, vmcs::GUEST_TR_LIMIT, vmcs::GUEST_TR_AR);
const LDTR: SegmentFields =
    (vmcs::GUEST_LDTR_SELECTOR, vmcs::GUEST_LDTR_BASE, vmcs::GUEST_LDTR_LIMIT, vmcs::GUEST_LDTR_AR);

/// VMX on this physical CPU: the VMXON region.
#[derive(Debug)]
pub struct Vmx {
    caps: VmxCaps,
    fpu: HostFpu,
    /// Kept for the life of VMX operation.
    _vmxon: u64,
    /// IA32_VMX_MISC[4:0]: the preemption timer counts every 2^shift TSC ticks.
    preemption_shift: u32,
}

/// One VMX vCPU: its VMCS.
#[derive(Debug)]
pub struct VmxVcpu {
    vmcs: u64,
    /// The launch state (SDM Vol. 3C 25.11.3): VMRESUME once launched, VMLAUNCH after
    /// creation or a VMCLEAR.
    launched: bool,
    /// The APIC ID of the CPU this VMCS is active on (VMPTRLDed there and not VMCLEARed
    /// since), if any. At most one CPU (25.11.1): `leave_cpu` clears it before the
    /// domain's lock goes, so the next CPU to take the domain finds it inactive.
    active_on: Option<u32>,
    /// The CPU whose host state (GDT, IDT, TSS, GS base) the VMCS's host-state area
    /// holds: VM exits land on that CPU's tables, so another CPU rewrites them first.
    host_state_of: u32,
    /// INVEPT before the next entry: the VMCS was made active on this CPU again (the
    /// EPT may have changed while it was inactive, and this CPU's TLB may hold
    /// translations from an earlier run here; INVEPT acts on one CPU only, SDM Vol. 3C
    /// 29.4.3.4).
    flush_before_entry: bool,
    preemption: Option<u32>,
    /// The EPTP, for INVEPT.
    eptp: u64,
    /// INVEPT type: 2 (all-context) or 1 (single-context), per IA32_VMX_EPT_VPID_CAP.
    invept_type: u64,
    /// The page-modification log frame, while logging.
    pml: Option<u64>,
    pml_allowed: bool,
    /// Whether the CPU allows interrupt-window exiting (primary control bit 2).
    interrupt_window_allowed: bool,
    /// Whether "unrestricted guest" is on (secondary control bit 7, set in
    /// `configure` where the CPU has it): the guest may run with CR0.PE or CR0.PG clear.
    unrestricted: bool,
    /// The guest's CR2 and DR6: not in the VMCS (VM entries and exits neither load nor
    /// save them, SDM 27.3.2 / 28.3), so `run` switches the physical registers.
    cr2: u64,
    dr6: u64,
    /// The page of MSR lists (see the module documentation and [`MsrArea`]).
    msr_area: u64,
    /// How many MSRs the lists hold ([`AREA_MSRS`], without TSC_AUX on a CPU without RDTSCP).
    msr_count: usize,
    tsc_offset: u64,
    fpu: GuestFpu,
    /// The read-only exit-information fields describe this vCPU's last exit (false
    /// before the first exit and after `load_state`).
    exit_info_valid: bool,
}

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_PAT: u32 = 0x277;
const MSR_TSC_AUX: u32 = 0xc000_0103;

/// The MSRs switched through the VM-entry/VM-exit MSR lists, in list order, with the
/// guest's value after reset. TSC_AUX is last so a CPU without RDTSCP (where loading
/// it would fail the entry, 27.4) simply lists one fewer.
const AREA_MSRS: [(u32, u64); 7] = [
    (MSR_PAT, PAT_DEFAULT),
    (MSR_STAR, 0),
    (MSR_LSTAR, 0),
    (MSR_CSTAR, 0),
    (MSR_SFMASK, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_TSC_AUX, 0),
];
/// Byte offset of the VM-exit MSR-load list (the host's values) in the page.
const HOST_LIST: usize = 2048;

/// The page of MSR lists: entries of 16 bytes, MSR index in bits 31:0, value in bytes
/// 8-15 (SDM Vol. 3C 25.7.2, Table 25-15).
#[derive(Debug)]
struct MsrArea<'a>(&'a mut [u8; 4096]);

impl MsrArea<'_> {
    fn set_entry(&mut self, at: usize, msr: u32, value: u64) {
        self.0[at..at + 4].copy_from_slice(&msr.to_le_bytes());
        self.0[at + 4..at + 8].fill(0);
        self.0[at + 8..at + 16].copy_from_slice(&value.to_le_bytes());
    }
    fn slot(msr: u32) -> Option<usize> {
        AREA_MSRS.iter().position(|(m, _)| *m == msr).map(|i| i * 16)
    }
    fn guest(&self, msr: u32) -> Option<u64> {
        let at = Self::slot(msr)?;
        let mut v = [0u8; 8];
        v.copy_from_slice(&self.0[at + 8..at + 16]);
        Some(u64::from_le_bytes(v))
    }
    fn set_guest(&mut self, msr: u32, value: u64) -> Option<()> {
        let at = Self::slot(msr)?;
        self.0[at + 8..at + 16].copy_from_slice(&value.to_le_bytes());
        Some(())
    }
}

/// PML buffer entries (SDM 29.3.6).
const PML_ENTRIES: u64 = 512;

const MSR_IA32_VMX_MISC: u32 = 0x485;

/// Compute a control value: `want` plus the must-be-one bits, failing if a bit we
/// need is not allowed (SDM Vol. 3D A.3-A.5: low 32 bits of the capability MSR are
/// the allowed 0-settings, high 32 bits the allowed 1-settings).
pub fn adjust_controls(control: &'static str, want: u32, capability: u64) -> Result<u32, ArchError> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let missing = want & !may_be_one;
    if missing != 0 {
        return Err(ArchError::ControlUnsupported { control, missing });
    }
    Ok(want | must_be_one)
}

impl Backend for Vmx {
    type Paging = Ept;
    type Vcpu = VmxVcpu;
    const NAME: &'static str = "vmx";
    const ARCH: guest_abi::Arch = guest_abi::Arch::Vmx;
    /// VMCALL: 0F 01 C1 (SDM Vol. 2B).
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
    const VCPU_ON_ANY_CPU: bool = true;

    fn enable(caps: &Capabilities, pool: &mut FramePool) -> Result<Self, ArchError> {
        let Virtualization::Vmx(vmx) = caps.virtualization else {
            return Err(ArchError::Unsupported("VMX backend on a CPU without VMX"));
        };
        // Before anything reads CR4 for the VMCS host state (CR4.OSXSAVE, OSFXSR).
        let fpu = HostFpu::enable();
        let vmxon = pool.alloc_zeroed()?;
        // SDM Vol. 3C 25.11.5: the VMXON region starts with the VMCS revision id.
        pool.bytes_mut(vmxon)?[..4].copy_from_slice(&vmx.vmcs_revision.to_le_bytes());

        // 24.7: if firmware left IA32_FEATURE_CONTROL unlocked (OVMF under Bochs does), enable VMX outside SMX (bit
        // 2) and lock (bit 0); the probe refused the locked and disabled case. 24.8: CR0 and CR4 must satisfy the
        // FIXED0/FIXED1 MSRs in VMX operation, and CR4.VMXE must be 1. Changing them keeps the identity map (PG, PE,
        // PAE stay set: they are in FIXED0).
        // SAFETY: these MSRs exist when CPUID.1:ECX.VMX = 1 (the probe saw it).
        let misc = unsafe {
            if !vmx.feature_control.locked {
                let fc = x86::msr::rdmsr(MSR_IA32_FEATURE_CONTROL);
                x86::msr::wrmsr(MSR_IA32_FEATURE_CONTROL, fc | 0b101);
            }
            let cr0 = x86::controlregs::cr0().bits() as u64;
            let cr0 = (cr0 | x86::msr::rdmsr(MSR_IA32_VMX_CR0_FIXED0)) & x86::msr::rdmsr(MSR_IA32_VMX_CR0_FIXED1);
            x86::controlregs::cr0_write(x86::controlregs::Cr0::from_bits_truncate(cr0 as usize));
            let cr4 = x86::controlregs::cr4().bits() as u64 | CR4_VMXE;
            let cr4 = (cr4 | x86::msr::rdmsr(MSR_IA32_VMX_CR4_FIXED0)) & x86::msr::rdmsr(MSR_IA32_VMX_CR4_FIXED1);
            x86::controlregs::cr4_write(x86::controlregs::Cr4::from_bits_truncate(cr4 as usize));
            x86::msr::rdmsr(MSR_IA32_VMX_MISC)
        };
        // SAFETY: 24.11.5: VMXON with a 4 KiB aligned region carrying the revision id,
        // with CR0/CR4 fixed bits satisfied and feature control enabled (above).
        unsafe { x86::bits64::vmx::vmxon(vmxon) }.map_err(|f| vmcs::fail("VMXON", f))?;
        Ok(Self { caps: vmx, fpu, _vmxon: vmxon, preemption_shift: (misc & 0x1f) as u32 })
    }

    fn create_vcpu(&mut self, pool: &mut FramePool, entry: &GuestEntry) -> Result<VmxVcpu, ArchError> {
        let vmcs = pool.alloc_zeroed()?;
        pool.bytes_mut(vmcs)?[..4].copy_from_slice(&self.caps.vmcs_revision.to_le_bytes());
        // The MSR lists: the guest's reset values, and the host's current ones (which it
        // never changes) to load back at every exit. TSC_AUX only where RDTSCP exists.
        let msr_area = pool.alloc_zeroed()?;
        let rdtscp = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 27) != 0;
        let msr_count = if rdtscp { AREA_MSRS.len() } else { AREA_MSRS.len() - 1 };
        {
            let mut area = MsrArea(pool.bytes_mut(msr_area)?);
            for (i, &(msr, reset)) in AREA_MSRS.iter().take(msr_count).enumerate() {
                // SAFETY: each of these MSRs exists on a 64-bit VMX CPU (TSC_AUX only
                // when RDTSCP does, checked above); reading has no side effects.
                let host = unsafe { x86::msr::rdmsr(msr) };
                area.set_entry(i * 16, msr, reset);
                area.set_entry(HOST_LIST + i * 16, msr, host);
            }
        }
        // SAFETY: 25.11.3: VMCLEAR initialises the VMCS region we own; VMPTRLD makes it
        // current. Both take its physical address.
        unsafe { x86::bits64::vmx::vmclear(vmcs) }.map_err(|f| vmcs::fail("VMCLEAR", f))?;
        let c = &self.caps;
        let mut vcpu = VmxVcpu {
            vmcs,
            launched: false,
            active_on: None,
            host_state_of: crate::percpu::this().apic_id,
            flush_before_entry: true,
            preemption: c.preemption_timer.then_some(self.preemption_shift),
            eptp: 0,
            // EPT_VPID_CAP bit 26: all-context INVEPT; bit 25: single-context.
            invept_type: if c.ept_vpid_cap & (1 << 26) != 0 { 2 } else { 1 },
            pml: None,
            pml_allowed: c.pml,
            // The control MSR's high half: the controls that may be 1 (A.3.2).
            interrupt_window_allowed: (c.procbased >> 32) & (1 << 2) != 0,
            unrestricted: c.unrestricted_guest,
            cr2: 0,
            // DR6's value after reset (SDM Vol. 3B 19.2.3), as `configure` leaves the guest.
            dr6: 0xffff_0ff0,
            msr_area,
            msr_count,
            tsc_offset: 0,
            fpu: GuestFpu::new(&self.fpu),
            exit_info_valid: false,
        };
        vcpu.make_current()?;
        vcpu.eptp = self.configure(entry, msr_area, msr_count as u64)?;
        // Inactive until its first run, which may be on any CPU.
        vcpu.leave_cpu()?;
        Ok(vcpu)
    }
}

impl Vmx {
    /// Write the whole VMCS for a vCPU starting at `entry` with its MSR lists in the
    /// page `msr_area` (`msr_count` entries); returns the EPTP.
    fn configure(&self, entry: &GuestEntry, msr_area: u64, msr_count: u64) -> Result<u64, ArchError> {
        let c = &self.caps;
        // 25.6.1-25.6.2, 25.7.1, 25.8.1. Pin: external-interrupt exiting (0), so a
        // host interrupt (another CPU's kick IPI, this CPU's LAPIC timer) makes the
        // guest exit instead of going through the guest's IDT (25.2); activate the
        // VMX-preemption timer (6) where the CPU has it (our time slices).
        let pin = adjust_controls("pin-based", 1 | if c.preemption_timer { 1 << 6 } else { 0 }, c.pinbased)?;
        // Primary: use TSC offsetting (3), HLT exiting (7), unconditional I/O exiting
        // (24), activate secondary controls (31). MSR bitmaps are off, so every
        // RDMSR/WRMSR exits.
        let proc =
            adjust_controls("primary processor-based", (1 << 3) | (1 << 7) | (1 << 24) | (1 << 31), c.procbased)?;
        // Secondary: enable EPT (1); where allowed, enable RDTSCP (3) and enable INVPCID
        // (12): without them RDTSCP/RDPID and INVPCID raise #UD in the guest (25.6.2),
        // and the policy offers them when the host has them. Unrestricted guest (7)
        // where the CPU has it: without it CR0.PE and CR0.PG are fixed to 1
        // (IA32_VMX_CR0_FIXED0, SDM Vol. 3C 24.8, 27.3.1.1), so a multiboot kernel's
        // entry (protected mode, paging off) and an AP's real-mode start could not be
        // entered.
        let optional = ((1 << 3) | (1 << 12)) & (c.procbased2 >> 32) as u32;
        let ug = if c.unrestricted_guest { 1 << 7 } else { 0 };
        let proc2 = adjust_controls("secondary processor-based", (1 << 1) | optional | ug, c.procbased2)?;
        // Exit: host address-space size (9), save IA32_EFER (20), load IA32_EFER (21).
        let exit = adjust_controls("VM-exit", (1 << 9) | (1 << 20) | (1 << 21), c.exit)?;
        // Entry: IA-32e mode guest (9), load IA32_EFER (15).
        let entry_ctls = adjust_controls("VM-entry", (1 << 9) | (1 << 15), c.entry)?;
        // 29.3.7 / 25.6.11: EPTP = root | write-back (6) | 4-level walk (3 << 3), with
        // bit 6 enabling accessed/dirty flags where the CPU has them (needed for PML).
        if !(c.ept_4level && c.ept_wb) {
            return Err(ArchError::ControlUnsupported { control: "EPT 4-level write-back", missing: 1 });
        }
        let eptp = entry.nested_root | 6 | (3 << 3) | if c.ept_ad { 1 << 6 } else { 0 };

        let writes: &[(Field, u64)] = &[
            (vmcs::PINBASED_CTLS, pin.into()),
            (vmcs::PROCBASED_CTLS, proc.into()),
            (vmcs::PROCBASED_CTLS2, proc2.into()),
            (vmcs::EXIT_CTLS, exit.into()),
            (vmcs::ENTRY_CTLS, entry_ctls.into()),
            // Of the guest's own exceptions #DF exits, to report why a guest dies, and
            // #UD, for the other vendor's hypercall instruction after a cross-vendor
            // migration (`domain::exit::ud`; 25.6.3); the rest go through the guest's
            // IDT as on hardware.
            (vmcs::EXCEPTION_BITMAP, (1 << 8) | (1 << 6)),
            (vmcs::CR0_MASK, 0),
            // The guest may not see or change CR4.VMXE, which VMX forces on (FIXED0).
            (vmcs::CR4_MASK, CR4_VMXE),
            (vmcs::CR0_SHADOW, 0),
            (vmcs::CR4_SHADOW, 0),
            (vmcs::CR3_TARGET_COUNT, 0),
            // 25.7.2 / 25.8.2: the guest's list is loaded at entry and stored at exit;
            // the host's (upper half of the page) is loaded at exit.
            (vmcs::ENTRY_MSR_LOAD_ADDR, msr_area),
            (vmcs::EXIT_MSR_STORE_ADDR, msr_area),
            (vmcs::EXIT_MSR_LOAD_ADDR, msr_area + HOST_LIST as u64),
            (vmcs::EXIT_MSR_STORE_COUNT, msr_count),
            (vmcs::EXIT_MSR_LOAD_COUNT, msr_count),
            (vmcs::ENTRY_MSR_LOAD_COUNT, msr_count),
            (vmcs::TSC_OFFSET, 0),
            (vmcs::ENTRY_INTR_INFO, 0),
            (vmcs::EPTP, eptp),
        ];
        for &(field, value) in writes {
            vmcs::write(field, value)?;
        }
        write_host_state()?;
        write_guest_state(entry)?;
        Ok(eptp)
    }
}

impl VmxVcpu {
    /// VMPTRLD this vCPU's VMCS unless it is already the current one. A VMCS that was
    /// inactive becomes active here (refused while it is active on another CPU, SDM
    /// Vol. 3C 25.11.1); if it last held another CPU's host state, this CPU's is
    /// written (its GDT, IDT, TSS and GS base differ).
    fn make_current(&mut self) -> Result<(), ArchError> {
        let cpu = crate::percpu::this();
        match self.active_on {
            Some(on) if on != cpu.apic_id => return Err(ArchError::VmcsActiveElsewhere { on, here: cpu.apic_id }),
            Some(_) if cpu.current_vmcs() == self.vmcs => return Ok(()),
            _ => {}
        }
        // SAFETY: the VMCS region is ours, initialised by VMCLEAR in `create_vcpu`, and
        // active on no other CPU (checked above).
        unsafe { x86::bits64::vmx::vmptrld(self.vmcs) }.map_err(|f| vmcs::fail("VMPTRLD", f))?;
        cpu.set_current_vmcs(self.vmcs);
        if self.active_on.is_none() {
            self.active_on = Some(cpu.apic_id);
            self.flush_before_entry = true;
        }
        if self.host_state_of != cpu.apic_id {
            write_host_state()?;
            self.host_state_of = cpu.apic_id;
        }
        Ok(())
    }

    /// The vCPU's MSR lists.
    fn area(&mut self) -> MsrArea<'_> {
        // SAFETY: the page was allocated for this vCPU in `create_vcpu` and is reached
        // only through `&mut self`; the processor reads and writes it only during VM
        // entry and exit, inside `run`, which holds `&mut self`.
        MsrArea(unsafe { &mut *(self.msr_area as *mut [u8; 4096]) })
    }

    /// The guest's value of an MSR kept in the lists.
    fn area_msr(&mut self, msr: GuestMsr) -> Result<u64, ArchError> {
        let index = area_index(msr)?;
        self.area().guest(index).ok_or(ArchError::Unsupported("MSR not in the MSR lists"))
    }

    /// Put this vCPU's CR2 and DR6 into the physical registers before VM entry.
    fn load_cr2_dr6(&self) {
        // The host neither takes page faults nor uses debug breakpoints, so it does not
        // depend on CR2 or DR6. MOV to DR6 faults only for bits 63:32 set (SDM Vol. 2B,
        // MOV to/from Debug Registers), which `load_state` refuses and reads never return.
        // SAFETY: ring 0 may read and write CR2 and DR6, and the host does not use them.
        unsafe {
            if x86::controlregs::cr2() as u64 != self.cr2 {
                x86::controlregs::cr2_write(self.cr2);
            }
            let dr6: u64;
            core::arch::asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack, preserves_flags));
            if dr6 != self.dr6 {
                core::arch::asm!("mov dr6, {}", in(reg) self.dr6, options(nomem, nostack, preserves_flags));
            }
        }
    }

    /// Keep the guest's CR2 and DR6 after a VM exit (or a failed entry, when they are
    /// unchanged).
    fn store_cr2_dr6(&mut self) {
        let dr6: u64;
        // SAFETY: reading CR2 and DR6 in ring 0 has no side effects.
        unsafe {
            self.cr2 = x86::controlregs::cr2() as u64;
            core::arch::asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack, preserves_flags));
        }
        self.dr6 = dr6;
    }
}

/// The MSR index of a [`GuestMsr`] the MSR lists hold.
fn area_index(msr: GuestMsr) -> Result<u32, ArchError> {
    Ok(match msr {
        GuestMsr::Pat => MSR_PAT,
        GuestMsr::Star => MSR_STAR,
        GuestMsr::Lstar => MSR_LSTAR,
        GuestMsr::Cstar => MSR_CSTAR,
        GuestMsr::Sfmask => MSR_SFMASK,
        GuestMsr::KernelGsBase => MSR_KERNEL_GS_BASE,
        GuestMsr::TscAux => MSR_TSC_AUX,
        _ => return Err(ArchError::Unsupported("MSR with a VMCS field, not in the MSR lists")),
    })
}

/// VMREAD a guest segment register. `ss`: keep the DPL of an unusable SS, which is
/// the CPL (SDM 25.4.1; the snapshot's convention, state.rs).
fn read_segment((selector, base, limit, ar): SegmentFields, ss: bool) -> Result<SegmentRegister, ArchError> {
    let ar = vmcs::read(ar)? as u32;
    let mut attributes = state::vmx_ar_to_canonical(ar);
    if ss {
        attributes |= ar as u16 & state::ATTR_DPL;
    }
    Ok(SegmentRegister {
        selector: vmcs::read(selector)? as u16,
        attributes,
        limit: vmcs::read(limit)? as u32,
        base: vmcs::read(base)?,
    })
}

/// 25.6.6: where the guest/host mask has a 1, the guest reads the read shadow.
fn visible(reg: Field, mask: Field, shadow: Field) -> Result<u64, ArchError> {
    let mask = vmcs::read(mask)?;
    Ok((vmcs::read(reg)? & !mask) | (vmcs::read(shadow)? & mask))
}

/// CR0 as the guest sees it.
fn guest_cr0() -> Result<u64, ArchError> {
    visible(vmcs::GUEST_CR0, vmcs::CR0_MASK, vmcs::CR0_SHADOW)
}

/// CR4 as the guest sees it: CR4.VMXE is under the mask with a shadow of 0, so it
/// reads clear.
fn guest_cr4() -> Result<u64, ArchError> {
    visible(vmcs::GUEST_CR4, vmcs::CR4_MASK, vmcs::CR4_SHADOW)
}

/// The VMWRITEs for a guest segment register. CS and TR (`always_usable`) are never
/// marked unusable: 27.3.1.2 requires TR usable, and CS's checks assume it.
fn segment_writes(
    (selector, base, limit, ar): SegmentFields,
    r: &SegmentRegister,
    always_usable: bool,
) -> [(Field, u64); 4] {
    let mut rights = state::canonical_to_vmx_ar(r.attributes);
    if always_usable {
        rights &= !state::VMX_AR_UNUSABLE;
    }
    [(selector, r.selector.into()), (base, r.base), (limit, r.limit.into()), (ar, rights.into())]
}

impl Vcpu for VmxVcpu {
    fn leave_cpu(&mut self) -> Result<(), ArchError> {
        let cpu = crate::percpu::this();
        if self.active_on != Some(cpu.apic_id) {
            return Ok(());
        }
        // SAFETY: 25.11.3: VMCLEAR writes the VMCS's data back to its region, makes it
        // inactive on this CPU and sets its launch state to clear; the region is ours.
        unsafe { x86::bits64::vmx::vmclear(self.vmcs) }.map_err(|f| vmcs::fail("VMCLEAR", f))?;
        cpu.clear_current_vmcs(self.vmcs);
        self.active_on = None;
        self.launched = false;
        Ok(())
    }

    fn run(&mut self, regs: &mut GuestRegs, slice: Option<u64>) -> Result<Exit, ArchError> {
        self.make_current()?;
        if self.flush_before_entry {
            self.flush_nested_tlb()?;
            self.flush_before_entry = false;
        }
        if let (Some(ticks), Some(shift)) = (slice, self.preemption) {
            // 26.5.1: the timer counts down by 1 every 2^shift TSC ticks; exit at 0.
            vmcs::write(vmcs::GUEST_PREEMPTION_TIMER, (ticks >> shift).clamp(1, u64::from(u32::MAX)))?;
        } else if self.preemption.is_some() {
            vmcs::write(vmcs::GUEST_PREEMPTION_TIMER, u64::from(u32::MAX))?;
        }
        self.load_cr2_dr6();
        // SAFETY: interrupts are off and the hypervisor executes no x87/SSE code (soft-float target), so from here
        // to `save` the registers are this vCPU's.
        unsafe { self.fpu.load() };
        // SAFETY: the current VMCS is fully configured (`create_vcpu`), HOST_RIP points
        // at hv_vmx_exit, and hv_vmx_enter writes HOST_RSP itself so the exit lands on
        // this very stack frame; it preserves all callee-saved registers per SysV.
        let status = unsafe { hv_vmx_enter(regs, u64::from(self.launched)) };
        // SAFETY: as above; after a failed entry the registers are unchanged, still this vCPU's.
        unsafe { self.fpu.save() };
        self.store_cr2_dr6();
        let instruction = if self.launched { "VMRESUME" } else { "VMLAUNCH" };
        match status {
            0 => {}
            1 => return Err(vmcs::fail(instruction, x86::vmx::VmFail::VmFailInvalid)),
            _ => return Err(vmcs::fail(instruction, x86::vmx::VmFail::VmFailValid)),
        }
        let raw = vmcs::read(vmcs::EXIT_REASON)?;
        // 25.9.1: bit 31 = VM-entry failure; 27.8: then the guest never ran.
        if raw & (1 << 31) != 0 {
            return Err(ArchError::VmEntryFailed {
                reason: (raw & 0xffff) as u32,
                qualification: vmcs::read(vmcs::EXIT_QUALIFICATION)?,
            });
        }
        self.launched = true;
        self.exit_info_valid = true;
        if raw & 0xffff == 1 {
            // An external interrupt exit: "acknowledge interrupt on exit" is off, so the
            // interrupt is still pending in this CPU's LAPIC (SDM Vol. 3C 28.2.2). Take
            // it through the host's IDT now (its handler EOIs), or every entry would exit
            // again at once. STI's shadow covers the NOP, so it arrives before CLI.
            // SAFETY: the host IDT handles every vector from 32 up (drivers::tables),
            // and nothing here depends on interrupts staying off for one instruction.
            unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
        }
        // An event we injected has been delivered by now (26.6), unless this exit cut
        // its delivery short (an EPT violation on the guest's stack or IDT, say): 28.2.4
        // then describes it in the IDT-vectoring fields, and it goes in again at the
        // next entry, as the processor does not redo it (SDM Vol. 3C 28.2.4, 27.5.1).
        let vectoring = vmcs::read(vmcs::IDT_VECTORING_INFO)? as u32;
        let error_code =
            if vectoring & (1 << 11) != 0 { vmcs::read(vmcs::IDT_VECTORING_ERROR_CODE)? as u32 } else { 0 };
        match PendingEvent::from_interruption_info(vectoring, error_code).filter(PendingEvent::redelivered_after_exit) {
            Some(e) => {
                if let Some(ec) = e.error_code {
                    vmcs::write(vmcs::ENTRY_EXCEPTION_ERROR_CODE, ec.into())?;
                }
                // Bits 30:12 of the entry field are reserved (25.8.3), so rebuild it.
                vmcs::write(vmcs::ENTRY_INTR_INFO, e.to_interruption_info().into())?;
            }
            None => vmcs::write(vmcs::ENTRY_INTR_INFO, 0)?,
        }
        let len = || vmcs::read(vmcs::EXIT_INSTRUCTION_LEN);
        // Appendix C: basic exit reasons.
        let (reason, instruction_len) = match raw & 0xffff {
            0 => (ExitReason::Exception { vector: (vmcs::read(vmcs::EXIT_INTR_INFO)? & 0xff) as u8 }, 0),
            1 | 52 => (ExitReason::TimeSliceEnd, 0),
            2 => (ExitReason::TripleFault, 0),
            10 => (ExitReason::Cpuid, len()?),
            12 => (ExitReason::Hlt, len()?),
            18 => (ExitReason::Hypercall, len()?),
            // VMCLEAR..VMXON, INVEPT, INVVPID, VMFUNC: guests get #UD.
            19..=27 | 50 | 53 | 59 => (ExitReason::VirtualizationInstruction, 0),
            30 => {
                // Table 28-5: size - 1 in bits 2:0, IN in bit 3, string in bit 4, port 31:16.
                let q = vmcs::read(vmcs::EXIT_QUALIFICATION)?;
                let reason = ExitReason::Io {
                    port: (q >> 16) as u16,
                    size: ((q & 7) + 1) as u8,
                    input: q & 8 != 0,
                    string: q & 16 != 0,
                };
                (reason, len()?)
            }
            31 => (ExitReason::MsrRead, len()?),
            32 => (ExitReason::MsrWrite, len()?),
            55 => (ExitReason::Xsetbv, len()?),
            // Table 28-7: bit 1 of the qualification = the access was a write.
            62 => (ExitReason::PmlFull, 0),
            7 => (ExitReason::InterruptWindow, 0),
            48 => {
                let q = vmcs::read(vmcs::EXIT_QUALIFICATION)?;
                (ExitReason::NestedPageFault { gpa: vmcs::read(vmcs::GUEST_PHYSICAL_ADDRESS)?, write: q & 2 != 0 }, 0)
            }
            code => (ExitReason::Other { code }, 0),
        };
        Ok(Exit { reason, rip: vmcs::read(vmcs::GUEST_RIP)?, instruction_len })
    }

    fn skip_instruction(&mut self, exit: &Exit) -> Result<(), ArchError> {
        if exit.instruction_len == 0 || exit.instruction_len > 15 {
            return Err(ArchError::Unsupported("skipping an instruction of unknown length"));
        }
        self.make_current()?;
        let rip = vmcs::read(vmcs::GUEST_RIP)?;
        vmcs::write(vmcs::GUEST_RIP, rip.wrapping_add(exit.instruction_len))?;
        // The instruction retired, so blocking by STI or MOV SS (interruptibility bits
        // 0 and 1, SDM Vol. 3C 25.4.2 Table 25-3) that covered it is over: without
        // this, `sti; hlt` followed by `cli` never lets a pending interrupt in.
        let interruptibility = vmcs::read(vmcs::GUEST_INTERRUPTIBILITY)?;
        if interruptibility & 3 != 0 {
            vmcs::write(vmcs::GUEST_INTERRUPTIBILITY, interruptibility & !3)?;
        }
        Ok(())
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), ArchError> {
        self.make_current()?;
        // 25.8.3: vector | type 3 (hardware exception) << 8 | deliver error code << 11
        // | valid << 31.
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(ec) = error_code {
            info |= 1 << 11;
            vmcs::write(vmcs::ENTRY_EXCEPTION_ERROR_CODE, ec.into())?;
        }
        vmcs::write(vmcs::ENTRY_INTR_INFO, info)
    }

    fn can_inject_interrupt(&mut self) -> Result<bool, ArchError> {
        self.make_current()?;
        // 26.3.1.5: an external interrupt is taken when RFLAGS.IF is set and the
        // interruptibility state shows no blocking by STI (bit 0) or MOV SS (bit 1);
        // and one event is injected at a time (25.8.3).
        let rflags = vmcs::read(vmcs::GUEST_RFLAGS)?;
        let blocking = vmcs::read(vmcs::GUEST_INTERRUPTIBILITY)? & 3;
        let pending = vmcs::read(vmcs::ENTRY_INTR_INFO)? & (1 << 31);
        Ok(rflags & (1 << 9) != 0 && blocking == 0 && pending == 0)
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), ArchError> {
        self.make_current()?;
        // 25.8.3: vector | type 0 (external interrupt) << 8 | valid << 31.
        vmcs::write(vmcs::ENTRY_INTR_INFO, u64::from(vector) | (1 << 31))
    }

    fn request_interrupt_window(&mut self, on: bool) -> Result<(), ArchError> {
        if !self.interrupt_window_allowed {
            return Err(ArchError::ControlUnsupported { control: "interrupt-window exiting", missing: 1 << 2 });
        }
        self.make_current()?;
        // 25.6.2: primary processor-based control bit 2 = interrupt-window exiting: a
        // VM exit (reason 7) at the start of any instruction with RFLAGS.IF = 1 and no
        // blocking by STI or MOV SS.
        let proc = vmcs::read(vmcs::PROCBASED_CTLS)?;
        vmcs::write(vmcs::PROCBASED_CTLS, if on { proc | (1 << 2) } else { proc & !(1 << 2) })
    }

    fn control_state(&mut self) -> Result<ControlState, ArchError> {
        self.make_current()?;
        // 25.6.6: where the guest/host mask has a 1, the guest reads the read shadow.
        let cr4_mask = vmcs::read(vmcs::CR4_MASK)?;
        let cr4 = (vmcs::read(vmcs::GUEST_CR4)? & !cr4_mask) | (vmcs::read(vmcs::CR4_SHADOW)? & cr4_mask);
        let cr0_mask = vmcs::read(vmcs::CR0_MASK)?;
        let cr0 = (vmcs::read(vmcs::GUEST_CR0)? & !cr0_mask) | (vmcs::read(vmcs::CR0_SHADOW)? & cr0_mask);
        // 25.4.1: SS.DPL is the CPL.
        let cpl = ((vmcs::read(vmcs::GUEST_SS_AR)? >> 5) & 3) as u8;
        Ok(ControlState { cr0, cr4, cpl })
    }

    fn read_msr(&mut self, msr: GuestMsr) -> Result<u64, ArchError> {
        self.make_current()?;
        let field = match msr {
            GuestMsr::Efer => vmcs::GUEST_EFER,
            GuestMsr::FsBase => vmcs::GUEST_FS_BASE,
            GuestMsr::GsBase => vmcs::GUEST_GS_BASE,
            GuestMsr::SysenterCs => vmcs::GUEST_SYSENTER_CS,
            GuestMsr::SysenterEsp => vmcs::GUEST_SYSENTER_ESP,
            GuestMsr::SysenterEip => vmcs::GUEST_SYSENTER_EIP,
            listed => return self.area_msr(listed),
        };
        vmcs::read(field)
    }

    fn write_msr(&mut self, msr: GuestMsr, value: u64) -> Result<(), ArchError> {
        self.make_current()?;
        let field = match msr {
            GuestMsr::Efer => {
                // 27.3.1.1: "IA-32e mode guest" must equal the EFER.LMA loaded at entry.
                let entry = vmcs::read(vmcs::ENTRY_CTLS)?;
                let entry = if value & EFER_LMA != 0 {
                    entry | ENTRY_IA32E_MODE_GUEST
                } else {
                    entry & !ENTRY_IA32E_MODE_GUEST
                };
                vmcs::write(vmcs::ENTRY_CTLS, entry)?;
                vmcs::GUEST_EFER
            }
            GuestMsr::FsBase => vmcs::GUEST_FS_BASE,
            GuestMsr::GsBase => vmcs::GUEST_GS_BASE,
            GuestMsr::SysenterCs => vmcs::GUEST_SYSENTER_CS,
            GuestMsr::SysenterEsp => vmcs::GUEST_SYSENTER_ESP,
            GuestMsr::SysenterEip => vmcs::GUEST_SYSENTER_EIP,
            listed => {
                let index = area_index(listed)?;
                let count = self.msr_count;
                if AREA_MSRS.iter().take(count).all(|(m, _)| *m != index) {
                    return Err(ArchError::Unsupported("IA32_TSC_AUX on a CPU without RDTSCP"));
                }
                return self.area().set_guest(index, value).ok_or(ArchError::Unsupported("MSR not in the MSR lists"));
            }
        };
        vmcs::write(field, value)
    }

    fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    fn set_tsc_offset(&mut self, offset: u64) -> Result<(), ArchError> {
        self.make_current()?;
        vmcs::write(vmcs::TSC_OFFSET, offset)?;
        self.tsc_offset = offset;
        Ok(())
    }

    fn fpu(&self) -> &GuestFpu {
        &self.fpu
    }

    fn fpu_mut(&mut self) -> &mut GuestFpu {
        &mut self.fpu
    }

    fn paging_state(&mut self) -> Result<PagingState, ArchError> {
        self.make_current()?;
        // Guest-state area (SDM Vol. 3C 25.4.1-25.4.2), read as `save_state` reads it:
        // CR0/CR4 through their read shadows, EFER kept current by "save IA32_EFER",
        // the CPL as SS.DPL (25.4.1: SS.DPL always equals the CPL).
        let ss = read_segment(SS, true)?;
        Ok(PagingState {
            cr0: guest_cr0()?,
            cr3: vmcs::read(vmcs::GUEST_CR3)?,
            cr4: guest_cr4()?,
            efer: vmcs::read(vmcs::GUEST_EFER)?,
            rip: vmcs::read(vmcs::GUEST_RIP)?,
            rsp: vmcs::read(vmcs::GUEST_RSP)?,
            cpl: ((ss.attributes & state::ATTR_DPL) >> 5) as u8,
            cs: read_segment(CS, false)?,
            bases: SegmentBases {
                es: vmcs::read(ES.1)?,
                ss: ss.base,
                ds: vmcs::read(DS.1)?,
                fs: vmcs::read(FS.1)?,
                gs: vmcs::read(GS.1)?,
            },
        })
    }

    // Guest-state area (SDM Vol. 3C 25.4), mirroring `write_guest_state`; CR2, DR6
    // and the MSRs without a VMCS field come from the vCPU (see `UnswitchedMsrs`).
    fn save_state(&mut self, regs: &GuestRegs) -> Result<VcpuSnapshot, ArchError> {
        self.make_current()?;
        // 25.4.2: guest interruptibility state; bit 2 (blocking by SMI) and bit 4
        // (enclave interruption) are not carried: no SMM or SGX in our guests.
        let interruptibility = vmcs::read(vmcs::GUEST_INTERRUPTIBILITY)? as u32 & state::INTERRUPTIBILITY_BITS;
        // 25.8.3: a still-valid VM-entry interruption-information field is an event the
        // core injected that has not been delivered, or one whose delivery the last exit
        // cut short (`run` puts those back and clears the rest after each entry).
        // Otherwise 25.9.3 / 28.2.4: a valid IDT-vectoring field says the last exit
        // interrupted that event's delivery. Software interrupts and exceptions (types
        // 4-6) are not carried from there: RIP still points at the instruction, which
        // raises them again when re-executed.
        let entry_info = vmcs::read(vmcs::ENTRY_INTR_INFO)? as u32;
        let pending_event = if entry_info & (1 << 31) != 0 {
            let ec = if entry_info & (1 << 11) != 0 { vmcs::read(vmcs::ENTRY_EXCEPTION_ERROR_CODE)? as u32 } else { 0 };
            let event = PendingEvent::from_interruption_info(entry_info, ec);
            if let Some(e) = &event
                && !matches!(e.kind, state::EVENT_EXTERNAL_INTERRUPT | state::EVENT_NMI | state::EVENT_EXCEPTION)
            {
                return Err(ArchError::Unsupported(
                    "saving an injected software interrupt or exception (needs the VM-entry instruction length)",
                ));
            }
            event
        } else if self.exit_info_valid {
            let info = vmcs::read(vmcs::IDT_VECTORING_INFO)? as u32;
            let ec = if info & (1 << 31) != 0 && info & (1 << 11) != 0 {
                vmcs::read(vmcs::IDT_VECTORING_ERROR_CODE)? as u32
            } else {
                0
            };
            PendingEvent::from_interruption_info(info, ec).filter(PendingEvent::redelivered_after_exit)
        } else {
            None
        };
        Ok(VcpuSnapshot {
            regs: *regs,
            rsp: vmcs::read(vmcs::GUEST_RSP)?,
            rip: vmcs::read(vmcs::GUEST_RIP)?,
            rflags: vmcs::read(vmcs::GUEST_RFLAGS)?,
            cr0: guest_cr0()?,
            cr2: self.cr2,
            cr3: vmcs::read(vmcs::GUEST_CR3)?,
            cr4: guest_cr4()?,
            // The "save IA32_EFER" exit control (set in `configure`) keeps this current.
            efer: vmcs::read(vmcs::GUEST_EFER)?,
            dr6: self.dr6,
            dr7: vmcs::read(vmcs::GUEST_DR7)?,
            pat: self.area_msr(GuestMsr::Pat)?,
            cs: read_segment(CS, false)?,
            ds: read_segment(DS, false)?,
            es: read_segment(ES, false)?,
            fs: read_segment(FS, false)?,
            gs: read_segment(GS, false)?,
            ss: read_segment(SS, true)?,
            tr: read_segment(TR, false)?,
            ldtr: read_segment(LDTR, false)?,
            gdtr: DescriptorTable {
                base: vmcs::read(vmcs::GUEST_GDTR_BASE)?,
                limit: vmcs::read(vmcs::GUEST_GDTR_LIMIT)? as u16,
            },
            idtr: DescriptorTable {
                base: vmcs::read(vmcs::GUEST_IDTR_BASE)?,
                limit: vmcs::read(vmcs::GUEST_IDTR_LIMIT)? as u16,
            },
            sysenter_cs: vmcs::read(vmcs::GUEST_SYSENTER_CS)?,
            sysenter_esp: vmcs::read(vmcs::GUEST_SYSENTER_ESP)?,
            sysenter_eip: vmcs::read(vmcs::GUEST_SYSENTER_EIP)?,
            star: self.area_msr(GuestMsr::Star)?,
            lstar: self.area_msr(GuestMsr::Lstar)?,
            cstar: self.area_msr(GuestMsr::Cstar)?,
            sfmask: self.area_msr(GuestMsr::Sfmask)?,
            kernel_gs_base: self.area_msr(GuestMsr::KernelGsBase)?,
            interruptibility,
            pending_event,
        })
    }

    fn load_state(&mut self, regs: &mut GuestRegs, snapshot: &VcpuSnapshot) -> Result<(), ArchError> {
        // A snapshot saved under SVM (or by an older build) may hold what VMRUN accepts
        // and the VM-entry checks of SDM Vol. 3C 27.3.1 do not: rewrite what is
        // architecturally equivalent, refuse the rest by name (`vmx_checks`).
        let normalised =
            super::vmx_checks::for_vmx_entry(snapshot, self.unrestricted).map_err(ArchError::InvalidSnapshot)?;
        let s = &normalised;
        // Refuse before writing anything, so a refused snapshot leaves the vCPU as it was.
        if let Some(e) = &s.pending_event {
            match e.kind {
                state::EVENT_EXTERNAL_INTERRUPT | state::EVENT_NMI | state::EVENT_EXCEPTION => {}
                state::EVENT_SOFTWARE_INTERRUPT => {
                    return Err(ArchError::InvalidSnapshot(
                        "a pending software interrupt needs the VM-entry instruction length (27.2.1.3), \
                         which the snapshot does not carry",
                    ));
                }
                _ => return Err(ArchError::InvalidSnapshot("pending event of an unknown kind")),
            }
        }
        if s.dr6 >> 32 != 0 {
            return Err(ArchError::InvalidSnapshot("DR6 bits 63:32 must be zero"));
        }
        // 27.3.1.1: CR0.PE and CR0.PG are fixed to 1 (IA32_VMX_CR0_FIXED0) unless
        // "unrestricted guest" is on; with it, real mode (an AP's SIPI start) and
        // protected mode without paging enter directly. The segment checks of 27.3.1.2
        // for that case (CS type 3 with DPL 0, SS DPL 0 while CR0.PE = 0, TR type 3 or
        // 11 outside IA-32e mode, LDTR type 2) hold for `domain::boot::sipi_snapshot`.
        if !self.unrestricted && s.cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
            return Err(ArchError::InvalidSnapshot(
                "CR0.PE or CR0.PG is clear (real mode or protected mode without paging), which VMX                  enters only with \"unrestricted guest\" (SDM Vol. 3C 27.3.1.1); this CPU does not have it",
            ));
        }
        self.make_current()?;
        // 27.3.1.1: "IA-32e mode guest" must match EFER.LMA.
        let entry_ctls = vmcs::read(vmcs::ENTRY_CTLS)?;
        let entry_ctls = if s.efer & EFER_LMA != 0 {
            entry_ctls | ENTRY_IA32E_MODE_GUEST
        } else {
            entry_ctls & !ENTRY_IA32E_MODE_GUEST
        };
        // 25.8.3: the pending event, delivered at the next VM entry.
        let (intr_info, error_code) = s
            .pending_event
            .map_or((0, 0), |e| (u64::from(e.to_interruption_info()), u64::from(e.error_code.unwrap_or(0))));
        // Values the VM-entry checks refuse (27.3.1: CR0/CR4 fixed bits, segment
        // rights, interruptibility against RFLAGS.IF, ...) surface as
        // ArchError::VmEntryFailed (reason 33) at the next `run`.
        let mut writes: alloc::vec::Vec<(Field, u64)> = alloc::vec![
            (vmcs::ENTRY_CTLS, entry_ctls),
            // CR0_MASK is 0 (`configure`): the guest owns CR0; the shadow is unused.
            (vmcs::GUEST_CR0, s.cr0),
            (vmcs::CR0_SHADOW, s.cr0),
            (vmcs::GUEST_CR3, s.cr3),
            // VMX forces CR4.VMXE on (CR4_FIXED0); the mask hides it behind the shadow.
            (vmcs::GUEST_CR4, s.cr4 | CR4_VMXE),
            (vmcs::CR4_SHADOW, s.cr4),
            (vmcs::GUEST_DR7, s.dr7),
            (vmcs::GUEST_RSP, s.rsp),
            (vmcs::GUEST_RIP, s.rip),
            (vmcs::GUEST_RFLAGS, s.rflags),
            (vmcs::GUEST_EFER, s.efer),
            (vmcs::GUEST_GDTR_BASE, s.gdtr.base),
            (vmcs::GUEST_GDTR_LIMIT, s.gdtr.limit.into()),
            (vmcs::GUEST_IDTR_BASE, s.idtr.base),
            (vmcs::GUEST_IDTR_LIMIT, s.idtr.limit.into()),
            (vmcs::GUEST_SYSENTER_CS, s.sysenter_cs),
            (vmcs::GUEST_SYSENTER_ESP, s.sysenter_esp),
            (vmcs::GUEST_SYSENTER_EIP, s.sysenter_eip),
            (vmcs::GUEST_INTERRUPTIBILITY, (s.interruptibility & state::INTERRUPTIBILITY_BITS).into()),
            (vmcs::GUEST_ACTIVITY, 0),
            (vmcs::GUEST_PENDING_DBG, 0),
            (vmcs::ENTRY_EXCEPTION_ERROR_CODE, error_code),
            (vmcs::ENTRY_INTR_INFO, intr_info),
        ];
        writes.extend_from_slice(&segment_writes(CS, &s.cs, true));
        writes.extend_from_slice(&segment_writes(DS, &s.ds, false));
        writes.extend_from_slice(&segment_writes(ES, &s.es, false));
        writes.extend_from_slice(&segment_writes(FS, &s.fs, false));
        writes.extend_from_slice(&segment_writes(GS, &s.gs, false));
        writes.extend_from_slice(&segment_writes(SS, &s.ss, false));
        writes.extend_from_slice(&segment_writes(TR, &s.tr, true));
        writes.extend_from_slice(&segment_writes(LDTR, &s.ldtr, false));
        for (field, value) in writes {
            vmcs::write(field, value)?;
        }
        self.cr2 = s.cr2;
        self.dr6 = s.dr6;
        let mut area = self.area();
        for (msr, value) in [
            (MSR_PAT, s.pat),
            (MSR_STAR, s.star),
            (MSR_LSTAR, s.lstar),
            (MSR_CSTAR, s.cstar),
            (MSR_SFMASK, s.sfmask),
            (MSR_KERNEL_GS_BASE, s.kernel_gs_base),
        ] {
            area.set_guest(msr, value).ok_or(ArchError::Unsupported("MSR not in the MSR lists"))?;
        }
        self.exit_info_valid = false;
        *regs = s.regs;
        Ok(())
    }

    fn flush_nested_tlb(&mut self) -> Result<(), ArchError> {
        // SDM Vol. 3C 30.3 (INVEPT): invalidate cached EPT-derived translations, so
        // cleared dirty flags / write permissions take effect (29.4.3.4).
        let descriptor: [u64; 2] = [self.eptp, 0];
        let flags: u64;
        // SAFETY: INVEPT only invalidates TLB entries; the descriptor is valid memory
        // holding our EPTP, and the type was chosen from IA32_VMX_EPT_VPID_CAP. We are in
        // VMX root operation (VMXON in `enable`).
        unsafe {
            core::arch::asm!(
                "invept {ty}, [{desc}]",
                "pushfq",
                "pop {flags}",
                ty = in(reg) self.invept_type,
                desc = in(reg) &descriptor,
                flags = out(reg) flags,
            );
        }
        // RFLAGS.CF / ZF report VMfailInvalid / VMfailValid (31.2).
        match flags & 0x41 {
            0 => Ok(()),
            f if f & 1 != 0 => Err(vmcs::fail("INVEPT", x86::vmx::VmFail::VmFailInvalid)),
            _ => Err(vmcs::fail("INVEPT", x86::vmx::VmFail::VmFailValid)),
        }
    }

    fn enable_pml(&mut self, pool: &mut FramePool) -> Result<(), ArchError> {
        if !self.pml_allowed {
            return Err(ArchError::Unsupported("this CPU has no PML (secondary control bit 17)"));
        }
        if self.pml.is_some() {
            return Ok(());
        }
        let buffer = pool.alloc_zeroed()?;
        self.make_current()?;
        // 25.6.18 / 29.3.6: the buffer's address, the index at its last entry, then
        // secondary control "enable PML" (bit 17). EPTP bit 6 (A/D) is already set.
        vmcs::write(vmcs::PML_ADDRESS, buffer)?;
        vmcs::write(vmcs::GUEST_PML_INDEX, PML_ENTRIES - 1)?;
        let ctls2 = vmcs::read(vmcs::PROCBASED_CTLS2)?;
        vmcs::write(vmcs::PROCBASED_CTLS2, ctls2 | (1 << 17))?;
        self.pml = Some(buffer);
        Ok(())
    }

    fn drain_pml(&mut self, pool: &mut FramePool, out: &mut dyn FnMut(&[u64])) -> Result<(), ArchError> {
        let Some(buffer) = self.pml else { return Ok(()) };
        // No VMPTRLD when this VMCS is already current (the PML-full exit's case).
        self.make_current()?;
        // 29.3.6: the processor fills entries from 511 down and decrements the index;
        // an index of 0xFFFF (-1) means all 512 are full. Valid entries: index+1..=511,
        // each a guest-physical address with bits 11:0 cleared.
        let index = vmcs::read(vmcs::GUEST_PML_INDEX)? & 0xffff;
        let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
        if first == PML_ENTRIES {
            // Empty: the index is already at the last entry.
            return Ok(());
        }
        out(&pool.table_mut(buffer)?[first as usize..]);
        vmcs::write(vmcs::GUEST_PML_INDEX, PML_ENTRIES - 1)
    }

    fn disable_pml(&mut self, pool: &mut FramePool) -> Result<(), ArchError> {
        let Some(buffer) = self.pml.take() else { return Ok(()) };
        self.make_current()?;
        let ctls2 = vmcs::read(vmcs::PROCBASED_CTLS2)?;
        vmcs::write(vmcs::PROCBASED_CTLS2, ctls2 & !(1 << 17))?;
        pool.free(buffer)?;
        Ok(())
    }

    fn destroy(self, pool: &mut FramePool) -> Result<(), MmError> {
        if let Some(buffer) = self.pml {
            pool.free(buffer)?;
        }
        pool.free(self.msr_area)?;
        // SAFETY: VMCLEAR flushes and deactivates this VMCS (25.11.3) so its frame can
        // be reused; it is not current afterwards.
        let _ = unsafe { x86::bits64::vmx::vmclear(self.vmcs) };
        crate::percpu::this().clear_current_vmcs(self.vmcs);
        pool.free(self.vmcs)
    }
}

/// 25.5 / 26.2.3: the state VM exits load. Selectors come from our own GDT (TR
/// must not be 0, which is why `cpu::tables` exists).
fn write_host_state() -> Result<(), ArchError> {
    // This CPU's tables: a VMCS launched on another CPU needs its host state rewritten.
    let bases = crate::percpu::this().tables;
    // SAFETY: reading control registers and these MSRs has no side effects; all
    // exist on any CPU with VMX (EFER, FS/GS base: long mode).
    let (cr0, cr3, cr4, efer, fs_base, gs_base) = unsafe {
        (
            x86::controlregs::cr0().bits() as u64,
            x86::controlregs::cr3(),
            x86::controlregs::cr4().bits() as u64,
            x86::msr::rdmsr(MSR_EFER),
            x86::msr::rdmsr(MSR_FS_BASE),
            x86::msr::rdmsr(MSR_GS_BASE),
        )
    };
    let writes: &[(Field, u64)] = &[
        (vmcs::HOST_CR0, cr0),
        (vmcs::HOST_CR3, cr3),
        (vmcs::HOST_CR4, cr4),
        (vmcs::HOST_RIP, hv_vmx_exit as *const () as u64),
        (vmcs::HOST_CS_SELECTOR, CODE_SELECTOR.into()),
        (vmcs::HOST_SS_SELECTOR, DATA_SELECTOR.into()),
        (vmcs::HOST_DS_SELECTOR, DATA_SELECTOR.into()),
        (vmcs::HOST_ES_SELECTOR, DATA_SELECTOR.into()),
        (vmcs::HOST_FS_SELECTOR, 0),
        (vmcs::HOST_GS_SELECTOR, 0),
        (vmcs::HOST_TR_SELECTOR, TSS_SELECTOR.into()),
        (vmcs::HOST_FS_BASE, fs_base),
        (vmcs::HOST_GS_BASE, gs_base),
        (vmcs::HOST_TR_BASE, bases.tss),
        (vmcs::HOST_GDTR_BASE, bases.gdt),
        (vmcs::HOST_IDTR_BASE, bases.idt),
        (vmcs::HOST_SYSENTER_CS, 0),
        (vmcs::HOST_SYSENTER_ESP, 0),
        (vmcs::HOST_SYSENTER_EIP, 0),
        (vmcs::HOST_EFER, efer),
    ];
    for &(field, value) in writes {
        vmcs::write(field, value)?;
    }
    Ok(())
}

/// 25.4 / 26.3.1: a 64-bit guest at CPL0 with flat segments and paging on.
fn write_guest_state(entry: &GuestEntry) -> Result<(), ArchError> {
    // SAFETY: reading the fixed-bit MSRs has no side effects; they exist with VMX.
    let (cr0_fixed0, cr0_fixed1, cr4_fixed0, cr4_fixed1) = unsafe {
        (
            x86::msr::rdmsr(MSR_IA32_VMX_CR0_FIXED0),
            x86::msr::rdmsr(MSR_IA32_VMX_CR0_FIXED1),
            x86::msr::rdmsr(MSR_IA32_VMX_CR4_FIXED0),
            x86::msr::rdmsr(MSR_IA32_VMX_CR4_FIXED1),
        )
    };
    let cr0 = (0x8001_0031 | cr0_fixed0) & cr0_fixed1; // PG, WP, NE, ET, PE
    let cr4 = ((1 << 5) | cr4_fixed0) & cr4_fixed1; // PAE (+ VMXE from FIXED0)
    // Access rights (25.4.1, Table 25-2): type, S, DPL, P, L, D/B, G; bit 16 unusable.
    const CODE_AR: u64 = 0xa09b;
    const DATA_AR: u64 = 0xc093;
    let mut writes: alloc::vec::Vec<(Field, u64)> = alloc::vec![
        (vmcs::GUEST_CR0, cr0),
        (vmcs::GUEST_CR3, entry.cr3),
        (vmcs::GUEST_CR4, cr4),
        (vmcs::GUEST_DR7, 0x400),
        (vmcs::GUEST_RSP, entry.rsp),
        (vmcs::GUEST_RIP, entry.rip),
        (vmcs::GUEST_RFLAGS, 0x2),
        (vmcs::GUEST_CS_SELECTOR, 0x08),
        (vmcs::GUEST_CS_BASE, 0),
        (vmcs::GUEST_CS_LIMIT, 0xffff_ffff),
        (vmcs::GUEST_CS_AR, CODE_AR),
        (vmcs::GUEST_TR_SELECTOR, 0x18),
        (vmcs::GUEST_TR_BASE, 0),
        (vmcs::GUEST_TR_LIMIT, 0x67),
        (vmcs::GUEST_TR_AR, 0x8b), // busy 64-bit TSS, present
        (vmcs::GUEST_LDTR_SELECTOR, 0),
        (vmcs::GUEST_LDTR_BASE, 0),
        (vmcs::GUEST_LDTR_LIMIT, 0),
        (vmcs::GUEST_LDTR_AR, 1 << 16), // unusable
        (vmcs::GUEST_GDTR_BASE, 0),
        (vmcs::GUEST_GDTR_LIMIT, 0xffff),
        (vmcs::GUEST_IDTR_BASE, 0),
        (vmcs::GUEST_IDTR_LIMIT, 0xffff),
        (vmcs::GUEST_INTERRUPTIBILITY, 0),
        (vmcs::GUEST_ACTIVITY, 0),
        (vmcs::GUEST_PENDING_DBG, 0),
        (vmcs::GUEST_SYSENTER_CS, 0),
        (vmcs::GUEST_SYSENTER_ESP, 0),
        (vmcs::GUEST_SYSENTER_EIP, 0),
        (vmcs::GUEST_LINK_POINTER, u64::MAX),
        (vmcs::GUEST_DEBUGCTL, 0),
        (vmcs::GUEST_EFER, (1 << 8) | (1 << 10)), // LME, LMA
    ];
    for (sel, base, limit, ar) in [
        (vmcs::GUEST_SS_SELECTOR, vmcs::GUEST_SS_BASE, vmcs::GUEST_SS_LIMIT, vmcs::GUEST_SS_AR),
        (vmcs::GUEST_DS_SELECTOR, vmcs::GUEST_DS_BASE, vmcs::GUEST_DS_LIMIT, vmcs::GUEST_DS_AR),
        (vmcs::GUEST_ES_SELECTOR, vmcs::GUEST_ES_BASE, vmcs::GUEST_ES_LIMIT, vmcs::GUEST_ES_AR),
        (vmcs::GUEST_FS_SELECTOR, vmcs::GUEST_FS_BASE, vmcs::GUEST_FS_LIMIT, vmcs::GUEST_FS_AR),
        (vmcs::GUEST_GS_SELECTOR, vmcs::GUEST_GS_BASE, vmcs::GUEST_GS_LIMIT, vmcs::GUEST_GS_AR),
    ] {
        writes.extend_from_slice(&[(sel, 0x10), (base, 0), (limit, 0xffff_ffff), (ar, DATA_AR)]);
    }
    for (field, value) in writes {
        vmcs::write(field, value)?;
    }
    Ok(())
}

unsafe extern "sysv64" {
    /// Enter the guest of the current VMCS (VMLAUNCH when `resume` is 0, else
    /// VMRESUME). Returns 0 after a VM exit (guest registers stored in `regs`), 1 for
    /// VMfailInvalid, 2 for VMfailValid.
    fn hv_vmx_enter(regs: *mut GuestRegs, resume: u64) -> u64;
    /// HOST_RIP: where VM exits land (never called directly).
    fn hv_vmx_exit();
}

// SDM Vol. 3C 27.5 (VM exits load host RSP/RIP from the VMCS) and 28.x (VM entry): the
// processor saves no general registers, so we push the host's callee-saved ones,
// store RSP into HOST_RSP (encoding 0x6C14) with the GuestRegs pointer on top, load
// the guest's registers and enter. The exit stub finds the pointer at [rsp], stores
// the guest's registers and returns to hv_vmx_enter's caller.
global_asm!(
    ".global hv_vmx_enter",
    "hv_vmx_enter:",
    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
    "push rdi",                 // GuestRegs pointer, at [HOST_RSP] on exit
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "jbe 3f",
    "test rsi, rsi",            // ZF=1: launch; MOVs below keep the flags
    "mov rax, [rdi]", "mov rbx, [rdi + 8*1]", "mov rcx, [rdi + 8*2]", "mov rdx, [rdi + 8*3]",
    "mov rsi, [rdi + 8*4]", "mov rbp, [rdi + 8*6]",
    "mov r8, [rdi + 8*7]", "mov r9, [rdi + 8*8]", "mov r10, [rdi + 8*9]", "mov r11, [rdi + 8*10]",
    "mov r12, [rdi + 8*11]", "mov r13, [rdi + 8*12]", "mov r14, [rdi + 8*13]", "mov r15, [rdi + 8*14]",
    "mov rdi, [rdi + 8*5]",
    "jnz 2f",
    "vmlaunch",
    "jmp 3f",
    "2:",
    "vmresume",
    "3:",                       // VMfail: CF=1 invalid, ZF=1 valid
    "mov eax, 1",
    "jc 4f",
    "mov eax, 2",
    "4:",
    "add rsp, 8",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
    "",
    ".global hv_vmx_exit",
    "hv_vmx_exit:",
    "push rdi",                 // guest RDI
    "mov rdi, [rsp + 8]",       // GuestRegs pointer
    "mov [rdi], rax", "mov [rdi + 8*1], rbx", "mov [rdi + 8*2], rcx", "mov [rdi + 8*3], rdx",
    "mov [rdi + 8*4], rsi", "mov [rdi + 8*6], rbp",
    "mov [rdi + 8*7], r8", "mov [rdi + 8*8], r9", "mov [rdi + 8*9], r10", "mov [rdi + 8*10], r11",
    "mov [rdi + 8*11], r12", "mov [rdi + 8*12], r13", "mov [rdi + 8*13], r14", "mov [rdi + 8*14], r15",
    "pop rax",
    "mov [rdi + 8*5], rax",
    "add rsp, 8",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "xor eax, eax",
    "ret",
    host_rsp = const vmcs::HOST_RSP_ENCODING,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_lists_follow_the_sdm_entry_layout() {
        // 25.7.2, Table 25-15: MSR index in bytes 3:0, reserved 7:4, value 15:8.
        let mut page = alloc::boxed::Box::new([0xaau8; 4096]);
        let mut area = MsrArea(&mut page);
        for (i, &(msr, reset)) in AREA_MSRS.iter().enumerate() {
            area.set_entry(i * 16, msr, reset);
            area.set_entry(HOST_LIST + i * 16, msr, 0x1111);
        }
        assert_eq!(area.guest(MSR_PAT), Some(PAT_DEFAULT));
        assert_eq!(area.set_guest(MSR_LSTAR, 0xffff_ffff_8100_0000), Some(()));
        assert_eq!(area.guest(MSR_LSTAR), Some(0xffff_ffff_8100_0000));
        assert_eq!(area.guest(MSR_EFER), None, "EFER has a VMCS field, not a list entry");
        assert_eq!(&page[16..24], &[0x81, 0, 0, 0xc0, 0, 0, 0, 0], "STAR second, reserved half zero");
        assert_eq!(&page[HOST_LIST + 8..HOST_LIST + 16], &0x1111u64.to_le_bytes());
        assert_eq!(page[HOST_LIST + 16 * AREA_MSRS.len()], 0xaa, "nothing written past the host list");
        // TSC_AUX is last, so a CPU without RDTSCP lists one fewer and nothing else moves.
        assert_eq!(AREA_MSRS[AREA_MSRS.len() - 1].0, MSR_TSC_AUX);
    }

    #[test]
    fn controls_add_must_be_one_bits_and_refuse_unavailable_ones() {
        // Allowed-0 (must be one) = 0x16, allowed-1 = 0xff.
        let cap = (0xffu64 << 32) | 0x16;
        assert_eq!(adjust_controls("x", 0x81, cap).unwrap(), 0x97);
        assert_eq!(
            adjust_controls("x", 0x100, cap),
            Err(ArchError::ControlUnsupported { control: "x", missing: 0x100 })
        );
    }
}
