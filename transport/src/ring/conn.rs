//! One connection of the session as the engine sees it: its socket, the AEAD state of a sealed
//! connection, the frames queued for it, and where its receive side stands.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vfmig_wire::seal::{FrameOpener, FrameSealer};
use vfmig_wire::FrameHeader;

use super::frame::{Head, OutFrame};

/// The AEAD state of a connection whose frames are sealed (docs/PROTOCOL.md, section 4.2): the
/// sealer counts the frames we send on it, the opener the frames we receive.
#[derive(Debug)]
pub(crate) struct Sealing {
    pub(crate) sealer: FrameSealer,
    pub(crate) opener: FrameOpener,
}

/// A connected socket the engine reads and writes: TCP, or for TLS the local end of the socket
/// pair that the TLS threads pump.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    pub(super) fn shutdown(&self, how: Shutdown) {
        // Errors (already shut down, not connected) change nothing for us.
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
    }
}

/// Receive state of one connection.
#[derive(Debug)]
pub(super) enum Rx {
    /// Nothing posted; post a header read when allowed.
    Idle,
    /// A read (header or payload) is in flight; its op owns the buffer.
    Busy,
    /// Header read, payload waits for window room or a free buffer.
    Waiting { hdr: FrameHeader, raw: Head },
    /// The peer closed at a frame boundary.
    Eof,
}

/// A connection: its socket, its send queue and its receive state.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) sock: Sock,
    pub(super) queue: VecDeque<OutFrame>,
    pub(super) queued_bytes: usize,
    pub(super) rx: Rx,
    pub(super) wr_shut: bool,
    /// `Some` when the connection's frames are sealed.
    pub(super) sealing: Option<Sealing>,
}
