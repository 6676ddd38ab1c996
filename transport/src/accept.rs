//! Assembling a session on the destination while strangers knock.
//!
//! Every accepted connection handshakes on a thread of its own, under its own deadline
//! ([`HANDSHAKE_TIMEOUT`], at most the session timeout). At most [`MAX_PENDING_HANDSHAKES`]
//! run at once: a connection beyond that evicts the oldest pending one (its socket is shut down,
//! so its thread ends at once), which keeps a flood of silent connections from locking the real
//! source out. A failed or foreign handshake (a port scan, an HTTP request, random bytes, a wrong
//! key, another version) is reported to the caller's `on_dropped` and closed; the listener keeps
//! going until the accept timeout. The first connection that completes a handshake for a new
//! session creates the session; further connections must join exactly that session (its id,
//! which is fresh per handshake, is covered by both MACs with a PSK), with the same devices, at a
//! free index, or they are dropped the same way.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use vfmig_wire::handshake::Agreed;

use crate::config::{check_peer_policy, SessionConfig, MAX_STREAMS};
use crate::error::{Limit, TransportError};
use crate::ring::{Sealing, Sock};
use crate::uring::{Io, IoBuf, Sub, Uring};

/// Most handshakes pending at once on a listener.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Each pending handshake's own deadline (capped by the session timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake threads alive at once, evicted ones that have not ended yet included; a connection
/// beyond this is closed unanswered.
const MAX_HANDSHAKE_THREADS: usize = 2 * MAX_PENDING_HANDSHAKES;

/// What the assembler needs to run one server handshake.
pub(crate) trait ServerHandshaker: Send + Sync + 'static {
    /// Handshakes on `stream` within `limit`, offering `session_id` to a new session.
    fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        session_id: [u8; 16],
        limit: Duration,
    ) -> Result<(Sock, Agreed), TransportError>;
}

struct Pending {
    id: u64,
    /// The peer's address: eviction takes from the address with the most pending handshakes.
    ip: std::net::IpAddr,
    /// A clone of the socket: shutting it down ends the handshake thread's blocking I/O.
    stop: TcpStream,
}

/// The session being assembled.
struct Assembly {
    first: Agreed,
    peer: SocketAddr,
    socks: Vec<Option<(Sock, Option<Sealing>)>>,
    missing: usize,
    deadline: Instant,
}

/// The assembled session: its sockets in connection order, the first connection's agreement and
/// the source's address.
pub(crate) type Assembled = (Vec<(Sock, Option<Sealing>)>, Agreed, SocketAddr);

type HsResult = (u64, SocketAddr, Result<(Sock, Agreed), TransportError>);

/// Accepts connections on `listener` until one source's session is complete (see the module
/// doc). `sealing` builds a connection's AEAD state from its agreement.
pub(crate) fn assemble(
    listener: &TcpListener,
    cfg: &SessionConfig,
    hs: Arc<dyn ServerHandshaker>,
    sealing: fn(&Agreed) -> Option<Sealing>,
    on_dropped: &mut dyn FnMut(SocketAddr, &TransportError),
) -> Result<Assembled, TransportError> {
    let limit = HANDSHAKE_TIMEOUT.min(cfg.timeout);
    let (tx, rx) = crossbeam_channel::bounded::<HsResult>(MAX_HANDSHAKE_THREADS);
    let mut waiter = Waiter::new(listener)?;
    let mut st = State {
        pending: VecDeque::new(),
        evicted: VecDeque::new(),
        live: Arc::new(AtomicUsize::new(0)),
        next_id: 0,
        tx,
        note: Arc::clone(&waiter.note),
        hs,
        limit,
    };
    let accept_deadline = Instant::now() + cfg.accept_timeout;
    let mut session: Option<Assembly> = None;
    // Joins whose handshake finished before the first connection's (threads race): kept, at
    // most MAX_STREAMS, until the session they name exists.
    let mut early: Vec<Early> = Vec::new();
    let outcome = loop {
        // Results first: a completed source must not wait behind strangers.
        let mut fatal = None;
        while let Ok(r) = rx.try_recv() {
            let r = st.finished(r);
            fatal = fatal.or(handle(
                r,
                &mut session,
                &mut early,
                cfg,
                sealing,
                on_dropped,
            ));
        }
        if let Some(e) = fatal {
            break Err(e);
        }
        if let Some(s) = &session {
            if s.missing == 0 {
                break Ok(());
            }
        }
        let now = Instant::now();
        match &session {
            None if now >= accept_deadline => {
                break Err(TransportError::Timeout {
                    after: cfg.accept_timeout,
                    what: "a source to connect",
                })
            }
            Some(s) if now >= s.deadline => {
                break Err(TransportError::Timeout {
                    after: cfg.timeout,
                    what: "the session's other connections",
                })
            }
            _ => {}
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = st.start(stream, peer, cfg) {
                    on_dropped(peer, &e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Nothing to take yet; or a connection that died before we took it (ECONNABORTED) or
            // a transient shortage (EMFILE, ENFILE, ENOBUFS), which must not end the wait: report
            // it and go on. Either way, wait for the next event.
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || accept_error_is_transient(&e) =>
            {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    let e = TransportError::io("accept", e);
                    on_dropped(SocketAddr::from(([0, 0, 0, 0], 0)), &e);
                }
                let until = session.as_ref().map_or(accept_deadline, |s| s.deadline);
                if let Some(e) = wait(
                    &rx,
                    &mut waiter,
                    until,
                    &mut st,
                    &mut session,
                    &mut early,
                    cfg,
                    sealing,
                    on_dropped,
                ) {
                    break Err(e);
                }
            }
            Err(e) => break Err(TransportError::io("accept", e)),
        }
    };
    // Strangers still handshaking are cut off; their threads end on the shutdown.
    for p in st.pending.drain(..) {
        let _ = p.stop.shutdown(Shutdown::Both);
    }
    outcome?;
    let s = session.ok_or(TransportError::Cancelled)?;
    let socks = s.socks.into_iter().flatten().collect();
    Ok((socks, s.first, s.peer))
}

fn accept_error_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED)
            | Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::EPROTO)
            | Some(libc::EPERM)
    )
}

/// Waits for a handshake result or a connection to accept, at most until `until` (nothing to
/// accept right now).
#[allow(clippy::too_many_arguments)]
fn wait(
    rx: &Receiver<HsResult>,
    waiter: &mut Waiter,
    until: Instant,
    st: &mut State,
    session: &mut Option<Assembly>,
    early: &mut Vec<Early>,
    cfg: &SessionConfig,
    sealing: fn(&Agreed) -> Option<Sealing>,
    on_dropped: &mut dyn FnMut(SocketAddr, &TransportError),
) -> Option<TransportError> {
    match rx.try_recv() {
        Ok(r) => {
            let r = st.finished(r);
            handle(r, session, early, cfg, sealing, on_dropped)
        }
        Err(TryRecvError::Empty) => waiter
            .wait(until.saturating_duration_since(Instant::now()))
            .err(),
        Err(TryRecvError::Disconnected) => None,
    }
}

/// Sleeps until the listener has a connection to accept, a handshake thread sent its result
/// (it writes `note`, an eventfd, after the channel), or a deadline: no polling interval.
struct Waiter {
    ring: Uring<bool>,
    listener: std::os::fd::RawFd,
    note: Arc<File>,
    /// Whether a poll is in flight on the listener (`true`) and on `note` (`false`).
    armed: [bool; 2],
}

impl Waiter {
    fn new(listener: &TcpListener) -> Result<Waiter, TransportError> {
        let note = crate::uring::eventfd().map_err(|e| TransportError::io("eventfd", e))?;
        Ok(Waiter {
            ring: Uring::new(4, None).map_err(|e| TransportError::io("io_uring_setup", e))?,
            listener: listener.as_raw_fd(),
            note: Arc::new(File::from(note)),
            armed: [false; 2],
        })
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let events = u32::from(libc::POLLIN.unsigned_abs());
        for (i, is_listener) in [(0, true), (1, false)] {
            if self.armed[i] {
                continue;
            }
            let fd = if is_listener {
                self.listener
            } else {
                self.note.as_raw_fd()
            };
            let sub = Sub {
                io: Io::Poll { fd, events },
                buf: IoBuf::Empty,
                owner: is_listener,
            };
            self.ring
                .push(sub)
                .map_err(|r| TransportError::io("io_uring submission", r.error))?;
            self.armed[i] = true;
        }
        self.ring
            .wait(timeout)
            .map_err(|e| TransportError::io("io_uring_enter", e))?;
        while let Some(c) = self.ring.pop() {
            if c.owner {
                self.armed[0] = false;
            } else {
                self.armed[1] = false;
                // Readable: the counter is non-zero, so this read does not block.
                let mut n = [0u8; 8];
                let _ = (&*self.note).read(&mut n);
            }
        }
        Ok(())
    }
}

struct State {
    pending: VecDeque<Pending>,
    /// Handshakes dropped for newer ones whose result has not come back yet (at most
    /// [`MAX_HANDSHAKE_THREADS`]): their failure is ours, reported as the bound.
    evicted: VecDeque<u64>,
    live: Arc<AtomicUsize>,
    next_id: u64,
    tx: Sender<HsResult>,
    /// Written after every result sent on `tx`: wakes the assembler's [`Waiter`].
    note: Arc<File>,
    hs: Arc<dyn ServerHandshaker>,
    limit: Duration,
}

impl State {
    /// Takes a finished handshake off the books; one we cut off reports the bound as its cause.
    fn finished(&mut self, r: HsResult) -> HsResult {
        let (id, peer, res) = r;
        self.pending.retain(|p| p.id != id);
        let before = self.evicted.len();
        self.evicted.retain(|&e| e != id);
        // An evicted handshake is dropped even if it completed: its socket was shut down.
        if self.evicted.len() < before {
            let e = TransportError::TooMany {
                what: Limit::PendingHandshakes,
                got: MAX_PENDING_HANDSHAKES as u64 + 1,
                max: MAX_PENDING_HANDSHAKES as u64,
            };
            return (id, peer, Err(e));
        }
        (id, peer, res)
    }

    /// Starts a handshake on a new connection, evicting the oldest pending one if the bound is
    /// reached.
    fn start(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        cfg: &SessionConfig,
    ) -> Result<(), TransportError> {
        check_peer_policy(peer, cfg)?;
        let bound = |got: usize| TransportError::TooMany {
            what: Limit::PendingHandshakes,
            got: got as u64,
            max: MAX_HANDSHAKE_THREADS as u64,
        };
        let live = self.live.load(Ordering::SeqCst);
        if live >= MAX_HANDSHAKE_THREADS {
            return Err(bound(live + 1));
        }
        if self.pending.len() >= MAX_PENDING_HANDSHAKES {
            if let Some(old) = self.victim(peer.ip()) {
                let _ = old.stop.shutdown(Shutdown::Both);
                if self.evicted.len() >= MAX_HANDSHAKE_THREADS {
                    self.evicted.pop_front();
                }
                self.evicted.push_back(old.id);
            }
        }
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| TransportError::io("configure accepted socket", e))?;
        let stop = stream
            .try_clone()
            .map_err(|e| TransportError::io("dup accepted socket", e))?;
        let session_id: [u8; 16] = crate::session::random()?;
        let id = self.next_id;
        self.next_id += 1;
        let (tx, hs, live, limit, note) = (
            self.tx.clone(),
            Arc::clone(&self.hs),
            Arc::clone(&self.live),
            self.limit,
            Arc::clone(&self.note),
        );
        live.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("vfmig-handshake".into())
            .spawn(move || {
                let r = hs.handshake(stream, peer, session_id, limit);
                // The assembler may be gone (session complete): then this drops the socket.
                let _ = tx.send((id, peer, r));
                live.fetch_sub(1, Ordering::SeqCst);
                // An eventfd write fails only if the counter would overflow: a wake is pending.
                let _ = (&*note).write(&1u64.to_ne_bytes());
            });
        if let Err(e) = spawned {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return Err(TransportError::io("spawn handshake thread", e));
        }
        self.pending.push_back(Pending {
            id,
            ip: peer.ip(),
            stop,
        });
        Ok(())
    }

    /// The pending handshake to drop for a new one from `incoming`: the oldest from the address
    /// holding the most pending handshakes (the new one counted), so a flood from one address
    /// evicts its own connections, not a real source's from another address.
    fn victim(&mut self, incoming: std::net::IpAddr) -> Option<Pending> {
        let ips: Vec<std::net::IpAddr> = self.pending.iter().map(|p| p.ip).collect();
        let at = victim_index(&ips, incoming)?;
        self.pending.remove(at)
    }
}

/// Acts on a finished handshake: creates the session, joins it, or drops the connection.
/// Returns the error that ends the wait: a source that completed the handshake (with the key,
/// when one is configured) but declared devices that cannot pair with ours, before any session
/// exists, is the real source given the wrong devices, not a stranger; waiting on would only
/// hide the operator's mistake.
fn handle(
    (_, peer, r): HsResult,
    session: &mut Option<Assembly>,
    early: &mut Vec<Early>,
    cfg: &SessionConfig,
    sealing: fn(&Agreed) -> Option<Sealing>,
    on_dropped: &mut dyn FnMut(SocketAddr, &TransportError),
) -> Option<TransportError> {
    let (sock, a) = match r {
        Ok(v) => v,
        // Only before a session exists: once one is assembling, a stranger's offer (possible
        // without a key) must not end it.
        Err(e) if session.is_none() && is_device_mismatch(&e) => return Some(e),
        Err(e) => {
            on_dropped(peer, &e);
            return None;
        }
    };
    match session {
        None if !a.joined => {
            let streams = usize::from(a.streams).clamp(1, MAX_STREAMS);
            let mut socks: Vec<Option<(Sock, Option<Sealing>)>> =
                (0..streams).map(|_| None).collect();
            socks[0] = Some((sock, sealing(&a)));
            let s = session.insert(Assembly {
                first: a,
                peer,
                socks,
                missing: streams - 1,
                deadline: Instant::now() + cfg.timeout,
            });
            for (sock, a, peer) in early.drain(..) {
                join(s, sock, a, peer, sealing, on_dropped);
            }
        }
        None => {
            if early.len() >= MAX_STREAMS {
                let (_, old, old_peer) = early.remove(0);
                on_dropped(
                    old_peer,
                    &TransportError::NotInSession {
                        peer: old_peer,
                        conn_index: old.conn_index,
                    },
                );
            }
            early.push((sock, a, peer));
        }
        Some(s) => join(s, sock, a, peer, sealing, on_dropped),
    }
    None
}

/// A join that finished its handshake before the session it names existed.
type Early = (Sock, Agreed, SocketAddr);

/// Adds a joining connection to the session, or drops it when it does not belong there.
fn join(
    s: &mut Assembly,
    sock: Sock,
    a: Agreed,
    peer: SocketAddr,
    sealing: fn(&Agreed) -> Option<Sealing>,
    on_dropped: &mut dyn FnMut(SocketAddr, &TransportError),
) {
    let index = usize::from(a.conn_index);
    let fits = a.joined
        && a.session_id == s.first.session_id
        && a.streams == s.first.streams
        && a.devices == s.first.devices
        && index < s.socks.len()
        && s.socks[index].is_none();
    if fits {
        s.socks[index] = Some((sock, sealing(&a)));
        s.missing -= 1;
    } else {
        on_dropped(
            peer,
            &TransportError::NotInSession {
                peer,
                conn_index: a.conn_index,
            },
        );
    }
}

/// A handshake that failed only because the two sides were given devices that cannot pair.
fn is_device_mismatch(e: &TransportError) -> bool {
    use vfmig_wire::handshake::HandshakeError;
    matches!(
        e,
        TransportError::Handshake {
            source: HandshakeError::DeviceMismatch(_) | HandshakeError::DeviceCountMismatch { .. },
            ..
        }
    )
}

/// Index in `pending` (oldest first) of the handshake to evict for a new one from `incoming`:
/// the oldest from the address with the most pending handshakes, the new one counted.
fn victim_index(pending: &[std::net::IpAddr], incoming: std::net::IpAddr) -> Option<usize> {
    let count = |ip: std::net::IpAddr| {
        pending.iter().filter(|&&p| p == ip).count() + usize::from(ip == incoming)
    };
    let busiest = pending.iter().copied().max_by_key(|&ip| count(ip))?;
    pending.iter().position(|&p| p == busiest)
}

#[cfg(test)]
mod tests {
    use super::victim_index;
    use std::net::IpAddr;

    #[test]
    fn a_flood_from_one_address_evicts_its_own_handshakes_not_the_real_sources() {
        let real: IpAddr = "192.0.2.1".parse().unwrap();
        let flood: IpAddr = "192.0.2.66".parse().unwrap();
        // The real source came first; then the flood filled the rest.
        let mut pending = vec![real];
        pending.extend(std::iter::repeat_n(flood, 63));
        assert_eq!(victim_index(&pending, flood), Some(1));
        // A second real connection while the flood holds the rest: still the flood's oldest.
        assert_eq!(victim_index(&pending, real), Some(1));
        // From one address only (e.g. loopback): the oldest.
        assert_eq!(victim_index(&[flood; 4], flood), Some(0));
        assert_eq!(victim_index(&[], flood), None);
    }
}
