//! The destination session: receives verified frames, decodes them on the codec workers, writes
//! each device's stream in order into its RESUMING data fd, checks length and digest, lets the
//! device validate (RESUMING -> STOP) and acknowledges to the source. On failure it resets its
//! devices and tells the source.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use vfmig_transport::{Listener, RecvSession, TransportError};
use vfmig_vfio::{DeviceState, MigrationCaps, MigrationDevice};
use vfmig_wire::{AbortReason, Codec, Control, FinalOutcome, FrameHeader, FrameKind, DIGEST_LEN};

use crate::api::{
    CancelHandle, DestinationOptions, DeviceProgress, Progress, Report, RollbackStep,
};
use crate::error::{Phase, PipelineError, Side};
use crate::report::build_report;
use crate::rollback::{reset_committed, reset_one, set_state};
use crate::stages::{self, InItem, Incoming, Received, POLL};
use crate::stats::{Counters, DeviceCounters};
use crate::watch::Watch;
use crate::writer::{self, WriterDevice, WriterEvent};

/// [`DeviceCounters::seen`] values: the furthest kind of frame received for a device.
const SEEN_PRECOPY: u8 = 1;
const SEEN_STOPCOPY: u8 = 2;
const SEEN_END: u8 = 3;

/// Verified frames the transport may hold ready for `recv` (its `READY_MAX`).
const TRANSPORT_READY: usize = 8;

/// Pool buffers the destination stages need beyond what they pass along: an input and an
/// output per decode worker, and a zero-filled slot per device for zero chunks. Everything else
/// they hold drains into the devices without needing another buffer. The output slot is what
/// keeps decompression copy-free; a worker that finds none free decompresses into its own
/// scratch and copies back over its input, so decoding never waits on the pool (the writer may
/// park the frames after a missing one in every other slot).
fn own_buffers(workers: usize, devices: usize) -> usize {
    2 * workers.clamp(1, 64) + devices
}

/// Receives devices from a source. Blocking: run it on the VMM's migration thread.
///
/// The devices pair with the source's by position. They are moved to RESUMING, loaded, and
/// validated by RESUMING -> STOP; on success they stay in STOP unless
/// [`DestinationOptions::resume_devices`] is set. On failure every device is reset (which ends
/// RESUMING) and the source is told why.
#[derive(Debug)]
pub struct DestinationSession<D: MigrationDevice> {
    devices: Vec<D>,
    opts: DestinationOptions,
    cancel: CancelHandle,
    resets: Vec<RollbackStep>,
    /// Between a commit and [`DestinationSession::finish`].
    committed: Option<Committed>,
    /// The last receive ended in doubt; the devices hold a prepared copy in STOP.
    in_doubt: bool,
}

/// A session whose source committed, waiting for the VMM's outcome.
#[derive(Debug)]
struct Committed {
    session: Arc<RecvSession>,
    stages: Stages,
    started: Instant,
}

#[derive(Debug)]
struct Stages {
    stop: Arc<AtomicBool>,
    events: Receiver<WriterEvent>,
    failures: Receiver<PipelineError>,
    decisions: Receiver<Decision>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    /// Codec workers running (what the pool can feed, at most the option).
    workers: usize,
}

impl Stages {
    fn start(
        session: &Arc<RecvSession>,
        devices: Vec<WriterDevice>,
        opts: &DestinationOptions,
        workers: usize,
    ) -> Result<Stages, PipelineError> {
        let n = devices.len();
        let pool = session.pool().clone();
        let counters = Arc::new(Counters::new(n).with_notices(opts.notice.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let timeout = opts.timeout;
        let (recv_tx, recv_rx) = bounded::<Received>(workers * 2);
        let (item_tx, item_rx) = bounded::<InItem>(workers * 2 + 2 * n);
        let (ev_tx, ev_rx) = bounded(4 * n + 4);
        let (fail_tx, fail_rx) = bounded(workers + 4);
        let (dec_tx, dec_rx) = bounded(4);
        let mut threads = Vec::new();
        {
            let (pool, c, s) = (pool.clone(), counters.clone(), stop.clone());
            let guest = opts.guest_memory.clone();
            let key = session.agreed().keys.as_ref().map(|k| *k.digest_key());
            threads.push(stages::spawn("vfmig-writer", move || {
                writer::run(pool, devices, guest, item_rx, ev_tx, c, s, timeout, key)
            })?);
        }
        for _ in 0..workers {
            let (rx, tx, pool, c, s, f) = (
                recv_rx.clone(),
                item_tx.clone(),
                pool.clone(),
                counters.clone(),
                stop.clone(),
                fail_tx.clone(),
            );
            threads.push(stages::spawn("vfmig-decode", move || {
                if let Err(e) = stages::decode_worker(rx, tx, pool, c, s, timeout) {
                    let _ = f.try_send(e);
                }
            })?);
        }
        drop(recv_rx);
        {
            let (session, c, s) = (session.clone(), counters.clone(), stop.clone());
            threads.push(stages::spawn("vfmig-recv", move || {
                let out = Outputs {
                    data: &recv_tx,
                    markers: &item_tx,
                    decisions: &dec_tx,
                };
                if let Err(e) = receive_loop(&session, n, &out, &c, &s, timeout) {
                    let _ = fail_tx.try_send(e);
                }
            })?);
        }
        Ok(Stages {
            stop,
            events: ev_rx,
            failures: fail_rx,
            decisions: dec_rx,
            counters,
            threads,
            workers,
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the source says about the end of the session, as the receive stage sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// A `Commit` frame arrived.
    Commit,
    /// The source closed the session cleanly (after every frame it sent was delivered).
    Closed,
}

/// Where the receive stage hands what it received.
struct Outputs<'a> {
    data: &'a Sender<Received>,
    markers: &'a Sender<InItem>,
    decisions: &'a Sender<Decision>,
}

/// Dispatches received frames: data to the decoders, markers straight to the writer (which
/// restores each device's order across both), the source's decision to the control loop. Ends
/// when the source closes the session.
fn receive_loop(
    session: &RecvSession,
    devices: usize,
    out: &Outputs<'_>,
    counters: &Counters,
    stop: &AtomicBool,
    timeout: Duration,
) -> Result<(), PipelineError> {
    // What the source is sending, as the frames say: errors name it truthfully.
    let mut phase = Phase::Setup;
    let mut ended = vec![false; devices];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let frame = match session.recv(POLL) {
            Ok(f) => f,
            Err(TransportError::Timeout { .. }) => continue,
            Err(TransportError::Closed) => {
                // A source closes only after every device's EndOfDevice; a close before that is
                // a source that died (its kernel closed the sockets), known now, not at timeout.
                if let Some(device) = ended.iter().position(|e| !e) {
                    return Err(PipelineError::SourceGone {
                        phase,
                        device: u16::try_from(device).unwrap_or(u16::MAX),
                    });
                }
                // Bounded: the control loop takes at most two decisions.
                let _ = out.decisions.send_timeout(Decision::Closed, timeout);
                return Ok(());
            }
            Err(TransportError::PeerAborted { reason, detail }) => {
                return Err(PipelineError::PeerAborted {
                    phase,
                    reason,
                    detail,
                })
            }
            Err(source) => return Err(PipelineError::Transport { phase, source }),
        };
        let t0 = Instant::now();
        let h: FrameHeader = frame.header;
        phase = match (phase, h.kind) {
            (Phase::Setup, FrameKind::PreCopyData | FrameKind::DirtyPages) => Phase::PreCopy,
            (_, FrameKind::StopCopyData | FrameKind::PreCopyDone) => Phase::StopCopy,
            (p, _) => p,
        };
        if h.kind.is_sequenced() && usize::from(h.device) >= devices {
            return Err(PipelineError::UnexpectedFrame {
                kind: h.kind,
                device: h.device,
                phase,
            });
        }
        let at = phase;
        let lost = || PipelineError::Timeout {
            phase: at,
            what: "the decode stage to take a frame",
            waited: timeout,
        };
        // What the source is streaming, for the progress callback's phase.
        if let Some(c) = counters.device(h.device) {
            match h.kind {
                FrameKind::PreCopyData => c.seen.fetch_max(SEEN_PRECOPY, Ordering::Relaxed),
                FrameKind::StopCopyData => c.seen.fetch_max(SEEN_STOPCOPY, Ordering::Relaxed),
                FrameKind::EndOfDevice => c.seen.fetch_max(SEEN_END, Ordering::Relaxed),
                _ => 0,
            };
        }
        match h.kind {
            FrameKind::PreCopyData | FrameKind::StopCopyData | FrameKind::DirtyPages => {
                out.data
                    .send_timeout(
                        Received {
                            header: h,
                            payload: frame.payload,
                        },
                        timeout,
                    )
                    .map_err(|_| lost())?;
            }
            FrameKind::EndOfDevice => {
                if let Some(e) = ended.get_mut(usize::from(h.device)) {
                    *e = true;
                }
                if ended.iter().all(|&e| e) {
                    // Every stream is in: what follows is the source's decision.
                    phase = Phase::Commit;
                }
                let mut digest = [0u8; DIGEST_LEN];
                match &frame.payload {
                    Some(p) if p.len() == DIGEST_LEN && h.codec == Codec::Raw => {
                        digest.copy_from_slice(p.as_slice());
                    }
                    _ => {
                        return Err(PipelineError::UnexpectedFrame {
                            kind: h.kind,
                            device: h.device,
                            phase,
                        })
                    }
                }
                let item = Incoming::End {
                    total: h.arg,
                    digest,
                };
                out.markers
                    .send_timeout(
                        InItem {
                            device: h.device,
                            seq: h.seq,
                            item,
                        },
                        timeout,
                    )
                    .map_err(|_| lost())?;
            }
            FrameKind::PreCopyDone | FrameKind::InitialDataSent => {
                let item = if h.kind == FrameKind::PreCopyDone {
                    Incoming::PreCopyDone { raw: h.arg }
                } else {
                    Incoming::InitialDone { raw: h.arg }
                };
                out.markers
                    .send_timeout(
                        InItem {
                            device: h.device,
                            seq: h.seq,
                            item,
                        },
                        timeout,
                    )
                    .map_err(|_| lost())?;
            }
            FrameKind::Commit => {
                out.decisions
                    .send_timeout(Decision::Commit, timeout)
                    .map_err(|_| lost())?;
                // The decision is the last frame the stages take (the control loop reads the
                // session itself from here on): end now, so that stopping the stages does not
                // wait out a receive timeout, and the channels this stage feeds close at once.
                return Ok(());
            }
            FrameKind::Keepalive => {}
            kind => {
                return Err(PipelineError::UnexpectedFrame {
                    kind,
                    device: h.device,
                    phase,
                })
            }
        }
        counters.net.add_since(t0);
    }
}

impl<D: MigrationDevice> DestinationSession<D> {
    /// A session over `devices`, paired with the source's by position.
    pub fn new(devices: Vec<D>, opts: DestinationOptions) -> DestinationSession<D> {
        DestinationSession {
            devices,
            opts,
            cancel: CancelHandle::default(),
            resets: Vec::new(),
            committed: None,
            in_doubt: false,
        }
    }

    /// A handle that cancels a run from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The devices.
    pub fn devices(&self) -> &[D] {
        &self.devices
    }

    /// The devices, mutably.
    pub fn devices_mut(&mut self) -> &mut [D] {
        &mut self.devices
    }

    /// Gives the devices back.
    pub fn into_devices(self) -> Vec<D> {
        self.devices
    }

    /// What the last failed run did to its devices (reset to RUNNING).
    pub fn reset_steps(&self) -> &[RollbackStep] {
        &self.resets
    }

    /// What this side declares about its devices in the handshake (see
    /// `vfmig_transport::SessionConfig::declared_devices`): a session configuration for
    /// [`Listener::accept`] should carry them, so that a source whose devices cannot pair with
    /// these is refused before any device moves. [`DestinationSession::run`] does so.
    pub fn declarations(&self) -> Vec<vfmig_wire::declare::DeviceDecl> {
        self.devices
            .iter()
            .map(|d| crate::source::declaration(&d.identity()))
            .collect()
    }

    /// Accepts one source on `listener` (using [`DestinationOptions::session`], with this
    /// side's [`DestinationSession::declarations`]) and runs the
    /// whole session: [`DestinationSession::receive`], then (with
    /// [`DestinationOptions::resume_devices`]) [`DestinationSession::resume`], then
    /// [`DestinationSession::finish`].
    pub fn run(&mut self, listener: &Listener) -> Result<Report, PipelineError> {
        self.check_idle()?;
        let session = self.accept(listener)?;
        self.run_session(session)
    }

    /// [`DestinationSession::run`] on an accepted session.
    pub fn run_session(&mut self, session: RecvSession) -> Result<Report, PipelineError> {
        self.receive_session(session)?;
        if !self.opts.resume_devices {
            return self.finish(FinalOutcome::Held);
        }
        match self.resume() {
            Ok(()) => self.finish(FinalOutcome::Resumed),
            Err(e) => {
                // `finish` resets the devices before the source learns the outcome.
                self.finish(FinalOutcome::ResumeFailed)?;
                Err(e)
            }
        }
    }

    /// Step 1 of a VMM-driven destination: accepts one source on `listener`, loads every
    /// device, lets each validate its state (RESUMING -> STOP), reports them *prepared* and
    /// waits for the source's decision (docs/PROTOCOL.md, section 5.1).
    ///
    /// `Ok(())`: the source committed. The devices are in STOP with the migrated state and the
    /// source's devices never run again; the VMM loads its RAM, resumes the devices (itself, or
    /// with [`DestinationSession::resume`]) and then calls [`DestinationSession::finish`]
    /// promptly: the source waits for that outcome at most its timeout, then reports in doubt.
    ///
    /// `Err(PipelineError::InDoubt { .. })`: the decision cannot be known here; the devices
    /// stay in STOP (see [`PipelineError::in_doubt_guidance`]). Any other `Err`: the migration
    /// failed before the decision, the devices were reset and the source rolls back.
    pub fn receive(&mut self, listener: &Listener) -> Result<(), PipelineError> {
        self.check_idle()?;
        let session = self.accept(listener)?;
        self.receive_session(session)
    }

    fn accept(&self, listener: &Listener) -> Result<RecvSession, PipelineError> {
        let mut cfg = self.opts.session.clone();
        cfg.declared_devices = Some(self.declarations());
        listener
            .accept(&cfg)
            .map_err(|source| PipelineError::Transport {
                phase: Phase::Setup,
                source,
            })
    }

    /// Refuses a new stream while the devices hold state that may be the only copy (in doubt)
    /// or that the source committed to: loading another stream over it would destroy it.
    /// Finish first (`resume`, `reset_devices` or `finish`).
    fn check_idle(&self) -> Result<(), PipelineError> {
        if self.in_doubt || self.committed.is_some() {
            return Err(PipelineError::WrongStep {
                step: "receive",
                phase: Some(Phase::Commit),
            });
        }
        Ok(())
    }

    /// [`DestinationSession::receive`] on an accepted session.
    pub fn receive_session(&mut self, session: RecvSession) -> Result<(), PipelineError> {
        self.check_idle()?;
        self.resets.clear();
        self.committed = None;
        self.in_doubt = false;
        let started = Instant::now();
        let session = Arc::new(session);
        let workers = match self.check(&session) {
            Ok(w) => w,
            Err(e) => {
                session.abort(e.abort_reason(false), &e.to_string());
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        for d in &mut self.devices {
            match set_state(d, DeviceState::Resuming, Phase::Setup) {
                Ok(Some(fd)) => fds.push(Arc::new(fd)),
                Ok(None) => {
                    let e = PipelineError::NoDataFd {
                        device: d.name().to_owned(),
                        state: DeviceState::Resuming,
                    };
                    return Err(self.fail(&session, None, e));
                }
                Err(e) => return Err(self.fail(&session, None, e)),
            }
        }
        let writer_devices = self
            .devices
            .iter()
            .zip(&fds)
            .map(|(d, fd)| WriterDevice {
                name: d.name().to_owned(),
                fd: fd.clone(),
            })
            .collect();
        let mut stages = match Stages::start(&session, writer_devices, &self.opts, workers) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(&session, None, e)),
        };
        if let Err(e) = self.drive(&session, &stages, fds, started) {
            return Err(self.fail(&session, Some(&mut stages), e));
        }
        match self.await_decision(&stages) {
            Ok(()) => {
                stages.stop();
                self.committed = Some(Committed {
                    session,
                    stages,
                    started,
                });
                Ok(())
            }
            Err(e @ PipelineError::InDoubt { .. }) => {
                // Keep the devices in STOP: they may hold the only copy. An Abort is safe: a
                // source that has not committed rolls back on it, one that has is in doubt.
                let reason = match &e {
                    PipelineError::InDoubt { cause, .. } => cause.abort_reason(false),
                    _ => AbortReason::Internal,
                };
                session.abort(reason, &e.to_string());
                stages.stop();
                self.in_doubt = true;
                Err(e)
            }
            Err(e) => Err(self.fail(&session, Some(&mut stages), e)),
        }
    }

    /// Step 2 (optional): moves every device STOP -> RUNNING_P2P (all, when several and all
    /// support P2P) -> RUNNING (all), the RUNNING_P2P order on the destination. Only after a commit
    /// ([`DestinationSession::receive`] returned `Ok`), or after an in-doubt end once the operator
    /// knows the source sent commit (it reports in doubt too, or success; docs/PROTOCOL.md, 5.1).
    pub fn resume(&mut self) -> Result<(), PipelineError> {
        if self.committed.is_none() && !self.in_doubt {
            return Err(PipelineError::NotCommitted);
        }
        // A device without P2P has no RUNNING_P2P (allow_without_p2p): then there is no order
        // to keep, and asking for that state would only fail.
        let p2p = self
            .devices
            .iter()
            .all(|d| d.capabilities().contains(MigrationCaps::P2P));
        if self.devices.len() > 1 && p2p {
            for d in &mut self.devices {
                set_state(d, DeviceState::RunningP2p, Phase::Commit)?;
            }
        }
        for d in &mut self.devices {
            set_state(d, DeviceState::Running, Phase::Commit)?;
        }
        // Only a resume that reached RUNNING ends the doubt: after a partial failure the
        // devices can still be reset through `reset_devices`.
        self.in_doubt = false;
        Ok(())
    }

    /// Finishes an in-doubt end the other way: the source did not commit (it reports a failure
    /// and runs again), so every device is reset. Only after
    /// [`DestinationSession::receive`] ended in [`PipelineError::InDoubt`].
    pub fn reset_devices(&mut self) -> Result<&[RollbackStep], PipelineError> {
        if !self.in_doubt {
            return Err(PipelineError::WrongStep {
                step: "reset_devices",
                phase: None,
            });
        }
        self.in_doubt = false;
        self.resets = self.devices.iter_mut().map(reset_committed).collect();
        Ok(&self.resets)
    }

    /// Step 3: tells the source what happened after the commit and ends the session.
    /// `Resumed`: the devices run here. `Held`: they hold the state in STOP for their owner.
    /// `ResumeFailed`: resuming failed; every device is reset *before* the source learns it, so
    /// the source may run again (the report's `outcome` says `ResumeFailed`). The send is best
    /// effort: if the link is gone the source reports in doubt, and this side's outcome stands.
    pub fn finish(&mut self, outcome: FinalOutcome) -> Result<Report, PipelineError> {
        let Some(c) = self.committed.take() else {
            return Err(PipelineError::NotCommitted);
        };
        if outcome == FinalOutcome::ResumeFailed {
            self.resets = self.devices.iter_mut().map(reset_committed).collect();
        }
        let frame = Control::Outcome { outcome };
        let sent_at = std::time::SystemTime::now();
        // A failed send leaves the source in doubt; the decision here was made either way.
        if c.session.send_control(frame.header(), &[]).is_ok() {
            // The source closes once it has the outcome. Closing first could overtake the
            // outcome: each connection is FIFO, the session is not.
            let deadline = Instant::now() + self.opts.timeout;
            while Instant::now() < deadline {
                match c.session.recv(POLL) {
                    Ok(_) | Err(TransportError::Timeout { .. }) => {}
                    Err(_) => break,
                }
            }
        }
        let elapsed = c.started.elapsed();
        if let Ok(s) = Arc::try_unwrap(c.session) {
            let _ = s.close();
        }
        let devices = self
            .devices
            .iter_mut()
            .map(|d| (d.name().to_owned(), d.state().ok()))
            .collect();
        let mut report = build_report(
            &c.stages.counters,
            devices,
            elapsed,
            None,
            c.stages.workers,
            "decode",
        );
        report.outcome = Some(outcome);
        report.final_ack_at = Some(sent_at);
        Ok(report)
    }

    /// Every device is prepared: waits (at most the timeout) for the source's decision.
    fn await_decision(&mut self, stages: &Stages) -> Result<(), PipelineError> {
        let in_doubt = |cause: PipelineError| PipelineError::InDoubt {
            side: Side::Destination,
            cause: Box::new(cause),
        };
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if self.cancel.is_cancelled() {
                return Err(in_doubt(PipelineError::Cancelled {
                    phase: Phase::Commit,
                }));
            }
            if let Ok(e) = stages.failures.try_recv() {
                return Err(match e {
                    // An Abort before the decision: the source did not commit and rolls back.
                    e @ PipelineError::PeerAborted { .. } => e,
                    e => in_doubt(e),
                });
            }
            match stages.decisions.recv_timeout(POLL) {
                Ok(Decision::Commit) => return Ok(()),
                Ok(Decision::Closed) => {
                    return Err(in_doubt(PipelineError::Transport {
                        phase: Phase::Commit,
                        source: TransportError::Closed,
                    }))
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(in_doubt(PipelineError::Timeout {
                    phase: Phase::Commit,
                    what: "the source's decision (commit or abort)",
                    waited: self.opts.timeout,
                }));
            }
        }
    }

    /// Checks the session against this side's devices and pool; returns how many codec
    /// workers the pool can feed (at most [`DestinationOptions::codec_workers`]).
    fn check(&mut self, session: &RecvSession) -> Result<usize, PipelineError> {
        // The pool must hold what the transport may keep (its reorder window plus verified
        // frames not yet taken) and what this side keeps in flight, or decoding would wait for
        // buffers that only decoding can free. Workers beyond what the pool can feed would
        // only wait for slots: the session runs with fewer rather than fail.
        let pool = session.pool();
        let agreed = session.agreed();
        let window = usize::try_from(agreed.window_bytes / pool.slot_size().max(1) as u64)
            .unwrap_or(usize::MAX);
        let fixed = window.saturating_add(TRANSPORT_READY + usize::from(agreed.streams));
        let fits =
            |w: usize| fixed.saturating_add(own_buffers(w, self.devices.len())) <= pool.slots();
        let Some(workers) = (1..=self.opts.codec_workers.clamp(1, 64))
            .rev()
            .find(|&w| fits(w))
        else {
            return Err(PipelineError::Options {
                what: "session.pool_slots (destination: reorder window + stages need more)",
                value: pool.slots() as u64,
            });
        };
        let remote = session.agreed().devices.len();
        if remote != self.devices.len() {
            return Err(PipelineError::DeviceCount {
                source_devices: remote,
                destination_devices: self.devices.len(),
            });
        }
        if self.devices.len() > 1 && !self.opts.allow_without_p2p {
            for d in &self.devices {
                let caps = d.capabilities();
                if !caps.contains(MigrationCaps::P2P) {
                    return Err(PipelineError::P2pRequired {
                        device: d.name().to_owned(),
                        caps,
                    });
                }
            }
        }
        Ok(workers)
    }

    /// Tells the source, stops the stages, resets every device.
    fn fail(
        &mut self,
        session: &RecvSession,
        stages: Option<&mut Stages>,
        e: PipelineError,
    ) -> PipelineError {
        if !matches!(e, PipelineError::PeerAborted { .. }) {
            session.abort(e.abort_reason(false), &e.to_string());
        }
        if let Some(s) = stages {
            s.stop();
        }
        self.resets = self.devices.iter_mut().map(reset_one).collect();
        e
    }

    /// Loads every device and reports each *prepared*; returns once all are.
    fn drive(
        &mut self,
        session: &RecvSession,
        stages: &Stages,
        fds: Vec<Arc<OwnedFd>>,
        started: Instant,
    ) -> Result<(), PipelineError> {
        let n = self.devices.len();
        let mut fds: Vec<Option<Arc<OwnedFd>>> = fds.into_iter().map(Some).collect();
        let mut done = vec![false; n];
        let mut acked = vec![false; n];
        let mut watch = Watch::with_interval(started, self.opts.progress_interval);
        while !done.iter().all(|&d| d) {
            if self.cancel.is_cancelled() {
                return Err(PipelineError::Cancelled {
                    phase: Phase::Resume,
                });
            }
            if let Ok(e) = stages.failures.try_recv() {
                return Err(e);
            }
            match stages.decisions.try_recv() {
                // The source decides only after every device was prepared.
                Ok(Decision::Commit) => {
                    return Err(PipelineError::UnexpectedFrame {
                        kind: FrameKind::Commit,
                        device: 0,
                        phase: Phase::Resume,
                    })
                }
                Ok(Decision::Closed) => {
                    return Err(PipelineError::Transport {
                        phase: Phase::Resume,
                        source: TransportError::Closed,
                    })
                }
                Err(_) => {}
            }
            match stages.events.recv_timeout(POLL) {
                Ok(WriterEvent::StreamVerified { device, total }) => {
                    watch.progressed();
                    let i = usize::from(device);
                    let d = self
                        .devices
                        .get_mut(i)
                        .ok_or(PipelineError::StageLost { stage: "writer" })?;
                    // The device validates what it loaded.
                    d.set_state(DeviceState::Stop).map_err(|source| {
                        PipelineError::DeviceRefused {
                            device: d.name().to_owned(),
                            source,
                        }
                    })?;
                    fds[i] = None;
                    done[i] = true;
                    let prepared = Control::DevicePrepared {
                        device,
                        total_raw_bytes: total,
                    };
                    session
                        .send_control(prepared.header(), &[])
                        .map_err(|source| PipelineError::Transport {
                            phase: Phase::Acknowledge,
                            source,
                        })?;
                }
                Ok(
                    ev @ (WriterEvent::PreCopyDone { device, raw }
                    | WriterEvent::InitialLoaded { device, raw }),
                ) => {
                    watch.progressed();
                    if matches!(ev, WriterEvent::PreCopyDone { .. }) {
                        // The marker's `arg` is the raw length of the device's PRE_COPY stream,
                        // and the writer emits this event only once all of it was written: that
                        // is the pre-copy figure of this side's report.
                        if let Some(c) = stages.counters.device(device) {
                            c.precopy_raw.store(raw, Ordering::Relaxed);
                        }
                    }
                    // The device's initial data is loaded: the switchover-ack, one per
                    // `InitialDataSent` marker (again after a REINIT); `PreCopyDone` acks a
                    // device only if no marker did (issue 13; uAPI `initial_bytes`).
                    let i = usize::from(device);
                    let initial = matches!(ev, WriterEvent::InitialLoaded { .. });
                    if initial || acked.get(i) == Some(&false) {
                        if let Some(a) = acked.get_mut(i) {
                            *a = true;
                        }
                        let ack = Control::SwitchoverAck {
                            device,
                            raw_bytes: raw,
                        };
                        session.send_control(ack.header(), &[]).map_err(|source| {
                            PipelineError::Transport {
                                phase: Phase::PreCopy,
                                source,
                            }
                        })?;
                    }
                }
                Ok(WriterEvent::Failed(e)) => return Err(e),
                Err(_) => {}
            }
            // Guest pages written are progress too (pre-copy may carry only those for a while).
            watch.check(
                stages.counters.total_moved(),
                Phase::Resume,
                self.opts.timeout,
            )?;
            if let Some(cb) = &self.opts.progress {
                if watch.progress_due() {
                    cb(&self.progress(stages, &done, started));
                }
            }
        }
        Ok(())
    }

    fn progress(&self, stages: &Stages, done: &[bool], started: Instant) -> Progress {
        let elapsed = started.elapsed();
        Progress {
            elapsed,
            phase: Phase::Resume,
            devices: self
                .devices
                .iter()
                .zip(&stages.counters.devices)
                .enumerate()
                .map(|(i, (d, c))| {
                    let raw = DeviceCounters::load(&c.raw);
                    // The furthest the source's stream got: nothing yet (just after the
                    // handshake), pre-copy data, stop-copy data, its end (being verified).
                    let phase = match c.seen.load(Ordering::Relaxed) {
                        SEEN_END => Phase::Acknowledge,
                        SEEN_STOPCOPY => Phase::StopCopy,
                        SEEN_PRECOPY => Phase::PreCopy,
                        _ => Phase::Setup,
                    };
                    DeviceProgress {
                        name: d.name().to_owned(),
                        phase,
                        raw_bytes: raw,
                        wire_bytes: DeviceCounters::load(&c.wire),
                        rate_bps: raw as f64 / elapsed.as_secs_f64().max(1e-3),
                        estimated_total: None,
                        done: done.get(i).copied().unwrap_or(false),
                    }
                })
                .collect(),
        }
    }
}
