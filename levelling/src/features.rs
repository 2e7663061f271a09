//! The feature table: every CPUID feature bit this build knows, with its Linux
//! `/proc/cpuinfo` name, its word and bit, and its attributes; and the dependency
//! table between features with its transitive closure, computed at compile time.
//!
//! Read it like Xen's `cpufeatureset.h` + `gen-cpuid.py`: one line per bit, in word
//! and bit order, checkable against the manual section cited above each word. The
//! reasons why a bit is never offered to guests do not live here but in
//! [`crate::guest::NOT_VIRTUALIZABLE`]; a test keeps the two in step.
//!
//! Attribute letters: `A` = offered to guests by default, `M` = only on request (in
//! `max`, not `default`), `N` = never. Flags: `SPECIAL` = the core must compute the bit
//! (or a field it governs) at run time; `OR` = levelled with OR instead of AND (bits that
//! tell a guest to apply a mitigation or to tolerate a behaviour, which are safe to
//! advertise on a host that lacks them); `SYNTH` = set by the hypervisor for every
//! guest, independent of the host.
//!
//! Not here: bits 0–9, 12–17, 23, 24 of 0x8000_0001.EDX, which AMD duplicates from
//! 1.EDX (APM Vol. 3, E.4.2). They are not part of the featureset (see
//! [`COMMON_1D`]); AMD- and Hygon-vendor policies regenerate them from word 1.

use crate::featureset::{Featureset, NWORDS, WORDS, WordInfo, word::*};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// One feature bit: `word * 32 + bit`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Feature(u16);

impl Feature {
    /// The feature at `bit` of featureset word `word`.
    pub const fn new(word: usize, bit: u32) -> Feature {
        Feature((word * 32 + (bit as usize & 31)) as u16)
    }
    /// Featureset word index.
    pub const fn word(self) -> usize {
        (self.0 / 32) as usize
    }
    /// Bit within the word.
    pub const fn bit(self) -> u32 {
        (self.0 % 32) as u32
    }
    /// Flat index (`word * 32 + bit`).
    pub const fn index(self) -> usize {
        self.0 as usize
    }
    /// The table entry, if this build knows the bit.
    pub fn info(self) -> Option<&'static FeatureInfo> {
        FEATURES.iter().find(|f| f.feature == self)
    }
    /// Where the bit lives, if the word is known.
    pub fn location(self) -> Option<&'static WordInfo> {
        WORDS.get(self.word())
    }
    /// Test whether `fs` has this feature.
    pub fn is_in(self, fs: &Featureset) -> bool {
        fs.has_bit(self.word(), self.bit())
    }
    /// Look a feature up by its Linux name or its constant name, case-insensitively.
    pub fn from_name(name: &str) -> Option<Feature> {
        FEATURES
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name) || f.ident.eq_ignore_ascii_case(name))
            .map(|f| f.feature)
    }
}

impl fmt::Display for Feature {
    /// `avx2 (CPUID 0x7[0].EBX bit 5)`; unknown bits print as `unnamed`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.info().map_or("unnamed", |i| i.name);
        match self.location() {
            Some(w) => write!(f, "{name} ({w} bit {})", self.bit()),
            None => write!(f, "{name} (featureset word {} bit {})", self.word(), self.bit()),
        }
    }
}

/// Whether guests get a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attr {
    /// In `default` and `max`.
    A,
    /// Only in `max`: offered on request.
    M,
    /// Never offered (reason in [`crate::guest::NOT_VIRTUALIZABLE`]).
    N,
}

/// Flag: the core computes this bit (or what it governs) at run time.
pub const SPECIAL: u8 = 1;
/// Flag: levelled with OR.
pub const OR: u8 = 2;
/// Flag: set by the hypervisor for every guest regardless of the host.
pub const SYNTH: u8 = 4;

/// One row of the feature table.
#[derive(Clone, Copy, Debug)]
pub struct FeatureInfo {
    /// The bit.
    pub feature: Feature,
    /// The name Linux prints in `/proc/cpuinfo` (or would, for hidden flags).
    pub name: &'static str,
    /// The constant name in this module.
    pub ident: &'static str,
    /// Guest attribute.
    pub attr: Attr,
    /// [`SPECIAL`] | [`OR`] | [`SYNTH`].
    pub flags: u8,
}

impl FeatureInfo {
    /// True for [`SPECIAL`] bits.
    pub fn is_special(&self) -> bool {
        self.flags & SPECIAL != 0
    }
    /// True for bits levelled with OR.
    pub fn is_or(&self) -> bool {
        self.flags & OR != 0
    }
    /// True for bits the hypervisor synthesizes.
    pub fn is_synth(&self) -> bool {
        self.flags & SYNTH != 0
    }
}

macro_rules! feature_table {
    ($( $(#[$m:meta])* $id:ident = $w:ident[$bit:literal], $name:literal, $attr:ident $(| $flag:ident)* ;)*) => {
        $( $(#[$m])* #[doc = concat!("`", $name, "`")] pub const $id: Feature = Feature::new($w, $bit); )*
        /// Every known feature bit, in word and bit order.
        pub const FEATURES: &[FeatureInfo] = &[
            $( FeatureInfo { feature: $id, name: $name, ident: stringify!($id), attr: Attr::$attr, flags: 0 $(| $flag)* }, )*
        ];
    };
}

feature_table! {
    // ---- word 0: CPUID.1:ECX — SDM Vol. 2A, CPUID, Table 3-10 ----
    SSE3 = L1_ECX[0], "pni", A;
    PCLMULQDQ = L1_ECX[1], "pclmulqdq", A;
    DTES64 = L1_ECX[2], "dtes64", N;
    MONITOR = L1_ECX[3], "monitor", N;
    DS_CPL = L1_ECX[4], "ds_cpl", N;
    VMX = L1_ECX[5], "vmx", N;
    SMX = L1_ECX[6], "smx", N;
    EST = L1_ECX[7], "est", N;
    TM2 = L1_ECX[8], "tm2", N;
    SSSE3 = L1_ECX[9], "ssse3", A;
    CNXT_ID = L1_ECX[10], "cid", N;
    SDBG = L1_ECX[11], "sdbg", N;
    FMA = L1_ECX[12], "fma", A;
    CX16 = L1_ECX[13], "cx16", A;
    XTPR = L1_ECX[14], "xtpr", N;
    PDCM = L1_ECX[15], "pdcm", N;
    PCID = L1_ECX[17], "pcid", A;
    DCA = L1_ECX[18], "dca", N;
    SSE4_1 = L1_ECX[19], "sse4_1", A;
    SSE4_2 = L1_ECX[20], "sse4_2", A;
    X2APIC = L1_ECX[21], "x2apic", A | SPECIAL;
    MOVBE = L1_ECX[22], "movbe", A;
    POPCNT = L1_ECX[23], "popcnt", A;
    TSC_DEADLINE = L1_ECX[24], "tsc_deadline_timer", A | SPECIAL;
    AES = L1_ECX[25], "aes", A;
    XSAVE = L1_ECX[26], "xsave", A;
    OSXSAVE = L1_ECX[27], "osxsave", N | SPECIAL;
    AVX = L1_ECX[28], "avx", A;
    F16C = L1_ECX[29], "f16c", A;
    RDRAND = L1_ECX[30], "rdrand", A;
    HYPERVISOR = L1_ECX[31], "hypervisor", A | SPECIAL | SYNTH;

    // ---- word 1: CPUID.1:EDX — SDM Vol. 2A, CPUID, Table 3-11 ----
    FPU = L1_EDX[0], "fpu", A;
    VME = L1_EDX[1], "vme", A;
    DE = L1_EDX[2], "de", A;
    PSE = L1_EDX[3], "pse", A;
    TSC = L1_EDX[4], "tsc", A;
    MSR = L1_EDX[5], "msr", A;
    PAE = L1_EDX[6], "pae", A;
    MCE = L1_EDX[7], "mce", A;
    CX8 = L1_EDX[8], "cx8", A;
    APIC = L1_EDX[9], "apic", A | SPECIAL;
    SEP = L1_EDX[11], "sep", A;
    MTRR = L1_EDX[12], "mtrr", A;
    PGE = L1_EDX[13], "pge", A;
    MCA = L1_EDX[14], "mca", A;
    CMOV = L1_EDX[15], "cmov", A;
    PAT = L1_EDX[16], "pat", A;
    PSE36 = L1_EDX[17], "pse36", A;
    PSN = L1_EDX[18], "pn", N;
    CLFLUSH = L1_EDX[19], "clflush", A;
    DS = L1_EDX[21], "dts", N;
    ACPI = L1_EDX[22], "acpi", N;
    MMX = L1_EDX[23], "mmx", A;
    FXSR = L1_EDX[24], "fxsr", A;
    SSE = L1_EDX[25], "sse", A;
    SSE2 = L1_EDX[26], "sse2", A;
    SS = L1_EDX[27], "ss", A;
    HTT = L1_EDX[28], "ht", A | SPECIAL;
    TM = L1_EDX[29], "tm", N;
    IA64 = L1_EDX[30], "ia64", N;
    PBE = L1_EDX[31], "pbe", N;

    // ---- word 2: CPUID.8000_0001h:ECX — APM Vol. 3, E.4.2 ----
    LAHF_LM = E1_ECX[0], "lahf_lm", A;
    CMP_LEGACY = E1_ECX[1], "cmp_legacy", A | SPECIAL;
    SVM = E1_ECX[2], "svm", N;
    EXTAPIC = E1_ECX[3], "extapic", N;
    CR8_LEGACY = E1_ECX[4], "cr8_legacy", N;
    ABM = E1_ECX[5], "abm", A;
    SSE4A = E1_ECX[6], "sse4a", A;
    MISALIGNSSE = E1_ECX[7], "misalignsse", A;
    PREFETCHW = E1_ECX[8], "3dnowprefetch", A;
    OSVW = E1_ECX[9], "osvw", N;
    IBS = E1_ECX[10], "ibs", N;
    XOP = E1_ECX[11], "xop", A;
    SKINIT = E1_ECX[12], "skinit", N;
    WDT = E1_ECX[13], "wdt", N;
    LWP = E1_ECX[15], "lwp", N;
    FMA4 = E1_ECX[16], "fma4", A;
    TCE = E1_ECX[17], "tce", N;
    NODEID_MSR = E1_ECX[19], "nodeid_msr", N;
    TBM = E1_ECX[21], "tbm", A;
    TOPOEXT = E1_ECX[22], "topoext", N;
    PERFCTR_CORE = E1_ECX[23], "perfctr_core", N;
    PERFCTR_NB = E1_ECX[24], "perfctr_nb", N;
    DBX = E1_ECX[26], "bpext", N;
    PERFTSC = E1_ECX[27], "ptsc", N;
    PERFCTR_LLC = E1_ECX[28], "perfctr_llc", N;
    MWAITX = E1_ECX[29], "mwaitx", N;

    // ---- word 3: CPUID.8000_0001h:EDX — APM Vol. 3, E.4.2 (non-duplicated bits) ----
    SYSCALL = E1_EDX[11], "syscall", A;
    MP = E1_EDX[19], "mp", N;
    NX = E1_EDX[20], "nx", A;
    MMXEXT = E1_EDX[22], "mmxext", A;
    FFXSR = E1_EDX[25], "fxsr_opt", A;
    PAGE1GB = E1_EDX[26], "pdpe1gb", A;
    RDTSCP = E1_EDX[27], "rdtscp", A;
    LM = E1_EDX[29], "lm", A;
    AMD_3DNOWEXT = E1_EDX[30], "3dnowext", A;
    AMD_3DNOW = E1_EDX[31], "3dnow", A;

    // ---- word 4: CPUID.(EAX=0Dh,ECX=1):EAX — SDM Vol. 1, 13.2 ----
    XSAVEOPT = D1_EAX[0], "xsaveopt", A;
    XSAVEC = D1_EAX[1], "xsavec", A;
    XGETBV1 = D1_EAX[2], "xgetbv1", A;
    XSAVES = D1_EAX[3], "xsaves", N;
    XFD = D1_EAX[4], "xfd", N;

    // ---- word 5: CPUID.(EAX=07h,ECX=0):EBX — SDM Vol. 2A, CPUID leaf 07H ----
    FSGSBASE = L7_0_EBX[0], "fsgsbase", A;
    TSC_ADJUST = L7_0_EBX[1], "tsc_adjust", N | SPECIAL;
    SGX = L7_0_EBX[2], "sgx", N;
    BMI1 = L7_0_EBX[3], "bmi1", A;
    HLE = L7_0_EBX[4], "hle", M;
    AVX2 = L7_0_EBX[5], "avx2", A;
    FDP_EXCPTN_ONLY = L7_0_EBX[6], "fdp_excptn_only", A | OR;
    SMEP = L7_0_EBX[7], "smep", A;
    BMI2 = L7_0_EBX[8], "bmi2", A;
    ERMS = L7_0_EBX[9], "erms", A;
    INVPCID = L7_0_EBX[10], "invpcid", A;
    RTM = L7_0_EBX[11], "rtm", M;
    PQM = L7_0_EBX[12], "cqm", N;
    ZERO_FCS_FDS = L7_0_EBX[13], "zero_fcs_fds", A | OR;
    MPX = L7_0_EBX[14], "mpx", N;
    PQE = L7_0_EBX[15], "rdt_a", N;
    AVX512F = L7_0_EBX[16], "avx512f", A;
    AVX512DQ = L7_0_EBX[17], "avx512dq", A;
    RDSEED = L7_0_EBX[18], "rdseed", A;
    ADX = L7_0_EBX[19], "adx", A;
    SMAP = L7_0_EBX[20], "smap", A;
    AVX512_IFMA = L7_0_EBX[21], "avx512ifma", A;
    CLFLUSHOPT = L7_0_EBX[23], "clflushopt", A;
    CLWB = L7_0_EBX[24], "clwb", A;
    PROC_TRACE = L7_0_EBX[25], "intel_pt", N;
    AVX512PF = L7_0_EBX[26], "avx512pf", A;
    AVX512ER = L7_0_EBX[27], "avx512er", A;
    AVX512CD = L7_0_EBX[28], "avx512cd", A;
    SHA = L7_0_EBX[29], "sha_ni", A;
    AVX512BW = L7_0_EBX[30], "avx512bw", A;
    AVX512VL = L7_0_EBX[31], "avx512vl", A;

    // ---- word 6: CPUID.(EAX=07h,ECX=0):ECX ----
    PREFETCHWT1 = L7_0_ECX[0], "prefetchwt1", A;
    AVX512_VBMI = L7_0_ECX[1], "avx512vbmi", A;
    UMIP = L7_0_ECX[2], "umip", A;
    PKU = L7_0_ECX[3], "pku", N;
    OSPKE = L7_0_ECX[4], "ospke", N | SPECIAL;
    WAITPKG = L7_0_ECX[5], "waitpkg", N;
    AVX512_VBMI2 = L7_0_ECX[6], "avx512_vbmi2", A;
    CET_SS = L7_0_ECX[7], "shstk", N;
    GFNI = L7_0_ECX[8], "gfni", A;
    VAES = L7_0_ECX[9], "vaes", A;
    VPCLMULQDQ = L7_0_ECX[10], "vpclmulqdq", A;
    AVX512_VNNI = L7_0_ECX[11], "avx512_vnni", A;
    AVX512_BITALG = L7_0_ECX[12], "avx512_bitalg", A;
    TME = L7_0_ECX[13], "tme", N;
    AVX512_VPOPCNTDQ = L7_0_ECX[14], "avx512_vpopcntdq", A;
    LA57 = L7_0_ECX[16], "la57", N;
    RDPID = L7_0_ECX[22], "rdpid", A;
    KL = L7_0_ECX[23], "keylocker", N;
    BUS_LOCK_DETECT = L7_0_ECX[24], "bus_lock_detect", N;
    CLDEMOTE = L7_0_ECX[25], "cldemote", A;
    MOVDIRI = L7_0_ECX[27], "movdiri", A;
    MOVDIR64B = L7_0_ECX[28], "movdir64b", A;
    ENQCMD = L7_0_ECX[29], "enqcmd", N;
    SGX_LC = L7_0_ECX[30], "sgx_lc", N;
    PKS = L7_0_ECX[31], "pks", N;

    // ---- word 7: CPUID.(EAX=07h,ECX=0):EDX ----
    AVX512_4VNNIW = L7_0_EDX[2], "avx512_4vnniw", A;
    AVX512_4FMAPS = L7_0_EDX[3], "avx512_4fmaps", A;
    FSRM = L7_0_EDX[4], "fsrm", A;
    AVX512_VP2INTERSECT = L7_0_EDX[8], "avx512_vp2intersect", A;
    MD_CLEAR = L7_0_EDX[10], "md_clear", A | OR;
    RTM_ALWAYS_ABORT = L7_0_EDX[11], "rtm_always_abort", N;
    TSX_FORCE_ABORT = L7_0_EDX[13], "tsx_force_abort", N;
    SERIALIZE = L7_0_EDX[14], "serialize", A;
    HYBRID = L7_0_EDX[15], "hybrid_cpu", N;
    TSXLDTRK = L7_0_EDX[16], "tsxldtrk", M;
    PCONFIG = L7_0_EDX[18], "pconfig", N;
    ARCH_LBR = L7_0_EDX[19], "arch_lbr", N;
    CET_IBT = L7_0_EDX[20], "ibt", N;
    AMX_BF16 = L7_0_EDX[22], "amx_bf16", N;
    AVX512_FP16 = L7_0_EDX[23], "avx512_fp16", A;
    AMX_TILE = L7_0_EDX[24], "amx_tile", N;
    AMX_INT8 = L7_0_EDX[25], "amx_int8", N;
    IBRSB = L7_0_EDX[26], "spec_ctrl", N;
    STIBP = L7_0_EDX[27], "intel_stibp", N;
    L1D_FLUSH = L7_0_EDX[28], "flush_l1d", N;
    ARCH_CAPS = L7_0_EDX[29], "arch_capabilities", N;
    CORE_CAPS = L7_0_EDX[30], "core_capabilities", N;
    SSBD = L7_0_EDX[31], "spec_ctrl_ssbd", N;

    // ---- word 8: CPUID.(EAX=07h,ECX=1):EAX ----
    AVX_VNNI = L7_1_EAX[4], "avx_vnni", A;
    AVX512_BF16 = L7_1_EAX[5], "avx512_bf16", A;
    CMPCCXADD = L7_1_EAX[7], "cmpccxadd", A;
    FZRM = L7_1_EAX[10], "fzrm", A;
    FSRS = L7_1_EAX[11], "fsrs", A;
    FSRCS = L7_1_EAX[12], "fsrc", A;
    FRED = L7_1_EAX[17], "fred", N;
    LKGS = L7_1_EAX[18], "lkgs", N;
    WRMSRNS = L7_1_EAX[19], "wrmsrns", N;
    AMX_FP16 = L7_1_EAX[21], "amx_fp16", N;
    HRESET = L7_1_EAX[22], "hreset", N;
    AVX_IFMA = L7_1_EAX[23], "avx_ifma", A;
    LAM = L7_1_EAX[26], "lam", N;

    // ---- word 9: CPUID.06h:EAX — SDM Vol. 2A, CPUID leaf 06H ----
    DTHERM = L6_EAX[0], "dtherm", N;
    IDA = L6_EAX[1], "ida", N;
    ARAT = L6_EAX[2], "arat", A | SPECIAL;
    PLN = L6_EAX[4], "pln", N;
    PTS = L6_EAX[6], "pts", N;
    HWP = L6_EAX[7], "hwp", N;
    HWP_NOTIFY = L6_EAX[8], "hwp_notify", N;
    HWP_ACT_WINDOW = L6_EAX[9], "hwp_act_window", N;
    HWP_EPP = L6_EAX[10], "hwp_epp", N;
    HWP_PKG_REQ = L6_EAX[11], "hwp_pkg_req", N;
    HFI = L6_EAX[19], "hfi", N;

    // ---- word 10: CPUID.06h:ECX ----
    APERFMPERF = L6_ECX[0], "aperfmperf", N;
    EPB = L6_ECX[3], "epb", N;

    // ---- word 11: CPUID.0Ah:EAX — numeric PMU fields, no flags (see WordKind::PmuFields) ----
    // ---- word 12: CPUID.0Ah:EBX — "event not available" bits, SDM Vol. 3B 20.2.1 ----
    // (unnamed: the architectural PMU is not offered to guests, see guest::NOT_VIRTUALIZABLE_WORDS)

    // ---- word 13: CPUID.(EAX=0Fh,ECX=0):EDX — SDM Vol. 3B 18.18.3 (RDT monitoring) ----
    CQM_LLC = LF_0_EDX[1], "cqm_llc", N;

    // ---- word 14: CPUID.(EAX=0Fh,ECX=1):EDX ----
    CQM_OCCUP_LLC = LF_1_EDX[0], "cqm_occup_llc", N;
    CQM_MBM_TOTAL = LF_1_EDX[1], "cqm_mbm_total", N;
    CQM_MBM_LOCAL = LF_1_EDX[2], "cqm_mbm_local", N;

    // ---- word 15: CPUID.8000_0007h:EDX — APM Vol. 3, E.4.6 ----
    HW_PSTATE = E7_EDX[7], "hw_pstate", N;
    ITSC = E7_EDX[8], "invtsc", M | SPECIAL;
    CPB = E7_EDX[9], "cpb", N;
    PROC_FEEDBACK = E7_EDX[11], "proc_feedback", N;

    // ---- word 16: CPUID.8000_0008h:EBX — APM Vol. 3, E.4.7 ----
    CLZERO = E8_EBX[0], "clzero", A;
    IRPERF = E8_EBX[1], "irperf", N;
    RSTR_FP_ERR_PTRS = E8_EBX[2], "xsaveerptr", A;
    RDPRU = E8_EBX[4], "rdpru", N;
    WBNOINVD = E8_EBX[9], "wbnoinvd", A;
    IBPB = E8_EBX[12], "amd_ibpb", N;
    AMD_IBRS = E8_EBX[14], "amd_ibrs", N;
    AMD_STIBP = E8_EBX[15], "amd_stibp", N;
    AMD_SSBD = E8_EBX[24], "amd_ssbd", N;
    VIRT_SSBD = E8_EBX[25], "virt_ssbd", N;
    SSB_NO = E8_EBX[26], "amd_ssb_no", A;
    CPPC = E8_EBX[27], "cppc", N;
    PSFD = E8_EBX[28], "amd_psfd", N;
    BTC_NO = E8_EBX[29], "btc_no", A;
    IBPB_RET = E8_EBX[30], "amd_ibpb_ret", N;

    // ---- word 17: CPUID.(EAX=07h,ECX=2):EDX — SDM Vol. 2A, CPUID leaf 07H subleaf 2 ----
    INTEL_PSFD = L7_2_EDX[0], "intel_psfd", N;
    IPRED_CTRL = L7_2_EDX[1], "ipred_ctrl", N;
    RRSBA_CTRL = L7_2_EDX[2], "rrsba_ctrl", N;
    DDP_CTRL = L7_2_EDX[3], "ddpd_u", N;
    BHI_CTRL = L7_2_EDX[4], "bhi_ctrl", N;
    MCDT_NO = L7_2_EDX[5], "mcdt_no", A;

    // ---- word 18: CPUID.8000_0021h:EAX — APM Vol. 3, E.4.18 ----
    NO_NEST_BP = E21_EAX[0], "no_nested_data_bp", A;
    LFENCE_DISPATCH = E21_EAX[2], "lfence_always_serializing", A;
    NSCB = E21_EAX[6], "null_sel_clr_base", A;
    AUTO_IBRS = E21_EAX[8], "autoibrs", N;
}

/// Bits of 0x8000_0001.EDX that AMD CPUs duplicate from 1.EDX (APM Vol. 3, E.4.2:
/// FPU, VME, DE, PSE, TSC, MSR, PAE, MCE, CX8, APIC, MTRR, PGE, MCA, CMOV, PAT,
/// PSE36, MMX, FXSR). Not part of word 3; regenerated from word 1 on AMD.
pub const COMMON_1D: u32 = 0x0183_f3ff;

/// Feature dependencies: `(feature, what it directly requires)`. A feature is only
/// usable if everything it requires, transitively, is present.
///
/// Each line is a statement a reviewer can check against the manuals.
pub const REQUIRES: &[(Feature, &[Feature])] = &[
    // x87/SSE lineage: SDM Vol. 1 10.6 (SSE state lives in the FXSAVE image),
    // 11.6.2, 12.x: each SSE generation extends the previous one.
    (FXSR, &[FPU]),
    (SSE, &[FXSR]),
    (SSE2, &[SSE]),
    (SSE3, &[SSE2]),
    (SSSE3, &[SSE3]),
    (SSE4_1, &[SSSE3]),
    (SSE4_2, &[SSE4_1]),
    (SSE4A, &[SSE2]),
    (MISALIGNSSE, &[SSE]),
    (AES, &[SSE2]),
    (PCLMULQDQ, &[SSE2]),
    (SHA, &[SSE2]),
    (GFNI, &[SSE2]),
    (MMXEXT, &[MMX]),
    (AMD_3DNOW, &[MMX]),
    (AMD_3DNOWEXT, &[AMD_3DNOW]),
    (FFXSR, &[FXSR]),
    // XSAVE family: SDM Vol. 1 13.2 (sub-features enumerated in 0Dh[1].EAX).
    (XSAVE, &[FXSR]),
    (XSAVEOPT, &[XSAVE]),
    (XSAVEC, &[XSAVE]),
    (XGETBV1, &[XSAVE]),
    (XSAVES, &[XSAVE]),
    (XFD, &[XSAVE]),
    // AVX: SDM Vol. 1 14.3 (AVX state is XSAVE component 2; detection needs XSAVE).
    (AVX, &[XSAVE]),
    (FMA, &[AVX]),
    (F16C, &[AVX]),
    (AVX2, &[AVX]),
    (FMA4, &[AVX]),
    (XOP, &[AVX]),
    (VAES, &[AVX, AES]),
    (VPCLMULQDQ, &[AVX, PCLMULQDQ]),
    (AVX_VNNI, &[AVX2]),
    (AVX_IFMA, &[AVX2]),
    // AVX-512: SDM Vol. 1 15.2 (every AVX-512 extension builds on AVX512F, which
    // needs XSAVE components 5–7 on top of AVX's).
    (AVX512F, &[AVX2]),
    (AVX512DQ, &[AVX512F]),
    (AVX512_IFMA, &[AVX512F]),
    (AVX512PF, &[AVX512F]),
    (AVX512ER, &[AVX512F]),
    (AVX512CD, &[AVX512F]),
    (AVX512BW, &[AVX512F]),
    (AVX512VL, &[AVX512F]),
    (AVX512_VNNI, &[AVX512F]),
    (AVX512_VPOPCNTDQ, &[AVX512F]),
    (AVX512_4VNNIW, &[AVX512F]),
    (AVX512_4FMAPS, &[AVX512F]),
    (AVX512_VP2INTERSECT, &[AVX512F]),
    (AVX512_BF16, &[AVX512F]),
    (AVX512_VBMI, &[AVX512BW]),
    (AVX512_VBMI2, &[AVX512BW]),
    (AVX512_BITALG, &[AVX512BW]),
    (AVX512_FP16, &[AVX512BW]),
    // Other XSAVE-managed state: MPX (components 3–4), PKU (component 9), AMX
    // (components 17–18), CET (supervisor components 11–12, need XSAVES).
    (MPX, &[XSAVE]),
    (PKU, &[XSAVE]),
    (AMX_TILE, &[XSAVE]),
    (AMX_BF16, &[AMX_TILE]),
    (AMX_INT8, &[AMX_TILE]),
    (AMX_FP16, &[AMX_TILE]),
    (CET_SS, &[XSAVES]),
    (CET_IBT, &[XSAVES]),
    // OS-enable mirrors: only meaningful if the feature exists.
    (OSXSAVE, &[XSAVE]),
    (OSPKE, &[PKU]),
    // Paging: SDM Vol. 3A 4.1 (NX only exists in PAE/4-level paging; long mode
    // requires PAE; PCID/LA57 only in 4/5-level paging), 4.10.1 (INVPCID).
    (PSE36, &[PSE]),
    (NX, &[PAE]),
    (LM, &[PAE, SSE2]),
    (PAGE1GB, &[LM]),
    (PCID, &[LM]),
    (INVPCID, &[PCID]),
    (LA57, &[LM]),
    (CX16, &[LM]),
    (LAHF_LM, &[LM]),
    (FSGSBASE, &[LM]),
    // APIC: x2APIC mode and the TSC-deadline timer are APIC modes (SDM Vol. 3A 11.12, 11.5.4.1).
    (X2APIC, &[APIC]),
    (TSC_DEADLINE, &[APIC]),
    (EXTAPIC, &[APIC]),
    (ARAT, &[APIC]),
    // TSC: SDM Vol. 3B 18.17.
    (RDTSCP, &[TSC]),
    (ITSC, &[TSC]),
    (TSC_ADJUST, &[TSC]),
    // Speculation controls: every bit below is a bit of MSR IA32_SPEC_CTRL (or an
    // IA32_PRED_CMD command) that only exists if the MSR does.
    (STIBP, &[IBRSB]),
    (SSBD, &[IBRSB]),
    (L1D_FLUSH, &[IBRSB]),
    (INTEL_PSFD, &[IBRSB]),
    (IPRED_CTRL, &[IBRSB]),
    (RRSBA_CTRL, &[IBRSB]),
    (BHI_CTRL, &[IBRSB]),
    (DDP_CTRL, &[IBRSB]),
    (AMD_STIBP, &[AMD_IBRS]),
    (IBPB_RET, &[IBPB]),
    // TSX: RTM_ALWAYS_ABORT/TSXLDTRK describe RTM behaviour.
    (TSXLDTRK, &[RTM]),
    (RTM_ALWAYS_ABORT, &[RTM]),
    // SGX launch control is an SGX feature.
    (SGX_LC, &[SGX]),
    // RDT monitoring sub-leaves only exist if leaf 0Fh does (SDM Vol. 3B 18.18.3).
    (CQM_LLC, &[PQM]),
    (CQM_OCCUP_LLC, &[CQM_LLC]),
    (CQM_MBM_TOTAL, &[CQM_LLC]),
    (CQM_MBM_LOCAL, &[CQM_LLC]),
    // HWP sub-features.
    (HWP_NOTIFY, &[HWP]),
    (HWP_ACT_WINDOW, &[HWP]),
    (HWP_EPP, &[HWP]),
    (HWP_PKG_REQ, &[HWP]),
];

const NREQ: usize = REQUIRES.len();
const NBITS: usize = NWORDS * 32;

type Words = [u32; NWORDS];

/// Compute the transitive closure of `table` at compile time. Returns the deep
/// requirement set of every row, or the first feature that (transitively) requires
/// itself.
#[allow(clippy::indexing_slicing)] // const evaluation: an out-of-bounds index is a compile error
pub const fn closure<const N: usize>(table: &[(Feature, &[Feature])]) -> Result<[Words; N], Feature> {
    let mut deep = [[0u32; NWORDS]; N];
    // row index of each feature that has a row, or usize::MAX
    let mut row_of = [usize::MAX; NBITS];
    let mut i = 0;
    while i < N && i < table.len() {
        let (f, reqs) = table[i];
        row_of[f.index()] = i;
        let mut j = 0;
        while j < reqs.len() {
            deep[i][reqs[j].word()] |= 1 << reqs[j].bit();
            j += 1;
        }
        i += 1;
    }
    // Fixpoint: deep[i] |= deep[row(x)] for every x in deep[i]. At most N rounds
    // are needed for an acyclic table.
    let mut round = 0;
    let mut changed = true;
    while changed && round <= N {
        changed = false;
        let mut i = 0;
        while i < N {
            let mut b = 0;
            while b < NBITS {
                if deep[i][b / 32] & (1 << (b % 32)) != 0 && row_of[b] != usize::MAX {
                    let r = row_of[b];
                    let mut w = 0;
                    while w < NWORDS {
                        let new = deep[i][w] | deep[r][w];
                        if new != deep[i][w] {
                            deep[i][w] = new;
                            changed = true;
                        }
                        w += 1;
                    }
                }
                b += 1;
            }
            i += 1;
        }
        round += 1;
    }
    let mut i = 0;
    while i < N && i < table.len() {
        let f = table[i].0;
        if deep[i][f.word()] & (1 << f.bit()) != 0 {
            return Err(f);
        }
        i += 1;
    }
    Ok(deep)
}

/// The deep requirements of each row of [`REQUIRES`], computed once at compile
/// time. A cycle in [`REQUIRES`] fails the build here.
static DEEP_REQUIRES: [Words; NREQ] = match closure::<NREQ>(REQUIRES) {
    Ok(d) => d,
    #[allow(clippy::panic)] // compile-time only: a dependency cycle must not build
    Err(_) => panic!("dependency cycle in features::REQUIRES"),
};

/// Everything `f` requires, transitively (empty if it requires nothing).
pub fn deep_requires(f: Feature) -> Featureset {
    REQUIRES
        .iter()
        .zip(DEEP_REQUIRES.iter())
        .find(|((g, _), _)| *g == f)
        .map_or_else(Featureset::new, |(_, d)| Featureset::from_words(d))
}

/// Everything that requires `f`, transitively (what must go if `f` goes).
pub fn deep_dependents(f: Feature) -> Featureset {
    let mut out = Featureset::new();
    for ((g, _), d) in REQUIRES.iter().zip(DEEP_REQUIRES.iter()) {
        if d.get(f.word()).is_some_and(|w| w & (1 << f.bit()) != 0) {
            out.set_bit(g.word(), g.bit(), true);
        }
    }
    out
}

/// Direct requirements of `f`.
pub fn direct_requires(f: Feature) -> &'static [Feature] {
    REQUIRES.iter().find(|(g, _)| *g == f).map_or(&[], |(_, r)| r)
}

/// The shortest chain `f → … → missing` through direct requirements, if `missing`
/// is (transitively) required by `f`.
pub fn chain(f: Feature, missing: Feature) -> Option<Vec<Feature>> {
    // BFS over direct requirements; parents recorded per flat bit index.
    let mut parent: Vec<Option<Feature>> = vec![None; NBITS];
    let mut seen = vec![false; NBITS];
    let mut queue = alloc::collections::VecDeque::new();
    queue.push_back(f);
    if let Some(s) = seen.get_mut(f.index()) {
        *s = true;
    }
    while let Some(x) = queue.pop_front() {
        if x == missing {
            let mut path = vec![x];
            let mut cur = x;
            while let Some(Some(p)) = parent.get(cur.index()) {
                path.push(*p);
                cur = *p;
            }
            path.reverse();
            return Some(path);
        }
        for &r in direct_requires(x) {
            if let Some(s) = seen.get_mut(r.index())
                && !*s
            {
                *s = true;
                if let Some(p) = parent.get_mut(r.index()) {
                    *p = Some(x);
                }
                queue.push_back(r);
            }
        }
    }
    None
}

/// The first feature in `fs` whose deep requirements are not all in `fs`, with the
/// missing requirement. `None` means `fs` is dependency-closed.
pub fn first_missing_dependency(fs: &Featureset) -> Option<(Feature, Feature)> {
    missing_dependencies(fs).into_iter().next()
}

/// Every `(feature, missing requirement)` pair in `fs`, one per feature (the
/// closest missing requirement).
pub fn missing_dependencies(fs: &Featureset) -> Vec<(Feature, Feature)> {
    let mut out = Vec::new();
    for ((f, _), d) in REQUIRES.iter().zip(DEEP_REQUIRES.iter()) {
        if !f.is_in(fs) {
            continue;
        }
        let need = Featureset::from_words(d);
        let lacking = need.and_not(fs);
        if lacking.is_empty() {
            continue;
        }
        // Report the missing requirement nearest to f (shortest chain).
        let best =
            lacking.bits().map(|(w, b)| Feature::new(w, b)).filter_map(|m| chain(*f, m).map(|c| (c.len(), m))).min();
        if let Some((_, m)) = best {
            out.push((*f, m));
        }
    }
    out
}

/// Every bit in the feature table (the "known" mask).
pub fn known_mask() -> Featureset {
    let mut fs = Featureset::new();
    for f in FEATURES {
        fs.set_bit(f.feature.word(), f.feature.bit(), true);
    }
    fs
}

/// Every bit with the given attribute.
pub fn attr_mask(attr: Attr) -> Featureset {
    let mut fs = Featureset::new();
    for f in FEATURES.iter().filter(|f| f.attr == attr) {
        fs.set_bit(f.feature.word(), f.feature.bit(), true);
    }
    fs
}

/// Every bit with the given flag.
pub fn flag_mask(flag: u8) -> Featureset {
    let mut fs = Featureset::new();
    for f in FEATURES.iter().filter(|f| f.flags & flag != 0) {
        fs.set_bit(f.feature.word(), f.feature.bit(), true);
    }
    fs
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    #[test]
    fn names_and_bits_are_unique() {
        let mut names = BTreeSet::new();
        let mut bits = BTreeSet::new();
        for f in FEATURES {
            assert!(names.insert(f.name), "duplicate name {}", f.name);
            assert!(bits.insert(f.feature), "duplicate bit for {}", f.name);
            assert!(f.feature.word() < NWORDS);
        }
    }

    #[test]
    fn table_is_in_word_and_bit_order() {
        for pair in FEATURES.windows(2) {
            assert!(pair[0].feature < pair[1].feature, "{} before {}", pair[0].name, pair[1].name);
        }
    }

    #[test]
    fn duplicated_1d_bits_are_not_named_in_word_3() {
        for f in FEATURES.iter().filter(|f| f.feature.word() == crate::featureset::word::E1_EDX) {
            assert_eq!(COMMON_1D & (1 << f.feature.bit()), 0, "{}", f.name);
        }
    }

    #[test]
    fn closure_detects_a_cycle() {
        let a = Feature::new(0, 1);
        let b = Feature::new(0, 2);
        let c = Feature::new(0, 3);
        let cyclic: &[(Feature, &[Feature])] = &[(a, &[b]), (b, &[c]), (c, &[a])];
        assert!(closure::<3>(cyclic).is_err());
        let acyclic: &[(Feature, &[Feature])] = &[(a, &[b]), (b, &[c])];
        let deep = closure::<2>(acyclic).expect("acyclic");
        assert_eq!(deep[0][0], (1 << 2) | (1 << 3));
    }

    #[test]
    fn real_table_has_no_cycle() {
        assert!(closure::<NREQ>(REQUIRES).is_ok());
        for (f, _) in REQUIRES {
            assert!(!f.is_in(&deep_requires(*f)), "{f} requires itself");
        }
    }

    #[test]
    fn transitive_requirements() {
        let d = deep_requires(AVX512_VBMI);
        for f in [AVX512BW, AVX512F, AVX2, AVX, XSAVE, FXSR, FPU] {
            assert!(f.is_in(&d), "{f}");
        }
        assert!(AVX2.is_in(&deep_dependents(AVX)));
        assert!(AVX512_FP16.is_in(&deep_dependents(AVX)));
        assert!(!SSE.is_in(&deep_dependents(AVX)));
        assert_eq!(chain(AVX2, XSAVE), Some(vec![AVX2, AVX, XSAVE]));
    }

    #[test]
    fn every_required_feature_is_in_the_table() {
        for (f, reqs) in REQUIRES {
            assert!(f.info().is_some());
            for r in *reqs {
                assert!(r.info().is_some());
            }
        }
    }

    #[test]
    fn names_resolve() {
        assert_eq!(Feature::from_name("avx512f"), Some(AVX512F));
        assert_eq!(Feature::from_name("AVX512F"), Some(AVX512F));
        assert_eq!(Feature::from_name("pni"), Some(SSE3));
        assert_eq!(Feature::from_name("sse3"), Some(SSE3));
        assert_eq!(Feature::from_name("nonsense"), None);
    }
}
