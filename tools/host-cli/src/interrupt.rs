//! Ctrl-C (SIGINT) and SIGTERM during the commands that poll: the relays (`migrate`,
//! `save`, `restore`), image uploads of `domain create`, and `domain console
//! --interactive`. The first signal only sets a flag that the loop polls, so the
//! command can tell the other end before it exits (the source resumes its domain, the
//! destination discards its partial copy, the hypervisor frees a half-done upload, the
//! terminal gets its mode back) instead of leaving it to a timeout. A second one exits at
//! once (128 + the signal's number, as a shell reports it), for when telling the end is
//! what hangs.
//!
//! Not for the other commands: they are single requests, and the default action (die)
//! is right for them, so the handlers are installed only by the commands that poll.
//! (In raw mode the terminal sends Ctrl-C to the guest as a byte, not as SIGINT.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::signal::{SIGINT, SIGTERM};

use crate::{CliError, err};

/// Set by the first signal; arms the exit on the second one.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The number of the last signal that arrived (0: none).
static SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// Install the handlers (once per process is enough; again is harmless but stacks them).
pub fn install() -> Result<(), CliError> {
    for sig in [SIGINT, SIGTERM] {
        let failed = |e: std::io::Error| err(format!("cannot install the signal {sig} handler: {e}"));
        // Order matters: the exit must be registered first, so that it looks at the
        // flag before the first signal's own handler sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, &ARMED).map_err(failed)?;
        signal_hook::flag::register(sig, &ARMED).map_err(failed)?;
        signal_hook::flag::register_usize(sig, &SIGNAL, sig as usize).map_err(failed)?;
    }
    Ok(())
}

/// What the operator pressed or sent, if anything yet: "Ctrl-C" or "SIGTERM".
pub fn pending() -> Option<&'static str> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s if s == SIGINT as usize => Some("Ctrl-C"),
        _ => Some("SIGTERM"),
    }
}
