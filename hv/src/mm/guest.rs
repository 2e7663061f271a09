//! A guest's physical memory: pool frames mapped 4 KiB at a time by the domain's
//! nested page tables, zeroed when allocated and all returned when destroyed.
//!
//! Guest-physical address 0 up to `bytes` is backed; anything else faults into the
//! hypervisor (a nested page fault). Accessors copy to and from guest memory through
//! the frame pool, never through the guest's own mappings.

use alloc::vec::Vec;

use super::frames::FramePool;
use super::nested::{EntryFormat, NestedTables, Perms};
use super::{MmError, PAGE_SIZE};

/// Guest memory of one domain.
#[derive(Debug)]
pub struct GuestMemory<F: EntryFormat> {
    frames: Vec<u64>,
    tables: NestedTables<F>,
}

impl<F: EntryFormat> GuestMemory<F> {
    /// Allocate and map `bytes` (rounded up to pages) of zeroed memory from GPA 0.
    /// On failure everything allocated so far is returned to the pool.
    pub fn new(pool: &mut FramePool, bytes: u64) -> Result<Self, MmError> {
        let pages = bytes.div_ceil(PAGE_SIZE);
        let tables = NestedTables::new(pool)?;
        let mut mem = Self { frames: Vec::new(), tables };
        for page in 0..pages {
            let step = pool.alloc_zeroed().and_then(|frame| {
                mem.frames.push(frame);
                mem.tables.map_4k(pool, page * PAGE_SIZE, frame, Perms::RWX)
            });
            if let Err(e) = step {
                mem.destroy(pool)?;
                return Err(e);
            }
        }
        Ok(mem)
    }

    /// Bytes of guest memory.
    pub fn bytes(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }

    /// Frames backing the memory (not counting page tables).
    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    /// The nested page tables' root (for the EPTP / nCR3).
    pub fn root(&self) -> u64 {
        self.tables.root()
    }

    fn frame_of(&self, gpa: u64) -> Result<u64, MmError> {
        self.frames.get((gpa / PAGE_SIZE) as usize).copied().ok_or(MmError::OutOfRange { gpa })
    }

    /// Change the nested entry mapping guest page `gpa` (see `NestedTables::update_leaf_4k`).
    pub fn update_leaf(&self, pool: &mut FramePool, gpa: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, MmError> {
        self.tables.update_leaf_4k(pool, gpa, f)
    }

    /// Copy `data` into guest memory at `gpa` (may span pages).
    pub fn write(&self, pool: &mut FramePool, gpa: u64, data: &[u8]) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < data.len() {
            let at = gpa + done as u64;
            let off = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let page = pool.bytes_mut(self.frame_of(at)?)?;
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
            let page = pool.bytes_mut(self.frame_of(at)?)?;
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

    /// Return every frame and table to the pool.
    pub fn destroy(self, pool: &mut FramePool) -> Result<(), MmError> {
        self.tables.destroy(pool)?;
        for f in self.frames {
            pool.free(f)?;
        }
        Ok(())
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
        let mem = GuestMemory::<Npt>::new(&mut p, 5 * PAGE_SIZE + 1).unwrap();
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
    fn running_out_of_frames_returns_what_was_taken() {
        let mut p = pool(10);
        assert!(matches!(GuestMemory::<Ept>::new(&mut p, 20 * PAGE_SIZE), Err(MmError::OutOfFrames { .. })));
        assert_eq!(p.free_frames(), 10);
    }
}
