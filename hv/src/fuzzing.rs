//! Harnesses for `cargo fuzz` (built only with `--cfg fuzzing`, which cargo-fuzz
//! passes to every crate): the destination side of a migration's machine-state
//! records, driven over the same core the host tests use (a fake vCPU, a recorded
//! EPYC), so the `state_loaders` target in `hv/fuzz` reaches what a hostile or corrupt
//! stream reaches on a real destination: vCPU snapshots, FPU areas, MSR lists, every
//! device model's saved state and the console ring.

use alloc::string::String;
use alloc::vec::Vec;

use migration_svc::{MigrationCore, StateRecord};
use wire::migration::{Record, VcpuState};

use crate::domain::Machine;
use crate::domain::dirty::Mechanisms;
use crate::domain::migrate::HostClock;
use crate::domain::testing::FakeBackend;
use crate::mm::frames::FramePool;
use crate::mm::frames::testing::Page;

/// Frames behind one target's pool: its 1 MiB domain, the nested tables and the LAPIC
/// page, with room to spare.
const FRAMES: usize = 512;
/// The domain's memory (the loaders never touch guest memory; small keeps runs fast).
const MEMORY: u64 = 1 << 20;
/// The destination's clocks: a host that booted after the source's guest did.
const HOST: HostClock = HostClock { uptime_ns: 500_000_000, tsc: 3, tsc_hz: 2_000_000_000 };
/// The source's clocks when it saved ([`StateTarget::saved`]).
const SOURCE: HostClock = HostClock { uptime_ns: 9_000_000_000, tsc: 40_000_000_000, tsc_hz: 2_000_000_000 };

/// Frame buffers of dropped targets, for the next ones: allocating 2 MiB afresh costs
/// the kernel's page faults every time, which was nine tenths of a fuzz run's time.
static SPARE_FRAMES: spin::Mutex<Vec<Vec<Page>>> = spin::Mutex::new(Vec::new());

/// A destination machine with one domain (id 1, one vCPU) taking records.
pub struct StateTarget {
    /// `Some` until drop, which takes it first: the machine (and the pool inside it)
    /// must be gone before its frames are handed to another target.
    machine: Option<Machine<FakeBackend>>,
    frames: Vec<Page>,
}

impl Drop for StateTarget {
    fn drop(&mut self) {
        drop(self.machine.take());
        SPARE_FRAMES.lock().push(core::mem::take(&mut self.frames));
    }
}

impl core::fmt::Debug for StateTarget {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StateTarget").finish_non_exhaustive()
    }
}

impl Default for StateTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl StateTarget {
    /// A fresh destination. Its frames are owned here and freed with it, so a fuzz
    /// run of millions of inputs does not grow (the host tests' pool leaks instead).
    pub fn new() -> Self {
        let spare = SPARE_FRAMES.lock().pop();
        let mut frames = spare.unwrap_or_else(|| {
            let mut frames: Vec<Page> = Vec::with_capacity(FRAMES);
            frames.resize_with(FRAMES, || Page([0xAA; 4096]));
            frames
        });
        // The frames are page aligned (`Page` is `align(4096)`) and owned by the
        // returned value, which frees the machine holding the pool before it lets them
        // go (`Drop`); no other target holds them (they left the spare list under its
        // lock); on the host the "physical" address is the pointer itself.
        // SAFETY: aligned frames this target alone owns, outliving the pool (above).
        let pool = unsafe { FramePool::new(frames.as_mut_ptr() as u64, FRAMES) };
        let machine = crate::domain::testing::machine(pool, MEMORY, Mechanisms { pml: false, dbit: false });
        Self { machine: Some(machine), frames }
    }

    fn machine(&mut self) -> &mut Machine<FakeBackend> {
        self.machine.as_mut().expect("only drop takes the machine")
    }

    /// Load one record as a destination would: a vCPU's registers, or a machine-state
    /// record. Records of other types (memory, policy, framing) are not loaders' input
    /// and are ignored (`Ok`).
    pub fn load(&mut self, record: &Record) -> Result<(), String> {
        let state = match record {
            Record::VcpuState(VcpuState { index, registers }) => {
                return self.machine().set_vcpu_state(1, *index, registers);
            }
            Record::GuestClock(c) => StateRecord::Clock(*c),
            Record::VcpuFpu(f) => StateRecord::Fpu(f.clone()),
            Record::VcpuMsrs(m) => StateRecord::Msrs(m.clone()),
            Record::DeviceStates(d) => StateRecord::Devices(d.clone()),
            Record::ConsoleRing(c) => StateRecord::Console(c.clone()),
            _ => return Ok(()),
        };
        self.machine().load_machine_state_at(1, &state, HOST)
    }

    /// What this machine's domain saves now, as the records a source sends in stream
    /// order: the clock, each vCPU's registers, FPU and MSRs, the devices, the console.
    /// A fresh target's save is the fuzzer's well-formed starting point; a target that
    /// took records must still be able to save (the destination may be migrated on).
    pub fn saved(&mut self) -> Result<Vec<Record>, String> {
        let vcpus = self.machine().vcpu_states(1)?;
        let state = self.machine().machine_state_at(1, SOURCE)?;
        let mut records = alloc::vec![Record::GuestClock(state.clock)];
        for (index, registers) in vcpus.into_iter().enumerate() {
            records.push(Record::VcpuState(VcpuState { index: index as u32, registers }));
        }
        records.extend(state.fpus.into_iter().map(Record::VcpuFpu));
        records.extend(state.msrs.into_iter().map(Record::VcpuMsrs));
        records.push(Record::DeviceStates(state.devices));
        records.extend(state.console.map(Record::ConsoleRing));
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself works: a fresh destination's save loads back into another
    /// fresh destination record by record, and a damaged record is refused with a
    /// reason rather than taken.
    #[test]
    fn a_saved_state_loads_into_a_fresh_target_and_a_bad_one_is_refused() {
        let records = StateTarget::new().saved().expect("a fresh domain saves");
        assert!(records.len() >= 6, "clock, registers, FPU, MSRs, devices, console: {records:?}");
        let mut dst = StateTarget::new();
        for r in &records {
            dst.load(r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
        }
        dst.saved().expect("a loaded destination saves again");

        let mut bad = StateTarget::new();
        bad.load(&records[0]).expect("the clock loads");
        let Record::VcpuState(v) = &records[1] else { panic!("the registers follow the clock: {:?}", records[1]) };
        let mut registers = v.registers.clone();
        registers[0] = 9;
        let e = bad.load(&Record::VcpuState(VcpuState { index: 0, registers })).unwrap_err();
        assert!(e.contains("unknown run state 9"), "{e}");
    }
}
