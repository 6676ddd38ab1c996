//! The one module of the CLI with `unsafe`: receiving file descriptors over the control socket
//! (`SCM_RIGHTS`), and the peer's credentials (`SO_PEERCRED`).
//!
//! `nix` does the system calls safely and hands back the received descriptors as raw numbers;
//! the only unsafe operation is taking ownership of each one, exactly once, as an [`OwnedFd`].

#![allow(unsafe_code)]

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{
    getsockopt, recvmsg, sockopt::PeerCredentials, ControlMessageOwned, MsgFlags,
};

/// At most this many descriptors are accepted with one message; more are refused (and closed).
pub const MAX_FDS_PER_MESSAGE: usize = 4;
/// The kernel's own limit per message (`SCM_MAX_FD`): room for all of them, so that the kernel
/// never truncates the control message and every received descriptor is owned and closed here.
const SCM_MAX_FD: usize = 253;

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (0: the peer closed the connection).
    pub len: usize,
    /// Descriptors that came with them, owned now.
    pub fds: Vec<OwnedFd>,
    /// More descriptors came than [`MAX_FDS_PER_MESSAGE`] (or the kernel truncated them): the
    /// caller refuses the message; dropping `fds` closes every one that arrived.
    pub truncated: bool,
}

/// Reads what is available from `sock` into `buf`, with any descriptors sent alongside
/// (`MSG_CMSG_CLOEXEC`: none leaks into a child process).
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let len = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    // The control messages borrow `space`; collect the numbers first.
    let raws: Vec<RawFd> = msg
        .cmsgs()
        .map_err(io::Error::from)?
        .filter_map(|c| match c {
            ControlMessageOwned::ScmRights(v) => Some(v),
            _ => None,
        })
        .flatten()
        .collect();
    for raw in raws {
        // SAFETY: `raw` was installed in this process by this `recvmsg` (SCM_RIGHTS) and is
        // owned by nothing else: nix only decodes the control message, and each number appears
        // once in it, so exactly one `OwnedFd` takes it and closes it when dropped.
        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    Ok(Received {
        len,
        truncated: truncated || fds.len() > MAX_FDS_PER_MESSAGE,
        fds,
    })
}

/// The uid of the process at the other end of `sock` (`SO_PEERCRED`, taken at connect).
pub fn peer_uid(sock: &UnixStream) -> io::Result<u32> {
    let cred = getsockopt(&sock.as_fd(), PeerCredentials).map_err(io::Error::from)?;
    Ok(cred.uid())
}
