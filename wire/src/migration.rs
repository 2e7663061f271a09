//! The live-migration stream: typed, length-prefixed, checksummed records that a source
//! hypervisor sends to a destination, carried as the data of [`StreamChunk`](crate::StreamChunk)s (a record
//! may span chunks; the [`RecordDecoder`] reassembles them from any split).
//!
//! This module is the format and nothing else: it does not read guest memory, drive
//! rounds or decide convergence (that is `migration_svc`). The stream versions itself
//! ([`MIGRATION_STREAM_VERSION`] in the [`StreamHeader`] record), independently of the
//! frame [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
//!
//! # Record
//!
//! All integers little-endian.
//!
//! ```text
//!  offset 0           2           4                8                     8+len      12+len
//!         +-----------+-----------+----------------+=====================+----------+
//!         | type u16  | flags u16 | length u32     | payload (length)    | CRC-32C  |
//!         +-----------+-----------+----------------+=====================+----------+
//!          CRC-32C covers type, flags, length and payload (bytes 0 .. 8+len)
//!
//!  flags: bit 0 = mandatory. Bits 1..15 are reserved and must be 0.
//!  length: at most MAX_RECORD_PAYLOAD; a larger one is refused from the 8 header bytes.
//! ```
//!
//! A record whose type this build does not know is skipped when its mandatory bit is
//! clear ([`Decoded::Skipped`]) and fails the migration with
//! [`RecordError::UnknownMandatory`] when it is set; either way its CRC is checked first.
//!
//! # Record types
//!
//! | type | name | flags | payload layout | when |
//! |---|---|---|---|---|
//! | 1 | [`Header`](StreamHeader) | mandatory | `stream_version u16` \| `n u16` \| `featureset u32 × n` \| `memory_bytes u64` \| `vcpus u32` \| `name_len u16` \| `name UTF-8` \| `cmdline_len u32` \| `cmdline UTF-8` | first, exactly once |
//! | 2 | [`CpuidPolicy`] | mandatory | the postcard bytes of the domain's `levelling` policy (opaque here) | second, exactly once, before any memory |
//! | 3 | [`PageBatch`] | mandatory | `n u32` \| `entry u64 × n` \| `4096 bytes × (non-zero entries)`; entry = pfn (bits 0..40) \| zero-page flag (bit 63), other bits 0 | any number, after the policy |
//! | 4 | [`DirtyRound`] | optional | `round u32` \| `n u32` \| n × (`len u32` \| [`DirtyRecord`] bytes) | before the pages of each round ≥ 1 |
//! | 5 | [`VcpuState`] | mandatory | `index u32` \| opaque register blob (rest of payload) | once per vCPU, after the guest clock |
//! | 6 | [`End`](StreamEnd) | mandatory | `pages_sent u64` \| `rounds u32` | last |
//! | 7 | [`MemoryDigest`] | optional | `pages u64` \| `digest u64` ([`MemoryDigest::of_pages`]) | with `verify_memory`: after the machine state, before `End` |
//! | 8 | [`GuestClock`] | mandatory | `tsc u64` \| `ns u64` \| `tsc_hz u64` | once, after the last pages, before any vCPU record |
//! | 9 | [`VcpuFpu`] | mandatory | `index u32` \| `xcr0 u64` \| `len u32` \| XSAVE/FXSAVE area (`len` ≤ 64 KiB) | once per vCPU, after the clock |
//! | 10 | [`VcpuMsrs`] | mandatory | `index u32` \| `n u16` \| n × (`msr u32` \| `value u64`), msr strictly ascending, n ≤ 1024 | once per vCPU, after the clock |
//! | 11 | [`DeviceStates`] | mandatory | `n u16` \| n × (`kind u16` \| `instance u32` \| `version u16` \| `len u32` \| bytes); no (kind, instance) twice | once, after the clock |
//! | 12 | [`ConsoleRing`] | optional | `total_bytes u64` \| `len u32` \| ring bytes (`len` ≤ 1 MiB and ≤ `total_bytes`) | at most once, after the clock |
//!
//! Version 2 (this one) added types 8–12: "the whole guest in the stream". Between
//! the last pages and `End` comes the machine state: the clock first, then per vCPU
//! its [`VcpuState`], [`VcpuFpu`] and [`VcpuMsrs`], the [`DeviceStates`], the
//! [`ConsoleRing`]. The destination needs the clock, all three vCPU records of every
//! vCPU and the device states before it accepts `End`, and refuses (the source then
//! resumes) any it cannot load.
//!
//! A page batch holds at most [`MAX_BATCH_PAGES`] pages, so every record fits
//! [`MAX_RECORD_PAYLOAD`]. Zero pages travel as their entry alone. Every payload must be
//! consumed exactly: short, long or malformed payloads are [`RecordError::BadPayload`].
//! The order of records is checked by the destination state machine
//! (`migration_svc::dest`), not by the decoder.
//!
//! # A stream
//!
//! ```text
//!   source                                              destination
//!     |-- Header (version, featureset, domain) --------->|  create an empty domain
//!     |-- CpuidPolicy ---------------------------------->|  levelling check: refuse here,
//!     |<------------------------ policy accepted/refused |  before any page moves
//!     |-- PageBatch × n (round 0: all memory) ---------->|
//!     |-- DirtyRound 1, PageBatch × n ------------------>|  rounds until convergence
//!     |   ... source pauses the guest ...                |
//!     |-- DirtyRound k, PageBatch × n ------------------>|
//!     |-- GuestClock, (VcpuState, VcpuFpu, VcpuMsrs) × v,|
//!     |   DeviceStates, ConsoleRing -------------------->|  load each, or refuse
//!     |-- End (pages_sent, rounds) --------------------->|  check counts, run
//!     |<------------------------------------------- ack  |
//! ```
//!
//! ```
//! use wire::migration::{Decoded, Record, RecordDecoder, StreamEnd};
//!
//! let mut bytes = Vec::new();
//! Record::End(StreamEnd { pages_sent: 3, rounds: 1 }).encode(&mut bytes)?;
//! assert_eq!(bytes.len(), 8 + 12 + 4);
//! let mut dec = RecordDecoder::new();
//! dec.push(&bytes[..5])?;
//! assert_eq!(dec.next_record()?, None); // wait for more
//! dec.push(&bytes[5..])?;
//! assert_eq!(dec.next_record()?, Some(Decoded::Record(Record::End(StreamEnd { pages_sent: 3, rounds: 1 }))));
//! dec.finish()?;
//! # Ok::<(), wire::migration::RecordError>(())
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::crc32c::Crc32c;
use crate::dirty::{DirtyBitmap, DirtyError, DirtyRecord, PAGE_SIZE, PFN_LIMIT};

/// The version of the record format this build writes and reads. A [`StreamHeader`]
/// with any other version is refused with [`RecordError::UnsupportedVersion`].
///
/// Version 2 added the guest's clock, each vCPU's FPU/XSAVE area and MSRs, the device
/// models' states and the console ring (types 8–12); a version 1 stream carried
/// memory and the basic registers only, and is refused.
pub const MIGRATION_STREAM_VERSION: u16 = 2;

/// The largest FPU/XSAVE area a [`VcpuFpu`] may carry (the XSAVE area of every
/// component defined today, AMX included, is under 12 KiB).
pub const MAX_FPU_AREA: usize = 64 * 1024;

/// The most MSRs one [`VcpuMsrs`] may carry.
pub const MAX_VCPU_MSRS: usize = 1024;

/// The most device states one [`DeviceStates`] may carry.
pub const MAX_DEVICE_STATES: usize = 4096;

/// The largest console ring a [`ConsoleRing`] may carry.
pub const MAX_CONSOLE_RING: usize = 1024 * 1024;

/// The size of a record's header (type, flags, length).
pub const RECORD_HEADER_LEN: usize = 8;

/// The size of a record's trailing CRC-32C.
pub const RECORD_CRC_LEN: usize = 4;

/// The most pages one [`PageBatch`] may carry (2 MiB of data).
pub const MAX_BATCH_PAGES: usize = 512;

/// The largest payload a record may declare: a full page batch
/// (4 + 8 × 512 + 4096 × 512 bytes) rounded up to 2 MiB + 64 KiB.
pub const MAX_RECORD_PAYLOAD: u32 = 2 * 1024 * 1024 + 64 * 1024;

/// Flag bit 0: the record is mandatory (an unknown mandatory record fails the stream).
pub const FLAG_MANDATORY: u16 = 1;

/// Bit 63 of a page-batch entry: the page is all zeros and carries no data.
pub const ZERO_PAGE_FLAG: u64 = 1 << 63;

const PAGE: usize = PAGE_SIZE as usize;

/// The record types this build knows (the `type` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RecordType {
    /// [`StreamHeader`].
    Header = 1,
    /// [`CpuidPolicy`].
    CpuidPolicy = 2,
    /// [`PageBatch`].
    PageBatch = 3,
    /// [`DirtyRound`].
    DirtyRound = 4,
    /// [`VcpuState`].
    VcpuState = 5,
    /// [`StreamEnd`].
    End = 6,
    /// [`MemoryDigest`].
    MemoryDigest = 7,
    /// [`GuestClock`].
    GuestClock = 8,
    /// [`VcpuFpu`].
    VcpuFpu = 9,
    /// [`VcpuMsrs`].
    VcpuMsrs = 10,
    /// [`DeviceStates`].
    DeviceStates = 11,
    /// [`ConsoleRing`].
    ConsoleRing = 12,
}

impl RecordType {
    /// The type with this code, if this build knows it.
    pub const fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Header,
            2 => Self::CpuidPolicy,
            3 => Self::PageBatch,
            4 => Self::DirtyRound,
            5 => Self::VcpuState,
            6 => Self::End,
            7 => Self::MemoryDigest,
            8 => Self::GuestClock,
            9 => Self::VcpuFpu,
            10 => Self::VcpuMsrs,
            11 => Self::DeviceStates,
            12 => Self::ConsoleRing,
            _ => return None,
        })
    }

    /// The flags the encoder writes for this type (see the table in the module docs).
    pub const fn flags(self) -> u16 {
        match self {
            // Optional: a destination that cannot use them may skip them.
            Self::DirtyRound | Self::MemoryDigest | Self::ConsoleRing => 0,
            _ => FLAG_MANDATORY,
        }
    }
}

/// The first record: who is sending and what domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// [`MIGRATION_STREAM_VERSION`] when written by this build.
    pub stream_version: u16,
    /// The source host's featureset words (as `levelling` computes them).
    pub source_featureset: Vec<u32>,
    /// The domain's name.
    pub name: String,
    /// The domain's memory size in bytes (a multiple of 4096).
    pub memory_bytes: u64,
    /// The domain's vCPU count.
    pub vcpus: u32,
    /// The domain's kernel command line.
    pub cmdline: String,
}

impl StreamHeader {
    /// The number of guest pages (`memory_bytes / 4096`, rounded up).
    pub const fn pages(&self) -> u64 {
        self.memory_bytes.div_ceil(PAGE_SIZE)
    }
}

/// The domain's CPUID policy, sent before any memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// The postcard encoding of the `levelling` policy; opaque to `wire`.
    pub policy: Vec<u8>,
}

/// A batch of guest pages: pfns, a zero flag per pfn, and the data of the non-zero ones.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageBatch {
    /// The pfns, in the order sent.
    pub pfns: Vec<u64>,
    /// `zero[i]`: page `pfns[i]` is all zeros and has no data. Same length as `pfns`.
    pub zero: Vec<bool>,
    /// 4096 bytes per non-zero page, in the order of `pfns`.
    pub data: Vec<u8>,
}

impl fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("pages", &self.pfns.len())
            .field("zero", &self.zero.iter().filter(|z| **z).count())
            .field("first_pfn", &self.pfns.first())
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

impl PageBatch {
    /// An empty batch.
    pub const fn new() -> Self {
        Self { pfns: Vec::new(), zero: Vec::new(), data: Vec::new() }
    }

    /// Add page `pfn` with contents `page` (4096 bytes); an all-zero page is added as a
    /// zero page. Refused when the batch is full, the pfn is at or above [`PFN_LIMIT`]
    /// or `page` is not one page long.
    pub fn push(&mut self, pfn: u64, page: &[u8]) -> Result<(), PayloadFault> {
        if page.len() != PAGE {
            return Err(PayloadFault::DataLength { expected: PAGE, found: page.len() });
        }
        self.check_room(pfn)?;
        let zero = page.iter().all(|&b| b == 0);
        self.pfns.push(pfn);
        self.zero.push(zero);
        if !zero {
            self.data.extend_from_slice(page);
        }
        Ok(())
    }

    /// Add page `pfn` as a zero page.
    pub fn push_zero(&mut self, pfn: u64) -> Result<(), PayloadFault> {
        self.check_room(pfn)?;
        self.pfns.push(pfn);
        self.zero.push(true);
        Ok(())
    }

    /// The number of pages.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Whether no more pages fit.
    pub fn is_full(&self) -> bool {
        self.pfns.len() >= MAX_BATCH_PAGES
    }

    /// The pages in order: `(pfn, None)` for a zero page, `(pfn, Some(4096 bytes))`
    /// otherwise. Stops early if `data` is short (a batch that fails [`Self::check`]).
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let mut chunks = self.data.chunks_exact(PAGE);
        self.pfns.iter().zip(&self.zero).map_while(move |(&pfn, &zero)| {
            if zero { Some((pfn, None)) } else { chunks.next().map(|d| (pfn, Some(d))) }
        })
    }

    /// Check the invariants the encoding needs: as many flags as pfns, at most
    /// [`MAX_BATCH_PAGES`], every pfn below [`PFN_LIMIT`], 4096 data bytes per non-zero page.
    pub fn check(&self) -> Result<(), PayloadFault> {
        if self.pfns.len() > MAX_BATCH_PAGES {
            return Err(PayloadFault::TooManyPages { count: self.pfns.len() });
        }
        if self.zero.len() != self.pfns.len() {
            return Err(PayloadFault::ZeroFlags { pfns: self.pfns.len(), flags: self.zero.len() });
        }
        if let Some(&pfn) = self.pfns.iter().find(|&&p| p >= PFN_LIMIT) {
            return Err(PayloadFault::PfnTooLarge { pfn });
        }
        let expected = self.zero.iter().filter(|z| !**z).count() * PAGE;
        if self.data.len() != expected {
            return Err(PayloadFault::DataLength { expected, found: self.data.len() });
        }
        Ok(())
    }

    fn check_room(&self, pfn: u64) -> Result<(), PayloadFault> {
        if self.is_full() {
            return Err(PayloadFault::TooManyPages { count: self.pfns.len() + 1 });
        }
        if pfn >= PFN_LIMIT {
            return Err(PayloadFault::PfnTooLarge { pfn });
        }
        Ok(())
    }
}

/// The dirty pages of one pre-copy round, sent before that round's pages. The
/// destination expects each of them in a later [`PageBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRound {
    /// The round, from 1 (round 0 is the full copy and has no dirty record).
    pub round: u32,
    /// The dirty pages, as [`DirtyBitmap::to_records`] makes them.
    pub records: Vec<DirtyRecord>,
}

impl DirtyRound {
    /// The round's records for `bitmap`.
    pub fn from_bitmap(round: u32, bitmap: &DirtyBitmap) -> Self {
        Self { round, records: bitmap.to_records() }
    }

    /// The dirty pages as a bitmap over `pfns`; refused if a record does not decode or
    /// marks a page outside `pfns`.
    pub fn to_bitmap(&self, pfns: core::ops::Range<u64>) -> Result<DirtyBitmap, DirtyError> {
        DirtyBitmap::from_records(pfns, &self.records)
    }
}

/// One vCPU's architectural state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// The vCPU's index, `0..vcpus`.
    pub index: u32,
    /// The registers, in the core's own encoding (opaque here).
    pub registers: Vec<u8>,
}

/// The last record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamEnd {
    /// The number of pages (zero or not) sent in all page batches.
    pub pages_sent: u64,
    /// The number of pre-copy rounds after the full copy, including the final one.
    pub rounds: u32,
}

/// A digest of all guest memory at pause, so the destination can prove its copy equal
/// before the domain runs: FNV-1a (64-bit) over, for each page in pfn order, the pfn
/// (u64 LE) and the CRC-32C of its 4096 bytes (u32 LE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryDigest {
    /// Pages covered (`0..pages`).
    pub pages: u64,
    /// The digest.
    pub digest: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl MemoryDigest {
    /// The digest of no page; add pages in pfn order with [`Self::add_page`].
    pub const fn new() -> Self {
        Self { pages: 0, digest: FNV_OFFSET }
    }

    /// Add the next page (pfn = the pages added so far).
    pub fn add_page(&mut self, page: &[u8]) {
        let crc = crate::crc32c(page);
        for b in self.pages.to_le_bytes().into_iter().chain(crc.to_le_bytes()) {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.pages += 1;
    }

    /// The digest of `memory` (a whole number of pages; a short tail counts as a page).
    pub fn of_pages(memory: &[u8]) -> Self {
        let mut d = Self::new();
        for page in memory.chunks(PAGE) {
            d.add_page(page);
        }
        d
    }
}

impl Default for MemoryDigest {
    fn default() -> Self {
        Self::new()
    }
}

/// The guest's clocks at pause, so the destination continues them: the domain's TSC
/// (the guest's RDTSC before any IA32_TSC write of its own) and the guest-nanosecond
/// clock its device models count in. The destination sets its TSC offset so the guest
/// reads `tsc` at the moment the record is loaded, and its device clock so it reads
/// `ns`: the guest never sees time go backwards, and sees at most the downtime go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestClock {
    /// The domain's TSC at pause.
    pub tsc: u64,
    /// The domain's guest-nanosecond clock at pause.
    pub ns: u64,
    /// The source's TSC frequency (Hz): the rate the guest calibrated.
    pub tsc_hz: u64,
}

/// One vCPU's x87/SSE/AVX state: its XCR0 and its save area (standard-format XSAVE
/// area, or FXSAVE's 512 bytes where the source host has no XSAVE). The destination
/// refuses an area that uses components its host or the domain's policy lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuFpu {
    /// The vCPU's index.
    pub index: u32,
    /// The vCPU's XCR0.
    pub xcr0: u64,
    /// The save area (at most [`MAX_FPU_AREA`] bytes).
    pub area: Vec<u8>,
}

/// The MSRs of one vCPU that [`VcpuState`]'s register blob does not hold: (index,
/// value) pairs in strictly ascending index order (so none twice), at most
/// [`MAX_VCPU_MSRS`]. IA32_TSC (0x10) is the vCPU's TSC at pause. The destination
/// refuses an MSR it does not virtualize or a value it would refuse from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuMsrs {
    /// The vCPU's index.
    pub index: u32,
    /// `(msr, value)`, ascending by `msr`.
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuMsrs {
    /// The value of `msr`, if carried.
    pub fn get(&self, msr: u32) -> Option<u64> {
        self.msrs.binary_search_by_key(&msr, |&(m, _)| m).ok().and_then(|i| self.msrs.get(i)).map(|&(_, v)| v)
    }

    fn check(&self) -> Result<(), PayloadFault> {
        if self.msrs.len() > MAX_VCPU_MSRS {
            return Err(PayloadFault::TooLong { field: "msrs", len: self.msrs.len() });
        }
        if let Some(w) = self.msrs.windows(2).find(|w| w.first().map(|a| a.0) >= w.get(1).map(|b| b.0)) {
            let msr = w.get(1).map_or(0, |b| b.0);
            return Err(PayloadFault::Unordered { field: "msrs", value: u64::from(msr) });
        }
        Ok(())
    }
}

/// One device model's saved state: the model's kind code and instance (a local APIC's
/// is its vCPU index, every other model's 0), the format version of its bytes, and
/// the bytes, all opaque here (the core's `DeviceState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The model's kind code.
    pub kind: u16,
    /// Which one of that kind.
    pub instance: u32,
    /// Format version of `bytes`.
    pub version: u16,
    /// The state.
    pub bytes: Vec<u8>,
}

/// The state of every device model of the domain (UART, debug exit, PIT, RTC, PM,
/// I/O APIC, 8259 pair, one local APIC per vCPU, ...), pending and in-service
/// interrupts and the models' timers (as time left after the [`GuestClock`]) included.
/// No (kind, instance) twice, at most [`MAX_DEVICE_STATES`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStates {
    /// The states.
    pub devices: Vec<DeviceEntry>,
}

impl DeviceStates {
    fn check(&self) -> Result<(), PayloadFault> {
        if self.devices.len() > MAX_DEVICE_STATES {
            return Err(PayloadFault::TooLong { field: "devices", len: self.devices.len() });
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices.iter().take(i).any(|e| e.kind == d.kind && e.instance == d.instance) {
                return Err(PayloadFault::Unordered {
                    field: "devices",
                    value: (u64::from(d.kind) << 32) | u64::from(d.instance),
                });
            }
        }
        Ok(())
    }
}

/// The domain's console ring: its last bytes, and how many it ever wrote (so a
/// reader's offsets stay valid across the migration). Optional: a destination that
/// skips it starts with an empty console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleRing {
    /// Bytes written since the domain started (at least `ring.len()`).
    pub total_bytes: u64,
    /// The ring's contents, oldest first (at most [`MAX_CONSOLE_RING`]).
    pub ring: Vec<u8>,
}

/// A record this build knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Type 1.
    Header(StreamHeader),
    /// Type 2.
    CpuidPolicy(CpuidPolicy),
    /// Type 3.
    PageBatch(PageBatch),
    /// Type 4.
    DirtyRound(DirtyRound),
    /// Type 5.
    VcpuState(VcpuState),
    /// Type 6.
    End(StreamEnd),
    /// Type 7.
    MemoryDigest(MemoryDigest),
    /// Type 8.
    GuestClock(GuestClock),
    /// Type 9.
    VcpuFpu(VcpuFpu),
    /// Type 10.
    VcpuMsrs(VcpuMsrs),
    /// Type 11.
    DeviceStates(DeviceStates),
    /// Type 12.
    ConsoleRing(ConsoleRing),
}

impl Record {
    /// The record's type.
    pub const fn record_type(&self) -> RecordType {
        match self {
            Self::Header(_) => RecordType::Header,
            Self::CpuidPolicy(_) => RecordType::CpuidPolicy,
            Self::PageBatch(_) => RecordType::PageBatch,
            Self::DirtyRound(_) => RecordType::DirtyRound,
            Self::VcpuState(_) => RecordType::VcpuState,
            Self::End(_) => RecordType::End,
            Self::MemoryDigest(_) => RecordType::MemoryDigest,
            Self::GuestClock(_) => RecordType::GuestClock,
            Self::VcpuFpu(_) => RecordType::VcpuFpu,
            Self::VcpuMsrs(_) => RecordType::VcpuMsrs,
            Self::DeviceStates(_) => RecordType::DeviceStates,
            Self::ConsoleRing(_) => RecordType::ConsoleRing,
        }
    }

    /// Append the encoded record to `out`. Refused, with `out` unchanged, when the
    /// payload breaks an invariant of its layout, exceeds [`MAX_RECORD_PAYLOAD`], or
    /// `out` cannot grow to hold it ([`RecordError::OutOfMemory`]).
    ///
    /// The payload is written straight into `out` and the header's length patched
    /// afterwards: a page batch is never copied, so encoding one needs no memory
    /// beyond the record itself.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let ty = self.record_type();
        let start = out.len();
        let want = RECORD_HEADER_LEN + self.payload_len_hint() + RECORD_CRC_LEN;
        out.try_reserve(want).map_err(|_| RecordError::OutOfMemory { bytes: want })?;
        out.extend_from_slice(&(ty as u16).to_le_bytes());
        out.extend_from_slice(&ty.flags().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let written = self.write_payload(out);
        let len = out.len() - start - RECORD_HEADER_LEN;
        let len = match (written, u32::try_from(len).ok().filter(|&l| l <= MAX_RECORD_PAYLOAD)) {
            (Ok(()), Some(len)) => len,
            (Err(fault), _) => {
                out.truncate(start);
                return Err(RecordError::BadPayload { record_type: ty as u16, fault });
            }
            (Ok(()), None) => {
                out.truncate(start);
                return Err(RecordError::TooLarge { record_type: ty as u16, len: len as u64 });
            }
        };
        if let Some(field) = out.get_mut(start + 4..start + RECORD_HEADER_LEN) {
            field.copy_from_slice(&len.to_le_bytes());
        }
        let crc = crate::crc32c(out.get(start..).unwrap_or_default());
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// The payload's length where it is cheap to know (the large records), so `encode`
    /// reserves once; a small record may write more than this.
    fn payload_len_hint(&self) -> usize {
        match self {
            Self::PageBatch(b) => 4 + 8 * b.pfns.len() + b.data.len(),
            Self::CpuidPolicy(c) => c.policy.len(),
            Self::VcpuState(v) => 4 + v.registers.len(),
            Self::VcpuFpu(f) => 16 + f.area.len(),
            Self::VcpuMsrs(m) => 6 + 12 * m.msrs.len(),
            Self::DeviceStates(d) => 2 + d.devices.iter().map(|e| 12 + e.bytes.len()).sum::<usize>(),
            Self::ConsoleRing(c) => 12 + c.ring.len(),
            _ => 64,
        }
    }

    /// The encoded record.
    pub fn encode_to_vec(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn write_payload(&self, p: &mut Vec<u8>) -> Result<(), PayloadFault> {
        match self {
            Self::Header(h) => {
                p.extend_from_slice(&h.stream_version.to_le_bytes());
                let n = u16::try_from(h.source_featureset.len())
                    .map_err(|_| PayloadFault::TooLong { field: "featureset", len: h.source_featureset.len() })?;
                p.extend_from_slice(&n.to_le_bytes());
                for w in &h.source_featureset {
                    p.extend_from_slice(&w.to_le_bytes());
                }
                p.extend_from_slice(&h.memory_bytes.to_le_bytes());
                p.extend_from_slice(&h.vcpus.to_le_bytes());
                let name_len = u16::try_from(h.name.len())
                    .map_err(|_| PayloadFault::TooLong { field: "name", len: h.name.len() })?;
                p.extend_from_slice(&name_len.to_le_bytes());
                p.extend_from_slice(h.name.as_bytes());
                let cmd_len = u32::try_from(h.cmdline.len())
                    .map_err(|_| PayloadFault::TooLong { field: "cmdline", len: h.cmdline.len() })?;
                p.extend_from_slice(&cmd_len.to_le_bytes());
                p.extend_from_slice(h.cmdline.as_bytes());
            }
            Self::CpuidPolicy(c) => p.extend_from_slice(&c.policy),
            Self::PageBatch(b) => {
                b.check()?;
                // Lossless: at most MAX_BATCH_PAGES.
                p.extend_from_slice(&(b.pfns.len() as u32).to_le_bytes());
                for (&pfn, &zero) in b.pfns.iter().zip(&b.zero) {
                    let entry = if zero { pfn | ZERO_PAGE_FLAG } else { pfn };
                    p.extend_from_slice(&entry.to_le_bytes());
                }
                p.extend_from_slice(&b.data);
            }
            Self::DirtyRound(d) => {
                p.extend_from_slice(&d.round.to_le_bytes());
                let n = u32::try_from(d.records.len())
                    .map_err(|_| PayloadFault::TooLong { field: "records", len: d.records.len() })?;
                p.extend_from_slice(&n.to_le_bytes());
                for r in &d.records {
                    let bytes = r.encode_to_vec();
                    let len = u32::try_from(bytes.len())
                        .map_err(|_| PayloadFault::TooLong { field: "record", len: bytes.len() })?;
                    p.extend_from_slice(&len.to_le_bytes());
                    p.extend_from_slice(&bytes);
                }
            }
            Self::VcpuState(v) => {
                p.extend_from_slice(&v.index.to_le_bytes());
                p.extend_from_slice(&v.registers);
            }
            Self::End(e) => {
                p.extend_from_slice(&e.pages_sent.to_le_bytes());
                p.extend_from_slice(&e.rounds.to_le_bytes());
            }
            Self::MemoryDigest(d) => {
                p.extend_from_slice(&d.pages.to_le_bytes());
                p.extend_from_slice(&d.digest.to_le_bytes());
            }
            Self::GuestClock(c) => {
                p.extend_from_slice(&c.tsc.to_le_bytes());
                p.extend_from_slice(&c.ns.to_le_bytes());
                p.extend_from_slice(&c.tsc_hz.to_le_bytes());
            }
            Self::VcpuFpu(f) => {
                if f.area.len() > MAX_FPU_AREA {
                    return Err(PayloadFault::TooLong { field: "FPU area", len: f.area.len() });
                }
                p.extend_from_slice(&f.index.to_le_bytes());
                p.extend_from_slice(&f.xcr0.to_le_bytes());
                // Lossless: at most MAX_FPU_AREA.
                p.extend_from_slice(&(f.area.len() as u32).to_le_bytes());
                p.extend_from_slice(&f.area);
            }
            Self::VcpuMsrs(m) => {
                m.check()?;
                p.extend_from_slice(&m.index.to_le_bytes());
                // Lossless: at most MAX_VCPU_MSRS.
                p.extend_from_slice(&(m.msrs.len() as u16).to_le_bytes());
                for &(msr, value) in &m.msrs {
                    p.extend_from_slice(&msr.to_le_bytes());
                    p.extend_from_slice(&value.to_le_bytes());
                }
            }
            Self::DeviceStates(d) => {
                d.check()?;
                // Lossless: at most MAX_DEVICE_STATES.
                p.extend_from_slice(&(d.devices.len() as u16).to_le_bytes());
                for e in &d.devices {
                    let len = u32::try_from(e.bytes.len())
                        .map_err(|_| PayloadFault::TooLong { field: "device state", len: e.bytes.len() })?;
                    p.extend_from_slice(&e.kind.to_le_bytes());
                    p.extend_from_slice(&e.instance.to_le_bytes());
                    p.extend_from_slice(&e.version.to_le_bytes());
                    p.extend_from_slice(&len.to_le_bytes());
                    p.extend_from_slice(&e.bytes);
                }
            }
            Self::ConsoleRing(c) => {
                if c.ring.len() > MAX_CONSOLE_RING {
                    return Err(PayloadFault::TooLong { field: "console ring", len: c.ring.len() });
                }
                if (c.ring.len() as u64) > c.total_bytes {
                    return Err(PayloadFault::Inconsistent("the console ring holds more bytes than were written"));
                }
                p.extend_from_slice(&c.total_bytes.to_le_bytes());
                // Lossless: at most MAX_CONSOLE_RING.
                p.extend_from_slice(&(c.ring.len() as u32).to_le_bytes());
                p.extend_from_slice(&c.ring);
            }
        }
        Ok(())
    }

    /// Decode the payload of a known record type (the CRC has been checked).
    fn decode_payload(ty: RecordType, payload: &[u8]) -> Result<Self, RecordError> {
        let bad = |fault| RecordError::BadPayload { record_type: ty as u16, fault };
        let mut r = Reader { bytes: payload, at: 0 };
        let record = match ty {
            RecordType::Header => {
                let stream_version = r.u16().map_err(bad)?;
                if stream_version != MIGRATION_STREAM_VERSION {
                    return Err(RecordError::UnsupportedVersion { found: stream_version });
                }
                let n = r.u16().map_err(bad)?;
                let mut source_featureset = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    source_featureset.push(r.u32().map_err(bad)?);
                }
                let memory_bytes = r.u64().map_err(bad)?;
                let vcpus = r.u32().map_err(bad)?;
                let name_len = r.u16().map_err(bad)?;
                let name = r.string(usize::from(name_len)).map_err(bad)?;
                let cmd_len = r.u32().map_err(bad)?;
                let cmdline = r.string(cmd_len as usize).map_err(bad)?;
                Self::Header(StreamHeader { stream_version, source_featureset, name, memory_bytes, vcpus, cmdline })
            }
            RecordType::CpuidPolicy => Self::CpuidPolicy(CpuidPolicy { policy: r.rest().to_vec() }),
            RecordType::PageBatch => {
                let n = r.u32().map_err(bad)? as usize;
                if n > MAX_BATCH_PAGES {
                    return Err(bad(PayloadFault::TooManyPages { count: n }));
                }
                let mut pfns = Vec::with_capacity(n);
                let mut zero = Vec::with_capacity(n);
                for _ in 0..n {
                    let entry = r.u64().map_err(bad)?;
                    let pfn = entry & !ZERO_PAGE_FLAG;
                    if pfn >= PFN_LIMIT {
                        return Err(bad(PayloadFault::PfnTooLarge { pfn }));
                    }
                    pfns.push(pfn);
                    zero.push(entry & ZERO_PAGE_FLAG != 0);
                }
                let expected = zero.iter().filter(|z| !**z).count() * PAGE;
                let data = r.rest();
                if data.len() != expected {
                    return Err(bad(PayloadFault::DataLength { expected, found: data.len() }));
                }
                let mut copy = Vec::new();
                copy.try_reserve_exact(data.len()).map_err(|_| RecordError::OutOfMemory { bytes: data.len() })?;
                copy.extend_from_slice(data);
                Self::PageBatch(PageBatch { pfns, zero, data: copy })
            }
            RecordType::DirtyRound => {
                let round = r.u32().map_err(bad)?;
                let n = r.u32().map_err(bad)?;
                let mut records = Vec::new();
                for _ in 0..n {
                    let len = r.u32().map_err(bad)?;
                    let bytes = r.take(len as usize).map_err(bad)?;
                    let record = DirtyRecord::decode(bytes).map_err(|e| bad(PayloadFault::Dirty(e)))?;
                    records.push(record);
                }
                Self::DirtyRound(DirtyRound { round, records })
            }
            RecordType::VcpuState => {
                let index = r.u32().map_err(bad)?;
                Self::VcpuState(VcpuState { index, registers: r.rest().to_vec() })
            }
            RecordType::End => {
                let pages_sent = r.u64().map_err(bad)?;
                let rounds = r.u32().map_err(bad)?;
                Self::End(StreamEnd { pages_sent, rounds })
            }
            RecordType::MemoryDigest => {
                let pages = r.u64().map_err(bad)?;
                let digest = r.u64().map_err(bad)?;
                Self::MemoryDigest(MemoryDigest { pages, digest })
            }
            RecordType::GuestClock => {
                let tsc = r.u64().map_err(bad)?;
                let ns = r.u64().map_err(bad)?;
                let tsc_hz = r.u64().map_err(bad)?;
                Self::GuestClock(GuestClock { tsc, ns, tsc_hz })
            }
            RecordType::VcpuFpu => {
                let index = r.u32().map_err(bad)?;
                let xcr0 = r.u64().map_err(bad)?;
                let len = r.u32().map_err(bad)? as usize;
                if len > MAX_FPU_AREA {
                    return Err(bad(PayloadFault::TooLong { field: "FPU area", len }));
                }
                let area = r.take(len).map_err(bad)?.to_vec();
                Self::VcpuFpu(VcpuFpu { index, xcr0, area })
            }
            RecordType::VcpuMsrs => {
                let index = r.u32().map_err(bad)?;
                let n = usize::from(r.u16().map_err(bad)?);
                if n > MAX_VCPU_MSRS {
                    return Err(bad(PayloadFault::TooLong { field: "msrs", len: n }));
                }
                let mut msrs = Vec::with_capacity(n);
                for _ in 0..n {
                    let msr = r.u32().map_err(bad)?;
                    let value = r.u64().map_err(bad)?;
                    msrs.push((msr, value));
                }
                let m = VcpuMsrs { index, msrs };
                m.check().map_err(bad)?;
                Self::VcpuMsrs(m)
            }
            RecordType::DeviceStates => {
                let n = usize::from(r.u16().map_err(bad)?);
                if n > MAX_DEVICE_STATES {
                    return Err(bad(PayloadFault::TooLong { field: "devices", len: n }));
                }
                let mut devices = Vec::new();
                for _ in 0..n {
                    let kind = r.u16().map_err(bad)?;
                    let instance = r.u32().map_err(bad)?;
                    let version = r.u16().map_err(bad)?;
                    let len = r.u32().map_err(bad)?;
                    let bytes = r.take(len as usize).map_err(bad)?.to_vec();
                    devices.push(DeviceEntry { kind, instance, version, bytes });
                }
                let d = DeviceStates { devices };
                d.check().map_err(bad)?;
                Self::DeviceStates(d)
            }
            RecordType::ConsoleRing => {
                let total_bytes = r.u64().map_err(bad)?;
                let len = r.u32().map_err(bad)? as usize;
                if len > MAX_CONSOLE_RING {
                    return Err(bad(PayloadFault::TooLong { field: "console ring", len }));
                }
                if len as u64 > total_bytes {
                    return Err(bad(PayloadFault::Inconsistent("the console ring holds more bytes than were written")));
                }
                let ring = r.take(len).map_err(bad)?.to_vec();
                Self::ConsoleRing(ConsoleRing { total_bytes, ring })
            }
        };
        r.done().map_err(bad)?;
        Ok(record)
    }
}

/// Append a record with any type, flags and payload to `out` (for records this build
/// does not model, and for tests of the decoder). Refused, with `out` unchanged, when the
/// payload exceeds [`MAX_RECORD_PAYLOAD`].
pub fn encode_raw(record_type: u16, flags: u16, payload: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_RECORD_PAYLOAD)
        .ok_or(RecordError::TooLarge { record_type, len: payload.len() as u64 })?;
    let start = out.len();
    let want = RECORD_HEADER_LEN + payload.len() + RECORD_CRC_LEN;
    out.try_reserve(want).map_err(|_| RecordError::OutOfMemory { bytes: want })?;
    out.extend_from_slice(&record_type.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crate::crc32c(out.get(start..).unwrap_or_default());
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What the decoder found next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record this build knows.
    Record(Record),
    /// An optional record of a type this build does not know, skipped (its CRC was good).
    Skipped {
        /// Its type.
        record_type: u16,
        /// Its payload length.
        len: u32,
    },
}

/// A streaming decoder: push bytes as they arrive (in any split), take records with
/// [`next_record`](Self::next_record). Never panics; after the first error it is poisoned and returns
/// [`RecordError::Poisoned`], since nothing after a bad record can be trusted.
///
/// It buffers at most one record plus whatever the caller pushes before calling `next`;
/// call `next_record` until it returns `Ok(None)` after every push to keep that bound.
#[derive(Clone, Debug, Default)]
pub struct RecordDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    at: usize,
    poisoned: bool,
    records: u64,
    bytes: u64,
}

impl RecordDecoder {
    /// A decoder at the start of a stream.
    pub const fn new() -> Self {
        Self { buf: Vec::new(), at: 0, poisoned: false, records: 0, bytes: 0 }
    }

    /// Append received bytes. Refused with [`RecordError::OutOfMemory`] (and the
    /// decoder poisoned) when the buffer cannot grow: the sender chooses how large a
    /// record is, up to [`MAX_RECORD_PAYLOAD`], so the heap may not have room for it.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), RecordError> {
        if self.poisoned {
            return Err(RecordError::Poisoned);
        }
        if self.at > 0 {
            // Drop what was consumed, so the buffer holds at most one record plus the
            // latest push.
            self.buf.drain(..self.at);
            self.at = 0;
        }
        if self.buf.try_reserve(bytes.len()).is_err() {
            let bytes = self.buf.len().saturating_add(bytes.len());
            self.poisoned = true;
            self.buf = Vec::new();
            return Err(RecordError::OutOfMemory { bytes });
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next record, `Ok(None)` if more bytes are needed. Unknown optional records are
    /// returned as [`Decoded::Skipped`] so the caller can count them.
    pub fn next_record(&mut self) -> Result<Option<Decoded>, RecordError> {
        if self.poisoned {
            return Err(RecordError::Poisoned);
        }
        let result = self.take();
        if result.is_err() {
            self.poisoned = true;
            self.buf = Vec::new();
            self.at = 0;
        }
        result
    }

    fn take(&mut self) -> Result<Option<Decoded>, RecordError> {
        let avail = self.buf.get(self.at..).unwrap_or_default();
        let Some(head) = avail.first_chunk::<RECORD_HEADER_LEN>() else { return Ok(None) };
        let [t0, t1, f0, f1, l0, l1, l2, l3] = *head;
        let record_type = u16::from_le_bytes([t0, t1]);
        let flags = u16::from_le_bytes([f0, f1]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > MAX_RECORD_PAYLOAD {
            return Err(RecordError::TooLarge { record_type, len: u64::from(len) });
        }
        if flags & !FLAG_MANDATORY != 0 {
            return Err(RecordError::ReservedFlags { record_type, flags });
        }
        let body = RECORD_HEADER_LEN + len as usize;
        let total = body + RECORD_CRC_LEN;
        let (Some(covered), Some(crc)) = (avail.get(..body), avail.get(body..total)) else { return Ok(None) };
        let mut c = Crc32c::new();
        c.update(covered);
        let computed = c.finish();
        let carried = crc.first_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b));
        if computed != carried {
            return Err(RecordError::BadChecksum { record_type, carried, computed });
        }
        let payload = covered.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let decoded = match RecordType::from_code(record_type) {
            Some(ty) => Decoded::Record(Record::decode_payload(ty, payload)?),
            None if flags & FLAG_MANDATORY != 0 => return Err(RecordError::UnknownMandatory { record_type }),
            None => Decoded::Skipped { record_type, len },
        };
        self.at += total;
        self.records += 1;
        self.bytes += total as u64;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        Ok(Some(decoded))
    }

    /// Check that the stream ended on a record boundary: refused with
    /// [`RecordError::Truncated`] if part of a record is buffered.
    pub fn finish(&self) -> Result<(), RecordError> {
        if self.poisoned {
            return Err(RecordError::Poisoned);
        }
        match self.buf.len() - self.at {
            0 => Ok(()),
            buffered => Err(RecordError::Truncated { buffered }),
        }
    }

    /// Whether an error has poisoned the decoder.
    pub const fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Records returned so far (including skipped ones).
    pub const fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of complete records consumed so far.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Why a record could not be encoded or decoded. Every decoding error fails the
/// migration: the stream cannot be resynchronised after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// A payload longer than [`MAX_RECORD_PAYLOAD`] (found from the header alone).
    TooLarge {
        /// The record's type.
        record_type: u16,
        /// The declared or given payload length.
        len: u64,
    },
    /// The CRC-32C at the end of the record does not match its contents.
    BadChecksum {
        /// The record's type (as read; it may be the corrupted part).
        record_type: u16,
        /// The CRC the record carries.
        carried: u32,
        /// The CRC of its bytes.
        computed: u32,
    },
    /// Reserved flag bits are set.
    ReservedFlags {
        /// The record's type.
        record_type: u16,
        /// The flags.
        flags: u16,
    },
    /// A record of a type this build does not know, marked mandatory.
    UnknownMandatory {
        /// The record's type.
        record_type: u16,
    },
    /// A header with a stream version this build does not speak.
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// A payload that does not match its type's layout.
    BadPayload {
        /// The record's type.
        record_type: u16,
        /// What is wrong with it.
        fault: PayloadFault,
    },
    /// The stream ended inside a record.
    Truncated {
        /// The bytes of the incomplete record that arrived.
        buffered: usize,
    },
    /// An earlier error poisoned the decoder.
    Poisoned,
    /// The heap could not hold a record (or a decoder buffer) of this many bytes.
    OutOfMemory {
        /// The bytes asked for.
        bytes: usize,
    },
}

/// What is wrong with a record's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadFault {
    /// The payload ends inside a field.
    Truncated,
    /// Bytes remain after the last field.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A string field is not UTF-8.
    BadUtf8,
    /// A field too long for its length prefix.
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A page batch with more than [`MAX_BATCH_PAGES`] pages.
    TooManyPages {
        /// The count.
        count: usize,
    },
    /// A page batch whose zero flags do not match its pfns one to one.
    ZeroFlags {
        /// The number of pfns.
        pfns: usize,
        /// The number of flags.
        flags: usize,
    },
    /// A pfn at or above [`PFN_LIMIT`] (or an entry with reserved bits set).
    PfnTooLarge {
        /// The pfn.
        pfn: u64,
    },
    /// Page data that is not 4096 bytes per non-zero page.
    DataLength {
        /// The bytes expected.
        expected: usize,
        /// The bytes found.
        found: usize,
    },
    /// A dirty record inside a dirty round does not decode.
    Dirty(DirtyError),
    /// A list whose entries must be unique and ordered repeats or reorders one.
    Unordered {
        /// The list.
        field: &'static str,
        /// The entry out of place (an MSR index; a device's kind << 32 | instance).
        value: u64,
    },
    /// Fields that contradict each other.
    Inconsistent(&'static str),
}

/// The name of a record type, for messages.
fn type_name(code: u16) -> &'static str {
    match RecordType::from_code(code) {
        Some(RecordType::Header) => "header",
        Some(RecordType::CpuidPolicy) => "CPUID policy",
        Some(RecordType::PageBatch) => "page batch",
        Some(RecordType::DirtyRound) => "dirty round",
        Some(RecordType::VcpuState) => "vCPU state",
        Some(RecordType::End) => "end",
        Some(RecordType::MemoryDigest) => "memory digest",
        Some(RecordType::GuestClock) => "guest clock",
        Some(RecordType::VcpuFpu) => "vCPU FPU state",
        Some(RecordType::VcpuMsrs) => "vCPU MSRs",
        Some(RecordType::DeviceStates) => "device states",
        Some(RecordType::ConsoleRing) => "console ring",
        None => "unknown",
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { record_type, len } => write!(
                f,
                "migration record type {record_type} ({}) is {len} bytes long, more than the maximum {MAX_RECORD_PAYLOAD}",
                type_name(*record_type)
            ),
            Self::BadChecksum { record_type, carried, computed } => write!(
                f,
                "migration record type {record_type} ({}) failed its checksum: carried CRC-32C {carried:#010x}, computed {computed:#010x}",
                type_name(*record_type)
            ),
            Self::ReservedFlags { record_type, flags } => {
                write!(f, "migration record type {record_type} has reserved flag bits set: {flags:#06x}")
            }
            Self::UnknownMandatory { record_type } => write!(
                f,
                "migration record type {record_type} is unknown to this hypervisor and marked mandatory; the stream \
                 needs a newer destination"
            ),
            Self::UnsupportedVersion { found } => write!(
                f,
                "migration stream version {found} is not supported (this hypervisor speaks version {MIGRATION_STREAM_VERSION})"
            ),
            Self::BadPayload { record_type, fault } => {
                write!(f, "migration record type {record_type} ({}) is malformed: {fault}", type_name(*record_type))
            }
            Self::Truncated { buffered } => {
                write!(f, "migration stream ended inside a record ({buffered} bytes of it arrived)")
            }
            Self::Poisoned => f.write_str("migration stream decoder stopped at an earlier error"),
            Self::OutOfMemory { bytes } => {
                write!(f, "the hypervisor's heap cannot hold {bytes} bytes of migration stream")
            }
        }
    }
}

impl fmt::Display for PayloadFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("payload ends inside a field"),
            Self::TrailingBytes { extra } => write!(f, "{extra} bytes after the last field"),
            Self::BadUtf8 => f.write_str("a string is not UTF-8"),
            Self::TooLong { field, len } => write!(f, "{field} is too long ({len})"),
            Self::TooManyPages { count } => write!(f, "{count} pages in one batch, more than {MAX_BATCH_PAGES}"),
            Self::ZeroFlags { pfns, flags } => write!(f, "{pfns} pfns but {flags} zero flags"),
            Self::PfnTooLarge { pfn } => write!(f, "pfn {pfn:#x} is out of range"),
            Self::DataLength { expected, found } => {
                write!(f, "{found} bytes of page data where the pages need {expected}")
            }
            Self::Dirty(e) => write!(f, "dirty record: {e}"),
            Self::Unordered { field, value } => {
                write!(f, "{field}: entry {value:#x} repeats or is out of ascending order")
            }
            Self::Inconsistent(why) => f.write_str(why),
        }
    }
}

impl core::error::Error for RecordError {}
impl core::error::Error for PayloadFault {}

/// A cursor over a payload.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadFault> {
        let end = self.at.checked_add(n).ok_or(PayloadFault::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(PayloadFault::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadFault> {
        self.take(N)?.first_chunk::<N>().copied().ok_or(PayloadFault::Truncated)
    }

    fn u16(&mut self) -> Result<u16, PayloadFault> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, PayloadFault> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, PayloadFault> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self, n: usize) -> Result<String, PayloadFault> {
        let b = self.take(n)?;
        core::str::from_utf8(b).map(String::from).map_err(|_| PayloadFault::BadUtf8)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.bytes.get(self.at..).unwrap_or_default();
        self.at = self.bytes.len();
        s
    }

    fn done(&self) -> Result<(), PayloadFault> {
        match self.bytes.len().saturating_sub(self.at) {
            0 => Ok(()),
            extra => Err(PayloadFault::TrailingBytes { extra }),
        }
    }
}
