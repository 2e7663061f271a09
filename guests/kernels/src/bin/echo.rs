//! Echoes its console input: polls the UART's line status register (LSR.DR, bit 0),
//! reads each byte from the receive buffer (RBR) and writes it back to the transmit
//! register, yielding while nothing is waiting. After each line it reports the line's
//! length (`line`) and prints `echo: line N: <text>`, so a test sees that every byte
//! arrived in order; the line `quit` ends it with exit code 0. For
//! `hvctl domain console --interactive` round trips; no interrupts are used.
#![no_std]
#![no_main]

use guest_kernels::{Hypercall, guest_main, hypercall, println, report};

/// Line status register: data ready.
const LSR_DR: u8 = 0x01;

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: IN from the emulated UART's ports; the hypervisor traps it.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v) };
    v
}

fn outb(port: u16, v: u8) {
    // SAFETY: OUT to the emulated UART's transmit register; the hypervisor traps it.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v) };
}

fn main(_info: &guest_kernels::BootInfo) -> u64 {
    let uart = guest_abi::UART_PORT;
    println!("echo: ready");
    let mut line = [0u8; 128];
    let mut len = 0usize;
    let mut lines = 0u64;
    loop {
        if inb(uart + 5) & LSR_DR == 0 {
            hypercall(Hypercall::Yield, 0, 0);
            continue;
        }
        let b = inb(uart);
        outb(uart, b);
        if b == b'\n' || b == b'\r' {
            if b == b'\r' {
                outb(uart, b'\n');
            }
            lines += 1;
            let text = core::str::from_utf8(&line[..len]).unwrap_or("(not UTF-8)");
            println!("echo: line {lines}: {text}");
            report(b"line", len as u64);
            if text == "quit" {
                return 0;
            }
            len = 0;
        } else if len < line.len() {
            line[len] = b;
            len += 1;
        }
    }
}

guest_main!(main);
