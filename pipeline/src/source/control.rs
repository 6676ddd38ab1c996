//! The control loop's step (stage events and failures, the destination's control frames,
//! cancel, progress, the inactivity timeout) and the commit exchange at the decision point.

use std::time::{Duration, Instant};

use vfmig_transport::{SendSession, TransportError};
use vfmig_vfio::MigrationDevice;
use vfmig_wire::{Control, FinalOutcome, FrameKind};

use super::{Active, SourceSession, TICK};
use crate::error::{Phase, PipelineError, Side};
use crate::reader::ReaderEvent;

impl<D: MigrationDevice> SourceSession<D> {
    /// One step of the control loop: stage events, failures, the peer's control frames, cancel,
    /// progress and the inactivity timeout.
    pub(super) fn tick(&mut self, a: &mut Active) -> Result<(), PipelineError> {
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
    pub(super) fn commit(&mut self, session: &SendSession) -> Result<FinalOutcome, PipelineError> {
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
}
