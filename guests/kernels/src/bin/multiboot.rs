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
    mov edi, 0x21
9:
    mov eax, edi
    mov dx, 0xf4
    out dx, al
    cli
8:
    hlt
    jmp 8b

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
    .balign 4
mb_end:
    .code64
"#
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
