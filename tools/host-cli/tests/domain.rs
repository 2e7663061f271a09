//! `hvctl domain create` uploads and `hvctl domain console --interactive` on the built
//! binary against a fake hypervisor (`common::fake_hv`, the hybrid-vsock listener the
//! request/response tests share) that answers the core's requests with the protocol's own
//! rules (`wire::UploadTracker` checks every chunk, as the hypervisor does). Its
//! console takes at most [`FIFO`] bytes per input request (like a full UART FIFO) and
//! echoes what it took, upper-cased, to its console ring. The raw-mode test runs hvctl
//! on a pseudo-terminal and reads its mode back. `domain pin` and `create --cpus`
//! against a fake whose vCPUs run on CPUs 0-3 (it refuses others, as the hypervisor does).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use wire::{ErrorCode, ErrorReply, ImageKind, ImageRef, Request, Response, UploadTracker};

mod common;

use common::fake_hv::Fake;
use common::{hvctl, stderr, stdout};

const WINDOW: u32 = 3;
/// Console input bytes the fake's UART takes per request.
const FIFO: usize = 5;

#[derive(Default)]
struct Created {
    name: String,
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    cmdline: String,
    memory_bytes: u64,
    cpus: Option<Vec<u32>>,
}

#[derive(Default)]
struct Hv {
    uploads: BTreeMap<u32, (UploadTracker, Vec<u8>)>,
    next_upload: u32,
    created: Vec<Created>,
    /// Request names in arrival order.
    requests: Vec<String>,
    chunk_lengths: Vec<usize>,
    /// Answer chunks this much later (to cancel mid-way).
    chunk_delay: Duration,
    /// Answer chunk N as accepted without storing it (a hypervisor that lost it): the
    /// next one is then out of order.
    lose_chunk: Option<usize>,
    console: Vec<u8>,
    console_input: Vec<u8>,
    /// Domain 1's state in `DomainList` (empty: running).
    state: String,
    /// Domain 1 finishes (`finished(0)`) when its console input holds this line.
    ends_on: Option<&'static [u8]>,
    /// Domain 1's CPU pinning (`DomainPin`, shown by `DomainList`).
    pinned: Option<Vec<u32>>,
}

/// APIC IDs of the fake machine's CPUs that run vCPUs; pinning elsewhere is refused.
const VCPU_CPUS: [u32; 4] = [0, 1, 2, 3];

struct FakeHv {
    fake: Fake,
    hv: Arc<Mutex<Hv>>,
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvctl-domain-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

impl FakeHv {
    fn start(name: &str, hv: Hv) -> Self {
        let hv = Arc::new(Mutex::new(hv));
        let shared = hv.clone();
        Self { fake: Fake::start(&format!("domain-{name}"), move |r| answer(&shared, r)), hv }
    }

    fn target(&self) -> String {
        self.fake.target()
    }

    fn lock(&self) -> MutexGuard<'_, Hv> {
        self.hv.lock().unwrap()
    }
}

fn refused(msg: String) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::Refused, msg))
}

fn answer(hv: &Mutex<Hv>, request: Request) -> Response {
    let mut h = hv.lock().unwrap();
    h.requests.push(request.name().to_string());
    match request {
        Request::ImageBegin { kind, total_len, crc32c } => {
            match UploadTracker::new(kind, total_len, crc32c, wire::MAX_IMAGE_LEN) {
                Ok(t) => {
                    h.next_upload += 1;
                    let id = h.next_upload;
                    let status = t.status(id, WINDOW);
                    h.uploads.insert(id, (t, Vec::new()));
                    Response::Upload(status)
                }
                Err(e) => Response::Error(e.to_reply(0)),
            }
        }
        Request::ImageChunk { upload, offset, bytes, crc32c } => {
            let n = h.chunk_lengths.len();
            h.chunk_lengths.push(bytes.len());
            let delay = h.chunk_delay;
            let lose = h.lose_chunk == Some(n);
            let Some((t, store)) = h.uploads.get_mut(&upload) else { return refused(format!("no upload {upload}")) };
            if lose {
                return Response::Upload(t.status(upload, WINDOW));
            }
            let result = t.check(offset, &bytes, crc32c).and_then(|()| {
                store.extend_from_slice(&bytes);
                t.commit(&bytes)
            });
            let r = match result {
                Ok(()) => Response::Upload(t.status(upload, WINDOW)),
                Err(e) => Response::Error(e.to_reply(upload)),
            };
            drop(h);
            std::thread::sleep(delay);
            r
        }
        Request::ImageCancel { upload } => match h.uploads.remove(&upload) {
            Some(_) => Response::Done,
            None => refused(format!("no upload {upload}")),
        },
        Request::DomainCreate(spec) => {
            let mut take = |r: &ImageRef, kind: ImageKind| -> Result<Vec<u8>, String> {
                match r {
                    ImageRef::Inline(b) => Ok(b.clone()),
                    ImageRef::Uploaded(id) => match h.uploads.remove(id) {
                        Some((t, bytes)) if t.complete() && t.kind() == kind => Ok(bytes),
                        Some(_) => Err(format!("upload {id} is incomplete or not a {kind}")),
                        None => Err(format!("no upload {id}")),
                    },
                }
            };
            let kernel = match take(&spec.kernel, ImageKind::Kernel) {
                Ok(k) => k,
                Err(e) => return refused(e),
            };
            let initrd = match spec.initrd.as_ref().map(|r| take(r, ImageKind::Initrd)).transpose() {
                Ok(i) => i,
                Err(e) => return refused(e),
            };
            h.created.push(Created {
                name: spec.name,
                kernel,
                initrd,
                cmdline: spec.cmdline,
                memory_bytes: spec.memory_bytes,
                cpus: spec.cpus,
            });
            Response::DomainCreated { id: h.created.len() as u32 }
        }
        Request::DomainConsoleInput { id: 1, bytes } => {
            let n = bytes.len().min(FIFO);
            h.console_input.extend_from_slice(&bytes[..n]);
            let echo = bytes[..n].to_ascii_uppercase();
            h.console.extend_from_slice(&echo);
            if h.ends_on.is_some_and(|line| h.console_input.windows(line.len()).any(|w| w == line)) {
                h.console.extend_from_slice(b"\nreboot: Power down\n");
                h.state = "finished(0)".into();
            }
            Response::ConsoleInput { id: 1, accepted: n as u32 }
        }
        Request::DomainList => {
            let state = if h.state.is_empty() { "running".to_string() } else { h.state.clone() };
            let info = wire::DomainInfo {
                id: 1,
                name: "one".into(),
                state,
                vcpus: 1,
                memory_bytes: 8 << 20,
                exits: Vec::new(),
                runtime_ns: 0,
                unclaimed: Vec::new(),
                cpus: h.pinned.clone(),
            };
            Response::DomainList(wire::DomainListReport { domains: vec![info], free_frames: 0, total_frames: 0 })
        }
        Request::DomainConsole { id: 1, offset } => {
            let from = (offset as usize).min(h.console.len());
            Response::Console(wire::ConsoleChunk {
                id: 1,
                offset: from as u64,
                data: h.console[from..].to_vec(),
                total: h.console.len() as u64,
            })
        }
        Request::DomainPin { id: 1, cpus } => {
            if let Some(bad) = cpus.iter().flatten().find(|c| !VCPU_CPUS.contains(c)) {
                return refused(format!("CPU {bad} does not run vCPUs (they run on CPUs 0-3)"));
            }
            h.pinned = cpus;
            Response::Done
        }
        Request::DomainConsole { id, .. } | Request::DomainConsoleInput { id, .. } | Request::DomainPin { id, .. } => {
            refused(format!("no domain {id}"))
        }
        other => Response::Error(ErrorReply::new(ErrorCode::NotImplemented, format!("fake: {}", other.name()))),
    }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 11) as u8).collect()
}

fn write_file(name: &str, bytes: &[u8]) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn large_kernel_and_initrd_are_uploaded_in_checksummed_chunks() {
    let fake = FakeHv::start("upload", Hv::default());
    let kernel = image(1_500_000, 7);
    let initrd = image(200_001, 13);
    let (k, i) = (write_file("big.elf", &kernel), write_file("initrd.gz", &initrd));
    let o = hvctl(&[
        "--connect",
        &fake.target(),
        "domain",
        "create",
        "--kernel",
        &k,
        "--initrd",
        &i,
        "--memory",
        "256M",
        "--cmdline",
        "console=ttyS0",
        "--name",
        "linux",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["id"], 1);
    assert_eq!(v["uploaded"], true);
    assert_eq!(v["kernel_bytes"], 1_500_000);
    assert_eq!(v["initrd_bytes"], 200_001);
    let h = fake.lock();
    let c = &h.created[0];
    assert!(c.kernel == kernel, "the kernel arrived intact");
    assert!(c.initrd.as_deref() == Some(&initrd[..]), "the initrd arrived intact");
    assert_eq!((c.name.as_str(), c.cmdline.as_str(), c.memory_bytes), ("linux", "console=ttyS0", 256 << 20));
    let chunks = 1_500_000usize.div_ceil(wire::MAX_IMAGE_CHUNK) + 200_001usize.div_ceil(wire::MAX_IMAGE_CHUNK);
    assert_eq!(h.chunk_lengths.len(), chunks);
    assert!(h.chunk_lengths.iter().all(|&n| n > 0 && n <= wire::MAX_IMAGE_CHUNK));
    assert_eq!(h.requests.iter().filter(|r| *r == "image-begin").count(), 2);
    assert!(h.uploads.is_empty(), "both uploads were used by the create");
}

#[test]
fn a_small_kernel_still_goes_inline() {
    let fake = FakeHv::start("inline", Hv::default());
    let kernel = image(30_000, 3);
    let k = write_file("small.elf", &kernel);
    let o = hvctl(&["--connect", &fake.target(), "domain", "create", "--kernel", &k, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((v["uploaded"].as_bool(), v["name"].as_str()), (Some(false), Some("small")));
    let h = fake.lock();
    assert_eq!(h.requests, ["domain-create"]);
    assert!(h.created[0].kernel == kernel);
}

#[test]
fn a_corrupted_chunk_is_refused_with_the_crc_error_and_the_upload_cancelled() {
    let fake = FakeHv::start("corrupt", Hv::default());
    let k = write_file("corrupt.elf", &image(400_000, 5));
    let o = hvctl(&["--connect", &fake.target(), "domain", "create", "--kernel", &k, "--debug-corrupt-chunk", "2"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    let at = 2 * wire::MAX_IMAGE_CHUNK;
    assert!(
        e.starts_with(&format!(
            "hvctl: error: upload of the kernel: the upload chunk was refused: upload 1: CRC-32C mismatch in the \
             chunk at offset {at}"
        )),
        "{e}"
    );
    let h = fake.lock();
    assert!(h.created.is_empty());
    assert_eq!(h.requests.last().map(String::as_str), Some("image-cancel"));
    assert!(h.uploads.is_empty(), "the upload was cancelled");
}

#[test]
fn an_out_of_order_chunk_is_refused_with_the_expected_offset() {
    let fake = FakeHv::start("order", Hv { lose_chunk: Some(1), ..Hv::default() });
    let k = write_file("order.elf", &image(300_000, 9));
    let o = hvctl(&["--connect", &fake.target(), "domain", "create", "--kernel", &k]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    let (got, want) = (2 * wire::MAX_IMAGE_CHUNK, wire::MAX_IMAGE_CHUNK);
    assert!(
        e.contains(&format!(
            "the chunk at offset {got} is out of order: {want} bytes are accepted, so the next chunk must start at \
             offset {want}"
        )),
        "{e}"
    );
    assert!(fake.lock().uploads.is_empty() && fake.lock().created.is_empty());
}

#[test]
fn ctrl_c_cancels_the_upload_on_the_hypervisor() {
    let fake = FakeHv::start("cancel", Hv { chunk_delay: Duration::from_millis(30), ..Hv::default() });
    let k = write_file("slow.elf", &image(6_000_000, 11));
    let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(["--connect", &fake.target(), "domain", "create", "--kernel", &k])
        .env_remove("HVCTL_CONNECT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while fake.lock().chunk_lengths.len() < 5 {
        assert!(start.elapsed() < Duration::from_secs(10), "no chunks arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("Ctrl-C: upload of the kernel cancelled after"), "{}", stderr(&o));
    let h = fake.lock();
    assert!(h.chunk_lengths.len() < 6_000_000 / wire::MAX_IMAGE_CHUNK, "it stopped sending");
    assert_eq!(h.requests.last().map(String::as_str), Some("image-cancel"));
    assert!(h.uploads.is_empty() && h.created.is_empty());
}

/// `hvctl domain console 1 --interactive` against `fake`, on pipes.
fn spawn_console(fake: &FakeHv) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(["--connect", &fake.target(), "domain", "console", "1", "--interactive"])
        .env_remove("HVCTL_CONNECT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn console(fake: &FakeHv, input: &[u8]) -> (Option<i32>, String, String, Duration) {
    let mut child = spawn_console(fake);
    let start = Instant::now();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let o = child.wait_with_output().unwrap();
    (o.status.code(), stdout(&o), stderr(&o), start.elapsed())
}

#[test]
fn interactive_console_from_a_pipe_sends_everything_and_shows_the_echo() {
    let fake = FakeHv::start("console", Hv { console: b"login: ".to_vec(), ..Hv::default() });
    let (code, out, err, _) = console(&fake, b"echo $((6*7))\n");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("press Ctrl-] to leave"), "{err}");
    assert_eq!(out, "login: ECHO $((6*7))\n");
    let h = fake.lock();
    assert_eq!(h.console_input, b"echo $((6*7))\n", "the bytes the FIFO refused were sent again, in order");
    let inputs = h.requests.iter().filter(|r| *r == "domain-console-input").count();
    assert_eq!(inputs, 14usize.div_ceil(FIFO), "one request per FIFO-full");
}

/// A guest that powers off while hvctl is attached: hvctl prints the last output and
/// the state and leaves by itself, though its input is still open (a person at a
/// terminal typing `poweroff -f`).
#[test]
fn interactive_console_leaves_when_the_domain_ends() {
    let fake = FakeHv::start("ends", Hv { ends_on: Some(b"poweroff -f\n"), ..Hv::default() });
    let mut child = spawn_console(&fake);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"poweroff -f\n").unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "hvctl is still attached to a finished domain");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "POWEROFF -F\n\nreboot: Power down\n", "the output up to the end, nothing lost");
    assert!(stderr(&o).contains("hvctl: domain 1 ended: finished(0)"), "{}", stderr(&o));
    assert!(fake.lock().requests.iter().any(|r| r == "domain-list"));
}

#[test]
fn ctrl_right_bracket_leaves_at_once() {
    let fake = FakeHv::start("escape", Hv::default());
    let (code, out, err, took) = console(&fake, b"ab\x1dnot sent");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("left the console of domain 1"), "{err}");
    assert_eq!(out, "AB");
    assert_eq!(fake.lock().console_input, b"ab");
    assert!(took < Duration::from_millis(1400), "it did not wait for the quiet period: {took:?}");
}

#[test]
fn interactive_console_of_a_missing_domain_is_an_error() {
    let fake = FakeHv::start("missing", Hv::default());
    let o = hvctl(&["--connect", &fake.target(), "domain", "console", "9", "--interactive"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(stderr(&o).trim(), "hvctl: error: console: the request was refused: no domain 9");
}

/// On a terminal (a pty here), `--interactive` puts it in raw mode while it runs and
/// gives the saved mode back when it leaves, by Ctrl-] or by SIGTERM.
#[test]
fn raw_mode_on_a_terminal_is_restored_on_leaving() {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    for by_signal in [false, true] {
        let fake = FakeHv::start(if by_signal { "pty-term" } else { "pty-escape" }, Hv::default());
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ICANON | LocalFlags::ECHO));
        let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
            .args(["--connect", &fake.target(), "domain", "console", "1", "--interactive"])
            .env_remove("HVCTL_CONNECT")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while tcgetattr(&pty.slave).unwrap().local_flags.contains(LocalFlags::ICANON) {
            assert!(start.elapsed() < Duration::from_secs(10), "hvctl never put the terminal in raw mode");
            std::thread::sleep(Duration::from_millis(10));
        }
        let raw = tcgetattr(&pty.slave).unwrap();
        assert!(!raw.local_flags.intersects(LocalFlags::ECHO | LocalFlags::ISIG));
        if by_signal {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        } else {
            nix::unistd::write(&pty.master, b"hi\x1d").unwrap();
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let after = tcgetattr(&pty.slave).unwrap();
        assert_eq!(after.local_flags, before.local_flags, "the terminal's mode is back (signal: {by_signal})");
        assert_eq!(after.input_flags, before.input_flags);
        if by_signal {
            assert!(stderr(&o).contains("SIGTERM: left the console of domain 1"), "{}", stderr(&o));
        } else {
            assert_eq!(stdout(&o), "HI");
            assert!(stderr(&o).contains("press Ctrl-] to leave\r\n"), "raw mode ends lines with CR LF");
        }
    }
}

#[test]
fn create_with_cpus_sends_the_list() {
    let fake = FakeHv::start("create-cpus", Hv::default());
    let k = write_file("pinned.elf", &image(1000, 3));
    for (arg, want) in [(Some("0-1,3"), Some(vec![0, 1, 3])), (Some("all"), None), (None, None)] {
        let mut args = vec!["--connect".to_string(), fake.target(), "domain".into(), "create".into()];
        args.extend(["--kernel".into(), k.clone()]);
        if let Some(a) = arg {
            args.extend(["--cpus".into(), a.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = hvctl(&args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(fake.lock().created.last().unwrap().cpus, want, "--cpus {arg:?}");
    }
}

#[test]
fn pin_and_unpin_show_in_the_list() {
    let fake = FakeHv::start("pin", Hv::default());
    let t = fake.target();
    let list = || {
        let o = hvctl(&["--connect", &t, "domain", "list"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        let header = out.lines().next().unwrap().to_string();
        let row = out.lines().nth(1).unwrap().to_string();
        let at = header.find(" CPUS ").expect("a CPUS column") + 1;
        let o = hvctl(&["--connect", &t, "domain", "list", "--json"]);
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        (row[at..].split_whitespace().next().unwrap().to_string(), v["domains"][0]["cpus"].clone())
    };
    assert_eq!(list(), ("any".to_string(), Value::Null), "a new domain runs anywhere");

    let o = hvctl(&["--connect", &t, "domain", "pin", "1", "1-2,0"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "domain 1 pinned to CPUs 0-2\n");
    assert_eq!(fake.lock().pinned, Some(vec![0, 1, 2]));
    assert_eq!(list(), ("0-2".to_string(), serde_json::json!([0, 1, 2])));

    let o = hvctl(&["--connect", &t, "domain", "pin", "1", "all"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "domain 1 unpinned (any CPU)\n");
    assert_eq!(fake.lock().pinned, None);
    assert_eq!(list(), ("any".to_string(), Value::Null));
    assert_eq!(fake.lock().requests.iter().filter(|r| *r == "domain-pin").count(), 2);
}

#[test]
fn pinning_to_a_cpu_without_vcpus_or_a_missing_domain_is_refused() {
    let fake = FakeHv::start("pin-refused", Hv { pinned: Some(vec![1]), ..Hv::default() });
    let o = hvctl(&["--connect", &fake.target(), "domain", "pin", "1", "2,7"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(
        stderr(&o).trim(),
        "hvctl: error: pin: the request was refused: CPU 7 does not run vCPUs (they run on CPUs 0-3)"
    );
    assert_eq!(fake.lock().pinned, Some(vec![1]), "nothing changed");
    let o = hvctl(&["--connect", &fake.target(), "domain", "pin", "9", "0"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(stderr(&o).trim(), "hvctl: error: pin: the request was refused: no domain 9");
}

#[test]
fn bad_cpu_lists_are_refused_before_anything_is_sent() {
    let fake = FakeHv::start("pin-parse", Hv::default());
    let t = fake.target();
    let k = write_file("parse.elf", &image(1000, 5));
    for (list, why) in [
        ("3-1", "3-1: a range runs from low to high (1-3?)"),
        ("x", "\"x\" is not a CPU number or a range like 1-3"),
        ("", "an empty CPU list"),
        ("0,,1", "has an empty item"),
        ("0-256", "more than 256 CPUs"),
    ] {
        let o = hvctl(&["--connect", &t, "domain", "pin", "1", list]);
        assert_eq!(o.status.code(), Some(2), "pin {list:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.starts_with(&format!("hvctl: error: pin 1 {list}: ")) && e.contains(why), "{e}");
        let o = hvctl(&["--connect", &t, "domain", "create", "--kernel", &k, "--cpus", list]);
        assert_eq!(o.status.code(), Some(2), "create --cpus {list:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.starts_with(&format!("hvctl: error: --cpus {list}: ")) && e.contains(why), "{e}");
    }
    assert!(fake.lock().requests.is_empty(), "{:?}", fake.lock().requests);
}
