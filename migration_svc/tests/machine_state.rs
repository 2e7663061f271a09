//! The destination's rules for the machine-state records of stream version 2: the
//! guest clock before any of them, every vCPU's state, FPU area and MSRs exactly once,
//! the device states exactly once and required, the console ring at most once; each
//! is handed to the core in stream order.

use migration_svc::dest::{DestAction, DestError, DestState, Destination, StateRecord};
use wire::migration::{
    ConsoleRing, CpuidPolicy, DeviceStates, GuestClock, MIGRATION_STREAM_VERSION, PageBatch, Record, StreamEnd,
    StreamHeader, VcpuFpu, VcpuMsrs, VcpuState,
};

type Check = fn(&[u8]) -> Result<(), String>;

fn accept(_: &[u8]) -> Result<(), String> {
    Ok(())
}

/// A destination that has the header, the policy and all (two) pages of a 2-vCPU domain.
fn with_memory() -> Destination<Check> {
    let mut d = Destination::new(accept as Check);
    let header = StreamHeader {
        stream_version: MIGRATION_STREAM_VERSION,
        source_featureset: vec![],
        name: "m".into(),
        memory_bytes: 2 * 4096,
        vcpus: 2,
        cmdline: String::new(),
    };
    d.on_record(Record::Header(header));
    d.on_record(Record::CpuidPolicy(CpuidPolicy { policy: vec![1] }));
    let mut b = PageBatch::new();
    b.push_zero(0).unwrap();
    b.push_zero(1).unwrap();
    d.on_record(Record::PageBatch(b));
    assert_eq!(d.state(), DestState::Memory);
    d
}

fn clock() -> Record {
    Record::GuestClock(GuestClock { tsc: 10, ns: 5, tsc_hz: 2_000_000_000 })
}

fn vcpu_records(index: u32) -> [Record; 3] {
    [
        Record::VcpuState(VcpuState { index, registers: vec![index as u8] }),
        Record::VcpuFpu(VcpuFpu { index, xcr0: 1, area: vec![0; 512] }),
        Record::VcpuMsrs(VcpuMsrs { index, msrs: vec![(0x10, 99)] }),
    ]
}

fn end() -> Record {
    Record::End(StreamEnd { pages_sent: 2, rounds: 0 })
}

fn discarded(actions: &[DestAction]) -> Option<&DestError> {
    actions.iter().find_map(|a| if let DestAction::Discard(e) = a { Some(e) } else { None })
}

#[test]
fn a_whole_machine_state_completes_and_reaches_the_core_in_order() {
    let mut d = with_memory();
    let mut loaded = Vec::new();
    let mut records = vec![clock()];
    records.extend(vcpu_records(1));
    records.extend(vcpu_records(0));
    records.push(Record::DeviceStates(DeviceStates::default()));
    records.push(Record::ConsoleRing(ConsoleRing { total_bytes: 1, ring: vec![b'x'] }));
    records.push(end());
    for r in records {
        for a in d.on_record(r) {
            match a {
                DestAction::LoadState(s) => loaded.push(s),
                DestAction::Discard(e) => panic!("discarded: {e}"),
                _ => {}
            }
        }
    }
    assert_eq!(d.state(), DestState::Complete);
    assert!(matches!(loaded.first(), Some(StateRecord::Clock(GuestClock { tsc: 10, ns: 5, .. }))));
    assert_eq!(loaded.len(), 1 + 2 * 2 + 2, "clock, 2 × (FPU, MSRs), devices, console: {loaded:?}");
}

#[test]
fn vcpu_records_before_the_clock_are_out_of_order() {
    for r in vcpu_records(0).into_iter().chain([Record::DeviceStates(DeviceStates::default())]) {
        let mut d = with_memory();
        let a = d.on_record(r);
        assert!(matches!(discarded(&a), Some(DestError::OutOfOrder { expected: "guest clock", .. })), "{a:?}");
    }
    let mut d = with_memory();
    let a = d.on_record(end());
    assert_eq!(discarded(&a), Some(&DestError::StateMissing { what: "guest clock" }));
}

#[test]
fn a_second_clock_or_pages_after_it_are_refused() {
    let mut d = with_memory();
    assert!(discarded(&d.on_record(clock())).is_none());
    let a = d.on_record(clock());
    assert!(matches!(discarded(&a), Some(DestError::OutOfOrder { .. })), "{a:?}");
    let mut d = with_memory();
    d.on_record(clock());
    let mut b = PageBatch::new();
    b.push_zero(0).unwrap();
    assert!(matches!(discarded(&d.on_record(Record::PageBatch(b))), Some(DestError::OutOfOrder { .. })));
}

#[test]
fn every_vcpu_record_is_needed_once() {
    // Each of the three records of vCPU 1 missing in turn.
    for (skip, what) in [(0, "state"), (1, "FPU state"), (2, "MSRs")] {
        let mut d = with_memory();
        d.on_record(clock());
        for r in vcpu_records(0) {
            d.on_record(r);
        }
        for (i, r) in vcpu_records(1).into_iter().enumerate() {
            if i != skip {
                d.on_record(r);
            }
        }
        d.on_record(Record::DeviceStates(DeviceStates::default()));
        let a = d.on_record(end());
        assert_eq!(discarded(&a), Some(&DestError::VcpuMissing { index: 1, what }), "{what}");
    }
    // Twice, or out of range.
    for r in vcpu_records(0) {
        let mut d = with_memory();
        d.on_record(clock());
        assert!(discarded(&d.on_record(r.clone())).is_none());
        assert_eq!(discarded(&d.on_record(r)), Some(&DestError::BadVcpu { index: 0, vcpus: 2 }));
    }
    for r in vcpu_records(2) {
        let mut d = with_memory();
        d.on_record(clock());
        assert_eq!(discarded(&d.on_record(r)), Some(&DestError::BadVcpu { index: 2, vcpus: 2 }));
    }
}

#[test]
fn device_states_are_required_once_and_the_console_at_most_once() {
    let ready = || {
        let mut d = with_memory();
        d.on_record(clock());
        for r in vcpu_records(0).into_iter().chain(vcpu_records(1)) {
            d.on_record(r);
        }
        d
    };
    let mut d = ready();
    assert_eq!(discarded(&d.on_record(end())), Some(&DestError::StateMissing { what: "device states" }));
    let mut d = ready();
    d.on_record(Record::DeviceStates(DeviceStates::default()));
    let a = d.on_record(Record::DeviceStates(DeviceStates::default()));
    assert!(matches!(discarded(&a), Some(DestError::OutOfOrder { .. })), "{a:?}");
    let mut d = ready();
    let ring = || Record::ConsoleRing(ConsoleRing { total_bytes: 0, ring: vec![] });
    d.on_record(ring());
    assert!(matches!(discarded(&d.on_record(ring())), Some(DestError::OutOfOrder { .. })));
    // Without the (optional) console ring the stream completes.
    let mut d = ready();
    d.on_record(Record::DeviceStates(DeviceStates::default()));
    assert!(d.on_record(end()).iter().any(|a| matches!(a, DestAction::Complete(_))));
    assert_eq!(
        DestError::VcpuMissing { index: 1, what: "FPU state" }.to_string(),
        "stream ended without the FPU state of vCPU 1"
    );
}
