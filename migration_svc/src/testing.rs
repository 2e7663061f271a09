//! A fake core for tests and fuzzing (feature `testing`): one or more domains kept in
//! plain `Vec<u8>`s, a log-dirty bitmap, a clock the test sets, and a CPUID policy
//! check that refuses one chosen policy. It implements [`MigrationCore`] honestly
//! enough that a migration between two of them can be checked byte for byte, and it
//! never panics, whatever a session asks of it.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use wire::dirty::DirtyBitmap;
use wire::migration::{
    ConsoleRing, DeviceEntry, DeviceStates, GuestClock, MemoryDigest, StreamHeader, VcpuFpu, VcpuMsrs,
};

use crate::source::DomainInfo;
use crate::{MachineState, MigrationCore, PolicyCheck, StateRecord};

const PAGE: usize = 4096;

/// A domain of the fake core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeDomain {
    /// Its memory.
    pub mem: Vec<u8>,
    /// Paused (a paused domain's guest writes nothing).
    pub paused: bool,
    /// The log-dirty bitmap while logging.
    pub log: Option<DirtyBitmap>,
    /// Each vCPU's state blob.
    pub vcpus: Vec<Vec<u8>>,
    /// Its CPUID policy bytes.
    pub policy: Vec<u8>,
    /// Its throttle in percent.
    pub throttle: u8,
    /// Its machine state (a source's, or what an incoming migration loaded).
    pub machine: FakeMachine,
}

/// A fake domain's machine state: what [`MachineState`] carries, each part absent
/// until set or loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeMachine {
    /// The guest clock.
    pub clock: Option<GuestClock>,
    /// Per vCPU.
    pub fpus: Vec<Option<VcpuFpu>>,
    /// Per vCPU.
    pub msrs: Vec<Option<VcpuMsrs>>,
    /// The device states.
    pub devices: Option<DeviceStates>,
    /// The console ring.
    pub console: Option<ConsoleRing>,
}

impl FakeMachine {
    /// A complete machine state for `vcpus` vCPUs, its values derived from `salt`.
    pub fn sample(vcpus: u32, salt: u64) -> Self {
        Self {
            clock: Some(GuestClock { tsc: 0x1000_0000 ^ salt, ns: 5_000_000 + salt, tsc_hz: 2_000_000_000 }),
            fpus: (0..vcpus)
                .map(|index| Some(VcpuFpu { index, xcr0: 7, area: vec![index as u8 ^ salt as u8; 576] }))
                .collect(),
            msrs: (0..vcpus)
                .map(|index| Some(VcpuMsrs { index, msrs: vec![(0x10, salt + u64::from(index)), (0x2ff, 0xc06)] }))
                .collect(),
            devices: Some(DeviceStates {
                devices: vec![
                    DeviceEntry { kind: 4, instance: 0, version: 1, bytes: vec![salt as u8; 40] },
                    DeviceEntry { kind: 8, instance: 0, version: 1, bytes: vec![1, 2, 3] },
                ],
            }),
            console: Some(ConsoleRing { total_bytes: 100 + salt, ring: b"hello\n".to_vec() }),
        }
    }
}

/// The fake core.
#[derive(Debug, Default)]
pub struct FakeCore {
    /// The time `now_ns` reports.
    pub now_ns: u64,
    /// The domains by id.
    pub domains: BTreeMap<u32, FakeDomain>,
    /// The id the next created domain gets.
    pub next_id: u32,
    /// A policy this host refuses, with the reason.
    pub refuse: Option<(Vec<u8>, String)>,
    /// Pages written by incoming migrations.
    pub pages_written: u64,
    /// How long reading one page takes (the clock advances by it on every read).
    pub read_page_ns: u64,
    /// Loading device states into an incoming domain fails with this reason.
    pub refuse_devices: Option<String>,
}

fn page_range(d: &mut FakeDomain, pfn: u64) -> Result<&mut [u8], String> {
    let at = usize::try_from(pfn).ok().and_then(|p| p.checked_mul(PAGE)).ok_or("pfn out of range")?;
    d.mem.get_mut(at..at.saturating_add(PAGE)).ok_or_else(|| alloc::format!("pfn {pfn:#x} outside the domain"))
}

impl FakeCore {
    /// No domain; the clock at 1 ms.
    pub fn new() -> Self {
        Self { now_ns: 1_000_000, next_id: 1, ..Self::default() }
    }

    /// Domain 1 with `pages` pages (every third page filled, the rest zero), two vCPUs
    /// and the policy `policy-with-avx2`.
    pub fn with_domain(pages: usize) -> Self {
        let mut c = Self::new();
        let mut mem = vec![0u8; pages.saturating_mul(PAGE)];
        for (p, page) in mem.chunks_mut(PAGE).enumerate().step_by(3) {
            page.fill(p as u8 | 1);
        }
        c.domains.insert(
            1,
            FakeDomain {
                mem,
                paused: false,
                log: None,
                vcpus: vec![b"vcpu0-registers".to_vec(), b"vcpu1-registers".to_vec()],
                policy: b"policy-with-avx2".to_vec(),
                throttle: 0,
                machine: FakeMachine::sample(2, 1),
            },
        );
        c.next_id = 2;
        c
    }

    /// Every running domain's guest writes `n` pages (spread by `salt`): byte 0 of the
    /// page counts up, byte 1 takes the salt, and the log marks the page.
    pub fn guest_writes(&mut self, n: u64, salt: u64) {
        for d in self.domains.values_mut().filter(|d| !d.paused) {
            let pages = (d.mem.len() / PAGE) as u64;
            if pages == 0 {
                continue;
            }
            for i in 0..n {
                let pfn = (i.wrapping_mul(7).wrapping_add(salt.wrapping_mul(13))) % pages;
                if let Ok(page) = page_range(d, pfn)
                    && let [first, second, ..] = page
                {
                    *first = first.wrapping_add(1);
                    *second = salt as u8;
                }
                if let Some(log) = d.log.as_mut() {
                    let _ = log.set(pfn);
                }
            }
        }
    }

    fn dom(&mut self, id: u32) -> Result<&mut FakeDomain, String> {
        self.domains.get_mut(&id).ok_or_else(|| alloc::format!("no domain {id}"))
    }
}

impl MigrationCore for FakeCore {
    fn now_ns(&self) -> Option<u64> {
        Some(self.now_ns)
    }
    fn domain_info(&mut self, domain: u32) -> Result<DomainInfo, String> {
        let d = self.dom(domain)?;
        Ok(DomainInfo {
            name: "fake".into(),
            memory_bytes: d.mem.len() as u64,
            vcpus: d.vcpus.len() as u32,
            cmdline: "x=1".into(),
            featureset: vec![1, 2, 3],
            policy: d.policy.clone(),
            log_dirty_active: d.log.is_some(),
        })
    }
    fn start_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        let d = self.dom(domain)?;
        d.log = Some(DirtyBitmap::new((d.mem.len() / PAGE) as u64).map_err(|e| alloc::format!("{e}"))?);
        Ok(())
    }
    fn stop_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        self.dom(domain)?.log = None;
        Ok(())
    }
    fn peek_and_clean(&mut self, domain: u32) -> Result<DirtyBitmap, String> {
        let log = self.dom(domain)?.log.as_mut().ok_or("not logging")?;
        let pfns = log.pfns();
        log.peek_and_clean(pfns).map_err(|e| alloc::format!("{e}"))
    }
    fn merge_back(&mut self, domain: u32, bits: &DirtyBitmap) -> Result<(), String> {
        self.dom(domain)?.log.as_mut().ok_or("not logging")?.or_merge(bits).map_err(|e| alloc::format!("{e}"))
    }
    fn read_page(&mut self, domain: u32, pfn: u64, out: &mut [u8]) -> Result<(), String> {
        self.now_ns += self.read_page_ns;
        let page = page_range(self.dom(domain)?, pfn)?;
        let n = out.len().min(page.len());
        for (o, p) in out.iter_mut().zip(page.iter()).take(n) {
            *o = *p;
        }
        Ok(())
    }
    fn set_paused(&mut self, domain: u32, paused: bool) -> Result<(), String> {
        self.dom(domain)?.paused = paused;
        Ok(())
    }
    fn throttle(&mut self, domain: u32, percent: u8) -> Result<(), String> {
        self.dom(domain)?.throttle = percent;
        Ok(())
    }
    fn vcpu_states(&mut self, domain: u32) -> Result<Vec<Vec<u8>>, String> {
        Ok(self.dom(domain)?.vcpus.clone())
    }
    fn machine_state(&mut self, domain: u32) -> Result<MachineState, String> {
        let m = self.dom(domain)?.machine.clone();
        let missing = |what: &str| alloc::format!("domain {domain} has no {what}");
        Ok(MachineState {
            clock: m.clock.ok_or_else(|| missing("clock"))?,
            fpus: m.fpus.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| missing("FPU state for a vCPU"))?,
            msrs: m.msrs.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| missing("MSRs for a vCPU"))?,
            devices: m.devices.ok_or_else(|| missing("device states"))?,
            console: m.console,
        })
    }
    fn memory_digest(&mut self, domain: u32) -> Result<MemoryDigest, String> {
        Ok(MemoryDigest::of_pages(&self.dom(domain)?.mem))
    }
    fn destroy(&mut self, domain: u32) -> Result<(), String> {
        self.domains.remove(&domain).map(|_| ()).ok_or_else(|| alloc::format!("no domain {domain}"))
    }
    fn policy_check(&mut self) -> PolicyCheck {
        let refuse = self.refuse.clone();
        Box::new(move |p: &[u8]| match &refuse {
            Some((bad, reason)) if bad == p => Err(reason.clone()),
            _ => Ok(()),
        })
    }
    fn create_domain(&mut self, header: &StreamHeader) -> Result<u32, String> {
        // Tests and fuzzing stay small: at most 64 MiB.
        let bytes = usize::try_from(header.memory_bytes).ok().filter(|&b| b <= 64 << 20).ok_or("too much memory")?;
        let vcpus = usize::try_from(header.vcpus).ok().filter(|&v| v <= 64).ok_or("too many vCPUs")?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.domains.insert(
            id,
            FakeDomain {
                // Garbage, so a page that never arrives shows.
                mem: vec![0xee; bytes],
                paused: true,
                log: None,
                vcpus: vec![Vec::new(); vcpus],
                policy: Vec::new(),
                throttle: 0,
                machine: FakeMachine { fpus: vec![None; vcpus], msrs: vec![None; vcpus], ..FakeMachine::default() },
            },
        );
        Ok(id)
    }
    fn set_policy(&mut self, domain: u32, policy: &[u8]) -> Result<(), String> {
        self.dom(domain)?.policy = policy.to_vec();
        Ok(())
    }
    fn write_page(&mut self, domain: u32, pfn: u64, data: Option<&[u8]>) -> Result<(), String> {
        self.pages_written += 1;
        let page = page_range(self.dom(domain)?, pfn)?;
        match data {
            Some(d) if d.len() == page.len() => page.copy_from_slice(d),
            Some(d) => return Err(alloc::format!("{} bytes for one page", d.len())),
            None => page.fill(0),
        }
        Ok(())
    }
    fn set_vcpu_state(&mut self, domain: u32, index: u32, state: &[u8]) -> Result<(), String> {
        let slot = self.dom(domain)?.vcpus.get_mut(index as usize).ok_or_else(|| alloc::format!("no vCPU {index}"))?;
        *slot = state.to_vec();
        Ok(())
    }
    fn load_machine_state(&mut self, domain: u32, record: &StateRecord) -> Result<(), String> {
        let refuse_devices = self.refuse_devices.clone();
        let m = &mut self.dom(domain)?.machine;
        if m.clock.is_none() && !matches!(record, StateRecord::Clock(_)) {
            return Err(String::from("a machine-state record before the guest clock"));
        }
        let no_vcpu = |index: u32| alloc::format!("no vCPU {index}");
        match record {
            StateRecord::Clock(c) => m.clock = Some(*c),
            StateRecord::Fpu(f) => *m.fpus.get_mut(f.index as usize).ok_or_else(|| no_vcpu(f.index))? = Some(f.clone()),
            StateRecord::Msrs(r) => {
                *m.msrs.get_mut(r.index as usize).ok_or_else(|| no_vcpu(r.index))? = Some(r.clone())
            }
            StateRecord::Devices(d) => match refuse_devices {
                Some(reason) => return Err(reason),
                None => m.devices = Some(d.clone()),
            },
            StateRecord::Console(c) => m.console = Some(c.clone()),
        }
        Ok(())
    }
}
