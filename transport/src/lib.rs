//! # vfmig-transport: sessions of N TCP connections between a source and a destination
//!
//! Owns: connecting, authenticating, striping frames over connections, reordering on receive, and
//! the registered buffer pool shared with the pipeline's io_uring data-fd reader and writer.
//! Never touches: devices or compression. Frames come in from the pipeline and go out to it.

pub mod pool;

pub use pool::{BufPool, PoolBuf, PoolError};
