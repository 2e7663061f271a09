//! The hypervisor core (`no_std`).
//!
//! Boot (the only crate that talks to UEFI) hands over a [`BootInfo`] after
//! ExitBootServices and calls [`run`]. The core loads its own descriptor tables,
//! probes the CPU ([`platform::caps`]), takes the machine's virtualization through the
//! matching backend ([`arch`]), and proves it with a minimal guest round trip
//! ([`selftest`]) before it prints `READY`.
//!
//! The layout (shared/DESIGN.md): [`init`] the boot sequence and [`run`], [`percpu`]
//! each physical CPU's own state, [`arch`] backends, [`mm`] memory, [`domain`] domains
//! and the exit policy, [`devices`] guest device models, [`drivers`] the hardware the
//! hypervisor itself drives, [`platform`] the machine's identity, [`services`] the task
//! runtime and control server, [`heap`] the allocator.
//!
//! Everything that is logic (capability decoding, frame pool, nested page tables,
//! device models, the exit policy) is plain code that `cargo test -p hv` runs on the
//! host; the hardware touch points are the few `unsafe` blocks in `drivers`, `arch`,
//! `platform` and `mm::frames`.
//!
//! Serial markers (stable; the system tests and tools parse them), one per line:
//! - `CAPS v=1 key=value ...`: machine-readable capabilities ([`platform::caps::Capabilities::machine_line`]).
//! - `PROBE-RAW ...`: every CPUID/MSR value the probe read ([`platform::hw::Recorded::to_line`]).
//! - `SMP cpus=N started=S failed=F`: the other CPUs' bring-up ([`smp`]); before it,
//!   `SMP cpu apic=N failed to start: <reason>` for each that did not check in.
//! - `READY arch=... value=0x...`: the guest round trip succeeded.
//! - `REFUSED: <reason>`: this CPU cannot host guests; the machine shuts down.
//! - `FAIL: <reason>`: something went wrong; the machine shuts down.
#![no_std]

extern crate alloc;
// Host tests and the fuzz targets run on Linux: `percpu::this` uses a thread-local there.
#[cfg(any(test, fuzzing))]
extern crate std;

pub mod arch;
pub mod devices;
pub mod domain;
pub mod drivers;
pub mod firmware;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod heap;
pub mod init;
pub mod mm;
pub mod percpu;
pub mod platform;
pub mod selftest;
pub mod services;
pub mod smp;

/// The version printed in the banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use init::{
    BootDomain, BootImage, BootInfo, MemoryRegion, Outcome, RegionKind, coalesce, run, set_shutdown_hook, shutdown,
};
