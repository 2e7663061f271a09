//! A guest that takes local APIC timer interrupts: it switches its LAPIC to x2APIC
//! mode (MSRs, so no MMIO decoding is needed), programs the timer periodic at
//! `period_us=` (default 1000) on vector 0x40, and sleeps in `sti; hlt` until
//! `ticks=` (default 20) interrupts have arrived, each acknowledged with an EOI.
//!
//! Reports: `ticks` (interrupts taken), `wakeups` (times HLT returned: one per tick if
//! the hypervisor really sleeps a halted vCPU until its timer, many more if HLT
//! returned at once), `tsc` (TSC ticks from arming to the last tick, to check the
//! period against the host's TSC frequency). Exits 0, or 1 if an interrupt came on a
//! vector other than 0x40 (the exception handlers exit 100 + vector).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_kernels::{BootInfo, arg, exit, guest_main, println, rdmsr, rdtsc, report, wrmsr};

/// The timer's vector.
const VECTOR: usize = 0x40;

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 3],
    idt: [[u64; 2]; 256],
}

static mut TABLES: Tables = Tables { gdt: [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff], idt: [[0; 2]; 256] };

/// Interrupts taken on VECTOR (the handler increments it).
#[unsafe(no_mangle)]
static APICTIMER_TICKS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static apictimer_tick: u8;
    static apictimer_stray: u8;
}

// The timer handler: count, EOI (x2APIC EOI MSR 0x80B, value 0), and return with IF
// clear (bit 9 of the interrupted RFLAGS, at [rsp + 40] after the three pushes). Why:
// a vCPU that lagged more than a period behind has the next tick in IRR while this
// one is in service; returning with IF set would take it between IRETQ and the main
// loop's CLI, one tick more than the loop asked for (a CI run saw 2501 of 2500). So
// each `sti; hlt` takes exactly one interrupt. The stray handler (every other vector)
// reports and exits.
global_asm!(
    ".global apictimer_tick",
    "apictimer_tick:",
    "push rax",
    "push rcx",
    "push rdx",
    "lock inc qword ptr [rip + APICTIMER_TICKS]",
    "xor eax, eax",
    "xor edx, edx",
    "mov ecx, 0x80b",
    "wrmsr",
    "btr qword ptr [rsp + 40], 9",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "iretq",
    ".global apictimer_stray",
    "apictimer_stray:",
    "jmp {stray}",
    stray = sym stray,
);

extern "sysv64" fn stray() -> ! {
    report(b"stray", 1);
    exit(1)
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn install_tables() {
    let gate = |handler: u64| -> [u64; 2] {
        // 64-bit interrupt gate, selector 0x08, present, DPL0 (IF cleared on entry).
        let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        [low, handler >> 32]
    };
    // SAFETY: single-threaded guest; TABLES is only touched here, before interrupts are
    // enabled.
    unsafe {
        let t = &raw mut TABLES;
        for v in 0..256 {
            (*t).idt[v] = gate(&raw const apictimer_stray as u64);
        }
        (*t).idt[VECTOR] = gate(&raw const apictimer_tick as u64);
        let gdt = Pointer { limit: 23, base: (&raw const (*t).gdt) as u64 };
        let idt = Pointer { limit: (256 * 16 - 1) as u16, base: (&raw const (*t).idt) as u64 };
        asm!("lgdt [{}]", "lidt [{}]", in(reg) &gdt, in(reg) &idt);
    }
}

fn main(info: &BootInfo) -> u64 {
    let ticks = arg(info, "ticks").unwrap_or(20);
    let period_us = arg(info, "period_us").unwrap_or(1000).max(100);
    install_tables();
    // IA32_APIC_BASE: enable (bit 11) in x2APIC mode (bit 10), SDM Vol. 3A 11.12.1.
    wrmsr(0x1b, rdmsr(0x1b) | (1 << 11) | (1 << 10));
    println!("apictimer: x2APIC id {}, version {:#x}", rdmsr(0x802), rdmsr(0x803));
    wrmsr(0x80f, 0x1ff); // SVR: software enable, spurious vector 0xFF
    wrmsr(0x83e, 0xb); // divide by 1
    wrmsr(0x832, VECTOR as u64 | (1 << 17)); // LVT timer: periodic
    let start = rdtsc();
    // The hypervisor's APIC timer clock is 1 GHz: one count per nanosecond.
    wrmsr(0x838, period_us * 1000);
    let mut wakeups = 0u64;
    while APICTIMER_TICKS.load(Ordering::Relaxed) < ticks {
        // SAFETY: STI's shadow covers HLT, so no interrupt is lost between them.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        wakeups += 1;
    }
    let elapsed = rdtsc().wrapping_sub(start);
    wrmsr(0x832, VECTOR as u64 | (1 << 16)); // mask the timer
    let got = APICTIMER_TICKS.load(Ordering::Relaxed);
    println!("apictimer: {got} ticks, {wakeups} wakeups, {elapsed} TSC ticks");
    report(b"ticks", got);
    report(b"wakeups", wakeups);
    report(b"tsc", elapsed);
    0
}

guest_main!(main);
