//! The e820 memory map a domain's guest sees: usable RAM, what the firmware keeps
//! (EBDA, BIOS area), where the ACPI tables are, and the 32-bit MMIO hole (I/O APIC,
//! local APIC) left out of RAM.
//!
//! The map is a small fixed-capacity array (the zero page has room for 128 entries,
//! zero-page.rst `e820_table` at 0x2D0) built from the domain's memory size and the
//! layout in [`super`]. It is also what the multiboot `mmap` is made from. It does not
//! allocate and does not decide where the domain's memory is backed: a domain larger
//! than [`MMIO_HOLE_GPA`] must back its RAM above the hole from [`FOUR_GIB`], as the
//! map says.

use core::fmt;

use super::{ACPI_BYTES, ACPI_GPA, BIOS_GPA, EBDA_GPA, FOUR_GIB, HIGH_MEMORY_GPA, MMIO_HOLE_GPA};

/// Entries the zero page can hold (zero-page.rst: `e820_table`, 0x2D0/0xA00 = 128 × 20).
pub const E820_MAX: usize = 128;

/// The smallest domain we describe: the low megabyte plus 1 MiB of extended memory.
pub const MIN_RAM_BYTES: u64 = 2 << 20;

/// What a range is (ACPI 6.5 §15, Table 15.1: address range types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// AddressRangeMemory: usable RAM.
    Ram = 1,
    /// AddressRangeReserved.
    Reserved = 2,
    /// AddressRangeACPI: ACPI tables, reclaimable once read.
    Acpi = 3,
    /// AddressRangeNVS.
    Nvs = 4,
    /// AddressRangeUnusable.
    Unusable = 5,
}

/// One range of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// The 20-byte `struct boot_e820_entry` (u64 addr, u64 size, u32 type).
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Why a map could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Error {
    /// Less memory than the fixed low layout needs.
    TooLittleRam {
        /// What the domain has.
        bytes: u64,
    },
    /// More entries than the map holds.
    Full,
}

impl fmt::Display for E820Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            E820Error::TooLittleRam { bytes } => write!(
                f,
                "a domain of {bytes:#x} bytes is too small for the PC layout, which needs at least {MIN_RAM_BYTES:#x}"
            ),
            E820Error::Full => write!(f, "the e820 map is full ({E820_MAX} entries)"),
        }
    }
}

/// A sorted, non-overlapping e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Map {
    entries: [E820Entry; E820_MAX],
    len: usize,
}

impl E820Map {
    /// An empty map.
    pub const fn new() -> Self {
        E820Map { entries: [E820Entry { addr: 0, size: 0, kind: E820Kind::Reserved }; E820_MAX], len: 0 }
    }

    /// Add a range (callers add in address order).
    pub fn push(&mut self, entry: E820Entry) -> Result<(), E820Error> {
        let slot = self.entries.get_mut(self.len).ok_or(E820Error::Full)?;
        *slot = entry;
        self.len += 1;
        Ok(())
    }

    /// The entries.
    pub fn as_slice(&self) -> &[E820Entry] {
        self.entries.get(..self.len).unwrap_or(&[])
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The end of the RAM range starting at 1 MiB (the memory a kernel and its initrd
    /// are placed in: below the MMIO hole).
    pub fn low_ram_end(&self) -> u64 {
        self.as_slice()
            .iter()
            .find(|e| e.kind == E820Kind::Ram && e.addr == HIGH_MEMORY_GPA)
            .map_or(HIGH_MEMORY_GPA, E820Entry::end)
    }

    /// Whether `start..end` lies inside one RAM entry.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.as_slice().iter().any(|e| e.kind == E820Kind::Ram && e.addr <= start && end <= e.end())
    }
}

impl Default for E820Map {
    fn default() -> Self {
        Self::new()
    }
}

/// The map of a domain with `ram_bytes` of memory:
///
/// ```text
/// 0x0       ..0x9fc00   RAM (conventional memory, 639 KiB)
/// 0x9fc00   ..0xa0000   reserved (EBDA)
/// 0xa0000   ..0xe0000   (absent: VGA and option-ROM hole)
/// 0xe0000   ..0xf0000   ACPI (the tables; reclaimable)
/// 0xf0000   ..0x100000  reserved (BIOS area)
/// 0x100000  ..min(ram, 0xc0000000)  RAM
/// 0xc0000000..4 GiB     (absent: MMIO hole with the I/O APIC and local APIC)
/// 4 GiB     ..4 GiB + (ram - 0xc0000000)  RAM, if any
/// ```
pub fn build(ram_bytes: u64) -> Result<E820Map, E820Error> {
    if ram_bytes < MIN_RAM_BYTES {
        return Err(E820Error::TooLittleRam { bytes: ram_bytes });
    }
    let mut map = E820Map::new();
    let mut add = |addr: u64, end: u64, kind| map.push(E820Entry { addr, size: end - addr, kind });
    add(0, EBDA_GPA, E820Kind::Ram)?;
    add(EBDA_GPA, super::VGA_HOLE_GPA, E820Kind::Reserved)?;
    add(ACPI_GPA, ACPI_GPA + ACPI_BYTES, E820Kind::Acpi)?;
    add(BIOS_GPA, HIGH_MEMORY_GPA, E820Kind::Reserved)?;
    let low_end = ram_bytes.min(MMIO_HOLE_GPA);
    add(HIGH_MEMORY_GPA, low_end, E820Kind::Ram)?;
    if ram_bytes > MMIO_HOLE_GPA {
        let above = ram_bytes - MMIO_HOLE_GPA;
        add(FOUR_GIB, FOUR_GIB.saturating_add(above), E820Kind::Ram)?;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::{IOAPIC_GPA, LAPIC_GPA};
    use alloc::string::ToString;

    fn e(addr: u64, size: u64, kind: E820Kind) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn small_domain_map() {
        let map = build(64 << 20).unwrap();
        assert_eq!(
            map.as_slice(),
            [
                e(0, 0x9fc00, E820Kind::Ram),
                e(0x9fc00, 0x400, E820Kind::Reserved),
                e(0xe0000, 0x10000, E820Kind::Acpi),
                e(0xf0000, 0x10000, E820Kind::Reserved),
                e(0x100000, (64 << 20) - 0x100000, E820Kind::Ram),
            ]
        );
        assert_eq!(map.low_ram_end(), 64 << 20);
        assert!(map.is_ram(0x100000, 64 << 20) && !map.is_ram(0xe0000, 0xe0010));
    }

    #[test]
    fn large_domain_skips_the_mmio_hole() {
        let map = build(5 << 30).unwrap();
        let s = map.as_slice();
        assert_eq!(s.len(), 6);
        assert_eq!(s[4], e(0x100000, 0xc000_0000 - 0x100000, E820Kind::Ram));
        assert_eq!(s[5], e(FOUR_GIB, (5 << 30) - 0xc000_0000, E820Kind::Ram));
        let ram: u64 = s.iter().filter(|x| x.kind == E820Kind::Ram).map(|x| x.size).sum();
        assert_eq!(ram, (5 << 30) - 0x100000 + 0x9fc00, "all RAM but the low megabyte's holes");
        for mmio in [u64::from(IOAPIC_GPA), u64::from(LAPIC_GPA)] {
            assert!(s.iter().all(|x| !(x.addr..x.end()).contains(&mmio)), "{mmio:#x} is not in the map");
        }
        assert_eq!(map.low_ram_end(), MMIO_HOLE_GPA);
    }

    #[test]
    fn sorted_without_overlaps_and_bytes() {
        for ram in [MIN_RAM_BYTES, 100 << 20, MMIO_HOLE_GPA, MMIO_HOLE_GPA + 1, 64 << 30] {
            let map = build(ram).unwrap();
            for w in map.as_slice().windows(2) {
                assert!(w[0].end() <= w[1].addr, "{ram:#x}: {:?} overlaps {:?}", w[0], w[1]);
            }
        }
        let b = e(0x100000, 0x200000, E820Kind::Acpi).to_bytes();
        assert_eq!(b[..8], 0x100000u64.to_le_bytes());
        assert_eq!(b[8..16], 0x200000u64.to_le_bytes());
        assert_eq!(b[16..], 3u32.to_le_bytes());
    }

    #[test]
    fn refuses_tiny_domains_and_overflow() {
        let err = build(1 << 20).unwrap_err();
        assert_eq!(err, E820Error::TooLittleRam { bytes: 1 << 20 });
        assert!(err.to_string().contains("too small"), "{err}");
        let mut map = E820Map::new();
        for i in 0..E820_MAX as u64 {
            map.push(e(i * 0x1000, 0x1000, E820Kind::Ram)).unwrap();
        }
        assert_eq!(map.push(e(0, 1, E820Kind::Ram)), Err(E820Error::Full));
        assert_eq!(build(u64::MAX).unwrap().as_slice()[5].end(), u64::MAX, "saturates, never wraps");
    }
}
