//! The control channel: `hvctl` ↔ a transport ↔ framer (`wire`) ↔ task runtime.
//!
//! One [`Runtime`] is served by up to two transports at once, either or both present:
//! virtio-vsock ([`VsockTransport`], below) and a serial line
//! ([`SerialTransport`], `serial_control.rs`). Every client (a vsock connection, a
//! serial session) gets a reply handle from one [`Handles`] counter, so handles are
//! unique across transports and the runtime's replies and upload ownership need not
//! know which transport a client came by.
//!
//! The vsock transport listens on `wire::CONTROL_PORT` and serves any number of
//! connections at once, polling the device (interrupts are off). Each connection has
//! its own frame decoder and output queue, so one client never blocks another:
//! - a frame the decoder refuses (bad magic, wrong version, oversize length: all
//!   decided from the header, before the payload is buffered) is answered with a typed
//!   error where the header allows and the connection is closed;
//! - a connection that stops halfway through a frame for longer than
//!   [`STALL_TIMEOUT_MS`] gets a `Timeout` error and is closed;
//! - output waits in the connection's queue while the peer has no credit, and a peer
//!   whose queue exceeds [`MAX_PENDING_OUTPUT`] (it stopped reading) is closed.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::device::socket::{SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::PciTransport;
use wire::{ErrorCode, ErrorReply, Frame, FrameDecoder, Response};

use crate::drivers::time;
use crate::drivers::virtio::HvHal;
use crate::services::serial_control::SerialTransport;
use crate::services::tasks::{DomainOps, MachineInfo, ReplyTo, Runtime, encode_reply};

/// A connection stalled mid-frame this long is closed.
pub const STALL_TIMEOUT_MS: u64 = 5_000;
/// Bytes of replies a connection may have waiting before it is considered dead.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Receive buffer the device advertises per connection (credit): one full frame.
const CONNECTION_BUFFER: u32 = (wire::HEADER_LEN + wire::MAX_FRAME_LEN) as u32;
/// Largest packet we send at once.
const SEND_CHUNK: usize = 4096;

/// Reply handles for every client of every transport: never 0, never reused until the
/// counter wraps (after 2^32 - 1 clients).
#[derive(Debug)]
pub struct Handles {
    next: ReplyTo,
}

impl Handles {
    /// The first handle is 1.
    pub const fn new() -> Self {
        Self { next: 1 }
    }

    /// A fresh handle.
    pub fn allocate(&mut self) -> ReplyTo {
        let handle = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        handle
    }
}

impl Default for Handles {
    fn default() -> Self {
        Self::new()
    }
}

/// What a transport hands the server: a request from a client, or a client gone (the
/// runtime frees its uploads).
#[derive(Debug)]
pub enum Input {
    /// A decoded frame from client `ReplyTo`.
    Request(ReplyTo, Frame),
    /// Client `ReplyTo` is gone.
    Closed(ReplyTo),
}

type Manager = VsockConnectionManager<HvHal, PciTransport, 4096>;

struct Connection {
    peer: VsockAddr,
    port: u32,
    decoder: FrameDecoder,
    output: VecDeque<u8>,
    /// TSC when the decoder last went from empty to holding a partial frame.
    partial_since: Option<u64>,
    /// Close once the output is flushed.
    closing: bool,
}

/// Counters of the vsock transport, for the serial log and future stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Connections accepted.
    pub accepted: u64,
    /// Frames received.
    pub frames: u64,
    /// Connections closed for a protocol error, a stall or a dead reader.
    pub closed_for_errors: u64,
}

/// Why the vsock transport could not start.
#[derive(Debug)]
pub enum ControlError {
    /// No virtio-vsock device on PCI.
    NoDevice,
    /// The device exists but its transport or driver failed.
    Device(String),
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::NoDevice => f.write_str("no virtio-vsock device (PCI 1af4:1053) found"),
            ControlError::Device(e) => write!(f, "virtio-vsock device failed to start: {e}"),
        }
    }
}

/// The control channel on virtio-vsock: many connections, each its own client.
pub struct VsockTransport {
    manager: Manager,
    connections: BTreeMap<ReplyTo, Connection>,
    /// What happened so far.
    pub counters: Counters,
}

impl core::fmt::Debug for VsockTransport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VsockTransport").field("connections", &self.connections.len()).finish_non_exhaustive()
    }
}

impl VsockTransport {
    /// Find the vsock device, start its driver and listen on the control port.
    pub fn start() -> Result<Self, ControlError> {
        let (found, transport) = crate::drivers::virtio::find(DeviceType::Socket)
            .map_err(|e| ControlError::Device(alloc::format!("{e:?}")))?
            .ok_or(ControlError::NoDevice)?;
        let socket = VirtIOSocket::<HvHal, PciTransport, 4096>::new(transport)
            .map_err(|e| ControlError::Device(alloc::format!("{e:?}")))?;
        let mut manager = VsockConnectionManager::new_with_capacity(socket, CONNECTION_BUFFER);
        manager.listen(wire::CONTROL_PORT);
        crate::println!(
            "CONTROL listening on vsock port {} (guest CID {}, device at PCI {})",
            wire::CONTROL_PORT,
            manager.guest_cid(),
            found.function
        );
        Ok(Self { manager, connections: BTreeMap::new(), counters: Counters::default() })
    }

    /// The line for `Info`'s `control` list.
    pub fn describe(&self) -> String {
        alloc::format!("vsock port {} (CID {})", wire::CONTROL_PORT, self.manager.guest_cid())
    }

    fn handle_for(&self, peer: VsockAddr, port: u32) -> Option<ReplyTo> {
        self.connections.iter().find(|(_, c)| c.peer == peer && c.port == port).map(|(h, _)| *h)
    }

    /// Whether `to` is one of this transport's connections.
    pub fn owns(&self, to: ReplyTo) -> bool {
        self.connections.contains_key(&to)
    }

    /// Queue reply bytes for connection `to`, if it is one of ours.
    pub fn reply(&mut self, to: ReplyTo, bytes: Vec<u8>) -> bool {
        match self.connections.get_mut(&to) {
            Some(c) => {
                c.output.extend(bytes);
                true
            }
            None => false,
        }
    }

    /// Handle every pending device event: requests and closed connections go to
    /// `inputs`. Returns whether anything happened.
    pub fn poll_device(&mut self, handles: &mut Handles, inputs: &mut Vec<Input>) -> bool {
        let mut any = false;
        loop {
            let event = match self.manager.poll() {
                Ok(Some(event)) => event,
                Ok(None) => return any,
                Err(e) => {
                    // A packet the manager could not place (e.g. for a connection it
                    // already dropped); the device itself keeps working.
                    log::warn!("vsock poll: {e:?}");
                    return any;
                }
            };
            any = true;
            let (peer, port) = (event.source, event.destination.port);
            match event.event_type {
                VsockEventType::ConnectionRequest => {
                    self.connections.insert(
                        handles.allocate(),
                        Connection {
                            peer,
                            port,
                            decoder: FrameDecoder::new(),
                            output: VecDeque::new(),
                            partial_since: None,
                            closing: false,
                        },
                    );
                    self.counters.accepted += 1;
                }
                VsockEventType::Received { .. } => {
                    if let Some(handle) = self.handle_for(peer, port) {
                        self.receive(handle, inputs);
                    }
                }
                VsockEventType::Disconnected { .. } => {
                    if let Some(handle) = self.handle_for(peer, port) {
                        // Drain what arrived before the disconnect, then forget it.
                        self.receive(handle, inputs);
                        self.connections.remove(&handle);
                        inputs.push(Input::Closed(handle));
                    }
                }
                VsockEventType::Connected | VsockEventType::CreditRequest | VsockEventType::CreditUpdate => {}
            }
        }
    }

    /// Move received bytes into the connection's decoder and pass whole frames on.
    fn receive(&mut self, handle: ReplyTo, inputs: &mut Vec<Input>) {
        let Some(c) = self.connections.get_mut(&handle) else { return };
        let mut buf = [0u8; 4096];
        loop {
            let n = match self.manager.recv(c.peer, c.port, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut input = &buf[..n];
            while !input.is_empty() && !c.closing {
                let taken = c.decoder.push(input);
                input = &input[taken..];
                while let Some(result) = c.decoder.next_frame() {
                    match result {
                        Ok(frame) => {
                            self.counters.frames += 1;
                            inputs.push(Input::Request(handle, frame));
                        }
                        Err(err) => {
                            // The header alone was enough to refuse it; answer if we
                            // can, then close (the decoder is poisoned).
                            let mut reply = Vec::new();
                            if err.encode_reply(&mut reply).is_ok() {
                                c.output.extend(reply);
                            }
                            c.closing = true;
                            self.counters.closed_for_errors += 1;
                            break;
                        }
                    }
                }
                if taken == 0 {
                    break;
                }
            }
            if c.closing {
                break;
            }
        }
        let _ = self.manager.update_credit(c.peer, c.port);
        c.partial_since = match (c.decoder.buffered(), c.partial_since) {
            (0, _) => None,
            (_, Some(t)) => Some(t),
            (_, None) => Some(time::now_ticks()),
        };
    }

    /// Send queued output as credit allows; close finished, stalled and dead
    /// connections (their handles go to `inputs`). Returns whether anything was sent.
    pub fn flush_and_reap(&mut self, inputs: &mut Vec<Input>) -> bool {
        let mut sent_any = false;
        let stall_ticks = time::ms_to_ticks(STALL_TIMEOUT_MS);
        let now = time::now_ticks();
        let mut to_close = Vec::new();
        for (&handle, c) in self.connections.iter_mut() {
            if let (Some(since), Some(limit)) = (c.partial_since, stall_ticks)
                && !c.closing
                && now.wrapping_sub(since) > limit
            {
                let reply = ErrorReply::new(
                    ErrorCode::Timeout,
                    alloc::format!("no complete frame within {STALL_TIMEOUT_MS} ms; closing the connection"),
                );
                c.output.extend(encode_reply(0, &Response::Error(reply)));
                c.closing = true;
                self.counters.closed_for_errors += 1;
            }
            while !c.output.is_empty() {
                let n = c.output.len().min(SEND_CHUNK);
                let chunk: Vec<u8> = c.output.iter().take(n).copied().collect();
                match self.manager.send(c.peer, c.port, &chunk) {
                    Ok(()) => {
                        c.output.drain(..n);
                        sent_any = true;
                    }
                    Err(virtio_drivers::Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => break,
                    Err(_) => {
                        // The peer is gone or the connection broke: drop its output.
                        c.output.clear();
                        c.closing = true;
                        break;
                    }
                }
            }
            if c.output.len() > MAX_PENDING_OUTPUT {
                c.output.clear();
                c.closing = true;
                self.counters.closed_for_errors += 1;
            }
            if c.closing && c.output.is_empty() {
                to_close.push(handle);
            }
        }
        for handle in to_close {
            inputs.push(Input::Closed(handle));
            if let Some(c) = self.connections.remove(&handle) {
                let _ = self.manager.shutdown(c.peer, c.port);
            }
        }
        sent_any
    }
}

/// The control server: the runtime and the transports that reach it.
pub struct ControlServer {
    runtime: Runtime,
    vsock: Option<VsockTransport>,
    serial: Option<SerialTransport>,
    handles: Handles,
    /// Requests and closed clients not yet handed to the runtime.
    inputs: Vec<Input>,
}

impl core::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ControlServer")
            .field("vsock", &self.vsock)
            .field("serial", &self.serial.is_some())
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Serve `machine`'s runtime on the transports given (`None` when there is none);
    /// `Info` lists them. `handles` must be the counter the transports took their
    /// first handles from.
    pub fn new(
        mut machine: MachineInfo,
        vsock: Option<VsockTransport>,
        serial: Option<SerialTransport>,
        handles: Handles,
    ) -> Option<Self> {
        if vsock.is_none() && serial.is_none() {
            return None;
        }
        machine.control =
            vsock.iter().map(VsockTransport::describe).chain(serial.iter().map(|s| s.describe())).collect();
        Some(Self { runtime: Runtime::new(machine), vsock, serial, handles, inputs: Vec::new() })
    }

    /// Do whatever is pending (device events, serial input, task turns, output);
    /// never blocks. Returns whether anything happened.
    pub fn poll(&mut self, domains: &mut dyn DomainOps) -> bool {
        let mut busy = false;
        if let Some(v) = self.vsock.as_mut() {
            busy |= v.poll_device(&mut self.handles, &mut self.inputs);
        }
        if let Some(s) = self.serial.as_mut() {
            busy |= s.receive(time::now_ticks(), &mut self.handles, &mut self.inputs);
        }
        self.hand_over(domains);
        busy |= self.runtime.run_once(time::uptime_ns(), domains);
        self.runtime.monitor_timers(time::now_ticks(), time::tsc_hz().unwrap_or(0));
        for (to, bytes) in self.runtime.take_outbox() {
            if let Some(s) = self.serial.as_mut()
                && s.owns(to)
            {
                s.reply(to, &bytes, &mut self.handles, &mut self.inputs);
            } else if let Some(v) = self.vsock.as_mut() {
                // Not a live client of either: a reply to one that has gone.
                v.reply(to, bytes);
            }
        }
        if let Some(s) = self.serial.as_mut() {
            // A turn of the tasks can take a while on a slow machine: empty the receive
            // FIFO again before it can fill.
            s.drain();
            busy |= s.flush();
        }
        if let Some(v) = self.vsock.as_mut() {
            busy |= v.flush_and_reap(&mut self.inputs);
        }
        self.hand_over(domains);
        busy
    }

    /// Route pending requests and tell the runtime about clients that are gone.
    fn hand_over(&mut self, domains: &mut dyn DomainOps) {
        for input in core::mem::take(&mut self.inputs) {
            match input {
                Input::Request(to, frame) => self.runtime.route(to, frame),
                Input::Closed(to) => self.runtime.connection_closed(to, domains),
            }
        }
    }

    /// Empty the serial receive FIFO into its buffer (cheap: a few port reads); for
    /// callers between polls.
    pub fn drain_serial(&mut self) {
        if let Some(s) = self.serial.as_mut() {
            s.drain();
        }
    }

    /// Whether a serial client used the line within `window` ticks (or replies are
    /// still leaving): the main loop then polls often enough for the UART's FIFO.
    pub fn serial_active(&self, window: u64) -> bool {
        self.serial.as_ref().is_some_and(|s| s.active(time::now_ticks(), window))
    }

    /// The vsock transport's counters, if it runs.
    pub fn vsock_counters(&self) -> Option<Counters> {
        self.vsock.as_ref().map(|v| v.counters)
    }
}
