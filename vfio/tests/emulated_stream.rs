//! EmulatedDevice data fd behaviour through the kernel (FUSE): transfers, errnos, faults.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};
use vfmig_vfio::{DeviceState, MigrationDevice};

fn copy_stream(src: OwnedFd, dst: OwnedFd, chunk: usize) -> u64 {
    let mut r = File::from(src);
    let mut w = File::from(dst);
    let mut buf = vec![0u8; chunk];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).expect("read data fd");
        if n == 0 {
            return total;
        }
        w.write_all(&buf[..n]).expect("write resume fd");
        total += n as u64;
    }
}

#[test]
fn stop_copy_transfer_is_accepted_and_digests_match() {
    let cfg = EmulatedConfig::new("t0", 4 << 20, 7).with_profile(Profile::Mixed);
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let mut dst = src.destination().unwrap();
    let want = src.stop_copy_size().unwrap();
    let rfd = src
        .set_state(DeviceState::StopCopy)
        .unwrap()
        .expect("STOP_COPY data fd");
    let wfd = dst
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("RESUMING data fd");
    let n = copy_stream(rfd, wfd, 1 << 20);
    assert_eq!(n, want, "stop_copy_size must equal the bytes streamed");
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(src.state_digest(), dst.state_digest());
    assert!(dst.state_digest().is_some());
}

#[test]
fn data_fd_is_a_stream_pread_gives_espipe() {
    let mut src = EmulatedDevice::new(EmulatedConfig::new("t1", 1 << 20, 1)).unwrap();
    let fd = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let f = File::from(fd);
    let mut buf = [0u8; 64];
    let e = f.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ESPIPE));
    let e = (&f).write(&buf).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EBADF),
        "saving fd is read-only"
    );
}

fn zstd_ratio(profile: Profile) -> f64 {
    let cfg = EmulatedConfig::new("z", 8 << 20, 99).with_profile(profile);
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    let mut f = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
    let mut data = Vec::new();
    f.read_to_end(&mut data).unwrap();
    // Compress in 1 MiB chunks, as the pipeline does.
    let packed: usize = data
        .chunks(1 << 20)
        .map(|c| zstd::bulk::compress(c, 1).unwrap().len())
        .sum();
    data.len() as f64 / packed as f64
}

#[test]
fn profiles_have_their_compressibility_with_zstd_level_1() {
    let mixed = zstd_ratio(Profile::Mixed);
    assert!((2.2..3.0).contains(&mixed), "mixed {mixed:.2}:1");
    let random = zstd_ratio(Profile::Random);
    assert!(random < 1.01, "random {random:.3}:1");
    let zero = zstd_ratio(Profile::Zero);
    assert!(zero > 10.0, "zero {zero:.1}:1");
    let text = zstd_ratio(Profile::Text);
    assert!(text > 3.0, "text {text:.1}:1");
    eprintln!("zstd-1 ratios: mixed {mixed:.2} random {random:.3} zero {zero:.1} text {text:.2}");
}
