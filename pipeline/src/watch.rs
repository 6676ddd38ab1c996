//! Pacing of the control loops: throughput over the recent past, the downtime test, the
//! inactivity timeout and the progress interval.

use std::time::{Duration, Instant};

use crate::api::SourceOptions;
use crate::error::{Phase, PipelineError};

/// Raw throughput over the recent past.
#[derive(Debug)]
pub(crate) struct RateMeter {
    last: Instant,
    last_raw: u64,
    pub(crate) bps: f64,
}

impl RateMeter {
    pub(crate) fn new(raw: u64) -> RateMeter {
        RateMeter {
            last: Instant::now(),
            last_raw: raw,
            bps: 0.0,
        }
    }

    pub(crate) fn sample(&mut self, raw: u64) -> f64 {
        let dt = self.last.elapsed().as_secs_f64();
        if dt > 0.0 {
            let now = raw.saturating_sub(self.last_raw) as f64 / dt;
            // Only samples with data count: an idle pre-copy says nothing about the link.
            if now > 0.0 {
                self.bps = if self.bps == 0.0 {
                    now
                } else {
                    self.bps * 0.7 + now * 0.3
                };
            }
        }
        self.last = Instant::now();
        self.last_raw = raw;
        self.bps
    }
}

/// Whether sending `bytes` at `bps` takes at most `budget`. `bytes` comes from the devices
/// (`stop_copy_size`, `dirty_bytes`): a time too large for a [`Duration`] does not fit.
pub(crate) fn fits_downtime(bytes: u64, bps: f64, budget: Duration) -> bool {
    bytes == 0
        || (bps > 0.0 && Duration::try_from_secs_f64(bytes as f64 / bps).is_ok_and(|t| t <= budget))
}

/// Inactivity timeout and progress pacing.
#[derive(Debug)]
pub(crate) struct Watch {
    pub started: Instant,
    last_progress: Instant,
    last_raw: u64,
    last_report: Instant,
    interval: Duration,
}

impl Watch {
    pub(crate) fn new(started: Instant, opts: &SourceOptions) -> Watch {
        Watch::with_interval(started, opts.progress_interval)
    }

    pub(crate) fn with_interval(started: Instant, interval: Duration) -> Watch {
        Watch {
            started,
            last_progress: Instant::now(),
            last_raw: 0,
            last_report: Instant::now(),
            interval,
        }
    }

    pub(crate) fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Fails when neither bytes nor events moved for `timeout`.
    pub(crate) fn check(
        &mut self,
        raw: u64,
        phase: Phase,
        timeout: Duration,
    ) -> Result<(), PipelineError> {
        if raw != self.last_raw {
            self.last_raw = raw;
            self.progressed();
        }
        if self.last_progress.elapsed() > timeout {
            return Err(PipelineError::Timeout {
                phase,
                what: "progress of the migration",
                waited: timeout,
            });
        }
        Ok(())
    }

    pub(crate) fn progress_due(&mut self) -> bool {
        if self.last_report.elapsed() >= self.interval {
            self.last_report = Instant::now();
            true
        } else {
            false
        }
    }
}
