//! Host tests of the boot protocols in domain creation: format detection, the entry
//! snapshot, and whole domains created through [`Machine::create`] over a fake
//! backend whose vCPUs record the state loaded into them, with real guest memory.

use alloc::string::ToString;
use alloc::vec::Vec;

use super::*;
use crate::arch::state::VcpuSnapshot;
use crate::domain::config::DomainConfig;
use crate::domain::dirty::Mechanisms;
use crate::domain::testing::FakeBackend;
use crate::domain::{DomainError, Machine};
use crate::firmware::e820::E820Kind;
use crate::firmware::{CMDLINE_GPA, GDT_GPA, MULTIBOOT_INFO_GPA, PML4_GPA, SCRATCH_STACK_TOP, ZERO_PAGE_GPA};
use crate::mm::frames::testing::pool;

const MIB: u64 = 1 << 20;

/// A machine on a recorded EPYC with a test pool of `frames` frames.
fn machine(frames: usize) -> Machine<FakeBackend> {
    let text = include_str!("../../../../levelling/testdata/qemu-7.2-tcg-epyc.cpuid");
    let dump = levelling::parse_dump(text).expect("the recorded dump parses");
    let host = levelling::HostCpu::from_records(&dump.records).expect("the recorded CPU decodes");
    Machine::new(FakeBackend, pool(frames), host, None, Mechanisms { pml: false, dbit: true }, false)
}

fn config(memory: u64, vcpus: u32, cmdline: &str) -> DomainConfig {
    DomainConfig {
        name: "t".into(),
        kernel: "k".into(),
        initrd: None,
        memory,
        vcpus,
        cpuid: None,
        cmdline: cmdline.into(),
        cpus: None,
    }
}

/// A synthetic bzImage (boot.rst header fields of a typical x86-64 kernel): 5 sectors
/// of setup, then `payload` bytes of kernel; loads at 16 MiB, needs 8 MiB there.
fn bzimage(payload: usize) -> Vec<u8> {
    let setup = 5 * 512;
    let mut img = alloc::vec![0u8; setup + payload];
    let put = |img: &mut Vec<u8>, at: usize, bytes: &[u8]| img[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut img, 0x1f1, &[4]); // setup_sects
    put(&mut img, 0x1f4, &(payload.div_ceil(16) as u32).to_le_bytes()); // syssize
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut img, 0x200, &[0xeb, 0x6a]); // jump: the header ends at 0x26c
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020fu16.to_le_bytes());
    put(&mut img, 0x211, &[0x01]); // LOADED_HIGH
    put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut img, 0x234, &[1, 21]); // relocatable, min_alignment
    put(&mut img, 0x236, &0x7fu16.to_le_bytes()); // xloadflags
    put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut img, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut img, 0x260, &0x80_0000u32.to_le_bytes()); // init_size
    for (i, b) in img[setup..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    img
}

/// A multiboot a.out-kludge image: 0x40 bytes of padding, the header, code; loaded at
/// 1 MiB with 4 KiB of bss, entry at 1 MiB + 0x80.
fn multiboot_image() -> Vec<u8> {
    let mut img = alloc::vec![0x90u8; 0x40];
    let (load, len) = (0x10_0000u32, 0x200u32);
    let flags = (1 << 16) | 0x3;
    for w in [
        0x1bad_b002u32,
        flags,
        0u32.wrapping_sub(0x1bad_b002).wrapping_sub(flags),
        load + 0x40,
        load,
        load + len,
        load + len + 0x1000,
        load + 0x80,
    ] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.resize(len as usize, 0xf4);
    img
}

/// The smallest ELF64 header (the loader refuses it later; detection only looks at the
/// identification bytes).
fn elf64() -> Vec<u8> {
    let mut e = alloc::vec![0u8; 64];
    e[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    e
}

#[test]
fn detects_each_format_and_names_all_three_for_anything_else() {
    assert_eq!(detect(&bzimage(4096)), Ok(ImageFormat::BzImage));
    assert_eq!(detect(&elf64()), Ok(ImageFormat::Elf64));
    assert_eq!(detect(&multiboot_image()), Ok(ImageFormat::Multiboot));
    // A multiboot ELF32 kernel: the ELF magic alone does not make it a guest_abi kernel.
    let mut elf32 = multiboot_image();
    elf32[..5].copy_from_slice(b"\x7fELF\x01");
    assert_eq!(detect(&elf32), Ok(ImageFormat::Multiboot));
    // An ELF64 file with a valid multiboot header (a.out kludge) is a multiboot kernel.
    let mut elf_mb = multiboot_image();
    elf_mb[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    assert_eq!(detect(&elf_mb), Ok(ImageFormat::Multiboot));
    // A bad multiboot checksum is still multiboot (refused later with the reason),
    // except in an ELF64 file: that is a guest_abi kernel with a stray magic.
    let mut bad = multiboot_image();
    bad[0x48] ^= 1;
    assert_eq!(detect(&bad), Ok(ImageFormat::Multiboot));
    bad[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    assert_eq!(detect(&bad), Ok(ImageFormat::Elf64));
    // "HdrS" without the boot flag is not a bzImage.
    let mut no_flag = bzimage(4096);
    no_flag[0x1fe] = 0;
    assert!(matches!(detect(&no_flag), Err(LoadError::UnknownFormat { .. })));

    for garbage in [&b""[..], b"MZ\x90\x00 a PE file", &[0u8; 9000][..], b"\x7fELF"] {
        let e = detect(garbage).unwrap_err();
        assert!(matches!(e, LoadError::UnknownFormat { len, .. } if len == garbage.len()), "{e:?}");
        let text = e.to_string();
        for format in ["ELF64", "bzImage", "multiboot"] {
            assert!(text.contains(format), "{text}");
        }
    }
    assert_eq!(detect(b"MZ\x90\x00").unwrap_err(), LoadError::UnknownFormat { len: 4, head: [0x4d, 0x5a, 0x90, 0] });
}

#[test]
fn check_refuses_before_memory_is_taken() {
    let e = check(&elf64(), b"initrd", 16 * MIB).unwrap_err();
    assert_eq!(e, LoadError::InitrdNotTaken { format: "an ELF64 guest_abi kernel", len: 6 });
    assert!(e.to_string().starts_with("an initrd of 6 bytes was given, but an ELF64 guest_abi kernel takes none"));
    assert_eq!(check(&elf64(), b"", 4 << 30), Ok(ImageFormat::Elf64), "ELF guests may have more than 3 GiB");
    let e = check(&bzimage(4096), b"", (3 << 30) + MIB).unwrap_err();
    assert_eq!(e, LoadError::MemoryAboveHole { memory: (3 << 30) + MIB, limit: 3 << 30 });
    assert!(e.to_string().contains("MMIO hole at 3072 MiB"), "{e}");
    assert_eq!(check(&bzimage(4096), b"rd", 3 << 30), Ok(ImageFormat::BzImage));
    assert!(matches!(check(&multiboot_image(), b"", 4 << 30), Err(LoadError::MemoryAboveHole { .. })));
}

#[test]
fn gdt_segments_carry_their_descriptors_hidden_parts() {
    let code64 = gdt_segment(0x10);
    assert_eq!(code64, SegmentRegister { selector: 0x10, attributes: 0xa9b, limit: 0xffff_ffff, base: 0 });
    let code32 = gdt_segment(0x08);
    assert_eq!(code32, SegmentRegister { selector: 0x08, attributes: 0xc9b, limit: 0xffff_ffff, base: 0 });
    let data = gdt_segment(0x18);
    assert_eq!(data, SegmentRegister { selector: 0x18, attributes: 0xc93, limit: 0xffff_ffff, base: 0 });
    // The canonical form converts to the VMX access rights the VM-entry checks want:
    // accessed code type 11 / data type 3, S, P, and for 64-bit code L without D/B.
    assert_eq!(crate::arch::state::canonical_to_vmx_ar(code64.attributes), 0xa09b);
    assert_eq!(crate::arch::state::canonical_to_vmx_ar(data.attributes), 0xc093);
    assert_eq!(gdt_segment(0).attributes, 0, "null: unusable");
    assert_eq!(gdt_segment(0x40).attributes, 0, "beyond the GDT: unusable");
}

#[test]
fn snapshots_of_the_two_entry_states() {
    let mut l = EntryState::long64(0x100_0200);
    l.rsi = ZERO_PAGE_GPA;
    let s = entry_snapshot(&l);
    assert_eq!((s.rip, s.rsp, s.regs.rsi, s.rflags), (0x100_0200, SCRATCH_STACK_TOP, ZERO_PAGE_GPA, 0x2));
    assert_eq!(s.cr0, 0x8000_0031, "PG | NE | ET | PE");
    assert_eq!((s.cr3, s.cr4, s.efer), (PML4_GPA, 0x20, 0x500));
    assert_eq!((s.cs.selector, s.cs.attributes), (0x10, 0xa9b));
    for seg in [s.ds, s.es, s.ss, s.fs, s.gs] {
        assert_eq!((seg.selector, seg.attributes, seg.limit, seg.base), (0x18, 0xc93, 0xffff_ffff, 0));
    }
    assert_eq!(s.ss.attributes & crate::arch::state::ATTR_DPL, 0, "CPL 0");
    assert_eq!((s.tr.attributes, s.tr.limit), (0x8b, 0x67), "usable busy TSS");
    assert_eq!(s.ldtr.attributes & crate::arch::state::ATTR_PRESENT, 0, "LDTR unusable");
    assert_eq!((s.gdtr.base, s.gdtr.limit), (GDT_GPA, 31));
    assert_eq!((s.idtr.base, s.idtr.limit), (0, 0));
    assert_eq!((s.pat, s.dr6, s.dr7), (0x0007_0406_0007_0406, 0xffff_0ff0, 0x400));
    assert_eq!((s.interruptibility, s.pending_event), (0, None));
    assert_eq!(VcpuSnapshot::decode(&s.encode()), Ok(s.clone()), "a valid snapshot encoding");

    let mut p = EntryState::protected32(0x10_0080);
    p.rax = 0x2bad_b002;
    p.rbx = MULTIBOOT_INFO_GPA;
    let s = entry_snapshot(&p);
    assert_eq!((s.regs.rax, s.regs.rbx, s.rip), (0x2bad_b002, MULTIBOOT_INFO_GPA, 0x10_0080));
    assert_eq!(s.cr0, 0x31, "PE | ET | NE, paging off");
    assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
    assert_eq!((s.cs.selector, s.cs.attributes), (0x08, 0xc9b), "32-bit code: D/B, no L");
    assert_eq!((s.ds.selector, s.ss.selector), (0x18, 0x18));
}

#[test]
fn acpi_config_is_the_pc_of_the_device_models() {
    let c = acpi_config(3);
    assert_eq!(c.vcpus, 3);
    assert_eq!((c.pm1a_evt, c.pm1a_cnt, c.pm_tmr), (pm::PM1A_EVT_BLK, pm::PM1A_CNT_BLK, pm::PM_TMR_BLK));
    assert_eq!((c.reset_port, c.reset_value), (pm::RESET_REG, pm::RESET_VALUE));
    assert_eq!(u32::from(c.sci_irq), pm::SCI_GSI);
    assert_eq!((c.ioapic_addr, c.lapic_addr), (0xfec0_0000, 0xfee0_0000));
}

/// Read `len` bytes of domain 1's memory at `gpa`.
fn read(m: &mut Machine<FakeBackend>, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = alloc::vec![0u8; len];
    let (d, pool, _) = m.parts(0);
    d.mem.as_ref().unwrap().read(pool, gpa, &mut out).unwrap();
    out
}

fn u32_at(m: &mut Machine<FakeBackend>, gpa: u64) -> u32 {
    u32::from_le_bytes(read(m, gpa, 4).try_into().unwrap())
}

fn u64_at(m: &mut Machine<FakeBackend>, gpa: u64) -> u64 {
    u64::from_le_bytes(read(m, gpa, 8).try_into().unwrap())
}

#[test]
fn creating_a_bzimage_domain_writes_the_zero_page_and_acpi_and_starts_only_vcpu_0() {
    let mut m = machine(64 * 256 + 256);
    let img = bzimage(8192);
    let initrd: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8";
    let id = m.create(&config(64 * MIB, 2, cmdline), &img, &initrd).unwrap();
    assert_eq!(id, 1);

    let zp = ZERO_PAGE_GPA;
    assert_eq!(read(&mut m, zp + 0x202, 4), b"HdrS");
    // Command line pointer and the NUL-terminated line it points to.
    assert_eq!(u32_at(&mut m, zp + 0x228), CMDLINE_GPA as u32);
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    assert_eq!(read(&mut m, CMDLINE_GPA, line.len()), line);
    // The initrd: page-aligned at the top of the 64 MiB, its bytes there.
    let rd = u32_at(&mut m, zp + 0x218);
    assert_eq!(u64::from(rd), (64 * MIB - 5000) & !0xfff);
    assert_eq!(u32_at(&mut m, zp + 0x21c), 5000);
    assert_eq!(read(&mut m, u64::from(rd), 5000), initrd);
    // The e820 map of 64 MiB.
    let entries = read(&mut m, zp + 0x1e8, 1)[0];
    assert_eq!(entries, 5);
    let e820: Vec<(u64, u64, u32)> = (0..u64::from(entries))
        .map(|i| {
            let at = zp + 0x2d0 + 20 * i;
            (u64_at(&mut m, at), u64_at(&mut m, at + 8), u32_at(&mut m, at + 16))
        })
        .collect();
    assert_eq!(e820[0], (0, 0x9fc00, E820Kind::Ram as u32));
    assert_eq!(e820[2], (ACPI_GPA, 0x10000, E820Kind::Acpi as u32));
    assert_eq!(e820[4], (MIB, 63 * MIB, E820Kind::Ram as u32));
    // The RSDP: where acpi_rsdp_addr says, with the XSDT -> MADT listing both vCPUs.
    let rsdp = u64_at(&mut m, zp + 0x70);
    assert_eq!(rsdp, ACPI_GPA);
    assert_eq!(read(&mut m, rsdp, 8), b"RSD PTR ");
    let xsdt = u64_at(&mut m, rsdp + 24);
    let madt = u64_at(&mut m, xsdt + 36 + 8);
    assert_eq!(read(&mut m, madt, 4), b"APIC");
    let lapics = read(&mut m, madt + 44, 16);
    assert_eq!((lapics[0], lapics[3], lapics[8], lapics[11]), (0, 0, 0, 1), "LAPIC entries for APIC IDs 0 and 1");
    let fadt = u64_at(&mut m, xsdt + 36);
    assert_eq!(u32_at(&mut m, fadt + 56), u32::from(pm::PM1A_EVT_BLK));
    assert_eq!(u32_at(&mut m, fadt + 76), u32::from(pm::PM_TMR_BLK));
    // The kernel at pref_address, the identity map and the GDT.
    assert_eq!(read(&mut m, 16 * MIB, 16), img[5 * 512..5 * 512 + 16]);
    assert_eq!(u64_at(&mut m, PML4_GPA), 0xa003);
    assert_eq!(u64_at(&mut m, GDT_GPA + 16), crate::firmware::GDT[2]);

    // vCPU 0 got the 64-bit entry state; vCPU 1 waits for INIT/SIPI with nothing loaded.
    let d = m.dom(0);
    let bsp = d.vcpus[0].vcpu.loaded.as_ref().expect("vCPU 0's state was loaded");
    assert_eq!((bsp.rip, bsp.regs.rsi, bsp.cs.selector, bsp.efer), (16 * MIB + 0x200, zp, 0x10, 0x500));
    assert_eq!(d.vcpus[0].regs.rsi, zp, "the core's GPRs are the snapshot's");
    assert_eq!(d.vcpus[0].state, RunState::Runnable);
    assert_eq!(d.vcpus[1].state, RunState::WaitForSipi);
    assert!(d.vcpus[1].vcpu.loaded.is_none());
    assert_eq!(d.vcpus[1].vcpu.entry.nested_root, d.mem.as_ref().unwrap().root());
    assert!(m.has_runnable());
}

#[test]
fn creating_a_multiboot_domain_writes_the_information_and_enters_32_bit_mode() {
    let mut m = machine(16 * 256 + 128);
    let id = m.create(&config(16 * MIB, 1, "hello"), &multiboot_image(), b"module!").unwrap();
    assert_eq!(id, 1);
    let info = MULTIBOOT_INFO_GPA;
    let flags = u32_at(&mut m, info);
    assert_eq!(flags & 0x4d, 0x4d, "memory, cmdline, mods and mmap are valid ({flags:#x})");
    assert_eq!(u32_at(&mut m, info + 16), CMDLINE_GPA as u32);
    assert_eq!(read(&mut m, CMDLINE_GPA, 6), b"hello\0");
    assert_eq!(u32_at(&mut m, info + 20), 1, "one module");
    let module = u32_at(&mut m, info + 24);
    let start = u32_at(&mut m, u64::from(module));
    assert_eq!(read(&mut m, u64::from(start), 7), b"module!");
    assert_eq!(read(&mut m, 0x10_0080, 4), [0xf4; 4], "the kernel at its load address");
    assert_eq!(read(&mut m, ACPI_GPA, 8), b"RSD PTR ", "ACPI tables for multiboot too");
    let s = m.dom(0).vcpus[0].vcpu.loaded.clone().unwrap();
    assert_eq!((s.regs.rax, s.regs.rbx, s.rip, s.cr0, s.efer), (0x2bad_b002, info, 0x10_0080, 0x31, 0));
}

#[test]
fn refused_boots_give_the_reason_and_leave_no_memory_behind() {
    let mut m = machine(64 * 256 + 256);
    let free = m.pool().free_frames();
    let e = m.create(&config(16 * MIB, 1, ""), &elf64(), b"rd").unwrap_err();
    assert!(matches!(e, DomainError::Load(LoadError::InitrdNotTaken { .. })), "{e}");
    // Too little memory for the kernel's init_size at 16 MiB: the planner's reason.
    let e = m.create(&config(8 * MIB, 1, ""), &bzimage(4096), b"").unwrap_err();
    assert!(matches!(e, DomainError::Load(LoadError::Linux(_))), "{e}");
    assert!(e.to_string().starts_with("Linux bzImage: the kernel needs 0x800000 bytes"), "{e}");
    // A command line with a NUL, a multiboot image with a bad checksum.
    let e = m.create(&config(32 * MIB, 1, "a\0b"), &bzimage(4096), b"").unwrap_err();
    assert!(e.to_string().contains("NUL"), "{e}");
    let mut bad = multiboot_image();
    bad[0x48] ^= 1;
    let e = m.create(&config(16 * MIB, 1, ""), &bad, b"").unwrap_err();
    assert!(e.to_string().starts_with("multiboot kernel: the multiboot header at 0x40 has a bad checksum"), "{e}");
    let e = m.create(&config(16 * MIB, 1, ""), b"garbage", b"").unwrap_err();
    assert!(matches!(e, DomainError::Load(LoadError::UnknownFormat { len: 7, .. })), "{e}");
    assert_eq!(m.pool().free_frames(), free, "every refused domain's memory went back");
    assert!(m.domains().is_empty());
}
