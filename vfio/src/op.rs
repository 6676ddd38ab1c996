//! The names of device operations and features, spelled as in vfio.h, for the `op` and `feature`
//! fields of [`crate::DeviceError`]. Every implementation of [`crate::MigrationDevice`] (and the
//! trait's default bodies for optional operations) takes its names from here, so one operation is
//! named the same whichever device refused it.

/// `VFIO_DEVICE_FEATURE_MIGRATION` (GET): the migration capabilities.
pub const MIGRATION: &str = "VFIO_DEVICE_FEATURE_MIGRATION";
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET/SET): the device state.
pub const MIG_DEVICE_STATE: &str = "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE";
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET): the estimated STOP_COPY size. Optional: it is
/// also the name of the feature a device lacks when it refuses the operation.
pub const MIG_DATA_SIZE: &str = "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE";
/// `VFIO_MIG_GET_PRECOPY_INFO` (ioctl on the data fd).
pub const PRECOPY_INFO: &str = "VFIO_MIG_GET_PRECOPY_INFO";
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (SET).
pub const PRECOPY_INFO_V2: &str = "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2";
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET). Also the name of the feature a device lacks
/// when it refuses any of the three logging operations (STOP and REPORT come with START).
pub const DMA_LOGGING_START: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_START";
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (SET).
pub const DMA_LOGGING_STOP: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP";
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET).
pub const DMA_LOGGING_REPORT: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT";
/// `VFIO_DEVICE_RESET`.
pub const DEVICE_RESET: &str = "VFIO_DEVICE_RESET";

/// The capability flag a device without PRE_COPY lacks (`VFIO_MIGRATION_PRE_COPY`).
pub const FEATURE_PRE_COPY: &str = "VFIO_MIGRATION_PRE_COPY";
/// The capability flag every migration device must have (`VFIO_MIGRATION_STOP_COPY`).
pub const FEATURE_STOP_COPY: &str = "VFIO_MIGRATION_STOP_COPY";
