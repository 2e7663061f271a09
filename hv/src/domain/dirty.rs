//! Log-dirty mode: exactly which guest pages were written, by the cheapest mechanism
//! the CPU has, behind one interface.
//!
//! - `pml` (VMX with PML, SDM Vol. 3C 29.3.6): EPT dirty flags cleared for tracked
//!   pages; the processor logs a page's address into the vCPU's 512-entry buffer when
//!   it sets its dirty flag, and exits only when the buffer is full. Buffers are drained
//!   on PML-full exits, before every peek/clean (each vCPU on its own; the domain is
//!   never paused for it), and when logging stops.
//! - `dbit` (EPT A/D or NPT dirty bits): flags cleared when logging starts and after a
//!   page is reported; harvested by scanning the tracked leaves, then the nested TLB is
//!   flushed so the next write sets the flag again (29.4.3.4).
//! - `wp` (any CPU): tracked pages lose write permission; the first write faults, is
//!   logged, and the permission comes back until the page is reported and re-armed.
//!
//! A domain has up to two logs sharing one mechanism: the main log (`hvctl dirty
//! start`, the whole domain or a range; what migration consumes) and a tracking log
//! over one range (`hvctl dirty track`, like Xen's video-RAM tracking). Each is a
//! `wire::dirty::DirtyBitmap` over the whole guest; a logged write marks every log
//! whose range holds the page, so cleaning one never hides a write from the other.
//! Writes the hypervisor makes into guest memory while logging are marked explicitly.

use core::fmt;
use core::ops::Range;

use wire::dirty::DirtyBitmap;

use super::{Domain, DomainError, Machine};
use crate::arch::{Backend, Vcpu};
use crate::mm::frames::FramePool;
use crate::mm::nested::EntryFormat;
use crate::mm::{MmError, PAGE_SIZE};

/// A logging mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Page-modification logging (VMX).
    Pml,
    /// Nested dirty bits, harvested by scanning.
    Dbit,
    /// Write protection.
    Wp,
}

impl Mode {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pml => "pml",
            Mode::Dbit => "dbit",
            Mode::Wp => "wp",
        }
    }

    /// Parse a name; `auto` is `None`.
    pub fn parse(s: &str) -> Result<Option<Mode>, DomainError> {
        match s {
            "auto" => Ok(None),
            "pml" => Ok(Some(Mode::Pml)),
            "dbit" => Ok(Some(Mode::Dbit)),
            "wp" => Ok(Some(Mode::Wp)),
            _ => Err(DomainError::Unavailable("a log-dirty mode other than auto, pml, dbit or wp")),
        }
    }
}

/// Which mechanisms this CPU offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    /// VMX PML.
    pub pml: bool,
    /// EPT A/D or NPT dirty bits.
    pub dbit: bool,
}

impl Mechanisms {
    /// The best mechanism available, or check that `asked` is available.
    pub fn choose(&self, asked: Option<Mode>) -> Result<Mode, DomainError> {
        match asked {
            None if self.pml => Ok(Mode::Pml),
            None if self.dbit => Ok(Mode::Dbit),
            None => Ok(Mode::Wp),
            Some(Mode::Pml) if !self.pml => {
                Err(DomainError::Unavailable("PML (needs VMX with page-modification logging)"))
            }
            Some(Mode::Dbit) if !self.dbit => Err(DomainError::Unavailable("nested dirty bits (needs EPT A/D or NPT)")),
            Some(m) => Ok(m),
        }
    }
}

/// One domain's log.
#[derive(Debug)]
pub struct LogDirty {
    /// The mechanism.
    pub mode: Mode,
    /// Dirty pages not yet cleaned.
    pub bitmap: DirtyBitmap,
    /// Tracked page frame numbers.
    pub range: Range<u64>,
    /// Pages newly logged since logging started.
    pub pages_dirtied: u64,
    /// Peek-and-clean rounds.
    pub rounds: u64,
    /// Exits logging caused (write-protect faults, PML-full exits).
    pub logging_exits: u64,
    /// TSC cycles spent draining PML buffers into the logs (each drain from the
    /// buffer's first entry to the last log's bit), and the entries drained. Under Bochs
    /// the TSC advances with emulated instructions, so this counts instructions.
    pub drain_cycles: u64,
    /// PML entries drained (see `drain_cycles`).
    pub drained_entries: u64,
    /// TSC cycles spent re-arming reported pages after a clean (the nested entries
    /// and the TLB flush), and the pages re-armed.
    pub rearm_cycles: u64,
    /// Pages re-armed (see `rearm_cycles`).
    pub rearmed_pages: u64,
}

impl LogDirty {
    /// Log page `pfn` (ignored outside the tracked range).
    fn mark(&mut self, pfn: u64) {
        if self.range.contains(&pfn) && !self.bitmap.test(pfn).unwrap_or(true) && self.bitmap.set(pfn).is_ok() {
            self.pages_dirtied += 1;
        }
    }

    /// Log the pages of PML entries `gpas` (those outside the tracked range ignored):
    /// one comparison and one bitmap word per entry.
    fn mark_logged(&mut self, gpas: &[u64]) {
        let range = self.range.clone();
        self.pages_dirtied += self.bitmap.set_each(gpas.iter().map(|g| g / PAGE_SIZE).filter(|p| range.contains(p)));
    }
}

/// What `hvctl dirty stats` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyStats {
    /// Mechanism.
    pub mode: Mode,
    /// Pages logged since start.
    pub pages_dirtied: u64,
    /// Dirty now (not yet cleaned).
    pub dirty_now: u64,
    /// Peek-and-clean rounds.
    pub rounds: u64,
    /// Exits caused by logging.
    pub logging_exits: u64,
    /// First tracked page and count.
    pub range: (u64, u64),
}

/// The main log (`hvctl dirty start`).
pub const MAIN: usize = 0;
/// The tracking log (`hvctl dirty track`).
pub const TRACK: usize = 1;

fn logs_mode<B: Backend>(d: &Domain<B>) -> Option<Mode> {
    d.logs.iter().flatten().map(|l| l.mode).next()
}

fn tracked<B: Backend>(d: &Domain<B>, pfn: u64) -> bool {
    d.logs.iter().flatten().any(|l| l.range.contains(&pfn))
}

/// Log `pfn` in every log that tracks it.
fn mark_all<B: Backend>(d: &mut Domain<B>, pfn: u64) {
    for log in d.logs.iter_mut().flatten() {
        log.mark(pfn);
    }
}

/// Log the pages of PML entries `gpas` in every log that tracks them.
fn mark_logged(logs: &mut [Option<LogDirty>], gpas: &[u64]) {
    for log in logs.iter_mut().flatten() {
        log.mark_logged(gpas);
    }
}

/// Arm pages `pfns` (ascending) so their next write is logged: wp takes write access
/// away; pml and dbit clear the dirty flag. One walk to each 2 MiB region's page table.
fn arm<B: Backend>(
    d: &Domain<B>,
    pool: &mut FramePool,
    mode: Mode,
    pfns: impl IntoIterator<Item = u64>,
) -> Result<(), DomainError> {
    let Some(mem) = d.mem.as_ref() else { return Err(DomainError::Unavailable("the domain has no memory any more")) };
    let clear = match mode {
        Mode::Wp => <B::Paging as EntryFormat>::WRITE_BIT,
        Mode::Pml | Mode::Dbit => <B::Paging as EntryFormat>::DIRTY,
    };
    mem.update_leaves(pool, pfns, |_, e| e & !clear)?;
    Ok(())
}

/// The time-stamp counter (cycles; emulated instructions under Bochs).
fn tsc() -> u64 {
    crate::drivers::time::now_ticks()
}

/// Drain the PML buffers of `vcpus` straight into the logs (no copy of the entries)
/// and charge the drain's cycles and entries to every log.
fn drain_into_logs<B: Backend>(
    vcpus: Range<usize>,
    d: &mut Domain<B>,
    pool: &mut FramePool,
) -> Result<(), DomainError> {
    let since = tsc();
    let mut entries = 0;
    let logs = &mut d.logs;
    for slot in &mut d.vcpus[vcpus] {
        slot.vcpu.drain_pml(pool, &mut |gpas| {
            entries += gpas.len() as u64;
            mark_logged(logs, gpas);
        })?;
    }
    let cycles = tsc().wrapping_sub(since);
    for log in d.logs.iter_mut().flatten() {
        log.drain_cycles += cycles;
        log.drained_entries += entries;
    }
    Ok(())
}

/// Flush the nested TLB of every vCPU of `d` that is here. One running on another CPU
/// is skipped: this is called from the write-protect fault, which only gives write
/// access back (a stale read-only entry there costs one more fault, never a lost
/// write), and the SVM CPU running it flushes at its next VMRUN anyway (TLB_CONTROL).
/// Changes that take access away (clean, start) are made by control requests, with
/// every vCPU stopped (`DomainCell::lock`).
fn flush_all<B: Backend>(d: &mut Domain<B>) -> Result<(), DomainError> {
    for slot in &mut d.vcpus {
        if let Some(vcpu) = slot.vcpu.if_here() {
            vcpu.flush_nested_tlb()?;
        }
    }
    Ok(())
}

/// One domain's log-dirty state with what changing it needs: its frames' pool (nested
/// tables) and the mechanisms this CPU has. Both the control requests (through
/// [`Machine`]) and the guest's own hypercalls (from the exit handler) work through it.
pub struct DirtyCtx<'a, B: Backend> {
    /// The domain.
    pub d: &'a mut Domain<B>,
    /// The pool its nested tables live in.
    pub pool: &'a mut FramePool,
    /// What this CPU offers.
    pub mechanisms: &'a Mechanisms,
}

impl<B: Backend> fmt::Debug for DirtyCtx<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyCtx").field("domain", &self.d.id).finish_non_exhaustive()
    }
}

impl<B: Backend> DirtyCtx<'_, B> {
    /// Start log `slot` (see [`MAIN`], [`TRACK`]).
    pub fn start(&mut self, slot: usize, mode: Option<Mode>, range: Option<Range<u64>>) -> Result<Mode, DomainError> {
        let id = self.d.id;
        // Bits the existing log has not harvested yet must not be lost by re-arming.
        self.harvest()?;
        let active = logs_mode(self.d);
        let mode = match (active, mode) {
            (Some(m), None) => m,
            (Some(m), Some(asked)) if asked != m => {
                return Err(DomainError::WrongState {
                    id,
                    state: alloc::format!("logging with {}; a second log shares that mechanism", m.name()),
                });
            }
            (_, asked) => self.mechanisms.choose(asked)?,
        };
        let pool = &mut *self.pool;
        let d = &mut *self.d;
        if d.logs[slot].is_some() {
            return Err(DomainError::WrongState { id, state: "already running that log".into() });
        }
        if d.mem.is_none() {
            return Err(DomainError::Unavailable("the domain has no memory any more"));
        }
        let pages = d.memory_bytes / PAGE_SIZE;
        let range = range.unwrap_or(0..pages);
        if range.start >= range.end || range.end > pages {
            return Err(DomainError::BadRange { pages });
        }
        // Allocated before anything is armed: a refusal leaves the domain as it was.
        let bitmap = DirtyBitmap::new(pages).map_err(|e| match e {
            wire::dirty::DirtyError::OutOfMemory { bytes } => DomainError::Memory(MmError::OutOfHeap { bytes }),
            _ => DomainError::BadRange { pages },
        })?;
        // Per-page permissions and dirty flags need 4 KiB leaves: split the 2 MiB
        // mappings the range touches (merged back when the last log stops).
        if let Some(mem) = d.mem.as_mut() {
            let split = mem.split_large(pool, range.clone())?;
            crate::println!(
                "DOMAIN {id} DIRTY-START mode={} pages={} split_2m={split}",
                mode.name(),
                range.end - range.start
            );
        }
        arm(d, pool, mode, range.clone())?;
        if mode == Mode::Pml && active.is_none() {
            for slot in &mut d.vcpus {
                slot.vcpu.enable_pml(pool)?;
            }
        }
        flush_all(d)?;
        d.logs[slot] = Some(LogDirty {
            mode,
            bitmap,
            range,
            pages_dirtied: 0,
            rounds: 0,
            logging_exits: 0,
            drain_cycles: 0,
            drained_entries: 0,
            rearm_cycles: 0,
            rearmed_pages: 0,
        });
        Ok(mode)
    }

    /// Bring the logs up to date: drain PML buffers, or harvest dirty bits.
    pub fn harvest(&mut self) -> Result<(), DomainError> {
        let pool = &mut *self.pool;
        let d = &mut *self.d;
        let Some(mode) = logs_mode(d) else { return Ok(()) };
        match mode {
            Mode::Pml => drain_into_logs(0..d.vcpus.len(), d, pool)?,
            Mode::Dbit => {
                let dirty = <B::Paging as EntryFormat>::DIRTY;
                let pages = d.memory_bytes / PAGE_SIZE;
                let mut found = alloc::vec::Vec::new();
                if let Some(mem) = d.mem.as_ref() {
                    let pfns = (0..pages).filter(|p| tracked(d, *p));
                    mem.update_leaves(pool, pfns, |pfn, e| {
                        if e & dirty != 0 {
                            found.push(pfn);
                        }
                        e & !dirty
                    })?;
                }
                if !found.is_empty() {
                    flush_all(d)?;
                }
                for pfn in found {
                    mark_all(d, pfn);
                }
            }
            Mode::Wp => {}
        }
        Ok(())
    }

    fn log_of(&self, slot: usize) -> Result<&LogDirty, DomainError> {
        self.d.logs[slot].as_ref().ok_or(DomainError::Unavailable("that log is not running"))
    }

    /// Peek log `slot`.
    pub fn peek(&mut self, slot: usize, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        self.harvest()?;
        let log = self.log_of(slot)?;
        let r = range.unwrap_or(log.bitmap.pfns());
        log.bitmap.peek(r).map_err(|_| DomainError::BadRange { pages: log.bitmap.pages() })
    }

    /// The dirty pages of log `slot` in `range`, which are then clean in that log and
    /// re-armed so the next write is logged again. The vCPUs keep running.
    pub fn peek_clean(&mut self, slot: usize, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        self.harvest()?;
        let pool = &mut *self.pool;
        let d = &mut *self.d;
        let log = d.logs[slot].as_mut().ok_or(DomainError::Unavailable("that log is not running"))?;
        let r = range.unwrap_or(log.bitmap.pfns());
        let pages = log.bitmap.pages();
        let taken = log.bitmap.peek_and_clean(r).map_err(|_| DomainError::BadRange { pages })?;
        log.rounds += 1;
        let mode = log.mode;
        // Pages just reported must log their next write: wp takes write access away
        // again; pml needs the dirty flag clear (it was set when the page was logged);
        // dbit cleared it while harvesting.
        if mode != Mode::Dbit {
            let since = tsc();
            arm(d, pool, mode, taken.ones())?;
            flush_all(d)?;
            let (cycles, pages) = (tsc().wrapping_sub(since), taken.count_ones());
            if let Some(log) = d.logs[slot].as_mut() {
                log.rearm_cycles += cycles;
                log.rearmed_pages += pages;
            }
        }
        Ok(taken)
    }

    /// Stop log `slot`. The mechanism stays armed for the other log if it runs.
    pub fn stop(&mut self, slot: usize) -> Result<DirtyBitmap, DomainError> {
        let id = self.d.id;
        self.harvest()?;
        let pool = &mut *self.pool;
        let d = &mut *self.d;
        let log = d.logs[slot].take().ok_or(DomainError::Unavailable("that log is not running"))?;
        crate::println!(
            "DOMAIN {id} DIRTY-STOP mode={} pages_dirtied={} logging_exits={} rounds={} drain_cycles={} \
             drained_entries={} rearm_cycles={} rearmed_pages={}",
            log.mode.name(),
            log.pages_dirtied,
            log.logging_exits,
            log.rounds,
            log.drain_cycles,
            log.drained_entries,
            log.rearm_cycles,
            log.rearmed_pages
        );
        let last = logs_mode(d).is_none();
        if log.mode == Mode::Pml && last {
            for slot in &mut d.vcpus {
                slot.vcpu.disable_pml(pool)?;
            }
        }
        if log.mode == Mode::Wp {
            let write = <B::Paging as EntryFormat>::WRITE_BIT;
            if let Some(mem) = d.mem.as_ref() {
                let give_back = log.range.clone().filter(|p| !tracked(d, *p));
                mem.update_leaves(pool, give_back, |_, e| e | write)?;
            }
        }
        if last && let Some(mem) = d.mem.as_mut() {
            let merged = mem.merge_large(pool)?;
            crate::println!("DOMAIN {id} DIRTY-MERGE merged_2m={merged}");
        }
        flush_all(d)?;
        Ok(log.bitmap)
    }

    /// Counters of log `slot`.
    pub fn stats(&mut self, slot: usize) -> Result<DirtyStats, DomainError> {
        self.harvest()?;
        let log = self.log_of(slot)?;
        Ok(DirtyStats {
            mode: log.mode,
            pages_dirtied: log.pages_dirtied,
            dirty_now: log.bitmap.count_ones(),
            rounds: log.rounds,
            logging_exits: log.logging_exits,
            range: (log.range.start, log.range.end - log.range.start),
        })
    }
}

impl<B: Backend> Machine<B> {
    /// Domain `id`'s log-dirty state.
    /// (The domain is locked first, which stops any of its vCPUs running elsewhere, so
    /// a change to its nested tables is complete, with every TLB flushed at its next
    /// entry, before the request's answer.)
    fn with_dirty<R>(
        &mut self,
        id: u32,
        f: impl FnOnce(&mut DirtyCtx<'_, B>) -> Result<R, DomainError>,
    ) -> Result<R, DomainError> {
        let mechanisms = *self.mechanisms();
        self.with_domain_and_pool(id, |d, pool| f(&mut DirtyCtx { d, pool, mechanisms: &mechanisms }))?
    }

    /// Start the main log over `range` (page frame numbers; the whole domain if
    /// `None`) with `mode` (the best available if `None`). Returns the mode used.
    pub fn dirty_start(&mut self, id: u32, mode: Option<Mode>, range: Option<Range<u64>>) -> Result<Mode, DomainError> {
        self.log_start(id, MAIN, mode, range)
    }

    /// Start log `slot` (see [`MAIN`], [`TRACK`]).
    pub fn log_start(
        &mut self,
        id: u32,
        slot: usize,
        mode: Option<Mode>,
        range: Option<Range<u64>>,
    ) -> Result<Mode, DomainError> {
        self.with_dirty(id, |c| c.start(slot, mode, range))
    }

    /// The dirty pages of the main log's `range` (all if `None`) without cleaning them.
    pub fn dirty_peek(&mut self, id: u32, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        self.log_peek(id, MAIN, range)
    }

    /// Peek log `slot`.
    pub fn log_peek(&mut self, id: u32, slot: usize, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        self.with_dirty(id, |c| c.peek(slot, range))
    }

    /// Peek-and-clean the main log.
    pub fn dirty_peek_clean(&mut self, id: u32, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        self.log_peek_clean(id, MAIN, range)
    }

    /// Peek-and-clean log `slot` (see [`DirtyCtx::peek_clean`]).
    pub fn log_peek_clean(
        &mut self,
        id: u32,
        slot: usize,
        range: Option<Range<u64>>,
    ) -> Result<DirtyBitmap, DomainError> {
        self.with_dirty(id, |c| c.peek_clean(slot, range))
    }

    /// Stop the main log; what was logged and not yet cleaned is returned.
    pub fn dirty_stop(&mut self, id: u32) -> Result<DirtyBitmap, DomainError> {
        self.log_stop(id, MAIN)
    }

    /// Stop log `slot`. The mechanism stays armed for the other log if it runs.
    pub fn log_stop(&mut self, id: u32, slot: usize) -> Result<DirtyBitmap, DomainError> {
        self.with_dirty(id, |c| c.stop(slot))
    }

    /// Counters of the main log.
    pub fn dirty_stats(&mut self, id: u32) -> Result<DirtyStats, DomainError> {
        self.log_stats(id, MAIN)
    }

    /// Counters of log `slot`.
    pub fn log_stats(&mut self, id: u32, slot: usize) -> Result<DirtyStats, DomainError> {
        self.with_dirty(id, |c| c.stats(slot))
    }
}

/// A write-protect fault on a tracked page: log it and give write access back.
/// Returns false if the fault is not logging's (the domain really went outside).
pub(super) fn write_fault<B: Backend>(d: &mut Domain<B>, pool: &mut FramePool, gpa: u64) -> Result<bool, DomainError> {
    let pfn = gpa / PAGE_SIZE;
    if logs_mode(d) != Some(Mode::Wp) || !tracked(d, pfn) || gpa >= d.memory_bytes {
        return Ok(false);
    }
    mark_all(d, pfn);
    for log in d.logs.iter_mut().flatten() {
        log.logging_exits += 1;
    }
    let write = <B::Paging as EntryFormat>::WRITE_BIT;
    if let Some(mem) = d.mem.as_ref() {
        mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e | write)?;
    }
    flush_all(d)?;
    Ok(true)
}

/// A PML-full exit of vCPU `vi`: drain its buffer into the logs.
pub(super) fn pml_full<B: Backend>(d: &mut Domain<B>, pool: &mut FramePool, vi: usize) -> Result<(), DomainError> {
    drain_into_logs(vi..vi + 1, d, pool)?;
    for log in d.logs.iter_mut().flatten() {
        log.logging_exits += 1;
    }
    Ok(())
}

/// The hypervisor wrote guest pages `gpas`: mark them dirty in every log that tracks
/// them (DESIGN.md: writes the hypervisor makes into guest memory are marked).
pub(super) fn hypervisor_wrote<B: Backend>(d: &mut Domain<B>, gpas: Range<u64>) {
    for pfn in gpas.start / PAGE_SIZE..gpas.end.div_ceil(PAGE_SIZE) {
        mark_all(d, pfn);
    }
}

#[cfg(test)]
mod tests {
    //! PML logging over the fake vCPU's buffer: a "write" sets the page's dirty flag and
    //! logs the page only when the flag was clear, as the processor does (SDM Vol. 3C
    //! 29.3.6), so a page that was reported but not re-armed would be missed.
    use alloc::vec::Vec;

    use super::*;
    use crate::domain::testing::FakeBackend;
    use crate::mm::frames::testing::pool;

    const MEMORY: u64 = 4 << 20;

    fn machine() -> Machine<FakeBackend> {
        crate::domain::testing::machine(pool(2048), MEMORY, Mechanisms { pml: true, dbit: true })
    }

    /// The guest writes page `pfn`.
    fn write(m: &mut Machine<FakeBackend>, pfn: u64) {
        let dirty = <<FakeBackend as Backend>::Paging as EntryFormat>::DIRTY;
        let (d, pool, _) = m.parts(0);
        let mem = d.mem.as_ref().unwrap();
        let old = mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e | dirty).unwrap();
        if old & dirty == 0 {
            d.vcpus[0].vcpu.pml.as_mut().expect("PML is on").push(pfn * PAGE_SIZE);
        }
    }

    fn ones(b: &DirtyBitmap) -> Vec<u64> {
        b.ones().collect()
    }

    #[test]
    fn pml_logs_exactly_what_was_written_in_both_logs_across_cleans_and_full_buffers() {
        let mut m = machine();
        assert_eq!(m.log_start(1, MAIN, Some(Mode::Pml), None).unwrap(), Mode::Pml);
        assert_eq!(m.log_start(1, TRACK, None, Some(100..200)).unwrap(), Mode::Pml);
        for pfn in [5, 150, 150, 1023, 199, 200] {
            write(&mut m, pfn);
        }
        assert_eq!(ones(&m.log_peek(1, MAIN, None).unwrap()), [5, 150, 199, 200, 1023]);
        assert_eq!(ones(&m.log_peek(1, TRACK, None).unwrap()), [150, 199]);
        assert_eq!(ones(&m.log_peek_clean(1, MAIN, None).unwrap()), [5, 150, 199, 200, 1023]);
        assert!(m.log_peek(1, MAIN, None).unwrap().is_clean());
        assert_eq!(
            ones(&m.log_peek(1, TRACK, None).unwrap()),
            [150, 199],
            "cleaning one log hides nothing from the other"
        );
        // Reported pages were re-armed: written again, they are logged again.
        for pfn in [5, 150, 7] {
            write(&mut m, pfn);
        }
        // A PML-full exit drains the buffer like a peek does.
        {
            let (d, pool, _) = m.parts(0);
            pml_full(d, pool, 0)
        }
        .unwrap();
        assert!(m.dom(0).vcpus[0].vcpu.pml.as_ref().unwrap().is_empty());
        write(&mut m, 1023);
        assert_eq!(ones(&m.log_peek_clean(1, MAIN, None).unwrap()), [5, 7, 150, 1023]);
        let main = m.log_stats(1, MAIN).unwrap();
        assert_eq!((main.pages_dirtied, main.dirty_now, main.rounds, main.logging_exits), (9, 0, 2, 1));
        let track = m.log_stats(1, TRACK).unwrap();
        assert_eq!((track.pages_dirtied, track.dirty_now), (2, 2));
        let log = m.dom(0).logs[MAIN].as_ref().unwrap();
        assert_eq!((log.drained_entries, log.rearmed_pages), (9, 9), "drained entries and re-armed pages are counted");
        // A full buffer of distinct pages, some outside the tracking log's range.
        for pfn in 0..512 {
            write(&mut m, 300 + pfn);
        }
        {
            let (d, pool, _) = m.parts(0);
            pml_full(d, pool, 0)
        }
        .unwrap();
        let all = m.log_peek_clean(1, MAIN, None).unwrap();
        assert_eq!(ones(&all), (300..812).collect::<Vec<_>>());
        assert!(m.log_peek(1, TRACK, None).unwrap().ones().all(|p| (100..200).contains(&p)));
        // Everything reported is armed again.
        let dirty = <<FakeBackend as Backend>::Paging as EntryFormat>::DIRTY;
        let (d, pool, _) = m.parts(0);
        let mem = d.mem.as_ref().unwrap();
        for pfn in [5, 7, 150, 300, 811, 1023] {
            assert_eq!(mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e).unwrap() & dirty, 0, "page {pfn}");
        }
        m.log_stop(1, TRACK).unwrap();
        m.log_stop(1, MAIN).unwrap();
        assert!(m.dom(0).vcpus[0].vcpu.pml.is_none(), "the last log turned PML off");
    }
}
