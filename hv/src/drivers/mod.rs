//! Hardware the hypervisor itself drives, never a guest's: the 16550 UARTs (COM1, the
//! hypervisor's own console, and COM2, the serial control channel), the host local APIC (time-slice timer on SVM), the descriptor tables,
//! the TSC and PIT (time), PCI configuration space and virtio (the vsock control
//! channel). Guest device models live in `devices/`; the two never share code.

pub mod console;
pub mod lapic;
pub mod pci;
pub mod tables;
pub mod time;
pub mod uart;
pub mod virtio;
