//! Multiboot v1 (the GNU Multiboot Specification 0.6.96): find and check an image's
//! multiboot header, work out what to load where (ELF32 program headers, or the
//! header's a.out-kludge addresses), and build the multiboot information structure
//! (memory sizes, command line, the initrd as module 1, the memory map) and the
//! 32-bit protected-mode entry state (EAX = 0x2BADB002, EBX = the information).
//!
//! The parser never panics on any input and says why it refuses an image. Not here:
//! video modes (an image that requires one, header flag bit 2, is refused), symbol
//! tables, drive and APM information, more than one module.

use core::fmt;

use super::e820::{E820Error, E820Kind, E820Map};
use super::{
    CMDLINE_BYTES, CMDLINE_GPA, EBDA_GPA, EntryState, GuestWrite, HIGH_MEMORY_GPA, MULTIBOOT_INFO_GPA, WriteError,
    align_up, gdt_bytes, le_u16, le_u32,
};

/// The header magic (§3.1.1).
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at entry (§3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies in the first 8192 bytes, 32-bit aligned (§3.1).
pub const SEARCH_BYTES: usize = 8192;
/// The most loadable ELF segments we take.
pub const MAX_SEGMENTS: usize = 16;
/// The most ELF program headers we look at.
pub const MAX_PHDRS: u16 = 256;

/// Header flags (§3.1.2). Bits 0-15 are requirements: a loader that does not know one
/// must refuse the image. Bits 16-31 are optional features.
pub mod header_flags {
    /// Modules must be page-aligned (we always align them).
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// mem_* (and the mmap, if we have one) must be given (we always give them).
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// A video mode must be set: not supported.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The address fields at offsets 12-28 are valid (the "a.out kludge").
    pub const AOUT_KLUDGE: u32 = 1 << 16;
    /// The requirement bits we satisfy.
    pub const SUPPORTED: u32 = PAGE_ALIGN | MEMORY_INFO;
}

/// Information flags (§3.3).
pub mod info_flags {
    /// mem_lower and mem_upper are valid.
    pub const MEMORY: u32 = 1 << 0;
    /// cmdline is valid.
    pub const CMDLINE: u32 = 1 << 2;
    /// mods_count and mods_addr are valid.
    pub const MODS: u32 = 1 << 3;
    /// mmap_length and mmap_addr are valid.
    pub const MMAP: u32 = 1 << 6;
    /// boot_loader_name is valid.
    pub const LOADER_NAME: u32 = 1 << 9;
}

/// Where the pieces of the information go, relative to [`MULTIBOOT_INFO_GPA`].
const INFO_LEN: usize = 120; // 116 bytes up to the framebuffer fields, rounded up
const MMAP_OFF: usize = 0x80;
const MODS_OFF: usize = 0x1000;
const MOD_STRING_OFF: usize = 0x1100;
const LOADER_NAME_OFF: usize = 0x1200;
const INFO_BLOB_LEN: usize = 0x1300;
// The pieces do not overlap: the structure, 128 mmap entries, the module, the strings.
const _: () = assert!(INFO_LEN <= MMAP_OFF && MMAP_OFF + 24 * super::e820::E820_MAX <= MODS_OFF);
const _: () = assert!(MODS_OFF + 16 <= MOD_STRING_OFF && INFO_BLOB_LEN as u64 <= super::MULTIBOOT_INFO_BYTES);
/// The module's string.
const MOD_STRING: &[u8] = b"initrd\0";
/// boot_loader_name.
const LOADER_NAME: &[u8] = b"hv\0";

/// The a.out-kludge address fields (§3.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AoutAddrs {
    /// Where the header's first byte (the magic) is loaded.
    pub header_addr: u32,
    /// Where the text segment starts (the file is loaded from there).
    pub load_addr: u32,
    /// End of text and data (0: to the end of the file).
    pub load_end_addr: u32,
    /// End of bss (0: no bss).
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

/// A multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the image.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
    /// The address fields, if flag bit 16 is set.
    pub aout: Option<AoutAddrs>,
}

/// One piece of the image to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Offset in the image.
    pub file_offset: usize,
    /// Bytes from the image.
    pub file_len: usize,
    /// Guest-physical load address.
    pub gpa: u64,
    /// Bytes in memory (the rest after `file_len` is zero: bss).
    pub mem_len: u64,
}

impl Segment {
    /// One past its last byte in memory.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.mem_len)
    }
}

/// What an image asks to be loaded and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// The header.
    pub header: Header,
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
    /// The entry point (physical).
    pub entry: u32,
}

impl Kernel {
    /// The loadable pieces.
    pub fn segments(&self) -> &[Segment] {
        self.segments.get(..self.count).unwrap_or(&[])
    }
}

/// Why an image was refused or could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultibootError {
    /// No header magic at a 4-byte boundary in the first 8192 bytes.
    NoHeader {
        /// Bytes searched.
        searched: usize,
    },
    /// The header's checksum is wrong.
    BadChecksum {
        /// Its offset.
        offset: usize,
        /// magic + flags + checksum (should be 0).
        sum: u32,
    },
    /// The header is cut off by the end of the image.
    HeaderTruncated {
        /// Its offset.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
    },
    /// The header requires something we do not provide.
    UnsupportedFlags {
        /// Its flags.
        flags: u32,
        /// The required bits we do not support.
        unsupported: u32,
    },
    /// The a.out-kludge addresses are inconsistent with each other or the file.
    BadAddresses {
        /// What is wrong.
        reason: &'static str,
        /// The fields.
        addrs: AoutAddrs,
    },
    /// Without the a.out kludge the image must be ELF32, and it is not.
    NotElf {
        /// What is wrong.
        reason: &'static str,
    },
    /// An ELF program header is unusable.
    BadSegment {
        /// Its index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// More loadable segments than we take.
    TooManySegments,
    /// Nothing to load.
    NoSegments,
    /// The entry point is not inside what is loaded.
    EntryOutside {
        /// The entry point.
        entry: u32,
    },
    /// A segment is not inside RAM from 1 MiB to below the MMIO hole.
    KernelPlacement {
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
        /// End of the RAM it must be in.
        ram_end: u64,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    ModuleDoesNotFit {
        /// Its length.
        len: u64,
        /// The lowest address it may start at.
        lowest: u64,
        /// The end of low RAM.
        limit: u64,
    },
    /// The command line does not fit.
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The command line contains a NUL byte.
    CmdlineNul {
        /// Where.
        at: usize,
    },
    /// The memory map could not be built.
    Memory(E820Error),
}

impl From<E820Error> for MultibootError {
    fn from(e: E820Error) -> Self {
        MultibootError::Memory(e)
    }
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MultibootError::NoHeader { searched } => {
                write!(f, "no multiboot header (magic 0x1badb002, 4-byte aligned) in the first {searched} bytes")
            }
            MultibootError::BadChecksum { offset, sum } => write!(
                f,
                "the multiboot header at {offset:#x} has a bad checksum: magic + flags + checksum is {sum:#x}, not 0"
            ),
            MultibootError::HeaderTruncated { offset, needed } => {
                write!(f, "the multiboot header at {offset:#x} needs {needed} bytes but the image ends first")
            }
            MultibootError::UnsupportedFlags { flags, unsupported } => write!(
                f,
                "the multiboot header's flags {flags:#x} require {unsupported:#x}, which this loader does not provide{}",
                if unsupported & header_flags::VIDEO_MODE != 0 { " (bit 2: a video mode)" } else { "" }
            ),
            MultibootError::BadAddresses { reason, addrs } => write!(
                f,
                "the multiboot header's address fields are unusable: {reason} (header_addr {:#x}, load_addr {:#x}, load_end_addr {:#x}, bss_end_addr {:#x})",
                addrs.header_addr, addrs.load_addr, addrs.load_end_addr, addrs.bss_end_addr
            ),
            MultibootError::NotElf { reason } => {
                write!(f, "the image has no a.out-kludge addresses and is not a loadable ELF32 file: {reason}")
            }
            MultibootError::BadSegment { index, reason } => {
                write!(f, "ELF program header {index} is unusable: {reason}")
            }
            MultibootError::TooManySegments => write!(f, "the image has more than {MAX_SEGMENTS} loadable segments"),
            MultibootError::NoSegments => write!(f, "the image has nothing to load"),
            MultibootError::EntryOutside { entry } => {
                write!(f, "the entry point {entry:#x} is not inside what the image loads")
            }
            MultibootError::KernelPlacement { start, end, ram_end } => {
                write!(f, "the kernel wants {start:#x}..{end:#x} but must lie in RAM between 1 MiB and {ram_end:#x}")
            }
            MultibootError::ModuleDoesNotFit { len, lowest, limit } => write!(
                f,
                "an initrd of {len:#x} bytes does not fit between the kernel's end {lowest:#x} and {limit:#x}"
            ),
            MultibootError::CmdlineTooLong { len, max } => {
                write!(f, "the command line is {len} bytes; at most {max} are allowed")
            }
            MultibootError::CmdlineNul { at } => write!(f, "the command line has a NUL byte at {at}"),
            MultibootError::Memory(e) => write!(f, "memory map: {e}"),
        }
    }
}

/// Find and check the multiboot header (§3.1). Never panics.
pub fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let searched = image.len().min(SEARCH_BYTES);
    let offset = (0..searched)
        .step_by(4)
        .find(|&o| le_u32(image, o) == Some(HEADER_MAGIC))
        .ok_or(MultibootError::NoHeader { searched })?;
    let field = |i: usize, needed: usize| {
        le_u32(image, offset + 4 * i).ok_or(MultibootError::HeaderTruncated { offset, needed })
    };
    let flags = field(1, 12)?;
    let checksum = field(2, 12)?;
    let sum = HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum);
    if sum != 0 {
        return Err(MultibootError::BadChecksum { offset, sum });
    }
    let unsupported = flags & 0xffff & !header_flags::SUPPORTED;
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedFlags { flags, unsupported });
    }
    let aout = if flags & header_flags::AOUT_KLUDGE != 0 {
        Some(AoutAddrs {
            header_addr: field(3, 32)?,
            load_addr: field(4, 32)?,
            load_end_addr: field(5, 32)?,
            bss_end_addr: field(6, 32)?,
            entry_addr: field(7, 32)?,
        })
    } else {
        None
    };
    Ok(Header { offset, flags, aout })
}

/// Find the header and work out what to load (§3.1.3 for the a.out kludge, ELF32
/// program headers otherwise). Never panics.
pub fn parse(image: &[u8]) -> Result<Kernel, MultibootError> {
    let header = find_header(image)?;
    let mut kernel = Kernel { header, segments: [Segment::default(); MAX_SEGMENTS], count: 0, entry: 0 };
    match header.aout {
        Some(a) => {
            let seg = aout_segment(image, header.offset, a)?;
            kernel.segments[0] = seg;
            kernel.count = 1;
            kernel.entry = a.entry_addr;
        }
        None => elf32(image, &mut kernel)?,
    }
    let entry = u64::from(kernel.entry);
    if !kernel.segments().iter().any(|s| (s.gpa..s.end()).contains(&entry)) {
        return Err(MultibootError::EntryOutside { entry: kernel.entry });
    }
    Ok(kernel)
}

fn aout_segment(image: &[u8], offset: usize, a: AoutAddrs) -> Result<Segment, MultibootError> {
    let bad = |reason| MultibootError::BadAddresses { reason, addrs: a };
    // §3.1.3: the file is loaded from offset (header offset - (header_addr - load_addr)).
    let before = a.header_addr.checked_sub(a.load_addr).ok_or(bad("load_addr is above header_addr"))?;
    let file_offset = offset.checked_sub(before as usize).ok_or(bad("load_addr is before the start of the file"))?;
    let rest = image.len().saturating_sub(file_offset); // file_offset <= offset < len
    let file_len = if a.load_end_addr == 0 {
        rest
    } else {
        let n = a.load_end_addr.checked_sub(a.load_addr).ok_or(bad("load_end_addr is below load_addr"))? as usize;
        if n > rest {
            return Err(bad("load_end_addr is past the end of the file"));
        }
        n
    };
    let load_end = u64::from(a.load_addr) + file_len as u64;
    if load_end <= u64::from(a.header_addr) {
        return Err(bad("the loaded part does not include the header"));
    }
    let mem_end = if a.bss_end_addr == 0 {
        load_end
    } else if u64::from(a.bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below the end of the loaded part"));
    } else {
        u64::from(a.bss_end_addr)
    };
    Ok(Segment { file_offset, file_len, gpa: u64::from(a.load_addr), mem_len: mem_end - u64::from(a.load_addr) })
}

/// ELF32 (System V ABI, Intel386 supplement): an x86 ET_EXEC's PT_LOAD segments,
/// loaded at their physical addresses.
fn elf32(image: &[u8], kernel: &mut Kernel) -> Result<(), MultibootError> {
    let not = |reason| MultibootError::NotElf { reason };
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(not("no ELF magic"));
    }
    if image.get(4..6) != Some([1u8, 1].as_slice()) {
        return Err(not("not a 32-bit little-endian ELF"));
    }
    if le_u16(image, 16) != Some(2) {
        return Err(not("not an executable (ET_EXEC)"));
    }
    if le_u16(image, 18) != Some(3) {
        return Err(not("not an i386 ELF (EM_386)"));
    }
    let entry = le_u32(image, 24).ok_or(not("the ELF header is truncated"))?;
    let phoff = le_u32(image, 28).ok_or(not("the ELF header is truncated"))? as usize;
    let phentsize = le_u16(image, 42).ok_or(not("the ELF header is truncated"))?;
    let phnum = le_u16(image, 44).ok_or(not("the ELF header is truncated"))?;
    if phentsize < 32 {
        return Err(not("program headers are smaller than 32 bytes"));
    }
    if phnum > MAX_PHDRS {
        return Err(not("more than 256 program headers"));
    }
    let mut phys_entry = None;
    for index in 0..usize::from(phnum) {
        let bad = |reason| MultibootError::BadSegment { index, reason };
        let ph = (index * usize::from(phentsize)).checked_add(phoff).ok_or(bad("its offset overflows"))?;
        let word = |i: usize| le_u32(image, ph + 4 * i).ok_or(bad("it is past the end of the file"));
        let (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz) =
            (word(0)?, word(1)?, word(2)?, word(3)?, word(4)?, word(5)?);
        if p_type != 1 || p_memsz == 0 {
            continue; // not PT_LOAD, or empty
        }
        if p_filesz > p_memsz {
            return Err(bad("p_filesz is larger than p_memsz"));
        }
        let file_offset = p_offset as usize;
        if file_offset.checked_add(p_filesz as usize).is_none_or(|end| end > image.len()) {
            return Err(bad("its file bytes extend past the end of the file"));
        }
        let slot = kernel.segments.get_mut(kernel.count).ok_or(MultibootError::TooManySegments)?;
        *slot =
            Segment { file_offset, file_len: p_filesz as usize, gpa: u64::from(p_paddr), mem_len: u64::from(p_memsz) };
        kernel.count += 1;
        // e_entry is a virtual address; translate it through the segment holding it.
        let v = u64::from(p_vaddr);
        if phys_entry.is_none() && (v..v + u64::from(p_memsz)).contains(&u64::from(entry)) {
            phys_entry = Some((u64::from(entry) - v + u64::from(p_paddr)) as u32);
        }
    }
    if kernel.count == 0 {
        return Err(MultibootError::NoSegments);
    }
    kernel.entry = phys_entry.unwrap_or(entry);
    Ok(())
}

/// Where everything goes, and how the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootPlan<'a> {
    /// What the image loads.
    pub kernel: Kernel,
    /// The image.
    pub image: &'a [u8],
    /// The command line (without NUL).
    pub cmdline: &'a [u8],
    /// The memory map.
    pub e820: E820Map,
    /// The initrd (module 1): address and length, if any.
    pub module: Option<(u64, u64)>,
    /// The information structure.
    pub info_gpa: u64,
    /// The entry state.
    pub entry: EntryState,
}

/// Plan the boot of `image` in a domain of `ram_bytes` with `cmdline` and an initrd of
/// `initrd_len` bytes (0: none) as module 1, page-aligned as high as low RAM allows.
/// Never panics.
pub fn plan<'a>(
    image: &'a [u8],
    ram_bytes: u64,
    cmdline: &'a [u8],
    initrd_len: u64,
) -> Result<MultibootPlan<'a>, MultibootError> {
    let kernel = parse(image)?;
    let e820 = super::e820::build(ram_bytes)?;
    let ram_end = e820.low_ram_end();
    let max = CMDLINE_BYTES as usize - 1;
    if cmdline.len() > max {
        return Err(MultibootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    if let Some(at) = cmdline.iter().position(|&b| b == 0) {
        return Err(MultibootError::CmdlineNul { at });
    }
    let mut kernel_end = HIGH_MEMORY_GPA;
    for s in kernel.segments() {
        if s.gpa < HIGH_MEMORY_GPA || s.end() > ram_end {
            return Err(MultibootError::KernelPlacement { start: s.gpa, end: s.end(), ram_end });
        }
        kernel_end = kernel_end.max(s.end());
    }
    let module = if initrd_len == 0 {
        None
    } else {
        let lowest = align_up(kernel_end, 0x1000).unwrap_or(u64::MAX);
        let err = MultibootError::ModuleDoesNotFit { len: initrd_len, lowest, limit: ram_end };
        let start = ram_end.checked_sub(initrd_len).ok_or(err)? & !0xfff;
        if start < lowest {
            return Err(err);
        }
        Some((start, initrd_len))
    };
    let mut entry = EntryState::protected32(u64::from(kernel.entry));
    entry.rax = u64::from(BOOTLOADER_MAGIC);
    entry.rbx = MULTIBOOT_INFO_GPA;
    Ok(MultibootPlan { kernel, image, cmdline, e820, module, info_gpa: MULTIBOOT_INFO_GPA, entry })
}

/// The multiboot type of an e820 kind (§3.3: 1 available, 3 ACPI, 4 preserve on
/// hibernation, 5 defective; anything else reserved).
fn mmap_type(kind: E820Kind) -> u32 {
    kind as u32
}

/// The information structure and what it points to (mmap, module list, strings), as
/// the bytes to place at `plan.info_gpa`.
pub fn info(plan: &MultibootPlan<'_>) -> [u8; INFO_BLOB_LEN] {
    let mut b = [0u8; INFO_BLOB_LEN];
    let at = |off: usize| (plan.info_gpa + off as u64) as u32;
    let put32 = |b: &mut [u8; INFO_BLOB_LEN], off: usize, v: u32| super::put(b, off, &v.to_le_bytes());
    let mut flags = info_flags::MEMORY | info_flags::CMDLINE | info_flags::MMAP | info_flags::LOADER_NAME;
    // §3.3: mem_lower from 0, mem_upper from 1 MiB to the first hole, in KiB.
    put32(&mut b, 4, (EBDA_GPA / 1024) as u32);
    put32(&mut b, 8, ((plan.e820.low_ram_end() - HIGH_MEMORY_GPA) / 1024) as u32);
    put32(&mut b, 16, CMDLINE_GPA as u32);
    if let Some((start, len)) = plan.module {
        flags |= info_flags::MODS;
        put32(&mut b, 20, 1);
        put32(&mut b, 24, at(MODS_OFF));
        // Module structure: mod_start, mod_end (one past), string, reserved.
        put32(&mut b, MODS_OFF, start as u32);
        put32(&mut b, MODS_OFF + 4, (start + len) as u32);
        put32(&mut b, MODS_OFF + 8, at(MOD_STRING_OFF));
        super::put(&mut b, MOD_STRING_OFF, MOD_STRING);
    }
    // mmap: entries of size (u32, not counting itself: 20), base_addr, length, type.
    let map = plan.e820.as_slice();
    for (i, e) in map.iter().enumerate() {
        let o = MMAP_OFF + 24 * i;
        put32(&mut b, o, 20);
        super::put(&mut b, o + 4, &e.addr.to_le_bytes());
        super::put(&mut b, o + 12, &e.size.to_le_bytes());
        put32(&mut b, o + 20, mmap_type(e.kind));
    }
    put32(&mut b, 44, (24 * map.len()) as u32);
    put32(&mut b, 48, at(MMAP_OFF));
    put32(&mut b, 64, at(LOADER_NAME_OFF));
    super::put(&mut b, LOADER_NAME_OFF, LOADER_NAME);
    put32(&mut b, 0, flags);
    b
}

/// Write the kernel's segments (bss zeroed), the information, the command line, the
/// GDT and the initrd into guest memory. `initrd` must be as long as planned.
pub fn write<W: GuestWrite>(plan: &MultibootPlan<'_>, initrd: &[u8], mem: &mut W) -> Result<(), WriteError<W::Error>> {
    let planned = plan.module.map_or(0, |(_, len)| len);
    if planned != initrd.len() as u64 {
        return Err(WriteError::Mismatch { what: "initrd", planned, given: initrd.len() as u64 });
    }
    let zeros = [0u8; 4096];
    for s in plan.kernel.segments() {
        let bytes = plan.image.get(s.file_offset..s.file_offset.saturating_add(s.file_len)).unwrap_or(&[]);
        mem.write(s.gpa, bytes)?;
        // Guest memory may not be fresh: zero the bss explicitly.
        let mut at = s.gpa + bytes.len() as u64;
        while at < s.end() {
            let n = (s.end() - at).min(zeros.len() as u64) as usize;
            mem.write(at, zeros.get(..n).unwrap_or(&[]))?;
            at += n as u64;
        }
    }
    mem.write(plan.info_gpa, &info(plan))?;
    mem.write(CMDLINE_GPA, plan.cmdline)?;
    mem.write(CMDLINE_GPA + plan.cmdline.len() as u64, &[0])?;
    mem.write(super::GDT_GPA, &gdt_bytes())?;
    if let Some((gpa, _)) = plan.module {
        mem.write(gpa, initrd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::testing::{VecMemory, XorShift};
    use crate::firmware::{CpuMode, selector};
    use alloc::string::ToString;
    use alloc::vec::Vec;

    const MIB: u64 = 1 << 20;

    fn header(flags: u32, addrs: Option<[u32; 5]>) -> Vec<u8> {
        let mut h = Vec::new();
        for w in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        for w in addrs.into_iter().flatten() {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h
    }

    /// An a.out-kludge image: 0x40 bytes of padding, the header at 0x40, code, loaded
    /// at 1 MiB with 0x1000 bytes of bss.
    fn aout_image() -> Vec<u8> {
        let mut img = alloc::vec![0x90u8; 0x40];
        let load = 0x10_0000u32;
        let len = 0x200u32;
        img.extend(header(
            header_flags::AOUT_KLUDGE | header_flags::PAGE_ALIGN | header_flags::MEMORY_INFO,
            Some([load + 0x40, load, load + len, load + len + 0x1000, load + 0x80]),
        ));
        img.resize(len as usize, 0xf4);
        img
    }

    /// An ELF32 image: header, one PT_LOAD at 2 MiB (linked at 0xC0200000), and the
    /// multiboot header at the start of the segment.
    fn elf_image() -> Vec<u8> {
        let mut e = alloc::vec![0u8; 0x100];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 1; // 32-bit
        e[5] = 1; // little-endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        e[24..28].copy_from_slice(&0xc020_0010u32.to_le_bytes()); // e_entry (virtual)
        e[28..32].copy_from_slice(&0x34u32.to_le_bytes()); // e_phoff
        e[42..44].copy_from_slice(&32u16.to_le_bytes());
        e[44..46].copy_from_slice(&2u16.to_le_bytes());
        let ph = 0x34;
        let words = [1u32, 0x100, 0xc020_0000, 0x20_0000, 0x100, 0x2000, 5, 0x1000];
        for (i, w) in words.iter().enumerate() {
            e[ph + 4 * i..ph + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        // A PT_NOTE that must be skipped.
        e[ph + 32..ph + 36].copy_from_slice(&4u32.to_le_bytes());
        e.extend(header(header_flags::MEMORY_INFO, None));
        e.resize(0x200, 0xf4);
        e
    }

    #[test]
    fn finds_the_header_and_aout_addresses() {
        let k = parse(&aout_image()).unwrap();
        assert_eq!(k.header.offset, 0x40);
        assert_eq!(k.segments(), [Segment { file_offset: 0, file_len: 0x200, gpa: 0x10_0000, mem_len: 0x1200 }]);
        assert_eq!(k.entry, 0x10_0080);
        // load_end_addr 0: to the end of the file; bss_end_addr 0: no bss.
        let mut img = alloc::vec![0u8; 0x20];
        img.extend(header(header_flags::AOUT_KLUDGE, Some([0x20_0020, 0x20_0000, 0, 0, 0x20_0000])));
        img.resize(0x300, 0);
        assert_eq!(
            parse(&img).unwrap().segments()[0],
            Segment { file_offset: 0, file_len: 0x300, gpa: 0x20_0000, mem_len: 0x300 }
        );
    }

    #[test]
    fn loads_elf32_at_physical_addresses() {
        let k = parse(&elf_image()).unwrap();
        assert_eq!(k.segments(), [Segment { file_offset: 0x100, file_len: 0x100, gpa: 0x20_0000, mem_len: 0x2000 }]);
        assert_eq!(k.entry, 0x20_0010, "e_entry translated to its physical address");
        assert_eq!(k.header.offset, 0x100);
    }

    #[test]
    fn plans_info_and_entry() {
        let img = elf_image();
        let initrd = alloc::vec![0x5au8; 5000];
        let p = plan(&img, 32 * MIB, b"root=/dev/ram0", initrd.len() as u64).unwrap();
        let e = p.entry;
        assert_eq!((e.mode, e.rip, e.rax, e.rbx), (CpuMode::Protected32, 0x20_0010, 0x2bad_b002, MULTIBOOT_INFO_GPA));
        assert_eq!((e.cs, e.ds, e.cr0 & (1 << 31)), (selector::CODE32, selector::DATA, 0), "paging off");
        assert_eq!(p.module, Some(((32 * MIB - 5000) & !0xfff, 5000)));

        let mut mem = VecMemory::new(32 << 20);
        mem.0[0x20_1000..0x20_2000].fill(0xee); // stale bytes where the bss goes
        write(&p, &initrd, &mut mem).unwrap();
        let i = MULTIBOOT_INFO_GPA;
        let flags = mem.u32(i);
        assert_eq!(flags, 0x1 | 0x4 | 0x8 | 0x40 | 0x200);
        assert_eq!((mem.u32(i + 4), mem.u32(i + 8)), (639, 31 * 1024), "mem_lower, mem_upper in KiB");
        assert_eq!(mem.slice(mem.u32(i + 16) as u64, 15), b"root=/dev/ram0\0");
        assert_eq!(mem.u32(i + 20), 1, "mods_count");
        let m = mem.u32(i + 24) as u64;
        assert_eq!((mem.u32(m), mem.u32(m + 4)), (p.module.unwrap().0 as u32, p.module.unwrap().0 as u32 + 5000));
        assert_eq!(mem.slice(mem.u32(m + 8) as u64, 7), b"initrd\0");
        assert_eq!(mem.slice(p.module.unwrap().0, 5000), &initrd[..]);
        // mmap: 5 entries of 24 bytes, each with size 20 first.
        let (len, addr) = (mem.u32(i + 44) as u64, mem.u32(i + 48) as u64);
        assert_eq!(len, 5 * 24);
        let entries: Vec<(u64, u64, u32)> =
            (0..5).map(|n| addr + 24 * n).map(|o| (mem.u64(o + 4), mem.u64(o + 12), mem.u32(o + 20))).collect();
        assert!((0..5).all(|n| mem.u32(addr + 24 * n) == 20));
        assert_eq!(entries[0], (0, 0x9fc00, 1));
        assert_eq!(entries[2], (0xe0000, 0x10000, 3));
        assert_eq!(entries[4], (MIB, 31 * MIB, 1));
        assert_eq!(mem.slice(mem.u32(i + 64) as u64, 3), b"hv\0");
        // The segment, then zeroed bss.
        assert_eq!(mem.slice(0x20_0000, 0x100), &img[0x100..]);
        assert!(mem.slice(0x20_0100, 0x1f00).iter().all(|&b| b == 0), "bss zeroed");
        assert_eq!(mem.u64(crate::firmware::GDT_GPA + 8), crate::firmware::GDT[1]);
    }

    #[test]
    fn malformed_images_are_refused_with_the_reason() {
        let e = parse(&[0u8; 100]).unwrap_err();
        assert_eq!(e, MultibootError::NoHeader { searched: 100 });
        assert!(e.to_string().starts_with("no multiboot header"), "{e}");

        // Past the first 8192 bytes: not found.
        let mut far = alloc::vec![0u8; 8192];
        far.extend(header(0, None));
        assert_eq!(parse(&far).unwrap_err(), MultibootError::NoHeader { searched: 8192 });

        // Misaligned: not found.
        let mut odd = alloc::vec![0u8; 2];
        odd.extend(header(0, None));
        assert!(matches!(parse(&odd), Err(MultibootError::NoHeader { .. })));

        let mut bad = header(0, None);
        bad[8] ^= 1;
        let e = find_header(&bad).unwrap_err();
        assert_eq!(e, MultibootError::BadChecksum { offset: 0, sum: 1 });
        assert!(e.to_string().contains("bad checksum"), "{e}");

        let e = find_header(&header(header_flags::VIDEO_MODE, None)).unwrap_err();
        assert_eq!(e, MultibootError::UnsupportedFlags { flags: 4, unsupported: 4 });
        assert!(e.to_string().contains("video mode"), "{e}");
        assert!(matches!(find_header(&header(1 << 9, None)), Err(MultibootError::UnsupportedFlags { .. })));
        assert!(find_header(&header(1 << 20, None)).is_ok(), "optional bits are ignored");

        let cut = &header(header_flags::AOUT_KLUDGE, Some([0; 5]))[..20];
        assert_eq!(find_header(cut).unwrap_err(), MultibootError::HeaderTruncated { offset: 0, needed: 32 });
        let cut = &header(0, None)[..8];
        assert_eq!(find_header(cut).unwrap_err(), MultibootError::HeaderTruncated { offset: 0, needed: 12 });

        let aout = |addrs: [u32; 5]| {
            let mut img = header(header_flags::AOUT_KLUDGE, Some(addrs));
            img.resize(0x100, 0);
            parse(&img)
        };
        let reason = |r: Result<Kernel, MultibootError>| match r {
            Err(MultibootError::BadAddresses { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(aout([0x10_0000, 0x10_0010, 0, 0, 0x10_0000])), "load_addr is above header_addr");
        assert_eq!(reason(aout([0x10_0010, 0x10_0000, 0, 0, 0x10_0000])), "load_addr is before the start of the file");
        assert_eq!(
            reason(aout([0x10_0000, 0x10_0000, 0x10_1000, 0, 0x10_0000])),
            "load_end_addr is past the end of the file"
        );
        assert_eq!(reason(aout([0x10_0000, 0x10_0000, 0xf_0000, 0, 0x10_0000])), "load_end_addr is below load_addr");
        assert_eq!(
            reason(aout([0x10_0000, 0x10_0000, 0x10_0080, 0x10_0040, 0x10_0000])),
            "bss_end_addr is below the end of the loaded part"
        );
        assert_eq!(
            aout([0x10_0000, 0x10_0000, 0, 0, 0x30_0000]).unwrap_err(),
            MultibootError::EntryOutside { entry: 0x30_0000 }
        );

        // No kludge: must be ELF32.
        let mut not_elf = alloc::vec![0u8; 0x40];
        not_elf.extend(header(0, None));
        assert_eq!(parse(&not_elf).unwrap_err(), MultibootError::NotElf { reason: "no ELF magic" });
        let mut elf64 = elf_image();
        elf64[4] = 2;
        assert_eq!(parse(&elf64).unwrap_err(), MultibootError::NotElf { reason: "not a 32-bit little-endian ELF" });
        let mut seg = elf_image();
        seg[0x34 + 16..0x34 + 20].copy_from_slice(&0x3000u32.to_le_bytes()); // filesz > memsz
        assert_eq!(
            parse(&seg).unwrap_err(),
            MultibootError::BadSegment { index: 0, reason: "p_filesz is larger than p_memsz" }
        );
        let mut many = elf_image();
        many[44..46].copy_from_slice(&200u16.to_le_bytes());
        let e = parse(&many).unwrap_err();
        assert!(matches!(e, MultibootError::BadSegment { reason: "it is past the end of the file", .. }), "{e:?}");

        // Placement: below 1 MiB, beyond RAM.
        let mut low = alloc::vec![0u8; 0];
        low.extend(header(header_flags::AOUT_KLUDGE, Some([0x8000, 0x8000, 0, 0, 0x8000])));
        low.resize(0x100, 0);
        assert!(matches!(plan(&low, 32 * MIB, b"", 0), Err(MultibootError::KernelPlacement { start: 0x8000, .. })));
        let e = plan(&elf_image(), 2 * MIB, b"", 0).unwrap_err();
        assert_eq!(e, MultibootError::KernelPlacement { start: 0x20_0000, end: 0x20_2000, ram_end: 2 * MIB });
        let e = plan(&elf_image(), 4 * MIB, b"", 2 * MIB).unwrap_err();
        assert_eq!(e, MultibootError::ModuleDoesNotFit { len: 2 * MIB, lowest: 0x20_2000, limit: 4 * MIB });
        assert!(plan(&elf_image(), 4 * MIB, b"", 2 * MIB - 0x2000).is_ok());
    }

    #[test]
    fn fuzz_parse_and_plan_never_panic() {
        let seeds = [aout_image(), elf_image()];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut accepted = 0;
        for i in 0..100_000 {
            let mut img: Vec<u8> = if i % 10 == 0 {
                let mut v: Vec<u8> = (0..rng.below(2048)).map(|_| rng.next() as u8).collect();
                // A valid header at a random aligned place, so the checks after it run.
                let at = (rng.below(v.len() as u64 / 4 + 1) * 4) as usize;
                let h = header(rng.next() as u32 & 0x1_0003, Some([rng.next() as u32; 5]));
                v.splice(at..at, h);
                v
            } else {
                seeds[i % 2].clone()
            };
            for _ in 0..rng.below(6) {
                let at = if rng.below(2) == 0 { rng.below(0x140) } else { rng.below(img.len() as u64 + 1) };
                if let Some(b) = img.get_mut(at as usize) {
                    *b = rng.next() as u8;
                }
            }
            if rng.below(8) == 0 {
                img.truncate(rng.below(img.len() as u64 + 1) as usize);
            }
            if let Ok(k) = parse(&img) {
                accepted += 1;
                for s in k.segments() {
                    assert!(s.file_offset + s.file_len <= img.len());
                }
                let ram = [0, 2 * MIB, 64 * MIB, u64::MAX][rng.below(4) as usize];
                if let Ok(p) = plan(&img, ram, b"x", [0, 1, rng.next()][rng.below(3) as usize]) {
                    let _ = info(&p);
                }
            }
        }
        assert!(accepted > 1000, "enough valid images to exercise plan ({accepted})");
    }
}
