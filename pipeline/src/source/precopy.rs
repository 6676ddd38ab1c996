//! Pre-copy: throughput and dirty-log sampling, `precopy_info`, the initial-data markers, and
//! the automatic switchover decision (downtime budget, switchover-ack, convergence,
//! `max_precopy`).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use vfmig_vfio::MigrationDevice;

use super::{dev_index, Active, DevRun, SourceSession};
use crate::api::PrecopyLimit;
use crate::error::{Phase, PipelineError};
use crate::reader::ReaderCmd;
use crate::stats::DeviceCounters;
use crate::watch::{fits_downtime, RateMeter};

/// How often pre-copy throughput is measured and the dirty guest-page log is read
/// (`precopy_info` is read every control tick).
pub(super) const PRECOPY_SAMPLE: Duration = Duration::from_millis(50);

/// Pre-copy sampling and the automatic switchover decision.
#[derive(Debug)]
pub(super) struct PreCopyState {
    pub(super) begun: Instant,
    pub(super) last_sample: Instant,
    pub(super) rate: RateMeter,
    pub(super) bps: f64,
    /// Total raw bytes when `initial_bytes` reached 0 on every device.
    pub(super) initial_done_at: Option<u64>,
    /// When the initial data was out and the acks were still missing.
    pub(super) ack_wait_since: Option<Instant>,
    pub(super) due: bool,
}

impl<D: MigrationDevice> SourceSession<D> {
    /// Pre-copy: samples throughput and the dirty log, reads `precopy_info`, marks the end of
    /// each device's initial data, and decides whether the automatic switchover is due: the
    /// initial data is out and acknowledged, and the estimated STOP_COPY time fits the downtime
    /// budget (or pre-copy does not converge, or has run for `max_precopy`).
    pub(super) fn sample_precopy(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        if a.pre.last_sample.elapsed() >= PRECOPY_SAMPLE {
            a.pre.last_sample = Instant::now();
            a.pre.bps = a.pre.rate.sample(a.stages.counters.total_raw());
            for (r, c) in a.runs.iter_mut().zip(&a.stages.counters.devices) {
                r.rate.sample(DeviceCounters::load(&c.raw));
            }
            // The next dirty log is read only once the reader has shipped the last batch:
            // until then the device's log keeps collecting (a page dirtied again is sent
            // once), and batches never pile up faster than the pipeline ships them.
            match a.tracker.as_mut() {
                Some(t) if t.exports() => t.export(&mut self.devices),
                Some(t) if a.stages.pages_idle() => {
                    let dirty = t.collect_runs(&mut self.devices);
                    if !dirty.is_empty() {
                        a.stages.pages(dirty, false)?;
                    }
                }
                _ => {}
            }
        }
        let mut initial_left = 0u64;
        let mut dirty = 0u64;
        let mut stop_copy = 0u64;
        for (i, d) in self.devices.iter_mut().enumerate() {
            let r = &mut a.runs[i];
            let Some(fd) = r.data_fd.clone() else {
                continue;
            };
            let info = d
                .precopy_info(fd.as_fd())
                .map_err(|source| PipelineError::Device {
                    device: d.name().to_owned(),
                    phase: Phase::PreCopy,
                    source,
                })?;
            if self.initial.observe(i, &info) {
                // New initial data (REINIT): it is read in PRE_COPY again, re-sending it is not a
                // sign of non-convergence, and the destination acknowledges it again.
                a.pre.initial_done_at = None;
                r.initial_marked = false;
            }
            // Sizes are device data: a huge one must not overflow the sums.
            initial_left = initial_left.saturating_add(info.initial_bytes);
            dirty = dirty.saturating_add(info.dirty_bytes);
            let size = d.stop_copy_size().ok();
            stop_copy = stop_copy.saturating_add(size.unwrap_or(info.dirty_bytes));
            r.initial_bytes = info.initial_bytes;
            r.dirty_bytes = info.dirty_bytes;
            r.stop_copy_bytes = size;
            r.estimate = Some(
                DeviceCounters::load(&a.stages.counters.devices[i].raw)
                    .saturating_add(size.unwrap_or(info.dirty_bytes)),
            );
            if info.initial_bytes == 0 && !r.initial_marked {
                // Every initial byte was read from the fd: the destination acks once it has
                // loaded them (docs/PROTOCOL.md, `InitialDataSent`).
                r.initial_marked = true;
                r.marks += 1;
                a.stages.cmd(ReaderCmd::MarkInitial {
                    device: dev_index(i),
                })?;
            }
        }
        let over_time = a.pre.begun.elapsed() >= self.opts.max_precopy;
        let fits = |bytes: u64| fits_downtime(bytes, a.pre.bps, self.opts.max_downtime);
        // Switch when STOP_COPY fits the downtime budget, or when what pre-copy could still
        // drain (`dirty_bytes`) would fit it: more pre-copy cannot shrink the rest.
        let within_budget = initial_left == 0 && (fits(stop_copy) || fits(dirty));
        // The abort is about the downtime estimate itself (STOP_COPY bytes at the measured rate).
        let estimate_fits = initial_left == 0 && fits(stop_copy);
        if over_time && !estimate_fits && self.opts.on_max_precopy == PrecopyLimit::Abort {
            return Err(PipelineError::PrecopyTooLong {
                limit: self.opts.max_precopy,
            });
        }
        if initial_left > 0 {
            // `initial_bytes` must reach 0 before PRE_COPY is left (uAPI).
            a.pre.due = false;
            // Initial data to send again (a REINIT): the wait for its ack starts once it is out.
            a.pre.ack_wait_since = None;
            return Ok(());
        }
        if !a.runs.iter().all(DevRun::switchover_acked) {
            // Never before the destination loaded the initial data (switchover-ack); bounded.
            let since = *a.pre.ack_wait_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.opts.timeout {
                return Err(PipelineError::Timeout {
                    phase: Phase::PreCopy,
                    what: "the destination's switchover-ack",
                    waited: self.opts.timeout,
                });
            }
            a.pre.due = false;
            return Ok(());
        }
        a.pre.ack_wait_since = None;
        // Re-sending more than twice what STOP_COPY would send means the devices dirty state
        // faster than it can be sent: pre-copy does not converge, stop it.
        let raw = a.stages.counters.total_raw();
        let resent = raw - *a.pre.initial_done_at.get_or_insert(raw);
        let not_converging = resent > stop_copy.saturating_mul(2);
        a.pre.due = within_budget || not_converging || over_time;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::fits_downtime;

    #[test]
    fn downtime_check_of_a_device_reporting_a_huge_state_size_does_not_panic() {
        let budget = std::time::Duration::from_millis(300);
        assert!(!fits_downtime(u64::MAX, 1.0, budget));
        assert!(!fits_downtime(u64::MAX, 1e-3, budget));
        assert!(fits_downtime(100, 1000.0, budget));
        assert!(fits_downtime(0, 0.0, budget));
    }
}
