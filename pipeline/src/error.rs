//! Typed pipeline errors: each variant names the device, the phase and the facts.

use std::fmt;
use std::io;
use std::time::Duration;

use vfmig_transport::{PoolError, TransportError};
use vfmig_vfio::{DeviceError, DeviceState, MigrationCaps};
use vfmig_wire::{AbortReason, Codec, FrameKind};

use crate::codec::DecodeFailure;
use crate::reseq::SequenceError;

/// Where a migration was when something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Connecting, agreeing on devices, checking capabilities.
    Setup,
    /// Streaming while the devices run.
    PreCopy,
    /// Streaming with the devices stopped.
    StopCopy,
    /// Destination: loading state into the RESUMING data fd and validating it.
    Resume,
    /// Waiting for the destination's acknowledgements (each device *prepared*).
    Acknowledge,
    /// The end of the session (docs/PROTOCOL.md, section 5.1): the source's decision and the
    /// destination's outcome.
    Commit,
    /// The session ended successfully.
    Done,
    /// Walking devices back after a failure.
    Rollback,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Setup => "setup",
            Phase::PreCopy => "pre-copy",
            Phase::StopCopy => "stop-copy",
            Phase::Resume => "resume",
            Phase::Acknowledge => "acknowledge",
            Phase::Commit => "commit",
            Phase::Done => "done",
            Phase::Rollback => "rollback",
        })
    }
}

/// A side of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that sends the state and decides commit or abort.
    Source,
    /// The side that loads the state and acts on the decision.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// A migration failed. Variants carry the device, the phase and the underlying error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A device operation (state change, precopy info, reset) failed.
    #[error("device {device} ({phase}): {source}")]
    Device {
        /// Device name.
        device: String,
        /// Phase.
        phase: Phase,
        /// The device error (arc, errno, state read back).
        #[source]
        source: DeviceError,
    },
    /// Reading the data fd failed.
    #[error("device {device}: reading the data fd at stream offset {offset} in {phase} failed: {source}")]
    Read {
        /// Device name.
        device: String,
        /// Phase.
        phase: Phase,
        /// Raw stream offset of the failed read.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Writing the RESUMING data fd failed.
    #[error("device {device}: writing the data fd at stream offset {offset} failed: {source}")]
    Write {
        /// Device name.
        device: String,
        /// Raw stream offset of the failed write.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Setting up or waiting on io_uring failed.
    #[error("io_uring {op} failed: {source}")]
    Uring {
        /// The operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A thread or codec context could not be created.
    #[error("could not create {what}: {source}")]
    Resource {
        /// What.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The transport failed (peer gone, timeout, corrupt frame, authentication...).
    #[error("transport ({phase}): {source}")]
    Transport {
        /// Phase.
        phase: Phase,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// No pool buffer came free in time.
    #[error("{stage}: {source}")]
    Pool {
        /// The stage that waited.
        stage: &'static str,
        /// The pool's error.
        #[source]
        source: PoolError,
    },
    /// A frame's payload could not be decoded.
    #[error("device {device}: frame {seq} ({codec:?}) could not be decoded: {failure}")]
    Decode {
        /// Device index.
        device: u16,
        /// Sequence number.
        seq: u64,
        /// The frame's codec.
        codec: Codec,
        /// What was wrong.
        failure: DecodeFailure,
    },
    /// Frames of a device arrived out of order (the transport should have restored it).
    #[error("device {device}: {source}")]
    Sequence {
        /// Device index.
        device: u16,
        /// What was wrong.
        #[source]
        source: SequenceError,
    },
    /// A frame of a kind or for a device that does not belong here.
    #[error("unexpected {kind:?} frame for device {device} in {phase}")]
    UnexpectedFrame {
        /// Kind.
        kind: FrameKind,
        /// Device index.
        device: u16,
        /// Phase.
        phase: Phase,
    },
    /// The stream's length at EndOfDevice differs from what was received.
    #[error("device {device}: the source sent {declared} bytes, {received} arrived")]
    LengthMismatch {
        /// Device index.
        device: u16,
        /// Total the source declared.
        declared: u64,
        /// Total received and written.
        received: u64,
    },
    /// The stream digest (docs/PROTOCOL.md, section 5) of what was written differs from the
    /// source's.
    #[error("device {device}: stream digest mismatch")]
    DigestMismatch {
        /// Device index.
        device: u16,
        /// The source's digest.
        expected: [u8; 32],
        /// The digest of what arrived.
        computed: [u8; 32],
    },
    /// The destination device refused its state (RESUMING -> STOP failed).
    #[error("destination device {device} refused the state: {source}")]
    DeviceRefused {
        /// Device name.
        device: String,
        /// The failed transition.
        #[source]
        source: DeviceError,
    },
    /// The peer aborted the migration.
    #[error("peer aborted in {phase}: {reason}: {detail}")]
    PeerAborted {
        /// Phase.
        phase: Phase,
        /// The reason (the wire's one vocabulary; unknown codes are `AbortReason::Unknown`).
        reason: AbortReason,
        /// The peer's detail text.
        detail: String,
    },
    /// Several devices, and one of them cannot do RUNNING_P2P.
    #[error("device {device} lacks P2P (capabilities {caps}); migrating several devices needs every device to support RUNNING_P2P (override with allow_without_p2p)")]
    P2pRequired {
        /// Device name.
        device: String,
        /// Its capabilities.
        caps: MigrationCaps,
    },
    /// A device is not in a state migration can start from.
    #[error("device {device} is in {state}; migration starts from {expected}")]
    WrongStartState {
        /// Device name.
        device: String,
        /// Its state.
        state: DeviceState,
        /// The state needed.
        expected: DeviceState,
    },
    /// The two sides do not agree on the devices.
    #[error("the source has {source_devices} devices, the destination {destination_devices}")]
    DeviceCount {
        /// Devices on the source.
        source_devices: usize,
        /// Devices on the destination.
        destination_devices: usize,
    },
    /// A device reached a state change without a data fd where one is needed.
    #[error("device {device}: entering {state} returned no data fd")]
    NoDataFd {
        /// Device name.
        device: String,
        /// The state entered.
        state: DeviceState,
    },
    /// Reading or writing guest memory for dirty pages failed.
    #[error("guest memory at {gpa:#x}: {source}")]
    Guest {
        /// Guest physical address (IOVA) of the access.
        gpa: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing happened within the configured timeout.
    #[error("timed out after {waited:?} in {phase} waiting for {what}")]
    Timeout {
        /// Phase.
        phase: Phase,
        /// What we waited for.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// The migration was cancelled through the [`crate::CancelHandle`].
    #[error("cancelled in {phase}")]
    Cancelled {
        /// Phase.
        phase: Phase,
    },
    /// Bad options.
    #[error("invalid option {what}: {value}")]
    Options {
        /// The option.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// Source: a data fd that is a regular file (a `file:` source) changed while it was read in
    /// STOP_COPY: its size or modification time differs from when STOP_COPY began. The stream
    /// would be neither the old file nor the new one, so it is refused before its `EndOfDevice`
    /// (the destination is told by an abort and discards what it received).
    #[error("device {device}: the file changed while it was read ({read} bytes read, size {size_before} when reading began, {size_after} at its end, modified: {modified})")]
    SourceChanged {
        /// Device name.
        device: String,
        /// Bytes read before the end of the file.
        read: u64,
        /// The file's size when STOP_COPY began.
        size_before: u64,
        /// Its size at the end of the read.
        size_after: u64,
        /// Its modification time changed.
        modified: bool,
    },
    /// Destination: the source closed every connection before the end of a device's stream
    /// (it exited, was killed or lost the network). Reported at once, not after a timeout.
    #[error("the source closed the session during {phase} before the end of device {device}'s stream (it exited, was killed or lost the network)")]
    SourceGone {
        /// What the source was sending: pre-copy or stop-copy data, or nothing yet (setup).
        phase: Phase,
        /// The first device whose stream had not ended.
        device: u16,
    },
    /// The decision of the session cannot be known on this side (docs/PROTOCOL.md, section
    /// 5.1). On the source: *commit* was sent, and the destination's outcome never arrived. On
    /// the destination: every device was prepared (and said so), and neither *commit* nor
    /// *abort* arrived. This side's devices are left in STOP holding a complete, valid copy of
    /// the state; nothing here resumes them or resets them. [`PipelineError::in_doubt_guidance`]
    /// says how to finish.
    #[error("in doubt ({side}): {cause}; this side's devices stay in STOP with valid state")]
    InDoubt {
        /// The side that reports.
        side: Side,
        /// What cut the session short (link lost, timeout, cancel, unknown outcome).
        #[source]
        cause: Box<PipelineError>,
    },
    /// The source committed, and the destination reported that it could not resume its devices:
    /// it reset them, so the source holds the only valid state and rolled back to RUNNING.
    #[error("the destination could not resume its devices after the commit; it reset them, and the source rolled back")]
    DestinationResumeFailed,
    /// A destination step that needs a committed session ([`crate::DestinationSession::resume`],
    /// [`crate::DestinationSession::finish`]) was called without one.
    #[error("no committed session: receive() must return Ok first")]
    NotCommitted,
    /// A step called out of order (e.g. `switchover` before `start`, `finish` before
    /// `switchover`, an in-doubt resolution without an in-doubt end). Nothing was changed.
    #[error("{step} is not valid now (phase {phase:?})")]
    WrongStep {
        /// The step called.
        step: &'static str,
        /// The session's phase, `None` when no session is in progress.
        phase: Option<Phase>,
    },
    /// Pre-copy reached `max_precopy` without the downtime estimate fitting `max_downtime`, and
    /// [`crate::PrecopyLimit::Abort`] was asked for.
    #[error("pre-copy ran for {limit:?} without the estimated downtime fitting max_downtime")]
    PrecopyTooLong {
        /// The limit.
        limit: Duration,
    },
    /// The destination sent an outcome code this version does not know (then in doubt).
    #[error("unknown outcome code {code} from the destination")]
    UnknownOutcome {
        /// The code.
        code: u16,
    },
    /// A stage thread stopped without reporting (a bug; reported rather than hung).
    #[error("the {stage} stage stopped unexpectedly")]
    StageLost {
        /// Which stage.
        stage: &'static str,
    },
}

impl PipelineError {
    /// For [`PipelineError::InDoubt`]: which side holds valid state and how to finish (one
    /// line). `None` for every other error.
    pub fn in_doubt_guidance(&self) -> Option<&'static str> {
        match self {
            PipelineError::InDoubt {
                side: Side::Source, ..
            } => Some(
                "the source sent commit: the destination holds a complete, validated copy and may \
                 already run it. Ask the destination: if it succeeded or is in doubt too, resume \
                 the guest there and discard the source; only if it failed (it reset its devices), \
                 roll the source back (its devices are stopped with their state intact)",
            ),
            PipelineError::InDoubt {
                side: Side::Destination,
                ..
            } => Some(
                "this destination holds a complete, validated copy in STOP and did not learn the \
                 decision. Ask the source: if it is in doubt too (it sent commit) or succeeded, \
                 resume the guest here; if it failed (it rolled back and runs), reset these devices",
            ),
            _ => None,
        }
    }

    /// The abort reason to tell the peer about this failure.
    pub fn abort_reason(&self, source_side: bool) -> AbortReason {
        match self {
            PipelineError::Cancelled { .. } => AbortReason::Cancelled,
            PipelineError::DeviceRefused { .. } => AbortReason::DeviceRefused,
            PipelineError::DeviceCount { .. } => AbortReason::DeviceMismatch,
            PipelineError::Decode { .. }
            | PipelineError::Sequence { .. }
            | PipelineError::LengthMismatch { .. }
            | PipelineError::DigestMismatch { .. } => AbortReason::Integrity,
            PipelineError::UnexpectedFrame { .. } => AbortReason::Protocol,
            PipelineError::Timeout { .. } => AbortReason::Timeout,
            PipelineError::Pool { .. } | PipelineError::Resource { .. } => AbortReason::Resources,
            PipelineError::StageLost { .. } => AbortReason::Internal,
            PipelineError::Transport { source, .. } => match source {
                TransportError::Corrupt { .. }
                | TransportError::Unauthentic { .. }
                | TransportError::Sealing { .. } => AbortReason::Integrity,
                TransportError::Timeout { .. } | TransportError::PeerSilent { .. } => {
                    AbortReason::Timeout
                }
                _ if source_side => AbortReason::SourceDevice,
                _ => AbortReason::DestinationDevice,
            },
            _ if source_side => AbortReason::SourceDevice,
            _ => AbortReason::DestinationDevice,
        }
    }
}
