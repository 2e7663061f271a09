//! Building the UEFI image and the ESP directory the emulators boot from.

use std::path::PathBuf;

use crate::{Result, tools};

/// The guest kernels in guests/kernels, copied to \EFI\HV\NAME.elf.
pub const GUESTS: &[&str] = &[
    "cpuid-probe",
    "memwriter",
    "spinner",
    "misbehave",
    "dirtytest",
    "dirtypair",
    "apictimer",
    "fpustate",
    "xapic-mmio",
    "multiboot",
    "echo",
];

/// A built image.
#[derive(Debug, Clone)]
pub struct Esp {
    /// The ESP directory (holds EFI/BOOT/BOOTX64.EFI).
    pub dir: PathBuf,
    /// The .efi file inside it.
    pub efi: PathBuf,
    /// Size of the .efi in bytes.
    pub size: u64,
}

/// Build `boot` for x86_64-unknown-uefi and lay out target/esp.
pub fn build(release: bool) -> Result<Esp> {
    tools::ensure_uefi_target()?;
    let mut args = vec!["build", "-p", "boot", "--target", "x86_64-unknown-uefi"];
    if release {
        args.push("--release");
    }
    tools::cargo(&args)?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| tools::root().join("target"));
    let built = target_dir.join("x86_64-unknown-uefi").join(if release { "release" } else { "debug" }).join("boot.efi");
    let dir = target_dir.join("esp");
    let boot_dir = dir.join("EFI").join("BOOT");
    std::fs::create_dir_all(&boot_dir).map_err(|e| format!("cannot create {}: {e}", boot_dir.display()))?;
    let efi = boot_dir.join("BOOTX64.EFI");
    std::fs::copy(&built, &efi).map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), efi.display()))?;
    let size = std::fs::metadata(&efi).map(|m| m.len()).unwrap_or(0);

    // The test guests, as \EFI\HV\<name>.elf (boot-time domains load from there).
    tools::ensure_target("x86_64-unknown-none")?;
    tools::cargo(&["build", "-p", "guest-kernels", "--target", "x86_64-unknown-none", "--release"])?;
    let guests = dir.join("EFI").join("HV");
    std::fs::create_dir_all(&guests).map_err(|e| format!("cannot create {}: {e}", guests.display()))?;
    for name in GUESTS {
        let built = target_dir.join("x86_64-unknown-none").join("release").join(name);
        let dest = guests.join(format!("{name}.elf"));
        std::fs::copy(&built, &dest)
            .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
    }
    Ok(Esp { dir, efi, size })
}
