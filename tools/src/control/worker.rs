//! What both sides' migration threads share: the snapshot `status` answers, the channel to the
//! client, and the handle the server thread keeps.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde_json::{json, Value};
use vfmig_pipeline::{CancelHandle, Report};
use vfmig_vfio::MigrationDevice;

use super::proto::{CmdError, ErrorClass, Reply};
use super::server::{Out, Outcome};
use super::{DeviceSet, StateWatch};
use crate::error::{CliError, DeviceLabel};
use crate::migrate;

/// Commands waiting for a worker.
pub const CMD_QUEUE: usize = 8;
/// An event or reply that cannot be queued for the client within this time is dropped: the
/// client is not reading, and the migration does not wait for it.
const SEND_LIMIT: Duration = Duration::from_secs(1);

/// What `status` answers: the worker's last view.
#[derive(Clone, Debug)]
pub struct Snapshot(Arc<Mutex<Value>>);

impl Snapshot {
    /// `{"state": "setup"}`.
    pub fn new() -> Snapshot {
        Snapshot(Arc::new(Mutex::new(json!({ "state": "setup" }))))
    }

    /// Replaces the view.
    pub fn set(&self, v: Value) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }

    /// The view.
    pub fn get(&self) -> Value {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Its `state`.
    pub fn state(&self) -> String {
        self.get()["state"].as_str().unwrap_or("setup").to_owned()
    }

    /// The `status` reply: the view, and before `start` the devices added so far.
    pub fn status(&self, before_start: Option<&DeviceSet>) -> Value {
        let mut v = self.get();
        if let Some(set) = before_start {
            v["devices"] = set
                .labels
                .iter()
                .map(|l| json!({ "name": l.name, "kind": l.kind }))
                .collect();
        }
        v
    }
}

/// The worker's way to the client.
#[derive(Clone, Debug)]
pub struct Emitter(pub Sender<Out>);

impl Emitter {
    /// Queues an event (bounded wait).
    pub fn event(&self, name: &'static str, data: Value) {
        let _ = self.0.send_timeout(Out::Event(name, data), SEND_LIMIT);
    }

    /// Queues a reply (bounded wait).
    pub fn reply(&self, id: Option<Value>, r: Reply) {
        let _ = self.0.send_timeout(Out::Reply(id, r), SEND_LIMIT);
    }
}

/// What a side's worker reports through: the client's channel, the snapshot `status` answers,
/// the devices' labels, `--json`, and the device states last reported.
#[derive(Debug)]
pub struct Reports {
    /// The way to the client.
    pub out: Emitter,
    /// What `status` answers.
    pub snapshot: Snapshot,
    /// The devices' names and kinds, in session order.
    pub labels: Vec<DeviceLabel>,
    json: bool,
    states: StateWatch,
}

impl Reports {
    /// Nothing reported yet.
    pub fn new(out: Emitter, snapshot: Snapshot, labels: Vec<DeviceLabel>, json: bool) -> Reports {
        Reports {
            out,
            snapshot,
            labels,
            json,
            states: StateWatch::default(),
        }
    }

    /// Emits `device-state` for every device whose state changed since the last look.
    pub fn device_states<D: MigrationDevice>(&mut self, devices: &mut [D]) {
        self.states.emit(devices, &self.out);
    }

    /// A successful end as `role` with `peer` ([`completed`]).
    pub fn completed(
        &self,
        role: &'static str,
        peer: Option<std::net::SocketAddr>,
        report: &Report,
    ) -> (&'static str, Value) {
        completed(role, peer, report, &self.labels, &self.snapshot, self.json)
    }
}

/// `InvalidState`.
pub fn invalid(desc: &str) -> CmdError {
    CmdError::new(ErrorClass::InvalidState, desc)
}

/// The migration thread, as the server thread holds it.
#[derive(Debug)]
pub struct Worker<C> {
    /// Commands for it.
    pub cmds: Sender<C>,
    /// The session's cancel handle.
    pub cancel: CancelHandle,
    done: Receiver<Result<(), CliError>>,
    ended: bool,
    _thread: JoinHandle<()>,
}

impl<C: Send + 'static> Worker<C> {
    /// Starts `run` on its own thread with the command queue and where to report the end.
    pub fn spawn(
        cancel: CancelHandle,
        run: impl FnOnce(Receiver<C>, Sender<Result<(), CliError>>) + Send + 'static,
    ) -> Worker<C> {
        let (cmds, rx) = bounded(CMD_QUEUE);
        let (done_tx, done) = bounded(1);
        Worker {
            cmds,
            cancel,
            done,
            ended: false,
            _thread: std::thread::spawn(move || run(rx, done_tx)),
        }
    }

    /// Running, or (once) the result, then idle.
    pub fn outcome(&mut self) -> Outcome {
        if self.ended {
            return Outcome::Idle;
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.ended = true;
                Outcome::Ended(r)
            }
            Err(_) => Outcome::Running,
        }
    }

    /// The result was handed to the server.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// How a worker ends: reports the result to the server *before* sending the last event (so a
/// `quit` answering `completed` / `failed` finds the migration over), then answers the commands
/// that raced with the end (`late` gives the id of one that expects a reply) until the server
/// goes away.
pub fn end<C>(
    result: Result<(), CliError>,
    last: (&'static str, Value),
    done: &Sender<Result<(), CliError>>,
    out: &Emitter,
    cmds: &Receiver<C>,
    late: impl Fn(C) -> Option<Option<Value>>,
) {
    let _ = done.send(result);
    out.event(last.0, last.1);
    while let Ok(cmd) = cmds.recv() {
        if let Some(id) = late(cmd) {
            out.reply(id, Err(invalid("the migration has ended")));
        }
    }
}

/// A successful end: the `completed` event's data (the `--json` report), fixed in the snapshot
/// and printed with `--json`.
pub fn completed(
    role: &'static str,
    peer: Option<std::net::SocketAddr>,
    report: &Report,
    labels: &[DeviceLabel],
    snapshot: &Snapshot,
    json: bool,
) -> (&'static str, Value) {
    let j = migrate::report_json(role, peer, report, labels, true);
    let data: Value = serde_json::from_str(&j.to_json()).unwrap_or(Value::Null);
    snapshot.set(json!({ "state": "completed", "report": data }));
    if json {
        crate::out_line(&j.to_json());
    }
    ("completed", data)
}

/// A failed end: the `failed` event's data, fixed in the snapshot.
pub fn failed(data: Value, snapshot: &Snapshot) -> (&'static str, Value) {
    snapshot.set(json!({ "state": "failed", "failure": data }));
    ("failed", data)
}

/// Queues a command the client may give only once: `given` says whether it was queued.
pub fn queue_once<C>(cmds: &Sender<C>, cmd: C, given: &mut bool) -> Option<Reply> {
    let queued = queue(cmds, cmd);
    *given = queued.is_ok();
    queued.err().map(Err)
}

/// Queues a command for the worker: `Busy` when the queue is full.
pub fn queue<C>(cmds: &Sender<C>, cmd: C) -> Result<(), CmdError> {
    cmds.try_send(cmd).map_err(|e| match e {
        crossbeam_channel::TrySendError::Full(_) => {
            CmdError::new(ErrorClass::Busy, "command queue full")
        }
        crossbeam_channel::TrySendError::Disconnected(_) => invalid("the migration has ended"),
    })
}
