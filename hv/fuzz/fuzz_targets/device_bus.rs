//! The guest's side of the PC, fuzzed: random sequences of port reads and writes (the
//! device bus of `devices::pc` and the 8259 pair), I/O APIC MMIO, local APIC MMIO and
//! x2APIC MSR accesses, time steps, console input from the control channel and
//! save/load round trips. Every model must answer without panicking, a due event must
//! be gone after `advance` (no spinning), a saved state must load back, and console
//! input never takes more than the UART's FIFO holds.
#![no_main]

use hv::devices::bus::Space;
use hv::devices::irq::{DeliveryMode, Destination, InterruptSink, IrqRouter};
use hv::devices::lapic::Lapic;
use hv::devices::{DeviceCtx, IrqLines};
use libfuzzer_sys::fuzz_target;

/// Counts what the I/O APIC and PIC deliver.
#[derive(Default)]
struct Sink {
    messages: u64,
}

impl InterruptSink for Sink {
    fn deliver(&mut self, _: Destination, _: u8, _: DeliveryMode, _: bool) {
        self.messages += 1;
    }
    fn ext_int_pending(&mut self) {}
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) | u16::from(self.byte()?) << 8)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | u32::from(self.u16()?) << 16)
    }
}

const SIZES: [usize; 4] = [1, 2, 4, 8];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Ok(mut bus) = hv::devices::pc::bus(1_764_547_200) else { panic!("the PC's table maps") };
    let mut router = IrqRouter::new(Sink::default());
    let mut lapic = Lapic::new(0, true, 2_000_000_000);
    let mut now: u64 = 0;
    while let Some(op) = input.byte() {
        let size = SIZES[usize::from(op >> 6)];
        let mut buf = [0u8; 8];
        match op % 8 {
            0 | 1 => {
                let Some(port) = input.u16() else { break };
                let write = op % 8 == 1;
                if write {
                    let Some(v) = input.u32() else { break };
                    buf[..4].copy_from_slice(&v.to_le_bytes());
                    if !router.port_write(port, &buf[..size]) {
                        let mut ctx = DeviceCtx::new(now, &mut router);
                        bus.write(Space::Port, u64::from(port), &buf[..size], &mut ctx);
                    }
                } else if !router.port_read(port, &mut buf[..size]) {
                    let mut ctx = DeviceCtx::new(now, &mut router);
                    bus.read(Space::Port, u64::from(port), &mut buf[..size], &mut ctx);
                }
            }
            2 | 3 => {
                let Some(offset) = input.u16() else { break };
                let gpa = 0xfec0_0000 + u64::from(offset & 0xfff);
                if op % 8 == 3 {
                    let Some(v) = input.u32() else { break };
                    buf[..4].copy_from_slice(&v.to_le_bytes());
                    router.mmio_write(gpa, &buf[..size]);
                } else {
                    router.mmio_read(gpa, &mut buf[..size]);
                }
            }
            4 => {
                let (Some(offset), Some(v)) = (input.u16(), input.u32()) else { break };
                buf[..4].copy_from_slice(&v.to_le_bytes());
                if offset & 0x8000 != 0 {
                    let _ = lapic.write_mmio(u64::from(offset & 0xfff), &buf[..size], now);
                } else {
                    lapic.read_mmio(u64::from(offset & 0xfff), &mut buf[..size], now);
                }
            }
            5 => {
                let (Some(msr), Some(lo), Some(hi)) = (input.byte(), input.u32(), input.u32()) else { break };
                let msr = 0x800 | u32::from(msr);
                let value = u64::from(lo) | u64::from(hi) << 32;
                if lo & 1 != 0 {
                    let _ = lapic.write_msr(msr, value, now);
                } else {
                    let _ = lapic.read_msr(msr, now);
                }
                if let Some(v) = lapic.pending_interrupt() {
                    lapic.ack(v);
                }
            }
            6 => {
                let Some(step) = input.u32() else { break };
                now = now.saturating_add(u64::from(step) * 64);
                let mut ctx = DeviceCtx::new(now, &mut router);
                bus.advance(&mut ctx);
                drop(ctx);
                assert!(bus.next_event_ns().is_none_or(|t| t > now), "a device event is still due after advance");
                lapic.advance_to(now);
                assert!(lapic.next_timer_ns().is_none_or(|t| t > now), "the LAPIC timer is still due after advance");
            }
            7 if op & 0x80 != 0 => {
                // Console input (hvctl's keystrokes): never more than the UART's FIFO.
                let Some(n) = input.byte() else { break };
                let n = usize::from(n).min(input.0.len());
                let (bytes, rest) = input.0.split_at(n);
                input.0 = rest;
                let mut ctx = DeviceCtx::new(now, &mut router);
                let taken = bus.console_input(bytes, &mut ctx);
                assert!(taken.is_some_and(|t| t <= n && t <= 16), "the UART took {taken:?} of {n} bytes");
            }
            _ => {
                let states = bus.save();
                assert_eq!(bus.load(&states), Ok(()), "the bus loads what it saved");
                let [ioapic, pic] = router.save();
                assert!(router.load(&ioapic, &pic).is_ok(), "the router loads what it saved");
                let state = lapic.save_at(now);
                assert!(lapic.load_at(&state, now).is_ok(), "the LAPIC loads what it saved");
                router.set_level(u32::from(op >> 3), op & 1 != 0);
            }
        }
    }
});
