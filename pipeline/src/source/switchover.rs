//! The switchover and after: pre-copy ends, the devices quiesce in the RUNNING_P2P order and
//! enter STOP_COPY, and each device whose stream is out and prepared on the destination steps to
//! STOP. Also opens a device's data stream for the reader.

use std::sync::Arc;
use std::time::Instant;

use vfmig_vfio::{DeviceState, MigrationCaps, MigrationDevice};

use super::{dev_index, Active, SourceSession};
use crate::error::{Phase, PipelineError};
use crate::reader::{ReadMode, ReaderCmd};
use crate::rollback::set_state;

impl<D: MigrationDevice> SourceSession<D> {
    /// The switchover: pre-copy ends, the devices quiesce (P2P order) and enter STOP_COPY.
    pub(super) fn switch(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        let all_p2p = self
            .devices
            .iter()
            .all(|d| d.capabilities().contains(MigrationCaps::P2P));
        let multi = self.devices.len() > 1;
        if a.precopy {
            for i in 0..self.devices.len() {
                a.stages.cmd(ReaderCmd::EndPreCopy {
                    device: dev_index(i),
                })?;
            }
            while !a.runs.iter().all(|r| r.quiesced) {
                self.tick(a)?;
            }
            if multi && all_p2p {
                // RUNNING_P2P rule: every device stops initiating P2P before any stops.
                for d in &mut self.devices {
                    set_state(d, DeviceState::PreCopyP2p, Phase::PreCopy)?;
                }
            }
            a.downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                let fd = set_state(d, DeviceState::StopCopy, Phase::StopCopy)?.map(Arc::new);
                if let Some(fd) = &fd {
                    a.runs[i].data_fd = Some(fd.clone());
                }
                a.stages.cmd(ReaderCmd::StopCopy {
                    device: dev_index(i),
                    fd,
                })?;
            }
        } else {
            if multi && all_p2p {
                for d in &mut self.devices {
                    set_state(d, DeviceState::RunningP2p, Phase::StopCopy)?;
                }
            }
            a.downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                open_stream(d, i, a, ReadMode::StopCopy)?;
            }
        }
        if let Some(t) = a.tracker.take() {
            // Every device is stopped: no more DMA. The final report closes the dirty log.
            if self.opts.dirty_tracking.full_copy() && !a.precopy {
                a.stages.pages(t.all_runs(), false)?;
            }
            let exports = t.exports();
            let last = t.finish(&mut self.devices);
            if !exports {
                a.stages.pages(last, true)?;
            }
        }
        for r in &mut a.runs {
            r.initial_bytes = 0;
        }
        a.watch.progressed();
        self.enter(a, Phase::StopCopy);
        Ok(())
    }

    /// One step after the switchover: a device whose stream is read and prepared on the
    /// destination leaves STOP_COPY for STOP.
    pub(super) fn step_stop_copy(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        self.tick(a)?;
        for (i, d) in self.devices.iter_mut().enumerate() {
            let r = &mut a.runs[i];
            if let (Some(sent), Some(acked), false) = (r.ended, r.acked, r.stopped) {
                if sent != acked {
                    return Err(PipelineError::LengthMismatch {
                        device: dev_index(i),
                        declared: sent,
                        received: acked,
                    });
                }
                set_state(d, DeviceState::Stop, Phase::Acknowledge)?;
                r.data_fd = None;
                r.stopped = true;
            }
        }
        Ok(())
    }
}

/// Moves device `i` from RUNNING (or RUNNING_P2P) to PRE_COPY or STOP_COPY (per `mode`) and hands
/// its data fd to the reader.
pub(super) fn open_stream<D: MigrationDevice>(
    d: &mut D,
    i: usize,
    a: &mut Active,
    mode: ReadMode,
) -> Result<(), PipelineError> {
    let (state, phase) = match mode {
        ReadMode::PreCopy => (DeviceState::PreCopy, Phase::PreCopy),
        ReadMode::StopCopy => (DeviceState::StopCopy, Phase::StopCopy),
    };
    let fd = set_state(d, state, phase)?.ok_or_else(|| PipelineError::NoDataFd {
        device: d.name().to_owned(),
        state,
    })?;
    let fd = Arc::new(fd);
    a.runs[i].data_fd = Some(fd.clone());
    a.stages.cmd(ReaderCmd::Add {
        device: dev_index(i),
        fd,
        mode,
    })
}
