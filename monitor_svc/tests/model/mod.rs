//! A hardware model of RDT/PQoS monitoring, for host tests only.
//!
//! [`FakeRdt`] is a multi-socket CPU as far as the three monitoring MSRs go, reached
//! through [`MsrAccess`] exactly as the core will reach the real ones. It follows the
//! SDM (Vol. 3B 18.18.6-18.18.7) where the tests depend on it:
//!
//! - Each socket (L3 monitoring domain) has its own IA32_QM_EVTSEL and, per RMID, an
//!   L3 occupancy count and two MBM counters (total, local), in hardware units. The
//!   tests set occupancy directly ([`FakeRdt::set_occupancy`]) and add traffic
//!   ([`FakeRdt::add_traffic`]); the model keeps the true, unbounded MBM totals and
//!   reports them modulo 2^width, as a `width`-bit counter that wraps.
//! - Writing IA32_QM_EVTSEL with bits 31:8 set, or RMID bits above the implemented
//!   RMID field, faults (#GP), as a reserved-bit write does. An RMID above the highest
//!   RMID or an event ID other than 1-3 is accepted, and IA32_QM_CTR then reports the
//!   Error bit (63).
//! - Reading IA32_QM_CTR returns bit 63 (Error) or bit 62 (Unavailable) for an
//!   (socket, RMID) the test injected that fault into, else the data in bits 61:0.
//! - IA32_PQR_ASSOC writes are recorded per socket (last value).
//! - Any other MSR is refused with [`PlatformError::NotAllowed`], as the core refuses
//!   it; a socket out of range gives [`PlatformError::NoSuchSocket`].
//! - Every access is logged ([`FakeRdt::accesses`]) so that tests can assert what was
//!   (and was not) touched.
//!
//! [`FakeRdt::cpuid`] answers CPUID for a matching Intel-style server: leaf 0 (max leaf
//! 0x20), leaf 7 with PQM, leaf 0xF sub-leaves 0 and 1, and leaf 4 with one L3.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use monitor_svc::platform::{
    IA32_PQR_ASSOC, IA32_QM_CTR, IA32_QM_EVTSEL, MsrAccess, PlatformError, QM_CTR_ERROR, QM_CTR_UNAVAILABLE, is_allowed,
};

/// One MSR access: socket, MSR, the value written (`None` for a read).
pub type Access = (u32, u32, Option<u64>);

#[derive(Debug, Default, Clone)]
struct Socket {
    evtsel: u64,
    pqr_assoc: u64,
    occupancy: BTreeMap<u32, u64>,
    total: BTreeMap<u32, u128>,
    local: BTreeMap<u32, u128>,
    error: BTreeSet<u32>,
    unavailable: BTreeSet<u32>,
}

/// The model. See the module docs.
#[derive(Debug, Clone)]
pub struct FakeRdt {
    sockets: Vec<Socket>,
    /// Highest RMID (CPUID.0xF.0:EBX and 0xF.1:ECX).
    pub max_rmid: u32,
    /// Bytes per hardware unit (CPUID.0xF.1:EBX).
    pub upscaling_factor: u32,
    /// MBM counter width in bits (24 + CPUID.0xF.1:EAX[7:0]).
    pub width: u32,
    /// L3 geometry for leaf 4: ways, line size, sets (one partition).
    pub l3: (u32, u32, u32),
    /// Every access, in order.
    pub accesses: Vec<Access>,
}

impl FakeRdt {
    /// `sockets` sockets, RMIDs 0..=max_rmid, `factor` bytes per unit, `width`-bit MBM
    /// counters, an L3 of 16 ways x 64 B x 16384 sets (16 MiB).
    pub fn new(sockets: u32, max_rmid: u32, factor: u32, width: u32) -> Self {
        Self {
            sockets: vec![Socket::default(); sockets as usize],
            max_rmid,
            upscaling_factor: factor,
            width,
            l3: (16, 64, 16384),
            accesses: Vec::new(),
        }
    }

    /// L3 size in bytes per the leaf-4 geometry.
    pub fn l3_bytes(&self) -> u64 {
        u64::from(self.l3.0) * u64::from(self.l3.1) * u64::from(self.l3.2)
    }

    /// CPUID of this CPU.
    pub fn cpuid(&self) -> impl FnMut(u32, u32) -> [u32; 4] + use<> {
        let (max_rmid, factor, width) = (self.max_rmid, self.upscaling_factor, self.width);
        let (ways, line, sets) = self.l3;
        move |leaf, sub| match (leaf, sub) {
            (0, _) => [0x20, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            (7, 0) => [0, 1 << 12, 0, 0],
            (0xf, 0) => [0, max_rmid, 0, 1 << 1],
            (0xf, 1) => [width - 24, factor, max_rmid, 0b111],
            // Leaf 4 sub-leaf 0: a level-3 unified cache; sub-leaf 1: no more caches.
            (4, 0) => [(3 << 5) | 3, ((ways - 1) << 22) | (line - 1), sets - 1, 0],
            _ => [0; 4],
        }
    }

    fn socket_mut(&mut self, socket: u32) -> &mut Socket {
        &mut self.sockets[socket as usize]
    }

    /// Set the L3 occupancy of `rmid` on `socket`, in hardware units.
    pub fn set_occupancy(&mut self, socket: u32, rmid: u32, units: u64) {
        self.socket_mut(socket).occupancy.insert(rmid, units);
    }

    /// Add memory traffic of `rmid` on `socket`, in hardware units (local is part of total).
    pub fn add_traffic(&mut self, socket: u32, rmid: u32, total_units: u64, local_units: u64) {
        let s = self.socket_mut(socket);
        *s.total.entry(rmid).or_default() += u128::from(total_units);
        *s.local.entry(rmid).or_default() += u128::from(local_units);
    }

    /// Make IA32_QM_CTR report the Error bit for `rmid` on `socket`.
    pub fn inject_error(&mut self, socket: u32, rmid: u32) {
        self.socket_mut(socket).error.insert(rmid);
    }

    /// Make IA32_QM_CTR report the Unavailable bit for `rmid` on `socket`.
    pub fn inject_unavailable(&mut self, socket: u32, rmid: u32) {
        self.socket_mut(socket).unavailable.insert(rmid);
    }

    /// Remove every injected fault.
    pub fn clear_faults(&mut self) {
        for s in &mut self.sockets {
            s.error.clear();
            s.unavailable.clear();
        }
    }

    /// The last IA32_PQR_ASSOC value written on `socket`.
    pub fn pqr_assoc(&self, socket: u32) -> u64 {
        self.sockets[socket as usize].pqr_assoc
    }

    /// Bits of the implemented RMID field: enough for `max_rmid`.
    fn rmid_bits(&self) -> u32 {
        32 - self.max_rmid.leading_zeros()
    }

    fn ctr(&self, socket: u32) -> u64 {
        let s = &self.sockets[socket as usize];
        let rmid = (s.evtsel >> 32) as u32;
        let event = s.evtsel & 0xff;
        if rmid > self.max_rmid || !(1..=3).contains(&event) || s.error.contains(&rmid) {
            return QM_CTR_ERROR;
        }
        if s.unavailable.contains(&rmid) {
            return QM_CTR_UNAVAILABLE;
        }
        let modulus = 1u128 << self.width;
        match event {
            1 => s.occupancy.get(&rmid).copied().unwrap_or(0),
            2 => (s.total.get(&rmid).copied().unwrap_or(0) % modulus) as u64,
            _ => (s.local.get(&rmid).copied().unwrap_or(0) % modulus) as u64,
        }
    }

    /// Accesses to MSRs outside the allow-list (there should be none).
    pub fn refused(&self) -> usize {
        self.accesses.iter().filter(|(_, msr, _)| !is_allowed(*msr)).count()
    }
}

impl MsrAccess for FakeRdt {
    fn write_msr(&mut self, socket: u32, msr: u32, value: u64) -> Result<(), PlatformError> {
        self.accesses.push((socket, msr, Some(value)));
        if !is_allowed(msr) {
            return Err(PlatformError::NotAllowed { msr });
        }
        if socket as usize >= self.sockets.len() {
            return Err(PlatformError::NoSuchSocket { socket });
        }
        match msr {
            IA32_QM_EVTSEL => {
                let reserved_low = value & 0xffff_ff00 != 0;
                let reserved_high = (value >> 32) >> self.rmid_bits() != 0;
                if reserved_low || reserved_high {
                    return Err(PlatformError::Fault { socket, msr });
                }
                self.socket_mut(socket).evtsel = value;
                Ok(())
            }
            IA32_PQR_ASSOC => {
                self.socket_mut(socket).pqr_assoc = value;
                Ok(())
            }
            // IA32_QM_CTR is read-only.
            _ => Err(PlatformError::Fault { socket, msr }),
        }
    }

    fn read_msr(&mut self, socket: u32, msr: u32) -> Result<u64, PlatformError> {
        self.accesses.push((socket, msr, None));
        if !is_allowed(msr) {
            return Err(PlatformError::NotAllowed { msr });
        }
        if socket as usize >= self.sockets.len() {
            return Err(PlatformError::NoSuchSocket { socket });
        }
        match msr {
            IA32_QM_CTR => Ok(self.ctr(socket)),
            IA32_QM_EVTSEL => Ok(self.sockets[socket as usize].evtsel),
            _ => Ok(self.sockets[socket as usize].pqr_assoc),
        }
    }
}

/// A CPUID table from a `hvctl cpuid dump v1` file (`leaf subleaf eax ebx ecx edx` in
/// hex per line, `#` comments); leaves not in the dump read as zeros.
pub fn cpuid_from_dump(text: &str) -> impl FnMut(u32, u32) -> [u32; 4] + use<> {
    let mut table = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let v: Vec<u32> = line.split_whitespace().map(|w| u32::from_str_radix(w, 16).unwrap()).collect();
        assert_eq!(v.len(), 6, "bad dump line {line:?}");
        table.insert((v[0], v[1]), [v[2], v[3], v[4], v[5]]);
    }
    move |leaf, sub| table.get(&(leaf, sub)).copied().unwrap_or([0; 4])
}
