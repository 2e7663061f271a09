//! The control messages of a live migration (protocol v3): what `hvctl` sends to the
//! source and the destination hypervisor while it relays the record stream of
//! [`crate::migration`] between them, and what they answer.
//!
//! The hypervisors never talk to each other: `hvctl` pulls stream bytes from the source
//! (`MigrateRead`) and pushes them into the destination (`MigrateWrite`), and carries
//! the destination's verdicts back (`MigrateVerdict`). `save`/`restore` use the same
//! requests with a file in place of the other hypervisor.
//!
//! ```text
//!  hvctl                 source hv                        destination hv
//!   |-- MigrateSend{dom} -->|   MigrateSession{s}            |
//!   |-- MigrateReceive ------------------------------------->|  MigrateSession{d}
//!   |-- MigrateRead{s} ---->|   MigrateData{header, policy}  |
//!   |-- MigrateWrite{d, bytes} ----------------------------->|  ReceiveStatus{policy: Accepted | Refused}
//!   |-- MigrateVerdict{s, PolicyAccepted | PolicyRefused} ->|
//!   |-- MigrateRead{s} ---->|   pages ... (repeat)           |
//!   |-- MigrateWrite{d, bytes} ----------------------------->|  ... Complete{domain}
//!   |-- MigrateVerdict{s, Acked} ->| source domain destroyed |
//! ```

use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Serialize};

/// How the source is to migrate (the `MigrateSend` options).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// The longest pause of the guest the final round may take, in ms (default 300).
    pub downtime_ms: u64,
    /// Cap on the stream's rate in bytes/s (`None`: as fast as the relay reads).
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// The most dirty rounds after the full copy before giving up (default 30).
    pub max_rounds: u32,
    /// Throttle the guest's vCPUs when it dirties memory faster than it can be sent.
    pub throttle: bool,
    /// Send a digest of all memory at pause; the destination compares it with its copy
    /// before the domain runs (costs one pass over memory on each side, in the downtime).
    pub verify_memory: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self { downtime_ms: 300, bandwidth_bytes_per_sec: None, max_rounds: 30, throttle: false, verify_memory: false }
    }
}

/// Where a sending migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SendState {
    /// Header and policy are out; waiting for the destination's verdict on the policy.
    AwaitPolicyVerdict,
    /// Pre-copy rounds (the guest runs).
    Precopy,
    /// The guest is paused; the last dirty pages and the vCPU state are going out.
    StopAndCopy,
    /// Everything is out; waiting for the destination to confirm it runs the domain.
    AwaitAck,
    /// The destination has the domain; the source domain is gone.
    Completed,
    /// Failed; the source domain runs on (see [`MigrateProgress::failure`]).
    Failed,
}

impl SendState {
    /// A short name for tables.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AwaitPolicyVerdict => "await-policy-verdict",
            Self::Precopy => "precopy",
            Self::StopAndCopy => "stop-and-copy",
            Self::AwaitAck => "await-ack",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Whether the migration is over.
    pub const fn is_over(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

impl fmt::Display for SendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The figures of a finished migration, as the source measured them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct MigrateReport {
    /// Dirty rounds after the full copy, including the final one.
    pub rounds: u32,
    /// Pages sent in all rounds (zero or not).
    pub pages_sent: u64,
    /// Pages sent more than once (`pages_sent` − the domain's pages).
    pub pages_resent: u64,
    /// Stream bytes handed to the relay.
    pub bytes_sent: u64,
    /// From `MigrateSend` to the acknowledgement, in ms.
    pub duration_ms: u64,
    /// Measured downtime: from the guest's pause on the source to the destination's
    /// acknowledgement (it runs the domain), in ms, as the source's clock saw it.
    pub downtime_ms: u64,
    /// The downtime the policy expected when it chose to stop, in ms.
    pub estimated_downtime_ms: u64,
    /// The highest vCPU throttle applied, in percent.
    pub max_throttle_percent: u8,
    /// The digest of all guest memory at pause (with `verify_memory`).
    pub memory_digest: Option<u64>,
}

/// The state of a sending migration (the answer to `MigrateSend`, `MigrateRead`,
/// `MigrateVerdict` and `MigrateCancel`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct MigrateProgress {
    /// The session (the handle of later requests).
    pub session: u32,
    /// The domain being sent.
    pub domain: u32,
    /// Where it is (`None` only in a default value).
    pub state: Option<SendState>,
    /// The current dirty round (0 = the full copy).
    pub round: u32,
    /// The domain's pages.
    pub pages_total: u64,
    /// Pages sent so far, all rounds.
    pub pages_sent: u64,
    /// Stream bytes handed out so far.
    pub bytes_sent: u64,
    /// Pages the last peek found dirty.
    pub dirty_pages: u64,
    /// The dirty rate of the last round, pages/s.
    pub dirty_pages_per_sec: u64,
    /// The measured bandwidth so far, bytes/s.
    pub bandwidth_bytes_per_sec: u64,
    /// The downtime a stop now would take at that bandwidth, in ms.
    pub estimated_downtime_ms: u64,
    /// The vCPU throttle now, in percent.
    pub throttle_percent: u8,
    /// Why it failed (state `Failed`).
    pub failure: Option<String>,
    /// The figures, once `Completed`.
    pub report: Option<MigrateReport>,
}

/// What the destination said, carried back to the source by the relay.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeerVerdict {
    /// The destination can run the CPUID policy: memory may move.
    PolicyAccepted,
    /// The destination refused (its reason): nothing more moves, the source runs on.
    Refused(String),
    /// The destination has the whole domain and runs it.
    Acked,
    /// The relay or the destination failed (broken connection, checksum error, …).
    Failed(String),
}

/// Where a receiving migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReceiveState {
    /// Waiting for the header and the CPUID policy.
    AwaitPolicy,
    /// The policy was accepted; memory is arriving.
    Receiving,
    /// The domain is complete and running.
    Complete,
    /// The partial domain was thrown away (see [`ReceiveStatus::error`]).
    Discarded,
}

impl ReceiveState {
    /// A short name for tables.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AwaitPolicy => "await-policy",
            Self::Receiving => "receiving",
            Self::Complete => "complete",
            Self::Discarded => "discarded",
        }
    }
}

/// The state of a receiving migration (the answer to `MigrateReceive`, `MigrateWrite`
/// and `MigrateAbort`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReceiveStatus {
    /// The session.
    pub session: u32,
    /// Where it is.
    pub state: ReceiveState,
    /// The new domain's id, once created.
    pub domain: Option<u32>,
    /// `Some(Ok)` once the CPUID policy was accepted, `Some(Err(reason))` if refused.
    pub policy: Option<Result<(), String>>,
    /// Pages written so far (counting repeats).
    pub pages_received: u64,
    /// Stream bytes taken so far.
    pub bytes_received: u64,
    /// Why the domain was discarded.
    pub error: Option<String>,
    /// The digest of the domain's memory when it completed (only if the stream carried
    /// one to compare with).
    pub memory_digest: Option<u64>,
}
