//! `vfmig recv` survives strangers: port scans, HTTP requests, random bytes, half handshakes and
//! silent connections are each dropped with one line while the real migration completes. Real
//! processes over loopback; every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const JUNK: usize = 1000;
const JUNK_THREADS: usize = 4;

/// One junk connection of kind `i % 5`. Errors are expected (the receiver drops these, or has
/// stopped accepting once the session is up) and ignored.
fn junk(addr: SocketAddr, i: usize) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 256];
    match i % 5 {
        // A port scan (`nc -z`): connect, close.
        0 => {}
        // An HTTP request.
        1 => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: vfmig\r\n\r\n");
            let _ = s.read(&mut sink);
        }
        // Random bytes.
        2 => {
            let mut x = u64::try_from(i)
                .unwrap_or(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                | 1;
            let bytes: Vec<u8> = (0..97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = s.write_all(&bytes);
            let _ = s.read(&mut sink);
        }
        // A half handshake: a well-formed ClientHello (PSK mode), then silence and a close.
        3 => {
            let mut hello = Vec::new();
            hello.extend_from_slice(b"VMHS");
            hello.extend_from_slice(&4u16.to_le_bytes());
            hello.extend_from_slice(&[1, 0]);
            hello.extend_from_slice(&36u32.to_le_bytes());
            hello.extend_from_slice(&[i.to_le_bytes()[0] | 1; 32]);
            hello.extend_from_slice(&[1, 0, 0, 0]);
            let _ = s.write_all(&hello);
            let _ = s.read(&mut sink);
        }
        // A silent connection, held a while.
        _ => std::thread::sleep(Duration::from_millis(20)),
    }
}

#[test]
fn recv_drops_a_thousand_junk_connections_with_one_line_each_while_a_real_migration_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.bin");
    let data = test_bytes(48 << 20, 9);
    std::fs::write(&src, &data).expect("write");
    let dst = out_dir.path().join("d.bin");
    let key = write_key(dir.path(), "k", "0123456789abcdef0123456789abcdef");
    let mut recv = Receiver::spawn(&[
        "--device",
        &format!("file:{}", dst.display()),
        "--psk-file",
        &key,
        "--timeout",
        "30",
        "--accept-timeout",
        "60",
    ]);
    let addr = recv.addr;
    let started = Arc::new(AtomicUsize::new(0));
    let junkers: Vec<_> = (0..JUNK_THREADS)
        .map(|t| {
            let started = started.clone();
            std::thread::spawn(move || {
                for k in 0..JUNK / JUNK_THREADS {
                    started.fetch_add(1, Ordering::SeqCst);
                    junk(addr, k * JUNK_THREADS + t);
                }
            })
        })
        .collect();
    // The real source arrives while the junk is in full swing; its rate is capped so that the
    // migration takes a while and the junk goes on during it.
    while started.load(Ordering::SeqCst) < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = run(
        send(
            addr,
            &[
                "--device",
                &format!("file:{}", src.display()),
                "--psk-file",
                &key,
                "--timeout",
                "30",
                "--max-bandwidth",
                "300M",
            ],
        ),
        None,
    );
    let first = recv.wait_for_line("vfmig: dropped connection from 127.0.0.1:");
    for j in junkers {
        j.join().expect("junk thread");
    }
    let (rstatus, _, rlines) = recv.finish();
    assert!(
        out.status.success(),
        "send failed: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rstatus.success(), "recv failed: {rstatus:?} {rlines:?}");
    assert!(
        std::fs::read(&dst).expect("destination file") == data,
        "bytes differ"
    );
    let dropped = rlines
        .iter()
        .filter(|l| l.starts_with("vfmig: dropped connection from 127.0.0.1:"))
        .count();
    assert!(
        dropped >= 50,
        "strangers logged one line each: {dropped}, first {first:?}"
    );
    assert_eq!(started.load(Ordering::SeqCst), JUNK);
}
