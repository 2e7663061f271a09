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
//! The log is a `wire::dirty::DirtyBitmap` over the whole guest, tracking one range
//! (the whole domain, or part of it like Xen's video-RAM tracking). Writes the
//! hypervisor makes into guest memory while logging are marked dirty explicitly.

use core::ops::Range;

use wire::dirty::DirtyBitmap;

use super::{Domain, DomainError, Machine};
use crate::arch::{Backend, Vcpu};
use crate::mm::PAGE_SIZE;
use crate::mm::frames::FramePool;
use crate::mm::nested::EntryFormat;

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
}

impl LogDirty {
    /// Log page `pfn` (ignored outside the tracked range).
    pub fn mark(&mut self, pfn: u64) {
        if self.range.contains(&pfn) && !self.bitmap.test(pfn).unwrap_or(true) && self.bitmap.set(pfn).is_ok() {
            self.pages_dirtied += 1;
        }
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

fn arm<B: Backend>(d: &Domain<B>, pool: &mut FramePool, mode: Mode, pfn: u64) -> Result<(), DomainError> {
    let Some(mem) = d.mem.as_ref() else { return Err(DomainError::Unavailable("the domain has no memory any more")) };
    let gpa = pfn * PAGE_SIZE;
    let dirty = <B::Paging as EntryFormat>::DIRTY;
    let write = <B::Paging as EntryFormat>::WRITE_BIT;
    mem.update_leaf(pool, gpa, |e| match mode {
        Mode::Wp => e & !write,
        Mode::Pml | Mode::Dbit => e & !dirty,
    })?;
    Ok(())
}

fn flush_all<B: Backend>(d: &mut Domain<B>) -> Result<(), DomainError> {
    for slot in &mut d.vcpus {
        slot.vcpu.flush_nested_tlb()?;
    }
    Ok(())
}

impl<B: Backend> Machine<B> {
    fn domain_mut(&mut self, id: u32) -> Result<usize, DomainError> {
        self.domains.iter().position(|d| d.id == id).ok_or(DomainError::NoSuchDomain(id))
    }

    /// Start logging `range` (page frame numbers; the whole domain if `None`) with
    /// `mode` (the best available if `None`). Returns the mode used.
    pub fn dirty_start(&mut self, id: u32, mode: Option<Mode>, range: Option<Range<u64>>) -> Result<Mode, DomainError> {
        let i = self.domain_mut(id)?;
        let mode = self.mechanisms.choose(mode)?;
        let pool = &mut self.pool;
        let d = &mut self.domains[i];
        if d.log.is_some() {
            return Err(DomainError::WrongState { id, state: "already logging dirty pages".into() });
        }
        if d.mem.is_none() {
            return Err(DomainError::Unavailable("the domain has no memory any more"));
        }
        let pages = d.memory_bytes / PAGE_SIZE;
        let range = range.unwrap_or(0..pages);
        if range.start >= range.end || range.end > pages {
            return Err(DomainError::BadRange { pages });
        }
        // Per-page permissions and dirty flags need 4 KiB leaves: split the 2 MiB
        // mappings the range touches (merged back when logging stops).
        if let Some(mem) = d.mem.as_mut() {
            let split = mem.split_large(pool, range.clone())?;
            crate::println!(
                "DOMAIN {id} DIRTY-START mode={} pages={} split_2m={split}",
                mode.name(),
                range.end - range.start
            );
        }
        for pfn in range.clone() {
            arm(d, pool, mode, pfn)?;
        }
        if mode == Mode::Pml {
            for slot in &mut d.vcpus {
                slot.vcpu.enable_pml(pool)?;
            }
        }
        flush_all(d)?;
        let bitmap = DirtyBitmap::new(pages).map_err(|_| DomainError::BadRange { pages })?;
        d.log = Some(LogDirty { mode, bitmap, range, pages_dirtied: 0, rounds: 0, logging_exits: 0 });
        Ok(mode)
    }

    /// Bring the log up to date: drain PML buffers, or harvest dirty bits.
    fn harvest(&mut self, i: usize) -> Result<(), DomainError> {
        let pool = &mut self.pool;
        let d = &mut self.domains[i];
        let Some(mode) = d.log.as_ref().map(|l| l.mode) else { return Ok(()) };
        match mode {
            Mode::Pml => {
                let mut logged = alloc::vec::Vec::new();
                for slot in &mut d.vcpus {
                    slot.vcpu.drain_pml(pool, &mut |gpa| logged.push(gpa / PAGE_SIZE))?;
                }
                if let Some(log) = d.log.as_mut() {
                    for pfn in logged {
                        log.mark(pfn);
                    }
                }
            }
            Mode::Dbit => {
                let Some(range) = d.log.as_ref().map(|l| l.range.clone()) else { return Ok(()) };
                let dirty = <B::Paging as EntryFormat>::DIRTY;
                let mut found = alloc::vec::Vec::new();
                if let Some(mem) = d.mem.as_ref() {
                    for pfn in range {
                        let old = mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e & !dirty)?;
                        if old & dirty != 0 {
                            found.push(pfn);
                        }
                    }
                }
                if !found.is_empty() {
                    flush_all(d)?;
                }
                if let Some(log) = d.log.as_mut() {
                    for pfn in found {
                        log.mark(pfn);
                    }
                }
            }
            Mode::Wp => {}
        }
        Ok(())
    }

    /// The dirty pages of `range` (pfns; all if `None`) without cleaning them.
    pub fn dirty_peek(&mut self, id: u32, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        let i = self.domain_mut(id)?;
        self.harvest(i)?;
        let log = self.domains[i].log.as_ref().ok_or(DomainError::Unavailable("the domain is not logging"))?;
        let r = range.unwrap_or(log.bitmap.pfns());
        log.bitmap.peek(r).map_err(|_| DomainError::BadRange { pages: log.bitmap.pages() })
    }

    /// The dirty pages of `range`, which are then clean and re-armed so the next write
    /// is logged again. The vCPUs keep running.
    pub fn dirty_peek_clean(&mut self, id: u32, range: Option<Range<u64>>) -> Result<DirtyBitmap, DomainError> {
        let i = self.domain_mut(id)?;
        self.harvest(i)?;
        let pool = &mut self.pool;
        let d = &mut self.domains[i];
        let log = d.log.as_mut().ok_or(DomainError::Unavailable("the domain is not logging"))?;
        let r = range.unwrap_or(log.bitmap.pfns());
        let pages = log.bitmap.pages();
        let taken = log.bitmap.peek_and_clean(r).map_err(|_| DomainError::BadRange { pages })?;
        log.rounds += 1;
        let mode = log.mode;
        // Pages just reported must log their next write: wp takes write access away
        // again; pml needs the dirty flag clear (it was set when the page was logged);
        // dbit cleared it while harvesting.
        if mode != Mode::Dbit {
            for pfn in taken.ones() {
                arm(d, pool, mode, pfn)?;
            }
            flush_all(d)?;
        }
        Ok(taken)
    }

    /// Stop logging; what was logged and not yet cleaned is returned.
    pub fn dirty_stop(&mut self, id: u32) -> Result<DirtyBitmap, DomainError> {
        let i = self.domain_mut(id)?;
        self.harvest(i)?;
        if let Some(log) = self.domains[i].log.as_ref() {
            crate::println!(
                "DOMAIN {id} DIRTY-STOP mode={} pages_dirtied={} logging_exits={} rounds={}",
                log.mode.name(),
                log.pages_dirtied,
                log.logging_exits,
                log.rounds
            );
        }
        let pool = &mut self.pool;
        let d = &mut self.domains[i];
        let log = d.log.take().ok_or(DomainError::Unavailable("the domain is not logging"))?;
        if log.mode == Mode::Pml {
            for slot in &mut d.vcpus {
                slot.vcpu.disable_pml(pool)?;
            }
        }
        if log.mode == Mode::Wp
            && let Some(mem) = d.mem.as_ref()
        {
            let write = <B::Paging as EntryFormat>::WRITE_BIT;
            for pfn in log.range.clone() {
                mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e | write)?;
            }
        }
        if let Some(mem) = d.mem.as_mut() {
            let merged = mem.merge_large(pool)?;
            crate::println!("DOMAIN {id} DIRTY-MERGE merged_2m={merged}");
        }
        flush_all(d)?;
        Ok(log.bitmap)
    }

    /// Counters of the log.
    pub fn dirty_stats(&mut self, id: u32) -> Result<DirtyStats, DomainError> {
        let i = self.domain_mut(id)?;
        self.harvest(i)?;
        let log = self.domains[i].log.as_ref().ok_or(DomainError::Unavailable("the domain is not logging"))?;
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

/// A write-protect fault on a tracked page: log it and give write access back.
/// Returns false if the fault is not logging's (the domain really went outside).
pub(super) fn write_fault<B: Backend>(d: &mut Domain<B>, pool: &mut FramePool, gpa: u64) -> Result<bool, DomainError> {
    let pfn = gpa / PAGE_SIZE;
    let Some(log) = d.log.as_mut() else { return Ok(false) };
    if log.mode != Mode::Wp || !log.range.contains(&pfn) || gpa >= d.memory_bytes {
        return Ok(false);
    }
    log.mark(pfn);
    log.logging_exits += 1;
    let write = <B::Paging as EntryFormat>::WRITE_BIT;
    if let Some(mem) = d.mem.as_ref() {
        mem.update_leaf(pool, pfn * PAGE_SIZE, |e| e | write)?;
    }
    flush_all(d)?;
    Ok(true)
}

/// A PML-full exit of vCPU `vi`: drain its buffer into the log.
pub(super) fn pml_full<B: Backend>(d: &mut Domain<B>, pool: &mut FramePool, vi: usize) -> Result<(), DomainError> {
    let mut logged = alloc::vec::Vec::new();
    d.vcpus[vi].vcpu.drain_pml(pool, &mut |gpa| logged.push(gpa / PAGE_SIZE))?;
    if let Some(log) = d.log.as_mut() {
        log.logging_exits += 1;
        for pfn in logged {
            log.mark(pfn);
        }
    }
    Ok(())
}

/// The hypervisor wrote guest pages `gpas`: mark them dirty if logging (DESIGN.md:
/// writes the hypervisor makes into guest memory are marked explicitly).
pub(super) fn hypervisor_wrote<B: Backend>(d: &mut Domain<B>, gpas: Range<u64>) {
    if let Some(log) = d.log.as_mut() {
        for pfn in gpas.start / PAGE_SIZE..gpas.end.div_ceil(PAGE_SIZE) {
            log.mark(pfn);
        }
    }
}
