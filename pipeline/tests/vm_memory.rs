//! The vm-memory adapter (feature `vm-memory`): rust-vmm guest memory as the pipeline's
//! `GuestMemoryAccess`, on its own and end to end, where the pipeline ships a device's DMA dirty
//! pages out of, and into, vm-memory mappings of the guests' memory.

use std::fs::File;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, DirtyTracking, GuestMemoryAccess, SourceOptions,
    SourceSession, VmGuestMemory, VmMemoryError,
};
use vfmig_transport::{Listener, SessionConfig};
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, GuestConfig, GuestMemory};
use vfmig_vfio::{DmaLoggingError, IovaRange};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

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

/// A vm-memory mapping (MAP_SHARED) of an emulated guest's memfd: the same bytes the device DMAs
/// into, seen the way a rust-vmm VMM sees its guest RAM.
fn vm_view(g: &GuestMemory) -> Arc<dyn GuestMemoryAccess> {
    let file = File::from(g.fd().try_clone_to_owned().expect("dup memfd"));
    let len = usize::try_from(g.len()).unwrap();
    let mem = Mmap::from_ranges_with_files([(
        GuestAddress(g.iova()),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("map the memfd");
    Arc::new(VmGuestMemory::identity(Arc::new(mem)).expect("identity"))
}

#[test]
fn device_dma_dirty_pages_move_between_vm_memory_guests_through_the_adapter() {
    // Default sessions, with 10 s bounds on every wait.
    let timeout = Duration::from_secs(10);
    let session = SessionConfig {
        timeout,
        ..SessionConfig::default()
    };
    let guest = GuestConfig {
        iova: 0x4000_0000,
        len: 2 << 20,
        dma_pages_per_sec: 5000,
        quiesce_dma_pages: 16,
    };
    let config = EmulatedConfig::new("emu0", 2 << 20, 1)
        .with_precopy(Some(u64::MAX))
        .with_guest(guest);
    let src = EmulatedDevice::new(config).unwrap();
    let src_guest = src.guest_memory().unwrap();
    let dst = src.destination().unwrap();
    let dst_guest = dst.guest_memory().unwrap();
    let (src_view, dst_view) = (vm_view(&src_guest), vm_view(&dst_guest));
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let dsession = session.clone();
    let dest = thread::spawn(move || {
        let mut s = DestinationSession::new(
            vec![dst],
            DestinationOptions {
                session: dsession,
                timeout,
                guest_memory: Some(dst_view),
                ..DestinationOptions::default()
            },
        );
        s.run(&listener)
    });
    let mut run = SourceSession::new(
        vec![src],
        SourceOptions {
            session,
            timeout,
            precopy: true,
            dirty_tracking: DirtyTracking::ShipPages {
                memory: src_view,
                full_copy: true,
            },
            ..SourceOptions::default()
        },
    );
    let report = run.run(addr).expect("migration");
    dest.join().unwrap().expect("destination");
    let devs = run.into_devices();
    assert!(devs[0].stats().dma_pages_written > 0, "the device did DMA");
    assert!(report.devices[0].guest_page_bytes >= 2 << 20);
    assert_eq!(
        src_guest.digest(),
        dst_guest.digest(),
        "the destination guest holds what the source device wrote"
    );
}
