//! The hardware side of RDT monitoring for `monitor_svc`: the core performs the MSR
//! accesses the service asks for, and only those on its allow-list (IA32_PQR_ASSOC,
//! IA32_QM_EVTSEL, IA32_QM_CTR) — the role Xen's resource-access hypercall plays.
//!
//! RMIDs and their counters belong to one package's L3 (SDM Vol. 3B 18.18.1), so an
//! access for socket N runs on a CPU of socket N ([`SocketMsrs`], with the sockets of
//! [`super::topology::SocketMap`]): on the calling CPU when it is in that socket, else
//! as a job on a started CPU of it (`smp::run_on`, [`JOB_TIMEOUT_MS`]). A socket none
//! of whose CPUs can do it gives `PlatformError::SocketUnreachable`, never an answer
//! from another socket. An IA32_QM_EVTSEL write is held per socket and performed just
//! before the next read on that socket, in the same job on the same CPU, so the
//! select-then-read pair (SDM Vol. 3B 18.18.7) can never be split across CPUs.
//!
//! The service only asks when CPUID reported monitoring (bare metal with RDT/PQoS); on
//! the emulators it reports the hardware events as not available without touching MSRs.

use alloc::string::String;
use alloc::vec::Vec;

use monitor_svc::platform::{IA32_QM_EVTSEL, MsrAccess, PlatformError, is_allowed};

use super::topology::{Route, RouteError, SocketMap};

/// How long a CPU of another socket has to perform an access: it looks at its
/// mailbox between its vCPU slices (10 ms) and idle sleeps (1 ms).
pub const JOB_TIMEOUT_MS: u64 = 200;

/// One MSR access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrOp {
    /// WRMSR.
    Write {
        /// Which MSR.
        msr: u32,
        /// The value.
        value: u64,
    },
    /// RDMSR.
    Read {
        /// Which MSR.
        msr: u32,
    },
}

/// Perform `ops` in order on the CPU this runs on: the value of the last read, if any.
/// Only [`SocketMsrs`] builds `ops`, from allow-listed MSRs.
#[cfg(not(test))]
fn perform(ops: &[MsrOp]) -> Option<u64> {
    let mut last = None;
    for op in ops {
        match *op {
            // `SocketMsrs` only passes MSRs `is_allowed` accepts: the RDT monitoring MSRs, which exist when
            // CPUID.7.0:EBX[12] (PQM) is set, the only case in which monitor_svc's engine (built from that CPUID)
            // issues requests. Writing EVTSEL/PQR_ASSOC changes only which counter is read / which RMID tags this
            // CPU's traffic.
            // SAFETY: an allowed RDT monitoring MSR on a CPU that has it (above).
            MsrOp::Write { msr, value } => unsafe { x86::msr::wrmsr(msr, value) },
            // SAFETY: as for the write; reading IA32_QM_CTR/EVTSEL/PQR_ASSOC has no side effects.
            MsrOp::Read { msr } => last = Some(unsafe { x86::msr::rdmsr(msr) }),
        }
    }
    last
}

/// The CPUs an access can run on: the calling one, or another by job. [`RealCpus`] on
/// the machine; a fake in the tests, so where each access runs is checked on the host.
pub trait Cpus {
    /// The APIC ID of the CPU this runs on.
    fn here(&self) -> u32;
    /// Perform `ops` on this CPU; the value of the last read.
    fn run_here(&mut self, ops: &[MsrOp]) -> Result<Option<u64>, String>;
    /// Perform `ops` on the CPU `apic_id` and wait for it; the value of the last read,
    /// or why it did not answer.
    fn run_on(&mut self, apic_id: u32, ops: Vec<MsrOp>) -> Result<Option<u64>, String>;
}

/// The machine's CPUs, through `smp`'s job mailboxes.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealCpus;

impl Cpus for RealCpus {
    fn here(&self) -> u32 {
        crate::percpu::this().apic_id
    }

    #[cfg(not(test))]
    fn run_here(&mut self, ops: &[MsrOp]) -> Result<Option<u64>, String> {
        Ok(perform(ops))
    }

    #[cfg(test)]
    fn run_here(&mut self, _: &[MsrOp]) -> Result<Option<u64>, String> {
        Err("no MSRs in host tests".into())
    }

    #[cfg(not(test))]
    fn run_on(&mut self, apic_id: u32, ops: Vec<MsrOp>) -> Result<Option<u64>, String> {
        let slot = crate::smp::cpus()
            .iter()
            .find(|s| s.apic_id == apic_id)
            .ok_or_else(|| alloc::format!("there is no CPU with APIC ID {apic_id}"))?;
        // The job leaves its value in a cell of its own: an answer string that arrives
        // late from an earlier, timed-out job can never pass for this one's value.
        let cell = alloc::sync::Arc::new(spin::Mutex::new(None::<Option<u64>>));
        let out = cell.clone();
        crate::smp::run_on(
            slot,
            alloc::boxed::Box::new(move |_kept| {
                *out.lock() = Some(perform(&ops));
                Ok(String::new())
            }),
            JOB_TIMEOUT_MS,
        )
        .map_err(|why| alloc::format!("CPU apic={apic_id}: {why}"))?;
        cell.lock().take().ok_or_else(|| alloc::format!("CPU apic={apic_id} answered another job"))
    }

    #[cfg(test)]
    fn run_on(&mut self, apic_id: u32, _: Vec<MsrOp>) -> Result<Option<u64>, String> {
        Err(alloc::format!("no CPU apic={apic_id} in host tests"))
    }
}

/// The monitoring MSRs of every socket, each reached on a CPU of that socket.
#[derive(Debug)]
pub struct SocketMsrs<C: Cpus> {
    map: SocketMap,
    cpus: C,
    /// Per socket: the IA32_QM_EVTSEL value written last, performed with the next read.
    evtsel: Vec<Option<u64>>,
    /// CPUs that did not answer a job: not asked again (their job may still run late).
    silent: Vec<u32>,
}

impl<C: Cpus> SocketMsrs<C> {
    /// Access for the sockets of `map` through `cpus`.
    pub fn new(map: SocketMap, cpus: C) -> Self {
        let evtsel = alloc::vec![None; map.len()];
        Self { map, cpus, evtsel, silent: Vec::new() }
    }

    /// The sockets it reaches.
    pub fn map(&self) -> &SocketMap {
        &self.map
    }

    fn route(&self, socket: u32, msr: u32) -> Result<Route, PlatformError> {
        if !is_allowed(msr) {
            return Err(PlatformError::NotAllowed { msr });
        }
        self.map.route(socket, self.cpus.here(), &self.silent).map_err(|e| match e {
            RouteError::NoSuchSocket => PlatformError::NoSuchSocket { socket },
            RouteError::Unreachable(reason) => PlatformError::SocketUnreachable { socket, reason },
        })
    }

    fn perform(&mut self, socket: u32, route: Route, ops: Vec<MsrOp>) -> Result<Option<u64>, PlatformError> {
        match route {
            Route::Here => self.cpus.run_here(&ops),
            Route::On(cpu) => self.cpus.run_on(cpu, ops).inspect_err(|_| self.silent.push(cpu)),
        }
        .map_err(|reason| PlatformError::SocketUnreachable { socket, reason })
    }
}

impl<C: Cpus> MsrAccess for SocketMsrs<C> {
    fn write_msr(&mut self, socket: u32, msr: u32, value: u64) -> Result<(), PlatformError> {
        let route = self.route(socket, msr)?;
        if msr == IA32_QM_EVTSEL
            && let Some(held) = self.evtsel.get_mut(socket as usize)
        {
            *held = Some(value);
            return Ok(());
        }
        self.perform(socket, route, alloc::vec![MsrOp::Write { msr, value }]).map(|_| ())
    }

    fn read_msr(&mut self, socket: u32, msr: u32) -> Result<u64, PlatformError> {
        let route = self.route(socket, msr)?;
        let mut ops = Vec::with_capacity(2);
        if let Some(Some(value)) = self.evtsel.get(socket as usize) {
            ops.push(MsrOp::Write { msr: IA32_QM_EVTSEL, value: *value });
        }
        ops.push(MsrOp::Read { msr });
        self.perform(socket, route, ops)?.ok_or(PlatformError::SocketUnreachable {
            socket,
            reason: String::from("the CPU's job answered without a value"),
        })
    }
}

/// Each CPU of the SMP table with the package it recorded at start-up.
pub fn cpu_views() -> Vec<super::topology::CpuView> {
    crate::smp::cpus()
        .iter()
        .map(|s| super::topology::CpuView {
            apic_id: s.apic_id,
            package: s.package(),
            takes_jobs: s.state() == crate::smp::CpuState::Started,
        })
        .collect()
}

/// The machine's sockets, from the SMP table as it stands (after boot's jobs).
pub fn socket_map() -> SocketMap {
    SocketMap::new(&cpu_views())
}

/// Reach each socket the boot CPU is not in the way [`SocketMsrs`] does (its first
/// CPU that takes jobs, by `smp::run_on` with [`JOB_TIMEOUT_MS`]), with a job that
/// decodes that CPU's package instead of touching an MSR: one line per socket, saying
/// which CPU answered from which package, or why the socket cannot be reached.
#[cfg(not(test))]
pub fn probe_sockets() -> Vec<String> {
    let map = socket_map();
    let here = RealCpus.here();
    let mut out = Vec::new();
    for (i, socket) in map.sockets().iter().enumerate() {
        let name = alloc::format!("SMP socket {i} (package {})", socket.package);
        let cpu = match map.route(i as u32, here, &[]) {
            Ok(Route::Here) => continue,
            Ok(Route::On(cpu)) => cpu,
            Err(RouteError::Unreachable(why)) => {
                out.push(alloc::format!("{name} unreachable: {why}"));
                continue;
            }
            Err(RouteError::NoSuchSocket) => continue,
        };
        let Some(slot) = crate::smp::cpus().iter().find(|s| s.apic_id == cpu) else { continue };
        let cell = alloc::sync::Arc::new(spin::Mutex::new(None::<u32>));
        let put = cell.clone();
        let start = crate::drivers::time::now_ticks();
        let answer = crate::smp::run_on(
            slot,
            alloc::boxed::Box::new(move |_kept| {
                *put.lock() = Some(super::topology::CpuTopology::this_cpu().package);
                Ok(String::new())
            }),
            JOB_TIMEOUT_MS,
        );
        let us = crate::drivers::time::ms_to_ticks(1)
            .map_or(0, |per_ms| crate::drivers::time::now_ticks().wrapping_sub(start) * 1000 / per_ms.max(1));
        let got = *cell.lock();
        out.push(match (answer, got) {
            (Ok(_), Some(p)) if p == socket.package => {
                alloc::format!("{name} reached: a job on CPU apic={cpu} answered in {us} µs from package {p}")
            }
            (Ok(_), Some(p)) => alloc::format!("{name} NOT reached: CPU apic={cpu} reports package {p}"),
            (Ok(_), None) => alloc::format!("{name} NOT reached: CPU apic={cpu} answered another job"),
            (Err(why), _) => alloc::format!("{name} NOT reached: CPU apic={cpu}: {why}"),
        });
    }
    out
}

/// Host tests have no other CPUs.
#[cfg(test)]
pub fn probe_sockets() -> Vec<String> {
    Vec::new()
}

/// The MSR access the monitoring service uses on this machine.
pub fn socket_msrs() -> SocketMsrs<RealCpus> {
    SocketMsrs::new(socket_map(), RealCpus)
}

/// What the boot command line says about monitoring: `monitor=off` turns it off,
/// `rmid-cap=N` uses at most N RMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootOptions {
    /// `monitor=off`.
    pub off: bool,
    /// `rmid-cap=N`.
    pub rmid_cap: Option<u32>,
}

impl BootOptions {
    /// Parse the words of the command line; unknown words are someone else's.
    pub fn parse(cmdline: &str) -> Self {
        let mut o = Self::default();
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("monitor", "off")) => o.off = true,
                Some(("rmid-cap", n)) => o.rmid_cap = n.parse().ok(),
                _ => {}
            }
        }
        o
    }
}

static OPTIONS: spin::Once<BootOptions> = spin::Once::new();

/// Record the boot options (once, at boot).
pub fn set_boot_options(o: BootOptions) {
    OPTIONS.call_once(|| o);
}

/// The monitoring service for this machine: capabilities from CPUID (leaf 7, 0xF,
/// cache leaves), one L3 monitoring domain per socket of `sockets`, the TSC frequency
/// for rates.
pub fn monitor_service(sockets: &SocketMap) -> monitor_svc::MonitorService {
    let options = OPTIONS.get().copied().unwrap_or_default();
    let caps = if options.off {
        monitor_svc::caps::MonitorCaps::Absent {
            reason: "monitoring is turned off on the boot command line (monitor=off)",
        }
    } else {
        monitor_svc::caps::MonitorCaps::from_cpuid(
            |leaf, sub| crate::platform::hw::HwRead::cpuid(&mut crate::platform::hw::RealHw, leaf, sub),
            &monitor_svc::caps::MonitorConfig { rmid_cap: options.rmid_cap, limbo_threshold_bytes: None },
        )
    };
    if let monitor_svc::caps::MonitorCaps::Present(c) = &caps {
        PRESENT.store(true, core::sync::atomic::Ordering::Relaxed);
        log::info!("RDT monitoring: {} usable RMIDs on each of {} socket(s)", c.usable_rmids, sockets.len().max(1));
    }
    let timing = monitor_svc::monitor::Timing {
        tsc_hz: crate::drivers::time::tsc_hz().unwrap_or(0),
        max_bytes_per_sec: monitor_svc::monitor::DEFAULT_MAX_BYTES_PER_SEC,
    };
    let socket_cpus = sockets.sockets().iter().map(|s| s.cpus.clone()).collect();
    monitor_svc::MonitorService::with_socket_cpus(caps, socket_cpus, timing)
}

/// Whether RMIDs are in use at all (only then is IA32_PQR_ASSOC written).
static PRESENT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// What to write to IA32_PQR_ASSOC to run with `wanted`, if it differs from `current`.
pub fn pqr_update(current: u32, wanted: u32) -> Option<u64> {
    (current != wanted).then(|| monitor_svc::platform::pqr_assoc_value(wanted, 0))
}

/// Tag this CPU's memory traffic with `rmid` before entering a vCPU (SDM Vol. 3B
/// 18.18.4: IA32_PQR_ASSOC bits 9:0), writing the MSR only when the value changes.
/// RMID 0 means "not monitored".
pub fn switch_rmid(rmid: u32) {
    if !PRESENT.load(core::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let cpu = crate::percpu::this();
    let current = cpu.current_rmid();
    if let Some(value) = pqr_update(current, rmid) {
        // SAFETY: IA32_PQR_ASSOC exists when CPUID reports RDT monitoring (PRESENT);
        // changing the RMID only changes how this CPU's cache fills are accounted.
        unsafe { x86::msr::wrmsr(monitor_svc::platform::IA32_PQR_ASSOC, value) };
        cpu.set_current_rmid(rmid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pqr_assoc_is_written_only_on_change() {
        assert_eq!(pqr_update(0, 0), None);
        assert_eq!(pqr_update(0, 7), Some(7));
        assert_eq!(pqr_update(7, 7), None);
        assert_eq!(pqr_update(7, 0), Some(0), "detach returns the CPU to RMID 0");
    }

    use crate::platform::topology::CpuView;
    use alloc::string::ToString;
    use monitor_svc::platform::{HwEvent, IA32_PQR_ASSOC, IA32_QM_CTR, evtsel_value, read_qm_ctr};

    /// CPUs that record which CPU performed what, and answer a read with
    /// `0x1000 * apic_id + EVTSEL value` (so a read on the wrong CPU or with the
    /// wrong selection shows in the value). CPUs in `dead` time out.
    struct FakeCpus {
        here: u32,
        dead: Vec<u32>,
        evtsel: std::collections::BTreeMap<u32, u64>,
        log: Vec<(u32, MsrOp)>,
    }

    impl FakeCpus {
        fn new(here: u32, dead: &[u32]) -> Self {
            Self { here, dead: dead.to_vec(), evtsel: Default::default(), log: Vec::new() }
        }

        fn on(&mut self, cpu: u32, ops: &[MsrOp]) -> Option<u64> {
            let mut last = None;
            for op in ops {
                self.log.push((cpu, *op));
                match *op {
                    MsrOp::Write { msr: IA32_QM_EVTSEL, value } => {
                        self.evtsel.insert(cpu, value);
                    }
                    MsrOp::Write { .. } => {}
                    MsrOp::Read { .. } => last = Some(0x1000 * u64::from(cpu) + self.evtsel.get(&cpu).unwrap_or(&0)),
                }
            }
            last
        }
    }

    impl Cpus for FakeCpus {
        fn here(&self) -> u32 {
            self.here
        }
        fn run_here(&mut self, ops: &[MsrOp]) -> Result<Option<u64>, String> {
            Ok(self.on(self.here, ops))
        }
        fn run_on(&mut self, apic_id: u32, ops: Vec<MsrOp>) -> Result<Option<u64>, String> {
            if self.dead.contains(&apic_id) {
                return Err(alloc::format!("CPU apic={apic_id}: it did not answer within 200 ms"));
            }
            Ok(self.on(apic_id, &ops))
        }
    }

    /// The boot CPU 0 and AP 1 in package 0, APs 2 and 3 in package 1, AP 4 (failed) in package 2.
    fn map() -> SocketMap {
        let c = |apic_id, package, takes_jobs| CpuView { apic_id, package: Some(package), takes_jobs };
        SocketMap::new(&[c(0, 0, false), c(1, 0, true), c(2, 1, true), c(3, 1, true), c(4, 2, false)])
    }

    #[test]
    fn socket_0_is_read_here_and_socket_1_on_its_first_cpu() {
        let mut m = SocketMsrs::new(map(), FakeCpus::new(0, &[]));
        let sel = evtsel_value(HwEvent::LlcOccupancy, 5);
        assert_eq!(read_qm_ctr(&mut m, 0, HwEvent::LlcOccupancy, 5), Ok(sel));
        assert_eq!(read_qm_ctr(&mut m, 1, HwEvent::LlcOccupancy, 5), Ok(0x2000 + sel));
        // The EVTSEL write went with the read, on the same CPU, in one job.
        assert_eq!(
            m.cpus.log,
            [
                (0, MsrOp::Write { msr: IA32_QM_EVTSEL, value: sel }),
                (0, MsrOp::Read { msr: IA32_QM_CTR }),
                (2, MsrOp::Write { msr: IA32_QM_EVTSEL, value: sel }),
                (2, MsrOp::Read { msr: IA32_QM_CTR }),
            ]
        );
        // PQR_ASSOC is written at once, on the socket's CPU.
        m.write_msr(1, IA32_PQR_ASSOC, 7).unwrap();
        assert_eq!(m.cpus.log.last(), Some(&(2, MsrOp::Write { msr: IA32_PQR_ASSOC, value: 7 })));
    }

    #[test]
    fn a_silent_cpu_hands_over_to_the_next_and_keeps_the_selection() {
        let mut m = SocketMsrs::new(map(), FakeCpus::new(0, &[2]));
        let sel = evtsel_value(HwEvent::MbmTotal, 3);
        match read_qm_ctr(&mut m, 1, HwEvent::MbmTotal, 3) {
            Err(PlatformError::SocketUnreachable { socket: 1, reason }) => {
                assert!(reason.contains("apic=2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Not asked again: CPU 3 of the same socket does it, selection replayed there.
        assert_eq!(m.read_msr(1, IA32_QM_CTR), Ok(0x3000 + sel));
        assert!(m.cpus.log.iter().all(|(cpu, _)| *cpu == 3));
    }

    #[test]
    fn never_an_answer_from_another_socket() {
        // Both CPUs of socket 1 silent: an error, not CPU 0's or 1's value.
        let mut m = SocketMsrs::new(map(), FakeCpus::new(0, &[2, 3]));
        assert!(matches!(m.read_msr(1, IA32_QM_CTR), Err(PlatformError::SocketUnreachable { socket: 1, .. })));
        assert!(matches!(m.read_msr(1, IA32_QM_CTR), Err(PlatformError::SocketUnreachable { socket: 1, .. })));
        // Socket 2's only CPU failed at boot; socket 3 does not exist.
        match m.read_msr(2, IA32_QM_CTR) {
            Err(e @ PlatformError::SocketUnreachable { socket: 2, .. }) => {
                assert!(e.to_string().contains("APIC 4"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.read_msr(3, IA32_QM_CTR), Err(PlatformError::NoSuchSocket { socket: 3 }));
        assert!(m.cpus.log.is_empty(), "nothing ran anywhere: {:?}", m.cpus.log);
    }

    #[test]
    fn only_allow_listed_msrs_and_from_an_ap_its_own_socket_here() {
        let mut m = SocketMsrs::new(map(), FakeCpus::new(3, &[]));
        assert_eq!(m.read_msr(0, 0x10), Err(PlatformError::NotAllowed { msr: 0x10 }));
        assert_eq!(m.write_msr(1, 0x1b, 0), Err(PlatformError::NotAllowed { msr: 0x1b }));
        assert_eq!(m.read_msr(1, IA32_QM_CTR), Ok(0x3000));
        assert_eq!(m.read_msr(0, IA32_QM_CTR), Ok(0x1000), "socket 0 from AP 3: on AP 1, not the boot CPU");
    }

    #[test]
    fn boot_options() {
        assert_eq!(BootOptions::parse("cpuid-dump monitor=off"), BootOptions { off: true, rmid_cap: None });
        assert_eq!(BootOptions::parse("rmid-cap=8"), BootOptions { off: false, rmid_cap: Some(8) });
        assert_eq!(BootOptions::parse(""), BootOptions::default());
    }
}
