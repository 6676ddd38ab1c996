//! The reorder window over several connections: parking instead of unbounded memory, order
//! restored, and a sender that breaks the ordering contract is reported, not waited on forever.
#![allow(clippy::cast_possible_truncation)] // test data sizes are small

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use vfmig_transport::{SendSession, SessionConfig, TransportError};
use vfmig_wire::handshake::{Auth, ClientHandshake, ClientParams};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

fn tiny_window(streams: usize) -> SessionConfig {
    SessionConfig {
        pool_slots: 8,
        window_bytes: 64 << 10,
        ..cfg(streams)
    }
}

#[test]
fn tiny_window_over_four_connections_still_restores_order() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, tiny_window(4));
    let src = SendSession::connect(addr, &tiny_window(4), devices(2)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    assert_eq!(dst.agreed().window_bytes, 64 << 10);
    let rx = receive_in_order(dst, 2);
    for seq in 0..200u64 {
        for d in 0..2u16 {
            // Big and tiny frames alternate so connections drift apart.
            let len = if (seq + u64::from(d)) % 3 == 0 {
                64 << 10
            } else {
                17
            };
            send_data(&src, d, seq, len);
        }
    }
    src.close().unwrap();
    assert_eq!(rx.join().unwrap(), [200, 200]);
}

/// Two raw connections into one session: conn 0 (first) and conn 1 (joined).
fn raw_pair(addr: std::net::SocketAddr) -> (TcpStream, TcpStream) {
    let mut p = client_params(Auth::None, 1);
    p.offer = offer(1, 2);
    p.offer.window_bytes = 64 << 10;
    let (c0, a) = raw_client(addr, ClientHandshake::new(p.clone()));
    let a = a.unwrap();
    assert_eq!(a.streams, 2);
    let (c1, b) = raw_client(
        addr,
        ClientHandshake::new(ClientParams {
            join: Some((a.session_id, 1)),
            nonce: [9; 32],
            ..p
        }),
    );
    assert!(b.unwrap().joined);
    (c0, c1)
}

fn frame(seq: u64, len: usize) -> Vec<u8> {
    encoded(data_header(0, seq, len as u32), &pattern(0, seq, len))
}

fn keepalive() -> Vec<u8> {
    encoded(
        FrameHeader {
            kind: FrameKind::Keepalive,
            codec: Codec::Raw,
            device: 0,
            seq: 0,
            raw_len: 0,
            wire_len: 0,
            arg: 0,
            crc: 0,
        },
        &[],
    )
}

#[test]
fn frames_beyond_the_window_wait_in_the_socket_until_the_next_one_arrives() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, tiny_window(2));
    let (mut c0, mut c1) = raw_pair(addr);
    let dst = dst.join().unwrap().unwrap();
    // Seq 1..=12 (192 KiB) on connection 1: three times the window.
    for seq in 1..=12 {
        c1.write_all(&frame(seq, 16 << 10)).unwrap();
    }
    // Nothing can be delivered before seq 0.
    assert!(matches!(
        dst.recv(Duration::from_millis(300)),
        Err(TransportError::Timeout { .. })
    ));
    c0.write_all(&frame(0, 16 << 10)).unwrap();
    for seq in 0..=12 {
        let f = dst.recv(Duration::from_secs(5)).unwrap();
        assert_eq!(f.header.seq, seq);
    }
}

#[test]
fn next_frame_never_arriving_while_the_window_is_full_is_a_reorder_stall() {
    let (l, addr) = listen();
    let c = SessionConfig {
        timeout: Duration::from_millis(800),
        keepalive: Duration::from_millis(100),
        ..tiny_window(2)
    };
    let dst = accept_in_thread(l, c);
    let (mut c0, mut c1) = raw_pair(addr);
    let dst = dst.join().unwrap().unwrap();
    for seq in 1..=12 {
        c1.write_all(&frame(seq, 16 << 10)).unwrap();
    }
    // Both connections stay alive (keepalives on 0, connection 1 parked); seq 0 never comes.
    let ka = std::thread::spawn(move || {
        for _ in 0..40 {
            if c0.write_all(&keepalive()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = dst.recv(Duration::from_secs(10));
    assert!(
        matches!(
            r,
            Err(TransportError::ReorderStall {
                device: 0,
                expected: 0,
                ..
            })
        ),
        "{r:?}"
    );
    drop(c1);
    ka.join().unwrap();
}
