//! Invalid-opcode (#UD) exits: the other vendor's hypercall instruction.
//!
//! A guest picks VMCALL or VMMCALL once, at boot (`guest_abi::BootInfo::arch`; Linux's
//! KVM-style guests patch it once too). After a live migration to a host of the other
//! vendor (QEMU's SVM to Bochs' VMX and back) it keeps using the old one, which the new
//! host's processor does not know: VMMCALL is undefined on Intel, and raises #UD in VMX
//! non-root operation without a VM exit (SDM Vol. 2B, VMX instruction reference:
//! VMMCALL is not an Intel instruction; Vol. 3C 26.1.2 lists what exits
//! unconditionally); VMCALL is undefined on AMD and raises #UD without an intercept
//! of its own (APM Vol. 3, VMMCALL; Vol. 2 15.9). Both backends therefore intercept #UD
//! (VMX exception bitmap bit 6, SDM Vol. 3C 25.6.3; SVM exception intercept vector 6,
//! APM Vol. 2 15.12) and this handler reads the faulting instruction: either hypercall
//! encoding (0F 01 C1 VMCALL, 0F 01 D9 VMMCALL) is a hypercall of length 3, as KVM
//! does (it patches the instruction; we emulate it each time, guest memory stays as
//! the guest wrote it). Every other #UD is given back to the guest unchanged.
//!
//! The same exit is where `levelling`'s `syscall-compat-ud` caveat (SYSCALL from
//! compatibility mode on an Intel host of an AMD-presented guest) would be emulated;
//! that is not done yet and such a #UD goes to the guest.

use super::{Action, ExitCtx, hypercall};
use crate::arch::{Backend, Exit, ExitReason, Vcpu};
use crate::mm::walk::{self, PagingRegs};

/// VMCALL (Intel, SDM Vol. 2B).
const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
/// VMMCALL (AMD, APM Vol. 3).
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

const EFER_LMA: u64 = 1 << 10;
/// Canonical segment attribute L (bit 9: descriptor bit 53).
const ATTR_L: u16 = 1 << 9;

/// Which hypercall instruction `bytes` start with, if any.
pub fn hypercall_insn(bytes: &[u8]) -> Option<&'static str> {
    match bytes.get(..3)? {
        b if b == VMCALL => Some("vmcall"),
        b if b == VMMCALL => Some("vmmcall"),
        _ => None,
    }
}

/// Handle a #UD exit: a hypercall by the other vendor's instruction, or the guest's #UD.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let st = match ctx.slot().vcpu.paging_state() {
        Ok(s) => s,
        Err(e) => {
            return Action::Crash(alloc::format!("#UD at RIP {:#x}: cannot read the paging state: {e}", exit.rip));
        }
    };
    let maxphyaddr = super::mmio::guest_maxphyaddr(ctx);
    let paging = PagingRegs { cr0: st.cr0, cr3: st.cr3, cr4: st.cr4, efer: st.efer, maxphyaddr };
    // SDM Vol. 3A 3.4.4 / 5.2.1: in 64-bit mode the CS base is 0; otherwise CS.base + EIP.
    let long = st.efer & EFER_LMA != 0 && st.cs.attributes & ATTR_L != 0;
    let linear = if long { st.rip } else { st.cs.base.wrapping_add(st.rip) & 0xffff_ffff };
    let mut bytes = [0u8; 3];
    let fetched = match ctx.d.mem.as_ref() {
        Some(mem) => {
            let mut phys = crate::mm::guest::Phys { mem, pool: &mut *ctx.pool };
            walk::read_linear(&mut phys, &paging, linear, &mut bytes).is_ok()
        }
        None => false,
    };
    if fetched && hypercall_insn(&bytes).is_some() {
        let call = Exit { reason: ExitReason::Hypercall, rip: exit.rip, instruction_len: 3 };
        return hypercall::handle(ctx, &call);
    }
    // Not ours (or not readable: the guest's own fetch would fault the same way, and
    // its #UD handler decides): deliver the #UD as the processor would have.
    ctx.inject(6, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hypercall_encodings_and_nothing_else() {
        assert_eq!(hypercall_insn(&[0x0f, 0x01, 0xc1, 0x90]), Some("vmcall"));
        assert_eq!(hypercall_insn(&[0x0f, 0x01, 0xd9]), Some("vmmcall"));
        assert_eq!(hypercall_insn(&[0x0f, 0x0b, 0x90]), None); // UD2
        assert_eq!(hypercall_insn(&[0x0f, 0x01, 0xd8]), None); // VMRUN
        assert_eq!(hypercall_insn(&[0x0f, 0x01]), None);
    }
}
