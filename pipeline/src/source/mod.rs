//! The source session: drives the devices through PRE_COPY / STOP_COPY, runs the reader, codec
//! and sender stages, waits for the destination's acknowledgements, and rolls back on failure.
//!
//! This module owns [`SourceSession`] and its step API (`start` / `status` / `switchover` /
//! `finish` / `abort`), the per-run bookkeeping (`Active`, `DevRun`), the start checks and
//! rollback. The rest lives beside it:
//! - `sending`: the stage threads (reader, encoders, sender) and the session as their sink;
//! - `control`: one control-loop tick (stage events, the destination's frames) and the commit;
//! - `precopy`: pre-copy sampling and the automatic switchover decision;
//! - `switchover`: quiescing (RUNNING_P2P order), STOP_COPY and each device's step to STOP;
//! - `progress`: what the session tells the VMM (status snapshots, progress, the report).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfmig_transport::{DeviceDesc, SendSession};
use vfmig_vfio::{DeviceClass, DeviceState, Identity, MigrationCaps, MigrationDevice};
use vfmig_wire::declare::{DeviceDecl, DeviceKind};

use crate::api::{CancelHandle, Report, RollbackStep, SourceOptions};
use crate::dirty::DirtyLog;
use crate::error::{Phase, PipelineError};
use crate::initial::InitialData;
use crate::reader::ReadMode;
use crate::rollback::roll_back_one;
use crate::status::SourceStatus;
use crate::watch::{RateMeter, Watch};

mod control;
mod precopy;
mod progress;
mod sending;
mod switchover;

use precopy::{PreCopyState, PRECOPY_SAMPLE};
use sending::Stages;
use switchover::open_stream;

/// How often the control loop looks at the device, the peer and the stages.
const TICK: Duration = Duration::from_millis(10);

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

    use super::roll_back_one;
    use crate::api::RollbackAction;

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
