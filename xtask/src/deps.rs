//! The dependency rules of shared/DESIGN.md, checked from `cargo metadata` and the
//! crates' sources, so a violation fails CI instead of waiting for a reviewer.

use std::collections::BTreeMap;
use std::process::Command;

use crate::{Result, tools};

/// Which workspace crates each crate may depend on (normal and build dependencies).
const ALLOWED: &[(&str, &[&str])] = &[
    ("wire", &[]),
    ("levelling", &[]),
    ("monitor_svc", &["wire", "levelling"]),
    ("migration_svc", &["wire", "levelling"]),
    ("hv", &["wire", "levelling", "monitor_svc", "migration_svc", "guest-abi"]),
    ("boot", &["hv"]),
    ("host-cli", &["wire", "levelling"]),
    ("xtask", &["hv", "wire", "levelling", "guest-abi"]),
    ("guest-abi", &[]),
    ("guest-kernels", &["guest-abi"]),
];

/// Crates that must carry `#![forbid(unsafe_code)]`, and the service crates that must
/// also deny panicking constructs by lint.
const NO_UNSAFE: &[&str] = &["wire", "levelling", "monitor_svc", "migration_svc", "guest-abi"];
const PANIC_FREE: &[&str] = &["monitor_svc", "migration_svc"];
const PANIC_LINTS: &[&str] = &["clippy::unwrap_used", "clippy::expect_used", "clippy::indexing_slicing"];

/// Run all checks.
pub fn check() -> Result<()> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(tools::root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
    let packages = meta["packages"].as_array().ok_or("cargo metadata: no packages")?;
    let members: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();

    let mut problems = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        let Some(ok) = allowed.get(name) else {
            problems.push(format!("crate {name} has no dependency rule in xtask/src/deps.rs"));
            continue;
        };
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or("?");
            if d["kind"].as_str() == Some("dev") {
                continue;
            }
            if members.contains(&dep) && !ok.contains(&dep) {
                problems.push(format!("{name} depends on {dep}, which DESIGN.md does not allow"));
            }
            if dep == "uefi" && name != "boot" {
                problems.push(format!("{name} depends on uefi: only boot may talk to firmware"));
            }
        }
        let manifest = p["manifest_path"].as_str().unwrap_or("");
        let lib = std::path::Path::new(manifest).with_file_name("src").join("lib.rs");
        if NO_UNSAFE.contains(&name) || PANIC_FREE.contains(&name) {
            let src = std::fs::read_to_string(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
            if NO_UNSAFE.contains(&name) && !src.contains("#![forbid(unsafe_code)]") {
                problems.push(format!("{name}: src/lib.rs lacks #![forbid(unsafe_code)]"));
            }
            if PANIC_FREE.contains(&name) {
                for lint in PANIC_LINTS {
                    if !src.contains(lint) {
                        problems.push(format!("{name}: src/lib.rs does not deny {lint}"));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        println!("xtask: dependency rules hold ({} crates)", packages.len());
        Ok(())
    } else {
        Err(format!("dependency rules violated:\n  {}", problems.join("\n  ")))
    }
}
