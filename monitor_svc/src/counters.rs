//! Turning raw IA32_QM_CTR values into bytes and bytes per second.
//!
//! - [`decode_qm_ctr`]: bit 63 (Error) and bit 62 (Unavailable) become typed errors;
//!   the data bits 61:0 (60:0 when bit 61 is the overflow bit) are the count (SDM
//!   Vol. 3B 18.18.7).
//! - Occupancy in bytes is count × the upscaling factor CPUID.(EAX=0FH,ECX=1):EBX.
//! - MBM counters are only `width` bits wide (24 + CPUID.(EAX=0FH,ECX=1):EAX\[7:0\]) and
//!   wrap. [`MbmAccumulator`] keeps a 64-bit byte total across wraps by taking every
//!   delta modulo 2^width; that is only right if at most one wrap happens between two
//!   samples, so the sampling timer must run well inside the wrap period (see
//!   [`max_safe_sample_interval_ns`]). Samples carry TSC stamps and give bytes/s.
//!
//! Not for: choosing what to read (see [`crate::monitor`]) or MSR access
//! ([`crate::platform`]).

use core::fmt;

use crate::platform::{
    HwEvent, MsrAccess, PlatformError, QM_CTR_DATA_MASK, QM_CTR_ERROR, QM_CTR_OVERFLOW, QM_CTR_UNAVAILABLE, read_qm_ctr,
};

/// Why a counter gave no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterError {
    /// IA32_QM_CTR bit 63: the hardware does not support this RMID or event.
    Error,
    /// IA32_QM_CTR bit 62: the hardware has no data for this RMID now.
    Unavailable,
    /// The MSR access itself failed.
    Platform(PlatformError),
}

impl fmt::Display for CounterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error => f.write_str("the CPU rejected the RMID or event (IA32_QM_CTR error bit 63 set)"),
            Self::Unavailable => {
                f.write_str("the CPU has no data for this RMID now (IA32_QM_CTR unavailable bit 62 set)")
            }
            Self::Platform(e) => write!(f, "reading IA32_QM_CTR failed: {e}"),
        }
    }
}

impl From<PlatformError> for CounterError {
    fn from(e: PlatformError) -> Self {
        Self::Platform(e)
    }
}

/// A valid IA32_QM_CTR reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrData {
    /// The count in hardware units (multiply by the upscaling factor for bytes).
    pub count: u64,
    /// Bit 61 when the CPU defines it as the overflow bit (CPUID.(EAX=0FH,ECX=1):EAX\[8\]).
    pub overflow: bool,
}

/// Decode a raw IA32_QM_CTR value. Error wins over Unavailable when both are set: the
/// data cannot exist for an unsupported RMID/event.
pub const fn decode_qm_ctr(raw: u64, overflow_bit: bool) -> Result<CtrData, CounterError> {
    if raw & QM_CTR_ERROR != 0 {
        return Err(CounterError::Error);
    }
    if raw & QM_CTR_UNAVAILABLE != 0 {
        return Err(CounterError::Unavailable);
    }
    if overflow_bit {
        Ok(CtrData { count: raw & QM_CTR_DATA_MASK & !QM_CTR_OVERFLOW, overflow: raw & QM_CTR_OVERFLOW != 0 })
    } else {
        Ok(CtrData { count: raw & QM_CTR_DATA_MASK, overflow: false })
    }
}

/// Hardware units to bytes (saturating: a count that large is a hardware fault anyway).
pub const fn scale(count: u64, upscaling_factor: u32) -> u64 {
    count.saturating_mul(upscaling_factor as u64)
}

/// Read and decode one counter: select (event, rmid) on `socket`, read IA32_QM_CTR.
pub fn read_counter(
    msr: &mut impl MsrAccess,
    socket: u32,
    event: HwEvent,
    rmid: u32,
    overflow_bit: bool,
) -> Result<CtrData, CounterError> {
    let raw = read_qm_ctr(msr, socket, event, rmid)?;
    decode_qm_ctr(raw, overflow_bit)
}

/// Read the L3 occupancy of `rmid` on `socket`, in bytes.
pub fn read_occupancy_bytes(
    msr: &mut impl MsrAccess,
    socket: u32,
    rmid: u32,
    upscaling_factor: u32,
    overflow_bit: bool,
) -> Result<u64, CounterError> {
    read_counter(msr, socket, HwEvent::LlcOccupancy, rmid, overflow_bit).map(|d| scale(d.count, upscaling_factor))
}

const NS_PER_SEC: u128 = 1_000_000_000;

/// `2^width` as u128 (width is at most 62 after [`crate::caps`] clamps it; anything
/// larger is clamped here too so the arithmetic cannot overflow).
fn modulus(width: u32) -> u128 {
    1u128 << width.min(64)
}

/// How long a `width`-bit MBM counter with `upscaling_factor` bytes per unit takes to
/// wrap at `max_bytes_per_sec`, in nanoseconds (saturating at u64::MAX; 0 bandwidth
/// never wraps).
pub fn wrap_period_ns(width: u32, upscaling_factor: u32, max_bytes_per_sec: u64) -> u64 {
    if max_bytes_per_sec == 0 {
        return u64::MAX;
    }
    let span_bytes = modulus(width).saturating_mul(u128::from(upscaling_factor));
    let ns = span_bytes.saturating_mul(NS_PER_SEC) / u128::from(max_bytes_per_sec);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The longest safe interval between two MBM samples, in nanoseconds: half the wrap
/// period at `max_bytes_per_sec`. The modulo arithmetic is exact as long as fewer than
/// one full wrap happens between samples; half leaves room for timer jitter and a
/// bandwidth estimate that is off by up to 2x. Example: 24-bit counter, factor 64 KiB,
/// 100 GB/s → wrap after ~11 s, sample at least every ~5.5 s; Linux resctrl and the SDM
/// (18.18.7: "retrieving the value at 1Hz or faster is sufficient") use 1 s.
pub fn max_safe_sample_interval_ns(width: u32, upscaling_factor: u32, max_bytes_per_sec: u64) -> u64 {
    wrap_period_ns(width, upscaling_factor, max_bytes_per_sec) / 2
}

/// `bytes` over `ticks` TSC ticks at `tsc_hz`, in bytes per second; `None` when no
/// time passed (or the TSC frequency is unknown).
pub fn bytes_per_sec(bytes: u64, ticks: u64, tsc_hz: u64) -> Option<u64> {
    if ticks == 0 || tsc_hz == 0 {
        return None;
    }
    let rate = u128::from(bytes).saturating_mul(u128::from(tsc_hz)) / u128::from(ticks);
    Some(u64::try_from(rate).unwrap_or(u64::MAX))
}

/// TSC ticks to nanoseconds at `tsc_hz` (saturating; 0 when the frequency is unknown).
pub fn ticks_to_ns(ticks: u64, tsc_hz: u64) -> u64 {
    if tsc_hz == 0 {
        return 0;
    }
    u64::try_from(u128::from(ticks).saturating_mul(NS_PER_SEC) / u128::from(tsc_hz)).unwrap_or(u64::MAX)
}

/// What one sample added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbmSample {
    /// Bytes since the previous sample (0 for the first, which only sets the baseline).
    pub delta_bytes: u64,
    /// TSC ticks since the previous sample.
    pub delta_ticks: u64,
    /// Whether the counter wrapped since the previous sample.
    pub wrapped: bool,
    /// The interval exceeded the safe maximum, so more than one wrap may have been
    /// missed and `delta_bytes` may be short by multiples of 2^width units.
    pub suspect: bool,
}

/// A 64-bit byte total over a `width`-bit hardware counter that wraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbmAccumulator {
    width: u32,
    upscaling_factor: u32,
    /// The previous raw count and its TSC stamp.
    last: Option<(u64, u64)>,
    total_bytes: u64,
    wraps: u64,
    suspect_samples: u64,
    /// Bytes and ticks of the latest interval, for the rate.
    last_interval: Option<(u64, u64)>,
}

impl MbmAccumulator {
    /// A fresh accumulator; the first sample sets the baseline.
    pub const fn new(width: u32, upscaling_factor: u32) -> Self {
        Self { width, upscaling_factor, last: None, total_bytes: 0, wraps: 0, suspect_samples: 0, last_interval: None }
    }

    /// Take the counter's value `count` read at TSC `tsc`. `max_interval_ticks` is the
    /// safe maximum interval in TSC ticks (see [`max_safe_sample_interval_ns`]); a longer
    /// interval marks the sample as suspect. A TSC that went backwards counts as 0 ticks.
    pub fn sample(&mut self, count: u64, tsc: u64, max_interval_ticks: Option<u64>) -> MbmSample {
        let modulus = modulus(self.width);
        let count = u128::from(count) % modulus;
        let Some((prev, prev_tsc)) = self.last else {
            self.last = Some((u64::try_from(count).unwrap_or(0), tsc));
            return MbmSample { delta_bytes: 0, delta_ticks: 0, wrapped: false, suspect: false };
        };
        let prev = u128::from(prev);
        let wrapped = count < prev;
        // (new - old) mod 2^width: exact when at most one wrap happened in between.
        let delta_units = (count + modulus - prev) % modulus;
        let delta_bytes =
            u64::try_from(delta_units.saturating_mul(u128::from(self.upscaling_factor))).unwrap_or(u64::MAX);
        let delta_ticks = tsc.saturating_sub(prev_tsc);
        let suspect = max_interval_ticks.is_some_and(|max| delta_ticks > max);
        self.total_bytes = self.total_bytes.saturating_add(delta_bytes);
        if wrapped {
            self.wraps = self.wraps.saturating_add(1);
        }
        if suspect {
            self.suspect_samples = self.suspect_samples.saturating_add(1);
        }
        self.last = Some((u64::try_from(count).unwrap_or(0), tsc));
        self.last_interval = Some((delta_bytes, delta_ticks));
        MbmSample { delta_bytes, delta_ticks, wrapped, suspect }
    }

    /// Bytes counted since the baseline.
    pub const fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Wraps seen since the baseline.
    pub const fn wraps(&self) -> u64 {
        self.wraps
    }

    /// Samples taken after an interval longer than the safe maximum.
    pub const fn suspect_samples(&self) -> u64 {
        self.suspect_samples
    }

    /// The TSC stamp of the latest sample.
    pub fn last_tsc(&self) -> Option<u64> {
        self.last.map(|(_, tsc)| tsc)
    }

    /// Bytes per second over the latest sampling interval.
    pub fn bytes_per_sec(&self, tsc_hz: u64) -> Option<u64> {
        self.last_interval.and_then(|(bytes, ticks)| bytes_per_sec(bytes, ticks, tsc_hz))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_and_unavailable_bits() {
        assert_eq!(decode_qm_ctr(QM_CTR_ERROR | 5, false), Err(CounterError::Error));
        assert_eq!(decode_qm_ctr(QM_CTR_UNAVAILABLE | 5, false), Err(CounterError::Unavailable));
        assert_eq!(decode_qm_ctr(QM_CTR_ERROR | QM_CTR_UNAVAILABLE, false), Err(CounterError::Error));
        assert_eq!(decode_qm_ctr(QM_CTR_DATA_MASK, false), Ok(CtrData { count: QM_CTR_DATA_MASK, overflow: false }));
        assert_eq!(
            decode_qm_ctr(QM_CTR_OVERFLOW | 9, true),
            Ok(CtrData { count: 9, overflow: true }),
            "bit 61 is the overflow flag, not data, when CPUID says so"
        );
        assert_eq!(
            decode_qm_ctr(QM_CTR_OVERFLOW | 9, false),
            Ok(CtrData { count: QM_CTR_OVERFLOW | 9, overflow: false })
        );
    }

    #[test]
    fn scaling_saturates() {
        assert_eq!(scale(3, 65536), 196_608);
        assert_eq!(scale(u64::MAX / 2, 4), u64::MAX);
    }

    #[test]
    fn accumulator_follows_three_wraps_of_a_24_bit_counter() {
        let mut acc = MbmAccumulator::new(24, 64);
        let m = 1u64 << 24;
        let mut tsc = 1000;
        assert_eq!(acc.sample(m - 10, tsc, None).delta_bytes, 0);
        // Steps that each cross one wrap: +20, +m-1, +m/2, +m/2+5 units.
        let mut raw = m - 10;
        let mut expected = 0u64;
        for step in [20, m - 1, m / 2, m / 2 + 5] {
            raw = (raw + step) % m;
            tsc += 100;
            let s = acc.sample(raw, tsc, Some(1000));
            assert_eq!(s.delta_bytes, step * 64);
            assert!(!s.suspect);
            expected += step * 64;
        }
        assert_eq!(acc.bytes(), expected);
        assert_eq!(acc.wraps(), 3);
        assert_eq!(acc.bytes_per_sec(1_000_000), Some((m / 2 + 5) * 64 * 1_000_000 / 100));
    }

    #[test]
    fn long_interval_is_flagged_and_backwards_tsc_gives_no_rate() {
        let mut acc = MbmAccumulator::new(24, 1);
        acc.sample(0, 100, Some(50));
        assert!(acc.sample(10, 200, Some(50)).suspect);
        assert_eq!(acc.suspect_samples(), 1);
        let s = acc.sample(20, 150, Some(50));
        assert_eq!((s.delta_bytes, s.delta_ticks), (10, 0));
        assert_eq!(acc.bytes_per_sec(1000), None);
    }

    #[test]
    fn safe_interval_is_half_the_wrap_period() {
        // 2^24 units * 65536 B = 1 TiB; at 100 GB/s that is 10.995 s.
        let wrap = wrap_period_ns(24, 65536, 100_000_000_000);
        assert_eq!(wrap, 10_995_116_277);
        assert_eq!(max_safe_sample_interval_ns(24, 65536, 100_000_000_000), wrap / 2);
        assert_eq!(wrap_period_ns(24, 1, 0), u64::MAX);
        assert_eq!(wrap_period_ns(62, u32::MAX, 1), u64::MAX);
        assert_eq!(bytes_per_sec(10, 0, 1), None);
        assert_eq!(ticks_to_ns(3_000_000_000, 3_000_000_000), 1_000_000_000);
    }
}
