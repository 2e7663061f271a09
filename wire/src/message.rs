//! The messages: [`Request`] (hvctl → hypervisor), [`Response`] (hypervisor → hvctl),
//! [`Event`] (unsolicited), the types they carry, and the helpers that put them in
//! frames and take them out.
//!
//! The enums are deliberately not `#[non_exhaustive]`: adding a message is a protocol
//! version bump, and every `match` in the router and in hvctl should then fail to
//! compile until it handles the new message.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{decode_message, encode_message};
use crate::error::ErrorReply;
use crate::frame::{Frame, FrameKind, WireError};
use crate::migrate::{MigrateOptions, MigrateProgress, PeerVerdict, ReceiveStatus};
use crate::upload::{ImageKind, ImageRef, UploadStatus};

/// A task that owns requests: the router sends each request to its service's mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ServiceId {
    /// The hypervisor core itself (ping, info).
    Core,
    /// `monitor_svc`: RDT/PQoS monitoring and per-domain events.
    Monitor,
    /// `migration_svc`: log-dirty rounds and migration streams.
    Migration,
}

impl ServiceId {
    /// Every service, in wire order.
    pub const ALL: [ServiceId; 3] = [Self::Core, Self::Monitor, Self::Migration];

    /// A lower-case name ("core", "monitor", "migration").
    pub const fn name(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Monitor => "monitor",
            Self::Migration => "migration",
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The life-cycle state of a service task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceState {
    /// Created, not yet taking requests.
    Starting,
    /// Taking requests.
    Running,
    /// Stopped; requests to it are refused.
    Stopped,
}

impl ServiceState {
    /// A lower-case name ("starting", "running", "stopped").
    pub const fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One service's state and counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Which service.
    pub service: ServiceId,
    /// Its life-cycle state.
    pub state: ServiceState,
    /// Requests it has answered (successfully or not).
    pub handled: u64,
    /// Requests it answered with an error.
    pub errors: u64,
    /// Requests waiting in its mailbox now.
    pub queue_depth: u32,
    /// Its mailbox capacity; a request arriving when it is full gets
    /// [`ErrorCode::Busy`](crate::ErrorCode::Busy).
    pub queue_capacity: u32,
}

/// What the hypervisor reports about itself (`hvctl info`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InfoReport {
    /// The hypervisor's version string, e.g. `"0.1.0 (5a3cac6)"`.
    pub hv_version: String,
    /// The protocol version the hypervisor speaks (equal to
    /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION), or the frame would have been refused).
    pub protocol_version: u16,
    /// Nanoseconds since the hypervisor took the machine.
    pub uptime_ns: u64,
    /// The `key=value` pairs of the `CAPS` line the hypervisor prints at boot, in order
    /// (`vendor`, `virt`, `svm.npt`, `usable`, ...).
    pub capabilities: Vec<(String, String)>,
    /// Logical CPUs the hypervisor runs on.
    pub cpus: u32,
    /// Memory the hypervisor manages, in bytes.
    pub memory_bytes: u64,
    /// Every service task's status.
    pub services: Vec<ServiceStatus>,
    /// The hypervisor's own memory: its heap and its frame pool. Since protocol
    /// version 4.
    pub memory_use: MemoryUse,
    /// The control transports this hypervisor serves, one line each (`"vsock port 5000
    /// (CID 3)"`, `"serial COM2 0x2f8 115200 baud"`). Since protocol version 6.
    pub control: Vec<String>,
    /// (v8) Every physical CPU the firmware reported, the bootstrap CPU first, with
    /// where its bring-up got to. `cpus` counts the boot CPU and the started ones.
    pub cpu_list: Vec<CpuInfo>,
}

/// (v8) One physical CPU of the machine, as [`InfoReport::cpu_list`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Its local APIC ID.
    pub apic_id: u32,
    /// Where its bring-up got to.
    pub state: CpuState,
    /// (v11) Its package (physical socket) ID as its own CPUID reports it (leaf 0x1F,
    /// 0xB, AMD 0x8000_0008 or leaf 1); `None` when it never ran far enough to read it
    /// (it did not check in).
    pub package: Option<u32>,
    /// (v11) The hypervisor's number for that package, 0.. in the order the CPU list
    /// first names it (the boot CPU's is 0): the socket index of
    /// [`MonitorHwInfo::socket_cpus`] and of the monitoring stats' `per_socket` lists.
    pub socket: Option<u32>,
}

/// (v8) A physical CPU's state. Variant order is wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuState {
    /// The bootstrap CPU: runs the hypervisor (scheduling, services, guests).
    Boot,
    /// An application processor that started and is parked, waiting for work.
    Started,
    /// An application processor that did not check in after INIT-SIPI-SIPI (or was
    /// not started: `smp=off`).
    Failed,
}

impl CpuState {
    /// Its name in `hvctl info` and its JSON: `boot`, `started`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Started => "started",
            Self::Failed => "failed",
        }
    }
}

/// How full the hypervisor's own memory is: the heap (control requests, services,
/// dirty bitmaps) and the frame pool (guest memory, page tables, control blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Bytes of heap.
    pub heap_bytes: u64,
    /// Bytes of heap in use.
    pub heap_used_bytes: u64,
    /// The most heap bytes ever in use at once since boot.
    pub heap_peak_bytes: u64,
    /// Allocations the heap refused since boot (each became an error reply, or the
    /// hypervisor stopped).
    pub heap_refused: u64,
    /// 4 KiB frames in the pool.
    pub frames_total: u64,
    /// Frames free.
    pub frames_free: u64,
}

impl InfoReport {
    /// The value of capability `key`, if reported.
    pub fn capability(&self, key: &str) -> Option<&str> {
        self.capabilities.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A request from hvctl to the hypervisor. New requests are appended (with a protocol
/// version bump); variant order is wire format.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and round-trip check: answered by [`Response::Pong`] with the same bytes.
    Ping {
        /// Arbitrary bytes to echo.
        #[serde(with = "crate::bytes")]
        payload: Vec<u8>,
    },
    /// Ask for the [`InfoReport`].
    Info,
    /// Ask for one service's [`ServiceStatus`].
    ServiceStatus {
        /// Which service.
        service: ServiceId,
    },
    /// Create and start a domain (v2). Answered by [`Response::DomainCreated`].
    DomainCreate(DomainSpec),
    /// List the domains (v2). Answered by [`Response::DomainList`].
    DomainList,
    /// Stop scheduling a running domain (v2). Answered by [`Response::Done`].
    DomainPause {
        /// Domain id.
        id: u32,
    },
    /// Resume a paused domain (v2). Answered by [`Response::Done`].
    DomainUnpause {
        /// Domain id.
        id: u32,
    },
    /// Destroy a domain in any state, returning its memory (v2). Answered by
    /// [`Response::Done`].
    DomainDestroy {
        /// Domain id.
        id: u32,
    },
    /// Read a domain's console from byte `offset` on (v2). Answered by
    /// [`Response::Console`].
    DomainConsole {
        /// Domain id.
        id: u32,
        /// First byte wanted (console bytes are numbered from 0 since the domain started).
        offset: u64,
    },
    /// What RDT monitoring this machine has (v2). Answered by [`Response::MonitorHwInfo`].
    MonitorHwInfo,
    /// Give a domain (or some of its vCPUs) an RMID (v2). Answered by [`Response::Done`].
    MonitorAttach {
        /// Domain id.
        domain: u32,
        /// vCPU indices; `None` for all.
        vcpus: Option<Vec<u32>>,
    },
    /// Take every RMID of a domain back (v2). Answered by [`Response::Done`].
    MonitorDetach {
        /// Domain id.
        domain: u32,
    },
    /// Enable and disable events of a domain by name (v2). Answered by [`Response::Done`].
    MonitorEvents {
        /// Domain id.
        domain: u32,
        /// Event names to enable (`llc_occupancy`, `vm_exits`, ...).
        enable: Vec<String>,
        /// Event names to disable.
        disable: Vec<String>,
    },
    /// Every enabled event of one domain, or of all (v2). Answered by
    /// [`Response::MonitorStats`].
    MonitorStats {
        /// Domain id; `None` for every domain with an enabled event.
        domain: Option<u32>,
    },
    /// Start log-dirty mode (v2). Answered by [`Response::DirtyStats`].
    DirtyStart {
        /// Domain id.
        domain: u32,
        /// `auto`, `pml`, `dbit` or `wp`.
        mode: String,
        /// First page frame and page count to track; `None` for the whole domain.
        range: Option<(u64, u64)>,
    },
    /// Stop log-dirty mode (v2). Answered by [`Response::DirtyStats`] (the final counts).
    DirtyStop {
        /// Domain id.
        domain: u32,
    },
    /// The log's counters (v2). Answered by [`Response::DirtyStats`].
    DirtyStats {
        /// Domain id.
        domain: u32,
    },
    /// The dirty pages, optionally cleaning them (v2). Answered by [`Response::DirtyBitmap`].
    DirtyPeek {
        /// Domain id.
        domain: u32,
        /// Clean (and re-arm) what is reported.
        clean: bool,
    },
    /// Start the tracking log: a second log over one range, coexisting with the main
    /// log and sharing its mechanism, like Xen's video-RAM tracking (v2). Answered by
    /// [`Response::DirtyStats`].
    DirtyTrack {
        /// Domain id.
        domain: u32,
        /// First page frame and page count.
        range: (u64, u64),
    },
    /// The tracking log's dirty pages, optionally cleaning them (v2). Answered by
    /// [`Response::DirtyBitmap`].
    DirtyTrackPeek {
        /// Domain id.
        domain: u32,
        /// Clean (and re-arm) what is reported.
        clean: bool,
    },
    /// Stop the tracking log (v2). Answered by [`Response::DirtyStats`].
    DirtyTrackStop {
        /// Domain id.
        domain: u32,
    },
    /// (v3) Start sending domain `domain` as a migration stream (source side).
    MigrateSend {
        /// The domain.
        domain: u32,
        /// How.
        options: MigrateOptions,
    },
    /// (v3) Take at most `max_bytes` (≤ [`MAX_MIGRATE_DATA`]) of session `session`'s
    /// stream. Fewer (or none) while the source waits for a verdict or the bandwidth cap.
    MigrateRead {
        /// The sending session.
        session: u32,
        /// The most bytes to return.
        max_bytes: u32,
    },
    /// (v3) Hand the source the destination's verdict.
    MigrateVerdict {
        /// The sending session.
        session: u32,
        /// What the destination said.
        verdict: PeerVerdict,
    },
    /// (v3) Cancel the sending migration of domain `domain`: the domain runs on, with
    /// its dirty bits given back.
    MigrateCancel {
        /// The domain.
        domain: u32,
    },
    /// (v3) Open a receiving session (destination side).
    MigrateReceive,
    /// (v3) Push stream bytes (≤ [`MAX_MIGRATE_DATA`]) into a receiving session.
    MigrateWrite {
        /// The receiving session.
        session: u32,
        /// The bytes, in stream order.
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// (v3) Give up a receiving session: its partial domain is discarded.
    MigrateAbort {
        /// The receiving session.
        session: u32,
        /// Why (shown in the destination's status).
        reason: String,
    },
    /// (v5) Announce an image upload (see [`crate::upload`]). Answered by
    /// [`Response::Upload`] with the new upload's id and window.
    ImageBegin {
        /// Kernel or initrd.
        kind: ImageKind,
        /// Bytes that will follow (1..=[`MAX_IMAGE_LEN`](crate::upload::MAX_IMAGE_LEN)).
        total_len: u64,
        /// CRC-32C of all of them.
        crc32c: u32,
    },
    /// (v5) The next bytes of an upload. Answered by [`Response::Upload`].
    ImageChunk {
        /// The upload.
        upload: u32,
        /// Where the bytes go: where the accepted bytes end.
        offset: u64,
        /// 1..=[`MAX_IMAGE_CHUNK`](crate::upload::MAX_IMAGE_CHUNK) bytes.
        #[serde(with = "crate::bytes")]
        bytes: Vec<u8>,
        /// CRC-32C of `bytes`.
        crc32c: u32,
    },
    /// (v5) Free an upload, finished or not. Answered by [`Response::Done`].
    ImageCancel {
        /// The upload.
        upload: u32,
    },
    /// (v5) Console input for a domain's UART receiver. Answered by
    /// [`Response::ConsoleInput`] with how many bytes the receiver took (fewer when its
    /// FIFO is full: send the rest again later).
    DomainConsoleInput {
        /// Domain id.
        id: u32,
        /// At most [`MAX_CONSOLE_INPUT`](crate::upload::MAX_CONSOLE_INPUT) bytes.
        #[serde(with = "crate::bytes")]
        bytes: Vec<u8>,
    },
    /// (v7) The host CPU's raw CPUID, every leaf and subleaf the hypervisor's probe
    /// walks (`levelling::enumerate` over the CPUID instruction, not what guests see).
    /// Answered by [`Response::HostCpuid`]; `hvctl cpuid dump/level/check` use it to
    /// level a fleet without logging in to each host.
    HostCpuid,
    /// (v9) Transport benchmark, hypervisor → client: answered by
    /// [`Response::BenchData`] with `len` (≤ [`MAX_BENCH_DATA`]) zero bytes. Nothing
    /// else happens: it measures what the control connection carries in the direction
    /// a `MigrateRead` moves the stream (`cargo xtask bench relay`).
    BenchFill {
        /// Bytes wanted (more than [`MAX_BENCH_DATA`] is refused).
        len: u32,
    },
    /// (v9) Transport benchmark, client → hypervisor: the hypervisor drops `bytes`
    /// (≤ [`MAX_BENCH_DATA`]) and answers [`Response::BenchDiscarded`] with their
    /// count: the direction a `MigrateWrite` moves the stream.
    BenchDiscard {
        /// Bytes to carry and forget.
        #[serde(with = "crate::bytes")]
        bytes: Vec<u8>,
    },
    /// (v10) Pin domain `id`'s vCPUs to physical CPUs: from now on they run only on the
    /// CPUs whose local APIC IDs are in `cpus`. `None` unpins (any CPU that runs vCPUs).
    /// Answered by [`Response::Done`]; the hypervisor refuses a CPU that does not run
    /// vCPUs (absent, failed, or not scheduling). At most [`MAX_PIN_CPUS`] entries and
    /// not empty, or [`decode_request`] refuses it.
    DomainPin {
        /// Domain id.
        id: u32,
        /// APIC IDs of the physical CPUs its vCPUs may run on; `None` for any.
        cpus: Option<Vec<u32>>,
    },
}

/// (v10) The most APIC IDs a CPU list ([`DomainSpec::cpus`], [`Request::DomainPin`],
/// [`DomainInfo::cpus`]) carries. [`decode_request`] refuses a longer (or empty) list
/// with [`ErrorCode::BadRequest`](crate::ErrorCode::BadRequest).
pub const MAX_PIN_CPUS: usize = 256;

/// Check a CPU list: `Ok` when it is absent or has 1..=[`MAX_PIN_CPUS`] entries, else
/// the [`ErrorReply`] to answer with. `what` names the field for the message ("DomainPin.cpus").
pub fn check_cpu_list(what: &str, cpus: Option<&[u32]>) -> Result<(), ErrorReply> {
    match cpus {
        Some([]) => Err(ErrorReply::new(
            crate::ErrorCode::BadRequest,
            alloc::format!("{what} is an empty CPU list (no CPU to run on); send None for any CPU"),
        )),
        Some(list) if list.len() > MAX_PIN_CPUS => Err(ErrorReply::new(
            crate::ErrorCode::BadRequest,
            alloc::format!("{what} lists {} CPUs; at most {MAX_PIN_CPUS} are allowed", list.len()),
        )),
        _ => Ok(()),
    }
}

/// One CPUID result in [`HostCpuidReport`]: the same fields, in the same order, as
/// `levelling::CpuidRecord` (wire depends on no other crate, so it has its own type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidLeaf {
    /// EAX input.
    pub leaf: u32,
    /// ECX input (0 for leaves that ignore it).
    pub subleaf: u32,
    /// `[eax, ebx, ecx, edx]` output.
    pub regs: [u32; 4],
}

/// The answer to [`Request::HostCpuid`] (v7).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostCpuidReport {
    /// Where the records come from, for the dump's `# source:` line (the hypervisor's
    /// version and the machine's identity).
    pub source: String,
    /// The records, sorted by (leaf, subleaf). At most a few hundred on real CPUs
    /// (≈ 20 bytes each encoded), well inside one frame.
    pub records: Vec<CpuidLeaf>,
}

/// The most stream bytes one `MigrateRead` answer or `MigrateWrite` request carries
/// (a frame's payload is at most [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN)).
pub const MAX_MIGRATE_DATA: usize = 60 * 1024;

/// The most bytes one [`Request::BenchFill`] answer or [`Request::BenchDiscard`]
/// carries (v9): a migration piece's size, so the benchmark moves what the relay does.
pub const MAX_BENCH_DATA: usize = MAX_MIGRATE_DATA;

/// Log-dirty counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirtyStatsReport {
    /// Domain id.
    pub domain: u32,
    /// `pml`, `dbit` or `wp`.
    pub mode: String,
    /// Pages newly logged since logging started.
    pub pages_dirtied: u64,
    /// Pages dirty now (not yet cleaned).
    pub dirty_now: u64,
    /// Peek-and-clean rounds.
    pub rounds: u64,
    /// VM exits logging caused (write-protect faults, PML-full exits).
    pub logging_exits: u64,
    /// First tracked page frame.
    pub range_start: u64,
    /// Tracked pages.
    pub range_pages: u64,
}

/// Dirty pages as compact records (see [`crate::dirty`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirtyBitmapReport {
    /// Domain id.
    pub domain: u32,
    /// Pages the bitmap covers (from page frame 0).
    pub pages: u64,
    /// Dirty pages in it.
    pub dirty: u64,
    /// The records; apply them to a bitmap of `pages` pages.
    pub records: Vec<crate::dirty::DirtyRecord>,
}

/// The answer to [`Request::MonitorHwInfo`] (like `xl psr-hwinfo`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MonitorHwInfo {
    /// Whether the CPU monitors cache occupancy / memory bandwidth.
    pub present: bool,
    /// Why not, when absent (names the CPUID field).
    pub reason: Option<String>,
    /// RMIDs handed out to domains (RMID 0 is reserved).
    pub usable_rmids: u32,
    /// Highest RMID the CPU reports for L3 monitoring.
    pub max_rmid: u32,
    /// L3 monitoring domains the service reads: one per socket (package).
    pub sockets: u32,
    /// (v11) For each socket, by number, the APIC IDs of its CPUs (the CPU list's
    /// order). Reported whether or not the CPU has RDT monitoring.
    pub socket_cpus: Vec<Vec<u32>>,
    /// Bytes of one L3.
    pub l3_bytes: u64,
    /// IA32_QM_CTR units to bytes.
    pub upscaling_factor: u32,
    /// MBM counter width in bits.
    pub counter_width: u32,
    /// Event names the hardware supports.
    pub hw_events: Vec<String>,
    /// Every event name a domain can enable.
    pub all_events: Vec<String>,
}

/// One event's value in [`MonitorDomainStats`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MonitorValue {
    /// A count (nanoseconds for `guest_runtime_ns`).
    Count(u64),
    /// Counts by exit reason.
    ByReason(Vec<(String, u64)>),
    /// L3 occupancy: total, residual in limbo, and per socket.
    Occupancy {
        /// Bytes over the domain's groups.
        bytes: u64,
        /// Bytes under RMIDs this domain left in limbo.
        residual_bytes: u64,
        /// Bytes per socket.
        per_socket: Vec<u64>,
    },
    /// Memory bandwidth: bytes since enabled, latest rate, per socket.
    Bandwidth {
        /// Bytes.
        bytes: u64,
        /// Bytes per second over the latest sample, if known.
        bytes_per_sec: Option<u64>,
        /// Bytes per second per socket (0 when unknown).
        per_socket: Vec<u64>,
    },
    /// Cannot be collected here: the reason.
    NotAvailable(String),
}

/// The enabled events of one domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MonitorDomainStats {
    /// Domain id.
    pub domain: u32,
    /// (event name, value), in the service's event order.
    pub events: Vec<(String, MonitorValue)>,
}

/// What `hvctl domain create` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainSpec {
    /// Name (`[A-Za-z0-9_-]`, 1-32 bytes).
    pub name: String,
    /// The guest kernel (ELF64 for guest_abi, bzImage or multiboot): inline when the
    /// whole request fits one frame, else a completed upload (v5).
    pub kernel: ImageRef,
    /// The initial ramdisk, if any (bzImage and multiboot kernels only). Since v5.
    pub initrd: Option<ImageRef>,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPUID policy in levelling's text form; `None` for the host's `max`.
    pub cpuid: Option<String>,
    /// Guest command line.
    pub cmdline: String,
    /// (v10) APIC IDs of the physical CPUs the domain's vCPUs may run on (at most
    /// [`MAX_PIN_CPUS`], not empty); `None` for any CPU that runs vCPUs.
    pub cpus: Option<Vec<u32>>,
}

/// One domain as `hvctl domain list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// State, as a sentence for crashed domains ("crashed: triple fault ...").
    pub state: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes (0 once returned).
    pub memory_bytes: u64,
    /// Exits by reason (`cpuid`, `io`, `hypercall`, ...).
    pub exits: Vec<(String, u64)>,
    /// Time spent in the guest, nanoseconds.
    pub runtime_ns: u64,
    /// Guest accesses to ports and MMIO that no device claims (they read as all ones
    /// and drop writes, as on a PC), per port or 4 KiB MMIO page. Since protocol
    /// version 4.
    pub unclaimed: Vec<UnclaimedAccess>,
    /// (v10) APIC IDs of the physical CPUs its vCPUs may run on; `None` for any.
    pub cpus: Option<Vec<u32>>,
}

/// Guest accesses to one port or MMIO page that no device model claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnclaimedAccess {
    /// `true`: guest-physical MMIO page; `false`: I/O port.
    pub mmio: bool,
    /// The port, or the MMIO page's first address.
    pub addr: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
}

/// The answer to [`Request::DomainList`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainListReport {
    /// Every domain.
    pub domains: Vec<DomainInfo>,
    /// Free frames of the hypervisor's pool (for leak checks).
    pub free_frames: u64,
    /// Frames in the pool.
    pub total_frames: u64,
}

/// Console bytes of one domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// Domain id.
    pub id: u32,
    /// Number of the first byte in `data` (later than the asked offset if older bytes
    /// left the ring).
    pub offset: u64,
    /// The bytes.
    #[serde(with = "crate::bytes")]
    pub data: Vec<u8>,
    /// Bytes the domain has written in total (the next offset to ask for).
    pub total: u64,
}

impl Request {
    /// The number of variants (the highest postcard variant index + 1).
    pub const VARIANTS: u32 = 36;

    /// The service that owns this request: the router's table.
    pub const fn service(&self) -> ServiceId {
        match self {
            Self::Ping { .. }
            | Self::Info
            | Self::DomainCreate(_)
            | Self::DomainList
            | Self::DomainPause { .. }
            | Self::DomainUnpause { .. }
            | Self::DomainDestroy { .. }
            | Self::DomainConsole { .. }
            | Self::ImageBegin { .. }
            | Self::ImageChunk { .. }
            | Self::ImageCancel { .. }
            | Self::DomainConsoleInput { .. }
            | Self::HostCpuid
            | Self::BenchFill { .. }
            | Self::BenchDiscard { .. }
            | Self::DomainPin { .. } => ServiceId::Core,
            Self::MonitorHwInfo
            | Self::MonitorAttach { .. }
            | Self::MonitorDetach { .. }
            | Self::MonitorEvents { .. }
            | Self::MonitorStats { .. } => ServiceId::Monitor,
            Self::DirtyStart { .. }
            | Self::DirtyStop { .. }
            | Self::DirtyStats { .. }
            | Self::DirtyPeek { .. }
            | Self::DirtyTrack { .. }
            | Self::DirtyTrackPeek { .. }
            | Self::DirtyTrackStop { .. } => ServiceId::Core,
            Self::MigrateSend { .. }
            | Self::MigrateRead { .. }
            | Self::MigrateVerdict { .. }
            | Self::MigrateCancel { .. }
            | Self::MigrateReceive
            | Self::MigrateWrite { .. }
            | Self::MigrateAbort { .. } => ServiceId::Migration,
            Self::ServiceStatus { service } => *service,
        }
    }

    /// The variant's name, for logs ("ping", "info", "service-status").
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Ping { .. } => "ping",
            Self::Info => "info",
            Self::ServiceStatus { .. } => "service-status",
            Self::DomainCreate(_) => "domain-create",
            Self::DomainList => "domain-list",
            Self::DomainPause { .. } => "domain-pause",
            Self::DomainUnpause { .. } => "domain-unpause",
            Self::DomainDestroy { .. } => "domain-destroy",
            Self::DomainConsole { .. } => "domain-console",
            Self::MonitorHwInfo => "monitor-hwinfo",
            Self::MonitorAttach { .. } => "monitor-attach",
            Self::MonitorDetach { .. } => "monitor-detach",
            Self::MonitorEvents { .. } => "monitor-events",
            Self::MonitorStats { .. } => "monitor-stats",
            Self::DirtyStart { .. } => "dirty-start",
            Self::DirtyStop { .. } => "dirty-stop",
            Self::DirtyStats { .. } => "dirty-stats",
            Self::DirtyPeek { .. } => "dirty-peek",
            Self::DirtyTrack { .. } => "dirty-track",
            Self::DirtyTrackPeek { .. } => "dirty-track-peek",
            Self::DirtyTrackStop { .. } => "dirty-track-stop",
            Self::MigrateSend { .. } => "migrate-send",
            Self::MigrateRead { .. } => "migrate-read",
            Self::MigrateVerdict { .. } => "migrate-verdict",
            Self::MigrateCancel { .. } => "migrate-cancel",
            Self::MigrateReceive => "migrate-receive",
            Self::MigrateWrite { .. } => "migrate-write",
            Self::MigrateAbort { .. } => "migrate-abort",
            Self::ImageBegin { .. } => "image-begin",
            Self::ImageChunk { .. } => "image-chunk",
            Self::ImageCancel { .. } => "image-cancel",
            Self::DomainConsoleInput { .. } => "domain-console-input",
            Self::HostCpuid => "host-cpuid",
            Self::BenchFill { .. } => "bench-fill",
            Self::BenchDiscard { .. } => "bench-discard",
            Self::DomainPin { .. } => "domain-pin",
        }
    }
}

/// The hypervisor's answer to a request, carrying the request's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The ping's bytes, unchanged.
        #[serde(with = "crate::bytes")]
        payload: Vec<u8>,
    },
    /// Answer to [`Request::Info`].
    Info(Box<InfoReport>),
    /// Answer to [`Request::ServiceStatus`].
    ServiceStatus(ServiceStatus),
    /// The request (or the frame) failed.
    Error(ErrorReply),
    /// Answer to [`Request::DomainCreate`] (v2).
    DomainCreated {
        /// The new domain's id.
        id: u32,
    },
    /// Answer to [`Request::DomainList`] (v2).
    DomainList(DomainListReport),
    /// A request that returns nothing succeeded (v2).
    Done,
    /// Answer to [`Request::DomainConsole`] (v2).
    Console(ConsoleChunk),
    /// Answer to [`Request::MonitorHwInfo`] (v2).
    MonitorHwInfo(MonitorHwInfo),
    /// Answer to [`Request::MonitorStats`] (v2).
    MonitorStats(Vec<MonitorDomainStats>),
    /// Answer to the log-dirty requests that return counters (v2).
    DirtyStats(DirtyStatsReport),
    /// Answer to [`Request::DirtyPeek`] (v2).
    DirtyBitmap(DirtyBitmapReport),
    /// (v3) A sending migration's state (boxed: it is the largest response; the
    /// encoding is the same as unboxed).
    MigrateProgress(Box<MigrateProgress>),
    /// (v3) Stream bytes and the sending migration's state.
    MigrateData {
        /// The bytes, in stream order (may be empty).
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
        /// The state after taking them.
        progress: Box<MigrateProgress>,
    },
    /// (v3) A receiving migration's state.
    ReceiveStatus(ReceiveStatus),
    /// (v5) Answer to [`Request::ImageBegin`] and [`Request::ImageChunk`].
    Upload(UploadStatus),
    /// (v5) Answer to [`Request::DomainConsoleInput`].
    ConsoleInput {
        /// Domain id.
        id: u32,
        /// Bytes the UART's receiver took, from the start of the request's bytes.
        accepted: u32,
    },
    /// (v7) Answer to [`Request::HostCpuid`].
    HostCpuid(HostCpuidReport),
    /// (v9) Answer to [`Request::BenchFill`]: the bytes asked for.
    BenchData {
        /// `len` zero bytes.
        #[serde(with = "crate::bytes")]
        bytes: Vec<u8>,
    },
    /// (v9) Answer to [`Request::BenchDiscard`]: how many bytes arrived (and were dropped).
    BenchDiscarded {
        /// The request's byte count.
        len: u32,
    },
}

impl Response {
    /// The number of variants (the highest postcard variant index + 1).
    pub const VARIANTS: u32 = 20;

    /// The error, if this is [`Response::Error`].
    pub const fn error(&self) -> Option<&ErrorReply> {
        match self {
            Self::Error(e) => Some(e),
            _ => None,
        }
    }
}

/// Severity of an [`Event::Log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something is wrong but work continues.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for developers.
    Debug,
    /// Very fine detail.
    Trace,
}

/// Something the hypervisor reports without being asked (request id 0).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// A log line.
    Log {
        /// Severity.
        level: LogLevel,
        /// The line, without trailing newline.
        message: String,
    },
    /// A service task changed state.
    ServiceState {
        /// Which service.
        service: ServiceId,
        /// Its new state.
        state: ServiceState,
    },
}

impl Event {
    /// The number of variants (the highest postcard variant index + 1).
    pub const VARIANTS: u32 = 2;
}

/// Append `req` as a request frame with id `request_id` (not 0) to `out`.
/// On error `out` is left as it was.
pub fn encode_request(request_id: u64, req: &Request, out: &mut Vec<u8>) -> Result<(), WireError> {
    if request_id == 0 {
        return Err(WireError::ReservedRequestId);
    }
    encode_message(FrameKind::Request, request_id, req, out)
}

/// The request in `frame`, or the typed error to answer `frame.request_id` with:
/// [`BadFrame`](crate::ErrorCode::BadFrame) for a frame that is not a request,
/// [`UnknownRequest`](crate::ErrorCode::UnknownRequest) for an unknown request type,
/// [`BadRequest`](crate::ErrorCode::BadRequest) for a payload that does not decode
/// exactly or request id 0, or (v10) a CPU list longer than [`MAX_PIN_CPUS`] or empty
/// (see [`check_cpu_list`]). The connection stays usable after any of these.
pub fn decode_request(frame: &Frame) -> Result<Request, ErrorReply> {
    let req = decode_message(frame, FrameKind::Request, "request", Some(Request::VARIANTS))?;
    if frame.request_id == 0 {
        return Err(ErrorReply::new(
            crate::ErrorCode::BadRequest,
            "request id 0 is reserved for frames that answer no request; number requests from 1",
        ));
    }
    match &req {
        Request::DomainCreate(spec) => check_cpu_list("DomainCreate.cpus", spec.cpus.as_deref())?,
        Request::DomainPin { cpus, .. } => check_cpu_list("DomainPin.cpus", cpus.as_deref())?,
        _ => {}
    }
    Ok(req)
}

/// Append `resp` as a response frame answering `request_id` to `out` (0 only for an
/// error about a frame whose id could not be read). On error `out` is left as it was.
pub fn encode_response(request_id: u64, resp: &Response, out: &mut Vec<u8>) -> Result<(), WireError> {
    encode_message(FrameKind::Response, request_id, resp, out)
}

/// The response in `frame`, or why it is not one. A well-formed
/// [`Response::Error`] is `Ok`: the transport worked, the request failed.
pub fn decode_response(frame: &Frame) -> Result<Response, ErrorReply> {
    decode_message(frame, FrameKind::Response, "response", Some(Response::VARIANTS))
}

/// Append `event` as an event frame to `out`; `request_id` is 0 unless the event
/// belongs to a request. On error `out` is left as it was.
pub fn encode_event(request_id: u64, event: &Event, out: &mut Vec<u8>) -> Result<(), WireError> {
    encode_message(FrameKind::Event, request_id, event, out)
}

/// The event in `frame`, or why it is not one.
pub fn decode_event(frame: &Frame) -> Result<Event, ErrorReply> {
    decode_message(frame, FrameKind::Event, "event", Some(Event::VARIANTS))
}
