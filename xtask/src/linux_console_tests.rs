//! A Linux guest's shell through the control channel: `linux-console-interactive`.
//!
//! | test | hv.test | run by default | passes when |
//! |---|---|---|---|
//! | `linux-console-interactive` | shell | yes | a Linux domain created with `hvctl domain create --kernel --initrd` (uploaded over vsock into pool frames) prints `HV-SHELL-READY`; through `hvctl domain console --interactive`, `echo $((6*7))` typed into its UART gives a line `42` back; `poweroff -f` typed next ends the domain as finished(0), and hvctl leaves by itself saying so |
//!
//! hvctl's stdin is a pipe the test writes to (hvctl sends its bytes as they come,
//! the guest's UART receiver takes 16 at a time) and its stdout a pipe a thread reads,
//! so the test sees the shell's answer while the console is still attached, as a
//! person at a terminal would. The expression is evaluated by the guest's shell: the
//! typed line (echoed back by the tty) holds no `42`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::emulator::{Platform, RunConfig, Session};
use crate::image::Esp;
use crate::linux::{self, LinuxAssets};
use crate::systest::{build_hvctl, hvctl_output, stopped_serving, wait_for, wait_serving};
use crate::{Result, tools};

/// The test's name, for `--filter`.
pub const NAME: &str = "linux-console-interactive";
/// From `domain create` to `HV-SHELL-READY` (a boot under TCG: about 20 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// From typing a line to seeing its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The line typed, and the line the shell must answer with.
const QUESTION: &str = "echo $((6*7))";
const ANSWER: &str = "42";

/// Run `linux-console-interactive` unless `filter` leaves it out; (passed, failed).
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    if filter.is_some_and(|f| !NAME.contains(f)) {
        return Ok((0, 0));
    }
    let assets = linux::ensure_linux_assets()?;
    let platform = Platform::Qemu { cpu: "EPYC".into() };
    tools::ensure(&platform)?;
    let hvctl = build_hvctl()?;
    println!("systest {NAME} on {platform} with virtio-vsock (Linux {}, hv.test=shell) ...", assets.kernel_release);
    let config = RunConfig {
        name: NAME.into(),
        timeout: BOOT_TIMEOUT + ANSWER_TIMEOUT * 3,
        cmdline: String::new(),
        echo: false,
        vsock: true,
        domains: None,
    };
    let start = Instant::now();
    let mut session = Session::spawn(&platform, esp, &config)?;
    let result = match wait_serving(&mut session, Duration::from_secs(platform.default_timeout_secs())) {
        Err(wait) => Err(format!("the control channel did not come up ({wait})")),
        Ok(()) => {
            let socket = session.vsock_socket.clone().ok_or("no vsock socket")?;
            let target = format!("unix:{}:{}", socket.display(), wire::CONTROL_PORT);
            shell(&hvctl, &target, &assets)
        }
    };
    let stopped = stopped_serving(NAME, "hypervisor", &session);
    session.stop();
    match result {
        Ok(detail) if stopped == 0 => {
            println!("systest {NAME} ... ok ({:.1} s; {detail})", start.elapsed().as_secs_f64());
            Ok((1, 0))
        }
        other => {
            if let Err(e) = other {
                println!("systest {NAME} ... FAILED after {:.1} s\n  - {e}", start.elapsed().as_secs_f64());
            }
            crate::linux_tests::print_serial_tail(&session.serial(), &session.dir, 60);
            Ok((0, 1))
        }
    }
}

/// hvctl against `target`, judged: its stdout, or why it failed.
fn hvctl(bin: &Path, target: &str, args: &[&str]) -> Result<String> {
    let (code, stdout, stderr) = hvctl_output(bin, &[&["--connect", target], args].concat())?;
    if code != Some(0) {
        return Err(format!("hvctl {} exited with {code:?}: {}", args.join(" "), stderr.trim()));
    }
    Ok(stdout)
}

/// The state of domain `id` in `hvctl domain list --json` (`None` if it is not listed).
fn state(bin: &Path, target: &str, id: u64) -> Result<Option<String>> {
    let text = hvctl(bin, target, &["domain", "list", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("domain list --json: {e}: {text}"))?;
    Ok(v["domains"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id))
        .and_then(|d| d["state"].as_str().map(String::from)))
}

/// `hvctl domain console ID --interactive` with both ends piped; what it prints is
/// collected by a thread.
struct Attached {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Attached {
    fn start(bin: &Path, target: &str, id: u64) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["--connect", target, "domain", "console", &id.to_string(), "--interactive"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut stdout = child.stdout.take().ok_or("hvctl has no stdout pipe")?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut o) = sink.lock() {
                    o.extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(Self { child, out })
    }

    fn output(&self) -> String {
        self.out.lock().map(|o| String::from_utf8_lossy(&o).into_owned()).unwrap_or_default()
    }

    fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().ok_or("hvctl's stdin is closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("typing {line:?} into hvctl: {e}"))?;
        stdin.flush().map_err(|e| format!("typing {line:?} into hvctl: {e}"))
    }

    /// Wait until the output after byte `from` has a line equal to `want` (the guest's
    /// tty ends lines with `\r\n`); the time it took.
    fn wait_line(&mut self, from: usize, want: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let out = self.output();
            if out.get(from..).unwrap_or("").lines().any(|l| l.trim() == want) {
                return Ok(start.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("hvctl left the console ({status}) before the guest printed {want:?}: {out:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("no line {want:?} within {} s; the console printed {:?}", timeout.as_secs(), self.output()))
    }

    /// Wait for hvctl to leave by itself, its input still open (as a person's terminal
    /// would be): it does when the domain has ended. Its stderr.
    fn wait_exit(mut self, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| format!("hvctl: {e}"))? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                if !status.success() {
                    return Err(format!("hvctl console --interactive exited with {status}: {err}"));
                }
                return Ok(err);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "hvctl console --interactive was still attached {} s after `poweroff -f`; it printed {:?}",
                    timeout.as_secs(),
                    self.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Create the Linux domain through hvctl, use its shell, power it off.
fn shell(bin: &Path, target: &str, assets: &LinuxAssets) -> Result<String> {
    let path = |p: &PathBuf| p.display().to_string();
    let (kernel, initrd) = (path(&assets.kernel), path(&assets.initrd));
    let created = Instant::now();
    let out = hvctl(
        bin,
        target,
        &[
            "domain",
            "create",
            "--name",
            "linux",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 quiet panic=-1 hv.test=shell",
            "--json",
        ],
    )?;
    let upload = created.elapsed();
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("create --json: {e}: {out}"))?;
    let id = v["id"].as_u64().ok_or_else(|| format!("create gave no id: {v}"))?;
    if v["uploaded"] != true {
        return Err(format!("the {} byte kernel was expected to be uploaded in chunks: {v}", v["kernel_bytes"]));
    }
    let mut console = String::new();
    wait_for("HV-SHELL-READY on the domain's console", BOOT_TIMEOUT.as_secs(), || {
        console = hvctl(bin, target, &["domain", "console", &id.to_string()])?;
        if let Some(l) = console.lines().find(|l| l.contains("HV-LINUX-FAIL")) {
            return Err(format!("the guest failed: {l}"));
        }
        Ok(console.lines().any(|l| l.trim() == "HV-SHELL-READY"))
    })
    .map_err(|e| format!("{e}; console: {console:?}"))?;
    let ready = created.elapsed();
    let mut attached = Attached::start(bin, target, id)?;
    // What the console already held is printed first; the answer must come after it.
    std::thread::sleep(Duration::from_millis(500));
    let before = attached.output().len();
    attached.type_line(QUESTION)?;
    let answered = attached.wait_line(before, ANSWER, ANSWER_TIMEOUT)?;
    attached.type_line("poweroff -f")?;
    let stderr = attached.wait_exit(ANSWER_TIMEOUT)?;
    let end = state(bin, target, id)?;
    if end.as_deref() != Some("finished(0)") {
        return Err(format!("after `poweroff -f` the domain is {end:?}, expected finished(0)"));
    }
    let left = format!("hvctl: domain {id} ended: finished(0)");
    if !stderr.contains(&left) {
        return Err(format!("hvctl left without saying {left:?}: {stderr:?}"));
    }
    hvctl(bin, target, &["domain", "destroy", &id.to_string()])?;
    Ok(format!(
        "{} + {} bytes uploaded in {:.1} s; shell ready at {:.1} s; `{QUESTION}` answered `{ANSWER}` in {:.2} s; \
         `poweroff -f` gave finished(0) and hvctl left by itself",
        v["kernel_bytes"],
        v["initrd_bytes"],
        upload.as_secs_f64(),
        ready.as_secs_f64(),
        answered.as_secs_f64()
    ))
}
