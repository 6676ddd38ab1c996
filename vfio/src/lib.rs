//! # vfmig-vfio: the VFIO migration v2 contract in code
//!
//! Owns: the device state machine ([`state`]), the [`MigrationDevice`] trait the pipeline drives,
//! the typed errors, and DMA dirty-logging argument rules ([`dma`]). Implementations of the trait
//! (the real VFIO device, the emulated device) live in this crate too.
//!
//! Never touches: the network, compression, or the bytes of device state beyond handing out the
//! data fd. Data comes in as ioctl results and a data fd (an `OwnedFd`); it goes out the same way.
//! Reading and writing the data fd is the pipeline's job.

pub mod contract;
pub mod device;
pub mod dma;
pub mod emulated;
pub mod error;
pub mod op;
pub mod state;
pub mod sys;
pub mod vfio_device;

pub use device::{DeviceClass, Identity, MigrationDevice, PrecopyInfo};
pub use dma::{DmaLoggingError, IovaRange};
pub use error::DeviceError;
pub use state::{next_state, path, DeviceState, FsmError, MigrationCaps, Transition};
pub use vfio_device::{OpenPlan, OptionalFeatures, RegionInfo, VfioDevice};
