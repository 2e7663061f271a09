//! Host tools the emulator runs need, and installing them.
//!
//! On Debian/Ubuntu as root, missing packages are installed with apt-get (once per
//! process, idempotently); otherwise the error names the exact command to run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use crate::Result;
use crate::emulator::Platform;

/// Debian's OVMF files (4 MiB for QEMU; 2 MiB for Bochs, whose ROM limit is 2 MiB).
pub const OVMF_CODE_4M: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// See [`OVMF_CODE_4M`].
pub const OVMF_VARS_4M: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// See [`OVMF_CODE_4M`].
pub const OVMF_CODE_2M: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// See [`OVMF_CODE_4M`].
pub const OVMF_VARS_2M: &str = "/usr/share/OVMF/OVMF_VARS.fd";
/// Bochs' VGA BIOS.
pub const VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// What a platform needs: (package, a file or program that shows it is installed).
fn requirements(platform: &Platform) -> Vec<(&'static str, &'static str)> {
    match platform {
        Platform::Qemu { .. } => {
            vec![("qemu-system-x86", "qemu-system-x86_64"), ("ovmf", OVMF_CODE_4M), ("ovmf", OVMF_VARS_4M)]
        }
        Platform::Bochs { .. } => vec![
            ("bochs", "bochs"),
            ("bochsbios", "/usr/share/bochs/BIOS-bochs-latest"),
            ("vgabios", VGABIOS),
            ("ovmf", OVMF_CODE_2M),
            ("ovmf", OVMF_VARS_2M),
        ],
    }
}

static APT_UPDATE: Once = Once::new();

/// Make sure the emulator and firmware for `platform` are installed.
pub fn ensure(platform: &Platform) -> Result<()> {
    let mut missing: Vec<&str> = requirements(platform)
        .into_iter()
        .filter(|(_, probe)| if probe.starts_with('/') { !Path::new(probe).exists() } else { !on_path(probe) })
        .map(|(pkg, _)| pkg)
        .collect();
    missing.dedup();
    apt_install(&missing, &platform.to_string())
}

/// Install Debian packages `missing` with apt-get (as root; else the error names the
/// command), for `what`. Nothing to do when `missing` is empty.
fn apt_install(missing: &[&str], what: &str) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get install -y {}", missing.join(" "));
    if !(is_root() && on_path("apt-get")) {
        return Err(format!("{what} needs packages that are not installed; run: sudo {cmd}"));
    }
    println!("xtask: installing {} ({cmd})", missing.join(", "));
    let mut update_ok = true;
    APT_UPDATE.call_once(|| {
        update_ok = Command::new("apt-get").args(["update", "-qq"]).status().map(|s| s.success()).unwrap_or(false);
    });
    if !update_ok {
        return Err("apt-get update failed; see its output above".into());
    }
    let status = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(missing)
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("`{cmd}` failed ({status})"));
    }
    Ok(())
}

/// Debian's policy hook: while it exits 101, package scripts start no service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Make sure Debian's `prometheus` package (the server and `promtool`) is installed,
/// without starting its system service: the tests run the binaries themselves, on
/// loopback, with their own configuration. Where no `policy-rc.d` exists one that
/// refuses every service start is put in place for the install and removed after it
/// (an existing one is left alone; container images ship one that does the same).
pub fn ensure_prometheus() -> Result<()> {
    if on_path("prometheus") && on_path("promtool") {
        return Ok(());
    }
    let ours = !Path::new(POLICY_RC_D).exists() && is_root();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# xtask: no service starts while it installs prometheus\nexit 101\n")
            .and_then(|()| std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| format!("cannot write {POLICY_RC_D}: {e}"))?;
    }
    let result = apt_install(&["prometheus"], "the prometheus-* system tests");
    if ours {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    result?;
    if on_path("prometheus") && on_path("promtool") {
        Ok(())
    } else {
        Err("the prometheus package is installed but prometheus or promtool is not on PATH".into())
    }
}

/// Make sure the rustup target for the image is installed (rust-toolchain.toml lists
/// it, but an already-installed toolchain does not always pick that up).
pub fn ensure_uefi_target() -> Result<()> {
    ensure_target("x86_64-unknown-uefi")
}

/// Make sure a rustup target of the pinned toolchain is installed.
pub fn ensure_target(target: &str) -> Result<()> {
    let sysroot = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot).join("lib/rustlib").join(target).exists() {
        return Ok(());
    }
    println!("xtask: installing the {target} target (rustup target add)");
    let status = Command::new("rustup")
        .current_dir(root())
        .args(["target", "add", target])
        .status()
        .map_err(|e| format!("cannot run rustup: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("rustup target add {target} failed")) }
}

/// Run cargo in the workspace root with `args`, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status =
        Command::new(&cargo).current_dir(root()).args(args).status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo {}` failed ({status})", args.join(" "))) }
}

/// The vhost-device-vsock binary, installed with `cargo install --locked` if missing.
pub fn vhost_device_vsock() -> Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin").join("vhost-device-vsock"));
    if on_path("vhost-device-vsock") {
        return Ok(PathBuf::from("vhost-device-vsock"));
    }
    if let Some(p) = cargo_bin.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    println!("xtask: installing vhost-device-vsock (cargo install --locked vhost-device-vsock, about a minute)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "--locked", "vhost-device-vsock"])
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !status.success() {
        return Err("`cargo install --locked vhost-device-vsock` failed".into());
    }
    cargo_bin.filter(|p| p.is_file()).ok_or_else(|| "vhost-device-vsock installed but not found in ~/.cargo/bin".into())
}

/// cargo-fuzz (and the nightly toolchain it drives) for `cargo xtask fuzz`.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
    if !nightly.map(|o| o.status.success()).unwrap_or(false) {
        println!("xtask: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)");
        let ok = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err("fuzzing needs the nightly toolchain: rustup toolchain install nightly".into());
        }
    }
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if have {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (cargo install --locked cargo-fuzz)");
    let ok = Command::new("cargo")
        .args(["install", "--locked", "cargo-fuzz"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok { Ok(()) } else { Err("`cargo install --locked cargo-fuzz` failed".into()) }
}
