//! The devices a C caller hands to a session: a VFIO device adopted from the caller's fd, a byte
//! stream over the caller's fd, or an emulated device. One type, so that a session can hold both and the API can still reach the
//! emulated device's state digest.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

#[cfg(feature = "emulated")]
use vfmig_vfio::emulated::EmulatedDevice;

use crate::stream::StreamDevice;
use vfmig_vfio::{
    DeviceError, DeviceState, Identity, IovaRange, MigrationCaps, MigrationDevice, PrecopyInfo,
    VfioDevice,
};

/// A device of a C API session.
#[derive(Debug)]
pub(crate) enum Device {
    /// A VFIO device over a duplicate of the caller's device fd.
    Vfio(VfioDevice),
    /// An emulated device (tests, examples).
    #[cfg(feature = "emulated")]
    Emulated(EmulatedDevice),
    /// A byte stream over a duplicate of the caller's fd.
    Stream(StreamDevice),
}

impl Device {
    fn inner(&self) -> &dyn MigrationDevice {
        match self {
            Device::Vfio(d) => d,
            #[cfg(feature = "emulated")]
            Device::Emulated(d) => d,
            Device::Stream(d) => d,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn MigrationDevice {
        match self {
            Device::Vfio(d) => d,
            #[cfg(feature = "emulated")]
            Device::Emulated(d) => d,
            Device::Stream(d) => d,
        }
    }

    /// The emulated device's state digest; `None` for a VFIO device or while undefined.
    pub(crate) fn state_digest(&self) -> Option<[u8; 32]> {
        match self {
            Device::Vfio(_) | Device::Stream(_) => None,
            #[cfg(feature = "emulated")]
            Device::Emulated(d) => d.state_digest(),
        }
    }
}

impl MigrationDevice for Device {
    fn name(&self) -> &str {
        self.inner().name()
    }
    fn identity(&self) -> Identity {
        self.inner().identity()
    }
    fn capabilities(&self) -> MigrationCaps {
        self.inner().capabilities()
    }
    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        self.inner_mut().state()
    }
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        self.inner_mut().set_single_state(next)
    }
    fn precopy_info(&mut self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        self.inner_mut().precopy_info(data_fd)
    }
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        self.inner_mut().enable_precopy_info_v2()
    }
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        self.inner_mut().stop_copy_size()
    }
    fn dma_logging_start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DeviceError> {
        self.inner_mut().dma_logging_start(ranges, page_size)
    }
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.inner_mut()
            .dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        self.inner_mut().dma_logging_stop()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.inner_mut().reset()
    }
    fn set_state(&mut self, target: DeviceState) -> Result<Option<OwnedFd>, DeviceError> {
        self.inner_mut().set_state(target)
    }
}
