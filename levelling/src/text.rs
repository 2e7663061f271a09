//! The human text form of featuresets and policies, and its parser.
//!
//! A spec is a list of items separated by commas or newlines; `#` starts a comment
//! that runs to the end of the line; blanks around items are ignored.
//!
//! | item | meaning |
//! |---|---|
//! | `base=none` / `host` / `host-max` / `host-default` | start from nothing, the host's raw set, its guest `max`, its guest `default` (the default base) |
//! | `features=W0:W1:…` or a bare `W0:W1:…` | start from these hex words (the `xen-cpuid` form [`Featureset`]'s `Display` prints) |
//! | `+name` or `name` | set the feature (its requirements are *not* added; verification names what is missing) |
//! | `-name` | clear the feature **and everything that requires it**; the cleared extras are reported as [`Note`]s |
//! | `vendor=intel` / `amd` / `hygon` | the vendor the guest sees (default: the host's) |
//! | `host-vendors=amd+intel` | the vendors of the hosts the policy may run on (default: only the presented vendor's; see [`crate::crossvendor`]) |
//! | `signature=0x…` or `family=`/`model=`/`stepping=` | CPUID.1:EAX (default: the host's) |
//! | `brand=TEXT` or `brand-words=W0:…:W11` | brand string, 0x8000_0002..4 (default: the host's); TEXT is up to 47 characters without `,` or `#`, trimmed |
//! | `cache-ext=W0:W1:W2:W3` | 0x8000_0005.ECX/EDX, 0x8000_0006.ECX/EDX (default: the host's) |
//! | `cache-leaf4=W0:…` | CPUID.4 subleaves, four words each (default: the host's) |
//! | `clflush-line=N` | CLFLUSH line size in bytes, a multiple of 8 (1.EBX[15:8] × 8; default: the host's) |
//! | `vcpus=N` | vCPU count (default 1) |
//! | `phys-bits=N` | physical address bits (default: the host's) |
//! | `max-leaf=N` | highest basic leaf (default: the host's, at most 0xD) |
//!
//! A `vendor=` other than the host's takes nothing of the host's identity that belongs
//! to another CPU: without `brand=`/`cache-…=` the brand string is empty and, if the
//! CPUID layouts differ (AMD-compatible vs Intel), there are no cache descriptors;
//! a [`Note`] says so. [`Policy::to_text`] writes every item, so a policy levelled for
//! a pool (`hvctl cpuid level -o`) gives the same policy on every host of the pool.
//!
//! Names are the Linux `/proc/cpuinfo` names or this crate's constant names, in any
//! case. Numbers are decimal or `0x` hex. Example: `base=host-max,-avx512f,+pcid,vcpus=4`.
//!
//! The parser never panics (fuzzed: `levelling/fuzz`). Applying a spec to a host
//! gives a featureset or an unverified [`Policy`]; verification is
//! [`Policy::verify`]'s job.

use crate::features::{self, Feature};
use crate::featureset::Featureset;
use crate::host::{HostCpu, Vendor, VendorSet, brand_string, make_signature, signature_family, signature_model};
use crate::policy::Policy;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write as _;

/// Most hex words accepted in a word list.
pub const MAX_WORDS: usize = 64;
/// Most items in one spec.
pub const MAX_ITEMS: usize = 4096;

/// Where a spec starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// Nothing.
    None,
    /// The host's raw featureset.
    Host,
    /// The host's guest `max`.
    HostMax,
    /// The host's guest `default`.
    HostDefault,
    /// Explicit words.
    Words(Featureset),
}

/// One `+`/`-` modifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modifier {
    /// Set the bit.
    Set(Feature),
    /// Clear the bit and its deep dependents.
    Clear(Feature),
}

/// A parsed spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// `base=` / `features=` (None: host-default).
    pub base: Option<Base>,
    /// Modifiers in order.
    pub modifiers: Vec<Modifier>,
    /// `vendor=`.
    pub vendor: Option<Vendor>,
    /// `signature=` (or family/model/stepping folded in by [`Spec::signature_on`]).
    pub signature: Option<u32>,
    /// `family=`.
    pub family: Option<u32>,
    /// `model=`.
    pub model: Option<u32>,
    /// `stepping=`.
    pub stepping: Option<u32>,
    /// `vcpus=`.
    pub vcpus: Option<u32>,
    /// `phys-bits=`.
    pub phys_bits: Option<u8>,
    /// `max-leaf=`: the highest basic leaf the guest sees (CPUID.0:EAX).
    pub max_leaf: Option<u32>,
    /// `host-vendors=`.
    pub host_vendors: Option<VendorSet>,
    /// `brand=` / `brand-words=`.
    pub brand: Option<[u32; 12]>,
    /// `cache-ext=`.
    pub cache_ext: Option<[u32; 4]>,
    /// `cache-leaf4=`.
    pub cache_leaf4: Option<Vec<[u32; 4]>>,
    /// `clflush-line=`, in 8-byte units as CPUID.1:EBX[15:8] has it.
    pub clflush_size: Option<u8>,
}

/// Why a spec did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextError {
    /// 1-based line.
    pub line: usize,
    /// The offending item (truncated to 40 characters).
    pub item: String,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, `{}`: {}", self.line, self.item, self.what)
    }
}

/// Something applying a spec did that the user should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// `vendor=` names another vendor than the host's, and the spec leaves parts of
    /// the identity out; they are not taken from the host.
    ForeignIdentity {
        /// The presented vendor.
        vendor: Vendor,
        /// The host's.
        host: Vendor,
        /// The items not given (`brand=`, `cache-ext=`, `cache-leaf4=`, `signature=`):
        /// the first three are left empty, the signature is the host's.
        missing: Vec<&'static str>,
    },
    /// `-feature` also cleared these dependents.
    AlsoCleared {
        /// The feature named.
        feature: Feature,
        /// What else went.
        cleared: Vec<Feature>,
    },
    /// `max-leaf=` hid leaves, and with them these features (and what needs them).
    MaxLeafCleared {
        /// The new highest basic leaf.
        max_leaf: u32,
        /// The features that went.
        cleared: Vec<Feature>,
    },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::ForeignIdentity { vendor, host, missing } => {
                write!(f, "vendor={} on a {host} host without", vendor.name())?;
                for (i, m) in missing.iter().enumerate() {
                    write!(f, "{}{m}", if i == 0 { " " } else { ", " })?;
                }
                f.write_str(":")?;
                let mut first = true;
                for (item, what) in [
                    ("brand=", "the brand string is empty"),
                    ("cache-ext=", "no 0x80000005/6 cache descriptors"),
                    ("cache-leaf4=", "no leaf 4 cache descriptors"),
                    ("signature=", "the signature is the host's"),
                ] {
                    if missing.contains(&item) {
                        write!(f, "{}{what}", if first { " " } else { ", " })?;
                        first = false;
                    }
                }
                Ok(())
            }
            Note::MaxLeafCleared { max_leaf, cleared } => {
                write!(f, "max-leaf={max_leaf:#x} also cleared the features of higher leaves:")?;
                for c in cleared {
                    write!(f, " {}", c.info().map_or("unnamed", |i| i.name))?;
                }
                Ok(())
            }
            Note::AlsoCleared { feature, cleared } => {
                write!(f, "-{} also cleared what requires it:", feature.info().map_or("unnamed", |i| i.name))?;
                for c in cleared {
                    write!(f, " {}", c.info().map_or("unnamed", |i| i.name))?;
                }
                Ok(())
            }
        }
    }
}

fn parse_num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) if !h.is_empty() && h.len() <= 8 => u32::from_str_radix(h, 16).ok(),
        Some(_) => None,
        None if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

/// Parse the hex word form `xxxxxxxx:xxxxxxxx:…` (1–8 hex digits per word, at most
/// [`MAX_WORDS`] words).
pub fn parse_hex_words(s: &str) -> Option<Featureset> {
    let mut words = Vec::new();
    for w in s.split(':') {
        if w.is_empty() || w.len() > 8 || !w.bytes().all(|b| b.is_ascii_hexdigit()) || words.len() >= MAX_WORDS {
            return None;
        }
        words.push(u32::from_str_radix(w, 16).ok()?);
    }
    Some(Featureset::from_words(&words))
}

/// Exactly `N` hex words separated by `:`.
fn words<const N: usize>(s: &str) -> Option<[u32; N]> {
    let fs = parse_hex_words(s)?;
    if fs.words().len() != N {
        return None;
    }
    let mut out = [0u32; N];
    for (o, w) in out.iter_mut().zip(fs.words()) {
        *o = *w;
    }
    Some(out)
}

/// The 0x8000_0002..4 registers of a brand string (NUL-padded; at most 47 ASCII
/// characters, so a NUL ends it).
pub fn brand_regs(text: &str) -> Option<[u32; 12]> {
    if text.len() > 47 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 48];
    for (b, c) in bytes.iter_mut().zip(text.bytes()) {
        *b = c;
    }
    let mut regs = [0u32; 12];
    for (r, c) in regs.iter_mut().zip(bytes.chunks_exact(4)) {
        *r = u32::from_le_bytes(c.try_into().unwrap_or([0; 4]));
    }
    Some(regs)
}

/// Parse a spec.
pub fn parse_spec(text: &str) -> Result<Spec, TextError> {
    let mut spec = Spec::default();
    let mut count = 0usize;
    for (ln, raw_line) in text.lines().enumerate() {
        let line = raw_line.split('#').next().unwrap_or("");
        for raw in line.split(',') {
            let item = raw.trim();
            if item.is_empty() {
                continue;
            }
            count += 1;
            let err = |what: String| TextError { line: ln + 1, item: item.chars().take(40).collect(), what };
            if count > MAX_ITEMS {
                return Err(err(format!("more than {MAX_ITEMS} items")));
            }
            parse_item(&mut spec, item).map_err(err)?;
        }
    }
    Ok(spec)
}

fn set_once<T>(slot: &mut Option<T>, v: T, key: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("`{key}` given twice"));
    }
    *slot = Some(v);
    Ok(())
}

fn parse_item(spec: &mut Spec, item: &str) -> Result<(), String> {
    if let Some((key, value)) = item.split_once('=') {
        let (key, value) = (key.trim(), value.trim());
        let num = || parse_num(value).ok_or_else(|| format!("`{value}` is not a number (decimal or 0x hex)"));
        return match key {
            "base" => {
                let b = match value {
                    "none" => Base::None,
                    "host" => Base::Host,
                    "host-max" | "max" => Base::HostMax,
                    "host-default" | "default" => Base::HostDefault,
                    _ => return Err(String::from("unknown base (none, host, host-max, host-default)")),
                };
                if !spec.modifiers.is_empty() {
                    return Err(String::from("the base must come before any +/- modifier"));
                }
                set_once(&mut spec.base, b, "base/features")
            }
            "features" => {
                let fs = parse_hex_words(value).ok_or_else(|| String::from("expected hex words separated by `:`"))?;
                if !spec.modifiers.is_empty() {
                    return Err(String::from("the base must come before any +/- modifier"));
                }
                set_once(&mut spec.base, Base::Words(fs), "base/features")
            }
            "vendor" => {
                let v = Vendor::parse(value).ok_or_else(|| String::from("unknown vendor (intel, amd, hygon)"))?;
                set_once(&mut spec.vendor, v, key)
            }
            "host-vendors" => {
                let v = VendorSet::parse(value).ok_or_else(|| {
                    String::from("expected vendors joined by `+` (intel, amd, hygon), e.g. amd+intel")
                })?;
                set_once(&mut spec.host_vendors, v, key)
            }
            "brand" => {
                let b =
                    brand_regs(value).ok_or_else(|| String::from("a brand string has at most 47 ASCII characters"))?;
                set_once(&mut spec.brand, b, "brand/brand-words")
            }
            "brand-words" => {
                let w = words::<12>(value).ok_or_else(|| String::from("expected 12 hex words separated by `:`"))?;
                set_once(&mut spec.brand, w, "brand/brand-words")
            }
            "clflush-line" => {
                let n = num()?;
                let units = u8::try_from(n / 8)
                    .ok()
                    .filter(|u| n % 8 == 0 && *u > 0)
                    .ok_or_else(|| String::from("the CLFLUSH line is a multiple of 8 bytes, 8 to 2040"))?;
                set_once(&mut spec.clflush_size, units, key)
            }
            "cache-ext" => {
                let w = words::<4>(value).ok_or_else(|| String::from("expected 4 hex words separated by `:`"))?;
                set_once(&mut spec.cache_ext, w, key)
            }
            "cache-leaf4" => {
                let fs = parse_hex_words(value)
                    .filter(|f| f.words().len() % 4 == 0)
                    .ok_or_else(|| String::from("expected hex words separated by `:`, four per CPUID.4 subleaf"))?;
                let subs = fs.words().chunks_exact(4).filter_map(|c| <[u32; 4]>::try_from(c).ok()).collect();
                set_once(&mut spec.cache_leaf4, subs, key)
            }
            "signature" => set_once(&mut spec.signature, num()?, key),
            "family" => set_once(&mut spec.family, num()?.min(0xff + 0xf), key),
            "model" => set_once(&mut spec.model, num()?.min(0xff), key),
            "stepping" => set_once(&mut spec.stepping, num()?.min(0xf), key),
            "vcpus" => set_once(&mut spec.vcpus, num()?, key),
            "max-leaf" => set_once(&mut spec.max_leaf, num()?, key),
            "phys-bits" => {
                let n = num()?;
                let n = u8::try_from(n).map_err(|_| String::from("physical address bits must be below 256"))?;
                set_once(&mut spec.phys_bits, n, key)
            }
            _ => Err(format!("unknown key `{key}`")),
        };
    }
    if item.contains(':') {
        let fs = parse_hex_words(item).ok_or_else(|| String::from("expected hex words separated by `:`"))?;
        if !spec.modifiers.is_empty() {
            return Err(String::from("the base must come before any +/- modifier"));
        }
        return set_once(&mut spec.base, Base::Words(fs), "base/features");
    }
    let (clear, name) = match item.as_bytes().first() {
        Some(b'-') => (true, item.get(1..).unwrap_or("")),
        Some(b'+') => (false, item.get(1..).unwrap_or("")),
        _ => (false, item),
    };
    let f = Feature::from_name(name.trim()).ok_or_else(|| format!("unknown feature `{}`", name.trim()))?;
    spec.modifiers.push(if clear { Modifier::Clear(f) } else { Modifier::Set(f) });
    Ok(())
}

impl Spec {
    /// The featureset this spec gives on `host`, with notes on what `-` modifiers
    /// also cleared.
    pub fn featureset_on(&self, host: &HostCpu) -> (Featureset, Vec<Note>) {
        let mut fs = match &self.base {
            Some(Base::None) => Featureset::new(),
            Some(Base::Host) => host.raw.clone(),
            Some(Base::HostMax) => host.max().set,
            Some(Base::HostDefault) | None => host.default_set().set,
            Some(Base::Words(w)) => w.clone(),
        };
        let mut notes = Vec::new();
        for m in &self.modifiers {
            match *m {
                Modifier::Set(f) => fs.set_bit(f.word(), f.bit(), true),
                Modifier::Clear(f) => {
                    fs.set_bit(f.word(), f.bit(), false);
                    let deps = features::deep_dependents(f).and(&fs);
                    if !deps.is_empty() {
                        fs = fs.and_not(&deps);
                        notes.push(Note::AlsoCleared {
                            feature: f,
                            cleared: deps.bits().map(|(w, b)| Feature::new(w, b)).collect(),
                        });
                    }
                }
            }
        }
        if let Some(max_leaf) = self.max_leaf {
            // Features the guest could no longer see (their leaf is above the new
            // maximum) go, with what depends on them; the note says which.
            let mut hidden = Featureset::new();
            for (w, b) in fs.bits() {
                let f = Feature::new(w, b);
                if f.location().is_some_and(|l| l.leaf < 0x8000_0000 && l.leaf > max_leaf) {
                    hidden.set_bit(w, b, true);
                    hidden = hidden.or(&features::deep_dependents(f).and(&fs));
                }
            }
            if !hidden.is_empty() {
                fs = fs.and_not(&hidden);
                notes.push(Note::MaxLeafCleared {
                    max_leaf,
                    cleared: hidden.bits().map(|(w, b)| Feature::new(w, b)).collect(),
                });
            }
        }
        (fs, notes)
    }

    /// The CPUID.1:EAX signature this spec gives on `host`.
    pub fn signature_on(&self, host: &HostCpu) -> u32 {
        let base = self.signature.unwrap_or(host.signature);
        if self.family.is_none() && self.model.is_none() && self.stepping.is_none() {
            return base;
        }
        make_signature(
            self.family.unwrap_or_else(|| signature_family(base)),
            self.model.unwrap_or_else(|| signature_model(base)),
            self.stepping.unwrap_or(base & 0xf),
        )
    }

    /// The (unverified) policy this spec gives on `host`.
    pub fn policy_on(&self, host: &HostCpu) -> (Policy, Vec<Note>) {
        let (fs, mut notes) = self.featureset_on(host);
        let mut p = Policy::from_host(host, fs, self.vcpus.unwrap_or(1));
        if let Some(v) = self.vendor {
            p.vendor = v;
        }
        if p.vendor != host.vendor {
            // The host's brand string and (for another layout) caches describe another CPU.
            let mut missing = Vec::new();
            if self.brand.is_none() {
                p.brand = [0; 12];
                missing.push("brand=");
            }
            if p.vendor.is_amd_compatible() != host.vendor.is_amd_compatible() {
                if self.cache_ext.is_none() {
                    p.cache_ext = [0; 4];
                    missing.push("cache-ext=");
                }
                if self.cache_leaf4.is_none() {
                    p.cache_leaf4 = Vec::new();
                    if !p.vendor.is_amd_compatible() {
                        missing.push("cache-leaf4=");
                    }
                }
            }
            if self.signature.is_none() && self.family.is_none() {
                missing.push("signature=");
            }
            if !missing.is_empty() {
                notes.push(Note::ForeignIdentity { vendor: p.vendor, host: host.vendor, missing });
            }
        }
        if let Some(b) = self.brand {
            p.brand = b;
        }
        if let Some(c) = self.cache_ext {
            p.cache_ext = c;
        }
        if let Some(c) = self.clflush_size {
            p.clflush_size = c;
        }
        if let Some(c) = &self.cache_leaf4 {
            p.cache_leaf4 = c.clone();
        }
        p.host_vendors = self.host_vendors.unwrap_or_default().normalized_for(p.vendor);
        p.signature = self.signature_on(host);
        if let Some(b) = self.phys_bits {
            p.phys_bits = b;
        }
        if let Some(m) = self.max_leaf {
            // A maximum above the host's is kept as asked, for verify() to refuse.
            p.basic_max = m;
        }
        (p, notes)
    }
}

/// The names of the known bits in `fs`, space-separated, in ABI order; unknown bits
/// as `w<word>b<bit>`.
pub fn names(fs: &Featureset) -> String {
    let mut s = String::new();
    for (w, b) in fs.bits() {
        if !s.is_empty() {
            s.push(' ');
        }
        match Feature::new(w, b).info() {
            Some(i) => s.push_str(i.name),
            None => {
                let _ = write!(s, "w{w}b{b}");
            }
        }
    }
    s
}

/// A featureset as a self-contained spec: `base=none,+fpu,+vme,…`, with unknown bits
/// folded into a `features=` base instead.
pub fn featureset_to_spec(fs: &Featureset) -> String {
    let known = features::known_mask();
    let unknown = fs.and_not(&known);
    let mut s = if unknown.is_empty() { String::from("base=none") } else { format!("features={unknown}") };
    for (w, b) in fs.and(&known).bits() {
        if let Some(i) = Feature::new(w, b).info() {
            s.push_str(",+");
            s.push_str(i.name);
        }
    }
    s
}

impl Policy {
    /// The items of the policy's spec, in the order [`Policy::to_text`] writes them.
    fn spec_items(&self) -> Vec<String> {
        let mut items = Vec::new();
        items.push(format!("vendor={}", self.vendor.name()));
        if self.is_cross_vendor() {
            items.push(format!("host-vendors={}", self.allowed_vendors()));
        }
        items.push(format!("signature={:#010x}", self.signature));
        let text = brand_string(&self.brand);
        if brand_regs(&text) == Some(self.brand) && !text.contains([',', '#']) {
            items.push(format!("brand={text}"));
        } else {
            let w: Vec<String> = self.brand.iter().map(|w| format!("{w:08x}")).collect();
            items.push(format!("brand-words={}", w.join(":")));
        }
        let w: Vec<String> = self.cache_ext.iter().map(|w| format!("{w:08x}")).collect();
        items.push(format!("cache-ext={}", w.join(":")));
        if !self.cache_leaf4.is_empty() {
            let w: Vec<String> = self.cache_leaf4.iter().flatten().map(|w| format!("{w:08x}")).collect();
            items.push(format!("cache-leaf4={}", w.join(":")));
        }
        items.push(format!("clflush-line={}", u32::from(self.clflush_size) * 8));
        items.push(format!("vcpus={}", self.vcpus));
        items.push(format!("phys-bits={}", self.phys_bits));
        items.push(format!("max-leaf={:#x}", self.basic_max));
        items.push(format!("features={}", self.features));
        items
    }

    /// The policy as a spec file that [`parse_spec`] reads back: on a host with the
    /// same XSAVE layout it gives back this policy (vendor, signature, brand string and
    /// caches are written out, so it does not depend on the host's). Comments name the
    /// signature, the features and, for a cross-vendor policy, the caveats per vendor.
    pub fn to_text(&self) -> String {
        let mut s = String::from("# hvctl cpuid policy v1\n");
        for item in self.spec_items() {
            s.push_str(&item);
            if item.starts_with("signature=") {
                let _ = write!(
                    s,
                    "  # family {:#x} model {:#x} stepping {}",
                    signature_family(self.signature),
                    signature_model(self.signature),
                    self.signature & 0xf
                );
            }
            s.push('\n');
        }
        let _ = writeln!(s, "# {}", names(&self.features));
        for (v, caveats) in self.caveats().into_iter().filter(|(_, c)| !c.is_empty()) {
            let _ = write!(s, "# caveats on {v} hosts:");
            for c in &caveats {
                let _ = write!(s, " {}", c.name());
            }
            s.push('\n');
        }
        s
    }

    /// The policy as a one-line spec (the items of [`Policy::to_text`] joined by
    /// commas, no comments), for `hvctl domain create --cpuid SPEC`.
    pub fn to_spec(&self) -> String {
        self.spec_items().join(",")
    }
}

impl core::str::FromStr for Featureset {
    type Err = TextError;
    /// Parse the hex word form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex_words(s.trim()).ok_or_else(|| TextError {
            line: 1,
            item: s.chars().take(40).collect(),
            what: String::from("expected hex words separated by `:`"),
        })
    }
}
