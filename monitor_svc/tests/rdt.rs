//! The acceptance tests of the monitoring logic (issue 6), driven through the hardware
//! model in `model/mod.rs`: RMID exhaustion, limbo drain and reuse order, attribution
//! of residual occupancy, MBM across three wraps, the error/unavailable bits, scaling,
//! per-vCPU groups, and the emulator case (no RDT: hardware events not available,
//! software events working).

mod model;

use model::{FakeRdt, cpuid_from_dump};
use monitor_svc::DomainId;
use monitor_svc::caps::{L3Source, MonitorCaps, MonitorConfig, NO_RDT_MONITORING};
use monitor_svc::counters::{self, CounterError, MbmAccumulator};
use monitor_svc::events::{EventKind, EventValue, ExitKind, GroupReading, SoftwareCount};
use monitor_svc::monitor::{Monitor, Timing};
use monitor_svc::platform::{HwEvent, IA32_QM_EVTSEL, PlatformError, evtsel_value};
use monitor_svc::rmid::{GroupId, RmidAllocator, RmidError, Vcpus};

const TSC_HZ: u64 = 1_000_000_000; // 1 GHz: one tick per nanosecond
const SEC: u64 = TSC_HZ;

fn timing() -> Timing {
    Timing { tsc_hz: TSC_HZ, max_bytes_per_sec: 1_000_000_000_000 }
}

/// An engine over `hw` with an RMID cap and a limbo threshold of `threshold_units` units.
fn engine(hw: &FakeRdt, sockets: u32, rmid_cap: Option<u32>, threshold_units: u64) -> Monitor {
    let config =
        MonitorConfig { rmid_cap, limbo_threshold_bytes: Some(threshold_units * u64::from(hw.upscaling_factor)) };
    Monitor::new(MonitorCaps::from_cpuid(hw.cpuid(), &config), sockets, timing())
}

fn group_of(m: &Monitor, d: u32) -> (GroupId, u32) {
    let g = m.rmids().groups_of(DomainId(d)).next().expect("domain has a group");
    (g.id, g.rmid)
}

fn occupancy(m: &Monitor, d: u32, hw: &mut FakeRdt) -> (u64, u64, Vec<GroupReading>) {
    match m.stats(DomainId(d), hw).get(EventKind::LlcOccupancy) {
        Some(EventValue::Occupancy { bytes, residual_bytes, groups }) => (*bytes, *residual_bytes, groups.clone()),
        other => panic!("llc_occupancy of domain {d}: {other:?}"),
    }
}

fn bandwidth(m: &Monitor, d: u32, kind: EventKind, hw: &mut FakeRdt) -> (u64, Option<u64>, Vec<GroupReading>) {
    match m.stats(DomainId(d), hw).get(kind) {
        Some(EventValue::Bandwidth { bytes, bytes_per_sec, groups, .. }) => (*bytes, *bytes_per_sec, groups.clone()),
        other => panic!("{kind} of domain {d}: {other:?}"),
    }
}

#[test]
fn rmid_exhaustion_fails_loudly_and_names_the_limbo_count() {
    let mut hw = FakeRdt::new(1, 15, 64, 24);
    let mut m = engine(&hw, 1, Some(4), 100);
    for d in 1..=4 {
        assert_eq!(m.attach(DomainId(d), Vcpus::All).map(|g| g.rmid), Ok(d), "lowest never-used RMID first");
    }
    let full = RmidError::Exhausted { domain: DomainId(5), in_limbo: 0, total: 4 };
    assert_eq!(m.attach(DomainId(5), Vcpus::All), Err(full));
    assert_eq!(m.rmid_for(DomainId(5), 0), 0, "the refused domain is not monitored, and was told so");

    // Domain 2 leaves with its cache lines still resident: its RMID goes to limbo.
    let (g2, r2) = group_of(&m, 2);
    hw.set_occupancy(0, r2, 100); // exactly the threshold: still dirty
    assert_eq!(m.detach(DomainId(2), g2, &mut hw, 10), Ok(r2));
    let err = m.attach(DomainId(5), Vcpus::All).unwrap_err();
    assert_eq!(err, RmidError::Exhausted { domain: DomainId(5), in_limbo: 1, total: 4 });
    assert_eq!(
        err.to_string(),
        "cannot monitor domain 5: all 4 usable RMIDs are taken and 1 of them are in limbo, waiting for the cache \
         occupancy of departed groups to drain; detach a group or retry later"
    );
    // Enabling a hardware event needs an RMID too: it fails the same way and stays off.
    assert_eq!(m.enable(DomainId(5), EventKind::LlcOccupancy), Err(err));
    assert!(!m.events().is_enabled(DomainId(5), EventKind::LlcOccupancy));

    // Still at the threshold: no drain. One unit below: drained and reusable.
    assert!(m.recheck_limbo(&mut hw).drained.is_empty());
    hw.set_occupancy(0, r2, 99);
    let report = m.recheck_limbo(&mut hw);
    assert_eq!((report.drained, report.still_in_limbo), (vec![r2], 0));
    assert_eq!(m.attach(DomainId(5), Vcpus::All).map(|g| g.rmid), Ok(r2));
    assert_eq!(hw.refused(), 0);
}

#[test]
fn limbo_drains_per_socket_and_reuse_is_least_recently_used_first() {
    let mut hw = FakeRdt::new(2, 15, 64, 24);
    let mut m = engine(&hw, 2, Some(6), 100);
    // A released RMID ranks after every never-used one.
    let g = m.attach(DomainId(9), Vcpus::All).unwrap();
    m.detach(DomainId(9), g.id, &mut hw, 1).unwrap();
    assert_eq!(m.rmids().free_count(), 6);
    for d in 1..=6 {
        // RMIDs 2..=6 (never used), then 1 (used by domain 9).
        let expected = if d <= 5 { d + 1 } else { 1 };
        assert_eq!(m.attach(DomainId(d), Vcpus::All).map(|g| g.rmid), Ok(expected));
    }
    let rmid_of = |m: &Monitor, d| group_of(m, d).1;
    let (r2, r3, r5) = (rmid_of(&m, 2), rmid_of(&m, 3), rmid_of(&m, 5));
    hw.set_occupancy(0, r2, 500); // dirty on socket 0 only
    hw.set_occupancy(1, r3, 500); // dirty on socket 1 only
    for (d, t) in [(2, 10), (5, 20), (3, 30)] {
        let (g, _) = group_of(&m, d);
        m.detach(DomainId(d), g, &mut hw, t).unwrap();
    }
    assert_eq!((m.rmids().in_limbo(), m.rmids().free_count()), (2, 1));
    assert_eq!(m.attach(DomainId(7), Vcpus::All).map(|g| g.rmid), Ok(r5), "the clean one");

    // The recheck reads each limbo RMID only on the sockets where it is still dirty.
    hw.accesses.clear();
    hw.set_occupancy(1, r3, 0);
    assert_eq!(m.recheck_limbo(&mut hw).drained, vec![r3]);
    let selected: Vec<(u32, u64)> = hw
        .accesses
        .iter()
        .filter(|(_, msr, v)| *msr == IA32_QM_EVTSEL && v.is_some())
        .map(|(s, _, v)| (*s, v.unwrap()))
        .collect();
    assert_eq!(
        selected,
        vec![(0, evtsel_value(HwEvent::LlcOccupancy, r2)), (1, evtsel_value(HwEvent::LlcOccupancy, r3))]
    );
    hw.set_occupancy(0, r2, 10);
    assert_eq!(m.recheck_limbo(&mut hw).drained, vec![r2]);

    // r2 was released before r3, so it is reused first although it drained later.
    assert_eq!(m.attach(DomainId(8), Vcpus::All).map(|g| g.rmid), Ok(r2));
    assert_eq!(m.attach(DomainId(10), Vcpus::All).map(|g| g.rmid), Ok(r3));
    assert!(matches!(m.attach(DomainId(11), Vcpus::All), Err(RmidError::Exhausted { in_limbo: 0, total: 6, .. })));
}

#[test]
fn residual_occupancy_stays_with_the_departed_domain_until_it_drains() {
    let mut hw = FakeRdt::new(2, 15, 64, 24);
    let mut m = engine(&hw, 2, None, 100);
    let d1 = DomainId(1);
    let a = m.attach(d1, Vcpus::Only(vec![0, 1])).unwrap();
    let b = m.attach(d1, Vcpus::Only(vec![2, 3])).unwrap();
    m.enable(d1, EventKind::LlcOccupancy).unwrap();
    hw.set_occupancy(0, a.rmid, 1000);
    hw.set_occupancy(1, a.rmid, 300);
    hw.set_occupancy(0, b.rmid, 50);
    let (bytes, residual, _) = occupancy(&m, 1, &mut hw);
    assert_eq!((bytes, residual), (1350 * 64, 0));

    m.detach(d1, a.id, &mut hw, 100).unwrap();
    let (bytes, residual, groups) = occupancy(&m, 1, &mut hw);
    assert_eq!((bytes, residual, groups.len()), (50 * 64, 1300 * 64, 1));

    // Another domain gets a fresh RMID, not the one in limbo, and none of the residue.
    let d2 = DomainId(2);
    m.enable(d2, EventKind::LlcOccupancy).unwrap();
    assert_ne!(m.rmid_for(d2, 0), a.rmid);
    assert_eq!(occupancy(&m, 2, &mut hw).1, 0);

    // The residue decays; the recheck updates what is charged, socket by socket.
    hw.set_occupancy(0, a.rmid, 400);
    m.recheck_limbo(&mut hw);
    assert_eq!(occupancy(&m, 1, &mut hw).1, (400 + 300) * 64);
    hw.set_occupancy(1, a.rmid, 20);
    m.recheck_limbo(&mut hw);
    assert_eq!(occupancy(&m, 1, &mut hw).1, 400 * 64, "socket 1 drained, socket 0 still charged");
    hw.set_occupancy(0, a.rmid, 0);
    assert_eq!(m.recheck_limbo(&mut hw).drained, vec![a.rmid]);
    assert_eq!(occupancy(&m, 1, &mut hw).1, 0);

    // A destroyed domain keeps its residue in the limbo list.
    let d3 = DomainId(3);
    m.enable(d3, EventKind::LlcOccupancy).unwrap();
    let r3 = m.rmid_for(d3, 0);
    hw.set_occupancy(0, r3, 700);
    m.domain_destroyed(d3, &mut hw, 200);
    assert_eq!(m.residuals(), vec![(d3, r3, 700 * 64)]);
    assert!(m.stats(d3, &mut hw).events.is_empty());
    assert_eq!(m.rmid_for(d3, 0), 0);
}

#[test]
fn mbm_accumulates_across_three_wraps_with_rates() {
    let mut hw = FakeRdt::new(1, 15, 65536, 24);
    let mut m = engine(&hw, 1, None, 100);
    // 2^24 units of 64 KiB wrap after 1 TiB: 1.0995 s at 1 TB/s; sample at half that.
    assert_eq!(m.mbm_sample_interval_ns(), 549_755_813);
    let d = DomainId(1);
    m.enable(d, EventKind::MbmTotal).unwrap();
    m.enable(d, EventKind::MbmLocal).unwrap();
    let rmid = m.rmid_for(d, 0);
    assert_ne!(rmid, 0, "enabling a hardware event attached a whole-domain group");
    hw.add_traffic(0, rmid, (1 << 24) - 1000, 0); // the counter starts just below its wrap
    assert_eq!(m.sample_mbm(&mut hw, 0).samples, 2);

    let span = 1u64 << 24;
    let step = span * 45 / 100; // 0.45 of the counter per 0.5 s, under the planned 1 TB/s
    let mut tsc = 0;
    for _ in 0..8 {
        hw.add_traffic(0, rmid, step, step / 3);
        tsc += SEC / 2;
        let report = m.sample_mbm(&mut hw, tsc);
        assert_eq!((report.samples, report.errors, report.suspect), (2, 0, 0));
    }
    // From 1000 units below the wrap, 3.6 spans: the total counter wrapped 4 times
    // (the first within the first interval), the local one once.
    let (total, rate, _) = bandwidth(&m, 1, EventKind::MbmTotal, &mut hw);
    assert_eq!(total, 8 * step * 65536);
    assert_eq!(rate, Some(step * 65536 * 2));
    let (local, _, _) = bandwidth(&m, 1, EventKind::MbmLocal, &mut hw);
    assert_eq!(local, 8 * (step / 3) * 65536);

    // A late sample is flagged: more than one wrap could hide in it.
    hw.add_traffic(0, rmid, 10, 10);
    tsc += 2 * SEC;
    assert_eq!(m.sample_mbm(&mut hw, tsc).suspect, 2);
}

#[test]
fn accumulator_matches_the_true_count_for_any_steps_under_one_wrap() {
    // Deterministic pseudo-random steps (xorshift64), many widths.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for width in [24u32, 25, 32, 44, 62] {
        let span = 1u128 << width;
        let mut acc = MbmAccumulator::new(width, 3);
        let mut truth: u128 = u128::from(next()) % span;
        acc.sample((truth % span) as u64, 0, None);
        let mut expected = 0u128;
        let mut wraps = 0;
        for i in 1..=500u64 {
            let step = u128::from(next()) % span; // anything below one full wrap
            if (truth % span) + step >= span {
                wraps += 1;
            }
            truth += step;
            expected += step * 3;
            let s = acc.sample((truth % span) as u64, i, None);
            assert_eq!(u128::from(s.delta_bytes), step * 3);
        }
        assert_eq!(u128::from(acc.bytes()), expected.min(u128::from(u64::MAX)), "width {width}");
        assert_eq!(acc.wraps(), wraps);
    }
}

#[test]
fn error_and_unavailable_bits_are_reported_per_socket_and_never_counted() {
    let mut hw = FakeRdt::new(2, 15, 64, 24);
    let mut m = engine(&hw, 2, None, 100);
    let d = DomainId(1);
    m.enable(d, EventKind::LlcOccupancy).unwrap();
    m.enable(d, EventKind::MbmTotal).unwrap();
    let r = m.rmid_for(d, 0);
    hw.set_occupancy(0, r, 10);
    hw.set_occupancy(1, r, 20);
    hw.inject_error(1, r);
    let (bytes, _, groups) = occupancy(&m, 1, &mut hw);
    assert_eq!(bytes, 10 * 64);
    let sockets = &groups[0].sockets;
    assert_eq!((sockets[0].bytes.clone(), sockets[1].bytes.clone()), (Ok(640), Err(CounterError::Error)));
    hw.clear_faults();
    hw.inject_unavailable(0, r);
    let (bytes, _, groups) = occupancy(&m, 1, &mut hw);
    assert_eq!((bytes, groups[0].sockets[0].bytes.clone()), (20 * 64, Err(CounterError::Unavailable)));
    assert_eq!(
        CounterError::Unavailable.to_string(),
        "the CPU has no data for this RMID now (IA32_QM_CTR unavailable bit 62 set)"
    );

    // MBM: an unavailable sample keeps the baseline; the next good one counts it all.
    hw.clear_faults();
    m.sample_mbm(&mut hw, 0);
    hw.add_traffic(0, r, 100, 0);
    hw.inject_unavailable(0, r);
    assert_eq!(m.sample_mbm(&mut hw, SEC / 4).errors, 1);
    let (total, _, groups) = bandwidth(&m, 1, EventKind::MbmTotal, &mut hw);
    assert_eq!((total, groups[0].sockets[0].bytes.clone()), (0, Err(CounterError::Unavailable)));
    hw.clear_faults();
    hw.add_traffic(0, r, 50, 0);
    m.sample_mbm(&mut hw, SEC / 2);
    assert_eq!(bandwidth(&m, 1, EventKind::MbmTotal, &mut hw).0, 150 * 64);

    // Limbo: a socket that cannot be read stays dirty; its residue is not guessed.
    hw.inject_error(1, r);
    let (g, _) = group_of(&m, 1);
    m.detach(d, g, &mut hw, SEC).unwrap();
    assert_eq!(m.rmids().in_limbo(), 1);
    assert_eq!(m.rmids().residual_bytes(d), 0, "socket 0 (10 units) is clean, socket 1 unknown");
    let report = m.recheck_limbo(&mut hw);
    assert_eq!((report.read_errors, report.still_in_limbo), (1, 1));
    hw.clear_faults();
    hw.set_occupancy(1, r, 0);
    assert_eq!(m.recheck_limbo(&mut hw).drained, vec![r]);
}

#[test]
fn out_of_range_rmids_set_the_error_bit_or_fault() {
    let mut hw = FakeRdt::new(1, 20, 64, 24); // 5-bit RMID field
    let read = |hw: &mut FakeRdt, rmid| counters::read_counter(hw, 0, HwEvent::LlcOccupancy, rmid, false);
    assert_eq!(read(&mut hw, 20).map(|d| d.count), Ok(0));
    assert_eq!(read(&mut hw, 21), Err(CounterError::Error));
    assert_eq!(read(&mut hw, 32), Err(CounterError::Platform(PlatformError::Fault { socket: 0, msr: IA32_QM_EVTSEL })));
    assert_eq!(
        counters::read_counter(&mut hw, 3, HwEvent::MbmTotal, 1, false),
        Err(CounterError::Platform(PlatformError::NoSuchSocket { socket: 3 }))
    );
}

#[test]
fn occupancy_is_scaled_by_the_upscaling_factor() {
    for factor in [1u32, 64, 65536, 0x10_0000] {
        let mut hw = FakeRdt::new(1, 15, factor, 24);
        let mut m = engine(&hw, 1, None, 1);
        m.enable(DomainId(1), EventKind::LlcOccupancy).unwrap();
        let r = m.rmid_for(DomainId(1), 0);
        hw.set_occupancy(0, r, 12_345);
        assert_eq!(occupancy(&m, 1, &mut hw).0, 12_345 * u64::from(factor), "factor {factor}");
        assert_eq!(counters::read_occupancy_bytes(&mut hw, 0, r, factor, false), Ok(12_345 * u64::from(factor)));
    }
}

#[test]
fn per_vcpu_groups_have_their_own_rmids_and_must_not_overlap() {
    let mut hw = FakeRdt::new(1, 15, 64, 24);
    let mut m = engine(&hw, 1, None, 100);
    let d = DomainId(1);
    let g1 = m.attach(d, Vcpus::Only(vec![3, 1, 1])).unwrap();
    assert_eq!(g1.vcpus, Vcpus::Only(vec![1, 3]));
    let g2 = m.attach(d, Vcpus::Only(vec![0, 2])).unwrap();
    assert_ne!(g1.rmid, g2.rmid);
    assert_eq!(
        m.attach(d, Vcpus::Only(vec![5, 2])),
        Err(RmidError::AlreadyAttached { domain: d, vcpu: Some(2), group: g2.id, rmid: g2.rmid })
    );
    assert_eq!(
        m.attach(d, Vcpus::All),
        Err(RmidError::AlreadyAttached { domain: d, vcpu: None, group: g1.id, rmid: g1.rmid })
    );
    assert_eq!(m.attach(d, Vcpus::Only(vec![])), Err(RmidError::EmptyVcpuSet { domain: d }));
    assert_eq!(
        m.attach(d, Vcpus::Only(vec![5, 2])).unwrap_err().to_string(),
        format!("domain 1 vCPU 2 is already monitored by group {} (RMID {}); detach it first", g2.id.0, g2.rmid)
    );
    let lookups: Vec<u32> = (0..5).map(|v| m.rmid_for(d, v)).collect();
    assert_eq!(lookups, [g2.rmid, g1.rmid, g2.rmid, g1.rmid, 0]);
    assert_eq!(m.rmid_for(DomainId(2), 1), 0, "another domain's vCPU 1 is not monitored");
    assert_eq!(m.rmid_map(d), vec![(Vcpus::Only(vec![1, 3]), g1.rmid), (Vcpus::Only(vec![0, 2]), g2.rmid)]);

    // Events use the explicit groups; no whole-domain group is added.
    m.enable(d, EventKind::LlcOccupancy).unwrap();
    m.enable(d, EventKind::MbmTotal).unwrap();
    assert_eq!(m.rmids().groups_of(d).count(), 2);
    hw.set_occupancy(0, g1.rmid, 7);
    hw.set_occupancy(0, g2.rmid, 11);
    let (bytes, _, groups) = occupancy(&m, 1, &mut hw);
    assert_eq!(bytes, 18 * 64);
    let per_group: Vec<(u32, Result<u64, CounterError>)> =
        groups.iter().map(|g| (g.rmid, g.sockets[0].bytes.clone())).collect();
    assert_eq!(per_group, [(g1.rmid, Ok(7 * 64)), (g2.rmid, Ok(11 * 64))]);

    // Bandwidth of a detached group stays in the domain's total.
    m.sample_mbm(&mut hw, 0);
    hw.add_traffic(0, g1.rmid, 1000, 0);
    hw.add_traffic(0, g2.rmid, 10, 0);
    m.sample_mbm(&mut hw, SEC / 2);
    hw.set_occupancy(0, g1.rmid, 0);
    m.detach(d, g1.id, &mut hw, SEC).unwrap();
    assert_eq!(m.rmid_for(d, 1), 0);
    let (total, _, groups) = bandwidth(&m, 1, EventKind::MbmTotal, &mut hw);
    assert_eq!((total, groups.len()), (1010 * 64, 1));
    // Disabling the events keeps explicitly attached groups.
    m.disable(d, EventKind::MbmTotal, &mut hw, SEC);
    m.disable(d, EventKind::LlcOccupancy, &mut hw, SEC);
    assert_eq!(m.rmids().groups_of(d).count(), 1);
}

#[test]
fn the_automatic_group_goes_with_the_last_hardware_event() {
    let mut hw = FakeRdt::new(1, 15, 64, 24);
    let mut m = engine(&hw, 1, None, 100);
    let d = DomainId(4);
    m.enable(d, EventKind::LlcOccupancy).unwrap();
    m.enable(d, EventKind::MbmLocal).unwrap();
    assert_eq!(m.rmids().groups_of(d).count(), 1);
    m.disable(d, EventKind::LlcOccupancy, &mut hw, 1);
    assert_eq!(m.rmids().groups_of(d).count(), 1, "mbm_local still needs it");
    m.disable(d, EventKind::MbmLocal, &mut hw, 2);
    assert_eq!(m.rmids().groups_of(d).count(), 0);
    assert_eq!(m.rmid_for(d, 0), 0);
}

#[test]
fn nothing_is_collected_until_enabled() {
    let mut hw = FakeRdt::new(2, 15, 64, 24);
    let mut m = engine(&hw, 2, None, 100);
    let d = DomainId(1);
    let g = m.attach(d, Vcpus::All).unwrap();
    hw.add_traffic(0, g.rmid, 1000, 1000);
    assert_eq!(m.sample_mbm(&mut hw, 0).samples, 0);
    assert!(hw.accesses.is_empty(), "no MSR touched for a domain without enabled events");
    assert!(m.stats(d, &mut hw).events.is_empty());
    assert!(!m.record(d, SoftwareCount::Exits(ExitKind::Cpuid, 1)));
    assert!(m.software_events(d).is_empty());
    m.enable(d, EventKind::CpuidExits).unwrap();
    assert_eq!(m.software_events(d), [EventKind::CpuidExits]);
    assert_eq!(m.sample_mbm(&mut hw, 1).samples, 0, "a software event does not start MBM sampling");
}

const QEMU_EPYC: &str = include_str!("../../levelling/testdata/qemu-7.2-tcg-epyc.cpuid");
const BOCHS_SKYLAKE_X: &str = include_str!("../../levelling/testdata/bochs-2.7-corei7-skylake-x.cpuid");
const BOCHS_HASWELL: &str = include_str!("../../levelling/testdata/bochs-2.7-corei7-haswell-4770.cpuid");
const SAPPHIRE_RAPIDS: &str =
    include_str!("../../levelling/testdata/constructed-intel-xeon-8480-sapphire-rapids.cpuid");
const GENOA: &str = include_str!("../../levelling/testdata/constructed-amd-epyc-9654-genoa.cpuid");

#[test]
fn emulators_have_no_rdt_and_software_events_still_work() {
    for dump in [QEMU_EPYC, BOCHS_SKYLAKE_X, BOCHS_HASWELL] {
        let caps = MonitorCaps::from_cpuid(cpuid_from_dump(dump), &MonitorConfig::default());
        assert_eq!(caps, MonitorCaps::Absent { reason: NO_RDT_MONITORING });
    }
    let caps = MonitorCaps::from_cpuid(cpuid_from_dump(QEMU_EPYC), &MonitorConfig::default());
    let mut hw = FakeRdt::new(1, 15, 64, 24);
    let mut m = Monitor::new(caps, 1, timing());
    let d = DomainId(1);
    for kind in EventKind::ALL {
        assert_eq!(m.enable(d, kind), Ok(true), "{kind}");
    }
    assert!(m.record(d, SoftwareCount::Exits(ExitKind::Cpuid, 3)));
    assert!(m.record(d, SoftwareCount::Exits(ExitKind::Hlt, 2)));
    assert!(m.record(d, SoftwareCount::Exits(ExitKind::NestedPageFault, 5)));
    assert!(m.record(d, SoftwareCount::DirtyPages(40)));
    assert!(m.record(d, SoftwareCount::RuntimeNs(1_000)));
    m.sample_mbm(&mut hw, 0);
    m.recheck_limbo(&mut hw);
    let stats = m.stats(d, &mut hw);
    let shown: Vec<String> = stats.events.iter().map(|e| format!("{}: {}", e.kind, e.value)).collect();
    assert_eq!(
        shown,
        [
            "llc_occupancy: not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)",
            "mbm_total: not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)",
            "mbm_local: not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)",
            "vm_exits: hlt=2 nested-page-fault=5 cpuid=3",
            "cpuid_exits: 3",
            "nested_page_faults: 5",
            "pml_full_exits: 0",
            "dirty_pages_logged: 40",
            "guest_runtime_ns: 1000",
            "halts: 2",
        ]
    );
    assert!(hw.accesses.is_empty(), "no MSR is touched on a CPU without RDT");
    assert_eq!(m.rmid_for(d, 0), 0);
    let err = m.attach(d, Vcpus::All).unwrap_err();
    assert_eq!(err.to_string(), "not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)");
    assert_eq!(m.rmid_summary(), "not available: CPU has no RDT monitoring (CPUID.7.EBX[12]=0)");
}

#[test]
fn server_dumps_decode_to_present_caps() {
    let spr = MonitorCaps::from_cpuid(cpuid_from_dump(SAPPHIRE_RAPIDS), &MonitorConfig::default());
    let rdt = *spr.rdt().unwrap();
    assert_eq!((rdt.usable_rmids, rdt.upscaling_factor, rdt.mbm_width), (0xef, 0x1_0000, 24));
    assert_eq!((rdt.l3_bytes, rdt.l3_source), (105 * 1024 * 1024, L3Source::Leaf4));
    assert_eq!(rdt.limbo_threshold_bytes, 105 * 1024 * 1024 / 0xf0);
    assert!(rdt.llc_occupancy && rdt.mbm_total && rdt.mbm_local);
    let genoa =
        MonitorCaps::from_cpuid(cpuid_from_dump(GENOA), &MonitorConfig { rmid_cap: Some(64), ..Default::default() });
    let rdt = *genoa.rdt().unwrap();
    assert_eq!((rdt.usable_rmids, rdt.upscaling_factor), (64, 0x40));
    assert_eq!((rdt.l3_bytes, rdt.l3_source), (32 * 1024 * 1024, L3Source::Amd80000006));
    assert_eq!(
        rdt.limbo_threshold_bytes,
        32 * 1024 * 1024 / 0x100,
        "threshold uses the hardware RMID count, not the cap"
    );
}

#[test]
fn allocator_invariants_hold_under_random_operations() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let hw = FakeRdt::new(2, 31, 64, 24);
    let caps =
        MonitorCaps::from_cpuid(hw.cpuid(), &MonitorConfig { rmid_cap: Some(12), limbo_threshold_bytes: Some(100) });
    let mut a = RmidAllocator::new(&caps, 2);
    // occupancy[rmid][socket] in bytes, as the "hardware" sees it.
    let mut occ = vec![[0u64; 2]; 32];
    for step in 0..5000u64 {
        match next(4) {
            0 => {
                let domain = DomainId(next(6) as u32);
                let vcpus = if next(3) == 0 {
                    Vcpus::All
                } else {
                    Vcpus::Only((0..1 + next(3)).map(|_| next(8) as u32).collect())
                };
                match a.attach(domain, vcpus) {
                    Ok(g) => {
                        assert!((1..=12).contains(&g.rmid));
                        occ[g.rmid as usize] = [next(300), next(300)];
                    }
                    Err(RmidError::Exhausted { in_limbo, total, .. }) => {
                        assert_eq!((a.free_count(), in_limbo, total), (0, a.in_limbo(), 12));
                    }
                    Err(RmidError::AlreadyAttached { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            1 => {
                let groups: Vec<_> = a.groups().map(|g| (g.domain, g.id)).collect();
                if !groups.is_empty() {
                    let (d, id) = groups[next(groups.len() as u64) as usize];
                    a.detach(d, id, step, |s, r| Ok(occ[r as usize][s as usize])).unwrap();
                }
            }
            2 => {
                for o in occ.iter_mut() {
                    for s in o.iter_mut() {
                        *s /= 2;
                    }
                }
                a.recheck_limbo(|s, r| Ok(occ[r as usize][s as usize]));
            }
            _ => {
                let d = DomainId(next(6) as u32);
                let v = next(8) as u32;
                let r = a.rmid_for(d, v);
                if r != 0 {
                    let g = a.groups_of(d).find(|g| g.rmid == r).expect("lookup returns one of the domain's groups");
                    assert!(g.vcpus.contains(v));
                }
            }
        }
        // Every usable RMID is in exactly one place: a group, limbo, or the free list.
        let mut seen: Vec<u32> = a.groups().map(|g| g.rmid).chain(a.limbo().iter().map(|e| e.rmid)).collect();
        let busy = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), busy, "an RMID is used twice at step {step}");
        assert!(!seen.contains(&0));
        assert_eq!(busy + a.free_count(), 12, "step {step}");
    }
}

#[test]
fn service_status_still_answers_with_an_engine() {
    use monitor_svc::MonitorService;
    use wire::service::QueueInfo;
    use wire::{FrameDecoder, Request, Response, ServiceId};

    let caps = MonitorCaps::from_cpuid(cpuid_from_dump(QEMU_EPYC), &MonitorConfig::default());
    let mut svc = MonitorService::with_caps(caps, 1, timing());
    assert!(svc.monitor().is_some());
    let mut bytes = Vec::new();
    wire::encode_request(3, &Request::ServiceStatus { service: ServiceId::Monitor }, &mut bytes).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(&bytes);
    let frame = dec.next_frame().unwrap().unwrap();
    let reply = svc.handle(&frame, QueueInfo { depth: 0, capacity: 8 });
    let mut dec = FrameDecoder::new();
    dec.push(&reply);
    let frame = dec.next_frame().unwrap().unwrap();
    match wire::decode_response(&frame).unwrap() {
        Response::ServiceStatus(s) => assert_eq!((s.service, s.handled, s.queue_capacity), (ServiceId::Monitor, 1, 8)),
        other => panic!("{other:?}"),
    }
    assert!(MonitorService::new().monitor().is_none());
}

#[test]
fn hwinfo_reports_each_sockets_cpus_also_without_rdt() {
    use monitor_svc::MonitorService;
    use wire::service::QueueInfo;
    use wire::{FrameDecoder, Request, Response};

    // QEMU's EPYC has no RDT: the topology is reported all the same.
    let caps = MonitorCaps::from_cpuid(cpuid_from_dump(QEMU_EPYC), &MonitorConfig::default());
    let mut svc = MonitorService::with_socket_cpus(caps, vec![vec![0], vec![1, 3]], timing());
    let mut bytes = Vec::new();
    wire::encode_request(4, &Request::MonitorHwInfo, &mut bytes).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(&bytes);
    let frame = dec.next_frame().unwrap().unwrap();
    let mut hw = FakeRdt::new(2, 8, 64, 24);
    let reply = svc.handle_with(&frame, QueueInfo { depth: 0, capacity: 8 }, &mut hw, 0);
    let mut dec = FrameDecoder::new();
    dec.push(&reply);
    let frame = dec.next_frame().unwrap().unwrap();
    match wire::decode_response(&frame).unwrap() {
        Response::MonitorHwInfo(h) => {
            assert!(!h.present);
            assert_eq!((h.sockets, h.socket_cpus), (2, vec![vec![0], vec![1, 3]]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(svc.monitor().map(Monitor::sockets), Some(2));
}
