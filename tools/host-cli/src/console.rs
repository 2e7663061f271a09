//! `hvctl domain console ID --interactive`: keystrokes to the guest's UART receiver
//! (`DomainConsoleInput`, protocol v5), the console ring's output to stdout, until
//! Ctrl-] (0x1d) or the domain ends (finished or crashed, seen in `DomainList` every
//! [`STATE_POLL`]; hvctl then prints the rest of the console and the domain's state,
//! and leaves with status 0).
//!
//! On a terminal, stdin is put in raw mode (no line editing, no echo, no signals from
//! Ctrl-C: that byte goes to the guest too), and the saved mode is restored on every
//! way out: a normal return, an error, a panic (a hook), SIGTERM (polled). Output
//! processing is left on so a guest's bare `\n` still starts a new line. When stdin is
//! not a terminal (a pipe, a file, a test), nothing is changed: its bytes are sent as
//! they come, and after its end the console is followed until it has been quiet for
//! [`LINGER`], so a script sees the guest's answer.
//!
//! Bounded memory: input is read in pieces of at most `wire::MAX_CONSOLE_INPUT` bytes
//! and not read further until the guest's receiver has taken them (the UART's FIFO
//! holds 16 bytes; what it refuses is sent again after [`POLL`]).

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use wire::{Request, Response};

use crate::transport::{Client, Options};
use crate::{CliError, connection_err, err, interrupt, remote_err};

/// The byte that leaves: Ctrl-] (telnet's and virsh's escape).
pub const ESCAPE: u8 = 0x1d;
/// How long to wait for input before asking for output again.
const POLL: Duration = Duration::from_millis(30);
/// After stdin ends (not a terminal), how long the console must stay quiet before
/// hvctl leaves.
pub const LINGER: Duration = Duration::from_millis(1500);
/// How often the domain's state is looked at (a `DomainList` request).
pub const STATE_POLL: Duration = Duration::from_millis(500);

/// Whether a domain in `state` (`DomainInfo::state`) has ended: it runs no more and
/// takes no input.
pub fn ended(state: &str) -> bool {
    state.starts_with("finished") || state.starts_with("crashed")
}

/// The terminal mode to put back, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Restores the terminal when dropped.
struct RawMode;

impl RawMode {
    fn enter() -> Result<Self, CliError> {
        let stdin = std::io::stdin();
        let saved =
            termios::tcgetattr(stdin.as_fd()).map_err(|e| err(format!("cannot read the terminal mode: {e}")))?;
        let mut raw = saved.clone();
        let output = raw.output_flags;
        termios::cfmakeraw(&mut raw);
        // Keep output processing (ONLCR): guests often end lines with a bare `\n`.
        raw.output_flags = output;
        raw.local_flags.remove(LocalFlags::ISIG);
        if let Ok(mut s) = SAVED.lock() {
            *s = Some(saved);
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .map_err(|e| err(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(Self)
    }
}

fn restore() {
    if let Ok(mut s) = SAVED.lock()
        && let Some(saved) = s.take()
    {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Input from stdin: what is waiting to be sent, and whether stdin has ended.
struct Input {
    pending: Vec<u8>,
    eof: bool,
    leave: bool,
}

impl Input {
    /// Read what stdin has (waiting at most `POLL`), unless bytes are still pending.
    fn fill(&mut self) -> Result<(), CliError> {
        if !self.pending.is_empty() || self.eof || self.leave {
            if !self.pending.is_empty() || self.eof {
                std::thread::sleep(POLL);
            }
            return Ok(());
        }
        let stdin = std::io::stdin();
        let ready = {
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(POLL.as_millis() as u16)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => return Err(err(format!("waiting for input: {e}"))),
            }
        };
        if !ready {
            return Ok(());
        }
        let mut buf = [0u8; wire::MAX_CONSOLE_INPUT];
        // One read(2) on the raw fd: std's buffered stdin could hold bytes back.
        let n = match nix::unistd::read(stdin.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => return Ok(()),
            Err(e) => return Err(err(format!("reading stdin: {e}"))),
        };
        if n == 0 {
            self.eof = true;
            return Ok(());
        }
        let got = &buf[..n];
        match got.iter().position(|&b| b == ESCAPE) {
            Some(at) => {
                self.pending.extend_from_slice(&got[..at]);
                self.leave = true;
            }
            None => self.pending.extend_from_slice(got),
        }
        Ok(())
    }
}

/// Run the interactive console of domain `id`.
pub fn interactive(opts: &Options, id: u32) -> Result<ExitCode, CliError> {
    let mut client = Client::connect(opts)?;
    // The domain must exist before the terminal changes.
    let mut offset = match client.call(&Request::DomainConsole { id, offset: 0 })? {
        Response::Console(c) => {
            write_out(&c.data);
            c.total
        }
        Response::Error(e) => return Err(remote_err(format!("console: {e}"))),
        _ => return Err(connection_err("the hypervisor answered console with the wrong message")),
    };
    interrupt::install()?;
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    say(tty, false, &format!("hvctl: console of domain {id}; press Ctrl-] to leave"));
    let mut input = Input { pending: Vec::new(), eof: false, leave: false };
    let mut quiet_since = Instant::now();
    // `None` once the hypervisor would not list its domains (said once, then not asked).
    let mut state_checked = Some(Instant::now());
    loop {
        if let Some(by) = interrupt::pending() {
            say(tty, true, &format!("hvctl: {by}: left the console of domain {id}"));
            return Ok(ExitCode::SUCCESS);
        }
        input.fill()?;
        if !input.pending.is_empty() {
            let take = input.pending.len().min(wire::MAX_CONSOLE_INPUT);
            let bytes = input.pending[..take].to_vec();
            match client.call(&Request::DomainConsoleInput { id, bytes })? {
                Response::ConsoleInput { accepted, .. } => {
                    input.pending.drain(..(accepted as usize).min(take));
                }
                Response::Error(e) => return Err(remote_err(format!("console input: {e}"))),
                _ => return Err(connection_err("the hypervisor answered console input with the wrong message")),
            }
        }
        match client.call(&Request::DomainConsole { id, offset })? {
            Response::Console(c) => {
                if c.offset > offset {
                    say(tty, true, &format!("hvctl: [{} older console bytes were overwritten]", c.offset - offset));
                }
                if !c.data.is_empty() {
                    write_out(&c.data);
                    quiet_since = Instant::now();
                }
                offset = c.total;
            }
            Response::Error(e) => {
                say(tty, true, &format!("hvctl: domain {id} is gone ({e})"));
                return Ok(ExitCode::SUCCESS);
            }
            _ => return Err(connection_err("the hypervisor answered console with the wrong message")),
        }
        if state_checked.is_some_and(|t| t.elapsed() >= STATE_POLL) {
            state_checked = Some(Instant::now());
            match client.call(&Request::DomainList)? {
                Response::DomainList(list) => match list.domains.iter().find(|d| d.id == id) {
                    Some(d) if ended(&d.state) => {
                        // What it printed between the last read and its end.
                        if let Response::Console(c) = client.call(&Request::DomainConsole { id, offset })? {
                            write_out(&c.data);
                        }
                        say(tty, true, &format!("hvctl: domain {id} ended: {}", d.state));
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(_) => {}
                    None => {
                        say(tty, true, &format!("hvctl: domain {id} is gone"));
                        return Ok(ExitCode::SUCCESS);
                    }
                },
                Response::Error(e) => {
                    say(tty, true, &format!("hvctl: cannot see domain {id}'s state ({e}); Ctrl-] leaves"));
                    state_checked = None;
                }
                _ => return Err(connection_err("the hypervisor answered domain list with the wrong message")),
            }
        }
        if input.leave && input.pending.is_empty() {
            say(tty, tty, &format!("hvctl: left the console of domain {id}"));
            return Ok(ExitCode::SUCCESS);
        }
        if input.eof && input.pending.is_empty() && quiet_since.elapsed() >= LINGER {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// A line of hvctl's own on stderr: on its own line (after the guest's output when
/// `fresh_line`), ended with `\r\n` in raw mode, where `\n` alone does not return.
fn say(tty: bool, fresh_line: bool, msg: &str) {
    let end = if tty { "\r\n" } else { "\n" };
    let start = if fresh_line { end } else { "" };
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{start}{msg}{end}");
    let _ = err.flush();
}

fn write_out(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(data);
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escape_is_ctrl_right_bracket() {
        assert_eq!(ESCAPE, b']' & 0x1f);
    }

    #[test]
    fn finished_and_crashed_domains_have_ended() {
        for s in ["finished(0)", "finished(3)", "crashed: triple fault at RIP 0x1000"] {
            assert!(ended(s), "{s}");
        }
        for s in ["running", "paused", "halted"] {
            assert!(!ended(s), "{s}: it still takes input");
        }
    }
}
