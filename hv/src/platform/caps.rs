//! The capability probe: what virtualization and monitoring this CPU offers.
//!
//! Everything here is decoding of CPUID and MSR values read through [`HwRead`], so it
//! is tested on the host against recordings (QEMU EPYC, Bochs Skylake-X and Haswell)
//! and a constructed bare-metal Intel server. The output is arch-neutral: one human
//! block ([`Capabilities`]'s `Display`) and one machine-readable line
//! ([`Capabilities::machine_line`]) that the system tests and tools parse.
//!
//! Not for: enabling anything. The arch backends act on what this reports.
//!
//! Sources: Intel SDM Vol. 3D Appendix A (VMX capability reporting MSRs), Vol. 2A
//! CPUID leaf 07H and 0FH, Vol. 3B 18.18 (RDT monitoring); AMD APM Vol. 2 15.4
//! (enabling SVM, VM_CR), Vol. 3 Appendix E (CPUID Fn8000_000A).

use alloc::string::String;
use core::fmt::{self, Write};

use crate::platform::hw::HwRead;

/// IA32_FEATURE_CONTROL (SDM Vol. 3C 24.7 "Enabling and entering VMX operation").
pub const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_VMX_BASIC (SDM Vol. 3D A.1).
pub const MSR_IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS (A.3.1).
pub const MSR_IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS (A.3.2).
pub const MSR_IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS (A.4).
pub const MSR_IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS (A.5).
pub const MSR_IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// IA32_VMX_PROCBASED_CTLS2 (A.3.3).
pub const MSR_IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
/// IA32_VMX_EPT_VPID_CAP (A.10).
pub const MSR_IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
/// IA32_VMX_TRUE_PINBASED_CTLS (A.3.1).
pub const MSR_IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
/// IA32_VMX_TRUE_PROCBASED_CTLS (A.3.2).
pub const MSR_IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
/// IA32_VMX_TRUE_EXIT_CTLS (A.4).
pub const MSR_IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
/// IA32_VMX_TRUE_ENTRY_CTLS (A.5).
pub const MSR_IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
/// VM_CR (APM Vol. 2 15.30.1).
pub const MSR_VM_CR: u32 = 0xc001_0114;

/// The CPU's vendor, from CPUID leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel"
    Intel,
    /// "AuthenticAMD"
    Amd,
    /// Anything else (e.g. "HygonGenuine"); the raw string is kept.
    Other([u8; 12]),
}

impl Vendor {
    fn from_leaf0(r: [u32; 4]) -> Self {
        let s = vendor_bytes(r);
        match &s {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" => Vendor::Amd,
            _ => Vendor::Other(s),
        }
    }

    /// The 12-character vendor string.
    pub fn as_str(&self) -> &str {
        match self {
            Vendor::Intel => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
            Vendor::Other(b) => core::str::from_utf8(b).unwrap_or("(not ASCII)"),
        }
    }
}

fn vendor_bytes(r: [u32; 4]) -> [u8; 12] {
    let mut s = [0u8; 12];
    // CPUID.0: the vendor string is EBX, EDX, ECX in that order.
    for (chunk, reg) in s.chunks_exact_mut(4).zip([r[1], r[3], r[2]]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    s
}

const fn bit32(v: u32, n: u32) -> bool {
    (v >> n) & 1 == 1
}

const fn bit64(v: u64, n: u32) -> bool {
    (v >> n) & 1 == 1
}

/// State of IA32_FEATURE_CONTROL as firmware left it (SDM Vol. 3C 24.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureControl {
    /// Bit 0: lock. Once set, the MSR cannot be written until reset.
    pub locked: bool,
    /// Bit 2: VMXON allowed outside SMX operation.
    pub vmx_outside_smx: bool,
}

impl FeatureControl {
    /// Decode the raw MSR value.
    pub fn decode(v: u64) -> Self {
        Self { locked: bit64(v, 0), vmx_outside_smx: bit64(v, 2) }
    }

    /// Whether the hypervisor can use VMX: either firmware enabled it and locked the
    /// MSR, or it is unlocked and the hypervisor may enable and lock it itself.
    pub fn vmx_usable(&self) -> bool {
        !self.locked || self.vmx_outside_smx
    }
}

/// Intel VMX capabilities (SDM Vol. 3D Appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_FEATURE_CONTROL as found.
    pub feature_control: FeatureControl,
    /// IA32_VMX_BASIC[30:0]: the VMCS revision identifier.
    pub vmcs_revision: u32,
    /// IA32_VMX_BASIC[55]: the IA32_VMX_TRUE_*_CTLS MSRs exist and are authoritative
    /// for the pin/processor/exit/entry controls.
    pub true_controls: bool,
    /// Allowed settings (low 32 bits: must-be-one; high 32 bits: may-be-one) of the
    /// pin-based, primary processor-based, exit and entry controls, from the TRUE MSRs
    /// when `true_controls`, else from the legacy ones.
    pub pinbased: u64,
    /// See `pinbased`.
    pub procbased: u64,
    /// See `pinbased`.
    pub exit: u64,
    /// See `pinbased`.
    pub entry: u64,
    /// IA32_VMX_PROCBASED_CTLS2, or 0 when "activate secondary controls" cannot be 1.
    pub procbased2: u64,
    /// IA32_VMX_EPT_VPID_CAP, or 0 when neither EPT nor VPID can be enabled.
    pub ept_vpid_cap: u64,
    /// Secondary control bit 1 "enable EPT" may be 1.
    pub ept: bool,
    /// EPT_VPID_CAP[21]: accessed and dirty flags for EPT.
    pub ept_ad: bool,
    /// EPT_VPID_CAP[6]: 4-level page walk.
    pub ept_4level: bool,
    /// EPT_VPID_CAP[14]: write-back memory type for EPT structures.
    pub ept_wb: bool,
    /// EPT_VPID_CAP[16]: 2 MiB EPT pages.
    pub ept_2m: bool,
    /// EPT_VPID_CAP[17]: 1 GiB EPT pages.
    pub ept_1g: bool,
    /// Secondary control bit 17 "enable PML" may be 1 and EPT A/D exists (PML logs
    /// only through EPT dirty flags, SDM Vol. 3C 29.3.6).
    pub pml: bool,
    /// Secondary control bit 5 "enable VPID" may be 1.
    pub vpid: bool,
    /// Secondary control bit 7 "unrestricted guest" may be 1.
    pub unrestricted_guest: bool,
    /// Pin-based control bit 6 "activate VMX-preemption timer" may be 1.
    pub preemption_timer: bool,
}

/// AMD SVM capabilities (APM Vol. 2 15.4, Vol. 3 CPUID Fn8000_000A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmCaps {
    /// Fn8000_000A EAX[7:0]: SVM revision.
    pub revision: u8,
    /// Fn8000_000A EBX: number of ASIDs.
    pub asids: u32,
    /// Raw Fn8000_000A EDX feature bits.
    pub features: u32,
    /// EDX[0]: nested paging.
    pub npt: bool,
    /// EDX[3]: next-RIP save on #VMEXIT.
    pub nrips: bool,
    /// EDX[5]: VMCB clean bits.
    pub vmcb_clean: bool,
    /// EDX[6]: flush by ASID.
    pub flush_by_asid: bool,
    /// EDX[7]: decode assists.
    pub decode_assists: bool,
    /// VM_CR[4] SVMDIS: firmware disabled SVM (EFER.SVME cannot be set).
    pub disabled_by_firmware: bool,
    /// VM_CR[3] LOCK: SVMDIS cannot be changed.
    pub vm_cr_locked: bool,
}

/// Hardware virtualization found, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VMX (CPUID.1:ECX[5]).
    Vmx(VmxCaps),
    /// AMD SVM (CPUID.80000001:ECX[2]).
    Svm(SvmCaps),
    /// Neither extension is reported.
    None,
}

/// L3 cache monitoring (CPUID leaf 0FH sub-leaf 1; SDM Vol. 3B 18.18.3-18.18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L3Monitoring {
    /// 0FH.1:ECX: highest RMID for L3 monitoring (RMIDs are 0..=max_rmid).
    pub max_rmid: u32,
    /// 0FH.1:EBX: factor from IA32_QM_CTR units to bytes.
    pub upscaling_factor: u32,
    /// 24 + 0FH.1:EAX[7:0]: width of the MBM counters in bits.
    pub counter_width: u32,
    /// 0FH.1:EAX[8]: IA32_QM_CTR bit 61 reports counter overflow.
    pub overflow_bit: bool,
    /// 0FH.1:EDX[0]: L3 occupancy event.
    pub occupancy: bool,
    /// 0FH.1:EDX[1]: L3 total bandwidth event.
    pub mbm_total: bool,
    /// 0FH.1:EDX[2]: L3 local bandwidth event.
    pub mbm_local: bool,
}

/// Resource Director Technology / PQoS monitoring (Intel and AMD use the same leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdtMonitoring {
    /// Monitoring is available.
    Present {
        /// 0FH.0:EBX: highest RMID of any resource type.
        max_rmid_any: u32,
        /// L3 monitoring (0FH.0:EDX[1]); without it there is nothing to monitor, so
        /// monitoring is reported absent.
        l3: L3Monitoring,
    },
    /// Monitoring is absent; the reason names the CPUID field that says so.
    Absent(&'static str),
}

/// Everything the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// CPU vendor.
    pub vendor: Vendor,
    /// Display family (SDM Vol. 2A CPUID.01H: family + extended family when family=0xF).
    pub family: u32,
    /// Display model (model + extended model << 4 when family is 6 or 0xF).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// CPUID.0:EAX.
    pub max_basic_leaf: u32,
    /// CPUID.80000000:EAX.
    pub max_extended_leaf: u32,
    /// CPUID.1:ECX[31]: we are ourselves running under a hypervisor.
    pub under_hypervisor: bool,
    /// VMX, SVM or neither.
    pub virtualization: Virtualization,
    /// RDT/PQoS monitoring.
    pub rdt: RdtMonitoring,
}

/// Why the probe could not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// An MSR the decoding needs could not be read (only possible with recordings).
    MsrUnavailable {
        /// MSR index.
        msr: u32,
        /// What it is.
        name: &'static str,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::MsrUnavailable { msr, name } => {
                write!(f, "MSR {msr:#x} ({name}) is needed by the probe but could not be read")
            }
        }
    }
}

fn msr(hw: &mut impl HwRead, msr: u32, name: &'static str) -> Result<u64, ProbeError> {
    hw.rdmsr(msr).ok_or(ProbeError::MsrUnavailable { msr, name })
}

/// What the probe takes from CPUID, decoded by `raw-cpuid` (SDM Vol. 2A CPUID; APM
/// Vol. 3 Appendix E). RDT monitoring (leaf 0xF) is decoded here instead
/// ([`probe_rdt`]): raw-cpuid 11 does not expose CPUID.(0xF,1):EAX (counter width,
/// overflow bit), and it treats leaf 0xF as Intel-only, while AMD implements it for
/// its PQoS monitoring.
struct CpuidFacts {
    leaf0: [u32; 4],
    max_basic_leaf: u32,
    max_extended_leaf: u32,
    family: u32,
    model: u32,
    stepping: u32,
    under_hypervisor: bool,
    has_vmx: bool,
    has_svm: bool,
    /// CPUID Fn8000_000A decoded, and its EDX as read (the machine line shows it).
    svm: Option<(raw_cpuid::SvmFeatures, u32)>,
}

fn cpuid_facts(hw: &mut impl HwRead) -> CpuidFacts {
    let hw = core::cell::RefCell::new(hw);
    // raw-cpuid reads through this closure, so recordings and the `Recorder` see
    // exactly the leaves it asks for.
    let read = |leaf: u32, subleaf: u32| {
        let [eax, ebx, ecx, edx] = hw.borrow_mut().cpuid(leaf, subleaf);
        raw_cpuid::CpuIdResult { eax, ebx, ecx, edx }
    };
    let cpuid = raw_cpuid::CpuId::with_cpuid_reader(read);
    let leaf0 = hw.borrow_mut().cpuid(0, 0);
    let max_extended_leaf = hw.borrow_mut().cpuid(0x8000_0000, 0)[0];
    let features = cpuid.get_feature_info();
    let extended = cpuid.get_extended_processor_and_feature_identifiers();
    let svm = cpuid.get_svm_info();
    CpuidFacts {
        leaf0,
        max_basic_leaf: leaf0[0],
        max_extended_leaf,
        family: features.as_ref().map_or(0, |f| u32::from(f.family_id())),
        model: features.as_ref().map_or(0, |f| u32::from(f.model_id())),
        stepping: features.as_ref().map_or(0, |f| u32::from(f.stepping_id())),
        under_hypervisor: features.as_ref().is_some_and(|f| f.has_hypervisor()),
        has_vmx: features.as_ref().is_some_and(|f| f.has_vmx()),
        has_svm: extended.is_some_and(|e| e.has_svm()),
        svm: svm.map(|f| (f, hw.borrow_mut().cpuid(0x8000_000a, 0)[3])),
    }
}

/// Probe the CPU behind `hw`.
pub fn probe(hw: &mut impl HwRead) -> Result<Capabilities, ProbeError> {
    let CpuidFacts {
        leaf0,
        max_basic_leaf,
        max_extended_leaf,
        family,
        model,
        stepping,
        under_hypervisor,
        has_vmx,
        has_svm,
        svm,
    } = cpuid_facts(hw);
    let vendor = Vendor::from_leaf0(leaf0);

    // A CPU reports at most one of them; should both appear, the vendor decides.
    let virtualization = if has_vmx && (vendor == Vendor::Intel || !has_svm) {
        Virtualization::Vmx(probe_vmx(hw)?)
    } else if has_svm {
        Virtualization::Svm(probe_svm(hw, svm.as_ref())?)
    } else {
        Virtualization::None
    };

    let rdt = probe_rdt(hw, max_basic_leaf);

    Ok(Capabilities {
        vendor,
        family,
        model,
        stepping,
        max_basic_leaf,
        max_extended_leaf,
        under_hypervisor,
        virtualization,
        rdt,
    })
}

fn probe_vmx(hw: &mut impl HwRead) -> Result<VmxCaps, ProbeError> {
    let feature_control = FeatureControl::decode(msr(hw, MSR_IA32_FEATURE_CONTROL, "IA32_FEATURE_CONTROL")?);
    let basic = msr(hw, MSR_IA32_VMX_BASIC, "IA32_VMX_BASIC")?;
    let vmcs_revision = (basic & 0x7fff_ffff) as u32;
    // SDM Vol. 3D A.1: bit 55 set means the TRUE control MSRs exist; A.2 says they,
    // not the legacy MSRs, report which default-1 controls may be 0.
    let true_controls = bit64(basic, 55);
    let (pin, proc, exit, entry) = if true_controls {
        (
            msr(hw, MSR_IA32_VMX_TRUE_PINBASED_CTLS, "IA32_VMX_TRUE_PINBASED_CTLS")?,
            msr(hw, MSR_IA32_VMX_TRUE_PROCBASED_CTLS, "IA32_VMX_TRUE_PROCBASED_CTLS")?,
            msr(hw, MSR_IA32_VMX_TRUE_EXIT_CTLS, "IA32_VMX_TRUE_EXIT_CTLS")?,
            msr(hw, MSR_IA32_VMX_TRUE_ENTRY_CTLS, "IA32_VMX_TRUE_ENTRY_CTLS")?,
        )
    } else {
        (
            msr(hw, MSR_IA32_VMX_PINBASED_CTLS, "IA32_VMX_PINBASED_CTLS")?,
            msr(hw, MSR_IA32_VMX_PROCBASED_CTLS, "IA32_VMX_PROCBASED_CTLS")?,
            msr(hw, MSR_IA32_VMX_EXIT_CTLS, "IA32_VMX_EXIT_CTLS")?,
            msr(hw, MSR_IA32_VMX_ENTRY_CTLS, "IA32_VMX_ENTRY_CTLS")?,
        )
    };
    // A.3.2: the secondary controls MSR exists only if bit 63 (allowed-1 of
    // "activate secondary controls", bit 31) is set.
    let procbased2 =
        if bit64(proc, 63) { msr(hw, MSR_IA32_VMX_PROCBASED_CTLS2, "IA32_VMX_PROCBASED_CTLS2")? } else { 0 };
    let allowed2 = (procbased2 >> 32) as u32;
    let ept = bit32(allowed2, 1);
    let vpid = bit32(allowed2, 5);
    // A.10: EPT_VPID_CAP exists if either "enable EPT" or "enable VPID" may be 1.
    let ept_vpid_cap = if ept || vpid { msr(hw, MSR_IA32_VMX_EPT_VPID_CAP, "IA32_VMX_EPT_VPID_CAP")? } else { 0 };
    let ept_ad = ept && bit64(ept_vpid_cap, 21);
    Ok(VmxCaps {
        feature_control,
        vmcs_revision,
        true_controls,
        pinbased: pin,
        procbased: proc,
        exit,
        entry,
        procbased2,
        ept_vpid_cap,
        ept,
        ept_ad,
        ept_4level: ept && bit64(ept_vpid_cap, 6),
        ept_wb: ept && bit64(ept_vpid_cap, 14),
        ept_2m: ept && bit64(ept_vpid_cap, 16),
        ept_1g: ept && bit64(ept_vpid_cap, 17),
        pml: ept_ad && bit32(allowed2, 17),
        vpid,
        unrestricted_guest: ept && bit32(allowed2, 7),
        preemption_timer: bit64(pin, 32 + 6),
    })
}

/// SVM's capabilities from CPUID Fn8000_000A (`None`: the leaf is out of range, so
/// nothing is offered) and VM_CR.
fn probe_svm(hw: &mut impl HwRead, leaf: Option<&(raw_cpuid::SvmFeatures, u32)>) -> Result<SvmCaps, ProbeError> {
    let vm_cr = msr(hw, MSR_VM_CR, "VM_CR")?;
    let has = |f: fn(&raw_cpuid::SvmFeatures) -> bool| leaf.is_some_and(|(l, _)| f(l));
    Ok(SvmCaps {
        revision: leaf.map_or(0, |(l, _)| l.revision()),
        asids: leaf.map_or(0, |(l, _)| l.supported_asids()),
        features: leaf.map_or(0, |&(_, edx)| edx),
        npt: has(raw_cpuid::SvmFeatures::has_nested_paging),
        nrips: has(raw_cpuid::SvmFeatures::has_nrip),
        vmcb_clean: has(raw_cpuid::SvmFeatures::has_vmcb_clean_bits),
        flush_by_asid: has(raw_cpuid::SvmFeatures::has_flush_by_asid),
        decode_assists: has(raw_cpuid::SvmFeatures::has_decode_assists),
        disabled_by_firmware: bit64(vm_cr, 4),
        vm_cr_locked: bit64(vm_cr, 3),
    })
}

fn probe_rdt(hw: &mut impl HwRead, max_basic_leaf: u32) -> RdtMonitoring {
    if max_basic_leaf < 7 {
        return RdtMonitoring::Absent("max basic CPUID leaf < 7, so no CPUID.7.0:EBX[12] (PQM)");
    }
    if !bit32(hw.cpuid(7, 0)[1], 12) {
        return RdtMonitoring::Absent("CPUID.(EAX=7,ECX=0):EBX[12] (PQM) is 0");
    }
    if max_basic_leaf < 0xf {
        return RdtMonitoring::Absent("PQM is set but the max basic CPUID leaf is below 0xF");
    }
    let sub0 = hw.cpuid(0xf, 0);
    if !bit32(sub0[3], 1) {
        return RdtMonitoring::Absent("PQM is set but CPUID.(EAX=0xF,ECX=0):EDX[1] (L3 monitoring) is 0");
    }
    let sub1 = hw.cpuid(0xf, 1);
    let l3 = L3Monitoring {
        max_rmid: sub1[2],
        upscaling_factor: sub1[1],
        counter_width: 24 + (sub1[0] & 0xff),
        overflow_bit: bit32(sub1[0], 8),
        occupancy: bit32(sub1[3], 0),
        mbm_total: bit32(sub1[3], 1),
        mbm_local: bit32(sub1[3], 2),
    };
    RdtMonitoring::Present { max_rmid_any: sub0[1], l3 }
}

/// Why this CPU cannot host guests, as one line naming what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// Neither VMX nor SVM.
    NoVirtualization,
    /// IA32_FEATURE_CONTROL is locked with VMX disabled.
    VmxLockedOff,
    /// VMX without EPT.
    VmxNoEpt,
    /// VM_CR.SVMDIS is set.
    SvmDisabled {
        /// Whether VM_CR.LOCK is also set (then only firmware setup can change it).
        locked: bool,
    },
    /// SVM without nested paging.
    SvmNoNpt,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::NoVirtualization => f.write_str(
                "no hardware virtualization: the CPU reports neither VMX (CPUID.1:ECX[5]) nor SVM (CPUID.80000001:ECX[2])",
            ),
            Unsupported::VmxLockedOff => f.write_str(
                "VMX is disabled by firmware: IA32_FEATURE_CONTROL is locked with bit 2 (VMX outside SMX) clear; enable VT-x in the firmware setup",
            ),
            Unsupported::VmxNoEpt => f.write_str(
                "VMX without EPT: IA32_VMX_PROCBASED_CTLS2 does not allow \"enable EPT\"; guests need EPT",
            ),
            Unsupported::SvmDisabled { locked: true } => f.write_str(
                "SVM is disabled by firmware: VM_CR.SVMDIS=1 and VM_CR.LOCK=1; enable SVM in the firmware setup",
            ),
            Unsupported::SvmDisabled { locked: false } => f.write_str(
                "SVM is disabled: VM_CR.SVMDIS=1 (unlocked, but this hypervisor does not override firmware)",
            ),
            Unsupported::SvmNoNpt => f.write_str(
                "SVM without nested paging: CPUID.8000000A:EDX[0] (NP) is 0; guests need NPT",
            ),
        }
    }
}

impl Capabilities {
    /// Can this CPU run our guests? If not, the reason.
    pub fn check_usable(&self) -> Result<(), Unsupported> {
        match &self.virtualization {
            Virtualization::None => Err(Unsupported::NoVirtualization),
            Virtualization::Vmx(v) if !v.feature_control.vmx_usable() => Err(Unsupported::VmxLockedOff),
            Virtualization::Vmx(v) if !v.ept => Err(Unsupported::VmxNoEpt),
            Virtualization::Vmx(_) => Ok(()),
            Virtualization::Svm(s) if s.disabled_by_firmware => {
                Err(Unsupported::SvmDisabled { locked: s.vm_cr_locked })
            }
            Virtualization::Svm(s) if !s.npt => Err(Unsupported::SvmNoNpt),
            Virtualization::Svm(_) => Ok(()),
        }
    }

    /// The machine-readable summary: `CAPS v=1 key=value ...` on one line, keys stable.
    /// Booleans are 0/1, numbers decimal unless the key ends in `_hex`.
    pub fn machine_line(&self) -> String {
        let mut s = String::from("CAPS v=1");
        let b = |v: bool| u8::from(v);
        let _ = write!(
            s,
            " vendor={} family={} model={} stepping={} max_leaf_hex={:x} max_ext_leaf_hex={:x} under_hypervisor={}",
            self.vendor.as_str(),
            self.family,
            self.model,
            self.stepping,
            self.max_basic_leaf,
            self.max_extended_leaf,
            b(self.under_hypervisor)
        );
        match &self.virtualization {
            Virtualization::None => s.push_str(" virt=none"),
            Virtualization::Vmx(v) => {
                let _ = write!(
                    s,
                    " virt=vmx vmx.feature_control_locked={} vmx.outside_smx={} vmx.vmcs_revision_hex={:x} vmx.true_controls={} vmx.ept={} vmx.ept_ad={} vmx.ept_2m={} vmx.ept_1g={} vmx.pml={} vmx.vpid={} vmx.unrestricted_guest={} vmx.preemption_timer={}",
                    b(v.feature_control.locked),
                    b(v.feature_control.vmx_outside_smx),
                    v.vmcs_revision,
                    b(v.true_controls),
                    b(v.ept),
                    b(v.ept_ad),
                    b(v.ept_2m),
                    b(v.ept_1g),
                    b(v.pml),
                    b(v.vpid),
                    b(v.unrestricted_guest),
                    b(v.preemption_timer)
                );
            }
            Virtualization::Svm(v) => {
                let _ = write!(
                    s,
                    " virt=svm svm.revision={} svm.asids={} svm.npt={} svm.nrips={} svm.vmcb_clean={} svm.flush_by_asid={} svm.decode_assists={} svm.disabled_by_firmware={} svm.vm_cr_locked={}",
                    v.revision,
                    v.asids,
                    b(v.npt),
                    b(v.nrips),
                    b(v.vmcb_clean),
                    b(v.flush_by_asid),
                    b(v.decode_assists),
                    b(v.disabled_by_firmware),
                    b(v.vm_cr_locked)
                );
            }
        }
        match &self.rdt {
            RdtMonitoring::Absent(_) => s.push_str(" rdt.monitoring=0"),
            RdtMonitoring::Present { max_rmid_any, l3 } => {
                let _ = write!(s, " rdt.monitoring=1 rdt.max_rmid_any={max_rmid_any}");
                {
                    let _ = write!(
                        s,
                        " rdt.l3.max_rmid={} rdt.l3.upscaling_factor={} rdt.l3.counter_width={} rdt.l3.overflow_bit={} rdt.l3.occupancy={} rdt.l3.mbm_total={} rdt.l3.mbm_local={}",
                        l3.max_rmid,
                        l3.upscaling_factor,
                        l3.counter_width,
                        b(l3.overflow_bit),
                        b(l3.occupancy),
                        b(l3.mbm_total),
                        b(l3.mbm_local)
                    );
                }
            }
        }
        let _ = write!(
            s,
            " usable={}",
            match self.check_usable() {
                Ok(()) => "1",
                Err(_) => "0",
            }
        );
        s
    }
}

fn yes(v: bool) -> &'static str {
    if v { "yes" } else { "no" }
}

impl Capabilities {
    /// Vendor, family, model and stepping in one phrase, and whether a hypervisor (or
    /// an emulator) is underneath.
    pub fn identity(&self) -> String {
        alloc::format!(
            "{} family {:#x} model {:#x} stepping {}{}",
            self.vendor.as_str(),
            self.family,
            self.model,
            self.stepping,
            if self.under_hypervisor { " (running under a hypervisor or emulator)" } else { "" }
        )
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Capabilities")?;
        writeln!(f, "  cpu              {}", self.identity())?;
        match &self.virtualization {
            Virtualization::None => writeln!(f, "  virtualization   none")?,
            Virtualization::Vmx(v) => {
                writeln!(
                    f,
                    "  virtualization   Intel VMX (VMCS revision {:#x}, {} controls)",
                    v.vmcs_revision,
                    if v.true_controls { "true" } else { "legacy" }
                )?;
                writeln!(
                    f,
                    "    feature ctl    {}, VMX outside SMX {}",
                    if v.feature_control.locked { "locked" } else { "unlocked" },
                    if v.feature_control.vmx_outside_smx { "enabled" } else { "disabled" }
                )?;
                writeln!(
                    f,
                    "    EPT            {} (A/D bits {}, 2M pages {}, 1G pages {})",
                    yes(v.ept),
                    yes(v.ept_ad),
                    yes(v.ept_2m),
                    yes(v.ept_1g)
                )?;
                writeln!(f, "    PML            {}", yes(v.pml))?;
                writeln!(f, "    VPID           {}", yes(v.vpid))?;
                writeln!(f, "    unrestricted   {}", yes(v.unrestricted_guest))?;
                writeln!(f, "    preempt timer  {}", yes(v.preemption_timer))?;
            }
            Virtualization::Svm(v) => {
                writeln!(f, "  virtualization   AMD SVM (revision {}, {} ASIDs)", v.revision, v.asids)?;
                writeln!(f, "    NPT            {}", yes(v.npt))?;
                writeln!(f, "    NRIPS          {}", yes(v.nrips))?;
                writeln!(f, "    VMCB clean     {}", yes(v.vmcb_clean))?;
                writeln!(f, "    decode assists {}", yes(v.decode_assists))?;
                writeln!(f, "    flush by ASID  {}", yes(v.flush_by_asid))?;
                writeln!(
                    f,
                    "    VM_CR          SVMDIS={} LOCK={}",
                    u8::from(v.disabled_by_firmware),
                    u8::from(v.vm_cr_locked)
                )?;
            }
        }
        match &self.rdt {
            RdtMonitoring::Absent(why) => writeln!(f, "  RDT monitoring   absent: {why}")?,
            RdtMonitoring::Present { max_rmid_any, l3 } => {
                writeln!(f, "  RDT monitoring   present (max RMID of any resource {max_rmid_any})")?;
                {
                    writeln!(
                        f,
                        "    L3             max RMID {}, upscaling {} B, counter width {} bits{}",
                        l3.max_rmid,
                        l3.upscaling_factor,
                        l3.counter_width,
                        if l3.overflow_bit { ", overflow bit" } else { "" }
                    )?;
                    writeln!(
                        f,
                        "    events         llc_occupancy {}, mbm_total {}, mbm_local {}",
                        yes(l3.occupancy),
                        yes(l3.mbm_total),
                        yes(l3.mbm_local)
                    )?;
                }
            }
        }
        match self.check_usable() {
            Ok(()) => writeln!(f, "  usable           yes"),
            Err(why) => writeln!(f, "  usable           no: {why}"),
        }
    }
}
