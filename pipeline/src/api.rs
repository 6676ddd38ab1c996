//! What a VMM's migration thread configures and gets back: options, the cancel handle, progress
//! and the final report.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vfmig_transport::SessionConfig;
use vfmig_vfio::{DeviceError, DeviceState};

use crate::codec::Compress;
use crate::dirty::DirtyTracking;
use crate::error::Phase;
use crate::guest::GuestMemoryAccess;

/// A progress callback: called from the session's thread about every
/// [`SourceOptions::progress_interval`].
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Something the operator should know that does not stop the migration. Each kind is reported
/// at most once per session, from whichever stage thread finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The kernel refused to pin the buffer pool for the data-fd ring (`RLIMIT_MEMLOCK` without
    /// `CAP_IPC_LOCK`): the data fds are read and written with unregistered buffers, which costs
    /// a page mapping per operation and nothing else.
    UnpinnedBuffers {
        /// `reader` (source) or `writer` (destination).
        stage: &'static str,
        /// The errno of the refused registration (`ENOMEM` or `EPERM`).
        errno: i32,
    },
}

/// A notice callback (see [`Notice`]); called from a stage thread.
pub type NoticeFn = Arc<dyn Fn(Notice) + Send + Sync>;

/// A data rate in bytes per second; never zero (a cap of nothing would never send).
///
/// Operators speak of links in bits per second and of memory in binary multiples; this type
/// takes neither guess: build it from the unit you have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(std::num::NonZeroU64);

impl Rate {
    /// `bytes` per second; `None` for zero.
    pub fn from_bytes_per_sec(bytes: u64) -> Option<Rate> {
        std::num::NonZeroU64::new(bytes).map(Rate)
    }

    /// `bits` per second, rounded down to whole bytes; `None` below 8 bit/s.
    pub fn from_bits_per_sec(bits: u64) -> Option<Rate> {
        Rate::from_bytes_per_sec(bits / 8)
    }

    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.0.get()
    }
}

/// Most codec workers [`default_codec_workers`] picks. A hypervisor's cores belong to its
/// guests: a migration that took all 192 of them would stall the VMs it shares the host with.
/// 16 zstd-1 workers encode ~13 GB/s of mixed state (~800 MiB/s per core, the codec table in
/// docs/BENCHMARKS.md), whose ~2.5:1 output fills a 40 Gbit/s link. The `vfmig` CLI grows its
/// `pool_slots` with its workers (`tools/src/devices.rs`); library users with the default
/// 64-slot pool get what the destination's pool can feed (see
/// [`DestinationOptions::codec_workers`]). `--workers` / [`SourceOptions::codec_workers`] go up
/// to 64.
pub const DEFAULT_CODEC_WORKERS_MAX: usize = 16;

/// Codec workers by default: the cores this process may run on ([`crate::cores::core_budget`]:
/// the `sched_getaffinity` mask intersected with the cgroup CPU quota, rounded up), at least 2
/// and at most [`DEFAULT_CODEC_WORKERS_MAX`]. A worker only runs while a chunk needs a codec,
/// so idle workers cost nothing when the controller sends raw.
pub fn default_codec_workers() -> usize {
    workers_for_cores(crate::cores::available_cores())
}

/// [`default_codec_workers`] for a given core count.
pub fn workers_for_cores(cores: usize) -> usize {
    cores.clamp(2, DEFAULT_CODEC_WORKERS_MAX)
}

/// Most TCP connections [`default_streams`] picks.
pub const DEFAULT_STREAMS_MAX: usize = 4;

/// Cores per default TCP connection.
pub const CORES_PER_STREAM: usize = 8;

/// TCP connections a source opens by default: one per [`CORES_PER_STREAM`] cores this process
/// may use, 1..=[`DEFAULT_STREAMS_MAX`].
///
/// Why: on loopback and on few cores, extra connections only add sockets and completions for
/// the same CPUs (the transport measured 1 connection cheapest and fastest on 2 cores; see
/// `SessionConfig::streams`), so small hosts keep 1. On a real NIC a TCP flow's receive
/// processing (softirq, copy to user) runs on the one core its RSS queue maps to, and one flow
/// tops out around 20-30 Gbit/s; with enough cores that the codec workers no longer limit,
/// a second flow per 8 cores spreads that work, up to 4 flows (~100 Gbit/s) where per-flow
/// limits stop mattering. `vfmig-bench cli --scaling` measures the workers x streams grid.
pub fn default_streams() -> usize {
    streams_for_cores(crate::cores::available_cores())
}

/// [`default_streams`] for a given core count.
pub fn streams_for_cores(cores: usize) -> usize {
    (cores / CORES_PER_STREAM).clamp(1, DEFAULT_STREAMS_MAX)
}

/// Source options. `Default` gives adaptive compression, [`default_codec_workers`] codec
/// workers, pre-copy when every device supports it, 300 ms max downtime, no rate limit, 30 s
/// timeout.
#[derive(Clone)]
pub struct SourceOptions {
    /// How to compress (Auto chooses from measured link and codec throughput).
    pub compress: Compress,
    /// Codec worker threads (default: [`default_codec_workers`]).
    pub codec_workers: usize,
    /// Use PRE_COPY when every device supports it.
    pub precopy: bool,
    /// Switch over once the estimated STOP_COPY time (remaining bytes / measured throughput) is
    /// below this.
    pub max_downtime: Duration,
    /// Longest pre-copy phase; then [`SourceOptions::on_max_precopy`] says what happens when
    /// the estimate is still above `max_downtime` (the device keeps dirtying faster than we
    /// send).
    pub max_precopy: Duration,
    /// What the automatic mode does when `max_precopy` passed and the downtime estimate does not
    /// fit: switch over anyway (the default; the report then says whether `max_downtime` was
    /// exceeded) or abort with [`crate::PipelineError::PrecopyTooLong`].
    pub on_max_precopy: PrecopyLimit,
    /// Cap on wire bytes per second, `None` for no limit.
    pub max_bandwidth: Option<Rate>,
    /// Longest time without progress at any step (device, transport, peer).
    pub timeout: Duration,
    /// Migrate several devices even if some lack P2P (RUNNING_P2P); P2P traffic between them
    /// may be lost while they stop one after another.
    pub allow_without_p2p: bool,
    /// Transport settings (connections, authentication, TLS, pool size).
    pub session: SessionConfig,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Notice callback (see [`Notice`]).
    pub notice: Option<NoticeFn>,
    /// How often the progress callback is called.
    pub progress_interval: Duration,
    /// Device DMA dirty tracking (devices that support `DMA_LOGGING_*`): off, vfmig ships the
    /// dirtied pages as `DirtyPages` frames, or vfmig hands the dirty bitmaps to the VMM.
    pub dirty_tracking: DirtyTracking,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            compress: Compress::Auto,
            codec_workers: default_codec_workers(),
            precopy: true,
            max_downtime: Duration::from_millis(300),
            max_precopy: Duration::from_secs(60),
            on_max_precopy: PrecopyLimit::Switchover,
            max_bandwidth: None,
            timeout: Duration::from_secs(30),
            allow_without_p2p: false,
            session: SessionConfig::default(),
            progress: None,
            notice: None,
            progress_interval: Duration::from_millis(200),
            dirty_tracking: DirtyTracking::Off,
        }
    }
}

impl fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceOptions")
            .field("compress", &self.compress)
            .field("codec_workers", &self.codec_workers)
            .field("precopy", &self.precopy)
            .field("max_downtime", &self.max_downtime)
            .field("max_precopy", &self.max_precopy)
            .field("on_max_precopy", &self.on_max_precopy)
            .field("max_bandwidth", &self.max_bandwidth)
            .field("timeout", &self.timeout)
            .field("allow_without_p2p", &self.allow_without_p2p)
            .field("session", &self.session)
            .field("progress", &self.progress.is_some())
            .field("dirty_tracking", &self.dirty_tracking)
            .finish()
    }
}

/// What happens when pre-copy reached [`SourceOptions::max_precopy`] without the downtime
/// estimate fitting `max_downtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrecopyLimit {
    /// Switch over anyway (the downtime may exceed `max_downtime`; the report says so).
    #[default]
    Switchover,
    /// Abort the migration; the devices are rolled back and keep running.
    Abort,
}

/// Destination options.
#[derive(Clone)]
pub struct DestinationOptions {
    /// Codec worker threads (default: [`default_codec_workers`]); the session runs as many as
    /// its buffer pool can feed beside the reorder window, at most this many.
    pub codec_workers: usize,
    /// Longest time without progress.
    pub timeout: Duration,
    /// After every device accepted its state, move them STOP -> RUNNING_P2P (all) -> RUNNING
    /// (all). Off by default: the devices stay in STOP and the VMM decides.
    pub resume_devices: bool,
    /// Accept several devices even if some lack P2P.
    pub allow_without_p2p: bool,
    /// Transport settings.
    pub session: SessionConfig,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Notice callback (see [`Notice`]).
    pub notice: Option<NoticeFn>,
    /// How often the progress callback is called.
    pub progress_interval: Duration,
    /// Guest memory that receives `DirtyPages` frames.
    pub guest_memory: Option<Arc<dyn GuestMemoryAccess>>,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            codec_workers: default_codec_workers(),
            timeout: Duration::from_secs(30),
            resume_devices: false,
            allow_without_p2p: false,
            session: SessionConfig::default(),
            progress: None,
            notice: None,
            progress_interval: Duration::from_millis(200),
            guest_memory: None,
        }
    }
}

impl fmt::Debug for DestinationOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationOptions")
            .field("codec_workers", &self.codec_workers)
            .field("timeout", &self.timeout)
            .field("resume_devices", &self.resume_devices)
            .field("allow_without_p2p", &self.allow_without_p2p)
            .field("session", &self.session)
            .field("progress", &self.progress.is_some())
            .field("notice", &self.notice.is_some())
            .field("guest_memory", &self.guest_memory.is_some())
            .finish()
    }
}

/// Cancels a running session from another thread. The session then fails with
/// [`crate::PipelineError::Cancelled`] after rolling its devices back.
#[derive(Clone, Debug, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the session to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A progress snapshot. Delivered about every `progress_interval`, and at once on every phase
/// change of a source session: `Setup`, `PreCopy` (with pre-copy), `StopCopy`, `Commit`, `Done`.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Time since the session started.
    pub elapsed: Duration,
    /// The session's phase.
    pub phase: Phase,
    /// Per device, in session order.
    pub devices: Vec<DeviceProgress>,
}

/// Progress of one device.
#[derive(Clone, Debug)]
pub struct DeviceProgress {
    /// Device name.
    pub name: String,
    /// Where it is.
    pub phase: Phase,
    /// Raw state bytes read (source) or written (destination).
    pub raw_bytes: u64,
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    /// Raw bytes per second since the session started.
    pub rate_bps: f64,
    /// Estimated raw bytes in total (source: pre-copy bytes so far + STOP_COPY estimate), when
    /// known.
    pub estimated_total: Option<u64>,
    /// The destination accepted this device's state.
    pub done: bool,
}

/// A stage of the pipeline, for [`Report::limiting_stage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Source: reading data fds; destination: writing them.
    DataFd,
    /// Compression or decompression.
    Codec,
    /// Source: handing frames to the transport (link backpressure); destination: receiving.
    Network,
}

/// Busy time per stage, summed over the threads of a stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// Source: reader thread handling completions and hashing; destination: writer thread.
    pub data_fd: Duration,
    /// Codec workers (sum over workers).
    pub codec: Duration,
    /// Source: sender blocked in the transport; destination: receiver handling frames.
    pub network: Duration,
    /// Time the data-fd stage waited for a free buffer or a full queue (downstream slower).
    pub waiting_downstream: Duration,
}

/// Per-device outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Raw state bytes moved.
    pub raw_bytes: u64,
    /// Of those, bytes moved in PRE_COPY.
    pub precopy_bytes: u64,
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    /// `raw_bytes / wire_bytes` (1.0 when nothing moved).
    pub ratio: f64,
    /// Chunks elided as all-zero, sent raw, sent compressed.
    pub zero_chunks: u64,
    /// Chunks sent raw.
    pub raw_chunks: u64,
    /// Chunks sent compressed.
    pub compressed_chunks: u64,
    /// Bytes of dirty guest pages carried on this device's stream.
    pub guest_page_bytes: u64,
    /// Source: `MIG_PRECOPY_INFOv2` was in force for this device's pre-copy (the kernel and
    /// driver offered it); false under v1 or without pre-copy.
    pub precopy_info_v2: bool,
    /// Source: `VFIO_PRECOPY_INFO_REINIT` reports seen in pre-copy (new initial data, read in
    /// PRE_COPY before switching over).
    pub precopy_reinits: u64,
    /// The device's state at the end.
    pub final_state: Option<DeviceState>,
}

/// The final report of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Per device.
    pub devices: Vec<DeviceReport>,
    /// Raw bytes over all devices.
    pub raw_bytes: u64,
    /// Payload bytes on the wire over all devices.
    pub wire_bytes: u64,
    /// `raw_bytes / wire_bytes`.
    pub ratio: f64,
    /// Wall time of the session.
    pub elapsed: Duration,
    /// Raw bytes per second over the session.
    pub throughput_bps: f64,
    /// Source: from the first device leaving a running state to the destination's outcome (after
    /// the commit): the time the guest's devices run nowhere.
    pub downtime: Option<Duration>,
    /// Busy time per stage.
    pub stages: StageTimes,
    /// The stage with the most busy time per thread: the one that limited the run.
    pub limiting_stage: Stage,
    /// Compression in use at the end (e.g. `zstd:3`, `lz4`, `none`).
    pub codec: String,
    /// What the destination did after the commit: on the source, the outcome it reported; on
    /// the destination, the outcome it sent. `None` before the end of the session.
    pub outcome: Option<vfmig_wire::FinalOutcome>,
    /// Source: the measured `downtime` exceeded [`SourceOptions::max_downtime`].
    pub max_downtime_exceeded: bool,
    /// Source: when the first device-state frame was handed to the transport (wall clock, for
    /// comparing with other processes' clocks); `None` on the destination or if none was sent.
    pub first_data_at: Option<std::time::SystemTime>,
    /// Source: when the destination's outcome after the commit (its final acknowledgement)
    /// arrived; destination: when it was sent. `None` before the end of the session.
    pub final_ack_at: Option<std::time::SystemTime>,
}

/// What rollback did to one device.
#[derive(Debug)]
pub enum RollbackAction {
    /// The device was already RUNNING.
    AlreadyRunning,
    /// Walked from `from` back to RUNNING along the legal path.
    Walked {
        /// Where it was.
        from: DeviceState,
    },
    /// Reset (from ERROR, or because the walk failed) and is RUNNING again.
    Reset {
        /// Where it was.
        from: Option<DeviceState>,
    },
    /// Could not be brought back to RUNNING.
    Failed {
        /// Where it was.
        from: Option<DeviceState>,
        /// The last error.
        error: DeviceError,
    },
}

/// One device's rollback.
#[derive(Debug)]
pub struct RollbackStep {
    /// Device name.
    pub device: String,
    /// What was done.
    pub action: RollbackAction,
}

pub(crate) fn ratio(raw: u64, wire: u64) -> f64 {
    if wire == 0 {
        1.0
    } else {
        raw as f64 / wire as f64
    }
}
