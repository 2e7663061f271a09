//! Time: the TSC, calibrated once at boot, as the hypervisor's clock.
//!
//! Frequency from CPUID leaf 0x15 (TSC/crystal ratio with the crystal frequency, exact
//! on recent Intel parts) when it is complete; otherwise measured against the 8254 PIT
//! channel 2 over 40 ms (ports 0x42/0x43/0x61), which QEMU, Bochs and PC hardware
//! provide, reading the count at both ends between two TSC reads and keeping the
//! narrowest such bracket (`calibrate_with_pit`). The measurement loop is bounded: a machine without a PIT gets an error,
//! not a hang, and times are then reported as unknown rather than guessed.

use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// How the frequency was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// CPUID leaf 0x15.
    Cpuid15,
    /// Measured against the PIT.
    Pit,
}

/// TSC frequency in Hz from CPUID 0x15 values (EAX denominator, EBX numerator, ECX
/// crystal Hz), if all three are given (SDM Vol. 2A, CPUID leaf 15H).
pub fn tsc_hz_from_leaf15(eax: u32, ebx: u32, ecx: u32) -> Option<u64> {
    if eax == 0 || ebx == 0 || ecx == 0 {
        return None;
    }
    Some(u64::from(ecx) * u64::from(ebx) / u64::from(eax))
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { x86::time::rdtsc() }
}

/// The 8254's input clock.
const PIT_HZ: u64 = 1_193_182;

/// One reading of PIT channel 2's count, bracketed by TSC reads: (TSC at the middle of
/// the bracket, the count, the bracket's width in TSC ticks). A wide bracket means the
/// CPU was away during the read (an emulator's vCPU thread descheduled or waiting for a
/// lock), so the count belongs to some moment inside it.
fn pit_sample() -> (u64, u16, u64) {
    // SAFETY: ports 0x42 (channel 2 data) and 0x43 (mode/command) belong to the legacy
    // PIT, which nothing else in the hypervisor uses; 0x80 latches channel 2's count
    // (the 8254 data sheet's counter latch command).
    unsafe {
        let t0 = rdtsc();
        x86::io::outb(0x43, 0x80);
        let lo = x86::io::inb(0x42);
        let hi = x86::io::inb(0x42);
        let t1 = rdtsc();
        (t0 + (t1 - t0) / 2, u16::from_le_bytes([lo, hi]), t1 - t0)
    }
}

/// The narrowest of `n` readings.
fn best_pit_sample(n: usize) -> (u64, u16, u64) {
    let mut best = pit_sample();
    for _ in 1..n {
        let s = pit_sample();
        if s.2 < best.2 {
            best = s;
        }
    }
    best
}

/// One measurement over about 40 ms: channel 2 counts down from 0xFFFF (mode 0, gate
/// high, speaker off); the count is read at the start and at the end, each time the
/// narrowest of a few bracketed readings, so neither end depends on when a poll
/// happened to run. Returns (TSC ticks, PIT ticks, the two brackets' widths summed).
fn pit_interval() -> Option<(u64, u64, u64)> {
    const SPAN: u64 = PIT_HZ / 25; // 40 ms, within one countdown from 0xFFFF (55 ms)
    // SAFETY: as in `pit_sample`; port 0x61 bit 0 is channel 2's gate, bit 1 the
    // speaker, which is kept off.
    unsafe {
        let gate = x86::io::inb(0x61);
        x86::io::outb(0x61, (gate & !0x02) | 0x01);
        x86::io::outb(0x43, 0xb0); // channel 2, lo/hi byte, mode 0, binary
        x86::io::outb(0x42, 0xff);
        x86::io::outb(0x42, 0xff);
    }
    // The count is loaded on the next input clock; let it start (bounded: a PIT that
    // never counts is an error, not a hang).
    let begun = rdtsc();
    let (t0, c0, w0) = loop {
        let s = best_pit_sample(5);
        if s.1 < 0xfff0 {
            break s;
        }
        if s.0.wrapping_sub(begun) > 1 << 36 {
            return None;
        }
    };
    // Bounded by TSC ticks (2^36 is tens of seconds at any real frequency).
    loop {
        let (t, c, _) = pit_sample();
        if u64::from(c0.wrapping_sub(c)) >= SPAN && c < c0 {
            break;
        }
        if t.wrapping_sub(t0) > 1 << 36 {
            return None;
        }
    }
    let (t1, c1, w1) = best_pit_sample(5);
    let pit = u64::from(c0.checked_sub(c1)?);
    Some((t1.checked_sub(t0)?, pit, w0 + w1))
}

/// The TSC rate against the PIT: up to five [`pit_interval`]s, the first whose
/// reading brackets together are within 0.1 % of the interval (else the one with the
/// narrowest). A single 10 ms window waited for by polling OUT2 once came out 25 % long
/// under an emulator on a loaded host (the end seen late), and every clock of the
/// hypervisor and its guests inherits this number.
fn calibrate_with_pit() -> Option<u64> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..5 {
        let m = pit_interval()?;
        if best.is_none_or(|b| m.2 * b.0 < b.2 * m.0) {
            best = Some(m);
        }
        if m.2 * 1000 <= m.0 {
            break;
        }
    }
    let (tsc, pit, _) = best?;
    let hz = u64::try_from(u128::from(tsc) * u128::from(PIT_HZ) / u128::from(pit.max(1))).ok()?;
    (hz > 1_000_000).then_some(hz)
}

/// Calibrate the clock and start the uptime counter. Call once at boot.
pub fn init() -> Result<(u64, Source), &'static str> {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let leaf0 = core::arch::x86_64::__cpuid(0);
    if leaf0.eax >= 0x15 {
        let l = core::arch::x86_64::__cpuid(0x15);
        if let Some(hz) = tsc_hz_from_leaf15(l.eax, l.ebx, l.ecx) {
            TSC_HZ.store(hz, Ordering::Relaxed);
            return Ok((hz, Source::Cpuid15));
        }
    }
    let hz = calibrate_with_pit().ok_or("the PIT did not count down within the bounded wait")?;
    TSC_HZ.store(hz, Ordering::Relaxed);
    Ok((hz, Source::Pit))
}

/// TSC frequency, if known.
pub fn tsc_hz() -> Option<u64> {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => None,
        hz => Some(hz),
    }
}

/// The wall clock at boot (Unix seconds) and the uptime it was read at.
static WALL_CLOCK: AtomicU64 = AtomicU64::new(0);

/// Record the wall clock boot read from the firmware (once, at boot, right after
/// [`init`]: uptime is then close to 0).
pub fn set_wall_clock(unix_secs: i64) {
    WALL_CLOCK.store(u64::try_from(unix_secs).unwrap_or(0), Ordering::Relaxed);
}

/// The wall clock now, Unix seconds (UTC): the firmware's time at boot plus uptime.
pub fn unix_time() -> i64 {
    let boot = WALL_CLOCK.load(Ordering::Relaxed);
    let up = uptime_ns().unwrap_or(0) / 1_000_000_000;
    i64::try_from(boot.saturating_add(up)).unwrap_or(i64::MAX)
}

/// Nanoseconds since [`init`], if the clock is calibrated.
pub fn uptime_ns() -> Option<u64> {
    let hz = tsc_hz()?;
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    Some(ticks_to_ns(ticks, hz))
}

/// The TSC value at uptime `ns` (the TSC now where the clock is not calibrated): the
/// inverse of [`uptime_ns`], for giving a guest a TSC that counts from its own start.
pub fn tsc_at_uptime_ns(ns: u64) -> u64 {
    match tsc_hz() {
        Some(hz) => BOOT_TSC
            .load(Ordering::Relaxed)
            .wrapping_add(u64::try_from(u128::from(ns) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)),
        None => rdtsc(),
    }
}

/// Convert a TSC tick count to nanoseconds at `hz` ticks per second
/// (widened to u128 so long runtimes do not overflow the multiply).
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64
}

/// The TSC now (for deadlines measured in ticks).
pub fn now_ticks() -> u64 {
    rdtsc()
}

/// Ticks in `ms` milliseconds, if the clock is calibrated.
pub fn ms_to_ticks(ms: u64) -> Option<u64> {
    tsc_hz().map(|hz| hz / 1000 * ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf15_needs_all_three_fields() {
        // 24 MHz crystal, ratio 176/2 -> 2.112 GHz.
        assert_eq!(tsc_hz_from_leaf15(2, 176, 24_000_000), Some(2_112_000_000));
        assert_eq!(tsc_hz_from_leaf15(2, 176, 0), None);
        assert_eq!(tsc_hz_from_leaf15(0, 176, 24_000_000), None);
    }
}
