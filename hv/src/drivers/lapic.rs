//! The local APIC, for one thing: a one-shot timer that ends a guest's time slice on
//! SVM (VMX has its own preemption timer). Intel SDM Vol. 3A 11.5.4 (APIC timer),
//! 11.4.1 (APIC base), 11.9 (spurious vector); AMD APM Vol. 2 16.4.
//!
//! xAPIC MMIO at the base IA32_APIC_BASE names (0xFEE00000 normally), reached through
//! the firmware's identity map. The timer runs at the APIC bus clock, which is
//! measured once against the TSC. The legacy 8259 PICs are masked, and every vector
//! from 32 up has an IDT entry that acknowledges the interrupt, so a stray interrupt
//! left armed by firmware is absorbed rather than faulting.

use core::sync::atomic::{AtomicU64, Ordering};

const MSR_APIC_BASE: u32 = 0x1b;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_INITIAL_COUNT: u64 = 0x380;
const REG_CURRENT_COUNT: u64 = 0x390;
const REG_DIVIDE: u64 = 0x3e0;
/// The vector our timer uses.
pub const TIMER_VECTOR: u8 = 0xef;
const LVT_MASKED: u32 = 1 << 16;

/// One CPU's local APIC as this driver uses it: where its registers are and how its
/// timer's clock relates to the TSC. It lives in the CPU's [`crate::percpu::PerCpu`].
#[derive(Debug)]
pub struct HostLapic {
    /// xAPIC MMIO base (0: not initialized).
    base: AtomicU64,
    /// APIC timer ticks per 2^20 TSC ticks (0: not calibrated).
    ratio: AtomicU64,
    /// Interrupts acknowledged so far (timer and stray).
    interrupts: AtomicU64,
}

impl Default for HostLapic {
    fn default() -> Self {
        Self::new()
    }
}

impl HostLapic {
    /// Not yet initialized.
    pub const fn new() -> Self {
        Self { base: AtomicU64::new(0), ratio: AtomicU64::new(0), interrupts: AtomicU64::new(0) }
    }

    fn read(&self, reg: u64) -> u32 {
        let base = self.base.load(Ordering::Relaxed);
        // SAFETY: `init` stored this CPU's xAPIC MMIO base, which the firmware
        // identity-maps as uncached device memory; registers are 32-bit at 16-byte
        // aligned offsets.
        unsafe { core::ptr::read_volatile((base + reg) as *const u32) }
    }

    fn write(&self, reg: u64, value: u32) {
        let base = self.base.load(Ordering::Relaxed);
        // SAFETY: as for `read`; only the registers named above are written.
        unsafe { core::ptr::write_volatile((base + reg) as *mut u32, value) }
    }

    /// Find and enable this CPU's local APIC, mask the 8259s, calibrate the timer
    /// against the TSC. Returns APIC timer ticks per millisecond.
    pub fn init(&self) -> Result<u64, &'static str> {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86_64); reading
        // it has no side effects. Masking both 8259s (OCW1 = 0xff on ports 0x21/0xA1)
        // stops legacy interrupts that firmware may have left enabled.
        let apic_base = unsafe {
            x86::io::outb(0x21, 0xff);
            x86::io::outb(0xa1, 0xff);
            x86::msr::rdmsr(MSR_APIC_BASE)
        };
        if apic_base & (1 << 11) == 0 {
            return Err("the local APIC is disabled (IA32_APIC_BASE bit 11)");
        }
        if apic_base & (1 << 10) != 0 {
            return Err("the local APIC is in x2APIC mode; only xAPIC MMIO is supported");
        }
        self.base.store(apic_base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
        self.write(REG_SVR, 0x100 | 0xff); // software enable, spurious vector 0xff
        self.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
        self.write(REG_DIVIDE, 0b1011); // divide by 1
        let tsc_hz = crate::drivers::time::tsc_hz().ok_or("the TSC is not calibrated")?;
        // Count down from the maximum for ~10 ms of TSC time.
        let window = tsc_hz / 100;
        self.write(REG_INITIAL_COUNT, u32::MAX);
        let start = crate::drivers::time::now_ticks();
        while crate::drivers::time::now_ticks().wrapping_sub(start) < window {
            core::hint::spin_loop();
        }
        let elapsed = u64::from(u32::MAX - self.read(REG_CURRENT_COUNT));
        self.write(REG_INITIAL_COUNT, 0);
        if elapsed == 0 {
            return Err("the APIC timer did not count");
        }
        self.ratio.store((elapsed << 20) / window, Ordering::Relaxed);
        Ok(elapsed / 10)
    }

    /// Whether `init` succeeded.
    pub fn available(&self) -> bool {
        self.ratio.load(Ordering::Relaxed) != 0
    }

    /// Fire the timer vector once, `tsc_ticks` from now.
    pub fn arm_one_shot(&self, tsc_ticks: u64) {
        let ratio = self.ratio.load(Ordering::Relaxed);
        if ratio == 0 {
            return;
        }
        self.write(REG_LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
        self.write(REG_INITIAL_COUNT, timer_count(tsc_ticks, ratio));
    }

    /// Stop the timer.
    pub fn disarm(&self) {
        if self.ratio.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.write(REG_INITIAL_COUNT, 0);
        self.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    }

    /// Interrupts this CPU acknowledged so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }

    fn acknowledge(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
        if self.base.load(Ordering::Relaxed) != 0 {
            self.write(REG_EOI, 0);
        }
    }
}

/// The initial count for `tsc_ticks` at `ratio` APIC ticks per 2^20 TSC ticks: at
/// least 1 (0 would stop the timer) and at most what the register holds.
fn timer_count(tsc_ticks: u64, ratio: u64) -> u32 {
    ((tsc_ticks.saturating_mul(ratio)) >> 20).clamp(1, u64::from(u32::MAX)) as u32
}

/// Called by the IDT for every vector from 32 up: acknowledge it at this CPU's APIC.
pub(crate) extern "sysv64" fn acknowledge() {
    crate::percpu::this().lapic.acknowledge();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_counts_never_stop_the_timer_nor_overflow() {
        // 1 APIC tick per TSC tick.
        assert_eq!(timer_count(1000, 1 << 20), 1000);
        assert_eq!(timer_count(0, 1 << 20), 1, "a count of 0 would disarm instead of firing");
        assert_eq!(timer_count(u64::MAX, 1 << 20), u32::MAX);
        // A 25 MHz APIC bus against a 2.5 GHz TSC: 1/100, truncated to 10485/2^20, so
        // the count rounds down (the timer fires a little early, never late).
        assert_eq!(timer_count(2_500_000, (1 << 20) / 100), 24_998);
    }
}
