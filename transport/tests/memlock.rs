//! Without `CAP_IPC_LOCK` and with a small `RLIMIT_MEMLOCK` (an unprivileged VMM), the pool
//! cannot be registered with the ring; the session must still work, only without fixed-buffer
//! zero-copy. The outer test re-executes this binary under `prlimit` and `setpriv` (util-linux);
//! without them it says so and does nothing.
#![allow(clippy::cast_possible_truncation)] // test data sizes are small

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vfmig_transport::{SendSession, SessionConfig, TransportError};

const ENV_INNER: &str = "VFMIG_MEMLOCK_INNER";

#[test]
fn sessions_work_when_the_pool_cannot_be_registered() {
    if std::env::var_os(ENV_INNER).is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("prlimit")
        .arg("--memlock=65536:65536")
        .args([
            "setpriv",
            "--bounding-set",
            "-ipc_lock",
            "--inh-caps",
            "-ipc_lock",
        ])
        .arg(exe)
        .args(["--exact", "memlock_inner", "--ignored", "--nocapture"])
        .env(ENV_INNER, "1")
        .status();
    match status {
        Ok(s) => assert!(s.success(), "inner run failed: {s}"),
        Err(e) => eprintln!("memlock test not run: prlimit/setpriv unavailable ({e})"),
    }
}

#[test]
#[ignore = "runs under prlimit/setpriv, started by the test above"]
fn memlock_inner() {
    if std::env::var_os(ENV_INNER).is_none() {
        return;
    }
    // 8 x 64 KiB = 512 KiB to pin, far above the 64 KiB limit.
    let c = SessionConfig {
        zerocopy_min: 4096,
        pool_slots: 8,
        ..cfg(2)
    };
    let (l, addr) = listen();
    let dst = accept_in_thread(l, c.clone());
    let src = SendSession::connect(addr, &c, devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    let rx = std::thread::spawn(move || {
        for seq in 0..50 {
            let f = dst.recv(Duration::from_secs(5)).unwrap();
            assert_eq!(f.header.seq, seq);
            assert_eq!(
                f.payload.unwrap().as_slice(),
                &pattern(0, seq, 60 << 10)[..]
            );
        }
        assert!(matches!(
            dst.recv(Duration::from_secs(5)),
            Err(TransportError::Closed)
        ));
    });
    for seq in 0..50 {
        send_data(&src, 0, seq, 60 << 10);
    }
    let stats = src.close().unwrap();
    rx.join().unwrap();
    // Zero-copy was asked for but the buffers are not registered: every send copied.
    assert_eq!(stats.zerocopy_sends, 0);
}
