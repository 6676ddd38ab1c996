//! The io_uring engine: one thread per session owns one ring and all N connections of the
//! session. It has no `unsafe` of its own: every submission goes through the owned-buffer ring of
//! `crate::uring`.
//!
//! # Ownership
//! Every submission that references memory (a header buffer, a pool slot, a control payload, the
//! eventfd counter) moves that memory into the ring together with the engine's bookkeeping
//! (`Op`), and gets both back with the completion (`crate::uring` holds a zero-copy payload until
//! the kernel's notification). Dropping the engine's ring cancels what is in flight, drains it
//! within a bound, and leaks only what the kernel did not hand back.
//!
//! # Where things live
//! - this file: the engine's state, the thread that runs it, its turn (take requests, submit,
//!   wait, complete) and the dispatch of completions;
//! - `conn`: one connection's socket, AEAD state, send queue and receive state;
//! - `frame`: outgoing frames (header buffer, payload) and the keepalive and abort frames;
//! - `handle`: what the session's handles hold of an engine and share with its thread;
//! - `send`: striping frames over connections, keepalives, the send submissions and their
//!   completions;
//! - `recv`: header and payload reads, admission through the reorder window, verification and
//!   delivery to the consumer;
//! - `ending`: close and abort requests, time limits from the sans-IO clock, half-close and
//!   teardown.
//!
//! # Waking
//! The engine sleeps in the ring wait, with a read posted on an eventfd that every handle writes
//! after queueing a frame, a close or an abort. A turn takes the queued requests and acts on them
//! (sends, shutdowns of a close, the abort frame) before it waits again, so a request costs one
//! wake-up, never a tick. The wait lasts until the next deadline of the sans-IO clock
//! (`crate::liveness`: a keepalive due, a read, send, reorder, close or abort deadline), so
//! keepalives and timeouts happen on time, not on a polling tick (it used to be a quarter of the
//! keepalive, at most 250 ms). A connection waiting for a free pool buffer arms the pool's
//! release hook, which writes the same eventfd when the consumer drops a buffer (it used to poll
//! every millisecond).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use vfmig_wire::seal::SEALED_HEAD_LEN;
use vfmig_wire::{FrameHeader, HEADER_LEN};

use crate::error::{FramePart, TransportError};
use crate::liveness::Liveness;
use crate::pool::BufPool;
use crate::reorder::Reorder;
use crate::stats::Counters;
use crate::uring::{Completion, Io, IoBuf, Sub, Uring};
use crate::Frame;

mod conn;
mod ending;
mod frame;
mod handle;
mod recv;
mod send;

use conn::{Conn, Rx};
pub(crate) use conn::{Sealing, Sock};
pub(crate) use frame::{head, Head, OutFrame, OutPayload};
pub(crate) use handle::{EngineHandle, EngineParams, Urgent};
use handle::{Shared, Waker};

const RING_ENTRIES: u32 = 256;
/// Verified frames waiting for the consumer before the engine stops reading.
const READY_MAX: usize = 8;
/// Frames queued per connection before the engine stops taking frames from the session queue.
const CONN_QUEUE_MAX: usize = 2;
/// Bound on waiting for the kernel to hand back every buffer at teardown.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// What the engine needs to know when a submission completes; the memory it references is
/// owned by the ring with it (`crate::uring`).
#[derive(Debug)]
enum Op {
    SendHeader {
        conn: usize,
        last: bool,
    },
    SendPayload {
        conn: usize,
        len: usize,
    },
    RecvHeader {
        conn: usize,
        got: usize,
    },
    RecvPayload {
        conn: usize,
        hdr: FrameHeader,
        raw: Head,
        got: usize,
        reserved: bool,
    },
    Wake,
}

enum Step {
    Continue,
    Done(TransportError),
}

struct Engine {
    /// Declared first: dropping it cancels and drains what is in flight while the sockets and
    /// the pool below are still open (or leaks what the kernel will not give back).
    ring: Uring<Op>,
    /// Bytes before each frame's payload: the header, and the tag on sealed connections.
    head_len: usize,
    pool: BufPool,
    /// Payload bytes taken from the session queue and not yet completed on the wire: kept below
    /// the agreed window (PROTOCOL.md section 7), overshooting by at most one frame.
    outstanding: u64,
    conns: Vec<Conn>,
    /// The connection the last frame was striped to (ties go round-robin from there).
    last_pick: usize,
    out_rx: Receiver<OutFrame>,
    urgent_rx: Receiver<Urgent>,
    /// Taken (dropped) at teardown so that waiting consumers wake up at once.
    in_tx: Option<Sender<Frame>>,
    shared: Arc<Shared>,
    p: EngineParams,
    reorder: Reorder,
    ready: VecDeque<Frame>,
    wake_posted: bool,
    sends_in_flight: usize,
    busy_since: Option<Instant>,
    /// Timestamps, deadlines and how the session ends (sans-IO, `crate::liveness`).
    live: Liveness,
    started: Instant,
}

/// Creates the engine's ring. Its pool slots are registered only when a zero-copy send uses
/// one (`Uring::fix`): the plain `Send` / `Recv` of the default path need no registration, and
/// pinning the whole pool up front cost tens of milliseconds before the first byte moved.
/// Where the kernel refuses to pin (`RLIMIT_MEMLOCK`), `SendZc` is simply not used.
fn setup_ring(pool: &BufPool) -> Result<Uring<Op>, TransportError> {
    Uring::new(RING_ENTRIES, Some(pool)).map_err(|e| TransportError::io("io_uring_setup", e))
}

/// Starts the engine thread, which sets up its ring (registering the pool's buffers) itself, so
/// that no other thread ever touches the ring; setup errors come back here.
pub(crate) fn start(
    socks: Vec<(Sock, Option<Sealing>)>,
    pool: BufPool,
    p: EngineParams,
    name: &str,
) -> Result<EngineHandle, TransportError> {
    let (out_tx, out_rx) = crossbeam_channel::bounded(p.out_queue.max(1));
    let (urgent_tx, urgent_rx) = crossbeam_channel::bounded(4);
    let (in_tx, in_rx) = crossbeam_channel::bounded(READY_MAX);
    let waker = Waker::new()?;
    let shared = Arc::new(Shared {
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        want_wake: AtomicBool::new(false),
        counters: Counters::new(),
    });
    let (setup_tx, setup_rx) = crossbeam_channel::bounded(1);
    let wake_file = Arc::clone(&waker.file);
    let engine_shared = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name(format!("vfmig-{name}"))
        .spawn(move || {
            let ring = match setup_ring(&pool) {
                Ok(r) => r,
                Err(e) => {
                    let _ = setup_tx.send(Err(e));
                    return;
                }
            };
            let now = Instant::now();
            let sealed = socks.iter().any(|(_, s)| s.is_some());
            let (n_conns, p_timeout, p_keepalive) = (socks.len(), p.timeout, p.keepalive);
            let conns = socks
                .into_iter()
                .map(|(sock, sealing)| Conn {
                    sock,
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    rx: Rx::Idle,
                    wr_shut: false,
                    sealing,
                })
                .collect::<Vec<_>>();
            // Out-of-order frames may use at most half the pool, so the next needed frame
            // always finds a buffer once the consumer returns its own.
            let max_frames = (pool.slots() / 2).max(1);
            let engine = Engine {
                ring,
                head_len: if sealed { SEALED_HEAD_LEN } else { HEADER_LEN },
                outstanding: 0,
                reorder: Reorder::new(p.devices, p.window_bytes, max_frames),
                pool,
                conns,
                // The first frame goes to connection 0.
                last_pick: n_conns.saturating_sub(1),
                out_rx,
                urgent_rx,
                in_tx: Some(in_tx),
                shared: engine_shared,
                p,
                ready: VecDeque::new(),
                wake_posted: false,
                sends_in_flight: 0,
                busy_since: None,
                live: Liveness::new(n_conns, p_timeout, p_keepalive, now),
                started: now,
            };
            let _ = setup_tx.send(Ok(()));
            engine.run(&wake_file);
        })
        .map_err(|e| TransportError::io("spawn engine thread", e))?;
    match setup_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(TransportError::Cancelled);
        }
    }
    Ok(EngineHandle {
        out_tx,
        urgent_tx,
        in_rx,
        waker,
        shared,
        thread: Mutex::new(Some(thread)),
    })
}

/// A completion result already checked to be non-negative, as a byte count.
fn ures(res: i32) -> usize {
    usize::try_from(res).unwrap_or(0)
}

fn errno_err(conn: usize, op: &'static str, part: FramePart, res: i32) -> TransportError {
    let errno = -res;
    if errno == libc::EPIPE || errno == libc::ECONNRESET || errno == libc::ENOTCONN {
        TransportError::PeerClosed { conn, during: part }
    } else {
        TransportError::io(op, std::io::Error::from_raw_os_error(errno))
    }
}

impl Engine {
    fn run(mut self, wake_file: &Arc<File>) {
        let waker = Waker {
            file: Arc::clone(wake_file),
        };
        self.pool
            .set_release_hook(Some(Arc::new(move || waker.wake())));
        let outcome = loop {
            match self.turn(wake_file) {
                Ok(Step::Continue) => {}
                Ok(Step::Done(e)) | Err(e) => break e,
            }
        };
        self.pool.set_release_hook(None);
        self.teardown(outcome);
    }

    /// One round: take requests, submit, wait, complete, check time limits.
    fn turn(&mut self, wake_file: &Arc<File>) -> Result<Step, TransportError> {
        self.take_urgent();
        self.take_frames();
        self.deliver()?;
        self.admit_waiting()?;
        let now = Instant::now();
        self.schedule_keepalives(now);
        for i in 0..self.conns.len() {
            self.submit_send(i)?;
            self.post_header_recv(i)?;
        }
        if !self.wake_posted {
            self.post_wake(wake_file)?;
        }
        // Act on what was just taken before sleeping: a close or abort asked for since the last
        // turn shuts the connections down now, not a tick later.
        if let Step::Done(e) = self.check_time(now)? {
            return Ok(Step::Done(e));
        }
        if self.waiting_for_buffer() {
            // Buffers come back on the consumer's threads: the pool wakes the ring on the next
            // return. One returned before the arming is found by admitting again after it.
            self.pool.arm_release_hook();
            self.admit_waiting()?;
        }
        // Sleep until the next deadline (a keepalive, a timeout) unless a completion or a
        // wake-up comes first.
        self.sync_liveness(Instant::now());
        let wait = self
            .live
            .poll_timeout()
            .saturating_duration_since(Instant::now());
        self.ring
            .wait(wait)
            .map_err(|e| TransportError::io("io_uring_enter", e))?;
        let mut failed = None;
        while let Some(c) = self.ring.pop() {
            // After a failure the rest are only reaped: dropping a completion frees its buffer
            // (the kernel is done with it; a zero-copy payload stays with the ring until its
            // notification).
            if failed.is_none() {
                if let Err(e) = self.complete(c) {
                    failed = Some(e);
                }
            }
        }
        let copied = self.ring.take_zc_copied();
        if copied > 0 {
            Counters::add(&self.shared.counters.zerocopy_copied, copied);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.deliver()?;
        self.check_time(Instant::now())
    }

    /// Pushes submissions (linked: each waits for the previous one to succeed in full).
    fn push(&mut self, subs: Vec<Sub<Op>>, linked: bool) -> Result<(), TransportError> {
        self.ring
            .push_all(subs, linked)
            .map_err(|r| TransportError::io("io_uring submission", r.error))
    }

    fn post_wake(&mut self, wake_file: &Arc<File>) -> Result<(), TransportError> {
        let io = Io::Read {
            fd: wake_file.as_raw_fd(),
            at: 0,
            len: 8,
            offset: 0,
            punt: false,
        };
        let buf = IoBuf::Heap(Box::new([0u8; 8]));
        self.push(
            vec![Sub {
                io,
                buf,
                owner: Op::Wake,
            }],
            false,
        )?;
        self.wake_posted = true;
        Ok(())
    }

    /// Acts on one completion: the wake-up read here, sends in `send`, receives in `recv`.
    fn complete(&mut self, c: Completion<Op>) -> Result<(), TransportError> {
        let res = c.result;
        let now = Instant::now();
        match c.owner {
            Op::Wake => {
                self.wake_posted = false;
                if res < 0 && res != -libc::ECANCELED {
                    return Err(TransportError::io(
                        "read eventfd",
                        std::io::Error::from_raw_os_error(-res),
                    ));
                }
            }
            Op::SendHeader { conn, last } => self.complete_send_header(conn, last, res, now)?,
            Op::SendPayload { conn, len } => self.complete_send_payload(conn, len, res, now)?,
            Op::RecvHeader { conn, got } => {
                self.complete_recv_header(conn, got, res, c.buf, now)?
            }
            owner @ Op::RecvPayload { .. } => self.complete_recv_payload(owner, res, c.buf, now)?,
        }
        Ok(())
    }
}
