//! Reaching the hypervisor: `unix:PATH:PORT` (vhost-device-vsock's hybrid vsock Unix
//! socket: send `CONNECT <port>\n`, read `OK <port>\n`, then raw bytes) or
//! `vsock:CID:PORT` (AF_VSOCK, where the host kernel has vhost-vsock), a connect
//! timeout with retries, and request/response over `wire` frames.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wire::{FrameDecoder, Request, Response};

use crate::{CliError, connection_err, err};

/// The file `cargo xtask run` writes with the target of the hypervisor it started.
pub const CONNECT_FILE: &str = "target/xtask/hvctl.connect";

/// Connection options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--connect`, if given.
    pub connect: Option<String>,
    /// How long to keep retrying.
    pub timeout: Duration,
}

/// Where the hypervisor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Hybrid vsock over a Unix socket.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// vsock port.
        port: u32,
    },
    /// AF_VSOCK.
    Vsock {
        /// Context id of the VM.
        cid: u32,
        /// vsock port.
        port: u32,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix { path, port } => write!(f, "unix:{}:{port}", path.display()),
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// Parse `unix:PATH:PORT` or `vsock:CID:PORT`.
pub fn parse_target(s: &str) -> Result<Target, CliError> {
    let bad = || err(format!("bad target {s:?}: expected unix:PATH:PORT or vsock:CID:PORT"));
    if let Some(rest) = s.strip_prefix("unix:") {
        let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        if path.is_empty() {
            return Err(bad());
        }
        Ok(Target::Unix { path: path.into(), port })
    } else if let Some(rest) = s.strip_prefix("vsock:") {
        let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
        Ok(Target::Vsock { cid: cid.parse().map_err(|_| bad())?, port: port.parse().map_err(|_| bad())? })
    } else {
        Err(bad())
    }
}

/// The target: `--connect`, else $HVCTL_CONNECT, else the file `cargo xtask run` wrote.
pub fn resolve(opts: &Options) -> Result<Target, CliError> {
    if let Some(c) = &opts.connect {
        return parse_target(c);
    }
    if let Ok(c) = std::env::var("HVCTL_CONNECT")
        && !c.trim().is_empty()
    {
        return parse_target(c.trim());
    }
    match std::fs::read_to_string(CONNECT_FILE) {
        Ok(c) => parse_target(c.trim()),
        Err(_) => Err(err(
            "no hypervisor to talk to: pass --connect unix:PATH:PORT (cargo xtask run prints it) or set HVCTL_CONNECT",
        )),
    }
}

trait Stream: Read + Write {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}
impl Stream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}
impl Stream for vsock::VsockStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        vsock::VsockStream::set_read_timeout(self, d)
    }
}

/// An open connection to the hypervisor's control port.
pub struct Client {
    stream: Box<dyn Stream>,
    decoder: FrameDecoder,
    /// Bytes read but not yet taken by the decoder (it holds at most one frame).
    pending: Vec<u8>,
    next_id: u64,
    /// What we are connected to.
    pub target: Target,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("target", &self.target).finish_non_exhaustive()
    }
}

/// How long a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn connect_once(target: &Target) -> Result<Box<dyn Stream>, String> {
    match target {
        Target::Unix { path, port } => {
            let mut s = UnixStream::connect(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("{} does not exist: is the hypervisor running (cargo xtask run)?", path.display())
                }
                std::io::ErrorKind::ConnectionRefused => {
                    format!("nobody serves {}: is vhost-device-vsock running?", path.display())
                }
                _ => format!("cannot connect to {}: {e}", path.display()),
            })?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| format!("handshake: {e}"))?;
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).map_err(|e| format!("handshake: {e}"))?;
            if line.trim() != format!("OK {port}") {
                return Err(format!("nothing is listening on port {port} — is the hypervisor running?"));
            }
            Ok(Box::new(s))
        }
        Target::Vsock { cid, port } => vsock::VsockStream::connect(&vsock::VsockAddr::new(*cid, *port))
            .map(|s| Box::new(s) as Box<dyn Stream>)
            .map_err(|e| format!("cannot connect to vsock {cid}:{port}: {e} — is the hypervisor running?")),
    }
}

impl Client {
    /// Connect, retrying until `opts.timeout` has passed.
    pub fn connect(opts: &Options) -> Result<Self, CliError> {
        let target = resolve(opts)?;
        let start = Instant::now();
        loop {
            match connect_once(&target) {
                Ok(stream) => {
                    return Ok(Self { stream, decoder: FrameDecoder::new(), pending: Vec::new(), next_id: 1, target });
                }
                Err(e) if start.elapsed() >= opts.timeout => return Err(connection_err(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Send one request and wait for its response.
    pub fn call(&mut self, request: &Request) -> Result<Response, CliError> {
        let id = self.send(request)?;
        loop {
            let (got, response) = self.recv()?;
            if got == id {
                return Ok(response);
            }
            if let Response::Error(e) = &response {
                // An error not tied to our request (e.g. id 0): the connection is over.
                return Err(connection_err(format!("the hypervisor closed the connection: {e}")));
            }
        }
    }

    /// Send a request without waiting; its id. Answers come back in order through
    /// [`Client::recv`] (the hypervisor's core serves one connection in order), so a
    /// caller may keep a window of requests in flight.
    pub fn send(&mut self, request: &Request) -> Result<u64, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = Vec::new();
        wire::encode_request(id, request, &mut bytes).map_err(|e| err(format!("cannot encode the request: {e}")))?;
        self.stream.write_all(&bytes).map_err(|e| connection_err(format!("sending to {}: {e}", self.target)))?;
        Ok(id)
    }

    /// The next response and the id of the request it answers. An error frame with id
    /// 0 (not tied to a request) means the hypervisor closed the connection.
    pub fn recv(&mut self) -> Result<(u64, Response), CliError> {
        self.stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| connection_err(e.to_string()))?;
        let mut buf = [0u8; 8192];
        loop {
            let taken = self.decoder.push(&self.pending);
            self.pending.drain(..taken);
            if let Some(frame) = self.decoder.next_frame() {
                let frame = frame.map_err(|e| connection_err(format!("the hypervisor sent a bad frame: {e}")))?;
                let response = wire::decode_response(&frame)
                    .map_err(|e| connection_err(format!("the hypervisor sent an unreadable response: {e}")))?;
                if frame.request_id == 0
                    && let Response::Error(e) = &response
                {
                    // An error not tied to our request: the connection is over.
                    return Err(connection_err(format!("the hypervisor closed the connection: {e}")));
                }
                return Ok((frame.request_id, response));
            }
            if taken > 0 && !self.pending.is_empty() {
                continue;
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(connection_err(format!("{} closed the connection", self.target))),
                Ok(n) => n,
                // A signal (Ctrl-C during a migration, see `interrupt`) interrupts the read
                // even with SA_RESTART, because the socket has a receive timeout
                // (signal(7)); the answer is still on its way.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(connection_err(format!(
                        "no answer from the hypervisor within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(connection_err(format!("reading from {}: {e}", self.target))),
            };
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        let t = parse_target("unix:/run/x/vm.vsock:5000").unwrap();
        assert_eq!(t, Target::Unix { path: "/run/x/vm.vsock".into(), port: 5000 });
        assert_eq!(t.to_string(), "unix:/run/x/vm.vsock:5000");
        assert_eq!(parse_target("vsock:4:5000").unwrap(), Target::Vsock { cid: 4, port: 5000 });
        for bad in ["unix:/x", "vsock:4", "tcp:1:2", "unix::5000", "vsock:a:1"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
