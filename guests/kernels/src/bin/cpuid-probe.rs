//! Prints every CPUID leaf and subleaf it sees, one line each:
//! `cpuid LEAF SUBLEAF EAX EBX ECX EDX` (8 hex digits each), for the basic range up to
//! the reported maximum plus three beyond it, the hypervisor range 0x40000000..+3, and
//! the extended range up to its maximum plus three; subleaves 0..=7 for the leaves
//! that have them, 0 and 1 for the others. The system test compares every line with
//! levelling's view of the domain's policy.
#![no_std]
#![no_main]

use guest_kernels::{cpuid, guest_main, println, report};

const SUBLEAF_LEAVES: [u32; 13] = [4, 7, 0xb, 0xd, 0xf, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1d, 0x1f, 0x8000_001d];

fn probe_range(first: u32, last: u32) -> u64 {
    let mut lines = 0;
    let mut leaf = first;
    while leaf <= last {
        let subleaves = if SUBLEAF_LEAVES.contains(&leaf) { 8 } else { 2 };
        for sub in 0..subleaves {
            let r = cpuid(leaf, sub);
            println!("cpuid {leaf:08x} {sub:08x} {:08x} {:08x} {:08x} {:08x}", r[0], r[1], r[2], r[3]);
            lines += 1;
        }
        leaf += 1;
    }
    lines
}

/// `loop=N`: execute CPUID N times and report the TSC ticks it took (`cycles`), for
/// measuring the exit path (`cargo xtask bench exits`).
fn exit_loop(n: u64) -> u64 {
    // SAFETY: RDTSC is not intercepted; it reads the (host) time-stamp counter.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    for i in 0..n {
        core::hint::black_box(cpuid((i & 1) as u32, 0));
    }
    // SAFETY: as above.
    let end = unsafe { core::arch::x86_64::_rdtsc() };
    report(b"loops", n);
    report(b"cycles", end.wrapping_sub(start));
    0
}

fn main(info: &guest_kernels::BootInfo) -> u64 {
    if let Some(n) = guest_kernels::arg(info, "loop") {
        return exit_loop(n);
    }
    let max_basic = cpuid(0, 0)[0].min(0x40);
    let max_ext = cpuid(0x8000_0000, 0)[0].clamp(0x8000_0000, 0x8000_0040);
    let mut lines = probe_range(0, max_basic + 3);
    lines += probe_range(0x4000_0000, 0x4000_0003);
    lines += probe_range(0x8000_0000, max_ext + 3);
    println!("cpuid-probe done: {lines} lines");
    report(b"lines", lines);
    0
}

guest_main!(main);
