//! Domain configuration: the boot-time file `\EFI\HV\DOMAINS.CFG` on the ESP, one
//! domain per line, `#` starts a comment:
//!
//! ```text
//! # name     kernel (file in \EFI\HV)  memory      vCPUs    CPUID policy (levelling text form)    command line (rest of line)
//! name=probe kernel=cpuid-probe.elf    memory=16M  vcpus=1  cpuid=base=host-max,-avx2            cmdline=verbose
//! name=linux kernel=vmlinuz initrd=initrd.gz memory=256M cmdline=console=ttyS0
//! ```
//!
//! Keys: `name` (required, `[A-Za-z0-9_-]`, at most 32 bytes), `kernel` (required, a
//! file name in `\EFI\HV`: an ELF64 `guest_abi` kernel, a Linux bzImage or a
//! multiboot v1 kernel, told apart by their contents: `domain::boot`), `initrd`
//! (optional, a file name in `\EFI\HV`: the Linux initrd or multiboot module 1; an
//! ELF64 kernel takes none and is refused with one), `memory` (bytes with an optional K/M/G suffix; default
//! 16M; at least 4M, at most 1G), `vcpus` (default 1, at most 8), `cpuid` (default:
//! the host's `max` policy), `cmdline` (must be last: it takes the rest of the line).
//! Errors name the line and the key.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// One domain's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// Name.
    pub name: String,
    /// Kernel file name (in `\EFI\HV` for boot-time domains).
    pub kernel: String,
    /// Initrd file name (in `\EFI\HV` for boot-time domains), if any.
    pub initrd: Option<String>,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPUID policy in levelling's text form, if not the default.
    pub cpuid: Option<String>,
    /// Guest command line.
    pub cmdline: String,
    /// The physical CPUs (APIC IDs) its vCPUs may run on; `None`: any.
    pub cpus: Option<Vec<u32>>,
}

/// Smallest guest memory: the loader's tables, the kernel at 2 MiB and a stack.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest guest memory a configuration may ask for: a sanity bound, far below what the
/// guest's identity tables can cover (a page directory per GiB below 2 MiB). What a
/// domain really gets is limited by the free frames of the pool, which refuses a
/// request it cannot hold with an out-of-memory error.
pub const MAX_MEMORY: u64 = 256 << 30;
/// Most vCPUs per domain.
pub const MAX_VCPUS: u32 = 8;

/// A configuration error, with the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DOMAINS.CFG line {}: {}", self.line, self.message)
    }
}

/// Parse a size: digits with an optional K, M or G suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Parse one line (without comment). `Ok(None)` for a blank line.
pub fn parse_line(text: &str, line: usize) -> Result<Option<DomainConfig>, ConfigError> {
    let err = |message: String| ConfigError { line, message };
    let text = text.split('#').next().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let (head, cmdline) = match text.find("cmdline=") {
        Some(i) => (&text[..i], text[i + "cmdline=".len()..].trim().to_string()),
        None => (text, String::new()),
    };
    if cmdline.len() > guest_abi::CMDLINE_MAX {
        return Err(err(alloc::format!("cmdline is longer than {} bytes", guest_abi::CMDLINE_MAX)));
    }
    let (mut name, mut kernel, mut initrd, mut memory, mut vcpus, mut cpuid, mut cpus) =
        (None, None, None, 16u64 << 20, 1u32, None, None);
    for item in head.split_whitespace() {
        let (key, value) = item.split_once('=').ok_or_else(|| err(alloc::format!("`{item}` is not key=value")))?;
        match key {
            "name" => {
                if value.is_empty()
                    || value.len() > 32
                    || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(err(alloc::format!("name `{value}`: use 1-32 of A-Z a-z 0-9 - _")));
                }
                name = Some(value.to_string());
            }
            "kernel" => kernel = Some(file_name("kernel", value).map_err(err)?),
            "initrd" => initrd = Some(file_name("initrd", value).map_err(err)?),
            "memory" => {
                memory = parse_size(value).ok_or_else(|| err(alloc::format!("memory `{value}` is not a size")))?;
                if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) {
                    return Err(err(alloc::format!("memory {value} is outside 4M..256G")));
                }
            }
            "vcpus" => {
                vcpus = value.parse().map_err(|_| err(alloc::format!("vcpus `{value}` is not a number")))?;
                if !(1..=MAX_VCPUS).contains(&vcpus) {
                    return Err(err(alloc::format!("vcpus {vcpus} is outside 1..{MAX_VCPUS}")));
                }
            }
            "cpuid" => cpuid = Some(value.to_string()),
            "cpus" => cpus = wire::cpulist::parse(value).map_err(|e| err(alloc::format!("cpus `{value}`: {e}")))?,
            other => return Err(err(alloc::format!("unknown key `{other}`"))),
        }
    }
    let config = DomainConfig {
        name: name.ok_or_else(|| err("missing name=".into()))?,
        kernel: kernel.ok_or_else(|| err("missing kernel=".into()))?,
        initrd,
        memory,
        vcpus,
        cpuid,
        cmdline,
        cpus,
    };
    validate(&config).map_err(err)?;
    Ok(Some(config))
}

/// A file name in `\EFI\HV` given for `key` (no path separators).
fn file_name(key: &str, value: &str) -> Result<String, String> {
    if value.is_empty() || value.contains(['\\', '/']) {
        return Err(alloc::format!("{key} `{value}`: give a file name in \\EFI\\HV"));
    }
    Ok(value.to_string())
}

/// The limits every domain configuration must keep, from a file or from `hvctl`.
pub fn validate(c: &DomainConfig) -> Result<(), String> {
    if c.name.is_empty()
        || c.name.len() > 32
        || !c.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(alloc::format!("name `{}`: use 1-32 of A-Z a-z 0-9 - _", c.name));
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&c.memory) {
        return Err(alloc::format!("memory {} MiB is outside 4M..256G", c.memory >> 20));
    }
    if !(1..=MAX_VCPUS).contains(&c.vcpus) {
        return Err(alloc::format!("vcpus {} is outside 1..{MAX_VCPUS}", c.vcpus));
    }
    if c.cmdline.len() > guest_abi::CMDLINE_MAX {
        return Err(alloc::format!("cmdline is longer than {} bytes", guest_abi::CMDLINE_MAX));
    }
    Ok(())
}

/// Parse a whole file.
pub fn parse(text: &str) -> Result<Vec<DomainConfig>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = parse_line(line, i + 1)? {
            if out.iter().any(|d: &DomainConfig| d.name == c.name) {
                return Err(ConfigError { line: i + 1, message: alloc::format!("duplicate name `{}`", c.name) });
            }
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_keeps_the_cmdline_whole() {
        let cfg = parse(
            "# test domains\n\nname=probe kernel=cpuid-probe.elf memory=16M vcpus=2 cpus=0-1 cpuid=base=host-max,-avx2 cmdline=a=1 b  c # not a comment? yes it is\nname=w kernel=memwriter.elf\n",
        )
        .unwrap();
        assert_eq!(cfg.len(), 2);
        assert_eq!(
            cfg[0],
            DomainConfig {
                name: "probe".into(),
                kernel: "cpuid-probe.elf".into(),
                initrd: None,
                memory: 16 << 20,
                vcpus: 2,
                cpuid: Some("base=host-max,-avx2".into()),
                cmdline: "a=1 b  c".into(),
                cpus: Some(alloc::vec![0, 1]),
            }
        );
        assert_eq!(cfg[1].memory, 16 << 20);
        assert_eq!(cfg[1].cpuid, None);
        assert_eq!(cfg[1].cpus, None, "any CPU");
        assert_eq!(
            parse("name=a kernel=k cpus=3-1").unwrap_err().message,
            "cpus `3-1`: 3-1: a range runs from low to high (1-3?)"
        );
        assert_eq!(cfg[1].initrd, None);
    }

    #[test]
    fn takes_an_initrd_file_name() {
        let cfg =
            parse("name=linux kernel=vmlinuz initrd=initrd.gz memory=256M cmdline=console=ttyS0 initrd=no\n").unwrap();
        assert_eq!(cfg[0].kernel, "vmlinuz");
        assert_eq!(cfg[0].initrd.as_deref(), Some("initrd.gz"));
        assert_eq!(cfg[0].memory, 256 << 20);
        assert_eq!(cfg[0].cmdline, "console=ttyS0 initrd=no", "the command line keeps its own initrd=");
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let e = parse("name=a kernel=k\nname=b kernel=k memory=1M\n").unwrap_err();
        assert_eq!(e.to_string(), "DOMAINS.CFG line 2: memory 1M is outside 4M..256G");
        assert_eq!(parse("name=a kernel=k vcpus=0").unwrap_err().message, "vcpus 0 is outside 1..8");
        assert_eq!(parse("kernel=k").unwrap_err().message, "missing name=");
        assert_eq!(parse("name=a kernel=x/y").unwrap_err().message, "kernel `x/y`: give a file name in \\EFI\\HV");
        assert_eq!(parse("name=a kernel=k colour=red").unwrap_err().message, "unknown key `colour`");
        assert_eq!(parse("name=a kernel=k\nname=a kernel=j").unwrap_err().message, "duplicate name `a`");
        assert_eq!(parse("name=a kernel=k initrd=").unwrap_err().message, "initrd ``: give a file name in \\EFI\\HV");
        assert_eq!(
            parse("name=a kernel=k initrd=..\\x.gz").unwrap_err().message,
            "initrd `..\\x.gz`: give a file name in \\EFI\\HV"
        );
        assert_eq!(parse("name=a initrd=i.gz").unwrap_err().message, "missing kernel=");
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999G"), None);
    }
}
