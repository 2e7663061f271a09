//! `--watch` of `hvctl dirty stats` and `hvctl monitor stats` on the built binary
//! against a fake hypervisor whose counters grow by a fixed step per request: the
//! tables, their rates, `--count`, the end when the domain goes away, and Ctrl-C.
//! (stdout is a pipe in most, so each refresh is a timestamped table; one runs on a
//! pseudo-terminal and sees the table redrawn in place.)

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wire::{DirtyStatsReport, ErrorCode, ErrorReply, MonitorDomainStats, MonitorValue, Request, Response};

mod common;

use common::fake_hv::Fake;
use common::{Tty, hvctl, hvctl_on_terminal, stderr, stdout};

/// A fake whose domain 7 logs dirty pages (1000 more per request) and counts VM
/// exits (500 more per request), and is gone after `lives` requests.
fn fake(name: &str, lives: u64) -> Fake {
    let calls = Mutex::new(0u64);
    Fake::start(name, move |r| {
        let mut n = calls.lock().unwrap();
        *n += 1;
        let n = *n;
        match r {
            _ if n > lives => Response::Error(ErrorReply::new(ErrorCode::Refused, "no domain 7".to_string())),
            Request::DirtyStats { domain: 7 } => Response::DirtyStats(DirtyStatsReport {
                domain: 7,
                mode: "wp".to_string(),
                pages_dirtied: 1000 * n,
                dirty_now: 64,
                rounds: n,
                logging_exits: 10 * n,
                range_start: 0,
                range_pages: 6144,
            }),
            Request::MonitorStats { domain: Some(7) } => Response::MonitorStats(vec![MonitorDomainStats {
                domain: 7,
                events: vec![
                    ("vm_exits".to_string(), MonitorValue::Count(500 * n)),
                    ("llc_occupancy".to_string(), MonitorValue::NotAvailable("no RDT".to_string())),
                    (
                        "exits_by_reason".to_string(),
                        MonitorValue::ByReason(vec![("cpuid".to_string(), 100 * n), ("hlt".to_string(), 100 * n)]),
                    ),
                ],
            }]),
            // Domain 8 is never listed: the watch of it ends at once.
            Request::MonitorStats { domain: Some(8) } => Response::MonitorStats(Vec::new()),
            other => Response::Error(ErrorReply::new(ErrorCode::NotImplemented, format!("fake: {}", other.name()))),
        }
    })
}

/// The tables of a non-terminal watch: each starts with its header line.
fn tables<'a>(out: &'a str, header: &str) -> Vec<&'a str> {
    out.split("\n\n").filter(|t| t.starts_with(header)).collect()
}

/// The rate cell of the row that starts with `label`.
fn rate_of(table: &str, label: &str) -> String {
    let line = table.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label} in {table}"));
    line.split_whitespace().last().unwrap().to_string()
}

#[test]
fn dirty_stats_watch_prints_count_tables_with_rates() {
    let f = fake("dirty-count", 100);
    let started = Instant::now();
    let o = hvctl(&["--connect", &f.target(), "dirty", "stats", "7", "--watch", "0.2", "--count", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let t = tables(&out, "domain 7 dirty logging, every 0.2 s, at 20");
    assert_eq!(t.len(), 3, "{out}");
    // Paced: two waits of 0.2 s between three tables.
    assert!(started.elapsed() >= Duration::from_millis(400));
    for (i, table) in t.iter().enumerate() {
        let n = i as u64 + 1;
        let header = table.lines().nth(1).unwrap();
        assert_eq!(header.split_whitespace().collect::<Vec<_>>(), ["counter", "value", "rate"], "{table}");
        let dirtied = table.lines().find(|l| l.starts_with("pages dirtied")).unwrap();
        assert_eq!(dirtied.split_whitespace().nth(2), Some((1000 * n).to_string().as_str()), "{table}");
        assert!(table.lines().any(|l| l.starts_with("mode") && l.ends_with("wp")), "{table}");
        assert!(table.lines().any(|l| l.starts_with("tracked pages") && l.ends_with(" 6144")), "{table}");
        assert!(table.lines().any(|l| l.starts_with("tracked from pfn") && l.ends_with(" 0x0")), "{table}");
    }
    // No rate before a second look; then 1000 pages per 0.2 s or a little slower.
    assert_eq!(rate_of(t[0], "pages dirtied"), "-");
    for table in &t[1..] {
        let rate: f64 = rate_of(table, "pages dirtied").trim_end_matches("/s").parse().unwrap();
        assert!((2000.0..=5100.0).contains(&rate), "{table}");
        // A gauge gets no rate.
        assert!(table.lines().find(|l| l.starts_with("dirty now")).unwrap().ends_with("64"), "{table}");
    }
}

#[test]
fn dirty_stats_watch_ends_when_the_domain_goes_away() {
    let f = fake("dirty-gone", 2);
    let o = hvctl(&["--connect", &f.target(), "dirty", "stats", "7", "--watch", "0.05"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(tables(&stdout(&o), "domain 7 dirty logging").len(), 2, "{}", stdout(&o));
    assert!(
        stderr(&o)
            .contains("domain 7 dirty logging: the hypervisor says no domain 7; the watch ends after 2 refreshes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_domain_gone_before_the_first_table_is_an_error() {
    let f = fake("dirty-never", 0);
    let o = hvctl(&["--connect", &f.target(), "dirty", "stats", "7", "--watch", "0.05"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("no domain 7"), "{}", stderr(&o));
}

#[test]
fn monitor_stats_watch_tables_domain_event_rows() {
    let f = fake("monitor-count", 100);
    let o = hvctl(&["--connect", &f.target(), "monitor", "stats", "7", "--watch", "0.1", "--count", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let t = tables(&out, "domain 7 monitoring, every 0.1 s, at 20");
    assert_eq!(t.len(), 2, "{out}");
    assert!(t[0].lines().nth(1).unwrap().starts_with("domain  event"), "{out}");
    assert!(t[1].lines().any(|l| l.starts_with("7       vm_exits") && l.contains(" 1000 ")), "{out}");
    assert!(t[1].contains("not available: no RDT"), "{out}");
    // Counts by reason get the rate of their sum: 200 per 0.1 s or a little slower.
    assert!(t[1].contains("cpuid=200 hlt=200"), "{out}");
    let by_reason: f64 = rate_of(t[1], "7       exits_by_reason").trim_end_matches("/s").parse().unwrap();
    assert!((400.0..=2100.0).contains(&by_reason), "{out}");
    let rate: f64 = rate_of(t[1], "7       vm_exits").trim_end_matches("/s").parse().unwrap();
    assert!((1000.0..=5100.0).contains(&rate), "{out}");
    // JSON: one document per refresh, after its header.
    let o = hvctl(&["--connect", &f.target(), "monitor", "stats", "7", "--watch", "0.05", "--count", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let docs = tables(&out, "domain 7 monitoring");
    assert_eq!(docs.len(), 2);
    let v: serde_json::Value = serde_json::from_str(docs[1].split_once('\n').unwrap().1).unwrap();
    assert!(v[0]["events"]["vm_exits"].as_u64().is_some(), "{v}");
}

#[test]
fn monitor_watch_of_an_unlisted_domain_says_so() {
    let f = fake("monitor-unlisted", 100);
    let o = hvctl(&["--connect", &f.target(), "monitor", "stats", "8", "--watch", "0.05"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("domain 8 is no longer listed"), "{}", stderr(&o));
}

#[test]
fn count_needs_watch_and_watch_needs_a_positive_interval() {
    let o = hvctl(&["--connect", "unix:/nonexistent:5000", "dirty", "stats", "7", "--count", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--watch"), "{}", stderr(&o));
    let f = fake("zero", 100);
    let o = hvctl(&["--connect", &f.target(), "dirty", "stats", "7", "--watch", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("give a number of seconds above 0"), "{}", stderr(&o));
}

#[test]
fn ctrl_c_ends_the_watch_cleanly() {
    let f = fake("ctrl-c", 1000);
    let child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(["--connect", &f.target(), "dirty", "stats", "7", "--watch"])
        .env_remove("HVCTL_CONNECT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The default interval is 2 s: the first table is out, the second not yet.
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{:?} {}", o.status, stderr(&o));
    assert!(stderr(&o).contains("stopped by Ctrl-C after 1 refresh"), "{}", stderr(&o));
    assert_eq!(tables(&stdout(&o), "domain 7 dirty logging, every 2 s").len(), 1, "{}", stdout(&o));
}

#[test]
fn on_a_terminal_the_table_is_redrawn_in_place() {
    let f = fake("tty", 100);
    let (o, drawn) = hvctl_on_terminal(
        &["--connect", &f.target(), "dirty", "stats", "7", "--watch", "0.05", "--count", "3"],
        Tty::Stdout,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The header, the column heads and 7 counters: 9 lines, and before the second and
    // the third table the cursor goes up those 9 lines and clears below.
    assert_eq!(drawn.matches("\x1b[9F\x1b[J").count(), 2, "{drawn:?}");
    assert_eq!(drawn.matches("domain 7 dirty logging, every 0.05 s").count(), 3, "{drawn:?}");
    // No blank line between tables, as in the log form.
    assert!(!drawn.contains("\r\n\r\n"), "{drawn:?}");
}
