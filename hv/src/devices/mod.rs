//! Guest device models: the small PC a guest finds (like QEMU's `microvm`): UART,
//! debug-exit port, 8259 pair, 8254 PIT, CMOS RTC, ACPI PM timer, I/O APIC and a
//! local APIC per vCPU.
//!
//! Every model here is pure logic. It never touches hardware, never logs, never
//! allocates after it is built, and never panics, whatever the guest writes: the
//! models are host-tested and fuzzed from the guest's side (`bus`). What a model
//! needs from outside comes in a [`DeviceCtx`]: the guest's clock and the interrupt
//! lines. What it produces goes out the same way (lines raised or lowered), or as an
//! effect it returns (a byte for the console, a request to end the domain).
//!
//! Time: models keep deadlines in guest nanoseconds and compute their registers from
//! `ctx.now_ns` when read, rather than counting ticks. The scheduler asks each model
//! for its [`Device::next_event_ns`] and calls [`Device::advance`] once that time has
//! come, so an idle guest costs nothing and a halted vCPU can sleep until then.
//!
//! State: each model saves itself as a [`DeviceState`] (its kind, a format version and
//! its bytes) and loads it back; migration carries these after the vCPU state, and a
//! destination that cannot load one refuses before anything runs.

pub mod bus;
pub mod debug_exit;
pub mod ioapic;
pub mod irq;
pub mod kvmclock;
pub mod lapic;
pub mod pc;
pub mod pic;
pub mod pit;
pub mod pm;
pub mod rtc;
pub mod serial;

use alloc::vec::Vec;
use core::fmt;

/// The interrupt lines a device drives: global system interrupts (GSIs) as the
/// I/O APIC numbers them (ISA IRQ n is GSI n, except IRQ 0, which the MADT routes to
/// GSI 2 like every PC). `devices/irq.rs` routes them to the 8259s, the I/O APIC and
/// the local APICs.
pub trait IrqLines {
    /// Drive line `gsi` high (`true`) or low.
    fn set_level(&mut self, gsi: u32, high: bool);
    /// An edge: high, then low.
    fn pulse(&mut self, gsi: u32) {
        self.set_level(gsi, true);
        self.set_level(gsi, false);
    }
}

/// Lines that go nowhere (tests, and devices probed before routing exists).
#[derive(Debug, Default)]
pub struct NoIrqs;

impl IrqLines for NoIrqs {
    fn set_level(&mut self, _gsi: u32, _high: bool) {}
}

/// Something a device asks of the hypervisor that is not an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A byte the guest wrote to its console (UART transmit).
    Console(u8),
    /// End the domain with this exit code (debug-exit port: `(v << 1) | 1`).
    Exit(u32),
    /// The guest asked for ACPI S5 (soft off): the domain is finished.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, 8042 pulse, port 0xCF9).
    Reset,
}

/// The most effects one access can produce before the exit handler drains them (a
/// UART with its FIFO drained at once produces at most 16 bytes; a write produces one).
pub const MAX_EFFECTS: usize = 32;

/// What a device sees of the world during one access or event.
pub struct DeviceCtx<'a> {
    /// The guest's clock now, in nanoseconds since the domain started.
    pub now_ns: u64,
    /// The interrupt lines.
    pub irq: &'a mut dyn IrqLines,
    /// Effects produced so far (bounded; a full queue drops the newest and counts it).
    pub effects: heapless::Vec<Effect, MAX_EFFECTS>,
    /// Effects dropped because the queue was full.
    pub dropped_effects: u32,
}

impl fmt::Debug for DeviceCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCtx").field("now_ns", &self.now_ns).field("effects", &self.effects).finish()
    }
}

impl<'a> DeviceCtx<'a> {
    /// A context at `now_ns` driving `irq`.
    pub fn new(now_ns: u64, irq: &'a mut dyn IrqLines) -> Self {
        Self { now_ns, irq, effects: heapless::Vec::new(), dropped_effects: 0 }
    }

    /// Queue an effect for the exit handler.
    pub fn effect(&mut self, e: Effect) {
        if self.effects.push(e).is_err() {
            self.dropped_effects = self.dropped_effects.saturating_add(1);
        }
    }
}

/// Which model a saved state belongs to (the first field of its record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum DeviceKind {
    /// 16550A UART.
    Uart = 1,
    /// isa-debug-exit port.
    DebugExit = 2,
    /// The 8259 pair.
    Pic = 3,
    /// 8254 PIT with port 0x61.
    Pit = 4,
    /// CMOS RTC.
    Rtc = 5,
    /// ACPI PM timer and PM1 registers.
    AcpiPm = 6,
    /// I/O APIC.
    IoApic = 7,
    /// A local APIC.
    Lapic = 8,
}

impl DeviceKind {
    /// The kind with this code (the `repr(u16)` value), if this build has it.
    pub const fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Uart,
            2 => Self::DebugExit,
            3 => Self::Pic,
            4 => Self::Pit,
            5 => Self::Rtc,
            6 => Self::AcpiPm,
            7 => Self::IoApic,
            8 => Self::Lapic,
            _ => return None,
        })
    }
}

/// A device's saved state: its kind, the format version of `bytes`, and the bytes
/// (little-endian fields in an order the model documents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Whose state.
    pub kind: DeviceKind,
    /// Format version of `bytes` (each model starts at 1).
    pub version: u16,
    /// The state.
    pub bytes: Vec<u8>,
}

/// Why a state could not be loaded (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// The state is another model's.
    WrongKind {
        /// This model.
        expected: DeviceKind,
        /// The state's.
        found: DeviceKind,
    },
    /// A format version this build cannot read.
    UnsupportedVersion {
        /// The model.
        kind: DeviceKind,
        /// The state's version.
        found: u16,
    },
    /// The bytes do not decode as that version's layout.
    Malformed {
        /// The model.
        kind: DeviceKind,
        /// What is wrong.
        why: &'static str,
    },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongKind { expected, found } => write!(f, "a {found:?} state cannot load into the {expected:?}"),
            Self::UnsupportedVersion { kind, found } => {
                write!(f, "{kind:?} state version {found} is not supported by this hypervisor")
            }
            Self::Malformed { kind, why } => write!(f, "{kind:?} state is malformed: {why}"),
        }
    }
}

/// A guest device model on the port-I/O or MMIO bus.
///
/// `offset` is relative to the start of the range the device was mapped at; `data` is
/// 1, 2, 4 or 8 bytes, little-endian. A model answers every offset and size without
/// panicking: an access it does not implement reads as all ones and writes are
/// dropped, as on a PC.
pub trait Device {
    /// Which model this is.
    fn kind(&self) -> DeviceKind;
    /// Read `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>);
    /// Write `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>);
    /// When this model next needs [`Device::advance`] (guest ns), if ever.
    fn next_event_ns(&self) -> Option<u64> {
        None
    }
    /// Catch up to `ctx.now_ns`: fire timers that are due.
    fn advance(&mut self, _ctx: &mut DeviceCtx<'_>) {}
    /// Console input from the control channel, for a model that has a receiver on the
    /// console line (the UART): the bytes it took, from the start, without overrunning
    /// it. `None`: this model takes no console input.
    fn console_input(&mut self, _bytes: &[u8], _ctx: &mut DeviceCtx<'_>) -> Option<usize> {
        None
    }
    /// The model's state.
    fn save(&self) -> DeviceState;
    /// Replace the model's state with `state`; on error nothing changed.
    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError>;
    /// The model's state at guest time `now_ns`, its timers as time left after it
    /// (migration: the destination loads it with [`Device::load_at`] at its own guest
    /// time). A model without timers, or whose deadlines are absolute guest times
    /// (which a migration carries over, since the guest clock continues), saves as
    /// [`Device::save`] does.
    fn save_at(&self, _now_ns: u64) -> DeviceState {
        self.save()
    }
    /// Load a state saved by [`Device::save_at`], its timers re-based on `now_ns`.
    fn load_at(&mut self, state: &DeviceState, _now_ns: u64) -> Result<(), DeviceError> {
        self.load(state)
    }
}

/// Little-endian value of `data` (at most 8 bytes), for register writes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

/// Fill `data` with the low bytes of `value`, little-endian, for register reads.
pub fn put_le(data: &mut [u8], value: u64) {
    for (d, s) in data.iter_mut().zip(value.to_le_bytes()) {
        *d = s;
    }
}

/// A cursor over a saved state's bytes for `load`: every read is checked, so a short
/// or long state is [`DeviceError::Malformed`], never a panic.
#[derive(Debug)]
pub struct StateReader<'a> {
    kind: DeviceKind,
    bytes: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// Check kind and version (`1..=max_version`) and read `state`'s bytes.
    pub fn new(state: &'a DeviceState, kind: DeviceKind, max_version: u16) -> Result<Self, DeviceError> {
        if state.kind != kind {
            return Err(DeviceError::WrongKind { expected: kind, found: state.kind });
        }
        if state.version == 0 || state.version > max_version {
            return Err(DeviceError::UnsupportedVersion { kind, found: state.version });
        }
        Ok(Self { kind, bytes: &state.bytes })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DeviceError> {
        if self.bytes.len() < n {
            return Err(DeviceError::Malformed { kind: self.kind, why: "too short" });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8, DeviceError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    /// The next little-endian u16.
    pub fn u16(&mut self) -> Result<u16, DeviceError> {
        Ok(le_value(self.take(2)?) as u16)
    }
    /// The next little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DeviceError> {
        Ok(le_value(self.take(4)?) as u32)
    }
    /// The next little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DeviceError> {
        Ok(le_value(self.take(8)?))
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DeviceError> {
        self.take(n)
    }
    /// Every byte was read (else the state is too long).
    pub fn finish(self) -> Result<(), DeviceError> {
        if self.bytes.is_empty() { Ok(()) } else { Err(DeviceError::Malformed { kind: self.kind, why: "too long" }) }
    }
}

/// Builds a state's bytes, little-endian, for `save`.
#[derive(Debug, Default)]
pub struct StateWriter {
    bytes: Vec<u8>,
}

impl StateWriter {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(v);
        self
    }
    /// The finished state.
    pub fn finish(self, kind: DeviceKind, version: u16) -> DeviceState {
        DeviceState { kind, version, bytes: self.bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_helpers_round_trip_every_width() {
        let mut b = [0u8; 4];
        put_le(&mut b, 0x1122_3344_5566);
        assert_eq!(b, [0x66, 0x55, 0x44, 0x33]);
        assert_eq!(le_value(&b), 0x3344_5566);
        assert_eq!(le_value(&[0xff; 9]), u64::MAX, "more than 8 bytes: the first 8");
    }

    #[test]
    fn state_reader_refuses_wrong_kind_version_and_length() {
        let mut w = StateWriter::new();
        w.u8(1).u16(2).u32(3).u64(4);
        let s = w.finish(DeviceKind::Pit, 1);
        let mut r = StateReader::new(&s, DeviceKind::Pit, 1).unwrap();
        assert_eq!((r.u8(), r.u16(), r.u32(), r.u64()), (Ok(1), Ok(2), Ok(3), Ok(4)));
        assert_eq!(r.finish(), Ok(()));
        assert!(matches!(StateReader::new(&s, DeviceKind::Rtc, 1), Err(DeviceError::WrongKind { .. })));
        let v2 = DeviceState { version: 2, ..s.clone() };
        assert!(matches!(StateReader::new(&v2, DeviceKind::Pit, 1), Err(DeviceError::UnsupportedVersion { .. })));
        let mut r = StateReader::new(&s, DeviceKind::Pit, 1).unwrap();
        assert!(r.bytes(16).is_err(), "short");
        let r = StateReader::new(&s, DeviceKind::Pit, 1).unwrap();
        assert!(r.finish().is_err(), "long");
    }
}
