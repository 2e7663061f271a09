//! The device bus: guest port-I/O and MMIO address ranges mapped to device models.
//!
//! An exit for port I/O or for MMIO outside RAM comes here with the address, size and
//! data; the bus finds the device whose range holds the address and calls it with the
//! offset into that range. An address nothing claims behaves as on a PC (reads all
//! ones, writes dropped) and is counted per port or per 4 KiB MMIO page, so
//! `hvctl domain stats` can show what a guest probed. Nothing here allocates once the
//! devices are mapped: a guest controls the rate of these accesses.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use super::{Device, DeviceCtx, DeviceError, DeviceState};

/// Unclaimed addresses counted one by one; beyond this many, they add to `other`.
pub const UNCLAIMED_SLOTS: usize = 32;

/// A device's index on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

/// Which address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Port I/O (16-bit port numbers).
    Port,
    /// Guest-physical MMIO.
    Mmio,
}

/// Why a device could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    EmptyRange {
        /// Which space.
        space: Space,
        /// Its start.
        start: u64,
    },
    /// The range overlaps one already mapped.
    Overlap {
        /// Which space.
        space: Space,
        /// The new range's start.
        start: u64,
        /// The start of the range it overlaps.
        existing: u64,
    },
    /// No device with that id.
    NoDevice(DeviceId),
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyRange { space, start } => write!(f, "{space:?} range at {start:#x} is empty or wraps"),
            Self::Overlap { space, start, existing } => {
                write!(f, "{space:?} range at {start:#x} overlaps the one mapped at {existing:#x}")
            }
            Self::NoDevice(id) => write!(f, "no device {}", id.0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    start: u64,
    len: u64,
    device: DeviceId,
    /// The device offset of `start` (0 unless mapped with [`DeviceBus::map_ports_at`]).
    first_offset: u64,
}

/// Address ranges of one space, sorted by start, never overlapping.
#[derive(Debug, Default)]
struct Ranges {
    maps: Vec<Mapping>,
}

impl Ranges {
    fn insert(
        &mut self,
        space: Space,
        start: u64,
        len: u64,
        device: DeviceId,
        first_offset: u64,
    ) -> Result<(), BusError> {
        let end = start.checked_add(len).filter(|_| len > 0).ok_or(BusError::EmptyRange { space, start })?;
        first_offset.checked_add(len).ok_or(BusError::EmptyRange { space, start })?;
        let at = self.maps.partition_point(|m| m.start < start);
        let clash = |m: &Mapping| start < m.start.saturating_add(m.len) && m.start < end;
        if let Some(m) = at.checked_sub(1).and_then(|i| self.maps.get(i)).filter(|m| clash(m)) {
            return Err(BusError::Overlap { space, start, existing: m.start });
        }
        if let Some(m) = self.maps.get(at).filter(|m| clash(m)) {
            return Err(BusError::Overlap { space, start, existing: m.start });
        }
        self.maps.insert(at, Mapping { start, len, device, first_offset });
        Ok(())
    }

    /// The device and offset for `addr`.
    fn find(&self, addr: u64) -> Option<(DeviceId, u64)> {
        let at = self.maps.partition_point(|m| m.start <= addr);
        let m = self.maps.get(at.checked_sub(1)?)?;
        let offset = addr - m.start;
        (offset < m.len).then_some((m.device, m.first_offset.wrapping_add(offset)))
    }
}

/// Accesses to one unclaimed port or MMIO page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unclaimed {
    /// Which space.
    pub space: Space,
    /// The port, or the MMIO page's first address.
    pub addr: u64,
    /// Reads of it.
    pub reads: u64,
    /// Writes to it.
    pub writes: u64,
}

/// Counters of unclaimed accesses: the first [`UNCLAIMED_SLOTS`] addresses one by one,
/// the rest together.
#[derive(Debug, Default)]
pub struct UnclaimedStats {
    slots: heapless::Vec<Unclaimed, UNCLAIMED_SLOTS>,
    /// Accesses to addresses beyond the slots.
    pub other: u64,
}

impl UnclaimedStats {
    fn count(&mut self, space: Space, addr: u64, write: bool) {
        let addr = if space == Space::Mmio { addr & !0xfff } else { addr };
        let slot = match self.slots.iter_mut().find(|u| u.space == space && u.addr == addr) {
            Some(s) => s,
            None => {
                if self.slots.push(Unclaimed { space, addr, reads: 0, writes: 0 }).is_err() {
                    self.other = self.other.saturating_add(1);
                    return;
                }
                match self.slots.last_mut() {
                    Some(s) => s,
                    None => return,
                }
            }
        };
        if write {
            slot.writes = slot.writes.saturating_add(1);
        } else {
            slot.reads = slot.reads.saturating_add(1);
        }
    }

    /// The counted addresses, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = &Unclaimed> {
        self.slots.iter()
    }
}

/// The devices of one domain and the address ranges they answer.
#[derive(Default)]
pub struct DeviceBus {
    devices: Vec<Box<dyn Device + Send>>,
    ports: Ranges,
    mmio: Ranges,
    unclaimed: UnclaimedStats,
}

impl fmt::Debug for DeviceBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBus")
            .field("devices", &self.devices.iter().map(|d| d.kind()).collect::<Vec<_>>())
            .field("ports", &self.ports.maps)
            .field("mmio", &self.mmio.maps)
            .finish()
    }
}

impl DeviceBus {
    /// No devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a device (unmapped); its id.
    pub fn add(&mut self, device: Box<dyn Device + Send>) -> DeviceId {
        self.devices.push(device);
        DeviceId(self.devices.len() - 1)
    }

    /// Let device `id` answer ports `start..start + len`.
    pub fn map_ports(&mut self, id: DeviceId, start: u16, len: u16) -> Result<(), BusError> {
        self.check(id)?;
        self.ports.insert(Space::Port, u64::from(start), u64::from(len), id, 0)
    }

    /// Let device `id` answer ports `start..start + len` as its offsets
    /// `first_offset..first_offset + len`, so one model can answer ports that are not
    /// contiguous and still tell them apart (the 8254 at 0x40..=0x43 and port 0x61, the
    /// ACPI block and the 0x64/0xCF9 reset ports). [`DeviceBus::map_ports`] is this with
    /// `first_offset` 0.
    pub fn map_ports_at(&mut self, id: DeviceId, start: u16, len: u16, first_offset: u64) -> Result<(), BusError> {
        self.check(id)?;
        self.ports.insert(Space::Port, u64::from(start), u64::from(len), id, first_offset)
    }

    /// Let device `id` answer guest-physical `start..start + len`.
    pub fn map_mmio(&mut self, id: DeviceId, start: u64, len: u64) -> Result<(), BusError> {
        self.check(id)?;
        self.mmio.insert(Space::Mmio, start, len, id, 0)
    }

    fn check(&self, id: DeviceId) -> Result<(), BusError> {
        if id.0 < self.devices.len() { Ok(()) } else { Err(BusError::NoDevice(id)) }
    }

    /// The device `id`.
    pub fn device_mut(&mut self, id: DeviceId) -> Option<&mut (dyn Device + Send + 'static)> {
        self.devices.get_mut(id.0).map(|d| &mut **d)
    }

    /// Console input for the first device that takes it (the UART): how many bytes it
    /// took, `None` when no device on the bus has a console receiver.
    pub fn console_input(&mut self, bytes: &[u8], ctx: &mut DeviceCtx<'_>) -> Option<usize> {
        self.devices.iter_mut().find_map(|d| d.console_input(bytes, ctx))
    }

    fn ranges(&self, space: Space) -> &Ranges {
        match space {
            Space::Port => &self.ports,
            Space::Mmio => &self.mmio,
        }
    }

    /// A guest read of `data.len()` bytes at `addr`; returns whether a device claimed
    /// it (if not, `data` is all ones and the access was counted).
    pub fn read(&mut self, space: Space, addr: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) -> bool {
        let found = self.ranges(space).find(addr);
        match found.and_then(|(id, off)| self.devices.get_mut(id.0).map(|d| (d, off))) {
            Some((device, offset)) => {
                device.read(offset, data, ctx);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.count(space, addr, false);
                false
            }
        }
    }

    /// A guest write of `data` at `addr`; returns whether a device claimed it (if not,
    /// it was dropped and counted).
    pub fn write(&mut self, space: Space, addr: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) -> bool {
        let found = self.ranges(space).find(addr);
        match found.and_then(|(id, off)| self.devices.get_mut(id.0).map(|d| (d, off))) {
            Some((device, offset)) => {
                device.write(offset, data, ctx);
                true
            }
            None => {
                self.unclaimed.count(space, addr, true);
                false
            }
        }
    }

    /// The earliest time any device needs [`DeviceBus::advance`].
    pub fn next_event_ns(&self) -> Option<u64> {
        self.devices.iter().filter_map(|d| d.next_event_ns()).min()
    }

    /// Let every device whose event is due catch up to `ctx.now_ns`.
    pub fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        for d in &mut self.devices {
            if d.next_event_ns().is_some_and(|t| t <= ctx.now_ns) {
                d.advance(ctx);
            }
        }
    }

    /// Every device's state, in the order the devices were added.
    pub fn save(&self) -> Vec<DeviceState> {
        self.devices.iter().map(|d| d.save()).collect()
    }

    /// Load one state per device, in order. All or nothing: if one fails, the states
    /// saved before the attempt are put back and the error says which failed.
    pub fn load(&mut self, states: &[DeviceState]) -> Result<(), DeviceError> {
        if states.len() != self.devices.len() {
            let kind = self.devices.first().map_or(super::DeviceKind::Uart, |d| d.kind());
            return Err(DeviceError::Malformed { kind, why: "the number of device states differs from the devices" });
        }
        let before = self.save();
        for (i, (d, s)) in self.devices.iter_mut().zip(states).enumerate() {
            if let Err(e) = d.load(s) {
                for (d, s) in self.devices.iter_mut().zip(&before).take(i) {
                    // Their own states, just saved: loading them back cannot fail.
                    let _ = d.load(s);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Every device's state at guest time `now_ns` ([`Device::save_at`]), in the order
    /// the devices were added.
    pub fn save_at(&self, now_ns: u64) -> Vec<DeviceState> {
        self.devices.iter().map(|d| d.save_at(now_ns)).collect()
    }

    /// The kind of every device, in the order they were added (what [`Self::load_at`]
    /// expects its states in).
    pub fn kinds(&self) -> Vec<super::DeviceKind> {
        self.devices.iter().map(|d| d.kind()).collect()
    }

    /// Load one state per device, in order, saved by [`Self::save_at`], their timers
    /// re-based on `now_ns`. All or nothing, as [`Self::load`].
    pub fn load_at(&mut self, states: &[DeviceState], now_ns: u64) -> Result<(), DeviceError> {
        if states.len() != self.devices.len() {
            let kind = self.devices.first().map_or(super::DeviceKind::Uart, |d| d.kind());
            return Err(DeviceError::Malformed { kind, why: "the number of device states differs from the devices" });
        }
        let before = self.save_at(now_ns);
        for (i, (d, s)) in self.devices.iter_mut().zip(states).enumerate() {
            if let Err(e) = d.load_at(s, now_ns) {
                for (d, s) in self.devices.iter_mut().zip(&before).take(i) {
                    // Their own states, just saved at the same time: loading them back cannot fail.
                    let _ = d.load_at(s, now_ns);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// What the guest accessed that no device claims.
    pub fn unclaimed(&self) -> &UnclaimedStats {
        &self.unclaimed
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DeviceKind, NoIrqs, StateReader, StateWriter, le_value, put_le};
    use super::*;

    /// A register file of 4 bytes that counts its accesses.
    struct Regs {
        value: u32,
        reads: u32,
    }

    impl Device for Regs {
        fn kind(&self) -> DeviceKind {
            DeviceKind::DebugExit
        }
        fn read(&mut self, offset: u64, data: &mut [u8], _: &mut DeviceCtx<'_>) {
            self.reads += 1;
            put_le(data, u64::from(self.value) >> (8 * offset.min(7)));
        }
        fn write(&mut self, _offset: u64, data: &[u8], _: &mut DeviceCtx<'_>) {
            self.value = le_value(data) as u32;
        }
        fn save(&self) -> DeviceState {
            let mut w = StateWriter::new();
            w.u32(self.value);
            w.finish(DeviceKind::DebugExit, 1)
        }
        fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
            let mut r = StateReader::new(state, DeviceKind::DebugExit, 1)?;
            let v = r.u32()?;
            r.finish()?;
            self.value = v;
            Ok(())
        }
    }

    fn regs() -> Box<dyn Device + Send> {
        Box::new(Regs { value: 0, reads: 0 })
    }

    #[test]
    fn accesses_reach_the_device_with_offsets_and_the_rest_reads_ones() {
        let mut bus = DeviceBus::new();
        let a = bus.add(regs());
        let b = bus.add(regs());
        bus.map_ports(a, 0x3f8, 8).unwrap();
        bus.map_mmio(b, 0xfec0_0000, 0x1000).unwrap();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        assert!(bus.write(Space::Port, 0x3f8, &[0x34, 0x12], &mut ctx));
        let mut d = [0u8; 1];
        assert!(bus.read(Space::Port, 0x3f9, &mut d, &mut ctx));
        assert_eq!(d, [0x12], "offset 1 of the device");
        assert!(!bus.read(Space::Port, 0x3f0, &mut d, &mut ctx));
        assert_eq!(d, [0xff]);
        assert!(!bus.write(Space::Mmio, 0xfec0_1000, &[1], &mut ctx), "one past the range");
        assert!(!bus.write(Space::Mmio, 0xfec0_1004, &[1], &mut ctx));
        let mut w = [0u8; 4];
        assert!(bus.read(Space::Mmio, 0xfec0_0000, &mut w, &mut ctx));
        let u: Vec<_> = bus.unclaimed().iter().copied().collect();
        assert_eq!(
            u,
            [
                Unclaimed { space: Space::Port, addr: 0x3f0, reads: 1, writes: 0 },
                Unclaimed { space: Space::Mmio, addr: 0xfec0_1000, reads: 0, writes: 2 },
            ]
        );
    }

    #[test]
    fn a_mapping_at_an_offset_reaches_the_device_at_that_offset() {
        let mut bus = DeviceBus::new();
        let a = bus.add(regs());
        bus.map_ports(a, 0x40, 4).unwrap();
        bus.map_ports_at(a, 0x61, 1, 2).unwrap();
        assert!(matches!(bus.map_ports_at(a, 0x70, 2, u64::MAX), Err(BusError::EmptyRange { .. })));
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        bus.write(Space::Port, 0x40, &[0x11, 0x22, 0x33, 0x44], &mut ctx);
        let mut d = [0u8; 1];
        assert!(bus.read(Space::Port, 0x61, &mut d, &mut ctx));
        assert_eq!(d, [0x33], "port 0x61 is the device's offset 2");
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = DeviceBus::new();
        let a = bus.add(regs());
        bus.map_ports(a, 0x40, 4).unwrap();
        assert!(matches!(bus.map_ports(a, 0x43, 2), Err(BusError::Overlap { existing: 0x40, .. })));
        assert!(matches!(bus.map_ports(a, 0x3e, 3), Err(BusError::Overlap { existing: 0x40, .. })));
        bus.map_ports(a, 0x44, 1).unwrap();
        bus.map_ports(a, 0x3f, 1).unwrap();
        assert!(matches!(bus.map_ports(a, 0x10, 0), Err(BusError::EmptyRange { .. })));
        assert!(matches!(bus.map_mmio(a, u64::MAX, 2), Err(BusError::EmptyRange { .. })));
        assert!(matches!(bus.map_ports(DeviceId(9), 0x80, 1), Err(BusError::NoDevice(_))));
    }

    #[test]
    fn unclaimed_counters_are_bounded() {
        let mut bus = DeviceBus::new();
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        for port in 0..(UNCLAIMED_SLOTS as u64 + 10) {
            bus.write(Space::Port, port, &[0], &mut ctx);
        }
        assert_eq!(bus.unclaimed().iter().count(), UNCLAIMED_SLOTS);
        assert_eq!(bus.unclaimed().other, 10);
    }

    #[test]
    fn state_loads_all_or_nothing() {
        let mut bus = DeviceBus::new();
        let a = bus.add(regs());
        let _b = bus.add(regs());
        let mut irq = NoIrqs;
        let mut ctx = DeviceCtx::new(0, &mut irq);
        bus.map_ports(a, 0x80, 1).unwrap();
        bus.write(Space::Port, 0x80, &[7, 0, 0, 0], &mut ctx);
        let saved = bus.save();
        let mut bad = saved.clone();
        bad[0] = DeviceState { kind: DeviceKind::DebugExit, version: 1, bytes: alloc::vec![9, 0, 0, 0] };
        bad[1].version = 5;
        assert!(matches!(bus.load(&bad), Err(DeviceError::UnsupportedVersion { found: 5, .. })));
        assert_eq!(bus.save(), saved, "the first device was put back");
        assert!(bus.load(&saved[..1]).is_err(), "one state for two devices");
        assert_eq!(bus.load(&saved), Ok(()));
    }
}
