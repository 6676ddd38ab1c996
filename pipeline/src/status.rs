//! What [`crate::SourceSession::status`] tells a VMM between the steps of a migration, in the
//! manner of QEMU's `info migrate`. Both structs are `#[non_exhaustive]`: fields are added as the
//! library learns more (PRE_COPY info v2, dirty-bitmap export), so a VMM reads them and never
//! builds them.

use std::time::Duration;

use crate::error::Phase;

/// One snapshot of a source session.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SourceStatus {
    /// Where the session is: `Setup` (connected, no pre-copy), `PreCopy`, `StopCopy` (after
    /// [`crate::SourceSession::switchover`]).
    pub phase: Phase,
    /// Time since [`crate::SourceSession::start`].
    pub elapsed: Duration,
    /// Time spent in pre-copy so far.
    pub precopy_elapsed: Duration,
    /// Per device, in session order.
    pub devices: Vec<DeviceStatus>,
    /// Raw bytes per second over the recent past (all devices).
    pub rate_bps: f64,
    /// The stop-copy time if the switchover happened now: what is left to send in STOP_COPY
    /// over `rate_bps`. `None` until a rate was measured.
    pub estimated_downtime: Option<Duration>,
    /// Every device's switchover-ack has arrived (the destination loaded its initial data).
    pub switchover_acked: bool,
    /// Whether the automatic mode ([`crate::SourceSession::run`]) would switch over now: the
    /// initial data is out, the acks are in, and the estimate fits `max_downtime` (or pre-copy
    /// does not converge, or `max_precopy` passed).
    pub switchover_due: bool,
}

/// One device of a [`SourceStatus`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeviceStatus {
    /// Device name.
    pub name: String,
    /// Initial pre-copy bytes still to read (uAPI `initial_bytes`; 0 outside pre-copy).
    pub initial_bytes: u64,
    /// Dirty bytes the device reports beyond the initial ones (uAPI `dirty_bytes`).
    pub dirty_bytes: u64,
    /// The device's estimate of its STOP_COPY size, when it gives one.
    pub stop_copy_bytes: Option<u64>,
    /// Raw state bytes read so far.
    pub raw_bytes: u64,
    /// Payload bytes on the wire so far.
    pub wire_bytes: u64,
    /// Raw bytes per second of this device over the recent past.
    pub rate_bps: f64,
    /// The stop-copy time of this device if the switchover happened now, at the session's
    /// current rate.
    pub estimated_stop_copy: Option<Duration>,
    /// The destination's switchover-ack for this device has arrived.
    pub switchover_acked: bool,
}
