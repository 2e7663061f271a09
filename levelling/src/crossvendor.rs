//! Cross-vendor rules: what differs between AMD-compatible CPUs (AMD, Hygon) and Intel
//! CPUs in CPUID and in the behaviour CPUID announces, and what a policy levelled
//! across both vendors does about each difference. [`RULES`] is the whole list, one
//! row per leaf, feature or number, each with its action and the reason; read it
//! against the SDM and the APM line by line.
//!
//! # How one vendor is presented whatever the host
//!
//! A policy names one vendor ([`crate::Policy::vendor`]) and the guest sees only
//! that vendor, on every host: the vendor string, the CPUID layout (where caches,
//! topology and the 0x8000_0001 duplicates live), the signature, the brand string
//! and the cache descriptors all come from the policy, never from the host
//! ([`crate::CpuidTable`] is built from the policy alone). A policy runs on hosts of
//! another vendor only if it says so: [`crate::Policy::host_vendors`], written
//! `host-vendors=amd+intel` in the text form, is set by [`crate::pool::level_pool`]
//! for a mixed pool.
//!
//! * **Vendor.** Chosen explicitly (`hvctl cpuid level --vendor amd`, `vendor=` in a
//!   spec), else the first host's vendor in the pool.
//! * **Signature, brand string, caches.** Those of the first dump in the pool of the
//!   presented vendor (not an average, not a made-up model): the guest sees a real CPU
//!   of its vendor. Linux picks its code paths by vendor (`init_amd`/`init_intel`)
//!   and its errata workarounds, model-specific MSRs and mitigations by vendor, family
//!   and model; a signature no CPU has would either match nothing or, worse, match
//!   workarounds for a CPU that does not exist. The first rather than the oldest:
//!   "oldest" is not decidable from a signature across families, and the operator
//!   orders the pool. `signature=`/`family=`/`model=` override it.
//! * **Features.** The AND of every host's guest `max` (OR for the `OR` bits), minus
//!   what [`RULES`] drops: features whose XSAVE component the hosts lay out
//!   differently, leaves that exist only on one vendor. The bits whose meaning is the
//!   same on both vendors (all others in the feature table) need no rule; a bit only
//!   one vendor defines is absent on the other vendor's hosts, so the AND removes it.
//! * **Caveats.** Behaviour CPUID cannot hide — SYSCALL and SYSENTER in
//!   compatibility mode, SYSENTER MSR widths, vendor-keyed guest workarounds — is not
//!   dropped silently but named as a [`Caveat`] that the policy carries (computed by
//!   [`crate::Policy::caveats_on`]), shown by `hvctl cpuid level`/`check`/`policy`
//!   and listed in the policy's text form. Some are obligations of the hypervisor
//!   ([`Caveat::obligation`]), some are differences a guest may observe.
//!
//! Not here: the vCPU state itself (VMCB vs VMCS, `VcpuSnapshot`), which the
//! hypervisor moves between SVM and VMX; this module only says what CPUID promises.

use crate::features::{Feature, LM, NSCB, SEP, SYSCALL};
use crate::featureset::Featureset;
use crate::host::Vendor;
use alloc::vec::Vec;
use core::fmt;

/// Which pairs of presented vendor (the policy's) and host vendor a rule concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// The host's vendor is not the presented one (AMD ↔ Hygon included).
    OtherVendor,
    /// One is AMD-compatible, the other Intel: the CPUID layouts differ.
    OtherLayout,
    /// An AMD- or Hygon-vendor policy on an Intel host.
    AmdOnIntel,
    /// An Intel-vendor policy on an AMD or Hygon host.
    IntelOnAmd,
    /// An Intel-vendor policy on an AMD or Hygon host whose CPUID lacks the feature.
    IntelOnAmdWithout(Feature),
}

impl When {
    /// Whether the rule concerns a policy presenting `presented` on a host of vendor
    /// `host` with raw featureset `host_raw` (`None`: any host of that vendor, so a
    /// rule that depends on the host's features is taken to apply).
    pub fn applies(self, presented: Vendor, host: Vendor, host_raw: Option<&Featureset>) -> bool {
        let amd_on_intel = presented.is_amd_compatible() && !host.is_amd_compatible();
        let intel_on_amd = !presented.is_amd_compatible() && host.is_amd_compatible();
        match self {
            When::OtherVendor => presented != host,
            When::OtherLayout => amd_on_intel || intel_on_amd,
            When::AmdOnIntel => amd_on_intel,
            When::IntelOnAmd => intel_on_amd,
            When::IntelOnAmdWithout(f) => intel_on_amd && host_raw.is_none_or(|r| !f.is_in(r)),
        }
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            When::OtherVendor => f.write_str("on a host of another vendor"),
            When::OtherLayout => f.write_str("between AMD-compatible and Intel"),
            When::AmdOnIntel => f.write_str("AMD/Hygon policy on an Intel host"),
            When::IntelOnAmd => f.write_str("Intel policy on an AMD/Hygon host"),
            When::IntelOnAmdWithout(g) => {
                write!(f, "Intel policy on an AMD/Hygon host without {}", g.info().map_or("unnamed", |i| i.name))
            }
        }
    }
}

/// What a rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A CPUID leaf (or part of one), described.
    Leaf {
        /// The leaf.
        leaf: u32,
        /// Which part of it.
        what: &'static str,
    },
    /// One feature bit.
    Feature(Feature),
    /// The standard-format layout of the XSAVE components (CPUID 0xD[i]).
    XsaveLayout,
    /// A number levelled across the pool.
    Limit(&'static str),
    /// Something the vendor identity decides, not one bit.
    Identity(&'static str),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Leaf { leaf, what } => write!(f, "CPUID {leaf:#x} {what}"),
            Subject::Feature(g) => write!(f, "{g}"),
            Subject::XsaveLayout => f.write_str("XSAVE component layout (CPUID 0xd[i].EAX/EBX/ECX)"),
            Subject::Limit(what) | Subject::Identity(what) => f.write_str(what),
        }
    }
}

/// What a policy levelled across vendors does about a difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Computed from the policy (its vendor, its presented dump, its vCPU count), the
    /// same on every host.
    Synthesize(&'static str),
    /// Not offered: the leaf reads zero, the feature is dropped with the reason.
    Drop,
    /// The minimum across the pool.
    Minimum,
    /// Kept, and named as a caveat the policy carries.
    Caveat(Caveat),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Synthesize(from) => write!(f, "synthesized from {from}"),
            Action::Drop => f.write_str("dropped"),
            Action::Minimum => f.write_str("minimum across the pool"),
            Action::Caveat(c) => write!(f, "kept, caveat `{}`", c.name()),
        }
    }
}

/// One cross-vendor rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// What it is about.
    pub subject: Subject,
    /// Which vendor pairs it concerns.
    pub when: When,
    /// What the policy does.
    pub action: Action,
    /// Why, citing the manuals.
    pub reason: &'static str,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}: {}", self.subject, self.when, self.action, self.reason)
    }
}

/// A difference a cross-vendor policy keeps and names: either something the
/// hypervisor must do on a host of the other vendor ([`Caveat::obligation`]) or
/// something the guest may observe that nothing in CPUID can hide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Caveat {
    /// SYSCALL from compatibility mode is #UD on Intel.
    SyscallCompat,
    /// SYSENTER/SYSEXIT in long mode are #UD on AMD and Hygon.
    SysenterCompat,
    /// AMD and Hygon keep only 32 bits of IA32_SYSENTER_ESP/EIP.
    SysenterMsrWidth,
    /// Linux's SYSRET SS-attributes workaround is keyed on the AMD/Hygon vendor.
    SysretSsAttrs,
    /// Linux's null-selector-keeps-base check is keyed on the AMD/Hygon vendor.
    NullSelectorBase,
    /// The guest uses the presented vendor's MSRs.
    VendorMsrs,
    /// Linux exempts AMD/Hygon from Intel-only vulnerabilities by vendor.
    VendorExemptMitigations,
    /// Linux selects AMD-specific mitigations by vendor and family.
    VendorKeyedMitigations,
}

impl Caveat {
    /// Every caveat.
    pub const ALL: [Caveat; 8] = [
        Caveat::SyscallCompat,
        Caveat::SysenterCompat,
        Caveat::SysenterMsrWidth,
        Caveat::SysretSsAttrs,
        Caveat::NullSelectorBase,
        Caveat::VendorMsrs,
        Caveat::VendorExemptMitigations,
        Caveat::VendorKeyedMitigations,
    ];

    /// A short stable name (`syscall-compat-ud`), as `hvctl cpuid` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Caveat::SyscallCompat => "syscall-compat-ud",
            Caveat::SysenterCompat => "sysenter-compat-ud",
            Caveat::SysenterMsrWidth => "sysenter-msr-width",
            Caveat::SysretSsAttrs => "sysret-ss-attrs",
            Caveat::NullSelectorBase => "null-selector-base",
            Caveat::VendorMsrs => "vendor-msrs",
            Caveat::VendorExemptMitigations => "vendor-exempt-mitigations",
            Caveat::VendorKeyedMitigations => "vendor-keyed-mitigations",
        }
    }

    /// Look a caveat up by [`Caveat::name`].
    pub fn from_name(s: &str) -> Option<Caveat> {
        Caveat::ALL.into_iter().find(|c| c.name() == s)
    }

    /// What the guest sees or may see.
    pub const fn effect(self) -> &'static str {
        match self {
            Caveat::SyscallCompat => {
                "a 32-bit (compatibility-mode) process that uses SYSCALL, as Linux's 32-bit vDSO does on an AMD-vendor CPU, gets #UD on an Intel host: Intel executes SYSCALL only in 64-bit mode (SDM Vol. 2B SYSCALL), AMD also in compatibility mode (APM Vol. 3 SYSCALL)"
            }
            Caveat::SysenterCompat => {
                "a 32-bit process that uses SYSENTER, as Linux's 32-bit vDSO does on an Intel-vendor CPU, gets #UD on an AMD or Hygon host: SYSENTER and SYSEXIT are invalid in long mode there (APM Vol. 3 SYSENTER, SYSEXIT), valid on Intel (SDM Vol. 2B SYSENTER)"
            }
            Caveat::SysenterMsrWidth => {
                "AMD and Hygon keep only the low 32 bits of IA32_SYSENTER_ESP and IA32_SYSENTER_EIP (legacy-mode MSRs there), while a 64-bit Intel-vendor guest stores 64-bit addresses in them"
            }
            Caveat::SysretSsAttrs => {
                "AMD's SYSRET leaves SS's hidden attributes as they were; Linux reloads SS against this (X86_BUG_SYSRET_SS_ATTRS) only on AMD and Hygon vendors, so an Intel-vendor guest on an AMD host can return to 32-bit code with an unusable SS"
            }
            Caveat::NullSelectorBase => {
                "AMD CPUs without null_sel_clr_base (before Zen 3) keep the FS/GS base when a null selector is loaded; Linux checks for that (X86_BUG_NULL_SEG) only on AMD-compatible vendors, so an Intel-vendor guest can let one task see the previous task's FS/GS base"
            }
            Caveat::VendorMsrs => {
                "the guest reads and writes the presented vendor's MSRs (AMD: HWCR, SYSCFG, TOP_MEM, DE_CFG, the EFER.FFXSR bit; Intel: PLATFORM_ID, MISC_ENABLE, FEATURE_CONTROL), not the host's"
            }
            Caveat::VendorExemptMitigations => {
                "Linux exempts AMD- and Hygon-vendor CPUs by vendor from the Meltdown (page-table isolation), L1TF, MDS and TAA mitigations (its cpu_vuln_whitelist); on an Intel host affected by them the guest does not apply them (boot it with pti=on, or pool only Intel hosts that are not affected)"
            }
            Caveat::VendorKeyedMitigations => {
                "Linux selects AMD-specific mitigations (Retbleed's untrained return thunk, SRSO) by vendor and family; an Intel-vendor guest on an AMD or Hygon host does not apply them"
            }
        }
    }

    /// What the hypervisor must do on such a host, if anything can be done there.
    pub const fn obligation(self) -> Option<&'static str> {
        match self {
            Caveat::SyscallCompat => Some(
                "intercept #UD and emulate SYSCALL from compatibility mode (64-bit processes are unaffected; not implemented by the core yet)",
            ),
            Caveat::SysenterCompat => Some(
                "intercept #UD and emulate SYSENTER/SYSEXIT from compatibility mode, as KVM's SVM does for Intel-vendor guests (not implemented by the core yet)",
            ),
            Caveat::SysenterMsrWidth => Some(
                "intercept the SYSENTER MSRs on AMD/Hygon hosts and keep their full 64-bit values in the vCPU state, so they also survive migration (not implemented by the core yet)",
            ),
            Caveat::VendorMsrs => Some(
                "answer MSRs by the policy's vendor, never the host's, and carry them in the vCPU state (the core's MSR emulation keys on the policy's vendor)",
            ),
            Caveat::SysretSsAttrs
            | Caveat::NullSelectorBase
            | Caveat::VendorExemptMitigations
            | Caveat::VendorKeyedMitigations => None,
        }
    }
}

impl fmt::Display for Caveat {
    /// `name: effect; the hypervisor must …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.effect())?;
        match self.obligation() {
            Some(o) => write!(f, "; the hypervisor must {o}"),
            None => f.write_str("; nothing the hypervisor can change"),
        }
    }
}

const fn leaf(leaf: u32, what: &'static str) -> Subject {
    Subject::Leaf { leaf, what }
}

/// Every cross-vendor difference and what a levelled policy does about it.
pub const RULES: &[Rule] = &[
    // ---- identity: presented, never the host's ----
    Rule {
        subject: Subject::Identity("vendor string (CPUID 0x0.EBX/EDX/ECX; 0x80000000.EBX/EDX/ECX on AMD-compatible)"),
        when: When::OtherVendor,
        action: Action::Synthesize("the policy's vendor"),
        reason: "the guest keys every vendor path on it (SDM Vol. 2A CPUID leaf 00H; APM Vol. 3 Appendix E, functions 0 and 8000_0000h)",
    },
    Rule {
        subject: Subject::Identity("signature (CPUID 0x1.EAX; 0x80000001.EAX on AMD-compatible)"),
        when: When::OtherVendor,
        action: Action::Synthesize("the first dump of the presented vendor in the pool, or signature="),
        reason: "errata workarounds, model-specific MSRs and mitigations are keyed on vendor, family and model; a real CPU's signature matches real workarounds",
    },
    Rule {
        subject: leaf(0x8000_0002, "..0x80000004 (brand string)"),
        when: When::OtherVendor,
        action: Action::Synthesize("the presented dump, or brand="),
        reason: "it names the presented CPU, not the host",
    },
    Rule {
        subject: leaf(0x1, "EBX[15:8] (CLFLUSH line size)"),
        when: When::OtherVendor,
        action: Action::Synthesize("the presented dump, or clflush-line="),
        reason: "64 bytes on every CPU of both vendors in the test data; part of the presented identity",
    },
    Rule {
        subject: leaf(0x8000_0001, "EDX bits 0-9, 12-17, 23, 24 (AMD's duplicates of 0x1.EDX)"),
        when: When::OtherLayout,
        action: Action::Synthesize("0x1.EDX for an AMD-compatible vendor, zero for Intel"),
        reason: "AMD duplicates them (APM Vol. 3 E.4.2), Intel reserves them (SDM Vol. 2A CPUID 80000001H)",
    },
    // ---- caches and topology: the presented vendor's layout ----
    Rule {
        subject: leaf(0x2, "and 0x4 (Intel cache descriptors)"),
        when: When::OtherLayout,
        action: Action::Synthesize("the presented Intel dump (leaf 2 says \"use leaf 4\"); zero for AMD-compatible"),
        reason: "AMD has no leaf 2/4 caches (SDM Vol. 2A CPUID leaves 02H, 04H; APM Vol. 3 Appendix E)",
    },
    Rule {
        subject: leaf(0x8000_0005, "and 0x80000006 ECX/EDX (AMD cache descriptors)"),
        when: When::OtherLayout,
        action: Action::Synthesize("the presented dump (0x80000005 only for AMD-compatible)"),
        reason: "0x80000005 is reserved on Intel and 0x80000006 has only its L2 there (SDM Vol. 2A CPUID 80000006H; APM Vol. 3 E.4.4, E.4.5)",
    },
    Rule {
        subject: leaf(0xb, ", 0x1.EBX[23:16], 0x80000008.ECX (topology)"),
        when: When::OtherLayout,
        action: Action::Synthesize("the policy's vCPU count (one package, one thread per core)"),
        reason: "the host's topology is not the guest's; 0x80000008.ECX core count only for AMD-compatible (APM Vol. 3 E.4.7)",
    },
    Rule {
        subject: leaf(0x1f, "(V2 extended topology, Intel)"),
        when: When::OtherLayout,
        action: Action::Drop,
        reason: "not synthesized: leaf 0xB describes the guest's flat topology on both vendors",
    },
    Rule {
        subject: leaf(0x8000_001d, "and 0x8000001E (AMD cache and core topology, topoext)"),
        when: When::OtherLayout,
        action: Action::Drop,
        reason: "AMD-only leaves (APM Vol. 3 Appendix E) describing host topology; topoext is never offered",
    },
    Rule {
        subject: leaf(0x8000_001f, "(AMD memory encryption)"),
        when: When::OtherLayout,
        action: Action::Drop,
        reason: "SME/SEV belong to the host and do not exist on Intel",
    },
    Rule {
        subject: leaf(0xa, "(architectural PMU)"),
        when: When::OtherLayout,
        action: Action::Drop,
        reason: "the PMU is not virtualized, and AMD has no leaf 0xA (its counters are in 0x80000001.ECX and MSRs)",
    },
    Rule {
        subject: leaf(0x8000_0021, "EAX (AMD extended features 2)"),
        when: When::OtherLayout,
        action: Action::Drop,
        reason: "AND-levelled: an Intel host has no such leaf, so none of its bits survive and the maximum extended leaf is 0x80000008",
    },
    // ---- numbers ----
    Rule {
        subject: Subject::Limit("maximum basic and extended leaves (0x0.EAX, 0x80000000.EAX)"),
        when: When::OtherVendor,
        action: Action::Minimum,
        reason: "a leaf a host does not report cannot be answered from its features",
    },
    Rule {
        subject: Subject::Limit("physical address bits (0x80000008.EAX[7:0])"),
        when: When::OtherVendor,
        action: Action::Minimum,
        reason: "a guest-physical address must fit every host's nested paging",
    },
    Rule {
        subject: Subject::Limit("linear address bits (0x80000008.EAX[15:8])"),
        when: When::OtherVendor,
        action: Action::Minimum,
        reason: "48 without la57, which must then be on every host",
    },
    // ---- XSAVE ----
    Rule {
        subject: Subject::XsaveLayout,
        when: When::OtherVendor,
        action: Action::Drop,
        reason: "a guest's XSAVE image is moved as bytes, so each component must sit at the same offset with the same size on every host (SDM Vol. 1 13.4.1); the vendors differ, e.g. AMD leaves no room for MPX, so AVX-512 starts at 832 instead of 1088 and PKRU at 2432 instead of 2688",
    },
    // ---- behaviour CPUID announces but cannot hide ----
    Rule {
        subject: Subject::Feature(SYSCALL),
        when: When::AmdOnIntel,
        action: Action::Caveat(Caveat::SyscallCompat),
        reason: "64-bit guests need SYSCALL; only its compatibility-mode use differs",
    },
    Rule {
        subject: Subject::Feature(SEP),
        when: When::IntelOnAmd,
        action: Action::Caveat(Caveat::SysenterCompat),
        reason: "Linux on Intel uses SYSENTER for 32-bit processes whether or not sep is set, so dropping it would not help",
    },
    Rule {
        subject: Subject::Feature(SEP),
        when: When::IntelOnAmd,
        action: Action::Caveat(Caveat::SysenterMsrWidth),
        reason: "the MSRs exist with sep; their width is the host's",
    },
    Rule {
        subject: Subject::Feature(SYSCALL),
        when: When::IntelOnAmd,
        action: Action::Caveat(Caveat::SysretSsAttrs),
        reason: "a guest workaround keyed on the vendor string",
    },
    Rule {
        subject: Subject::Feature(LM),
        when: When::IntelOnAmdWithout(NSCB),
        action: Action::Caveat(Caveat::NullSelectorBase),
        reason: "a guest check keyed on the vendor string; hosts with null_sel_clr_base behave like Intel",
    },
    Rule {
        subject: Subject::Identity("model-specific registers"),
        when: When::OtherLayout,
        action: Action::Caveat(Caveat::VendorMsrs),
        reason: "MSR paths are keyed on the vendor string",
    },
    Rule {
        subject: Subject::Identity("vulnerability mitigations"),
        when: When::AmdOnIntel,
        action: Action::Caveat(Caveat::VendorExemptMitigations),
        reason: "mitigation choices are keyed on the vendor string",
    },
    Rule {
        subject: Subject::Identity("vulnerability mitigations"),
        when: When::IntelOnAmd,
        action: Action::Caveat(Caveat::VendorKeyedMitigations),
        reason: "mitigation choices are keyed on vendor and family",
    },
];

/// The caveats of a policy presenting `presented` with `features`, on a host of
/// vendor `host` with raw featureset `host_raw` (`None`: any host of that vendor), in
/// [`RULES`] order, each once. Empty on a host of the presented vendor.
pub fn caveats(presented: Vendor, features: &Featureset, host: Vendor, host_raw: Option<&Featureset>) -> Vec<Caveat> {
    let mut out = Vec::new();
    for r in RULES {
        let Action::Caveat(c) = r.action else { continue };
        let concerned = match r.subject {
            Subject::Feature(f) => f.is_in(features),
            _ => true,
        };
        if concerned && r.when.applies(presented, host, host_raw) && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The rule that names `c`.
pub fn rule_of(c: Caveat) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.action == Action::Caveat(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_caveat_has_a_rule_and_a_unique_name() {
        for c in Caveat::ALL {
            assert!(rule_of(c).is_some(), "{c:?}");
            assert_eq!(Caveat::from_name(c.name()), Some(c));
            assert!(!c.effect().is_empty());
        }
        for r in RULES {
            assert!(!r.reason.is_empty());
        }
    }

    #[test]
    fn no_caveat_for_the_presented_vendor_or_between_amd_and_hygon() {
        let mut fs = Featureset::new();
        for f in [SYSCALL, SEP, LM] {
            fs.set_bit(f.word(), f.bit(), true);
        }
        for v in Vendor::ALL {
            assert!(caveats(v, &fs, v, None).is_empty(), "{v}");
        }
        assert!(caveats(Vendor::Amd, &fs, Vendor::Hygon, None).is_empty());
        let amd_on_intel = caveats(Vendor::Amd, &fs, Vendor::Intel, None);
        assert_eq!(amd_on_intel, [Caveat::SyscallCompat, Caveat::VendorMsrs, Caveat::VendorExemptMitigations]);
        let intel_on_amd = caveats(Vendor::Intel, &fs, Vendor::Amd, None);
        assert!(intel_on_amd.contains(&Caveat::SysenterCompat) && intel_on_amd.contains(&Caveat::NullSelectorBase));
        // A host with null_sel_clr_base behaves like Intel there.
        let mut zen3 = Featureset::new();
        zen3.set_bit(NSCB.word(), NSCB.bit(), true);
        assert!(!caveats(Vendor::Intel, &fs, Vendor::Amd, Some(&zen3)).contains(&Caveat::NullSelectorBase));
    }
}
