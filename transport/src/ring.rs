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
//! # Send path
//! Frames from the session's bounded queue are striped to the least-loaded connection (ties go
//! round-robin, so frames that trickle in one at a time still use every connection). Per
//! connection one frame is in flight at a time: a `Send` of the 40-byte header linked
//! (`IOSQE_IO_LINK`) to the payload send, both with `MSG_WAITALL` so that a short transfer is
//! retried by the kernel and the stream stays framed. Payloads of at least `zerocopy_min` bytes go
//! out with `SendZc` from the registered pool buffer (`IORING_RECVSEND_FIXED_BUF`; the slot is
//! registered with this ring the first time it goes out that way).
//!
//! Measured (`cargo bench -p vfmig-transport --bench throughput`, kernel 6.18, loopback, 2 shared
//! cores, 1 MiB frames, 128 MiB per iteration): one connection moved 2.0 GiB/s with `Send` and
//! 1.5 GiB/s with `SendZc` (1.6 vs 0.9 GiB/s in a second, noisier run); four connections 2.25 vs
//! 0.86 GiB/s. In CPU time (`--bench cpu_per_gib`, immune to the machine's other load) both
//! cost the same, 0.37-0.38 s per GiB for both sides, while `SendZc` took 1.8x the wall time
//! (1.23 vs 2.26 GiB/s). The notification reports every zero-copy send as copied
//! (`IORING_NOTIF_USAGE_ZC_COPIED`): loopback copies the pages anyway, so `SendZc` pays the copy
//! plus page pinning and a second completion per frame. Plain `Send` wins where we can measure,
//! so the default `zerocopy_min` is `usize::MAX` (off). On a real NIC with large frames `SendZc`
//! avoids the copy into the socket buffer; operators turn it on with
//! `SessionConfig::zerocopy_min` (the path is tested and counted in `TransportStats`).
//!
//! # Receive path
//! Each connection reads the 40-byte header (`Recv`, `MSG_WAITALL`), asks the reorder window
//! whether the frame may be read now, then reads the payload straight into a pool buffer and
//! verifies the CRC32C before the frame goes anywhere. The payload read is a `Recv` with
//! `MSG_WAITALL` into the slot rather than `ReadFixed`: a read on a socket completes with
//! whatever is queued at that moment (read(2) semantics, no retry for sockets), so a 1 MiB
//! payload would take many completions and resubmissions instead of one. A frame that does not fit in the window, or finds no free buffer, stays in
//! the socket (the connection is parked) until it does.
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
//!
//! # Liveness and teardown
//! Idle connections carry a keepalive every `keepalive`; a connection with a read in flight that
//! sees nothing for `timeout` fails the session, as does a send that does not complete within
//! `timeout`. Parked connections are exempt (the peer cannot send on them). At teardown every
//! entry still in the table is cancelled by its user_data (`AsyncCancel`) after `shutdown(2)`:
//! shutting a socket down did not complete its pending receives on this kernel, and a
//! cancel-any request cancelled only the first match.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use vfmig_wire::seal::{FrameOpener, FrameSealer, SEALED_HEAD_LEN};
use vfmig_wire::{AbortReason, Codec, FrameHeader, FrameKind, HeaderBytes, HEADER_LEN};

use crate::error::{FramePart, TransportError};
use crate::liveness::{Ending, Liveness, Stall};
use crate::pool::{BufPool, PoolBuf};
use crate::reorder::{Admit, Reorder};
use crate::stats::Counters;
use crate::uring::{Completion, Io, IoBuf, Sub, Uring};
use crate::Frame;

const RING_ENTRIES: u32 = 256;
/// Verified frames waiting for the consumer before the engine stops reading.
const READY_MAX: usize = 8;
/// Frames queued per connection before the engine stops taking frames from the session queue.
const CONN_QUEUE_MAX: usize = 2;
/// Bound on waiting for the kernel to hand back every buffer at teardown.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// A frame's header bytes, with room for the AEAD tag that follows the header on a sealed
/// connection (only the first `Engine::head_len` bytes travel).
pub(crate) type Head = [u8; SEALED_HEAD_LEN];

/// The AEAD state of a connection whose frames are sealed (docs/PROTOCOL.md, section 4.2): the
/// sealer counts the frames we send on it, the opener the frames we receive.
#[derive(Debug)]
pub(crate) struct Sealing {
    pub(crate) sealer: FrameSealer,
    pub(crate) opener: FrameOpener,
}

/// A connected socket the engine reads and writes: TCP, or for TLS the local end of the socket
/// pair that the TLS threads pump.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        // Errors (already shut down, not connected) change nothing for us.
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
    }
}

/// Payload of an outgoing frame.
#[derive(Debug)]
pub(crate) enum OutPayload {
    Empty,
    Pool(PoolBuf),
    Heap(Vec<u8>),
}

impl OutPayload {
    fn len(&self) -> usize {
        match self {
            OutPayload::Empty => 0,
            OutPayload::Pool(b) => b.len(),
            OutPayload::Heap(v) => v.len(),
        }
    }
}

/// An encoded frame ready for the wire.
#[derive(Debug)]
pub(crate) struct OutFrame {
    pub(crate) hdr: Box<Head>,
    pub(crate) payload: OutPayload,
}

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
    failure: Mutex<Option<TransportError>>,
    failed: AtomicBool,
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

    fn set_failure(&self, e: TransportError) {
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
    file: Arc<File>,
}

impl Waker {
    fn new() -> Result<Waker, TransportError> {
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

/// Receive state of one connection.
#[derive(Debug)]
enum Rx {
    /// Nothing posted; post a header read when allowed.
    Idle,
    /// A read (header or payload) is in flight; its op owns the buffer.
    Busy,
    /// Header read, payload waits for window room or a free buffer.
    Waiting { hdr: FrameHeader, raw: Head },
    /// The peer closed at a frame boundary.
    Eof,
}

#[derive(Debug)]
struct Conn {
    sock: Sock,
    queue: VecDeque<OutFrame>,
    queued_bytes: usize,
    rx: Rx,
    wr_shut: bool,
    /// `Some` when the connection's frames are sealed.
    sealing: Option<Sealing>,
}

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

/// A header in a [`Head`] buffer, tag room zero.
pub(crate) fn head(hdr: [u8; HEADER_LEN]) -> Box<Head> {
    Box::new(HeaderBytes::new(hdr).into_head())
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

fn keepalive_frame(ms: u64) -> OutFrame {
    let h = FrameHeader {
        kind: FrameKind::Keepalive,
        codec: Codec::Raw,
        device: 0,
        seq: 0,
        raw_len: 0,
        wire_len: 0,
        arg: ms,
        crc: 0,
    };
    OutFrame {
        hdr: head(h.encode(&[])),
        payload: OutPayload::Empty,
    }
}

/// Builds an abort frame (detail truncated to the limit by the caller).
pub(crate) fn abort_frame(reason: AbortReason, detail: Vec<u8>) -> OutFrame {
    let len = u32::try_from(detail.len()).unwrap_or(0);
    let h = FrameHeader {
        kind: FrameKind::Abort,
        codec: Codec::Raw,
        device: 0,
        seq: 0,
        raw_len: len,
        wire_len: len,
        arg: u64::from(reason.code()),
        crc: 0,
    };
    let payload = if len == 0 {
        OutPayload::Empty
    } else {
        OutPayload::Heap(detail)
    };
    OutFrame {
        hdr: head(h.encode(if len == 0 {
            &[]
        } else {
            detail_bytes(&payload)
        })),
        payload,
    }
}

fn detail_bytes(p: &OutPayload) -> &[u8] {
    match p {
        OutPayload::Heap(v) => v,
        _ => &[],
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

    /// A connection whose header is in waits for a free pool buffer (not for window room: that
    /// one is woken by the completions that deliver the frames before it).
    fn waiting_for_buffer(&self) -> bool {
        self.conns.iter().any(|c| match &c.rx {
            Rx::Waiting { hdr, .. } => self.reorder.admit(hdr) != Admit::Park,
            _ => false,
        })
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

    fn take_urgent(&mut self) {
        match self.urgent_rx.try_recv() {
            Ok(Urgent::Close) => {
                self.live.close(Instant::now());
            }
            Ok(Urgent::Abort { reason, detail }) => {
                // Whatever the peer does next (it closes on our abort), this is the outcome.
                self.shared.set_failure(TransportError::Aborted { reason });
                self.start_abort(reason, detail);
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                // Every handle is gone without close(): tell the peer this is no clean end.
                if !matches!(self.live.ending(), Ending::Closing { .. }) {
                    self.shared.set_failure(TransportError::Cancelled);
                    self.start_abort(AbortReason::Cancelled, b"session dropped".to_vec());
                }
            }
        }
    }

    fn start_abort(&mut self, reason: AbortReason, detail: Vec<u8>) {
        if !self.live.abort(reason, Instant::now()) {
            return;
        }
        for c in &mut self.conns {
            // Queued data is moot now; the abort goes out first on every connection.
            c.queue.clear();
            c.queued_bytes = 0;
            if !c.wr_shut {
                c.queue.push_back(abort_frame(reason, detail.clone()));
            }
        }
    }

    /// Moves frames from the session queue to the least-loaded connections.
    fn take_frames(&mut self) {
        if self.aborting() {
            return;
        }
        let n = self.conns.len().max(1);
        loop {
            let (live, after) = (&self.live, self.last_pick + 1);
            // Least loaded; among equally loaded connections the next after the last one picked,
            // so that frames trickling in one at a time still spread over every connection.
            let Some(best) = self
                .conns
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.wr_shut && !matches!(c.rx, Rx::Eof))
                .min_by_key(|(i, c)| {
                    (
                        c.queue.len() + usize::from(live.sending(*i)),
                        c.queued_bytes,
                        (i + n - after % n) % n,
                    )
                })
                .map(|(i, _)| i)
            else {
                return;
            };
            if self.conns[best].queue.len() >= CONN_QUEUE_MAX
                || self.outstanding >= self.p.window_bytes
            {
                return;
            }
            match self.out_rx.try_recv() {
                Ok(f) => {
                    self.outstanding += f.payload.len() as u64;
                    self.last_pick = best;
                    let c = &mut self.conns[best];
                    c.queued_bytes += self.head_len + f.payload.len();
                    c.queue.push_back(f);
                }
                Err(_) => return,
            }
        }
    }

    fn schedule_keepalives(&mut self, now: Instant) {
        if self.live.ending() != Ending::Open {
            return;
        }
        let ms = u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        let head_len = self.head_len;
        for (i, c) in self.conns.iter_mut().enumerate() {
            if !c.wr_shut && c.queue.is_empty() && self.live.keepalive_due(i, now) {
                c.queue.push_back(keepalive_frame(ms));
                c.queued_bytes += head_len;
                Counters::add(&self.shared.counters.keepalives_sent, 1);
            }
        }
    }

    /// Pushes submissions (linked: each waits for the previous one to succeed in full).
    fn push(&mut self, subs: Vec<Sub<Op>>, linked: bool) -> Result<(), TransportError> {
        self.ring
            .push_all(subs, linked)
            .map_err(|r| TransportError::io("io_uring submission", r.error))
    }

    fn submit_send(&mut self, i: usize) -> Result<(), TransportError> {
        let c = &mut self.conns[i];
        if self.live.sending(i) || c.wr_shut {
            return Ok(());
        }
        let Some(mut frame) = c.queue.pop_front() else {
            return Ok(());
        };
        let fd = c.sock.fd();
        let plen = frame.payload.len();
        let head_len = self.head_len;
        c.queued_bytes = c.queued_bytes.saturating_sub(head_len + plen);
        if let Some(s) = &mut c.sealing {
            // Sealed in sending order, so the counter in the nonce is the frame's position on
            // this connection; the tag replaces the CRC.
            let payload: &mut [u8] = match &mut frame.payload {
                OutPayload::Empty => &mut [],
                OutPayload::Pool(b) => b.as_mut_slice(),
                OutPayload::Heap(v) => v,
            };
            s.sealer
                .seal(&mut frame.hdr, payload)
                .map_err(|source| TransportError::Sealing { conn: i, source })?;
        }
        let now = Instant::now();
        self.live.send_started(i, now);
        let base = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let hdr_flags = if plen > 0 {
            base | libc::MSG_MORE
        } else {
            base
        };
        let hdr = Sub {
            io: Io::Send {
                fd,
                at: 0,
                len: head_len,
                flags: hdr_flags,
            },
            buf: IoBuf::Heap(frame.hdr),
            owner: Op::SendHeader {
                conn: i,
                last: plen == 0,
            },
        };
        if plen == 0 {
            self.push(vec![hdr], false)?;
        } else {
            // Only slots of the engine's pool can go out as fixed buffers (registered on first
            // use; where the kernel refuses to pin, a plain `Send`).
            let zc = match &frame.payload {
                OutPayload::Pool(b) if plen >= self.p.zerocopy_min => self.ring.fix(b).is_some(),
                _ => false,
            };
            let buf = match frame.payload {
                OutPayload::Empty => IoBuf::Empty,
                OutPayload::Pool(b) => IoBuf::Pool(b),
                OutPayload::Heap(v) => IoBuf::Heap(v.into_boxed_slice()),
            };
            let io = if zc {
                Counters::add(&self.shared.counters.zerocopy_sends, 1);
                Io::SendZc {
                    fd,
                    at: 0,
                    len: plen,
                    flags: base,
                }
            } else {
                Io::Send {
                    fd,
                    at: 0,
                    len: plen,
                    flags: base,
                }
            };
            let payload = Sub {
                io,
                buf,
                owner: Op::SendPayload { conn: i, len: plen },
            };
            self.push(vec![hdr, payload], true)?;
        }
        if self.sends_in_flight == 0 {
            self.busy_since = Some(now);
        }
        self.sends_in_flight += 1;
        Ok(())
    }

    fn reading_paused(&self) -> bool {
        self.ready.len() >= READY_MAX || self.aborting()
    }

    fn aborting(&self) -> bool {
        matches!(self.live.ending(), Ending::Aborting { .. })
    }

    fn closing(&self) -> bool {
        matches!(self.live.ending(), Ending::Closing { .. })
    }

    fn post_header_recv(&mut self, i: usize) -> Result<(), TransportError> {
        if !matches!(self.conns[i].rx, Rx::Idle) || self.reading_paused() {
            return Ok(());
        }
        self.conns[i].rx = Rx::Busy;
        // A fresh header read: liveness counts from when we started listening again.
        self.live.read_posted(i, Instant::now());
        let buf = IoBuf::Heap(Box::new([0u8; SEALED_HEAD_LEN]));
        self.submit_recv_header(i, 0, buf)
    }

    /// Reads the rest of a header (`got` bytes of it are in `buf`).
    fn submit_recv_header(
        &mut self,
        conn: usize,
        got: usize,
        buf: IoBuf,
    ) -> Result<(), TransportError> {
        let io = Io::Recv {
            fd: self.conns[conn].sock.fd(),
            at: got,
            len: self.head_len.saturating_sub(got),
            flags: libc::MSG_WAITALL,
        };
        let owner = Op::RecvHeader { conn, got };
        self.push(vec![Sub { io, buf, owner }], false)
    }

    /// Reads the rest of a payload (`got` bytes of it are in `buf`).
    fn submit_recv_payload(&mut self, owner: Op, buf: PoolBuf) -> Result<(), TransportError> {
        let Op::RecvPayload { conn, hdr, got, .. } = &owner else {
            return Ok(());
        };
        let io = Io::Recv {
            fd: self.conns[*conn].sock.fd(),
            at: *got,
            len: (hdr.wire_len as usize).saturating_sub(*got),
            flags: libc::MSG_WAITALL,
        };
        let buf = IoBuf::Pool(buf);
        self.push(vec![Sub { io, buf, owner }], false)
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

    fn send_done(&mut self, conn: usize, now: Instant) {
        self.live.send_done(conn, now);
        self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
        if self.sends_in_flight == 0 {
            if let Some(t) = self.busy_since.take() {
                let ns = u64::try_from(now.duration_since(t).as_nanos()).unwrap_or(u64::MAX);
                Counters::add(&self.shared.counters.send_busy_ns, ns);
            }
        }
    }

    fn complete(&mut self, c: Completion<Op>) -> Result<(), TransportError> {
        let res = c.result;
        let now = Instant::now();
        let counters = &self.shared.counters;
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
            Op::SendHeader { conn, last } => {
                if res < 0 {
                    return Err(errno_err(conn, "send frame header", FramePart::Header, res));
                }
                if ures(res) != self.head_len {
                    return Err(TransportError::Short {
                        op: "send frame header",
                        conn,
                        done: ures(res),
                        wanted: self.head_len,
                    });
                }
                Counters::add(&counters.bytes_sent, self.head_len as u64);
                if last {
                    Counters::add(&counters.frames_sent, 1);
                    self.send_done(conn, now);
                }
            }
            Op::SendPayload { conn, len } => {
                // A zero-copy payload stays with the ring until the kernel's notification.
                if res < 0 {
                    return Err(errno_err(
                        conn,
                        "send frame payload",
                        FramePart::Payload,
                        res,
                    ));
                }
                if ures(res) != len {
                    return Err(TransportError::Short {
                        op: "send frame payload",
                        conn,
                        done: ures(res),
                        wanted: len,
                    });
                }
                Counters::add(&counters.bytes_sent, len as u64);
                Counters::add(&counters.frames_sent, 1);
                self.outstanding = self.outstanding.saturating_sub(len as u64);
                self.send_done(conn, now);
            }
            Op::RecvHeader { conn, got } => {
                if res <= 0 {
                    let part = if got == 0 {
                        FramePart::Between
                    } else {
                        FramePart::Header
                    };
                    if res < 0 {
                        return Err(errno_err(conn, "receive frame header", part, res));
                    }
                    return self.on_eof(conn, part);
                }
                let n = ures(res);
                let got = got + n;
                Counters::add(&counters.bytes_received, n as u64);
                self.live.received(conn, now);
                if got < self.head_len {
                    return self.submit_recv_header(conn, got, c.buf);
                }
                let mut raw: Head = [0u8; SEALED_HEAD_LEN];
                if let IoBuf::Heap(b) = &c.buf {
                    let n = raw.len().min(b.len());
                    raw[..n].copy_from_slice(&b[..n]);
                }
                self.on_header(conn, raw)?;
            }
            Op::RecvPayload {
                conn,
                hdr,
                raw,
                got,
                reserved,
            } => {
                let want = hdr.wire_len as usize;
                let Some(mut buf) = c.buf.into_pool() else {
                    return Err(TransportError::Cancelled);
                };
                if res <= 0 {
                    if reserved {
                        self.reorder.unreserve(hdr.wire_len);
                    }
                    if res < 0 {
                        return Err(errno_err(
                            conn,
                            "receive frame payload",
                            FramePart::Payload,
                            res,
                        ));
                    }
                    return Err(TransportError::PeerClosed {
                        conn,
                        during: FramePart::Payload,
                    });
                }
                let n = ures(res);
                let got = got + n;
                Counters::add(&counters.bytes_received, n as u64);
                self.live.received(conn, now);
                if got < want {
                    let owner = Op::RecvPayload {
                        conn,
                        hdr,
                        raw,
                        got,
                        reserved,
                    };
                    return self.submit_recv_payload(owner, buf);
                }
                if reserved {
                    self.reorder.unreserve(hdr.wire_len);
                }
                buf.set_len(want);
                self.conns[conn].rx = Rx::Idle;
                self.on_frame(conn, hdr, &raw, Some(buf))?;
            }
        }
        Ok(())
    }

    fn on_eof(&mut self, conn: usize, part: FramePart) -> Result<(), TransportError> {
        let closing = self.closing();
        if part != FramePart::Between || !(self.p.peer_closes || closing) {
            return Err(TransportError::PeerClosed { conn, during: part });
        }
        self.conns[conn].rx = Rx::Eof;
        Ok(())
    }

    fn on_header(&mut self, conn: usize, raw: Head) -> Result<(), TransportError> {
        let h = HeaderBytes::of_head(&raw);
        let hdr = h.decode().map_err(|source| TransportError::Corrupt {
            conn,
            device: h.device(),
            seq: h.seq(),
            source,
        })?;
        let max = self
            .p
            .max_payload
            .min(u32::try_from(self.pool.slot_size()).unwrap_or(u32::MAX));
        if hdr.wire_len > max {
            return Err(TransportError::TooMany {
                what: crate::error::Limit::Payload,
                got: u64::from(hdr.wire_len),
                max: u64::from(max),
            });
        }
        self.conns[conn].rx = Rx::Waiting { hdr, raw };
        if self.reorder.admit(&hdr) == Admit::Park {
            Counters::add(&self.shared.counters.parks, 1);
        }
        self.try_admit(conn)
    }

    fn admit_waiting(&mut self) -> Result<(), TransportError> {
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].rx, Rx::Waiting { .. }) {
                self.try_admit(i)?;
            }
        }
        Ok(())
    }

    /// Starts reading the payload of a connection whose header is in, if the window and the pool
    /// allow; otherwise the connection stays parked.
    fn try_admit(&mut self, conn: usize) -> Result<(), TransportError> {
        let Rx::Waiting { hdr, raw } = self.conns[conn].rx else {
            return Ok(());
        };
        let admit = self.reorder.admit(&hdr);
        if admit == Admit::Park {
            return Ok(());
        }
        if hdr.wire_len == 0 {
            self.conns[conn].rx = Rx::Idle;
            return self.on_frame(conn, hdr, &raw, None);
        }
        // Out-of-order frames leave a quarter of the pool for frames that are next.
        let reserve = (self.pool.slots() / 4).max(1);
        if admit == Admit::Window && self.pool.free() <= reserve {
            return Ok(());
        }
        let Some(buf) = self.pool.try_acquire() else {
            return Ok(());
        };
        let reserved = admit == Admit::Window;
        if reserved {
            self.reorder.reserve(hdr.wire_len);
        }
        self.conns[conn].rx = Rx::Busy;
        let owner = Op::RecvPayload {
            conn,
            hdr,
            raw,
            got: 0,
            reserved,
        };
        self.submit_recv_payload(owner, buf)
    }

    /// A whole frame is in: verify, then deliver, hold, or act on it.
    fn on_frame(
        &mut self,
        conn: usize,
        hdr: FrameHeader,
        raw: &Head,
        mut payload: Option<PoolBuf>,
    ) -> Result<(), TransportError> {
        // Nothing of a frame goes anywhere before its tag (sealed) or CRC verified.
        if let Some(s) = &mut self.conns[conn].sealing {
            let bytes = payload.as_mut().map_or(&mut [][..], |b| b.as_mut_slice());
            s.opener
                .open(raw, bytes)
                .map_err(|source| TransportError::Unauthentic {
                    conn,
                    device: hdr.device,
                    seq: hdr.seq,
                    source,
                })?;
        } else {
            let bytes = payload.as_ref().map_or(&[][..], |b| b.as_slice());
            HeaderBytes::of_head(raw)
                .verify(&hdr, bytes)
                .map_err(|source| TransportError::Corrupt {
                    conn,
                    device: hdr.device,
                    seq: hdr.seq,
                    source,
                })?;
        }
        let bytes = payload.as_ref().map_or(&[][..], |b| b.as_slice());
        Counters::add(&self.shared.counters.frames_received, 1);
        match hdr.kind {
            FrameKind::Keepalive => Ok(()),
            FrameKind::Abort => {
                let n = bytes.len().min(crate::config::MAX_ABORT_DETAIL);
                Err(TransportError::PeerAborted {
                    // The header's kind rules bound an Abort's `arg` to 16 bits.
                    reason: AbortReason::from_code(u16::try_from(hdr.arg).unwrap_or(u16::MAX)),
                    detail: String::from_utf8_lossy(&bytes[..n]).into_owned(),
                })
            }
            kind if kind.is_sequenced() => {
                let frame = Frame {
                    header: hdr,
                    payload,
                };
                if self.reorder.insert(frame, &mut self.ready)? > 0 {
                    self.live.delivered(Instant::now());
                } else {
                    Counters::add(&self.shared.counters.frames_held, 1);
                }
                Ok(())
            }
            _ => {
                self.ready.push_back(Frame {
                    header: hdr,
                    payload,
                });
                Ok(())
            }
        }
    }

    fn deliver(&mut self) -> Result<(), TransportError> {
        if self.closing() {
            // close() is waiting for the flush; nobody reads inbound frames any more.
            self.ready.clear();
            return Ok(());
        }
        let Some(in_tx) = &self.in_tx else {
            self.ready.clear();
            return Ok(());
        };
        while let Some(f) = self.ready.pop_front() {
            match in_tx.try_send(f) {
                Ok(()) => {}
                Err(TrySendError::Full(f)) => {
                    self.shared.want_wake.store(true, Ordering::SeqCst);
                    // The consumer may have taken a frame before it could see the flag.
                    match in_tx.try_send(f) {
                        Ok(()) => continue,
                        Err(TrySendError::Full(f)) => self.ready.push_front(f),
                        Err(TrySendError::Disconnected(_)) => self.ready.clear(),
                    }
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.ready.clear();
                    break;
                }
            }
        }
        Ok(())
    }

    fn flushed(&self) -> bool {
        self.out_rx.is_empty() && self.all_sent() && self.ring.zc_pending() == 0
    }

    /// Every connection's queue is empty and nothing is in flight on it.
    fn all_sent(&self) -> bool {
        self.conns
            .iter()
            .enumerate()
            .all(|(i, c)| c.queue.is_empty() && !self.live.sending(i))
    }

    /// Tells the sans-IO clock what only the engine knows: which connections have a read in
    /// flight, and whether the reorder window is stuck (frames held, nothing delivered, and no
    /// connection carries a next frame that merely waits for a buffer or for the consumer).
    fn sync_liveness(&mut self, now: Instant) {
        for (i, c) in self.conns.iter().enumerate() {
            self.live.set_reading(i, matches!(c.rx, Rx::Busy));
        }
        let next_waiting = self.conns.iter().any(|c| match &c.rx {
            Rx::Waiting { hdr, .. } => self.reorder.admit(hdr) == Admit::Next,
            _ => false,
        });
        let stalled = self.reorder.held() > 0 && !self.reading_paused() && !next_waiting;
        self.live.set_stalled(stalled, now);
    }

    fn stall_error(&self, stall: Stall) -> TransportError {
        let after = self.p.timeout;
        match stall {
            Stall::PeerSilent { conn } => TransportError::PeerSilent { conn, after },
            Stall::Send { .. } => TransportError::Timeout {
                after,
                what: "a send to complete (peer not reading)",
            },
            Stall::Reorder => {
                let (device, expected) = self.reorder.first_waiting().unwrap_or((0, 0));
                TransportError::ReorderStall {
                    device,
                    expected,
                    waited: after,
                }
            }
            Stall::Close => TransportError::Timeout {
                after,
                what: "close (flush and peer close)",
            },
        }
    }

    fn check_time(&mut self, now: Instant) -> Result<Step, TransportError> {
        self.sync_liveness(now);
        if let Err(stall) = self.live.handle_timeout(now) {
            return Err(self.stall_error(stall));
        }
        if let Ending::Aborting { reason, .. } = self.live.ending() {
            if self.all_sent() || self.live.abort_grace_over(now).is_some() {
                return Ok(Step::Done(TransportError::Aborted { reason }));
            }
            return Ok(Step::Continue);
        }
        // Half-close our side of every connection the peer closed (destination), or of every
        // connection once all is flushed (source closing).
        let flushed = self.closing() && self.flushed();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let peer_done = matches!(c.rx, Rx::Eof);
            let idle = c.queue.is_empty() && !self.live.sending(i);
            if !c.wr_shut && idle && (peer_done || flushed) {
                c.sock.shutdown(Shutdown::Write);
                c.wr_shut = true;
                self.live.write_shut(i);
            }
        }
        let all_closed = self
            .conns
            .iter()
            .all(|c| c.wr_shut && matches!(c.rx, Rx::Eof));
        if all_closed {
            if let Some((device, expected)) = self.reorder.first_waiting() {
                return Err(TransportError::IncompleteStream { device, expected });
            }
            return Ok(Step::Done(TransportError::Closed));
        }
        if self.live.close_overdue(now) {
            return Err(self.stall_error(Stall::Close));
        }
        Ok(Step::Continue)
    }

    fn teardown(mut self, outcome: TransportError) {
        let mut outcome = outcome;
        let in_tx = self.in_tx.take();
        if let (TransportError::Closed, Some(in_tx)) = (&outcome, &in_tx) {
            // Hand the consumer what was verified before the peer closed, each frame within the
            // session timeout; a consumer that stops taking them must not see a clean close.
            while let Some(f) = self.ready.pop_front() {
                if in_tx.send_timeout(f, self.p.timeout).is_err() {
                    outcome = TransportError::Timeout {
                        after: self.p.timeout,
                        what: "the consumer to take the last frames",
                    };
                    break;
                }
            }
        }
        let deadline = Instant::now() + DRAIN_MAX.min(self.p.timeout);
        self.shared.set_failure(outcome);
        // Consumers blocked in `recv` see the disconnect and read the outcome.
        drop(in_tx);
        for c in &self.conns {
            c.sock.shutdown(Shutdown::Both);
        }
        // Cancel every operation still in flight and wait (bounded) for the kernel to hand its
        // buffer back; whatever it does not hand back is leaked with the ring, never freed.
        if !self
            .ring
            .drain(deadline.saturating_duration_since(Instant::now()))
        {
            self.ring.set_drain_limit(Duration::ZERO);
        }
    }
}
