//! EmulatedDevice behaviour beyond the generic contract: live state and PRE_COPY accounting,
//! stream validation on resume, faults, DMA dirty logging, P2P, io_uring on the data fd.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use vfmig_vfio::emulated::format::HEADER_LEN;
use vfmig_vfio::emulated::{
    EmulatedConfig, EmulatedDevice, FailArc, Faults, GuestConfig, P2pFabric, PrecopyInfoVersion,
    Profile, Quirks, StreamError,
};
use vfmig_vfio::{
    DeviceError, DeviceState, DmaLoggingError, IovaRange, MigrationDevice, Transition,
};

fn small(name: &str) -> EmulatedConfig {
    EmulatedConfig::new(name, 1 << 20, 5).with_block_size(16 << 10)
}

fn read_all(f: &File) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = (&*f).read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn stop_copy_bytes(dev: &mut EmulatedDevice) -> Vec<u8> {
    let fd = dev.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let data = read_all(&File::from(fd)).unwrap();
    dev.set_state(DeviceState::Stop).unwrap();
    data
}

/// Writes `data` to a fresh RESUMING fd of `dst` and SETs STOP.
fn resume(dst: &mut EmulatedDevice, data: &[u8]) -> Result<(), DeviceError> {
    dst.reset().unwrap();
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut f = File::from(fd);
    for piece in data.chunks(10_007) {
        f.write_all(piece).unwrap();
    }
    dst.set_state(DeviceState::Stop).map(|_| ())
}

/// Record boundaries `(start, end)` of a stream.
fn records(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN <= data.len() {
        let len = u32::from_le_bytes(data[at + 24..at + 28].try_into().unwrap()) as usize;
        out.push((at, at + HEADER_LEN + len));
        at += HEADER_LEN + len;
    }
    out
}

fn expect_refused(dst: &mut EmulatedDevice, data: &[u8], want: fn(&StreamError) -> bool) {
    let err = resume(dst, data).expect_err("damaged stream must be refused");
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert_eq!(dst.state().unwrap(), DeviceState::Error);
    let why = dst.last_resume_error().expect("a reason");
    assert!(want(&why), "unexpected reason {why:?}");
    assert_eq!(
        dst.state_digest(),
        None,
        "a refused device vouches for no state"
    );
}

#[test]
fn a_refused_destination_reports_no_state_digest_until_reset() {
    let mut src = EmulatedDevice::new(small("src")).unwrap();
    let mut dst = src.destination().unwrap();
    let good = stop_copy_bytes(&mut src);
    let err = resume(&mut dst, &good[..good.len() - 1]).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert_eq!(dst.state().unwrap(), DeviceState::Error);
    // Same seed and nothing dirtied: a digest regenerated from the destination's own seed would
    // equal the source's and "prove" a transfer that was refused.
    assert_eq!(dst.state_digest(), None);
    dst.reset().unwrap();
    assert!(
        dst.state_digest().is_some(),
        "RESET leaves ERROR with a defined state"
    );
}

#[test]
fn damaged_streams_are_refused_with_the_reason_and_the_device_goes_to_error() {
    let mut src = EmulatedDevice::new(small("src")).unwrap();
    let mut dst = src.destination().unwrap();
    let good = stop_copy_bytes(&mut src);
    let recs = records(&good);
    assert_eq!(
        recs.last().unwrap().1,
        good.len(),
        "records tile the stream"
    );
    assert!(recs.len() > 10);

    // Truncated mid-record and at a record boundary (END missing).
    expect_refused(&mut dst, &good[..good.len() / 2 + 3], |e| {
        matches!(e, StreamError::Truncated { .. })
    });
    expect_refused(&mut dst, &good[..recs[recs.len() - 1].0], |e| {
        matches!(e, StreamError::Truncated { .. })
    });
    // Two records swapped.
    let (a, b) = (recs[3], recs[4]);
    let mut swapped = good[..a.0].to_vec();
    swapped.extend_from_slice(&good[b.0..b.1]);
    swapped.extend_from_slice(&good[a.0..a.1]);
    swapped.extend_from_slice(&good[b.1..]);
    expect_refused(&mut dst, &swapped, |e| {
        matches!(e, StreamError::Sequence { .. })
    });
    // A record duplicated.
    let mut dup = good[..a.1].to_vec();
    dup.extend_from_slice(&good[a.0..]);
    expect_refused(&mut dst, &dup, |e| {
        matches!(e, StreamError::Sequence { .. })
    });
    // A payload byte flipped.
    let mut flipped = good.clone();
    flipped[a.0 + HEADER_LEN + 100] ^= 1;
    expect_refused(&mut dst, &flipped, |e| {
        matches!(e, StreamError::PayloadHash { .. })
    });
    // A header byte flipped.
    let mut hdr = good.clone();
    hdr[b.0 + 17] ^= 0x80;
    expect_refused(&mut dst, &hdr, |e| {
        matches!(e, StreamError::BadHeader { .. })
    });
    // A record dropped.
    let mut dropped = good[..a.0].to_vec();
    dropped.extend_from_slice(&good[a.1..]);
    expect_refused(&mut dst, &dropped, |e| {
        matches!(e, StreamError::Sequence { .. })
    });
    // A stream of a different device geometry.
    let mut other = EmulatedDevice::new(small("other").with_block_size(32 << 10)).unwrap();
    let foreign = stop_copy_bytes(&mut other);
    expect_refused(&mut dst, &foreign, |e| {
        matches!(e, StreamError::Geometry { .. })
    });

    // And the intact stream still resumes to exactly the source's state.
    resume(&mut dst, &good).unwrap();
    assert_eq!(dst.state().unwrap(), DeviceState::Stop);
    assert_eq!(dst.state_digest(), src.state_digest());
}

#[test]
fn writes_after_the_end_record_or_past_capacity_fail_with_enomem() {
    let mut src = EmulatedDevice::new(small("src")).unwrap();
    let mut dst = src.destination().unwrap();
    let good = stop_copy_bytes(&mut src);
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut f = File::from(fd);
    f.write_all(&good).unwrap();
    let e = f.write(b"more").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());

    let mut cfg = small("cap");
    cfg.resume_capacity = Some(1000);
    let mut dst = EmulatedDevice::new(cfg).unwrap();
    let mut f = File::from(dst.set_state(DeviceState::Resuming).unwrap().unwrap());
    assert_eq!(
        f.write(&good[..4096]).unwrap(),
        1000,
        "short write up to capacity"
    );
    let e = f.write(&good[1000..2000]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
}

#[test]
fn precopy_reports_initial_then_dirty_bytes_and_the_final_state_transfers() {
    let cfg = small("pre").with_precopy(Some(512 << 10));
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let mut dst = src.destination().unwrap();
    let fd = File::from(src.set_state(DeviceState::PreCopy).unwrap().unwrap());
    let info = src.precopy_info(fd.as_fd()).unwrap();
    // HELLO + 32 blocks of 16 KiB, each with a header.
    assert_eq!(info.initial_bytes, (48 + 24) + 32 * (48 + (16 << 10)));
    assert_eq!(info.dirty_bytes, 0);
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 100_000];
    let mut last = info.initial_bytes;
    loop {
        match (&fd).read(&mut buf) {
            Ok(n) => {
                assert!(n > 0, "uAPI mode never returns 0 in PRE_COPY");
                stream.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOMSG));
                break;
            }
        }
        let i = src.precopy_info(fd.as_fd()).unwrap();
        assert!(i.initial_bytes <= last, "initial_bytes only decreases");
        last = i.initial_bytes;
    }
    assert_eq!(last, 0);
    // The guest dirties state: it shows up as dirty_bytes and streams again.
    assert_eq!(src.dirty_blocks(20), 20);
    let i = src.precopy_info(fd.as_fd()).unwrap();
    assert!(i.dirty_bytes > 0 && i.dirty_bytes <= 20 * (48 + (16 << 10)));
    assert_eq!(i.initial_bytes, 0);
    let before = stream.len();
    while let Ok(n) = (&fd).read(&mut buf) {
        stream.extend_from_slice(&buf[..n]);
    }
    assert_eq!((stream.len() - before) as u64, i.dirty_bytes);
    assert_eq!(src.precopy_info(fd.as_fd()).unwrap().dirty_bytes, 0);
    src.dirty_blocks(3);
    let estimate = src.stop_copy_size().unwrap();
    // PRE_COPY -> STOP_COPY: same fd, no new one (default quirk).
    assert!(src.set_state(DeviceState::StopCopy).unwrap().is_none());
    let rest = read_all(&fd).unwrap();
    assert_eq!(rest.len() as u64, estimate, "MIG_DATA_SIZE is exact");
    stream.extend_from_slice(&rest);
    src.set_state(DeviceState::Stop).unwrap();
    resume(&mut dst, &stream).unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());
}

/// Reads a PRE_COPY fd until it has nothing pending (ENOMSG).
fn drain_precopy(fd: &File, out: &mut Vec<u8>) {
    let mut buf = vec![0u8; 100_000];
    loop {
        match (&*fd).read(&mut buf) {
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOMSG));
                return;
            }
        }
    }
}

#[test]
fn reinit_after_the_initial_data_was_drained_reports_new_initial_bytes_once_in_v2_only() {
    // 512 KiB initial region in 32 blocks; the device re-initialises once that was drained.
    let region = 32 * (48 + (16 << 10));
    for (version, v2) in [
        (PrecopyInfoVersion::V2, true),
        (PrecopyInfoVersion::V1, false),
    ] {
        let cfg = small("reinit")
            .with_precopy(Some(512 << 10))
            .with_precopy_info(version, Some(0));
        let mut src = EmulatedDevice::new(cfg).unwrap();
        let mut dst = src.destination().unwrap();
        assert_eq!(src.enable_precopy_info_v2().unwrap(), v2);
        let fd = File::from(src.set_state(DeviceState::PreCopy).unwrap().unwrap());
        let mut stream = Vec::new();
        drain_precopy(&fd, &mut stream);
        src.dirty_blocks(40);
        let drained = src.precopy_info(fd.as_fd()).unwrap();
        assert_eq!(drained.initial_bytes, 0, "{version:?}");
        assert!(!drained.reinit);
        let dirty_before = drained.dirty_bytes;
        assert!(dirty_before > 0);
        // The report after one that said 0 finds the device re-initialised.
        let info = src.precopy_info(fd.as_fd()).unwrap();
        assert_eq!(src.stats().precopy_reinits, 1);
        if v2 {
            assert!(info.reinit, "REINIT reported");
            // The initial region, and what was dirty, is initial data now; dirty_bytes is 0.
            assert!(info.initial_bytes >= region && info.initial_bytes <= region + dirty_before);
            assert_eq!(info.dirty_bytes, 0);
            let again = src.precopy_info(fd.as_fd()).unwrap();
            assert!(!again.reinit, "REINIT is reported once");
            assert_eq!(again.initial_bytes, info.initial_bytes);
        } else {
            assert!(!info.reinit, "v1: flags stay reserved");
            assert_eq!(info.initial_bytes, 0, "v1: initial_bytes never grows");
            assert!(info.dirty_bytes >= region, "v1: the new data is dirty data");
        }
        let before = stream.len();
        drain_precopy(&fd, &mut stream);
        let sent = (stream.len() - before) as u64;
        assert_eq!(sent, info.initial_bytes + info.dirty_bytes);
        let after = src.precopy_info(fd.as_fd()).unwrap();
        assert_eq!((after.initial_bytes, after.dirty_bytes), (0, 0));
        assert!(!after.reinit, "once per stream");
        assert!(src.set_state(DeviceState::StopCopy).unwrap().is_none());
        assert_eq!(src.stats().initial_bytes_at_precopy_exit, Some(0));
        stream.extend_from_slice(&read_all(&fd).unwrap());
        src.set_state(DeviceState::Stop).unwrap();
        resume(&mut dst, &stream).unwrap();
        assert_eq!(dst.state_digest(), src.state_digest(), "{version:?}");
    }
}

#[test]
fn precopy_drained_read_returns_zero_in_mtty_mode() {
    let cfg = EmulatedConfig::new("mtty", 4096, 1).with_quirks(Quirks::mtty());
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let fd = File::from(src.set_state(DeviceState::PreCopy).unwrap().unwrap());
    let data = {
        let mut v = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = (&fd).read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            v.extend_from_slice(&buf[..n]);
        }
        v
    };
    assert_eq!(data.len(), 48 + 24 + 48 + 4096, "HELLO and the only block");
    assert_eq!(src.precopy_info(fd.as_fd()).unwrap().initial_bytes, 0);
}

#[test]
fn live_dirty_rate_dirties_state_while_running_only() {
    let cfg = small("rate").with_dirty_rate(1 << 40);
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    dev.state().unwrap();
    let dirtied = dev.stats().blocks_dirtied;
    assert!(dirtied > 0, "1 TiB/s for 2 ms dirties blocks");
    dev.set_state(DeviceState::Stop).unwrap();
    let at_stop = dev.stats().blocks_dirtied;
    std::thread::sleep(std::time::Duration::from_millis(2));
    dev.state().unwrap();
    assert_eq!(dev.stats().blocks_dirtied, at_stop, "no dirtying in STOP");
}

#[test]
fn wrong_state_and_foreign_fds_get_typed_errors() {
    let mut dev = EmulatedDevice::new(small("w")).unwrap();
    let other = File::open("/proc/self/status").unwrap();
    match dev.precopy_info(other.as_fd()) {
        Err(DeviceError::WrongState { op, state, .. }) => {
            assert_eq!(op, "VFIO_MIG_GET_PRECOPY_INFO");
            assert_eq!(state, DeviceState::Running);
        }
        r => panic!("{r:?}"),
    }
    let _fd = dev.set_state(DeviceState::PreCopy).unwrap();
    let e = dev.precopy_info(other.as_fd()).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTTY));
    dev.reset().unwrap();
    // An illegal target is refused before any SET.
    dev.set_state(DeviceState::StopCopy).unwrap();
    assert!(matches!(
        dev.set_state(DeviceState::PreCopy),
        Err(DeviceError::Fsm(_))
    ));
    assert_eq!(dev.state().unwrap(), DeviceState::StopCopy);
    // Without guest memory, DMA logging is unsupported.
    assert!(matches!(
        dev.dma_logging_start(
            &[IovaRange {
                iova: 0,
                length: 4096
            }],
            4096
        ),
        Err(DeviceError::Unsupported { .. })
    ));
    // A stream ended by its arc reads ENODEV.
    dev.reset().unwrap();
    let fd = File::from(dev.set_state(DeviceState::PreCopy).unwrap().unwrap());
    dev.set_state(DeviceState::Running).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        (&fd).read(&mut b).unwrap_err().raw_os_error(),
        Some(libc::ENODEV)
    );
}

#[test]
fn read_error_fault_delivers_bytes_before_n_then_eio() {
    let mut cfg = small("rerr");
    cfg.faults.read_error_at = Some(70_000);
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    let fd = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    let mut got = 0;
    let mut buf = vec![0u8; 32 << 10];
    let err = loop {
        match (&fd).read(&mut buf) {
            Ok(n) => got += n,
            Err(e) => break e,
        }
    };
    assert_eq!(got, 70_000);
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
}

#[test]
fn early_end_fault_truncates_and_the_destination_refuses() {
    let mut cfg = small("early");
    cfg.faults.early_end_at = Some(123_456);
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let mut dst = src.destination().unwrap();
    let data = stop_copy_bytes(&mut src);
    assert_eq!(data.len(), 123_456);
    expect_refused(&mut dst, &data, |e| {
        matches!(e, StreamError::Truncated { .. })
    });
}

#[test]
fn slow_fault_still_delivers_the_whole_stream() {
    let mut cfg = EmulatedConfig::new("slow", 64 << 10, 3);
    cfg.faults.slow_bytes_per_sec = Some(16 << 20);
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let mut dst = src.destination().unwrap();
    let data = stop_copy_bytes(&mut src);
    resume(&mut dst, &data).unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());
}

#[test]
fn refuse_resume_fault_refuses_a_valid_stream() {
    let mut src = EmulatedDevice::new(small("src")).unwrap();
    let data = stop_copy_bytes(&mut src);
    let mut cfg = small("src");
    cfg.faults.refuse_resume = true;
    let mut dst = EmulatedDevice::new(cfg).unwrap();
    let err = resume(&mut dst, &data).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL));
    assert_eq!(dst.state().unwrap(), DeviceState::Error);
    dst.reset().unwrap();
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn fail_arc_fault_fails_that_set_and_names_the_arc() {
    let arc = Transition {
        from: DeviceState::RunningP2p,
        to: DeviceState::Stop,
    };
    for to_error in [false, true] {
        let mut cfg = small("arc");
        cfg.faults.fail_arc = Some(FailArc {
            arc,
            to_error,
            once: true,
        });
        let mut dev = EmulatedDevice::new(cfg).unwrap();
        match dev.set_state(DeviceState::StopCopy) {
            Err(DeviceError::SetState {
                arc: failed,
                target,
                now,
                source,
                ..
            }) => {
                assert_eq!(failed, arc);
                assert_eq!(target, DeviceState::StopCopy);
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
                let want = if to_error {
                    DeviceState::Error
                } else {
                    DeviceState::RunningP2p
                };
                assert_eq!(now, Some(want));
            }
            r => panic!("{r:?}"),
        }
        // `once`: after a reset the same walk works.
        dev.reset().unwrap();
        assert!(dev.set_state(DeviceState::StopCopy).unwrap().is_some());
    }
    let _ = Faults::default();
}

#[test]
fn dma_logging_reports_exactly_the_pages_written_and_clears_them() {
    let iova = 1u64 << 32;
    let cfg = small("dma").with_guest(GuestConfig {
        iova,
        len: 4 << 20,
        dma_pages_per_sec: 0,
        quiesce_dma_pages: 0,
    });
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    let mem = dev.guest_memory().unwrap();
    assert_eq!(mem.len(), 4 << 20);
    // Track only the first 2 MiB.
    let tracked = IovaRange {
        iova,
        length: 2 << 20,
    };
    assert_eq!(dev.dma_logging_start(&[tracked], 4096).unwrap(), 4096);
    assert!(matches!(
        dev.dma_logging_start(&[tracked], 4096),
        Err(DeviceError::DmaLogging {
            source: DmaLoggingError::AlreadyStarted,
            ..
        })
    ));
    let before = mem.digest();
    let written = dev.dma_write_pages(200);
    assert_ne!(mem.digest(), before, "DMA writes change guest memory");
    let mut want: Vec<u64> = written
        .iter()
        .copied()
        .filter(|&a| a < iova + (2 << 20))
        .collect();
    want.sort_unstable();
    want.dedup();
    let mut bitmap = vec![0u64; 512 / 64];
    dev.dma_logging_report(iova, 2 << 20, 4096, &mut bitmap)
        .unwrap();
    let mut got = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                got.push(iova + (w as u64 * 64 + b) * 4096);
            }
        }
    }
    assert_eq!(got, want, "exactly the written pages in the tracked range");
    // Read-and-clear.
    let mut again = vec![0u64; 8];
    dev.dma_logging_report(iova, 2 << 20, 4096, &mut again)
        .unwrap();
    assert!(again.iter().all(|&w| w == 0));
    // Outside the tracked range: a typed error.
    assert!(matches!(
        dev.dma_logging_report(iova + (2 << 20), 4096, 4096, &mut again),
        Err(DeviceError::DmaLogging {
            source: DmaLoggingError::NotTracked { .. },
            ..
        })
    ));
    assert!(matches!(
        dev.dma_logging_report(iova, 2 << 20, 4096, &mut [0u64; 1]),
        Err(DeviceError::DmaLogging {
            source: DmaLoggingError::BitmapTooSmall { .. },
            ..
        })
    ));
    // A stopped device does not DMA.
    dev.set_state(DeviceState::Stop).unwrap();
    assert!(dev.dma_write_pages(10).is_empty());
    dev.dma_logging_stop().unwrap();
    assert!(matches!(
        dev.dma_logging_stop(),
        Err(DeviceError::DmaLogging {
            source: DmaLoggingError::NotStarted,
            ..
        })
    ));
    // The guest memory is a real memfd another mapping can read.
    let mut page = vec![0u8; 4096];
    mem.read(written[0], &mut page).unwrap();
    let mut via_fd = vec![0u8; 4096];
    let n = unsafe_free_pread(mem.fd().as_raw_fd(), &mut via_fd, written[0] - iova);
    assert_eq!(n, 4096);
    assert_eq!(page, via_fd);
}

fn unsafe_free_pread(fd: i32, buf: &mut [u8], off: u64) -> usize {
    use std::os::unix::fs::FileExt;
    let f = File::open(format!("/proc/self/fd/{fd}")).unwrap();
    f.read_at(buf, off).unwrap()
}

#[test]
fn quiescing_every_device_to_running_p2p_first_loses_no_p2p_writes() {
    let mut a = EmulatedDevice::new(small("a")).unwrap();
    let mut b = EmulatedDevice::new(small("b")).unwrap();
    let mut fabric = P2pFabric::new(vec![a.p2p_port(), b.p2p_port()]);
    assert_eq!(fabric.pump(10).lost, 0);
    a.set_state(DeviceState::RunningP2p).unwrap();
    let mid = fabric.pump(10);
    assert!(
        mid.sent > 0,
        "b still initiates P2P into a, which accepts MMIO"
    );
    b.set_state(DeviceState::RunningP2p).unwrap();
    assert_eq!(
        fabric.pump(10).sent,
        0,
        "nobody initiates P2P in RUNNING_P2P"
    );
    a.set_state(DeviceState::Stop).unwrap();
    b.set_state(DeviceState::Stop).unwrap();
    fabric.pump(10);
    assert_eq!(fabric.stats().lost, 0);
    assert_eq!(a.stats().mmio_lost + b.stats().mmio_lost, 0);
}

#[test]
fn stopping_one_device_while_a_peer_runs_loses_p2p_writes() {
    let mut a = EmulatedDevice::new(small("a")).unwrap();
    let b = EmulatedDevice::new(small("b")).unwrap();
    let mut fabric = P2pFabric::new(vec![a.p2p_port(), b.p2p_port()]);
    a.set_state(DeviceState::Stop).unwrap();
    let r = fabric.pump(10);
    assert_eq!(r.lost, 10, "b's writes into stopped a are discarded");
    assert_eq!(a.stats().mmio_lost, 10);
    assert!(!a.mmio_write(0, 1), "STOP discards MMIO");
    assert!(b.mmio_write(8, 0xAB));
    assert_eq!(b.mmio_read(8), 0xAB, "running MMIO holds the write");
    a.set_state(DeviceState::RunningP2p).unwrap();
    assert!(a.mmio_write(16, 7), "RUNNING_P2P accepts MMIO");
    assert_eq!(a.mmio_read(16), 7);
    a.set_state(DeviceState::Stop).unwrap();
    assert_eq!(a.mmio_read(16), 0, "STOP reads zeros");
}

#[test]
fn io_uring_reads_at_offset_minus_one_see_the_stream_in_order() {
    use io_uring::{opcode, types, IoUring};
    let cfg = small("uring").with_profile(Profile::Random);
    let mut a = EmulatedDevice::new(cfg.clone()).unwrap();
    let mut b = EmulatedDevice::new(cfg).unwrap();
    let want = stop_copy_bytes(&mut b);
    let fd: OwnedFd = a.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut ring = IoUring::new(4).unwrap();
    let mut buf = vec![0u8; 300_000];
    let mut got = Vec::new();
    loop {
        let sqe = opcode::Read::new(
            types::Fd(fd.as_raw_fd()),
            buf.as_mut_ptr(),
            u32::try_from(buf.len()).unwrap(),
        )
        .offset(u64::MAX)
        .build();
        // SAFETY: `buf` outlives the submission, which completes before it is touched again.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let res = ring.completion().next().unwrap().result();
        assert!(res >= 0, "io_uring read: errno {}", -res);
        if res == 0 {
            break;
        }
        got.extend_from_slice(&buf[..usize::try_from(res).unwrap()]);
    }
    assert_eq!(got, want, "same seed, same stream");
    a.set_state(DeviceState::Stop).unwrap();

    // And io_uring writes at offset -1 feed a RESUMING fd.
    let mut dst = a.destination().unwrap();
    let wfd: OwnedFd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    for piece in got.chunks(200_000) {
        let sqe = opcode::Write::new(
            types::Fd(wfd.as_raw_fd()),
            piece.as_ptr(),
            u32::try_from(piece.len()).unwrap(),
        )
        .offset(u64::MAX)
        .build();
        // SAFETY: `piece` outlives the submission, which completes before the next one.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let res = ring.completion().next().unwrap().result();
        assert_eq!(
            usize::try_from(res).ok(),
            Some(piece.len()),
            "io_uring write"
        );
    }
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(dst.state_digest(), a.state_digest());
}

#[test]
fn several_devices_stream_concurrently_through_the_shared_mount() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let cfg = EmulatedConfig::new(format!("c{i}"), 2 << 20, i);
                let mut src = EmulatedDevice::new(cfg).unwrap();
                let mut dst = src.destination().unwrap();
                let data = stop_copy_bytes(&mut src);
                resume(&mut dst, &data).unwrap();
                assert_eq!(dst.state_digest(), src.state_digest());
                src.state_digest()
            })
        })
        .collect();
    let digests: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(digests.windows(2).all(|w| w[0] != w[1]), "seeds differ");
}

#[test]
fn background_p2p_traffic_flows_until_dropped() {
    let a = EmulatedDevice::new(small("a")).unwrap();
    let b = EmulatedDevice::new(small("b")).unwrap();
    let fabric = P2pFabric::new(vec![a.p2p_port(), b.p2p_port()]);
    let traffic = fabric.spawn(10_000).unwrap();
    let mut waited = 0;
    while fabric.stats().sent == 0 && waited < 5000 {
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    drop(traffic);
    let after = fabric.stats();
    assert!(after.sent > 0, "the background thread sent P2P writes");
    assert_eq!(after.lost, 0, "both devices run");
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(
        fabric.stats(),
        after,
        "no traffic after the handle is dropped"
    );
    assert!(a.stats().mmio_accepted + b.stats().mmio_accepted >= after.sent);
}

#[test]
fn reset_while_a_writer_streams_into_the_resuming_fd_ends_the_fd_without_deadlock() {
    let mut cfg = small("dst");
    cfg.resume_capacity = Some(u64::MAX);
    let mut dst = EmulatedDevice::new(cfg).unwrap();
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut f = File::from(fd);
        let junk = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        // Junk is refused only at RESUMING -> STOP; with no capacity limit the writes go on
        // until the fd is ended.
        loop {
            if let Err(e) = f.write_all(&junk) {
                return (sent, e.raw_os_error());
            }
            sent += junk.len() as u64;
            if sent == junk.len() as u64 {
                started_tx.send(()).unwrap();
            }
        }
    });
    started.recv().unwrap();
    dst.reset().unwrap();
    let (sent, errno) = writer.join().unwrap();
    assert!(sent > 0);
    assert_eq!(errno, Some(libc::ENODEV), "an ended RESUMING fd");
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
    // The device is usable again.
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    drop(fd);
    dst.reset().unwrap();
}

#[test]
fn mtty_quirks_keep_resuming_after_a_refusal_and_serve_mmio_in_stop() {
    let cfg = small("mtty").with_quirks(Quirks::mtty());
    let mut src = EmulatedDevice::new(cfg.clone()).unwrap();
    let mut dst = EmulatedDevice::new(cfg).unwrap();
    let good = stop_copy_bytes(&mut src);
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut f = File::from(fd);
    f.write_all(&good[..good.len() - 1]).unwrap();
    let err = dst.set_state(DeviceState::Stop).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL));
    assert_eq!(
        dst.state().unwrap(),
        DeviceState::Resuming,
        "mtty stays RESUMING"
    );
    assert!(matches!(
        dst.last_resume_error(),
        Some(StreamError::Truncated { .. })
    ));
    // Refused again until a reset.
    assert!(dst.set_state(DeviceState::Stop).is_err());
    dst.reset().unwrap();
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
    // MMIO still works in STOP.
    dst.set_state(DeviceState::Stop).unwrap();
    assert!(dst.mmio_write(8, 5));
    assert_eq!(dst.mmio_read(8), 5);
}

#[test]
fn explicit_dirtying_and_dma_writes_are_bounded_per_call_by_the_device_size() {
    let mut cfg = small("bound");
    cfg.guest = Some(GuestConfig {
        iova: 1 << 30,
        len: 16 * 4096,
        dma_pages_per_sec: 0,
        quiesce_dma_pages: 0,
    });
    let dev = EmulatedDevice::new(cfg).unwrap();
    // 1 MiB of state in 16 KiB blocks: 64 blocks.
    assert_eq!(dev.dirty_blocks(65), 64);
    assert_eq!(
        dev.dirty_blocks(u64::MAX),
        64,
        "one pass, not 2^64 under the lock"
    );
    assert_eq!(
        dev.dma_write_pages(u64::MAX).len(),
        16,
        "one write per guest page"
    );
}
