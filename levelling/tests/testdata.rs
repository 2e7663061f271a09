//! Tests over every dump in `levelling/testdata/*.cpuid` (new dumps dropped there are
//! picked up automatically), plus property tests over derived policies.

use levelling::features::{self, *};
use levelling::policy::PolicyError;
use levelling::table::{CpuidTable, VcpuState};
use levelling::{Featureset, HostCpu, Policy, level, parse_dump, text};
use proptest::prelude::*;
use std::path::PathBuf;

fn dumps() -> Vec<(String, HostCpu)> {
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
        let h = HostCpu::from_records(&d.records).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.push((p.file_name().unwrap().to_string_lossy().into_owned(), h));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 3, "expected the checked-in dumps");
    out
}

fn full_dumps() -> Vec<(String, HostCpu)> {
    dumps().into_iter().filter(|(n, _)| !n.contains("partial")).collect()
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

#[test]
fn levelled_set_is_subset_of_each_host_except_or_bits() {
    let hosts = dumps();
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
    let (_, h) = dumps().into_iter().find(|(n, _)| n == "amd-epyc-kvm-host.cpuid").unwrap();
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
