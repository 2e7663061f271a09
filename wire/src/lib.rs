//! The one contract between `hvctl`, the hypervisor core and the service tasks: every
//! message type and the framing that carries them over a byte stream (virtio-vsock,
//! port [`CONTROL_PORT`]).
//!
//! This crate is the format and nothing else: it does not open sockets, route requests
//! or run services. It is `no_std` + `alloc`, has no `unsafe`, and never panics on any
//! input (by lint, by property tests and by the `frame_decoder` fuzz target).
//!
//! # Frame
//!
//! Every message travels in one frame: a fixed 18-byte header, then a postcard payload.
//! All integers in the header are little-endian.
//!
//! ```text
//!  offset 0    1    2         4      5      6                          14                   18
//!         +----+----+---------+------+------+--------------------------+--------------------+=================+
//!         | 'H'| 'V'| version | kind | flags|  request id              | payload length     | payload ...     |
//!         | 48 | 56 | u16 LE  | u8   | u8   |  u64 LE                  | u32 LE             | postcard        |
//!         +----+----+---------+------+------+--------------------------+--------------------+=================+
//!           magic                                                                             0..=MAX_FRAME_LEN
//!
//!  kind:  1 = request   2 = response   3 = event   4 = stream chunk      (anything else: BadFrame)
//!  flags: reserved, 0 in version 1                                       (anything else: BadFrame)
//!  request id: chosen by the requester, echoed by every response and stream chunk;
//!              0 means "no request" (events, errors about a frame whose id is unreadable)
//! ```
//!
//! Length-prefixed rather than COBS: the receiver learns the payload size from the
//! header, so an oversized frame is refused after its 18 header bytes, without waiting
//! for its payload and without allocating for it, and large stream chunks are copied
//! once instead of being byte-stuffed.
//! The header layout is frozen across all protocol versions, so a receiver can always
//! read a peer's version and request id and answer a mismatch with a typed error.
//!
//! A `Request::Ping { payload: vec![1, 2, 3] }` with request id 1 is these 23 bytes:
//!
//! ```
//! let mut out = Vec::new();
//! wire::encode_request(1, &wire::Request::Ping { payload: vec![1, 2, 3] }, &mut out)?;
//! assert_eq!(out, [
//!     0x48, 0x56,                                     // magic "HV"
//!     0x0b, 0x00,                                     // version 11
//!     0x01,                                           // kind: request
//!     0x00,                                           // flags
//!     0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // request id 1
//!     0x05, 0x00, 0x00, 0x00,                         // payload length 5
//!     0x00, 0x03, 0x01, 0x02, 0x03,                   // postcard: variant 0 (Ping), 3 bytes
//! ]);
//! # Ok::<(), wire::WireError>(())
//! ```
//!
//! # Messages
//!
//! On a serial line the same frames travel inside COBS-delimited, CRC-checked packets:
//! see [`serial`] (v6).
//!
//! | frame kind | payload | variant | direction | routed to (`Request::service`) | answer |
//! |---|---|---|---|---|---|
//! | 1 request | [`Request`] | `Ping { payload }` | hvctl → hv | [`ServiceId::Core`] | `Response::Pong` with the same payload |
//! | 1 request | [`Request`] | `Info` | hvctl → hv | [`ServiceId::Core`] | `Response::Info(InfoReport)` (v4: with [`MemoryUse`]; v6: with the control transports served) |
//! | 1 request | [`Request`] | `ServiceStatus { service }` | hvctl → hv | `service` | `Response::ServiceStatus(ServiceStatus)` |
//! | 1 request | [`Request`] | `DomainCreate(DomainSpec)` (v2; v5: kernel and initrd are [`ImageRef`]s, inline or uploaded; v10: `cpus`, ≤ [`MAX_PIN_CPUS`] APIC IDs) | hvctl → hv | [`ServiceId::Core`] | `Response::DomainCreated { id }` |
//! | 1 request | [`Request`] | `DomainList` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::DomainList(DomainListReport)` |
//! | 1 request | [`Request`] | `DomainPause`/`DomainUnpause`/`DomainDestroy { id }` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::Done` |
//! | 1 request | [`Request`] | `DomainConsole { id, offset }` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::Console(ConsoleChunk)` |
//! | 1 request | [`Request`] | `MonitorHwInfo` (v2) | hvctl → hv | [`ServiceId::Monitor`] | `Response::MonitorHwInfo` (v11: with `socket_cpus`, the APIC IDs of each socket) |
//! | 1 request | [`Request`] | `MonitorAttach`/`MonitorDetach`/`MonitorEvents` (v2) | hvctl → hv | [`ServiceId::Monitor`] | `Response::Done` |
//! | 1 request | [`Request`] | `MonitorStats { domain }` (v2) | hvctl → hv | [`ServiceId::Monitor`] | `Response::MonitorStats` |
//! | 1 request | [`Request`] | `DirtyStart`/`DirtyStop`/`DirtyStats` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::DirtyStats` |
//! | 1 request | [`Request`] | `DirtyPeek { domain, clean }` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::DirtyBitmap` |
//! | 1 request | [`Request`] | `DirtyTrack`/`DirtyTrackStop` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::DirtyStats` |
//! | 1 request | [`Request`] | `DirtyTrackPeek { domain, clean }` (v2) | hvctl → hv | [`ServiceId::Core`] | `Response::DirtyBitmap` |
//! | 1 request | [`Request`] | `MigrateSend { domain, options }` (v3) | hvctl → source hv | [`ServiceId::Migration`] | `Response::MigrateProgress` |
//! | 1 request | [`Request`] | `MigrateRead { session, max_bytes }` (v3) | hvctl → source hv | [`ServiceId::Migration`] | `Response::MigrateData { data, progress }` |
//! | 1 request | [`Request`] | `MigrateVerdict { session, verdict }`, `MigrateCancel { domain }` (v3) | hvctl → source hv | [`ServiceId::Migration`] | `Response::MigrateProgress` |
//! | 1 request | [`Request`] | `MigrateReceive`, `MigrateWrite { session, data }`, `MigrateAbort { session, reason }` (v3) | hvctl → destination hv | [`ServiceId::Migration`] | `Response::ReceiveStatus` |
//! | 1 request | [`Request`] | `ImageBegin { kind, total_len, crc32c }` (v5) | hvctl → hv | [`ServiceId::Core`] | `Response::Upload(UploadStatus)`: the upload id and the window |
//! | 1 request | [`Request`] | `ImageChunk { upload, offset, bytes, crc32c }` (v5; ≤ [`MAX_IMAGE_CHUNK`] bytes, in order) | hvctl → hv | [`ServiceId::Core`] | `Response::Upload(UploadStatus)`, or `Error{BadChunk}` |
//! | 1 request | [`Request`] | `ImageCancel { upload }` (v5) | hvctl → hv | [`ServiceId::Core`] | `Response::Done` |
//! | 1 request | [`Request`] | `DomainConsoleInput { id, bytes }` (v5; ≤ [`MAX_CONSOLE_INPUT`] bytes) | hvctl → hv | [`ServiceId::Core`] | `Response::ConsoleInput { id, accepted }` |
//! | 1 request | [`Request`] | `HostCpuid` (v7) | hvctl → hv | [`ServiceId::Core`] | `Response::HostCpuid(HostCpuidReport)`: the host CPU's raw CPUID leaves |
//! | 1 request | [`Request`] | `BenchFill { len }`, `BenchDiscard { bytes }` (v9; ≤ [`MAX_BENCH_DATA`] bytes: transport benchmark, nothing else happens) | hvctl → hv | [`ServiceId::Core`] | `Response::BenchData { bytes }`, `Response::BenchDiscarded { len }` |
//! | 1 request | [`Request`] | `DomainPin { id, cpus }` (v10; `cpus` ≤ [`MAX_PIN_CPUS`] APIC IDs, `None` unpins) | hvctl → hv | [`ServiceId::Core`] | `Response::Done`, or an error (a CPU that does not run vCPUs is refused) |
//! | 2 response | [`Response`] | `DomainList(DomainListReport)`: since v10 each [`DomainInfo`] with `cpus`, its pinning | hv → hvctl | — | — |
//! | 2 response | [`Response`] | `Info(InfoReport)`: since v8 with `cpu_list`, each physical CPU's APIC ID and [`CpuState`]; since v11 its package ID and socket number | hv → hvctl | — | — |
//! | 2 response | [`Response`] | `Pong`, `Info`, `ServiceStatus`, `DomainCreated`, `DomainList`, `Done`, `Console`, `Upload`, `ConsoleInput`, `HostCpuid` | hv → hvctl | — | — |
//! | 2 response | [`Response`] | `Error(ErrorReply)` | hv → hvctl | — | answers any request or frame that failed |
//! | 3 event | [`Event`] | `Log { level, message }`, `ServiceState { service, state }` | hv → hvctl | — | none; request id 0 |
//! | 4 stream chunk | [`StreamChunk`] | — | sender → receiver | — | none; carries the id of the request that opened the stream |
//!
//! A conversation, and the two ways it can fail:
//!
//! ```text
//!   hvctl                                     hv: framer → router → service mailbox
//!     |-- #1 Request::Info ------------------------>|  Core
//!     |<------------------ #1 Response::Info(report)|
//!     |-- #2 Request::ServiceStatus{Monitor} ------>|  Monitor's mailbox is full
//!     |<----------- #2 Response::Error{Busy, "..."} |  the connection stays open
//!     |-- #3 payload that does not decode --------->|
//!     |<----- #3 Response::Error{BadRequest, "..."} |  the connection stays open
//!     |-- #4 frame header with version 2 ---------->|  FrameDecoder poisoned
//!     |<- #4 Response::Error{UnsupportedVersion, ..}|  then hv closes the connection
//! ```
//!
//! # Errors
//!
//! - A [`FrameError`] (bad magic, unknown version, unknown kind, reserved flags,
//!   oversized length) is found from the header alone. The stream can no longer be
//!   trusted: the [`FrameDecoder`] is poisoned, the server sends
//!   [`FrameError::encode_reply`] (to the frame's request id when the header was
//!   readable, else 0) and closes the connection.
//! - A payload that does not decode, an unknown request type, or a service that cannot
//!   answer gives an [`ErrorReply`] (a stable [`ErrorCode`] and a human message) for that
//!   request id; the connection stays open.
//!
//! # Uploads (v5)
//!
//! A kernel or initrd larger than a frame is uploaded before `DomainCreate`:
//! `ImageBegin` announces its kind, length and CRC-32C; `ImageChunk`s carry at most
//! [`MAX_IMAGE_CHUNK`] bytes each, in order, each with its own CRC-32C, and each is
//! answered, so the sender never has more than the hypervisor's announced window
//! unanswered; the whole image's CRC is checked after the last byte; `DomainCreate`
//! then names the upload with [`ImageRef::Uploaded`]. The sequence and the rules are in
//! [`upload`].
//!
//! # Streams
//!
//! Bulk data (dirty bitmaps, migration records) travels as [`StreamChunk`]s: a stream id,
//! a sequence number starting at 0, a `last` marker and a CRC-32C per chunk.
//! [`StreamSender`] numbers them, [`StreamReassembler`] rejects gaps, duplicates, chunks
//! after the last one and CRC mismatches.
//!
//! # Versioning rule
//!
//! There is no negotiation: both ends speak exactly [`PROTOCOL_VERSION`]. Changing any
//! message (a field, a variant, their order, an [`ErrorCode`] value) or the framing
//! means bumping `PROTOCOL_VERSION` and regenerating the checked-in test vectors
//! (`wire/tests/vectors/v<N>/*.hex`, the exact bytes of every message):
//!
//! ```text
//! WIRE_REGENERATE_VECTORS=1 cargo test -p wire --test vectors
//! ```
//!
//! The vectors test fails whenever the encoding differs from the stored bytes, and
//! regeneration refuses to alter an existing vector of the current version, so a
//! version bump is the only way to change the format. Vectors of older versions stay
//! checked in; the test asserts that they are refused from the header with
//! [`FrameError::UnsupportedVersion`] and their request id.
//!
//! # Checks
//!
//! - `cargo test -p wire`: the vectors, every decoder edge (byte-by-byte input, random
//!   splits, several frames per push, each header error, poisoning, truncation, garbage
//!   payloads), property-based round trips of every message, streams.
//! - `cd wire/fuzz && cargo +nightly fuzz run frame_decoder -- -max_total_time=60`:
//!   arbitrary bytes in arbitrary chunks through the decoder and every message decoder.
//! - `cargo bench -p wire`: encode/decode throughput of a Ping and a 60 KiB chunk.
//!
//! # Modules
//!
//! | module | what it is for |
//! |---|---|
//! | [`frame`] | the header, [`encode_frame`], the streaming [`FrameDecoder`], [`FrameError`], [`WireError`] |
//! | [`message`] | [`Request`], [`Response`], [`Event`] and their types; encode/decode helpers |
//! | [`error`] | [`ErrorCode`] and [`ErrorReply`], the typed errors every reply can carry |
//! | [`stream`] | [`StreamChunk`], [`StreamSender`], [`StreamReassembler`] |
//! | [`dirty`] | log-dirty bitmaps (peek, clean, OR-merge) and their compact records |
//! | [`migration`] | the migration stream's typed, checksummed records (own version) |
//! | [`serial`] | COBS-delimited, CRC-checked packets that carry frames over a serial line, and its sessions |
//! | [`service`] | what every service task shares: counters, status, reply encoding |
//! | [`upload`] | (v5) chunked, checksummed image uploads: [`UploadTracker`], limits, console input bound |
//! | [`crc32c`](mod@crc32c) | CRC-32C (Castagnoli), used per stream chunk and upload chunk |
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
#![deny(missing_docs)]

extern crate alloc;

mod bytes;
mod codec;
pub mod cpulist;
pub mod crc32c;
pub mod dirty;
pub mod error;
pub mod frame;
pub mod message;
pub mod migrate;
pub mod migration;
pub mod serial;
pub mod service;
pub mod stream;
pub mod upload;

pub use crate::crc32c::{Crc32c, crc32c};
pub use crate::error::{ErrorCode, ErrorReply};
pub use crate::frame::{Frame, FrameDecoder, FrameError, FrameKind, WireError, encode_frame};
pub use crate::message::{
    ConsoleChunk, CpuInfo, CpuState, CpuidLeaf, DirtyBitmapReport, DirtyStatsReport, DomainInfo, DomainListReport,
    DomainSpec, Event, HostCpuidReport, InfoReport, LogLevel, MAX_BENCH_DATA, MAX_MIGRATE_DATA, MAX_PIN_CPUS,
    MemoryUse, MonitorDomainStats, MonitorHwInfo, MonitorValue, Request, Response, ServiceId, ServiceState,
    ServiceStatus, UnclaimedAccess, check_cpu_list, decode_event, decode_request, decode_response, encode_event,
    encode_request, encode_response,
};
pub use crate::migrate::{
    MigrateOptions, MigrateProgress, MigrateReport, PeerVerdict, ReceiveState, ReceiveStatus, SendState,
};
pub use crate::stream::{
    MAX_CHUNK_DATA, StreamChunk, StreamError, StreamReassembler, StreamSender, decode_stream_chunk, encode_stream_chunk,
};
pub use crate::upload::{
    ImageKind, ImageRef, MAX_CONSOLE_INPUT, MAX_IMAGE_CHUNK, MAX_IMAGE_LEN, UploadError, UploadStatus, UploadTracker,
};

/// The protocol version this build speaks, carried in every frame header. See the
/// versioning rule in the crate docs: changing any message means bumping this.
pub const PROTOCOL_VERSION: u16 = 11;

/// The hard maximum of a frame's payload, in bytes (64 KiB). A header declaring more is
/// refused from the header alone with [`FrameError::TooLarge`].
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// The virtio-vsock port the hypervisor listens on for control connections (`hvctl`
/// connects to the hypervisor's CID on this port).
pub const CONTROL_PORT: u32 = 5000;

/// The two bytes every frame starts with: `"HV"` (0x48 0x56).
pub const MAGIC: [u8; 2] = *b"HV";

/// The size of the frame header in bytes: magic 2, version 2, kind 1, flags 1,
/// request id 8, payload length 4.
pub const HEADER_LEN: usize = 18;
