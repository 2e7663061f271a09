//! The guest's 8259A pair: the PC's legacy interrupt controllers (master at ports
//! 0x20-0x21, slave at 0xA0-0xA1 cascaded on the master's IR2) and the edge/level
//! control registers (ELCR) at 0x4D0-0x4D1.
//!
//! It turns ISA IRQ lines into one output, INTR ([`Pic::intr_pending`]), and answers
//! the interrupt-acknowledge cycle with the vector to inject ([`Pic::acknowledge`]).
//! It does not know where INTR goes: the router hands it to the BSP's LINT0 as
//! ExtINT. Linux programs the pair at boot and, once it uses the I/O APIC, masks both
//! (IMR 0xFF); a masked pair never asserts INTR.
//!
//! What the code follows: the Intel 8259A datasheet (ICW1-ICW4 initialization,
//! OCW1-OCW3, priority resolution, special mask and special fully nested modes,
//! automatic EOI, the spurious IR7 answer) and, where the datasheet leaves a choice,
//! QEMU's `hw/intc/i8259.c` (which Linux has been tested against for years). Only the
//! 8086 mode is modelled (ICW4 uPM = 0, MCS-80/85, is accepted but treated as 8086):
//! PCs never use the other.
//!
//! Offsets: one `Pic` answers all six ports. On its own (the [`Device`] impl) the
//! offsets are 0-1 master command/data (0x20-0x21), 2-3 slave command/data
//! (0xA0-0xA1), 4-5 ELCR1/ELCR2 (0x4D0-0x4D1); [`pic_offset`] maps a port to its
//! offset. The bus cannot hand one device three ranges with distinct offsets, and the
//! interrupt lines must reach the chips from every other device's accesses, so the
//! router (`irq.rs`) owns the `Pic` and the exit path sends these ports to the router.

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, StateReader, StateWriter};

/// The saved-state format this build writes and reads.
pub const PIC_STATE_VERSION: u16 = 1;

/// The IR line of the master that the slave's INT drives.
const CASCADE_IR: u8 = 2;

/// The ports one `Pic` answers, as (first port, count).
pub const PIC_PORTS: [(u16, u16); 3] = [(0x20, 2), (0xa0, 2), (0x4d0, 2)];

/// The `Pic` offset of `port`, if it is one of the pair's.
pub fn pic_offset(port: u16) -> Option<u64> {
    match port {
        0x20 | 0x21 => Some(u64::from(port - 0x20)),
        0xa0 | 0xa1 => Some(u64::from(port - 0xa0) + 2),
        0x4d0 | 0x4d1 => Some(u64::from(port - 0x4d0) + 4),
        _ => None,
    }
}

// Flag bits of a chip (also its saved form).
const F_READ_ISR: u16 = 1 << 0;
const F_POLL: u16 = 1 << 1;
const F_SPECIAL_MASK: u16 = 1 << 2;
const F_ICW4_NEEDED: u16 = 1 << 3;
const F_SINGLE: u16 = 1 << 4;
const F_AUTO_EOI: u16 = 1 << 5;
const F_ROTATE_AUTO_EOI: u16 = 1 << 6;
const F_SPECIAL_NESTED: u16 = 1 << 7;
const F_LTIM: u16 = 1 << 8;
const F_ALL: u16 = (1 << 9) - 1;

/// Where a chip is in its initialization sequence (8259A datasheet, "Initialization
/// Command Words", flowchart): ICW1 starts it, ICW2 always follows, ICW3 only in
/// cascade mode, ICW4 only if ICW1 asked for it.
const INIT_READY: u8 = 0;
const INIT_ICW2: u8 = 1;
const INIT_ICW3: u8 = 2;
const INIT_ICW4: u8 = 3;

/// One 8259A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chip {
    /// The IR inputs' levels (for edge detection and level-triggered IRR).
    lines: u8,
    irr: u8,
    isr: u8,
    imr: u8,
    /// The IR level with the highest priority (0 after ICW1; rotation moves it).
    priority_add: u8,
    /// ICW2 T7-T3: the vector of IR0.
    irq_base: u8,
    icw3: u8,
    init: u8,
    /// ELCR bits for this chip's inputs (1 = level-triggered).
    elcr: u8,
    flags: u16,
}

impl Chip {
    const fn new() -> Self {
        Self {
            lines: 0,
            irr: 0,
            isr: 0,
            imr: 0,
            priority_add: 0,
            irq_base: 0,
            icw3: 0,
            init: INIT_READY,
            elcr: 0,
            flags: 0,
        }
    }

    fn flag(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    fn set_flag(&mut self, f: u16, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }

    /// Inputs that are level-triggered: all with ICW1 LTIM, else the ELCR's.
    fn level_mask(&self) -> u8 {
        if self.flag(F_LTIM) { 0xff } else { self.elcr }
    }

    /// The priority (0 = highest) of the best request in `mask`, 8 if none. IR
    /// `priority_add` has priority 0 and the others follow in circular order
    /// (datasheet, "Priority Resolver" and "Rotation").
    fn priority(&self, mask: u8) -> u8 {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The IR level this chip would interrupt for now, if any: the best unmasked
    /// request that beats every level in service.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        // Special mask mode: a masked level in service does not block the others
        // (datasheet, "Special Mask Mode").
        if self.flag(F_SPECIAL_MASK) {
            in_service &= !self.imr;
        }
        // Special fully nested mode on the master: a slave in service does not block
        // a higher-priority request from the same slave (datasheet, "Special Fully
        // Nested Mode").
        if is_master && self.flag(F_SPECIAL_NESTED) {
            in_service &= !(1 << CASCADE_IR);
        }
        (p < self.priority(in_service)).then_some((p + self.priority_add) & 7)
    }

    /// Drive IR `ir` (0..8). Edge-triggered: a rising edge sets IRR, which stays set
    /// until acknowledged. Level-triggered: IRR follows the line.
    fn set_input(&mut self, ir: u8, high: bool) {
        let bit = 1u8 << (ir & 7);
        let rising = high && self.lines & bit == 0;
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.level_mask() & bit != 0 {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if rising {
            self.irr |= bit;
        }
    }

    /// The INTA cycle for `ir`: set ISR (unless automatic EOI) and clear an
    /// edge-triggered request; a level-triggered request stays while its line is high.
    fn ack(&mut self, ir: u8) {
        let bit = 1u8 << (ir & 7);
        if self.flag(F_AUTO_EOI) {
            if self.flag(F_ROTATE_AUTO_EOI) {
                self.priority_add = (ir + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.level_mask() & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// ICW1 (datasheet: "the edge sense circuit is reset ... the IMR is cleared, IR7
    /// is assigned priority 7, the slave mode address is set to 7, special mask mode
    /// is cleared and status read is set to IRR; if IC4 = 0, all ICW4 functions are
    /// set to zero").
    fn icw1(&mut self, v: u8) {
        let (lines, elcr) = (self.lines, self.elcr);
        *self = Self::new();
        self.lines = lines;
        self.elcr = elcr;
        self.icw3 = 7;
        self.set_flag(F_ICW4_NEEDED, v & 0x01 != 0);
        self.set_flag(F_SINGLE, v & 0x02 != 0);
        self.set_flag(F_LTIM, v & 0x08 != 0);
        // Edge-sensed inputs that are already high need a new rising edge; level
        // inputs keep requesting.
        self.irr = self.lines & self.level_mask();
        self.init = INIT_ICW2;
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            self.icw1(v);
        } else if v & 0x08 != 0 {
            self.ocw3(v);
        } else {
            self.ocw2(v);
        }
    }

    /// OCW2: bits 7:5 are R, SL, EOI; bits 2:0 the level for the specific forms.
    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0b000 => self.set_flag(F_ROTATE_AUTO_EOI, false),
            0b100 => self.set_flag(F_ROTATE_AUTO_EOI, true),
            // Non-specific EOI (with rotation for 0b101): the highest-priority level
            // in service ends.
            cmd @ (0b001 | 0b101) => {
                let p = self.priority(self.isr);
                if p != 8 {
                    let ir = (p + self.priority_add) & 7;
                    self.isr &= !(1 << ir);
                    if cmd == 0b101 {
                        self.priority_add = (ir + 1) & 7;
                    }
                }
            }
            // Specific EOI (with rotation for 0b111).
            cmd @ (0b011 | 0b111) => {
                self.isr &= !(1 << level);
                if cmd == 0b111 {
                    self.priority_add = (level + 1) & 7;
                }
            }
            // Set priority: `level` becomes the lowest.
            0b110 => self.priority_add = (level + 1) & 7,
            // 0b010: no operation.
            _ => {}
        }
    }

    /// OCW3: ESMM/SMM (bits 6:5), poll (bit 2), RR/RIS (bits 1:0).
    fn ocw3(&mut self, v: u8) {
        if v & 0x04 != 0 {
            self.set_flag(F_POLL, true);
        }
        if v & 0x02 != 0 {
            self.set_flag(F_READ_ISR, v & 0x01 != 0);
        }
        if v & 0x40 != 0 {
            self.set_flag(F_SPECIAL_MASK, v & 0x20 != 0);
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init {
            INIT_ICW2 => {
                // 8086 mode: T7-T3 of the vector; the IR level fills bits 2:0.
                self.irq_base = v & 0xf8;
                self.init = if !self.flag(F_SINGLE) {
                    INIT_ICW3
                } else if self.flag(F_ICW4_NEEDED) {
                    INIT_ICW4
                } else {
                    INIT_READY
                };
            }
            INIT_ICW3 => {
                self.icw3 = v;
                self.init = if self.flag(F_ICW4_NEEDED) { INIT_ICW4 } else { INIT_READY };
            }
            INIT_ICW4 => {
                self.set_flag(F_AUTO_EOI, v & 0x02 != 0);
                self.set_flag(F_SPECIAL_NESTED, v & 0x10 != 0);
                self.init = INIT_READY;
            }
            // OCW1: the interrupt mask.
            _ => self.imr = v,
        }
    }

    /// Poll (datasheet, "The Poll Command"): the read is the INTA; bit 7 says whether
    /// there was a request, bits 2:0 its level.
    fn poll(&mut self, is_master: bool) -> u8 {
        self.set_flag(F_POLL, false);
        match self.pending(is_master) {
            Some(ir) => {
                self.ack(ir);
                0x80 | ir
            }
            None => 0,
        }
    }

    fn read(&mut self, data_port: bool, is_master: bool) -> u8 {
        if self.flag(F_POLL) {
            self.poll(is_master)
        } else if data_port {
            self.imr
        } else if self.flag(F_READ_ISR) {
            self.isr
        } else {
            self.irr
        }
    }

    fn encode(&self, w: &mut StateWriter) {
        w.u8(self.lines).u8(self.irr).u8(self.isr).u8(self.imr).u8(self.priority_add);
        w.u8(self.irq_base).u8(self.icw3).u8(self.init).u8(self.elcr).u16(self.flags);
    }

    fn decode(r: &mut StateReader<'_>, elcr_mask: u8) -> Result<Self, DeviceError> {
        let bad = |why| DeviceError::Malformed { kind: DeviceKind::Pic, why };
        let c = Self {
            lines: r.u8()?,
            irr: r.u8()?,
            isr: r.u8()?,
            imr: r.u8()?,
            priority_add: r.u8()?,
            irq_base: r.u8()?,
            icw3: r.u8()?,
            init: r.u8()?,
            elcr: r.u8()?,
            flags: r.u16()?,
        };
        if c.priority_add > 7 || c.irq_base & 7 != 0 || c.init > INIT_ICW4 {
            return Err(bad("priority, vector base or initialization step out of range"));
        }
        if c.elcr & !elcr_mask != 0 || c.flags & !F_ALL != 0 {
            return Err(bad("reserved ELCR or flag bits set"));
        }
        Ok(c)
    }
}

/// ELCR bits that exist: IRQ 0, 1, 2 (master) and 8, 13 (slave) are always edge
/// (PIIX/ICH datasheets, "ELCR1/ELCR2"; QEMU's `elcr_mask`).
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// The 8259A pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips as at power-on, before the guest initializes them: unprogrammed
    /// (vector base 0), nothing masked, every input edge-triggered.
    pub fn new() -> Self {
        Self { master: Chip::new(), slave: Chip::new() }
    }

    /// Drive ISA IRQ `irq` (0..16; IRQ 2 is the cascade and is ignored, as are
    /// numbers above 15).
    pub fn set_irq(&mut self, irq: u32, high: bool) {
        match irq {
            0 | 1 | 3..=7 => self.master.set_input(irq as u8, high),
            8..=15 => self.slave.set_input((irq - 8) as u8, high),
            _ => return,
        }
        self.update();
    }

    /// The slave's INT is the master's IR2. It is treated as a level that follows
    /// the slave's output: the real INT drops during the INTA cycle and rises again
    /// for the next request, so an edge latch would only add a way to lose one.
    fn update(&mut self) {
        let high = self.slave.pending(false).is_some();
        let bit = 1 << CASCADE_IR;
        if high {
            self.master.lines |= bit;
            self.master.irr |= bit;
        } else {
            self.master.lines &= !bit;
            self.master.irr &= !bit;
        }
    }

    /// Whether the master asserts INTR.
    pub fn intr_pending(&self) -> bool {
        self.master.pending(true).is_some()
    }

    /// The INTA cycle: the vector the CPU receives. With no request (INTR withdrawn
    /// before the acknowledge) the master answers IR7 without setting ISR, and a slave
    /// that has nothing answers its IR7 while the master's IR2 goes in service: the
    /// spurious IRQ 7 and IRQ 15 guests expect (datasheet, "Interrupt Sequence").
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.pending(true) {
            None => self.master.irq_base | 7,
            Some(CASCADE_IR) => {
                let v = match self.slave.pending(false) {
                    Some(ir) => {
                        self.slave.ack(ir);
                        self.slave.irq_base | ir
                    }
                    None => self.slave.irq_base | 7,
                };
                self.master.ack(CASCADE_IR);
                v
            }
            Some(ir) => {
                self.master.ack(ir);
                self.master.irq_base | ir
            }
        };
        self.update();
        vector
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        let v = match offset {
            0 | 1 => self.master.read(offset == 1, true),
            2 | 3 => self.slave.read(offset == 3, false),
            4 => self.master.elcr,
            5 => self.slave.elcr,
            _ => 0xff,
        };
        // A poll may have acknowledged something.
        self.update();
        v
    }

    fn write_byte(&mut self, offset: u64, v: u8) {
        match offset {
            0 => self.master.write_command(v),
            1 => self.master.write_data(v),
            2 => self.slave.write_command(v),
            3 => self.slave.write_data(v),
            4 | 5 => {
                let (chip, mask) =
                    if offset == 4 { (&mut self.master, ELCR_MASK[0]) } else { (&mut self.slave, ELCR_MASK[1]) };
                chip.elcr = v & mask;
                // Inputs that became level-triggered request exactly while high.
                let level = chip.level_mask();
                chip.irr = (chip.irr & !level) | (chip.lines & level);
            }
            _ => {}
        }
        self.update();
    }

    /// A guest read at `offset` (see the module doc). Each byte is its own port, as
    /// on x86 (a word read of 0x4D0 reads ELCR1 and ELCR2); bytes past a port pair
    /// belong to no port here and read as ones.
    pub fn port_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *d = if o / 2 == offset / 2 { self.read_byte(o) } else { 0xff };
        }
    }

    /// A guest write at `offset`, byte by byte like [`Pic::port_read`].
    pub fn port_write(&mut self, offset: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            if o / 2 == offset / 2 {
                self.write_byte(o, *d);
            }
        }
    }

    /// The state (version 1): the master, then the slave, each 11 bytes:
    ///
    /// | field        | type | meaning                                              |
    /// |--------------|------|------------------------------------------------------|
    /// | lines        | u8   | IR input levels                                      |
    /// | irr          | u8   | interrupt request register                           |
    /// | isr          | u8   | in-service register                                  |
    /// | imr          | u8   | interrupt mask register                              |
    /// | priority_add | u8   | IR level with the highest priority (0..=7)           |
    /// | irq_base     | u8   | ICW2 vector base (multiple of 8)                     |
    /// | icw3         | u8   | ICW3 as written                                      |
    /// | init         | u8   | 0 ready, 1/2/3 expecting ICW2/ICW3/ICW4              |
    /// | elcr         | u8   | ELCR (master bits 0-2, slave bits 0 and 5 are zero)  |
    /// | flags        | u16  | bit 0 read ISR, 1 poll, 2 special mask, 3 ICW4 needed, 4 single, 5 auto-EOI, 6 rotate on auto-EOI, 7 special fully nested, 8 LTIM |
    fn encode(&self) -> DeviceState {
        let mut w = StateWriter::new();
        self.master.encode(&mut w);
        self.slave.encode(&mut w);
        w.finish(DeviceKind::Pic, PIC_STATE_VERSION)
    }

    fn decode(state: &DeviceState) -> Result<Self, DeviceError> {
        let mut r = StateReader::new(state, DeviceKind::Pic, PIC_STATE_VERSION)?;
        let master = Chip::decode(&mut r, ELCR_MASK[0])?;
        let slave = Chip::decode(&mut r, ELCR_MASK[1])?;
        r.finish()?;
        let mut pic = Self { master, slave };
        // IR2 is derived from the slave, whatever the state says.
        pic.update();
        Ok(pic)
    }
}

impl Device for Pic {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Pic
    }
    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx<'_>) {
        self.port_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut DeviceCtx<'_>) {
        self.port_write(offset, data);
    }
    fn save(&self) -> DeviceState {
        self.encode()
    }
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        *self = Self::decode(state)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::tests::XorShift;
    use alloc::vec;

    const M_CMD: u64 = 0;
    const M_DATA: u64 = 1;
    const S_CMD: u64 = 2;
    const S_DATA: u64 = 3;

    fn out(pic: &mut Pic, offset: u64, v: u8) {
        pic.port_write(offset, &[v]);
    }

    fn inb(pic: &mut Pic, offset: u64) -> u8 {
        let mut d = [0u8];
        pic.port_read(offset, &mut d);
        d[0]
    }

    /// Linux's `init_8259A(0)`: mask all, ICW1 0x11, ICW2 0x20/0x28, ICW3 0x04/0x02,
    /// ICW4 0x01, then restore the masks (all masked until drivers ask).
    fn linux_init() -> Pic {
        let mut pic = Pic::new();
        out(&mut pic, M_DATA, 0xff);
        out(&mut pic, S_DATA, 0xff);
        out(&mut pic, M_CMD, 0x11);
        out(&mut pic, M_DATA, 0x20);
        out(&mut pic, M_DATA, 0x04);
        out(&mut pic, M_DATA, 0x01);
        out(&mut pic, S_CMD, 0x11);
        out(&mut pic, S_DATA, 0x28);
        out(&mut pic, S_DATA, 0x02);
        out(&mut pic, S_DATA, 0x01);
        out(&mut pic, M_DATA, 0xff);
        out(&mut pic, S_DATA, 0xff);
        pic
    }

    /// Unmask `irq` the way Linux's `unmask_8259A_irq` does (and the cascade).
    fn unmask(pic: &mut Pic, irq: u32) {
        let (off, bit) = if irq < 8 { (M_DATA, irq) } else { (S_DATA, irq - 8) };
        let m = inb(pic, off) & !(1 << bit);
        out(pic, off, m);
        if irq >= 8 {
            let m = inb(pic, M_DATA) & !(1 << 2);
            out(pic, M_DATA, m);
        }
    }

    #[test]
    fn port_offsets_cover_the_six_ports() {
        assert_eq!(pic_offset(0x20), Some(0));
        assert_eq!(pic_offset(0xa1), Some(3));
        assert_eq!(pic_offset(0x4d1), Some(5));
        assert_eq!(pic_offset(0x22), None);
        assert_eq!(PIC_PORTS.iter().map(|p| p.1).sum::<u16>(), 6);
    }

    #[test]
    fn linux_init_leaves_the_pair_masked_and_silent() {
        let mut pic = linux_init();
        assert_eq!((inb(&mut pic, M_DATA), inb(&mut pic, S_DATA)), (0xff, 0xff));
        for irq in 0..16 {
            pic.set_irq(irq, true);
        }
        assert!(!pic.intr_pending(), "a masked PIC never asserts INTR");
        assert_eq!(inb(&mut pic, M_CMD) & 0xfb, 0xfb, "IRR still records the requests");
        assert_eq!(pic.acknowledge(), 0x27, "INTA anyway: spurious IRQ 7");
        out(&mut pic, M_CMD, 0x0b);
        assert_eq!(inb(&mut pic, M_CMD), 0, "a spurious IRQ 7 sets no ISR bit");
    }

    #[test]
    fn legacy_irq_delivery_with_eoi_and_priority() {
        let mut pic = linux_init();
        unmask(&mut pic, 1);
        unmask(&mut pic, 4);
        pic.set_irq(4, true);
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x24);
        pic.set_irq(4, false);
        assert!(!pic.intr_pending(), "edge: acknowledged");
        pic.set_irq(1, true);
        assert!(pic.intr_pending(), "IRQ 1 beats IRQ 4 in service");
        assert_eq!(pic.acknowledge(), 0x21);
        pic.set_irq(1, false);
        pic.set_irq(4, true);
        assert!(!pic.intr_pending(), "IRQ 4 in service blocks itself");
        out(&mut pic, M_CMD, 0x0b);
        assert_eq!(inb(&mut pic, M_CMD), 0x12, "ISR: IRQ 1 and 4");
        out(&mut pic, M_CMD, 0x20);
        assert_eq!(inb(&mut pic, M_CMD), 0x10, "non-specific EOI ends the highest, IRQ 1");
        assert!(!pic.intr_pending());
        out(&mut pic, M_CMD, 0x64);
        assert_eq!(inb(&mut pic, M_CMD), 0, "specific EOI of IRQ 4");
        assert!(pic.intr_pending(), "the new IRQ 4 edge was latched");
        out(&mut pic, M_CMD, 0x0a);
        assert_eq!(inb(&mut pic, M_CMD), 0x10, "IRR read back");
        assert_eq!(pic.acknowledge(), 0x24);
    }

    #[test]
    fn rotation_makes_the_served_level_lowest() {
        let mut pic = linux_init();
        out(&mut pic, M_DATA, 0x00);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x23);
        out(&mut pic, M_CMD, 0xa0);
        pic.set_irq(1, true);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), 0x25, "after rotate-on-EOI of 3, 4 is highest, then 5");
        out(&mut pic, M_CMD, 0xe5);
        assert_eq!(pic.acknowledge(), 0x21, "rotate on specific EOI of 5: 6,7,0,1");
        out(&mut pic, M_CMD, 0x20);
        out(&mut pic, M_CMD, 0xc7);
        pic.set_irq(6, true);
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), 0x20, "set priority: 7 lowest, 0 highest");
    }

    #[test]
    fn slave_cascade_delivers_through_ir2_and_needs_both_eois() {
        let mut pic = linux_init();
        unmask(&mut pic, 12);
        unmask(&mut pic, 8);
        pic.set_irq(12, true);
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x2c);
        pic.set_irq(12, false);
        pic.set_irq(8, true);
        assert!(!pic.intr_pending(), "master IR2 in service (no special fully nested mode)");
        out(&mut pic, S_CMD, 0x20);
        assert!(!pic.intr_pending(), "the master still has IR2 in service");
        out(&mut pic, M_CMD, 0x20);
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x28);
        out(&mut pic, S_CMD, 0x20);
        out(&mut pic, M_CMD, 0x20);
        assert!(!pic.intr_pending());
        pic.set_irq(2, true);
        assert!(!pic.intr_pending(), "IRQ 2 is the cascade, not a line");
    }

    #[test]
    fn special_fully_nested_mode_lets_a_higher_slave_request_through() {
        let mut pic = linux_init();
        out(&mut pic, M_CMD, 0x11);
        out(&mut pic, M_DATA, 0x20);
        out(&mut pic, M_DATA, 0x04);
        out(&mut pic, M_DATA, 0x11);
        out(&mut pic, S_DATA, 0x00);
        pic.set_irq(12, true);
        assert_eq!(pic.acknowledge(), 0x2c);
        pic.set_irq(9, true);
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x29);
    }

    #[test]
    fn spurious_irq15_puts_master_ir2_in_service() {
        let mut pic = linux_init();
        unmask(&mut pic, 10);
        pic.set_irq(10, true);
        assert!(pic.intr_pending());
        out(&mut pic, S_DATA, 0xff);
        // INTR was seen, the slave's request went away before the INTA.
        assert_eq!(pic.acknowledge(), 0x27, "the master no longer sees IR2: IRQ 7");
        out(&mut pic, S_DATA, 0xfb);
        assert!(pic.intr_pending());
        let mut p = pic.clone();
        assert_eq!(p.acknowledge(), 0x2a);
        // The slave loses its request between the master's and its own answer.
        let mut q = linux_init();
        unmask(&mut q, 10);
        q.set_irq(10, true);
        q.master.irr |= 1 << CASCADE_IR;
        q.slave.imr = 0xff;
        assert_eq!(q.acknowledge(), 0x2f, "spurious IRQ 15");
        out(&mut q, M_CMD, 0x0b);
        assert_eq!(inb(&mut q, M_CMD), 0x04, "the master's IR2 is in service and needs an EOI");
    }

    #[test]
    fn level_triggered_via_elcr_requests_while_high_edge_only_once() {
        let mut pic = linux_init();
        out(&mut pic, 4, 0xff);
        out(&mut pic, 5, 0xff);
        assert_eq!((inb(&mut pic, 4), inb(&mut pic, 5)), (0xf8, 0xde), "IRQ 0-2, 8, 13 are always edge");
        let mut w = [0u8; 2];
        pic.port_read(4, &mut w);
        assert_eq!(w, [0xf8, 0xde], "a word read covers both ELCRs");
        unmask(&mut pic, 11);
        unmask(&mut pic, 3);
        pic.set_irq(11, true);
        assert_eq!(pic.acknowledge(), 0x2b);
        out(&mut pic, S_CMD, 0x20);
        out(&mut pic, M_CMD, 0x20);
        assert!(pic.intr_pending(), "level: still high after the EOI, requests again");
        assert_eq!(pic.acknowledge(), 0x2b);
        pic.set_irq(11, false);
        out(&mut pic, S_CMD, 0x20);
        out(&mut pic, M_CMD, 0x20);
        assert!(!pic.intr_pending(), "level: low, no request");
        pic.set_irq(11, true);
        pic.set_irq(11, false);
        assert!(!pic.intr_pending(), "level: a pulse that is gone before the INTA is gone");
        // IRQ 3 is level in the ELCR too; make it edge.
        out(&mut pic, 4, 0x00);
        pic.set_irq(3, true);
        pic.set_irq(3, false);
        assert!(pic.intr_pending(), "edge: the pulse was latched");
        assert_eq!(pic.acknowledge(), 0x23);
        out(&mut pic, M_CMD, 0x20);
        pic.set_irq(3, true);
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x23);
        out(&mut pic, M_CMD, 0x20);
        assert!(!pic.intr_pending(), "edge: high but no new edge");
    }

    #[test]
    fn auto_eoi_poll_and_special_mask() {
        let mut pic = Pic::new();
        out(&mut pic, M_CMD, 0x13); // single, ICW4
        out(&mut pic, M_DATA, 0x40);
        out(&mut pic, M_DATA, 0x03); // auto-EOI
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), 0x45);
        out(&mut pic, M_CMD, 0x0b);
        assert_eq!(inb(&mut pic, M_CMD), 0, "auto-EOI: nothing in service");
        pic.set_irq(6, true);
        out(&mut pic, M_CMD, 0x0c);
        assert_eq!(inb(&mut pic, M_CMD), 0x86, "poll: request at 6, acknowledged");
        assert_eq!(inb(&mut pic, M_CMD), 0, "poll is one read; ISR read again");
        // Special mask: mask the level in service and let a lower one through.
        let mut pic = linux_init();
        out(&mut pic, M_DATA, 0x00);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x23);
        pic.set_irq(6, true);
        assert!(!pic.intr_pending());
        out(&mut pic, M_CMD, 0x68);
        out(&mut pic, M_DATA, 0x08);
        assert!(pic.intr_pending(), "special mask mode");
        assert_eq!(pic.acknowledge(), 0x26);
        out(&mut pic, M_CMD, 0x48);
        assert!(!pic.intr_pending());
    }

    #[test]
    fn garbage_writes_to_every_port_leave_sane_reads() {
        let mut pic = linux_init();
        for v in 0..=255u8 {
            for offset in 0..8u64 {
                out(&mut pic, offset, v);
                pic.set_irq(u32::from(v) % 17, v & 1 == 0);
                let _ = inb(&mut pic, offset);
                if pic.intr_pending() {
                    let _ = pic.acknowledge();
                }
            }
        }
        assert_eq!(inb(&mut pic, 4) & 0x07, 0);
        assert_eq!(inb(&mut pic, 5) & 0x21, 0);
        assert_eq!(inb(&mut pic, 6), 0xff);
        // ICW1 resets to a usable chip whatever came before.
        let mut fresh = linux_init();
        for offset in [M_CMD, S_CMD] {
            out(&mut pic, offset, 0x11);
        }
        out(&mut pic, M_DATA, 0x20);
        out(&mut pic, M_DATA, 0x04);
        out(&mut pic, M_DATA, 0x01);
        out(&mut pic, S_DATA, 0x28);
        out(&mut pic, S_DATA, 0x02);
        out(&mut pic, S_DATA, 0x01);
        for p in [&mut pic, &mut fresh] {
            out(p, 4, 0);
            out(p, 5, 0);
            for irq in 0..16 {
                p.set_irq(irq, false);
            }
            out(p, M_DATA, 0xfe);
            p.set_irq(0, true);
        }
        assert!(pic.intr_pending());
        assert_eq!(pic.acknowledge(), 0x20);
        assert_eq!(fresh.acknowledge(), 0x20, "the same as a freshly initialized pair");
    }

    #[test]
    fn save_load_round_trip_preserves_behaviour() {
        let mut pic = linux_init();
        unmask(&mut pic, 14);
        unmask(&mut pic, 5);
        out(&mut pic, 5, 0x40);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), 0x25);
        pic.set_irq(14, true);
        let state = pic.save();
        assert_eq!(state.bytes.len(), 22);
        let mut copy = Pic::new();
        assert_eq!(copy.load(&state), Ok(()));
        assert_eq!(copy, pic);
        assert_eq!(copy.acknowledge(), 0x2e, "IRQ 14 (IR2) beats IRQ 5 in service");
        out(&mut copy, S_CMD, 0x20);
        out(&mut copy, M_CMD, 0x20);
        assert!(copy.intr_pending(), "level IRQ 14 still high");
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let mut pic = linux_init();
        unmask(&mut pic, 3);
        pic.set_irq(3, true);
        let before = pic.clone();
        let good = pic.save();
        let mut bad = vec![
            DeviceState { bytes: good.bytes[..21].to_vec(), ..good.clone() },
            DeviceState { version: 2, ..good.clone() },
            DeviceState { kind: DeviceKind::IoApic, ..good.clone() },
            DeviceState { bytes: vec![], ..good.clone() },
        ];
        let mut long = good.clone();
        long.bytes.push(0);
        bad.push(long);
        for (at, v) in [(4usize, 8u8), (5, 0x21), (7, 4), (8, 0x01), (19, 0x21), (10, 0x02)] {
            let mut s = good.clone();
            s.bytes[at] = v;
            bad.push(s);
        }
        for s in &bad {
            assert!(pic.load(s).is_err(), "{s:?}");
            assert_eq!(pic, before);
        }
    }

    #[test]
    fn random_accesses_and_lines_never_panic() {
        let mut pic = Pic::new();
        let mut rng = XorShift(0x0bad_cafe_f00d_1234);
        for _ in 0..100_000 {
            let r = rng.next();
            let offset = r >> 8 & 7;
            let len = [1usize, 2, 4, 8][(r >> 12 & 3) as usize];
            let v = rng.next().to_le_bytes();
            match r >> 16 & 7 {
                0..=2 => pic.port_write(offset, &v[..len]),
                3 => pic.port_read(offset, &mut [0u8; 8][..len]),
                4 => {
                    let _ = pic.acknowledge();
                }
                _ => pic.set_irq((r >> 24) as u32 % 18, r >> 40 & 1 == 1),
            }
        }
        let s = pic.save();
        let mut copy = Pic::new();
        assert_eq!(copy.load(&s), Ok(()));
        assert_eq!(copy, pic);
    }
}
