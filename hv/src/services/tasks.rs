//! The service task runtime: the core, monitor_svc and migration_svc each own a
//! bounded mailbox of `wire` frames (postcard-encoded messages); a router sends each
//! request to the task that owns it (`wire::Request::service`).
//!
//! A full mailbox answers the sender at once with `Busy` (backpressure): memory is
//! bounded by MAILBOX_CAPACITY frames of at most `wire::MAX_FRAME_LEN` bytes each per
//! task, whatever the clients do. Tasks run cooperatively on the bootstrap CPU, each
//! taking a bounded number of messages per turn so no task starves the others.
//!
//! The services never see the core's memory: they get a frame and return the encoded
//! response frame. The core gathers their status for `Info` the same way, by message.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use heapless::Deque;
use migration_svc::MigrationService;
use monitor_svc::MonitorService;
pub use wire::service::encode_reply;
use wire::service::{QueueInfo, ServiceCounters};
use wire::{
    ErrorCode, ErrorReply, Frame, FrameKind, ImageKind, ImageRef, InfoReport, Request, Response, ServiceId,
    ServiceStatus,
};

use crate::services::upload::{Staged, Uploads};

/// Frames each mailbox holds.
pub const MAILBOX_CAPACITY: usize = 16;
/// Messages a task handles per turn before the others get theirs.
const TURN_BUDGET: usize = 4;

/// Who a reply goes back to (the control server's connection handle).
pub type ReplyTo = u32;

struct Envelope {
    reply_to: ReplyTo,
    frame: Frame,
}

/// A bounded mailbox.
struct Mailbox {
    queue: Deque<Envelope, MAILBOX_CAPACITY>,
}

impl Mailbox {
    fn new() -> Self {
        Self { queue: Deque::new() }
    }
    fn queue_info(&self) -> (u32, u32) {
        (self.queue.len() as u32, MAILBOX_CAPACITY as u32)
    }
}

/// The domain operations the core task performs for clients (implemented by
/// `domain::Machine`; the runtime itself holds no domain state).
pub trait DomainOps {
    /// Create and start a domain from `spec` with the kernel (and initrd) bytes the
    /// runtime resolved from its image references (inline or uploaded).
    fn create(&mut self, spec: &wire::DomainSpec, kernel: &[u8], initrd: Option<&[u8]>) -> Result<u32, ErrorReply>;
    /// Every domain, and the frame pool's state.
    fn list(&self) -> wire::DomainListReport;
    /// Pause (true) or unpause (false).
    fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), ErrorReply>;
    /// Pin domain `id`'s vCPUs to these CPUs (APIC IDs; `None`: any).
    fn pin(&mut self, id: u32, _cpus: Option<Vec<u32>>) -> Result<(), ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    /// Destroy.
    fn destroy(&mut self, id: u32) -> Result<(), ErrorReply>;
    /// Console bytes from `offset` on.
    fn console(&self, id: u32, offset: u64) -> Result<wire::ConsoleChunk, ErrorReply>;
    /// Console input for domain `id`'s UART receiver: how many bytes it took.
    fn console_input(&mut self, id: u32, _bytes: &[u8]) -> Result<u32, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    /// The frame pool uploads are staged in (`None`: this instance takes no uploads).
    fn staging(&mut self) -> Option<spin::MutexGuard<'_, crate::mm::frames::FramePool>> {
        None
    }
    /// Per domain: its counters (for the software events of the monitoring service).
    fn counters(&self) -> Vec<DomainCounters> {
        Vec::new()
    }
    /// The RMID each vCPU of domain `id` runs with (index = vCPU; 0 = not monitored).
    fn set_rmids(&mut self, _id: u32, _rmids: Vec<u32>) {}
    /// Start log `slot` (0 main, 1 tracking; `mode`: auto, pml, dbit, wp; `range`:
    /// first pfn, pages).
    fn dirty_start(
        &mut self,
        id: u32,
        _slot: usize,
        _mode: &str,
        _range: Option<(u64, u64)>,
    ) -> Result<wire::DirtyStatsReport, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    /// Stop log `slot`; the final counters.
    fn dirty_stop(&mut self, id: u32, _slot: usize) -> Result<wire::DirtyStatsReport, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    /// Log `slot`'s counters.
    fn dirty_stats(&mut self, id: u32, _slot: usize) -> Result<wire::DirtyStatsReport, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    /// The operations live migration runs on (`None`: this instance runs no domains,
    /// and the migration service refuses to migrate).
    fn migration(&mut self) -> Option<&mut dyn migration_svc::MigrationCore> {
        None
    }
    /// The frame pool: (total, free) frames.
    fn frames(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Log `slot`'s dirty pages, cleaned and re-armed if `clean`.
    fn dirty_peek(&mut self, id: u32, _slot: usize, _clean: bool) -> Result<wire::DirtyBitmapReport, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
}

/// A domain's counters as the core keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainCounters {
    /// Domain id.
    pub id: u32,
    /// Exits by reason (the core's names).
    pub exits: Vec<(crate::arch::ExitKind, u64)>,
    /// Guest run time in nanoseconds.
    pub runtime_ns: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// No domains at all (host tests, and machines without a backend).
#[derive(Debug, Default)]
pub struct NoDomains;

impl DomainOps for NoDomains {
    fn create(&mut self, _: &wire::DomainSpec, _: &[u8], _: Option<&[u8]>) -> Result<u32, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::NotImplemented, "this hypervisor instance runs no domains"))
    }
    fn list(&self) -> wire::DomainListReport {
        wire::DomainListReport { domains: Vec::new(), free_frames: 0, total_frames: 0 }
    }
    fn set_paused(&mut self, id: u32, _: bool) -> Result<(), ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    fn destroy(&mut self, id: u32) -> Result<(), ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
    fn console(&self, id: u32, _: u64) -> Result<wire::ConsoleChunk, ErrorReply> {
        Err(ErrorReply::new(ErrorCode::Refused, alloc::format!("no domain {id}")))
    }
}

/// An image for `DomainCreate`: the request's own bytes, or an upload taken out of the
/// store.
enum Image<'a> {
    Inline(&'a [u8]),
    Staged(Staged),
}

impl Image<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Image::Inline(b) => b,
            Image::Staged(s) => s.bytes(),
        }
    }
}

/// Give a used upload's frames back.
fn release(image: Image<'_>, domains: &mut dyn DomainOps) {
    if let Image::Staged(s) = image
        && let Some(mut pool) = domains.staging()
    {
        s.free(&mut pool);
    }
}

fn no_uploads() -> ErrorReply {
    ErrorReply::new(ErrorCode::NotImplemented, "this hypervisor instance runs no domains, so it takes no uploads")
}

/// The heap's and the frame pool's use, for `Info`.
fn memory_use((frames_total, frames_free): (u64, u64)) -> wire::MemoryUse {
    let heap = crate::heap::stats();
    wire::MemoryUse {
        heap_bytes: heap.size as u64,
        heap_used_bytes: heap.used as u64,
        heap_peak_bytes: heap.peak as u64,
        heap_refused: heap.refused as u64,
        frames_total,
        frames_free,
    }
}

/// What the core service reports about the machine in `Info`.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    /// Version string with git revision.
    pub hv_version: String,
    /// The CAPS line's key/value pairs.
    pub capabilities: Vec<(String, String)>,
    /// CPUs the hypervisor runs on.
    pub cpus: u32,
    /// Every physical CPU and its bring-up state (`Info`'s `cpu_list`).
    pub cpu_list: Vec<wire::CpuInfo>,
    /// Usable memory in bytes.
    pub memory_bytes: u64,
    /// The control transports served, one line each (`Info`'s `control`).
    pub control: Vec<String>,
    /// The host CPU's raw CPUID as the boot probe read it (`HostCpuid`'s answer). Read
    /// once at boot: CPUID of the bootstrap CPU does not change while we run, and the
    /// exit path never has to execute CPUID for a control request.
    pub cpuid: wire::HostCpuidReport,
}

/// `BenchFill`'s answer: `len` zero bytes, at most `wire::MAX_BENCH_DATA`, allocated
/// fallibly (the request decides the size).
fn bench_fill(len: u32) -> Response {
    let Ok(n) = usize::try_from(len) else { return Response::Error(bench_too_long(usize::MAX)) };
    if n > wire::MAX_BENCH_DATA {
        return Response::Error(bench_too_long(n));
    }
    let mut bytes = Vec::new();
    if bytes.try_reserve_exact(n).is_err() {
        return Response::Error(ErrorReply::new(
            ErrorCode::OutOfMemory,
            alloc::format!("out of memory: no heap for the {n} bytes of a bench-fill answer"),
        ));
    }
    bytes.resize(n, 0);
    Response::BenchData { bytes }
}

fn bench_too_long(n: usize) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Refused,
        alloc::format!(
            "{n} bytes of transport benchmark data in one request; at most {} are moved",
            wire::MAX_BENCH_DATA
        ),
    )
}

/// The core task: answers Ping, Info and its own status.
struct CoreService {
    machine: MachineInfo,
    counters: ServiceCounters,
}

/// Every task and its mailbox; replies collect in an outbox for the control server.
pub struct Runtime {
    /// The last counter values handed to the monitoring service, per domain.
    fed: BTreeMap<u32, (BTreeMap<crate::arch::ExitKind, u64>, u64)>,
    /// TSC of the last MBM sample and limbo recheck.
    last_mbm: u64,
    last_limbo: u64,
    core: CoreService,
    monitor: MonitorService,
    /// The monitoring service's MSR accesses, each on a CPU of the socket it names.
    msrs: crate::platform::rdt::SocketMsrs<crate::platform::rdt::RealCpus>,
    migration: MigrationService,
    mailboxes: [Mailbox; 3],
    outbox: Vec<(ReplyTo, Vec<u8>)>,
    /// Requests refused with Busy, per task.
    busy_refusals: [u64; 3],
    /// Kernel and initrd uploads (staged in the domains' frame pool).
    uploads: Uploads,
}

impl core::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Runtime").field("outbox", &self.outbox.len()).finish_non_exhaustive()
    }
}

fn slot(service: ServiceId) -> usize {
    match service {
        ServiceId::Core => 0,
        ServiceId::Monitor => 1,
        ServiceId::Migration => 2,
    }
}

impl Runtime {
    /// All tasks running, mailboxes empty.
    pub fn new(machine: MachineInfo) -> Self {
        // Built once the SMP table is final (after boot's jobs on the APs).
        let msrs = crate::platform::rdt::socket_msrs();
        Self {
            core: CoreService { machine, counters: ServiceCounters::new(ServiceId::Core) },
            monitor: if cfg!(test) { MonitorService::new() } else { crate::platform::rdt::monitor_service(msrs.map()) },
            msrs,
            migration: MigrationService::new(),
            mailboxes: [Mailbox::new(), Mailbox::new(), Mailbox::new()],
            outbox: Vec::new(),
            fed: BTreeMap::new(),
            last_mbm: 0,
            last_limbo: 0,
            busy_refusals: [0; 3],
            uploads: Uploads::new(),
        }
    }

    /// Route a request frame to its task's mailbox. A frame that is not a request, or
    /// whose payload does not decode, is answered at once; a full mailbox answers Busy.
    pub fn route(&mut self, reply_to: ReplyTo, frame: Frame) {
        if frame.kind != FrameKind::Request {
            let reply = ErrorReply::new(
                ErrorCode::BadRequest,
                alloc::format!("expected a request frame, got a {} frame", frame.kind.name()),
            );
            self.outbox.push((reply_to, encode_reply(frame.request_id, &Response::Error(reply))));
            return;
        }
        let service = match wire::decode_request(&frame) {
            Ok(request) => request.service(),
            Err(reply) => {
                self.outbox.push((reply_to, encode_reply(frame.request_id, &Response::Error(reply))));
                return;
            }
        };
        let i = slot(service);
        let request_id = frame.request_id;
        if self.mailboxes[i].queue.push_back(Envelope { reply_to, frame }).is_err() {
            self.busy_refusals[i] += 1;
            let reply = ErrorReply::new(
                ErrorCode::Busy,
                alloc::format!(
                    "the {} service's mailbox is full ({MAILBOX_CAPACITY} requests); retry later",
                    service.name()
                ),
            );
            self.outbox.push((reply_to, encode_reply(request_id, &Response::Error(reply))));
        }
    }

    /// Give every task one turn. Returns whether any message was handled.
    pub fn run_once(&mut self, uptime_ns: Option<u64>, domains: &mut dyn DomainOps) -> bool {
        let mut worked = false;
        if let Some(now) = uptime_ns
            && self.uploads.any_idle(now)
            && let Some(mut pool) = domains.staging()
        {
            self.uploads.expire(&mut pool, now);
        }
        for _ in 0..TURN_BUDGET {
            let Some(env) = self.mailboxes[0].queue.pop_front() else { break };
            let reply = self.handle_core(env.reply_to, &env.frame, uptime_ns, domains);
            self.outbox.push((env.reply_to, reply));
            worked = true;
        }
        if !self.mailboxes[1].queue.is_empty() {
            self.feed_monitor(domains);
        }
        let monitor_turn = !self.mailboxes[1].queue.is_empty();
        for _ in 0..TURN_BUDGET {
            let Some(env) = self.mailboxes[1].queue.pop_front() else { break };
            let (depth, capacity) = self.mailboxes[1].queue_info();
            let now = crate::drivers::time::now_ticks();
            let reply = self.monitor.handle_with(&env.frame, QueueInfo { depth, capacity }, &mut self.msrs, now);
            self.outbox.push((env.reply_to, reply));
            worked = true;
        }
        if monitor_turn {
            self.sync_rmids(domains);
        }
        for _ in 0..TURN_BUDGET {
            let Some(env) = self.mailboxes[2].queue.pop_front() else { break };
            let (depth, capacity) = self.mailboxes[2].queue_info();
            let queue = QueueInfo { depth, capacity };
            let reply = match domains.migration() {
                Some(core) => self.migration.handle_with(&env.frame, queue, core),
                None => self.migration.handle(&env.frame, queue),
            };
            self.outbox.push((env.reply_to, reply));
            worked = true;
        }
        // A migration whose relay went quiet must not hold a paused domain forever.
        if self.migration.active()
            && let Some(core) = domains.migration()
        {
            self.migration.tick(core);
        }
        worked
    }

    /// Give the monitoring service the core's counts since the last time (deltas), and
    /// tell it about domains that are gone. Only enabled events keep anything.
    fn feed_monitor(&mut self, domains: &dyn DomainOps) {
        use monitor_svc::DomainId;
        use monitor_svc::events::SoftwareCount;
        let Some(m) = self.monitor.monitor_mut() else { return };
        let now = domains.counters();
        for DomainCounters { id, exits, runtime_ns, .. } in &now {
            let (seen, seen_runtime) = self.fed.entry(*id).or_default();
            for (kind, count) in exits {
                let before = seen.insert(*kind, *count).unwrap_or(0);
                if *count > before {
                    m.record(DomainId(*id), SoftwareCount::Exits(*kind, count - before));
                }
            }
            if *runtime_ns > *seen_runtime {
                m.record(DomainId(*id), SoftwareCount::RuntimeNs(runtime_ns - *seen_runtime));
                *seen_runtime = *runtime_ns;
            }
        }
        let gone: Vec<u32> = self.fed.keys().copied().filter(|id| !now.iter().any(|c| c.id == *id)).collect();
        for id in gone {
            self.fed.remove(&id);
            m.domain_destroyed(DomainId(id), &mut self.msrs, crate::drivers::time::now_ticks());
        }
    }

    /// The monitoring service's RMID assignments, handed to the core (which writes
    /// IA32_PQR_ASSOC on vCPU entry). Sent after every monitoring turn, so an attach or
    /// detach is in force before the next vCPU runs.
    fn sync_rmids(&mut self, domains: &mut dyn DomainOps) {
        let Some(m) = self.monitor.monitor() else { return };
        for c in domains.counters() {
            let vcpus = c.vcpus;
            let rmids = (0..vcpus).map(|v| m.rmid_for(monitor_svc::DomainId(c.id), v)).collect();
            domains.set_rmids(c.id, rmids);
        }
    }

    /// The periodic work of the monitoring service: MBM samples well inside the
    /// counters' wrap period, and limbo rechecks (only when RDT is present).
    pub fn monitor_timers(&mut self, now_tsc: u64, tsc_hz: u64) {
        let Some(m) = self.monitor.monitor_mut() else { return };
        if !matches!(m.caps(), monitor_svc::caps::MonitorCaps::Present(_)) || tsc_hz == 0 {
            return;
        }
        let mbm_every = u128::from(m.mbm_sample_interval_ns()) * u128::from(tsc_hz) / 1_000_000_000;
        if u128::from(now_tsc.wrapping_sub(self.last_mbm)) >= mbm_every {
            self.last_mbm = now_tsc;
            m.sample_mbm(&mut self.msrs, now_tsc);
        }
        if now_tsc.wrapping_sub(self.last_limbo) >= tsc_hz {
            self.last_limbo = now_tsc;
            m.recheck_limbo(&mut self.msrs);
        }
    }

    /// Take the replies produced so far.
    pub fn take_outbox(&mut self) -> Vec<(ReplyTo, Vec<u8>)> {
        core::mem::take(&mut self.outbox)
    }

    /// Requests refused with Busy so far, per service (core, monitor, migration).
    pub fn busy_refusals(&self) -> [u64; 3] {
        self.busy_refusals
    }

    /// Ask a service for its status by message, as any client would.
    fn service_status(&mut self, service: ServiceId) -> Result<ServiceStatus, ErrorReply> {
        let mut bytes = Vec::new();
        wire::encode_request(u64::MAX, &Request::ServiceStatus { service }, &mut bytes)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, alloc::format!("{e}")))?;
        let mut decoder = wire::FrameDecoder::new();
        decoder.push(&bytes);
        let frame = match decoder.next_frame() {
            Some(Ok(frame)) => frame,
            _ => return Err(ErrorReply::new(ErrorCode::Internal, "cannot frame a status request")),
        };
        let i = slot(service);
        let (depth, capacity) = self.mailboxes[i].queue_info();
        let reply = match service {
            ServiceId::Core => return Ok(self.core_status()),
            ServiceId::Monitor => self.monitor.handle(&frame, QueueInfo { depth, capacity }),
            ServiceId::Migration => self.migration.handle(&frame, QueueInfo { depth, capacity }),
        };
        let mut decoder = wire::FrameDecoder::new();
        decoder.push(&reply);
        match decoder.next_frame() {
            Some(Ok(frame)) => match wire::decode_response(&frame)? {
                Response::ServiceStatus(status) => Ok(status),
                Response::Error(e) => Err(e),
                _ => Err(ErrorReply::new(ErrorCode::Internal, "unexpected reply to a status request")),
            },
            _ => Err(ErrorReply::new(ErrorCode::Internal, "a service sent an unreadable status reply")),
        }
    }

    /// Connection `to` closed: free the uploads it began (requests of it still in a
    /// mailbox are answered into the void, as before).
    pub fn connection_closed(&mut self, to: ReplyTo, domains: &mut dyn DomainOps) {
        if !self.uploads.is_empty()
            && let Some(mut pool) = domains.staging()
        {
            self.uploads.release_owner(&mut pool, to);
        }
    }

    /// Uploads held now (for tests and status).
    pub fn uploads_held(&self) -> usize {
        self.uploads.len()
    }

    /// `DomainCreate`: resolve the kernel and initrd references (an uploaded image is
    /// used up whatever the outcome), create, give the staging frames back.
    fn create(&mut self, spec: &wire::DomainSpec, domains: &mut dyn DomainOps) -> Result<u32, ErrorReply> {
        let kernel = self.resolve(&spec.kernel, ImageKind::Kernel)?;
        let initrd = match spec.initrd.as_ref().map(|r| self.resolve(r, ImageKind::Initrd)).transpose() {
            Ok(i) => i,
            Err(e) => {
                release(kernel, domains);
                return Err(e);
            }
        };
        let result = domains.create(spec, kernel.bytes(), initrd.as_ref().map(Image::bytes));
        release(kernel, domains);
        if let Some(i) = initrd {
            release(i, domains);
        }
        result
    }

    fn resolve<'a>(&mut self, image: &'a ImageRef, kind: ImageKind) -> Result<Image<'a>, ErrorReply> {
        Ok(match image {
            ImageRef::Inline(bytes) => Image::Inline(bytes),
            ImageRef::Uploaded(id) => Image::Staged(self.uploads.take(*id, kind)?),
        })
    }

    fn core_status(&self) -> ServiceStatus {
        let (depth, capacity) = self.mailboxes[0].queue_info();
        self.core.counters.status(QueueInfo { depth, capacity })
    }

    fn handle_core(
        &mut self,
        reply_to: ReplyTo,
        frame: &Frame,
        uptime_ns: Option<u64>,
        domains: &mut dyn DomainOps,
    ) -> Vec<u8> {
        self.core.counters.handled += 1;
        let response = match wire::decode_request(frame) {
            Ok(Request::Ping { payload }) => Response::Pong { payload },
            Ok(Request::ServiceStatus { .. }) => Response::ServiceStatus(self.core_status()),
            Ok(Request::DomainCreate(spec)) => {
                self.create(&spec, domains).map_or_else(Response::Error, |id| Response::DomainCreated { id })
            }
            Ok(Request::ImageBegin { kind, total_len, crc32c }) => match domains.staging() {
                Some(mut pool) => self
                    .uploads
                    .begin(&mut pool, reply_to, kind, total_len, crc32c, uptime_ns.unwrap_or(0))
                    .map_or_else(Response::Error, Response::Upload),
                None => Response::Error(no_uploads()),
            },
            Ok(Request::ImageChunk { upload, offset, bytes, crc32c }) => match domains.staging() {
                Some(mut pool) => self
                    .uploads
                    .chunk(&mut pool, upload, offset, &bytes, crc32c, uptime_ns.unwrap_or(0))
                    .map_or_else(Response::Error, Response::Upload),
                None => Response::Error(no_uploads()),
            },
            Ok(Request::ImageCancel { upload }) => match domains.staging() {
                Some(mut pool) => {
                    self.uploads.cancel(&mut pool, upload).map_or_else(Response::Error, |()| Response::Done)
                }
                None => Response::Error(no_uploads()),
            },
            Ok(Request::DomainConsoleInput { id, bytes }) => {
                if bytes.len() > wire::MAX_CONSOLE_INPUT {
                    Response::Error(ErrorReply::new(
                        ErrorCode::Refused,
                        alloc::format!(
                            "{} bytes of console input in one request; at most {} are taken",
                            bytes.len(),
                            wire::MAX_CONSOLE_INPUT
                        ),
                    ))
                } else {
                    domains
                        .console_input(id, &bytes)
                        .map_or_else(Response::Error, |accepted| Response::ConsoleInput { id, accepted })
                }
            }
            Ok(Request::DomainList) => Response::DomainList(domains.list()),
            Ok(Request::HostCpuid) => Response::HostCpuid(self.core.machine.cpuid.clone()),
            Ok(Request::BenchFill { len }) => bench_fill(len),
            Ok(Request::BenchDiscard { bytes }) => match u32::try_from(bytes.len()) {
                Ok(len) if bytes.len() <= wire::MAX_BENCH_DATA => Response::BenchDiscarded { len },
                _ => Response::Error(bench_too_long(bytes.len())),
            },
            Ok(Request::DomainPin { id, cpus }) => {
                domains.pin(id, cpus).map_or_else(Response::Error, |()| Response::Done)
            }
            Ok(Request::DomainPause { id }) => {
                domains.set_paused(id, true).map_or_else(Response::Error, |()| Response::Done)
            }
            Ok(Request::DomainUnpause { id }) => {
                domains.set_paused(id, false).map_or_else(Response::Error, |()| Response::Done)
            }
            Ok(Request::DomainDestroy { id }) => domains.destroy(id).map_or_else(Response::Error, |()| Response::Done),
            Ok(Request::DomainConsole { id, offset }) => {
                domains.console(id, offset).map_or_else(Response::Error, Response::Console)
            }
            Ok(Request::Info) => match uptime_ns {
                None => Response::Error(ErrorReply::new(
                    ErrorCode::Internal,
                    "uptime unknown: the TSC could not be calibrated at boot (see the serial log)",
                )),
                Some(uptime_ns) => {
                    let mut services = Vec::new();
                    let mut failure = None;
                    for s in ServiceId::ALL {
                        match self.service_status(s) {
                            Ok(status) => services.push(status),
                            Err(e) => failure = Some(e),
                        }
                    }
                    match failure {
                        Some(e) => Response::Error(e),
                        None => Response::Info(alloc::boxed::Box::new(InfoReport {
                            hv_version: self.core.machine.hv_version.clone(),
                            protocol_version: wire::PROTOCOL_VERSION,
                            uptime_ns,
                            capabilities: self.core.machine.capabilities.clone(),
                            cpus: self.core.machine.cpus,
                            memory_bytes: self.core.machine.memory_bytes,
                            services,
                            memory_use: memory_use(domains.frames()),
                            control: self.core.machine.control.clone(),
                            cpu_list: self.core.machine.cpu_list.clone(),
                        })),
                    }
                }
            },
            Ok(Request::DirtyStart { domain, mode, range }) => {
                domains.dirty_start(domain, 0, &mode, range).map_or_else(Response::Error, Response::DirtyStats)
            }
            Ok(Request::DirtyStop { domain }) => {
                domains.dirty_stop(domain, 0).map_or_else(Response::Error, Response::DirtyStats)
            }
            Ok(Request::DirtyStats { domain }) => {
                domains.dirty_stats(domain, 0).map_or_else(Response::Error, Response::DirtyStats)
            }
            Ok(Request::DirtyPeek { domain, clean }) => {
                domains.dirty_peek(domain, 0, clean).map_or_else(Response::Error, Response::DirtyBitmap)
            }
            Ok(Request::DirtyTrack { domain, range }) => {
                domains.dirty_start(domain, 1, "auto", Some(range)).map_or_else(Response::Error, Response::DirtyStats)
            }
            Ok(Request::DirtyTrackPeek { domain, clean }) => {
                domains.dirty_peek(domain, 1, clean).map_or_else(Response::Error, Response::DirtyBitmap)
            }
            Ok(Request::DirtyTrackStop { domain }) => {
                domains.dirty_stop(domain, 1).map_or_else(Response::Error, Response::DirtyStats)
            }
            Ok(other) => Response::Error(ErrorReply::new(
                ErrorCode::Internal,
                alloc::format!(
                    "{} reached the core, but it belongs to the {} service",
                    other.name(),
                    other.service().name()
                ),
            )),
            Err(reply) => Response::Error(reply),
        };
        if response.error().is_some() {
            self.core.counters.errors += 1;
        }
        encode_reply(frame.request_id, &response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn machine() -> MachineInfo {
        MachineInfo {
            hv_version: "0.1.0 (test)".into(),
            capabilities: vec![("virt".to_string(), "svm".to_string())],
            cpus: 1,
            cpu_list: vec![wire::CpuInfo {
                apic_id: 0,
                state: wire::CpuState::Boot,
                package: Some(0),
                socket: Some(0),
            }],
            memory_bytes: 512 << 20,
            control: vec!["vsock port 5000 (CID 3)".to_string()],
            cpuid: wire::HostCpuidReport {
                source: "test machine".to_string(),
                records: vec![wire::CpuidLeaf { leaf: 0, subleaf: 0, regs: [0xd, 1, 2, 3] }],
            },
        }
    }

    fn frame(id: u64, req: &Request) -> Frame {
        let mut bytes = Vec::new();
        wire::encode_request(id, req, &mut bytes).unwrap();
        let mut d = wire::FrameDecoder::new();
        d.push(&bytes);
        d.next_frame().unwrap().unwrap()
    }

    fn responses(rt: &mut Runtime) -> Vec<(ReplyTo, u64, Response)> {
        rt.take_outbox()
            .into_iter()
            .map(|(to, bytes)| {
                let mut d = wire::FrameDecoder::new();
                d.push(&bytes);
                let f = d.next_frame().unwrap().unwrap();
                (to, f.request_id, wire::decode_response(&f).unwrap())
            })
            .collect()
    }

    #[test]
    fn full_mailbox_answers_busy_at_once_and_memory_stays_bounded() {
        let mut rt = Runtime::new(machine());
        for id in 1..=(MAILBOX_CAPACITY as u64 + 3) {
            rt.route(7, frame(id, &Request::Ping { payload: vec![1, 2] }));
        }
        let busy = responses(&mut rt);
        assert_eq!(busy.len(), 3, "only the overflow is answered before the task runs");
        for (to, id, r) in &busy {
            assert_eq!(*to, 7);
            assert!(*id > MAILBOX_CAPACITY as u64);
            assert_eq!(r.error().map(|e| e.code), Some(ErrorCode::Busy));
        }
        assert_eq!(rt.busy_refusals(), [3, 0, 0]);
        // The queued ones are all answered, TURN_BUDGET per turn, in order.
        let mut answered = Vec::new();
        while rt.run_once(Some(1), &mut NoDomains) {
            let batch = responses(&mut rt);
            assert!(batch.len() <= TURN_BUDGET);
            answered.extend(batch);
        }
        let ids: Vec<u64> = answered.iter().map(|(_, id, _)| *id).collect();
        assert_eq!(ids, (1..=MAILBOX_CAPACITY as u64).collect::<Vec<_>>());
        assert!(answered.iter().all(|(_, _, r)| *r == Response::Pong { payload: vec![1, 2] }));
    }

    #[test]
    fn requests_reach_the_service_that_owns_them() {
        let mut rt = Runtime::new(machine());
        rt.route(1, frame(10, &Request::ServiceStatus { service: ServiceId::Monitor }));
        rt.route(2, frame(11, &Request::ServiceStatus { service: ServiceId::Migration }));
        rt.route(3, frame(12, &Request::ServiceStatus { service: ServiceId::Core }));
        rt.run_once(Some(1), &mut NoDomains);
        let mut got = responses(&mut rt);
        got.sort_by_key(|(to, _, _)| *to);
        let services: Vec<ServiceId> = got
            .iter()
            .map(|(_, _, r)| match r {
                Response::ServiceStatus(s) => s.service,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(services, [ServiceId::Monitor, ServiceId::Migration, ServiceId::Core]);
    }

    #[test]
    fn info_gathers_every_service_status_by_message() {
        let mut rt = Runtime::new(machine());
        rt.route(1, frame(1, &Request::ServiceStatus { service: ServiceId::Monitor }));
        rt.run_once(Some(41), &mut NoDomains);
        rt.route(1, frame(2, &Request::Info));
        rt.run_once(Some(42), &mut NoDomains);
        let got = responses(&mut rt);
        let info = got
            .iter()
            .find_map(|(_, id, r)| match (id, r) {
                (2, Response::Info(i)) => Some((**i).clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(info.uptime_ns, 42);
        assert_eq!(info.protocol_version, wire::PROTOCOL_VERSION);
        assert_eq!(info.capability("virt"), Some("svm"));
        assert_eq!(info.services.len(), 3);
        let monitor = info.services.iter().find(|s| s.service == ServiceId::Monitor).unwrap();
        // The client's status request and the core's own, both by message.
        assert_eq!(monitor.handled, 2);
        assert_eq!(monitor.queue_capacity, MAILBOX_CAPACITY as u32);
        let core = info.services.iter().find(|s| s.service == ServiceId::Core).unwrap();
        assert_eq!(core.handled, 1);
    }

    #[test]
    fn host_cpuid_answers_the_boot_probe_records() {
        let mut rt = Runtime::new(machine());
        rt.route(1, frame(3, &Request::HostCpuid));
        rt.run_once(None, &mut NoDomains);
        let got = responses(&mut rt);
        match &got[..] {
            [(_, 3, Response::HostCpuid(r))] => assert_eq!(r, &machine().cpuid),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bench_requests_move_bytes_and_refuse_more_than_a_piece() {
        let mut rt = Runtime::new(machine());
        let max = wire::MAX_BENCH_DATA as u32;
        rt.route(1, frame(1, &Request::BenchFill { len: max }));
        rt.route(1, frame(2, &Request::BenchFill { len: 0 }));
        rt.route(1, frame(3, &Request::BenchFill { len: max + 1 }));
        rt.route(1, frame(4, &Request::BenchFill { len: u32::MAX }));
        rt.run_once(None, &mut NoDomains);
        rt.route(1, frame(5, &Request::BenchDiscard { bytes: vec![7; wire::MAX_BENCH_DATA] }));
        rt.route(1, frame(6, &Request::BenchDiscard { bytes: vec![] }));
        rt.route(1, frame(7, &Request::BenchDiscard { bytes: vec![7; wire::MAX_BENCH_DATA + 1] }));
        rt.run_once(None, &mut NoDomains);
        let got = responses(&mut rt);
        match &got[..] {
            [
                (_, 1, Response::BenchData { bytes: full }),
                (_, 2, Response::BenchData { bytes: empty }),
                (_, 3, Response::Error(over)),
                (_, 4, Response::Error(huge)),
                (_, 5, Response::BenchDiscarded { len: taken }),
                (_, 6, Response::BenchDiscarded { len: 0 }),
                (_, 7, Response::Error(too_many)),
            ] => {
                assert!(full.len() == wire::MAX_BENCH_DATA && full.iter().all(|b| *b == 0));
                assert!(empty.is_empty());
                assert_eq!(*taken, max);
                for e in [over, huge, too_many] {
                    assert_eq!(e.code, ErrorCode::Refused, "{e}");
                    assert!(e.message.contains("at most 61440"), "{e}");
                }
            }
            other => panic!("{other:?}"),
        }
        // A full answer fits one frame.
        let bytes = encode_reply(1, &Response::BenchData { bytes: vec![0; wire::MAX_BENCH_DATA] });
        assert!(bytes.len() <= wire::HEADER_LEN + wire::MAX_FRAME_LEN);
    }

    #[test]
    fn bad_payloads_and_wrong_frame_kinds_get_typed_errors() {
        let mut rt = Runtime::new(machine());
        let v = wire::PROTOCOL_VERSION;
        rt.route(1, Frame { kind: FrameKind::Request, version: v, request_id: 5, payload: vec![0xff, 0xff] });
        rt.route(1, Frame { kind: FrameKind::Response, version: v, request_id: 6, payload: vec![] });
        let got = responses(&mut rt);
        assert_eq!(got.len(), 2);
        for (_, _, r) in got {
            assert_eq!(r.error().map(|e| e.code), Some(ErrorCode::BadRequest));
        }
        // Monitor refuses what it does not handle yet, and counts it.
        rt.route(1, frame(7, &Request::Ping { payload: vec![] }));
        rt.run_once(None, &mut NoDomains);
        let _ = responses(&mut rt);
        rt.route(1, frame(8, &Request::Info));
        rt.run_once(None, &mut NoDomains);
        let got = responses(&mut rt);
        assert_eq!(got[0].2.error().map(|e| e.code), Some(ErrorCode::Internal), "no uptime without a clock");
    }

    #[test]
    fn domain_requests_go_to_the_domain_operations() {
        let mut rt = Runtime::new(machine());
        rt.route(1, frame(9, &Request::DomainDestroy { id: 4 }));
        rt.route(1, frame(10, &Request::DomainList));
        rt.run_once(Some(1), &mut NoDomains);
        let got = responses(&mut rt);
        assert_eq!(got[0].2, Response::Error(ErrorReply::new(ErrorCode::Refused, "no domain 4")));
        assert!(matches!(&got[1].2, Response::DomainList(l) if l.domains.is_empty()));
    }

    /// Domain operations over a host-test frame pool that remember what `create` got.
    struct Staging {
        pool: spin::Mutex<crate::mm::frames::FramePool>,
        created: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        input: Vec<u8>,
    }

    impl DomainOps for Staging {
        fn create(&mut self, _: &wire::DomainSpec, kernel: &[u8], initrd: Option<&[u8]>) -> Result<u32, ErrorReply> {
            self.created.push((kernel.to_vec(), initrd.map(<[u8]>::to_vec)));
            Ok(self.created.len() as u32)
        }
        fn list(&self) -> wire::DomainListReport {
            NoDomains.list()
        }
        fn set_paused(&mut self, id: u32, p: bool) -> Result<(), ErrorReply> {
            NoDomains.set_paused(id, p)
        }
        fn destroy(&mut self, id: u32) -> Result<(), ErrorReply> {
            NoDomains.destroy(id)
        }
        fn console(&self, id: u32, o: u64) -> Result<wire::ConsoleChunk, ErrorReply> {
            NoDomains.console(id, o)
        }
        fn console_input(&mut self, _: u32, bytes: &[u8]) -> Result<u32, ErrorReply> {
            let n = bytes.len().min(16);
            self.input.extend_from_slice(&bytes[..n]);
            Ok(n as u32)
        }
        fn staging(&mut self) -> Option<spin::MutexGuard<'_, crate::mm::frames::FramePool>> {
            Some(self.pool.lock())
        }
    }

    fn one(rt: &mut Runtime, d: &mut Staging, id: u64, req: &Request) -> Response {
        rt.route(1, frame(id, req));
        rt.run_once(Some(id), d);
        let mut got = responses(rt);
        assert_eq!(got.len(), 1);
        got.remove(0).2
    }

    fn spec(kernel: ImageRef, initrd: Option<ImageRef>) -> wire::DomainSpec {
        wire::DomainSpec {
            name: "up".into(),
            kernel,
            initrd,
            memory_bytes: 16 << 20,
            vcpus: 1,
            cpuid: None,
            cmdline: String::new(),
            cpus: None,
        }
    }

    #[test]
    fn uploaded_images_reach_create_and_their_frames_come_back() {
        let mut rt = Runtime::new(machine());
        let mut d = Staging {
            pool: spin::Mutex::new(crate::mm::frames::testing::pool(200)),
            created: Vec::new(),
            input: Vec::new(),
        };
        let free = d.pool.lock().free_frames();
        let kernel: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let initrd = vec![7u8; 70_000];
        let mut ids = Vec::new();
        let mut n = 1;
        for (kind, img) in [(ImageKind::Kernel, &kernel), (ImageKind::Initrd, &initrd)] {
            let begin = Request::ImageBegin { kind, total_len: img.len() as u64, crc32c: wire::crc32c(img) };
            let Response::Upload(s) = one(&mut rt, &mut d, n, &begin) else { panic!("begin") };
            n += 1;
            let mut offset = 0;
            for c in img.chunks(wire::MAX_IMAGE_CHUNK) {
                let chunk =
                    Request::ImageChunk { upload: s.upload, offset, bytes: c.to_vec(), crc32c: wire::crc32c(c) };
                let Response::Upload(st) = one(&mut rt, &mut d, n, &chunk) else { panic!("chunk") };
                n += 1;
                offset += c.len() as u64;
                assert_eq!(st.received, offset);
            }
            ids.push(s.upload);
        }
        assert!(d.pool.lock().free_frames() < free);
        // The initrd named as a kernel is refused and, like every used reference, gone.
        let wrong = spec(ImageRef::Uploaded(ids[1]), None);
        let e = one(&mut rt, &mut d, n, &Request::DomainCreate(wrong));
        assert!(
            e.error()
                .is_some_and(|e| e.message.contains("holds an image of kind `initrd`, but `kernel` was asked for")),
            "{e:?}"
        );
        assert_eq!(rt.uploads_held(), 2, "a refused kind check consumes nothing");
        let good = spec(ImageRef::Uploaded(ids[0]), Some(ImageRef::Uploaded(ids[1])));
        assert_eq!(one(&mut rt, &mut d, n + 1, &Request::DomainCreate(good)), Response::DomainCreated { id: 1 });
        assert!(d.created[0].0 == kernel && d.created[0].1.as_deref() == Some(&initrd[..]));
        assert_eq!(d.pool.lock().free_frames(), free, "the staging frames are back");
        assert_eq!(rt.uploads_held(), 0);
        // Inline images still work.
        let inline = spec(ImageRef::Inline(vec![1, 2, 3]), None);
        assert_eq!(one(&mut rt, &mut d, n + 2, &Request::DomainCreate(inline)), Response::DomainCreated { id: 2 });
        // Console input: bounded, and the count the UART took comes back.
        let r = one(&mut rt, &mut d, n + 3, &Request::DomainConsoleInput { id: 1, bytes: vec![b'a'; 20] });
        assert_eq!(r, Response::ConsoleInput { id: 1, accepted: 16 });
        let big = Request::DomainConsoleInput { id: 1, bytes: vec![0; wire::MAX_CONSOLE_INPUT + 1] };
        assert_eq!(one(&mut rt, &mut d, n + 4, &big).error().map(|e| e.code), Some(ErrorCode::Refused));
        // An upload is freed when the connection that began it closes.
        let begin = Request::ImageBegin { kind: ImageKind::Kernel, total_len: 70_000, crc32c: 0 };
        assert!(matches!(one(&mut rt, &mut d, n + 5, &begin), Response::Upload(_)));
        assert_eq!(rt.uploads_held(), 1);
        rt.connection_closed(2, &mut d);
        assert_eq!(rt.uploads_held(), 1, "another connection's close leaves it");
        rt.connection_closed(1, &mut d);
        assert_eq!((rt.uploads_held(), d.pool.lock().free_frames()), (0, free));
        // Without a pool, uploads are refused as not implemented.
        rt.route(1, frame(99, &Request::ImageBegin { kind: ImageKind::Kernel, total_len: 5, crc32c: 0 }));
        rt.run_once(Some(1), &mut NoDomains);
        assert_eq!(responses(&mut rt)[0].2.error().map(|e| e.code), Some(ErrorCode::NotImplemented));
    }
}
