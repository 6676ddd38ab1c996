//! Counters shared by the stage threads: per-device bytes and per-stage busy time, read by the
//! progress callback and the final report. Lock-free (relaxed atomics): they are statistics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::api::{Notice, NoticeFn};

/// Busy time of one stage, summed over its threads.
#[derive(Debug, Default)]
pub(crate) struct StageClock {
    nanos: AtomicU64,
}

impl StageClock {
    /// Adds the time since `since`.
    pub fn add_since(&self, since: Instant) {
        self.add(since.elapsed());
    }

    pub fn add(&self, d: Duration) {
        let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// Byte counters of one device.
#[derive(Debug, Default)]
pub(crate) struct DeviceCounters {
    /// Raw bytes read from (source) or written to (destination) the data fd.
    pub raw: AtomicU64,
    /// Bytes of payload on the wire.
    pub wire: AtomicU64,
    /// Raw bytes of the PRE_COPY part of the stream.
    pub precopy_raw: AtomicU64,
    /// Bytes of dirty guest pages shipped (source) or applied (destination).
    pub guest: AtomicU64,
    /// Chunks that were all zero, sent raw after the probe, compressed.
    pub zero_chunks: AtomicU64,
    pub raw_chunks: AtomicU64,
    pub compressed_chunks: AtomicU64,
    /// Source: data chunks in a row that went raw with no zero granule (codec workers and the
    /// reader's direct path count them; anything else resets it). From
    /// [`crate::codec::SETTLE_CHUNKS`] on, the stream is *settled raw* and the reader hands its
    /// chunks to the sender itself (`reader::direct`).
    pub raw_streak: AtomicU32,
    /// Source: chunks the reader handed to the sender directly (no codec worker).
    pub direct_chunks: AtomicU64,
    /// Destination: the furthest kind of frame received (0 none, 1 pre-copy data, 2 stop-copy
    /// data, 3 end of device), for the progress callback's phase.
    pub seen: AtomicU8,
}

impl DeviceCounters {
    pub fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn load(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// All counters of one session side.
#[derive(Debug)]
pub(crate) struct Counters {
    pub devices: Vec<DeviceCounters>,
    /// Source: reader; destination: writer (time with the data-fd stage doing work).
    pub fd_stage: StageClock,
    /// Codec workers (encode or decode), summed over workers.
    pub codec: StageClock,
    /// Source: time blocked handing frames to the transport; destination: time receiving.
    pub net: StageClock,
    /// Time a stage waited for a free pool buffer (downstream full).
    pub buffer_wait: StageClock,
    /// Where notices go (at most one per kind).
    pub notices: Notices,
    /// Source: when the first device-state frame went to the transport (wall clock).
    pub first_send: OnceLock<SystemTime>,
}

/// The session's [`Notice`] callback, each kind reported at most once.
#[derive(Default)]
pub(crate) struct Notices {
    callback: Option<NoticeFn>,
    unpinned: AtomicBool,
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notices")
            .field("callback", &self.callback.is_some())
            .finish()
    }
}

impl Notices {
    /// Reports `n` unless its kind was already reported.
    pub fn notify(&self, n: Notice) {
        let once = match n {
            Notice::UnpinnedBuffers { .. } => &self.unpinned,
        };
        if !once.swap(true, Ordering::SeqCst) {
            if let Some(f) = &self.callback {
                f(n);
            }
        }
    }
}

impl Counters {
    pub fn new(devices: usize) -> Counters {
        Counters {
            devices: (0..devices).map(|_| DeviceCounters::default()).collect(),
            fd_stage: StageClock::default(),
            codec: StageClock::default(),
            net: StageClock::default(),
            buffer_wait: StageClock::default(),
            notices: Notices::default(),
            first_send: OnceLock::new(),
        }
    }

    /// Sends notices to `callback`.
    pub fn with_notices(mut self, callback: Option<NoticeFn>) -> Counters {
        self.notices.callback = callback;
        self
    }

    pub fn device(&self, i: u16) -> Option<&DeviceCounters> {
        self.devices.get(usize::from(i))
    }
}
