//! Drives the sans-IO handshake of `vfmig_wire::handshake` over a blocking stream, bounded by a
//! deadline. Nothing after the last handshake message is consumed: on TCP the driver peeks and
//! then consumes exactly what the handshake took, so the first frame bytes stay in the socket for
//! the io_uring engine; on TLS the unread plaintext is handed over as `leftover`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use vfmig_wire::handshake::{
    Agreed, ClientHandshake, Handshake, HandshakeError, RefuseCode, ServerHandshake,
};

use crate::error::{FramePart, TransportError};

/// Largest chunk read per step (handshake messages are a few KiB at most).
const CHUNK: usize = 16 << 10;

/// A blocking byte stream the handshake can run over.
pub(crate) trait HsStream {
    /// Writes all of `b` before the deadline.
    fn send_all(&mut self, b: &[u8], deadline: Instant) -> io::Result<()>;
    /// Returns unread bytes without consuming them, waiting for at least one until the deadline.
    /// An empty slice means the peer closed.
    fn peek_some(&mut self, deadline: Instant) -> io::Result<&[u8]>;
    /// Consumes `n` bytes previously returned by `peek_some`.
    fn consume(&mut self, n: usize) -> io::Result<()>;
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::from(io::ErrorKind::TimedOut))
    } else {
        Ok(left)
    }
}

/// Plain TCP: `MSG_PEEK`, then read exactly what the handshake consumed.
#[derive(Debug)]
pub(crate) struct TcpHs<'a> {
    pub(crate) stream: &'a TcpStream,
    buf: Vec<u8>,
}

impl<'a> TcpHs<'a> {
    pub(crate) fn new(stream: &'a TcpStream) -> TcpHs<'a> {
        TcpHs {
            stream,
            buf: vec![0; CHUNK],
        }
    }
}

impl HsStream for TcpHs<'_> {
    fn send_all(&mut self, b: &[u8], deadline: Instant) -> io::Result<()> {
        self.stream.set_write_timeout(Some(remaining(deadline)?))?;
        let mut s = self.stream;
        s.write_all(b)
    }

    fn peek_some(&mut self, deadline: Instant) -> io::Result<&[u8]> {
        loop {
            self.stream.set_read_timeout(Some(remaining(deadline)?))?;
            match self.stream.peek(&mut self.buf) {
                Ok(n) => return Ok(&self.buf[..n]),
                // A signal landed on this thread: retry within the deadline.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) -> io::Result<()> {
        let mut s = self.stream;
        s.read_exact(&mut self.buf[..n])
    }
}

/// Which side of the handshake.
#[derive(Debug)]
pub(crate) enum Side {
    Client(ClientHandshake),
    Server(ServerHandshake),
}

impl Side {
    fn hs(&mut self) -> &mut dyn Handshake {
        match self {
            Side::Client(c) => c,
            Side::Server(s) => s,
        }
    }

    fn error(&self) -> Option<HandshakeError> {
        match self {
            Side::Client(c) => c.error().cloned(),
            Side::Server(s) => s.error().cloned(),
        }
    }
}

/// Maps a handshake failure to the transport error an operator should see.
pub(crate) fn map_handshake_error(
    e: HandshakeError,
    peer: SocketAddr,
    conn: usize,
) -> TransportError {
    match e {
        HandshakeError::AuthenticationFailed
        | HandshakeError::Refused {
            code: RefuseCode::AuthenticationFailed,
            ..
        } => TransportError::AuthenticationFailed { peer },
        source => TransportError::Handshake { peer, conn, source },
    }
}

fn io_err(e: io::Error, conn: usize, after: Duration) -> TransportError {
    handshake_io_err(e, conn, after, ("the handshake", "handshake I/O"))
}

/// Maps an I/O error of a handshake (`names`: what timed out, what failed otherwise): a
/// timeout, the peer closing, or the error itself.
pub(crate) fn handshake_io_err(
    e: io::Error,
    conn: usize,
    after: Duration,
    names: (&'static str, &'static str),
) -> TransportError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
            after,
            what: names.0,
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => TransportError::PeerClosed {
            conn,
            during: FramePart::Handshake,
        },
        _ => TransportError::io(names.1, e),
    }
}

/// Runs the handshake to completion or failure, within `limit`.
pub(crate) fn drive(
    side: &mut Side,
    io: &mut dyn HsStream,
    peer: SocketAddr,
    conn: usize,
    limit: Duration,
) -> Result<Agreed, TransportError> {
    let deadline = Instant::now() + limit;
    loop {
        while let Some(out) = side.hs().take_output() {
            io.send_all(&out, deadline)
                .map_err(|e| io_err(e, conn, limit))?;
        }
        if let Some(a) = side.hs().agreed() {
            return Ok(a.clone());
        }
        if let Some(e) = side.error() {
            return Err(map_handshake_error(e, peer, conn));
        }
        let input = io.peek_some(deadline).map_err(|e| io_err(e, conn, limit))?;
        if input.is_empty() {
            return Err(TransportError::PeerClosed {
                conn,
                during: FramePart::Handshake,
            });
        }
        match side.hs().feed(input) {
            Ok(0) if side.hs().agreed().is_none() && !side.hs().is_failed() => {
                // `feed` buffers partial messages, so this cannot happen; never spin on it.
                return Err(TransportError::Handshake {
                    peer,
                    conn,
                    source: HandshakeError::Malformed {
                        what: "handshake consumed no input",
                    },
                });
            }
            Ok(n) => io.consume(n).map_err(|e| io_err(e, conn, limit))?,
            Err(e) => {
                // Tell the peer why (a Refuse), best effort, then fail.
                while let Some(out) = side.hs().take_output() {
                    if io.send_all(&out, deadline).is_err() {
                        break;
                    }
                }
                return Err(map_handshake_error(e, peer, conn));
            }
        }
    }
}
