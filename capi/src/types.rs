//! The plain C structs and enums of the API, and their conversions from the library's types.
//! Everything here is safe code; the FFI layer (`ffi.rs`) only moves these across the boundary.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use vfmig_pipeline::{
    Compress, DestinationOptions, DeviceReport, DeviceStatus, FinalOutcome, Phase, PrecopyLimit,
    Rate, Report, SourceOptions, SourceStatus, Stage,
};
use vfmig_transport::{AuthConfig, SessionConfig};
use vfmig_vfio::DeviceState;

use crate::error::CapiError;

/// Bytes of a device name in a status or report struct, NUL included (longer names are cut).
pub const VFMIG_NAME_MAX: usize = 64;
/// Bytes of the codec name in a report, NUL included.
pub const VFMIG_CODEC_MAX: usize = 16;

/// A device's migration state: the uAPI's `enum vfio_device_mig_state` values, plus
/// `VFMIG_DEVICE_STATE_UNKNOWN` where the state could not be read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigDeviceState {
    /// `VFIO_DEVICE_STATE_ERROR`.
    Error = 0,
    /// `VFIO_DEVICE_STATE_STOP`.
    Stop = 1,
    /// `VFIO_DEVICE_STATE_RUNNING`.
    Running = 2,
    /// `VFIO_DEVICE_STATE_STOP_COPY`.
    StopCopy = 3,
    /// `VFIO_DEVICE_STATE_RESUMING`.
    Resuming = 4,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P`.
    RunningP2p = 5,
    /// `VFIO_DEVICE_STATE_PRE_COPY`.
    PreCopy = 6,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P`.
    PreCopyP2p = 7,
    /// Not known (the device could not be asked).
    Unknown = 255,
}

impl From<Option<DeviceState>> for VfmigDeviceState {
    fn from(s: Option<DeviceState>) -> Self {
        match s {
            None => VfmigDeviceState::Unknown,
            Some(DeviceState::Error) => VfmigDeviceState::Error,
            Some(DeviceState::Stop) => VfmigDeviceState::Stop,
            Some(DeviceState::Running) => VfmigDeviceState::Running,
            Some(DeviceState::StopCopy) => VfmigDeviceState::StopCopy,
            Some(DeviceState::Resuming) => VfmigDeviceState::Resuming,
            Some(DeviceState::RunningP2p) => VfmigDeviceState::RunningP2p,
            Some(DeviceState::PreCopy) => VfmigDeviceState::PreCopy,
            Some(DeviceState::PreCopyP2p) => VfmigDeviceState::PreCopyP2p,
        }
    }
}

/// Which side a device is made for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigSide {
    /// The device's state is sent.
    Source = 0,
    /// The device receives state.
    Destination = 1,
}

/// Where a session is (the library's `Phase`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigPhase {
    /// Connected, devices agreed, no pre-copy yet.
    Setup = 0,
    /// Streaming while the devices run.
    PreCopy = 1,
    /// Streaming with the devices stopped (after `vfmig_source_switchover`).
    StopCopy = 2,
    /// Destination: loading and validating state.
    Resume = 3,
    /// Waiting for the destination's acknowledgements.
    Acknowledge = 4,
    /// The decision: commit sent, outcome awaited.
    Commit = 5,
    /// Ended successfully.
    Done = 6,
    /// Walking devices back after a failure.
    Rollback = 7,
}

impl From<Phase> for VfmigPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Setup => VfmigPhase::Setup,
            Phase::PreCopy => VfmigPhase::PreCopy,
            Phase::StopCopy => VfmigPhase::StopCopy,
            Phase::Resume => VfmigPhase::Resume,
            Phase::Acknowledge => VfmigPhase::Acknowledge,
            Phase::Commit => VfmigPhase::Commit,
            Phase::Done => VfmigPhase::Done,
            Phase::Rollback => VfmigPhase::Rollback,
        }
    }
}

/// What the destination did after the commit (docs/PROTOCOL.md, section 5.1). The values are
/// the wire codes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigOutcome {
    /// No outcome (yet).
    None = 0,
    /// Every destination device runs.
    Resumed = 1,
    /// Every destination device holds the state in STOP for its owner.
    Held = 2,
    /// Resuming failed; the destination reset its devices, the source may run again.
    ResumeFailed = 3,
    /// A code this version does not know.
    Unknown = 255,
}

impl From<Option<FinalOutcome>> for VfmigOutcome {
    fn from(o: Option<FinalOutcome>) -> Self {
        match o {
            None => VfmigOutcome::None,
            Some(FinalOutcome::Resumed) => VfmigOutcome::Resumed,
            Some(FinalOutcome::Held) => VfmigOutcome::Held,
            Some(FinalOutcome::ResumeFailed) => VfmigOutcome::ResumeFailed,
            Some(_) => VfmigOutcome::Unknown,
        }
    }
}

impl VfmigOutcome {
    /// The outcome a destination may report, from the integer the caller passed.
    pub(crate) fn final_from(raw: u32) -> Result<FinalOutcome, CapiError> {
        const RESUMED: u32 = VfmigOutcome::Resumed as u32;
        const HELD: u32 = VfmigOutcome::Held as u32;
        const RESUME_FAILED: u32 = VfmigOutcome::ResumeFailed as u32;
        match raw {
            RESUMED => Ok(FinalOutcome::Resumed),
            HELD => Ok(FinalOutcome::Held),
            RESUME_FAILED => Ok(FinalOutcome::ResumeFailed),
            _ => Err(CapiError::InvalidArgument {
                arg: "outcome",
                reason: "must be RESUMED, HELD or RESUME_FAILED",
            }),
        }
    }
}

/// The pipeline stage that limited a run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigStage {
    /// Reading (source) or writing (destination) the data fds.
    DataFd = 0,
    /// Compression or decompression.
    Codec = 1,
    /// The network.
    Network = 2,
}

/// How the source compresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigCompress {
    /// Chosen per chunk from measured link and codec throughput.
    Auto = 0,
    /// Never (all-zero chunks are still elided).
    None = 1,
    /// Always LZ4.
    Lz4 = 2,
    /// Always zstd at `zstd_level`.
    Zstd = 3,
}

/// What happens when pre-copy reached `max_precopy_ms` and the downtime estimate does not fit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigPrecopyLimit {
    /// `vfmig_source_status` reports `switchover_due` (the VMM decides; the report says whether
    /// `max_downtime_ms` was exceeded).
    Switchover = 0,
    /// The session fails with `VFMIG_CODE_PRECOPY_TOO_LONG` and rolls back.
    Abort = 1,
}

/// Transport settings shared by both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigTransportOptions {
    /// TCP connections (source: offered, 1..=16; destination: ignored). Default 1.
    pub connections: u32,
    /// Pre-shared key for mutual authentication, `psk_len` bytes, or NULL for none (allowed
    /// only from loopback unless `insecure`). Borrowed for the duration of the call that takes
    /// the options (the key is copied).
    pub psk: *const u8,
    /// Bytes at `psk` (at least 16 when `psk` is set).
    pub psk_len: usize,
    /// Allow unauthenticated connections with non-loopback peers.
    pub insecure: bool,
    /// Destination: how long `vfmig_destination_receive` waits for a source to connect (ms).
    /// Default 600000.
    pub accept_timeout_ms: u64,
}

/// An IOVA range of guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfmigIovaRange {
    /// Start IOVA (aligned to the page size of the export).
    pub iova: u64,
    /// Length in bytes (non-zero, aligned to the page size).
    pub length: u64,
}

/// What a `VfmigDirtyEvent` says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigDirtyKind {
    /// Logging is on: every page a tracked device writes from now on is in a report. Once,
    /// before any device leaves RUNNING.
    Started = 0,
    /// One harvest of the devices' dirty logs (read and cleared), OR-ed over the devices.
    Report = 1,
}

/// The dirty log of one range: bit `i` (bit `i % 64` of `bits[i / 64]`) covers the page at
/// `iova + i * page_size`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDirtyBitmap {
    /// Start of the range.
    pub iova: u64,
    /// Length of the range in bytes.
    pub length: u64,
    /// Bytes per bit.
    pub page_size: u64,
    /// `words` 64-bit words; valid only during the callback.
    pub bits: *const u64,
    /// Words at `bits`.
    pub words: usize,
}

/// One event of the dirty-page export, handed to `VfmigDirtyExport.callback`. Every pointer in
/// it is valid only until the callback returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDirtyEvent {
    /// `VFMIG_DIRTY_KIND_STARTED` or `VFMIG_DIRTY_KIND_REPORT`.
    pub kind: VfmigDirtyKind,
    /// Bytes per bit of the bitmaps.
    pub page_size: u64,
    /// STARTED: devices that log their DMA.
    pub tracked_devices: usize,
    /// STARTED: names of the devices without DMA logging: their DMA writes are in NO report, so
    /// the VMM must track them otherwise (or treat the memory they reach as always dirty).
    pub untracked_names: *const *const c_char,
    /// STARTED: entries at `untracked_names`.
    pub untracked_count: usize,
    /// REPORT: harvests delivered before this one.
    pub round: u64,
    /// REPORT: the final harvest: every device is stopped and logging has stopped. The VMM's
    /// final RAM pass starts after it and includes its pages.
    pub last: bool,
    /// REPORT: devices whose REPORT failed in this harvest (their ranges are all marked dirty).
    pub failed_reports: u32,
    /// REPORT: one bitmap per range, in the order of `VfmigDirtyExport.ranges`.
    pub bitmaps: *const VfmigDirtyBitmap,
    /// REPORT: entries at `bitmaps`.
    pub bitmap_count: usize,
}

/// A dirty-page export callback: `user` is `VfmigDirtyExport.user`; `event` and what it points
/// to are valid only during the call. It runs on the thread that called
/// `vfmig_source_status`, `vfmig_source_switchover` or `vfmig_source_finish`, inside that call:
/// keep it to merging the bitmaps into the VMM's own dirty tracking; it must not call back into
/// the same session.
pub type VfmigDirtyFn =
    Option<unsafe extern "C" fn(user: *mut c_void, event: *const VfmigDirtyEvent)>;

/// Device DMA dirty tracking handed to the VMM (the library's `DirtyTracking::Export`): vfmig
/// starts and stops `DMA_LOGGING` on the devices and hands every harvested log to `callback` as
/// one bitmap per range; the VMM merges them and ships the pages in its own RAM stream (the
/// ordering rule is in docs/DESIGN.md, "Device dirty pages"). `callback` NULL: off (the
/// default).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDirtyExport {
    /// The callback, or NULL for no export.
    pub callback: VfmigDirtyFn,
    /// Passed to `callback` untouched; the VMM's to keep valid while the session runs.
    pub user: *mut c_void,
    /// The IOVA ranges to log (at most 256, aligned to `page_size`, non-overlapping). Read
    /// during `vfmig_source_new` only (copied).
    pub ranges: *const VfmigIovaRange,
    /// Entries at `ranges`.
    pub range_count: usize,
    /// Bitmap granularity and `DMA_LOGGING` page size (a power of two, at least 4096). Default
    /// 4096.
    pub page_size: u64,
}

impl Default for VfmigDirtyExport {
    fn default() -> Self {
        VfmigDirtyExport {
            callback: None,
            user: std::ptr::null_mut(),
            ranges: std::ptr::null(),
            range_count: 0,
            page_size: 4096,
        }
    }
}

/// Source options: fill with `vfmig_source_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigSourceOptions {
    /// Use PRE_COPY when every device supports it. Default true.
    pub precopy: bool,
    /// The downtime budget (ms): `switchover_due` needs the estimate below it, and the report
    /// says whether the measured downtime exceeded it. Default 300.
    pub max_downtime_ms: u64,
    /// Longest pre-copy (ms) before `on_max_precopy` applies. Default 60000.
    pub max_precopy_ms: u64,
    /// A `VfmigPrecopyLimit` value (an integer, so that a bad value is refused rather than
    /// undefined). Default `VFMIG_PRECOPY_LIMIT_SWITCHOVER`.
    pub on_max_precopy: u32,
    /// Longest time without progress at any step (ms). Default 30000.
    pub timeout_ms: u64,
    /// Codec worker threads (1..=64). Default 2.
    pub codec_workers: u32,
    /// A `VfmigCompress` value. Default `VFMIG_COMPRESS_AUTO`.
    pub compress: u32,
    /// zstd level for `VFMIG_COMPRESS_ZSTD` (1..=19). Default 3.
    pub zstd_level: i32,
    /// Cap on wire bytes per second, 0 for none. Default 0.
    pub max_bandwidth_bps: u64,
    /// Migrate several devices even if some lack RUNNING_P2P. Default false.
    pub allow_without_p2p: bool,
    /// Transport settings.
    pub transport: VfmigTransportOptions,
    /// Device DMA dirty-page export to the VMM (off by default).
    pub dirty: VfmigDirtyExport,
}

/// Destination options: fill with `vfmig_destination_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDestinationOptions {
    /// Longest time without progress (ms); also how long the source waits for the outcome
    /// after its commit. Default 30000.
    pub timeout_ms: u64,
    /// Codec worker threads (1..=64). Default 2.
    pub codec_workers: u32,
    /// Accept several devices even if some lack RUNNING_P2P. Default false.
    pub allow_without_p2p: bool,
    /// Transport settings.
    pub transport: VfmigTransportOptions,
}

/// One snapshot of a source session (`vfmig_source_status`), in the manner of QEMU's
/// `info migrate`. Durations are in microseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigStatus {
    /// Where the session is.
    pub phase: VfmigPhase,
    /// Time since `vfmig_source_start`.
    pub elapsed_us: u64,
    /// Time in pre-copy so far.
    pub precopy_elapsed_us: u64,
    /// Raw bytes per second over the recent past (all devices).
    pub rate_bps: f64,
    /// Whether `estimated_downtime_us` is known (a rate was measured).
    pub has_estimated_downtime: bool,
    /// The stop-copy time if the switchover happened now.
    pub estimated_downtime_us: u64,
    /// Every device's switchover-ack arrived (the destination loaded its initial data).
    pub switchover_acked: bool,
    /// The automatic mode would switch over now: initial data out, acks in, the estimate fits
    /// `max_downtime_ms` (or pre-copy does not converge, or `max_precopy_ms` passed).
    pub switchover_due: bool,
    /// Devices in the session (entries beyond the caller's capacity were not written).
    pub device_count: usize,
}

/// One device of a `VfmigStatus`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDeviceStatus {
    /// Device name, NUL-terminated (cut to fit).
    pub name: [c_char; VFMIG_NAME_MAX],
    /// Initial pre-copy bytes still to read (uAPI `initial_bytes`; 0 outside pre-copy).
    pub initial_bytes: u64,
    /// Dirty bytes the device reports (uAPI `dirty_bytes`).
    pub dirty_bytes: u64,
    /// Whether `stop_copy_bytes` is known.
    pub has_stop_copy_bytes: bool,
    /// The device's estimate of its STOP_COPY size.
    pub stop_copy_bytes: u64,
    /// Raw state bytes read so far.
    pub raw_bytes: u64,
    /// Payload bytes on the wire so far.
    pub wire_bytes: u64,
    /// Raw bytes per second of this device over the recent past.
    pub rate_bps: f64,
    /// Whether `estimated_stop_copy_us` is known.
    pub has_estimated_stop_copy: bool,
    /// This device's stop-copy time if the switchover happened now.
    pub estimated_stop_copy_us: u64,
    /// The destination's switchover-ack for this device arrived.
    pub switchover_acked: bool,
}

/// The final report of a session. Durations are in microseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigReport {
    /// Raw state bytes over all devices.
    pub raw_bytes: u64,
    /// Payload bytes on the wire over all devices.
    pub wire_bytes: u64,
    /// `raw_bytes / wire_bytes` (1.0 when nothing moved).
    pub ratio: f64,
    /// Wall time of the session.
    pub elapsed_us: u64,
    /// Raw bytes per second over the session.
    pub throughput_bps: f64,
    /// Whether `downtime_us` is known (source only).
    pub has_downtime: bool,
    /// Source: from the first device leaving a running state to the destination's outcome.
    pub downtime_us: u64,
    /// Source: the measured downtime exceeded `max_downtime_ms`.
    pub max_downtime_exceeded: bool,
    /// What the destination did after the commit (source: as reported; destination: as sent).
    pub outcome: VfmigOutcome,
    /// The stage that limited the run.
    pub limiting_stage: VfmigStage,
    /// Compression in use at the end (`zstd:3`, `lz4`, `none`, `decode`), NUL-terminated.
    pub codec: [c_char; VFMIG_CODEC_MAX],
    /// Devices in the session (entries beyond the caller's capacity were not written).
    pub device_count: usize,
}

/// One device of a `VfmigReport`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VfmigDeviceReport {
    /// Device name, NUL-terminated (cut to fit).
    pub name: [c_char; VFMIG_NAME_MAX],
    /// Raw state bytes moved.
    pub raw_bytes: u64,
    /// Of those, bytes moved in PRE_COPY.
    pub precopy_bytes: u64,
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    /// `raw_bytes / wire_bytes`.
    pub ratio: f64,
    /// Chunks elided as all-zero.
    pub zero_chunks: u64,
    /// Chunks sent raw.
    pub raw_chunks: u64,
    /// Chunks sent compressed.
    pub compressed_chunks: u64,
    /// Bytes of dirty guest pages carried on this device's stream.
    pub guest_page_bytes: u64,
    /// Source: `MIG_PRECOPY_INFOv2` was in force for this device's pre-copy.
    pub precopy_info_v2: bool,
    /// Source: `VFIO_PRECOPY_INFO_REINIT` reports seen in pre-copy.
    pub precopy_reinits: u64,
    /// The device's state at the end.
    pub final_state: VfmigDeviceState,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Copies `s` into a fixed C string buffer, cut at a character boundary, always NUL-terminated.
fn fixed<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    for (o, b) in out.iter_mut().zip(&s.as_bytes()[..end]) {
        *o = c_char::from_ne_bytes([*b]);
    }
    out
}

impl From<&SourceStatus> for VfmigStatus {
    fn from(s: &SourceStatus) -> Self {
        VfmigStatus {
            phase: s.phase.into(),
            elapsed_us: micros(s.elapsed),
            precopy_elapsed_us: micros(s.precopy_elapsed),
            rate_bps: s.rate_bps,
            has_estimated_downtime: s.estimated_downtime.is_some(),
            estimated_downtime_us: s.estimated_downtime.map_or(0, micros),
            switchover_acked: s.switchover_acked,
            switchover_due: s.switchover_due,
            device_count: s.devices.len(),
        }
    }
}

impl From<&DeviceStatus> for VfmigDeviceStatus {
    fn from(d: &DeviceStatus) -> Self {
        VfmigDeviceStatus {
            name: fixed(&d.name),
            initial_bytes: d.initial_bytes,
            dirty_bytes: d.dirty_bytes,
            has_stop_copy_bytes: d.stop_copy_bytes.is_some(),
            stop_copy_bytes: d.stop_copy_bytes.unwrap_or(0),
            raw_bytes: d.raw_bytes,
            wire_bytes: d.wire_bytes,
            rate_bps: d.rate_bps,
            has_estimated_stop_copy: d.estimated_stop_copy.is_some(),
            estimated_stop_copy_us: d.estimated_stop_copy.map_or(0, micros),
            switchover_acked: d.switchover_acked,
        }
    }
}

impl From<&Report> for VfmigReport {
    fn from(r: &Report) -> Self {
        VfmigReport {
            raw_bytes: r.raw_bytes,
            wire_bytes: r.wire_bytes,
            ratio: r.ratio,
            elapsed_us: micros(r.elapsed),
            throughput_bps: r.throughput_bps,
            has_downtime: r.downtime.is_some(),
            downtime_us: r.downtime.map_or(0, micros),
            max_downtime_exceeded: r.max_downtime_exceeded,
            outcome: r.outcome.into(),
            limiting_stage: match r.limiting_stage {
                Stage::DataFd => VfmigStage::DataFd,
                Stage::Codec => VfmigStage::Codec,
                Stage::Network => VfmigStage::Network,
            },
            codec: fixed(&r.codec),
            device_count: r.devices.len(),
        }
    }
}

impl From<&DeviceReport> for VfmigDeviceReport {
    fn from(d: &DeviceReport) -> Self {
        VfmigDeviceReport {
            name: fixed(&d.name),
            raw_bytes: d.raw_bytes,
            precopy_bytes: d.precopy_bytes,
            wire_bytes: d.wire_bytes,
            ratio: d.ratio,
            zero_chunks: d.zero_chunks,
            raw_chunks: d.raw_chunks,
            compressed_chunks: d.compressed_chunks,
            guest_page_bytes: d.guest_page_bytes,
            precopy_info_v2: d.precopy_info_v2,
            precopy_reinits: d.precopy_reinits,
            final_state: d.final_state.into(),
        }
    }
}

impl Default for VfmigTransportOptions {
    fn default() -> Self {
        let d = SessionConfig::default();
        VfmigTransportOptions {
            connections: u32::try_from(d.streams).unwrap_or(1),
            psk: std::ptr::null(),
            psk_len: 0,
            insecure: d.insecure,
            accept_timeout_ms: micros(d.accept_timeout) / 1000,
        }
    }
}

impl Default for VfmigSourceOptions {
    fn default() -> Self {
        let d = SourceOptions::default();
        VfmigSourceOptions {
            precopy: d.precopy,
            max_downtime_ms: micros(d.max_downtime) / 1000,
            max_precopy_ms: micros(d.max_precopy) / 1000,
            on_max_precopy: VfmigPrecopyLimit::Switchover as u32,
            timeout_ms: micros(d.timeout) / 1000,
            codec_workers: u32::try_from(d.codec_workers).unwrap_or(2),
            compress: VfmigCompress::Auto as u32,
            zstd_level: 3,
            max_bandwidth_bps: 0,
            allow_without_p2p: d.allow_without_p2p,
            transport: VfmigTransportOptions::default(),
            dirty: VfmigDirtyExport::default(),
        }
    }
}

impl Default for VfmigDestinationOptions {
    fn default() -> Self {
        let d = DestinationOptions::default();
        VfmigDestinationOptions {
            timeout_ms: micros(d.timeout) / 1000,
            codec_workers: u32::try_from(d.codec_workers).unwrap_or(2),
            allow_without_p2p: d.allow_without_p2p,
            transport: VfmigTransportOptions::default(),
        }
    }
}

fn invalid(arg: &'static str, reason: &'static str) -> CapiError {
    CapiError::InvalidArgument { arg, reason }
}

fn workers(n: u32) -> Result<usize, CapiError> {
    match n {
        1..=64 => Ok(n as usize),
        _ => Err(invalid("codec_workers", "must be 1..=64")),
    }
}

/// The transport settings, with the key already copied out of the caller's memory.
pub(crate) fn session_config(
    t: &VfmigTransportOptions,
    psk: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<SessionConfig, CapiError> {
    let mut cfg = SessionConfig {
        timeout,
        insecure: t.insecure,
        accept_timeout: Duration::from_millis(t.accept_timeout_ms),
        ..SessionConfig::default()
    };
    cfg.streams = match t.connections {
        1..=16 => t.connections as usize,
        _ => return Err(invalid("transport.connections", "must be 1..=16")),
    };
    if let Some(key) = psk {
        if key.len() < 16 {
            return Err(invalid(
                "transport.psk_len",
                "a key needs at least 16 bytes",
            ));
        }
        cfg.auth = AuthConfig::Psk(key);
    }
    // The transport sends keepalives well inside its liveness timeout.
    cfg.keepalive = cfg.keepalive.min(timeout / 3);
    Ok(cfg)
}

fn timeout(ms: u64) -> Result<Duration, CapiError> {
    match ms {
        0 => Err(invalid("timeout_ms", "must be above 0")),
        _ => Ok(Duration::from_millis(ms)),
    }
}

impl VfmigSourceOptions {
    pub(crate) fn library_options(&self, psk: Option<Vec<u8>>) -> Result<SourceOptions, CapiError> {
        let timeout = timeout(self.timeout_ms)?;
        const AUTO: u32 = VfmigCompress::Auto as u32;
        const NONE: u32 = VfmigCompress::None as u32;
        const LZ4: u32 = VfmigCompress::Lz4 as u32;
        const ZSTD: u32 = VfmigCompress::Zstd as u32;
        let compress = match self.compress {
            AUTO => Compress::Auto,
            NONE => Compress::None,
            LZ4 => Compress::Lz4,
            ZSTD if (1..=19).contains(&self.zstd_level) => Compress::Zstd(self.zstd_level),
            ZSTD => return Err(invalid("zstd_level", "must be 1..=19")),
            _ => return Err(invalid("compress", "not a VfmigCompress value")),
        };
        const SWITCHOVER: u32 = VfmigPrecopyLimit::Switchover as u32;
        const ABORT: u32 = VfmigPrecopyLimit::Abort as u32;
        let on_max_precopy = match self.on_max_precopy {
            SWITCHOVER => PrecopyLimit::Switchover,
            ABORT => PrecopyLimit::Abort,
            _ => return Err(invalid("on_max_precopy", "not a VfmigPrecopyLimit value")),
        };
        Ok(SourceOptions {
            compress,
            codec_workers: workers(self.codec_workers)?,
            precopy: self.precopy,
            max_downtime: Duration::from_millis(self.max_downtime_ms),
            max_precopy: Duration::from_millis(self.max_precopy_ms),
            on_max_precopy,
            max_bandwidth: Rate::from_bytes_per_sec(self.max_bandwidth_bps),
            timeout,
            allow_without_p2p: self.allow_without_p2p,
            session: session_config(&self.transport, psk, timeout)?,
            ..SourceOptions::default()
        })
    }
}

impl VfmigDestinationOptions {
    pub(crate) fn library_options(
        &self,
        psk: Option<Vec<u8>>,
    ) -> Result<DestinationOptions, CapiError> {
        let timeout = timeout(self.timeout_ms)?;
        Ok(DestinationOptions {
            codec_workers: workers(self.codec_workers)?,
            timeout,
            // Step mode: the VMM resumes (vfmig_destination_resume) and reports the outcome.
            resume_devices: false,
            allow_without_p2p: self.allow_without_p2p,
            session: session_config(&self.transport, psk, timeout)?,
            ..DestinationOptions::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_at_a_character_boundary_and_terminated() {
        let long = "é".repeat(VFMIG_NAME_MAX);
        let out: [c_char; VFMIG_NAME_MAX] = fixed(&long);
        let bytes: Vec<u8> = out.iter().map(|c| c.to_ne_bytes()[0]).collect();
        let end = bytes.iter().position(|b| *b == 0).unwrap();
        assert!(end < VFMIG_NAME_MAX);
        assert!(std::str::from_utf8(&bytes[..end]).is_ok());
        assert_eq!(end % 2, 0);
    }

    #[test]
    fn defaults_convert_back_to_the_library_defaults() {
        let o = VfmigSourceOptions::default().library_options(None).unwrap();
        let d = SourceOptions::default();
        assert_eq!(o.max_downtime, d.max_downtime);
        assert_eq!(o.timeout, d.timeout);
        assert_eq!(o.codec_workers, d.codec_workers);
        assert_eq!(o.session.streams, d.session.streams);
        let o = VfmigDestinationOptions::default()
            .library_options(None)
            .unwrap();
        assert_eq!(
            o.session.accept_timeout,
            SessionConfig::default().accept_timeout
        );
    }

    #[test]
    fn bad_options_are_refused() {
        let base = VfmigSourceOptions::default();
        let bad = [
            VfmigSourceOptions {
                codec_workers: 0,
                ..base
            },
            VfmigSourceOptions {
                timeout_ms: 0,
                ..base
            },
            VfmigSourceOptions {
                compress: VfmigCompress::Zstd as u32,
                zstd_level: 40,
                ..base
            },
            VfmigSourceOptions {
                compress: 9,
                ..base
            },
            VfmigSourceOptions {
                on_max_precopy: 7,
                ..base
            },
            VfmigSourceOptions {
                transport: VfmigTransportOptions {
                    connections: 17,
                    ..base.transport
                },
                ..base
            },
        ];
        for o in bad {
            assert!(o.library_options(None).is_err(), "{o:?}");
        }
        // A key shorter than 16 bytes.
        assert!(base.library_options(Some(vec![1; 8])).is_err());
        assert!(base.library_options(Some(vec![1; 16])).is_ok());
    }
}
