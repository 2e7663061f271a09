//! Writes a reproducible pattern over N pages, round after round, reads every page
//! back and reports the checksum of what it read. Command line (decimal or 0x hex):
//! `pages=N` (default 256), `rounds=K` (default 4), `seed=S` (default 1),
//! `base=GPA` (default 16 MiB), `every=P` (yield after every P pages; default 0 = never).
//!
//! Word `w` of page `p` in round `r` is `guest_abi::memwriter::mix(seed, r, p, w)`; the
//! checksum of a round is `guest_abi::memwriter::round_checksum` of the words read
//! back, so a test recomputes exactly what guest memory must have held. Reports
//! `round` then `checksum` for each round.
#![no_std]
#![no_main]

use guest_abi::memwriter::{CHECKSUM_START, fold, mix};
use guest_kernels::{Hypercall, arg, guest_main, hypercall, println, report};

fn main(info: &guest_kernels::BootInfo) -> u64 {
    let pages = arg(info, "pages").unwrap_or(256);
    let rounds = arg(info, "rounds").unwrap_or(4);
    let seed = arg(info, "seed").unwrap_or(1);
    let base = arg(info, "base").unwrap_or(16 << 20);
    let every = arg(info, "every").unwrap_or(0);
    let stack_floor = info.memory_bytes.saturating_sub(64 * 1024);
    if base < guest_abi::KERNEL_MIN_GPA + (1 << 20) || base.saturating_add(pages * 4096) > stack_floor {
        println!("memwriter: pages={pages} base={base:#x} do not fit in {} bytes of memory", info.memory_bytes);
        return 2;
    }
    println!("memwriter: {pages} pages at {base:#x}, {rounds} rounds, seed {seed}");
    for round in 0..rounds {
        for page in 0..pages {
            let ptr = (base + page * 4096) as *mut u64;
            for word in 0..512u64 {
                // SAFETY: [base, base + pages * 4 KiB) is guest memory the check above
                // found inside the domain, above the kernel and below the stack.
                unsafe { ptr.add(word as usize).write_volatile(mix(seed, round, page, word)) };
            }
            if every != 0 && (page + 1) % every == 0 {
                hypercall(Hypercall::Yield, 0, 0);
            }
        }
        let mut sum = CHECKSUM_START;
        for page in 0..pages {
            let ptr = (base + page * 4096) as *const u64;
            for word in 0..512u64 {
                // SAFETY: as above; reading back what this round wrote.
                sum = fold(sum, unsafe { ptr.add(word as usize).read_volatile() });
            }
        }
        report(b"round", round);
        report(b"checksum", sum);
    }
    println!("memwriter: done");
    0
}

guest_main!(main);
