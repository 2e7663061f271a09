//! One nested page-table builder for both EPT (Intel) and NPT (AMD).
//!
//! The walk, allocation and error handling are written once in [`NestedTables`]; the
//! two vendors differ only in how an entry is encoded, which [`EntryFormat`] captures
//! (as Hypervisor-101 does). 4-level tables, 4 KiB and 2 MiB leaves.
//!
//! - EPT entries: SDM Vol. 3C 29.3.2 (Tables 29-1 to 29-6): bits 0/1/2 read/write/
//!   execute, bits 5:3 memory type (leaves), bit 7 page size, bits 8/9 accessed/dirty.
//! - NPT entries: APM Vol. 2 15.25.5: ordinary long-mode entries (P, R/W, U/S, PS, NX);
//!   every nested access is a user access, so U/S must be set at every level; memory
//!   type comes from PAT/PCD/PWT (0 selects PAT entry 0, write-back).

use core::marker::PhantomData;

use super::frames::FramePool;
use super::{LARGE_PAGE_SIZE, MmError, PAGE_SIZE};

/// Access a guest gets to a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Reads allowed (NPT cannot express "not readable": a present page is readable).
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub execute: bool,
}

impl Perms {
    /// Read, write and execute.
    pub const RWX: Perms = Perms { read: true, write: true, execute: true };
    /// Read and write, no execute.
    pub const RW: Perms = Perms { read: true, write: true, execute: false };
    /// Read only.
    pub const RO: Perms = Perms { read: true, write: false, execute: false };
}

/// Size of a leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB (PTE level).
    Size4K,
    /// 2 MiB (PDE level).
    Size2M,
}

/// A decoded leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Host-physical address of the page.
    pub hpa: u64,
    /// Access rights.
    pub perms: Perms,
    /// Leaf size.
    pub size: PageSize,
}

/// How one vendor encodes nested page-table entries.
pub trait EntryFormat {
    /// "EPT" or "NPT", for messages.
    const NAME: &'static str;
    /// A non-leaf entry pointing at the next-level table.
    fn table(next: u64) -> u64;
    /// A leaf entry mapping `hpa` with `perms`, write-back memory.
    fn leaf(hpa: u64, perms: Perms, size: PageSize) -> u64;
    /// Whether the entry maps or points at anything.
    fn present(entry: u64) -> bool;
    /// Whether a PDE-level entry is a 2 MiB leaf.
    fn is_large(entry: u64) -> bool;
    /// Decode a leaf entry.
    fn decode_leaf(entry: u64, size: PageSize) -> Leaf;
    /// The leaf's dirty flag, set by the processor on a write (EPT: with A/D enabled
    /// in the EPTP).
    const DIRTY: u64;
    /// The leaf's write permission.
    const WRITE_BIT: u64;
}

/// Address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Intel EPT entries (SDM Vol. 3C 29.3.2).
#[derive(Debug, Clone, Copy)]
pub enum Ept {}

impl Ept {
    const READ: u64 = 1 << 0;
    const WRITE: u64 = 1 << 1;
    const EXEC: u64 = 1 << 2;
    /// Bits 5:3 of a leaf: EPT memory type 6 = write-back (SDM 29.3.7).
    const MEMTYPE_WB: u64 = 6 << 3;
    const LARGE: u64 = 1 << 7;
}

impl EntryFormat for Ept {
    const NAME: &'static str = "EPT";
    /// SDM 29.3.5: bit 9 of a leaf is the dirty flag.
    const DIRTY: u64 = 1 << 9;
    const WRITE_BIT: u64 = Self::WRITE;
    fn table(next: u64) -> u64 {
        (next & ADDR_MASK) | Self::READ | Self::WRITE | Self::EXEC
    }
    fn leaf(hpa: u64, perms: Perms, size: PageSize) -> u64 {
        let mut e = (hpa & ADDR_MASK) | Self::MEMTYPE_WB;
        if perms.read {
            e |= Self::READ;
        }
        if perms.write {
            e |= Self::WRITE;
        }
        if perms.execute {
            e |= Self::EXEC;
        }
        if size == PageSize::Size2M {
            e |= Self::LARGE;
        }
        e
    }
    fn present(entry: u64) -> bool {
        // SDM 29.3.2: an entry is present if any of bits 2:0 is set.
        entry & 0b111 != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & Self::LARGE != 0
    }
    fn decode_leaf(entry: u64, size: PageSize) -> Leaf {
        Leaf {
            hpa: entry & ADDR_MASK,
            perms: Perms {
                read: entry & Self::READ != 0,
                write: entry & Self::WRITE != 0,
                execute: entry & Self::EXEC != 0,
            },
            size,
        }
    }
}

/// AMD NPT entries (APM Vol. 2 15.25.5; long-mode format of Vol. 2 5.3.3).
#[derive(Debug, Clone, Copy)]
pub enum Npt {}

impl Npt {
    const PRESENT: u64 = 1 << 0;
    const WRITE: u64 = 1 << 1;
    const USER: u64 = 1 << 2;
    const LARGE: u64 = 1 << 7;
    const NX: u64 = 1 << 63;
}

impl EntryFormat for Npt {
    const NAME: &'static str = "NPT";
    /// APM Vol. 2 5.4.2: bit 6 of a leaf is the dirty flag (nested walks set it too).
    const DIRTY: u64 = 1 << 6;
    const WRITE_BIT: u64 = Self::WRITE;
    fn table(next: u64) -> u64 {
        (next & ADDR_MASK) | Self::PRESENT | Self::WRITE | Self::USER
    }
    fn leaf(hpa: u64, perms: Perms, size: PageSize) -> u64 {
        let mut e = (hpa & ADDR_MASK) | Self::PRESENT | Self::USER;
        if perms.write {
            e |= Self::WRITE;
        }
        if !perms.execute {
            // Needs EFER.NXE on the host; boot runs with it set under OVMF and the SVM
            // backend checks it before using non-executable mappings.
            e |= Self::NX;
        }
        if size == PageSize::Size2M {
            e |= Self::LARGE;
        }
        e
    }
    fn present(entry: u64) -> bool {
        entry & Self::PRESENT != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & Self::LARGE != 0
    }
    fn decode_leaf(entry: u64, size: PageSize) -> Leaf {
        Leaf {
            hpa: entry & ADDR_MASK,
            perms: Perms {
                read: entry & Self::PRESENT != 0,
                write: entry & Self::WRITE != 0,
                execute: entry & Self::NX == 0,
            },
            size,
        }
    }
}

/// A 4-level nested page-table hierarchy whose tables live in the frame pool.
#[derive(Debug)]
pub struct NestedTables<F: EntryFormat> {
    root: u64,
    _format: PhantomData<F>,
}

fn index(gpa: u64, level: u32) -> usize {
    // level 4 = PML4 (bits 47:39) ... level 1 = PT (bits 20:12)
    ((gpa >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

impl<F: EntryFormat> NestedTables<F> {
    /// An empty hierarchy (one zeroed root table).
    pub fn new(pool: &mut FramePool) -> Result<Self, MmError> {
        Ok(Self { root: pool.alloc_zeroed()?, _format: PhantomData })
    }

    /// Physical address of the root (PML4) table, for the EPTP / nCR3.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Walk from the root down to the table at `level` for `gpa`, creating missing
    /// tables. Fails if a large leaf sits in the way.
    fn table_for(&mut self, pool: &mut FramePool, gpa: u64, level: u32) -> Result<u64, MmError> {
        let mut table = self.root;
        for l in ((level + 1)..=4).rev() {
            let i = index(gpa, l);
            let entry = pool.table_mut(table)?[i];
            table = if !F::present(entry) {
                let next = pool.alloc_zeroed()?;
                pool.table_mut(table)?[i] = F::table(next);
                next
            } else if l == 2 && F::is_large(entry) {
                return Err(MmError::LargePageConflict { gpa });
            } else {
                entry & ADDR_MASK
            };
        }
        Ok(table)
    }

    fn check(gpa: u64, hpa: u64, align: u64) -> Result<(), MmError> {
        if gpa >= 1 << 48 {
            return Err(MmError::OutOfRange { gpa });
        }
        for addr in [gpa, hpa] {
            if addr % align != 0 {
                return Err(MmError::Misaligned { addr, align });
            }
        }
        Ok(())
    }

    /// Map the 4 KiB guest page at `gpa` to host frame `hpa`.
    pub fn map_4k(&mut self, pool: &mut FramePool, gpa: u64, hpa: u64, perms: Perms) -> Result<(), MmError> {
        Self::check(gpa, hpa, PAGE_SIZE)?;
        let pt = self.table_for(pool, gpa, 1)?;
        let slot = &mut pool.table_mut(pt)?[index(gpa, 1)];
        if F::present(*slot) {
            return Err(MmError::AlreadyMapped { gpa });
        }
        *slot = F::leaf(hpa, perms, PageSize::Size4K);
        Ok(())
    }

    /// Map the 2 MiB guest region at `gpa` to host memory at `hpa`.
    pub fn map_2m(&mut self, pool: &mut FramePool, gpa: u64, hpa: u64, perms: Perms) -> Result<(), MmError> {
        Self::check(gpa, hpa, LARGE_PAGE_SIZE)?;
        let pd = self.table_for(pool, gpa, 2)?;
        let slot = &mut pool.table_mut(pd)?[index(gpa, 2)];
        if F::present(*slot) {
            return Err(if F::is_large(*slot) {
                MmError::AlreadyMapped { gpa }
            } else {
                MmError::LargePageConflict { gpa }
            });
        }
        *slot = F::leaf(hpa, perms, PageSize::Size2M);
        Ok(())
    }

    /// Translate a guest-physical address: the leaf that maps it and the host-physical
    /// address of the byte.
    pub fn translate(&self, pool: &mut FramePool, gpa: u64) -> Result<Option<(Leaf, u64)>, MmError> {
        if gpa >= 1 << 48 {
            return Ok(None);
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let entry = pool.table_mut(table)?[index(gpa, level)];
            if !F::present(entry) {
                return Ok(None);
            }
            if level == 2 && F::is_large(entry) {
                let leaf = F::decode_leaf(entry, PageSize::Size2M);
                return Ok(Some((leaf, leaf.hpa + (gpa & (LARGE_PAGE_SIZE - 1)))));
            }
            if level == 1 {
                let leaf = F::decode_leaf(entry, PageSize::Size4K);
                return Ok(Some((leaf, leaf.hpa + (gpa & (PAGE_SIZE - 1)))));
            }
            table = entry & ADDR_MASK;
        }
        Ok(None)
    }

    /// The page table (level 1) holding the 4 KiB leaves of `gpa`'s 2 MiB region. Fails
    /// if the region is not mapped, or mapped by a 2 MiB leaf.
    fn leaf_table(&self, pool: &mut FramePool, gpa: u64) -> Result<u64, MmError> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let entry = pool.table_mut(table)?[index(gpa, level)];
            if !F::present(entry) {
                return Err(MmError::OutOfRange { gpa });
            }
            if level == 2 && F::is_large(entry) {
                return Err(MmError::LargePageConflict { gpa });
            }
            table = entry & ADDR_MASK;
        }
        Ok(table)
    }

    /// Change the 4 KiB leaf of each page frame number of `pfns` (ascending, or at least
    /// grouped by 2 MiB region) with `f(pfn, old)`, walking down to each region's page
    /// table once rather than once per page: re-arming a round's reported pages costs a
    /// table lookup per page. Fails as `update_leaf_4k` does, at the first such page.
    pub fn update_leaves_4k(
        &self,
        pool: &mut FramePool,
        pfns: impl IntoIterator<Item = u64>,
        mut f: impl FnMut(u64, u64) -> u64,
    ) -> Result<(), MmError> {
        let mut region = u64::MAX;
        let mut table: &mut [u64] = &mut [];
        for pfn in pfns {
            let gpa = pfn * PAGE_SIZE;
            if gpa / LARGE_PAGE_SIZE != region {
                region = gpa / LARGE_PAGE_SIZE;
                let pt = self.leaf_table(pool, gpa)?;
                table = &mut pool.table_mut(pt)?[..];
            }
            let slot = table.get_mut(index(gpa, 1)).ok_or(MmError::OutOfRange { gpa })?;
            if !F::present(*slot) {
                return Err(MmError::OutOfRange { gpa });
            }
            *slot = f(pfn, *slot);
        }
        Ok(())
    }

    /// Change the 4 KiB leaf mapping `gpa` with `f`; returns the old entry. Fails if the
    /// page is not mapped with a 4 KiB leaf.
    pub fn update_leaf_4k(&self, pool: &mut FramePool, gpa: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, MmError> {
        let table = self.leaf_table(pool, gpa)?;
        let slot = &mut pool.table_mut(table)?[index(gpa, 1)];
        if !F::present(*slot) {
            return Err(MmError::OutOfRange { gpa });
        }
        let old = *slot;
        *slot = f(old);
        Ok(old)
    }

    /// Replace the 2 MiB leaf at `gpa` by a page table of 512 4 KiB leaves with the same
    /// host memory and permissions. Returns false if `gpa` is not a 2 MiB leaf.
    pub fn split_2m(&mut self, pool: &mut FramePool, gpa: u64) -> Result<bool, MmError> {
        let pd = self.table_for(pool, gpa, 2);
        let pd = match pd {
            Ok(pd) => pd,
            Err(MmError::LargePageConflict { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let entry = pool.table_mut(pd)?[index(gpa, 2)];
        if !F::present(entry) || !F::is_large(entry) {
            return Ok(false);
        }
        let leaf = F::decode_leaf(entry, PageSize::Size2M);
        let pt = pool.alloc_zeroed()?;
        let table = pool.table_mut(pt)?;
        for (i, e) in table.iter_mut().enumerate() {
            *e = F::leaf(leaf.hpa + i as u64 * PAGE_SIZE, leaf.perms, PageSize::Size4K);
        }
        pool.table_mut(pd)?[index(gpa, 2)] = F::table(pt);
        Ok(true)
    }

    /// Undo [`NestedTables::split_2m`]: if the 512 4 KiB leaves under `gpa` map one
    /// contiguous, 2 MiB-aligned host range with equal permissions, put a 2 MiB leaf back
    /// and free the page table. Returns whether it merged.
    pub fn merge_2m(&mut self, pool: &mut FramePool, gpa: u64) -> Result<bool, MmError> {
        let pd = match self.table_for(pool, gpa, 2) {
            Ok(pd) => pd,
            Err(MmError::LargePageConflict { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let entry = pool.table_mut(pd)?[index(gpa, 2)];
        if !F::present(entry) || F::is_large(entry) {
            return Ok(false);
        }
        let pt = entry & ADDR_MASK;
        let table = *pool.table_mut(pt)?;
        let first = F::decode_leaf(table[0], PageSize::Size4K);
        if !F::present(table[0]) || first.hpa % LARGE_PAGE_SIZE != 0 {
            return Ok(false);
        }
        for (i, e) in table.iter().enumerate() {
            let l = F::decode_leaf(*e, PageSize::Size4K);
            if !F::present(*e) || l.hpa != first.hpa + i as u64 * PAGE_SIZE || l.perms != first.perms {
                return Ok(false);
            }
        }
        pool.table_mut(pd)?[index(gpa, 2)] = F::leaf(first.hpa, first.perms, PageSize::Size2M);
        pool.free(pt)?;
        Ok(true)
    }

    /// Free every table frame (not the mapped guest memory, which its owner frees).
    pub fn destroy(self, pool: &mut FramePool) -> Result<(), MmError> {
        fn free_level<F: EntryFormat>(pool: &mut FramePool, table: u64, level: u32) -> Result<(), MmError> {
            if level > 1 {
                for i in 0..512 {
                    let e = pool.table_mut(table)?[i];
                    if F::present(e) && !(level == 2 && F::is_large(e)) {
                        free_level::<F>(pool, e & ADDR_MASK, level - 1)?;
                    }
                }
            }
            pool.free(table)
        }
        free_level::<F>(pool, self.root, 4)
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::testing::pool;
    use super::*;

    fn round_trip<F: EntryFormat>() {
        let mut p = pool(64);
        let mut t = NestedTables::<F>::new(&mut p).unwrap();
        let frame = p.alloc_zeroed().unwrap();
        t.map_4k(&mut p, 0x7fff_f000, frame, Perms::RW).unwrap();
        let (leaf, hpa) = t.translate(&mut p, 0x7fff_f123).unwrap().unwrap();
        assert_eq!(hpa, frame + 0x123);
        assert_eq!(leaf.size, PageSize::Size4K);
        assert!(leaf.perms.read && leaf.perms.write && !leaf.perms.execute, "{} perms {:?}", F::NAME, leaf.perms);
        assert_eq!(t.translate(&mut p, 0x7fff_e000).unwrap(), None);
        assert_eq!(t.map_4k(&mut p, 0x7fff_f000, frame, Perms::RW), Err(MmError::AlreadyMapped { gpa: 0x7fff_f000 }));
        assert_eq!(
            t.map_4k(&mut p, 0x1001, frame, Perms::RW),
            Err(MmError::Misaligned { addr: 0x1001, align: PAGE_SIZE })
        );
        assert_eq!(t.map_4k(&mut p, 1 << 48, frame, Perms::RW), Err(MmError::OutOfRange { gpa: 1 << 48 }));

        // 2 MiB leaf: translation, and conflicts in both directions.
        t.map_2m(&mut p, 0x4000_0000, 0x8000_0000, Perms::RWX).unwrap();
        let (leaf, hpa) = t.translate(&mut p, 0x4012_3456).unwrap().unwrap();
        assert_eq!((leaf.size, hpa), (PageSize::Size2M, 0x8012_3456));
        assert!(leaf.perms.execute);
        assert_eq!(
            t.map_4k(&mut p, 0x4000_1000, frame, Perms::RW),
            Err(MmError::LargePageConflict { gpa: 0x4000_1000 })
        );
        assert_eq!(
            t.map_2m(&mut p, 0x7fe0_0000, 0x8000_0000, Perms::RW),
            Err(MmError::LargePageConflict { gpa: 0x7fe0_0000 })
        );
        assert_eq!(
            t.map_2m(&mut p, 0x4000_0000, 0x8000_0000, Perms::RW),
            Err(MmError::AlreadyMapped { gpa: 0x4000_0000 })
        );

        // Both mappings lie in the second GiB, so they share one PDPT and one PD: the
        // tables are root, PDPT, PD and one PT, and destroy frees exactly those.
        let before = p.free_frames();
        t.destroy(&mut p).unwrap();
        assert_eq!(p.free_frames(), before + 4);
    }

    #[test]
    fn ept_maps_translates_and_frees() {
        round_trip::<Ept>();
    }

    #[test]
    fn npt_maps_translates_and_frees() {
        round_trip::<Npt>();
    }

    #[test]
    fn split_and_merge_keep_the_mapping_and_return_the_table() {
        let mut p = pool(1100);
        let mut t = NestedTables::<Npt>::new(&mut p).unwrap();
        let host = p.alloc_aligned_zeroed(512, LARGE_PAGE_SIZE).unwrap();
        t.map_2m(&mut p, 0x20_0000, host, Perms::RWX).unwrap();
        let free = p.free_frames();
        assert!(t.split_2m(&mut p, 0x20_0000).unwrap());
        assert_eq!(p.free_frames(), free - 1, "one page table");
        let (leaf, hpa) = t.translate(&mut p, 0x20_3456).unwrap().unwrap();
        assert_eq!((leaf.size, hpa), (PageSize::Size4K, host + 0x3456));
        // A 4 KiB leaf changed (write-protected) blocks the merge; restored, it merges.
        t.update_leaf_4k(&mut p, 0x20_5000, |e| e & !Npt::WRITE_BIT).unwrap();
        assert!(!t.merge_2m(&mut p, 0x20_0000).unwrap());
        t.update_leaf_4k(&mut p, 0x20_5000, |e| e | Npt::WRITE_BIT).unwrap();
        assert!(t.merge_2m(&mut p, 0x20_0000).unwrap());
        assert_eq!(p.free_frames(), free);
        let (leaf, hpa) = t.translate(&mut p, 0x20_3456).unwrap().unwrap();
        assert_eq!((leaf.size, hpa), (PageSize::Size2M, host + 0x3456));
        assert!(!t.split_2m(&mut p, 0x60_0000).unwrap(), "nothing mapped there");
    }

    #[test]
    fn leaf_updates_reach_the_mapping() {
        let mut p = pool(16);
        let mut t = NestedTables::<Ept>::new(&mut p).unwrap();
        let frame = p.alloc_zeroed().unwrap();
        t.map_4k(&mut p, 0x5000, frame, Perms::RWX).unwrap();
        let old = t.update_leaf_4k(&mut p, 0x5000, |e| (e & !Ept::WRITE_BIT) | Ept::DIRTY).unwrap();
        assert_ne!(old & Ept::WRITE_BIT, 0);
        let (leaf, _) = t.translate(&mut p, 0x5000).unwrap().unwrap();
        assert!(!leaf.perms.write && leaf.perms.read);
        assert_eq!(t.update_leaf_4k(&mut p, 0x6000, |e| e), Err(MmError::OutOfRange { gpa: 0x6000 }));
    }

    #[test]
    fn entry_encodings_match_the_manuals() {
        // EPT 4K leaf, RW, WB: bits 0,1 and memory type 6 in bits 5:3.
        assert_eq!(Ept::leaf(0x1234_5000, Perms::RW, PageSize::Size4K), 0x1234_5000 | 0b011 | (6 << 3));
        assert_eq!(Ept::leaf(0x20_0000, Perms::RWX, PageSize::Size2M), 0x20_0000 | 0b111 | (6 << 3) | (1 << 7));
        assert_eq!(Ept::table(0x5000), 0x5007);
        // NPT: P, U/S always; NX for non-executable; PS for 2M.
        assert_eq!(Npt::leaf(0x1234_5000, Perms::RW, PageSize::Size4K), 0x8000_0000_1234_5007);
        assert_eq!(Npt::leaf(0x20_0000, Perms::RWX, PageSize::Size2M), 0x20_0000 | 0x87);
        assert_eq!(Npt::leaf(0x3000, Perms::RO, PageSize::Size4K), 0x8000_0000_0000_3005);
        assert_eq!(Npt::table(0x5000), 0x5007);
    }
}
