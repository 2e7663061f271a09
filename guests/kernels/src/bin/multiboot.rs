//! A multiboot v1 test kernel: entered by the hypervisor's multiboot loader in 32-bit
//! protected mode with paging off, it checks what the protocol promises and reports
//! through the isa-debug-exit port 0xF4 (a write of v ends the domain with code
//! (v << 1) | 1):
//!
//! | v | meaning |
//! |---|---|
//! | 0x21 (code 67) | every check passed |
//! | 1 | EAX is not 0x2BADB002 |
//! | 2 | the information's flags lack memory, command line or memory map |
//! | 3 | mem_upper is 0 |
//! | 4 | CR0 is not protected mode with paging off |
//! | 5 | CS is not a 32-bit code segment (a 16-bit far call would not return here) |
//! | 6 | the LAPIC timer never fired: no interrupt within 2^32 TSC ticks of arming it |
//! | 7 | only one timer interrupt within 2^32 TSC ticks (periodic reload or EOI broken) |
//! | 8 | an interrupt or exception arrived on a vector other than the timer's 0x40 |
//!
//! After the entry checks it takes local APIC timer interrupts in protected mode: a
//! 32-bit IDT (every vector but 0x40 goes to a handler that exits with 8), the LAPIC
//! enabled in IA32_APIC_BASE and software-enabled through its xAPIC page at 0xFEE00000
//! (SVR), the timer periodic every 1 ms (divide by 1, initial count 1,000,000 at the
//! hypervisor's 1 GHz APIC clock) on vector 0x40, each interrupt acknowledged by a
//! write to the EOI register, all through MMIO. It first spins with interrupts on
//! until two interrupts have come (bounded by the TSC, so a timer that never fires
//! ends in 6 or 7, not a hang), then sleeps in `sti; hlt` until `TICKS` (10) have come,
//! counting how often HLT returned, masks the timer and prints
//! `multiboot: LAPIC timer: TICKS interrupts, W wakeups` (8 hex digits each).
//!
//! It also prints a greeting and its command line on COM1 with polled port I/O, so the
//! test sees the information's cmdline pointer work. Everything is 32-bit assembly:
//! the file is an ELF64 (the guests' target) whose multiboot header uses the a.out
//! kludge (flag 16), so the loader takes the addresses from the header, not the ELF.
#![no_std]
#![no_main]

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .code32
    .balign 4
mb_header:
    .long 0x1badb002                       /* magic */
    .long 0x00010003                       /* flags: page-align, memory info, a.out kludge */
    .long -(0x1badb002 + 0x00010003)       /* checksum */
    .long mb_header                        /* header_addr */
    .long mb_header                        /* load_addr: the header is the first byte loaded */
    .long mb_end                           /* load_end_addr */
    .long 0                                /* bss_end_addr: no bss */
    .long _start                           /* entry_addr */

    .global _start
_start:
    mov esp, 0x8ff0
    mov edi, 1
    cmp eax, 0x2badb002
    jne 9f
    mov edi, 2
    mov ecx, [ebx]
    and ecx, 0x45                          /* memory (0), cmdline (2), mmap (6) */
    cmp ecx, 0x45
    jne 9f
    mov edi, 3
    cmp dword ptr [ebx + 8], 0
    je 9f
    mov edi, 4
    mov ecx, cr0
    and ecx, 0x80000001
    cmp ecx, 1
    jne 9f
    mov edi, 5
    mov cx, cs
    cmp cx, 0x08
    jne 9f

    lea esi, [greeting]
    call puts
    mov esi, [ebx + 16]                    /* cmdline */
    call puts
    mov al, 0x0a
    call putc

    /* A 32-bit IDT: interrupt gates (type 0xE, present, DPL 0, selector 0x08); vector
       0x40 to mb_tick, every other vector to mb_stray. SDM Vol. 3A 6.11. */
    xor ecx, ecx
10:
    lea eax, [mb_stray]
    cmp ecx, 0x40
    jne 11f
    lea eax, [mb_tick]
11:
    mov edx, eax
    and eax, 0xffff
    or eax, 0x00080000
    mov [mb_idt + ecx * 8], eax
    and edx, 0xffff0000
    or edx, 0x8e00
    mov [mb_idt + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 256
    jne 10b
    lidt [mb_idtr]

    /* IA32_APIC_BASE: global enable (bit 11), xAPIC mode at 0xFEE00000, SDM Vol. 3A 11.4.4. */
    mov ecx, 0x1b
    rdmsr
    or eax, 0x800
    and eax, 0xfffffbff                    /* not x2APIC (bit 10) */
    wrmsr
    /* SDM Vol. 3A 11.4.1 (register offsets), 11.5.4 (timer), 11.9 (SVR). */
    mov dword ptr [0xfee000f0], 0x1ff      /* SVR: software enable, spurious vector 0xFF */
    mov dword ptr [0xfee003e0], 0xb        /* divide configuration: by 1 */
    mov dword ptr [0xfee00320], 0x20040    /* LVT timer: periodic, vector 0x40, unmasked */
    rdtsc
    mov ebp, edx                           /* TSC high word at arming */
    mov dword ptr [0xfee00380], 1000000    /* initial count: 1 ms at 1 GHz */

    /* Phase 1: spin with interrupts on until two ticks came, at most 2^32..2^33 TSC ticks. */
    sti
12:
    cmp dword ptr [mb_ticks], 2
    jae 13f
    pause
    rdtsc
    sub edx, ebp
    cmp edx, 2
    jb 12b
    cli
    mov edi, 6
    cmp dword ptr [mb_ticks], 0
    je 9f
    mov edi, 7
    jmp 9f

    /* Phase 2: sleep until TICKS came; STI's shadow covers HLT, so no tick is lost. */
13:
    xor esi, esi                           /* HLT wakeups */
14:
    cli
    cmp dword ptr [mb_ticks], {ticks}
    jae 15f
    sti
    hlt
    inc esi
    jmp 14b
15:
    mov dword ptr [0xfee00320], 0x10040    /* mask the timer */
    mov dword ptr [0xfee00380], 0          /* and stop it */
    mov edi, esi
    lea esi, [timer_msg]
    call puts
    mov eax, [mb_ticks]
    call puthex
    lea esi, [timer_msg2]
    call puts
    mov eax, edi
    call puthex
    lea esi, [timer_msg3]
    call puts
    mov edi, 0x21
9:
    mov eax, edi
    mov dx, 0xf4
    out dx, al
    cli
8:
    hlt
    jmp 8b

/* The timer: count, EOI through the xAPIC page (SDM Vol. 3A 11.8.5), return. */
mb_tick:
    inc dword ptr [mb_ticks]
    mov dword ptr [0xfee000b0], 0
    iretd

/* Any other vector: exit with 8 at once (an error code on the stack does not matter). */
mb_stray:
    mov al, 8
    mov dx, 0xf4
    out dx, al
    cli
16:
    hlt
    jmp 16b

/* Print EAX as 8 hex digits. */
puthex:
    mov ecx, 8
17:
    rol eax, 4
    push eax
    and al, 0xf
    add al, 0x30
    cmp al, 0x3a
    jb 18f
    add al, 0x27
18:
    push ecx
    call putc
    pop ecx
    pop eax
    dec ecx
    jnz 17b
    ret

/* Print the NUL-terminated string at ESI. */
puts:
    mov al, [esi]
    test al, al
    jz 2f
    call putc
    inc esi
    jmp puts
2:
    ret

/* Wait for THR empty (LSR bit 5), then send AL to COM1. */
putc:
    mov ah, al
    mov dx, 0x3fd
3:
    in al, dx
    test al, 0x20
    jz 3b
    mov al, ah
    mov dx, 0x3f8
    out dx, al
    ret

greeting:
    .asciz "multiboot: 32-bit protected mode, paging off; cmdline: "
timer_msg:
    .asciz "multiboot: LAPIC timer: "
timer_msg2:
    .asciz " interrupts, "
timer_msg3:
    .asciz " wakeups\n"
    .balign 8
mb_ticks:
    .long 0
mb_idtr:
    .word 256 * 8 - 1
    .long mb_idt
    .balign 8
mb_idt:
    .space 256 * 8
mb_end:
    .code64
"#,
    ticks = const TICKS,
);

/// Timer interrupts the kernel waits for (see the module doc).
const TICKS: u32 = 10;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
