//! [`VmGuestMemory`]: the pipeline's [`GuestMemoryAccess`] over the guest memory of the
//! [vm-memory](https://docs.rs/vm-memory) crate, which rust-vmm VMMs already hold (feature
//! `vm-memory`).
//!
//! The adapter wraps any `GuestAddressSpace` (an `Arc<GuestMemoryMmap>`, a
//! `GuestMemoryAtomic<..>`, a plain reference) and reads and writes through vm-memory's
//! `Bytes<GuestAddress>`, so it takes whatever memory map is current at each access. The IOVA
//! ranges handed to device DMA logging are fixed when it is built: either the guest's RAM regions
//! with IOVA = guest physical address ([`VmGuestMemory::identity`], how a VMM without a virtual
//! IOMMU maps guest RAM for VFIO), or ranges the VMM names ([`VmGuestMemory::with_ranges`], e.g.
//! behind vm-memory's `IommuMemory`).

use std::fmt;
use std::io;

use vfmig_vfio::dma::validate_ranges;
use vfmig_vfio::{DmaLoggingError, GuestMemoryAccess, IovaRange};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend,
    GuestMemoryError, GuestMemoryRegion, Permissions,
};

use crate::guest::GUEST_PAGE;

/// Why guest memory cannot be used for DMA dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum VmMemoryError {
    /// [`VmGuestMemory::identity`] on memory with no plain physical memory underneath (it is
    /// behind an IOMMU): name the IOVA ranges with [`VmGuestMemory::with_ranges`].
    #[error("the guest memory is behind an IOMMU: its IOVA ranges must be given")]
    NoPhysicalMemory,
    /// The ranges are unfit for DMA logging (none, more than 256, not 4 KiB aligned, wrapping or
    /// overlapping).
    #[error("guest memory ranges unfit for DMA logging: {0}")]
    Ranges(#[from] DmaLoggingError),
    /// A range is not entirely readable and writable guest memory.
    #[error("IOVA range {iova:#x}+{length:#x} is not readable and writable guest memory")]
    NotAccessible {
        /// First IOVA of the range.
        iova: u64,
        /// Its length in bytes.
        length: u64,
    },
}

/// vm-memory guest memory as the pipeline's [`GuestMemoryAccess`]; see the module docs.
pub struct VmGuestMemory<S> {
    space: S,
    ranges: Vec<IovaRange>,
}

impl<S: GuestAddressSpace> VmGuestMemory<S> {
    /// IOVA = guest physical address: the logged ranges are the guest's memory regions, adjacent
    /// ones merged. Fails with [`VmMemoryError::NoPhysicalMemory`] behind an IOMMU, and with
    /// [`VmMemoryError::Ranges`] when the regions are not 4 KiB aligned or more than 256.
    pub fn identity(space: S) -> Result<VmGuestMemory<S>, VmMemoryError> {
        let mut regions: Vec<(u64, u64)> = {
            let mem = space.memory();
            let phys = mem
                .physical_memory()
                .ok_or(VmMemoryError::NoPhysicalMemory)?;
            phys.iter()
                .map(|r| (r.start_addr().raw_value(), r.len()))
                .collect()
        };
        regions.sort_unstable();
        let mut ranges: Vec<IovaRange> = Vec::with_capacity(regions.len());
        for (iova, length) in regions {
            match ranges.last_mut() {
                Some(last) if last.end() == Some(iova) => last.length += length,
                _ => ranges.push(IovaRange { iova, length }),
            }
        }
        VmGuestMemory::with_ranges(space, ranges)
    }

    /// Logs exactly `ranges` (IOVAs as `space` resolves them). Each must be readable and writable
    /// guest memory, 4 KiB aligned, at most 256 of them, none overlapping.
    pub fn with_ranges(
        space: S,
        ranges: Vec<IovaRange>,
    ) -> Result<VmGuestMemory<S>, VmMemoryError> {
        validate_ranges(&ranges, GUEST_PAGE)?;
        {
            let mem = space.memory();
            for r in &ranges {
                let inaccessible = VmMemoryError::NotAccessible {
                    iova: r.iova,
                    length: r.length,
                };
                let len = usize::try_from(r.length).map_err(|_| inaccessible)?;
                if !mem.check_range(GuestAddress(r.iova), len, Permissions::ReadWrite) {
                    return Err(VmMemoryError::NotAccessible {
                        iova: r.iova,
                        length: r.length,
                    });
                }
            }
        }
        Ok(VmGuestMemory { space, ranges })
    }

    /// The wrapped address space.
    pub fn space(&self) -> &S {
        &self.space
    }
}

impl<S> fmt::Debug for VmGuestMemory<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmGuestMemory")
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

/// vm-memory's I/O errors pass through; an address outside guest memory (or refused by an IOMMU)
/// is EFAULT, as a device's DMA there would be.
fn io_error(e: GuestMemoryError) -> io::Error {
    match e {
        GuestMemoryError::IOError(e) => e,
        _ => io::Error::from_raw_os_error(libc::EFAULT),
    }
}

impl<S: GuestAddressSpace + Send + Sync> GuestMemoryAccess for VmGuestMemory<S> {
    fn ranges(&self) -> Vec<IovaRange> {
        self.ranges.clone()
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        self.space
            .memory()
            .read_slice(buf, GuestAddress(iova))
            .map_err(io_error)
    }

    fn write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        self.space
            .memory()
            .write_slice(data, GuestAddress(iova))
            .map_err(io_error)
    }
}
