//! Typed errors of the VFIO layer. Variants carry the facts (operation, states, errno); only the CLI
//! turns them into one-line messages. [`FsmError`] lives beside the FSM in [`crate::state`] and is
//! re-exported here.

use std::io;

use crate::dma::DmaLoggingError;
pub use crate::state::FsmError;
use crate::state::{DeviceState, Transition};

/// An error from a [`crate::MigrationDevice`] operation.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The requested transition is not legal for this device.
    #[error(transparent)]
    Fsm(#[from] FsmError),
    /// One SET along the path failed. The device may be anywhere on the path; `now` is the state
    /// read back after the failure, when it could be read.
    #[error("device {device}: {arc} (on the way to {target}) failed: {source}")]
    SetState {
        /// Device name.
        device: String,
        /// The arc whose SET failed.
        arc: Transition,
        /// The final target of the walk.
        target: DeviceState,
        /// The state read back after the failure, if it could be read.
        now: Option<DeviceState>,
        /// The errno of the SET.
        #[source]
        source: io::Error,
    },
    /// An ioctl or feature call failed.
    #[error("device {device}: {op} failed: {source}")]
    Ioctl {
        /// Device name.
        device: String,
        /// The operation, spelled as in vfio.h (e.g. `VFIO_MIG_GET_PRECOPY_INFO`).
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The operation is not valid in the device's current state (e.g. precopy info outside
    /// PRE_COPY, a read before STOP_COPY).
    #[error("device {device}: {op} is not valid in state {state}")]
    WrongState {
        /// Device name.
        device: String,
        /// The operation.
        op: &'static str,
        /// The state the device is in.
        state: DeviceState,
    },
    /// The device lacks a capability or optional feature the operation needs.
    #[error("device {device}: {op} needs {feature}, which the device does not support")]
    Unsupported {
        /// Device name.
        device: String,
        /// The operation.
        op: &'static str,
        /// The missing capability or feature, spelled as in vfio.h.
        feature: &'static str,
    },
    /// Bad arguments to, or misuse of, device DMA dirty logging.
    #[error("device {device}: {source}")]
    DmaLogging {
        /// Device name.
        device: String,
        /// What was wrong.
        #[source]
        source: DmaLoggingError,
    },
    /// Opening or resolving the device failed (path, group, container).
    #[error("opening VFIO device {path}: {what}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The fd given is not a VFIO device with migration support.
    #[error("{path} is not a VFIO device: {reason}")]
    NotVfio {
        /// The path or fd description.
        path: String,
        /// Why.
        reason: String,
    },
}

impl DeviceError {
    /// The errno behind this error, if it came from the kernel (or an emulation of it).
    pub fn errno(&self) -> Option<i32> {
        match self {
            DeviceError::SetState { source, .. }
            | DeviceError::Ioctl { source, .. }
            | DeviceError::Open { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
