//! Hypercalls of `guest_abi` (VMCALL / VMMCALL with the number in RAX, arguments in
//! RDI and RSI, the result in RAX): exit, report a value, yield, and the log-dirty
//! calls the test guests use to watch their own writes.

use alloc::string::String;

use guest_abi::{HYPERCALL_EINVAL, HYPERCALL_OK, Hypercall};

use super::super::DomainError;
use super::super::dirty::{DirtyCtx, MAIN, Mode};
use super::{Action, ExitCtx};
use crate::arch::{Backend, Exit};
use crate::println;

/// Handle the hypercall; RIP is advanced first, so a call that stops the domain or the
/// vCPU leaves it after the instruction.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let regs = ctx.slot().regs;
    let (nr, a, b) = (regs.rax, regs.rdi, regs.rsi);
    let dirty = matches!(
        Hypercall::from_u64(nr),
        Some(Hypercall::DirtyStart | Hypercall::DirtyPeekClean | Hypercall::DirtyStop)
    );
    // A clean re-arms pages a vCPU on another CPU may have cached as writable and
    // dirty: it must be stopped (and flush at its next entry) first.
    if dirty && ctx.others_running {
        return Action::StopOthers;
    }
    let next = ctx.skip(exit);
    if next != Action::Continue {
        return next;
    }
    let id = ctx.d.id;
    let rax = match Hypercall::from_u64(nr) {
        Some(Hypercall::Exit) => return Action::Finish(a),
        Some(Hypercall::Report) => {
            let (name, len) = guest_abi::tag_name(a);
            println!("DOMAIN {id} REPORT {}={b:#x}", String::from_utf8_lossy(&name[..len]));
            let reports = &mut ctx.d.reports;
            if reports.len() == super::super::REPORTS_KEPT {
                reports.remove(0);
            }
            reports.push((a, b));
            HYPERCALL_OK
        }
        Some(Hypercall::Yield) => {
            ctx.slot().regs.rax = HYPERCALL_OK;
            return Action::Yield;
        }
        Some(call @ (Hypercall::DirtyStart | Hypercall::DirtyPeekClean | Hypercall::DirtyStop)) => {
            let mut dirty = DirtyCtx { d: &mut *ctx.d, pool: &mut *ctx.pool, mechanisms: ctx.mechanisms };
            dirty_call(&mut dirty, call, a, b).unwrap_or_else(|e| {
                println!("DOMAIN {id} log-dirty hypercall failed: {e}");
                HYPERCALL_EINVAL
            })
        }
        None => HYPERCALL_EINVAL,
    };
    ctx.slot().regs.rax = rax;
    Action::Continue
}

/// The log-dirty hypercalls on the main log; RAX on success.
/// - `DirtyStart(mode)`: 0 best available, 1 PML, 2 D-bit, 3 write-protect; returns the
///   mode used.
/// - `DirtyPeekClean(buffer, bytes)`: the bitmap into the guest's buffer (at most
///   `bytes`); returns the number of dirty pages.
/// - `DirtyStop`.
fn dirty_call<B: Backend>(dirty: &mut DirtyCtx<'_, B>, call: Hypercall, a: u64, b: u64) -> Result<u64, DomainError> {
    match call {
        Hypercall::DirtyStart => {
            let mode = match a {
                0 => None,
                1 => Some(Mode::Pml),
                2 => Some(Mode::Dbit),
                3 => Some(Mode::Wp),
                _ => return Ok(HYPERCALL_EINVAL),
            };
            dirty.start(MAIN, mode, None).map(|m| match m {
                Mode::Pml => 1,
                Mode::Dbit => 2,
                Mode::Wp => 3,
            })
        }
        Hypercall::DirtyPeekClean => {
            let bitmap = dirty.peek_clean(MAIN, None)?;
            // Word by word into the guest's buffer: no copy of the bitmap on the heap,
            // whose size the guest's memory size decides.
            let d = &mut *dirty.d;
            let mem = d.mem.as_ref().ok_or(DomainError::Unavailable("no memory"))?;
            let mut n = 0u64;
            for w in bitmap.words() {
                if n >= b {
                    break;
                }
                let take = (b - n).min(8) as usize;
                mem.write(dirty.pool, a + n, &w.to_le_bytes()[..take])?;
                n += take as u64;
            }
            super::super::dirty::hypervisor_wrote(d, a..a + n);
            Ok(bitmap.count_ones())
        }
        Hypercall::DirtyStop => dirty.stop(MAIN).map(|_| HYPERCALL_OK),
        _ => Ok(HYPERCALL_EINVAL),
    }
}
