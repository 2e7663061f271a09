//! A host CPU as seen through its raw CPUID records: vendor, signature, maximum
//! leaves, the raw featureset, XSAVE component layout, cache descriptors, address
//! sizes, and the guest `max`/`default` featuresets derived from them.
//!
//! Built from a dump file ([`crate::dump`]) or from a live [`crate::dump::enumerate`].
//! This module reads; it never decides what a guest gets beyond calling
//! [`crate::guest`].

use crate::dump::CpuidRecord;
use crate::features::{COMMON_1D, Feature, LM, SVM, VMX};
use crate::featureset::{Featureset, NWORDS, WORDS, word};
use crate::guest::{self, Derived, DropReason, LevellingCaps};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// CPU vendor, from CPUID.0:EBX/EDX/ECX.
///
/// Serialized (postcard) by variant index inside a [`crate::Policy`]; new vendors go
/// at the end so that existing encodings keep their meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vendor {
    /// `GenuineIntel`
    Intel,
    /// `AuthenticAMD`
    Amd,
    /// `HygonGenuine`: Hygon Dhyana (family 0x18), a licensed Zen derivative. Its
    /// CPUID follows AMD's (APM Vol. 3 Appendix E): Linux gives `X86_VENDOR_HYGON`
    /// AMD's paths for the 0x8000_0001 duplicates, the 0x8000_0005/6 cache leaves,
    /// 0x8000_001E topology and SVM, and KVM's `guest_cpuid_is_amd_or_hygon` treats
    /// the two alike; so does this crate (see [`Vendor::is_amd_compatible`]).
    Hygon,
}

impl Vendor {
    /// The 12-byte vendor string as CPUID.0 returns it in `[ebx, edx, ecx]`.
    pub const fn regs(self) -> [u32; 3] {
        match self {
            // "Genu" "ineI" "ntel"
            Vendor::Intel => [0x756e_6547, 0x4965_6e69, 0x6c65_746e],
            // "Auth" "enti" "cAMD"
            Vendor::Amd => [0x6874_7541, 0x6974_6e65, 0x444d_4163],
            // "Hygo" "nGen" "uine"
            Vendor::Hygon => [0x6f67_7948, 0x6e65_476e, 0x656e_6975],
        }
    }
    /// Short lower-case name (`intel`, `amd`, `hygon`), the text form's `vendor=`.
    pub const fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
            Vendor::Hygon => "hygon",
        }
    }
    /// Whether CPUID follows AMD's layout (APM Vol. 3 Appendix E): the vendor string
    /// repeated in 0x8000_0000, the signature and the 1.EDX duplicates in
    /// 0x8000_0001, L1/L2/L3 descriptors in 0x8000_0005/6 rather than leaves 2 and 4,
    /// the core count in 0x8000_0008.ECX. True for AMD and Hygon (Linux's
    /// `X86_VENDOR_HYGON` paths, KVM's `guest_cpuid_is_amd_or_hygon`).
    pub const fn is_amd_compatible(self) -> bool {
        matches!(self, Vendor::Amd | Vendor::Hygon)
    }
    /// Every vendor, in encoding order.
    pub const ALL: [Vendor; 3] = [Vendor::Intel, Vendor::Amd, Vendor::Hygon];
    /// Position in [`Vendor::ALL`] (the postcard variant index).
    pub const fn index(self) -> u8 {
        match self {
            Vendor::Intel => 0,
            Vendor::Amd => 1,
            Vendor::Hygon => 2,
        }
    }
    /// Parse a short name (`intel`, `amd`, `hygon`) or a CPUID vendor string, in any case.
    pub fn parse(s: &str) -> Option<Vendor> {
        Vendor::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s) || alloc::format!("{v}").eq_ignore_ascii_case(s))
    }
}

/// A set of [`Vendor`]s: the vendors of the hosts a policy was levelled for
/// ([`crate::Policy::host_vendors`]). Bit `i` is [`Vendor::ALL`]`[i]`; postcard
/// encodes it as that one byte. The text form is the short names joined by `+`
/// (`intel+amd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VendorSet(u8);

impl VendorSet {
    /// No vendor.
    pub const EMPTY: VendorSet = VendorSet(0);
    /// The set of one vendor.
    pub const fn of(v: Vendor) -> VendorSet {
        VendorSet(1 << v.index())
    }
    /// This set with `v` added.
    pub const fn with(self, v: Vendor) -> VendorSet {
        VendorSet(self.0 | (1 << v.index()))
    }
    /// This set without `v`.
    pub const fn without(self, v: Vendor) -> VendorSet {
        VendorSet(self.0 & !(1 << v.index()))
    }
    /// Whether `v` is in the set.
    pub const fn contains(self, v: Vendor) -> bool {
        self.0 & (1 << v.index()) != 0
    }
    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The vendors in the set, in [`Vendor::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Vendor> {
        Vendor::ALL.into_iter().filter(move |v| self.contains(*v))
    }
    /// The canonical form of a policy's host vendors when it presents `presented`:
    /// empty if the set names no other vendor (a policy for `presented`'s hosts only),
    /// else the set with `presented` in it.
    pub const fn normalized_for(self, presented: Vendor) -> VendorSet {
        if self.without(presented).is_empty() { VendorSet::EMPTY } else { self.with(presented) }
    }
    /// Parse the text form: short names (`intel`, `amd`, `hygon`, or the CPUID
    /// strings) joined by `+`.
    pub fn parse(s: &str) -> Option<VendorSet> {
        let mut set = VendorSet::EMPTY;
        for name in s.split('+') {
            set = set.with(Vendor::parse(name.trim())?);
        }
        Some(set)
    }
}

impl fmt::Display for VendorSet {
    /// `intel+amd`; `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, v) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(v.name())?;
        }
        Ok(())
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Intel => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
            Vendor::Hygon => "HygonGenuine",
        })
    }
}

/// One XSAVE state component as CPUID.(EAX=0Dh,ECX=i) describes it (SDM Vol. 1 13.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XstateComponent {
    /// Component index `i` (2..=63).
    pub index: u8,
    /// Size in bytes (EAX).
    pub size: u32,
    /// Offset in the standard format (EBX); 0 for supervisor components.
    pub offset: u32,
    /// ECX: bit 0 = supervisor (IA32_XSS) component, bit 1 = 64-byte aligned when compacted.
    pub flags: u32,
}

/// Why a set of records does not describe a usable host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError {
    /// No CPUID leaf 0.
    NoLeaf0,
    /// Leaf 1 is missing or beyond the maximum basic leaf.
    NoLeaf1,
    /// The vendor string is not GenuineIntel, AuthenticAMD or HygonGenuine.
    UnsupportedVendor(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::NoLeaf0 => f.write_str("the dump has no CPUID leaf 0x0 (vendor and maximum basic leaf)"),
            HostError::NoLeaf1 => f.write_str("the dump has no CPUID leaf 0x1 (signature and base features)"),
            HostError::UnsupportedVendor(v) => {
                write!(f, "unsupported CPU vendor {v:?} (only GenuineIntel, AuthenticAMD and HygonGenuine)")
            }
        }
    }
}

/// Why a host cannot run guests at all. A [`HostCpu`] is still built for such a host
/// (its dump can be shown and compared), but its `max` is empty and every policy is
/// refused on it with this one reason ([`crate::PolicyError::HostCannotRunGuests`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfit {
    /// CPUID 0x8000_0001.EDX bit 29 (LM, SDM Vol. 2A CPUID, APM Vol. 3 Appendix E) is
    /// clear or the leaf is missing: the hypervisor and its guests run in long mode.
    NoLongMode,
    /// Neither VMX (CPUID 0x1.ECX bit 5, SDM Vol. 3C "Discovering Support for VMX")
    /// nor SVM (CPUID 0x8000_0001.ECX bit 2, APM Vol. 2 15.4): no guest can be run,
    /// as in a VM without nested virtualization.
    NoVirtualization,
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::NoLongMode => write!(
                f,
                "it has no long mode: {} is clear or missing, and the hypervisor and its guests are 64-bit",
                LM
            ),
            Unfit::NoVirtualization => write!(
                f,
                "it has neither VMX nor SVM: {} and {} are both clear, as in a virtual machine without nested virtualization",
                VMX, SVM
            ),
        }
    }
}

/// Everything levelling needs to know about one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCpu {
    /// Vendor.
    pub vendor: Vendor,
    /// CPUID.1:EAX (family/model/stepping).
    pub signature: u32,
    /// CPUID.1:EBX (brand index, CLFLUSH size, logical count, APIC ID).
    pub leaf1_ebx: u32,
    /// CPUID.0:EAX.
    pub basic_max: u32,
    /// CPUID.8000_0000h:EAX (0 if the extended range is absent).
    pub ext_max: u32,
    /// Brand string 0x8000_0002..=0x8000_0004, `[eax, ebx, ecx, edx]` × 3.
    pub brand: [u32; 12],
    /// Physical / linear address bits (0x8000_0008.EAX[7:0], [15:8]); 36/48 if absent.
    pub phys_bits: u8,
    /// Linear address bits.
    pub virt_bits: u8,
    /// The raw featureset (0x8000_0001.EDX without the [`COMMON_1D`] duplicates).
    pub raw: Featureset,
    /// XSAVE components 2..=63 the host reports.
    pub xstate: Vec<XstateComponent>,
    /// Deterministic cache parameters (CPUID.4 on Intel), one per subleaf.
    pub cache_leaf4: Vec<[u32; 4]>,
    /// AMD L1/L2/L3 descriptors: 0x8000_0005.ECX, .EDX, 0x8000_0006.ECX, .EDX.
    pub cache_ext: [u32; 4],
    /// Features the CPU reports but that a check of the instruction found faulty,
    /// each with what was found ([`HostCpu::mark_faulty`]). Empty from
    /// [`HostCpu::from_records`]: records cannot show a fault.
    pub faults: Vec<(Feature, String)>,
}

/// A lookup of one record in a sorted slice.
fn find(records: &[CpuidRecord], leaf: u32, subleaf: u32) -> Option<[u32; 4]> {
    records
        .binary_search_by_key(&(leaf, subleaf), |r| (r.leaf, r.subleaf))
        .ok()
        .and_then(|i| records.get(i))
        .map(|r| r.regs)
}

/// Compute the raw featureset from a CPUID oracle (`None` = leaf not reported).
/// Leaves beyond the reported maximum read as zero.
pub fn raw_featureset(get: impl Fn(u32, u32) -> Option<[u32; 4]>) -> Featureset {
    let basic_max = get(0, 0).map_or(0, |r| r[0]);
    let ext_max = get(0x8000_0000, 0).map_or(0, |r| r[0]);
    let sub7_max = if basic_max >= 7 { get(7, 0).map_or(0, |r| r[0]) } else { 0 };
    let mut fs = Featureset::new();
    for (i, w) in WORDS.iter().enumerate() {
        let in_range =
            if w.leaf >= 0x8000_0000 { ext_max >= 0x8000_0000 && w.leaf <= ext_max } else { w.leaf <= basic_max };
        let sub_ok = w.leaf != 7 || w.subleaf.unwrap_or(0) <= sub7_max;
        if !in_range || !sub_ok {
            continue;
        }
        let Some(regs) = get(w.leaf, w.subleaf.unwrap_or(0)) else { continue };
        let mut v = w.reg.get(&regs);
        if i == word::E1_EDX {
            v &= !COMMON_1D;
        }
        fs.set_word(i, v);
    }
    debug_assert!(fs.words().len() <= NWORDS);
    fs
}

impl HostCpu {
    /// Interpret a set of records (sorted by (leaf, subleaf), as [`crate::dump`] produces).
    pub fn from_records(records: &[CpuidRecord]) -> Result<HostCpu, HostError> {
        let mut sorted;
        let records = if records.windows(2).all(|p| matches!(p, [a, b] if (a.leaf, a.subleaf) < (b.leaf, b.subleaf))) {
            records
        } else {
            sorted = records.to_vec();
            sorted.sort_by_key(|r| (r.leaf, r.subleaf));
            sorted.dedup_by_key(|r| (r.leaf, r.subleaf));
            &sorted
        };
        let get = |leaf, sub| find(records, leaf, sub);
        let l0 = get(0, 0).ok_or(HostError::NoLeaf0)?;
        let basic_max = l0[0];
        let regs = [l0[1], l0[3], l0[2]];
        let Some(vendor) = Vendor::ALL.into_iter().find(|v| v.regs() == regs) else {
            let bytes: Vec<u8> = regs.iter().flat_map(|w| w.to_le_bytes()).collect();
            return Err(HostError::UnsupportedVendor(String::from_utf8_lossy(&bytes).into_owned()));
        };
        if basic_max < 1 {
            return Err(HostError::NoLeaf1);
        }
        let l1 = get(1, 0).ok_or(HostError::NoLeaf1)?;
        let ext_max = get(0x8000_0000, 0).map_or(0, |r| r[0]);
        let ext_max = if ext_max >= 0x8000_0000 { ext_max } else { 0 };
        let ext = |leaf: u32| if ext_max >= leaf { get(leaf, 0) } else { None };
        let mut brand = [0u32; 12];
        for (k, leaf) in [0x8000_0002u32, 0x8000_0003, 0x8000_0004].into_iter().enumerate() {
            if let Some(r) = ext(leaf) {
                for (j, v) in r.into_iter().enumerate() {
                    if let Some(slot) = brand.get_mut(k * 4 + j) {
                        *slot = v;
                    }
                }
            }
        }
        let (phys_bits, virt_bits) =
            ext(0x8000_0008).map_or((36, 48), |r| ((r[0] & 0xff) as u8, ((r[0] >> 8) & 0xff) as u8));
        let xstate = if basic_max >= 0xd {
            records
                .iter()
                .filter(|r| r.leaf == 0xd && (2..64).contains(&r.subleaf) && r.regs[0] != 0)
                .map(|r| XstateComponent {
                    index: r.subleaf as u8,
                    size: r.regs[0],
                    offset: r.regs[1],
                    flags: r.regs[2] & 3,
                })
                .collect()
        } else {
            Vec::new()
        };
        let cache_leaf4 = if basic_max >= 4 && vendor == Vendor::Intel {
            records.iter().filter(|r| r.leaf == 4 && r.regs[0] & 0x1f != 0).map(|r| r.regs).collect()
        } else {
            Vec::new()
        };
        let e5 = ext(0x8000_0005).unwrap_or([0; 4]);
        let e6 = ext(0x8000_0006).unwrap_or([0; 4]);
        Ok(HostCpu {
            vendor,
            signature: l1[0],
            leaf1_ebx: l1[1],
            basic_max,
            ext_max,
            brand,
            phys_bits,
            virt_bits,
            raw: raw_featureset(get),
            xstate,
            cache_leaf4,
            cache_ext: [e5[2], e5[3], e6[2], e6[3]],
            faults: Vec::new(),
        })
    }

    /// Record that `f`, which this host reports, was found not to work as specified
    /// (`why` says what was seen). [`HostCpu::max`] then leaves it and what requires it
    /// out, with [`DropReason::HostFault`], so no policy verified here can offer it.
    pub fn mark_faulty(&mut self, f: Feature, why: String) {
        if !self.faults.iter().any(|(g, _)| *g == f) {
            self.faults.push((f, why));
        }
    }

    /// Display family (SDM Vol. 2A, CPUID.1:EAX: base family + extended family if base is 0xF).
    pub fn family(&self) -> u32 {
        signature_family(self.signature)
    }
    /// Display model.
    pub fn model(&self) -> u32 {
        signature_model(self.signature)
    }
    /// Stepping.
    pub fn stepping(&self) -> u32 {
        self.signature & 0xf
    }
    /// The brand string, trimmed.
    pub fn brand_string(&self) -> String {
        brand_string(&self.brand)
    }
    /// What the hypervisor can control on this host.
    pub fn levelling_caps(&self) -> LevellingCaps {
        guest::levelling_caps(&self.raw)
    }
    /// Why this host cannot run guests at all, if it cannot: no long mode first, then
    /// no VMX/SVM.
    pub fn cannot_run_guests(&self) -> Option<Unfit> {
        if !LM.is_in(&self.raw) {
            Some(Unfit::NoLongMode)
        } else if !VMX.is_in(&self.raw) && !SVM.is_in(&self.raw) {
            Some(Unfit::NoVirtualization)
        } else {
            None
        }
    }
    /// The guest `max` featureset with what it dropped: [`guest::guest_max_on`] over
    /// this host's features, maximum leaf and XSAVE layout (so only what the host fully
    /// describes is offered, and `max` verifies here), less the features marked
    /// faulty ([`HostCpu::mark_faulty`]) and what requires them; or the empty set, every host bit
    /// dropped with [`DropReason::HostCannotRunGuests`], on a host that cannot run guests.
    pub fn max(&self) -> Derived {
        match self.cannot_run_guests() {
            Some(why) => Derived {
                set: Featureset::new(),
                dropped: self
                    .raw
                    .bits()
                    .map(|(w, b)| (Feature::new(w, b), DropReason::HostCannotRunGuests(why)))
                    .collect(),
            },
            None => {
                let mut d = guest::guest_max_on(&self.raw, self.basic_max, &self.xstate);
                for (f, why) in &self.faults {
                    if f.is_in(&d.set) {
                        d.set.set_bit(f.word(), f.bit(), false);
                        d.dropped.push((*f, DropReason::HostFault(why.clone())));
                    }
                }
                guest::close_over_dependencies(&mut d.set, &mut d.dropped, DropReason::MissingDependency);
                d
            }
        }
    }
    /// The guest `default` featureset with what it dropped from `max`.
    pub fn default_set(&self) -> Derived {
        guest::guest_default(&self.max().set)
    }
    /// The XSAVE component `i`, if reported.
    pub fn xstate_component(&self, i: u8) -> Option<&XstateComponent> {
        self.xstate.iter().find(|c| c.index == i)
    }
}

/// Display family of a CPUID.1:EAX signature.
pub fn signature_family(sig: u32) -> u32 {
    let base = (sig >> 8) & 0xf;
    if base == 0xf { base + ((sig >> 20) & 0xff) } else { base }
}

/// Display model of a CPUID.1:EAX signature.
pub fn signature_model(sig: u32) -> u32 {
    let base = (sig >> 4) & 0xf;
    let fam = (sig >> 8) & 0xf;
    if fam == 0x6 || fam == 0xf { base | (((sig >> 16) & 0xf) << 4) } else { base }
}

/// Encode family/model/stepping as a CPUID.1:EAX signature.
pub fn make_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let (base_fam, ext_fam) = if family >= 0xf { (0xf, (family - 0xf) & 0xff) } else { (family & 0xf, 0) };
    (ext_fam << 20) | (((model >> 4) & 0xf) << 16) | (base_fam << 8) | ((model & 0xf) << 4) | (stepping & 0xf)
}

/// A brand string from the 12 registers of 0x8000_0002..=4.
pub fn brand_string(regs: &[u32; 12]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|w| w.to_le_bytes()).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).trim().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trip() {
        // EPYC Genoa: family 0x19, model 0x11, stepping 1 -> 0x00a10f11
        assert_eq!(make_signature(0x19, 0x11, 1), 0x00a1_0f11);
        assert_eq!(signature_family(0x00a1_0f11), 0x19);
        assert_eq!(signature_model(0x00a1_0f11), 0x11);
        // Sapphire Rapids: family 6 model 0x8f stepping 8 -> 0x000806f8
        assert_eq!(make_signature(6, 0x8f, 8), 0x0008_06f8);
        assert_eq!(signature_model(0x0008_06f8), 0x8f);
    }

    #[test]
    fn vendor_strings() {
        let b: Vec<u8> = Vendor::Amd.regs().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&b, b"AuthenticAMD");
        let b: Vec<u8> = Vendor::Intel.regs().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&b, b"GenuineIntel");
    }
}
