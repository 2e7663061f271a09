//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst, zero-page.rst): read
//! a bzImage's setup header, plan where the kernel, zero page, command line and
//! initrd go, build the zero page (`struct boot_params`) and write it all into guest
//! memory, and give the vCPU state for the 64-bit entry.
//!
//! Only bzImages with the 64-bit entry are accepted (protocol 2.12+, `xloadflags`
//! XLF_KERNEL_64): the real-mode setup code never runs; the protected-mode kernel is
//! entered at its load address + 0x200 in long mode with an identity map, RSI = the
//! zero page ("64-bit Boot Protocol"). The header parser never panics on any input
//! and says what is wrong with an image it refuses. Not here: the 16-bit and 32-bit
//! entries, EFI handover, `setup_data`, decompressing anything.

use core::fmt;

use super::e820::{self, E820Error, E820Map};
use super::{
    CMDLINE_BYTES, CMDLINE_GPA, EntryState, GuestWrite, HIGH_MEMORY_GPA, WriteError, ZERO_PAGE_GPA, align_up,
    gdt_bytes, identity_map_4g, le_u8, le_u16, le_u32, le_u64, put,
};

/// "HdrS" at 0x202 (boot.rst: header).
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// 0xAA55 at 0x1FE (boot.rst: boot_flag).
pub const BOOT_FLAG: u16 = 0xaa55;
/// The oldest protocol with `xloadflags` (boot.rst: Protocol 2.12).
pub const MIN_VERSION: u16 = 0x020c;
/// The most setup sectors there can be: the real-mode code is at most 32 KiB,
/// boot sector included (boot.rst "The Real-Mode Kernel Header").
pub const MAX_SETUP_SECTS: u8 = 63;
/// loadflags bit 0 (boot.rst: loadflags): the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 0x01;
/// loadflags bit 7: heap_end_ptr is valid.
pub const CAN_USE_HEAP: u8 = 0x80;
/// xloadflags bit 0 (boot.rst: xloadflags): the legacy 64-bit entry at 0x200 exists.
pub const XLF_KERNEL_64: u16 = 0x01;
/// type_of_loader for a loader without an assigned id (boot.rst: type_of_loader).
pub const LOADER_UNDEFINED: u8 = 0xff;
/// The end of the room `boot_params` has for the setup header (zero-page.rst: the
/// header starts at 0x1F1, `edd_mbr_sig_buffer` at 0x290).
const HEADER_ROOM_END: usize = 0x290;
/// The header must reach at least past `init_size` (0x260/4), the last field we read.
const HEADER_MIN_END: usize = 0x264;

/// Offsets in the setup header and the zero page (boot.rst "The Real-Mode Kernel
/// Header" table; zero-page.rst), relative to the start of the image / zero page.
mod off {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const VID_MODE: usize = 0x1fa;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const MIN_ALIGNMENT: usize = 0x235;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const HARDWARE_SUBARCH: usize = 0x23c;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2d0;
}

/// What the setup header says (the fields a 64-bit loader needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// setup_sects, with 0 read as 4 (boot.rst note (1)).
    pub setup_sects: u8,
    /// syssize: the protected-mode code in 16-byte paragraphs.
    pub syssize: u32,
    /// Boot protocol version, (major << 8) | minor.
    pub version: u16,
    /// loadflags.
    pub loadflags: u8,
    /// initrd_addr_max: the highest byte an initrd may occupy.
    pub initrd_addr_max: u32,
    /// kernel_alignment.
    pub kernel_alignment: u32,
    /// relocatable_kernel.
    pub relocatable: bool,
    /// min_alignment (a power of two).
    pub min_alignment: u8,
    /// xloadflags.
    pub xloadflags: u16,
    /// cmdline_size: the longest command line, without its NUL.
    pub cmdline_size: u32,
    /// pref_address.
    pub pref_address: u64,
    /// init_size: memory the kernel needs from its runtime start before it reads the map.
    pub init_size: u32,
    /// One past the setup header's last byte in the image (0x202 + the jump's offset byte).
    pub header_end: usize,
}

impl SetupHeader {
    /// Offset of the protected-mode kernel in the image: (setup_sects + 1) × 512.
    pub fn payload_offset(&self) -> usize {
        (usize::from(self.setup_sects) + 1) * 512
    }
}

/// Why a kernel was refused or could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxError {
    /// The image ends before a field the loader must read.
    TooShort {
        /// Image length.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// boot_flag is not 0xAA55.
    BadBootFlag {
        /// What is there.
        found: u16,
    },
    /// No "HdrS" at 0x202.
    BadMagic {
        /// What is there.
        found: u32,
    },
    /// The protocol is older than 2.12.
    OldProtocol {
        /// The version found.
        version: u16,
    },
    /// The setup header ends before the fields a 64-bit loader reads.
    ShortHeader {
        /// Where it ends.
        end: usize,
    },
    /// Not a bzImage (loadflags LOADED_HIGH clear).
    NotBzImage {
        /// loadflags.
        loadflags: u8,
    },
    /// No 64-bit entry point (xloadflags XLF_KERNEL_64 clear).
    No64BitEntry {
        /// xloadflags.
        xloadflags: u16,
    },
    /// setup_sects is larger than the real-mode code can be, or leaves no kernel.
    SetupSects {
        /// setup_sects (0 read as 4).
        sects: u8,
        /// Image length.
        len: usize,
    },
    /// The image is shorter than syssize says.
    Truncated {
        /// Bytes syssize promises.
        syssize_bytes: u64,
        /// Bytes of protected-mode kernel in the image.
        have: u64,
    },
    /// A relocatable kernel's kernel_alignment is not a power of two.
    BadAlignment {
        /// kernel_alignment.
        alignment: u32,
    },
    /// The command line is longer than the kernel or our layout allows.
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most allowed, without the NUL.
        max: usize,
    },
    /// The command line contains a NUL byte (it would end there).
    CmdlineNul {
        /// Where.
        at: usize,
    },
    /// The kernel does not fit in the domain's RAM below the MMIO hole.
    KernelDoesNotFit {
        /// Where it would load.
        load: u64,
        /// Bytes it needs there (max of init_size and the image's payload).
        needs: u64,
        /// End of the RAM it must fit in.
        ram_end: u64,
    },
    /// The initrd does not fit between the kernel and initrd_addr_max / the end of RAM.
    InitrdDoesNotFit {
        /// Its length.
        len: u64,
        /// The lowest address it may start at (the kernel's end).
        lowest: u64,
        /// One past the highest byte it may occupy.
        limit: u64,
    },
    /// The domain's memory map could not be built.
    Memory(E820Error),
}

impl From<E820Error> for LinuxError {
    fn from(e: E820Error) -> Self {
        LinuxError::Memory(e)
    }
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LinuxError::TooShort { len, needed } => {
                write!(f, "the kernel image is {len} bytes, too short for a bzImage setup header ({needed} needed)")
            }
            LinuxError::BadBootFlag { found } => {
                write!(f, "not a Linux kernel: boot_flag at 0x1fe is {found:#06x}, not 0xaa55")
            }
            LinuxError::BadMagic { found } => {
                write!(f, "not a bzImage: the header magic at 0x202 is {found:#010x}, not \"HdrS\"")
            }
            LinuxError::OldProtocol { version } => write!(
                f,
                "the kernel speaks boot protocol {}.{:02}; 2.12 or later is needed for the 64-bit entry",
                version >> 8,
                version & 0xff
            ),
            LinuxError::ShortHeader { end } => {
                write!(f, "the setup header ends at {end:#x}, before init_size (0x260..0x264)")
            }
            LinuxError::NotBzImage { loadflags } => {
                write!(f, "not a bzImage: loadflags {loadflags:#04x} lacks LOADED_HIGH")
            }
            LinuxError::No64BitEntry { xloadflags } => {
                write!(f, "the kernel has no 64-bit entry point (xloadflags {xloadflags:#06x} lacks XLF_KERNEL_64)")
            }
            LinuxError::SetupSects { sects, len } => write!(
                f,
                "setup_sects {sects} is out of range for a {len}-byte image (at most {MAX_SETUP_SECTS}, with a kernel after it)"
            ),
            LinuxError::Truncated { syssize_bytes, have } => write!(
                f,
                "the image is truncated: syssize promises {syssize_bytes} bytes of kernel but only {have} follow the setup code"
            ),
            LinuxError::BadAlignment { alignment } => {
                write!(f, "the relocatable kernel's kernel_alignment {alignment:#x} is not a power of two")
            }
            LinuxError::CmdlineTooLong { len, max } => {
                write!(f, "the command line is {len} bytes; at most {max} are allowed")
            }
            LinuxError::CmdlineNul { at } => write!(f, "the command line has a NUL byte at {at}"),
            LinuxError::KernelDoesNotFit { load, needs, ram_end } => write!(
                f,
                "the kernel needs {needs:#x} bytes at {load:#x} but RAM below the MMIO hole ends at {ram_end:#x}"
            ),
            LinuxError::InitrdDoesNotFit { len, lowest, limit } => write!(
                f,
                "an initrd of {len:#x} bytes does not fit between the kernel's end {lowest:#x} and {limit:#x}"
            ),
            LinuxError::Memory(e) => write!(f, "memory map: {e}"),
        }
    }
}

/// Read and check the setup header of a bzImage. Never panics.
pub fn parse_header(image: &[u8]) -> Result<SetupHeader, LinuxError> {
    let short = |needed: usize| LinuxError::TooShort { len: image.len(), needed };
    let u8_at = |o: usize| le_u8(image, o).ok_or(short(o + 1));
    let u16_at = |o: usize| le_u16(image, o).ok_or(short(o + 2));
    let u32_at = |o: usize| le_u32(image, o).ok_or(short(o + 4));

    let boot_flag = u16_at(off::BOOT_FLAG)?;
    if boot_flag != BOOT_FLAG {
        return Err(LinuxError::BadBootFlag { found: boot_flag });
    }
    let magic = u32_at(off::HEADER)?;
    if magic != HDRS_MAGIC {
        return Err(LinuxError::BadMagic { found: magic });
    }
    let version = u16_at(off::VERSION)?;
    if version < MIN_VERSION {
        return Err(LinuxError::OldProtocol { version });
    }
    // boot.rst "32-bit Boot Protocol": the header ends at 0x202 + the byte at 0x201.
    let header_end = off::HEADER + usize::from(u8_at(off::JUMP + 1)?);
    if header_end < HEADER_MIN_END {
        return Err(LinuxError::ShortHeader { end: header_end });
    }
    if image.len() < header_end {
        return Err(short(header_end));
    }
    let loadflags = u8_at(off::LOADFLAGS)?;
    if loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::NotBzImage { loadflags });
    }
    let xloadflags = u16_at(off::XLOADFLAGS)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry { xloadflags });
    }
    let setup_sects = match u8_at(off::SETUP_SECTS)? {
        0 => 4,
        n => n,
    };
    let payload = (usize::from(setup_sects) + 1) * 512;
    if setup_sects > MAX_SETUP_SECTS || payload >= image.len() {
        return Err(LinuxError::SetupSects { sects: setup_sects, len: image.len() });
    }
    let syssize = u32_at(off::SYSSIZE)?;
    let have = (image.len() - payload) as u64;
    let syssize_bytes = u64::from(syssize) * 16;
    // syssize is the payload rounded up to a paragraph (boot.rst: syssize).
    if have + 15 < syssize_bytes {
        return Err(LinuxError::Truncated { syssize_bytes, have });
    }
    let relocatable = u8_at(off::RELOCATABLE_KERNEL)? != 0;
    let kernel_alignment = u32_at(off::KERNEL_ALIGNMENT)?;
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(LinuxError::BadAlignment { alignment: kernel_alignment });
    }
    Ok(SetupHeader {
        setup_sects,
        syssize,
        version,
        loadflags,
        initrd_addr_max: u32_at(off::INITRD_ADDR_MAX)?,
        kernel_alignment,
        relocatable,
        min_alignment: u8_at(off::MIN_ALIGNMENT)?,
        xloadflags,
        cmdline_size: u32_at(off::CMDLINE_SIZE)?,
        pref_address: le_u64(image, off::PREF_ADDRESS).ok_or(short(off::PREF_ADDRESS + 8))?,
        init_size: u32_at(off::INIT_SIZE)?,
        header_end: header_end.min(HEADER_ROOM_END),
    })
}

/// Where everything goes, and how the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxPlan<'a> {
    /// The parsed header.
    pub header: SetupHeader,
    /// The whole image.
    pub image: &'a [u8],
    /// The command line (without NUL).
    pub cmdline: &'a [u8],
    /// The zero page.
    pub zero_page_gpa: u64,
    /// The command line.
    pub cmdline_gpa: u64,
    /// Where the protected-mode kernel is loaded.
    pub kernel_gpa: u64,
    /// One past the memory the kernel needs at start (load + max(init_size, payload)).
    pub kernel_end: u64,
    /// The initrd (address, length), if any.
    pub initrd: Option<(u64, u64)>,
    /// The memory map given to the kernel.
    pub e820: E820Map,
    /// The 64-bit entry.
    pub entry: EntryState,
}

impl LinuxPlan<'_> {
    /// The protected-mode kernel's bytes in the image.
    pub fn payload(&self) -> &[u8] {
        self.image.get(self.header.payload_offset()..).unwrap_or(&[])
    }
}

/// Plan the boot of `image` in a domain of `ram_bytes` with `cmdline` and an initrd of
/// `initrd_len` bytes (0: none).
///
/// The kernel goes at `pref_address` if it fits there (a non-relocatable kernel moves
/// itself there anyway), else at 1 MiB rounded up to `kernel_alignment`; the initrd
/// as high as possible, page-aligned, below `initrd_addr_max` and the end of low RAM,
/// above the kernel's `init_size` footprint. Never panics.
pub fn plan<'a>(
    image: &'a [u8],
    ram_bytes: u64,
    cmdline: &'a [u8],
    initrd_len: u64,
) -> Result<LinuxPlan<'a>, LinuxError> {
    let header = parse_header(image)?;
    let e820 = e820::build(ram_bytes)?;
    let ram_end = e820.low_ram_end();

    let max = usize::try_from(header.cmdline_size).unwrap_or(usize::MAX).min(CMDLINE_BYTES as usize - 1);
    if cmdline.len() > max {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max });
    }
    if let Some(at) = cmdline.iter().position(|&b| b == 0) {
        return Err(LinuxError::CmdlineNul { at });
    }

    let payload_len = image.len().saturating_sub(header.payload_offset()) as u64;
    let needs = u64::from(header.init_size).max(payload_len);
    let fits = |load: u64| load >= HIGH_MEMORY_GPA && load.checked_add(needs).is_some_and(|end| end <= ram_end);
    let pref = header.pref_address;
    let load = if fits(pref) {
        pref
    } else if header.relocatable {
        align_up(HIGH_MEMORY_GPA, u64::from(header.kernel_alignment)).unwrap_or(u64::MAX)
    } else {
        // It runs at pref_address whatever we do; refuse rather than let it overrun RAM.
        if pref == 0 { HIGH_MEMORY_GPA } else { pref }
    };
    // A relocatable kernel loaded below pref_address still decompresses at
    // pref_address: x86-64's decompressor (arch/x86/boot/compressed/head_64.S) puts its
    // output at max(load address aligned up, LOAD_PHYSICAL_ADDR), and pref_address is
    // LOAD_PHYSICAL_ADDR. Its init_size footprint therefore starts there (a 64 MiB
    // domain of a kernel with 56 MiB init_size ran its decompressor's stack off the end
    // of RAM at 71.5 MiB instead of being refused).
    let runs_at = load.max(pref);
    if !fits(runs_at) {
        return Err(LinuxError::KernelDoesNotFit { load: runs_at, needs, ram_end });
    }
    let kernel_end = runs_at + needs;

    let initrd = if initrd_len == 0 {
        None
    } else {
        let limit = (u64::from(header.initrd_addr_max) + 1).min(ram_end);
        let lowest = align_up(kernel_end, 0x1000).unwrap_or(u64::MAX);
        let err = LinuxError::InitrdDoesNotFit { len: initrd_len, lowest, limit };
        let start = limit.checked_sub(initrd_len).ok_or(err)? & !0xfff;
        if start < lowest {
            return Err(err);
        }
        Some((start, initrd_len))
    };

    let mut entry = EntryState::long64(load + 0x200);
    entry.rsi = ZERO_PAGE_GPA;
    Ok(LinuxPlan {
        header,
        image,
        cmdline,
        zero_page_gpa: ZERO_PAGE_GPA,
        cmdline_gpa: CMDLINE_GPA,
        kernel_gpa: load,
        kernel_end,
        initrd,
        e820,
        entry,
    })
}

/// The zero page (`struct boot_params`, zero-page.rst) for `plan`, with the RSDP at
/// `rsdp_gpa` (0: none).
pub fn zero_page(plan: &LinuxPlan<'_>, rsdp_gpa: u64) -> [u8; 4096] {
    let mut zp = [0u8; 4096];
    // boot.rst "64-bit Boot Protocol": the setup header from 0x1F1 to its end, copied.
    let end = plan.header.header_end.min(plan.image.len());
    if let (Some(dst), Some(src)) = (zp.get_mut(off::SETUP_SECTS..end), plan.image.get(off::SETUP_SECTS..end)) {
        dst.copy_from_slice(src);
    }
    put(&mut zp, off::VID_MODE, &0xffffu16.to_le_bytes()); // "normal" (obligatory)
    put(&mut zp, off::TYPE_OF_LOADER, &[LOADER_UNDEFINED]);
    put(&mut zp, off::LOADFLAGS, &[plan.header.loadflags | LOADED_HIGH | CAN_USE_HEAP]);
    put(&mut zp, off::HEAP_END_PTR, &0xfe00u16.to_le_bytes());
    put(&mut zp, off::CODE32_START, &(plan.kernel_gpa as u32).to_le_bytes());
    let (rd_addr, rd_len) = plan.initrd.unwrap_or((0, 0));
    put(&mut zp, off::RAMDISK_IMAGE, &(rd_addr as u32).to_le_bytes());
    put(&mut zp, off::RAMDISK_SIZE, &(rd_len as u32).to_le_bytes());
    put(&mut zp, off::EXT_RAMDISK_IMAGE, &((rd_addr >> 32) as u32).to_le_bytes());
    put(&mut zp, off::EXT_RAMDISK_SIZE, &((rd_len >> 32) as u32).to_le_bytes());
    put(&mut zp, off::CMD_LINE_PTR, &(plan.cmdline_gpa as u32).to_le_bytes());
    put(&mut zp, off::EXT_CMD_LINE_PTR, &((plan.cmdline_gpa >> 32) as u32).to_le_bytes());
    put(&mut zp, off::HARDWARE_SUBARCH, &0u32.to_le_bytes()); // the default x86/PC
    put(&mut zp, off::ACPI_RSDP_ADDR, &rsdp_gpa.to_le_bytes());
    let map = plan.e820.as_slice();
    put(&mut zp, off::E820_ENTRIES, &[map.len() as u8]);
    for (i, e) in map.iter().enumerate() {
        put(&mut zp, off::E820_TABLE + 20 * i, &e.to_bytes());
    }
    zp
}

/// Write everything `plan` places (zero page, command line, GDT, identity map, kernel,
/// initrd) into guest memory. `initrd` must be as long as planned.
pub fn write<W: GuestWrite>(
    plan: &LinuxPlan<'_>,
    initrd: &[u8],
    rsdp_gpa: u64,
    mem: &mut W,
) -> Result<(), WriteError<W::Error>> {
    let planned = plan.initrd.map_or(0, |(_, len)| len);
    if planned != initrd.len() as u64 {
        return Err(WriteError::Mismatch { what: "initrd", planned, given: initrd.len() as u64 });
    }
    mem.write(plan.zero_page_gpa, &zero_page(plan, rsdp_gpa))?;
    mem.write(plan.cmdline_gpa, plan.cmdline)?;
    mem.write(plan.cmdline_gpa + plan.cmdline.len() as u64, &[0])?;
    mem.write(super::GDT_GPA, &gdt_bytes())?;
    for (gpa, table) in identity_map_4g() {
        mem.write(gpa, &table)?;
    }
    mem.write(plan.kernel_gpa, plan.payload())?;
    if let Some((gpa, _)) = plan.initrd {
        mem.write(gpa, initrd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::testing::{VecMemory, XorShift};
    use crate::firmware::{CpuMode, PML4_GPA};
    use alloc::string::ToString;
    use alloc::vec::Vec;

    const MIB: u64 = 1 << 20;

    /// A synthetic bzImage: `setup_sects` sectors of setup, then `payload` bytes of
    /// kernel, with the header fields of a typical x86-64 kernel.
    fn bzimage(setup_sects: u8, payload: usize) -> Vec<u8> {
        let setup = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
        let mut img = alloc::vec![0u8; setup + payload];
        img[off::SETUP_SECTS] = setup_sects;
        img[off::SYSSIZE..off::SYSSIZE + 4].copy_from_slice(&(payload.div_ceil(16) as u32).to_le_bytes());
        img[off::BOOT_FLAG..off::BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[off::JUMP] = 0xeb;
        img[off::JUMP + 1] = 0x6a; // header ends at 0x26c
        img[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrS");
        img[off::VERSION..off::VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[off::LOADFLAGS] = LOADED_HIGH;
        img[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[off::KERNEL_ALIGNMENT..off::KERNEL_ALIGNMENT + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        img[off::RELOCATABLE_KERNEL] = 1;
        img[off::MIN_ALIGNMENT] = 21;
        img[off::XLOADFLAGS..off::XLOADFLAGS + 2].copy_from_slice(&0x7fu16.to_le_bytes());
        img[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        img[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&0x80_0000u32.to_le_bytes());
        for (i, b) in img[setup..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        img
    }

    fn set32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn parses_a_synthetic_header() {
        let img = bzimage(27, 5000);
        let h = parse_header(&img).unwrap();
        assert_eq!(h.setup_sects, 27);
        assert_eq!(h.payload_offset(), 28 * 512);
        assert_eq!((h.version, h.xloadflags, h.cmdline_size), (0x020f, 0x7f, 2047));
        assert_eq!((h.pref_address, h.init_size, h.kernel_alignment), (0x100_0000, 0x80_0000, 0x20_0000));
        assert!(h.relocatable);
        assert_eq!(h.header_end, 0x26c);
        assert_eq!(parse_header(&bzimage(0, 100)).unwrap().setup_sects, 4, "0 means 4");
    }

    #[test]
    fn plans_and_writes_a_boot() {
        let img = bzimage(27, 5000);
        let initrd: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let p = plan(&img, 64 * MIB, b"console=ttyS0 panic=-1", initrd.len() as u64).unwrap();
        assert_eq!(p.kernel_gpa, 0x100_0000, "pref_address fits");
        assert_eq!(p.kernel_end, 0x180_0000, "init_size beyond it");
        assert_eq!(p.initrd, Some(((64 * MIB - 3000) & !0xfff, 3000)), "top of RAM, page-aligned");
        let e = p.entry;
        assert_eq!((e.mode, e.rip, e.rsi, e.cr3), (CpuMode::Long64, 0x100_0200, ZERO_PAGE_GPA, PML4_GPA));
        assert_eq!((e.cs, e.ds), (0x10, 0x18));

        let mut mem = VecMemory::new(64 << 20);
        write(&p, &initrd, 0xe0000, &mut mem).unwrap();
        let zp = ZERO_PAGE_GPA;
        assert_eq!(mem.slice(zp + 0x202, 4), b"HdrS", "header copied");
        assert_eq!(mem.slice(zp + 0x210, 2), [0xff, LOADED_HIGH | CAN_USE_HEAP]);
        assert_eq!(mem.u32(zp + 0x228), CMDLINE_GPA as u32);
        assert_eq!(mem.slice(CMDLINE_GPA, 23), b"console=ttyS0 panic=-1\0");
        assert_eq!(mem.u32(zp + 0x218), p.initrd.unwrap().0 as u32);
        assert_eq!(mem.u32(zp + 0x21c), 3000);
        assert_eq!((mem.u32(zp + 0xc0), mem.u32(zp + 0xc4), mem.u32(zp + 0xc8)), (0, 0, 0));
        assert_eq!(mem.u32(zp + 0x23c), 0, "hardware_subarch");
        assert_eq!(mem.u64(zp + 0x70), 0xe0000, "acpi_rsdp_addr");
        assert_eq!(mem.slice(zp + 0x1e8, 1), [5]);
        assert_eq!(mem.u64(zp + 0x2d0 + 4 * 20), MIB, "5th e820 entry: RAM from 1 MiB");
        assert_eq!(mem.u64(zp + 0x2d0 + 4 * 20 + 8), 63 * MIB);
        assert_eq!(mem.u32(zp + 0x2d0 + 4 * 20 + 16), 1);
        assert_eq!(mem.slice(zp + 0x1ef, 1), [0], "sentinel clear");
        assert_eq!(mem.slice(0x100_0000, 5000), &img[28 * 512..], "kernel at its load address");
        assert_eq!(mem.slice(p.initrd.unwrap().0, 3000), &initrd[..]);
        assert_eq!(mem.u64(PML4_GPA), 0xa003);
        assert_eq!(mem.u64(crate::firmware::GDT_GPA + 16), crate::firmware::GDT[2]);
        // Every piece is in e820 RAM and they do not overlap.
        let pieces = [
            (zp, zp + 4096),
            (CMDLINE_GPA, CMDLINE_GPA + 23),
            (p.kernel_gpa, p.kernel_end),
            (p.initrd.unwrap().0, p.initrd.unwrap().0 + 3000),
        ];
        for (i, a) in pieces.iter().enumerate() {
            assert!(p.e820.is_ram(a.0, a.1), "{a:x?} in RAM");
            for b in &pieces[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        // A different initrd than planned is refused before anything is written.
        let err = write(&p, &initrd[..10], 0, &mut VecMemory::new(0)).unwrap_err();
        assert_eq!(err, WriteError::Mismatch { what: "initrd", planned: 3000, given: 10 });
    }

    #[test]
    fn relocates_when_pref_address_does_not_fit() {
        let mut img = bzimage(4, 4096);
        // pref_address below 1 MiB: a relocatable kernel goes to 1 MiB rounded up.
        img[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&0x8_0000u64.to_le_bytes());
        let p = plan(&img, 32 * MIB, b"", 0).unwrap();
        assert_eq!(p.kernel_gpa, 2 * MIB, "1 MiB rounded up to kernel_alignment");
        assert_eq!(p.kernel_end, 2 * MIB + 0x80_0000);
        assert_eq!(p.initrd, None);
        // Relocatable but pref_address beyond RAM: its decompressor would still write
        // its output (and put its stack) at pref_address, so it is refused.
        img[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&(60 * MIB).to_le_bytes());
        let e = plan(&img, 32 * MIB, b"", 0).unwrap_err();
        assert_eq!(e, LinuxError::KernelDoesNotFit { load: 60 * MIB, needs: 0x80_0000, ram_end: 32 * MIB });
        // Not relocatable: it would run at pref_address, which is beyond RAM.
        img[off::RELOCATABLE_KERNEL] = 0;
        let e = plan(&img, 32 * MIB, b"", 0).unwrap_err();
        assert_eq!(e, LinuxError::KernelDoesNotFit { load: 60 * MIB, needs: 0x80_0000, ram_end: 32 * MIB });
        assert!(e.to_string().starts_with("the kernel needs 0x800000 bytes at 0x3c00000"), "{e}");
    }

    #[test]
    fn a_kernel_whose_init_size_overruns_ram_from_pref_address_is_refused() {
        // Debian's 6.12 cloud kernel: pref_address 16 MiB, init_size 0x37dc000 (55.9 MiB).
        let mut img = bzimage(4, 4096);
        set32(&mut img, off::INIT_SIZE, 0x37d_c000);
        let e = plan(&img, 64 * MIB, b"", 0x10_0000).unwrap_err();
        assert_eq!(e, LinuxError::KernelDoesNotFit { load: 16 * MIB, needs: 0x37d_c000, ram_end: 64 * MIB });
        assert!(e.to_string().starts_with("the kernel needs 0x37dc000 bytes at 0x1000000"), "{e}");
        let p = plan(&img, 80 * MIB, b"", 0x10_0000).unwrap();
        assert_eq!((p.kernel_gpa, p.kernel_end), (16 * MIB, 16 * MIB + 0x37d_c000));
        assert!(p.initrd.is_some_and(|(at, _)| at >= p.kernel_end), "the initrd above the footprint");
    }

    #[test]
    fn initrd_placement_limits() {
        let mut img = bzimage(4, 4096);
        // initrd_addr_max below the end of RAM caps it (highest byte 0x1fff_ffff).
        set32(&mut img, off::INITRD_ADDR_MAX, 0x1fff_ffff);
        let p = plan(&img, 1 << 30, b"", 0x1000).unwrap();
        assert_eq!(p.initrd, Some((0x2000_0000 - 0x1000, 0x1000)));
        // End of RAM caps it when lower.
        let p = plan(&img, 100 * MIB, b"", 0x1800).unwrap();
        assert_eq!(p.initrd, Some(((100 * MIB - 0x1800) & !0xfff, 0x1800)));
        // Memory above the MMIO hole is never used for it.
        set32(&mut img, off::INITRD_ADDR_MAX, u32::MAX);
        let p = plan(&img, 5 << 30, b"", 0x1000).unwrap();
        assert_eq!(p.initrd, Some((crate::firmware::MMIO_HOLE_GPA - 0x1000, 0x1000)));
        // Too big to fit above the kernel's init_size footprint.
        let e = plan(&img, 32 * MIB, b"", 32 * MIB).unwrap_err();
        assert_eq!(e, LinuxError::InitrdDoesNotFit { len: 32 * MIB, lowest: 0x180_0000, limit: 32 * MIB });
        let room = 32 * MIB - 0x180_0000;
        assert!(plan(&img, 32 * MIB, b"", room).is_ok(), "exactly the room left");
        assert!(plan(&img, 32 * MIB, b"", room + 1).is_err());
        assert!(plan(&img, 32 * MIB, b"", u64::MAX).is_err(), "no overflow");
    }

    #[test]
    fn command_line_limits() {
        let img = bzimage(4, 4096);
        let long = alloc::vec![b'a'; 2048];
        assert_eq!(plan(&img, 64 * MIB, &long, 0).unwrap_err(), LinuxError::CmdlineTooLong { len: 2048, max: 2047 });
        assert!(plan(&img, 64 * MIB, &long[..2047], 0).is_ok());
        assert_eq!(plan(&img, 64 * MIB, b"a\0b", 0).unwrap_err(), LinuxError::CmdlineNul { at: 1 });
        assert!(matches!(plan(&img, MIB, b"", 0), Err(LinuxError::Memory(_))));
    }

    #[test]
    fn malformed_headers_are_refused_with_the_reason() {
        let good = bzimage(4, 4096);
        let e = parse_header(&good[..0x100]).unwrap_err();
        assert_eq!(e, LinuxError::TooShort { len: 0x100, needed: 0x200 });
        assert!(e.to_string().contains("too short"), "{e}");

        let mut bad = good.clone();
        bad[off::BOOT_FLAG] = 0;
        assert!(matches!(parse_header(&bad), Err(LinuxError::BadBootFlag { found: 0xaa00 })));

        let mut bad = good.clone();
        bad[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrX");
        let e = parse_header(&bad).unwrap_err();
        assert!(matches!(e, LinuxError::BadMagic { .. }));
        assert!(e.to_string().contains("\"HdrS\""), "{e}");

        let mut bad = good.clone();
        bad[off::VERSION..off::VERSION + 2].copy_from_slice(&0x020bu16.to_le_bytes());
        let e = parse_header(&bad).unwrap_err();
        assert_eq!(e.to_string(), "the kernel speaks boot protocol 2.11; 2.12 or later is needed for the 64-bit entry");

        let mut bad = good.clone();
        bad[off::XLOADFLAGS] = 0x02;
        let e = parse_header(&bad).unwrap_err();
        assert_eq!(e, LinuxError::No64BitEntry { xloadflags: 0x02 });
        assert!(e.to_string().contains("XLF_KERNEL_64"), "{e}");

        let mut bad = good.clone();
        bad[off::LOADFLAGS] = 0;
        assert_eq!(parse_header(&bad).unwrap_err(), LinuxError::NotBzImage { loadflags: 0 });

        let mut bad = good.clone();
        bad[off::SETUP_SECTS] = 64;
        assert_eq!(parse_header(&bad).unwrap_err(), LinuxError::SetupSects { sects: 64, len: good.len() });
        let mut bad = good.clone();
        bad[off::SETUP_SECTS] = 20; // past the end of the image: no kernel left
        assert!(matches!(parse_header(&bad), Err(LinuxError::SetupSects { sects: 20, .. })));

        let mut bad = good.clone();
        bad[off::JUMP + 1] = 0x40;
        assert_eq!(parse_header(&bad).unwrap_err(), LinuxError::ShortHeader { end: 0x242 });

        let truncated = &good[..good.len() - 100];
        assert_eq!(parse_header(truncated).unwrap_err(), LinuxError::Truncated { syssize_bytes: 4096, have: 3996 });

        let mut bad = good.clone();
        set32(&mut bad, off::KERNEL_ALIGNMENT, 0x30_0000);
        assert_eq!(parse_header(&bad).unwrap_err(), LinuxError::BadAlignment { alignment: 0x30_0000 });
    }

    #[test]
    fn fuzz_parse_and_plan_never_panic() {
        let base = bzimage(4, 1024);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for i in 0..100_000 {
            let mut img =
                if i % 10 == 0 { (0..rng.below(4096)).map(|_| rng.next() as u8).collect() } else { base.clone() };
            // Mutate mostly inside the header, sometimes anywhere; sometimes truncate.
            for _ in 0..rng.below(8) {
                let at = if rng.below(4) == 0 { rng.below(img.len() as u64 + 1) } else { 0x1f0 + rng.below(0x80) };
                if let Some(b) = img.get_mut(at as usize) {
                    *b = rng.next() as u8;
                }
            }
            if rng.below(8) == 0 {
                img.truncate(rng.below(img.len() as u64 + 1) as usize);
            }
            if parse_header(&img).is_ok() {
                accepted += 1;
                let ram = [0, MIB, 3 * MIB, 64 * MIB, u64::MAX][rng.below(5) as usize];
                let initrd = [0, 1, 4096, u64::MAX, rng.next()][rng.below(5) as usize];
                if let Ok(p) = plan(&img, ram, b"console=ttyS0", initrd) {
                    let _ = zero_page(&p, 0);
                    assert!(p.kernel_end <= p.e820.low_ram_end());
                }
            }
        }
        assert!(accepted > 1000, "the mutations leave enough valid headers to exercise plan ({accepted})");
    }

    #[test]
    fn writes_acpi_and_a_boot_into_real_guest_memory() {
        use crate::firmware::acpi::{AcpiConfig, build};
        use crate::firmware::{ACPI_BYTES, ACPI_GPA, PoolWriter};
        use crate::mm::frames::testing::pool;
        use crate::mm::guest::GuestMemory;
        use crate::mm::nested::Npt;

        let mut p = pool(32 * 256 + 64);
        let mem = GuestMemory::<Npt>::new(&mut p, 32 * MIB, false).unwrap();
        let mut tables = alloc::vec![0u8; ACPI_BYTES as usize];
        let t = build(&AcpiConfig::default(), ACPI_GPA, &mut tables).unwrap();
        let img = bzimage(4, 4096);
        let pl = plan(&img, 32 * MIB, b"console=ttyS0", 4096).unwrap();
        {
            let mut w = PoolWriter { pool: &mut p, mem: &mem };
            GuestWrite::write(&mut w, ACPI_GPA, &tables[..t.bytes]).unwrap();
            write(&pl, &[7u8; 4096], t.rsdp_gpa, &mut w).unwrap();
        }
        let mut sig = [0u8; 8];
        let rsdp = mem.read_u64(&mut p, ZERO_PAGE_GPA + 0x70).unwrap();
        mem.read(&mut p, rsdp, &mut sig).unwrap();
        assert_eq!(&sig, b"RSD PTR ", "acpi_rsdp_addr points at the RSDP");
        let mut cmd = [0u8; 14];
        mem.read(&mut p, CMDLINE_GPA, &mut cmd).unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        let mut k = [0u8; 16];
        mem.read(&mut p, pl.kernel_gpa, &mut k).unwrap();
        assert_eq!(k[..], img[5 * 512..5 * 512 + 16]);
        // The kernel at pref_address (16 MiB, 8 MiB init_size), the initrd at the top.
        assert_eq!(pl.kernel_gpa, 16 * MIB);
        assert_eq!(pl.initrd, Some((32 * MIB - 4096, 4096)));
        mem.destroy(&mut p).unwrap();
    }

    /// A real kernel, if one is on this machine (never downloaded): its header parses
    /// and plans. Skipped when none is present.
    #[test]
    fn real_kernel_header_if_present() {
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        for dir in ["/work/main/target/linux", "/boot"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with("vmlinuz") || name == "bzImage" {
                        candidates.push(e.path());
                    }
                }
            }
        }
        let Some(path) = candidates.first() else {
            std::eprintln!("skipped: no bzImage in /work/main/target/linux or /boot");
            return;
        };
        let Ok(img) = std::fs::read(path) else {
            std::eprintln!("skipped: {} is not readable", path.display());
            return;
        };
        let h = parse_header(&img).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(h.version >= MIN_VERSION && h.xloadflags & XLF_KERNEL_64 != 0);
        let p = plan(&img, 512 * MIB, b"console=ttyS0", 0).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(p.entry.rip, p.kernel_gpa + 0x200);
    }
}
