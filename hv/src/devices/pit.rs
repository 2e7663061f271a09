//! The 8254 programmable interval timer at ports 0x40..=0x43, with port 0x61 (NMI
//! status and control) in the same model because port 0x61 gates channel 2 and shows
//! its OUT pin.
//!
//! Three counters run from the 1.193182 MHz input clock: channel 0 drives GSI 0 (ISA
//! IRQ 0, which the MADT routes to I/O APIC pin 2), channel 1 (DRAM refresh on the
//! PC/AT) drives nothing, channel 2 is gated by port 0x61 bit 0 and its OUT is port 0x61
//! bit 5 (the speaker, and the clock Linux calibrates the TSC against in
//! `pit_calibrate_tsc`/`quick_pit_calibrate`). It is not a host timer driver
//! (`drivers/` has that) and it never touches hardware.
//!
//! Counts are not ticked: each counter remembers how many input clocks had elapsed
//! when it last stopped (`base_ticks`) and the guest time it has been counting since
//! (`run_start`), and a read computes the count from `ctx.now_ns`. The only stored
//! deadline is channel 0's next interrupt edge, which [`Device::next_event_ns`]
//! reports and [`Device::advance`] delivers.
//!
//! Ports. The bus hands a device offsets relative to each mapping's start, so a model
//! mapped at 0x40 and again at 0x61 would see offset 0 twice. Two `Device` wrappers
//! over one shared state would need allocation or `unsafe`, and the core cannot reach
//! an inherent method through the bus's `dyn Device`, so the model answers one offset
//! space: offsets 0..=3 are ports 0x40..=0x43 and offset [`PORT61_OFFSET`] (0x21, as if
//! the block ran from 0x40 to 0x61) is port 0x61. The core maps it with
//! `bus.map_ports(pit, 0x40, 4)` and `bus.map_ports_at(pit, 0x61, 1, PORT61_OFFSET)`
//! (the additive bus call that makes this possible). [`Pit::port61_read`] and
//! [`Pit::port61_write`] are the same port as methods, for a core that owns the model.
//!
//! Simplifications, each invisible to Linux: a count is loaded into the counting
//! element at the write, not at the next clock edge (the 8254 waits for one CLK
//! falling edge, so a real mode 0 OUT rises after N+1 clocks, here after N); a new
//! count written in modes 2 and 3 without a control word restarts the period at once
//! instead of at the end of the current one; odd counts in mode 3 read as the even
//! count below them. BCD counting is supported (modulus 10000, counts read and written
//! as four BCD digits; invalid digits are taken at face value).
//!
//! Interrupt edges: OUT's rising edge is what the edge-triggered IRQ 0 sees, so the
//! model pulses GSI 0 once per rising edge rather than tracking the level (mode 3 would
//! otherwise cost two events per period). An edge the scheduler delivers late is
//! delivered once (edges missed in between are coalesced, as an 8259 IRR would), and a
//! periodic channel 0 never interrupts more often than once per [`MIN_IRQ_PERIOD_NS`]
//! of guest time, whatever count the guest programs: a count of 1 would otherwise ask
//! for an exit every 838 ns. The count the guest reads still runs at the true rate.

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, StateReader, StateWriter, put_le};

/// The input clock (Intel 8254 datasheet; the PC's 14.31818 MHz / 12).
pub const PIT_HZ: u64 = 1_193_182;
/// The shortest interval between two channel 0 interrupts a guest can get (guest ns).
pub const MIN_IRQ_PERIOD_NS: u64 = 100_000;
/// The GSI channel 0 drives: ISA IRQ 0, which every PC's MADT overrides to GSI 2 (the
/// router sends GSI 2 to I/O APIC pin 2 and to the 8259's IR0; `firmware::acpi` writes
/// the override).
pub const PIT_GSI: u32 = 2;
/// Ports the model answers at offsets 0..=3.
pub const PIT_PORT_BASE: u16 = 0x40;
/// The model's offset for port 0x61 (map it with `map_ports_at(pit, 0x61, 1, PORT61_OFFSET)`).
pub const PORT61_OFFSET: u64 = 0x21;
/// How often port 0x61 bit 4 toggles (the PC/AT DRAM refresh request, about 15 µs).
pub const REFRESH_TOGGLE_NS: u64 = 15_085;

const NS_PER_S: u128 = 1_000_000_000;
/// Saved-state format version.
const VERSION: u16 = 1;
/// `u64::MAX` in a saved deadline means "none".
const NONE: u64 = u64::MAX;

/// Input clocks in `ns` of guest time (rounded down).
fn ticks_in(ns: u64) -> u64 {
    let t = u128::from(ns) * u128::from(PIT_HZ) / NS_PER_S;
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// The guest ns after which `ticks` input clocks have elapsed (rounded up, so
/// `ticks_in(ns_for(t)) >= t`).
fn ns_for(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NS_PER_S).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn from_bcd16(v: u16) -> u32 {
    let d = |s: u32| (u32::from(v) >> s) & 0xf;
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

fn to_bcd16(v: u32) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// One counter (Intel 8254 datasheet, "Operation" and "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Channel {
    /// Mode 0..=5 (the datasheet's modes 6 and 7 are 2 and 3).
    mode: u8,
    /// Read/write mode from the control word: 1 LSB only, 2 MSB only, 3 LSB then MSB.
    rw: u8,
    bcd: bool,
    /// The initial count as written (raw 16 bits; 0 means the modulus).
    reload: u16,
    /// RW=3: the next write is the MSB; `lsb` holds the LSB written.
    write_msb_next: bool,
    lsb: u8,
    /// RW=3: the next (unlatched) read is the MSB.
    read_msb_next: bool,
    /// A latched count (counter latch or read-back command) and, for RW=3, whether
    /// its MSB is next.
    latched: Option<u16>,
    latched_msb_next: bool,
    /// A latched status byte (read-back command); read before a latched count.
    status: Option<u8>,
    /// Status bit 6: a count was written and has not yet been loaded.
    null_count: bool,
    /// The GATE input (channels 0 and 1 are tied high on a PC).
    gate: bool,
    /// A count has been written since the control word.
    loaded: bool,
    /// Modes 1 and 5: the gate has triggered the count.
    triggered: bool,
    /// Input clocks counted before `run_start`.
    base_ticks: u64,
    /// Counting since this guest ns (None: stopped).
    run_start: Option<u64>,
    /// What a read returns while no count is loaded (the count when the control word
    /// stopped the counter).
    held: u16,
}

impl Channel {
    const fn new() -> Self {
        Self {
            mode: 0,
            rw: 3,
            bcd: false,
            reload: 0,
            write_msb_next: false,
            lsb: 0,
            read_msb_next: false,
            latched: None,
            latched_msb_next: false,
            status: None,
            null_count: true,
            gate: true,
            loaded: false,
            triggered: false,
            base_ticks: 0,
            run_start: None,
            held: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd { 10_000 } else { 65_536 }
    }

    /// The initial count N as a number of clocks, 1..=modulus (a written 0 is the modulus).
    fn n(&self) -> u64 {
        let v = if self.bcd { u64::from(from_bcd16(self.reload)) } else { u64::from(self.reload) };
        let m = self.modulus();
        let v = v % m;
        if v == 0 { m } else { v }
    }

    fn elapsed(&self, now: u64) -> u64 {
        let running = self.run_start.map_or(0, |s| ticks_in(now.saturating_sub(s)));
        self.base_ticks.saturating_add(running)
    }

    /// The guest ns at which `e` clocks will have elapsed, if the counter is running.
    fn time_of(&self, e: u64) -> Option<u64> {
        let s = self.run_start?;
        Some(s.saturating_add(ns_for(e.saturating_sub(self.base_ticks))))
    }

    /// Counting has started (a count is loaded and, in modes 1 and 5, triggered).
    fn started(&self) -> bool {
        self.loaded && (self.triggered || !matches!(self.mode, 1 | 5))
    }

    /// The counting element's value now, as a number (not BCD-encoded).
    fn count(&self, now: u64) -> u64 {
        if !self.started() {
            let h = if self.bcd { u64::from(from_bcd16(self.held)) } else { u64::from(self.held) };
            return h % self.modulus();
        }
        let (n, m, e) = (self.n(), self.modulus(), self.elapsed(now));
        let v = match self.mode {
            2 => n - e % n,
            3 => {
                let even = n & !1;
                let h1 = n.div_ceil(2);
                let p = e % n;
                let pos = if p < h1 { p } else { p - h1 };
                even.saturating_sub(pos.saturating_mul(2))
            }
            // 0, 1, 4, 5: count down from N, then wrap and keep counting.
            _ => (n + m - e % m) % m,
        };
        v % m
    }

    /// The OUT pin now.
    fn out(&self, now: u64) -> bool {
        match self.mode {
            0 => self.loaded && self.elapsed(now) >= self.n(),
            1 => !self.triggered || !self.loaded || self.elapsed(now) >= self.n(),
            2 => !self.started() || self.run_start.is_none() || self.elapsed(now) % self.n() != self.n() - 1,
            3 => !self.started() || self.run_start.is_none() || self.elapsed(now) % self.n() < self.n().div_ceil(2),
            // 4, 5: high, low for one clock when the count reaches zero.
            _ => !self.started() || self.elapsed(now) != self.n(),
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    /// The guest time of the first OUT rising edge strictly after `after`, if any.
    fn edge_after(&self, after: u64) -> Option<u64> {
        if !self.started() {
            return None;
        }
        let n = self.n();
        let target = if self.periodic() { (self.elapsed(after) / n).saturating_add(1).saturating_mul(n) } else { n };
        self.time_of(target).filter(|&t| t > after)
    }

    /// Raw 16-bit value a read shows for count `v`.
    fn encode(&self, v: u64) -> u16 {
        if self.bcd { to_bcd16(v as u32) } else { v as u16 }
    }

    fn status_byte(&self, now: u64) -> u8 {
        // Datasheet, "Read-Back Command", status byte: OUT, NULL COUNT, RW1 RW0, M2 M1 M0, BCD.
        u8::from(self.out(now)) << 7
            | u8::from(self.null_count) << 6
            | (self.rw & 3) << 4
            | (self.mode & 7) << 1
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: u64) {
        // A second latch before the first is read is ignored (datasheet, "Counter Latch Command").
        if self.latched.is_none() {
            self.latched = Some(self.encode(self.count(now)));
            self.latched_msb_next = false;
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let (value, msb) = match self.latched {
            Some(v) => {
                let msb = match self.rw {
                    2 => true,
                    3 => self.latched_msb_next,
                    _ => false,
                };
                if self.rw == 3 && !msb {
                    self.latched_msb_next = true;
                } else {
                    self.latched = None;
                    self.latched_msb_next = false;
                }
                (v, msb)
            }
            None => {
                let v = self.encode(self.count(now));
                let msb = match self.rw {
                    2 => true,
                    3 => {
                        let m = self.read_msb_next;
                        self.read_msb_next = !m;
                        m
                    }
                    _ => false,
                };
                (v, msb)
            }
        };
        if msb { (value >> 8) as u8 } else { value as u8 }
    }

    fn control(&mut self, mode: u8, rw: u8, bcd: bool, now: u64) {
        // Datasheet: a control word resets the counter's control logic; OUT goes low in
        // mode 0 and high in the others; the counter waits for a new count.
        self.held = self.encode(self.count(now));
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.rw = rw;
        self.bcd = bcd;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched = None;
        self.latched_msb_next = false;
        self.status = None;
        self.null_count = true;
        self.loaded = false;
        self.triggered = false;
        self.base_ticks = 0;
        self.run_start = None;
    }

    /// A data byte written to the counter's port.
    fn write(&mut self, b: u8, now: u64) {
        let value = match self.rw {
            1 => u16::from(b),
            2 => u16::from(b) << 8,
            _ => {
                if !self.write_msb_next {
                    self.lsb = b;
                    self.write_msb_next = true;
                    if self.mode == 0 {
                        // Mode 0: writing the first byte stops the count.
                        self.base_ticks = self.elapsed(now);
                        self.run_start = None;
                    }
                    return;
                }
                self.write_msb_next = false;
                u16::from(self.lsb) | u16::from(b) << 8
            }
        };
        self.reload = value;
        self.loaded = true;
        self.null_count = false;
        self.base_ticks = 0;
        if matches!(self.mode, 1 | 5) {
            // Wait for a gate rising edge (channels 0 and 1 never get one, as on a PC).
            self.triggered = false;
            self.run_start = None;
        } else {
            self.run_start = self.gate.then_some(now);
        }
    }

    fn set_gate(&mut self, high: bool, now: u64) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        match self.mode {
            // Gate low suspends counting, high resumes it.
            0 | 4 => {
                if high {
                    if self.loaded {
                        self.run_start = Some(now);
                    }
                } else {
                    self.base_ticks = self.elapsed(now);
                    self.run_start = None;
                }
            }
            // Gate low stops the count (OUT high); the rising edge reloads and restarts it.
            2 | 3 => {
                self.base_ticks = 0;
                self.run_start = (high && self.loaded).then_some(now);
            }
            // The rising edge triggers (or retriggers) the count; the level does nothing.
            _ => {
                if high && self.loaded {
                    self.triggered = true;
                    self.base_ticks = 0;
                    self.run_start = Some(now);
                }
            }
        }
    }

    fn save(&self, w: &mut StateWriter, now: u64) {
        let flags = u16::from(self.bcd)
            | u16::from(self.write_msb_next) << 1
            | u16::from(self.read_msb_next) << 2
            | u16::from(self.latched.is_some()) << 3
            | u16::from(self.latched_msb_next) << 4
            | u16::from(self.status.is_some()) << 5
            | u16::from(self.null_count) << 6
            | u16::from(self.gate) << 7
            | u16::from(self.loaded) << 8
            | u16::from(self.triggered) << 9
            | u16::from(self.run_start.is_some()) << 10;
        w.u8(self.mode).u8(self.rw).u16(flags).u16(self.reload).u8(self.lsb);
        w.u16(self.latched.unwrap_or(0)).u8(self.status.unwrap_or(0)).u16(self.held).u64(self.elapsed(now));
    }

    fn load(r: &mut StateReader<'_>, now: u64) -> Result<Self, DeviceError> {
        let malformed = |why| DeviceError::Malformed { kind: DeviceKind::Pit, why };
        let mode = r.u8()?;
        let rw = r.u8()?;
        let flags = r.u16()?;
        let reload = r.u16()?;
        let lsb = r.u8()?;
        let latched = r.u16()?;
        let status = r.u8()?;
        let held = r.u16()?;
        let elapsed = r.u64()?;
        if mode > 5 {
            return Err(malformed("counter mode above 5"));
        }
        if !(1..=3).contains(&rw) {
            return Err(malformed("counter read/write mode not 1, 2 or 3"));
        }
        if flags >> 11 != 0 {
            return Err(malformed("unknown counter flags"));
        }
        let bit = |n: u16| flags & (1 << n) != 0;
        Ok(Self {
            mode,
            rw,
            bcd: bit(0),
            reload,
            write_msb_next: bit(1),
            lsb,
            read_msb_next: bit(2),
            latched: bit(3).then_some(latched),
            latched_msb_next: bit(4),
            status: bit(5).then_some(status),
            null_count: bit(6),
            gate: bit(7),
            loaded: bit(8),
            triggered: bit(9),
            base_ticks: elapsed,
            run_start: bit(10).then_some(now),
            held,
        })
    }
}

/// The 8254 PIT and port 0x61 (see the module doc for the port layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0..=3 as written (bit 0 channel 2 gate, bit 1 speaker data,
    /// bits 2 and 3 the parity/IOCHK check disables, read back as on the PC/AT).
    port61: u8,
    /// Channel 0's next interrupt edge (guest ns).
    irq_at: Option<u64>,
    /// The latest guest time the model saw (what the trait's `save`/`load` use).
    seen_ns: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT as after reset: every counter in mode 0 without a count, gates 0 and 1
    /// high, channel 2's gate (port 0x61 bit 0) low.
    pub const fn new() -> Self {
        let mut ch2 = Channel::new();
        ch2.gate = false;
        Self { channels: [Channel::new(), Channel::new(), ch2], port61: 0, irq_at: None, seen_ns: 0 }
    }

    fn see(&mut self, now: u64) {
        self.seen_ns = self.seen_ns.max(now);
    }

    /// Recompute channel 0's next edge after a change to it.
    fn reschedule(&mut self, now: u64) {
        self.irq_at = self.channels[0].edge_after(now);
    }

    /// A write to the control word register (port 0x43). Datasheet, "Control Word
    /// Format": SC1 SC0 (counter, 3 = read-back), RW1 RW0 (0 = counter latch), M2..M0, BCD.
    fn control(&mut self, v: u8, now: u64) {
        let sc = v >> 6;
        let rw = (v >> 4) & 3;
        if sc == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status, bits 1..=3
            // select counters 0..=2. A status latch overrides nothing already latched.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & 0x20 == 0 {
                    ch.latch_count(now);
                }
                if v & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(now));
                }
            }
            return;
        }
        let Some(ch) = self.channels.get_mut(usize::from(sc)) else { return };
        if rw == 0 {
            ch.latch_count(now);
            return;
        }
        ch.control((v >> 1) & 7, rw, v & 1 != 0, now);
        if sc == 0 {
            self.reschedule(now);
        }
    }

    /// Port 0x61 as the guest reads it: bit 0 channel 2 gate, bit 1 speaker data, bits
    /// 2 and 3 as written, bit 4 the refresh toggle, bit 5 channel 2 OUT; bits 6 and 7
    /// (IOCHK and parity NMI status) are never set.
    pub fn port61_read(&mut self, ctx: &mut DeviceCtx<'_>) -> u8 {
        let now = ctx.now_ns;
        self.see(now);
        let refresh = (now / REFRESH_TOGGLE_NS) & 1 == 1;
        (self.port61 & 0x0f) | u8::from(refresh) << 4 | u8::from(self.channels[2].out(now)) << 5
    }

    /// A guest write of port 0x61: bits 0..=3 are kept; bit 0 drives channel 2's gate.
    pub fn port61_write(&mut self, v: u8, ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        self.see(now);
        self.port61 = v & 0x0f;
        self.channels[2].set_gate(v & 1 != 0, now);
    }

    fn read_byte(&mut self, offset: u64, ctx: &mut DeviceCtx<'_>) -> u8 {
        let now = ctx.now_ns;
        match offset {
            0..=2 => self.channels.get_mut(offset as usize).map_or(0xff, |c| c.read(now)),
            PORT61_OFFSET => self.port61_read(ctx),
            // The control word register is write-only.
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u64, v: u8, ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        match offset {
            0..=2 => {
                if let Some(c) = self.channels.get_mut(offset as usize) {
                    c.write(v, now);
                }
                if offset == 0 {
                    self.reschedule(now);
                }
            }
            3 => self.control(v, now),
            PORT61_OFFSET => self.port61_write(v, ctx),
            _ => {}
        }
    }

    /// The state at guest time `now`: counters are saved as clocks elapsed and the
    /// interrupt deadline as ns remaining, so the state loads at any other clock.
    ///
    /// Layout (version 1, little-endian): three channels of { mode u8, rw u8, flags u16
    /// (bit 0 BCD, 1 write-MSB-next, 2 read-MSB-next, 3 count latched, 4 latched MSB next,
    /// 5 status latched, 6 null count, 7 gate, 8 count loaded, 9 triggered, 10 counting),
    /// reload u16, written LSB u8, latched count u16, latched status u8, held count u16,
    /// clocks elapsed u64 }, then port 0x61 bits u8, then channel 0's interrupt in ns
    /// from `now` u64 (`u64::MAX`: none).
    pub fn save_at(&self, now: u64) -> DeviceState {
        let mut w = StateWriter::new();
        for ch in &self.channels {
            ch.save(&mut w, now);
        }
        w.u8(self.port61);
        w.u64(self.irq_at.map_or(NONE, |t| t.saturating_sub(now).min(NONE - 1)));
        w.finish(DeviceKind::Pit, VERSION)
    }

    /// Load a state saved by [`Pit::save_at`] as if it were guest time `now`; on error
    /// nothing changed.
    pub fn load_at(&mut self, state: &DeviceState, now: u64) -> Result<(), DeviceError> {
        let mut r = StateReader::new(state, DeviceKind::Pit, VERSION)?;
        let c0 = Channel::load(&mut r, now)?;
        let c1 = Channel::load(&mut r, now)?;
        let c2 = Channel::load(&mut r, now)?;
        let port61 = r.u8()?;
        let irq = r.u64()?;
        r.finish()?;
        if port61 >> 4 != 0 {
            return Err(DeviceError::Malformed { kind: DeviceKind::Pit, why: "port 0x61 bits above 3" });
        }
        *self = Self {
            channels: [c0, c1, c2],
            port61,
            irq_at: (irq != NONE).then(|| now.saturating_add(irq)),
            seen_ns: now,
        };
        Ok(())
    }
}

impl Device for Pit {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Pit
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        self.see(ctx.now_ns);
        // Byte registers: a wider access reads as ones (and a wider write is dropped).
        let v = if data.len() == 1 { u64::from(self.read_byte(offset, ctx)) } else { u64::MAX };
        put_le(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        self.see(ctx.now_ns);
        if let [v] = data {
            self.write_byte(offset, *v, ctx);
        }
    }

    fn next_event_ns(&self) -> Option<u64> {
        self.irq_at
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        self.see(now);
        let Some(at) = self.irq_at else { return };
        if at > now {
            return;
        }
        ctx.irq.pulse(PIT_GSI);
        let ch = &self.channels[0];
        self.irq_at =
            ch.edge_after(now).map(|t| if ch.periodic() { t.max(now.saturating_add(MIN_IRQ_PERIOD_NS)) } else { t });
    }

    /// [`Pit::save_at`] the latest guest time the model saw (the trait gives no clock;
    /// a core that has one should call `save_at` itself).
    fn save(&self) -> DeviceState {
        self.save_at(self.seen_ns)
    }

    /// [`Pit::load_at`] the latest guest time the model saw (0 for a new model).
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        self.load_at(state, self.seen_ns)
    }

    fn save_at(&self, now_ns: u64) -> DeviceState {
        Pit::save_at(self, now_ns)
    }

    fn load_at(&mut self, state: &DeviceState, now_ns: u64) -> Result<(), DeviceError> {
        Pit::load_at(self, state, now_ns)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::{IrqLines, NoIrqs};
    use std::vec::Vec;

    /// Lines that remember what was driven, and when (`now` is set by the test).
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) now: u64,
        pub(crate) events: Vec<(u64, u32, bool)>,
    }

    impl IrqLines for Recorder {
        fn set_level(&mut self, gsi: u32, high: bool) {
            self.events.push((self.now, gsi, high));
        }
    }

    /// A deterministic xorshift64 for the random tests.
    pub(crate) struct XorShift(pub(crate) u64);

    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    fn offset(port: u16) -> u64 {
        if port == 0x61 { PORT61_OFFSET } else { u64::from(port - PIT_PORT_BASE) }
    }

    fn outb(p: &mut Pit, port: u16, v: u8, now: u64) {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        p.write(offset(port), &[v], &mut ctx);
    }

    fn inb(p: &mut Pit, port: u16, now: u64) -> u8 {
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(now, &mut irq);
        let mut d = [0u8];
        p.read(offset(port), &mut d, &mut ctx);
        d[0]
    }

    /// Linux `quick_pit_calibrate` (arch/x86/kernel/tsc.c): gate channel 2 on through
    /// port 0x61, mode 0 with 0xffff, then poll the MSB (read LSB, then MSB) as it falls.
    #[test]
    fn linux_quick_pit_calibrate_sees_the_msb_fall_every_256_clocks() {
        let mut p = Pit::new();
        let t0 = 3_000_000;
        let v = inb(&mut p, 0x61, t0);
        outb(&mut p, 0x61, (v & !0x02) | 0x01, t0);
        outb(&mut p, 0x43, 0xb0, t0);
        outb(&mut p, 0x42, 0xff, t0);
        outb(&mut p, 0x42, 0xff, t0);
        let mut changes = Vec::new();
        let mut last = 0xffu8;
        let mut t = t0;
        while t < t0 + 20_000_000 {
            let lsb = inb(&mut p, 0x42, t);
            let msb = inb(&mut p, 0x42, t);
            let expect = 0xffffu64 - ticks_in(t - t0);
            assert_eq!(u64::from(u16::from(msb) << 8 | u16::from(lsb)), expect, "count at {t}");
            assert_eq!(inb(&mut p, 0x61, t) & 0x20, 0, "OUT low before terminal count");
            if msb != last {
                assert_eq!(msb, last.wrapping_sub(1), "the MSB falls one at a time");
                changes.push(t);
                last = msb;
            }
            t += 1_000;
        }
        assert!(changes.len() > 80);
        for (k, w) in changes.iter().enumerate() {
            // The MSB reaches 0xff - (k + 1) once 256 (k + 1) clocks have elapsed.
            let due = t0 + ns_for(256 * (k as u64 + 1));
            assert!(*w >= due && *w < due + 1_000, "change {k} at {w}, due {due}");
        }
    }

    /// Linux `pit_calibrate_tsc`: channel 2 mode 0 with a 50 ms latch, gate on, spin on
    /// port 0x61 bit 5; a gate dropped midway pauses the count.
    #[test]
    fn linux_pit_calibrate_tsc_sees_out_rise_after_the_latch() {
        let mut p = Pit::new();
        let latch = PIT_HZ / 20;
        let t0 = 1_000;
        let v = inb(&mut p, 0x61, t0);
        outb(&mut p, 0x61, (v & !0x02) | 0x01, t0);
        outb(&mut p, 0x43, 0xb0, t0);
        outb(&mut p, 0x42, (latch & 0xff) as u8, t0);
        outb(&mut p, 0x42, (latch >> 8) as u8, t0);
        let mut t = t0;
        while inb(&mut p, 0x61, t) & 0x20 == 0 {
            t += 10_000;
            assert!(t < t0 + 1_000_000_000, "OUT never rose");
        }
        let due = t0 + ns_for(latch);
        assert!(t >= due && t < due + 10_000, "OUT rose at {t}, due {due}");
        assert_eq!(inb(&mut p, 0x61, t) & 0x01, 0x01, "gate reads back");

        // Gate low for 1 ms pauses mode 0: OUT rises 1 ms later.
        let mut p = Pit::new();
        outb(&mut p, 0x61, 0x01, 0);
        outb(&mut p, 0x43, 0xb0, 0);
        outb(&mut p, 0x42, 0xe8, 0);
        outb(&mut p, 0x42, 0x03, 0); // 1000 clocks
        outb(&mut p, 0x61, 0x00, 400_000);
        let before = ticks_in(400_000);
        assert_eq!(inb(&mut p, 0x61, 1_200_000) & 0x20, 0);
        outb(&mut p, 0x61, 0x01, 1_400_000);
        let due = 1_400_000 + ns_for(1000 - before);
        assert_eq!(inb(&mut p, 0x61, due - 1_000) & 0x20, 0);
        assert_eq!(inb(&mut p, 0x61, due + 1_000) & 0x20, 0x20);
    }

    fn advance_to(p: &mut Pit, rec: &mut Recorder, now: u64) {
        rec.now = now;
        let mut ctx = DeviceCtx::new(now, rec);
        p.advance(&mut ctx);
    }

    /// Linux's periodic tick: channel 0 mode 2 (0x34) or mode 3 (0x36), LATCH = 11932 for HZ=100.
    #[test]
    fn channel0_periodic_edges_come_at_multiples_of_the_count() {
        for cw in [0x34u8, 0x36] {
            let mut p = Pit::new();
            let t0 = 5_000;
            outb(&mut p, 0x43, cw, t0);
            outb(&mut p, 0x40, (11932 & 0xff) as u8, t0);
            outb(&mut p, 0x40, (11932 >> 8) as u8, t0);
            let mut rec = Recorder::default();
            for k in 1..=200u64 {
                let due = t0 + ns_for(11932 * k);
                assert_eq!(p.next_event_ns(), Some(due), "mode {cw:#x} edge {k}");
                advance_to(&mut p, &mut rec, due - 1);
                assert_eq!(rec.events.len() as u64, 2 * (k - 1), "nothing early");
                advance_to(&mut p, &mut rec, due);
            }
            assert_eq!(rec.events.len(), 400);
            assert!(rec.events.chunks(2).all(|e| e[0].1 == PIT_GSI && e[0].2 && !e[1].2), "pulses on the PIT GSI");
        }
    }

    #[test]
    fn channel0_mode0_one_shot_fires_once() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x30, 0);
        outb(&mut p, 0x40, 0x10, 0);
        outb(&mut p, 0x40, 0x00, 0);
        let due = ns_for(16);
        assert_eq!(p.next_event_ns(), Some(due));
        let mut rec = Recorder::default();
        advance_to(&mut p, &mut rec, due + 50);
        assert_eq!(rec.events, [(due + 50, PIT_GSI, true), (due + 50, PIT_GSI, false)]);
        assert_eq!(p.next_event_ns(), None);
        // The count wraps through 0xffff and keeps going, OUT stays high.
        let c = |p: &mut Pit, t| u16::from(inb(p, 0x40, t)) | u16::from(inb(p, 0x40, t)) << 8;
        assert_eq!(c(&mut p, ns_for(17)), 0xffff);
        outb(&mut p, 0x43, 0xe2, ns_for(17)); // read-back status of channel 0
        assert_eq!(inb(&mut p, 0x40, ns_for(17)) & 0x80, 0x80, "OUT high after terminal count");
    }

    /// Linux's i8253 clockevent in one-shot mode: mode 4 (0x38), then each
    /// `set_next_event` writes LSB and MSB; shutdown is mode 0 (0x30) with a count of 0.
    #[test]
    fn linux_oneshot_clockevent_mode4_fires_once_per_programmed_delta() {
        let mut p = Pit::new();
        let mut rec = Recorder::default();
        outb(&mut p, 0x43, 0x38, 0);
        assert_eq!(p.next_event_ns(), None, "no count yet");
        let mut t = 0;
        for delta in [0x10u16, 1193, 11932, 0xffff] {
            outb(&mut p, 0x40, delta as u8, t);
            outb(&mut p, 0x40, (delta >> 8) as u8, t);
            let due = t + ns_for(u64::from(delta));
            assert_eq!(p.next_event_ns(), Some(due));
            advance_to(&mut p, &mut rec, due);
            assert_eq!(p.next_event_ns(), None, "one edge per count written");
            t = due + 7;
        }
        assert_eq!(rec.events.len(), 8);
        outb(&mut p, 0x43, 0x30, t);
        outb(&mut p, 0x40, 0, t);
        outb(&mut p, 0x40, 0, t);
        assert_eq!(p.next_event_ns(), Some(t + ns_for(65_536)), "a count of 0 is 65536");
    }

    /// The core's wiring: ports 0x40..=0x43 and port 0x61 on one bus device.
    #[test]
    fn on_the_bus_port_0x61_reaches_the_same_pit() {
        use crate::devices::bus::{DeviceBus, Space};
        let mut bus = DeviceBus::new();
        let pit = bus.add(std::boxed::Box::new(Pit::new()));
        bus.map_ports(pit, PIT_PORT_BASE, 4).unwrap();
        bus.map_ports_at(pit, 0x61, 1, PORT61_OFFSET).unwrap();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        bus.write(Space::Port, 0x61, &[0x01], &mut ctx);
        bus.write(Space::Port, 0x43, &[0xb0], &mut ctx);
        bus.write(Space::Port, 0x42, &[0x64], &mut ctx);
        bus.write(Space::Port, 0x42, &[0x00], &mut ctx);
        let mut d = [0u8];
        bus.read(Space::Port, 0x61, &mut d, &mut ctx);
        assert_eq!(d[0] & 0x21, 0x01, "gate on, OUT low");
        let mut ctx = DeviceCtx::new(ns_for(100), &mut irq);
        bus.read(Space::Port, 0x61, &mut d, &mut ctx);
        assert_eq!(d[0] & 0x21, 0x21, "OUT high after 100 clocks");
    }

    #[test]
    fn a_hostile_count_of_one_interrupts_at_most_every_min_period() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x34, 0);
        outb(&mut p, 0x40, 0x01, 0);
        outb(&mut p, 0x40, 0x00, 0);
        let mut rec = Recorder::default();
        let mut times = Vec::new();
        while let Some(t) = p.next_event_ns() {
            if t > 10_000_000 {
                break;
            }
            advance_to(&mut p, &mut rec, t);
            times.push(t);
        }
        assert!(times.len() <= 101, "{} interrupts in 10 ms", times.len());
        assert!(times.windows(2).all(|w| w[1] - w[0] >= MIN_IRQ_PERIOD_NS));
        // The count itself still runs at the input clock (period 1: always reads 1).
        assert_eq!(inb(&mut p, 0x40, 123_456), 1);
    }

    #[test]
    fn latch_and_read_back_freeze_the_count_and_status() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x34, 0); // ch0, LSB then MSB, mode 2, binary
        outb(&mut p, 0x40, 0x00, 0);
        outb(&mut p, 0x40, 0x10, 0); // 4096
        let t = ns_for(100) + 10;
        outb(&mut p, 0x43, 0x00, t); // counter latch, channel 0
        outb(&mut p, 0x43, 0x00, t + 500_000); // ignored: already latched
        let v = u16::from(inb(&mut p, 0x40, t + 1_000_000)) | u16::from(inb(&mut p, 0x40, t + 2_000_000)) << 8;
        assert_eq!(v, 4096 - 100);
        // After the latched pair, reads are live again.
        let live = u16::from(inb(&mut p, 0x40, ns_for(200))) | u16::from(inb(&mut p, 0x40, ns_for(200))) << 8;
        assert_eq!(live, 4096 - 200);
        // Read-back of count and status for channel 0 (and 2): status first, then count.
        outb(&mut p, 0x43, 0xc2 | 0x08, ns_for(300));
        assert_eq!(inb(&mut p, 0x40, ns_for(400)), 0x80 | 0x30 | 0x04, "OUT high, RW 3, mode 2, binary");
        let v = u16::from(inb(&mut p, 0x40, ns_for(500))) | u16::from(inb(&mut p, 0x40, ns_for(600))) << 8;
        assert_eq!(v, 4096 - 300);
        // Channel 2 (never programmed): mode 0, null count, OUT low.
        assert_eq!(inb(&mut p, 0x42, ns_for(700)), 0x40 | 0x30);
        // Status only (bit 5 set: no count latch).
        outb(&mut p, 0x43, 0xe2, ns_for(800));
        assert_eq!(inb(&mut p, 0x40, ns_for(900)), 0xb4);
        assert_eq!(inb(&mut p, 0x40, ns_for(900)), ((4096 - 900) & 0xff) as u8, "then live");
    }

    #[test]
    fn lsb_only_msb_only_and_both_orders() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x90, 0); // ch2, LSB only, mode 0
        outb(&mut p, 0x61, 0x01, 0);
        outb(&mut p, 0x42, 0x80, 0); // 0x0080
        assert_eq!(inb(&mut p, 0x42, ns_for(16)), 0x70);
        assert_eq!(inb(&mut p, 0x42, ns_for(16)), 0x70, "no flip-flop in LSB mode");
        outb(&mut p, 0x43, 0xa0, 0); // ch2, MSB only
        outb(&mut p, 0x42, 0x12, 0); // 0x1200
        assert_eq!(inb(&mut p, 0x42, ns_for(0x100)), 0x11);
        assert_eq!(inb(&mut p, 0x42, ns_for(0x100)), 0x11);
        outb(&mut p, 0x43, 0xb0, 0);
        outb(&mut p, 0x42, 0x34, 0);
        outb(&mut p, 0x42, 0x12, 0);
        assert_eq!(inb(&mut p, 0x42, ns_for(4)), 0x30, "LSB first");
        assert_eq!(inb(&mut p, 0x42, ns_for(4)), 0x12, "then MSB");
        assert_eq!(inb(&mut p, 0x42, ns_for(4)), 0x30, "and LSB again");
        // Wider accesses read as ones and are otherwise ignored.
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        let mut w = [0u8; 2];
        p.read(2, &mut w, &mut ctx);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(inb(&mut p, 0x43, 0), 0xff, "the control word is write-only");
    }

    #[test]
    fn bcd_counts_in_decimal() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x31, 0); // ch0, both, mode 0, BCD
        outb(&mut p, 0x40, 0x00, 0);
        outb(&mut p, 0x40, 0x10, 0); // 1000 decimal
        assert_eq!((inb(&mut p, 0x40, ns_for(1)), inb(&mut p, 0x40, ns_for(1))), (0x99, 0x09));
        assert_eq!(p.next_event_ns(), Some(ns_for(1000)));
        // Zero is 10000 in BCD.
        outb(&mut p, 0x43, 0x31, 0);
        outb(&mut p, 0x40, 0x00, 0);
        outb(&mut p, 0x40, 0x00, 0);
        assert_eq!((inb(&mut p, 0x40, ns_for(1)), inb(&mut p, 0x40, ns_for(1))), (0x99, 0x99));
    }

    fn sample(p: &mut Pit, t: u64) -> (u8, u8, u8, u8, u8, Option<u64>) {
        let a = inb(p, 0x40, t);
        let b = inb(p, 0x40, t);
        let c = inb(p, 0x42, t);
        let d = inb(p, 0x42, t);
        (a, b, c, d, inb(p, 0x61, t) & 0x2f, p.next_event_ns().map(|e| e.saturating_sub(t)))
    }

    #[test]
    fn save_and_load_mid_countdown_preserve_behaviour_at_another_clock() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x34, 0);
        outb(&mut p, 0x40, 0x9c, 0);
        outb(&mut p, 0x40, 0x2e, 0); // 11932
        outb(&mut p, 0x61, 0x01, 0);
        outb(&mut p, 0x43, 0xb0, 0);
        outb(&mut p, 0x42, 0xff, 0);
        outb(&mut p, 0x42, 0xff, 0);
        let t = ns_for(30_000); // mid-countdown
        outb(&mut p, 0x43, 0x80, t); // a latch on channel 2 travels too
        advance_to(&mut p, &mut Recorder::default(), t);
        let s = p.save_at(t);
        let mut q = Pit::new();
        let t2 = 7_000_000_000;
        q.load_at(&s, t2).unwrap();
        assert_eq!(q.next_event_ns().map(|e| e - t2), p.next_event_ns().map(|e| e - t));
        // The latched count, then identical live behaviour for 50 ms (within one clock).
        assert_eq!(inb(&mut q, 0x42, t2 + 5), inb(&mut p, 0x42, t + 5));
        assert_eq!(inb(&mut q, 0x42, t2 + 5), inb(&mut p, 0x42, t + 5));
        for d in (0..50_000_000u64).step_by(333_333) {
            let (a, b) = (sample(&mut p, t + d), sample(&mut q, t2 + d));
            let ca = u16::from(a.0) | u16::from(a.1) << 8;
            let cb = u16::from(b.0) | u16::from(b.1) << 8;
            assert!(ca.abs_diff(cb) <= 1 || ca.abs_diff(cb) >= 11931, "ch0 {ca} vs {cb} at +{d}");
            let c2a = u16::from(a.2) | u16::from(a.3) << 8;
            let c2b = u16::from(b.2) | u16::from(b.3) << 8;
            assert!(c2a.abs_diff(c2b) <= 1, "ch2 {c2a} vs {c2b} at +{d}");
            assert_eq!(a.4 & 0x0f, b.4 & 0x0f);
        }
        // The trait's save/load use the latest time seen.
        let s = q.save();
        let mut r = Pit::new();
        r.load(&s).unwrap();
        assert_eq!(r.save_at(0), s);
    }

    #[test]
    fn truncated_wrong_version_and_bad_states_are_refused_with_nothing_changed() {
        let mut p = Pit::new();
        outb(&mut p, 0x43, 0x34, 0);
        outb(&mut p, 0x40, 0x10, 0);
        outb(&mut p, 0x40, 0x00, 0);
        let before = p.clone();
        let good = p.save_at(0);
        for n in 0..good.bytes.len() {
            let short = DeviceState { bytes: good.bytes[..n].to_vec(), ..good.clone() };
            assert!(p.load_at(&short, 5).is_err(), "{n} bytes");
        }
        let mut long = good.clone();
        long.bytes.push(0);
        assert!(p.load_at(&long, 5).is_err());
        assert!(matches!(
            p.load_at(&DeviceState { version: 2, ..good.clone() }, 5),
            Err(DeviceError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(matches!(
            p.load_at(&DeviceState { kind: DeviceKind::Rtc, ..good.clone() }, 5),
            Err(DeviceError::WrongKind { .. })
        ));
        let mut bad_mode = good.clone();
        bad_mode.bytes[0] = 7;
        assert!(p.load_at(&bad_mode, 5).is_err());
        assert_eq!(p, before, "nothing changed");
    }

    #[test]
    fn random_accesses_and_time_steps_never_panic_or_spin() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut p = Pit::new();
        let mut rec = Recorder::default();
        let mut now = 0u64;
        for i in 0..100_000u32 {
            let r = rng.next();
            now = match r % 16 {
                0 => now.wrapping_add(r >> 20),   // big jumps, and wrapping to the start
                1 => now.saturating_sub(r >> 50), // time going backwards
                _ => now.saturating_add((r >> 40) % 20_000),
            };
            let offset = match (r >> 4) % 8 {
                0..=5 => (r >> 8) % 4,
                6 => PORT61_OFFSET,
                _ => (r >> 8) % 0x40,
            };
            let len = [1usize, 1, 1, 2, 4, 8][((r >> 16) % 6) as usize];
            let bytes = (rng.next()).to_le_bytes();
            rec.now = now;
            let mut ctx = DeviceCtx::new(now, &mut rec);
            if (r >> 24) & 1 == 0 {
                p.write(offset, &bytes[..len], &mut ctx);
            } else {
                let mut d = [0u8; 8];
                p.read(offset, &mut d[..len], &mut ctx);
            }
            if p.next_event_ns().is_some_and(|t| t <= now) {
                p.advance(&mut ctx);
                assert!(p.next_event_ns().is_none_or(|t| t > now), "advance left an event due at {now}");
            }
            if i % 1000 == 0 {
                let s = p.save_at(now);
                let mut q = Pit::new();
                q.load_at(&s, now).unwrap();
                assert_eq!(q.save_at(now), s);
            }
        }
    }
}
