//! Fuzz the policy/featureset text parser, and applying what parses to a host,
//! building a policy, verifying it and building its lookup table.
#![no_main]

use levelling::{CpuidTable, HostCpu, parse_dump, text};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn host() -> &'static HostCpu {
    static H: OnceLock<HostCpu> = OnceLock::new();
    H.get_or_init(|| {
        let t = include_str!("../../testdata/constructed-amd-epyc-9654-genoa.cpuid");
        HostCpu::from_records(&parse_dump(t).expect("testdata parses").records).expect("testdata is a host")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = s.parse::<levelling::Featureset>();
    if let Ok(spec) = text::parse_spec(s) {
        let (policy, _notes) = spec.policy_on(host());
        let verdict = policy.verify(host());
        let verified = verdict.is_ok();
        let _ = verdict.map(|()| ()).map_err(|e| e.to_string());
        let t = CpuidTable::from_verified(&policy);
        let _ = t.lookup(7, 0);
        let back = levelling::Policy::from_postcard(&policy.to_postcard().expect("encodes")).expect("decodes");
        assert_eq!(back.stable_hash(), policy.stable_hash());
        assert_eq!(back, policy);
        // The text form and the one-line spec parse, and carry the whole of a verified
        // policy on the same host (an unverified one may have bits above its maximum
        // leaf, which `max-leaf=` clears).
        for written in [policy.to_text(), policy.to_spec()] {
            let again = text::parse_spec(&written).expect("a written policy parses").policy_on(host()).0;
            if verified {
                assert_eq!(again, policy, "{written}");
            }
        }
    }
});
