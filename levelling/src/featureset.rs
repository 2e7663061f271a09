//! Featuresets: the versioned array of 32-bit feature words, one per CPUID feature
//! leaf/register, in an order that is part of the ABI.
//!
//! This module owns the word layout ([`WORDS`]) and the set algebra on
//! [`Featureset`]. It does not know what any individual bit means; that is the
//! feature table in [`crate::features`].
//!
//! ABI rules: the index of a word never changes; new words are only appended (and
//! [`FEATURESET_VERSION`] bumped). A featureset may be shorter or longer than
//! [`NWORDS`]: missing words read as zero and comparisons treat them so, and words
//! this build does not know are kept (and can never be in a guest's `max`).

use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Version of the word layout this build knows (= the number of words it has
/// appended so far is [`NWORDS`]).
pub const FEATURESET_VERSION: u32 = 1;

/// A register of a CPUID result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reg {
    /// EAX (index 0 of a `[u32; 4]` CPUID result).
    Eax,
    /// EBX (index 1).
    Ebx,
    /// ECX (index 2).
    Ecx,
    /// EDX (index 3).
    Edx,
}

impl Reg {
    /// Position of this register in a `[eax, ebx, ecx, edx]` array.
    pub const fn index(self) -> usize {
        match self {
            Reg::Eax => 0,
            Reg::Ebx => 1,
            Reg::Ecx => 2,
            Reg::Edx => 3,
        }
    }
    /// Lower-case register name, e.g. `ecx`.
    pub const fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
    /// Upper-case register name, e.g. `ECX`.
    pub const fn upper(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
    /// Read this register out of a `[eax, ebx, ecx, edx]` array.
    pub const fn get(self, regs: &[u32; 4]) -> u32 {
        match self {
            Reg::Eax => regs[0],
            Reg::Ebx => regs[1],
            Reg::Ecx => regs[2],
            Reg::Edx => regs[3],
        }
    }
}

/// How a word combines when levelling across hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordKind {
    /// Ordinary feature flags: AND across hosts (except the feature table's OR bits).
    Flags,
    /// CPUID.0xA.EAX: four byte-sized numbers (PMU version, counters per logical
    /// processor, counter width, EBX vector length); levelled by per-byte minimum.
    PmuFields,
    /// CPUID.0xA.EBX: a set bit means the event is *not* available; levelled by OR.
    InvertedFlags,
}

/// Where one featureset word comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordInfo {
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input), or `None` for a leaf that ignores ECX.
    pub subleaf: Option<u32>,
    /// The register holding the word.
    pub reg: Reg,
    /// How levelling combines it.
    pub kind: WordKind,
}

impl fmt::Display for WordInfo {
    /// `CPUID 0x7[0].EBX` / `CPUID 0x1.ECX`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.subleaf {
            Some(s) => write!(f, "CPUID {:#x}[{}].{}", self.leaf, s, self.reg.upper()),
            None => write!(f, "CPUID {:#x}.{}", self.leaf, self.reg.upper()),
        }
    }
}

/// Word indices. The numbers are ABI: never renumber, only append.
pub mod word {
    /// CPUID.1:ECX (SDM Vol. 2A, CPUID, Table 3-10).
    pub const L1_ECX: usize = 0;
    /// CPUID.1:EDX (SDM Vol. 2A, CPUID, Table 3-11).
    pub const L1_EDX: usize = 1;
    /// CPUID.8000_0001h:ECX (APM Vol. 3, E.4.2).
    pub const E1_ECX: usize = 2;
    /// CPUID.8000_0001h:EDX (APM Vol. 3, E.4.2), without the bits duplicated from 1.EDX.
    pub const E1_EDX: usize = 3;
    /// CPUID.(EAX=0Dh,ECX=1):EAX (SDM Vol. 1, 13.2).
    pub const D1_EAX: usize = 4;
    /// CPUID.(EAX=07h,ECX=0):EBX (SDM Vol. 2A, CPUID leaf 07H).
    pub const L7_0_EBX: usize = 5;
    /// CPUID.(EAX=07h,ECX=0):ECX.
    pub const L7_0_ECX: usize = 6;
    /// CPUID.(EAX=07h,ECX=0):EDX.
    pub const L7_0_EDX: usize = 7;
    /// CPUID.(EAX=07h,ECX=1):EAX.
    pub const L7_1_EAX: usize = 8;
    /// CPUID.06h:EAX (thermal and power management).
    pub const L6_EAX: usize = 9;
    /// CPUID.06h:ECX.
    pub const L6_ECX: usize = 10;
    /// CPUID.0Ah:EAX (architectural PMU: version, counters, width).
    pub const LA_EAX: usize = 11;
    /// CPUID.0Ah:EBX (architectural PMU events *not* available).
    pub const LA_EBX: usize = 12;
    /// CPUID.(EAX=0Fh,ECX=0):EDX (RDT monitoring resource types).
    pub const LF_0_EDX: usize = 13;
    /// CPUID.(EAX=0Fh,ECX=1):EDX (L3 monitoring event types).
    pub const LF_1_EDX: usize = 14;
    /// CPUID.8000_0007h:EDX (APM Vol. 3, E.4.6: advanced power management).
    pub const E7_EDX: usize = 15;
    /// CPUID.8000_0008h:EBX (APM Vol. 3, E.4.7: extended features).
    pub const E8_EBX: usize = 16;
    /// CPUID.(EAX=07h,ECX=2):EDX (appended in version 1).
    pub const L7_2_EDX: usize = 17;
    /// CPUID.8000_0021h:EAX (APM Vol. 3, E.4.18; appended in version 1).
    pub const E21_EAX: usize = 18;
}

/// Number of words this build knows.
pub const NWORDS: usize = 19;

const fn w(leaf: u32, subleaf: Option<u32>, reg: Reg) -> WordInfo {
    WordInfo { leaf, subleaf, reg, kind: WordKind::Flags }
}

/// The word layout, indexed by the constants in [`word`].
pub const WORDS: [WordInfo; NWORDS] = [
    w(0x1, None, Reg::Ecx),
    w(0x1, None, Reg::Edx),
    w(0x8000_0001, None, Reg::Ecx),
    w(0x8000_0001, None, Reg::Edx),
    w(0xd, Some(1), Reg::Eax),
    w(0x7, Some(0), Reg::Ebx),
    w(0x7, Some(0), Reg::Ecx),
    w(0x7, Some(0), Reg::Edx),
    w(0x7, Some(1), Reg::Eax),
    w(0x6, None, Reg::Eax),
    w(0x6, None, Reg::Ecx),
    WordInfo { leaf: 0xa, subleaf: None, reg: Reg::Eax, kind: WordKind::PmuFields },
    WordInfo { leaf: 0xa, subleaf: None, reg: Reg::Ebx, kind: WordKind::InvertedFlags },
    w(0xf, Some(0), Reg::Edx),
    w(0xf, Some(1), Reg::Edx),
    w(0x8000_0007, None, Reg::Edx),
    w(0x8000_0008, None, Reg::Ebx),
    w(0x7, Some(2), Reg::Edx),
    w(0x8000_0021, None, Reg::Eax),
];

/// A set of CPUID feature bits: one 32-bit word per entry of [`WORDS`].
///
/// Missing words are zero; equality ignores trailing zero words.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Featureset {
    /// The word layout version of the writer.
    pub version: u32,
    words: Vec<u32>,
}

impl PartialEq for Featureset {
    fn eq(&self, other: &Self) -> bool {
        let n = self.words.len().max(other.words.len());
        (0..n).all(|i| self.word(i) == other.word(i))
    }
}
impl Eq for Featureset {}

impl Featureset {
    /// The empty featureset (all words zero).
    pub fn new() -> Self {
        Featureset { version: FEATURESET_VERSION, words: Vec::new() }
    }

    /// Build from words in ABI order.
    pub fn from_words(words: &[u32]) -> Self {
        Featureset { version: FEATURESET_VERSION, words: words.to_vec() }
    }

    /// The stored words (may be shorter or longer than [`NWORDS`]).
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Word `i`, zero if absent.
    pub fn word(&self, i: usize) -> u32 {
        self.words.get(i).copied().unwrap_or(0)
    }

    /// Set word `i`, growing the array with zeros as needed.
    pub fn set_word(&mut self, i: usize, value: u32) {
        if i >= self.words.len() {
            if value == 0 {
                return;
            }
            self.words.resize(i + 1, 0);
        }
        if let Some(slot) = self.words.get_mut(i) {
            *slot = value;
        }
    }

    /// Number of words that matter (trailing zeros dropped).
    pub fn len(&self) -> usize {
        let mut n = self.words.len();
        while n > 0 && self.word(n - 1) == 0 {
            n -= 1;
        }
        n
    }

    /// True if no bit is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy with trailing zero words dropped (the canonical form used for hashing).
    pub fn normalized(&self) -> Featureset {
        let n = self.len();
        Featureset { version: FEATURESET_VERSION, words: self.words.iter().take(n).copied().collect() }
    }

    /// Test bit `bit` of word `word`.
    pub fn has_bit(&self, word: usize, bit: u32) -> bool {
        bit < 32 && self.word(word) & (1 << bit) != 0
    }

    /// Set or clear bit `bit` of word `word`.
    pub fn set_bit(&mut self, word: usize, bit: u32, on: bool) {
        if bit >= 32 {
            return;
        }
        let v = self.word(word);
        let v = if on { v | (1 << bit) } else { v & !(1 << bit) };
        self.set_word(word, v);
    }

    fn zip(&self, other: &Featureset, f: impl Fn(u32, u32) -> u32) -> Featureset {
        let n = self.words.len().max(other.words.len());
        let mut out =
            Featureset { version: FEATURESET_VERSION, words: (0..n).map(|i| f(self.word(i), other.word(i))).collect() };
        out.words.truncate(out.len());
        out
    }

    /// Intersection.
    pub fn and(&self, other: &Featureset) -> Featureset {
        self.zip(other, |a, b| a & b)
    }
    /// Union.
    pub fn or(&self, other: &Featureset) -> Featureset {
        self.zip(other, |a, b| a | b)
    }
    /// Bits in `self` but not in `other`.
    pub fn and_not(&self, other: &Featureset) -> Featureset {
        self.zip(other, |a, b| a & !b)
    }
    /// True if every bit of `self` is in `other`.
    pub fn is_subset_of(&self, other: &Featureset) -> bool {
        self.and_not(other).is_empty()
    }

    /// Iterate over the set bits as `(word, bit)` in ABI order.
    pub fn bits(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| (0..32u32).filter(move |b| v & (1 << b) != 0).map(move |b| (i, b)))
    }
}

impl fmt::Display for Featureset {
    /// The hex word form `xen-cpuid` prints: all [`NWORDS`] words (more if the set
    /// is longer), 8 lower-case hex digits each, separated by `:`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.len().max(NWORDS);
        for i in 0..n {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:08x}", self.word(i))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn different_lengths_compare_with_missing_words_zero() {
        let a = Featureset::from_words(&[1, 2]);
        let b = Featureset::from_words(&[1, 2, 0, 0]);
        assert_eq!(a, b);
        let c = Featureset::from_words(&[1, 2, 0, 4]);
        assert_ne!(a, c);
        assert!(a.is_subset_of(&c));
        assert!(!c.is_subset_of(&a));
        assert_eq!(c.and(&a), a);
        assert_eq!(c.and_not(&a), Featureset::from_words(&[0, 0, 0, 4]));
    }

    #[test]
    fn hex_form_prints_all_words() {
        let s = Featureset::from_words(&[0xdead_beef]).to_string();
        assert_eq!(s.split(':').count(), NWORDS);
        assert!(s.starts_with("deadbeef:00000000"));
    }

    #[test]
    fn word_layout_matches_issue_order() {
        assert_eq!(WORDS[word::L7_0_EBX].leaf, 7);
        assert_eq!(WORDS[word::L7_0_EBX].subleaf, Some(0));
        assert_eq!(WORDS[word::E8_EBX].leaf, 0x8000_0008);
        assert_eq!(WORDS[word::LF_1_EDX].subleaf, Some(1));
        assert_eq!(WORDS[word::D1_EAX].reg, Reg::Eax);
    }
}
