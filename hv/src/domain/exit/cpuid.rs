//! CPUID: answered from the domain's verified `levelling` policy table, never from the
//! host. Leaves the policy does not cover read as zeros (the table's rule).

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};

/// Answer the CPUID in RAX/RCX and continue after it.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let slot = &mut ctx.d.vcpus[ctx.vi];
    let (leaf, sub) = (slot.regs.rax as u32, slot.regs.rcx as u32);
    let r = ctx.d.cpuid.lookup_vcpu(leaf, sub, &super::super::vcpu_state(slot.index));
    slot.regs.rax = r[0].into();
    slot.regs.rbx = r[1].into();
    slot.regs.rcx = r[2].into();
    slot.regs.rdx = r[3].into();
    ctx.skip(exit)
}
