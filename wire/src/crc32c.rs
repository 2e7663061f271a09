//! CRC-32C (Castagnoli; iSCSI, RFC 3720 B.4): reflected polynomial 0x82F63B78, initial
//! value and final XOR 0xFFFFFFFF. Check value: `crc32c(b"123456789") == 0xE3069283`.
//!
//! Used for the per-chunk checksum of [`StreamChunk`](crate::StreamChunk). Table-driven,
//! slicing-by-8 (8 KiB of tables computed at compile time); no hardware instructions,
//! so it runs the same in the hypervisor, in service tasks and on the host. Not for
//! cryptographic integrity: it catches corruption and bugs, not an attacker.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[0]` is the classic byte table; `TABLES[k][b]` is the CRC of byte `b`
/// followed by `k` zero bytes, which lets [`Crc32c::update`] consume 8 bytes per step.
static TABLES: [[u32; 256]; 8] = make_tables();

#[allow(clippy::indexing_slicing, reason = "const evaluation: an out-of-bounds index would fail the build")]
const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

#[inline(always)]
#[allow(clippy::indexing_slicing, reason = "K < 8 is checked at compile time and a u8 index cannot exceed 255")]
fn t<const K: usize>(b: u8) -> u32 {
    const { assert!(K < 8) };
    TABLES[K][usize::from(b)]
}

/// An incremental CRC-32C computation.
///
/// ```
/// let mut c = wire::Crc32c::new();
/// c.update(b"1234");
/// c.update(b"56789");
/// assert_eq!(c.finish(), 0xE306_9283);
/// assert_eq!(wire::crc32c(b"123456789"), 0xE306_9283);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc32c {
    state: u32,
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// A computation over no bytes yet.
    pub const fn new() -> Self {
        Self { state: !0 }
    }

    /// Feed `data`.
    pub fn update(&mut self, data: &[u8]) {
        let mut crc = self.state;
        let (blocks, rest) = data.as_chunks::<8>();
        for &[b0, b1, b2, b3, b4, b5, b6, b7] in blocks {
            let lo = crc.to_le_bytes();
            crc = t::<7>(lo[0] ^ b0)
                ^ t::<6>(lo[1] ^ b1)
                ^ t::<5>(lo[2] ^ b2)
                ^ t::<4>(lo[3] ^ b3)
                ^ t::<3>(b4)
                ^ t::<2>(b5)
                ^ t::<1>(b6)
                ^ t::<0>(b7);
        }
        for &b in rest {
            crc = t::<0>(crc.to_le_bytes()[0] ^ b) ^ (crc >> 8);
        }
        self.state = crc;
    }

    /// The CRC of everything fed so far.
    pub const fn finish(self) -> u32 {
        !self.state
    }
}

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time reference, straight from the definition.
    fn reference(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// RFC 3720 B.4 test patterns.
    #[test]
    fn iscsi_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    #[test]
    fn slicing_matches_reference_at_every_length_and_split() {
        let data: [u8; 67] = core::array::from_fn(|i| (i as u8).wrapping_mul(151).wrapping_add(7));
        for len in 0..=data.len() {
            let d = &data[..len];
            assert_eq!(crc32c(d), reference(d), "len {len}");
            for split in 0..=len {
                let mut c = Crc32c::new();
                c.update(&d[..split]);
                c.update(&d[split..]);
                assert_eq!(c.finish(), reference(d), "len {len} split {split}");
            }
        }
    }
}
