//! Burns CPU forever. Every 2^24 iterations it reports its progress (`spins`), so a
//! test can see that it keeps being scheduled and that it never starves others.
#![no_std]
#![no_main]

use guest_kernels::{guest_main, report};

fn main(_info: &guest_kernels::BootInfo) -> u64 {
    let mut i: u64 = 0;
    loop {
        i = i.wrapping_add(1);
        core::hint::black_box(i);
        if i & ((1 << 24) - 1) == 0 {
            report(b"spins", i >> 24);
        }
    }
}

guest_main!(main);
