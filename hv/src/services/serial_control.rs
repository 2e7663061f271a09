//! The control channel over a serial line (COM2 by default): the packets of
//! `wire::serial` on a 16550, for machines without virtio-vsock (Bochs, bare metal)
//! and beside it where both exist.
//!
//! [`SerialSession`] is the protocol, pure and host-tested: bytes in, requests and
//! session ends out, replies in, line bytes out. [`SerialTransport`] puts it on a
//! [`BufferedUart`]. [`SerialOption`] is the boot option.
//!
//! Sessions (wire/src/serial.rs): a line has no connect or disconnect, so
//! - frames that come before any `Open` are served under an implicit session;
//! - `Open{nonce}` ends the current session (the runtime frees its uploads, its
//!   replies still in a mailbox are dropped when they come out) and starts a new one,
//!   answered by `Opened{nonce, MAX_ENCODED_PACKET}`; an `Open` repeating the current
//!   session's nonce (a client that resent it) is answered again without a new session;
//! - a good packet whose frame has a bad header is answered with that error and the
//!   line stays usable; any other bad packet (noise, dropped bytes, a partial packet
//!   a vanished client left) is dropped and counted;
//! - replies leave as packets; an output queue that grows past
//!   [`MAX_PENDING_OUTPUT`] (replies produced faster than the line moves them, for a
//!   client that is no longer reading) is dropped with its session, and counted.
//!
//! Polling: the hypervisor polls the UART (no interrupts). While a session is
//! [`active`](SerialSession::active) the main loop drains the receive FIFO at least
//! every [`crate::init`]'s serial poll period; see there why.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use wire::serial::{MAX_ENCODED_PACKET, Packet, PacketCounters, PacketDecoder, PacketError};

use crate::drivers::uart::{BASE_BAUD, BufferedUart, COM1, COM2, Uart, UartCounters, UartError};
use crate::services::control::{Handles, Input};
use crate::services::tasks::ReplyTo;

/// Bytes of reply packets the line may have waiting before the client is taken to be
/// gone: at 115200 baud a megabyte is 90 s of line time.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// The boot option `hv.serial=off` or `hv.serial=0xBASE[@BAUD]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialOption {
    /// No serial control channel.
    Off,
    /// Serve on the UART at `base` (if one answers there) at `baud`.
    Port {
        /// I/O base.
        base: u16,
        /// Line speed.
        baud: u32,
    },
}

impl SerialOption {
    /// Without the option: COM2 at 115200 baud, when a UART is there.
    pub const DEFAULT: Self = Self::Port { base: COM2, baud: BASE_BAUD };

    /// The `hv.serial=` option of `cmdline` (the last one wins, as on a kernel command
    /// line); [`Self::DEFAULT`] without one.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, String> {
        let Some(value) = cmdline.split_whitespace().filter_map(|w| w.strip_prefix("hv.serial=")).next_back() else {
            return Ok(Self::DEFAULT);
        };
        if value == "off" {
            return Ok(Self::Off);
        }
        let (port, baud) = match value.split_once('@') {
            Some((port, baud)) => {
                let baud =
                    baud.parse().map_err(|_| alloc::format!("hv.serial={value}: `{baud}` is not a baud rate"))?;
                (port, baud)
            }
            None => (value, BASE_BAUD),
        };
        let base = port
            .strip_prefix("0x")
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            .ok_or_else(|| alloc::format!("hv.serial={value}: expected off or 0xBASE[@BAUD], e.g. 0x2f8@115200"))?;
        if base == COM1 {
            return Err(alloc::format!("hv.serial={value}: COM1 (0x3f8) is the log console"));
        }
        crate::drivers::uart::divisor(baud).map_err(|e| alloc::format!("hv.serial={value}: {e}"))?;
        Ok(Self::Port { base, baud })
    }
}

/// `COM2` for the legacy bases, else the base in hex.
pub fn port_name(base: u16) -> String {
    match base {
        0x3F8 => "COM1".into(),
        0x2F8 => "COM2".into(),
        0x3E8 => "COM3".into(),
        0x2E8 => "COM4".into(),
        other => alloc::format!("port {other:#x}"),
    }
}

/// What a [`SerialSession`] has seen, beyond its packet decoder's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Sessions opened by `Open`.
    pub opens: u64,
    /// Request frames handed to the runtime.
    pub frames: u64,
    /// Good packets with a bad frame header (answered with the error).
    pub frame_errors: u64,
    /// Replies for a session that has ended (dropped).
    pub stale_replies: u64,
    /// Output queues dropped because they grew past [`MAX_PENDING_OUTPUT`].
    pub output_overflows: u64,
    /// Packets a client should never send (`Opened`).
    pub unexpected: u64,
}

/// The serial control protocol of one line: no I/O, no clock of its own.
#[derive(Debug)]
pub struct SerialSession {
    decoder: PacketDecoder,
    /// The session replies go to now.
    handle: ReplyTo,
    /// The nonce of the `Open` that began it (`None`: the implicit session).
    nonce: Option<u64>,
    /// Encoded packets waiting for the transmitter.
    output: VecDeque<u8>,
    /// When bytes last arrived (the caller's clock).
    last_input: Option<u64>,
    /// What happened so far.
    pub counters: SessionCounters,
}

impl SerialSession {
    /// A line with its implicit session (a handle from `handles`).
    pub fn new(handles: &mut Handles) -> Self {
        Self {
            decoder: PacketDecoder::new(),
            handle: handles.allocate(),
            nonce: None,
            output: VecDeque::new(),
            last_input: None,
            counters: SessionCounters::default(),
        }
    }

    /// The current session's reply handle.
    pub fn handle(&self) -> ReplyTo {
        self.handle
    }

    /// The packet decoder's counts (packets, drops, CRC errors, discarded bytes).
    pub fn packet_counters(&self) -> PacketCounters {
        self.decoder.counters
    }

    /// Bytes waiting to go out.
    pub fn output(&mut self) -> &mut VecDeque<u8> {
        &mut self.output
    }

    /// Whether the line is in use: bytes came in within `window` ticks of `now`, or
    /// replies are still leaving.
    pub fn active(&self, now: u64, window: u64) -> bool {
        !self.output.is_empty() || self.last_input.is_some_and(|t| now.wrapping_sub(t) <= window)
    }

    /// Take bytes read off the line at time `now`: requests and ended sessions go to
    /// `inputs`, answers the line needs at once (Opened, frame errors) to the output.
    pub fn receive(&mut self, bytes: &[u8], now: u64, handles: &mut Handles, inputs: &mut Vec<Input>) {
        if bytes.is_empty() {
            return;
        }
        self.last_input = Some(now);
        for &byte in bytes {
            let Some(result) = self.decoder.push(byte) else { continue };
            match result {
                Ok(Packet::Frame(frame)) => {
                    self.counters.frames += 1;
                    inputs.push(Input::Request(self.handle, frame));
                }
                Ok(Packet::Open { nonce }) => self.open(nonce, handles, inputs),
                Ok(Packet::Opened { .. }) => self.counters.unexpected += 1,
                Err(PacketError::Frame(e)) => {
                    self.counters.frame_errors += 1;
                    let mut reply = Vec::new();
                    if e.encode_reply(&mut reply).is_ok() {
                        self.queue_frames(&reply);
                    }
                }
                // Noise, damage, a partial packet: the decoder counted it; the next
                // 0x00 starts afresh.
                Err(_) => {}
            }
        }
    }

    fn open(&mut self, nonce: u64, handles: &mut Handles, inputs: &mut Vec<Input>) {
        if self.nonce != Some(nonce) {
            self.end_session(handles, inputs);
            self.nonce = Some(nonce);
            self.counters.opens += 1;
            // Late answers to the previous client: its successor ignores everything
            // before its Opened, so they would only delay it.
            self.clear_output();
        }
        let mut packet = Vec::new();
        wire::serial::encode_opened(nonce, MAX_ENCODED_PACKET as u32, &mut packet);
        self.output.extend(packet);
    }

    /// Close the current session (its handle goes to `inputs`) and start an implicit one.
    fn end_session(&mut self, handles: &mut Handles, inputs: &mut Vec<Input>) {
        inputs.push(Input::Closed(self.handle));
        self.handle = handles.allocate();
        self.nonce = None;
    }

    /// Drop queued output; a 0x00 ends the packet the line may be in the middle of.
    fn clear_output(&mut self) {
        self.output.clear();
        self.output.push_back(0);
    }

    /// Queue the reply `bytes` (whole wire frames) for session `to`. Replies for an
    /// ended session are dropped. Returns whether `to` is this line's session.
    pub fn reply(&mut self, to: ReplyTo, bytes: &[u8], handles: &mut Handles, inputs: &mut Vec<Input>) -> bool {
        if to != self.handle {
            self.counters.stale_replies += 1;
            return false;
        }
        self.queue_frames(bytes);
        if self.output.len() > MAX_PENDING_OUTPUT {
            self.counters.output_overflows += 1;
            self.clear_output();
            self.end_session(handles, inputs);
        }
        true
    }

    fn queue_frames(&mut self, bytes: &[u8]) {
        let mut packets = Vec::with_capacity(bytes.len().saturating_add(bytes.len() / 254).saturating_add(8));
        // The runtime hands over whole frames; a remainder would be a bug there, and
        // half a frame is no use to the client.
        wire::serial::encode_frames(bytes, &mut packets);
        self.output.extend(packets);
    }
}

/// The serial control channel on a UART.
#[derive(Debug)]
pub struct SerialTransport {
    uart: BufferedUart,
    session: SerialSession,
    baud: u32,
    received: Vec<u8>,
}

impl SerialTransport {
    /// Take the UART at `base` for the control channel, if one answers there.
    ///
    /// Must only be called on the machine: it touches I/O ports.
    pub fn start(base: u16, baud: u32, handles: &mut Handles) -> Result<Self, UartError> {
        // SAFETY: `SerialOption` never names COM1 (the console's); the other legacy COM
        // bases hold a 16550 or nothing on the PCs this image targets, and nothing else
        // in the hypervisor drives them. `probe` checks the scratch register first.
        let uart = unsafe { Uart::probe(base, baud)? };
        Ok(Self { uart: BufferedUart::new(uart), session: SerialSession::new(handles), baud, received: Vec::new() })
    }

    /// The line for `Info`'s `control` list, e.g. `serial COM2 0x2f8 115200 baud`.
    pub fn describe(&self) -> String {
        alloc::format!("serial {} {:#x} {} baud", port_name(self.uart.base()), self.uart.base(), self.baud)
    }

    /// The `CONTROL listening …` marker's words, e.g. `COM2 (0x2f8, 115200 baud)`.
    pub fn listening(&self) -> String {
        alloc::format!("{} ({:#x}, {} baud)", port_name(self.uart.base()), self.uart.base(), self.baud)
    }

    /// Move the receive FIFO into the software buffer (cheap; call it often).
    pub fn drain(&mut self) -> usize {
        self.uart.poll_rx()
    }

    /// Drain the UART and decode what came: requests and ended sessions to `inputs`.
    /// Returns whether any byte came.
    pub fn receive(&mut self, now: u64, handles: &mut Handles, inputs: &mut Vec<Input>) -> bool {
        self.uart.poll_rx();
        if self.uart.rx_buffered() == 0 {
            return false;
        }
        self.received.clear();
        self.uart.take_rx(&mut self.received);
        let opens = self.session.counters.opens;
        self.session.receive(&self.received, now, handles, inputs);
        if self.session.counters.opens != opens {
            self.log_session();
        }
        true
    }

    /// One line per new session with the line's health so far (tests read it: an
    /// emulator's line must show no overruns and no dropped packets unless a test
    /// damaged them on purpose). Printed from the poll, never from an exit path.
    fn log_session(&self) {
        let (s, p, u) = self.counters();
        crate::println!(
            "CONTROL serial session {} opened (line so far: {} packets, {} dropped, {} bad CRC, {} frame errors, \
             {} overruns, {} bytes dropped by the driver)",
            s.opens,
            p.packets,
            p.dropped,
            p.bad_crc,
            s.frame_errors,
            u.overruns,
            u.rx_dropped
        );
    }

    /// Queue a reply for `to` if it is this line's session.
    pub fn reply(&mut self, to: ReplyTo, bytes: &[u8], handles: &mut Handles, inputs: &mut Vec<Input>) -> bool {
        self.session.reply(to, bytes, handles, inputs)
    }

    /// Whether `to` is this line's current session.
    pub fn owns(&self, to: ReplyTo) -> bool {
        self.session.handle() == to
    }

    /// Feed the transmitter. Returns whether a byte left.
    pub fn flush(&mut self) -> bool {
        self.uart.send_from(self.session.output()) > 0
    }

    /// Whether a client used the line within `window` ticks of `now` (or replies are
    /// still leaving).
    pub fn active(&self, now: u64, window: u64) -> bool {
        self.session.active(now, window)
    }

    /// The session's and the UART's counters.
    pub fn counters(&self) -> (SessionCounters, PacketCounters, UartCounters) {
        (self.session.counters, self.session.packet_counters(), self.uart.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use wire::{Request, Response};

    fn request(id: u64, request: &Request) -> Vec<u8> {
        let mut frame = Vec::new();
        wire::encode_request(id, request, &mut frame).unwrap();
        let mut line = Vec::new();
        wire::serial::encode_frame_packet(&frame, &mut line);
        line
    }

    fn open(nonce: u64) -> Vec<u8> {
        let mut line = Vec::new();
        wire::serial::encode_open(nonce, &mut line);
        line
    }

    /// Decode what the session sent, as a client would.
    fn sent(session: &mut SerialSession) -> Vec<Packet> {
        let mut decoder = PacketDecoder::new();
        let bytes: Vec<u8> = session.output().drain(..).collect();
        bytes.iter().filter_map(|&b| decoder.push(b)).filter_map(Result::ok).collect()
    }

    fn requests(inputs: &[Input]) -> Vec<(ReplyTo, u64)> {
        inputs
            .iter()
            .filter_map(|i| match i {
                Input::Request(to, f) => Some((*to, f.request_id)),
                Input::Closed(_) => None,
            })
            .collect()
    }

    fn closed(inputs: &[Input]) -> Vec<ReplyTo> {
        inputs.iter().filter_map(|i| if let Input::Closed(h) = i { Some(*h) } else { None }).collect()
    }

    fn pong(id: u64) -> Vec<u8> {
        crate::services::tasks::encode_reply(id, &Response::Pong { payload: vec![1, 2, 3] })
    }

    #[test]
    fn frames_before_any_open_are_served_under_the_implicit_session() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let implicit = s.handle();
        let mut inputs = Vec::new();
        s.receive(&request(7, &Request::Info), 0, &mut handles, &mut inputs);
        assert_eq!(requests(&inputs), vec![(implicit, 7)]);
        assert!(s.reply(implicit, &pong(7), &mut handles, &mut inputs));
        match sent(&mut s).as_slice() {
            [Packet::Frame(f)] => assert_eq!(f.request_id, 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_closes_the_previous_session_and_answers_opened() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let first = s.handle();
        let mut inputs = Vec::new();
        s.receive(&open(42), 5, &mut handles, &mut inputs);
        assert_eq!(closed(&inputs), vec![first], "the implicit session ends");
        let second = s.handle();
        assert_ne!(second, first);
        assert_eq!(sent(&mut s), vec![Packet::Opened { nonce: 42, max_packet: MAX_ENCODED_PACKET as u32 }]);
        // A late reply to the first session is dropped, one to the new one goes out.
        assert!(!s.reply(first, &pong(1), &mut handles, &mut inputs));
        assert!(s.reply(second, &pong(2), &mut handles, &mut inputs));
        assert!(matches!(sent(&mut s).as_slice(), [Packet::Frame(f)] if f.request_id == 2));
        assert_eq!(s.counters.stale_replies, 1);
        // A new client: the session of 42 ends.
        inputs.clear();
        s.receive(&open(43), 6, &mut handles, &mut inputs);
        assert_eq!(closed(&inputs), vec![second]);
        assert_eq!(s.counters.opens, 2);
    }

    #[test]
    fn a_resent_open_is_answered_again_without_a_new_session() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        s.receive(&open(9), 0, &mut handles, &mut inputs);
        let session = s.handle();
        s.receive(&request(1, &Request::Info), 0, &mut handles, &mut inputs);
        s.receive(&open(9), 0, &mut handles, &mut inputs);
        assert_eq!(s.handle(), session, "same nonce, same session: request 1's reply still reaches it");
        assert_eq!(closed(&inputs).len(), 1, "only the implicit session ended");
        let opened = sent(&mut s).into_iter().filter(|p| matches!(p, Packet::Opened { nonce: 9, .. })).count();
        assert_eq!(opened, 2);
    }

    #[test]
    fn open_drops_the_previous_clients_output_and_ends_its_partial_packet() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        let old = s.handle();
        s.reply(old, &pong(1), &mut handles, &mut inputs);
        // Half of that packet is already on the line.
        let half = s.output().len() / 2;
        let mut line: Vec<u8> = s.output().drain(..half).collect();
        s.receive(&open(3), 0, &mut handles, &mut inputs);
        line.extend(s.output().drain(..));
        let mut decoder = PacketDecoder::new();
        let got: Vec<_> = line.iter().filter_map(|&b| decoder.push(b)).collect();
        assert!(got[0].is_err(), "the cut packet is ended and fails: {got:?}");
        assert_eq!(got[1], Ok(Packet::Opened { nonce: 3, max_packet: MAX_ENCODED_PACKET as u32 }));
        assert_eq!(got.len(), 2, "the rest of the old reply is gone");
    }

    #[test]
    fn a_bad_frame_header_is_answered_and_the_line_stays_usable() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        let mut frame = Vec::new();
        wire::encode_request(11, &Request::Info, &mut frame).unwrap();
        frame[2] = 0x77; // version
        let mut line = Vec::new();
        wire::serial::encode_frame_packet(&frame, &mut line);
        line.extend(request(12, &Request::Info));
        s.receive(&line, 0, &mut handles, &mut inputs);
        assert_eq!(requests(&inputs), vec![(s.handle(), 12)]);
        match sent(&mut s).as_slice() {
            [Packet::Frame(f)] => {
                assert_eq!(f.request_id, 11);
                match wire::decode_response(f).unwrap() {
                    Response::Error(e) => assert_eq!(e.code, wire::ErrorCode::UnsupportedVersion),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.counters.frame_errors, 1);
    }

    #[test]
    fn noise_dropped_bytes_and_cut_packets_lose_only_themselves() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        let mut line = b"line noise \xff\xfe\x01".to_vec();
        line.push(0);
        line.extend(request(1, &Request::Info));
        let mut damaged = request(2, &Request::Ping { payload: vec![9; 50] });
        damaged.drain(10..14);
        line.extend(damaged);
        line.extend(request(3, &Request::Info));
        // A client vanished mid-packet; the next one starts with Open's leading 0x00.
        let cut = request(4, &Request::Info);
        line.extend(&cut[..cut.len() / 2]);
        line.extend(open(5));
        line.extend(request(6, &Request::Info));
        s.receive(&line, 0, &mut handles, &mut inputs);
        let got: Vec<u64> = requests(&inputs).into_iter().map(|(_, id)| id).collect();
        assert_eq!(got, vec![1, 3, 6]);
        assert_eq!(s.packet_counters().dropped, 3, "noise, the damaged packet, the cut packet");
        assert_eq!(s.counters.opens, 1);
    }

    #[test]
    fn a_client_that_stops_reading_loses_its_output_and_session() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        let first = s.handle();
        let big = crate::services::tasks::encode_reply(1, &Response::Pong { payload: vec![0x5a; 60_000] });
        let mut replies = 0;
        while s.counters.output_overflows == 0 {
            assert!(s.reply(first, &big, &mut handles, &mut inputs));
            replies += 1;
            assert!(replies < 100, "the queue never overflowed");
        }
        assert!(s.output().len() <= 1, "dropped");
        assert_eq!(closed(&inputs), vec![first]);
        assert_ne!(s.handle(), first);
    }

    #[test]
    fn activity_is_recent_input_or_pending_output() {
        let mut handles = Handles::new();
        let mut s = SerialSession::new(&mut handles);
        let mut inputs = Vec::new();
        assert!(!s.active(1000, 100), "a line nobody used");
        s.receive(&[0], 1000, &mut handles, &mut inputs);
        assert!(s.active(1100, 100));
        assert!(!s.active(1101, 100));
        let h = s.handle();
        s.reply(h, &pong(1), &mut handles, &mut inputs);
        assert!(s.active(5000, 100), "replies still leaving");
    }

    #[test]
    fn boot_option() {
        assert_eq!(SerialOption::from_cmdline(""), Ok(SerialOption::DEFAULT));
        assert_eq!(SerialOption::DEFAULT, SerialOption::Port { base: 0x2f8, baud: 115_200 });
        assert_eq!(SerialOption::from_cmdline("cpuid-dump hv.serial=off"), Ok(SerialOption::Off));
        assert_eq!(
            SerialOption::from_cmdline("hv.serial=0x3e8"),
            Ok(SerialOption::Port { base: 0x3e8, baud: 115_200 })
        );
        assert_eq!(
            SerialOption::from_cmdline("hv.serial=off hv.serial=0x2f8@57600"),
            Ok(SerialOption::Port { base: 0x2f8, baud: 57_600 }),
            "the last one wins"
        );
        for bad in ["hv.serial=0x3f8", "hv.serial=2f8", "hv.serial=0x2f8@fast", "hv.serial=0x2f8@100000", "hv.serial="]
        {
            assert!(SerialOption::from_cmdline(bad).is_err(), "{bad}");
        }
        assert!(SerialOption::from_cmdline("hv.serial=0x3f8").unwrap_err().contains("log console"));
        assert_eq!(port_name(0x2f8), "COM2");
        assert_eq!(port_name(0x1000), "port 0x1000");
    }
}
