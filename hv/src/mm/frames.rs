//! The frame pool: 4 KiB frames out of one physically contiguous region that boot
//! handed to the hypervisor, tracked by a bitmap.
//!
//! This is the only place that turns a physical address into a reference. Frames are
//! zeroed when allocated, so no data leaks from one owner (a guest, a table) to the next.
//! The pool refuses to hand out references to frames it does not own or has not
//! allocated, which keeps the unsafety in one audited spot.

use alloc::vec;
use alloc::vec::Vec;

use super::{MmError, PAGE_SIZE};

/// A pool of 4 KiB frames.
#[derive(Debug)]
pub struct FramePool {
    base: u64,
    frames: usize,
    used: Vec<u64>,
    free: usize,
    /// Rotating start of the search, so allocation is not quadratic.
    hint: usize,
}

impl FramePool {
    /// Take ownership of `frames` frames starting at physical address `base`.
    ///
    /// # Safety
    /// `[base, base + frames * 4096)` must be RAM that nothing else uses for as long as
    /// the pool lives, reachable at the same virtual address (identity-mapped), and
    /// `base` must be 4 KiB aligned.
    pub unsafe fn new(base: u64, frames: usize) -> Self {
        debug_assert!(base.is_multiple_of(PAGE_SIZE));
        Self { base, frames, used: vec![0; frames.div_ceil(64)], free: frames, hint: 0 }
    }

    /// Frames not in use.
    pub fn free_frames(&self) -> usize {
        self.free
    }

    /// Frames in the pool.
    pub fn total_frames(&self) -> usize {
        self.frames
    }

    fn index(&self, pa: u64) -> Result<usize, MmError> {
        if !pa.is_multiple_of(PAGE_SIZE) || pa < self.base {
            return Err(MmError::NotOwned { pa });
        }
        let i = ((pa - self.base) / PAGE_SIZE) as usize;
        if i >= self.frames || self.used[i / 64] & (1 << (i % 64)) == 0 {
            return Err(MmError::NotOwned { pa });
        }
        Ok(i)
    }

    /// Allocate one zeroed frame and return its physical address.
    pub fn alloc_zeroed(&mut self) -> Result<u64, MmError> {
        if self.free == 0 {
            return Err(MmError::OutOfFrames { total: self.frames });
        }
        for step in 0..self.frames {
            let i = (self.hint + step) % self.frames;
            if self.used[i / 64] & (1 << (i % 64)) == 0 {
                self.used[i / 64] |= 1 << (i % 64);
                self.free -= 1;
                self.hint = i + 1;
                let pa = self.base + i as u64 * PAGE_SIZE;
                self.bytes_mut(pa)?.fill(0);
                return Ok(pa);
            }
        }
        Err(MmError::OutOfFrames { total: self.frames })
    }

    /// Allocate `count` physically contiguous zeroed frames (for structures the
    /// hardware reads as one block, such as SVM's 12 KiB I/O permission map).
    pub fn alloc_contiguous_zeroed(&mut self, count: usize) -> Result<u64, MmError> {
        let is_free = |used: &[u64], i: usize| used[i / 64] & (1 << (i % 64)) == 0;
        let mut run = 0;
        for i in 0..self.frames {
            run = if is_free(&self.used, i) { run + 1 } else { 0 };
            if run == count && count > 0 {
                let first = i + 1 - count;
                for j in first..=i {
                    self.used[j / 64] |= 1 << (j % 64);
                }
                self.free -= count;
                let base = self.base + first as u64 * PAGE_SIZE;
                for j in 0..count as u64 {
                    self.bytes_mut(base + j * PAGE_SIZE)?.fill(0);
                }
                return Ok(base);
            }
        }
        Err(MmError::OutOfFrames { total: self.frames })
    }

    /// Allocate `count` contiguous zeroed frames whose first physical address is a
    /// multiple of `align` bytes (for 2 MiB nested mappings). `None` when no such run
    /// is free (callers fall back to 4 KiB frames).
    pub fn alloc_aligned_zeroed(&mut self, count: usize, align: u64) -> Option<u64> {
        let step = (align / PAGE_SIZE).max(1) as usize;
        let first_aligned = (self.base.next_multiple_of(align) - self.base) / PAGE_SIZE;
        let mut start = first_aligned as usize;
        while start + count <= self.frames {
            if (start..start + count).all(|i| self.used[i / 64] & (1 << (i % 64)) == 0) {
                for i in start..start + count {
                    self.used[i / 64] |= 1 << (i % 64);
                }
                self.free -= count;
                let base = self.base + start as u64 * PAGE_SIZE;
                for j in 0..count as u64 {
                    self.bytes_mut(base + j * PAGE_SIZE).ok()?.fill(0);
                }
                return Some(base);
            }
            start += step;
        }
        None
    }

    /// Move `count` frames out of this pool into a pool of their own, for an owner on
    /// another CPU (an application processor's backend and the tables of its guests),
    /// which cannot share this pool's `&mut`. The frames stay allocated here for as long
    /// as the new pool lives: they are never handed out twice.
    pub fn split_off(&mut self, count: usize) -> Result<FramePool, MmError> {
        let base = self.alloc_contiguous_zeroed(count)?;
        // `alloc_contiguous_zeroed` gave us `count` contiguous frames from `base`, inside
        // the region `new`'s contract made ours (identity-mapped, 4 KiB aligned); they
        // stay marked used here, so this pool never hands them out or refers to them
        // again, and the new pool is their only owner.
        // SAFETY: frames of ours (above) that only the new pool will own.
        let pool = unsafe { FramePool::new(base, count) };
        Ok(pool)
    }

    /// Return a frame to the pool.
    pub fn free(&mut self, pa: u64) -> Result<(), MmError> {
        let i = self.index(pa)?;
        self.used[i / 64] &= !(1 << (i % 64));
        self.free += 1;
        Ok(())
    }

    /// The bytes of an allocated frame.
    pub fn bytes_mut(&mut self, pa: u64) -> Result<&mut [u8; 4096], MmError> {
        self.index(pa)?;
        // SAFETY: `index` checked that `pa` is a page-aligned frame inside the region whose exclusive, identity-
        // mapped ownership `new`'s contract gave us, and that it is currently allocated; the returned borrow is tied
        // to `&mut self`, so no second reference into the pool can exist at the same time.
        Ok(unsafe { &mut *(pa as *mut [u8; 4096]) })
    }

    /// An allocated frame viewed as a page table (512 entries).
    pub fn table_mut(&mut self, pa: u64) -> Result<&mut [u64; 512], MmError> {
        self.index(pa)?;
        // SAFETY: as in `bytes_mut`; [u64; 512] has the frame's size (checked below at
        // compile time) and 8-byte alignment, which a 4 KiB aligned frame satisfies.
        Ok(unsafe { &mut *(pa as *mut [u64; 512]) })
    }
}

const _: () = assert!(core::mem::size_of::<[u64; 512]>() == PAGE_SIZE as usize);

/// Host-test support: a page-aligned heap region standing in for boot's pool.
#[cfg(any(test, fuzzing))]
pub(crate) mod testing {
    #[cfg(test)]
    use super::FramePool;
    #[cfg(test)]
    use alloc::vec::Vec;

    #[repr(C, align(4096))]
    pub struct Page(pub [u8; 4096]);

    /// A pool over leaked, page-aligned heap memory (tests only; the fuzz harness owns
    /// its frames instead, since a fuzz run would leak without bound).
    #[cfg(test)]
    pub fn pool(frames: usize) -> FramePool {
        let mut v: Vec<Page> = Vec::with_capacity(frames);
        v.resize_with(frames, || Page([0xAA; 4096]));
        let base = v.leak().as_mut_ptr() as u64;
        // SAFETY: the leaked region is ours forever, page aligned, and on the host the
        // "physical" address is simply the pointer.
        unsafe { FramePool::new(base, frames) }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::pool;
    use super::*;

    #[test]
    fn allocates_every_frame_once_zeroed_then_runs_out() {
        let mut p = pool(70);
        let mut seen = Vec::new();
        for _ in 0..70 {
            let pa = p.alloc_zeroed().unwrap();
            assert!(p.bytes_mut(pa).unwrap().iter().all(|&b| b == 0));
            assert!(!seen.contains(&pa));
            seen.push(pa);
        }
        assert_eq!(p.free_frames(), 0);
        assert_eq!(p.alloc_zeroed(), Err(MmError::OutOfFrames { total: 70 }));
        p.free(seen[3]).unwrap();
        assert_eq!(p.alloc_zeroed().unwrap(), seen[3]);
    }

    #[test]
    fn a_split_off_pool_owns_its_frames_alone() {
        let mut p = pool(10);
        let mut part = p.split_off(4).unwrap();
        assert_eq!((p.free_frames(), part.total_frames(), part.free_frames()), (6, 4, 4));
        let mine: Vec<u64> = (0..4).map(|_| part.alloc_zeroed().unwrap()).collect();
        assert_eq!(part.alloc_zeroed(), Err(MmError::OutOfFrames { total: 4 }));
        // The parent neither hands those frames out again nor lets them be freed into it.
        let theirs: Vec<u64> = (0..6).map(|_| p.alloc_zeroed().unwrap()).collect();
        assert!(theirs.iter().all(|pa| !mine.contains(pa)));
        assert!(part.free(theirs[0]).is_err());
        // Freed in the part, a frame is the part's to give again.
        part.free(mine[2]).unwrap();
        assert_eq!(part.alloc_zeroed().unwrap(), mine[2]);
        assert_eq!(p.split_off(1).unwrap_err(), MmError::OutOfFrames { total: 10 });
    }

    #[test]
    fn contiguous_runs_skip_used_frames() {
        let mut p = pool(8);
        let a = p.alloc_zeroed().unwrap(); // frame 0
        let b = p.alloc_zeroed().unwrap(); // frame 1
        p.free(a).unwrap(); // frame 0 free again: a run of 1, then frame 1 used
        let run = p.alloc_contiguous_zeroed(3).unwrap();
        assert_eq!(run, b + 4096, "run must start after the used frame 1");
        assert_eq!(p.free_frames(), 8 - 1 - 3);
        for i in 0..3 {
            assert!(p.bytes_mut(run + i * 4096).unwrap().iter().all(|&x| x == 0));
        }
        // Free now: frame 0 and frames 5..=7; no run of 4 exists.
        assert_eq!(p.alloc_contiguous_zeroed(4), Err(MmError::OutOfFrames { total: 8 }));
        assert_eq!(p.alloc_contiguous_zeroed(1).unwrap(), a);
    }

    #[test]
    fn refuses_frames_it_does_not_own_or_has_not_allocated() {
        let mut p = pool(4);
        let a = p.alloc_zeroed().unwrap();
        assert!(matches!(p.bytes_mut(a + 1), Err(MmError::NotOwned { .. })));
        assert!(matches!(p.bytes_mut(a + 4 * 4096 * 8), Err(MmError::NotOwned { .. })));
        p.free(a).unwrap();
        assert!(matches!(p.bytes_mut(a), Err(MmError::NotOwned { .. })), "freed frame still reachable");
        assert!(matches!(p.free(a), Err(MmError::NotOwned { .. })), "double free accepted");
    }
}
