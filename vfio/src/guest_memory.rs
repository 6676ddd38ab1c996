//! [`GuestMemoryAccess`]: the guest memory devices DMA into, addressed by IOVA, as device DMA
//! dirty tracking needs it (the source reads the pages a device dirtied; the destination writes
//! them).
//!
//! The trait lives here, beside [`IovaRange`] and the DMA logging rules, so that it depends on
//! nothing optional: a VMM implements it for its own memory (the pipeline offers an adapter for
//! vm-memory's `GuestMemory` behind its `vm-memory` feature), and the emulated device's
//! memfd-backed guest memory (feature `emulated`) implements it too.

use std::io;

use crate::dma::IovaRange;

/// Access to a VM's guest memory by IOVA. Implemented by the VMM.
pub trait GuestMemoryAccess: Send + Sync + std::fmt::Debug {
    /// The IOVA ranges devices may DMA into (page aligned, non-overlapping, at most 256).
    fn ranges(&self) -> Vec<IovaRange>;
    /// Reads `buf.len()` bytes at `iova`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `iova`.
    fn write(&self, iova: u64, data: &[u8]) -> io::Result<()>;
}
