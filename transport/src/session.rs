//! Sessions: the source's [`SendSession`], the destination's [`Listener`] and [`RecvSession`].
//!
//! A session is N TCP connections. The first connection handshakes (and authenticates) and gets
//! a session id; the other N-1 join it by id. Nothing but the handshake is read or written before
//! the handshake succeeded on a connection. Then the connections are handed to the io_uring
//! engine (`ring/`); the handles here only validate, queue and dequeue.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, SendTimeoutError};
use vfmig_wire::handshake::{
    default_protection, Agreed, Auth, ClientHandshake, ClientParams, DeviceDesc, Limits, Offer,
    ServerHandshake, ServerParams, KNOWN_CODECS,
};
use vfmig_wire::seal::{FrameOpener, FrameSealer};
use vfmig_wire::{AbortReason, FrameHeader, FrameProtection};

use crate::config::{
    check_peer_policy, AuthConfig, SessionConfig, MAX_ABORT_DETAIL, MAX_DEVICES, MAX_STREAMS,
};
use crate::error::{Limit, TransportError};
use crate::handshake_io::{drive, Side, TcpHs};
use crate::pool::{BufPool, PoolBuf};
use crate::ring::{self, EngineHandle, EngineParams, OutFrame, OutPayload, Sealing, Sock, Urgent};
use crate::stats::TransportStats;
use crate::tls;

/// A verified frame.
#[derive(Debug)]
pub struct Frame {
    /// The header as received (`wire_len` and `crc` included).
    pub header: FrameHeader,
    /// The payload, `None` when `wire_len == 0`.
    pub payload: Option<PoolBuf>,
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], TransportError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| {
        TransportError::io(
            "getrandom",
            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    Ok(b)
}

fn wire_auth(a: &AuthConfig) -> Auth {
    match a {
        AuthConfig::None => Auth::None,
        AuthConfig::Psk(k) => Auth::Psk(k.clone()),
    }
}

/// How frames are protected: inside TLS, TLS does it (CRC32C against faults); with a PSK and no
/// TLS, AES-256-GCM with keys from the handshake; otherwise CRC32C.
fn protection(cfg: &SessionConfig) -> FrameProtection {
    if cfg.tls.is_some() {
        FrameProtection::Crc32c
    } else {
        default_protection(&wire_auth(&cfg.auth))
    }
}

/// The AEAD state of one connection, from its own handshake's keys (`client`: we are the source).
fn sealing(agreed: &Agreed, client: bool) -> Option<Sealing> {
    match (&agreed.keys, agreed.protection) {
        (Some(keys), FrameProtection::Aes256Gcm) => Some(Sealing {
            sealer: FrameSealer::new(keys, client, agreed.conn_index),
            opener: FrameOpener::new(keys, client, agreed.conn_index),
        }),
        _ => None,
    }
}

/// What both handle types share.
#[derive(Debug)]
struct Core {
    engine: EngineHandle,
    agreed: Agreed,
    pool: BufPool,
    timeout: Duration,
    peer: SocketAddr,
}

impl Core {
    fn start(
        socks: Vec<(Sock, Option<Sealing>)>,
        agreed: Agreed,
        cfg: &SessionConfig,
        peer: SocketAddr,
        destination: bool,
    ) -> Result<Core, TransportError> {
        let pool = BufPool::new(cfg.pool_slots, cfg.slot_size)?;
        let params = EngineParams {
            devices: agreed.devices.len(),
            max_payload: agreed.max_payload,
            window_bytes: agreed.window_bytes,
            timeout: cfg.timeout,
            keepalive: cfg.keepalive,
            zerocopy_min: cfg.zerocopy_min,
            out_queue: 4 * socks.len(),
            peer_closes: destination,
        };
        let name = if destination { "recv" } else { "send" };
        let engine = ring::start(socks, pool.clone(), params, name)?;
        Ok(Core {
            engine,
            agreed,
            pool,
            timeout: cfg.timeout,
            peer,
        })
    }

    /// The terminal error of an ended engine (or `Closed`).
    fn ended(&self) -> TransportError {
        self.engine
            .shared
            .failure()
            .unwrap_or(TransportError::Cancelled)
    }

    fn check_alive(&self) -> Result<(), TransportError> {
        match self.engine.shared.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queues a frame. `trailer`: the payload ends with its raw bytes' hash trailer
    /// ([`vfmig_wire::FLAG_HASH_TRAILER`]): the CRC covers the header and the trailer only.
    fn enqueue(
        &self,
        mut header: FrameHeader,
        payload: OutPayload,
        trailer: bool,
    ) -> Result<(), TransportError> {
        self.check_alive()?;
        let bytes: &[u8] = match &payload {
            OutPayload::Empty => &[],
            OutPayload::Pool(b) => b.as_slice(),
            OutPayload::Heap(v) => v,
        };
        let len = bytes.len();
        if len > self.agreed.max_payload as usize {
            return Err(TransportError::TooMany {
                what: Limit::Payload,
                got: len as u64,
                max: u64::from(self.agreed.max_payload),
            });
        }
        // `len <= max_payload`, a u32.
        header.wire_len = u32::try_from(len).unwrap_or(u32::MAX);
        // A sealed frame's tag covers it (the engine seals it); else one CRC32C pass here (over
        // the header and the hash trailer only, for a frame that has one).
        let sealed = self.agreed.protection == FrameProtection::Aes256Gcm;
        let hdr = if trailer {
            header
                .encode_hash_trailer(bytes, sealed)
                .ok_or(TransportError::InvalidFrame {
                    source: vfmig_wire::WireError::ReservedFlags {
                        flags: vfmig_wire::FLAG_HASH_TRAILER,
                    },
                })?
        } else if sealed {
            header.encode_unprotected()
        } else {
            header.encode(bytes)
        };
        FrameHeader::decode(&hdr).map_err(|source| TransportError::InvalidFrame { source })?;
        if header.kind.is_sequenced() && usize::from(header.device) >= self.agreed.devices.len() {
            return Err(TransportError::UnknownDevice {
                device: header.device,
                devices: self.agreed.devices.len(),
            });
        }
        let frame = OutFrame {
            hdr: ring::head(hdr),
            payload,
        };
        match self.engine.out_tx.send_timeout(frame, self.timeout) {
            Ok(()) => {
                self.engine.waker.wake();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(_)) => Err(TransportError::Timeout {
                after: self.timeout,
                what: "room in the send queue (peer not draining)",
            }),
            Err(SendTimeoutError::Disconnected(_)) => Err(self.ended()),
        }
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Frame>, TransportError> {
        if let Some(e) = self.engine.shared.failure() {
            // A failed session delivers nothing more; a closed one drains what was verified.
            if !matches!(e, TransportError::Closed) {
                return Err(e);
            }
        }
        match self.engine.in_rx.recv_timeout(timeout) {
            Ok(f) => {
                if self
                    .engine
                    .shared
                    .want_wake
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    self.engine.waker.wake();
                }
                Ok(Some(f))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self.ended()),
        }
    }

    fn abort(&self, reason: AbortReason, detail: &str) {
        let mut d = detail.as_bytes();
        if d.len() > MAX_ABORT_DETAIL {
            // Cut at a character boundary so the detail stays valid UTF-8.
            let mut n = MAX_ABORT_DETAIL;
            while !detail.is_char_boundary(n) {
                n -= 1;
            }
            d = &d[..n];
        }
        let _ = self.engine.urgent_tx.try_send(Urgent::Abort {
            reason,
            detail: d.to_vec(),
        });
        self.engine.waker.wake();
        self.engine.join();
    }

    fn close(&self) -> Result<TransportStats, TransportError> {
        let _ = self.engine.urgent_tx.try_send(Urgent::Close);
        self.engine.waker.wake();
        self.engine.join();
        match self.ended() {
            TransportError::Closed => Ok(self.stats()),
            e => Err(e),
        }
    }

    fn stats(&self) -> TransportStats {
        self.engine.shared.counters.snapshot()
    }
}

/// The source side of a session.
///
/// Dropping it without [`SendSession::close`] aborts the session: queued frames are discarded
/// and the destination gets [`TransportError::PeerAborted`] with reason
/// [`AbortReason::Cancelled`] (best effort, in the background).
#[derive(Debug)]
pub struct SendSession {
    core: Core,
}

fn offer(cfg: &SessionConfig, devices: Vec<DeviceDesc>) -> Offer {
    Offer {
        streams: u16::try_from(cfg.streams).unwrap_or(u16::MAX),
        codecs: KNOWN_CODECS,
        max_payload: cfg.max_payload(),
        window_bytes: cfg.window_bytes,
        devices,
    }
}

/// Opens one connection and handshakes on it (over TLS if configured).
fn open(
    addr: SocketAddr,
    cfg: &SessionConfig,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
    offer: &Offer,
    join: Option<([u8; 16], u16)>,
) -> Result<(Sock, Agreed), TransportError> {
    let conn = join.map_or(0, |(_, i)| usize::from(i));
    let stream = TcpStream::connect_timeout(&addr, cfg.connect_timeout).map_err(|e| {
        TransportError::Connect {
            addr,
            source: Arc::new(e),
        }
    })?;
    stream
        .set_nodelay(true)
        .map_err(|e| TransportError::io("setsockopt TCP_NODELAY", e))?;
    let mut side = Side::Client(ClientHandshake::with_protection(
        ClientParams {
            auth: wire_auth(&cfg.auth),
            offer: offer.clone(),
            join,
            nonce: random()?,
        },
        protection(cfg),
    ));
    if let (Some(tls), Some(c)) = (&cfg.tls, tls_config) {
        return tls::client(stream, c, tls, addr, &mut side, conn, cfg);
    }
    let agreed = drive(&mut side, &mut TcpHs::new(&stream), addr, conn, cfg.timeout)?;
    clear_timeouts(&stream)?;
    Ok((Sock::Tcp(stream), agreed))
}

fn clear_timeouts(s: &TcpStream) -> Result<(), TransportError> {
    s.set_read_timeout(None)
        .and_then(|()| s.set_write_timeout(None))
        .map_err(|e| TransportError::io("setsockopt SO_RCVTIMEO", e))
}

impl SendSession {
    /// Connects to a destination: the first connection handshakes (and authenticates) and
    /// declares `devices`; the other `streams - 1` connections join its session.
    pub fn connect(
        addr: SocketAddr,
        cfg: &SessionConfig,
        devices: Vec<DeviceDesc>,
    ) -> Result<SendSession, TransportError> {
        cfg.validate()?;
        check_peer_policy(addr, cfg)?;
        if devices.len() > MAX_DEVICES {
            return Err(TransportError::TooMany {
                what: Limit::Devices,
                got: devices.len() as u64,
                max: MAX_DEVICES as u64,
            });
        }
        let offer = offer(cfg, devices);
        let tls_config = cfg.tls.as_ref().map(tls::client_config).transpose()?;
        let tls_config = tls_config.as_ref();
        let (first, agreed) = open(addr, cfg, tls_config, &offer, None)?;
        let streams = usize::from(agreed.streams).clamp(1, MAX_STREAMS);
        let mut socks = vec![(first, sealing(&agreed, true))];
        for i in 1..streams {
            // `i < streams <= MAX_STREAMS`.
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let (sock, a) = open(
                addr,
                cfg,
                tls_config,
                &offer,
                Some((agreed.session_id, index)),
            )?;
            if a.session_id != agreed.session_id || a.conn_index != index {
                return Err(TransportError::Handshake {
                    peer: addr,
                    conn: i,
                    source: vfmig_wire::handshake::HandshakeError::Malformed {
                        what: "join answered with another session or index",
                    },
                });
            }
            socks.push((sock, sealing(&a, true)));
        }
        Ok(SendSession {
            core: Core::start(socks, agreed, cfg, addr, false)?,
        })
    }

    /// The agreed session parameters.
    pub fn agreed(&self) -> &Agreed {
        &self.core.agreed
    }

    /// The destination's address.
    pub fn peer(&self) -> SocketAddr {
        self.core.peer
    }

    /// The buffer pool registered with the send ring: fill these with device state and hand them
    /// to [`SendSession::send`] (no copy on the way to the socket).
    pub fn pool(&self) -> &BufPool {
        &self.core.pool
    }

    /// Queues a frame. The transport fills `wire_len` and `crc`. Frames of a device must be
    /// handed in sequence order (any interleaving of devices); the payload is at most
    /// `agreed().max_payload` bytes (the smaller of both sides' slot sizes). Blocks while the
    /// queue is full, at most the session timeout ([`TransportError::Timeout`]). The buffer
    /// returns to the pool once the kernel is done with it.
    pub fn send(
        &self,
        header: FrameHeader,
        payload: Option<PoolBuf>,
    ) -> Result<(), TransportError> {
        let p = match payload {
            Some(buf) if !buf.is_empty() => OutPayload::Pool(buf),
            _ => OutPayload::Empty,
        };
        self.core.enqueue(header, p, false)
    }

    /// Like [`SendSession::send`], for a device state frame (`PreCopyData` / `StopCopyData`,
    /// any codec but `Zero`) whose payload ends with the
    /// [`vfmig_wire::HASH_TRAILER_LEN`]-byte XXH3-128 of its raw bytes: the frame carries
    /// [`vfmig_wire::FLAG_HASH_TRAILER`] and its CRC covers the header and the trailer, not the
    /// body (the receiver checks the decoded body against the trailer). Other frames are refused
    /// ([`TransportError::InvalidFrame`]).
    pub fn send_hash_trailer(
        &self,
        header: FrameHeader,
        payload: PoolBuf,
    ) -> Result<(), TransportError> {
        self.core.enqueue(header, OutPayload::Pool(payload), true)
    }

    /// Waits up to `timeout` for a frame from the destination (`SwitchoverAck`,
    /// `DevicePrepared`). An `Abort` from the destination ends the session and comes back as
    /// [`TransportError::PeerAborted`].
    pub fn recv_control(&self, timeout: Duration) -> Result<Option<Frame>, TransportError> {
        self.core.recv(timeout)
    }

    /// Sends an `Abort` on every connection (bounded wait) and ends the session.
    pub fn abort(&self, reason: AbortReason, detail: &str) {
        self.core.abort(reason, detail);
    }

    /// Counters.
    pub fn stats(&self) -> TransportStats {
        self.core.stats()
    }

    /// Flushes every queued frame, closes every connection cleanly (waiting for the destination
    /// to close its side, bounded by the timeout) and returns the final counters.
    pub fn close(self) -> Result<TransportStats, TransportError> {
        self.core.close()
    }
}

/// The destination's listening socket.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    /// Binds a TCP listener.
    pub fn bind(addr: SocketAddr) -> Result<Listener, TransportError> {
        let listener = TcpListener::bind(addr).map_err(|e| TransportError::io("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TransportError::io("set listener non-blocking", e))?;
        Ok(Listener { listener })
    }

    /// The bound address (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Waits (at most `cfg.accept_timeout`) for a source, handshakes with it, then accepts the
    /// other connections of its session (at most `cfg.timeout`). Connections that fail their
    /// handshake or do not join this session are dropped silently; see
    /// [`Listener::accept_reporting`].
    pub fn accept(&self, cfg: &SessionConfig) -> Result<RecvSession, TransportError> {
        self.accept_reporting(cfg, &mut |_, _| {})
    }

    /// Like [`Listener::accept`], calling `on_dropped` with the peer and the cause for every
    /// connection that is dropped: a failed or foreign handshake (port scan, HTTP request,
    /// random bytes, wrong key, other version), a join of another session, a connection beyond
    /// the bound of pending handshakes. None of them ends the wait. Each pending handshake has
    /// its own deadline (`accept::HANDSHAKE_TIMEOUT`, at most `cfg.timeout`), and at most
    /// `accept::MAX_PENDING_HANDSHAKES` are pending at once (the oldest is dropped for a new
    /// one), so neither silent connections nor a flood lock the real source out.
    pub fn accept_reporting(
        &self,
        cfg: &SessionConfig,
        on_dropped: &mut dyn FnMut(SocketAddr, &TransportError),
    ) -> Result<RecvSession, TransportError> {
        cfg.validate()?;
        let tls_config = cfg.tls.as_ref().map(tls::server_config).transpose()?;
        let hs = Arc::new(Handshaker {
            cfg: cfg.clone(),
            tls_config,
        });
        let (socks, agreed, peer) =
            crate::accept::assemble(&self.listener, cfg, hs, |a| sealing(a, false), on_dropped)?;
        Ok(RecvSession {
            core: Core::start(socks, agreed, cfg, peer, true)?,
        })
    }
}

/// Runs the destination's side of one connection's handshake (over TLS if configured).
struct Handshaker {
    cfg: SessionConfig,
    tls_config: Option<Arc<rustls::ServerConfig>>,
}

impl crate::accept::ServerHandshaker for Handshaker {
    fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        session_id: [u8; 16],
        limit: Duration,
    ) -> Result<(Sock, Agreed), TransportError> {
        let cfg = &self.cfg;
        let mut side = Side::Server(ServerHandshake::with_protection(
            ServerParams {
                auth: wire_auth(&cfg.auth),
                limits: Limits {
                    max_streams: u16::try_from(MAX_STREAMS).unwrap_or(u16::MAX),
                    max_devices: MAX_DEVICES,
                    max_payload: cfg.max_payload(),
                    max_window_bytes: cfg.window_bytes,
                },
                session_id,
                nonce: random()?,
                devices: cfg.declared_devices.clone(),
            },
            protection(cfg),
        ));
        if let Some(c) = &self.tls_config {
            return tls::server(stream, c, peer, &mut side, 0, cfg, limit);
        }
        let agreed = drive(&mut side, &mut TcpHs::new(&stream), peer, 0, limit)?;
        clear_timeouts(&stream)?;
        Ok((Sock::Tcp(stream), agreed))
    }
}

/// The destination side of a session.
///
/// Dropping it before the source closed aborts the session (the source gets
/// [`TransportError::PeerAborted`]).
#[derive(Debug)]
pub struct RecvSession {
    core: Core,
}

impl RecvSession {
    /// The agreed session parameters, including the source's devices.
    pub fn agreed(&self) -> &Agreed {
        &self.core.agreed
    }

    /// The source's address.
    pub fn peer(&self) -> SocketAddr {
        self.core.peer
    }

    /// The pool frames are received into (registered with the receive ring). Dropping a
    /// [`Frame`]'s payload returns its buffer.
    pub fn pool(&self) -> &BufPool {
        &self.core.pool
    }

    /// The next frame: CRC-verified, each device's sequenced frames in sequence order, other
    /// frames as they come. After the source closed cleanly and every frame was delivered:
    /// [`TransportError::Closed`] (a transport-level fact: whether every device stream is complete
    /// is for the caller to check, from `EndOfDevice`). Waits at most `timeout`
    /// ([`TransportError::Timeout`]). After a failure, frames not yet taken are dropped and the
    /// failure is returned.
    pub fn recv(&self, timeout: Duration) -> Result<Frame, TransportError> {
        self.core.recv(timeout)?.ok_or(TransportError::Timeout {
            after: timeout,
            what: "a frame",
        })
    }

    /// Sends a control frame to the source (`SwitchoverAck`, `DevicePrepared`).
    pub fn send_control(&self, header: FrameHeader, payload: &[u8]) -> Result<(), TransportError> {
        let p = if payload.is_empty() {
            OutPayload::Empty
        } else {
            OutPayload::Heap(payload.to_vec())
        };
        self.core.enqueue(header, p, false)
    }

    /// Sends an `Abort` on every connection (bounded wait) and ends the session.
    pub fn abort(&self, reason: AbortReason, detail: &str) {
        self.core.abort(reason, detail);
    }

    /// Counters.
    pub fn stats(&self) -> TransportStats {
        self.core.stats()
    }

    /// Flushes queued control frames and closes every connection cleanly.
    pub fn close(self) -> Result<TransportStats, TransportError> {
        self.core.close()
    }
}
