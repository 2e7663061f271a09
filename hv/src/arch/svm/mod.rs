//! AMD SVM backend (APM Vol. 2 chapter 15): enable SVM, build a VMCB with nested
//! paging, run the guest with VMRUN and decode #VMEXIT into the arch-neutral exit.
//!
//! Works without NRIPS, VMCB clean bits and decode assists, which QEMU's TCG does not
//! emulate: the VMCB is always marked fully dirty and RIP advances (later issues) use
//! known instruction lengths.

pub mod vmcb;

use core::arch::global_asm;

use self::vmcb::{Segment, Vmcb};
use super::{ArchError, Backend, Exit, ExitReason, GuestEntry, GuestRegs};
use crate::caps::Capabilities;
use crate::mm::frames::FramePool;
use crate::mm::nested::Npt;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// One SVM vCPU: its VMCB and permission maps.
#[derive(Debug)]
pub struct Svm {
    vmcb: u64,
    /// Kept for the VMCB lifetime (the pool is only freed with the domain).
    _hsave: u64,
    iopm: u64,
    msrpm: u64,
}

impl Backend for Svm {
    type Paging = Npt;
    const NAME: &'static str = "svm";
    /// VMMCALL: 0F 01 D9 (APM Vol. 3).
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

    fn enable(_caps: &Capabilities, pool: &mut FramePool) -> Result<Self, ArchError> {
        // APM Vol. 2 15.4: the probe already refused SVMDIS=1 (VM_CR), so EFER.SVME
        // can be set. 15.30.4: VM_HSAVE_PA names the page where VMRUN saves host state.
        let hsave = pool.alloc_zeroed()?;
        // SAFETY: EFER and VM_HSAVE_PA exist on every SVM CPU (CPUID.80000001:ECX[2]
        // checked by the probe). Setting EFER.SVME only enables the SVM instructions;
        // it does not change how the running code executes. The host save area is a
        // page we own for the life of the hypervisor.
        unsafe {
            let efer = x86::msr::rdmsr(MSR_EFER);
            x86::msr::wrmsr(MSR_EFER, efer | EFER_SVME);
            x86::msr::wrmsr(MSR_VM_HSAVE_PA, hsave);
        }
        let vmcb = pool.alloc_zeroed()?;
        // APM 15.10.1/15.11: intercept every I/O port and every MSR by setting all bits
        // of the I/O (12 KiB) and MSR (8 KiB) permission maps; later issues clear the
        // bits for what guests may touch directly.
        let iopm = pool.alloc_contiguous_zeroed(3)?;
        let msrpm = pool.alloc_contiguous_zeroed(2)?;
        for page in (0..3).map(|i| iopm + i * 4096).chain((0..2).map(|i| msrpm + i * 4096)) {
            pool.bytes_mut(page)?.fill(0xff);
        }
        Ok(Self { vmcb, _hsave: hsave, iopm, msrpm })
    }

    fn configure(&mut self, pool: &mut FramePool, entry: &GuestEntry) -> Result<(), ArchError> {
        let mut v = Vmcb(pool.bytes_mut(self.vmcb)?);
        // Control area (APM Vol. 2 15.9-15.13, Appendix B Table B-1).
        v.set(vmcb::INTERCEPT_EXCEPTIONS, 0xffff_ffff);
        // Vector 3: CPUID(18), HLT(24), IOIO_PROT(27), MSR_PROT(28), SHUTDOWN(31).
        v.set(vmcb::INTERCEPT_MISC1, (1 << 18) | (1 << 24) | (1 << 27) | (1 << 28) | (1 << 31));
        // Vector 4: VMRUN(0, required by 15.5.1), VMMCALL(1), VMLOAD(2), VMSAVE(3),
        // STGI(4), CLGI(5), SKINIT(6): a guest never runs SVM instructions itself.
        v.set(vmcb::INTERCEPT_MISC2, 0x7f);
        v.set(vmcb::IOPM_BASE_PA, self.iopm);
        v.set(vmcb::MSRPM_BASE_PA, self.msrpm);
        v.set(vmcb::GUEST_ASID, 1); // ASID 0 is the host's (15.16)
        v.set(vmcb::TLB_CONTROL, 1); // flush this guest's TLB entries on VMRUN
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
        v.set(vmcb::G_PAT, 0x0007_0406_0007_0406); // power-on default PAT
        Ok(())
    }

    fn run(&mut self, regs: &mut GuestRegs) -> Result<Exit, ArchError> {
        // SAFETY: the VMCB frame is ours (allocated in `enable`, filled in `configure`)
        // and no reference to it is alive here.
        unsafe { write_rax(self.vmcb, regs.rax) };
        // SAFETY: EFER.SVME and VM_HSAVE_PA were set in `enable`; the VMCB describes a
        // guest whose memory is mapped only through our nested tables, intercepts
        // VMRUN and all SVM instructions, I/O and MSRs. hv_svm_run saves and restores
        // every callee-saved register and follows the SysV ABI it is declared with.
        unsafe { hv_svm_run(self.vmcb, regs) };
        // SAFETY: as above; the guest has stopped, the VMCB is ours again.
        let v = Vmcb(unsafe { &mut *(self.vmcb as *mut [u8; 4096]) });
        regs.rax = v.get(vmcb::RAX);
        let code = v.get(vmcb::EXITCODE);
        let reason = match code {
            vmcb::exit::VMMCALL => ExitReason::Hypercall,
            vmcb::exit::HLT => ExitReason::Hlt,
            vmcb::exit::SHUTDOWN => ExitReason::TripleFault,
            vmcb::exit::NPF => ExitReason::NestedPageFault { gpa: v.get(vmcb::EXITINFO2) },
            vmcb::exit::CPUID => ExitReason::Cpuid,
            vmcb::exit::IOIO => ExitReason::Io,
            vmcb::exit::MSR => ExitReason::Msr,
            vmcb::exit::INVALID => return Err(ArchError::VmrunInvalid),
            c if (vmcb::exit::EXCP_BASE..vmcb::exit::EXCP_BASE + 32).contains(&c) => {
                ExitReason::Exception { vector: (c - vmcb::exit::EXCP_BASE) as u8 }
            }
            c => ExitReason::Other { code: c },
        };
        Ok(Exit { reason, rip: v.get(vmcb::RIP) })
    }
}

/// # Safety
/// `vmcb` must be a VMCB frame owned by the caller with no live references.
unsafe fn write_rax(vmcb: u64, rax: u64) {
    // SAFETY: per the function contract.
    let v = Vmcb(unsafe { &mut *(vmcb as *mut [u8; 4096]) });
    let mut v = v;
    v.set(vmcb::RAX, rax);
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
// CLGI/STGI bracket the world switch so no interrupt can arrive between them.
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
    "vmrun rax",
    "stgi",
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
