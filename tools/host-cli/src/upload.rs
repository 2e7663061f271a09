//! Uploading a kernel or initrd to the hypervisor for `hvctl domain create` (protocol
//! v5, see `wire::upload`): `ImageBegin` with the image's length and CRC-32C, then
//! chunks of at most `wire::MAX_IMAGE_CHUNK` bytes with their own CRC-32C, never more
//! unanswered than the window the hypervisor announced, with a progress line on
//! stderr. Ctrl-C (or SIGTERM) stops sending, waits for the answers in flight and
//! cancels the upload, so its staging memory is freed on the hypervisor at once rather
//! than after its idle timeout.
//!
//! Memory on this side: the file is read twice, in chunks (once for its CRC-32C, once
//! to send it), so hvctl holds at most a window of chunks whatever the image's size; on
//! the hypervisor's, see `hv::services::upload`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

use wire::{ImageKind, Request, Response, UploadStatus};

use crate::migrate_cmd::ProgressLine;
use crate::transport::Client;
use crate::{CliError, connection_err, err, interrupt, remote_err};

/// How an upload is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct UploadOptions {
    /// For tests: flip one byte of chunk N after its CRC was computed, so the
    /// hypervisor must refuse it.
    pub corrupt_chunk: Option<usize>,
}

/// The result of a cancelled upload: the CLI exits 130 like a shell reports SIGINT.
pub const CANCELLED_EXIT: u8 = 130;

/// Fill `buf` from `file` (short only at its end).
fn read_full(file: &mut File, buf: &mut [u8], path: &Path) -> Result<usize, CliError> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(format!("reading {}: {e}", path.display()))),
        }
    }
    Ok(n)
}

/// Upload the file at `path` as `kind`; the upload's id once the hypervisor holds it
/// all (its CRC checked). On any failure after `ImageBegin` the upload is cancelled on
/// the hypervisor before returning.
pub fn upload(
    client: &mut Client,
    kind: ImageKind,
    path: &Path,
    opts: UploadOptions,
    progress: &mut ProgressLine,
) -> Result<u32, CliError> {
    let mut file = File::open(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let mut crc = wire::Crc32c::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; wire::MAX_IMAGE_CHUNK];
    loop {
        let n = read_full(&mut file, &mut buf, path)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| err(format!("reading {}: {e}", path.display())))?;
    let image = Image { file, path, total };
    let begin = Request::ImageBegin { kind, total_len: total, crc32c: crc.finish() };
    let status = match client.call(&begin)? {
        Response::Upload(s) => s,
        Response::Error(e) => return Err(remote_err(format!("upload of the {kind}: {e}"))),
        other => return Err(connection_err(format!("the hypervisor answered image-begin with {other:?}"))),
    };
    let id = status.upload;
    match send_chunks(client, kind, image, status, opts, progress) {
        Ok(()) => Ok(id),
        Err(e) => {
            progress.finish();
            // Best effort: the hypervisor frees it after its idle timeout anyway.
            let _ = client.call(&Request::ImageCancel { upload: id });
            Err(e)
        }
    }
}

/// The file being sent.
struct Image<'a> {
    file: File,
    path: &'a Path,
    total: u64,
}

fn send_chunks(
    client: &mut Client,
    kind: ImageKind,
    mut image: Image<'_>,
    status: UploadStatus,
    opts: UploadOptions,
    progress: &mut ProgressLine,
) -> Result<(), CliError> {
    let window = status.window.clamp(1, 64) as usize;
    let started = Instant::now();
    let total = image.total;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut next_chunk = 0usize;
    let mut offset = 0u64;
    let mut acked = 0u64;
    let mut first_error: Option<CliError> = None;
    let mut complete = false;
    loop {
        let stop = first_error.is_some() || interrupt::pending().is_some();
        if !stop && in_flight.len() < window && offset < total {
            let mut bytes = vec![0u8; wire::MAX_IMAGE_CHUNK];
            let len = read_full(&mut image.file, &mut bytes, image.path)?;
            bytes.truncate(len);
            if len == 0 || offset + len as u64 > total {
                return Err(err(format!("{} changed while it was being uploaded", image.path.display())));
            }
            {
                let n = next_chunk;
                next_chunk += 1;
                let crc32c = wire::crc32c(&bytes);
                let middle = bytes.len() / 2;
                if opts.corrupt_chunk == Some(n)
                    && let Some(b) = bytes.get_mut(middle)
                {
                    *b ^= 0x01;
                }
                let len = bytes.len() as u64;
                in_flight.push_back(client.send(&Request::ImageChunk {
                    upload: status.upload,
                    offset,
                    bytes,
                    crc32c,
                })?);
                offset += len;
                continue;
            }
        }
        let Some(want) = in_flight.pop_front() else { break };
        let (got, response) = client.recv()?;
        if got != want {
            return Err(connection_err(format!("the hypervisor answered request {got} while {want} was due")));
        }
        match response {
            Response::Upload(s) => {
                acked = s.received;
                complete = s.complete;
            }
            // The first refusal is the one to report; the chunks after it are refused
            // as out of order.
            Response::Error(e) if first_error.is_none() => {
                first_error = Some(remote_err(format!("upload of the {kind}: {e}")));
            }
            Response::Error(_) => {}
            other => return Err(connection_err(format!("the hypervisor answered image-chunk with {other:?}"))),
        }
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        progress.show(
            &format!(
                "uploading {kind}: {:>5.1}% {} of {} bytes, {:.1} MB/s",
                acked as f64 * 100.0 / total.max(1) as f64,
                acked,
                total,
                acked as f64 / secs / 1e6
            ),
            complete,
        );
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(by) = interrupt::pending() {
        progress.finish();
        return Err(CliError(
            format!("{by}: upload of the {kind} cancelled after {acked} of {total} bytes; the hypervisor freed it"),
            CANCELLED_EXIT,
        ));
    }
    if !complete {
        return Err(connection_err(format!(
            "the hypervisor accepted {acked} of {total} bytes of the {kind} but did not report it complete"
        )));
    }
    progress.finish();
    Ok(())
}
