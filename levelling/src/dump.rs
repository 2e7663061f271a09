//! Raw CPUID dumps: enumerating every leaf and subleaf a CPU reports, and the text
//! file format `hvctl cpuid dump` writes and everything else reads.
//!
//! # Dump file format (v1)
//!
//! UTF-8 text, one record per line:
//!
//! ```text
//! # hvctl cpuid dump v1
//! # source: AMD EPYC (family 0x19 model 0x11) under KVM, captured with hvctl cpuid dump
//! 00000000 00000000 00000010 68747541 444d4163 69746e65
//! 00000007 00000000 00000000 219c07ab 00000000 00000000
//! ```
//!
//! * The first line is exactly `# hvctl cpuid dump v1`.
//! * Other lines starting with `#` are comments; the first `# source: ...` comment
//!   says where the dump came from. Empty lines are ignored.
//! * Each data line is six lower-case 8-digit hex fields separated by single
//!   spaces: `leaf subleaf eax ebx ecx edx`. Leaves that ignore ECX are recorded
//!   with subleaf `00000000`. A `(leaf, subleaf)` pair appears at most once.
//!
//! Parse errors name the line number. This module does not interpret features;
//! see [`crate::host`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// The header line of a v1 dump.
pub const DUMP_HEADER: &str = "# hvctl cpuid dump v1";

/// Upper bound on leaves walked in any one range (basic, hypervisor, extended).
pub const MAX_LEAVES_PER_RANGE: u32 = 0x100;
/// Upper bound on subleaves walked in any one leaf.
pub const MAX_SUBLEAVES: u32 = 64;
/// Upper bound on records in a dump.
pub const MAX_RECORDS: usize = 4096;

/// One CPUID result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CpuidRecord {
    /// EAX input.
    pub leaf: u32,
    /// ECX input (0 for leaves that ignore it).
    pub subleaf: u32,
    /// `[eax, ebx, ecx, edx]` output.
    pub regs: [u32; 4],
}

/// How a leaf's subleaves are enumerated.
enum Sub {
    /// ECX is ignored; one record with subleaf 0.
    None,
    /// Subleaves `0..=sub0.EAX`.
    UpToEax0,
    /// Subleaves from 0 until `EAX[4:0] == 0` (cache type "null").
    UntilCacheTypeNull,
    /// Subleaves from 0 until `ECX[15:8] == 0` (level type "invalid"); subleaf 0 always.
    UntilLevelTypeZero,
    /// Subleaf 0, 1, then every bit set in (sub0.EDX:EAX | sub1.EDX:ECX) from 2 to 63.
    Xsave,
    /// Subleaf 0, then every bit `i >= 1` set in the given register of subleaf 0.
    BitsOf(usize),
    /// Subleaf 0, 1, then from 2 until `EAX[3:0] == 0`.
    Sgx,
    /// Subleaf 0 until `EAX[11:0] == 0`.
    UntilEax12Zero,
}

/// The documented subleaf rule for each leaf (SDM Vol. 2A CPUID; APM Vol. 3 App. E).
fn subleaf_rule(leaf: u32) -> Sub {
    match leaf {
        0x4 => Sub::UntilCacheTypeNull,        // deterministic cache parameters
        0x7 => Sub::UpToEax0,                  // structured extended features
        0xb | 0x1f => Sub::UntilLevelTypeZero, // (V2) extended topology
        0xd => Sub::Xsave,                     // XSAVE state components
        0xf => Sub::BitsOf(3),                 // RDT monitoring: resource types in sub0.EDX
        0x10 => Sub::BitsOf(1),                // RDT allocation: resource types in sub0.EBX
        0x12 => Sub::Sgx,                      // SGX capability and EPC sections
        0x14 | 0x17 | 0x18 | 0x1d | 0x20 | 0x24 => Sub::UpToEax0, // PT, SoC, TLB, AMX palettes, HRESET, AVX10
        0x1b => Sub::UntilEax12Zero,           // PCONFIG
        0x8000_001d => Sub::UntilCacheTypeNull, // AMD cache topology
        0x8000_0020 => Sub::BitsOf(1),         // AMD PQoS extensions: sub0.EBX
        0x8000_0026 => Sub::UntilLevelTypeZero, // AMD extended CPU topology
        _ => Sub::None,
    }
}

fn walk_leaf(cpuid: &mut impl FnMut(u32, u32) -> [u32; 4], leaf: u32, out: &mut Vec<CpuidRecord>) {
    let push = |out: &mut Vec<CpuidRecord>, subleaf: u32, regs: [u32; 4]| {
        if out.len() < MAX_RECORDS {
            out.push(CpuidRecord { leaf, subleaf, regs });
        }
    };
    let sub0 = cpuid(leaf, 0);
    match subleaf_rule(leaf) {
        Sub::None => push(out, 0, sub0),
        Sub::UpToEax0 => {
            push(out, 0, sub0);
            for s in 1..=sub0[0].min(MAX_SUBLEAVES - 1) {
                push(out, s, cpuid(leaf, s));
            }
        }
        Sub::UntilCacheTypeNull => {
            let mut regs = sub0;
            let mut s = 0;
            while regs[0] & 0x1f != 0 && s < MAX_SUBLEAVES {
                push(out, s, regs);
                s += 1;
                regs = cpuid(leaf, s);
            }
        }
        Sub::UntilLevelTypeZero => {
            push(out, 0, sub0);
            for s in 1..MAX_SUBLEAVES {
                let regs = cpuid(leaf, s);
                if (regs[2] >> 8) & 0xff == 0 {
                    break;
                }
                push(out, s, regs);
            }
        }
        Sub::Xsave => {
            push(out, 0, sub0);
            let sub1 = cpuid(leaf, 1);
            push(out, 1, sub1);
            let mask =
                (u64::from(sub0[3]) << 32 | u64::from(sub0[0])) | (u64::from(sub1[3]) << 32 | u64::from(sub1[2]));
            for s in 2..MAX_SUBLEAVES {
                if mask & (1 << s) != 0 {
                    push(out, s, cpuid(leaf, s));
                }
            }
        }
        Sub::BitsOf(reg) => {
            push(out, 0, sub0);
            let mask = sub0.get(reg).copied().unwrap_or(0);
            for s in 1..32 {
                if mask & (1 << s) != 0 {
                    push(out, s, cpuid(leaf, s));
                }
            }
        }
        Sub::Sgx => {
            push(out, 0, sub0);
            push(out, 1, cpuid(leaf, 1));
            for s in 2..MAX_SUBLEAVES {
                let regs = cpuid(leaf, s);
                if regs[0] & 0xf == 0 {
                    break;
                }
                push(out, s, regs);
            }
        }
        Sub::UntilEax12Zero => {
            let mut regs = sub0;
            let mut s = 0;
            while regs[0] & 0xfff != 0 && s < MAX_SUBLEAVES {
                push(out, s, regs);
                s += 1;
                regs = cpuid(leaf, s);
            }
            if s == 0 {
                push(out, 0, sub0);
            }
        }
    }
}

/// Walk every leaf and subleaf a CPU reports, through `cpuid(leaf, subleaf) ->
/// [eax, ebx, ecx, edx]`.
///
/// Basic leaves `0..=CPUID.0.EAX`, hypervisor leaves `0x4000_0000..=` (only if
/// 1.ECX.HYPERVISOR is set and 0x4000_0000.EAX is in range), extended leaves
/// `0x8000_0000..=CPUID.8000_0000h.EAX`; subleaves by each leaf's documented rule.
/// Every range is capped at [`MAX_LEAVES_PER_RANGE`] leaves, every leaf at
/// [`MAX_SUBLEAVES`] subleaves, the whole walk at [`MAX_RECORDS`], so a strange CPU
/// cannot make it loop forever. Records come out sorted by (leaf, subleaf).
pub fn enumerate(mut cpuid: impl FnMut(u32, u32) -> [u32; 4]) -> Vec<CpuidRecord> {
    let mut out = Vec::new();
    let max_basic = cpuid(0, 0)[0].min(MAX_LEAVES_PER_RANGE - 1);
    for leaf in 0..=max_basic {
        walk_leaf(&mut cpuid, leaf, &mut out);
    }
    let hypervisor = max_basic >= 1 && cpuid(1, 0)[2] & (1 << 31) != 0;
    if hypervisor {
        let max_hv = cpuid(0x4000_0000, 0)[0];
        if (0x4000_0000..0x4000_0000 + MAX_LEAVES_PER_RANGE).contains(&max_hv) {
            for leaf in 0x4000_0000..=max_hv {
                walk_leaf(&mut cpuid, leaf, &mut out);
            }
        }
    }
    let max_ext = cpuid(0x8000_0000, 0)[0];
    if (0x8000_0000..0x8000_0000 + MAX_LEAVES_PER_RANGE).contains(&max_ext) {
        for leaf in 0x8000_0000..=max_ext {
            walk_leaf(&mut cpuid, leaf, &mut out);
        }
    }
    out.sort_by_key(|r| (r.leaf, r.subleaf));
    out.dedup_by_key(|r| (r.leaf, r.subleaf));
    out
}

/// Format records as a v1 dump file. Newlines in `source` become spaces.
pub fn format_dump(records: &[CpuidRecord], source: &str) -> String {
    let mut s = String::with_capacity(64 + records.len() * 54);
    s.push_str(DUMP_HEADER);
    s.push('\n');
    if !source.is_empty() {
        let clean: String = source.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
        s.push_str("# source: ");
        s.push_str(&clean);
        s.push('\n');
    }
    for r in records {
        s.push_str(&format!(
            "{:08x} {:08x} {:08x} {:08x} {:08x} {:08x}\n",
            r.leaf, r.subleaf, r.regs[0], r.regs[1], r.regs[2], r.regs[3]
        ));
    }
    s
}

/// A parsed dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    /// The first `# source:` comment, if any.
    pub source: Option<String>,
    /// Records sorted by (leaf, subleaf).
    pub records: Vec<CpuidRecord>,
}

/// Why a dump file did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpError {
    /// The first line is not [`DUMP_HEADER`].
    BadHeader,
    /// A data line is malformed.
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A `(leaf, subleaf)` appears twice.
    Duplicate {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The leaf.
        leaf: u32,
        /// The subleaf.
        subleaf: u32,
    },
    /// More than [`MAX_RECORDS`] records.
    TooManyRecords,
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::BadHeader => write!(f, "line 1: expected the header `{DUMP_HEADER}`"),
            DumpError::BadLine { line, what } => write!(f, "line {line}: {what}"),
            DumpError::Duplicate { line, leaf, subleaf } => {
                write!(f, "line {line}: leaf {leaf:#010x} subleaf {subleaf:#x} appears twice")
            }
            DumpError::TooManyRecords => write!(f, "more than {MAX_RECORDS} records"),
        }
    }
}

fn hex8(field: &str) -> Option<u32> {
    if field.len() != 8 || !field.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u32::from_str_radix(field, 16).ok()
}

/// Parse a v1 dump file.
pub fn parse_dump(text: &str) -> Result<Dump, DumpError> {
    let mut lines = text.split('\n').enumerate();
    match lines.next() {
        Some((_, l)) if l.trim_end_matches('\r') == DUMP_HEADER => {}
        _ => return Err(DumpError::BadHeader),
    }
    let mut source = None;
    let mut records: Vec<(usize, CpuidRecord)> = Vec::new();
    for (i, raw) in lines {
        let line = i + 1;
        let l = raw.strip_suffix('\r').unwrap_or(raw);
        if l.is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix('#') {
            if source.is_none()
                && let Some(s) = c.trim_start().strip_prefix("source:")
            {
                source = Some(s.trim().to_string());
            }
            continue;
        }
        let mut v = [0u32; 6];
        let mut n = 0;
        for field in l.split(' ') {
            let Some(slot) = v.get_mut(n) else {
                return Err(DumpError::BadLine { line, what: "more than six fields" });
            };
            *slot = hex8(field).ok_or(DumpError::BadLine {
                line,
                what: "expected six 8-digit lower-case hex fields separated by single spaces",
            })?;
            n += 1;
        }
        if n != 6 {
            return Err(DumpError::BadLine { line, what: "expected six fields: leaf subleaf eax ebx ecx edx" });
        }
        if records.len() >= MAX_RECORDS {
            return Err(DumpError::TooManyRecords);
        }
        let [leaf, subleaf, a, b, c, d] = v;
        records.push((line, CpuidRecord { leaf, subleaf, regs: [a, b, c, d] }));
    }
    records.sort_by_key(|(line, r)| (r.leaf, r.subleaf, *line));
    for pair in records.windows(2) {
        if let [(_, a), (line, b)] = pair
            && (a.leaf, a.subleaf) == (b.leaf, b.subleaf)
        {
            return Err(DumpError::Duplicate { line: *line, leaf: b.leaf, subleaf: b.subleaf });
        }
    }
    Ok(Dump { source, records: records.into_iter().map(|(_, r)| r).collect() })
}

impl Dump {
    /// The record for `(leaf, subleaf)`, if present.
    pub fn get(&self, leaf: u32, subleaf: u32) -> Option<[u32; 4]> {
        self.records
            .binary_search_by_key(&(leaf, subleaf), |r| (r.leaf, r.subleaf))
            .ok()
            .and_then(|i| self.records.get(i))
            .map(|r| r.regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// A tiny fake CPU: max basic leaf 0xd, leaf 4 with two caches, 7 with one
    /// extra subleaf, 0xd with components 2 and 9, extended max 0x80000001.
    fn fake(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (0, _) => [0xd, 1, 2, 3],
            (1, _) => [0x100, 0, 0, 0],
            (4, 0) => [0x121, 0, 0, 0],
            (4, 1) => [0x143, 0, 0, 0],
            (7, 0) => [1, 0xff, 0, 0],
            (7, 1) => [0, 0, 0, 0x10],
            (0xb, 0) => [1, 1, 0x100, 0],
            (0xb, 1) => [4, 8, 0x201, 0],
            (0xd, 0) => [0x207, 0, 0, 0],
            (0xd, 1) => [0xf, 0, 0, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 9) => [8, 2688, 0, 0],
            (0x8000_0000, _) => [0x8000_0001, 0, 0, 0],
            (0x8000_0001, _) => [0, 0, 1, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn enumerate_follows_termination_rules() {
        let recs = enumerate(fake);
        let keys: Vec<(u32, u32)> = recs.iter().map(|r| (r.leaf, r.subleaf)).collect();
        assert!(keys.contains(&(4, 1)) && !keys.contains(&(4, 2)));
        assert!(keys.contains(&(7, 1)) && !keys.contains(&(7, 2)));
        assert!(keys.contains(&(0xb, 1)) && !keys.contains(&(0xb, 2)));
        assert!(keys.contains(&(0xd, 2)) && keys.contains(&(0xd, 9)) && !keys.contains(&(0xd, 3)));
        assert!(keys.contains(&(0x8000_0001, 0)));
        assert_eq!(keys.iter().filter(|k| k.0 == 2).count(), 1);
        assert!(!keys.iter().any(|k| k.0 >= 0x4000_0000 && k.0 < 0x8000_0000));
    }

    #[test]
    fn enumerate_is_bounded_on_a_hostile_cpu() {
        // Every leaf claims everything: huge max leaves, every subleaf valid.
        let recs = enumerate(|_, _| [0xffff_ffff; 4]);
        assert!(recs.len() <= MAX_RECORDS);
        let recs = enumerate(|leaf, _| [leaf | 0xff, 0x0, 0xff00, 0]);
        assert!(recs.len() <= MAX_RECORDS);
    }

    #[test]
    fn format_then_parse_round_trips() {
        let recs = enumerate(fake);
        let text = format_dump(&recs, "fake CPU\nwith newline");
        assert!(text.starts_with("# hvctl cpuid dump v1\n# source: fake CPU with newline\n"));
        let d = parse_dump(&text).expect("parses");
        assert_eq!(d.records, recs);
        assert_eq!(d.source.as_deref(), Some("fake CPU with newline"));
        assert_eq!(d.get(0xd, 9), Some([8, 2688, 0, 0]));
        assert_eq!(d.get(0xd, 3), None);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let bad = "# hvctl cpuid dump v1\n00000000 00000000 00000001 00000000 00000000 00000000\n0000000 0 1 2 3 4\n";
        assert_eq!(parse_dump(bad).unwrap_err().to_string().split(':').next(), Some("line 3"));
        let upper = "# hvctl cpuid dump v1\n# c\n00000000 00000000 0000000A 00000000 00000000 00000000\n";
        assert!(matches!(parse_dump(upper), Err(DumpError::BadLine { line: 3, .. })));
        let five = "# hvctl cpuid dump v1\n00000000 00000000 00000000 00000000 00000000\n";
        assert!(matches!(parse_dump(five), Err(DumpError::BadLine { line: 2, .. })));
        let two_spaces = "# hvctl cpuid dump v1\n00000000  00000000 00000000 00000000 00000000 00000000\n";
        assert!(parse_dump(two_spaces).is_err());
        let dup = "# hvctl cpuid dump v1\n00000001 00000000 00000000 00000000 00000000 00000000\n00000001 00000000 00000000 00000000 00000000 00000001\n";
        assert_eq!(parse_dump(dup), Err(DumpError::Duplicate { line: 3, leaf: 1, subleaf: 0 }));
        assert_eq!(parse_dump("00000000 00000000 00000000 00000000 00000000 00000000\n"), Err(DumpError::BadHeader));
        assert_eq!(parse_dump(""), Err(DumpError::BadHeader));
    }
}
