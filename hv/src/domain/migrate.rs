//! The core's side of live migration: [`migration_svc::MigrationCore`] on the
//! [`Machine`], so the migration service can read and write guest pages, take dirty
//! bits, pause, throttle, save and load vCPU state, create the destination's domain and
//! check a CPUID policy against this host, without holding any of it itself.
//!
//! A vCPU's state travels as one byte of run state (0 runnable, 1 halted) followed by
//! the arch-neutral [`VcpuSnapshot`] encoding, so a domain saved on SVM loads on VMX.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use migration_svc::{DomainInfo, MigrationCore, PolicyCheck};
use wire::dirty::DirtyBitmap;
use wire::migration::{MemoryDigest, StreamHeader};

use super::dirty::MAIN;
use super::{Console, Domain, DomainError, DomainState, Machine, RunState, VcpuSlot, config};
use crate::arch::state::VcpuSnapshot;
use crate::arch::{Backend, GuestEntry, GuestRegs, Vcpu};
use crate::mm::PAGE_SIZE;
use crate::mm::guest::GuestMemory;

const PAGE: usize = PAGE_SIZE as usize;

fn text(e: impl core::fmt::Display) -> String {
    alloc::format!("{e}")
}

impl<B: Backend> Machine<B> {
    fn migrating(&mut self, id: u32) -> Result<&mut Domain<B>, String> {
        self.domains.iter_mut().find(|d| d.id == id).ok_or_else(|| text(DomainError::NoSuchDomain(id)))
    }

    /// The memory of domain `id`, with the pool it lives in.
    fn memory(&mut self, id: u32) -> Result<(&GuestMemory<B::Paging>, &mut crate::mm::frames::FramePool), String> {
        let d = self.domains.iter().find(|d| d.id == id).ok_or_else(|| text(DomainError::NoSuchDomain(id)))?;
        let mem = d.mem.as_ref().ok_or_else(|| alloc::format!("domain {id} has no memory any more ({})", d.state))?;
        Ok((mem, &mut self.pool))
    }

    fn page_count(&self, id: u32) -> Result<u64, String> {
        let d = self.domain(id).ok_or_else(|| text(DomainError::NoSuchDomain(id)))?;
        Ok(d.memory_bytes / PAGE_SIZE)
    }
}

impl<B: Backend> MigrationCore for Machine<B> {
    fn now_ns(&self) -> Option<u64> {
        crate::drivers::time::uptime_ns()
    }

    fn domain_info(&mut self, domain: u32) -> Result<DomainInfo, String> {
        let featureset = self.host.max().set.words().to_vec();
        let d = self.migrating(domain)?;
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
        let d = self.migrating(domain)?;
        let log =
            d.logs[MAIN].as_mut().ok_or("log-dirty is not running, so there is no log to give the bits back to")?;
        // The pages were re-armed when they were taken, so their next write is logged
        // anyway; the bits come back as they were.
        log.bitmap.or_merge(bits).map_err(text)
    }

    fn read_page(&mut self, domain: u32, pfn: u64, out: &mut [u8]) -> Result<(), String> {
        let (mem, pool) = self.memory(domain)?;
        mem.read(pool, pfn * PAGE_SIZE, out).map_err(|e| alloc::format!("reading page {pfn:#x}: {e}"))
    }

    fn set_paused(&mut self, domain: u32, paused: bool) -> Result<(), String> {
        let d = self.migrating(domain)?;
        d.state = match (&d.state, paused) {
            (DomainState::Running | DomainState::Paused, true) => DomainState::Paused,
            (DomainState::Running | DomainState::Paused, false) => DomainState::Running,
            (s, _) => return Err(alloc::format!("domain {domain} is {s}")),
        };
        Ok(())
    }

    fn throttle(&mut self, domain: u32, percent: u8) -> Result<(), String> {
        let d = self.migrating(domain)?;
        d.throttle = percent.min(99);
        d.throttle_credit = 0;
        crate::println!("DOMAIN {domain} THROTTLE {}%", d.throttle);
        Ok(())
    }

    fn vcpu_states(&mut self, domain: u32) -> Result<Vec<Vec<u8>>, String> {
        let d = self.migrating(domain)?;
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

    fn memory_digest(&mut self, domain: u32) -> Result<MemoryDigest, String> {
        let pages = self.page_count(domain)?;
        let (mem, pool) = self.memory(domain)?;
        let mut page = vec![0u8; PAGE];
        let mut digest = MemoryDigest::new();
        for pfn in 0..pages {
            mem.read(pool, pfn * PAGE_SIZE, &mut page).map_err(|e| alloc::format!("reading page {pfn:#x}: {e}"))?;
            digest.add_page(&page);
        }
        Ok(digest)
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
        };
        config::validate(&cfg)?;
        if self.domains.iter().any(|d| d.name == cfg.name && Some(d.id) != self.incoming_name_of) {
            return Err(alloc::format!("a domain named `{}` exists here", cfg.name));
        }
        // A stand-in CPUID view until the stream's policy is accepted (the domain
        // does not run before that).
        let (policy, cpuid) = self.cpuid_table(None, cfg.vcpus).map_err(text)?;
        let devices = super::new_devices().map_err(text)?;
        let mem = GuestMemory::<B::Paging>::new(&mut self.pool, cfg.memory, self.large_pages).map_err(text)?;
        let id = self.next_id;
        let root = mem.root();
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
            throttle_credit: 0,
            logs: [None, None],
            devices,
            irq: super::platform::new_router(),
            undelivered_interrupts: 0,
            started_ns: crate::drivers::time::uptime_ns().unwrap_or(0),
        };
        for index in 0..cfg.vcpus {
            // Every register is loaded from the stream before the domain runs.
            let entry = GuestEntry { nested_root: root, cr3: 0, rip: 0, rsp: 0 };
            // Guest time restarts with the incoming domain (`started_ns`), and so does its TSC.
            let created = self.backend.create_vcpu(&mut self.pool, &entry).and_then(|mut vcpu| {
                vcpu.set_tsc_offset(domain.base_tsc_offset())?;
                Ok(vcpu)
            });
            match created {
                Ok(vcpu) => domain.vcpus.push(VcpuSlot::new(vcpu, GuestRegs::default(), index)),
                Err(e) => {
                    domain.release(&mut self.pool).map_err(text)?;
                    return Err(text(e));
                }
            }
        }
        self.next_id += 1;
        crate::println!(
            "DOMAIN {id} INCOMING name={} memory={}M vcpus={}",
            cfg.name,
            domain.memory_bytes >> 20,
            cfg.vcpus
        );
        self.domains.push(domain);
        Ok(id)
    }

    fn set_policy(&mut self, domain: u32, policy: &[u8]) -> Result<(), String> {
        let policy = levelling::Policy::from_postcard(policy)
            .map_err(|e| alloc::format!("the CPUID policy does not decode: {e}"))?;
        let table = levelling::CpuidTable::build(&policy, &self.host).map_err(text)?;
        let d = self.migrating(domain)?;
        d.cpuid = table;
        d.policy = policy;
        Ok(())
    }

    fn write_page(&mut self, domain: u32, pfn: u64, data: Option<&[u8]>) -> Result<(), String> {
        const ZERO: [u8; PAGE] = [0; PAGE];
        let (mem, pool) = self.memory(domain)?;
        mem.write(pool, pfn * PAGE_SIZE, data.unwrap_or(&ZERO))
            .map_err(|e| alloc::format!("writing page {pfn:#x}: {e}"))
    }

    fn set_vcpu_state(&mut self, domain: u32, index: u32, state: &[u8]) -> Result<(), String> {
        let d = self.migrating(domain)?;
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
}
