//! `hvctl migrate`, `save` and `restore` on the built binary against fake hypervisors:
//! each fake listens on a Unix socket, accepts the hybrid-vsock handshake
//! (`CONNECT <port>\n` → `OK <port>\n`) and answers request frames with the real
//! `migration_svc::MigrationService`, whose sessions run over [`FakeCore`]: an in-memory
//! domain (256 pages with a pattern, a log-dirty bitmap, a paused flag, vCPU blobs) and
//! a "guest" that writes a few pages between peek-and-cleans while it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migration_svc::{DomainInfo, MachineState, MigrationCore, MigrationService, PolicyCheck, StateRecord};
use serde_json::Value;
use wire::Request;
use wire::dirty::DirtyBitmap;
use wire::migration::{
    ConsoleRing, CpuidPolicy, DeviceEntry, DeviceStates, GuestClock, MIGRATION_STREAM_VERSION, MemoryDigest, Record,
    StreamHeader, VcpuFpu, VcpuMsrs,
};
use wire::service::QueueInfo;

mod common;

use common::{Tty, agent, fake_hv, hvctl, hvctl_on_terminal, stderr, stdout};

const PAGE: usize = 4096;
const PAGES: u64 = 256;
use fake_hv::PORT;
const SOURCE_DOMAIN: u32 = 7;
const FEATURESET: [u32; 3] = [0x1234, 0x5678, 0x9abc];

#[derive(Clone, Debug)]
struct Domain {
    name: String,
    cmdline: String,
    memory: Vec<u8>,
    vcpus: Vec<Vec<u8>>,
    policy: Vec<u8>,
    paused: bool,
    /// How often the domain was paused.
    pauses: u32,
    log: Option<DirtyBitmap>,
    max_throttle: u8,
    /// Peek-and-cleans so far (indexes the guest's write schedule).
    peeks: usize,
    /// The machine-state records an incoming migration loaded, in order.
    loaded: Vec<StateRecord>,
}

/// The machine state the fake source domain sends for `vcpus` vCPUs.
fn machine_state(vcpus: u32) -> MachineState {
    MachineState {
        clock: GuestClock { tsc: 77_000_000, ns: 38_500_000, tsc_hz: 2_000_000_000 },
        fpus: (0..vcpus).map(|index| VcpuFpu { index, xcr0: 7, area: vec![0x11; 832] }).collect(),
        msrs: (0..vcpus).map(|index| VcpuMsrs { index, msrs: vec![(0x10, 77_000_000 + u64::from(index))] }).collect(),
        devices: DeviceStates { devices: vec![DeviceEntry { kind: 4, instance: 0, version: 1, bytes: vec![3; 50] }] },
        console: Some(ConsoleRing { total_bytes: 5, ring: b"boot\n".to_vec() }),
    }
}

impl Domain {
    fn pages(&self) -> u64 {
        (self.memory.len() / PAGE) as u64
    }

    fn page_mut(&mut self, pfn: u64) -> Result<&mut [u8], String> {
        let at = usize::try_from(pfn).map_err(|e| e.to_string())? * PAGE;
        self.memory.get_mut(at..at + PAGE).ok_or_else(|| format!("pfn {pfn} is outside the domain"))
    }
}

/// The pfns the guest writes at its `peek`-th peek-and-clean (`count` of them).
fn guest_pfns(peek: usize, count: u64) -> Vec<u64> {
    (0..count).map(|i| (peek as u64 * 37 + i * 11 + 5) % PAGES).collect()
}

#[derive(Debug)]
struct FakeCore {
    start: Instant,
    domains: BTreeMap<u32, Domain>,
    destroyed: BTreeMap<u32, Domain>,
    next_id: u32,
    /// A CPUID policy (its bytes) this host refuses, and why.
    refuse: Option<(Vec<u8>, String)>,
    /// Pages the guest writes before each peek-and-clean while it runs.
    guest_writes: Vec<u64>,
    /// `write_page` calls.
    page_writes: u64,
}

impl FakeCore {
    fn empty() -> Self {
        Self {
            start: Instant::now(),
            domains: BTreeMap::new(),
            destroyed: BTreeMap::new(),
            next_id: 1,
            refuse: None,
            guest_writes: Vec::new(),
            page_writes: 0,
        }
    }

    /// Domain [`SOURCE_DOMAIN`]: 256 pages, every 8th one (pfn % 8 == 3) zero, the others
    /// a pattern unique to the page; two vCPUs.
    fn source(policy: &[u8], guest_writes: Vec<u64>) -> Self {
        let mut memory = vec![0u8; PAGES as usize * PAGE];
        for (i, b) in memory.iter_mut().enumerate() {
            let pfn = i / PAGE;
            if pfn % 8 != 3 {
                *b = (pfn as u8).wrapping_mul(31) ^ (i as u8) ^ 0x5a;
            }
        }
        let domain = Domain {
            name: "guest-a".into(),
            cmdline: "console=hvc0 quiet".into(),
            memory,
            vcpus: vec![vec![0xa0; 64], vec![0xa1; 72]],
            policy: policy.to_vec(),
            paused: false,
            pauses: 0,
            log: None,
            max_throttle: 0,
            peeks: 0,
            loaded: Vec::new(),
        };
        let mut core = Self::empty();
        core.domains.insert(SOURCE_DOMAIN, domain);
        core.guest_writes = guest_writes;
        core
    }

    fn refusing(policy: &[u8], reason: &str) -> Self {
        let mut core = Self::empty();
        core.refuse = Some((policy.to_vec(), reason.to_string()));
        core
    }

    fn dom(&mut self, domain: u32) -> Result<&mut Domain, String> {
        self.domains.get_mut(&domain).ok_or_else(|| format!("no domain {domain}"))
    }
}

impl MigrationCore for FakeCore {
    fn now_ns(&self) -> Option<u64> {
        Some(self.start.elapsed().as_nanos() as u64)
    }

    fn domain_info(&mut self, domain: u32) -> Result<DomainInfo, String> {
        let d = self.dom(domain)?;
        Ok(DomainInfo {
            name: d.name.clone(),
            memory_bytes: d.memory.len() as u64,
            vcpus: d.vcpus.len() as u32,
            cmdline: d.cmdline.clone(),
            featureset: FEATURESET.to_vec(),
            policy: d.policy.clone(),
            log_dirty_active: d.log.is_some(),
        })
    }

    fn start_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        let d = self.dom(domain)?;
        d.log = Some(DirtyBitmap::new(d.pages()).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn stop_log_dirty(&mut self, domain: u32) -> Result<(), String> {
        self.dom(domain)?.log = None;
        Ok(())
    }

    fn peek_and_clean(&mut self, domain: u32) -> Result<DirtyBitmap, String> {
        let writes = self.guest_writes.clone();
        let d = self.dom(domain)?;
        let peek = d.peeks;
        d.peeks += 1;
        if !d.paused {
            // The guest ran since the last peek: it wrote these pages.
            let count = writes.get(peek).copied().unwrap_or(0);
            for (i, pfn) in guest_pfns(peek, count).into_iter().enumerate() {
                let page = d.page_mut(pfn)?;
                page[i] = page[i].wrapping_add(1 + peek as u8);
                d.log.as_mut().ok_or("log-dirty is off")?.set(pfn).map_err(|e| e.to_string())?;
            }
        }
        let pages = d.pages();
        d.log.as_mut().ok_or("log-dirty is off")?.peek_and_clean(0..pages).map_err(|e| e.to_string())
    }

    fn merge_back(&mut self, domain: u32, bits: &DirtyBitmap) -> Result<(), String> {
        self.dom(domain)?.log.as_mut().ok_or("log-dirty is off")?.or_merge(bits).map_err(|e| e.to_string())
    }

    fn read_page(&mut self, domain: u32, pfn: u64, out: &mut [u8]) -> Result<(), String> {
        out.copy_from_slice(self.dom(domain)?.page_mut(pfn)?);
        Ok(())
    }

    fn set_paused(&mut self, domain: u32, paused: bool) -> Result<(), String> {
        let d = self.dom(domain)?;
        if paused && !d.paused {
            d.pauses += 1;
        }
        d.paused = paused;
        Ok(())
    }

    fn throttle(&mut self, domain: u32, percent: u8) -> Result<(), String> {
        let d = self.dom(domain)?;
        d.max_throttle = d.max_throttle.max(percent);
        Ok(())
    }

    fn vcpu_states(&mut self, domain: u32) -> Result<Vec<Vec<u8>>, String> {
        let d = self.dom(domain)?;
        if !d.paused {
            return Err("the vCPUs run: pause the domain first".into());
        }
        Ok(d.vcpus.clone())
    }

    fn machine_state(&mut self, domain: u32) -> Result<MachineState, String> {
        let d = self.dom(domain)?;
        Ok(machine_state(d.vcpus.len() as u32))
    }

    fn memory_digest(&mut self, domain: u32) -> Result<MemoryDigest, String> {
        Ok(MemoryDigest::of_pages(&self.dom(domain)?.memory))
    }

    fn destroy(&mut self, domain: u32) -> Result<(), String> {
        let d = self.domains.remove(&domain).ok_or_else(|| format!("no domain {domain}"))?;
        self.destroyed.insert(domain, d);
        Ok(())
    }

    fn policy_check(&mut self) -> PolicyCheck {
        let refuse = self.refuse.clone();
        Box::new(move |policy: &[u8]| match &refuse {
            Some((bad, reason)) if bad == policy => Err(reason.clone()),
            _ => Ok(()),
        })
    }

    fn create_domain(&mut self, header: &StreamHeader) -> Result<u32, String> {
        let id = self.next_id;
        self.next_id += 1;
        let domain = Domain {
            name: header.name.clone(),
            cmdline: header.cmdline.clone(),
            memory: vec![0; usize::try_from(header.memory_bytes).map_err(|e| e.to_string())?],
            vcpus: vec![Vec::new(); header.vcpus as usize],
            policy: Vec::new(),
            paused: true,
            pauses: 0,
            log: None,
            max_throttle: 0,
            peeks: 0,
            loaded: Vec::new(),
        };
        self.domains.insert(id, domain);
        Ok(id)
    }

    fn set_policy(&mut self, domain: u32, policy: &[u8]) -> Result<(), String> {
        self.dom(domain)?.policy = policy.to_vec();
        Ok(())
    }

    fn write_page(&mut self, domain: u32, pfn: u64, data: Option<&[u8]>) -> Result<(), String> {
        self.page_writes += 1;
        let page = self.dom(domain)?.page_mut(pfn)?;
        match data {
            Some(data) => page.copy_from_slice(data),
            None => page.fill(0),
        }
        Ok(())
    }

    fn set_vcpu_state(&mut self, domain: u32, index: u32, state: &[u8]) -> Result<(), String> {
        let d = self.dom(domain)?;
        *d.vcpus.get_mut(index as usize).ok_or_else(|| format!("no vCPU {index}"))? = state.to_vec();
        Ok(())
    }

    fn load_machine_state(&mut self, domain: u32, record: &StateRecord) -> Result<(), String> {
        self.dom(domain)?.loaded.push(record.clone());
        Ok(())
    }
}

struct Hv {
    service: MigrationService,
    core: FakeCore,
    /// The requests answered, by name (verdicts with their value).
    requests: Vec<String>,
}

/// A fake hypervisor on a Unix socket.
struct FakeHv {
    path: PathBuf,
    hv: Arc<Mutex<Hv>>,
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvctl-migrate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

impl FakeHv {
    fn start(name: &str, core: FakeCore) -> Self {
        let path = tmp(&format!("{name}.vsock"));
        let hv = Arc::new(Mutex::new(Hv { service: MigrationService::new(), core, requests: Vec::new() }));
        let shared = hv.clone();
        fake_hv::listen(&path, move |frame| {
            let mut guard = shared.lock().unwrap();
            let hv = &mut *guard;
            if let Ok(request) = wire::decode_request(frame) {
                hv.requests.push(describe(&request));
            }
            hv.service.handle_with(frame, QueueInfo { depth: 0, capacity: 16 }, &mut hv.core)
        });
        Self { path, hv }
    }

    fn target(&self) -> String {
        format!("unix:{}:{PORT}", self.path.display())
    }

    fn lock(&self) -> MutexGuard<'_, Hv> {
        self.hv.lock().unwrap()
    }
}

fn describe(request: &Request) -> String {
    match request {
        Request::MigrateVerdict { verdict, .. } => format!("migrate-verdict {verdict:?}"),
        Request::MigrateAbort { reason, .. } => format!("migrate-abort {reason}"),
        other => other.name().to_string(),
    }
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: stdout {:?} stderr {}", stdout(o), stderr(o)))
}

fn hex(d: u64) -> String {
    format!("{d:#018x}")
}

/// The source domain as it was when the migration destroyed it.
fn destroyed_source(src: &FakeHv) -> Domain {
    let hv = src.lock();
    assert!(!hv.core.domains.contains_key(&SOURCE_DOMAIN), "the source domain still exists");
    hv.core.destroyed.get(&SOURCE_DOMAIN).expect("the source domain was destroyed").clone()
}

/// The destination holds exactly one domain, `id`, running, equal to `source`.
fn assert_copy(dst: &FakeHv, id: u32, source: &Domain) {
    let hv = dst.lock();
    assert_eq!(hv.core.domains.keys().copied().collect::<Vec<_>>(), vec![id]);
    let d = &hv.core.domains[&id];
    assert!(d.memory == source.memory, "the destination's memory differs from the source's");
    assert_eq!(d.vcpus, source.vcpus);
    // Clock, two vCPUs' FPU areas and MSRs, devices, console.
    assert_eq!(d.loaded.len(), 7, "the machine state arrived: {:?}", d.loaded);
    assert!(matches!(d.loaded.first(), Some(StateRecord::Clock(_))), "the clock first");
    assert_eq!((&d.name, &d.cmdline, &d.policy), (&source.name, &source.cmdline, &source.policy));
    assert!(!d.paused, "the destination domain does not run");
}

/// The source domain survived a failed migration: it runs, log-dirty is off again.
fn assert_source_runs(src: &FakeHv) -> Domain {
    let hv = src.lock();
    let d = hv.core.domains.get(&SOURCE_DOMAIN).expect("the source domain still exists").clone();
    assert!(!d.paused, "the source domain was left paused");
    assert!(d.log.is_none(), "log-dirty was left on");
    assert!(hv.core.destroyed.is_empty());
    d
}

#[test]
fn migrate_completes_and_the_copy_is_equal() {
    let src = FakeHv::start("ok-src", FakeCore::source(b"policy:base", vec![16]));
    let dst = FakeHv::start("ok-dst", FakeCore::empty());
    let o = hvctl(&["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--verify", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "completed");
    // The guest wrote 16 pages during the full copy: they went again in a later round.
    assert!(v["rounds"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["pages_resent"].as_u64().unwrap() >= 16, "{v}");
    assert_eq!(v["pages_sent"].as_u64().unwrap(), PAGES + v["pages_resent"].as_u64().unwrap(), "{v}");
    assert!(v["bytes_sent"].as_u64().unwrap() > 224 * PAGE as u64, "{v}");

    let source = destroyed_source(&src);
    assert_eq!(source.pauses, 1);
    let digest = hex(MemoryDigest::of_pages(&source.memory).digest);
    assert_eq!(v["source_digest"], digest.as_str(), "{v}");
    assert_eq!(v["destination_digest"], digest.as_str(), "{v}");
    assert_eq!(v["digests_match"], true);
    let id = v["destination_domain"].as_u64().unwrap() as u32;
    assert_copy(&dst, id, &source);
    // The pages the guest wrote really changed (so equality is not the initial pattern's).
    let pristine = FakeCore::source(b"", Vec::new()).domains.remove(&SOURCE_DOMAIN).unwrap();
    assert_ne!(pristine.memory, source.memory);
    let requests = src.lock().requests.clone();
    assert!(requests.contains(&"migrate-verdict PolicyAccepted".to_string()), "{requests:?}");
    assert!(requests.contains(&"migrate-verdict Acked".to_string()), "{requests:?}");
}

#[test]
fn refused_policy_moves_no_page_and_the_source_runs_on() {
    let reason = "this host lacks avx512f";
    let src = FakeHv::start("refuse-src", FakeCore::source(b"policy:avx512", vec![4]));
    let dst = FakeHv::start("refuse-dst", FakeCore::refusing(b"policy:avx512", reason));
    let o = hvctl(&["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("destination refused: {reason}")), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "failed");
    assert!(v["error"].as_str().unwrap().contains(reason), "{v}");
    assert_eq!(v["source_state"], "failed");
    assert_eq!(v["destination_state"], "discarded");

    {
        let hv = dst.lock();
        assert_eq!(hv.core.page_writes, 0, "pages were written at the destination");
        assert!(hv.core.domains.is_empty(), "the refused domain was kept");
    }
    let d = assert_source_runs(&src);
    assert_eq!(d.pauses, 0);
    let pristine = FakeCore::source(b"", Vec::new()).domains.remove(&SOURCE_DOMAIN).unwrap();
    assert!(d.memory == pristine.memory);
    let requests = src.lock().requests.clone();
    assert!(requests.contains(&format!("migrate-verdict Refused({reason:?})")), "{requests:?}");
    assert!(!requests.iter().any(|r| r == "migrate-verdict PolicyAccepted"), "{requests:?}");
}

/// The byte offset of the middle of the first page's data in the final round's page
/// batch, for the source domain of `FakeCore::source(policy, vec![writes])` when it
/// stops and copies right after the full copy (as it does with a handful of dirty pages).
fn final_round_page_offset(policy: &[u8], writes: u64) -> u64 {
    let d = FakeCore::source(policy, Vec::new()).domains.remove(&SOURCE_DOMAIN).unwrap();
    let mut stream = Vec::new();
    let header = StreamHeader {
        stream_version: MIGRATION_STREAM_VERSION,
        source_featureset: FEATURESET.to_vec(),
        name: d.name.clone(),
        memory_bytes: d.memory.len() as u64,
        vcpus: d.vcpus.len() as u32,
        cmdline: d.cmdline.clone(),
    };
    Record::Header(header).encode(&mut stream).unwrap();
    Record::CpuidPolicy(CpuidPolicy { policy: policy.to_vec() }).encode(&mut stream).unwrap();
    // Round 0: every page in one batch (zero pages as entries only).
    let zero = (0..PAGES).filter(|p| p % 8 == 3).count() as u64;
    let round0 = 8 + 4 + 8 * PAGES + (PAGES - zero) * PAGE as u64 + 4;
    let mut bits = DirtyBitmap::new(PAGES).unwrap();
    for pfn in guest_pfns(0, writes) {
        bits.set(pfn).unwrap();
    }
    let mut dirty_round = Vec::new();
    migration_svc::encode_dirty_round(1, &bits, &mut dirty_round).unwrap();
    // The final batch: record header, count, one entry per page, then the data.
    stream.len() as u64 + round0 + dirty_round.len() as u64 + 8 + 4 + 8 * writes + PAGE as u64 / 2
}

#[test]
fn corrupted_stream_is_refused_the_source_resumes_and_a_retry_succeeds() {
    let src = FakeHv::start("corrupt-src", FakeCore::source(b"policy:base", vec![8]));
    let dst = FakeHv::start("corrupt-dst", FakeCore::empty());
    let at = final_round_page_offset(b"policy:base", 8).to_string();
    let o =
        hvctl(&["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--fault-corrupt-byte", &at, "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("the destination discarded the domain"), "{}", stderr(&o));
    assert!(stderr(&o).contains("failed its checksum"), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["destination_state"], "discarded");
    assert_eq!(v["source_state"], "failed");
    assert!(v["destination_error"].as_str().unwrap().contains("page batch"), "{v}");
    assert!(dst.lock().core.domains.is_empty(), "the partial domain was kept");
    // The corrupt byte came after the pause: the source was paused, and resumed.
    let d = assert_source_runs(&src);
    assert_eq!(d.pauses, 1, "the corruption was meant to hit the final round");
    let requests = src.lock().requests.clone();
    // The destination's own verdict (it discarded the domain): Refused, so the source
    // resumes even when everything had been sent.
    assert!(
        requests.iter().any(|r| r.starts_with("migrate-verdict Refused") && r.contains("checksum")),
        "{requests:?}"
    );

    // A second attempt, without the fault, goes through.
    let o = hvctl(&["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("domain 7 migrated: it runs as domain 2 on unix:"), "{out}");
    assert!(out.contains(": match"), "{out}");
    let source = destroyed_source(&src);
    assert_copy(&dst, 2, &source);
}

#[test]
fn save_then_restore_gives_the_same_domain() {
    let src = FakeHv::start("save-src", FakeCore::source(b"policy:base", vec![5]));
    let file = tmp("guest-a.hvsave");
    let _ = std::fs::remove_file(&file);
    let f = file.to_str().unwrap();
    // The source is the global --connect target.
    let o = hvctl(&["--connect", &src.target(), "save", "7", f, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "completed");
    assert!(v["pages_resent"].as_u64().unwrap() >= 5, "{v}");
    assert_eq!(v["file_bytes"].as_u64().unwrap(), std::fs::metadata(&file).unwrap().len());
    assert!(!tmp("guest-a.hvsave.partial").exists());
    let source = destroyed_source(&src);

    let dst = FakeHv::start("restore-dst", FakeCore::empty());
    let o = hvctl(&["restore", f, "--to", &dst.target(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "completed");
    assert_eq!(v["name"], "guest-a");
    assert_copy(&dst, v["domain"].as_u64().unwrap() as u32, &source);

    // Not a migration stream: refused before connecting.
    let garbage = tmp("garbage.hvsave");
    std::fs::write(&garbage, b"this is not a migration stream at all, just text\n".repeat(100)).unwrap();
    let empty = tmp("empty.hvsave");
    std::fs::write(&empty, b"").unwrap();
    let before = dst.lock().requests.len();
    for bad in [&garbage, &empty] {
        let o = hvctl(&["restore", bad.to_str().unwrap(), "--to", &dst.target()]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("is not a migration stream"), "{}", stderr(&o));
    }
    assert_eq!(dst.lock().requests.len(), before, "restore talked to the destination");
    assert_eq!(dst.lock().core.domains.len(), 1);
}

#[test]
fn save_failure_leaves_no_file() {
    // The destination side of a save is the file: a refused source leaves nothing behind.
    let src = FakeHv::start("savefail-src", FakeCore::empty());
    let file = tmp("nothing.hvsave");
    let o = hvctl(&["save", "7", file.to_str().unwrap(), "--from", &src.target()]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("no domain 7"), "{}", stderr(&o));
    assert!(!file.exists() && !tmp("nothing.hvsave.partial").exists());
}

#[test]
fn cancel_and_usage() {
    let src = FakeHv::start("cancel-src", FakeCore::source(b"p", Vec::new()));
    let o = hvctl(&["migrate", "--cancel", "7", "--from", &src.target()]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("domain 7 is not being migrated"), "{}", stderr(&o));
    assert_eq!(src.lock().requests, vec!["migrate-cancel".to_string()]);

    let o = hvctl(&["migrate", "7", "--from", &src.target()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--to"), "{}", stderr(&o));
    let o = hvctl(&["migrate", "--help"]);
    assert!(!stdout(&o).contains("corrupt"), "{}", stdout(&o));
    let o = hvctl(&["save", "--help"]);
    assert!(stdout(&o).contains("destroyed"), "{}", stdout(&o));
}

#[test]
fn bandwidth_cap_slows_the_stream_and_progress_is_drawn() {
    let src = FakeHv::start("bw-src", FakeCore::source(b"policy:base", vec![3]));
    let dst = FakeHv::start("bw-dst", FakeCore::empty());
    // About 0.93 MB at 8 MB/s: at least 115 ms.
    let args = ["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--bandwidth", "8", "--progress"];
    let o = hvctl(&[&args[..], &["--throttle", "--json"]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert!(v["duration_ms"].as_u64().unwrap() >= 100, "{v}");
    let e = stderr(&o);
    assert!(e.contains('\r') && e.contains("precopy") && e.contains("pages "), "{e:?}");
    assert!(e.contains("completed"), "{e:?}");
    assert_copy(&dst, v["destination_domain"].as_u64().unwrap() as u32, &destroyed_source(&src));

    let o = hvctl(&["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--bandwidth", "-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// With stderr on a terminal (a pty here), `migrate` draws indicatif's bar with
/// percentage, bytes, rate and ETA ahead of the state line; with `--json` it keeps
/// today's plain `\r` line.
#[test]
fn progress_bar_on_a_terminal_and_the_plain_line_with_json() {
    for json in [false, true] {
        let src = FakeHv::start(&format!("bar-src-{json}"), FakeCore::source(b"policy:base", vec![3]));
        let dst = FakeHv::start(&format!("bar-dst-{json}"), FakeCore::empty());
        let (from, to) = (src.target(), dst.target());
        let mut args = vec!["migrate", "7", "--from", &from, "--to", &to, "--bandwidth", "8"];
        if json {
            args.push("--json");
        }
        let (o, drawn) = hvctl_on_terminal(&args, Tty::Stderr);
        assert_eq!(o.status.code(), Some(0), "{drawn}");
        if json {
            assert!(drawn.contains("precopy") && drawn.contains("pages "), "{drawn:?}");
            assert!(!drawn.contains("ETA"), "--json keeps the plain line: {drawn:?}");
        } else {
            for part in ["ETA", "MB/s", "MB/", "%", "=>", "precopy"] {
                assert!(drawn.contains(part), "no {part:?} in {drawn:?}");
            }
            // The last state is left on screen, at 100 % of what was sent.
            assert!(drawn.contains("100%"), "{drawn:?}");
        }
    }
}

#[test]
fn ctrl_c_cancels_at_once_the_source_runs_on_with_its_dirty_bits_and_the_destination_aborts() {
    // The guest dirties 200 pages between peeks: the pre-copy never converges, so a
    // migration capped at 0.5 MB/s is still in round 1 for seconds after round 0.
    let mut core = FakeCore::source(b"policy:base", vec![200; 30]);
    // Log-dirty was on before the migration (e.g. `hvctl dirty start`): the migration
    // leaves it on, so the dirty bits it took and did not send can be seen after it.
    core.dom(SOURCE_DOMAIN).unwrap().log = Some(DirtyBitmap::new(PAGES).unwrap());
    let src = FakeHv::start("sigint-src", core);
    let dst = FakeHv::start("sigint-dst", FakeCore::empty());
    let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(["migrate", "7", "--from", &src.target(), "--to", &dst.target(), "--bandwidth", "0.5"])
        .env_remove("HVCTL_CONNECT")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Round 0 (about 0.93 MB) is out and the first dirty bits are taken.
    let start = Instant::now();
    while src.lock().core.domains[&SOURCE_DOMAIN].peeks < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the migration did not reach round 1");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "hvctl took {took:?} to cancel: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(
            "hvctl: error: migration cancelled by Ctrl-C; domain 7 runs on at the source; the destination discarded \
             its partial copy"
        ),
        "{e}"
    );

    // The source: what `hvctl migrate --cancel` does, then nothing more.
    {
        let hv = src.lock();
        assert_eq!(hv.requests.iter().filter(|r| *r == "migrate-cancel").count(), 1, "{:?}", hv.requests);
        assert_eq!(hv.requests.last().map(String::as_str), Some("migrate-cancel"), "{:?}", hv.requests);
        let d = &hv.core.domains[&SOURCE_DOMAIN];
        assert!(!d.paused, "the source domain was left paused");
        assert!(hv.core.destroyed.is_empty());
        // The bits of round 1 that had not gone out are back in the running log.
        let log = d.log.as_ref().expect("log-dirty was stopped, though the migration did not start it");
        let taken = guest_pfns(0, 200);
        assert!(log.count_ones() > 0, "the unsent dirty bits were lost");
        assert!(log.ones().all(|pfn| taken.contains(&pfn)), "bits the guest never dirtied are set");
    }
    // The destination: told to discard its partial domain, and it did.
    let hv = dst.lock();
    assert!(
        hv.requests.iter().any(|r| r == "migrate-abort migration cancelled by Ctrl-C at hvctl"),
        "{:?}",
        hv.requests
    );
    assert!(hv.core.domains.is_empty(), "the partial domain was kept");
}

/// Agents a (127.0.0.2, serving `src` as h) and b (127.0.0.3, serving `dst` as h);
/// b allows agent a with `a_role` (or not at all). Client ops is admin on both.
fn two_agents(name: &str, src: &FakeHv, dst: &FakeHv, a_role: Option<&str>) -> (PathBuf, agent::Agent, agent::Agent) {
    let d = agent::dir(name);
    let aa = format!("127.0.0.2:{}", agent::free_port("127.0.0.2"));
    let ab = format!("127.0.0.3:{}", agent::free_port("127.0.0.3"));
    agent::init(&d, &[format!("a={aa}"), format!("b={ab}")], &["ops=admin"]);
    let a = agent::Agent::start(&d, "a", &aa, &[("ops", "admin")], "", &[format!("h={}", src.target())]);
    let mut allow_b = vec![("ops", "admin")];
    if let Some(r) = a_role {
        allow_b.push(("a", r));
    }
    let b = agent::Agent::start(&d, "b", &ab, &allow_b, "", &[format!("h={}", dst.target())]);
    (d, a, b)
}

fn as_ops(d: &std::path::Path, args: &[&str]) -> Output {
    let mut all: Vec<String> = agent::tls_args(d, "ops", d);
    all.extend(args.iter().map(|s| s.to_string()));
    hvctl(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn agent_stats(d: &std::path::Path, a: &agent::Agent) -> Value {
    let o = as_ops(d, &["--connect", &format!("tls://{}", a.addr), "agent", "stats", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    json_of(&o)
}

fn peer<'v>(stats: &'v Value, peer: &str, direction: &str) -> &'v Value {
    stats["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == peer && p["direction"] == direction)
        .unwrap_or_else(|| panic!("no {direction} peer {peer} in {stats}"))
}

#[test]
fn migrate_between_two_agents_streams_agent_to_agent() {
    let src = FakeHv::start("agents-src", FakeCore::source(b"policy:base", vec![16]));
    let dst = FakeHv::start("agents-dst", FakeCore::empty());
    let (d, a, b) = two_agents("h2h", &src, &dst, Some("admin"));
    let o =
        as_ops(&d, &["migrate", "7", "--from", &a.url("h"), "--to", &b.url("h"), "--verify", "--json", "--progress"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["outcome"], "completed", "{v}");
    assert_eq!(v["digests_match"], true, "{v}");
    // The progress the agent forwarded is drawn as for a local relay.
    assert!(stderr(&o).contains("round") && stderr(&o).contains("pages"), "{}", stderr(&o));
    let source = destroyed_source(&src);
    let id = v["destination_domain"].as_u64().unwrap() as u32;
    assert_copy(&dst, id, &source);

    let stream = v["bytes_sent"].as_u64().unwrap();
    let sa = agent_stats(&d, &a);
    let sb = agent_stats(&d, &b);
    // A sent the stream to B itself...
    let to_b = peer(&sa, &b.addr, "outbound");
    assert!(to_b["bytes_sent"].as_u64().unwrap() >= stream, "{sa}");
    let from_a = peer(&sb, "a", "inbound");
    assert!(from_a["bytes_received"].as_u64().unwrap() >= stream, "{sb}");
    // ...and the operator's connections carried only control traffic.
    let ops = peer(&sa, "ops", "inbound");
    let control = ops["bytes_sent"].as_u64().unwrap() + ops["bytes_received"].as_u64().unwrap();
    assert!(control * 20 < stream, "operator traffic {control} bytes against a stream of {stream}: {sa}");
    let ops_b = peer(&sb, "ops", "inbound");
    assert!(ops_b["bytes_received"].as_u64().unwrap() * 20 < stream, "{sb}");
    assert!(a.audit_lines().iter().any(|l| l["request"] == "agent-migrate" && l["result"] == "ok"));
}

#[test]
fn an_agent_the_destination_does_not_allow_migrates_nothing_and_the_source_runs_on() {
    let src = FakeHv::start("agents-refused-src", FakeCore::source(b"policy:base", Vec::new()));
    let dst = FakeHv::start("agents-refused-dst", FakeCore::empty());
    let (d, a, b) = two_agents("h2h-refused", &src, &dst, Some("read-only"));
    let o = as_ops(&d, &["migrate", "7", "--from", &a.url("h"), "--to", &b.url("h")]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("\"a\" is read-only") && e.contains("migrate-receive needs admin"), "{e}");
    assert_source_runs(&src);
    assert!(dst.lock().core.domains.is_empty());

    let (d2, a2, b2) = two_agents("h2h-unlisted", &src, &dst, None);
    let o = as_ops(&d2, &["migrate", "7", "--from", &a2.url("h"), "--to", &b2.url("h")]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("\"a\" is not on this agent's allow-list"), "{}", stderr(&o));
    assert_source_runs(&src);
    assert!(dst.lock().core.domains.is_empty());
    drop((a, b, a2, b2));
}

#[test]
fn ctrl_c_at_the_operator_cancels_an_agent_to_agent_migration_on_both_hosts() {
    // As in the local Ctrl-C test: a capped stream that is still running after a second.
    let src = FakeHv::start("agents-sigint-src", FakeCore::source(b"policy:base", vec![200; 30]));
    let dst = FakeHv::start("agents-sigint-dst", FakeCore::empty());
    let (d, a, b) = two_agents("h2h-sigint", &src, &dst, Some("admin"));
    let mut args: Vec<String> = agent::tls_args(&d, "ops", &d);
    args.extend(["migrate", "7", "--from", &a.url("h"), "--to", &b.url("h"), "--bandwidth", "0.5"].map(String::from));
    let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(&args)
        .env_remove("HVCTL_CONNECT")
        .env("XDG_CONFIG_HOME", std::env::temp_dir().join("hvctl-tests-no-config"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while src.lock().core.domains[&SOURCE_DOMAIN].peeks < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the migration did not reach round 1");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("migration cancelled by Ctrl-C"), "{}", stderr(&o));
    // Agent A notices the operator has gone and cancels on both hosts.
    let start = Instant::now();
    while !src.lock().requests.iter().any(|r| r == "migrate-cancel") {
        assert!(start.elapsed() < Duration::from_secs(5), "the agent did not cancel: {:?}", src.lock().requests);
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    while !dst.lock().requests.iter().any(|r| r.starts_with("migrate-abort")) {
        assert!(start.elapsed() < Duration::from_secs(5), "the destination was not aborted: {:?}", dst.lock().requests);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_source_runs(&src);
    assert!(dst.lock().core.domains.is_empty());
    let aborted = dst.lock().requests.iter().find(|r| r.starts_with("migrate-abort")).cloned().unwrap();
    assert!(aborted.contains("the operator's disconnect"), "{aborted}");
    drop((a, b));
}
