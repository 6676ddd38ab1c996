//! An on-path attacker between two real `vfmig` processes with a PSK: a TCP proxy that changes a
//! byte of the first device-state payload and recomputes the frame's CRC32C. The receiver refuses
//! the frame before anything reaches its device, both sides exit 1, and nothing is left at the
//! destination path. Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// Header (40) and AES-256-GCM tag (16) before each sealed frame's payload (PROTOCOL.md 4.2).
const HEAD: usize = 56;

fn read_n(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok().map(|()| b)
}

/// Source -> destination: the two handshake messages pass, then the first data frame with a
/// payload gets one byte changed and its CRC field recomputed; everything else passes.
fn tamper(mut down: TcpStream, mut up: TcpStream) {
    for _ in 0..2 {
        let Some(env) = read_n(&mut down, 12) else {
            return;
        };
        let body = u32::from_le_bytes([env[8], env[9], env[10], env[11]]) as usize;
        let Some(b) = read_n(&mut down, body) else {
            return;
        };
        if up.write_all(&[env, b].concat()).is_err() {
            return;
        }
    }
    let mut done = false;
    while let Some(mut f) = read_n(&mut down, HEAD) {
        let len = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
        let Some(p) = read_n(&mut down, len) else {
            return;
        };
        f.extend_from_slice(&p);
        // kind 2 = StopCopyData
        if !done && f[4] == 2 && len > 0 {
            done = true;
            f[HEAD + len / 2] ^= 0x01;
            let crc = crc32c_of(&f[..36], &f[HEAD..]);
            f[36..40].copy_from_slice(&crc.to_le_bytes());
        }
        if up.write_all(&f).is_err() {
            return;
        }
    }
    let _ = up.shutdown(Shutdown::Write);
}

/// CRC32C (Castagnoli), bitwise: what an attacker fixing up the frame check computes.
fn crc32c_of(a: &[u8], b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in a.iter().chain(b) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn proxy(target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        // One connection (the default --streams 1).
        let Ok((down, _)) = l.accept() else { return };
        let Ok(up) = TcpStream::connect(target) else {
            return;
        };
        let (mut d2, mut u2) = (
            down.try_clone().expect("clone"),
            up.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut d2);
            let _ = d2.shutdown(Shutdown::Write);
        });
        let _ = down.set_read_timeout(Some(Duration::from_secs(30)));
        tamper(down, up);
    });
    addr
}

#[test]
fn a_payload_byte_changed_on_the_path_with_the_crc_fixed_is_refused_before_the_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.bin");
    std::fs::write(&src, test_bytes(8 << 20, 5)).expect("write");
    let dst = out_dir.path().join("d.bin");
    let key = write_key(
        dir.path(),
        "k",
        "an on-path attacker does not hold this key",
    );
    let recv = Receiver::spawn(&[
        "--device",
        &format!("file:{}", dst.display()),
        "--psk-file",
        &key,
        "--timeout",
        "10",
    ]);
    let via = proxy(recv.addr);
    let out = run(
        send(
            via,
            &[
                "--device",
                &format!("file:{}", src.display()),
                "--psk-file",
                &key,
                "--compress",
                "none",
                "--timeout",
                "10",
            ],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert_eq!(out.status.code(), Some(1), "send must fail");
    assert_eq!(rstatus.code(), Some(1), "recv must fail: {rlines:?}");
    let last = rlines.last().cloned().unwrap_or_default();
    assert!(
        last.contains("failed authentication") && last.contains("nothing of it reached a device"),
        "{rlines:?}"
    );
    assert!(!dst.exists(), "nothing at the destination path");
    assert!(
        dir_entries(out_dir.path()).is_empty(),
        "no temporary file left either"
    );
}
