//! Interrupt routing: the GSI lines devices drive ([`IrqLines`]) wired to the I/O APIC
//! and the 8259A pair as on a PC, and the messages they produce handed to the local
//! APICs through an [`InterruptSink`].
//!
//! ```text
//!   device --set_level(gsi)--> IrqRouter --pin gsi (0..24)--> IoApic --deliver()--> sink
//!                                  |                                       (LAPICs)
//!                                  +--IR gsi (1, 3..16; GSI 2 -> IR0)--> Pic --INTR--> sink
//!                                                                   ext_int_pending() (LINT0)
//! ```
//!
//! Wiring (the PC's, as the MADT describes it): GSI n is I/O APIC pin n. For n < 16 it
//! is also the 8259 input IR n, except that the PIT's IRQ 0 arrives at pin 2 (the MADT's
//! interrupt source override, IRQ 0 -> GSI 2) and at the master's IR0; GSI 0 reaches
//! only pin 0 and no GSI drives IR2, the slave's cascade input.
//!
//! Ownership: the router owns both chips. Every device's accesses carry the router as
//! their `ctx.irq`, so the chips must be reachable from it while the bus is borrowed;
//! the exit path sends the I/O APIC page and the PIC ports to [`IrqRouter::mmio_read`]
//! and friends instead of the bus. Nothing here allocates: a guest drives these paths
//! at its own rate.
//!
//! The local APIC lives elsewhere (`lapic.rs`); all the router needs of it is
//! [`InterruptSink`], which the core implements over the real LAPICs.

use super::ioapic::{IOAPIC_BASE, IOAPIC_MMIO_LEN, IOAPIC_PINS, IoApic};
use super::pic::{Pic, pic_offset};
use super::{Device, DeviceError, DeviceState, IrqLines};

/// Where an interrupt message goes (82093AA 3.2.4, destination mode and field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The local APIC with this APIC ID.
    Physical(u8),
    /// The local APICs whose logical destination matches this (flat or cluster, as
    /// their DFR says).
    Logical(u8),
}

/// How the receiving local APIC treats a message (82093AA 3.2.4, "Delivery Mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeliveryMode {
    /// The vector, to every destination.
    Fixed = 0,
    /// The vector, to the destination running at the lowest priority.
    LowestPriority = 1,
    /// A system management interrupt (no vector).
    Smi = 2,
    /// A non-maskable interrupt (no vector).
    Nmi = 4,
    /// An INIT (no vector).
    Init = 5,
    /// An 8259-style interrupt: the vector comes from the PIC's INTA cycle.
    ExtInt = 7,
}

impl DeliveryMode {
    /// The mode encoded by `bits` (3 bits); `None` for the reserved 3 and 6.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }
}

/// What the router needs of the local APICs.
pub trait InterruptSink {
    /// An interrupt message from the I/O APIC. Fixed and lowest-priority messages
    /// carry a vector of at least 16; for the other modes `vector` is what the entry
    /// holds and means nothing. A level-triggered message must be answered, once the
    /// guest EOIs `vector` at a local APIC, by [`IrqRouter::eoi`] (the EOI broadcast).
    fn deliver(&mut self, target: Destination, vector: u8, mode: DeliveryMode, level_triggered: bool);
    /// The 8259 pair just asserted INTR (it was not asserted, or it was acknowledged
    /// since). The BSP's LINT0, if it is set to ExtINT and unmasked, should take it:
    /// when the vCPU can accept an interrupt, check [`IrqRouter::pic_intr_pending`]
    /// (INTR may have been withdrawn since) and inject [`IrqRouter::pic_acknowledge`].
    fn ext_int_pending(&mut self);
}

/// The ISA IRQ (8259 input) a GSI drives, if any.
fn pic_irq_of(gsi: u32) -> Option<u32> {
    match gsi {
        // MADT interrupt source override: the PIT's IRQ 0 is GSI 2.
        2 => Some(0),
        1 | 3..=15 => Some(gsi),
        // GSI 0 has no ISA IRQ behind the override; GSI 16 and up are I/O APIC only.
        _ => None,
    }
}

/// The PC's interrupt routing: the I/O APIC, the 8259 pair and where their outputs go.
#[derive(Debug)]
pub struct IrqRouter<S: InterruptSink> {
    ioapic: IoApic,
    pic: Pic,
    sink: S,
    /// INTR was reported to the sink and has not been acknowledged or dropped since.
    intr_reported: bool,
    /// `set_level` calls for GSIs that do not exist (a device wired wrong).
    stray_lines: u64,
}

impl<S: InterruptSink> IrqRouter<S> {
    /// Both chips as after reset, delivering into `sink`.
    pub fn new(sink: S) -> Self {
        Self { ioapic: IoApic::new(), pic: Pic::new(), sink, intr_reported: false, stray_lines: 0 }
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink, to change it.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The I/O APIC (for its counters and state).
    pub fn ioapic(&self) -> &IoApic {
        &self.ioapic
    }

    /// The 8259 pair (for its state).
    pub fn pic(&self) -> &Pic {
        &self.pic
    }

    /// `set_level` calls for GSIs beyond the I/O APIC's pins.
    pub fn stray_lines(&self) -> u64 {
        self.stray_lines
    }

    /// Tell the sink about a new INTR from the 8259 pair, once per assertion.
    fn check_intr(&mut self) {
        let intr = self.pic.intr_pending();
        if intr && !self.intr_reported {
            self.sink.ext_int_pending();
        }
        self.intr_reported = intr;
    }

    /// Whether the 8259 pair asserts INTR now.
    pub fn pic_intr_pending(&self) -> bool {
        self.pic.intr_pending()
    }

    /// The INTA cycle on the 8259 pair: the vector to inject (a spurious 7 or 15 of
    /// the pair's base when nothing is left to answer). A further request reports
    /// INTR again.
    pub fn pic_acknowledge(&mut self) -> u8 {
        let v = self.pic.acknowledge();
        self.intr_reported = false;
        self.check_intr();
        v
    }

    /// The EOI broadcast of a local APIC for `vector`: the I/O APIC clears Remote IRR
    /// of matching level-triggered entries and sends again those still asserted.
    pub fn eoi(&mut self, vector: u8) {
        self.ioapic.eoi(vector, &mut self.sink);
    }

    fn ioapic_offset(gpa: u64) -> Option<u64> {
        gpa.checked_sub(IOAPIC_BASE).filter(|o| *o < IOAPIC_MMIO_LEN)
    }

    /// A guest MMIO read at `gpa`; whether the I/O APIC claims it.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        let Some(offset) = Self::ioapic_offset(gpa) else { return false };
        self.ioapic.mmio_read(offset, data);
        true
    }

    /// A guest MMIO write at `gpa`; whether the I/O APIC claims it. What the write
    /// makes due (an unmasked asserted level pin, an EOI register write) goes out now.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(offset) = Self::ioapic_offset(gpa) else { return false };
        self.ioapic.mmio_write(offset, data);
        self.ioapic.service(&mut self.sink);
        true
    }

    /// A guest port read at `port`; whether the 8259 pair or the ELCR claims it.
    pub fn port_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        let Some(offset) = pic_offset(port) else { return false };
        self.pic.port_read(offset, data);
        // A poll read is an acknowledge.
        self.check_intr();
        true
    }

    /// A guest port write at `port`; whether the 8259 pair or the ELCR claims it.
    pub fn port_write(&mut self, port: u16, data: &[u8]) -> bool {
        let Some(offset) = pic_offset(port) else { return false };
        self.pic.port_write(offset, data);
        self.check_intr();
        true
    }

    /// Both chips' states: the I/O APIC's, then the pair's.
    pub fn save(&self) -> [DeviceState; 2] {
        [self.ioapic.save(), self.pic.save()]
    }

    /// Load both chips' states, all or nothing: on error neither changed. Messages
    /// the loaded state makes due go out, and an asserted INTR is reported again.
    pub fn load(&mut self, ioapic: &DeviceState, pic: &DeviceState) -> Result<(), DeviceError> {
        let mut new_ioapic = IoApic::new();
        new_ioapic.load(ioapic)?;
        let mut new_pic = Pic::new();
        new_pic.load(pic)?;
        self.ioapic = new_ioapic;
        self.pic = new_pic;
        self.ioapic.service(&mut self.sink);
        self.intr_reported = false;
        self.check_intr();
        Ok(())
    }
}

impl<S: InterruptSink> IrqLines for IrqRouter<S> {
    fn set_level(&mut self, gsi: u32, high: bool) {
        let pin = gsi as usize;
        if pin >= IOAPIC_PINS {
            self.stray_lines = self.stray_lines.saturating_add(1);
            return;
        }
        self.ioapic.set_pin(pin, high, &mut self.sink);
        if let Some(irq) = pic_irq_of(gsi) {
            self.pic.set_irq(irq, high);
            self.check_intr();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::DeviceKind;
    use alloc::vec;
    use alloc::vec::Vec;

    /// What a fake sink saw.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Msg {
        Deliver(Destination, u8, DeliveryMode, bool),
        ExtInt,
    }

    /// A sink that records.
    #[derive(Debug, Default)]
    pub(crate) struct FakeSink {
        pub(crate) msgs: Vec<Msg>,
    }

    impl InterruptSink for FakeSink {
        fn deliver(&mut self, target: Destination, vector: u8, mode: DeliveryMode, level_triggered: bool) {
            self.msgs.push(Msg::Deliver(target, vector, mode, level_triggered));
        }
        fn ext_int_pending(&mut self) {
            self.msgs.push(Msg::ExtInt);
        }
    }

    /// Deterministic pseudo-random numbers (xorshift64) for the no-panic tests.
    #[derive(Debug)]
    pub(crate) struct XorShift(pub(crate) u64);

    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    const IOREGSEL: u64 = IOAPIC_BASE;
    const IOWIN: u64 = IOAPIC_BASE + 0x10;

    fn redir(r: &mut IrqRouter<FakeSink>, pin: u8, low: u32, high: u32) {
        r.mmio_write(IOREGSEL, &u32::from(0x11 + 2 * pin).to_le_bytes());
        r.mmio_write(IOWIN, &high.to_le_bytes());
        r.mmio_write(IOREGSEL, &u32::from(0x10 + 2 * pin).to_le_bytes());
        r.mmio_write(IOWIN, &low.to_le_bytes());
    }

    fn outb(r: &mut IrqRouter<FakeSink>, port: u16, v: u8) {
        assert!(r.port_write(port, &[v]));
    }

    fn linux_pic_init(r: &mut IrqRouter<FakeSink>) {
        for (port, v) in [(0x21, 0xff), (0xa1, 0xff), (0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
            outb(r, port, v);
        }
        for (port, v) in [(0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01), (0x21, 0xff), (0xa1, 0xff)] {
            outb(r, port, v);
        }
    }

    fn fixed(vector: u8, level: bool) -> Msg {
        Msg::Deliver(Destination::Physical(0), vector, DeliveryMode::Fixed, level)
    }

    #[test]
    fn pit_irq0_reaches_ioapic_pin2_and_pic_ir0() {
        let mut r = IrqRouter::new(FakeSink::default());
        linux_pic_init(&mut r);
        for pin in 0..24 {
            redir(&mut r, pin, 0x1_0000, 0);
        }
        redir(&mut r, 2, 0x30, 0);
        outb(&mut r, 0x21, 0xfe);
        r.pulse(2);
        assert_eq!(r.sink().msgs, vec![fixed(0x30, false), Msg::ExtInt]);
        assert!(r.pic_intr_pending());
        assert_eq!(r.pic_acknowledge(), 0x20, "IR0: the master's base");
        r.pulse(2);
        assert_eq!(r.sink().msgs.len(), 3, "I/O APIC again; PIC IR0 is in service");
        outb(&mut r, 0x20, 0x20);
        assert!(r.pic_intr_pending(), "the edge seen while IR0 was in service was latched");
        assert_eq!(r.sink().msgs.last(), Some(&Msg::ExtInt), "and INTR reported after the EOI");
        assert_eq!(r.pic_acknowledge(), 0x20);
        outb(&mut r, 0x20, 0x20);
        r.pulse(0);
        assert_eq!(r.sink().msgs.len(), 4, "GSI 0 reaches only pin 0 (masked)");
        assert!(!r.pic_intr_pending());
    }

    #[test]
    fn legacy_mode_before_the_ioapic_delivers_through_pic_extint() {
        let mut r = IrqRouter::new(FakeSink::default());
        linux_pic_init(&mut r);
        // Keyboard and a slave IRQ, with the cascade unmasked.
        outb(&mut r, 0x21, 0xf9);
        outb(&mut r, 0xa1, 0xef);
        r.pulse(12);
        r.pulse(1);
        assert_eq!(r.sink().msgs, vec![Msg::ExtInt], "one INTR assertion");
        assert_eq!(r.pic_acknowledge(), 0x21, "IRQ 1 before the cascade");
        assert_eq!(r.sink().msgs, vec![Msg::ExtInt], "IRQ 12 waits behind IRQ 1 in service");
        outb(&mut r, 0x20, 0x20);
        assert_eq!(r.sink().msgs, vec![Msg::ExtInt, Msg::ExtInt], "EOI: INTR again for IRQ 12");
        assert_eq!(r.pic_acknowledge(), 0x2c);
        outb(&mut r, 0xa0, 0x20);
        outb(&mut r, 0x20, 0x20);
        assert!(!r.pic_intr_pending());
        assert_eq!(r.sink().msgs.len(), 2);
    }

    #[test]
    fn linux_with_ioapic_masks_the_pic_and_uses_level_eoi() {
        let mut r = IrqRouter::new(FakeSink::default());
        linux_pic_init(&mut r);
        redir(&mut r, 4, 0x24, 0);
        redir(&mut r, 20, 0x41 | 1 << 15 | 1 << 13, 0x0300_0000);
        r.pulse(4);
        r.set_level(20, true);
        let want = [fixed(0x24, false), Msg::Deliver(Destination::Physical(3), 0x41, DeliveryMode::Fixed, true)];
        assert_eq!(r.sink().msgs, want, "no ExtInt: the PIC is masked");
        r.eoi(0x41);
        assert_eq!(r.sink().msgs.len(), 3, "still asserted: sent again");
        r.set_level(20, false);
        r.eoi(0x41);
        assert_eq!(r.sink().msgs.len(), 3);
        // Unmasking a pin whose level is up goes out on the write itself.
        redir(&mut r, 21, 0x1_0000 | 0x42 | 1 << 15, 0);
        r.set_level(21, true);
        redir(&mut r, 21, 0x42 | 1 << 15, 0);
        assert_eq!(r.sink().msgs.last(), Some(&fixed(0x42, true)));
        r.set_level(24, true);
        r.set_level(u32::MAX, true);
        assert_eq!(r.stray_lines(), 2);
    }

    #[test]
    fn port_and_mmio_claims() {
        let mut r = IrqRouter::new(FakeSink::default());
        let mut d = [0u8; 4];
        assert!(r.mmio_read(IOAPIC_BASE + 0xffc, &mut d));
        assert!(!r.mmio_read(IOAPIC_BASE + 0x1000, &mut d));
        assert!(!r.mmio_write(IOAPIC_BASE - 1, &d));
        for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1] {
            assert!(r.port_read(port, &mut d[..1]), "{port:#x}");
        }
        assert!(!r.port_read(0x22, &mut d[..1]));
        assert!(!r.port_write(0x4d2, &d[..1]));
    }

    #[test]
    fn save_load_is_all_or_nothing_and_reports_intr_again() {
        let mut r = IrqRouter::new(FakeSink::default());
        linux_pic_init(&mut r);
        outb(&mut r, 0x21, 0xf7);
        redir(&mut r, 5, 0x35 | 1 << 15, 0);
        r.pulse(3);
        r.set_level(5, true);
        let [io, pic] = r.save();
        let mut other = IrqRouter::new(FakeSink::default());
        let bad_pic = DeviceState { version: 9, ..pic.clone() };
        assert!(other.load(&io, &bad_pic).is_err());
        assert_eq!(other.save(), IrqRouter::new(FakeSink::default()).save(), "the good I/O APIC state was not kept");
        let bad_io = DeviceState { kind: DeviceKind::Pic, ..io.clone() };
        assert!(other.load(&bad_io, &pic).is_err());
        assert_eq!(other.load(&io, &pic), Ok(()));
        assert_eq!(other.sink().msgs, vec![Msg::ExtInt], "INTR re-reported; the level pin waits for its EOI");
        other.eoi(0x35);
        assert_eq!(other.sink().msgs.last(), Some(&fixed(0x35, true)));
        assert_eq!(other.pic_acknowledge(), 0x23);
    }

    #[test]
    fn random_accesses_and_lines_through_the_router_never_panic() {
        let mut r = IrqRouter::new(FakeSink::default());
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let ports = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22, 0x4d2];
        for _ in 0..100_000 {
            let x = rng.next();
            let v = rng.next().to_le_bytes();
            let len = [1usize, 2, 4, 8][(x >> 4 & 3) as usize];
            let gpa = IOAPIC_BASE + (x >> 8 & 0x7ff) * 4 - 4;
            let port = ports[(x >> 16 & 7) as usize];
            match x & 15 {
                0..=2 => {
                    r.mmio_write(gpa, &v[..len]);
                }
                3 => {
                    r.mmio_read(gpa, &mut [0u8; 8][..len]);
                }
                4 => {
                    // Keep the I/O APIC's selector on real registers half the time.
                    r.mmio_write(IOREGSEL, &[(x >> 24) as u8 % 0x40]);
                    r.mmio_write(IOWIN, &v[..4]);
                }
                5..=6 => {
                    r.port_write(port, &v[..len]);
                }
                7 => {
                    r.port_read(port, &mut [0u8; 8][..len]);
                }
                8 => r.eoi(v[0]),
                9 => {
                    if r.pic_intr_pending() {
                        r.pic_acknowledge();
                    }
                }
                _ => r.set_level((x >> 24) as u32 % 26, x >> 40 & 1 == 1),
            }
            r.sink_mut().msgs.clear();
        }
        let [io, pic] = r.save();
        let mut other = IrqRouter::new(FakeSink::default());
        assert_eq!(other.load(&io, &pic), Ok(()));
        assert_eq!(other.save(), r.save());
    }
}
