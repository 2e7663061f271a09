//! Boot protocols in domain creation: which kind of kernel image a domain was given,
//! how it is placed in guest memory, and how each vCPU starts.
//!
//! | format | recognised by (checked in this order) | placed by | vCPUs start |
//! |---|---|---|---|
//! | Linux bzImage | `"HdrS"` at 0x202 and boot flag 0xAA55 at 0x1FE (boot.rst) | [`crate::firmware::linux`] | vCPU 0 at the 64-bit entry: long mode, identity map at [`crate::firmware::PML4_GPA`], CS 0x10, DS/ES/SS 0x18, RSI = zero page; the others wait for INIT/SIPI |
//! | multiboot v1 | a valid header (magic 0x1BADB002, checksum) at a 4-byte boundary in the first 8 KiB | [`crate::firmware::multiboot`] | vCPU 0 in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the information; the others wait for INIT/SIPI |
//! | ELF64 | `\x7fELF` with class 2 (64-bit) | [`loader`] (`guest_abi`) | every vCPU at the entry point, RDI = boot info, RSI = its index |
//!
//! A valid multiboot header wins over the file's format, as with GRUB (an ELF64 file
//! is a multiboot kernel through the header's a.out-kludge addresses); a file that is
//! not ELF64 but has the magic with a bad checksum or flags is refused with the
//! multiboot loader's reason; anything else is refused with the three formats named.
//!
//! For Linux and multiboot the domain also gets what a PC firmware leaves: ACPI tables
//! at [`crate::firmware::ACPI_GPA`] (a MADT with a local APIC per vCPU, APIC ID = vCPU index,
//! the I/O APIC at [`crate::firmware::IOAPIC_GPA`] with GSI base 0, ISA IRQ 0 → GSI 2 for the
//! PIT and the SCI on GSI 9; a FADT whose PM1a event/control, PM timer and reset
//! register are the ports of `devices::pm`), the e820 map of the domain's memory, and
//! for Linux the RSDP's address in the zero page. Guest memory is contiguous from GPA 0
//! while the layout puts the MMIO hole at 3 GiB, so these domains may have at most
//! 3 GiB (RAM above 4 GiB is not implemented) and are refused beyond that.
//!
//! Every byte goes through the domain's guest memory ([`crate::firmware::PoolWriter`]); the
//! images are borrowed, never copied on the heap. An application processor's start
//! state after INIT and a start-up IPI is [`sipi_snapshot`] (the scheduler loads it,
//! `domain::sched`). Not here: the control path's initrd upload.

use alloc::vec::Vec;

use crate::arch::state::{DescriptorTable, SegmentRegister, VcpuSnapshot};
use crate::arch::{GuestEntry, GuestRegs};
use crate::devices::{ioapic, pit, pm};
use crate::firmware::acpi::{self, AcpiConfig};
use crate::firmware::{
    ACPI_GPA, EntryState, GDT, GuestWrite, IOAPIC_GPA, LAPIC_GPA, MMIO_HOLE_GPA, PoolWriter, WriteError, linux,
    multiboot,
};
use crate::mm::MmError;
use crate::mm::frames::FramePool;
use crate::mm::guest::GuestMemory;
use crate::mm::nested::EntryFormat;

use super::RunState;
use super::loader::{self, BootParams, LoadError};

// The MADT's interrupt source override for the PIT is fixed in `acpi::build` (ISA IRQ 0
// → GSI 2), and its FADT block lengths and `\_S5` value are fixed there too: they must
// be what the device models implement.
const _: () = assert!(pit::PIT_GSI == 2);
const _: () = assert!(pm::SCI_GSI < 16 && pm::SCI_GSI != 0 && pm::SCI_GSI != 2);
const _: () = assert!(pm::PM1_EVT_LEN == 4 && pm::PM1_CNT_LEN == 2 && pm::PM_TMR_LEN == 4);
const _: () = assert!(acpi::S5_SLP_TYP == pm::SLP_TYP_S5);
const _: () = assert!(IOAPIC_GPA as u64 == ioapic::IOAPIC_BASE);
const _: () = assert!(LAPIC_GPA as u64 == crate::devices::lapic::DEFAULT_APIC_BASE);

/// Bytes of buffer for the ACPI tables: a MADT for [`super::config::MAX_VCPUS`] vCPUs
/// and the rest take well under 1 KiB.
const ACPI_BUFFER: usize = 4096;

/// IA32_PAT's power-on value (SDM Vol. 3A 13.12.4, Table 13-12): WB, WT, UC-, UC twice.
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
/// CR0.NE: VMX requires it (IA32_VMX_CR0_FIXED0 bit 5, SDM Vol. 3D A.7); a PC's
/// firmware leaves it set, and neither boot protocol asks for it clear.
const CR0_NE: u64 = 1 << 5;
/// DR6 and DR7 after reset (SDM Vol. 3B 19.2.3, 19.2.4).
const DR6_RESET: u64 = 0xffff_0ff0;
const DR7_RESET: u64 = 0x400;

/// The kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A `guest_abi` ELF64 kernel.
    Elf64,
    /// A Linux bzImage (64-bit boot protocol).
    BzImage,
    /// A multiboot v1 kernel.
    Multiboot,
}

impl ImageFormat {
    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Elf64 => "elf64",
            ImageFormat::BzImage => "bzimage",
            ImageFormat::Multiboot => "multiboot",
        }
    }
}

/// Tell the format of `image` from its contents (see the module table). Never panics.
pub fn detect(image: &[u8]) -> Result<ImageFormat, LoadError> {
    // boot.rst: boot_flag 0xAA55 at 0x1FE, the header magic "HdrS" at 0x202.
    let boot_flag = image.get(0x1fe..0x200).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if boot_flag == Some(linux::BOOT_FLAG) && image.get(0x202..0x206) == Some(&linux::HDRS_MAGIC.to_le_bytes()[..]) {
        return Ok(ImageFormat::BzImage);
    }
    // Multiboot 0.6.96 §3.1: the magic at a 4-byte boundary in the first 8192 bytes.
    // A valid header wins over the file's own format, as with GRUB: an ELF64 file can
    // be a multiboot kernel through the a.out kludge.
    let multiboot = multiboot::find_header(image);
    if multiboot.is_ok() {
        return Ok(ImageFormat::Multiboot);
    }
    // ELF magic and EI_CLASS = ELFCLASS64 (System V gABI, "ELF Identification").
    if image.get(..5) == Some(b"\x7fELF\x02".as_slice()) {
        return Ok(ImageFormat::Elf64);
    }
    // A header with a bad checksum or flags is still a multiboot image, refused later
    // with the multiboot loader's reason.
    if !matches!(multiboot, Err(multiboot::MultibootError::NoHeader { .. })) {
        return Ok(ImageFormat::Multiboot);
    }
    let mut head = [0u8; 4];
    for (dst, src) in head.iter_mut().zip(image) {
        *dst = *src;
    }
    Err(LoadError::UnknownFormat { len: image.len(), head })
}

/// How a loaded image's vCPUs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The `guest_abi` start (every vCPU).
    GuestAbi(loader::Start),
    /// A boot protocol's entry state (vCPU 0; the others wait for INIT/SIPI).
    Firmware(EntryState),
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// What it was.
    pub format: ImageFormat,
    /// How it starts.
    pub start: Start,
}

/// How one vCPU is created: the backend's 64-bit start, then (for a boot protocol)
/// the snapshot loaded over it, and the run state it begins in.
#[derive(Debug, Clone)]
pub(super) struct VcpuStart {
    /// What `Backend::create_vcpu` gets.
    pub entry: GuestEntry,
    /// The GPRs it starts with (replaced by the snapshot's, if there is one).
    pub regs: GuestRegs,
    /// The state to load with `Vcpu::load_state` after creation.
    pub snapshot: Option<VcpuSnapshot>,
    /// Whether it runs at once.
    pub run: RunState,
}

impl Loaded {
    /// How vCPU `index` starts, with the domain's nested page tables at `nested_root`.
    pub(super) fn vcpu_start(&self, index: u32, nested_root: u64) -> VcpuStart {
        match self.start {
            Start::GuestAbi(s) => {
                // guest_abi: every vCPU starts at the entry point with RDI = boot info,
                // RSI = its index, and its own 8 KiB of the stack area.
                let rsp = s.rsp - u64::from(index) * (loader::STACK_BYTES / 8);
                VcpuStart {
                    entry: GuestEntry { nested_root, cr3: s.cr3, rip: s.rip, rsp },
                    regs: GuestRegs { rdi: s.rdi, rsi: u64::from(index), ..GuestRegs::default() },
                    snapshot: None,
                    run: RunState::Runnable,
                }
            }
            Start::Firmware(e) => VcpuStart {
                // Overwritten by the snapshot on vCPU 0; the application processors do
                // not run until INIT/SIPI gives them a state.
                entry: GuestEntry { nested_root, cr3: e.cr3, rip: e.rip, rsp: e.rsp },
                regs: GuestRegs::default(),
                snapshot: (index == 0).then(|| entry_snapshot(&e)),
                run: if index == 0 { RunState::Runnable } else { RunState::WaitForSipi },
            },
        }
    }
}

/// What can be refused before any guest memory is taken: `kernel`'s format, an initrd
/// for a format that takes none, and more `memory` than the firmware layout can
/// describe.
pub fn check(kernel: &[u8], initrd: &[u8], memory: u64) -> Result<ImageFormat, LoadError> {
    let format = detect(kernel)?;
    match format {
        ImageFormat::Elf64 if !initrd.is_empty() => {
            Err(LoadError::InitrdNotTaken { format: "an ELF64 guest_abi kernel", len: initrd.len() })
        }
        ImageFormat::BzImage | ImageFormat::Multiboot if memory > MMIO_HOLE_GPA => {
            Err(LoadError::MemoryAboveHole { memory, limit: MMIO_HOLE_GPA })
        }
        _ => Ok(format),
    }
}

/// Place `kernel` (already [`check`]ed), `initrd` (empty: none) and what its boot
/// protocol needs in `mem`.
pub fn load<F: EntryFormat>(
    pool: &mut FramePool,
    mem: &GuestMemory<F>,
    kernel: &[u8],
    initrd: &[u8],
    params: BootParams<'_>,
) -> Result<Loaded, LoadError> {
    let format = check(kernel, initrd, mem.bytes())?;
    let start = match format {
        ImageFormat::Elf64 => Start::GuestAbi(loader::load(pool, mem, kernel, params)?),
        ImageFormat::BzImage | ImageFormat::Multiboot => {
            let mut w = PoolWriter { pool, mem };
            Start::Firmware(firmware_boot(format, mem.bytes(), kernel, initrd, &params, &mut w)?)
        }
    };
    Ok(Loaded { format, start })
}

/// The ACPI tables' description of a domain with `vcpus` vCPUs: the PC of
/// `devices::pc` (PM ports and SCI from `devices::pm`, the I/O APIC and local APIC at
/// their usual addresses).
pub fn acpi_config(vcpus: u32) -> AcpiConfig {
    AcpiConfig {
        vcpus,
        ioapic_id: 0,
        ioapic_addr: IOAPIC_GPA,
        lapic_addr: LAPIC_GPA,
        pm1a_evt: pm::PM1A_EVT_BLK,
        pm1a_cnt: pm::PM1A_CNT_BLK,
        pm_tmr: pm::PM_TMR_BLK,
        reset_port: pm::RESET_REG,
        reset_value: pm::RESET_VALUE,
        sci_irq: pm::SCI_GSI as u8, // below 16: asserted above
        no_vga: false,
    }
}

impl From<WriteError<MmError>> for LoadError {
    fn from(e: WriteError<MmError>) -> Self {
        match e {
            WriteError::Guest(e) => LoadError::Memory(e),
            WriteError::Mismatch { .. } => LoadError::Layout(alloc::format!("{e}")),
        }
    }
}

/// Plan a Linux or multiboot boot in `memory` bytes, then write the ACPI tables and
/// the protocol's pieces through `w`; the entry state of vCPU 0.
fn firmware_boot<W: GuestWrite<Error = MmError>>(
    format: ImageFormat,
    memory: u64,
    kernel: &[u8],
    initrd: &[u8],
    params: &BootParams<'_>,
    w: &mut W,
) -> Result<EntryState, LoadError> {
    let cmdline = params.cmdline.as_bytes();
    let initrd_len = initrd.len() as u64;
    let mut tables = Vec::new();
    tables.try_reserve_exact(ACPI_BUFFER).map_err(|_| LoadError::Memory(MmError::OutOfHeap { bytes: ACPI_BUFFER }))?;
    tables.resize(ACPI_BUFFER, 0);
    let t = acpi::build(&acpi_config(params.vcpus), ACPI_GPA, &mut tables).map_err(LoadError::Acpi)?;
    let tables = tables.get(..t.bytes).unwrap_or(&[]);
    // Each protocol plans first, so a refused image writes nothing.
    match format {
        ImageFormat::BzImage => {
            let p = linux::plan(kernel, memory, cmdline, initrd_len).map_err(LoadError::Linux)?;
            w.write(ACPI_GPA, tables)?;
            linux::write(&p, initrd, t.rsdp_gpa, w)?;
            Ok(p.entry)
        }
        _ => {
            let p = multiboot::plan(kernel, memory, cmdline, initrd_len).map_err(LoadError::Multiboot)?;
            w.write(ACPI_GPA, tables)?;
            multiboot::write(&p, initrd, w)?;
            Ok(p.entry)
        }
    }
}

/// The hidden part of the segment register loaded with `selector` from the GDT at
/// [`crate::firmware::GDT_GPA`] ([`crate::firmware::GDT`]), as the processor would cache it (SDM Vol.
/// 3A 3.4.3, 3.4.5): base, limit scaled by G, attributes in the snapshot's canonical
/// form, and the accessed bit set (the processor sets it when it loads a code or data
/// descriptor, 3.4.5.1; VMX's guest-state checks require it, SDM Vol. 3C 27.3.1.2).
/// The null selector gives an unusable segment (attributes 0).
pub fn gdt_segment(selector: u16) -> SegmentRegister {
    let d = GDT.get(usize::from(selector >> 3)).copied().unwrap_or(0);
    if selector < 8 || d == 0 {
        return SegmentRegister { selector, ..SegmentRegister::default() };
    }
    let mut access = (d >> 40) & 0xff;
    if access & (1 << 4) != 0 {
        access |= 1; // S = 1: code or data; set "accessed"
    }
    let flags = (d >> 52) & 0xf; // AVL, L, D/B, G
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let limit = if flags & 0x8 != 0 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
    SegmentRegister { selector, attributes: (access | (flags << 8)) as u16, limit: limit as u32, base }
}

/// vCPU 0's architectural state at a boot protocol's entry: `e`'s registers, control
/// registers and selectors, with what a processor after firmware holds for the rest:
/// - CR0 gets NE besides `e.cr0` (see [`CR0_NE`]);
/// - segments carry the hidden parts of their [`crate::firmware::GDT`] descriptors;
/// - TR is a busy TSS (type 11) at base 0, limit 0x67: VM entry needs a usable TR of
///   that type in IA-32e mode (type 3 or 11 otherwise; SDM Vol. 3C 27.3.1.2); SVM does
///   not check it. Neither protocol lets the kernel rely on TR; Linux loads its own.
/// - LDTR is unusable, the IDT empty (base 0, limit 0: interrupts are off and any
///   exception before the kernel's own IDT is a triple fault, as on hardware);
/// - PAT, DR6 and DR7 hold their power-on values, the SYSCALL/SYSENTER MSRs 0.
pub fn entry_snapshot(e: &EntryState) -> VcpuSnapshot {
    let data = gdt_segment(e.ds);
    VcpuSnapshot {
        regs: GuestRegs { rax: e.rax, rbx: e.rbx, rsi: e.rsi, ..GuestRegs::default() },
        rsp: e.rsp,
        rip: e.rip,
        rflags: e.rflags,
        cr0: e.cr0 | CR0_NE,
        cr2: 0,
        cr3: e.cr3,
        cr4: e.cr4,
        efer: e.efer,
        dr6: DR6_RESET,
        dr7: DR7_RESET,
        pat: PAT_POWER_ON,
        cs: gdt_segment(e.cs),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        // Present (0x80), system segment, type 11: busy 64-bit (or 32-bit) TSS.
        tr: SegmentRegister { selector: 0, attributes: 0x8b, limit: 0x67, base: 0 },
        ldtr: SegmentRegister::default(),
        gdtr: DescriptorTable { base: e.gdt_base, limit: e.gdt_limit },
        idtr: DescriptorTable { base: 0, limit: 0 },
        ..VcpuSnapshot::default()
    }
}

/// CR0 at power-up (SDM Vol. 3A 10.1, Table 10-1): CD, NW and ET. INIT keeps CD and
/// NW; an application processor that never ran holds their power-up values.
const CR0_POWER_UP: u64 = 0x6000_0010;
/// The hidden part of a real-mode segment after reset (Table 10-1, "Present, R/W,
/// Accessed"): type 3 (read/write data, accessed), S = 1, DPL 0, P, 16-bit, limit
/// 0xFFFF. Used for CS too, as the table gives it; VMX accepts CS type 3 in real mode
/// with "unrestricted guest" (SDM Vol. 3C 27.3.1.2: CS type 3, 9, 11, 13 or 15, DPL 0
/// for type 3), SVM does not check the attributes in real mode.
const REAL_MODE_DATA: u16 = 0x93;

/// The state a start-up IPI with `vector` gives an application processor waiting for
/// it (SDM Vol. 3A 9.4.4 "MP initialization", 10.1 Table 10-1 for the rest): real mode
/// at CS:IP = `vector << 8`:0 (CS.base = `vector << 12`), every data segment at base 0,
/// limit 0xFFFF; GDTR and IDTR base 0 limit 0xFFFF (the real-mode IVT); TR a busy TSS
/// (type 11: VMX requires type 3 or 11 outside IA-32e mode, 27.3.1.2) and LDTR an LDT
/// (type 2), both at base 0 limit 0xFFFF as after reset; RFLAGS 2, CR2/CR3/CR4 0,
/// EFER 0, DR6/DR7 and PAT at their reset values, EDX = `signature` (the processor
/// signature, CPUID.1:EAX, as Table 10-1 has it), every other GPR 0.
///
/// CR0 is the power-up 0x60000010 (CD, NW, ET) plus NE: VMX fixes NE to 1 even with
/// unrestricted guest, which frees only PE and PG (IA32_VMX_CR0_FIXED0, SDM Vol. 3C
/// 27.3.1.1, Appendix A.7). NE only selects native x87 error reporting (#MF rather
/// than FERR#), which no real-mode trampoline relies on, and Linux's trampoline loads
/// all of CR0 itself (`CR0_STATE`, with NE) when it enters protected mode. CD and NW
/// stay set as on hardware: the guest clears them when it programs CR0 (caching
/// disabled only costs the few instructions before that).
///
/// The MSRs beyond EFER and PAT (SYSENTER, STAR, ...) are 0: an INIT of a running
/// processor would keep them, but an OS brings an AP up by programming them again.
pub fn sipi_snapshot(vector: u8, signature: u32) -> VcpuSnapshot {
    let data = SegmentRegister { selector: 0, attributes: REAL_MODE_DATA, limit: 0xffff, base: 0 };
    let cs_selector = u16::from(vector) << 8;
    VcpuSnapshot {
        regs: GuestRegs { rdx: u64::from(signature), ..GuestRegs::default() },
        rsp: 0,
        rip: 0,
        rflags: 0x2,
        cr0: CR0_POWER_UP | CR0_NE,
        cr2: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
        dr6: DR6_RESET,
        dr7: DR7_RESET,
        pat: PAT_POWER_ON,
        cs: SegmentRegister { selector: cs_selector, base: u64::from(cs_selector) << 4, ..data },
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        // Present, system segment, type 11 (busy 32-bit TSS) / type 2 (LDT).
        tr: SegmentRegister { selector: 0, attributes: 0x8b, limit: 0xffff, base: 0 },
        ldtr: SegmentRegister { selector: 0, attributes: 0x82, limit: 0xffff, base: 0 },
        gdtr: DescriptorTable { base: 0, limit: 0xffff },
        idtr: DescriptorTable { base: 0, limit: 0xffff },
        ..VcpuSnapshot::default()
    }
}

#[cfg(test)]
mod tests;
