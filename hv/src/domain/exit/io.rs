//! Port I/O: IN/OUT of 1, 2 or 4 bytes go to the domain's device bus (`devices::pc`:
//! COM1, the debug-exit port), whose models answer with data and effects (console
//! bytes, an exit code); a port nothing claims reads as all ones and drops writes,
//! like an unpopulated ISA port, and is counted. String I/O (INS/OUTS) is not emulated
//! and stops the domain.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};
use crate::devices::bus::Space;
use crate::devices::{DeviceCtx, Effect, NoIrqs};

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
    let n = usize::from(size).clamp(1, 4);
    let now = ctx.d.guest_now_ns();
    // Interrupt lines go nowhere until the interrupt controllers are wired to vCPUs.
    let mut lines = NoIrqs;
    let mut dctx = DeviceCtx::new(now, &mut lines);
    let mut data = [0u8; 4];
    let d = &mut *ctx.d;
    if input {
        d.devices.read(Space::Port, u64::from(port), &mut data[..n], &mut dctx);
        let mask = (1u64 << (8 * n)) - 1;
        let value = u64::from(u32::from_le_bytes(data)) & mask;
        let slot = &mut d.vcpus[ctx.vi];
        // IN writes AL, AX or EAX; a 32-bit IN zero-extends into RAX like any 32-bit
        // register write (SDM Vol. 1 3.4.1.1), the narrower ones keep the upper bits.
        slot.regs.rax = if n == 4 { value } else { (slot.regs.rax & !mask) | value };
    } else {
        let value = d.vcpus[ctx.vi].regs.rax as u32;
        d.devices.write(Space::Port, u64::from(port), &value.to_le_bytes()[..n], &mut dctx);
    }
    let effects = dctx.effects;
    let next = ctx.skip(exit);
    apply(ctx, &effects, next)
}

/// Carry out what the devices asked for; an exit or power-off ends the domain.
pub fn apply<B: Backend>(ctx: &mut ExitCtx<'_, B>, effects: &[Effect], mut next: Action) -> Action {
    let id = ctx.d.id;
    for e in effects {
        match *e {
            Effect::Console(byte) => ctx.d.console.push(id, byte),
            Effect::Exit(code) if next == Action::Continue => next = Action::Finish(u64::from(code)),
            Effect::PowerOff if next == Action::Continue => next = Action::Finish(0),
            Effect::Reset if next == Action::Continue => {
                next = Action::Crash(alloc::string::String::from("the guest asked for a reset, which is not emulated"))
            }
            Effect::Exit(_) | Effect::PowerOff | Effect::Reset => {}
        }
    }
    next
}
