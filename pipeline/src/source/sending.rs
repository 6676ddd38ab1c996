//! The source's stage threads of one run (reader, codec workers, sender) and the transport
//! session as the sender's frame sink.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use vfmig_transport::{PoolBuf, SendSession};
use vfmig_wire::{FrameHeader, FrameKind};

use crate::adapt::Adaptive;
use crate::api::SourceOptions;
use crate::codec::chunk_len;
use crate::error::{Phase, PipelineError};
use crate::guest::Run;
use crate::reader::{self, GuestPages, ReaderCmd, ReaderEvent, ReaderIo};
use crate::stages::{self, FrameSink, RateLimit};
use crate::stats::Counters;

impl FrameSink for SendSession {
    fn send_frame(
        &self,
        header: FrameHeader,
        payload: Option<PoolBuf>,
    ) -> Result<(), PipelineError> {
        let phase = if header.kind == FrameKind::PreCopyData {
            Phase::PreCopy
        } else {
            Phase::StopCopy
        };
        self.send(header, payload)
            .map_err(|source| PipelineError::Transport { phase, source })
    }

    fn send_hash_trailer(
        &self,
        header: FrameHeader,
        payload: PoolBuf,
    ) -> Result<(), PipelineError> {
        let phase = if header.kind == FrameKind::PreCopyData {
            Phase::PreCopy
        } else {
            Phase::StopCopy
        };
        SendSession::send_hash_trailer(self, header, payload)
            .map_err(|source| PipelineError::Transport { phase, source })
    }

    fn digest_key(&self) -> Option<[u8; 32]> {
        self.agreed().keys.as_ref().map(|k| *k.digest_key())
    }
}

/// The session as the sender's sink, noting when the first device-state frame went out (the
/// report's `first_data_at`).
struct StampedSink<'a> {
    session: &'a SendSession,
    counters: &'a Counters,
}

impl FrameSink for StampedSink<'_> {
    fn send_frame(
        &self,
        header: FrameHeader,
        payload: Option<PoolBuf>,
    ) -> Result<(), PipelineError> {
        let data = matches!(
            header.kind,
            FrameKind::PreCopyData | FrameKind::StopCopyData
        );
        let r = FrameSink::send_frame(self.session, header, payload);
        if data && r.is_ok() {
            self.counters
                .first_send
                .get_or_init(std::time::SystemTime::now);
        }
        r
    }

    fn send_hash_trailer(
        &self,
        header: FrameHeader,
        payload: PoolBuf,
    ) -> Result<(), PipelineError> {
        // Only device state frames carry a hash trailer.
        let r = FrameSink::send_hash_trailer(self.session, header, payload);
        if r.is_ok() {
            self.counters
                .first_send
                .get_or_init(std::time::SystemTime::now);
        }
        r
    }

    fn digest_key(&self) -> Option<[u8; 32]> {
        FrameSink::digest_key(self.session)
    }
}

/// The stage threads of one run.
#[derive(Debug)]
pub(super) struct Stages {
    stop: Arc<AtomicBool>,
    pub(super) cmds: Option<Sender<ReaderCmd>>,
    pub(super) events: Receiver<ReaderEvent>,
    pub(super) failures: Receiver<PipelineError>,
    pub(super) counters: Arc<Counters>,
    pub(super) adaptive: Arc<Adaptive>,
    threads: Vec<JoinHandle<()>>,
    timeout: Duration,
    /// `DirtyPages` batches sent to the reader, and how many it has finished shipping.
    page_batches: std::cell::Cell<u64>,
    page_batches_done: Arc<AtomicU64>,
}

impl Stages {
    pub(super) fn start(
        session: &Arc<SendSession>,
        names: Vec<String>,
        opts: &SourceOptions,
    ) -> Result<Stages, PipelineError> {
        let n = names.len();
        let pool = session.pool().clone();
        let workers = opts.codec_workers.clamp(1, 64);
        let counters = Arc::new(Counters::new(n).with_notices(opts.notice.clone()));
        let adaptive = Adaptive::new(opts.compress, workers);
        let adaptive = Arc::new(if session.peer().ip().is_loopback() {
            adaptive.on_this_host()
        } else {
            adaptive
        });
        let stop = Arc::new(AtomicBool::new(false));
        let timeout = opts.timeout;
        let (cmd_tx, cmd_rx) = bounded(4 * n + 4);
        let (ev_tx, ev_rx) = bounded(4 * n + 4);
        let (fail_tx, fail_rx) = bounded(workers + 4);
        // Bounded so that reading runs at most a few chunks ahead of encoding and sending.
        let (chunk_tx, chunk_rx) = bounded(workers * 2);
        let (out_tx, out_rx) = bounded(workers * 2 + n * 2);
        let max_payload = usize::try_from(session.agreed().max_payload).unwrap_or(usize::MAX);
        // Room for the hash trailer of every device state frame (`stages::encode_worker`).
        let chunk = chunk_len(pool.slot_size())
            .min(max_payload.saturating_sub(vfmig_wire::HASH_TRAILER_LEN))
            .max(1);
        let mut threads = Vec::new();
        let page_batches_done = Arc::new(AtomicU64::new(0));
        {
            let io = ReaderIo {
                cmds: cmd_rx,
                chunks: chunk_tx,
                markers: out_tx.clone(),
                events: ev_tx,
                counters: counters.clone(),
                stop: stop.clone(),
                // Dirty guest pages travel on device 0's stream, so one sequence orders them.
                guest: opts
                    .dirty_tracking
                    .ship_memory()
                    .cloned()
                    .map(|memory| GuestPages {
                        memory,
                        carrier: 0,
                        batches_done: page_batches_done.clone(),
                    }),
                adaptive: Some(adaptive.clone()),
            };
            let pool = pool.clone();
            threads.push(stages::spawn("vfmig-reader", move || {
                reader::run(pool, names, io, chunk, timeout)
            })?);
        }
        for _ in 0..workers {
            let (rx, tx, pool, a, c, s, f) = (
                chunk_rx.clone(),
                out_tx.clone(),
                pool.clone(),
                adaptive.clone(),
                counters.clone(),
                stop.clone(),
                fail_tx.clone(),
            );
            let codecs = session.agreed().codecs;
            threads.push(stages::spawn("vfmig-encode", move || {
                if let Err(e) = stages::encode_worker(rx, tx, pool, a, c, s, timeout, codecs) {
                    let _ = f.try_send(e);
                }
            })?);
        }
        drop((chunk_rx, out_tx));
        {
            let (session, c, a, s, f) = (
                session.clone(),
                counters.clone(),
                adaptive.clone(),
                stop.clone(),
                fail_tx,
            );
            let limit = opts
                .max_bandwidth
                .map(|r| RateLimit::new(r.bytes_per_sec()));
            // Each device may have at most every pool slot in flight.
            let window = u64::try_from(pool.slots()).unwrap_or(u64::MAX) + 8;
            threads.push(stages::spawn("vfmig-send", move || {
                let sink = StampedSink {
                    session: &session,
                    counters: &c,
                };
                let r = stages::send_loop(out_rx, window, &sink, &c, &a, limit, &s);
                if let Err(e) = r {
                    let _ = f.try_send(e);
                }
            })?);
        }
        Ok(Stages {
            stop,
            cmds: Some(cmd_tx),
            events: ev_rx,
            failures: fail_rx,
            counters,
            adaptive,
            threads,
            timeout,
            page_batches: std::cell::Cell::new(0),
            page_batches_done,
        })
    }

    /// Hands a batch of dirty guest pages to the reader.
    pub(super) fn pages(&self, runs: Vec<Run>, last: bool) -> Result<(), PipelineError> {
        self.cmd(ReaderCmd::DirtyPages { runs, last })?;
        self.page_batches.set(self.page_batches.get() + 1);
        Ok(())
    }

    /// Whether the reader has shipped every batch of dirty pages it was given.
    pub(super) fn pages_idle(&self) -> bool {
        self.page_batches_done.load(Ordering::SeqCst) >= self.page_batches.get()
    }

    pub(super) fn cmd(&self, cmd: ReaderCmd) -> Result<(), PipelineError> {
        let sent = self
            .cmds
            .as_ref()
            .is_some_and(|c| c.send_timeout(cmd, self.timeout).is_ok());
        if sent {
            return Ok(());
        }
        // The reader stopped: report why, if it said.
        Err(self
            .events
            .try_iter()
            .find_map(|ev| match ev {
                ReaderEvent::Failed(e) => Some(e),
                _ => None,
            })
            .unwrap_or(PipelineError::StageLost { stage: "reader" }))
    }

    /// Stops every stage and waits for its thread.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cmds = None;
        self.join();
    }

    pub(super) fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
