//! MMIO emulation, fuzzed: random paging registers, segment state, general registers,
//! guest page tables and instruction bytes through the guest page walk, the decoder
//! and the emulation (`domain::exit::mmio::emulate`). Nothing may panic; an access
//! that happens must be 1, 2, 4 or 8 bytes on the faulting page, in the faulting
//! direction, and the instruction must fit in 15 bytes.
#![no_main]

use hv::arch::state::SegmentRegister;
use hv::arch::{GuestRegs, PagingState, SegmentBases};
use hv::domain::exit::mmio;
use hv::mm::walk::GuestPhys;
use libfuzzer_sys::fuzz_target;

/// 64 KiB of guest RAM from GPA 0; the rest of the address space is not RAM.
struct Ram(Vec<u8>);

impl GuestPhys for Ram {
    fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        self.0.as_mut_slice().read(gpa, out)
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            if let Some((&v, rest)) = self.0.split_first() {
                *x = v;
                self.0 = rest;
            }
        }
        u64::from_le_bytes(b)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    // Keep paging on and the roots inside RAM most of the time, so walks go deep.
    let flags = input.u64();
    let st = PagingState {
        cr0: if flags & 1 != 0 { 0x8000_0011 } else { input.u64() },
        cr3: if flags & 2 != 0 { input.u64() & 0xf000 } else { input.u64() },
        cr4: input.u64(),
        efer: input.u64(),
        rip: if flags & 4 != 0 { input.u64() & 0xffff } else { input.u64() },
        rsp: input.u64(),
        cpl: input.u64() as u8,
        cs: SegmentRegister {
            selector: 8,
            attributes: input.u64() as u16,
            limit: u32::MAX,
            base: if flags & 8 != 0 { 0 } else { input.u64() },
        },
        bases: SegmentBases { es: input.u64(), ss: input.u64(), ds: input.u64(), fs: input.u64(), gs: input.u64() },
    };
    let mut regs = GuestRegs {
        rax: input.u64(),
        rbx: input.u64(),
        rcx: input.u64(),
        rdx: input.u64(),
        rsi: input.u64(),
        rdi: input.u64(),
        rbp: input.u64(),
        r8: input.u64(),
        r9: input.u64(),
        r10: input.u64(),
        r11: input.u64(),
        r12: input.u64(),
        r13: input.u64(),
        r14: input.u64(),
        r15: input.u64(),
    };
    let fault = input.u64();
    let fault_write = flags & 16 != 0;
    let maxphyaddr = (flags >> 8) as u8;
    let reply = input.u64();
    // The rest fills RAM, repeated (tables and code alike).
    let rest = input.0;
    let mut ram = Ram(vec![0; 64 * 1024]);
    if !rest.is_empty() {
        for (i, b) in ram.0.iter_mut().enumerate() {
            *b = rest[i % rest.len()];
        }
    }
    let mut accesses = 0;
    let result = mmio::emulate(
        &mut ram,
        &st,
        &mut regs,
        maxphyaddr,
        fault,
        fault_write,
        &mut |gpa: u64, buf: &mut [u8], write: bool| {
            accesses += 1;
            assert!(matches!(buf.len(), 1 | 2 | 4 | 8), "width {}", buf.len());
            assert_eq!(gpa & !0xfff, fault & !0xfff, "the access is on the faulting page");
            assert_eq!(write, fault_write, "in the faulting direction");
            assert!((gpa & 0xfff) as usize + buf.len() <= 4096, "inside the page");
            if !write {
                hv::devices::put_le(buf, reply);
            }
        },
    );
    match result {
        Ok(d) => {
            assert_eq!(accesses, 1);
            assert!((1..=15).contains(&d.len));
            assert_eq!(d.bytes.as_slice().len() as u64, d.len);
        }
        Err(e) => {
            assert_eq!(accesses, 0, "a refused instruction makes no access");
            // Every reason formats.
            let _ = format!("{e}");
        }
    }
});
