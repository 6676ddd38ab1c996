//! The source session: drives the devices through PRE_COPY / STOP_COPY, runs the reader, codec
//! and sender stages, waits for the destination's acknowledgements, and rolls back on failure.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use vfmig_transport::{DeviceDesc, PoolBuf, SendSession, TransportError};
use vfmig_vfio::{DeviceClass, DeviceState, Identity, MigrationCaps, MigrationDevice};
use vfmig_wire::declare::{DeviceDecl, DeviceKind};
use vfmig_wire::{Control, FinalOutcome, FrameHeader, FrameKind};

use crate::adapt::Adaptive;
use crate::api::{
    ratio, CancelHandle, DeviceProgress, DeviceReport, Progress, Report, RollbackAction,
    RollbackStep, SourceOptions, Stage, StageTimes,
};
use crate::codec::{chunk_len, Choice};
use crate::dirty::DirtyLog;
use crate::error::{Phase, PipelineError, Side};
use crate::guest::Run;
use crate::initial::InitialData;
use crate::reader::{self, GuestPages, ReadMode, ReaderCmd, ReaderEvent, ReaderIo};
use crate::stages::{self, FrameSink, RateLimit};
use crate::stats::{Counters, DeviceCounters};

/// How often the control loop looks at the device, the peer and the stages.
const TICK: Duration = Duration::from_millis(10);
/// How often pre-copy throughput is measured and the dirty guest-page log is read
/// (`precopy_info` is read every control tick).
const PRECOPY_SAMPLE: Duration = Duration::from_millis(50);

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

    fn digest_key(&self) -> Option<[u8; 32]> {
        self.agreed().keys.as_ref().map(|k| *k.digest_key())
    }
}

/// Migrates devices to a destination. Blocking: run it on the VMM's migration thread.
///
/// `D` is any [`MigrationDevice`]: `Box<dyn MigrationDevice>`, a `VfioDevice`, an
/// `EmulatedDevice`. The devices must be RUNNING. On success they are left in STOP (the VMM
/// decides what follows); on failure they are walked back to RUNNING and
/// [`SourceSession::rollback_steps`] says what was done.
#[derive(Debug)]
pub struct SourceSession<D: MigrationDevice> {
    devices: Vec<D>,
    opts: SourceOptions,
    cancel: CancelHandle,
    rollback: Vec<RollbackStep>,
    /// Pre-copy information protocol and REINITs of the last run (issue 13 item 3).
    initial: InitialData,
}

/// Per-device bookkeeping of one run.
#[derive(Debug, Default)]
struct DevRun {
    data_fd: Option<Arc<OwnedFd>>,
    quiesced: bool,
    ended: Option<u64>,
    acked: Option<u64>,
    stopped: bool,
    estimate: Option<u64>,
}

/// The stage threads of one run.
#[derive(Debug)]
struct Stages {
    stop: Arc<AtomicBool>,
    cmds: Option<Sender<ReaderCmd>>,
    events: Receiver<ReaderEvent>,
    failures: Receiver<PipelineError>,
    counters: Arc<Counters>,
    adaptive: Arc<Adaptive>,
    threads: Vec<JoinHandle<()>>,
    timeout: Duration,
    /// `DirtyPages` batches sent to the reader, and how many it has finished shipping.
    page_batches: std::cell::Cell<u64>,
    page_batches_done: Arc<AtomicU64>,
}

impl Stages {
    fn start(
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
        let chunk = chunk_len(pool.slot_size()).min(max_payload);
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
                let r = stages::send_loop(out_rx, window, &*session, &c, &a, limit, &s);
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
    fn pages(&self, runs: Vec<Run>, last: bool) -> Result<(), PipelineError> {
        self.cmd(ReaderCmd::DirtyPages { runs, last })?;
        self.page_batches.set(self.page_batches.get() + 1);
        Ok(())
    }

    /// Whether the reader has shipped every batch of dirty pages it was given.
    fn pages_idle(&self) -> bool {
        self.page_batches_done.load(Ordering::SeqCst) >= self.page_batches.get()
    }

    fn cmd(&self, cmd: ReaderCmd) -> Result<(), PipelineError> {
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
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cmds = None;
        self.join();
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<D: MigrationDevice> SourceSession<D> {
    /// A session over `devices` (in session order: the destination pairs them by position).
    pub fn new(devices: Vec<D>, opts: SourceOptions) -> SourceSession<D> {
        SourceSession {
            devices,
            opts,
            cancel: CancelHandle::default(),
            rollback: Vec::new(),
            initial: InitialData::default(),
        }
    }

    /// A handle that cancels [`SourceSession::run`] from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The devices.
    pub fn devices(&self) -> &[D] {
        &self.devices
    }

    /// The devices, mutably (e.g. to resume them after a successful migration was abandoned).
    pub fn devices_mut(&mut self) -> &mut [D] {
        &mut self.devices
    }

    /// Gives the devices back.
    pub fn into_devices(self) -> Vec<D> {
        self.devices
    }

    /// What the last failed run did to bring the devices back to RUNNING (empty after success).
    pub fn rollback_steps(&self) -> &[RollbackStep] {
        &self.rollback
    }

    /// Migrates every device to the destination listening at `addr`. Blocks until the
    /// destination acknowledged every device (`DevicePrepared`), or fails.
    pub fn run(&mut self, addr: SocketAddr) -> Result<Report, PipelineError> {
        self.rollback.clear();
        let started = Instant::now();
        self.check()?;
        let descs = self
            .devices
            .iter_mut()
            .map(|d| DeviceDesc {
                name: d.name().to_owned(),
                caps: d.capabilities().bits(),
                state_size_hint: d.stop_copy_size().unwrap_or(0),
                decl: declaration(&d.identity()),
            })
            .collect();
        let session = SendSession::connect(addr, &self.opts.session, descs).map_err(|source| {
            PipelineError::Transport {
                phase: Phase::Setup,
                source,
            }
        })?;
        let session = Arc::new(session);
        let names: Vec<String> = self.devices.iter().map(|d| d.name().to_owned()).collect();
        let mut stages = match Stages::start(&session, names, &self.opts) {
            Ok(s) => s,
            Err(e) => {
                session.abort(e.abort_reason(true), &e.to_string());
                return Err(e);
            }
        };
        let mut runs: Vec<DevRun> = self.devices.iter().map(|_| DevRun::default()).collect();
        let mut downtime_start = None;
        match self.drive(&session, &stages, &mut runs, &mut downtime_start, started) {
            Ok(downtime) => {
                stages.cmds = None;
                stages.join();
                // Every device is prepared on the destination and stopped here: the decision.
                let decided = self.commit(&session);
                let elapsed = started.elapsed();
                let mut report = self.report(&stages, elapsed, Some(downtime));
                match decided {
                    Ok(outcome) => {
                        close_quietly(session);
                        report.outcome = Some(outcome);
                        Ok(report)
                    }
                    Err(e @ PipelineError::InDoubt { .. }) => {
                        // No Abort may follow a sent commit (the destination would reset what
                        // may be the only copy): a clean close, and the devices stay in STOP.
                        close_quietly(session);
                        Err(e)
                    }
                    Err(e) => {
                        // The commit was never queued, or the destination reset its devices
                        // after a failed resume: the state here is the only valid copy.
                        session.abort(e.abort_reason(true), &e.to_string());
                        self.roll_back();
                        Err(e)
                    }
                }
            }
            Err(e) => {
                session.abort(e.abort_reason(true), &e.to_string());
                stages.stop();
                self.roll_back();
                Err(e)
            }
        }
    }

    /// The decision point (docs/PROTOCOL.md, section 5.1): every destination device is prepared
    /// and every source device is in STOP. Sends *commit*, after which the source devices never
    /// run again unless the destination reports `ResumeFailed`, then waits (at most the timeout)
    /// for the destination's outcome. A commit the transport refused to queue was never sent:
    /// that is an ordinary failure, not [`PipelineError::InDoubt`].
    fn commit(&mut self, session: &SendSession) -> Result<FinalOutcome, PipelineError> {
        let in_doubt = |cause: PipelineError| PipelineError::InDoubt {
            side: Side::Source,
            cause: Box::new(cause),
        };
        session
            .send(Control::Commit.header(), None)
            .map_err(|source| PipelineError::Transport {
                phase: Phase::Commit,
                source,
            })?;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(in_doubt(PipelineError::Timeout {
                    phase: Phase::Commit,
                    what: "the destination's outcome",
                    waited: self.opts.timeout,
                }));
            }
            let frame = match session.recv_control(left.min(TICK * 10)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(TransportError::PeerAborted { reason, detail }) => {
                    return Err(in_doubt(PipelineError::PeerAborted {
                        phase: Phase::Commit,
                        reason,
                        detail,
                    }))
                }
                Err(source) => {
                    return Err(in_doubt(PipelineError::Transport {
                        phase: Phase::Commit,
                        source,
                    }))
                }
            };
            match Control::decode(
                &frame.header,
                frame.payload.as_ref().map_or(&[][..], |p| p.as_slice()),
            ) {
                Ok(Control::Outcome { outcome }) => {
                    return match outcome {
                        FinalOutcome::Resumed | FinalOutcome::Held => Ok(outcome),
                        FinalOutcome::ResumeFailed => Err(PipelineError::DestinationResumeFailed),
                        FinalOutcome::Unknown(code) => {
                            Err(in_doubt(PipelineError::UnknownOutcome { code }))
                        }
                    }
                }
                Ok(Control::Keepalive { .. } | Control::SwitchoverAck { .. }) => {}
                _ => {
                    return Err(in_doubt(PipelineError::UnexpectedFrame {
                        kind: frame.header.kind,
                        device: frame.header.device,
                        phase: Phase::Commit,
                    }))
                }
            }
        }
    }

    /// Checks start states and the P2P rule before touching anything.
    fn check(&mut self) -> Result<(), PipelineError> {
        if self.devices.is_empty() {
            return Err(PipelineError::Options {
                what: "devices",
                value: 0,
            });
        }
        self.opts.dirty_tracking.check()?;
        let multi = self.devices.len() > 1;
        for d in &mut self.devices {
            let state = d.state().map_err(|source| PipelineError::Device {
                device: d.name().to_owned(),
                phase: Phase::Setup,
                source,
            })?;
            if state != DeviceState::Running {
                return Err(PipelineError::WrongStartState {
                    device: d.name().to_owned(),
                    state,
                    expected: DeviceState::Running,
                });
            }
            let caps = d.capabilities();
            if multi && !caps.contains(MigrationCaps::P2P) && !self.opts.allow_without_p2p {
                return Err(PipelineError::P2pRequired {
                    device: d.name().to_owned(),
                    caps,
                });
            }
        }
        Ok(())
    }

    /// Everything between connecting and the last acknowledgement. Returns the downtime.
    fn drive(
        &mut self,
        session: &SendSession,
        stages: &Stages,
        runs: &mut [DevRun],
        downtime_start: &mut Option<Instant>,
        started: Instant,
    ) -> Result<Duration, PipelineError> {
        let all_p2p = self
            .devices
            .iter()
            .all(|d| d.capabilities().contains(MigrationCaps::P2P));
        let multi = self.devices.len() > 1;
        let precopy = self.opts.precopy
            && self
                .devices
                .iter()
                .all(|d| d.capabilities().contains(MigrationCaps::PRE_COPY));
        let mut watch = Watch::new(started, &self.opts);
        let mut tracker = DirtyLog::start(&self.opts.dirty_tracking, &mut self.devices)?;
        self.initial = InitialData::default();
        if precopy {
            self.initial = InitialData::opt_in(&mut self.devices);
            for (i, d) in self.devices.iter_mut().enumerate() {
                let fd = set_state(d, DeviceState::PreCopy, Phase::PreCopy)?.ok_or_else(|| {
                    PipelineError::NoDataFd {
                        device: d.name().to_owned(),
                        state: DeviceState::PreCopy,
                    }
                })?;
                let fd = Arc::new(fd);
                runs[i].data_fd = Some(fd.clone());
                stages.cmd(ReaderCmd::Add {
                    device: dev_index(i),
                    fd,
                    mode: ReadMode::PreCopy,
                })?;
            }
            if let Some(t) = tracker
                .as_ref()
                .filter(|_| self.opts.dirty_tracking.full_copy())
            {
                stages.pages(t.all_runs(), false)?;
            }
            self.precopy_until_switchover(session, stages, runs, &mut watch, &mut tracker)?;
            for i in 0..self.devices.len() {
                stages.cmd(ReaderCmd::EndPreCopy {
                    device: dev_index(i),
                })?;
            }
            while !runs.iter().all(|r| r.quiesced) {
                self.tick(session, stages, runs, &mut watch, Phase::PreCopy)?;
            }
            if multi && all_p2p {
                // RUNNING_P2P rule: every device stops initiating P2P before any stops.
                for d in &mut self.devices {
                    set_state(d, DeviceState::PreCopyP2p, Phase::PreCopy)?;
                }
            }
            *downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                let fd = set_state(d, DeviceState::StopCopy, Phase::StopCopy)?.map(Arc::new);
                if let Some(fd) = &fd {
                    runs[i].data_fd = Some(fd.clone());
                }
                stages.cmd(ReaderCmd::StopCopy {
                    device: dev_index(i),
                    fd,
                })?;
            }
        } else {
            if multi && all_p2p {
                for d in &mut self.devices {
                    set_state(d, DeviceState::RunningP2p, Phase::StopCopy)?;
                }
            }
            *downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                let fd =
                    set_state(d, DeviceState::StopCopy, Phase::StopCopy)?.ok_or_else(|| {
                        PipelineError::NoDataFd {
                            device: d.name().to_owned(),
                            state: DeviceState::StopCopy,
                        }
                    })?;
                let fd = Arc::new(fd);
                runs[i].data_fd = Some(fd.clone());
                stages.cmd(ReaderCmd::Add {
                    device: dev_index(i),
                    fd,
                    mode: ReadMode::StopCopy,
                })?;
            }
        }
        if let Some(t) = tracker {
            // Every device is stopped: no more DMA. The final report closes the dirty log.
            if self.opts.dirty_tracking.full_copy() && !precopy {
                stages.pages(t.all_runs(), false)?;
            }
            let exports = t.exports();
            let last = t.finish(&mut self.devices);
            if !exports {
                stages.pages(last, true)?;
            }
        }
        watch.progressed();
        while !runs.iter().all(|r| r.stopped) {
            self.tick(session, stages, runs, &mut watch, Phase::StopCopy)?;
            // A device whose stream is read and acknowledged leaves STOP_COPY for STOP.
            for (i, d) in self.devices.iter_mut().enumerate() {
                let r = &mut runs[i];
                if let (Some(sent), Some(acked), false) = (r.ended, r.acked, r.stopped) {
                    if sent != acked {
                        return Err(PipelineError::LengthMismatch {
                            device: dev_index(i),
                            declared: sent,
                            received: acked,
                        });
                    }
                    set_state(d, DeviceState::Stop, Phase::Acknowledge)?;
                    r.data_fd = None;
                    r.stopped = true;
                }
            }
        }
        Ok(downtime_start.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// Streams PRE_COPY until the initial data is out and the estimated STOP_COPY time fits the
    /// downtime budget (or pre-copy has run for `max_precopy`).
    fn precopy_until_switchover(
        &mut self,
        session: &SendSession,
        stages: &Stages,
        runs: &mut [DevRun],
        watch: &mut Watch,
        tracker: &mut Option<DirtyLog>,
    ) -> Result<(), PipelineError> {
        let begun = Instant::now();
        let mut last_sample = Instant::now() - PRECOPY_SAMPLE;
        let mut rate = RateMeter::new(stages.counters.total_raw());
        let mut bps = 0.0;
        // Total raw bytes when `initial_bytes` reached 0 on every device.
        let mut initial_done_at: Option<u64> = None;
        loop {
            self.tick(session, stages, runs, watch, Phase::PreCopy)?;
            if last_sample.elapsed() >= PRECOPY_SAMPLE {
                last_sample = Instant::now();
                bps = rate.sample(stages.counters.total_raw());
                // The next dirty log is read only once the reader has shipped the last batch:
                // until then the device's log keeps collecting (a page dirtied again is sent
                // once), and batches never pile up faster than the pipeline ships them.
                match tracker.as_mut() {
                    Some(t) if t.exports() => t.export(&mut self.devices),
                    Some(t) if stages.pages_idle() => {
                        let dirty = t.collect_runs(&mut self.devices);
                        if !dirty.is_empty() {
                            stages.pages(dirty, false)?;
                        }
                    }
                    _ => {}
                }
            }
            let mut initial_left = 0u64;
            let mut dirty = 0u64;
            let mut stop_copy = 0u64;
            for (i, d) in self.devices.iter_mut().enumerate() {
                let Some(fd) = runs[i].data_fd.clone() else {
                    continue;
                };
                let info = d
                    .precopy_info(fd.as_fd())
                    .map_err(|source| PipelineError::Device {
                        device: d.name().to_owned(),
                        phase: Phase::PreCopy,
                        source,
                    })?;
                if self.initial.observe(i, &info) {
                    // New initial data (REINIT): it is read in PRE_COPY again, and re-sending
                    // it is not a sign of non-convergence.
                    initial_done_at = None;
                }
                // Sizes are device data: a huge one must not overflow the sums.
                initial_left = initial_left.saturating_add(info.initial_bytes);
                dirty = dirty.saturating_add(info.dirty_bytes);
                let size = d.stop_copy_size().unwrap_or(info.dirty_bytes);
                stop_copy = stop_copy.saturating_add(size);
                runs[i].estimate = Some(
                    DeviceCounters::load(&stages.counters.devices[i].raw).saturating_add(size),
                );
            }
            if initial_left > 0 {
                // `initial_bytes` must reach 0 before PRE_COPY is left (uAPI).
                continue;
            }
            // Switch when STOP_COPY fits the downtime budget, or when what pre-copy could still
            // drain (`dirty_bytes`) would fit it: more pre-copy cannot shrink the rest.
            let fits = |bytes: u64| fits_downtime(bytes, bps, self.opts.max_downtime);
            let within_budget = fits(stop_copy) || fits(dirty);
            // Re-sending more than twice what STOP_COPY would send means the devices dirty
            // state faster than it can be sent: pre-copy does not converge, stop it.
            let raw = stages.counters.total_raw();
            let resent = raw - *initial_done_at.get_or_insert(raw);
            let not_converging = resent > stop_copy.saturating_mul(2);
            if within_budget || not_converging || begun.elapsed() >= self.opts.max_precopy {
                return Ok(());
            }
        }
    }

    /// One step of the control loop: stage events, failures, the peer's control frames, cancel,
    /// progress and the inactivity timeout.
    fn tick(
        &mut self,
        session: &SendSession,
        stages: &Stages,
        runs: &mut [DevRun],
        watch: &mut Watch,
        phase: Phase,
    ) -> Result<(), PipelineError> {
        if self.cancel.is_cancelled() {
            return Err(PipelineError::Cancelled { phase });
        }
        if let Ok(e) = stages.failures.try_recv() {
            return Err(e);
        }
        let mut news = false;
        while let Ok(ev) = stages.events.try_recv() {
            news = true;
            watch.progressed();
            match ev {
                ReaderEvent::PreCopyQuiesced { device } => {
                    if let Some(r) = runs.get_mut(usize::from(device)) {
                        r.quiesced = true;
                    }
                }
                ReaderEvent::Ended { device, raw_bytes } => {
                    if let Some(r) = runs.get_mut(usize::from(device)) {
                        r.ended = Some(raw_bytes);
                    }
                }
                ReaderEvent::Failed(e) => return Err(e),
            }
        }
        // After news from the reader, return at once so the caller acts on it (e.g. a device
        // whose end and acknowledgement are both in leaves STOP_COPY now, not a tick later).
        let wait = if news { Duration::ZERO } else { TICK };
        match session.recv_control(wait) {
            Ok(Some(f)) => {
                watch.progressed();
                let device = f.header.device;
                match (f.header.kind, runs.get_mut(usize::from(device))) {
                    (FrameKind::DevicePrepared, Some(r)) => r.acked = Some(f.header.arg),
                    (FrameKind::SwitchoverAck | FrameKind::Keepalive, _) => {}
                    (kind, _) => {
                        return Err(PipelineError::UnexpectedFrame {
                            kind,
                            device,
                            phase,
                        })
                    }
                }
            }
            Ok(None) => {}
            Err(TransportError::PeerAborted { reason, detail }) => {
                return Err(PipelineError::PeerAborted {
                    phase,
                    reason,
                    detail,
                })
            }
            Err(source) => return Err(PipelineError::Transport { phase, source }),
        }
        // Guest pages moving are progress too (pre-copy may ship only those for a while).
        watch.check(stages.counters.total_moved(), phase, self.opts.timeout)?;
        if let Some(cb) = &self.opts.progress {
            if watch.progress_due() {
                cb(&self.progress(stages, runs, phase, watch.started));
            }
        }
        Ok(())
    }

    fn progress(
        &self,
        stages: &Stages,
        runs: &[DevRun],
        phase: Phase,
        started: Instant,
    ) -> Progress {
        let elapsed = started.elapsed();
        let devices = self
            .devices
            .iter()
            .zip(runs)
            .zip(&stages.counters.devices)
            .map(|((d, r), c)| {
                let raw = DeviceCounters::load(&c.raw);
                DeviceProgress {
                    name: d.name().to_owned(),
                    phase: if r.stopped { Phase::Acknowledge } else { phase },
                    raw_bytes: raw,
                    wire_bytes: DeviceCounters::load(&c.wire),
                    rate_bps: raw as f64 / elapsed.as_secs_f64().max(1e-3),
                    estimated_total: r.ended.or(r.estimate),
                    done: r.stopped,
                }
            })
            .collect();
        Progress { elapsed, devices }
    }

    fn report(&mut self, stages: &Stages, elapsed: Duration, downtime: Option<Duration>) -> Report {
        let workers = self.opts.codec_workers.clamp(1, 64);
        let mut report = build_report(
            &stages.counters,
            self.devices
                .iter_mut()
                .map(|d| (d.name().to_owned(), d.state().ok()))
                .collect(),
            elapsed,
            downtime,
            workers,
            &describe(stages.adaptive.current()),
        );
        self.initial.fill(&mut report.devices);
        report
    }

    /// Walks every device back to RUNNING (reset first if it is in ERROR or the walk fails).
    fn roll_back(&mut self) {
        if self.opts.dirty_tracking.is_on() {
            for d in &mut self.devices {
                // Not logging (never started, or already stopped) is fine here.
                let _ = d.dma_logging_stop();
            }
        }
        self.rollback = self.devices.iter_mut().map(roll_back_one).collect();
    }
}

/// Ends a session without an Abort frame: a clean close (bounded by the session timeout). If
/// another handle still held it, dropping would abort; every stage is joined before this.
fn close_quietly(session: Arc<SendSession>) {
    if let Ok(s) = Arc::try_unwrap(session) {
        // The outcome is decided; a failed clean close changes nothing.
        let _ = s.close();
    }
}

/// `set_state` with the error carrying the device and the phase.
pub(crate) fn set_state<D: MigrationDevice>(
    d: &mut D,
    target: DeviceState,
    phase: Phase,
) -> Result<Option<OwnedFd>, PipelineError> {
    d.set_state(target).map_err(|source| PipelineError::Device {
        device: d.name().to_owned(),
        phase,
        source,
    })
}

/// Walks one device back to RUNNING.
pub(crate) fn roll_back_one<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    let action = match from {
        Some(DeviceState::Running) => RollbackAction::AlreadyRunning,
        // Aborting RESUMING needs a device reset (uAPI): walking RESUMING -> STOP would ask the
        // device to validate a partial stream (and a file sink to commit it).
        Some(DeviceState::Resuming) => reset(d, from),
        Some(state) if state != DeviceState::Error => match d.set_state(DeviceState::Running) {
            Ok(_) => RollbackAction::Walked { from: state },
            Err(_) => reset(d, from),
        },
        _ => reset(d, from),
    };
    RollbackStep { device, action }
}

/// Destination failure: every device that may hold (part of) the migrated state is reset, never
/// walked to RUNNING: once the migration failed the source keeps running with its own state, and
/// a destination device must not run with a copy the source did not commit to (nor validate a
/// partial one).
pub(crate) fn reset_one<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    let action = match from {
        Some(DeviceState::Running) => RollbackAction::AlreadyRunning,
        _ => reset(d, from),
    };
    RollbackStep { device, action }
}

/// After a commit whose resume failed: every device is reset, a RUNNING one too (it may run the
/// migrated state), so that the source may run again.
pub(crate) fn reset_committed<D: MigrationDevice>(d: &mut D) -> RollbackStep {
    let device = d.name().to_owned();
    let from = d.state().ok();
    RollbackStep {
        device,
        action: reset(d, from),
    }
}

fn reset<D: MigrationDevice>(d: &mut D, from: Option<DeviceState>) -> RollbackAction {
    match d.reset() {
        Ok(()) => match d.state() {
            Ok(DeviceState::Running) => RollbackAction::Reset { from },
            Ok(_) => match d.set_state(DeviceState::Running) {
                Ok(_) => RollbackAction::Reset { from },
                Err(error) => RollbackAction::Failed { from, error },
            },
            Err(error) => RollbackAction::Failed { from, error },
        },
        Err(error) => RollbackAction::Failed { from, error },
    }
}

pub(crate) fn dev_index(i: usize) -> u16 {
    // The transport caps sessions at 64 devices.
    u16::try_from(i).unwrap_or(u16::MAX)
}

pub(crate) fn describe(c: Choice) -> String {
    match c {
        Choice::Raw => "none".to_owned(),
        Choice::Lz4 => "lz4".to_owned(),
        Choice::Zstd(l) => format!("zstd:{l}"),
    }
}

/// Builds a report from the counters.
/// A device's identity as the handshake declares it (docs/PROTOCOL.md, "Device declarations").
pub(crate) fn declaration(id: &Identity) -> DeviceDecl {
    DeviceDecl {
        kind: match id.class {
            DeviceClass::Unspecified => DeviceKind::Unspecified,
            DeviceClass::Stream => DeviceKind::Stream,
            DeviceClass::Emulated => DeviceKind::Emulated,
            DeviceClass::Vfio => DeviceKind::Vfio,
        },
        size: id.size,
        compat: id.compat.clone(),
    }
}

pub(crate) fn build_report(
    counters: &Counters,
    devices: Vec<(String, Option<DeviceState>)>,
    elapsed: Duration,
    downtime: Option<Duration>,
    workers: usize,
    codec: &str,
) -> Report {
    let devices: Vec<DeviceReport> = devices
        .into_iter()
        .zip(&counters.devices)
        .map(|((name, final_state), c)| {
            let raw = DeviceCounters::load(&c.raw);
            let wire = DeviceCounters::load(&c.wire);
            DeviceReport {
                name,
                raw_bytes: raw,
                precopy_bytes: DeviceCounters::load(&c.precopy_raw),
                wire_bytes: wire,
                ratio: ratio(raw, wire),
                zero_chunks: DeviceCounters::load(&c.zero_chunks),
                raw_chunks: DeviceCounters::load(&c.raw_chunks),
                compressed_chunks: DeviceCounters::load(&c.compressed_chunks),
                guest_page_bytes: DeviceCounters::load(&c.guest),
                precopy_info_v2: false,
                precopy_reinits: 0,
                final_state,
            }
        })
        .collect();
    let raw_bytes = devices.iter().map(|d| d.raw_bytes).sum();
    let wire_bytes = devices.iter().map(|d| d.wire_bytes).sum();
    let stages = StageTimes {
        data_fd: counters.fd_stage.get(),
        codec: counters.codec.get(),
        network: counters.net.get(),
        waiting_downstream: counters.buffer_wait.get(),
    };
    // Busy time per thread of each stage: the largest is the stage that limited the run.
    let per_thread = [
        (Stage::DataFd, stages.data_fd),
        (
            Stage::Codec,
            stages.codec / u32::try_from(workers.max(1)).unwrap_or(1),
        ),
        (Stage::Network, stages.network),
    ];
    let limiting_stage = per_thread
        .iter()
        .max_by_key(|(_, t)| *t)
        .map_or(Stage::Network, |(s, _)| *s);
    Report {
        devices,
        raw_bytes,
        wire_bytes,
        ratio: ratio(raw_bytes, wire_bytes),
        elapsed,
        throughput_bps: raw_bytes as f64 / elapsed.as_secs_f64().max(1e-6),
        downtime,
        stages,
        limiting_stage,
        codec: codec.to_owned(),
        outcome: None,
    }
}

impl Counters {
    pub(crate) fn total_raw(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| DeviceCounters::load(&d.raw))
            .sum()
    }

    /// Device state and dirty guest page bytes moved so far: what the inactivity timeouts
    /// watch.
    pub(crate) fn total_moved(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| DeviceCounters::load(&d.raw).saturating_add(DeviceCounters::load(&d.guest)))
            .fold(0, u64::saturating_add)
    }
}

/// Raw throughput over the recent past.
#[derive(Debug)]
struct RateMeter {
    last: Instant,
    last_raw: u64,
    bps: f64,
}

impl RateMeter {
    fn new(raw: u64) -> RateMeter {
        RateMeter {
            last: Instant::now(),
            last_raw: raw,
            bps: 0.0,
        }
    }

    fn sample(&mut self, raw: u64) -> f64 {
        let dt = self.last.elapsed().as_secs_f64();
        if dt > 0.0 {
            let now = raw.saturating_sub(self.last_raw) as f64 / dt;
            // Only samples with data count: an idle pre-copy says nothing about the link.
            if now > 0.0 {
                self.bps = if self.bps == 0.0 {
                    now
                } else {
                    self.bps * 0.7 + now * 0.3
                };
            }
        }
        self.last = Instant::now();
        self.last_raw = raw;
        self.bps
    }
}

/// Whether sending `bytes` at `bps` takes at most `budget`. `bytes` comes from the devices
/// (`stop_copy_size`, `dirty_bytes`): a time too large for a [`Duration`] does not fit.
fn fits_downtime(bytes: u64, bps: f64, budget: Duration) -> bool {
    bytes == 0
        || (bps > 0.0 && Duration::try_from_secs_f64(bytes as f64 / bps).is_ok_and(|t| t <= budget))
}

/// Inactivity timeout and progress pacing.
#[derive(Debug)]
pub(crate) struct Watch {
    pub started: Instant,
    last_progress: Instant,
    last_raw: u64,
    last_report: Instant,
    interval: Duration,
}

impl Watch {
    fn new(started: Instant, opts: &SourceOptions) -> Watch {
        Watch::with_interval(started, opts.progress_interval)
    }

    pub(crate) fn with_interval(started: Instant, interval: Duration) -> Watch {
        Watch {
            started,
            last_progress: Instant::now(),
            last_raw: 0,
            last_report: Instant::now(),
            interval,
        }
    }

    pub(crate) fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Fails when neither bytes nor events moved for `timeout`.
    pub(crate) fn check(
        &mut self,
        raw: u64,
        phase: Phase,
        timeout: Duration,
    ) -> Result<(), PipelineError> {
        if raw != self.last_raw {
            self.last_raw = raw;
            self.progressed();
        }
        if self.last_progress.elapsed() > timeout {
            return Err(PipelineError::Timeout {
                phase,
                what: "progress of the migration",
                waited: timeout,
            });
        }
        Ok(())
    }

    pub(crate) fn progress_due(&mut self) -> bool {
        if self.last_report.elapsed() >= self.interval {
            self.last_report = Instant::now();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod rollback_tests {
    use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice};
    use vfmig_vfio::{DeviceState, MigrationDevice};

    use super::{fits_downtime, roll_back_one};
    use crate::api::RollbackAction;

    #[test]
    fn downtime_check_of_a_device_reporting_a_huge_state_size_does_not_panic() {
        let budget = std::time::Duration::from_millis(300);
        assert!(!fits_downtime(u64::MAX, 1.0, budget));
        assert!(!fits_downtime(u64::MAX, 1e-3, budget));
        assert!(fits_downtime(100, 1000.0, budget));
        assert!(fits_downtime(0, 0.0, budget));
    }

    #[test]
    fn a_rate_is_never_zero_and_says_its_unit() {
        assert_eq!(crate::Rate::from_bytes_per_sec(0), None);
        assert_eq!(crate::Rate::from_bits_per_sec(7), None);
        let r = crate::Rate::from_bits_per_sec(2_500_000_000).unwrap();
        assert_eq!(r.bytes_per_sec(), 312_500_000);
    }

    #[test]
    fn rollback_of_a_resuming_device_resets_it_without_asking_it_to_validate() {
        let src = EmulatedDevice::new(EmulatedConfig::new("rb", 1 << 20, 7)).unwrap();
        let mut dst = src.destination().unwrap();
        let _data_fd = dst.set_state(DeviceState::Resuming).unwrap();
        let step = roll_back_one(&mut dst);
        assert!(
            matches!(
                step.action,
                RollbackAction::Reset {
                    from: Some(DeviceState::Resuming)
                }
            ),
            "{:?}",
            step.action
        );
        assert_eq!(dst.state().unwrap(), DeviceState::Running);
        // Walking RESUMING -> STOP would have run the device's validation of the partial
        // stream and recorded its refusal; a reset aborts RESUMING without it.
        assert_eq!(dst.last_resume_error(), None);
    }
}
