//! A guest that does one forbidden thing, chosen by `mode=` on its command line:
//!
//! | mode | does | the hypervisor must |
//! |---|---|---|
//! | `virt-insn` | VMXON (Intel) / VMRUN (AMD) | inject #UD: the guest's handler exits with 100+6 |
//! | `msr-read` | RDMSR of an MSR outside the allow-list | inject #GP: exit 100+13 |
//! | `msr-write` | WRMSR to IA32_FEATURE_CONTROL | inject #GP: exit 100+13 |
//! | `oob-write` | maps and writes guest-physical memory beyond its RAM, reads it back | drop the write and read all ones, as an unclaimed MMIO page on a PC: exit 20 |
//! | `oob-read` | the same, reading only | read all ones: exit 21 |
//! | `mmio-rmw` | `add [p], eax` there (a read-modify-write the MMIO emulation does not implement) | stop the domain: "Add [...] is not emulated for MMIO" |
//! | `triple-fault` | INT3 with an empty IDT | stop the domain: "triple fault" |
//! | `flood` | prints lines forever | keep running; stop echoing its console to the log |
//!
//! It installs its own GDT and IDT first, so injected exceptions reach its handlers.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

use guest_kernels::{BootInfo, exit, guest_main, println, report};

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 3],
    idt: [[u64; 2]; 32],
}

static mut TABLES: Tables = Tables { gdt: [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff], idt: [[0; 2]; 32] };

unsafe extern "C" {
    static misbehave_ud: u8;
    static misbehave_gp: u8;
}

// #UD and #GP handlers: report the vector and exit (never return, so the frame and
// error code need no unwinding).
global_asm!(
    ".global misbehave_ud",
    "misbehave_ud:",
    "mov edi, 6",
    "jmp {fault}",
    ".global misbehave_gp",
    "misbehave_gp:",
    "mov edi, 13",
    "jmp {fault}",
    fault = sym fault,
);

extern "sysv64" fn fault(vector: u64) -> ! {
    report(b"fault", vector);
    exit(100 + vector)
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn install_tables() {
    let gate = |handler: u64| -> [u64; 2] {
        // 64-bit interrupt gate, selector 0x08, present, DPL0.
        let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        [low, handler >> 32]
    };
    // SAFETY: single-threaded guest; TABLES is only touched here, before any exception.
    unsafe {
        let t = &raw mut TABLES;
        (*t).idt[6] = gate(&raw const misbehave_ud as u64);
        (*t).idt[13] = gate(&raw const misbehave_gp as u64);
        let gdt = Pointer { limit: 23, base: (&raw const (*t).gdt) as u64 };
        let idt = Pointer { limit: (32 * 16 - 1) as u16, base: (&raw const (*t).idt) as u64 };
        asm!("lgdt [{}]", "lidt [{}]", in(reg) &gdt, in(reg) &idt);
    }
}

fn map_beyond_memory(info: &BootInfo) -> *mut u64 {
    // The loader's PD for the first GiB lives at PAGE_TABLES_GPA + 0x2000; add a 2 MiB
    // page at 1 GiB - 2 MiB, far beyond our RAM, and use it.
    let target: u64 = (1 << 30) - (2 << 20);
    assert!(target >= info.memory_bytes);
    let pd = (guest_abi::PAGE_TABLES_GPA + 0x2000) as *mut u64;
    // SAFETY: our own page directory, identity-mapped; flush the stale TLB entry.
    unsafe {
        pd.add(511).write_volatile(target | 0x83);
        asm!("invlpg [{}]", in(reg) target);
    }
    target as *mut u64
}

fn main(info: &BootInfo) -> u64 {
    let mode = info.cmdline().split_whitespace().find_map(|kv| kv.strip_prefix("mode=")).unwrap_or("");
    println!("misbehave: mode {mode}");
    install_tables();
    match mode {
        "virt-insn" => {
            if info.arch == guest_abi::Arch::Vmx as u32 {
                let region = 0u64;
                // SAFETY: deliberately forbidden: the hypervisor must inject #UD.
                unsafe { asm!("vmxon [{}]", in(reg) &region) };
            } else {
                // SAFETY: as above (RAX = a VMCB address that is never used).
                unsafe { asm!("vmrun rax", in("rax") 0x5000u64) };
            }
            println!("misbehave: {mode} returned without a fault");
            1
        }
        "msr-read" => {
            let (lo, hi): (u32, u32);
            // SAFETY: deliberately forbidden: the hypervisor must inject #GP.
            unsafe { asm!("rdmsr", in("ecx") 0xdead_beefu32, out("eax") lo, out("edx") hi) };
            println!("misbehave: rdmsr returned {hi:x}{lo:08x}");
            1
        }
        "msr-write" => {
            // SAFETY: deliberately forbidden: the hypervisor must inject #GP.
            unsafe { asm!("wrmsr", in("ecx") 0x3au32, in("eax") 5u32, in("edx") 0u32) };
            println!("misbehave: wrmsr returned");
            1
        }
        "oob-write" => {
            let p = map_beyond_memory(info);
            // SAFETY: deliberately outside guest RAM: an unclaimed MMIO page, whose
            // writes are dropped and reads return all ones.
            let v = unsafe {
                p.write_volatile(0x1234);
                p.read_volatile()
            };
            println!("misbehave: wrote beyond memory, read back {v:#x}");
            if v == u64::MAX { 20 } else { 1 }
        }
        "oob-read" => {
            let p = map_beyond_memory(info);
            // SAFETY: as above.
            let v = unsafe { p.read_volatile() };
            println!("misbehave: read {v:#x} beyond memory");
            if v == u64::MAX { 21 } else { 1 }
        }
        "mmio-rmw" => {
            let p = map_beyond_memory(info);
            // SAFETY: deliberately an instruction the MMIO emulation refuses: the
            // hypervisor must stop us.
            unsafe { asm!("add dword ptr [{}], eax", in(reg) p, in("eax") 1u32) };
            println!("misbehave: an add to MMIO returned");
            1
        }
        "triple-fault" => {
            let empty = Pointer { limit: 0, base: 0 };
            // SAFETY: deliberately fatal: no IDT, then an exception.
            unsafe { asm!("lidt [{}]", "int3", in(reg) &empty) };
            1
        }
        "flood" => {
            let mut n: u64 = 0;
            loop {
                println!("flood line {n}: the quick brown fox jumps over the lazy hypervisor");
                n += 1;
            }
        }
        _ => {
            println!("misbehave: unknown mode `{mode}`");
            2
        }
    }
}

guest_main!(main);
