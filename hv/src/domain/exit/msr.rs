//! The MSRs a guest may touch, in one place: everything else is #GP, as for an MSR
//! the CPU does not implement.
//!
//! | MSR | read | write | why |
//! |---|---|---|---|
//! | IA32_TSC (0x10) | host TSC | #GP | guests time themselves; no offsetting yet |
//! | IA32_APIC_BASE (0x1B) | the vCPU's LAPIC | the LAPIC's legal transitions (xAPIC ↔ x2APIC, disable), else #GP | `devices::lapic` |
//! | x2APIC registers (0x800–0x8FF), IA32_TSC_DEADLINE (0x6E0) | the vCPU's LAPIC | the LAPIC (IPIs routed to the domain's vCPUs) | `devices::lapic` |
//! | IA32_MISC_ENABLE (0x1A0) | 1 (fast strings) | #GP | read by early boot code |
//! | IA32_PAT (0x277) | power-on default | #GP | the guest's memory types are the defaults |
//! | IA32_EFER (0xC0000080) | LME, LMA | #GP | the guest is in long mode; SVME is hidden |
//!
//! No other write is allowed yet: accepting a write the hypervisor does not apply would
//! silently lie to the guest.

use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};
use crate::devices::lapic::Effects;

/// IA32_APIC_BASE.
const APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
const TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC register MSRs (SDM Vol. 3A 11.12.1, Table 11-6).
const X2APIC: core::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// RDMSR of ECX: the local APIC's MSRs from the vCPU's LAPIC, the rest from the
/// allow-list; anything else, or an access the LAPIC refuses, is #GP(0).
pub fn handle_read<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let now = ctx.d.guest_now_ns();
    let slot = ctx.slot();
    let msr = slot.regs.rcx as u32;
    let value = match msr {
        APIC_BASE => Some(slot.lapic.read_apic_base()),
        TSC_DEADLINE => Some(slot.lapic.read_tsc_deadline()),
        m if X2APIC.contains(&m) => slot.lapic.read_msr(m, now).ok(),
        m => read(m, slot.index),
    };
    match value {
        Some(v) => {
            slot.regs.rax = v & 0xffff_ffff;
            slot.regs.rdx = v >> 32;
            ctx.skip(exit)
        }
        None => ctx.inject(13, Some(0)),
    }
}

/// WRMSR of EDX:EAX to ECX: only the local APIC's MSRs are writable (IPIs they send
/// are routed to the domain's other vCPUs); anything else is #GP(0), as for an unknown
/// MSR on hardware.
pub fn handle_write<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let now = ctx.d.guest_now_ns();
    let slot = ctx.slot();
    let msr = slot.regs.rcx as u32;
    let value = (slot.regs.rdx << 32) | (slot.regs.rax & 0xffff_ffff);
    let effects = match msr {
        APIC_BASE => slot.lapic.write_apic_base(value).map(|()| Effects::default()).ok(),
        TSC_DEADLINE => {
            slot.lapic.write_tsc_deadline(value);
            Some(Effects::default())
        }
        m if X2APIC.contains(&m) => slot.lapic.write_msr(m, value, now).ok(),
        _ => None,
    };
    match effects {
        Some(e) => {
            if let Some(ipi) = e.ipi {
                ctx.route_ipi(&ipi);
            }
            ctx.skip(exit)
        }
        None => ctx.inject(13, Some(0)),
    }
}

/// The value a guest reads from `msr` on vCPU `vcpu`, or `None` (#GP).
pub fn read(msr: u32, _vcpu: u32) -> Option<u64> {
    match msr {
        0x10 => {
            // SAFETY: RDTSC only reads the time-stamp counter.
            Some(unsafe { x86::time::rdtsc() })
        }
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
        assert_eq!(read(0x1b, 0), None, "the LAPIC answers IA32_APIC_BASE (handle_read)");
        assert_eq!(read(0xc000_0080, 0), Some(0x500), "EFER.SVME must not show");
        assert_eq!(read(0x3a, 0), None, "IA32_FEATURE_CONTROL: the guest must not see VMX");
        assert_eq!(read(0xc001_0114, 0), None, "VM_CR");
        assert_eq!(read(0xdead_beef, 0), None);
    }
}
