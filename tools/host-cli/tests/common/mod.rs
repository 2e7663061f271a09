//! What the hvctl integration tests share: running the built binary (without the
//! caller's `$HVCTL_CONNECT` or a `target/xtask/hvctl.connect` in reach) and reading
//! its output.
#![allow(dead_code)] // each test crate uses its own subset

pub mod agent;
pub mod fake_hv;

use std::io::Read;
use std::process::{Command, Output, Stdio};

/// Run the built hvctl with `args`, from the temporary directory.
pub fn hvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(args)
        .env_remove("HVCTL_CONNECT")
        .env_remove("HVCTL_CONFIG")
        // No context from the caller's ~/.config/hvctl/config.toml.
        .env("XDG_CONFIG_HOME", std::env::temp_dir().join("hvctl-tests-no-config"))
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

/// Which of hvctl's outputs goes to the terminal in [`hvctl_on_terminal`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tty {
    Stdout,
    Stderr,
}

/// Run the built hvctl with one output on a pseudo-terminal of 160 columns (the other
/// piped): its result and everything drawn on the terminal, escape sequences included.
pub fn hvctl_on_terminal(args: &[&str], tty: Tty) -> (Output, String) {
    let size = nix::pty::Winsize { ws_row: 24, ws_col: 160, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let on_tty = || Stdio::from(pty.slave.try_clone().unwrap());
    let (out, err) = match tty {
        Tty::Stdout => (on_tty(), Stdio::piped()),
        Tty::Stderr => (Stdio::piped(), on_tty()),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(args)
        .env_remove("HVCTL_CONNECT")
        .current_dir(std::env::temp_dir())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        // EIO once the last holder of the terminal's other side is gone.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let o = child.wait_with_output().unwrap();
    drop(pty.slave);
    (o, reader.join().unwrap())
}

/// A fake hypervisor (the shared [`fake_hv`] listener) answering every request with
/// `answer`; its `unix:PATH:5000` target.
pub fn fake_hv_target(name: &str, answer: impl Fn(&wire::Request) -> wire::Response + Send + Sync + 'static) -> String {
    fake_hv::Fake::start(name, move |r| answer(&r)).target()
}

/// A fake hypervisor answering `HostCpuid` with the records of the dump file `dump`
/// (and an error to anything else).
pub fn fake_cpuid_hv(name: &str, dump: &str) -> String {
    let text = std::fs::read_to_string(dump).unwrap();
    let d = levelling::parse_dump(&text).unwrap();
    let records: Vec<wire::CpuidLeaf> =
        d.records.iter().map(|r| wire::CpuidLeaf { leaf: r.leaf, subleaf: r.subleaf, regs: r.regs }).collect();
    let source = format!("fake hv serving {name}");
    fake_hv_target(name, move |req| match req {
        wire::Request::HostCpuid => {
            wire::Response::HostCpuid(wire::HostCpuidReport { source: source.clone(), records: records.clone() })
        }
        other => wire::Response::Error(wire::ErrorReply::new(wire::ErrorCode::NotImplemented, other.name())),
    })
}

/// promtool's findings on `text`, if promtool is installed.
pub fn promtool(text: &str) -> Option<(i32, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let o = child.wait_with_output().ok()?;
    Some((o.status.code().unwrap_or(-1), format!("{}{}", stdout(&o), stderr(&o))))
}

/// What is wrong with `text` as an OpenMetrics exposition: its shape, as the system
/// tests' `check_openmetrics` (xtask/src/control_tests.rs) checks it (`# EOF` last and
/// once, a family typed once as counter or gauge before its samples, counter samples
/// named `_total`, a UNIT the suffix of its family, every sample a name and a number),
/// and, where promtool is installed, promtool's findings but for the one it always
/// reports on OpenMetrics. Empty: valid.
pub fn openmetrics_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !text.ends_with("\n# EOF\n") || text.matches("# EOF").count() != 1 {
        problems.push("not ended by exactly one `# EOF` line".to_string());
    }
    let mut types: Vec<(&str, &str)> = Vec::new();
    for line in text.lines().filter(|l| *l != "# EOF") {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (family, kind) = t.split_once(' ').unwrap_or((t, ""));
            if types.iter().any(|(f, _)| *f == family) {
                problems.push(format!("family {family} typed twice"));
            }
            if !matches!(kind, "counter" | "gauge") {
                problems.push(format!("unexpected type in {line:?}"));
            }
            types.push((family, kind));
        } else if let Some(u) = line.strip_prefix("# UNIT ") {
            let (family, unit) = u.split_once(' ').unwrap_or((u, ""));
            if !types.iter().any(|(f, _)| *f == family) || !family.ends_with(&format!("_{unit}")) {
                problems.push(format!("{line:?}: not a declared family ending in _{unit}"));
            }
        } else if !line.starts_with("# HELP ") {
            let (name_labels, value) = line.rsplit_once(' ').unwrap_or((line, ""));
            let name = name_labels.split('{').next().unwrap_or("");
            if name.is_empty() || value.parse::<f64>().is_err() {
                problems.push(format!("not a sample: {line:?}"));
            }
            match types.iter().find(|(f, _)| name == *f || name == format!("{f}_total")) {
                None => problems.push(format!("sample {name} has no # TYPE before it")),
                Some((_, "counter")) if !name.ends_with("_total") => {
                    problems.push(format!("counter sample {name} must end in _total"));
                }
                Some(_) => {}
            }
        }
    }
    if let Some((code, findings)) = promtool(text) {
        // promtool 2.42 lints with the 0.0.4 parser: an OpenMetrics counter family `x`
        // (samples `x_total`) reads to it as an untyped `x_total` without HELP. That
        // one finding per counter family is all it may report.
        let counters: Vec<String> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("# TYPE ")?.strip_suffix(" counter").map(|f| format!("{f}_total no help text"))
            })
            .collect();
        let other: Vec<&str> = findings.lines().filter(|l| !counters.iter().any(|c| c == l)).collect();
        if !other.is_empty() || !(code == 0 || code == 3) {
            problems.push(format!("promtool on OpenMetrics ({code}): {findings}"));
        }
    }
    problems
}
