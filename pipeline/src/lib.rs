//! # vfmig-pipeline: moves device state from a source data fd to a destination data fd
//!
//! Owns: the io_uring data-fd reader and writer, the codec stage, the sessions a VMM drives,
//! rollback. Never touches: the wire format (vfmig-wire) or socket handling (vfmig-transport).
