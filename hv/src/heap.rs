//! The hypervisor's heap: the allocator behind `alloc` (boot installs it as the global
//! allocator), over one region boot reserves from firmware, with its use counted so
//! `hvctl info` can show the bytes in use and the high-water mark.
//!
//! It is not a policy: what may allocate how much is decided where a request's size is
//! known (fallible `try_reserve` there, a typed error reply back). This module only
//! hands out memory, and [`stats`] says how close the heap is to full.
//!
//! Sizing the heap from the memory map is [`plan`]'s job: pure arithmetic that the
//! host tests check, so boot only asks the firmware for what it computes.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of the heap (0 until [`Heap::init`]).
static SIZE: AtomicUsize = AtomicUsize::new(0);
/// Bytes handed out and not yet freed (as the caller asked them, without the
/// allocator's own rounding).
static USED: AtomicUsize = AtomicUsize::new(0);
/// The largest `USED` seen.
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Allocations refused for want of space (each one is either a fallible request that
/// got an error reply, or the panic that follows an infallible one).
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// The heap's use now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeapStats {
    /// Bytes of the heap.
    pub size: usize,
    /// Bytes in use.
    pub used: usize,
    /// The most bytes ever in use at once.
    pub peak: usize,
    /// Allocations refused because the heap had no room.
    pub refused: usize,
}

/// The heap's use now (all zeros where no [`Heap`] was initialised, e.g. host tests).
pub fn stats() -> HeapStats {
    HeapStats {
        size: SIZE.load(Ordering::Relaxed),
        used: USED.load(Ordering::Relaxed),
        peak: PEAK.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
    }
}

/// A first-fit heap (`linked_list_allocator`) behind a spin lock, counting its use.
/// No interrupt handler allocates, so the lock is never contended by an interrupt on
/// the same CPU; the application processors allocate only while they start
/// (`smp::ap_entry`: their tables and PerCpu), and a spin lock is enough for that.
pub struct Heap {
    inner: spin::Mutex<linked_list_allocator::Heap>,
}

impl core::fmt::Debug for Heap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap").field("stats", &stats()).finish()
    }
}

impl Heap {
    /// A heap with no memory yet: every allocation fails until [`Heap::init`].
    pub const fn empty() -> Self {
        Self { inner: spin::Mutex::new(linked_list_allocator::Heap::empty()) }
    }

    /// Give the heap its memory.
    ///
    /// # Safety
    /// `[start, start + size)` must be writable memory that nothing else uses for the
    /// rest of the program, and `init` must be called once.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: the caller's contract is the one `Heap::init` needs.
        unsafe { self.inner.lock().init(start, size) };
        SIZE.store(size, Ordering::Relaxed);
    }
}

// SAFETY: allocation and deallocation go to `linked_list_allocator::Heap`, which
// returns blocks of at least the layout's size and alignment from its own region or
// fails with a null pointer; the counters are only statistics.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.inner.lock().allocate_first_fit(layout) {
            Ok(p) => {
                let used = USED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
                PEAK.fetch_max(used, Ordering::Relaxed);
                p.as_ptr()
            }
            Err(()) => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                core::ptr::null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc's contract).
            unsafe { self.inner.lock().deallocate(p, layout) };
            USED.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }
}

/// What boot reserves from the firmware, in 4 KiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The heap.
    pub heap_pages: usize,
    /// The most the frame pool may take (boot asks for this and less until the
    /// firmware can give one contiguous run).
    pub pool_pages_max: usize,
    /// The least pool worth starting with.
    pub pool_pages_min: usize,
}

/// The smallest heap: the control server, the services, descriptor tables and a few
/// migration sessions fit in it with room to spare.
pub const MIN_HEAP_BYTES: usize = 16 << 20;
/// The largest heap worth having: nothing on it grows with guest memory by more than
/// a bit per page (dirty bitmaps), so a larger one would only take RAM from guests.
pub const MAX_HEAP_BYTES: usize = 256 << 20;
/// Free memory left to the firmware until ExitBootServices (its memory map, the files
/// boot reads) and to boot's own small allocations.
pub const FIRMWARE_SLACK_BYTES: usize = 32 << 20;

/// Divide the firmware's free memory (`conventional_pages`, before anything is
/// reserved) between the heap, device DMA (`dma_pages`, fixed) and the frame pool.
///
/// The heap gets 1/64 of memory within [`MIN_HEAP_BYTES`]..=[`MAX_HEAP_BYTES`]: what
/// lives on it per guest is a dirty bitmap (a bit per page) per log, a frame bitmap
/// of the pool (a bit per frame), and per-request buffers bounded by the frame size,
/// so 1/64 is many times what the largest guest the pool can hold needs. The pool gets
/// the rest but [`FIRMWARE_SLACK_BYTES`].
pub fn plan(conventional_pages: usize, dma_pages: usize) -> Plan {
    const PAGE: usize = 4096;
    let total = conventional_pages.saturating_mul(PAGE);
    let heap_bytes = (total / 64).clamp(MIN_HEAP_BYTES, MAX_HEAP_BYTES);
    let heap_pages = heap_bytes / PAGE;
    let pool_pages_max = conventional_pages
        .saturating_sub(heap_pages)
        .saturating_sub(dma_pages)
        .saturating_sub(FIRMWARE_SLACK_BYTES / PAGE);
    Plan { heap_pages, pool_pages_max, pool_pages_min: (64 << 20) / PAGE }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 256; // pages

    #[test]
    fn small_machines_get_the_minimum_heap_and_the_rest_for_guests() {
        let p = plan(512 * MIB, 512);
        assert_eq!(p.heap_pages, 16 * MIB);
        assert_eq!(p.pool_pages_max, (512 - 16 - 32) * MIB - 512);
    }

    #[test]
    fn the_heap_grows_with_memory_up_to_its_cap() {
        assert_eq!(plan(2048 * MIB, 512).heap_pages, 32 * MIB);
        assert_eq!(plan(64 * 1024 * MIB, 512).heap_pages, 256 * MIB);
        // A 1 GiB guest's two dirty bitmaps and the pool's frame bitmap of a 2 GiB
        // machine take under 100 KiB of its 32 MiB heap.
        let bitmaps = 2 * (1 << 30) / 4096 / 8 + (2 << 30) / 4096 / 8;
        assert!(bitmaps * 100 < plan(2048 * MIB, 512).heap_pages * 4096);
    }

    #[test]
    fn a_machine_too_small_for_a_pool_gets_none_rather_than_wrapping() {
        let p = plan(20 * MIB, 512);
        assert_eq!(p.pool_pages_max, 0);
        assert!(p.pool_pages_max < p.pool_pages_min);
    }

    #[test]
    fn stats_start_empty_on_the_host() {
        // Host tests use the system allocator; nothing initialises ours.
        assert_eq!(stats().size, 0);
    }
}
