//! Log-dirty mode under concurrency (issue 16): a domain of two vCPUs, meant to run on
//! two physical CPUs. vCPU 1 writes pages without a pause, one word per page, page
//! `k % pages` for k = 0, 1, 2, …, and publishes `k` after each write; vCPU 0 starts
//! logging (`mode=` 1 pml, 2 dbit, 3 wp), then `rounds` times peeks and cleans the log
//! while vCPU 1 writes, reading vCPU 1's progress just before (`a`) and just after
//! (`b`) each peek-and-clean. No write may be lost, and no page reported that was not
//! written:
//!
//! - every page written in (previous b, a) (after the previous clean had finished and
//!   before this one began; write `previous b` itself may have retired before that
//!   clean with its count not yet stored) must be reported now;
//! - a page written in [previous a, previous b] or [a, b] (racing with a clean; the
//!   write counted next may be in flight: write-protect mode marks its page when its
//!   fault is handled, before it retires) may be reported now or in the neighbouring
//!   round;
//! - any other page of the region must not be.
//!
//! Reports `mode`, `rounds`, `missing` (pages written and not reported), `extra` (pages
//! reported and not written), `raced` (writes that raced with a clean, summed),
//! `writes` (vCPU 1's writes in all) and `wrapped` (rounds that wrote more pages than
//! the region has, where the "not written" check has nothing to check). Exit 0 when
//! nothing was missing or extra.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use guest_kernels::{BootInfo, Hypercall, arg, hypercall, println, report};

/// The bitmap page (one bit per page of our memory), just below the region.
const BUFFER_BYTES: u64 = 4096;

/// Words shared by the two vCPUs, in the page below the bitmap.
struct Shared {
    /// vCPU 0 has started logging: vCPU 1 may write.
    go: AtomicU64,
    /// Writes vCPU 1 has completed.
    progress: AtomicU64,
    /// vCPU 0 is done: vCPU 1 stops.
    stop: AtomicU64,
}

fn shared(base: u64) -> &'static Shared {
    // SAFETY: the page two below `base` is ours (the layout check in `checker` and the
    // same arguments in both vCPUs), identity-mapped, and used only through atomics.
    unsafe { &*((base - 2 * BUFFER_BYTES) as *const Shared) }
}

struct Layout {
    base: u64,
    pages: u64,
}

fn layout(info: &BootInfo) -> Layout {
    Layout { base: arg(info, "base").unwrap_or(4 << 20), pages: arg(info, "pages").unwrap_or(2048) }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
extern "sysv64" fn _start(info: *const BootInfo, vcpu: u64) -> ! {
    // SAFETY: the hypervisor passes the boot-info block in RDI (guest_abi) and every
    // vCPU its index in RSI.
    let info = unsafe { guest_kernels::init(info) };
    if vcpu == 0 { guest_kernels::exit(checker(info)) } else { writer(info) }
}

/// vCPU 1: write, publish, repeat, until told to stop; then halt for ever.
fn writer(info: &BootInfo) -> ! {
    let Layout { base, pages } = layout(info);
    let s = shared(base);
    while s.go.load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
    let mut k = 0u64;
    while s.stop.load(Ordering::Relaxed) == 0 {
        let p = (base + (k % pages) * 4096 + ((k / pages) * 8) % 4096) as *mut u64;
        // SAFETY: inside the region the checker's layout check found in our memory.
        unsafe { p.write_volatile(k) };
        k += 1;
        // Release: the write above is visible before the count that names it (x86
        // keeps stores in order; this keeps the compiler from reordering them).
        s.progress.store(k, Ordering::Release);
    }
    loop {
        // SAFETY: the domain ends when vCPU 0 exits; HLT parks this vCPU until then.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// Whether some k in [from, to) writes page `p` (k % pages == p).
fn hit(from: u64, to: u64, p: u64, pages: u64) -> bool {
    if to <= from {
        return false;
    }
    if to - from >= pages {
        return true;
    }
    let start = from % pages;
    let offset = (p + pages - start) % pages;
    offset < to - from
}

fn bit(buffer: u64, pfn: u64) -> bool {
    let word = (buffer + (pfn / 64) * 8) as *const u64;
    // SAFETY: `buffer` is a page of our memory the hypervisor fills with the bitmap;
    // `pfn` is below the domain's page count, which fits in one page of bits (checked).
    (unsafe { word.read_volatile() } >> (pfn % 64)) & 1 == 1
}

/// vCPU 0: start logging, then peek and clean `rounds` times while vCPU 1 writes.
fn checker(info: &BootInfo) -> u64 {
    let Layout { base, pages } = layout(info);
    let mode = arg(info, "mode").unwrap_or(0);
    let rounds = arg(info, "rounds").unwrap_or(20);
    let per_round = arg(info, "writes").unwrap_or(200);
    let buffer = base - BUFFER_BYTES;
    if info.memory_bytes / 4096 > BUFFER_BYTES * 8
        || base < 3 * BUFFER_BYTES
        || base + pages * 4096 > info.memory_bytes - (64 << 10)
        || info.vcpus < 2
    {
        println!("dirtypair: layout does not fit (or fewer than 2 vCPUs)");
        return 2;
    }
    let s = shared(base);
    let used = hypercall(Hypercall::DirtyStart, mode, 0);
    if used == guest_abi::HYPERCALL_EINVAL {
        println!("dirtypair: mode {mode} is not available here");
        report(b"mode", 0);
        s.stop.store(1, Ordering::Relaxed);
        return 3;
    }
    report(b"mode", used);
    // A clean log before vCPU 1 writes anything.
    hypercall(Hypercall::DirtyPeekClean, buffer, BUFFER_BYTES);
    s.go.store(1, Ordering::Release);
    let base_pfn = base / 4096;
    let (mut prev_a, mut prev_b) = (0u64, 0u64);
    let (mut missing, mut extra, mut raced, mut wrapped) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..rounds {
        // Let vCPU 1 write some pages first (it runs on another CPU, or in its slices).
        while s.progress.load(Ordering::Acquire) < prev_b + per_round {
            core::hint::spin_loop();
        }
        let a = s.progress.load(Ordering::Acquire);
        hypercall(Hypercall::DirtyPeekClean, buffer, BUFFER_BYTES);
        let b = s.progress.load(Ordering::Acquire);
        raced += b - a;
        wrapped += u64::from(b - prev_a >= pages);
        for p in 0..pages {
            // Write `prev_b` may have retired before the previous clean with its count
            // still on the way (vCPU 1 stopped, or faulting on the shared page, between
            // the two stores): only those after it surely came after that clean.
            let must = hit(prev_b + 1, a, p, pages);
            // The write after the last counted one may be in flight (a write fault is
            // handled, and the page marked, before the write retires and is counted).
            let may = hit(prev_a, prev_b + 1, p, pages) || hit(a, b + 1, p, pages);
            let reported = bit(buffer, base_pfn + p);
            if must && !reported {
                if missing < 5 {
                    println!("dirtypair: round {round}: page {p} written in ({prev_b}, {a}) is not reported");
                }
                missing += 1;
            } else if reported && !must && !may {
                if extra < 5 {
                    println!("dirtypair: round {round}: page {p} reported, not written");
                }
                extra += 1;
            }
        }
        (prev_a, prev_b) = (a, b);
    }
    s.stop.store(1, Ordering::Relaxed);
    hypercall(Hypercall::DirtyStop, 0, 0);
    let writes = s.progress.load(Ordering::Acquire);
    report(b"rounds", rounds);
    report(b"missing", missing);
    report(b"extra", extra);
    report(b"raced", raced);
    report(b"writes", writes);
    report(b"wrapped", wrapped);
    println!(
        "dirtypair: mode {used}, {rounds} rounds, {writes} writes, {missing} missing, {extra} extra, {raced} raced"
    );
    if missing == 0 && extra == 0 { 0 } else { 1 }
}

#[panic_handler]
fn panic(p: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {p}");
    guest_kernels::exit(0xdead)
}
