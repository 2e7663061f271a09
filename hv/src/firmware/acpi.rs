//! The ACPI tables of a domain: RSDP, XSDT, FADT, FACS, DSDT and MADT, built into a
//! caller's buffer that the caller then copies to guest-physical `base_gpa` (the
//! layout in [`super`] puts them at [`super::ACPI_GPA`]).
//!
//! What the tables describe is a small PC without PCI: one I/O APIC, a local APIC per
//! vCPU, the legacy PIC (MADT PCAT_COMPAT), the ACPI PM registers (event, control and
//! a 32-bit timer) and a reset register in I/O space, and a DSDT that holds only the
//! `\_S5` sleep object so the guest can power off. Addresses of the PM device come in
//! as [`AcpiConfig`] fields; the device model itself lives in `devices`.
//!
//! Not here: SSDTs, processor objects, PCI routing (`_PRT`), HPET, anything that needs
//! an AML interpreter to check. Tables are built in one pass in address order:
//!
//! ```text
//! base+0x000  RSDP (36 bytes, revision 2)
//! base+0x040  XSDT -> FADT, MADT
//! then        FACS (64-byte aligned), FADT (276 bytes), DSDT, MADT (16-byte aligned each)
//! ```

use core::fmt;

use super::put;

/// OEM id in every header.
pub const OEM_ID: [u8; 6] = *b"HVRUST";
/// OEM table id in every header.
pub const OEM_TABLE_ID: [u8; 8] = *b"HVPC    ";
/// Creator id in every header.
pub const CREATOR_ID: [u8; 4] = *b"HVRS";
/// The most vCPUs the tables describe (each costs at most 16 MADT bytes).
pub const MAX_VCPUS: u32 = 1024;

/// Where the platform's ACPI-visible pieces are, and what the MADT lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs; vCPU `i` has APIC id `i` and ACPI processor UID `i`.
    pub vcpus: u32,
    /// I/O APIC id.
    pub ioapic_id: u8,
    /// I/O APIC MMIO base.
    pub ioapic_addr: u32,
    /// Local APIC MMIO base.
    pub lapic_addr: u32,
    /// PM1a event block (I/O port), 4 bytes: PM1_STS and PM1_EN.
    pub pm1a_evt: u16,
    /// PM1a control block (I/O port), 2 bytes.
    pub pm1a_cnt: u16,
    /// PM timer (I/O port), 4 bytes, 32-bit counter.
    pub pm_tmr: u16,
    /// Reset register (I/O port, 8 bits).
    pub reset_port: u16,
    /// Value written to the reset register to reset.
    pub reset_value: u8,
    /// The SCI's interrupt (ISA IRQ = GSI), level-triggered active-high.
    pub sci_irq: u8,
    /// Report "VGA not present" in IAPC_BOOT_ARCH (off by default: as briefed).
    pub no_vga: bool,
}

impl Default for AcpiConfig {
    fn default() -> Self {
        AcpiConfig {
            vcpus: 1,
            ioapic_id: 0,
            ioapic_addr: super::IOAPIC_GPA,
            lapic_addr: super::LAPIC_GPA,
            pm1a_evt: 0x600,
            pm1a_cnt: 0x604,
            pm_tmr: 0x608,
            reset_port: 0x60c,
            reset_value: 0x0f,
            sci_irq: 9,
            no_vga: false,
        }
    }
}

/// Where the tables ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP (give this to the guest: zero page `acpi_rsdp_addr`).
    pub rsdp_gpa: u64,
    /// The XSDT.
    pub xsdt_gpa: u64,
    /// The FADT.
    pub fadt_gpa: u64,
    /// The FACS.
    pub facs_gpa: u64,
    /// The DSDT.
    pub dsdt_gpa: u64,
    /// The MADT.
    pub madt_gpa: u64,
    /// Bytes of the buffer used, from its start.
    pub bytes: usize,
}

/// Why the tables could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// The buffer is smaller than the tables.
    BufferTooSmall {
        /// Bytes the tables need.
        needed: usize,
        /// Bytes the buffer has.
        have: usize,
    },
    /// The base is not 64-byte aligned (ACPI 6.5 §5.2.5.1: the RSDP is on a 16-byte
    /// boundary; §5.2.10: the FACS on a 64-byte one).
    Misaligned {
        /// The base given.
        base_gpa: u64,
    },
    /// The tables would not lie below 4 GiB (FADT.DSDT and FIRMWARE_CTRL are 32-bit).
    Above4G {
        /// The base given.
        base_gpa: u64,
    },
    /// No vCPUs, or more than [`MAX_VCPUS`].
    Vcpus {
        /// How many were asked for.
        vcpus: u32,
    },
    /// The SCI's IRQ is not an ISA IRQ (0..15) other than the timer's 0 and 2.
    SciIrq {
        /// The IRQ given.
        irq: u8,
    },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::BufferTooSmall { needed, have } => {
                write!(f, "the ACPI tables need {needed} bytes but the buffer has {have}")
            }
            AcpiError::Misaligned { base_gpa } => {
                write!(f, "the ACPI tables' base {base_gpa:#x} is not 64-byte aligned, as the RSDP and FACS need")
            }
            AcpiError::Above4G { base_gpa } => {
                write!(f, "the ACPI tables at {base_gpa:#x} would not lie below 4 GiB, as 32-bit table pointers need")
            }
            AcpiError::Vcpus { vcpus } => write!(f, "{vcpus} vCPUs cannot be described: 1 to {MAX_VCPUS} are"),
            AcpiError::SciIrq { irq } => write!(f, "the SCI on IRQ {irq} is not an ISA IRQ other than 0 and 2"),
        }
    }
}

/// Standard table header length (ACPI 6.5 §5.2.6, Table 5.4).
const HEADER: usize = 36;
/// RSDP length for revision 2 (ACPI 6.5 §5.2.5.3, Table 5.3).
const RSDP_LEN: usize = 36;
/// FADT length for revision 6 (ACPI 6.5 §5.2.9, Table 5.9: up to the Hypervisor Vendor Identity).
const FADT_LEN: usize = 276;
/// FACS length (ACPI 6.5 §5.2.10).
const FACS_LEN: usize = 64;

/// The DSDT's AML (ACPI 6.5 §20.2): one named object at the root,
/// `Name (_S5, Package () { 5, 0 })`, which `\_S5` power-off reads to learn the
/// SLP_TYPa/SLP_TYPb values to write to PM1a/PM1b_CNT.SLP_TYP (§7.4.2) with SLP_EN.
/// Linux's `acpi_enter_sleep_state(5)` fails without it and the guest cannot power off.
///
/// ```text
/// 08              NameOp                     (§20.2.5.1 DefName := NameOp NameString DataRefObject)
/// 5F 53 35 5F     NameSeg "_S5_"             (§20.2.2, padded with '_' to 4 characters)
/// 12              PackageOp                  (§20.2.5.4 DefPackage := PackageOp PkgLength NumElements PackageElementList)
/// 05              PkgLength = 5              (one-byte form, §20.2.4: counts itself and what follows: 1+1+2+1)
/// 02              NumElements = 2
/// 0A 05           BytePrefix 5               (SLP_TYPa = 5: the PM device treats SLP_TYP 5 + SLP_EN as S5)
/// 00              ZeroOp                     (SLP_TYPb = 0: there is no PM1b block)
/// ```
pub const DSDT_AML: [u8; 11] = [0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00];

/// The SLP_TYP value in `\_S5` (what the PM device must treat as power-off).
pub const S5_SLP_TYP: u8 = 5;

/// Fill the standard header (§5.2.6) at `off` and set its checksum over `len` bytes.
fn header(out: &mut [u8], off: usize, sig: &[u8; 4], len: usize, revision: u8) {
    put(out, off, sig);
    put(out, off + 4, &(len as u32).to_le_bytes());
    put(out, off + 8, &[revision, 0]);
    put(out, off + 10, &OEM_ID);
    put(out, off + 16, &OEM_TABLE_ID);
    put(out, off + 24, &1u32.to_le_bytes()); // OEM revision
    put(out, off + 28, &CREATOR_ID);
    put(out, off + 32, &1u32.to_le_bytes()); // creator revision
    set_checksum(out, off, len, off + 9);
}

/// Make `out[off..off+len]` sum to zero mod 256 by setting the byte at `at`.
fn set_checksum(out: &mut [u8], off: usize, len: usize, at: usize) {
    if let Some(b) = out.get_mut(at) {
        *b = 0;
    }
    let sum = out.get(off..off + len).map_or(0u8, |t| t.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
    if let Some(b) = out.get_mut(at) {
        *b = 0u8.wrapping_sub(sum);
    }
}

/// A Generic Address Structure (ACPI 6.5 §5.2.3.2, Table 5.1) in system I/O space:
/// space id 1, bit width, bit offset 0, access size (1 = byte, 2 = word, 3 = dword).
fn gas_io(port: u16, bits: u8, access: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1;
    g[1] = bits;
    g[3] = access;
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT Fixed Feature Flags (ACPI 6.5 §5.2.9, Table 5.10).
mod fadt_flags {
    pub const WBINVD: u32 = 1 << 0;
    pub const PROC_C1: u32 = 1 << 2;
    /// The power button is a control method device (or absent): no fixed-feature button.
    pub const PWR_BUTTON: u32 = 1 << 4;
    /// Likewise for the sleep button.
    pub const SLP_BUTTON: u32 = 1 << 5;
    /// RTC wake status is not in the fixed register space.
    pub const FIX_RTC: u32 = 1 << 6;
    /// The PM timer is 32 bits wide.
    pub const TMR_VAL_EXT: u32 = 1 << 8;
    /// RESET_REG is supported.
    pub const RESET_REG_SUP: u32 = 1 << 10;
    /// HW_REDUCED_ACPI: deliberately not set (we have PM1 blocks and a PM timer).
    #[cfg(test)]
    pub const HW_REDUCED_ACPI: u32 = 1 << 20;
}

/// IA-PC Boot Architecture Flags (ACPI 6.5 §5.2.9.3, Table 5.11).
mod boot_arch {
    /// 8042 keyboard controller present: deliberately not set.
    #[cfg(test)]
    pub const I8042: u16 = 1 << 1;
    /// VGA not present.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// CMOS RTC not present: deliberately not set (the RTC model is there).
    #[cfg(test)]
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// How many bytes the MADT takes for `vcpus` (ACPI 6.5 §5.2.12, Table 5.19).
fn madt_len(vcpus: u32) -> usize {
    let lapics = vcpus.min(255) as usize;
    let x2apics = vcpus.saturating_sub(255) as usize;
    // header + local APIC address + flags; per-CPU entries; I/O APIC; 2 ISOs; NMIs.
    HEADER + 8 + lapics * 8 + x2apics * 16 + 12 + 2 * 10 + 6 + if x2apics > 0 { 12 } else { 0 }
}

/// Build the tables for `cfg` into `out`, which the caller places at `base_gpa`.
pub fn build(cfg: &AcpiConfig, base_gpa: u64, out: &mut [u8]) -> Result<AcpiTables, AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(AcpiError::Vcpus { vcpus: cfg.vcpus });
    }
    if cfg.sci_irq > 15 || cfg.sci_irq == 0 || cfg.sci_irq == 2 {
        return Err(AcpiError::SciIrq { irq: cfg.sci_irq });
    }
    if !base_gpa.is_multiple_of(64) {
        return Err(AcpiError::Misaligned { base_gpa });
    }
    // Offsets, in the order the tables are laid out.
    let xsdt = 0x40usize;
    let xsdt_len = HEADER + 2 * 8;
    let facs = (xsdt + xsdt_len).next_multiple_of(64);
    let fadt = (facs + FACS_LEN).next_multiple_of(16);
    let dsdt = (fadt + FADT_LEN).next_multiple_of(16);
    let dsdt_len = HEADER + DSDT_AML.len();
    let madt = (dsdt + dsdt_len).next_multiple_of(16);
    let madt_len = madt_len(cfg.vcpus);
    let needed = madt + madt_len;
    if out.len() < needed {
        return Err(AcpiError::BufferTooSmall { needed, have: out.len() });
    }
    let gpa = |off: usize| base_gpa + off as u64;
    if gpa(needed) > super::FOUR_GIB {
        return Err(AcpiError::Above4G { base_gpa });
    }
    if let Some(region) = out.get_mut(..needed) {
        region.fill(0);
    }

    // RSDP (§5.2.5.3): checksum over the first 20 bytes, extended checksum over all 36.
    put(out, 0, b"RSD PTR ");
    put(out, 9, &OEM_ID);
    put(out, 15, &[2]); // revision 2: ACPI 2.0+ with the XSDT
    put(out, 16, &0u32.to_le_bytes()); // RsdtAddress: no RSDT
    put(out, 20, &(RSDP_LEN as u32).to_le_bytes());
    put(out, 24, &gpa(xsdt).to_le_bytes());
    set_checksum(out, 0, 20, 8);
    set_checksum(out, 0, RSDP_LEN, 32);

    // XSDT (§5.2.8): 64-bit pointers to the FADT and the MADT.
    put(out, xsdt + HEADER, &gpa(fadt).to_le_bytes());
    put(out, xsdt + HEADER + 8, &gpa(madt).to_le_bytes());
    header(out, xsdt, b"XSDT", xsdt_len, 1);

    // FACS (§5.2.10): no checksum; version 2; no waking vector.
    put(out, facs, b"FACS");
    put(out, facs + 4, &(FACS_LEN as u32).to_le_bytes());
    put(out, facs + 32, &[2]);

    // FADT (§5.2.9, Table 5.9), revision 6, minor version 5 (ACPI 6.5).
    let f = fadt;
    let facs32 = gpa(facs) as u32; // below 4 GiB: checked above
    put(out, f + 36, &facs32.to_le_bytes()); // FIRMWARE_CTRL
    put(out, f + 40, &(gpa(dsdt) as u32).to_le_bytes()); // DSDT
    put(out, f + 45, &[0]); // Preferred_PM_Profile: unspecified
    put(out, f + 46, &u16::from(cfg.sci_irq).to_le_bytes()); // SCI_INT
    // SMI_CMD (48), ACPI_ENABLE/DISABLE (52, 53) stay 0: the hardware is always in
    // ACPI mode (§5.2.9: SMI_CMD zero means no SMI command port), so the PM device
    // reports PM1_CNT.SCI_EN set.
    put(out, f + 56, &u32::from(cfg.pm1a_evt).to_le_bytes()); // PM1a_EVT_BLK
    put(out, f + 64, &u32::from(cfg.pm1a_cnt).to_le_bytes()); // PM1a_CNT_BLK
    put(out, f + 76, &u32::from(cfg.pm_tmr).to_le_bytes()); // PM_TMR_BLK
    put(out, f + 88, &[4, 2, 0, 4]); // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    // P_LVL2_LAT > 100 and P_LVL3_LAT > 1000: C2/C3 not supported (§5.2.9).
    put(out, f + 96, &101u16.to_le_bytes());
    put(out, f + 98, &1001u16.to_le_bytes());
    put(out, f + 108, &[0x32]); // CENTURY: CMOS index of the century byte
    let arch = if cfg.no_vga { boot_arch::VGA_NOT_PRESENT } else { 0 };
    put(out, f + 109, &arch.to_le_bytes()); // IAPC_BOOT_ARCH: no 8042, RTC present
    let flags = fadt_flags::WBINVD
        | fadt_flags::PROC_C1
        | fadt_flags::PWR_BUTTON
        | fadt_flags::SLP_BUTTON
        | fadt_flags::FIX_RTC
        | fadt_flags::TMR_VAL_EXT
        | fadt_flags::RESET_REG_SUP;
    put(out, f + 112, &flags.to_le_bytes());
    put(out, f + 116, &gas_io(cfg.reset_port, 8, 1)); // RESET_REG
    put(out, f + 128, &[cfg.reset_value]); // RESET_VALUE
    put(out, f + 131, &[5]); // FADT Minor Version
    put(out, f + 132, &gpa(facs).to_le_bytes()); // X_FIRMWARE_CTRL
    put(out, f + 140, &gpa(dsdt).to_le_bytes()); // X_DSDT
    put(out, f + 148, &gas_io(cfg.pm1a_evt, 32, 2)); // X_PM1a_EVT_BLK (word registers)
    put(out, f + 172, &gas_io(cfg.pm1a_cnt, 16, 2)); // X_PM1a_CNT_BLK
    put(out, f + 208, &gas_io(cfg.pm_tmr, 32, 3)); // X_PM_TMR_BLK
    put(out, f + 268, b"HVRUSTHV"); // Hypervisor Vendor Identity
    header(out, fadt, b"FACP", FADT_LEN, 6);

    // DSDT (§5.2.11.1): revision 2 (64-bit integers), the AML above.
    put(out, dsdt + HEADER, &DSDT_AML);
    header(out, dsdt, b"DSDT", dsdt_len, 2);

    // MADT (§5.2.12, Table 5.19): local APIC address, flags PCAT_COMPAT (8259s present).
    let m = madt;
    put(out, m + 36, &cfg.lapic_addr.to_le_bytes());
    put(out, m + 40, &1u32.to_le_bytes());
    let mut at = m + 44;
    for id in 0..cfg.vcpus {
        if id < 255 {
            // Processor Local APIC (§5.2.12.2): type 0, length 8,
            // UID, APIC id, flags Enabled. IDs up to 254 (255 is the broadcast id).
            put(out, at, &[0, 8, id as u8, id as u8]);
            put(out, at + 4, &1u32.to_le_bytes());
            at += 8;
        } else {
            // Processor Local x2APIC (§5.2.12.12): type 9, length 16,
            // reserved, x2APIC id, flags Enabled, UID.
            put(out, at, &[9, 16, 0, 0]);
            put(out, at + 4, &id.to_le_bytes());
            put(out, at + 8, &1u32.to_le_bytes());
            put(out, at + 12, &id.to_le_bytes());
            at += 16;
        }
    }
    // I/O APIC (§5.2.12.3): type 1, length 12, id, reserved, address, GSI base 0.
    put(out, at, &[1, 12, cfg.ioapic_id, 0]);
    put(out, at + 4, &cfg.ioapic_addr.to_le_bytes());
    put(out, at + 8, &0u32.to_le_bytes());
    at += 12;
    // Interrupt Source Overrides (§5.2.12.5): type 2, length 10, bus 0 (ISA),
    // source IRQ, GSI, MPS INTI flags (polarity bits 1:0, trigger bits 3:2).
    // IRQ0 (PIT) -> GSI 2, conforming flags, as on every PC.
    put(out, at, &[2, 10, 0, 0]);
    put(out, at + 4, &2u32.to_le_bytes());
    put(out, at + 8, &0u16.to_le_bytes());
    at += 10;
    // The SCI: level-triggered (11), active-high (01) = 0x000d.
    put(out, at, &[2, 10, 0, cfg.sci_irq]);
    put(out, at + 4, &u32::from(cfg.sci_irq).to_le_bytes());
    put(out, at + 8, &0x000du16.to_le_bytes());
    at += 10;
    // Local APIC NMI (§5.2.12.7): type 4, length 6, all processors (0xff),
    // flags conforming, LINT1.
    put(out, at, &[4, 6, 0xff, 0, 0, 1]);
    at += 6;
    if cfg.vcpus > 255 {
        // Local x2APIC NMI (§5.2.12.13): type 0x0a, length 12, flags,
        // all processors (UID 0xffffffff), LINT1, reserved.
        put(out, at, &[0x0a, 12, 0, 0]);
        put(out, at + 4, &u32::MAX.to_le_bytes());
        put(out, at + 8, &[1, 0, 0, 0]);
        at += 12;
    }
    debug_assert_eq!(at, madt + madt_len);
    header(out, madt, b"APIC", madt_len, 5);

    Ok(AcpiTables {
        rsdp_gpa: base_gpa,
        xsdt_gpa: gpa(xsdt),
        fadt_gpa: gpa(fadt),
        facs_gpa: gpa(facs),
        dsdt_gpa: gpa(dsdt),
        madt_gpa: gpa(madt),
        bytes: needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::acpi::madt::{Madt, MadtEntry};
    use ::acpi::{AcpiHandler, PhysicalMapping};
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use core::ptr::NonNull;

    /// Maps guest-physical addresses into a buffer placed at `base`.
    #[derive(Clone, Debug)]
    struct BufHandler {
        base: u64,
        ptr: *const u8,
        len: usize,
    }

    impl AcpiHandler for BufHandler {
        unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
            let off = (phys as u64).checked_sub(self.base).expect("below the tables") as usize;
            assert!(off + size <= self.len, "mapping {phys:#x}+{size:#x} outside the tables");
            // SAFETY: off + size lies inside the buffer (checked above), which outlives
            // the AcpiTables in every test.
            let virt = unsafe { NonNull::new(self.ptr.add(off) as *mut T).unwrap() };
            // SAFETY: the region is mapped (it is our buffer) for `size` bytes.
            unsafe { PhysicalMapping::new(phys, virt, size, size, self.clone()) }
        }
        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    const BASE: u64 = crate::firmware::ACPI_GPA;

    fn built(cfg: &AcpiConfig) -> (AcpiTables, Vec<u8>) {
        let mut buf = alloc::vec![0xaau8; crate::firmware::ACPI_BYTES as usize];
        let t = build(cfg, BASE, &mut buf).unwrap();
        buf.truncate(t.bytes);
        (t, buf)
    }

    /// Check a table's own length field and checksum by hand, return its bytes.
    fn table<'a>(buf: &'a [u8], gpa: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (gpa - BASE) as usize;
        assert_eq!(&buf[off..off + 4], sig);
        let len = u32_at(buf, off + 4) as usize;
        let t = &buf[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", core::str::from_utf8(sig).unwrap());
        t
    }

    #[test]
    fn checksums_lengths_and_pointers_by_hand() {
        let (t, buf) = built(&AcpiConfig { vcpus: 4, ..AcpiConfig::default() });
        assert_eq!(t.rsdp_gpa, BASE);
        let rsdp = &buf[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum (first 20 bytes)");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!((rsdp[15], u32_at(rsdp, 20), u64_at(rsdp, 24)), (2, 36, t.xsdt_gpa));

        let xsdt = table(&buf, t.xsdt_gpa, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!((u64_at(xsdt, 36), u64_at(xsdt, 44)), (t.fadt_gpa, t.madt_gpa));

        let fadt = table(&buf, t.fadt_gpa, b"FACP");
        assert_eq!((fadt.len(), fadt[8], fadt[131]), (276, 6, 5), "length, revision 6.5");
        assert_eq!(u32_at(fadt, 36), t.facs_gpa as u32);
        assert_eq!(u64_at(fadt, 132), t.facs_gpa);
        assert_eq!(u32_at(fadt, 40), t.dsdt_gpa as u32);
        assert_eq!(u64_at(fadt, 140), t.dsdt_gpa);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!((u32_at(fadt, 56), u32_at(fadt, 64), u32_at(fadt, 76)), (0x600, 0x604, 0x608));
        assert_eq!(fadt[88..92], [4, 2, 0, 4]);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & fadt_flags::TMR_VAL_EXT, 0);
        assert_ne!(flags & fadt_flags::RESET_REG_SUP, 0);
        assert_eq!(flags & fadt_flags::HW_REDUCED_ACPI, 0);
        let arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(arch & (boot_arch::I8042 | boot_arch::VGA_NOT_PRESENT | boot_arch::CMOS_RTC_NOT_PRESENT), 0);
        assert_eq!(fadt[116..128], [1, 8, 0, 1, 0x0c, 0x06, 0, 0, 0, 0, 0, 0], "RESET_REG: I/O 0x60c");
        assert_eq!(fadt[128], 0x0f, "RESET_VALUE");

        let facs_off = (t.facs_gpa - BASE) as usize;
        assert_eq!(&buf[facs_off..facs_off + 4], b"FACS");
        assert_eq!(t.facs_gpa % 64, 0, "FACS is 64-byte aligned");

        let dsdt = table(&buf, t.dsdt_gpa, b"DSDT");
        assert_eq!(&dsdt[36..], &DSDT_AML);

        let madt = table(&buf, t.madt_gpa, b"APIC");
        assert_eq!(madt.len(), madt_len(4));
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        // Walk the entries: each length is right and they end exactly at the table's end.
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert_eq!(len, [8, 12, 10, 0, 6][kind as usize]);
            kinds.push(kind);
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(kinds, [0, 0, 0, 0, 1, 2, 2, 4]);
    }

    #[test]
    fn the_acpi_crate_reads_them_back() {
        let (t, buf) = built(&AcpiConfig { vcpus: 3, ioapic_id: 5, ..AcpiConfig::default() });
        let handler = BufHandler { base: BASE, ptr: buf.as_ptr(), len: buf.len() };
        // SAFETY: the RSDP is at BASE, inside the buffer the handler maps.
        let tables = unsafe { ::acpi::AcpiTables::from_rsdp(handler, t.rsdp_gpa as usize) }.expect("RSDP and XSDT");
        assert_eq!(tables.revision(), 2);

        let fadt = tables.find_table::<::acpi::fadt::Fadt>().expect("FADT");
        fadt.validate().expect("FADT checksum");
        assert_eq!(fadt.dsdt_address().unwrap(), t.dsdt_gpa as usize);
        assert_eq!(fadt.facs_address().unwrap(), t.facs_gpa as usize);
        let tmr = fadt.pm_timer_block().unwrap().expect("a PM timer");
        assert_eq!((tmr.address, tmr.bit_width), (0x608, 32));
        assert_eq!(tmr.address_space, ::acpi::address::AddressSpace::SystemIo);
        assert!({ fadt.flags }.pm_timer_is_32_bit());
        assert!({ fadt.flags }.supports_system_reset_via_fadt());
        assert_eq!(fadt.pm1a_event_block().unwrap().address, 0x600);
        assert_eq!(fadt.pm1a_control_block().unwrap().address, 0x604);
        assert_eq!(fadt.reset_register().unwrap().address, 0x60c);
        drop(fadt);

        let dsdt = tables.dsdt().expect("DSDT");
        assert_eq!(dsdt.address, t.dsdt_gpa as usize + 36);
        assert_eq!(dsdt.length as usize, DSDT_AML.len());

        let madt = tables.find_table::<Madt>().expect("MADT");
        let mut cpus = Vec::new();
        let (mut ioapics, mut overrides, mut nmis) = (Vec::new(), Vec::new(), Vec::new());
        for e in madt.get().entries() {
            match e {
                MadtEntry::LocalApic(l) => cpus.push((l.processor_id, l.apic_id, { l.flags })),
                MadtEntry::IoApic(i) => {
                    ioapics.push((i.io_apic_id, { i.io_apic_address }, { i.global_system_interrupt_base }))
                }
                MadtEntry::InterruptSourceOverride(o) => {
                    overrides.push((o.irq, { o.global_system_interrupt }, { o.flags }))
                }
                MadtEntry::LocalApicNmi(n) => nmis.push((n.processor_id, n.nmi_line)),
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        assert!(madt.get().supports_8259());
        assert_eq!(cpus, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, [(5, 0xfec0_0000, 0)]);
        assert_eq!(overrides, [(0, 2, 0), (9, 9, 0xd)]);
        assert_eq!(nmis, [(0xff, 1)]);
    }

    #[test]
    fn x2apic_entries_past_254() {
        let (t, buf) = built(&AcpiConfig { vcpus: 300, ..AcpiConfig::default() });
        let madt = table(&buf, t.madt_gpa, b"APIC");
        let handler = BufHandler { base: BASE, ptr: buf.as_ptr(), len: buf.len() };
        // SAFETY: as above.
        let tables = unsafe { ::acpi::AcpiTables::from_rsdp(handler, t.rsdp_gpa as usize) }.unwrap();
        let m = tables.find_table::<Madt>().unwrap();
        let (mut lapic, mut x2, mut x2nmi) = (0, Vec::new(), 0);
        for e in m.get().entries() {
            match e {
                MadtEntry::LocalApic(l) => {
                    assert!(l.apic_id < 255);
                    lapic += 1
                }
                MadtEntry::LocalX2Apic(x) => x2.push(x.x2apic_id),
                MadtEntry::X2ApicNmi(_) => x2nmi += 1,
                _ => {}
            }
        }
        assert_eq!((lapic, x2.len(), x2nmi), (255, 45, 1));
        assert_eq!(x2.first(), Some(&255));
        assert_eq!(x2.last(), Some(&299));
        assert_eq!(madt.len(), madt_len(300));
    }

    #[test]
    fn refusals_say_why() {
        let mut small = [0u8; 64];
        let e = build(&AcpiConfig::default(), BASE, &mut small).unwrap_err();
        assert!(matches!(e, AcpiError::BufferTooSmall { have: 64, .. }), "{e}");
        let mut buf = alloc::vec![0u8; 4096];
        assert_eq!(
            build(&AcpiConfig::default(), BASE + 8, &mut buf),
            Err(AcpiError::Misaligned { base_gpa: BASE + 8 })
        );
        let e = build(&AcpiConfig { vcpus: 0, ..AcpiConfig::default() }, BASE, &mut buf).unwrap_err();
        assert_eq!(e.to_string(), "0 vCPUs cannot be described: 1 to 1024 are");
        let e = build(&AcpiConfig::default(), 0xffff_ff00, &mut buf).unwrap_err();
        assert_eq!(e, AcpiError::Above4G { base_gpa: 0xffff_ff00 });
        let e = build(&AcpiConfig { sci_irq: 2, ..AcpiConfig::default() }, BASE, &mut buf).unwrap_err();
        assert_eq!(e, AcpiError::SciIrq { irq: 2 });
        // Everything up to 1024 vCPUs fits the region the layout reserves.
        let mut region = alloc::vec![0u8; crate::firmware::ACPI_BYTES as usize];
        let t = build(&AcpiConfig { vcpus: MAX_VCPUS, ..AcpiConfig::default() }, BASE, &mut region).unwrap();
        assert!(t.bytes <= region.len());
    }

    #[test]
    fn s5_aml_decodes_as_documented() {
        // NameOp, NameSeg, then a package whose PkgLength covers exactly the rest.
        assert_eq!(DSDT_AML[0], 0x08);
        assert_eq!(&DSDT_AML[1..5], b"_S5_");
        assert_eq!(DSDT_AML[5], 0x12);
        assert_eq!(DSDT_AML[6] as usize, DSDT_AML.len() - 6, "PkgLength counts itself and what follows");
        assert_eq!(DSDT_AML[7], 2);
        assert_eq!((DSDT_AML[8], DSDT_AML[9]), (0x0a, S5_SLP_TYP));
        assert_eq!(DSDT_AML[10], 0x00);
    }
}
