//! The machine's identity: CPUID and MSR reads ([`hw`]), the capability probe
//! ([`caps`]), which package each CPU is in ([`topology`]) and the RDT monitoring MSRs
//! the monitoring service may use, on a CPU of the socket it names ([`rdt`]).

pub mod caps;
pub mod hw;
pub mod rdt;
pub mod topology;
