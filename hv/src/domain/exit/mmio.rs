//! MMIO: a nested page fault at a guest-physical address that is not RAM is an access
//! to a device register, made by an ordinary instruction. Neither emulator gives
//! decode assists (no SVM decode assists under QEMU TCG, and VMX reports no operand
//! for EPT violations), so the core fetches the instruction through the guest's own
//! page tables (`mm::walk`), decodes it with `iced-x86`, checks that its memory
//! operand is the page that faulted, performs the access on the device and writes
//! the result back, then moves RIP past the instruction (ending any STI / MOV SS
//! shadow, as [`ExitCtx::skip`] does for every emulated instruction).
//!
//! Emulated forms (SDM Vol. 2B, MOV / MOVZX / MOVSX / MOVSXD), every operand size:
//!
//! | form | access |
//! |---|---|
//! | `mov r/m, reg` (88, 89, A2, A3) | store of the register (AH/CH/DH/BH too) |
//! | `mov r/m, imm` (C6, C7) | store of the immediate (sign-extended to 64 bits for REX.W C7) |
//! | `mov reg, r/m` (8A, 8B, A0, A1) | load: 8/16-bit registers keep their other bits, a 32-bit one zero-extends into 64 (SDM Vol. 1 3.4.1.1) |
//! | `movzx` / `movsx` / `movsxd reg, r/m` | load, zero- or sign-extended to the register |
//!
//! The operand size is the instruction's, not the exit's. Anything else stops the
//! domain with the mnemonic and the bytes; so does an instruction that cannot be
//! fetched, or whose memory operand does not lie on the faulting page.
//!
//! Where an access goes ([`access`]): the exiting vCPU's local APIC when it is in
//! xAPIC mode and the address is on its page (IPIs its ICR sends are routed like
//! x2APIC ones, `Domain::lapic_effects`); the I/O APIC page ([`ioapic`]: the domain's
//! interrupt router owns it); otherwise the domain's device bus, where an address
//! nothing claims reads all ones, drops writes and is counted, as on a PC.

use core::fmt;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::{Action, ExitCtx, io};
use crate::arch::{Backend, Exit, GuestRegs, PagingState, Vcpu};
use crate::devices::bus::Space;
use crate::devices::lapic::ApicMode;
use crate::devices::{DeviceCtx, Effect, MAX_EFFECTS, le_value};
use crate::mm::walk::{self, GuestPhys, PagingRegs, WalkError};

/// The longest x86 instruction (SDM Vol. 2A 2.1.1).
pub const MAX_INSTRUCTION: usize = 15;

const EFER_LMA: u64 = 1 << 10;
/// Canonical segment attribute bits (see `arch::state`): L and D/B.
const ATTR_L: u16 = 1 << 9;
const ATTR_DB: u16 = 1 << 10;

/// The bytes of an instruction, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes {
    b: [u8; MAX_INSTRUCTION],
    n: u8,
}

impl Bytes {
    fn new(src: &[u8]) -> Self {
        let mut b = [0u8; MAX_INSTRUCTION];
        let n = src.len().min(MAX_INSTRUCTION);
        b[..n].copy_from_slice(&src[..n]);
        Self { b, n: n as u8 }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.b[..usize::from(self.n)]
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why an MMIO access could not be emulated (the domain stops with this reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// The instruction's bytes could not be read at CS.base + RIP.
    Fetch {
        /// The linear address of the byte that could not be read.
        linear: u64,
        /// Why.
        error: WalkError,
    },
    /// The bytes are no valid instruction.
    Undecodable {
        /// The bytes fetched.
        bytes: Bytes,
    },
    /// A valid instruction the emulator does not implement.
    Unsupported {
        /// Its mnemonic.
        mnemonic: Mnemonic,
        /// Its bytes.
        bytes: Bytes,
        /// What is missing.
        why: &'static str,
    },
    /// The memory operand's linear address does not translate.
    Operand {
        /// The linear address.
        linear: u64,
        /// Why.
        error: WalkError,
        /// The instruction's bytes.
        bytes: Bytes,
    },
    /// The memory operand is not on the page that faulted.
    WrongPage {
        /// Where the operand is.
        gpa: u64,
        /// Where the fault was.
        fault_gpa: u64,
        /// The instruction's bytes.
        bytes: Bytes,
    },
    /// The instruction reads where the fault was a write, or the reverse.
    Direction {
        /// The fault was a write.
        fault_write: bool,
        /// The instruction's bytes.
        bytes: Bytes,
    },
    /// The operand crosses from the device's page into the next one.
    PageCrossing {
        /// Where the operand starts.
        gpa: u64,
        /// Its width in bytes.
        width: usize,
        /// The instruction's bytes.
        bytes: Bytes,
    },
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fetch { linear, error } => write!(f, "cannot fetch the instruction at linear {linear:#x}: {error}"),
            Self::Undecodable { bytes } => write!(f, "the bytes [{bytes}] are no valid instruction"),
            Self::Unsupported { mnemonic, bytes, why } => {
                write!(f, "{mnemonic:?} [{bytes}] is not emulated for MMIO: {why}")
            }
            Self::Operand { linear, error, bytes } => {
                write!(f, "the memory operand of [{bytes}] at linear {linear:#x} does not translate: {error}")
            }
            Self::WrongPage { gpa, fault_gpa, bytes } => write!(
                f,
                "the memory operand of [{bytes}] is at guest-physical {gpa:#x}, not on the faulting page of {fault_gpa:#x}"
            ),
            Self::Direction { fault_write, bytes } => write!(
                f,
                "[{bytes}] {} memory, but the fault was a {}",
                if *fault_write { "reads" } else { "writes" },
                if *fault_write { "write" } else { "read" }
            ),
            Self::PageCrossing { gpa, width, bytes } => {
                write!(f, "the {width}-byte operand of [{bytes}] at {gpa:#x} crosses a page boundary")
            }
        }
    }
}

/// A general-purpose register operand: its number (0 = RAX ... 15 = R15, SDM Vol. 2A
/// Table 2-2 order), width in bytes, and whether it is AH/CH/DH/BH (bits 15:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpr {
    /// Register number.
    pub number: u8,
    /// Width in bytes (1, 2, 4, 8).
    pub width: u8,
    /// AH, CH, DH or BH.
    pub high: bool,
}

/// The GPR that `r` names, or `None` for any other register.
pub fn gpr(r: Register) -> Option<Gpr> {
    // iced's Register numbering: AL..R15L (AL, CL, DL, BL, AH, CH, DH, BH, SPL, BPL,
    // SIL, DIL, R8L..R15L), then AX..R15W, EAX..R15D, RAX..R15 in number order (the
    // tests pin every boundary).
    let n = r as u32;
    let rel = |base: Register| n.wrapping_sub(base as u32);
    let (number, width, high) = match () {
        () if rel(Register::AL) < 4 => (rel(Register::AL), 1, false),
        () if rel(Register::AH) < 4 => (rel(Register::AH), 1, true),
        () if rel(Register::SPL) < 12 => (rel(Register::SPL) + 4, 1, false),
        () if rel(Register::AX) < 16 => (rel(Register::AX), 2, false),
        () if rel(Register::EAX) < 16 => (rel(Register::EAX), 4, false),
        () if rel(Register::RAX) < 16 => (rel(Register::RAX), 8, false),
        () => return None,
    };
    Some(Gpr { number: number as u8, width, high })
}

/// The core's copy of GPR `number`, RSP excepted (it lives in the VMCS/VMCB).
fn slot(regs: &mut GuestRegs, number: u8) -> Option<&mut u64> {
    Some(match number {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        15 => &mut regs.r15,
        _ => return None,
    })
}

fn mask(width: usize) -> u64 {
    if width >= 8 { u64::MAX } else { (1u64 << (8 * width)) - 1 }
}

/// The value of `g` as an operand (RSP from `rsp`).
fn read_gpr(regs: &GuestRegs, rsp: u64, g: Gpr) -> u64 {
    let mut copy = *regs;
    let full = if g.number == 4 { rsp } else { slot(&mut copy, g.number).map_or(0, |r| *r) };
    if g.high { (full >> 8) & 0xff } else { full & mask(usize::from(g.width)) }
}

/// Write `value` to `g` as MOV does (SDM Vol. 1 3.4.1.1): 8- and 16-bit writes keep
/// the other bits, 32-bit writes zero-extend into 64. RSP is never a destination
/// here ([`decode`] refuses it).
fn write_gpr(regs: &mut GuestRegs, g: Gpr, value: u64) {
    let Some(r) = slot(regs, g.number) else { return };
    *r = match (g.width, g.high) {
        (1, true) => (*r & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (*r & !0xff) | (value & 0xff),
        (2, _) => (*r & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
}

/// How a load's value reaches its register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Widen {
    /// MOV: same width.
    Same,
    /// MOVZX.
    Zero,
    /// MOVSX / MOVSXD.
    Sign,
}

/// What the instruction does with its memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Store `value` (already truncated to the operand's width).
    Store {
        /// The value.
        value: u64,
    },
    /// Load into `dest`.
    Load {
        /// The destination register.
        dest: Gpr,
        /// How the value is extended.
        extend: Widen,
    },
}

/// A decoded MMIO instruction, ready to access the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Its length (RIP advances by this much).
    pub len: u64,
    /// The memory operand's linear address.
    pub linear: u64,
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its width in bytes (1, 2, 4 or 8).
    pub width: usize,
    /// The access.
    pub op: Op,
    /// The mnemonic.
    pub mnemonic: Mnemonic,
    /// The bytes.
    pub bytes: Bytes,
}

impl Decoded {
    /// Whether the access writes the device.
    pub fn write(&self) -> bool {
        matches!(self.op, Op::Store { .. })
    }

    /// The access is to the page that faulted, in the direction that faulted.
    pub fn check(&self, fault_gpa: u64, fault_write: bool) -> Result<(), MmioError> {
        if self.gpa & !0xfff != fault_gpa & !0xfff {
            return Err(MmioError::WrongPage { gpa: self.gpa, fault_gpa, bytes: self.bytes });
        }
        if self.write() != fault_write {
            return Err(MmioError::Direction { fault_write, bytes: self.bytes });
        }
        Ok(())
    }

    /// The bytes the access starts with: a store's value, little-endian (a load's
    /// buffer, which the device fills).
    pub fn data(&self) -> [u8; 8] {
        match self.op {
            Op::Store { value } => value.to_le_bytes(),
            Op::Load { .. } => [0; 8],
        }
    }

    /// After a load, write what the device returned (`data`, `width` bytes) to the
    /// destination register.
    pub fn complete(&self, regs: &mut GuestRegs, data: &[u8]) {
        if let Op::Load { dest, extend } = self.op {
            let raw = le_value(data) & mask(self.width);
            let value = match extend {
                Widen::Same | Widen::Zero => raw,
                Widen::Sign => {
                    let shift = 64 - 8 * self.width.clamp(1, 8) as u32;
                    (((raw << shift) as i64) >> shift) as u64
                }
            };
            write_gpr(regs, dest, value);
        }
    }
}

/// Fetch and decode the instruction at CS:RIP of `st` and find its memory operand.
/// `maxphyaddr` is the guest's physical-address width (for the walk's reserved bits).
pub fn decode<M: GuestPhys + ?Sized>(
    mem: &mut M,
    st: &PagingState,
    regs: &GuestRegs,
    maxphyaddr: u8,
) -> Result<Decoded, MmioError> {
    let paging = PagingRegs { cr0: st.cr0, cr3: st.cr3, cr4: st.cr4, efer: st.efer, maxphyaddr };
    // SDM Vol. 3A 5.2.1 / 3.4.4: 64-bit code in IA-32e mode with CS.L; otherwise CS.D
    // picks 32- or 16-bit code. In 64-bit mode the CS, DS, ES and SS bases are 0.
    let long = st.efer & EFER_LMA != 0 && st.cs.attributes & ATTR_L != 0;
    let bitness = if long {
        64
    } else if st.cs.attributes & ATTR_DB != 0 {
        32
    } else {
        16
    };
    let address_mask = if long { u64::MAX } else { 0xffff_ffff };
    let rip = st.rip & address_mask;
    let start = if long { rip } else { st.cs.base.wrapping_add(rip) & address_mask };

    let mut buf = [0u8; MAX_INSTRUCTION];
    let (fetched, fetch_error) = match walk::read_linear(mem, &paging, start, &mut buf) {
        Ok(()) => (MAX_INSTRUCTION, None),
        Err((0, error)) => return Err(MmioError::Fetch { linear: start, error }),
        Err((n, error)) => (n, Some(error)),
    };
    let bytes_fetched = Bytes::new(&buf[..fetched]);
    let Ok(mut decoder) = Decoder::try_with_ip(bitness, &buf[..fetched], rip, DecoderOptions::NONE) else {
        return Err(MmioError::Undecodable { bytes: bytes_fetched });
    };
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(match (decoder.last_error(), fetch_error) {
            (DecoderError::NoMoreBytes, Some(error)) => {
                MmioError::Fetch { linear: start.wrapping_add(fetched as u64) & address_mask, error }
            }
            _ => MmioError::Undecodable { bytes: bytes_fetched },
        });
    }
    let len = instr.len().min(fetched);
    let bytes = Bytes::new(&buf[..len]);
    let mnemonic = instr.mnemonic();
    let unsupported = |why| MmioError::Unsupported { mnemonic, bytes, why };

    let Some((width, form)) = form(instr.code()) else {
        return Err(unsupported("only MOV, MOVZX, MOVSX and MOVSXD with a memory operand reach devices"));
    };
    let op = match form {
        Form::Store => {
            let value = match instr.op_kind(1) {
                OpKind::Register => {
                    let g = gpr(instr.op_register(1)).ok_or(unsupported("a source that is no general register"))?;
                    read_gpr(regs, st.rsp, g)
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => instr.immediate(1),
                _ => return Err(unsupported("a source that is neither a register nor an immediate")),
            };
            Op::Store { value: value & mask(width) }
        }
        Form::Load(extend) => {
            if instr.op_kind(0) != OpKind::Register {
                return Err(unsupported("a destination that is no register"));
            }
            let dest = gpr(instr.op_register(0)).ok_or(unsupported("a destination that is no general register"))?;
            if dest.number == 4 {
                return Err(unsupported("a load into RSP (kept in the VMCS/VMCB)"));
            }
            Op::Load { dest, extend }
        }
    };
    let memory_operand = if matches!(form, Form::Store) { 0 } else { 1 };
    if instr.op_kind(memory_operand) != OpKind::Memory {
        return Err(unsupported("no memory operand"));
    }

    let linear = operand_address(&instr, memory_operand, st, regs, long)
        .ok_or(unsupported("an address built from registers the emulator does not hold"))?
        & address_mask;
    let gpa = walk::translate(mem, &paging, linear).map_err(|error| MmioError::Operand { linear, error, bytes })?.gpa;
    if (gpa & 0xfff) as usize + width > 4096 {
        return Err(MmioError::PageCrossing { gpa, width, bytes });
    }
    Ok(Decoded { len: len as u64, linear, gpa, width, op, mnemonic, bytes })
}

/// Which way an emulated form moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Operand 0 is memory, operand 1 a register or an immediate.
    Store,
    /// Operand 0 is a register, operand 1 memory.
    Load(Widen),
}

/// The emulated forms (SDM Vol. 2B: MOV, MOVZX, MOVSX/MOVSXD) and the width of
/// their memory operand in bytes; every other instruction is refused.
fn form(code: Code) -> Option<(usize, Form)> {
    use Form::{Load, Store};
    use Widen::{Same as Plain, Sign, Zero};
    Some(match code {
        Code::Mov_rm8_r8 | Code::Mov_moffs8_AL | Code::Mov_rm8_imm8 => (1, Store),
        Code::Mov_rm16_r16 | Code::Mov_moffs16_AX | Code::Mov_rm16_imm16 => (2, Store),
        Code::Mov_rm32_r32 | Code::Mov_moffs32_EAX | Code::Mov_rm32_imm32 => (4, Store),
        Code::Mov_rm64_r64 | Code::Mov_moffs64_RAX | Code::Mov_rm64_imm32 => (8, Store),
        Code::Mov_r8_rm8 | Code::Mov_AL_moffs8 => (1, Load(Plain)),
        Code::Mov_r16_rm16 | Code::Mov_AX_moffs16 => (2, Load(Plain)),
        Code::Mov_r32_rm32 | Code::Mov_EAX_moffs32 => (4, Load(Plain)),
        Code::Mov_r64_rm64 | Code::Mov_RAX_moffs64 => (8, Load(Plain)),
        Code::Movzx_r16_rm8 | Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => (1, Load(Zero)),
        Code::Movzx_r16_rm16 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => (2, Load(Zero)),
        Code::Movsx_r16_rm8 | Code::Movsx_r32_rm8 | Code::Movsx_r64_rm8 => (1, Load(Sign)),
        Code::Movsx_r16_rm16 | Code::Movsx_r32_rm16 | Code::Movsx_r64_rm16 | Code::Movsxd_r16_rm16 => (2, Load(Sign)),
        // MOVSXD r32, r/m32 copies (no extension within 32 bits).
        Code::Movsxd_r32_rm32 => (4, Load(Plain)),
        Code::Movsxd_r64_rm32 => (4, Load(Sign)),
        _ => return None,
    })
}

/// The memory operand's linear address: segment base + base + index × scale +
/// displacement (iced computes it, RIP-relative included, from the register values).
fn operand_address(instr: &Instruction, operand: u32, st: &PagingState, regs: &GuestRegs, long: bool) -> Option<u64> {
    let b = &st.bases;
    instr.virtual_address(operand, 0, |reg, _, _| match reg {
        // SDM Vol. 3A 3.4.4: in 64-bit mode only FS and GS have bases.
        Register::ES | Register::CS | Register::SS | Register::DS if long => Some(0),
        Register::ES => Some(b.es),
        Register::CS => Some(st.cs.base),
        Register::SS => Some(b.ss),
        Register::DS => Some(b.ds),
        Register::FS => Some(b.fs),
        Register::GS => Some(b.gs),
        r => gpr(r).map(|g| read_gpr(regs, st.rsp, g)),
    })
}

/// Decode, check against the fault, access through `device` and complete: the whole
/// emulation over plain values (tests and the fuzz target use it; [`handle`] runs the
/// same steps with the domain's devices).
pub fn emulate<M: GuestPhys + ?Sized>(
    mem: &mut M,
    st: &PagingState,
    regs: &mut GuestRegs,
    maxphyaddr: u8,
    fault_gpa: u64,
    fault_write: bool,
    device: &mut dyn FnMut(u64, &mut [u8], bool),
) -> Result<Decoded, MmioError> {
    let d = decode(mem, st, regs, maxphyaddr)?;
    d.check(fault_gpa, fault_write)?;
    let mut data = d.data();
    let w = d.width.min(8);
    device(d.gpa, &mut data[..w], d.write());
    d.complete(regs, &data[..w]);
    Ok(d)
}

/// The guest's physical-address width as its CPUID policy reports it
/// (CPUID.80000008H:EAX[7:0]; 36 when the leaf is absent, SDM Vol. 3A 4.1.4).
pub(crate) fn guest_maxphyaddr<B: Backend>(ctx: &mut ExitCtx<'_, B>) -> u8 {
    let index = ctx.slot().index;
    let r = ctx.d.cpuid.lookup_vcpu(0x8000_0008, 0, &super::super::vcpu_state(index));
    match r[0] as u8 {
        0 => 36,
        m => m,
    }
}

/// Emulate the access of the instruction that faulted at `gpa` (not guest RAM).
pub fn handle<B: Backend>(ctx: &mut ExitCtx<'_, B>, exit: &Exit, gpa: u64, write: bool) -> Action {
    let st = match ctx.slot().vcpu.paging_state() {
        Ok(s) => s,
        Err(e) => return Action::Crash(alloc::format!("MMIO at {gpa:#x}: cannot read the vCPU's paging state: {e}")),
    };
    let maxphyaddr = guest_maxphyaddr(ctx);
    let regs = ctx.slot().regs;
    let decoded = match ctx.d.mem.as_ref() {
        Some(mem) => {
            let mut phys = crate::mm::guest::Phys { mem, pool: &mut *ctx.pool };
            decode(&mut phys, &st, &regs, maxphyaddr).and_then(|d| d.check(gpa, write).map(|()| d))
        }
        None => return Action::Crash(alloc::format!("MMIO at {gpa:#x} in a domain without memory")),
    };
    let d = match decoded {
        Ok(d) => d,
        Err(e) => {
            return Action::Crash(alloc::format!(
                "MMIO {} of guest-physical {gpa:#x} at RIP {:#x}: {e}",
                if write { "write" } else { "read" },
                st.rip
            ));
        }
    };
    let mut data = d.data();
    let w = d.width.min(8);
    let effects = access(ctx, d.gpa, &mut data[..w], d.write());
    d.complete(&mut ctx.slot().regs, &data[..w]);
    let next = ctx.skip(&Exit { instruction_len: d.len, ..*exit });
    io::apply(ctx, &effects, next)
}

/// One MMIO access of the exiting vCPU at `gpa`: its xAPIC page, the I/O APIC, or the
/// device bus. Returns the device effects for [`io::apply`].
pub fn access<B: Backend>(
    ctx: &mut ExitCtx<'_, B>,
    gpa: u64,
    data: &mut [u8],
    write: bool,
) -> heapless::Vec<Effect, MAX_EFFECTS> {
    let now = ctx.d.guest_now_ns();
    let lapic = &mut ctx.d.vcpus[ctx.vi].lapic;
    if lapic.mode() == ApicMode::XApic && gpa & !0xfff == lapic.mmio_base() {
        let offset = gpa & 0xfff;
        if write {
            // IPIs go to their targets, a level-triggered EOI to the I/O APIC
            // (`domain::platform`), as for the x2APIC MSRs.
            let effects = lapic.write_mmio(offset, data, now);
            ctx.d.lapic_effects(ctx.vi, &effects);
        } else {
            lapic.read_mmio(offset, data, now);
        }
        return heapless::Vec::new();
    }
    if ioapic(ctx, gpa, data, write) {
        return heapless::Vec::new();
    }
    let d = &mut *ctx.d;
    let mut dctx = DeviceCtx::new(now, &mut d.irq);
    if write {
        d.devices.write(Space::Mmio, gpa, data, &mut dctx);
    } else {
        d.devices.read(Space::Mmio, gpa, data, &mut dctx);
    }
    let effects = dctx.effects;
    d.route_messages();
    effects
}

/// The I/O APIC's page (`devices::ioapic::IOAPIC_BASE`, 0xFEC0_0000): it belongs to the
/// domain's interrupt router (`devices::irq::IrqRouter::mmio_read` / `mmio_write`);
/// the messages a write makes due (an unmasked pin that is asserted) reach the LAPICs
/// at once. Returns whether the access was the I/O APIC's.
fn ioapic<B: Backend>(ctx: &mut ExitCtx<'_, B>, gpa: u64, data: &mut [u8], write: bool) -> bool {
    let claimed = if write { ctx.d.irq.mmio_write(gpa, data) } else { ctx.d.irq.mmio_read(gpa, data) };
    if claimed {
        ctx.d.route_messages();
    }
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::SegmentBases;
    use crate::arch::state::SegmentRegister;
    use alloc::vec::Vec;

    /// Guest RAM from GPA 0 with identity 4-level tables at 0x1000 mapping the first
    /// 2 MiB (4 KiB pages from 0x4000's PT) and 0xFEE0_0000 (a 2 MiB page).
    struct Ram(Vec<u8>);

    impl GuestPhys for Ram {
        fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
            self.0.as_mut_slice().read(gpa, out)
        }
    }

    const CODE: u64 = 0x10_0000;

    /// An access the test device saw: address, data, write.
    type Seen = (u64, Vec<u8>, bool);

    fn ram() -> Ram {
        let mut m = Ram(alloc::vec![0; 0x20_0000]);
        let mut put = |at: u64, v: u64| m.0[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        put(0x1000, 0x2000 | 3);
        put(0x2000, 0x3000 | 3); // PDPT[0] -> PD for 0..1 GiB
        put(0x2000 + 3 * 8, 0x5000 | 3); // PDPT[3] -> PD for 3..4 GiB
        put(0x3000, 0x4000 | 3); // PD[0] -> PT
        for i in 0..512u64 {
            put(0x4000 + i * 8, (i << 12) | 3);
        }
        put(0x5000 + 0x1f7 * 8, 0xfee0_0000 | 0x83);
        put(0x5000 + 0x1f6 * 8, 0xfec0_0000 | 0x83);
        m
    }

    fn long_state() -> PagingState {
        PagingState {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 1 << 5,
            efer: (1 << 8) | EFER_LMA,
            rip: CODE,
            rsp: 0x8000,
            cpl: 0,
            cs: SegmentRegister { selector: 8, attributes: 0xa9b, limit: 0xffff_ffff, base: 0 },
            bases: SegmentBases::default(),
        }
    }

    /// Run `code` at CODE against a device that records the access and answers `reply`.
    fn run(
        code: &[u8],
        regs: &mut GuestRegs,
        fault: u64,
        write: bool,
        reply: u64,
    ) -> (Result<Decoded, MmioError>, Vec<Seen>) {
        run_in(&mut ram(), &long_state(), code, regs, fault, write, reply)
    }

    fn run_in(
        m: &mut Ram,
        st: &PagingState,
        code: &[u8],
        regs: &mut GuestRegs,
        fault: u64,
        write: bool,
        reply: u64,
    ) -> (Result<Decoded, MmioError>, Vec<Seen>) {
        let at = (st.cs.base + st.rip) as usize;
        m.0[at..at + code.len()].copy_from_slice(code);
        let mut seen = Vec::new();
        let r = emulate(m, st, regs, 40, fault, write, &mut |gpa: u64, data: &mut [u8], w: bool| {
            if !w {
                crate::devices::put_le(data, reply);
            }
            seen.push((gpa, data.to_vec(), w));
        });
        (r, seen)
    }

    const APIC: u64 = 0xfee0_0000;

    #[test]
    fn register_numbering_matches_iced() {
        assert_eq!(gpr(Register::AL), Some(Gpr { number: 0, width: 1, high: false }));
        assert_eq!(gpr(Register::BL), Some(Gpr { number: 3, width: 1, high: false }));
        assert_eq!(gpr(Register::AH), Some(Gpr { number: 0, width: 1, high: true }));
        assert_eq!(gpr(Register::BH), Some(Gpr { number: 3, width: 1, high: true }));
        assert_eq!(gpr(Register::SPL), Some(Gpr { number: 4, width: 1, high: false }));
        assert_eq!(gpr(Register::DIL), Some(Gpr { number: 7, width: 1, high: false }));
        assert_eq!(gpr(Register::R15L), Some(Gpr { number: 15, width: 1, high: false }));
        assert_eq!(gpr(Register::AX), Some(Gpr { number: 0, width: 2, high: false }));
        assert_eq!(gpr(Register::R15W), Some(Gpr { number: 15, width: 2, high: false }));
        assert_eq!(gpr(Register::EAX), Some(Gpr { number: 0, width: 4, high: false }));
        assert_eq!(gpr(Register::R13D), Some(Gpr { number: 13, width: 4, high: false }));
        assert_eq!(gpr(Register::RAX), Some(Gpr { number: 0, width: 8, high: false }));
        assert_eq!(gpr(Register::R15), Some(Gpr { number: 15, width: 8, high: false }));
        assert_eq!(gpr(Register::RIP), None);
        assert_eq!(gpr(Register::ES), None);
        assert_eq!(gpr(Register::None), None);
        assert_eq!(gpr(Register::CR0), None);
    }

    #[test]
    fn stores_of_every_width_from_registers() {
        // mov [rbx], eax ; mov [rbx+0x10], ax ; mov [rbx+0x20], al ; mov [rbx+0x30], ah ;
        // mov [rbx+0x40], rax ; mov [rbx+0x50], r9b
        let cases: [(&[u8], u64, &[u8]); 6] = [
            (&[0x89, 0x03], APIC, &[0x88, 0x77, 0x66, 0x55]),
            (&[0x66, 0x89, 0x43, 0x10], APIC + 0x10, &[0x88, 0x77]),
            (&[0x88, 0x43, 0x20], APIC + 0x20, &[0x88]),
            (&[0x88, 0x63, 0x30], APIC + 0x30, &[0x77]),
            (&[0x48, 0x89, 0x43, 0x40], APIC + 0x40, &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]),
            (&[0x44, 0x88, 0x4b, 0x50], APIC + 0x50, &[0x99]),
        ];
        for (code, gpa, data) in cases {
            let mut regs = GuestRegs { rax: 0x1122_3344_5566_7788, rbx: APIC, r9: 0x99, ..Default::default() };
            let before = regs;
            let (r, seen) = run(code, &mut regs, gpa, true, 0);
            let d = r.unwrap_or_else(|e| panic!("{code:02x?}: {e}"));
            assert_eq!(d.len, code.len() as u64);
            assert_eq!(seen, [(gpa, data.to_vec(), true)], "{code:02x?}");
            assert_eq!(regs, before, "a store changes no register");
        }
    }

    #[test]
    fn stores_of_immediates_and_moffs() {
        // mov dword [rip+disp], 0x20: RIP-relative from the next instruction (a
        // device page within 2 GiB of the code, as the emulation does not care).
        let target = 0x1f_0080u64;
        let disp = (target - (CODE + 10)) as u32;
        let mut code = alloc::vec![0xc7, 0x05];
        code.extend_from_slice(&disp.to_le_bytes());
        code.extend_from_slice(&0x20u32.to_le_bytes());
        let (r, seen) = run(&code, &mut GuestRegs::default(), target, true, 0);
        assert_eq!(r.unwrap().len, 10);
        assert_eq!(seen, [(target, alloc::vec![0x20, 0, 0, 0], true)]);
        // mov qword [rbx], -2 (REX.W C7: imm32 sign-extended to 64 bits)
        let mut regs = GuestRegs { rbx: APIC + 8, ..Default::default() };
        let (_, seen) = run(&[0x48, 0xc7, 0x03, 0xfe, 0xff, 0xff, 0xff], &mut regs, APIC + 8, true, 0);
        assert_eq!(seen, [(APIC + 8, alloc::vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], true)]);
        // mov byte [rbx], 0x5a ; mov word [rbx], 0x1234
        let (_, seen) = run(&[0xc6, 0x03, 0x5a], &mut regs, APIC + 8, true, 0);
        assert_eq!(seen[0].1, [0x5a]);
        let (_, seen) = run(&[0x66, 0xc7, 0x03, 0x34, 0x12], &mut regs, APIC + 8, true, 0);
        assert_eq!(seen[0].1, [0x34, 0x12]);
        // mov [moffs64], eax (A3 with a 64-bit address)
        let mut code = alloc::vec![0xa3];
        code.extend_from_slice(&(APIC + 0xb0).to_le_bytes());
        let mut regs = GuestRegs { rax: 0xdead_beef_0000_0000, ..Default::default() };
        let (r, seen) = run(&code, &mut regs, APIC + 0xb0, true, 0);
        assert_eq!(r.unwrap().len, 9);
        assert_eq!(seen, [(APIC + 0xb0, alloc::vec![0, 0, 0, 0], true)]);
    }

    #[test]
    fn loads_follow_the_register_write_rules() {
        let all = 0xffff_ffff_ffff_ffff;
        let reply = 0x8877_6655_4433_2211;
        // (bytes, rax before, rax after)
        let cases: [(&[u8], u64); 9] = [
            (&[0x8b, 0x03], 0x4433_2211),                       // mov eax, [rbx]: zero-extends
            (&[0x66, 0x8b, 0x03], 0xffff_ffff_ffff_2211),       // mov ax, [rbx]: keeps 63:16
            (&[0x8a, 0x03], 0xffff_ffff_ffff_ff11),             // mov al, [rbx]
            (&[0x8a, 0x23], 0xffff_ffff_ffff_11ff),             // mov ah, [rbx]
            (&[0x48, 0x8b, 0x03], reply),                       // mov rax, [rbx]
            (&[0x0f, 0xb6, 0x03], 0x11),                        // movzx eax, byte [rbx]
            (&[0x66, 0x0f, 0xb6, 0x03], 0xffff_ffff_ffff_0011), // movzx ax, byte [rbx]
            (&[0x48, 0x0f, 0xb7, 0x03], 0x2211),                // movzx rax, word [rbx]
            (&[0x0f, 0xbe, 0x03], 0x11),                        // movsx eax, byte [rbx] (positive)
        ];
        for (code, want) in cases {
            let mut regs = GuestRegs { rax: all, rbx: APIC + 0x30, rcx: 7, ..Default::default() };
            let (r, seen) = run(code, &mut regs, APIC + 0x30, false, reply);
            let d = r.unwrap_or_else(|e| panic!("{code:02x?}: {e}"));
            assert_eq!(d.len, code.len() as u64);
            assert_eq!(seen.len(), 1);
            assert_eq!((seen[0].0, seen[0].2), (APIC + 0x30, false));
            assert_eq!(regs.rax, want, "{code:02x?}: rax {:#x}", regs.rax);
            assert_eq!((regs.rbx, regs.rcx), (APIC + 0x30, 7), "only the destination changes");
        }
        // The width comes from the instruction: movzx reads 1 byte, movsxd 4.
        let mut regs = GuestRegs { rbx: APIC, ..Default::default() };
        let (_, seen) = run(&[0x0f, 0xb6, 0x03], &mut regs, APIC, false, 0);
        assert_eq!(seen[0].1.len(), 1);
        // Sign extension: movsx ecx, byte / movsx rcx, word / movsxd rcx, dword.
        for (code, want) in [
            (&[0x0f, 0xbe, 0x0b][..], 0x0000_0000_ffff_ff80),
            (&[0x48, 0x0f, 0xbf, 0x0b][..], 0xffff_ffff_ffff_8080),
            (&[0x48, 0x63, 0x0b][..], 0xffff_ffff_8080_8080),
            (&[0x66, 0x0f, 0xbe, 0x0b][..], 0x1234_5678_9abc_ff80),
        ] {
            let mut regs = GuestRegs { rbx: APIC, rcx: 0x1234_5678_9abc_def0, ..Default::default() };
            let (r, _) = run(code, &mut regs, APIC, false, 0x8080_8080);
            r.unwrap();
            assert_eq!(regs.rcx, want, "{code:02x?}: rcx {:#x}", regs.rcx);
        }
        // mov r12d, [rbx+rsi*4+8] with an index register and REX.
        let mut regs = GuestRegs { rbx: APIC, rsi: 4, r12: all, ..Default::default() };
        let (r, seen) = run(&[0x44, 0x8b, 0x64, 0xb3, 0x08], &mut regs, APIC + 0x18, false, 0xabcd);
        assert_eq!(r.unwrap().gpa, APIC + 0x18);
        assert_eq!(seen[0].0, APIC + 0x18);
        assert_eq!(regs.r12, 0xabcd);
    }

    #[test]
    fn thirty_two_bit_code_uses_segment_bases() {
        // Protected mode, paging off, CS.D: mov eax, [ebx+4] with DS.base 0x1000.
        let st = PagingState {
            cr0: 0x11,
            cr3: 0,
            cr4: 0,
            efer: 0,
            rip: 0x100,
            rsp: 0,
            cpl: 0,
            cs: SegmentRegister { selector: 8, attributes: 0xc9b, limit: 0xffff_ffff, base: 0x1_0000 },
            bases: SegmentBases { ds: 0x1000, ..Default::default() },
        };
        let mut regs = GuestRegs { rax: u64::MAX, rbx: 0xfedf_f02c, ..Default::default() };
        let (r, seen) = run_in(&mut ram(), &st, &[0x8b, 0x43, 0x04], &mut regs, APIC + 0x30, false, 0x5_0014);
        assert_eq!(r.unwrap().linear, APIC + 0x30);
        assert_eq!(seen[0].0, APIC + 0x30);
        assert_eq!(regs.rax, 0x5_0014);
    }

    #[test]
    fn what_is_not_emulated_stops_with_the_mnemonic_and_bytes() {
        let mut regs = GuestRegs { rbx: APIC, ..Default::default() };
        // add [rbx], eax
        let (r, seen) = run(&[0x01, 0x03], &mut regs, APIC, true, 0);
        let e = r.unwrap_err();
        assert!(matches!(e, MmioError::Unsupported { mnemonic: Mnemonic::Add, .. }), "{e}");
        assert!(alloc::format!("{e}").contains("Add [01 03]"), "{e}");
        assert!(seen.is_empty(), "no access was made");
        // The operand is on another page than the fault.
        let (r, _) = run(&[0x8b, 0x03], &mut regs, APIC + 0x1000, false, 0);
        assert!(matches!(r, Err(MmioError::WrongPage { gpa: APIC, .. })), "{r:?}");
        // A load where the fault was a write.
        let (r, _) = run(&[0x8b, 0x03], &mut regs, APIC, true, 0);
        assert!(matches!(r, Err(MmioError::Direction { fault_write: true, .. })), "{r:?}");
        // A 4-byte operand at the page's last 2 bytes.
        let mut end = GuestRegs { rbx: APIC + 0xffe, ..Default::default() };
        let (r, _) = run(&[0x8b, 0x03], &mut end, APIC + 0xffe, false, 0);
        assert!(matches!(r, Err(MmioError::PageCrossing { width: 4, .. })), "{r:?}");
        // mov rsp, [rbx]; mov [rbx], es; undecodable bytes.
        let (r, _) = run(&[0x48, 0x8b, 0x23], &mut regs, APIC, false, 0);
        assert!(matches!(r, Err(MmioError::Unsupported { .. })), "{r:?}");
        let (r, _) = run(&[0x8c, 0x03], &mut regs, APIC, true, 0);
        assert!(matches!(r, Err(MmioError::Unsupported { .. })), "{r:?}");
        let (r, _) = run(&[0x0f, 0x0b], &mut regs, APIC, false, 0);
        assert!(matches!(r, Err(MmioError::Unsupported { mnemonic: Mnemonic::Ud2, .. })), "{r:?}");
        let (r, _) = run(&[0xc4, 0xff, 0xff, 0xff], &mut regs, APIC, false, 0);
        assert!(matches!(r, Err(MmioError::Undecodable { .. })), "{r:?}");
    }

    #[test]
    fn an_instruction_across_a_page_is_fetched_from_both_and_a_missing_page_stops_it() {
        // mov eax, [rbx] at the last byte of a page: 8B there, 03 on the next one,
        // which the PT maps elsewhere (0x100000 + 0x1000 -> 0x7000).
        let mut m = ram();
        m.0[0x4000 + 0x101 * 8..0x4000 + 0x102 * 8].copy_from_slice(&(0x7000u64 | 3).to_le_bytes());
        m.0[0x7000] = 0x03;
        let st = PagingState { rip: CODE + 0xfff, ..long_state() };
        let mut regs = GuestRegs { rbx: APIC + 0x20, ..Default::default() };
        let (r, seen) = run_in(&mut m, &st, &[0x8b], &mut regs, APIC + 0x20, false, 0x0100_0000);
        assert_eq!(r.unwrap().bytes.as_slice(), [0x8b, 0x03]);
        assert_eq!(seen.len(), 1);
        assert_eq!(regs.rax, 0x0100_0000);
        // Without the second page: the fetch stops with its fault.
        m.0[0x4000 + 0x101 * 8..0x4000 + 0x102 * 8].fill(0);
        let (r, _) = run_in(&mut m, &st, &[0x8b], &mut regs, APIC + 0x20, false, 0);
        assert!(matches!(r, Err(MmioError::Fetch { linear: 0x10_1000, .. })), "{r:?}");
        // A one-byte instruction at the page's end still decodes (nop is not emulated).
        let (r, _) = run_in(&mut m, &st, &[0x90], &mut regs, APIC + 0x20, false, 0);
        assert!(matches!(r, Err(MmioError::Unsupported { mnemonic: Mnemonic::Nop, .. })), "{r:?}");
        // RIP on an unmapped page.
        let st = PagingState { rip: 0x4000_0000, ..long_state() };
        let e = decode(&mut m, &st, &regs, 40).unwrap_err();
        assert!(matches!(e, MmioError::Fetch { linear: 0x4000_0000, .. }), "{e}");
    }
}
