//! How a session ends: close and abort requests, time limits from the sans-IO clock
//! (`crate::liveness`), half-closing the connections, and the teardown of the engine.
//!
//! Idle connections carry a keepalive every `keepalive`; a connection with a read in flight that
//! sees nothing for `timeout` fails the session, as does a send that does not complete within
//! `timeout`. Parked connections are exempt (the peer cannot send on them). At teardown every
//! entry still in the table is cancelled by its user_data (`AsyncCancel`) after `shutdown(2)`:
//! shutting a socket down did not complete its pending receives on this kernel, and a
//! cancel-any request cancelled only the first match.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use vfmig_wire::AbortReason;

use crate::error::TransportError;
use crate::liveness::{Ending, Stall};
use crate::reorder::Admit;

use super::frame::abort_frame;
use super::{Engine, Rx, Step, Urgent, DRAIN_MAX};

impl Engine {
    pub(super) fn take_urgent(&mut self) {
        match self.urgent_rx.try_recv() {
            Ok(Urgent::Close) => {
                self.live.close(Instant::now());
            }
            Ok(Urgent::Abort { reason, detail }) => {
                // Whatever the peer does next (it closes on our abort), this is the outcome.
                self.shared.set_failure(TransportError::Aborted { reason });
                self.start_abort(reason, detail);
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                // Every handle is gone without close(): tell the peer this is no clean end.
                if !matches!(self.live.ending(), Ending::Closing { .. }) {
                    self.shared.set_failure(TransportError::Cancelled);
                    self.start_abort(AbortReason::Cancelled, b"session dropped".to_vec());
                }
            }
        }
    }

    fn start_abort(&mut self, reason: AbortReason, detail: Vec<u8>) {
        if !self.live.abort(reason, Instant::now()) {
            return;
        }
        for c in &mut self.conns {
            // Queued data is moot now; the abort goes out first on every connection.
            c.queue.clear();
            c.queued_bytes = 0;
            if !c.wr_shut {
                c.queue.push_back(abort_frame(reason, detail.clone()));
            }
        }
    }

    pub(super) fn aborting(&self) -> bool {
        matches!(self.live.ending(), Ending::Aborting { .. })
    }

    pub(super) fn closing(&self) -> bool {
        matches!(self.live.ending(), Ending::Closing { .. })
    }

    fn flushed(&self) -> bool {
        self.out_rx.is_empty() && self.all_sent() && self.ring.zc_pending() == 0
    }

    /// Every connection's queue is empty and nothing is in flight on it.
    fn all_sent(&self) -> bool {
        self.conns
            .iter()
            .enumerate()
            .all(|(i, c)| c.queue.is_empty() && !self.live.sending(i))
    }

    /// Tells the sans-IO clock what only the engine knows: which connections have a read in
    /// flight, and whether the reorder window is stuck (frames held, nothing delivered, and no
    /// connection carries a next frame that merely waits for a buffer or for the consumer).
    pub(super) fn sync_liveness(&mut self, now: Instant) {
        for (i, c) in self.conns.iter().enumerate() {
            self.live.set_reading(i, matches!(c.rx, Rx::Busy));
        }
        let next_waiting = self.conns.iter().any(|c| match &c.rx {
            Rx::Waiting { hdr, .. } => self.reorder.admit(hdr) == Admit::Next,
            _ => false,
        });
        let stalled = self.reorder.held() > 0 && !self.reading_paused() && !next_waiting;
        self.live.set_stalled(stalled, now);
    }

    fn stall_error(&self, stall: Stall) -> TransportError {
        let after = self.p.timeout;
        match stall {
            Stall::PeerSilent { conn } => TransportError::PeerSilent { conn, after },
            Stall::Send { .. } => TransportError::Timeout {
                after,
                what: "a send to complete (peer not reading)",
            },
            Stall::Reorder => {
                let (device, expected) = self.reorder.first_waiting().unwrap_or((0, 0));
                TransportError::ReorderStall {
                    device,
                    expected,
                    waited: after,
                }
            }
            Stall::Close => TransportError::Timeout {
                after,
                what: "close (flush and peer close)",
            },
        }
    }

    pub(super) fn check_time(&mut self, now: Instant) -> Result<Step, TransportError> {
        self.sync_liveness(now);
        if let Err(stall) = self.live.handle_timeout(now) {
            return Err(self.stall_error(stall));
        }
        if let Ending::Aborting { reason, .. } = self.live.ending() {
            if self.all_sent() || self.live.abort_grace_over(now).is_some() {
                return Ok(Step::Done(TransportError::Aborted { reason }));
            }
            return Ok(Step::Continue);
        }
        // Half-close our side of every connection the peer closed (destination), or of every
        // connection once all is flushed (source closing).
        let flushed = self.closing() && self.flushed();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let peer_done = matches!(c.rx, Rx::Eof);
            let idle = c.queue.is_empty() && !self.live.sending(i);
            if !c.wr_shut && idle && (peer_done || flushed) {
                c.sock.shutdown(Shutdown::Write);
                c.wr_shut = true;
                self.live.write_shut(i);
            }
        }
        let all_closed = self
            .conns
            .iter()
            .all(|c| c.wr_shut && matches!(c.rx, Rx::Eof));
        if all_closed {
            if let Some((device, expected)) = self.reorder.first_waiting() {
                return Err(TransportError::IncompleteStream { device, expected });
            }
            return Ok(Step::Done(TransportError::Closed));
        }
        if self.live.close_overdue(now) {
            return Err(self.stall_error(Stall::Close));
        }
        Ok(Step::Continue)
    }

    pub(super) fn teardown(mut self, outcome: TransportError) {
        let mut outcome = outcome;
        let in_tx = self.in_tx.take();
        if let (TransportError::Closed, Some(in_tx)) = (&outcome, &in_tx) {
            // Hand the consumer what was verified before the peer closed, each frame within the
            // session timeout; a consumer that stops taking them must not see a clean close.
            while let Some(f) = self.ready.pop_front() {
                if in_tx.send_timeout(f, self.p.timeout).is_err() {
                    outcome = TransportError::Timeout {
                        after: self.p.timeout,
                        what: "the consumer to take the last frames",
                    };
                    break;
                }
            }
        }
        let deadline = Instant::now() + DRAIN_MAX.min(self.p.timeout);
        self.shared.set_failure(outcome);
        // Consumers blocked in `recv` see the disconnect and read the outcome.
        drop(in_tx);
        for c in &self.conns {
            c.sock.shutdown(Shutdown::Both);
        }
        // Cancel every operation still in flight and wait (bounded) for the kernel to hand its
        // buffer back; whatever it does not hand back is leaked with the ring, never freed.
        if !self
            .ring
            .drain(deadline.saturating_duration_since(Instant::now()))
        {
            self.ring.set_drain_limit(Duration::ZERO);
        }
    }
}
