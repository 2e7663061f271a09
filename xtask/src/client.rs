//! Raw control-channel clients for system tests and benchmarks: [`RawClient`] over
//! vsock, [`SerialClient`] over the serial line (COM2 as a unix socket, packets of
//! `wire::serial`). Both can send well-formed requests and, deliberately, malformed
//! bytes. (hvctl is the client for people; the tests also drive the real hvctl binary.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use wire::serial::{Packet, PacketDecoder};
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

/// One session on the serial control line: connect, `Open`, then requests as packets.
#[derive(Debug)]
pub struct SerialClient {
    /// The stream (public so tests can write raw bytes or drop it mid-packet).
    pub stream: UnixStream,
    decoder: PacketDecoder,
    next_id: u64,
    /// Packets that failed to decode since the session opened (the line is clean on
    /// an emulator, so tests expect 0).
    pub bad_packets: u64,
    /// Bytes read off the socket and not yet decoded (`unread[unread_at..]`).
    unread: Vec<u8>,
    unread_at: usize,
}

/// A nonce no earlier session of this process used.
fn fresh_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    now ^ (u64::from(std::process::id()) << 32)
        ^ COUNT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl SerialClient {
    /// Connect to `socket` and open a session (waiting up to `timeout` for `Opened`;
    /// Bochs moves about 11 KB/s of emulated time).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut client = Self {
            stream,
            decoder: PacketDecoder::new(),
            next_id: 1,
            bad_packets: 0,
            unread: Vec::new(),
            unread_at: 0,
        };
        client.open(timeout)?;
        Ok(client)
    }

    /// Start a new session on this connection: `Open` with a fresh nonce, skipping
    /// every packet (and any other bytes: OVMF's console, a previous client's answers)
    /// until the `Opened` with that nonce.
    pub fn open(&mut self, timeout: Duration) -> Result<()> {
        let nonce = fresh_nonce();
        let mut bytes = Vec::new();
        wire::serial::encode_open(nonce, &mut bytes);
        self.write_raw(&bytes)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(format!("no Opened for nonce {nonce:#x} within {:.0} s", timeout.as_secs_f64()));
            }
            match self.read_packet()? {
                None => return Err("the serial socket closed before Opened".into()),
                Some(Ok(Packet::Opened { nonce: n, .. })) if n == nonce => break,
                Some(_) => {}
            }
        }
        self.decoder.reset();
        self.bad_packets = 0;
        Ok(())
    }

    /// Write bytes as they are.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).map_err(|e| format!("serial write: {e}"))
    }

    /// The packet bytes of a request with id `id`.
    pub fn request_packet(id: u64, request: &Request) -> Result<Vec<u8>> {
        let mut frame = Vec::new();
        wire::encode_request(id, request, &mut frame).map_err(|e| e.to_string())?;
        let mut packet = Vec::new();
        wire::serial::encode_frame_packet(&frame, &mut packet);
        Ok(packet)
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Read until a packet (or a packet error) ends; `Ok(None)` when the socket closed.
    /// Reads in blocks (the throughput benchmark must not measure one system call per
    /// byte) and keeps what follows the packet for the next call.
    pub fn read_packet(&mut self) -> Result<Option<std::result::Result<Packet, wire::serial::PacketError>>> {
        let mut block = [0u8; 4096];
        loop {
            while self.unread_at < self.unread.len() {
                let byte = self.unread[self.unread_at];
                self.unread_at += 1;
                if let Some(result) = self.decoder.push(byte) {
                    return Ok(Some(result));
                }
            }
            self.unread.clear();
            self.unread_at = 0;
            match self.stream.read(&mut block) {
                Ok(0) => return Ok(None),
                Ok(n) => self.unread.extend_from_slice(&block[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("serial read: {e}")),
            }
        }
    }

    /// The response frame with request id `id` (other frames are skipped).
    pub fn read_response(&mut self, id: u64) -> Result<Response> {
        loop {
            match self.read_packet()?.ok_or("the serial socket closed")? {
                Ok(Packet::Frame(f)) if f.request_id == id => {
                    return wire::decode_response(&f).map_err(|e| format!("bad response: {e}"));
                }
                Ok(_) => {}
                Err(_) => self.bad_packets += 1,
            }
        }
    }

    /// Send a request and wait for the response with its id.
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        let id = self.next_id();
        self.write_raw(&Self::request_packet(id, request)?)?;
        self.read_response(id)
    }
}
