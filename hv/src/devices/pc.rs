//! The PC a domain gets: which device model answers which ports and addresses. One
//! place, so the firmware tables, the exit path and the tests agree.
//!
//! | ports | device | line |
//! |---|---|---|
//! | 0x3F8–0x3FF | 16550A UART (COM1): transmit to the console ring | GSI 4 |
//! | 0xF4 | isa-debug-exit: a write of v ends the domain with code (v << 1) \| 1 | — |
//!
//! Everything else reads as all ones and drops writes, counted per port (and per MMIO
//! page) in the domain's stats. Interrupt lines are driven but not yet delivered to
//! vCPUs: interrupt injection comes with the interrupt controllers' wiring.

use alloc::boxed::Box;

use super::bus::{BusError, DeviceBus};
use super::debug_exit::DebugExit;
use super::serial::{COM1_GSI, COM1_PORT, PORTS, Uart};

/// isa-debug-exit's port (QEMU's default `iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The bus of a new domain's PC.
pub fn bus() -> Result<DeviceBus, BusError> {
    let mut bus = DeviceBus::new();
    let uart = bus.add(Box::new(Uart::new(COM1_GSI)));
    bus.map_ports(uart, COM1_PORT, PORTS)?;
    let exit = bus.add(Box::new(DebugExit::new()));
    bus.map_ports(exit, DEBUG_EXIT_PORT, 1)?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::super::bus::Space;
    use super::super::{DeviceCtx, Effect, NoIrqs};
    use super::*;

    #[test]
    fn the_pc_answers_com1_and_debug_exit_and_nothing_else() {
        let mut bus = bus().unwrap();
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
    }
}
