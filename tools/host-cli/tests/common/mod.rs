//! What the hvctl integration tests share: running the built binary (without the
//! caller's `$HVCTL_CONNECT` or a `target/xtask/hvctl.connect` in reach) and reading
//! its output.
#![allow(dead_code)] // each test crate uses its own subset

use std::process::{Command, Output};

/// Run the built hvctl with `args`, from the temporary directory.
pub fn hvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(args)
        .env_remove("HVCTL_CONNECT")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

/// Its standard output.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fake hypervisor on the hybrid vsock socket (vhost-device-vsock's `CONNECT <port>`
/// / `OK <port>` handshake, then length-prefixed frames): every request frame is
/// answered by `answer`. Serves connections one after another until the test process
/// ends. Returns its `unix:PATH:5000` target.
pub fn fake_hv(name: &str, answer: impl Fn(&wire::Request) -> wire::Response + Send + 'static) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = std::env::temp_dir().join(format!("hvctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.vsock"));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let Ok(read_half) = conn.try_clone() else { continue };
            let mut reader = BufReader::new(read_half);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || conn.write_all(b"OK 5000\n").is_err() {
                continue;
            }
            let mut decoder = wire::FrameDecoder::new();
            let mut buf = [0u8; 4096];
            'conn: loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                while let Some(Ok(frame)) = decoder.next_frame() {
                    let response = match wire::decode_request(&frame) {
                        Ok(req) => answer(&req),
                        Err(e) => wire::Response::Error(e),
                    };
                    let mut out = Vec::new();
                    wire::encode_response(frame.request_id, &response, &mut out).unwrap();
                    if conn.write_all(&out).is_err() {
                        break 'conn;
                    }
                }
            }
        }
    });
    format!("unix:{}:5000", path.display())
}

/// A fake hypervisor answering `HostCpuid` with the records of the dump file `dump`
/// (and an error to anything else).
pub fn fake_cpuid_hv(name: &str, dump: &str) -> String {
    let text = std::fs::read_to_string(dump).unwrap();
    let d = levelling::parse_dump(&text).unwrap();
    let records: Vec<wire::CpuidLeaf> =
        d.records.iter().map(|r| wire::CpuidLeaf { leaf: r.leaf, subleaf: r.subleaf, regs: r.regs }).collect();
    let source = format!("fake hv serving {name}");
    fake_hv(name, move |req| match req {
        wire::Request::HostCpuid => {
            wire::Response::HostCpuid(wire::HostCpuidReport { source: source.clone(), records: records.clone() })
        }
        other => wire::Response::Error(wire::ErrorReply::new(wire::ErrorCode::NotImplemented, other.name())),
    })
}
