//! The destination side of a `file` device passed as an fd over the control socket: the
//! client's open file *is* where the state goes.
//!
//! Unlike `file:PATH` ([`crate::file_device::FileSink`]) there is no path to rename onto, so the
//! stream is written straight into the file: STOP -> RESUMING truncates it and hands out a
//! duplicate of the fd (written from offset 0); RESUMING -> STOP, issued only after the whole
//! stream verified, fsyncs it. As with `file:PATH`, the state counts only while the device stays
//! in STOP: a reset, a failed RESUMING -> STOP or a walk from STOP back toward RUNNING (how a
//! failed migration leaves its destination devices) truncates the file to nothing, so a failed
//! migration never leaves a partial state behind for the client.

use std::fs::File;
use std::io::{self, Seek as _};
use std::os::fd::{AsRawFd, OwnedFd};

use vfmig_vfio::{DeviceError, DeviceState, MigrationDevice};

use crate::file_device::{check_arc, stream_sink};

/// A regular file the client opened for writing, as a destination device.
#[derive(Debug)]
pub struct FdSink {
    name: String,
    file: File,
    state: DeviceState,
}

/// Why an fd cannot be a destination `file` device.
#[derive(Debug, thiserror::Error)]
pub enum FdSinkError {
    /// `fstat` failed.
    #[error("cannot inspect the fd: {0}")]
    Stat(#[source] io::Error),
    /// Not a regular file (a pipe or socket cannot be truncated when a migration fails).
    #[error("the fd is not a regular file")]
    NotRegular,
    /// Opened read-only: the state could not be written.
    #[error("the fd is open read-only; the destination needs O_RDWR or O_WRONLY")]
    ReadOnly,
}

impl FdSink {
    /// Adopts `fd` (a regular file open for writing). `name` is used in messages.
    pub fn new(fd: OwnedFd, name: String) -> Result<FdSink, FdSinkError> {
        let file = File::from(fd);
        let meta = file.metadata().map_err(FdSinkError::Stat)?;
        if !meta.file_type().is_file() {
            return Err(FdSinkError::NotRegular);
        }
        let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| FdSinkError::Stat(e.into()))?;
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(FdSinkError::ReadOnly);
        }
        Ok(FdSink {
            name,
            file,
            state: DeviceState::Running,
        })
    }

    fn empty(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(io::SeekFrom::Start(0))?;
        Ok(())
    }
}

impl MigrationDevice for FdSink {
    stream_sink!();

    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        check_arc(self.state, next)?;
        let out = match (self.state, next) {
            (DeviceState::Stop, DeviceState::Resuming) => {
                self.empty()?;
                Some(OwnedFd::from(self.file.try_clone()?))
            }
            (DeviceState::Resuming, DeviceState::Stop) => {
                if let Err(e) = self.file.sync_all() {
                    self.state = DeviceState::Error;
                    return Err(e);
                }
                None
            }
            (DeviceState::Stop, DeviceState::StopCopy) => {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
            (DeviceState::Stop, DeviceState::RunningP2p | DeviceState::Running) => {
                self.empty()?;
                None
            }
            _ => None,
        };
        self.state = next;
        Ok(out)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        // Best effort: a file that cannot be truncated still leaves the state machine usable.
        let _ = self.empty();
        self.state = DeviceState::Running;
        Ok(())
    }
}
