//! `--watch [SECS]` of `hvctl monitor stats` and `hvctl dirty stats`: ask again every
//! SECS seconds and show the answer as a table with a per-second rate beside each
//! counter. On a terminal the table is redrawn in place; otherwise (a pipe, a log file)
//! each refresh prints a timestamp line and a whole table, so the output reads as a log.
//!
//! The watch ends cleanly (exit 0, after `--count N` tables, on Ctrl-C or SIGTERM, or
//! when the hypervisor says the thing watched is gone) and with the usual error when the
//! hypervisor cannot be reached. What to ask and how to lay out a row is the caller's:
//! this module only paces, computes rates and draws.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;

use crate::{CliError, err, interrupt, remote_err};

/// The refresh interval when `--watch` is given without one.
const DEFAULT_SECS: &str = "2";
/// How often the wait between refreshes looks for Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

/// `--watch [SECS]` and `--count N`, flattened into the commands that have them.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Refresh every SECS seconds (default 2) as a table with rates, until Ctrl-C, the
    /// domain goes away or --count. A number right after --watch is its SECS: name the
    /// domain before it (`stats 3 --watch`).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = DEFAULT_SECS)]
    pub watch: Option<f64>,
    /// With --watch: stop after N refreshes.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

/// One row: the cells before the value, the value, and the counter behind it (if it is
/// one, its rate is shown).
#[derive(Debug, Clone)]
pub struct Row {
    /// Leading cells (e.g. domain, event).
    pub cells: Vec<String>,
    /// The value as text.
    pub value: String,
    /// The value as a counter, for the rate column.
    pub counter: Option<u64>,
}

/// What one refresh found.
#[derive(Debug)]
pub enum Poll {
    /// A table: the leading cells' headings (the value and rate columns follow) and rows.
    Table(Vec<&'static str>, Vec<Row>),
    /// Text to print as it is (`--json`): one document per refresh.
    Text(String),
    /// The thing watched is gone; the message says what happened.
    Gone(String),
}

/// Refresh every `secs` until done. `poll` asks the hypervisor once.
pub fn run(
    args: &WatchArgs,
    what: &str,
    mut poll: impl FnMut() -> Result<Poll, CliError>,
) -> Result<ExitCode, CliError> {
    let secs = args.watch.unwrap_or(0.0);
    if !(secs.is_finite() && secs > 0.0) {
        return Err(err(format!("--watch {secs}: give a number of seconds above 0")));
    }
    interrupt::install()?;
    let every = Duration::from_secs_f64(secs);
    let tty = std::io::stdout().is_terminal();
    let mut screen = Screen { tty, lines: 0 };
    let mut last: Option<(Instant, BTreeMap<Vec<String>, u64>)> = None;
    let mut shown = 0u64;
    loop {
        let at = Instant::now();
        let header = format!("{what}, every {secs} s, at {}", utc_now());
        match poll()? {
            // Gone before anything was shown: the command failed, as without --watch.
            Poll::Gone(why) if shown == 0 => return Err(remote_err(format!("{what}: {why}"))),
            Poll::Gone(why) => {
                screen.end();
                eprintln!("hvctl: {what}: {why}; the watch ends after {shown} refresh{}", plural_es(shown));
                return Ok(ExitCode::SUCCESS);
            }
            Poll::Text(text) => screen.draw(&format!("{header}\n{text}")),
            Poll::Table(heads, rows) => {
                let previous = last.as_ref().map(|(t, counters)| (at.duration_since(*t).as_secs_f64(), counters));
                screen.draw(&format!("{header}\n{}", table(&heads, &rows, previous)));
                let counters = rows.iter().filter_map(|r| Some((r.cells.clone(), r.counter?))).collect();
                last = Some((at, counters));
            }
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            screen.end();
            return Ok(ExitCode::SUCCESS);
        }
        while at.elapsed() < every {
            if let Some(by) = interrupt::pending() {
                screen.end();
                eprintln!("hvctl: {what}: stopped by {by} after {shown} refresh{}", plural_es(shown));
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(POLL.min(every.saturating_sub(at.elapsed())).max(Duration::from_millis(1)));
        }
    }
}

fn plural_es(n: u64) -> &'static str {
    if n == 1 { "" } else { "es" }
}

/// Where the tables go: stdout, redrawn in place on a terminal.
struct Screen {
    tty: bool,
    /// Lines of the table on screen now (terminal only).
    lines: usize,
}

impl Screen {
    fn draw(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty && self.lines > 0 {
            // Back to the first line of the last table (ESC [ n F: up n lines, column 1),
            // then clear to the end of the screen (ESC [ J): the new table replaces it
            // without scrolling, and without erasing what was above it.
            let _ = write!(out, "\x1b[{}F\x1b[J", self.lines);
        }
        let _ = writeln!(out, "{text}");
        if !self.tty {
            // A blank line between the tables of a log.
            let _ = writeln!(out);
        }
        let _ = out.flush();
        self.lines = text.lines().count();
    }

    fn end(&mut self) {
        let _ = std::io::stdout().flush();
    }
}

/// The rows as aligned columns with a rate beside each counter; `previous` is the last
/// refresh (seconds since, counters by leading cells).
fn table(heads: &[&str], rows: &[Row], previous: Option<(f64, &BTreeMap<Vec<String>, u64>)>) -> String {
    let mut grid: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    grid.push(heads.iter().map(|h| h.to_string()).chain(["value".to_string(), "rate".to_string()]).collect());
    for r in rows {
        let rate = match (r.counter, previous.and_then(|(dt, c)| Some((dt, c.get(&r.cells)?)))) {
            (Some(now), Some((dt, &then))) if dt > 0.0 => rate_text(now.saturating_sub(then) as f64 / dt),
            (Some(_), _) => "-".to_string(),
            (None, _) => String::new(),
        };
        grid.push(r.cells.iter().cloned().chain([r.value.clone(), rate]).collect());
    }
    if rows.is_empty() {
        grid.push(vec!["(nothing to show)".to_string()]);
    }
    let columns = grid.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| grid.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let value_column = heads.len();
    let mut out = String::new();
    for row in &grid {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                // Numbers (the value and the rate) line up on the right.
                if c >= value_column {
                    format!("{cell:>w$}", w = widths[c])
                } else {
                    format!("{cell:<w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.pop();
    out
}

/// "0/s", "12/s", "3.4k/s", "1.2M/s".
fn rate_text(per_sec: f64) -> String {
    match per_sec {
        r if r >= 1e6 => format!("{:.1}M/s", r / 1e6),
        r if r >= 1e4 => format!("{:.1}k/s", r / 1e3),
        r if r >= 10.0 || r == 0.0 => format!("{r:.0}/s"),
        r => format!("{r:.1}/s"),
    }
}

/// Now as an RFC 3339 UTC time, to the second.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc_text(secs)
}

/// Seconds since 1970 as `YYYY-MM-DDTHH:MM:SSZ` (the days-to-civil algorithm of Howard
/// Hinnant's date library, valid for every date after 1970).
pub(crate) fn utc_text(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_matches_known_dates() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn table_aligns_and_shows_rates() {
        let row = |name: &str, v: u64| Row { cells: vec![name.to_string()], value: v.to_string(), counter: Some(v) };
        let first = table(&["counter"], &[row("pages dirtied", 100), row("rounds", 1)], None);
        assert_eq!(first, "counter        value  rate\npages dirtied    100     -\nrounds             1     -");
        let before: BTreeMap<Vec<String>, u64> =
            [(vec!["pages dirtied".to_string()], 100), (vec!["rounds".to_string()], 1)].into();
        let second = table(&["counter"], &[row("pages dirtied", 30_100), row("rounds", 2)], Some((2.0, &before)));
        assert!(second.contains("pages dirtied  30100  15.0k/s"), "{second}");
        assert!(second.contains("rounds             2    0.5/s"), "{second}");
    }
}
