//! CPUID featuresets, dependency-checked policies and cross-host levelling.
//!
//! Guests must stay migratable between different CPUs and must never see a feature
//! the host cannot give them. This crate is the whole of that logic, `no_std` +
//! `alloc`, without `unsafe`, and panic-free by lint; the hypervisor core only
//! executes `cpuid` and calls in here.
//!
//! | module | what it is for |
//! |---|---|
//! | [`featureset`] | the versioned array of feature words and its ABI order |
//! | [`features`] | the feature table (names, bits, attributes) and the dependency table with its compile-time closure |
//! | [`guest`] | what the core cannot virtualize (one list, with reasons), levelling capabilities, guest `max`/`default` |
//! | [`dump`] | [`enumerate`] every leaf/subleaf of a CPU and the dump file format ([`format_dump`], [`parse_dump`]) |
//! | [`host`] | a host CPU read from its records ([`HostCpu`]) |
//! | [`policy`] | the full guest CPUID view ([`Policy`]) and its verification ([`Policy::verify`]) |
//! | [`table`] | the O(1) exit-path lookup ([`CpuidTable`]) |
//! | [`level`](mod@level) | levelling featuresets across hosts and featureset postcard/hash |
//! | [`pool`] | one verified policy for a pool of hosts, same vendor or not ([`level_pool`]) |
//! | [`crossvendor`] | what differs between AMD-compatible and Intel CPUs and what a levelled policy does about it (the rule table, [`Caveat`]s) |
//! | [`text`] | the human text form and its parser |
//! | [`hash`] | the stable hash (FNV-1a 64 over postcard) |
//!
//! Unlike Xen, nothing here clamps a policy: a policy a host cannot run is rejected
//! with every reason, each naming the leaf, register, bit, feature and dependency chain.
//!
//! The dump file format is documented in [`dump`].
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable,
        clippy::todo
    )
)]
#![deny(missing_docs)]

extern crate alloc;

pub mod crossvendor;
pub mod dump;
pub mod features;
pub mod featureset;
pub mod guest;
pub mod hash;
pub mod host;
pub mod level;
pub mod policy;
pub mod pool;
pub mod table;
pub mod text;

pub use crossvendor::Caveat;
pub use dump::{CpuidRecord, Dump, DumpError, enumerate, format_dump, parse_dump};
pub use features::{Feature, FeatureInfo};
pub use featureset::{Featureset, NWORDS, WORDS};
pub use guest::{LevellingCaps, levelling_caps};
pub use host::{HostCpu, HostError, Unfit, Vendor, VendorSet};
pub use level::{Levelled, level};
pub use policy::{Policy, PolicyError, Rejection};
pub use pool::{PoolError, PoolPolicy, level_pool};
pub use table::{CpuidTable, VcpuState};
pub use text::{Spec, TextError, parse_spec};
