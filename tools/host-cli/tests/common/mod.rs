//! What the hvctl integration tests share: running the built binary (without the
//! caller's `$HVCTL_CONNECT` or a `target/xtask/hvctl.connect` in reach) and reading
//! its output.
#![allow(dead_code)] // each test crate uses its own subset

pub mod agent;
pub mod fake_hv;

use std::process::{Command, Output};

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
