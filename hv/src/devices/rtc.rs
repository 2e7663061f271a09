//! The CMOS real-time clock at ports 0x70 (index, bit 7 disables NMI) and 0x71
//! (data): a Motorola MC146818A with the PC's 128 bytes of CMOS RAM and the IBM AT
//! century byte at 0x32 (the FADT's CENTURY field points there).
//!
//! It is not the host's clock (the core reads that and passes it to [`Rtc::new`]) and
//! it never touches hardware.
//!
//! Time is not ticked: the model keeps the wall clock as "Unix nanoseconds at guest
//! time 0" and computes every time register from `ctx.now_ns` when it is read, in BCD
//! or binary and 24- or 12-hour form as register B asks. A guest that sets the clock
//! (MC146818A datasheet, register B SET bit: set SET, write the registers, clear SET)
//! moves that offset; while SET is 1 the time registers hold what the guest wrote and
//! no update cycle runs. Register C's flags (PF, AF, UF) are brought up to date from
//! guest time at each access and at [`Device::advance`], and the IRQ line (GSI 8) is
//! high while a flag is set together with its enable bit, until the guest reads
//! register C, as the MC146818A's IRQ pin is.
//!
//! Simplifications: the divider (register A DV bits) always runs, whatever the guest
//! writes there; the day of week is computed from the date (writes to it are ignored);
//! clearing SET starts the new second at that instant; out-of-range fields the guest
//! writes (month 13, BCD digits above 9) are clamped to their range before the date is
//! converted; alarms compare hours, minutes and seconds (with the datasheet's
//! "don't care" codes 0xC0..=0xFF), as the MC146818A has no date alarm.
//!
//! The periodic interrupt cannot run faster than the datasheet's fastest rate (rate 3,
//! 8192 Hz, 122 µs), and a flag that is already pending asks for no further events
//! until register C is read, so a guest cannot make the hypervisor spin on it.

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, StateReader, StateWriter, put_le};

/// The GSI the RTC drives (ISA IRQ 8).
pub const RTC_GSI: u32 = 8;
/// The century byte's CMOS index (FADT CENTURY).
pub const RTC_CENTURY: u8 = 0x32;
/// Register A: update in progress.
pub const REG_A_UIP: u8 = 0x80;
/// Register B: SET (updates inhibited while the guest writes the time).
pub const REG_B_SET: u8 = 0x80;
/// Register B: periodic interrupt enable.
pub const REG_B_PIE: u8 = 0x40;
/// Register B: alarm interrupt enable.
pub const REG_B_AIE: u8 = 0x20;
/// Register B: update-ended interrupt enable.
pub const REG_B_UIE: u8 = 0x10;
/// Register B: data mode binary (else BCD).
pub const REG_B_DM: u8 = 0x04;
/// Register B: 24-hour mode (else 12-hour with bit 7 of the hours for PM).
pub const REG_B_24H: u8 = 0x02;
/// Register C: IRQF (some enabled flag is set).
pub const REG_C_IRQF: u8 = 0x80;
/// Register D: valid RAM and time.
pub const REG_D_VRT: u8 = 0x80;
/// How long before each update UIP reads 1: 244 µs (8 cycles of the 32.768 kHz time
/// base; MC146818A datasheet, "Update Cycle", t_BUC).
pub const UIP_NS: i128 = 244_141;

const NS_PER_S: i128 = 1_000_000_000;
/// The time base: 32.768 kHz.
const BASE_HZ: i128 = 32_768;
const VERSION: u16 = 1;
/// The largest wall clock magnitude a saved state may carry (Unix ns; about 2.5e12
/// years), so that the clock arithmetic in i128 cannot overflow.
const MAX_CLOCK_NS: i128 = 1 << 96;
const NONE: u64 = u64::MAX;
/// Register A after the BIOS: DV = 010 (32.768 kHz, running), rate 6 (1024 Hz).
const REG_A_RESET: u8 = 0x26;
/// Register B after the BIOS: 24-hour, BCD.
const REG_B_RESET: u8 = REG_B_24H;
/// Register C flags (PF, AF, UF): the same bit positions as their enables in B.
const FLAGS: u8 = 0x70;
const PF: u8 = 0x40;
const AF: u8 = 0x20;
const UF: u8 = 0x10;
/// CMOS indices of the time registers (MC146818A "Address Map"; 0x32 is the AT's).
const SECONDS: usize = 0;
const MINUTES: usize = 2;
const HOURS: usize = 4;
const DAY_OF_WEEK: usize = 6;
const DAY: usize = 7;
const MONTH: usize = 8;
const YEAR: usize = 9;
const CENTURY: usize = RTC_CENTURY as usize;
const TIME_REGS: [usize; 8] = [SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR, CENTURY];

/// A proleptic Gregorian date and time of day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// The year (astronomical: year 0 is 1 BC).
    pub year: i64,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
    /// 0 = Sunday ..= 6 = Saturday (ignored by [`civil_to_unix`]).
    pub weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`; eras of 400 years of 146097 days). `month` 1..=12; a `day` past
/// the month's end counts on into the next month.
pub fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let m = i64::from(month.clamp(1, 12));
    let y = year.clamp(-(1 << 40), 1 << 40) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days.clamp(-(1 << 48), 1 << 48) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The civil date and time of Unix second `secs`.
pub fn unix_to_civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: (tod / 3600) as u8,
        minute: (tod / 60 % 60) as u8,
        second: (tod % 60) as u8,
        // 1970-01-01 was a Thursday.
        weekday: (days + 4).rem_euclid(7) as u8,
    }
}

/// The Unix second of a civil date and time (fields past their range count on, as in
/// [`days_from_civil`]).
pub fn civil_to_unix(c: &Civil) -> i64 {
    let tod = i64::from(c.hour) * 3600 + i64::from(c.minute) * 60 + i64::from(c.second);
    days_from_civil(c.year, c.month, c.day).saturating_mul(86_400).saturating_add(tod)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

/// The MC146818A and CMOS RAM (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtc {
    /// CMOS RAM. Indices 1, 3, 5 are the alarm, 0x0A and 0x0B registers A (without
    /// UIP) and B; the time registers hold the guest's values only while SET is 1.
    cmos: [u8; 128],
    /// Port 0x70 as last written (bit 7 NMI disable, bits 0..=6 the index).
    index: u8,
    /// Wall clock, Unix ns, at guest time 0 (the clock is this + `now`).
    clock_at_zero: i128,
    /// Register C's PF/AF/UF, brought up to date through `checked_ns`.
    flags: u8,
    checked_ns: u64,
    /// The next update at which the alarm matches (guest ns), if any.
    alarm_ns: Option<u64>,
    /// The IRQ line as last driven.
    irq: bool,
    seen_ns: u64,
}

impl Rtc {
    /// An RTC showing Unix second `unix_secs` at guest time 0 (the core passes the
    /// host's RTC), registers A and B as a BIOS leaves them (1024 Hz rate, 24-hour BCD).
    pub fn new(unix_secs: i64) -> Self {
        let mut cmos = [0u8; 128];
        cmos[0x0a] = REG_A_RESET;
        cmos[0x0b] = REG_B_RESET;
        let mut rtc = Self {
            cmos,
            index: 0,
            clock_at_zero: i128::from(unix_secs) * NS_PER_S,
            flags: 0,
            checked_ns: 0,
            alarm_ns: None,
            irq: false,
            seen_ns: 0,
        };
        rtc.rearm_alarm(0);
        rtc
    }

    /// Preset a CMOS RAM byte (for the core: e.g. memory sizes a firmware reads). The
    /// clock registers (0x00..=0x0D and the century) are not RAM and are left alone.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) {
        let i = usize::from(index);
        if let Some(b) = self.cmos.get_mut(i).filter(|_| i > 0x0d && i != CENTURY) {
            *b = value;
        }
    }

    /// Port 0x70 bit 7 as the guest last wrote it (the core may gate NMIs on it).
    pub fn nmi_disabled(&self) -> bool {
        self.index & 0x80 != 0
    }

    /// The wall clock at guest time `now`, in Unix ns.
    pub fn wall_clock_ns(&self, now: u64) -> i128 {
        self.clock_at_zero + i128::from(now)
    }

    fn unix_secs(&self, now: u64) -> i64 {
        let s = self.wall_clock_ns(now).div_euclid(NS_PER_S);
        i64::try_from(s).unwrap_or(if s < 0 { i64::MIN } else { i64::MAX })
    }

    fn reg_b(&self) -> u8 {
        self.cmos[0x0b]
    }

    fn set_mode(&self) -> bool {
        self.reg_b() & REG_B_SET != 0
    }

    fn enc(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_DM != 0 { v } else { to_bcd(v) }
    }

    fn dec(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_DM != 0 { v } else { from_bcd(v) }
    }

    fn enc_hour(&self, h: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.enc(h);
        }
        let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
        self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
    }

    fn dec_hour(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.dec(v);
        }
        let h = self.dec(v & 0x7f);
        h % 12 + if v & 0x80 != 0 { 12 } else { 0 }
    }

    /// The time registers for Unix second `secs`, indexed like `TIME_REGS`.
    fn time_regs(&self, secs: i64) -> [u8; 8] {
        let c = unix_to_civil(secs);
        let year = c.year.rem_euclid(10_000);
        [
            self.enc(c.second),
            self.enc(c.minute),
            self.enc_hour(c.hour),
            self.enc(c.weekday + 1),
            self.enc(c.day),
            self.enc(c.month),
            self.enc((year % 100) as u8),
            self.enc((year / 100) as u8),
        ]
    }

    /// The Unix second the time registers `r` (indexed like `TIME_REGS`) say.
    fn regs_to_unix(&self, r: &[u8; 8]) -> i64 {
        let [sec, min, hour, _dow, day, month, year, century] = *r;
        let c = Civil {
            year: i64::from(self.dec(century).min(99)) * 100 + i64::from(self.dec(year).min(99)),
            month: self.dec(month).clamp(1, 12),
            day: self.dec(day).clamp(1, 31),
            hour: self.dec_hour(hour).min(23),
            minute: self.dec(min).min(59),
            second: self.dec(sec).min(59),
            weekday: 0,
        };
        civil_to_unix(&c)
    }

    /// Guest ns at which the wall clock reaches Unix ns `clock` (None: before guest time 0
    /// or past the end of guest time).
    fn guest_ns_of(&self, clock: i128) -> Option<u64> {
        u64::try_from(clock - self.clock_at_zero).ok()
    }

    /// Periodic interrupt period in 32.768 kHz cycles (register A RS bits; datasheet
    /// "Periodic Interrupt Rate" table: rates 1 and 2 are 256 and 128 Hz, rate n >= 3 is
    /// 65536 >> n Hz), or None for rate 0.
    fn period_cycles(&self) -> Option<i128> {
        match self.cmos[0x0a] & 0x0f {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            n => Some(1 << (n - 1)),
        }
    }

    fn cycles_at(&self, now: u64) -> i128 {
        (self.wall_clock_ns(now) * BASE_HZ).div_euclid(NS_PER_S)
    }

    /// The next periodic boundary strictly after guest time `t`.
    fn next_periodic(&self, t: u64) -> Option<u64> {
        let p = self.period_cycles()?;
        let next = (self.cycles_at(t).div_euclid(p) + 1) * p;
        // The first ns at which `cycles_at` reaches `next`.
        let clock = (next * NS_PER_S + BASE_HZ - 1).div_euclid(BASE_HZ);
        self.guest_ns_of(clock)
    }

    /// The next update (second boundary) strictly after guest time `t`.
    fn next_update(&self, t: u64) -> Option<u64> {
        let next = i128::from(self.unix_secs(t)) + 1;
        self.guest_ns_of(next * NS_PER_S)
    }

    /// One alarm field: None for "don't care" (0xC0..=0xFF), else its value.
    fn alarm_field(&self, index: usize, hour: bool) -> Option<u8> {
        let v = self.cmos.get(index).copied().unwrap_or(0);
        if v & 0xc0 == 0xc0 {
            return None;
        }
        Some(if hour { self.dec_hour(v) } else { self.dec(v) })
    }

    /// Find the next update after guest time `t` at which the alarm matches.
    fn rearm_alarm(&mut self, t: u64) {
        self.alarm_ns = None;
        if self.set_mode() {
            return;
        }
        let (sa, ma, ha) = (self.alarm_field(1, false), self.alarm_field(3, false), self.alarm_field(5, true));
        if sa.is_some_and(|v| v > 59) || ma.is_some_and(|v| v > 59) || ha.is_some_and(|v| v > 23) {
            return; // can never match
        }
        let first = i128::from(self.unix_secs(t)) + 1;
        let tod0 = first.rem_euclid(86_400);
        let (h0, m0, s0) = (tod0 / 3600, tod0 / 60 % 60, tod0 % 60);
        let mut best: Option<i128> = None;
        // At most 24 * 60 (hour, minute) pairs, two candidate seconds each.
        for h in ha.map_or(0..24, |h| h..h + 1) {
            for m in ma.map_or(0..60, |m| m..m + 1) {
                let same = i128::from(h) == h0 && i128::from(m) == m0;
                let s = sa.map_or(if same { s0 } else { 0 }, i128::from);
                let c = i128::from(h) * 3600 + i128::from(m) * 60 + s;
                let delta = (c - tod0).rem_euclid(86_400);
                if best.is_none_or(|b| delta < b) {
                    best = Some(delta);
                }
            }
        }
        self.alarm_ns = best.and_then(|d| self.guest_ns_of((first + d) * NS_PER_S));
    }

    /// Bring register C's flags up to date through guest time `now`.
    fn refresh(&mut self, now: u64) {
        self.seen_ns = self.seen_ns.max(now);
        let was = self.checked_ns;
        if now <= was {
            return;
        }
        if let Some(p) = self.period_cycles()
            && self.cycles_at(now).div_euclid(p) > self.cycles_at(was).div_euclid(p)
        {
            self.flags |= PF;
        }
        if !self.set_mode() {
            if self.unix_secs(now) > self.unix_secs(was) {
                self.flags |= UF;
            }
            if self.alarm_ns.is_some_and(|a| a <= now) {
                self.flags |= AF;
                self.rearm_alarm(now);
            }
        }
        self.checked_ns = now;
    }

    fn irqf(&self) -> bool {
        self.flags & self.reg_b() & FLAGS != 0
    }

    fn update_irq(&mut self, ctx: &mut DeviceCtx<'_>) {
        let level = self.irqf();
        if level != self.irq {
            self.irq = level;
            ctx.irq.set_level(RTC_GSI, level);
        }
    }

    fn uip(&self, now: u64) -> bool {
        !self.set_mode() && self.wall_clock_ns(now).rem_euclid(NS_PER_S) >= NS_PER_S - UIP_NS
    }

    fn read_reg(&mut self, i: usize, now: u64) -> u8 {
        if let Some(k) = TIME_REGS.iter().position(|&r| r == i) {
            if self.set_mode() {
                return self.cmos.get(i).copied().unwrap_or(0);
            }
            return self.time_regs(self.unix_secs(now)).get(k).copied().unwrap_or(0);
        }
        match i {
            0x0a => (self.cmos[0x0a] & !REG_A_UIP) | if self.uip(now) { REG_A_UIP } else { 0 },
            0x0c => {
                // Reading C returns the flags and clears them (and the IRQ pin).
                let v = self.flags | if self.irqf() { REG_C_IRQF } else { 0 };
                self.flags = 0;
                v
            }
            0x0d => REG_D_VRT,
            _ => self.cmos.get(i).copied().unwrap_or(0xff),
        }
    }

    fn write_reg(&mut self, i: usize, v: u8, now: u64) {
        if let Some(k) = TIME_REGS.iter().position(|&r| r == i) {
            if self.set_mode() {
                if let Some(b) = self.cmos.get_mut(i) {
                    *b = v;
                }
            } else if i != DAY_OF_WEEK {
                // A field written without SET takes effect at once, the second's phase kept.
                let old = self.unix_secs(now);
                let mut regs = self.time_regs(old);
                if let Some(r) = regs.get_mut(k) {
                    *r = v;
                }
                let new = self.regs_to_unix(&regs);
                self.clock_at_zero += (i128::from(new) - i128::from(old)) * NS_PER_S;
                self.checked_ns = now;
                self.rearm_alarm(now);
            }
            return;
        }
        match i {
            1 | 3 | 5 => {
                self.cmos[i] = v;
                self.rearm_alarm(now);
            }
            0x0a => self.cmos[0x0a] = v & !REG_A_UIP,
            0x0b => self.write_b(v, now),
            0x0c | 0x0d => {}
            _ => {
                if let Some(b) = self.cmos.get_mut(i) {
                    *b = v;
                }
            }
        }
    }

    fn write_b(&mut self, v: u8, now: u64) {
        let was_set = self.set_mode();
        let mut v = v;
        if v & REG_B_SET != 0 {
            // Datasheet, register B: UIE is cleared while SET is 1.
            v &= !REG_B_UIE;
        }
        self.cmos[0x0b] = v;
        let set = self.set_mode();
        if set && !was_set {
            // Hold the time as it is now, in the (new) format, for the guest to rewrite.
            let regs = self.time_regs(self.unix_secs(now));
            for (&idx, r) in TIME_REGS.iter().zip(regs) {
                if let Some(b) = self.cmos.get_mut(idx) {
                    *b = r;
                }
            }
        } else if !set && was_set {
            let mut regs = [0u8; 8];
            for (r, &idx) in regs.iter_mut().zip(TIME_REGS.iter()) {
                *r = self.cmos.get(idx).copied().unwrap_or(0);
            }
            let secs = self.regs_to_unix(&regs);
            self.clock_at_zero = i128::from(secs) * NS_PER_S - i128::from(now);
            self.checked_ns = now;
        }
        self.rearm_alarm(now);
    }

    /// The state at guest time `now`, with the wall clock saved as its value then and
    /// deadlines as ns remaining, so the state loads at any other guest clock.
    ///
    /// Layout (version 1, little-endian): CMOS RAM 128 bytes (register A without UIP at
    /// 0x0A, B at 0x0B), port 0x70 u8, wall clock at `now` in Unix ns as i128 (low u64,
    /// high u64), register C flags u8 (bits 4..=6), IRQ level u8 (0 or 1), ns since the
    /// flags were last brought up to date u64, ns until the next alarm match u64
    /// (`u64::MAX`: none).
    pub fn save_at(&self, now: u64) -> DeviceState {
        let mut w = StateWriter::new();
        let clock = self.wall_clock_ns(now) as u128;
        w.bytes(&self.cmos).u8(self.index).u64(clock as u64).u64((clock >> 64) as u64);
        w.u8(self.flags).u8(u8::from(self.irq)).u64(now.saturating_sub(self.checked_ns));
        w.u64(self.alarm_ns.map_or(NONE, |a| a.saturating_sub(now).min(NONE - 1)));
        w.finish(DeviceKind::Rtc, VERSION)
    }

    /// Load a state saved by [`Rtc::save_at`] as if it were guest time `now`; on error
    /// nothing changed.
    pub fn load_at(&mut self, state: &DeviceState, now: u64) -> Result<(), DeviceError> {
        let malformed = |why| DeviceError::Malformed { kind: DeviceKind::Rtc, why };
        let mut r = StateReader::new(state, DeviceKind::Rtc, VERSION)?;
        let mut cmos = [0u8; 128];
        cmos.copy_from_slice(r.bytes(128)?);
        let index = r.u8()?;
        let (lo, hi) = (r.u64()?, r.u64()?);
        let (flags, irq, since, alarm) = (r.u8()?, r.u8()?, r.u64()?, r.u64()?);
        r.finish()?;
        if flags & !FLAGS != 0 || irq > 1 {
            return Err(malformed("register C flags or IRQ level out of range"));
        }
        if cmos[0x0a] & REG_A_UIP != 0 {
            return Err(malformed("UIP stored in register A"));
        }
        let clock = (u128::from(hi) << 64 | u128::from(lo)) as i128;
        if !(-MAX_CLOCK_NS..=MAX_CLOCK_NS).contains(&clock) {
            return Err(malformed("wall clock out of range"));
        }
        *self = Self {
            cmos,
            index,
            clock_at_zero: clock - i128::from(now),
            flags,
            checked_ns: now.saturating_sub(since),
            alarm_ns: (alarm != NONE).then(|| now.saturating_add(alarm)),
            irq: irq == 1,
            seen_ns: now,
        };
        Ok(())
    }
}

impl Device for Rtc {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Rtc
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        self.refresh(now);
        let v = match (offset, data.len()) {
            // Port 0x70 is write-only on the PC.
            (1, 1) => u64::from(self.read_reg(usize::from(self.index & 0x7f), now)),
            _ => u64::MAX,
        };
        put_le(data, v);
        self.update_irq(ctx);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        self.refresh(now);
        match (offset, data) {
            (0, [v]) => self.index = *v,
            (1, [v]) => self.write_reg(usize::from(self.index & 0x7f), *v, now),
            _ => {}
        }
        self.update_irq(ctx);
    }

    /// The next moment a flag whose interrupt is enabled gets set, unless the IRQ is
    /// already high (then nothing changes until register C is read).
    fn next_event_ns(&self) -> Option<u64> {
        if self.irq {
            return None;
        }
        let b = self.reg_b();
        let t = self.checked_ns;
        let periodic = if b & REG_B_PIE != 0 { self.next_periodic(t) } else { None };
        let update = if b & REG_B_UIE != 0 && !self.set_mode() { self.next_update(t) } else { None };
        let alarm = if b & REG_B_AIE != 0 { self.alarm_ns } else { None };
        [periodic, update, alarm].into_iter().flatten().min()
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.refresh(ctx.now_ns);
        self.update_irq(ctx);
    }

    /// [`Rtc::save_at`] the latest guest time the model saw.
    fn save(&self) -> DeviceState {
        self.save_at(self.seen_ns)
    }

    /// [`Rtc::load_at`] the latest guest time the model saw (0 for a new model).
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        self.load_at(state, self.seen_ns)
    }

    fn save_at(&self, now_ns: u64) -> DeviceState {
        Rtc::save_at(self, now_ns)
    }

    fn load_at(&mut self, state: &DeviceState, now_ns: u64) -> Result<(), DeviceError> {
        Rtc::load_at(self, state, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::NoIrqs;
    use crate::devices::pit::tests::{Recorder, XorShift};

    const LEAP_DAY_2024_235958: i64 = 1_709_251_198;

    fn rd(rtc: &mut Rtc, reg: u8, now: u64) -> u8 {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        rtc.write(0, &[reg], &mut ctx);
        let mut d = [0u8];
        rtc.read(1, &mut d, &mut ctx);
        d[0]
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8, now: u64) {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        rtc.write(0, &[reg], &mut ctx);
        rtc.write(1, &[v], &mut ctx);
    }

    /// sec, min, hour, dow, day, month, year, century as read.
    fn time(rtc: &mut Rtc, now: u64) -> [u8; 8] {
        [0u8, 2, 4, 6, 7, 8, 9, 0x32].map(|r| rd(rtc, r, now))
    }

    #[test]
    fn civil_conversion_across_leap_years_and_centuries() {
        assert_eq!(unix_to_civil(0), Civil { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0, weekday: 4 });
        let c = unix_to_civil(951_782_399 + 1);
        assert_eq!((c.year, c.month, c.day, c.weekday), (2000, 2, 29, 2), "2000 is a leap year");
        let c = unix_to_civil(4_107_542_399 + 1);
        assert_eq!((c.year, c.month, c.day, c.weekday), (2100, 3, 1, 1), "2100 is not");
        let c = unix_to_civil(946_684_799);
        assert_eq!((c.year, c.month, c.day, c.hour, c.minute, c.second), (1999, 12, 31, 23, 59, 59));
        assert_eq!(unix_to_civil(-1).year, 1969);
        // Day by day from 1600 to 2400: round trips, and each day follows the last.
        let month_len = |y: i64, m: u8| match m {
            2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let start = days_from_civil(1600, 1, 1);
        let mut prev = civil_from_days(start);
        assert_eq!(prev, (1600, 1, 1));
        for d in start + 1..days_from_civil(2400, 12, 31) {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
            let expect = if prev.2 < month_len(prev.0, prev.1) {
                (prev.0, prev.1, prev.2 + 1)
            } else if prev.1 < 12 {
                (prev.0, prev.1 + 1, 1)
            } else {
                (prev.0 + 1, 1, 1)
            };
            assert_eq!((y, m, day), expect);
            prev = (y, m, day);
        }
        for s in [0i64, 1, 86_399, LEAP_DAY_2024_235958, -86_401, 253_402_300_799] {
            assert_eq!(civil_to_unix(&unix_to_civil(s)), s);
        }
        // Extremes neither panic nor overflow.
        let _ = civil_to_unix(&unix_to_civil(i64::MAX));
        let _ = civil_to_unix(&unix_to_civil(i64::MIN));
    }

    #[test]
    fn reads_in_bcd_then_binary_and_time_advances_over_the_leap_day() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        assert_eq!(time(&mut rtc, 0), [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]);
        assert_eq!(time(&mut rtc, 2_000_000_000), [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]);
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_DM, 0);
        assert_eq!(time(&mut rtc, 1_500_000_000), [59, 59, 23, 5, 29, 2, 24, 20]);
        assert_eq!(rd(&mut rtc, 0x0d, 0), REG_D_VRT);
    }

    #[test]
    fn twelve_hour_mode_marks_pm_in_bit_7() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        wr(&mut rtc, 0x0b, 0, 0); // 12-hour, BCD
        assert_eq!(rd(&mut rtc, 4, 0), 0x80 | 0x11, "11 PM");
        assert_eq!(rd(&mut rtc, 4, 2_000_000_000), 0x12, "midnight is 12 AM");
        assert_eq!(rd(&mut rtc, 4, 2_000_000_000 + 12 * 3_600_000_000_000), 0x80 | 0x12, "noon is 12 PM");
        wr(&mut rtc, 0x0b, REG_B_DM, 0); // 12-hour, binary
        assert_eq!(rd(&mut rtc, 4, 2_000_000_000 + 13 * 3_600_000_000_000), 0x80 | 1);
        // Set 3 PM in 12-hour mode; it reads as 15 in 24-hour mode.
        wr(&mut rtc, 0x0b, REG_B_DM | REG_B_SET, 0);
        wr(&mut rtc, 4, 0x83, 0);
        wr(&mut rtc, 0x0b, REG_B_DM, 0);
        wr(&mut rtc, 0x0b, REG_B_DM | REG_B_24H, 0);
        assert_eq!(rd(&mut rtc, 4, 0), 15);
    }

    #[test]
    fn uip_reads_1_only_in_the_244us_before_each_update() {
        let mut rtc = Rtc::new(1000);
        assert_eq!(rd(&mut rtc, 0x0a, 500_000_000), 0x26);
        assert_eq!(rd(&mut rtc, 0x0a, 999_800_000), 0x26 | REG_A_UIP);
        assert_eq!(rd(&mut rtc, 0x0a, 999_755_000), 0x26, "just before the window");
        assert_eq!(rd(&mut rtc, 0x0a, 999_756_000), 0x26 | REG_A_UIP, "just inside it");
        assert_eq!(rd(&mut rtc, 0x0a, 1_000_000_000), 0x26, "the update is done");
        // Linux's mc146818_get_time: wait while UIP, then read a consistent time.
        let mut t = 999_800_000u64;
        while rd(&mut rtc, 0x0a, t) & REG_A_UIP != 0 {
            t += 10_000;
        }
        assert_eq!(rd(&mut rtc, 0, t), 0x41, "1001 s: 00:16:41");
        wr(&mut rtc, 0x0a, 0xff, 0);
        assert_eq!(rd(&mut rtc, 0x0a, 0), 0x7f, "UIP is read-only");
    }

    #[test]
    fn set_holds_the_registers_and_the_new_time_runs_from_its_release() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        let t = 10_000_000_000;
        // Linux's mc146818_set_time: B | SET, A | divider reset, the fields, A, B.
        let b = rd(&mut rtc, 0x0b, t);
        wr(&mut rtc, 0x0b, b | REG_B_SET, t);
        wr(&mut rtc, 0x0a, 0x70 | 0x06, t);
        for (reg, v) in [(0u8, 0x30u8), (2, 0x15), (4, 0x08), (7, 0x31), (8, 0x12), (9, 0x99), (0x32, 0x19)] {
            wr(&mut rtc, reg, v, t);
        }
        assert_eq!(rd(&mut rtc, 0, t + 5_000_000_000), 0x30, "held while SET");
        wr(&mut rtc, 0x0a, 0x26, t + 6_000_000_000);
        wr(&mut rtc, 0x0b, b, t + 6_000_000_000);
        let now = t + 6_000_000_000 + 1_500_000_000;
        assert_eq!(time(&mut rtc, now), [0x31, 0x15, 0x08, 0x06, 0x31, 0x12, 0x99, 0x19], "1999-12-31 (a Friday)");
        assert_eq!(rtc.wall_clock_ns(now), (946_628_130 + 1) * 1_000_000_000 + 500_000_000);
        // One field written without SET moves the clock at once, keeping the phase.
        wr(&mut rtc, 9, 0x25, now);
        assert_eq!(time(&mut rtc, now + 250_000_000)[6], 0x25);
        assert_eq!(rtc.wall_clock_ns(now).rem_euclid(1_000_000_000), 500_000_000, "1925: before 1970");
        // SET clears UIE (datasheet); out-of-range fields are clamped.
        wr(&mut rtc, 0x0b, REG_B_SET | REG_B_UIE | REG_B_24H, now);
        assert_eq!(rd(&mut rtc, 0x0b, now) & REG_B_UIE, 0);
        wr(&mut rtc, 8, 0x13, now);
        wr(&mut rtc, 0, 0xff, now);
        wr(&mut rtc, 0x0b, REG_B_24H, now);
        let c = unix_to_civil(rtc.wall_clock_ns(now).div_euclid(1_000_000_000) as i64);
        assert_eq!((c.month, c.second), (12, 59));
    }

    #[test]
    fn periodic_flags_interrupt_on_gsi_8_and_register_c_clears_them() {
        let mut rtc = Rtc::new(0);
        let mut rec = Recorder::default();
        // 1024 Hz (rate 6): the first boundary at 976.5625 µs.
        assert_eq!(rtc.next_event_ns(), None, "nothing enabled");
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_PIE, 0);
        assert_eq!(rtc.next_event_ns(), Some(976_563));
        let mut ctx = DeviceCtx::new(976_562, &mut rec);
        rtc.advance(&mut ctx);
        assert!(rec.events.is_empty(), "not yet");
        let mut ctx = DeviceCtx::new(976_563, &mut rec);
        rtc.advance(&mut ctx);
        assert_eq!(rec.events, [(0, RTC_GSI, true)]);
        assert_eq!(rtc.next_event_ns(), None, "the line is high until C is read");
        let mut d = [0u8];
        {
            let mut ctx = DeviceCtx::new(1_000_000, &mut rec);
            rtc.write(0, &[0x0c], &mut ctx);
            rtc.read(1, &mut d, &mut ctx);
        }
        assert_eq!(d[0], REG_C_IRQF | PF);
        assert_eq!(rec.events.last(), Some(&(0, RTC_GSI, false)));
        assert_eq!(rd(&mut rtc, 0x0c, 1_000_000), 0, "read clears");
        assert_eq!(rtc.next_event_ns(), Some(1_953_125));
        // 8192 Hz (rate 3) is the fastest; rate 1 and 2 are 256 and 128 Hz.
        for (rate, period) in [(3u8, 122_070u64), (1, 3_906_250), (2, 7_812_500), (15, 500_000_000)] {
            let mut rtc = Rtc::new(0);
            wr(&mut rtc, 0x0a, 0x20 | rate, 0);
            wr(&mut rtc, 0x0b, REG_B_24H | REG_B_PIE, 0);
            let e = rtc.next_event_ns().unwrap();
            assert!(e.abs_diff(period) <= 1, "rate {rate}: {e}");
        }
        // Flags are set even with the interrupt disabled, without IRQF or an event.
        let mut rtc = Rtc::new(0);
        assert_eq!(rd(&mut rtc, 0x0c, 1_100_000_000), PF | UF);
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_UIE, 300_000_000);
        assert_eq!(rtc.next_event_ns(), Some(1_000_000_000));
        // Alarm at 00:00:05 (BCD) on the next day.
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_AIE, 300_000_000);
        wr(&mut rtc, 1, 0x05, 0);
        wr(&mut rtc, 3, 0x00, 0);
        wr(&mut rtc, 5, 0x00, 0);
        assert_eq!(rtc.next_event_ns(), Some(7_000_000_000));
        let mut rec = Recorder::default();
        let mut ctx = DeviceCtx::new(7_000_000_000, &mut rec);
        rtc.advance(&mut ctx);
        assert_eq!(rec.events, [(0, RTC_GSI, true)]);
        assert_eq!(rd(&mut rtc, 0x0c, 7_000_000_001), REG_C_IRQF | PF | AF | UF, "PF too: rate 6 runs");
        assert_eq!(rtc.next_event_ns(), Some(7_000_000_000 + 86_400_000_000_000), "tomorrow");
        // "Don't care" in all three: every second.
        wr(&mut rtc, 1, 0xc0, 7_000_000_002);
        wr(&mut rtc, 3, 0xff, 7_000_000_002);
        wr(&mut rtc, 5, 0xc0, 7_000_000_002);
        assert_eq!(rtc.next_event_ns(), Some(8_000_000_000));
        // An alarm that can never match asks for nothing.
        wr(&mut rtc, 1, 0x75, 7_000_000_003);
        assert_eq!(rtc.next_event_ns(), None);
    }

    #[test]
    fn cmos_ram_index_masks_nmi_and_keeps_bytes() {
        let mut rtc = Rtc::new(0);
        for i in 0x0e..0x80u8 {
            if i != RTC_CENTURY {
                wr(&mut rtc, i | 0x80, i ^ 0x5a, 0);
            }
        }
        assert!(rtc.nmi_disabled());
        for i in 0x0e..0x80u8 {
            if i != RTC_CENTURY {
                assert_eq!(rd(&mut rtc, i, 0), i ^ 0x5a);
            }
        }
        rtc.set_cmos_byte(0x34, 0x12);
        rtc.set_cmos_byte(0x00, 0x12);
        assert_eq!(rd(&mut rtc, 0x34, 0), 0x12);
        assert_eq!(rd(&mut rtc, 0x00, 0), 0x00, "seconds are not RAM");
        wr(&mut rtc, 0x0d, 0, 0);
        assert_eq!(rd(&mut rtc, 0x0d, 0), REG_D_VRT, "D is read-only");
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        let mut d = [0u8; 1];
        rtc.read(0, &mut d, &mut ctx);
        assert_eq!(d, [0xff], "port 0x70 is write-only");
        let mut w = [0u8; 2];
        rtc.read(1, &mut w, &mut ctx);
        assert_eq!(w, [0xff, 0xff], "byte port");
    }

    #[test]
    fn save_and_load_mid_period_preserve_clock_flags_and_deadlines_at_another_clock() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_PIE | REG_B_AIE, 0);
        wr(&mut rtc, 1, 0x10, 0);
        wr(&mut rtc, 3, 0x00, 0);
        wr(&mut rtc, 5, 0x00, 0);
        wr(&mut rtc, 0x40, 0xab, 0);
        let t = 2_500_000_000 + 100_000; // mid-period, just after midnight
        let mut rec = Recorder::default();
        let mut ctx = DeviceCtx::new(t, &mut rec);
        rtc.advance(&mut ctx);
        assert_eq!(rd(&mut rtc, 0x0c, t) & PF, PF);
        let s = rtc.save_at(t);
        let t2 = 3_000;
        let mut q = Rtc::new(0);
        q.load_at(&s, t2).unwrap();
        assert_eq!(q.wall_clock_ns(t2), rtc.wall_clock_ns(t));
        assert_eq!(q.next_event_ns().map(|e| e - t2), rtc.next_event_ns().map(|e| e - t));
        assert_eq!(q.alarm_ns.map(|e| e - t2), rtc.alarm_ns.map(|e| e - t));
        for d in [0u64, 400_000, 1_000_000_000, 15_000_000_000] {
            assert_eq!(time(&mut q, t2 + d), time(&mut rtc, t + d), "+{d}");
            assert_eq!(rd(&mut q, 0x0c, t2 + d), rd(&mut rtc, 0x0c, t + d), "+{d}");
            assert_eq!(rd(&mut q, 0x40, t2 + d), 0xab);
        }
        let mut r = Rtc::new(5);
        r.load(&q.save()).unwrap();
        assert_eq!(r.save_at(0), q.save(), "loaded as of r's guest time 0");
    }

    #[test]
    fn truncated_wrong_version_and_bad_states_are_refused_with_nothing_changed() {
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        wr(&mut rtc, 0x0b, REG_B_24H | REG_B_PIE, 0);
        let before = rtc.clone();
        let good = rtc.save_at(10);
        for n in 0..good.bytes.len() {
            let short = DeviceState { bytes: good.bytes[..n].to_vec(), ..good.clone() };
            assert!(rtc.load_at(&short, 5).is_err());
        }
        let mut long = good.clone();
        long.bytes.push(0);
        assert!(rtc.load_at(&long, 5).is_err());
        assert!(rtc.load_at(&DeviceState { version: 0, ..good.clone() }, 5).is_err());
        assert!(rtc.load_at(&DeviceState { version: 2, ..good.clone() }, 5).is_err());
        assert!(rtc.load_at(&DeviceState { kind: DeviceKind::AcpiPm, ..good.clone() }, 5).is_err());
        let mut huge = good.clone();
        huge.bytes[129 + 15] = 0x7f; // the clock's top byte
        assert!(rtc.load_at(&huge, 5).is_err());
        let mut uip = good.clone();
        uip.bytes[0x0a] |= 0x80;
        assert!(rtc.load_at(&uip, 5).is_err());
        assert_eq!(rtc, before);
    }

    #[test]
    fn random_accesses_and_time_steps_never_panic_or_spin() {
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        let mut rtc = Rtc::new(LEAP_DAY_2024_235958);
        let mut rec = Recorder::default();
        let mut now = 0u64;
        for i in 0..100_000u32 {
            let r = rng.next();
            now = match r % 16 {
                0 => now.wrapping_add(r >> 8),
                1 => now.saturating_sub(r >> 40),
                _ => now.saturating_add((r >> 40) % 2_000_000),
            };
            let offset = (r >> 8) % 3;
            let len = [1usize, 1, 1, 2, 4, 8][((r >> 16) % 6) as usize];
            let mut bytes = rng.next().to_le_bytes();
            if offset == 0 && r >> 30 & 1 == 0 {
                // Mostly the registers, not only RAM.
                bytes[0] =
                    [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x09, 0x0a, 0x0b, 0x0c, 0x32][(r >> 32) as usize % 12];
            }
            let mut ctx = DeviceCtx::new(now, &mut rec);
            if (r >> 24) & 1 == 0 {
                rtc.write(offset, &bytes[..len], &mut ctx);
            } else {
                let mut d = [0u8; 8];
                rtc.read(offset, &mut d[..len], &mut ctx);
            }
            if rtc.next_event_ns().is_some_and(|t| t <= now) {
                rtc.advance(&mut ctx);
                assert!(rtc.next_event_ns().is_none_or(|t| t > now), "advance left an event due at {now}");
            }
            if i % 1000 == 0 {
                let s = rtc.save_at(now);
                let mut q = Rtc::new(0);
                q.load_at(&s, now).unwrap();
                assert_eq!(q.save_at(now), s);
            }
        }
    }
}
