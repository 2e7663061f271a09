//! The control channel: `hvctl` ↔ virtio-vsock ↔ framer (`wire`) ↔ task runtime.
//!
//! The hypervisor listens on `wire::CONTROL_PORT` and serves any number of
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
use alloc::vec::Vec;

use virtio_drivers::device::socket::{SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::PciTransport;
use wire::{ErrorCode, ErrorReply, FrameDecoder, Response};

use crate::drivers::time;
use crate::drivers::virtio::HvHal;
use crate::println;
use crate::services::tasks::{DomainOps, ReplyTo, Runtime, encode_reply};

/// A connection stalled mid-frame this long is closed.
pub const STALL_TIMEOUT_MS: u64 = 5_000;
/// Bytes of replies a connection may have waiting before it is considered dead.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Receive buffer the device advertises per connection (credit): one full frame.
const CONNECTION_BUFFER: u32 = (wire::HEADER_LEN + wire::MAX_FRAME_LEN) as u32;
/// Largest packet we send at once.
const SEND_CHUNK: usize = 4096;

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

/// Counters for the serial log and future stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Connections accepted.
    pub accepted: u64,
    /// Frames received.
    pub frames: u64,
    /// Connections closed for a protocol error, a stall or a dead reader.
    pub closed_for_errors: u64,
}

/// The control server.
pub struct ControlServer {
    manager: Manager,
    connections: BTreeMap<ReplyTo, Connection>,
    next_handle: ReplyTo,
    runtime: Runtime,
    /// Connections closed since the last poll (the runtime frees their uploads).
    closed: Vec<ReplyTo>,
    /// What happened so far.
    pub counters: Counters,
}

impl core::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ControlServer").field("connections", &self.connections.len()).finish_non_exhaustive()
    }
}

/// Why the control channel could not start.
#[derive(Debug)]
pub enum ControlError {
    /// No virtio-vsock device on PCI.
    NoDevice,
    /// The device exists but its transport or driver failed.
    Device(alloc::string::String),
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::NoDevice => f.write_str("no virtio-vsock device (PCI 1af4:1053) found"),
            ControlError::Device(e) => write!(f, "virtio-vsock device failed to start: {e}"),
        }
    }
}

impl ControlServer {
    /// Find the vsock device, start its driver and listen on the control port.
    pub fn start(runtime: Runtime) -> Result<Self, ControlError> {
        let (found, transport) = crate::drivers::virtio::find(DeviceType::Socket)
            .map_err(|e| ControlError::Device(alloc::format!("{e:?}")))?
            .ok_or(ControlError::NoDevice)?;
        let socket = VirtIOSocket::<HvHal, PciTransport, 4096>::new(transport)
            .map_err(|e| ControlError::Device(alloc::format!("{e:?}")))?;
        let mut manager = VsockConnectionManager::new_with_capacity(socket, CONNECTION_BUFFER);
        manager.listen(wire::CONTROL_PORT);
        println!(
            "CONTROL listening on vsock port {} (guest CID {}, device at PCI {})",
            wire::CONTROL_PORT,
            manager.guest_cid(),
            found.function
        );
        Ok(Self {
            manager,
            connections: BTreeMap::new(),
            next_handle: 1,
            runtime,
            closed: Vec::new(),
            counters: Counters::default(),
        })
    }

    fn handle_for(&self, peer: VsockAddr, port: u32) -> Option<ReplyTo> {
        self.connections.iter().find(|(_, c)| c.peer == peer && c.port == port).map(|(h, _)| *h)
    }

    /// Do whatever is pending (device events, task turns, output); never blocks.
    /// Returns whether anything happened.
    pub fn poll(&mut self, domains: &mut dyn DomainOps) -> bool {
        let mut busy = self.poll_device();
        busy |= self.runtime.run_once(time::uptime_ns(), domains);
        self.runtime.monitor_timers(time::now_ticks(), time::tsc_hz().unwrap_or(0));
        for (to, bytes) in self.runtime.take_outbox() {
            if let Some(c) = self.connections.get_mut(&to) {
                c.output.extend(bytes);
            }
        }
        busy |= self.flush_and_reap();
        for to in core::mem::take(&mut self.closed) {
            self.runtime.connection_closed(to, domains);
        }
        busy
    }

    /// Handle every pending device event. Returns whether anything happened.
    fn poll_device(&mut self) -> bool {
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
                    let handle = self.next_handle;
                    self.next_handle = self.next_handle.wrapping_add(1).max(1);
                    self.connections.insert(
                        handle,
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
                        self.receive(handle);
                    }
                }
                VsockEventType::Disconnected { .. } => {
                    if let Some(handle) = self.handle_for(peer, port) {
                        // Drain what arrived before the disconnect, then forget it.
                        self.receive(handle);
                        self.connections.remove(&handle);
                        self.closed.push(handle);
                    }
                }
                VsockEventType::Connected | VsockEventType::CreditRequest | VsockEventType::CreditUpdate => {}
            }
        }
    }

    /// Move received bytes into the connection's decoder and route whole frames.
    fn receive(&mut self, handle: ReplyTo) {
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
                            self.runtime.route(handle, frame);
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
    /// connections. Returns whether anything was sent.
    fn flush_and_reap(&mut self) -> bool {
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
            self.closed.push(handle);
            if let Some(c) = self.connections.remove(&handle) {
                let _ = self.manager.shutdown(c.peer, c.port);
            }
        }
        sent_any
    }
}
