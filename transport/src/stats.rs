//! Session counters, updated by the engine thread and read by anyone.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A snapshot of a session's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TransportStats {
    /// Bytes put on the wire (headers and payloads, keepalives included).
    pub bytes_sent: u64,
    /// Frames sent (keepalives included).
    pub frames_sent: u64,
    /// Bytes read from the wire.
    pub bytes_received: u64,
    /// Frames received and verified (keepalives included).
    pub frames_received: u64,
    /// Payload sends that used `SendZc` from a registered buffer.
    pub zerocopy_sends: u64,
    /// Of those, how many the kernel reported as copied anyway (e.g. over loopback).
    pub zerocopy_copied: u64,
    /// Keepalives sent.
    pub keepalives_sent: u64,
    /// Received frames that waited in the reorder window for an earlier one.
    pub frames_held: u64,
    /// Times a connection was parked because its next frame did not fit in the reorder window.
    pub parks: u64,
    /// Time during which at least one send was in flight.
    pub send_busy: Duration,
    /// Time the session has existed.
    pub elapsed: Duration,
    /// Wire throughput while sending, bytes per second (`bytes_sent / send_busy`); 0 before the
    /// first send. The pipeline's adaptive compression compares its codec speed with this.
    pub throughput_bps: f64,
}

#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) started: Instant,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) zerocopy_sends: AtomicU64,
    pub(crate) zerocopy_copied: AtomicU64,
    pub(crate) keepalives_sent: AtomicU64,
    pub(crate) frames_held: AtomicU64,
    pub(crate) parks: AtomicU64,
    pub(crate) send_busy_ns: AtomicU64,
}

impl Counters {
    pub(crate) fn new() -> Counters {
        Counters {
            started: Instant::now(),
            bytes_sent: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            zerocopy_sends: AtomicU64::new(0),
            zerocopy_copied: AtomicU64::new(0),
            keepalives_sent: AtomicU64::new(0),
            frames_held: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            send_busy_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> TransportStats {
        let bytes_sent = self.bytes_sent.load(Relaxed);
        let busy_ns = self.send_busy_ns.load(Relaxed);
        #[allow(clippy::cast_precision_loss)] // a rate estimate
        let throughput_bps = if busy_ns == 0 {
            0.0
        } else {
            bytes_sent as f64 * 1e9 / busy_ns as f64
        };
        TransportStats {
            bytes_sent,
            frames_sent: self.frames_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            frames_received: self.frames_received.load(Relaxed),
            zerocopy_sends: self.zerocopy_sends.load(Relaxed),
            zerocopy_copied: self.zerocopy_copied.load(Relaxed),
            keepalives_sent: self.keepalives_sent.load(Relaxed),
            frames_held: self.frames_held.load(Relaxed),
            parks: self.parks.load(Relaxed),
            send_busy: Duration::from_nanos(busy_ns),
            elapsed: self.started.elapsed(),
            throughput_bps,
        }
    }
}
