//! The ACPI fixed hardware a guest's OSPM drives (ACPI 6.x section 4.8 "Fixed
//! Hardware Registers"): the PM1a event and control registers, the PM timer and the
//! FADT reset register, in one 16-port I/O block, plus the two legacy reset ports
//! Linux tries when ACPI reset is not used (the 8042's 0xFE pulse at port 0x64 and the
//! reset control register at 0xCF9).
//!
//! It is not the ACPI tables (`firmware/` writes those; its FADT must point at the
//! `pub const`s below) and it has no GPE block, no SMI command port (the FADT's
//! SMI_CMD is 0, so the machine is always in ACPI mode and SCI_EN reads as 1 from reset,
//! ACPI 6.x 5.2.9) and no sleep states other than S5.
//!
//! Layout (offsets of the model; the core maps the block with
//! `bus.map_ports(pm, PM_BASE, PM_BLOCK_LEN)` and the reset ports with
//! `bus.map_ports_at(pm, 0x64, 1, OFFSET_8042)` and `bus.map_ports_at(pm, 0xcf9, 1,
//! OFFSET_CF9)`):
//!
//! | port        | offset | register                          | width |
//! |-------------|--------|-----------------------------------|-------|
//! | 0x600-0x601 | 0x00   | PM1a_STS (write 1 to clear)       | 16    |
//! | 0x602-0x603 | 0x02   | PM1a_EN                           | 16    |
//! | 0x604-0x605 | 0x04   | PM1a_CNT                          | 16    |
//! | 0x606-0x607 | 0x06   | reserved (reads ones)             |       |
//! | 0x608-0x60B | 0x08   | PM_TMR, 32 bits (FADT TMR_VAL_EXT) | 32    |
//! | 0x60C       | 0x0C   | RESET_REG: write 0x0F to reset    | 8     |
//! | 0x60D-0x60F | 0x0D   | reserved (reads ones)             |       |
//! | 0x64        | 0x10   | 8042 command: 0xFE resets         | 8     |
//! | 0xCF9       | 0x11   | reset control: bit 2 resets       | 8     |
//!
//! Reads inside the block are assembled byte by byte at one instant (a 32-bit read
//! at 0x600 gives status and enable); writes go to one register at a time, 1 or 2
//! bytes for the PM1 registers, 1 byte for the reset registers. The two reset ports
//! are byte ports: a wider access there reads as ones and writes nothing.
//!
//! The PM timer is computed from guest time at 3.579545 MHz (ACPI 6.x 4.8.3.3) and is
//! 32 bits wide, so it wraps every 1199.6 s; TMR_STS is set when its bit 31 toggles.
//! The SCI (GSI 9, level) is high while SCI_EN is set and any status bit is set
//! together with its enable bit.

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, Effect, StateReader, StateWriter};

/// The first port of the block.
pub const PM_BASE: u16 = 0x600;
/// The block's length in ports.
pub const PM_BLOCK_LEN: u16 = 0x10;
/// FADT PM1a_EVT_BLK (status then enable).
pub const PM1A_EVT_BLK: u16 = PM_BASE;
/// FADT PM1_EVT_LEN.
pub const PM1_EVT_LEN: u8 = 4;
/// FADT PM1a_CNT_BLK.
pub const PM1A_CNT_BLK: u16 = PM_BASE + 4;
/// FADT PM1_CNT_LEN.
pub const PM1_CNT_LEN: u8 = 2;
/// FADT PM_TMR_BLK.
pub const PM_TMR_BLK: u16 = PM_BASE + 8;
/// FADT PM_TMR_LEN.
pub const PM_TMR_LEN: u8 = 4;
/// FADT RESET_REG (system I/O space, 8 bits wide).
pub const RESET_REG: u16 = PM_BASE + 0xc;
/// FADT RESET_VALUE.
pub const RESET_VALUE: u8 = 0x0f;
/// The SLP_TYP of S5 (the DSDT's `\_S5` package must carry this value).
pub const SLP_TYP_S5: u8 = 5;
/// The GSI of the SCI (FADT SCI_INT; level-triggered, active high in the MADT override).
pub const SCI_GSI: u32 = 9;
/// The PM timer's rate (ACPI 6.x 4.8.3.3).
pub const PM_TMR_HZ: u64 = 3_579_545;
/// The model's offset for port 0x64.
pub const OFFSET_8042: u64 = 0x10;
/// The model's offset for port 0xCF9.
pub const OFFSET_CF9: u64 = 0x11;
/// The 8042 command that pulses the CPU reset line.
pub const KBD_RESET_COMMAND: u8 = 0xfe;

// PM1 status and enable bits (ACPI 6.x 4.8.3.1, tables 4.16 and 4.17).
/// TMR_STS / TMR_EN.
pub const PM1_TMR: u16 = 1 << 0;
/// GBL_STS / GBL_EN.
pub const PM1_GBL: u16 = 1 << 5;
/// PWRBTN_STS / PWRBTN_EN.
pub const PM1_PWRBTN: u16 = 1 << 8;
/// SLPBTN_STS / SLPBTN_EN.
pub const PM1_SLPBTN: u16 = 1 << 9;
/// RTC_STS / RTC_EN.
pub const PM1_RTC: u16 = 1 << 10;
/// WAK_STS (status only).
pub const PM1_WAK: u16 = 1 << 15;
/// Status bits the model keeps (BM_STS, bit 4, never sets: no bus masters).
const STS_MASK: u16 = PM1_TMR | PM1_GBL | PM1_PWRBTN | PM1_SLPBTN | PM1_RTC | PM1_WAK;
/// Enable bits the model keeps.
const EN_MASK: u16 = PM1_TMR | PM1_GBL | PM1_PWRBTN | PM1_SLPBTN | PM1_RTC;

// PM1 control bits (ACPI 6.x 4.8.3.2.1, table 4.18).
/// SCI_EN.
pub const CNT_SCI_EN: u16 = 1 << 0;
/// BM_RLD.
const CNT_BM_RLD: u16 = 1 << 1;
/// SLP_TYP, bits 10..=12.
const CNT_SLP_TYP_SHIFT: u16 = 10;
const CNT_SLP_TYP: u16 = 7 << CNT_SLP_TYP_SHIFT;
/// SLP_EN (write-only, reads 0).
pub const CNT_SLP_EN: u16 = 1 << 13;
/// Control bits kept and read back (GBL_RLS and SLP_EN are write-only).
const CNT_MASK: u16 = CNT_SCI_EN | CNT_BM_RLD | CNT_SLP_TYP;

// 0xCF9 reset control register (Intel PCH datasheets, "Reset Control Register").
/// SYS_RST: hard (1) or soft (0) reset when RST_CPU is set; both reset the domain here.
const CF9_SYS_RST: u8 = 1 << 1;
/// RST_CPU: writing 1 resets.
const CF9_RST_CPU: u8 = 1 << 2;
/// FULL_RST.
const CF9_FULL_RST: u8 = 1 << 3;

const VERSION: u16 = 1;
const NS_PER_S: u128 = 1_000_000_000;

fn ticks_in(ns: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(PM_TMR_HZ) / NS_PER_S).unwrap_or(u64::MAX)
}

fn ns_for(ticks: u64) -> u64 {
    u64::try_from((u128::from(ticks) * NS_PER_S).div_ceil(u128::from(PM_TMR_HZ))).unwrap_or(u64::MAX)
}

/// The ACPI PM registers and reset ports (see the module doc for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    cf9: u8,
    /// Added to the clocks elapsed since guest time 0 to give the timer's 64-bit
    /// extension (non-zero after a load at another clock).
    tmr_offset: u64,
    /// The timer's extended value when TMR_STS was last brought up to date.
    tmr_checked: u64,
    /// The SCI level last driven.
    sci: bool,
    seen_ns: u64,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new()
    }
}

impl AcpiPm {
    /// The registers after power-on: nothing pending, nothing enabled, SCI_EN set
    /// (always in ACPI mode), the timer at 0 at guest time 0.
    pub const fn new() -> Self {
        Self { sts: 0, en: 0, cnt: CNT_SCI_EN, cf9: 0, tmr_offset: 0, tmr_checked: 0, sci: false, seen_ns: 0 }
    }

    /// The timer's 64-bit extension at `now` (PM_TMR is its low 32 bits).
    fn tmr_ext(&self, now: u64) -> u64 {
        ticks_in(now).wrapping_add(self.tmr_offset)
    }

    /// The PM timer as the guest reads it at `now`.
    pub fn pm_timer(&self, now: u64) -> u32 {
        self.tmr_ext(now) as u32
    }

    /// Bring TMR_STS up to date: set if bit 31 toggled since the last check.
    fn refresh(&mut self, now: u64) {
        self.seen_ns = self.seen_ns.max(now);
        let ext = self.tmr_ext(now);
        if ext >> 31 != self.tmr_checked >> 31 {
            self.sts |= PM1_TMR;
        }
        self.tmr_checked = ext;
    }

    /// Drive the SCI to match the registers.
    fn update_sci(&mut self, ctx: &mut DeviceCtx<'_>) {
        let level = self.cnt & CNT_SCI_EN != 0 && self.sts & self.en & EN_MASK != 0;
        if level != self.sci {
            self.sci = level;
            ctx.irq.set_level(SCI_GSI, level);
        }
    }

    /// The power button was pressed (e.g. `hvctl domain shutdown`): PWRBTN_STS and,
    /// if the guest enabled it, an SCI; the guest's OSPM then enters S5.
    pub fn press_power_button(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.refresh(ctx.now_ns);
        self.sts |= PM1_PWRBTN;
        self.update_sci(ctx);
    }

    /// The byte at `offset` as a read sees it (None: nothing there, reads as ones).
    fn byte_at(&self, offset: u64, now: u64) -> Option<u8> {
        let byte = |v: u64, i: u64| Some((v >> (8 * i)) as u8);
        match offset {
            0..=1 => byte(u64::from(self.sts), offset),
            2..=3 => byte(u64::from(self.en), offset - 2),
            4..=5 => byte(u64::from(self.cnt & CNT_MASK), offset - 4),
            8..=0xb => byte(u64::from(self.pm_timer(now)), offset - 8),
            // RESET_REG reads 0; so does the 8042 status (no data, input buffer empty,
            // so Linux's kb_wait() before the 0xFE pulse does not wait out its timeout).
            0xc | OFFSET_8042 => Some(0),
            OFFSET_CF9 => Some(self.cf9),
            _ => None,
        }
    }

    fn write_reg(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        let v = super::le_value(data);
        // 16-bit registers written a byte at a time change only that byte.
        let (mask, value) = match (offset, data.len()) {
            (0 | 2 | 4, 1) => (0x00ffu16, v as u16 & 0xff),
            (1 | 3 | 5, 1) => (0xff00u16, (v as u16 & 0xff) << 8),
            (0 | 2 | 4, _) => (0xffffu16, v as u16),
            _ => (0, 0),
        };
        match offset {
            0 | 1 => self.sts &= !(value & mask),
            2 | 3 => self.en = (self.en & !mask) | (value & mask & EN_MASK),
            4 | 5 => {
                self.cnt = (self.cnt & !mask) | (value & mask & CNT_MASK);
                // ACPI 6.x 4.8.3.2.1 / 7.4.2: writing SLP_EN enters the sleep state in
                // SLP_TYP; only S5 exists here, other types are ignored.
                let slp_typ = ((self.cnt & CNT_SLP_TYP) >> CNT_SLP_TYP_SHIFT) as u8;
                if value & mask & CNT_SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                    ctx.effect(Effect::PowerOff);
                }
            }
            // ACPI 6.x 4.8.3.6: writing RESET_VALUE to RESET_REG resets the system.
            0xc if data.len() == 1 && v as u8 == RESET_VALUE => ctx.effect(Effect::Reset),
            OFFSET_8042 if data.len() == 1 && v as u8 == KBD_RESET_COMMAND => ctx.effect(Effect::Reset),
            OFFSET_CF9 if data.len() == 1 => {
                let b = v as u8;
                if b & CF9_RST_CPU != 0 {
                    ctx.effect(Effect::Reset);
                }
                // RST_CPU is self-clearing; SYS_RST and FULL_RST read back.
                self.cf9 = b & (CF9_SYS_RST | CF9_FULL_RST);
            }
            _ => {}
        }
    }

    /// The state at guest time `now`, with the timer saved as its value then.
    ///
    /// Layout (version 1, little-endian): PM1a_STS u16, PM1a_EN u16, PM1a_CNT u16,
    /// 0xCF9 u8, SCI level u8 (0 or 1), timer extended value at `now` u64, timer
    /// clocks since TMR_STS was last checked u64.
    pub fn save_at(&self, now: u64) -> DeviceState {
        let mut w = StateWriter::new();
        let ext = self.tmr_ext(now);
        w.u16(self.sts).u16(self.en).u16(self.cnt).u8(self.cf9).u8(u8::from(self.sci));
        w.u64(ext).u64(ext.wrapping_sub(self.tmr_checked));
        w.finish(DeviceKind::AcpiPm, VERSION)
    }

    /// Load a state saved by [`AcpiPm::save_at`] as if it were guest time `now`; the
    /// timer continues from its saved value. On error nothing changed.
    pub fn load_at(&mut self, state: &DeviceState, now: u64) -> Result<(), DeviceError> {
        let malformed = |why| DeviceError::Malformed { kind: DeviceKind::AcpiPm, why };
        let mut r = StateReader::new(state, DeviceKind::AcpiPm, VERSION)?;
        let (sts, en, cnt, cf9, sci) = (r.u16()?, r.u16()?, r.u16()?, r.u8()?, r.u8()?);
        let (ext, since) = (r.u64()?, r.u64()?);
        r.finish()?;
        if sts & !STS_MASK != 0 || en & !EN_MASK != 0 || cnt & !CNT_MASK != 0 {
            return Err(malformed("reserved PM1 bits set"));
        }
        if cf9 & !(CF9_SYS_RST | CF9_FULL_RST) != 0 || sci > 1 {
            return Err(malformed("reserved reset-control or SCI bits set"));
        }
        *self = Self {
            sts,
            en,
            cnt,
            cf9,
            tmr_offset: ext.wrapping_sub(ticks_in(now)),
            tmr_checked: ext.wrapping_sub(since),
            sci: sci == 1,
            seen_ns: now,
        };
        Ok(())
    }
}

impl Device for AcpiPm {
    fn kind(&self) -> DeviceKind {
        DeviceKind::AcpiPm
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        self.refresh(ctx.now_ns);
        // The block's registers read byte by byte (a 32-bit read of PM1a_EVT gives status
        // and enable, one of PM_TMR the timer, all at the same instant); the reset ports
        // are byte ports, and a wider access there reads as ones.
        let byte_port = offset >= OFFSET_8042;
        for (i, b) in (0u64..).zip(data.iter_mut()) {
            let at = offset.saturating_add(i);
            // Neither a wide access at a reset port nor one running off the block's end
            // reaches the reset ports' offsets.
            let outside = i > 0 && (byte_port || at >= OFFSET_8042);
            *b = if outside { 0xff } else { self.byte_at(at, ctx.now_ns).unwrap_or(0xff) };
        }
        self.update_sci(ctx);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        self.refresh(ctx.now_ns);
        self.write_reg(offset, data, ctx);
        self.update_sci(ctx);
    }

    /// The next bit 31 toggle of the timer, when it would raise an SCI.
    fn next_event_ns(&self) -> Option<u64> {
        if self.en & PM1_TMR == 0 || self.sts & PM1_TMR != 0 || self.cnt & CNT_SCI_EN == 0 {
            return None;
        }
        let next_ext = (self.tmr_checked >> 31).wrapping_add(1) << 31;
        let ticks = next_ext.wrapping_sub(self.tmr_offset);
        Some(ns_for(ticks).max(self.seen_ns.saturating_add(1)))
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.refresh(ctx.now_ns);
        self.update_sci(ctx);
    }

    /// [`AcpiPm::save_at`] the latest guest time the model saw.
    fn save(&self) -> DeviceState {
        self.save_at(self.seen_ns)
    }

    /// [`AcpiPm::load_at`] the latest guest time the model saw (0 for a new model).
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        self.load_at(state, self.seen_ns)
    }

    fn save_at(&self, now_ns: u64) -> DeviceState {
        AcpiPm::save_at(self, now_ns)
    }

    fn load_at(&mut self, state: &DeviceState, now_ns: u64) -> Result<(), DeviceError> {
        AcpiPm::load_at(self, state, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::NoIrqs;
    use crate::devices::pit::tests::{Recorder, XorShift};

    fn rd(pm: &mut AcpiPm, offset: u64, len: usize, now: u64) -> u64 {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        let mut d = [0u8; 8];
        pm.read(offset, &mut d[..len], &mut ctx);
        super::super::le_value(&d[..len])
    }

    fn wr(pm: &mut AcpiPm, offset: u64, data: &[u8], now: u64) -> std::vec::Vec<Effect> {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        pm.write(offset, data, &mut ctx);
        ctx.effects.iter().copied().collect()
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz_of_guest_time_and_wraps_at_32_bits() {
        let mut pm = AcpiPm::new();
        let off = u64::from(PM_TMR_BLK - PM_BASE);
        assert_eq!(rd(&mut pm, off, 4, 0), 0);
        assert_eq!(rd(&mut pm, off, 4, 1_000_000_000), 3_579_545);
        assert_eq!(rd(&mut pm, off, 4, 1_000), 3, "3.58 clocks per µs, rounded down");
        // Linux's acpi_pm clocksource check: monotonic over many reads.
        let mut last = 0;
        for t in (0..10_000_000u64).step_by(997) {
            let v = rd(&mut pm, off, 4, t);
            assert!(v >= last);
            last = v;
        }
        let wrap = ns_for(1 << 32);
        assert_eq!(rd(&mut pm, off, 4, wrap - 1), 0xffff_ffff);
        assert_eq!(rd(&mut pm, off, 4, wrap), 0);
        assert_eq!(rd(&mut pm, off + 2, 2, ns_for(0x1234_5678)), 0x1234, "upper half");
        assert_eq!(rd(&mut pm, off, 8, 0) >> 32, 0xffff_ff00, "bytes past the timer: RESET_REG (0) then ones");
        assert_eq!(rd(&mut pm, OFFSET_8042, 2, 0), 0xff00, "the reset ports are byte ports");
        assert_eq!(rd(&mut pm, 0x0e, 4, 0), 0xffff_ffff, "a read off the block's end");
        // TMR_STS was set when bit 31 toggled on the way; write 1 clears it.
        assert_eq!(rd(&mut pm, 0, 2, wrap) & u64::from(PM1_TMR), 1);
        wr(&mut pm, 0, &[1, 0], wrap);
        assert_eq!(rd(&mut pm, 0, 2, wrap + 1) & u64::from(PM1_TMR), 0);
    }

    #[test]
    fn timer_sci_comes_at_the_bit_31_toggle_when_enabled() {
        let mut pm = AcpiPm::new();
        wr(&mut pm, 2, &[1, 0], 0); // TMR_EN
        let due = ns_for(1 << 31);
        assert_eq!(pm.next_event_ns(), Some(due));
        let mut rec = Recorder { now: due, ..Recorder::default() };
        let mut ctx = DeviceCtx::new(due, &mut rec);
        pm.advance(&mut ctx);
        assert_eq!(rec.events, [(due, SCI_GSI, true)]);
        assert_eq!(pm.next_event_ns(), None, "until TMR_STS is cleared");
        let mut ctx = DeviceCtx::new(due + 5, &mut rec);
        pm.write(0, &[1, 0], &mut ctx);
        assert_eq!(rec.events.last(), Some(&(due, SCI_GSI, false)), "clearing the status lowers the SCI");
        assert_eq!(pm.next_event_ns(), Some(ns_for(1 << 32)));
    }

    #[test]
    fn slp_en_with_s5_powers_off_and_other_types_do_nothing() {
        let mut pm = AcpiPm::new();
        let cnt = u64::from(PM1A_CNT_BLK - PM_BASE);
        assert_eq!(rd(&mut pm, cnt, 2, 0), u64::from(CNT_SCI_EN), "always in ACPI mode");
        // Linux's acpi_hw_legacy_sleep: SLP_TYP first, then SLP_TYP | SLP_EN.
        let typ = u16::from(SLP_TYP_S5) << 10 | CNT_SCI_EN;
        assert_eq!(wr(&mut pm, cnt, &typ.to_le_bytes(), 0), []);
        assert_eq!(rd(&mut pm, cnt, 2, 0), u64::from(typ));
        assert_eq!(wr(&mut pm, cnt, &(typ | CNT_SLP_EN).to_le_bytes(), 0), [Effect::PowerOff]);
        assert_eq!(rd(&mut pm, cnt, 2, 0), u64::from(typ), "SLP_EN reads 0");
        // A byte write of the high half works as well.
        assert_eq!(wr(&mut pm, cnt + 1, &[((typ | CNT_SLP_EN) >> 8) as u8], 0), [Effect::PowerOff]);
        for s in [0u16, 1, 3, 4, 7] {
            let v = s << 10 | CNT_SLP_EN;
            assert_eq!(wr(&mut pm, cnt, &v.to_le_bytes(), 0), [], "S{s} is not offered");
        }
    }

    #[test]
    fn reset_register_8042_pulse_and_cf9_reset() {
        let mut pm = AcpiPm::new();
        let reset = u64::from(RESET_REG - PM_BASE);
        assert_eq!(wr(&mut pm, reset, &[RESET_VALUE], 0), [Effect::Reset]);
        assert_eq!(wr(&mut pm, reset, &[0x0e], 0), []);
        assert_eq!(wr(&mut pm, reset, &[RESET_VALUE, 0], 0), [], "an 8-bit register");
        assert_eq!(rd(&mut pm, OFFSET_8042, 1, 0), 0, "8042 status: input buffer empty");
        assert_eq!(wr(&mut pm, OFFSET_8042, &[0xd1], 0), []);
        assert_eq!(wr(&mut pm, OFFSET_8042, &[KBD_RESET_COMMAND], 0), [Effect::Reset]);
        // Linux's reboot=pci: inb, write | 2, then | 6.
        let v = rd(&mut pm, OFFSET_CF9, 1, 0) as u8;
        assert_eq!(wr(&mut pm, OFFSET_CF9, &[v | 0x02], 0), []);
        assert_eq!(rd(&mut pm, OFFSET_CF9, 1, 0), 0x02);
        assert_eq!(wr(&mut pm, OFFSET_CF9, &[v | 0x06], 0), [Effect::Reset]);
        assert_eq!(rd(&mut pm, OFFSET_CF9, 1, 0), 0x02, "RST_CPU clears itself");
        assert_eq!(wr(&mut pm, OFFSET_CF9, &[0x0e], 0), [Effect::Reset], "REBOOT_COLD");
        assert_eq!(rd(&mut pm, 6, 2, 0), 0xffff, "reserved");
        assert_eq!(rd(&mut pm, 0x40, 1, 0), 0xff);
    }

    #[test]
    fn power_button_raises_the_sci_only_when_enabled() {
        let mut pm = AcpiPm::new();
        let mut rec = Recorder::default();
        let mut ctx = DeviceCtx::new(10, &mut rec);
        pm.press_power_button(&mut ctx);
        assert!(rec.events.is_empty());
        let mut ctx = DeviceCtx::new(20, &mut rec);
        pm.write(2, &PM1_PWRBTN.to_le_bytes(), &mut ctx);
        assert_eq!(rec.events, [(0, SCI_GSI, true)]);
        assert_eq!(rd(&mut pm, 0, 2, 30), u64::from(PM1_PWRBTN));
        let mut ctx = DeviceCtx::new(40, &mut rec);
        pm.write(0, &PM1_PWRBTN.to_le_bytes(), &mut ctx);
        assert_eq!(rec.events.last(), Some(&(0, SCI_GSI, false)));
    }

    #[test]
    fn save_and_load_keep_the_timer_and_registers_at_another_clock() {
        let mut pm = AcpiPm::new();
        wr(&mut pm, 2, &[1, 1], 0);
        wr(&mut pm, 4, &(u16::from(SLP_TYP_S5) << 10 | 1).to_le_bytes(), 0);
        wr(&mut pm, OFFSET_CF9, &[0x02], 0);
        let t = 123_456_789_000;
        let s = pm.save_at(t);
        let mut q = AcpiPm::new();
        let t2 = 5_000;
        q.load_at(&s, t2).unwrap();
        for d in [0u64, 1_000, 1_000_000_000, ns_for(1 << 33)] {
            assert_eq!(rd(&mut q, 8, 4, t2 + d), rd(&mut pm, 8, 4, t + d), "+{d}");
            assert_eq!(rd(&mut q, 0, 8, t2 + d), rd(&mut pm, 0, 8, t + d));
        }
        assert_eq!(rd(&mut q, OFFSET_CF9, 1, t2), 2);
        let mut r = AcpiPm::new();
        r.load(&q.save()).unwrap();
        assert_eq!(r.save_at(0).bytes[..8], q.save().bytes[..8]);
    }

    #[test]
    fn truncated_wrong_version_and_bad_states_are_refused_with_nothing_changed() {
        let mut pm = AcpiPm::new();
        wr(&mut pm, 2, &[1, 0], 0);
        let before = pm.clone();
        let good = pm.save_at(77);
        for n in 0..good.bytes.len() {
            let short = DeviceState { bytes: good.bytes[..n].to_vec(), ..good.clone() };
            assert!(pm.load_at(&short, 5).is_err());
        }
        let mut long = good.clone();
        long.bytes.push(0);
        assert!(pm.load_at(&long, 5).is_err());
        assert!(pm.load_at(&DeviceState { version: 2, ..good.clone() }, 5).is_err());
        assert!(pm.load_at(&DeviceState { kind: DeviceKind::Pit, ..good.clone() }, 5).is_err());
        let mut bad = good.clone();
        bad.bytes[3] = 0x80; // an enable bit that does not exist
        assert!(pm.load_at(&bad, 5).is_err());
        assert_eq!(pm, before);
    }

    #[test]
    fn random_accesses_and_time_steps_never_panic_or_spin() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let mut pm = AcpiPm::new();
        let mut rec = Recorder::default();
        let mut now = 0u64;
        for i in 0..100_000u32 {
            let r = rng.next();
            now = match r % 16 {
                0 => now.wrapping_add(r >> 8),
                1 => now.saturating_sub(r >> 40),
                _ => now.saturating_add((r >> 40) % 1_000_000),
            };
            let offset = (r >> 8) % 0x14;
            let len = [1usize, 2, 4, 8][((r >> 16) % 4) as usize];
            let bytes = rng.next().to_le_bytes();
            let mut ctx = DeviceCtx::new(now, &mut rec);
            if (r >> 24) & 1 == 0 {
                pm.write(offset, &bytes[..len], &mut ctx);
            } else {
                let mut d = [0u8; 8];
                pm.read(offset, &mut d[..len], &mut ctx);
            }
            if pm.next_event_ns().is_some_and(|t| t <= now) {
                pm.advance(&mut ctx);
                assert!(pm.next_event_ns().is_none_or(|t| t > now));
            }
            if i % 1000 == 0 {
                let s = pm.save_at(now);
                let mut q = AcpiPm::new();
                q.load_at(&s, now).unwrap();
                assert_eq!(q.save_at(now), s);
            }
        }
    }
}
