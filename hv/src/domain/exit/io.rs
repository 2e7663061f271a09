//! Port I/O. Today: the console UART's transmit register at 0x3F8 and its line status
//! (transmitter empty); every other port reads as all ones and drops writes, like an
//! unpopulated ISA port. String I/O (INS/OUTS) is not emulated and stops the domain.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};

/// Handle IN/OUT of `size` bytes at `port`.
pub fn handle<B: Backend>(
    ctx: &mut ExitCtx<'_, B>,
    exit: &Exit,
    port: u16,
    size: u8,
    input: bool,
    string: bool,
) -> Action {
    if string {
        return Action::Crash(alloc::format!("string I/O (INS/OUTS) on port {port:#x} is not emulated"));
    }
    let uart = guest_abi::UART_PORT;
    let mask = if size >= 8 { u64::MAX } else { (1u64 << (8 * u32::from(size))) - 1 };
    if input {
        // UART line status (port+5): transmitter empty.
        let value: u64 = if port == uart + 5 { 0x60 } else { mask };
        let slot = ctx.slot();
        slot.regs.rax = (slot.regs.rax & !mask) | (value & mask);
    } else if port == uart {
        let byte = ctx.slot().regs.rax as u8;
        let next = ctx.skip(exit);
        let id = ctx.d.id;
        ctx.d.console.push(id, byte);
        return next;
    }
    ctx.skip(exit)
}
