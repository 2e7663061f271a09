//! The part every fake hypervisor of these tests shares: a Unix socket that accepts the
//! hybrid-vsock handshake (`CONNECT <port>\n` → `OK <port>\n`), then answers request
//! frames in order with whatever the test's handler makes of each.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wire::{Frame, FrameDecoder, Request, Response};

/// The vsock port the fakes answer on.
pub const PORT: u32 = 5000;

/// Listen on `path` (replacing a stale socket); each connection on its own thread, each
/// frame answered with the bytes `handle` returns (none: hang up, as a hypervisor that
/// restarted would).
pub fn listen(path: &Path, handle: impl Fn(&Frame) -> Vec<u8> + Send + Sync + 'static) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).unwrap();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let handle = handle.clone();
            std::thread::spawn(move || serve(conn, &*handle));
        }
    });
}

/// A handler from a function of decoded requests.
pub fn typed(answer: impl Fn(Request) -> Response + Send + Sync + 'static) -> impl Fn(&Frame) -> Vec<u8> + Send + Sync {
    move |frame| {
        let response = match wire::decode_request(frame) {
            Ok(r) => answer(r),
            Err(e) => Response::Error(e),
        };
        let mut out = Vec::new();
        wire::encode_response(frame.request_id, &response, &mut out).unwrap();
        out
    }
}

/// One connection: the handshake, then request frames answered in order.
fn serve(mut conn: UnixStream, handle: &dyn Fn(&Frame) -> Vec<u8>) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    if line != format!("CONNECT {PORT}").as_bytes() || conn.write_all(format!("OK {PORT}\n").as_bytes()).is_err() {
        return;
    }
    let mut decoder = FrameDecoder::new();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let taken = decoder.push(&pending);
        pending.drain(..taken);
        let mut progressed = taken > 0;
        while let Some(frame) = decoder.next_frame() {
            progressed = true;
            let Ok(frame) = frame else { return };
            let answer = handle(&frame);
            if answer.is_empty() || conn.write_all(&answer).is_err() {
                return;
            }
        }
        if progressed && !pending.is_empty() {
            continue;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A fake on a fresh socket of the test process's temporary directory, answering decoded
/// requests; it serves until the test process ends.
pub struct Fake {
    path: PathBuf,
}

impl Fake {
    /// Listen on a socket named after `name`, answering with `answer`.
    pub fn start(name: &str, answer: impl Fn(Request) -> Response + Send + Sync + 'static) -> Self {
        let dir = std::env::temp_dir().join(format!("hvctl-fake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.vsock"));
        listen(&path, typed(answer));
        Self { path }
    }

    /// Its `--connect` target.
    pub fn target(&self) -> String {
        format!("unix:{}:{PORT}", self.path.display())
    }
}
