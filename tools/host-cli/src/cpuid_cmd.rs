//! `hvctl cpuid …`: CPUID dumps, featuresets, policies and cross-host levelling. A
//! host is this machine's CPUID, a dump file, or a hypervisor reached over the wire
//! (`Request::HostCpuid`: the raw leaves its boot probe read), so a fleet is levelled
//! without logging in to each host. All logic is in the `levelling` crate; this module
//! gets the records, calls it, and prints tables or JSON.

use crate::transport::{self, Client};
use crate::{CliError, connection_err, err, remote_err};
use clap::{Args, Subcommand};
use levelling::guest::DropReason;
use levelling::{Feature, Featureset, HostCpu, Policy, Vendor, WORDS, dump, guest, text};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use wire::{Request, Response};

/// Arguments of `hvctl cpuid`.
#[derive(Debug, Args)]
pub struct CpuidArgs {
    #[command(subcommand)]
    command: CpuidCommand,
}

const DUMP_HELP: &str = "\
File format (v1): UTF-8 text. The first line is `# hvctl cpuid dump v1`; other lines
starting with `#` are comments (the first `# source: ...` says where the dump came
from). Each data line is six lower-case 8-digit hex fields separated by single spaces:
`leaf subleaf eax ebx ecx edx`, e.g.
    00000007 00000000 00000000 219c07ab 00000000 00000000
Leaves that ignore ECX are recorded with subleaf 00000000. Leaves walked: basic
0..=CPUID.0.EAX, hypervisor 0x40000000.. (if 1.ECX.HYPERVISOR), extended
0x80000000..=CPUID.80000000h.EAX; subleaves of 4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14,
0x17, 0x18, 0x1B, 0x1D, 0x1F, 0x20, 0x24, 0x8000001D, 0x80000020, 0x80000026 by their
documented termination rules, with hard caps.";

const LEVEL_HELP: &str = "\
The policy presents one vendor whatever the host: its vendor string, signature, brand
string and caches are those of the first dump of that vendor. Hosts of other vendors
are allowed (host-vendors=...) with the caveats listed; features whose XSAVE component
is laid out differently on two hosts are dropped, with the reason. Hosts that cannot
run guests are left out, with their reason.";

fn parse_vendor(s: &str) -> Result<Vendor, String> {
    Vendor::parse(s).ok_or_else(|| format!("unknown vendor `{s}` (intel, amd, hygon)"))
}

#[derive(Debug, Subcommand)]
enum CpuidCommand {
    /// Dump this host's raw CPUID (every leaf and subleaf) in the v1 dump format, or,
    /// with --connect/--from TARGET, the CPUID of the machine a hypervisor runs on.
    #[command(after_help = DUMP_HELP)]
    Dump {
        /// The hypervisor whose host to dump (any --connect target); the same as the
        /// global --connect. Without either, this machine's CPUID.
        #[arg(long, value_name = "TARGET")]
        from: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The `# source:` comment (default: the brand string and "captured with hvctl cpuid dump").
        #[arg(long)]
        source: Option<String>,
    },
    /// Show a host's featureset by name, grouped by leaf, with what guests get.
    Show {
        /// A dump file.
        #[arg(required_unless_present = "host", conflicts_with = "host")]
        file: Option<PathBuf>,
        /// Use this host's CPUID instead of a file.
        #[arg(long)]
        host: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Level several hosts into one policy: the common set, what each host loses, the
    /// vendor the guest sees, and for hosts of mixed vendors what crossing costs.
    #[command(after_help = LEVEL_HELP)]
    Level {
        /// Dump files, one per host.
        #[arg(required_unless_present = "from")]
        files: Vec<PathBuf>,
        /// Hypervisors whose hosts to level, comma-separated targets (each any
        /// --connect form); their dumps are taken live over the wire, after the files.
        #[arg(long, value_name = "T1,T2,...", value_delimiter = ',')]
        from: Vec<String>,
        /// The vendor the guest sees on every host (default: the first host's).
        #[arg(long, value_parser = parse_vendor)]
        vendor: Option<Vendor>,
        /// Write the levelled policy (text form, for `hvctl domain create --cpuid FILE`) here.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check whether a policy (a spec file) can run on a host. Exit 0 compatible, 1 not.
    Check {
        /// The policy file (the text form `hvctl cpuid policy -o` writes).
        policy: PathBuf,
        /// The host: a dump file, or a hypervisor target (any --connect form, e.g.
        /// unix:PATH:PORT): a value that parses as a target is one.
        #[arg(long, required_unless_present = "host", conflicts_with = "host", value_name = "FILE|TARGET")]
        on: Option<String>,
        /// Check against this host's CPUID.
        #[arg(long)]
        host: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build and verify a policy from a base and modifiers, e.g. `base=host-max,-avx512f,+pcid,vcpus=4`.
    /// Exit 0 if it verifies, 1 if it is rejected.
    Policy {
        /// The spec (see the levelling crate's `text` module).
        spec: String,
        /// The host: a dump file, or a hypervisor target (as for `check --on`).
        #[arg(long, required_unless_present = "host", conflicts_with = "host", value_name = "FILE|TARGET")]
        on: Option<String>,
        /// Build on this host's CPUID.
        #[arg(long)]
        host: bool,
        /// Write the verified policy (text form) to this file.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run `hvctl cpuid …`. `connect` is the global `--connect` (only `dump` uses it: the
/// other commands name their hosts themselves, and none falls back to
/// `$HVCTL_CONNECT`, so a plain `cpuid dump` is always this machine).
pub fn run(connect: Option<String>, timeout: Duration, args: CpuidArgs) -> Result<ExitCode, CliError> {
    match args.command {
        CpuidCommand::Dump { from, output, source } => {
            let target = match (from, connect) {
                (Some(f), Some(c)) if f != c => {
                    return Err(err(format!("cpuid dump: --from {f} and --connect {c} name different hypervisors")));
                }
                (f, c) => f.or(c),
            };
            cmd_dump(target.as_deref(), timeout, output.as_deref(), source)
        }
        CpuidCommand::Show { file, host: _, json } => {
            let h = load_host(&file.map_or(HostSource::ThisMachine, HostSource::File), timeout)?;
            print_out(if json { show_json(&h) } else { show_text(&h) });
            Ok(ExitCode::SUCCESS)
        }
        CpuidCommand::Level { files, from, vendor, output, json } => {
            let sources: Vec<HostSource> =
                files.into_iter().map(HostSource::File).chain(from.into_iter().map(HostSource::Remote)).collect();
            cmd_level(&sources, timeout, vendor, output.as_deref(), json)
        }
        CpuidCommand::Check { policy, on, host: _, json } => {
            cmd_check(&policy, &HostSource::from_on(on), timeout, json)
        }
        CpuidCommand::Policy { spec, on, host: _, output, json } => {
            cmd_policy(&spec, &HostSource::from_on(on), timeout, output.as_deref(), json)
        }
    }
}

/// Where a host's CPUID comes from.
#[derive(Debug, Clone)]
enum HostSource {
    /// This machine, through the CPUID instruction.
    ThisMachine,
    /// A dump file.
    File(PathBuf),
    /// The machine a hypervisor runs on, by `Request::HostCpuid` (a `--connect` target).
    Remote(String),
}

impl HostSource {
    /// `--on VALUE`: a target if it parses as one (`unix:`, `vsock:`, `tcp:`, ...), else a
    /// dump file; absent means `--host` (this machine). A mistyped target therefore
    /// reads as a file name and fails with "cannot read", naming it.
    fn from_on(on: Option<String>) -> HostSource {
        match on {
            None => HostSource::ThisMachine,
            Some(v) if transport::parse_target(&v).is_ok() => HostSource::Remote(v),
            Some(v) => HostSource::File(PathBuf::from(v)),
        }
    }
}

/// The raw CPUID of the machine the hypervisor at `target` runs on, and the report's
/// `source` line. Errors name the target.
pub fn remote_records(target: &str, timeout: Duration) -> Result<(String, Vec<levelling::CpuidRecord>), CliError> {
    let opts = transport::Options { connect: Some(target.to_string()), timeout };
    let mut client = Client::connect(&opts).map_err(|e| CliError(format!("{target}: {e}"), e.1))?;
    match client.call(&Request::HostCpuid).map_err(|e| CliError(format!("{target}: {e}"), e.1))? {
        Response::HostCpuid(r) => Ok((
            r.source,
            r.records
                .into_iter()
                .map(|l| levelling::CpuidRecord { leaf: l.leaf, subleaf: l.subleaf, regs: l.regs })
                .collect(),
        )),
        Response::Error(e) => Err(remote_err(format!("{target} refused host-cpuid: {e}"))),
        _ => Err(connection_err(format!("{target} answered host-cpuid with the wrong message"))),
    }
}

fn print_out(s: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed pipe (e.g. `| head`) is not an error worth a message.
    let _ = out.write_all(s.as_bytes());
}

/// This host's CPUID records, through the `cpuid` instruction.
#[cfg(target_arch = "x86_64")]
fn live_records() -> Result<Vec<levelling::CpuidRecord>, CliError> {
    Ok(levelling::enumerate(|leaf, sub| {
        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
        [r.eax, r.ebx, r.ecx, r.edx]
    }))
}

#[cfg(not(target_arch = "x86_64"))]
fn live_records() -> Result<Vec<levelling::CpuidRecord>, CliError> {
    Err(err("this host is not x86_64; there is no CPUID to read"))
}

/// A loaded host: where it came from and what it is.
struct LoadedHost {
    label: String,
    source: Option<String>,
    cpu: HostCpu,
}

fn load_host(from: &HostSource, timeout: Duration) -> Result<LoadedHost, CliError> {
    match from {
        HostSource::ThisMachine => {
            let recs = live_records()?;
            let cpu = HostCpu::from_records(&recs).map_err(|e| err(format!("this host: {e}")))?;
            Ok(LoadedHost { label: String::from("this host"), source: Some(String::from("live CPUID")), cpu })
        }
        HostSource::Remote(target) => {
            let (source, recs) = remote_records(target, timeout)?;
            // A dump that does not describe a CPU is the hypervisor's fault: exit 4.
            let cpu = HostCpu::from_records(&recs).map_err(|e| remote_err(format!("{target}'s CPUID: {e}")))?;
            Ok(LoadedHost { label: target.clone(), source: Some(source), cpu })
        }
        HostSource::File(p) => {
            let label = p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
            let text = std::fs::read_to_string(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
            let d = dump::parse_dump(&text).map_err(|e| err(format!("{}: {e}", p.display())))?;
            let cpu = HostCpu::from_records(&d.records).map_err(|e| err(format!("{}: {e}", p.display())))?;
            Ok(LoadedHost { label, source: d.source, cpu })
        }
    }
}

fn cmd_dump(
    target: Option<&str>,
    timeout: Duration,
    output: Option<&Path>,
    source: Option<String>,
) -> Result<ExitCode, CliError> {
    let (recs, default_source) = match target {
        None => {
            let recs = live_records()?;
            let brand = HostCpu::from_records(&recs).map(|h| h.brand_string()).unwrap_or_default();
            (recs, format!("{brand}, captured with hvctl cpuid dump"))
        }
        Some(t) => {
            let (src, recs) = remote_records(t, timeout)?;
            (recs, format!("{src}, fetched from {t} with hvctl cpuid dump"))
        }
    };
    let source = source.unwrap_or(default_source);
    let text = dump::format_dump(&recs, &source);
    match output {
        Some(p) => std::fs::write(p, text).map_err(|e| err(format!("cannot write {}: {e}", p.display())))?,
        None => print_out(text),
    }
    Ok(ExitCode::SUCCESS)
}

fn name(f: Feature) -> &'static str {
    f.info().map_or("unnamed", |i| i.name)
}

/// What guests get of one host bit, as a short phrase.
fn guest_verdict(h: &HostCpu, max: &guest::Derived, def: &guest::Derived, f: Feature) -> String {
    if f.is_in(&def.set) {
        let synth = f.info().is_some_and(|i| i.is_synth()) && !f.is_in(&h.raw);
        return String::from(if synth { "default (synthesized for every guest)" } else { "default" });
    }
    if f.is_in(&max.set) {
        return String::from("on request (max only)");
    }
    match max.dropped.iter().find(|(g, _)| *g == f) {
        Some((_, DropReason::NotVirtualizable(r))) => format!("never: {r}"),
        Some((_, DropReason::MissingDependency(m))) => format!("never on this host: requires {}", name(*m)),
        Some((_, r @ (DropReason::XstateUndescribed { .. } | DropReason::NoXsaveLeaf { .. }))) => {
            format!("never on this host: {r}")
        }
        Some((_, DropReason::HostCannotRunGuests(_))) => String::from("never on this host (it cannot run guests)"),
        Some((_, r @ DropReason::HostFault(_))) => format!("never on this host: {r}"),
        Some((_, DropReason::Unknown)) | None => String::from("never: unknown to this build"),
        Some((_, DropReason::OnlyOnRequest)) => String::from("on request (max only)"),
    }
}

fn header_lines(h: &LoadedHost) -> String {
    let c = &h.cpu;
    let mut s = String::new();
    let _ = writeln!(s, "host:        {}", h.label);
    if let Some(src) = &h.source {
        let _ = writeln!(s, "source:      {src}");
    }
    let _ = writeln!(
        s,
        "vendor:      {}, family {:#x} model {:#x} stepping {}",
        c.vendor,
        c.family(),
        c.model(),
        c.stepping()
    );
    let _ = writeln!(s, "brand:       {}", c.brand_string());
    let _ = writeln!(s, "max leaves:  basic {:#x}, extended {:#x}", c.basic_max, c.ext_max);
    let _ = writeln!(s, "addresses:   {} physical bits, {} linear bits", c.phys_bits, c.virt_bits);
    let _ = writeln!(s, "levelling:   {}", c.levelling_caps());
    if let Some(why) = c.cannot_run_guests() {
        let _ = writeln!(s, "guests:      none: this host cannot run guests: {why}");
    }
    let xs: Vec<String> = c.xstate.iter().map(|x| format!("{}:{}@{}", x.index, x.size, x.offset)).collect();
    let _ = writeln!(s, "xsave:       {}", if xs.is_empty() { String::from("none") } else { xs.join(" ") });
    s
}

fn show_text(h: &LoadedHost) -> String {
    let c = &h.cpu;
    let max = c.max();
    let def = guest::guest_default(&max.set);
    let mut s = header_lines(h);
    let _ = writeln!(s, "raw:         {}", c.raw);
    let _ = writeln!(s, "guest max:   {}", max.set);
    let _ = writeln!(s, "guest dflt:  {}", def.set);
    let shown = c.raw.or(&max.set);
    for (i, w) in WORDS.iter().enumerate() {
        let _ = writeln!(s, "\n{w} (word {i}) = {:#010x}", c.raw.word(i));
        for b in 0..32 {
            let f = Feature::new(i, b);
            if !f.is_in(&shown) {
                continue;
            }
            let _ = writeln!(s, "  {b:>2} {:<26} {}", name(f), guest_verdict(c, &max, &def, f));
        }
    }
    s
}

fn fs_json(fs: &Featureset) -> Value {
    json!({ "hex": fs.to_string(), "names": text::names(fs).split(' ').filter(|n| !n.is_empty()).collect::<Vec<_>>() })
}

fn show_json(h: &LoadedHost) -> String {
    let c = &h.cpu;
    let max = c.max();
    let def = guest::guest_default(&max.set);
    let shown = c.raw.or(&max.set);
    let words: Vec<Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let feats: Vec<Value> = (0..32)
                .map(|b| Feature::new(i, b))
                .filter(|f| f.is_in(&shown))
                .map(|f| json!({ "bit": f.bit(), "name": name(f), "host": f.is_in(&c.raw), "guest": guest_verdict(c, &max, &def, f) }))
                .collect();
            json!({ "word": i, "leaf": w.leaf, "subleaf": w.subleaf, "register": w.reg.name(), "raw": c.raw.word(i), "features": feats })
        })
        .collect();
    let v = json!({
        "host": h.label,
        "source": h.source,
        "vendor": c.vendor.to_string(),
        "family": c.family(),
        "model": c.model(),
        "stepping": c.stepping(),
        "brand": c.brand_string(),
        "basic_max": c.basic_max,
        "ext_max": c.ext_max,
        "phys_bits": c.phys_bits,
        "virt_bits": c.virt_bits,
        "levelling_caps": c.levelling_caps().to_string(),
        "cannot_run_guests": c.cannot_run_guests().map(|w| w.to_string()),
        "max_dropped": max.dropped.iter().map(|(f, r)| json!({"name": name(*f), "bit": f.to_string(), "reason": r.to_string()})).collect::<Vec<_>>(),
        "xsave": c.xstate.iter().map(|x| json!({"component": x.index, "size": x.size, "offset": x.offset})).collect::<Vec<_>>(),
        "raw": fs_json(&c.raw),
        "max": fs_json(&max.set),
        "default": fs_json(&def.set),
        "words": words,
    });
    format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
}

fn cmd_level(
    sources: &[HostSource],
    timeout: Duration,
    vendor: Option<Vendor>,
    output: Option<&Path>,
    json: bool,
) -> Result<ExitCode, CliError> {
    // Every host must answer: levelling without one would give a policy that host may
    // not run, so an unreachable hypervisor fails the command, naming it.
    let loaded = sources.iter().map(|s| load_host(s, timeout)).collect::<Result<Vec<_>, _>>()?;
    // A host that cannot run guests is not part of the pool: levelling with it would
    // empty the common set. It is named with its one reason instead.
    let (hosts, unfit): (Vec<LoadedHost>, Vec<LoadedHost>) =
        loaded.into_iter().partition(|h| h.cpu.cannot_run_guests().is_none());
    let unfit_reason = |h: &LoadedHost| h.cpu.cannot_run_guests().map(|w| w.to_string()).unwrap_or_default();
    if hosts.is_empty() {
        let why: Vec<String> = unfit.iter().map(|h| format!("{}: {}", h.label, unfit_reason(h))).collect();
        return Err(err(format!("no host of the pool can run guests ({})", why.join("; "))));
    }
    let cpus: Vec<HostCpu> = hosts.iter().map(|h| h.cpu.clone()).collect();
    let label = |i: usize| hosts.get(i).map_or_else(|| format!("host #{i}"), |h| h.label.clone());
    let pool = levelling::level_pool(&cpus, vendor).map_err(|e| {
        let msg = e.to_string();
        err(match &e {
            levelling::PoolError::DoesNotVerify { host, .. } => msg.replace(&format!("host #{host}"), &label(*host)),
            _ => msg,
        })
    })?;
    let p = &pool.policy;
    if let Some(o) = output {
        std::fs::write(o, p.to_text()).map_err(|e| err(format!("cannot write {}: {e}", o.display())))?;
    }
    let vendors: std::collections::BTreeSet<String> = hosts.iter().map(|h| h.cpu.vendor.to_string()).collect();
    let maxes: Vec<Featureset> = cpus.iter().map(|h| h.max().set).collect();
    let or_gain: Vec<Featureset> = maxes.iter().map(|m| p.features.and_not(m)).collect();
    let from = label(pool.presented_from);
    let brand = levelling::host::brand_string(&p.brand);
    let sig = |p: &Policy| {
        (
            levelling::host::signature_family(p.signature),
            levelling::host::signature_model(p.signature),
            p.signature & 0xf,
        )
    };
    let (family, model, stepping) = sig(p);
    let dropped: Vec<(Feature, String)> = pool.dropped.iter().map(|(f, r)| (*f, r.describe(label))).collect();
    if json {
        let v = json!({
            "common": fs_json(&p.features),
            "common_hash": format!("{:016x}", p.features.stable_hash()),
            "mixed_vendors": vendors.len() > 1,
            "presented": {
                "vendor": p.vendor.to_string(),
                "signature": format!("{:#010x}", p.signature),
                "family": family,
                "model": model,
                "stepping": stepping,
                "brand": brand,
                "from": from,
            },
            "host_vendors": p.allowed_vendors().iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "cross_vendor": p.is_cross_vendor(),
            "basic_max": p.basic_max,
            "ext_max": p.ext_max,
            "phys_bits": p.phys_bits,
            "virt_bits": p.virt_bits,
            "dropped": dropped.iter().map(|(f, r)| json!({ "name": name(*f), "bit": f.to_string(), "reason": r })).collect::<Vec<_>>(),
            "caveats": pool.caveats.iter().map(|c| json!({
                "name": c.caveat.name(),
                "hosts": c.hosts.iter().map(|&i| label(i)).collect::<Vec<_>>(),
                "effect": c.caveat.effect(),
                "obligation": c.caveat.obligation(),
            })).collect::<Vec<_>>(),
            "policy": p.to_text(),
            "spec": p.to_spec(),
            "policy_hash": format!("{:016x}", p.stable_hash()),
            "left_out": unfit.iter().map(|h| json!({ "host": h.label, "source": h.source, "reason": unfit_reason(h) })).collect::<Vec<_>>(),
            "hosts": hosts.iter().zip(&pool.lost).zip(&or_gain).map(|((h, lost), gain)| json!({
                "host": h.label, "source": h.source, "vendor": h.cpu.vendor.to_string(), "lost": fs_json(lost), "or_bits_added": fs_json(gain),
                "caveats": p.caveats_on(&h.cpu).iter().map(|c| c.name()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        print_out(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::new();
    let _ = writeln!(s, "common guest featureset of {} hosts (hash {:016x}):", hosts.len(), p.features.stable_hash());
    let _ = writeln!(s, "  {}", p.features);
    let _ = writeln!(s, "  {}", text::names(&p.features));
    for h in &unfit {
        let _ = writeln!(s, "left out: {} cannot run guests: {}", h.label, unfit_reason(h));
    }
    let _ = writeln!(
        s,
        "presented:   {}, family {family:#x} model {model:#x} stepping {stepping} (signature {:#010x}), brand \"{brand}\", from {from}",
        p.vendor, p.signature
    );
    let _ = writeln!(
        s,
        "limits:      max leaves basic {:#x}, extended {:#x}; {} physical, {} linear address bits",
        p.basic_max, p.ext_max, p.phys_bits, p.virt_bits
    );
    if vendors.len() > 1 {
        let names: Vec<String> = p.allowed_vendors().iter().map(|v| v.to_string()).collect();
        let _ = writeln!(
            s,
            "note: the hosts have different vendors: the guest sees {} on every host, and the policy runs on {} hosts (host-vendors={})",
            p.vendor,
            names.join(" and "),
            p.allowed_vendors()
        );
    }
    if !dropped.is_empty() {
        let _ = writeln!(s, "dropped for the pool (in every host's max):");
        for (f, r) in &dropped {
            let _ = writeln!(s, "  {f}: {r}");
        }
    }
    if !pool.caveats.is_empty() {
        let _ = writeln!(s, "caveats (the hosts of another vendor than {}):", p.vendor);
        for c in &pool.caveats {
            let on: Vec<String> = c.hosts.iter().map(|&i| label(i)).collect();
            let _ = writeln!(s, "  - {} (on {})", c.caveat, on.join(", "));
        }
    }
    let _ = writeln!(s, "policy (hash {:016x}; `hvctl domain create --cpuid SPEC`, or -o FILE):", p.stable_hash());
    let _ = writeln!(s, "  {}", p.to_spec());
    let width = hosts.iter().map(|h| h.label.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "\n{:<width$}  {:>5}  loses", "host", "count");
    for ((h, lost), gain) in hosts.iter().zip(&pool.lost).zip(&or_gain) {
        let n = lost.bits().count();
        let names = text::names(lost);
        let _ = writeln!(s, "{:<width$}  {:>5}  {}", h.label, n, if names.is_empty() { "-" } else { &names });
        if !gain.is_empty() {
            let _ = writeln!(
                s,
                "{:<width$}  {:>5}  (OR-levelled, shown although absent here: {})",
                "",
                "",
                text::names(gain)
            );
        }
    }
    print_out(s);
    Ok(ExitCode::SUCCESS)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn read_spec_file(p: &Path) -> Result<text::Spec, CliError> {
    let t = std::fs::read_to_string(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
    text::parse_spec(&t).map_err(|e| err(format!("{}: {e}", p.display())))
}

fn verdict_json(policy: &Policy, host: &HostCpu, r: &Result<(), levelling::Rejection>, notes: &[text::Note]) -> Value {
    json!({
        "caveats": policy.caveats_on(host).iter().map(|c| json!({
            "name": c.name(), "effect": c.effect(), "obligation": c.obligation(),
        })).collect::<Vec<_>>(),
        "vendor": policy.vendor.to_string(),
        "host_vendors": policy.allowed_vendors().iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "compatible": r.is_ok(),
        "reasons": r.as_ref().err().map(|rej| rej.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
        "notes": notes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "policy_hash": format!("{:016x}", policy.stable_hash()),
        "features": fs_json(&policy.features),
        "vcpus": policy.vcpus,
    })
}

/// The caveats of running `policy` on `host` (none on a host of its vendor).
fn caveat_lines(s: &mut String, policy: &Policy, host: &HostCpu) {
    let caveats = policy.caveats_on(host);
    if !caveats.is_empty() {
        let _ = writeln!(s, "caveats: the guest sees {} on this {} host:", policy.vendor, host.vendor);
        for c in caveats {
            let _ = writeln!(s, "  - {c}");
        }
    }
}

fn cmd_check(policy_file: &Path, on: &HostSource, timeout: Duration, json: bool) -> Result<ExitCode, CliError> {
    let spec = read_spec_file(policy_file)?;
    let h = load_host(on, timeout)?;
    let (policy, notes) = spec.policy_on(&h.cpu);
    let r = policy.verify(&h.cpu);
    if json {
        print_out(format!(
            "{}\n",
            serde_json::to_string_pretty(&verdict_json(&policy, &h.cpu, &r, &notes)).unwrap_or_default()
        ));
    } else {
        let mut s = String::new();
        for n in &notes {
            let _ = writeln!(s, "note: {n}");
        }
        match &r {
            Ok(()) => {
                let _ = writeln!(s, "compatible: {} can run on {}", policy_file.display(), h.label);
                caveat_lines(&mut s, &policy, &h.cpu);
            }
            Err(rej) => {
                let _ = writeln!(
                    s,
                    "incompatible: {} cannot run on {} ({} reason{}):",
                    policy_file.display(),
                    h.label,
                    rej.errors.len(),
                    plural(rej.errors.len())
                );
                for e in &rej.errors {
                    let _ = writeln!(s, "  - {e}");
                }
            }
        }
        print_out(s);
    }
    Ok(if r.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn cmd_policy(
    spec: &str,
    on: &HostSource,
    timeout: Duration,
    output: Option<&Path>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let spec = text::parse_spec(spec).map_err(|e| err(format!("spec: {e}")))?;
    let h = load_host(on, timeout)?;
    let (policy, notes) = spec.policy_on(&h.cpu);
    let r = policy.verify(&h.cpu);
    if r.is_ok()
        && let Some(p) = output
    {
        std::fs::write(p, policy.to_text()).map_err(|e| err(format!("cannot write {}: {e}", p.display())))?;
    }
    if json {
        let mut v = verdict_json(&policy, &h.cpu, &r, &notes);
        if let Some(o) = v.as_object_mut() {
            o.insert(String::from("policy"), Value::String(policy.to_text()));
        }
        print_out(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
    } else {
        let mut s = String::new();
        for n in &notes {
            let _ = writeln!(s, "note: {n}");
        }
        match &r {
            Ok(()) => {
                let _ = writeln!(s, "verified on {} (hash {:016x}):", h.label, policy.stable_hash());
                caveat_lines(&mut s, &policy, &h.cpu);
                s.push_str(&policy.to_text());
            }
            Err(rej) => {
                let _ =
                    writeln!(s, "rejected on {} ({} reason{}):", h.label, rej.errors.len(), plural(rej.errors.len()));
                for e in &rej.errors {
                    let _ = writeln!(s, "  - {e}");
                }
            }
        }
        print_out(s);
    }
    Ok(if r.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
