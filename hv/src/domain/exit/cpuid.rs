//! CPUID: answered from the domain's verified `levelling` policy table, never from the
//! host. Leaves the policy does not cover read as zeros (the table's rule). The
//! dynamic bits follow the vCPU: OSXSAVE and OSPKE its CR4, the XSAVE sizes of leaf
//! 0xD its XCR0, the APIC bit its IA32_APIC_BASE.EN, the APIC IDs its index.
//!
//! The hypervisor range: leaf 0x4000_0000 names this hypervisor (EBX:ECX:EDX =
//! "HvRustUnikrn", EAX = 0x4000_0000). Its one paravirtual interface is KVM's clock
//! (`devices::kvmclock`): KVM's signature and feature leaves at 0x4000_0100/0x4000_0101,
//! where Linux's scan for KVM finds them, offering only the clock. They are there only
//! where the hypervisor knows its TSC rate (always, once booted; not in host tests
//! without a calibrated clock), since the clock's scale comes from it. Every other
//! hypervisor leaf is zeros.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};

/// The hypervisor range (by convention: Intel and AMD reserve 0x4000_0000-0x4FFF_FFFF
/// for software, SDM Vol. 2A CPUID, APM Vol. 3 E.1).
const HYPERVISOR_LEAVES: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4fff_ffff;

/// The vendor signature of leaf 0x4000_0000, as EBX, ECX, EDX.
pub const SIGNATURE: &[u8; 12] = b"HvRustUnikrn";

/// The answer for a hypervisor-range leaf; `pv_clock`: KVM's clock leaves are offered.
pub fn hypervisor_leaf(leaf: u32, pv_clock: bool) -> [u32; 4] {
    let word = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
    match leaf {
        0x4000_0000 => [0x4000_0000, word(0), word(4), word(8)],
        l => pv_clock.then(|| crate::devices::kvmclock::cpuid(l)).flatten().unwrap_or([0; 4]),
    }
}

/// Whether guests get KVM's clock: only with a known TSC rate to scale it by.
pub fn pv_clock_offered() -> bool {
    crate::drivers::time::tsc_hz().is_some()
}

/// Answer the CPUID in RAX/RCX and continue after it.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let slot = &mut ctx.d.vcpus[ctx.vi];
    let (leaf, sub) = (slot.regs.rax as u32, slot.regs.rcx as u32);
    let r = if HYPERVISOR_LEAVES.contains(&leaf) {
        hypervisor_leaf(leaf, pv_clock_offered())
    } else {
        let state = match super::super::vcpu_state_of(slot) {
            Ok(s) => s,
            Err(e) => {
                return Action::Crash(alloc::format!("CPUID at RIP {:#x}: reading the vCPU's CR4: {e}", exit.rip));
            }
        };
        ctx.d.cpuid.lookup_vcpu(leaf, sub, &state)
    };
    let slot = &mut ctx.d.vcpus[ctx.vi];
    slot.regs.rax = r[0].into();
    slot.regs.rbx = r[1].into();
    slot.regs.rcx = r[2].into();
    slot.regs.rdx = r[3].into();
    ctx.skip(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvms_clock_leaves_are_there_only_when_offered() {
        assert_eq!(hypervisor_leaf(0x4000_0000, true)[0], 0x4000_0000);
        assert_eq!(hypervisor_leaf(0x4000_0000, false), hypervisor_leaf(0x4000_0000, true));
        assert_eq!(hypervisor_leaf(0x4000_0100, true)[0], 0x4000_0101);
        assert_eq!(hypervisor_leaf(0x4000_0101, true)[0], crate::devices::kvmclock::FEATURES);
        assert_eq!(hypervisor_leaf(0x4000_0100, false), [0; 4]);
        assert_eq!(hypervisor_leaf(0x4000_0101, false), [0; 4]);
        assert_eq!(hypervisor_leaf(0x4000_0001, true), [0; 4]);
    }
}
