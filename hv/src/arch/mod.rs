//! The arch-neutral face of the two virtualization backends.
//!
//! Each backend (`vmx`, `svm`) enables its extension, sets up its control structure
//! (VMCS / VMCB), enters the guest and decodes the exit into [`ExitReason`]. Policy
//! (what an exit means, what the guest gets) lives above, written once, as in
//! tandasat/barevisor.

pub mod fpu;
pub mod state;
pub mod svm;
pub mod vmx;
pub mod vmx_checks;

pub use monitor_svc::events::ExitKind;

use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::nested::EntryFormat;

/// Guest general-purpose registers the backends save and restore around guest entry.
/// RSP and RIP live in the VMCS/VMCB. Layout is shared with the entry assembly.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegs {
    /// RAX (SVM keeps the guest's RAX in the VMCB; the backend copies it here).
    pub rax: u64,
    /// RBX
    pub rbx: u64,
    /// RCX
    pub rcx: u64,
    /// RDX
    pub rdx: u64,
    /// RSI
    pub rsi: u64,
    /// RDI
    pub rdi: u64,
    /// RBP
    pub rbp: u64,
    /// R8
    pub r8: u64,
    /// R9
    pub r9: u64,
    /// R10
    pub r10: u64,
    /// R11
    pub r11: u64,
    /// R12
    pub r12: u64,
    /// R13
    pub r13: u64,
    /// R14
    pub r14: u64,
    /// R15
    pub r15: u64,
}

/// Where and how a 64-bit guest starts: long mode, paging on, flat segments.
#[derive(Debug, Clone, Copy)]
pub struct GuestEntry {
    /// Root of the nested page tables (EPT PML4 / NPT PML4).
    pub nested_root: u64,
    /// Guest CR3: guest-physical address of the guest's own PML4.
    pub cr3: u64,
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
}

/// Why the guest stopped running, arch-neutral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// VMCALL (VMX) / VMMCALL (SVM): a hypercall.
    Hypercall,
    /// HLT.
    Hlt,
    /// The guest triple-faulted (VMX exit 2, SVM shutdown intercept).
    TripleFault,
    /// A guest-physical access the nested tables do not allow.
    NestedPageFault {
        /// Guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
    },
    /// An exception the guest raised that we intercept.
    Exception {
        /// Vector.
        vector: u8,
    },
    /// CPUID.
    Cpuid,
    /// IN/OUT.
    Io {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// IN (true) or OUT (false).
        input: bool,
        /// INS/OUTS (string form).
        string: bool,
    },
    /// RDMSR (ECX = index).
    MsrRead,
    /// WRMSR (ECX = index, EDX:EAX = value).
    MsrWrite,
    /// XSETBV (ECX = XCR index, EDX:EAX = value): VMX exit 55 (always exits), SVM
    /// exit 0x8D (the XSETBV intercept, APM Vol. 2 15.9).
    Xsetbv,
    /// A VMX or SVM instruction (VMXON, VMRUN, VMLOAD, ...): guests get #UD.
    VirtualizationInstruction,
    /// The time slice ended (VMX preemption timer, or a physical interrupt on SVM).
    TimeSliceEnd,
    /// The page-modification log is full (VMX exit 62): drain it and re-enter (the
    /// write that triggered it has not happened yet).
    PmlFull,
    /// The guest can take an external interrupt now (VMX interrupt-window exit 7, SVM
    /// VINTR): asked for with [`Vcpu::request_interrupt_window`].
    InterruptWindow,
    /// Any other exit, with the vendor's code (VMX basic exit reason / SVM EXITCODE).
    Other {
        /// Vendor's exit code.
        code: u64,
    },
}

impl core::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ExitReason::Hypercall => f.write_str("hypercall"),
            ExitReason::Hlt => f.write_str("hlt"),
            ExitReason::TripleFault => f.write_str("triple-fault"),
            ExitReason::NestedPageFault { gpa, write } => {
                write!(f, "nested-page-fault({} gpa={gpa:#x})", if *write { "write" } else { "read" })
            }
            ExitReason::Exception { vector } => write!(f, "exception(vector={vector})"),
            ExitReason::Cpuid => f.write_str("cpuid"),
            ExitReason::Io { port, .. } => write!(f, "io(port={port:#x})"),
            ExitReason::MsrRead => f.write_str("rdmsr"),
            ExitReason::MsrWrite => f.write_str("wrmsr"),
            ExitReason::Xsetbv => f.write_str("xsetbv"),
            ExitReason::VirtualizationInstruction => f.write_str("virtualization-instruction"),
            ExitReason::TimeSliceEnd => f.write_str("time-slice-end"),
            ExitReason::PmlFull => f.write_str("pml-full"),
            ExitReason::InterruptWindow => f.write_str("interrupt-window"),
            ExitReason::Other { code } => write!(f, "other({code:#x})"),
        }
    }
}

impl ExitReason {
    /// The kind of exit, the key of the per-reason counters that the monitoring service
    /// shares: the reason without its addresses and data, but with the exception vector
    /// and the vendor's code kept (exhaustive, so a new reason cannot be miscounted).
    pub const fn kind(&self) -> ExitKind {
        match self {
            ExitReason::Hypercall => ExitKind::Hypercall,
            ExitReason::Hlt => ExitKind::Hlt,
            ExitReason::TripleFault => ExitKind::TripleFault,
            ExitReason::NestedPageFault { .. } => ExitKind::NestedPageFault,
            ExitReason::Exception { vector } => ExitKind::Exception(*vector),
            ExitReason::Cpuid => ExitKind::Cpuid,
            ExitReason::Io { .. } => ExitKind::Io,
            ExitReason::MsrRead | ExitReason::MsrWrite => ExitKind::Msr,
            ExitReason::Xsetbv => ExitKind::Xsetbv,
            ExitReason::VirtualizationInstruction => ExitKind::VirtualizationInstruction,
            ExitReason::TimeSliceEnd => ExitKind::TimeSlice,
            ExitReason::PmlFull => ExitKind::PmlFull,
            ExitReason::InterruptWindow => ExitKind::InterruptWindow,
            ExitReason::Other { code } => ExitKind::Other(*code),
        }
    }
}

/// One exit, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Why.
    pub reason: ExitReason,
    /// Guest RIP at the exit (of the instruction that exited).
    pub rip: u64,
    /// Length of that instruction, when the exit is an instruction the core may skip
    /// (VMX: VM-exit instruction length; SVM without NRIPS: the instruction's known
    /// length, or EXITINFO2's next RIP for I/O). 0 when not applicable.
    pub instruction_len: u64,
}

/// MSRs whose guest values the backend holds (in the VMCB, the VMCS or its MSR areas)
/// or switches around entry itself. The exit policy (`domain::exit::msr`) validates
/// a guest's WRMSR and then stores the value with [`Vcpu::write_msr`]; the backend only
/// keeps it where the hardware uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMsr {
    /// IA32_EFER (without SVM's EFER.SVME, which the guest never sees).
    Efer,
    /// IA32_PAT.
    Pat,
    /// STAR.
    Star,
    /// LSTAR.
    Lstar,
    /// CSTAR.
    Cstar,
    /// SFMASK (IA32_FMASK).
    Sfmask,
    /// IA32_KERNEL_GS_BASE.
    KernelGsBase,
    /// IA32_FS_BASE.
    FsBase,
    /// IA32_GS_BASE.
    GsBase,
    /// IA32_SYSENTER_CS.
    SysenterCs,
    /// IA32_SYSENTER_ESP.
    SysenterEsp,
    /// IA32_SYSENTER_EIP.
    SysenterEip,
    /// IA32_TSC_AUX (what RDTSCP and RDPID return in ECX).
    TscAux,
}

/// The guest's control state an exit policy decision depends on (XSETBV, CPUID,
/// EFER writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlState {
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR4 as the guest sees it (no VMXE).
    pub cr4: u64,
    /// Current privilege level.
    pub cpl: u8,
}

/// What the core needs to find the instruction that exited and its memory operand:
/// the paging registers, RIP and RSP, the CPL and the segments' bases (MMIO
/// emulation, `domain::exit::mmio`). Values are what the guest sees (no EFER.SVME,
/// no CR4.VMXE), as in [`state::VcpuSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// RIP of the instruction that exited.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// The current privilege level.
    pub cpl: u8,
    /// CS with its attributes in the canonical form of [`state::SegmentRegister`]
    /// (L is bit 9, D/B bit 10): they decide the code size.
    pub cs: state::SegmentRegister,
    /// The bases of ES, SS, DS, FS and GS (CS's is in `cs`).
    pub bases: SegmentBases,
}

/// The data segments' bases (SDM Vol. 3A 3.4.3; in 64-bit mode only FS's and GS's
/// count, 3.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentBases {
    /// ES base.
    pub es: u64,
    /// SS base.
    pub ss: u64,
    /// DS base.
    pub ds: u64,
    /// FS base.
    pub fs: u64,
    /// GS base.
    pub gs: u64,
}

/// Backend errors: each names the instruction, field or control involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchError {
    /// A VMX instruction failed (SDM Vol. 3C 31.2 conventions). `error` is the
    /// VM-instruction error number (31.4) for VMfailValid, `None` for VMfailInvalid.
    VmxInstruction {
        /// Instruction mnemonic.
        instruction: &'static str,
        /// VMCS field involved (for VMREAD/VMWRITE).
        field: Option<&'static str>,
        /// VM-instruction error number.
        error: Option<u32>,
    },
    /// VM entry failed (exit reason bit 31; SDM Vol. 3C 27.8).
    VmEntryFailed {
        /// Basic exit reason (33 invalid guest state, 34 MSR loading, 41 machine check).
        reason: u32,
        /// Exit qualification.
        qualification: u64,
    },
    /// A VMX control this code needs is not allowed by the capability MSRs.
    ControlUnsupported {
        /// Which control word.
        control: &'static str,
        /// Bits we wanted but may not set.
        missing: u32,
    },
    /// VMRUN rejected the VMCB (EXITCODE = VMEXIT_INVALID, APM Vol. 2 15.5.1).
    VmrunInvalid,
    /// A VMCS is still active on another CPU (a CPU kept it past the domain's lock):
    /// making it current here too would break SDM Vol. 3C 25.11.1.
    VmcsActiveElsewhere {
        /// The APIC ID of the CPU it is active on.
        on: u32,
        /// The APIC ID of this CPU.
        here: u32,
    },
    /// A VMCB's state-save area holds the hypervisor's own state (its CR3 and the RIP
    /// after VMRUN) instead of the guest's; running it would run the host as a guest.
    VmcbHoldsHostState {
        /// Found at #VMEXIT (else before VMRUN).
        at_vmexit: bool,
        /// The VMCB's physical address.
        vmcb: u64,
        /// This CPU's VM_HSAVE_PA when it was found.
        hsave: u64,
        /// EXITCODE, EXITINFO1 and EXITINFO2 as found (for a nested page fault,
        /// EXITINFO2 is the guest-physical address that faulted).
        exit_code: u64,
        exit_info: [u64; 2],
        /// RIP and RSP as found in the state-save area, and the RIP the guest had
        /// before this VMRUN.
        found_rip_rsp: [u64; 2],
        rip_before: u64,
        /// RAX and CPL as found: VMRUN's host save writes RAX (then the VMCB's own
        /// address) but never CPL (APM Vol. 2 15.5.1), a #VMEXIT writes both, so they
        /// tell which of the two wrote the state.
        found_rax: u64,
        found_cpl: u8,
        /// This CPU's RSP when it was found: near the found RSP if the state is this
        /// CPU's own, far from it if another CPU's.
        rsp_here: u64,
        /// APIC ID of the CPU that found it.
        cpu: u32,
        /// APIC ID of the CPU that ran the vCPU before, and that run's exit code.
        last_cpu: Option<u32>,
        last_exit: u64,
    },
    /// Nested paging / frame allocation failed.
    Memory(MmError),
    /// The core asked for something the backend cannot do here.
    Unsupported(&'static str),
    /// A [`state::VcpuSnapshot`] this backend cannot load (nothing was changed).
    InvalidSnapshot(&'static str),
}

impl From<MmError> for ArchError {
    fn from(e: MmError) -> Self {
        ArchError::Memory(e)
    }
}

impl core::fmt::Display for ArchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ArchError::VmxInstruction { instruction, field, error } => {
                write!(f, "{instruction}")?;
                if let Some(field) = field {
                    write!(f, " of VMCS field {field}")?;
                }
                match error {
                    Some(n) => write!(f, " failed with VM-instruction error {n} ({})", vmx::instruction_error_text(*n)),
                    None => f.write_str(" failed: no current VMCS (VMfailInvalid)"),
                }
            }
            ArchError::VmEntryFailed { reason, qualification } => write!(
                f,
                "VM entry failed: basic exit reason {reason} ({}), qualification {qualification:#x}",
                match reason {
                    33 => "invalid guest state",
                    34 => "MSR loading",
                    41 => "machine-check event",
                    _ => "unexpected",
                }
            ),
            ArchError::ControlUnsupported { control, missing } => {
                write!(f, "VMX control {control}: bits {missing:#x} are required but not allowed by this CPU")
            }
            ArchError::VmrunInvalid => f.write_str("VMRUN failed its consistency checks (VMEXIT_INVALID)"),
            ArchError::VmcsActiveElsewhere { on, here } => write!(
                f,
                "the VMCS is still active on CPU apic={on}, so CPU apic={here} may not make it current \
                 (SDM Vol. 3C 25.11.1)"
            ),
            ArchError::VmcbHoldsHostState {
                at_vmexit,
                vmcb,
                hsave,
                exit_code,
                exit_info,
                found_rip_rsp,
                rip_before,
                found_rax,
                found_cpl,
                rsp_here,
                cpu,
                last_cpu,
                last_exit,
            } => {
                let when = if *at_vmexit { "at #VMEXIT" } else { "before VMRUN" };
                write!(
                    f,
                    "the VMCB at {vmcb:#x} holds this hypervisor's own state instead of the guest's {when} \
                     (EXITCODE {exit_code:#x} EXITINFO1 {:#x} EXITINFO2 {:#x}, RIP {:#x} RSP {:#x} (this CPU's \
                     RSP {rsp_here:#x}) RAX {found_rax:#x} CPL {found_cpl}, guest RIP {rip_before:#x} before \
                     VMRUN; on CPU apic={cpu} whose VM_HSAVE_PA is {hsave:#x}; ",
                    exit_info[0], exit_info[1], found_rip_rsp[0], found_rip_rsp[1]
                )?;
                match last_cpu {
                    Some(c) => write!(f, "its previous run was on CPU apic={c} and ended with exit {last_exit:#x})"),
                    None => f.write_str("it had not run before)"),
                }
            }
            ArchError::Memory(e) => write!(f, "{e}"),
            ArchError::Unsupported(what) => write!(f, "not supported by this backend: {what}"),
            ArchError::InvalidSnapshot(why) => write!(f, "cannot load the vCPU snapshot: {why}"),
        }
    }
}

/// What a backend offers the arch-neutral code: turning the extension on for a
/// physical CPU, and creating vCPUs.
pub trait Backend: Sized {
    /// The nested paging format (EPT or NPT).
    type Paging: EntryFormat + Send;
    /// A virtual CPU of this backend (`Send`: the CPU that runs a slice of it may not
    /// be the one that made it, see [`Backend::VCPU_ON_ANY_CPU`]).
    type Vcpu: Vcpu + Send;
    /// "vmx" or "svm".
    const NAME: &'static str;
    /// Which hypercall instruction guests use.
    const ARCH: guest_abi::Arch;
    /// The guest instruction that makes a hypercall exit (VMCALL / VMMCALL).
    const HYPERCALL: [u8; 3];
    /// Whether a vCPU made on one physical CPU may run on another that enabled the
    /// extension too, one slice here and the next there. SVM: yes, a VMCB is plain
    /// memory and each CPU VMSAVEs its host state into its own page (APM Vol. 2
    /// 15.5.2). VMX: yes, because every CPU VMCLEARs the VMCSs it made active before it
    /// gives up the domain's lock ([`Vcpu::leave_cpu`]; SDM Vol. 3C 25.11.1: a VMCS is
    /// active on at most one CPU), and the next CPU writes its own host state.
    const VCPU_ON_ANY_CPU: bool;
    /// Turn the extension on on this CPU.
    fn enable(caps: &crate::platform::caps::Capabilities, pool: &mut FramePool) -> Result<Self, ArchError>;
    /// A vCPU that starts at `entry`.
    fn create_vcpu(&mut self, pool: &mut FramePool, entry: &GuestEntry) -> Result<Self::Vcpu, ArchError>;
}

/// What the arch-neutral core does with one vCPU.
pub trait Vcpu {
    /// Enter the guest until the next exit. With `slice` (TSC ticks), the backend
    /// arranges an exit ([`ExitReason::TimeSliceEnd`]) after about that long.
    fn run(&mut self, regs: &mut GuestRegs, slice: Option<u64>) -> Result<Exit, ArchError>;
    /// Continue after the instruction that caused `exit` (emulated by the core).
    fn skip_instruction(&mut self, exit: &Exit) -> Result<(), ArchError>;
    /// This CPU is about to give up the domain's lock with the vCPU in it: leave
    /// nothing of the vCPU that only this CPU holds, so any CPU may use it next. VMX:
    /// VMCLEAR the VMCS if it is active here (SDM Vol. 3C 25.11.1, 25.11.3). SVM has
    /// nothing to do (a VMCB is memory).
    fn leave_cpu(&mut self) -> Result<(), ArchError> {
        Ok(())
    }
    /// Deliver a hardware exception to the guest at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), ArchError>;
    /// Whether an external interrupt injected now would be taken at the next entry:
    /// RFLAGS.IF is set, no STI or MOV SS shadow blocks it, and no other event is being
    /// injected (SDM Vol. 3C 26.3.1.5 / APM Vol. 2 15.20).
    fn can_inject_interrupt(&mut self) -> Result<bool, ArchError>;
    /// Deliver external interrupt `vector` at the next entry (only when
    /// [`Vcpu::can_inject_interrupt`] said so).
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), ArchError>;
    /// Exit with [`ExitReason::InterruptWindow`] as soon as the guest can take an
    /// interrupt (`true`), or stop asking (`false`).
    fn request_interrupt_window(&mut self, on: bool) -> Result<(), ArchError>;
    /// The registers that locate the exiting instruction and its operands (for MMIO
    /// emulation): a few fields of what [`Vcpu::save_state`] reads, read the same way.
    fn paging_state(&mut self) -> Result<PagingState, ArchError>;
    /// Read the paused vCPU's architectural state (`regs` holds the GPRs the core keeps).
    fn save_state(&mut self, regs: &GuestRegs) -> Result<state::VcpuSnapshot, ArchError>;
    /// Load `snapshot` into this (not running) vCPU; fills `regs` with its GPRs.
    fn load_state(&mut self, regs: &mut GuestRegs, snapshot: &state::VcpuSnapshot) -> Result<(), ArchError>;
    /// The guest's CR0, CR4 and CPL.
    fn control_state(&mut self) -> Result<ControlState, ArchError>;
    /// The guest's value of `msr`.
    fn read_msr(&mut self, msr: GuestMsr) -> Result<u64, ArchError>;
    /// Set the guest's `msr` (validated by the caller).
    fn write_msr(&mut self, msr: GuestMsr, value: u64) -> Result<(), ArchError>;
    /// The TSC offset: the guest's RDTSC returns the host's TSC plus this (mod 2^64).
    fn tsc_offset(&self) -> u64;
    /// Set the TSC offset (VMCB TSC_OFFSET, APM Vol. 2 15.30.5; VMCS TSC offset with
    /// "use TSC offsetting", SDM Vol. 3C 26.6.5).
    fn set_tsc_offset(&mut self, offset: u64) -> Result<(), ArchError>;
    /// The vCPU's x87/SSE/AVX state and XCR0 (see [`fpu`]).
    fn fpu(&self) -> &fpu::GuestFpu;
    /// The same, to change XCR0.
    fn fpu_mut(&mut self) -> &mut fpu::GuestFpu;
    /// Make the processor forget cached nested translations after the core changed
    /// nested entries (permissions, dirty flags).
    fn flush_nested_tlb(&mut self) -> Result<(), ArchError>;
    /// Start page-modification logging into a fresh 4 KiB buffer (VMX with PML only).
    fn enable_pml(&mut self, _pool: &mut FramePool) -> Result<(), ArchError> {
        Err(ArchError::Unsupported("page-modification logging (PML) needs VMX with PML"))
    }
    /// Hand the logged entries to `out` in one slice (each the guest-physical address of
    /// a page, bits 11:0 clear; not called if there are none) and empty the log. One
    /// call per drain, not per entry: the caller marks up to 512 pages in one loop.
    fn drain_pml(&mut self, _pool: &mut FramePool, _out: &mut dyn FnMut(&[u64])) -> Result<(), ArchError> {
        Ok(())
    }
    /// Stop page-modification logging (drain first) and free the buffer.
    fn disable_pml(&mut self, _pool: &mut FramePool) -> Result<(), ArchError> {
        Ok(())
    }
    /// Return the control structures to the pool.
    fn destroy(self, pool: &mut FramePool) -> Result<(), MmError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_kinds_keep_what_the_counters_need() {
        // What the old name-keyed mapping lost: PML-full exits, exception vectors and
        // vendor codes.
        assert_eq!(ExitReason::PmlFull.kind(), ExitKind::PmlFull);
        assert_eq!(ExitReason::Exception { vector: 14 }.kind(), ExitKind::Exception(14));
        assert_eq!(ExitReason::Other { code: 0x7b }.kind(), ExitKind::Other(0x7b));
        assert_eq!(ExitReason::NestedPageFault { gpa: 0x1000, write: true }.kind(), ExitKind::NestedPageFault);
        assert_eq!(ExitReason::MsrWrite.kind(), ExitReason::MsrRead.kind());
    }
}
