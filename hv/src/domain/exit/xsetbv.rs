//! XSETBV: the guest sets XCR0. Accepted only within the domain's CPUID policy
//! (CPUID.(EAX=0Dh,ECX=0):EDX:EAX of its `levelling::CpuidTable`, intersected with
//! the components the backend switches, `arch::fpu::SWITCHED`) and the rules of SDM
//! Vol. 1 13.3; otherwise #GP(0), as the processor would. With CR4.OSXSAVE clear the
//! instruction is #UD (SDM Vol. 2C XSETBV; the processor checks that before the exit,
//! and so does this handler), and at CPL > 0 it is #GP(0).
//!
//! The accepted value is the vCPU's XCR0 from its next entry on (`arch::fpu`).

use super::{Action, ExitCtx};
use crate::arch::fpu;
use crate::arch::{Backend, Exit, Vcpu};

/// CR4.OSXSAVE.
const CR4_OSXSAVE: u64 = 1 << 18;

/// Emulate the XSETBV at `exit`.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let policy = ctx.d.cpuid.lookup(0xd, 0);
    let offered = u64::from(policy[0]) | (u64::from(policy[3]) << 32);
    let slot = ctx.slot();
    let control = match slot.vcpu.control_state() {
        Ok(c) => c,
        Err(e) => return Action::Crash(alloc::format!("XSETBV at RIP {:#x}: reading CR4: {e}", exit.rip)),
    };
    if control.cr4 & CR4_OSXSAVE == 0 {
        return ctx.inject(6, None);
    }
    if control.cpl != 0 {
        return ctx.inject(13, Some(0));
    }
    let index = slot.regs.rcx as u32;
    let value = (slot.regs.rdx << 32) | (slot.regs.rax & 0xffff_ffff);
    let allowed = offered & slot.vcpu.fpu().host().xcr0;
    match fpu::check_xsetbv(index, value, allowed) {
        Ok(()) => {
            slot.vcpu.fpu_mut().set_xcr0(value);
            ctx.skip(exit)
        }
        Err(_) => ctx.inject(13, Some(0)),
    }
}
