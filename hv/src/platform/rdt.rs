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
        // SAFETY: `is_allowed` limits this to the RDT monitoring MSRs, which exist when CPUID.7.0:EBX[12] (PQM) is
        // set — the only case in which monitor_svc's engine (built from that CPUID) issues requests. Writing
        // EVTSEL/PQR_ASSOC changes only which counter is read / which RMID tags this CPU's traffic.
        unsafe { x86::msr::wrmsr(msr, value) };
        Ok(())
    }

    fn read_msr(&mut self, socket: u32, msr: u32) -> Result<u64, PlatformError> {
        Self::check(socket, msr)?;
        // SAFETY: as for `write_msr`; reading IA32_QM_CTR has no side effects.
        Ok(unsafe { x86::msr::rdmsr(msr) })
    }
}

/// What the boot command line says about monitoring: `monitor=off` turns it off,
/// `rmid-cap=N` uses at most N RMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootOptions {
    /// `monitor=off`.
    pub off: bool,
    /// `rmid-cap=N`.
    pub rmid_cap: Option<u32>,
}

impl BootOptions {
    /// Parse the words of the command line; unknown words are someone else's.
    pub fn parse(cmdline: &str) -> Self {
        let mut o = Self::default();
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("monitor", "off")) => o.off = true,
                Some(("rmid-cap", n)) => o.rmid_cap = n.parse().ok(),
                _ => {}
            }
        }
        o
    }
}

static OPTIONS: spin::Once<BootOptions> = spin::Once::new();

/// Record the boot options (once, at boot).
pub fn set_boot_options(o: BootOptions) {
    OPTIONS.call_once(|| o);
}

/// The monitoring service for this CPU: capabilities from CPUID (leaf 7, 0xF, cache
/// leaves), one L3 monitoring domain, the TSC frequency for rates.
pub fn monitor_service() -> monitor_svc::MonitorService {
    let options = OPTIONS.get().copied().unwrap_or_default();
    let caps = if options.off {
        monitor_svc::caps::MonitorCaps::Absent {
            reason: "monitoring is turned off on the boot command line (monitor=off)",
        }
    } else {
        monitor_svc::caps::MonitorCaps::from_cpuid(
            |leaf, sub| crate::platform::hw::HwRead::cpuid(&mut crate::platform::hw::RealHw, leaf, sub),
            &monitor_svc::caps::MonitorConfig { rmid_cap: options.rmid_cap, limbo_threshold_bytes: None },
        )
    };
    if let monitor_svc::caps::MonitorCaps::Present(c) = &caps {
        PRESENT.store(true, core::sync::atomic::Ordering::Relaxed);
        log::info!("RDT monitoring: {} usable RMIDs", c.usable_rmids);
    }
    let timing = monitor_svc::monitor::Timing {
        tsc_hz: crate::drivers::time::tsc_hz().unwrap_or(0),
        max_bytes_per_sec: monitor_svc::monitor::DEFAULT_MAX_BYTES_PER_SEC,
    };
    monitor_svc::MonitorService::with_caps(caps, 1, timing)
}

/// Whether RMIDs are in use at all (only then is IA32_PQR_ASSOC written).
static PRESENT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// What to write to IA32_PQR_ASSOC to run with `wanted`, if it differs from `current`.
pub fn pqr_update(current: u32, wanted: u32) -> Option<u64> {
    (current != wanted).then(|| monitor_svc::platform::pqr_assoc_value(wanted, 0))
}

/// Tag this CPU's memory traffic with `rmid` before entering a vCPU (SDM Vol. 3B
/// 18.18.4: IA32_PQR_ASSOC bits 9:0), writing the MSR only when the value changes.
/// RMID 0 means "not monitored".
pub fn switch_rmid(rmid: u32) {
    if !PRESENT.load(core::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let cpu = crate::percpu::this();
    let current = cpu.current_rmid();
    if let Some(value) = pqr_update(current, rmid) {
        // SAFETY: IA32_PQR_ASSOC exists when CPUID reports RDT monitoring (PRESENT);
        // changing the RMID only changes how this CPU's cache fills are accounted.
        unsafe { x86::msr::wrmsr(monitor_svc::platform::IA32_PQR_ASSOC, value) };
        cpu.set_current_rmid(rmid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pqr_assoc_is_written_only_on_change() {
        assert_eq!(pqr_update(0, 0), None);
        assert_eq!(pqr_update(0, 7), Some(7));
        assert_eq!(pqr_update(7, 7), None);
        assert_eq!(pqr_update(7, 0), Some(0), "detach returns the CPU to RMID 0");
    }

    #[test]
    fn boot_options() {
        assert_eq!(BootOptions::parse("cpuid-dump monitor=off"), BootOptions { off: true, rmid_cap: None });
        assert_eq!(BootOptions::parse("rmid-cap=8"), BootOptions { off: false, rmid_cap: Some(8) });
        assert_eq!(BootOptions::parse(""), BootOptions::default());
    }
}
