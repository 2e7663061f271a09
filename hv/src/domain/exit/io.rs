//! Port I/O: IN/OUT of 1, 2 or 4 bytes go to the 8259 pair and its ELCR (the domain's
//! interrupt router owns them) or else to the domain's device bus (`devices::pc`),
//! whose models answer with data and effects (console bytes, an exit code) and drive
//! their interrupt lines into the router; a port nothing claims reads as all ones and
//! drops writes, like an unpopulated ISA port, and is counted. The messages an access
//! makes due reach the LAPICs before the guest runs again. String I/O (INS/OUTS) is
//! not emulated and stops the domain.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};
use crate::devices::bus::Space;
use crate::devices::{DeviceCtx, Effect};

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
    let d = &mut *ctx.d;
    // Timers due by now fire first, so the guest reads a consistent state.
    let timers = d.advance_devices(now);
    let mut data = [0u8; 4];
    let value = d.vcpus[ctx.vi].regs.rax as u32;
    let mut effects = heapless::Vec::<Effect, { crate::devices::MAX_EFFECTS }>::new();
    let claimed_by_pic =
        if input { d.irq.port_read(port, &mut data[..n]) } else { d.irq.port_write(port, &value.to_le_bytes()[..n]) };
    if !claimed_by_pic {
        let mut dctx = DeviceCtx::new(now, &mut d.irq);
        if input {
            d.devices.read(Space::Port, u64::from(port), &mut data[..n], &mut dctx);
        } else {
            d.devices.write(Space::Port, u64::from(port), &value.to_le_bytes()[..n], &mut dctx);
        }
        effects = dctx.effects;
    }
    d.route_messages();
    if input {
        let mask = (1u64 << (8 * n)) - 1;
        let value = u64::from(u32::from_le_bytes(data)) & mask;
        let slot = &mut d.vcpus[ctx.vi];
        // IN writes AL, AX or EAX; a 32-bit IN zero-extends into RAX like any 32-bit
        // register write (SDM Vol. 1 3.4.1.1), the narrower ones keep the upper bits.
        slot.regs.rax = if n == 4 { value } else { (slot.regs.rax & !mask) | value };
    }
    let next = match timers {
        Action::Continue => ctx.skip(exit),
        ended => ended,
    };
    apply(ctx, &effects, next)
}

/// Carry out what the devices asked for; an exit or power-off ends the domain.
pub fn apply<B: Backend>(ctx: &mut ExitCtx<'_, B>, effects: &[Effect], next: Action) -> Action {
    ctx.d.apply_effects(effects, next)
}
