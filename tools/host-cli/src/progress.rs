//! The progress bar of `hvctl migrate`, `save` and `restore` when stderr is a terminal
//! (indicatif): how far the transfer is, its rate and an ETA, with the state line the
//! relay prints today beside it, cut to the terminal's width.
//!
//! Not for pipes, logs or `--json`: there `migrate_cmd::ProgressLine` keeps printing the
//! plain line that scripts and the tests read (and `--progress` forces it). This module
//! only draws; what counts as done and how much is left is the caller's, except for the
//! estimate of a live migration's remaining bytes ([`migration_bytes`]).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use wire::MigrateProgress;

/// Bar, percentage, bytes, rate, ETA, then the state line (`wide_msg` takes what is left
/// of the terminal's width and cuts it there, so the bar never wraps). Decimal units
/// (MB = 10^6 bytes), as the state line and `--bandwidth MB/S` use.
const TEMPLATE: &str = "{bar:24} {percent:>3}% {decimal_bytes:>9}/{decimal_total_bytes:<9} {decimal_bytes_per_sec:>11}  ETA {eta:<4} {wide_msg}";

/// A transfer's bar.
#[derive(Debug)]
pub struct TransferBar {
    bar: ProgressBar,
}

impl TransferBar {
    /// A bar on stderr.
    pub fn stderr() -> Self {
        Self::on(ProgressDrawTarget::stderr())
    }

    fn on(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), target);
        // The template is a constant: it parses, and the unit test below renders it.
        bar.set_style(
            ProgressStyle::with_template(TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Self { bar }
    }

    /// `done` of `total` bytes; `text` is the state line. indicatif limits the redraws
    /// itself (at most 20 a second), so every update can be handed to it.
    pub fn update(&self, done: u64, total: u64, text: &str) {
        self.bar.set_length(total.max(done));
        self.bar.set_position(done);
        self.bar.set_message(text.to_string());
    }

    /// Leave the last state drawn as it is (not filled up: a cancelled transfer stays
    /// where it stopped) and move below it, so what follows starts on its own line.
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

/// A live migration's bytes sent and the bytes it will have sent when done, as far as
/// is known now: what is sent, plus the pages still to send (the rest of the full copy
/// in round 0, the last peek's dirty pages after it) at the stream's bytes per page so
/// far. The total grows when the guest dirties memory faster than it is sent; the ETA
/// says so.
pub fn migration_bytes(p: &MigrateProgress) -> (u64, u64) {
    let per_page = p.bytes_sent.checked_div(p.pages_sent).unwrap_or(4096).max(1);
    let left = if p.round == 0 { p.pages_total.saturating_sub(p.pages_sent) } else { p.dirty_pages };
    (p.bytes_sent, p.bytes_sent.saturating_add(left.saturating_mul(per_page)))
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal of 120 columns that keeps each write.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.push(s.to_string());
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bar_shows_fraction_bytes_rate_eta_and_the_state_line() {
        let screen = Screen::default();
        let bar = TransferBar::on(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        bar.update(0, 8 << 20, "precopy round 0");
        std::thread::sleep(std::time::Duration::from_millis(120));
        bar.update(2 << 20, 8 << 20, "precopy round 0  pages 512/2048");
        bar.finish();
        let drawn = screen.0.lock().unwrap().clone();
        let last = drawn.iter().rfind(|l| !l.trim().is_empty()).cloned().unwrap_or_default();
        assert!(last.starts_with("======>"), "{last:?}");
        for part in [" 25% ", "2.10 MB/8.39 MB", "MB/s", "ETA ", "precopy round 0  pages 512/2048"] {
            assert!(last.contains(part), "no {part:?} in {last:?}");
        }
        assert!(last.chars().count() <= 120, "{last:?}");
    }

    #[test]
    fn migration_estimate_follows_the_rounds() {
        let mut p = MigrateProgress {
            round: 0,
            pages_total: 1000,
            pages_sent: 250,
            bytes_sent: 250 * 4100,
            ..Default::default()
        };
        assert_eq!(migration_bytes(&p), (250 * 4100, 1000 * 4100));
        // After the full copy: what is left is the dirty set.
        p.round = 2;
        p.pages_sent = 1100;
        p.bytes_sent = 1100 * 4100;
        p.dirty_pages = 30;
        assert_eq!(migration_bytes(&p), (1100 * 4100, 1130 * 4100));
        // Nothing sent yet: a page is a page.
        assert_eq!(migration_bytes(&MigrateProgress { pages_total: 10, ..Default::default() }), (0, 10 * 4096));
    }
}
