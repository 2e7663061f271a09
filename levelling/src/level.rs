//! Cross-host levelling: the featureset every host in a pool can give, and what each
//! host gives up to join it; and postcard/hash helpers for featuresets.
//!
//! Flags are AND-ed, except bits with the `OR` flag (mitigation hints such as
//! `md_clear`, which are safe to show on a host without them) which are OR-ed,
//! CPUID.0xA.EAX (PMU numbers, per-byte minimum) and CPUID.0xA.EBX ("event not
//! available" bits, OR). Because every input is dependency-closed and AND preserves
//! that, the result is dependency-closed too (property-tested).
//!
//! This is the featureset part only; one verified policy for a pool of hosts (XSAVE
//! layouts, maximum leaves, the presented vendor) is [`crate::pool::level_pool`].

use crate::features::{self, OR};
use crate::featureset::{Featureset, WORDS, WordKind};
use alloc::vec::Vec;

/// The result of levelling N featuresets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Levelled {
    /// What every host can run.
    pub common: Featureset,
    /// Per input, in order: the bits it has that `common` lacks.
    pub lost: Vec<Featureset>,
}

/// Level `sets`. An empty input levels to the empty set.
pub fn level(sets: &[Featureset]) -> Levelled {
    if sets.is_empty() {
        return Levelled { common: Featureset::new(), lost: Vec::new() };
    }
    let or_mask = features::flag_mask(OR);
    let n = sets.iter().map(|s| s.words().len()).max().unwrap_or(0);
    let mut common = Featureset::new();
    for w in 0..n {
        let kind = WORDS.get(w).map_or(WordKind::Flags, |i| i.kind);
        let v = match kind {
            WordKind::Flags => {
                let and = sets.iter().fold(u32::MAX, |a, s| a & s.word(w));
                let or = sets.iter().fold(0, |a, s| a | s.word(w));
                (and & !or_mask.word(w)) | (or & or_mask.word(w))
            }
            WordKind::InvertedFlags => sets.iter().fold(0, |a, s| a | s.word(w)),
            WordKind::PmuFields => (0..4).fold(0u32, |acc, byte| {
                let m = sets.iter().map(|s| (s.word(w) >> (byte * 8)) & 0xff).min().unwrap_or(0);
                acc | (m << (byte * 8))
            }),
        };
        common.set_word(w, v);
    }
    let lost = sets.iter().map(|s| s.and_not(&common)).collect();
    Levelled { common, lost }
}

impl Featureset {
    /// Postcard encoding of the normalized featureset.
    pub fn to_postcard(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(&self.normalized())
    }
    /// Decode from postcard.
    pub fn from_postcard(bytes: &[u8]) -> Result<Featureset, postcard::Error> {
        postcard::from_bytes(bytes)
    }
    /// Stable hash: FNV-1a 64 over [`Featureset::to_postcard`].
    pub fn stable_hash(&self) -> u64 {
        self.to_postcard().map_or(0, |b| crate::hash::fnv1a64(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::*;
    use crate::featureset::word;

    fn fs(fs: &[Feature]) -> Featureset {
        let mut s = Featureset::new();
        for f in fs {
            s.set_bit(f.word(), f.bit(), true);
        }
        s
    }

    #[test]
    fn and_for_flags_or_for_or_bits() {
        let a = fs(&[AVX, XSAVE, MD_CLEAR]);
        let b = fs(&[XSAVE, SSE]);
        let l = level(&[a.clone(), b.clone()]);
        assert_eq!(l.common, fs(&[XSAVE, MD_CLEAR]));
        assert_eq!(l.lost[0], fs(&[AVX]));
        assert_eq!(l.lost[1], fs(&[SSE]));
    }

    #[test]
    fn pmu_words_level_by_min_and_or() {
        let mut a = Featureset::new();
        a.set_word(word::LA_EAX, 0x0830_0805);
        a.set_word(word::LA_EBX, 0b0001);
        let mut b = Featureset::new();
        b.set_word(word::LA_EAX, 0x0730_0402);
        b.set_word(word::LA_EBX, 0b0100);
        let l = level(&[a, b]);
        assert_eq!(l.common.word(word::LA_EAX), 0x0730_0402);
        assert_eq!(l.common.word(word::LA_EBX), 0b0101);
    }

    #[test]
    fn empty_input() {
        assert!(level(&[]).common.is_empty());
    }

    #[test]
    fn hash_ignores_trailing_zero_words() {
        let a = Featureset::from_words(&[1, 2]);
        let b = Featureset::from_words(&[1, 2, 0, 0]);
        assert_eq!(a.stable_hash(), b.stable_hash());
        assert_ne!(a.stable_hash(), Featureset::from_words(&[1, 3]).stable_hash());
    }
}
