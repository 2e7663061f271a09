//! The contract between the hypervisor and the guest kernels it starts: where a guest
//! starts, what it finds in the boot-info block, and the hypercalls it may make.
//!
//! # Start state
//! 64-bit long mode, CPL0, paging on with identity page tables (built by the loader
//! at [`PAGE_TABLES_GPA`]) covering all of guest memory with 2 MiB pages, and the
//! device window [`MMIO_WINDOW`] below 4 GiB (uncacheable), flat
//! segments, interrupts off, RSP = top of guest memory minus one page, RDI = guest-physical
//! address of the [`BootInfo`] block ([`BOOT_INFO_GPA`]), RIP = the ELF entry point.
//! Guest ELF segments must lie between [`KERNEL_MIN_GPA`] and the end of guest memory.
//!
//! # Hypercalls
//! `VMCALL` on Intel, `VMMCALL` on AMD ([`BootInfo::arch`] says which). RAX = number
//! ([`Hypercall`]), RDI, RSI = arguments; the result is returned in RAX
//! ([`HYPERCALL_OK`] or [`HYPERCALL_EINVAL`]).
//!
//! # Console
//! A 16550 UART at I/O port [`UART_PORT`]: bytes written to its transmit register go
//! to the domain's console ring (and the hypervisor's serial log, prefixed with the
//! domain id). Reads of its line-status register (port + 5) report "transmitter empty".
#![no_std]
#![forbid(unsafe_code)]

/// Guest-physical address of the boot-info block.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the loader's page tables (PML4, PDPT, PDs follow).
pub const PAGE_TABLES_GPA: u64 = 0x10000;
/// The PC's device window below 4 GiB that the loader's tables map (identity,
/// uncacheable 2 MiB pages): the I/O APIC at 0xFEC0_0000 and the local APIC at
/// 0xFEE0_0000 lie in it. Nothing is RAM there; accesses are MMIO exits.
pub const MMIO_WINDOW: core::ops::Range<u64> = 0xfe00_0000..0x1_0000_0000;
/// The local APIC's xAPIC page after reset (SDM Vol. 3A 11.4.1).
pub const LAPIC_GPA: u64 = 0xfee0_0000;
/// Lowest guest-physical address an ELF segment may occupy.
pub const KERNEL_MIN_GPA: u64 = 0x20_0000;
/// Where guest kernels are linked (see guests/kernels/link.ld).
pub const KERNEL_LINK_GPA: u64 = 0x20_0000;
/// The emulated UART's base port.
pub const UART_PORT: u16 = 0x3f8;
/// "HVBOOT01" little-endian: identifies a boot-info block.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"HVBOOT01");
/// Maximum command-line bytes.
pub const CMDLINE_MAX: usize = 256;

/// Which hypercall instruction to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Arch {
    /// Intel VMX: VMCALL (0F 01 C1).
    Vmx = 1,
    /// AMD SVM: VMMCALL (0F 01 D9).
    Svm = 2,
}

/// The block at [`BOOT_INFO_GPA`], `repr(C)`, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Layout version (1).
    pub version: u32,
    /// [`Arch`] as a number.
    pub arch: u32,
    /// The domain's id.
    pub domain_id: u32,
    /// vCPUs in the domain.
    pub vcpus: u32,
    /// Bytes of guest memory (from GPA 0).
    pub memory_bytes: u64,
    /// Bytes used in `cmdline`.
    pub cmdline_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The command line (UTF-8, not NUL-terminated).
    pub cmdline: [u8; CMDLINE_MAX],
}

impl BootInfo {
    /// Byte size of the block.
    pub const SIZE: usize = 8 + 4 * 4 + 8 + 4 + 4 + CMDLINE_MAX;

    /// The block as bytes (for the loader).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        let mut w = Writer { buf: &mut b, at: 0 };
        w.put(&self.magic.to_le_bytes());
        w.put(&self.version.to_le_bytes());
        w.put(&self.arch.to_le_bytes());
        w.put(&self.domain_id.to_le_bytes());
        w.put(&self.vcpus.to_le_bytes());
        w.put(&self.memory_bytes.to_le_bytes());
        w.put(&self.cmdline_len.to_le_bytes());
        w.put(&self.reserved.to_le_bytes());
        w.put(&self.cmdline);
        b
    }

    /// The command line as text (empty if it is not UTF-8).
    pub fn cmdline(&self) -> &str {
        let len = (self.cmdline_len as usize).min(CMDLINE_MAX);
        self.cmdline.get(..len).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("")
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.at..self.at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.at += bytes.len();
    }
}

/// Hypercall numbers (RAX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Hypercall {
    /// The guest is done: RDI = exit code (0 = success). The domain stops and keeps
    /// its console and counters until destroyed.
    Exit = 0,
    /// Report a test result: RDI = tag (an ASCII word packed little-endian into a
    /// u64, e.g. `tag(b"checksum")`), RSI = value. Logged as `DOMAIN <id> REPORT
    /// <tag>=<value>` and kept with the domain.
    Report = 1,
    /// Give up the rest of the time slice.
    Yield = 2,
    /// Start log-dirty mode for the whole domain: RDI = mode (0 auto, 1 pml, 2 dbit,
    /// 3 wp). RAX = the mode used, or EINVAL.
    DirtyStart = 3,
    /// Peek-and-clean the whole log: the hypervisor writes the bitmap (bit n = page n,
    /// little-endian u64 words) to guest-physical RDI, at most RSI bytes, and marks the
    /// pages it wrote dirty in the (now clean) log, as it does for all its own writes.
    /// RAX = dirty pages reported, or EINVAL.
    DirtyPeekClean = 4,
    /// Stop log-dirty mode. RAX = OK or EINVAL.
    DirtyStop = 5,
}

impl Hypercall {
    /// Decode RAX.
    pub fn from_u64(n: u64) -> Option<Self> {
        match n {
            0 => Some(Self::Exit),
            1 => Some(Self::Report),
            2 => Some(Self::Yield),
            3 => Some(Self::DirtyStart),
            4 => Some(Self::DirtyPeekClean),
            5 => Some(Self::DirtyStop),
            _ => None,
        }
    }
}

/// RAX after a successful hypercall.
pub const HYPERCALL_OK: u64 = 0;
/// RAX after an unknown hypercall or bad arguments.
pub const HYPERCALL_EINVAL: u64 = u64::MAX;

/// Pack up to 8 ASCII bytes into a report tag.
pub const fn tag(name: &[u8]) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < name.len() && i < 8 {
        v |= (name[i] as u64) << (8 * i);
        i += 1;
    }
    v
}

/// Unpack a report tag into its ASCII bytes (trailing zeros dropped).
pub fn tag_name(tag: u64) -> ([u8; 8], usize) {
    let b = tag.to_le_bytes();
    let len = b.iter().position(|&c| c == 0).unwrap_or(8);
    (b, len)
}

/// The memwriter guest's pattern and checksum, shared with the tests that check it.
pub mod memwriter {
    /// Word `word` of page `page` in round `round` (a 64-bit finalizer mix).
    pub const fn mix(seed: u64, round: u64, page: u64, word: u64) -> u64 {
        let mut x = seed ^ (round << 48) ^ (page << 16) ^ word;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// FNV-1a offset basis, the checksum's start value.
    pub const CHECKSUM_START: u64 = 0xcbf2_9ce4_8422_2325;

    /// Fold one word into a checksum (FNV-1a over whole words).
    pub const fn fold(sum: u64, word: u64) -> u64 {
        (sum ^ word).wrapping_mul(0x0000_0100_0000_01b3)
    }

    /// The checksum a round must produce: every word of every page, in order.
    pub fn round_checksum(seed: u64, round: u64, pages: u64) -> u64 {
        let mut sum = CHECKSUM_START;
        let mut page = 0;
        while page < pages {
            let mut word = 0;
            while word < 512 {
                sum = fold(sum, mix(seed, round, page, word));
                word += 1;
            }
            page += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_layout_is_fixed() {
        let mut info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: 1,
            arch: Arch::Svm as u32,
            domain_id: 3,
            vcpus: 2,
            memory_bytes: 64 << 20,
            cmdline_len: 5,
            reserved: 0,
            cmdline: [0; CMDLINE_MAX],
        };
        info.cmdline[..5].copy_from_slice(b"pages");
        let b = info.to_bytes();
        assert_eq!(BootInfo::SIZE, 296);
        assert_eq!(&b[..8], b"HVBOOT01");
        assert_eq!(&b[12..16], &2u32.to_le_bytes());
        assert_eq!(&b[16..20], &3u32.to_le_bytes());
        assert_eq!(&b[24..32], &(64u64 << 20).to_le_bytes());
        assert_eq!(&b[40..45], b"pages");
        assert_eq!(info.cmdline(), "pages");
        assert_eq!(core::mem::size_of::<BootInfo>(), BootInfo::SIZE);
    }

    #[test]
    fn tags_pack_and_unpack() {
        let t = tag(b"checksum");
        let (b, n) = tag_name(t);
        assert_eq!(&b[..n], b"checksum");
        let (b, n) = tag_name(tag(b"ok"));
        assert_eq!(&b[..n], b"ok");
        assert_eq!(Hypercall::from_u64(1), Some(Hypercall::Report));
        assert_eq!(Hypercall::from_u64(9), None);
    }

    #[test]
    fn memwriter_pattern_is_stable() {
        // Pinned values: the migration tests will compare memory against these.
        assert_eq!(memwriter::mix(1, 0, 0, 0), memwriter::mix(1, 0, 0, 0));
        assert_ne!(memwriter::mix(1, 0, 0, 0), memwriter::mix(2, 0, 0, 0));
        assert_ne!(memwriter::round_checksum(1, 0, 1), memwriter::round_checksum(1, 1, 1));
        assert_eq!(memwriter::round_checksum(7, 3, 0), memwriter::CHECKSUM_START);
    }
}
