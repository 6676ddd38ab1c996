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

/// Runs the destination side against `bytes` written by a raw socket; returns its error.
fn destination_fed(bytes: Vec<u8>) -> (RefError, EmulatedDevice) {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let feeder = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&bytes).expect("write");
        // End of our stream, as a source that died would leave it; then wait for the verdict.
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut ack = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut ack);
    });
    let mut dst = devices::destination(SIZE).expect("destination device");
    let err = vfmig_benches::reference::recv_from(&mut dst, &listener, &RefConfig::default())
        .expect_err("bad stream refused");
    feeder.join().expect("feeder");
    (err, dst)
}

#[test]
fn reference_destination_refuses_unknown_record_flag_and_resets_device() {
    let mut bytes = 0x1234_u64.to_be_bytes().to_vec();
    bytes.extend_from_slice(&8u64.to_be_bytes());
    let (err, mut dst) = destination_fed(bytes);
    assert!(
        matches!(
            err,
            RefError::BadFlag {
                flag: 0x1234,
                offset: 0
            }
        ),
        "{err}"
    );
    assert_eq!(dst.state().expect("state"), DeviceState::Running);
}

#[test]
fn reference_destination_refuses_record_longer_than_its_buffer() {
    let mut bytes = vfmig_benches::reference::FLAG_DEV_DATA_STATE
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&(REF_CHUNK as u64 + 1).to_be_bytes());
    let (err, _) = destination_fed(bytes);
    assert!(matches!(err, RefError::RecordTooLong { .. }), "{err}");
}

#[test]
fn reference_destination_refuses_stream_cut_mid_record() {
    let mut bytes = vfmig_benches::reference::FLAG_DEV_DATA_STATE
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&4096u64.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 100]);
    let (err, mut dst) = destination_fed(bytes);
    assert!(matches!(err, RefError::Socket { op: "read", .. }), "{err}");
    assert_eq!(dst.state().expect("state"), DeviceState::Running);
}
