//! Loading a guest kernel: ELF64 segments into guest memory, the identity page tables
//! and the boot-info block of `guest_abi`, and the registers it starts with.
//!
//! Only what the ABI promises is accepted: an x86-64 `ET_EXEC` whose `PT_LOAD`
//! segments lie between `KERNEL_MIN_GPA` and the stack at the top of guest memory,
//! and an entry point inside a loaded segment. Everything else is refused with the
//! reason. Writes the loader makes are ordinary guest-memory writes (dirty logging,
//! when it exists, must mark them: DESIGN.md).

use alloc::string::String;
use core::fmt;

use guest_abi::{BOOT_INFO_GPA, BOOT_INFO_MAGIC, BootInfo, CMDLINE_MAX, KERNEL_MIN_GPA, PAGE_TABLES_GPA};
use xmas_elf::ElfFile;
use xmas_elf::header::{Class, Machine, Type as ElfType};
use xmas_elf::program::Type as SegmentType;

use crate::mm::frames::FramePool;
use crate::mm::guest::GuestMemory;
use crate::mm::nested::EntryFormat;
use crate::mm::{LARGE_PAGE_SIZE, MmError, PAGE_SIZE};

/// Bytes at the top of guest memory kept for the initial stack.
pub const STACK_BYTES: u64 = 64 * 1024;

/// Why a kernel could not be loaded (this loader's errors and those of the boot
/// protocols in `domain::boot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// Not an ELF file we accept.
    BadElf(String),
    /// A segment or the entry point is outside where the ABI allows.
    Layout(String),
    /// Guest memory access failed.
    Memory(MmError),
    /// The image is none of the accepted formats.
    UnknownFormat {
        /// Its length.
        len: usize,
        /// Its first bytes (zero-padded when shorter).
        head: [u8; 4],
    },
    /// The image is a bzImage the Linux boot protocol refuses.
    Linux(crate::firmware::linux::LinuxError),
    /// The image is a multiboot kernel the multiboot loader refuses.
    Multiboot(crate::firmware::multiboot::MultibootError),
    /// The ACPI tables could not be built.
    Acpi(crate::firmware::acpi::AcpiError),
    /// An initrd was given for a kernel format that takes none.
    InitrdNotTaken {
        /// The format, as a phrase.
        format: &'static str,
        /// The initrd's length.
        len: usize,
    },
    /// The domain has more memory than the firmware layout can describe.
    MemoryAboveHole {
        /// The domain's memory in bytes.
        memory: u64,
        /// The most a Linux or multiboot domain may have.
        limit: u64,
    },
}

impl From<MmError> for LoadError {
    fn from(e: MmError) -> Self {
        LoadError::Memory(e)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::BadElf(why) => write!(f, "not a loadable guest kernel: {why}"),
            LoadError::Layout(why) => write!(f, "kernel layout: {why}"),
            LoadError::Memory(e) => write!(f, "guest memory: {e}"),
            LoadError::UnknownFormat { len, head } => write!(
                f,
                "the kernel image ({len} bytes, starting {head:02x?}) is none of the accepted formats: an ELF64 \
                 guest_abi kernel (\"\\x7fELF\", class 64-bit), a Linux bzImage (\"HdrS\" at 0x202, boot flag \
                 0xaa55 at 0x1fe) or a multiboot v1 kernel (magic 0x1badb002 in the first 8 KiB)"
            ),
            LoadError::Linux(e) => write!(f, "Linux bzImage: {e}"),
            LoadError::Multiboot(e) => write!(f, "multiboot kernel: {e}"),
            LoadError::Acpi(e) => write!(f, "ACPI tables: {e}"),
            LoadError::InitrdNotTaken { format, len } => write!(
                f,
                "an initrd of {len} bytes was given, but {format} takes none (only a Linux bzImage or a multiboot \
                 kernel does)"
            ),
            LoadError::MemoryAboveHole { memory, limit } => write!(
                f,
                "{} MiB of memory is more than a Linux or multiboot domain can have: RAM ends at the MMIO hole at \
                 {} MiB (RAM above 4 GiB is not implemented)",
                memory >> 20,
                limit >> 20
            ),
        }
    }
}

/// Where the loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// CR3 (guest-physical address of the PML4).
    pub cr3: u64,
    /// RDI (guest-physical address of the boot-info block).
    pub rdi: u64,
}

/// What the boot-info block says besides the memory size.
#[derive(Debug, Clone, Copy)]
pub struct BootParams<'a> {
    /// Which hypercall instruction.
    pub arch: guest_abi::Arch,
    /// Domain id.
    pub domain_id: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Command line.
    pub cmdline: &'a str,
}

/// Load `elf` into `mem` and build the start state.
pub fn load<F: EntryFormat>(
    pool: &mut FramePool,
    mem: &GuestMemory<F>,
    elf: &[u8],
    params: BootParams<'_>,
) -> Result<Start, LoadError> {
    let bytes = mem.bytes();
    let file = ElfFile::new(elf).map_err(|e| LoadError::BadElf(e.into()))?;
    let header = &file.header;
    if header.pt1.class() != Class::SixtyFour {
        return Err(LoadError::BadElf("not a 64-bit ELF".into()));
    }
    if header.pt2.machine().as_machine() != Machine::X86_64 {
        return Err(LoadError::BadElf("not an x86-64 ELF".into()));
    }
    if header.pt2.type_().as_type() != ElfType::Executable {
        return Err(LoadError::BadElf("not an executable (ET_EXEC); link at a fixed address".into()));
    }
    let limit = bytes.saturating_sub(STACK_BYTES);
    let entry = header.pt2.entry_point();
    let mut entry_loaded = false;
    let mut segments = 0;
    for ph in file.program_iter() {
        if ph.get_type() != Ok(SegmentType::Load) {
            continue;
        }
        segments += 1;
        let (gpa, filesz, memsz, offset) = (ph.physical_addr(), ph.file_size(), ph.mem_size(), ph.offset());
        let end = gpa.checked_add(memsz).ok_or_else(|| LoadError::Layout("segment wraps around".into()))?;
        if gpa < KERNEL_MIN_GPA || end > limit || filesz > memsz {
            return Err(LoadError::Layout(alloc::format!(
                "segment at {gpa:#x}..{end:#x} must lie within {KERNEL_MIN_GPA:#x}..{limit:#x} (memory {bytes:#x} less the stack)"
            )));
        }
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(filesz).ok())
            .and_then(|(o, n)| elf.get(o..o.checked_add(n)?))
            .ok_or_else(|| LoadError::BadElf(alloc::format!("segment at {gpa:#x} extends past the end of the file")))?;
        mem.write(pool, gpa, data)?;
        // The rest (memsz - filesz, .bss) is already zero: guest memory starts zeroed.
        entry_loaded |= (gpa..end).contains(&entry);
    }
    if segments == 0 {
        return Err(LoadError::BadElf("no PT_LOAD segment".into()));
    }
    if !entry_loaded {
        return Err(LoadError::Layout(alloc::format!("entry point {entry:#x} is not inside a loaded segment")));
    }

    // Identity page tables: PML4 -> PDPT -> one PD per GiB of 2 MiB pages (P|RW|PS)
    // for memory, and the PC's device window below 4 GiB (guest_abi::MMIO_WINDOW: the
    // I/O APIC and local APIC pages) as uncacheable 2 MiB pages (PCD|PWT, SDM Vol. 3A
    // 4.9.2), so guests reach their devices with plain MOVs. PDs follow the PDPT in
    // the order of the GiBs they map.
    let pml4 = PAGE_TABLES_GPA;
    let pdpt = pml4 + PAGE_SIZE;
    let mmio = guest_abi::MMIO_WINDOW;
    let pds = bytes.div_ceil(1 << 30);
    let mmio_gib = (mmio.end - 1) >> 30;
    let tables_end = pdpt + PAGE_SIZE * (1 + pds + u64::from(mmio_gib >= pds));
    if tables_end > KERNEL_MIN_GPA {
        return Err(LoadError::Layout(alloc::format!("{bytes:#x} bytes of memory need more page tables than fit")));
    }
    mem.write(pool, pml4, &(pdpt | 0x3).to_le_bytes())?;
    let mut next_pd = pdpt + PAGE_SIZE;
    for gib in 0..pds.max(mmio_gib + 1) {
        let span = gib << 30..(gib + 1) << 30;
        let has_mmio = span.start < mmio.end && mmio.start < span.end;
        if gib >= pds && !has_mmio {
            continue;
        }
        let pd = next_pd;
        next_pd += PAGE_SIZE;
        mem.write(pool, pdpt + 8 * gib, &(pd | 0x3).to_le_bytes())?;
        let mut table = [0u8; PAGE_SIZE as usize];
        for (i, entry) in table.chunks_exact_mut(8).enumerate() {
            let gpa = span.start + i as u64 * LARGE_PAGE_SIZE;
            if gpa < bytes {
                entry.copy_from_slice(&(gpa | 0x83).to_le_bytes());
            } else if mmio.contains(&gpa) {
                entry.copy_from_slice(&(gpa | 0x9b).to_le_bytes());
            }
        }
        mem.write(pool, pd, &table)?;
    }

    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: 1,
        arch: params.arch as u32,
        domain_id: params.domain_id,
        vcpus: params.vcpus,
        memory_bytes: bytes,
        cmdline_len: 0,
        reserved: 0,
        cmdline: [0; CMDLINE_MAX],
    };
    let cmd = params.cmdline.as_bytes();
    let n = cmd.len().min(CMDLINE_MAX);
    info.cmdline[..n].copy_from_slice(&cmd[..n]);
    info.cmdline_len = n as u32;
    mem.write(pool, BOOT_INFO_GPA, &info.to_bytes())?;

    // SysV: at a function's first instruction RSP + 8 is 16-byte aligned.
    Ok(Start { rip: entry, rsp: bytes - 8, cr3: pml4, rdi: BOOT_INFO_GPA })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::frames::testing::pool;
    use crate::mm::nested::Npt;
    use alloc::vec::Vec;

    /// A minimal ET_EXEC x86-64 ELF with one PT_LOAD at `gpa` holding `code`.
    fn elf(gpa: u64, code: &[u8], entry: u64) -> Vec<u8> {
        let mut e = alloc::vec![0u8; 0x78];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little-endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&entry.to_le_bytes());
        e[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
        e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        e[ph + 16..ph + 24].copy_from_slice(&gpa.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&gpa.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x100).to_le_bytes());
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    fn params() -> BootParams<'static> {
        BootParams { arch: guest_abi::Arch::Svm, domain_id: 7, vcpus: 1, cmdline: "pages=3" }
    }

    #[test]
    fn loads_segments_tables_and_boot_info() {
        let mut p = pool(1200);
        let mem = GuestMemory::<Npt>::new(&mut p, 4 << 20, true).unwrap();
        let start = load(&mut p, &mem, &elf(0x20_0000, &[0xf4, 0x90], 0x20_0000), params()).unwrap();
        assert_eq!(start, Start { rip: 0x20_0000, rsp: (4 << 20) - 8, cr3: PAGE_TABLES_GPA, rdi: BOOT_INFO_GPA });
        let mut code = [0u8; 2];
        mem.read(&mut p, 0x20_0000, &mut code).unwrap();
        assert_eq!(code, [0xf4, 0x90]);
        // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 0 and 2 MiB with large pages.
        assert_eq!(mem.read_u64(&mut p, PAGE_TABLES_GPA).unwrap(), (PAGE_TABLES_GPA + 0x1000) | 3);
        assert_eq!(mem.read_u64(&mut p, PAGE_TABLES_GPA + 0x2000 + 8).unwrap(), 0x20_0000 | 0x83);
        assert_eq!(mem.read_u64(&mut p, PAGE_TABLES_GPA + 0x2000 + 16).unwrap(), 0, "nothing beyond memory");
        // PDPT[3] -> the next PD, which maps the device window 0xFE00_0000..4 GiB
        // uncacheable, the local APIC's 2 MiB (0xFEE0_0000) among it.
        assert_eq!(mem.read_u64(&mut p, PAGE_TABLES_GPA + 0x1000 + 8).unwrap(), 0, "no PD for GiB 1");
        assert_eq!(mem.read_u64(&mut p, PAGE_TABLES_GPA + 0x1000 + 24).unwrap(), (PAGE_TABLES_GPA + 0x3000) | 3);
        let pd3 = PAGE_TABLES_GPA + 0x3000;
        assert_eq!(mem.read_u64(&mut p, pd3 + 0x1f7 * 8).unwrap(), 0xfee0_0000 | 0x9b);
        assert_eq!(mem.read_u64(&mut p, pd3 + 0x1f0 * 8).unwrap(), 0xfe00_0000 | 0x9b);
        assert_eq!(mem.read_u64(&mut p, pd3 + 0x1ef * 8).unwrap(), 0, "below the window");
        let mut info = [0u8; BootInfo::SIZE];
        mem.read(&mut p, BOOT_INFO_GPA, &mut info).unwrap();
        assert_eq!(&info[..8], b"HVBOOT01");
        assert_eq!(&info[16..20], &7u32.to_le_bytes());
        assert_eq!(&info[40..47], b"pages=3");
    }

    #[test]
    fn refuses_what_the_abi_does_not_allow() {
        let mut p = pool(1200);
        let mem = GuestMemory::<Npt>::new(&mut p, 4 << 20, true).unwrap();
        let low = load(&mut p, &mem, &elf(0x1000, &[0xf4], 0x1000), params()).unwrap_err();
        assert!(matches!(low, LoadError::Layout(_)), "{low}");
        let high = load(&mut p, &mem, &elf((4 << 20) - 0x1000, &[0xf4], (4 << 20) - 0x1000), params()).unwrap_err();
        assert!(matches!(high, LoadError::Layout(_)), "{high}");
        let outside = load(&mut p, &mem, &elf(0x20_0000, &[0xf4], 0x30_0000), params()).unwrap_err();
        assert_eq!(outside, LoadError::Layout("entry point 0x300000 is not inside a loaded segment".into()));
        assert!(matches!(load(&mut p, &mem, b"not an elf at all", params()), Err(LoadError::BadElf(_))));
        let mut truncated = elf(0x20_0000, &[0xf4; 64], 0x20_0000);
        truncated.truncate(0x90);
        assert!(matches!(load(&mut p, &mem, &truncated, params()), Err(LoadError::BadElf(_))));
    }
}
