//! The machine's identity: CPUID and MSR reads ([`hw`]), the capability probe
//! ([`caps`]) and the RDT monitoring MSRs the monitoring service may use ([`rdt`]).

pub mod caps;
pub mod hw;
pub mod rdt;
