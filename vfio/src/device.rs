//! [`MigrationDevice`]: what the pipeline needs from a device, implemented by the real
//! `VfioDevice` and by the emulated device, and checked by one contract suite.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::dma::IovaRange;
use crate::error::DeviceError;
use crate::state::{path, DeviceState, MigrationCaps};

/// `struct vfio_precopy_info` as returned by `VFIO_MIG_GET_PRECOPY_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    /// Bytes of initial state still to be read; only decreases (except on REINIT).
    pub initial_bytes: u64,
    /// Estimate of state dirtied since it was last read.
    pub dirty_bytes: u64,
    /// `VFIO_PRECOPY_INFO_REINIT` (flags bit 0; only after
    /// [`MigrationDevice::enable_precopy_info_v2`] returned `Ok(true)`): new initial data is on
    /// the stream, `initial_bytes` was reset to non-zero and `dirty_bytes` to 0.
    pub reinit: bool,
}

/// What sort of device an [`Identity`] describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceClass {
    /// Not said: never compared with the peer's device.
    #[default]
    Unspecified,
    /// A byte stream (a file): carries any device's state, never compared.
    Stream,
    /// An emulated device.
    Emulated,
    /// A VFIO device.
    Vfio,
}

/// What a device says about itself so that the other side can refuse a pairing that cannot work
/// before any device leaves RUNNING (the handshake compares both sides' identities).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Its class.
    pub class: DeviceClass,
    /// Its state size in bytes, where it is exactly known (not an estimate).
    pub size: Option<u64>,
    /// A compatibility identifier compared byte for byte with the peer's (empty: none), e.g.
    /// `pci 8086:1572 driver vfio-pci`. At most 255 bytes.
    pub compat: String,
}

/// A VFIO migration v2 device as the pipeline sees it.
///
/// Implementations issue one `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET per call of
/// [`set_single_state`](MigrationDevice::set_single_state); [`set_state`](MigrationDevice::set_state)
/// walks the kernel's path one arc at a time, so every implementation follows the same path.
pub trait MigrationDevice: Send {
    /// A name for messages and reports (e.g. the sysfs device name).
    fn name(&self) -> &str;

    /// What the device says about itself for the handshake's pairing check. Default: nothing
    /// ([`DeviceClass::Unspecified`]), which is never compared.
    fn identity(&self) -> Identity {
        Identity::default()
    }

    /// The migration capabilities (`VFIO_DEVICE_FEATURE_MIGRATION` flags).
    fn capabilities(&self) -> MigrationCaps;

    /// The current state (`MIG_DEVICE_STATE` GET).
    fn state(&mut self) -> Result<DeviceState, DeviceError>;

    /// One SET to an adjacent state. Returns the data fd when the kernel returns one (the arcs of
    /// [`crate::Transition::opens_data_fd`], and possibly the continuing ones). The error carries the errno.
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error>;

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data fd; valid in PRE_COPY and PRE_COPY_P2P only.
    /// [`PrecopyInfo::reinit`] is only ever set after
    /// [`enable_precopy_info_v2`](MigrationDevice::enable_precopy_info_v2) returned `Ok(true)`.
    fn precopy_info(&mut self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError>;

    /// Opts in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (Linux 7.1; a SET without payload).
    ///
    /// Without the opt-in the kernel keeps the v1 behaviour: `vfio_precopy_info.flags` is
    /// reserved (older drivers echo what userspace passed in), `initial_bytes` only decreases,
    /// and new initial data a device produces shows up as `dirty_bytes`. After it, `flags` is an
    /// output and `VFIO_PRECOPY_INFO_REINIT` says that new initial data is on the stream:
    /// `initial_bytes` was reset to a non-zero value and `dirty_bytes` to 0, so the caller must
    /// treat the device as not ready for STOP_COPY again until `initial_bytes` is back to 0.
    /// (Kernel commit "vfio: Add support for VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2",
    /// lore 20260317161753.18964-3-yishaih@nvidia.com; the core refuses it with EINVAL for a
    /// device without `VFIO_MIGRATION_PRE_COPY`; the opt-in lasts until the device fd is closed.)
    ///
    /// Returns whether v2 is in force: `Ok(false)` when the kernel or the driver lacks the
    /// feature (v1 stays; nothing was changed). Calling it again is harmless. The default is
    /// that v1 fallback, for implementations that have no v2.
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        Ok(false)
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the estimated STOP_COPY size, in any state.
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`; returns the page size the device chose.
    fn dma_logging_start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DeviceError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: reads AND clears the dirty bits of
    /// `[iova, iova + length)` into `bitmap` (bit i = page i), only setting bits.
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError>;

    /// `VFIO_DEVICE_RESET`: leaves any state (ERROR included) for RUNNING and ends the data fd.
    fn reset(&mut self) -> Result<(), DeviceError>;

    /// Walks the kernel's path from the current state to `target`, one SET per arc.
    ///
    /// Returns the data fd created by the last arc that returned one; `None` when the walk created
    /// none or the driver kept the existing fd (e.g. PRE_COPY_P2P -> STOP_COPY). On failure the
    /// error names the arc and the state read back afterwards.
    fn set_state(&mut self, target: DeviceState) -> Result<Option<OwnedFd>, DeviceError> {
        let cur = self.state()?;
        let arcs = path(cur, target, self.capabilities())?;
        let mut data_fd = None;
        for arc in arcs {
            match self.set_single_state(arc.to) {
                Ok(Some(fd)) => data_fd = Some(fd),
                Ok(None) => {}
                Err(source) => {
                    let now = self.state().ok();
                    return Err(DeviceError::SetState {
                        device: self.name().to_owned(),
                        arc,
                        target,
                        now,
                        source,
                    });
                }
            }
        }
        Ok(data_fd)
    }
}

impl<D: MigrationDevice + ?Sized> MigrationDevice for Box<D> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn identity(&self) -> Identity {
        (**self).identity()
    }
    fn capabilities(&self) -> MigrationCaps {
        (**self).capabilities()
    }
    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        (**self).state()
    }
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        (**self).set_single_state(next)
    }
    fn precopy_info(&mut self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        (**self).precopy_info(data_fd)
    }
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        (**self).enable_precopy_info_v2()
    }
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        (**self).stop_copy_size()
    }
    fn dma_logging_start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DeviceError> {
        (**self).dma_logging_start(ranges, page_size)
    }
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        (**self).dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        (**self).dma_logging_stop()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        (**self).reset()
    }
    fn set_state(&mut self, target: DeviceState) -> Result<Option<OwnedFd>, DeviceError> {
        (**self).set_state(target)
    }
}
