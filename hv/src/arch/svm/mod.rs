//! AMD SVM backend (APM Vol. 2 chapter 15): enable SVM, build a VMCB with nested
//! paging, run the guest with VMRUN and decode #VMEXIT into the arch-neutral exit.
//!
//! Works without NRIPS, VMCB clean bits and decode assists, which QEMU's TCG does not
//! emulate: the VMCB is always marked fully dirty and RIP advances (later issues) use
//! known instruction lengths.
//!
//! Guest state VMRUN does not switch, and how this backend switches it:
//! - FS, GS, TR, LDTR (hidden parts included), KernelGsBase, STAR, LSTAR, CSTAR,
//!   SFMASK and SYSENTER_CS/ESP/EIP are loaded by VMLOAD and saved by VMSAVE, not by
//!   VMRUN/#VMEXIT (APM Vol. 2 15.5.2). `hv_svm_run` VMSAVEs the host's copy into a
//!   per-CPU page, VMLOADs the guest's from its VMCB, runs it, VMSAVEs the guest's
//!   back into the VMCB and VMLOADs the host's, all inside CLGI/STGI, so no interrupt
//!   ever runs on the guest's TR or GS base, and the VMCB always holds the guest's
//!   current values (for the MSR emulation and for snapshots).
//! - x87/SSE/AVX state and XCR0: [`super::fpu`], around VMRUN.
//! - IA32_TSC_AUX has no VMCB field (outside SEV-ES): WRMSR'd around VMRUN when the
//!   guest's value differs from the host's.
//! - The TSC: VMCB TSC_OFFSET (15.30.5).

pub mod vmcb;

use core::arch::global_asm;

use self::vmcb::{Segment, Vmcb};
use super::fpu::{GuestFpu, HostFpu};
use super::state::{self, DescriptorTable, PendingEvent, SegmentRegister, VcpuSnapshot};
use super::{
    ArchError, Backend, ControlState, Exit, ExitReason, GuestEntry, GuestMsr, GuestRegs, PagingState, SegmentBases,
    Vcpu,
};
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::nested::Npt;
use crate::platform::caps::Capabilities;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;

/// SVM on this physical CPU: the host save area VMRUN uses, the page VMSAVE keeps the
/// host's FS/GS/TR/LDTR and syscall MSRs in while a guest runs, and what the FPU
/// switch can do here.
#[derive(Debug)]
pub struct Svm {
    /// Kept for the life of the hypervisor.
    _hsave: u64,
    fpu: HostFpu,
    /// The host's IA32_TSC_AUX (restored after a guest with another value ran); None
    /// where the CPU has no TSC_AUX.
    host_tsc_aux: Option<u64>,
}

/// One SVM vCPU: its VMCB and permission maps, its FPU state and the state VMRUN
/// does not switch.
#[derive(Debug)]
pub struct SvmVcpu {
    vmcb: u64,
    iopm: u64,
    msrpm: u64,
    fpu: GuestFpu,
    /// The guest's IA32_TSC_AUX and the host's (None: no such MSR on this CPU).
    tsc_aux: u64,
    host_tsc_aux: Option<u64>,
    /// A copy of VMCB TSC_OFFSET.
    tsc_offset: u64,
    /// The APIC ID of the CPU that ran it last, and its last exit code: for the
    /// report when a VMCB is found holding host state (`host_state_in_vmcb`).
    last_cpu: Option<u32>,
    last_exit: u64,
}

// Instruction lengths for the exits we emulate, since QEMU TCG has no NRIPS
// (APM Vol. 3: CPUID 0F A2, RDMSR 0F 32, WRMSR 0F 30, HLT F4, VMMCALL 0F 01 D9).
const LEN_CPUID: u64 = 2;
const LEN_MSR: u64 = 2;
const LEN_HLT: u64 = 1;
const LEN_VMMCALL: u64 = 3;
/// XSETBV: 0F 01 D1.
const LEN_XSETBV: u64 = 3;

impl Backend for Svm {
    type Paging = Npt;
    type Vcpu = SvmVcpu;
    const NAME: &'static str = "svm";
    const ARCH: guest_abi::Arch = guest_abi::Arch::Svm;
    /// VMMCALL: 0F 01 D9 (APM Vol. 3).
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];
    const VCPU_ON_ANY_CPU: bool = true;

    fn enable(_caps: &Capabilities, pool: &mut FramePool) -> Result<Self, ArchError> {
        let fpu = HostFpu::enable();
        // APM Vol. 2 15.4: the probe already refused SVMDIS=1 (VM_CR), so EFER.SVME
        // can be set. 15.30.4: VM_HSAVE_PA names the page where VMRUN saves host state.
        let hsave = pool.alloc_zeroed()?;
        let host_vmsave = pool.alloc_zeroed()?;
        // SAFETY: EFER and VM_HSAVE_PA exist on every SVM CPU (CPUID.80000001:ECX[2] checked by the probe). Setting
        // EFER.SVME only enables the SVM instructions; it does not change how the running code executes. The host
        // save area is a page we own for the life of the hypervisor.
        unsafe {
            let efer = x86::msr::rdmsr(MSR_EFER);
            x86::msr::wrmsr(MSR_EFER, efer | EFER_SVME);
            x86::msr::wrmsr(MSR_VM_HSAVE_PA, hsave);
        }
        // IA32_TSC_AUX exists with RDTSCP or RDPID (CPUID.80000001:EDX[27], 7.0:ECX[22]);
        // `-cpu qemu64,+svm` has neither, and then no guest is offered them either.
        let has_tsc_aux = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 27) != 0
            || core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 22) != 0;
        // SAFETY: read only where the MSR exists (above); reading has no side effects.
        let host_tsc_aux = has_tsc_aux.then(|| unsafe { x86::msr::rdmsr(MSR_TSC_AUX) });
        // The VMSAVE page is this CPU's (`PerCpu`): a vCPU may run on any CPU that
        // enabled SVM, and it saves the host state of the CPU it runs on.
        crate::percpu::this().set_host_save_page(host_vmsave);
        crate::println!(
            "SVM cpu apic={}: host save area {hsave:#x}, host VMSAVE page {host_vmsave:#x}",
            crate::percpu::this().apic_id
        );
        Ok(Self { _hsave: hsave, fpu, host_tsc_aux })
    }

    fn create_vcpu(&mut self, pool: &mut FramePool, entry: &GuestEntry) -> Result<SvmVcpu, ArchError> {
        let vmcb = pool.alloc_zeroed()?;
        // APM 15.10.1/15.11: intercept every I/O port and every MSR by setting all bits
        // of the I/O (12 KiB) and MSR (8 KiB) permission maps; the core emulates what
        // guests may use.
        let iopm = pool.alloc_contiguous_zeroed(3)?;
        let msrpm = pool.alloc_contiguous_zeroed(2)?;
        for page in (0..3).map(|i| iopm + i * 4096).chain((0..2).map(|i| msrpm + i * 4096)) {
            pool.bytes_mut(page)?.fill(0xff);
        }
        let vcpu = SvmVcpu {
            vmcb,
            iopm,
            msrpm,
            fpu: GuestFpu::new(&self.fpu),
            tsc_aux: 0,
            host_tsc_aux: self.host_tsc_aux,
            tsc_offset: 0,
            last_cpu: None,
            last_exit: 0,
        };
        vcpu.configure(pool, entry)?;
        Ok(vcpu)
    }
}

impl SvmVcpu {
    fn configure(&self, pool: &mut FramePool, entry: &GuestEntry) -> Result<(), ArchError> {
        let mut v = Vmcb(pool.bytes_mut(self.vmcb)?);
        // Control area (APM Vol. 2 15.9-15.13, Appendix B Table B-1). Of the guest's
        // own exceptions #DF is intercepted, to report why a guest dies, and #UD, for
        // VMCALL (Intel's hypercall) after a cross-vendor migration (15.12,
        // `domain::exit::ud`); the rest go through the guest's IDT as on hardware.
        v.set(vmcb::INTERCEPT_EXCEPTIONS, (1 << 8) | (1 << 6));
        // Vector 3: INTR(0, our time slices), CPUID(18), HLT(24), IOIO_PROT(27),
        // MSR_PROT(28), SHUTDOWN(31).
        v.set(vmcb::INTERCEPT_MISC1, 1 | (1 << 18) | (1 << 24) | (1 << 27) | (1 << 28) | (1 << 31));
        // Vector 4: VMRUN(0, required by 15.5.1), VMMCALL(1), VMLOAD(2), VMSAVE(3),
        // STGI(4), CLGI(5), SKINIT(6): a guest never runs SVM instructions itself.
        // XSETBV(13): XCR0 is switched by the core and limited to the policy (15.5.1:
        // VMRUN does not switch XCR0).
        v.set(vmcb::INTERCEPT_MISC2, 0x7f | (1 << 13));
        v.set(vmcb::IOPM_BASE_PA, self.iopm);
        v.set(vmcb::MSRPM_BASE_PA, self.msrpm);
        v.set(vmcb::GUEST_ASID, 1); // ASID 0 is the host's (15.16)
        v.set(vmcb::TLB_CONTROL, 1); // flush this guest's TLB entries on VMRUN
        // 15.21.1: V_INTR_MASKING=1: the host's RFLAGS.IF (not the guest's) gates
        // physical interrupts while the guest runs, so our timer always gets through.
        v.set(vmcb::V_INTR, 1 << 24);
        v.set(vmcb::NP_ENABLE, 1); // 15.25.3
        v.set(vmcb::N_CR3, entry.nested_root);
        v.set(vmcb::VMCB_CLEAN, 0);

        // State-save area: a 64-bit guest at CPL0 with flat segments (Table B-2).
        // Attributes are the descriptor's bits 40-47 and 52-55 packed into 12 bits.
        v.set_segment(Segment::Cs, 0x08, 0x0a9b, 0xffff_ffff, 0); // L, G, P, code R/X
        for seg in [Segment::Ds, Segment::Es, Segment::Ss, Segment::Fs, Segment::Gs] {
            v.set_segment(seg, 0x10, 0x0c93, 0xffff_ffff, 0); // D/B, G, P, data R/W
        }
        v.set_segment(Segment::Tr, 0x18, 0x008b, 0x67, 0); // busy 64-bit TSS
        v.set_segment(Segment::Ldtr, 0, 0x0082, 0, 0);
        v.set_segment(Segment::Gdtr, 0, 0, 0xffff, 0);
        v.set_segment(Segment::Idtr, 0, 0, 0xffff, 0);
        v.set(vmcb::CPL, 0);
        // 15.5.1: guest EFER.SVME must be 1; long mode active (LME, LMA).
        v.set(vmcb::EFER, EFER_SVME | EFER_LME | EFER_LMA);
        v.set(vmcb::CR0, 0x8001_0031); // PG, WP, NE, ET, PE
        v.set(vmcb::CR3, entry.cr3);
        v.set(vmcb::CR4, 1 << 5); // PAE
        v.set(vmcb::DR7, 0x400);
        v.set(vmcb::DR6, 0xffff_0ff0);
        v.set(vmcb::RFLAGS, 0x2);
        v.set(vmcb::RIP, entry.rip);
        v.set(vmcb::RSP, entry.rsp);
        v.set(vmcb::RAX, 0);
        v.set(vmcb::G_PAT, 0x0007_0406_0007_0406); // power-on default PAT
        Ok(())
    }

    /// The error for a VMCB found holding host state on CPU `me`.
    fn holds_host_state(&mut self, at_vmexit: bool, me: u32, rip_before: u64) -> ArchError {
        let v = self.vmcb();
        let exit_code = v.get(vmcb::EXITCODE);
        let exit_info = [v.get(vmcb::EXITINFO1), v.get(vmcb::EXITINFO2)];
        let found_rip_rsp = [v.get(vmcb::RIP), v.get(vmcb::RSP)];
        let (found_rax, found_cpl) = (v.get(vmcb::RAX), v.get(vmcb::CPL));
        let rsp_here: u64;
        // SAFETY: reads the stack pointer into a register; no memory is touched.
        unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp_here, options(nomem, nostack, preserves_flags)) };
        // SAFETY: VM_HSAVE_PA exists on every CPU that enabled SVM (`run` checked this
        // CPU did); reading it has no side effects.
        let hsave = unsafe { x86::msr::rdmsr(MSR_VM_HSAVE_PA) };
        ArchError::VmcbHoldsHostState {
            at_vmexit,
            vmcb: self.vmcb,
            hsave,
            exit_code,
            exit_info,
            found_rip_rsp,
            rip_before,
            found_rax,
            found_cpl,
            rsp_here,
            cpu: me,
            last_cpu: self.last_cpu,
            last_exit: self.last_exit,
        }
    }

    fn vmcb(&mut self) -> Vmcb<'_> {
        // SAFETY: the VMCB frame was allocated for this vCPU in `create_vcpu` and is
        // only reached through `&mut self`, so no other reference to it exists; the
        // processor touches it only inside `run`, which holds `&mut self`.
        Vmcb(unsafe { &mut *(self.vmcb as *mut [u8; 4096]) })
    }
}

impl Vcpu for SvmVcpu {
    fn run(&mut self, regs: &mut GuestRegs, slice: Option<u64>) -> Result<Exit, ArchError> {
        // The CPU this runs on: its own VMSAVE page for the host's state (APM 15.5.2),
        // set when it enabled SVM. A vCPU can run on any CPU that did.
        let host_vmsave = crate::percpu::this().host_save_page();
        if host_vmsave == 0 {
            return Err(ArchError::Unsupported("SVM is not enabled on this physical CPU (no host VMSAVE page)"));
        }
        let me = crate::percpu::this().apic_id;
        // SAFETY: reading CR3 has no side effects; the hypervisor runs at CPL0.
        let host_cr3 = unsafe { x86::controlregs::cr3() };
        // Only the label's address is taken (`addr_of!` on an extern static is safe).
        let vmrun_return = core::ptr::addr_of!(hv_svm_vmrun_return) as u64;
        if host_state_in_vmcb(&self.vmcb(), host_cr3, vmrun_return) {
            return Err(self.holds_host_state(false, me, 0));
        }
        let rip_before = self.vmcb().get(vmcb::RIP);
        self.vmcb().set(vmcb::RAX, regs.rax);
        if let Some(ticks) = slice {
            crate::percpu::this().lapic.arm_one_shot(ticks);
        }
        let host_aux = self.host_tsc_aux.filter(|h| *h != self.tsc_aux);
        // SAFETY: the hypervisor runs with interrupts off here and executes no x87/SSE code (soft-float target), so
        // the registers are this vCPU's from here to `save`; TSC_AUX exists on every SVM CPU and the host does not
        // read it (no RDTSCP/RDPID in the hypervisor) until it is put back below.
        unsafe {
            self.fpu.load();
            if host_aux.is_some() {
                x86::msr::wrmsr(MSR_TSC_AUX, self.tsc_aux);
            }
        }
        // The VMCB describes a guest whose memory is mapped only through our nested tables and intercepts VMRUN,
        // all SVM instructions, I/O and MSRs; the host VMSAVE page is this CPU's own (checked non-zero above).
        // SAFETY: EFER.SVME and VM_HSAVE_PA were set on this CPU by `enable` (which also set its VMSAVE page);
        // hv_svm_run saves and restores every callee-saved register and follows the SysV ABI it is declared with.
        unsafe { hv_svm_run(self.vmcb, regs, host_vmsave) };
        // SAFETY: as above: the registers still hold this vCPU's state.
        unsafe {
            self.fpu.save();
            if let Some(h) = host_aux {
                x86::msr::wrmsr(MSR_TSC_AUX, h);
            }
        }
        if slice.is_some() {
            crate::percpu::this().lapic.disarm();
        }
        let last_cpu = self.last_cpu.replace(me);
        let code = self.vmcb().get(vmcb::EXITCODE);
        if host_state_in_vmcb(&self.vmcb(), host_cr3, vmrun_return) {
            self.last_cpu = last_cpu;
            return Err(self.holds_host_state(true, me, rip_before));
        }
        self.last_exit = code;
        let mut v = self.vmcb();
        // An event we injected has been delivered by now, unless this #VMEXIT cut its
        // delivery short (a nested page fault on the guest's stack or IDT, say): then
        // it goes in again at the next VMRUN (15.7.2), as the hardware would not.
        v.set(vmcb::EVENTINJ, redelivery(v.get(vmcb::EXITINTINFO)));
        regs.rax = v.get(vmcb::RAX);
        let info1 = v.get(vmcb::EXITINFO1);
        let info2 = v.get(vmcb::EXITINFO2);
        let rip = v.get(vmcb::RIP);
        let (reason, instruction_len) = match code {
            vmcb::exit::VMMCALL => (ExitReason::Hypercall, LEN_VMMCALL),
            vmcb::exit::HLT => (ExitReason::Hlt, LEN_HLT),
            vmcb::exit::SHUTDOWN => (ExitReason::TripleFault, 0),
            // APM 15.25.6: EXITINFO1 is the #PF-style error code (bit 1: write),
            // EXITINFO2 the faulting guest-physical address.
            vmcb::exit::NPF => (ExitReason::NestedPageFault { gpa: info2, write: info1 & 2 != 0 }, 0),
            vmcb::exit::CPUID => (ExitReason::Cpuid, LEN_CPUID),
            vmcb::exit::XSETBV => (ExitReason::Xsetbv, LEN_XSETBV),
            // 15.10.2: EXITINFO1 bit 0 = IN, bit 2 = string, bits 6:4 = size one-hot,
            // bits 31:16 = port; EXITINFO2 = the next instruction's RIP.
            vmcb::exit::IOIO => {
                let size = match (info1 >> 4) & 0x7 {
                    1 => 1,
                    2 => 2,
                    _ => 4,
                };
                let reason =
                    ExitReason::Io { port: (info1 >> 16) as u16, size, input: info1 & 1 != 0, string: info1 & 4 != 0 };
                (reason, info2.wrapping_sub(rip))
            }
            // 15.11: EXITINFO1 = 0 for RDMSR, 1 for WRMSR.
            vmcb::exit::MSR if info1 == 0 => (ExitReason::MsrRead, LEN_MSR),
            vmcb::exit::MSR => (ExitReason::MsrWrite, LEN_MSR),
            vmcb::exit::INTR => (ExitReason::TimeSliceEnd, 0),
            vmcb::exit::VINTR => (ExitReason::InterruptWindow, 0),
            vmcb::exit::VMRUN..=vmcb::exit::SKINIT => (ExitReason::VirtualizationInstruction, 0),
            // QEMU stores the 32-bit -1 (its exit codes are `uint32_t`); hardware the 64-bit one.
            vmcb::exit::INVALID | vmcb::exit::INVALID_32 => return Err(ArchError::VmrunInvalid),
            c if (vmcb::exit::EXCP_BASE..vmcb::exit::EXCP_BASE + 32).contains(&c) => {
                (ExitReason::Exception { vector: (c - vmcb::exit::EXCP_BASE) as u8 }, 0)
            }
            c => (ExitReason::Other { code: c }, 0),
        };
        Ok(Exit { reason, rip, instruction_len })
    }

    fn skip_instruction(&mut self, exit: &Exit) -> Result<(), ArchError> {
        if exit.instruction_len == 0 || exit.instruction_len > 15 {
            return Err(ArchError::Unsupported("skipping an instruction of unknown length"));
        }
        let mut v = self.vmcb();
        let rip = v.get(vmcb::RIP);
        v.set(vmcb::RIP, rip.wrapping_add(exit.instruction_len));
        // The instruction retired, so a shadow of the STI or MOV SS before it is over
        // (APM 15.21.5): without this, `sti; hlt` followed by `cli` never lets a pending
        // interrupt in, as KVM also found.
        let shadow = v.get(vmcb::INTERRUPT_SHADOW);
        v.set(vmcb::INTERRUPT_SHADOW, shadow & !1);
        Ok(())
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), ArchError> {
        // APM 15.20: EVENTINJ = vector | TYPE 3 (exception) << 8 | EV << 11 | V << 31,
        // error code in bits 63:32.
        let mut event = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(ec) = error_code {
            event |= (1 << 11) | (u64::from(ec) << 32);
        }
        self.vmcb().set(vmcb::EVENTINJ, event);
        Ok(())
    }

    fn can_inject_interrupt(&mut self) -> Result<bool, ArchError> {
        let v = self.vmcb();
        // APM 15.20/15.21.4: an INTR is taken when RFLAGS.IF is set and no interrupt
        // shadow (0x068 bit 0) is active; one EVENTINJ at a time.
        Ok(v.get(vmcb::RFLAGS) & RFLAGS_IF != 0
            && v.get(vmcb::INTERRUPT_SHADOW) & 1 == 0
            && v.get(vmcb::EVENTINJ) & (1 << 31) == 0)
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), ArchError> {
        // APM 15.20: EVENTINJ = vector | TYPE 0 (INTR) << 8 | V << 31.
        self.vmcb().set(vmcb::EVENTINJ, u64::from(vector) | (1 << 31));
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) -> Result<(), ArchError> {
        // APM 15.21.4: V_IRQ (V_INTR bit 8) with V_IGN_TPR (bit 20) and priority 0xF
        // (bits 19:16) makes a virtual interrupt pending that the guest takes as soon as
        // its IF and shadow allow; intercepting VINTR (vector 3 bit 4) turns that moment
        // into a #VMEXIT instead, where the core injects the real one. V_INTR_MASKING
        // (bit 24) stays set.
        const V_IRQ: u64 = (1 << 8) | (0xf << 16) | (1 << 20);
        let mut v = self.vmcb();
        let (vintr, misc1) = (v.get(vmcb::V_INTR), v.get(vmcb::INTERCEPT_MISC1));
        if on {
            v.set(vmcb::V_INTR, vintr | V_IRQ);
            v.set(vmcb::INTERCEPT_MISC1, misc1 | (1 << 4));
        } else {
            v.set(vmcb::V_INTR, vintr & !V_IRQ);
            v.set(vmcb::INTERCEPT_MISC1, misc1 & !(1 << 4));
        }
        Ok(())
    }

    fn control_state(&mut self) -> Result<ControlState, ArchError> {
        let v = self.vmcb();
        Ok(ControlState { cr0: v.get(vmcb::CR0), cr4: v.get(vmcb::CR4), cpl: v.get(vmcb::CPL) & 3 })
    }

    fn read_msr(&mut self, msr: GuestMsr) -> Result<u64, ArchError> {
        // `hv_svm_run` VMSAVEs after every #VMEXIT, so the VMLOAD/VMSAVE fields are the
        // guest's current values (15.5.2).
        let v = self.vmcb();
        Ok(match msr {
            GuestMsr::Efer => v.get(vmcb::EFER) & !EFER_SVME,
            GuestMsr::Pat => v.get(vmcb::G_PAT),
            GuestMsr::Star => v.get(vmcb::STAR),
            GuestMsr::Lstar => v.get(vmcb::LSTAR),
            GuestMsr::Cstar => v.get(vmcb::CSTAR),
            GuestMsr::Sfmask => v.get(vmcb::SFMASK),
            GuestMsr::KernelGsBase => v.get(vmcb::KERNEL_GS_BASE),
            GuestMsr::FsBase => v.segment(Segment::Fs).3,
            GuestMsr::GsBase => v.segment(Segment::Gs).3,
            GuestMsr::SysenterCs => v.get(vmcb::SYSENTER_CS),
            GuestMsr::SysenterEsp => v.get(vmcb::SYSENTER_ESP),
            GuestMsr::SysenterEip => v.get(vmcb::SYSENTER_EIP),
            GuestMsr::TscAux => self.tsc_aux,
        })
    }

    fn write_msr(&mut self, msr: GuestMsr, value: u64) -> Result<(), ArchError> {
        let mut v = self.vmcb();
        match msr {
            // 15.5.1: EFER.SVME stays set in the guest's EFER.
            GuestMsr::Efer => v.set(vmcb::EFER, value | EFER_SVME),
            GuestMsr::Pat => v.set(vmcb::G_PAT, value),
            GuestMsr::Star => v.set(vmcb::STAR, value),
            GuestMsr::Lstar => v.set(vmcb::LSTAR, value),
            GuestMsr::Cstar => v.set(vmcb::CSTAR, value),
            GuestMsr::Sfmask => v.set(vmcb::SFMASK, value),
            GuestMsr::KernelGsBase => v.set(vmcb::KERNEL_GS_BASE, value),
            GuestMsr::FsBase => {
                let (sel, attr, limit, _) = v.segment(Segment::Fs);
                v.set_segment(Segment::Fs, sel, attr, limit, value);
            }
            GuestMsr::GsBase => {
                let (sel, attr, limit, _) = v.segment(Segment::Gs);
                v.set_segment(Segment::Gs, sel, attr, limit, value);
            }
            GuestMsr::SysenterCs => v.set(vmcb::SYSENTER_CS, value),
            GuestMsr::SysenterEsp => v.set(vmcb::SYSENTER_ESP, value),
            GuestMsr::SysenterEip => v.set(vmcb::SYSENTER_EIP, value),
            GuestMsr::TscAux if self.host_tsc_aux.is_none() => {
                return Err(ArchError::Unsupported("IA32_TSC_AUX on a CPU without RDTSCP or RDPID"));
            }
            GuestMsr::TscAux => self.tsc_aux = value,
        }
        Ok(())
    }

    fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    fn set_tsc_offset(&mut self, offset: u64) -> Result<(), ArchError> {
        self.tsc_offset = offset;
        self.vmcb().set(vmcb::TSC_OFFSET, offset);
        Ok(())
    }

    fn fpu(&self) -> &GuestFpu {
        &self.fpu
    }

    fn fpu_mut(&mut self) -> &mut GuestFpu {
        &mut self.fpu
    }

    fn paging_state(&mut self) -> Result<PagingState, ArchError> {
        let v = self.vmcb();
        // The state-save area (APM Vol. 2 Appendix B, Table B-2), read as `save_state`
        // reads it: EFER without our SVME, the CPL from its own field (15.5.1), the
        // segments through `Vmcb::segment`. FS and GS bases carry the VMLOAD caveat
        // noted at `save_state`.
        let (selector, attributes, limit, base) = v.segment(Segment::Cs);
        let base_of = |s: Segment| v.segment(s).3;
        Ok(PagingState {
            cr0: v.get(vmcb::CR0),
            cr3: v.get(vmcb::CR3),
            cr4: v.get(vmcb::CR4),
            efer: v.get(vmcb::EFER) & !EFER_SVME,
            rip: v.get(vmcb::RIP),
            rsp: v.get(vmcb::RSP),
            cpl: v.get(vmcb::CPL) & 3,
            cs: SegmentRegister { selector, attributes, limit, base },
            bases: SegmentBases {
                es: base_of(Segment::Es),
                ss: base_of(Segment::Ss),
                ds: base_of(Segment::Ds),
                fs: base_of(Segment::Fs),
                gs: base_of(Segment::Gs),
            },
        })
    }

    // The state-save area (APM Vol. 2 Appendix B, Table B-2) holds everything the
    // snapshot needs: FS, GS, TR, LDTR, STAR, LSTAR, CSTAR, SFMASK, KernelGsBase and
    // SYSENTER_* are VMSAVEd into it after every #VMEXIT and VMLOADed from it before
    // every VMRUN (15.5.2, `hv_svm_run`).
    fn save_state(&mut self, regs: &GuestRegs) -> Result<VcpuSnapshot, ArchError> {
        let v = self.vmcb();
        let seg = |s: Segment| {
            let (selector, attributes, limit, base) = v.segment(s);
            SegmentRegister { selector, attributes, limit, base }
        };
        let table = |s: Segment| {
            let (_, _, limit, base) = v.segment(s);
            DescriptorTable { base, limit: limit as u16 }
        };
        // The snapshot keeps the CPL as SS.DPL (state.rs); the VMCB has its own CPL
        // field (0x0CB), which is what VMRUN uses (15.5.1).
        let mut ss = seg(Segment::Ss);
        ss.attributes = (ss.attributes & !state::ATTR_DPL) | (u16::from(v.get(vmcb::CPL) & 3) << 5);
        let rflags = v.get(vmcb::RFLAGS);
        // 0x068 bit 0: one shadow bit for STI and MOV SS. STI sets IF, so a shadow with
        // IF clear can only come from MOV SS / POP SS; with IF set we call it STI
        // (MOV SS also blocks #DB, which is then lost). NMI blocking is kept inside the
        // processor, not in the VMCB (without vNMI), so it cannot be saved.
        let interruptibility = match (v.get(vmcb::INTERRUPT_SHADOW) & 1 != 0, rflags & RFLAGS_IF != 0) {
            (false, _) => 0,
            (true, true) => state::BLOCKING_BY_STI,
            (true, false) => state::BLOCKING_BY_MOV_SS,
        };
        // 15.20: EVENTINJ still valid = injected by the core and not yet delivered, or
        // put back by `run` because the #VMEXIT cut its delivery short. Otherwise 15.7.2: EXITINTINFO valid = the
        // #VMEXIT interrupted the delivery of that event. INTn (type 4) and INT3/INTO
        // (type 3, vectors 3 and 4) are not carried from EXITINTINFO: RIP still points
        // at the instruction, which raises them again when re-executed.
        let eventinj = v.get(vmcb::EVENTINJ);
        let exitintinfo = v.get(vmcb::EXITINTINFO);
        let pending_event = if eventinj & (1 << 31) != 0 {
            PendingEvent::from_interruption_info(eventinj as u32, (eventinj >> 32) as u32)
        } else {
            cut_short(exitintinfo)
        };
        if pending_event.as_ref().is_some_and(|e| !e.kind_is_known()) {
            return Err(ArchError::Unsupported("saving a pending event of an unknown EVENTINJ type"));
        }
        Ok(VcpuSnapshot {
            // `run` copies the VMCB's RAX into `regs` at each #VMEXIT and back before
            // VMRUN, so the core's copy (possibly changed by emulation) is current.
            regs: *regs,
            rsp: v.get(vmcb::RSP),
            rip: v.get(vmcb::RIP),
            rflags,
            cr0: v.get(vmcb::CR0),
            cr2: v.get(vmcb::CR2),
            cr3: v.get(vmcb::CR3),
            cr4: v.get(vmcb::CR4),
            // EFER.SVME is ours (15.5.1 requires it in the guest's EFER); the guest
            // never sees it (domain::msr).
            efer: v.get(vmcb::EFER) & !EFER_SVME,
            dr6: v.get(vmcb::DR6),
            dr7: v.get(vmcb::DR7),
            pat: v.get(vmcb::G_PAT),
            cs: seg(Segment::Cs),
            ds: seg(Segment::Ds),
            es: seg(Segment::Es),
            fs: seg(Segment::Fs),
            gs: seg(Segment::Gs),
            ss,
            tr: seg(Segment::Tr),
            ldtr: seg(Segment::Ldtr),
            gdtr: table(Segment::Gdtr),
            idtr: table(Segment::Idtr),
            sysenter_cs: v.get(vmcb::SYSENTER_CS),
            sysenter_esp: v.get(vmcb::SYSENTER_ESP),
            sysenter_eip: v.get(vmcb::SYSENTER_EIP),
            star: v.get(vmcb::STAR),
            lstar: v.get(vmcb::LSTAR),
            cstar: v.get(vmcb::CSTAR),
            sfmask: v.get(vmcb::SFMASK),
            kernel_gs_base: v.get(vmcb::KERNEL_GS_BASE),
            interruptibility,
            pending_event,
        })
    }

    fn load_state(&mut self, regs: &mut GuestRegs, snapshot: &VcpuSnapshot) -> Result<(), ArchError> {
        let s = snapshot;
        if s.pending_event.as_ref().is_some_and(|e| !e.kind_is_known()) {
            return Err(ArchError::InvalidSnapshot("pending event of an unknown kind"));
        }
        let mut v = self.vmcb();
        // Table B-2, mirroring `configure`. Values VMRUN's consistency checks refuse
        // (15.5.1: e.g. CR0.PG without PE, reserved DR6/DR7/EFER bits, a bad G_PAT)
        // surface as ArchError::VmrunInvalid at the next `run`.
        for (seg, r) in [
            (Segment::Cs, &s.cs),
            (Segment::Ds, &s.ds),
            (Segment::Es, &s.es),
            (Segment::Fs, &s.fs),
            (Segment::Gs, &s.gs),
            (Segment::Ss, &s.ss),
            (Segment::Tr, &s.tr),
            (Segment::Ldtr, &s.ldtr),
        ] {
            v.set_segment(seg, r.selector, r.attributes, r.limit, r.base);
        }
        v.set_segment(Segment::Gdtr, 0, 0, s.gdtr.limit.into(), s.gdtr.base);
        v.set_segment(Segment::Idtr, 0, 0, s.idtr.limit.into(), s.idtr.base);
        // The CPL is SS.DPL in the snapshot; VMRUN takes it from the CPL field.
        v.set(vmcb::CPL, ((s.ss.attributes & state::ATTR_DPL) >> 5) as u8);
        v.set(vmcb::EFER, s.efer | EFER_SVME);
        v.set(vmcb::CR0, s.cr0);
        v.set(vmcb::CR2, s.cr2);
        v.set(vmcb::CR3, s.cr3);
        v.set(vmcb::CR4, s.cr4);
        v.set(vmcb::DR7, s.dr7);
        v.set(vmcb::DR6, s.dr6);
        v.set(vmcb::RFLAGS, s.rflags);
        v.set(vmcb::RIP, s.rip);
        v.set(vmcb::RSP, s.rsp);
        v.set(vmcb::RAX, s.regs.rax);
        v.set(vmcb::G_PAT, s.pat);
        v.set(vmcb::STAR, s.star);
        v.set(vmcb::LSTAR, s.lstar);
        v.set(vmcb::CSTAR, s.cstar);
        v.set(vmcb::SFMASK, s.sfmask);
        v.set(vmcb::KERNEL_GS_BASE, s.kernel_gs_base);
        v.set(vmcb::SYSENTER_CS, s.sysenter_cs);
        v.set(vmcb::SYSENTER_ESP, s.sysenter_esp);
        v.set(vmcb::SYSENTER_EIP, s.sysenter_eip);
        // One shadow bit for STI and MOV SS blocking; NMI blocking has no VMCB field
        // (without vNMI) and is dropped.
        let shadow = u64::from(s.interruptibility & (state::BLOCKING_BY_STI | state::BLOCKING_BY_MOV_SS) != 0);
        let old = v.get(vmcb::INTERRUPT_SHADOW);
        v.set(vmcb::INTERRUPT_SHADOW, (old & !1) | shadow);
        // 15.20: EVENTINJ = vector | TYPE << 8 | EV << 11 | V << 31, error code in
        // 63:32. A software interrupt (TYPE 4) pushes the VMCB's RIP as the return
        // address, which is the snapshot's convention for kind 4.
        let event = s
            .pending_event
            .map_or(0, |e| u64::from(e.to_interruption_info()) | (u64::from(e.error_code.unwrap_or(0)) << 32));
        v.set(vmcb::EVENTINJ, event);
        // The previous exit's interrupted event (if any) belongs to the old state.
        v.set(vmcb::EXITINTINFO, 0);
        // 15.15: clean bits 0 = the processor reloads every VMCB field at VMRUN.
        v.set(vmcb::VMCB_CLEAN, 0);
        *regs = s.regs;
        Ok(())
    }

    fn flush_nested_tlb(&mut self) -> Result<(), ArchError> {
        // TLB_CONTROL is 1 in every VMCB we build (APM 15.16.1: flush this guest's
        // entries on each VMRUN), so changed nested entries take effect at next entry.
        Ok(())
    }

    fn destroy(self, pool: &mut FramePool) -> Result<(), MmError> {
        pool.free(self.vmcb)?;
        for i in 0..3 {
            pool.free(self.iopm + i * 4096)?;
        }
        for i in 0..2 {
            pool.free(self.msrpm + i * 4096)?;
        }
        Ok(())
    }
}

unsafe extern "sysv64" {
    /// Enter the guest described by the VMCB at physical address `vmcb` with the
    /// general registers in `regs`; return at #VMEXIT with the guest's registers
    /// stored back into `regs` (RAX and RSP are in the VMCB).
    fn hv_svm_run(vmcb: u64, regs: *mut GuestRegs, host_vmsave: u64);
    /// The instruction after `vmrun` in `hv_svm_run`: the host RIP VMRUN saves.
    static hv_svm_vmrun_return: u8;
}

/// The event a #VMEXIT with this EXITINTINFO cut short, when its delivery must be
/// redone (APM Vol. 2 15.7.2; EXITINTINFO has EVENTINJ's layout). QEMU TCG records an
/// interrupted external interrupt as type 3 (exception) with its vector (0x20-0xff):
/// its `do_interrupt_all` marks every non-software event so. Put back as an exception,
/// VMRUN refuses it (15.20: exceptions are vectors 0-31), so that is an external
/// interrupt, which is what hardware reports (type 0).
fn cut_short(exitintinfo: u64) -> Option<PendingEvent> {
    let mut event = PendingEvent::from_interruption_info(exitintinfo as u32, (exitintinfo >> 32) as u32)?;
    if event.kind == state::EVENT_EXCEPTION && event.vector >= 32 {
        event = PendingEvent { kind: state::EVENT_EXTERNAL_INTERRUPT, error_code: None, ..event };
    }
    Some(event).filter(PendingEvent::redelivered_after_exit)
}

/// EVENTINJ for the next VMRUN after a #VMEXIT with this EXITINTINFO: the event
/// [`cut_short`] finds (error code in 63:32, 15.20), else 0.
fn redelivery(exitintinfo: u64) -> u64 {
    cut_short(exitintinfo)
        .map_or(0, |e| u64::from(e.to_interruption_info()) | (u64::from(e.error_code.unwrap_or(0)) << 32))
}

/// Whether a VMCB's state-save area holds this CPU's host state instead of a guest's:
/// the host's CR3 with the RIP that VMRUN saves for the host (the instruction after
/// `vmrun`). No guest can be there (its code would be this hypervisor's, at the
/// hypervisor's address, with the hypervisor's page tables). QEMU writes the host state
/// into the VMCB when a VMRUN fails its checks after saving the host (VMEXIT_INVALID,
/// APM Vol. 2 15.5.1), and QEMU 7.2's multi-threaded TCG does it when its #VMEXIT
/// leaves nested paging on, so that the host's first fetch takes a second #VMEXIT (NPF)
/// from host mode (README, SMP); running such a VMCB again would run the host as a guest.
fn host_state_in_vmcb(v: &Vmcb<'_>, host_cr3: u64, vmrun_return: u64) -> bool {
    v.get(vmcb::RIP) == vmrun_return && v.get(vmcb::CR3) & !0xfff == host_cr3 & !0xfff
}

// APM Vol. 2 15.5 (VMRUN) and 15.6 (#VMEXIT): VMRUN saves the host's RAX, RSP, RIP,
// RFLAGS, segment and control registers to VM_HSAVE_PA and restores them at #VMEXIT;
// every other general register is left holding the guest's value, so we save the
// host's callee-saved registers around it and swap the guest's into `regs`.
// CLGI/STGI bracket the world switch so no interrupt can arrive in the host half of
// it, nor while VMLOAD has put the guest's TR and GS base in place (15.5.2: VMSAVE
// the host's FS/GS/TR/LDTR/KernelGsBase/STAR/LSTAR/CSTAR/SFMASK/SYSENTER_* into
// `host_vmsave`, VMLOAD the guest's from its VMCB; after #VMEXIT the reverse). Host RFLAGS.IF is set inside that window so that, with V_INTR_MASKING, a
// physical interrupt (the LAPIC timer that ends a time slice) causes #VMEXIT(INTR)
// (15.21.1); STGI then lets it be taken by our IDT, which acknowledges it, and CLI
// returns to running with interrupts off.
global_asm!(
    ".global hv_svm_run",
    "hv_svm_run:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdx", // host VMSAVE page, at [rsp + 8] after the exit
    "push rsi", // GuestRegs pointer, found again at [rsp] after the exit
    "clgi",
    "mov rax, rdx",
    "vmsave rax",   // the host's FS/GS/TR/LDTR and syscall MSRs
    "mov rax, rdi", // VMCB physical address, VMLOAD's and VMRUN's operand
    "vmload rax",   // the guest's
    "mov rbx, [rsi + 8*1]",
    "mov rcx, [rsi + 8*2]",
    "mov rdx, [rsi + 8*3]",
    "mov rdi, [rsi + 8*5]",
    "mov rbp, [rsi + 8*6]",
    "mov r8, [rsi + 8*7]",
    "mov r9, [rsi + 8*8]",
    "mov r10, [rsi + 8*9]",
    "mov r11, [rsi + 8*10]",
    "mov r12, [rsi + 8*11]",
    "mov r13, [rsi + 8*12]",
    "mov r14, [rsi + 8*13]",
    "mov r15, [rsi + 8*14]",
    "mov rsi, [rsi + 8*4]",
    "sti", // GIF=0 still blocks interrupts; the guest runs with HIF=1
    // STI's one-instruction interrupt shadow ends here, not on VMRUN: QEMU 7.2's
    // VMRUN neither loads nor clears the shadow (helper_vmrun), so the guest's first
    // instruction would inherit the host's, and an immediate #VMEXIT reports a guest
    // interrupt shadow (INTERRUPT_SHADOW) that the guest never had.
    "nop",
    "vmrun rax", // #VMEXIT gives RAX back (the VMCB address, from the host save area)
    ".global hv_svm_vmrun_return",
    "hv_svm_vmrun_return:", // the host RIP VMRUN saves; `host_state_in_vmcb` looks for it
    "vmsave rax",           // the guest's FS/GS/TR/LDTR and syscall MSRs into its VMCB
    "mov rax, [rsp + 8]",
    "vmload rax", // the host's back, before any interrupt can be taken
    "stgi",       // a pending physical interrupt (our timer) is taken here
    "cli",
    "push rsi",           // guest RSI
    "mov rsi, [rsp + 8]", // GuestRegs pointer
    "mov [rsi + 8*1], rbx",
    "mov [rsi + 8*2], rcx",
    "mov [rsi + 8*3], rdx",
    "mov [rsi + 8*5], rdi",
    "mov [rsi + 8*6], rbp",
    "mov [rsi + 8*7], r8",
    "mov [rsi + 8*8], r9",
    "mov [rsi + 8*9], r10",
    "mov [rsi + 8*10], r11",
    "mov [rsi + 8*11], r12",
    "mov [rsi + 8*12], r13",
    "mov [rsi + 8*13], r14",
    "mov [rsi + 8*14], r15",
    "pop rax",
    "mov [rsi + 8*4], rax",
    "add rsp, 16",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    /// A vCPU whose VMCB is a heap page (the host test stands in for the identity map).
    fn vcpu(page: &mut [u8; 4096]) -> SvmVcpu {
        SvmVcpu {
            vmcb: page as *mut [u8; 4096] as u64,
            iopm: 0,
            msrpm: 0,
            fpu: GuestFpu::new(&HostFpu::FXSAVE_ONLY),
            tsc_aux: 0,
            host_tsc_aux: None,
            tsc_offset: 0,
            last_cpu: None,
            last_exit: 0,
        }
    }

    #[test]
    fn an_event_whose_delivery_an_exit_cut_short_goes_in_again() {
        // External interrupt 0xec (Linux's LAPIC timer).
        assert_eq!(redelivery((1 << 31) | 0xec), (1 << 31) | 0xec);
        // #PF with its error code (bits 63:32).
        let pf = (6 << 32) | (1 << 31) | (1 << 11) | (3 << 8) | 14;
        assert_eq!(redelivery(pf), pf);
        // NMI.
        assert_eq!(redelivery((1 << 31) | (2 << 8) | 2), (1 << 31) | (2 << 8) | 2);
        // INT3 and INT n are raised again by re-executing the instruction.
        assert_eq!(redelivery((1 << 31) | (3 << 8) | 3), 0);
        assert_eq!(redelivery((1 << 31) | (4 << 8) | 0x80), 0);
        // QEMU's report of an interrupted external interrupt (type 3, vector 0xec) goes
        // back in as the external interrupt it was, not as an exception VMRUN refuses.
        assert_eq!(redelivery((1 << 31) | (3 << 8) | 0xec), (1 << 31) | 0xec);
        // Nothing was being delivered.
        assert_eq!(redelivery(0xec), 0);
        assert_eq!(redelivery(0), 0);
    }

    #[test]
    fn a_vmcb_holding_the_hosts_cr3_and_vmrun_return_is_caught() {
        let mut page = Box::new([0u8; 4096]);
        let mut v = Vmcb(&mut page);
        let (host_cr3, ret) = (0x7f80_1000, 0x7e5_1234);
        v.set(vmcb::CR3, 0x10000);
        v.set(vmcb::RIP, 0x20_0bb7);
        assert!(!host_state_in_vmcb(&v, host_cr3, ret), "a guest's state");
        v.set(vmcb::RIP, ret);
        assert!(!host_state_in_vmcb(&v, host_cr3, ret), "the guest's CR3 with that RIP is still a guest");
        v.set(vmcb::CR3, host_cr3 | 0x18); // PCD/PWT bits do not hide it
        assert!(host_state_in_vmcb(&v, host_cr3, ret));
        v.set(vmcb::RIP, ret + 1);
        assert!(!host_state_in_vmcb(&v, host_cr3, ret), "the host's CR3 alone may be a guest's page table");
    }

    #[test]
    fn the_report_names_both_cpus() {
        let e = ArchError::VmcbHoldsHostState {
            at_vmexit: true,
            vmcb: 0x2d7_6000,
            hsave: 0x2c5_3000,
            exit_code: 0x400,
            exit_info: [0x6, 0x7e5_1234],
            found_rip_rsp: [0x7e5_1234, 0x7ff_0f00],
            rip_before: 0x20_0bb7,
            found_rax: 0x2d7_6000,
            found_cpl: 0,
            rsp_here: 0x7ff_0e00,
            cpu: 0,
            last_cpu: Some(1),
            last_exit: 0x81,
        };
        let text = alloc::format!("{e}");
        assert!(
            text.contains("0x2d76000")
                && text.contains("0x2c53000")
                && text.contains("apic=0")
                && text.contains("apic=1"),
            "{text}"
        );
        assert!(text.contains("exit 0x81") && text.contains("EXITCODE 0x400"), "{text}");
        assert!(text.contains("EXITINFO2 0x7e51234") && text.contains("guest RIP 0x200bb7"), "{text}");
        assert!(text.contains("RAX 0x2d76000 CPL 0") && text.contains("at #VMEXIT"), "{text}");
    }

    fn snapshot() -> VcpuSnapshot {
        let seg = |selector, attributes, limit, base| SegmentRegister { selector, attributes, limit, base };
        VcpuSnapshot {
            regs: GuestRegs { rax: 0xaa, rbx: 0xbb, r15: 0xff, ..GuestRegs::default() },
            rsp: 0x7ff0,
            rip: 0x40_1234,
            rflags: 0x202,
            cr0: 0x8001_0031,
            cr2: 0xdead_b000,
            cr3: 0x20_0000,
            cr4: 0x6a0,
            efer: 0xd01,
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            pat: 0x0007_0406_0007_0406,
            cs: seg(0x33, 0xafb, 0xffff_ffff, 0),
            ds: seg(0x2b, 0xcf3, 0xffff_ffff, 0),
            es: seg(0, 0, 0, 0),
            fs: seg(0, 0, 0, 0x7f00_1234_0000),
            gs: seg(0, 0, 0, 0xffff_8880_0000_0000),
            ss: seg(0x2b, 0xcf3, 0xffff_ffff, 0),
            tr: seg(0x40, 0x8b, 0x4087, 0xffff_fe00_0000_3000),
            ldtr: seg(0, 0x82, 0, 0),
            gdtr: DescriptorTable { base: 0xffff_fe00_0000_1000, limit: 0x7f },
            idtr: DescriptorTable { base: 0xffff_fe00_0000_0000, limit: 0xfff },
            sysenter_cs: 0x10,
            sysenter_esp: 0xffff_fe00_0000_5000,
            sysenter_eip: 0xffff_ffff_8100_0040,
            star: 0x0023_0010_0000_0000,
            lstar: 0xffff_ffff_8100_0000,
            cstar: 0xffff_ffff_8100_0080,
            sfmask: 0x4_7700,
            kernel_gs_base: 0xffff_8880_1000_0000,
            interruptibility: state::BLOCKING_BY_STI,
            pending_event: Some(PendingEvent { vector: 13, kind: state::EVENT_EXCEPTION, error_code: Some(0x18) }),
        }
    }

    #[test]
    fn load_then_save_gives_the_snapshot_back() {
        let mut page = Box::new([0u8; 4096]);
        let mut v = vcpu(&mut page);
        let s = snapshot();
        let mut regs = GuestRegs::default();
        v.load_state(&mut regs, &s).unwrap();
        assert_eq!(regs, s.regs);
        assert_eq!(v.save_state(&regs).unwrap(), s);

        // What VMRUN will see (Table B-2): SVME added, CPL from SS.DPL, RAX in the VMCB,
        // EVENTINJ with the error code in 63:32, nothing marked clean.
        let b = Vmcb(&mut page);
        assert_eq!(b.get(vmcb::EFER), 0xd01 | EFER_SVME);
        assert_eq!(b.get(vmcb::CPL), 3);
        assert_eq!(b.get(vmcb::RAX), 0xaa);
        assert_eq!(b.get(vmcb::CR2), 0xdead_b000);
        assert_eq!(b.get(vmcb::EVENTINJ), (0x18 << 32) | (1 << 31) | (1 << 11) | (3 << 8) | 13);
        assert_eq!(b.get(vmcb::INTERRUPT_SHADOW), 1);
        assert_eq!(b.get(vmcb::VMCB_CLEAN), 0);
        assert_eq!(b.segment(Segment::Gdtr), (0, 0, 0x7f, 0xffff_fe00_0000_1000));
    }

    #[test]
    fn guest_msrs_live_in_the_vmcb_fields_vmload_uses() {
        let mut page = Box::new([0u8; 4096]);
        let mut v = vcpu(&mut page);
        v.write_msr(GuestMsr::Efer, 0xd01).unwrap();
        assert_eq!(v.read_msr(GuestMsr::Efer).unwrap(), 0xd01, "SVME hidden");
        assert_eq!(v.vmcb().get(vmcb::EFER), 0xd01 | EFER_SVME, "SVME kept for VMRUN (15.5.1)");
        v.vmcb().set_segment(Segment::Fs, 0x2b, 0xcf3, 0xffff_ffff, 0);
        v.write_msr(GuestMsr::FsBase, 0x7f00_0000_1000).unwrap();
        assert_eq!(v.vmcb().segment(Segment::Fs), (0x2b, 0xcf3, 0xffff_ffff, 0x7f00_0000_1000), "only the base");
        for (m, f) in [
            (GuestMsr::Star, vmcb::STAR),
            (GuestMsr::Lstar, vmcb::LSTAR),
            (GuestMsr::Cstar, vmcb::CSTAR),
            (GuestMsr::Sfmask, vmcb::SFMASK),
            (GuestMsr::KernelGsBase, vmcb::KERNEL_GS_BASE),
            (GuestMsr::SysenterEip, vmcb::SYSENTER_EIP),
            (GuestMsr::Pat, vmcb::G_PAT),
        ] {
            v.write_msr(m, 0x1234_5678).unwrap();
            assert_eq!(v.vmcb().get(f), 0x1234_5678, "{m:?}");
            assert_eq!(v.read_msr(m).unwrap(), 0x1234_5678);
        }
        // No TSC_AUX on this (test) CPU: refused, not silently dropped.
        assert!(v.write_msr(GuestMsr::TscAux, 1).is_err());
        v.set_tsc_offset(u64::MAX - 5).unwrap();
        assert_eq!((v.tsc_offset(), v.vmcb().get(vmcb::TSC_OFFSET)), (u64::MAX - 5, u64::MAX - 5));
    }

    #[test]
    fn interrupt_shadow_and_interrupted_delivery() {
        let mut page = Box::new([0u8; 4096]);
        let mut v = vcpu(&mut page);
        let mut s = snapshot();
        // A shadow with IF clear comes from MOV SS; NMI blocking has no VMCB home.
        s.rflags = 0x2;
        s.interruptibility = state::BLOCKING_BY_MOV_SS | state::BLOCKING_BY_NMI;
        s.pending_event = None;
        let mut regs = GuestRegs::default();
        v.load_state(&mut regs, &s).unwrap();
        let saved = v.save_state(&regs).unwrap();
        assert_eq!(saved.interruptibility, state::BLOCKING_BY_MOV_SS);
        assert_eq!(saved.pending_event, None);

        // A #VMEXIT during delivery of a #PF (EXITINTINFO, 15.7.2) is pending; one
        // during INT3 is not (re-executing INT3 raises it again).
        v.vmcb().set(vmcb::EXITINTINFO, (6 << 32) | (1 << 31) | (1 << 11) | (3 << 8) | 14);
        let pf = PendingEvent { vector: 14, kind: state::EVENT_EXCEPTION, error_code: Some(6) };
        assert_eq!(v.save_state(&regs).unwrap().pending_event, Some(pf));
        v.vmcb().set(vmcb::EXITINTINFO, (1 << 31) | (3 << 8) | 3);
        assert_eq!(v.save_state(&regs).unwrap().pending_event, None);
        // Loading clears the old exit's EXITINTINFO.
        v.load_state(&mut regs, &s).unwrap();
        assert_eq!(v.vmcb().get(vmcb::EXITINTINFO), 0);
    }
}
