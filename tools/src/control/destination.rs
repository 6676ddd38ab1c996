//! The destination side of the control socket: `add-device`, `start` (accept the source and
//! receive), `status`, `cancel`, and after the `committed` event the VMM's own outcome:
//! `resumed` or `failed` (docs/PROTOCOL.md, section 5.1: only then does the source learn it).

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::{json, Value};
use vfmig_pipeline::{
    DestinationSession, FinalOutcome, Phase, PipelineError, Progress as PipelineProgress,
};
use vfmig_transport::Listener;
use vfmig_vfio::MigrationDevice;

use super::proto::{self, CmdError, ErrorClass, Reply, Request};
use super::server::{self, Backend, Out, Outcome, Shared};
use super::source::failure_json;
use super::worker::{end, failed, invalid, queue_once, Emitter, Reports, Worker};
use super::{device_states, ControlAddr, DeviceSet};
use crate::devices::Side;
use crate::error::CliError;
use crate::migrate::{self, DestinationPlan};
use crate::progress::Progress;
use crate::signals::Cancel;

const COMMANDS: &[&str] = &["start", "resumed", "failed"];

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

/// The destination side's backend.
#[derive(Debug)]
pub struct DestinationBackend {
    plan: DestinationPlan,
    listener: Option<Listener>,
    shared: Shared,
    out: Emitter,
    worker: Option<Worker<Cmd>>,
    outcome_sent: bool,
    /// Cancelled while waiting for the source: nothing was touched, the worker is abandoned.
    abandoned: Option<Result<(), CliError>>,
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
        shared: Shared::new(Side::Destination, COMMANDS, devices, plan.timeout),
        plan,
        listener: Some(listener),
        out: Emitter(out),
        worker: None,
        outcome_sent: false,
        abandoned: None,
        json,
    })
}

impl DestinationBackend {
    fn start(&mut self, req: &Request) -> Option<Reply> {
        if let Err(e) = req.only_args(&[]) {
            return Some(Err(e));
        }
        let Some(listener) = self
            .listener
            .take_if(|_| !self.shared.devices.list.is_empty())
        else {
            return Some(Err(invalid(if self.worker.is_some() {
                "the migration was already started"
            } else {
                "no devices: `add-device` first"
            })));
        };
        let (devices, rep) = self.shared.start("accepting", self.out.clone(), self.json);
        let mut opts = migrate::destination_options(&self.plan, &Progress::hidden());
        let out = self.out.0.clone();
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
        let session = DestinationSession::new(devices, opts);
        let cancel = session.cancel_handle();
        let mut run = Run {
            session,
            plan: self.plan.clone(),
            rep,
            peer: None,
            resume_failed: false,
        };
        self.worker = Some(Worker::spawn(cancel, move |cmds, done| {
            let result = run.drive(&listener, &cmds);
            let (result, last) = run.conclude(result);
            end(result, last, &done, &run.rep.out, &cmds, |c| match c {
                Cmd::Resumed { id, .. } | Cmd::Failed(id) => Some(id),
                Cmd::Cancel => None,
            });
        }));
        Some(Ok(json!({})))
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
        let state = self.shared.snapshot.state();
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
        queue_once(&w.cmds, cmd, &mut self.outcome_sent)
    }
}

impl Backend for DestinationBackend {
    fn shared(&mut self) -> &mut Shared {
        &mut self.shared
    }

    fn execute(&mut self, req: &Request) -> Option<Reply> {
        match req.execute.as_str() {
            "start" => self.start(req),
            "resumed" | "failed" => self.outcome(req),
            name => Some(Err(proto::not_found(name))),
        }
    }

    fn cancel(&mut self) {
        let Some(w) = &self.worker else { return };
        if self.shared.snapshot.state() == "accepting" && self.abandoned.is_none() {
            // No source yet, no device touched: end now instead of waiting out the accept.
            let e = PipelineError::Cancelled {
                phase: Phase::Setup,
            };
            self.out.event("failed", failure_json(&e, &[]));
            self.abandoned = Some(Err(migrate::migration_error(e, &[])));
            return;
        }
        w.cancel.cancel();
        let _ = w.cmds.try_send(Cmd::Cancel);
    }

    fn poll_outcome(&mut self) -> Outcome {
        if let Some(r) = self.abandoned.take() {
            // The worker stays blocked in accept; the process ends without it.
            self.worker = None;
            self.listener = None;
            return Outcome::Ended(r);
        }
        self.worker.as_mut().map_or(Outcome::Idle, Worker::outcome)
    }
}

/// The worker: owns the session.
struct Run {
    session: DestinationSession<Box<dyn MigrationDevice>>,
    plan: DestinationPlan,
    rep: Reports,
    peer: Option<SocketAddr>,
    /// The VMM said `failed` (or left, or never answered) after the commit.
    resume_failed: bool,
}

impl Run {
    fn device_states(&mut self) {
        self.rep.device_states(self.session.devices_mut());
    }

    fn drive(
        &mut self,
        listener: &Listener,
        cmds: &Receiver<Cmd>,
    ) -> Result<vfmig_pipeline::Report, CliError> {
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
        self.rep
            .snapshot
            .set(json!({ "state": "receiving", "peer": recv.peer().to_string() }));
        self.rep
            .out
            .event("connected", json!({ "peer": recv.peer().to_string() }));
        self.device_states();
        let labels = self.rep.labels.clone();
        let err = |e| migrate::migration_error(e, &labels);
        self.session.receive_session(recv).map_err(err)?;
        // Committed: the source's devices never run again; the VMM loads its RAM and answers.
        self.rep.snapshot.set(json!({ "state": "committed" }));
        self.device_states();
        let devices = device_states(self.session.devices_mut());
        self.rep
            .out
            .event("committed", json!({ "devices": devices }));
        let (id, outcome) = match cmds.recv_timeout(self.plan.timeout) {
            Ok(Cmd::Resumed {
                id,
                resume_devices: true,
            }) => match self.session.resume() {
                Ok(()) => (id, FinalOutcome::Resumed),
                Err(e) => {
                    // `finish` resets the devices before the source learns the outcome.
                    self.rep.out.reply(
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
            self.rep.out.reply(id, Ok(json!({})));
        }
        if outcome == FinalOutcome::ResumeFailed {
            self.resume_failed = true;
            return Err(err(PipelineError::Cancelled {
                phase: Phase::Commit,
            }));
        }
        Ok(report)
    }

    /// The `completed` or `failed` event, and the process's result.
    fn conclude(
        &mut self,
        result: Result<vfmig_pipeline::Report, CliError>,
    ) -> (Result<(), CliError>, (&'static str, Value)) {
        self.device_states();
        match result {
            Ok(report) => {
                let last = self.rep.completed("recv", self.peer, &report);
                (Ok(()), last)
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
                (Err(e), failed(data, &self.rep.snapshot))
            }
        }
    }
}
