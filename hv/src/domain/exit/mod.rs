//! The exit policy: what an exit means for the domain, written once for both
//! backends. The backend has already decoded the exit into an [`Exit`] with its
//! operands; [`handle`] is one function over an [`ExitCtx`] (the domain with its
//! memory, devices and logs, the frame pool, this CPU's log-dirty mechanisms) that
//! returns an [`Action`] for the scheduler. Nothing here calls back into the machine.
//!
//! One file per kind: [`cpuid`], [`msr`], [`xsetbv`], [`io`], [`hypercall`], [`ud`], [`memory`]
//! (nested page faults: log-dirty write faults, and accesses outside guest RAM, which
//! [`mmio`] decodes and emulates).

pub mod cpuid;
pub mod hypercall;
pub mod io;
pub mod memory;
pub mod mmio;
pub mod msr;
pub mod ud;
pub mod xsetbv;

use alloc::string::String;
use core::fmt;

use super::dirty::Mechanisms;
use super::{Domain, VcpuSlot};
use crate::arch::{Backend, Exit, ExitReason, Vcpu};
use crate::mm::frames::FramePool;

/// What the scheduler does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the same vCPU.
    Continue,
    /// Let others run.
    Yield,
    /// The vCPU halted.
    Halt,
    /// The guest is done, with this exit code.
    Finish(u64),
    /// Stop the domain, for this reason.
    Crash(String),
    /// The exit takes access away from the domain's memory (a log-dirty start, clean or
    /// stop), which must not happen while another of its vCPUs runs on another CPU with
    /// the old translations cached: handle it again once every other vCPU is stopped
    /// (nothing of it was done, and the instruction was not skipped).
    StopOthers,
}

/// What one exit may reach: the domain that exited (memory, devices, logs, console),
/// which of its vCPUs, the frame pool and this CPU's log-dirty mechanisms.
pub struct ExitCtx<'a, B: Backend> {
    /// The domain.
    pub d: &'a mut Domain<B>,
    /// The vCPU that exited (an index into the domain's vCPUs).
    pub vi: usize,
    /// The frame pool (nested tables, guest memory).
    pub pool: &'a mut FramePool,
    /// What log-dirty can use on this CPU.
    pub mechanisms: &'a Mechanisms,
    /// Whether another vCPU of the domain runs on another CPU now (see
    /// [`Action::StopOthers`]).
    pub others_running: bool,
}

impl<B: Backend> fmt::Debug for ExitCtx<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitCtx").field("domain", &self.d.id).field("vcpu", &self.vi).finish()
    }
}

impl<B: Backend> ExitCtx<'_, B> {
    /// The vCPU that exited.
    pub(crate) fn slot(&mut self) -> &mut VcpuSlot<B::Vcpu> {
        &mut self.d.vcpus[self.vi]
    }

    /// Continue after the exiting instruction.
    pub fn skip(&mut self, exit: &Exit) -> Action {
        match self.slot().vcpu.skip_instruction(exit) {
            Ok(()) => Action::Continue,
            Err(e) => {
                Action::Crash(alloc::format!("cannot continue after {} at RIP {:#x}: {e}", exit.reason, exit.rip))
            }
        }
    }

    /// Deliver exception `vector` at the next entry (the instruction does not retire).
    pub fn inject(&mut self, vector: u8, error: Option<u32>) -> Action {
        match self.slot().vcpu.inject_exception(vector, error) {
            Ok(()) => Action::Continue,
            Err(e) => Action::Crash(alloc::format!("cannot inject exception {vector}: {e}")),
        }
    }
}

/// A triple fault ends the domain. Its reason carries the state the guest died in:
/// whether that is the guest's own (a kernel bug) or not (a CR3, stack or tables that
/// are not the guest's: state lost or corrupted between exits, issue 16's open fault).
fn triple_fault<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    let slot = ctx.slot();
    let state = match slot.vcpu.save_state(&slot.regs) {
        Ok(s) => alloc::format!(
            "CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} RSP {:#x} RFLAGS {:#x} CS {:#x} SS {:#x} GDTR {:#x}+{:#x} \
             IDTR {:#x}+{:#x}",
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer,
            s.rsp,
            s.rflags,
            s.cs.selector,
            s.ss.selector,
            s.gdtr.base,
            s.gdtr.limit,
            s.idtr.base,
            s.idtr.limit
        ),
        Err(e) => alloc::format!("its state could not be read: {e}"),
    };
    Action::Crash(alloc::format!("triple fault (last RIP {:#x}; {state})", exit.rip))
}

/// Handle one exit of vCPU `ctx.vi`.
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit) -> Action {
    match exit.reason {
        ExitReason::Cpuid => cpuid::handle(ctx, exit),
        ExitReason::Io { port, size, input, string } => io::handle(ctx, exit, port, size, input, string),
        ExitReason::MsrRead => msr::handle_read(ctx, exit),
        ExitReason::MsrWrite => msr::handle_write(ctx, exit),
        ExitReason::Xsetbv => xsetbv::handle(ctx, exit),
        ExitReason::VirtualizationInstruction => ctx.inject(6, None),
        ExitReason::Hypercall => hypercall::handle(ctx, exit),
        ExitReason::Hlt => match ctx.skip(exit) {
            Action::Continue => Action::Halt,
            other => other,
        },
        ExitReason::TimeSliceEnd => Action::Yield,
        // The scheduler injects what is pending before the next entry.
        ExitReason::InterruptWindow => Action::Continue,
        ExitReason::PmlFull => match super::dirty::pml_full(ctx.d, ctx.pool, ctx.vi) {
            Ok(()) => Action::Continue,
            Err(e) => Action::Crash(alloc::format!("draining the PML buffer: {e}")),
        },
        ExitReason::NestedPageFault { gpa, write } => memory::handle(ctx, exit, gpa, write),
        ExitReason::TripleFault => triple_fault(ctx, exit),
        ExitReason::Exception { vector: 6 } => ud::handle(ctx, exit),
        ExitReason::Exception { vector: 8 } => Action::Crash(alloc::format!("double fault at RIP {:#x}", exit.rip)),
        ExitReason::Exception { vector } => {
            Action::Crash(alloc::format!("unexpected exception {vector} exit at RIP {:#x}", exit.rip))
        }
        ExitReason::Other { code } => {
            Action::Crash(alloc::format!("exit {code:#x} that the hypervisor does not emulate, at RIP {:#x}", exit.rip))
        }
    }
}

#[cfg(test)]
mod tests;
