//! AMD SVM backend (APM Vol. 2 chapter 15): enable SVM, build a VMCB with nested
//! paging, run the guest with VMRUN and decode #VMEXIT into the arch-neutral exit.
//!
//! Works without NRIPS, VMCB clean bits and decode assists, which QEMU's TCG does not
//! emulate: the VMCB is always marked fully dirty and RIP advances (later issues) use
//! known instruction lengths.

pub mod vmcb;

use core::arch::global_asm;

use self::vmcb::{Segment, Vmcb};
use super::{ArchError, Backend, Exit, ExitReason, GuestEntry, GuestRegs, Vcpu};
use crate::caps::Capabilities;
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::nested::Npt;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// SVM on this physical CPU: the host save area VMRUN uses.
#[derive(Debug)]
pub struct Svm {
    /// Kept for the life of the hypervisor.
    _hsave: u64,
}

/// One SVM vCPU: its VMCB and permission maps.
#[derive(Debug)]
pub struct SvmVcpu {
    vmcb: u64,
    iopm: u64,
    msrpm: u64,
}

// Instruction lengths for the exits we emulate, since QEMU TCG has no NRIPS
// (APM Vol. 3: CPUID 0F A2, RDMSR 0F 32, WRMSR 0F 30, HLT F4, VMMCALL 0F 01 D9).
const LEN_CPUID: u64 = 2;
const LEN_MSR: u64 = 2;
const LEN_HLT: u64 = 1;
const LEN_VMMCALL: u64 = 3;

impl Backend for Svm {
    type Paging = Npt;
    type Vcpu = SvmVcpu;
    const NAME: &'static str = "svm";
    const ARCH: guest_abi::Arch = guest_abi::Arch::Svm;
    /// VMMCALL: 0F 01 D9 (APM Vol. 3).
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

    fn enable(_caps: &Capabilities, pool: &mut FramePool) -> Result<Self, ArchError> {
        // APM Vol. 2 15.4: the probe already refused SVMDIS=1 (VM_CR), so EFER.SVME
        // can be set. 15.30.4: VM_HSAVE_PA names the page where VMRUN saves host state.
        let hsave = pool.alloc_zeroed()?;
        // SAFETY: EFER and VM_HSAVE_PA exist on every SVM CPU (CPUID.80000001:ECX[2] checked by the probe). Setting
        // EFER.SVME only enables the SVM instructions; it does not change how the running code executes. The host
        // save area is a page we own for the life of the hypervisor.
        unsafe {
            let efer = x86::msr::rdmsr(MSR_EFER);
            x86::msr::wrmsr(MSR_EFER, efer | EFER_SVME);
            x86::msr::wrmsr(MSR_VM_HSAVE_PA, hsave);
        }
        Ok(Self { _hsave: hsave })
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
        let vcpu = SvmVcpu { vmcb, iopm, msrpm };
        vcpu.configure(pool, entry)?;
        Ok(vcpu)
    }
}

impl SvmVcpu {
    fn configure(&self, pool: &mut FramePool, entry: &GuestEntry) -> Result<(), ArchError> {
        let mut v = Vmcb(pool.bytes_mut(self.vmcb)?);
        // Control area (APM Vol. 2 15.9-15.13, Appendix B Table B-1). Of the guest's
        // own exceptions only #DF is intercepted, to report why a guest dies; the rest
        // go through the guest's IDT as on hardware.
        v.set(vmcb::INTERCEPT_EXCEPTIONS, 1 << 8);
        // Vector 3: INTR(0, our time slices), CPUID(18), HLT(24), IOIO_PROT(27),
        // MSR_PROT(28), SHUTDOWN(31).
        v.set(vmcb::INTERCEPT_MISC1, 1 | (1 << 18) | (1 << 24) | (1 << 27) | (1 << 28) | (1 << 31));
        // Vector 4: VMRUN(0, required by 15.5.1), VMMCALL(1), VMLOAD(2), VMSAVE(3),
        // STGI(4), CLGI(5), SKINIT(6): a guest never runs SVM instructions itself.
        v.set(vmcb::INTERCEPT_MISC2, 0x7f);
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

    fn vmcb(&mut self) -> Vmcb<'_> {
        // SAFETY: the VMCB frame was allocated for this vCPU in `create_vcpu` and is
        // only reached through `&mut self`, so no other reference to it exists; the
        // processor touches it only inside `run`, which holds `&mut self`.
        Vmcb(unsafe { &mut *(self.vmcb as *mut [u8; 4096]) })
    }
}

impl Vcpu for SvmVcpu {
    fn run(&mut self, regs: &mut GuestRegs, slice: Option<u64>) -> Result<Exit, ArchError> {
        self.vmcb().set(vmcb::RAX, regs.rax);
        if let Some(ticks) = slice {
            crate::cpu::lapic::arm_one_shot(ticks);
        }
        // SAFETY: EFER.SVME and VM_HSAVE_PA were set in `enable`; the VMCB describes a guest whose memory is mapped
        // only through our nested tables, intercepts VMRUN and all SVM instructions, I/O and MSRs. hv_svm_run saves
        // and restores every callee-saved register and follows the SysV ABI it is declared with.
        unsafe { hv_svm_run(self.vmcb, regs) };
        if slice.is_some() {
            crate::cpu::lapic::disarm();
        }
        let mut v = self.vmcb();
        // An event we injected has been delivered by now.
        v.set(vmcb::EVENTINJ, 0);
        regs.rax = v.get(vmcb::RAX);
        let code = v.get(vmcb::EXITCODE);
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
            vmcb::exit::VMRUN..=vmcb::exit::SKINIT => (ExitReason::VirtualizationInstruction, 0),
            vmcb::exit::INVALID => return Err(ArchError::VmrunInvalid),
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
    fn hv_svm_run(vmcb: u64, regs: *mut GuestRegs);
}

// APM Vol. 2 15.5 (VMRUN) and 15.6 (#VMEXIT): VMRUN saves the host's RAX, RSP, RIP,
// RFLAGS, segment and control registers to VM_HSAVE_PA and restores them at #VMEXIT;
// every other general register is left holding the guest's value, so we save the
// host's callee-saved registers around it and swap the guest's into `regs`.
// CLGI/STGI bracket the world switch so no interrupt can arrive in the host half of
// it. Host RFLAGS.IF is set inside that window so that, with V_INTR_MASKING, a
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
    "push rsi",     // GuestRegs pointer, found again at [rsp] after the exit
    "mov rax, rdi", // VMCB physical address, VMRUN's operand
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
    "clgi",
    "sti", // GIF=0 still blocks interrupts; the guest runs with HIF=1
    "vmrun rax",
    "stgi", // a pending physical interrupt (our timer) is taken here
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
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);
