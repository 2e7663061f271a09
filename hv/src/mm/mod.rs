//! Host memory for the hypervisor: the frame pool and nested page tables; and the
//! guest's own page tables, walked in software ([`walk`]).
//!
//! The hypervisor runs on the firmware's identity map (physical address == virtual
//! address, as UEFI leaves long mode), so a frame's physical address is also a
//! pointer to it. All of that is confined to [`frames::FramePool`], which owns a region
//! boot handed over; everything else works in physical addresses.

pub mod frames;
pub mod guest;
pub mod nested;
pub mod walk;

/// Size of a base page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (PDE-level) page.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;

/// Memory errors, with the address involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmError {
    /// The frame pool has no free frame left.
    OutOfFrames {
        /// Frames in the pool.
        total: usize,
    },
    /// An address is not aligned to the page size it is used with.
    Misaligned {
        /// The address.
        addr: u64,
        /// The alignment it needed.
        align: u64,
    },
    /// A guest-physical address is already mapped.
    AlreadyMapped {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A 4 KiB mapping was asked for inside an existing 2 MiB mapping (or the reverse).
    LargePageConflict {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A guest-physical address beyond what 4-level tables translate (48 bits).
    OutOfRange {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A frame address that the pool does not own or has not handed out.
    NotOwned {
        /// Physical address.
        pa: u64,
    },
    /// A request for more frames than the pool has free (refused before any is taken).
    NotEnoughFrames {
        /// Frames asked for.
        wanted: u64,
        /// Frames free.
        free: u64,
    },
    /// The hypervisor's heap cannot hold the bookkeeping for a request this large.
    OutOfHeap {
        /// The bytes asked for.
        bytes: usize,
    },
}

impl core::fmt::Display for MmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MmError::OutOfFrames { total } => {
                write!(f, "out of memory: all {total} frames of the hypervisor's pool are in use")
            }
            MmError::Misaligned { addr, align } => write!(f, "address {addr:#x} is not aligned to {align:#x}"),
            MmError::AlreadyMapped { gpa } => write!(f, "guest-physical address {gpa:#x} is already mapped"),
            MmError::LargePageConflict { gpa } => {
                write!(f, "guest-physical address {gpa:#x} conflicts with a mapping of another page size")
            }
            MmError::OutOfRange { gpa } => write!(f, "guest-physical address {gpa:#x} is beyond 48 bits"),
            MmError::NotOwned { pa } => write!(f, "physical address {pa:#x} is not an allocated frame of the pool"),
            MmError::NotEnoughFrames { wanted, free } => write!(
                f,
                "out of memory: {} MiB asked for, but only {} MiB of the hypervisor's frame pool are free",
                wanted >> 8,
                free >> 8
            ),
            MmError::OutOfHeap { bytes } => {
                write!(f, "out of memory: the hypervisor's heap cannot hold {bytes} more bytes for this request")
            }
        }
    }
}
