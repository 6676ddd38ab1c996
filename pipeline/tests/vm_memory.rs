//! The vm-memory adapter (feature `vm-memory`): rust-vmm guest memory as the pipeline's
//! `GuestMemoryAccess`. End to end (dirty pages shipped between vm-memory mappings of two guests)
//! in `e2e.rs`, `device_dma_dirty_pages_reach_the_destination_guest_memory`.

use std::sync::Arc;

use vfmig_pipeline::{GuestMemoryAccess, VmGuestMemory, VmMemoryError};
use vfmig_vfio::{DmaLoggingError, IovaRange};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mmap = GuestMemoryMmap<()>;

const KIB: usize = 1024;

fn mmap(regions: &[(u64, usize)]) -> Arc<Mmap> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(a, len)| (GuestAddress(a), len))
        .collect();
    Arc::new(Mmap::from_ranges(&ranges).expect("anonymous guest memory"))
}

#[test]
fn identity_adapter_logs_the_guest_regions_merged_and_accesses_them_by_guest_address() {
    // Two adjacent regions and one after a hole.
    let mem = mmap(&[(0, 64 * KIB), (0x10000, 64 * KIB), (0x100000, 16 * KIB)]);
    let g = VmGuestMemory::identity(mem.clone()).expect("aligned regions");
    assert_eq!(
        g.ranges(),
        [
            IovaRange {
                iova: 0,
                length: 128 << 10
            },
            IovaRange {
                iova: 0x100000,
                length: 16 << 10
            },
        ]
    );
    // A write across the boundary of the two adjacent regions lands in both.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    g.write(0x10000 - 4096, &data).expect("write");
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, GuestAddress(0x10000 - 4096))
        .expect("vm-memory read");
    assert_eq!(back, data);
    // What the VMM writes, the adapter reads.
    mem.write_slice(&[9u8; 16], GuestAddress(0x100000 + 100))
        .expect("vm-memory write");
    let mut small = [0u8; 16];
    g.read(0x100000 + 100, &mut small).expect("read");
    assert_eq!(small, [9u8; 16]);
    // The hole is not guest memory: EFAULT, as the emulated guest memory answers.
    let err = g.read(0x20000, &mut small).expect_err("hole");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    let err = g
        .write(0x100000 + 16 * 1024 - 8, &[0u8; 16])
        .expect_err("past the end");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
}

#[test]
fn memory_unfit_for_dma_logging_is_refused_when_the_adapter_is_built() {
    // A region that is not a whole number of 4 KiB pages.
    let odd = mmap(&[(0, 6 * KIB)]);
    assert!(matches!(
        VmGuestMemory::identity(odd),
        Err(VmMemoryError::Ranges(DmaLoggingError::Unaligned { .. }))
    ));
    let mem = mmap(&[(0, 64 * KIB)]);
    // Ranges the VMM names must be guest memory...
    let hole = IovaRange {
        iova: 0x8000,
        length: 64 << 10,
    };
    assert!(matches!(
        VmGuestMemory::with_ranges(mem.clone(), vec![hole]),
        Err(VmMemoryError::NotAccessible {
            iova: 0x8000,
            length: 0x10000
        })
    ));
    // ...and there must be some.
    assert!(matches!(
        VmGuestMemory::with_ranges(mem.clone(), Vec::new()),
        Err(VmMemoryError::Ranges(DmaLoggingError::NoRanges))
    ));
    let first_half = IovaRange {
        iova: 0,
        length: 32 << 10,
    };
    let g = VmGuestMemory::with_ranges(mem, vec![first_half]).expect("a named sub-range");
    assert_eq!(g.ranges(), [first_half]);
}
