//! The agent protocol: what hvctl (or another agent) and `hvctl agent serve` say to each
//! other inside the TLS 1.3 session. It is not the hypervisor's `wire` protocol: it
//! carries `wire::Request`/`wire::Response` values for one hypervisor, plus the agent's
//! own requests (list, stats, host-to-host migration).
//!
//! Every message is one frame: a 4-byte big-endian length, then that many bytes of a
//! postcard-encoded [`ClientMsg`] (client → agent) or [`AgentMsg`] (agent → client).
//! A frame longer than the receiver's maximum ([`DEFAULT_MAX_FRAME`] unless configured)
//! ends the connection with a [`AgentMsg::Fatal`] saying so.
//!
//! ```text
//!   client                                        agent
//!     |== TLS 1.3 handshake, both send certificates ==|  (unknown CA: alert, closed)
//!     |-- Hello { version, hypervisor } ------------->|
//!     |<- Welcome { identity, role, hypervisors } ----|  or Refused { reason }, closed
//!     |-- Hv { id 1, Request::Ping } ---------------->|  forwarded: one call under the
//!     |-- Hv { id 2, Request::DomainDestroy } ------->|  hypervisor's lock, in order
//!     |<- Hv { id 1, Response::Pong } ----------------|
//!     |<- Denied { id 2, "... read-only ..." } -------|  the role does not allow it
//!     |-- Agent { id 3, AgentRequest::Migrate } ----->|
//!     |<- Agent { id 3, MigrateProgress } ... --------|  zero or more
//!     |<- Agent { id 3, Migrated } -------------------|  or MigrateFailed
//! ```
//!
//! The version is [`PROTOCOL_VERSION`]; an agent refuses a hello of another version
//! (variant order is wire format, so a change means a bump).

use std::io::{ErrorKind, Read, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use wire::{MigrateOptions, MigrateProgress, MigrateReport, ReceiveStatus, Request, Response};

/// The agent protocol's version (in [`ClientMsg::Hello`]).
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame either side accepts unless configured otherwise: room for a
/// `wire` frame (64 KiB) and its envelope, with margin.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024;

/// What a client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Look, never change: ping, info, status, list, console output, monitor and
    /// dirty-log reads (no clean).
    ReadOnly,
    /// Everything, including create, destroy, pause and migrate.
    Admin,
}

impl Role {
    /// `read-only` or `admin`, as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == Role::Admin || needed == Role::ReadOnly
    }
}

/// Client → agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientMsg {
    /// The first message: which protocol, and which hypervisor the `Hv` requests go
    /// to (`None`: agent-level requests only, or the agent's only hypervisor).
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// A name from the agent's hypervisor list.
        hypervisor: Option<String>,
    },
    /// A request for the hypervisor named in the hello.
    Hv {
        /// The client's id, restored in the answer.
        id: u64,
        /// The request.
        request: Request,
    },
    /// A request for the agent itself.
    Agent {
        /// The client's id.
        id: u64,
        /// The request.
        request: AgentRequest,
    },
}

/// Agent → client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentMsg {
    /// The hello was accepted.
    Welcome {
        /// The identity the agent authenticated (certificate CN or SAN).
        identity: String,
        /// Its role.
        role: Role,
        /// The hypervisor `Hv` requests go to, if any.
        hypervisor: Option<String>,
        /// The hypervisors this agent serves.
        hypervisors: Vec<String>,
    },
    /// The hello was refused; the agent closes the connection.
    Refused {
        /// Why, for a person.
        reason: String,
    },
    /// The hypervisor's answer to `ClientMsg::Hv`.
    Hv {
        /// The client's id.
        id: u64,
        /// The answer.
        response: Response,
    },
    /// The request was not forwarded: the role does not allow it, or no hypervisor was
    /// chosen.
    Denied {
        /// The client's id.
        id: u64,
        /// Why, for a person.
        reason: String,
    },
    /// An answer to `ClientMsg::Agent`.
    Agent {
        /// The client's id.
        id: u64,
        /// The answer.
        response: AgentResponse,
    },
    /// The agent could not reach the hypervisor for this request (it opens the
    /// connection again for the next one).
    Unreachable {
        /// The client's id.
        id: u64,
        /// Why, for a person.
        reason: String,
    },
    /// The connection is over (bad frame, oversize frame, idle).
    Fatal {
        /// Why.
        reason: String,
    },
}

/// A request for the agent itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentRequest {
    /// The hypervisors this agent serves and whether each can be reached.
    List,
    /// Bytes and requests per peer.
    Stats,
    /// Migrate a domain of one of this agent's hypervisors to a hypervisor behind
    /// another agent: this agent connects to it with its own certificate and relays.
    Migrate(MigrateOrder),
}

/// [`AgentRequest::Migrate`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrateOrder {
    /// The source hypervisor's name on this agent.
    pub source: String,
    /// The domain on it.
    pub domain: u32,
    /// The destination: `tls://HOST:PORT[/NAME]` of the other agent.
    pub destination: String,
    /// The `MigrateSend` options.
    pub options: MigrateOptions,
    /// Testing only: flip one bit of this stream byte on the way (as `hvctl migrate
    /// --fault-corrupt-byte`).
    pub corrupt_byte: Option<u64>,
}

/// One hypervisor in [`AgentResponse::Hypervisors`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HypervisorEntry {
    /// Its name on the agent.
    pub name: String,
    /// Its target, as `--connect` takes it.
    pub target: String,
    /// Whether the agent holds a connection to it now.
    pub connected: bool,
}

/// Traffic with one peer, in [`AgentStats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStats {
    /// Who: the authenticated identity of a client, or the address of an agent this
    /// one connected to.
    pub peer: String,
    /// `inbound` (it connected to us) or `outbound` (we connected to it).
    pub direction: String,
    /// Connections made.
    pub connections: u64,
    /// Requests carried.
    pub requests: u64,
    /// Bytes this agent sent to the peer (frame bytes, inside TLS).
    pub bytes_sent: u64,
    /// Bytes this agent received from the peer.
    pub bytes_received: u64,
}

/// [`AgentRequest::Stats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStats {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections refused (limit, handshake, identity, bad frames).
    pub connections_refused: u64,
    /// Per peer and direction.
    pub peers: Vec<PeerStats>,
}

/// An answer to an [`AgentRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentResponse {
    /// [`AgentRequest::List`].
    Hypervisors(Vec<HypervisorEntry>),
    /// [`AgentRequest::Stats`].
    Stats(AgentStats),
    /// A migration's progress (zero or more before the outcome).
    MigrateProgress {
        /// The source's progress.
        progress: Box<MigrateProgress>,
        /// The rate over a serial end, bytes/s, as the relay measured it.
        serial_rate: Option<f64>,
        /// Whether the state changed (the operator redraws at once).
        state_changed: bool,
    },
    /// The migration completed.
    Migrated {
        /// The source's report.
        report: MigrateReport,
        /// The source's last progress.
        progress: Box<MigrateProgress>,
        /// The destination's last status.
        status: ReceiveStatus,
    },
    /// The migration failed; both ends were told what the relay could tell them.
    MigrateFailed {
        /// The relay's error.
        message: String,
        /// Its hvctl exit code.
        exit_code: u8,
        /// The source's last progress, if any.
        progress: Option<Box<MigrateProgress>>,
        /// The destination's last status, if any.
        status: Option<ReceiveStatus>,
    },
    /// The agent could not do it.
    Error(String),
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameFault {
    /// The peer closed the connection between frames.
    Closed,
    /// Nothing (or not a whole frame) arrived before the deadline.
    Timeout,
    /// The length prefix says more than the maximum.
    Oversize(usize),
    /// The bytes are not a message of this protocol.
    Garbage(String),
    /// The connection failed.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameFault::Closed => f.write_str("the peer closed the connection"),
            FrameFault::Timeout => f.write_str("no complete frame before the deadline"),
            FrameFault::Oversize(n) => write!(f, "a frame of {n} bytes is over the limit"),
            FrameFault::Garbage(e) => write!(f, "not an agent protocol message: {e}"),
            FrameFault::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Something whose reads can be bounded: the deadline applies to the whole frame, so a
/// peer that trickles bytes (slowloris) cannot hold a connection beyond it.
pub trait Deadline: Read {
    /// Make the next read wait at most `d`.
    fn set_timeout(&mut self, d: std::time::Duration) -> std::io::Result<()>;
}

/// Read exactly `buf.len()` bytes by `deadline`. `Ok(false)` when the peer closed
/// before the first byte (and `allow_eof`).
fn read_exact_by<S: Deadline>(
    s: &mut S,
    buf: &mut [u8],
    deadline: Instant,
    allow_eof: bool,
) -> Result<bool, FrameFault> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FrameFault::Timeout);
        }
        s.set_timeout(left).map_err(FrameFault::Io)?;
        let rest = buf.get_mut(got..).ok_or(FrameFault::Timeout)?;
        match s.read(rest) {
            Ok(0) if got == 0 && allow_eof => return Ok(false),
            Ok(0) => {
                return Err(FrameFault::Io(std::io::Error::new(ErrorKind::UnexpectedEof, "the peer closed mid-frame")));
            }
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(FrameFault::Io(e)),
        }
    }
    Ok(true)
}

/// Read one frame's bytes: the length must arrive by `deadline`, and so must the rest.
/// Returns the payload and the bytes it took on the connection.
pub fn read_frame<S: Deadline>(s: &mut S, max: usize, deadline: Instant) -> Result<Vec<u8>, FrameFault> {
    let mut len = [0u8; 4];
    if !read_exact_by(s, &mut len, deadline, true)? {
        return Err(FrameFault::Closed);
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(FrameFault::Oversize(n));
    }
    let mut body = vec![0u8; n];
    read_exact_by(s, &mut body, deadline, false)?;
    Ok(body)
}

/// Read and decode one message.
pub fn read_msg<S: Deadline, T: for<'de> Deserialize<'de>>(
    s: &mut S,
    max: usize,
    deadline: Instant,
) -> Result<(T, usize), FrameFault> {
    let body = read_frame(s, max, deadline)?;
    let msg = postcard::from_bytes(&body).map_err(|e| FrameFault::Garbage(e.to_string()))?;
    Ok((msg, body.len() + 4))
}

/// Encode one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, String> {
    let body = postcard::to_allocvec(msg).map_err(|e| format!("cannot encode an agent message: {e}"))?;
    let len = u32::try_from(body.len()).map_err(|_| "an agent message over 4 GiB".to_string())?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Write one message; the bytes it took on the connection.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<usize, std::io::Error> {
    let bytes = encode(msg).map_err(std::io::Error::other)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::time::Duration;

    impl Deadline for Cursor<Vec<u8>> {
        fn set_timeout(&mut self, _: Duration) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let msg = ClientMsg::Hv { id: 7, request: Request::DomainDestroy { id: 3 } };
        let bytes = encode(&msg).unwrap();
        let (back, used): (ClientMsg, usize) = read_msg(&mut Cursor::new(bytes.clone()), 1024, soon()).unwrap();
        assert_eq!(used, bytes.len());
        assert!(matches!(back, ClientMsg::Hv { id: 7, request: Request::DomainDestroy { id: 3 } }));
    }

    #[test]
    fn oversize_and_garbage_frames_are_named() {
        let mut big = (10_000u32).to_be_bytes().to_vec();
        big.extend(vec![0u8; 16]);
        let e = read_frame(&mut Cursor::new(big), 1024, soon()).unwrap_err();
        assert!(matches!(e, FrameFault::Oversize(10_000)), "{e}");
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend([0xff, 0xff, 0xff]);
        let e = read_msg::<_, ClientMsg>(&mut Cursor::new(junk), 1024, soon()).unwrap_err();
        assert!(matches!(e, FrameFault::Garbage(_)), "{e}");
        let e = read_frame(&mut Cursor::new(vec![]), 1024, soon()).unwrap_err();
        assert!(matches!(e, FrameFault::Closed), "{e}");
        let e = read_frame(&mut Cursor::new(vec![0, 0]), 1024, soon()).unwrap_err();
        assert!(matches!(e, FrameFault::Io(_)), "{e}");
    }

    #[test]
    fn roles_order() {
        assert!(Role::Admin.allows(Role::Admin) && Role::Admin.allows(Role::ReadOnly));
        assert!(Role::ReadOnly.allows(Role::ReadOnly) && !Role::ReadOnly.allows(Role::Admin));
    }
}
