//! Device DMA dirty tracking (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT/STOP`) during a
//! migration, in one of two modes ([`DirtyTracking`]):
//!
//! - **ShipPages**: vfmig reads the pages the devices dirtied from guest memory and ships them
//!   as `DirtyPages` frames on device 0's stream (a standalone transfer, or a VMM that lets
//!   vfmig carry device-dirtied pages);
//! - **Export**: vfmig starts and stops logging and hands every harvested report to the VMM as
//!   one bitmap per IOVA range ([`DirtySink`]); the VMM merges it into its own dirty tracking
//!   and ships the pages in its RAM stream. vfmig sends no `DirtyPages` frame.
//!
//! The ordering rule against the VMM's RAM stream is in `docs/DESIGN.md` ("Device dirty
//! pages"); in short: logging starts before any device enters PRE_COPY or STOP_COPY, each
//! report reads and clears the logs, and the report with [`DirtyReport::last`] set is harvested
//! after every device reached STOP_COPY (no device DMA after that) and delivered after logging
//! stopped; the VMM's final RAM pass must start after it and include its pages.

use std::fmt;
use std::sync::Arc;

use vfmig_vfio::dma::{validate_ranges, MAX_LOGGING_RANGES};
use vfmig_vfio::{DeviceError, IovaRange, MigrationDevice};

use crate::error::{Phase, PipelineError};
use crate::guest::{bitmap_runs, merge_runs, GuestMemoryAccess, Run, GUEST_PAGE};

/// How device DMA into guest memory is tracked while devices migrate.
#[derive(Clone, Default)]
pub enum DirtyTracking {
    /// No device DMA tracking (the VMM tracks device DMA itself, e.g. with IOMMU dirty
    /// tracking, or the devices do no DMA that matters).
    #[default]
    Off,
    /// vfmig ships the dirtied pages itself as `DirtyPages` frames, read from `memory`
    /// (its [`GuestMemoryAccess::ranges`] are the ranges logged).
    ShipPages {
        /// The guest memory the devices DMA into.
        memory: Arc<dyn GuestMemoryAccess>,
        /// Also send every guest page once after logging started (for a standalone transfer
        /// where no VMM copies guest RAM).
        full_copy: bool,
    },
    /// vfmig hands each harvested dirty log to the VMM, which ships the pages.
    Export {
        /// The IOVA ranges to log (aligned to `page_size`, non-overlapping, at most 256).
        ranges: Vec<IovaRange>,
        /// Granularity of the bitmaps handed out (a power of two, at least 4 KiB); also the
        /// page size asked of `DMA_LOGGING_START`. A device logging at another granularity
        /// reports at this one (the kernel replicates bits).
        page_size: u64,
        /// Where the reports go.
        sink: Arc<dyn DirtySink>,
    },
}

impl fmt::Debug for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyTracking::Off => f.write_str("Off"),
            DirtyTracking::ShipPages { full_copy, .. } => f
                .debug_struct("ShipPages")
                .field("full_copy", full_copy)
                .finish_non_exhaustive(),
            DirtyTracking::Export {
                ranges, page_size, ..
            } => f
                .debug_struct("Export")
                .field("ranges", &ranges.len())
                .field("page_size", page_size)
                .finish_non_exhaustive(),
        }
    }
}

impl DirtyTracking {
    /// Whether devices log DMA at all.
    pub fn is_on(&self) -> bool {
        !matches!(self, DirtyTracking::Off)
    }

    /// Checks Export's ranges and page size (aligned, non-overlapping, at most 256, page size
    /// a power of two of at least 4 KiB), before anything is connected or started.
    pub(crate) fn check(&self) -> Result<(), PipelineError> {
        match self {
            DirtyTracking::Export {
                ranges, page_size, ..
            } => validate_ranges(ranges, *page_size).map_err(|_| PipelineError::Options {
                what: "dirty_tracking ranges (aligned to page_size, at most 256)",
                value: ranges.len().min(MAX_LOGGING_RANGES + 1) as u64,
            }),
            _ => Ok(()),
        }
    }

    /// The guest memory vfmig ships pages from (ShipPages only).
    pub(crate) fn ship_memory(&self) -> Option<&Arc<dyn GuestMemoryAccess>> {
        match self {
            DirtyTracking::ShipPages { memory, .. } => Some(memory),
            _ => None,
        }
    }

    /// ShipPages with a full copy of guest memory.
    pub(crate) fn full_copy(&self) -> bool {
        matches!(
            self,
            DirtyTracking::ShipPages {
                full_copy: true,
                ..
            }
        )
    }
}

/// Receives the dirty logs in [`DirtyTracking::Export`] mode. Called on the session's control
/// thread: a slow sink delays the migration (keep it to merging bitmaps).
pub trait DirtySink: Send + Sync {
    /// Logging is on for the devices in [`LoggingStarted::tracked`]: every page they write from
    /// now on will be in a report. Called once, before any device leaves RUNNING.
    fn logging_started(&self, started: &LoggingStarted);

    /// One harvest: the pages devices wrote since the previous one (the logs are read and
    /// cleared). During pre-copy only harvests with a dirty page are delivered; the last one
    /// ([`DirtyReport::last`]) always is.
    fn dirty(&self, report: &DirtyReport);
}

/// What [`DirtySink::logging_started`] is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggingStarted {
    /// The ranges logged (those of [`DirtyTracking::Export`]).
    pub ranges: Vec<IovaRange>,
    /// Granularity of the bitmaps.
    pub page_size: u64,
    /// Devices that log their DMA, with the page size each chose.
    pub tracked: Vec<(String, u64)>,
    /// Devices without `DMA_LOGGING` support: their DMA writes are NOT in any report, so the
    /// VMM must track them otherwise (or treat the memory they can reach as always dirty).
    pub untracked: Vec<String>,
}

/// The dirty log of one range, as one bit per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The range.
    pub range: IovaRange,
    /// Bytes per bit.
    pub page_size: u64,
    /// Bit `i` (bit `i % 64` of word `i / 64`) covers `range.iova + i * page_size`.
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    fn new(range: IovaRange, page_size: u64) -> DirtyBitmap {
        let pages = range.length.div_ceil(page_size);
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        DirtyBitmap {
            range,
            page_size,
            bits: vec![0; words],
        }
    }

    /// Pages in the range.
    pub fn pages(&self) -> u64 {
        self.range.length.div_ceil(self.page_size)
    }

    /// The IOVA of every dirty page, in order.
    pub fn dirty_iovas(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages();
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                while rest != 0 {
                    let bit = w as u64 * 64 + u64::from(rest.trailing_zeros());
                    rest &= rest - 1;
                    if bit < pages {
                        return Some(self.range.iova + bit * self.page_size);
                    }
                }
                None
            })
        })
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.dirty_iovas().count() as u64
    }

    /// Whether the page holding `iova` is dirty (false outside the range).
    pub fn is_dirty(&self, iova: u64) -> bool {
        let Some(off) = iova
            .checked_sub(self.range.iova)
            .filter(|&o| o < self.range.length)
        else {
            return false;
        };
        let bit = off / self.page_size;
        let word = usize::try_from(bit / 64).unwrap_or(usize::MAX);
        self.bits
            .get(word)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Every page dirty (a report that failed: the uAPI says the log is then corrupt).
    fn set_all(&mut self) {
        let pages = self.pages();
        for (w, word) in self.bits.iter_mut().enumerate() {
            let first = w as u64 * 64;
            let n = pages.saturating_sub(first).min(64);
            *word = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        }
    }
}

/// One harvest of the devices' dirty logs, OR-ed over the devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyReport {
    /// Harvests delivered before this one.
    pub round: u64,
    /// The final harvest: every device is stopped and logging has stopped.
    pub last: bool,
    /// One bitmap per range, in the order of [`DirtyTracking::Export`]'s ranges.
    pub bitmaps: Vec<DirtyBitmap>,
    /// Devices whose REPORT failed in this harvest: their ranges are all marked dirty.
    pub failed_reports: u32,
}

impl DirtyReport {
    /// Dirty pages over every range.
    pub fn count(&self) -> u64 {
        self.bitmaps.iter().map(DirtyBitmap::count).sum()
    }
}

/// What logging feeds.
enum Mode {
    Ship,
    Export {
        sink: Arc<dyn DirtySink>,
        page_size: u64,
        /// Reused for every harvest, so memory does not grow with the number of harvests.
        report: DirtyReport,
    },
}

/// Dirty logging over the devices of one run.
pub(crate) struct DirtyLog {
    ranges: Vec<IovaRange>,
    /// Devices with logging on, and the page size each chose.
    logging: Vec<(usize, u64)>,
    mode: Mode,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("ranges", &self.ranges.len())
            .field("logging", &self.logging)
            .field("exports", &self.exports())
            .finish()
    }
}

fn device_err<D: MigrationDevice>(d: &D, source: DeviceError) -> PipelineError {
    PipelineError::Device {
        device: d.name().to_owned(),
        phase: Phase::Setup,
        source,
    }
}

impl DirtyLog {
    /// Starts logging on every device that supports it (`None` when tracking is off). In
    /// Export mode the ranges are checked first and the sink is told who logs.
    pub(crate) fn start<D: MigrationDevice>(
        tracking: &DirtyTracking,
        devices: &mut [D],
    ) -> Result<Option<DirtyLog>, PipelineError> {
        let (ranges, hint, mode) = match tracking {
            DirtyTracking::Off => return Ok(None),
            DirtyTracking::ShipPages { memory, .. } => (memory.ranges(), GUEST_PAGE, Mode::Ship),
            DirtyTracking::Export {
                ranges,
                page_size,
                sink,
            } => {
                tracking.check()?;
                let report = DirtyReport {
                    round: 0,
                    last: false,
                    bitmaps: ranges
                        .iter()
                        .map(|&r| DirtyBitmap::new(r, *page_size))
                        .collect(),
                    failed_reports: 0,
                };
                let mode = Mode::Export {
                    sink: sink.clone(),
                    page_size: *page_size,
                    report,
                };
                (ranges.clone(), *page_size, mode)
            }
        };
        let mut logging = Vec::new();
        let mut untracked = Vec::new();
        for (i, d) in devices.iter_mut().enumerate() {
            match d.dma_logging_start(&ranges, hint) {
                Ok(page_size) => logging.push((i, page_size)),
                Err(DeviceError::Unsupported { .. }) => untracked.push(d.name().to_owned()),
                Err(source) => {
                    let err = device_err(d, source);
                    for &(j, _) in &logging {
                        if let Some(d) = devices.get_mut(j) {
                            // Undo what was started; a failed STOP changes nothing here.
                            let _ = d.dma_logging_stop();
                        }
                    }
                    return Err(err);
                }
            }
        }
        if let Mode::Export {
            sink, page_size, ..
        } = &mode
        {
            sink.logging_started(&LoggingStarted {
                ranges: ranges.clone(),
                page_size: *page_size,
                tracked: logging
                    .iter()
                    .map(|&(i, ps)| (devices[i].name().to_owned(), ps))
                    .collect(),
                untracked,
            });
        }
        Ok(Some(DirtyLog {
            ranges,
            logging,
            mode,
        }))
    }

    /// Whether the reports go to the VMM (Export) rather than into `DirtyPages` frames.
    pub(crate) fn exports(&self) -> bool {
        matches!(self.mode, Mode::Export { .. })
    }

    /// Every page of guest memory (ShipPages' full copy).
    pub(crate) fn all_runs(&self) -> Vec<Run> {
        self.ranges
            .iter()
            .map(|r| (r.iova, r.length / GUEST_PAGE))
            .collect()
    }

    /// ShipPages: reads and clears every device's log into page runs. A report that fails
    /// makes its whole range dirty (the uAPI says to treat the log as corrupt).
    pub(crate) fn collect_runs<D: MigrationDevice>(&mut self, devices: &mut [D]) -> Vec<Run> {
        let mut runs = Vec::new();
        for &(i, page_size) in &self.logging {
            let Some(d) = devices.get_mut(i) else {
                continue;
            };
            for &r in &self.ranges {
                let mut bitmap = DirtyBitmap::new(r, page_size);
                match d.dma_logging_report(r.iova, r.length, page_size, &mut bitmap.bits) {
                    Ok(()) => bitmap_runs(r, page_size, &bitmap.bits, &mut runs),
                    Err(_) => runs.push((r.iova, r.length / GUEST_PAGE)),
                }
            }
        }
        merge_runs(runs)
    }

    /// Export, during pre-copy: harvests every device's log and hands it to the sink when a
    /// page is dirty.
    pub(crate) fn export<D: MigrationDevice>(&mut self, devices: &mut [D]) {
        if self.harvest(devices) {
            self.deliver(false);
        }
    }

    /// Ends logging: the final harvest (every device is stopped), then STOP on every device
    /// that logs, then, in Export mode, the last report. Returns the final runs in ShipPages
    /// mode (empty in Export mode).
    pub(crate) fn finish<D: MigrationDevice>(mut self, devices: &mut [D]) -> Vec<Run> {
        let runs = if self.exports() {
            self.harvest(devices);
            Vec::new()
        } else {
            self.collect_runs(devices)
        };
        Self::stop_all(&self.logging, devices);
        self.deliver(true);
        runs
    }

    /// Export: REPORT of every range of every logging device into the reused bitmaps (REPORT
    /// only sets bits, so the devices' logs are OR-ed). Returns whether a page is dirty.
    fn harvest<D: MigrationDevice>(&mut self, devices: &mut [D]) -> bool {
        let Mode::Export {
            page_size, report, ..
        } = &mut self.mode
        else {
            return false;
        };
        for b in &mut report.bitmaps {
            b.bits.fill(0);
        }
        report.failed_reports = 0;
        for &(i, _) in &self.logging {
            let Some(d) = devices.get_mut(i) else {
                continue;
            };
            let mut failed = false;
            for b in &mut report.bitmaps {
                let r = b.range;
                if d.dma_logging_report(r.iova, r.length, *page_size, &mut b.bits)
                    .is_err()
                {
                    b.set_all();
                    failed = true;
                }
            }
            report.failed_reports += u32::from(failed);
        }
        report
            .bitmaps
            .iter()
            .any(|b| b.bits.iter().any(|&w| w != 0))
    }

    fn deliver(&mut self, last: bool) {
        if let Mode::Export { sink, report, .. } = &mut self.mode {
            report.last = last;
            sink.dirty(report);
            report.round += 1;
        }
    }

    fn stop_all<D: MigrationDevice>(logging: &[(usize, u64)], devices: &mut [D]) {
        for &(i, _) in logging {
            if let Some(d) = devices.get_mut(i) {
                // Logging ends with the devices' stop anyway; a failed STOP loses nothing.
                let _ = d.dma_logging_stop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_reads_back_the_pages_its_bits_name_and_set_all_stops_at_the_range_end() {
        let r = IovaRange {
            iova: 0x10_0000,
            length: 70 * 4096,
        };
        let mut b = DirtyBitmap::new(r, 4096);
        assert_eq!(b.bits.len(), 2);
        b.bits[0] = 0b101;
        b.bits[1] = 1 << 5;
        let got: Vec<u64> = b.dirty_iovas().collect();
        assert_eq!(got, [0x10_0000, 0x10_2000, 0x10_0000 + 69 * 4096]);
        assert!(b.is_dirty(0x10_2fff));
        assert!(!b.is_dirty(0x10_1000));
        assert!(!b.is_dirty(0x0f_f000), "below the range");
        assert!(!b.is_dirty(0x10_0000 + 70 * 4096), "past the range");
        b.set_all();
        assert_eq!(b.count(), 70);
        assert_eq!(b.bits[1], (1 << 6) - 1);
    }
}
