//! # vfmig-vfio: the VFIO migration v2 contract in code
//!
//! Owns: the device state machine ([`state`]), the [`MigrationDevice`] trait the pipeline drives,
//! the typed errors, the names of device operations ([`op`]), DMA dirty-logging argument rules
//! ([`dma`]) and the guest-memory trait DMA tracking reads and writes through
//! ([`GuestMemoryAccess`]). The real VFIO device ([`VfioDevice`]) lives here too.
//!
//! Optional, off by default (a VMM linking the pipeline links neither):
//! - feature `emulated`: the emulated device (`emulated`), a faithful in-process device whose
//!   data fd is a file on a FUSE mount, with its dependencies (fuser, memmap2, blake3, xxhash,
//!   crossbeam-channel). For tests, benches, `vfmig demo` and `emu:` devices.
//! - feature `contract`: the contract suite (`contract`) every `MigrationDevice` must pass, run
//!   against the emulated device in tests and against real mtty by `examples/contract_vfio.rs`.
//!
//! Never touches: the network, compression, or the bytes of device state beyond handing out the
//! data fd. Data comes in as ioctl results and a data fd (an `OwnedFd`); it goes out the same way.
//! Reading and writing the data fd is the pipeline's job.

#[cfg(feature = "contract")]
pub mod contract;
pub mod device;
pub mod dma;
#[cfg(feature = "emulated")]
pub mod emulated;
pub mod error;
pub mod guest_memory;
pub mod op;
pub mod state;
pub mod sys;
pub mod vfio_device;

pub use device::{DeviceClass, Identity, MigrationDevice, PrecopyInfo};
pub use dma::{DmaLoggingError, IovaRange};
pub use error::DeviceError;
pub use guest_memory::GuestMemoryAccess;
pub use state::{next_state, path, DeviceState, FsmError, MigrationCaps, Transition};
pub use vfio_device::{OpenPlan, OptionalFeatures, RegionInfo, VfioDevice};
