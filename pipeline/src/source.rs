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
    CancelHandle, DeviceProgress, PrecopyLimit, Progress, Report, RollbackStep, SourceOptions,
};
use crate::codec::chunk_len;
use crate::dirty::DirtyLog;
use crate::error::{Phase, PipelineError, Side};
use crate::guest::Run;
use crate::initial::InitialData;
use crate::reader::{self, GuestPages, ReadMode, ReaderCmd, ReaderEvent, ReaderIo};
use crate::report::{build_report, describe};
use crate::rollback::{roll_back_one, set_state};
use crate::stages::{self, FrameSink, RateLimit};
use crate::stats::{Counters, DeviceCounters};
use crate::status::{DeviceStatus, SourceStatus};
use crate::watch::{fits_downtime, RateMeter, Watch};

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

/// Migrates devices to a destination. Blocking: run it on the VMM's migration thread.
///
/// `D` is any [`MigrationDevice`]: `Box<dyn MigrationDevice>`, a `VfioDevice`, an
/// `EmulatedDevice`. The devices must be RUNNING. On success they are left in STOP (the VMM
/// decides what follows); on failure they are walked back to RUNNING and
/// [`SourceSession::rollback_steps`] says what was done.
///
/// Two ways to drive it:
/// - [`SourceSession::run`]: one call; the library switches over when its downtime estimate
///   fits `max_downtime` and the destination's switchover-ack is in.
/// - Steps, for a VMM that decides the switchover itself (QEMU's `pause-before-switchover`):
///   [`SourceSession::start`], then [`SourceSession::status`] in a loop (each call runs one
///   step of the control loop, at most ~10 ms; call it at least every 100 ms during pre-copy),
///   then, with the vCPUs paused, [`SourceSession::switchover`], then
///   [`SourceSession::finish`] for the report. [`SourceSession::abort`] rolls back from any
///   step; dropping the session with a step in progress does the same. `run` is these steps.
#[derive(Debug)]
pub struct SourceSession<D: MigrationDevice> {
    devices: Vec<D>,
    opts: SourceOptions,
    cancel: CancelHandle,
    rollback: Vec<RollbackStep>,
    active: Option<Active>,
    /// The last `finish` ended in doubt: the devices are in STOP with their state.
    in_doubt: bool,
    /// Pre-copy information protocol and REINITs of the last run (issue 13 item 3).
    initial: InitialData,
}

/// Per-device bookkeeping of one run.
#[derive(Debug)]
struct DevRun {
    data_fd: Option<Arc<OwnedFd>>,
    quiesced: bool,
    ended: Option<u64>,
    /// `DevicePrepared` arrived, with this many bytes.
    acked: Option<u64>,
    stopped: bool,
    estimate: Option<u64>,
    initial_bytes: u64,
    dirty_bytes: u64,
    stop_copy_bytes: Option<u64>,
    /// `InitialDataSent` was asked of the reader for the current initial data.
    initial_marked: bool,
    /// `InitialDataSent` markers asked for (one more after each REINIT).
    marks: u32,
    /// `SwitchoverAck`s received: one per marker.
    acks: u32,
    rate: RateMeter,
}

impl DevRun {
    /// The destination acknowledged every initial-data marker sent so far.
    fn switchover_acked(&self) -> bool {
        self.marks > 0 && self.acks >= self.marks
    }
}

impl Default for DevRun {
    fn default() -> Self {
        DevRun {
            data_fd: None,
            quiesced: false,
            ended: None,
            acked: None,
            stopped: false,
            estimate: None,
            initial_bytes: 0,
            dirty_bytes: 0,
            stop_copy_bytes: None,
            initial_marked: false,
            marks: 0,
            acks: 0,
            rate: RateMeter::new(0),
        }
    }
}

/// A session between [`SourceSession::start`] and [`SourceSession::finish`].
#[derive(Debug)]
struct Active {
    session: Arc<SendSession>,
    stages: Stages,
    runs: Vec<DevRun>,
    watch: Watch,
    tracker: Option<DirtyLog>,
    /// Pre-copy is used (the option, and every device supports it).
    precopy: bool,
    pre: PreCopyState,
    phase: Phase,
    downtime_start: Option<Instant>,
    started: Instant,
}

/// Pre-copy sampling and the automatic switchover decision.
#[derive(Debug)]
struct PreCopyState {
    begun: Instant,
    last_sample: Instant,
    rate: RateMeter,
    bps: f64,
    /// Total raw bytes when `initial_bytes` reached 0 on every device.
    initial_done_at: Option<u64>,
    /// When the initial data was out and the acks were still missing.
    ack_wait_since: Option<Instant>,
    due: bool,
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
            active: None,
            in_doubt: false,
            initial: InitialData::default(),
        }
    }

    /// A handle that cancels [`SourceSession::run`] (or the step in progress) from another
    /// thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The devices.
    pub fn devices(&self) -> &[D] {
        &self.devices
    }

    /// The devices, mutably (e.g. to resume them after a successful migration was abandoned, or
    /// to roll back after an in-doubt end once the destination is known to have failed).
    pub fn devices_mut(&mut self) -> &mut [D] {
        &mut self.devices
    }

    /// Gives the devices back (a step in progress is aborted first).
    pub fn into_devices(mut self) -> Vec<D> {
        self.abort();
        std::mem::take(&mut self.devices)
    }

    /// What the last failed run did to bring the devices back to RUNNING (empty after success).
    pub fn rollback_steps(&self) -> &[RollbackStep] {
        &self.rollback
    }

    /// Migrates every device to the destination listening at `addr`, switching over on its own
    /// (see [`SourceStatus::switchover_due`]). Blocks until the destination reported its
    /// outcome, or fails. Built from [`SourceSession::start`], [`SourceSession::status`],
    /// [`SourceSession::switchover`] and [`SourceSession::finish`].
    pub fn run(&mut self, addr: SocketAddr) -> Result<Report, PipelineError> {
        self.start(addr)?;
        // Without pre-copy the switchover is due at once: no control step first (a step waits
        // up to `TICK` for the destination's frames, which here only delays the stream).
        let due_now = self.active.as_ref().is_some_and(|a| a.pre.due);
        while !due_now && !self.status()?.switchover_due {}
        self.switchover()?;
        self.finish()
    }

    /// Step 1: checks the devices, connects and handshakes, starts the stages and, when every
    /// device supports it and [`SourceOptions::precopy`] is set, moves the devices to PRE_COPY
    /// and starts streaming. On failure the devices are rolled back.
    pub fn start(&mut self, addr: SocketAddr) -> Result<(), PipelineError> {
        if self.active.is_some() || self.in_doubt {
            // In doubt, the stopped devices may hold the only copy: the VMM decides first
            // (`roll_back_devices`, or leaving them to the destination).
            return Err(PipelineError::WrongStep {
                step: "start",
                phase: self.active.as_ref().map(|a| a.phase),
            });
        }
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
        let stages = match Stages::start(&session, names, &self.opts) {
            Ok(s) => s,
            Err(e) => {
                session.abort(e.abort_reason(true), &e.to_string());
                return Err(e);
            }
        };
        let precopy = self.opts.precopy
            && self
                .devices
                .iter()
                .all(|d| d.capabilities().contains(MigrationCaps::PRE_COPY));
        let raw = stages.counters.total_raw();
        self.active = Some(Active {
            session,
            stages,
            runs: self.devices.iter().map(|_| DevRun::default()).collect(),
            watch: Watch::new(started, &self.opts),
            tracker: None,
            precopy,
            pre: PreCopyState {
                begun: Instant::now(),
                last_sample: Instant::now() - PRECOPY_SAMPLE,
                rate: RateMeter::new(raw),
                bps: 0.0,
                initial_done_at: None,
                ack_wait_since: None,
                due: !precopy,
            },
            phase: Phase::Setup,
            downtime_start: None,
            started,
        });
        self.with_active(Self::begin)
    }

    /// Step 2, repeated: runs one step of the control loop (stage events, the destination's
    /// frames, `precopy_info`, the dirty log, the progress callback; at most ~10 ms) and says
    /// where the migration is. A failure aborts the session and rolls the devices back.
    pub fn status(&mut self) -> Result<SourceStatus, PipelineError> {
        self.with_active(|s, a| {
            match a.phase {
                Phase::PreCopy => {
                    s.tick(a)?;
                    s.sample_precopy(a)?;
                }
                Phase::StopCopy => s.step_stop_copy(a)?,
                _ => s.tick(a)?,
            }
            Ok(s.snapshot(a))
        })
    }

    /// Step 3: the switchover, called once the VMM paused its vCPUs. Ends pre-copy, takes every
    /// device through the RUNNING_P2P quiescing order (PRE_COPY_P2P or RUNNING_P2P for all before
    /// any stops) and then STOP_COPY, and streams the rest in the background; the downtime
    /// starts here. Does not wait for the switchover-ack: [`SourceStatus::switchover_acked`]
    /// says whether it came.
    pub fn switchover(&mut self) -> Result<(), PipelineError> {
        match self.active.as_ref().map(|a| a.phase) {
            Some(Phase::Setup | Phase::PreCopy) => self.with_active(Self::switch),
            phase => Err(PipelineError::WrongStep {
                step: "switchover",
                phase,
            }),
        }
    }

    /// Step 4: waits until every device is prepared on the destination and stopped here, sends
    /// the commit (docs/PROTOCOL.md, section 5.1), waits for the destination's outcome and
    /// returns the report. See [`SourceSession::run`] for the errors; `InDoubt` leaves the
    /// devices in STOP.
    pub fn finish(&mut self) -> Result<Report, PipelineError> {
        match self.active.as_ref().map(|a| a.phase) {
            Some(Phase::StopCopy) => {}
            phase => {
                return Err(PipelineError::WrongStep {
                    step: "finish",
                    phase,
                })
            }
        }
        self.with_active(|s, a| {
            while !a.runs.iter().all(|r| r.stopped) {
                s.step_stop_copy(a)?;
            }
            Ok(())
        })?;
        let Some(mut a) = self.active.take() else {
            return Err(PipelineError::StageLost { stage: "control" });
        };
        a.stages.cmds = None;
        a.stages.join();
        self.enter(&mut a, Phase::Commit);
        // Every device is prepared on the destination and stopped here: the decision.
        let decided = self.commit(&a.session);
        let decided_at = std::time::SystemTime::now();
        // The guest is down until the destination said what it did with the state.
        let downtime = a.downtime_start.map_or(Duration::ZERO, |t| t.elapsed());
        let mut report = self.report(&a.stages, a.started.elapsed(), Some(downtime));
        report.max_downtime_exceeded = downtime > self.opts.max_downtime;
        match decided {
            Ok(outcome) => {
                report.outcome = Some(outcome);
                report.final_ack_at = Some(decided_at);
                self.enter(&mut a, Phase::Done);
                // The session's last handle moves out here: a clean close, never the Abort a
                // dropped session sends.
                close_quietly(a.session);
                Ok(report)
            }
            Err(e @ PipelineError::InDoubt { .. }) => {
                // No Abort may follow a sent commit (the destination would reset what may be
                // the only copy): a clean close, and the devices stay in STOP.
                close_quietly(a.session);
                self.in_doubt = true;
                Err(e)
            }
            Err(e) => {
                // The commit was never queued, or the destination reset its devices after a
                // failed resume: the state here is the only valid copy.
                a.session.abort(e.abort_reason(true), &e.to_string());
                self.roll_back();
                Err(e)
            }
        }
    }

    /// Aborts the step in progress: tells the destination (which resets its devices), stops
    /// the stages and walks the devices back to RUNNING ([`SourceSession::rollback_steps`]).
    /// Returns whether a session was in progress. After [`SourceSession::finish`] returned,
    /// the decision is made and there is nothing to abort.
    pub fn abort(&mut self) -> bool {
        let Some(a) = self.active.take() else {
            return false;
        };
        let e = PipelineError::Cancelled { phase: a.phase };
        self.fail(a, &e);
        true
    }

    /// Finishes an in-doubt end on the source's side: the destination reported that it failed
    /// (it reset its devices), so the devices here walk back to RUNNING. Only after
    /// [`SourceSession::finish`] (or `run`) ended in [`PipelineError::InDoubt`]; see
    /// docs/PROTOCOL.md, section 5.1, for when this is right.
    pub fn roll_back_devices(&mut self) -> Result<&[RollbackStep], PipelineError> {
        if !self.in_doubt {
            return Err(PipelineError::WrongStep {
                step: "roll_back_devices",
                phase: self.active.as_ref().map(|a| a.phase),
            });
        }
        self.in_doubt = false;
        self.roll_back();
        Ok(&self.rollback)
    }

    /// Runs `f` on the active session; a failure aborts it and rolls back.
    fn with_active<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Active) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        let Some(mut a) = self.active.take() else {
            return Err(PipelineError::WrongStep {
                step: "a step before start",
                phase: None,
            });
        };
        match f(self, &mut a) {
            Ok(v) => {
                self.active = Some(a);
                Ok(v)
            }
            Err(e) => {
                self.fail(a, &e);
                Err(e)
            }
        }
    }

    fn fail(&mut self, mut a: Active, e: &PipelineError) {
        a.session.abort(e.abort_reason(true), &e.to_string());
        a.stages.stop();
        self.roll_back();
    }

    /// Enters a phase and reports it at once through the progress callback.
    fn enter(&self, a: &mut Active, phase: Phase) {
        a.phase = phase;
        if let Some(cb) = &self.opts.progress {
            cb(&self.progress(&a.stages, &a.runs, phase, a.started));
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

    /// Dirty tracking, then PRE_COPY for every device.
    fn begin(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        a.tracker = DirtyLog::start(&self.opts.dirty_tracking, &mut self.devices)?;
        self.initial = InitialData::default();
        self.enter(a, Phase::Setup);
        if !a.precopy {
            return Ok(());
        }
        self.initial = InitialData::opt_in(&mut self.devices);
        for (i, d) in self.devices.iter_mut().enumerate() {
            open_stream(d, i, a, ReadMode::PreCopy)?;
        }
        if let Some(t) = a
            .tracker
            .as_ref()
            .filter(|_| self.opts.dirty_tracking.full_copy())
        {
            a.stages.pages(t.all_runs(), false)?;
        }
        a.pre.begun = Instant::now();
        self.enter(a, Phase::PreCopy);
        Ok(())
    }

    /// The switchover: pre-copy ends, the devices quiesce (P2P order) and enter STOP_COPY.
    fn switch(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        let all_p2p = self
            .devices
            .iter()
            .all(|d| d.capabilities().contains(MigrationCaps::P2P));
        let multi = self.devices.len() > 1;
        if a.precopy {
            for i in 0..self.devices.len() {
                a.stages.cmd(ReaderCmd::EndPreCopy {
                    device: dev_index(i),
                })?;
            }
            while !a.runs.iter().all(|r| r.quiesced) {
                self.tick(a)?;
            }
            if multi && all_p2p {
                // RUNNING_P2P rule: every device stops initiating P2P before any stops.
                for d in &mut self.devices {
                    set_state(d, DeviceState::PreCopyP2p, Phase::PreCopy)?;
                }
            }
            a.downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                let fd = set_state(d, DeviceState::StopCopy, Phase::StopCopy)?.map(Arc::new);
                if let Some(fd) = &fd {
                    a.runs[i].data_fd = Some(fd.clone());
                }
                a.stages.cmd(ReaderCmd::StopCopy {
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
            a.downtime_start = Some(Instant::now());
            for (i, d) in self.devices.iter_mut().enumerate() {
                open_stream(d, i, a, ReadMode::StopCopy)?;
            }
        }
        if let Some(t) = a.tracker.take() {
            // Every device is stopped: no more DMA. The final report closes the dirty log.
            if self.opts.dirty_tracking.full_copy() && !a.precopy {
                a.stages.pages(t.all_runs(), false)?;
            }
            let exports = t.exports();
            let last = t.finish(&mut self.devices);
            if !exports {
                a.stages.pages(last, true)?;
            }
        }
        for r in &mut a.runs {
            r.initial_bytes = 0;
        }
        a.watch.progressed();
        self.enter(a, Phase::StopCopy);
        Ok(())
    }

    /// One step after the switchover: a device whose stream is read and prepared on the
    /// destination leaves STOP_COPY for STOP.
    fn step_stop_copy(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        self.tick(a)?;
        for (i, d) in self.devices.iter_mut().enumerate() {
            let r = &mut a.runs[i];
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
        Ok(())
    }

    /// Pre-copy: samples throughput and the dirty log, reads `precopy_info`, marks the end of
    /// each device's initial data, and decides whether the automatic switchover is due: the
    /// initial data is out and acknowledged, and the estimated STOP_COPY time fits the downtime
    /// budget (or pre-copy does not converge, or has run for `max_precopy`).
    fn sample_precopy(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        if a.pre.last_sample.elapsed() >= PRECOPY_SAMPLE {
            a.pre.last_sample = Instant::now();
            a.pre.bps = a.pre.rate.sample(a.stages.counters.total_raw());
            for (r, c) in a.runs.iter_mut().zip(&a.stages.counters.devices) {
                r.rate.sample(DeviceCounters::load(&c.raw));
            }
            // The next dirty log is read only once the reader has shipped the last batch:
            // until then the device's log keeps collecting (a page dirtied again is sent
            // once), and batches never pile up faster than the pipeline ships them.
            match a.tracker.as_mut() {
                Some(t) if t.exports() => t.export(&mut self.devices),
                Some(t) if a.stages.pages_idle() => {
                    let dirty = t.collect_runs(&mut self.devices);
                    if !dirty.is_empty() {
                        a.stages.pages(dirty, false)?;
                    }
                }
                _ => {}
            }
        }
        let mut initial_left = 0u64;
        let mut dirty = 0u64;
        let mut stop_copy = 0u64;
        for (i, d) in self.devices.iter_mut().enumerate() {
            let r = &mut a.runs[i];
            let Some(fd) = r.data_fd.clone() else {
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
                // New initial data (REINIT): it is read in PRE_COPY again, re-sending it is not a
                // sign of non-convergence, and the destination acknowledges it again.
                a.pre.initial_done_at = None;
                r.initial_marked = false;
            }
            // Sizes are device data: a huge one must not overflow the sums.
            initial_left = initial_left.saturating_add(info.initial_bytes);
            dirty = dirty.saturating_add(info.dirty_bytes);
            let size = d.stop_copy_size().ok();
            stop_copy = stop_copy.saturating_add(size.unwrap_or(info.dirty_bytes));
            r.initial_bytes = info.initial_bytes;
            r.dirty_bytes = info.dirty_bytes;
            r.stop_copy_bytes = size;
            r.estimate = Some(
                DeviceCounters::load(&a.stages.counters.devices[i].raw)
                    .saturating_add(size.unwrap_or(info.dirty_bytes)),
            );
            if info.initial_bytes == 0 && !r.initial_marked {
                // Every initial byte was read from the fd: the destination acks once it has
                // loaded them (docs/PROTOCOL.md, `InitialDataSent`).
                r.initial_marked = true;
                r.marks += 1;
                a.stages.cmd(ReaderCmd::MarkInitial {
                    device: dev_index(i),
                })?;
            }
        }
        let over_time = a.pre.begun.elapsed() >= self.opts.max_precopy;
        let fits = |bytes: u64| fits_downtime(bytes, a.pre.bps, self.opts.max_downtime);
        // Switch when STOP_COPY fits the downtime budget, or when what pre-copy could still
        // drain (`dirty_bytes`) would fit it: more pre-copy cannot shrink the rest.
        let within_budget = initial_left == 0 && (fits(stop_copy) || fits(dirty));
        // The abort is about the downtime estimate itself (STOP_COPY bytes at the measured rate).
        let estimate_fits = initial_left == 0 && fits(stop_copy);
        if over_time && !estimate_fits && self.opts.on_max_precopy == PrecopyLimit::Abort {
            return Err(PipelineError::PrecopyTooLong {
                limit: self.opts.max_precopy,
            });
        }
        if initial_left > 0 {
            // `initial_bytes` must reach 0 before PRE_COPY is left (uAPI).
            a.pre.due = false;
            // Initial data to send again (a REINIT): the wait for its ack starts once it is out.
            a.pre.ack_wait_since = None;
            return Ok(());
        }
        if !a.runs.iter().all(DevRun::switchover_acked) {
            // Never before the destination loaded the initial data (switchover-ack); bounded.
            let since = *a.pre.ack_wait_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.opts.timeout {
                return Err(PipelineError::Timeout {
                    phase: Phase::PreCopy,
                    what: "the destination's switchover-ack",
                    waited: self.opts.timeout,
                });
            }
            a.pre.due = false;
            return Ok(());
        }
        a.pre.ack_wait_since = None;
        // Re-sending more than twice what STOP_COPY would send means the devices dirty state
        // faster than it can be sent: pre-copy does not converge, stop it.
        let raw = a.stages.counters.total_raw();
        let resent = raw - *a.pre.initial_done_at.get_or_insert(raw);
        let not_converging = resent > stop_copy.saturating_mul(2);
        a.pre.due = within_budget || not_converging || over_time;
        Ok(())
    }

    fn snapshot(&self, a: &Active) -> SourceStatus {
        let bps = a.pre.bps;
        let time = |bytes: u64| {
            (bps > 0.0)
                .then(|| Duration::try_from_secs_f64(bytes as f64 / bps).ok())
                .flatten()
        };
        let left = |r: &DevRun| match a.phase {
            Phase::PreCopy => r.stop_copy_bytes.unwrap_or(r.dirty_bytes),
            _ => r.estimate.unwrap_or(0).saturating_sub(r.ended.unwrap_or(0)),
        };
        let devices: Vec<DeviceStatus> = self
            .devices
            .iter()
            .zip(&a.runs)
            .zip(&a.stages.counters.devices)
            .map(|((d, r), c)| DeviceStatus {
                name: d.name().to_owned(),
                initial_bytes: r.initial_bytes,
                dirty_bytes: r.dirty_bytes,
                stop_copy_bytes: r.stop_copy_bytes,
                raw_bytes: DeviceCounters::load(&c.raw),
                wire_bytes: DeviceCounters::load(&c.wire),
                rate_bps: r.rate.bps,
                estimated_stop_copy: time(left(r)),
                switchover_acked: r.switchover_acked(),
            })
            .collect();
        let total = a.runs.iter().map(left).fold(0, u64::saturating_add);
        SourceStatus {
            phase: a.phase,
            elapsed: a.started.elapsed(),
            precopy_elapsed: if a.precopy {
                a.pre.begun.elapsed()
            } else {
                Duration::ZERO
            },
            switchover_acked: a.runs.iter().all(DevRun::switchover_acked),
            switchover_due: a.pre.due,
            rate_bps: bps,
            estimated_downtime: time(total),
            devices,
        }
    }

    /// One step of the control loop: stage events, failures, the peer's control frames, cancel,
    /// progress and the inactivity timeout.
    fn tick(&mut self, a: &mut Active) -> Result<(), PipelineError> {
        let phase = a.phase;
        if self.cancel.is_cancelled() {
            return Err(PipelineError::Cancelled { phase });
        }
        if let Ok(e) = a.stages.failures.try_recv() {
            return Err(e);
        }
        let mut news = false;
        while let Ok(ev) = a.stages.events.try_recv() {
            news = true;
            a.watch.progressed();
            match ev {
                ReaderEvent::PreCopyQuiesced { device } => {
                    if let Some(r) = a.runs.get_mut(usize::from(device)) {
                        r.quiesced = true;
                    }
                }
                ReaderEvent::Ended { device, raw_bytes } => {
                    if let Some(r) = a.runs.get_mut(usize::from(device)) {
                        r.ended = Some(raw_bytes);
                    }
                }
                ReaderEvent::Failed(e) => return Err(e),
            }
        }
        // After news from the reader, return at once so the caller acts on it (e.g. a device
        // whose end and acknowledgement are both in leaves STOP_COPY now, not a tick later).
        let wait = if news { Duration::ZERO } else { TICK };
        match a.session.recv_control(wait) {
            Ok(Some(f)) => {
                a.watch.progressed();
                let device = f.header.device;
                match (f.header.kind, a.runs.get_mut(usize::from(device))) {
                    (FrameKind::DevicePrepared, Some(r)) => r.acked = Some(f.header.arg),
                    (FrameKind::SwitchoverAck, Some(r)) => r.acks += 1,
                    (FrameKind::Keepalive, _) => {}
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
        a.watch
            .check(a.stages.counters.total_moved(), phase, self.opts.timeout)?;
        if let Some(cb) = &self.opts.progress {
            if a.watch.progress_due() {
                cb(&self.progress(&a.stages, &a.runs, phase, a.watch.started));
            }
        }
        Ok(())
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
        Progress {
            elapsed,
            phase,
            devices,
        }
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

/// Moves device `i` from RUNNING (or RUNNING_P2P) to PRE_COPY or STOP_COPY (per `mode`) and hands
/// its data fd to the reader.
fn open_stream<D: MigrationDevice>(
    d: &mut D,
    i: usize,
    a: &mut Active,
    mode: ReadMode,
) -> Result<(), PipelineError> {
    let (state, phase) = match mode {
        ReadMode::PreCopy => (DeviceState::PreCopy, Phase::PreCopy),
        ReadMode::StopCopy => (DeviceState::StopCopy, Phase::StopCopy),
    };
    let fd = set_state(d, state, phase)?.ok_or_else(|| PipelineError::NoDataFd {
        device: d.name().to_owned(),
        state,
    })?;
    let fd = Arc::new(fd);
    a.runs[i].data_fd = Some(fd.clone());
    a.stages.cmd(ReaderCmd::Add {
        device: dev_index(i),
        fd,
        mode,
    })
}

impl<D: MigrationDevice> Drop for SourceSession<D> {
    /// A session dropped with a step in progress is aborted and its devices rolled back.
    fn drop(&mut self) {
        self.abort();
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

pub(crate) fn dev_index(i: usize) -> u16 {
    // The transport caps sessions at 64 devices.
    u16::try_from(i).unwrap_or(u16::MAX)
}

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
