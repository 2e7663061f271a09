#!/usr/bin/env bash
# What CI runs on a fresh clone: lints, then the README's test command.
# Everything the tests need (the UEFI rustup target, QEMU, OVMF, Bochs) is installed
# by xtask itself when missing (apt-get as root on Debian/Ubuntu), idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "ci: cargo is not installed; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
# Installs the toolchain pinned in rust-toolchain.toml (and its targets) if missing.
rustup show active-toolchain
rustup target add x86_64-unknown-uefi >/dev/null

start=$(date +%s)
echo "ci: cargo xtask lint"
cargo xtask lint
echo "ci: cargo xtask test"
cargo xtask test
# The parsers and the frame decoder must survive arbitrary input (nightly + cargo-fuzz,
# installed by xtask when missing).
echo "ci: cargo xtask fuzz --seconds 30"
cargo xtask fuzz --seconds 30
echo "ci: done in $(( $(date +%s) - start )) s"
