//! Image uploads on the hypervisor side (protocol v5, `wire::upload`): where the bytes
//! of a kernel or initrd wait between `ImageBegin` and the `DomainCreate` that uses
//! them, and the limits that keep a client from holding memory forever.
//!
//! Staging: each upload gets one physically contiguous run of frames from the frame
//! pool, allocated at `ImageBegin` for the announced length, written chunk by chunk
//! and handed to `Machine::create` as one `&[u8]` (the pool is identity-mapped). Not
//! the heap: it is 1/64 of RAM (about 31 MiB with QEMU's 2 GiB), and a 14 MB kernel
//! plus an initrd would take most of it; the pool is where guest memory comes from
//! anyway, and is sized from the memory map. Not straight into guest memory either:
//! the loaders (ELF, bzImage, multiboot) parse the whole image before they know where
//! its parts go, so they need it in one place first. The run is freed as soon as the
//! domain is created (or its creation failed), so the peak is the image once.
//!
//! Limits: at most [`MAX_UPLOADS`] at once (a kernel and an initrd for two clients);
//! an upload belongs to the connection that began it and is freed when that connection
//! closes (hvctl uploads and creates on one connection); one that has not seen a chunk
//! for [`IDLE_TIMEOUT_NS`] is freed; when every
//! slot is taken, a new upload replaces the one idle longest if it has been idle for
//! [`REPLACE_IDLE_NS`], else it is refused with `Busy`. The length is checked against
//! `wire::MAX_IMAGE_LEN` and the frames actually free (`OutOfMemory` otherwise).
//!
//! Not here: the chunk rules themselves (order, lengths, checksums) are
//! `wire::UploadTracker`'s, shared with hvctl's test fakes.

use alloc::vec::Vec;

use wire::{ErrorCode, ErrorReply, ImageKind, UploadStatus, UploadTracker};

use crate::mm::PAGE_SIZE;
use crate::mm::frames::FramePool;

/// Uploads held at once.
pub const MAX_UPLOADS: usize = 4;
/// Chunks a sender may have unanswered (the core's mailbox holds 16 requests).
pub const WINDOW: u32 = 4;
/// An upload with no chunk for this long is freed (30 s).
pub const IDLE_TIMEOUT_NS: u64 = 30_000_000_000;
/// With every slot taken, an upload idle this long may be replaced by a new one (2 s).
pub const REPLACE_IDLE_NS: u64 = 2_000_000_000;

/// An image's bytes in a contiguous run of frames of the pool.
#[derive(Debug)]
pub struct Staged {
    pa: u64,
    frames: usize,
    len: usize,
}

impl Staged {
    /// A zeroed run for `len` bytes.
    fn alloc(pool: &mut FramePool, len: usize) -> Result<Self, ErrorReply> {
        let frames = len.div_ceil(PAGE_SIZE as usize).max(1);
        if frames > pool.free_frames() {
            return Err(ErrorReply::new(
                ErrorCode::OutOfMemory,
                alloc::format!(
                    "an image of {len} bytes needs {frames} frames to stage, the pool has {} free",
                    pool.free_frames()
                ),
            ));
        }
        let pa = pool.alloc_contiguous_zeroed(frames).map_err(|e| {
            ErrorReply::new(
                ErrorCode::OutOfMemory,
                alloc::format!("no run of {frames} contiguous free frames to stage an image of {len} bytes: {e}"),
            )
        })?;
        Ok(Self { pa, frames, len })
    }

    /// Copy `bytes` to `offset` (inside `len`, checked by the tracker first).
    fn write(&mut self, pool: &mut FramePool, offset: usize, bytes: &[u8]) -> Result<(), ErrorReply> {
        let page = PAGE_SIZE as usize;
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (frame, within) = (at / page, at % page);
            if frame >= self.frames {
                return Err(ErrorReply::new(ErrorCode::Internal, "upload chunk outside its staging frames"));
            }
            let n = rest.len().min(page - within);
            let dst = pool
                .bytes_mut(self.pa + (frame * page) as u64)
                .map_err(|e| ErrorReply::new(ErrorCode::Internal, alloc::format!("staging frame: {e}")))?;
            let (head, tail) = rest.split_at(n);
            if let Some(d) = dst.get_mut(within..within + n) {
                d.copy_from_slice(head);
            }
            rest = tail;
            at += n;
        }
        Ok(())
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        // The frames return to the pool only through `free`, which consumes `self`, and
        // are written only through `write`, which takes `&mut self`: neither can run
        // while this borrow lives, and no other owner knows these addresses.
        // SAFETY: `[pa, pa + frames * 4096)` is a run the pool allocated to this value
        // alone, identity-mapped (FramePool::new's contract), and `len <= frames * 4096`.
        unsafe { core::slice::from_raw_parts(self.pa as *const u8, self.len) }
    }

    /// Give the frames back.
    pub fn free(self, pool: &mut FramePool) {
        for i in 0..self.frames {
            // Cannot fail for frames this value owns; a failure would be a pool bug,
            // and leaking a frame is the safe outcome.
            let _ = pool.free(self.pa + (i as u64) * PAGE_SIZE);
        }
    }
}

struct Upload {
    id: u32,
    /// The connection that began it (freed when that connection closes).
    owner: u32,
    tracker: UploadTracker,
    staged: Staged,
    /// Uptime (ns) of its last chunk or of its start.
    last_ns: u64,
}

/// The uploads in progress or finished and not yet used.
#[derive(Default)]
pub struct Uploads {
    slots: Vec<Upload>,
    next_id: u32,
    /// Uploads freed for being idle or replaced, since boot.
    pub expired: u64,
}

impl core::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Uploads").field("slots", &self.slots.len()).field("expired", &self.expired).finish()
    }
}

fn no_upload(upload: u32) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Refused,
        alloc::format!(
            "no upload {upload} (never started, cancelled, used, or freed after {} s idle)",
            IDLE_TIMEOUT_NS / 1_000_000_000
        ),
    )
}

impl Uploads {
    /// No uploads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uploads held now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Start an upload for connection `owner`: stage `total_len` bytes. `now_ns` is
    /// the hypervisor's uptime.
    pub fn begin(
        &mut self,
        pool: &mut FramePool,
        owner: u32,
        kind: ImageKind,
        total_len: u64,
        crc32c: u32,
        now_ns: u64,
    ) -> Result<UploadStatus, ErrorReply> {
        self.expire(pool, now_ns);
        let tracker = UploadTracker::new(kind, total_len, crc32c, wire::MAX_IMAGE_LEN).map_err(|e| e.to_reply(0))?;
        if self.slots.len() >= MAX_UPLOADS {
            let oldest = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, u)| u.last_ns)
                .filter(|(_, u)| now_ns.saturating_sub(u.last_ns) >= REPLACE_IDLE_NS)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    let u = self.slots.swap_remove(i);
                    u.staged.free(pool);
                    self.expired += 1;
                }
                None => {
                    return Err(ErrorReply::new(
                        ErrorCode::Busy,
                        alloc::format!(
                            "{MAX_UPLOADS} uploads are in progress and none has been idle for {} s; retry later \
                             or cancel one",
                            REPLACE_IDLE_NS / 1_000_000_000
                        ),
                    ));
                }
            }
        }
        let len = usize::try_from(total_len)
            .map_err(|_| ErrorReply::new(ErrorCode::Refused, "the image length does not fit this machine"))?;
        let staged = Staged::alloc(pool, len)?;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.slots.iter().any(|u| u.id == self.next_id) {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let id = self.next_id;
        let status = tracker.status(id, WINDOW);
        self.slots.push(Upload { id, owner, tracker, staged, last_ns: now_ns });
        Ok(status)
    }

    /// Take the next chunk of upload `upload`.
    pub fn chunk(
        &mut self,
        pool: &mut FramePool,
        upload: u32,
        offset: u64,
        bytes: &[u8],
        crc32c: u32,
        now_ns: u64,
    ) -> Result<UploadStatus, ErrorReply> {
        let i = self.slots.iter().position(|u| u.id == upload).ok_or_else(|| no_upload(upload))?;
        let u = self.slots.get_mut(i).ok_or_else(|| no_upload(upload))?;
        u.tracker.check(offset, bytes, crc32c).map_err(|e| e.to_reply(upload))?;
        let at = usize::try_from(offset).map_err(|_| no_upload(upload))?;
        u.staged.write(pool, at, bytes)?;
        u.last_ns = now_ns;
        if let Err(e) = u.tracker.commit(bytes) {
            let u = self.slots.swap_remove(i);
            u.staged.free(pool);
            return Err(e.to_reply(upload));
        }
        Ok(u.tracker.status(upload, WINDOW))
    }

    /// Free upload `upload`, finished or not.
    pub fn cancel(&mut self, pool: &mut FramePool, upload: u32) -> Result<(), ErrorReply> {
        let i = self.slots.iter().position(|u| u.id == upload).ok_or_else(|| no_upload(upload))?;
        self.slots.swap_remove(i).staged.free(pool);
        Ok(())
    }

    /// Take a complete upload of `kind` out of the store, to load it; the caller frees
    /// it with [`Staged::free`] once the domain is created (or not).
    pub fn take(&mut self, upload: u32, kind: ImageKind) -> Result<Staged, ErrorReply> {
        let i = self.slots.iter().position(|u| u.id == upload).ok_or_else(|| no_upload(upload))?;
        let u = self.slots.get(i).ok_or_else(|| no_upload(upload))?;
        if u.tracker.kind() != kind {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                alloc::format!(
                    "upload {upload} holds an image of kind `{}`, but `{kind}` was asked for",
                    u.tracker.kind()
                ),
            ));
        }
        if !u.tracker.complete() {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                alloc::format!(
                    "upload {upload} is incomplete: {} of {} bytes received",
                    u.tracker.received(),
                    u.tracker.total_len()
                ),
            ));
        }
        Ok(self.slots.swap_remove(i).staged)
    }

    /// Free the uploads idle for [`IDLE_TIMEOUT_NS`] or more.
    pub fn expire(&mut self, pool: &mut FramePool, now_ns: u64) {
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots.get(i).is_some_and(|u| now_ns.saturating_sub(u.last_ns) >= IDLE_TIMEOUT_NS) {
                self.slots.swap_remove(i).staged.free(pool);
                self.expired += 1;
            } else {
                i += 1;
            }
        }
    }

    /// Free every upload connection `owner` began (it closed): how many.
    pub fn release_owner(&mut self, pool: &mut FramePool, owner: u32) -> usize {
        let mut freed = 0;
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots.get(i).is_some_and(|u| u.owner == owner) {
                self.slots.swap_remove(i).staged.free(pool);
                freed += 1;
            } else {
                i += 1;
            }
        }
        freed
    }

    /// Whether some upload could expire (so the caller knows to pass a pool).
    pub fn any_idle(&self, now_ns: u64) -> bool {
        self.slots.iter().any(|u| now_ns.saturating_sub(u.last_ns) >= IDLE_TIMEOUT_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::frames::testing;
    use wire::crc32c;

    fn image(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i.wrapping_mul(131) ^ (i >> 9)) as u8).collect()
    }

    fn upload_all(up: &mut Uploads, pool: &mut FramePool, img: &[u8], now: u64) -> u32 {
        let s = up.begin(pool, 1, ImageKind::Kernel, img.len() as u64, crc32c(img), now).unwrap();
        assert_eq!((s.received, s.window, s.complete), (0, WINDOW, false));
        let mut offset = 0u64;
        for c in img.chunks(wire::MAX_IMAGE_CHUNK) {
            let st = up.chunk(pool, s.upload, offset, c, crc32c(c), now).unwrap();
            offset += c.len() as u64;
            assert_eq!(st.received, offset);
        }
        s.upload
    }

    #[test]
    fn an_upload_is_staged_in_frames_and_read_back_whole() {
        let mut pool = testing::pool(600);
        let free = pool.free_frames();
        let mut up = Uploads::new();
        let img = image(2 * 1024 * 1024 + 123);
        let id = upload_all(&mut up, &mut pool, &img, 5);
        assert_eq!(pool.free_frames(), free - img.len().div_ceil(4096));
        let staged = up.take(id, ImageKind::Kernel).unwrap();
        assert!(staged.bytes() == img.as_slice());
        staged.free(&mut pool);
        assert_eq!(pool.free_frames(), free);
        assert!(up.is_empty());
        assert_eq!(up.take(id, ImageKind::Kernel).unwrap_err().code, ErrorCode::Refused, "used up");
    }

    #[test]
    fn bad_chunks_are_refused_and_a_bad_image_is_freed() {
        let mut pool = testing::pool(64);
        let free = pool.free_frames();
        let mut up = Uploads::new();
        let img = image(100_000);
        let s = up.begin(&mut pool, 1, ImageKind::Initrd, 100_000, crc32c(&img) ^ 1, 0).unwrap();
        let c = &img[..60_000];
        let mut bad = c.to_vec();
        bad[7] ^= 0x40;
        let e = up.chunk(&mut pool, s.upload, 0, &bad, crc32c(c), 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadChunk);
        assert!(e.message.contains("CRC-32C mismatch in the chunk at offset 0"), "{e}");
        let e = up.chunk(&mut pool, s.upload, 60_000, c, crc32c(c), 0).unwrap_err();
        assert!(e.message.contains("out of order"), "{e}");
        up.chunk(&mut pool, s.upload, 0, c, crc32c(c), 0).unwrap();
        let e = up.chunk(&mut pool, s.upload, 0, c, crc32c(c), 0).unwrap_err();
        assert!(e.message.contains("must start at offset 60000"), "overlap: {e}");
        let e = up.take(s.upload, ImageKind::Initrd).unwrap_err();
        assert!(e.message.contains("incomplete: 60000 of 100000"), "{e}");
        let rest = &img[60_000..];
        let e = up.chunk(&mut pool, s.upload, 60_000, rest, crc32c(rest), 0).unwrap_err();
        assert!(e.message.contains("over the whole image"), "{e}");
        assert!(up.is_empty(), "a whole-image mismatch discards the upload");
        assert_eq!(pool.free_frames(), free);
        assert_eq!(up.chunk(&mut pool, s.upload, 0, c, crc32c(c), 0).unwrap_err().code, ErrorCode::Refused);
    }

    #[test]
    fn uploads_are_bounded_expire_and_get_replaced() {
        let mut pool = testing::pool(64);
        let free = pool.free_frames();
        let mut up = Uploads::new();
        let ids: Vec<u32> = (0..MAX_UPLOADS as u64)
            .map(|t| up.begin(&mut pool, 1, ImageKind::Kernel, 5000, 0, t).unwrap().upload)
            .collect();
        // All slots busy and recently active: refused.
        let e = up.begin(&mut pool, 1, ImageKind::Kernel, 5000, 0, 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        // Once one is idle long enough, the longest-idle one is replaced.
        let s = up.begin(&mut pool, 1, ImageKind::Kernel, 5000, 0, REPLACE_IDLE_NS).unwrap();
        assert_eq!(up.len(), MAX_UPLOADS);
        assert_eq!(up.cancel(&mut pool, ids[0]).unwrap_err().code, ErrorCode::Refused, "the replaced one is gone");
        assert_eq!(up.expired, 1);
        // Closing the connection frees what it began.
        let other = up.begin(&mut pool, 2, ImageKind::Initrd, 100, 0, REPLACE_IDLE_NS * 3).unwrap_or_else(|e| {
            panic!("a slot idle for 2 s is replaced: {e}");
        });
        assert_eq!(up.release_owner(&mut pool, 2), 1);
        assert_eq!(up.cancel(&mut pool, other.upload).unwrap_err().code, ErrorCode::Refused);
        // Everything idle for the timeout is freed.
        up.expire(&mut pool, REPLACE_IDLE_NS + IDLE_TIMEOUT_NS);
        assert!(up.is_empty());
        assert_eq!(pool.free_frames(), free);
        assert!(!ids.contains(&s.upload));
        // Too large for the pool, or for the protocol.
        assert_eq!(up.begin(&mut pool, 1, ImageKind::Kernel, 1 << 20, 0, 0).unwrap_err().code, ErrorCode::OutOfMemory);
        assert_eq!(
            up.begin(&mut pool, 1, ImageKind::Kernel, wire::MAX_IMAGE_LEN + 1, 0, 0).unwrap_err().code,
            ErrorCode::Refused
        );
        assert_eq!(up.begin(&mut pool, 1, ImageKind::Kernel, 0, 0, 0).unwrap_err().code, ErrorCode::Refused);
        assert_eq!(pool.free_frames(), free);
    }
}
