//! Typed transport errors. Every variant carries the facts a caller or operator needs (which
//! connection, which frame, which operation); none is a formatted string.
//!
//! Errors are `Clone` (OS errors are shared behind an `Arc`) because one failure of the session is
//! reported to every caller that touches it afterwards: the sending thread, the control receiver
//! and the final `close`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use vfmig_wire::{AbortReason, WireError};

use crate::pool::PoolError;

/// Where in a frame (or between frames) a connection was when something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramePart {
    /// During the handshake.
    Handshake,
    /// Reading or writing the 40-byte frame header.
    Header,
    /// Reading or writing the payload.
    Payload,
    /// At a frame boundary.
    Between,
}

impl std::fmt::Display for FramePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FramePart::Handshake => "handshake",
            FramePart::Header => "frame header",
            FramePart::Payload => "frame payload",
            FramePart::Between => "between frames",
        })
    }
}

/// Something that is limited, for [`TransportError::TooMany`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Bytes of one frame payload.
    Payload,
    /// Devices in a session.
    Devices,
    /// Connections in a session.
    Streams,
    /// Out-of-order bytes held in the reorder window.
    Window,
    /// Handshakes pending at once on a listener.
    PendingHandshakes,
    /// Bytes of an abort detail.
    AbortDetail,
}

/// Transport failures.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The TCP connection could not be established.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The handshake failed (protocol violation, version or capability mismatch).
    #[error("handshake with {peer} on connection {conn} failed: {source}")]
    Handshake {
        /// Peer address.
        peer: SocketAddr,
        /// Connection index.
        conn: usize,
        /// What the protocol engine reported.
        #[source]
        source: vfmig_wire::handshake::HandshakeError,
    },
    /// The peer could not prove it holds the pre-shared key (or we could not prove it to the peer).
    #[error("authentication with {peer} failed")]
    AuthenticationFailed {
        /// Peer address.
        peer: SocketAddr,
    },
    /// A peer outside loopback without PSK or TLS, and `insecure` is not set.
    #[error("refusing unauthenticated, unencrypted connection with non-loopback peer {peer} (set a PSK, TLS, or insecure)")]
    InsecureRefused {
        /// Peer address.
        peer: SocketAddr,
    },
    /// TLS setup or a TLS record failed.
    #[error("TLS with {peer} failed: {source}")]
    Tls {
        /// Peer address.
        peer: SocketAddr,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// TLS configuration (certificate files, keys) is unusable.
    #[error("TLS configuration: {what} ({path}): {reason}")]
    TlsConfig {
        /// What was being loaded.
        what: &'static str,
        /// File path, if any.
        path: String,
        /// Why it failed.
        reason: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The peer closed a connection.
    #[error("peer closed connection {conn} during {during}")]
    PeerClosed {
        /// Connection index.
        conn: usize,
        /// Where the stream was.
        during: FramePart,
    },
    /// The session ended cleanly: the peer closed every connection at a frame boundary and every
    /// frame has been delivered.
    #[error("session closed")]
    Closed,
    /// Nothing happened within the allowed time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The time allowed.
        after: Duration,
        /// What we were waiting for.
        what: &'static str,
    },
    /// A frame failed validation (bad header, checksum mismatch).
    #[error("corrupt frame on connection {conn} (device {device}, seq {seq}): {source}")]
    Corrupt {
        /// Connection index.
        conn: usize,
        /// Device index from the header (as received; may itself be corrupt).
        device: u16,
        /// Sequence number from the header (as received).
        seq: u64,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// A connection completed its handshake but does not belong to the session being assembled
    /// (a join of another or an unknown session, a taken index, a second new session).
    #[error("connection from {peer} (index {conn_index}) does not belong to the session being assembled")]
    NotInSession {
        /// Who connected.
        peer: SocketAddr,
        /// The connection index it asked for.
        conn_index: u16,
    },
    /// A sealed frame failed authentication (altered, injected, replayed, reordered or moved
    /// between connections by someone on the path, or a peer with other keys). Nothing of it
    /// was delivered.
    #[error("frame on connection {conn} (device {device}, seq {seq} as received) failed authentication: {source}")]
    Unauthentic {
        /// Connection index.
        conn: usize,
        /// Device index from the header (as received; unauthenticated).
        device: u16,
        /// Sequence number from the header (as received; unauthenticated).
        seq: u64,
        /// What failed.
        #[source]
        source: vfmig_wire::seal::SealError,
    },
    /// A frame could not be sealed for sending.
    #[error("cannot seal a frame on connection {conn}: {source}")]
    Sealing {
        /// Connection index.
        conn: usize,
        /// What failed.
        #[source]
        source: vfmig_wire::seal::SealError,
    },
    /// A sequenced frame arrived that can never be delivered: a duplicate or one from the past.
    #[error("device {device}: frame seq {seq} arrived but seq {expected} is next (duplicate or reordered by the sender)")]
    OutOfSequence {
        /// Device index.
        device: u16,
        /// Sequence received.
        seq: u64,
        /// Sequence expected next.
        expected: u64,
    },
    /// A frame names a device the session did not agree on.
    #[error("frame names device {device}, session has {devices}")]
    UnknownDevice {
        /// Device index received.
        device: u16,
        /// Devices agreed.
        devices: usize,
    },
    /// The next needed frame of a device did not arrive while later ones waited in the full
    /// reorder window (a sender that does not submit in sequence order, or a corrupt sequence).
    #[error("device {device}: seq {expected} did not arrive within {waited:?} while the reorder window was full")]
    ReorderStall {
        /// Device index.
        device: u16,
        /// Sequence needed.
        expected: u64,
        /// How long we waited.
        waited: Duration,
    },
    /// The peer closed every connection while a device still waited for a frame.
    #[error("peer closed the session while device {device} still waited for seq {expected}")]
    IncompleteStream {
        /// Device index.
        device: u16,
        /// Sequence number it waited for.
        expected: u64,
    },
    /// Nothing (not even a keepalive) arrived on a connection for too long.
    #[error("peer silent on connection {conn} for {after:?}")]
    PeerSilent {
        /// Connection index.
        conn: usize,
        /// The liveness timeout.
        after: Duration,
    },
    /// The peer aborted the session.
    #[error("peer aborted the session: {reason}, {detail:?}")]
    PeerAborted {
        /// The reason from the abort frame.
        reason: AbortReason,
        /// Detail text (lossy UTF-8, bounded).
        detail: String,
    },
    /// We aborted the session (see [`crate::SendSession::abort`]).
    #[error("session aborted locally: {reason}")]
    Aborted {
        /// The reason we sent.
        reason: AbortReason,
    },
    /// An OS call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A completion reported fewer bytes than submitted (MSG_WAITALL should prevent this).
    #[error("{op} on connection {conn} moved {done} of {wanted} bytes")]
    Short {
        /// The operation.
        op: &'static str,
        /// Connection index.
        conn: usize,
        /// Bytes moved.
        done: usize,
        /// Bytes asked for.
        wanted: usize,
    },
    /// A count or size above its limit.
    #[error("{what:?}: {got} exceeds the limit of {max}")]
    TooMany {
        /// What is limited.
        what: Limit,
        /// The value seen or asked for.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// A frame handed to `send` is not valid (a caller bug).
    #[error("invalid outgoing frame: {source}")]
    InvalidFrame {
        /// Why.
        #[source]
        source: WireError,
    },
    /// The session was shut down by this side.
    #[error("session cancelled")]
    Cancelled,
    /// The buffer pool failed.
    #[error("buffer pool: {0}")]
    Pool(#[source] Arc<PoolError>),
    /// Bad configuration.
    #[error("bad configuration: {what} = {value}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

impl TransportError {
    #[cold]
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> TransportError {
        TransportError::Io {
            op,
            source: Arc::new(source),
        }
    }
}

impl From<PoolError> for TransportError {
    #[cold]
    fn from(e: PoolError) -> Self {
        TransportError::Pool(Arc::new(e))
    }
}
