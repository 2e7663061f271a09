//! CPU lists as people write them (`1-3`, `0,2`, `0-1,3`), for pinning a domain's vCPUs
//! to physical CPUs: one parser for hvctl's `--cpus` and `domain pin`, and for the
//! hypervisor's `DOMAINS.CFG` `cpus=`, so both sides read the same text the same way.
//! The numbers are APIC IDs (what `hvctl info` lists for each CPU).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Most CPUs a list may name (the wire bounds the list it carries to this).
pub const MAX_CPUS: usize = 256;

/// Why a CPU list was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuListError {
    /// Nothing in it.
    Empty,
    /// A piece that is not a number or a range `A-B`.
    NotANumber(String),
    /// A range whose end is below its start.
    Backwards(u32, u32),
    /// More CPUs than [`MAX_CPUS`].
    TooMany(usize),
}

impl fmt::Display for CpuListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the CPU list is empty (write e.g. 1-3 or 0,2)"),
            Self::NotANumber(p) => write!(f, "`{p}` in the CPU list is not a CPU number or a range like 1-3"),
            Self::Backwards(a, b) => write!(f, "the CPU range {a}-{b} runs backwards (write {b}-{a})"),
            Self::TooMany(n) => write!(f, "the CPU list names {n} CPUs; at most {MAX_CPUS}"),
        }
    }
}

/// The APIC IDs `text` names, sorted, each once.
pub fn parse(text: &str) -> Result<Vec<u32>, CpuListError> {
    let mut cpus = Vec::new();
    for piece in text.split(',').map(str::trim) {
        if piece.is_empty() {
            continue;
        }
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| CpuListError::NotANumber(String::from(piece)));
        let (first, last) = match piece.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(piece)?;
                (n, n)
            }
        };
        if last < first {
            return Err(CpuListError::Backwards(first, last));
        }
        let count = (last - first) as usize + 1;
        if cpus.len() + count > MAX_CPUS * 2 {
            return Err(CpuListError::TooMany(cpus.len() + count));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    match cpus.len() {
        0 => Err(CpuListError::Empty),
        n if n > MAX_CPUS => Err(CpuListError::TooMany(n)),
        _ => Ok(cpus),
    }
}

/// `cpus` written back as ranges (`0-2,5`); "any" for no list.
pub fn format(cpus: Option<&[u32]>) -> String {
    let Some(cpus) = cpus else { return String::from("any") };
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = cpus[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&alloc::format!("{start}"));
        } else {
            out.push_str(&alloc::format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn lists_and_ranges_parse_sorted_and_once() {
        assert_eq!(parse("1-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse("3,0, 2").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse("0-1,3,1").unwrap(), vec![0, 1, 3]);
        assert_eq!(parse("7").unwrap(), vec![7]);
        assert_eq!(format(Some(&[0, 1, 2, 5, 7, 8])), "0-2,5,7-8");
        assert_eq!(format(None), "any");
        for text in ["0", "0-3", "1,3-4"] {
            assert_eq!(format(Some(&parse(text).unwrap())), text, "round trip");
        }
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        assert_eq!(parse("").unwrap_err(), CpuListError::Empty);
        assert_eq!(parse(" , ").unwrap_err(), CpuListError::Empty);
        assert_eq!(parse("3-1").unwrap_err().to_string(), "the CPU range 3-1 runs backwards (write 1-3)");
        assert_eq!(parse("x").unwrap_err(), CpuListError::NotANumber("x".into()));
        assert_eq!(parse("1-").unwrap_err(), CpuListError::NotANumber("1-".into()));
        assert!(matches!(parse("0-4294967295"), Err(CpuListError::TooMany(_))));
        assert!(matches!(parse("0-256"), Err(CpuListError::TooMany(257))));
        assert_eq!(parse("0-255").unwrap().len(), 256);
    }
}
