//! Helpers for the core's side of `SendAllPages`/`SendPages`: pack pages into
//! [`PageBatch`] records (zero pages as pfn only) and a round's bits into a
//! [`DirtyRound`] record. The core reads guest memory; this module only encodes.

use alloc::vec::Vec;

use wire::dirty::DirtyBitmap;
use wire::migration::{DirtyRound, PageBatch, Record, RecordError, RecordType};

/// Pages per page-batch record this build sends: 64 KiB of data at most. The format
/// allows up to [`MAX_BATCH_PAGES`](wire::migration::MAX_BATCH_PAGES) (2 MiB), but a
/// record is the unit both ends buffer whole, so small records keep a migration's
/// memory small and constant on the source and the destination alike, whatever the
/// guest's size. The header and CRC cost 16 bytes per 64 KiB.
pub const SEND_BATCH_PAGES: usize = 16;

/// Packs pages into page-batch records of at most [`SEND_BATCH_PAGES`] pages,
/// appending each full one to the caller's buffer (which the core cuts into stream
/// chunks as it likes).
#[derive(Clone, Debug, Default)]
pub struct PageBatcher {
    batch: PageBatch,
    pages: u64,
    zero_pages: u64,
}

impl PageBatcher {
    /// An empty batcher.
    pub const fn new() -> Self {
        Self { batch: PageBatch::new(), pages: 0, zero_pages: 0 }
    }

    /// Add page `pfn` with its 4096 bytes; a full batch is encoded into `out`.
    pub fn push(&mut self, pfn: u64, page: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.batch.push(pfn, page).map_err(bad)?;
        self.pages += 1;
        if self.batch.zero.last() == Some(&true) {
            self.zero_pages += 1;
        }
        if self.is_full() { self.flush(out) } else { Ok(()) }
    }

    /// Add page `pfn`, known to be all zeros.
    pub fn push_zero(&mut self, pfn: u64, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.batch.push_zero(pfn).map_err(bad)?;
        self.pages += 1;
        self.zero_pages += 1;
        if self.is_full() { self.flush(out) } else { Ok(()) }
    }

    /// Encode the pending partial batch, if any, into `out`.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = core::mem::take(&mut self.batch);
        Record::PageBatch(batch).encode(out)
    }

    fn is_full(&self) -> bool {
        self.batch.pfns.len() >= SEND_BATCH_PAGES || self.batch.is_full()
    }

    /// Pages pushed so far that went out as zero pages (pfn only).
    pub const fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Pages pushed so far.
    pub const fn pages(&self) -> u64 {
        self.pages
    }
}

fn bad(fault: wire::migration::PayloadFault) -> RecordError {
    RecordError::BadPayload { record_type: RecordType::PageBatch as u16, fault }
}

/// Dirty records per dirty-round record at most, in encoded bytes (half the record limit,
/// so a record never nears [`MAX_RECORD_PAYLOAD`](wire::migration::MAX_RECORD_PAYLOAD)).
pub const DIRTY_ROUND_BUDGET: usize = wire::migration::MAX_RECORD_PAYLOAD as usize / 2;

/// Encode the dirty-round records of round `round` (from 1) into `out`: one record, or
/// several with the same round number when the bits need more than
/// [`DIRTY_ROUND_BUDGET`] bytes. Returns the number of records.
pub fn encode_dirty_round(round: u32, pages: &DirtyBitmap, out: &mut Vec<u8>) -> Result<usize, RecordError> {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut count = 0;
    for r in pages.to_records() {
        let len = r.encoded_len() + 4;
        if bytes + len > DIRTY_ROUND_BUDGET && !records.is_empty() {
            Record::DirtyRound(DirtyRound { round, records: core::mem::take(&mut records) }).encode(out)?;
            count += 1;
            bytes = 0;
        }
        bytes += len;
        records.push(r);
    }
    if !records.is_empty() || count == 0 {
        Record::DirtyRound(DirtyRound { round, records }).encode(out)?;
        count += 1;
    }
    Ok(count)
}
