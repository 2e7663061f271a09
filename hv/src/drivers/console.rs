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
//! Locking: one spin lock around the port. Exit handlers must not log while holding
//! another lock an exit path needs (DESIGN.md, Conventions); the console lock itself
//! is only held for the duration of one formatted write.

use core::fmt::{self, Write};
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

/// Write formatted text to the console (used by the `println!` macro).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let _ = CONSOLE.lock().write_fmt(args);
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
