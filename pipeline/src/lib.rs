//! # vfmig-pipeline: moves device state from a source data fd to a destination data fd
//!
//! Owns: the io_uring data-fd reader and writer, the codec stage, the sessions a VMM drives
//! ([`SourceSession`], [`DestinationSession`]), the multi-device RUNNING_P2P ordering, rollback
//! and reports. Never touches: the wire format (vfmig-wire) or socket handling
//! (vfmig-transport); device ioctls stay behind [`vfmig_vfio::MigrationDevice`].
//!
//! Data in (source): each device's data fd, read with io_uring `ReadFixed` at offset -1 into the
//! transport's registered [`vfmig_transport::BufPool`]. Data out (source): frames handed to
//! [`vfmig_transport::SendSession::send`] in per-device sequence order. On the destination the
//! reverse: verified frames from [`vfmig_transport::RecvSession::recv`], decoded, written with
//! `WriteFixed` at offset -1 into each RESUMING data fd.
//!
//! ```text
//! reader (1 thread, 1 ring, 1 read in flight per fd) -> codec workers -> sender (resequence)
//!        -> transport ... transport -> receiver -> codec workers -> writer (resequence, 1 ring)
//! ```
//!
//! `unsafe` lives only in the `uring` module (submissions referencing pool buffers).

mod api;
mod codec;
mod destination;
mod error;
mod reader;
mod reseq;
mod source;
mod stages;
mod stats;
mod uring;
mod writer;

#[cfg(test)]
mod flow_tests;

pub use api::{
    CancelHandle, DestinationOptions, DeviceProgress, DeviceReport, Progress, ProgressFn, Report,
    RollbackAction, RollbackStep, SourceOptions, Stage, StageTimes,
};
pub use codec::{Compress, DecodeFailure};
pub use destination::DestinationSession;
pub use error::{AbortReason, Phase, PipelineError};
pub use reseq::SequenceError;
pub use source::SourceSession;
