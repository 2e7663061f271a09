//! Fuzz the dump file parser and everything that interprets a parsed dump.
#![no_main]

use levelling::{CpuidTable, HostCpu, Policy, format_dump, parse_dump};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(d) = parse_dump(s) else { return };
    // What parses formats back to something that parses to the same records.
    let again = parse_dump(&format_dump(&d.records, "fuzz")).expect("formatted dump parses");
    assert_eq!(again.records, d.records);
    if let Ok(h) = HostCpu::from_records(&d.records) {
        let p = Policy::from_host(&h, h.max().set, 2);
        let verdict = p.verify(&h);
        // `max` verifies on its own host whatever the dump says about XSAVE; what may
        // still refuse it is a host that cannot run guests (one reason) or a dump with
        // impossible address widths (below 32 physical / 48 linear bits).
        if h.cannot_run_guests().is_some() {
            assert_eq!(verdict.map_err(|r| r.errors.len()), Err(1));
        } else if h.phys_bits >= 32 && h.virt_bits >= 48 {
            assert!(verdict.is_ok(), "{:?}", verdict);
        }
        let t = CpuidTable::from_verified(&p);
        let _ = t.lookup(0xd, 0);
    }
});
