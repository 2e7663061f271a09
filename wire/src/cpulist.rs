//! CPU lists as people write them (`1-3`, `0,2`, `0-1,3`, `all`), for pinning a
//! domain's vCPUs to physical CPUs: one parser and printer for hvctl's `--cpus` and
//! `domain pin` and for the hypervisor's `DOMAINS.CFG` `cpus=`, so both sides read the
//! same text the same way. The numbers are APIC IDs (what `hvctl info` lists).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Parse a CPU list (`1-3`, `0,2`, `0-1,3`, or `all`) into sorted, distinct APIC IDs;
/// `None` for `all` (any CPU). Duplicates and overlapping ranges merge; more than
/// [`crate::MAX_PIN_CPUS`] CPUs, an empty list or item, a reversed range (`3-1`) or
/// anything but decimal numbers is an error that says which item is wrong.
pub fn parse(s: &str) -> Result<Option<Vec<u32>>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    if s.is_empty() {
        return Err("an empty CPU list: give APIC IDs like 1-3, 0,2 or 0-1,3, or all for any CPU".into());
    }
    let number = |t: &str, item: &str| -> Result<u32, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{item:?} is not a CPU number or a range like 1-3"));
        }
        t.parse::<u32>().map_err(|_| format!("{t} is larger than an APIC ID can be"))
    };
    let too_many = || format!("more than {} CPUs; a domain can be pinned to at most that many", crate::MAX_PIN_CPUS);
    let mut cpus = alloc::collections::BTreeSet::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("{s:?} has an empty item (two commas, or a comma at an end)"));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(a, item)?, number(b, item)?),
            None => {
                let n = number(item, item)?;
                (n, n)
            }
        };
        if first > last {
            return Err(format!("{item}: a range runs from low to high ({last}-{first}?)"));
        }
        // Refuse a huge range before expanding it.
        if (last - first) as usize >= crate::MAX_PIN_CPUS {
            return Err(too_many());
        }
        cpus.extend(first..=last);
        if cpus.len() > crate::MAX_PIN_CPUS {
            return Err(too_many());
        }
    }
    Ok(Some(cpus.into_iter().collect()))
}

/// A CPU list as `hvctl domain list` shows it: ranges where they are consecutive
/// (`0-3,5`), `any` for `None`.
pub fn format(cpus: Option<&[u32]>) -> String {
    let Some(cpus) = cpus else { return "any".into() };
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(&first) = sorted.get(i) {
        let mut last = first;
        while let Some(&n) = sorted.get(i + 1).filter(|&&n| Some(n) == last.checked_add(1)) {
            last = n;
            i += 1;
        }
        out.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn cpu_lists_parse_to_sorted_distinct_ids() {
        assert_eq!(parse("1-3"), Ok(Some(vec![1, 2, 3])));
        assert_eq!(parse("0,2"), Ok(Some(vec![0, 2])));
        assert_eq!(parse("0-1,3"), Ok(Some(vec![0, 1, 3])));
        assert_eq!(parse("5"), Ok(Some(vec![5])));
        assert_eq!(parse(" 3 , 1-2 "), Ok(Some(vec![1, 2, 3])));
        assert_eq!(parse("2,0-3,2"), Ok(Some(vec![0, 1, 2, 3])), "duplicates merge");
        assert_eq!(parse("all"), Ok(None));
        assert_eq!(parse("ALL"), Ok(None));
        assert_eq!(parse("0-255").map(|c| c.map(|c| c.len())), Ok(Some(256)));
        assert_eq!(parse("4294967295"), Ok(Some(vec![u32::MAX])));
    }

    #[test]
    fn bad_cpu_lists_say_what_is_wrong() {
        assert_eq!(parse("3-1").unwrap_err(), "3-1: a range runs from low to high (1-3?)");
        assert_eq!(parse("x").unwrap_err(), "\"x\" is not a CPU number or a range like 1-3");
        assert_eq!(parse("1-x").unwrap_err(), "\"1-x\" is not a CPU number or a range like 1-3");
        assert_eq!(parse("-1").unwrap_err(), "\"-1\" is not a CPU number or a range like 1-3");
        assert_eq!(parse("1-2-3").unwrap_err(), "\"1-2-3\" is not a CPU number or a range like 1-3");
        assert!(parse("").unwrap_err().starts_with("an empty CPU list"));
        assert!(parse("  ").unwrap_err().starts_with("an empty CPU list"));
        assert_eq!(parse("1,,2").unwrap_err(), "\"1,,2\" has an empty item (two commas, or a comma at an end)");
        assert!(parse("1,").unwrap_err().contains("empty item"));
        assert_eq!(parse("4294967296").unwrap_err(), "4294967296 is larger than an APIC ID can be");
        let many = "more than 256 CPUs; a domain can be pinned to at most that many";
        assert_eq!(parse("0-256").unwrap_err(), many);
        assert_eq!(parse("0-4294967295").unwrap_err(), many, "refused without expanding it");
        assert_eq!(parse("0-200,300-400").unwrap_err(), many);
    }

    #[test]
    fn cpu_lists_print_as_ranges() {
        assert_eq!(format(None), "any");
        assert_eq!(format(Some(&[0, 1, 2, 3, 5])), "0-3,5");
        assert_eq!(format(Some(&[3, 1])), "1,3");
        assert_eq!(format(Some(&[7])), "7");
        assert_eq!(format(Some(&[u32::MAX - 1, u32::MAX])), "4294967294-4294967295");
        for list in ["1-3", "0,2", "0-1,3", "0-255"] {
            let parsed = parse(list).unwrap();
            assert_eq!(format(parsed.as_deref()), list);
        }
    }
}
