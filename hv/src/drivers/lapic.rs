//! The local APIC, for two things: a one-shot timer that ends a guest's time slice on
//! SVM (VMX has its own preemption timer), and the INIT and STARTUP IPIs that start
//! the other CPUs ([`crate::smp`]). Intel SDM Vol. 3A 11.5.4 (APIC timer), 11.4.1
//! (APIC base), 11.9 (spurious vector), 11.6.1 (interrupt command register); AMD APM
//! Vol. 2 16.4, 16.5.
//!
//! xAPIC MMIO at the base IA32_APIC_BASE names (0xFEE00000 normally), reached through
//! the firmware's identity map. The timer runs at the APIC bus clock, which is
//! measured once against the TSC. The legacy 8259 PICs are masked, and every vector
//! from 32 up has an IDT entry that acknowledges the interrupt, so a stray interrupt
//! left armed by firmware is absorbed rather than faulting.

use core::sync::atomic::{AtomicU64, Ordering};

const MSR_APIC_BASE: u32 = 0x1b;
const REG_EOI: u64 = 0xb0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
/// x2APIC MSRs (SDM Vol. 3A 11.12.1.2): the ICR is one 64-bit MSR, SVR another.
const MSR_X2APIC_ICR: u32 = 0x830;
const MSR_X2APIC_SVR: u32 = 0x80f;
/// ICR delivery status (xAPIC only; SDM Vol. 3A 11.6.1): 1 while the IPI is pending.
const ICR_PENDING: u32 = 1 << 12;
/// ICR level = assert (bit 14); delivery modes INIT (101b) and Start Up (110b), bits 10:8.
const ICR_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
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

impl HostLapic {
    /// On an application processor: find its local APIC and software-enable it
    /// (SVR bit 8, spurious vector 0xff; SDM Vol. 3A 11.9), so it accepts IPIs and the
    /// interrupt stub can acknowledge them. No timer calibration: nothing times on an AP
    /// yet.
    pub fn enable_for_ipis(&self) {
        // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; reading it has no side effects.
        let apic_base = unsafe { x86::msr::rdmsr(MSR_APIC_BASE) };
        if apic_base & (1 << 11) == 0 {
            return;
        }
        if apic_base & (1 << 10) != 0 {
            // SAFETY: x2APIC mode is on (IA32_APIC_BASE bit 10), so the SVR MSR exists;
            // the value enables the APIC with spurious vector 0xff (SDM Vol. 3A 11.12.1.2).
            unsafe { x86::msr::wrmsr(MSR_X2APIC_SVR, 0x1ff) };
            return;
        }
        self.base.store(apic_base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
        self.write(REG_SVR, 0x100 | 0xff);
    }
}

/// Send an INIT IPI to the CPU with local APIC ID `apic_id` (SDM Vol. 3A 11.6.1:
/// delivery mode INIT, level assert, edge; 9.4.4.1: the first step of INIT-SIPI-SIPI).
pub fn send_init(apic_id: u32) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_INIT | ICR_ASSERT)
}

/// Send a STARTUP IPI: the CPU starts in real mode at `vector << 12` (SDM Vol. 3A
/// 11.6.1 "Start-Up", 9.4.4.2).
pub fn send_startup(apic_id: u32, vector: u8) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_STARTUP | ICR_ASSERT | u32::from(vector))
}

/// Send a fixed interrupt with `vector` to the CPU with local APIC ID `apic_id` (SDM
/// Vol. 3A 11.6.1: delivery mode fixed, edge): how one CPU wakes another that sleeps in
/// HLT (`smp` hands an AP work this way).
pub fn send_fixed(apic_id: u32, vector: u8) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_ASSERT | u32::from(vector))
}

/// Write the ICR of this CPU's local APIC (physical destination mode, no shorthand).
/// xAPIC: destination in ICR high bits 31:24 first (the write of the low half sends
/// it), then wait for the delivery status to clear (SDM Vol. 3A 11.6.1). x2APIC: one
/// WRMSR of the 64-bit ICR with the 32-bit destination in bits 63:32 (11.12.9).
fn send_ipi(apic_id: u32, low: u32) -> Result<(), &'static str> {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; reading it has no side effects.
    let apic_base = unsafe { x86::msr::rdmsr(MSR_APIC_BASE) };
    if apic_base & (1 << 11) == 0 {
        return Err("the boot CPU's local APIC is disabled");
    }
    if apic_base & (1 << 10) != 0 {
        // SAFETY: x2APIC mode is on, so the ICR MSR exists; an INIT, STARTUP or wake-up
        // IPI to one named CPU affects only that CPU (a wake-up only ends its HLT).
        unsafe { x86::msr::wrmsr(MSR_X2APIC_ICR, (u64::from(apic_id) << 32) | u64::from(low)) };
        return Ok(());
    }
    if apic_id > 0xff {
        return Err("its APIC ID does not fit an xAPIC destination (8 bits)");
    }
    let base = apic_base & 0x000f_ffff_ffff_f000;
    let reg = |r: u64| (base + r) as *mut u32;
    // The xAPIC registers are MMIO at the base IA32_APIC_BASE names, identity-mapped
    // uncached by the firmware; ICR high then low is the documented order. The IPI only
    // reaches the one CPU named (INIT/STARTUP: it runs nothing of ours yet; a wake-up
    // vector only ends its HLT).
    // SAFETY: writes of this CPU's own ICR (above), naming one CPU.
    unsafe {
        core::ptr::write_volatile(reg(REG_ICR_HIGH), apic_id << 24);
        core::ptr::write_volatile(reg(REG_ICR_LOW), low);
    }
    let start = crate::drivers::time::now_ticks();
    let limit = crate::drivers::time::ms_to_ticks(10).unwrap_or(u64::MAX);
    // SAFETY: as above; reading the ICR has no side effects.
    while unsafe { core::ptr::read_volatile(reg(REG_ICR_LOW)) } & ICR_PENDING != 0 {
        if crate::drivers::time::now_ticks().wrapping_sub(start) > limit {
            return Err("the local APIC did not deliver the IPI within 10 ms");
        }
        core::hint::spin_loop();
    }
    Ok(())
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
