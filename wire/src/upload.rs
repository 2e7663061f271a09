//! Image uploads (v5): kernels and initrds larger than one frame travel as a sequence
//! of checksummed chunks, and `DomainCreate` names the finished uploads.
//!
//! ```text
//!   hvctl                                              hv (core service)
//!     |-- #1 ImageBegin { Kernel, total_len, crc32c } --->|  stages total_len bytes
//!     |<------- #1 Upload(UploadStatus { upload: 3, window: 4, received: 0, .. })
//!     |-- #2 ImageChunk { 3, offset 0,     bytes, crc } ->|  up to `window` chunks
//!     |-- #3 ImageChunk { 3, offset 61440, bytes, crc } ->|  unanswered at a time
//!     |<------- #2 Upload(UploadStatus { received: 61440, .. })
//!     |   ...                                             |
//!     |<------- #n Upload(UploadStatus { received: total_len, complete: true })
//!     |-- #m DomainCreate(DomainSpec { kernel: Uploaded(3), .. }) ->|  the upload is used up
//!     |<------- #m DomainCreated { id }
//! ```
//!
//! Rules, checked by [`UploadTracker`] on both the hypervisor and the test fakes:
//! - an image is 1..=[`MAX_IMAGE_LEN`] bytes, announced with its length and CRC-32C;
//! - chunks carry 1..=[`MAX_IMAGE_CHUNK`] bytes and their own CRC-32C, and arrive in
//!   order: each starts where the accepted bytes end, none reaches past `total_len`.
//!   A refused chunk (gap, overlap, too long, past the end, checksum) changes nothing:
//!   the sender may send the right one again from [`UploadStatus::received`];
//! - after the last byte the whole image's CRC-32C must equal the announced one, or
//!   the upload is discarded;
//! - an upload belongs to the connection that began it: `DomainCreate` must name it on
//!   the same connection, and closing the connection frees it;
//! - the hypervisor holds a bounded number of uploads; an upload idle for too long, or
//!   replaced by a new one when all slots are taken, is freed. `ImageCancel` frees one
//!   at once. What the limits are is the hypervisor's (see its `services::upload`).
//!
//! Console input (`DomainConsoleInput`) is here too: its bound, [`MAX_CONSOLE_INPUT`].

use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::crc32c::Crc32c;
use crate::error::{ErrorCode, ErrorReply};

/// The most image bytes one [`ImageChunk`](crate::Request::ImageChunk) carries (the
/// frame's payload is at most [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN)).
pub const MAX_IMAGE_CHUNK: usize = 60 * 1024;

/// The largest image the protocol can announce (512 MiB); a hypervisor may accept
/// less (it says so in its refusal).
pub const MAX_IMAGE_LEN: u64 = 512 << 20;

/// The most console input bytes one `DomainConsoleInput` carries.
pub const MAX_CONSOLE_INPUT: usize = 4096;

/// What an uploaded image is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// A guest kernel (ELF64, bzImage or multiboot).
    Kernel,
    /// An initial ramdisk (only with bzImage and multiboot kernels).
    Initrd,
}

impl ImageKind {
    /// A lower-case name ("kernel", "initrd").
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Initrd => "initrd",
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where `DomainCreate` takes an image from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageRef {
    /// The bytes themselves: the whole request must fit one frame.
    Inline(#[serde(with = "crate::bytes")] Vec<u8>),
    /// A completed upload (its id from [`UploadStatus::upload`]); creating the domain
    /// uses it up, whether or not the creation succeeds.
    Uploaded(u32),
}

/// The state of one upload: the answer to `ImageBegin` and to every `ImageChunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The upload's id, for the chunks and for `DomainCreate`.
    pub upload: u32,
    /// What it is.
    pub kind: ImageKind,
    /// Bytes announced.
    pub total_len: u64,
    /// Bytes accepted so far (the offset the next chunk must start at).
    pub received: u64,
    /// How many chunks the sender may have unanswered at once.
    pub window: u32,
    /// All bytes arrived and the whole image's CRC-32C matched.
    pub complete: bool,
}

/// Why an upload or one of its chunks was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadError {
    /// An image of 0 bytes.
    Empty,
    /// The announced length exceeds what the receiver accepts.
    TooLarge {
        /// Announced bytes.
        len: u64,
        /// The most accepted.
        max: u64,
    },
    /// A chunk with no bytes or more than [`MAX_IMAGE_CHUNK`].
    BadChunkLength {
        /// The chunk's length.
        len: usize,
    },
    /// A chunk that does not start where the accepted bytes end (a gap or an overlap).
    OutOfOrder {
        /// Where the chunk starts.
        offset: u64,
        /// Where it had to start.
        expected: u64,
    },
    /// A chunk reaching past the announced length.
    PastEnd {
        /// Where the chunk starts.
        offset: u64,
        /// Its length.
        len: usize,
        /// The announced length.
        total_len: u64,
    },
    /// A chunk whose bytes do not match its CRC-32C.
    ChunkCrc {
        /// Where the chunk starts.
        offset: u64,
        /// The CRC it carried.
        expected: u32,
        /// The CRC of its bytes.
        actual: u32,
    },
    /// The whole image does not match the announced CRC-32C (the upload is discarded).
    ImageCrc {
        /// Announced.
        expected: u32,
        /// Of the bytes received.
        actual: u32,
    },
    /// A chunk for an upload that already has all its bytes.
    AlreadyComplete,
}

impl UploadError {
    /// The typed reply: [`ErrorCode::BadChunk`] for a chunk the sender can fix and
    /// resend, [`ErrorCode::Refused`] for an image that cannot be taken.
    pub fn to_reply(&self, upload: u32) -> ErrorReply {
        let code = match self {
            Self::Empty | Self::TooLarge { .. } => ErrorCode::Refused,
            _ => ErrorCode::BadChunk,
        };
        ErrorReply::new(code, alloc::format!("upload {upload}: {self}"))
    }
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Empty => f.write_str("an image of 0 bytes cannot be uploaded"),
            Self::TooLarge { len, max } => {
                write!(f, "an image of {len} bytes is larger than the {max} bytes this hypervisor accepts")
            }
            Self::BadChunkLength { len } => {
                write!(f, "a chunk of {len} bytes: chunks carry 1 to {MAX_IMAGE_CHUNK} bytes")
            }
            Self::OutOfOrder { offset, expected } => write!(
                f,
                "the chunk at offset {offset} is out of order: {expected} bytes are accepted, so the next chunk \
                 must start at offset {expected}"
            ),
            Self::PastEnd { offset, len, total_len } => {
                write!(f, "the chunk at offset {offset} of {len} bytes reaches past the announced {total_len} bytes")
            }
            Self::ChunkCrc { offset, expected, actual } => write!(
                f,
                "CRC-32C mismatch in the chunk at offset {offset}: it carries {expected:#010x}, its bytes give \
                 {actual:#010x}; the chunk was refused"
            ),
            Self::ImageCrc { expected, actual } => write!(
                f,
                "CRC-32C mismatch over the whole image: announced {expected:#010x}, received bytes give \
                 {actual:#010x}; the upload was discarded"
            ),
            Self::AlreadyComplete => f.write_str("the upload already has all its bytes"),
        }
    }
}

impl core::error::Error for UploadError {}

/// The receiving side's bookkeeping of one upload: where the next chunk starts and the
/// running CRC-32C. It does not store the bytes; the caller stores each accepted
/// chunk at its offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadTracker {
    kind: ImageKind,
    total_len: u64,
    crc_expected: u32,
    received: u64,
    crc: Crc32c,
}

impl UploadTracker {
    /// Start an upload of `total_len` bytes whose CRC-32C is `crc32c`, refusing
    /// lengths of 0 or above `max_len` (at most [`MAX_IMAGE_LEN`]).
    pub fn new(kind: ImageKind, total_len: u64, crc32c: u32, max_len: u64) -> Result<Self, UploadError> {
        let max = max_len.min(MAX_IMAGE_LEN);
        if total_len == 0 {
            return Err(UploadError::Empty);
        }
        if total_len > max {
            return Err(UploadError::TooLarge { len: total_len, max });
        }
        Ok(Self { kind, total_len, crc_expected: crc32c, received: 0, crc: Crc32c::new() })
    }

    /// Check a chunk before storing it: `Ok(())` means store `bytes` at `offset` and
    /// then call [`commit`](Self::commit). Nothing changes on error.
    pub fn check(&self, offset: u64, bytes: &[u8], chunk_crc: u32) -> Result<(), UploadError> {
        if self.complete() {
            return Err(UploadError::AlreadyComplete);
        }
        if bytes.is_empty() || bytes.len() > MAX_IMAGE_CHUNK {
            return Err(UploadError::BadChunkLength { len: bytes.len() });
        }
        if offset != self.received {
            return Err(UploadError::OutOfOrder { offset, expected: self.received });
        }
        let end = offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > self.total_len) {
            return Err(UploadError::PastEnd { offset, len: bytes.len(), total_len: self.total_len });
        }
        let actual = crate::crc32c(bytes);
        if actual != chunk_crc {
            return Err(UploadError::ChunkCrc { offset, expected: chunk_crc, actual });
        }
        Ok(())
    }

    /// Count a chunk that [`check`](Self::check) accepted and the caller stored. After
    /// the last byte, the whole image's CRC is compared: an error then means the upload
    /// must be discarded.
    pub fn commit(&mut self, bytes: &[u8]) -> Result<(), UploadError> {
        self.crc.update(bytes);
        self.received = self.received.saturating_add(bytes.len() as u64).min(self.total_len);
        if self.received == self.total_len {
            let actual = self.crc.finish();
            if actual != self.crc_expected {
                return Err(UploadError::ImageCrc { expected: self.crc_expected, actual });
            }
        }
        Ok(())
    }

    /// [`check`](Self::check) then [`commit`](Self::commit), for receivers that store
    /// nothing or store after the fact.
    pub fn accept(&mut self, offset: u64, bytes: &[u8], chunk_crc: u32) -> Result<(), UploadError> {
        self.check(offset, bytes, chunk_crc)?;
        self.commit(bytes)
    }

    /// Whether every byte arrived (and, [`commit`](Self::commit) having returned `Ok`,
    /// the image's CRC matched).
    pub const fn complete(&self) -> bool {
        self.received == self.total_len
    }

    /// What the upload is.
    pub const fn kind(&self) -> ImageKind {
        self.kind
    }

    /// Bytes announced.
    pub const fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Bytes accepted.
    pub const fn received(&self) -> u64 {
        self.received
    }

    /// The status to answer with.
    pub const fn status(&self, upload: u32, window: u32) -> UploadStatus {
        UploadStatus {
            upload,
            kind: self.kind,
            total_len: self.total_len,
            received: self.received,
            window,
            complete: self.complete(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crc32c;
    use alloc::vec;

    fn image(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn in_order_chunks_complete_with_the_image_crc() {
        let img = image(3 * MAX_IMAGE_CHUNK + 17);
        let mut t = UploadTracker::new(ImageKind::Kernel, img.len() as u64, crc32c(&img), MAX_IMAGE_LEN).unwrap();
        let mut offset = 0;
        for c in img.chunks(MAX_IMAGE_CHUNK) {
            assert!(!t.complete());
            t.accept(offset, c, crc32c(c)).unwrap();
            offset += c.len() as u64;
        }
        assert!(t.complete());
        assert_eq!(t.status(9, 4).received, img.len() as u64);
        assert_eq!(t.accept(offset, &[1], crc32c(&[1])), Err(UploadError::AlreadyComplete));
    }

    #[test]
    fn refused_chunks_change_nothing() {
        let img = image(10_000);
        let mut t = UploadTracker::new(ImageKind::Initrd, 10_000, crc32c(&img), MAX_IMAGE_LEN).unwrap();
        t.accept(0, &img[..4000], crc32c(&img[..4000])).unwrap();
        let before = t.clone();
        let c = &img[4000..8000];
        assert_eq!(t.accept(3000, c, crc32c(c)), Err(UploadError::OutOfOrder { offset: 3000, expected: 4000 }));
        assert_eq!(t.accept(5000, c, crc32c(c)), Err(UploadError::OutOfOrder { offset: 5000, expected: 4000 }));
        let mut bad = c.to_vec();
        bad[10] ^= 1;
        assert!(matches!(t.accept(4000, &bad, crc32c(c)), Err(UploadError::ChunkCrc { offset: 4000, .. })));
        let long = image(6001);
        assert!(matches!(t.accept(4000, &long, crc32c(&long)), Err(UploadError::PastEnd { .. })));
        assert_eq!(t.accept(4000, &[], crc32c(&[])), Err(UploadError::BadChunkLength { len: 0 }));
        let huge = vec![0u8; MAX_IMAGE_CHUNK + 1];
        assert!(matches!(t.accept(4000, &huge, 0), Err(UploadError::BadChunkLength { .. })));
        assert_eq!(t, before);
        t.accept(4000, c, crc32c(c)).unwrap();
        t.accept(8000, &img[8000..], crc32c(&img[8000..])).unwrap();
        assert!(t.complete());
    }

    #[test]
    fn a_wrong_image_crc_is_found_at_the_end() {
        let img = image(100);
        let mut t = UploadTracker::new(ImageKind::Kernel, 100, crc32c(&img) ^ 1, MAX_IMAGE_LEN).unwrap();
        t.accept(0, &img[..50], crc32c(&img[..50])).unwrap();
        let e = t.accept(50, &img[50..], crc32c(&img[50..])).unwrap_err();
        assert!(matches!(e, UploadError::ImageCrc { .. }));
        assert_eq!(e.to_reply(3).code, ErrorCode::BadChunk);
        assert!(e.to_reply(3).message.starts_with("upload 3: CRC-32C mismatch over the whole image"));
    }

    #[test]
    fn lengths_are_bounded() {
        assert_eq!(UploadTracker::new(ImageKind::Kernel, 0, 0, MAX_IMAGE_LEN), Err(UploadError::Empty));
        assert_eq!(
            UploadTracker::new(ImageKind::Kernel, 1 << 20, 0, 1 << 19),
            Err(UploadError::TooLarge { len: 1 << 20, max: 1 << 19 })
        );
        assert_eq!(
            UploadTracker::new(ImageKind::Kernel, MAX_IMAGE_LEN + 1, 0, u64::MAX),
            Err(UploadError::TooLarge { len: MAX_IMAGE_LEN + 1, max: MAX_IMAGE_LEN })
        );
        assert_eq!(UploadError::TooLarge { len: 2, max: 1 }.to_reply(1).code, ErrorCode::Refused);
        // An offset near u64::MAX cannot overflow the end check.
        let t = UploadTracker::new(ImageKind::Kernel, 10, 0, 10).unwrap();
        assert!(t.check(u64::MAX, &[1], 0).is_err());
    }
}
