//! Typed VMCS access (SDM Vol. 3C chapter 25, encodings in Appendix B).
//!
//! Every field the backend uses is a named [`Field`], and [`read`]/[`write`] return a
//! `Result` whose error names the field and decodes the VM-instruction error: a failed
//! VMREAD/VMWRITE is never swallowed (no `.unwrap_or(0)`).

use x86::vmx::vmcs::{control, guest, host, ro};

use crate::arch::ArchError;

/// A VMCS field: its encoding and its name in the SDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Encoding (SDM Vol. 3C 25.11.2).
    pub encoding: u32,
    /// Name, for errors.
    pub name: &'static str,
}

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident = $enc:expr;)*) => {
        $($(#[$doc])* pub const $name: Field = Field { encoding: $enc, name: stringify!($name) };)*
    };
}

fields! {
    /// Pin-based VM-execution controls (25.6.1).
    PINBASED_CTLS = control::PINBASED_EXEC_CONTROLS;
    /// Primary processor-based VM-execution controls (25.6.2).
    PROCBASED_CTLS = control::PRIMARY_PROCBASED_EXEC_CONTROLS;
    /// Secondary processor-based VM-execution controls (25.6.2).
    PROCBASED_CTLS2 = control::SECONDARY_PROCBASED_EXEC_CONTROLS;
    /// VM-exit controls (25.7.1).
    EXIT_CTLS = control::VMEXIT_CONTROLS;
    /// VM-entry controls (25.8.1).
    ENTRY_CTLS = control::VMENTRY_CONTROLS;
    /// Exception bitmap (25.6.3).
    EXCEPTION_BITMAP = control::EXCEPTION_BITMAP;
    /// CR0 guest/host mask (25.6.6).
    CR0_MASK = control::CR0_GUEST_HOST_MASK;
    /// CR4 guest/host mask.
    CR4_MASK = control::CR4_GUEST_HOST_MASK;
    /// CR0 read shadow.
    CR0_SHADOW = control::CR0_READ_SHADOW;
    /// CR4 read shadow.
    CR4_SHADOW = control::CR4_READ_SHADOW;
    /// CR3-target count.
    CR3_TARGET_COUNT = control::CR3_TARGET_COUNT;
    /// EPT pointer (25.6.11).
    EPTP = control::EPTP_FULL;
    /// Page-modification log address (25.6.18).
    PML_ADDRESS = control::PML_ADDR_FULL;
    /// TSC offset (25.6.5): the guest's RDTSC/RDTSCP return the TSC plus this.
    TSC_OFFSET = control::TSC_OFFSET_FULL;
    /// VM-exit MSR-store address (25.7.2): guest MSR values stored at each exit.
    EXIT_MSR_STORE_ADDR = control::VMEXIT_MSR_STORE_ADDR_FULL;
    /// VM-exit MSR-load address (25.7.2): host MSR values loaded at each exit.
    EXIT_MSR_LOAD_ADDR = control::VMEXIT_MSR_LOAD_ADDR_FULL;
    /// VM-entry MSR-load address (25.8.2): guest MSR values loaded at each entry.
    ENTRY_MSR_LOAD_ADDR = control::VMENTRY_MSR_LOAD_ADDR_FULL;
    /// VM-exit MSR-store count.
    EXIT_MSR_STORE_COUNT = control::VMEXIT_MSR_STORE_COUNT;
    /// VM-exit MSR-load count.
    EXIT_MSR_LOAD_COUNT = control::VMEXIT_MSR_LOAD_COUNT;
    /// VM-entry MSR-load count.
    ENTRY_MSR_LOAD_COUNT = control::VMENTRY_MSR_LOAD_COUNT;
    /// VM-entry interruption-information (no event injected when 0).
    ENTRY_INTR_INFO = control::VMENTRY_INTERRUPTION_INFO_FIELD;
    /// VM-entry exception error code.
    ENTRY_EXCEPTION_ERROR_CODE = control::VMENTRY_EXCEPTION_ERR_CODE;

    /// Guest CR0.
    GUEST_CR0 = guest::CR0;
    /// Guest CR3.
    GUEST_CR3 = guest::CR3;
    /// Guest CR4.
    GUEST_CR4 = guest::CR4;
    /// Guest DR7.
    GUEST_DR7 = guest::DR7;
    /// Guest RSP.
    GUEST_RSP = guest::RSP;
    /// Guest RIP.
    GUEST_RIP = guest::RIP;
    /// Guest RFLAGS.
    GUEST_RFLAGS = guest::RFLAGS;
    /// Guest ES selector.
    GUEST_ES_SELECTOR = guest::ES_SELECTOR;
    /// Guest CS selector.
    GUEST_CS_SELECTOR = guest::CS_SELECTOR;
    /// Guest SS selector.
    GUEST_SS_SELECTOR = guest::SS_SELECTOR;
    /// Guest DS selector.
    GUEST_DS_SELECTOR = guest::DS_SELECTOR;
    /// Guest FS selector.
    GUEST_FS_SELECTOR = guest::FS_SELECTOR;
    /// Guest GS selector.
    GUEST_GS_SELECTOR = guest::GS_SELECTOR;
    /// Guest LDTR selector.
    GUEST_LDTR_SELECTOR = guest::LDTR_SELECTOR;
    /// Guest TR selector.
    GUEST_TR_SELECTOR = guest::TR_SELECTOR;
    /// Guest ES base.
    GUEST_ES_BASE = guest::ES_BASE;
    /// Guest CS base.
    GUEST_CS_BASE = guest::CS_BASE;
    /// Guest SS base.
    GUEST_SS_BASE = guest::SS_BASE;
    /// Guest DS base.
    GUEST_DS_BASE = guest::DS_BASE;
    /// Guest FS base.
    GUEST_FS_BASE = guest::FS_BASE;
    /// Guest GS base.
    GUEST_GS_BASE = guest::GS_BASE;
    /// Guest LDTR base.
    GUEST_LDTR_BASE = guest::LDTR_BASE;
    /// Guest TR base.
    GUEST_TR_BASE = guest::TR_BASE;
    /// Guest GDTR base.
    GUEST_GDTR_BASE = guest::GDTR_BASE;
    /// Guest IDTR base.
    GUEST_IDTR_BASE = guest::IDTR_BASE;
    /// Guest ES limit.
    GUEST_ES_LIMIT = guest::ES_LIMIT;
    /// Guest CS limit.
    GUEST_CS_LIMIT = guest::CS_LIMIT;
    /// Guest SS limit.
    GUEST_SS_LIMIT = guest::SS_LIMIT;
    /// Guest DS limit.
    GUEST_DS_LIMIT = guest::DS_LIMIT;
    /// Guest FS limit.
    GUEST_FS_LIMIT = guest::FS_LIMIT;
    /// Guest GS limit.
    GUEST_GS_LIMIT = guest::GS_LIMIT;
    /// Guest LDTR limit.
    GUEST_LDTR_LIMIT = guest::LDTR_LIMIT;
    /// Guest TR limit.
    GUEST_TR_LIMIT = guest::TR_LIMIT;
    /// Guest GDTR limit.
    GUEST_GDTR_LIMIT = guest::GDTR_LIMIT;
    /// Guest IDTR limit.
    GUEST_IDTR_LIMIT = guest::IDTR_LIMIT;
    /// Guest ES access rights.
    GUEST_ES_AR = guest::ES_ACCESS_RIGHTS;
    /// Guest CS access rights.
    GUEST_CS_AR = guest::CS_ACCESS_RIGHTS;
    /// Guest SS access rights.
    GUEST_SS_AR = guest::SS_ACCESS_RIGHTS;
    /// Guest DS access rights.
    GUEST_DS_AR = guest::DS_ACCESS_RIGHTS;
    /// Guest FS access rights.
    GUEST_FS_AR = guest::FS_ACCESS_RIGHTS;
    /// Guest GS access rights.
    GUEST_GS_AR = guest::GS_ACCESS_RIGHTS;
    /// Guest LDTR access rights.
    GUEST_LDTR_AR = guest::LDTR_ACCESS_RIGHTS;
    /// Guest TR access rights.
    GUEST_TR_AR = guest::TR_ACCESS_RIGHTS;
    /// Guest interruptibility state.
    GUEST_INTERRUPTIBILITY = guest::INTERRUPTIBILITY_STATE;
    /// Guest activity state.
    GUEST_ACTIVITY = guest::ACTIVITY_STATE;
    /// Guest pending debug exceptions.
    GUEST_PENDING_DBG = guest::PENDING_DBG_EXCEPTIONS;
    /// Guest SYSENTER_CS.
    GUEST_SYSENTER_CS = guest::IA32_SYSENTER_CS;
    /// Guest SYSENTER_ESP.
    GUEST_SYSENTER_ESP = guest::IA32_SYSENTER_ESP;
    /// Guest SYSENTER_EIP.
    GUEST_SYSENTER_EIP = guest::IA32_SYSENTER_EIP;
    /// VMCS link pointer (must be all ones when unused; 26.3.1.5).
    GUEST_LINK_POINTER = guest::LINK_PTR_FULL;
    /// Guest IA32_DEBUGCTL.
    GUEST_DEBUGCTL = guest::IA32_DEBUGCTL_FULL;
    /// Guest IA32_EFER.
    GUEST_EFER = guest::IA32_EFER_FULL;
    /// Guest PML index (25.4.2): next entry to fill, counting down from 511.
    GUEST_PML_INDEX = guest::PML_INDEX;
    /// VMX-preemption timer value (25.4.2).
    GUEST_PREEMPTION_TIMER = guest::VMX_PREEMPTION_TIMER_VALUE;

    /// Host CR0.
    HOST_CR0 = host::CR0;
    /// Host CR3.
    HOST_CR3 = host::CR3;
    /// Host CR4.
    HOST_CR4 = host::CR4;
    /// Host RIP: where VM exits land.
    HOST_RIP = host::RIP;
    /// Host ES selector.
    HOST_ES_SELECTOR = host::ES_SELECTOR;
    /// Host CS selector.
    HOST_CS_SELECTOR = host::CS_SELECTOR;
    /// Host SS selector.
    HOST_SS_SELECTOR = host::SS_SELECTOR;
    /// Host DS selector.
    HOST_DS_SELECTOR = host::DS_SELECTOR;
    /// Host FS selector.
    HOST_FS_SELECTOR = host::FS_SELECTOR;
    /// Host GS selector.
    HOST_GS_SELECTOR = host::GS_SELECTOR;
    /// Host TR selector.
    HOST_TR_SELECTOR = host::TR_SELECTOR;
    /// Host FS base.
    HOST_FS_BASE = host::FS_BASE;
    /// Host GS base.
    HOST_GS_BASE = host::GS_BASE;
    /// Host TR base.
    HOST_TR_BASE = host::TR_BASE;
    /// Host GDTR base.
    HOST_GDTR_BASE = host::GDTR_BASE;
    /// Host IDTR base.
    HOST_IDTR_BASE = host::IDTR_BASE;
    /// Host SYSENTER_CS.
    HOST_SYSENTER_CS = host::IA32_SYSENTER_CS;
    /// Host SYSENTER_ESP.
    HOST_SYSENTER_ESP = host::IA32_SYSENTER_ESP;
    /// Host SYSENTER_EIP.
    HOST_SYSENTER_EIP = host::IA32_SYSENTER_EIP;
    /// Host IA32_EFER.
    HOST_EFER = host::IA32_EFER_FULL;

    /// VM-instruction error (read-only, 25.9.1).
    VM_INSTRUCTION_ERROR = ro::VM_INSTRUCTION_ERROR;
    /// Exit reason (read-only, 25.9.1).
    EXIT_REASON = ro::EXIT_REASON;
    /// Exit qualification (read-only).
    EXIT_QUALIFICATION = ro::EXIT_QUALIFICATION;
    /// Guest-physical address of an EPT violation/misconfiguration (read-only).
    GUEST_PHYSICAL_ADDRESS = ro::GUEST_PHYSICAL_ADDR_FULL;
    /// VM-exit interruption information (read-only).
    EXIT_INTR_INFO = ro::VMEXIT_INTERRUPTION_INFO;
    /// VM-exit instruction length (read-only, 25.9.4).
    EXIT_INSTRUCTION_LEN = ro::VMEXIT_INSTRUCTION_LEN;
    /// IDT-vectoring information (read-only, 25.9.3; Appendix B.3.3 encoding 0x4408):
    /// the event whose delivery the VM exit interrupted.
    IDT_VECTORING_INFO = ro::IDT_VECTORING_INFO;
    /// IDT-vectoring error code (read-only, 25.9.3; Appendix B.3.3 encoding 0x440A).
    IDT_VECTORING_ERROR_CODE = ro::IDT_VECTORING_ERR_CODE;
}

/// HOST_RSP's encoding: the entry assembly writes it itself, just before VMLAUNCH.
pub const HOST_RSP_ENCODING: u32 = host::RSP;

fn instruction_error(instruction: &'static str, field: Option<&'static str>, fail: x86::vmx::VmFail) -> ArchError {
    let error = match fail {
        x86::vmx::VmFail::VmFailValid => {
            // SAFETY: VMfailValid means a current VMCS exists, so reading its
            // VM-instruction error field is architecturally defined (SDM 31.2).
            let read = unsafe { x86::bits64::vmx::vmread(ro::VM_INSTRUCTION_ERROR) };
            // If reading the error number itself failed, say so rather than invent one.
            Some(read.map_or(u32::MAX, |v| v as u32))
        }
        x86::vmx::VmFail::VmFailInvalid => None,
    };
    ArchError::VmxInstruction { instruction, field, error }
}

/// Map a failed VMX instruction (without a field) to an error.
pub fn fail(instruction: &'static str, f: x86::vmx::VmFail) -> ArchError {
    instruction_error(instruction, None, f)
}

/// VMWRITE `value` to `field` of the current VMCS.
pub fn write(field: Field, value: u64) -> Result<(), ArchError> {
    // SAFETY: VMWRITE only touches the current VMCS; callers run in VMX root
    // operation after VMPTRLD (the backend's invariant). Failure is reported, not
    // ignored.
    unsafe { x86::bits64::vmx::vmwrite(field.encoding, value) }
        .map_err(|f| instruction_error("VMWRITE", Some(field.name), f))
}

/// VMREAD `field` of the current VMCS.
pub fn read(field: Field) -> Result<u64, ArchError> {
    // SAFETY: as for `write`.
    unsafe { x86::bits64::vmx::vmread(field.encoding) }.map_err(|f| instruction_error("VMREAD", Some(field.name), f))
}

/// The SDM's text for a VM-instruction error number (Vol. 3C 31.4, Table 31-1).
pub fn instruction_error_text(n: u32) -> &'static str {
    match n {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        u32::MAX => "the error number itself could not be read",
        _ => "unknown VM-instruction error",
    }
}
