//! A fake backend for host tests of the core: its vCPUs never run, and record what the
//! core asked of them (skips, injections, interrupt windows, loaded state, MSRs), so
//! the exit policy and domain creation can be tested with synthetic exits. Its PML
//! buffer is a vector the tests fill.

use alloc::vec::Vec;

use crate::arch::fpu::{GuestFpu, HostFpu};
use crate::arch::state::VcpuSnapshot;
use crate::arch::{ArchError, Backend, ControlState, Exit, GuestEntry, GuestMsr, GuestRegs, PagingState, Vcpu};
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::nested::Npt;

/// What the policy asked of the vCPU.
#[derive(Debug)]
pub(crate) struct FakeVcpu {
    /// What the backend created it with (read by host tests; the fuzz targets do not).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) entry: GuestEntry,
    /// The last snapshot loaded into it.
    pub(crate) loaded: Option<VcpuSnapshot>,
    pub(crate) skipped: u32,
    /// The instruction length of each skip.
    pub(crate) skipped_lens: Vec<u64>,
    /// What `paging_state` answers.
    pub(crate) paging: PagingState,
    pub(crate) injected: Vec<(u8, Option<u32>)>,
    pub(crate) flushes: u32,
    /// What `can_inject_interrupt` answers (the guest's IF, as it were).
    pub(crate) interrupts_open: bool,
    pub(crate) interrupts: Vec<u8>,
    pub(crate) window_requested: bool,
    /// The guest's control registers, as the test sets them.
    pub(crate) control: ControlState,
    /// The backend-held MSRs, as (MSR, value).
    pub(crate) msrs: Vec<(GuestMsr, u64)>,
    pub(crate) tsc_offset: u64,
    pub(crate) fpu: GuestFpu,
    /// The PML buffer while logging is on: tests push the guest-physical addresses the
    /// processor would log, `drain_pml` hands them over and empties it.
    pub(crate) pml: Option<Vec<u64>>,
}

/// A host that switches x87, SSE, AVX and AVX-512.
const FAKE_HOST_FPU: HostFpu = HostFpu { xsave: true, xcr0: 0xe7, area_bytes: 2696 };

impl Default for FakeVcpu {
    fn default() -> Self {
        FakeVcpu {
            entry: GuestEntry { nested_root: 0, cr3: 0, rip: 0, rsp: 0 },
            loaded: None,
            skipped: 0,
            skipped_lens: Vec::new(),
            paging: PagingState::default(),
            injected: Vec::new(),
            flushes: 0,
            interrupts_open: false,
            interrupts: Vec::new(),
            window_requested: false,
            // Long mode, paging on, CPL 0, CR4.PAE (as `configure` leaves a guest).
            control: ControlState { cr0: 0x8001_0031, cr4: 0x20, cpl: 0 },
            msrs: alloc::vec![(GuestMsr::Efer, 0x500), (GuestMsr::Pat, 0x0007_0406_0007_0406)],
            tsc_offset: 0,
            fpu: GuestFpu::new(&FAKE_HOST_FPU),
            pml: None,
        }
    }
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
    /// The last snapshot loaded (registers from `regs`), else the reset state: enough
    /// for the save side of migration tests and the `state_loaders` fuzz target.
    fn save_state(&mut self, regs: &GuestRegs) -> Result<VcpuSnapshot, ArchError> {
        let mut snapshot = self.loaded.clone().unwrap_or_default();
        snapshot.regs = *regs;
        Ok(snapshot)
    }
    fn load_state(&mut self, regs: &mut GuestRegs, snapshot: &VcpuSnapshot) -> Result<(), ArchError> {
        *regs = snapshot.regs;
        self.loaded = Some(snapshot.clone());
        Ok(())
    }
    fn control_state(&mut self) -> Result<ControlState, ArchError> {
        Ok(self.control)
    }
    fn read_msr(&mut self, msr: GuestMsr) -> Result<u64, ArchError> {
        Ok(self.msrs.iter().find(|(m, _)| *m == msr).map_or(0, |(_, v)| *v))
    }
    fn write_msr(&mut self, msr: GuestMsr, value: u64) -> Result<(), ArchError> {
        self.msrs.retain(|(m, _)| *m != msr);
        self.msrs.push((msr, value));
        Ok(())
    }
    fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }
    fn set_tsc_offset(&mut self, offset: u64) -> Result<(), ArchError> {
        self.tsc_offset = offset;
        Ok(())
    }
    fn fpu(&self) -> &GuestFpu {
        &self.fpu
    }
    fn fpu_mut(&mut self) -> &mut GuestFpu {
        &mut self.fpu
    }
    fn flush_nested_tlb(&mut self) -> Result<(), ArchError> {
        self.flushes += 1;
        Ok(())
    }
    fn enable_pml(&mut self, _: &mut FramePool) -> Result<(), ArchError> {
        self.pml.get_or_insert_with(Vec::new);
        Ok(())
    }
    fn drain_pml(&mut self, _: &mut FramePool, out: &mut dyn FnMut(&[u64])) -> Result<(), ArchError> {
        if let Some(buffer) = self.pml.as_mut().filter(|b| !b.is_empty()) {
            out(buffer);
            buffer.clear();
        }
        Ok(())
    }
    fn disable_pml(&mut self, _: &mut FramePool) -> Result<(), ArchError> {
        self.pml = None;
        Ok(())
    }
    fn destroy(self, _: &mut FramePool) -> Result<(), MmError> {
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct FakeBackend;

impl Backend for FakeBackend {
    type Paging = Npt;
    type Vcpu = FakeVcpu;
    const NAME: &'static str = "fake";
    const ARCH: guest_abi::Arch = guest_abi::Arch::Svm;
    const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];
    const VCPU_ON_ANY_CPU: bool = true;
    fn enable(_: &crate::platform::caps::Capabilities, _: &mut FramePool) -> Result<Self, ArchError> {
        Ok(Self)
    }
    fn create_vcpu(&mut self, _: &mut FramePool, entry: &GuestEntry) -> Result<FakeVcpu, ArchError> {
        Ok(FakeVcpu { entry: *entry, ..FakeVcpu::default() })
    }
}

/// A machine on a recorded EPYC under QEMU (`levelling/testdata/qemu-7.2-tcg-epyc.cpuid`)
/// with one running domain (id 1) of `memory` bytes and one fake vCPU, over `pool`.
/// Shared by the exit-policy host tests and the `state_loaders` fuzz target.
pub(crate) fn machine(
    mut pool: FramePool,
    memory: u64,
    mechanisms: crate::domain::dirty::Mechanisms,
) -> crate::domain::Machine<FakeBackend> {
    use crate::domain::Machine;
    use crate::mm::guest::GuestMemory;

    // The recorded CPU and its default policy, computed once: they are most of a
    // machine's cost, and the fuzz target builds several machines per input.
    static HOST: spin::Once<levelling::HostCpu> = spin::Once::new();
    static POLICY: spin::Once<(levelling::Policy, levelling::CpuidTable)> = spin::Once::new();
    let host = HOST.call_once(|| {
        let text = include_str!("../../../levelling/testdata/qemu-7.2-tcg-epyc.cpuid");
        let dump = levelling::parse_dump(text).expect("the recorded dump parses");
        levelling::HostCpu::from_records(&dump.records).expect("the recorded CPU decodes")
    });
    let mem = GuestMemory::<Npt>::new(&mut pool, memory, false).expect("the domain fits the test pool");
    let mut m = Machine::new(FakeBackend, pool, host.clone(), None, mechanisms, false);
    let (policy, cpuid) =
        POLICY.call_once(|| m.cpuid_table(None, 1).expect("the default policy verifies on its own host")).clone();
    m.push_domain(fake_domain(1, mem, policy, cpuid));
    m
}

/// A running domain `id` of one fake vCPU over `mem`, as [`machine`] makes it.
fn fake_domain(
    id: u32,
    mem: crate::mm::guest::GuestMemory<Npt>,
    policy: levelling::Policy,
    cpuid: levelling::CpuidTable,
) -> crate::domain::Domain<FakeBackend> {
    use crate::domain::{Console, Domain, DomainState, VcpuSlot};
    use alloc::string::String;

    let slot = VcpuSlot::new(FakeVcpu::default(), GuestRegs::default(), 0);
    Domain {
        id,
        name: if id == 1 { String::from("test") } else { alloc::format!("test{id}") },
        state: DomainState::Running,
        memory_bytes: mem.bytes(),
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
        throttle_until: 0,
        logs: [None, None],
        devices: crate::domain::new_devices().expect("the PC's table maps"),
        irq: crate::domain::platform::new_router(),
        undelivered_interrupts: 0,
        started_ns: 0,
        tsc_offset: 0,
        migrated_clock: None,
    }
}

/// Another running domain `id` like [`machine`]'s, of `memory` bytes, placed as a
/// created domain is.
#[cfg(test)]
pub(crate) fn add_domain(m: &mut crate::domain::Machine<FakeBackend>, id: u32, memory: u64) {
    let mem =
        crate::mm::guest::GuestMemory::<Npt>::new(&mut m.pool(), memory, false).expect("the domain fits the test pool");
    let (policy, cpuid) = m.cpuid_table(None, 1).expect("the default policy verifies on its own host");
    m.push_domain(fake_domain(id, mem, policy, cpuid));
}
