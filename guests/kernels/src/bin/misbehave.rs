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
//! | `timer-storm` | x2APIC timer periodic at initial count 1, divide by 1, IF=1, spinning until `ticks=` (default 5000) interrupts, EOI each | clamp the period to `MIN_PERIODIC_NS` (100 µs): the ticks take at least that long each (reports `ticks`, `tsc`); others keep their slices: exit 30 (31: too few ticks within 60 s of the ACPI PM timer) |
//! | `garbage` | `rounds=` (default 200) of random reads and writes (xorshift, `seed=`) of 1, 2 or 4 bytes to every port of the 8259s, PIT, port 0x61, RTC, UART and ACPI PM block (never 0xF4; PM1a_CNT without SLP_EN, the reset register never 0x0F: power-off and reset are other tests'), to the I/O APIC's registers, to every xAPIC MMIO register and every x2APIC MSR 0x800-0x8FF, with IF=0 | answer every access (a #GP for an x2APIC MSR the guest may not touch, which the guest skips and counts: reports `gp`); the domain keeps running: exit 40 |
//! | `bad-vectors` | PIT at 1 kHz, RTC periodic, UART THRE interrupts; I/O APIC pins routed to vectors 0-15 and to APIC IDs that do not exist, IF=1 | drop the illegal vectors (ESR bit 6, SDM Vol. 3A 11.5.3) and the messages to nobody; then the PIT's pin routed right delivers: exit 50 (51: an undeliverable message arrived, 52: ESR lacks bit 6, 53: the good route got fewer than 20 ticks; an illegal vector taken exits 100 + vector) |
//! | `ipi-nowhere` | `rounds=` (default 100) of INIT, INIT deassert, SIPI, fixed and NMI IPIs to APIC IDs that do not exist and with the all-excluding-self shorthand, fixed IPIs to self and all-including-self, and INIT to all-including-self (resets its own LAPIC), IF=1 | deliver only the IPIs to itself (one per round per kind) and nothing else; the BSP keeps running after INIT: exit 60 (61: a count is wrong, reports `nowhere`, `self`, `all`) |
//! | `mmio-nowhere` | `rounds=` (default 2000) random 1/2/4/8-byte reads and writes to MMIO pages nothing claims in 0xFE000000-4 GiB and beyond its RAM | read all ones, drop the writes: exit 70 (71: a read was not all ones, reports `bad`) |
//!
//! It installs its own GDT and a 256-vector IDT first, so injected exceptions and
//! interrupts reach its handlers: every vector is counted; an exception (vector < 32)
//! exits with 100 + vector, except a #GP in `garbage`, where the faulting RDMSR or WRMSR
//! (2 bytes) is skipped; an interrupt (32 and up) is acknowledged with an EOI.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_kernels::{BootInfo, arg, exit, guest_main, println, rdmsr, rdtsc, report, wrmsr};

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 3],
    idt: [[u64; 2]; 256],
}

static mut TABLES: Tables = Tables { gdt: [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff], idt: [[0; 2]; 256] };

/// How many times each vector was taken (the common handler counts).
#[unsafe(no_mangle)]
static MISBEHAVE_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// Set in `garbage`: a #GP skips the 2-byte RDMSR/WRMSR that raised it.
#[unsafe(no_mangle)]
static MISBEHAVE_SKIP_GP: AtomicU64 = AtomicU64::new(0);
/// Set while the LAPIC is in x2APIC mode: the EOI goes to MSR 0x80B, else to the xAPIC page.
#[unsafe(no_mangle)]
static MISBEHAVE_X2APIC: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static misbehave_vectors: u8;
}

// One 16-byte stub per vector: push the vector (PUSH imm32, 0x68), jump to the common
// handler. The CPU pushes an error code only for exceptions; the only one taken and
// returned from is #GP (vector 13, with an error code) in `garbage`.
global_asm!(
    ".balign 16",
    ".global misbehave_vectors",
    "misbehave_vectors:",
    ".set vec, 0",
    ".rept 256",
    ".balign 16",
    ".byte 0x68",
    ".long vec",
    "jmp misbehave_common",
    ".set vec, vec + 1",
    ".endr",
    "misbehave_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "mov rax, [rsp + 24]",
    "lea rcx, [rip + MISBEHAVE_COUNTS]",
    "lock inc qword ptr [rcx + rax * 8]",
    "cmp rax, 32",
    "jae 3f",
    "cmp rax, 13",
    "jne 2f",
    "cmp qword ptr [rip + MISBEHAVE_SKIP_GP], 0",
    "je 2f",
    // #GP to skip: [rsp+32] is the error code, [rsp+40] the RIP.
    "add qword ptr [rsp + 40], 2",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 16",
    "iretq",
    "2:",
    "mov rdi, rax",
    "jmp {fault}",
    "3:",
    "cmp qword ptr [rip + MISBEHAVE_X2APIC], 0",
    "je 4f",
    "xor eax, eax",
    "xor edx, edx",
    "mov ecx, 0x80b",
    "wrmsr",
    "jmp 5f",
    "4:",
    "mov dword ptr [0xfee000b0], 0",
    "5:",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 8",
    "iretq",
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
        // 64-bit interrupt gate, selector 0x08, present, DPL0 (IF cleared on entry).
        let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        [low, handler >> 32]
    };
    // SAFETY: single-threaded guest; TABLES is only touched here, before any exception
    // or interrupt.
    unsafe {
        let t = &raw mut TABLES;
        let stubs = &raw const misbehave_vectors as u64;
        for v in 0..256 {
            (*t).idt[v] = gate(stubs + 16 * v as u64);
        }
        let gdt = Pointer { limit: 23, base: (&raw const (*t).gdt) as u64 };
        let idt = Pointer { limit: (256 * 16 - 1) as u16, base: (&raw const (*t).idt) as u64 };
        asm!("lgdt [{}]", "lidt [{}]", in(reg) &gdt, in(reg) &idt);
    }
}

fn count(vector: usize) -> u64 {
    MISBEHAVE_COUNTS[vector].load(Ordering::Relaxed)
}

/// A xorshift64 generator: the garbage is reproducible from `seed=`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the domain's emulated devices.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nostack)) };
}

fn port_access(port: u16, size: u64, write: bool, v: u32) -> u32 {
    let mut r: u32 = v;
    // SAFETY: port I/O to the domain's emulated devices (or to nothing): the hypervisor
    // traps every port; only EAX changes.
    unsafe {
        match (size, write) {
            (1, true) => asm!("out dx, al", in("dx") port, in("al") v as u8, options(nostack)),
            (2, true) => asm!("out dx, ax", in("dx") port, in("ax") v as u16, options(nostack)),
            (_, true) => asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)),
            (1, false) => asm!("in al, dx", in("dx") port, inout("eax") r, options(nostack)),
            (2, false) => asm!("in ax, dx", in("dx") port, inout("eax") r, options(nostack)),
            (_, false) => asm!("in eax, dx", in("dx") port, out("eax") r, options(nostack)),
        }
    }
    r
}

/// A 32-bit MMIO access at `addr` (identity-mapped, uncacheable device window).
fn mmio32(addr: u64, write: Option<u32>) -> u32 {
    let p = addr as *mut u32;
    // SAFETY: the test guests' identity map covers 0xFE000000-4 GiB; the hypervisor
    // emulates (or drops) every access there.
    unsafe {
        match write {
            Some(v) => {
                p.write_volatile(v);
                v
            }
            None => p.read_volatile(),
        }
    }
}

/// IA32_APIC_BASE (SDM Vol. 3A 11.4.4, 11.12.1): enable, in x2APIC mode or not. From
/// x2APIC to xAPIC goes through disabled, the only legal way.
fn apic_mode(x2apic: bool) {
    let base = rdmsr(0x1b) & !0xc00;
    if x2apic {
        wrmsr(0x1b, base | 0xc00);
    } else {
        wrmsr(0x1b, base);
        wrmsr(0x1b, base | 0x800);
    }
    MISBEHAVE_X2APIC.store(u64::from(x2apic), Ordering::Relaxed);
}

fn enable_interrupts() {
    // SAFETY: the IDT handles every vector.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

fn disable_interrupts() {
    // SAFETY: only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// The device ports `garbage` hammers: 8259 pair, PIT, port 0x61, RTC, UART, the ACPI
/// PM block (hv/src/devices/pm.rs: PM1a_EVT 0x600-0x603, PM1a_CNT 0x604-0x605,
/// PM_TMR 0x608-0x60B, reset register 0x60C).
const GARBAGE_PORTS: &[(u16, u16)] =
    &[(0x20, 0x21), (0xa0, 0xa1), (0x40, 0x43), (0x61, 0x61), (0x70, 0x71), (0x3f8, 0x3ff), (0x600, 0x60c)];

/// A value `garbage` may write to `port` with `size` bytes: anything but what would
/// power off (SLP_EN, PM1a_CNT bit 13) or reset (0x0F to the reset register).
fn tame(port: u16, size: u64, v: u32) -> u32 {
    let covers = |p: u16| port <= p && u32::from(p) < u32::from(port) + size as u32;
    let mut v = v;
    if covers(0x605) {
        // SLP_EN is bit 13 of the 16-bit PM1a_CNT at 0x604: bit 5 of port 0x605.
        v &= !(0x20 << (8 * u32::from(0x605 - port)));
    }
    if covers(0x60c) && (v >> (8 * u32::from(0x60c - port))) & 0xff == 0x0f {
        v ^= 1 << (8 * u32::from(0x60c - port));
    }
    v
}

fn garbage(rounds: u64, seed: u64) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut sum = 0u64;
    disable_interrupts();
    MISBEHAVE_SKIP_GP.store(1, Ordering::Relaxed);
    for _ in 0..rounds {
        for &(first, last) in GARBAGE_PORTS {
            for port in first..=last {
                let r = rng.next();
                let size = [1, 2, 4, 1][(r & 3) as usize];
                let v = tame(port, size, (r >> 8) as u32);
                sum = sum.wrapping_add(u64::from(port_access(port, size, r & 4 != 0, v)));
            }
        }
        // I/O APIC: IOREGSEL, IOWIN, the EOI register (82093AA 3.0; 0x40 on version 0x20).
        for off in [0x00u64, 0x10, 0x20, 0x40, 0x00, 0x10] {
            let r = rng.next();
            let w = (r & 1 != 0).then_some((r >> 32) as u32);
            sum = sum.wrapping_add(u64::from(mmio32(0xfec0_0000 + off, w)));
        }
        // Every xAPIC register (SDM Vol. 3A 11.4.1, Table 11-1), then every x2APIC MSR.
        apic_mode(false);
        for off in (0..0x400u64).step_by(0x10) {
            let r = rng.next();
            let w = (r & 1 != 0).then_some((r >> 32) as u32);
            sum = sum.wrapping_add(u64::from(mmio32(0xfee0_0000 + off, w)));
        }
        apic_mode(true);
        for msr in 0x800..0x900u32 {
            let r = rng.next();
            if r & 1 != 0 { wrmsr(msr, r >> 1) } else { sum = sum.wrapping_add(rdmsr(msr)) }
        }
        apic_mode(false);
    }
    MISBEHAVE_SKIP_GP.store(0, Ordering::Relaxed);
    // Put the UART back the way the console needs it: 8N1, DLAB off, no loopback, FIFOs on.
    for (port, v) in [(0x3fb, 0x03), (0x3f9, 0x00), (0x3fc, 0x03), (0x3fa, 0x07)] {
        outb(port, v);
    }
    sum
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

/// x2APIC registers as MSRs (SDM Vol. 3A 11.12.1.2, Table 11-6).
const X2_SVR: u32 = 0x80f;
const X2_ESR: u32 = 0x828;
const X2_ICR: u32 = 0x830;
const X2_LVT_TIMER: u32 = 0x832;
const X2_INITIAL_COUNT: u32 = 0x838;
const X2_DIVIDE: u32 = 0x83e;

/// The ACPI PM timer (hv/src/devices/pm.rs: port 0x608, 32 bits, 3.579545 MHz): the
/// one clock whose rate a guest knows on every host (the TSC runs at 50 MHz on Bochs
/// and GHz on QEMU), so bounded waits are measured in it.
const PM_TMR_PORT: u16 = 0x608;
const PM_TMR_HZ: u64 = 3_579_545;
/// How long a mode waits for interrupts at most before it gives up (a failure code):
/// 60 s of guest time.
const PATIENCE_PM: u64 = 60 * PM_TMR_HZ;

/// Elapsed PM timer ticks since `start()`, robust to its wrap (polled far more often
/// than the 24-bit wrap of 4.7 s, so a 24-bit timer would work too).
struct PmClock {
    last: u32,
    elapsed: u64,
}

impl PmClock {
    fn start() -> Self {
        Self { last: port_access(PM_TMR_PORT, 4, false, 0), elapsed: 0 }
    }
    fn elapsed(&mut self) -> u64 {
        let now = port_access(PM_TMR_PORT, 4, false, 0);
        self.elapsed += u64::from(now.wrapping_sub(self.last) & 0x00ff_ffff);
        self.last = now;
        self.elapsed
    }
}

fn timer_storm(ticks: u64) -> u64 {
    const VECTOR: usize = 0x40;
    apic_mode(true);
    wrmsr(X2_SVR, 0x1ff);
    wrmsr(X2_DIVIDE, 0xb); // divide by 1
    wrmsr(X2_LVT_TIMER, VECTOR as u64 | (1 << 17)); // periodic
    let start = rdtsc();
    wrmsr(X2_INITIAL_COUNT, 1); // one APIC clock: the shortest period there is
    enable_interrupts();
    // Spin, not HLT: take every slice the hypervisor gives.
    let mut clock = PmClock::start();
    while count(VECTOR) < ticks && clock.elapsed() < PATIENCE_PM {
        core::hint::spin_loop();
    }
    disable_interrupts();
    let elapsed = rdtsc().wrapping_sub(start);
    wrmsr(X2_LVT_TIMER, VECTOR as u64 | (1 << 16));
    wrmsr(X2_INITIAL_COUNT, 0);
    let got = count(VECTOR);
    println!("misbehave: timer storm: {got} ticks in {elapsed} TSC ticks");
    report(b"ticks", got);
    report(b"tsc", elapsed);
    if got >= ticks { 30 } else { 31 }
}

/// Write I/O APIC redirection entry `pin` (82093AA 3.2.4: IOREDTBL at index 0x10 + 2
/// pin, destination in bits 56-63).
fn redirect(pin: u32, low: u32, dest: u8) {
    mmio32(0xfec0_0000, Some(0x11 + 2 * pin));
    mmio32(0xfec0_0010, Some(u32::from(dest) << 24));
    mmio32(0xfec0_0000, Some(0x10 + 2 * pin));
    mmio32(0xfec0_0010, Some(low));
}

/// Spin with interrupts on for `pm` PM timer ticks, or until `until()` holds.
fn spin_for(pm: u64, until: impl Fn() -> bool) {
    let mut clock = PmClock::start();
    enable_interrupts();
    while !until() && clock.elapsed() < pm {
        core::hint::spin_loop();
    }
    disable_interrupts();
}

fn bad_vectors() -> u64 {
    const NOBODY: usize = 0x41;
    const GOOD: usize = 0x42;
    const UART_NOBODY: usize = 0x43;
    apic_mode(true);
    wrmsr(X2_SVR, 0x1ff);
    // PIT channel 0, mode 2, 1193 counts: 1 kHz on IRQ 0 = I/O APIC pin 2 (the MADT's
    // override). The 8259s stay masked as the BIOS left them.
    const PIT_COUNT: u16 = 1193;
    for (port, v) in [(0x43u16, 0x34u8), (0x40, PIT_COUNT as u8), (0x40, (PIT_COUNT >> 8) as u8)] {
        outb(port, v);
    }
    // RTC periodic interrupt (register A rate 6 = 1024 Hz, register B PIE) on pin 8, to
    // illegal vector 0x0E for the whole test; the UART's THR-empty interrupt on pin 4 to
    // APIC ID 0x3C, which does not exist.
    for (port, v) in [(0x70u16, 0x0au8), (0x71, 0x26), (0x70, 0x0b), (0x71, 0x42)] {
        outb(port, v);
    }
    redirect(8, 0x0e, 0);
    redirect(4, UART_NOBODY as u32, 0x3c);
    outb(0x3f9, 0x02); // IER: THR empty
    // Pin 2 to every illegal vector (0-15) in turn, 20 ms (20 PIT periods) each.
    const PHASE_PM: u64 = PM_TMR_HZ / 50;
    for vector in 0..16 {
        redirect(2, vector, 0);
        spin_for(PHASE_PM, || false);
    }
    // Then to APIC IDs nobody has (physical 1, 7, 0x3C, 0xFE), then logical 0x80 (no
    // LDR here has bit 7).
    for (dest, logical) in [(1u8, false), (7, false), (0x3c, false), (0xfe, false), (0x80, true)] {
        redirect(2, NOBODY as u32 | (u32::from(logical) << 11), dest);
        spin_for(PHASE_PM, || false);
    }
    // Finally to us: the PIT was firing all along.
    redirect(2, GOOD as u32, 0);
    spin_for(PATIENCE_PM, || count(GOOD) >= 20);
    for pin in [2, 4, 8] {
        redirect(pin, 1 << 16, 0);
    }
    outb(0x3f9, 0x00);
    wrmsr(X2_ESR, 0);
    let esr = rdmsr(X2_ESR);
    let (nobody, good) = (count(NOBODY) + count(UART_NOBODY), count(GOOD));
    println!("misbehave: bad vectors: ESR {esr:#x}, {nobody} to nobody, {good} on the good route");
    report(b"esr", esr);
    report(b"nobody", nobody);
    report(b"good", good);
    if nobody != 0 {
        51
    } else if esr & (1 << 6) == 0 {
        52
    } else if good < 20 {
        53
    } else {
        50
    }
}

/// ICR bits (SDM Vol. 3A 11.6.1): delivery mode, level, trigger, shorthand.
const INIT: u64 = 5 << 8;
const STARTUP: u64 = 6 << 8;
const NMI: u64 = 4 << 8;
const ASSERT: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const SELF: u64 = 1 << 18;
const ALL: u64 = 2 << 18;
const OTHERS: u64 = 3 << 18;

fn ipi_nowhere(rounds: u64) -> u64 {
    const NOWHERE: usize = 0x44;
    const TO_SELF: usize = 0x45;
    const TO_ALL: usize = 0x46;
    apic_mode(true);
    for _ in 0..rounds {
        // INIT to all-including-self below resets our LAPIC (SVR too): enable it again.
        wrmsr(X2_SVR, 0x1ff);
        enable_interrupts();
        for dest in [1u64, 2, 3, 7, 0x3c, 0xfe, 0xffff, 0xffff_fffe] {
            let d = dest << 32;
            for icr in [INIT | ASSERT | LEVEL, INIT | LEVEL, STARTUP | 0x10, STARTUP | 0x10, NMI, NOWHERE as u64] {
                wrmsr(X2_ICR, d | icr);
            }
        }
        for icr in [INIT | ASSERT | LEVEL, STARTUP | 0x10, NMI, NOWHERE as u64] {
            wrmsr(X2_ICR, OTHERS | icr);
        }
        wrmsr(X2_ICR, SELF | TO_SELF as u64);
        wrmsr(X2_ICR, ALL | TO_ALL as u64);
        disable_interrupts();
        wrmsr(X2_ICR, ALL | INIT | ASSERT | LEVEL);
    }
    let (nowhere, to_self, to_all) = (count(NOWHERE), count(TO_SELF), count(TO_ALL));
    println!("misbehave: IPIs: {nowhere} arrived from nowhere, {to_self} to self, {to_all} to all");
    report(b"nowhere", nowhere);
    report(b"self", to_self);
    report(b"all", to_all);
    if nowhere == 0 && to_self == rounds && to_all == rounds { 60 } else { 61 }
}

fn mmio_nowhere(info: &BootInfo, rounds: u64, seed: u64) -> u64 {
    let beyond = map_beyond_memory(info) as u64;
    let mut rng = Rng(seed | 1);
    let mut bad = 0u64;
    for _ in 0..rounds {
        let r = rng.next();
        // A page of 0xFE000000-4 GiB that is neither the I/O APIC's nor the LAPIC's, or
        // one of the 512 pages mapped beyond RAM.
        let page = if r & 1 == 0 {
            let p = 0xfe00_0000 + ((r >> 8) & 0x1fff) * 4096;
            if p == 0xfec0_0000 || p == 0xfee0_0000 { p + 4096 } else { p }
        } else {
            beyond + ((r >> 8) & 0x1ff) * 4096
        };
        let size = 1u64 << ((r >> 24) & 3);
        let addr = page + (((r >> 32) & 0xfff) & !(size - 1));
        let write = r & 2 != 0;
        let v = rng.next();
        // SAFETY: identity-mapped addresses no device and no RAM claims; the hypervisor
        // drops the writes and answers the reads with all ones.
        let ones = unsafe {
            match (size, write) {
                (1, true) => (addr as *mut u8).write_volatile(v as u8),
                (2, true) => (addr as *mut u16).write_volatile(v as u16),
                (4, true) => (addr as *mut u32).write_volatile(v as u32),
                (_, true) => (addr as *mut u64).write_volatile(v),
                _ => {}
            }
            match size {
                1 => (addr as *const u8).read_volatile() == u8::MAX,
                2 => (addr as *const u16).read_volatile() == u16::MAX,
                4 => (addr as *const u32).read_volatile() == u32::MAX,
                _ => (addr as *const u64).read_volatile() == u64::MAX,
            }
        };
        bad += u64::from(!ones);
    }
    println!("misbehave: {rounds} accesses to unclaimed MMIO, {bad} reads not all ones");
    report(b"bad", bad);
    if bad == 0 { 70 } else { 71 }
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
        "timer-storm" => timer_storm(arg(info, "ticks").unwrap_or(5000)),
        "garbage" => {
            let rounds = arg(info, "rounds").unwrap_or(200);
            let sum = garbage(rounds, arg(info, "seed").unwrap_or(1));
            let gp = count(13);
            println!("misbehave: {rounds} rounds of garbage, {gp} #GP skipped, reads summed to {sum:#x}");
            report(b"gp", gp);
            40
        }
        "bad-vectors" => bad_vectors(),
        "ipi-nowhere" => ipi_nowhere(arg(info, "rounds").unwrap_or(100)),
        "mmio-nowhere" => mmio_nowhere(info, arg(info, "rounds").unwrap_or(2000), arg(info, "seed").unwrap_or(1)),
        _ => {
            println!("misbehave: unknown mode `{mode}`");
            2
        }
    }
}

guest_main!(main);
