//! Glue between the `virtio-drivers` crate and the hypervisor: its `Hal` (DMA memory
//! from a dedicated frame pool, identity-mapped MMIO) and device discovery on PCI.
//!
//! We use virtio-drivers' virtqueues, modern virtio-pci transport and vsock connection
//! manager rather than hand-written ones: they are maintained, `no_std`, and used by
//! several Rust kernels. Devices are polled; the hypervisor runs with interrupts off.

use core::ptr::NonNull;

use spin::Mutex;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::drivers::pci::PortCam;
use crate::mm::PAGE_SIZE;
use crate::mm::frames::FramePool;

/// Frames reserved for device DMA (virtqueues and their buffers).
static DMA_POOL: Mutex<Option<FramePool>> = Mutex::new(None);

/// Hand `pool` to the DMA allocator. Call once before creating devices.
pub fn init_dma(pool: FramePool) {
    *DMA_POOL.lock() = Some(pool);
}

/// Free DMA frames left (for status reports).
pub fn dma_free_frames() -> usize {
    DMA_POOL.lock().as_ref().map_or(0, FramePool::free_frames)
}

/// The hypervisor's implementation of virtio-drivers' hardware abstraction.
#[derive(Debug)]
pub enum HvHal {}

// SAFETY: dma_alloc returns zeroed, page-aligned, physically contiguous frames owned by
// the DMA pool and handed out once until dma_dealloc; memory is identity-mapped, so the
// physical address is also a valid pointer; share/unshare need no bounce buffers for
// the same reason (no IOMMU is programmed).
unsafe impl Hal for HvHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let mut guard = DMA_POOL.lock();
        let allocation = guard.as_mut().map(|pool| pool.alloc_contiguous_zeroed(pages));
        match allocation {
            Some(Ok(pa)) => match NonNull::new(pa as *mut u8) {
                Some(ptr) => (pa, ptr),
                None => dma_exhausted(pages, "the pool returned address 0"),
            },
            Some(Err(e)) => {
                drop(guard);
                dma_exhausted(pages, &alloc::format!("{e}"))
            }
            None => {
                drop(guard);
                dma_exhausted(pages, "no DMA pool installed")
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let mut guard = DMA_POOL.lock();
        let Some(pool) = guard.as_mut() else { return -1 };
        for i in 0..pages as u64 {
            if pool.free(paddr + i * PAGE_SIZE).is_err() {
                return -1;
            }
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map: BARs assigned by firmware are reachable at their physical address.
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The device cannot work without its queues; there is no way to report this through
/// virtio-drivers' `Hal` signature, so say what happened and stop cleanly.
fn dma_exhausted(pages: usize, why: &str) -> ! {
    crate::println!("FAIL: virtio DMA allocation of {pages} page(s) failed: {why}");
    crate::shutdown(crate::Outcome::Failed)
}

/// A virtio device found on PCI.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    /// Where it is.
    pub function: DeviceFunction,
    /// What it is.
    pub device_type: DeviceType,
}

/// Look for virtio devices of `wanted` type on every bus, and build the modern PCI
/// transport for the first one.
pub fn find(
    wanted: DeviceType,
) -> Result<Option<(Found, PciTransport)>, virtio_drivers::transport::pci::VirtioPciError> {
    // SAFETY: the configuration ports are used only from here, on the bootstrap CPU.
    let mut root = PciRoot::new(unsafe { PortCam::new() });
    for bus in 0..=255u8 {
        let devices: alloc::vec::Vec<_> = root.enumerate_bus(bus).collect();
        for (function, info) in devices {
            if virtio_drivers::transport::pci::virtio_device_type(&info) == Some(wanted) {
                let transport = PciTransport::new::<HvHal, _>(&mut root, function)?;
                return Ok(Some((Found { function, device_type: wanted }, transport)));
            }
        }
    }
    Ok(None)
}
