//! Host tests of the exit policy: synthetic exits fed to [`handle`] over a domain
//! whose vCPU is a fake that records what the policy asked of it (skip the
//! instruction, inject an exception), with real guest memory from a test frame pool
//! and a CPUID policy from a recorded CPU.

use alloc::vec::Vec;

use super::{Action, ExitCtx, handle};
use crate::arch::{Exit, ExitKind, ExitReason, GuestMsr, GuestRegs, PagingState};
use crate::domain::dirty::Mechanisms;
use crate::domain::{Machine, RunState, VcpuSlot};
use crate::mm::PAGE_SIZE;
use crate::mm::frames::testing::pool;

use crate::domain::testing::{FakeBackend, FakeVcpu};

const MEMORY: u64 = 4 << 20;

/// A machine on a recorded EPYC under QEMU with one 4 MiB domain of one fake vCPU.
fn machine(mechanisms: Mechanisms) -> Machine<FakeBackend> {
    crate::domain::testing::machine(pool(2048), MEMORY, mechanisms)
}

fn exit(reason: ExitReason) -> Exit {
    Exit { reason, rip: 0x20_0000, instruction_len: 3 }
}

/// Run one exit with `regs` loaded first; the action and the registers after.
fn run(m: &mut Machine<FakeBackend>, regs: GuestRegs, reason: ExitReason) -> (Action, GuestRegs) {
    let (d, pool, mechanisms) = m.parts(0);
    d.vcpus[0].regs = regs;
    let mut ctx = ExitCtx { d, vi: 0, pool, mechanisms, others_running: false };
    let action = handle(&mut ctx, &exit(reason));
    (action, m.dom(0).vcpus[0].regs)
}

fn vcpu(m: &mut Machine<FakeBackend>) -> &FakeVcpu {
    &m.dom(0).vcpus[0].vcpu
}

const NO_LOGGING: Mechanisms = Mechanisms { pml: false, dbit: false };

#[test]
fn cpuid_answers_from_the_policy_table_and_skips() {
    let mut m = machine(NO_LOGGING);
    let want = m.dom(0).cpuid.lookup_vcpu(0, 0, &crate::domain::vcpu_state(0));
    let (action, regs) = run(&mut m, GuestRegs { rax: 0, rcx: 0, ..Default::default() }, ExitReason::Cpuid);
    assert_eq!(action, Action::Continue);
    assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], want.map(u64::from));
    assert_eq!(regs.rbx, 0x6874_7541, "vendor AuthenticAMD from the recorded CPU, through the policy");
    assert_eq!(vcpu(&mut m).skipped, 1);
    // The hypervisor range: our own signature, not KVM's, and nothing beyond it.
    let (_, regs) = run(&mut m, GuestRegs { rax: 0x4000_0000, ..Default::default() }, ExitReason::Cpuid);
    let sig: Vec<u8> = [regs.rbx, regs.rcx, regs.rdx].iter().flat_map(|r| (*r as u32).to_le_bytes()).collect();
    assert_eq!((regs.rax, sig.as_slice()), (0x4000_0000, b"HvRustUnikrn".as_slice()));
    let (_, regs) = run(&mut m, GuestRegs { rax: 0x4000_0001, ..Default::default() }, ExitReason::Cpuid);
    assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], [0; 4], "no KVM feature leaf");
    // A leaf no policy covers reads as zeros, never the host's values.
    let (_, regs) = run(&mut m, GuestRegs { rax: 0x7fff_0000, ..Default::default() }, ExitReason::Cpuid);
    assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], [0; 4]);
}

#[test]
fn msrs_outside_the_allow_list_get_gp_and_do_not_retire() {
    let mut m = machine(NO_LOGGING);
    let (action, regs) = run(&mut m, GuestRegs { rcx: 0x1b, ..Default::default() }, ExitReason::MsrRead);
    assert_eq!(action, Action::Continue);
    assert_eq!((regs.rax, regs.rdx), (0xfee0_0900, 0), "APIC base, enabled, BSP");
    assert_eq!(run(&mut m, GuestRegs { rcx: 0x3a, ..Default::default() }, ExitReason::MsrRead).0, Action::Continue);
    assert_eq!(run(&mut m, GuestRegs { rcx: 0x48, ..Default::default() }, ExitReason::MsrWrite).0, Action::Continue);
    assert_eq!(
        vcpu(&mut m).injected,
        [(13, Some(0)), (13, Some(0))],
        "IA32_FEATURE_CONTROL read, SPEC_CTRL write: #GP(0)"
    );
    assert_eq!(vcpu(&mut m).skipped, 1, "only the allowed read retired");
}

fn wrmsr(msr: u32, value: u64) -> GuestRegs {
    GuestRegs { rcx: msr.into(), rax: value & 0xffff_ffff, rdx: value >> 32, ..Default::default() }
}

fn rdmsr(m: &mut Machine<FakeBackend>, msr: u32) -> Option<u64> {
    let injected = vcpu(m).injected.len();
    let (_, regs) = run(m, GuestRegs { rcx: msr.into(), ..Default::default() }, ExitReason::MsrRead);
    (vcpu(m).injected.len() == injected).then_some((regs.rdx << 32) | (regs.rax & 0xffff_ffff))
}

#[test]
fn msrs_are_kept_per_vcpu_where_the_hardware_uses_them() {
    let mut m = machine(NO_LOGGING);
    // Syscall MSRs and bases go to the backend; a non-canonical LSTAR is #GP and changes nothing.
    for (msr, value) in [(0xc000_0082, 0xffff_ffff_8100_0000u64), (0xc000_0102, 0xffff_8880_0000_0000), (0x174, 0x10)] {
        assert_eq!(run(&mut m, wrmsr(msr, value), ExitReason::MsrWrite).0, Action::Continue);
        assert_eq!(rdmsr(&mut m, msr), Some(value), "{msr:#x}");
    }
    run(&mut m, wrmsr(0xc000_0082, 0x8000_0000_0000), ExitReason::MsrWrite);
    assert_eq!(vcpu(&mut m).injected, [(13, Some(0))]);
    assert_eq!(rdmsr(&mut m, 0xc000_0082), Some(0xffff_ffff_8100_0000));
    // EFER: NXE and SCE added, SVME never.
    run(&mut m, wrmsr(0xc000_0080, 0xd01), ExitReason::MsrWrite);
    assert_eq!(rdmsr(&mut m, 0xc000_0080), Some(0xd01));
    assert_eq!(vcpu(&mut m).msrs.iter().find(|(r, _)| *r == GuestMsr::Efer).map(|x| x.1), Some(0xd01));
    // MTRRs (per vCPU, in the core) and MTRRcap; HWCR on this AMD policy.
    assert_eq!(rdmsr(&mut m, 0xfe), Some(0x508));
    assert_eq!(rdmsr(&mut m, 0x2ff), Some(0xc06));
    run(&mut m, wrmsr(0x200, 0x8000_0000), ExitReason::MsrWrite);
    assert_eq!(rdmsr(&mut m, 0x200), Some(0x8000_0000));
    assert_eq!(rdmsr(&mut m, 0xc001_0015), Some(1 << 24));
    assert_eq!(rdmsr(&mut m, 0x179), Some(0), "MCE with no banks");
    assert_eq!(rdmsr(&mut m, 0x17b), None, "no MCG_CTL");
}

#[test]
fn the_guest_tsc_is_the_offset_host_tsc_and_writes_move_it() {
    let mut m = machine(NO_LOGGING);
    let before = crate::drivers::time::now_ticks();
    run(&mut m, wrmsr(0x10, 1 << 40), ExitReason::MsrWrite);
    let offset = vcpu(&mut m).tsc_offset;
    assert!(offset.wrapping_add(before) <= 1 << 40, "the offset makes the guest read the value written");
    let read = rdmsr(&mut m, 0x10).unwrap();
    assert!(read >= 1 << 40 && read - (1 << 40) < 1 << 36, "{read:#x}");
}

#[test]
fn xsetbv_is_limited_to_the_policy_and_the_sdm_rules() {
    let mut m = machine(NO_LOGGING);
    let xsetbv = |value: u64| GuestRegs { rcx: 0, rax: value & 0xffff_ffff, rdx: value >> 32, ..Default::default() };
    // CR4.OSXSAVE clear: #UD.
    assert_eq!(run(&mut m, xsetbv(7), ExitReason::Xsetbv).0, Action::Continue);
    assert_eq!(vcpu(&mut m).injected, [(6, None)]);
    m.dom(0).vcpus[0].vcpu.control.cr4 |= 1 << 18;
    // The recorded EPYC offers x87, SSE and AVX: 7 is taken, AVX-512 and AVX without SSE are #GP.
    assert_eq!(run(&mut m, xsetbv(7), ExitReason::Xsetbv).0, Action::Continue);
    assert_eq!(vcpu(&mut m).fpu.xcr0(), 7);
    for bad in [0xe7, 5, 0, 1 << 9 | 7] {
        run(&mut m, xsetbv(bad), ExitReason::Xsetbv);
    }
    let mut bad_xcr = xsetbv(7);
    bad_xcr.rcx = 1;
    run(&mut m, bad_xcr, ExitReason::Xsetbv);
    assert_eq!(vcpu(&mut m).injected.len(), 6);
    assert!(vcpu(&mut m).injected[1..].iter().all(|e| *e == (13, Some(0))));
    assert_eq!(vcpu(&mut m).fpu.xcr0(), 7, "refused writes change nothing");
    assert_eq!(vcpu(&mut m).skipped, 1);
    // CPL 3: #GP.
    m.dom(0).vcpus[0].vcpu.control.cpl = 3;
    run(&mut m, xsetbv(3), ExitReason::Xsetbv);
    assert_eq!(vcpu(&mut m).fpu.xcr0(), 7);
}

#[test]
fn cpuid_follows_the_vcpus_cr4_and_xcr0() {
    let mut m = machine(NO_LOGGING);
    let cpuid = |m: &mut Machine<FakeBackend>, leaf, sub| {
        let (_, r) = run(m, GuestRegs { rax: leaf, rcx: sub, ..Default::default() }, ExitReason::Cpuid);
        [r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32]
    };
    assert_eq!(cpuid(&mut m, 1, 0)[2] & (1 << 27), 0, "no OSXSAVE before CR4.OSXSAVE");
    assert_eq!(cpuid(&mut m, 0xd, 0)[1], 576, "XSAVE size for XCR0 = x87");
    m.dom(0).vcpus[0].vcpu.control.cr4 |= 1 << 18;
    m.dom(0).vcpus[0].vcpu.fpu.set_xcr0(7);
    assert_ne!(cpuid(&mut m, 1, 0)[2] & (1 << 27), 0, "OSXSAVE mirrors CR4");
    assert_eq!(cpuid(&mut m, 0xd, 0)[1], 832, "XSAVE size with AVX enabled");
}

#[test]
fn port_io_feeds_the_console_and_unclaimed_ports_read_ones() {
    let mut m = machine(NO_LOGGING);
    let out = |port| ExitReason::Io { port, size: 1, input: false, string: false };
    for b in b"hi\n" {
        run(&mut m, GuestRegs { rax: u64::from(*b), ..Default::default() }, out(guest_abi::UART_PORT));
    }
    assert_eq!(m.dom(0).console.since(0).1, b"hi\n");
    let input = |port, size| ExitReason::Io { port, size, input: true, string: false };
    let (_, regs) = run(&mut m, GuestRegs { rax: 0x1234_5678, ..Default::default() }, input(0x80, 1));
    assert_eq!(regs.rax, 0x1234_56ff, "one byte of ones, the rest of RAX kept");
    let (_, regs) = run(&mut m, GuestRegs { rax: 0, ..Default::default() }, input(0x80, 4));
    assert_eq!(regs.rax, 0xffff_ffff);
    let (_, regs) = run(&mut m, GuestRegs::default(), input(guest_abi::UART_PORT + 5, 1));
    assert_eq!(regs.rax, 0x60, "line status: transmitter empty");
    let (action, _) =
        run(&mut m, GuestRegs::default(), ExitReason::Io { port: 0x60, size: 1, input: true, string: true });
    assert!(matches!(action, Action::Crash(ref r) if r.contains("string I/O")), "{action:?}");
}

#[test]
fn hypercalls_report_yield_and_exit() {
    let mut m = machine(NO_LOGGING);
    let report = GuestRegs {
        rax: guest_abi::Hypercall::Report as u64,
        rdi: guest_abi::tag(b"round"),
        rsi: 7,
        ..Default::default()
    };
    let (action, regs) = run(&mut m, report, ExitReason::Hypercall);
    assert_eq!((action, regs.rax), (Action::Continue, guest_abi::HYPERCALL_OK));
    assert_eq!(m.dom(0).report(b"round"), Some(7));
    let y = GuestRegs { rax: guest_abi::Hypercall::Yield as u64, ..Default::default() };
    assert_eq!(run(&mut m, y, ExitReason::Hypercall).0, Action::Yield);
    let bad = GuestRegs { rax: 0xdead, ..Default::default() };
    assert_eq!(run(&mut m, bad, ExitReason::Hypercall).1.rax, guest_abi::HYPERCALL_EINVAL);
    let done = GuestRegs { rax: guest_abi::Hypercall::Exit as u64, rdi: 3, ..Default::default() };
    assert_eq!(run(&mut m, done, ExitReason::Hypercall).0, Action::Finish(3));
    assert_eq!(vcpu(&mut m).skipped, 4, "every hypercall retires before it acts");
}

#[test]
fn log_dirty_hypercalls_and_write_faults_work_through_the_context() {
    let mut m = machine(NO_LOGGING);
    let call = |nr: guest_abi::Hypercall, a, b| GuestRegs { rax: nr as u64, rdi: a, rsi: b, ..Default::default() };
    // Mode 0: the best this CPU has, which without PML or dirty bits is write-protect.
    let (_, regs) = run(&mut m, call(guest_abi::Hypercall::DirtyStart, 0, 0), ExitReason::Hypercall);
    assert_eq!(regs.rax, 3, "write-protect");
    let gpa = 5 * PAGE_SIZE + 8;
    let fault = ExitReason::NestedPageFault { gpa, write: true };
    assert_eq!(run(&mut m, GuestRegs::default(), fault).0, Action::Continue, "a logged write is retried");
    assert!(vcpu(&mut m).flushes >= 2, "arming and the fault flushed the nested TLB");
    let buffer = 0x10_0000;
    let (_, regs) = run(&mut m, call(guest_abi::Hypercall::DirtyPeekClean, buffer, 128), ExitReason::Hypercall);
    assert_eq!(regs.rax, 1, "one dirty page");
    let (mem, pool) = {
        let (d, pool, _) = m.parts(0);
        (d.mem.as_ref().unwrap(), pool)
    };
    assert_eq!(mem.read_u64(pool, buffer).unwrap(), 1 << 5, "bit 5 of the guest's bitmap");
    assert_eq!(
        run(&mut m, call(guest_abi::Hypercall::DirtyStop, 0, 0), ExitReason::Hypercall).1.rax,
        guest_abi::HYPERCALL_OK
    );
    assert!(m.dom(0).logs.iter().all(Option::is_none));
    // With no log running, a nested page fault outside guest memory is MMIO: the
    // instruction at RIP (here paging is off and RIP 0 holds zeros, `add [rax], al`) is
    // decoded, and one that is not emulated stops the domain with its mnemonic.
    let outside = ExitReason::NestedPageFault { gpa: MEMORY + 0x1000, write: false };
    let (action, _) = run(&mut m, GuestRegs::default(), outside);
    assert!(
        matches!(action, Action::Crash(ref r) if r.contains("MMIO read of guest-physical 0x401000")
            && r.contains("Add [00 00] is not emulated")),
        "{action:?}"
    );
    // A fault inside RAM that no log explains stops it too.
    let inside = ExitReason::NestedPageFault { gpa: 0x3000, write: true };
    let (action, _) = run(&mut m, GuestRegs::default(), inside);
    assert!(matches!(action, Action::Crash(ref r) if r.contains("inside its 4 MiB")), "{action:?}");
}

#[test]
fn the_rest_stops_the_domain_or_gets_ud() {
    let mut m = machine(NO_LOGGING);
    assert_eq!(run(&mut m, GuestRegs::default(), ExitReason::VirtualizationInstruction).0, Action::Continue);
    assert_eq!(vcpu(&mut m).injected, [(6, None)]);
    assert_eq!(run(&mut m, GuestRegs::default(), ExitReason::Hlt).0, Action::Halt);
    assert_eq!(run(&mut m, GuestRegs::default(), ExitReason::TimeSliceEnd).0, Action::Yield);
    for (reason, text) in [
        (ExitReason::TripleFault, "triple fault (last RIP 0x200000; CR0 0x0 CR3 0x0 "),
        (ExitReason::Exception { vector: 8 }, "double fault"),
        (ExitReason::Exception { vector: 14 }, "exception 14"),
        (ExitReason::Other { code: 0x7b }, "exit 0x7b"),
    ] {
        let (action, _) = run(&mut m, GuestRegs::default(), reason);
        assert!(matches!(action, Action::Crash(ref r) if r.contains(text)), "{reason}: {action:?}");
    }
}

#[test]
fn x2apic_msrs_reach_the_vcpus_lapic_and_its_timer_interrupt_is_injected_when_the_guest_can_take_it() {
    let mut m = machine(NO_LOGGING);
    let wrmsr =
        |msr: u32, v: u64| GuestRegs { rcx: u64::from(msr), rax: v & 0xffff_ffff, rdx: v >> 32, ..Default::default() };
    let rdmsr = |msr: u32| GuestRegs { rcx: u64::from(msr), ..Default::default() };
    // IA32_APIC_BASE: enabled xAPIC at 0xFEE00000 on the BSP; switch to x2APIC.
    let (_, regs) = run(&mut m, rdmsr(0x1b), ExitReason::MsrRead);
    assert_eq!(regs.rax, 0xfee0_0900);
    assert_eq!(run(&mut m, wrmsr(0x1b, 0xfee0_0d00), ExitReason::MsrWrite).0, Action::Continue);
    let (_, regs) = run(&mut m, rdmsr(0x802), ExitReason::MsrRead);
    assert_eq!(regs.rax, 0, "x2APIC ID of vCPU 0");
    // Software-enable, then a one-shot timer of 1000 ticks at divide-by-1 on vector 0x40.
    for (msr, v) in [(0x80f, 0x1ff), (0x83e, 0xb), (0x832, 0x40), (0x838, 1000)] {
        assert_eq!(run(&mut m, wrmsr(msr, v), ExitReason::MsrWrite).0, Action::Continue, "MSR {msr:#x}");
    }
    assert!(vcpu(&mut m).injected.is_empty(), "every write was legal");
    let d = m.dom(0);
    let slot = &mut d.vcpus[0];
    assert_eq!(slot.lapic.next_timer_ns(), Some(1000), "1000 ticks of the 1 GHz APIC clock from guest time 0");
    // Due, but the guest has IF clear: an interrupt-window exit is asked for instead.
    crate::domain::sched::deliver(slot, &mut d.irq, 1000).unwrap();
    assert!(slot.vcpu.interrupts.is_empty() && slot.vcpu.window_requested);
    // The window opens: injected, moved to in-service, no more window.
    slot.vcpu.interrupts_open = true;
    crate::domain::sched::deliver(slot, &mut d.irq, 1001).unwrap();
    assert_eq!(slot.vcpu.interrupts, [0x40]);
    assert!(!slot.vcpu.window_requested);
    assert_eq!(slot.lapic.pending_interrupt(), None, "in service until EOI");
    // A write to a read-only x2APIC register is #GP.
    assert_eq!(run(&mut m, wrmsr(0x802, 5), ExitReason::MsrWrite).0, Action::Continue);
    assert_eq!(vcpu(&mut m).injected, [(13, Some(0))]);
}

/// OUT of `value` (1 byte) to `port` through the exit path.
fn outb(m: &mut Machine<FakeBackend>, port: u16, value: u8) {
    let regs = GuestRegs { rax: u64::from(value), ..Default::default() };
    let (action, _) = run(m, regs, ExitReason::Io { port, size: 1, input: false, string: false });
    assert_eq!(action, Action::Continue, "OUT {value:#x} to {port:#x}");
}

/// Software-enable the BSP's LAPIC in xAPIC mode (SVR = 0x1ff through x2APIC MSRs is
/// not available in xAPIC mode, so through its register model directly).
fn enable_lapic(m: &mut Machine<FakeBackend>) {
    let slot = &mut m.dom(0).vcpus[0];
    slot.lapic.write_mmio(0xf0, &0x1ffu32.to_le_bytes(), 0);
}

#[test]
fn a_uart_interrupt_reaches_the_vcpu_through_the_io_apic_and_its_eoi_is_broadcast() {
    let mut m = machine(NO_LOGGING);
    enable_lapic(&mut m);
    // I/O APIC pin 4 (COM1): vector 0x24, level-triggered (bit 15) so that the EOI
    // matters, active high, physical destination APIC 0.
    {
        let d = m.dom(0);
        d.irq.mmio_write(crate::devices::ioapic::IOAPIC_BASE, &(0x10u32 + 2 * 4).to_le_bytes());
        d.irq.mmio_write(crate::devices::ioapic::IOAPIC_BASE + 0x10, &(0x24u32 | 1 << 15).to_le_bytes());
    }
    // The UART: OUT2 gates its interrupt onto the line (MCR bit 3), then IER.THRI.
    outb(&mut m, 0x3fc, 0x08);
    outb(&mut m, 0x3f9, 0x02);
    let d = m.dom(0);
    assert_eq!(d.undelivered_interrupts, 0);
    let slot = &mut d.vcpus[0];
    assert_eq!(slot.lapic.pending_interrupt(), Some(0x24), "the transmitter-empty interrupt is in the IRR");
    slot.vcpu.interrupts_open = true;
    crate::domain::sched::deliver(slot, &mut d.irq, 0).unwrap();
    assert_eq!(slot.vcpu.interrupts, [0x24]);
    // Nothing else pending: the 8259 does not also deliver it (LINT0 is ExtINT on
    // the BSP, but the 8259 pair is not initialized and masks everything).
    crate::domain::sched::deliver(slot, &mut d.irq, 0).unwrap();
    assert_eq!(slot.vcpu.interrupts, [0x24]);
    // The line is still high (THRE pending, never read): Remote IRR holds it back
    // until the EOI, whose broadcast makes the I/O APIC send it again.
    assert_eq!(slot.lapic.pending_interrupt(), None);
    let effects = slot.lapic.write_mmio(0xb0, &0u32.to_le_bytes(), 0);
    assert_eq!(effects.eoi_vector, Some(0x24), "a level-triggered vector's EOI is broadcast");
    d.lapic_effects(0, &effects);
    assert_eq!(d.vcpus[0].lapic.pending_interrupt(), Some(0x24), "sent again: the line is still asserted");
}

#[test]
fn a_uart_interrupt_reaches_the_vcpu_through_the_8259_and_lint0() {
    let mut m = machine(NO_LOGGING);
    // ICW1-4 to the master: edge, cascade, vectors 0x20-0x27, 8086 mode; then mask
    // everything but IR4.
    for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xef)] {
        outb(&mut m, port, v);
    }
    outb(&mut m, 0x3fc, 0x08);
    outb(&mut m, 0x3f9, 0x02);
    let d = m.dom(0);
    assert!(d.irq.pic_intr_pending(), "IR4 raises INTR");
    let slot = &mut d.vcpus[0];
    assert_eq!(slot.lapic.pending_interrupt(), None, "the I/O APIC's pin 4 is masked");
    // IF clear: a window is asked for, nothing is acknowledged.
    crate::domain::sched::deliver(slot, &mut d.irq, 0).unwrap();
    assert!(slot.vcpu.window_requested && slot.vcpu.interrupts.is_empty());
    assert!(d.irq.pic_intr_pending());
    slot.vcpu.interrupts_open = true;
    crate::domain::sched::deliver(slot, &mut d.irq, 0).unwrap();
    assert_eq!(slot.vcpu.interrupts, [0x24], "base 0x20 + IR4, from the INTA cycle");
    assert!(!d.irq.pic_intr_pending(), "in service until the guest's EOI");
}

#[test]
fn the_pit_raises_irq0_at_its_period_through_the_scheduler_path() {
    let mut m = machine(NO_LOGGING);
    enable_lapic(&mut m);
    {
        let d = m.dom(0);
        // Pin 2 (the PIT, after the IRQ0 -> GSI2 override): vector 0x30, edge.
        d.irq.mmio_write(crate::devices::ioapic::IOAPIC_BASE, &(0x10u32 + 2 * 2).to_le_bytes());
        d.irq.mmio_write(crate::devices::ioapic::IOAPIC_BASE + 0x10, &0x30u32.to_le_bytes());
    }
    // Channel 0, lobyte/hibyte, mode 2 (rate generator), count 1193 (~1 ms).
    outb(&mut m, 0x43, 0x34);
    outb(&mut m, 0x40, (1193 & 0xff) as u8);
    outb(&mut m, 0x40, (1193 >> 8) as u8);
    let d = m.dom(0);
    let first = d.next_device_event_ns().expect("the PIT has a next tick");
    assert!((900_000..=1_100_000).contains(&first), "first tick after about 1 ms, not {first} ns");
    assert_eq!(d.advance_devices(first - 1), Action::Continue);
    assert_eq!(d.vcpus[0].lapic.pending_interrupt(), None, "not before its time");
    assert_eq!(d.advance_devices(first), Action::Continue);
    assert_eq!(d.vcpus[0].lapic.pending_interrupt(), Some(0x30));
}

/// Where the MMIO tests' code runs (guest RAM, identity-mapped).
const CODE: u64 = 0x10_0000;
const APIC: u64 = 0xfee0_0000;
/// A page nothing on the bus claims (HPET's address on a PC; no HPET here).
const UNCLAIMED: u64 = 0xfed0_0000;

/// Build 4-level identity tables in the domain's memory (0..2 MiB and 3..4 GiB with
/// 2 MiB pages, as the guest loader maps them) and point the fake vCPU at them.
fn long_mode_with_tables(m: &mut Machine<FakeBackend>) {
    let (mem, pool) = {
        let (d, pool, _) = m.parts(0);
        (d.mem.as_ref().unwrap(), pool)
    };
    for (at, v) in [
        (0x1000, 0x2000 | 3),
        (0x2000, 0x3000 | 3),
        (0x2000 + 3 * 8, 0x4000 | 3),
        (0x3000, 0x83),
        (0x4000 + 0x1f6 * 8, 0xfec0_0000 | 0x9b),
        (0x4000 + 0x1f7 * 8, 0xfee0_0000 | 0x9b),
    ] {
        mem.write(pool, at, &u64::to_le_bytes(v)).unwrap();
    }
    m.dom(0).vcpus[0].vcpu.paging = PagingState {
        cr0: 0x8000_0011,
        cr3: 0x1000,
        cr4: 1 << 5,
        efer: (1 << 8) | (1 << 10),
        rip: CODE,
        rsp: 0x8000,
        cpl: 0,
        cs: crate::arch::state::SegmentRegister { selector: 8, attributes: 0xa9b, limit: 0xffff_ffff, base: 0 },
        bases: Default::default(),
    };
}

/// Put `code` at CODE and take the MMIO exit it causes at `gpa`.
fn mmio(m: &mut Machine<FakeBackend>, code: &[u8], regs: GuestRegs, gpa: u64, write: bool) -> (Action, GuestRegs) {
    let (mem, pool) = {
        let (d, pool, _) = m.parts(0);
        (d.mem.as_ref().unwrap(), pool)
    };
    mem.write(pool, CODE, code).unwrap();
    run(m, regs, ExitReason::NestedPageFault { gpa, write })
}

#[test]
fn xapic_registers_through_mmio_exits() {
    let mut m = machine(NO_LOGGING);
    long_mode_with_tables(&mut m);
    let base = GuestRegs { rbx: APIC, rax: u64::MAX, ..Default::default() };
    // mov eax, [rbx+0x30]: the version register, zero-extended into RAX.
    let (action, regs) = mmio(&mut m, &[0x8b, 0x43, 0x30], base, APIC + 0x30, false);
    assert_eq!(action, Action::Continue);
    assert_eq!(regs.rax, u64::from(crate::devices::lapic::VERSION));
    assert_eq!(vcpu(&mut m).skipped_lens, [3], "RIP moves past the 3-byte instruction");
    // movzx ecx, byte [rbx+0x20]: the ID register's low byte (the ID is in 31:24).
    let (_, regs) = mmio(&mut m, &[0x0f, 0xb6, 0x4b, 0x20], GuestRegs { rcx: 5, ..base }, APIC + 0x20, false);
    assert_eq!(regs.rcx, 0);
    // mov dword [rbx+0x80], 0x20: TPR; read back with mov edx, [rbx+0x80].
    let tpr = [0xc7, 0x83, 0x80, 0, 0, 0, 0x20, 0, 0, 0];
    assert_eq!(mmio(&mut m, &tpr, base, APIC + 0x80, true).0, Action::Continue);
    assert_eq!(m.dom(0).vcpus[0].lapic.tpr(), 0x20);
    let (_, regs) = mmio(&mut m, &[0x8b, 0x93, 0x80, 0, 0, 0], base, APIC + 0x80, false);
    assert_eq!(regs.rdx, 0x20);
    assert_eq!(vcpu(&mut m).skipped_lens, [3, 4, 10, 6]);
    assert!(vcpu(&mut m).injected.is_empty());
    // The exits count as MMIO, not as nested page faults.
    m.dom(0).count(&ExitReason::NestedPageFault { gpa: APIC + 0x80, write: false });
    m.dom(0).count(&ExitReason::NestedPageFault { gpa: 0x3000, write: true });
    assert_eq!(m.dom(0).exits.get(&ExitKind::Mmio), Some(&1));
    assert_eq!(m.dom(0).exits.get(&ExitKind::NestedPageFault), Some(&1));
}

#[test]
fn an_xapic_eoi_write_retires_the_in_service_vector() {
    let mut m = machine(NO_LOGGING);
    long_mode_with_tables(&mut m);
    let base = GuestRegs { rbx: APIC, ..Default::default() };
    // Software-enable through the SVR: mov dword [rbx+0xf0], 0x1ff.
    let svr = [0xc7, 0x83, 0xf0, 0, 0, 0, 0xff, 0x01, 0, 0];
    assert_eq!(mmio(&mut m, &svr, base, APIC + 0xf0, true).0, Action::Continue);
    let lapic = &mut m.dom(0).vcpus[0].lapic;
    assert!(lapic.enabled());
    assert!(lapic.accept(0x40, false));
    assert_eq!(lapic.pending_interrupt(), Some(0x40));
    lapic.ack(0x40);
    let isr = |m: &mut Machine<FakeBackend>| {
        let mut b = [0u8; 4];
        m.dom(0).vcpus[0].lapic.read_mmio(0x120, &mut b, 0);
        u32::from_le_bytes(b)
    };
    assert_eq!(isr(&mut m), 1, "vector 0x40 in service (ISR bits 95:64)");
    // mov [rbx+0xb0], eax with EAX = 0: EOI.
    assert_eq!(mmio(&mut m, &[0x89, 0x83, 0xb0, 0, 0, 0], base, APIC + 0xb0, true).0, Action::Continue);
    assert_eq!(isr(&mut m), 0, "the EOI retired it");
}

#[test]
fn unclaimed_mmio_reads_all_ones_and_is_counted() {
    let mut m = machine(NO_LOGGING);
    long_mode_with_tables(&mut m);
    let base = GuestRegs { rbx: UNCLAIMED, rax: 0x1234, ..Default::default() };
    // mov rax, [rbx+8]
    let (action, regs) = mmio(&mut m, &[0x48, 0x8b, 0x43, 0x08], base, UNCLAIMED + 8, false);
    assert_eq!(action, Action::Continue);
    assert_eq!(regs.rax, u64::MAX);
    // mov ax, [rbx]: only AX becomes ones.
    let (_, regs) = mmio(&mut m, &[0x66, 0x8b, 0x03], base, UNCLAIMED, false);
    assert_eq!(regs.rax, 0xffff);
    // mov [rbx], eax: dropped.
    assert_eq!(mmio(&mut m, &[0x89, 0x03], base, UNCLAIMED, true).0, Action::Continue);
    let counted: Vec<_> = m.dom(0).unclaimed().iter().copied().collect();
    assert_eq!(counted.len(), 1);
    assert_eq!((counted[0].addr, counted[0].reads, counted[0].writes), (UNCLAIMED, 2, 1));
    // The I/O APIC page is the interrupt router's, not unclaimed: select the version
    // register (IOREGSEL = 1) with `mov [rbx], eax`, read it back through IOWIN at
    // +0x10 with `mov eax, [rbx+0x10]` (the model reports version 0x20, as QEMU does, and 24 pins: 0x17 << 16).
    let ioapic = GuestRegs { rbx: 0xfec0_0000, rax: 1, ..base };
    assert_eq!(mmio(&mut m, &[0x89, 0x03], ioapic, 0xfec0_0000, true).0, Action::Continue);
    let (_, regs) = mmio(&mut m, &[0x8b, 0x43, 0x10], ioapic, 0xfec0_0010, false);
    assert_eq!(regs.rax, 0x0017_0020);
    assert_eq!(m.dom(0).unclaimed().iter().count(), 1, "the I/O APIC's accesses are not counted as unclaimed");
    // An instruction that does not match the fault stops the domain, and nothing retires.
    let skipped = vcpu(&mut m).skipped;
    let (action, _) = mmio(&mut m, &[0x8b, 0x03], base, APIC, false);
    assert!(matches!(action, Action::Crash(ref r) if r.contains("not on the faulting page")), "{action:?}");
    assert_eq!(vcpu(&mut m).skipped, skipped);
}

/// The machine of [`machine`] with a second vCPU (APIC ID 1) waiting for its start-up
/// IPI, as a Linux domain's application processor is created; vCPU 0 in x2APIC mode.
fn two_vcpus_ap_waiting() -> Machine<FakeBackend> {
    let mut m = machine(NO_LOGGING);
    let d = m.dom(0);
    let mut ap = VcpuSlot::new(FakeVcpu { tsc_offset: 0x1234_5678, ..FakeVcpu::default() }, GuestRegs::default(), 1);
    ap.state = RunState::WaitForSipi;
    d.vcpus.push(ap);
    d.vcpu_count = 2;
    assert_eq!(run(&mut m, wrmsr(0x1b, 0xfee0_0d00), ExitReason::MsrWrite).0, Action::Continue, "x2APIC on");
    m
}

/// vCPU 0 writes `value` to its x2APIC ICR (MSR 0x830).
fn icr(m: &mut Machine<FakeBackend>, value: u64) {
    assert_eq!(run(m, wrmsr(0x830, value), ExitReason::MsrWrite).0, Action::Continue, "ICR {value:#x}");
    assert!(vcpu(m).injected.is_empty(), "ICR {value:#x} is legal");
}

/// What the scheduler does before the AP's next turn.
fn next_turn(m: &mut Machine<FakeBackend>) {
    let d = m.dom(0);
    let signature = d.processor_signature();
    crate::domain::sched::start_on_sipi(&mut d.vcpus[1], signature).unwrap();
}

// x2APIC ICR values (SDM Vol. 3A 11.12.9): destination in 63:32; delivery mode INIT
// (101b) with level assert, and start-up (110b) with the vector.
const INIT_TO_1: u64 = (1 << 32) | 0x4500;
const SIPI_TO_1: u64 = (1 << 32) | 0x4600;

#[test]
fn init_then_sipi_from_the_bsps_icr_starts_the_ap_in_real_mode_at_the_vector() {
    let mut m = two_vcpus_ap_waiting();
    // Linux's INIT, INIT de-assert is not in x2APIC mode; then SIPI, SIPI (vector 0x9a).
    icr(&mut m, INIT_TO_1);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::WaitForSipi);
    icr(&mut m, SIPI_TO_1 | 0x9a);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::StartUp(0x9a));
    assert!(m.has_runnable());
    icr(&mut m, SIPI_TO_1 | 0x9b);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::StartUp(0x9a), "the second SIPI is dropped");
    assert!(m.dom(0).vcpus[1].vcpu.loaded.is_none(), "the state is loaded at its turn, not in the IPI");
    next_turn(&mut m);
    let d = m.dom(0);
    let ap = &d.vcpus[1];
    assert_eq!(ap.state, RunState::Runnable);
    let s = ap.vcpu.loaded.as_ref().expect("the SIPI state was loaded");
    assert_eq!(*s, crate::domain::boot::sipi_snapshot(0x9a, d.processor_signature()));
    assert_eq!((s.cs.selector, s.cs.base, s.cs.limit, s.rip), (0x9a00, 0x9_a000, 0xffff, 0));
    assert_eq!((s.cr0, s.cr3, s.cr4, s.efer, s.rflags, s.dr7), (0x6000_0030, 0, 0, 0, 2, 0x400));
    assert_eq!(s.regs.rdx, u64::from(d.processor_signature()));
    assert_ne!(d.processor_signature(), 0, "the recorded EPYC has a family");
    assert_eq!(ap.regs.rdx, s.regs.rdx, "the core's GPRs are the snapshot's");
    assert_eq!(ap.vcpu.tsc_offset, 0x1234_5678, "the TSC offset stays the vCPU's");
    assert_eq!(d.undelivered_interrupts, 0);
    // Started once: the next turn does nothing more.
    next_turn(&mut m);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::Runnable);
}

#[test]
fn a_sipi_without_init_to_a_running_vcpu_or_to_no_one_changes_nothing() {
    // The AP was created waiting (firmware left it so): a SIPI alone starts it.
    let mut m = two_vcpus_ap_waiting();
    icr(&mut m, SIPI_TO_1 | 0x10);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::StartUp(0x10));
    next_turn(&mut m);
    // Running now: another SIPI is ignored, and so is one before the state loaded.
    icr(&mut m, SIPI_TO_1 | 0x20);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::Runnable);
    next_turn(&mut m);
    assert_eq!(m.dom(0).vcpus[1].vcpu.loaded.as_ref().unwrap().cs.selector, 0x1000, "still the first start");

    // A runnable vCPU whose LAPIC still says "waiting" (the APs of a guest_abi
    // domain run from creation) is not restarted by a SIPI.
    let mut m = two_vcpus_ap_waiting();
    m.dom(0).vcpus[1].state = RunState::Runnable;
    icr(&mut m, SIPI_TO_1 | 0x10);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::Runnable);
    next_turn(&mut m);
    assert!(m.dom(0).vcpus[1].vcpu.loaded.is_none());
    // INIT stops a running AP; the SIPI then restarts it.
    icr(&mut m, INIT_TO_1);
    assert_eq!(m.dom(0).vcpus[1].state, RunState::WaitForSipi);
    icr(&mut m, SIPI_TO_1 | 0x30);
    next_turn(&mut m);
    assert_eq!(m.dom(0).vcpus[1].vcpu.loaded.as_ref().unwrap().cs.base, 0x3_0000);

    // APIC ID 7 does not exist: INIT and SIPI reach no one and are counted as such.
    let mut m = two_vcpus_ap_waiting();
    icr(&mut m, (7 << 32) | 0x4500);
    icr(&mut m, (7 << 32) | 0x4610);
    let d = m.dom(0);
    assert_eq!(d.undelivered_interrupts, 2);
    assert_eq!(d.vcpus[1].state, RunState::WaitForSipi);
    assert_eq!(d.vcpus[0].state, RunState::Runnable);
    assert!(d.vcpus.iter().all(|v| v.vcpu.loaded.is_none()));
}

#[test]
fn init_to_the_bsp_resets_its_lapic_and_it_keeps_running() {
    let mut m = two_vcpus_ap_waiting();
    // Self-INIT through the "all including self" shorthand (ICR bits 19:18 = 10b).
    icr(&mut m, 0x8_4500);
    let d = m.dom(0);
    assert_eq!(d.vcpus[0].state, RunState::Runnable, "the BSP does not wait for a SIPI");
    assert_eq!(d.vcpus[1].state, RunState::WaitForSipi);
    assert_eq!(d.vcpus[0].lapic.read_apic_base(), 0xfee0_0d00, "x2APIC mode is kept (SDM Vol. 3A 11.12.5.1)");
}

/// The machine state of one domain loaded into another (as a migration does, with
/// both hosts' clocks chosen): MSRs, FPU, LAPIC (x2APIC, armed timer), devices and
/// console arrive equal, the guest's clocks continue where they paused on a host that
/// booted after the guest did, and what the destination cannot restore is refused
/// with the reason.
#[test]
fn the_machine_state_moves_between_two_machines_and_time_continues() {
    use crate::domain::migrate::HostClock;
    use alloc::vec;
    use migration_svc::StateRecord;
    use wire::migration::{DeviceEntry, VcpuFpu, VcpuMsrs};

    const HZ: u64 = 2_000_000_000;
    let mut src = machine(NO_LOGGING);
    let host_src = HostClock { uptime_ns: 9_000_000_000, tsc: 40_000_000_000, tsc_hz: HZ };
    {
        let d = src.dom(0);
        d.started_ns = 1_000_000_000;
        d.tsc_offset = 0u64.wrapping_sub(30_000_000_000);
        let env = super::msr::env_of(&d.policy);
        let now = host_src.uptime_ns - d.started_ns;
        for b in b"booted\n" {
            d.console.push(1, *b);
        }
        let slot = &mut d.vcpus[0];
        slot.msrs.write(0x200, 0x8000_0006, &env).unwrap();
        slot.msrs.write(0x2ff, 0xc00, &env).unwrap();
        // The guest moved its own TSC 777 ticks ahead of the domain's.
        slot.vcpu.tsc_offset = d.tsc_offset.wrapping_add(777);
        slot.vcpu.msrs.push((GuestMsr::TscAux, 0x42));
        slot.vcpu.fpu.set_xcr0(7);
        slot.lapic.write_apic_base(0xfee0_0000 | (1 << 11) | (1 << 10)).unwrap();
        slot.lapic.write_msr(0x80f, 0x1ff, now).unwrap();
        slot.lapic.write_msr(0x832, 0x40 | (1 << 17), now).unwrap();
        slot.lapic.write_msr(0x838, 5_000_000, now).unwrap();
    }
    let state = src.machine_state_at(1, host_src).unwrap();
    assert_eq!(state.clock.ns, 8_000_000_000, "guest time at pause");
    assert_eq!(state.clock.tsc, 10_000_000_000, "the domain's TSC at pause");
    let msrs = &state.msrs[0];
    assert_eq!(msrs.get(0x10), Some(10_000_000_777), "the vCPU's own TSC");
    assert_eq!((msrs.get(0x200), msrs.get(0x2ff)), (Some(0x8000_0006), Some(0xc00)));
    let kinds: Vec<(u16, u32)> = state.devices.devices.iter().map(|e| (e.kind, e.instance)).collect();
    assert_eq!(kinds, [(1, 0), (2, 0), (4, 0), (5, 0), (6, 0), (7, 0), (3, 0), (8, 0)], "every model, the LAPIC last");

    // A destination that booted 0.5 s ago (less than the guest's 8 s) with its TSC at 3.
    let mut dst = machine(NO_LOGGING);
    let host_dst = HostClock { uptime_ns: 500_000_000, tsc: 3, tsc_hz: HZ };
    let mut records = vec![StateRecord::Clock(state.clock)];
    records.push(StateRecord::Fpu(state.fpus[0].clone()));
    records.push(StateRecord::Msrs(state.msrs[0].clone()));
    records.push(StateRecord::Devices(state.devices.clone()));
    records.extend(state.console.clone().map(StateRecord::Console));
    for r in &records {
        dst.load_machine_state_at(1, r, host_dst).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    }
    let d = dst.dom(0);
    assert_eq!(host_dst.uptime_ns.wrapping_sub(d.started_ns), state.clock.ns, "guest time continues");
    assert_eq!(host_dst.tsc.wrapping_add(d.tsc_offset), state.clock.tsc, "the domain's TSC continues");
    let v = &d.vcpus[0];
    assert_eq!(host_dst.tsc.wrapping_add(v.vcpu.tsc_offset), 10_000_000_777, "the vCPU's TSC keeps its distance");
    assert_eq!(v.msrs, src.dom(0).vcpus[0].msrs);
    assert!(v.vcpu.msrs.contains(&(GuestMsr::TscAux, 0x42)));
    assert_eq!(v.vcpu.fpu.xcr0(), 7);
    assert_eq!(d.console.contents(), b"booted\n");
    // Saved again at the same guest time, the destination holds the very same state.
    let again = dst.machine_state_at(1, host_dst).unwrap();
    assert_eq!(again.devices, state.devices, "LAPIC (timer time left included) and every device arrived equal");
    assert_eq!((again.clock, &again.fpus, &again.msrs), (state.clock, &state.fpus, &state.msrs));

    // What cannot be restored is refused, saying why.
    let refused = |r: StateRecord| {
        let mut m = machine(NO_LOGGING);
        m.load_machine_state_at(1, &StateRecord::Clock(state.clock), host_dst).unwrap();
        m.load_machine_state_at(1, &r, host_dst).unwrap_err()
    };
    let mut avx512 = vec![0u8; 2696];
    avx512[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    avx512[512..520].copy_from_slice(&0xe7u64.to_le_bytes());
    let e = refused(StateRecord::Fpu(VcpuFpu { index: 0, xcr0: 0xe7, area: avx512 }));
    assert!(e.contains("vCPU 0: cannot restore its FPU state") && e.contains("components 0xe0"), "{e}");
    let e = refused(StateRecord::Msrs(VcpuMsrs { index: 0, msrs: vec![(0x1234, 0)] }));
    assert!(e.contains("MSR 0x1234 is not virtualized"), "{e}");
    let e = refused(StateRecord::Msrs(VcpuMsrs { index: 0, msrs: vec![(0x2ff, 0x3)] }));
    assert!(e.contains("cannot hold 0x3"), "{e}");
    let mut no_pit = state.devices.clone();
    no_pit.devices.retain(|e| e.kind != 4);
    let e = refused(StateRecord::Devices(no_pit));
    assert!(e.contains("no Pit state"), "{e}");
    let mut extra = state.devices.clone();
    extra.devices.push(DeviceEntry { kind: 99, instance: 0, version: 1, bytes: vec![] });
    let e = refused(StateRecord::Devices(extra));
    assert!(e.contains("unknown kind 99") && e.contains("no model for"), "{e}");
    let mut future = state.devices.clone();
    future.devices.iter_mut().filter(|e| e.kind == 8).for_each(|e| e.version = 9);
    let e = refused(StateRecord::Devices(future));
    assert!(e.contains("LAPIC") && e.contains("version 9"), "{e}");
    let mut m = machine(NO_LOGGING);
    let e = m.load_machine_state_at(1, &records[2], host_dst).unwrap_err();
    assert!(e.contains("before the guest clock"), "{e}");
}

#[test]
fn a_slice_cap_shortens_slices_and_never_invents_preemption() {
    let text = include_str!("../../../../levelling/testdata/qemu-7.2-tcg-epyc.cpuid");
    let dump = levelling::parse_dump(text).expect("the recorded dump parses");
    let host = levelling::HostCpu::from_records(&dump.records).expect("the recorded CPU decodes");
    let mechanisms = Mechanisms { pml: false, dbit: true };
    let mut m = Machine::new(FakeBackend, pool(16), host.clone(), Some(10_000), mechanisms, false);
    assert_eq!(m.slice(), Some(10_000));
    m.cap_slice(Some(500));
    assert_eq!(m.slice(), Some(500), "the serial channel's shorter slice");
    m.cap_slice(Some(50_000));
    assert_eq!(m.slice(), Some(10_000), "a cap never lengthens the slice");
    m.cap_slice(None);
    assert_eq!(m.slice(), Some(10_000));
    let mut unpreemptible = Machine::new(FakeBackend, pool(16), host, None, mechanisms, false);
    unpreemptible.cap_slice(Some(500));
    assert_eq!(unpreemptible.slice(), None, "without a preemption timer there is no slice to cap");
}

#[test]
fn a_log_dirty_hypercall_waits_for_the_other_vcpus_to_stop() {
    let mut m = machine(Mechanisms { pml: false, dbit: true });
    let regs = GuestRegs { rax: guest_abi::Hypercall::DirtyStart as u64, rdi: 2, ..Default::default() };
    let (d, pool, mechanisms) = m.parts(0);
    d.vcpus[0].regs = regs;
    let mut ctx = ExitCtx { d, vi: 0, pool, mechanisms, others_running: true };
    assert_eq!(handle(&mut ctx, &exit(ExitReason::Hypercall)), Action::StopOthers);
    assert_eq!(vcpu(&mut m).skipped, 0, "not skipped: handled again once the others stopped");
    assert!(m.dom(0).logs.iter().all(Option::is_none), "nothing was started");
    let (action, regs) = run(&mut m, regs, ExitReason::Hypercall);
    assert_eq!((action, regs.rax), (Action::Continue, 2), "with the others stopped it starts D-bit logging");
    assert_eq!(vcpu(&mut m).skipped, 1);
}
