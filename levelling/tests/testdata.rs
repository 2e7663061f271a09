//! Tests over every dump in `levelling/testdata/*.cpuid` (new dumps dropped there are
//! picked up automatically), plus property tests over derived policies.

use levelling::features::{self, *};
use levelling::guest::{DropReason, XstateGap};
use levelling::policy::PolicyError;
use levelling::table::{CpuidTable, VcpuState};
use levelling::{CpuidRecord, Featureset, HostCpu, Policy, Unfit, Vendor, level, parse_dump, text};
use proptest::prelude::*;
use std::path::PathBuf;

fn dumps() -> Vec<(String, HostCpu)> {
    dump_records()
        .into_iter()
        .map(|(n, r)| (n.clone(), HostCpu::from_records(&r).unwrap_or_else(|e| panic!("{n}: {e}"))))
        .collect()
}

/// The records of every checked-in dump, by file name.
fn dump_records() -> Vec<(String, Vec<CpuidRecord>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("cpuid") {
            continue;
        }
        let t = std::fs::read_to_string(&p).unwrap();
        let d = parse_dump(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(d.source.is_some(), "{}: every dump must say where it came from", p.display());
        out.push((p.file_name().unwrap().to_string_lossy().into_owned(), d.records));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 3, "expected the checked-in dumps");
    out
}

/// Full dumps of hosts that can run guests (the KVM development VM has no nested
/// virtualization, so it cannot).
fn full_dumps() -> Vec<(String, HostCpu)> {
    dumps().into_iter().filter(|(n, h)| !n.contains("partial") && h.cannot_run_guests().is_none()).collect()
}

fn records_of(name: &str) -> Vec<CpuidRecord> {
    dump_records().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no dump {name}")).1
}

/// Every dump, and from each one whose host reports XSAVE components: one variant per
/// component without its CPUID 0xD subleaf, one with its size zeroed, one without any
/// component subleaf, and one with no leaf 0xD at all.
fn xsave_variants() -> Vec<(String, Vec<CpuidRecord>)> {
    let mut out = Vec::new();
    for (n, recs) in dump_records() {
        let comps: Vec<u32> =
            recs.iter().filter(|r| r.leaf == 0xd && (2..64).contains(&r.subleaf)).map(|r| r.subleaf).collect();
        for &i in &comps {
            out.push((
                format!("{n} without 0xd[{i}]"),
                recs.iter().filter(|r| !(r.leaf == 0xd && r.subleaf == i)).copied().collect(),
            ));
            let mut zero = recs.clone();
            for r in zero.iter_mut().filter(|r| r.leaf == 0xd && r.subleaf == i) {
                r.regs[0] = 0;
            }
            out.push((format!("{n} with 0xd[{i}] size 0"), zero));
        }
        if !comps.is_empty() {
            out.push((
                format!("{n} without 0xd[2..]"),
                recs.iter().filter(|r| !(r.leaf == 0xd && r.subleaf >= 2)).copied().collect(),
            ));
            out.push((format!("{n} without leaf 0xd"), recs.iter().filter(|r| r.leaf != 0xd).copied().collect()));
        }
        out.push((n, recs));
    }
    out
}

fn set(fs: &mut [CpuidRecord], leaf: u32, subleaf: u32, reg: usize, f: impl Fn(u32) -> u32) {
    let r = fs
        .iter_mut()
        .find(|r| r.leaf == leaf && r.subleaf == subleaf)
        .unwrap_or_else(|| panic!("no leaf {leaf:#x}[{subleaf}]"));
    r.regs[reg] = f(r.regs[reg]);
}

#[test]
fn constructed_dumps_say_so() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("constructed-") {
            let d = parse_dump(&std::fs::read_to_string(&p).unwrap()).unwrap();
            assert!(d.source.unwrap().starts_with("CONSTRUCTED"), "{name}");
        }
    }
}

#[test]
fn host_dump_is_amd_under_kvm() {
    let (_, h) = dumps().into_iter().find(|(n, _)| n == "amd-epyc-kvm-host.cpuid").unwrap();
    assert_eq!(h.vendor, levelling::Vendor::Amd);
    assert_eq!(h.family(), 0x19);
    assert!(HYPERVISOR.is_in(&h.raw));
}

#[test]
fn derived_sets_are_dependency_closed_and_nested() {
    for (n, h) in dumps() {
        let max = h.max().set;
        let def = h.default_set().set;
        assert_eq!(features::first_missing_dependency(&max), None, "{n} max");
        assert_eq!(features::first_missing_dependency(&def), None, "{n} default");
        assert!(def.is_subset_of(&max), "{n}");
        for f in [VMX, SVM, MONITOR, PQM, PQE, OSXSAVE] {
            assert!(!f.is_in(&max), "{n}: {f}");
        }
        // max is host plus synthesized bits only.
        let synth = features::flag_mask(features::SYNTH);
        assert!(max.is_subset_of(&h.raw.or(&synth)), "{n}");
    }
}

#[test]
fn default_policy_verifies_on_its_own_full_host() {
    for (n, h) in full_dumps() {
        for vcpus in [1, 2, 4, 64] {
            let p = Policy::from_host(&h, h.default_set().set, vcpus);
            p.verify(&h).unwrap_or_else(|e| panic!("{n}: {e}"));
            let p = Policy::from_host(&h, h.max().set, vcpus);
            p.verify(&h).unwrap_or_else(|e| panic!("{n} max: {e}"));
        }
    }
}

/// Issue 14 item 4.1: `base=host-max` (and the default) verifies on the host it was
/// computed from, also when the host leaves XSAVE components undescribed; what max
/// gives up for that is in its drop list with the component named.
#[test]
fn max_and_default_verify_on_their_own_host_whatever_xsave_it_describes() {
    let variants = xsave_variants();
    assert!(variants.len() > 20, "expected XSAVE variants of the checked-in dumps, got {}", variants.len());
    let mut avx_dropped_for_component_2 = 0;
    for (n, recs) in &variants {
        let h = HostCpu::from_records(recs).unwrap_or_else(|e| panic!("{n}: {e}"));
        if h.cannot_run_guests().is_some() {
            continue;
        }
        for spec in ["base=host-max", "base=host-default", "base=host-max,vcpus=8"] {
            let (p, _) = text::parse_spec(spec).unwrap().policy_on(&h);
            p.verify(&h).unwrap_or_else(|e| panic!("{n}, {spec}: {e}"));
            CpuidTable::build(&p, &h).unwrap_or_else(|e| panic!("{n}, {spec}: {e}"));
        }
        let max = h.max();
        // Every XSAVE component max enables is one the host describes.
        let mask = levelling::policy::xstate_mask(&max.set);
        for i in 2..64u8 {
            if mask & (1 << i) != 0 {
                assert!(
                    h.xstate_component(i).is_some_and(|c| c.size != 0),
                    "{n}: component {i} enabled but undescribed"
                );
            }
        }
        if h.basic_max < 0xd {
            assert!(!XSAVE.is_in(&max.set), "{n}");
        }
        // A component that went takes its features with it, and the drop list says why.
        if AVX.is_in(&h.raw) && h.xstate_component(2).is_none() {
            assert!(!AVX.is_in(&max.set), "{n}");
            let why = max.dropped.iter().find(|(f, _)| *f == AVX).map(|(_, r)| r.clone());
            assert_eq!(why, Some(DropReason::XstateUndescribed { component: 2, gap: XstateGap::Missing }), "{n}");
            let msg = why.unwrap().to_string();
            assert!(msg.contains("CPUID 0xd[2]") && msg.contains("size as 0"), "{msg}");
            if AVX2.is_in(&h.raw) {
                assert!(
                    max.dropped.iter().any(|(f, r)| *f == AVX2 && *r == DropReason::MissingDependency(AVX)),
                    "{n}: {:?}",
                    max.dropped
                );
            }
            avx_dropped_for_component_2 += 1;
        }
    }
    // Without 0xd[2], with 0xd[2] size 0, without 0xd[2..] for every AVX host.
    assert!(avx_dropped_for_component_2 >= 3 * 4, "{avx_dropped_for_component_2}");
}

#[test]
fn max_drops_features_of_components_the_host_lays_out_wrongly() {
    let genoa = records_of("constructed-amd-epyc-9654-genoa.cpuid");
    let full = HostCpu::from_records(&genoa).unwrap();
    assert!(AVX512F.is_in(&full.max().set) && AVX.is_in(&full.max().set));
    // Component 5 (opmask) placed on top of component 2: AVX stays, AVX-512 goes.
    let mut overlap = genoa.clone();
    let avx_offset = full.xstate_component(2).unwrap().offset;
    set(&mut overlap, 0xd, 5, 1, |_| avx_offset);
    let h = HostCpu::from_records(&overlap).unwrap();
    let max = h.max();
    assert!(AVX.is_in(&max.set) && !AVX512F.is_in(&max.set));
    assert!(
        max.dropped.contains(&(
            AVX512F,
            DropReason::XstateUndescribed { component: 5, gap: XstateGap::Overlaps { other: 2 } }
        ))
    );
    assert!(max.dropped.iter().any(|(f, r)| *f == AVX512BW && *r == DropReason::MissingDependency(AVX512F)));
    Policy::from_host(&h, max.set.clone(), 2).verify(&h).unwrap();
    // Asking for it anyway is refused, naming the component.
    let (p, _) = text::parse_spec("base=host-max,+avx512f").unwrap().policy_on(&h);
    let msg = p.verify(&h).unwrap_err().to_string();
    assert!(
        msg.contains(
            "avx512f (CPUID 0x7[0].EBX bit 16) is set, but this host's max leaves it out (needs XSAVE component 5"
        ),
        "{msg}"
    );
    // Component 2 inside the legacy area, or marked supervisor.
    for (reg, value, gap) in [(1, 512, XstateGap::BadLayout { size: 256, offset: 512 }), (2, 1, XstateGap::Supervisor)]
    {
        let mut bad = genoa.clone();
        set(&mut bad, 0xd, 2, reg, |_| value);
        let h = HostCpu::from_records(&bad).unwrap();
        let max = h.max();
        assert!(max.dropped.contains(&(AVX, DropReason::XstateUndescribed { component: 2, gap })), "{:?}", max.dropped);
        Policy::from_host(&h, max.set, 1).verify(&h).unwrap();
    }
    // XSAVE with no leaf 0xD to describe it: XSAVE and all that needs it go.
    let mut low = genoa.clone();
    set(&mut low, 0, 0, 0, |_| 0xc);
    let h = HostCpu::from_records(&low).unwrap();
    let max = h.max();
    assert!(max.dropped.contains(&(XSAVE, DropReason::NoXsaveLeaf { basic_max: 0xc })));
    assert!(!AVX.is_in(&max.set) && SSE2.is_in(&max.set));
    Policy::from_host(&h, max.set, 1).verify(&h).unwrap();
}

/// Issue 14 item 4.2: a host that cannot run guests gets that one reason.
#[test]
fn a_host_that_cannot_run_guests_gets_one_reason() {
    let genoa = records_of("constructed-amd-epyc-9654-genoa.cpuid");
    let g = HostCpu::from_records(&genoa).unwrap();
    let policy = Policy::from_host(&g, g.default_set().set, 2);
    policy.verify(&g).unwrap();
    // A 32-bit CPU: no long mode and 32 linear address bits, which would otherwise
    // also be an address-width complaint and many missing features.
    let mut no_lm = genoa.clone();
    set(&mut no_lm, 0x8000_0001, 0, 3, |edx| edx & !(1 << 29));
    set(&mut no_lm, 0x8000_0008, 0, 0, |eax| (eax & !0xffff) | (32 << 8) | 32);
    // Neither VMX nor SVM.
    let mut no_svm = genoa.clone();
    set(&mut no_svm, 0x8000_0001, 0, 2, |ecx| ecx & !(1 << 2));
    // Both: long mode is named.
    let mut neither = no_lm.clone();
    set(&mut neither, 0x8000_0001, 0, 2, |ecx| ecx & !(1 << 2));
    for (n, recs, why, text) in [
        ("no lm", no_lm, Unfit::NoLongMode, "no long mode: lm (CPUID 0x80000001.EDX bit 29) is clear or missing"),
        (
            "no svm",
            no_svm,
            Unfit::NoVirtualization,
            "neither VMX nor SVM: vmx (CPUID 0x1.ECX bit 5) and svm (CPUID 0x80000001.ECX bit 2) are both clear",
        ),
        ("neither", neither, Unfit::NoLongMode, "no long mode"),
    ] {
        let h = HostCpu::from_records(&recs).unwrap();
        assert_eq!(h.cannot_run_guests(), Some(why), "{n}");
        let rej = policy.verify(&h).unwrap_err();
        assert_eq!(rej.errors, vec![PolicyError::HostCannotRunGuests(why)], "{n}");
        let msg = rej.to_string();
        assert!(msg.starts_with("policy rejected (1 problem); this host cannot run guests: "), "{msg}");
        assert!(msg.contains(text), "{n}: {msg}");
        // Its own max is empty and refused the same way; each host bit says why.
        let max = h.max();
        assert!(max.set.is_empty(), "{n}");
        assert_eq!(max.dropped.len(), h.raw.bits().count());
        assert!(max.dropped.iter().all(|(_, r)| *r == DropReason::HostCannotRunGuests(why)));
        let rej = Policy::from_host(&h, h.default_set().set, 1).verify(&h).unwrap_err();
        assert_eq!(rej.errors.len(), 1, "{n}: {rej}");
        assert!(CpuidTable::build(&policy, &h).is_err());
    }
    // The development machine's KVM guest has neither.
    let (_, kvm) = dumps().into_iter().find(|(n, _)| n == "amd-epyc-kvm-host.cpuid").unwrap();
    assert_eq!(kvm.cannot_run_guests(), Some(Unfit::NoVirtualization));
    // With VMX instead of SVM it can.
    let mut vmx = genoa;
    set(&mut vmx, 0x8000_0001, 0, 2, |ecx| ecx & !(1 << 2));
    set(&mut vmx, 1, 0, 2, |ecx| ecx | (1 << 5));
    assert_eq!(HostCpu::from_records(&vmx).unwrap().cannot_run_guests(), None);
}

#[test]
fn levelled_set_is_subset_of_each_host_except_or_bits() {
    let hosts = full_dumps();
    let maxes: Vec<Featureset> = hosts.iter().map(|(_, h)| h.max().set).collect();
    let l = level(&maxes);
    let or = features::flag_mask(features::OR);
    for ((n, _), m) in hosts.iter().zip(&maxes) {
        assert!(l.common.and_not(&or).is_subset_of(m), "{n}");
    }
    assert_eq!(features::first_missing_dependency(&l.common), None);
    for (lost, m) in l.lost.iter().zip(&maxes) {
        assert_eq!(lost.or(&l.common.and(m)), *m);
    }
}

#[test]
fn avx2_without_avx_is_rejected_naming_the_chain() {
    let (_, h) = dumps().into_iter().find(|(n, _)| n == "qemu-7.2-tcg-epyc.cpuid").unwrap();
    let spec = text::parse_spec("base=host-default,-avx,+avx2").unwrap();
    let (p, notes) = spec.policy_on(&h);
    assert!(!notes.is_empty(), "-avx should report what it also cleared");
    let rej = p.verify(&h).unwrap_err();
    let e = rej
        .errors
        .iter()
        .find(|e| matches!(e, PolicyError::MissingDependency { feature, .. } if *feature == AVX2))
        .expect("avx2 rejected");
    let msg = e.to_string();
    assert!(msg.contains("avx2 (CPUID 0x7[0].EBX bit 5)"), "{msg}");
    assert!(msg.contains("avx2 -> avx"), "{msg}");
    assert!(msg.contains("avx (CPUID 0x1.ECX bit 28)"), "{msg}");
}

#[test]
fn not_offered_bits_name_the_reason() {
    let (_, h) = dumps().into_iter().find(|(n, _)| n.contains("sapphire")).unwrap();
    let mut fs = h.default_set().set;
    fs.set_bit(VMX.word(), VMX.bit(), true);
    let rej = Policy::from_host(&h, fs, 1).verify(&h).unwrap_err();
    let msg = rej.to_string();
    assert!(
        msg.contains("vmx (CPUID 0x1.ECX bit 5) is set, but it is never offered to guests (nested virtualization"),
        "{msg}"
    );
}

/// Bochs 2.7 reports XSAVEC but its XSAVEC writes the compacted format wrongly (the
/// hypervisor's boot check finds that and marks it): max and default then leave it
/// out with the finding, nothing else changes, and a policy that asks for it is
/// refused with that reason.
#[test]
fn a_feature_marked_faulty_leaves_max_and_default_with_the_finding() {
    let (_, mut h) = dumps().into_iter().find(|(n, _)| n.contains("skylake-x")).unwrap();
    assert!(XSAVEC.is_in(&h.raw), "the Bochs dump reports xsavec");
    let before = (h.max().set, h.default_set().set);
    assert!(XSAVEC.is_in(&before.0) && XSAVEC.is_in(&before.1));
    h.mark_faulty(XSAVEC, "it wrote the AVX component at offset 416, not 576".into());
    h.mark_faulty(XSAVEC, "a second finding is not recorded twice".into());
    assert_eq!(h.faults.len(), 1);
    let max = h.max();
    assert!(!XSAVEC.is_in(&max.set));
    let mut expected = before.0;
    expected.set_bit(XSAVEC.word(), XSAVEC.bit(), false);
    assert_eq!(max.set, expected, "only xsavec goes (nothing requires it)");
    let why = max.dropped.iter().find(|(f, _)| *f == XSAVEC).map(|(_, r)| r.to_string());
    assert_eq!(why.as_deref(), Some("faulty on this host: it wrote the AVX component at offset 416, not 576"));
    assert!(!XSAVEC.is_in(&h.default_set().set));
    // base=host-max verifies here without it; a policy that sets it is refused, saying why.
    let (p, _) = text::parse_spec("base=host-max").unwrap().policy_on(&h);
    p.verify(&h).unwrap();
    let mut fs = max.set;
    fs.set_bit(XSAVEC.word(), XSAVEC.bit(), true);
    let msg = Policy::from_host(&h, fs, 1).verify(&h).unwrap_err().to_string();
    assert!(msg.contains("xsavec") && msg.contains("faulty on this host: it wrote the AVX component"), "{msg}");
}

#[test]
fn cross_vendor_and_missing_features_are_incompatible() {
    let hosts = full_dumps();
    let (_, intel) = hosts.iter().find(|(n, _)| n.contains("sapphire")).unwrap();
    let (_, genoa) = hosts.iter().find(|(n, _)| n.contains("genoa")).unwrap();
    let p = Policy::from_host(intel, intel.default_set().set, 2);
    let rej = p.verify(genoa).unwrap_err();
    assert!(rej.errors.iter().any(|e| matches!(e, PolicyError::VendorMismatch { .. })));
    assert!(rej.errors.iter().any(|e| matches!(e, PolicyError::NotOffered { feature, .. } if *feature == AVX512_FP16)));
}

#[test]
fn xsave_layout_mismatch_is_rejected() {
    let hosts = full_dumps();
    let (_, genoa) = hosts.iter().find(|(n, _)| n.contains("genoa")).unwrap();
    let mut p = Policy::from_host(genoa, genoa.default_set().set, 2);
    p.xstate.iter_mut().find(|c| c.index == 5).unwrap().offset = 1088;
    let rej = p.verify(genoa).unwrap_err();
    assert!(rej.errors.iter().any(|e| matches!(e, PolicyError::XstateLayout { component: 5, .. })), "{rej}");
    let mut p = Policy::from_host(genoa, genoa.default_set().set, 2);
    p.xstate.retain(|c| c.index != 2);
    let rej = p.verify(genoa).unwrap_err();
    assert!(rej.to_string().contains("CPUID 0xd[2]"), "{rej}");
}

#[test]
fn lookup_table_answers_and_zero_fills() {
    let hosts = full_dumps();
    let (_, genoa) = hosts.iter().find(|(n, _)| n.contains("genoa")).unwrap();
    let p = Policy::from_host(genoa, genoa.default_set().set, 4);
    let t = CpuidTable::build(&p, genoa).unwrap();
    let l0 = t.lookup(0, 0);
    assert_eq!(l0[0], 0xd);
    let l7 = t.lookup(7, 0);
    assert!(l7[1] & (1 << AVX512F.bit()) != 0);
    assert_eq!(t.lookup(7, 5), [0; 4]);
    assert_eq!(t.lookup(0xf, 0), [0; 4], "RDT leaf must not leak");
    assert_eq!(t.lookup(0x4000_0000, 0), [0; 4]);
    assert_eq!(t.lookup(0x8000_001f, 0), [0; 4]);
    assert_eq!(t.lookup(0xffff_ffff, 0xffff_ffff), [0; 4]);
    // 0x8000_0001.EDX has the AMD duplicates of 1.EDX.
    assert_eq!(t.lookup(0x8000_0001, 0)[3] & features::COMMON_1D, t.lookup(1, 0)[3] & features::COMMON_1D);
    // Dynamic fields.
    let v = VcpuState { apic_id: 3, cr4_osxsave: true, cr4_pke: false, apic_enabled: true, xcr0: 0x7, xss: 0 };
    let l1 = t.lookup_vcpu(1, 0, &v);
    assert_eq!(l1[1] >> 24, 3);
    assert!(l1[2] & (1 << OSXSAVE.bit()) != 0);
    assert_eq!(t.lookup(1, 0)[2] & (1 << OSXSAVE.bit()), 0);
    assert_eq!(t.lookup_vcpu(0xd, 0, &v)[1], 832, "x87+SSE+AVX ends at 576+256");
    let v2 = VcpuState { xcr0: 0xe7, ..v };
    assert_eq!(t.lookup_vcpu(0xd, 0, &v2)[1], 2432);
    // PKU is not offered (PKRU is not switched by the core): the largest size ends
    // with Hi16_ZMM, not with PKRU at 2432+8.
    assert_eq!(t.lookup(0xd, 0)[2], 2432, "max size ends with the AVX-512 state");
    assert_eq!(t.lookup_vcpu(0xb, 1, &v)[3], 3);
    assert_eq!(t.lookup(0xb, 1)[1], 4);
}

#[test]
fn rejected_policy_never_builds_a_table() {
    let (_, h) = full_dumps().into_iter().next().unwrap();
    let p = Policy::from_host(&h, h.default_set().set, 0);
    assert!(CpuidTable::build(&p, &h).is_err());
}

#[test]
fn policy_text_and_postcard_round_trip_on_every_host() {
    for (n, h) in full_dumps() {
        let p = Policy::from_host(&h, h.default_set().set, 8);
        let bytes = p.to_postcard().unwrap();
        let back = Policy::from_postcard(&bytes).unwrap();
        assert_eq!(back, p, "{n}");
        assert_eq!(back.stable_hash(), p.stable_hash());
        let spec = text::parse_spec(&p.to_text()).unwrap();
        let (again, notes) = spec.policy_on(&h);
        assert!(notes.is_empty());
        assert_eq!(again, p, "{n}");
        let fs = h.max().set;
        let spec = text::parse_spec(&text::featureset_to_spec(&fs)).unwrap();
        assert_eq!(spec.featureset_on(&h).0, fs, "{n}");
        assert_eq!(fs.to_string().parse::<Featureset>().unwrap(), fs);
    }
}

fn arb_featureset() -> impl Strategy<Value = Featureset> {
    prop::collection::vec(any::<u32>(), 0..levelling::NWORDS + 2).prop_map(|w| Featureset::from_words(&w))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the host claims, derived max/default honour every dependency, and a
    /// policy built from them verifies on a host that has the XSAVE components.
    #[test]
    fn derived_from_random_hosts_honour_dependencies(raw in arb_featureset()) {
        let max = levelling::guest::guest_max(&raw).set;
        let def = levelling::guest::guest_default(&max).set;
        prop_assert_eq!(features::first_missing_dependency(&max), None);
        prop_assert_eq!(features::first_missing_dependency(&def), None);
        prop_assert!(def.is_subset_of(&max));
        for (f, _) in features::REQUIRES {
            if f.is_in(&max) {
                prop_assert!(features::deep_requires(*f).is_subset_of(&max));
            }
        }
    }

    /// Whatever XSAVE layout a host reports for components 2..=18 (missing, size 0,
    /// supervisor, inside the legacy area, overlapping), its max and default verify on it.
    #[test]
    fn max_verifies_whatever_the_xsave_layout(
        host_i in 0usize..8,
        layout in prop::collection::vec((any::<bool>(), prop_oneof![Just(0u32), 1u32..4096, any::<u32>()], prop_oneof![0u32..4096, any::<u32>()], 0u32..4), 17),
        basic_max in prop_oneof![Just(None), (0xbu32..0x20).prop_map(Some)],
    ) {
        let all = dump_records();
        let (n, recs) = &all[host_i % all.len()];
        let mut recs: Vec<CpuidRecord> = recs.iter().filter(|r| !(r.leaf == 0xd && r.subleaf >= 2)).copied().collect();
        for (k, (present, size, offset, flags)) in layout.into_iter().enumerate() {
            if present {
                recs.push(CpuidRecord { leaf: 0xd, subleaf: k as u32 + 2, regs: [size, offset, flags, 0] });
            }
        }
        if let Some(m) = basic_max {
            set(&mut recs, 0, 0, 0, |_| m);
        }
        let h = HostCpu::from_records(&recs).unwrap();
        if h.cannot_run_guests().is_none() {
            for fs in [h.max().set, h.default_set().set] {
                let p = Policy::from_host(&h, fs, 2);
                prop_assert!(p.verify(&h).is_ok(), "{}: {}", n, p.verify(&h).unwrap_err());
            }
        }
    }

    /// Any `-feature` modifier applied to a host's max leaves a dependency-closed set
    /// that verifies.
    #[test]
    fn clearing_features_keeps_policies_valid(idx in prop::collection::vec(0usize..FEATURES.len(), 0..6), host_i in 0usize..8) {
        let hosts = full_dumps();
        let (_, h) = &hosts[host_i % hosts.len()];
        let mut spec = String::from("base=host-max");
        for i in idx {
            spec.push_str(",-");
            spec.push_str(FEATURES[i].name);
        }
        let (p, _) = text::parse_spec(&spec).unwrap().policy_on(h);
        prop_assert_eq!(features::first_missing_dependency(&p.features), None);
        prop_assert!(p.verify(h).is_ok(), "{}", spec);
    }

    /// Levelled sets of random hosts: dependency-closed, AND-part within each input.
    #[test]
    fn levelling_random_hosts(raws in prop::collection::vec(arb_featureset(), 1..5)) {
        let maxes: Vec<Featureset> = raws.iter().map(|r| levelling::guest::guest_max(r).set).collect();
        let l = level(&maxes);
        let or = features::flag_mask(features::OR);
        for m in &maxes {
            prop_assert!(l.common.and_not(&or).is_subset_of(m));
        }
        prop_assert_eq!(features::first_missing_dependency(&l.common), None);
    }

    /// Featuresets round-trip through postcard and the hex text form.
    #[test]
    fn featureset_round_trips(fs in arb_featureset()) {
        let back = Featureset::from_postcard(&fs.to_postcard().unwrap()).unwrap();
        prop_assert_eq!(&back, &fs);
        prop_assert_eq!(back.stable_hash(), fs.stable_hash());
        let parsed: Featureset = fs.to_string().parse().unwrap();
        prop_assert_eq!(parsed, fs);
    }

    /// The text parser never panics and errors are one line.
    #[test]
    fn text_parser_total(s in ".{0,200}") {
        if let Err(e) = text::parse_spec(&s) {
            prop_assert!(!e.to_string().contains('\n'));
        }
    }

    /// The dump parser never panics.
    #[test]
    fn dump_parser_total(s in "# hvctl cpuid dump v1\n[0-9a-f #\n]{0,300}") {
        let _ = parse_dump(&s);
    }

    /// Lookups on any built table never panic, and uncovered leaves are zero.
    #[test]
    fn lookups_total(leaf in any::<u32>(), sub in any::<u32>(), vcpus in 1u32..300) {
        let hosts = full_dumps();
        let (_, h) = &hosts[0];
        let t = CpuidTable::from_verified(&Policy::from_host(h, h.default_set().set, vcpus));
        let r = t.lookup(leaf, sub);
        if (0x0e..0x8000_0000).contains(&leaf) || leaf > 0x8000_0021 {
            prop_assert_eq!(r, [0; 4]);
        }
    }
}

#[test]
fn max_leaf_hides_higher_leaves_and_says_which_features_went() {
    let (_, h) = dumps().into_iter().find(|(n, _)| n == "bochs-2.7-corei7-skylake-x.cpuid").unwrap();
    let spec = text::parse_spec("base=host-max,max-leaf=6").unwrap();
    let (policy, notes) = spec.policy_on(&h);
    assert_eq!(policy.basic_max, 6);
    assert!(!AVX2.is_in(&policy.features), "avx2 lives in leaf 7 and must go");
    assert!(notes.iter().any(|n| n.to_string().starts_with("max-leaf=0x6 also cleared")), "{notes:?}");
    let table = CpuidTable::build(&policy, &h).unwrap();
    assert_eq!(table.lookup(0, 0)[0], 6);
    assert_eq!(table.lookup(7, 0), [0; 4], "leaves above the maximum read zero");
    assert_ne!(table.lookup(1, 0), [0; 4]);
    // The text form carries it, and reads back to the same policy.
    let again = text::parse_spec(&policy.to_text()).unwrap().policy_on(&h).0;
    assert_eq!(again, policy);
    // Above the host's maximum: refused by verification, not clamped.
    let (too_high, _) = text::parse_spec("max-leaf=0x40").unwrap().policy_on(&h);
    assert!(too_high.verify(&h).is_err());
}

/// Issue 14 item 4.3: Hygon is decoded and levelled as AMD-compatible.
#[test]
fn hygon_dhyana_is_levelled_like_amd() {
    let (_, h) = full_dumps().into_iter().find(|(n, _)| n == "qemu-7.2-tcg-dhyana.cpuid").expect("the Dhyana dump");
    assert_eq!(h.vendor, Vendor::Hygon);
    assert!(h.vendor.is_amd_compatible());
    assert_eq!(h.family(), 0x18, "Dhyana is family 0x18");
    assert!(SVM.is_in(&h.raw) && LM.is_in(&h.raw));
    assert_eq!(h.cannot_run_guests(), None);
    assert!(h.cache_leaf4.is_empty(), "caches come from 0x8000_0005/6, as on AMD");
    assert_ne!(h.cache_ext, [0; 4]);
    let p = Policy::from_host(&h, h.default_set().set, 4);
    assert_eq!(p.vendor, Vendor::Hygon);
    let t = CpuidTable::build(&p, &h).unwrap();
    // The guest's vendor string stays HygonGenuine, in leaf 0 and (AMD layout) 0x8000_0000.
    let vendor = |r: [u32; 4]| -> Vec<u8> { [r[1], r[3], r[2]].iter().flat_map(|w| w.to_le_bytes()).collect() };
    assert_eq!(vendor(t.lookup(0, 0)), b"HygonGenuine");
    assert_eq!(vendor(t.lookup(0x8000_0000, 0)), b"HygonGenuine");
    // AMD's extended leaves: signature and 1.EDX duplicates in 0x8000_0001, caches in
    // 0x8000_0005, no Intel leaf 2, the core count in 0x8000_0008.ECX.
    let e1 = t.lookup(0x8000_0001, 0);
    assert_eq!(e1[0], h.signature);
    assert_eq!(e1[3] & features::COMMON_1D, t.lookup(1, 0)[3] & features::COMMON_1D);
    assert_ne!(e1[3] & features::COMMON_1D, 0);
    assert_eq!(t.lookup(0x8000_0005, 0)[2..], h.cache_ext[..2]);
    assert_eq!(t.lookup(2, 0), [0; 4]);
    assert_eq!(t.lookup(0x8000_0008, 0)[2] & 0xff, 3);
    // The same policy with an Intel vendor gets Intel's layout instead.
    let intel = CpuidTable::from_verified(&Policy { vendor: Vendor::Intel, ..p.clone() });
    assert_eq!(intel.lookup(0x8000_0001, 0)[3] & features::COMMON_1D, 0);
    // Text form and postcard carry it.
    assert!(p.to_text().contains("vendor=hygon\n"));
    assert_eq!(text::parse_spec(&p.to_text()).unwrap().policy_on(&h).0, p);
    assert_eq!(Policy::from_postcard(&p.to_postcard().unwrap()).unwrap(), p);
    assert_eq!(text::parse_spec("vendor=HygonGenuine").unwrap().vendor, Some(Vendor::Hygon));
    assert_eq!(text::parse_spec("vendor=via").unwrap_err().what, "unknown vendor (intel, amd, hygon)");
}

/// Featuresets level across AMD and Hygon; a policy names one vendor and is refused
/// on the other's hosts.
#[test]
fn amd_and_hygon_level_but_policies_do_not_cross() {
    let hosts = full_dumps();
    let (_, hygon) = hosts.iter().find(|(n, _)| n.contains("dhyana")).unwrap();
    let (_, epyc) = hosts.iter().find(|(n, _)| n == "qemu-7.2-tcg-epyc.cpuid").unwrap();
    let l = level(&[hygon.max().set, epyc.max().set]);
    assert!(l.common.is_subset_of(&hygon.max().set) && l.common.is_subset_of(&epyc.max().set));
    assert!(SSE2.is_in(&l.common));
    for (from, on) in [(hygon, epyc), (epyc, hygon)] {
        let p = Policy::from_host(from, l.common.clone(), 1);
        p.verify(from).unwrap();
        let rej = p.verify(on).unwrap_err();
        assert_eq!(
            rej.errors,
            vec![PolicyError::VendorMismatch {
                policy: from.vendor,
                host: on.vendor,
                levelled_for: levelling::VendorSet::of(from.vendor)
            }],
            "{rej}"
        );
    }
    let msg = Policy::from_host(hygon, l.common, 1).verify(epyc).unwrap_err().to_string();
    assert!(msg.contains("the policy is for HygonGenuine but the host is AuthenticAMD"), "{msg}");
}

/// Vendor is encoded by variant index in policies (postcard): Hygon was added at the
/// end, so the encodings of Intel and AMD policies are unchanged.
#[test]
fn vendor_encodings_are_stable() {
    for (v, byte) in [(Vendor::Intel, 0u8), (Vendor::Amd, 1), (Vendor::Hygon, 2)] {
        assert_eq!(postcard::to_allocvec(&v).unwrap(), [byte], "{v}");
    }
}
