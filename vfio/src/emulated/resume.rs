//! The resuming side of a data fd ([`ResumeStream`]): feeding the parser what a write or the
//! pipe gives, within the resume capacity, and validating the stream at RESUMING -> STOP.

use std::io;

use crate::state::DeviceState;

use super::device::EmulatedDevice;
use super::format::{self, StreamError};
use super::model::{Core, Stream};
use super::{errno, lock, pipe};

/// The resuming side of one data fd; locked by the FUSE session thread on writes (or by the
/// pipe's consumer thread), so it is not behind the device lock (no lock is held across `open()`
/// of a data fd).
#[derive(Debug)]
pub(super) struct ResumeStream {
    pub(super) id: u64,
    pub(super) parser: format::Parser,
    pub(super) capacity: u64,
    pub(super) active: bool,
    /// Memory-speed data fd: the device's end of the pipe.
    pub(super) mem: Option<pipe::PipeIn>,
    /// Read buffer for `mem`.
    pub(super) buf: Vec<u8>,
    /// Memory-speed data fd: bytes that arrived after END or past `capacity` (a FUSE write of
    /// them fails with ENOMEM; a pipe cannot fail them, so the stream is refused at the end).
    pub(super) overflow: u64,
}

impl ResumeStream {
    /// Feeds what a write gives: the bytes taken, or the errno a FUSE write fails with.
    pub(super) fn accept(&mut self, data: &[u8]) -> Result<usize, i32> {
        if !self.active {
            return Err(libc::ENODEV);
        }
        let room = self.capacity.saturating_sub(self.parser.bytes());
        if room == 0 {
            return Err(libc::ENOMEM);
        }
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let used = self.parser.feed(&data[..take]);
        if used == 0 && take > 0 {
            // Everything after END is refused: the state is complete.
            return Err(libc::ENOMEM);
        }
        Ok(used)
    }

    /// Feeds all of `data` (pipe): what [`accept`](Self::accept) refuses counts as overflow.
    fn accept_all(&mut self, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            match self.accept(&data[at..]) {
                Ok(n) if n > 0 => at += n,
                _ => {
                    self.overflow += (data.len() - at) as u64;
                    return;
                }
            }
        }
    }

    /// Memory-speed data fd: feeds what the pipe holds now, at most `max` bytes (`None`: all it
    /// held when called). False when nothing more can come (the caller closed its end) or the
    /// pipe failed.
    pub(super) fn drain_pipe(&mut self, max: Option<u64>) -> bool {
        let Some(mut p) = self.mem.take() else {
            return false;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let ok = p.drain(&mut buf, max, |d| self.accept_all(d)).is_ok();
        let more = ok && !p.eof;
        self.buf = buf;
        self.mem = Some(p);
        more
    }

    /// Ends the stream: writes fail with ENODEV (FUSE) or EPIPE once the consumer thread ends
    /// (pipe).
    pub(super) fn deactivate(&mut self) {
        self.active = false;
        if let Some(p) = &self.mem {
            p.stop();
        }
    }
}

impl EmulatedDevice {
    pub(super) fn finish_resume(&self, c: &mut Core) -> io::Result<()> {
        let Some(Stream::Resume(rs)) = c.stream.take() else {
            return Ok(());
        };
        let refused = c.cfg.faults.refuse_resume;
        let result = {
            let mut r = lock(&rs);
            // A pipe may still hold bytes written before this SET: take them first.
            if r.mem.is_some() {
                r.drain_pipe(None);
            }
            // Bytes a FUSE fd would have refused at write time are the first failure.
            let result = match r.overflow {
                0 => r.parser.finish(),
                bytes => Err(StreamError::Overflow {
                    bytes,
                    capacity: r.capacity,
                }),
            };
            // Writes end with the stream, unless the device stays RESUMING with it (quirk).
            if !((result.is_err() || refused) && c.cfg.quirks.refusal_stays_resuming) {
                r.deactivate();
            }
            result
        };
        match result {
            Ok(digest) if !refused => {
                c.imported = Some(digest);
                c.last_resume_error = None;
                Ok(())
            }
            other => {
                c.last_resume_error = other.err();
                if c.cfg.quirks.refusal_stays_resuming {
                    // mtty: still RESUMING, the same (refused) stream; only a reset leaves.
                    c.stream = Some(Stream::Resume(rs));
                } else {
                    c.state = DeviceState::Error;
                }
                Err(errno(libc::EINVAL))
            }
        }
    }
}
