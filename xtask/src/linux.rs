//! The Linux guest's files: Debian's stock cloud kernel (a bzImage) and a busybox
//! initramfs whose `/init` is `guests/linux/init`, cached under `target/linux/`.
//!
//! [`ensure_linux_assets`] fetches the packages with `apt-get download` (never an
//! install: no hooks run, nothing on the host changes), unpacks them with
//! `dpkg-deb -x` into a scratch directory and keeps only what a guest needs:
//!
//! ```text
//! target/linux/vmlinuz        the bzImage (boot/vmlinuz-* of linux-image-*-cloud-amd64-unsigned)
//! target/linux/busybox        bin/busybox of busybox-static (also run on the host, see expected_sha)
//! target/linux/downloads.ok   written last: the packages, and the size and FNV-1a of both files
//! target/linux/initrd.gz      the gzip'ed newc initramfs
//! target/linux/initrd.ok      written last: what it was built from, and its size and FNV-1a
//! ```
//!
//! A `.ok` file is written only after everything it describes is complete, and every
//! call checks the files against it, so a half-finished download or build is never
//! used: it is redone. A complete cache costs no network and about a tenth of a
//! second (hashing 14 MB). Editing `guests/linux/init` rebuilds only the initramfs.
//! `HV_LINUX_KERNEL=<package>` picks a kernel package other than the newest, e.g.
//! `linux-image-6.1.0-47-cloud-amd64-unsigned` (the one PLATFORMS.md measured); a
//! cache keeps the kernel it holds until that variable names another one or
//! `target/linux` is removed, so "the newest" is the newest at the first download.
//!
//! Not for running anything: the system tests and `cargo xtask run --linux` are in
//! `linux_tests.rs`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{Result, cpio, tools};

/// The guest's files, ready to stage.
#[derive(Debug, Clone)]
pub struct LinuxAssets {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The gzip'ed initramfs.
    pub initrd: PathBuf,
    /// The static busybox inside the initramfs (it runs on the host too).
    pub busybox: PathBuf,
    /// The kernel's package, e.g. linux-image-6.12.117+deb12-cloud-amd64-unsigned.
    pub kernel_package: String,
    /// What the guest's `uname -r` says: the vmlinuz-* suffix.
    pub kernel_release: String,
}

/// Change when the layout of the initramfs (below) changes, so cached ones are rebuilt.
const INITRD_FORMAT: &str = "3";

/// The packages' versions are moving targets: the kernel is found by this pattern.
const KERNEL_PATTERN: &str = "^linux-image-.*-cloud-amd64-unsigned$";
const BUSYBOX_PACKAGE: &str = "busybox-static";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| tools::root().join("target"))
}

/// Where the cache lives: `target/linux` (under CARGO_TARGET_DIR when that is set).
pub fn cache_dir() -> PathBuf {
    target_dir().join("linux")
}

/// The kernel and initramfs, downloaded and built on the first call, checked and
/// reused after that.
pub fn ensure_linux_assets() -> Result<LinuxAssets> {
    let checked = Instant::now();
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let wanted = std::env::var("HV_LINUX_KERNEL").ok().filter(|s| !s.is_empty());
    let mut cached = true;
    let downloads = match cached_downloads(&dir, wanted.as_deref()) {
        Some(d) => d,
        None => {
            cached = false;
            let start = Instant::now();
            let d = download(&dir, wanted.as_deref())?;
            println!(
                "xtask: Linux guest: {} and {} fetched and unpacked in {:.1} s",
                d["kernel-package"],
                d["busybox-package"],
                start.elapsed().as_secs_f64()
            );
            d
        }
    };
    let busybox = dir.join("busybox");
    let initrd = dir.join("initrd.gz");
    let inputs = initrd_inputs(&busybox)?;
    if !manifest_holds(&dir.join("initrd.ok"), &dir, &inputs) {
        cached = false;
        let start = Instant::now();
        build_initrd(&busybox, &initrd)?;
        let mut entries = inputs;
        entries.push(("file initrd.gz".into(), stamp(&initrd)?));
        write_manifest(&dir.join("initrd.ok"), &entries)?;
        println!(
            "xtask: Linux guest: initramfs built in {:.1} s ({} bytes, {})",
            start.elapsed().as_secs_f64(),
            file_size(&initrd),
            initrd.display()
        );
    }
    if cached {
        println!(
            "xtask: Linux guest: {} and the initramfs from {} (checked in {:.2} s)",
            downloads.get("kernel-package").map_or("?", String::as_str),
            dir.display(),
            checked.elapsed().as_secs_f64()
        );
    }
    let field = |k: &str| downloads.get(k).cloned().ok_or_else(|| format!("downloads.ok has no {k}"));
    Ok(LinuxAssets {
        kernel: dir.join("vmlinuz"),
        initrd,
        busybox,
        kernel_package: field("kernel-package")?,
        kernel_release: field("kernel-release")?,
    })
}

/// The manifest of the downloads when it is complete and its files match it (and,
/// when `wanted` names a kernel package, it is that one).
fn cached_downloads(dir: &Path, wanted: Option<&str>) -> Option<BTreeMap<String, String>> {
    let m = read_manifest(&dir.join("downloads.ok"))?;
    for (key, value) in &m {
        if let Some(name) = key.strip_prefix("file ")
            && stamp(&dir.join(name)).ok().as_deref() != Some(value.as_str())
        {
            return None;
        }
    }
    let complete = ["kernel-package", "kernel-release", "busybox-package", "file vmlinuz", "file busybox"]
        .iter()
        .all(|k| m.contains_key(*k));
    let right_kernel = wanted.is_none_or(|w| m.get("kernel-package").map(String::as_str) == Some(w));
    (complete && right_kernel).then_some(m)
}

/// What an initramfs is built from; a cached one is used only if it was built from
/// exactly these.
fn initrd_inputs(busybox: &Path) -> Result<Vec<(String, String)>> {
    let linux = tools::root().join("guests").join("linux");
    Ok(vec![
        ("format".into(), INITRD_FORMAT.into()),
        ("input init".into(), stamp(&linux.join("init"))?),
        ("input sha.sh".into(), stamp(&linux.join("sha.sh"))?),
        ("input busybox".into(), stamp(busybox)?),
    ])
}

/// Whether `manifest` exists, has every entry of `inputs` with the same value, and
/// each of its `file NAME` entries matches the file NAME in `dir`.
fn manifest_holds(manifest: &Path, dir: &Path, inputs: &[(String, String)]) -> bool {
    let Some(m) = read_manifest(manifest) else { return false };
    inputs.iter().all(|(k, v)| m.get(k) == Some(v))
        && m.iter()
            .filter_map(|(k, v)| k.strip_prefix("file ").map(|name| (name, v)))
            .all(|(name, v)| stamp(&dir.join(name)).ok().as_ref() == Some(v))
        && m.keys().any(|k| k.starts_with("file "))
}

/// Fetch and unpack the kernel and busybox packages; the new downloads.ok.
fn download(dir: &Path, wanted: Option<&str>) -> Result<BTreeMap<String, String>> {
    // Whatever an earlier, unfinished call left is not to be trusted.
    let _ = std::fs::remove_file(dir.join("downloads.ok"));
    let scratch = dir.join("scratch");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(|e| format!("cannot clean {}: {e}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let mut updated = false;
    let kernel_package = match wanted {
        Some(w) => w.to_string(),
        None => {
            let mut found = kernel_packages()?;
            if found.is_empty() {
                apt_update()?;
                updated = true;
                found = kernel_packages()?;
            }
            newest(&found).map(str::to_string).ok_or_else(|| {
                format!(
                    "apt-cache search --names-only '{KERNEL_PATTERN}' finds no package, even after apt-get update; \
                     is this Debian with the main archive in its sources?"
                )
            })?
        }
    };
    let packages = [kernel_package.as_str(), BUSYBOX_PACKAGE];
    if let Err(first) = apt_download(&scratch, &packages) {
        if updated {
            return Err(first);
        }
        // An old package list names versions the mirror no longer has.
        println!("xtask: apt-get download failed ({first}); running apt-get update and trying again");
        apt_update()?;
        apt_download(&scratch, &packages)?;
    }
    let unpacked = scratch.join("x");
    let mut versions = BTreeMap::new();
    for deb in debs(&scratch)? {
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked), "dpkg-deb -x")?;
        let fields = run(Command::new("dpkg-deb").args(["-f"]).arg(&deb).args(["Package", "Version"]), "dpkg-deb -f")?;
        let field = |name: &str| {
            fields.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": "))).unwrap_or("?")
        };
        versions.insert(field("Package").to_string(), field("Version").to_string());
    }
    let boot = unpacked.join("boot");
    let vmlinuz: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(|e| format!("{} (unpacked from {kernel_package}): {e}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    let [vmlinuz] = vmlinuz.as_slice() else {
        return Err(format!("{kernel_package} has {} boot/vmlinuz-* files, expected one", vmlinuz.len()));
    };
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    install(vmlinuz, &dir.join("vmlinuz"), 0o644)?;
    install(&unpacked.join("bin").join("busybox"), &dir.join("busybox"), 0o755)?;
    let version = |p: &str| versions.get(p).map(|v| format!("{p}={v}")).unwrap_or_else(|| p.to_string());
    let entries = vec![
        ("kernel-package".to_string(), kernel_package.clone()),
        ("kernel-version".to_string(), version(&kernel_package)),
        ("kernel-release".to_string(), release),
        ("busybox-package".to_string(), version(BUSYBOX_PACKAGE)),
        ("file vmlinuz".to_string(), stamp(&dir.join("vmlinuz"))?),
        ("file busybox".to_string(), stamp(&dir.join("busybox"))?),
    ];
    write_manifest(&dir.join("downloads.ok"), &entries)?;
    // The .debs (35 MB) and the unpacked modules are not needed any more.
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(entries.into_iter().collect())
}

/// The kernel packages `apt-cache search` knows.
fn kernel_packages() -> Result<Vec<String>> {
    let out = run(Command::new("apt-cache").args(["search", "--names-only", KERNEL_PATTERN]), "apt-cache search")?;
    Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect())
}

fn apt_update() -> Result<()> {
    println!("xtask: apt-get update (the package lists are old or missing)");
    run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update").map(|_| ())
}

fn apt_download(dir: &Path, packages: &[&str]) -> Result<()> {
    println!("xtask: apt-get download {}", packages.join(" "));
    run(Command::new("apt-get").current_dir(dir).arg("download").args(packages), "apt-get download").map(|_| ())
}

/// The .deb files apt-get download left in `dir`.
fn debs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    if debs.len() != 2 {
        return Err(format!("apt-get download left {} .deb files in {}, expected 2", debs.len(), dir.display()));
    }
    Ok(debs)
}

/// The newest of `names` by version order: runs of digits compare as numbers, so
/// 6.12.117 > 6.12.9 > 6.1.0-57.
fn newest(names: &[String]) -> Option<&str> {
    names.iter().max_by(|a, b| version_key(a).cmp(&version_key(b))).map(String::as_str)
}

/// A name split into alternating text and number parts, comparable as a version.
fn version_key(s: &str) -> Vec<(String, u64)> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let text: String = std::iter::from_fn(|| chars.next_if(|c| !c.is_ascii_digit())).collect();
        let digits: String = std::iter::from_fn(|| chars.next_if(char::is_ascii_digit)).collect();
        parts.push((text, digits.parse().unwrap_or(0)));
    }
    parts
}

/// Run `cmd`; its stdout, or an error naming `what` with its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("no output on stderr")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copy `from` to `to` through a temporary name, so `to` is either absent or whole.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = to.with_extension("part");
    std::fs::copy(from, &tmp).map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, to).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), to.display()))
}

/// Build the initramfs: busybox, its `sh` link, `/init` and `/etc/sha.sh` from
/// guests/linux, the directories init mounts on, and the device nodes the kernel and
/// init open before devtmpfs is mounted (the kernel opens /dev/console for init's
/// standard streams).
fn build_initrd(busybox: &Path, out: &Path) -> Result<()> {
    let linux = tools::root().join("guests").join("linux");
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let cpio = initramfs(&read(busybox)?, &read(&linux.join("init"))?, &read(&linux.join("sha.sh"))?);
    let tmp = out.with_extension("part");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    // flate2 (pure Rust, miniz_oxide): Linux unpacks a gzip'ed initramfs, and doing it
    // in-process needs no host gzip and gives the same bytes everywhere (mtime 0).
    let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::best());
    gz.write_all(&cpio).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let mut buf = gz.finish().map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    buf.flush().map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    drop(buf);
    std::fs::rename(&tmp, out).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))
}

/// The uncompressed newc archive of the initramfs.
fn initramfs(busybox: &[u8], init: &[u8], sha: &[u8]) -> Vec<u8> {
    let mut w = cpio::Writer::new();
    for dir in ["bin", "dev", "etc", "proc", "root", "sys", "tmp"] {
        w.dir(dir, 0o755);
    }
    w.file("bin/busybox", 0o755, busybox);
    w.symlink("bin/sh", "busybox");
    w.file("init", 0o755, init);
    w.file("etc/sha.sh", 0o644, sha);
    w.char_dev("dev/console", 0o600, 5, 1);
    w.char_dev("dev/ttyS0", 0o660, 4, 64);
    w.char_dev("dev/null", 0o666, 1, 3);
    w.finish()
}

/// What hv.test=sha must print (`HV-SHA256 …`, `HV-GZIP-SHA256 …`, `HV-AWK-FP …`): guests/linux/
/// sha.sh run on the host by the same static busybox, every command an applet of it.
pub fn expected_sha(assets: &LinuxAssets) -> Result<Vec<String>> {
    let work = target_dir().join("xtask").join("linux-sha");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| format!("cannot clean {}: {e}", work.display()))?;
    }
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    run(Command::new(&assets.busybox).arg("--install").arg("-s").arg(&bin), "busybox --install -s")?;
    let script = tools::root().join("guests").join("linux").join("sha.sh");
    let out = run(
        Command::new(bin.join("sh")).env_clear().env("PATH", &bin).arg(&script).arg(&work),
        "busybox sh guests/linux/sha.sh",
    )?;
    let _ = std::fs::remove_dir_all(&work);
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    let keys = ["HV-SHA256 ", "HV-GZIP-SHA256 ", "HV-AWK-FP "];
    if lines.len() != keys.len() || lines.iter().zip(keys).any(|(l, k)| !l.starts_with(k)) {
        return Err(format!("sha.sh on the host printed {out:?}, expected the lines {keys:?}"));
    }
    Ok(lines)
}

/// `SIZE FNV1A64`: enough to tell a truncated or replaced file from the one recorded.
fn stamp(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!("{} {:016x}", bytes.len(), fnv1a(&bytes)))
}

/// FNV-1a, 64 bits (a change detector, not a defence against tampering).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `key value` lines; `None` if the file is missing or a line has no value.
fn read_manifest(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            // Keys are one word or `file NAME`.
            let (k, v) = if let Some(rest) = l.strip_prefix("file ") {
                let (name, v) = rest.split_once(' ')?;
                (format!("file {name}"), v)
            } else if let Some(rest) = l.strip_prefix("input ") {
                let (name, v) = rest.split_once(' ')?;
                (format!("input {name}"), v)
            } else {
                let (k, v) = l.split_once(' ')?;
                (k.to_string(), v)
            };
            Some((k, v.to_string()))
        })
        .collect()
}

/// Write `entries` to `path` through a temporary name (the manifest is the commit point).
fn write_manifest(path: &Path, entries: &[(String, String)]) -> Result<()> {
    let text: String = entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_compares_numbers_not_text() {
        let names: Vec<String> = [
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.111+deb12-cloud-amd64-unsigned",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(newest(&names), Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned"));
        assert_eq!(newest(&names[..2]), Some("linux-image-6.1.0-57-cloud-amd64-unsigned"));
        assert_eq!(newest(&[]), None);
    }

    #[test]
    fn the_initramfs_holds_what_init_needs() {
        let bytes = initramfs(b"\x7fELF busybox", b"#!/bin/sh\necho hi\n", b"echo sha\n");
        let entries = cpio::read(&bytes).unwrap();
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("no {n}"));
        assert_eq!(get("init").mode, cpio::S_IFREG | 0o755);
        assert_eq!(get("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(get("bin/busybox").data, b"\x7fELF busybox");
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("bin/sh").mode & cpio::S_IFMT, cpio::S_IFLNK);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("dev/ttyS0").rdev, (4, 64));
        assert_eq!(get("dev/null").rdev, (1, 3));
        for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
            assert_eq!(get(d).mode, cpio::S_IFDIR | 0o755, "{d}");
        }
        // Every parent comes before its children (the kernel creates them in order).
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(entries[..i].iter().any(|p| p.name == parent), "{} before {parent}", e.name);
            }
        }
        // Deterministic: the same inputs, the same bytes.
        assert_eq!(bytes, initramfs(b"\x7fELF busybox", b"#!/bin/sh\necho hi\n", b"echo sha\n"));
    }

    #[test]
    fn the_real_init_script_is_packed_and_names_every_marker() {
        let init = std::fs::read_to_string(tools::root().join("guests/linux/init")).unwrap();
        assert!(init.starts_with("#!/bin/sh\n"));
        for marker in [
            "HV-LINUX-INIT uptime=",
            "HV-LINUX-DONE",
            "HV-CPUINFO-FLAGS",
            "HV-CPUINFO-COUNT",
            "HV-NPROC",
            "HV-CLOCK",
            "HV-PAR-ONE",
            "HV-PAR-TWO",
            "HV-PAR-CPU",
        ] {
            assert!(init.contains(marker), "init does not print {marker}");
        }
        let sha = std::fs::read_to_string(tools::root().join("guests/linux/sha.sh")).unwrap();
        assert!(sha.contains("HV-SHA256") && sha.contains("HV-GZIP-SHA256"));
    }

    #[test]
    fn a_manifest_holds_only_while_its_files_are_unchanged() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data"), b"complete contents").unwrap();
        let inputs = vec![("input init".to_string(), "12 00ff".to_string())];
        let mut entries = inputs.clone();
        entries.push(("file data".into(), stamp(&dir.join("data")).unwrap()));
        let manifest = dir.join("data.ok");
        assert!(!manifest_holds(&manifest, &dir, &inputs), "no manifest yet");
        write_manifest(&manifest, &entries).unwrap();
        assert!(manifest_holds(&manifest, &dir, &inputs));
        assert!(!manifest_holds(&manifest, &dir, &[("input init".into(), "13 00ff".into())]), "other inputs");
        // A truncated file (a download cut short) and a same-size change are both seen.
        std::fs::write(dir.join("data"), b"complete").unwrap();
        assert!(!manifest_holds(&manifest, &dir, &inputs));
        std::fs::write(dir.join("data"), b"COMPLETE contents").unwrap();
        assert!(!manifest_holds(&manifest, &dir, &inputs));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
