//! The MSRs a guest may touch, in one place: everything else is #GP, as for an MSR
//! the CPU does not implement.
//!
//! | MSR | read | write | why |
//! |---|---|---|---|
//! | IA32_TSC (0x10) | host TSC | #GP | guests time themselves; no offsetting yet |
//! | IA32_APIC_BASE (0x1B) | 0xFEE00000, enabled, BSP bit on vCPU 0 | #GP | kernels read it to find the APIC |
//! | IA32_MISC_ENABLE (0x1A0) | 1 (fast strings) | #GP | read by early boot code |
//! | IA32_PAT (0x277) | power-on default | #GP | the guest's memory types are the defaults |
//! | IA32_EFER (0xC0000080) | LME, LMA | #GP | the guest is in long mode; SVME is hidden |
//!
//! No write is allowed yet: accepting a write the hypervisor does not apply would
//! silently lie to the guest.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};

/// RDMSR of ECX: EDX:EAX from the allow-list, else #GP(0).
pub fn handle_read<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let slot = ctx.slot();
    match read(slot.regs.rcx as u32, slot.index) {
        Some(v) => {
            slot.regs.rax = v & 0xffff_ffff;
            slot.regs.rdx = v >> 32;
            ctx.skip(exit)
        }
        None => ctx.inject(13, Some(0)),
    }
}

/// WRMSR: no MSR is writable yet, so #GP(0), as for an unknown MSR on hardware.
pub fn handle_write<B: Backend>(ctx: &mut ExitCtx<'_, B>) -> Action {
    ctx.inject(13, Some(0))
}

/// The value a guest reads from `msr` on vCPU `vcpu`, or `None` (#GP).
pub fn read(msr: u32, vcpu: u32) -> Option<u64> {
    match msr {
        0x10 => {
            // SAFETY: RDTSC only reads the time-stamp counter.
            Some(unsafe { x86::time::rdtsc() })
        }
        0x1b => Some(0xfee0_0000 | (1 << 11) | if vcpu == 0 { 1 << 8 } else { 0 }),
        0x1a0 => Some(1),
        0x277 => Some(0x0007_0406_0007_0406),
        0xc000_0080 => Some((1 << 8) | (1 << 10)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        assert_eq!(read(0x1b, 0), Some(0xfee0_0900));
        assert_eq!(read(0x1b, 1), Some(0xfee0_0800));
        assert_eq!(read(0xc000_0080, 0), Some(0x500), "EFER.SVME must not show");
        assert_eq!(read(0x3a, 0), None, "IA32_FEATURE_CONTROL: the guest must not see VMX");
        assert_eq!(read(0xc001_0114, 0), None, "VM_CR");
        assert_eq!(read(0xdead_beef, 0), None);
    }
}
