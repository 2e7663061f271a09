//! A [`VcpuSnapshot`] made fit for a VMX VM entry, whichever backend saved it.
//!
//! SVM's VMRUN makes few consistency checks on the guest state (APM Vol. 2 15.5.1); a
//! VMX VM entry makes many (SDM Vol. 3C 27.3.1). A state the guest runs with under
//! SVM can therefore fail a VM entry after a migration from an AMD host, for fields
//! that mean nothing to the guest: the accessed bit of a cached segment, the type of a
//! null data segment (AMD keeps stale attributes when a null selector is loaded in
//! 64-bit mode, APM Vol. 2 4.5.1 / Vol. 3 MOV), TR's available/busy type, a limit's
//! G bit. [`for_vmx_entry`] rewrites what is architecturally equivalent and refuses,
//! with a named reason, what is not (the destination then discards the domain and the
//! source runs on). Each rule names the check of 27.3.1 it satisfies.
//!
//! What the snapshot cannot carry from SVM at all: NMI blocking (kept inside the
//! processor without vNMI, see the SVM backend), so a guest migrated from SVM while
//! in its NMI handler could take a nested NMI; the core injects no NMIs into guests.

use super::state::{
    ATTR_DPL, ATTR_PRESENT, BLOCKING_BY_MOV_SS, BLOCKING_BY_NMI, BLOCKING_BY_STI, EVENT_EXTERNAL_INTERRUPT, EVENT_NMI,
    SegmentRegister, VcpuSnapshot,
};

const CR0_PE: u64 = 1 << 0;
const CR0_NE: u64 = 1 << 5;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_IF: u64 = 1 << 9;

/// Canonical attributes: type (3:0), S (4), L (9), D/B (10), G (11).
const ATTR_TYPE: u16 = 0xf;
const ATTR_ACCESSED: u16 = 1 << 0;
const ATTR_S: u16 = 1 << 4;
const ATTR_L: u16 = 1 << 9;
const ATTR_DB: u16 = 1 << 10;
const ATTR_G: u16 = 1 << 11;

/// A null selector: index 0 in the GDT (the RPL does not matter).
fn null(s: &SegmentRegister) -> bool {
    s.selector & 0xfffc == 0
}

fn usable(s: &SegmentRegister) -> bool {
    s.attributes & ATTR_PRESENT != 0
}

/// 27.3.1.2, every usable segment: if any of limit bits 11:0 is 0, G must be 0; if any
/// of bits 31:20 is 1, G must be 1. The cached limit is byte-granular in both
/// VMCS and VMCB, so G is only the descriptor's bit: set it as the limit requires.
fn fix_granularity(s: &mut SegmentRegister, which: &'static str) -> Result<(), &'static str> {
    let low_ones = s.limit & 0xfff == 0xfff;
    let high = s.limit >> 20 != 0;
    match (low_ones, high) {
        (false, true) => Err(which),
        (false, false) => {
            s.attributes &= !ATTR_G;
            Ok(())
        }
        (true, true) => {
            s.attributes |= ATTR_G;
            Ok(())
        }
        (true, false) => Ok(()),
    }
}

/// DS, ES, FS, GS (27.3.1.2): a null selector in protected mode is unusable (VMX
/// loads the base of FS and GS anyway, 27.3.2.2, so it is kept); a usable one must be
/// accessed, S = 1, and a code segment must be readable.
fn data_segment(s: &mut SegmentRegister, protected: bool, which: &'static str) -> Result<(), &'static str> {
    if protected && null(s) {
        s.attributes = 0;
        return Ok(());
    }
    if !usable(s) {
        return Ok(());
    }
    s.attributes |= ATTR_ACCESSED;
    if s.attributes & ATTR_S == 0 {
        return Err(which);
    }
    let ty = s.attributes & ATTR_TYPE;
    if ty & 0x8 != 0 && ty & 0x2 == 0 {
        return Err(which);
    }
    fix_granularity(s, which)
}

/// `s` made fit for VMX's VM-entry checks on guest state (SDM Vol. 3C 27.3.1), or why
/// it cannot be. `unrestricted`: the VM entry has "unrestricted guest" (real mode and
/// protected mode without paging are allowed, 27.3.1.1).
pub fn for_vmx_entry(s: &VcpuSnapshot, unrestricted: bool) -> Result<VcpuSnapshot, &'static str> {
    let mut s = s.clone();
    let ia32e = s.efer & EFER_LMA != 0;
    let protected = s.cr0 & CR0_PE != 0;
    // 27.3.1.1: IA32_EFER reserved bits must be 0 ("load IA32_EFER"); Intel defines
    // SCE, LME, LMA and NXE. AMD's FFXSR (14), LMSLE (13) and TCE (15) have no Intel
    // equivalent: a policy that verifies on Intel hosts does not offer them.
    if s.efer & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
        return Err("IA32_EFER has a bit Intel reserves (AMD's LMSLE, FFXSR or TCE), which a VMX VM entry refuses \
                    (SDM Vol. 3C 27.3.1.1)");
    }
    // 27.3.1.1: CR0 bits fixed to 1 (IA32_VMX_CR0_FIXED0): NE always; the core does
    // not shadow CR0, so a guest that runs with NE clear under SVM cannot enter.
    if s.cr0 & CR0_NE == 0 {
        return Err("CR0.NE is clear, which VMX requires set (IA32_VMX_CR0_FIXED0, SDM Vol. 3C 27.3.1.1)");
    }
    let cpl = (s.ss.attributes & ATTR_DPL) >> 5;

    // CS (27.3.1.2): usable, accessed, a code segment (type 9, 11, 13, 15) in protected
    // mode, type 3 (or 11) in real mode under unrestricted guest; L and D not both set
    // in IA-32e mode; DPL = SS.DPL for non-conforming, <= for conforming code.
    if !usable(&s.cs) {
        return Err("CS is not present (VMX requires a usable CS, SDM Vol. 3C 27.3.1.2)");
    }
    s.cs.attributes |= ATTR_ACCESSED;
    let cs_type = s.cs.attributes & ATTR_TYPE;
    let cs_dpl = (s.cs.attributes & ATTR_DPL) >> 5;
    if protected {
        if s.cs.attributes & ATTR_S == 0 || cs_type & 0x8 == 0 {
            return Err("CS is not a code segment (SDM Vol. 3C 27.3.1.2)");
        }
        let conforming = cs_type & 0x4 != 0;
        if (!conforming && cs_dpl != cpl) || (conforming && cs_dpl > cpl) {
            return Err("CS.DPL does not agree with the CPL (SS.DPL) as VMX requires (SDM Vol. 3C 27.3.1.2)");
        }
    } else if !unrestricted || !matches!(cs_type, 3 | 11) {
        return Err("CS is not a real-mode code segment VMX enters (type 3 or 11, SDM Vol. 3C 27.3.1.2)");
    }
    if ia32e && s.cs.attributes & ATTR_L != 0 && s.cs.attributes & ATTR_DB != 0 {
        return Err("CS has both L and D set in IA-32e mode (SDM Vol. 3C 27.3.1.2)");
    }
    fix_granularity(&mut s.cs, "CS's limit cannot be expressed with either G (SDM Vol. 3C 27.3.1.2)")?;

    // SS (27.3.1.2): a null SS in 64-bit mode (CPL < 3) is unusable with its DPL kept
    // (the snapshot keeps the CPL there); a usable SS is a writable, accessed data
    // segment (type 3 or 7) whose DPL is the CPL (kept by construction).
    if protected && null(&s.ss) && ia32e && cpl < 3 {
        s.ss.attributes &= ATTR_DPL;
    } else if usable(&s.ss) {
        s.ss.attributes |= ATTR_ACCESSED;
        if s.ss.attributes & ATTR_S == 0 || !matches!(s.ss.attributes & ATTR_TYPE, 3 | 7) {
            return Err("SS is not a writable data segment (type 3 or 7, SDM Vol. 3C 27.3.1.2)");
        }
        fix_granularity(&mut s.ss, "SS's limit cannot be expressed with either G (SDM Vol. 3C 27.3.1.2)")?;
    }
    data_segment(&mut s.ds, protected, "DS is usable but not an accessible data segment (SDM Vol. 3C 27.3.1.2)")?;
    data_segment(&mut s.es, protected, "ES is usable but not an accessible data segment (SDM Vol. 3C 27.3.1.2)")?;
    data_segment(&mut s.fs, protected, "FS is usable but not an accessible data segment (SDM Vol. 3C 27.3.1.2)")?;
    data_segment(&mut s.gs, protected, "GS is usable but not an accessible data segment (SDM Vol. 3C 27.3.1.2)")?;

    // TR (27.3.1.2): usable, S = 0; in IA-32e mode type 11 (busy 64-bit TSS), else 3 or
    // 11. SVM does not check the type, and LTR marks the descriptor busy, so an
    // "available" type in the cache is the same TSS: it becomes busy.
    if !usable(&s.tr) || s.tr.attributes & ATTR_S != 0 {
        return Err("TR is not a present system segment (VMX requires a usable TSS in TR, SDM Vol. 3C 27.3.1.2)");
    }
    let tr_type = match (ia32e, s.tr.attributes & ATTR_TYPE) {
        (true, 9 | 11) => 11,
        (false, 1 | 3) => 3,
        (false, 9 | 11) => 11,
        _ => {
            return Err(
                "TR does not hold a TSS of the kind VMX requires (busy 64-bit TSS in IA-32e mode, SDM Vol. 3C 27.3.1.2)",
            );
        }
    };
    s.tr.attributes = (s.tr.attributes & !ATTR_TYPE) | tr_type;
    fix_granularity(&mut s.tr, "TR's limit cannot be expressed with either G (SDM Vol. 3C 27.3.1.2)")?;

    // LDTR (27.3.1.2): unusable, or S = 0 and type 2. A null selector is unusable.
    if null(&s.ldtr) {
        s.ldtr.attributes = 0;
    } else if usable(&s.ldtr) {
        if s.ldtr.attributes & ATTR_S != 0 || s.ldtr.attributes & ATTR_TYPE != 2 {
            return Err("LDTR is usable but not an LDT (type 2, SDM Vol. 3C 27.3.1.2)");
        }
        fix_granularity(&mut s.ldtr, "LDTR's limit cannot be expressed with either G (SDM Vol. 3C 27.3.1.2)")?;
    }

    // Interruptibility (27.3.1.5): blocking by STI needs RFLAGS.IF = 1, and not both
    // STI and MOV SS. SVM has one shadow bit; its save calls a shadow with IF clear MOV
    // SS (which blocks the same interrupts), so the same rewrite holds here.
    let if_set = s.rflags & RFLAGS_IF != 0;
    if s.interruptibility & BLOCKING_BY_STI != 0 && (!if_set || s.interruptibility & BLOCKING_BY_MOV_SS != 0) {
        s.interruptibility = (s.interruptibility & !BLOCKING_BY_STI) | BLOCKING_BY_MOV_SS;
    }
    // Pending events (27.3.1.4, 27.3.1.5): an external interrupt needs IF = 1 and no
    // STI/MOV SS blocking; an NMI no MOV SS blocking (nor NMI blocking without virtual
    // NMIs). The core injects only when that holds, so this is a state it never makes.
    if let Some(e) = &s.pending_event {
        let shadow = s.interruptibility & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0;
        if e.kind == EVENT_EXTERNAL_INTERRUPT && (!if_set || shadow) {
            return Err("an external interrupt is pending while interrupts are blocked, which a VMX VM entry refuses \
                        (SDM Vol. 3C 27.3.1.4)");
        }
        if e.kind == EVENT_NMI && s.interruptibility & (BLOCKING_BY_MOV_SS | BLOCKING_BY_NMI) != 0 {
            return Err(
                "an NMI is pending while NMIs are blocked, which a VMX VM entry refuses (SDM Vol. 3C 27.3.1.5)",
            );
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::state::PendingEvent;

    fn seg(selector: u16, attributes: u16, limit: u32) -> SegmentRegister {
        SegmentRegister { selector, attributes, limit, base: 0 }
    }

    /// A 64-bit kernel's state as QEMU's SVM leaves it: TR available (type 9), CS
    /// and SS without the accessed bit, null DS/ES with stale attributes (P = 1,
    /// AMD keeps them), FS a null selector with a base, LDTR null with stale type.
    fn svm_saved() -> VcpuSnapshot {
        VcpuSnapshot {
            rflags: 0x202,
            cr0: 0x8000_0031,
            cr4: 0x20,
            efer: EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE,
            cs: seg(0x08, 0x29a, 0xffff_ffff),
            ss: seg(0x10, 0x092, 0xffff_ffff),
            ds: seg(0, 0x093, 0xffff_ffff),
            es: seg(0, 0x093, 0xffff),
            fs: SegmentRegister { selector: 0, attributes: 0x093, limit: 0xffff, base: 0x7f00_1234_0000 },
            gs: seg(0, 0, 0),
            tr: seg(0x40, 0x089, 0x67),
            ldtr: seg(0, 0x082, 0xffff),
            ..VcpuSnapshot::default()
        }
    }

    #[test]
    fn svm_state_is_normalised_for_vmx() {
        let s = for_vmx_entry(&svm_saved(), true).expect("an SVM kernel state enters VMX");
        assert_eq!(s.cs.attributes & 0xf, 0xb, "CS accessed");
        assert_eq!(s.cs.attributes & ATTR_G, ATTR_G, "CS limit 4 GiB needs G");
        assert_eq!(s.ss.attributes & 0xf, 0x3, "SS accessed");
        assert_eq!(s.ds.attributes, 0, "a null DS is unusable");
        assert_eq!(s.es.attributes, 0);
        assert_eq!((s.fs.attributes, s.fs.base), (0, 0x7f00_1234_0000), "FS unusable, its base kept");
        assert_eq!(s.tr.attributes & 0xf, 11, "TR busy 64-bit TSS");
        assert_eq!(s.tr.attributes & ATTR_G, 0, "TR limit 0x67 needs G = 0");
        assert_eq!(s.ldtr.attributes, 0, "a null LDTR is unusable");
        // Idempotent: a normalised state stays as it is.
        assert_eq!(for_vmx_entry(&s, true), Ok(s.clone()));
    }

    #[test]
    fn null_ss_in_64_bit_mode_keeps_the_cpl() {
        let mut s = svm_saved();
        s.ss = seg(0, 0x093, 0xffff_ffff);
        let n = for_vmx_entry(&s, true).unwrap();
        assert_eq!(n.ss.attributes, 0, "unusable SS with DPL 0");
    }

    #[test]
    fn what_is_not_equivalent_is_refused_with_a_reason() {
        type Change = fn(&mut VcpuSnapshot);
        let cases: [(&str, Change); 8] = [
            ("EFER", |s| s.efer |= 1 << 14),
            ("CR0.NE", |s| s.cr0 &= !CR0_NE),
            ("TR", |s| s.tr.attributes = 0),
            ("TR does not hold", |s| s.tr.attributes = 0x082),
            ("LDTR", |s| s.ldtr = seg(0x50, 0x089, 0xffff)),
            ("CS.DPL", |s| s.cs.attributes |= 3 << 5),
            ("limit", |s| s.cs.limit = 0x10_0000),
            ("external interrupt", |s| {
                s.rflags = 0x2;
                s.pending_event = Some(PendingEvent { vector: 0x30, kind: EVENT_EXTERNAL_INTERRUPT, error_code: None });
            }),
        ];
        for (word, change) in cases {
            let mut s = svm_saved();
            change(&mut s);
            let why = for_vmx_entry(&s, true).expect_err(word);
            assert!(why.contains(word) && why.contains("SDM"), "{word}: {why}");
        }
    }

    #[test]
    fn interrupt_shadow_without_if_is_mov_ss() {
        let mut s = svm_saved();
        s.rflags = 0x2;
        s.interruptibility = BLOCKING_BY_STI;
        assert_eq!(for_vmx_entry(&s, true).unwrap().interruptibility, BLOCKING_BY_MOV_SS);
    }
}
