//! The guest's 16550A UART (COM1 at ports 0x3f8..0x400, GSI 4): the console an
//! unmodified Linux finds with its 8250 driver.
//!
//! It is the register set of the National Semiconductor PC16550D: RBR/THR, IER,
//! IIR/FCR, LCR with the divisor latch behind DLAB, MCR with loopback, LSR, MSR and
//! SCR, 16-byte receive and transmit FIFOs, the four receive trigger levels and the
//! character timeout. What it is not: a model of the serial line. The hypervisor has
//! no baud-rate timing, so a byte written to THR goes out at once as
//! [`Effect::Console`], and console input arrives through [`Uart::push_input`]. The
//! divisor and the line format are kept for the guest to read back and change nothing.
//! The one piece of time the guest can observe is the character timeout, which runs at
//! a fixed character time ([`CHAR_TIME_NS`]) through `next_event_ns`/`advance`.
//!
//! Port accesses wider than a byte are split into byte accesses at consecutive
//! offsets, lowest first, as the ISA bus does for an 8-bit device; offsets 8 and up
//! read as ones and ignore writes.

use heapless::Deque;

use super::{Device, DeviceCtx, DeviceError, DeviceKind, DeviceState, Effect, StateReader, StateWriter};

/// COM1's first port on a PC.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// Ports the UART answers.
pub const PORTS: u16 = 8;

/// Depth of each FIFO (PC16550D datasheet, 1.0 Features: 16-byte transmit and receive
/// FIFOs).
pub const FIFO_DEPTH: usize = 16;

/// One character time: 10 bits (start, 8 data, stop) at 115200 baud, rounded.
/// Fixed, whatever the divisor says, because nothing else here runs at line speed.
pub const CHAR_TIME_NS: u64 = 87_000;

/// The character timeout: "no characters have been removed from or input to the
/// RCVR FIFO during the last 4 character times" (PC16550D datasheet, 8.6.2 FIFO
/// Interrupt Mode Operation).
pub const TIMEOUT_NS: u64 = 4 * CHAR_TIME_NS;

/// Format version of the saved state.
const STATE_VERSION: u16 = 1;

// Register offsets (PC16550D datasheet, Table II: Summary of Registers). Offsets 0
// and 1 are the divisor latch (DLL, DLM) while LCR.DLAB is set.
const RBR_THR: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

// IER (Table II, IER bits 0-3; bits 4-7 are always 0 on the 16550).
const IER_ERBFI: u8 = 0x01;
const IER_ETBEI: u8 = 0x02;
const IER_ELSI: u8 = 0x04;
const IER_EDSSI: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

// IIR interrupt identification, bits 3:0 (Table IV: Interrupt Control Functions), by
// priority; bits 7:6 read 11 while FIFOs are enabled (Table II, IIR bits 6-7).
const IIR_NONE: u8 = 0x01;
const IIR_LINE_STATUS: u8 = 0x06;
const IIR_RX_DATA: u8 = 0x04;
const IIR_CHAR_TIMEOUT: u8 = 0x0c;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_MODEM_STATUS: u8 = 0x00;
const IIR_FIFOS_ON: u8 = 0xc0;

// FCR (Table II, FCR; 8.5 FIFO Control Register): bit 0 enables, bits 1 and 2 clear,
// bit 3 selects DMA mode 1 (kept, no effect), bits 7:6 the receive trigger level.
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_CLEAR_TX: u8 = 0x04;
const FCR_KEPT: u8 = 0xc9;

// LCR bit 7: divisor latch access (Table II, LCR).
const LCR_DLAB: u8 = 0x80;

// MCR (Table II, MCR bits 0-4; bits 5-7 are always 0).
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

// LSR (Table II, LSR). PE, FE and BI never happen without a line; OE does.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_ERRORS: u8 = 0x1e;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

// MSR (Table II, MSR): deltas in bits 3:0, the lines in bits 7:4.
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
const MSR_DELTAS: u8 = 0x0f;

/// The modem status lines (MSR bits 7:4) that MCR implies. Outside loopback the
/// hypervisor's console is always ready: CTS, DSR and DCD asserted, RI not. In
/// loopback the outputs are wired back to the inputs (PC16550D datasheet, 8.7 Modem
/// Control Register, bit 4): RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD.
fn modem_lines(mcr: u8) -> u8 {
    if mcr & MCR_LOOP == 0 {
        return MSR_CTS | MSR_DSR | MSR_DCD;
    }
    let mut lines = 0;
    for (out, input) in [(MCR_RTS, MSR_CTS), (MCR_DTR, MSR_DSR), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD)] {
        if mcr & out != 0 {
            lines |= input;
        }
    }
    lines
}

/// The delta bits a change of the lines from `old` to `new` sets (Table II, MSR bits
/// 0-3): DCTS, DDSR and DDCD on any change, TERI only when RI goes from on to off.
fn modem_deltas(old: u8, new: u8) -> u8 {
    let changed = old ^ new;
    let mut d = 0;
    if changed & MSR_CTS != 0 {
        d |= MSR_DCTS;
    }
    if changed & MSR_DSR != 0 {
        d |= MSR_DDSR;
    }
    if old & MSR_RI != 0 && new & MSR_RI == 0 {
        d |= MSR_TERI;
    }
    if changed & MSR_DCD != 0 {
        d |= MSR_DDCD;
    }
    d
}

/// A 16550A UART.
#[derive(Debug, Clone)]
pub struct Uart {
    /// The line it drives (configuration, not state).
    gsi: u32,
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// FCR as programmed (bits `FCR_KEPT`); FCR itself is write-only.
    fcr: u8,
    scr: u8,
    /// What RBR reads: the last byte taken from the receiver (it stays when empty).
    rbr: u8,
    /// DLM:DLL.
    divisor: u16,
    /// LSR error bits (OE) waiting for the guest to read LSR.
    lsr_errors: u8,
    /// MSR delta bits waiting for the guest to read MSR.
    msr_deltas: u8,
    /// The THR-empty interrupt is pending (cleared by an IIR read that reports it or
    /// by a THR write; raised when THR empties or ETBEI is turned on while empty).
    thr_pending: bool,
    /// The character timeout has fired and no byte was read since.
    timeout_pending: bool,
    /// When the character timeout fires (guest ns), while the RX FIFO holds bytes.
    timeout_at: Option<u64>,
    /// Received bytes, oldest first; at most 1 (the holding register) with FIFOs off.
    rx: Deque<u8, FIFO_DEPTH>,
    /// Bytes written to THR not yet handed out: only ever non-empty when the exit's
    /// effect queue was full, and then drained by the next access or `advance`.
    tx: Deque<u8, FIFO_DEPTH>,
    /// The level last driven on `gsi`.
    irq_high: bool,
}

impl Uart {
    /// A UART in its reset state (PC16550D datasheet, Table III: UART Reset
    /// Configuration) driving line `gsi`. The divisor latch is not reset by the chip;
    /// it starts at 12 (9600 baud), as PC firmware leaves it.
    pub fn new(gsi: u32) -> Self {
        Self {
            gsi,
            ier: 0,
            lcr: 0,
            mcr: 0,
            fcr: 0,
            scr: 0,
            rbr: 0,
            divisor: 12,
            lsr_errors: 0,
            msr_deltas: 0,
            thr_pending: false,
            timeout_pending: false,
            timeout_at: None,
            rx: Deque::new(),
            tx: Deque::new(),
            irq_high: false,
        }
    }

    /// Console input from the control channel: as many bytes of `bytes` as fit in the
    /// RX FIFO (or the holding register with FIFOs off), in order; returns how many.
    /// Bytes that did not fit are an overrun (LSR.OE), as when a character arrives at
    /// a full receiver; a caller that would rather keep them offers at most
    /// [`Uart::rx_space`] bytes. In loopback the receiver is cut off from the line
    /// (PC16550D datasheet, 8.7, MCR bit 4), so nothing is taken and there is no
    /// overrun.
    pub fn push_input(&mut self, bytes: &[u8], ctx: &mut DeviceCtx<'_>) -> usize {
        if self.mcr & MCR_LOOP != 0 {
            return 0;
        }
        let mut taken = 0;
        for &b in bytes {
            if !self.receive(b, ctx.now_ns) {
                break;
            }
            taken += 1;
        }
        self.update_irq(ctx);
        taken
    }

    /// How many more bytes the receiver can hold now (0 in loopback).
    pub fn rx_space(&self) -> usize {
        if self.mcr & MCR_LOOP != 0 { 0 } else { self.fifo_capacity().saturating_sub(self.rx.len()) }
    }

    fn fifos_on(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    /// Bytes each FIFO holds: 16, or 1 (the holding register) in character mode.
    fn fifo_capacity(&self) -> usize {
        if self.fifos_on() { FIFO_DEPTH } else { 1 }
    }

    /// The receive trigger level (Table II, FCR bits 6-7).
    fn trigger(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// A character arrives at the receiver; false (and OE) if there is no room: the
    /// byte is lost and what the FIFO holds is kept (PC16550D datasheet, Table II,
    /// LSR bit 1, FIFO mode; without FIFOs the chip would overwrite RBR, but the
    /// newer byte is dropped here too so `push_input` can say what it took).
    fn receive(&mut self, b: u8, now: u64) -> bool {
        if self.rx.len() >= self.fifo_capacity() || self.rx.push_back(b).is_err() {
            self.lsr_errors |= LSR_OE;
            return false;
        }
        // 8.6.2: while no timeout has happened, a received character restarts the
        // timer; one that has happened stays until the CPU reads a character.
        if self.fifos_on() && !self.timeout_pending {
            self.timeout_at = Some(now.saturating_add(TIMEOUT_NS));
        }
        true
    }

    fn clear_rx(&mut self) {
        self.rx.clear();
        self.timeout_pending = false;
        self.timeout_at = None;
    }

    fn clear_tx(&mut self) {
        if !self.tx.is_empty() {
            self.tx.clear();
            self.thr_pending = true;
        }
    }

    /// Hand queued transmit bytes to the exit handler while its queue has room; THR
    /// becoming empty raises the THR-empty interrupt.
    fn drain_tx(&mut self, ctx: &mut DeviceCtx<'_>) {
        if self.tx.is_empty() {
            return;
        }
        while !ctx.effects.is_full() {
            match self.tx.pop_front() {
                Some(b) => ctx.effect(Effect::Console(b)),
                None => break,
            }
        }
        if self.tx.is_empty() {
            self.thr_pending = true;
        }
    }

    /// The highest-priority pending interrupt, as IIR bits 3:0 (Table IV: line status
    /// > received data or character timeout > THR empty > modem status).
    fn interrupt_id(&self) -> u8 {
        let ier = self.ier;
        let rx_ready = !self.rx.is_empty() && (!self.fifos_on() || self.rx.len() >= self.trigger());
        if ier & IER_ELSI != 0 && self.lsr_errors != 0 {
            IIR_LINE_STATUS
        } else if ier & IER_ERBFI != 0 && self.fifos_on() && self.timeout_pending {
            IIR_CHAR_TIMEOUT
        } else if ier & IER_ERBFI != 0 && rx_ready {
            IIR_RX_DATA
        } else if ier & IER_ETBEI != 0 && self.thr_pending {
            IIR_THR_EMPTY
        } else if ier & IER_EDSSI != 0 && self.msr_deltas != 0 {
            IIR_MODEM_STATUS
        } else {
            IIR_NONE
        }
    }

    /// The level the line should have: an enabled interrupt pending and the OUT2 pin
    /// active. On a PC, OUT2 gates the UART's INTR onto the ISA IRQ line; in loopback
    /// the chip forces OUT2 inactive (8.7, MCR bit 4), so the line stays low then.
    fn irq_level(&self) -> bool {
        self.interrupt_id() != IIR_NONE && self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    fn update_irq(&mut self, ctx: &mut DeviceCtx<'_>) {
        let level = self.irq_level();
        if level != self.irq_high {
            self.irq_high = level;
            ctx.irq.set_level(self.gsi, level);
        }
    }

    fn lsr(&self) -> u8 {
        let mut v = self.lsr_errors;
        if !self.rx.is_empty() {
            v |= LSR_DR;
        }
        // No shift register is modelled: THR empty means the transmitter is too.
        if self.tx.is_empty() {
            v |= LSR_THRE | LSR_TEMT;
        }
        v
    }

    fn read_reg(&mut self, offset: u64, now: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR if dlab => self.divisor as u8,
            IER if dlab => (self.divisor >> 8) as u8,
            RBR_THR => {
                if let Some(b) = self.rx.pop_front() {
                    self.rbr = b;
                }
                // 8.6.2: a read clears the timeout interrupt and restarts the timer.
                self.timeout_pending = false;
                self.timeout_at = (self.fifos_on() && !self.rx.is_empty()).then(|| now.saturating_add(TIMEOUT_NS));
                self.rbr
            }
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                // Table IV: reading IIR resets the THR-empty interrupt it reports.
                if id == IIR_THR_EMPTY {
                    self.thr_pending = false;
                }
                if self.fifos_on() { id | IIR_FIFOS_ON } else { id }
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let v = self.lsr();
                // Table IV: reading LSR resets the line status interrupt.
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = modem_lines(self.mcr) | self.msr_deltas;
                // Table IV: reading MSR resets the modem status interrupt.
                self.msr_deltas = 0;
                v
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u8, ctx: &mut DeviceCtx<'_>) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            IER if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(v) << 8),
            RBR_THR => self.write_thr(v, ctx),
            IER => {
                let old = self.ier;
                self.ier = v & IER_MASK;
                // Turning ETBEI on while THR is empty raises the THR-empty interrupt
                // even if an IIR read had cleared it: not in the datasheet, but what
                // 16550s do and what Linux's THRE test (serial8250_do_startup) and
                // Windows expect; on the rising edge only, as QEMU and Bochs do.
                if (old ^ self.ier) & IER_ETBEI != 0 {
                    self.thr_pending = self.ier & IER_ETBEI != 0 && self.tx.is_empty();
                }
            }
            IIR_FCR => self.write_fcr(v),
            LCR => self.lcr = v,
            MCR => {
                let v = v & MCR_MASK;
                self.msr_deltas |= modem_deltas(modem_lines(self.mcr), modem_lines(v));
                self.mcr = v;
            }
            SCR => self.scr = v,
            // LSR and MSR are read-only here (the datasheet reserves writing LSR for
            // factory test); offsets past the chip are not decoded.
            _ => {}
        }
    }

    fn write_thr(&mut self, b: u8, ctx: &mut DeviceCtx<'_>) {
        // Table IV: writing THR resets the THR-empty interrupt.
        self.thr_pending = false;
        if self.mcr & MCR_LOOP != 0 {
            // 8.7, MCR bit 4: the transmitter output is looped to the receiver input.
            self.receive(b, ctx.now_ns);
            self.thr_pending = true;
            return;
        }
        let cap = self.fifo_capacity();
        // A full transmit FIFO drops the byte, as the chip does; it can only be
        // full here when the exit handler's effect queue is.
        if self.tx.len() < cap {
            let _ = self.tx.push_back(b);
        }
        self.drain_tx(ctx);
    }

    /// PC16550D datasheet, 8.5 FIFO Control Register.
    fn write_fcr(&mut self, v: u8) {
        let was_on = self.fifos_on();
        if v & FCR_ENABLE == 0 {
            // "Resetting FCR0 will clear all bytes in both FIFOs", and "FCR0 must be
            // a 1 when other FCR bits are written to or they will not be programmed".
            if was_on {
                self.clear_rx();
                self.clear_tx();
            }
            self.fcr = 0;
            return;
        }
        // Changing between FIFO and character mode empties both FIFOs.
        if !was_on {
            self.clear_rx();
            self.clear_tx();
        }
        if v & FCR_CLEAR_RX != 0 {
            self.clear_rx();
        }
        if v & FCR_CLEAR_TX != 0 {
            self.clear_tx();
        }
        self.fcr = v & FCR_KEPT;
    }
}

impl Device for Uart {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Uart
    }

    fn console_input(&mut self, bytes: &[u8], ctx: &mut DeviceCtx<'_>) -> Option<usize> {
        let fit = bytes.get(..self.rx_space().min(bytes.len())).unwrap_or_default();
        Some(self.push_input(fit, ctx))
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        self.drain_tx(ctx);
        for (i, d) in data.iter_mut().enumerate() {
            *d = match offset.checked_add(i as u64) {
                Some(off) => self.read_reg(off, ctx.now_ns),
                None => 0xff,
            };
        }
        self.update_irq(ctx);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        self.drain_tx(ctx);
        for (i, &v) in data.iter().enumerate() {
            if let Some(off) = offset.checked_add(i as u64) {
                self.write_reg(off, v, ctx);
            }
        }
        self.update_irq(ctx);
    }

    fn next_event_ns(&self) -> Option<u64> {
        // Bytes held back by a full effect queue are due at once.
        let tx = (!self.tx.is_empty()).then_some(0);
        [self.timeout_at, tx].into_iter().flatten().min()
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.drain_tx(ctx);
        if self.timeout_at.is_some_and(|t| t <= ctx.now_ns) {
            self.timeout_at = None;
            if self.fifos_on() && !self.rx.is_empty() {
                self.timeout_pending = true;
            }
        }
        self.update_irq(ctx);
    }

    /// Version 1, little-endian:
    ///
    /// ```text
    /// offset  size  field
    ///  0      1     IER (bits 3:0)
    ///  1      1     LCR
    ///  2      1     MCR (bits 4:0)
    ///  3      1     FCR as programmed (bits 0, 3, 7:6)
    ///  4      1     SCR
    ///  5      1     RBR (the last byte read from the receiver)
    ///  6      2     divisor latch (DLM << 8 | DLL)
    ///  8      1     LSR error bits not yet read (bits 4:1)
    ///  9      1     MSR as it would read (lines in 7:4, which must match MCR; deltas in 3:0)
    /// 10      1     flags: bit 0 THR-empty interrupt pending, bit 1 character timeout
    ///               pending, bit 2 the line is driven high
    /// 11      1     n = bytes in the RX FIFO (<= 16; <= 1 with FIFOs off)
    /// 12      n     the RX bytes, oldest first
    /// 12+n    1     m = bytes in the TX FIFO (<= 16; <= 1 with FIFOs off)
    /// 13+n    m     the TX bytes, oldest first
    /// 13+n+m  1     1 if a character timeout deadline is set, else 0
    /// 14+n+m  8     the deadline in guest ns (0 when none)
    /// ```
    fn save(&self) -> DeviceState {
        let mut w = StateWriter::new();
        w.u8(self.ier).u8(self.lcr).u8(self.mcr).u8(self.fcr).u8(self.scr).u8(self.rbr);
        w.u16(self.divisor).u8(self.lsr_errors).u8(modem_lines(self.mcr) | self.msr_deltas);
        w.u8(u8::from(self.thr_pending) | (u8::from(self.timeout_pending) << 1) | (u8::from(self.irq_high) << 2));
        for fifo in [&self.rx, &self.tx] {
            w.u8(fifo.len() as u8);
            for &b in fifo.iter() {
                w.u8(b);
            }
        }
        w.u8(u8::from(self.timeout_at.is_some())).u64(self.timeout_at.unwrap_or(0));
        w.finish(DeviceKind::Uart, STATE_VERSION)
    }

    fn load(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let bad = |why| DeviceError::Malformed { kind: DeviceKind::Uart, why };
        let mut r = StateReader::new(state, DeviceKind::Uart, STATE_VERSION)?;
        let mut u = Uart::new(self.gsi);
        u.ier = r.u8()?;
        u.lcr = r.u8()?;
        u.mcr = r.u8()?;
        u.fcr = r.u8()?;
        u.scr = r.u8()?;
        u.rbr = r.u8()?;
        u.divisor = r.u16()?;
        u.lsr_errors = r.u8()?;
        let msr = r.u8()?;
        let flags = r.u8()?;
        if u.ier & !IER_MASK != 0 || u.mcr & !MCR_MASK != 0 || u.fcr & !FCR_KEPT != 0 {
            return Err(bad("reserved IER, MCR or FCR bits are set"));
        }
        if u.fcr & FCR_ENABLE == 0 && u.fcr != 0 {
            return Err(bad("FCR has settings with the FIFOs off"));
        }
        if u.lsr_errors & !LSR_ERRORS != 0 {
            return Err(bad("LSR error bits outside 4:1"));
        }
        if msr & !MSR_DELTAS != modem_lines(u.mcr) {
            return Err(bad("the MSR lines disagree with MCR"));
        }
        u.msr_deltas = msr & MSR_DELTAS;
        if flags & !0x07 != 0 {
            return Err(bad("unknown flag bits"));
        }
        u.thr_pending = flags & 1 != 0;
        u.timeout_pending = flags & 2 != 0;
        u.irq_high = flags & 4 != 0;
        let cap = u.fifo_capacity();
        for fifo in [&mut u.rx, &mut u.tx] {
            let n = usize::from(r.u8()?);
            if n > cap {
                return Err(bad("a FIFO holds more bytes than it can"));
            }
            for &b in r.bytes(n)? {
                fifo.push_back(b).map_err(|_| bad("a FIFO holds more bytes than it can"))?;
            }
        }
        let has_deadline = r.u8()?;
        let deadline = r.u64()?;
        u.timeout_at = match has_deadline {
            0 if deadline == 0 => None,
            0 => return Err(bad("a deadline value without its flag")),
            1 => Some(deadline),
            _ => return Err(bad("the deadline flag is neither 0 nor 1")),
        };
        r.finish()?;
        *self = u;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    /// Records every level driven, per line.
    #[derive(Debug, Default)]
    struct Lines {
        changes: Vec<(u32, bool)>,
    }

    impl Lines {
        fn level(&self, gsi: u32) -> bool {
            self.changes.iter().rev().find(|c| c.0 == gsi).is_some_and(|c| c.1)
        }
    }

    impl crate::devices::IrqLines for Lines {
        fn set_level(&mut self, gsi: u32, high: bool) {
            self.changes.push((gsi, high));
        }
    }

    /// A UART, its lines and the guest clock, with port-style helpers.
    struct Rig {
        uart: Uart,
        lines: Lines,
        now: u64,
        console: Vec<u8>,
        exits: Vec<u32>,
    }

    impl Rig {
        fn new() -> Self {
            Self { uart: Uart::new(COM1_GSI), lines: Lines::default(), now: 0, console: Vec::new(), exits: Vec::new() }
        }

        fn collect(&mut self, effects: &[Effect]) {
            for e in effects {
                match *e {
                    Effect::Console(b) => self.console.push(b),
                    Effect::Exit(v) => self.exits.push(v),
                    _ => {}
                }
            }
        }

        fn inb(&mut self, off: u64) -> u8 {
            let mut d = [0u8];
            let mut ctx = DeviceCtx::new(self.now, &mut self.lines);
            self.uart.read(off, &mut d, &mut ctx);
            let fx = ctx.effects.clone();
            self.collect(&fx);
            d[0]
        }

        fn outb(&mut self, off: u64, v: u8) {
            let mut ctx = DeviceCtx::new(self.now, &mut self.lines);
            self.uart.write(off, &[v], &mut ctx);
            let fx = ctx.effects.clone();
            self.collect(&fx);
        }

        fn input(&mut self, bytes: &[u8]) -> usize {
            let mut ctx = DeviceCtx::new(self.now, &mut self.lines);
            self.uart.push_input(bytes, &mut ctx)
        }

        /// Move the clock to `t` and let the UART catch up if it asked to.
        fn run_to(&mut self, t: u64) {
            self.now = t;
            if self.uart.next_event_ns().is_some_and(|e| e <= t) {
                let mut ctx = DeviceCtx::new(self.now, &mut self.lines);
                self.uart.advance(&mut ctx);
                let fx = ctx.effects.clone();
                self.collect(&fx);
            }
        }

        fn line(&self) -> bool {
            self.lines.level(COM1_GSI)
        }
    }

    // Linux include/uapi/linux/serial_reg.h names.
    const UART_LCR_CONF_MODE_A: u8 = 0x80;
    const UART_LCR_CONF_MODE_B: u8 = 0xbf;
    const UART_IER_ALL_INTR: u8 = 0x0f;
    const UART_IER_UUE: u8 = 0x40;
    const UART_FCR7_64BYTE: u8 = 0x20;

    /// Linux drivers/tty/serial/8250/8250_port.c `autoconfig` and
    /// `autoconfig_16550a` (with a full probe), access by access.
    #[test]
    fn linux_autoconfig_probe_finds_a_16550a() {
        let mut r = Rig::new();
        // IER test: save, write 0 and read 0, write 0x0f and read 0x0f, restore.
        let scratch = r.inb(IER);
        r.outb(IER, 0);
        let scratch2 = r.inb(IER) & UART_IER_ALL_INTR;
        r.outb(IER, UART_IER_ALL_INTR);
        let scratch3 = r.inb(IER) & UART_IER_ALL_INTR;
        r.outb(IER, scratch);
        assert_eq!((scratch2, scratch3), (0, 0x0f), "IER test");

        // Loopback test: MCR = LOOP | 0x0A (OUT2 | RTS): MSR status bits read DCD | CTS.
        let save_mcr = r.inb(MCR);
        let save_lcr = r.inb(LCR);
        r.outb(MCR, 0x10 | 0x0a);
        let status1 = r.inb(MSR) & 0xf0;
        r.outb(MCR, save_mcr);
        assert_eq!(status1, 0x90, "LOOP test");

        // EFR (at the FCR location) zeroed under LCR 0xBF, then FIFOs on: IIR 7:6.
        r.outb(LCR, UART_LCR_CONF_MODE_B);
        r.outb(IIR_FCR, 0);
        r.outb(LCR, 0);
        r.outb(IIR_FCR, FCR_ENABLE);
        let scratch = r.inb(IIR_FCR);
        assert_eq!(scratch >> 6, 3, "IIR says 16550A");

        // autoconfig_16550a: no EFR under LCR 0x80 or 0xBF: the location reads as the
        // ordinary IIR, which is never 0 here.
        r.outb(LCR, UART_LCR_CONF_MODE_A);
        assert_eq!(r.inb(IIR_FCR), 0xc1, "EFRv1 location shows IIR");
        r.outb(LCR, UART_LCR_CONF_MODE_B);
        assert_ne!(r.inb(IIR_FCR), 0, "no EFRv2");
        // National SuperIO: EXCR1 under LCR 0xE0 must not follow MCR.LOOP.
        r.outb(LCR, 0);
        let status1 = r.inb(MCR);
        r.outb(LCR, 0xe0);
        let status2 = r.inb(IIR_FCR);
        assert_eq!((status1 ^ status2) & 0x10, 0);
        r.outb(LCR, 0);
        r.outb(MCR, status1 ^ 0x10);
        r.outb(LCR, 0xe0);
        let status2 = r.inb(IIR_FCR);
        r.outb(LCR, 0);
        r.outb(MCR, status1);
        assert_eq!((status1 ^ status2) & 0x10, 0, "not a SuperIO");
        // TI16750: bit 5 of IIR never sets, with or without DLAB.
        r.outb(IIR_FCR, FCR_ENABLE | UART_FCR7_64BYTE);
        let status1 = r.inb(IIR_FCR) & 0xe0;
        r.outb(IIR_FCR, 0);
        r.outb(LCR, UART_LCR_CONF_MODE_A);
        r.outb(IIR_FCR, FCR_ENABLE | UART_FCR7_64BYTE);
        let status2 = r.inb(IIR_FCR) & 0xe0;
        r.outb(IIR_FCR, 0);
        r.outb(LCR, 0);
        assert_eq!((status1, status2), (0xc0, 0xc0), "not a 16750");
        // XScale: IER bit 6 (UUE) does not stick.
        let iersave = r.inb(IER);
        r.outb(IER, iersave & !UART_IER_UUE);
        assert_eq!(r.inb(IER) & UART_IER_UUE, 0);
        r.outb(IER, iersave | UART_IER_UUE);
        assert_eq!(r.inb(IER) & UART_IER_UUE, 0, "not an XScale");
        r.outb(IER, iersave);

        // autoconfig_8250's scratch test (run for older parts; must pass on ours).
        let s1 = r.inb(SCR);
        r.outb(SCR, 0xa5);
        assert_eq!(r.inb(SCR), 0xa5);
        r.outb(SCR, 0x5a);
        assert_eq!(r.inb(SCR), 0x5a);
        r.outb(SCR, s1);

        // Reset: restore MCR and LCR, clear the FIFOs, read RX, clear IER.
        r.outb(LCR, save_lcr);
        r.outb(MCR, save_mcr);
        r.outb(IIR_FCR, FCR_ENABLE);
        r.outb(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
        r.outb(IIR_FCR, 0);
        r.inb(RBR_THR);
        r.outb(IER, 0);
        assert!(r.console.is_empty(), "the probe sends nothing");
        assert!(r.lines.changes.is_empty(), "the probe raises no interrupt");
    }

    /// `serial8250_do_startup` then `set_termios` and a write, as Linux drives COM1.
    #[test]
    fn linux_startup_sequence_drives_the_line_with_out2() {
        let mut r = Rig::new();
        // serial8250_clear_fifos.
        r.outb(IIR_FCR, FCR_ENABLE);
        r.outb(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
        r.outb(IIR_FCR, 0);
        // Clear the interrupt registers; the LSR safety check.
        r.inb(LSR);
        r.inb(RBR_THR);
        r.inb(IIR_FCR);
        r.inb(MSR);
        assert_ne!(r.inb(LSR), 0xff);
        r.outb(LCR, 0x03); // UART_LCR_WLEN8
        r.outb(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        // The THRE test: IER = THRI, LSR has TEMT, IIR reports an interrupt (no TXEN bug).
        r.outb(IER, IER_ETBEI);
        assert!(r.line(), "THRE pending, OUT2 set: line high");
        let lsr = r.inb(LSR);
        let iir = r.inb(IIR_FCR);
        r.outb(IER, 0);
        assert_ne!(lsr & LSR_TEMT, 0);
        assert_eq!(iir & 0x0f, IIR_THR_EMPTY);
        assert!(!r.line(), "IIR read cleared THRE");
        // THRE test for UART_BUG_THRE: the interrupt is reasserted when THRI is re-enabled.
        r.outb(IER, IER_ETBEI);
        let iir1 = r.inb(IIR_FCR);
        r.outb(IER, 0);
        r.outb(IER, IER_ETBEI);
        let iir2 = r.inb(IIR_FCR);
        r.outb(IER, 0);
        assert_eq!((iir1 & 1, iir2 & 1), (0, 0), "no THRE bug");
        r.inb(LSR);
        r.inb(RBR_THR);
        r.inb(IIR_FCR);
        r.inb(MSR);
        // set_termios: divisor 1, 8N1, FIFOs with trigger 8.
        r.outb(LCR, 0x83);
        r.outb(RBR_THR, 1);
        r.outb(IER, 0);
        r.outb(LCR, 0x03);
        r.outb(IIR_FCR, 0x81);
        // IER RLSI | RDI, then start_tx adds THRI.
        r.outb(IER, IER_ELSI | IER_ERBFI);
        assert!(!r.line());
        r.outb(IER, IER_ELSI | IER_ERBFI | IER_ETBEI);
        assert!(r.line(), "THRI with THR empty: line high");
        assert_eq!(r.inb(IIR_FCR), 0xc2);
        for &b in b"ok\n" {
            r.outb(RBR_THR, b);
        }
        assert_eq!(r.console, b"ok\n");
        assert!(r.line(), "THR empty again after the writes");
        // OUT2 gates the line.
        r.outb(MCR, MCR_DTR | MCR_RTS);
        assert!(!r.line(), "OUT2 clear: line low");
        r.outb(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert!(r.line());
        // __stop_tx.
        r.outb(IER, IER_ELSI | IER_ERBFI);
        assert!(!r.line());
        assert!(r.lines.changes.windows(2).all(|w| w[0].1 != w[1].1), "only changes are driven");
        assert!(r.lines.changes.iter().all(|c| c.0 == COM1_GSI));
    }

    #[test]
    fn transmit_goes_to_the_console_at_once() {
        let mut r = Rig::new();
        assert_eq!(r.inb(LSR), LSR_THRE | LSR_TEMT, "reset LSR 0x60");
        assert_eq!(r.inb(IIR_FCR), IIR_NONE, "reset IIR 0x01");
        r.outb(RBR_THR, b'h');
        assert_eq!(r.inb(LSR), 0x60);
        r.outb(IIR_FCR, FCR_ENABLE);
        for &b in b"ello" {
            r.outb(RBR_THR, b);
            assert_eq!(r.inb(LSR) & 0x60, 0x60, "empty right away");
        }
        assert_eq!(r.console, b"hello");
        // A two-byte write at offset 0 is THR then IER.
        let mut ctx = DeviceCtx::new(0, &mut r.lines);
        r.uart.write(RBR_THR, &[b'!', IER_ETBEI], &mut ctx);
        assert_eq!(ctx.effects.as_slice(), [Effect::Console(b'!')]);
        assert_eq!(r.uart.ier, IER_ETBEI);
    }

    #[test]
    fn a_full_effect_queue_holds_bytes_in_the_tx_fifo_until_advance() {
        let mut r = Rig::new();
        r.outb(IIR_FCR, FCR_ENABLE);
        let mut ctx = DeviceCtx::new(0, &mut r.lines);
        while !ctx.effects.is_full() {
            ctx.effect(Effect::Reset);
        }
        r.uart.write(RBR_THR, b"a", &mut ctx);
        r.uart.write(RBR_THR, b"b", &mut ctx);
        let mut lsr = [0u8];
        r.uart.read(LSR, &mut lsr, &mut ctx);
        assert_eq!(ctx.dropped_effects, 0, "nothing dropped");
        assert_eq!(lsr[0] & (LSR_THRE | LSR_TEMT), 0, "THR not empty while held");
        assert_eq!(r.uart.next_event_ns(), Some(0), "due at once");
        r.run_to(5);
        assert_eq!(r.console, b"ab");
        assert_eq!(r.uart.next_event_ns(), None);
        assert_eq!(r.inb(LSR) & 0x60, 0x60);
    }

    #[test]
    fn loopback_sends_tx_to_rx_and_maps_the_modem_lines() {
        let mut r = Rig::new();
        assert_eq!(r.inb(MSR), 0xb0, "CTS, DSR, DCD outside loopback");
        r.outb(MCR, MCR_LOOP);
        assert_eq!(r.inb(MSR), MSR_DDCD | MSR_DDSR | MSR_DCTS, "all three lines dropped");
        r.outb(MCR, MCR_LOOP | MCR_RTS);
        assert_eq!(r.inb(MSR), MSR_CTS | MSR_DCTS);
        r.outb(MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(r.inb(MSR), MSR_DSR | MSR_DCTS | MSR_DDSR);
        r.outb(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(r.inb(MSR), MSR_RI | MSR_DDSR, "RI rising sets no TERI");
        r.outb(MCR, MCR_LOOP | MCR_OUT2);
        assert_eq!(r.inb(MSR), MSR_DCD | MSR_TERI | MSR_DDCD, "RI falling: TERI");
        // Modem status interrupt from a looped line change, gated off the ISA line.
        r.outb(IER, IER_EDSSI);
        r.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        assert_eq!(r.inb(IIR_FCR), IIR_MODEM_STATUS);
        assert!(!r.line(), "loopback forces OUT2 inactive");
        r.inb(MSR);
        assert_eq!(r.inb(IIR_FCR), IIR_NONE, "MSR read clears it");
        r.outb(IER, 0);
        // Data loops back, the console sees nothing, console input is not taken.
        r.outb(RBR_THR, 0x42);
        assert!(r.console.is_empty());
        assert_eq!(r.inb(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(r.input(b"x"), 0, "the receiver is off the line");
        assert_eq!(r.uart.rx_space(), 0);
        assert_eq!(r.inb(RBR_THR), 0x42);
        r.outb(RBR_THR, 1);
        r.outb(RBR_THR, 2);
        assert_eq!(r.inb(LSR) & LSR_OE, LSR_OE, "holding register overrun");
        // Leaving loopback: the console gets bytes again.
        r.outb(MCR, MCR_OUT2);
        r.outb(RBR_THR, b'z');
        assert_eq!(r.console, b"z");
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let mut r = Rig::new();
        r.outb(IER, IER_ERBFI);
        r.outb(LCR, LCR_DLAB | 0x03);
        assert_eq!((r.inb(RBR_THR), r.inb(IER)), (12, 0), "9600 baud from reset");
        r.outb(RBR_THR, 0x01);
        r.outb(IER, 0x80);
        assert_eq!((r.inb(RBR_THR), r.inb(IER)), (0x01, 0x80));
        assert!(r.console.is_empty(), "DLL write is not THR");
        assert_eq!(r.inb(LCR), 0x83);
        r.outb(LCR, 0x03);
        assert_eq!(r.inb(IER), IER_ERBFI, "IER untouched");
        r.outb(RBR_THR, b'x');
        assert_eq!(r.console, b"x");
        assert_eq!(r.uart.divisor, 0x8001);
        let mut ctx = DeviceCtx::new(0, &mut r.lines);
        let mut d = [0u8; 2];
        r.uart.write(LCR, &[LCR_DLAB], &mut ctx);
        r.uart.read(RBR_THR, &mut d, &mut ctx);
        assert_eq!(u16::from_le_bytes(d), 0x8001, "a 16-bit read of DLL:DLM");
    }

    #[test]
    fn rx_fifo_trigger_levels() {
        for (fcr, level) in [(0x01u8, 1usize), (0x41, 4), (0x81, 8), (0xc1, 14)] {
            let mut r = Rig::new();
            r.outb(MCR, MCR_OUT2);
            r.outb(IIR_FCR, fcr);
            r.outb(IER, IER_ERBFI);
            let data: Vec<u8> = (0..level as u8).collect();
            let (below, last) = data.split_at(level - 1);
            assert_eq!(r.input(below), below.len());
            assert_eq!(r.inb(IIR_FCR), 0xc1, "below trigger {level}: nothing yet");
            assert!(!r.line());
            assert_eq!(r.input(last), 1);
            assert_eq!(r.inb(IIR_FCR), 0xc4, "at trigger {level}: RX data available");
            assert!(r.line());
            assert_eq!(r.inb(RBR_THR), 0);
            assert_eq!(r.inb(IIR_FCR), 0xc1, "below the trigger again");
            assert!(!r.line());
            for want in 1..level as u8 {
                assert_eq!(r.inb(RBR_THR), want);
            }
            assert_eq!(r.inb(LSR) & LSR_DR, 0);
        }
        // Without FIFOs one byte is enough, and the holding register holds one.
        let mut r = Rig::new();
        r.outb(IER, IER_ERBFI);
        assert_eq!(r.input(b"ab"), 1);
        assert_eq!(r.inb(IIR_FCR), IIR_RX_DATA);
    }

    #[test]
    fn character_timeout_delivers_bytes_below_the_trigger() {
        let mut r = Rig::new();
        r.outb(MCR, MCR_OUT2);
        r.outb(IIR_FCR, 0xc1); // trigger 14
        r.outb(IER, IER_ERBFI);
        r.now = 1_000;
        assert_eq!(r.input(b"abc"), 3);
        assert_eq!(r.uart.next_event_ns(), Some(1_000 + TIMEOUT_NS));
        r.run_to(1_000 + TIMEOUT_NS - 1);
        assert!(!r.line(), "not yet 4 character times");
        // A new byte restarts the timer.
        assert_eq!(r.input(b"d"), 1);
        r.run_to(1_000 + TIMEOUT_NS);
        assert!(!r.line());
        r.run_to(1_000 + TIMEOUT_NS - 1 + TIMEOUT_NS);
        assert!(r.line(), "timeout interrupt");
        assert_eq!(r.inb(IIR_FCR), 0xcc);
        assert_eq!(r.uart.next_event_ns(), None);
        // A read clears it and restarts the timer while bytes remain.
        assert_eq!(r.inb(RBR_THR), b'a');
        assert!(!r.line());
        let t = r.now;
        assert_eq!(r.uart.next_event_ns(), Some(t + TIMEOUT_NS));
        r.run_to(t + TIMEOUT_NS);
        assert!(r.line(), "times out again");
        let mut got = Vec::new();
        while r.inb(LSR) & LSR_DR != 0 {
            got.push(r.inb(RBR_THR));
        }
        assert_eq!(got, b"bcd");
        assert!(!r.line());
        assert_eq!(r.uart.next_event_ns(), None, "empty: no timer");
        // Without ERBFI the timeout is not an interrupt; with FIFOs off there is none.
        let mut r = Rig::new();
        r.outb(MCR, MCR_OUT2);
        r.outb(IER, IER_ERBFI);
        r.inb(RBR_THR);
        r.input(b"q");
        assert_eq!(r.uart.next_event_ns(), None, "no timeout in character mode");
    }

    #[test]
    fn overrun_sets_oe_and_the_line_status_interrupt() {
        let mut r = Rig::new();
        r.outb(MCR, MCR_OUT2);
        r.outb(IIR_FCR, FCR_ENABLE);
        r.outb(IER, IER_ELSI);
        let data = [7u8; 20];
        assert_eq!(r.uart.rx_space(), 16);
        assert_eq!(r.input(&data), 16);
        assert_eq!(r.uart.rx_space(), 0);
        assert!(r.line());
        assert_eq!(r.inb(IIR_FCR), 0xc6);
        assert_eq!(r.inb(LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
        assert_eq!(r.inb(LSR), LSR_DR | LSR_THRE | LSR_TEMT, "OE clears on read");
        assert!(!r.line());
        // Exactly full is not an overrun.
        r.inb(RBR_THR);
        assert_eq!(r.input(&[1]), 1);
        assert_eq!(r.inb(LSR) & LSR_OE, 0);
    }

    #[test]
    fn iir_reports_the_highest_priority_first() {
        let mut r = Rig::new();
        r.outb(IIR_FCR, FCR_ENABLE);
        r.outb(IER, IER_MASK);
        r.outb(MCR, MCR_OUT2 | MCR_RTS); // no MSR change outside loopback
        r.outb(MCR, MCR_LOOP);
        r.outb(MCR, 0); // deltas pending
        r.input(&[0u8; 17]); // RX data and an overrun
        r.outb(MCR, MCR_OUT2);
        assert!(r.line());
        assert_eq!(r.inb(IIR_FCR), 0xc6, "line status");
        r.inb(LSR);
        assert_eq!(r.inb(IIR_FCR), 0xc4, "RX data");
        while r.inb(LSR) & LSR_DR != 0 {
            r.inb(RBR_THR);
        }
        assert_eq!(r.inb(IIR_FCR), 0xc2, "THR empty (pending since ETBEI went on)");
        assert_eq!(r.inb(IIR_FCR), 0xc0, "modem status: the IIR read cleared THRE");
        r.inb(MSR);
        assert_eq!(r.inb(IIR_FCR), 0xc1);
        assert!(!r.line());
        // A timeout outranks THR empty.
        r.input(b"x");
        r.outb(RBR_THR, b'y');
        r.run_to(TIMEOUT_NS);
        assert_eq!(r.inb(IIR_FCR), 0xcc);
        r.inb(RBR_THR);
        assert_eq!(r.inb(IIR_FCR), 0xc2);
    }

    #[test]
    fn fcr_clears_and_mode_changes_empty_the_fifos() {
        let mut r = Rig::new();
        r.outb(IIR_FCR, FCR_ENABLE);
        r.input(b"abc");
        r.outb(IIR_FCR, FCR_ENABLE | FCR_CLEAR_TX);
        assert_eq!(r.inb(LSR) & LSR_DR, LSR_DR, "TX clear leaves RX");
        r.outb(IIR_FCR, 0xc1 | FCR_CLEAR_RX);
        assert_eq!(r.inb(LSR) & LSR_DR, 0, "RX clear");
        assert_eq!(r.uart.next_event_ns(), None, "and its timer");
        assert_eq!(r.uart.trigger(), 14);
        r.input(b"abc");
        r.outb(IIR_FCR, 0);
        assert_eq!(r.inb(LSR) & LSR_DR, 0, "FIFOs off empties them");
        assert_eq!(r.inb(IIR_FCR) & 0xc0, 0, "IIR 7:6 = 00 without FIFOs");
        r.outb(IIR_FCR, 0xc0);
        assert_eq!(r.uart.fcr, 0, "FCR0 = 0: other bits not programmed");
        r.input(b"z");
        r.outb(IIR_FCR, FCR_ENABLE);
        assert_eq!(r.inb(LSR) & LSR_DR, 0, "turning FIFOs on empties them");
    }

    #[test]
    fn accesses_past_the_chip_read_ones() {
        let mut r = Rig::new();
        assert_eq!(r.inb(8), 0xff);
        r.outb(9, 0x55);
        let mut ctx = DeviceCtx::new(0, &mut r.lines);
        let mut d = [0u8; 4];
        r.uart.read(6, &mut d, &mut ctx);
        assert_eq!(d, [0xb0, 0, 0xff, 0xff], "MSR, SCR, then nothing");
        r.uart.read(u64::MAX, &mut d, &mut ctx);
        assert_eq!(d, [0xff; 4]);
    }

    /// A busy UART: FIFOs with bytes, a pending timeout deadline, odd registers.
    fn busy() -> Rig {
        let mut r = Rig::new();
        r.outb(LCR, LCR_DLAB);
        r.outb(RBR_THR, 0x34);
        r.outb(IER, 0x12);
        r.outb(LCR, 0x1b);
        r.outb(IIR_FCR, 0x89);
        r.outb(IER, IER_MASK);
        r.outb(MCR, MCR_OUT2 | MCR_DTR);
        r.outb(SCR, 0x77);
        r.now = 5_000;
        r.input(b"hello world");
        r.inb(RBR_THR);
        r
    }

    #[test]
    fn save_then_load_behaves_identically() {
        let mut a = busy();
        let saved = a.uart.save();
        assert_eq!(saved.kind, DeviceKind::Uart);
        assert_eq!(saved.version, 1);
        let mut b = Rig::new();
        b.now = a.now;
        b.uart.load(&saved).unwrap();
        assert_eq!(b.uart.save(), saved, "identical saved bytes");
        assert_eq!(b.uart.next_event_ns(), a.uart.next_event_ns());
        b.lines.changes.clone_from(&a.lines.changes);
        let script: &[(bool, u64, u8)] =
            &[(false, IIR_FCR, 0), (false, LSR, 0), (false, MSR, 0), (true, RBR_THR, b'!'), (false, RBR_THR, 0)];
        for rig in [&mut a, &mut b] {
            for &(write, off, v) in script {
                if write {
                    rig.outb(off, v);
                } else {
                    let got = rig.inb(off);
                    rig.console.push(got);
                }
            }
            rig.run_to(rig.now + TIMEOUT_NS);
            let iir = rig.inb(IIR_FCR);
            rig.console.push(iir);
            rig.input(b"0123456789");
            while rig.inb(LSR) & LSR_DR != 0 {
                let got = rig.inb(RBR_THR);
                rig.console.push(got);
            }
        }
        assert_eq!(a.console, b.console);
        assert_eq!(a.lines.changes, b.lines.changes);
        assert_eq!(a.uart.save(), b.uart.save());
    }

    #[test]
    fn a_bad_state_is_refused_and_changes_nothing() {
        let good = busy().uart.save();
        let mut r = Rig::new();
        r.outb(SCR, 0x99);
        let before = r.uart.save();
        let mut short = good.clone();
        short.bytes.pop();
        let mut long = good.clone();
        long.bytes.push(0);
        let wrong_version = DeviceState { version: 2, ..good.clone() };
        let wrong_kind = DeviceState { kind: DeviceKind::DebugExit, ..good.clone() };
        let mut too_many = good.clone();
        too_many.bytes[11] = 17; // RX count
        let mut lines = good.clone();
        lines.bytes[9] ^= MSR_CTS;
        let mut reserved = good.clone();
        reserved.bytes[0] |= 0x10; // IER bit 4
        let cases = [
            (short, "too short"),
            (long, "too long"),
            (too_many, "a FIFO holds more bytes than it can"),
            (lines, "the MSR lines disagree with MCR"),
            (reserved, "reserved IER, MCR or FCR bits are set"),
        ];
        for (state, why) in cases {
            assert_eq!(r.uart.load(&state), Err(DeviceError::Malformed { kind: DeviceKind::Uart, why }));
            assert_eq!(r.uart.save(), before, "{why}: unchanged");
        }
        assert!(matches!(r.uart.load(&wrong_version), Err(DeviceError::UnsupportedVersion { found: 2, .. })));
        assert!(matches!(r.uart.load(&wrong_kind), Err(DeviceError::WrongKind { .. })));
        assert_eq!(r.uart.save(), before);
        for n in 0..good.bytes.len() {
            let cut = DeviceState { bytes: good.bytes[..n].to_vec(), ..good.clone() };
            assert!(r.uart.load(&cut).is_err(), "{n} bytes");
        }
        assert_eq!(r.uart.save(), before);
        assert_eq!(r.uart.load(&good), Ok(()));
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// One step of the random walk.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        Read(u64, usize),
        Write(u64, usize, u64),
        Input(usize, u64),
        Advance(u64),
    }

    fn random_op(rng: &mut Rng) -> Op {
        let x = rng.next();
        let offset = x % 16;
        let size = [1usize, 2, 4, 8][((x >> 8) % 4) as usize];
        let value = rng.next();
        match (x >> 16) % 8 {
            0..=2 => Op::Read(offset, size),
            3..=5 => Op::Write(offset, size, value),
            6 => Op::Input(((x >> 24) % 20) as usize, value),
            _ => Op::Advance((x >> 24) % (2 * TIMEOUT_NS)),
        }
    }

    /// Apply `op`; what the guest and the hypervisor could observe of it.
    fn apply(uart: &mut Uart, lines: &mut Lines, now: &mut u64, op: Op) -> ([u8; 8], Vec<Effect>, usize) {
        let mut d = [0u8; 8];
        let mut got = 0;
        let mut ctx = DeviceCtx::new(*now, lines);
        match op {
            Op::Read(offset, size) => uart.read(offset, &mut d[..size], &mut ctx),
            Op::Write(offset, size, value) => uart.write(offset, &value.to_le_bytes()[..size], &mut ctx),
            Op::Input(n, value) => {
                got = uart.push_input(&value.to_le_bytes().repeat(3)[..n], &mut ctx);
                assert!(got <= n);
            }
            Op::Advance(dt) => {
                *now = now.saturating_add(dt);
                ctx.now_ns = *now;
                uart.advance(&mut ctx);
            }
        }
        (d, ctx.effects.to_vec(), got)
    }

    /// 100k random accesses, inputs and clock steps: no panic, the line always
    /// follows the pending interrupt and is driven only on changes, and every 1000
    /// steps a twin loaded from the saved state runs the next 1000 steps alongside
    /// and behaves the same.
    #[test]
    fn random_accesses_never_panic_and_keep_the_line_consistent() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut uart = Uart::new(COM1_GSI);
        let mut lines = Lines::default();
        let mut now = 0u64;
        let mut twin = Uart::new(COM1_GSI);
        let mut twin_lines = Lines::default();
        // What the walk reached: FIFOs on, loopback, a timeout, an overrun, the line
        // high, console output.
        let mut seen = [false; 6];
        for step in 0..100_000u32 {
            if step % 1_000 == 0 {
                let s = uart.save();
                twin = Uart::new(COM1_GSI);
                twin.load(&s).unwrap();
                assert_eq!(twin.save(), s, "step {step}: identical saved bytes");
                twin_lines.changes.clone_from(&lines.changes);
            }
            let op = random_op(&mut rng);
            let before = lines.changes.len();
            let mut twin_now = now;
            let out = apply(&mut uart, &mut lines, &mut now, op);
            let twin_out = apply(&mut twin, &mut twin_lines, &mut twin_now, op);
            assert_eq!(out, twin_out, "step {step}: {op:?}: the twin differs");
            assert_eq!(lines.changes, twin_lines.changes, "step {step}: {op:?}: the twin's line differs");
            assert!(out.1.len() <= 8, "at most one byte per accessed offset");
            assert!(lines.changes.len() <= before + 1, "one line change per access at most");
            assert_eq!(lines.level(COM1_GSI), uart.irq_high);
            assert_eq!(uart.irq_high, uart.irq_level(), "step {step}: the line follows the pending interrupt");
            assert!(uart.rx.len() <= uart.fifo_capacity());
            for (s, reached) in seen.iter_mut().zip([
                uart.fifos_on(),
                uart.mcr & MCR_LOOP != 0,
                uart.timeout_pending,
                uart.lsr_errors & LSR_OE != 0,
                uart.irq_high,
                !out.1.is_empty(),
            ]) {
                *s |= reached;
            }
        }
        assert_eq!(twin.save(), uart.save());
        assert!(lines.changes.windows(2).all(|w| w[0].1 != w[1].1));
        assert_eq!(seen, [true; 6], "the walk reached every kind of state");
    }
}
