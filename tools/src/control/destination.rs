//! The destination side of the control socket: `add-device`, `start` (accept the source and
//! receive), `status`, `cancel`, and after the `committed` event the VMM's own outcome:
//! `resumed` or `failed` (docs/PROTOCOL.md, section 5.1: only then does the source learn it).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::{json, Value};
use vfmig_pipeline::{
    CancelHandle, DestinationSession, FinalOutcome, Phase, PipelineError,
    Progress as PipelineProgress,
};
use vfmig_transport::Listener;
use vfmig_vfio::MigrationDevice;

use super::proto::{CmdError, ErrorClass, Reply, Request};
use super::server::{self, Backend, Out, Outcome};
use super::source::failure_json;
use super::{device_states, ControlAddr, DeviceSet, StateWatch};
use crate::devices::Side;
use crate::error::{CliError, DeviceLabel};
use crate::migrate::{self, DestinationPlan};
use crate::progress::Progress;
use crate::signals::Cancel;

/// Commands waiting for the worker.
const CMD_QUEUE: usize = 8;

const COMMANDS: &[&str] = &[
    "add-device",
    "start",
    "status",
    "cancel",
    "resumed",
    "failed",
];

/// The VMM's word after the commit.
#[derive(Debug)]
enum Cmd {
    /// It resumed (or, with `resume_devices`, asks vfmig to resume the devices first).
    Resumed {
        id: Option<Value>,
        resume_devices: bool,
    },
    /// Its resume failed: the devices are reset and the source may run again.
    Failed(Option<Value>),
    /// Cancel (or the client left).
    Cancel,
}

type Snapshot = Arc<Mutex<Value>>;

fn set(snapshot: &Snapshot, v: Value) {
    *snapshot.lock().unwrap_or_else(PoisonError::into_inner) = v;
}

fn state_of(snapshot: &Snapshot) -> String {
    snapshot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or("setup")
        .to_owned()
}

#[derive(Debug)]
struct Worker {
    cmds: Sender<Cmd>,
    cancel: CancelHandle,
    done: Receiver<Result<(), CliError>>,
    _thread: JoinHandle<()>,
}

/// The destination side's backend.
#[derive(Debug)]
pub struct DestinationBackend {
    plan: DestinationPlan,
    listener: Option<Listener>,
    devices: DeviceSet,
    out: Sender<Out>,
    snapshot: Snapshot,
    worker: Option<Worker>,
    outcome_sent: bool,
    /// Cancelled while waiting for the source: nothing was touched, the worker is abandoned.
    abandoned: Option<Result<(), CliError>>,
    ended: bool,
    json: bool,
}

/// `vfmig recv --control`: serves the socket until the migration is over and the client left.
pub fn serve(
    addr: &ControlAddr,
    plan: DestinationPlan,
    listener: Listener,
    devices: DeviceSet,
    cancel: &Cancel,
    json: bool,
) -> Result<(), CliError> {
    server::serve(addr, cancel, |out| DestinationBackend {
        plan,
        listener: Some(listener),
        devices,
        out,
        snapshot: Arc::new(Mutex::new(json!({ "state": "setup" }))),
        worker: None,
        outcome_sent: false,
        abandoned: None,
        ended: false,
        json,
    })
}

fn invalid(desc: &str) -> CmdError {
    CmdError::new(ErrorClass::InvalidState, desc)
}

impl DestinationBackend {
    fn start(&mut self, req: &Request) -> Option<Reply> {
        if let Err(e) = req.only_args(&[]) {
            return Some(Err(e));
        }
        let Some(listener) = self.listener.take_if(|_| !self.devices.list.is_empty()) else {
            return Some(Err(invalid(if self.worker.is_some() {
                "the migration was already started"
            } else {
                "no devices: `add-device` first"
            })));
        };
        let devices = std::mem::take(&mut self.devices);
        let labels = devices.labels;
        let mut opts = migrate::destination_options(&self.plan, &Progress::new(false, &[], &[]));
        let out = self.out.clone();
        opts.progress = Some(Arc::new(move |p: &PipelineProgress| {
            let devices: Vec<Value> = p
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    json!({ "index": i, "raw_bytes": d.raw_bytes, "phase": d.phase.to_string(),
                            "done": d.done })
                })
                .collect();
            // Progress is dropped rather than waited for.
            let _ = out.try_send(Out::Event(
                "receive-progress",
                json!({ "phase": p.phase.to_string(), "devices": devices }),
            ));
        }));
        let session = DestinationSession::new(devices.list, opts);
        let cancel = session.cancel_handle();
        let (cmds, rx) = bounded(CMD_QUEUE);
        let (done_tx, done) = bounded(1);
        set(&self.snapshot, json!({ "state": "accepting" }));
        let run = Run {
            session,
            labels,
            plan: self.plan.clone(),
            cmds: rx,
            out: self.out.clone(),
            snapshot: self.snapshot.clone(),
            json: self.json,
            peer: None,
            resume_failed: false,
            states: StateWatch::default(),
            last: None,
        };
        let thread = std::thread::spawn(move || run.run(listener, &done_tx));
        self.worker = Some(Worker {
            cmds,
            cancel,
            done,
            _thread: thread,
        });
        Some(Ok(json!({})))
    }

    fn cancel(&mut self) {
        let Some(w) = &self.worker else { return };
        if state_of(&self.snapshot) == "accepting" && self.abandoned.is_none() {
            // No source yet, no device touched: end now instead of waiting out the accept.
            let e = PipelineError::Cancelled {
                phase: Phase::Setup,
            };
            let _ = self
                .out
                .try_send(Out::Event("failed", failure_json(&e, &[])));
            self.abandoned = Some(Err(migrate::migration_error(e, &[])));
            return;
        }
        w.cancel.cancel();
        let _ = w.cmds.try_send(Cmd::Cancel);
    }

    fn outcome(&mut self, req: &Request) -> Option<Reply> {
        let args: &[&str] = if req.execute == "resumed" {
            &["resume-devices"]
        } else {
            &[]
        };
        if let Err(e) = req.only_args(args) {
            return Some(Err(e));
        }
        let resume_devices = match req.bool_arg("resume-devices") {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let state = state_of(&self.snapshot);
        let Some(w) = self.worker.as_ref().filter(|_| state == "committed") else {
            return Some(Err(invalid(&format!(
                "`{}` answers the `committed` event; the migration is {state}",
                req.execute
            ))));
        };
        if self.outcome_sent {
            return Some(Err(invalid("the outcome was already given")));
        }
        let cmd = if req.execute == "resumed" {
            Cmd::Resumed {
                id: req.id.clone(),
                resume_devices,
            }
        } else {
            Cmd::Failed(req.id.clone())
        };
        match w.cmds.try_send(cmd) {
            Ok(()) => {
                self.outcome_sent = true;
                None
            }
            Err(TrySendError::Full(_)) => {
                Some(Err(CmdError::new(ErrorClass::Busy, "command queue full")))
            }
            Err(TrySendError::Disconnected(_)) => Some(Err(invalid("the migration has ended"))),
        }
    }
}

impl Backend for DestinationBackend {
    fn role(&self) -> &'static str {
        "destination"
    }

    fn commands(&self) -> &'static [&'static str] {
        COMMANDS
    }

    fn execute(&mut self, req: &Request, fds: Vec<OwnedFd>) -> Option<Reply> {
        match req.execute.as_str() {
            "add-device" => Some(if self.worker.is_some() {
                Err(invalid("devices are added before `start`"))
            } else {
                self.devices
                    .add(req, fds, Side::Destination, self.plan.timeout)
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
                        .map(|l| json!({ "name": l.name, "kind": l.kind }))
                        .collect::<Vec<_>>());
                }
                v
            })),
            "cancel" => Some(req.only_args(&[]).and_then(|()| {
                if self.worker.is_none() || self.ended || self.abandoned.is_some() {
                    Err(invalid("no migration in progress"))
                } else {
                    self.cancel();
                    Ok(json!({}))
                }
            })),
            "resumed" | "failed" => self.outcome(req),
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
        if self.ended {
            return Outcome::Idle;
        }
        if let Some(r) = self.abandoned.take() {
            self.ended = true;
            return Outcome::Ended(r);
        }
        match &self.worker {
            None => Outcome::Idle,
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
    session: DestinationSession<Box<dyn MigrationDevice>>,
    labels: Vec<DeviceLabel>,
    plan: DestinationPlan,
    cmds: Receiver<Cmd>,
    out: Sender<Out>,
    snapshot: Snapshot,
    json: bool,
    peer: Option<SocketAddr>,
    /// The VMM said `failed` (or left, or never answered) after the commit.
    resume_failed: bool,
    states: StateWatch,
    /// `completed` or `failed`, sent after the server knows the end.
    last: Option<(&'static str, Value)>,
}

impl Run {
    fn event(&self, name: &'static str, data: Value) {
        let _ = self
            .out
            .send_timeout(Out::Event(name, data), Duration::from_secs(1));
    }

    fn reply(&self, id: Option<Value>, r: Reply) {
        let _ = self
            .out
            .send_timeout(Out::Reply(id, r), Duration::from_secs(1));
    }

    fn states(&mut self) {
        for d in self.states.changed(self.session.devices_mut()) {
            self.event("device-state", d);
        }
    }

    fn run(mut self, listener: Listener, done: &Sender<Result<(), CliError>>) {
        let result = self.drive(&listener);
        let result = self.conclude(result);
        // The end is known to the server before the client can read it: a `quit` that
        // answers the last event finds the migration over.
        let _ = done.send(result);
        if let Some((name, data)) = self.last.take() {
            self.event(name, data);
        }
        while let Ok(cmd) = self.cmds.recv() {
            if let Cmd::Resumed { id, .. } | Cmd::Failed(id) = cmd {
                self.reply(id, Err(invalid("the migration has ended")));
            }
        }
    }

    fn drive(&mut self, listener: &Listener) -> Result<vfmig_pipeline::Report, CliError> {
        let mut cfg = self.plan.session.clone();
        cfg.declared_devices = Some(self.session.declarations());
        let mut dropped = |peer: SocketAddr, e: &vfmig_transport::TransportError| {
            say!(
                "vfmig: dropped connection from {peer}: {}",
                crate::error::describe_transport(e)
            );
        };
        let recv = listener
            .accept_reporting(&cfg, &mut dropped)
            .map_err(CliError::Transport)?;
        self.peer = Some(recv.peer());
        set(
            &self.snapshot,
            json!({ "state": "receiving", "peer": recv.peer().to_string() }),
        );
        self.event("connected", json!({ "peer": recv.peer().to_string() }));
        self.states();
        let labels = self.labels.clone();
        let err = |e| migrate::migration_error(e, &labels);
        self.session.receive_session(recv).map_err(err)?;
        // Committed: the source's devices never run again; the VMM loads its RAM and answers.
        set(&self.snapshot, json!({ "state": "committed" }));
        self.states();
        let devices = device_states(self.session.devices_mut());
        self.event("committed", json!({ "devices": devices }));
        let (id, outcome) = match self.cmds.recv_timeout(self.plan.timeout) {
            Ok(Cmd::Resumed {
                id,
                resume_devices: true,
            }) => match self.session.resume() {
                Ok(()) => (id, FinalOutcome::Resumed),
                Err(e) => {
                    // `finish` resets the devices before the source learns the outcome.
                    self.reply(
                        id,
                        Err(CmdError::new(ErrorClass::DeviceError, e.to_string())),
                    );
                    self.session
                        .finish(FinalOutcome::ResumeFailed)
                        .map_err(err)?;
                    return Err(err(e));
                }
            },
            Ok(Cmd::Resumed { id, .. }) => (id, FinalOutcome::Resumed),
            Ok(Cmd::Failed(id)) => (id, FinalOutcome::ResumeFailed),
            Ok(Cmd::Cancel) | Err(RecvTimeoutError::Disconnected) => {
                (None, FinalOutcome::ResumeFailed)
            }
            Err(RecvTimeoutError::Timeout) => {
                say!(
                    "vfmig: no `resumed` or `failed` from the control client within {} s: \
                     resetting the devices (the source resumes its own)",
                    self.plan.timeout.as_secs()
                );
                (None, FinalOutcome::ResumeFailed)
            }
        };
        let report = self.session.finish(outcome).map_err(err)?;
        if id.is_some() {
            self.reply(id, Ok(json!({})));
        }
        if outcome == FinalOutcome::ResumeFailed {
            self.resume_failed = true;
            return Err(err(PipelineError::Cancelled {
                phase: Phase::Commit,
            }));
        }
        Ok(report)
    }

    fn conclude(
        &mut self,
        result: Result<vfmig_pipeline::Report, CliError>,
    ) -> Result<(), CliError> {
        self.states();
        match result {
            Ok(report) => {
                let j = migrate::report_json("recv", self.peer, &report, &self.labels, true);
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
                let mut data = match &e {
                    CliError::Migration { error, .. } => {
                        failure_json(error, self.session.reset_steps())
                    }
                    other => json!({ "class": "failed", "desc": crate::error::describe(other),
                                     "guidance": null, "rollback": [] }),
                };
                if self.resume_failed {
                    data["class"] = json!("resume-failed");
                    data["desc"] = json!(
                        "the VMM did not resume: the devices were reset and the source resumes its own"
                    );
                }
                set(
                    &self.snapshot,
                    json!({ "state": "failed", "failure": data }),
                );
                self.last = Some(("failed", data));
                Err(e)
            }
        }
    }
}
