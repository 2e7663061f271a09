//! A domain's PC at run time: device timers advanced with guest time, interrupt
//! messages carried from the I/O APIC and from IPIs to the vCPUs' local APICs, the
//! 8259 pair's INTR taken through LINT0, and what devices ask of the hypervisor
//! (console bytes, exit, power-off, reset).
//!
//! ```text
//!   device line --IrqRouter (devices::irq)--> I/O APIC message --Messages--> route_messages
//!                                          \-> 8259 INTR (polled: pic_intr_pending)    |
//!   LAPIC ICR write (MSR or MMIO) ---------------------------- Ipi ---------> route_ipi
//!                                                                               v
//!                                                    target vCPU's Lapic::accept (IRR)
//!                                     (INIT, SIPI: its RunState; sched starts the AP)
//! ```
//!
//! The router cannot reach the vCPUs itself: they live beside it in the domain, and a
//! device access borrows the router as its interrupt lines. So the router's sink is a
//! bounded queue ([`Messages`]), drained into the LAPICs after every device access and
//! every device timer, before the scheduler looks for an interrupt to inject.

use crate::arch::Backend;
use crate::devices::irq::{self, DeliveryMode as IoApicMode, Destination as IoApicDestination, InterruptSink};
use crate::devices::lapic::{self, DeliveryMode, Ipi};
use crate::devices::{DeviceCtx, Effect};

use super::exit::Action;
use super::{Domain, RunState, VcpuSlot};

/// Messages the I/O APIC may have in flight between two drains: one per pin is the
/// most one access or timer step can produce.
const QUEUE: usize = 32;

/// One interrupt message from the I/O APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    target: IoApicDestination,
    vector: u8,
    mode: IoApicMode,
    level_triggered: bool,
}

/// The I/O APIC's sink: messages wait here until [`Domain::route_messages`] hands
/// them to the LAPICs. The 8259's INTR needs no queue: the scheduler polls it.
#[derive(Debug, Default)]
pub struct Messages {
    queue: heapless::Deque<Message, QUEUE>,
    /// Messages lost to a full queue (none should be: it is drained after each access).
    pub dropped: u64,
}

impl InterruptSink for Messages {
    fn deliver(&mut self, target: IoApicDestination, vector: u8, mode: IoApicMode, level_triggered: bool) {
        if self.queue.push_back(Message { target, vector, mode, level_triggered }).is_err() {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    fn ext_int_pending(&mut self) {
        // Polled by the scheduler before each entry (`IrqRouter::pic_intr_pending`).
    }
}

/// A domain's interrupt controllers (I/O APIC and 8259 pair) and their outputs.
pub type Router = irq::IrqRouter<Messages>;

/// How a PC BIOS leaves the 8259 pair for the OS (SeaBIOS `pic_setup`): initialized
/// (ICW1 edge + ICW4, ICW2 vector bases 0x08 and 0x70, ICW3 cascade on IR2, ICW4 8086
/// mode) with every input masked but the cascade. An unprogrammed pair would answer
/// with vector base 0, the CPU's exception vectors.
const BIOS_PIC_SETUP: [(u16, u8); 10] = [
    (0x20, 0x11),
    (0x21, 0x08),
    (0x21, 0x04),
    (0x21, 0x01),
    (0x21, 0xfb),
    (0xa0, 0x11),
    (0xa1, 0x70),
    (0xa1, 0x02),
    (0xa1, 0x01),
    (0xa1, 0xff),
];

/// A new domain's router: the I/O APIC as after reset (every pin masked), the 8259
/// pair as a BIOS leaves it ([`BIOS_PIC_SETUP`]).
pub fn new_router() -> Router {
    let mut r = irq::IrqRouter::new(Messages::default());
    for (port, value) in BIOS_PIC_SETUP {
        r.port_write(port, &[value]);
    }
    r
}

/// An I/O APIC message as the LAPICs' routing sees it: an IPI from no sender, with the
/// 8-bit destinations of an xAPIC-format message (82093AA 3.2.4; no interrupt
/// remapping, so x2APIC targets are matched by the same 8 bits).
fn as_ipi(m: &Message) -> Option<Ipi> {
    let mode = match m.mode {
        IoApicMode::Fixed => DeliveryMode::Fixed,
        IoApicMode::LowestPriority => DeliveryMode::LowestPriority,
        IoApicMode::Smi => DeliveryMode::Smi,
        IoApicMode::Nmi => DeliveryMode::Nmi,
        IoApicMode::Init => DeliveryMode::Init,
        // ExtINT through the I/O APIC would need an INTA cycle to the 8259 from the
        // I/O APIC's side; PCs route the 8259 through LINT0 instead (as we do).
        IoApicMode::ExtInt => return None,
    };
    let destination = match m.target {
        IoApicDestination::Physical(id) => lapic::Destination::Physical(u32::from(id)),
        IoApicDestination::Logical(mda) => lapic::Destination::Logical(u32::from(mda)),
    };
    Some(Ipi { destination, mode, vector: m.vector, level: true, level_triggered: m.level_triggered, x2apic: false })
}

/// Deliver `ipi` from APIC ID `sender` to the vCPUs it names. Fixed IPIs set the vector
/// in every target's IRR, lowest priority in the first target's (SDM Vol. 3A 11.6.2.4
/// leaves the arbitration to the model); NMI and SMI are not delivered.
///
/// INIT resets the targets' LAPICs (SDM Vol. 3A 11.4.7.3) and puts every target but
/// the BSP in [`RunState::WaitForSipi`], whatever it was doing. The BSP's LAPIC resets
/// but the BSP keeps running: on hardware INIT restarts it at the reset vector in the
/// firmware, which these domains do not have (no OS sends INIT to its BSP). A SIPI to
/// a vCPU waiting for one records its vector ([`RunState::StartUp`]); the scheduler
/// loads the start state before the vCPU next runs. A SIPI to anything else is
/// dropped (SDM Vol. 3A 9.4.4.1), as is a second SIPI of INIT-SIPI-SIPI.
///
/// Returns how many messages reached no LAPIC or were not delivered.
pub(crate) fn route_ipi<V>(vcpus: &mut [VcpuSlot<V>], ipi: &Ipi, sender: u32) -> u64 {
    let mut addresses: heapless::Vec<lapic::ApicAddress, { super::config::MAX_VCPUS as usize }> = heapless::Vec::new();
    for s in vcpus.iter() {
        if addresses.push(s.lapic.address()).is_err() {
            break;
        }
    }
    let mut delivered = false;
    for id in lapic::ipi_targets(ipi, sender, &addresses) {
        let Some(target) = vcpus.iter_mut().find(|s| s.lapic.apic_id() == id) else { continue };
        match ipi.mode {
            DeliveryMode::Fixed => {
                target.lapic.accept(ipi.vector, ipi.level_triggered);
            }
            DeliveryMode::LowestPriority if !delivered => {
                target.lapic.accept(ipi.vector, ipi.level_triggered);
            }
            DeliveryMode::Init => {
                // The LAPIC resets; an AP stops wherever it was and waits for a SIPI.
                if target.lapic.receive_init() {
                    target.state = RunState::WaitForSipi;
                }
            }
            DeliveryMode::StartUp => {
                // Only a vCPU that really waits starts: the LAPIC's flag alone is also
                // set on the APs of a guest_abi domain, which run from creation.
                if target.state == RunState::WaitForSipi
                    && let Some(vector) = target.lapic.receive_sipi(ipi.vector)
                {
                    target.state = RunState::StartUp(vector);
                }
            }
            DeliveryMode::LowestPriority | DeliveryMode::InitDeassert => {}
            DeliveryMode::Nmi | DeliveryMode::Smi => return 1,
        }
        delivered = true;
    }
    u64::from(!delivered && ipi.mode != DeliveryMode::InitDeassert)
}

impl<B: Backend> Domain<B> {
    /// Hand every queued I/O APIC message to the LAPICs it addresses.
    pub(crate) fn route_messages(&mut self) {
        while let Some(m) = self.irq.sink_mut().queue.pop_front() {
            let undelivered = match as_ipi(&m) {
                // No sender: an I/O APIC message has no "self" to exclude.
                Some(ipi) => route_ipi(&mut self.vcpus, &ipi, u32::MAX),
                None => 1,
            };
            self.undelivered_interrupts = self.undelivered_interrupts.saturating_add(undelivered);
        }
    }

    /// What a LAPIC register write of vCPU `vi` asks for: route its IPI, and send an
    /// EOI of a level-triggered vector to the I/O APIC (which may send again a line
    /// still asserted).
    pub(crate) fn lapic_effects(&mut self, vi: usize, effects: &lapic::Effects) {
        if let Some(ipi) = effects.ipi {
            let sender = self.vcpus[vi].lapic.apic_id();
            let undelivered = route_ipi(&mut self.vcpus, &ipi, sender);
            self.undelivered_interrupts = self.undelivered_interrupts.saturating_add(undelivered);
        }
        if let Some(vector) = effects.eoi_vector {
            self.irq.eoi(vector);
            self.route_messages();
        }
    }

    /// The guest time of the next device event (a PIT period, a UART timeout, the RTC's
    /// update), if any.
    pub(crate) fn next_device_event_ns(&self) -> Option<u64> {
        self.devices.next_event_ns()
    }

    /// Let the device models catch up with guest time `now` (their timers raise lines,
    /// the lines' messages reach the LAPICs). `Continue` unless a device asked to end
    /// the domain.
    pub(crate) fn advance_devices(&mut self, now: u64) -> Action {
        if self.devices.next_event_ns().is_none_or(|t| t > now) {
            return Action::Continue;
        }
        let mut dctx = DeviceCtx::new(now, &mut self.irq);
        self.devices.advance(&mut dctx);
        let effects = dctx.effects;
        self.route_messages();
        self.apply_effects(&effects, Action::Continue)
    }

    /// Carry out what the devices asked for: console bytes go to the ring; an exit or
    /// power-off ends the domain as finished; a reset stops it (see `Effect::Reset`).
    /// `next` is what the exit would do otherwise; the first ending wins.
    pub(crate) fn apply_effects(&mut self, effects: &[Effect], mut next: Action) -> Action {
        let id = self.id;
        for e in effects {
            match *e {
                Effect::Console(byte) => self.console.push(id, byte),
                Effect::Exit(code) if next == Action::Continue => next = Action::Finish(u64::from(code)),
                Effect::PowerOff if next == Action::Continue => next = Action::Finish(0),
                Effect::Reset if next == Action::Continue => {
                    next =
                        Action::Crash(alloc::string::String::from("the guest asked for a reset, which is not emulated"))
                }
                Effect::Exit(_) | Effect::PowerOff | Effect::Reset => {}
            }
        }
        next
    }
}

/// The interrupt vCPU `slot` should take next, without taking it: its LAPIC's highest
/// deliverable vector, else the 8259's INTR if LINT0 passes it (virtual wire mode,
/// MP spec 3.6.2.2) — `Pic` is answered by an INTA cycle when injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// A vector from the LAPIC's IRR.
    Lapic(u8),
    /// The 8259 pair asserts INTR and this vCPU's LINT0 takes it.
    Pic,
}

/// See [`Pending`].
pub(crate) fn pending<V>(slot: &VcpuSlot<V>, irq: &Router) -> Option<Pending> {
    if let Some(v) = slot.lapic.pending_interrupt() {
        return Some(Pending::Lapic(v));
    }
    (slot.lapic.accepts_pic_interrupt() && irq.pic_intr_pending()).then_some(Pending::Pic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLines;

    fn message(target: IoApicDestination, mode: IoApicMode) -> Message {
        Message { target, vector: 0x30, mode, level_triggered: false }
    }

    #[test]
    fn io_apic_messages_become_ipis_with_eight_bit_destinations() {
        let ipi = as_ipi(&message(IoApicDestination::Physical(3), IoApicMode::Fixed)).unwrap();
        assert_eq!(ipi.destination, lapic::Destination::Physical(3));
        assert_eq!((ipi.mode, ipi.vector, ipi.x2apic), (DeliveryMode::Fixed, 0x30, false));
        let ipi = as_ipi(&message(IoApicDestination::Logical(0xff), IoApicMode::LowestPriority)).unwrap();
        assert_eq!(ipi.destination, lapic::Destination::Logical(0xff));
        assert_eq!(ipi.mode, DeliveryMode::LowestPriority);
        assert_eq!(as_ipi(&message(IoApicDestination::Physical(0), IoApicMode::ExtInt)), None);
    }

    #[test]
    fn the_8259_pair_starts_as_a_bios_leaves_it() {
        let mut r = new_router();
        let mut imr = [0u8];
        assert!(r.port_read(0x21, &mut imr));
        assert_eq!(imr[0], 0xfb);
        assert!(r.port_read(0xa1, &mut imr));
        assert_eq!(imr[0], 0xff);
        r.set_level(4, true);
        assert!(!r.pic_intr_pending(), "IR4 is masked");
        assert!(r.port_write(0x21, &[0xeb]));
        assert!(r.pic_intr_pending());
        assert_eq!(r.pic_acknowledge(), 0x0c, "the BIOS's base 0x08 + IR4");
    }

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let mut m = Messages::default();
        for _ in 0..QUEUE + 3 {
            m.deliver(IoApicDestination::Physical(0), 0x40, IoApicMode::Fixed, false);
        }
        assert_eq!((m.queue.len(), m.dropped), (QUEUE, 3));
    }

    #[test]
    fn an_unmasked_io_apic_pin_queues_a_message() {
        let mut r = new_router();
        // Redirection entry for pin 4 (IOREDTBL at index 0x10 + 2 * pin): vector 0x24,
        // fixed, physical destination 0, unmasked.
        r.mmio_write(crate::devices::ioapic::IOAPIC_BASE, &(0x10u32 + 8).to_le_bytes());
        r.mmio_write(crate::devices::ioapic::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
        r.set_level(4, true);
        let m = r.sink_mut().queue.pop_front().expect("a message for pin 4");
        assert_eq!((m.target, m.vector, m.mode), (IoApicDestination::Physical(0), 0x24, IoApicMode::Fixed));
    }

    #[test]
    fn an_io_apic_message_with_an_illegal_vector_sets_the_targets_esr() {
        // The hostile `bad-vectors` guest: a pin routed to vector 5 must reach the LAPIC
        // it names, which refuses it and flags "receive illegal vector" (SDM Vol. 3A
        // 11.5.3); nothing becomes pending. Before the fix the I/O APIC dropped the
        // message itself and the guest's ESR stayed 0.
        let mut vcpus = alloc::vec![VcpuSlot::new((), crate::arch::GuestRegs::default(), 0)];
        let base = vcpus[0].lapic.read_apic_base();
        vcpus[0].lapic.write_apic_base(base | (1 << 10) | (1 << 11)).expect("xAPIC to x2APIC is legal");
        vcpus[0].lapic.write_msr(0x80f, 0x1ff, 0).expect("SVR");
        let mut r = new_router();
        r.mmio_write(crate::devices::ioapic::IOAPIC_BASE, &(0x10u32 + 2 * 4).to_le_bytes());
        r.mmio_write(crate::devices::ioapic::IOAPIC_BASE + 0x10, &0x05u32.to_le_bytes());
        r.set_level(4, true);
        let m = r.sink_mut().queue.pop_front().expect("the message goes out");
        let undelivered = route_ipi(&mut vcpus, &as_ipi(&m).expect("fixed"), u32::MAX);
        assert_eq!(undelivered, 0, "it reached vCPU 0's LAPIC");
        assert_eq!(vcpus[0].lapic.pending_interrupt(), None);
        vcpus[0].lapic.write_msr(0x828, 0, 0).expect("ESR write latches the errors");
        assert_eq!(vcpus[0].lapic.read_msr(0x828, 0).expect("ESR") & (1 << 6), 1 << 6);
        assert_eq!(r.ioapic().stats().bad_vectors, 1);
    }
}
