//! hvctl's side of a serial control line: wire frames inside `wire::serial` packets
//! (COBS-delimited, CRC-32C) over a raw byte stream, and opening the streams that carry
//! one: an emulator's serial backend on a Unix socket or TCP, or a real tty.
//!
//! ```text
//!  hvctl                                   hypervisor (COM2)
//!    |-- 0x00 Open { nonce } ------------------>|   resent every OPEN_WAIT, a fresh nonce
//!    |<-------------- (late packets of an older client: ignored)
//!    |<----------------- Opened { nonce, max } -|   only the latest nonce counts
//!    |-- Frame(request) ----------------------->|
//!    |<---------------------- Frame(response) --|   damaged packets: dropped, counted
//! ```
//!
//! Not for vsock: there a frame is its own bytes on a reliable stream (`transport`).
//! The packet format itself lives in `wire::serial`; this module only does I/O and the
//! client's half of the session rules.

use std::cell::Cell;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, BaudRate, ControlFlags, InputFlags, SetArg, SpecialCharacterIndices};
use wire::Frame;
use wire::serial::{Packet, PacketCounters, PacketDecoder, PacketError, encode_frame_packet, encode_open};

use crate::transport::{Stream, Target};
use crate::{CliError, connection_err};

/// How long to wait for `Opened` before sending `Open` again (a line may lose it).
pub const OPEN_WAIT: Duration = Duration::from_secs(1);
/// `Open`s sent at least, however short `--connect-timeout` is.
pub const OPEN_ATTEMPTS: u64 = 3;

/// How the link carries frames, for `hvctl info`.
pub const FRAMING: &str = "COBS packets, CRC-32C";

/// The rates `serial:DEVICE@BAUD` accepts: the ones Linux termios can set.
pub const BAUD_RATES: &[u32] = &[
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000,
    1500000, 2000000, 2500000, 3000000, 3500000, 4000000,
];

/// The default rate of `serial:DEVICE` (and of the hypervisor's COM2).
pub const DEFAULT_BAUD: u32 = 115200;

fn baud_rate(baud: u32) -> Option<BaudRate> {
    Some(match baud {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19200 => BaudRate::B19200,
        38400 => BaudRate::B38400,
        57600 => BaudRate::B57600,
        115200 => BaudRate::B115200,
        230400 => BaudRate::B230400,
        460800 => BaudRate::B460800,
        500000 => BaudRate::B500000,
        576000 => BaudRate::B576000,
        921600 => BaudRate::B921600,
        1000000 => BaudRate::B1000000,
        1152000 => BaudRate::B1152000,
        1500000 => BaudRate::B1500000,
        2000000 => BaudRate::B2000000,
        2500000 => BaudRate::B2500000,
        3000000 => BaudRate::B3000000,
        3500000 => BaudRate::B3500000,
        4000000 => BaudRate::B4000000,
        _ => return None,
    })
}

/// A serial device in raw mode. Reads wait at most the read timeout (`poll`), like a
/// socket's `SO_RCVTIMEO`, so the link's timeouts are the same on every stream.
pub struct Tty {
    file: File,
    timeout: Cell<Option<Duration>>,
}

impl std::fmt::Debug for Tty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tty").field("file", &self.file).finish_non_exhaustive()
    }
}

impl Tty {
    /// Open `path` and set it to raw 8N1 at `baud`, no flow control, receiver on,
    /// modem lines ignored; stale input is discarded.
    pub fn open(path: &Path, baud: u32) -> Result<Self, String> {
        let speed = baud_rate(baud).ok_or_else(|| unsupported_baud(baud))?;
        let shown = path.display();
        // O_NONBLOCK: a real port without CLOCAL would block the open until carrier
        // detect; it is cleared once CLOCAL is set. O_NOCTTY: never our controlling tty.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((OFlag::O_NOCTTY | OFlag::O_NONBLOCK).bits())
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!("{shown} does not exist: is the serial device name right?"),
                io::ErrorKind::PermissionDenied => {
                    format!(
                        "cannot open {shown}: permission denied (is your user in the group that owns it, e.g. dialout?)"
                    )
                }
                _ => format!("cannot open {shown}: {e}"),
            })?;
        let mut mode = termios::tcgetattr(file.as_fd()).map_err(|e| {
            if e == nix::errno::Errno::ENOTTY {
                format!("{shown} is not a serial line (not a terminal device)")
            } else {
                format!("cannot read the line settings of {shown}: {e}")
            }
        })?;
        // cfmakeraw: no line editing, echo, signals or CR/LF translation; 8 data bits,
        // no parity.
        termios::cfmakeraw(&mut mode);
        mode.control_flags.remove(ControlFlags::CSTOPB | ControlFlags::CRTSCTS | ControlFlags::PARENB);
        mode.control_flags.insert(ControlFlags::CS8 | ControlFlags::CLOCAL | ControlFlags::CREAD);
        mode.input_flags.remove(InputFlags::IXON | InputFlags::IXOFF | InputFlags::IXANY);
        mode.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        mode.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::cfsetspeed(&mut mode, speed).map_err(|e| format!("cannot set {shown} to {baud} baud: {e}"))?;
        termios::tcsetattr(file.as_fd(), SetArg::TCSANOW, &mode)
            .map_err(|e| format!("cannot set {shown} to raw 8N1 at {baud} baud: {e}"))?;
        termios::tcflush(file.as_fd(), termios::FlushArg::TCIOFLUSH)
            .map_err(|e| format!("cannot flush {shown}: {e}"))?;
        let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(|e| format!("{shown}: {e}"))?;
        let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
        fcntl(file.as_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| format!("{shown}: {e}"))?;
        Ok(Self { file, timeout: Cell::new(None) })
    }
}

/// Why a baud rate is refused, with the ones that work.
pub fn unsupported_baud(baud: u32) -> String {
    let list: Vec<String> = BAUD_RATES.iter().map(u32::to_string).collect();
    format!("unsupported baud rate {baud}: use one of {}", list.join(", "))
}

impl Read for Tty {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.timeout.get() {
            None => PollTimeout::NONE,
            // Round up: a 0.4 ms remainder must still wait, not spin.
            Some(d) => PollTimeout::try_from(d.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
            Ok(_) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        self.file.read(buf)
    }
}

impl Write for Tty {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Stream for Tty {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.timeout.set(d);
        Ok(())
    }
}

/// A nonce no earlier client on the line is likely to have used: std's per-process
/// random hash keys over the time and pid.
fn fresh_nonce() -> u64 {
    let mut h = std::hash::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// An open session on a serial line.
pub struct SerialLink {
    stream: Box<dyn Stream>,
    decoder: PacketDecoder,
    /// Bytes read but not yet fed to the decoder (past the packet that ended a read).
    pending: Vec<u8>,
    /// The largest encoded packet the hypervisor accepts (its `Opened`).
    max_packet: u32,
    /// The decoder's counters when the session opened: what came before is not ours.
    at_open: PacketCounters,
}

impl std::fmt::Debug for SerialLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialLink").field("max_packet", &self.max_packet).finish_non_exhaustive()
    }
}

/// What the session has seen since `Opened`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// The largest encoded packet the hypervisor accepts.
    pub max_packet: u32,
    /// Packets decoded.
    pub packets: u64,
    /// Damaged packets dropped.
    pub dropped: u64,
    /// Of those, CRC mismatches.
    pub bad_crc: u64,
}

/// Read once into `buf`; `Ok(None)` when the read timed out. End of stream (said with
/// `closed_hint` after it) and other failures are errors naming `target`. A signal (Ctrl-C during a migration, see
/// `interrupt`) interrupts the read even with SA_RESTART, because the stream has a
/// receive timeout (signal(7)); the read is then simply retried.
pub fn read_some(
    stream: &mut dyn Stream,
    buf: &mut [u8],
    target: &Target,
    closed_hint: &str,
) -> Result<Option<usize>, CliError> {
    loop {
        return match stream.read(buf) {
            Ok(0) => Err(connection_err(format!("{target} closed the connection{closed_hint}"))),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(connection_err(format!("reading from {target}: {e}"))),
        };
    }
}

impl SerialLink {
    /// Open a session on `stream`: send `Open` with a fresh nonce every [`OPEN_WAIT`]
    /// (at least [`OPEN_ATTEMPTS`] times, then until `deadline`) until the `Opened`
    /// answering the latest one arrives. Everything before it is ignored: late answers
    /// to a previous client, answers to our own earlier `Open`s, noise.
    pub fn open(mut stream: Box<dyn Stream>, target: &Target, deadline: Instant) -> Result<Self, CliError> {
        let base = fresh_nonce();
        let mut decoder = PacketDecoder::new();
        let mut buf = [0u8; 4096];
        let closed_hint = match target {
            Target::UnixSerial { .. } => {
                " before the serial session opened (for vsock through vhost-device-vsock, add the port: unix:PATH:PORT)"
            }
            _ => " before the serial session opened",
        };
        let mut attempt = 0u64;
        loop {
            if attempt >= OPEN_ATTEMPTS && Instant::now() >= deadline {
                let hint = match target {
                    Target::Tty { .. } => "is the hypervisor serving COM2, on this cable, at this baud rate?",
                    _ => "is the hypervisor serving COM2 (and no other client holding the emulator's port)?",
                };
                return Err(connection_err(format!(
                    "no answer on serial {target} after {attempt} attempts to open a session: {hint}"
                )));
            }
            let nonce = base.wrapping_add(attempt);
            let mut open = Vec::new();
            encode_open(nonce, &mut open);
            stream.write_all(&open).map_err(|e| connection_err(format!("sending to {target}: {e}")))?;
            attempt += 1;
            let until = Instant::now() + OPEN_WAIT;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                stream.set_read_timeout(Some(left)).map_err(|e| connection_err(e.to_string()))?;
                let Some(n) = read_some(stream.as_mut(), &mut buf, target, closed_hint)? else { break };
                for (i, &byte) in buf[..n].iter().enumerate() {
                    if let Some(Ok(Packet::Opened { nonce: got, max_packet })) = decoder.push(byte)
                        && got == nonce
                    {
                        let pending = buf[i + 1..n].to_vec();
                        let at_open = decoder.counters;
                        return Ok(Self { stream, decoder, pending, max_packet, at_open });
                    }
                }
            }
        }
    }

    /// Counters since the session opened.
    pub fn stats(&self) -> LinkStats {
        let (now, then) = (self.decoder.counters, self.at_open);
        LinkStats {
            max_packet: self.max_packet,
            packets: now.packets - then.packets,
            dropped: now.dropped - then.dropped,
            bad_crc: now.bad_crc - then.bad_crc,
        }
    }

    /// Send one encoded wire frame in a packet.
    pub fn send_frame(&mut self, frame: &[u8], target: &Target) -> Result<(), CliError> {
        let mut packet = Vec::with_capacity(frame.len() + frame.len() / 254 + 8);
        encode_frame_packet(frame, &mut packet);
        let encoded = packet.len() - 1;
        if encoded > self.max_packet as usize {
            return Err(connection_err(format!(
                "the request is a {encoded}-byte packet; the hypervisor on {target} accepts at most {}",
                self.max_packet
            )));
        }
        self.stream.write_all(&packet).map_err(|e| connection_err(format!("sending to {target}: {e}")))
    }

    /// The next frame. Damaged packets are dropped and counted and reading goes on;
    /// `Open`/`Opened` (an answer to one of our earlier `Open`s) are ignored. A frame
    /// whose packet is intact but whose header is bad is an error, as on vsock. Gives up
    /// when nothing arrives for `timeout`, or only damaged packets do.
    pub fn next_frame(&mut self, target: &Target, timeout: Duration) -> Result<Frame, CliError> {
        let start = Instant::now();
        let mut buf = [0u8; 8192];
        loop {
            let mut used = 0;
            let mut found = None;
            for &byte in &self.pending {
                used += 1;
                match self.decoder.push(byte) {
                    None | Some(Ok(Packet::Open { .. } | Packet::Opened { .. })) => {}
                    Some(Ok(Packet::Frame(frame))) => {
                        found = Some(Ok(frame));
                        break;
                    }
                    Some(Err(PacketError::Frame(e))) => {
                        found = Some(Err(connection_err(format!("the hypervisor sent a bad frame: {e}"))));
                        break;
                    }
                    Some(Err(_)) if start.elapsed() >= timeout => {
                        let s = self.stats();
                        found = Some(Err(connection_err(format!(
                            "only damaged packets from {target} for {} s ({} dropped, {} with a bad CRC): \
                             is the line's baud rate the hypervisor's?",
                            timeout.as_secs(),
                            s.dropped,
                            s.bad_crc
                        ))));
                        break;
                    }
                    Some(Err(_)) => {}
                }
            }
            self.pending.drain(..used);
            if let Some(result) = found {
                return result;
            }
            self.stream.set_read_timeout(Some(timeout)).map_err(|e| connection_err(e.to_string()))?;
            let Some(n) = read_some(self.stream.as_mut(), &mut buf, target, "")? else {
                return Err(connection_err(format!(
                    "no answer from the hypervisor within {} s on serial {target}",
                    timeout.as_secs()
                )));
            };
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}
