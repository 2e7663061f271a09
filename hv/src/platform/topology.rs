//! Which package (socket) a CPU is in, decoded from its own CPUID, and the machine's
//! sockets numbered 0.. ([`SocketMap`]) with, for each, a CPU that can do work there.
//!
//! RDT's RMIDs and IA32_QM_CTR counters belong to an L3 cache, one per package on
//! Intel (SDM Vol. 3B 18.18.1): a counter read on a CPU of the wrong package answers
//! for the wrong cache. So each CPU decodes its package ID at start-up
//! ([`CpuTopology::decode`], on the CPU itself: CPUID describes the CPU that runs it),
//! and the monitoring MSR accesses for socket N go to a CPU of package N
//! (`platform::rdt::SocketMsrs`).
//!
//! Decoding (SDM Vol. 3A 9.9 "Programming Considerations for Hardware Multi-Threading
//! Capable Processors", 9.9.4/9.9.5 "Identifying Topological Relationships in a MP
//! System"; SDM Vol. 2A CPUID leaves 01H, 04H, 0BH, 1FH; AMD APM Vol. 3 E.4.7 and
//! CPUID Fn8000_0008 ECX, APM Vol. 2 16.3 "APIC ID"), first that applies:
//! 1. leaf 0x1F (V2 extended topology), when the maximum leaf reaches it and subleaf 0
//!    reports processors (EBX[15:0] != 0): package ID = x2APIC ID (EDX) >> the shift
//!    (EAX[4:0]) of the last valid level;
//! 2. leaf 0xB, the same way (AMD reports it from Zen on, and QEMU for any model);
//! 3. AMD (and Hygon) Fn8000_0008: ECX[15:12] ApicIdCoreIdSize bits of the initial
//!    APIC ID number the CPUs in the package; when 0, the legacy width
//!    ceil(log2(ECX[7:0] + 1)) (APM Vol. 3, CPUID Fn8000_0008_ECX);
//! 4. Intel legacy: leaf 1 EBX[23:16], the addressable logical processor IDs in the
//!    package when EDX[28] (HTT) is set, widened to leaf 4's addressable core IDs
//!    (EAX[31:26] + 1) if that is wider; package ID = initial APIC ID (leaf 1
//!    EBX[31:24]) >> ceil(log2(count));
//! 5. otherwise (no HTT) one logical processor per package: the package ID is the
//!    initial APIC ID.
//!
//! raw-cpuid reads the vendor and leaves 1, 4 and 0x8000_0008; leaves 0xB/0x1F are
//! decoded here from their registers because raw-cpuid's level iterator panics
//! (`unreachable!`) on a level type it does not know, which a newer CPU may report.
//!
//! Not for: numbering L3 domains below a package (AMD has one L3 per CCX, several per
//! package: not split yet), or the guests' topology (their CPUID comes from levelling).

use alloc::string::String;
use alloc::vec::Vec;

/// Where a CPU's package ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// CPUID leaf 0x1F.
    Leaf1F,
    /// CPUID leaf 0xB.
    LeafB,
    /// AMD CPUID Fn8000_0008 ECX.
    Amd80000008,
    /// CPUID leaf 1 EBX[23:16] (and leaf 4).
    Legacy,
    /// No HTT: one logical processor per package.
    Single,
}

impl Source {
    /// How it reads in the log.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Leaf1F => "CPUID.1F",
            Self::LeafB => "CPUID.0B",
            Self::Amd80000008 => "CPUID.80000008",
            Self::Legacy => "CPUID.1/CPUID.4",
            Self::Single => "CPUID.1 (no HTT)",
        }
    }
}

/// One CPU's place in the machine, as its own CPUID reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// Its APIC ID: the x2APIC ID from leaf 0x1F/0xB, else the initial APIC ID.
    pub apic_id: u32,
    /// Its package (socket) ID: the APIC ID's bits above [`CpuTopology::package_shift`].
    pub package: u32,
    /// How many low APIC ID bits number the logical processors inside the package.
    pub package_shift: u32,
    /// Which leaf said so.
    pub source: Source,
}

/// The smallest `n` with `1 << n >= count` (0 for 0 or 1).
fn ceil_log2(count: u32) -> u32 {
    if count <= 1 { 0 } else { u32::BITS - (count - 1).leading_zeros() }
}

/// `apic_id >> shift`, 0 when the shift takes every bit.
fn above(apic_id: u32, shift: u32) -> u32 {
    apic_id.checked_shr(shift).unwrap_or(0)
}

impl CpuTopology {
    /// Decode with `cpuid(leaf, subleaf) -> [EAX, EBX, ECX, EDX]` of the CPU in question.
    pub fn decode(cpuid: impl Fn(u32, u32) -> [u32; 4] + Clone) -> Self {
        let max_leaf = cpuid(0, 0)[0];
        for (leaf, source) in [(0x1f, Source::Leaf1F), (0xb, Source::LeafB)] {
            if max_leaf >= leaf
                && let Some((apic_id, shift)) = extended_topology(&cpuid, leaf)
            {
                return Self { apic_id, package: above(apic_id, shift), package_shift: shift, source };
            }
        }
        let reader = {
            let cpuid = cpuid.clone();
            move |leaf: u32, sub: u32| {
                let [eax, ebx, ecx, edx] = cpuid(leaf, sub);
                raw_cpuid::CpuIdResult { eax, ebx, ecx, edx }
            }
        };
        let id = raw_cpuid::CpuId::with_cpuid_reader(reader);
        let features = id.get_feature_info();
        // SDM Vol. 2A CPUID 01H: EBX[31:24] initial APIC ID.
        let apic_id = features.as_ref().map_or(0, |f| u32::from(f.initial_local_apic_id()));
        let amd = id.get_vendor_info().is_some_and(|v| matches!(v.as_str(), "AuthenticAMD" | "HygonGenuine"));
        if amd && let Some(capacity) = id.get_processor_capacity_feature_info() {
            // APM Vol. 3 CPUID Fn8000_0008_ECX: ApicIdCoreIdSize, or (when 0) the
            // legacy width from NC + 1 threads.
            let shift = match u32::from(capacity.apic_id_size()) {
                0 => ceil_log2(capacity.num_phys_threads() as u32),
                n => n,
            };
            return Self { apic_id, package: above(apic_id, shift), package_shift: shift, source: Source::Amd80000008 };
        }
        match features {
            Some(f) if f.has_htt() => {
                // SDM Vol. 3A 9.9.4: the package field starts above the bits that
                // number the addressable logical processors of a package.
                let logical = u32::from(f.max_logical_processor_ids());
                let cores = if amd {
                    0
                } else {
                    id.get_cache_parameters()
                        .and_then(|mut caches| caches.next())
                        .map_or(0, |c| c.max_cores_for_package() as u32)
                };
                let shift = ceil_log2(logical.max(cores));
                Self { apic_id, package: above(apic_id, shift), package_shift: shift, source: Source::Legacy }
            }
            _ => Self { apic_id, package: apic_id, package_shift: 0, source: Source::Single },
        }
    }

    /// The CPU this code runs on.
    #[cfg_attr(any(test, fuzzing), allow(dead_code))]
    pub fn this_cpu() -> Self {
        Self::decode(|leaf, sub| crate::platform::hw::HwRead::cpuid(&mut crate::platform::hw::RealHw, leaf, sub))
    }
}

/// Leaf 0x1F or 0xB: (x2APIC ID, package shift), `None` when the leaf reports nothing
/// (SDM Vol. 2A CPUID 0BH: subleaf 0 EBX[15:0] = 0 means the leaf is not supported).
fn extended_topology(cpuid: &impl Fn(u32, u32) -> [u32; 4], leaf: u32) -> Option<(u32, u32)> {
    let [_, ebx0, _, edx0] = cpuid(leaf, 0);
    if ebx0 & 0xffff == 0 {
        return None;
    }
    let mut shift = None;
    // Levels are enumerated from subleaf 0 up to the first with level type (ECX[15:8])
    // 0; the architecture defines at most a handful (SMT, core, module, tile, die).
    for sub in 0..16 {
        let [eax, _, ecx, _] = cpuid(leaf, sub);
        if (ecx >> 8) & 0xff == 0 {
            break;
        }
        // EAX[4:0]: shift the x2APIC ID right by this to get the next level's ID;
        // the last level's next level is the package.
        shift = Some(eax & 0x1f);
    }
    shift.map(|s| (edx0, s))
}

/// One CPU as the SMP table knows it, for [`SocketMap::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuView {
    /// Its APIC ID (as the firmware and `hvctl info` name it).
    pub apic_id: u32,
    /// Its package ID, if it ran far enough to decode it (an AP that never checked in
    /// did not).
    pub package: Option<u32>,
    /// Whether another CPU can hand it a job (a started application processor).
    pub takes_jobs: bool,
}

/// One socket (package) of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// The package ID CPUID reports for it.
    pub package: u32,
    /// Its CPUs' APIC IDs, in the SMP table's order (the boot CPU first).
    pub cpus: Vec<u32>,
    /// Those of them that take jobs, in that order.
    pub job_cpus: Vec<u32>,
}

/// The machine's sockets, numbered 0.. in the order their packages first appear in
/// the SMP table (so the boot CPU's package is socket 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketMap {
    sockets: Vec<Socket>,
}

/// Where an access for a socket is to be performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On the calling CPU: it is in the socket.
    Here,
    /// On this other CPU of the socket (APIC ID), by job.
    On(u32),
}

/// Why no CPU of a socket can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The socket number is not below [`SocketMap::len`].
    NoSuchSocket,
    /// The socket exists but none of its CPUs can do it (the reason says why).
    Unreachable(String),
}

impl SocketMap {
    /// Number the packages of `cpus` (CPUs whose package is unknown belong to none).
    pub fn new(cpus: &[CpuView]) -> Self {
        let mut sockets: Vec<Socket> = Vec::new();
        for cpu in cpus {
            let Some(package) = cpu.package else { continue };
            let i = match sockets.iter().position(|s| s.package == package) {
                Some(i) => i,
                None => {
                    sockets.push(Socket { package, cpus: Vec::new(), job_cpus: Vec::new() });
                    sockets.len() - 1
                }
            };
            if let Some(s) = sockets.get_mut(i) {
                s.cpus.push(cpu.apic_id);
                if cpu.takes_jobs {
                    s.job_cpus.push(cpu.apic_id);
                }
            }
        }
        Self { sockets }
    }

    /// How many sockets.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether no CPU's package is known.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The sockets, by number.
    pub fn sockets(&self) -> &[Socket] {
        &self.sockets
    }

    /// The socket number of the CPU with `apic_id`.
    pub fn socket_of(&self, apic_id: u32) -> Option<u32> {
        self.sockets.iter().position(|s| s.cpus.contains(&apic_id)).map(|i| i as u32)
    }

    /// The boot log's line: `SMP sockets=2: socket 0 (package 0): APIC 0,2; socket 1
    /// (package 1): APIC 1`.
    pub fn summary(&self) -> String {
        let sockets = self
            .sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let cpus = s.cpus.iter().map(|c| alloc::format!("{c}")).collect::<Vec<_>>().join(",");
                alloc::format!("socket {i} (package {}): APIC {cpus}", s.package)
            })
            .collect::<Vec<_>>()
            .join("; ");
        alloc::format!("SMP sockets={}: {sockets}", self.sockets.len())
    }

    /// Where the calling CPU (`here`, its APIC ID) performs an access for `socket`:
    /// itself if it is in it, else the first CPU of the socket that takes jobs and is
    /// not in `avoid` (CPUs that failed to answer before). Never a CPU of another socket.
    pub fn route(&self, socket: u32, here: u32, avoid: &[u32]) -> Result<Route, RouteError> {
        let s = self.sockets.get(socket as usize).ok_or(RouteError::NoSuchSocket)?;
        if s.cpus.contains(&here) {
            return Ok(Route::Here);
        }
        if let Some(cpu) = s.job_cpus.iter().find(|c| !avoid.contains(c)) {
            return Ok(Route::On(*cpu));
        }
        let list = s.cpus.iter().map(|c| alloc::format!("{c}")).collect::<Vec<_>>().join(", ");
        Err(RouteError::Unreachable(if s.job_cpus.is_empty() {
            alloc::format!("none of its CPUs (APIC {list}) runs: each failed to start or to turn on virtualization")
        } else {
            alloc::format!("none of its CPUs (APIC {list}) answered a job in time")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use std::collections::BTreeMap;

    /// A CPUID table: unlisted leaves read as zeros.
    fn table(entries: &[((u32, u32), [u32; 4])]) -> impl Fn(u32, u32) -> [u32; 4] + Clone + use<> {
        let map: BTreeMap<(u32, u32), [u32; 4]> = entries.iter().copied().collect();
        move |leaf, sub| map.get(&(leaf, sub)).copied().unwrap_or([0; 4])
    }

    // The vendor string's three words in string order: EBX, EDX, ECX.
    const INTEL: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e]; // "Genu" "ineI" "ntel"
    const AMD: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "Auth" "enti" "cAMD"

    fn leaf0(max: u32, vendor: [u32; 3]) -> ((u32, u32), [u32; 4]) {
        ((0, 0), [max, vendor[0], vendor[2], vendor[1]])
    }

    /// Leaf 1 with the initial APIC ID, the logical processor count and HTT.
    fn leaf1(apic: u32, logical: u32, htt: bool) -> ((u32, u32), [u32; 4]) {
        ((1, 0), [0x000a_0652, (apic << 24) | (logical << 16), 0, if htt { 1 << 28 } else { 0 }])
    }

    /// One level of leaf 0xB/0x1F: shift, processors, level number and type, x2APIC ID.
    fn level(leaf: u32, sub: u32, shift: u32, procs: u32, kind: u32, x2apic: u32) -> ((u32, u32), [u32; 4]) {
        ((leaf, sub), [shift, procs, (kind << 8) | sub, x2apic])
    }

    #[test]
    fn leaf_1f_uses_the_last_levels_shift() {
        // Two sockets of 2 dies × 8 cores × 2 threads: SMT shift 1, core 4, die 5.
        // x2APIC 0x2b = package 1, die 0, core 5, thread 1. Leaf 0xB (shift 4) would
        // miss the die level; 0x1F comes first.
        let cpuid = table(&[
            leaf0(0x1f, INTEL),
            leaf1(0x2b, 64, true),
            level(0x1f, 0, 1, 2, 1, 0x2b),
            level(0x1f, 1, 4, 16, 2, 0x2b),
            level(0x1f, 2, 5, 32, 5, 0x2b),
            level(0xb, 0, 1, 2, 1, 0x2b),
            level(0xb, 1, 4, 32, 2, 0x2b),
        ]);
        let t = CpuTopology::decode(cpuid);
        assert_eq!(t, CpuTopology { apic_id: 0x2b, package: 1, package_shift: 5, source: Source::Leaf1F });
    }

    #[test]
    fn leaf_b_when_1f_is_absent_or_empty() {
        // Max leaf 0x16: leaf 0x1F must not be read even though the table has one.
        let levels = [level(0xb, 0, 1, 2, 1, 0x13), level(0xb, 1, 3, 8, 2, 0x13)];
        let mut entries = vec![leaf0(0x16, INTEL), leaf1(0x13, 16, true), level(0x1f, 0, 0, 1, 2, 0x13)];
        entries.extend(levels);
        let t = CpuTopology::decode(table(&entries));
        assert_eq!(t, CpuTopology { apic_id: 0x13, package: 2, package_shift: 3, source: Source::LeafB });
        // Leaf 0x1F within range but reporting nothing (EBX = 0): leaf 0xB.
        let mut entries = vec![leaf0(0x1f, INTEL), leaf1(0x13, 16, true), ((0x1f, 0), [0; 4])];
        entries.extend(levels);
        assert_eq!(CpuTopology::decode(table(&entries)).source, Source::LeafB);
    }

    #[test]
    fn qemu_two_sockets_of_one_core_and_one_socket_of_two_cores() {
        // QEMU -smp 2,sockets=2,cores=1,threads=1: both shifts 0, APIC 1 is package 1.
        let two_sockets = |apic| {
            table(&[leaf0(0xd, AMD), leaf1(apic, 1, false), level(0xb, 0, 0, 1, 1, apic), level(0xb, 1, 0, 1, 2, apic)])
        };
        assert_eq!(CpuTopology::decode(two_sockets(1)).package, 1);
        assert_eq!(CpuTopology::decode(two_sockets(0)).package, 0);
        // Plain -smp 2 (one socket, two cores): core shift 1, both in package 0.
        let one_socket =
            table(&[leaf0(0xd, AMD), leaf1(1, 2, true), level(0xb, 0, 0, 1, 1, 1), level(0xb, 1, 1, 2, 2, 1)]);
        let t = CpuTopology::decode(one_socket);
        assert_eq!((t.package, t.package_shift, t.source), (0, 1, Source::LeafB));
    }

    #[test]
    fn legacy_intel_uses_leaf_1_and_leaf_4() {
        // No leaf 0xB: 8 addressable logical processors per package (shift 3);
        // APIC 0x1a is package 3.
        let t = CpuTopology::decode(table(&[leaf0(0xa, INTEL), leaf1(0x1a, 8, true)]));
        assert_eq!(t, CpuTopology { apic_id: 0x1a, package: 3, package_shift: 3, source: Source::Legacy });
        // Leaf 4 saying 16 addressable cores widens a too-small leaf 1 count.
        let leaf4 = ((4, 0), [(15 << 26) | (1 << 5) | 1, 0, 0, 0]);
        let t = CpuTopology::decode(table(&[leaf0(0xa, INTEL), leaf1(0x1a, 8, true), leaf4]));
        assert_eq!((t.package, t.package_shift), (1, 4));
        // Without HTT every CPU is its own package.
        let t = CpuTopology::decode(table(&[leaf0(0x2, INTEL), leaf1(5, 0, false)]));
        assert_eq!(t, CpuTopology { apic_id: 5, package: 5, package_shift: 0, source: Source::Single });
    }

    #[test]
    fn amd_without_leaf_b_uses_8000_0008() {
        let ext = |ecx| [((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]), ((0x8000_0008, 0), [0x3030, 0, ecx, 0])];
        // ApicIdCoreIdSize 4 (16 IDs per package): APIC 0x21 is package 2.
        let mut entries = vec![leaf0(0xd, AMD), leaf1(0x21, 16, true)];
        entries.extend(ext((4 << 12) | 11));
        let t = CpuTopology::decode(table(&entries));
        assert_eq!(t, CpuTopology { apic_id: 0x21, package: 2, package_shift: 4, source: Source::Amd80000008 });
        // ApicIdCoreIdSize 0: NC + 1 = 6 threads round up to 8 IDs (shift 3).
        let mut entries = vec![leaf0(0xd, AMD), leaf1(0x21, 6, true)];
        entries.extend(ext(5));
        let t = CpuTopology::decode(table(&entries));
        assert_eq!((t.package, t.package_shift), (4, 3));
    }

    #[test]
    fn an_unknown_level_type_does_not_panic() {
        // Level type 9 is not defined today; the decoder only needs "not 0".
        let cpuid = table(&[leaf0(0x1f, INTEL), level(0x1f, 0, 1, 2, 1, 6), level(0x1f, 1, 2, 4, 9, 6)]);
        assert_eq!(CpuTopology::decode(cpuid).package, 1);
    }

    fn cpu(apic_id: u32, package: Option<u32>, takes_jobs: bool) -> CpuView {
        CpuView { apic_id, package, takes_jobs }
    }

    #[test]
    fn sockets_are_numbered_by_first_appearance() {
        // The boot CPU (APIC 4) is in package 1: that is socket 0. APIC 9 never
        // decoded its package and belongs to no socket.
        let map = SocketMap::new(&[
            cpu(4, Some(1), false),
            cpu(0, Some(0), true),
            cpu(5, Some(1), true),
            cpu(9, None, false),
            cpu(1, Some(0), true),
        ]);
        assert_eq!(map.len(), 2);
        assert_eq!(map.sockets()[0], Socket { package: 1, cpus: vec![4, 5], job_cpus: vec![5] });
        assert_eq!(map.sockets()[1], Socket { package: 0, cpus: vec![0, 1], job_cpus: vec![0, 1] });
        assert_eq!((map.socket_of(5), map.socket_of(1), map.socket_of(9)), (Some(0), Some(1), None));
        assert_eq!(map.summary(), "SMP sockets=2: socket 0 (package 1): APIC 4,5; socket 1 (package 0): APIC 0,1");
        assert!(SocketMap::new(&[]).is_empty());
    }

    #[test]
    fn routes_stay_in_the_socket() {
        let map = SocketMap::new(&[
            cpu(0, Some(0), false),
            cpu(1, Some(0), true),
            cpu(2, Some(1), true),
            cpu(3, Some(1), true),
            cpu(4, Some(2), false),
        ]);
        // The boot CPU reads its own socket itself, the others on their first CPU.
        assert_eq!(map.route(0, 0, &[]), Ok(Route::Here));
        assert_eq!(map.route(1, 0, &[]), Ok(Route::On(2)));
        // A CPU that did not answer is passed over for the next of its socket, and
        // when none is left the socket is unreachable (never socket 0's CPU 1).
        assert_eq!(map.route(1, 0, &[2]), Ok(Route::On(3)));
        match map.route(1, 0, &[2, 3]) {
            Err(RouteError::Unreachable(why)) => assert!(why.contains("APIC 2, 3") && why.contains("in time"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Socket 2's only CPU failed to start its virtualization: unreachable.
        match map.route(2, 0, &[]) {
            Err(RouteError::Unreachable(why)) => assert!(why.contains("APIC 4") && why.contains("failed"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(map.route(3, 0, &[]), Err(RouteError::NoSuchSocket));
        // An AP calling for its own socket does it itself.
        assert_eq!(map.route(1, 3, &[]), Ok(Route::Here));
    }
}
