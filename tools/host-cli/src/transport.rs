//! Reaching the hypervisor. Two kinds of transport, five target forms:
//!
//! | target | transport | carries frames as |
//! |---|---|---|
//! | `unix:PATH:PORT` | vsock through vhost-device-vsock's hybrid Unix socket (`CONNECT <port>\n`, `OK <port>\n`, then raw bytes) | their bytes |
//! | `vsock:CID:PORT` | AF_VSOCK (hosts with vhost-vsock) | their bytes |
//! | `unix:PATH` | serial: an emulator's serial backend on a Unix socket | `wire::serial` packets |
//! | `tcp:HOST:PORT` | serial: an emulator's serial backend on TCP | `wire::serial` packets |
//! | `serial:DEVICE[@BAUD]` | serial: a real line (raw 8N1, no flow control) | `wire::serial` packets |
//! | `tls://HOST:PORT[/NAME]` | a host agent (`hvctl agent serve`) over TLS 1.3, mutual certificates | `wire` requests in agent frames (`agent::proto`) |
//!
//! Then a connect timeout with retries, and request/response over `wire` frames; the
//! serial session handshake and packet rules are in `serial_link`. Through an agent the
//! requests are the same `wire::Request`s; the agent may refuse one (its role), which
//! [`Client::recv`] reports as the agent's error (exit 4).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wire::{Frame, FrameDecoder, Request, Response};

use crate::agent::proto::{self, AgentMsg, AgentRequest, AgentResponse, ClientMsg};
use crate::agent::tls::{self, ClientStream, TlsFiles};
use crate::serial_link::{self, LinkStats, SerialLink, Tty};
use crate::{CliError, connection_err, err, remote_err};

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
    /// Hybrid vsock over a Unix socket (`unix:PATH:PORT`).
    Unix {
        /// Socket path.
        path: PathBuf,
        /// vsock port.
        port: u32,
    },
    /// AF_VSOCK (`vsock:CID:PORT`).
    Vsock {
        /// Context id of the VM.
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// A serial byte stream on a Unix socket (`unix:PATH`), e.g. QEMU's
    /// `-chardev socket,path=PATH,server=on`.
    UnixSerial {
        /// Socket path.
        path: PathBuf,
    },
    /// A serial byte stream over TCP (`tcp:HOST:PORT`), e.g. QEMU's
    /// `-serial tcp::4555,server=on,wait=off` or Bochs' `com2: mode=socket-server`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A serial line (`serial:DEVICE[@BAUD]`).
    Tty {
        /// The device, e.g. `/dev/ttyS1`.
        path: PathBuf,
        /// Bits per second.
        baud: u32,
    },
    /// A host agent (`tls://HOST:PORT[/NAME]`).
    Tls {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
        /// Which of the agent's hypervisors; `None` for the agent's only one, or for
        /// agent-level requests.
        name: Option<String>,
    },
}

impl Target {
    /// The transport's name: `vsock` or `serial`.
    pub fn transport(&self) -> &'static str {
        match self {
            Target::Unix { .. } | Target::Vsock { .. } => "vsock",
            Target::UnixSerial { .. } | Target::Tcp { .. } | Target::Tty { .. } => "serial",
            Target::Tls { .. } => "tls",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix { path, port } => write!(f, "unix:{}:{port}", path.display()),
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Target::UnixSerial { path } => write!(f, "unix:{}", path.display()),
            Target::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Target::Tty { path, baud } => write!(f, "serial:{}@{baud}", path.display()),
            Target::Tls { host, port, name } => {
                if host.contains(':') {
                    write!(f, "tls://[{host}]:{port}")?;
                } else {
                    write!(f, "tls://{host}:{port}")?;
                }
                match name {
                    Some(n) => write!(f, "/{n}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Every accepted form, for error messages.
const FORMS: &str = "unix:PATH:PORT (vsock via vhost-device-vsock), vsock:CID:PORT, \
unix:PATH or tcp:HOST:PORT (an emulator's serial port), serial:DEVICE[@BAUD] (a serial line), \
tls://HOST:PORT[/NAME] (a host agent)";

/// Parse a target (the forms in the module doc).
pub fn parse_target(s: &str) -> Result<Target, CliError> {
    let bad = |why: &str| err(format!("bad target {s:?}: {why}"));
    if let Some(rest) = s.strip_prefix("unix:") {
        // A last `:digits` is a vsock port; without one the whole rest is the path of
        // a serial socket.
        let (path, port) = match rest.rsplit_once(':') {
            Some((path, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                let port = port.parse().map_err(|_| bad(&format!("vsock port {port} is out of range")))?;
                (path, Some(port))
            }
            Some((_, "")) => {
                return Err(bad(
                    "nothing after the last ':' (unix:PATH:PORT for vsock, unix:PATH for a serial stream)",
                ));
            }
            _ => (rest, None),
        };
        if path.is_empty() {
            return Err(bad("the socket path is empty"));
        }
        Ok(match port {
            Some(port) => Target::Unix { path: path.into(), port },
            None => Target::UnixSerial { path: path.into() },
        })
    } else if let Some(rest) = s.strip_prefix("vsock:") {
        let parsed = rest.split_once(':').and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)));
        let (cid, port) = parsed.ok_or_else(|| bad("expected vsock:CID:PORT with two numbers"))?;
        Ok(Target::Vsock { cid, port })
    } else if let Some(rest) = s.strip_prefix("tls://") {
        let (addr, name) = match rest.split_once('/') {
            Some((_, n)) if n.is_empty() || n.contains('/') => {
                return Err(bad(&format!("the hypervisor name {n:?} after the address is empty or has a '/'")));
            }
            Some((a, n)) => (a, Some(n.to_string())),
            None => (rest, None),
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("expected tls://HOST:PORT[/NAME]"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(bad("the host is empty (tls://127.0.0.2:7443/h)"));
        }
        let port = port.parse().ok().filter(|&p| p != 0).ok_or_else(|| bad("the TCP port must be 1 to 65535"))?;
        Ok(Target::Tls { host: host.into(), port, name })
    } else if let Some(rest) = s.strip_prefix("tcp:") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(bad("the host is empty (tcp:127.0.0.1:4555 for a local emulator)"));
        }
        let port = port.parse().ok().filter(|&p| p != 0).ok_or_else(|| bad("the TCP port must be 1 to 65535"))?;
        Ok(Target::Tcp { host: host.into(), port })
    } else if let Some(rest) = s.strip_prefix("serial:") {
        let (path, baud) = match rest.rsplit_once('@') {
            Some((path, baud)) => {
                let baud = baud.parse().map_err(|_| bad(&format!("the baud rate {baud:?} is not a number")))?;
                (path, baud)
            }
            None => (rest, serial_link::DEFAULT_BAUD),
        };
        if path.is_empty() {
            return Err(bad("expected serial:DEVICE[@BAUD], e.g. serial:/dev/ttyS1@115200"));
        }
        if !serial_link::BAUD_RATES.contains(&baud) {
            return Err(bad(&serial_link::unsupported_baud(baud)));
        }
        Ok(Target::Tty { path: path.into(), baud })
    } else {
        Err(bad(&format!("expected one of {FORMS}")))
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
        Err(_) => Err(err("no hypervisor to talk to: pass --connect unix:PATH:PORT (cargo xtask run prints it), \
             --connect serial:/dev/ttyS1 (a serial line), or set HVCTL_CONNECT")),
    }
}

/// The certificate files tls:// targets use. Process-wide, like a kubeconfig: hvctl's
/// `main` sets them from `--tls-*` or the context, the agent from its own
/// certificate (towards other agents), so no caller of [`Client::connect`] changes.
static TLS_FILES: std::sync::Mutex<Option<TlsFiles>> = std::sync::Mutex::new(None);

/// Use `files` for every tls:// connection from now on.
pub fn set_tls(files: TlsFiles) {
    *TLS_FILES.lock().unwrap_or_else(|p| p.into_inner()) = Some(files);
}

fn tls_files() -> TlsFiles {
    TLS_FILES.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
}

/// A byte stream with a receive timeout: a socket, or a [`Tty`].
pub trait Stream: Read + Write + Send {
    /// Like `UnixStream::set_read_timeout`: a read waits at most `d`, then fails with
    /// `WouldBlock` or `TimedOut`.
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}
impl Stream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}
impl Stream for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}
impl Stream for vsock::VsockStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        vsock::VsockStream::set_read_timeout(self, d)
    }
}

/// What carries the frames: "send frame bytes" and "next frame" over either kind.
enum Link {
    /// vsock: a reliable stream, so a frame is just its bytes.
    Vsock {
        stream: Box<dyn Stream>,
        decoder: FrameDecoder,
        /// Bytes read but not yet taken by the decoder (it holds at most one frame).
        pending: Vec<u8>,
    },
    /// A serial line: each frame in a checksummed packet, in a session.
    Serial(SerialLink),
    /// A host agent: typed requests in agent frames.
    Agent(Box<AgentLink>),
}

/// The state of a connection to a host agent.
struct AgentLink {
    stream: ClientStream,
    /// Who the agent says we are, and our role there.
    identity: String,
    role: proto::Role,
    /// The hypervisor our `wire` requests go to.
    hypervisor: Option<String>,
    /// Frame bytes each way (inside TLS), shared so an agent can show them while a
    /// migration runs.
    traffic: std::sync::Arc<Traffic>,
}

/// Frame bytes over an agent link, each way.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Sent to the agent.
    pub sent: std::sync::atomic::AtomicU64,
    /// Received from it.
    pub received: std::sync::atomic::AtomicU64,
}

impl AgentLink {
    fn send(&mut self, msg: &ClientMsg, target: &Target) -> Result<(), CliError> {
        let n = proto::write_msg(&mut self.stream, msg)
            .map_err(|e| connection_err(tls::explain(&e, &format!("the agent at {target}"))))?;
        self.traffic.sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn recv(&mut self, target: &Target, timeout: Duration) -> Result<AgentMsg, CliError> {
        match proto::read_msg::<_, AgentMsg>(&mut self.stream, proto::DEFAULT_MAX_FRAME, Instant::now() + timeout) {
            Ok((AgentMsg::Fatal { reason }, _)) => {
                Err(connection_err(format!("the agent at {target} closed the connection: {reason}")))
            }
            Ok((msg, n)) => {
                self.traffic.received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(msg)
            }
            Err(proto::FrameFault::Timeout) => {
                Err(connection_err(format!("no answer from the agent at {target} within {} s", timeout.as_secs())))
            }
            Err(proto::FrameFault::Io(e)) => Err(connection_err(tls::explain(&e, &format!("the agent at {target}")))),
            Err(e) => Err(connection_err(format!("the agent at {target}: {e}"))),
        }
    }
}

impl Link {
    fn send_frame(&mut self, bytes: &[u8], target: &Target) -> Result<(), CliError> {
        match self {
            Link::Vsock { stream, .. } => {
                stream.write_all(bytes).map_err(|e| connection_err(format!("sending to {target}: {e}")))
            }
            Link::Serial(link) => link.send_frame(bytes, target),
            // Client::send sends typed requests to an agent; no raw frames.
            Link::Agent(_) => Err(err("internal: a raw frame for an agent link")),
        }
    }

    fn next_frame(&mut self, target: &Target) -> Result<Frame, CliError> {
        match self {
            Link::Vsock { stream, decoder, pending } => {
                stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| connection_err(e.to_string()))?;
                let mut buf = [0u8; 8192];
                loop {
                    let taken = decoder.push(pending);
                    pending.drain(..taken);
                    if let Some(frame) = decoder.next_frame() {
                        return frame.map_err(|e| connection_err(format!("the hypervisor sent a bad frame: {e}")));
                    }
                    if taken > 0 && !pending.is_empty() {
                        continue;
                    }
                    let Some(n) = serial_link::read_some(stream.as_mut(), &mut buf, target, "")? else {
                        return Err(connection_err(format!(
                            "no answer from the hypervisor within {} s",
                            REQUEST_TIMEOUT.as_secs()
                        )));
                    };
                    pending.extend_from_slice(&buf[..n]);
                }
            }
            Link::Serial(link) => link.next_frame(target, REQUEST_TIMEOUT),
            Link::Agent(_) => Err(err("internal: a raw frame from an agent link")),
        }
    }
}

/// How a [`Client`] is connected, for `hvctl info`.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `vsock` or `serial`.
    pub transport: &'static str,
    /// The target, as `--connect` takes it.
    pub target: String,
    /// How frames travel: `length-prefixed frames` or `COBS packets, CRC-32C`.
    pub framing: &'static str,
    /// The serial session's counters (serial only).
    pub serial: Option<LinkStats>,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({}", self.transport, self.target, self.framing)?;
        if let Some(s) = self.serial.filter(|s| s.dropped > 0) {
            write!(f, "; {} damaged packets dropped, {} with a bad CRC", s.dropped, s.bad_crc)?;
        }
        f.write_str(")")
    }
}

/// An open connection to the hypervisor's control port.
pub struct Client {
    link: Link,
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

/// Why one connection attempt failed: worth retrying until the timeout (nobody
/// listens yet), or final (the serial handshake, which waits until the timeout itself).
enum ConnectFailure {
    Retry(String),
    Final(CliError),
}

fn raw_socket_err(what: &str, e: &std::io::Error, hint: &str) -> ConnectFailure {
    ConnectFailure::Retry(match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} does not exist: {hint}"),
        std::io::ErrorKind::ConnectionRefused => format!("nobody serves {what}: {hint}"),
        _ => format!("cannot connect to {what}: {e}"),
    })
}

fn connect_once(target: &Target, deadline: Instant) -> Result<Link, ConnectFailure> {
    use ConnectFailure::Retry;
    let serial = |stream: Box<dyn Stream>| {
        SerialLink::open(stream, target, deadline).map(Link::Serial).map_err(ConnectFailure::Final)
    };
    match target {
        Target::Unix { path, port } => {
            let mut s = UnixStream::connect(path).map_err(|e| {
                Retry(match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        format!("{} does not exist: is the hypervisor running (cargo xtask run)?", path.display())
                    }
                    std::io::ErrorKind::ConnectionRefused => {
                        format!("nobody serves {}: is vhost-device-vsock running?", path.display())
                    }
                    _ => format!("cannot connect to {}: {e}", path.display()),
                })
            })?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| Retry(e.to_string()))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| Retry(format!("handshake: {e}")))?;
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).map_err(|e| Retry(format!("handshake: {e}")))?;
            if line.trim() != format!("OK {port}") {
                return Err(Retry(format!("nothing is listening on port {port} — is the hypervisor running?")));
            }
            Ok(Link::Vsock { stream: Box::new(s), decoder: FrameDecoder::new(), pending: Vec::new() })
        }
        Target::Vsock { cid, port } => vsock::VsockStream::connect(&vsock::VsockAddr::new(*cid, *port))
            .map(|s| Link::Vsock { stream: Box::new(s), decoder: FrameDecoder::new(), pending: Vec::new() })
            .map_err(|e| Retry(format!("cannot connect to vsock {cid}:{port}: {e} — is the hypervisor running?"))),
        Target::UnixSerial { path } => {
            let s = UnixStream::connect(path).map_err(|e| {
                raw_socket_err(
                    &path.display().to_string(),
                    &e,
                    "is the emulator running with a serial port on this socket?",
                )
            })?;
            serial(Box::new(s))
        }
        Target::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| ConnectFailure::Final(connection_err(format!("cannot resolve {host}: {e}"))))?
                .collect();
            let s = TcpStream::connect(&addrs[..]).map_err(|e| {
                raw_socket_err(&format!("tcp {host}:{port}"), &e, "is the emulator running with COM2 on this port?")
            })?;
            // Packets are small and each one waits for its answer.
            s.set_nodelay(true).map_err(|e| Retry(e.to_string()))?;
            serial(Box::new(s))
        }
        Target::Tty { path, baud } => {
            let tty = Tty::open(path, *baud).map_err(|e| ConnectFailure::Final(connection_err(e)))?;
            serial(Box::new(tty))
        }
        Target::Tls { host, port, name } => connect_agent(target, host, *port, name.clone(), deadline),
    }
}

/// TCP (retried while nobody listens), the TLS handshake, the hello.
fn connect_agent(
    target: &Target,
    host: &str,
    port: u16,
    name: Option<String>,
    deadline: Instant,
) -> Result<Link, ConnectFailure> {
    use ConnectFailure::Final;
    let config = tls::client_config(&tls_files()).map_err(Final)?;
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Final(connection_err(format!("cannot resolve {host}: {e}"))))?
        .collect();
    let sock = TcpStream::connect(&addrs[..])
        .map_err(|e| raw_socket_err(&format!("tls {host}:{port}"), &e, "is the agent running (hvctl agent serve)?"))?;
    let peer = format!("the agent at {host}:{port}");
    // The handshake and hello get their own few seconds even when the connect
    // retries used up the timeout.
    let hs_deadline = deadline.max(Instant::now() + Duration::from_secs(5));
    let stream = tls::client_handshake(config, sock, host, hs_deadline).map_err(Final)?;
    let mut link = AgentLink {
        stream,
        identity: String::new(),
        role: proto::Role::ReadOnly,
        hypervisor: None,
        traffic: Default::default(),
    };
    link.send(&ClientMsg::Hello { version: proto::PROTOCOL_VERSION, hypervisor: name }, target).map_err(Final)?;
    match link.recv(target, hs_deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))) {
        Ok(AgentMsg::Welcome { identity, role, hypervisor, .. }) => {
            link.identity = identity;
            link.role = role;
            link.hypervisor = hypervisor;
            Ok(Link::Agent(Box::new(link)))
        }
        Ok(AgentMsg::Refused { reason }) => Err(Final(remote_err(format!("{peer} refused the connection: {reason}")))),
        Ok(_) => Err(Final(connection_err(format!("{peer} answered the hello with the wrong message")))),
        Err(e) => Err(Final(e)),
    }
}

impl Client {
    /// Connect, retrying until `opts.timeout` has passed.
    pub fn connect(opts: &Options) -> Result<Self, CliError> {
        let target = resolve(opts)?;
        let start = Instant::now();
        let deadline = start + opts.timeout;
        loop {
            match connect_once(&target, deadline) {
                Ok(link) => return Ok(Self { link, next_id: 1, target }),
                Err(ConnectFailure::Final(e)) => return Err(e),
                Err(ConnectFailure::Retry(e)) if start.elapsed() >= opts.timeout => return Err(connection_err(e)),
                Err(ConnectFailure::Retry(_)) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// How this client is connected (transport, framing, serial counters).
    pub fn connection(&self) -> Connection {
        let (framing, serial) = match &self.link {
            Link::Vsock { .. } => ("length-prefixed frames", None),
            Link::Serial(link) => (serial_link::FRAMING, Some(link.stats())),
            Link::Agent(_) => ("TLS 1.3, agent protocol frames", None),
        };
        Connection { transport: self.target.transport(), target: self.target.to_string(), framing, serial }
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
        if let Link::Agent(link) = &mut self.link {
            link.send(&ClientMsg::Hv { id, request: request.clone() }, &self.target)?;
            return Ok(id);
        }
        let mut bytes = Vec::new();
        wire::encode_request(id, request, &mut bytes).map_err(|e| err(format!("cannot encode the request: {e}")))?;
        self.link.send_frame(&bytes, &self.target)?;
        Ok(id)
    }

    /// The next response and the id of the request it answers. An error frame with id
    /// 0 (not tied to a request) means the hypervisor closed the connection.
    pub fn recv(&mut self) -> Result<(u64, Response), CliError> {
        if let Link::Agent(link) = &mut self.link {
            return match link.recv(&self.target, REQUEST_TIMEOUT)? {
                AgentMsg::Hv { id, response } => Ok((id, response)),
                AgentMsg::Denied { reason, .. } => Err(remote_err(format!("the agent refused: {reason}"))),
                AgentMsg::Unreachable { reason, .. } => Err(connection_err(reason)),
                _ => Err(connection_err(format!("the agent at {} sent an answer of the wrong kind", self.target))),
            };
        }
        let frame = self.link.next_frame(&self.target)?;
        let response = wire::decode_response(&frame)
            .map_err(|e| connection_err(format!("the hypervisor sent an unreadable response: {e}")))?;
        if frame.request_id == 0
            && let Response::Error(e) = &response
        {
            // An error not tied to our request: the connection is over.
            return Err(connection_err(format!("the hypervisor closed the connection: {e}")));
        }
        Ok((frame.request_id, response))
    }
}

/// Agent-level requests (`tls://` targets only).
impl Client {
    fn agent_link(&mut self) -> Result<&mut AgentLink, CliError> {
        match &mut self.link {
            Link::Agent(link) => Ok(link),
            _ => Err(err(format!("{} is not an agent: agent commands need --connect tls://HOST:PORT", self.target))),
        }
    }

    /// Send an agent-level request; its id.
    pub fn agent_send(&mut self, request: AgentRequest) -> Result<u64, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        let target = self.target.clone();
        self.agent_link()?.send(&ClientMsg::Agent { id, request }, &target)?;
        Ok(id)
    }

    /// The next answer to an agent-level request, waiting at most `timeout`.
    pub fn agent_recv(&mut self, timeout: Duration) -> Result<(u64, AgentResponse), CliError> {
        let target = self.target.clone();
        match self.agent_link()?.recv(&target, timeout)? {
            AgentMsg::Agent { id, response } => Ok((id, response)),
            AgentMsg::Denied { reason, .. } => Err(remote_err(format!("the agent refused: {reason}"))),
            _ => Err(connection_err(format!("the agent at {target} sent an answer of the wrong kind"))),
        }
    }

    /// One agent-level request and its answer.
    pub fn agent_call(&mut self, request: AgentRequest) -> Result<AgentResponse, CliError> {
        let id = self.agent_send(request)?;
        loop {
            let (got, response) = self.agent_recv(REQUEST_TIMEOUT)?;
            if got == id {
                return Ok(response);
            }
        }
    }

    /// Who the agent says we are and our role there (`tls://` only).
    pub fn agent_identity(&self) -> Option<(&str, proto::Role, Option<&str>)> {
        match &self.link {
            Link::Agent(l) => Some((l.identity.as_str(), l.role, l.hypervisor.as_deref())),
            _ => None,
        }
    }

    /// The frame bytes counters of an agent link.
    pub fn traffic(&self) -> Option<std::sync::Arc<Traffic>> {
        match &self.link {
            Link::Agent(l) => Some(l.traffic.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        let cases: [(&str, Target, &str); 11] = [
            (
                "tls://127.0.0.2:7443/h",
                Target::Tls { host: "127.0.0.2".into(), port: 7443, name: Some("h".into()) },
                "tls",
            ),
            ("tls://[::1]:7443", Target::Tls { host: "::1".into(), port: 7443, name: None }, "tls"),
            ("unix:/run/x/vm.vsock:5000", Target::Unix { path: "/run/x/vm.vsock".into(), port: 5000 }, "vsock"),
            ("vsock:4:5000", Target::Vsock { cid: 4, port: 5000 }, "vsock"),
            ("unix:/run/x/com2.sock", Target::UnixSerial { path: "/run/x/com2.sock".into() }, "serial"),
            ("unix:/run/a:b/com2", Target::UnixSerial { path: "/run/a:b/com2".into() }, "serial"),
            ("tcp:127.0.0.1:4555", Target::Tcp { host: "127.0.0.1".into(), port: 4555 }, "serial"),
            ("tcp:[::1]:4555", Target::Tcp { host: "::1".into(), port: 4555 }, "serial"),
            ("tcp:bmc.example:4555", Target::Tcp { host: "bmc.example".into(), port: 4555 }, "serial"),
            ("serial:/dev/ttyS1@115200", Target::Tty { path: "/dev/ttyS1".into(), baud: 115200 }, "serial"),
            ("serial:/dev/ttyUSB0@921600", Target::Tty { path: "/dev/ttyUSB0".into(), baud: 921600 }, "serial"),
        ];
        for (text, target, transport) in cases {
            let parsed = parse_target(text).unwrap();
            assert_eq!(parsed, target, "{text}");
            assert_eq!(parsed.to_string(), text, "prints as it parses");
            assert_eq!(parsed.transport(), transport, "{text}");
        }
        let default = parse_target("serial:/dev/ttyS1").unwrap();
        assert_eq!(default, Target::Tty { path: "/dev/ttyS1".into(), baud: 115200 });
        assert_eq!(default.to_string(), "serial:/dev/ttyS1@115200");
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        let cases = [
            ("unix::5000", "the socket path is empty"),
            ("unix:", "the socket path is empty"),
            ("unix:/x:", "nothing after the last ':'"),
            ("unix:/x:99999999999", "vsock port 99999999999 is out of range"),
            ("vsock:4", "expected vsock:CID:PORT"),
            ("vsock:a:1", "expected vsock:CID:PORT"),
            ("tcp:1", "expected tcp:HOST:PORT"),
            ("tcp::4555", "the host is empty"),
            ("tcp:h:0", "the TCP port must be 1 to 65535"),
            ("tcp:h:70000", "the TCP port must be 1 to 65535"),
            ("serial:", "expected serial:DEVICE[@BAUD]"),
            ("serial:/dev/ttyS1@fast", "the baud rate \"fast\" is not a number"),
            ("serial:/dev/ttyS1@12345", "unsupported baud rate 12345: use one of 1200, 2400"),
            ("com2", "expected one of unix:PATH:PORT"),
            ("tls://h", "expected tls://HOST:PORT[/NAME]"),
            ("tls://:7443", "the host is empty"),
            ("tls://h:0/x", "the TCP port must be 1 to 65535"),
            ("tls://h:7443/", "the hypervisor name \"\" after the address is empty"),
        ];
        for (text, why) in cases {
            let e = parse_target(text).unwrap_err();
            assert_eq!(e.1, 2, "{text}: a usage error");
            assert!(e.0.starts_with(&format!("bad target {text:?}: ")), "{text}: {}", e.0);
            assert!(e.0.contains(why), "{text}: {}", e.0);
        }
    }
}
