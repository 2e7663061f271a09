//! The CPUID exit-path lookup: a verified [`Policy`] flattened into per-leaf arrays
//! so that `(leaf, subleaf)` is answered in O(1), plus the per-vCPU dynamic fields
//! (APIC ID, OSXSAVE, OSPKE, APIC enable, XSAVE sizes for the current XCR0/XSS).
//!
//! Leaves the policy does not cover return zeros, never the host's raw values.
//! Hypervisor leaves (0x4000_0000..) are not part of a policy; the core answers
//! them itself if it wants to.

use crate::features::*;
use crate::featureset::word;
use crate::host::HostCpu;
use crate::policy::{Policy, Rejection, XSAVE_LEGACY_AND_HEADER, xstate_mask};
use alloc::vec;
use alloc::vec::Vec;

/// The answers for one leaf.
#[derive(Clone, Debug, Default)]
struct Leaf {
    /// Whether ECX selects a subleaf. If not, every ECX gets `subs[0]`.
    indexed: bool,
    subs: Vec<[u32; 4]>,
}

/// Per-vCPU state that CPUID results depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// The vCPU's (x2)APIC ID.
    pub apic_id: u32,
    /// CR4.OSXSAVE.
    pub cr4_osxsave: bool,
    /// CR4.PKE.
    pub cr4_pke: bool,
    /// IA32_APIC_BASE.EN (the APIC is globally enabled).
    pub apic_enabled: bool,
    /// Current XCR0.
    pub xcr0: u64,
    /// Current IA32_XSS.
    pub xss: u64,
}

/// A verified policy, flattened for O(1) lookups.
#[derive(Clone, Debug)]
pub struct CpuidTable {
    basic: Vec<Leaf>,
    ext: Vec<Leaf>,
    /// `(index, offset + size)` of user XSAVE components (standard format).
    user_xstate_ends: Vec<(u8, u32)>,
    /// `(index, size, 64-byte aligned)` of all components (compacted format).
    compact: Vec<(u8, u32, bool)>,
    has_xsave: bool,
    has_pku: bool,
    has_apic: bool,
}

/// Bits of the ID space needed for `n` cores: ceil(log2(n)).
fn id_width(n: u32) -> u32 {
    if n <= 1 { 0 } else { 32 - (n - 1).leading_zeros() }
}

impl CpuidTable {
    /// Verify `policy` against `host` and build the lookup table. Rejected policies
    /// never produce a table.
    pub fn build(policy: &Policy, host: &HostCpu) -> Result<CpuidTable, Rejection> {
        policy.verify(host)?;
        Ok(Self::from_verified(policy))
    }

    /// Build from a policy that has already been verified (e.g. received after a
    /// successful verify on this host). Never panics, whatever the policy.
    pub fn from_verified(p: &Policy) -> CpuidTable {
        let fs = &p.features;
        // AMD and Hygon share AMD's CPUID layout (APM Vol. 3 Appendix E).
        let amd = p.vendor.is_amd_compatible();
        let v = p.vendor.regs(); // [ebx, edx, ecx]
        let width = id_width(p.vcpus);
        let ids = (1u32 << width.min(31)).max(1);
        let mask = xstate_mask(fs);
        let one = |r: [u32; 4]| Leaf { indexed: false, subs: vec![r] };

        let mut basic = vec![Leaf::default(); (p.basic_max.min(crate::policy::POLICY_BASIC_MAX) + 1) as usize];
        let set = |t: &mut Vec<Leaf>, i: u32, l: Leaf| {
            if let Some(slot) = t.get_mut(i as usize) {
                *slot = l;
            }
        };
        // 0: max leaf and vendor.
        set(&mut basic, 0x0, one([p.basic_max, v[0], v[2], v[1]]));
        // 1: signature; EBX = CLFLUSH size | addressable logical IDs (APIC ID is dynamic).
        set(
            &mut basic,
            0x1,
            one([
                p.signature,
                (u32::from(p.clflush_size) << 8) | (ids.min(255) << 16),
                fs.word(word::L1_ECX) & !(1 << OSXSAVE.bit()),
                fs.word(word::L1_EDX),
            ]),
        );
        // 2: Intel: "no descriptors, use leaf 4" (SDM Vol. 2A Table 3-12, descriptor 0xFF).
        if !amd {
            set(&mut basic, 0x2, one([0x0000_ff01, 0, 0, 0]));
        }
        // 4: Intel deterministic cache parameters, sharing rewritten for 1 package × vcpus cores.
        if !amd && !p.cache_leaf4.is_empty() {
            let subs = p
                .cache_leaf4
                .iter()
                .map(|r| {
                    let level = (r[0] >> 5) & 7;
                    let share = if level >= 3 { ids - 1 } else { 0 };
                    [(r[0] & 0x3fff) | (share.min(0xfff) << 14) | ((ids - 1).min(63) << 26), r[1], r[2], r[3]]
                })
                .collect();
            set(&mut basic, 0x4, Leaf { indexed: true, subs });
        }
        // 6: thermal/power words.
        set(&mut basic, 0x6, one([fs.word(word::L6_EAX), 0, fs.word(word::L6_ECX), 0]));
        // 7: structured extended features, subleaves 0..=max.
        let sub7_max = if fs.word(word::L7_2_EDX) != 0 {
            2
        } else if fs.word(word::L7_1_EAX) != 0 {
            1
        } else {
            0
        };
        let mut l7 = vec![[
            sub7_max,
            fs.word(word::L7_0_EBX),
            fs.word(word::L7_0_ECX) & !(1 << OSPKE.bit()),
            fs.word(word::L7_0_EDX),
        ]];
        if sub7_max >= 1 {
            l7.push([fs.word(word::L7_1_EAX), 0, 0, 0]);
        }
        if sub7_max >= 2 {
            l7.push([0, 0, 0, fs.word(word::L7_2_EDX)]);
        }
        set(&mut basic, 0x7, Leaf { indexed: true, subs: l7 });
        // 0xA: architectural PMU words.
        set(&mut basic, 0xa, one([fs.word(word::LA_EAX), fs.word(word::LA_EBX), 0, 0]));
        // 0xB: extended topology: SMT level (1 thread), core level (vcpus), invalid.
        set(
            &mut basic,
            0xb,
            Leaf { indexed: true, subs: vec![[0, 1, 0x100, 0], [width, p.vcpus & 0xffff, 0x201, 0], [0, 0, 2, 0]] },
        );
        // 0xD: XSAVE.
        let mut user_xstate_ends = Vec::new();
        let mut compact = Vec::new();
        if mask != 0 {
            let xss_mask = p.xstate.iter().filter(|c| c.flags & 1 != 0).fold(0u64, |m, c| m | (1u64 << (c.index & 63)));
            let xcr0_mask = mask & !xss_mask;
            let mut max_size = XSAVE_LEGACY_AND_HEADER;
            let mut subs = vec![[0u32; 4]; 64];
            for c in &p.xstate {
                if c.flags & 1 == 0 {
                    let end = c.offset.saturating_add(c.size);
                    max_size = max_size.max(end);
                    user_xstate_ends.push((c.index, end));
                }
                compact.push((c.index, c.size, c.flags & 2 != 0));
                if let Some(s) = subs.get_mut(usize::from(c.index)) {
                    *s = [c.size, c.offset, c.flags, 0];
                }
            }
            compact.sort_by_key(|c| c.0);
            if let Some(s) = subs.get_mut(0) {
                *s = [xcr0_mask as u32, XSAVE_LEGACY_AND_HEADER, max_size, (xcr0_mask >> 32) as u32];
            }
            if let Some(s) = subs.get_mut(1) {
                *s = [fs.word(word::D1_EAX), XSAVE_LEGACY_AND_HEADER, xss_mask as u32, (xss_mask >> 32) as u32];
            }
            let last = subs.iter().rposition(|s| *s != [0; 4]).map_or(0, |i| i + 1);
            subs.truncate(last);
            set(&mut basic, 0xd, Leaf { indexed: true, subs });
        }

        // Extended range.
        let ext_len = if p.ext_max >= 0x8000_0000 {
            (p.ext_max.min(crate::policy::POLICY_EXT_MAX) - 0x8000_0000 + 1) as usize
        } else {
            0
        };
        let mut ext = vec![Leaf::default(); ext_len];
        let e = |l: u32| l - 0x8000_0000;
        set(&mut ext, e(0x8000_0000), one(if amd { [p.ext_max, v[0], v[2], v[1]] } else { [p.ext_max, 0, 0, 0] }));
        let e1d = fs.word(word::E1_EDX) | if amd { fs.word(word::L1_EDX) & COMMON_1D } else { 0 };
        set(&mut ext, e(0x8000_0001), one([if amd { p.signature } else { 0 }, 0, fs.word(word::E1_ECX), e1d]));
        for k in 0..3u32 {
            let b = |j: u32| p.brand.get((k * 4 + j) as usize).copied().unwrap_or(0);
            set(&mut ext, e(0x8000_0002 + k), one([b(0), b(1), b(2), b(3)]));
        }
        if amd {
            set(&mut ext, e(0x8000_0005), one([0, 0, p.cache_ext[0], p.cache_ext[1]]));
        }
        set(&mut ext, e(0x8000_0006), one([0, 0, p.cache_ext[2], p.cache_ext[3]]));
        set(&mut ext, e(0x8000_0007), one([0, 0, 0, fs.word(word::E7_EDX)]));
        let e8_ecx = if amd { (p.vcpus.saturating_sub(1).min(255)) | (width.min(15) << 12) } else { 0 };
        set(
            &mut ext,
            e(0x8000_0008),
            one([u32::from(p.phys_bits) | (u32::from(p.virt_bits) << 8), fs.word(word::E8_EBX), e8_ecx, 0]),
        );
        set(&mut ext, e(0x8000_0021), one([fs.word(word::E21_EAX), 0, 0, 0]));

        CpuidTable {
            basic,
            ext,
            user_xstate_ends,
            compact,
            has_xsave: XSAVE.is_in(fs),
            has_pku: PKU.is_in(fs),
            has_apic: APIC.is_in(fs),
        }
    }

    /// The static answer for `(leaf, subleaf)`: O(1), zeros for anything not covered.
    #[inline]
    pub fn lookup(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let l = if leaf >= 0x8000_0000 {
            self.ext.get((leaf - 0x8000_0000) as usize)
        } else {
            self.basic.get(leaf as usize)
        };
        match l {
            Some(l) if l.indexed => l.subs.get(subleaf as usize).copied().unwrap_or([0; 4]),
            Some(l) => l.subs.first().copied().unwrap_or([0; 4]),
            None => [0; 4],
        }
    }

    /// The answer a vCPU in state `vcpu` gets: [`CpuidTable::lookup`] plus the dynamic
    /// fields. O(1) (the XSAVE size sums run over at most 64 components).
    pub fn lookup_vcpu(&self, leaf: u32, subleaf: u32, vcpu: &VcpuState) -> [u32; 4] {
        let mut r = self.lookup(leaf, subleaf);
        match (leaf, subleaf) {
            (0x1, _) if r != [0; 4] => {
                r[1] = (r[1] & 0x00ff_ffff) | ((vcpu.apic_id & 0xff) << 24);
                if self.has_xsave && vcpu.cr4_osxsave {
                    r[2] |= 1 << OSXSAVE.bit();
                }
                if self.has_apic && !vcpu.apic_enabled {
                    r[3] &= !(1 << APIC.bit());
                }
            }
            (0x7, 0) if self.has_pku && vcpu.cr4_pke => r[2] |= 1 << OSPKE.bit(),
            (0xb, _) if r != [0; 4] => r[3] = vcpu.apic_id,
            (0xd, 0) if r != [0; 4] => r[1] = self.standard_size(vcpu.xcr0),
            (0xd, 1) if r != [0; 4] => r[1] = self.compacted_size(vcpu.xcr0 | vcpu.xss),
            _ => {}
        }
        r
    }

    /// XSAVE standard-format size for `xcr0` (SDM Vol. 1 13.4.1).
    pub fn standard_size(&self, xcr0: u64) -> u32 {
        self.user_xstate_ends
            .iter()
            .filter(|(i, _)| xcr0 & (1u64 << (i & 63)) != 0)
            .fold(XSAVE_LEGACY_AND_HEADER, |m, (_, end)| m.max(*end))
    }

    /// XSAVE compacted-format size for `xcr0 | xss` (SDM Vol. 1 13.4.3).
    pub fn compacted_size(&self, mask: u64) -> u32 {
        self.compact.iter().filter(|(i, _, _)| mask & (1u64 << (i & 63)) != 0).fold(
            XSAVE_LEGACY_AND_HEADER,
            |off, (_, size, align)| {
                let off = if *align { off.saturating_add(63) & !63 } else { off };
                off.saturating_add(*size)
            },
        )
    }
}
