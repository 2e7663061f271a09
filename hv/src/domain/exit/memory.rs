//! Nested page faults: a write fault on a page that write-protect logging guards (log
//! it, give write access back, retry), or an access outside the domain's RAM, which
//! stops the domain (no MMIO device is mapped yet).

use super::{Action, ExitCtx};
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
    Action::Crash(alloc::format!(
        "{} of guest-physical {gpa:#x}, outside its {} MiB of memory, at RIP {:#x}",
        if write { "write" } else { "read" },
        ctx.d.memory_bytes >> 20,
        exit.rip
    ))
}
