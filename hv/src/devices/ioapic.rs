//! The guest's I/O APIC: an Intel 82093AA-style interrupt controller with 24 pins at
//! MMIO 0xFEC0_0000, as the MADT announces it and Linux programs it.
//!
//! It turns pin levels into interrupt messages for the local APICs: each pin has a
//! redirection entry (vector, delivery mode, destination, trigger mode, mask) and
//! [`IoApic::service`] sends what is due through an [`InterruptSink`]. It is not the
//! router (which GSI reaches which pin is `irq.rs`) and not a local APIC (the sink
//! decides which vCPU accepts a message).
//!
//! Register access (82093AA datasheet 3.0, "Register Description"): the guest writes a
//! register index to IOREGSEL (offset 0x00) and reads or writes that register through
//! IOWIN (offset 0x10). Version 0x20 is the one the ICH/PCH I/O APICs report; like
//! them it has the EOI register at offset 0x40 (a write clears Remote IRR of the entries
//! with that vector), which Linux uses when the local APIC suppresses EOI broadcasts.
//!
//! Line levels: `set_pin(pin, true)` means the interrupt is asserted. The polarity bit
//! is kept and read back but does not invert the input: the board's wiring matches
//! what the firmware tables tell the guest (as in QEMU), so a guest that programs the
//! wrong polarity cannot turn an idle line into an interrupt storm.
//!
//! Register writes only change state; deliveries they make due (unmasking a pin whose
//! level is asserted, an EOI register write) go out at the next [`IoApic::service`],
//! which the router calls after every access.

use super::irq::{DeliveryMode, Destination, InterruptSink};
use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, StateReader, StateWriter, put_le};

/// Where the I/O APIC's registers are in guest-physical memory (the MADT says so).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The MMIO window it answers (one page, as QEMU maps it).
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;
/// Input pins (GSIs 0..=23).
pub const IOAPIC_PINS: usize = 24;

/// The saved-state format this build writes and reads.
pub const IOAPIC_STATE_VERSION: u16 = 1;

// Direct registers (82093AA 3.1, "Memory Mapped Registers for Accessing the I/O APIC").
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
// ICH datasheet, "EOI Register" (FEC0_0040h): present from version 0x20 on.
const EOIR: u64 = 0x40;

// Indirect registers (82093AA 3.2, table "I/O APIC Registers").
const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDIR_FIRST: u8 = 0x10;
const REG_REDIR_LAST: u8 = REG_REDIR_FIRST + 2 * IOAPIC_PINS as u8 - 1;

/// 82093AA 3.2.2: bits 7:0 version, bits 23:16 the highest redirection entry index.
const VERSION: u32 = 0x20 | ((IOAPIC_PINS as u32 - 1) << 16);

// Redirection entry fields (82093AA 3.2.4, "IOREDTBL[23:0]").
const VECTOR: u64 = 0xff;
const DELMODE_SHIFT: u32 = 8;
const DESTMODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// What the guest may write: vector, delivery mode, destination mode, polarity (13),
/// trigger mode, mask and destination. Delivery status and Remote IRR are read-only;
/// the rest is reserved and reads as zero.
const WRITABLE: u64 = 0xff00_0000_0001_afff;
/// What an entry holds (and a saved state may contain); delivery status is computed.
const STORED: u64 = WRITABLE | REMOTE_IRR;

/// Why messages were not sent: counters a hostile or buggy guest drives up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoApicStats {
    /// Fixed or lowest-priority messages with a vector below 16 (the exceptions'
    /// range). They are still sent: the receiving local APIC refuses them and flags
    /// "receive illegal vector" in its ESR (SDM Vol. 3A 11.5.3), as on hardware.
    pub bad_vectors: u64,
    /// Messages with a reserved delivery mode (3 or 6), not delivered.
    pub bad_modes: u64,
}

/// The I/O APIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoApic {
    ioregsel: u8,
    /// 82093AA 3.2.1: a 4-bit APIC ID (bits 27:24).
    id: u8,
    /// 82093AA 3.2.3: the arbitration ID, loaded from the ID when the ID is written.
    arb: u8,
    redir: [u64; IOAPIC_PINS],
    /// Asserted inputs, one bit per pin.
    line: u32,
    /// Rising edges seen on unmasked edge-triggered pins and not yet sent.
    edge_pending: u32,
    stats: IoApicStats,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

/// The bit of `pin` in the per-pin bitmaps, if it is a pin.
fn pin_bit(pin: usize) -> Option<u32> {
    (pin < IOAPIC_PINS).then(|| 1u32 << pin)
}

/// The delivery mode of an entry (`None` for the reserved encodings 3 and 6).
fn mode_of(entry: u64) -> Option<DeliveryMode> {
    DeliveryMode::from_bits(((entry >> DELMODE_SHIFT) & 7) as u8)
}

/// Whether an entry behaves level-triggered. The datasheet's delivery-mode table
/// (82093AA 3.2.4) requires edge trigger mode for SMI, NMI, INIT and ExtINT, and a
/// local APIC never sends an EOI for them, so they are treated as edge whatever the
/// trigger bit says (otherwise Remote IRR would stay set for ever).
fn is_level(entry: u64) -> bool {
    entry & TRIGGER_LEVEL != 0 && matches!(mode_of(entry), Some(DeliveryMode::Fixed | DeliveryMode::LowestPriority))
}

impl IoApic {
    /// The I/O APIC after reset: ID 0, every entry masked (82093AA 3.2.4: the mask bit
    /// resets to 1), no line asserted.
    pub fn new() -> Self {
        Self {
            ioregsel: 0,
            id: 0,
            arb: 0,
            redir: [MASKED; IOAPIC_PINS],
            line: 0,
            edge_pending: 0,
            stats: IoApicStats::default(),
        }
    }

    /// The drop counters.
    pub fn stats(&self) -> IoApicStats {
        self.stats
    }

    /// The raw redirection entry of `pin` as the guest reads it (with delivery status).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        let e = *self.redir.get(pin)?;
        Some(if self.send_due(pin, e) { e | DELIVERY_STATUS } else { e })
    }

    /// Whether `pin` has a message to send (82093AA "Delivery Status: send pending").
    fn send_due(&self, pin: usize, entry: u64) -> bool {
        let Some(bit) = pin_bit(pin) else { return false };
        if entry & MASKED != 0 {
            return false;
        }
        if is_level(entry) { self.line & bit != 0 && entry & REMOTE_IRR == 0 } else { self.edge_pending & bit != 0 }
    }

    /// Drive input `pin` (out-of-range pins are ignored) and send what becomes due.
    /// An edge-triggered pin sends on a rising edge if it is unmasked (82093AA 3.2.4:
    /// edges on a masked pin are ignored, not held pending); a level-triggered pin
    /// sends while asserted and Remote IRR is clear.
    pub fn set_pin(&mut self, pin: usize, asserted: bool, sink: &mut dyn InterruptSink) {
        let (Some(bit), Some(&entry)) = (pin_bit(pin), self.redir.get(pin)) else { return };
        let rising = asserted && self.line & bit == 0;
        if asserted {
            self.line |= bit;
        } else {
            self.line &= !bit;
        }
        if rising && !is_level(entry) && entry & MASKED == 0 {
            self.edge_pending |= bit;
        }
        self.service(sink);
    }

    /// An EOI for `vector` (the local APIC's broadcast, or the EOI register): clear
    /// Remote IRR of the level-triggered entries with that vector, then send again
    /// those whose line is still asserted.
    pub fn eoi(&mut self, vector: u8, sink: &mut dyn InterruptSink) {
        self.clear_remote_irr(vector);
        self.service(sink);
    }

    fn clear_remote_irr(&mut self, vector: u8) {
        for e in &mut self.redir {
            if *e & VECTOR == u64::from(vector) && *e & REMOTE_IRR != 0 {
                *e &= !REMOTE_IRR;
            }
        }
    }

    /// Send every message that is due, lowest pin first. A level-triggered message
    /// sets Remote IRR even when its vector is refused: the message went out and the
    /// local APIC dropped it, as on hardware, so a pin routed to a bad vector is stuck
    /// until the guest fixes it rather than counted on every exit.
    pub fn service(&mut self, sink: &mut dyn InterruptSink) {
        for pin in 0..IOAPIC_PINS {
            let (Some(bit), Some(&entry)) = (pin_bit(pin), self.redir.get(pin)) else { continue };
            if entry & MASKED != 0 {
                // Masked: a latched edge is ignored, not kept for the unmask.
                self.edge_pending &= !bit;
                continue;
            }
            if !self.send_due(pin, entry) {
                continue;
            }
            let level = is_level(entry);
            self.edge_pending &= !bit;
            if level && let Some(e) = self.redir.get_mut(pin) {
                *e |= REMOTE_IRR;
            }
            self.send(entry, level, sink);
        }
    }

    fn send(&mut self, entry: u64, level: bool, sink: &mut dyn InterruptSink) {
        let Some(mode) = mode_of(entry) else {
            self.stats.bad_modes = self.stats.bad_modes.saturating_add(1);
            return;
        };
        let vector = (entry & VECTOR) as u8;
        // Only fixed and lowest-priority messages carry a vector (82093AA 3.2.4). One
        // below 16 is counted here and sent anyway: the I/O APIC does not check it, the
        // local APIC that receives it refuses it and sets ESR bit 6 (SDM Vol. 3A 11.5.3),
        // which a guest may read.
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.stats.bad_vectors = self.stats.bad_vectors.saturating_add(1);
        }
        let dest = (entry >> DEST_SHIFT) as u8;
        let target =
            if entry & DESTMODE_LOGICAL != 0 { Destination::Logical(dest) } else { Destination::Physical(dest) };
        sink.deliver(target, vector, mode, level);
    }

    /// The indirect register `index` as the guest reads it (no side effects).
    fn read_reg(&self, index: u8) -> u32 {
        match index {
            REG_ID => u32::from(self.id) << 24,
            REG_VER => VERSION,
            REG_ARB => u32::from(self.arb) << 24,
            REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let pin = usize::from((index - REG_REDIR_FIRST) / 2);
                let e = self.entry(pin).unwrap_or(u64::MAX);
                if index & 1 == 0 { e as u32 } else { (e >> 32) as u32 }
            }
            // Unimplemented indices read as ones, like unclaimed bus addresses.
            _ => u32::MAX,
        }
    }

    fn write_reg(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => {
                self.id = ((value >> 24) & 0xf) as u8;
                self.arb = self.id;
            }
            REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let pin = usize::from((index - REG_REDIR_FIRST) / 2);
                let Some(e) = self.redir.get_mut(pin) else { return };
                if index & 1 == 0 {
                    let low = WRITABLE & 0xffff_ffff;
                    *e = (*e & !low) | (u64::from(value) & low);
                    // Remote IRR means nothing for an edge-triggered entry; clear it so
                    // a later switch back to level starts clean (QEMU does the same).
                    if !is_level(*e) {
                        *e &= !REMOTE_IRR;
                    }
                } else {
                    let high = WRITABLE & !0xffff_ffff;
                    *e = (*e & !high) | ((u64::from(value) << 32) & high);
                }
            }
            // Version and arbitration are read-only; other indices do not exist.
            _ => {}
        }
    }

    /// A guest read at `offset` in the MMIO window. IOREGSEL and IOWIN are 32-bit
    /// registers; a narrower read gets the addressed bytes, bytes past the register
    /// and everything else read as ones.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let shift = (offset & 3) as usize;
        let value = match offset & !3 {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_reg(self.ioregsel),
            _ => return,
        };
        let n = data.len().min(4 - shift);
        if let Some(d) = data.get_mut(..n) {
            put_le(d, u64::from(value) >> (8 * shift));
        }
    }

    /// A guest write at `offset`: bytes that fall into a 32-bit register replace those
    /// bytes of it; the rest are dropped. Deliveries it makes due wait for
    /// [`IoApic::service`].
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let shift = (offset & 3) as usize;
        let n = data.len().min(4 - shift);
        let bytes = data.get(..n).unwrap_or(&[]);
        let merge = |old: u32| {
            let mut b = old.to_le_bytes();
            for (d, s) in b.iter_mut().skip(shift).zip(bytes) {
                *d = *s;
            }
            u32::from_le_bytes(b)
        };
        match offset & !3 {
            // IOREGSEL: bits 7:0 select the register; the rest are reserved.
            IOREGSEL => self.ioregsel = merge(u32::from(self.ioregsel)) as u8,
            IOWIN => {
                let index = self.ioregsel;
                let old = self.read_reg(index);
                self.write_reg(index, merge(old));
            }
            // The vector is bits 7:0; a write that does not include them is ignored.
            EOIR if shift == 0 => {
                if let Some(&v) = bytes.first() {
                    self.clear_remote_irr(v);
                }
            }
            _ => {}
        }
    }

    /// The state (version 1), little-endian:
    ///
    /// | field          | type         | meaning                                  |
    /// |----------------|--------------|------------------------------------------|
    /// | ioregsel       | u8           | selected register index                  |
    /// | id             | u8           | APIC ID (0..=15)                         |
    /// | arb            | u8           | arbitration ID (0..=15)                  |
    /// | line           | u32          | asserted inputs, bit n = pin n (< 2^24)  |
    /// | edge_pending   | u32          | latched edges not yet sent (< 2^24)      |
    /// | redir[0..24]   | 24 x u64     | entries; only writable bits and Remote IRR |
    /// | bad_vectors    | u64          | drop counter                             |
    /// | bad_modes      | u64          | drop counter                             |
    fn encode(&self) -> DeviceState {
        let mut w = StateWriter::new();
        w.u8(self.ioregsel).u8(self.id).u8(self.arb).u32(self.line).u32(self.edge_pending);
        for e in &self.redir {
            w.u64(*e);
        }
        w.u64(self.stats.bad_vectors).u64(self.stats.bad_modes);
        w.finish(DeviceKind::IoApic, IOAPIC_STATE_VERSION)
    }

    fn decode(state: &DeviceState) -> Result<Self, DeviceError> {
        let bad = |why| DeviceError::Malformed { kind: DeviceKind::IoApic, why };
        let mut r = StateReader::new(state, DeviceKind::IoApic, IOAPIC_STATE_VERSION)?;
        let mut s = Self::new();
        s.ioregsel = r.u8()?;
        s.id = r.u8()?;
        s.arb = r.u8()?;
        s.line = r.u32()?;
        s.edge_pending = r.u32()?;
        for e in &mut s.redir {
            *e = r.u64()?;
            if *e & !STORED != 0 {
                return Err(bad("a redirection entry has reserved bits set"));
            }
        }
        s.stats.bad_vectors = r.u64()?;
        s.stats.bad_modes = r.u64()?;
        r.finish()?;
        if s.id > 0xf || s.arb > 0xf {
            return Err(bad("APIC ID or arbitration ID wider than 4 bits"));
        }
        let pins = (1u32 << IOAPIC_PINS) - 1;
        if s.line & !pins != 0 || s.edge_pending & !pins != 0 {
            return Err(bad("a pin bitmap names a pin beyond 23"));
        }
        Ok(s)
    }
}

impl Device for IoApic {
    fn kind(&self) -> DeviceKind {
        DeviceKind::IoApic
    }
    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx<'_>) {
        self.mmio_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut DeviceCtx<'_>) {
        self.mmio_write(offset, data);
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
    use crate::devices::irq::tests::{FakeSink, Msg, XorShift};
    use alloc::vec;

    fn sel_write(io: &mut IoApic, index: u8, value: u32) {
        io.mmio_write(IOREGSEL, &[index, 0, 0, 0]);
        io.mmio_write(IOWIN, &value.to_le_bytes());
    }

    fn sel_read(io: &mut IoApic, index: u8) -> u32 {
        io.mmio_write(IOREGSEL, &u32::from(index).to_le_bytes());
        let mut d = [0u8; 4];
        io.mmio_read(IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    /// Linux's `setup_IO_APIC`: mask every entry (`clear_IO_APIC`), then route.
    fn linux_masked() -> IoApic {
        let mut io = IoApic::new();
        for pin in 0..IOAPIC_PINS as u8 {
            sel_write(&mut io, 0x10 + 2 * pin, MASKED as u32);
            sel_write(&mut io, 0x11 + 2 * pin, 0);
        }
        io
    }

    fn msg(dest: u8, vector: u8, level: bool) -> Msg {
        Msg::Deliver(Destination::Physical(dest), vector, DeliveryMode::Fixed, level)
    }

    #[test]
    fn id_version_and_arbitration_read_as_the_datasheet_says() {
        let mut io = IoApic::new();
        assert_eq!(sel_read(&mut io, REG_VER), 0x0017_0020, "version 0x20, max entry 23");
        sel_write(&mut io, REG_ID, 0xffff_ffff);
        assert_eq!(sel_read(&mut io, REG_ID), 0x0f00_0000, "4-bit ID");
        assert_eq!(sel_read(&mut io, REG_ARB), 0x0f00_0000, "arbitration follows the ID");
        sel_write(&mut io, REG_VER, 0);
        sel_write(&mut io, REG_ARB, 0);
        assert_eq!(sel_read(&mut io, REG_VER), 0x0017_0020, "read-only");
        assert_eq!(sel_read(&mut io, REG_ARB), 0x0f00_0000, "read-only");
        assert_eq!(sel_read(&mut io, 0x10), MASKED as u32, "entries reset masked");
        assert_eq!(sel_read(&mut io, 0x40), u32::MAX, "no such register");
        let mut d = [0u8; 4];
        io.mmio_read(IOREGSEL, &mut d);
        assert_eq!(d, [0x40, 0, 0, 0]);
    }

    #[test]
    fn linux_routes_irq4_to_vector_0x24_edge() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        io.set_pin(4, true, &mut sink);
        io.set_pin(4, false, &mut sink);
        assert!(sink.msgs.is_empty(), "masked: the edge is ignored");
        sel_write(&mut io, 0x19, 0x0100_0000);
        sel_write(&mut io, 0x18, 0x24);
        io.service(&mut sink);
        assert!(sink.msgs.is_empty(), "the edge seen while masked was not kept");
        io.set_pin(4, true, &mut sink);
        assert_eq!(sink.msgs, vec![msg(1, 0x24, false)]);
        io.set_pin(4, true, &mut sink);
        assert_eq!(sink.msgs.len(), 1, "still high: no new edge");
        io.set_pin(4, false, &mut sink);
        io.set_pin(4, true, &mut sink);
        assert_eq!(sink.msgs.len(), 2, "a new rising edge");
        assert_eq!(sel_read(&mut io, 0x18) & (REMOTE_IRR as u32 | DELIVERY_STATUS as u32), 0);
    }

    #[test]
    fn level_pin_sets_remote_irr_and_is_sent_again_after_eoi_while_high() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        sel_write(&mut io, 0x10 + 2 * 10, (TRIGGER_LEVEL | 0x3a) as u32 | (1 << 13));
        io.set_pin(10, true, &mut sink);
        assert_eq!(sink.msgs, vec![msg(0, 0x3a, true)]);
        assert_ne!(sel_read(&mut io, 0x24) & REMOTE_IRR as u32, 0, "Remote IRR set");
        io.set_pin(10, true, &mut sink);
        io.service(&mut sink);
        assert_eq!(sink.msgs.len(), 1, "no re-delivery before the EOI");
        io.eoi(0x3b, &mut sink);
        assert_eq!(sink.msgs.len(), 1, "another vector's EOI");
        io.eoi(0x3a, &mut sink);
        assert_eq!(sink.msgs.len(), 2, "still high after the EOI: sent again");
        io.set_pin(10, false, &mut sink);
        io.eoi(0x3a, &mut sink);
        assert_eq!(sink.msgs.len(), 2, "low after the EOI: nothing");
        assert_eq!(sel_read(&mut io, 0x24) & REMOTE_IRR as u32, 0);
        // Remote IRR is read-only: writing it does not set it.
        sel_write(&mut io, 0x24, (TRIGGER_LEVEL | REMOTE_IRR | 0x3a) as u32);
        assert_eq!(sel_read(&mut io, 0x24) & REMOTE_IRR as u32, 0);
        // The EOI register does the same as the broadcast.
        io.set_pin(10, true, &mut sink);
        assert_eq!(sink.msgs.len(), 3);
        io.mmio_write(EOIR, &[0x3a, 0, 0, 0]);
        io.service(&mut sink);
        assert_eq!(sink.msgs.len(), 4, "EOI register write, line still high");
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers_and_masking_stops_it() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        sel_write(&mut io, 0x10 + 2 * 16, (TRIGGER_LEVEL | MASKED | 0x50) as u32);
        io.set_pin(16, true, &mut sink);
        assert!(sink.msgs.is_empty());
        sel_write(&mut io, 0x10 + 2 * 16, (TRIGGER_LEVEL | 0x50) as u32);
        assert_ne!(io.entry(16).unwrap_or(0) & DELIVERY_STATUS, 0, "send pending until serviced");
        io.service(&mut sink);
        assert_eq!(sink.msgs, vec![msg(0, 0x50, true)]);
        assert_eq!(io.entry(16).unwrap_or(0) & DELIVERY_STATUS, 0);
        sel_write(&mut io, 0x10 + 2 * 16, (TRIGGER_LEVEL | MASKED | 0x50) as u32);
        io.eoi(0x50, &mut sink);
        assert_eq!(sink.msgs.len(), 1, "masked: not sent again");
    }

    #[test]
    fn logical_destination_and_other_modes_are_passed_on() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        sel_write(&mut io, 0x10, (7 << 8) | DESTMODE_LOGICAL as u32);
        sel_write(&mut io, 0x11, 0xff00_0000);
        sel_write(&mut io, 0x12, (4 << 8) | TRIGGER_LEVEL as u32);
        io.set_pin(0, true, &mut sink);
        io.set_pin(1, true, &mut sink);
        io.set_pin(1, false, &mut sink);
        io.set_pin(1, true, &mut sink);
        assert_eq!(
            sink.msgs,
            vec![
                Msg::Deliver(Destination::Logical(0xff), 0, DeliveryMode::ExtInt, false),
                Msg::Deliver(Destination::Physical(0), 0, DeliveryMode::Nmi, false),
                Msg::Deliver(Destination::Physical(0), 0, DeliveryMode::Nmi, false),
            ],
            "ExtINT and NMI carry no vector and are edge whatever the trigger bit"
        );
    }

    #[test]
    fn bad_vectors_are_counted_and_sent_reserved_modes_dropped() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        for v in 0..16u32 {
            sel_write(&mut io, 0x10 + 2 * 3, v | (1 << 8));
            io.set_pin(3, true, &mut sink);
            io.set_pin(3, false, &mut sink);
        }
        sel_write(&mut io, 0x10 + 2 * 5, 0x05 | TRIGGER_LEVEL as u32);
        io.set_pin(5, true, &mut sink);
        io.service(&mut sink);
        io.service(&mut sink);
        sel_write(&mut io, 0x10 + 2 * 6, 0x40 | (3 << 8));
        io.set_pin(6, true, &mut sink);
        sel_write(&mut io, 0x10 + 2 * 7, 0x40 | (6 << 8));
        io.set_pin(7, true, &mut sink);
        // The 16 edges (lowest priority, vectors 0-15) and the level pin's one message
        // go out for the LAPIC to refuse; the reserved modes do not.
        let mut want: alloc::vec::Vec<Msg> =
            (0..16).map(|v| Msg::Deliver(Destination::Physical(0), v, DeliveryMode::LowestPriority, false)).collect();
        want.push(msg(0, 0x05, true));
        assert_eq!(sink.msgs, want);
        assert_eq!(io.stats(), IoApicStats { bad_vectors: 17, bad_modes: 2 }, "a stuck level pin counts once");
        sink.msgs.clear();
        sel_write(&mut io, 0x10 + 2 * 5, 0x25 | TRIGGER_LEVEL as u32);
        io.eoi(0x05, &mut sink);
        assert!(sink.msgs.is_empty(), "EOI compares with the entry's vector now, 0x25");
        io.eoi(0x25, &mut sink);
        assert_eq!(sink.msgs, vec![msg(0, 0x25, true)], "reprogrammed and EOIed: the stuck pin works again");
    }

    #[test]
    fn narrow_and_wide_accesses_touch_only_their_register_bytes() {
        let mut io = linux_masked();
        io.mmio_write(IOREGSEL, &[0x13]);
        io.mmio_write(IOWIN + 3, &[0xab]);
        assert_eq!(sel_read(&mut io, 0x13), 0xab00_0000);
        io.mmio_write(IOREGSEL, &[0x13]);
        let mut b = [0u8; 2];
        io.mmio_read(IOWIN + 3, &mut b);
        assert_eq!(b, [0xab, 0xff], "the byte past the register reads as ones");
        let mut q = [0u8; 8];
        io.mmio_read(IOWIN, &mut q);
        assert_eq!(q, [0, 0, 0, 0xab, 0xff, 0xff, 0xff, 0xff]);
        io.mmio_write(0x20, &[1; 8]);
        io.mmio_read(0x800, &mut q);
        assert_eq!(q, [0xff; 8]);
    }

    #[test]
    fn garbage_in_every_register_reads_back_sane() {
        let mut io = IoApic::new();
        let mut sink = FakeSink::default();
        for index in 0..=255u8 {
            sel_write(&mut io, index, 0xffff_ffff);
        }
        for index in 0..=255u8 {
            let v = sel_read(&mut io, index);
            match index {
                REG_ID | REG_ARB => assert_eq!(v, 0x0f00_0000),
                REG_VER => assert_eq!(v, VERSION),
                REG_REDIR_FIRST..=REG_REDIR_LAST if index & 1 == 0 => {
                    assert_eq!(v & !(WRITABLE as u32 | DELIVERY_STATUS as u32 | REMOTE_IRR as u32), 0, "{index:#x}")
                }
                REG_REDIR_FIRST..=REG_REDIR_LAST => assert_eq!(v, 0xff00_0000),
                _ => assert_eq!(v, u32::MAX),
            }
        }
        for pin in 0..30 {
            io.set_pin(pin, true, &mut sink);
        }
        assert!(sink.msgs.is_empty(), "all masked");
    }

    #[test]
    fn save_load_round_trip_preserves_behaviour() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        sel_write(&mut io, 0x10 + 2 * 9, (TRIGGER_LEVEL | 0x39) as u32);
        sel_write(&mut io, 0x11 + 2 * 9, 0x0200_0000);
        io.set_pin(9, true, &mut sink);
        io.mmio_write(IOREGSEL, &[0x22]);
        let state = io.save();
        assert_eq!(state.bytes.len(), 3 + 8 + 24 * 8 + 16);
        let mut copy = IoApic::new();
        assert_eq!(copy.load(&state), Ok(()));
        assert_eq!(copy, io);
        let mut sink2 = FakeSink::default();
        copy.set_pin(9, true, &mut sink2);
        assert!(sink2.msgs.is_empty(), "Remote IRR came along");
        copy.eoi(0x39, &mut sink2);
        assert_eq!(sink2.msgs, vec![msg(2, 0x39, true)], "the line level came along");
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let mut io = linux_masked();
        let mut sink = FakeSink::default();
        sel_write(&mut io, 0x18, 0x24);
        io.set_pin(4, true, &mut sink);
        let before = io.clone();
        let good = io.save();
        let mut bad = vec![];
        bad.push(DeviceState { bytes: good.bytes[..good.bytes.len() - 1].to_vec(), ..good.clone() });
        let mut long = good.clone();
        long.bytes.push(0);
        bad.push(long);
        bad.push(DeviceState { version: 2, ..good.clone() });
        bad.push(DeviceState { version: 0, ..good.clone() });
        bad.push(DeviceState { kind: DeviceKind::Pic, ..good.clone() });
        let mut reserved = good.clone();
        reserved.bytes[13] |= 0x02; // entry 0, bit 17
        bad.push(reserved);
        let mut id = good.clone();
        id.bytes[1] = 0x10;
        bad.push(id);
        let mut pins = good.clone();
        pins.bytes[6] = 0x01; // line bit 24
        bad.push(pins);
        bad.push(DeviceState { bytes: vec![], ..good.clone() });
        for s in &bad {
            assert!(io.load(s).is_err(), "{s:?}");
            assert_eq!(io, before);
        }
    }

    #[test]
    fn random_accesses_and_lines_never_panic() {
        let mut io = IoApic::new();
        let mut sink = FakeSink::default();
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..100_000 {
            let r = rng.next();
            let offset = match r & 3 {
                0 => r >> 8 & 0xfff,
                1 => IOREGSEL + (r >> 8 & 7),
                2 => IOWIN + (r >> 8 & 7),
                _ => EOIR,
            };
            let len = [1usize, 2, 4, 8][(r >> 20 & 3) as usize];
            let v = rng.next().to_le_bytes();
            match r >> 24 & 7 {
                0 | 1 => io.mmio_write(offset, &v[..len]),
                2 => io.mmio_read(offset, &mut [0u8; 8][..len]),
                3 => sel_write(&mut io, (r >> 32) as u8 % 0x40, (r >> 40) as u32),
                4 => io.eoi((r >> 32) as u8, &mut sink),
                _ => io.set_pin((r >> 32) as usize % 26, r >> 40 & 1 == 1, &mut sink),
            }
            sink.msgs.clear();
        }
        let s = io.save();
        let mut copy = IoApic::new();
        assert_eq!(copy.load(&s), Ok(()));
    }
}
