//! The local APIC of one vCPU (SDM Vol. 3A chapter 11, "Advanced Programmable
//! Interrupt Controller (APIC)"): the xAPIC register page, the x2APIC MSRs, interrupt
//! acceptance and priority, the APIC timer, IPIs and INIT/SIPI.
//!
//! It is not on the shared [`bus`](super::bus): every vCPU has its own, and the exit
//! handler routes the current vCPU's xAPIC MMIO page (`IA32_APIC_BASE`, normally
//! 0xFEE0_0000) and the x2APIC MSRs (0x800–0x8FF) to it. It does not deliver anything
//! itself: an IPI written to the ICR comes back as an [`Ipi`] for the caller, who owns
//! all LAPICs, to route ([`ipi_targets`]); an EOI of a level-triggered vector comes back
//! as [`Effects::eoi_vector`] for the I/O APIC's Remote IRR. What the backend injects
//! is [`Lapic::pending_interrupt`], and it calls [`Lapic::ack`] when it does.
//!
//! It implements [`Device`] for save/load and for the xAPIC page (`read`/`write` at
//! offsets 0..0x1000); the inherent methods are the real interface, since the trait
//! can neither take the guest time for MSR accesses nor return IPIs.
//!
//! Time: the APIC timer's bus runs at [`BUS_HZ`] (1 GHz: one tick per nanosecond
//! before the divider), so counts are computed from guest nanoseconds, never ticked.
//! The hypervisor tells the guest that frequency (CPUID 0x15/0x16). The TSC-deadline
//! timer converts with the guest TSC frequency given at construction (guest TSC =
//! `now_ns` × `tsc_hz` / 10⁹).
//!
//! Not modelled: the arbitration priority register (reads 0), remote read, the CMCI
//! LVT (the version register says 6 LVT entries), EOI-broadcast suppression, focus
//! processor checking (the bit is stored, lowest-priority arbitration is the caller's),
//! thermal and performance-counter interrupts (their LVTs are only registers).

use core::fmt;

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, StateReader, StateWriter, le_value, put_le};

/// The APIC timer's input clock: 1 GHz, one tick per guest nanosecond before division.
pub const BUS_HZ: u64 = 1_000_000_000;

/// The shortest period the periodic timer runs at, in guest ns (100 µs). A guest that
/// programs a shorter one (initial count 1, divide by 1) gets this instead, so it
/// cannot make the hypervisor fire timers back to back. Linux never asks for less
/// than a jiffy (1 ms at HZ=1000). One-shot and TSC-deadline timers have no minimum:
/// each fires once and needs a guest exit to re-arm.
pub const MIN_PERIODIC_NS: u64 = 100_000;

/// `IA32_APIC_BASE` (SDM Vol. 3A 11.4.4).
pub const MSR_APIC_BASE: u32 = 0x1b;
/// `IA32_TSC_DEADLINE` (SDM Vol. 3A 11.5.4.1).
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// The first x2APIC MSR (SDM Vol. 3A 11.12.1.2: MSR = 0x800 + xAPIC offset / 16).
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// The last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// Where the xAPIC page is after reset (SDM Vol. 3A 11.4.1).
pub const DEFAULT_APIC_BASE: u64 = 0xfee0_0000;

// IA32_APIC_BASE bits (SDM Vol. 3A 11.4.4, Figure 11-5; 11.12.1 for EXTD).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;
/// Address bits 12..52: the architectural maximum physical-address width.
const BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Version register (SDM Vol. 3A 11.4.8): version 0x14 (integrated APIC), max LVT
/// entry 5 (six entries: timer, thermal, performance, LINT0, LINT1, error), no
/// EOI-broadcast suppression (bit 24 clear).
pub const VERSION: u32 = 0x0005_0014;

// LVT fields (SDM Vol. 3A 11.5.1, Figure 11-8).
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIVERY_MODE: u32 = 0x700;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE: u32 = 3 << 17;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_ACTIVE_LOW: u32 = 1 << 13;
// Writable bits per LVT (delivery status and remote IRR are read-only and read 0 here).
const LVT_TIMER_BITS: u32 = LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE;
const LVT_THERMAL_PERF_BITS: u32 = LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED;
const LVT_LINT_BITS: u32 = LVT_VECTOR | LVT_DELIVERY_MODE | LVT_ACTIVE_LOW | LVT_LEVEL | LVT_MASKED;
const LVT_ERROR_BITS: u32 = LVT_VECTOR | LVT_MASKED;
// Bits a guest may set in an x2APIC LVT write without #GP: the writable ones plus the
// read-only status bits (12, 14), which software writes back as it read them.
const LVT_RO_STATUS: u32 = (1 << 12) | (1 << 14);

// Spurious-interrupt vector register (SDM Vol. 3A 11.9, Figure 11-23).
const SVR_ENABLE: u32 = 1 << 8;
/// Vector, software enable and focus processor checking (bit 12, EOI-broadcast
/// suppression, is not offered).
const SVR_BITS: u32 = 0x3ff;

// Error status register bits (SDM Vol. 3A 11.5.3, Figure 11-9).
/// ESR bit 5: an IPI with a vector 0–15 was not sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an interrupt with a vector 0–15 was received (or generated locally).
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: a reserved register of the xAPIC page was accessed.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

// ICR (SDM Vol. 3A 11.6.1, Figure 11-12): vector, delivery mode, destination mode,
// level, trigger mode, shorthand. Delivery status (bit 12) always reads 0: delivery
// is instantaneous here.
const ICR_LOW_BITS: u32 = 0x000c_cfff;
const ICR_X2APIC_BITS: u64 = 0xffff_ffff_000c_cfff;

const DIVIDE_BITS: u32 = 0xb;

/// The register state after power-up, reset or INIT (SDM Vol. 3A 11.4.7.1).
const LVT_RESET: u32 = LVT_MASKED;

// Register indices: xAPIC offset / 16 = x2APIC MSR − 0x800 (SDM Vol. 3A Table 11-1
// and Table 11-6).
const R_ID: u32 = 0x02;
const R_VERSION: u32 = 0x03;
const R_TPR: u32 = 0x08;
const R_APR: u32 = 0x09;
const R_PPR: u32 = 0x0a;
const R_EOI: u32 = 0x0b;
const R_RRD: u32 = 0x0c;
const R_LDR: u32 = 0x0d;
const R_DFR: u32 = 0x0e;
const R_SVR: u32 = 0x0f;
const R_ISR: u32 = 0x10;
const R_TMR: u32 = 0x18;
const R_IRR: u32 = 0x20;
const R_ESR: u32 = 0x28;
const R_ICR: u32 = 0x30;
const R_ICR_HIGH: u32 = 0x31;
const R_LVT_TIMER: u32 = 0x32;
const R_LVT_THERMAL: u32 = 0x33;
const R_LVT_PERF: u32 = 0x34;
const R_LVT_LINT0: u32 = 0x35;
const R_LVT_LINT1: u32 = 0x36;
const R_LVT_ERROR: u32 = 0x37;
const R_TIMER_INITIAL: u32 = 0x38;
const R_TIMER_CURRENT: u32 = 0x39;
const R_TIMER_DIVIDE: u32 = 0x3e;
const R_SELF_IPI: u32 = 0x3f;

/// The state version [`Lapic::save_at`] writes.
pub const STATE_VERSION: u16 = 1;

/// The LAPIC's mode, from `IA32_APIC_BASE` EN (bit 11) and EXTD (bit 10) (SDM Vol. 3A
/// 11.12.5, Table 11-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicMode {
    /// Globally disabled: no registers, no interrupts (EN = 0, EXTD = 0).
    Disabled,
    /// The xAPIC MMIO page (EN = 1, EXTD = 0).
    XApic,
    /// The x2APIC MSRs (EN = 1, EXTD = 1).
    X2Apic,
}

/// An access the guest must get a #GP(0) for (SDM Vol. 3A 11.12.1.2, 11.12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicError {
    /// An x2APIC MSR accessed while the LAPIC is not in x2APIC mode.
    NotX2Apic {
        /// The MSR.
        msr: u32,
    },
    /// An MSR in the x2APIC range that names no register (or is not this MSR's kind).
    NoSuchRegister {
        /// The MSR.
        msr: u32,
    },
    /// WRMSR to a read-only register.
    ReadOnly {
        /// The MSR.
        msr: u32,
    },
    /// RDMSR of a write-only register (EOI, SELF IPI).
    WriteOnly {
        /// The MSR.
        msr: u32,
    },
    /// WRMSR setting reserved bits (or a non-zero value to EOI/ESR).
    ReservedBits {
        /// The MSR.
        msr: u32,
        /// The value written.
        value: u64,
    },
    /// `IA32_APIC_BASE` written with reserved bits set.
    BaseReservedBits {
        /// The value written.
        value: u64,
    },
    /// `IA32_APIC_BASE` written with a mode transition the SDM forbids.
    IllegalTransition {
        /// The mode before.
        from: ApicMode,
        /// The value written.
        value: u64,
    },
}

impl fmt::Display for LapicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotX2Apic { msr } => {
                write!(f, "MSR {msr:#x} is an x2APIC register but the APIC is not in x2APIC mode")
            }
            Self::NoSuchRegister { msr } => write!(f, "MSR {msr:#x} is no x2APIC register"),
            Self::ReadOnly { msr } => write!(f, "x2APIC MSR {msr:#x} is read-only"),
            Self::WriteOnly { msr } => write!(f, "x2APIC MSR {msr:#x} is write-only"),
            Self::ReservedBits { msr, value } => {
                write!(f, "writing {value:#x} to x2APIC MSR {msr:#x} sets reserved bits")
            }
            Self::BaseReservedBits { value } => write!(f, "IA32_APIC_BASE value {value:#x} sets reserved bits"),
            Self::IllegalTransition { from, value } => {
                write!(f, "IA32_APIC_BASE value {value:#x} is not a legal transition from {from:?} mode")
            }
        }
    }
}

/// How an IPI is delivered (ICR bits 10:8, SDM Vol. 3A 11.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The vector, to every target.
    Fixed,
    /// The vector, to one of the targets (the caller picks; SDM Vol. 3A 11.6.2.4
    /// leaves arbitration model-specific).
    LowestPriority,
    /// A system-management interrupt.
    Smi,
    /// A non-maskable interrupt.
    Nmi,
    /// INIT (assert): the targets call [`Lapic::receive_init`].
    Init,
    /// INIT level de-assert (delivery mode INIT, level 0, level-triggered): only
    /// synchronizes arbitration IDs on old processors; the caller ignores it.
    InitDeassert,
    /// Start-up (SIPI): the targets call [`Lapic::receive_sipi`] with the vector.
    StartUp,
}

/// Whom an IPI is for (ICR destination, destination mode and shorthand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// An APIC ID (0xFF, or 0xFFFF_FFFF in x2APIC mode, is every APIC).
    Physical(u32),
    /// A logical destination (message destination address) matched against each
    /// target's LDR and DFR (SDM Vol. 3A 11.6.2.2, 11.12.10.2).
    Logical(u32),
    /// The sender only.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// An inter-processor interrupt a guest sent through its ICR, for the caller to route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// Whom it is for.
    pub destination: Destination,
    /// How it is delivered.
    pub mode: DeliveryMode,
    /// The vector (for SIPI, the start page: the vCPU starts at vector × 0x1000).
    pub vector: u8,
    /// The level bit (assert).
    pub level: bool,
    /// Level-triggered (else edge).
    pub level_triggered: bool,
    /// The sender was in x2APIC mode: destinations are 32 bits wide.
    pub x2apic: bool,
}

/// What a LAPIC answers to in IPI routing: its ID and logical destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicAddress {
    /// The APIC ID.
    pub id: u32,
    /// The LDR as the guest reads it (xAPIC: logical ID in bits 31:24).
    pub ldr: u32,
    /// The DFR selects the flat model (else cluster); xAPIC only.
    pub flat: bool,
}

/// What a register write asks of the caller, besides the LAPIC's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// An EOI retired this level-triggered vector: the I/O APIC clears Remote IRR of
    /// the entries that use it (SDM Vol. 3A 11.8.5).
    pub eoi_vector: Option<u8>,
    /// An IPI to route. A fixed IPI to self never appears here: it is delivered to
    /// this LAPIC at once.
    pub ipi: Option<Ipi>,
}

/// The timer mode (LVT timer bits 18:17, SDM Vol. 3A 11.5.4, Figure 11-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// Counts down once from the initial count (also the reserved encoding 11b).
    OneShot,
    /// Counts down and reloads.
    Periodic,
    /// Fires when the guest TSC reaches `IA32_TSC_DEADLINE`.
    TscDeadline,
}

/// What LVT LINT0/LINT1 deliver (SDM Vol. 3A 11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LintMode {
    /// The vector in the entry.
    Fixed(u8),
    /// SMI.
    Smi,
    /// NMI.
    Nmi,
    /// INIT.
    Init,
    /// External interrupt: the 8259's INTA cycle supplies the vector.
    ExtInt,
    /// A reserved encoding (nothing is delivered).
    Reserved,
}

/// An LVT LINT0/LINT1 entry, decoded for the PIC and NMI routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lint {
    /// Masked: the pin is ignored.
    pub masked: bool,
    /// What the pin delivers.
    pub mode: LintMode,
    /// Level-triggered (else edge).
    pub level_triggered: bool,
    /// Active low (else high).
    pub active_low: bool,
}

/// 256 bits, one per vector: IRR, ISR or TMR (SDM Vol. 3A 11.8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, v: u8) {
        if let Some(w) = self.0.get_mut(usize::from(v >> 5)) {
            *w |= 1 << (v & 31);
        }
    }
    fn clear(&mut self, v: u8) {
        if let Some(w) = self.0.get_mut(usize::from(v >> 5)) {
            *w &= !(1 << (v & 31));
        }
    }
    fn test(&self, v: u8) -> bool {
        self.0.get(usize::from(v >> 5)).is_some_and(|w| w & (1 << (v & 31)) != 0)
    }
    fn highest(&self) -> Option<u8> {
        let (i, w) = self.0.iter().enumerate().rev().find(|(_, w)| **w != 0)?;
        // i < 8 and the bit index < 32, so this is at most 255.
        u8::try_from(i * 32 + (31 - w.leading_zeros() as usize)).ok()
    }
    fn word(&self, i: u32) -> u32 {
        self.0.get(i as usize).copied().unwrap_or(0)
    }
}

/// One vCPU's local APIC.
#[derive(Debug, Clone)]
pub struct Lapic {
    /// The APIC ID (initial APIC ID from CPUID; read-only here, SDM Vol. 3A 11.4.6
    /// allows writes on some models only, and routing names vCPUs by this ID).
    id: u32,
    bsp: bool,
    /// IA32_APIC_BASE without the BSP bit (that comes from `bsp`).
    base: u64,
    tpr: u32,
    /// xAPIC LDR (the x2APIC one is derived from the ID).
    ldr: u32,
    dfr: u32,
    svr: u32,
    /// The ESR as the guest reads it, and the errors since the last ESR write
    /// (SDM Vol. 3A 11.5.3: a write moves the latter into the former).
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    /// xAPIC: destination in bits 31:24; x2APIC: the 32-bit destination.
    icr_high: u32,
    lvt_timer: u32,
    lvt_thermal: u32,
    lvt_perf: u32,
    lvt_lint0: u32,
    lvt_lint1: u32,
    lvt_error: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    timer_initial: u32,
    divide_config: u32,
    /// The divisor latched when the countdown was started (the one it counts with).
    count_divisor: u64,
    /// When the timer next fires (guest ns), in every mode.
    deadline_ns: Option<u64>,
    /// IA32_TSC_DEADLINE (0: disarmed).
    tsc_deadline: u64,
    tsc_hz: u64,
    wait_for_sipi: bool,
    /// The latest guest time seen, for the trait's `save`/`load` (which get none).
    now_seen_ns: u64,
    /// Effects of the last trait `write`, for [`Lapic::take_effects`].
    unreported: Effects,
}

/// The x2APIC logical ID derived from the x2APIC ID (SDM Vol. 3A 11.12.10.2): cluster
/// ID[31:4] in bits 31:16, bit ID[3:0] set in bits 15:0.
pub fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1u32 << (id & 0xf))
}

/// The divisor for a divide configuration value (SDM Vol. 3A 11.5.4, Figure 11-10):
/// bits 3,1:0 = 000 → 2, 001 → 4, …, 110 → 128, 111 → 1.
fn divisor(dcr: u32) -> u64 {
    let code = (dcr & 3) | ((dcr >> 1) & 4);
    1u64 << ((code + 1) & 7)
}

fn decode_mode(base: u64) -> Option<ApicMode> {
    match (base & BASE_EN != 0, base & BASE_EXTD != 0) {
        (false, false) => Some(ApicMode::Disabled),
        (true, false) => Some(ApicMode::XApic),
        (true, true) => Some(ApicMode::X2Apic),
        (false, true) => None,
    }
}

fn msr_index(msr: u32) -> Option<u32> {
    (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr).then(|| msr - X2APIC_MSR_FIRST)
}

impl Lapic {
    /// The LAPIC of the vCPU with APIC ID `id`, as firmware hands it to a kernel
    /// (like SeaBIOS): xAPIC at 0xFEE0_0000, software-enabled (SVR 0x1FF), LINT1 as
    /// NMI, and on the BSP LINT0 as ExtINT so the 8259 reaches it (virtual wire, MP
    /// spec 3.6.2.2); an AP waits for a SIPI. `tsc_hz` is the guest TSC frequency for
    /// `IA32_TSC_DEADLINE` (0 is taken as 1).
    pub fn new(id: u32, bsp: bool, tsc_hz: u64) -> Self {
        let mut l = Self {
            id,
            bsp,
            base: DEFAULT_APIC_BASE | BASE_EN,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt_timer: 0,
            lvt_thermal: 0,
            lvt_perf: 0,
            lvt_lint0: 0,
            lvt_lint1: 0,
            lvt_error: 0,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            timer_initial: 0,
            divide_config: 0,
            count_divisor: 2,
            deadline_ns: None,
            tsc_deadline: 0,
            tsc_hz: tsc_hz.max(1),
            wait_for_sipi: !bsp,
            now_seen_ns: 0,
            unreported: Effects::default(),
        };
        l.reset_registers();
        l.svr = SVR_ENABLE | 0xff;
        l.lvt_lint1 = 0x400;
        if bsp {
            l.lvt_lint0 = 0x700;
        }
        l
    }

    /// Registers as after power-up or INIT (SDM Vol. 3A 11.4.7.1, 11.4.7.3): ID and
    /// APIC base are kept.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt_timer = LVT_RESET;
        self.lvt_thermal = LVT_RESET;
        self.lvt_perf = LVT_RESET;
        self.lvt_lint0 = LVT_RESET;
        self.lvt_lint1 = LVT_RESET;
        self.lvt_error = LVT_RESET;
        self.isr = VectorSet::default();
        self.tmr = VectorSet::default();
        self.irr = VectorSet::default();
        self.timer_initial = 0;
        self.divide_config = 0;
        self.count_divisor = divisor(0);
        self.deadline_ns = None;
        self.tsc_deadline = 0;
    }

    fn see(&mut self, now_ns: u64) {
        self.now_seen_ns = self.now_seen_ns.max(now_ns);
    }

    /// The APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.id
    }

    /// Whether this is the bootstrap processor's LAPIC.
    pub fn is_bsp(&self) -> bool {
        self.bsp
    }

    /// The mode `IA32_APIC_BASE` selects.
    pub fn mode(&self) -> ApicMode {
        // `write_apic_base` and `load_at` never store the invalid combination.
        decode_mode(self.base).unwrap_or(ApicMode::Disabled)
    }

    /// Globally enabled (xAPIC or x2APIC) and software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.mode() != ApicMode::Disabled && self.svr & SVR_ENABLE != 0
    }

    /// The guest-physical address of the xAPIC page (only meaningful in xAPIC mode).
    pub fn mmio_base(&self) -> u64 {
        self.base & BASE_ADDR_MASK
    }

    /// RDMSR `IA32_APIC_BASE`.
    pub fn read_apic_base(&self) -> u64 {
        self.base | if self.bsp { BASE_BSP } else { 0 }
    }

    /// WRMSR `IA32_APIC_BASE`. Legal transitions (SDM Vol. 3A 11.12.5, Figure 11-30):
    /// disabled → xAPIC, xAPIC → x2APIC, xAPIC or x2APIC → disabled, and any mode to
    /// itself (moving the page). x2APIC → xAPIC, disabled → x2APIC and EN = 0 with
    /// EXTD = 1 are #GP, as are reserved bits (0–7, 9, 52–63). The BSP bit is
    /// read-only here. Disabling resets the registers (SDM Vol. 3A 11.4.3: prior
    /// initialization may be lost; the state is that of 11.4.7.1).
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), LapicError> {
        if value & !(BASE_ADDR_MASK | BASE_BSP | BASE_EXTD | BASE_EN) != 0 {
            return Err(LapicError::BaseReservedBits { value });
        }
        let from = self.mode();
        let to = decode_mode(value).ok_or(LapicError::IllegalTransition { from, value })?;
        let legal = from == to
            || matches!(
                (from, to),
                (ApicMode::Disabled, ApicMode::XApic)
                    | (ApicMode::XApic, ApicMode::X2Apic)
                    | (ApicMode::XApic, ApicMode::Disabled)
                    | (ApicMode::X2Apic, ApicMode::Disabled)
            );
        if !legal {
            return Err(LapicError::IllegalTransition { from, value });
        }
        if to == ApicMode::Disabled && from != ApicMode::Disabled {
            self.reset_registers();
        }
        self.base = value & !BASE_BSP;
        Ok(())
    }

    /// The task-priority register (CR8 is its bits 7:4, SDM Vol. 3A 11.8.6).
    pub fn tpr(&self) -> u8 {
        (self.tpr & 0xff) as u8
    }

    /// Set the TPR (for CR8 writes: `set_tpr(cr8 << 4)`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// The processor-priority register (SDM Vol. 3A 11.8.3.1): the TPR if its class is
    /// at least that of the highest in-service vector, else that vector's class.
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) { self.tpr & 0xff } else { isrv & 0xf0 }
    }

    /// The vector to inject now, if any: the highest requested vector whose priority
    /// class is above the PPR's (SDM Vol. 3A 11.8.3). The backend injects it when
    /// RFLAGS.IF and the interrupt shadow allow, and then calls [`Lapic::ack`].
    pub fn pending_interrupt(&self) -> Option<u8> {
        if self.mode() == ApicMode::Disabled {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The interrupt `vector` was injected: IRR → ISR (SDM Vol. 3A 11.8.4). A vector
    /// that is not requested is ignored.
    pub fn ack(&mut self, vector: u8) {
        if self.irr.test(vector) {
            self.irr.clear(vector);
            self.isr.set(vector);
        }
    }

    /// A fixed or lowest-priority interrupt arrives (from the I/O APIC, an IPI or an
    /// MSI): set its IRR bit, and its TMR bit if level-triggered (SDM Vol. 3A 11.8.4).
    /// Vectors 0–15 are illegal: not accepted, ESR "receive illegal vector" (11.5.3).
    /// A disabled LAPIC (global or software, 11.4.7.2) accepts none. Returns whether
    /// it was accepted.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// An interrupt generated inside the LAPIC (LVT, self IPI): edge-triggered, and
    /// dropped while disabled like any fixed interrupt.
    fn local_interrupt(&mut self, vector: u8) {
        if !self.enabled() {
            return;
        }
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
        } else {
            self.irr.set(vector);
            self.tmr.clear(vector);
        }
    }

    /// Log an error and raise the error LVT's interrupt unless masked (SDM Vol. 3A
    /// 11.5.3). An illegal error vector only logs itself: no recursion.
    fn record_error(&mut self, bit: u32) {
        self.esr_pending |= bit;
        if self.lvt_error & LVT_MASKED == 0 {
            let v = (self.lvt_error & LVT_VECTOR) as u8;
            if v < 16 {
                self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            } else {
                self.irr.set(v);
                self.tmr.clear(v);
            }
        }
    }

    /// EOI (SDM Vol. 3A 11.8.5): retire the highest in-service vector; if it was
    /// level-triggered, report it for the I/O APIC.
    fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.clear(v);
        self.tmr.test(v).then_some(v)
    }

    /// INIT arrived (SDM Vol. 3A 11.4.7.3, 8.4): registers as after INIT (ID, APIC
    /// base and x2APIC mode are kept, 11.12.5.1), and an AP waits for a SIPI. Returns
    /// whether it now waits (the BSP does not: the caller restarts it at the reset
    /// vector).
    pub fn receive_init(&mut self) -> bool {
        self.reset_registers();
        self.wait_for_sipi = !self.bsp;
        self.wait_for_sipi
    }

    /// A start-up IPI arrived: if waiting for one, the start vector, once (the caller
    /// starts the vCPU in real mode at vector × 0x1000); otherwise ignored (SDM Vol. 3A
    /// 8.4.4.1: a SIPI to a running processor is dropped).
    pub fn receive_sipi(&mut self, vector: u8) -> Option<u8> {
        core::mem::take(&mut self.wait_for_sipi).then_some(vector)
    }

    /// Waiting for a SIPI (the vCPU must not run).
    pub fn waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// LVT LINT0 (on the BSP, where the 8259 is wired).
    pub fn lint0(&self) -> Lint {
        Self::decode_lint(self.lvt_lint0)
    }

    /// LVT LINT1 (where NMI is wired).
    pub fn lint1(&self) -> Lint {
        Self::decode_lint(self.lvt_lint1)
    }

    fn decode_lint(v: u32) -> Lint {
        let mode = match (v >> 8) & 7 {
            0 => LintMode::Fixed((v & LVT_VECTOR) as u8),
            2 => LintMode::Smi,
            4 => LintMode::Nmi,
            5 => LintMode::Init,
            7 => LintMode::ExtInt,
            _ => LintMode::Reserved,
        };
        Lint {
            masked: v & LVT_MASKED != 0,
            mode,
            level_triggered: v & LVT_LEVEL != 0,
            active_low: v & LVT_ACTIVE_LOW != 0,
        }
    }

    /// Whether an 8259 interrupt reaches the CPU: LINT0 unmasked as ExtINT, or the
    /// APIC globally disabled (then LINT0 is the INTR pin, SDM Vol. 3A 11.4.3).
    pub fn accepts_pic_interrupt(&self) -> bool {
        let l = self.lint0();
        self.mode() == ApicMode::Disabled || (!l.masked && l.mode == LintMode::ExtInt)
    }

    /// Whether the NMI pin (LINT1) delivers an NMI: unmasked with delivery mode NMI,
    /// or the APIC globally disabled (LINT1 is then the NMI pin, SDM Vol. 3A 11.4.3).
    pub fn lint1_delivers_nmi(&self) -> bool {
        let l = self.lint1();
        self.mode() == ApicMode::Disabled || (!l.masked && l.mode == LintMode::Nmi)
    }

    /// What IPI routing matches against for this LAPIC.
    pub fn address(&self) -> ApicAddress {
        if self.mode() == ApicMode::X2Apic {
            ApicAddress { id: self.id, ldr: x2apic_ldr(self.id), flat: false }
        } else {
            ApicAddress { id: self.id, ldr: self.ldr, flat: self.dfr >> 28 == 0xf }
        }
    }

    // ---- the timer (SDM Vol. 3A 11.5.4) ----

    /// The timer mode.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt_timer >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// The countdown's length in ns: initial count × divisor at one tick per ns, and
    /// in periodic mode at least [`MIN_PERIODIC_NS`].
    fn period_ns(&self) -> u64 {
        let p = u64::from(self.timer_initial).saturating_mul(self.count_divisor);
        if self.timer_mode() == TimerMode::Periodic { p.max(MIN_PERIODIC_NS) } else { p }
    }

    /// The current-count register, computed from guest time: it reads 0 when the timer
    /// has run out (one-shot) or is in TSC-deadline mode; periodic counts reload.
    fn current_count(&self, now: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let Some(d) = self.deadline_ns else { return 0 };
        let remaining = if now < d {
            d - now
        } else if self.timer_mode() == TimerMode::Periodic {
            let p = self.period_ns().max(1);
            p - (now - d) % p
        } else {
            0
        };
        let count = remaining.div_ceil(self.count_divisor.max(1));
        count.min(u64::from(self.timer_initial)) as u32
    }

    fn write_initial_count(&mut self, value: u32, now: u64) {
        // SDM Vol. 3A 11.5.4.1: in TSC-deadline mode writes to the initial count are
        // ignored.
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.timer_initial = value;
        self.count_divisor = divisor(self.divide_config);
        // A write starts the countdown; 0 stops it (SDM Vol. 3A 11.5.4).
        self.deadline_ns = (value != 0).then(|| now.saturating_add(self.period_ns()));
    }

    fn write_lvt_timer(&mut self, value: u32) {
        let was_tsc = self.timer_mode() == TimerMode::TscDeadline;
        self.lvt_timer = value & LVT_TIMER_BITS;
        // Switching into or out of TSC-deadline mode disarms the timer (SDM Vol. 3A
        // 11.5.4.1); between one-shot and periodic the countdown goes on.
        if was_tsc != (self.timer_mode() == TimerMode::TscDeadline) {
            self.deadline_ns = None;
            self.tsc_deadline = 0;
            self.timer_initial = 0;
        }
    }

    /// WRMSR `IA32_TSC_DEADLINE`: arm (or with 0 disarm) the TSC-deadline timer. Ignored
    /// outside TSC-deadline mode (SDM Vol. 3A 11.5.4.1). A deadline already past fires
    /// at the next [`Lapic::advance_to`].
    pub fn write_tsc_deadline(&mut self, tsc: u64) {
        if self.timer_mode() != TimerMode::TscDeadline || self.mode() == ApicMode::Disabled {
            return;
        }
        self.tsc_deadline = tsc;
        self.deadline_ns = (tsc != 0).then(|| self.tsc_to_ns(tsc));
    }

    /// RDMSR `IA32_TSC_DEADLINE`: the armed deadline, 0 once fired or outside
    /// TSC-deadline mode.
    pub fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline { self.tsc_deadline } else { 0 }
    }

    /// The first guest ns at which the guest TSC (`ns × tsc_hz / 10⁹`, rounded down)
    /// has reached `tsc`, so the interrupt never comes before the guest sees the time.
    fn tsc_to_ns(&self, tsc: u64) -> u64 {
        let ns = (u128::from(tsc) * 1_000_000_000).div_ceil(u128::from(self.tsc_hz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// When the timer next fires (guest ns), if armed.
    pub fn next_timer_ns(&self) -> Option<u64> {
        self.deadline_ns
    }

    /// Fire the timer if it is due at `now_ns`: request the LVT timer vector unless
    /// masked, re-arm periodic mode at the next period boundary after `now_ns` (missed
    /// periods coalesce into one interrupt), disarm one-shot, and clear
    /// `IA32_TSC_DEADLINE` (SDM Vol. 3A 11.5.4, 11.5.4.1).
    pub fn advance_to(&mut self, now_ns: u64) {
        self.see(now_ns);
        let Some(d) = self.deadline_ns else { return };
        if now_ns < d {
            return;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                let p = self.period_ns().max(1);
                let periods = ((now_ns - d) / p).saturating_add(1);
                self.deadline_ns = Some(d.saturating_add(p.saturating_mul(periods)));
            }
            TimerMode::OneShot => self.deadline_ns = None,
            TimerMode::TscDeadline => {
                self.deadline_ns = None;
                self.tsc_deadline = 0;
            }
        }
        if self.lvt_timer & LVT_MASKED == 0 {
            self.local_interrupt((self.lvt_timer & LVT_VECTOR) as u8);
        }
    }

    // ---- registers ----

    fn lvt(&self, idx: u32) -> u32 {
        match idx {
            R_LVT_TIMER => self.lvt_timer,
            R_LVT_THERMAL => self.lvt_thermal,
            R_LVT_PERF => self.lvt_perf,
            R_LVT_LINT0 => self.lvt_lint0,
            R_LVT_LINT1 => self.lvt_lint1,
            _ => self.lvt_error,
        }
    }

    fn lvt_bits(idx: u32) -> u32 {
        match idx {
            R_LVT_TIMER => LVT_TIMER_BITS,
            R_LVT_THERMAL | R_LVT_PERF => LVT_THERMAL_PERF_BITS,
            R_LVT_LINT0 | R_LVT_LINT1 => LVT_LINT_BITS,
            _ => LVT_ERROR_BITS,
        }
    }

    fn write_lvt(&mut self, idx: u32, value: u32) {
        // SDM Vol. 3A 11.4.7.2: while software-disabled the mask bits stay set.
        let value = (if self.svr & SVR_ENABLE == 0 { value | LVT_MASKED } else { value }) & Self::lvt_bits(idx);
        match idx {
            R_LVT_TIMER => self.write_lvt_timer(value),
            R_LVT_THERMAL => self.lvt_thermal = value,
            R_LVT_PERF => self.lvt_perf = value,
            R_LVT_LINT0 => self.lvt_lint0 = value,
            R_LVT_LINT1 => self.lvt_lint1 = value,
            _ => self.lvt_error = value,
        }
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_BITS;
        if self.svr & SVR_ENABLE == 0 {
            // SDM Vol. 3A 11.4.7.2: software disable masks every LVT entry.
            for lvt in [
                &mut self.lvt_timer,
                &mut self.lvt_thermal,
                &mut self.lvt_perf,
                &mut self.lvt_lint0,
                &mut self.lvt_lint1,
                &mut self.lvt_error,
            ] {
                *lvt |= LVT_MASKED;
            }
        }
    }

    /// The registers both modes share, by index; `None` for those that differ or do
    /// not exist.
    fn read_common(&self, idx: u32, now: u64) -> Option<u32> {
        Some(match idx {
            R_VERSION => VERSION,
            R_TPR => self.tpr,
            R_PPR => self.ppr(),
            R_SVR => self.svr,
            0x10..=0x17 => self.isr.word(idx - R_ISR),
            0x18..=0x1f => self.tmr.word(idx - R_TMR),
            0x20..=0x27 => self.irr.word(idx - R_IRR),
            R_ESR => self.esr,
            R_LVT_TIMER..=R_LVT_ERROR => self.lvt(idx),
            R_TIMER_INITIAL => self.timer_initial,
            R_TIMER_CURRENT => self.current_count(now),
            R_TIMER_DIVIDE => self.divide_config,
            _ => return None,
        })
    }

    /// Decode an ICR value and send it (SDM Vol. 3A 11.6.1). `dest` is the destination
    /// field already extracted for the mode.
    fn send_icr(&mut self, low: u32, dest: u32) -> Option<Ipi> {
        let vector = (low & 0xff) as u8;
        let level = low & (1 << 14) != 0;
        let level_triggered = low & (1 << 15) != 0;
        let mode = match (low >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 if !level && level_triggered => DeliveryMode::InitDeassert,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            // 011b and 111b are reserved: nothing is sent.
            _ => return None,
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        let destination = match (low >> 18) & 3 {
            0 if low & (1 << 11) != 0 => Destination::Logical(dest),
            0 => Destination::Physical(dest),
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf,
        };
        if destination == Destination::SelfOnly && mode == DeliveryMode::Fixed {
            // A fixed self-IPI never leaves the LAPIC.
            self.local_interrupt(vector);
            return None;
        }
        let x2apic = self.mode() == ApicMode::X2Apic;
        Some(Ipi { destination, mode, vector, level, level_triggered, x2apic })
    }

    // ---- the xAPIC page (SDM Vol. 3A 11.4.1, Table 11-1) ----

    fn xapic_read(&mut self, idx: u32, now: u64) -> u32 {
        let common = self.read_common(idx, now);
        let v = match idx {
            R_ID => Some((self.id & 0xff) << 24),
            R_APR | R_EOI | R_RRD => Some(0),
            R_LDR => Some(self.ldr),
            R_DFR => Some(self.dfr),
            R_ICR => Some(self.icr_low),
            R_ICR_HIGH => Some(self.icr_high),
            _ => common,
        };
        v.unwrap_or_else(|| {
            self.record_error(ESR_ILLEGAL_REGISTER);
            0
        })
    }

    fn xapic_write(&mut self, idx: u32, value: u32, now: u64) -> Effects {
        let mut fx = Effects::default();
        match idx {
            // The ID is read-only here (see `Lapic::id`); version, PPR, APR, ISR,
            // TMR, IRR, RRD and the current count are read-only everywhere.
            R_ID | R_VERSION | R_APR | R_PPR | R_RRD | 0x10..=0x27 | R_TIMER_CURRENT => {}
            R_TPR => self.tpr = value & 0xff,
            R_EOI => fx.eoi_vector = self.eoi(),
            R_LDR => self.ldr = value & 0xff00_0000,
            R_DFR => self.dfr = value | 0x0fff_ffff,
            R_SVR => self.write_svr(value),
            R_ESR => self.esr = core::mem::take(&mut self.esr_pending),
            R_ICR => {
                self.icr_low = value & ICR_LOW_BITS;
                fx.ipi = self.send_icr(self.icr_low, self.icr_high >> 24);
            }
            R_ICR_HIGH => self.icr_high = value & 0xff00_0000,
            R_LVT_TIMER..=R_LVT_ERROR => self.write_lvt(idx, value),
            R_TIMER_INITIAL => self.write_initial_count(value, now),
            // A running countdown keeps the divisor it started with; the new one
            // counts from the next initial-count write (Linux writes TDCR first).
            R_TIMER_DIVIDE => self.divide_config = value & DIVIDE_BITS,
            _ => self.record_error(ESR_ILLEGAL_REGISTER),
        }
        fx
    }

    /// A guest read of the xAPIC page at `offset` (0..0x1000). Registers are 32 bits at
    /// 16-byte aligned offsets (SDM Vol. 3A 11.4.1); narrower reads inside a register
    /// get its bytes, anything else reads 0. In x2APIC mode the page reads 0, and
    /// when globally disabled all ones (there is no APIC there).
    pub fn read_mmio(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        self.see(now_ns);
        match self.mode() {
            ApicMode::Disabled => return data.fill(0xff),
            ApicMode::X2Apic => return data.fill(0),
            ApicMode::XApic => {}
        }
        let within = (offset & 0xf) as usize;
        let len = data.len();
        if offset >= 0x1000 || !(1..=4).contains(&len) || within + len > 4 {
            return data.fill(0);
        }
        let v = self.xapic_read((offset >> 4) as u32, now_ns);
        put_le(data, u64::from(v >> (8 * within)));
    }

    /// A guest write to the xAPIC page at `offset`: only 4-byte writes at 16-byte
    /// aligned offsets reach a register; others are dropped, as are writes in x2APIC
    /// or disabled mode.
    pub fn write_mmio(&mut self, offset: u64, data: &[u8], now_ns: u64) -> Effects {
        self.see(now_ns);
        if self.mode() != ApicMode::XApic || offset >= 0x1000 || offset & 0xf != 0 || data.len() != 4 {
            return Effects::default();
        }
        self.xapic_write((offset >> 4) as u32, le_value(data) as u32, now_ns)
    }

    // ---- the x2APIC MSRs (SDM Vol. 3A 11.12.1.2, Table 11-6) ----

    /// RDMSR of an x2APIC MSR (0x800–0x8FF).
    pub fn read_msr(&mut self, msr: u32, now_ns: u64) -> Result<u64, LapicError> {
        self.see(now_ns);
        let idx = msr_index(msr).ok_or(LapicError::NoSuchRegister { msr })?;
        if self.mode() != ApicMode::X2Apic {
            return Err(LapicError::NotX2Apic { msr });
        }
        match idx {
            R_ID => Ok(u64::from(self.id)),
            R_LDR => Ok(u64::from(x2apic_ldr(self.id))),
            R_ICR => Ok((u64::from(self.icr_high) << 32) | u64::from(self.icr_low)),
            R_EOI | R_SELF_IPI => Err(LapicError::WriteOnly { msr }),
            _ => self.read_common(idx, now_ns).map(u64::from).ok_or(LapicError::NoSuchRegister { msr }),
        }
    }

    /// WRMSR of an x2APIC MSR (0x800–0x8FF). Reserved bits (the upper 32 bits of all
    /// but the ICR included), read-only registers and a non-zero EOI or ESR write are
    /// #GP (SDM Vol. 3A 11.12.1.2).
    pub fn write_msr(&mut self, msr: u32, value: u64, now_ns: u64) -> Result<Effects, LapicError> {
        self.see(now_ns);
        let idx = msr_index(msr).ok_or(LapicError::NoSuchRegister { msr })?;
        if self.mode() != ApicMode::X2Apic {
            return Err(LapicError::NotX2Apic { msr });
        }
        let reserved =
            |allowed: u64| if value & !allowed != 0 { Err(LapicError::ReservedBits { msr, value }) } else { Ok(()) };
        let v32 = value as u32;
        let mut fx = Effects::default();
        match idx {
            R_ID | R_VERSION | R_PPR | R_LDR | 0x10..=0x27 | R_TIMER_CURRENT => {
                return Err(LapicError::ReadOnly { msr });
            }
            R_TPR => {
                reserved(0xff)?;
                self.tpr = v32;
            }
            R_EOI => {
                reserved(0)?;
                fx.eoi_vector = self.eoi();
            }
            R_SVR => {
                reserved(u64::from(SVR_BITS))?;
                self.write_svr(v32);
            }
            R_ESR => {
                reserved(0)?;
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            R_ICR => {
                reserved(ICR_X2APIC_BITS)?;
                self.icr_low = v32;
                self.icr_high = (value >> 32) as u32;
                fx.ipi = self.send_icr(self.icr_low, self.icr_high);
            }
            R_LVT_TIMER..=R_LVT_ERROR => {
                reserved(u64::from(Self::lvt_bits(idx) | LVT_RO_STATUS))?;
                self.write_lvt(idx, v32);
            }
            R_TIMER_INITIAL => {
                reserved(0xffff_ffff)?;
                self.write_initial_count(v32, now_ns);
            }
            R_TIMER_DIVIDE => {
                reserved(u64::from(DIVIDE_BITS))?;
                self.divide_config = v32;
            }
            R_SELF_IPI => {
                reserved(0xff)?;
                // SDM Vol. 3A 11.12.11: a fixed, edge-triggered interrupt to self.
                self.local_interrupt(v32 as u8);
            }
            _ => return Err(LapicError::NoSuchRegister { msr }),
        }
        Ok(fx)
    }

    /// The effects of the last [`Device::write`] (the trait cannot return them); the
    /// exit handler takes them after every write, or uses [`Lapic::write_mmio`].
    pub fn take_effects(&mut self) -> Effects {
        core::mem::take(&mut self.unreported)
    }

    // ---- state ----

    /// Save everything, with the timer's deadline as the time remaining after `now_ns`
    /// (a deadline already past saves as 0: it fires right after load).
    ///
    /// Layout, version 1, little-endian:
    ///
    /// | field | type |
    /// |---|---|
    /// | APIC ID | u32 |
    /// | flags: bit 0 BSP, bit 1 waiting for SIPI, bit 2 timer armed | u8 |
    /// | IA32_APIC_BASE (BSP bit clear) | u64 |
    /// | TPR, LDR, DFR, SVR, ESR, errors pending, ICR low, ICR high | 8 × u32 |
    /// | LVT timer, thermal, perf, LINT0, LINT1, error | 6 × u32 |
    /// | ISR, TMR, IRR | 3 × 8 × u32 |
    /// | timer initial count, divide configuration | 2 × u32 |
    /// | divisor of the running countdown | u64 |
    /// | time until the timer fires (ns; 0 if not armed) | u64 |
    /// | IA32_TSC_DEADLINE | u64 |
    pub fn save_at(&self, now_ns: u64) -> DeviceState {
        let mut w = StateWriter::new();
        let flags =
            u8::from(self.bsp) | (u8::from(self.wait_for_sipi) << 1) | (u8::from(self.deadline_ns.is_some()) << 2);
        w.u32(self.id).u8(flags).u64(self.base);
        for r in [
            self.tpr,
            self.ldr,
            self.dfr,
            self.svr,
            self.esr,
            self.esr_pending,
            self.icr_low,
            self.icr_high,
            self.lvt_timer,
            self.lvt_thermal,
            self.lvt_perf,
            self.lvt_lint0,
            self.lvt_lint1,
            self.lvt_error,
        ] {
            w.u32(r);
        }
        for set in [&self.isr, &self.tmr, &self.irr] {
            for word in set.0 {
                w.u32(word);
            }
        }
        w.u32(self.timer_initial).u32(self.divide_config).u64(self.count_divisor);
        w.u64(self.deadline_ns.map_or(0, |d| d.saturating_sub(now_ns)));
        w.u64(self.tsc_deadline);
        w.finish(DeviceKind::Lapic, STATE_VERSION)
    }

    /// Load a state saved by [`Lapic::save_at`], the timer firing its remaining time
    /// after `now_ns`. The state must be this APIC ID's; on error nothing changed.
    pub fn load_at(&mut self, state: &DeviceState, now_ns: u64) -> Result<(), DeviceError> {
        let bad = |why| DeviceError::Malformed { kind: DeviceKind::Lapic, why };
        let mut r = StateReader::new(state, DeviceKind::Lapic, STATE_VERSION)?;
        let mut l = self.clone();
        if r.u32()? != self.id {
            return Err(bad("the state is another APIC ID's"));
        }
        let flags = r.u8()?;
        if flags & !7 != 0 {
            return Err(bad("unknown flags"));
        }
        if (flags & 1 != 0) != self.bsp {
            return Err(bad("BSP flag differs"));
        }
        l.wait_for_sipi = flags & 2 != 0;
        l.base = r.u64()?;
        if l.base & !(BASE_ADDR_MASK | BASE_EXTD | BASE_EN) != 0 || decode_mode(l.base).is_none() {
            return Err(bad("invalid IA32_APIC_BASE"));
        }
        for reg in [
            &mut l.tpr,
            &mut l.ldr,
            &mut l.dfr,
            &mut l.svr,
            &mut l.esr,
            &mut l.esr_pending,
            &mut l.icr_low,
            &mut l.icr_high,
            &mut l.lvt_timer,
            &mut l.lvt_thermal,
            &mut l.lvt_perf,
            &mut l.lvt_lint0,
            &mut l.lvt_lint1,
            &mut l.lvt_error,
        ] {
            *reg = r.u32()?;
        }
        for set in [&mut l.isr, &mut l.tmr, &mut l.irr] {
            for word in &mut set.0 {
                *word = r.u32()?;
            }
        }
        l.timer_initial = r.u32()?;
        l.divide_config = r.u32()? & DIVIDE_BITS;
        l.count_divisor = r.u64()?;
        if !(l.count_divisor.is_power_of_two() && l.count_divisor <= 128) {
            return Err(bad("invalid timer divisor"));
        }
        let remaining = r.u64()?;
        l.tsc_deadline = r.u64()?;
        r.finish()?;
        l.deadline_ns = (flags & 4 != 0).then(|| now_ns.saturating_add(remaining));
        l.now_seen_ns = now_ns;
        l.unreported = Effects::default();
        *self = l;
        Ok(())
    }
}

/// The APIC IDs an IPI reaches, among the LAPICs `all` (SDM Vol. 3A 11.6.2: physical
/// and logical flat/cluster destinations, 11.12.10 for x2APIC, and the shorthands).
/// 0xFF (0xFFFF_FFFF from an x2APIC sender) is a broadcast in both destination modes.
/// For lowest priority the caller delivers to one of them.
pub fn ipi_targets<'a>(ipi: &Ipi, sender_id: u32, all: &'a [ApicAddress]) -> impl Iterator<Item = u32> + 'a {
    let ipi = *ipi;
    all.iter().filter(move |t| ipi_matches(&ipi, sender_id, t)).map(|t| t.id)
}

fn ipi_matches(ipi: &Ipi, sender_id: u32, t: &ApicAddress) -> bool {
    let broadcast = if ipi.x2apic { u32::MAX } else { 0xff };
    match ipi.destination {
        Destination::SelfOnly => t.id == sender_id,
        Destination::AllIncludingSelf => true,
        Destination::AllExcludingSelf => t.id != sender_id,
        Destination::Physical(d) => d == broadcast || t.id == d,
        Destination::Logical(mda) if mda == broadcast => true,
        Destination::Logical(mda) if ipi.x2apic => {
            // SDM Vol. 3A 11.12.10.2: cluster in bits 31:16, a bit per APIC in 15:0.
            t.ldr >> 16 == mda >> 16 && t.ldr & mda & 0xffff != 0
        }
        Destination::Logical(mda) => {
            let lid = t.ldr >> 24;
            if t.flat {
                // SDM Vol. 3A 11.6.2.2: flat model, a bit per APIC.
                lid & mda & 0xff != 0
            } else {
                // Cluster model: cluster in bits 7:4, a bit per APIC in 3:0.
                lid >> 4 == (mda >> 4) & 0xf && lid & mda & 0xf != 0
            }
        }
    }
}

/// The trait's `read`/`write` are the xAPIC page ([`Lapic::read_mmio`],
/// [`Lapic::write_mmio`]; a write's effects wait in [`Lapic::take_effects`]).
/// `save`/`load` are [`Lapic::save_at`]/[`Lapic::load_at`] at the latest guest time
/// this LAPIC saw (its last access or `advance`): exact only if the domain's clock has
/// not moved since. Migration calls `save_at`/`load_at` with the guest clock.
impl Device for Lapic {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Lapic
    }
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        self.read_mmio(offset, data, ctx.now_ns);
    }
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        self.unreported = self.write_mmio(offset, data, ctx.now_ns);
    }
    fn next_event_ns(&self) -> Option<u64> {
        self.next_timer_ns()
    }
    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.advance_to(ctx.now_ns);
    }
    fn save(&self) -> DeviceState {
        self.save_at(self.now_seen_ns)
    }
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        self.load_at(state, self.now_seen_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::super::NoIrqs;
    use super::*;

    const TSC_HZ: u64 = 2_000_000_000;
    const MS: u64 = 1_000_000;
    const US: u64 = 1_000;

    // xAPIC offsets (SDM Vol. 3A Table 11-1), as Linux's apicdef.h names them.
    const APIC_ID: u64 = 0x20;
    const APIC_LVR: u64 = 0x30;
    const APIC_TASKPRI: u64 = 0x80;
    const APIC_PROCPRI: u64 = 0xa0;
    const APIC_EOI: u64 = 0xb0;
    const APIC_LDR: u64 = 0xd0;
    const APIC_DFR: u64 = 0xe0;
    const APIC_SPIV: u64 = 0xf0;
    const APIC_ISR: u64 = 0x100;
    const APIC_TMR: u64 = 0x180;
    const APIC_IRR: u64 = 0x200;
    const APIC_ESR: u64 = 0x280;
    const APIC_ICR: u64 = 0x300;
    const APIC_ICR2: u64 = 0x310;
    const APIC_LVTT: u64 = 0x320;
    const APIC_LVT0: u64 = 0x350;
    const APIC_LVT1: u64 = 0x360;
    const APIC_LVTERR: u64 = 0x370;
    const APIC_TMICT: u64 = 0x380;
    const APIC_TMCCT: u64 = 0x390;
    const APIC_TDCR: u64 = 0x3e0;

    const LOCAL_TIMER_VECTOR: u32 = 0xec;
    const ERROR_APIC_VECTOR: u32 = 0xfe;
    const SPURIOUS_APIC_VECTOR: u32 = 0xff;

    fn rd(l: &mut Lapic, off: u64, now: u64) -> u32 {
        let mut d = [0u8; 4];
        l.read_mmio(off, &mut d, now);
        u32::from_le_bytes(d)
    }

    fn wr(l: &mut Lapic, off: u64, v: u32, now: u64) -> Effects {
        l.write_mmio(off, &v.to_le_bytes(), now)
    }

    fn bsp() -> Lapic {
        Lapic::new(0, true, TSC_HZ)
    }

    fn x2(id: u32) -> Lapic {
        let mut l = Lapic::new(id, id == 0, TSC_HZ);
        l.write_apic_base(DEFAULT_APIC_BASE | BASE_EN | BASE_EXTD).unwrap();
        l
    }

    fn irr_has(l: &mut Lapic, v: u8) -> bool {
        rd(l, APIC_IRR + u64::from(v >> 5) * 0x10, 0) & (1 << (v & 31)) != 0
    }

    #[test]
    fn firmware_state_and_read_only_registers() {
        let mut l = Lapic::new(3, false, TSC_HZ);
        assert_eq!(l.read_apic_base(), 0xfee0_0800, "AP: enabled, no BSP bit");
        assert_eq!(bsp().read_apic_base(), 0xfee0_0900);
        assert_eq!(rd(&mut l, APIC_ID, 0), 3 << 24);
        assert_eq!(rd(&mut l, APIC_LVR, 0), 0x0005_0014);
        assert_eq!(rd(&mut l, APIC_DFR, 0), 0xffff_ffff);
        assert!(l.waiting_for_sipi(), "an AP waits for its SIPI");
        assert!(!bsp().waiting_for_sipi());
        wr(&mut l, APIC_ID, 7 << 24, 0);
        wr(&mut l, APIC_LVR, 0, 0);
        assert_eq!((rd(&mut l, APIC_ID, 0), rd(&mut l, APIC_LVR, 0)), (3 << 24, VERSION));
        // Narrow reads inside a register get its bytes; unaligned or wide ones 0.
        let mut b = [0u8; 1];
        l.read_mmio(APIC_LVR + 2, &mut b, 0);
        assert_eq!(b, [5]);
        let mut q = [0xaau8; 8];
        l.read_mmio(APIC_LVR, &mut q, 0);
        assert_eq!(q, [0; 8]);
        let mut d = [0xaau8; 4];
        l.read_mmio(APIC_LVR + 2, &mut d, 0);
        assert_eq!(d, [0; 4], "crosses the register's end");
    }

    #[test]
    fn linux_setup_local_apic_sequence() {
        for (cpu, mut l) in [(0u32, bsp()), (1, Lapic::new(1, false, TSC_HZ))] {
            // setup_local_APIC(): TPR 0, SVR enable with the spurious vector, LVT0
            // ExtINT on the BSP (masked on APs), LVT1 NMI on the BSP only, then the
            // error vector and the ESR clear (write, write, read).
            wr(&mut l, APIC_TASKPRI, 0, 0);
            let v = rd(&mut l, APIC_SPIV, 0);
            wr(&mut l, APIC_SPIV, (v & !0xff) | 0x100 | SPURIOUS_APIC_VECTOR, 0);
            assert_eq!(rd(&mut l, APIC_SPIV, 0), 0x1ff);
            wr(&mut l, APIC_LVT0, if cpu == 0 { 0x700 } else { 0x1_0700 }, 0);
            wr(&mut l, APIC_LVT1, if cpu == 0 { 0x400 } else { 0x1_0400 }, 0);
            wr(&mut l, APIC_LVTERR, ERROR_APIC_VECTOR, 0);
            wr(&mut l, APIC_ESR, 0, 0);
            wr(&mut l, APIC_ESR, 0, 0);
            assert_eq!(rd(&mut l, APIC_ESR, 0), 0);
            assert_eq!(l.accepts_pic_interrupt(), cpu == 0);
            assert_eq!(l.lint1_delivers_nmi(), cpu == 0);
            let lint0 = l.lint0();
            assert_eq!(lint0.mode, LintMode::ExtInt);
            assert_eq!(lint0.masked, cpu != 0);
            assert_eq!(l.lint1().mode, LintMode::Nmi);
            assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0);
            assert!(l.enabled());
        }
    }

    #[test]
    fn software_disable_masks_the_lvts_and_drops_fixed_interrupts() {
        let mut l = bsp();
        wr(&mut l, APIC_SPIV, 0xff, 0);
        assert!(!l.enabled());
        assert_eq!(rd(&mut l, APIC_LVT0, 0), 0x1_0700, "masked");
        wr(&mut l, APIC_LVT0, 0x700, 0);
        assert!(!l.accepts_pic_interrupt(), "mask stays set while software-disabled");
        assert!(!l.accept(0x40, false));
        assert_eq!(l.pending_interrupt(), None);
        wr(&mut l, APIC_SPIV, 0x1ff, 0);
        wr(&mut l, APIC_LVT0, 0x700, 0);
        assert!(l.accepts_pic_interrupt());
    }

    #[test]
    fn one_shot_calibration_with_divide_16() {
        // calibrate_APIC_clock(): __setup_APIC_LVTT(0xffffffff, 0, 0) writes the LVT
        // (masked, one-shot), TDCR divide by 16, TMICT 0xffffffff / 16; then TMCCT is
        // read as time passes.
        let mut l = bsp();
        let t0 = 5 * MS;
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR | LVT_MASKED, t0);
        wr(&mut l, APIC_TDCR, 0x3, t0);
        let init = 0xffff_ffffu32 / 16;
        wr(&mut l, APIC_TMICT, init, t0);
        assert_eq!(rd(&mut l, APIC_TMICT, t0), init);
        assert_eq!(rd(&mut l, APIC_TMCCT, t0), init);
        // 1 GHz bus / 16: one count every 16 ns.
        assert_eq!(rd(&mut l, APIC_TMCCT, t0 + 1600 * US), init - 100_000);
        assert_eq!(rd(&mut l, APIC_TMCCT, t0 + 1600 * US + 8), init - 100_000, "rounds up within a tick");
        assert_eq!(l.next_timer_ns(), Some(t0 + u64::from(init) * 16));
        // Masked: it runs out without an interrupt and stops.
        let end = t0 + u64::from(init) * 16;
        l.advance_to(end);
        assert_eq!(rd(&mut l, APIC_TMCCT, end), 0);
        assert_eq!(l.next_timer_ns(), None);
        assert_eq!(l.pending_interrupt(), None);
        // Unmasked one-shot: one interrupt, then nothing.
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR, end);
        wr(&mut l, APIC_TMICT, 1000, end);
        l.advance_to(end + 16_000 - 1);
        assert_eq!(l.pending_interrupt(), None, "not yet");
        l.advance_to(end + 16_000);
        assert_eq!(l.pending_interrupt(), Some(LOCAL_TIMER_VECTOR as u8));
        assert_eq!(l.next_timer_ns(), None);
        // Writing 0 stops a running countdown.
        wr(&mut l, APIC_TMICT, 1000, end);
        wr(&mut l, APIC_TMICT, 0, end + 1);
        assert_eq!((l.next_timer_ns(), rd(&mut l, APIC_TMCCT, end + 2)), (None, 0));
    }

    #[test]
    fn divide_configuration_encodings() {
        let cases = [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xa, 128), (0xb, 1)];
        for (dcr, div) in cases {
            assert_eq!(divisor(dcr), div, "dcr {dcr:#x}");
            let mut l = bsp();
            wr(&mut l, APIC_TDCR, dcr, 0);
            wr(&mut l, APIC_TMICT, 10_000, 0);
            assert_eq!(l.next_timer_ns(), Some(10_000 * div));
        }
    }

    #[test]
    fn periodic_timer_re_arms_and_coalesces_missed_periods() {
        let mut l = bsp();
        wr(&mut l, APIC_TDCR, 0xb, 0);
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR | (1 << 17), 0);
        assert_eq!(l.timer_mode(), TimerMode::Periodic);
        wr(&mut l, APIC_TMICT, 1_000_000, 0);
        assert_eq!(l.next_timer_ns(), Some(MS));
        l.advance_to(MS);
        assert_eq!(l.pending_interrupt(), Some(0xec));
        l.ack(0xec);
        wr(&mut l, APIC_EOI, 0, MS);
        assert_eq!(l.next_timer_ns(), Some(2 * MS));
        assert_eq!(rd(&mut l, APIC_TMCCT, 1500 * US), 500_000);
        // Past the deadline but not yet advanced: the count has reloaded.
        assert_eq!(rd(&mut l, APIC_TMCCT, 2 * MS + 250 * US), 750_000);
        // The vCPU slept through 3.5 periods: one interrupt, next at the boundary.
        l.advance_to(5 * MS + 500 * US);
        assert_eq!(l.pending_interrupt(), Some(0xec));
        assert_eq!(l.next_timer_ns(), Some(6 * MS));
        // Periodic → one-shot keeps the countdown but stops after it.
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR, 5 * MS + 600 * US);
        l.advance_to(6 * MS);
        assert_eq!(l.next_timer_ns(), None);
    }

    #[test]
    fn periodic_period_is_at_least_the_minimum() {
        let mut l = bsp();
        wr(&mut l, APIC_TDCR, 0xb, 0);
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR | (1 << 17), 0);
        wr(&mut l, APIC_TMICT, 1, 0);
        assert_eq!(l.next_timer_ns(), Some(MIN_PERIODIC_NS));
        // A second of guest time, stepped in 1 µs, fires at most 10 000 times.
        let mut fired = 0u32;
        let mut now = 0;
        while now <= 1_000 * MS {
            if l.next_timer_ns().is_some_and(|t| t <= now) {
                l.advance_to(now);
                fired += 1;
                let next = l.next_timer_ns().unwrap();
                assert!(next > now && next - now <= MIN_PERIODIC_NS);
                assert!(next.is_multiple_of(MIN_PERIODIC_NS), "on the period grid");
            }
            now += US;
        }
        assert_eq!(fired, 10_000);
        assert!(rd(&mut l, APIC_TMCCT, now) <= 1);
        // One-shot has no minimum.
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR, now);
        wr(&mut l, APIC_TMICT, 1, now);
        assert_eq!(l.next_timer_ns(), Some(now + 1));
    }

    #[test]
    fn tsc_deadline_write_fire_clear() {
        let mut l = bsp();
        // Ignored outside TSC-deadline mode.
        l.write_tsc_deadline(1234);
        assert_eq!((l.read_tsc_deadline(), l.next_timer_ns()), (0, None));
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR | (2 << 17), 0);
        assert_eq!(l.timer_mode(), TimerMode::TscDeadline);
        // Guest TSC at 2 GHz: deadline 3_000_001 ticks is reached at 1_500_001 ns
        // (1_500_000.5 rounded up: never before the guest's TSC gets there).
        l.write_tsc_deadline(3_000_001);
        assert_eq!(l.read_tsc_deadline(), 3_000_001);
        assert_eq!(l.next_timer_ns(), Some(1_500_001));
        // The initial count is ignored and the current count reads 0.
        wr(&mut l, APIC_TMICT, 500, 0);
        assert_eq!((rd(&mut l, APIC_TMICT, 0), rd(&mut l, APIC_TMCCT, 0)), (0, 0));
        l.advance_to(1_500_000);
        assert_eq!(l.pending_interrupt(), None);
        l.advance_to(1_500_001);
        assert_eq!(l.pending_interrupt(), Some(0xec));
        assert_eq!((l.read_tsc_deadline(), l.next_timer_ns()), (0, None), "fired: disarmed and cleared");
        // Writing 0 disarms; a past deadline fires at the next advance.
        l.write_tsc_deadline(10_000_000);
        l.write_tsc_deadline(0);
        assert_eq!(l.next_timer_ns(), None);
        l.write_tsc_deadline(1);
        assert!(l.next_timer_ns().is_some_and(|t| t <= 2 * MS));
        // Leaving TSC-deadline mode disarms.
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR, 2 * MS);
        assert_eq!((l.read_tsc_deadline(), l.next_timer_ns()), (0, None));
        // Masked: fires silently.
        wr(&mut l, APIC_LVTT, 0xd0 | LVT_MASKED | (2 << 17), 2 * MS);
        l.write_tsc_deadline(u64::MAX);
        assert_eq!(l.next_timer_ns(), Some(u64::MAX / 2 + 1), "no overflow converting the TSC");
        l.write_tsc_deadline(4_000_000);
        l.advance_to(3 * MS);
        assert!(!irr_has(&mut l, 0xd0));
        assert_eq!(l.read_tsc_deadline(), 0);
    }

    #[test]
    fn priorities_nesting_and_eoi_order() {
        let mut l = bsp();
        assert!(l.accept(0x31, false));
        assert!(l.accept(0x52, false));
        assert_eq!(l.pending_interrupt(), Some(0x52), "highest first");
        l.ack(0x52);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x50);
        assert_eq!(rd(&mut l, APIC_ISR + 0x20, 0), 1 << (0x52 - 0x40));
        assert_eq!(l.pending_interrupt(), None, "0x31 is below the in-service class");
        l.accept(0x5f, false);
        assert_eq!(l.pending_interrupt(), None, "same class as in service: waits");
        l.accept(0x61, false);
        assert_eq!(l.pending_interrupt(), Some(0x61), "a higher class nests");
        l.ack(0x61);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x60);
        assert_eq!(wr(&mut l, APIC_EOI, 0, 0), Effects::default(), "edge: nothing for the I/O APIC");
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x50, "the EOI retired 0x61, the highest");
        assert_eq!(l.pending_interrupt(), None);
        wr(&mut l, APIC_EOI, 0, 0);
        assert_eq!(l.pending_interrupt(), Some(0x5f));
        l.ack(0x5f);
        wr(&mut l, APIC_EOI, 0, 0);
        assert_eq!(l.pending_interrupt(), Some(0x31));
        // The TPR masks classes at or below its own.
        wr(&mut l, APIC_TASKPRI, 0x31, 0);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x31);
        assert_eq!(l.pending_interrupt(), None);
        l.set_tpr(0x20);
        assert_eq!(l.pending_interrupt(), Some(0x31));
        // PPR: TPR wins when its class is at least the ISR's.
        l.ack(0x31);
        wr(&mut l, APIC_TASKPRI, 0x45, 0);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x45);
        wr(&mut l, APIC_TASKPRI, 0x3f, 0);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x3f);
        wr(&mut l, APIC_TASKPRI, 0x2f, 0);
        assert_eq!(rd(&mut l, APIC_PROCPRI, 0), 0x30);
        // EOI with nothing in service, and ack of a vector not requested: no-ops.
        wr(&mut l, APIC_EOI, 0, 0);
        wr(&mut l, APIC_EOI, 0, 0);
        l.ack(0x99);
        assert_eq!(rd(&mut l, APIC_ISR + 0x90, 0), 0);
    }

    #[test]
    fn level_triggered_eoi_is_reported() {
        let mut l = bsp();
        l.accept(0x40, true);
        assert_eq!(rd(&mut l, APIC_TMR + 0x20, 0), 1);
        l.accept(0x80, false);
        l.ack(0x80);
        l.ack(0x40);
        assert_eq!(wr(&mut l, APIC_EOI, 0, 0).eoi_vector, None, "0x80 is edge");
        assert_eq!(wr(&mut l, APIC_EOI, 0, 0).eoi_vector, Some(0x40));
        // Accepted again as edge: TMR follows the latest acceptance.
        l.accept(0x40, false);
        l.ack(0x40);
        assert_eq!(wr(&mut l, APIC_EOI, 0, 0).eoi_vector, None);
        // x2APIC EOI reports the same way.
        let mut x = x2(5);
        x.accept(0x41, true);
        x.ack(0x41);
        assert_eq!(x.write_msr(0x80b, 0, 0).unwrap().eoi_vector, Some(0x41));
    }

    #[test]
    fn illegal_vectors_set_the_esr() {
        let mut l = bsp();
        wr(&mut l, APIC_LVTERR, ERROR_APIC_VECTOR, 0);
        assert!(!l.accept(5, false));
        assert_eq!(rd(&mut l, APIC_IRR, 0), 0, "not requested");
        assert_eq!(rd(&mut l, APIC_ESR, 0), 0, "logged but not visible before an ESR write");
        wr(&mut l, APIC_ESR, 0, 0);
        assert_eq!(rd(&mut l, APIC_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert!(irr_has(&mut l, 0xfe), "the error interrupt");
        wr(&mut l, APIC_ESR, 0, 0);
        assert_eq!(rd(&mut l, APIC_ESR, 0), 0, "a second write clears");
        // Sending one: nothing goes out, ESR "send illegal vector".
        assert_eq!(wr(&mut l, APIC_ICR, 0x0000_0003, 0).ipi, None);
        wr(&mut l, APIC_ESR, 0, 0);
        assert_eq!(rd(&mut l, APIC_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
        // A timer LVT with an illegal vector.
        wr(&mut l, APIC_LVTT, 0x02, 0);
        wr(&mut l, APIC_TMICT, 1, 0);
        l.advance_to(2);
        wr(&mut l, APIC_ESR, 0, 2);
        assert_eq!(rd(&mut l, APIC_ESR, 2), ESR_RECEIVE_ILLEGAL_VECTOR);
        // A reserved register; an illegal error vector logs without recursion.
        wr(&mut l, APIC_LVTERR, 0x03, 2);
        assert_eq!(rd(&mut l, 0x2f0, 2), 0);
        wr(&mut l, APIC_ESR, 0, 2);
        assert_eq!(rd(&mut l, APIC_ESR, 2), ESR_ILLEGAL_REGISTER | ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    #[test]
    fn x2apic_msrs() {
        let mut l = x2(0x21);
        assert_eq!(l.read_msr(0x802, 0), Ok(0x21), "the full 32-bit ID");
        assert_eq!(l.read_msr(0x803, 0), Ok(u64::from(VERSION)));
        assert_eq!(l.read_msr(0x80d, 0), Ok(0x0002_0002), "cluster 2, bit 1");
        assert_eq!(l.read_msr(0x80f, 0), Ok(0x1ff));
        // Linux's x2apic setup: TPR, SVR, LVTs, ESR clear.
        l.write_msr(0x808, 0, 0).unwrap();
        l.write_msr(0x80f, 0x1ff, 0).unwrap();
        l.write_msr(0x835, 0x1_0700, 0).unwrap();
        l.write_msr(0x836, 0x400, 0).unwrap();
        l.write_msr(0x837, 0xfe, 0).unwrap();
        l.write_msr(0x828, 0, 0).unwrap();
        assert_eq!(l.read_msr(0x828, 0), Ok(0));
        // Timer through MSRs.
        l.write_msr(0x83e, 0xb, 0).unwrap();
        l.write_msr(0x832, 0xec, 0).unwrap();
        l.write_msr(0x838, 1000, 0).unwrap();
        assert_eq!(l.read_msr(0x839, 400), Ok(600));
        // SELF IPI goes straight to the IRR.
        l.write_msr(0x83f, 0x55, 0).unwrap();
        assert_eq!(l.read_msr(0x822, 0), Ok(1 << (0x55 - 0x40)));
        assert_eq!(l.pending_interrupt(), Some(0x55));
        // ICR is one 64-bit MSR with a 32-bit destination.
        let fx = l.write_msr(0x830, (0x1234u64 << 32) | 0x40, 0).unwrap();
        assert_eq!(
            fx.ipi,
            Some(Ipi {
                destination: Destination::Physical(0x1234),
                mode: DeliveryMode::Fixed,
                vector: 0x40,
                level: false,
                level_triggered: false,
                x2apic: true,
            })
        );
        assert_eq!(l.read_msr(0x830, 0), Ok((0x1234u64 << 32) | 0x40));
        // #GP cases.
        let gp = [
            (0x802, 1, LapicError::ReadOnly { msr: 0x802 }),
            (0x803, 0, LapicError::ReadOnly { msr: 0x803 }),
            (0x80a, 0, LapicError::ReadOnly { msr: 0x80a }),
            (0x80d, 0, LapicError::ReadOnly { msr: 0x80d }),
            (0x810, 0, LapicError::ReadOnly { msr: 0x810 }),
            (0x827, 0, LapicError::ReadOnly { msr: 0x827 }),
            (0x839, 0, LapicError::ReadOnly { msr: 0x839 }),
            (0x808, 0x100, LapicError::ReservedBits { msr: 0x808, value: 0x100 }),
            (0x808, 1 << 32, LapicError::ReservedBits { msr: 0x808, value: 1 << 32 }),
            (0x80b, 1, LapicError::ReservedBits { msr: 0x80b, value: 1 }),
            (0x828, 1, LapicError::ReservedBits { msr: 0x828, value: 1 }),
            (0x80f, 0x1000, LapicError::ReservedBits { msr: 0x80f, value: 0x1000 }),
            (0x830, 1 << 12, LapicError::ReservedBits { msr: 0x830, value: 1 << 12 }),
            (0x832, 1 << 19, LapicError::ReservedBits { msr: 0x832, value: 1 << 19 }),
            (0x838, 1 << 32, LapicError::ReservedBits { msr: 0x838, value: 1 << 32 }),
            (0x83e, 4, LapicError::ReservedBits { msr: 0x83e, value: 4 }),
            (0x83f, 0x100, LapicError::ReservedBits { msr: 0x83f, value: 0x100 }),
            (0x80e, 0, LapicError::NoSuchRegister { msr: 0x80e }),
            (0x831, 0, LapicError::NoSuchRegister { msr: 0x831 }),
            (0x809, 0, LapicError::NoSuchRegister { msr: 0x809 }),
            (0x82f, 0, LapicError::NoSuchRegister { msr: 0x82f }),
            (0x8ff, 0, LapicError::NoSuchRegister { msr: 0x8ff }),
            (0x7ff, 0, LapicError::NoSuchRegister { msr: 0x7ff }),
        ];
        for (msr, v, e) in gp {
            assert_eq!(l.write_msr(msr, v, 0), Err(e), "wrmsr {msr:#x} {v:#x}");
        }
        assert_eq!(l.read_msr(0x80b, 0), Err(LapicError::WriteOnly { msr: 0x80b }));
        assert_eq!(l.read_msr(0x83f, 0), Err(LapicError::WriteOnly { msr: 0x83f }));
        assert_eq!(l.read_msr(0x80e, 0), Err(LapicError::NoSuchRegister { msr: 0x80e }));
        assert_eq!(l.read_msr(0x831, 0), Err(LapicError::NoSuchRegister { msr: 0x831 }));
        assert_eq!(l.read_msr(0x835, 0), Ok(0x1_0700), "the failed writes changed nothing");
        // The xAPIC page is gone; the MSRs are gone in xAPIC mode.
        assert_eq!(rd(&mut l, APIC_ID, 0), 0);
        assert_eq!(wr(&mut l, APIC_TASKPRI, 0xf0, 0), Effects::default());
        assert_eq!(l.tpr(), 0);
        let mut x = bsp();
        assert_eq!(x.read_msr(0x802, 0), Err(LapicError::NotX2Apic { msr: 0x802 }));
        assert_eq!(x.write_msr(0x808, 0, 0), Err(LapicError::NotX2Apic { msr: 0x808 }));
        let msg = alloc::format!("{}", LapicError::ReservedBits { msr: 0x808, value: 0x100 });
        assert_eq!(msg, "writing 0x100 to x2APIC MSR 0x808 sets reserved bits");
    }

    #[test]
    fn apic_base_transitions() {
        let mut l = bsp();
        let xapic = DEFAULT_APIC_BASE | BASE_EN | BASE_BSP;
        let x2apic = xapic | BASE_EXTD;
        wr(&mut l, APIC_TASKPRI, 0x20, 0);
        assert_eq!(l.write_apic_base(x2apic), Ok(()), "xAPIC → x2APIC");
        assert_eq!((l.mode(), l.read_apic_base()), (ApicMode::X2Apic, 0xfee0_0d00));
        assert_eq!(l.tpr(), 0x20, "state kept");
        assert_eq!(
            l.write_apic_base(xapic),
            Err(LapicError::IllegalTransition { from: ApicMode::X2Apic, value: xapic }),
            "x2APIC → xAPIC"
        );
        let invalid = DEFAULT_APIC_BASE | BASE_EXTD;
        assert!(matches!(l.write_apic_base(invalid), Err(LapicError::IllegalTransition { .. })), "EN=0 EXTD=1");
        assert_eq!(l.write_apic_base(DEFAULT_APIC_BASE), Ok(()), "x2APIC → disabled");
        assert_eq!(l.mode(), ApicMode::Disabled);
        assert_eq!(l.tpr(), 0, "registers reset");
        assert_eq!(rd(&mut l, APIC_SPIV, 0), 0xffff_ffff, "no APIC on the bus");
        assert!(!l.accept(0x40, false));
        assert!(l.accepts_pic_interrupt() && l.lint1_delivers_nmi(), "LINT0/1 are INTR/NMI");
        assert!(matches!(l.write_apic_base(x2apic), Err(LapicError::IllegalTransition { .. })), "disabled → x2APIC");
        assert_eq!(l.write_apic_base(xapic), Ok(()), "disabled → xAPIC");
        assert_eq!(rd(&mut l, APIC_SPIV, 0), 0xff, "software-disabled after reset");
        assert_eq!(l.write_apic_base(DEFAULT_APIC_BASE | BASE_BSP), Ok(()), "xAPIC → disabled");
        assert_eq!(l.write_apic_base(xapic), Ok(()));
        for bad in [xapic | 1, xapic | (1 << 9), xapic | (1 << 52), xapic | (1 << 63)] {
            assert_eq!(l.write_apic_base(bad), Err(LapicError::BaseReservedBits { value: bad }));
        }
        // Moving the page within a mode; the BSP bit is read-only.
        assert_eq!(l.write_apic_base(0xfed0_0000 | BASE_EN), Ok(()));
        assert_eq!((l.mmio_base(), l.read_apic_base()), (0xfed0_0000, 0xfed0_0900));
        let msg = alloc::format!("{}", LapicError::IllegalTransition { from: ApicMode::X2Apic, value: xapic });
        assert_eq!(msg, "IA32_APIC_BASE value 0xfee00900 is not a legal transition from X2Apic mode");
    }

    fn ipi(l: &mut Lapic, high: u32, low: u32) -> Option<Ipi> {
        wr(l, APIC_ICR2, high, 0);
        wr(l, APIC_ICR, low, 0).ipi
    }

    #[test]
    fn every_ipi_kind_from_the_icr() {
        let mut l = bsp();
        let fixed = ipi(&mut l, 2 << 24, 0x0000_40f0).unwrap();
        assert_eq!(
            fixed,
            Ipi {
                destination: Destination::Physical(2),
                mode: DeliveryMode::Fixed,
                vector: 0xf0,
                level: true,
                level_triggered: false,
                x2apic: false,
            }
        );
        assert_eq!(rd(&mut l, APIC_ICR, 0) & (1 << 12), 0, "delivery status stays idle");
        assert_eq!(rd(&mut l, APIC_ICR2, 0), 2 << 24);
        let lowest = ipi(&mut l, 0x0f << 24, 0x0000_0931).unwrap();
        assert_eq!((lowest.mode, lowest.destination), (DeliveryMode::LowestPriority, Destination::Logical(0x0f)));
        assert_eq!(ipi(&mut l, 1 << 24, 0x0000_0200).unwrap().mode, DeliveryMode::Smi);
        assert_eq!(ipi(&mut l, 1 << 24, 0x0000_0400).unwrap().mode, DeliveryMode::Nmi);
        // Linux's wakeup_secondary_cpu_via_init(): INIT assert (level), INIT de-assert,
        // then two STARTUPs with the trampoline page.
        let init = ipi(&mut l, 1 << 24, 0x0000_c500).unwrap();
        assert_eq!((init.mode, init.level, init.level_triggered), (DeliveryMode::Init, true, true));
        assert_eq!(ipi(&mut l, 1 << 24, 0x0000_8500).unwrap().mode, DeliveryMode::InitDeassert);
        let sipi = ipi(&mut l, 1 << 24, 0x0000_069a).unwrap();
        assert_eq!((sipi.mode, sipi.vector, sipi.destination), (DeliveryMode::StartUp, 0x9a, Destination::Physical(1)));
        // Shorthands.
        assert_eq!(ipi(&mut l, 0, 0x0008_0400).unwrap().destination, Destination::AllIncludingSelf);
        assert_eq!(ipi(&mut l, 0, 0x000c_4500).unwrap().destination, Destination::AllExcludingSelf);
        let nmi_self = ipi(&mut l, 0, 0x0004_0400).unwrap();
        assert_eq!((nmi_self.destination, nmi_self.mode), (Destination::SelfOnly, DeliveryMode::Nmi));
        // A fixed self-IPI is delivered here, not returned.
        assert_eq!(ipi(&mut l, 0, 0x0004_0061), None);
        assert_eq!(l.pending_interrupt(), Some(0x61));
        // Reserved delivery modes send nothing.
        assert_eq!(ipi(&mut l, 1 << 24, 0x0000_0330), None);
        assert_eq!(ipi(&mut l, 1 << 24, 0x0000_0730), None);
    }

    #[test]
    fn ipi_targets_by_destination() {
        let send = |destination, x2apic| Ipi {
            destination,
            mode: DeliveryMode::Fixed,
            vector: 0x40,
            level: true,
            level_triggered: false,
            x2apic,
        };
        let t = |ipi: Ipi, all: &[ApicAddress]| -> heapless::Vec<u32, 8> { ipi_targets(&ipi, 1, all).collect() };
        // Flat model: LDR 1 << cpu, as Linux's flat APIC driver sets it.
        let flat: [ApicAddress; 4] =
            core::array::from_fn(|i| ApicAddress { id: i as u32, ldr: (1 << i) << 24, flat: true });
        assert_eq!(t(send(Destination::Physical(2), false), &flat), [2]);
        assert_eq!(t(send(Destination::Physical(9), false), &flat), []);
        assert_eq!(t(send(Destination::Physical(0xff), false), &flat), [0, 1, 2, 3]);
        assert_eq!(t(send(Destination::Logical(0b1010), false), &flat), [1, 3]);
        assert_eq!(t(send(Destination::Logical(0xff), false), &flat), [0, 1, 2, 3]);
        assert_eq!(t(send(Destination::SelfOnly, false), &flat), [1]);
        assert_eq!(t(send(Destination::AllIncludingSelf, false), &flat), [0, 1, 2, 3]);
        assert_eq!(t(send(Destination::AllExcludingSelf, false), &flat), [0, 2, 3]);
        // Cluster model: cluster in 7:4, member bit in 3:0.
        let cluster: [ApicAddress; 4] = core::array::from_fn(|i| ApicAddress {
            id: i as u32,
            ldr: ((((i / 2) as u32) << 4) | (1 << (i % 2))) << 24,
            flat: false,
        });
        assert_eq!(t(send(Destination::Logical(0x13), false), &cluster), [2, 3]);
        assert_eq!(t(send(Destination::Logical(0x02), false), &cluster), [1]);
        // x2APIC: derived LDRs, 32-bit physical IDs and broadcast.
        let ids = [0u32, 1, 16, 17, 300];
        let x2s: heapless::Vec<ApicAddress, 8> =
            ids.iter().map(|&id| ApicAddress { id, ldr: x2apic_ldr(id), flat: false }).collect();
        assert_eq!(t(send(Destination::Logical(0x0001_0003), true), &x2s), [16, 17]);
        assert_eq!(t(send(Destination::Logical(0x0000_0002), true), &x2s), [1]);
        assert_eq!(t(send(Destination::Physical(300), true), &x2s), [300]);
        assert_eq!(t(send(Destination::Physical(0xff), true), &x2s), [], "0xFF is an ID in x2APIC");
        assert_eq!(t(send(Destination::Physical(u32::MAX), true), &x2s), [0, 1, 16, 17, 300]);
        assert_eq!(t(send(Destination::AllExcludingSelf, true), &x2s), [0, 16, 17, 300]);
        // A LAPIC's own address: DFR and LDR as programmed, or derived in x2APIC mode.
        let mut l = Lapic::new(3, false, TSC_HZ);
        wr(&mut l, APIC_DFR, 0x0fff_ffff, 0);
        wr(&mut l, APIC_LDR, 0x2400_0000, 0);
        assert_eq!(l.address(), ApicAddress { id: 3, ldr: 0x2400_0000, flat: false });
        assert_eq!(x2(17).address(), ApicAddress { id: 17, ldr: 0x0001_0002, flat: false });
    }

    #[test]
    fn init_and_sipi_on_the_receiving_side() {
        let mut ap = Lapic::new(1, false, TSC_HZ);
        assert_eq!(ap.receive_sipi(0x9a), Some(0x9a), "firmware left it waiting");
        assert_eq!(ap.receive_sipi(0x9a), None, "a second SIPI is ignored");
        wr(&mut ap, APIC_SPIV, 0x1ff, 0);
        wr(&mut ap, APIC_TASKPRI, 0x30, 0);
        wr(&mut ap, APIC_TMICT, 100, 0);
        ap.accept(0x40, false);
        assert!(ap.receive_init());
        assert!(ap.waiting_for_sipi());
        assert_eq!(rd(&mut ap, APIC_SPIV, 0), 0xff, "registers as after INIT");
        assert_eq!(rd(&mut ap, APIC_TASKPRI, 0), 0);
        assert_eq!(rd(&mut ap, APIC_LVT0, 0), LVT_MASKED);
        assert_eq!(rd(&mut ap, APIC_IRR + 0x20, 0), 0);
        assert_eq!(ap.next_timer_ns(), None);
        assert_eq!(ap.read_apic_base(), 0xfee0_0800, "base kept");
        assert_eq!(ap.receive_sipi(0x10), Some(0x10));
        // In x2APIC mode INIT keeps the mode.
        let mut x = x2(4);
        x.receive_init();
        assert_eq!(x.mode(), ApicMode::X2Apic);
        assert_eq!(x.read_msr(0x802, 0), Ok(4));
        // The BSP does not wait.
        let mut b = bsp();
        assert!(!b.receive_init());
        assert_eq!(b.receive_sipi(1), None);
    }

    #[test]
    fn save_load_round_trip_mid_countdown() {
        let mut l = Lapic::new(2, false, TSC_HZ);
        l.receive_sipi(0x10);
        wr(&mut l, APIC_TDCR, 0x3, 0);
        wr(&mut l, APIC_LVTT, LOCAL_TIMER_VECTOR, 0);
        wr(&mut l, APIC_TMICT, 62_500, 0); // 1 ms at divide 16
        wr(&mut l, APIC_LDR, 0x0400_0000, 0);
        l.accept(0x41, true);
        l.accept(0x90, false);
        l.ack(0x90);
        l.accept(0x05, false);
        let s = l.save_at(400 * US);
        assert_eq!((s.kind, s.version), (DeviceKind::Lapic, 1));
        // The destination's guest clock is elsewhere; the remaining 600 µs carry over.
        let t = 10_000 * MS;
        let mut m = Lapic::new(2, false, TSC_HZ);
        m.load_at(&s, t).unwrap();
        assert_eq!(m.next_timer_ns(), Some(t + 600 * US));
        assert_eq!(rd(&mut m, APIC_TMCCT, t), rd(&mut l, APIC_TMCCT, 400 * US));
        assert_eq!(rd(&mut m, APIC_TMCCT, t), 37_500);
        assert_eq!(m.save_at(t), s, "every field carried");
        assert_eq!(m.pending_interrupt(), None, "0x90 in service blocks 0x41");
        assert_eq!(wr(&mut m, APIC_EOI, 0, t).eoi_vector, None);
        assert_eq!(m.pending_interrupt(), Some(0x41));
        m.ack(0x41);
        assert_eq!(wr(&mut m, APIC_EOI, 0, t).eoi_vector, Some(0x41), "TMR carried");
        wr(&mut m, APIC_ESR, 0, t);
        assert_eq!(rd(&mut m, APIC_ESR, t), ESR_RECEIVE_ILLEGAL_VECTOR, "pending errors carried");
        m.advance_to(t + 600 * US);
        assert!(irr_has(&mut m, 0xec));
        // x2APIC, TSC-deadline and wait-for-SIPI state.
        let mut x = x2(6);
        x.write_msr(0x832, 0xec | (2 << 17), 0).unwrap();
        x.write_tsc_deadline(2_000_000); // 1 ms
        x.receive_init();
        x.write_msr(0x832, 0xec | (2 << 17), 0).unwrap();
        x.write_msr(0x80f, 0x1ff, 0).unwrap();
        x.write_msr(0x832, 0xec | (2 << 17), 0).unwrap();
        x.write_tsc_deadline(2_000_000);
        let s = x.save_at(250 * US);
        let mut y = Lapic::new(6, false, TSC_HZ);
        y.load_at(&s, 5 * MS).unwrap();
        assert_eq!(y.mode(), ApicMode::X2Apic);
        assert!(y.waiting_for_sipi());
        assert_eq!((y.read_tsc_deadline(), y.next_timer_ns()), (2_000_000, Some(5 * MS + 750 * US)));
        // A deadline already past fires at once.
        let s = x.save_at(2 * MS);
        y.load_at(&s, 5 * MS).unwrap();
        assert_eq!(y.next_timer_ns(), Some(5 * MS));
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let l = bsp();
        let good = l.save_at(0);
        let mut m = bsp();
        wr(&mut m, APIC_TASKPRI, 0x70, 0);
        let before = m.save_at(0);
        let mut short = good.clone();
        short.bytes.pop();
        let mut long = good.clone();
        long.bytes.push(0);
        let mut other_id = good.clone();
        other_id.bytes[0] = 9;
        let mut bad_base = good.clone();
        bad_base.bytes[5..13].copy_from_slice(&(DEFAULT_APIC_BASE | BASE_EXTD).to_le_bytes());
        let mut bad_flags = good.clone();
        bad_flags.bytes[4] = 0x81;
        let mut not_bsp = good.clone();
        not_bsp.bytes[4] = 0;
        let wrong_kind = DeviceState { kind: DeviceKind::IoApic, ..good.clone() };
        let v2 = DeviceState { version: 2, ..good.clone() };
        for s in [short, long, other_id, bad_base, bad_flags, not_bsp, wrong_kind, v2] {
            assert!(m.load_at(&s, 0).is_err());
            assert_eq!(m.save_at(0), before);
        }
        assert_eq!(m.load_at(&good, 0), Ok(()));
        assert_eq!(m.tpr(), 0);
    }

    #[test]
    fn device_trait_is_the_xapic_page_and_saves_at_the_latest_time() {
        let mut l = bsp();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(1000, &mut irq);
        assert_eq!(Device::kind(&l), DeviceKind::Lapic);
        Device::write(&mut l, APIC_TDCR, &0xbu32.to_le_bytes(), &mut ctx);
        Device::write(&mut l, APIC_TMICT, &5000u32.to_le_bytes(), &mut ctx);
        assert_eq!(Device::next_event_ns(&l), Some(6000));
        Device::write(&mut l, APIC_ICR2, &(1u32 << 24).to_le_bytes(), &mut ctx);
        Device::write(&mut l, APIC_ICR, &0x0000_0440u32.to_le_bytes(), &mut ctx);
        let fx = l.take_effects();
        assert_eq!(fx.ipi.map(|i| (i.mode, i.destination)), Some((DeliveryMode::Nmi, Destination::Physical(1))));
        assert_eq!(l.take_effects(), Effects::default(), "taken once");
        let mut d = [0u8; 4];
        ctx.now_ns = 3000;
        Device::read(&mut l, APIC_TMCCT, &mut d, &mut ctx);
        assert_eq!(u32::from_le_bytes(d), 3000);
        let s = Device::save(&l);
        Device::load(&mut l, &s).unwrap();
        assert_eq!(Device::next_event_ns(&l), Some(6000), "saved and loaded at the last time seen");
        ctx.now_ns = 6000;
        Device::advance(&mut l, &mut ctx);
        assert_eq!(Device::next_event_ns(&l), None);
    }

    /// A deterministic xorshift64 (no proptest in hv).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_accesses_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut lapics = [Lapic::new(0, true, TSC_HZ), Lapic::new(1, false, 0), x2(0x123)];
        let mut now = 0u64;
        let interesting = [0u64, 1, 0xff, 0x100, 0x700, 0x1_0000, 0x2_0000, 0x4_0000, 0x6_00ec, u32::MAX as u64];
        for _ in 0..100_000 {
            let i = rng.below(lapics.len() as u64) as usize;
            let l = &mut lapics[i];
            let value = if rng.below(2) == 0 { interesting[rng.below(10) as usize] } else { rng.next() };
            match rng.below(16) {
                0..=2 => {
                    let off = if rng.below(4) == 0 { rng.below(0x1010) } else { rng.below(0x40) * 0x10 };
                    let mut d = [0u8; 8];
                    let len = [1usize, 2, 4, 8, 3][rng.below(5) as usize];
                    l.read_mmio(off, &mut d[..len], now);
                }
                3..=5 => {
                    let off = if rng.below(4) == 0 { rng.below(0x1010) } else { rng.below(0x40) * 0x10 };
                    let len = [1usize, 2, 4, 8][rng.below(4) as usize];
                    let _ = l.write_mmio(off, &value.to_le_bytes()[..len], now);
                }
                6 => {
                    let _ = l.read_msr(0x7f0 + rng.below(0x120) as u32, now);
                }
                7 => {
                    let _ = l.write_msr(0x7f0 + rng.below(0x120) as u32, value, now);
                }
                8 => {
                    let base = [0xfee0_0000u64, 0xfee0_0800, 0xfee0_0c00, 0xfee0_0400, value][rng.below(5) as usize];
                    let _ = l.write_apic_base(base);
                }
                9 => l.write_tsc_deadline(if rng.below(2) == 0 { value } else { now * 2 + rng.below(10_000) }),
                10 => {
                    l.accept(value as u8, rng.below(2) == 0);
                }
                11 => {
                    if let Some(v) = l.pending_interrupt() {
                        assert!(u32::from(v) & 0xf0 > l.ppr() & 0xf0);
                        l.ack(v);
                    }
                }
                12 => {
                    now = now.saturating_add(rng.below(2_000_000));
                    l.advance_to(now);
                    assert!(l.next_timer_ns().is_none_or(|t| t > now), "advance leaves nothing due");
                }
                13 => {
                    if rng.below(2) == 0 {
                        l.receive_init();
                    } else {
                        l.receive_sipi(value as u8);
                    }
                }
                14 => {
                    let s = l.save_at(now);
                    let mut copy = l.clone();
                    assert_eq!(copy.load_at(&s, now), Ok(()));
                    assert_eq!(copy.save_at(now), s);
                    // A corrupted copy loads or is refused, never panics.
                    let mut bad = s.clone();
                    if let Some(b) = bad.bytes.get_mut(rng.below(s.bytes.len() as u64) as usize) {
                        *b ^= 1 << rng.below(8);
                    }
                    let _ = copy.load_at(&bad, now);
                }
                _ => {
                    let ipi = Ipi {
                        destination: [
                            Destination::Physical(value as u32),
                            Destination::Logical(value as u32),
                            Destination::SelfOnly,
                            Destination::AllIncludingSelf,
                            Destination::AllExcludingSelf,
                        ][rng.below(5) as usize],
                        mode: DeliveryMode::Fixed,
                        vector: 0x40,
                        level: true,
                        level_triggered: false,
                        x2apic: rng.below(2) == 0,
                    };
                    let all = [lapics[0].address(), lapics[1].address(), lapics[2].address()];
                    assert!(ipi_targets(&ipi, 1, &all).count() <= 3);
                }
            }
        }
        // Extreme times do not overflow.
        for l in &mut lapics {
            l.advance_to(u64::MAX);
            let mut d = [0u8; 4];
            l.read_mmio(APIC_TMCCT, &mut d, u64::MAX);
            let _ = l.save_at(u64::MAX);
        }
    }
}
