//! The reference loop moves an emulated device's state over real TCP and the destination device
//! accepts it; a broken stream is refused and the source walks back to RUNNING.

use vfmig_benches::devices;
use vfmig_benches::reference::{run_loopback, RefConfig, RefError, REF_CHUNK};
use vfmig_vfio::emulated::{EmulatedDevice, Faults};
use vfmig_vfio::{DeviceState, MigrationDevice};

const SIZE: u64 = 8 << 20;

#[test]
fn reference_loop_migrates_mixed_state_and_destination_accepts_it() {
    let mut src = devices::source(SIZE, "mixed").expect("source device");
    let mut dst = devices::destination(SIZE).expect("destination device");
    let expected = src.stop_copy_size().expect("stop_copy_size");
    let (s, d) = run_loopback(&mut src, &mut dst, &RefConfig::default()).expect("migration");
    assert_eq!(s.bytes, expected);
    assert_eq!(d.bytes, expected);
    assert!(s.records >= expected.div_ceil(REF_CHUNK as u64));
    assert_eq!(src.state().expect("state"), DeviceState::Stop);
    assert_eq!(dst.state().expect("state"), DeviceState::Stop);
    assert!(src.state_digest().is_some());
    assert_eq!(src.state_digest(), dst.state_digest());
}

#[test]
fn reference_loop_truncated_stream_is_refused_and_source_returns_to_running() {
    let mut src = devices::source(SIZE, "random").expect("source device");
    src.set_faults(Faults {
        early_end_at: Some(SIZE / 2),
        ..Faults::default()
    });
    let mut dst: EmulatedDevice = devices::destination(SIZE).expect("destination device");
    let err = run_loopback(&mut src, &mut dst, &RefConfig::default()).expect_err("refused");
    assert!(matches!(err, RefError::Refused { .. }), "{err}");
    assert_eq!(src.state().expect("state"), DeviceState::Running);
    assert_eq!(dst.state().expect("state"), DeviceState::Running);
}
