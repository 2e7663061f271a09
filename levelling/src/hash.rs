//! The stable hash of policies and featuresets: 64-bit FNV-1a over the postcard
//! encoding (featuresets normalized first, so trailing zero words do not change it).
//!
//! FNV-1a is not collision-resistant against an adversary; it identifies a policy in
//! logs and lets two ends of a migration compare what they hold. Parameters: offset
//! basis 0xcbf29ce484222325, prime 0x100000001b3 (the published FNV-1a 64 constants).

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
