//! PSK sessions seal every frame (AES-256-GCM, docs/PROTOCOL.md section 4.2). An on-path attacker
//! (a TCP proxy in the test) that changes, replays or moves frames is refused, and nothing of the
//! frame it touched is delivered. The same attacks against a session without a key succeed, which
//! shows the proxy really does what it claims.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use vfmig_transport::{AuthConfig, RecvSession, SendSession, SessionConfig, TransportError};
use vfmig_wire::handshake::ENVELOPE_LEN;
use vfmig_wire::seal::SEALED_HEAD_LEN;
use vfmig_wire::{FrameKind, HEADER_LEN};

const KEY: &[u8] = b"sealed frames test key";
const FRAMES: u64 = 6;
const LEN: usize = 3000;

/// What the attacker does with one data frame (`n`: data frames seen so far on this connection)
/// of accepted connection `conn`: returns the bytes to forward in its place.
type Tamper = dyn Fn(usize, u64, Vec<u8>) -> Vec<u8> + Send + Sync;

/// A proxy between source and destination: copies the handshake and the destination's bytes
/// as they are, and hands each source data frame to `tamper`.
fn proxy(
    target: SocketAddr,
    conns: usize,
    head_len: usize,
    tamper: Arc<Tamper>,
) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut pumps = Vec::new();
        l.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut conn = 0;
        while conn < conns && std::time::Instant::now() < deadline {
            let Ok((down, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            down.set_nonblocking(false).unwrap();
            let up = TcpStream::connect(target).unwrap();
            let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            pumps.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut d2);
                let _ = d2.shutdown(Shutdown::Write);
            }));
            let tamper = Arc::clone(&tamper);
            pumps.push(std::thread::spawn(move || {
                forward_frames(down, up, conn, head_len, &*tamper);
            }));
            conn += 1;
        }
        for p in pumps {
            let _ = p.join();
        }
    });
    (addr, t)
}

fn read_n(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok().map(|()| b)
}

fn forward_frames(mut down: TcpStream, mut up: TcpStream, conn: usize, head: usize, t: &Tamper) {
    // ClientHello and ClientOffer pass untouched.
    for _ in 0..2 {
        let Some(env) = read_n(&mut down, ENVELOPE_LEN) else {
            return;
        };
        let body = u32::from_le_bytes([env[8], env[9], env[10], env[11]]) as usize;
        let Some(b) = read_n(&mut down, body) else {
            return;
        };
        if up.write_all(&env).and_then(|()| up.write_all(&b)).is_err() {
            return;
        }
    }
    let mut n = 0;
    while let Some(mut f) = read_n(&mut down, head) {
        let wire_len = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
        let Some(p) = read_n(&mut down, wire_len) else {
            return;
        };
        f.extend_from_slice(&p);
        let out = if f[4] == FrameKind::StopCopyData as u8 {
            n += 1;
            t(conn, n - 1, f)
        } else {
            f
        };
        if up.write_all(&out).is_err() {
            return;
        }
    }
    let _ = up.shutdown(Shutdown::Write);
}

fn config(streams: usize, psk: bool) -> SessionConfig {
    SessionConfig {
        auth: if psk {
            AuthConfig::Psk(KEY.to_vec())
        } else {
            AuthConfig::None
        },
        ..cfg(streams)
    }
}

/// Runs a session through the proxy: the source sends `FRAMES` data frames of device 0 and
/// closes. Returns the sequence numbers delivered with intact payloads, whether any delivered
/// payload differed from what was sent, and how the receiver ended.
fn run(streams: usize, psk: bool, tamper: Arc<Tamper>) -> (Vec<u64>, bool, TransportError) {
    let (l, addr) = listen();
    let head = if psk { SEALED_HEAD_LEN } else { HEADER_LEN };
    let (paddr, proxy) = proxy(addr, streams, head, tamper);
    let dst = accept_in_thread(l, config(streams, psk));
    let src = SendSession::connect(paddr, &config(streams, psk), devices(1)).unwrap();
    for seq in 0..FRAMES {
        // The receiver may refuse the tampered frame and close before the last one is queued:
        // the sender then sees the close, and what the receiver delivered is the verdict.
        let mut b = src.pool().acquire(Duration::from_secs(5)).unwrap();
        b.spare_mut()[..LEN].copy_from_slice(&pattern(0, seq, LEN));
        b.set_len(LEN);
        let header = data_header(0, seq, u32::try_from(LEN).unwrap());
        if src.send(header, Some(b)).is_err() {
            break;
        }
    }
    let dst: RecvSession = dst.join().unwrap().unwrap();
    let (mut seqs, mut altered) = (Vec::new(), false);
    let end = loop {
        match dst.recv(Duration::from_secs(5)) {
            Ok(f) => {
                let got = f.payload.as_ref().map(|b| b.as_slice().to_vec());
                altered |= got != Some(pattern(0, f.header.seq, LEN));
                seqs.push(f.header.seq);
                if seqs.len() as u64 == FRAMES {
                    break TransportError::Closed;
                }
            }
            Err(e) => break e,
        }
    };
    drop(dst);
    let _ = src.close();
    let _ = proxy.join();
    (seqs, altered, end)
}

/// Changes one payload byte of data frame 2 and recomputes the frame's CRC32C, as an attacker
/// who knows the format would.
fn flip_and_fix_crc(head: usize) -> Arc<Tamper> {
    Arc::new(move |_conn, n, mut f: Vec<u8>| {
        if n == 2 {
            f[head + 100] ^= 0x40;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..36]), &f[head..]);
            f[36..40].copy_from_slice(&crc.to_le_bytes());
        }
        f
    })
}

#[test]
fn a_payload_byte_changed_on_the_path_with_the_crc_fixed_up_is_refused_and_never_delivered() {
    let (seqs, altered, end) = run(1, true, flip_and_fix_crc(SEALED_HEAD_LEN));
    assert!(
        matches!(
            end,
            TransportError::Unauthentic {
                conn: 0,
                seq: 2,
                ..
            }
        ),
        "{end:?}"
    );
    assert_eq!(seqs, vec![0, 1], "nothing of frame 2 or after is delivered");
    assert!(!altered);
    // Control: without a key the same attack goes through unnoticed by the transport.
    let (seqs, altered, _) = run(1, false, flip_and_fix_crc(HEADER_LEN));
    assert_eq!(seqs, (0..FRAMES).collect::<Vec<_>>());
    assert!(altered, "the proxy changed a delivered payload");
}

#[test]
fn sealed_payloads_do_not_travel_in_clear() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let record: Arc<Tamper> = Arc::new(move |_c, _n, f: Vec<u8>| {
        s2.lock().unwrap().push(f.clone());
        f
    });
    let (seqs, altered, _) = run(1, true, record);
    assert_eq!(seqs, (0..FRAMES).collect::<Vec<_>>());
    assert!(!altered);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, FRAMES);
    for f in seen.iter() {
        let seq = u64::from_le_bytes(f[8..16].try_into().unwrap());
        let clear = pattern(0, seq, LEN);
        assert_eq!(f.len(), SEALED_HEAD_LEN + LEN);
        assert_ne!(&f[SEALED_HEAD_LEN..SEALED_HEAD_LEN + 64], &clear[..64]);
    }
}

#[test]
fn a_frame_replayed_on_its_connection_is_refused() {
    // Frame 1 is sent twice; the copy would be refused by the reorder buffer as a duplicate
    // too, so the point is the typed cause: its tag fails before anything looks at it.
    let replay: Arc<Tamper> = Arc::new(
        |_c, n, f: Vec<u8>| {
            if n == 1 {
                [f.clone(), f].concat()
            } else {
                f
            }
        },
    );
    let (seqs, _, end) = run(1, true, replay);
    assert!(
        matches!(
            end,
            TransportError::Unauthentic {
                conn: 0,
                seq: 1,
                ..
            }
        ),
        "{end:?}"
    );
    assert_eq!(seqs, vec![0, 1]);
}

/// Moves the first data frame of connection 0 to connection 1 (ahead of connection 1's first
/// data frame): a valid frame, only on another connection.
fn move_across() -> Arc<Tamper> {
    let stash: Arc<(Mutex<Option<Vec<u8>>>, Condvar)> =
        Arc::new((Mutex::new(None), Condvar::new()));
    Arc::new(move |conn, n, f: Vec<u8>| match (conn, n) {
        (0, 0) => {
            *stash.0.lock().unwrap() = Some(f);
            stash.1.notify_all();
            Vec::new()
        }
        (1, 0) => {
            let g = stash.0.lock().unwrap();
            let (mut g, _) = stash
                .1
                .wait_timeout_while(g, Duration::from_secs(5), |s| s.is_none())
                .unwrap();
            [g.take().unwrap_or_default(), f].concat()
        }
        _ => f,
    })
}

#[test]
fn a_frame_moved_to_another_connection_is_refused() {
    let (seqs, _, end) = run(2, true, move_across());
    assert!(matches!(end, TransportError::Unauthentic { .. }), "{end:?}");
    assert!(
        seqs.is_empty(),
        "the moved frame was seq 0: nothing may pass it: {seqs:?}"
    );
    // Control: without a key the receiver's reorder buffer takes the moved frame.
    let (seqs, altered, _) = run(2, false, move_across());
    assert_eq!(seqs, (0..FRAMES).collect::<Vec<_>>());
    assert!(!altered);
}
