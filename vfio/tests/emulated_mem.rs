//! The memory-speed data fd (`DataFdBackend::Mem`, a pipe served by a device thread): what it
//! refuses, that it streams exactly the FUSE fd's bytes, io_uring at offset -1 both ways, and
//! that its validation and stream endings behave as documented.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use vfmig_vfio::emulated::{
    DataFdBackend, EmulatedConfig, EmulatedDevice, EmulatedError, Faults, Profile, Quirks,
    StreamError,
};
use vfmig_vfio::{DeviceError, DeviceState, MigrationDevice};

fn mem(name: &str) -> EmulatedConfig {
    EmulatedConfig::new(name, 4 << 20, 9)
        .with_block_size(16 << 10)
        .with_profile(Profile::Random)
        .with_precopy(None)
        .with_data_fd(DataFdBackend::Mem)
}

fn read_all(f: &File) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
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

fn resume(dst: &mut EmulatedDevice, data: &[u8]) -> Result<(), DeviceError> {
    dst.reset().unwrap();
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut f = File::from(fd);
    for piece in data.chunks(10_007) {
        f.write_all(piece).unwrap();
    }
    dst.set_state(DeviceState::Stop).map(|_| ())
}

#[test]
fn configs_a_pipe_cannot_honour_are_refused_with_a_typed_error() {
    let cases = [
        (
            mem("pre").with_precopy(Some(u64::MAX)),
            "PRE_COPY (precopy)",
        ),
        (
            mem("eio").with_faults(Faults {
                read_error_at: Some(10),
                ..Faults::default()
            }),
            "read-error-at",
        ),
        (
            mem("short").with_quirks(Quirks {
                short_reads: true,
                ..Quirks::uapi()
            }),
            "the short-reads quirk",
        ),
    ];
    for (cfg, want) in cases {
        match EmulatedDevice::new(cfg) {
            Err(EmulatedError::MemDataFd { feature, why }) => {
                assert_eq!(feature, want);
                assert!(!why.is_empty());
            }
            other => panic!("{want}: expected MemDataFd, got {other:?}"),
        }
    }
    // The default config has PRE_COPY: asking for the memory-speed fd alone is refused too.
    let default_caps = EmulatedConfig::new("d", 1 << 20, 1).with_data_fd(DataFdBackend::Mem);
    assert!(matches!(
        EmulatedDevice::new(default_caps),
        Err(EmulatedError::MemDataFd { .. })
    ));
}

#[test]
fn the_memory_speed_fd_streams_exactly_the_fuse_fds_bytes_and_needs_no_mount() {
    let mut m = EmulatedDevice::new(mem("m")).unwrap();
    let mut f = EmulatedDevice::new(mem("f").with_data_fd(DataFdBackend::Fuse)).unwrap();
    assert_eq!(m.data_fd_backend(), DataFdBackend::Mem);
    assert_eq!(m.data_fd_mountpoint(), std::path::PathBuf::new());
    let a = stop_copy_bytes(&mut m);
    let b = stop_copy_bytes(&mut f);
    assert_eq!(a.len(), b.len());
    assert!(a == b, "same config, same stream whatever the fd");
    assert_eq!(m.stats().max_read_request, 0, "no FUSE requests");
    // Each resumes on the other backend.
    let mut dm = m.destination().unwrap();
    let mut df = f.destination().unwrap();
    resume(&mut dm, &b).unwrap();
    resume(&mut df, &a).unwrap();
    assert_eq!(dm.state_digest(), m.state_digest());
    assert_eq!(df.state_digest(), m.state_digest());
}

#[test]
fn fd_semantics_match_a_vfio_migration_file() {
    let mut dev = EmulatedDevice::new(mem("sem")).unwrap();
    let fd = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    let mut b = [0u8; 8];
    assert_eq!(
        fd.read_at(&mut b, 0).unwrap_err().raw_os_error(),
        Some(libc::ESPIPE)
    );
    assert_eq!(
        (&fd).write(&b).unwrap_err().raw_os_error(),
        Some(libc::EBADF),
        "the saving fd is O_RDONLY"
    );
    let data = read_all(&fd).unwrap();
    assert_eq!(data.len() as u64, {
        let mut d = EmulatedDevice::new(mem("sem")).unwrap();
        d.stop_copy_size().unwrap()
    });
    assert_eq!((&fd).read(&mut b).unwrap(), 0, "0 again after the end");
    dev.set_state(DeviceState::Stop).unwrap();

    let mut dst = dev.destination().unwrap();
    let w = File::from(dst.set_state(DeviceState::Resuming).unwrap().unwrap());
    assert_eq!(
        w.write_at(&b, 0).unwrap_err().raw_os_error(),
        Some(libc::ESPIPE)
    );
    assert_eq!(
        (&w).read(&mut b).unwrap_err().raw_os_error(),
        Some(libc::EBADF),
        "the resuming fd is O_WRONLY"
    );
    (&w).write_all(&data).unwrap();
    // No close, no wait: RESUMING -> STOP takes what the pipe still holds.
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(dst.state_digest(), dev.state_digest());
}

#[test]
fn io_uring_reads_and_writes_at_offset_minus_one_with_iosqe_async() {
    use io_uring::{opcode, squeue, types, IoUring};
    let mut a = EmulatedDevice::new(mem("uring")).unwrap();
    let fd: OwnedFd = a.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut ring = IoUring::new(4).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = Vec::new();
    loop {
        let sqe = opcode::Read::new(
            types::Fd(fd.as_raw_fd()),
            buf.as_mut_ptr(),
            u32::try_from(buf.len()).unwrap(),
        )
        .offset(u64::MAX)
        .build()
        .flags(squeue::Flags::ASYNC);
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
    a.set_state(DeviceState::Stop).unwrap();
    let mut dst = a.destination().unwrap();
    let wfd: OwnedFd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    for piece in got.chunks(1 << 20) {
        let mut at = 0;
        while at < piece.len() {
            let sqe = opcode::Write::new(
                types::Fd(wfd.as_raw_fd()),
                piece[at..].as_ptr(),
                u32::try_from(piece.len() - at).unwrap(),
            )
            .offset(u64::MAX)
            .build()
            .flags(squeue::Flags::ASYNC);
            // SAFETY: `piece` outlives the submission, which completes before the next one.
            unsafe { ring.submission().push(&sqe).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let res = ring.completion().next().unwrap().result();
            assert!(res > 0, "io_uring write: {res}");
            at += usize::try_from(res).unwrap();
        }
    }
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(dst.state_digest(), a.state_digest());
}

/// What a refusal's reason must match.
type Want = fn(&StreamError) -> bool;

#[test]
fn damaged_streams_are_refused_at_resuming_to_stop() {
    let mut src = EmulatedDevice::new(mem("src")).unwrap();
    let data = stop_copy_bytes(&mut src);
    let mut dst = src.destination().unwrap();
    let mut flipped = data.clone();
    flipped[data.len() / 2] ^= 0x40;
    let cases: [(&[u8], Want); 3] = [
        (&data[..data.len() - 1], |e| {
            matches!(e, StreamError::Truncated { .. })
        }),
        (&flipped, |e| {
            matches!(
                e,
                StreamError::PayloadHash { .. } | StreamError::BadHeader { .. }
            )
        }),
        (&[], |e| matches!(e, StreamError::Truncated { .. })),
    ];
    for (bytes, want) in cases {
        let err = resume(&mut dst, bytes).expect_err("a damaged stream is refused");
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert_eq!(dst.state().unwrap(), DeviceState::Error);
        let why = dst.last_resume_error().expect("a reason");
        assert!(want(&why), "{why:?}");
        assert_eq!(dst.state_digest(), None);
    }
    resume(&mut dst, &data).unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());
}

#[test]
fn bytes_after_the_end_record_or_past_capacity_make_the_resume_fail() {
    let mut src = EmulatedDevice::new(mem("src")).unwrap();
    let data = stop_copy_bytes(&mut src);
    let mut dst = src.destination().unwrap();
    let mut extra = data.clone();
    extra.extend_from_slice(&[0u8; 100]);
    let err = resume(&mut dst, &extra).expect_err("trailing bytes are refused");
    assert_eq!(err.errno(), Some(libc::EINVAL));
    assert_eq!(
        dst.last_resume_error(),
        Some(StreamError::Overflow {
            bytes: 100,
            capacity: 4 * data.len() as u64
        })
    );
    let mut cfg = mem("cap");
    cfg.resume_capacity = Some(1000);
    let mut small = EmulatedDevice::new(cfg).unwrap();
    resume(&mut small, &data).expect_err("past capacity");
    assert!(matches!(
        small.last_resume_error(),
        Some(StreamError::Overflow { capacity: 1000, .. })
    ));
}

#[test]
fn a_stream_ended_early_reads_what_the_pipe_holds_then_zero() {
    let mut dev = EmulatedDevice::new(mem("early")).unwrap();
    let fd = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    // Nobody reads: the generator fills the pipe and waits. Ending the stream ends it.
    dev.set_state(DeviceState::Stop).unwrap();
    let got = read_all(&fd).unwrap();
    assert!((got.len() as u64) < dev.stop_copy_size().unwrap());
    // Dropping the device mid-stream ends the fd as well.
    let fd = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    drop(dev);
    read_all(&fd).unwrap();
}

#[test]
fn early_end_and_slow_faults_work_through_the_pipe() {
    let mut early = EmulatedDevice::new(mem("e").with_faults(Faults {
        early_end_at: Some(100_000),
        ..Faults::default()
    }))
    .unwrap();
    assert_eq!(stop_copy_bytes(&mut early).len(), 100_000);
    let mut slow = EmulatedDevice::new(mem("s").with_faults(Faults {
        slow_bytes_per_sec: Some(64 << 20),
        ..Faults::default()
    }))
    .unwrap();
    let data = stop_copy_bytes(&mut slow);
    let mut dst = slow.destination().unwrap();
    resume(&mut dst, &data).unwrap();
    assert_eq!(dst.state_digest(), slow.state_digest());
}

#[test]
fn reset_while_a_writer_streams_into_the_resuming_fd_ends_it_with_epipe() {
    let mut cfg = mem("dst");
    cfg.resume_capacity = Some(u64::MAX);
    let mut dst = EmulatedDevice::new(cfg).unwrap();
    let fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut f = File::from(fd);
        let junk = vec![0u8; 64 << 10];
        let mut sent = 0u64;
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
    assert_eq!(errno, Some(libc::EPIPE), "an ended RESUMING pipe");
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn several_memory_speed_devices_stream_concurrently() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut src = EmulatedDevice::new(mem(&format!("c{i}"))).unwrap();
                let data = stop_copy_bytes(&mut src);
                let mut dst = src.destination().unwrap();
                resume(&mut dst, &data).unwrap();
                assert_eq!(dst.state_digest(), src.state_digest());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_reader_that_enlarges_the_pipe_still_reads_the_exact_stream() {
    // The generator reuses a spliced buffer only once the reader consumed it; a bigger pipe
    // (here the reader's doing) makes it fall back to copying. Either way the bytes are exact.
    let cfg = mem("big").with_block_size(64 << 10);
    let want = stop_copy_bytes(
        &mut EmulatedDevice::new(cfg.clone().with_data_fd(DataFdBackend::Fuse)).unwrap(),
    );
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    let fd = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    // SAFETY: fcntl(F_SETPIPE_SZ) on the pipe we were given; no pointers. It fails beyond
    // /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: then only the normal path runs.
    let enlarged = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 4 << 20) } >= 4 << 20;
    // Let the generator run ahead (bounded wait, no assertion on time): until the pipe holds
    // more than two buffers' worth or about a second passed.
    for _ in 0..if enlarged { 100 } else { 0 } {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`.
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        if n > 2 << 20 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let got = read_all(&fd).unwrap();
    assert!(
        got == want,
        "exact stream ({} vs {} bytes)",
        got.len(),
        want.len()
    );
    dev.set_state(DeviceState::Stop).unwrap();
}
