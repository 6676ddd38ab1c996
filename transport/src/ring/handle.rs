//! What the session's handles hold of an engine and share with its thread: the queues into it
//! and out of it, the eventfd that wakes it, its terminal outcome and counters, and the join
//! handle of its thread.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use vfmig_wire::AbortReason;

use crate::error::TransportError;
use crate::stats::Counters;
use crate::Frame;

use super::frame::OutFrame;

/// Requests that overtake the data queue.
#[derive(Debug)]
pub(crate) enum Urgent {
    Abort {
        reason: AbortReason,
        detail: Vec<u8>,
    },
    Close,
}

/// State shared by the engine thread and the session handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) failure: Mutex<Option<TransportError>>,
    pub(super) failed: AtomicBool,
    /// Set by the engine when it stopped reading because the consumer is behind.
    pub(crate) want_wake: AtomicBool,
    pub(crate) counters: Counters,
}

impl Shared {
    /// The terminal outcome, if the engine ended.
    pub(crate) fn failure(&self) -> Option<TransportError> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure.lock().ok().and_then(|g| g.clone())
    }

    pub(super) fn set_failure(&self, e: TransportError) {
        if let Ok(mut g) = self.failure.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// Wakes the engine thread out of its ring wait (an eventfd the ring keeps a read posted on).
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    pub(super) file: Arc<File>,
}

impl Waker {
    pub(super) fn new() -> Result<Waker, TransportError> {
        let owned = crate::uring::eventfd().map_err(|e| TransportError::io("eventfd", e))?;
        Ok(Waker {
            file: Arc::new(File::from(owned)),
        })
    }

    pub(crate) fn wake(&self) {
        // An eventfd write only fails if the counter would overflow, in which case a wake-up is
        // pending anyway.
        let _ = (&*self.file).write(&1u64.to_ne_bytes());
    }
}

/// Parameters the engine runs with (agreed in the handshake).
#[derive(Clone, Debug)]
pub(crate) struct EngineParams {
    pub(crate) devices: usize,
    pub(crate) max_payload: u32,
    pub(crate) window_bytes: u64,
    pub(crate) timeout: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) zerocopy_min: usize,
    pub(crate) out_queue: usize,
    /// Destination: the peer closing a connection at a frame boundary is the normal end.
    pub(crate) peer_closes: bool,
}

/// The handles' side of an engine.
#[derive(Debug)]
pub(crate) struct EngineHandle {
    pub(crate) out_tx: Sender<OutFrame>,
    pub(crate) urgent_tx: Sender<Urgent>,
    pub(crate) in_rx: Receiver<Frame>,
    pub(crate) waker: Waker,
    pub(crate) shared: Arc<Shared>,
    pub(crate) thread: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Waits for the engine thread to end (it bounds its own lifetime by the session timeout).
    pub(crate) fn join(&self) {
        let handle = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}
