//! hvctl over the serial transports (`unix:PATH`, `tcp:HOST:PORT`, `serial:DEVICE`),
//! the built binary against a fake hypervisor in a thread that speaks `wire::serial`
//! as COM2 does: it answers `Open` with `Opened`, `Ping` with `Pong` and `Info` with a
//! report, and can misbehave the ways a line does (lose an `Open`, carry a previous
//! session's late answers, noise, a corrupt packet). The pseudo-terminal case puts the
//! fake on the master side and hands hvctl `serial:/dev/pts/N`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use wire::serial::{MAX_ENCODED_PACKET, Packet, PacketDecoder, encode_frame_packet, encode_opened};
use wire::{ErrorCode, ErrorReply, InfoReport, MemoryUse, Request, Response};

mod common;

use common::{hvctl, stderr, stdout};

/// How the fake line misbehaves.
#[derive(Clone, Copy, Default)]
struct Script {
    /// Ignore this many `Open`s first (the line lost them).
    lose_opens: usize,
    /// Answer no `Open` at all (COM2 not served).
    mute: bool,
    /// Before `Opened`: a previous session's late Pong for request 1, its closing error
    /// (id 0), an `Opened` for another nonce, and noise.
    stale_before_opened: bool,
    /// Before each answer: noise bytes, a 0x00, then the answer with one byte changed.
    damage_answers: bool,
    /// Right after `Opened`: an error with id 0 (the hypervisor ends the session).
    hang_up: bool,
    /// Answer with a frame of protocol version 99 in an intact packet.
    bad_frame: bool,
}

/// What the fake saw.
#[derive(Default)]
struct Seen {
    opens: usize,
    requests: Vec<&'static str>,
}

const CONTROL: [&str; 2] = ["vsock port 5000 (CID 3)", "serial COM2 0x2f8 115200 baud"];

fn info_report() -> InfoReport {
    InfoReport {
        hv_version: "0.1.0 (fake)".into(),
        protocol_version: wire::PROTOCOL_VERSION,
        uptime_ns: 2_000_000_000,
        capabilities: vec![("vendor".into(), "AuthenticAMD".into()), ("virt".into(), "svm".into())],
        cpus: 1,
        memory_bytes: 512 << 20,
        services: Vec::new(),
        memory_use: MemoryUse::default(),
        control: CONTROL.iter().map(|c| c.to_string()).collect(),
        cpu_list: vec![wire::CpuInfo { apic_id: 0, state: wire::CpuState::Boot, package: Some(0), socket: Some(0) }],
    }
}

fn frame_packet(id: u64, response: &Response, out: &mut Vec<u8>) {
    let mut bytes = Vec::new();
    wire::encode_response(id, response, &mut bytes).unwrap();
    encode_frame_packet(&bytes, out);
}

/// Serve one line until it closes.
fn serve(mut line: impl Read + Write, script: Script, seen: &Mutex<Seen>) {
    let mut decoder = PacketDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match line.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::new();
        for &byte in &buf[..n] {
            match decoder.push(byte) {
                Some(Ok(Packet::Open { nonce })) => {
                    let opens = {
                        let mut s = seen.lock().unwrap();
                        s.opens += 1;
                        s.opens
                    };
                    if script.mute || opens <= script.lose_opens {
                        continue;
                    }
                    if script.stale_before_opened {
                        frame_packet(1, &Response::Pong { payload: b"previous session".to_vec() }, &mut out);
                        let bye = ErrorReply::new(ErrorCode::BadFrame, "previous client went away");
                        frame_packet(0, &Response::Error(bye), &mut out);
                        encode_opened(!nonce, MAX_ENCODED_PACKET as u32, &mut out);
                        out.extend_from_slice(b"\x07junk");
                        out.push(0);
                    }
                    encode_opened(nonce, MAX_ENCODED_PACKET as u32, &mut out);
                    if script.hang_up {
                        let bye = ErrorReply::new(ErrorCode::Internal, "the control server restarted");
                        frame_packet(0, &Response::Error(bye), &mut out);
                    }
                }
                Some(Ok(Packet::Frame(frame))) => {
                    let request = wire::decode_request(&frame).unwrap();
                    seen.lock().unwrap().requests.push(request.name());
                    let response = match request {
                        Request::Ping { payload } => Response::Pong { payload },
                        Request::Info => Response::Info(Box::new(info_report())),
                        other => Response::Error(ErrorReply::new(ErrorCode::NotImplemented, other.name())),
                    };
                    let mut answer = Vec::new();
                    frame_packet(frame.request_id, &response, &mut answer);
                    if script.damage_answers {
                        out.extend_from_slice(b"line noise \xff\x13\x11");
                        out.push(0);
                        let mut corrupt = answer.clone();
                        let i = corrupt.len() / 2;
                        corrupt[i] = if corrupt[i] == 0x55 { 0x56 } else { 0x55 };
                        out.extend_from_slice(&corrupt);
                    }
                    if script.bad_frame {
                        let mut bytes = Vec::new();
                        wire::encode_response(frame.request_id, &response, &mut bytes).unwrap();
                        bytes[2] = 99; // the header's protocol version
                        answer.clear();
                        encode_frame_packet(&bytes, &mut answer);
                    }
                    out.extend_from_slice(&answer);
                }
                _ => {}
            }
        }
        if line.write_all(&out).is_err() {
            return;
        }
    }
}

/// A fake hypervisor on one kind of serial stream.
struct FakeLine {
    /// What hvctl is given.
    target: String,
    /// What hvctl prints for it.
    shown: String,
    seen: Arc<Mutex<Seen>>,
    /// Kept open so the pty master never sees a hang-up between hvctl runs.
    _slave: Option<std::fs::File>,
}

impl FakeLine {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    fn unix(name: &str, script: Script) -> Self {
        let dir = std::env::temp_dir().join(format!("hvctl-serial-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path: PathBuf = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                serve(conn, script, &shared);
            }
        });
        let target = format!("unix:{}", path.display());
        Self { shown: target.clone(), target, seen, _slave: None }
    }

    fn tcp(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                serve(conn, script, &shared);
            }
        });
        let target = format!("tcp:127.0.0.1:{port}");
        Self { shown: target.clone(), target, seen, _slave: None }
    }

    fn pty(script: Script) -> Self {
        use nix::fcntl::OFlag;
        use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
        use std::os::unix::fs::OpenOptionsExt;
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname_r(&master).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OFlag::O_NOCTTY.bits())
            .open(&name)
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        std::thread::spawn(move || serve(master, script, &shared));
        // The default rate, which hvctl shows.
        Self { target: format!("serial:{name}"), shown: format!("serial:{name}@115200"), seen, _slave: Some(slave) }
    }
}

fn json_of(o: &std::process::Output) -> Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn ping_ok(line: &FakeLine, count: &str) {
    let o = hvctl(&["--connect", &line.target, "ping", "-c", count]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let pongs = out.lines().filter(|l| l.starts_with(&format!("pong from {}: seq=", line.shown))).count();
    assert_eq!(pongs.to_string(), count, "{out}");
}

#[test]
fn handshake_and_ping_over_a_unix_socket() {
    let line = FakeLine::unix("ping", Script::default());
    ping_ok(&line, "3");
    assert_eq!(line.seen().opens, 1, "one Open when it is answered at once");
    assert_eq!(line.seen().requests, ["ping", "ping", "ping"]);
    // A second client on the same line opens its own session.
    ping_ok(&line, "1");
    assert_eq!(line.seen().opens, 2);
}

#[test]
fn handshake_and_ping_over_tcp() {
    let line = FakeLine::tcp(Script::default());
    ping_ok(&line, "2");
    assert_eq!(line.seen().requests, ["ping", "ping"]);
}

#[test]
fn handshake_and_info_over_a_pseudo_terminal() {
    let line = FakeLine::pty(Script::default());
    assert!(line.target.starts_with("serial:/dev/pts/"), "{}", line.target);
    ping_ok(&line, "2");
    let o = hvctl(&["--connect", &line.target, "info", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["target"], line.shown.as_str());
    assert_eq!(v["connected"]["transport"], "serial");
    assert_eq!(v["connected"]["target"], line.shown.as_str());
    assert_eq!(v["control"], serde_json::json!(CONTROL));
    assert_eq!(line.seen().requests, ["ping", "ping", "info"]);
}

#[test]
fn info_names_the_transport_and_the_control_list() {
    let line = FakeLine::unix("info", Script::default());
    let o = hvctl(&["--connect", &line.target, "info"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let connected = format!("connected     serial {} (COBS packets, CRC-32C)", line.target);
    assert!(out.lines().any(|l| l == connected), "{out}");
    assert!(out.lines().any(|l| l == format!("control       {}", CONTROL[0])), "{out}");
    assert!(out.lines().any(|l| l == format!("              {}", CONTROL[1])), "{out}");
    let v = json_of(&hvctl(&["--connect", &line.target, "info", "--json"]));
    assert_eq!(v["connected"]["transport"], "serial");
    assert_eq!(v["connected"]["framing"], "COBS packets, CRC-32C");
    assert_eq!(v["connected"]["max_packet"], MAX_ENCODED_PACKET);
    assert_eq!(v["connected"]["dropped_packets"], 0);
    assert_eq!(v["control"], serde_json::json!(CONTROL));
    assert_eq!(v["protocol_version"], wire::PROTOCOL_VERSION);
}

#[test]
fn a_previous_sessions_packets_before_opened_are_ignored() {
    let line = FakeLine::tcp(Script { stale_before_opened: true, ..Script::default() });
    // The stale Pong answers "request 1" with other bytes and the stale error has id 0:
    // either would fail the ping if hvctl took it.
    ping_ok(&line, "2");
    let v = json_of(&hvctl(&["--connect", &line.target, "info", "--json"]));
    assert_eq!(v["connected"]["dropped_packets"], 0, "what came before Opened is not counted: {v}");
}

#[test]
fn noise_and_a_corrupt_packet_are_dropped_and_counted() {
    let line = FakeLine::unix("noise", Script { damage_answers: true, ..Script::default() });
    ping_ok(&line, "3");
    let o = hvctl(&["--connect", &line.target, "info", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    // The noise and the damaged copy of the info answer.
    assert_eq!(v["connected"]["dropped_packets"], 2, "{v}");
    assert_eq!(v["connected"]["packets"], 1, "only the intact answer: {v}");
    assert_eq!(v["control"], serde_json::json!(CONTROL));
    let out = stdout(&hvctl(&["--connect", &line.target, "info"]));
    assert!(out.contains("(COBS packets, CRC-32C; 2 damaged packets dropped,"), "{out}");
}

#[test]
fn a_lost_open_is_sent_again() {
    let line = FakeLine::pty(Script { lose_opens: 1, ..Script::default() });
    let start = Instant::now();
    ping_ok(&line, "1");
    assert_eq!(line.seen().opens, 2);
    assert!(start.elapsed().as_millis() >= 900, "the second Open waits for the first's answer");
}

#[test]
fn a_line_that_never_answers_says_so() {
    let line = FakeLine::unix("mute", Script { mute: true, ..Script::default() });
    let o = hvctl(&["--connect", &line.target, "--connect-timeout", "0.2", "ping"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    let want = format!("hvctl: error: no answer on serial {} after 3 attempts to open a session: ", line.target);
    assert!(e.starts_with(&want), "{e}");
    assert!(e.contains("is the hypervisor serving COM2"), "{e}");
    assert_eq!(line.seen().opens, 3);
    assert!(line.seen().requests.is_empty());
}

#[test]
fn an_error_with_id_0_after_opened_ends_the_session() {
    let line = FakeLine::tcp(Script { hang_up: true, ..Script::default() });
    let o = hvctl(&["--connect", &line.target, "ping", "-c", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(
            "hvctl: error: the hypervisor closed the connection: the hypervisor failed internally: \
             the control server restarted"
        ),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_intact_packet_with_a_bad_frame_is_an_error() {
    let line = FakeLine::unix("badframe", Script { bad_frame: true, ..Script::default() });
    let o = hvctl(&["--connect", &line.target, "ping", "-c", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("hvctl: error: the hypervisor sent a bad frame: "), "{}", stderr(&o));
}

#[test]
fn unreachable_serial_targets_are_named() {
    let o = hvctl(&["--connect", "unix:/nonexistent/hv/com2.sock", "--connect-timeout", "0.2", "info"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("hvctl: error: /nonexistent/hv/com2.sock does not exist: is the emulator running"),
        "{}",
        stderr(&o)
    );
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = hvctl(&["--connect", &format!("tcp:127.0.0.1:{port}"), "--connect-timeout", "0.2", "info"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).starts_with(&format!("hvctl: error: nobody serves tcp 127.0.0.1:{port}: ")), "{}", stderr(&o));
    let o = hvctl(&["--connect", "serial:/nonexistent/ttyS1", "info"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), "hvctl: error: /nonexistent/ttyS1 does not exist: is the serial device name right?");
    let o = hvctl(&["--connect", "serial:/dev/null", "info"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), "hvctl: error: /dev/null is not a serial line (not a terminal device)");
}

#[test]
fn bad_serial_targets_are_usage_errors() {
    for (target, why) in [
        ("serial:/dev/ttyS1@14400", "unsupported baud rate 14400: use one of"),
        ("serial:/dev/ttyS1@", "the baud rate \"\" is not a number"),
        ("tcp:localhost", "expected tcp:HOST:PORT"),
        ("tcp:localhost:0", "the TCP port must be 1 to 65535"),
        ("unix:/tmp/x:", "nothing after the last ':'"),
        ("com2:/dev/ttyS1", "expected one of unix:PATH:PORT"),
    ] {
        let o = hvctl(&["--connect", target, "info"]);
        assert_eq!(o.status.code(), Some(2), "{target}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with(&format!("hvctl: error: bad target {target:?}: ")), "{e}");
        assert!(e.contains(why), "{target}: {e}");
    }
}

#[test]
fn a_vsock_socket_given_without_its_port_gets_a_hint() {
    // Like vhost-device-vsock given bytes that are no `CONNECT <port>` line: it hangs up.
    let dir = std::env::temp_dir().join(format!("hvctl-serial-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.vsock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
        }
    });
    let target = format!("unix:{}", path.display());
    let o = hvctl(&["--connect", &target, "ping"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "hvctl: error: {target} closed the connection before the serial session opened \
             (for vsock through vhost-device-vsock, add the port: unix:PATH:PORT)"
        )
    );
}
