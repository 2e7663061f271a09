//! Hardware the hypervisor itself drives, never a guest's: COM1 (the hypervisor's own
//! console), the host local APIC (time-slice timer on SVM), the descriptor tables,
//! the TSC and PIT (time), PCI configuration space and virtio (the vsock control
//! channel). Guest device models live in `devices/`; the two never share code.

pub mod console;
pub mod lapic;
pub mod pci;
pub mod tables;
pub mod time;
pub mod virtio;
