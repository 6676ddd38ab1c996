//! The source side of the control socket: `add-device`, `start`, `status`, `switchover`,
//! `cancel`. The [`SourceSession`] steps run on a worker thread that polls `status` during
//! pre-copy and reports what it sees as events.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::{json, Value};
use vfmig_pipeline::{Phase, PipelineError, RollbackAction, SourceSession, SourceStatus};
use vfmig_vfio::MigrationDevice;

use super::proto::{self, CmdError, ErrorClass, Reply, Request};
use super::server::{self, Backend, Outcome, Shared};
use super::worker::{end, failed, invalid, queue_once, Emitter, Reports, Worker};
use super::{ControlAddr, DeviceSet};
use crate::devices::Side;
use crate::error::{CliError, DeviceLabel};
use crate::migrate::{self, SourcePlan};
use crate::progress::Progress;
use crate::signals::Cancel;

/// How long the worker waits for a command between two `status` steps (the library asks for a
/// step at least every 100 ms during pre-copy).
const STEP: Duration = Duration::from_millis(20);
/// At most one `precopy-progress` event per this interval.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

const COMMANDS: &[&str] = &["start", "switchover"];

/// What the worker is asked to do.
#[derive(Debug)]
enum Cmd {
    Switchover(Option<Value>),
    Cancel,
}

/// The source side's backend.
#[derive(Debug)]
pub struct SourceBackend {
    plan: SourcePlan,
    shared: Shared,
    out: Emitter,
    worker: Option<Worker<Cmd>>,
    switchover_asked: bool,
    json: bool,
}

/// `vfmig send --control`: serves the socket until the migration is over and the client left.
/// `devices` are those given with `--device` (the client adds more).
pub fn serve(
    addr: &ControlAddr,
    plan: SourcePlan,
    devices: DeviceSet,
    cancel: &Cancel,
    json: bool,
) -> Result<(), CliError> {
    server::serve(addr, cancel, |out| SourceBackend {
        shared: Shared::new(Side::Source, COMMANDS, devices, plan.timeout),
        plan,
        out: Emitter(out),
        worker: None,
        switchover_asked: false,
        json,
    })
}

impl SourceBackend {
    fn start(&mut self, req: &Request) -> Option<Reply> {
        if let Err(e) = req.only_args(&[]) {
            return Some(Err(e));
        }
        if self.worker.is_some() {
            return Some(Err(invalid("the migration was already started")));
        }
        if self.shared.devices.list.is_empty() {
            return Some(Err(invalid("no devices: `add-device` first")));
        }
        let (devices, rep) = self.shared.start("connecting", self.out.clone(), self.json);
        let opts = migrate::source_options(&self.plan, &Progress::hidden());
        let session = SourceSession::new(devices, opts);
        let cancel = session.cancel_handle();
        let mut run = Run {
            session,
            plan: self.plan.clone(),
            rep,
        };
        let id = req.id.clone();
        self.worker = Some(Worker::spawn(cancel, move |cmds, done| {
            let result = run.drive(id, &cmds);
            let (result, last) = run.conclude(result);
            end(result, last, &done, &run.rep.out, &cmds, |c| match c {
                Cmd::Switchover(id) => Some(id),
                Cmd::Cancel => None,
            });
        }));
        None
    }

    fn switchover(&mut self, req: &Request) -> Option<Reply> {
        if let Err(e) = req.only_args(&[]) {
            return Some(Err(e));
        }
        let state = self.shared.snapshot.state();
        let Some(w) = &self.worker else {
            return Some(Err(invalid("`start` first")));
        };
        if self.switchover_asked
            || w.ended()
            || !matches!(state.as_str(), "connecting" | "setup" | "pre-copy")
        {
            return Some(Err(invalid(&format!("no switchover in state {state}"))));
        }
        queue_once(
            &w.cmds,
            Cmd::Switchover(req.id.clone()),
            &mut self.switchover_asked,
        )
    }
}

impl Backend for SourceBackend {
    fn shared(&mut self) -> &mut Shared {
        &mut self.shared
    }

    fn execute(&mut self, req: &Request) -> Option<Reply> {
        match req.execute.as_str() {
            "start" => self.start(req),
            "switchover" => self.switchover(req),
            name => Some(Err(proto::not_found(name))),
        }
    }

    fn cancel(&mut self) {
        if let Some(w) = &self.worker {
            w.cancel.cancel();
            let _ = w.cmds.try_send(Cmd::Cancel);
        }
    }

    fn poll_outcome(&mut self) -> Outcome {
        self.worker.as_mut().map_or(Outcome::Idle, Worker::outcome)
    }
}

/// The worker: owns the session.
struct Run {
    session: SourceSession<Box<dyn MigrationDevice>>,
    plan: SourcePlan,
    rep: Reports,
}

impl Run {
    /// Emits `device-state` for every device whose state changed since the last look.
    fn device_states(&mut self) {
        self.rep.device_states(self.session.devices_mut());
    }

    fn connect(&mut self) -> Result<SocketAddr, PipelineError> {
        let mut last = None;
        for &addr in &self.plan.connect {
            match self.session.start(addr) {
                Ok(()) => return Ok(addr),
                Err(e) if migrate::is_connect_failure(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(PipelineError::Cancelled {
            phase: Phase::Setup,
        }))
    }

    fn drive(
        &mut self,
        start_id: Option<Value>,
        cmds: &Receiver<Cmd>,
    ) -> Result<(vfmig_pipeline::Report, SocketAddr), PipelineError> {
        let peer = match self.connect() {
            Ok(p) => p,
            Err(e) => {
                self.rep.out.reply(start_id, Err(step_failed(&e)));
                return Err(e);
            }
        };
        self.rep
            .snapshot
            .set(json!({ "state": "setup", "peer": peer.to_string() }));
        self.rep
            .out
            .reply(start_id, Ok(json!({ "peer": peer.to_string() })));
        self.device_states();
        let mut last_progress: Option<Instant> = None;
        let mut acked = false;
        let mut phase = Phase::Setup;
        let switch_id = loop {
            match cmds.recv_timeout(STEP) {
                Ok(Cmd::Switchover(id)) => break id,
                Ok(Cmd::Cancel) | Err(RecvTimeoutError::Disconnected) => {
                    self.session.abort();
                    return Err(PipelineError::Cancelled { phase });
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let st = self.session.status()?;
            phase = st.phase;
            let facts = status_json(&st, &self.rep.labels);
            self.rep.snapshot.set(facts.clone());
            if st.switchover_acked && !acked {
                acked = true;
                self.rep.out.event("switchover-ready", facts.clone());
            }
            if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                last_progress = Some(Instant::now());
                self.rep.out.event("precopy-progress", facts);
            }
            self.device_states();
        };
        if let Err(e) = self.session.switchover() {
            self.rep.out.reply(switch_id, Err(step_failed(&e)));
            return Err(e);
        }
        self.rep.out.reply(switch_id, Ok(json!({})));
        self.device_states();
        if let Ok(st) = self.session.status() {
            self.rep.snapshot.set(status_json(&st, &self.rep.labels));
        }
        let report = self.session.finish()?;
        Ok((report, peer))
    }

    /// The `completed` or `failed` event, and the process's result.
    fn conclude(
        &mut self,
        result: Result<(vfmig_pipeline::Report, SocketAddr), PipelineError>,
    ) -> (Result<(), CliError>, (&'static str, Value)) {
        self.device_states();
        match result {
            Ok((report, peer)) => {
                let last = self.rep.completed("send", Some(peer), &report);
                (Ok(()), last)
            }
            Err(e) => {
                let data = failure_json(&e, self.session.rollback_steps());
                for step in data["rollback"].as_array().into_iter().flatten() {
                    say!(
                        "vfmig: rollback: {}: {} (from {})",
                        step["device"].as_str().unwrap_or("?"),
                        step["action"].as_str().unwrap_or("?"),
                        step["from"].as_str().unwrap_or("-")
                    );
                }
                let last = failed(data, &self.rep.snapshot);
                (Err(migrate::migration_error(e, &self.rep.labels)), last)
            }
        }
    }
}

fn step_failed(e: &PipelineError) -> CmdError {
    CmdError::new(ErrorClass::MigrationFailed, e.to_string())
}

/// What a `failed` event says: the cause, whether it is a cancel or in doubt (then which side
/// holds the state), and what rollback did to each device.
pub fn failure_json(e: &PipelineError, steps: &[vfmig_pipeline::RollbackStep]) -> Value {
    let class = match e {
        PipelineError::Cancelled { .. } => "cancelled",
        PipelineError::InDoubt { .. } => "in-doubt",
        _ => "failed",
    };
    let rollback: Vec<Value> = steps
        .iter()
        .map(|s| {
            let (action, from) = match &s.action {
                RollbackAction::AlreadyRunning => ("already-running", None),
                RollbackAction::Walked { from } => ("walked", Some(from.to_string())),
                RollbackAction::Reset { from } => ("reset", from.map(|f| f.to_string())),
                RollbackAction::Failed { from, .. } => ("failed", from.map(|f| f.to_string())),
            };
            json!({ "device": s.device, "action": action, "from": from })
        })
        .collect();
    json!({
        "class": class,
        "desc": e.to_string(),
        "guidance": e.in_doubt_guidance(),
        "rollback": rollback,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// [`SourceStatus`] as JSON (the `status` reply and the progress events).
pub fn status_json(st: &SourceStatus, labels: &[DeviceLabel]) -> Value {
    let devices: Vec<Value> = st
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({
                "index": i,
                "name": d.name,
                "kind": labels.get(i).map_or("?", |l| l.kind),
                "initial_bytes": d.initial_bytes,
                "dirty_bytes": d.dirty_bytes,
                "stop_copy_bytes": d.stop_copy_bytes,
                "raw_bytes": d.raw_bytes,
                "wire_bytes": d.wire_bytes,
                "rate_bytes_per_sec": d.rate_bps,
                "estimated_stop_copy_ms": d.estimated_stop_copy.map(ms),
                "switchover_acked": d.switchover_acked,
            })
        })
        .collect();
    json!({
        "state": st.phase.to_string(),
        "elapsed_ms": ms(st.elapsed),
        "precopy_elapsed_ms": ms(st.precopy_elapsed),
        "rate_bytes_per_sec": st.rate_bps,
        "estimated_downtime_ms": st.estimated_downtime.map(ms),
        "switchover_acked": st.switchover_acked,
        "switchover_due": st.switchover_due,
        "devices": devices,
    })
}
