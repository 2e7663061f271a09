//! How the core reads the machine's identity: CPUID and MSRs behind one small trait.
//!
//! The capability probe is written against [`HwRead`], so the same decoding runs on
//! the real CPU ([`RealHw`]), on values recorded from an emulator or a datasheet
//! ([`Recorded`], used by host tests), and through a [`Recorder`] that keeps every value
//! it read so the boot image can print them as a fixture line (`PROBE-RAW`).
//!
//! Not for: writing MSRs or control registers; the arch backends do that themselves,
//! next to the manual sections that say why.

use alloc::collections::BTreeMap;
use alloc::string::String;
use core::fmt::Write;

/// Read-only access to CPUID and MSRs.
pub trait HwRead {
    /// CPUID with EAX=`leaf`, ECX=`subleaf`; returns [EAX, EBX, ECX, EDX].
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// RDMSR. `None` when the value is not available (a recording that lacks it).
    /// The probe only asks for MSRs that CPUID says exist, because on hardware
    /// reading any other MSR raises #GP.
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
}

/// The CPU this code runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHw;

impl HwRead for RealHw {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        // SAFETY: callers (the capability probe) only pass MSRs whose existence CPUID has established (architectural
        // VMX MSRs when CPUID.1:ECX.VMX=1, VM_CR when CPUID.80000001:ECX.SVM=1, IA32_FEATURE_CONTROL when VMX or SMX
        // is present), so RDMSR cannot #GP; we run at CPL0.
        Some(unsafe { x86::msr::rdmsr(msr) })
    }
}

/// Values recorded from a real or emulated machine (or built from a manual).
/// CPUID leaves that were not recorded read as zeros, as a CPU returns for an
/// out-of-range leaf on Intel; MSRs that were not recorded read as `None`.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// (leaf, subleaf) -> [EAX, EBX, ECX, EDX]
    pub cpuid: BTreeMap<(u32, u32), [u32; 4]>,
    /// MSR index -> value
    pub msrs: BTreeMap<u32, u64>,
}

impl HwRead for Recorded {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid.get(&(leaf, subleaf)).copied().unwrap_or([0; 4])
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        self.msrs.get(&msr).copied()
    }
}

/// Error parsing a `PROBE-RAW` line back into a [`Recorded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseRawError {
    /// The token that could not be parsed.
    pub token: String,
}

impl core::fmt::Display for ParseRawError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "cannot parse probe recording token {:?}: expected c:LEAF:SUB=EAX:EBX:ECX:EDX or m:MSR=VALUE (hex)",
            self.token
        )
    }
}

impl Recorded {
    /// Serialize as the body of a `PROBE-RAW` line: space-separated tokens
    /// `c:LEAF:SUB=EAX:EBX:ECX:EDX` and `m:MSR=VALUE`, all hex.
    pub fn to_line(&self) -> String {
        let mut s = String::new();
        for ((leaf, sub), r) in &self.cpuid {
            let _ = write!(s, "c:{leaf:x}:{sub:x}={:x}:{:x}:{:x}:{:x} ", r[0], r[1], r[2], r[3]);
        }
        for (msr, v) in &self.msrs {
            let _ = write!(s, "m:{msr:x}={v:x} ");
        }
        s.truncate(s.trim_end().len());
        s
    }

    /// Parse the body of a `PROBE-RAW` line (the inverse of [`Recorded::to_line`]).
    pub fn parse_line(line: &str) -> Result<Self, ParseRawError> {
        let mut rec = Recorded::default();
        for token in line.split_whitespace() {
            let bad = || ParseRawError { token: String::from(token) };
            let hex32 = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
            if let Some(rest) = token.strip_prefix("c:") {
                let (key, val) = rest.split_once('=').ok_or_else(bad)?;
                let (leaf, sub) = key.split_once(':').ok_or_else(bad)?;
                let mut regs = [0u32; 4];
                let mut parts = val.split(':');
                for reg in regs.iter_mut() {
                    *reg = hex32(parts.next().ok_or_else(bad)?)?;
                }
                if parts.next().is_some() {
                    return Err(bad());
                }
                rec.cpuid.insert((hex32(leaf)?, hex32(sub)?), regs);
            } else if let Some(rest) = token.strip_prefix("m:") {
                let (msr, val) = rest.split_once('=').ok_or_else(bad)?;
                let val = u64::from_str_radix(val, 16).map_err(|_| bad())?;
                rec.msrs.insert(hex32(msr)?, val);
            } else {
                return Err(bad());
            }
        }
        Ok(rec)
    }
}

/// Wraps another reader and records every value read through it.
#[derive(Debug)]
pub struct Recorder<H> {
    inner: H,
    /// Everything read so far.
    pub recorded: Recorded,
}

impl<H: HwRead> Recorder<H> {
    /// Start recording reads from `inner`.
    pub fn new(inner: H) -> Self {
        Self { inner, recorded: Recorded::default() }
    }
}

impl<H: HwRead> HwRead for Recorder<H> {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = self.inner.cpuid(leaf, subleaf);
        self.recorded.cpuid.insert((leaf, subleaf), r);
        r
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        let v = self.inner.rdmsr(msr);
        if let Some(v) = v {
            self.recorded.msrs.insert(msr, v);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_line_round_trips() {
        let mut rec = Recorded::default();
        rec.cpuid.insert((0x8000_000a, 0), [1, 0x10, 0, 0x1ff]);
        rec.cpuid.insert((0, 0), [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]);
        rec.msrs.insert(0xc001_0114, 0x10);
        let line = rec.to_line();
        assert_eq!(line, "c:0:0=d:68747541:444d4163:69746e65 c:8000000a:0=1:10:0:1ff m:c0010114=10");
        let back = Recorded::parse_line(&line).unwrap();
        assert_eq!(back.cpuid, rec.cpuid);
        assert_eq!(back.msrs, rec.msrs);
    }

    #[test]
    fn raw_line_rejects_garbage_with_the_token() {
        let err = Recorded::parse_line("c:0:0=1:2:3 m:zz=1").unwrap_err();
        assert_eq!(err.token, "c:0:0=1:2:3");
        assert!(Recorded::parse_line("x:1=2").is_err());
        assert!(Recorded::parse_line("m:3a=").is_err());
    }

    #[test]
    fn recorder_keeps_what_it_read() {
        let mut inner = Recorded::default();
        inner.cpuid.insert((1, 0), [1, 2, 3, 4]);
        inner.msrs.insert(0x3a, 5);
        let mut r = Recorder::new(inner);
        assert_eq!(r.cpuid(1, 0), [1, 2, 3, 4]);
        assert_eq!(r.rdmsr(0x3a), Some(5));
        assert_eq!(r.rdmsr(0x3b), None);
        assert_eq!(r.recorded.cpuid.len(), 1);
        assert_eq!(r.recorded.msrs.len(), 1);
    }
}
