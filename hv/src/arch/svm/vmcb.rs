//! The VMCB (APM Vol. 2 Appendix B, "Layout of VMCB"): typed fields by offset.
//!
//! A field knows its offset, its width (through its Rust type) and its name, so the
//! code that fills a VMCB reads like the manual's table and cannot write a 64-bit value
//! into a 16-bit slot.

use core::marker::PhantomData;

/// A VMCB field of type `T` at a byte offset.
#[derive(Debug, Clone, Copy)]
pub struct Field<T> {
    /// Byte offset from the start of the VMCB.
    pub offset: usize,
    /// Name as in APM Appendix B.
    pub name: &'static str,
    _t: PhantomData<T>,
}

const fn f<T>(offset: usize, name: &'static str) -> Field<T> {
    Field { offset, name, _t: PhantomData }
}

/// Integer types a VMCB field can hold.
pub trait FieldValue: Copy {
    /// Width in bytes.
    const SIZE: usize;
    /// Little-endian bytes.
    fn to_bytes(self) -> [u8; 8];
    /// From little-endian bytes (first SIZE used).
    fn from_bytes(b: [u8; 8]) -> Self;
}

macro_rules! field_value {
    ($t:ty) => {
        impl FieldValue for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn to_bytes(self) -> [u8; 8] {
                let mut out = [0u8; 8];
                out[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
                out
            }
            fn from_bytes(b: [u8; 8]) -> Self {
                let mut v = [0u8; core::mem::size_of::<$t>()];
                v.copy_from_slice(&b[..Self::SIZE]);
                <$t>::from_le_bytes(v)
            }
        }
    };
}
field_value!(u8);
field_value!(u16);
field_value!(u32);
field_value!(u64);

/// A VMCB page viewed through typed fields.
#[derive(Debug)]
pub struct Vmcb<'a>(pub &'a mut [u8; 4096]);

impl Vmcb<'_> {
    /// Write a field.
    pub fn set<T: FieldValue>(&mut self, field: Field<T>, value: T) {
        self.0[field.offset..field.offset + T::SIZE].copy_from_slice(&value.to_bytes()[..T::SIZE]);
    }
    /// Read a field.
    pub fn get<T: FieldValue>(&self, field: Field<T>) -> T {
        let mut b = [0u8; 8];
        b[..T::SIZE].copy_from_slice(&self.0[field.offset..field.offset + T::SIZE]);
        T::from_bytes(b)
    }
    /// Write a segment register (selector, attributes, limit, base: 16 bytes each).
    pub fn set_segment(&mut self, seg: Segment, selector: u16, attrib: u16, limit: u32, base: u64) {
        let o = seg as usize;
        self.set(f::<u16>(o, "selector"), selector);
        self.set(f::<u16>(o + 2, "attrib"), attrib);
        self.set(f::<u32>(o + 4, "limit"), limit);
        self.set(f::<u64>(o + 8, "base"), base);
    }
    /// Read a segment register: (selector, attributes, limit, base).
    pub fn segment(&self, seg: Segment) -> (u16, u16, u32, u64) {
        let o = seg as usize;
        (
            self.get(f::<u16>(o, "selector")),
            self.get(f::<u16>(o + 2, "attrib")),
            self.get(f::<u32>(o + 4, "limit")),
            self.get(f::<u64>(o + 8, "base")),
        )
    }
}

/// Segment registers in the state-save area (offset of each 16-byte record).
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Segment {
    /// ES
    Es = 0x400,
    /// CS
    Cs = 0x410,
    /// SS
    Ss = 0x420,
    /// DS
    Ds = 0x430,
    /// FS
    Fs = 0x440,
    /// GS
    Gs = 0x450,
    /// GDTR (only base and limit are used)
    Gdtr = 0x460,
    /// LDTR
    Ldtr = 0x470,
    /// IDTR (only base and limit are used)
    Idtr = 0x480,
    /// TR
    Tr = 0x490,
}

// Control area (APM Vol. 2 Table B-1).
/// Intercept vector 0: exceptions (bit per vector).
pub const INTERCEPT_EXCEPTIONS: Field<u32> = f(0x008, "INTERCEPT_EXCEPTIONS");
/// Intercept vector 3: INTR..SHUTDOWN.
pub const INTERCEPT_MISC1: Field<u32> = f(0x00c, "INTERCEPT_MISC1");
/// Intercept vector 4: VMRUN..
pub const INTERCEPT_MISC2: Field<u32> = f(0x010, "INTERCEPT_MISC2");
/// Physical base of the I/O permission map (12 KiB).
pub const IOPM_BASE_PA: Field<u64> = f(0x040, "IOPM_BASE_PA");
/// Physical base of the MSR permission map (8 KiB).
pub const MSRPM_BASE_PA: Field<u64> = f(0x048, "MSRPM_BASE_PA");
/// TSC offset (15.30.5): added to the TSC for the guest's RDTSC/RDTSCP.
pub const TSC_OFFSET: Field<u64> = f(0x050, "TSC_OFFSET");
/// Guest ASID (must not be 0).
pub const GUEST_ASID: Field<u32> = f(0x058, "GUEST_ASID");
/// TLB control (1 = flush all on VMRUN).
pub const TLB_CONTROL: Field<u8> = f(0x05c, "TLB_CONTROL");
/// Virtual interrupt control (bit 24: V_INTR_MASKING).
pub const V_INTR: Field<u64> = f(0x060, "V_INTR");
/// Offset 0x068: bit 0 INTERRUPT_SHADOW (the guest is in an STI / MOV SS interrupt
/// shadow), bit 1 GUEST_INTERRUPT_MASK (the guest's RFLAGS.IF, written at #VMEXIT).
pub const INTERRUPT_SHADOW: Field<u64> = f(0x068, "INTERRUPT_SHADOW");
/// Exit code.
pub const EXITCODE: Field<u64> = f(0x070, "EXITCODE");
/// Exit information 1.
pub const EXITINFO1: Field<u64> = f(0x078, "EXITINFO1");
/// Exit information 2.
pub const EXITINFO2: Field<u64> = f(0x080, "EXITINFO2");
/// Event whose delivery a #VMEXIT interrupted (15.7.2; same layout as EVENTINJ).
pub const EXITINTINFO: Field<u64> = f(0x088, "EXITINTINFO");
/// Bit 0: enable nested paging.
pub const NP_ENABLE: Field<u64> = f(0x090, "NP_ENABLE");
/// Event injection (15.20).
pub const EVENTINJ: Field<u64> = f(0x0a8, "EVENTINJ");
/// Nested page table root.
pub const N_CR3: Field<u64> = f(0x0b0, "N_CR3");
/// VMCB clean bits (0 = everything reloaded).
pub const VMCB_CLEAN: Field<u32> = f(0x0c0, "VMCB_CLEAN");

// State-save area (APM Vol. 2 Table B-2).
/// Current privilege level.
pub const CPL: Field<u8> = f(0x4cb, "CPL");
/// Guest EFER.
pub const EFER: Field<u64> = f(0x4d0, "EFER");
/// Guest CR4.
pub const CR4: Field<u64> = f(0x548, "CR4");
/// Guest CR3.
pub const CR3: Field<u64> = f(0x550, "CR3");
/// Guest CR0.
pub const CR0: Field<u64> = f(0x558, "CR0");
/// Guest DR7.
pub const DR7: Field<u64> = f(0x560, "DR7");
/// Guest DR6.
pub const DR6: Field<u64> = f(0x568, "DR6");
/// Guest RFLAGS.
pub const RFLAGS: Field<u64> = f(0x570, "RFLAGS");
/// Guest RIP.
pub const RIP: Field<u64> = f(0x578, "RIP");
/// Guest RSP.
pub const RSP: Field<u64> = f(0x5d8, "RSP");
/// Guest RAX.
pub const RAX: Field<u64> = f(0x5f8, "RAX");
// 0x600-0x638 are loaded and saved by VMLOAD/VMSAVE only, not by VMRUN/#VMEXIT
// (15.5.2), like the FS, GS, TR and LDTR records.
/// Guest STAR.
pub const STAR: Field<u64> = f(0x600, "STAR");
/// Guest LSTAR.
pub const LSTAR: Field<u64> = f(0x608, "LSTAR");
/// Guest CSTAR.
pub const CSTAR: Field<u64> = f(0x610, "CSTAR");
/// Guest SFMASK.
pub const SFMASK: Field<u64> = f(0x618, "SFMASK");
/// Guest KernelGsBase.
pub const KERNEL_GS_BASE: Field<u64> = f(0x620, "KernelGsBase");
/// Guest SYSENTER_CS.
pub const SYSENTER_CS: Field<u64> = f(0x628, "SYSENTER_CS");
/// Guest SYSENTER_ESP.
pub const SYSENTER_ESP: Field<u64> = f(0x630, "SYSENTER_ESP");
/// Guest SYSENTER_EIP.
pub const SYSENTER_EIP: Field<u64> = f(0x638, "SYSENTER_EIP");
/// Guest CR2 (loaded by VMRUN, saved by #VMEXIT).
pub const CR2: Field<u64> = f(0x640, "CR2");
/// Guest PAT.
pub const G_PAT: Field<u64> = f(0x668, "G_PAT");

/// EXITCODE values used here (APM Vol. 2 Appendix C).
pub mod exit {
    /// First exception intercept (0x40 + vector).
    pub const EXCP_BASE: u64 = 0x40;
    /// Physical interrupt.
    pub const INTR: u64 = 0x60;
    /// VINTR: the guest can take the virtual interrupt V_IRQ asked for.
    pub const VINTR: u64 = 0x64;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN/OUT.
    pub const IOIO: u64 = 0x7b;
    /// RDMSR/WRMSR.
    pub const MSR: u64 = 0x7c;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN (first of the SVM-instruction intercepts 0x80..=0x86).
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// SKINIT (last of the SVM-instruction intercepts).
    pub const SKINIT: u64 = 0x86;
    /// XSETBV (the XSETBV intercept, vector 4 bit 13).
    pub const XSETBV: u64 = 0x8d;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN consistency check failed.
    pub const INVALID: u64 = u64::MAX;
    /// VMEXIT_INVALID as QEMU TCG stores it: -1 as a 32-bit value, zero-extended
    /// (`cpu_vmexit` takes a `uint32_t` exit code). No real exit code is this large.
    pub const INVALID_32: u64 = 0xffff_ffff;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_fields_write_exactly_their_width_little_endian() {
        let mut page = [0u8; 4096];
        let mut v = Vmcb(&mut page);
        v.set(RAX, 0x1122_3344_5566_7788);
        v.set(TLB_CONTROL, 0xab);
        v.set(GUEST_ASID, 7);
        v.set_segment(Segment::Cs, 0x8, 0xa9b, 0xffff_ffff, 0);
        assert_eq!(v.get(RAX), 0x1122_3344_5566_7788);
        assert_eq!(v.get(GUEST_ASID), 7);
        assert_eq!(page[0x5f8], 0x88);
        assert_eq!(page[0x5c], 0xab);
        assert_eq!(page[0x5d], 0, "u8 field spilled");
        assert_eq!(&page[0x410..0x418], &[0x08, 0, 0x9b, 0x0a, 0xff, 0xff, 0xff, 0xff]);
    }
}
