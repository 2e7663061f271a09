//! Writes a reproducible pattern over N pages, round after round, and reports a
//! checksum of every round. Command line (decimal or 0x hex):
//! `pages=N` (default 256), `rounds=K` (default 4), `seed=S` (default 1),
//! `base=GPA` (default 16 MiB), `every=P` (yield after every P pages; default 0 = never).
//!
//! Word `w` of page `p` in round `r` is `mix(seed, r, p, w)`; the checksum of a round
//! is FNV-1a over the words it wrote, so the hypervisor (or a migration test) can
//! recompute what the memory must hold. Reports `round` then `checksum` for each round.
#![no_std]
#![no_main]

use guest_kernels::{Hypercall, arg, guest_main, hypercall, println, report};

/// The pattern (a 64-bit mix, documented so tests can recompute it).
pub fn mix(seed: u64, round: u64, page: u64, word: u64) -> u64 {
    let mut x = seed ^ (round << 48) ^ (page << 16) ^ word;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn main(info: &guest_kernels::BootInfo) -> u64 {
    let pages = arg(info, "pages").unwrap_or(256);
    let rounds = arg(info, "rounds").unwrap_or(4);
    let seed = arg(info, "seed").unwrap_or(1);
    let base = arg(info, "base").unwrap_or(16 << 20);
    let every = arg(info, "every").unwrap_or(0);
    if base < guest_abi::KERNEL_MIN_GPA + (1 << 20) || base + pages * 4096 > info.memory_bytes {
        println!("memwriter: pages={pages} base={base:#x} do not fit in {} bytes of memory", info.memory_bytes);
        return 2;
    }
    println!("memwriter: {pages} pages at {base:#x}, {rounds} rounds, seed {seed}");
    for round in 0..rounds {
        let mut sum: u64 = 0xcbf2_9ce4_8422_2325;
        for page in 0..pages {
            let ptr = (base + page * 4096) as *mut u64;
            for word in 0..512u64 {
                let v = mix(seed, round, page, word);
                // SAFETY: [base, base + pages * 4 KiB) is guest memory the check above
                // found inside the domain and above the kernel image.
                unsafe { ptr.add(word as usize).write_volatile(v) };
                sum = (sum ^ v).wrapping_mul(0x0000_0100_0000_01b3);
            }
            if every != 0 && (page + 1) % every == 0 {
                hypercall(Hypercall::Yield, 0, 0);
            }
        }
        report(b"round", round);
        report(b"checksum", sum);
    }
    println!("memwriter: done");
    0
}

guest_main!(main);
