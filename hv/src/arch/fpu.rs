//! Guest x87/SSE/AVX/AVX-512 state: one XSAVE area per vCPU, and the XCR0 switch
//! around guest entry. Neither VMX nor SVM switches these for us: VM entry/exit and
//! VMRUN/#VMEXIT leave the x87, MMX, XMM/YMM/ZMM and opmask registers and XCR0 alone
//! (SDM Vol. 3C 27.3/28.5 load no XCR0; APM Vol. 2 15.5.1: "VMRUN does not save or
//! restore ... XCR0"), so without this module every vCPU on a physical CPU shares one
//! set of registers.
//!
//! Why the hypervisor itself never clobbers the guest's registers: it is built for
//! `x86_64-unknown-uefi`, whose target specification has `features =
//! "-mmx,-sse,+soft-float"` (`rustc --print target-spec-json --target
//! x86_64-unknown-uefi`): the compiler emits no x87, MMX, SSE or AVX instruction in
//! hypervisor code, interrupt handlers included. The only instructions here that
//! touch that state are the XSAVE/XRSTOR (or FXSAVE/FXRSTOR) and XSETBV in
//! [`GuestFpu::load`] and [`GuestFpu::save`], which the backends call right before
//! entry and right after the exit.
//!
//! XCR0 (SDM Vol. 1 13.3): while the hypervisor runs, XCR0 holds
//! [`HostFpu::xcr0`], every component this module switches ([`SWITCHED`] ∩ what the
//! CPU has). The save and restore run under that value, so a guest's XMM registers
//! are kept even while its own XCR0 is 1 (XCR0 decides what XSAVE manages, not
//! whether SSE works). Only across the entry itself is XCR0 the guest's value. The
//! guest's XSETBV exits (VMX exit 55 unconditionally, SVM through the XSETBV
//! intercept); the exit policy (`domain::exit::xsetbv`) validates the value against
//! the domain's CPUID policy and stores it with [`GuestFpu::set_xcr0`].
//!
//! QEMU 7.2's TCG does not implement the SVM XSETBV intercept: there the guest's
//! XSETBV reaches the emulated CPU directly, which refuses only what the CPU cannot do
//! (not what the policy leaves out). [`GuestFpu::save`] reads XCR0 back after every
//! exit, so the switch still follows the guest's value. Hardware with SVM and Bochs'
//! VMX do exit.
//!
//! Without XSAVE on the host (no CPUID.1:ECX.XSAVE) the area is FXSAVE's 512 bytes,
//! there is no XCR0, and the default policy offers no XSAVE or AVX.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// XCR0 bit 0: x87 state (always 1, SDM 13.3).
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0 bit 1: SSE state (XMM0-15, MXCSR).
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0 bit 2: AVX state (upper halves of YMM0-15).
pub const XCR0_AVX: u64 = 1 << 2;
/// XCR0 bits 3-4: MPX BNDREGS and BNDCSR.
pub const XCR0_MPX: u64 = 0b11 << 3;
/// XCR0 bits 5-7: AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM.
pub const XCR0_AVX512: u64 = 0b111 << 5;
/// XCR0 bit 9: PKRU.
pub const XCR0_PKRU: u64 = 1 << 9;
/// XCR0 bits 17-18: AMX TILECFG and TILEDATA.
pub const XCR0_AMX: u64 = 0b11 << 17;

/// The user state components this module switches: x87, SSE, AVX, AVX-512. Not MPX
/// (never offered), PKRU (PKU is not offered: CR4.PKE and PKRU are not switched) or
/// AMX (needs IA32_XFD, not switched).
pub const SWITCHED: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512;

/// FXSAVE area size (SDM Vol. 1 10.5.1).
pub const FXSAVE_BYTES: usize = 512;

/// Offsets in the legacy region (SDM Vol. 1 Table 10-2): FCW, MXCSR.
const FCW: usize = 0;
const MXCSR: usize = 24;
/// x87 control word after FNINIT / reset (SDM Vol. 1 8.1.5): all exceptions masked,
/// double-extended precision, round to nearest.
const FCW_RESET: u16 = 0x037f;
/// MXCSR after reset (SDM Vol. 1 10.2.3): all SIMD exceptions masked.
const MXCSR_RESET: u32 = 0x1f80;

/// What this physical CPU can switch, found by [`HostFpu::enable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFpu {
    /// XSAVE is available and enabled (CR4.OSXSAVE); otherwise FXSAVE is used.
    pub xsave: bool,
    /// XCR0 while the hypervisor runs: the components switched (0 without XSAVE).
    pub xcr0: u64,
    /// Bytes of one vCPU's save area (CPUID.(EAX=0Dh,ECX=0):EBX for `xcr0`, or 512).
    pub area_bytes: usize,
}

impl HostFpu {
    /// Without XSAVE: FXSAVE/FXRSTOR of the 512-byte legacy area.
    pub const FXSAVE_ONLY: HostFpu = HostFpu { xsave: false, xcr0: 0, area_bytes: FXSAVE_BYTES };

    /// The XCR0 the hypervisor runs with, from CPUID.(EAX=0Dh,ECX=0):EDX:EAX (the
    /// components the CPU supports in XCR0): what [`SWITCHED`] and the CPU share, with
    /// the architectural pairings kept (AVX-512 only with all three components and AVX).
    pub fn host_xcr0(supported: u64) -> u64 {
        let mut x = supported & SWITCHED;
        if x & XCR0_AVX == 0 || x & XCR0_AVX512 != XCR0_AVX512 {
            x &= !XCR0_AVX512;
        }
        if x & XCR0_SSE == 0 {
            x &= !(XCR0_AVX | XCR0_AVX512);
        }
        x | XCR0_X87
    }

    /// Prepare this CPU to save and restore guest state: CR0.TS and CR0.EM off (or
    /// FXSAVE/XSAVE would fault), CR4.OSFXSR (so FXSAVE includes the XMM registers,
    /// SDM Vol. 1 10.5.1.1), and with XSAVE CR4.OSXSAVE and XCR0 = [`HostFpu::xcr0`].
    /// Call on each physical CPU before any vCPU is created (the VMX backend copies
    /// CR4 into the VMCS host-state area). Calling it again writes the same values, so
    /// boot may call it first for [`check_xsavec`].
    pub fn enable() -> HostFpu {
        const CR0_EM: usize = 1 << 2;
        const CR0_TS: usize = 1 << 3;
        const CR0_MP: usize = 1 << 1;
        const CR4_OSFXSR: usize = 1 << 9;
        const CR4_OSXMMEXCPT: usize = 1 << 10;
        const CR4_OSXSAVE: usize = 1 << 18;
        let leaf1 = core::arch::x86_64::__cpuid(1);
        let xsave = leaf1.ecx & (1 << 26) != 0;
        // Clearing EM/TS and setting MP, OSFXSR and OSXMMEXCPT only changes how x87/SSE
        // instructions behave, and the hypervisor executes none outside this module
        // (soft-float target).
        // SAFETY: ring 0 may write CR0 and CR4; OSXSAVE is set only when CPUID.1:ECX.XSAVE
        // says the CPU has it (SDM Vol. 3A 2.5: otherwise #GP).
        unsafe {
            let cr0 = x86::controlregs::cr0().bits();
            let cr0 = (cr0 & !(CR0_EM | CR0_TS)) | CR0_MP;
            x86::controlregs::cr0_write(x86::controlregs::Cr0::from_bits_truncate(cr0));
            let mut cr4 = x86::controlregs::cr4().bits() | CR4_OSFXSR | CR4_OSXMMEXCPT;
            if xsave {
                cr4 |= CR4_OSXSAVE;
            }
            x86::controlregs::cr4_write(x86::controlregs::Cr4::from_bits_truncate(cr4));
        }
        if !xsave {
            return HostFpu::FXSAVE_ONLY;
        }
        let d = core::arch::x86_64::__cpuid_count(0xd, 0);
        let xcr0 = Self::host_xcr0(u64::from(d.eax) | (u64::from(d.edx) << 32));
        // SAFETY: CR4.OSXSAVE is set (above); `xcr0` has bit 0, pairs SSE with AVX and
        // AVX-512 as 13.3 requires, and only bits CPUID.0Dh:EDX:EAX reports.
        unsafe { xsetbv(xcr0) };
        // CPUID.(EAX=0Dh,ECX=0):EBX is the XSAVE area size for the components now
        // enabled in XCR0 (SDM Vol. 1 13.5, Vol. 2A CPUID).
        let size = core::arch::x86_64::__cpuid_count(0xd, 0).ebx as usize;
        HostFpu { xsave: true, xcr0, area_bytes: size.max(FXSAVE_BYTES + 64) }
    }
}

/// 64 bytes, 64-aligned: XSAVE needs its area aligned on 64 bytes (SDM Vol. 1 13.4).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct Block([u8; 64]);

/// One vCPU's x87/SSE/AVX state while it is not running, and its XCR0.
#[derive(Debug, Clone)]
pub struct GuestFpu {
    area: Vec<Block>,
    xcr0: u64,
    host: HostFpu,
}

impl GuestFpu {
    /// The state after reset (SDM Vol. 3A 10.1.1, Table 10-1): FCW 0x37F, MXCSR
    /// 0x1F80, all registers zero and every XSAVE component in its initial
    /// configuration (XSTATE_BV = 0); XCR0 = 1.
    pub fn new(host: &HostFpu) -> Self {
        let blocks = host.area_bytes.div_ceil(64);
        let mut f = GuestFpu { area: vec![Block([0; 64]); blocks], xcr0: XCR0_X87, host: *host };
        let bytes = f.bytes_mut();
        bytes[FCW..FCW + 2].copy_from_slice(&FCW_RESET.to_le_bytes());
        bytes[MXCSR..MXCSR + 4].copy_from_slice(&MXCSR_RESET.to_le_bytes());
        f
    }

    /// The vCPU's XCR0 (its value while it runs).
    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    /// Set the vCPU's XCR0 (already validated by the exit policy).
    pub fn set_xcr0(&mut self, xcr0: u64) {
        self.xcr0 = xcr0;
    }

    /// What this CPU switches.
    pub fn host(&self) -> &HostFpu {
        &self.host
    }

    /// The saved area (standard XSAVE format, or FXSAVE's 512 bytes).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: Block is repr(C) over [u8; 64] with no padding, so the Vec's blocks
        // are `len * 64` contiguous initialised bytes.
        unsafe { core::slice::from_raw_parts(self.area.as_ptr().cast::<u8>(), self.area.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, through the unique borrow of the Vec.
        unsafe { core::slice::from_raw_parts_mut(self.area.as_mut_ptr().cast::<u8>(), self.area.len() * 64) }
    }

    /// Put this vCPU's state into the registers and its XCR0 into XCR0: call right
    /// before VM entry / VMRUN, with interrupts off, on the CPU whose [`HostFpu`] this is.
    ///
    /// # Safety
    /// The caller is about to enter this vCPU and runs no x87/SSE code until
    /// [`GuestFpu::save`]; the current XCR0 is [`HostFpu::xcr0`].
    pub unsafe fn load(&mut self) {
        let area = self.area.as_mut_ptr().cast::<u8>();
        if self.host.xsave {
            let rfbm = self.host.xcr0;
            // The area was written by XSAVE under this XCR0 or is the reset image
            // (XSTATE_BV = XCOMP_BV = 0, reserved header bytes 0, MXCSR valid).
            // SAFETY: 64-byte aligned, `area_bytes` long (CPUID.0Dh:EBX for this XCR0),
            // so XRSTOR's #GP conditions (SDM Vol. 1 13.8) do not apply.
            unsafe {
                core::arch::asm!(
                    "xrstor64 [{}]",
                    in(reg) area,
                    in("eax") rfbm as u32,
                    in("edx") (rfbm >> 32) as u32,
                    options(nostack, preserves_flags),
                );
            }
            if self.xcr0 != self.host.xcr0 {
                // SAFETY: the exit policy only stores XCR0 values that pass the 13.3
                // rules and lie within the policy's (and so the host's) components.
                unsafe { xsetbv(self.xcr0) };
            }
        } else {
            // SAFETY: a 512-byte, 16-aligned area written by FXSAVE or the reset image.
            unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
        }
    }

    /// Save the registers into this vCPU's area and put the hypervisor's XCR0 back:
    /// call right after the VM exit / #VMEXIT, before anything else can run a guest.
    ///
    /// If the guest's XCR0 is not what was loaded, the guest executed XSETBV without
    /// an exit (an emulator that does not implement the intercept): the value the
    /// hardware accepted is kept, so the next entry gives the guest what it set.
    ///
    /// # Safety
    /// The registers hold this vCPU's state (it was the last one loaded on this CPU).
    pub unsafe fn save(&mut self) {
        let area = self.area.as_mut_ptr().cast::<u8>();
        if self.host.xsave {
            // SAFETY: CR4.OSXSAVE is set on this CPU (HostFpu::enable).
            let now = unsafe { xgetbv0() };
            self.xcr0 = now;
            if now != self.host.xcr0 {
                // SAFETY: the hypervisor's XCR0 passed the same checks in `enable`.
                unsafe { xsetbv(self.host.xcr0) };
            }
            let rfbm = self.host.xcr0;
            // SAFETY: 64-byte aligned area of the size CPUID.0Dh:EBX gives for this XCR0.
            unsafe {
                core::arch::asm!(
                    "xsave64 [{}]",
                    in(reg) area,
                    in("eax") rfbm as u32,
                    in("edx") (rfbm >> 32) as u32,
                    options(nostack, preserves_flags),
                );
            }
        } else {
            // SAFETY: 512-byte, 16-aligned area.
            unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
        }
    }
}

/// The XSAVEC check's registers, as XRSTOR loads them: XMM register `i` byte `j` and
/// the upper half of YMM register `i` byte `j`. Every 16-byte register differs from
/// every other, so where one is found in a saved image says where it was written.
fn xmm_byte(i: usize, j: usize) -> u8 {
    (i * 16 + j) as u8 ^ 0x5a
}
fn ymm_hi_byte(i: usize, j: usize) -> u8 {
    (i * 16 + j) as u8 ^ 0xa5
}
/// RFBM of the XSAVEC check: SSE and AVX, the components whose compacted placement
/// differs from the standard one (XMM stays in the legacy region, AVX moves to 576).
const XSAVEC_CHECK_RFBM: u64 = XCR0_SSE | XCR0_AVX;
/// Where XSAVEC must put the AVX component when it is the first extended component
/// saved: right after the legacy region and header (SDM Vol. 1 13.4.3).
const COMPACTED_AVX: usize = XSAVE_MIN;
/// XCOMP_BV bit 63: the compacted format (SDM Vol. 1 13.4.2).
const XCOMP_BV_COMPACTED: u64 = 1 << 63;

/// The standard-format image the XSAVEC check loads: MXCSR at reset, XMM0-15 and the
/// upper halves of YMM0-15 set to the check's pattern, XSTATE_BV = SSE | AVX. `avx`
/// is CPUID.(EAX=0Dh,ECX=2):EBX, the AVX component's standard offset.
fn xsavec_check_source(len: usize, avx: usize) -> Vec<u8> {
    let mut a = vec![0u8; len];
    a[MXCSR..MXCSR + 4].copy_from_slice(&MXCSR_RESET.to_le_bytes());
    for i in 0..16 {
        for j in 0..16 {
            a[160 + i * 16 + j] = xmm_byte(i, j);
            a[avx + i * 16 + j] = ymm_hi_byte(i, j);
        }
    }
    a[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&XSAVEC_CHECK_RFBM.to_le_bytes());
    a
}

/// What XSAVEC wrote, checked against SDM Vol. 1 13.10 for RFBM = SSE | AVX with both
/// in use: XMM0-15 at 160 as in the standard format, XSTATE_BV = 6, XCOMP_BV = bit
/// 63 | 6, the rest of the header 0, and the upper halves of YMM0-15 at 576. `Err`
/// says what differs. The pure half of [`check_xsavec`], so it has host tests.
pub fn xsavec_image_fault(saved: &[u8]) -> Result<(), String> {
    let find = |byte: fn(usize, usize) -> u8, i: usize| {
        let want: [u8; 16] = core::array::from_fn(|j| byte(i, j));
        saved.windows(16).position(|w| w == want)
    };
    let u64_at = |o: usize| saved.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if saved.len() < COMPACTED_AVX + 256 {
        return Err(alloc::format!(
            "the image is {} bytes, shorter than the {} XSAVEC fills",
            saved.len(),
            COMPACTED_AVX + 256
        ));
    }
    if let Some(at) = find(ymm_hi_byte, 0).filter(|at| *at != COMPACTED_AVX) {
        return Err(alloc::format!(
            "it wrote the AVX component (the upper halves of YMM0-15) at offset {at}, not {COMPACTED_AVX} \
             (SDM Vol. 1 13.4.3), so an image it saves restores wrongly"
        ));
    }
    for i in 0..16 {
        if find(xmm_byte, i) != Some(160 + i * 16) {
            return Err(alloc::format!("XMM{i} is not at offset {} of the legacy region", 160 + i * 16));
        }
        if find(ymm_hi_byte, i) != Some(COMPACTED_AVX + i * 16) {
            return Err(alloc::format!("the upper half of YMM{i} is not at offset {}", COMPACTED_AVX + i * 16));
        }
    }
    let (bv, comp) = (u64_at(XSAVE_HEADER), u64_at(XSAVE_HEADER + 8));
    if bv != Some(XSAVEC_CHECK_RFBM) || comp != Some(XCOMP_BV_COMPACTED | XSAVEC_CHECK_RFBM) {
        return Err(alloc::format!(
            "its header has XSTATE_BV {:#x} and XCOMP_BV {:#x}, not {:#x} and {:#x}",
            bv.unwrap_or(0),
            comp.unwrap_or(0),
            XSAVEC_CHECK_RFBM,
            XCOMP_BV_COMPACTED | XSAVEC_CHECK_RFBM
        ));
    }
    if saved[XSAVE_HEADER + 16..XSAVE_MIN].iter().any(|b| *b != 0) {
        return Err("it left bytes 16-63 of the XSAVE header non-zero (XRSTOR faults on them)".into());
    }
    Ok(())
}

/// The result of [`check_xsavec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XsavecCheck {
    /// The CPU does not report XSAVEC, or not both SSE and AVX, so guests get no
    /// compacted AVX state from it.
    NotApplicable,
    /// XSAVEC wrote the compacted format as the SDM says.
    Sound,
    /// It did not; what differs.
    Faulty(String),
}

/// Check this CPU's XSAVEC before offering it to guests. Guests save their own state
/// with it (Linux's context switch uses XSAVEC when CPUID.(EAX=0Dh,ECX=1):EAX[1] says
/// it is there) and restore it with XRSTOR, so an XSAVEC that lays the compacted
/// format out wrongly corrupts every guest task's registers at random. Bochs 2.7 does:
/// it places the AVX component 160 bytes low, over the header (fixed upstream in
/// 2024, commit e54048c "XSAVEC/XSAVES: don't allow 'compaction' of SSE state"); under
/// the hypervisor, where levelling gives Linux a consistent XSAVE layout, busybox
/// then segfaulted in one boot of two. The check loads a known SSE/AVX pattern with
/// XRSTOR (standard format), saves it with XSAVEC, and compares the image with the
/// layout of SDM Vol. 1 13.4.3 ([`xsavec_image_fault`]). Run it with no guest's state
/// in the registers (at boot): it leaves them in their initial configuration.
pub fn check_xsavec(host: &HostFpu) -> XsavecCheck {
    let d1 = core::arch::x86_64::__cpuid_count(0xd, 1);
    if !host.xsave || d1.eax & (1 << 1) == 0 || host.xcr0 & XSAVEC_CHECK_RFBM != XSAVEC_CHECK_RFBM {
        return XsavecCheck::NotApplicable;
    }
    let avx = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    let len = host.area_bytes.max(avx + 256).div_ceil(64) * 64;
    // Both images live in 64-aligned blocks (XRSTOR and XSAVEC #GP otherwise, 13.4).
    let mut src = vec![Block([0; 64]); len / 64];
    let mut dst = vec![Block([0; 64]); len / 64];
    let mut init = GuestFpu::new(host);
    for (b, s) in src.iter_mut().flat_map(|b| b.0.iter_mut()).zip(xsavec_check_source(len, avx)) {
        *b = s;
    }
    let (lo, hi) = (XSAVEC_CHECK_RFBM as u32, (XSAVEC_CHECK_RFBM >> 32) as u32);
    let (all_lo, all_hi) = (host.xcr0 as u32, (host.xcr0 >> 32) as u32);
    // Why both instructions are safe here: CR4.OSXSAVE is set and XCR0 = host.xcr0 on
    // this CPU (HostFpu::enable), which holds SSE and AVX, and CPUID says XSAVEC exists
    // (both checked above). Each area is 64-byte aligned and `len` bytes, at least the
    // standard size for XCR0 and past the AVX component, so neither instruction's #GP
    // conditions (SDM Vol. 1 13.8, 13.10) apply. The hypervisor runs no x87/SSE code
    // (soft-float target), and at boot no vCPU's state is in the registers, so the
    // pattern disturbs nothing.
    // SAFETY: as above; `src` has a valid MXCSR and header (XCOMP_BV 0, reserved 0).
    unsafe {
        core::arch::asm!(
            "xrstor64 [{src}]",
            "xsavec64 [{dst}]",
            src = in(reg) src.as_ptr(),
            dst = in(reg) dst.as_mut_ptr(),
            in("eax") lo,
            in("edx") hi,
            options(nostack, preserves_flags),
        );
    }
    // SAFETY: as above; the reset image is what GuestFpu::load restores for a new vCPU,
    // so this puts every component back in its initial configuration.
    unsafe {
        core::arch::asm!(
            "xrstor64 [{init}]",
            init = in(reg) init.area.as_mut_ptr(),
            in("eax") all_lo,
            in("edx") all_hi,
            options(nostack, preserves_flags),
        );
    }
    let saved: Vec<u8> = dst.iter().flat_map(|b| b.0).collect();
    match xsavec_image_fault(&saved) {
        Ok(()) => XsavecCheck::Sound,
        Err(why) => XsavecCheck::Faulty(why),
    }
}

/// XSAVE header offset in the standard-format area (SDM Vol. 1 13.4.2): XSTATE_BV at
/// +0, XCOMP_BV at +8, then 48 reserved bytes that must be 0.
const XSAVE_HEADER: usize = FXSAVE_BYTES;
/// The legacy region plus the XSAVE header: the smallest XSAVE area.
const XSAVE_MIN: usize = FXSAVE_BYTES + 64;
/// MXCSR bits 31:16 are reserved: XRSTOR/FXRSTOR #GP if any is set (SDM Vol. 1 10.2.3.1).
const MXCSR_RESERVED: u32 = 0xffff_0000;

/// Why a migrated vCPU's FPU state cannot be loaded on this CPU (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpuImportError {
    /// The vCPU's XCR0 is not one this CPU and the domain's policy allow.
    Xcr0(XcrError),
    /// The area holds state of components this CPU does not switch or the domain's
    /// policy does not offer (XSTATE_BV bits).
    MissingComponents {
        /// The components.
        bits: u64,
        /// What this CPU and the policy allow.
        allowed: u64,
    },
    /// Neither a 512-byte FXSAVE area nor a standard XSAVE area of at least 576 bytes.
    BadLength(usize),
    /// A compacted-format area (XCOMP_BV bit 63), which this hypervisor never writes.
    Compacted,
    /// Reserved XSAVE header bytes or MXCSR bits are set (XRSTOR would fault).
    Reserved(&'static str),
}

impl core::fmt::Display for FpuImportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FpuImportError::Xcr0(e) => write!(f, "its XCR0 cannot be set here: {e}"),
            FpuImportError::MissingComponents { bits, allowed } => write!(
                f,
                "its XSAVE area holds state components {bits:#x} that this host or the domain's CPUID policy lack                  (allowed: {allowed:#x})"
            ),
            FpuImportError::BadLength(n) => {
                write!(f, "its FPU area is {n} bytes: neither FXSAVE's 512 nor an XSAVE area of at least 576")
            }
            FpuImportError::Compacted => f.write_str("its XSAVE area is in the compacted format"),
            FpuImportError::Reserved(what) => write!(f, "its FPU area has reserved bits set: {what}"),
        }
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| s.first_chunk::<8>()).map_or(0, |c| u64::from_le_bytes(*c))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| s.first_chunk::<4>()).map_or(0, |c| u32::from_le_bytes(*c))
}

impl GuestFpu {
    /// The saved area as migration carries it: [`HostFpu::area_bytes`] bytes.
    pub fn export(&self) -> &[u8] {
        let n = self.host.area_bytes.min(self.bytes().len());
        self.bytes().get(..n).unwrap_or_default()
    }

    /// Load a migrated vCPU's `xcr0` and save `area` (standard-format XSAVE or FXSAVE,
    /// as [`GuestFpu::export`] wrote it on the source) into this vCPU, refusing what
    /// this CPU could not restore: an XCR0 outside `allowed` (the domain's policy's
    /// components; intersected here with what this CPU switches), state of components
    /// outside it (XSTATE_BV), a compacted area, reserved header or MXCSR bits (XRSTOR
    /// would #GP, SDM Vol. 1 13.8.1). An FXSAVE area on an XSAVE host becomes x87+SSE
    /// state; an XSAVE area on an FXSAVE host is taken if it holds only x87 and SSE.
    /// On error nothing changed.
    pub fn import(&mut self, xcr0: u64, area: &[u8], allowed: u64) -> Result<(), FpuImportError> {
        let allowed = if self.host.xsave { allowed & self.host.xcr0 } else { XCR0_X87 | XCR0_SSE };
        if le_u32(area, MXCSR) & MXCSR_RESERVED != 0 {
            return Err(FpuImportError::Reserved("MXCSR bits 31:16"));
        }
        let xstate_bv = match area.len() {
            FXSAVE_BYTES => XCR0_X87 | XCR0_SSE,
            n if n >= XSAVE_MIN => {
                if le_u64(area, XSAVE_HEADER + 8) != 0 {
                    return Err(FpuImportError::Compacted);
                }
                if area.get(XSAVE_HEADER + 16..XSAVE_MIN).is_some_and(|r| r.iter().any(|&b| b != 0)) {
                    return Err(FpuImportError::Reserved("XSAVE header bytes 16-63"));
                }
                le_u64(area, XSAVE_HEADER)
            }
            n => return Err(FpuImportError::BadLength(n)),
        };
        if xstate_bv & !allowed != 0 {
            return Err(FpuImportError::MissingComponents { bits: xstate_bv & !allowed, allowed });
        }
        let xcr0 = if self.host.xsave {
            check_xsetbv(0, xcr0, allowed).map_err(FpuImportError::Xcr0)?;
            xcr0
        } else if xcr0 == XCR0_X87 {
            xcr0
        } else {
            return Err(FpuImportError::Xcr0(XcrError::NotOffered(xcr0 & !XCR0_X87)));
        };
        let xsave = self.host.xsave;
        let bytes = self.bytes_mut();
        bytes.fill(0);
        let n = area.len().min(bytes.len());
        if let (Some(d), Some(s)) = (bytes.get_mut(..n), area.get(..n)) {
            d.copy_from_slice(s);
        }
        if xsave {
            // XSTATE_BV as checked (an FXSAVE area's x87 and SSE are in use).
            if let Some(h) = bytes.get_mut(XSAVE_HEADER..XSAVE_HEADER + 8) {
                h.copy_from_slice(&xstate_bv.to_le_bytes());
            }
        }
        self.xcr0 = xcr0;
        Ok(())
    }
}

/// XSETBV of XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set and `value` is a valid XCR0 for this CPU (SDM Vol. 2C XSETBV).
unsafe fn xsetbv(value: u64) {
    // SAFETY: per the contract above.
    unsafe {
        core::arch::asm!(
            "xsetbv",
            in("ecx") 0u32,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// XGETBV of XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set.
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: per the contract above; XGETBV only reads.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Why a guest's XSETBV is refused (#GP(0), SDM Vol. 2C XSETBV and Vol. 1 13.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XcrError {
    /// ECX is not 0: XCR0 is the only XCR XSETBV writes.
    NotXcr0(u32),
    /// Bit 0 (x87) is clear.
    X87Clear,
    /// AVX without SSE.
    AvxWithoutSse,
    /// AVX-512 components not all set together, or without AVX.
    Avx512Incomplete,
    /// MPX BNDREGS and BNDCSR differ.
    MpxIncomplete,
    /// AMX TILECFG and TILEDATA differ.
    AmxIncomplete,
    /// Bits the domain's CPUID policy does not offer in XCR0 (leaf 0xD.0 EDX:EAX).
    NotOffered(u64),
}

impl core::fmt::Display for XcrError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            XcrError::NotXcr0(n) => write!(f, "XSETBV of XCR{n}: only XCR0 exists"),
            XcrError::X87Clear => f.write_str("XCR0 bit 0 (x87) must be 1"),
            XcrError::AvxWithoutSse => f.write_str("XCR0 enables AVX (bit 2) without SSE (bit 1)"),
            XcrError::Avx512Incomplete => {
                f.write_str("XCR0 bits 7:5 (AVX-512) must be all set, with AVX, or all clear")
            }
            XcrError::MpxIncomplete => f.write_str("XCR0 bits 4:3 (MPX) must be equal"),
            XcrError::AmxIncomplete => f.write_str("XCR0 bits 18:17 (AMX) must be equal"),
            XcrError::NotOffered(bits) => write!(f, "XCR0 bits {bits:#x} are not offered by the domain's CPUID policy"),
        }
    }
}

/// Check an XSETBV of `value` to XCR`index` against the rules of SDM Vol. 1 13.3 and
/// the components `allowed` (the policy's CPUID.(EAX=0Dh,ECX=0):EDX:EAX, which the
/// caller intersects with what the backend switches).
pub fn check_xsetbv(index: u32, value: u64, allowed: u64) -> Result<(), XcrError> {
    if index != 0 {
        return Err(XcrError::NotXcr0(index));
    }
    if value & XCR0_X87 == 0 {
        return Err(XcrError::X87Clear);
    }
    let extra = value & !allowed;
    if extra != 0 {
        return Err(XcrError::NotOffered(extra));
    }
    if value & XCR0_AVX != 0 && value & XCR0_SSE == 0 {
        return Err(XcrError::AvxWithoutSse);
    }
    let avx512 = value & XCR0_AVX512;
    if avx512 != 0 && (avx512 != XCR0_AVX512 || value & XCR0_AVX == 0) {
        return Err(XcrError::Avx512Incomplete);
    }
    let mpx = value & XCR0_MPX;
    if mpx != 0 && mpx != XCR0_MPX {
        return Err(XcrError::MpxIncomplete);
    }
    let amx = value & XCR0_AMX;
    if amx != 0 && amx != XCR0_AMX {
        return Err(XcrError::AmxIncomplete);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512;

    /// What XSAVEC writes from [`xsavec_check_source`]: by the SDM (`avx_at` 576), or
    /// as Bochs 2.7 does it (the SSE component counted as compacted, so AVX lands at
    /// 160 + 256 = 416 and the header, written last, lands over part of it).
    fn xsavec_image(avx_at: usize) -> Vec<u8> {
        let src = xsavec_check_source(1024, 576);
        let mut out = vec![0u8; 1024];
        out[..XSAVE_HEADER].copy_from_slice(&src[..XSAVE_HEADER]);
        out[avx_at..avx_at + 256].copy_from_slice(&src[576..832]);
        out[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&6u64.to_le_bytes());
        out[XSAVE_HEADER + 8..XSAVE_HEADER + 16].copy_from_slice(&(XCOMP_BV_COMPACTED | 6).to_le_bytes());
        out
    }

    #[test]
    fn xsavec_check_accepts_the_sdm_layout_and_names_bochs_2_7s() {
        assert_eq!(xsavec_image_fault(&xsavec_image(576)), Ok(()));
        let bochs = xsavec_image_fault(&xsavec_image(416)).unwrap_err();
        assert!(
            bochs.starts_with("it wrote the AVX component (the upper halves of YMM0-15) at offset 416, not 576"),
            "{bochs}"
        );
        // A later register misplaced, a reserved header byte, a wrong XCOMP_BV, a short image.
        let mut one = xsavec_image(576);
        one.copy_within(576 + 15 * 16..576 + 16 * 16, 900);
        one[576 + 15 * 16..576 + 16 * 16].fill(0);
        assert_eq!(xsavec_image_fault(&one), Err("the upper half of YMM15 is not at offset 816".into()));
        let mut reserved = xsavec_image(576);
        reserved[XSAVE_HEADER + 40] = 1;
        assert!(xsavec_image_fault(&reserved).unwrap_err().contains("bytes 16-63 of the XSAVE header"));
        let mut standard = xsavec_image(576);
        standard[XSAVE_HEADER + 8..XSAVE_HEADER + 16].fill(0);
        assert!(xsavec_image_fault(&standard).unwrap_err().contains("XCOMP_BV 0x0, not"));
        assert!(xsavec_image_fault(&xsavec_image(576)[..700]).is_err());
        assert!(xsavec_image_fault(&[]).is_err());
    }

    #[test]
    fn xsavec_check_source_is_a_valid_standard_image() {
        let src = xsavec_check_source(1024, 576);
        // The import check XRSTOR's #GP rules rest on: MXCSR valid, header reserved 0.
        assert_eq!(u32::from_le_bytes(src[MXCSR..MXCSR + 4].try_into().unwrap()), MXCSR_RESET);
        assert_eq!(u64::from_le_bytes(src[XSAVE_HEADER..XSAVE_HEADER + 8].try_into().unwrap()), 6);
        assert!(src[XSAVE_HEADER + 8..XSAVE_MIN].iter().all(|b| *b == 0));
        // All 32 registers distinct, so a found block names one place.
        let mut regs: Vec<&[u8]> = (0..16).map(|i| &src[160 + i * 16..176 + i * 16]).collect();
        regs.extend((0..16).map(|i| &src[576 + i * 16..592 + i * 16]));
        let n = regs.len();
        regs.sort();
        regs.dedup();
        assert_eq!(regs.len(), n);
    }

    #[test]
    fn xsetbv_rules_of_sdm_13_3() {
        for ok in [1, 3, 7, 0xe7] {
            assert_eq!(check_xsetbv(0, ok, ALL), Ok(()), "{ok:#x}");
        }
        assert_eq!(check_xsetbv(1, 3, ALL), Err(XcrError::NotXcr0(1)));
        assert_eq!(check_xsetbv(0, 0, ALL), Err(XcrError::X87Clear));
        assert_eq!(check_xsetbv(0, 2, ALL), Err(XcrError::X87Clear));
        assert_eq!(check_xsetbv(0, 5, ALL), Err(XcrError::AvxWithoutSse));
        for bad in [0x27, 0x67, 0xa7, 0xe3] {
            assert_eq!(check_xsetbv(0, bad, ALL), Err(XcrError::Avx512Incomplete), "{bad:#x}");
        }
        // Nothing beyond what the policy offers: AVX-512 on a policy with AVX only, PKRU, MPX.
        assert_eq!(check_xsetbv(0, 0xe7, 7), Err(XcrError::NotOffered(0xe0)));
        assert_eq!(check_xsetbv(0, 7 | XCR0_PKRU, ALL), Err(XcrError::NotOffered(XCR0_PKRU)));
        assert_eq!(check_xsetbv(0, 3, 1), Err(XcrError::NotOffered(2)));
        assert_eq!(check_xsetbv(0, 1 | (1 << 3), 0x1f), Err(XcrError::MpxIncomplete));
        assert_eq!(check_xsetbv(0, 0x1f, 0x1f), Ok(()));
        assert_eq!(check_xsetbv(0, 7 | (1 << 17), 7 | XCR0_AMX), Err(XcrError::AmxIncomplete));
        assert_eq!(check_xsetbv(0, 1 << 63 | 1, ALL), Err(XcrError::NotOffered(1 << 63)));
    }

    #[test]
    fn host_xcr0_keeps_what_can_be_switched() {
        // A Skylake-X: x87, SSE, AVX, MPX, AVX-512, PKRU.
        assert_eq!(HostFpu::host_xcr0(0x2ff), 0xe7);
        // EPYC (Zen 1): x87, SSE, AVX.
        assert_eq!(HostFpu::host_xcr0(0x7), 0x7);
        // Sapphire Rapids: AMX is not switched.
        assert_eq!(HostFpu::host_xcr0(0x602e7), 0xe7);
        // Incomplete AVX-512 is dropped rather than refused by XSETBV.
        assert_eq!(HostFpu::host_xcr0(0x67), 0x7);
        assert_eq!(HostFpu::host_xcr0(0), 1);
    }

    fn area(len: usize, xstate_bv: u64) -> Vec<u8> {
        let mut a = vec![0u8; len];
        a[0] = 0x7f;
        a[1] = 0x03;
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a[32] = 0x42; // ST0's first byte: state that must arrive
        if len >= 576 {
            a[512..520].copy_from_slice(&xstate_bv.to_le_bytes());
        }
        if len > 600 {
            a[600] = 0x99; // a YMM_Hi128 byte
        }
        a
    }

    #[test]
    fn import_takes_what_this_host_and_policy_allow() {
        let epyc = HostFpu { xsave: true, xcr0: 0x7, area_bytes: 832 };
        let mut f = GuestFpu::new(&epyc);
        f.import(7, &area(832, 7), 7).unwrap();
        assert_eq!(f.xcr0(), 7);
        assert_eq!((f.bytes()[32], f.bytes()[600]), (0x42, 0x99), "x87 and AVX state arrived");
        assert_eq!(f.export().len(), 832);
        assert_eq!(f.export(), &area(832, 7)[..]);
        // AVX-512 state from a Skylake-X source, onto an EPYC: refused, nothing changed.
        let before = f.clone();
        let e = f.import(0xe7, &area(2696, 0xe7), 0xe7).unwrap_err();
        assert_eq!(e, FpuImportError::MissingComponents { bits: 0xe0, allowed: 7 });
        assert!(alloc::format!("{e}").contains("state components 0xe0"), "{e}");
        assert_eq!(f.bytes(), before.bytes());
        assert_eq!(f.xcr0(), 7);
        // The policy offers no AVX: AVX state or an XCR0 with AVX is refused even on a host with it.
        assert_eq!(f.import(3, &area(832, 7), 3), Err(FpuImportError::MissingComponents { bits: 4, allowed: 3 }));
        assert!(matches!(f.import(7, &area(832, 3), 3), Err(FpuImportError::Xcr0(XcrError::NotOffered(4)))));
        // A Skylake-X area with only x87/SSE/AVX in use loads on the EPYC (the tail is dropped).
        f.import(7, &area(2696, 7), 0xe7).unwrap();
        assert_eq!(f.bytes().len(), 832);
        // FXSAVE source: x87 and SSE become in use (XSTATE_BV 3), or XRSTOR would reset them.
        f.import(1, &area(512, 0), 7).unwrap();
        assert_eq!(&f.bytes()[512..520], &3u64.to_le_bytes());
        assert_eq!(f.bytes()[32], 0x42);
    }

    #[test]
    fn import_refuses_what_xrstor_would_fault_on() {
        let host = HostFpu { xsave: true, xcr0: 0x7, area_bytes: 832 };
        let mut f = GuestFpu::new(&host);
        let mut a = area(832, 7);
        a[520] = 1;
        assert_eq!(f.import(7, &a, 7), Err(FpuImportError::Compacted));
        let mut a = area(832, 7);
        a[540] = 1;
        assert!(matches!(f.import(7, &a, 7), Err(FpuImportError::Reserved(_))));
        let mut a = area(832, 7);
        a[27] = 1;
        assert!(matches!(f.import(7, &a, 7), Err(FpuImportError::Reserved(_))));
        for n in [0, 511, 513, 575] {
            assert_eq!(f.import(1, &vec![0; n], 7), Err(FpuImportError::BadLength(n)));
        }
        assert!(matches!(f.import(0, &area(832, 1), 7), Err(FpuImportError::Xcr0(XcrError::X87Clear))));
        // FXSAVE-only host: only x87+SSE state and XCR0 = 1.
        let mut fx = GuestFpu::new(&HostFpu::FXSAVE_ONLY);
        fx.import(1, &area(832, 3), 7).unwrap();
        assert_eq!(fx.bytes()[32], 0x42);
        assert!(fx.import(1, &area(832, 7), 7).is_err());
        assert!(fx.import(7, &area(512, 0), 7).is_err());
    }

    #[test]
    fn reset_area_is_a_valid_xrstor_image() {
        let host = HostFpu { xsave: true, xcr0: 0xe7, area_bytes: 2696 };
        let f = GuestFpu::new(&host);
        let b = f.bytes();
        assert_eq!(b.len(), 2752, "whole 64-byte blocks");
        assert_eq!(b.as_ptr() as usize % 64, 0, "XSAVE needs 64-byte alignment");
        assert_eq!(&b[0..2], &[0x7f, 0x03]);
        assert_eq!(&b[24..28], &0x1f80u32.to_le_bytes());
        assert!(b[512..576].iter().all(|&x| x == 0), "XSAVE header: XSTATE_BV, XCOMP_BV, reserved");
        assert_eq!(f.xcr0(), 1);
        let fx = GuestFpu::new(&HostFpu::FXSAVE_ONLY);
        assert_eq!(fx.bytes().len(), 512);
    }
}
