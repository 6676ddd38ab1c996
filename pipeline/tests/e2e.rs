//! End to end over loopback TCP: emulated devices (FUSE-backed data fds) on both sides, the real
//! transport, the whole pipeline. A transfer is proven correct by the destination device accepting
//! the stream (RESUMING -> STOP validates it) and by equal state digests.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    Compress, DestinationOptions, DestinationSession, PipelineError, Report, SourceOptions,
    SourceSession,
};
use vfmig_transport::{Listener, SessionConfig};
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};
use vfmig_vfio::{DeviceState, MigrationDevice};

fn session_config() -> SessionConfig {
    SessionConfig {
        pool_slots: 24,
        slot_size: 256 << 10,
        window_bytes: 4 << 20,
        timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(1),
        ..SessionConfig::default()
    }
}

fn source_options() -> SourceOptions {
    SourceOptions {
        session: session_config(),
        timeout: Duration::from_secs(10),
        ..SourceOptions::default()
    }
}

fn destination_options() -> DestinationOptions {
    DestinationOptions {
        session: session_config(),
        timeout: Duration::from_secs(10),
        ..DestinationOptions::default()
    }
}

fn device(name: &str, size: u64, profile: Profile, seed: u64) -> EmulatedDevice {
    EmulatedDevice::new(EmulatedConfig {
        name: name.to_owned(),
        size,
        seed,
        profile,
        precopy: None,
        ..EmulatedConfig::default()
    })
    .expect("emulated device")
}

type Outcome = (
    Result<Report, PipelineError>,
    Vec<EmulatedDevice>,
    Result<Report, PipelineError>,
    Vec<EmulatedDevice>,
);

/// Runs a source and a destination session over loopback.
fn migrate(
    sources: Vec<EmulatedDevice>,
    sopts: SourceOptions,
    dopts: DestinationOptions,
) -> Outcome {
    let destinations: Vec<EmulatedDevice> = sources
        .iter()
        .map(|d| d.destination().expect("destination device"))
        .collect();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = listener.local_addr();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(destinations, dopts);
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut src = SourceSession::new(sources, sopts);
    let sr = src.run(addr);
    let (dr, dsts) = dst.join().unwrap();
    (sr, src.into_devices(), dr, dsts)
}

fn state(d: &mut EmulatedDevice) -> DeviceState {
    d.state().unwrap()
}

#[test]
fn mixed_zero_and_random_devices_are_accepted_by_the_destination_with_equal_digests() {
    for (profile, compress) in [
        (Profile::Mixed, Compress::Auto),
        (Profile::Zero, Compress::Zstd(3)),
        (Profile::Random, Compress::Lz4),
        (Profile::Text, Compress::None),
    ] {
        let src = device("emu0", 8 << 20, profile, 11);
        let sopts = SourceOptions {
            compress,
            ..source_options()
        };
        let (sr, mut srcs, dr, mut dsts) = migrate(vec![src], sopts, destination_options());
        let report = sr.unwrap_or_else(|e| {
            panic!(
                "{profile:?}: source failed: {e}; destination device says {:?}",
                dsts[0].last_resume_error()
            )
        });
        let dreport = dr.unwrap_or_else(|e| panic!("{profile:?}: destination failed: {e}"));
        assert_eq!(state(&mut srcs[0]), DeviceState::Stop);
        assert_eq!(state(&mut dsts[0]), DeviceState::Stop);
        assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
        assert_eq!(report.raw_bytes, dreport.raw_bytes);
        assert!(report.raw_bytes >= 8 << 20);
        assert!(report.downtime.is_some());
        if profile == Profile::Zero {
            assert!(report.ratio > 10.0, "zero state compresses: {report:?}");
        }
        if profile == Profile::Random {
            assert!(report.ratio < 1.05, "random state goes raw: {report:?}");
        }
    }
}
