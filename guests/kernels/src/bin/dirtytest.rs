//! Checks log-dirty mode from inside: starts logging (`mode=` 0 auto, 1 pml, 2 dbit,
//! 3 wp), then for each of `rounds` rounds writes a known pseudo-random third of the
//! `pages` pages at `base`, asks for peek-and-clean, and compares the reported bits of
//! that region with what it wrote: no page missing, none extra. The bitmap buffer the
//! hypervisor writes (one page below `base`) must show up as dirty in the next round:
//! the hypervisor marks its own writes. Reports `mode`, `rounds`, `mismatches`,
//! `hv_marked` (rounds in which the buffer page was reported) and `others` (the most
//! pages outside the region and buffer seen in a round: the guest's stack).
#![no_std]
#![no_main]

use guest_abi::memwriter::mix;
use guest_kernels::{Hypercall, arg, guest_main, hypercall, println, report};

const BUFFER_BYTES: u64 = 4096;

fn chosen(seed: u64, round: u64, page: u64) -> bool {
    mix(seed, round, page, 0).is_multiple_of(3)
}

fn bit(buffer: u64, pfn: u64) -> bool {
    let word = (buffer + (pfn / 64) * 8) as *const u64;
    // SAFETY: `buffer` is a page of our memory the hypervisor fills with the bitmap;
    // `pfn` is below the domain's page count, which fits in one page of bits here.
    (unsafe { word.read_volatile() } >> (pfn % 64)) & 1 == 1
}

/// `bench=N`: write N distinct pages (one word each) with logging off, then again with
/// logging on (`mode=`), and report the TSC ticks of each pass (`off`, `on`). Then one
/// peek-and-clean (re-arming the N pages) and the logged pages written once more
/// (`again`), so a round of logging, reporting and re-arming is measured whole.
fn bench(info: &guest_kernels::BootInfo, pages: u64) -> u64 {
    let mode = arg(info, "mode").unwrap_or(0);
    let base = arg(info, "base").unwrap_or(4 << 20);
    if base + 2 * pages * 4096 > info.memory_bytes - (64 << 10) {
        println!("dirtytest: bench pages do not fit");
        return 2;
    }
    let pass = |first: u64| {
        // Start on a fresh time slice, so the pass is not timed across other domains.
        hypercall(Hypercall::Yield, 0, 0);
        // SAFETY: RDTSC only reads the time-stamp counter.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        for page in 0..pages {
            // SAFETY: inside our memory (checked above); distinct pages per pass.
            unsafe { ((base + (first + page) * 4096) as *mut u64).write_volatile(page) };
        }
        // SAFETY: as above.
        unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start)
    };
    let off = pass(0);
    let used = hypercall(Hypercall::DirtyStart, mode, 0);
    if used == guest_abi::HYPERCALL_EINVAL {
        return 3;
    }
    let on = pass(pages);
    // The bitmap (one bit per page of our memory) into the page below `base`.
    if info.memory_bytes / 4096 > BUFFER_BYTES * 8 {
        println!("dirtytest: the bitmap does not fit its buffer");
        return 2;
    }
    hypercall(Hypercall::DirtyPeekClean, base - BUFFER_BYTES, BUFFER_BYTES);
    let again = pass(pages);
    hypercall(Hypercall::DirtyStop, 0, 0);
    report(b"mode", used);
    report(b"off", off);
    report(b"on", on);
    report(b"again", again);
    0
}

fn main(info: &guest_kernels::BootInfo) -> u64 {
    if let Some(n) = arg(info, "bench") {
        return bench(info, n);
    }
    let mode = arg(info, "mode").unwrap_or(0);
    let rounds = arg(info, "rounds").unwrap_or(20);
    let pages = arg(info, "pages").unwrap_or(256);
    let base = arg(info, "base").unwrap_or(4 << 20);
    let seed = arg(info, "seed").unwrap_or(7);
    let buffer = base - BUFFER_BYTES;
    let total_pages = info.memory_bytes / 4096;
    if total_pages > BUFFER_BYTES * 8 || base + pages * 4096 > info.memory_bytes - (64 << 10) {
        println!("dirtytest: layout does not fit");
        return 2;
    }
    let used = hypercall(Hypercall::DirtyStart, mode, 0);
    if used == guest_abi::HYPERCALL_EINVAL {
        println!("dirtytest: mode {mode} is not available here");
        report(b"mode", 0);
        return 3;
    }
    report(b"mode", used);
    // Start from a clean log (the guest ran before logging started).
    hypercall(Hypercall::DirtyPeekClean, buffer, BUFFER_BYTES);
    let (base_pfn, buffer_pfn) = (base / 4096, buffer / 4096);
    let (mut mismatches, mut hv_marked, mut others) = (0u64, 0u64, 0u64);
    for round in 0..rounds {
        for page in 0..pages {
            if chosen(seed, round, page) {
                let p = (base + page * 4096 + (round * 8) % 4096) as *mut u64;
                // SAFETY: inside the region the layout check found in our memory.
                unsafe { p.write_volatile(mix(seed, round, page, 1)) };
            }
        }
        hypercall(Hypercall::DirtyPeekClean, buffer, BUFFER_BYTES);
        let mut outside = 0;
        for pfn in 0..total_pages {
            let dirty = bit(buffer, pfn);
            if (base_pfn..base_pfn + pages).contains(&pfn) {
                let want = chosen(seed, round, pfn - base_pfn);
                if dirty != want {
                    if mismatches < 5 {
                        println!("dirtytest: round {round} page {}: reported {dirty}, written {want}", pfn - base_pfn);
                    }
                    mismatches += 1;
                }
            } else if pfn == buffer_pfn {
                hv_marked += u64::from(dirty);
            } else if dirty {
                outside += 1;
            }
        }
        others = others.max(outside);
    }
    hypercall(Hypercall::DirtyStop, 0, 0);
    report(b"rounds", rounds);
    report(b"mismatch", mismatches);
    report(b"hv_mark", hv_marked);
    report(b"others", others);
    println!("dirtytest: mode {used}, {rounds} rounds, {mismatches} mismatches, buffer marked in {hv_marked} rounds");
    if mismatches == 0 { 0 } else { 1 }
}

guest_main!(main);
