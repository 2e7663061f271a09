//! What a guest finds in memory at boot, as a PC firmware and boot loader would have
//! left it: ACPI tables ([`acpi`]), the e820 memory map ([`e820`]), the Linux x86 boot
//! protocol's zero page and load plan ([`linux`]) and the multiboot v1 information
//! structure ([`multiboot`]).
//!
//! Everything here is pure logic: builders write into a caller's byte buffer or into
//! guest memory through [`GuestWrite`], and parsers of guest-supplied images never
//! panic, whatever the bytes (each has a fuzz-style test). Nothing here touches
//! hardware, logs, or decides which devices exist: the addresses of the PM device, the
//! I/O APIC and the local APICs come in as configuration.
//!
//! # Guest-physical layout
//!
//! One fixed low-memory layout serves every boot protocol (Linux and multiboot use
//! different parts of it). Addresses below 1 MiB:
//!
//! ```text
//! 0x0000_0000 ..0x0000_1000  real-mode IVT and BDA (usable RAM; we write nothing there)
//! 0x0000_1000 ..0x0000_1020  GDT: 0x08 code32, 0x10 code64, 0x18 data (flat 4 GiB)  GDT_GPA
//! 0x0000_7000 ..0x0000_8000  Linux zero page (struct boot_params)                    ZERO_PAGE_GPA
//! 0x0000_8000 ..0x0000_9000  scratch stack (RSP at entry = 0x8ff0; neither protocol needs one)
//! 0x0000_9000 ..0x0000_a000  PML4                                                    PML4_GPA
//! 0x0000_a000 ..0x0000_b000  PDPT
//! 0x0000_b000 ..0x0000_f000  4 PDs: identity map of 0..4 GiB in 2 MiB pages
//! 0x0002_0000 ..0x0003_0000  kernel command line (NUL-terminated)                   CMDLINE_GPA
//! 0x0003_0000 ..0x0004_0000  multiboot info, its mmap, module list and strings       MULTIBOOT_INFO_GPA
//! 0x0009_fc00 ..0x000a_0000  EBDA (e820 reserved)
//! 0x000a_0000 ..0x000e_0000  VGA / option-ROM hole (not in the e820 map)
//! 0x000e_0000 ..0x000f_0000  ACPI tables, RSDP first (e820 ACPI reclaim)             ACPI_GPA
//! 0x000f_0000 ..0x0010_0000  BIOS area (e820 reserved)
//! 0x0010_0000 ..             kernel (Linux: pref_address or 1 MiB aligned up; multiboot: where it asks)
//!      ...      ..top of low RAM  initrd / module 1, page-aligned, as high as allowed
//! 0xc000_0000 ..0x1_0000_0000  MMIO hole: I/O APIC 0xfec0_0000, local APIC 0xfee0_0000
//! 0x1_0000_0000 ..           RAM beyond 3 GiB, if the domain has that much
//! ```
//!
//! The RSDP sits on a 16-byte boundary inside 0xE0000..0xFFFFF, so a guest that scans
//! the BIOS area for "RSD PTR " (ACPI 6.5 §5.2.5.1) finds it as well as one told its
//! address (Linux: `acpi_rsdp_addr`).

pub mod acpi;
pub mod e820;
pub mod linux;
pub mod multiboot;

use core::fmt;

use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::guest::GuestMemory;
use crate::mm::nested::EntryFormat;

/// The GDT both protocols start with (3 descriptors after the null one).
pub const GDT_GPA: u64 = 0x1000;
/// The Linux zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// RSP at entry: the top of a scratch page (neither protocol promises a stack).
pub const SCRATCH_STACK_TOP: u64 = 0x8ff0;
/// The PML4 of the identity map used for the Linux 64-bit entry.
pub const PML4_GPA: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Room for the command line, including its NUL.
pub const CMDLINE_BYTES: u64 = 0x1_0000;
/// The multiboot information structure and what it points to.
pub const MULTIBOOT_INFO_GPA: u64 = 0x3_0000;
/// Room for the multiboot information and everything it points to.
pub const MULTIBOOT_INFO_BYTES: u64 = 0x1_0000;
/// Start of the extended BIOS data area (end of conventional memory: 639 KiB).
pub const EBDA_GPA: u64 = 0x9_fc00;
/// Start of the VGA / option-ROM hole.
pub const VGA_HOLE_GPA: u64 = 0xa_0000;
/// Where the ACPI tables go.
pub const ACPI_GPA: u64 = 0xe_0000;
/// Room for the ACPI tables.
pub const ACPI_BYTES: u64 = 0x1_0000;
/// The BIOS area up to 1 MiB.
pub const BIOS_GPA: u64 = 0xf_0000;
/// 1 MiB: where extended memory starts.
pub const HIGH_MEMORY_GPA: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (I/O APIC, local APIC); RAM beyond it moves to 4 GiB.
pub const MMIO_HOLE_GPA: u64 = 0xc000_0000;
/// 4 GiB: end of the MMIO hole, where RAM above the hole continues.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The I/O APIC's MMIO base.
pub const IOAPIC_GPA: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_GPA: u32 = 0xfee0_0000;

/// GDT selectors (index × 8) in the GDT at [`GDT_GPA`].
pub mod selector {
    /// Flat 4 GiB 32-bit code (multiboot's CS).
    pub const CODE32: u16 = 0x08;
    /// 64-bit code (Linux `__BOOT_CS`).
    pub const CODE64: u16 = 0x10;
    /// Flat 4 GiB data (Linux `__BOOT_DS`; multiboot's DS/ES/SS).
    pub const DATA: u16 = 0x18;
}

/// The GDT at [`GDT_GPA`]: null, code32, code64, data (SDM Vol. 3A 3.4.5 descriptor
/// format: base 0, limit 0xfffff with G=1; code 0x9a = present, DPL 0, execute/read;
/// data 0x92 = present, read/write; flags 0xc = G|D/B, 0xa = G|L for 64-bit code).
pub const GDT: [u64; 4] = [0, 0x00cf_9a00_0000_ffff, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

/// The GDT as bytes.
pub fn gdt_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    for (chunk, d) in out.chunks_exact_mut(8).zip(GDT) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    out
}

/// Where guest memory is written by the boot writers. Implemented for the real guest
/// memory by [`PoolWriter`]; the host tests use a `Vec`.
pub trait GuestWrite {
    /// Why a write failed.
    type Error;
    /// Write `bytes` at guest-physical `gpa`.
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), Self::Error>;
}

/// [`GuestWrite`] over a domain's [`GuestMemory`] and the pool behind it.
#[derive(Debug)]
pub struct PoolWriter<'a, F: EntryFormat> {
    /// The frame pool the guest memory is backed by.
    pub pool: &'a mut FramePool,
    /// The guest memory.
    pub mem: &'a GuestMemory<F>,
}

impl<F: EntryFormat> GuestWrite for PoolWriter<'_, F> {
    type Error = MmError;
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MmError> {
        self.mem.write(self.pool, gpa, bytes)
    }
}

/// Why a boot writer stopped: the guest memory refused a write, or what it was
/// handed does not match the plan it was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError<E> {
    /// A guest-memory write failed.
    Guest(E),
    /// The bytes handed to the writer are not what was planned for.
    Mismatch {
        /// What (e.g. "initrd").
        what: &'static str,
        /// Bytes planned for.
        planned: u64,
        /// Bytes handed over.
        given: u64,
    },
}

impl<E: fmt::Display> fmt::Display for WriteError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Guest(e) => write!(f, "writing the boot data into guest memory failed: {e}"),
            WriteError::Mismatch { what, planned, given } => {
                write!(f, "the {what} is {given} bytes but {planned} were planned for")
            }
        }
    }
}

impl<E> From<E> for WriteError<E> {
    fn from(e: E) -> Self {
        WriteError::Guest(e)
    }
}

/// The processor mode a kernel is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 32-bit protected mode, paging off (multiboot §3.2).
    Protected32,
    /// 64-bit long mode with the identity map at CR3 (Linux boot.rst "64-bit Boot Protocol").
    Long64,
}

/// The vCPU state a kernel starts with. Registers not named here are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// Which mode (and so which CR0/CR4/EFER and code segment).
    pub mode: CpuMode,
    /// RIP.
    pub rip: u64,
    /// RSP (a scratch stack; neither protocol defines one).
    pub rsp: u64,
    /// RAX (multiboot: the boot loader magic).
    pub rax: u64,
    /// RBX (multiboot: the information structure).
    pub rbx: u64,
    /// RSI (Linux: the zero page).
    pub rsi: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3 (0 when paging is off).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// RFLAGS (interrupts off).
    pub rflags: u64,
    /// GDT base (guest-physical, [`GDT_GPA`]).
    pub gdt_base: u64,
    /// GDT limit.
    pub gdt_limit: u16,
    /// CS selector.
    pub cs: u16,
    /// DS, ES, FS, GS and SS selector.
    pub ds: u16,
}

/// CR0.PE | CR0.ET.
const CR0_PE_ET: u64 = 0x11;
/// CR0.PG.
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
const CR4_PAE: u64 = 1 << 5;
/// EFER.LME | EFER.LMA.
const EFER_LME_LMA: u64 = (1 << 8) | (1 << 10);

impl EntryState {
    /// 32-bit protected mode, paging off, flat segments, interrupts off.
    pub fn protected32(rip: u64) -> Self {
        EntryState {
            mode: CpuMode::Protected32,
            rip,
            rsp: SCRATCH_STACK_TOP,
            rax: 0,
            rbx: 0,
            rsi: 0,
            cr0: CR0_PE_ET,
            cr3: 0,
            cr4: 0,
            efer: 0,
            rflags: 0x2,
            gdt_base: GDT_GPA,
            gdt_limit: 31,
            cs: selector::CODE32,
            ds: selector::DATA,
        }
    }

    /// 64-bit long mode with the identity map at [`PML4_GPA`], interrupts off.
    pub fn long64(rip: u64) -> Self {
        EntryState {
            mode: CpuMode::Long64,
            cr0: CR0_PE_ET | CR0_PG,
            cr3: PML4_GPA,
            cr4: CR4_PAE,
            efer: EFER_LME_LMA,
            cs: selector::CODE64,
            ..Self::protected32(rip)
        }
    }
}

/// The identity map of 0..4 GiB in 2 MiB pages: one (address, page) per table, PML4
/// at [`PML4_GPA`], the PDPT after it, then 4 PDs (SDM Vol. 3A 4.5: PML4E/PDPTE
/// P|RW = 0x3, PDE with PS: P|RW|PS = 0x83).
pub fn identity_map_4g() -> [(u64, [u8; 4096]); 6] {
    let pdpt = PML4_GPA + 0x1000;
    let mut tables = [(0u64, [0u8; 4096]); 6];
    tables[0].0 = PML4_GPA;
    tables[0].1[..8].copy_from_slice(&(pdpt | 0x3).to_le_bytes());
    tables[1].0 = pdpt;
    for gib in 0..4u64 {
        let pd = pdpt + 0x1000 * (gib + 1);
        let (first, rest) = tables.split_at_mut(2);
        let off = (gib * 8) as usize;
        if let Some(entry) = first[1].1.get_mut(off..off + 8) {
            entry.copy_from_slice(&(pd | 0x3).to_le_bytes());
        }
        if let Some(t) = rest.get_mut(gib as usize) {
            t.0 = pd;
            for (i, e) in t.1.chunks_exact_mut(8).enumerate() {
                let gpa = (gib << 30) + ((i as u64) << 21);
                e.copy_from_slice(&(gpa | 0x83).to_le_bytes());
            }
        }
    }
    tables
}

/// Round `v` up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(v: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    v.checked_add(mask).map(|x| x & !mask)
}

/// Little-endian readers over a guest-supplied image: `None` past the end.
fn le_u8(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}
fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}
fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Some(u32::from_le_bytes(a))
}
fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Little-endian writer into a builder's own buffer; out-of-range writes are dropped
/// (callers size their buffers first, and the tests parse the result back).
fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = off.checked_add(bytes.len()).and_then(|end| b.get_mut(off..end)) {
        dst.copy_from_slice(bytes);
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A `Vec` as guest memory, and a deterministic xorshift for the fuzz tests.
    use super::GuestWrite;
    use alloc::vec::Vec;

    /// Guest memory from GPA 0 in a `Vec`; writes past its end fail.
    pub struct VecMemory(pub Vec<u8>);

    impl VecMemory {
        pub fn new(bytes: usize) -> Self {
            VecMemory(alloc::vec![0; bytes])
        }
        pub fn slice(&self, gpa: u64, len: usize) -> &[u8] {
            &self.0[gpa as usize..gpa as usize + len]
        }
        pub fn u32(&self, gpa: u64) -> u32 {
            u32::from_le_bytes(self.slice(gpa, 4).try_into().unwrap())
        }
        pub fn u64(&self, gpa: u64) -> u64 {
            u64::from_le_bytes(self.slice(gpa, 8).try_into().unwrap())
        }
    }

    impl GuestWrite for VecMemory {
        type Error = u64;
        fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), u64> {
            let start = usize::try_from(gpa).map_err(|_| gpa)?;
            let end = start.checked_add(bytes.len()).ok_or(gpa)?;
            self.0.get_mut(start..end).ok_or(gpa)?.copy_from_slice(bytes);
            Ok(())
        }
    }

    /// xorshift64 (Marsaglia), seeded: the same inputs every run.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_covers_4g_with_2m_pages() {
        let t = identity_map_4g();
        assert_eq!(t[0].0, PML4_GPA);
        assert_eq!(u64::from_le_bytes(t[0].1[..8].try_into().unwrap()), 0xa003);
        for gib in 0..4u64 {
            let off = gib as usize * 8;
            let pdpte = u64::from_le_bytes(t[1].1[off..off + 8].try_into().unwrap());
            assert_eq!(pdpte, (0xb000 + 0x1000 * gib) | 3);
            assert_eq!(t[2 + gib as usize].0, 0xb000 + 0x1000 * gib);
        }
        let last = u64::from_le_bytes(t[5].1[4088..].try_into().unwrap());
        assert_eq!(last, (FOUR_GIB - (2 << 20)) | 0x83);
        // The tables fit between the PML4 and the command line, clear of the zero page.
        assert!(t[5].0 + 0x1000 <= CMDLINE_GPA && PML4_GPA >= ZERO_PAGE_GPA + 0x1000);
    }

    #[test]
    fn entry_states() {
        let l = EntryState::long64(0x100_0200);
        assert_eq!((l.cs, l.ds, l.cr3, l.cr0 & CR0_PG), (0x10, 0x18, PML4_GPA, CR0_PG));
        let p = EntryState::protected32(0x10_0000);
        assert_eq!((p.cs, p.cr0, p.cr3, p.efer), (0x08, 0x11, 0, 0));
        assert_eq!(gdt_bytes()[16..24], 0x00af_9a00_0000_ffffu64.to_le_bytes());
    }
}
