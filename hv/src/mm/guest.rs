//! A guest's physical memory: pool frames mapped 4 KiB at a time by the domain's
//! nested page tables, zeroed when allocated and all returned when destroyed.
//!
//! Guest-physical address 0 up to `bytes` is backed; anything else faults into the
//! hypervisor (a nested page fault). Accessors copy to and from guest memory through
//! the frame pool, never through the guest's own mappings.
//!
//! The nested tables are the only record of which host frame backs which guest page
//! (a walk finds it): nothing per page lives on the hypervisor's heap, so a 1 GiB
//! guest costs the heap a few bytes, not 2 MiB of frame addresses.

use alloc::vec::Vec;

use super::frames::FramePool;
use super::nested::{EntryFormat, NestedTables, PageSize, Perms};
use super::{LARGE_PAGE_SIZE, MmError, PAGE_SIZE};

/// Guest memory of one domain.
#[derive(Debug)]
pub struct GuestMemory<F: EntryFormat> {
    /// Pages backed, from GPA 0.
    pages: u64,
    tables: NestedTables<F>,
    /// Guest-physical 2 MiB chunks backed by one aligned host run, mapped (or
    /// mappable) with one 2 MiB leaf (one entry per 2 MiB: 4 KiB for a 1 GiB guest).
    large: Vec<u64>,
}

impl<F: EntryFormat> GuestMemory<F> {
    /// Allocate and map `bytes` (rounded up to pages) of zeroed memory from GPA 0.
    /// With `large`, each whole 2 MiB chunk the pool can back with one aligned run is
    /// mapped by one 2 MiB leaf (fewer nested walks and TLB entries); the rest is mapped
    /// 4 KiB at a time. On failure everything allocated so far is returned to the pool.
    pub fn new(pool: &mut FramePool, bytes: u64, large: bool) -> Result<Self, MmError> {
        let pages = bytes.div_ceil(PAGE_SIZE);
        // Refuse at once what cannot fit, rather than zero frames only to give them back.
        if pages > pool.free_frames() as u64 {
            return Err(MmError::NotEnoughFrames { wanted: pages, free: pool.free_frames() as u64 });
        }
        let per_chunk = LARGE_PAGE_SIZE / PAGE_SIZE;
        let mut chunks = Vec::new();
        if large {
            let n = usize::try_from(pages / per_chunk).unwrap_or(usize::MAX);
            chunks.try_reserve_exact(n).map_err(|_| MmError::OutOfHeap { bytes: n.saturating_mul(8) })?;
        }
        let tables = NestedTables::new(pool)?;
        // `pages` counts what is mapped so far, so a failure destroys exactly that.
        let mut mem = Self { pages: 0, tables, large: chunks };
        while mem.pages < pages {
            let page = mem.pages;
            let gpa = page * PAGE_SIZE;
            if large
                && pages - page >= per_chunk
                && let Some(run) = pool.alloc_aligned_zeroed(per_chunk as usize, LARGE_PAGE_SIZE)
            {
                if let Err(e) = mem.tables.map_2m(pool, gpa, run, Perms::RWX) {
                    for i in 0..per_chunk {
                        pool.free(run + i * PAGE_SIZE)?;
                    }
                    mem.destroy(pool)?;
                    return Err(e);
                }
                // Reserved above: one entry per whole chunk.
                mem.large.push(gpa);
                mem.pages += per_chunk;
                continue;
            }
            let frame = match pool.alloc_zeroed() {
                Ok(f) => f,
                Err(e) => {
                    mem.destroy(pool)?;
                    return Err(e);
                }
            };
            if let Err(e) = mem.tables.map_4k(pool, gpa, frame, Perms::RWX) {
                pool.free(frame)?;
                mem.destroy(pool)?;
                return Err(e);
            }
            mem.pages += 1;
        }
        Ok(mem)
    }

    /// Split the 2 MiB mappings overlapping guest pages `pfns` into 4 KiB ones (log-dirty
    /// needs per-page permissions and dirty flags). Returns how many were split.
    pub fn split_large(&mut self, pool: &mut FramePool, pfns: core::ops::Range<u64>) -> Result<u64, MmError> {
        let mut n = 0;
        for &gpa in &self.large {
            let chunk = gpa / PAGE_SIZE..(gpa + LARGE_PAGE_SIZE) / PAGE_SIZE;
            if chunk.start < pfns.end && pfns.start < chunk.end && self.tables.split_2m(pool, gpa)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Put back every 2 MiB mapping whose 4 KiB pieces are uniform again. Returns how
    /// many were merged.
    pub fn merge_large(&mut self, pool: &mut FramePool) -> Result<u64, MmError> {
        let mut n = 0;
        for &gpa in &self.large {
            if self.tables.merge_2m(pool, gpa)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// 2 MiB chunks backed by aligned host runs.
    pub fn large_chunks(&self) -> usize {
        self.large.len()
    }

    /// Bytes of guest memory.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// The nested page tables' root (for the EPTP / nCR3).
    pub fn root(&self) -> u64 {
        self.tables.root()
    }

    /// The host frame backing the guest page of `gpa`, found by walking the nested
    /// tables (they are the one record of it).
    fn frame_of(&self, pool: &mut FramePool, gpa: u64) -> Result<u64, MmError> {
        if gpa / PAGE_SIZE >= self.pages {
            return Err(MmError::OutOfRange { gpa });
        }
        match self.tables.translate(pool, gpa)? {
            Some((_, hpa)) => Ok(hpa & !(PAGE_SIZE - 1)),
            None => Err(MmError::OutOfRange { gpa }),
        }
    }

    /// Change the nested entry mapping guest page `gpa` (see `NestedTables::update_leaf_4k`).
    pub fn update_leaf(&self, pool: &mut FramePool, gpa: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, MmError> {
        self.tables.update_leaf_4k(pool, gpa, f)
    }

    /// Change the nested entries of guest pages `pfns`, grouped by 2 MiB region (see
    /// `NestedTables::update_leaves_4k`).
    pub fn update_leaves(
        &self,
        pool: &mut FramePool,
        pfns: impl IntoIterator<Item = u64>,
        f: impl FnMut(u64, u64) -> u64,
    ) -> Result<(), MmError> {
        self.tables.update_leaves_4k(pool, pfns, f)
    }

    /// Copy `data` into guest memory at `gpa` (may span pages).
    pub fn write(&self, pool: &mut FramePool, gpa: u64, data: &[u8]) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < data.len() {
            let at = gpa + done as u64;
            let off = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let frame = self.frame_of(pool, at)?;
            let page = pool.bytes_mut(frame)?;
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Copy guest memory at `gpa` into `out` (may span pages).
    pub fn read(&self, pool: &mut FramePool, gpa: u64, out: &mut [u8]) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < out.len() {
            let at = gpa + done as u64;
            let off = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(out.len() - done);
            let frame = self.frame_of(pool, at)?;
            let page = pool.bytes_mut(frame)?;
            out[done..done + n].copy_from_slice(&page[off..off + n]);
            done += n;
        }
        Ok(())
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, pool: &mut FramePool, gpa: u64) -> Result<u64, MmError> {
        let mut b = [0u8; 8];
        self.read(pool, gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Return every frame and table to the pool: the frames the tables map (a 2 MiB
    /// leaf's whole run at once), then the tables.
    pub fn destroy(self, pool: &mut FramePool) -> Result<(), MmError> {
        let mut page = 0;
        while page < self.pages {
            let gpa = page * PAGE_SIZE;
            match self.tables.translate(pool, gpa)? {
                Some((leaf, _)) if leaf.size == PageSize::Size2M => {
                    for i in 0..LARGE_PAGE_SIZE / PAGE_SIZE {
                        pool.free(leaf.hpa + i * PAGE_SIZE)?;
                    }
                    page += LARGE_PAGE_SIZE / PAGE_SIZE;
                }
                Some((leaf, _)) => {
                    pool.free(leaf.hpa)?;
                    page += 1;
                }
                None => return Err(MmError::OutOfRange { gpa }),
            }
        }
        self.tables.destroy(pool)
    }
}

/// Guest RAM as the software page walk reads it (`walk::GuestPhys`): through the
/// frame pool, never through the guest's own mappings.
#[derive(Debug)]
pub struct Phys<'a, F: EntryFormat> {
    /// The memory.
    pub mem: &'a GuestMemory<F>,
    /// The pool that holds it.
    pub pool: &'a mut FramePool,
}

impl<F: EntryFormat> super::walk::GuestPhys for Phys<'_, F> {
    fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        gpa.checked_add(out.len() as u64).is_some() && self.mem.read(self.pool, gpa, out).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::testing::pool;
    use super::super::nested::{Ept, Npt};
    use super::*;

    #[test]
    fn memory_round_trips_across_pages_and_is_returned_whole() {
        let mut p = pool(64);
        let before = p.free_frames();
        let mem = GuestMemory::<Npt>::new(&mut p, 5 * PAGE_SIZE + 1, true).unwrap();
        assert_eq!(mem.bytes(), 6 * PAGE_SIZE);
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        mem.write(&mut p, PAGE_SIZE - 100, &data).unwrap();
        let mut back = alloc::vec![0u8; data.len()];
        mem.read(&mut p, PAGE_SIZE - 100, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(mem.write(&mut p, 6 * PAGE_SIZE - 2, &[1, 2, 3]), Err(MmError::OutOfRange { gpa: 6 * PAGE_SIZE }));
        mem.destroy(&mut p).unwrap();
        assert_eq!(p.free_frames(), before, "every frame and table came back");
    }

    #[test]
    fn large_chunks_are_mapped_2m_and_split_for_logging() {
        let mut p = pool(2200);
        let before = p.free_frames();
        let mut mem = GuestMemory::<Ept>::new(&mut p, 4 * LARGE_PAGE_SIZE + 3 * PAGE_SIZE, true).unwrap();
        assert!(mem.large_chunks() >= 1, "the pool has aligned runs");
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
        mem.write(&mut p, LARGE_PAGE_SIZE - 100, &data).unwrap();
        assert_eq!(
            mem.split_large(&mut p, 0..2 * 512).unwrap(),
            mem.large.iter().filter(|g| **g < 2 * LARGE_PAGE_SIZE).count() as u64
        );
        let mut back = alloc::vec![0u8; data.len()];
        mem.read(&mut p, LARGE_PAGE_SIZE - 100, &mut back).unwrap();
        assert_eq!(back, data, "splitting keeps the contents");
        assert!(mem.merge_large(&mut p).unwrap() >= 1);
        mem.destroy(&mut p).unwrap();
        assert_eq!(p.free_frames(), before);
    }

    #[test]
    fn split_memory_is_returned_whole_without_a_merge() {
        let mut p = pool(2200);
        let before = p.free_frames();
        let mut mem = GuestMemory::<Npt>::new(&mut p, 3 * LARGE_PAGE_SIZE, true).unwrap();
        assert!(mem.large_chunks() >= 1);
        assert!(mem.split_large(&mut p, 0..3 * 512).unwrap() >= 1);
        mem.destroy(&mut p).unwrap();
        assert_eq!(p.free_frames(), before, "split 2 MiB runs come back page by page");
    }

    #[test]
    fn running_out_of_frames_returns_what_was_taken() {
        let mut p = pool(10);
        assert!(matches!(
            GuestMemory::<Ept>::new(&mut p, 20 * PAGE_SIZE, false),
            Err(MmError::NotEnoughFrames { wanted: 20, free: 10 })
        ));
        assert!(matches!(GuestMemory::<Ept>::new(&mut p, 10 * PAGE_SIZE, false), Err(MmError::OutOfFrames { .. })));
        assert_eq!(p.free_frames(), 10);
    }
}
