//! Bringing devices back after a failure: the source walks its devices back to RUNNING, the
//! destination resets its own (docs/PROTOCOL.md, section 5.1 says which, when).

use std::os::fd::OwnedFd;

use vfmig_vfio::{DeviceState, MigrationDevice};

use crate::api::{RollbackAction, RollbackStep};
use crate::error::{Phase, PipelineError};

/// `set_state` with the error carrying the device and the phase.
pub(crate) fn set_state<D: MigrationDevice>(
    d: &mut D,
    target: DeviceState,
    phase: Phase,
) -> Result<Option<OwnedFd>, PipelineError> {
    d.set_state(target).map_err(|source| PipelineError::Device {
        device: d.name().to_owned(),
        phase,
        source,
    })
}

/// Walks one device back to RUNNING.
pub(crate) fn roll_back_one<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    let action = match from {
        Some(DeviceState::Running) => RollbackAction::AlreadyRunning,
        // Aborting RESUMING needs a device reset (uAPI): walking RESUMING -> STOP would ask the
        // device to validate a partial stream (and a file sink to commit it).
        Some(DeviceState::Resuming) => reset(d, from),
        Some(state) if state != DeviceState::Error => match d.set_state(DeviceState::Running) {
            Ok(_) => RollbackAction::Walked { from: state },
            Err(_) => reset(d, from),
        },
        _ => reset(d, from),
    };
    RollbackStep { device, action }
}

/// Destination failure: every device that may hold (part of) the migrated state is reset, never
/// walked to RUNNING: once the migration failed the source keeps running with its own state, and
/// a destination device must not run with a copy the source did not commit to (nor validate a
/// partial one).
pub(crate) fn reset_one<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    let action = match from {
        Some(DeviceState::Running) => RollbackAction::AlreadyRunning,
        _ => reset(d, from),
    };
    RollbackStep { device, action }
}

/// After a commit whose resume failed: every device is reset, a RUNNING one too (it may run the
/// migrated state), so that the source may run again.
pub(crate) fn reset_committed<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    RollbackStep {
        device,
        action: reset(d, from),
    }
}

fn reset<D: MigrationDevice>(d: &mut D, from: Option<DeviceState>) -> RollbackAction {
    match d.reset() {
        Ok(()) => match d.state() {
            Ok(DeviceState::Running) => RollbackAction::Reset { from },
            Ok(_) => match d.set_state(DeviceState::Running) {
                Ok(_) => RollbackAction::Reset { from },
                Err(error) => RollbackAction::Failed { from, error },
            },
            Err(error) => RollbackAction::Failed { from, error },
        },
        Err(error) => RollbackAction::Failed { from, error },
    }
}
