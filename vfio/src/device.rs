//! [`MigrationDevice`]: what the pipeline needs from a device, implemented by the real
//! `VfioDevice` and by the emulated device, and checked by one contract suite.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::dma::IovaRange;
use crate::error::DeviceError;
use crate::op;
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
/// The operations a device may lack ([`precopy_info`](MigrationDevice::precopy_info),
/// [`stop_copy_size`](MigrationDevice::stop_copy_size), the three `dma_logging_*` and
/// [`enable_precopy_info_v2`](MigrationDevice::enable_precopy_info_v2)) have default bodies that
/// answer as a kernel without the feature does ([`DeviceError::Unsupported`] with the names of
/// [`crate::op`]; v1 for the PRECOPY_INFOv2 opt-in). Support is a run-time fact (a real device
/// learns it from `VFIO_DEVICE_FEATURE_PROBE` at open), so it is not split into optional traits:
/// callers handle `Unsupported` in one place.
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
    /// [`crate::Transition::opens_data_fd`], and possibly the continuing ones). The error carries
    /// the errno.
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error>;

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data fd; valid in PRE_COPY and PRE_COPY_P2P only.
    /// [`PrecopyInfo::reinit`] is only ever set after
    /// [`enable_precopy_info_v2`](MigrationDevice::enable_precopy_info_v2) returned `Ok(true)`.
    ///
    /// Optional: the default, for devices without PRE_COPY, refuses with
    /// [`DeviceError::Unsupported`] (`VFIO_MIG_GET_PRECOPY_INFO` needs `VFIO_MIGRATION_PRE_COPY`).
    fn precopy_info(&mut self, _data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        Err(unsupported(
            self.name(),
            op::PRECOPY_INFO,
            op::FEATURE_PRE_COPY,
        ))
    }

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
    ///
    /// Optional: the default refuses with [`DeviceError::Unsupported`], as the kernel does for a
    /// driver without the feature.
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Err(unsupported(
            self.name(),
            op::MIG_DATA_SIZE,
            op::MIG_DATA_SIZE,
        ))
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`; returns the page size the device chose.
    ///
    /// Optional, with REPORT and STOP: the defaults refuse with [`DeviceError::Unsupported`]
    /// naming `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` as the missing feature. The pipeline then
    /// counts the device as untracked (its DMA writes cannot be followed during pre-copy).
    fn dma_logging_start(
        &mut self,
        _ranges: &[IovaRange],
        _page_size: u64,
    ) -> Result<u64, DeviceError> {
        Err(unsupported(
            self.name(),
            op::DMA_LOGGING_START,
            op::DMA_LOGGING_START,
        ))
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: reads AND clears the dirty bits of
    /// `[iova, iova + length)` into `bitmap` (bit i = page i), only setting bits.
    fn dma_logging_report(
        &mut self,
        _iova: u64,
        _length: u64,
        _page_size: u64,
        _bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        Err(unsupported(
            self.name(),
            op::DMA_LOGGING_REPORT,
            op::DMA_LOGGING_START,
        ))
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        Err(unsupported(
            self.name(),
            op::DMA_LOGGING_STOP,
            op::DMA_LOGGING_START,
        ))
    }

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

/// The refusal of an optional operation by a device that lacks the feature.
#[cold]
fn unsupported(device: &str, op: &'static str, feature: &'static str) -> DeviceError {
    DeviceError::Unsupported {
        device: device.to_owned(),
        op,
        feature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with only the mandatory operations: STOP_COPY only, no optional features.
    struct Minimal(DeviceState);

    impl MigrationDevice for Minimal {
        fn name(&self) -> &str {
            "minimal"
        }
        fn capabilities(&self) -> MigrationCaps {
            MigrationCaps::STOP_COPY
        }
        fn state(&mut self) -> Result<DeviceState, DeviceError> {
            Ok(self.0)
        }
        fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
            self.0 = next;
            Ok(None)
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            self.0 = DeviceState::Running;
            Ok(())
        }
    }

    fn refusal<T: std::fmt::Debug>(
        r: Result<T, DeviceError>,
    ) -> (String, &'static str, &'static str) {
        match r {
            Err(DeviceError::Unsupported {
                device,
                op,
                feature,
            }) => (device, op, feature),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn optional_operations_default_to_unsupported_named_from_op() {
        let mut d = Minimal(DeviceState::Running);
        let stdin = std::io::stdin();
        let fd = std::os::fd::AsFd::as_fd(&stdin);
        let name = || "minimal".to_owned();
        assert_eq!(
            refusal(d.precopy_info(fd)),
            (name(), op::PRECOPY_INFO, op::FEATURE_PRE_COPY)
        );
        assert_eq!(
            refusal(d.stop_copy_size()),
            (name(), op::MIG_DATA_SIZE, op::MIG_DATA_SIZE)
        );
        let range = IovaRange {
            iova: 0,
            length: 4096,
        };
        assert_eq!(
            refusal(d.dma_logging_start(&[range], 4096)),
            (name(), op::DMA_LOGGING_START, op::DMA_LOGGING_START)
        );
        assert_eq!(
            refusal(d.dma_logging_report(0, 4096, 4096, &mut [0])),
            (name(), op::DMA_LOGGING_REPORT, op::DMA_LOGGING_START)
        );
        assert_eq!(
            refusal(d.dma_logging_stop()),
            (name(), op::DMA_LOGGING_STOP, op::DMA_LOGGING_START)
        );
        assert_eq!(d.enable_precopy_info_v2().ok(), Some(false), "v1 stays");
        // Boxing forwards to the inner device's defaults.
        let mut boxed: Box<dyn MigrationDevice> = Box::new(d);
        assert_eq!(
            refusal(boxed.dma_logging_stop()),
            (
                "minimal".to_owned(),
                op::DMA_LOGGING_STOP,
                op::DMA_LOGGING_START
            )
        );
    }
}
