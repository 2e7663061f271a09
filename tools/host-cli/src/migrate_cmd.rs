//! `hvctl migrate`, `hvctl save` and `hvctl restore`: live migration of a domain from
//! one hypervisor to another (protocol v3, see `wire::migrate`), and the same record
//! stream (`wire::migration`) to and from a file.
//!
//! The hypervisors never talk to each other: hvctl (or, for `--from tls://A --to
//! tls://B`, agent A: see `agent`) pulls stream bytes from the source
//! (`MigrateRead`), pushes them into the destination (`MigrateWrite`) and carries the
//! destination's verdicts back (`MigrateVerdict`): policy accepted or refused, failed,
//! acknowledged. Whatever breaks, both sides are told if they can still be reached: the
//! source resumes its domain (a `Failed` verdict), the destination discards its partial
//! copy (`MigrateAbort`). A migration that moves no byte and changes no state for
//! [`IDLE_TIMEOUT`] is failed the same way, so hvctl never waits forever.
//!
//! `save` relays the source's stream into a file instead. There is no destination to
//! check the CPUID policy, so hvctl accepts it as soon as the header and policy records
//! are written, and acknowledges once the `End` record is on disk (fsynced and renamed
//! from `FILE.partial`); the source then destroys its domain, as `xl save` does.
//! `restore` pushes such a file into a destination.
//!
//! Ctrl-C (or SIGTERM) cancels: the relay loop notices it between two requests
//! ([`crate::interrupt`]), asks the source what `hvctl migrate --cancel` asks it
//! (`MigrateCancel`: the domain resumes with its dirty bits, unless everything was sent
//! and the destination may already run it, when it stays paused), aborts the
//! destination (a save's `FILE.partial` is removed) and exits 4 with what both ends
//! answered. A second Ctrl-C exits at once.
//!
//! Testing hook: `hvctl migrate --fault-corrupt-byte N` (hidden from `--help`) flips the
//! lowest bit of byte N of the relayed stream (counted from 0 over the whole stream)
//! before it reaches the destination. It exists for the system tests
//! (`tools/host-cli/tests/migrate.rs`): the destination must refuse the stream with a
//! checksum error, the source must resume the domain, and hvctl exits 4 with the
//! destination's error.

use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use wire::migration::{Decoded, Record, RecordDecoder, StreamHeader};
use wire::{
    MAX_MIGRATE_DATA, MigrateOptions, MigrateProgress, MigrateReport, PeerVerdict, ReceiveState, ReceiveStatus,
    Request, Response, SendState,
};

use crate::progress::{self, TransferBar};
use crate::transport::{self, Client, Options};
use crate::{CliError, connection_err, err, interrupt, remote_err};

/// A migration that relays no byte and sees no state change for this long is failed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait before asking again when the source has nothing to hand out.
const POLL: Duration = Duration::from_millis(5);
/// An empty write after this long without one keeps the destination's session alive
/// (it gives up after 10 s without a request).
const KEEPALIVE: Duration = Duration::from_secs(2);

/// How long one `MigrateRead`/`MigrateWrite` over a serial line should take: well
/// inside the 10 s a request may take (and the 10 s each hypervisor waits for the
/// relay), short enough that the progress line moves and Ctrl-C is noticed.
const SERIAL_REQUEST_BUDGET: Duration = Duration::from_secs(2);
/// The first piece over a serial line, before any rate is measured: 4 s at 1 KB/s,
/// under a second at Bochs' ~6 KB/s.
const SERIAL_FIRST_CHUNK: usize = 4 * 1024;
/// The smallest piece over a serial line (a request's fixed cost dominates below it).
const SERIAL_MIN_CHUNK: usize = 1024;

/// How many stream bytes one request moves. Over vsock always [`MAX_MIGRATE_DATA`]
/// (unchanged); when either end is a serial line (Bochs' COM2 runs at ~6 KB/s, so
/// 60 KiB would take ~10 s, the request timeout), sized from the line's measured rate
/// so that one request takes about [`SERIAL_REQUEST_BUDGET`].
#[derive(Debug, Clone)]
pub(crate) struct ChunkSizer {
    serial: bool,
    chunk: usize,
    /// Bytes per second over the slow end, smoothed (`None` until measured).
    rate: Option<f64>,
}

impl ChunkSizer {
    pub(crate) fn new(serial: bool) -> Self {
        Self { serial, chunk: if serial { SERIAL_FIRST_CHUNK } else { MAX_MIGRATE_DATA }, rate: None }
    }

    /// The most bytes the next request should carry.
    pub(crate) fn chunk(&self) -> usize {
        self.chunk
    }

    /// A request carried `bytes` in `took`: update the rate and the chunk. Requests of
    /// less than [`SERIAL_MIN_CHUNK`] say more about the round trip than the rate and
    /// are not counted.
    pub(crate) fn observe(&mut self, bytes: usize, took: Duration) {
        if !self.serial || bytes < SERIAL_MIN_CHUNK {
            return;
        }
        let now = bytes as f64 / took.as_secs_f64().max(1e-3);
        let rate = self.rate.map_or(now, |r| 0.5 * r + 0.5 * now);
        self.rate = Some(rate);
        let want = (rate * SERIAL_REQUEST_BUDGET.as_secs_f64()) as usize;
        self.chunk = want.clamp(SERIAL_MIN_CHUNK, MAX_MIGRATE_DATA);
    }

    /// The measured rate over the serial end, bytes/s.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.rate
    }
}

/// Bytes for a progress line: KB below a megabyte (a serial line moves a few KB/s).
fn size_text(bytes: u64) -> String {
    if bytes < 1_000_000 { format!("{:.1} KB", bytes as f64 / 1e3) } else { format!("{:.1} MB", mb(bytes)) }
}

/// The progress line is redrawn at most this often.
const DRAW_EVERY: Duration = Duration::from_millis(100);

/// `hvctl migrate ...`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The domain (its id on the source).
    domain: u32,
    /// The source hypervisor, as for --connect (unix:PATH:PORT or vsock:CID:PORT).
    /// Default: the --connect target.
    #[arg(long, value_name = "TARGET")]
    from: Option<String>,
    /// The destination hypervisor, as for --connect.
    #[arg(long, value_name = "TARGET", required_unless_present = "cancel")]
    to: Option<String>,
    /// Cancel the running migration of DOMAIN on the source (--from) instead: the
    /// domain runs on there. Prints the migration's state.
    #[arg(long)]
    cancel: bool,
    /// The longest pause of the guest the final round may take, in ms.
    #[arg(long, default_value_t = 300, value_name = "MS")]
    downtime: u64,
    /// Cap the stream's rate, in MB/s (10^6 bytes per second; fractions allowed).
    #[arg(long, value_name = "MB/S")]
    bandwidth: Option<f64>,
    /// The most dirty rounds after the full copy before giving up.
    #[arg(long, default_value_t = 30, value_name = "N")]
    max_rounds: u32,
    /// Throttle the guest's vCPUs when it dirties memory faster than it can be sent.
    #[arg(long)]
    throttle: bool,
    /// Send a digest of all memory at pause; the destination compares it with its copy
    /// before the domain runs.
    #[arg(long)]
    verify: bool,
    /// Show the progress line on stderr even when stderr is not a terminal (on a
    /// terminal it is drawn behind a bar with rate and ETA, except with --json).
    #[arg(long)]
    progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Testing only: flip one bit of stream byte N before it reaches the destination.
    #[arg(long, hide = true, value_name = "N")]
    fault_corrupt_byte: Option<u64>,
}

/// `hvctl save ...`
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The domain (its id on the source).
    domain: u32,
    /// The file to write (written as FILE.partial, renamed when complete).
    file: PathBuf,
    /// The hypervisor that runs the domain, as for --connect. Default: the --connect target.
    #[arg(long, value_name = "TARGET")]
    from: Option<String>,
    /// Show the progress line on stderr even when stderr is not a terminal (on a
    /// terminal it is drawn behind a bar with rate and ETA, except with --json).
    #[arg(long)]
    progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `hvctl restore ...`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file written by `hvctl save`.
    file: PathBuf,
    /// The hypervisor to create the domain on, as for --connect. Default: the --connect target.
    #[arg(long, value_name = "TARGET")]
    to: Option<String>,
    /// Show the progress line on stderr even when stderr is not a terminal (on a
    /// terminal it is drawn behind a bar with rate and ETA, except with --json).
    #[arg(long)]
    progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The connection options of one end: `target`, else the global `--connect` resolution.
fn endpoint(global: &Options, target: Option<&str>) -> Options {
    Options { connect: target.map(String::from).or_else(|| global.connect.clone()), timeout: global.timeout }
}

fn state_name(p: &MigrateProgress) -> &'static str {
    p.state.map_or("unknown", SendState::name)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn hex(v: Option<u64>) -> Value {
    v.map_or(Value::Null, |d| json!(format!("{d:#018x}")))
}

/// The one progress line on stderr, rewritten in place with `\r` (also the upload
/// progress of `domain create`); or, for a transfer on a terminal, an indicatif bar
/// with rate and ETA in front of the same text (`crate::progress`).
#[derive(Debug)]
pub(crate) struct ProgressLine {
    enabled: bool,
    width: usize,
    drawn: Option<Instant>,
    bar: Option<TransferBar>,
}

impl ProgressLine {
    pub(crate) fn new(forced: bool) -> Self {
        Self { enabled: forced || std::io::stderr().is_terminal(), width: 0, drawn: None, bar: None }
    }

    /// Draw transfers as a bar when stderr is a terminal and `wanted` (not with `--json`,
    /// whose callers keep the line).
    pub(crate) fn with_bar(mut self, wanted: bool) -> Self {
        if wanted && std::io::stderr().is_terminal() {
            self.bar = Some(TransferBar::stderr());
        }
        self
    }

    /// `done` of `total` bytes moved; `text` as for [`Self::show`].
    pub(crate) fn show_transfer(&mut self, done: u64, total: u64, text: &str, force: bool) {
        match &self.bar {
            Some(bar) => bar.update(done, total, text),
            None => self.show(text, force),
        }
    }

    pub(crate) fn show(&mut self, text: &str, force: bool) {
        if !self.enabled || (!force && self.drawn.is_some_and(|t| t.elapsed() < DRAW_EVERY)) {
            return;
        }
        let len = text.chars().count();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{text}{}", " ".repeat(self.width.saturating_sub(len)));
        let _ = err.flush();
        self.width = len;
        self.drawn = Some(Instant::now());
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        if self.enabled && self.drawn.take().is_some() {
            eprintln!();
            self.width = 0;
        }
    }
}

fn progress_text(p: &MigrateProgress) -> String {
    let downtime = match p.estimated_downtime_ms {
        u64::MAX => "?".to_string(),
        ms => ms.to_string(),
    };
    let bandwidth = match p.bandwidth_bytes_per_sec {
        u64::MAX => "?".to_string(),
        b => size_text(b),
    };
    format!(
        "{:<20} round {:>2}  pages {}/{}  {}  dirty {} pages/s  {bandwidth}/s  est. downtime {downtime} ms  throttle {}%",
        state_name(p),
        p.round,
        p.pages_sent,
        p.pages_total,
        size_text(p.bytes_sent),
        p.dirty_pages_per_sec,
        p.throttle_percent
    )
}

/// One end of a relay: something that answers `wire` requests. A [`Client`] (hvctl's
/// own connection), or in the agent a hypervisor shared with other clients that is
/// locked for each call.
pub(crate) trait Endpoint {
    /// One request, one answer.
    fn call(&mut self, request: &Request) -> Result<Response, CliError>;
    /// `vsock`, `serial` or `tls` (a serial end sizes requests by the line's rate).
    fn transport(&self) -> &'static str;
    /// Send a request without waiting for its answer, where this end keeps answers in
    /// order for [`Endpoint::recv`]: its id. `None` where it does not (the relay then
    /// makes one `call` at a time).
    fn send(&mut self, _request: &Request) -> Option<Result<u64, CliError>> {
        None
    }
    /// The next answer to a request given to [`Endpoint::send`], and its id.
    fn recv(&mut self) -> Result<(u64, Response), CliError> {
        Err(err("this end answers one call at a time"))
    }
}

impl Endpoint for Client {
    fn call(&mut self, request: &Request) -> Result<Response, CliError> {
        Client::call(self, request)
    }
    fn transport(&self) -> &'static str {
        self.target.transport()
    }
    /// Over vsock only: a serial line sizes each request by the time it took, and an
    /// agent's link is left as it is.
    fn send(&mut self, request: &Request) -> Option<Result<u64, CliError>> {
        (self.target.transport() == "vsock").then(|| Client::send(self, request))
    }
    fn recv(&mut self) -> Result<(u64, Response), CliError> {
        Client::recv(self)
    }
}

/// Who watches a relay: hvctl's progress line (and its Ctrl-C), or the agent, which
/// forwards the progress to the operator's hvctl (and cancels when it has gone).
pub(crate) trait Watch {
    /// The source's progress after a request; `serial_rate` the measured rate over a
    /// serial end; `state_changed` when the state is new (draw at once).
    fn progress(&mut self, p: &MigrateProgress, serial_rate: Option<f64>, state_changed: bool);
    /// Before a message of its own (the progress line ends).
    fn finish(&mut self);
    /// Whether, and by what, the relay is cancelled.
    fn cancelled(&mut self) -> Option<&'static str>;
}

/// The progress line hvctl draws for a migration (also for one an agent runs).
pub(crate) fn migrate_progress_text(p: &MigrateProgress, serial_rate: Option<f64>) -> String {
    let mut text = progress_text(p);
    if let Some(rate) = serial_rate {
        // The source's own figure is what it handed out; over a serial line the
        // line is the limit, and that is what the relay measures.
        text.push_str(&format!("  serial {}/s", size_text(rate as u64)));
    }
    text
}

impl Watch for ProgressLine {
    fn progress(&mut self, p: &MigrateProgress, serial_rate: Option<f64>, state_changed: bool) {
        let (done, total) = progress::migration_bytes(p);
        self.show_transfer(done, total, &migrate_progress_text(p, serial_rate), state_changed);
    }
    fn finish(&mut self) {
        ProgressLine::finish(self);
    }
    fn cancelled(&mut self) -> Option<&'static str> {
        interrupt::pending()
    }
}

/// What is known of both ends, for the failure report.
#[derive(Debug, Default)]
pub(crate) struct Track {
    pub(crate) progress: Option<MigrateProgress>,
    pub(crate) status: Option<ReceiveStatus>,
    /// The signal that cancelled the relay ("Ctrl-C"), if one did.
    pub(crate) cancelled_by: Option<&'static str>,
}

impl Track {
    fn failure_json(&self, domain: Option<u32>, e: &CliError) -> Value {
        let p = self.progress.clone().unwrap_or_default();
        let s = self.status.as_ref();
        json!({
            "outcome": if self.cancelled_by.is_some() { "cancelled" } else { "failed" },
            "cancelled_by": self.cancelled_by,
            "error": e.0,
            "exit_code": e.1,
            "domain": domain,
            "session": self.progress.as_ref().map(|p| p.session),
            "source_state": self.progress.as_ref().map(state_name),
            "source_failure": p.failure,
            "destination_state": s.map(|s| s.state.name()),
            "destination_error": s.and_then(|s| s.error.clone()),
            "destination_domain": s.and_then(|s| s.domain),
            "destination_pages_received": s.map(|s| s.pages_received),
            "rounds": p.round,
            "pages_sent": p.pages_sent,
            "bytes_sent": p.bytes_sent,
        })
    }
}

/// Where the relayed stream goes: a destination hypervisor or a file.
enum Sink<'a> {
    /// A receiving session on a destination hypervisor.
    Hv { client: &'a mut dyn Endpoint, session: u32 },
    /// `hvctl save`.
    File(FileSink),
}

impl Sink<'_> {
    /// Push stream bytes; the destination's status after them. An error means the
    /// destination could not take them (a connection error: it cannot be reached any more).
    fn write(&mut self, data: Vec<u8>) -> Result<ReceiveStatus, CliError> {
        match self {
            Sink::Hv { client, session } => match client.call(&Request::MigrateWrite { session: *session, data })? {
                Response::ReceiveStatus(s) => Ok(s),
                Response::Error(e) => Err(remote_err(format!("the destination refused the stream: {e}"))),
                _ => Err(connection_err("the destination answered migrate-write with the wrong message")),
            },
            Sink::File(f) => f.write(&data),
        }
    }

    /// Whether the destination is behind a serial line.
    fn serial(&self) -> bool {
        matches!(self, Sink::Hv { client, .. } if client.transport() == "serial")
    }

    /// Give up: the destination discards its partial domain (a file is removed). The
    /// status after that, if the destination answered.
    fn abort(&mut self, reason: &str) -> Option<ReceiveStatus> {
        match self {
            Sink::Hv { client, session } => {
                match client.call(&Request::MigrateAbort { session: *session, reason: reason.to_string() }) {
                    Ok(Response::ReceiveStatus(s)) => Some(s),
                    _ => None,
                }
            }
            Sink::File(f) => {
                f.abort(reason);
                Some(f.status.clone())
            }
        }
    }
}

/// `hvctl save`'s destination: the stream goes to `FILE.partial`, its records are
/// decoded as they pass so the end is known; renamed to `FILE` once `End` is on disk.
#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    partial: PathBuf,
    file: Option<File>,
    decoder: RecordDecoder,
    header: bool,
    committed: bool,
    status: ReceiveStatus,
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

impl FileSink {
    fn create(path: &Path) -> Result<Self, CliError> {
        if path.is_dir() {
            return Err(err(format!("{} is a directory", path.display())));
        }
        let partial = partial_path(path);
        let file = File::create(&partial).map_err(|e| err(format!("cannot create {}: {e}", partial.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            file: Some(file),
            decoder: RecordDecoder::new(),
            header: false,
            committed: false,
            status: ReceiveStatus {
                session: 0,
                state: ReceiveState::AwaitPolicy,
                domain: None,
                policy: None,
                pages_received: 0,
                bytes_received: 0,
                error: None,
                memory_digest: None,
            },
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<ReceiveStatus, CliError> {
        if matches!(self.status.state, ReceiveState::Complete | ReceiveState::Discarded) {
            return Ok(self.status.clone());
        }
        let partial = &self.partial;
        let file = self.file.as_mut().ok_or_else(|| err(format!("{} is closed", partial.display())))?;
        file.write_all(data).map_err(|e| err(format!("writing {}: {e}", partial.display())))?;
        self.status.bytes_received += data.len() as u64;
        let pushed = self.decoder.push(data);
        loop {
            // A refused push (no memory for the record) is reported like a bad record.
            let next = match &pushed {
                Err(e) => Err(e.clone()),
                Ok(()) => self.decoder.next_record(),
            };
            match next {
                Ok(None) => break,
                Ok(Some(Decoded::Record(Record::Header(_)))) => self.header = true,
                Ok(Some(Decoded::Record(Record::CpuidPolicy(_)))) if self.header => {
                    self.status.policy = Some(Ok(()));
                    self.status.state = ReceiveState::Receiving;
                }
                Ok(Some(Decoded::Record(Record::PageBatch(b)))) => self.status.pages_received += b.len() as u64,
                Ok(Some(Decoded::Record(Record::End(_)))) => {
                    self.commit()?;
                    self.status.state = ReceiveState::Complete;
                    break;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    self.status.state = ReceiveState::Discarded;
                    self.status.error = Some(format!("the source sent a bad stream: {e}"));
                    break;
                }
            }
        }
        Ok(self.status.clone())
    }

    /// The stream is complete: flush it to disk and give it its name.
    fn commit(&mut self) -> Result<(), CliError> {
        let file = self.file.take().ok_or_else(|| err(format!("{} is closed", self.partial.display())))?;
        file.sync_all().map_err(|e| err(format!("syncing {}: {e}", self.partial.display())))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path)
            .map_err(|e| err(format!("renaming {} to {}: {e}", self.partial.display(), self.path.display())))?;
        self.committed = true;
        // The rename itself must survive a crash too.
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn abort(&mut self, reason: &str) {
        self.file = None;
        let _ = std::fs::remove_file(&self.partial);
        if self.committed {
            let _ = std::fs::remove_file(&self.path);
            self.committed = false;
        }
        if self.status.state != ReceiveState::Discarded {
            self.status.state = ReceiveState::Discarded;
            self.status.error = Some(reason.to_string());
        }
    }
}

/// A finished relay.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) report: MigrateReport,
    pub(crate) progress: MigrateProgress,
    pub(crate) status: ReceiveStatus,
}

/// Pulls the source's stream into a sink and carries the verdicts back.
struct Relay<'a> {
    src: &'a mut dyn Endpoint,
    /// The domain on the source (what `MigrateCancel` names).
    domain: u32,
    session: u32,
    sink: Sink<'a>,
    track: &'a mut Track,
    line: &'a mut dyn Watch,
    policy_told: bool,
    relayed: u64,
    corrupt: Option<u64>,
    last_change: Instant,
    /// When the destination last got a write (for the keep-alive).
    last_write: Instant,
    /// How much one request moves (smaller over a serial line).
    sizer: ChunkSizer,
    /// The id of the `MigrateRead` sent ahead (while the last piece was written to the
    /// destination), not yet answered.
    ahead: Option<u64>,
    /// Its answer, once collected before another request to the source.
    ahead_answer: Option<Result<Response, CliError>>,
}

fn over(state: Option<SendState>) -> bool {
    state.is_none_or(SendState::is_over)
}

impl Relay<'_> {
    fn source_state(&self) -> Option<SendState> {
        self.track.progress.as_ref().and_then(|p| p.state)
    }

    fn sink_over(&self) -> bool {
        self.track.status.as_ref().is_some_and(|s| matches!(s.state, ReceiveState::Complete | ReceiveState::Discarded))
    }

    /// Note the source's progress; the state it is in.
    fn on_progress(&mut self, p: MigrateProgress) -> SendState {
        let changed = self.track.progress.as_ref().is_none_or(|old| {
            (old.state, old.round, old.pages_sent, old.bytes_sent) != (p.state, p.round, p.pages_sent, p.bytes_sent)
        });
        if changed {
            self.last_change = Instant::now();
        }
        let state_changed = self.track.progress.as_ref().is_none_or(|old| old.state != p.state);
        self.line.progress(&p, self.sizer.rate(), state_changed);
        let state = p.state.unwrap_or(SendState::Failed);
        self.track.progress = Some(p);
        state
    }

    fn on_status(&mut self, s: ReceiveStatus) {
        let changed =
            self.track.status.as_ref().is_none_or(|old| {
                (old.state, &old.policy, old.bytes_received) != (s.state, &s.policy, s.bytes_received)
            });
        if changed {
            self.last_change = Instant::now();
        }
        self.track.status = Some(s);
    }

    /// The answer to the read sent ahead, if one is out: collected before any other
    /// request to the source (answers come in order, and its bytes must not be lost).
    fn settle_ahead(&mut self) {
        if let Some(id) = self.ahead.take() {
            let answer = loop {
                match self.src.recv() {
                    Ok((got, response)) if got == id => break Ok(response),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            self.ahead_answer = Some(answer);
        }
    }

    /// The next read's answer: the one sent ahead, or a new call.
    fn read_answer(&mut self) -> Result<Response, CliError> {
        self.settle_ahead();
        if let Some(answer) = self.ahead_answer.take() {
            return answer;
        }
        self.src.call(&Request::MigrateRead { session: self.session, max_bytes: self.sizer.chunk() as u32 })
    }

    /// While the source sends pages, ask for the next piece before writing this one:
    /// the source prepares and sends it while the destination takes the last, instead
    /// of each piece paying both transfers in turn (`cargo xtask bench relay`).
    fn read_ahead(&mut self, state: SendState) {
        if self.ahead.is_some() || self.ahead_answer.is_some() {
            return;
        }
        if !matches!(state, SendState::Precopy | SendState::StopAndCopy) {
            return;
        }
        let read = Request::MigrateRead { session: self.session, max_bytes: self.sizer.chunk() as u32 };
        match self.src.send(&read) {
            Some(Ok(id)) => self.ahead = Some(id),
            Some(Err(e)) => self.ahead_answer = Some(Err(e)),
            None => {}
        }
    }

    /// Hand the source a verdict; its progress after it.
    fn verdict(&mut self, verdict: PeerVerdict) -> Result<MigrateProgress, CliError> {
        self.settle_ahead();
        match self.src.call(&Request::MigrateVerdict { session: self.session, verdict })? {
            Response::MigrateProgress(p) => {
                self.on_progress((*p).clone());
                Ok(*p)
            }
            Response::Error(e) => Err(remote_err(format!("the source refused the verdict: {e}"))),
            _ => Err(connection_err("the source answered migrate-verdict with the wrong message")),
        }
    }

    /// Tell the source the migration failed (it resumes the domain), unless it is over.
    fn fail_source(&mut self, reason: &str) {
        if !over(self.source_state()) {
            let _ = self.verdict(PeerVerdict::Failed(reason.to_string()));
        }
    }

    /// Tell the destination to discard its partial domain, unless it is over.
    fn abort_sink(&mut self, reason: &str) {
        if !self.sink_over()
            && let Some(s) = self.sink.abort(reason)
        {
            self.on_status(s);
        }
    }

    /// Fail the migration on both sides; `e` is the news.
    fn fail(&mut self, e: CliError) -> CliError {
        self.fail_source(&e.0);
        self.abort_sink(&e.0);
        e
    }

    /// A request to the source failed: if the source is gone (connection error), only
    /// the destination can be told.
    fn source_failed(&mut self, e: CliError) -> CliError {
        if e.1 == 3 {
            let reason = format!("lost the source: {e}");
            self.abort_sink(&reason);
            e
        } else {
            self.fail(e)
        }
    }

    /// The operator pressed Ctrl-C: do on the source what `hvctl migrate --cancel` does
    /// (its session decides whether the domain resumes: not once everything was sent),
    /// have the destination discard its partial copy (a file is removed), and say what
    /// each end answered.
    fn interrupted(&mut self, by: &'static str) -> CliError {
        // The message starts on a line of its own, not after the progress line.
        self.line.finish();
        self.track.cancelled_by = Some(by);
        let what = match self.sink {
            Sink::Hv { .. } => "migration",
            Sink::File(_) => "save",
        };
        let domain = self.domain;
        let everything_sent = self.source_state() == Some(SendState::AwaitAck);
        let source = if over(self.source_state()) {
            // Cannot happen from the loop (it returns first), but say so rather than
            // cancel a session that is over.
            format!("the source's migration was already {}", self.track.progress.as_ref().map_or("over", state_name))
        } else {
            self.settle_ahead();
            match self.src.call(&Request::MigrateCancel { domain }) {
                Ok(Response::MigrateProgress(p)) => {
                    // Not `on_progress`: the progress line is finished.
                    let p = *p;
                    let said = if p.state == Some(SendState::Completed) {
                        format!("too late at the source: the migration of domain {domain} had completed")
                    } else if everything_sent {
                        format!(
                            "the whole domain had been sent; the source says: {}",
                            p.failure.as_deref().unwrap_or("no reason given")
                        )
                    } else {
                        format!("domain {domain} runs on at the source")
                    };
                    self.track.progress = Some(p);
                    said
                }
                other => {
                    let why = match other {
                        Ok(Response::Error(e)) => format!("it refused: {e}"),
                        Ok(_) => "it answered migrate-cancel with the wrong message".into(),
                        Err(e) => e.0,
                    };
                    format!("the source could not be told ({why}); it gives up on its own after its 10 s relay timeout")
                }
            }
        };
        let reason = format!("{what} cancelled by {by} at hvctl");
        let was_over = self.sink_over();
        let told = if was_over { None } else { self.sink.abort(&reason) };
        if let Some(s) = &told {
            self.on_status(s.clone());
        }
        let destination = match (&self.sink, &self.track.status) {
            (Sink::File(f), _) => format!("removed {}", f.partial.display()),
            (Sink::Hv { .. }, Some(s)) if (was_over || told.is_some()) && s.state == ReceiveState::Complete => {
                match s.domain {
                    Some(d) => format!("the destination had completed the domain: it runs there as domain {d}"),
                    None => "the destination had completed the domain".into(),
                }
            }
            (Sink::Hv { .. }, Some(s)) if was_over || told.is_some() => match s.state {
                ReceiveState::Discarded => "the destination discarded its partial copy".into(),
                other => format!("the destination is {}", other.name()),
            },
            (Sink::Hv { .. }, _) => {
                "the destination could not be told; it discards its partial copy after its 10 s timeout".into()
            }
        };
        remote_err(format!("{what} cancelled by {by}; {source}; {destination}"))
    }

    fn run(&mut self) -> Result<Done, CliError> {
        loop {
            if let Some(by) = self.line.cancelled() {
                return Err(self.interrupted(by));
            }
            let asked = Instant::now();
            let answer = self.read_answer();
            if let Ok(Response::MigrateData { data, .. }) = &answer
                && self.src.transport() == "serial"
            {
                self.sizer.observe(data.len(), asked.elapsed());
            }
            let (data, progress) = match answer {
                Ok(Response::MigrateData { data, progress }) => (data, progress),
                Ok(Response::Error(e)) => {
                    return Err(self.fail(remote_err(format!("the source refused to hand out the stream: {e}"))));
                }
                Ok(_) => {
                    return Err(self.fail(connection_err("the source answered migrate-read with the wrong message")));
                }
                Err(e) => return Err(self.source_failed(e)),
            };
            let state = self.on_progress(*progress);
            match state {
                SendState::Failed => {
                    let why = self.track.progress.as_ref().and_then(|p| p.failure.clone());
                    let e = remote_err(format!("the source failed: {}", why.as_deref().unwrap_or("no reason given")));
                    self.abort_sink(&e.0);
                    return Err(e);
                }
                SendState::Completed => {
                    return Err(remote_err("the source reports the migration completed before it was acknowledged"));
                }
                _ => {}
            }
            if !data.is_empty() {
                self.read_ahead(state);
                self.push(data)?;
                if let Some(done) = self.check_sink()? {
                    return Ok(done);
                }
                continue;
            }
            // Nothing to hand out: the source waits for a verdict (the destination's
            // status came with the last write), or for its bandwidth cap.
            if matches!(state, SendState::AwaitPolicyVerdict | SendState::AwaitAck)
                && let Some(done) = self.check_sink()?
            {
                return Ok(done);
            }
            // Keep the destination's session alive while the source has nothing for it
            // (a tight bandwidth cap, a long final peek): an empty write is a keep-alive.
            if self.last_write.elapsed() >= KEEPALIVE {
                self.push(Vec::new())?;
            }
            if self.last_change.elapsed() >= IDLE_TIMEOUT {
                let e = remote_err(format!(
                    "the migration made no progress for {} s (source {}, destination {}): giving up",
                    IDLE_TIMEOUT.as_secs(),
                    self.track.progress.as_ref().map_or("unknown", state_name),
                    self.track.status.as_ref().map_or("unknown", |s| s.state.name()),
                ));
                return Err(self.fail(e));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Relay one piece of the stream to the destination.
    fn push(&mut self, mut data: Vec<u8>) -> Result<(), CliError> {
        let start = self.relayed;
        self.relayed += data.len() as u64;
        if let Some(n) = self.corrupt
            && (start..self.relayed).contains(&n)
            && let Some(b) = data.get_mut((n - start) as usize)
        {
            *b ^= 0x01;
        }
        if !data.is_empty() {
            self.last_change = Instant::now();
        }
        self.last_write = Instant::now();
        let len = data.len();
        let written = self.sink.write(data);
        if self.sink.serial() {
            self.sizer.observe(len, self.last_write.elapsed());
        }
        match written {
            Ok(s) => {
                self.on_status(s);
                Ok(())
            }
            Err(e) => {
                let reason = format!("the destination failed: {e}");
                self.fail_source(&reason);
                if e.1 != 3 {
                    self.abort_sink(&reason);
                }
                Err(e)
            }
        }
    }

    /// Act on the destination's last status: carry its verdict to the source.
    fn check_sink(&mut self) -> Result<Option<Done>, CliError> {
        let Some(status) = self.track.status.clone() else { return Ok(None) };
        if let Some(Err(reason)) = &status.policy {
            let e = remote_err(format!("destination refused: {reason}"));
            if !over(self.source_state())
                && let Err(ve) = self.verdict(PeerVerdict::Refused(reason.clone()))
            {
                return Err(CliError(format!("{e} (and telling the source failed: {ve})"), e.1));
            }
            return Err(e);
        }
        if status.policy == Some(Ok(())) && !self.policy_told {
            self.policy_told = true;
            if let Err(e) = self.verdict(PeerVerdict::PolicyAccepted) {
                return Err(self.source_failed(e));
            }
        }
        match status.state {
            ReceiveState::Discarded => {
                let error = status.error.clone().unwrap_or_else(|| "no reason given".into());
                // The destination's own verdict: it has thrown the domain away, so the
                // source may safely resume (even after it sent everything).
                if !over(self.source_state()) {
                    let _ = self.verdict(PeerVerdict::Refused(error.clone()));
                }
                Err(remote_err(format!("the destination discarded the domain: {error}")))
            }
            ReceiveState::Complete => {
                let outcome = self.verdict(PeerVerdict::Acked);
                match outcome {
                    Ok(p) if p.state == Some(SendState::Completed) => {
                        Ok(Some(Done { report: p.report.clone().unwrap_or_default(), progress: p, status }))
                    }
                    other => {
                        let why = match other {
                            Ok(p) => format!(
                                "it is {}{}",
                                state_name(&p),
                                p.failure.map(|f| format!(": {f}")).unwrap_or_default()
                            ),
                            Err(e) => e.0,
                        };
                        // A file is removed; a destination hypervisor that runs the domain
                        // ignores the abort, and the operator has to choose.
                        self.sink.abort(&why);
                        let at = match status.domain {
                            Some(d) => format!("the destination runs the domain as {d}"),
                            None => "the stream is complete".into(),
                        };
                        Err(remote_err(format!(
                            "{at}, but the source did not take the acknowledgement ({why}); check both sides"
                        )))
                    }
                }
            }
            _ => Ok(None),
        }
    }
}

/// Run `hvctl migrate`.
pub fn migrate(global: &Options, a: MigrateArgs) -> Result<ExitCode, CliError> {
    let from = endpoint(global, a.from.as_deref());
    if a.cancel {
        return cancel(&from, a.domain, a.json);
    }
    let to = endpoint(global, a.to.as_deref());
    let bandwidth_bytes_per_sec = match a.bandwidth {
        None => None,
        Some(b) if b.is_finite() && b > 0.0 => Some(((b * 1e6).round() as u64).max(1)),
        Some(b) => return Err(err(format!("--bandwidth {b}: expected a positive number of MB/s"))),
    };
    if a.max_rounds == 0 {
        return Err(err("--max-rounds must be at least 1"));
    }
    let options = MigrateOptions {
        downtime_ms: a.downtime,
        bandwidth_bytes_per_sec,
        max_rounds: a.max_rounds,
        throttle: a.throttle,
        verify_memory: a.verify,
    };
    let to_target = transport::resolve(&to)?;
    let from_target = transport::resolve(&from)?;
    interrupt::install()?;
    let mut track = Track::default();
    let mut line = ProgressLine::new(a.progress).with_bar(!a.json);
    // Agent to agent: the source's agent relays, hvctl only watches.
    let result = if matches!(from_target, transport::Target::Tls { .. })
        && matches!(to_target, transport::Target::Tls { .. })
    {
        crate::agent::remote::migrate(&from, &to_target, a.domain, options, a.fault_corrupt_byte, &mut track, &mut line)
    } else {
        relay_migration(&from, &to, a.domain, options, a.fault_corrupt_byte, &mut track, &mut line)
    };
    line.finish();
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&track.failure_json(Some(a.domain), &e)).unwrap_or_default()
                );
            }
            return Err(e);
        }
    };
    if let Some(f) = &done.progress.failure {
        eprintln!("hvctl: warning: the source says: {f}");
    }
    let r = &done.report;
    let (src_digest, dst_digest) = (r.memory_digest, done.status.memory_digest);
    let matched = match (src_digest, dst_digest) {
        (Some(s), Some(d)) => Some(s == d),
        _ => None,
    };
    if a.json {
        let mut v = report_json(a.domain, r);
        v["destination_digest"] = hex(dst_digest);
        v["digests_match"] = json!(matched);
        v["destination_domain"] = json!(done.status.domain);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let there = done.status.domain.map_or_else(|| "a new domain".to_string(), |d| format!("domain {d}"));
    println!("domain {} migrated: it runs as {there} on {to_target}", a.domain);
    print_report(r);
    match (src_digest, dst_digest) {
        (Some(s), Some(d)) => println!(
            "  memory digest     source {s:#018x}, destination {d:#018x}: {}",
            if s == d { "match" } else { "MISMATCH" }
        ),
        (Some(s), None) => println!("  memory digest     source {s:#018x}, destination did not report one"),
        _ => println!("  memory digest     not checked (pass --verify)"),
    }
    Ok(ExitCode::SUCCESS)
}

fn relay_migration(
    from: &Options,
    to: &Options,
    domain: u32,
    options: MigrateOptions,
    corrupt: Option<u64>,
    track: &mut Track,
    line: &mut ProgressLine,
) -> Result<Done, CliError> {
    let mut src = Client::connect(from)?;
    let mut dst = Client::connect(to)?;
    relay_between(&mut src, &mut dst, domain, options, corrupt, track, line)
}

/// The relay of a live migration between two ends, wherever it runs (hvctl, or the
/// source's agent for a host-to-host migration).
pub(crate) fn relay_between(
    src: &mut dyn Endpoint,
    dst: &mut dyn Endpoint,
    domain: u32,
    options: MigrateOptions,
    corrupt: Option<u64>,
    track: &mut Track,
    line: &mut dyn Watch,
) -> Result<Done, CliError> {
    let progress = start_source(src, domain, options, track)?;
    let session = progress.session;
    let status = match dst.call(&Request::MigrateReceive) {
        Ok(Response::ReceiveStatus(s)) => s,
        other => {
            let e = match other {
                Ok(Response::Error(e)) => remote_err(format!("the destination cannot receive a domain: {e}")),
                Ok(_) => connection_err("the destination answered migrate-receive with the wrong message"),
                Err(e) => e,
            };
            if let Ok(Response::MigrateProgress(p)) =
                src.call(&Request::MigrateVerdict { session, verdict: PeerVerdict::Failed(e.0.clone()) })
            {
                track.progress = Some(*p);
            }
            return Err(e);
        }
    };
    let session_dst = status.session;
    track.status = Some(status);
    let serial = src.transport() == "serial" || dst.transport() == "serial";
    Relay {
        src,
        domain,
        session,
        sink: Sink::Hv { client: dst, session: session_dst },
        track,
        line,
        policy_told: false,
        relayed: 0,
        corrupt,
        last_change: Instant::now(),
        last_write: Instant::now(),
        sizer: ChunkSizer::new(serial),
        ahead: None,
        ahead_answer: None,
    }
    .run()
}

/// `MigrateSend`: the session's first progress (refused or failed at once: an error).
fn start_source(
    src: &mut dyn Endpoint,
    domain: u32,
    options: MigrateOptions,
    track: &mut Track,
) -> Result<MigrateProgress, CliError> {
    let progress = match src.call(&Request::MigrateSend { domain, options })? {
        Response::MigrateProgress(p) => p,
        Response::Error(e) => return Err(remote_err(format!("the source refused to send domain {domain}: {e}"))),
        _ => return Err(connection_err("the source answered migrate-send with the wrong message")),
    };
    track.progress = Some((*progress).clone());
    if over(progress.state) {
        return Err(remote_err(format!(
            "the source cannot send domain {domain}: {}",
            progress.failure.as_deref().unwrap_or("no reason given")
        )));
    }
    Ok(*progress)
}

pub(crate) fn report_json(domain: u32, r: &MigrateReport) -> Value {
    json!({
        "outcome": "completed",
        "domain": domain,
        "rounds": r.rounds,
        "pages_sent": r.pages_sent,
        "pages_resent": r.pages_resent,
        "bytes_sent": r.bytes_sent,
        "duration_ms": r.duration_ms,
        "downtime_ms": r.downtime_ms,
        "estimated_downtime_ms": r.estimated_downtime_ms,
        "max_throttle_percent": r.max_throttle_percent,
        "source_digest": hex(r.memory_digest),
    })
}

fn print_report(r: &MigrateReport) {
    println!("  rounds            {}", r.rounds);
    println!("  pages sent        {} ({} resent)", r.pages_sent, r.pages_resent);
    println!("  bytes sent        {:.2} MB ({} bytes)", mb(r.bytes_sent), r.bytes_sent);
    println!("  duration          {} ms", r.duration_ms);
    println!("  downtime          {} ms measured, {} ms estimated", r.downtime_ms, r.estimated_downtime_ms);
    println!("  max throttle      {} %", r.max_throttle_percent);
}

/// `hvctl migrate --cancel DOMAIN`.
fn cancel(from: &Options, domain: u32, json: bool) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(from)?;
    let p = match client.call(&Request::MigrateCancel { domain })? {
        Response::MigrateProgress(p) => p,
        Response::Error(e) => return Err(remote_err(format!("cancel: {e}"))),
        _ => return Err(connection_err("the hypervisor answered migrate-cancel with the wrong message")),
    };
    if json {
        let v = json!({
            "domain": p.domain, "session": p.session, "state": p.state.map(SendState::name),
            "failure": p.failure, "round": p.round, "pages_sent": p.pages_sent, "bytes_sent": p.bytes_sent,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "domain {}: migration session {} is {}{}",
            p.domain,
            p.session,
            state_name(&p),
            p.failure.as_deref().map(|f| format!(" ({f})")).unwrap_or_default()
        );
    }
    if p.state == Some(SendState::Completed) {
        return Err(remote_err(format!("too late: the migration of domain {domain} had completed")));
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `hvctl save`.
pub fn save(global: &Options, a: SaveArgs) -> Result<ExitCode, CliError> {
    let from = endpoint(global, a.from.as_deref());
    transport::resolve(&from)?;
    interrupt::install()?;
    let mut track = Track::default();
    let mut line = ProgressLine::new(a.progress).with_bar(!a.json);
    let result = relay_save(&from, a.domain, &a.file, &mut track, &mut line);
    line.finish();
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            // Whatever failed, no partial file stays behind.
            let _ = std::fs::remove_file(partial_path(&a.file));
            if a.json {
                let mut v = track.failure_json(Some(a.domain), &e);
                v["file"] = json!(a.file.display().to_string());
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            return Err(e);
        }
    };
    if let Some(f) = &done.progress.failure {
        eprintln!("hvctl: warning: the source says: {f}");
    }
    let r = &done.report;
    if a.json {
        let mut v = report_json(a.domain, r);
        v["file"] = json!(a.file.display().to_string());
        v["file_bytes"] = json!(done.status.bytes_received);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "domain {} saved to {} ({} bytes); the source domain was destroyed",
        a.domain,
        a.file.display(),
        done.status.bytes_received
    );
    print_report(r);
    Ok(ExitCode::SUCCESS)
}

fn relay_save(
    from: &Options,
    domain: u32,
    path: &Path,
    track: &mut Track,
    line: &mut ProgressLine,
) -> Result<Done, CliError> {
    let mut src = Client::connect(from)?;
    // Create the file first: a bad path must not start a migration.
    let sink = FileSink::create(path)?;
    let progress = start_source(&mut src, domain, MigrateOptions::default(), track)?;
    track.status = Some(sink.status.clone());
    let sizer = ChunkSizer::new(src.target.transport() == "serial");
    Relay {
        src: &mut src,
        domain,
        session: progress.session,
        sink: Sink::File(sink),
        track,
        line,
        policy_told: false,
        relayed: 0,
        corrupt: None,
        last_change: Instant::now(),
        last_write: Instant::now(),
        sizer,
        ahead: None,
        ahead_answer: None,
    }
    .run()
}

/// Check that `file` starts with a migration header record; rewinds it.
fn check_header(file: &mut File, path: &Path) -> Result<StreamHeader, CliError> {
    let bad = |why: &str| err(format!("{} is not a migration stream: {why}", path.display()));
    let mut decoder = RecordDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    loop {
        let n = file.read(&mut buf).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            return Err(bad(if read == 0 { "it is empty" } else { "it ends inside its first record" }));
        }
        read += n;
        let next = decoder.push(buf.get(..n).unwrap_or_default()).and_then(|()| decoder.next_record());
        match next {
            Ok(Some(Decoded::Record(Record::Header(h)))) => {
                file.seek(SeekFrom::Start(0)).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
                return Ok(h);
            }
            Ok(Some(_)) => return Err(bad("its first record is not a header")),
            Ok(None) => {}
            Err(e) => return Err(bad(&e.to_string())),
        }
    }
}

/// Read until `buf` is full or the file ends.
fn fill(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(buf.get_mut(n..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Run `hvctl restore`.
pub fn restore(global: &Options, a: RestoreArgs) -> Result<ExitCode, CliError> {
    let to = endpoint(global, a.to.as_deref());
    let mut file = File::open(&a.file).map_err(|e| err(format!("cannot open {}: {e}", a.file.display())))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let header = check_header(&mut file, &a.file)?;
    transport::resolve(&to)?;
    interrupt::install()?;
    let mut line = ProgressLine::new(a.progress).with_bar(!a.json);
    let mut last: Option<ReceiveStatus> = None;
    let result = push_file(&to, &mut file, &a.file, total, &mut line, &mut last);
    line.finish();
    match result {
        Ok((status, sent)) => {
            if sent < total {
                eprintln!("hvctl: warning: {} bytes after the end record were not sent", total - sent);
            }
            let id = status.domain.map_or_else(|| "?".to_string(), |d| d.to_string());
            if a.json {
                let v = json!({
                    "outcome": "completed", "domain": status.domain, "name": header.name,
                    "memory_bytes": header.memory_bytes, "vcpus": header.vcpus, "bytes": sent,
                    "pages_received": status.pages_received, "memory_digest": hex(status.memory_digest),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "restored {} as domain {id} ({}, {} MiB, {} vCPUs)",
                    a.file.display(),
                    header.name,
                    header.memory_bytes >> 20,
                    header.vcpus
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.json {
                let cancelled_by = interrupt::pending();
                let v = json!({
                    "outcome": if cancelled_by.is_some() { "cancelled" } else { "failed" },
                    "cancelled_by": cancelled_by, "error": e.0, "exit_code": e.1,
                    "destination_state": last.as_ref().map(|s| s.state.name()),
                    "destination_error": last.as_ref().and_then(|s| s.error.clone()),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            Err(e)
        }
    }
}

fn push_file(
    to: &Options,
    file: &mut File,
    path: &Path,
    total: u64,
    line: &mut ProgressLine,
    last: &mut Option<ReceiveStatus>,
) -> Result<(ReceiveStatus, u64), CliError> {
    let mut client = Client::connect(to)?;
    let status = match client.call(&Request::MigrateReceive)? {
        Response::ReceiveStatus(s) => s,
        Response::Error(e) => return Err(remote_err(format!("the destination cannot receive a domain: {e}"))),
        _ => return Err(connection_err("the destination answered migrate-receive with the wrong message")),
    };
    let session = status.session;
    *last = Some(status);
    // Whether the destination answered.
    let abort = |client: &mut Client, reason: &str, last: &mut Option<ReceiveStatus>| {
        if let Ok(Response::ReceiveStatus(s)) =
            client.call(&Request::MigrateAbort { session, reason: reason.to_string() })
        {
            *last = Some(s);
            true
        } else {
            false
        }
    };
    let mut buf = vec![0u8; MAX_MIGRATE_DATA];
    let mut sizer = ChunkSizer::new(client.target.transport() == "serial");
    let mut sent = 0u64;
    loop {
        if let Some(by) = interrupt::pending() {
            line.finish();
            let answered = abort(&mut client, &format!("restore cancelled by {by} at hvctl"), last);
            let destination = match last.as_ref().map(|s| s.state) {
                Some(ReceiveState::Discarded) if answered => "the destination discarded its partial domain".into(),
                Some(other) if answered => format!("the destination is {}", other.name()),
                _ => "the destination could not be told; it discards its partial domain after its 10 s timeout".into(),
            };
            return Err(remote_err(format!(
                "restore cancelled by {by} after {sent} of {total} bytes of {}; {destination}",
                path.display()
            )));
        }
        let n = match fill(file, &mut buf[..sizer.chunk()]) {
            Ok(n) => n,
            Err(e) => {
                let e = err(format!("cannot read {}: {e}", path.display()));
                let _ = abort(&mut client, &e.0, last);
                return Err(e);
            }
        };
        if n == 0 {
            let e = remote_err(format!(
                "{} ended after {sent} bytes and the destination has no complete domain (it is {})",
                path.display(),
                last.as_ref().map_or("unknown", |s| s.state.name())
            ));
            let _ = abort(&mut client, &e.0, last);
            return Err(e);
        }
        let data = buf.get(..n).unwrap_or_default().to_vec();
        let asked = Instant::now();
        let answer = client.call(&Request::MigrateWrite { session, data })?;
        sizer.observe(n, asked.elapsed());
        let status = match answer {
            Response::ReceiveStatus(s) => s,
            Response::Error(e) => {
                let e = remote_err(format!("the destination refused the stream: {e}"));
                let _ = abort(&mut client, &e.0, last);
                return Err(e);
            }
            _ => return Err(connection_err("the destination answered migrate-write with the wrong message")),
        };
        sent += n as u64;
        line.show_transfer(
            sent,
            total,
            &format!(
                "{:<12} {} of {}  pages {}{}",
                status.state.name(),
                size_text(sent),
                size_text(total),
                status.pages_received,
                sizer.rate().map(|r| format!("  serial {}/s", size_text(r as u64))).unwrap_or_default()
            ),
            false,
        );
        *last = Some(status.clone());
        if let Some(Err(reason)) = &status.policy {
            return Err(remote_err(format!("destination refused: {reason}")));
        }
        match status.state {
            ReceiveState::Complete => return Ok((status, sent)),
            ReceiveState::Discarded => {
                return Err(remote_err(format!(
                    "the destination discarded the domain: {}",
                    status.error.as_deref().unwrap_or("no reason given")
                )));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_requests_stay_at_the_maximum() {
        let mut s = ChunkSizer::new(false);
        assert_eq!(s.chunk(), MAX_MIGRATE_DATA);
        s.observe(MAX_MIGRATE_DATA, Duration::from_secs(5));
        assert_eq!((s.chunk(), s.rate()), (MAX_MIGRATE_DATA, None));
    }

    #[test]
    fn serial_requests_follow_the_measured_rate() {
        let mut s = ChunkSizer::new(true);
        assert_eq!(s.chunk(), SERIAL_FIRST_CHUNK);
        // Bochs' COM2: ~5.8 KB/s, so about 11.6 KB per 2 s request.
        for _ in 0..20 {
            s.observe(5800, Duration::from_secs(1));
        }
        let chunk = s.chunk();
        assert!((11_000..=12_000).contains(&chunk), "{chunk}");
        // QEMU's COM2 is far faster: capped at the protocol's maximum.
        for _ in 0..20 {
            s.observe(60_000, Duration::from_millis(100));
        }
        assert_eq!(s.chunk(), MAX_MIGRATE_DATA);
        // Round trips of tiny requests (keep-alives, verdicts) say nothing of the rate.
        let before = s.rate();
        s.observe(16, Duration::from_secs(1));
        assert_eq!(s.rate(), before);
        // A stalled line shrinks the request to the floor, never to nothing.
        for _ in 0..40 {
            s.observe(SERIAL_MIN_CHUNK, Duration::from_secs(9));
        }
        assert_eq!(s.chunk(), SERIAL_MIN_CHUNK);
    }

    #[test]
    fn sizes_read_in_kilobytes_below_a_megabyte() {
        assert_eq!(size_text(5_800), "5.8 KB");
        assert_eq!(size_text(2_500_000), "2.5 MB");
    }
}
