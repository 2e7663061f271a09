//! The MSRs a guest may touch, in one place: everything else is #GP(0), as for an MSR
//! the CPU does not implement. Every RDMSR and WRMSR exits (SVM: all MSR permission
//! map bits set; VMX: no MSR bitmap), so nothing is passed through to the hardware:
//! each MSR below is emulated here and its value is kept per vCPU, either where the
//! hardware uses it (the backend's VMCB/VMCS/MSR lists, through `Vcpu::read_msr` /
//! `write_msr`, switched at every entry and exit as the backends' module docs describe)
//! or in [`MsrState`] when it has no effect the hardware must see.
//!
//! | MSR | read | write | kept in |
//! |---|---|---|---|
//! | IA32_TSC (0x10) | host TSC + the vCPU's TSC offset (the guest's TSC starts at 0 with the domain) | sets the offset so the guest reads the value written | VMCB TSC_OFFSET / VMCS TSC offset |
//! | IA32_PLATFORM_ID (0x17) | 0 | #GP | — |
//! | IA32_APIC_BASE (0x1B) | the vCPU's LAPIC | the LAPIC's legal transitions (xAPIC ↔ x2APIC, disable), else #GP | `devices::lapic` |
//! | x2APIC registers (0x800–0x8FF) | the vCPU's LAPIC | the LAPIC (IPIs and EOIs routed: `domain::platform`) | `devices::lapic` |
//! | IA32_TSC_DEADLINE (0x6E0) | the LAPIC's deadline, in the vCPU's TSC | arms the LAPIC (converted to the domain's TSC if the guest moved its TSC) | `devices::lapic` |
//! | IA32_BIOS_SIGN_ID / PATCH_LEVEL (0x8B) | 0 (no microcode revision) | 0 accepted (Linux's "update the signature" write), else #GP | — |
//! | IA32_MTRRCAP (0xFE) | 0x508: 8 variable ranges, fixed ranges, WC; no SMRR | #GP | — |
//! | IA32_MTRR_PHYSBASE/MASK0–7 (0x200–0x20F) | stored | validated: memory type, reserved bits and bits at or above MAXPHYADDR → #GP | [`MsrState`] |
//! | IA32_MTRR_FIX* (0x250, 0x258, 0x259, 0x268–0x26F) | stored | validated: each byte a memory type | [`MsrState`] |
//! | IA32_MTRR_DEF_TYPE (0x2FF) | stored; reset 0xC06 (enabled, fixed enabled, default WB: what firmware leaves) | validated (type, reserved bits) | [`MsrState`] |
//! | IA32_MCG_CAP (0x179) | 0: no banks, no MCG_CTL | #GP | — |
//! | IA32_MCG_STATUS (0x17A) | stored | bits 2:0 (RIPV, EIPV, MCIP), else #GP | [`MsrState`] |
//! | IA32_MCG_CTL (0x17B) | #GP (MCG_CAP.MCG_CTL_P = 0) | #GP | — |
//! | IA32_MISC_ENABLE (0x1A0) | stored; reset 0x1801 (fast strings; BTS and PEBS unavailable) | only bit 0 (fast strings) may change, else #GP | [`MsrState`] |
//! | IA32_DEBUGCTL (0x1D9) | 0 | 0 accepted (no LBR/BTF), else #GP | — |
//! | IA32_PAT (0x277) | stored | validated: every entry a PAT memory type | VMCB G_PAT / VMX MSR lists |
//! | IA32_SYSENTER_CS/ESP/EIP (0x174–0x176) | stored | ESP/EIP must be canonical; AMD-compatible policies keep their low 32 bits (sysenter-msr-width) | VMCB (VMLOAD/VMSAVE) / VMCS guest fields |
//! | IA32_EFER (0xC0000080) | stored, without SVME | SCE, LME, NXE (and AMD's FFXSR) as the policy offers them; LMA is kept; LME may not change while paging is on | VMCB EFER / VMCS guest EFER |
//! | STAR, LSTAR, CSTAR, SFMASK (0xC0000081–84) | stored | LSTAR/CSTAR canonical, SFMASK bits 63:32 zero | VMCB (VMLOAD/VMSAVE) / VMX MSR lists |
//! | FS_BASE, GS_BASE, KERNEL_GS_BASE (0xC0000100–02) | stored | canonical | VMCB / VMCS (FS, GS), VMX MSR lists (KERNEL_GS_BASE) |
//! | IA32_TSC_AUX (0xC0000103) | stored | bits 63:32 zero; only with RDTSCP or RDPID offered | SVM: switched around VMRUN / VMX MSR lists |
//! | AMD HWCR (0xC0010015), AMD policies only | 0x0100_0000 (TscFreqSel: the TSC counts at P0) | only the same value, else #GP | — |
//! | AMD SYSCFG (0xC0010010), AMD policies only | 0: no SME/SEV (MemEncryptionModeEn clear), no MTRR extensions | only 0, else #GP | — |
//! | AMD NB_CFG (0xC001001F), AMD policies only | stored | only EnableCf8ExtCfg (bit 46) may be set, else #GP; it has no effect: no PCI configuration space is emulated | [`MsrState`] |
//! | MSR_KVM_WALL_CLOCK_NEW (0x4B564D00), with KVM's clock offered | stored | any value; the hypervisor writes the wall clock at guest time 0 to that guest address (`devices::kvmclock`) | [`MsrState`] |
//! | MSR_KVM_SYSTEM_TIME_NEW (0x4B564D01), with KVM's clock offered | stored | any value; with bit 0 set the hypervisor writes this vCPU's `pvclock_vcpu_time_info` to the address in the rest (again on a migrated domain's first entry, at this host's TSC rate) | [`MsrState`] |
//!
//! MTRRs are stored and validated, not enforced: guest memory is write-back through
//! the nested tables whatever the guest's MTRRs say (there is no device memory behind
//! them to need another type). MCE/MCA are offered with zero banks, so a machine
//! check is never reported to a guest. Everything Linux probes with `rdmsr_safe` and
//! is not above (IA32_FEATURE_CONTROL, SPEC_CTRL, TSC_ADJUST, AMD's DE_CFG and
//! LS_CFG, the PMU, ...) gets #GP, which Linux takes as "not there", and the
//! features that would make Linux rely on them are not in the default CPUID policy.

use levelling::Vendor;
use levelling::features::{self, Feature};

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit, GuestMsr, Vcpu};
use crate::devices::kvmclock::{self, MSR_SYSTEM_TIME, MSR_WALL_CLOCK};
use crate::devices::lapic::Effects;
use crate::domain::Domain;
use crate::mm::frames::FramePool;

/// IA32_TSC.
const TSC: u32 = 0x10;
/// IA32_APIC_BASE.
const APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
const TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC register MSRs (SDM Vol. 3A 11.12.1, Table 11-6).
const X2APIC: core::ops::RangeInclusive<u32> = 0x800..=0x8ff;

const PLATFORM_ID: u32 = 0x17;
const BIOS_SIGN_ID: u32 = 0x8b;
const MTRRCAP: u32 = 0xfe;
const SYSENTER_CS: u32 = 0x174;
const SYSENTER_ESP: u32 = 0x175;
const SYSENTER_EIP: u32 = 0x176;
const MCG_CAP: u32 = 0x179;
const MCG_STATUS: u32 = 0x17a;
const MISC_ENABLE: u32 = 0x1a0;
const DEBUGCTL: u32 = 0x1d9;
const MTRR_VAR: core::ops::RangeInclusive<u32> = 0x200..=0x20f;
const MTRR_FIX: [u32; 11] = [0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];
const PAT: u32 = 0x277;
const MTRR_DEF_TYPE: u32 = 0x2ff;
const EFER: u32 = 0xc000_0080;
const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const CSTAR: u32 = 0xc000_0083;
const SFMASK: u32 = 0xc000_0084;
const FS_BASE: u32 = 0xc000_0100;
const GS_BASE: u32 = 0xc000_0101;
const KERNEL_GS_BASE: u32 = 0xc000_0102;
const TSC_AUX: u32 = 0xc000_0103;
const HWCR: u32 = 0xc001_0015;
/// AMD SYSCFG: Linux reads it at boot (memory encryption, `sme_enable`).
const SYSCFG: u32 = 0xc001_0010;
/// AMD NB_CFG: Linux sets EnableCf8ExtCfg on AMD families with it (`amd_bus.c`).
const NB_CFG: u32 = 0xc001_001f;
/// NB_CFG bit 46, EnableCf8ExtCfg: extended PCI configuration through port 0xCF8.
const NB_CFG_CF8_EXT: u64 = 1 << 46;

/// MTRRcap: VCNT = 8 (7:0), FIX (8), WC (10); no SMRR (11) (SDM Vol. 3A 13.11.2.1).
pub const MTRRCAP_VALUE: u64 = 0x508;
/// MTRRdefType after our "firmware": E (11), FE (10), default type WB (6).
pub const MTRR_DEF_TYPE_RESET: u64 = 0xc06;
/// MISC_ENABLE after reset: fast strings (0), BTS unavailable (11), PEBS unavailable (12).
pub const MISC_ENABLE_RESET: u64 = 0x1801;
/// HWCR: TscFreqSel (24), the TSC counts at the P0 frequency (AMD BKDG/PPR; Linux
/// warns about firmware without it).
pub const HWCR_VALUE: u64 = 1 << 24;

/// EFER bits (SDM Vol. 3A 2.2.1, APM Vol. 2 3.1.7).
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_FFXSR: u64 = 1 << 14;
const CR0_PG: u64 = 1 << 31;

/// The MSRs the core keeps itself, per vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsrState {
    mtrr_def_type: u64,
    mtrr_fixed: [u64; 11],
    mtrr_var: [u64; 16],
    misc_enable: u64,
    mcg_status: u64,
    nb_cfg: u64,
    /// MSR_KVM_SYSTEM_TIME_NEW and MSR_KVM_WALL_CLOCK_NEW as written.
    kvm_system_time: u64,
    kvm_wall_clock: u64,
    /// The kvm-clock structure in guest memory was written on another host (a
    /// migrated domain): write it again before the vCPU next runs.
    kvmclock_stale: bool,
}

impl Default for MsrState {
    fn default() -> Self {
        Self {
            mtrr_def_type: MTRR_DEF_TYPE_RESET,
            mtrr_fixed: [0; 11],
            mtrr_var: [0; 16],
            misc_enable: MISC_ENABLE_RESET,
            nb_cfg: 0,
            mcg_status: 0,
            kvm_system_time: 0,
            kvm_wall_clock: 0,
            kvmclock_stale: false,
        }
    }
}

/// The features whose MSRs (or MSR bits) come and go with them.
const GATES: [Feature; 11] = [
    features::MTRR,
    features::PAT,
    features::MCA,
    features::MCE,
    features::SEP,
    features::SYSCALL,
    features::LM,
    features::NX,
    features::FFXSR,
    features::RDTSCP,
    features::RDPID,
];

/// What an MSR access may depend on in the domain's policy: a copy small enough to
/// take on every MSR exit without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    /// Vendor of the policy.
    pub vendor: Vendor,
    /// MAXPHYADDR.
    pub phys_bits: u8,
    /// Linear address bits (canonical checks).
    pub virt_bits: u8,
    /// Bit i: the policy offers `GATES[i]`.
    offered: u16,
    /// KVM's clock is offered (its CPUID leaves and MSRs).
    pub pv_clock: bool,
}

impl Env {
    /// The facts of a policy with `features`.
    pub fn new(vendor: Vendor, phys_bits: u8, virt_bits: u8, features: &levelling::Featureset) -> Self {
        let offered = GATES.iter().enumerate().filter(|(_, f)| f.is_in(features)).fold(0, |m, (i, _)| m | (1 << i));
        Env { vendor, phys_bits, virt_bits, offered, pv_clock: super::cpuid::pv_clock_offered() }
    }

    fn has(&self, f: Feature) -> bool {
        GATES.iter().position(|g| *g == f).is_some_and(|i| self.offered & (1 << i) != 0)
    }
}

/// Where an MSR lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// In the backend (VMCB/VMCS/MSR lists), validated here.
    Backend(GuestMsr),
    /// The TSC (read through the offset).
    Tsc,
    /// The LAPIC.
    Lapic,
    /// [`MsrState`] or a constant.
    Core,
}

/// Where `msr` lives, or `None`: #GP. Features the policy does not offer take their
/// MSRs away with them (MTRRs without `mtrr`, PAT without `pat`, MCG_* without
/// `mca`/`mce`, SYSENTER_* without `sep`, TSC_AUX without `rdtscp`/`rdpid`, HWCR off
/// AMD and Hygon).
pub fn home(msr: u32, env: &Env) -> Option<Home> {
    let has = |f| env.has(f);
    let backend = |m| Some(Home::Backend(m));
    match msr {
        TSC => Some(Home::Tsc),
        APIC_BASE | TSC_DEADLINE => Some(Home::Lapic),
        m if X2APIC.contains(&m) => Some(Home::Lapic),
        PLATFORM_ID | BIOS_SIGN_ID | MISC_ENABLE | DEBUGCTL => Some(Home::Core),
        MTRRCAP | MTRR_DEF_TYPE if has(features::MTRR) => Some(Home::Core),
        m if (MTRR_VAR.contains(&m) || MTRR_FIX.contains(&m)) && has(features::MTRR) => Some(Home::Core),
        MCG_CAP | MCG_STATUS if has(features::MCA) || has(features::MCE) => Some(Home::Core),
        // Hygon has AMD's MSRs (Linux runs AMD's code for X86_VENDOR_HYGON).
        HWCR | SYSCFG | NB_CFG if env.vendor.is_amd_compatible() => Some(Home::Core),
        MSR_WALL_CLOCK | MSR_SYSTEM_TIME if env.pv_clock => Some(Home::Core),
        PAT if has(features::PAT) => backend(GuestMsr::Pat),
        SYSENTER_CS if has(features::SEP) => backend(GuestMsr::SysenterCs),
        SYSENTER_ESP if has(features::SEP) => backend(GuestMsr::SysenterEsp),
        SYSENTER_EIP if has(features::SEP) => backend(GuestMsr::SysenterEip),
        EFER => backend(GuestMsr::Efer),
        STAR => backend(GuestMsr::Star),
        LSTAR => backend(GuestMsr::Lstar),
        CSTAR => backend(GuestMsr::Cstar),
        SFMASK => backend(GuestMsr::Sfmask),
        FS_BASE => backend(GuestMsr::FsBase),
        GS_BASE => backend(GuestMsr::GsBase),
        KERNEL_GS_BASE => backend(GuestMsr::KernelGsBase),
        TSC_AUX if has(features::RDTSCP) || has(features::RDPID) => backend(GuestMsr::TscAux),
        _ => None,
    }
}

/// Whether `t` is a memory type an MTRR may hold (SDM Vol. 3A Table 13-8: UC, WC,
/// WT, WP, WB).
fn mtrr_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

/// Whether `t` is a PAT memory type (Table 13-10: also UC-, 7).
fn pat_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6 | 7)
}

/// Whether `v` is canonical for `bits` linear address bits.
pub fn canonical(v: u64, bits: u8) -> bool {
    let shift = 64 - u32::from(bits.clamp(32, 64));
    (((v << shift) as i64) >> shift) as u64 == v
}

impl MsrState {
    /// RDMSR of an MSR whose [`home`] is [`Home::Core`].
    pub fn read(&self, msr: u32) -> Option<u64> {
        Some(match msr {
            PLATFORM_ID | BIOS_SIGN_ID | DEBUGCTL | MCG_CAP | SYSCFG => 0,
            NB_CFG => self.nb_cfg,
            MTRRCAP => MTRRCAP_VALUE,
            MTRR_DEF_TYPE => self.mtrr_def_type,
            m if MTRR_VAR.contains(&m) => self.mtrr_var[(m - 0x200) as usize],
            m if MTRR_FIX.contains(&m) => self.mtrr_fixed[MTRR_FIX.iter().position(|&f| f == m)?],
            MCG_STATUS => self.mcg_status,
            MISC_ENABLE => self.misc_enable,
            HWCR => HWCR_VALUE,
            MSR_SYSTEM_TIME => self.kvm_system_time,
            MSR_WALL_CLOCK => self.kvm_wall_clock,
            _ => return None,
        })
    }

    /// WRMSR of an MSR whose [`home`] is [`Home::Core`]: `Err(())` is #GP.
    #[allow(clippy::result_unit_err)]
    pub fn write(&mut self, msr: u32, value: u64, env: &Env) -> Result<(), ()> {
        let above_maxphy = !0u64 << env.phys_bits.clamp(36, 52);
        match msr {
            BIOS_SIGN_ID | DEBUGCTL | SYSCFG if value == 0 => {}
            NB_CFG if value & !NB_CFG_CF8_EXT == 0 => self.nb_cfg = value,
            MTRR_DEF_TYPE => {
                // Table 13-8 / Figure 13-8: type 7:0, FE 10, E 11; the rest reserved.
                if value & !0xcff != 0 || !mtrr_type(value & 0xff) {
                    return Err(());
                }
                self.mtrr_def_type = value;
            }
            m if MTRR_FIX.contains(&m) => {
                if !(0..8).all(|i| mtrr_type((value >> (8 * i)) & 0xff)) {
                    return Err(());
                }
                let i = MTRR_FIX.iter().position(|&f| f == m).ok_or(())?;
                self.mtrr_fixed[i] = value;
            }
            m if MTRR_VAR.contains(&m) => {
                // 13.11.2.3: PHYSBASE: type 7:0, 11:8 reserved; PHYSMASK: 10:0
                // reserved, V in 11; bits at or above MAXPHYADDR reserved in both.
                let base = m % 2 == 0;
                let reserved = above_maxphy | if base { 0xf00 } else { 0x7ff };
                if value & reserved != 0 || (base && !mtrr_type(value & 0xff)) {
                    return Err(());
                }
                self.mtrr_var[(m - 0x200) as usize] = value;
            }
            MCG_STATUS if value & !0x7 == 0 => self.mcg_status = value,
            MISC_ENABLE if (value ^ self.misc_enable) & !1 == 0 => self.misc_enable = value,
            HWCR if value == HWCR_VALUE => {}
            // KVM takes any value; what it points at is checked when it is written.
            MSR_SYSTEM_TIME => self.kvm_system_time = value,
            MSR_WALL_CLOCK => self.kvm_wall_clock = value,
            _ => return Err(()),
        }
        Ok(())
    }
}

/// IA32_TSC, as migration carries it (the vCPU's TSC at pause).
pub const MSR_TSC: u32 = TSC;
/// IA32_TSC_AUX, as migration carries it.
pub const MSR_TSC_AUX: u32 = TSC_AUX;

/// The MSRs [`MsrState`] stores (the rest of [`Home::Core`] are constants).
fn stored(msr: u32) -> bool {
    matches!(msr, MTRR_DEF_TYPE | MCG_STATUS | MISC_ENABLE | NB_CFG | MSR_WALL_CLOCK | MSR_SYSTEM_TIME)
        || MTRR_VAR.contains(&msr)
        || MTRR_FIX.contains(&msr)
}

/// Why a migrated MSR value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrRestoreError {
    /// This hypervisor does not keep that MSR for a guest with this policy.
    NotVirtualized(u32),
    /// A value the guest's own WRMSR would get #GP for.
    BadValue(u32, u64),
}

impl core::fmt::Display for MsrRestoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotVirtualized(m) => {
                write!(f, "MSR {m:#x} is not virtualized here for the domain's CPUID policy")
            }
            Self::BadValue(m, v) => write!(f, "MSR {m:#x} cannot hold {v:#x} here (a guest WRMSR would #GP)"),
        }
    }
}

impl MsrState {
    /// The stored MSRs the guest can reach with `env`'s policy, `(msr, value)` in
    /// ascending order: what migration carries (the constants need not travel).
    pub fn saved(&self, env: &Env) -> alloc::vec::Vec<(u32, u64)> {
        let mut out: alloc::vec::Vec<(u32, u64)> =
            [MCG_STATUS, MISC_ENABLE, MTRR_DEF_TYPE, NB_CFG, MSR_WALL_CLOCK, MSR_SYSTEM_TIME]
                .into_iter()
                .chain(MTRR_VAR)
                .chain(MTRR_FIX)
                .filter(|&m| home(m, env) == Some(Home::Core))
                .filter_map(|m| self.read(m).map(|v| (m, v)))
                .collect();
        out.sort_unstable_by_key(|&(m, _)| m);
        out
    }

    /// Restore a migrated value of a stored MSR, validated as the guest's WRMSR is.
    pub fn restore(&mut self, msr: u32, value: u64, env: &Env) -> Result<(), MsrRestoreError> {
        if !stored(msr) || home(msr, env) != Some(Home::Core) {
            return Err(MsrRestoreError::NotVirtualized(msr));
        }
        self.write(msr, value, env).map_err(|()| MsrRestoreError::BadValue(msr, value))?;
        if msr == MSR_SYSTEM_TIME && value & 1 != 0 {
            self.kvmclock_stale = true;
        }
        Ok(())
    }

    /// Whether the kvm-clock structure must be written again before the vCPU runs.
    pub fn kvmclock_stale(&self) -> bool {
        self.kvmclock_stale
    }
}

/// Write the kvm-clock structure MSR `msr` (MSR_KVM_SYSTEM_TIME_NEW or
/// MSR_KVM_WALL_CLOCK_NEW) of vCPU `vi` points at, into guest memory (marked dirty as
/// any write of the hypervisor's): for the system time, guest time now at the vCPU's TSC
/// now, with this host's TSC scale; for the wall clock, the wall clock at guest time 0.
/// With `continue_from` set (a structure another host wrote), the new system time is
/// no earlier than what that structure gives now, so the guest's clock never goes back.
/// Nothing to do for a disabled system time. An error names what could not be done.
pub(crate) fn write_kvmclock<B: Backend>(
    d: &mut Domain<B>,
    vi: usize,
    pool: &mut FramePool,
    msr: u32,
    continue_from: bool,
) -> Result<(), alloc::string::String> {
    let hz = crate::drivers::time::tsc_hz().ok_or("the TSC rate is not known")?;
    let now = d.guest_now_ns();
    let slot = d.vcpus.get(vi).ok_or("no such vCPU")?;
    let tsc = host_tsc().wrapping_add(slot.vcpu.tsc_offset());
    let value = slot.msrs.read(msr).ok_or("not a kvm-clock MSR")?;
    let mem = d.mem.as_ref().ok_or("the domain has no memory")?;
    let (gpa, bytes) = if msr == MSR_SYSTEM_TIME {
        if value & 1 == 0 {
            return Ok(());
        }
        let gpa = value & !1;
        let mut old = [0u8; kvmclock::TIME_INFO_LEN];
        mem.read(pool, gpa, &mut old).map_err(|e| alloc::format!("system time at {gpa:#x}: {e}"))?;
        let (mul, shift) = kvmclock::time_scale(hz).ok_or("a TSC rate of 0")?;
        let system = if continue_from { now.max(kvmclock::read_time(&old, tsc)) } else { now };
        let version = kvmclock::next_version(kvmclock::parse_time_info(&old).0);
        (gpa, alloc::vec::Vec::from(kvmclock::time_info(version, tsc, system, mul, shift, kvmclock::FLAG_TSC_STABLE)))
    } else {
        let mut old = [0u8; 4];
        mem.read(pool, value, &mut old).map_err(|e| alloc::format!("wall clock at {value:#x}: {e}"))?;
        let up = crate::drivers::time::uptime_ns().unwrap_or(0);
        // unix_time() is boot's seconds plus whole seconds of uptime; add the rest.
        let wall_now = i128::from(crate::drivers::time::unix_time()) * 1_000_000_000 + i128::from(up % 1_000_000_000);
        let version = kvmclock::next_version(u32::from_le_bytes(old));
        (value, alloc::vec::Vec::from(kvmclock::wall_clock(version, wall_now - i128::from(now))))
    };
    mem.write(pool, gpa, &bytes).map_err(|e| alloc::format!("{gpa:#x}: {e}"))?;
    crate::domain::dirty::hypervisor_wrote(d, gpa..gpa + bytes.len() as u64);
    if let Some(slot) = d.vcpus.get_mut(vi) {
        slot.msrs.kvmclock_stale = false;
    }
    Ok(())
}

/// Check a WRMSR of `value` to an MSR the backend holds (`old` its current value,
/// `cr0` the guest's CR0): the value to store, or `Err(())` for #GP.
#[allow(clippy::result_unit_err)]
pub fn check_backend_write(msr: GuestMsr, value: u64, old: u64, cr0: u64, env: &Env) -> Result<u64, ()> {
    let canon = |v: u64| if canonical(v, env.virt_bits) { Ok(v) } else { Err(()) };
    match msr {
        GuestMsr::Efer => {
            let mut allowed = EFER_LMA;
            for (bit, f) in [(EFER_SCE, features::SYSCALL), (EFER_LME, features::LM), (EFER_NXE, features::NX)] {
                if env.has(f) {
                    allowed |= bit;
                }
            }
            if env.vendor.is_amd_compatible() && env.has(features::FFXSR) {
                allowed |= EFER_FFXSR;
            }
            if value & !allowed != 0 {
                return Err(());
            }
            // SDM Vol. 3A 10.8.5 / APM 14.6.1: LME may not change while paging is on;
            // LMA is the processor's (written values are ignored).
            if cr0 & CR0_PG != 0 && (value ^ old) & EFER_LME != 0 {
                return Err(());
            }
            Ok((value & !EFER_LMA) | (old & EFER_LMA))
        }
        GuestMsr::Pat => {
            if (0..8).all(|i| pat_type((value >> (8 * i)) & 0xff)) {
                Ok(value)
            } else {
                Err(())
            }
        }
        GuestMsr::Star | GuestMsr::SysenterCs => Ok(value),
        // `levelling`'s sysenter-msr-width: AMD and Hygon keep only the low 32 bits of
        // SYSENTER_ESP/EIP (legacy-mode MSRs there, APM Vol. 2 6.1.1). A guest of an
        // AMD-compatible policy sees that on every host, an Intel host included, so
        // what it reads back does not change when it migrates between vendors.
        // Non-canonical values are still refused, as on Intel (#GP).
        GuestMsr::SysenterEsp | GuestMsr::SysenterEip if env.vendor.is_amd_compatible() => {
            canon(value).map(|v| v & 0xffff_ffff)
        }
        GuestMsr::Lstar
        | GuestMsr::Cstar
        | GuestMsr::FsBase
        | GuestMsr::GsBase
        | GuestMsr::KernelGsBase
        | GuestMsr::SysenterEsp
        | GuestMsr::SysenterEip => canon(value),
        GuestMsr::Sfmask | GuestMsr::TscAux => {
            if value >> 32 == 0 {
                Ok(value)
            } else {
                Err(())
            }
        }
    }
}

/// The policy facts MSR emulation depends on.
fn env<B: Backend>(ctx: &ExitCtx<'_, B>) -> Env {
    env_of(&ctx.d.policy)
}

/// The MSR facts of `policy`.
pub(crate) fn env_of(p: &levelling::Policy) -> Env {
    Env::new(p.vendor, p.phys_bits, p.virt_bits, &p.features)
}

/// The host's TSC.
fn host_tsc() -> u64 {
    crate::drivers::time::now_ticks()
}

/// RDMSR of ECX: from the LAPIC, the backend, the TSC or [`MsrState`] as [`home`]
/// says; anything else, or an access the LAPIC refuses, is #GP(0).
pub fn handle_read<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let now = ctx.d.guest_now_ns();
    let env = env(ctx);
    let base_offset = ctx.d.base_tsc_offset();
    let slot = ctx.slot();
    let msr = slot.regs.rcx as u32;
    let value = match home(msr, &env) {
        None => None,
        Some(Home::Tsc) => Some(host_tsc().wrapping_add(slot.vcpu.tsc_offset())),
        Some(Home::Lapic) => match msr {
            APIC_BASE => Some(slot.lapic.read_apic_base()),
            // The LAPIC counts in the domain's TSC; the guest may have moved its own.
            TSC_DEADLINE => match slot.lapic.read_tsc_deadline() {
                0 => Some(0),
                d => Some(d.wrapping_add(slot.vcpu.tsc_offset().wrapping_sub(base_offset))),
            },
            m => slot.lapic.read_msr(m, now).ok(),
        },
        Some(Home::Backend(m)) => match slot.vcpu.read_msr(m) {
            Ok(v) => Some(v),
            Err(e) => return Action::Crash(alloc::format!("RDMSR {msr:#x} at RIP {:#x}: {e}", exit.rip)),
        },
        Some(Home::Core) => slot.msrs.read(msr),
    };
    match value {
        Some(v) => {
            slot.regs.rax = v & 0xffff_ffff;
            slot.regs.rdx = v >> 32;
            ctx.skip(exit)
        }
        None => ctx.inject(13, Some(0)),
    }
}

/// WRMSR of EDX:EAX to ECX, validated as the table in the module documentation says
/// (IPIs the LAPIC sends are routed to the domain's other vCPUs); anything else is
/// #GP(0), as for an unknown MSR on hardware.
pub fn handle_write<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let now = ctx.d.guest_now_ns();
    let env = env(ctx);
    let base_offset = ctx.d.base_tsc_offset();
    let slot = ctx.slot();
    let msr = slot.regs.rcx as u32;
    let value = (slot.regs.rdx << 32) | (slot.regs.rax & 0xffff_ffff);
    let effects = match home(msr, &env) {
        None => None,
        Some(Home::Tsc) => {
            // SDM Vol. 3B 18.17: a write sets the TSC; here, the offset that makes the
            // guest read `value` now.
            if let Err(e) = slot.vcpu.set_tsc_offset(value.wrapping_sub(host_tsc())) {
                return Action::Crash(alloc::format!("WRMSR IA32_TSC at RIP {:#x}: {e}", exit.rip));
            }
            Some(Effects::default())
        }
        Some(Home::Lapic) => match msr {
            APIC_BASE => slot.lapic.write_apic_base(value).map(|()| Effects::default()).ok(),
            TSC_DEADLINE => {
                let shift = slot.vcpu.tsc_offset().wrapping_sub(base_offset);
                slot.lapic.write_tsc_deadline(if value == 0 { 0 } else { value.wrapping_sub(shift).max(1) });
                Some(Effects::default())
            }
            m => slot.lapic.write_msr(m, value, now).ok(),
        },
        Some(Home::Backend(m)) => {
            let (old, cr0) = match (slot.vcpu.read_msr(m), slot.vcpu.control_state()) {
                (Ok(old), Ok(c)) => (old, c.cr0),
                (Err(e), _) | (_, Err(e)) => {
                    return Action::Crash(alloc::format!("WRMSR {msr:#x} at RIP {:#x}: {e}", exit.rip));
                }
            };
            match check_backend_write(m, value, old, cr0, &env) {
                Ok(v) => match slot.vcpu.write_msr(m, v) {
                    Ok(()) => Some(Effects::default()),
                    Err(e) => return Action::Crash(alloc::format!("WRMSR {msr:#x} at RIP {:#x}: {e}", exit.rip)),
                },
                Err(()) => None,
            }
        }
        Some(Home::Core) => {
            let written = slot.msrs.write(msr, value, &env).ok().map(|()| Effects::default());
            // KVM ignores a structure it cannot write; the guest then reads zeros (no
            // clock). Say so: a guest that does this is broken.
            if written.is_some()
                && matches!(msr, MSR_SYSTEM_TIME | MSR_WALL_CLOCK)
                && let Err(e) = write_kvmclock(ctx.d, ctx.vi, ctx.pool, msr, false)
            {
                crate::println!("DOMAIN {} kvm-clock: WRMSR {msr:#x}={value:#x}: {e}", ctx.d.id);
            }
            written
        }
    };
    match effects {
        Some(e) => {
            ctx.d.lapic_effects(ctx.vi, &e);
            ctx.skip(exit)
        }
        None => ctx.inject(13, Some(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrated_msrs_round_trip_and_are_validated() {
        let e = env(Vendor::Amd);
        let mut src = MsrState::default();
        src.write(0x200, 0x8000_0006, &e).unwrap();
        src.write(0x201, 0xff_f000_0800, &e).unwrap();
        src.write(MTRR_DEF_TYPE, 0xc00, &e).unwrap();
        src.write(MISC_ENABLE, 0x1800, &e).unwrap();
        src.write(MCG_STATUS, 5, &e).unwrap();
        src.write(NB_CFG, NB_CFG_CF8_EXT, &e).unwrap();
        let saved = src.saved(&e);
        assert!(saved.windows(2).all(|w| w[0].0 < w[1].0), "ascending, none twice");
        assert_eq!(saved.len(), 4 + 16 + 11);
        let mut dst = MsrState::default();
        for &(m, v) in &saved {
            dst.restore(m, v, &e).unwrap();
        }
        assert_eq!(dst, src);
        // Constants and MSRs kept elsewhere are not restored here; bad values are refused.
        assert_eq!(dst.restore(MTRRCAP, MTRRCAP_VALUE, &e), Err(MsrRestoreError::NotVirtualized(MTRRCAP)));
        assert_eq!(dst.restore(PAT, 0, &e), Err(MsrRestoreError::NotVirtualized(PAT)));
        assert_eq!(dst.restore(0x1234, 0, &e), Err(MsrRestoreError::NotVirtualized(0x1234)));
        assert_eq!(dst.restore(MTRR_DEF_TYPE, 0x2, &e), Err(MsrRestoreError::BadValue(MTRR_DEF_TYPE, 2)));
        assert_eq!(dst.restore(MISC_ENABLE, 0x1, &e), Err(MsrRestoreError::BadValue(MISC_ENABLE, 1)));
        // Intel policy: NB_CFG is AMD's; it is neither saved nor restored.
        let intel = env(Vendor::Intel);
        assert!(src.saved(&intel).iter().all(|&(m, _)| m != NB_CFG));
        assert_eq!(dst.restore(NB_CFG, 0, &intel), Err(MsrRestoreError::NotVirtualized(NB_CFG)));
        assert!(dst.restore(MCG_STATUS, 0, &intel).is_ok());
    }

    fn env(vendor: Vendor) -> Env {
        let mut features = levelling::Featureset::new();
        for f in [
            features::MTRR,
            features::PAT,
            features::MCA,
            features::MCE,
            features::SEP,
            features::SYSCALL,
            features::LM,
            features::NX,
            features::RDTSCP,
        ] {
            features.set_bit(f.word(), f.bit(), true);
        }
        Env::new(vendor, 40, 48, &features)
    }

    #[test]
    fn unknown_and_host_only_msrs_are_gp() {
        let e = env(Vendor::Intel);
        for msr in [0x3a, 0x3b, 0x48, 0x49, 0x10b, 0xce, 0x345, 0xda0, 0xc001_0114, 0xc001_1029, 0xdead_beef] {
            assert_eq!(home(msr, &e), None, "{msr:#x}");
        }
        // HWCR is AMD's only.
        assert_eq!(home(HWCR, &e), None);
        assert_eq!((home(SYSCFG, &e), home(NB_CFG, &e)), (None, None), "AMD's only");
        assert_eq!(home(HWCR, &env(Vendor::Amd)), Some(Home::Core));
        assert_eq!(home(HWCR, &env(Vendor::Hygon)), Some(Home::Core), "Hygon has AMD's MSRs");
        // MCG_CTL does not exist with MCG_CAP.MCG_CTL_P = 0.
        assert_eq!(home(0x17b, &e), None);
    }

    #[test]
    fn features_take_their_msrs_with_them() {
        let e = Env::new(Vendor::Intel, 40, 48, &levelling::Featureset::new());
        for msr in [MTRRCAP, 0x200, 0x250, MTRR_DEF_TYPE, PAT, MCG_CAP, SYSENTER_CS, TSC_AUX] {
            assert_eq!(home(msr, &e), None, "{msr:#x}");
        }
        for msr in [EFER, STAR, LSTAR, FS_BASE, KERNEL_GS_BASE, TSC, APIC_BASE, MISC_ENABLE] {
            assert!(home(msr, &e).is_some(), "{msr:#x}");
        }
    }

    #[test]
    fn every_msr_of_the_table_reads_writes_or_faults_as_documented() {
        let e = env(Vendor::Amd);
        let mut s = MsrState::default();
        // (msr, read value, writes accepted, writes refused)
        let cases: &[(u32, u64, &[u64], &[u64])] = &[
            (PLATFORM_ID, 0, &[], &[0, 1]),
            (BIOS_SIGN_ID, 0, &[0], &[1]),
            (MTRRCAP, 0x508, &[], &[0, 0x508]),
            (MCG_CAP, 0, &[], &[0]),
            (MCG_STATUS, 0, &[0, 7], &[8, 1 << 63]),
            (MISC_ENABLE, 0x1801, &[0x1800, 0x1801], &[0x1803, 0x1, 1 << 22 | 0x1801, 1 << 34 | 0x1801]),
            (DEBUGCTL, 0, &[0], &[1, 2]),
            (HWCR, 1 << 24, &[1 << 24], &[0, 1 << 24 | 1 << 18]),
            (SYSCFG, 0, &[0], &[1 << 23, 1 << 18]),
            (NB_CFG, 0, &[1 << 46, 0], &[1, 1 << 45 | 1 << 46]),
            (MTRR_DEF_TYPE, 0xc06, &[0, 0x806, 0xc00, 0xc01, 0xc04, 0xc05], &[0xc02, 0xc03, 0xc07, 0x1c06, 0x100]),
            (0x250, 0, &[0x0606_0606_0606_0606, 0x0001_0405_0600_0106], &[0x0202, 0x0700, 0xff << 56]),
            (0x26f, 0, &[0x0505_0505_0505_0505], &[0x3]),
        ];
        for &(msr, read, good, bad) in cases {
            assert_eq!(home(msr, &e), Some(Home::Core), "{msr:#x}");
            assert_eq!(s.read(msr), Some(read), "{msr:#x} read");
            for &v in bad {
                assert_eq!(s.write(msr, v, &e), Err(()), "{msr:#x} <- {v:#x} accepted");
                assert_eq!(s.read(msr), Some(read), "{msr:#x} changed by a refused write");
            }
            for &v in good {
                assert_eq!(s.write(msr, v, &e), Ok(()), "{msr:#x} <- {v:#x} refused");
                let back = s.read(msr);
                if ![PLATFORM_ID, BIOS_SIGN_ID, DEBUGCTL, MTRRCAP, MCG_CAP, HWCR, SYSCFG].contains(&msr) {
                    assert_eq!(back, Some(v), "{msr:#x} did not keep {v:#x}");
                }
            }
        }
    }

    #[test]
    fn variable_mtrrs_check_reserved_bits_and_maxphyaddr() {
        let e = env(Vendor::Intel); // MAXPHYADDR 40
        let mut s = MsrState::default();
        // PHYSBASE0: WB at 0x8000_0000.
        assert_eq!(s.write(0x200, 0x8000_0006, &e), Ok(()));
        assert_eq!(s.read(0x200), Some(0x8000_0006));
        assert_eq!(s.write(0x200, 0x8000_0002, &e), Err(()), "type 2 is reserved");
        assert_eq!(s.write(0x200, 0x8000_0106, &e), Err(()), "bits 11:8 reserved");
        assert_eq!(s.write(0x200, 1 << 40 | 6, &e), Err(()), "at MAXPHYADDR");
        // PHYSMASK0: 2 GiB, valid.
        assert_eq!(s.write(0x201, 0xff_8000_0800, &e), Ok(()));
        assert_eq!(s.write(0x201, 0xff_8000_0801, &e), Err(()), "bits 10:0 reserved");
        assert_eq!(s.write(0x201, 0x1ff_8000_0800, &e), Err(()), "above MAXPHYADDR");
        assert_eq!(s.read(0x20f), Some(0));
        assert_eq!(s.write(0x20f, 0, &e), Ok(()));
        assert_eq!(s.read(0x210), None);
    }

    #[test]
    fn backend_msrs_validate_before_they_reach_the_hardware() {
        let e = env(Vendor::Amd);
        let pg = 1 << 31;
        // EFER: SCE/NXE may change; LMA is kept; LME not while paging; SVME never.
        let lm = EFER_LME | EFER_LMA;
        assert_eq!(check_backend_write(GuestMsr::Efer, lm | EFER_SCE | EFER_NXE, lm, pg, &e), Ok(0xd01));
        assert_eq!(check_backend_write(GuestMsr::Efer, EFER_LME, lm, pg, &e), Ok(lm), "LMA is not the guest's");
        assert_eq!(check_backend_write(GuestMsr::Efer, 0, lm, pg, &e), Err(()), "LME cleared with paging on");
        assert_eq!(check_backend_write(GuestMsr::Efer, EFER_LME, 0, 0, &e), Ok(EFER_LME), "before paging");
        assert_eq!(check_backend_write(GuestMsr::Efer, lm | (1 << 12), lm, pg, &e), Err(()), "SVME");
        assert_eq!(check_backend_write(GuestMsr::Efer, lm | EFER_FFXSR, lm, pg, &e), Err(()), "FFXSR not offered");
        let no_nx = Env { offered: e.offered & !(1 << 7), ..e };
        assert!(!no_nx.has(features::NX));
        assert_eq!(check_backend_write(GuestMsr::Efer, lm | EFER_NXE, lm, pg, &no_nx), Err(()));
        // PAT entries.
        assert_eq!(check_backend_write(GuestMsr::Pat, 0x0007_0406_0007_0406, 0, 0, &e), Ok(0x0007_0406_0007_0406));
        assert_eq!(check_backend_write(GuestMsr::Pat, 0x0007_0406_0007_0402, 0, 0, &e), Err(()));
        assert_eq!(check_backend_write(GuestMsr::Pat, 8 << 56, 0, 0, &e), Err(()));
        // Canonical addresses at 48 bits (SYSENTER_EIP: `sysenter_width_follows_the_policy_vendor`).
        for m in [GuestMsr::Lstar, GuestMsr::FsBase, GuestMsr::GsBase, GuestMsr::KernelGsBase] {
            assert_eq!(check_backend_write(m, 0xffff_8000_0000_0000, 0, 0, &e), Ok(0xffff_8000_0000_0000));
            assert_eq!(check_backend_write(m, 0x0000_8000_0000_0000, 0, 0, &e), Err(()), "{m:?}");
        }
        assert_eq!(check_backend_write(GuestMsr::Star, u64::MAX, 0, 0, &e), Ok(u64::MAX));
        assert_eq!(check_backend_write(GuestMsr::Sfmask, 0x4_7700, 0, 0, &e), Ok(0x4_7700));
        assert_eq!(check_backend_write(GuestMsr::Sfmask, 1 << 32, 0, 0, &e), Err(()));
        assert_eq!(check_backend_write(GuestMsr::TscAux, 3, 0, 0, &e), Ok(3));
        assert_eq!(check_backend_write(GuestMsr::TscAux, 1 << 32, 0, 0, &e), Err(()));
    }

    #[test]
    fn canonical_addresses() {
        assert!(canonical(0, 48));
        assert!(canonical(0x7fff_ffff_ffff, 48));
        assert!(!canonical(0x8000_0000_0000, 48));
        assert!(canonical(0xffff_8000_0000_0000, 48));
        assert!(canonical(0x00ff_ffff_ffff_ffff >> 8, 57));
        assert!(!canonical(0x0100_0000_0000_0000, 57));
    }

    #[test]
    fn sysenter_width_follows_the_policy_vendor() {
        let high = 0xffff_8000_1234_5678;
        for msr in [GuestMsr::SysenterEsp, GuestMsr::SysenterEip] {
            assert_eq!(check_backend_write(msr, high, 0, 0, &env(Vendor::Amd)), Ok(0x1234_5678));
            assert_eq!(check_backend_write(msr, high, 0, 0, &env(Vendor::Hygon)), Ok(0x1234_5678));
            assert_eq!(check_backend_write(msr, high, 0, 0, &env(Vendor::Intel)), Ok(high));
            assert_eq!(check_backend_write(msr, 0x0000_8000_0000_0000, 0, 0, &env(Vendor::Amd)), Err(()));
        }
    }
}
