//! The engine's sense of time, without I/O: when each connection last sent and heard something,
//! which send is in flight since when, whether the reorder window is stuck, and how the session
//! is ending. The engine (`ring/`) reports events with the time they happened, asks
//! [`Liveness::handle_timeout`] what a moment means (a [`Stall`] is a failure), and sleeps until
//! [`Liveness::poll_timeout`]: the earliest deadline, so keepalives go out and timeouts fire on
//! time rather than on a polling tick. Tests drive it with a fake clock (instants built from one
//! base instant), never by sleeping.

use std::time::{Duration, Instant};

use vfmig_wire::AbortReason;

/// Longest an abort waits for its frame to go out on every connection.
pub(crate) const ABORT_GRACE: Duration = Duration::from_secs(2);

/// How the session is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Not ending.
    Open,
    /// `close()` was asked: flush, half-close, wait for the peer's close (at most the timeout).
    Closing { since: Instant },
    /// An `Abort` frame goes out on every connection; the session ends once it is sent, or
    /// after [`ABORT_GRACE`] (at most the timeout).
    Aborting { reason: AbortReason, since: Instant },
}

/// A deadline that passed: each ends the session with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stall {
    /// A connection with a read in flight heard nothing for the timeout.
    PeerSilent { conn: usize },
    /// A send did not complete within the timeout (the peer does not read).
    Send { conn: usize },
    /// Frames are held in the reorder window and nothing was delivered for the timeout, with
    /// no connection carrying the next frame.
    Reorder,
    /// The close did not finish (flush and the peer's close) within the timeout.
    Close,
}

#[derive(Debug, Clone)]
struct Conn {
    last_tx: Instant,
    last_rx: Instant,
    sending_since: Option<Instant>,
    /// A read is in flight (the peer owes us bytes, or we wait for its next frame).
    reading: bool,
    /// Our side is half-closed: no more keepalives.
    write_shut: bool,
}

/// Timestamps and deadlines of one session's connections (module docs).
#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    timeout: Duration,
    keepalive: Duration,
    conns: Vec<Conn>,
    /// Last time the reorder window delivered, or had no reason to be stuck.
    last_progress: Instant,
    stalled: bool,
    ending: Ending,
}

impl Liveness {
    /// `conns` connections, all fresh at `now`.
    pub(crate) fn new(conns: usize, timeout: Duration, keepalive: Duration, now: Instant) -> Self {
        let c = Conn {
            last_tx: now,
            last_rx: now,
            sending_since: None,
            reading: false,
            write_shut: false,
        };
        Liveness {
            timeout,
            keepalive,
            conns: vec![c; conns],
            last_progress: now,
            stalled: false,
            ending: Ending::Open,
        }
    }

    /// How the session is ending.
    pub(crate) fn ending(&self) -> Ending {
        self.ending
    }

    /// `close()` was asked: `Open` becomes `Closing`. Returns whether it did (a session already
    /// closing or aborting keeps its state).
    pub(crate) fn close(&mut self, now: Instant) -> bool {
        if self.ending == Ending::Open {
            self.ending = Ending::Closing { since: now };
            return true;
        }
        false
    }

    /// An abort overrides an open or closing session (the first abort wins). Returns whether this
    /// one started the abort.
    pub(crate) fn abort(&mut self, reason: AbortReason, now: Instant) -> bool {
        if matches!(self.ending, Ending::Aborting { .. }) {
            return false;
        }
        self.ending = Ending::Aborting { reason, since: now };
        true
    }

    /// A read was posted on `conn`: the peer's silence counts from now.
    pub(crate) fn read_posted(&mut self, conn: usize, now: Instant) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.reading = true;
            c.last_rx = now;
        }
    }

    /// Bytes arrived on `conn`.
    pub(crate) fn received(&mut self, conn: usize, now: Instant) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.last_rx = now;
        }
    }

    /// Whether `conn` has a read in flight (the engine says so before asking about deadlines:
    /// a connection parked for window room or a buffer is not owed anything by the peer).
    pub(crate) fn set_reading(&mut self, conn: usize, reading: bool) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.reading = reading;
        }
    }

    /// A frame's send started on `conn`.
    pub(crate) fn send_started(&mut self, conn: usize, now: Instant) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.sending_since = Some(now);
            c.last_tx = now;
        }
    }

    /// The frame in flight on `conn` is sent. Returns when it started.
    pub(crate) fn send_done(&mut self, conn: usize, now: Instant) -> Option<Instant> {
        let c = self.conns.get_mut(conn)?;
        c.last_tx = now;
        c.sending_since.take()
    }

    /// Whether a frame is in flight on `conn`.
    pub(crate) fn sending(&self, conn: usize) -> bool {
        self.conns
            .get(conn)
            .is_some_and(|c| c.sending_since.is_some())
    }

    /// Our side of `conn` is half-closed.
    pub(crate) fn write_shut(&mut self, conn: usize) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.write_shut = true;
        }
    }

    /// The reorder window delivered a frame.
    pub(crate) fn delivered(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// Whether the reorder window is stuck: frames held and nothing that could deliver the next
    /// one (no connection carrying it, no consumer to wait for). Not stuck counts as progress.
    pub(crate) fn set_stalled(&mut self, stalled: bool, now: Instant) {
        if !stalled {
            self.last_progress = now;
        }
        self.stalled = stalled;
    }

    /// Whether `conn` is due a keepalive at `now` (open session, nothing in flight on it, our
    /// side not shut, silent for the keepalive interval).
    pub(crate) fn keepalive_due(&self, conn: usize, now: Instant) -> bool {
        self.keepalive_at(conn).is_some_and(|at| now >= at)
    }

    fn keepalive_at(&self, conn: usize) -> Option<Instant> {
        let c = self.conns.get(conn)?;
        (self.ending == Ending::Open && !c.write_shut && c.sending_since.is_none())
            .then(|| c.last_tx + self.keepalive)
    }

    /// What `now` means for the connections and the reorder window: the first deadline that
    /// passed, if any. The close deadline is separate ([`Liveness::close_overdue`]): a close that
    /// completes at its deadline is a clean close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), Stall> {
        for (conn, c) in self.conns.iter().enumerate() {
            if c.reading && now >= c.last_rx + self.timeout {
                return Err(Stall::PeerSilent { conn });
            }
            if c.sending_since.is_some_and(|t| now >= t + self.timeout) {
                return Err(Stall::Send { conn });
            }
        }
        if !self.stalled {
            self.last_progress = now;
        } else if now >= self.last_progress + self.timeout {
            return Err(Stall::Reorder);
        }
        Ok(())
    }

    /// The abort's reason once its grace is over (the engine ends the session then, sent or not).
    pub(crate) fn abort_grace_over(&self, now: Instant) -> Option<AbortReason> {
        match self.ending {
            Ending::Aborting { reason, since } if now >= since + self.abort_grace() => Some(reason),
            _ => None,
        }
    }

    fn abort_grace(&self) -> Duration {
        self.timeout.min(ABORT_GRACE)
    }

    /// Whether a close has run past the timeout.
    pub(crate) fn close_overdue(&self, now: Instant) -> bool {
        matches!(self.ending, Ending::Closing { since } if now >= since + self.timeout)
    }

    /// The earliest instant at which something is due: a keepalive, a read, send, reorder,
    /// close or abort deadline. The engine sleeps until then unless a completion or a wake-up
    /// comes first.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let mut due: Option<Instant> = None;
        let mut at = |t: Instant| due = Some(due.map_or(t, |d| d.min(t)));
        for (i, c) in self.conns.iter().enumerate() {
            if c.reading {
                at(c.last_rx + self.timeout);
            }
            if let Some(t) = c.sending_since {
                at(t + self.timeout);
            }
            if let Some(t) = self.keepalive_at(i) {
                at(t);
            }
        }
        if self.stalled {
            at(self.last_progress + self.timeout);
        }
        match self.ending {
            Ending::Open => {}
            Ending::Closing { since } => at(since + self.timeout),
            Ending::Aborting { since, .. } => at(since + self.abort_grace()),
        }
        // With nothing due (every connection shut, no deadline), look again after a timeout.
        due.unwrap_or(self.last_progress.max(self.latest()) + self.timeout)
    }

    fn latest(&self) -> Instant {
        self.conns
            .iter()
            .map(|c| c.last_tx.max(c.last_rx))
            .max()
            .unwrap_or(self.last_progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);
    const KA: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    fn live(conns: usize) -> (Liveness, Instant) {
        let t0 = Instant::now();
        (Liveness::new(conns, T, KA, t0), t0)
    }

    #[test]
    fn a_silent_peer_is_named_exactly_at_the_timeout() {
        let (mut l, t0) = live(2);
        l.read_posted(1, t0);
        l.send_started(1, t0);
        l.send_done(1, t0);
        assert_eq!(l.handle_timeout(t0 + T - MS), Ok(()));
        assert_eq!(l.handle_timeout(t0 + T), Err(Stall::PeerSilent { conn: 1 }));
        // Bytes reset the clock; a connection parked (no read in flight) owes nothing.
        l.received(1, t0 + T - MS);
        assert_eq!(l.handle_timeout(t0 + T), Ok(()));
        l.set_reading(1, false);
        assert_eq!(l.handle_timeout(t0 + 10 * T), Ok(()));
    }

    #[test]
    fn a_stuck_send_fails_and_a_finished_one_does_not() {
        let (mut l, t0) = live(1);
        l.send_started(0, t0 + MS);
        assert!(l.sending(0));
        assert_eq!(l.handle_timeout(t0 + T), Ok(()));
        assert_eq!(l.handle_timeout(t0 + MS + T), Err(Stall::Send { conn: 0 }));
        assert_eq!(l.send_done(0, t0 + 2 * MS), Some(t0 + MS));
        assert_eq!(l.handle_timeout(t0 + 3 * T), Ok(()));
    }

    #[test]
    fn keepalives_are_due_on_idle_open_connections_and_drive_the_wait() {
        let (mut l, t0) = live(2);
        assert_eq!(l.poll_timeout(), t0 + KA);
        assert!(!l.keepalive_due(0, t0 + KA - MS));
        assert!(l.keepalive_due(0, t0 + KA));
        // Sending on 0 moves its keepalive; 1 stays due first.
        l.send_started(0, t0 + 2 * MS);
        assert!(!l.keepalive_due(0, t0 + KA));
        assert_eq!(l.poll_timeout(), t0 + KA);
        l.send_done(0, t0 + 3 * MS);
        l.write_shut(1);
        assert_eq!(l.poll_timeout(), t0 + 3 * MS + KA);
        // No keepalives once ending.
        assert!(l.close(t0 + 4 * MS));
        assert!(!l.keepalive_due(0, t0 + T));
        assert_eq!(l.poll_timeout(), t0 + 4 * MS + T);
    }

    #[test]
    fn a_reorder_stall_counts_only_while_stalled() {
        let (mut l, t0) = live(1);
        l.set_stalled(true, t0);
        assert_eq!(l.poll_timeout(), t0 + KA);
        l.write_shut(0);
        assert_eq!(l.poll_timeout(), t0 + T);
        assert_eq!(l.handle_timeout(t0 + T - MS), Ok(()));
        assert_eq!(l.handle_timeout(t0 + T), Err(Stall::Reorder));
        // A delivery restarts the count; not being stalled is progress.
        l.delivered(t0 + T);
        assert_eq!(l.handle_timeout(t0 + 2 * T - MS), Ok(()));
        l.set_stalled(false, t0 + 2 * T - MS);
        l.set_stalled(true, t0 + 2 * T - MS);
        assert_eq!(l.handle_timeout(t0 + 3 * T - 2 * MS), Ok(()));
    }

    #[test]
    fn close_then_abort_and_their_deadlines() {
        let (mut l, t0) = live(1);
        assert!(l.close(t0));
        assert!(!l.close(t0 + MS), "a second close changes nothing");
        assert_eq!(l.ending(), Ending::Closing { since: t0 });
        assert!(!l.close_overdue(t0 + T - MS));
        assert!(l.close_overdue(t0 + T));
        // An abort overrides the close; its grace is bounded by ABORT_GRACE.
        assert!(l.abort(AbortReason::Cancelled, t0 + MS));
        assert!(
            !l.abort(AbortReason::Internal, t0 + 2 * MS),
            "the first abort wins"
        );
        assert!(!l.close_overdue(t0 + 2 * T));
        assert_eq!(l.abort_grace_over(t0 + MS + ABORT_GRACE - MS), None);
        assert_eq!(
            l.abort_grace_over(t0 + MS + ABORT_GRACE),
            Some(AbortReason::Cancelled)
        );
        assert_eq!(l.poll_timeout(), t0 + MS + ABORT_GRACE);
        assert!(!l.close(t0 + 3 * MS), "no close out of an abort");
    }

    #[test]
    fn a_short_timeout_bounds_the_abort_grace() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, Duration::from_millis(300), KA, t0);
        l.abort(AbortReason::Internal, t0);
        assert_eq!(
            l.abort_grace_over(t0 + Duration::from_millis(300)),
            Some(AbortReason::Internal)
        );
    }
}
