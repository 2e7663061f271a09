//! The boot-time proof that virtualization works: a minimal 64-bit guest that reads a
//! nonce the hypervisor placed in its memory, combines it with a constant, stores the
//! result in its memory and makes a hypercall with it in RAX.
//!
//! `READY` is printed only if the exit is that hypercall and both the register and the
//! guest-memory copy hold the expected value, so the nested page tables, the guest's
//! own paging, guest entry and exit decoding are all exercised. Written once for both
//! backends; only the hypercall instruction differs.
//!
//! Guest-physical layout (each 4 KiB page is its own pool frame, mapped 4 KiB by the
//! nested tables; the guest's own tables map GPA 0-2 MiB 1:1 with one 2 MiB page):
//!
//! | GPA      | what                  |
//! |----------|-----------------------|
//! | 0x1000   | guest PML4            |
//! | 0x2000   | guest PDPT            |
//! | 0x3000   | guest PD              |
//! | 0x7000   | top of the guest stack|
//! | 0x8000   | code                  |
//! | 0x9000   | nonce (u64, from hv)  |
//! | 0xA000   | result (u64, by guest)|

use alloc::vec::Vec;
use core::fmt;

use crate::arch::{ArchError, Backend, ExitReason, GuestEntry, GuestRegs, Vcpu};
use crate::mm::frames::FramePool;
use crate::mm::guest::GuestMemory;
use crate::mm::{MmError, PAGE_SIZE};

/// Pages of guest memory (GPA 0 .. 64 KiB).
pub const GUEST_PAGES: u64 = 16;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const STACK_TOP: u64 = 0x7000;
const CODE: u64 = 0x8000;
const NONCE: u64 = 0x9000;
const RESULT: u64 = 0xa000;
/// The constant the guest XORs into the nonce ("KOVH" little-endian; < 2^31 so the
/// sign-extending `mov r64, imm32` keeps it as is).
pub const GUEST_KEY: u32 = 0x4856_4f4b;

/// The guest's code, with the vendor's hypercall instruction at the end.
pub fn guest_code(hypercall: [u8; 3]) -> Vec<u8> {
    let mut code = Vec::new();
    code.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25]); // mov rax, [disp32]
    code.extend_from_slice(&(NONCE as u32).to_le_bytes());
    code.extend_from_slice(&[0x48, 0xc7, 0xc3]); // mov rbx, imm32
    code.extend_from_slice(&GUEST_KEY.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x31, 0xd8]); // xor rax, rbx
    code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]); // mov [disp32], rax
    code.extend_from_slice(&(RESULT as u32).to_le_bytes());
    code.extend_from_slice(&hypercall); // vmcall / vmmcall
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b
    code
}

/// The value the guest must hand back for `nonce`.
pub fn expected(nonce: u64) -> u64 {
    nonce ^ u64::from(GUEST_KEY)
}

/// What the round trip showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// "vmx" or "svm".
    pub arch: &'static str,
    /// How the guest exited.
    pub exit: ExitReason,
    /// The value the guest returned.
    pub value: u64,
    /// The nonce it was given.
    pub nonce: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Guest round trip ({}): nonce {:#x}, guest returned {:#x} by {} and wrote it to GPA {:#x}: ok",
            self.arch, self.nonce, self.value, self.exit, RESULT
        )
    }
}

/// Why the round trip failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelftestError {
    /// The backend failed.
    Arch(ArchError),
    /// Guest memory could not be set up.
    Memory(MmError),
    /// The guest exited for another reason than the hypercall.
    UnexpectedExit {
        /// The exit.
        reason: ExitReason,
        /// Guest RIP.
        rip: u64,
    },
    /// The guest's answer was wrong.
    WrongValue {
        /// Where: "RAX" or "guest memory".
        place: &'static str,
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
}

impl From<ArchError> for SelftestError {
    fn from(e: ArchError) -> Self {
        SelftestError::Arch(e)
    }
}
impl From<MmError> for SelftestError {
    fn from(e: MmError) -> Self {
        SelftestError::Memory(e)
    }
}

impl fmt::Display for SelftestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelftestError::Arch(e) => write!(f, "{e}"),
            SelftestError::Memory(e) => write!(f, "guest memory: {e}"),
            SelftestError::UnexpectedExit { reason, rip } => {
                write!(f, "guest exited with {reason} at RIP {rip:#x}, expected the hypercall")
            }
            SelftestError::WrongValue { place, expected, found } => {
                write!(f, "guest value in {place} is {found:#x}, expected {expected:#x}")
            }
        }
    }
}

/// Run the round trip on `backend`.
pub fn run<B: Backend>(backend: &mut B, pool: &mut FramePool) -> Result<Report, SelftestError> {
    let mem = GuestMemory::<B::Paging>::new(pool, GUEST_PAGES * PAGE_SIZE, false)?;
    // The guest's own 4-level tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[0] = 2 MiB
    // identity page (P | RW | PS). SDM Vol. 3A 4.5 / APM Vol. 2 5.3.
    mem.write(pool, PML4, &(PDPT | 0x3).to_le_bytes())?;
    mem.write(pool, PDPT, &(PD | 0x3).to_le_bytes())?;
    mem.write(pool, PD, &0x83u64.to_le_bytes())?;
    mem.write(pool, CODE, &guest_code(B::HYPERCALL))?;
    // SAFETY: RDTSC only reads the time-stamp counter; any value is a fine nonce.
    let nonce = unsafe { x86::time::rdtsc() } | 1;
    mem.write(pool, NONCE, &nonce.to_le_bytes())?;

    let mut vcpu =
        backend.create_vcpu(pool, &GuestEntry { nested_root: mem.root(), cr3: PML4, rip: CODE, rsp: STACK_TOP })?;
    let mut regs = GuestRegs::default();
    let exit = vcpu.run(&mut regs, None)?;
    vcpu.destroy(pool)?;
    log::info!("{}: guest exit {} at RIP {:#x}", B::NAME, exit.reason, exit.rip);

    if exit.reason != ExitReason::Hypercall {
        return Err(SelftestError::UnexpectedExit { reason: exit.reason, rip: exit.rip });
    }
    let want = expected(nonce);
    if regs.rax != want {
        return Err(SelftestError::WrongValue { place: "RAX", expected: want, found: regs.rax });
    }
    let stored = mem.read_u64(pool, RESULT)?;
    if stored != want {
        return Err(SelftestError::WrongValue { place: "guest memory", expected: want, found: stored });
    }
    mem.destroy(pool)?;
    Ok(Report { arch: B::NAME, exit: exit.reason, value: regs.rax, nonce })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_code_is_the_documented_instruction_sequence() {
        let code = guest_code([0x0f, 0x01, 0xd9]);
        assert_eq!(
            code,
            [
                0x48, 0x8b, 0x04, 0x25, 0x00, 0x90, 0x00, 0x00, // mov rax, [0x9000]
                0x48, 0xc7, 0xc3, 0x4b, 0x4f, 0x56, 0x48, // mov rbx, 0x48564f4b
                0x48, 0x31, 0xd8, // xor rax, rbx
                0x48, 0x89, 0x04, 0x25, 0x00, 0xa0, 0x00, 0x00, // mov [0xa000], rax
                0x0f, 0x01, 0xd9, // vmmcall
                0xf4, 0xeb, 0xfd, // hlt; jmp hlt
            ]
        );
        assert_eq!(expected(0x1234_0000_0000_0001), 0x1234_0000_4856_4f4a);
    }
}
