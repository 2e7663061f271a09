//! The runtime every test guest shares: entry, console on the emulated UART,
//! hypercalls, panic handling. See `guest_abi` for the contract with the hypervisor.
//!
//! These kernels run only inside the hypervisor (target x86_64-unknown-none, built by
//! `cargo xtask build`); they are test instruments, kept small and obvious.
#![no_std]

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

pub use guest_abi::{BootInfo, Hypercall, tag};

static ARCH: AtomicU32 = AtomicU32::new(0);

/// Make a hypercall (VMCALL or VMMCALL, whichever the boot info named).
pub fn hypercall(call: Hypercall, a: u64, b: u64) -> u64 {
    let mut rax = call as u64;
    if ARCH.load(Ordering::Relaxed) == guest_abi::Arch::Vmx as u32 {
        // SAFETY: VMCALL exits to the hypervisor, which implements the ABI in guest_abi;
        // it only changes RAX.
        unsafe { core::arch::asm!("vmcall", inout("rax") rax, in("rdi") a, in("rsi") b) };
    } else {
        // SAFETY: as above, with AMD's instruction.
        unsafe { core::arch::asm!("vmmcall", inout("rax") rax, in("rdi") a, in("rsi") b) };
    }
    rax
}

/// Report a tagged value to the hypervisor (test results).
pub fn report(name: &[u8], value: u64) {
    hypercall(Hypercall::Report, tag(name), value);
}

/// Stop with an exit code (0 = success).
pub fn exit(code: u64) -> ! {
    hypercall(Hypercall::Exit, code, 0);
    loop {
        // SAFETY: HLT with interrupts off parks the vCPU; the hypervisor has stopped us.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// The console: the UART's transmit register.
#[derive(Debug)]
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: OUT to the emulated UART's data port; the hypervisor traps it.
            unsafe { core::arch::asm!("out dx, al", in("dx") guest_abi::UART_PORT, in("al") b) };
        }
        Ok(())
    }
}

/// Print a line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Console, $($arg)*);
    }};
}

/// CPUID with a subleaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// RDMSR. The test guests read only MSRs the hypervisor emulates, or (misbehave's
/// `garbage`) ones whose #GP their handler skips (both RDMSR and WRMSR are 2 bytes).
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR only writes EAX and EDX; an MSR the guest may not read raises #GP,
    // which the caller's IDT handles (see above).
    unsafe { core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// WRMSR, with the same rules as [`rdmsr`].
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`; the guests write the LAPIC's MSRs and IA32_APIC_BASE.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
    };
}

/// RDTSC.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Read the boot info the loader put at RDI and remember the hypercall flavour.
///
/// # Safety
/// `info` must be the pointer the hypervisor passed in RDI.
pub unsafe fn init(info: *const BootInfo) -> &'static BootInfo {
    // SAFETY: the loader wrote a BootInfo there, in identity-mapped guest memory that
    // nothing else writes.
    let info = unsafe { &*info };
    ARCH.store(info.arch, Ordering::Relaxed);
    info
}

/// Value of `key=N` in the command line (decimal or 0x hex).
pub fn arg(info: &BootInfo, key: &str) -> Option<u64> {
    info.cmdline().split_whitespace().filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).and_then(|(_, v)| {
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// Define the guest's entry point: `guest_main!(main)` with `fn main(&BootInfo) -> u64`.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        #[unsafe(no_mangle)]
        #[unsafe(link_section = ".text._start")]
        extern "sysv64" fn _start(info: *const $crate::BootInfo) -> ! {
            // SAFETY: the hypervisor passes the boot-info block in RDI (guest_abi).
            let info = unsafe { $crate::init(info) };
            let code = $main(info);
            $crate::exit(code)
        }

        #[panic_handler]
        fn panic(p: &core::panic::PanicInfo<'_>) -> ! {
            $crate::println!("PANIC: {p}");
            $crate::exit(0xdead)
        }
    };
}
