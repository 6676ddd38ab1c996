//! The source side of the control socket: `add-device`, `start`, `status`, `switchover`,
//! `cancel`. The [`SourceSession`] steps run on a worker thread that polls `status` during
//! pre-copy and reports what it sees as events.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::{json, Value};
use vfmig_pipeline::{
    CancelHandle, Phase, PipelineError, RollbackAction, SourceSession, SourceStatus,
};
use vfmig_vfio::MigrationDevice;

use super::proto::{CmdError, ErrorClass, Reply, Request};
use super::server::{self, Backend, Out, Outcome};
use super::{ControlAddr, DeviceSet, StateWatch};
use crate::devices::Side;
use crate::error::{CliError, DeviceLabel};
use crate::migrate::{self, SourcePlan};
use crate::progress::Progress;
use crate::signals::Cancel;

/// Commands waiting for the worker.
const CMD_QUEUE: usize = 8;
/// How long the worker waits for a command between two `status` steps (the library asks for a
/// step at least every 100 ms during pre-copy).
const STEP: Duration = Duration::from_millis(20);
/// At most one `precopy-progress` event per this interval.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

const COMMANDS: &[&str] = &["add-device", "start", "status", "switchover", "cancel"];

/// What the worker is asked to do.
#[derive(Debug)]
enum Cmd {
    Switchover(Option<Value>),
    Cancel,
}

/// What `status` answers: the worker's last view.
type Snapshot = Arc<Mutex<Value>>;

fn set(snapshot: &Snapshot, v: Value) {
    *snapshot.lock().unwrap_or_else(PoisonError::into_inner) = v;
}

/// The running migration.
#[derive(Debug)]
struct Worker {
    cmds: Sender<Cmd>,
    cancel: CancelHandle,
    done: Receiver<Result<(), CliError>>,
    _thread: JoinHandle<()>,
}

/// The source side's backend.
#[derive(Debug)]
pub struct SourceBackend {
    plan: SourcePlan,
    devices: DeviceSet,
    out: Sender<Out>,
    snapshot: Snapshot,
    worker: Option<Worker>,
    switchover_asked: bool,
    ended: bool,
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
        plan,
        devices,
        out,
        snapshot: Arc::new(Mutex::new(json!({ "state": "setup" }))),
        worker: None,
        switchover_asked: false,
        ended: false,
        json,
    })
}

impl SourceBackend {
    fn state(&self) -> String {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("setup")
            .to_owned()
    }

    fn start(&mut self, req: &Request) -> Option<Reply> {
        if let Err(e) = req.only_args(&[]) {
            return Some(Err(e));
        }
        if self.worker.is_some() {
            return Some(Err(invalid("the migration was already started")));
        }
        if self.devices.list.is_empty() {
            return Some(Err(invalid("no devices: `add-device` first")));
        }
        let devices = std::mem::take(&mut self.devices);
        let labels = devices.labels;
        let opts = migrate::source_options(&self.plan, &Progress::new(false, &[], &[]));
        let session = SourceSession::new(devices.list, opts);
        let cancel = session.cancel_handle();
        let (cmds, rx) = bounded(CMD_QUEUE);
        let (done_tx, done) = bounded(1);
        set(&self.snapshot, json!({ "state": "connecting" }));
        let w = Run {
            session,
            labels,
            plan: self.plan.clone(),
            cmds: rx,
            out: self.out.clone(),
            snapshot: self.snapshot.clone(),
            json: self.json,
            states: StateWatch::default(),
            last: None,
        };
        let id = req.id.clone();
        let thread = std::thread::spawn(move || w.run(id, &done_tx));
        self.worker = Some(Worker {
            cmds,
            cancel,
            done,
            _thread: thread,
        });
        None
    }

    fn cancel(&mut self) {
        if let Some(w) = &self.worker {
            w.cancel.cancel();
            let _ = w.cmds.try_send(Cmd::Cancel);
        }
    }
}

fn invalid(desc: &str) -> CmdError {
    CmdError::new(ErrorClass::InvalidState, desc)
}

impl Backend for SourceBackend {
    fn role(&self) -> &'static str {
        "source"
    }

    fn commands(&self) -> &'static [&'static str] {
        COMMANDS
    }

    fn execute(&mut self, req: &Request, fds: Vec<OwnedFd>) -> Option<Reply> {
        match req.execute.as_str() {
            "add-device" => Some(if self.worker.is_some() {
                Err(invalid("devices are added before `start`"))
            } else {
                self.devices.add(req, fds, Side::Source, self.plan.timeout)
            }),
            "start" => self.start(req),
            "status" => Some(req.only_args(&[]).map(|()| {
                let mut v = self
                    .snapshot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if self.worker.is_none() {
                    v["devices"] = json!(self
                        .devices
                        .labels
                        .iter()
                        .map(|l| json!({"name": l.name, "kind": l.kind}))
                        .collect::<Vec<_>>());
                }
                v
            })),
            "switchover" => {
                if let Err(e) = req.only_args(&[]) {
                    return Some(Err(e));
                }
                let state = self.state();
                let Some(w) = &self.worker else {
                    return Some(Err(invalid("`start` first")));
                };
                if self.switchover_asked
                    || self.ended
                    || !matches!(state.as_str(), "connecting" | "setup" | "pre-copy")
                {
                    return Some(Err(invalid(&format!("no switchover in state {state}"))));
                }
                match w.cmds.try_send(Cmd::Switchover(req.id.clone())) {
                    Ok(()) => {
                        self.switchover_asked = true;
                        None
                    }
                    Err(TrySendError::Full(_)) => {
                        Some(Err(CmdError::new(ErrorClass::Busy, "command queue full")))
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        Some(Err(invalid("the migration has ended")))
                    }
                }
            }
            "cancel" => Some(req.only_args(&[]).and_then(|()| {
                if self.worker.is_none() || self.ended {
                    Err(invalid("no migration in progress"))
                } else {
                    self.cancel();
                    Ok(json!({}))
                }
            })),
            name => Some(Err(CmdError::new(
                ErrorClass::CommandNotFound,
                format!("the command `{name}` has not been found"),
            ))),
        }
    }

    fn client_gone(&mut self) {
        self.cancel();
    }

    fn interrupt(&mut self) {
        self.cancel();
    }

    fn poll_outcome(&mut self) -> Outcome {
        match &self.worker {
            None => Outcome::Idle,
            Some(_) if self.ended => Outcome::Idle,
            Some(w) => match w.done.try_recv() {
                Ok(r) => {
                    self.ended = true;
                    Outcome::Ended(r)
                }
                Err(_) => Outcome::Running,
            },
        }
    }
}

/// The worker: owns the session.
struct Run {
    session: SourceSession<Box<dyn MigrationDevice>>,
    labels: Vec<DeviceLabel>,
    plan: SourcePlan,
    cmds: Receiver<Cmd>,
    out: Sender<Out>,
    snapshot: Snapshot,
    json: bool,
    states: StateWatch,
    /// `completed` or `failed`, sent after the server knows the end.
    last: Option<(&'static str, Value)>,
}

impl Run {
    fn event(&self, name: &'static str, data: Value) {
        // Events that cannot be queued within a second are dropped: the client is not reading,
        // and the migration does not wait for it.
        let _ = self
            .out
            .send_timeout(Out::Event(name, data), Duration::from_secs(1));
    }

    fn reply(&self, id: Option<Value>, r: Reply) {
        let _ = self
            .out
            .send_timeout(Out::Reply(id, r), Duration::from_secs(1));
    }

    /// Emits `device-state` for every device whose state changed since the last look.
    fn device_states(&mut self) {
        for d in self.states.changed(self.session.devices_mut()) {
            self.event("device-state", d);
        }
    }

    fn run(mut self, start_id: Option<Value>, done: &Sender<Result<(), CliError>>) {
        let result = self.drive(start_id);
        let result = self.conclude(result);
        // The end is known to the server before the client can read it: a `quit` that
        // answers the last event finds the migration over.
        let _ = done.send(result);
        if let Some((name, data)) = self.last.take() {
            self.event(name, data);
        }
        // Commands that raced with the end get an answer until the server goes away.
        while let Ok(cmd) = self.cmds.recv() {
            if let Cmd::Switchover(id) = cmd {
                self.reply(id, Err(invalid("the migration has ended")));
            }
        }
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
    ) -> Result<(vfmig_pipeline::Report, SocketAddr), PipelineError> {
        let peer = match self.connect() {
            Ok(p) => p,
            Err(e) => {
                self.reply(start_id, Err(failed(&e)));
                return Err(e);
            }
        };
        set(
            &self.snapshot,
            json!({ "state": "setup", "peer": peer.to_string() }),
        );
        self.reply(start_id, Ok(json!({ "peer": peer.to_string() })));
        self.device_states();
        let mut last_progress: Option<Instant> = None;
        let mut acked = false;
        let mut phase = Phase::Setup;
        let switch_id = loop {
            match self.cmds.recv_timeout(STEP) {
                Ok(Cmd::Switchover(id)) => break id,
                Ok(Cmd::Cancel) | Err(RecvTimeoutError::Disconnected) => {
                    self.session.abort();
                    return Err(PipelineError::Cancelled { phase });
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let st = self.session.status()?;
            phase = st.phase;
            let facts = status_json(&st, &self.labels);
            set(&self.snapshot, facts.clone());
            if st.switchover_acked && !acked {
                acked = true;
                self.event("switchover-ready", facts.clone());
            }
            if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                last_progress = Some(Instant::now());
                self.event("precopy-progress", facts);
            }
            self.device_states();
        };
        if let Err(e) = self.session.switchover() {
            self.reply(switch_id, Err(failed(&e)));
            return Err(e);
        }
        self.reply(switch_id, Ok(json!({})));
        self.device_states();
        if let Ok(st) = self.session.status() {
            set(&self.snapshot, status_json(&st, &self.labels));
        }
        let report = self.session.finish()?;
        Ok((report, peer))
    }

    /// Emits `completed` or `failed`, fixes the final status, and turns the result into the
    /// process's.
    fn conclude(
        &mut self,
        result: Result<(vfmig_pipeline::Report, SocketAddr), PipelineError>,
    ) -> Result<(), CliError> {
        self.device_states();
        match result {
            Ok((report, peer)) => {
                let j = migrate::report_json("send", Some(peer), &report, &self.labels, true);
                let data: Value = serde_json::from_str(&j.to_json()).unwrap_or(Value::Null);
                set(
                    &self.snapshot,
                    json!({ "state": "completed", "report": data }),
                );
                self.last = Some(("completed", data));
                if self.json {
                    crate::out_line(&j.to_json());
                }
                Ok(())
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
                set(
                    &self.snapshot,
                    json!({ "state": "failed", "failure": data }),
                );
                self.last = Some(("failed", data));
                Err(migrate::migration_error(e, &self.labels))
            }
        }
    }
}

fn failed(e: &PipelineError) -> CmdError {
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
