//! TLS 1.3 connections (rustls with the `ring` provider, certificates from PEM files).
//!
//! Encryption needs a userspace copy of every byte anyway, so TLS connections do not take the
//! io_uring zero-copy path. Each TLS connection runs blocking rustls I/O on two threads of its
//! own (network -> engine, engine -> network) and exchanges plaintext with the session engine
//! through a local Unix socket pair. The engine, and therefore the API, framing, reorder window,
//! keepalive and liveness, are exactly those of plain TCP. Cost: one extra copy through the socket
//! pair on top of the copy encryption makes, and two threads per connection.
//!
//! The vfmig handshake (and PSK, if configured) runs inside TLS, after the certificate checks.
//! A TLS failure after the handshake (bad record, alert) closes the socket pair; the engine
//! reports it as [`TransportError::PeerClosed`] on that connection.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConnection;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use vfmig_wire::handshake::Agreed;

use crate::config::{SessionConfig, TlsConfig};
use crate::error::TransportError;
use crate::handshake_io::{drive, handshake_io_err, HsStream, Side};
use crate::ring::Sock;

const CHUNK: usize = 64 << 10;

fn cfg_err(
    what: &'static str,
    path: &std::path::Path,
    reason: impl std::error::Error + Send + Sync + 'static,
) -> TransportError {
    TransportError::TlsConfig {
        what,
        path: path.display().to_string(),
        reason: Arc::new(reason),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no {0} found in the file")]
struct Missing(&'static str);

fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let f = File::open(path).map_err(|e| cfg_err("certificate", path, e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg_err("certificate", path, e))?;
    if certs.is_empty() {
        return Err(cfg_err("certificate", path, Missing("PEM certificate")));
    }
    Ok(certs)
}

fn load_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let f = File::open(path).map_err(|e| cfg_err("private key", path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| cfg_err("private key", path, e))?
        .ok_or_else(|| cfg_err("private key", path, Missing("PEM private key")))
}

fn roots(path: &std::path::Path) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| cfg_err("CA certificate", path, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The source's rustls configuration: TLS 1.3 only, the destination verified against `ca`, our
/// certificate presented if the destination asks.
pub(crate) fn client_config(t: &TlsConfig) -> Result<Arc<ClientConfig>, TransportError> {
    let c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err("TLS versions", &t.ca, e))?
        .with_root_certificates(roots(&t.ca)?)
        .with_client_auth_cert(load_certs(&t.cert)?, load_key(&t.key)?)
        .map_err(|e| cfg_err("certificate and key", &t.cert, e))?;
    Ok(Arc::new(c))
}

/// The destination's rustls configuration: TLS 1.3 only, our certificate, and the source's
/// certificate verified against `ca` (required if `require_client_cert`).
pub(crate) fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>, TransportError> {
    let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&t.ca)?), provider());
    if !t.require_client_cert {
        v = v.allow_unauthenticated();
    }
    let verifier = v
        .build()
        .map_err(|e| cfg_err("client verifier", &t.ca, e))?;
    let c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err("TLS versions", &t.ca, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&t.cert)?, load_key(&t.key)?)
        .map_err(|e| cfg_err("certificate and key", &t.cert, e))?;
    Ok(Arc::new(c))
}

/// Maps an I/O error of the TLS handshake: rustls errors come wrapped in `io::Error`.
fn tls_io_err(e: io::Error, peer: SocketAddr, conn: usize, after: Duration) -> TransportError {
    if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return TransportError::Tls {
            peer,
            source: r.clone(),
        };
    }
    handshake_io_err(e, conn, after, ("the TLS handshake", "TLS handshake I/O"))
}

/// The vfmig handshake over a TLS connection; plaintext read past its end is kept in `buf`.
struct TlsHs<'a> {
    conn: &'a mut Connection,
    sock: &'a mut TcpStream,
    buf: Vec<u8>,
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

impl HsStream for TlsHs<'_> {
    fn send_all(&mut self, b: &[u8], deadline: Instant) -> io::Result<()> {
        self.sock.set_write_timeout(Some(left(deadline)?))?;
        self.conn.writer().write_all(b)?;
        while self.conn.wants_write() {
            match self.conn.write_tls(self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn peek_some(&mut self, deadline: Instant) -> io::Result<&[u8]> {
        let mut tmp = vec![0u8; CHUNK];
        while self.buf.is_empty() {
            match self.conn.reader().read(&mut tmp) {
                // close_notify: the peer closed.
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.set_read_timeout(Some(left(deadline)?))?;
                    match self.conn.read_tls(self.sock) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    self.conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(&self.buf)
    }

    fn consume(&mut self, n: usize) -> io::Result<()> {
        self.buf.drain(..n.min(self.buf.len()));
        Ok(())
    }
}

fn establish(
    mut sock: TcpStream,
    mut conn: Connection,
    peer: SocketAddr,
    side: &mut Side,
    index: usize,
    cfg: &SessionConfig,
    limit: Duration,
) -> Result<(Sock, Agreed), TransportError> {
    let deadline = Instant::now() + limit;
    sock.set_read_timeout(Some(limit))
        .and_then(|()| sock.set_write_timeout(Some(limit)))
        .map_err(|e| TransportError::io("setsockopt SO_RCVTIMEO", e))?;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(TransportError::Timeout {
                after: limit,
                what: "the TLS handshake",
            });
        }
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(tls_io_err(e, peer, index, limit)),
        }
    }
    let mut hs = TlsHs {
        conn: &mut conn,
        sock: &mut sock,
        buf: Vec::new(),
    };
    let agreed = drive(
        side,
        &mut hs,
        peer,
        index,
        deadline.saturating_duration_since(Instant::now()),
    )?;
    let leftover = std::mem::take(&mut hs.buf);
    let (engine_end, pump_end) =
        UnixStream::pair().map_err(|e| TransportError::io("socketpair", e))?;
    spawn_pumps(conn, sock, pump_end, leftover, cfg.timeout)?;
    Ok((Sock::Unix(engine_end), agreed))
}

/// Source side: TLS handshake (destination verified against the CA), then the vfmig handshake.
pub(crate) fn client(
    stream: TcpStream,
    config: &Arc<ClientConfig>,
    tls: &TlsConfig,
    peer: SocketAddr,
    side: &mut Side,
    conn: usize,
    cfg: &SessionConfig,
) -> Result<(Sock, Agreed), TransportError> {
    let name = match &tls.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|e| TransportError::TlsConfig {
            what: "server name",
            path: n.clone(),
            reason: Arc::new(e),
        })?,
        None => ServerName::IpAddress(peer.ip().into()),
    };
    let c = ClientConnection::new(Arc::clone(config), name)
        .map_err(|source| TransportError::Tls { peer, source })?;
    establish(stream, c.into(), peer, side, conn, cfg, cfg.timeout)
}

/// Destination side: TLS handshake (source's certificate checked if required), then the vfmig
/// handshake.
pub(crate) fn server(
    stream: TcpStream,
    config: &Arc<ServerConfig>,
    peer: SocketAddr,
    side: &mut Side,
    conn: usize,
    cfg: &SessionConfig,
    limit: Duration,
) -> Result<(Sock, Agreed), TransportError> {
    let c = ServerConnection::new(Arc::clone(config))
        .map_err(|source| TransportError::Tls { peer, source })?;
    establish(stream, c.into(), peer, side, conn, cfg, limit)
}

/// One TLS connection shared by its two pump threads. Lock order: `tcp_w`, then `conn`.
struct Pump {
    conn: Mutex<Connection>,
    tcp_w: Mutex<TcpStream>,
    engine_gone: AtomicBool,
}

impl Pump {
    /// Encrypts whatever rustls has queued and writes it, holding the write lock so that records
    /// go out in the order rustls made them.
    fn flush_tls(&self) -> io::Result<()> {
        let mut tcp = self.tcp_w.lock().map_err(|_| io::ErrorKind::Other)?;
        let mut out = Vec::new();
        {
            let mut c = self.conn.lock().map_err(|_| io::ErrorKind::Other)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        tcp.write_all(&out)
    }
}

fn spawn_pumps(
    conn: Connection,
    sock: TcpStream,
    pump_end: UnixStream,
    leftover: Vec<u8>,
    timeout: Duration,
) -> Result<(), TransportError> {
    let tcp_r = sock
        .try_clone()
        .map_err(|e| TransportError::io("dup TLS socket", e))?;
    let unix_w = pump_end
        .try_clone()
        .map_err(|e| TransportError::io("dup socket pair", e))?;
    // The reader wakes up every `timeout` to see whether the engine went away.
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .map_err(|e| TransportError::io("setsockopt SO_RCVTIMEO", e))?;
    let pump = Arc::new(Pump {
        conn: Mutex::new(conn),
        tcp_w: Mutex::new(sock),
        engine_gone: AtomicBool::new(false),
    });
    let p = Arc::clone(&pump);
    std::thread::Builder::new()
        .name("vfmig-tls-rx".into())
        .spawn(move || {
            let _ = net_to_engine(&p, tcp_r, unix_w, leftover);
        })
        .map_err(|e| TransportError::io("spawn TLS thread", e))?;
    std::thread::Builder::new()
        .name("vfmig-tls-tx".into())
        .spawn(move || {
            let _ = engine_to_net(&pump, pump_end);
        })
        .map_err(|e| TransportError::io("spawn TLS thread", e))?;
    Ok(())
}

/// Decrypts records from the network and writes the plaintext to the engine.
fn net_to_engine(
    p: &Pump,
    mut tcp: TcpStream,
    mut unix: UnixStream,
    leftover: Vec<u8>,
) -> io::Result<()> {
    let result = (|| -> io::Result<()> {
        unix.write_all(&leftover)?;
        let mut buf = vec![0u8; CHUNK];
        let mut plain = vec![0u8; CHUNK];
        let (mut start, mut end) = (0usize, 0usize);
        loop {
            // Plaintext rustls already holds (e.g. read together with the handshake's end).
            let mut eof = false;
            loop {
                let n = {
                    let mut c = p.conn.lock().map_err(|_| io::ErrorKind::Other)?;
                    match c.reader().read(&mut plain) {
                        Ok(0) => {
                            eof = true;
                            0
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Err(e),
                    }
                };
                if n == 0 {
                    break;
                }
                unix.write_all(&plain[..n])?;
            }
            if eof {
                // close_notify: the peer finished cleanly.
                return Ok(());
            }
            if start == end {
                start = 0;
                end = match tcp.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        if p.engine_gone.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            }
            {
                // One read_tls at a time: rustls bounds its plaintext buffer, which is drained
                // to the engine at the top of the loop.
                let mut c = p.conn.lock().map_err(|_| io::ErrorKind::Other)?;
                let mut rd = &buf[start..end];
                start += c.read_tls(&mut rd)?;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            // Answer what the records asked for (key updates, alerts), if anything.
            let wants = p.conn.lock().is_ok_and(|c| c.wants_write());
            if wants {
                p.flush_tls()?;
            }
        }
    })();
    // Clean end: the engine sees EOF at a frame boundary or mid-frame, as the peer left it.
    let how = if result.is_ok() {
        Shutdown::Write
    } else {
        Shutdown::Both
    };
    let _ = unix.shutdown(how);
    result
}

/// Encrypts what the engine writes and sends it; sends close_notify when the engine closes.
fn engine_to_net(p: &Pump, mut unix: UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let result = (|| -> io::Result<()> {
        loop {
            let n = match unix.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut tcp = p.tcp_w.lock().map_err(|_| io::ErrorKind::Other)?;
            let mut out = Vec::with_capacity(n + 1024);
            {
                let mut c = p.conn.lock().map_err(|_| io::ErrorKind::Other)?;
                if n == 0 {
                    c.send_close_notify();
                } else {
                    c.writer().write_all(&buf[..n])?;
                }
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
            }
            tcp.write_all(&out)?;
            if n == 0 {
                let _ = tcp.shutdown(Shutdown::Write);
                return Ok(());
            }
        }
    })();
    p.engine_gone.store(true, Ordering::Release);
    if result.is_err() {
        let _ = unix.shutdown(Shutdown::Both);
        if let Ok(tcp) = p.tcp_w.lock() {
            let _ = tcp.shutdown(Shutdown::Both);
        }
    }
    result
}
