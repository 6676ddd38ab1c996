//! A byte stream as a device: the state of something the VMM migrates itself (a file, a pipe, a
//! socket it filled with its own device's state) carried by the pipeline like device state.
//!
//! - Source: the fd *is* the state stream. STOP -> STOP_COPY hands out a duplicate of it as the
//!   data fd; it is read from its current position until end of file (a pipe: until its last
//!   writer closed). A stream is read once: after a failed migration it is not rewound.
//! - Destination: STOP -> RESUMING hands out a duplicate as the data fd; the verified stream is
//!   written starting at its position when receiving begins. RESUMING -> STOP (issued only after the length and digest
//!   checked) flushes a regular file to disk (`fdatasync`) before the device reports prepared.
//!   After a failed migration the bytes written so far stay in the file: the caller discards
//!   them (the call that failed says so).
//!
//! A stream initiates no DMA, so it advertises `VFIO_MIGRATION_P2P` (RUNNING_P2P is RUNNING) and
//! combines with other devices; it has no PRE_COPY and no DMA logging.

use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::{BorrowedFd, OwnedFd};

use vfmig_vfio::{
    next_state, DeviceClass, DeviceError, DeviceState, Identity, IovaRange, MigrationCaps,
    MigrationDevice, PrecopyInfo,
};

/// The capabilities of a stream device.
const STREAM_CAPS: MigrationCaps = MigrationCaps::STOP_COPY.union(MigrationCaps::P2P);

/// A stream device over the library's duplicate of a caller's fd.
#[derive(Debug)]
pub(crate) struct StreamDevice {
    name: String,
    file: File,
    destination: bool,
    state: DeviceState,
}

impl StreamDevice {
    pub(crate) fn new(fd: OwnedFd, name: String, destination: bool) -> StreamDevice {
        StreamDevice {
            name,
            file: File::from(fd),
            destination,
            state: DeviceState::Running,
        }
    }

    /// Bytes from the current position to the end, for a regular file on the source.
    fn remaining(&self) -> Option<u64> {
        let meta = self.file.metadata().ok()?;
        if self.destination || !meta.is_file() {
            return None;
        }
        let pos = (&self.file).stream_position().ok()?;
        Some(meta.len().saturating_sub(pos))
    }

    fn unsupported(&self, op: &'static str, feature: &'static str) -> DeviceError {
        DeviceError::Unsupported {
            device: self.name.clone(),
            op,
            feature,
        }
    }

    fn data_fd(&self) -> io::Result<Option<OwnedFd>> {
        Ok(Some(OwnedFd::from(self.file.try_clone()?)))
    }
}

impl MigrationDevice for StreamDevice {
    fn name(&self) -> &str {
        &self.name
    }

    /// A byte stream: pairs with any device; a regular file's length is exact.
    fn identity(&self) -> Identity {
        Identity {
            class: DeviceClass::Stream,
            size: self.remaining(),
            compat: String::new(),
        }
    }

    fn capabilities(&self) -> MigrationCaps {
        STREAM_CAPS
    }

    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(self.state)
    }

    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        let cur = self.state;
        if next == cur || next_state(cur, next, STREAM_CAPS).ok() != Some(next) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let out = match (cur, next, self.destination) {
            (DeviceState::Stop, DeviceState::StopCopy, false)
            | (DeviceState::Stop, DeviceState::Resuming, true) => self.data_fd()?,
            (DeviceState::Stop, DeviceState::StopCopy | DeviceState::Resuming, _) => {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
            (DeviceState::Resuming, DeviceState::Stop, _) => {
                if self.file.metadata()?.is_file() {
                    if let Err(e) = self.file.sync_data() {
                        self.state = DeviceState::Error;
                        return Err(e);
                    }
                }
                None
            }
            _ => None,
        };
        self.state = next;
        Ok(out)
    }

    fn precopy_info(&mut self, _: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        Err(self.unsupported("VFIO_MIG_GET_PRECOPY_INFO", "VFIO_MIGRATION_PRE_COPY"))
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(self.remaining().unwrap_or(0))
    }

    fn dma_logging_start(&mut self, _: &[IovaRange], _: u64) -> Result<u64, DeviceError> {
        Err(self.unsupported("DMA_LOGGING_START", "DMA_LOGGING"))
    }

    fn dma_logging_report(
        &mut self,
        _: u64,
        _: u64,
        _: u64,
        _: &mut [u64],
    ) -> Result<(), DeviceError> {
        Err(self.unsupported("DMA_LOGGING_REPORT", "DMA_LOGGING"))
    }

    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        Err(self.unsupported("DMA_LOGGING_STOP", "DMA_LOGGING"))
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.state = DeviceState::Running;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(destination: bool) -> StreamDevice {
        let f = tempfile::tempfile().expect("temp file");
        StreamDevice::new(OwnedFd::from(f), "s".into(), destination)
    }

    #[test]
    fn a_source_opens_only_stop_copy_and_a_destination_only_resuming() {
        let mut src = device(false);
        src.set_state(DeviceState::Stop).unwrap();
        assert!(src.set_single_state(DeviceState::Resuming).is_err());
        assert!(src
            .set_single_state(DeviceState::StopCopy)
            .unwrap()
            .is_some());
        let mut dst = device(true);
        dst.set_state(DeviceState::Stop).unwrap();
        assert!(dst.set_single_state(DeviceState::StopCopy).is_err());
        assert!(dst
            .set_single_state(DeviceState::Resuming)
            .unwrap()
            .is_some());
        assert!(dst.set_single_state(DeviceState::Stop).unwrap().is_none());
    }

    #[test]
    fn illegal_arcs_are_refused_with_einval() {
        let mut d = device(false);
        let e = d.set_single_state(DeviceState::StopCopy).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(d.state().unwrap(), DeviceState::Running);
    }
}
