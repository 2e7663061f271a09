//! The platform interface: the three RDT monitoring MSRs, how their values are laid
//! out, and the [`MsrAccess`] trait through which this service reaches them.
//!
//! This service never executes RDMSR/WRMSR. The core does, on a CPU of the named
//! socket, when the service asks by message; the core vets every request with
//! [`is_allowed`] so that a confused or compromised service can touch nothing but
//! [`ALLOWED_MSRS`]. Host tests implement [`MsrAccess`] with a hardware model.
//!
//! "Socket" here means one L3 monitoring domain: RMIDs and their counters are per L3
//! cache instance (one per socket on Intel; one per CCX on AMD, APM Vol. 2 19.3). The
//! core numbers them 0.. and picks a CPU in the right one.
//!
//! Not for: CPUID decoding ([`crate::caps`]) or interpreting counter values
//! ([`crate::counters`]).
//!
//! Layouts (Intel SDM Vol. 3B 18.18.6 "Monitoring Resource RMID Association" and
//! 18.18.7 "Monitoring Resource Selection and Reporting Infrastructure", figure
//! "IA32_PQR_ASSOC, IA32_QM_EVTSEL and IA32_QM_CTR MSRs"; AMD APM Vol. 2 19.3.2):
//!
//! ```text
//! IA32_PQR_ASSOC (0xC8F)  63        32 31       10 9       0
//!                         | COS        | reserved  | RMID    |   (RMID field: implemented width)
//! IA32_QM_EVTSEL (0xC8D)  63     42 41        32 31       8 7        0
//!                         |reserved| RMID       | reserved  | EventID  |
//! IA32_QM_CTR    (0xC8E)  63 | 62          | 61                       0
//!                         E  | Unavailable | data
//! ```
//!
//! The SDM figure draws the EVTSEL RMID field as bits 41:32 (enough for 1024 RMIDs);
//! the field is as wide as the implemented RMIDs, so we place the RMID at bit 32 and
//! rely on the RMID never exceeding CPUID.(EAX=0FH,ECX=1):ECX ([`crate::rmid`] only
//! hands out such RMIDs) so that no reserved bit is ever set (which would #GP).
//! EventID (SDM Vol. 3B table "Monitoring Supported Event IDs"): 1 L3 occupancy,
//! 2 L3 total external bandwidth, 3 L3 local external bandwidth.

use alloc::string::String;
use core::fmt;

/// IA32_QM_EVTSEL: selects the (RMID, event) that IA32_QM_CTR reports.
pub const IA32_QM_EVTSEL: u32 = 0xC8D;
/// IA32_QM_CTR: the selected counter, with the Error and Unavailable bits.
pub const IA32_QM_CTR: u32 = 0xC8E;
/// IA32_PQR_ASSOC: the RMID (and class of service) of the logical processor.
pub const IA32_PQR_ASSOC: u32 = 0xC8F;

/// The only MSRs this service may ask the core to read or write.
pub const ALLOWED_MSRS: [u32; 3] = [IA32_QM_EVTSEL, IA32_QM_CTR, IA32_PQR_ASSOC];

/// Whether the core may perform an MSR access for this service.
pub const fn is_allowed(msr: u32) -> bool {
    matches!(msr, IA32_QM_EVTSEL | IA32_QM_CTR | IA32_PQR_ASSOC)
}

/// IA32_QM_CTR bit 63: the RMID or event selected in IA32_QM_EVTSEL is not supported.
pub const QM_CTR_ERROR: u64 = 1 << 63;
/// IA32_QM_CTR bit 62: no data for this RMID yet (or any more); ignore bits 61:0.
pub const QM_CTR_UNAVAILABLE: u64 = 1 << 62;
/// IA32_QM_CTR bit 61 when CPUID.(EAX=0FH,ECX=1):EAX\[8\] is set: the MBM counter overflowed.
pub const QM_CTR_OVERFLOW: u64 = 1 << 61;
/// IA32_QM_CTR bits 61:0.
pub const QM_CTR_DATA_MASK: u64 = (1 << 62) - 1;

/// The RDT monitoring events (SDM Vol. 3B 18.18.7, event IDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HwEvent {
    /// L3 cache occupancy (event ID 1).
    LlcOccupancy,
    /// L3 total external memory bandwidth (event ID 2).
    MbmTotal,
    /// L3 local external memory bandwidth (event ID 3).
    MbmLocal,
}

impl HwEvent {
    /// Every hardware event.
    pub const ALL: [HwEvent; 3] = [Self::LlcOccupancy, Self::MbmTotal, Self::MbmLocal];

    /// The EventID to program in IA32_QM_EVTSEL\[7:0\].
    pub const fn event_id(self) -> u8 {
        match self {
            Self::LlcOccupancy => 1,
            Self::MbmTotal => 2,
            Self::MbmLocal => 3,
        }
    }

    /// The name users see (as Linux resctrl names the files).
    pub const fn name(self) -> &'static str {
        match self {
            Self::LlcOccupancy => "llc_occupancy",
            Self::MbmTotal => "mbm_total",
            Self::MbmLocal => "mbm_local",
        }
    }
}

/// The IA32_QM_EVTSEL value selecting `event` for `rmid`.
pub const fn evtsel_value(event: HwEvent, rmid: u32) -> u64 {
    ((rmid as u64) << 32) | event.event_id() as u64
}

/// The IA32_PQR_ASSOC value for `rmid` with class of service `cos`: the core keeps the
/// COS it already has (bits 63:32) and changes only the RMID.
pub const fn pqr_assoc_value(rmid: u32, cos: u32) -> u64 {
    ((cos as u64) << 32) | rmid as u64
}

/// Why the core could not perform an MSR access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformError {
    /// The MSR is not in [`ALLOWED_MSRS`]; the core refuses it.
    NotAllowed {
        /// The MSR asked for.
        msr: u32,
    },
    /// There is no such socket (L3 monitoring domain).
    NoSuchSocket {
        /// The socket asked for.
        socket: u32,
    },
    /// The access faulted (#GP): e.g. a reserved bit was set.
    Fault {
        /// Where.
        socket: u32,
        /// Which MSR.
        msr: u32,
    },
    /// The core did not answer (mailbox full, core busy), with its explanation.
    Unreachable {
        /// Why, as a phrase.
        reason: &'static str,
    },
    /// The socket exists, but no CPU of it could perform the access (its CPUs failed
    /// to start, or the one asked did not answer in time). The core never answers
    /// from a CPU of another socket instead.
    SocketUnreachable {
        /// The socket asked for.
        socket: u32,
        /// Why, as a phrase naming the CPUs.
        reason: String,
    },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAllowed { msr } => {
                write!(f, "MSR {msr:#x} is not one of the RDT monitoring MSRs this service may use")
            }
            Self::NoSuchSocket { socket } => write!(f, "there is no socket (L3 monitoring domain) {socket}"),
            Self::Fault { socket, msr } => write!(f, "accessing MSR {msr:#x} on socket {socket} faulted (#GP)"),
            Self::Unreachable { reason } => write!(f, "the core did not perform the MSR access: {reason}"),
            Self::SocketUnreachable { socket, reason } => {
                write!(f, "no CPU of socket {socket} can perform the MSR access: {reason}")
            }
        }
    }
}

/// MSR access on a CPU of a given socket, performed by the core on this service's
/// behalf (by message on the real system, by a model in tests).
pub trait MsrAccess {
    /// Write `value` to `msr` on a CPU of `socket`.
    fn write_msr(&mut self, socket: u32, msr: u32, value: u64) -> Result<(), PlatformError>;
    /// Read `msr` on a CPU of `socket`.
    fn read_msr(&mut self, socket: u32, msr: u32) -> Result<u64, PlatformError>;
}

/// Select `event` for `rmid` on `socket` and return the raw IA32_QM_CTR value
/// (SDM Vol. 3B 18.18.7: write IA32_QM_EVTSEL, then read IA32_QM_CTR). Both accesses
/// must run on the same CPU without another EVTSEL write in between; the core
/// serializes them per socket.
pub fn read_qm_ctr(msr: &mut impl MsrAccess, socket: u32, event: HwEvent, rmid: u32) -> Result<u64, PlatformError> {
    msr.write_msr(socket, IA32_QM_EVTSEL, evtsel_value(event, rmid))?;
    msr.read_msr(socket, IA32_QM_CTR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn allow_list_is_exactly_the_three_msrs() {
        for msr in ALLOWED_MSRS {
            assert!(is_allowed(msr));
        }
        for msr in [0u32, 0x10, 0xC8C, 0xC90, 0xC8D_0000, 0x3a, 0x480, u32::MAX] {
            assert!(!is_allowed(msr), "{msr:#x}");
        }
    }

    #[test]
    fn an_unreachable_socket_reads_as_a_sentence() {
        let e = PlatformError::SocketUnreachable { socket: 1, reason: "none of its CPUs (APIC 1) runs".into() };
        assert_eq!(e.to_string(), "no CPU of socket 1 can perform the MSR access: none of its CPUs (APIC 1) runs");
    }

    #[test]
    fn evtsel_and_pqr_assoc_layouts() {
        assert_eq!(evtsel_value(HwEvent::LlcOccupancy, 0), 1);
        assert_eq!(evtsel_value(HwEvent::MbmTotal, 7), (7 << 32) | 2);
        assert_eq!(evtsel_value(HwEvent::MbmLocal, 0x3ff), 0x3ff_0000_0003);
        assert_eq!(pqr_assoc_value(5, 0), 5);
        assert_eq!(pqr_assoc_value(5, 3), (3 << 32) | 5);
    }
}
