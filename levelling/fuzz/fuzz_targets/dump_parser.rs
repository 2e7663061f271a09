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
        let _ = p.verify(&h);
        let t = CpuidTable::from_verified(&p);
        let _ = t.lookup(0xd, 0);
    }
});
