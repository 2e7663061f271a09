//! The 16550 UART at any legacy I/O base: the hypervisor's COM1 log console
//! ([`super::console`]) and the serial control channel on COM2
//! ([`crate::services::serial_control`]) are both this driver.
//!
//! Two ways to take a port:
//! - [`Uart::attach`] only records the base (the console: the firmware, OVMF at 115200
//!   8N1, already programmed COM1, and reprogramming it would garble a real terminal);
//! - [`Uart::probe`] checks that a UART answers at the base (its scratch register holds
//!   what was written; an absent port reads 0xFF) and programs it: 8N1 at the requested
//!   baud, FIFOs on and cleared, interrupts off (the hypervisor polls).
//!
//! [`BufferedUart`] adds the non-blocking paths the control channel needs: receive
//! drains the RX FIFO into a bounded software buffer, transmit writes from a queue only
//! while the transmitter has room. Nothing here ever waits, except
//! [`Uart::send_blocking`], the console's path, which waits for the transmitter as the
//! log must not lose lines.
//!
//! Register layout (PC16550D data sheet, "Register Summary"): base+0 RBR/THR (DLL with
//! DLAB), +1 IER (DLM with DLAB), +2 IIR/FCR, +3 LCR, +4 MCR, +5 LSR, +7 SCR.
//! Not for: guests' UARTs (those are device models in `devices/serial.rs`).

use alloc::collections::VecDeque;

use heapless::Deque;

/// I/O base of COM1 (the log console).
pub const COM1: u16 = 0x3F8;
/// I/O base of COM2 (the serial control channel by default).
pub const COM2: u16 = 0x2F8;
/// The 16550's input clock divided by 16: divisor 1 gives this baud rate.
pub const BASE_BAUD: u32 = 115_200;
/// Bytes the 16550's transmit FIFO holds.
pub const TX_FIFO: usize = 16;
/// Bytes received but not yet taken that the software buffer holds.
pub const RX_BUFFER: usize = 4096;

const RBR_THR: u16 = 0;
const IER: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const SCR: u16 = 7;

/// LSR bit 0: a received byte is waiting.
const LSR_DATA_READY: u8 = 1 << 0;
/// LSR bit 1: a byte was lost because the receive FIFO was full.
const LSR_OVERRUN: u8 = 1 << 1;
/// LSR bits 2-4: parity error, framing error, break.
const LSR_LINE_ERRORS: u8 = 0b1_1100;
/// LSR bit 5: THR (and with FIFOs on, the whole transmit FIFO) is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;
/// LCR bit 7: the divisor latch replaces RBR/IER at +0/+1.
const LCR_DLAB: u8 = 1 << 7;
/// LCR: 8 data bits, no parity, 1 stop bit.
const LCR_8N1: u8 = 0b11;
/// FCR: FIFOs on, both cleared, receive trigger level 14. The trigger only sets when
/// an interrupt would be raised, but Bochs also delays LSR.DR until it (or a timeout),
/// and reads its socket only while DR is clear: a low trigger would let it deliver one
/// byte per drain.
const FCR_ENABLE_CLEAR_14: u8 = 0b1100_0111;
/// MCR: DTR and RTS on (the peer sees us ready), OUT2 off (no interrupts to the PIC).
const MCR_DTR_RTS: u8 = 0b11;

/// Why a port cannot be used as a UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartError {
    /// Nothing answers at the base: the scratch register does not keep a value.
    Absent {
        /// The I/O base.
        base: u16,
    },
    /// The requested baud rate is not 115200 / N for a 16-bit N.
    BadBaud {
        /// The rate asked for.
        baud: u32,
    },
}

impl core::fmt::Display for UartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Absent { base } => write!(f, "no UART at {base:#x}"),
            Self::BadBaud { baud } => {
                write!(f, "{baud} baud is not {BASE_BAUD} divided by a whole number from 1 to 65535")
            }
        }
    }
}

/// The divisor latch value for `baud` (115200 / baud), if it is a whole 16-bit number.
pub fn divisor(baud: u32) -> Result<u16, UartError> {
    if baud == 0 || !BASE_BAUD.is_multiple_of(baud) {
        return Err(UartError::BadBaud { baud });
    }
    u16::try_from(BASE_BAUD / baud).map_err(|_| UartError::BadBaud { baud })
}

/// Register access to one 16550 at an I/O base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uart {
    base: u16,
}

impl Uart {
    /// Use the UART at `base` as it is programmed now.
    ///
    /// # Safety
    /// `base` must be a 16550's I/O base or a port range nothing answers at (reads give
    /// 0xFF, writes vanish), and nothing else may drive that port while this value is
    /// in use: its eight ports are read and written without further checks.
    pub const unsafe fn attach(base: u16) -> Self {
        Self { base }
    }

    /// Check that a UART answers at `base`, then program it: 8N1 at `baud`, FIFOs on
    /// and cleared, interrupts off, DTR/RTS on, stale input discarded.
    ///
    /// # Safety
    /// As for [`Uart::attach`]; in addition the range must be free of any other device
    /// that writes to its scratch register (+7) could upset (true of the legacy COM
    /// ports on PCs).
    pub unsafe fn probe(base: u16, baud: u32) -> Result<Self, UartError> {
        let divisor = divisor(baud)?;
        // SAFETY: the caller vouches for the port range (this function's contract).
        let uart = unsafe { Self::attach(base) };
        // Scratch register test: an absent port reads 0xFF whatever was written; two
        // patterns so a bus that floats to one value cannot pass.
        for pattern in [0x55, 0xAA] {
            uart.write(SCR, pattern);
            if uart.read(SCR) != pattern {
                return Err(UartError::Absent { base });
            }
        }
        uart.write(IER, 0);
        uart.write(LCR, LCR_DLAB);
        let [low, high] = divisor.to_le_bytes();
        uart.write(RBR_THR, low);
        uart.write(IER, high);
        // Clearing DLAB here is also what starts Bochs' receive polling.
        uart.write(LCR, LCR_8N1);
        uart.write(IIR_FCR, FCR_ENABLE_CLEAR_14);
        uart.write(MCR, MCR_DTR_RTS);
        // Bytes from before we owned the line (a bounded loop: the FIFO holds 16).
        for _ in 0..64 {
            if uart.read(LSR) & LSR_DATA_READY == 0 {
                break;
            }
            uart.read(RBR_THR);
        }
        Ok(uart)
    }

    /// The I/O base.
    pub fn base(&self) -> u16 {
        self.base
    }

    fn read(&self, register: u16) -> u8 {
        // SAFETY: `attach`'s contract: the range base..base+8 is this UART's (or
        // nothing's), owned by this driver; reading a 16550 register has no effect on
        // memory (reading RBR/LSR consumes a byte or clears error bits, as intended).
        unsafe { x86::io::inb(self.base.wrapping_add(register)) }
    }

    fn write(&self, register: u16, value: u8) {
        // SAFETY: as in `read`: the port range is this UART's; writing a 16550
        // register only changes the UART's state.
        unsafe { x86::io::outb(self.base.wrapping_add(register), value) }
    }

    fn line_status(&self) -> u8 {
        self.read(LSR)
    }

    /// Send one byte, waiting for the transmitter first (the console's path: a log line
    /// must not lose bytes). An absent port reads LSR as 0xFF and never waits.
    pub fn send_blocking(&self, byte: u8) {
        while self.line_status() & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        self.write(RBR_THR, byte);
    }
}

/// What a [`BufferedUart`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UartCounters {
    /// Bytes read off the line.
    pub rx_bytes: u64,
    /// Bytes written to the line.
    pub tx_bytes: u64,
    /// Times the UART reported bytes lost to a full receive FIFO (LSR overrun): the
    /// hypervisor drained it too late.
    pub overruns: u64,
    /// Bytes read but thrown away because the software buffer was full.
    pub rx_dropped: u64,
    /// Parity, framing and break conditions reported with received bytes.
    pub line_errors: u64,
}

/// A UART with a bounded receive buffer and a non-blocking transmit path.
#[derive(Debug)]
pub struct BufferedUart {
    uart: Uart,
    rx: Deque<u8, RX_BUFFER>,
    /// What happened so far.
    pub counters: UartCounters,
}

impl BufferedUart {
    /// Buffer `uart` (programmed by [`Uart::probe`]).
    pub fn new(uart: Uart) -> Self {
        Self { uart, rx: Deque::new(), counters: UartCounters::default() }
    }

    /// The I/O base.
    pub fn base(&self) -> u16 {
        self.uart.base
    }

    /// Move every byte the receive FIFO holds into the software buffer; never waits.
    /// Returns how many bytes came in.
    pub fn poll_rx(&mut self) -> usize {
        let mut got = 0;
        // Bounded: a stuck DR bit (a device that is not quite a 16550) cannot hold the
        // CPU; 64 is four FIFOs' worth, more than can arrive during this loop.
        for _ in 0..64 {
            let status = self.uart.line_status();
            if status & LSR_OVERRUN != 0 {
                self.counters.overruns += 1;
            }
            if status & LSR_LINE_ERRORS != 0 {
                self.counters.line_errors += 1;
            }
            if status & LSR_DATA_READY == 0 {
                break;
            }
            let byte = self.uart.read(RBR_THR);
            got += 1;
            if self.rx.push_back(byte).is_err() {
                self.counters.rx_dropped += 1;
            }
        }
        self.counters.rx_bytes += got as u64;
        got
    }

    /// Take the bytes received so far, appending them to `out`.
    pub fn take_rx(&mut self, out: &mut alloc::vec::Vec<u8>) {
        out.extend(self.rx.iter().copied());
        self.rx.clear();
    }

    /// Bytes waiting in the software buffer.
    pub fn rx_buffered(&self) -> usize {
        self.rx.len()
    }

    /// Write from the front of `queue` while the transmitter has room: a whole FIFO's
    /// worth when it reports empty, nothing otherwise; never waits. Returns how many
    /// bytes left the queue.
    pub fn send_from(&mut self, queue: &mut VecDeque<u8>) -> usize {
        if queue.is_empty() || self.uart.line_status() & LSR_THR_EMPTY == 0 {
            return 0;
        }
        let n = queue.len().min(TX_FIFO);
        for byte in queue.drain(..n) {
            self.uart.write(RBR_THR, byte);
        }
        self.counters.tx_bytes += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_are_whole_fractions_of_115200() {
        assert_eq!(divisor(115_200), Ok(1));
        assert_eq!(divisor(57_600), Ok(2));
        assert_eq!(divisor(9_600), Ok(12));
        assert_eq!(divisor(300), Ok(384));
        assert_eq!(divisor(0), Err(UartError::BadBaud { baud: 0 }));
        assert_eq!(divisor(100_000), Err(UartError::BadBaud { baud: 100_000 }));
        assert_eq!(divisor(230_400), Err(UartError::BadBaud { baud: 230_400 }));
        assert_eq!(divisor(1), Err(UartError::BadBaud { baud: 1 }), "115200 does not fit 16 bits");
    }
}
