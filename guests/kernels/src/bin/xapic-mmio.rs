//! A guest that reaches its local APIC in xAPIC mode through MMIO, as unmodified Linux
//! does without interrupt remapping: every access is a nested page fault the
//! hypervisor decodes and emulates. It uses several instruction forms on purpose:
//!
//! | report | instruction | expects |
//! |---|---|---|
//! | `base` | RDMSR IA32_APIC_BASE | 0xFEE00900 (enabled xAPIC, BSP) |
//! | `id` | `mov eax, [lapic+0x20]` | the APIC ID in bits 31:24 (0 for vCPU 0) |
//! | `version` | `mov eax, [lapic+0x30]` (RAX preset to ones) | 0x50014, upper half of RAX cleared |
//! | `verbyte` | `movzx ecx, byte [lapic+0x30]` | 0x14 |
//! | `verword` | `movzx rdx, word [lapic+0x32]` | 0x5 |
//! | `verhigh` | `mov ah, [lapic+0x30]` (RAX preset) | RAX with 0x14 in bits 15:8, the rest kept |
//! | `tpr` | `mov dword [lapic+0x80], 0x20` then `mov eax, [lapic+0x80]` | 0x20 |
//! | `tprreg` | `mov [lapic+0x80], ecx` (0x30) then `mov esi, [lapic+0x80]` | 0x30 |
//! | `none64` | `mov rax, [unclaimed]` | all ones (a page nothing claims reads as on a PC) |
//! | `nonesx` | `movsx eax, byte [unclaimed]` | 0xFFFFFFFF (sign-extended ones) |
//!
//! Each value is reported, and the guest exits 0 only if all match (else 1).
#![no_std]
#![no_main]

use core::arch::asm;

use guest_kernels::{BootInfo, guest_main, println, rdmsr, report};

/// The xAPIC page.
const LAPIC: u64 = guest_abi::LAPIC_GPA;
/// A page in the loader's device window that no device claims (HPET's on a PC; this
/// PC has none).
const UNCLAIMED: u64 = 0xfed0_0000;

fn main(_info: &BootInfo) -> u64 {
    let mut ok = true;
    let mut check = |name: &[u8], got: u64, want: u64| {
        report(name, got);
        if got != want {
            println!("xapic-mmio: {} = {got:#x}, expected {want:#x}", core::str::from_utf8(name).unwrap_or("?"));
            ok = false;
        }
    };
    check(b"base", rdmsr(0x1b), 0xfee0_0900);

    let (id, version, verhigh): (u64, u64, u64);
    let (verbyte, verword): (u64, u64);
    // SAFETY: the loader maps the device window identity and uncacheable; these are
    // reads of the xAPIC's ID and version registers, which have no side effects.
    unsafe {
        asm!("mov eax, dword ptr [{p} + 0x20]", p = in(reg) LAPIC, out("rax") id, options(nostack));
        asm!(
            "mov rax, -1",
            "mov eax, dword ptr [{p} + 0x30]",
            p = in(reg) LAPIC, out("rax") version, options(nostack)
        );
        asm!("movzx ecx, byte ptr [{p} + 0x30]", p = in(reg) LAPIC, out("rcx") verbyte, options(nostack));
        asm!("movzx rdx, word ptr [{p} + 0x32]", p = in(reg) LAPIC, out("rdx") verword, options(nostack));
        asm!(
            "mov rax, 0x1122334455667788",
            "mov ah, byte ptr [{p} + 0x30]",
            p = in(reg_abcd) LAPIC, out("rax") verhigh, options(nostack)
        );
    }
    check(b"id", id, 0);
    check(b"version", version, 0x5_0014);
    check(b"verbyte", verbyte, 0x14);
    check(b"verword", verword, 0x5);
    check(b"verhigh", verhigh, 0x1122_3344_5566_1488);

    let (tpr, tprreg): (u64, u64);
    // SAFETY: the task-priority register only gates interrupt delivery; interrupts are
    // off in this guest, and it is set back to 0 at the end.
    unsafe {
        asm!(
            "mov dword ptr [{p} + 0x80], 0x20",
            "mov eax, dword ptr [{p} + 0x80]",
            p = in(reg) LAPIC, out("rax") tpr, options(nostack)
        );
        asm!(
            "mov dword ptr [{p} + 0x80], ecx",
            "mov esi, dword ptr [{p} + 0x80]",
            "mov dword ptr [{p} + 0x80], 0",
            p = in(reg) LAPIC, in("ecx") 0x30u32, out("rsi") tprreg, options(nostack)
        );
    }
    check(b"tpr", tpr, 0x20);
    check(b"tprreg", tprreg, 0x30);

    let (none64, nonesx): (u64, u64);
    // SAFETY: a page nothing claims: reads return all ones and change nothing.
    unsafe {
        asm!("mov rax, qword ptr [{p}]", p = in(reg) UNCLAIMED, out("rax") none64, options(nostack));
        asm!("movsx eax, byte ptr [{p} + 0x10]", p = in(reg) UNCLAIMED, out("rax") nonesx, options(nostack));
    }
    check(b"none64", none64, u64::MAX);
    check(b"nonesx", nonesx, 0xffff_ffff);

    println!(
        "xapic-mmio: version {version:#x}, tpr {tpr:#x}, unclaimed {none64:#x}: {}",
        if ok { "ok" } else { "MISMATCH" }
    );
    u64::from(!ok)
}

guest_main!(main);
