//! Per-CPU setup that both backends need: the hypervisor's own descriptor tables.
//!
//! Not for: anything vendor specific (that lives under `arch/`).

pub mod lapic;
pub mod tables;
