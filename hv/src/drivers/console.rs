//! The serial console on COM1 (I/O port 0x3F8): the hypervisor's only output device.
//!
//! It writes the 16550 transmit register directly ([`super::uart::Uart`], the driver
//! the serial control channel on COM2 uses too), so it works the same before and after
//! ExitBootServices and on bare metal. It does not reprogram the UART
//! ([`super::uart::Uart::attach`]): the firmware (OVMF: 115200 8N1) already did, and
//! changing the baud rate would garble a real serial terminal. It is also the `log`
//! backend.
//!
//! Not for: guest consoles (those are per-domain ring buffers, issue 5).
//!
//! Locking: one spin lock around the port, held for the duration of one formatted
//! write. DESIGN.md's rule is that nothing logs while holding a lock an exit path can
//! need: at 115200 baud a line takes milliseconds, and another CPU would wait for a
//! domain or the frame pool that long. So a CPU that takes such a lock first holds
//! its output back ([`hold_output`]): what it prints goes into its `PerCpu` buffer,
//! and [`release_output`] writes it once the locks are given up.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

pub use super::uart::COM1;
use super::uart::Uart;

struct Console {
    port: Option<Uart>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { port: None });

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(port) = self.port.as_mut() {
            for byte in s.bytes() {
                // Terminals on a real serial line want CR LF.
                if byte == b'\n' {
                    port.send_blocking(b'\r');
                }
                port.send_blocking(byte);
            }
        }
        Ok(())
    }
}

/// Take COM1 as the console and install the `log` backend. Idempotent.
///
/// Must only be called on the machine (not in host tests): it touches I/O ports.
pub fn init() {
    let mut console = CONSOLE.lock();
    if console.port.is_none() {
        // SAFETY: COM1 at 0x3F8 is the legacy serial port on every PC-compatible machine this image targets (QEMU
        // q35, Bochs i440fx, server boards), or nothing answers there; the hypervisor owns the machine and
        // nothing else drives this port (the serial control channel refuses COM1). `attach` only records the base.
        console.port = Some(unsafe { Uart::attach(COM1) });
    }
    drop(console);
    // A second call finds the logger already set; that is fine.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// The CPUs (bit = `PerCpu::index`, the first 64) holding their output back now.
/// Checked before anything else, so a CPU that never holds (and any CPU before its
/// `PerCpu` exists) never looks at its `PerCpu`.
static HOLDING: AtomicU64 = AtomicU64::new(0);

/// Output a CPU holds back at most; beyond it, lines are written at once (late is
/// better than lost).
const HELD_BYTES: usize = 16 * 1024;

/// Write formatted text to the console (used by the `println!` macro).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    if HOLDING.load(Ordering::Relaxed) != 0 {
        let cpu = crate::percpu::this();
        if cpu.index < 64 && HOLDING.load(Ordering::Relaxed) & (1 << cpu.index) != 0 {
            let mut held = cpu.held_output.lock();
            if held.len() < HELD_BYTES {
                let _ = held.write_fmt(args);
                return;
            }
        }
    }
    let _ = CONSOLE.lock().write_fmt(args);
}

/// From now on, this CPU's output waits in its buffer until [`release_output`]: call
/// before taking a lock an exit path needs. (A CPU with index 64 or more writes at once.)
pub fn hold_output() {
    let index = crate::percpu::this().index;
    if index < 64 {
        HOLDING.fetch_or(1 << index, Ordering::Relaxed);
    }
}

/// Write what this CPU held back and stop holding: call after giving the locks up.
pub fn release_output() {
    let cpu = crate::percpu::this();
    if cpu.index >= 64 {
        return;
    }
    HOLDING.fetch_and(!(1 << cpu.index), Ordering::Relaxed);
    let mut held = cpu.held_output.lock();
    if !held.is_empty() {
        let _ = CONSOLE.lock().write_str(&held);
        // The capacity stays for the next slice: no allocation per slice.
        held.clear();
    }
}

/// Wait up to `ms` milliseconds for every CPU to write what it holds back (before the
/// last lines and power-off: another CPU's last slice may still be on its way out).
pub fn wait_for_held_output(ms: u64) {
    let limit = crate::drivers::time::ms_to_ticks(ms).unwrap_or(0);
    let start = crate::drivers::time::now_ticks();
    while HOLDING.load(Ordering::Relaxed) != 0 && crate::drivers::time::now_ticks().wrapping_sub(start) < limit {
        core::hint::spin_loop();
    }
}

/// Holds this CPU's output back while it lives ([`hold_output`], then
/// [`release_output`] when dropped). Declare it before the lock guards it covers:
/// those are dropped first, and the output is written after them.
#[derive(Debug)]
pub struct HeldOutput(());

impl HeldOutput {
    /// Start holding.
    pub fn new() -> Self {
        hold_output();
        Self(())
    }
}

impl Default for HeldOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HeldOutput {
    fn drop(&mut self) {
        release_output();
    }
}

/// Host tests: what this thread's CPU holds back now.
#[cfg(test)]
pub(crate) fn held_now() -> alloc::string::String {
    crate::percpu::this().held_output.lock().clone()
}

/// Print a line on the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::drivers::console::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::drivers::console::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Print on the serial console without a newline.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::drivers::console::write_fmt(format_args!($($arg)*)) };
}

struct SerialLogger;
static LOGGER: SerialLogger = SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        write_fmt(format_args!("[{:5}] {}: {}\n", record.level(), record.target(), record.args()));
    }
    fn flush(&self) {}
}

#[cfg(test)]
mod held_output_tests {
    use super::{HeldOutput, held_now};

    #[test]
    fn held_output_waits_for_the_guard_and_then_goes_out() {
        assert!(held_now().is_empty());
        {
            let _held = HeldOutput::new();
            crate::println!("DOMAIN 1 VCPU 0 ON CPU apic=0");
            assert_eq!(held_now(), "DOMAIN 1 VCPU 0 ON CPU apic=0\n", "held while the guard lives");
        }
        assert!(held_now().is_empty(), "written (to no port in a host test) when the guard went");
        crate::println!("not held");
        assert!(held_now().is_empty());
    }
}
