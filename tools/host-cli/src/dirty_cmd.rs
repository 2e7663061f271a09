//! `hvctl dirty ...`: log-dirty mode of a domain — start, counters, peek/clean, a
//! continuous stream of dirty bitmaps, and a heatmap of a recorded stream.
//!
//! Stream file format: a sequence of wire frames, each a `StreamChunk` (`wire::encode_stream_chunk`,
//! CRC-32C per chunk) whose data is one round: a postcard-encoded `wire::DirtyBitmapReport`
//! (the round's dirty pages as `wire::dirty` records). Chunks are numbered from 0; the
//! last one has `last` set when the stream ended cleanly.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use wire::dirty::DirtyBitmap;
use wire::{DirtyBitmapReport, DirtyStatsReport, ErrorCode, Request, Response, StreamChunk};

use crate::heatmap::{Format, Heatmap};
use crate::transport::{Client, Options};
use crate::watch::{self, Poll, Row, WatchArgs};
use crate::{CliError, connection_err, err, remote_err};

/// `hvctl dirty ...`
#[derive(Debug, Args)]
pub struct DirtyArgs {
    #[command(subcommand)]
    command: DirtyCommand,
}

#[derive(Debug, Subcommand)]
enum DirtyCommand {
    /// Start logging (`auto` picks pml, then dbit, then wp).
    Start {
        /// Domain id.
        domain: u32,
        /// auto, pml (VMX), dbit (EPT/NPT dirty bits) or wp (write-protection).
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Track only GPA:LEN (hex or decimal bytes, page-aligned), e.g. 0x400000:0x100000.
        #[arg(long)]
        range: Option<String>,
    },
    /// Counters: mode, pages dirtied, dirty now, rounds, exits caused by logging; with
    /// --watch a table refreshed with their rates.
    Stats {
        /// Domain id.
        domain: u32,
        #[command(flatten)]
        watch: WatchArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The dirty pages, without cleaning them.
    Peek {
        /// Domain id.
        domain: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The dirty pages, cleaned and re-armed so the next write is logged again.
    Clean {
        /// Domain id.
        domain: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Peek-and-clean every --interval ms and write the rounds as a stream of wire
    /// records (see the module docs) to --out or stdout.
    Stream {
        /// Domain id.
        domain: u32,
        /// Milliseconds between rounds.
        #[arg(long, default_value_t = 500)]
        interval: u64,
        /// Stop after this many rounds (default: until the domain is gone or Ctrl-C).
        #[arg(long)]
        rounds: Option<u64>,
        /// File to write (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Render a recorded stream as a picture: guest-physical address left to right,
    /// rounds top to bottom, a colour legend of dirty pages per cell, titled with the
    /// domain.
    Heatmap {
        /// The stream file (`hvctl dirty stream --out`).
        #[arg(long = "stream")]
        input: PathBuf,
        /// The picture to write (.png or .svg).
        #[arg(long)]
        out: PathBuf,
        /// png or svg (default: from the --out file's extension).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Image width in pixels, at least 400 (pages are binned to fit).
        #[arg(long, default_value_t = 1024)]
        width: u32,
    },
    /// Stop logging; prints the final counters.
    Stop {
        /// Domain id.
        domain: u32,
    },
    /// Start a second, tracking log over one range (like Xen's video-RAM tracking); it
    /// coexists with the main log and shares its mechanism.
    Track {
        /// Domain id.
        domain: u32,
        /// GPA:LEN to track (page-aligned).
        #[arg(long)]
        range: String,
    },
    /// The tracking log's dirty pages (--clean to clean and re-arm them).
    TrackPeek {
        /// Domain id.
        domain: u32,
        /// Clean what is reported.
        #[arg(long)]
        clean: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the tracking log; prints its final counters.
    TrackStop {
        /// Domain id.
        domain: u32,
    },
}

// The --width help names the narrowest picture.
const _: () = assert!(crate::heatmap::MIN_WIDTH == 400);

fn parse_range(r: &str) -> Result<(u64, u64), CliError> {
    let (gpa, len) = r
        .split_once(':')
        .and_then(|(g, l)| Some((parse_num(g)?, parse_num(l)?)))
        .ok_or_else(|| err(format!("--range {r}: expected GPA:LEN")))?;
    if gpa % 4096 != 0 || len % 4096 != 0 || len == 0 {
        return Err(err(format!("--range {r}: GPA and LEN must be non-zero multiples of 4096")));
    }
    Ok((gpa / 4096, len / 4096))
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn stats_response(r: Response, what: &str) -> Result<DirtyStatsReport, CliError> {
    match r {
        Response::DirtyStats(s) => Ok(s),
        Response::Error(e) => Err(remote_err(format!("{what}: {e}"))),
        _ => Err(connection_err(format!("the hypervisor answered {what} with the wrong message"))),
    }
}

fn stats_json(s: &DirtyStatsReport) -> String {
    let v = json!({
        "domain": s.domain, "mode": s.mode, "pages_dirtied": s.pages_dirtied, "dirty_now": s.dirty_now,
        "rounds": s.rounds, "logging_exits": s.logging_exits, "range_start_pfn": s.range_start, "range_pages": s.range_pages,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The rows of `dirty stats --watch`: the counters get rates, the gauges do not.
fn stats_rows(s: &DirtyStatsReport) -> Vec<Row> {
    let row = |name: &str, value: String, counter: Option<u64>| Row { cells: vec![name.to_string()], value, counter };
    vec![
        row("mode", s.mode.clone(), None),
        row("tracked pages", s.range_pages.to_string(), None),
        row("tracked from pfn", format!("{:#x}", s.range_start), None),
        row("pages dirtied", s.pages_dirtied.to_string(), Some(s.pages_dirtied)),
        row("dirty now", s.dirty_now.to_string(), None),
        row("rounds", s.rounds.to_string(), Some(s.rounds)),
        row("logging exits", s.logging_exits.to_string(), Some(s.logging_exits)),
    ]
}

/// `dirty stats D --watch`: refused (no such domain, logging stopped) ends the watch.
fn watch_stats(client: &mut Client, domain: u32, args: &WatchArgs, json: bool) -> Result<ExitCode, CliError> {
    watch::run(args, &format!("domain {domain} dirty logging"), || {
        let answer = client.call(&Request::DirtyStats { domain })?;
        if let Response::Error(e) = &answer
            && e.code == ErrorCode::Refused
        {
            return Ok(Poll::Gone(format!("the hypervisor says {}", e.message)));
        }
        let s = stats_response(answer, "stats")?;
        Ok(if json { Poll::Text(stats_json(&s)) } else { Poll::Table(vec!["counter"], stats_rows(&s)) })
    })
}

fn print_stats(s: &DirtyStatsReport, json: bool) {
    if json {
        println!("{}", stats_json(s));
    } else {
        println!("domain {} log-dirty mode {}", s.domain, s.mode);
        println!("  tracked pages   {} from pfn {:#x}", s.range_pages, s.range_start);
        println!("  pages dirtied   {}", s.pages_dirtied);
        println!("  dirty now       {}", s.dirty_now);
        println!("  rounds          {}", s.rounds);
        println!("  logging exits   {}", s.logging_exits);
    }
}

fn peek(client: &mut Client, domain: u32, clean: bool) -> Result<DirtyBitmapReport, CliError> {
    match client.call(&Request::DirtyPeek { domain, clean })? {
        Response::DirtyBitmap(b) => Ok(b),
        Response::Error(e) => Err(remote_err(format!("peek: {e}"))),
        _ => Err(connection_err("the hypervisor answered peek with the wrong message")),
    }
}

/// The bitmap a report describes.
pub fn bitmap_of(report: &DirtyBitmapReport) -> Result<DirtyBitmap, CliError> {
    DirtyBitmap::from_records(0..report.pages, &report.records)
        .map_err(|e| connection_err(format!("the hypervisor sent bad dirty records: {e}")))
}

fn print_bitmap(report: &DirtyBitmapReport, json: bool) -> Result<(), CliError> {
    let bitmap = bitmap_of(report)?;
    let runs: Vec<(u64, u64)> = bitmap.runs().map(|r| (r.start, r.end - r.start)).collect();
    if json {
        let v = json!({
            "domain": report.domain, "pages": report.pages, "dirty": bitmap.count_ones(),
            "runs": runs.iter().map(|(s, n)| json!({"pfn": s, "pages": n})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("domain {}: {} of {} pages dirty", report.domain, bitmap.count_ones(), report.pages);
        for (start, n) in runs {
            println!(
                "  pfn {start:#x}{}",
                if n > 1 { format!("..{:#x} ({n} pages)", start + n - 1) } else { String::new() }
            );
        }
    }
    Ok(())
}

/// A stream file read back.
#[derive(Debug)]
pub struct Recorded {
    /// The domain its rounds came from (None: a stream of no rounds).
    pub domain: Option<u32>,
    /// One bitmap per round, round 0 first.
    pub rounds: Vec<DirtyBitmap>,
}

/// Read a stream file.
pub fn read_stream(bytes: &[u8]) -> Result<Recorded, CliError> {
    let mut domain = None;
    let mut decoder = wire::FrameDecoder::new();
    let mut rounds = Vec::new();
    let mut input = bytes;
    let mut next_seq = 0;
    loop {
        let taken = decoder.push(input);
        input = &input[taken..];
        let mut progressed = taken > 0;
        while let Some(frame) = decoder.next_frame() {
            progressed = true;
            let frame = frame.map_err(|e| err(format!("not a dirty stream: {e}")))?;
            let chunk = wire::decode_stream_chunk(&frame).map_err(|e| err(format!("not a dirty stream: {e}")))?;
            chunk.verify().map_err(|e| err(format!("round {}: {e}", chunk.seq)))?;
            if chunk.seq != next_seq {
                return Err(err(format!("the stream skips from round {next_seq} to {}", chunk.seq)));
            }
            next_seq += 1;
            let report: DirtyBitmapReport =
                postcard::from_bytes(&chunk.data).map_err(|e| err(format!("round {}: {e}", chunk.seq)))?;
            domain.get_or_insert(report.domain);
            rounds.push(bitmap_of(&report)?);
        }
        if !progressed {
            break;
        }
    }
    if decoder.buffered() > 0 {
        return Err(err("the stream ends in the middle of a frame"));
    }
    Ok(Recorded { domain, rounds })
}

fn heatmap(input: &PathBuf, out: &PathBuf, format: Option<Format>, width: u32) -> Result<ExitCode, CliError> {
    let format = match format {
        Some(f) => f,
        None => match out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("svg") => Format::Svg,
            Some("png") => Format::Png,
            _ => return Err(err(format!("{}: name it .png or .svg, or pass --format", out.display()))),
        },
    };
    let bytes = std::fs::read(input).map_err(|e| err(format!("cannot read {}: {e}", input.display())))?;
    let stream = read_stream(&bytes)?;
    let map = Heatmap { domain: stream.domain, rounds: &stream.rounds };
    if stream.rounds.is_empty() || map.pages() == 0 {
        return Err(err(format!("{} holds no rounds", input.display())));
    }
    let picture = map.render(format, width)?;
    std::fs::write(out, &picture.bytes).map_err(|e| err(format!("cannot write {}: {e}", out.display())))?;
    println!(
        "{}: {} rounds x {} pages ({}x{} px)",
        out.display(),
        stream.rounds.len(),
        map.pages(),
        picture.width,
        picture.height
    );
    Ok(ExitCode::SUCCESS)
}

/// Run a `dirty` subcommand.
pub fn run(opts: &Options, args: DirtyArgs) -> Result<ExitCode, CliError> {
    match args.command {
        DirtyCommand::Heatmap { input, out, format, width } => heatmap(&input, &out, format, width),
        other => remote(&mut Client::connect(opts)?, other),
    }
}

fn remote(client: &mut Client, command: DirtyCommand) -> Result<ExitCode, CliError> {
    match command {
        DirtyCommand::Start { domain, mode, range } => {
            let range = range.as_deref().map(parse_range).transpose()?;
            let s = stats_response(client.call(&Request::DirtyStart { domain, mode, range })?, "start")?;
            println!("domain {domain}: logging dirty pages with {} ({} pages tracked)", s.mode, s.range_pages);
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Stats { domain, watch, json } if watch.watch.is_some() => {
            watch_stats(client, domain, &watch, json)
        }
        DirtyCommand::Stats { domain, watch: _, json } => {
            print_stats(&stats_response(client.call(&Request::DirtyStats { domain })?, "stats")?, json);
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Peek { domain, json } => {
            print_bitmap(&peek(client, domain, false)?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Clean { domain, json } => {
            print_bitmap(&peek(client, domain, true)?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Stop { domain } => {
            let s = stats_response(client.call(&Request::DirtyStop { domain })?, "stop")?;
            print_stats(&s, false);
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Stream { domain, interval, rounds, out } => {
            let mut sink: Box<dyn Write> = match &out {
                Some(p) => {
                    Box::new(std::fs::File::create(p).map_err(|e| err(format!("cannot create {}: {e}", p.display())))?)
                }
                None => Box::new(std::io::stdout().lock()),
            };
            let mut seq = 0u32;
            loop {
                let report = match client.call(&Request::DirtyPeek { domain, clean: true })? {
                    Response::DirtyBitmap(b) => b,
                    Response::Error(e) if seq > 0 => {
                        eprintln!("hvctl: stream ended after {seq} rounds: {e}");
                        break;
                    }
                    Response::Error(e) => return Err(remote_err(format!("stream: {e}"))),
                    _ => return Err(connection_err("the hypervisor answered peek with the wrong message")),
                };
                let data = postcard::to_allocvec(&report).map_err(|e| err(format!("encoding round {seq}: {e}")))?;
                let last = rounds.is_some_and(|n| u64::from(seq) + 1 >= n);
                let chunk = StreamChunk::new(domain, seq, last, data);
                let mut frame = Vec::new();
                wire::encode_stream_chunk(1, &chunk, &mut frame).map_err(|e| err(format!("round {seq}: {e}")))?;
                sink.write_all(&frame).map_err(|e| err(format!("writing the stream: {e}")))?;
                sink.flush().map_err(|e| err(format!("writing the stream: {e}")))?;
                seq += 1;
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(interval));
            }
            if let Some(p) = out {
                eprintln!("hvctl: {seq} rounds written to {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::Heatmap { input, out, format, width } => heatmap(&input, &out, format, width),
        DirtyCommand::Track { domain, range } => {
            let range = parse_range(&range)?;
            let s = stats_response(client.call(&Request::DirtyTrack { domain, range })?, "track")?;
            println!("domain {domain}: tracking {} pages from pfn {:#x} with {}", s.range_pages, s.range_start, s.mode);
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::TrackPeek { domain, clean, json } => {
            let report = match client.call(&Request::DirtyTrackPeek { domain, clean })? {
                Response::DirtyBitmap(b) => b,
                Response::Error(e) => return Err(remote_err(format!("track-peek: {e}"))),
                _ => return Err(connection_err("the hypervisor answered track-peek with the wrong message")),
            };
            print_bitmap(&report, json)?;
            Ok(ExitCode::SUCCESS)
        }
        DirtyCommand::TrackStop { domain } => {
            print_stats(&stats_response(client.call(&Request::DirtyTrackStop { domain })?, "track-stop")?, false);
            Ok(ExitCode::SUCCESS)
        }
    }
}
