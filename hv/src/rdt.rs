//! The hardware side of RDT monitoring for `monitor_svc`: the core performs the MSR
//! accesses the service asks for, and only those on its allow-list (IA32_PQR_ASSOC,
//! IA32_QM_EVTSEL, IA32_QM_CTR) — the role Xen's resource-access hypercall plays.
//!
//! One physical CPU runs today, so only socket (L3 monitoring domain) 0 is reachable;
//! a request for another socket is refused, never answered from the wrong socket. The
//! service only asks when CPUID reported monitoring (bare metal with RDT/PQoS); on the
//! emulators it reports the hardware events as not available without touching MSRs.

use monitor_svc::platform::{MsrAccess, PlatformError, is_allowed};

/// MSR access on the bootstrap CPU, which is on socket 0.
#[derive(Debug, Default)]
pub struct BootCpuMsrs;

impl BootCpuMsrs {
    fn check(socket: u32, msr: u32) -> Result<(), PlatformError> {
        if !is_allowed(msr) {
            return Err(PlatformError::NotAllowed { msr });
        }
        if socket != 0 {
            return Err(PlatformError::NoSuchSocket { socket });
        }
        Ok(())
    }
}

impl MsrAccess for BootCpuMsrs {
    fn write_msr(&mut self, socket: u32, msr: u32, value: u64) -> Result<(), PlatformError> {
        Self::check(socket, msr)?;
        // SAFETY: `is_allowed` limits this to the RDT monitoring MSRs, which exist when
        // CPUID.7.0:EBX[12] (PQM) is set — the only case in which monitor_svc's engine
        // (built from that CPUID) issues requests. Writing EVTSEL/PQR_ASSOC changes only
        // which counter is read / which RMID tags this CPU's traffic.
        unsafe { x86::msr::wrmsr(msr, value) };
        Ok(())
    }

    fn read_msr(&mut self, socket: u32, msr: u32) -> Result<u64, PlatformError> {
        Self::check(socket, msr)?;
        // SAFETY: as for `write_msr`; reading IA32_QM_CTR has no side effects.
        Ok(unsafe { x86::msr::rdmsr(msr) })
    }
}

/// The monitoring service for this CPU: capabilities from CPUID (leaf 7, 0xF, cache
/// leaves), one L3 monitoring domain, the TSC frequency for rates.
pub fn monitor_service() -> monitor_svc::MonitorService {
    let caps = monitor_svc::caps::MonitorCaps::from_cpuid(
        |leaf, sub| crate::hw::HwRead::cpuid(&mut crate::hw::RealHw, leaf, sub),
        &monitor_svc::caps::MonitorConfig::default(),
    );
    let timing = monitor_svc::monitor::Timing {
        tsc_hz: crate::time::tsc_hz().unwrap_or(0),
        max_bytes_per_sec: monitor_svc::monitor::DEFAULT_MAX_BYTES_PER_SEC,
    };
    monitor_svc::MonitorService::with_caps(caps, 1, timing)
}

/// The core's exit counter name → the monitoring service's exit kind.
pub fn exit_kind(name: &str) -> monitor_svc::events::ExitKind {
    use monitor_svc::events::ExitKind;
    match name {
        "hypercall" => ExitKind::Hypercall,
        "hlt" => ExitKind::Hlt,
        "triple_fault" => ExitKind::TripleFault,
        "npf" => ExitKind::NestedPageFault,
        "exception" => ExitKind::Exception(8),
        "cpuid" => ExitKind::Cpuid,
        "io" => ExitKind::Io,
        "rdmsr" | "wrmsr" => ExitKind::Msr,
        "virt_insn" => ExitKind::VirtualizationInstruction,
        "time_slice" => ExitKind::TimeSlice,
        _ => ExitKind::Other(0),
    }
}
