//! A raw control-channel client for system tests and benchmarks: it can send
//! well-formed requests and, deliberately, malformed bytes. (hvctl is the client for
//! people; the tests also drive the real hvctl binary.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use wire::{Frame, FrameDecoder, Request, Response};

use crate::Result;

/// One connection through vhost-device-vsock's hybrid socket.
#[derive(Debug)]
pub struct RawClient {
    /// The stream (public so tests can write raw bytes).
    pub stream: UnixStream,
    decoder: FrameDecoder,
    pending: Vec<u8>,
    next_id: u64,
}

impl RawClient {
    /// Connect and do the `CONNECT <port>` handshake.
    pub fn connect(socket: &Path, port: u32) -> Result<Self> {
        let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(15))).map_err(|e| e.to_string())?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| format!("handshake: {e}"))?;
        let mut line = String::new();
        BufReader::new(&mut stream).read_line(&mut line).map_err(|e| format!("handshake: {e}"))?;
        if line.trim() != format!("OK {port}") {
            return Err(format!("handshake refused: {line:?}"));
        }
        Ok(Self { stream, decoder: FrameDecoder::new(), pending: Vec::new(), next_id: 1 })
    }

    /// Read the next frame; `Ok(None)` when the peer closed the connection.
    pub fn read_frame(&mut self) -> Result<Option<Frame>> {
        let mut buf = [0u8; 8192];
        loop {
            let taken = self.decoder.push(&self.pending);
            self.pending.drain(..taken);
            if let Some(frame) = self.decoder.next_frame() {
                return frame.map(Some).map_err(|e| format!("bad frame from the hypervisor: {e}"));
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(format!("read: {e}")),
            };
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Send a request and wait for the response with its id.
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = Vec::new();
        wire::encode_request(id, request, &mut bytes).map_err(|e| e.to_string())?;
        self.stream.write_all(&bytes).map_err(|e| format!("write: {e}"))?;
        loop {
            let frame = self.read_frame()?.ok_or("the hypervisor closed the connection")?;
            if frame.request_id == id {
                return wire::decode_response(&frame).map_err(|e| format!("bad response: {e}"));
            }
        }
    }
}
