//! Host tests of the exit policy: synthetic exits fed to [`handle`] over a domain
//! whose vCPU is a fake that records what the policy asked of it (skip the
//! instruction, inject an exception), with real guest memory from a test frame pool
//! and a CPUID policy from a recorded CPU.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Action, ExitCtx, handle};
use crate::arch::state::VcpuSnapshot;
use crate::arch::{ArchError, Backend, Exit, ExitKind, ExitReason, GuestEntry, GuestRegs, PagingState, Vcpu};
use crate::domain::dirty::Mechanisms;
use crate::domain::{Console, Domain, DomainState, Machine, VcpuSlot};
use crate::mm::frames::FramePool;
use crate::mm::frames::testing::pool;
use crate::mm::guest::GuestMemory;
use crate::mm::nested::Npt;
use crate::mm::{MmError, PAGE_SIZE};

/// What the policy asked of the vCPU.
#[derive(Debug, Default)]
struct FakeVcpu {
    skipped: u32,
    /// The instruction length of each skip.
    skipped_lens: Vec<u64>,
    /// What `paging_state` answers.
    paging: PagingState,
    injected: Vec<(u8, Option<u32>)>,
    flushes: u32,
    /// What `can_inject_interrupt` answers (the guest's IF, as it were).
    interrupts_open: bool,
    interrupts: Vec<u8>,
    window_requested: bool,
}

impl Vcpu for FakeVcpu {
    fn run(&mut self, _: &mut GuestRegs, _: Option<u64>) -> Result<Exit, ArchError> {
        Err(ArchError::Unsupported("a fake vCPU does not run"))
    }
    fn skip_instruction(&mut self, exit: &Exit) -> Result<(), ArchError> {
        self.skipped += 1;
        self.skipped_lens.push(exit.instruction_len);
        Ok(())
    }
    fn paging_state(&mut self) -> Result<PagingState, ArchError> {
        Ok(self.paging)
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), ArchError> {
        self.injected.push((vector, error_code));
        Ok(())
    }
    fn can_inject_interrupt(&mut self) -> Result<bool, ArchError> {
        Ok(self.interrupts_open)
    }
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), ArchError> {
        self.interrupts.push(vector);
        Ok(())
    }
    fn request_interrupt_window(&mut self, on: bool) -> Result<(), ArchError> {
        self.window_requested = on;
        Ok(())
    }
    fn save_state(&mut self, _: &GuestRegs) -> Result<VcpuSnapshot, ArchError> {
        Err(ArchError::Unsupported("fake"))
    }
    fn load_state(&mut self, _: &mut GuestRegs, _: &VcpuSnapshot) -> Result<(), ArchError> {
        Err(ArchError::Unsupported("fake"))
    }
    fn flush_nested_tlb(&mut self) -> Result<(), ArchError> {
        self.flushes += 1;
        Ok(())
    }
    fn destroy(self, _: &mut FramePool) -> Result<(), MmError> {
        Ok(())
    }
}

#[derive(Debug)]
struct FakeBackend;

impl Backend for FakeBackend {
    type Paging = Npt;
    type Vcpu = FakeVcpu;
    const NAME: &'static str = "fake";
    const ARCH: guest_abi::Arch = guest_abi::Arch::Svm;
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];
    fn enable(_: &crate::platform::caps::Capabilities, _: &mut FramePool) -> Result<Self, ArchError> {
        Ok(Self)
    }
    fn create_vcpu(&mut self, _: &mut FramePool, _: &GuestEntry) -> Result<FakeVcpu, ArchError> {
        Ok(FakeVcpu::default())
    }
}

const MEMORY: u64 = 4 << 20;

/// A machine on a recorded EPYC under QEMU with one 4 MiB domain of one fake vCPU.
fn machine(mechanisms: Mechanisms) -> Machine<FakeBackend> {
    let text = include_str!("../../../../levelling/testdata/qemu-7.2-tcg-epyc.cpuid");
    let dump = levelling::parse_dump(text).expect("the recorded dump parses");
    let host = levelling::HostCpu::from_records(&dump.records).expect("the recorded CPU decodes");
    let mut p = pool(2048);
    let mem = GuestMemory::<Npt>::new(&mut p, MEMORY, false).expect("4 MiB fits the test pool");
    let mut m = Machine::new(FakeBackend, p, host, None, mechanisms, false);
    let (policy, cpuid) = m.cpuid_table(None, 1).expect("the default policy verifies on its own host");
    let slot = VcpuSlot::new(FakeVcpu::default(), GuestRegs::default(), 0);
    m.domains.push(Domain {
        id: 1,
        name: String::from("test"),
        state: DomainState::Running,
        memory_bytes: MEMORY,
        vcpu_count: 1,
        exits: Default::default(),
        reports: Vec::new(),
        runtime_ticks: 0,
        console: Console::default(),
        mem: Some(mem),
        vcpus: alloc::vec![slot],
        cpuid,
        policy,
        cmdline: String::new(),
        throttle: 0,
        throttle_credit: 0,
        logs: [None, None],
        devices: crate::domain::new_devices().expect("the PC's table maps"),
        started_ns: 0,
    });
    m
}

fn exit(reason: ExitReason) -> Exit {
    Exit { reason, rip: 0x20_0000, instruction_len: 3 }
}

/// Run one exit with `regs` loaded first; the action and the registers after.
fn run(m: &mut Machine<FakeBackend>, regs: GuestRegs, reason: ExitReason) -> (Action, GuestRegs) {
    let d = &mut m.domains[0];
    d.vcpus[0].regs = regs;
    let mut ctx = ExitCtx { d, vi: 0, pool: &mut m.pool, mechanisms: &m.mechanisms };
    let action = handle(&mut ctx, &exit(reason));
    (action, m.domains[0].vcpus[0].regs)
}

fn vcpu(m: &Machine<FakeBackend>) -> &FakeVcpu {
    &m.domains[0].vcpus[0].vcpu
}

const NO_LOGGING: Mechanisms = Mechanisms { pml: false, dbit: false };

#[test]
fn cpuid_answers_from_the_policy_table_and_skips() {
    let mut m = machine(NO_LOGGING);
    let want = m.domains[0].cpuid.lookup_vcpu(0, 0, &crate::domain::vcpu_state(0));
    let (action, regs) = run(&mut m, GuestRegs { rax: 0, rcx: 0, ..Default::default() }, ExitReason::Cpuid);
    assert_eq!(action, Action::Continue);
    assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], want.map(u64::from));
    assert_eq!(regs.rbx, 0x6874_7541, "vendor AuthenticAMD from the recorded CPU, through the policy");
    assert_eq!(vcpu(&m).skipped, 1);
    // A leaf no policy covers reads as zeros, never the host's values.
    let (_, regs) = run(&mut m, GuestRegs { rax: 0x4000_0000, ..Default::default() }, ExitReason::Cpuid);
    assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], [0; 4]);
}

#[test]
fn msrs_outside_the_allow_list_get_gp_and_do_not_retire() {
    let mut m = machine(NO_LOGGING);
    let (action, regs) = run(&mut m, GuestRegs { rcx: 0x1b, ..Default::default() }, ExitReason::MsrRead);
    assert_eq!(action, Action::Continue);
    assert_eq!((regs.rax, regs.rdx), (0xfee0_0900, 0), "APIC base, enabled, BSP");
    assert_eq!(run(&mut m, GuestRegs { rcx: 0x3a, ..Default::default() }, ExitReason::MsrRead).0, Action::Continue);
    assert_eq!(run(&mut m, GuestRegs { rcx: 0x10, ..Default::default() }, ExitReason::MsrWrite).0, Action::Continue);
    assert_eq!(vcpu(&m).injected, [(13, Some(0)), (13, Some(0))], "IA32_FEATURE_CONTROL read and a TSC write: #GP(0)");
    assert_eq!(vcpu(&m).skipped, 1, "only the allowed read retired");
}

#[test]
fn port_io_feeds_the_console_and_unclaimed_ports_read_ones() {
    let mut m = machine(NO_LOGGING);
    let out = |port| ExitReason::Io { port, size: 1, input: false, string: false };
    for b in b"hi\n" {
        run(&mut m, GuestRegs { rax: u64::from(*b), ..Default::default() }, out(guest_abi::UART_PORT));
    }
    assert_eq!(m.domains[0].console.since(0).1, b"hi\n");
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
    assert_eq!(m.domains[0].report(b"round"), Some(7));
    let y = GuestRegs { rax: guest_abi::Hypercall::Yield as u64, ..Default::default() };
    assert_eq!(run(&mut m, y, ExitReason::Hypercall).0, Action::Yield);
    let bad = GuestRegs { rax: 0xdead, ..Default::default() };
    assert_eq!(run(&mut m, bad, ExitReason::Hypercall).1.rax, guest_abi::HYPERCALL_EINVAL);
    let done = GuestRegs { rax: guest_abi::Hypercall::Exit as u64, rdi: 3, ..Default::default() };
    assert_eq!(run(&mut m, done, ExitReason::Hypercall).0, Action::Finish(3));
    assert_eq!(vcpu(&m).skipped, 4, "every hypercall retires before it acts");
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
    assert!(vcpu(&m).flushes >= 2, "arming and the fault flushed the nested TLB");
    let buffer = 0x10_0000;
    let (_, regs) = run(&mut m, call(guest_abi::Hypercall::DirtyPeekClean, buffer, 128), ExitReason::Hypercall);
    assert_eq!(regs.rax, 1, "one dirty page");
    let (mem, pool) = (m.domains[0].mem.as_ref().unwrap(), &mut m.pool);
    assert_eq!(mem.read_u64(pool, buffer).unwrap(), 1 << 5, "bit 5 of the guest's bitmap");
    assert_eq!(
        run(&mut m, call(guest_abi::Hypercall::DirtyStop, 0, 0), ExitReason::Hypercall).1.rax,
        guest_abi::HYPERCALL_OK
    );
    assert!(m.domains[0].logs.iter().all(Option::is_none));
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
    assert_eq!(vcpu(&m).injected, [(6, None)]);
    assert_eq!(run(&mut m, GuestRegs::default(), ExitReason::Hlt).0, Action::Halt);
    assert_eq!(run(&mut m, GuestRegs::default(), ExitReason::TimeSliceEnd).0, Action::Yield);
    for (reason, text) in [
        (ExitReason::TripleFault, "triple fault"),
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
    assert!(vcpu(&m).injected.is_empty(), "every write was legal");
    let slot = &mut m.domains[0].vcpus[0];
    assert_eq!(slot.lapic.next_timer_ns(), Some(1000), "1000 ticks of the 1 GHz APIC clock from guest time 0");
    // Due, but the guest has IF clear: an interrupt-window exit is asked for instead.
    crate::domain::sched::deliver(slot, 1000).unwrap();
    assert!(slot.vcpu.interrupts.is_empty() && slot.vcpu.window_requested);
    // The window opens: injected, moved to in-service, no more window.
    slot.vcpu.interrupts_open = true;
    crate::domain::sched::deliver(slot, 1001).unwrap();
    assert_eq!(slot.vcpu.interrupts, [0x40]);
    assert!(!slot.vcpu.window_requested);
    assert_eq!(slot.lapic.pending_interrupt(), None, "in service until EOI");
    // A write to a read-only x2APIC register is #GP.
    assert_eq!(run(&mut m, wrmsr(0x802, 5), ExitReason::MsrWrite).0, Action::Continue);
    assert_eq!(vcpu(&m).injected, [(13, Some(0))]);
}

/// Where the MMIO tests' code runs (guest RAM, identity-mapped).
const CODE: u64 = 0x10_0000;
const APIC: u64 = 0xfee0_0000;
/// A page nothing on the bus claims (HPET's address on a PC; no HPET here).
const UNCLAIMED: u64 = 0xfed0_0000;

/// Build 4-level identity tables in the domain's memory (0..2 MiB and 3..4 GiB with
/// 2 MiB pages, as the guest loader maps them) and point the fake vCPU at them.
fn long_mode_with_tables(m: &mut Machine<FakeBackend>) {
    let (mem, pool) = (m.domains[0].mem.as_ref().unwrap(), &mut m.pool);
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
    m.domains[0].vcpus[0].vcpu.paging = PagingState {
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
    let (mem, pool) = (m.domains[0].mem.as_ref().unwrap(), &mut m.pool);
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
    assert_eq!(vcpu(&m).skipped_lens, [3], "RIP moves past the 3-byte instruction");
    // movzx ecx, byte [rbx+0x20]: the ID register's low byte (the ID is in 31:24).
    let (_, regs) = mmio(&mut m, &[0x0f, 0xb6, 0x4b, 0x20], GuestRegs { rcx: 5, ..base }, APIC + 0x20, false);
    assert_eq!(regs.rcx, 0);
    // mov dword [rbx+0x80], 0x20: TPR; read back with mov edx, [rbx+0x80].
    let tpr = [0xc7, 0x83, 0x80, 0, 0, 0, 0x20, 0, 0, 0];
    assert_eq!(mmio(&mut m, &tpr, base, APIC + 0x80, true).0, Action::Continue);
    assert_eq!(m.domains[0].vcpus[0].lapic.tpr(), 0x20);
    let (_, regs) = mmio(&mut m, &[0x8b, 0x93, 0x80, 0, 0, 0], base, APIC + 0x80, false);
    assert_eq!(regs.rdx, 0x20);
    assert_eq!(vcpu(&m).skipped_lens, [3, 4, 10, 6]);
    assert!(vcpu(&m).injected.is_empty());
    // The exits count as MMIO, not as nested page faults.
    m.domains[0].count(&ExitReason::NestedPageFault { gpa: APIC + 0x80, write: false });
    m.domains[0].count(&ExitReason::NestedPageFault { gpa: 0x3000, write: true });
    assert_eq!(m.domains[0].exits.get(&ExitKind::Mmio), Some(&1));
    assert_eq!(m.domains[0].exits.get(&ExitKind::NestedPageFault), Some(&1));
}

#[test]
fn an_xapic_eoi_write_retires_the_in_service_vector() {
    let mut m = machine(NO_LOGGING);
    long_mode_with_tables(&mut m);
    let base = GuestRegs { rbx: APIC, ..Default::default() };
    // Software-enable through the SVR: mov dword [rbx+0xf0], 0x1ff.
    let svr = [0xc7, 0x83, 0xf0, 0, 0, 0, 0xff, 0x01, 0, 0];
    assert_eq!(mmio(&mut m, &svr, base, APIC + 0xf0, true).0, Action::Continue);
    let lapic = &mut m.domains[0].vcpus[0].lapic;
    assert!(lapic.enabled());
    assert!(lapic.accept(0x40, false));
    assert_eq!(lapic.pending_interrupt(), Some(0x40));
    lapic.ack(0x40);
    let isr = |m: &mut Machine<FakeBackend>| {
        let mut b = [0u8; 4];
        m.domains[0].vcpus[0].lapic.read_mmio(0x120, &mut b, 0);
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
    let counted: Vec<_> = m.domains[0].unclaimed().iter().copied().collect();
    assert_eq!(counted.len(), 1);
    assert_eq!((counted[0].addr, counted[0].reads, counted[0].writes), (UNCLAIMED, 2, 1));
    // The I/O APIC page is unclaimed too until the interrupt router is wired in.
    let (_, regs) = mmio(&mut m, &[0x8b, 0x03], GuestRegs { rbx: 0xfec0_0000, ..base }, 0xfec0_0000, false);
    assert_eq!(regs.rax, 0xffff_ffff);
    // An instruction that does not match the fault stops the domain, and nothing retires.
    let skipped = vcpu(&m).skipped;
    let (action, _) = mmio(&mut m, &[0x8b, 0x03], base, APIC, false);
    assert!(matches!(action, Action::Crash(ref r) if r.contains("not on the faulting page")), "{action:?}");
    assert_eq!(vcpu(&m).skipped, skipped);
}
