//! What RDT/PQoS monitoring this CPU offers, decoded from raw CPUID values.
//!
//! The core executes CPUID (it is the only party that can) and hands the values over,
//! either as a closure in host tests and at task start-up, or later by message; this
//! module only decodes them into [`MonitorCaps`]: present with the RMID count, the
//! upscaling factor, the MBM counter width, the supported events and the L3 size, or
//! absent with a reason that names the CPUID field that says so.
//!
//! Not for: executing CPUID, reading MSRs, or deciding which RMID a domain gets
//! ([`crate::rmid`] does that with what is decoded here).
//!
//! Sources:
//! - Intel SDM Vol. 2A, CPUID leaf 07H (EBX\[12\] "PQM") and leaf 0FH ("Intel Resource
//!   Director Technology (Intel RDT) Monitoring Enumeration Sub-leaf"): 0FH.0:EBX is the
//!   highest RMID of any resource type, 0FH.0:EDX\[1\] says L3 monitoring exists;
//!   0FH.1:EAX\[7:0\] is the MBM counter width minus 24, EAX\[8\] the IA32_QM_CTR overflow
//!   bit, EBX the upscaling factor, ECX the highest L3 RMID, EDX\[2:0\] the events.
//! - Intel SDM Vol. 3B 18.18 "Intel Resource Director Technology (Intel RDT) Monitoring
//!   Features" (18.18.3-18.18.5 enumeration).
//! - L3 size: Intel SDM Vol. 2A CPUID leaf 04H "Deterministic Cache Parameters";
//!   AMD APM Vol. 3 Appendix E, CPUID Fn8000_001D (same layout as leaf 04H) and
//!   Fn8000_0006 EDX\[31:18\] (L3 size in 512 KiB units). The brief that started this
//!   module said ECX\[31:18\]; the APM and every recorded AMD dump put the L3 size in EDX
//!   (ECX\[31:16\] is the L2 size in KiB).
//! - AMD PQoS (APM Vol. 2 19.3 "Platform QoS Monitoring") uses the same leaf and MSRs.

use core::fmt;

/// The reason hardware events give on a CPU without RDT monitoring (both emulators).
/// Shown to users as `not available: <reason>`.
pub const NO_RDT_MONITORING: &str = "CPU has no RDT monitoring (CPUID.7.EBX[12]=0)";

/// Base of the MBM counter width: width = 24 + CPUID.(EAX=0FH,ECX=1):EAX\[7:0\] (SDM Vol. 2A leaf 0FH).
pub const MBM_WIDTH_BASE: u32 = 24;

/// IA32_QM_CTR has 62 data bits (61:0; SDM Vol. 3B 18.18.7). A wider reported MBM
/// counter cannot be read, so the width is clamped to this.
pub const QM_CTR_DATA_BITS: u32 = 62;

/// What the administrator configured for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// At most this many RMIDs (not counting the reserved RMID 0) are used; `None` is no cap.
    pub rmid_cap: Option<u32>,
    /// A freed RMID leaves limbo once its occupancy on every socket is below this many
    /// bytes; `None` is the default, L3 size / number of hardware RMIDs (as Linux resctrl).
    pub limbo_threshold_bytes: Option<u64>,
}

/// Which CPUID leaf gave the L3 size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3Source {
    /// Intel leaf 04H, deterministic cache parameters.
    Leaf4,
    /// AMD Fn8000_001D, cache topology (leaf 04H layout).
    Amd8000001D,
    /// AMD Fn8000_0006 EDX\[31:18\].
    Amd80000006,
}

/// Monitoring as this CPU offers it (SDM Vol. 2A CPUID leaf 0FH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdtCaps {
    /// 0FH.0:EBX: highest RMID of any resource type.
    pub max_rmid_any: u32,
    /// 0FH.1:ECX: highest RMID for L3 monitoring.
    pub max_rmid_l3: u32,
    /// RMIDs this hypervisor hands out (1..=usable_rmids): min(max_rmid_any,
    /// max_rmid_l3, configured cap). RMID 0 means "not monitored" and is never handed out.
    pub usable_rmids: u32,
    /// 0FH.1:EBX: IA32_QM_CTR units to bytes.
    pub upscaling_factor: u32,
    /// 24 + 0FH.1:EAX\[7:0\], clamped to [`QM_CTR_DATA_BITS`]: width of the MBM counters.
    pub mbm_width: u32,
    /// The width as reported, before clamping (for diagnostics).
    pub mbm_width_reported: u32,
    /// 0FH.1:EAX\[8\]: IA32_QM_CTR bit 61 is an overflow bit, not data.
    pub overflow_bit: bool,
    /// 0FH.1:EDX\[0\]: L3 occupancy event.
    pub llc_occupancy: bool,
    /// 0FH.1:EDX\[1\]: L3 total external bandwidth event.
    pub mbm_total: bool,
    /// 0FH.1:EDX\[2\]: L3 local external bandwidth event.
    pub mbm_local: bool,
    /// Size of one L3 (one monitoring domain: a socket on Intel, a CCX on AMD), in bytes.
    pub l3_bytes: u64,
    /// Where `l3_bytes` came from.
    pub l3_source: L3Source,
    /// The limbo threshold in bytes (configured, or L3 size / (max RMID + 1)).
    pub limbo_threshold_bytes: u64,
}

/// Monitoring capability: present, or absent with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorCaps {
    /// The CPU can monitor; RMIDs can be handed out.
    Present(RdtCaps),
    /// No hardware monitoring; hardware events report `not available: {reason}`.
    Absent {
        /// Which CPUID field (or configuration) says so, as a phrase.
        reason: &'static str,
    },
}

/// A hardware event's availability on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAvailable {
    /// Why, as a phrase (displayed as `not available: {reason}`).
    pub reason: &'static str,
}

impl fmt::Display for NotAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not available: {}", self.reason)
    }
}

const fn bit(v: u32, n: u32) -> bool {
    (v >> n) & 1 == 1
}

impl MonitorCaps {
    /// Decode from CPUID: `cpuid(leaf, subleaf)` returns `[eax, ebx, ecx, edx]`. Only the
    /// leaves this module needs are asked for, and only below the maximum leaf.
    pub fn from_cpuid(mut cpuid: impl FnMut(u32, u32) -> [u32; 4], config: &MonitorConfig) -> Self {
        let [max_basic, ..] = cpuid(0, 0);
        // A CPU whose highest basic leaf is below 7 has no leaf 7, so no PQM bit: the
        // same answer as PQM=0.
        if max_basic < 7 || !bit(cpuid(7, 0)[1], 12) {
            return Self::Absent { reason: NO_RDT_MONITORING };
        }
        if max_basic < 0xf {
            return Self::Absent {
                reason: "CPUID.7.EBX[12] (PQM) is set but the highest basic CPUID leaf is below 0xF",
            };
        }
        let [_, max_rmid_any, _, sub0_edx] = cpuid(0xf, 0);
        if !bit(sub0_edx, 1) {
            return Self::Absent { reason: "CPU has no L3 monitoring (CPUID.(EAX=0xF,ECX=0):EDX[1]=0)" };
        }
        let [eax1, factor, max_rmid_l3, edx1] = cpuid(0xf, 1);
        if edx1 & 0b111 == 0 {
            return Self::Absent { reason: "CPU reports no L3 monitoring event (CPUID.(EAX=0xF,ECX=1):EDX[2:0]=0)" };
        }
        let hw_max = max_rmid_any.min(max_rmid_l3);
        if hw_max == 0 {
            return Self::Absent { reason: "CPU reports no RMID besides the reserved RMID 0 (CPUID.0xF max RMID = 0)" };
        }
        let usable = match config.rmid_cap {
            Some(0) => return Self::Absent { reason: "monitoring is disabled by configuration (RMID cap 0)" },
            Some(cap) => hw_max.min(cap),
            None => hw_max,
        };
        if factor == 0 {
            return Self::Absent { reason: "CPU reports an upscaling factor of 0 (CPUID.(EAX=0xF,ECX=1):EBX=0)" };
        }
        let Some((l3_bytes, l3_source)) = l3_size(&mut cpuid, max_basic) else {
            return Self::Absent {
                reason: "CPUID reports no L3 size (leaf 4, 0x8000001D, 0x80000006), so the limbo threshold cannot be derived; configure it",
            };
        };
        let mbm_width_reported = MBM_WIDTH_BASE.saturating_add(eax1 & 0xff);
        let overflow_bit = bit(eax1, 8);
        let data_bits = if overflow_bit { QM_CTR_DATA_BITS - 1 } else { QM_CTR_DATA_BITS };
        // Linux resctrl: threshold = L3 size / number of hardware RMIDs (RMID 0 included).
        let default_threshold = l3_bytes / u64::from(hw_max).saturating_add(1);
        Self::Present(RdtCaps {
            max_rmid_any,
            max_rmid_l3,
            usable_rmids: usable,
            upscaling_factor: factor,
            mbm_width: mbm_width_reported.min(data_bits),
            mbm_width_reported,
            overflow_bit,
            llc_occupancy: bit(edx1, 0),
            mbm_total: bit(edx1, 1),
            mbm_local: bit(edx1, 2),
            l3_bytes,
            l3_source,
            limbo_threshold_bytes: config.limbo_threshold_bytes.unwrap_or(default_threshold),
        })
    }

    /// The capabilities, or why there are none.
    pub fn rdt(&self) -> Result<&RdtCaps, NotAvailable> {
        match self {
            Self::Present(caps) => Ok(caps),
            Self::Absent { reason } => Err(NotAvailable { reason }),
        }
    }
}

/// Size in bytes of a leaf-04H-style cache descriptor `[eax, ebx, ecx, _]` if it is a
/// level-3 data or unified cache: (ways+1) * (partitions+1) * (line size+1) * (sets+1).
fn deterministic_l3(regs: [u32; 4]) -> Option<u64> {
    let [eax, ebx, ecx, _] = regs;
    let cache_type = eax & 0x1f; // 1 data, 2 instruction, 3 unified
    let level = (eax >> 5) & 0x7;
    if level != 3 || !(cache_type == 1 || cache_type == 3) {
        return None;
    }
    let ways = u64::from(ebx >> 22) + 1;
    let partitions = u64::from((ebx >> 12) & 0x3ff) + 1;
    let line = u64::from(ebx & 0xfff) + 1;
    let sets = u64::from(ecx) + 1;
    // Saturating: garbage CPUID values must not overflow (the real product fits easily).
    Some(ways.saturating_mul(partitions).saturating_mul(line).saturating_mul(sets))
}

/// Walk a leaf-04H-style leaf's sub-leaves until type 0 (no more caches), at most 16.
fn walk_deterministic(cpuid: &mut impl FnMut(u32, u32) -> [u32; 4], leaf: u32) -> Option<u64> {
    for sub in 0..16 {
        let regs = cpuid(leaf, sub);
        if regs[0] & 0x1f == 0 {
            return None;
        }
        if let Some(size) = deterministic_l3(regs) {
            return Some(size);
        }
    }
    None
}

fn l3_size(cpuid: &mut impl FnMut(u32, u32) -> [u32; 4], max_basic: u32) -> Option<(u64, L3Source)> {
    if max_basic >= 4
        && let Some(size) = walk_deterministic(cpuid, 4)
    {
        return Some((size, L3Source::Leaf4));
    }
    let [max_ext, ..] = cpuid(0x8000_0000, 0);
    if max_ext >= 0x8000_001d
        && let Some(size) = walk_deterministic(cpuid, 0x8000_001d)
    {
        return Some((size, L3Source::Amd8000001D));
    }
    if max_ext >= 0x8000_0006 {
        let units = u64::from(cpuid(0x8000_0006, 0)[3] >> 18);
        if units != 0 {
            return Some((units * 512 * 1024, L3Source::Amd80000006));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID table; absent leaves read as zeros.
    fn table(entries: &[(u32, u32, [u32; 4])]) -> impl FnMut(u32, u32) -> [u32; 4] + '_ {
        move |leaf, sub| entries.iter().find(|(l, s, _)| *l == leaf && *s == sub).map_or([0; 4], |(_, _, r)| *r)
    }

    const L3_LEAF4: (u32, u32, [u32; 4]) = (4, 0, [0x163, 0x0380_003f, 0x0001_bfff, 0]); // 15 ways, 64 B, 114688 sets

    fn rdt_cpu(sub1: [u32; 4]) -> [(u32, u32, [u32; 4]); 5] {
        [(0, 0, [0x20, 0, 0, 0]), (7, 0, [0, 1 << 12, 0, 0]), (0xf, 0, [0, 0xef, 0, 2]), (0xf, 1, sub1), L3_LEAF4]
    }

    #[test]
    fn pqm_clear_is_absent_with_the_exact_reason() {
        let t = [(0, 0, [0x20, 0, 0, 0]), (7, 0, [0, !(1u32 << 12), 0, 0])];
        let caps = MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default());
        assert_eq!(caps, MonitorCaps::Absent { reason: NO_RDT_MONITORING });
        let shown = caps.rdt().err().map(|e| alloc::format!("{e}")).unwrap_or_default();
        assert_eq!(shown, "not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)");
    }

    #[test]
    fn max_leaf_below_7_is_the_same_as_pqm_clear() {
        // Leaf 7 would answer PQM=1 if asked, but the max leaf says it does not exist.
        let t = [(0, 0, [6, 0, 0, 0]), (7, 0, [0, 1 << 12, 0, 0])];
        assert_eq!(
            MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default()),
            MonitorCaps::Absent { reason: NO_RDT_MONITORING }
        );
    }

    #[test]
    fn usable_count_is_the_minimum_of_both_leaves_and_the_cap() {
        let t = rdt_cpu([0x01, 0x1_0000, 0x7f, 7]);
        let caps = MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default());
        let rdt = caps.rdt().ok().copied();
        assert_eq!(rdt.map(|r| r.usable_rmids), Some(0x7f)); // min(0xef, 0x7f)
        assert_eq!(rdt.map(|r| (r.mbm_width, r.upscaling_factor)), Some((25, 0x1_0000)));
        let capped = MonitorCaps::from_cpuid(table(&t), &MonitorConfig { rmid_cap: Some(8), ..Default::default() });
        assert_eq!(capped.rdt().ok().map(|r| r.usable_rmids), Some(8));
        let off = MonitorCaps::from_cpuid(table(&t), &MonitorConfig { rmid_cap: Some(0), ..Default::default() });
        assert!(matches!(off, MonitorCaps::Absent { reason } if reason.contains("RMID cap 0")));
    }

    #[test]
    fn l3_size_and_default_threshold_from_leaf_4() {
        let t = rdt_cpu([0, 0x1_0000, 0xef, 7]);
        let caps = MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default());
        let rdt = caps.rdt().ok().copied();
        assert_eq!(rdt.map(|r| (r.l3_bytes, r.l3_source)), Some((105 * 1024 * 1024, L3Source::Leaf4)));
        // 105 MiB over 0xef + 1 = 240 hardware RMIDs.
        assert_eq!(rdt.map(|r| r.limbo_threshold_bytes), Some(105 * 1024 * 1024 / 240));
        let set = MonitorCaps::from_cpuid(
            table(&t),
            &MonitorConfig { limbo_threshold_bytes: Some(4096), ..Default::default() },
        );
        assert_eq!(set.rdt().ok().map(|r| r.limbo_threshold_bytes), Some(4096));
    }

    #[test]
    fn counter_width_is_clamped_to_the_ctr_data_bits() {
        let t = rdt_cpu([0xff, 1, 0xef, 7]);
        let rdt = MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default()).rdt().ok().copied();
        assert_eq!(rdt.map(|r| (r.mbm_width_reported, r.mbm_width)), Some((24 + 255, 62)));
        let t = rdt_cpu([0x1ff, 1, 0xef, 7]);
        let rdt = MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default()).rdt().ok().copied();
        assert_eq!(rdt.map(|r| (r.overflow_bit, r.mbm_width)), Some((true, 61)));
    }

    #[test]
    fn amd_l3_from_8000001d_then_80000006_edx() {
        let base = [
            (0, 0, [0x10, 0, 0, 0]),
            (7, 0, [0, 1 << 12, 0, 0]),
            (0xf, 0, [0, 0xff, 0, 2]),
            (0xf, 1, [0, 0x40, 0xff, 7]),
        ];
        let mut with_1d = base.to_vec();
        with_1d.push((0x8000_0000, 0, [0x8000_0021, 0, 0, 0]));
        with_1d.push((0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]));
        with_1d.push((0x8000_001d, 1, [0x163, 0x03c0_003f, 0x1fff, 0])); // 16 ways * 64 B * 8192 sets
        let rdt = MonitorCaps::from_cpuid(table(&with_1d), &MonitorConfig::default()).rdt().ok().copied();
        assert_eq!(rdt.map(|r| (r.l3_bytes, r.l3_source)), Some((8 << 20, L3Source::Amd8000001D)));
        let mut with_06 = base.to_vec();
        with_06.push((0x8000_0000, 0, [0x8000_0008, 0, 0, 0]));
        with_06.push((0x8000_0006, 0, [0, 0, 0x0400_6140, 0x0100_9140])); // EDX[31:18] = 64 * 512 KiB
        let rdt = MonitorCaps::from_cpuid(table(&with_06), &MonitorConfig::default()).rdt().ok().copied();
        assert_eq!(rdt.map(|r| (r.l3_bytes, r.l3_source)), Some((32 << 20, L3Source::Amd80000006)));
        let mut none = base.to_vec();
        none.push((0x8000_0000, 0, [0x8000_0008, 0, 0, 0]));
        assert!(matches!(
            MonitorCaps::from_cpuid(table(&none), &MonitorConfig::default()),
            MonitorCaps::Absent { reason } if reason.contains("no L3 size")
        ));
    }

    #[test]
    fn garbage_cpuid_never_panics() {
        let all_ones = MonitorCaps::from_cpuid(|_, _| [u32::MAX; 4], &MonitorConfig::default());
        assert!(matches!(all_ones, MonitorCaps::Present(r) if r.usable_rmids == u32::MAX && r.mbm_width == 61));
        // Leaf-4 geometry at its maximum: the product saturates instead of overflowing.
        assert_eq!(deterministic_l3([0x63, u32::MAX, u32::MAX, 0]), Some(u64::MAX));
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..2000 {
            let seed = x;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let caps = MonitorCaps::from_cpuid(
                move |leaf, sub| {
                    let h = seed ^ (u64::from(leaf) << 32) ^ u64::from(sub).wrapping_mul(0x9e37_79b9);
                    [h as u32, (h >> 16) as u32, (h >> 32) as u32, (h >> 8) as u32 | (1 << 12) | 0b111]
                },
                &MonitorConfig::default(),
            );
            if let MonitorCaps::Present(r) = caps {
                assert!(r.mbm_width <= QM_CTR_DATA_BITS && r.usable_rmids >= 1);
            }
        }
    }

    #[test]
    fn pqm_without_l3_monitoring_or_events_is_absent() {
        let mut t = rdt_cpu([0, 1, 0xef, 7]);
        t[2] = (0xf, 0, [0, 0xef, 0, 0]);
        assert!(matches!(MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default()),
            MonitorCaps::Absent { reason } if reason.contains("EDX[1]=0")));
        let t = rdt_cpu([0, 1, 0xef, 0]);
        assert!(matches!(MonitorCaps::from_cpuid(table(&t), &MonitorConfig::default()),
            MonitorCaps::Absent { reason } if reason.contains("EDX[2:0]=0")));
    }
}
