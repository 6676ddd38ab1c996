//! The real `vfmig` binary with `emu:...,data-fd=mem` devices (the emulated device's
//! memory-speed pipe data fd): a migration succeeds, a destination refuses bytes that are no
//! device state, and a spec asking that fd for PRE_COPY is a usage error.

mod common;

use common::*;

#[test]
fn memory_speed_emulated_devices_migrate_and_the_destination_accepts() {
    let dev = "emu:size=16M,profile=random,seed=5,data-fd=mem";
    let recv = Receiver::spawn(&["--device", dev, "--json", "--timeout", "30"]);
    let out = run(
        send(recv.addr, &["--device", dev, "--json", "--timeout", "30"]),
        None,
    );
    let (rstatus, rstdout, rlines) = recv.finish();
    assert!(
        out.status.success(),
        "send failed: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rstatus.success(), "recv failed: {rstatus:?} {rlines:?}");
    let s = json(&out.stdout);
    assert_eq!(s["outcome"], "ok", "{s}");
    let raw = s["devices"][0]["raw_bytes"].as_u64().expect("raw_bytes");
    assert!(raw >= 16 << 20, "{raw}");
    let r = json(rstdout.as_bytes());
    assert_eq!(r["devices"][0]["accepted"], true, "{r}");
    assert_eq!(r["devices"][0]["raw_bytes"].as_u64(), Some(raw), "{r}");
}

#[test]
fn a_memory_speed_destination_refuses_bytes_that_are_no_device_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, test_bytes(4 << 20, 9)).expect("write");
    let recv = Receiver::spawn(&["--device", "emu:size=4M,data-fd=mem", "--timeout", "10"]);
    let out = run(
        send(
            recv.addr,
            &[
                "--device",
                &format!("file:{}", junk.display()),
                "--timeout",
                "10",
            ],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(rstatus.code(), Some(1), "{rlines:?}");
    let last = rlines.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("vfmig: destination device 0 (emu) refused the state"),
        "{rlines:?}"
    );
}

#[test]
fn pre_copy_on_the_memory_speed_data_fd_is_a_usage_error() {
    let out = run(
        {
            let mut c = vfmig();
            c.args([
                "send",
                "--connect",
                "127.0.0.1:1",
                "--device",
                "emu:size=1M,data-fd=mem,precopy=512K",
            ]);
            c
        },
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data-fd=mem"), "{err}");
}
