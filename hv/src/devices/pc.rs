//! The PC a domain gets: which device model answers which ports and addresses. One
//! place, so the firmware tables, the exit path and the tests agree.
//!
//! | ports | device | line |
//! |---|---|---|
//! | 0x3F8–0x3FF | 16550A UART (COM1): transmit to the console ring | GSI 4 |
//! | 0xF4 | isa-debug-exit: a write of v ends the domain with code (v << 1) \| 1 | — |
//! | 0x40–0x43, 0x61 | 8254 PIT (channels 0–2) and port 0x61 (speaker gate, channel 2 out) | GSI 2 (ISA IRQ 0) |
//! | 0x70–0x71 | CMOS RTC with the real date, and CMOS RAM | GSI 8 |
//! | 0x600–0x60C | ACPI PM1a event/control, PM timer (32-bit, 3.579545 MHz), reset register | GSI 9 (SCI) |
//! | 0x64, 0xCF9 | 8042 pulse-reset and the reset control register | — |
//!
//! The 8259 pair (0x20–0x21, 0xA0–0xA1, ELCR 0x4D0–0x4D1) and the I/O APIC
//! (0xFEC00000) are not on this bus: the domain's interrupt router owns them, because
//! every device access drives its lines (`devices::irq`, `domain::platform`).
//!
//! Everything else reads as all ones and drops writes, counted per port (and per MMIO
//! page) in the domain's stats.

use alloc::boxed::Box;

use super::bus::{BusError, DeviceBus};
use super::debug_exit::DebugExit;
use super::pit::{PIT_PORT_BASE, PORT61_OFFSET, Pit};
use super::pm::{AcpiPm, OFFSET_8042, OFFSET_CF9, PM1A_EVT_BLK};
use super::rtc::Rtc;
use super::serial::{COM1_GSI, COM1_PORT, PORTS, Uart};

/// isa-debug-exit's port (QEMU's default `iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The bus of a new domain's PC, whose RTC reads `unix_time` (UTC) at guest time 0.
pub fn bus(unix_time: i64) -> Result<DeviceBus, BusError> {
    let mut bus = DeviceBus::new();
    let uart = bus.add(Box::new(Uart::new(COM1_GSI)));
    bus.map_ports(uart, COM1_PORT, PORTS)?;
    let exit = bus.add(Box::new(DebugExit::new()));
    bus.map_ports(exit, DEBUG_EXIT_PORT, 1)?;
    let pit = bus.add(Box::new(Pit::new()));
    bus.map_ports(pit, PIT_PORT_BASE, 4)?;
    bus.map_ports_at(pit, 0x61, 1, PORT61_OFFSET)?;
    let rtc = bus.add(Box::new(Rtc::new(unix_time)));
    bus.map_ports(rtc, 0x70, 2)?;
    let pm = bus.add(Box::new(AcpiPm::new()));
    bus.map_ports(pm, PM1A_EVT_BLK, 0x10)?;
    bus.map_ports_at(pm, 0x64, 1, OFFSET_8042)?;
    bus.map_ports_at(pm, 0xcf9, 1, OFFSET_CF9)?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::super::bus::Space;
    use super::super::{DeviceCtx, Effect, NoIrqs};
    use super::*;

    #[test]
    fn console_input_reaches_the_uart_without_overrun_and_raises_its_line() {
        let mut bus = bus(0).unwrap();
        #[derive(Default)]
        struct Lines(Option<bool>);
        impl crate::devices::IrqLines for Lines {
            fn set_level(&mut self, gsi: u32, high: bool) {
                if gsi == COM1_GSI {
                    self.0 = Some(high);
                }
            }
        }
        let mut irq = Lines::default();
        let mut ctx = DeviceCtx::new(0, &mut irq);
        // Character mode (FIFOs off): the holding register takes one byte.
        assert_eq!(bus.console_input(b"hi", &mut ctx), Some(1));
        assert_eq!(bus.console_input(b"i", &mut ctx), Some(0), "full: nothing taken, no overrun");
        let mut b = [0u8];
        assert!(bus.read(Space::Port, u64::from(COM1_PORT) + 5, &mut b, &mut ctx));
        assert_eq!(b[0] & 0x03, 0x01, "LSR: data ready, no overrun error");
        assert!(bus.read(Space::Port, u64::from(COM1_PORT), &mut b, &mut ctx));
        assert_eq!(b[0], b'h');
        // FIFOs on, the RX interrupt enabled and OUT2 (the PC's interrupt gate) set:
        // 16 bytes fit, and IRQ 4 goes high.
        assert!(bus.write(Space::Port, u64::from(COM1_PORT) + 4, &[0x08], &mut ctx));
        assert!(bus.write(Space::Port, u64::from(COM1_PORT) + 2, &[0x01], &mut ctx));
        assert!(bus.write(Space::Port, u64::from(COM1_PORT) + 1, &[0x01], &mut ctx));
        assert_eq!(bus.console_input(&[b'x'; 40], &mut ctx), Some(16));
        assert!(bus.read(Space::Port, u64::from(COM1_PORT), &mut b, &mut ctx));
        assert_eq!(b[0], b'x');
        drop(ctx);
        assert_eq!(irq.0, Some(true), "the receiver's interrupt line is raised");
    }

    #[test]
    fn the_pc_answers_com1_and_debug_exit_and_nothing_else() {
        let mut bus = bus(1_764_547_200).unwrap(); // 2025-12-01 00:00:00 UTC
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        assert!(bus.write(Space::Port, u64::from(COM1_PORT), b"A", &mut ctx));
        let mut lsr = [0u8];
        assert!(bus.read(Space::Port, u64::from(COM1_PORT) + 5, &mut lsr, &mut ctx));
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter empty");
        assert!(bus.write(Space::Port, u64::from(DEBUG_EXIT_PORT), &[3], &mut ctx));
        assert_eq!(ctx.effects.as_slice(), [Effect::Console(b'A'), Effect::Exit(7)]);
        let mut d = [0u8; 2];
        assert!(!bus.read(Space::Port, 0x2f8, &mut d, &mut ctx));
        assert_eq!(d, [0xff, 0xff]);
        // The RTC reads the date it was given (register B's default is BCD).
        let mut b = [0u8];
        for (index, want) in [(9u8, 0x25u8), (8, 0x12), (7, 0x01), (0x32, 0x20)] {
            assert!(bus.write(Space::Port, 0x70, &[index], &mut ctx));
            assert!(bus.read(Space::Port, 0x71, &mut b, &mut ctx));
            assert_eq!(b[0], want, "CMOS register {index:#x}");
        }
        // Port 0x61 and the PM timer answer; S5 through PM1a_CNT powers off.
        assert!(bus.read(Space::Port, 0x61, &mut b, &mut ctx));
        let mut t = [0u8; 4];
        assert!(bus.read(Space::Port, 0x608, &mut t, &mut ctx));
        ctx.effects.clear();
        assert!(bus.write(Space::Port, 0x604, &((5u16 << 10) | (1 << 13)).to_le_bytes(), &mut ctx));
        assert_eq!(ctx.effects.as_slice(), [Effect::PowerOff]);
    }
}
