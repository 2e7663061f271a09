//! A fake hypervisor for the tests that need only request-in, response-out: it listens
//! on a Unix socket, accepts the hybrid-vsock handshake (`CONNECT port` / `OK port`) that
//! `--connect unix:PATH:PORT` speaks, and answers each request frame with a closure.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use wire::{FrameDecoder, Request, Response};

/// The port the handshake names.
pub const PORT: u32 = 5000;

/// A listening fake; it serves until the test process ends.
pub struct Fake {
    path: PathBuf,
}

impl Fake {
    /// Listen on a fresh socket named after `name`, answering with `answer`.
    pub fn start(name: &str, answer: impl Fn(Request) -> Response + Send + Sync + 'static) -> Self {
        let dir = std::env::temp_dir().join(format!("hvctl-fake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.vsock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let answer = answer.clone();
                std::thread::spawn(move || serve(conn, &*answer));
            }
        });
        Self { path }
    }

    /// Its `--connect` target.
    pub fn target(&self) -> String {
        format!("unix:{}:{PORT}", self.path.display())
    }
}

/// One connection: the handshake, then request frames answered in order.
fn serve(mut conn: UnixStream, answer: &dyn Fn(Request) -> Response) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    if line != format!("CONNECT {PORT}").as_bytes() || conn.write_all(format!("OK {PORT}\n").as_bytes()).is_err() {
        return;
    }
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            let taken = decoder.push(&pending);
            pending.drain(..taken);
            let Some(frame) = decoder.next_frame() else {
                if taken == 0 {
                    break;
                }
                continue;
            };
            let response = match frame.map(|f| (f.request_id, wire::decode_request(&f))) {
                Ok((id, Ok(r))) => (id, answer(r)),
                Ok((id, Err(e))) => (id, Response::Error(e)),
                Err(_) => return,
            };
            let mut out = Vec::new();
            wire::encode_response(response.0, &response.1, &mut out).unwrap();
            if conn.write_all(&out).is_err() {
                return;
            }
        }
    }
}
