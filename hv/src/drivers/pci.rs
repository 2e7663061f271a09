//! PCI configuration space through the legacy I/O ports 0xCF8/0xCFC ("configuration
//! mechanism #1", PCI Local Bus Spec 3.0 3.2.2.3.2).
//!
//! Port access works on every PC platform we target (QEMU q35 and i440fx, Bochs, server
//! boards) without first parsing ACPI's MCFG table; it reaches the first 256 bytes of
//! each function, which is all virtio-pci needs. Firmware (OVMF) has already assigned
//! BARs and enabled decoding, so we only read and use them.

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration access through ports 0xCF8/0xCFC.
#[derive(Debug)]
pub struct PortCam {
    _private: (),
}

impl PortCam {
    /// # Safety
    /// Only one owner may use the configuration ports at a time (the hypervisor owns
    /// the machine; this is created once, on the bootstrap CPU, with interrupts off).
    pub unsafe fn new() -> Self {
        Self { _private: () }
    }

    fn address(df: DeviceFunction, offset: u8) -> u32 {
        (1 << 31)
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device & 0x1f) << 11)
            | (u32::from(df.function & 0x7) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, device_function: DeviceFunction, register_offset: u8) -> u32 {
        // SAFETY: writing CONFIG_ADDRESS then reading CONFIG_DATA is the defined
        // configuration read; `new`'s contract makes us the only user of the pair.
        unsafe {
            x86::io::outl(CONFIG_ADDRESS, Self::address(device_function, register_offset));
            x86::io::inl(CONFIG_DATA)
        }
    }

    fn write_word(&mut self, device_function: DeviceFunction, register_offset: u8, data: u32) {
        // SAFETY: as for `read_word`; the caller (virtio-drivers) only writes registers
        // of the device it drives.
        unsafe {
            x86::io::outl(CONFIG_ADDRESS, Self::address(device_function, register_offset));
            x86::io::outl(CONFIG_DATA, data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self { _private: () }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address_layout() {
        let df = DeviceFunction { bus: 0x12, device: 0x1f, function: 7 };
        assert_eq!(PortCam::address(df, 0x13), 0x8012_ff10);
        let df = DeviceFunction { bus: 0, device: 3, function: 0 };
        assert_eq!(PortCam::address(df, 0), 0x8000_1800);
    }
}
