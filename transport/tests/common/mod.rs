//! Helpers shared by the integration tests: real TCP on loopback, real io_uring.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use vfmig_transport::{
    DeviceDesc, Listener, RecvSession, SendSession, SessionConfig, TransportError,
};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

/// Short timeouts so a broken test fails fast instead of hanging.
pub fn cfg(streams: usize) -> SessionConfig {
    SessionConfig {
        streams,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_millis(200),
        pool_slots: 32,
        slot_size: 64 << 10,
        window_bytes: 1 << 20,
        connect_timeout: Duration::from_secs(2),
        accept_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    }
}

pub fn devices(n: usize) -> Vec<DeviceDesc> {
    (0..n)
        .map(|i| DeviceDesc {
            name: format!("dev{i}"),
            caps: 0,
            state_size_hint: 0,
            decl: Default::default(),
        })
        .collect()
}

pub fn listen() -> (Listener, SocketAddr) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = l.local_addr();
    (l, a)
}

pub fn accept_in_thread(
    l: Listener,
    cfg: SessionConfig,
) -> JoinHandle<Result<RecvSession, TransportError>> {
    std::thread::spawn(move || l.accept(&cfg))
}

/// A destination accepting in a thread: its outcome and every connection it dropped.
pub type Reporting = JoinHandle<(Result<RecvSession, TransportError>, Vec<TransportError>)>;

/// Accepts in a thread, collecting the cause of every connection the destination drops.
pub fn reporting_in_thread(l: Listener, cfg: SessionConfig) -> Reporting {
    std::thread::spawn(move || {
        let mut dropped = Vec::new();
        let r = l.accept_reporting(&cfg, &mut |_, e| dropped.push(e.clone()));
        (r, dropped)
    })
}

/// A destination that reports every connection it drops and gives up after 1 s without a source.
pub fn dropping_in_thread(l: Listener, cfg: SessionConfig) -> Reporting {
    let cfg = SessionConfig {
        accept_timeout: Duration::from_secs(1),
        ..cfg
    };
    reporting_in_thread(l, cfg)
}

/// Asserts that the destination dropped a connection and went on waiting for a source until its
/// accept timeout; returns the cause it reported for the first dropped connection as the error.
pub fn first_dropped(h: Reporting) -> Result<RecvSession, TransportError> {
    let (r, dropped) = h.join().unwrap();
    assert!(
        matches!(
            r,
            Err(TransportError::Timeout {
                what: "a source to connect",
                ..
            })
        ),
        "the destination kept waiting for a source: {r:?}"
    );
    Err(dropped.into_iter().next().expect("a dropped connection"))
}

pub fn data_header(device: u16, seq: u64, len: u32) -> FrameHeader {
    FrameHeader {
        kind: FrameKind::StopCopyData,
        codec: Codec::Raw,
        device,
        seq,
        raw_len: len,
        wire_len: 0,
        arg: seq,
        crc: 0,
    }
}

/// Deterministic payload bytes for (device, seq).
pub fn pattern(device: u16, seq: u64, len: usize) -> Vec<u8> {
    let mut x = (u64::from(device) << 48) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Receives on `dst` in a thread until the source closes, checking that every device's frames
/// come complete and in order with their `pattern` payload; returns the frames per device.
pub fn receive_in_order(dst: RecvSession, ndev: usize) -> JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut next = vec![0u64; ndev];
        loop {
            match dst.recv(Duration::from_secs(5)) {
                Ok(f) => {
                    let d = usize::from(f.header.device);
                    assert_eq!(f.header.seq, next[d], "device {d} out of order");
                    next[d] += 1;
                    let len = usize::try_from(f.header.wire_len).unwrap();
                    let p = f.payload.expect("payload");
                    assert_eq!(
                        p.as_slice(),
                        &pattern(f.header.device, f.header.seq, len)[..]
                    );
                }
                Err(TransportError::Closed) => return next,
                Err(e) => panic!("recv: {e}"),
            }
        }
    })
}

/// Sends one data frame filled with `pattern`.
pub fn send_data(s: &SendSession, device: u16, seq: u64, len: usize) {
    let mut b = s.pool().acquire(Duration::from_secs(5)).unwrap();
    b.spare_mut()[..len].copy_from_slice(&pattern(device, seq, len));
    b.set_len(len);
    s.send(
        data_header(device, seq, u32::try_from(len).unwrap()),
        Some(b),
    )
    .unwrap();
}

use std::io::{Read, Write};
use std::net::TcpStream;
use vfmig_wire::handshake::{
    Agreed, Auth, ClientHandshake, ClientParams, Handshake, HandshakeError, Offer, KNOWN_CODECS,
};

pub fn offer(ndev: usize, streams: u16) -> Offer {
    Offer {
        streams,
        codecs: KNOWN_CODECS,
        max_payload: 64 << 10,
        window_bytes: 1 << 20,
        devices: devices(ndev),
    }
}

pub fn client_params(auth: Auth, ndev: usize) -> ClientParams {
    ClientParams {
        auth,
        offer: offer(ndev, 1),
        join: None,
        nonce: [7; 32],
    }
}

/// A hand-driven source: handshakes with `hs` over a plain socket, then the test writes whatever
/// bytes it likes.
pub fn raw_client(
    addr: SocketAddr,
    hs: ClientHandshake,
) -> (TcpStream, Result<Agreed, HandshakeError>) {
    let s = TcpStream::connect(addr).unwrap();
    drive_raw(s, hs, ClientHandshake::error)
}

/// Runs `hs` over `s` until it agrees or fails (`error` gives its failure) and hands the socket
/// back with the outcome.
fn drive_raw<H: Handshake>(
    mut s: TcpStream,
    mut hs: H,
    error: fn(&H) -> Option<&HandshakeError>,
) -> (TcpStream, Result<Agreed, HandshakeError>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(out) = hs.take_output() {
            let _ = s.write_all(&out);
        }
        if let Some(a) = hs.agreed() {
            return (s, Ok(a.clone()));
        }
        if let Some(e) = error(&hs) {
            return (s, Err(e.clone()));
        }
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return (s, Err(HandshakeError::Malformed { what: "closed" }));
        }
        let mut off = 0;
        while off < n && hs.agreed().is_none() && !hs.is_failed() {
            match hs.feed(&buf[off..n]) {
                Ok(c) => off += c,
                Err(_) => break,
            }
        }
    }
}

/// A correctly encoded frame (header with CRC, then payload).
pub fn encoded(h: FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut h = h;
    h.wire_len = u32::try_from(payload.len()).unwrap();
    let mut v = h.encode(payload).to_vec();
    v.extend_from_slice(payload);
    v
}

use vfmig_wire::handshake::{Limits, ServerHandshake, ServerParams};

/// A hand-driven destination: accepts one connection on `l`, handshakes with `hs`, and hands the
/// socket back so the test can write whatever it likes to the source.
pub fn raw_server(
    l: &std::net::TcpListener,
    hs: ServerHandshake,
) -> (TcpStream, Result<Agreed, HandshakeError>) {
    let (s, _) = l.accept().unwrap();
    drive_raw(s, hs, ServerHandshake::error)
}

pub fn server_params() -> ServerParams {
    ServerParams {
        auth: Auth::None,
        limits: Limits::default(),
        session_id: [3; 16],
        nonce: [5; 32],
        devices: None,
    }
}
