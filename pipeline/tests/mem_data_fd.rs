//! End to end over loopback TCP with the emulated device's memory-speed data fd
//! (`DataFdBackend::Mem`: a pipe served by a device thread) on one or both sides: the pipeline
//! reads and writes it with io_uring at offset -1 like any data fd, the destination device
//! validates the stream at RESUMING -> STOP, and a corrupt stream is refused there.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread;

use vfmig_pipeline::{
    AbortReason, DestinationOptions, DestinationSession, PipelineError, Report, SourceOptions,
    SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::device::Identity;
use vfmig_vfio::emulated::{DataFdBackend, EmulatedConfig, EmulatedDevice, Profile, StreamError};
use vfmig_vfio::{DeviceError, DeviceState, MigrationCaps, MigrationDevice};

mod common;
use common::{destination_options, source_options};

fn device(name: &str, size: u64, profile: Profile, data_fd: DataFdBackend) -> EmulatedDevice {
    EmulatedDevice::new(
        EmulatedConfig::new(name, size, 21)
            .with_profile(profile)
            .with_precopy(None)
            .with_data_fd(data_fd),
    )
    .expect("emulated device")
}

type Outcome<S, D> = (
    Result<Report, PipelineError>,
    Vec<S>,
    Result<Report, PipelineError>,
    Vec<D>,
);

fn migrate<S, D>(sources: Vec<S>, destinations: Vec<D>) -> Outcome<S, D>
where
    S: MigrationDevice,
    D: MigrationDevice + Send + 'static,
{
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = listener.local_addr();
    let dopts: DestinationOptions = destination_options();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(destinations, dopts);
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let sopts: SourceOptions = source_options();
    let mut src = SourceSession::new(sources, sopts);
    let sr = src.run(addr);
    let (dr, dsts) = dst.join().unwrap();
    (sr, src.into_devices(), dr, dsts)
}

#[test]
fn memory_speed_devices_migrate_and_the_destination_accepts_them_with_equal_digests() {
    for profile in [Profile::Random, Profile::Mixed] {
        let a = device("gpu0", 16 << 20, profile, DataFdBackend::Mem);
        let b = device("nic0", 4 << 20, Profile::Text, DataFdBackend::Mem);
        let dsts = vec![a.destination().unwrap(), b.destination().unwrap()];
        let (sr, mut srcs, dr, mut dsts) = migrate(vec![a, b], dsts);
        let report = sr.unwrap_or_else(|e| {
            panic!(
                "{profile:?}: source failed: {e}; destination says {:?}",
                dsts[0].last_resume_error()
            )
        });
        let dreport = dr.unwrap_or_else(|e| panic!("{profile:?}: destination failed: {e}"));
        assert_eq!(report.raw_bytes, dreport.raw_bytes);
        assert!(report.raw_bytes >= 20 << 20);
        for (s, d) in srcs.iter_mut().zip(dsts.iter_mut()) {
            assert_eq!(s.state().unwrap(), DeviceState::Stop);
            assert_eq!(d.state().unwrap(), DeviceState::Stop);
            assert_eq!(s.state_digest(), d.state_digest());
            assert!(d.state_digest().is_some());
        }
    }
}

#[test]
fn a_memory_speed_source_migrates_to_a_fuse_destination_and_back() {
    for (from, to) in [
        (DataFdBackend::Mem, DataFdBackend::Fuse),
        (DataFdBackend::Fuse, DataFdBackend::Mem),
    ] {
        let src = device("emu0", 8 << 20, Profile::Mixed, from);
        let dst = device("emu0-dst", 8 << 20, Profile::Mixed, to);
        let (sr, srcs, dr, dsts) = migrate(vec![src], vec![dst]);
        sr.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
        dr.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
        assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
    }
}

/// A source device whose STOP_COPY stream has one byte flipped on its way out of the device
/// (the data fd it returns is a socket fed from the real one): the pipeline carries the corrupt
/// bytes faithfully (its own digest covers what it read), so only the destination device can
/// notice.
#[derive(Debug)]
struct Corrupting {
    inner: EmulatedDevice,
    at: u64,
}

impl MigrationDevice for Corrupting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn identity(&self) -> Identity {
        self.inner.identity()
    }
    fn capabilities(&self) -> MigrationCaps {
        self.inner.capabilities()
    }
    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, std::io::Error> {
        let Some(fd) = self.inner.set_single_state(next)? else {
            return Ok(None);
        };
        let (ours, theirs) = UnixStream::pair()?;
        let at = self.at;
        thread::spawn(move || {
            let (mut from, mut to) = (File::from(fd), ours);
            let mut buf = vec![0u8; 256 << 10];
            let mut offset = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if (offset..offset + n as u64).contains(&at) {
                    buf[usize::try_from(at - offset).unwrap()] ^= 0x01;
                }
                offset += n as u64;
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        Ok(Some(OwnedFd::from(theirs)))
    }
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        self.inner.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.inner.reset()
    }
}

#[test]
fn a_corrupt_stream_is_refused_by_the_memory_speed_destination_and_both_sides_roll_back() {
    let inner = device("emu0", 8 << 20, Profile::Mixed, DataFdBackend::Mem);
    let dst = inner.destination().unwrap();
    // A byte in the middle of the stream: inside some block's payload.
    let src = Corrupting { inner, at: 4 << 20 };
    let (sr, mut srcs, dr, mut dsts) = migrate(vec![src], vec![dst]);
    assert!(
        matches!(
            sr.as_ref().unwrap_err(),
            PipelineError::PeerAborted {
                reason: AbortReason::DeviceRefused,
                ..
            }
        ),
        "{:?}",
        sr.as_ref().err()
    );
    assert!(
        matches!(
            dr.as_ref().unwrap_err(),
            PipelineError::DeviceRefused { .. }
        ),
        "{:?}",
        dr.as_ref().err()
    );
    let why = dsts[0].last_resume_error().expect("the device says why");
    assert!(
        matches!(
            why,
            StreamError::PayloadHash { .. } | StreamError::BadHeader { .. }
        ),
        "{why:?}"
    );
    // Rolled back: the source runs again, the destination was reset.
    assert_eq!(srcs[0].state().unwrap(), DeviceState::Running);
    assert_eq!(dsts[0].state().unwrap(), DeviceState::Running);
}
