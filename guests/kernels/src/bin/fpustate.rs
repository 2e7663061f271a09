//! A guest that checks its x87/SSE/AVX/AVX-512 registers survive other vCPUs.
//!
//! It enables SSE (CR4.OSFXSR) and, where CPUID offers XSAVE, CR4.OSXSAVE, checks that
//! CPUID.1:ECX.OSXSAVE now reads 1, and sets XCR0 with XSETBV to every component
//! CPUID.(EAX=0Dh,ECX=0) offers among x87, SSE, AVX and AVX-512 (XGETBV must read it
//! back). An XSETBV no policy allows (AVX without SSE) must raise #GP, which its
//! handler counts and skips; so must enabling AVX when the policy does not offer it. Then, `rounds=` times (default 20), it fills every
//! vector register (XMM0-15, or YMM0-15 with AVX, or ZMM0-31 and k0-7 with AVX-512),
//! the x87 stack top and MXCSR with values derived from `seed=` and the round, yields
//! to the hypervisor a few times (so other domains run and fill their own registers),
//! prints and runs CPUID (exits the hypervisor handles), and reads everything back.
//!
//! Reports: `xcr0`, `width` (bytes per vector register checked), `gp` (XSETBVs
//! refused), `rounds`, `bad` (registers that came back different). With `every=K`
//! also `progress` (rounds done) and `badsofar` after every K rounds, for a test that
//! watches a practically endless run move between hosts. Exits 0 when no
//! register changed and the XSETBV of AVX without SSE faulted; 1 otherwise.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_kernels::{BootInfo, Hypercall, arg, cpuid, guest_main, hypercall, println, report};

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 3],
    idt: [[u64; 2]; 32],
}

static mut TABLES: Tables = Tables { gdt: [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff], idt: [[0; 2]; 32] };

/// #GP faults taken (the handler increments it and skips the 3-byte XSETBV).
#[unsafe(no_mangle)]
static FPUSTATE_GP: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static fpustate_gp: u8;
    static fpustate_other: u8;
}

// #GP: drop the error code, step over the XSETBV (0F 01 D1) that faulted, count.
// Anything else is unexpected: exit 100 + 0.
global_asm!(
    ".global fpustate_gp",
    "fpustate_gp:",
    "add rsp, 8",
    "add qword ptr [rsp], 3",
    "lock inc qword ptr [rip + FPUSTATE_GP]",
    "iretq",
    ".global fpustate_other",
    "fpustate_other:",
    "jmp {other}",
    other = sym other,
);

extern "sysv64" fn other() -> ! {
    report(b"unexpected", 1);
    guest_kernels::exit(100)
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn install_tables() {
    let gate = |handler: u64| -> [u64; 2] {
        let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        [low, handler >> 32]
    };
    // SAFETY: single-threaded guest; TABLES is only touched here.
    unsafe {
        let t = &raw mut TABLES;
        for v in 0..32 {
            (*t).idt[v] = gate(&raw const fpustate_other as u64);
        }
        (*t).idt[13] = gate(&raw const fpustate_gp as u64);
        let gdt = Pointer { limit: 23, base: (&raw const (*t).gdt) as u64 };
        let idt = Pointer { limit: (32 * 16 - 1) as u16, base: (&raw const (*t).idt) as u64 };
        asm!("lgdt [{}]", "lidt [{}]", in(reg) &gdt, in(reg) &idt);
    }
}

fn xsetbv(value: u64) {
    // SAFETY: CR4.OSXSAVE is set before this is called; a refused value raises #GP,
    // which the handler skips.
    unsafe { asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32) };
}

fn xgetbv() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set; XGETBV only reads.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Vector registers and their width.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Width {
    Xmm,
    Ymm,
    Zmm,
}

/// Register file image: 32 registers of 64 bytes, 8 opmasks, x87 top, MXCSR.
#[repr(C, align(64))]
struct Image {
    vec: [[u8; 64]; 32],
    k: [u16; 8],
    st0: u64,
    mxcsr: u32,
}

impl Image {
    const fn zero() -> Self {
        Image { vec: [[0; 64]; 32], k: [0; 8], st0: 0, mxcsr: 0 }
    }
}

static mut WANT: Image = Image::zero();
static mut GOT: Image = Image::zero();

fn fill(img: &mut Image, seed: u64, round: u64) {
    for (r, reg) in img.vec.iter_mut().enumerate() {
        for (b, byte) in reg.iter_mut().enumerate() {
            *byte = (seed.wrapping_mul(131) ^ round.wrapping_mul(29) ^ (r as u64 * 7) ^ (b as u64 * 3)) as u8;
        }
    }
    for (i, k) in img.k.iter_mut().enumerate() {
        *k = (seed as u16).wrapping_mul(257) ^ (round as u16) ^ i as u16;
    }
    // An integer the x87 loads exactly (FILD/FISTP round-trip), distinct per seed/round.
    img.st0 = seed << 20 | round;
    // Rounding control (bits 14:13) and flush-to-zero (15) vary; exceptions stay masked.
    img.mxcsr = 0x1f80 | ((((seed + round) & 3) as u32) << 13) | (((seed & 1) as u32) << 15);
}

/// Load `img` into the registers.
///
/// # Safety
/// The register width must be enabled (CR4.OSFXSR, XCR0) and offered by CPUID.
unsafe fn load(img: &Image, w: Width) {
    let p = img as *const Image;
    // SAFETY: the caller checked the width is usable; `p` points at a 64-aligned image.
    unsafe {
        match w {
            Width::Xmm => asm!(
                "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 64]", "movdqu xmm2, [{p} + 128]", "movdqu xmm3, [{p} + 192]",
                "movdqu xmm4, [{p} + 256]", "movdqu xmm5, [{p} + 320]", "movdqu xmm6, [{p} + 384]", "movdqu xmm7, [{p} + 448]",
                "movdqu xmm8, [{p} + 512]", "movdqu xmm9, [{p} + 576]", "movdqu xmm10, [{p} + 640]", "movdqu xmm11, [{p} + 704]",
                "movdqu xmm12, [{p} + 768]", "movdqu xmm13, [{p} + 832]", "movdqu xmm14, [{p} + 896]", "movdqu xmm15, [{p} + 960]",
                p = in(reg) p, options(nostack, readonly),
            ),
            Width::Ymm => asm!(
                "vmovdqu ymm0, [{p}]", "vmovdqu ymm1, [{p} + 64]", "vmovdqu ymm2, [{p} + 128]", "vmovdqu ymm3, [{p} + 192]",
                "vmovdqu ymm4, [{p} + 256]", "vmovdqu ymm5, [{p} + 320]", "vmovdqu ymm6, [{p} + 384]", "vmovdqu ymm7, [{p} + 448]",
                "vmovdqu ymm8, [{p} + 512]", "vmovdqu ymm9, [{p} + 576]", "vmovdqu ymm10, [{p} + 640]", "vmovdqu ymm11, [{p} + 704]",
                "vmovdqu ymm12, [{p} + 768]", "vmovdqu ymm13, [{p} + 832]", "vmovdqu ymm14, [{p} + 896]", "vmovdqu ymm15, [{p} + 960]",
                p = in(reg) p, options(nostack, readonly),
            ),
            Width::Zmm => asm!(
                "vmovdqu64 zmm0, [{p}]", "vmovdqu64 zmm1, [{p} + 64]", "vmovdqu64 zmm2, [{p} + 128]", "vmovdqu64 zmm3, [{p} + 192]",
                "vmovdqu64 zmm4, [{p} + 256]", "vmovdqu64 zmm5, [{p} + 320]", "vmovdqu64 zmm6, [{p} + 384]", "vmovdqu64 zmm7, [{p} + 448]",
                "vmovdqu64 zmm8, [{p} + 512]", "vmovdqu64 zmm9, [{p} + 576]", "vmovdqu64 zmm10, [{p} + 640]", "vmovdqu64 zmm11, [{p} + 704]",
                "vmovdqu64 zmm12, [{p} + 768]", "vmovdqu64 zmm13, [{p} + 832]", "vmovdqu64 zmm14, [{p} + 896]", "vmovdqu64 zmm15, [{p} + 960]",
                "vmovdqu64 zmm16, [{p} + 1024]", "vmovdqu64 zmm17, [{p} + 1088]", "vmovdqu64 zmm18, [{p} + 1152]", "vmovdqu64 zmm19, [{p} + 1216]",
                "vmovdqu64 zmm20, [{p} + 1280]", "vmovdqu64 zmm21, [{p} + 1344]", "vmovdqu64 zmm22, [{p} + 1408]", "vmovdqu64 zmm23, [{p} + 1472]",
                "vmovdqu64 zmm24, [{p} + 1536]", "vmovdqu64 zmm25, [{p} + 1600]", "vmovdqu64 zmm26, [{p} + 1664]", "vmovdqu64 zmm27, [{p} + 1728]",
                "vmovdqu64 zmm28, [{p} + 1792]", "vmovdqu64 zmm29, [{p} + 1856]", "vmovdqu64 zmm30, [{p} + 1920]", "vmovdqu64 zmm31, [{p} + 1984]",
                "kmovw k0, [{p} + 2048]", "kmovw k1, [{p} + 2050]", "kmovw k2, [{p} + 2052]", "kmovw k3, [{p} + 2054]",
                "kmovw k4, [{p} + 2056]", "kmovw k5, [{p} + 2058]", "kmovw k6, [{p} + 2060]", "kmovw k7, [{p} + 2062]",
                p = in(reg) p, options(nostack, readonly),
            ),
        }
        asm!("fninit", "fild qword ptr [{p} + 2064]", "ldmxcsr [{p} + 2072]", p = in(reg) p, options(nostack));
    }
}

/// Store the registers into `img` (the x87 top is popped).
///
/// # Safety
/// As for [`load`], after a [`load`] of the same width.
unsafe fn store(img: &mut Image, w: Width) {
    let p = img as *mut Image;
    // SAFETY: as for `load`.
    unsafe {
        match w {
            Width::Xmm => asm!(
                "movdqu [{p}], xmm0", "movdqu [{p} + 64], xmm1", "movdqu [{p} + 128], xmm2", "movdqu [{p} + 192], xmm3",
                "movdqu [{p} + 256], xmm4", "movdqu [{p} + 320], xmm5", "movdqu [{p} + 384], xmm6", "movdqu [{p} + 448], xmm7",
                "movdqu [{p} + 512], xmm8", "movdqu [{p} + 576], xmm9", "movdqu [{p} + 640], xmm10", "movdqu [{p} + 704], xmm11",
                "movdqu [{p} + 768], xmm12", "movdqu [{p} + 832], xmm13", "movdqu [{p} + 896], xmm14", "movdqu [{p} + 960], xmm15",
                p = in(reg) p, options(nostack),
            ),
            Width::Ymm => asm!(
                "vmovdqu [{p}], ymm0", "vmovdqu [{p} + 64], ymm1", "vmovdqu [{p} + 128], ymm2", "vmovdqu [{p} + 192], ymm3",
                "vmovdqu [{p} + 256], ymm4", "vmovdqu [{p} + 320], ymm5", "vmovdqu [{p} + 384], ymm6", "vmovdqu [{p} + 448], ymm7",
                "vmovdqu [{p} + 512], ymm8", "vmovdqu [{p} + 576], ymm9", "vmovdqu [{p} + 640], ymm10", "vmovdqu [{p} + 704], ymm11",
                "vmovdqu [{p} + 768], ymm12", "vmovdqu [{p} + 832], ymm13", "vmovdqu [{p} + 896], ymm14", "vmovdqu [{p} + 960], ymm15",
                p = in(reg) p, options(nostack),
            ),
            Width::Zmm => asm!(
                "vmovdqu64 [{p}], zmm0", "vmovdqu64 [{p} + 64], zmm1", "vmovdqu64 [{p} + 128], zmm2", "vmovdqu64 [{p} + 192], zmm3",
                "vmovdqu64 [{p} + 256], zmm4", "vmovdqu64 [{p} + 320], zmm5", "vmovdqu64 [{p} + 384], zmm6", "vmovdqu64 [{p} + 448], zmm7",
                "vmovdqu64 [{p} + 512], zmm8", "vmovdqu64 [{p} + 576], zmm9", "vmovdqu64 [{p} + 640], zmm10", "vmovdqu64 [{p} + 704], zmm11",
                "vmovdqu64 [{p} + 768], zmm12", "vmovdqu64 [{p} + 832], zmm13", "vmovdqu64 [{p} + 896], zmm14", "vmovdqu64 [{p} + 960], zmm15",
                "vmovdqu64 [{p} + 1024], zmm16", "vmovdqu64 [{p} + 1088], zmm17", "vmovdqu64 [{p} + 1152], zmm18", "vmovdqu64 [{p} + 1216], zmm19",
                "vmovdqu64 [{p} + 1280], zmm20", "vmovdqu64 [{p} + 1344], zmm21", "vmovdqu64 [{p} + 1408], zmm22", "vmovdqu64 [{p} + 1472], zmm23",
                "vmovdqu64 [{p} + 1536], zmm24", "vmovdqu64 [{p} + 1600], zmm25", "vmovdqu64 [{p} + 1664], zmm26", "vmovdqu64 [{p} + 1728], zmm27",
                "vmovdqu64 [{p} + 1792], zmm28", "vmovdqu64 [{p} + 1856], zmm29", "vmovdqu64 [{p} + 1920], zmm30", "vmovdqu64 [{p} + 1984], zmm31",
                "kmovw [{p} + 2048], k0", "kmovw [{p} + 2050], k1", "kmovw [{p} + 2052], k2", "kmovw [{p} + 2054], k3",
                "kmovw [{p} + 2056], k4", "kmovw [{p} + 2058], k5", "kmovw [{p} + 2060], k6", "kmovw [{p} + 2062], k7",
                p = in(reg) p, options(nostack),
            ),
        }
        asm!("fistp qword ptr [{p} + 2064]", "stmxcsr [{p} + 2072]", p = in(reg) p, options(nostack));
    }
}

/// Registers of `got` that differ from `want` at width `w` (x87 top and MXCSR count
/// as one register each).
fn differences(want: &Image, got: &Image, w: Width) -> u64 {
    let (regs, bytes) = match w {
        Width::Xmm => (16, 16),
        Width::Ymm => (16, 32),
        Width::Zmm => (32, 64),
    };
    let mut bad = (0..regs).filter(|&r| want.vec[r][..bytes] != got.vec[r][..bytes]).count() as u64;
    if w == Width::Zmm {
        bad += (0..8).filter(|&i| want.k[i] != got.k[i]).count() as u64;
    }
    bad += u64::from(want.st0 != got.st0) + u64::from(want.mxcsr != got.mxcsr);
    bad
}

fn main(info: &BootInfo) -> u64 {
    let seed = arg(info, "seed").unwrap_or(1);
    let rounds = arg(info, "rounds").unwrap_or(20);
    let every = arg(info, "every").unwrap_or(0);
    install_tables();
    let l1 = cpuid(1, 0);
    let has_xsave = l1[2] & (1 << 26) != 0;
    // SAFETY: CR4.OSFXSR and OSXMMEXCPT enable SSE (SDM Vol. 3A 13.1.4); OSXSAVE only
    // where CPUID offers XSAVE.
    unsafe {
        let mut cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4);
        cr4 |= (1 << 9) | (1 << 10) | if has_xsave { 1 << 18 } else { 0 };
        asm!("mov cr4, {}", in(reg) cr4);
    }
    let mut width = Width::Xmm;
    let mut xcr0 = 0;
    if has_xsave {
        if cpuid(1, 0)[2] & (1 << 27) == 0 {
            println!("fpustate: CPUID.1:ECX.OSXSAVE is 0 after setting CR4.OSXSAVE");
            report(b"osxsave", 0);
            return 1;
        }
        let d = cpuid(0xd, 0);
        let offered = u64::from(d[0]) | (u64::from(d[3]) << 32);
        xcr0 = offered & 0xe7;
        if xcr0 & 0xe0 != 0xe0 {
            xcr0 &= 7;
        }
        // A value no policy allows: AVX without SSE (SDM Vol. 1 13.3) must be #GP.
        xsetbv(0b101);
        // Without AVX in the policy, AVX must be refused too, even where the CPU has
        // it: only the hypervisor's XSETBV intercept can do that.
        if offered & 4 == 0 {
            xsetbv(0b111);
        }
        xsetbv(xcr0);
        if xgetbv() != xcr0 {
            println!("fpustate: XGETBV reads {:#x} after XSETBV {xcr0:#x}", xgetbv());
            return 1;
        }
        let ext = cpuid(7, 0)[1];
        if xcr0 & 0xe7 == 0xe7 && ext & (1 << 16) != 0 {
            width = Width::Zmm;
        } else if xcr0 & 4 != 0 && l1[2] & (1 << 28) != 0 {
            width = Width::Ymm;
        }
    }
    let gp = FPUSTATE_GP.load(Ordering::Relaxed);
    let bytes = match width {
        Width::Xmm => 16,
        Width::Ymm => 32,
        Width::Zmm => 64,
    };
    println!("fpustate: seed {seed}, XCR0 {xcr0:#x}, {bytes}-byte vector registers, {gp} #GP from the bad XSETBV");
    let mut bad = 0;
    for round in 0..rounds {
        // SAFETY: single-threaded guest; WANT/GOT are only touched here. The width was
        // chosen from what CPUID offers and XCR0 enables.
        unsafe {
            let (want_ptr, got_ptr) = (&raw mut WANT, &raw mut GOT);
            let (want, got) = (&mut *want_ptr, &mut *got_ptr);
            fill(want, seed, round);
            load(want, width);
            // Let the other domains run (and fill their registers), and make the
            // hypervisor handle exits of its own kinds in between.
            for _ in 0..3 {
                hypercall(Hypercall::Yield, 0, 0);
                core::hint::black_box(cpuid(0, 0));
            }
            for _ in 0..20_000 {
                core::hint::spin_loop();
            }
            store(got, width);
            let d = differences(want, got, width);
            if d != 0 {
                println!("fpustate: round {round}: {d} registers changed");
            }
            bad += d;
        }
        if every != 0 && (round + 1) % every == 0 {
            report(b"progress", round + 1);
            report(b"badsofar", bad);
        }
    }
    println!("fpustate: {rounds} rounds, {bad} registers changed");
    report(b"xcr0", xcr0);
    report(b"width", bytes);
    report(b"gp", gp);
    report(b"rounds", rounds);
    report(b"bad", bad);
    // AVX without SSE faults on any CPU; whether the policy's refusal of AVX faulted
    // too is for the system test to judge (it depends on the XSETBV intercept).
    u64::from(bad != 0 || (has_xsave && gp == 0))
}

guest_main!(main);
