//! The paravirtual clock Linux knows as kvm-clock: the guest learns the TSC's rate
//! from a structure the hypervisor writes into its memory, instead of calibrating the
//! TSC against the PIT or the PM timer. Under QEMU TCG every such calibration read is
//! an exit of ~23 µs, Linux's calibration loops allow 10–20 µs, and it never succeeds:
//! Linux then marks the TSC unstable and reads the ACPI PM timer (an I/O exit) for
//! every clock read. With this clock it takes the rate as given (`tsc: Detected ... MHz
//! processor` from `kvm_get_tsc_khz`), keeps the TSC as its clocksource and boots
//! without calibrating.
//!
//! The interface is KVM's ABI, which Linux, FreeBSD and Windows' KVM drivers implement
//! (Linux `Documentation/virt/kvm/x86/cpuid.rst` and `msr.rst`):
//!
//! - CPUID leaf [`CPUID_BASE`] (0x4000_0100; Linux scans 0x4000_0000–0x4000_FF00 in
//!   steps of 0x100 for the signature, so this hypervisor's own signature stays at
//!   0x4000_0000) holds "KVMKVMKVM\0\0\0"; leaf `CPUID_BASE + 1` EAX holds
//!   [`FEATURES`]: CLOCKSOURCE2 (the MSRs below), CLOCKSOURCE_STABLE_BIT (the TSC is one
//!   clock for every vCPU, so the guest needs no global last-value fix-up) and
//!   NOP_IO_DELAY (port-0x80 delays are pointless here and each is an exit). Nothing
//!   else is offered: no steal time, async page faults, PV EOI, PV IPIs, PV TLB flush
//!   or hypercalls, so Linux uses none of them.
//! - [`MSR_SYSTEM_TIME`] (0x4b56_4d01), per vCPU: bit 0 enables, the rest is the guest
//!   physical address of a 32-byte `pvclock_vcpu_time_info` ([`time_info`]) that the
//!   hypervisor fills on the write: guest time `system_time` ns at guest TSC
//!   `tsc_timestamp`, and the scale (`tsc_to_system_mul`, `tsc_shift`) from TSC ticks to
//!   ns ([`time_scale`]). The guest computes `system_time + scale(rdtsc() -
//!   tsc_timestamp)` itself: reading the clock costs no exit.
//! - [`MSR_WALL_CLOCK`] (0x4b56_4d00): the guest physical address of a 12-byte
//!   `pvclock_wall_clock` ([`wall_clock`]) the hypervisor fills with the wall clock
//!   (Unix time) at guest time 0.
//!
//! Both structures carry a version that is odd while they change (the hypervisor writes
//! them whole while the vCPU is stopped, so the guest only ever sees even ones). The
//! guest's `system_time` is the domain's guest clock (`Domain::guest_now_ns`, which
//! also drives the device models), so kvm-clock, the PIT, the RTC and the LAPIC agree;
//! after a migration the destination writes the structure again with its own TSC rate
//! (`domain::exit::msr::refresh_kvmclock`), continuing from the value the source's
//! structure gives at that moment.
//!
//! Pure logic: no hardware, no allocation, no panics on any input.

#![forbid(unsafe_code)]

/// MSR_KVM_WALL_CLOCK_NEW.
pub const MSR_WALL_CLOCK: u32 = 0x4b56_4d00;
/// MSR_KVM_SYSTEM_TIME_NEW.
pub const MSR_SYSTEM_TIME: u32 = 0x4b56_4d01;

/// The CPUID leaf of KVM's signature (KVM_CPUID_SIGNATURE at the base found by scanning).
pub const CPUID_BASE: u32 = 0x4000_0100;
/// "KVMKVMKVM\0\0\0", as EBX, ECX, EDX.
pub const SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// KVM_FEATURE_NOP_IO_DELAY.
pub const FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// KVM_FEATURE_CLOCKSOURCE2: the `*_NEW` MSRs.
pub const FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: PVCLOCK_TSC_STABLE_BIT may be set.
pub const FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
/// Everything leaf `CPUID_BASE + 1` EAX offers.
pub const FEATURES: u32 = FEATURE_NOP_IO_DELAY | FEATURE_CLOCKSOURCE2 | FEATURE_CLOCKSOURCE_STABLE_BIT;

/// PVCLOCK_TSC_STABLE_BIT in `pvclock_vcpu_time_info.flags`.
pub const FLAG_TSC_STABLE: u8 = 1 << 0;

/// Size of `pvclock_vcpu_time_info`.
pub const TIME_INFO_LEN: usize = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_LEN: usize = 12;

/// The answer for KVM's leaves (`leaf` = [`CPUID_BASE`] or `CPUID_BASE + 1`), if it is one.
pub fn cpuid(leaf: u32) -> Option<[u32; 4]> {
    let word = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
    match leaf {
        CPUID_BASE => Some([CPUID_BASE + 1, word(0), word(4), word(8)]),
        l if l == CPUID_BASE + 1 => Some([FEATURES, 0, 0, 0]),
        _ => None,
    }
}

/// The scale from ticks of a `tsc_hz` clock to nanoseconds, as (`tsc_to_system_mul`,
/// `tsc_shift`): ns = ((ticks << shift, or >> -shift) × mul) >> 32. KVM's
/// `kvm_get_time_scale(NSEC_PER_SEC, tsc_hz)`: the shift brings the tick rate into
/// (ns rate / 2, ns rate × 2] within 32 bits, so that mul, a 0.32 fixed-point factor,
/// keeps full precision. `None` for a rate of 0.
pub fn time_scale(tsc_hz: u64) -> Option<(u32, i8)> {
    if tsc_hz == 0 {
        return None;
    }
    let mut scaled: u64 = 1_000_000_000;
    let mut tps = tsc_hz;
    let mut shift: i32 = 0;
    while tps > scaled * 2 || tps & 0xffff_ffff_0000_0000 != 0 {
        tps >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps as u32;
    while u64::from(tps32) <= scaled || scaled & 0xffff_ffff_0000_0000 != 0 {
        if scaled & 0xffff_ffff_0000_0000 != 0 || tps32 & 0x8000_0000 != 0 {
            scaled >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    // tps32 > scaled here, so the quotient fits 32 bits.
    let mul = u32::try_from((u128::from(scaled) << 32) / u128::from(tps32)).ok()?;
    Some((mul, i8::try_from(shift).ok()?))
}

/// Ticks to nanoseconds with a [`time_scale`] (Linux's `pvclock_scale_delta`).
pub fn scale_delta(ticks: u64, mul: u32, shift: i8) -> u64 {
    let t = if shift < 0 { ticks >> shift.unsigned_abs().min(63) } else { ticks << shift.unsigned_abs().min(63) };
    ((u128::from(t) * u128::from(mul)) >> 32) as u64
}

/// The rate in kHz a guest derives from a [`time_scale`] (Linux's `pvclock_tsc_khz`),
/// for checking that what it will compute is what we meant.
pub fn guest_tsc_khz(mul: u32, shift: i8) -> u64 {
    if mul == 0 {
        return 0;
    }
    let khz = (1_000_000u64 << 32) / u64::from(mul);
    if shift < 0 { khz << shift.unsigned_abs().min(63) } else { khz >> shift.unsigned_abs().min(63) }
}

/// A `pvclock_vcpu_time_info` (little-endian, 32 bytes): `version` (u32), pad (u32),
/// `tsc_timestamp` (u64), `system_time` (u64), `tsc_to_system_mul` (u32), `tsc_shift`
/// (i8), `flags` (u8), pad (2).
pub fn time_info(version: u32, tsc: u64, system_ns: u64, mul: u32, shift: i8, flags: u8) -> [u8; TIME_INFO_LEN] {
    let mut b = [0u8; TIME_INFO_LEN];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[8..16].copy_from_slice(&tsc.to_le_bytes());
    b[16..24].copy_from_slice(&system_ns.to_le_bytes());
    b[24..28].copy_from_slice(&mul.to_le_bytes());
    b[28] = shift.to_le_bytes()[0];
    b[29] = flags;
    b
}

/// The fields of a `pvclock_vcpu_time_info` the guest reads: (version, tsc_timestamp,
/// system_time, mul, shift).
pub fn parse_time_info(b: &[u8; TIME_INFO_LEN]) -> (u32, u64, u64, u32, i8) {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
    (u32_at(0), u64_at(8), u64_at(16), u32_at(24), i8::from_le_bytes([b[28]]))
}

/// The guest time a `pvclock_vcpu_time_info` gives at guest TSC `tsc` (Linux's
/// `__pvclock_read_cycles`; a TSC before the timestamp counts as the timestamp).
pub fn read_time(info: &[u8; TIME_INFO_LEN], tsc: u64) -> u64 {
    let (_, at, system, mul, shift) = parse_time_info(info);
    system.wrapping_add(scale_delta(tsc.saturating_sub(at), mul, shift))
}

/// The next even version after `old` (odd means "changing"; the new one differs).
pub fn next_version(old: u32) -> u32 {
    (old | 1).wrapping_add(1)
}

/// A `pvclock_wall_clock` (little-endian, 12 bytes): `version`, `sec`, `nsec` (u32
/// each), the wall clock at guest time 0, `unix_ns_at_zero` (clamped to what 32-bit
/// seconds hold, as the ABI's field does).
pub fn wall_clock(version: u32, unix_ns_at_zero: i128) -> [u8; WALL_CLOCK_LEN] {
    let ns = unix_ns_at_zero.clamp(0, i128::from(u32::MAX) * 1_000_000_000);
    let (sec, nsec) = ((ns / 1_000_000_000) as u32, (ns % 1_000_000_000) as u32);
    let mut b = [0u8; WALL_CLOCK_LEN];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[4..8].copy_from_slice(&sec.to_le_bytes());
    b[8..12].copy_from_slice(&nsec.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_and_features_are_kvms() {
        let [max, b, c, d] = cpuid(CPUID_BASE).unwrap();
        assert_eq!(max, 0x4000_0101);
        let sig: alloc::vec::Vec<u8> = [b, c, d].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(cpuid(CPUID_BASE + 1), Some([(1 << 1) | (1 << 3) | (1 << 24), 0, 0, 0]));
        assert_eq!(cpuid(CPUID_BASE + 2), None);
        assert_eq!(cpuid(0x4000_0000), None);
    }

    #[test]
    fn the_scale_turns_ticks_into_nanoseconds_at_every_rate() {
        // 50 MHz (Bochs), 1 GHz, 2.46 GHz (QEMU TCG here), 3.7 GHz, 100 GHz.
        for hz in [50_000_000u64, 1_000_000_000, 2_457_600_000, 3_700_000_000, 100_000_000_000] {
            let (mul, shift) = time_scale(hz).unwrap();
            // One second of ticks is one second, to a part in 10^8.
            let ns = scale_delta(hz, mul, shift);
            assert!(ns.abs_diff(1_000_000_000) <= 10, "{hz} Hz: 1 s of ticks is {ns} ns (mul {mul}, shift {shift})");
            // An hour too (no overflow, the same precision).
            let ns = scale_delta(hz * 3600, mul, shift);
            assert!(ns.abs_diff(3_600_000_000_000) <= 36_000, "{hz} Hz: an hour is {ns} ns");
            // And the guest derives the rate we have.
            let khz = guest_tsc_khz(mul, shift);
            assert!(khz.abs_diff(hz / 1000) <= hz / 1000 / 100_000 + 1, "{hz} Hz: the guest computes {khz} kHz");
        }
        assert_eq!(time_scale(0), None);
        // Extreme rates do not panic.
        assert!(time_scale(1).is_some() && time_scale(u64::MAX).is_some());
    }

    #[test]
    fn kvms_own_numbers_for_a_2_ghz_tsc() {
        // kvm_get_time_scale(NSEC_PER_SEC, 2e9): 2e9 is within (1e9, 2e9] and 32 bits,
        // so no shift, and each tick is half a nanosecond: mul 0.5 in 0.32 fixed point.
        let (mul, shift) = time_scale(2_000_000_000).unwrap();
        assert_eq!(shift, 0);
        assert_eq!(mul, 0x8000_0000);
        assert_eq!(scale_delta(2_000_000_000, mul, shift), 1_000_000_000);
    }

    #[test]
    fn a_time_info_reads_back_and_gives_the_time() {
        let (mul, shift) = time_scale(2_457_600_000).unwrap();
        let b = time_info(4, 1_000_000, 7_000, mul, shift, FLAG_TSC_STABLE);
        assert_eq!(parse_time_info(&b), (4, 1_000_000, 7_000, mul, shift));
        assert_eq!(b[29], FLAG_TSC_STABLE);
        assert_eq!(read_time(&b, 1_000_000), 7_000);
        assert_eq!(read_time(&b, 500), 7_000, "a TSC before the stamp is the stamp");
        let later = read_time(&b, 1_000_000 + 2_457_600_000);
        assert!(later.abs_diff(1_000_007_000) <= 10, "{later}");
    }

    #[test]
    fn versions_are_even_and_new() {
        for old in [0u32, 1, 2, 7, u32::MAX - 1, u32::MAX] {
            let v = next_version(old);
            assert_eq!(v % 2, 0, "{old} -> {v}");
            assert_ne!(v, old);
        }
    }

    #[test]
    fn the_wall_clock_is_split_and_clamped() {
        let b = wall_clock(2, 1_764_628_000_123_456_789);
        assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), 2);
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 1_764_628_000);
        assert_eq!(u32::from_le_bytes([b[8], b[9], b[10], b[11]]), 123_456_789);
        assert_eq!(&wall_clock(0, -5)[4..], &[0; 8]);
        let far = wall_clock(0, i128::MAX);
        assert_eq!(u32::from_le_bytes([far[4], far[5], far[6], far[7]]), u32::MAX);
    }
}
