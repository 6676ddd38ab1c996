//! A process that exits (or is killed) while a data fd read is in flight must still exit, and its
//! FUSE mount must go away. The device's FUSE server runs in the exiting process, so this needs
//! the watchdog (see `emulated::fuse`).

use std::fs::File;
use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Faults};
use vfmig_vfio::{DeviceState, MigrationDevice};

const CHILD_ENV: &str = "VFMIG_EMU_EXIT_CHILD";

/// The child: signals blocked, a slow device (replies are held back on a device thread), a reader
/// thread blocked in `read()`, then `exit(0)` with the read in flight.
fn child() -> ! {
    // Like a VMM or the CLI with a signal thread: SIGINT and SIGTERM blocked in every thread.
    // The watchdog must still get its SIGTERM.
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises `set`.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `set` was initialised above.
        unsafe { libc::sigaddset(set.as_mut_ptr(), sig) };
    }
    // SAFETY: `set` is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut()) };
    let faults = Faults {
        slow_bytes_per_sec: Some(1024),
        ..Faults::default()
    };
    let cfg = EmulatedConfig::new("exit", 1 << 20, 1).with_faults(faults);
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    println!("mount {}", dev.data_fd_mountpoint().display());
    let fd = dev.set_state(DeviceState::StopCopy).unwrap().unwrap();
    std::thread::spawn(move || {
        let mut f = File::from(fd);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let _ = f.read(&mut buf);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    std::process::exit(0);
}

#[test]
fn process_exit_with_a_read_in_flight_completes_and_unmounts() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "process_exit_with_a_read_in_flight_completes_and_unmounts",
        "--nocapture",
    ])
    .env(CHILD_ENV, "1")
    .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "child {} did not exit: stuck on its own FUSE mount",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mount = out
        .lines()
        .find_map(|l| l.strip_prefix("mount "))
        .expect("child printed its mount point")
        .to_owned();
    // The watchdog detaches the mount when the child's threads die; allow it to finish.
    let gone = (0..500).any(|_| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if mounts.contains(&mount) {
            std::thread::sleep(Duration::from_millis(20));
            false
        } else {
            true
        }
    });
    assert!(gone, "{mount} still mounted");
}
