//! The core's side of live migration: [`migration_svc::MigrationCore`] on the
//! [`Machine`], so the migration service can read and write guest pages, take dirty
//! bits, pause, throttle, save and load vCPU state, create the destination's domain and
//! check a CPUID policy against this host, without holding any of it itself.
//!
//! A vCPU's state travels as one byte of run state (0 runnable, 1 halted) followed by
//! the arch-neutral [`VcpuSnapshot`] encoding, so a domain saved on SVM loads on VMX.
//!
//! The rest of the machine (stream version 2) travels as [`MachineState`]:
//!
//! | record | what the source reads | what the destination does |
//! |---|---|---|
//! | guest clock | the domain's TSC (host TSC + its offset) and guest-ns clock, at pause | [`rebase_clock`]: guest time and the domain's TSC continue from there |
//! | vCPU FPU | XCR0 and the XSAVE (or FXSAVE) area ([`GuestFpu::export`](crate::arch::fpu::GuestFpu::export)) | [`GuestFpu::import`](crate::arch::fpu::GuestFpu::import): refused if it needs components this host or the policy lacks |
//! | vCPU MSRs | IA32_TSC, TSC_AUX (if offered), the stored [`MsrState`](super::exit::msr::MsrState) MSRs (MTRRs, MCG_STATUS, MISC_ENABLE, NB_CFG) | TSC: [`vcpu_tsc_offset`]; the rest validated as the guest's WRMSR; an MSR not virtualized here is refused |
//! | device states | every bus model ([`DeviceBus::save_at`](crate::devices::bus::DeviceBus::save_at): UART with FIFOs, debug exit, PIT, RTC, PM), the I/O APIC and 8259 pair, each vCPU's LAPIC (IRR/ISR/TMR, timer as time left) | each loaded into its model, timers re-based on the continued guest clock; a missing or unknown state is refused |
//! | console ring | the ring and its byte count | the console continues |
//!
//! PAT, EFER, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, SYSENTER_* and FS/GS base are in
//! the [`VcpuSnapshot`]; IA32_APIC_BASE and IA32_TSC_DEADLINE are in the LAPIC's state;
//! HWCR, MTRRcap and the other constants need not travel.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use migration_svc::{DomainInfo, MachineState, MigrationCore, PolicyCheck, StateRecord};
use wire::dirty::DirtyBitmap;
use wire::migration::{
    ConsoleRing, DeviceEntry, DeviceStates, GuestClock, MemoryDigest, StreamHeader, VcpuFpu, VcpuMsrs,
};

use super::dirty::MAIN;
use super::exit::msr::{self, Home, MSR_TSC, MSR_TSC_AUX, MsrRestoreError};
use super::{Console, Domain, DomainState, Machine, RunState, VcpuSlot, config};
use crate::arch::state::VcpuSnapshot;
use crate::arch::{Backend, GuestEntry, GuestMsr, GuestRegs, Vcpu};
use crate::devices::{DeviceKind, DeviceState};
use crate::drivers::console::HeldOutput;
use crate::mm::PAGE_SIZE;
use crate::mm::guest::GuestMemory;

const PAGE: usize = PAGE_SIZE as usize;

fn text(e: impl core::fmt::Display) -> String {
    alloc::format!("{e}")
}

/// An incoming domain's clocks, continued from the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebased {
    /// [`Domain`]'s `started_ns`: this host's uptime at guest time 0 (mod 2^64).
    pub started_ns: u64,
    /// The domain's TSC offset.
    pub tsc_offset: u64,
}

/// Continue the source's guest `clock` at pause on this host, whose uptime is
/// `uptime_ns` and TSC `host_tsc` now: from now the guest's device clock reads
/// `clock.ns` plus the time since, and its TSC `clock.tsc` plus the ticks since. The
/// guest never sees either go back, and sees the time between the source's pause and
/// this moment not at all (it is at most the downtime). Wrapping arithmetic: the guest
/// may have run longer than this hypervisor has.
pub fn rebase_clock(clock: &GuestClock, uptime_ns: u64, host_tsc: u64) -> Rebased {
    Rebased { started_ns: uptime_ns.wrapping_sub(clock.ns), tsc_offset: clock.tsc.wrapping_sub(host_tsc) }
}

/// A vCPU's TSC offset on the destination: at the source's pause its TSC read
/// `vcpu_tsc` while the domain's read `clock_tsc` (they differ once the guest wrote
/// IA32_TSC); it keeps that distance from the domain's new offset.
pub fn vcpu_tsc_offset(domain_offset: u64, clock_tsc: u64, vcpu_tsc: u64) -> u64 {
    domain_offset.wrapping_add(vcpu_tsc.wrapping_sub(clock_tsc))
}

/// The state of (`kind`, `instance`) in `list`, marked used; refused when absent.
fn take_state(list: &DeviceStates, used: &mut [bool], kind: DeviceKind, instance: u32) -> Result<DeviceState, String> {
    let found = list.devices.iter().position(|e| e.kind == kind as u16 && e.instance == instance);
    match found.and_then(|i| Some((list.devices.get(i)?, used.get_mut(i)?))) {
        Some((e, u)) => {
            *u = true;
            Ok(DeviceState { kind, version: e.version, bytes: e.bytes.clone() })
        }
        None => {
            Err(alloc::format!("the stream carries no {kind:?} state (instance {instance}); this hypervisor needs one"))
        }
    }
}

/// This host's clocks at one moment (passed in, so host tests can choose them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostClock {
    /// Uptime, ns.
    pub uptime_ns: u64,
    /// The TSC.
    pub tsc: u64,
    /// The TSC's frequency, Hz.
    pub tsc_hz: u64,
}

impl HostClock {
    /// Now, or why there is no calibrated clock.
    fn now() -> Result<Self, String> {
        let hz = crate::drivers::time::tsc_hz().ok_or("this hypervisor's TSC is not calibrated")?;
        let uptime_ns = crate::drivers::time::uptime_ns().ok_or("this hypervisor's clock is not calibrated")?;
        Ok(Self { uptime_ns, tsc: crate::drivers::time::now_ticks(), tsc_hz: hz })
    }
}

fn entry(state: DeviceState, instance: u32) -> DeviceEntry {
    DeviceEntry { kind: state.kind as u16, instance, version: state.version, bytes: state.bytes }
}

impl<B: Backend> Machine<B> {
    /// Domain `id`'s cell (lock it to use the domain).
    fn migrating(&self, id: u32) -> Result<super::DomainRef<B>, String> {
        self.cell(id).map_err(text)
    }

    /// Run `f` over the memory of domain `id` and the pool it lives in (both locked).
    fn with_memory<R>(
        &self,
        id: u32,
        f: impl FnOnce(&GuestMemory<B::Paging>, &mut crate::mm::frames::FramePool) -> Result<R, String>,
    ) -> Result<R, String> {
        self.with_domain_and_pool(id, |d, pool| {
            let mem =
                d.mem.as_ref().ok_or_else(|| alloc::format!("domain {id} has no memory any more ({})", d.state))?;
            f(mem, pool)
        })
        .map_err(text)?
    }
}

impl<B: Backend> Machine<B> {
    /// [`MigrationCore::machine_state`] with this host's clocks at `host`.
    pub fn machine_state_at(&mut self, domain: u32, host: HostClock) -> Result<MachineState, String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        // Messages the I/O APIC queued reach their LAPICs first (the queue is not state).
        d.route_messages();
        let now = host.uptime_ns.wrapping_sub(d.started_ns);
        let clock = GuestClock { tsc: host.tsc.wrapping_add(d.tsc_offset), ns: now, tsc_hz: host.tsc_hz };
        let host = host.tsc;
        let env = msr::env_of(&d.policy);
        let tsc_aux = msr::home(MSR_TSC_AUX, &env).is_some();
        let mut fpus = Vec::with_capacity(d.vcpus.len());
        let mut msrs = Vec::with_capacity(d.vcpus.len());
        for slot in d.vcpus.iter_mut() {
            let index = slot.index;
            let fpu = slot.vcpu.fpu();
            fpus.push(VcpuFpu { index, xcr0: fpu.xcr0(), area: fpu.export().to_vec() });
            let mut list = slot.msrs.saved(&env);
            list.push((MSR_TSC, host.wrapping_add(slot.vcpu.tsc_offset())));
            if tsc_aux {
                let v =
                    slot.vcpu.read_msr(GuestMsr::TscAux).map_err(|e| alloc::format!("vCPU {index}: TSC_AUX: {e}"))?;
                list.push((MSR_TSC_AUX, v));
            }
            list.sort_unstable_by_key(|&(m, _)| m);
            msrs.push(VcpuMsrs { index, msrs: list });
        }
        let mut devices = Vec::new();
        for state in d.devices.save_at(now) {
            let instance = devices.iter().filter(|e: &&DeviceEntry| e.kind == state.kind as u16).count() as u32;
            devices.push(entry(state, instance));
        }
        let [ioapic, pic] = d.irq.save();
        devices.push(entry(ioapic, 0));
        devices.push(entry(pic, 0));
        for slot in &d.vcpus {
            devices.push(entry(slot.lapic.save_at(now), slot.index));
        }
        let console = ConsoleRing { total_bytes: d.console.bytes, ring: d.console.contents() };
        Ok(MachineState { clock, fpus, msrs, devices: DeviceStates { devices }, console: Some(console) })
    }
}

impl<B: Backend> Machine<B> {
    /// [`MigrationCore::load_machine_state`] with this host's clocks at `host`.
    pub fn load_machine_state_at(&mut self, domain: u32, record: &StateRecord, host: HostClock) -> Result<(), String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        let id = d.id;
        match record {
            StateRecord::Clock(clock) => {
                let r = rebase_clock(clock, host.uptime_ns, host.tsc);
                d.started_ns = r.started_ns;
                d.tsc_offset = r.tsc_offset;
                d.migrated_clock = Some(*clock);
                for slot in d.vcpus.iter_mut() {
                    slot.vcpu.set_tsc_offset(r.tsc_offset).map_err(|e| alloc::format!("vCPU {}: {e}", slot.index))?;
                }
                let here = host.tsc_hz;
                if here.abs_diff(clock.tsc_hz) > clock.tsc_hz / 100 {
                    // Not refused: the guest's TSC continues, only its rate is this host's.
                    crate::println!(
                        "DOMAIN {id} CLOCK the source's TSC ran at {} Hz, this host's runs at {here} Hz",
                        clock.tsc_hz
                    );
                }
            }
            StateRecord::Fpu(f) => {
                let policy = d.cpuid.lookup(0xd, 0);
                let allowed = u64::from(policy[0]) | (u64::from(policy[3]) << 32);
                let slot = d.vcpus.get_mut(f.index as usize).ok_or_else(|| alloc::format!("no vCPU {}", f.index))?;
                slot.vcpu
                    .fpu_mut()
                    .import(f.xcr0, &f.area, allowed)
                    .map_err(|e| alloc::format!("vCPU {}: cannot restore its FPU state: {e}", f.index))?;
            }
            StateRecord::Msrs(m) => {
                let clock = d.migrated_clock.ok_or("vCPU MSRs arrived before the guest clock")?;
                let env = msr::env_of(&d.policy);
                let base = d.tsc_offset;
                let slot = d.vcpus.get_mut(m.index as usize).ok_or_else(|| alloc::format!("no vCPU {}", m.index))?;
                let fail = |e: MsrRestoreError| alloc::format!("vCPU {}: cannot restore its MSRs: {e}", m.index);
                for &(index, value) in &m.msrs {
                    match index {
                        MSR_TSC => slot
                            .vcpu
                            .set_tsc_offset(vcpu_tsc_offset(base, clock.tsc, value))
                            .map_err(|e| alloc::format!("vCPU {}: IA32_TSC: {e}", m.index))?,
                        MSR_TSC_AUX => {
                            if msr::home(index, &env) != Some(Home::Backend(GuestMsr::TscAux)) {
                                return Err(fail(MsrRestoreError::NotVirtualized(index)));
                            }
                            if value >> 32 != 0 {
                                return Err(fail(MsrRestoreError::BadValue(index, value)));
                            }
                            slot.vcpu
                                .write_msr(GuestMsr::TscAux, value)
                                .map_err(|e| alloc::format!("vCPU {}: TSC_AUX: {e}", m.index))?;
                        }
                        other => slot.msrs.restore(other, value, &env).map_err(fail)?,
                    }
                }
            }
            StateRecord::Devices(list) => {
                let now = host.uptime_ns.wrapping_sub(d.started_ns);
                let mut used = vec![false; list.devices.len()];
                let mut states = Vec::new();
                let kinds = d.devices.kinds();
                for (i, &kind) in kinds.iter().enumerate() {
                    let instance = kinds.iter().take(i).filter(|&&k| k == kind).count() as u32;
                    states.push(take_state(list, &mut used, kind, instance)?);
                }
                let ioapic = take_state(list, &mut used, DeviceKind::IoApic, 0)?;
                let pic = take_state(list, &mut used, DeviceKind::Pic, 0)?;
                let mut lapics = Vec::with_capacity(d.vcpus.len());
                for slot in &d.vcpus {
                    lapics.push(take_state(list, &mut used, DeviceKind::Lapic, slot.index)?);
                }
                if let Some(e) = list.devices.iter().zip(&used).find_map(|(e, u)| (!u).then_some(e)) {
                    let name = DeviceKind::from_code(e.kind)
                        .map_or(alloc::format!("unknown kind {}", e.kind), |k| alloc::format!("{k:?}"));
                    return Err(alloc::format!(
                        "the stream carries a {name} state (instance {}) this hypervisor has no model for",
                        e.instance
                    ));
                }
                d.devices.load_at(&states, now).map_err(|e| alloc::format!("device state: {e}"))?;
                d.irq.load(&ioapic, &pic).map_err(|e| alloc::format!("interrupt controllers: {e}"))?;
                for (slot, state) in d.vcpus.iter_mut().zip(&lapics) {
                    slot.lapic.load_at(state, now).map_err(|e| alloc::format!("vCPU {} LAPIC: {e}", slot.index))?;
                }
                d.route_messages();
            }
            StateRecord::Console(c) => d.console.restore(c.total_bytes, &c.ring),
        }
        Ok(())
    }
}

impl<B: Backend> MigrationCore for Machine<B> {
    fn now_ns(&self) -> Option<u64> {
        crate::drivers::time::uptime_ns()
    }

    fn domain_info(&mut self, domain: u32) -> Result<DomainInfo, String> {
        let featureset = self.host.max().set.words().to_vec();
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let d = cell.lock();
        match d.state {
            DomainState::Running | DomainState::Paused => {}
            ref s => return Err(alloc::format!("domain {domain} is {s}; only a running or paused domain migrates")),
        }
        let policy = d.policy.to_postcard().map_err(|e| alloc::format!("cannot encode the CPUID policy: {e}"))?;
        Ok(DomainInfo {
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
            vcpus: d.vcpu_count,
            cmdline: d.cmdline.clone(),
            featureset,
            policy,
            log_dirty_active: d.logs[MAIN].is_some(),
        })
    }

    fn start_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        self.dirty_start(domain, None, None).map(|_| ()).map_err(text)
    }

    fn stop_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        self.dirty_stop(domain).map(|_| ()).map_err(text)
    }

    fn peek_and_clean(&mut self, domain: u32) -> Result<DirtyBitmap, String> {
        self.dirty_peek_clean(domain, None).map_err(text)
    }

    fn merge_back(&mut self, domain: u32, bits: &DirtyBitmap) -> Result<(), String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        let log =
            d.logs[MAIN].as_mut().ok_or("log-dirty is not running, so there is no log to give the bits back to")?;
        // The pages were re-armed when they were taken, so their next write is logged
        // anyway; the bits come back as they were.
        log.bitmap.or_merge(bits).map_err(text)
    }

    fn read_page(&mut self, domain: u32, pfn: u64, out: &mut [u8]) -> Result<(), String> {
        self.with_memory(domain, |mem, pool| {
            mem.read(pool, pfn * PAGE_SIZE, out).map_err(|e| alloc::format!("reading page {pfn:#x}: {e}"))
        })
    }

    fn set_paused(&mut self, domain: u32, paused: bool) -> Result<(), String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        d.state = match (&d.state, paused) {
            (DomainState::Running | DomainState::Paused, true) => DomainState::Paused,
            (DomainState::Running | DomainState::Paused, false) => DomainState::Running,
            (s, _) => return Err(alloc::format!("domain {domain} is {s}")),
        };
        Ok(())
    }

    fn throttle(&mut self, domain: u32, percent: u8) -> Result<(), String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        d.throttle = percent.min(99);
        d.throttle_until = 0;
        crate::println!("DOMAIN {domain} THROTTLE {}%", d.throttle);
        Ok(())
    }

    fn vcpu_states(&mut self, domain: u32) -> Result<Vec<Vec<u8>>, String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        let mut out = Vec::with_capacity(d.vcpus.len());
        let signature = d.processor_signature();
        for slot in d.vcpus.iter_mut() {
            // A start-up IPI that arrived is carried out first: the stream has no
            // state for "started, not yet run".
            super::sched::start_on_sipi(slot, signature).map_err(|e| alloc::format!("vCPU {}: {e}", slot.index))?;
            let snapshot = slot.vcpu.save_state(&slot.regs).map_err(|e| alloc::format!("vCPU {}: {e}", slot.index))?;
            let mut blob = vec![match slot.state {
                RunState::Runnable => 0,
                RunState::Halted => 1,
                RunState::WaitForSipi => 2,
                // Started just above.
                RunState::StartUp(_) => 0,
            }];
            blob.extend_from_slice(&snapshot.encode());
            out.push(blob);
        }
        Ok(out)
    }

    fn machine_state(&mut self, domain: u32) -> Result<MachineState, String> {
        let clock = HostClock::now()?;
        self.machine_state_at(domain, clock)
    }

    fn memory_digest(&mut self, domain: u32) -> Result<MemoryDigest, String> {
        self.with_memory(domain, |mem, pool| {
            let pages = mem.bytes() / PAGE_SIZE;
            let mut page = vec![0u8; PAGE];
            let mut digest = MemoryDigest::new();
            for pfn in 0..pages {
                mem.read(pool, pfn * PAGE_SIZE, &mut page).map_err(|e| alloc::format!("reading page {pfn:#x}: {e}"))?;
                digest.add_page(&page);
            }
            Ok(digest)
        })
    }

    fn destroy(&mut self, domain: u32) -> Result<(), String> {
        Machine::destroy(self, domain).map_err(text)
    }

    fn policy_check(&mut self) -> PolicyCheck {
        let host = self.host.clone();
        Box::new(move |bytes: &[u8]| {
            let policy = levelling::Policy::from_postcard(bytes)
                .map_err(|e| alloc::format!("the CPUID policy does not decode: {e}"))?;
            policy.verify(&host).map_err(|e| alloc::format!("this host cannot run the domain's CPUID policy: {e}"))
        })
    }

    fn create_domain(&mut self, header: &StreamHeader) -> Result<u32, String> {
        let cfg = config::DomainConfig {
            name: header.name.clone(),
            kernel: String::from("(migrated)"),
            initrd: None,
            memory: header.memory_bytes,
            vcpus: header.vcpus,
            cpuid: None,
            cmdline: header.cmdline.clone(),
            // Pinning is the destination host's business (its CPUs differ).
            cpus: None,
        };
        config::validate(&cfg)?;
        if self.name_taken(&cfg.name, self.incoming_name_of) {
            return Err(alloc::format!("a domain named `{}` exists here", cfg.name));
        }
        // A stand-in CPUID view until the stream's policy is accepted (the domain
        // does not run before that).
        let (policy, cpuid) = self.cpuid_table(None, cfg.vcpus).map_err(text)?;
        let devices = super::new_devices().map_err(text)?;
        let shared = self.shared();
        let _held = HeldOutput::new();
        let mut pool = shared.lock_pool();
        let mem = GuestMemory::<B::Paging>::new(&mut pool, cfg.memory, self.large_pages).map_err(text)?;
        let id = self.next_id;
        let root = mem.root();
        // Rebased on the source's clock by the stream's guest-clock record.
        let (started_ns, tsc_offset) = super::new_clock();
        let mut domain = Domain {
            id,
            name: cfg.name.clone(),
            state: DomainState::Paused,
            memory_bytes: mem.bytes(),
            vcpu_count: cfg.vcpus,
            exits: super::ExitCounts::default(),
            reports: Vec::new(),
            runtime_ticks: 0,
            console: Console::default(),
            mem: Some(mem),
            vcpus: Vec::new(),
            cpuid,
            policy,
            cmdline: cfg.cmdline.clone(),
            throttle: 0,
            throttle_until: 0,
            logs: [None, None],
            devices,
            irq: super::platform::new_router(),
            undelivered_interrupts: 0,
            started_ns,
            tsc_offset,
            migrated_clock: None,
        };
        for index in 0..cfg.vcpus {
            // Every register is loaded from the stream before the domain runs.
            let entry = GuestEntry { nested_root: root, cr3: 0, rip: 0, rsp: 0 };
            // Guest time restarts with the incoming domain (`started_ns`), and so does its TSC.
            let created = self.backend.create_vcpu(&mut pool, &entry).and_then(|mut vcpu| {
                vcpu.set_tsc_offset(domain.base_tsc_offset())?;
                Ok(vcpu)
            });
            match created {
                Ok(vcpu) => domain.vcpus.push(VcpuSlot::new(vcpu, GuestRegs::default(), index)),
                Err(e) => {
                    domain.release(&mut pool).map_err(text)?;
                    return Err(text(e));
                }
            }
        }
        drop(pool);
        self.next_id += 1;
        crate::println!(
            "DOMAIN {id} INCOMING name={} memory={}M vcpus={}",
            cfg.name,
            domain.memory_bytes >> 20,
            cfg.vcpus
        );
        self.publish(domain, None);
        Ok(id)
    }

    fn set_policy(&mut self, domain: u32, policy: &[u8]) -> Result<(), String> {
        let policy = levelling::Policy::from_postcard(policy)
            .map_err(|e| alloc::format!("the CPUID policy does not decode: {e}"))?;
        let table = levelling::CpuidTable::build(&policy, &self.host).map_err(text)?;
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        d.cpuid = table;
        d.policy = policy;
        Ok(())
    }

    fn write_page(&mut self, domain: u32, pfn: u64, data: Option<&[u8]>) -> Result<(), String> {
        const ZERO: [u8; PAGE] = [0; PAGE];
        self.with_memory(domain, |mem, pool| {
            mem.write(pool, pfn * PAGE_SIZE, data.unwrap_or(&ZERO))
                .map_err(|e| alloc::format!("writing page {pfn:#x}: {e}"))
        })
    }

    fn set_vcpu_state(&mut self, domain: u32, index: u32, state: &[u8]) -> Result<(), String> {
        let cell = self.migrating(domain)?;
        let _held = HeldOutput::new();
        let mut d = cell.lock();
        let slot = d.vcpus.get_mut(index as usize).ok_or_else(|| alloc::format!("no vCPU {index}"))?;
        let (run, snapshot) = match state.split_first() {
            Some((0, rest)) => (RunState::Runnable, rest),
            Some((1, rest)) => (RunState::Halted, rest),
            Some((2, rest)) => (RunState::WaitForSipi, rest),
            Some((b, _)) => return Err(alloc::format!("vCPU {index}: unknown run state {b}")),
            None => return Err(alloc::format!("vCPU {index}: empty state")),
        };
        let snapshot = VcpuSnapshot::decode(snapshot).map_err(|e| alloc::format!("vCPU {index}: {e}"))?;
        slot.vcpu.load_state(&mut slot.regs, &snapshot).map_err(|e| alloc::format!("vCPU {index}: {e}"))?;
        slot.state = run;
        Ok(())
    }

    fn load_machine_state(&mut self, domain: u32, record: &StateRecord) -> Result<(), String> {
        let clock = HostClock::now()?;
        self.load_machine_state_at(domain, record, clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOCK: GuestClock = GuestClock { tsc: 50_000_000_000, ns: 25_000_000_000, tsc_hz: 2_000_000_000 };

    /// The guest's TSC and device clock on the destination, `ticks` and `ns` after
    /// the rebase at (`uptime`, `host_tsc`).
    fn guest_after(r: &Rebased, uptime: u64, host_tsc: u64, ns: u64, ticks: u64) -> (u64, u64) {
        (host_tsc.wrapping_add(ticks).wrapping_add(r.tsc_offset), uptime.wrapping_add(ns).wrapping_sub(r.started_ns))
    }

    #[test]
    fn the_guest_clock_continues_where_it_paused() {
        // A destination that booted long after the guest did (uptime < guest time), and
        // one whose TSC is far ahead (offset wraps).
        for (uptime, host_tsc) in [(3_000_000_000u64, 7_000_000u64), (900_000_000_000, u64::MAX - 5), (0, 0)] {
            let r = rebase_clock(&CLOCK, uptime, host_tsc);
            assert_eq!(guest_after(&r, uptime, host_tsc, 0, 0), (CLOCK.tsc, CLOCK.ns), "at the rebase");
            let mut last = (CLOCK.tsc, CLOCK.ns);
            for step in [1u64, 1_000, 2_000_000_000] {
                let now = guest_after(&r, uptime, host_tsc, step, 2 * step);
                assert!(now.0 > last.0 && now.1 > last.1, "never backwards: {now:?} after {last:?}");
                assert_eq!(now, (CLOCK.tsc + 2 * step, CLOCK.ns + step), "only the time since the rebase goes by");
                last = now;
            }
        }
    }

    #[test]
    fn a_vcpu_keeps_its_distance_from_the_domain_tsc() {
        let r = rebase_clock(&CLOCK, 1_000, 9_999);
        // The guest moved this vCPU's TSC back by 1e9 (or forward): it stays so.
        for vcpu_tsc in [CLOCK.tsc - 1_000_000_000, CLOCK.tsc, CLOCK.tsc + 77, 5] {
            let offset = vcpu_tsc_offset(r.tsc_offset, CLOCK.tsc, vcpu_tsc);
            assert_eq!(9_999u64.wrapping_add(offset), vcpu_tsc, "reads its paused value at the rebase");
            assert_eq!(10_099u64.wrapping_add(offset), vcpu_tsc.wrapping_add(100));
        }
    }

    #[test]
    fn device_states_are_found_by_kind_and_instance() {
        let list = DeviceStates {
            devices: vec![
                DeviceEntry { kind: DeviceKind::Lapic as u16, instance: 1, version: 1, bytes: vec![1] },
                DeviceEntry { kind: DeviceKind::Pit as u16, instance: 0, version: 3, bytes: vec![2] },
            ],
        };
        let mut used = [false; 2];
        let s = take_state(&list, &mut used, DeviceKind::Pit, 0).unwrap();
        assert_eq!((s.kind, s.version, s.bytes), (DeviceKind::Pit, 3, vec![2]));
        assert_eq!(used, [false, true]);
        let e = take_state(&list, &mut used, DeviceKind::Lapic, 0).unwrap_err();
        assert!(e.contains("no Lapic state (instance 0)"), "{e}");
        assert!(take_state(&list, &mut used, DeviceKind::Lapic, 1).is_ok());
        assert_eq!(used, [true, true]);
    }
}
