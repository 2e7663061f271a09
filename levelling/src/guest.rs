//! What guests may see: the one list of features the core cannot virtualize (with
//! a reason per entry), the hypervisor's levelling capabilities, and the derivation
//! of a host's guest `max` and `default` featuresets.
//!
//! `max = (host ∩ offerable) ∪ synthesized`, then made dependency-closed, then (on a
//! real host, [`guest_max_on`]) every feature whose XSAVE state the host does not
//! fully describe is dropped, dependency-closed again: a host's `max` must verify on
//! that host, and a policy needs the size and offset of every XSAVE component its
//! features enable. `default = max ∩ default-attribute bits`, dependency-closed
//! again. Every bit that a derivation drops is returned with the reason, so a caller
//! can show it. A host that cannot run guests at all ([`crate::host::Unfit`]) has an
//! empty `max`.
//! This module never touches a guest's policy; verifying a policy is
//! [`crate::policy`]'s job, and it rejects rather than drops.

use crate::features::{self, Attr, Feature, *};
use crate::featureset::{Featureset, word};
use crate::host::{Unfit, XstateComponent};
use crate::policy::{XSAVE_LEGACY_AND_HEADER, XSTATE_FEATURES, xstate_mask};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Features the core cannot give guests, with the reason. Every feature with
/// attribute `N` in the feature table must appear here, and nothing else (tested).
pub const NOT_VIRTUALIZABLE: &[(Feature, &str)] = &[
    (DTES64, "debug store (BTS/PEBS) is not virtualized"),
    (MONITOR, "MONITOR/MWAIT are not emulated; guests idle with HLT"),
    (DS_CPL, "debug store (BTS/PEBS) is not virtualized"),
    (VMX, "nested virtualization is not supported"),
    (SMX, "Intel TXT (GETSEC) is not virtualized"),
    (EST, "P-state MSRs belong to the host"),
    (TM2, "thermal monitoring belongs to the host"),
    (CNXT_ID, "L1 context ID (IA32_MISC_ENABLE bit 24) is not virtualized"),
    (SDBG, "IA32_DEBUG_INTERFACE (silicon debug) is not virtualized"),
    (XTPR, "xTPR update control (IA32_MISC_ENABLE bit 23) is not virtualized"),
    (PDCM, "IA32_PERF_CAPABILITIES is not virtualized (no guest PMU)"),
    (DCA, "direct cache access is a platform feature of the host"),
    (OSXSAVE, "dynamic: mirrors the guest's CR4.OSXSAVE, computed on each CPUID exit"),
    (PSN, "processor serial number is not exposed"),
    (DS, "debug store (BTS/PEBS) is not virtualized"),
    (ACPI, "thermal-control MSRs belong to the host"),
    (TM, "thermal monitoring belongs to the host"),
    (IA64, "IA-64 emulation flag is meaningless for guests"),
    (PBE, "pending break enable belongs to the host"),
    (SVM, "nested virtualization is not supported"),
    (EXTAPIC, "AMD extended APIC register space is not emulated"),
    (OSVW, "OS-visible workaround MSRs are not virtualized"),
    (IBS, "instruction-based sampling (PMU) is not virtualized"),
    (SKINIT, "SKINIT/STGI are SVM instructions; nested virtualization is not supported"),
    (WDT, "the AMD watchdog timer belongs to the host"),
    (LWP, "lightweight profiling is not virtualized"),
    (TCE, "translation cache extension control is not virtualized"),
    (NODEID_MSR, "node ID MSR describes the host topology"),
    (TOPOEXT, "the core does not synthesize leaves 0x8000001D/0x8000001E"),
    (PERFCTR_CORE, "core performance counters (PMU) are not virtualized"),
    (PERFCTR_NB, "northbridge performance counters are not virtualized"),
    (DBX, "data breakpoint extension MSRs are not virtualized"),
    (PERFTSC, "performance TSC is not virtualized"),
    (PERFCTR_LLC, "LLC performance counters are not virtualized"),
    (MWAITX, "MONITORX/MWAITX are not emulated"),
    (MP, "multiprocessor-capable flag of old AMD parts is meaningless for guests"),
    (XFD, "IA32_XFD/IA32_XFD_ERR are not switched by the core"),
    (SGX, "SGX enclaves are not virtualized"),
    (PQM, "RDT monitoring (PQM/CMT/MBM) is owned by monitor_svc on the host"),
    (MPX, "MPX is not virtualized (bound-register XSAVE state is not supported)"),
    (PQE, "RDT allocation (PQE/CAT/MBA) is owned by the host"),
    (PROC_TRACE, "processor trace is not virtualized"),
    (OSPKE, "dynamic: mirrors the guest's CR4.PKE, computed on each CPUID exit"),
    (WAITPKG, "UMONITOR/UMWAIT/TPAUSE are not emulated (IA32_UMWAIT_CONTROL is host state)"),
    (CET_SS, "CET supervisor/user XSAVE state (XSS components 11-12) is not switched by the core"),
    (TME, "total memory encryption is configured by the host firmware"),
    (KL, "Key Locker is not virtualized"),
    (BUS_LOCK_DETECT, "bus-lock #DB is not virtualized"),
    (ENQCMD, "ENQCMD needs PASID translation, which the core does not provide"),
    (SGX_LC, "SGX launch control is not virtualized"),
    (PKS, "IA32_PKRS is not switched by the core"),
    (RTM_ALWAYS_ABORT, "describes host TSX microcode state; TSX is offered only on request"),
    (TSX_FORCE_ABORT, "MSR_TSX_FORCE_ABORT is host state"),
    (HYBRID, "guests see a homogeneous topology"),
    (PCONFIG, "PCONFIG configures host memory encryption"),
    (ARCH_LBR, "architectural LBRs are not virtualized"),
    (CET_IBT, "CET XSAVE state (XSS components 11-12) is not switched by the core"),
    (AMX_BF16, "AMX tile state (XSAVE components 17-18) needs XFD, which is not switched"),
    (AMX_TILE, "AMX tile state (XSAVE components 17-18) needs XFD, which is not switched"),
    (AMX_INT8, "AMX tile state (XSAVE components 17-18) needs XFD, which is not switched"),
    (ARCH_CAPS, "IA32_ARCH_CAPABILITIES is not yet emulated"),
    (CORE_CAPS, "IA32_CORE_CAPABILITIES is not emulated"),
    (FRED, "FRED event delivery is not virtualized"),
    (LKGS, "LKGS comes with FRED, which is not virtualized"),
    (AMX_FP16, "AMX tile state (XSAVE components 17-18) needs XFD, which is not switched"),
    (HRESET, "history reset (hardware feedback) is host state"),
    (LAM, "linear address masking is not virtualized"),
    (DTHERM, "thermal sensors belong to the host"),
    (IDA, "turbo boost state belongs to the host"),
    (PLN, "power limit notification belongs to the host"),
    (PTS, "package thermal status belongs to the host"),
    (HWP, "hardware P-states belong to the host"),
    (HWP_NOTIFY, "hardware P-states belong to the host"),
    (HWP_ACT_WINDOW, "hardware P-states belong to the host"),
    (HWP_EPP, "hardware P-states belong to the host"),
    (HWP_PKG_REQ, "hardware P-states belong to the host"),
    (HFI, "hardware feedback interface belongs to the host"),
    (APERFMPERF, "APERF/MPERF are not virtualized"),
    (EPB, "energy-performance bias belongs to the host"),
    (CQM_LLC, "RDT monitoring is owned by monitor_svc on the host"),
    (CQM_OCCUP_LLC, "RDT monitoring is owned by monitor_svc on the host"),
    (CQM_MBM_TOTAL, "RDT monitoring is owned by monitor_svc on the host"),
    (CQM_MBM_LOCAL, "RDT monitoring is owned by monitor_svc on the host"),
    (HW_PSTATE, "hardware P-states belong to the host"),
    (CPB, "core performance boost belongs to the host"),
    (PROC_FEEDBACK, "processor feedback interface belongs to the host"),
    (IRPERF, "instructions-retired counter (PMU) is not virtualized"),
    (RDPRU, "RDPRU would expose host APERF/MPERF"),
    (VIRT_SSBD, "the core does not emulate MSR VIRT_SPEC_CTRL"),
    (CPPC, "collaborative processor performance control belongs to the host"),
    (AUTO_IBRS, "automatic IBRS (EFER.AIBRSE) is not virtualized"),
    // Left out because the core does not implement what they need (yet):
    (CR8_LEGACY, "CR8 (TPR) is not kept in step with the emulated local APIC's TPR"),
    (XSAVES, "IA32_XSS is not emulated and XSAVES/XRSTORS are not enabled in the VMCS"),
    (TSC_ADJUST, "IA32_TSC_ADJUST is not emulated (TSC writes move the vCPU's TSC offset only)"),
    (PKU, "PKRU (XSAVE component 9) and CR4.PKE are not switched by the core"),
    (LA57, "5-level paging (CR4.LA57) is not supported by the core's guest setup"),
    (WRMSRNS, "SVM without NRIPS advances RIP by WRMSR's 2-byte length; WRMSRNS is 3 bytes"),
    (IBRSB, "IA32_SPEC_CTRL and IA32_PRED_CMD are not emulated"),
    (STIBP, "IA32_SPEC_CTRL is not emulated"),
    (L1D_FLUSH, "IA32_FLUSH_CMD is not emulated"),
    (SSBD, "IA32_SPEC_CTRL is not emulated"),
    (INTEL_PSFD, "IA32_SPEC_CTRL is not emulated"),
    (IPRED_CTRL, "IA32_SPEC_CTRL is not emulated"),
    (RRSBA_CTRL, "IA32_SPEC_CTRL is not emulated"),
    (DDP_CTRL, "IA32_SPEC_CTRL is not emulated"),
    (BHI_CTRL, "IA32_SPEC_CTRL is not emulated"),
    (IBPB, "IA32_PRED_CMD is not emulated"),
    (IBPB_RET, "IA32_PRED_CMD is not emulated"),
    (AMD_IBRS, "IA32_SPEC_CTRL is not emulated"),
    (AMD_STIBP, "IA32_SPEC_CTRL is not emulated"),
    (AMD_SSBD, "IA32_SPEC_CTRL is not emulated"),
    (PSFD, "IA32_SPEC_CTRL is not emulated"),
];

/// How the core virtualizes every feature it offers (attribute `A` or `M` in the
/// feature table), one line each: the rule "the default policy offers only what is
/// virtualized" as data. A test walks the feature table and fails if an offered
/// feature has no line here, or a line names a feature that is not offered; a feature
/// that loses its implementation moves to [`NOT_VIRTUALIZABLE`] with the reason.
///
/// "native" means the instruction or behaviour runs unmodified in the guest and needs
/// no state the core has to switch beyond what nested paging already isolates;
/// "FPU" means its registers are in the XSAVE components the core saves and restores
/// per vCPU (x87, SSE, AVX, AVX-512: XCR0 bits 0-2 and 5-7).
pub const VIRTUALIZED: &[(Feature, &str)] = &[
    // word 0: CPUID.1:ECX
    (SSE3, "FPU"),
    (PCLMULQDQ, "FPU"),
    (SSSE3, "FPU"),
    (FMA, "FPU (AVX state)"),
    (CX16, "native"),
    (PCID, "native: CR3/CR4.PCIDE belong to the guest under EPT/NPT"),
    (SSE4_1, "FPU"),
    (SSE4_2, "FPU"),
    (X2APIC, "emulated local APIC, x2APIC MSRs (hv devices::lapic)"),
    (MOVBE, "native"),
    (POPCNT, "native"),
    (TSC_DEADLINE, "emulated local APIC, IA32_TSC_DEADLINE in the guest's TSC"),
    (AES, "FPU"),
    (XSAVE, "per-vCPU XSAVE area and XCR0, XSETBV intercepted and checked against the policy"),
    (AVX, "FPU (XCR0 bit 2)"),
    (F16C, "FPU (AVX state)"),
    (RDRAND, "native"),
    (HYPERVISOR, "synthesized"),
    // word 1: CPUID.1:EDX
    (FPU, "FPU (x87)"),
    (VME, "native (CR4.VME belongs to the guest)"),
    (DE, "native (CR4.DE belongs to the guest)"),
    (PSE, "native paging under EPT/NPT"),
    (TSC, "TSC offset per domain (starts at 0), IA32_TSC emulated"),
    (MSR, "RDMSR/WRMSR intercepted, an allow-list of emulated MSRs"),
    (PAE, "native paging under EPT/NPT"),
    (MCE, "MCG_CAP with zero banks, MCG_STATUS per vCPU"),
    (CX8, "native"),
    (APIC, "emulated local APIC (hv devices::lapic)"),
    (SEP, "SYSENTER MSRs per vCPU (VMCB via VMLOAD/VMSAVE, VMCS guest fields)"),
    (MTRR, "MTRRcap/defType/fixed/variable MTRRs per vCPU, validated, not enforced"),
    (PGE, "native paging under EPT/NPT"),
    (MCA, "MCG_CAP with zero banks"),
    (CMOV, "native"),
    (PAT, "IA32_PAT per vCPU (VMCB G_PAT, VMX MSR lists), validated"),
    (PSE36, "native paging under EPT/NPT"),
    (CLFLUSH, "native"),
    (MMX, "FPU (x87 state)"),
    (FXSR, "FPU"),
    (SSE, "FPU (XCR0 bit 1)"),
    (SSE2, "FPU"),
    (SS, "describes cache behaviour; nothing to virtualize"),
    (HTT, "topology synthesized from the policy's vCPU count"),
    // 0x8000_0001
    (LAHF_LM, "native"),
    (CMP_LEGACY, "topology synthesized from the policy's vCPU count"),
    (ABM, "native"),
    (SSE4A, "FPU"),
    (MISALIGNSSE, "FPU"),
    (PREFETCHW, "native"),
    (XOP, "FPU (AVX state)"),
    (FMA4, "FPU (AVX state)"),
    (TBM, "native"),
    (SYSCALL, "EFER.SCE and STAR/LSTAR/CSTAR/SFMASK per vCPU"),
    (NX, "EFER.NXE per vCPU"),
    (MMXEXT, "FPU"),
    (FFXSR, "EFER.FFXSR per vCPU (AMD)"),
    (PAGE1GB, "native paging under EPT/NPT"),
    (RDTSCP, "TSC offset; IA32_TSC_AUX per vCPU (switched around VMRUN, VMX MSR lists, enable-RDTSCP control)"),
    (LM, "EFER.LME/LMA per vCPU; FS/GS/KERNEL_GS_BASE switched"),
    (AMD_3DNOWEXT, "FPU (x87 state)"),
    (AMD_3DNOW, "FPU (x87 state)"),
    // 0xD.1
    (XSAVEOPT, "native, on the XSAVE state the core switches"),
    (XSAVEC, "native, on the XSAVE state the core switches"),
    (XGETBV1, "native (XINUSE of the switched components)"),
    // 0x7.0:EBX
    (FSGSBASE, "native; FS/GS bases switched per vCPU"),
    (BMI1, "native"),
    (HLE, "native (on request)"),
    (AVX2, "FPU (AVX state)"),
    (FDP_EXCPTN_ONLY, "describes x87 behaviour of the host, levelled with OR"),
    (SMEP, "native (CR4.SMEP belongs to the guest)"),
    (BMI2, "native"),
    (ERMS, "native"),
    (INVPCID, "native (SVM does not intercept it; VMX sets enable-INVPCID)"),
    (RTM, "native (on request)"),
    (ZERO_FCS_FDS, "describes x87 behaviour of the host, levelled with OR"),
    (AVX512F, "FPU (XCR0 bits 5-7)"),
    (AVX512DQ, "FPU (AVX-512 state)"),
    (RDSEED, "native"),
    (ADX, "native"),
    (SMAP, "native (CR4.SMAP belongs to the guest)"),
    (AVX512_IFMA, "FPU (AVX-512 state)"),
    (CLFLUSHOPT, "native"),
    (CLWB, "native"),
    (AVX512PF, "FPU (AVX-512 state)"),
    (AVX512ER, "FPU (AVX-512 state)"),
    (AVX512CD, "FPU (AVX-512 state)"),
    (SHA, "FPU"),
    (AVX512BW, "FPU (AVX-512 state)"),
    (AVX512VL, "FPU (AVX-512 state)"),
    // 0x7.0:ECX
    (PREFETCHWT1, "native"),
    (AVX512_VBMI, "FPU (AVX-512 state)"),
    (UMIP, "native (CR4.UMIP belongs to the guest)"),
    (AVX512_VBMI2, "FPU (AVX-512 state)"),
    (GFNI, "FPU"),
    (VAES, "FPU (AVX state)"),
    (VPCLMULQDQ, "FPU (AVX state)"),
    (AVX512_VNNI, "FPU (AVX-512 state)"),
    (AVX512_BITALG, "FPU (AVX-512 state)"),
    (AVX512_VPOPCNTDQ, "FPU (AVX-512 state)"),
    (RDPID, "IA32_TSC_AUX per vCPU"),
    (CLDEMOTE, "native"),
    (MOVDIRI, "native"),
    (MOVDIR64B, "native"),
    // 0x7.0:EDX
    (AVX512_4VNNIW, "FPU (AVX-512 state)"),
    (AVX512_4FMAPS, "FPU (AVX-512 state)"),
    (FSRM, "native"),
    (AVX512_VP2INTERSECT, "FPU (AVX-512 state)"),
    (MD_CLEAR, "native (VERW), levelled with OR"),
    (SERIALIZE, "native"),
    (TSXLDTRK, "native (on request)"),
    (AVX512_FP16, "FPU (AVX-512 state)"),
    // 0x7.1:EAX
    (AVX_VNNI, "FPU (AVX state)"),
    (AVX512_BF16, "FPU (AVX-512 state)"),
    (CMPCCXADD, "native"),
    (FZRM, "native"),
    (FSRS, "native"),
    (FSRCS, "native"),
    (AVX_IFMA, "FPU (AVX state)"),
    // 0x6, 0x8000_0007/8, 0x7.2, 0x8000_0021
    (ARAT, "the emulated LAPIC timer runs in every state"),
    (ITSC, "the guest TSC is the host's plus a constant offset (on request)"),
    (CLZERO, "native"),
    (RSTR_FP_ERR_PTRS, "FPU"),
    (WBNOINVD, "native (WBINVD exiting is off)"),
    (SSB_NO, "describes the host's hardware, no MSR"),
    (BTC_NO, "describes the host's hardware, no MSR"),
    (MCDT_NO, "describes the host's hardware, no MSR"),
    (NO_NEST_BP, "describes the host's hardware"),
    (LFENCE_DISPATCH, "describes the host's hardware (LFENCE is serializing)"),
    (NSCB, "describes the host's hardware"),
];

/// How the core virtualizes `f`, if it offers it.
pub fn virtualized_how(f: Feature) -> Option<&'static str> {
    VIRTUALIZED.iter().find(|(g, _)| *g == f).map(|(_, how)| *how)
}

/// Words the core does not offer at all (no named bits), with the reason.
pub const NOT_VIRTUALIZABLE_WORDS: &[(usize, &str)] = &[
    (word::LA_EAX, "the architectural PMU is not virtualized (guests see PMU version 0)"),
    (word::LA_EBX, "the architectural PMU is not virtualized"),
];

/// Why `f` is never offered to guests, if it is not.
pub fn not_virtualizable_reason(f: Feature) -> Option<&'static str> {
    NOT_VIRTUALIZABLE
        .iter()
        .find(|(g, _)| *g == f)
        .map(|(_, r)| *r)
        .or_else(|| NOT_VIRTUALIZABLE_WORDS.iter().find(|(w, _)| *w == f.word()).map(|(_, r)| *r))
}

/// How the hypervisor controls what a guest's `cpuid` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevellingMechanism {
    /// Intel VMX: `cpuid` exits unconditionally (SDM Vol. 3C 26.1.2), so the core
    /// answers every leaf and subleaf.
    VmxCpuidExit,
    /// AMD SVM: the VMCB CPUID intercept (APM Vol. 2 15.9, 15.10) makes `cpuid` exit,
    /// so the core answers every leaf and subleaf.
    SvmCpuidIntercept,
    /// Neither VMX nor SVM is available: the hypervisor cannot run guests on this
    /// host, so it controls nothing.
    None,
}

/// What the hypervisor can control on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevellingCaps {
    /// The mechanism.
    pub mechanism: LevellingMechanism,
    /// Every feature word the mechanism controls (all of them with CPUID exiting).
    pub controllable: Featureset,
}

impl fmt::Display for LevellingCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mechanism {
            LevellingMechanism::VmxCpuidExit => {
                f.write_str("full: VMX CPUID exiting, every leaf and subleaf is answered by the policy")
            }
            LevellingMechanism::SvmCpuidIntercept => {
                f.write_str("full: SVM CPUID intercept, every leaf and subleaf is answered by the policy")
            }
            LevellingMechanism::None => f.write_str("none: the host has neither VMX nor SVM, so it cannot run guests"),
        }
    }
}

/// The levelling capabilities on a host with raw featureset `raw`.
pub fn levelling_caps(raw: &Featureset) -> LevellingCaps {
    let all = Featureset::from_words(&[u32::MAX; crate::featureset::NWORDS]);
    if VMX.is_in(raw) {
        LevellingCaps { mechanism: LevellingMechanism::VmxCpuidExit, controllable: all }
    } else if SVM.is_in(raw) {
        LevellingCaps { mechanism: LevellingMechanism::SvmCpuidIntercept, controllable: all }
    } else {
        LevellingCaps { mechanism: LevellingMechanism::None, controllable: Featureset::new() }
    }
}

/// Why a derivation dropped a host feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// On the not-virtualizable list.
    NotVirtualizable(&'static str),
    /// Not in this build's feature table.
    Unknown,
    /// Only offered on request (`default` derivation only).
    OnlyOnRequest,
    /// A (deep) requirement is missing on this host.
    MissingDependency(Feature),
    /// The feature's XSAVE state component is not (usably) described by the host's
    /// CPUID.(EAX=0Dh,ECX=component) (SDM Vol. 1 13.2), so no policy could give its
    /// size and offset.
    XstateUndescribed {
        /// The component index.
        component: u8,
        /// What is wrong with the host's description.
        gap: XstateGap,
    },
    /// XSAVE is set, but the host's maximum basic leaf is below 0xD, so there is no
    /// CPUID leaf 0xD to describe the XSAVE area (SDM Vol. 1 13.2).
    NoXsaveLeaf {
        /// The host's CPUID.0:EAX.
        basic_max: u32,
    },
    /// The host cannot run guests at all, so its `max` is empty.
    HostCannotRunGuests(Unfit),
    /// The host reports the feature, but a check of the instruction itself found it
    /// does not do what the SDM/APM says (an erratum, or an emulator's bug), so a guest
    /// that relied on it would corrupt its own state ([`crate::HostCpu::mark_faulty`]).
    HostFault(String),
}

/// What is wrong with a host's description of an XSAVE component that a feature needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XstateGap {
    /// CPUID 0xD[i] is not in the records, or reports size (EAX) 0.
    Missing,
    /// ECX bit 0 marks it a supervisor (IA32_XSS) component; guests get no XSAVES.
    Supervisor,
    /// A user component must lie above the 576-byte legacy area and header, and
    /// offset + size must not overflow (SDM Vol. 1 13.4.1).
    BadLayout {
        /// Size (EAX).
        size: u32,
        /// Offset (EBX).
        offset: u32,
    },
    /// Its bytes overlap those of a component already kept.
    Overlaps {
        /// The other component.
        other: u8,
    },
}

impl fmt::Display for XstateGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XstateGap::Missing => f.write_str("the host has no CPUID 0xd subleaf for it, or reports its size as 0"),
            XstateGap::Supervisor => {
                f.write_str("the host marks it a supervisor component (ECX bit 0), and guests get no xsaves")
            }
            XstateGap::BadLayout { size, offset } => write!(
                f,
                "the host reports size {size} at offset {offset}, inside the 576-byte legacy area and header or past 4 GiB"
            ),
            XstateGap::Overlaps { other } => write!(f, "the host's layout overlaps XSAVE component {other}"),
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::NotVirtualizable(r) => write!(f, "not virtualizable: {r}"),
            DropReason::Unknown => f.write_str("unknown to this build"),
            DropReason::OnlyOnRequest => f.write_str("only offered on request (max, not default)"),
            DropReason::MissingDependency(m) => {
                write!(f, "requires {}, which is missing", m.info().map_or("unnamed", |i| i.name))
            }
            DropReason::XstateUndescribed { component, gap } => write!(
                f,
                "needs XSAVE component {component} (CPUID 0xd[{component}]), which the host does not describe: {gap}"
            ),
            DropReason::NoXsaveLeaf { basic_max } => write!(
                f,
                "the host's maximum basic leaf is {basic_max:#x}, so it has no CPUID leaf 0xd to describe the XSAVE area"
            ),
            DropReason::HostCannotRunGuests(why) => write!(f, "this host cannot run guests: {why}"),
            DropReason::HostFault(why) => write!(f, "faulty on this host: {why}"),
        }
    }
}

/// A derived guest featureset with what was dropped from its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// The featureset.
    pub set: Featureset,
    /// Bits of the input not in `set`, each with its reason.
    pub dropped: Vec<(Feature, DropReason)>,
}

/// Remove from `fs` every feature whose deep requirements are not all present,
/// recording each removal with `why(missing requirement)`. Repeats until stable. Shared
/// by a host's max/default ([`DropReason`]) and a pool's levelling
/// (`crate::pool::PoolDrop`).
pub(crate) fn close_over_dependencies<R>(
    fs: &mut Featureset,
    dropped: &mut Vec<(Feature, R)>,
    why: impl Fn(Feature) -> R,
) {
    loop {
        let missing = features::missing_dependencies(fs);
        if missing.is_empty() {
            return;
        }
        for (f, m) in missing {
            fs.set_bit(f.word(), f.bit(), false);
            dropped.push((f, why(m)));
        }
    }
}

/// The guest `max` featureset on a host with raw featureset `raw`.
pub fn guest_max(raw: &Featureset) -> Derived {
    let mut set = Featureset::new();
    let mut dropped = Vec::new();
    for (w, b) in raw.bits() {
        let f = Feature::new(w, b);
        match f.info() {
            None => {
                dropped.push((f, not_virtualizable_reason(f).map_or(DropReason::Unknown, DropReason::NotVirtualizable)))
            }
            Some(i) if i.attr == Attr::N => {
                dropped.push((f, DropReason::NotVirtualizable(not_virtualizable_reason(f).unwrap_or("never offered"))))
            }
            Some(_) => set.set_bit(w, b, true),
        }
    }
    // Synthesized bits: present for every guest.
    set = set.or(&features::flag_mask(SYNTH));
    close_over_dependencies(&mut set, &mut dropped, DropReason::MissingDependency);
    Derived { set, dropped }
}

/// The guest `max` featureset on a host with raw featureset `raw`, maximum basic leaf
/// `basic_max` and XSAVE components `xstate` (CPUID 0xD[2..63]): [`guest_max`] without
/// every feature whose XSAVE state the host does not fully describe, and what
/// requires them. A component is described when its subleaf is present with a
/// non-zero size, it is a user component, it lies above the legacy area and header,
/// and it does not overlap a lower-numbered component kept before it: exactly what
/// [`crate::Policy::verify`] demands of a policy's layout, so the result verifies on
/// the host it came from.
pub fn guest_max_on(raw: &Featureset, basic_max: u32, xstate: &[XstateComponent]) -> Derived {
    let mut d = guest_max(raw);
    drop_undescribed_xstate(&mut d, basic_max, xstate);
    d
}

fn overlaps(a: &XstateComponent, b: &XstateComponent) -> bool {
    a.offset < b.offset.saturating_add(b.size) && b.offset < a.offset.saturating_add(a.size)
}

fn drop_undescribed_xstate(d: &mut Derived, basic_max: u32, xstate: &[XstateComponent]) {
    if XSAVE.is_in(&d.set) && basic_max < 0xd {
        d.set.set_bit(XSAVE.word(), XSAVE.bit(), false);
        d.dropped.push((XSAVE, DropReason::NoXsaveLeaf { basic_max }));
        close_over_dependencies(&mut d.set, &mut d.dropped, DropReason::MissingDependency);
    }
    // Each round clears at least one feature of the set, so this ends.
    loop {
        let mask = xstate_mask(&d.set);
        let mut kept: Vec<&XstateComponent> = Vec::new();
        let mut gaps = Vec::new();
        for (i, fs) in XSTATE_FEATURES {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            let gap = match xstate.iter().find(|c| c.index == *i) {
                None => Some(XstateGap::Missing),
                Some(c) if c.size == 0 => Some(XstateGap::Missing),
                Some(c) if c.flags & 1 != 0 => Some(XstateGap::Supervisor),
                Some(c) if c.offset < XSAVE_LEGACY_AND_HEADER || c.offset.checked_add(c.size).is_none() => {
                    Some(XstateGap::BadLayout { size: c.size, offset: c.offset })
                }
                Some(c) => match kept.iter().find(|k| overlaps(k, c)) {
                    Some(k) => Some(XstateGap::Overlaps { other: k.index }),
                    None => {
                        kept.push(c);
                        None
                    }
                },
            };
            if let Some(gap) = gap {
                gaps.push((*i, *fs, gap));
            }
        }
        if gaps.is_empty() {
            return;
        }
        for (component, fs, gap) in gaps {
            for f in fs {
                if f.is_in(&d.set) {
                    d.set.set_bit(f.word(), f.bit(), false);
                    d.dropped.push((*f, DropReason::XstateUndescribed { component, gap }));
                }
            }
        }
        close_over_dependencies(&mut d.set, &mut d.dropped, DropReason::MissingDependency);
    }
}

/// The guest `default` featureset derived from a `max` featureset.
pub fn guest_default(max: &Featureset) -> Derived {
    let mut set = Featureset::new();
    let mut dropped = Vec::new();
    for (w, b) in max.bits() {
        let f = Feature::new(w, b);
        match f.info() {
            Some(i) if i.attr == Attr::A => set.set_bit(w, b, true),
            _ => dropped.push((f, DropReason::OnlyOnRequest)),
        }
    }
    close_over_dependencies(&mut set, &mut dropped, DropReason::MissingDependency);
    Derived { set, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::FEATURES;

    #[test]
    fn never_attribute_and_not_virtualizable_list_agree() {
        for f in FEATURES {
            let listed = NOT_VIRTUALIZABLE.iter().any(|(g, _)| *g == f.feature);
            assert_eq!(f.attr == Attr::N, listed, "{}: attribute {:?} but listed={listed}", f.name, f.attr);
        }
        for (f, reason) in NOT_VIRTUALIZABLE {
            assert!(!reason.is_empty());
            assert!(f.info().is_some());
        }
    }

    #[test]
    fn every_offered_feature_has_an_implementation_and_nothing_else_does() {
        // The default-policy rule: walk the whole table.
        let mut missing = Vec::new();
        for f in FEATURES {
            let offered = f.attr != Attr::N;
            let how = virtualized_how(f.feature);
            if offered && how.is_none() {
                missing.push(f.name);
            }
            assert!(offered || how.is_none(), "{}: never offered but listed as virtualized", f.name);
            assert!(how.is_none_or(|h| !h.is_empty()));
        }
        assert!(missing.is_empty(), "offered without an implementation entry: {missing:?}");
        for (f, _) in VIRTUALIZED {
            assert!(f.info().is_some(), "{f}");
            assert_eq!(VIRTUALIZED.iter().filter(|(g, _)| g == f).count(), 1, "{f} listed twice");
        }
    }

    #[test]
    fn default_and_max_on_real_hosts_hold_only_virtualized_features() {
        for text in [
            include_str!("../testdata/qemu-7.2-tcg-epyc.cpuid"),
            include_str!("../testdata/bochs-2.7-corei7-skylake-x.cpuid"),
            include_str!("../testdata/constructed-amd-epyc-9654-genoa.cpuid"),
            include_str!("../testdata/constructed-intel-xeon-8480-sapphire-rapids.cpuid"),
        ] {
            let dump = crate::dump::parse_dump(text).unwrap();
            let host = crate::host::HostCpu::from_records(&dump.records).unwrap();
            let max = host.max();
            for (w, b) in max.set.bits() {
                let f = Feature::new(w, b);
                assert!(virtualized_how(f).is_some(), "{f} offered without an implementation");
            }
            // What the host has and the core does not virtualize is dropped, with its reason.
            for f in [PKU, LA57, TSC_ADJUST, XSAVES, IBRSB, AMD_SSBD, VMX, SVM] {
                assert!(!f.is_in(&max.set), "{f}");
                if f.is_in(&host.raw) {
                    let why = max.dropped.iter().find(|(g, _)| *g == f).map(|(_, r)| r);
                    assert!(matches!(why, Some(DropReason::NotVirtualizable(_))), "{f}: {why:?}");
                }
            }
            for f in [APIC, X2APIC, TSC_DEADLINE, FPU, SSE2, XSAVE, AVX, MTRR, MCE] {
                assert!(f.is_in(&max.set) || !f.is_in(&host.raw), "{f} dropped");
            }
        }
    }

    #[test]
    fn max_never_has_vmx_svm_monitor_or_rdt() {
        let all = Featureset::from_words(&[u32::MAX; crate::featureset::NWORDS]);
        let max = guest_max(&all).set;
        for f in [VMX, SVM, MONITOR, MWAITX, PQM, PQE, CQM_LLC, OSXSAVE] {
            assert!(!f.is_in(&max), "{f}");
        }
        assert_eq!(max.word(word::LA_EAX), 0);
        assert!(AVX512F.is_in(&max));
        assert!(features::first_missing_dependency(&max).is_none());
        let def = guest_default(&max).set;
        assert!(!RTM.is_in(&def));
        assert!(RTM.is_in(&max));
        assert!(def.is_subset_of(&max));
    }

    #[test]
    fn hypervisor_bit_is_synthesized_and_broken_chains_dropped() {
        let mut raw = Featureset::new();
        for f in [FPU, FXSR, SSE, SSE2, AVX2] {
            raw.set_bit(f.word(), f.bit(), true);
        }
        let d = guest_max(&raw);
        assert!(HYPERVISOR.is_in(&d.set));
        assert!(!AVX2.is_in(&d.set));
        assert!(d.dropped.iter().any(|(f, r)| *f == AVX2 && matches!(r, DropReason::MissingDependency(_))));
    }

    #[test]
    fn caps_report_mechanism() {
        let mut raw = Featureset::new();
        assert_eq!(levelling_caps(&raw).mechanism, LevellingMechanism::None);
        raw.set_bit(SVM.word(), SVM.bit(), true);
        assert_eq!(levelling_caps(&raw).mechanism, LevellingMechanism::SvmCpuidIntercept);
    }
}
