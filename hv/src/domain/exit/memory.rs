//! Nested page faults: a write fault on a page that write-protect logging guards (log
//! it, give write access back, retry), or an access outside the domain's RAM, which is
//! MMIO ([`super::mmio`] decodes and emulates it). A fault inside RAM that no log
//! explains stops the domain.

use super::{Action, ExitCtx, mmio};
use crate::arch::{Backend, Exit};

/// Handle a nested page fault at `gpa`.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit, gpa: u64, write: bool) -> Action {
    if write && ctx.d.logs.iter().any(Option::is_some) {
        match super::super::dirty::write_fault(ctx.d, ctx.pool, gpa) {
            Ok(true) => return Action::Continue,
            Ok(false) => {}
            Err(e) => return Action::Crash(alloc::format!("logging a write fault: {e}")),
        }
    }
    if !ctx.d.is_ram(gpa) {
        return mmio::handle(ctx, exit, gpa, write);
    }
    Action::Crash(alloc::format!(
        "{} fault at guest-physical {gpa:#x}, inside its {} MiB of memory, that no log explains, at RIP {:#x}",
        if write { "write" } else { "read" },
        ctx.d.memory_bytes >> 20,
        exit.rip
    ))
}
