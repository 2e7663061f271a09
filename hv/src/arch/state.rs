//! A paused vCPU's architectural state in an arch-neutral form, for live migration.
//!
//! [`VcpuSnapshot`] is what [`Vcpu::save_state`](super::Vcpu::save_state) reads out of a
//! VMCS or VMCB and [`Vcpu::load_state`](super::Vcpu::load_state) writes into a fresh
//! vCPU, possibly of the other backend (a guest saved under SVM can be loaded under VMX
//! and the other way round). [`VcpuSnapshot::encode`] / [`VcpuSnapshot::decode`] turn it
//! into a fixed little-endian byte layout for the migration stream; decoding checks
//! the version, the length and every field with a restricted range, and never panics.
//!
//! Not in this snapshot (format version 1) but in records of their own in migration
//! stream version 2 (`domain::migrate`): the x87/SSE/AVX state and XCR0
//! (`arch::fpu`, record `VcpuFpu`), IA32_TSC (the TSC offset), IA32_TSC_AUX and the
//! MSRs the core keeps itself (MTRRs, MISC_ENABLE, MCG_STATUS, NB_CFG; record
//! `VcpuMsrs`), and the LAPIC with IA32_APIC_BASE (record `DeviceStates`).
//!
//! Conventions that make the form arch-neutral:
//! - Segment attributes are in the SVM VMCB "attrib" form (APM Vol. 2 15.5.1 /
//!   Appendix B): bits 7:0 = type, S, DPL, P (descriptor bits 40-47), bits 11:8 = AVL, L,
//!   D/B, G (descriptor bits 52-55). VMX access rights (SDM Vol. 3C 25.4.1, Table 25-2)
//!   keep AVL..G in bits 15:12 and have an "unusable" bit 16: see [`vmx_ar_to_canonical`]
//!   and [`canonical_to_vmx_ar`]. An unusable segment is a segment with P = 0.
//! - SS's DPL is the CPL (as on VMX, SDM 25.4.1; the SVM backend stores its VMCB CPL
//!   field there), even when SS is unusable.
//! - CR0/CR4/EFER are what the guest sees: no EFER.SVME (which SVM requires set in the
//!   VMCB), no CR4.VMXE (which VMX forces on under the CR4 read shadow).
//! - `interruptibility` uses the VMX guest interruptibility-state bits (SDM 25.4.2,
//!   Table 25-3): bit 0 blocking by STI, bit 1 blocking by MOV SS, bit 3 blocking by NMI.
//!   SVM has one interrupt-shadow bit (VMCB offset 0x068 bit 0) and keeps NMI blocking
//!   invisible, see the SVM backend.
//! - `pending_event` is an event injected (or whose delivery was interrupted by a VM
//!   exit) and not yet delivered; `kind` is the SVM EVENTINJ type (APM 15.20), which
//!   for 0, 2, 3 and 4 equals the VMX interruption type (SDM 25.8.3).

use alloc::vec::Vec;

use super::GuestRegs;

/// Format version written first in every encoding.
pub const FORMAT_VERSION: u16 = 1;

/// Length in bytes of an encoded [`VcpuSnapshot`] (header included).
pub const ENCODED_LEN: usize = 4 // version, length
    + 15 * 8 // GPRs
    + 3 * 8 // RSP, RIP, RFLAGS
    + 8 * 8 // CR0, CR2, CR3, CR4, EFER, DR6, DR7, PAT
    + 8 * 16 // CS, DS, ES, FS, GS, SS, TR, LDTR
    + 2 * 10 // GDTR, IDTR
    + 8 * 8 // SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE
    + 4 // interruptibility
    + 7; // pending event: flags, vector, kind, error code

/// Interruptibility: blocking by STI (SDM Table 25-3 bit 0).
pub const BLOCKING_BY_STI: u32 = 1 << 0;
/// Interruptibility: blocking by MOV SS / POP SS (bit 1).
pub const BLOCKING_BY_MOV_SS: u32 = 1 << 1;
/// Interruptibility: blocking by NMI (bit 3).
pub const BLOCKING_BY_NMI: u32 = 1 << 3;
/// The interruptibility bits the format carries.
pub const INTERRUPTIBILITY_BITS: u32 = BLOCKING_BY_STI | BLOCKING_BY_MOV_SS | BLOCKING_BY_NMI;

/// Pending event kind: external (maskable) interrupt.
pub const EVENT_EXTERNAL_INTERRUPT: u8 = 0;
/// Pending event kind: NMI (vector 2).
pub const EVENT_NMI: u8 = 2;
/// Pending event kind: hardware exception (vector 0-31).
pub const EVENT_EXCEPTION: u8 = 3;
/// Pending event kind: software interrupt (INT n); RIP is the return address.
pub const EVENT_SOFTWARE_INTERRUPT: u8 = 4;

/// Canonical attribute bit 7: present.
pub const ATTR_PRESENT: u16 = 1 << 7;
/// Canonical attribute bits 6:5: DPL.
pub const ATTR_DPL: u16 = 3 << 5;
/// VMX access rights bit 16: segment unusable (SDM 25.4.1).
pub const VMX_AR_UNUSABLE: u32 = 1 << 16;

/// One segment register, hidden part included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentRegister {
    /// Selector.
    pub selector: u16,
    /// Attributes in the canonical (VMCB) 12-bit form.
    pub attributes: u16,
    /// Limit in bytes (granularity already applied, as both VMCS and VMCB hold it).
    pub limit: u32,
    /// Base address.
    pub base: u64,
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// An event injected but not yet delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingEvent {
    /// Vector.
    pub vector: u8,
    /// [`EVENT_EXTERNAL_INTERRUPT`], [`EVENT_NMI`], [`EVENT_EXCEPTION`] or
    /// [`EVENT_SOFTWARE_INTERRUPT`].
    pub kind: u8,
    /// Error code pushed with the event (exceptions only).
    pub error_code: Option<u32>,
}

impl PendingEvent {
    /// The low 32 bits shared by SVM EVENTINJ/EXITINTINFO (APM 15.20) and VMX
    /// VM-entry / IDT-vectoring interruption information (SDM 25.8.3, 25.9.3):
    /// vector in 7:0, type in 10:8, error code valid in 11, valid in 31.
    pub fn to_interruption_info(&self) -> u32 {
        let ev = if self.error_code.is_some() { 1 << 11 } else { 0 };
        u32::from(self.vector) | (u32::from(self.kind & 7) << 8) | ev | (1 << 31)
    }

    /// Whether an event whose delivery a #VMEXIT interrupted (SVM EXITINTINFO, APM
    /// Vol. 2 15.7.2; VMX IDT-vectoring information, SDM Vol. 3C 28.2.4) must be
    /// delivered again at the next entry: external interrupts, NMIs and hardware
    /// exceptions would otherwise be lost (an interrupt the LAPIC already moved to
    /// in-service would never be EOIed). Software interrupts and INT3/INTO (SVM type 3,
    /// vectors 3 and 4) are not: RIP still points at the instruction, which raises them
    /// again.
    pub fn redelivered_after_exit(&self) -> bool {
        matches!(self.kind, EVENT_EXTERNAL_INTERRUPT | EVENT_NMI)
            || (self.kind == EVENT_EXCEPTION && !matches!(self.vector, 3 | 4))
    }

    /// Whether `kind` is one of the four kinds a snapshot carries.
    pub fn kind_is_known(&self) -> bool {
        matches!(self.kind, EVENT_EXTERNAL_INTERRUPT | EVENT_NMI | EVENT_EXCEPTION | EVENT_SOFTWARE_INTERRUPT)
    }

    /// The inverse of [`Self::to_interruption_info`]: `None` unless the valid bit is
    /// set. `kind` is the raw 3-bit type; callers refuse the types they cannot carry.
    pub fn from_interruption_info(info: u32, error_code: u32) -> Option<Self> {
        if info & (1 << 31) == 0 {
            return None;
        }
        Some(Self {
            vector: info as u8,
            kind: ((info >> 8) & 7) as u8,
            error_code: (info & (1 << 11) != 0).then_some(error_code),
        })
    }

    fn check(&self) -> Result<(), SnapshotError> {
        match self.kind {
            EVENT_EXTERNAL_INTERRUPT | EVENT_SOFTWARE_INTERRUPT if self.error_code.is_some() => {
                Err(SnapshotError::InvalidField("pending event: only exceptions carry an error code"))
            }
            EVENT_EXTERNAL_INTERRUPT | EVENT_SOFTWARE_INTERRUPT => Ok(()),
            EVENT_NMI if self.vector != 2 || self.error_code.is_some() => {
                Err(SnapshotError::InvalidField("pending event: an NMI has vector 2 and no error code"))
            }
            EVENT_NMI => Ok(()),
            EVENT_EXCEPTION if self.vector >= 32 => {
                Err(SnapshotError::InvalidField("pending event: exception vector above 31"))
            }
            EVENT_EXCEPTION => Ok(()),
            _ => Err(SnapshotError::InvalidField("pending event: unknown kind")),
        }
    }
}

/// A paused vCPU's architectural state (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VcpuSnapshot {
    /// RAX..R15 (without RSP).
    pub regs: GuestRegs,
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest sees it (no VMXE).
    pub cr4: u64,
    /// IA32_EFER as the guest sees it (no SVME).
    pub efer: u64,
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// CS.
    pub cs: SegmentRegister,
    /// DS.
    pub ds: SegmentRegister,
    /// ES.
    pub es: SegmentRegister,
    /// FS.
    pub fs: SegmentRegister,
    /// GS.
    pub gs: SegmentRegister,
    /// SS (its DPL is the CPL).
    pub ss: SegmentRegister,
    /// TR.
    pub tr: SegmentRegister,
    /// LDTR.
    pub ldtr: SegmentRegister,
    /// GDTR.
    pub gdtr: DescriptorTable,
    /// IDTR.
    pub idtr: DescriptorTable,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK (IA32_FMASK).
    pub sfmask: u64,
    /// KERNEL_GS_BASE (the value SWAPGS exchanges with GS.base).
    pub kernel_gs_base: u64,
    /// Blocking state: [`BLOCKING_BY_STI`], [`BLOCKING_BY_MOV_SS`], [`BLOCKING_BY_NMI`].
    pub interruptibility: u32,
    /// An event injected but not yet delivered.
    pub pending_event: Option<PendingEvent>,
}

/// Why bytes are not a [`VcpuSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// Too short to hold even the version and length.
    Truncated {
        /// Bytes given.
        len: usize,
    },
    /// A format version this code does not read.
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// The declared or actual length is not the one version 1 has.
    LengthMismatch {
        /// Length field in the header.
        declared: u16,
        /// Bytes given.
        actual: usize,
    },
    /// A field holds a value the format does not allow.
    InvalidField(&'static str),
}

impl core::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SnapshotError::Truncated { len } => {
                write!(f, "vCPU snapshot truncated: {len} bytes, not even the 4-byte header")
            }
            SnapshotError::UnsupportedVersion { version } => {
                write!(f, "vCPU snapshot format version {version} is not supported (this build reads {FORMAT_VERSION})")
            }
            SnapshotError::LengthMismatch { declared, actual } => write!(
                f,
                "vCPU snapshot length mismatch: header says {declared} bytes, got {actual}, version {FORMAT_VERSION} has {ENCODED_LEN}"
            ),
            SnapshotError::InvalidField(what) => write!(f, "vCPU snapshot invalid: {what}"),
        }
    }
}

/// VMX access rights (SDM Vol. 3C 25.4.1, Table 25-2) to the canonical attributes:
/// bits 7:0 stay, bits 15:12 (AVL, L, D/B, G) move to 11:8. An unusable segment
/// (bit 16) becomes 0, which has P = 0.
pub fn vmx_ar_to_canonical(ar: u32) -> u16 {
    if ar & VMX_AR_UNUSABLE != 0 {
        return 0;
    }
    ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16
}

/// Canonical attributes to VMX access rights: bits 11:8 move to 15:12; a segment with
/// P = 0 is marked unusable (bit 16). CS and TR are never unusable on VMX: the
/// backend clears bit 16 for them.
pub fn canonical_to_vmx_ar(attr: u16) -> u32 {
    let attr = u32::from(attr);
    let ar = (attr & 0xff) | ((attr & 0xf00) << 4);
    if attr & u32::from(ATTR_PRESENT) == 0 { ar | VMX_AR_UNUSABLE } else { ar }
}

/// Appends little-endian values.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn segment(&mut self, s: &SegmentRegister) {
        self.u16(s.selector);
        self.u16(s.attributes);
        self.u32(s.limit);
        self.u64(s.base);
    }
    fn table(&mut self, t: &DescriptorTable) {
        self.u64(t.base);
        self.u16(t.limit);
    }
}

/// Takes little-endian values off the front; running out is an error, never a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let (head, rest) =
            self.0.split_first_chunk::<N>().ok_or(SnapshotError::InvalidField("ran out of bytes inside a field"))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(u8::from_le_bytes(self.take()?))
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn segment(&mut self) -> Result<SegmentRegister, SnapshotError> {
        let selector = self.u16()?;
        let attributes = self.u16()?;
        if attributes & !0xfff != 0 {
            return Err(SnapshotError::InvalidField("segment attributes above bit 11"));
        }
        Ok(SegmentRegister { selector, attributes, limit: self.u32()?, base: self.u64()? })
    }
    fn table(&mut self) -> Result<DescriptorTable, SnapshotError> {
        Ok(DescriptorTable { base: self.u64()?, limit: self.u16()? })
    }
}

// Pending-event flags byte.
const PENDING_PRESENT: u8 = 1 << 0;
const PENDING_ERROR_CODE: u8 = 1 << 1;

impl VcpuSnapshot {
    /// The version-1 encoding: [`ENCODED_LEN`] bytes, little-endian, fields in the
    /// order of the struct (GPRs in [`GuestRegs`] order; a segment is selector u16,
    /// attributes u16, limit u32, base u64; a table is base u64, limit u16; the
    /// pending event is flags u8 (bit 0 present, bit 1 error code), vector u8, kind
    /// u8, error code u32, all zero when absent).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(ENCODED_LEN));
        w.u16(FORMAT_VERSION);
        w.u16(ENCODED_LEN as u16);
        let r = &self.regs;
        for v in [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
        {
            w.u64(v);
        }
        for v in [
            self.rsp,
            self.rip,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            self.dr6,
            self.dr7,
            self.pat,
        ] {
            w.u64(v);
        }
        for s in [&self.cs, &self.ds, &self.es, &self.fs, &self.gs, &self.ss, &self.tr, &self.ldtr] {
            w.segment(s);
        }
        w.table(&self.gdtr);
        w.table(&self.idtr);
        for v in [
            self.sysenter_cs,
            self.sysenter_esp,
            self.sysenter_eip,
            self.star,
            self.lstar,
            self.cstar,
            self.sfmask,
            self.kernel_gs_base,
        ] {
            w.u64(v);
        }
        w.u32(self.interruptibility);
        match &self.pending_event {
            Some(e) => {
                w.u8(PENDING_PRESENT | if e.error_code.is_some() { PENDING_ERROR_CODE } else { 0 });
                w.u8(e.vector);
                w.u8(e.kind);
                w.u32(e.error_code.unwrap_or(0));
            }
            None => {
                w.u8(0);
                w.u8(0);
                w.u8(0);
                w.u32(0);
            }
        }
        debug_assert_eq!(w.0.len(), ENCODED_LEN);
        w.0
    }

    /// Parse a version-1 encoding. Refuses another version, a length other than
    /// [`ENCODED_LEN`] (declared or actual), attributes above bit 11, unknown
    /// interruptibility bits and malformed pending events.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Reader(bytes);
        let (Ok(version), Ok(declared)) = (r.u16(), r.u16()) else {
            return Err(SnapshotError::Truncated { len: bytes.len() });
        };
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion { version });
        }
        if usize::from(declared) != ENCODED_LEN || bytes.len() != ENCODED_LEN {
            return Err(SnapshotError::LengthMismatch { declared, actual: bytes.len() });
        }
        let regs = GuestRegs {
            rax: r.u64()?,
            rbx: r.u64()?,
            rcx: r.u64()?,
            rdx: r.u64()?,
            rsi: r.u64()?,
            rdi: r.u64()?,
            rbp: r.u64()?,
            r8: r.u64()?,
            r9: r.u64()?,
            r10: r.u64()?,
            r11: r.u64()?,
            r12: r.u64()?,
            r13: r.u64()?,
            r14: r.u64()?,
            r15: r.u64()?,
        };
        let mut s = VcpuSnapshot {
            regs,
            rsp: r.u64()?,
            rip: r.u64()?,
            rflags: r.u64()?,
            cr0: r.u64()?,
            cr2: r.u64()?,
            cr3: r.u64()?,
            cr4: r.u64()?,
            efer: r.u64()?,
            dr6: r.u64()?,
            dr7: r.u64()?,
            pat: r.u64()?,
            cs: r.segment()?,
            ds: r.segment()?,
            es: r.segment()?,
            fs: r.segment()?,
            gs: r.segment()?,
            ss: r.segment()?,
            tr: r.segment()?,
            ldtr: r.segment()?,
            gdtr: r.table()?,
            idtr: r.table()?,
            sysenter_cs: r.u64()?,
            sysenter_esp: r.u64()?,
            sysenter_eip: r.u64()?,
            star: r.u64()?,
            lstar: r.u64()?,
            cstar: r.u64()?,
            sfmask: r.u64()?,
            kernel_gs_base: r.u64()?,
            interruptibility: r.u32()?,
            pending_event: None,
        };
        if s.interruptibility & !INTERRUPTIBILITY_BITS != 0 {
            return Err(SnapshotError::InvalidField("interruptibility: unknown blocking bits"));
        }
        let (flags, vector, kind, error_code) = (r.u8()?, r.u8()?, r.u8()?, r.u32()?);
        s.pending_event = match flags {
            0 if vector == 0 && kind == 0 && error_code == 0 => None,
            0 => return Err(SnapshotError::InvalidField("pending event: fields set but not present")),
            PENDING_PRESENT if error_code != 0 => {
                return Err(SnapshotError::InvalidField("pending event: error code set but not flagged"));
            }
            PENDING_PRESENT => Some(PendingEvent { vector, kind, error_code: None }),
            f if f == PENDING_PRESENT | PENDING_ERROR_CODE => {
                Some(PendingEvent { vector, kind, error_code: Some(error_code) })
            }
            _ => return Err(SnapshotError::InvalidField("pending event: unknown flags")),
        };
        if let Some(e) = &s.pending_event {
            e.check()?;
        }
        if !r.0.is_empty() {
            return Err(SnapshotError::LengthMismatch { declared, actual: bytes.len() });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn sample() -> VcpuSnapshot {
        let regs = GuestRegs { rax: 0x1111, rcx: 0xdead_beef_0000_0001, r15: u64::MAX, ..GuestRegs::default() };
        VcpuSnapshot {
            regs,
            rsp: 0x7000,
            rip: 0x40_1000,
            rflags: 0x202,
            cr0: 0x8001_0031,
            cr2: 0xffff_8000_0000_1234,
            cr3: 0x10_0000,
            cr4: 0x20,
            efer: 0x500,
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            pat: 0x0007_0406_0007_0406,
            cs: SegmentRegister { selector: 0x08, attributes: 0xa9b, limit: 0xffff_ffff, base: 0 },
            ds: SegmentRegister { selector: 0x10, attributes: 0xc93, limit: 0xffff_ffff, base: 0 },
            es: SegmentRegister { selector: 0x10, attributes: 0xc93, limit: 0xffff_ffff, base: 0 },
            fs: SegmentRegister { selector: 0, attributes: 0, limit: 0, base: 0x1234_5678 },
            gs: SegmentRegister { selector: 0x10, attributes: 0xc93, limit: 0xffff_ffff, base: 0xffff_8800_0000_0000 },
            ss: SegmentRegister { selector: 0x10, attributes: 0xc93, limit: 0xffff_ffff, base: 0 },
            tr: SegmentRegister { selector: 0x18, attributes: 0x8b, limit: 0x67, base: 0x5000 },
            ldtr: SegmentRegister { selector: 0, attributes: 0x82, limit: 0, base: 0 },
            gdtr: DescriptorTable { base: 0x6000, limit: 0x27 },
            idtr: DescriptorTable { base: 0x6100, limit: 0xfff },
            sysenter_cs: 8,
            sysenter_esp: 0x9000,
            sysenter_eip: 0x9100,
            star: 0x0023_0010_0000_0000,
            lstar: 0xffff_ffff_8100_0000,
            cstar: 0xffff_ffff_8100_0100,
            sfmask: 0x4700,
            kernel_gs_base: 0xffff_8880_0000_0000,
            interruptibility: BLOCKING_BY_STI,
            pending_event: Some(PendingEvent { vector: 14, kind: EVENT_EXCEPTION, error_code: Some(2) }),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(&bytes[..4], &[1, 0, ENCODED_LEN as u8, (ENCODED_LEN >> 8) as u8]);
        assert_eq!(VcpuSnapshot::decode(&bytes), Ok(s.clone()));

        let mut none = s.clone();
        none.pending_event = None;
        assert_eq!(VcpuSnapshot::decode(&none.encode()), Ok(none));
        let mut nmi = s;
        nmi.pending_event = Some(PendingEvent { vector: 2, kind: EVENT_NMI, error_code: None });
        assert_eq!(VcpuSnapshot::decode(&nmi.encode()), Ok(nmi));
        let default = VcpuSnapshot::default();
        assert_eq!(VcpuSnapshot::decode(&default.encode()), Ok(default));
    }

    #[test]
    fn truncated_input_at_every_length_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(VcpuSnapshot::decode(&bytes[..n]).is_err(), "{n} bytes accepted");
        }
        assert_eq!(VcpuSnapshot::decode(&bytes[..3]), Err(SnapshotError::Truncated { len: 3 }));
        assert_eq!(
            VcpuSnapshot::decode(&bytes[..100]),
            Err(SnapshotError::LengthMismatch { declared: ENCODED_LEN as u16, actual: 100 })
        );
    }

    #[test]
    fn long_input_is_refused() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(VcpuSnapshot::decode(&bytes), Err(SnapshotError::LengthMismatch { .. })));
        // Header claiming the longer length does not help either.
        let n = bytes.len() as u16;
        bytes[2..4].copy_from_slice(&n.to_le_bytes());
        assert!(matches!(VcpuSnapshot::decode(&bytes), Err(SnapshotError::LengthMismatch { .. })));
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut bytes = sample().encode();
        bytes[0] = 2;
        assert_eq!(VcpuSnapshot::decode(&bytes), Err(SnapshotError::UnsupportedVersion { version: 2 }));
        bytes[0] = 0;
        assert_eq!(VcpuSnapshot::decode(&bytes), Err(SnapshotError::UnsupportedVersion { version: 0 }));
    }

    #[test]
    fn malformed_fields_are_refused() {
        let good = sample().encode();
        // Offsets: pending-event flags byte is 7 bytes from the end, interruptibility
        // 4 bytes before it, CS attributes right after the 11 u64 after the GPRs.
        let flags = ENCODED_LEN - 7;
        let cases: &[(usize, u8)] = &[
            (flags, 0x4),                    // unknown flag
            (flags, 0x0),                    // absent but vector/kind/error code set
            (flags + 2, 9),                  // unknown kind
            (flags - 4, 0x4),                // interruptibility bit 2 (SMI) not carried
            (4 + 15 * 8 + 11 * 8 + 3, 0x1a), // CS attributes bit 12
        ];
        for &(at, value) in cases {
            let mut b = good.clone();
            b[at] = value;
            assert!(
                matches!(VcpuSnapshot::decode(&b), Err(SnapshotError::InvalidField(_))),
                "byte {at} = {value:#x} accepted"
            );
        }
        let mut nmi = sample();
        nmi.pending_event = Some(PendingEvent { vector: 3, kind: EVENT_NMI, error_code: None });
        assert!(VcpuSnapshot::decode(&nmi.encode()).is_err());
        let mut exc = sample();
        exc.pending_event = Some(PendingEvent { vector: 32, kind: EVENT_EXCEPTION, error_code: None });
        assert!(VcpuSnapshot::decode(&exc.encode()).is_err());
    }

    #[test]
    fn errors_read_as_sentences() {
        let e = VcpuSnapshot::decode(&[2, 0, 0, 0]).unwrap_err();
        assert_eq!(e.to_string(), "vCPU snapshot format version 2 is not supported (this build reads 1)");
        assert!(SnapshotError::Truncated { len: 1 }.to_string().contains("truncated"));
    }

    #[test]
    fn vmx_access_rights_convert_both_ways() {
        // 64-bit code: type 0xB, S, DPL 0, P; L and G.
        assert_eq!(vmx_ar_to_canonical(0xa09b), 0xa9b);
        assert_eq!(canonical_to_vmx_ar(0xa9b), 0xa09b);
        // Flat data: type 3, S, P; D/B and G.
        assert_eq!(vmx_ar_to_canonical(0xc093), 0xc93);
        assert_eq!(canonical_to_vmx_ar(0xc93), 0xc093);
        // Busy 64-bit TSS (system segment, no high bits).
        assert_eq!(vmx_ar_to_canonical(0x8b), 0x8b);
        assert_eq!(canonical_to_vmx_ar(0x8b), 0x8b);
        // Unusable (whatever else is set) is canonical 0, and back.
        assert_eq!(vmx_ar_to_canonical(VMX_AR_UNUSABLE), 0);
        assert_eq!(vmx_ar_to_canonical(VMX_AR_UNUSABLE | 0xc093), 0);
        assert_eq!(canonical_to_vmx_ar(0), VMX_AR_UNUSABLE);
        // Not present, with a DPL (an unusable SS at CPL 3): unusable, DPL kept.
        assert_eq!(canonical_to_vmx_ar(0x60), VMX_AR_UNUSABLE | 0x60);
        // Every present canonical value survives the trip.
        for attr in (0..0x1000u16).filter(|a| a & ATTR_PRESENT != 0) {
            assert_eq!(vmx_ar_to_canonical(canonical_to_vmx_ar(attr)), attr);
        }
    }

    #[test]
    fn interruption_info_matches_both_manuals() {
        let pf = PendingEvent { vector: 14, kind: EVENT_EXCEPTION, error_code: Some(6) };
        assert_eq!(pf.to_interruption_info(), 0x8000_0b0e);
        assert_eq!(PendingEvent::from_interruption_info(0x8000_0b0e, 6), Some(pf));
        assert_eq!(PendingEvent::from_interruption_info(0x0000_0b0e, 6), None);
        let nmi = PendingEvent { vector: 2, kind: EVENT_NMI, error_code: None };
        assert_eq!(nmi.to_interruption_info(), 0x8000_0202);
        assert_eq!(PendingEvent::from_interruption_info(0x8000_0202, 0xffff), Some(nmi));
    }
}
