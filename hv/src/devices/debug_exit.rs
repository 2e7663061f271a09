//! The isa-debug-exit port, in QEMU's convention: a guest (a test kernel, or Linux
//! with a one-line `outb`) ends its domain with an exit code by writing to one port.
//!
//! A write of value `v`, of any size, at any offset of the range it is mapped at
//! ends the domain with code `(v << 1) | 1` (QEMU hw/misc/debugexit.c,
//! `debug_exit_write`), so the code is always odd and cannot be confused with a
//! normal exit 0. Reads return all ones, as QEMU's port does. This model only asks
//! for the exit ([`Effect::Exit`]); ending the domain is the exit handler's job.

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, Effect, StateReader, StateWriter, le_value};

/// Format version of the saved state (which has no fields: the port keeps nothing).
const STATE_VERSION: u16 = 1;

/// The isa-debug-exit port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugExit;

impl DebugExit {
    /// The port.
    pub fn new() -> Self {
        Self
    }
}

/// The exit code a write of `data` asks for: the value, truncated to 32 bits as in
/// QEMU, shifted left by one with bit 0 set.
fn exit_code(data: &[u8]) -> u32 {
    ((le_value(data) as u32) << 1) | 1
}

impl Device for DebugExit {
    fn kind(&self) -> DeviceKind {
        DeviceKind::DebugExit
    }

    fn read(&mut self, _offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx<'_>) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        // An access of no bytes is not a write (the bus never sends one).
        if !data.is_empty() {
            ctx.effect(Effect::Exit(exit_code(data)));
        }
    }

    /// Version 1: no bytes.
    fn save(&self) -> DeviceState {
        StateWriter::new().finish(DeviceKind::DebugExit, STATE_VERSION)
    }

    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        StateReader::new(state, DeviceKind::DebugExit, STATE_VERSION)?.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::NoIrqs;
    use super::*;

    #[test]
    fn writes_of_every_size_ask_for_exit_v_shl_1_or_1() {
        let mut port = DebugExit::new();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        port.write(0, &[0x00], &mut ctx);
        port.write(0, &[0x10], &mut ctx);
        port.write(1, &[0x34, 0x12], &mut ctx);
        port.write(0, &0x7fff_ffffu32.to_le_bytes(), &mut ctx);
        port.write(0, &0xffff_ffffu32.to_le_bytes(), &mut ctx);
        port.write(0, &0x1_0000_0002u64.to_le_bytes(), &mut ctx);
        port.write(0, &[], &mut ctx);
        assert_eq!(
            ctx.effects.as_slice(),
            [
                Effect::Exit(1),
                Effect::Exit(0x21),
                Effect::Exit(0x2469),
                Effect::Exit(0xffff_ffff),
                Effect::Exit(0xffff_ffff),
                Effect::Exit(5),
            ]
        );
    }

    #[test]
    fn reads_are_all_ones() {
        let mut port = DebugExit::new();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        for size in [1usize, 2, 4, 8] {
            let mut d = [0u8; 8];
            port.read(0, &mut d[..size], &mut ctx);
            assert!(d[..size].iter().all(|&b| b == 0xff));
        }
        assert!(ctx.effects.is_empty(), "a read ends nothing");
    }

    #[test]
    fn state_round_trips_and_refuses_others() {
        let mut port = DebugExit::new();
        let s = port.save();
        assert_eq!((s.kind, s.version, s.bytes.len()), (DeviceKind::DebugExit, 1, 0));
        assert_eq!(port.load(&s), Ok(()));
        let long = DeviceState { bytes: alloc::vec![0], ..s.clone() };
        assert_eq!(port.load(&long), Err(DeviceError::Malformed { kind: DeviceKind::DebugExit, why: "too long" }));
        let v2 = DeviceState { version: 2, ..s.clone() };
        assert!(matches!(port.load(&v2), Err(DeviceError::UnsupportedVersion { found: 2, .. })));
        let uart = DeviceState { kind: DeviceKind::Uart, ..s };
        assert!(matches!(port.load(&uart), Err(DeviceError::WrongKind { .. })));
    }
}
