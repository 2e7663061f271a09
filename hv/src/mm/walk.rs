//! The guest's own page tables, walked in software: linear address to guest-physical
//! address, the way the processor does it (SDM Vol. 3A chapter 4, "Paging"), for the
//! exits that must find what an instruction touched (MMIO emulation fetches the
//! faulting instruction and checks its memory operand).
//!
//! Pure logic over [`GuestPhys`], which reads guest-physical memory (guest RAM through
//! the frame pool in the hypervisor, a byte vector in tests): no hardware, no
//! allocation, no panic whatever the tables hold (a fuzz-style host test walks random
//! tables). Modes (SDM Vol. 3A 4.1.1, Table 4-1): paging off, 32-bit paging (4 KiB
//! and, with CR4.PSE, 4 MiB pages), PAE paging (4 KiB, 2 MiB) and 4-level paging
//! (4 KiB, 2 MiB, 1 GiB). 5-level paging (CR4.LA57) is refused.
//!
//! Not done here, on purpose: permission checks (the walk returns the accumulated
//! R/W, U/S and XD rights; the processor already allowed the access that exited),
//! setting accessed/dirty flags (the processor set them for the access that exited),
//! protection keys, and PAE's PDPTE registers (the PDPTEs are read from memory at
//! CR3, which differs from the processor only if the guest changed them without
//! reloading CR3; SDM Vol. 3A 4.4.1).

/// Reads guest-physical memory.
pub trait GuestPhys {
    /// Fill `out` from guest-physical `gpa`; `false` if any of it is not guest RAM.
    fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool;
}

/// A byte slice as guest RAM from GPA 0 (host tests and fuzz targets): what lies past
/// its end is not RAM.
impl GuestPhys for [u8] {
    fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(gpa) else { return false };
        match start.checked_add(out.len()).and_then(|end| self.get(start..end)) {
            Some(s) => {
                out.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
}

/// The registers that select and root the guest's paging (SDM Vol. 3A 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingRegs {
    /// CR0 (PG, bit 31).
    pub cr0: u64,
    /// CR3 (the root table's address).
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12).
    pub cr4: u64,
    /// IA32_EFER (NXE bit 11, LMA bit 10).
    pub efer: u64,
    /// The guest's physical-address width (CPUID.80000008H:EAX[7:0]): bits from here
    /// up to 51 are reserved in paging entries (SDM Vol. 3A 4.1.4).
    pub maxphyaddr: u8,
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// A paging mode (SDM Vol. 3A 4.1.1, Table 4-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// CR0.PG = 0: linear addresses are physical.
    Off,
    /// 32-bit paging (SDM Vol. 3A 4.3).
    Bits32,
    /// PAE paging (SDM Vol. 3A 4.4).
    Pae,
    /// 4-level paging (SDM Vol. 3A 4.5).
    Level4,
}

impl PagingRegs {
    /// The mode these registers select; 5-level paging is refused.
    pub fn mode(&self) -> Result<Mode, WalkError> {
        Ok(match (self.cr0 & CR0_PG != 0, self.cr4 & CR4_PAE != 0, self.efer & EFER_LMA != 0) {
            (false, _, _) => Mode::Off,
            (true, false, _) => Mode::Bits32,
            (true, true, false) => Mode::Pae,
            (true, true, true) if self.cr4 & CR4_LA57 != 0 => {
                return Err(WalkError::Unsupported { what: "5-level paging (CR4.LA57)" });
            }
            (true, true, true) => Mode::Level4,
        })
    }

    /// Bits 51:MAXPHYADDR, reserved in every PAE and 4-level entry (SDM Vol. 3A 4.4.2, 4.5.4).
    fn reserved_phys(&self) -> u64 {
        let m = u32::from(self.maxphyaddr.clamp(32, 52));
        ((1u64 << 52) - 1) & !((1u64 << m) - 1)
    }

    /// The address bits of an entry: 51:12 under MAXPHYADDR.
    fn phys_mask(&self) -> u64 {
        let m = u32::from(self.maxphyaddr.clamp(32, 52));
        ((1u64 << m) - 1) & !0xfff
    }

    fn nxe(&self) -> bool {
        self.efer & EFER_NXE != 0
    }
}

/// A translated linear address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The size of the page that maps it (4 KiB, 2 MiB, 4 MiB or 1 GiB; with paging
    /// off, 4 KiB).
    pub page_size: u64,
    /// Every level allows writes (R/W = 1).
    pub writable: bool,
    /// Every level allows user-mode access (U/S = 1).
    pub user: bool,
    /// No level forbids instruction fetches (XD = 0, or EFER.NXE = 0).
    pub executable: bool,
}

/// Why a page-fault-style walk stopped (SDM Vol. 3A 4.7: the P and RSVD causes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The entry's P flag is 0.
    NotPresent,
    /// The entry sets a reserved bit.
    Reserved,
}

/// Why a linear address does not translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The walk would raise #PF: an entry at `level` (4 = PML4, 3 = PDPT, 2 = PD,
    /// 1 = PT) is not present or sets a reserved bit.
    PageFault {
        /// The linear address.
        linear: u64,
        /// The level of the entry.
        level: u8,
        /// Why.
        kind: FaultKind,
        /// The entry.
        entry: u64,
    },
    /// A paging structure lies outside guest RAM (the processor would read MMIO there).
    TableOutsideMemory {
        /// The level of the table.
        level: u8,
        /// The entry's guest-physical address.
        gpa: u64,
    },
    /// The translated address is not guest RAM (only for reads of the bytes there).
    DataOutsideMemory {
        /// The linear address.
        linear: u64,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// The linear address is not canonical in 4-level paging (#GP, SDM Vol. 3A 4.5.1).
    NonCanonical {
        /// The linear address.
        linear: u64,
    },
    /// A paging mode the walk does not implement.
    Unsupported {
        /// Which.
        what: &'static str,
    },
}

fn level_name(level: u8) -> &'static str {
    match level {
        4 => "PML4",
        3 => "PDPT",
        2 => "page-directory",
        _ => "page-table",
    }
}

impl core::fmt::Display for WalkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::PageFault { linear, level, kind, entry } => write!(
                f,
                "linear {linear:#x} faults: its {} entry {entry:#x} {}",
                level_name(*level),
                match kind {
                    FaultKind::NotPresent => "is not present",
                    FaultKind::Reserved => "sets reserved bits",
                }
            ),
            Self::TableOutsideMemory { level, gpa } => {
                write!(f, "the {} entry at guest-physical {gpa:#x} is outside guest memory", level_name(*level))
            }
            Self::DataOutsideMemory { linear, gpa } => {
                write!(f, "linear {linear:#x} maps guest-physical {gpa:#x}, which is outside guest memory")
            }
            Self::NonCanonical { linear } => write!(f, "linear {linear:#x} is not canonical"),
            Self::Unsupported { what } => write!(f, "{what} is not supported"),
        }
    }
}

/// Rights accumulated over the levels.
#[derive(Clone, Copy)]
struct Rights {
    writable: bool,
    user: bool,
    executable: bool,
}

impl Rights {
    fn and(self, entry: u64, nxe: bool) -> Self {
        Self {
            writable: self.writable && entry & RW != 0,
            user: self.user && entry & US != 0,
            executable: self.executable && !(nxe && entry & XD != 0),
        }
    }

    fn done(self, gpa: u64, page_size: u64) -> Translation {
        Translation { gpa, page_size, writable: self.writable, user: self.user, executable: self.executable }
    }
}

const ALL: Rights = Rights { writable: true, user: true, executable: true };

fn read_entry<M: GuestPhys + ?Sized>(mem: &mut M, gpa: u64, wide: bool, level: u8) -> Result<u64, WalkError> {
    let mut b = [0u8; 8];
    let n = if wide { 8 } else { 4 };
    if !mem.read(gpa, &mut b[..n]) {
        return Err(WalkError::TableOutsideMemory { level, gpa });
    }
    Ok(u64::from_le_bytes(b))
}

/// Translate `linear` through the guest's tables as `regs` select them.
pub fn translate<M: GuestPhys + ?Sized>(mem: &mut M, regs: &PagingRegs, linear: u64) -> Result<Translation, WalkError> {
    match regs.mode()? {
        Mode::Off => Ok(ALL.done(linear, 4096)),
        Mode::Bits32 => walk_32(mem, regs, linear & 0xffff_ffff),
        Mode::Pae => walk_pae(mem, regs, linear & 0xffff_ffff),
        Mode::Level4 => walk_4level(mem, regs, linear),
    }
}

/// SDM Vol. 3A 4.3: a page directory of 1024 4-byte entries at CR3[31:12], then a page
/// table, or (PS = 1 with CR4.PSE) a 4 MiB page whose address bits 39:32 sit in PDE
/// bits 20:13 (PSE-36, as wide as MAXPHYADDR allows; bit 21 and the bits above the
/// width are reserved, Table 4-4). 4 KiB PDEs and PTEs have no reserved bits.
fn walk_32<M: GuestPhys + ?Sized>(mem: &mut M, regs: &PagingRegs, linear: u64) -> Result<Translation, WalkError> {
    let fault = |level, kind, entry| WalkError::PageFault { linear, level, kind, entry };
    let pde_at = (regs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4;
    let pde = read_entry(mem, pde_at, false, 2)?;
    if pde & P == 0 {
        return Err(fault(2, FaultKind::NotPresent, pde));
    }
    let rights = ALL.and(pde, false);
    if pde & PS != 0 && regs.cr4 & CR4_PSE != 0 {
        // PA bits 39:32 in 20:13, of which those at or above MAXPHYADDR are reserved.
        let high_bits = u32::from(regs.maxphyaddr.clamp(32, 40)) - 32;
        let reserved = (1u64 << 21) | (0xff_u64 << 13 & !(((1u64 << high_bits) - 1) << 13));
        if pde & reserved != 0 {
            return Err(fault(2, FaultKind::Reserved, pde));
        }
        let base = (((pde >> 13) & 0xff) << 32) | (pde & 0xffc0_0000);
        return Ok(rights.done(base | (linear & 0x3f_ffff), 4 << 20));
    }
    let pte_at = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
    let pte = read_entry(mem, pte_at, false, 1)?;
    if pte & P == 0 {
        return Err(fault(1, FaultKind::NotPresent, pte));
    }
    Ok(rights.and(pte, false).done((pte & 0xffff_f000) | (linear & 0xfff), 4096))
}

/// SDM Vol. 3A 4.4: four PDPTEs at CR3[31:5] (bits 2:1, 8:5 and 63:MAXPHYADDR
/// reserved, Table 4-8), then 8-byte PDEs (PS = 1: a 2 MiB page, bits 20:13 reserved)
/// and PTEs; XD (bit 63) is reserved unless EFER.NXE.
fn walk_pae<M: GuestPhys + ?Sized>(mem: &mut M, regs: &PagingRegs, linear: u64) -> Result<Translation, WalkError> {
    let fault = |level, kind, entry| WalkError::PageFault { linear, level, kind, entry };
    let nxe = regs.nxe();
    let xd_reserved = if nxe { 0 } else { XD };
    let pdpte_at = (regs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8;
    let pdpte = read_entry(mem, pdpte_at, true, 3)?;
    if pdpte & P == 0 {
        return Err(fault(3, FaultKind::NotPresent, pdpte));
    }
    if pdpte & (regs.reserved_phys() | XD | (0xf << 5) | (3 << 1)) != 0 {
        return Err(fault(3, FaultKind::Reserved, pdpte));
    }
    let mask = regs.phys_mask();
    let reserved = regs.reserved_phys() | xd_reserved;
    let pde_at = (pdpte & mask) + ((linear >> 21) & 0x1ff) * 8;
    let pde = read_entry(mem, pde_at, true, 2)?;
    if pde & P == 0 {
        return Err(fault(2, FaultKind::NotPresent, pde));
    }
    let large = pde & PS != 0;
    if pde & (reserved | if large { 0xff << 13 } else { 0 }) != 0 {
        return Err(fault(2, FaultKind::Reserved, pde));
    }
    let rights = ALL.and(pde, nxe);
    if large {
        return Ok(rights.done((pde & mask & !0x1f_ffff) | (linear & 0x1f_ffff), 2 << 20));
    }
    let pte_at = (pde & mask) + ((linear >> 12) & 0x1ff) * 8;
    let pte = read_entry(mem, pte_at, true, 1)?;
    if pte & P == 0 {
        return Err(fault(1, FaultKind::NotPresent, pte));
    }
    if pte & reserved != 0 {
        return Err(fault(1, FaultKind::Reserved, pte));
    }
    Ok(rights.and(pte, nxe).done((pte & mask) | (linear & 0xfff), 4096))
}

/// SDM Vol. 3A 4.5.4: PML4 at CR3[51:12] (bits 11:0 are flags or the PCID), then PDPT
/// (PS = 1: a 1 GiB page, bits 29:13 reserved), PD (PS = 1: 2 MiB, bits 20:13
/// reserved) and PT, with 8-byte entries; bits 51:MAXPHYADDR are reserved everywhere,
/// PS is reserved in a PML4E, XD unless EFER.NXE (Table 4-14 to 4-20). Linear
/// addresses must be canonical (bits 63:47 equal, 4.5.1).
fn walk_4level<M: GuestPhys + ?Sized>(mem: &mut M, regs: &PagingRegs, linear: u64) -> Result<Translation, WalkError> {
    let top = linear >> 47;
    if top != 0 && top != 0x1_ffff {
        return Err(WalkError::NonCanonical { linear });
    }
    let nxe = regs.nxe();
    let mask = regs.phys_mask();
    let reserved = regs.reserved_phys() | if nxe { 0 } else { XD };
    let mut table = regs.cr3 & mask;
    let mut rights = ALL;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let at = table + ((linear >> shift) & 0x1ff) * 8;
        let entry = read_entry(mem, at, true, level)?;
        if entry & P == 0 {
            return Err(WalkError::PageFault { linear, level, kind: FaultKind::NotPresent, entry });
        }
        let large = level != 1 && entry & PS != 0;
        let extra = match (level, large) {
            (4, true) => PS,
            (3, true) => 0x1_ffff << 13,
            (2, true) => 0xff << 13,
            _ => 0,
        };
        if entry & (reserved | extra) != 0 {
            return Err(WalkError::PageFault { linear, level, kind: FaultKind::Reserved, entry });
        }
        rights = rights.and(entry, nxe);
        if large || level == 1 {
            let size = 1u64 << shift;
            return Ok(rights.done((entry & mask & !(size - 1)) | (linear & (size - 1)), size));
        }
        table = entry & mask;
    }
    // The loop returns at level 1 at the latest.
    Err(WalkError::Unsupported { what: "a walk deeper than four levels" })
}

/// Read `out.len()` bytes at linear address `linear`, page by page (the bytes may
/// cross into a page mapped elsewhere, or not at all). On failure, how many bytes
/// were read before it and why the next could not be.
pub fn read_linear<M: GuestPhys + ?Sized>(
    mem: &mut M,
    regs: &PagingRegs,
    linear: u64,
    out: &mut [u8],
) -> Result<(), (usize, WalkError)> {
    let mut done = 0usize;
    while done < out.len() {
        let at = linear.wrapping_add(done as u64);
        let t = translate(mem, regs, at).map_err(|e| (done, e))?;
        let in_page = (4096 - (at & 0xfff)) as usize;
        let n = in_page.min(out.len() - done);
        let chunk = &mut out[done..done + n];
        if !mem.read(t.gpa, chunk) {
            return Err((done, WalkError::DataOutsideMemory { linear: at, gpa: t.gpa }));
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Guest RAM of `len` bytes from GPA 0.
    struct Ram(Vec<u8>);

    impl GuestPhys for Ram {
        fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
            self.0.as_mut_slice().read(gpa, out)
        }
    }

    impl Ram {
        fn new(len: usize) -> Self {
            Self(alloc::vec![0; len])
        }
        fn put64(&mut self, gpa: u64, v: u64) {
            self.0[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn put32(&mut self, gpa: u64, v: u32) {
            self.0[gpa as usize..gpa as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    const LONG: PagingRegs = PagingRegs {
        cr0: 0x8000_0011,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LMA | EFER_NXE | (1 << 8),
        maxphyaddr: 40,
    };

    /// 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
    fn long_tables() -> Ram {
        let mut m = Ram::new(0x40_0000);
        m.put64(0x1000, 0x2000 | 7); // PML4[0]
        m.put64(0x1000 + 511 * 8, 0x2000 | 3); // PML4[511]: the top half, supervisor
        m.put64(0x2000, 0x3000 | 7); // PDPT[0] -> PD
        m.put64(0x2000 + 8, 0x4000_0000 | PS | 3); // PDPT[1]: 1 GiB page at 1 GiB
        m.put64(0x2000 + 511 * 8, 0xc000_0000 | PS | 3 | XD); // PDPT[511]: 1 GiB at 3 GiB
        m.put64(0x3000, 0x4000 | 7); // PD[0] -> PT
        m.put64(0x3000 + 8, 0x20_0000 | PS | 7); // PD[1]: 2 MiB at 2 MiB
        m.put64(0x4000 + 5 * 8, 0x5000 | 7); // PT[5]: 0x5000 -> 0x5000
        m.put64(0x4000 + 6 * 8, 0x9000 | 5); // PT[6]: 0x6000 -> 0x9000, read-only
        m
    }

    #[test]
    fn four_level_4k_2m_1g_and_rights() {
        let mut m = long_tables();
        let t = translate(&mut m, &LONG, 0x5123).unwrap();
        assert_eq!((t.gpa, t.page_size, t.writable, t.user, t.executable), (0x5123, 4096, true, true, true));
        let t = translate(&mut m, &LONG, 0x6ff8).unwrap();
        assert_eq!((t.gpa, t.writable), (0x9ff8, false));
        let t = translate(&mut m, &LONG, 0x2f_fff0).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x2f_fff0, 2 << 20));
        let t = translate(&mut m, &LONG, 0x7654_3210).unwrap();
        assert_eq!((t.gpa, t.page_size, t.user), (0x7654_3210, 1 << 30, false));
        // The top of the address space: PML4[511] -> PDPT[511], a 1 GiB XD page.
        let t = translate(&mut m, &LONG, 0xffff_ffff_fee0_0030).unwrap();
        assert_eq!((t.gpa, t.page_size, t.executable), (0xfee0_0030, 1 << 30, false));
    }

    #[test]
    fn four_level_faults_name_the_level_and_cause() {
        let mut m = long_tables();
        let e = translate(&mut m, &LONG, 0x7000).unwrap_err();
        assert_eq!(e, WalkError::PageFault { linear: 0x7000, level: 1, kind: FaultKind::NotPresent, entry: 0 });
        let e = translate(&mut m, &LONG, 0x80_0000_0000).unwrap_err();
        assert!(matches!(e, WalkError::PageFault { level: 4, kind: FaultKind::NotPresent, .. }), "{e}");
        assert_eq!(
            translate(&mut m, &LONG, 0x0000_8000_0000_0000),
            Err(WalkError::NonCanonical { linear: 0x0000_8000_0000_0000 })
        );
        // A PTE with an address bit above MAXPHYADDR (40).
        m.put64(0x4000 + 7 * 8, (1 << 45) | 0x7000 | 3);
        let e = translate(&mut m, &LONG, 0x7000).unwrap_err();
        assert!(matches!(e, WalkError::PageFault { level: 1, kind: FaultKind::Reserved, .. }), "{e}");
        // PS in a PML4E is reserved; bits 20:13 of a 2 MiB PDE are.
        m.put64(0x1000 + 8, 0x2000 | PS | 3);
        let e = translate(&mut m, &LONG, 0x80_0000_0000).unwrap_err();
        assert!(matches!(e, WalkError::PageFault { level: 4, kind: FaultKind::Reserved, .. }), "{e}");
        m.put64(0x3000 + 16, 0x40_0000 | (1 << 13) | PS | 3);
        let e = translate(&mut m, &LONG, 0x40_0000).unwrap_err();
        assert!(matches!(e, WalkError::PageFault { level: 2, kind: FaultKind::Reserved, .. }), "{e}");
        // XD is reserved without EFER.NXE.
        let no_nxe = PagingRegs { efer: EFER_LMA, ..LONG };
        let e = translate(&mut m, &no_nxe, 0xffff_ffff_fee0_0000).unwrap_err();
        assert!(matches!(e, WalkError::PageFault { level: 3, kind: FaultKind::Reserved, .. }), "{e}");
        // A table outside memory.
        m.put64(0x3000 + 24, 0x1_0000_0000 | 3);
        assert_eq!(
            translate(&mut m, &LONG, 0x60_0000),
            Err(WalkError::TableOutsideMemory { level: 1, gpa: 0x1_0000_0000 })
        );
        let la57 = PagingRegs { cr4: CR4_PAE | CR4_LA57, ..LONG };
        assert!(matches!(translate(&mut m, &la57, 0), Err(WalkError::Unsupported { .. })));
    }

    #[test]
    fn paging_off_is_the_identity() {
        let mut m = Ram::new(0x1000);
        let off = PagingRegs { cr0: 0x11, ..Default::default() };
        assert_eq!(translate(&mut m, &off, 0xfee0_0020).unwrap().gpa, 0xfee0_0020);
    }

    #[test]
    fn thirty_two_bit_paging_4k_and_4m_pages() {
        let mut m = Ram::new(0x40_0000);
        let regs = PagingRegs { cr0: 0x8000_0011, cr3: 0x1000, cr4: CR4_PSE, efer: 0, maxphyaddr: 36 };
        m.put32(0x1000, 0x2000 | 7); // PDE[0] -> PT at 0x2000
        m.put32(0x2000 + 3 * 4, 0x8000 | 3); // PTE[3]: 0x3000 -> 0x8000
        m.put32(0x1000 + 0x3fb * 4, 0xfec0_0000 | PS as u32 | 3); // PDE[0x3FB]: 4 MiB at 0xFEC00000
        m.put32(0x1000 + 4, 0x0040_0000 | (0x5 << 13) | PS as u32 | 3); // 4 MiB at 0x5_0040_0000 (PSE-36)
        assert_eq!(translate(&mut m, &regs, 0x3abc).unwrap().gpa, 0x8abc);
        let t = translate(&mut m, &regs, 0xfee0_0030).unwrap();
        assert_eq!((t.gpa, t.page_size), (0xfee0_0030, 4 << 20));
        assert_eq!(translate(&mut m, &regs, 0x40_0010).unwrap().gpa, 0x5_0040_0010);
        // PA bit 36 (PDE bit 17) is above MAXPHYADDR 36: reserved; so is bit 21.
        m.put32(0x1000 + 8, 0x0080_0000 | (1 << 17) | PS as u32 | 3);
        assert!(matches!(
            translate(&mut m, &regs, 0x80_0000),
            Err(WalkError::PageFault { level: 2, kind: FaultKind::Reserved, .. })
        ));
        m.put32(0x1000 + 8, 0x0080_0000 | (1 << 21) | PS as u32 | 3);
        assert!(translate(&mut m, &regs, 0x80_0000).is_err());
        // Without CR4.PSE the PS bit is ignored: the PDE points to a page table.
        let no_pse = PagingRegs { cr4: 0, ..regs };
        m.put32(0x1000 + 12, 0x2000 | PS as u32 | 3);
        assert_eq!(translate(&mut m, &no_pse, 0xc0_3010).unwrap().gpa, 0x8010);
        assert!(matches!(
            translate(&mut m, &regs, 0x1000_0000),
            Err(WalkError::PageFault { level: 2, kind: FaultKind::NotPresent, .. })
        ));
        // The upper 32 bits of a linear address do not exist here.
        assert_eq!(translate(&mut m, &regs, 0xdead_0000_0000_3abc).unwrap().gpa, 0x8abc);
    }

    #[test]
    fn pae_paging_4k_and_2m_pages_and_pdpte_reserved_bits() {
        let mut m = Ram::new(0x40_0000);
        let regs = PagingRegs { cr0: 0x8000_0011, cr3: 0x1020, cr4: CR4_PAE, efer: EFER_NXE, maxphyaddr: 36 };
        m.put64(0x1020 + 3 * 8, 0x2000 | 1); // PDPTE[3] -> PD at 0x2000
        m.put64(0x2000 + 0x1f7 * 8, 0xfee0_0000 | PS | 3 | XD); // 2 MiB at 0xFEE00000
        m.put64(0x2000, 0x3000 | 3); // PD[0] -> PT
        m.put64(0x3000 + 8, 0xa000 | 3); // 0xC000_1000 -> 0xA000
        let t = translate(&mut m, &regs, 0xfee0_00b0).unwrap();
        assert_eq!((t.gpa, t.page_size, t.executable), (0xfee0_00b0, 2 << 20, false));
        assert_eq!(translate(&mut m, &regs, 0xc000_1004).unwrap().gpa, 0xa004);
        assert!(matches!(
            translate(&mut m, &regs, 0x1000),
            Err(WalkError::PageFault { level: 3, kind: FaultKind::NotPresent, .. })
        ));
        // PDPTE bit 1 (R/W) is reserved in PAE paging.
        m.put64(0x1020, 0x2000 | 3);
        assert!(matches!(
            translate(&mut m, &regs, 0x1000),
            Err(WalkError::PageFault { level: 3, kind: FaultKind::Reserved, .. })
        ));
        // XD without EFER.NXE is reserved.
        let no_nxe = PagingRegs { efer: 0, ..regs };
        assert!(matches!(
            translate(&mut m, &no_nxe, 0xfee0_0000),
            Err(WalkError::PageFault { level: 2, kind: FaultKind::Reserved, .. })
        ));
    }

    #[test]
    fn reads_cross_pages_and_stop_where_the_next_page_is_missing() {
        let mut m = long_tables();
        // Linear 0x5000 -> 0x5000, 0x6000 -> 0x9000: bytes across the boundary.
        m.0[0x5ffe] = 0xaa;
        m.0[0x5fff] = 0xbb;
        m.0[0x9000] = 0xcc;
        let mut b = [0u8; 3];
        read_linear(&mut m, &LONG, 0x5ffe, &mut b).unwrap();
        assert_eq!(b, [0xaa, 0xbb, 0xcc]);
        // 0x7000 is not mapped: two bytes come, then the fault at 0x7000.
        let mut b = [0u8; 15];
        let (done, e) = read_linear(&mut m, &LONG, 0x6ffe, &mut b).unwrap_err();
        assert_eq!(done, 2);
        assert!(matches!(e, WalkError::PageFault { linear: 0x7000, level: 1, .. }), "{e}");
        // A page mapped outside RAM.
        m.put64(0x4000 + 8 * 8, 0x1000_0000 | 3);
        let (done, e) = read_linear(&mut m, &LONG, 0x8000, &mut b).unwrap_err();
        assert_eq!((done, e), (0, WalkError::DataOutsideMemory { linear: 0x8000, gpa: 0x1000_0000 }));
    }

    /// xorshift64*: deterministic "random" tables.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_tables_never_panic_in_any_mode() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut m = Ram::new(64 * 1024);
        let mut translated = 0;
        for round in 0..400 {
            for b in m.0.chunks_exact_mut(8) {
                // Mostly small addresses with random flags, so walks go deep.
                let r = rng.next();
                let v = if round % 2 == 0 { (r & 0xf000) | (r >> 60) | 1 | (r & PS) } else { r };
                b.copy_from_slice(&v.to_le_bytes());
            }
            let r = rng.next();
            let regs = PagingRegs {
                cr0: if r & 1 != 0 { CR0_PG } else { 0 },
                cr3: rng.next() & 0xffff,
                cr4: rng.next() & (CR4_PSE | CR4_PAE | CR4_LA57),
                efer: rng.next() & (EFER_LMA | EFER_NXE),
                maxphyaddr: (rng.next() % 70) as u8,
            };
            for _ in 0..50 {
                let linear = rng.next();
                if translate(&mut m, &regs, linear).is_ok() {
                    translated += 1;
                }
                let mut out = [0u8; 15];
                let _ = read_linear(&mut m, &regs, linear, &mut out);
            }
        }
        assert!(translated > 0, "some random walks succeed, so the test reaches the leaves");
    }
}
