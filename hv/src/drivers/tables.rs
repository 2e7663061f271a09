//! The hypervisor's own GDT (with a TSS) and IDT, loaded right after ExitBootServices.
//!
//! Why our own: firmware leaves TR = 0 (at least OVMF does), but VMX requires a
//! non-null host TR selector (SDM Vol. 3C 26.2.3), and after ExitBootServices the
//! firmware's exception handlers live in memory we no longer own and would dead-loop
//! silently. Ours print the exception, the registers and shut the machine down, so a
//! fault is never a hang.
//!
//! Layout: 0x08 64-bit code, 0x10 data, 0x18 TSS (two slots).

use alloc::boxed::Box;
use core::arch::{asm, global_asm};

/// Kernel code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Kernel data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task-state segment selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// 64-bit TSS (SDM Vol. 3A 8.7, Figure 8-11). Only present so TR is valid; no stack
/// switching is configured.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

const _: () = assert!(core::mem::size_of::<Tss>() == 104);

/// An IDT gate (SDM Vol. 3A 6.14.1, Figure 6-8).
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5],
    idt: [Gate; 256],
    tss: Tss,
}

/// Where the tables live, for the VMX host-state area.
#[derive(Debug, Clone, Copy)]
pub struct TableBases {
    /// Linear base of the GDT.
    pub gdt: u64,
    /// Linear base of the IDT.
    pub idt: u64,
    /// Linear base of the TSS.
    pub tss: u64,
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Build and load the GDT, TSS and IDT on this CPU. Call once per CPU, with interrupts
/// off; the bases go into the CPU's [`crate::percpu::PerCpu`].
pub fn load() -> TableBases {
    let tables = Box::leak(Box::new(Tables {
        gdt: [0; 5],
        idt: [Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };
            256],
        tss: Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 104 },
    }));
    // SDM Vol. 3A 3.4.5: code: P, DPL0, S, type 0xA (execute/read), L=1, G=1.
    tables.gdt[1] = 0x00af_9a00_0000_ffff;
    // data: P, DPL0, S, type 0x2 (read/write), D/B=1, G=1.
    tables.gdt[2] = 0x00cf_9200_0000_ffff;
    // SDM Vol. 3A 8.2.3: 16-byte TSS descriptor, type 0x9 (available 64-bit TSS), P.
    let tss = &raw const tables.tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    tables.gdt[3] = (limit & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    tables.gdt[4] = tss >> 32;

    let stubs = &raw const hv_exception_stubs as u64;
    let irq = &raw const hv_interrupt_stub as u64;
    for (vector, gate) in tables.idt.iter_mut().enumerate() {
        // Exceptions get one stub each (they report and stop); every other vector
        // shares the stub that acknowledges it at the local APIC (cpu::lapic).
        let handler = if vector < 32 { stubs + 16 * vector as u64 } else { irq };
        *gate = Gate {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            type_attr: 0x8e, // P, DPL0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
    }

    let gdt = Pointer { limit: (core::mem::size_of::<[u64; 5]>() - 1) as u16, base: tables.gdt.as_ptr() as u64 };
    let idt = Pointer { limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16, base: tables.idt.as_ptr() as u64 };
    // the GDT holds valid flat code/data descriptors and a TSS descriptor for a live TSS. The far return reloads CS
    // with our code selector (same flat mapping, so execution continues at the next label); data segments get our
    // flat data selector. FS/GS are left alone (their bases are MSRs). LTR marks our TSS busy, which is why it runs
    // exactly once per CPU.
    // SAFETY: the tables are leaked, so they live forever at these addresses;
    unsafe {
        asm!(
            "lgdt [{gdt}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tr:x}",
            "lidt [{idt}]",
            gdt = in(reg) &gdt,
            idt = in(reg) &idt,
            cs = in(reg) u64::from(CODE_SELECTOR),
            ds = in(reg) DATA_SELECTOR,
            tr = in(reg) TSS_SELECTOR,
            tmp = out(reg) _,
        );
    }
    TableBases { gdt: gdt.base, idt: idt.base, tss }
}

/// Registers saved by the exception stubs, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

extern "sysv64" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let name = EXCEPTION_NAMES.get(frame.vector as usize).copied().unwrap_or("unknown");
    // SAFETY: reading CR2 has no side effects; we are at CPL0.
    let cr2 = unsafe { x86::controlregs::cr2() };
    crate::println!(
        "FATAL: CPU exception {} (vector {}) in the hypervisor, error code {:#x}",
        name,
        frame.vector,
        frame.error_code
    );
    crate::println!(
        "  rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x} cr2={:#x}",
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        cr2
    );
    crate::println!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    );
    crate::println!(
        "  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15
    );
    crate::shutdown(crate::Outcome::Failed)
}

unsafe extern "C" {
    /// First of 32 exception entry stubs, 16 bytes apart (defined below).
    static hv_exception_stubs: u8;
    /// The entry of every vector from 32 up (defined below).
    static hv_interrupt_stub: u8;
}

// Interrupts (vectors 32-255): save the registers the SysV ABI lets a call clobber (an
// interrupt may arrive while a guest's registers are live, inside the SVM entry
// path), acknowledge at the local APIC, restore, IRETQ. On entry the CPU aligned RSP
// to 16 and pushed 5 quadwords; 9 more pushes realign it for the call.
global_asm!(
    ".balign 16",
    ".global hv_interrupt_stub",
    "hv_interrupt_stub:",
    "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11",
    "call {ack}",
    "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
    "iretq",
    ack = sym crate::drivers::lapic::acknowledge,
);

// One 16-byte stub per vector: push a zero where the CPU pushes no error code (so the
// frame layout is uniform), push the vector, jump to the common path, which saves the
// general registers and calls `exception_handler` (SysV ABI on every target, since the
// UEFI target's default C ABI is Microsoft's).
macro_rules! stub {
    ($n:literal) => {
        concat!(".balign 16\n push 0\n push ", $n, "\n jmp hv_exception_common\n")
    };
    ($n:literal, error_code) => {
        concat!(".balign 16\n push ", $n, "\n jmp hv_exception_common\n")
    };
}

global_asm!(
    concat!(
        ".balign 16\n",
        ".global hv_exception_stubs\n",
        "hv_exception_stubs:\n",
        stub!(0), stub!(1), stub!(2), stub!(3), stub!(4), stub!(5), stub!(6), stub!(7),
        stub!(8, error_code), stub!(9), stub!(10, error_code), stub!(11, error_code),
        stub!(12, error_code), stub!(13, error_code), stub!(14, error_code), stub!(15),
        stub!(16), stub!(17, error_code), stub!(18), stub!(19), stub!(20), stub!(21, error_code),
        stub!(22), stub!(23), stub!(24), stub!(25), stub!(26), stub!(27), stub!(28),
        stub!(29, error_code), stub!(30, error_code), stub!(31),
        "hv_exception_common:\n",
        " push rax\n push rbx\n push rcx\n push rdx\n push rsi\n push rdi\n push rbp\n",
        " push r8\n push r9\n push r10\n push r11\n push r12\n push r13\n push r14\n push r15\n",
        " mov rdi, rsp\n",
        " and rsp, -16\n",
        " call {handler}\n",
        " ud2\n",
    ),
    handler = sym exception_handler,
);
