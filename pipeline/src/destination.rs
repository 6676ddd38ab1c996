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
use vfmig_wire::{Codec, FrameHeader, FrameKind, DIGEST_LEN};

use crate::api::{
    CancelHandle, DestinationOptions, DeviceProgress, Progress, Report, RollbackStep,
};
use crate::error::{AbortReason, Phase, PipelineError};
use crate::source::{build_report, set_state, Watch};
use crate::stages::{self, InItem, Incoming, Received, POLL};
use crate::stats::{Counters, DeviceCounters};
use crate::writer::{self, WriterDevice, WriterEvent};

/// [`DeviceCounters::seen`] values: the furthest kind of frame received for a device.
const SEEN_PRECOPY: u8 = 1;
const SEEN_STOPCOPY: u8 = 2;
const SEEN_END: u8 = 3;

/// Verified frames the transport may hold ready for `recv` (its `READY_MAX`).
const TRANSPORT_READY: usize = 8;

/// Pool buffers the destination stages need beyond what they pass along: an input and an
/// output per decode worker, and a zero-filled slot per device for zero chunks. Everything else
/// they hold drains into the devices without needing another buffer.
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
}

#[derive(Debug)]
struct Stages {
    stop: Arc<AtomicBool>,
    events: Receiver<WriterEvent>,
    failures: Receiver<PipelineError>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Stages {
    fn start(
        session: &Arc<RecvSession>,
        devices: Vec<WriterDevice>,
        opts: &DestinationOptions,
    ) -> Result<Stages, PipelineError> {
        let n = devices.len();
        let pool = session.pool().clone();
        let workers = opts.codec_workers.clamp(1, 64);
        let counters = Arc::new(Counters::new(n).with_notices(opts.notice.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let timeout = opts.timeout;
        let (recv_tx, recv_rx) = bounded::<Received>(workers * 2);
        let (item_tx, item_rx) = bounded::<InItem>(workers * 2 + 2 * n);
        let (ev_tx, ev_rx) = bounded(4 * n + 4);
        let (fail_tx, fail_rx) = bounded(workers + 4);
        let mut threads = Vec::new();
        {
            let (pool, c, s) = (pool.clone(), counters.clone(), stop.clone());
            let guest = opts.guest_memory.clone();
            threads.push(stages::spawn("vfmig-writer", move || {
                writer::run(pool, devices, guest, item_rx, ev_tx, c, s, timeout)
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
                if let Err(e) = receive_loop(&session, n, &recv_tx, &item_tx, &c, &s, timeout) {
                    let _ = fail_tx.try_send(e);
                }
            })?);
        }
        Ok(Stages {
            stop,
            events: ev_rx,
            failures: fail_rx,
            counters,
            threads,
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Dispatches received frames: data to the decoders, markers straight to the writer (which
/// restores each device's order across both). Ends when the source closes the session.
fn receive_loop(
    session: &RecvSession,
    devices: usize,
    data: &Sender<Received>,
    markers: &Sender<InItem>,
    counters: &Counters,
    stop: &AtomicBool,
    timeout: Duration,
) -> Result<(), PipelineError> {
    let phase = Phase::Resume;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let frame = match session.recv(POLL) {
            Ok(f) => f,
            Err(TransportError::Timeout { .. }) => continue,
            Err(TransportError::Closed) => return Ok(()),
            Err(TransportError::PeerAborted { reason, detail }) => {
                return Err(PipelineError::PeerAborted {
                    phase,
                    reason: AbortReason::from_code(reason),
                    code: reason,
                    detail,
                })
            }
            Err(source) => return Err(PipelineError::Transport { phase, source }),
        };
        let t0 = Instant::now();
        let h: FrameHeader = frame.header;
        if h.kind.is_sequenced() && usize::from(h.device) >= devices {
            return Err(PipelineError::UnexpectedFrame {
                kind: h.kind,
                device: h.device,
                phase,
            });
        }
        let lost = || PipelineError::Timeout {
            phase,
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
                data.send_timeout(
                    Received {
                        header: h,
                        payload: frame.payload,
                    },
                    timeout,
                )
                .map_err(|_| lost())?;
            }
            FrameKind::EndOfDevice => {
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
                markers
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
            FrameKind::PreCopyDone => {
                let item = Incoming::PreCopyDone { raw: h.arg };
                markers
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
    /// side's [`DestinationSession::declarations`]) and runs.
    pub fn run(&mut self, listener: &Listener) -> Result<Report, PipelineError> {
        let mut cfg = self.opts.session.clone();
        cfg.declared_devices = Some(self.declarations());
        let session = listener
            .accept(&cfg)
            .map_err(|source| PipelineError::Transport {
                phase: Phase::Setup,
                source,
            })?;
        self.run_session(session)
    }

    /// Runs on an accepted session.
    pub fn run_session(&mut self, session: RecvSession) -> Result<Report, PipelineError> {
        self.resets.clear();
        let started = Instant::now();
        let session = Arc::new(session);
        if let Err(e) = self.check(&session) {
            session.abort(e.abort_reason(false).code(), &e.to_string());
            return Err(e);
        }
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
        let mut stages = match Stages::start(&session, writer_devices, &self.opts) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(&session, None, e)),
        };
        match self.drive(&session, &stages, fds, started) {
            Ok(()) => {
                let elapsed = started.elapsed();
                stages.stop();
                if let Ok(s) = Arc::try_unwrap(session) {
                    let _ = s.close();
                }
                let devices = self
                    .devices
                    .iter_mut()
                    .map(|d| (d.name().to_owned(), d.state().ok()))
                    .collect();
                Ok(build_report(
                    &stages.counters,
                    devices,
                    elapsed,
                    None,
                    self.opts.codec_workers.clamp(1, 64),
                    "decode",
                ))
            }
            Err(e) => Err(self.fail(&session, Some(&mut stages), e)),
        }
    }

    fn check(&mut self, session: &RecvSession) -> Result<(), PipelineError> {
        // The pool must hold what the transport may keep (its reorder window plus verified
        // frames not yet taken) and what this side keeps in flight, or decoding would wait for
        // buffers that only decoding can free.
        let pool = session.pool();
        let agreed = session.agreed();
        let window = usize::try_from(agreed.window_bytes / pool.slot_size().max(1) as u64)
            .unwrap_or(usize::MAX);
        let needed = window
            .saturating_add(TRANSPORT_READY + usize::from(agreed.streams))
            .saturating_add(own_buffers(self.opts.codec_workers, self.devices.len()));
        if pool.slots() < needed {
            return Err(PipelineError::Options {
                what: "session.pool_slots (destination: reorder window + stages need more)",
                value: pool.slots() as u64,
            });
        }
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
        Ok(())
    }

    /// Tells the source, stops the stages, resets every device.
    fn fail(
        &mut self,
        session: &RecvSession,
        stages: Option<&mut Stages>,
        e: PipelineError,
    ) -> PipelineError {
        if !matches!(e, PipelineError::PeerAborted { .. }) {
            session.abort(e.abort_reason(false).code(), &e.to_string());
        }
        if let Some(s) = stages {
            s.stop();
        }
        self.resets = self
            .devices
            .iter_mut()
            .map(crate::source::reset_one)
            .collect();
        e
    }

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
                    let ack = control(FrameKind::DeviceResumed, device, total);
                    session
                        .send_control(ack, &[])
                        .map_err(|source| PipelineError::Transport {
                            phase: Phase::Acknowledge,
                            source,
                        })?;
                }
                Ok(WriterEvent::PreCopyDone { device, raw }) => {
                    watch.progressed();
                    // The marker's `arg` is the raw length of the device's PRE_COPY stream, and
                    // the writer emits this event only once all of it was written: that is the
                    // pre-copy figure of this side's report.
                    if let Some(c) = stages.counters.device(device) {
                        c.precopy_raw.store(raw, Ordering::Relaxed);
                    }
                    // Everything the source sent in PRE_COPY is loaded.
                    let ack = control(FrameKind::SwitchoverAck, device, raw);
                    session
                        .send_control(ack, &[])
                        .map_err(|source| PipelineError::Transport {
                            phase: Phase::PreCopy,
                            source,
                        })?;
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
        if self.opts.resume_devices {
            // RUNNING_P2P rule on the destination: all devices reach RUNNING_P2P before any
            // runs, so none receives P2P traffic while it cannot process it.
            if n > 1 {
                for d in &mut self.devices {
                    set_state(d, DeviceState::RunningP2p, Phase::Acknowledge)?;
                }
            }
            for d in &mut self.devices {
                set_state(d, DeviceState::Running, Phase::Acknowledge)?;
            }
        }
        Ok(())
    }

    fn progress(&self, stages: &Stages, done: &[bool], started: Instant) -> Progress {
        let elapsed = started.elapsed();
        Progress {
            elapsed,
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

/// A control frame to the source (no payload, seq 0).
fn control(kind: FrameKind, device: u16, arg: u64) -> FrameHeader {
    FrameHeader {
        kind,
        codec: Codec::Raw,
        device,
        seq: 0,
        raw_len: 0,
        wire_len: 0,
        arg,
        crc: 0,
    }
}
