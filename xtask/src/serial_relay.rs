//! A relay between Bochs' COM2 socket and any number of successive clients on a unix
//! socket, so COM2 on Bochs looks like COM2 on QEMU: a raw byte stream at
//! `RUNDIR/com2.sock` that one client at a time may use, and the next one after it.
//!
//! Why a relay: Bochs 2.7's serial socket modes serve one peer for Bochs' lifetime.
//! Found by trying them (com2 on a socket, the hypervisor on Bochs):
//! - `mode=socket-server` blocks Bochs' start in `accept()` until a client connects
//!   (the emulation does not begin, not even COM1's log file is created), then closes
//!   its listening socket: a second client is refused (ECONNREFUSED);
//! - when that client disconnects, Bochs dies at the next byte it sends to the port
//!   (SIGPIPE on a write to the closed socket; OVMF prints its console on COM2 too, so
//!   that comes soon), with no message;
//! - `mode=socket-client` connects once, when Bochs starts, to a listener that must
//!   already be there (without one the port stays unconnected for good).
//!
//! So the relay listens on TCP 127.0.0.1 (an ephemeral port) before Bochs starts,
//! Bochs (`socket-client`) connects to it at start, and the relay holds that one
//! connection for Bochs' lifetime. Clients come and go on the unix socket, one at a
//! time like QEMU's `-chardev socket,server=on`: a second client waits in the listen
//! backlog until the first has gone. Bytes from COM2 while no client is there are
//! dropped, as QEMU drops them. Bochs reads its socket only while its receive FIFO has
//! room, so what a client writes waits in the socket buffers, never overruns the UART.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Result;

/// How often the relay's threads look at the stop flag.
const TICK: Duration = Duration::from_millis(50);

type Shared<T> = Arc<Mutex<Option<T>>>;

/// The relay's threads and its two endpoints; dropping it stops them.
#[derive(Debug)]
pub struct SerialRelay {
    /// The unix socket clients connect to.
    pub socket: PathBuf,
    /// The TCP port on 127.0.0.1 Bochs connects to (`com2: mode=socket-client`).
    pub tcp_port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl SerialRelay {
    /// Listen on `socket` (a unix socket, replaced if it exists) and on an ephemeral
    /// TCP port of 127.0.0.1 for Bochs; relay once Bochs has connected.
    pub fn start(socket: &Path) -> Result<Self> {
        let tcp = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("serial relay: bind 127.0.0.1: {e}"))?;
        let tcp_port = tcp.local_addr().map_err(|e| format!("serial relay: {e}"))?.port();
        let _ = std::fs::remove_file(socket);
        let unix = UnixListener::bind(socket).map_err(|e| format!("serial relay: bind {}: {e}", socket.display()))?;
        tcp.set_nonblocking(true).map_err(|e| format!("serial relay: {e}"))?;
        unix.set_nonblocking(true).map_err(|e| format!("serial relay: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let bochs: Shared<TcpStream> = Arc::new(Mutex::new(None));
        let client: Shared<UnixStream> = Arc::new(Mutex::new(None));
        let threads = vec![
            {
                let (stop, bochs, client) = (stop.clone(), bochs.clone(), client.clone());
                std::thread::spawn(move || from_bochs(&tcp, &bochs, &client, &stop))
            },
            {
                let (stop, bochs, client) = (stop.clone(), bochs, client);
                std::thread::spawn(move || from_clients(&unix, &bochs, &client, &stop))
            },
        ];
        Ok(Self { socket: socket.to_path_buf(), tcp_port, stop, threads })
    }

    /// Stop relaying and remove the socket (idempotent).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for SerialRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accept Bochs' one connection, then copy what COM2 sends to the client of the
/// moment (or nowhere).
fn from_bochs(listener: &TcpListener, bochs: &Shared<TcpStream>, client: &Shared<UnixStream>, stop: &AtomicBool) {
    let mut stream = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => return,
        }
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_nodelay(true);
    if let (Ok(writer), Ok(mut slot)) = (stream.try_clone(), bochs.lock()) {
        *slot = Some(writer);
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buf) {
            Ok(0) => return, // Bochs has gone.
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(_) => return,
        };
        if let Ok(mut slot) = client.lock()
            && let Some(c) = slot.as_mut()
            && c.write_all(&buf[..n]).is_err()
        {
            // The client went away; the other thread sees its end and takes the next.
            *slot = None;
        }
    }
}

/// Take clients one after another and copy what each writes to Bochs.
fn from_clients(listener: &UnixListener, bochs: &Shared<TcpStream>, client: &Shared<UnixStream>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => return,
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(TICK));
        if let (Ok(writer), Ok(mut slot)) = (stream.try_clone(), client.lock()) {
            *slot = Some(writer);
        }
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    continue;
                }
                Err(_) => break,
            };
            // Bochs connects as it starts, long before a client can know the
            // hypervisor listens; bytes before that have nowhere to go.
            if let Ok(mut slot) = bochs.lock()
                && let Some(b) = slot.as_mut()
                && b.write_all(&buf[..n]).is_err()
            {
                *slot = None;
            }
        }
        if let Ok(mut slot) = client.lock() {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for Bochs: connects to the relay and echoes every byte back.
    fn fake_bochs(port: u16) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })
    }

    fn round_trip(socket: &Path, msg: &[u8]) -> Vec<u8> {
        let mut c = UnixStream::connect(socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn successive_clients_share_the_one_connection() {
        let dir = std::env::temp_dir().join(format!("xtask-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("com2.sock");
        let mut relay = SerialRelay::start(&socket).unwrap();
        let bochs = fake_bochs(relay.tcp_port);
        // Let the fake connect before the first client writes.
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..3u8 {
            let msg = [b'a' + i; 10];
            assert_eq!(round_trip(&socket, &msg), msg, "client {i}");
            // The next client is taken once the relay has seen this one go.
            std::thread::sleep(Duration::from_millis(150));
        }
        relay.stop();
        assert!(!socket.exists());
        drop(bochs);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
