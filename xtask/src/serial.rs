//! Reading the hypervisor's serial log: ANSI clean-up and the stable markers that
//! `hv` documents (CAPS, PROBE-RAW, READY, REFUSED, FAIL, SHUTDOWN).

use std::collections::BTreeMap;

/// Strip ANSI escape sequences (OVMF's console emits them) and carriage returns.
pub fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameter and intermediate bytes, then one final byte.
                    while let Some(&p) = chars.peek() {
                        chars.next();
                        if ('\u{40}'..='\u{7e}').contains(&p) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// A serial log split into cleaned lines.
#[derive(Debug)]
pub struct SerialLog {
    lines: Vec<String>,
}

impl SerialLog {
    /// Parse raw serial output.
    pub fn new(raw: &str) -> Self {
        Self { lines: clean(raw).lines().map(|l| l.trim_end().to_string()).collect() }
    }

    /// All cleaned lines, joined.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The first line that starts with `prefix` (after leading junk is trimmed).
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines.iter().map(|l| l.trim_start()).find(|l| l.starts_with(prefix))
    }

    /// The CAPS line as key/value pairs.
    pub fn caps(&self) -> Option<BTreeMap<String, String>> {
        let line = self.line("CAPS ")?;
        Some(
            line.split_whitespace()
                .skip(1)
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Whether the READY marker appeared.
    pub fn ready_at(&self) -> bool {
        self.line("READY").is_some()
    }

    /// The outcome from `SHUTDOWN outcome=...`.
    pub fn outcome(&self) -> Option<&str> {
        self.line("SHUTDOWN outcome=").and_then(|l| l.strip_prefix("SHUTDOWN outcome="))
    }

    /// Why a hypervisor stopped, in one line: its last `FAIL:` line (a panic prints
    /// `FAIL: panic: ...`) or `FATAL:` line (a CPU exception in the hypervisor), the
    /// latest because that is the one that stopped it while earlier ones may have been
    /// survived; else its `SHUTDOWN` line; else "no FAIL line".
    pub fn stop_reason(&self) -> String {
        let last = |prefixes: &[&str]| {
            self.lines.iter().rev().map(|l| l.trim_start()).find(|l| prefixes.iter().any(|p| l.starts_with(p)))
        };
        last(&["FAIL:", "FATAL:"]).or_else(|| last(&["SHUTDOWN"])).unwrap_or("no FAIL line").to_string()
    }

    /// One line saying how the run ended, for error messages.
    pub fn outcome_summary(&self) -> String {
        for marker in ["FAIL:", "REFUSED:", "FATAL:"] {
            if let Some(l) = self.line(marker) {
                return l.to_string();
            }
        }
        match self.outcome() {
            Some(o) => format!("shut down with outcome {o}"),
            None => "no outcome marker in the serial log".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_ovmf_escapes_and_finds_markers() {
        let raw = "\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h\u{1b}[2J\r\nhv 0.1.0\r\nCAPS v=1 vendor=AuthenticAMD svm.npt=1\r\nREADY arch=svm\r\nSHUTDOWN outcome=Ready\r\n";
        let log = SerialLog::new(raw);
        assert!(!clean(raw).contains('\u{1b}'));
        assert!(!clean(raw).contains("=3h"));
        assert_eq!(log.caps().unwrap()["svm.npt"], "1");
        assert_eq!(log.caps().unwrap()["vendor"], "AuthenticAMD");
        assert!(log.ready_at());
        assert_eq!(log.outcome(), Some("Ready"));
        assert_eq!(SerialLog::new("REFUSED: no x\n").outcome_summary(), "REFUSED: no x");
        assert_eq!(SerialLog::new("nothing\n").outcome_summary(), "no outcome marker in the serial log");
    }

    #[test]
    fn stop_reason_is_the_last_fail_line_else_shutdown() {
        let raw = "\u{1b}[2JREADY arch=svm\r\n  FAIL: domain 1 triple fault\r\nFAIL: vsock: queue broken\r\n\
                   SHUTDOWN outcome=Failed\r\n";
        assert_eq!(SerialLog::new(raw).stop_reason(), "FAIL: vsock: queue broken");
        assert_eq!(SerialLog::new("READY\nSHUTDOWN outcome=Ready\n").stop_reason(), "SHUTDOWN outcome=Ready");
        // A FAIL that is not at the start of its line is not a marker.
        assert_eq!(SerialLog::new("READY\nguest says FAIL: x\n").stop_reason(), "no FAIL line");
        assert_eq!(SerialLog::new("").stop_reason(), "no FAIL line");
        // The last line may lack its newline (the emulator died mid-line).
        assert_eq!(SerialLog::new("FAIL: a\nFAIL: b").stop_reason(), "FAIL: b");
        assert_eq!(SerialLog::new("FAIL: a\nFATAL: CPU exception 14\n").stop_reason(), "FATAL: CPU exception 14");
    }
}
