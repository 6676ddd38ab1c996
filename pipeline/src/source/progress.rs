//! What the source session tells the VMM: the [`SourceStatus`] snapshot of each step, the
//! progress callback's [`Progress`], and the final [`Report`].

use std::time::{Duration, Instant};

use vfmig_vfio::MigrationDevice;

use super::{Active, DevRun, SourceSession, Stages};
use crate::api::{DeviceProgress, Progress, Report};
use crate::error::Phase;
use crate::report::{build_report, describe};
use crate::stats::DeviceCounters;
use crate::status::{DeviceStatus, SourceStatus};

impl<D: MigrationDevice> SourceSession<D> {
    pub(super) fn snapshot(&self, a: &Active) -> SourceStatus {
        let bps = a.pre.bps;
        let time = |bytes: u64| {
            (bps > 0.0)
                .then(|| Duration::try_from_secs_f64(bytes as f64 / bps).ok())
                .flatten()
        };
        let left = |r: &DevRun| match a.phase {
            Phase::PreCopy => r.stop_copy_bytes.unwrap_or(r.dirty_bytes),
            _ => r.estimate.unwrap_or(0).saturating_sub(r.ended.unwrap_or(0)),
        };
        let devices: Vec<DeviceStatus> = self
            .devices
            .iter()
            .zip(&a.runs)
            .zip(&a.stages.counters.devices)
            .map(|((d, r), c)| DeviceStatus {
                name: d.name().to_owned(),
                initial_bytes: r.initial_bytes,
                dirty_bytes: r.dirty_bytes,
                stop_copy_bytes: r.stop_copy_bytes,
                raw_bytes: DeviceCounters::load(&c.raw),
                wire_bytes: DeviceCounters::load(&c.wire),
                rate_bps: r.rate.bps,
                estimated_stop_copy: time(left(r)),
                switchover_acked: r.switchover_acked(),
            })
            .collect();
        let total = a.runs.iter().map(left).fold(0, u64::saturating_add);
        SourceStatus {
            phase: a.phase,
            elapsed: a.started.elapsed(),
            precopy_elapsed: if a.precopy {
                a.pre.begun.elapsed()
            } else {
                Duration::ZERO
            },
            switchover_acked: a.runs.iter().all(DevRun::switchover_acked),
            switchover_due: a.pre.due,
            rate_bps: bps,
            estimated_downtime: time(total),
            devices,
        }
    }

    pub(super) fn progress(
        &self,
        stages: &Stages,
        runs: &[DevRun],
        phase: Phase,
        started: Instant,
    ) -> Progress {
        let elapsed = started.elapsed();
        let devices = self
            .devices
            .iter()
            .zip(runs)
            .zip(&stages.counters.devices)
            .map(|((d, r), c)| {
                let raw = DeviceCounters::load(&c.raw);
                DeviceProgress {
                    name: d.name().to_owned(),
                    phase: if r.stopped { Phase::Acknowledge } else { phase },
                    raw_bytes: raw,
                    wire_bytes: DeviceCounters::load(&c.wire),
                    rate_bps: raw as f64 / elapsed.as_secs_f64().max(1e-3),
                    estimated_total: r.ended.or(r.estimate),
                    done: r.stopped,
                }
            })
            .collect();
        Progress {
            elapsed,
            phase,
            devices,
        }
    }

    pub(super) fn report(
        &mut self,
        stages: &Stages,
        elapsed: Duration,
        downtime: Option<Duration>,
    ) -> Report {
        let workers = self.opts.codec_workers.clamp(1, 64);
        let mut report = build_report(
            &stages.counters,
            self.devices
                .iter_mut()
                .map(|d| (d.name().to_owned(), d.state().ok()))
                .collect(),
            elapsed,
            downtime,
            workers,
            &describe(stages.adaptive.current()),
        );
        self.initial.fill(&mut report.devices);
        report
    }
}
