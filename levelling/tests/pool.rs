//! Pools of hosts, one vendor and several: `level_pool` over every pair and triple of
//! the checked-in dumps, the cross-vendor rules, and the EPYC (QEMU) + Skylake-X
//! (Bochs) pool the end-to-end migration uses.

use levelling::crossvendor::{self, Action, Caveat, RULES, Subject};
use levelling::features::{self, *};
use levelling::policy::PolicyError;
use levelling::pool::{PoolDrop, PoolError};
use levelling::{CpuidTable, HostCpu, Policy, Vendor, VendorSet, level, level_pool, parse_dump, text};
use std::path::PathBuf;

fn load(name: &str) -> HostCpu {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
    let d = parse_dump(&std::fs::read_to_string(&p).unwrap()).unwrap();
    HostCpu::from_records(&d.records).unwrap()
}

/// Every checked-in dump of a host that can run guests, by name.
fn fit_hosts() -> Vec<(String, HostCpu)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cpuid"))
        .collect();
    names.sort();
    let hosts: Vec<(String, HostCpu)> =
        names.into_iter().map(|n| (n.clone(), load(&n))).filter(|(_, h)| h.cannot_run_guests().is_none()).collect();
    assert!(hosts.len() >= 6, "{}", hosts.len());
    hosts
}

const EPYC: &str = "qemu-7.2-tcg-epyc.cpuid";
const SKX: &str = "bochs-2.7-corei7-skylake-x.cpuid";

/// Every leaf and subleaf a guest can ask that a policy may answer.
fn answers(t: &CpuidTable) -> Vec<[u32; 4]> {
    let mut v = Vec::new();
    for leaf in (0..=0x20u32).chain(0x8000_0000..=0x8000_0028) {
        for sub in 0..64 {
            v.push(t.lookup(leaf, sub));
        }
    }
    v
}

fn vendor_of(r: [u32; 4]) -> Vec<u8> {
    [r[1], r[3], r[2]].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The policy's text form and one-line spec, applied on `host`, give the policy back
/// (what `hvctl domain create --cpuid` does on each host of the pool).
fn spec_gives_back(p: &Policy, host: &HostCpu, what: &str) {
    for spec in [p.to_text(), p.to_spec()] {
        let (again, notes) = text::parse_spec(&spec).unwrap_or_else(|e| panic!("{what}: {e}\n{spec}")).policy_on(host);
        assert!(notes.is_empty(), "{what}: {notes:?}");
        assert_eq!(&again, p, "{what}:\n{spec}");
    }
}

#[test]
fn epyc_and_skylake_x_present_amd_on_both() {
    let (epyc, skx) = (load(EPYC), load(SKX));
    let pool = level_pool(&[epyc.clone(), skx.clone()], None).unwrap();
    let p = &pool.policy;
    assert_eq!(pool.presented_from, 0);
    assert_eq!(p.vendor, Vendor::Amd, "the first host's vendor by default");
    assert_eq!(p.signature, epyc.signature);
    assert_eq!(p.brand, epyc.brand);
    assert_eq!(p.cache_ext, epyc.cache_ext);
    assert!(p.cache_leaf4.is_empty());
    assert_eq!(p.allowed_vendors(), VendorSet::of(Vendor::Amd).with(Vendor::Intel));
    assert!(p.is_cross_vendor());
    assert_eq!(p.phys_bits, epyc.phys_bits.min(skx.phys_bits));
    assert_eq!(p.basic_max, 0xd);
    assert_eq!(p.ext_max, 0x8000_0008);
    for h in [&epyc, &skx] {
        p.verify(h).unwrap();
    }
    // The same guest view on both hosts, built from the spec each host receives.
    let tables: Vec<Vec<[u32; 4]>> = [&epyc, &skx]
        .iter()
        .map(|h| {
            let (q, _) = text::parse_spec(&p.to_spec()).unwrap().policy_on(h);
            answers(&CpuidTable::build(&q, h).unwrap())
        })
        .collect();
    assert_eq!(tables[0], tables[1]);
    let t = CpuidTable::build(p, &skx).unwrap();
    assert_eq!(vendor_of(t.lookup(0, 0)), b"AuthenticAMD");
    assert_eq!(vendor_of(t.lookup(0x8000_0000, 0)), b"AuthenticAMD");
    assert_eq!(t.lookup(1, 0)[0], 0x0080_0f12, "EPYC family 0x17 model 1 stepping 2");
    assert_eq!(t.lookup(0x8000_0001, 0)[0], 0x0080_0f12);
    assert_eq!(t.lookup(4, 0), [0; 4], "no Intel cache leaf for an AMD guest");
    assert_eq!(t.lookup(0x8000_0005, 0)[2..], epyc.cache_ext[..2]);
    // What survives: the AVX2-level x86-64 both have; what goes: AMD-only and Intel-only bits.
    for f in [SSE4_2, AVX, AVX2, XSAVE, SYSCALL, LM, NX, FSGSBASE, SMEP, SMAP, BMI2, ADX, SEP, PAGE1GB] {
        assert!(f.is_in(&p.features), "{f}");
    }
    for f in [SSE4A, MMXEXT, AVX512F, PCID, INVPCID, X2APIC, XSAVEC] {
        assert!(!f.is_in(&p.features), "{f}");
    }
    // The XSAVE layouts agree (AVX at 576 on both), so nothing is dropped for them.
    assert!(pool.dropped.is_empty(), "{:?}", pool.dropped);
    // Caveats of an AMD guest on the Intel host, none on the AMD one.
    let names: Vec<&str> = pool.caveats.iter().map(|c| c.caveat.name()).collect();
    assert_eq!(names, ["syscall-compat-ud", "vendor-msrs", "vendor-exempt-mitigations"]);
    assert!(pool.caveats.iter().all(|c| c.hosts == [1]));
    assert_eq!(p.caveats_on(&skx), [Caveat::SyscallCompat, Caveat::VendorMsrs, Caveat::VendorExemptMitigations]);
    assert!(p.caveats_on(&epyc).is_empty());
    let text = p.to_text();
    assert!(text.contains("\nvendor=amd\nhost-vendors=intel+amd\n"), "{text}");
    assert!(text.contains("\nbrand=AMD EPYC Processor\n"), "{text}");
    assert!(
        text.contains("# caveats on GenuineIntel hosts: syscall-compat-ud vendor-msrs vendor-exempt-mitigations\n")
    );
    spec_gives_back(p, &epyc, "on EPYC");
    spec_gives_back(p, &skx, "on Skylake-X");
}

#[test]
fn epyc_and_skylake_x_present_intel_when_asked() {
    let (epyc, skx) = (load(EPYC), load(SKX));
    let pool = level_pool(&[epyc.clone(), skx.clone()], Some(Vendor::Intel)).unwrap();
    let p = &pool.policy;
    assert_eq!((p.vendor, pool.presented_from), (Vendor::Intel, 1));
    assert_eq!(p.signature, skx.signature);
    assert_eq!(p.cache_leaf4, skx.cache_leaf4);
    let t = CpuidTable::build(p, &epyc).unwrap();
    assert_eq!(vendor_of(t.lookup(0, 0)), b"GenuineIntel");
    assert_eq!(t.lookup(0x8000_0000, 0)[1..], [0, 0, 0]);
    assert_eq!(t.lookup(0x8000_0001, 0)[3] & features::COMMON_1D, 0, "no AMD duplicates for an Intel guest");
    assert_ne!(t.lookup(4, 0), [0; 4]);
    let on_epyc = p.caveats_on(&epyc);
    for c in [
        Caveat::SysenterCompat,
        Caveat::SysenterMsrWidth,
        Caveat::SysretSsAttrs,
        Caveat::NullSelectorBase,
        Caveat::VendorMsrs,
        Caveat::VendorKeyedMitigations,
    ] {
        assert!(on_epyc.contains(&c), "{c:?}: {on_epyc:?}");
    }
    // Zen 4 clears the base of a null selector: that caveat goes away there.
    let genoa = load("constructed-amd-epyc-9654-genoa.cpuid");
    let pool = level_pool(&[skx.clone(), genoa.clone()], None).unwrap();
    assert!(!pool.policy.caveats_on(&genoa).contains(&Caveat::NullSelectorBase));
    spec_gives_back(&pool.policy, &genoa, "Intel on Genoa");
}

#[test]
fn differing_xsave_layouts_drop_their_features_with_the_reason() {
    // Genoa has AVX-512 at 832.. (no MPX room), Sapphire Rapids at 1088..
    let genoa = load("constructed-amd-epyc-9654-genoa.cpuid");
    let spr = load("constructed-intel-xeon-8480-sapphire-rapids.cpuid");
    assert_eq!(genoa.xstate_component(5).unwrap().offset, 832);
    assert_eq!(spr.xstate_component(5).unwrap().offset, 1088);
    // Naively, the common set presented from Genoa does not verify on Sapphire Rapids.
    let common = level(&[genoa.max().set, spr.max().set]).common;
    assert!(AVX512F.is_in(&common));
    let rej = Policy::from_host(&genoa, common, 1).verify(&spr).unwrap_err();
    assert!(rej.errors.iter().any(|e| matches!(e, PolicyError::XstateLayout { component: 5, .. })), "{rej}");
    // The pool drops AVX-512 (and what requires it), saying why, and verifies on both.
    for presented in [Vendor::Amd, Vendor::Intel] {
        let pool = level_pool(&[genoa.clone(), spr.clone()], Some(presented)).unwrap();
        let p = &pool.policy;
        assert!(AVX.is_in(&p.features) && AVX2.is_in(&p.features));
        assert!(!AVX512F.is_in(&p.features) && !AVX512BW.is_in(&p.features));
        let (_, why) = pool.dropped.iter().find(|(f, _)| *f == AVX512F).unwrap();
        assert!(matches!(why, PoolDrop::XstateLayout { component: 5, .. }), "{why:?}");
        let msg = why.describe(|i| ["genoa", "spr"][i].to_string());
        assert!(msg.contains("XSAVE component 5 (CPUID 0xd[5]) is laid out differently"), "{msg}");
        assert!(
            msg.contains("size 64 at offset 832 on genoa") || msg.contains("size 64 at offset 1088 on spr"),
            "{msg}"
        );
        assert!(pool.dropped.iter().any(|(f, r)| *f == AVX512BW && *r == PoolDrop::MissingDependency(AVX512F)));
        p.verify(&genoa).unwrap();
        p.verify(&spr).unwrap();
        assert!(pool.lost[0].is_empty() || AVX512F.is_in(&pool.lost[0]));
    }
}

#[test]
fn every_pair_and_triple_levels_and_verifies_on_every_host() {
    let hosts = fit_hosts();
    let n = hosts.len();
    let mut pools = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if i != j {
                pools.push(vec![i, j]);
            }
            for k in j + 1..n {
                if i != j && i != k {
                    pools.push(vec![i, j, k]);
                }
            }
        }
    }
    let or = features::flag_mask(features::OR);
    let mut cross = 0;
    for idx in pools {
        let members: Vec<HostCpu> = idx.iter().map(|&i| hosts[i].1.clone()).collect();
        let label: Vec<&str> = idx.iter().map(|&i| hosts[i].0.as_str()).collect();
        let vendors = members.iter().fold(VendorSet::EMPTY, |s, h| s.with(h.vendor));
        for presented in vendors.iter() {
            let pool =
                level_pool(&members, Some(presented)).unwrap_or_else(|e| panic!("{label:?} as {presented}: {e}"));
            let p = &pool.policy;
            assert_eq!(p.vendor, presented);
            assert_eq!(members[pool.presented_from].vendor, presented);
            assert_eq!(p.signature, members[pool.presented_from].signature);
            assert_eq!(features::first_missing_dependency(&p.features), None, "{label:?}");
            assert_eq!(p.is_cross_vendor(), vendors != VendorSet::of(presented), "{label:?}");
            for (h, (m, lost)) in members.iter().zip(members.iter().map(|h| h.max().set).zip(&pool.lost)) {
                p.verify(h).unwrap_or_else(|e| panic!("{label:?} as {presented} on {}: {e}", h.brand_string()));
                CpuidTable::build(p, h).unwrap();
                assert!(p.features.and_not(&or).is_subset_of(&m), "{label:?}");
                assert_eq!(*lost, m.and_not(&p.features));
                spec_gives_back(p, h, &format!("{label:?} as {presented}"));
                if h.vendor == presented {
                    assert!(p.caveats_on(h).is_empty());
                }
            }
            // Every drop is a bit of the plain levelling, and the rest is kept.
            for (f, _) in &pool.dropped {
                assert!(f.is_in(&pool.levelled.common) && !f.is_in(&p.features), "{label:?} {f}");
            }
            assert_eq!(
                pool.levelled.common.and_not(&p.features).bits().count(),
                pool.dropped.len(),
                "{label:?}: {:?}",
                pool.dropped
            );
            // A pool of one vendor presents it without caveats.
            if !p.is_cross_vendor() {
                assert!(pool.caveats.is_empty());
                assert!(p.host_vendors.is_empty());
            } else {
                cross += 1;
            }
            let back = Policy::from_postcard(&p.to_postcard().unwrap()).unwrap();
            assert_eq!(&back, p);
        }
    }
    assert!(cross > 50, "{cross} cross-vendor pools");
}

#[test]
fn pools_that_cannot_be_levelled_say_why() {
    let (epyc, skx) = (load(EPYC), load(SKX));
    assert_eq!(level_pool(&[], None), Err(PoolError::Empty));
    let kvm = load("amd-epyc-kvm-host.cpuid");
    let e = level_pool(&[epyc.clone(), kvm], None).unwrap_err();
    assert!(matches!(e, PoolError::HostCannotRunGuests { host: 1, .. }), "{e}");
    assert!(
        e.to_string().contains("host #1 cannot be in a pool: this host cannot run guests: it has neither VMX nor SVM")
    );
    let e = level_pool(&[epyc, skx], Some(Vendor::Hygon)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no host of the pool (intel+amd) is HygonGenuine, so there is no HygonGenuine CPU to present (signature, brand string, caches)"
    );
}

#[test]
fn a_policy_not_levelled_across_vendors_is_refused_saying_why() {
    let (epyc, skx) = (load(EPYC), load(SKX));
    // Levelled on AMD only (here: one AMD host), then tried on Intel.
    let p = level_pool(std::slice::from_ref(&epyc), None).unwrap().policy;
    assert!(!p.is_cross_vendor());
    let rej = p.verify(&skx).unwrap_err();
    let mismatch = rej.errors.iter().find(|e| matches!(e, PolicyError::VendorMismatch { .. })).unwrap();
    assert_eq!(
        mismatch.to_string(),
        "the policy is for AuthenticAMD but the host is GenuineIntel, and it was levelled for AuthenticAMD hosts only (a policy runs on another vendor's hosts only if levelled across both, host-vendors=intel+amd, as `hvctl cpuid level` writes for a mixed pool)"
    );
    // Saying host-vendors= is not enough: the features still have to be there.
    let (q, _) = text::parse_spec(&format!("{},host-vendors=amd+intel", text::featureset_to_spec(&epyc.max().set)))
        .unwrap()
        .policy_on(&epyc);
    assert!(q.is_cross_vendor());
    let rej = q.verify(&skx).unwrap_err();
    assert!(!rej.errors.iter().any(|e| matches!(e, PolicyError::VendorMismatch { .. })), "{rej}");
    assert!(
        rej.to_string().contains("sse4a (CPUID 0x80000001.ECX bit 6) is set, but this host does not have it"),
        "{rej}"
    );
}

#[test]
fn postcard_extension_is_compatible_both_ways() {
    let (epyc, skx) = (load(EPYC), load(SKX));
    let same = Policy::from_host(&epyc, epyc.default_set().set, 2);
    // A same-vendor policy encodes exactly as the fields alone (as before the extension).
    let bytes = same.to_postcard().unwrap();
    let mut normalized = same.clone();
    normalized.features = normalized.features.normalized();
    assert_eq!(bytes, postcard::to_allocvec(&normalized).unwrap());
    let cross = level_pool(&[epyc.clone(), skx.clone()], None).unwrap().policy;
    let cb = cross.to_postcard().unwrap();
    assert_eq!(Policy::from_postcard(&cb).unwrap(), cross);
    assert_ne!(cross.stable_hash(), Policy { host_vendors: VendorSet::EMPTY, ..cross.clone() }.stable_hash());
    // A reader without the extension (postcard of the fields only) sees an AMD-only
    // policy, which refuses the Intel host: the safe side.
    let old: Policy = postcard::from_bytes(&cb).unwrap();
    assert!(old.host_vendors.is_empty());
    assert!(old.verify(&skx).is_err());
    old.verify(&epyc).unwrap();
    // Bytes after the known extension (a later one) are ignored.
    let mut later = cb.clone();
    later.push(0x55);
    assert_eq!(Policy::from_postcard(&later).unwrap(), cross);
}

#[test]
fn a_foreign_vendor_without_its_identity_takes_nothing_of_the_host() {
    let skx = load(SKX);
    let (p, notes) = text::parse_spec("base=host-default,vendor=amd").unwrap().policy_on(&skx);
    assert_eq!(p.brand, [0; 12]);
    assert_eq!(p.cache_ext, [0; 4]);
    assert!(p.cache_leaf4.is_empty());
    let msg = notes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("; ");
    assert_eq!(
        msg,
        "vendor=amd on a GenuineIntel host without brand=, cache-ext=, signature=: the brand string is empty, no 0x80000005/6 cache descriptors, the signature is the host's"
    );
    // With them given, no note.
    let (q, notes) = text::parse_spec("vendor=amd,signature=0x00800f12,brand=AMD EPYC Processor,cache-ext=1:2:3:4")
        .unwrap()
        .policy_on(&skx);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(q.cache_ext, [1, 2, 3, 4]);
    assert_eq!(levelling::host::brand_string(&q.brand), "AMD EPYC Processor");
    // A brand string the text form cannot carry goes as words.
    let mut odd = q.clone();
    odd.brand = text::brand_regs("  padded, with comma").unwrap();
    assert!(odd.to_text().contains("\nbrand-words=61702020:"), "{}", odd.to_text());
    assert_eq!(text::parse_spec(&odd.to_text()).unwrap().brand, Some(odd.brand));
    for bad in [
        "brand=0123456789012345678901234567890123456789012345678",
        "cache-ext=1:2:3",
        "cache-leaf4=1:2",
        "host-vendors=amd+via",
        "clflush-line=12",
    ] {
        assert!(text::parse_spec(bad).is_err(), "{bad}");
    }
}

/// The rule table is data the code follows: each leaf it drops reads zero in every
/// cross-vendor policy, each caveat is produced exactly where its rule says.
#[test]
fn rule_table_holds_for_every_cross_vendor_pool() {
    let hosts = fit_hosts();
    for (na, a) in &hosts {
        for (nb, b) in &hosts {
            if a.vendor.is_amd_compatible() == b.vendor.is_amd_compatible() {
                continue;
            }
            let pool = level_pool(&[a.clone(), b.clone()], None).unwrap();
            let t = CpuidTable::build(&pool.policy, b).unwrap();
            for r in RULES {
                match (r.subject, r.action) {
                    (Subject::Leaf { leaf, .. }, Action::Drop) => {
                        for sub in 0..8 {
                            assert_eq!(t.lookup(leaf, sub), [0; 4], "{na}+{nb}: {r}");
                        }
                    }
                    (Subject::Feature(f), Action::Caveat(c)) => {
                        let applies = r.when.applies(pool.policy.vendor, b.vendor, Some(&b.raw))
                            && f.is_in(&pool.policy.features);
                        if applies {
                            assert!(pool.policy.caveats_on(b).contains(&c), "{na}+{nb}: {r}");
                        }
                    }
                    _ => {}
                }
            }
            let expected = crossvendor::caveats(pool.policy.vendor, &pool.policy.features, b.vendor, Some(&b.raw));
            assert_eq!(pool.policy.caveats_on(b), expected);
            assert!(!expected.is_empty(), "{na}+{nb}");
        }
    }
}

#[test]
fn or_bits_verify_on_hosts_without_them() {
    // md_clear (OR-levelled) is on Sapphire Rapids only; the levelled policy shows it
    // and still verifies on the Haswell that lacks it.
    let spr = load("constructed-intel-xeon-8480-sapphire-rapids.cpuid");
    let hsw = load("bochs-2.7-corei7-haswell-4770.cpuid");
    assert!(MD_CLEAR.is_in(&spr.raw) && !MD_CLEAR.is_in(&hsw.raw));
    let pool = level_pool(&[spr, hsw.clone()], None).unwrap();
    assert!(MD_CLEAR.is_in(&pool.policy.features));
    pool.policy.verify(&hsw).unwrap();
    let mut not_or = pool.policy.clone();
    not_or.features.set_bit(AVX512F.word(), AVX512F.bit(), true);
    assert!(not_or.verify(&hsw).is_err());
}
