//! Every failure gives a typed error, no panic and no hang: real loopback TCP, real io_uring,
//! short timeouts.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use vfmig_transport::{
    AbortReason, AuthConfig, FramePart, Limit, SendSession, SessionConfig, TransportError,
};
use vfmig_wire::handshake::{Auth, ClientHandshake, HandshakeError};
use vfmig_wire::{Codec, FrameHeader, FrameKind, WireError, MAX_PAYLOAD};

fn psk(k: &[u8]) -> SessionConfig {
    SessionConfig {
        auth: AuthConfig::Psk(k.to_vec()),
        ..cfg(1)
    }
}

#[test]
fn wrong_key_fails_authentication_on_both_sides_and_the_destination_keeps_waiting() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, psk(b"right key"));
    let src = SendSession::connect(addr, &psk(b"wrong key"), devices(1));
    assert!(
        matches!(src, Err(TransportError::AuthenticationFailed { .. })),
        "{src:?}"
    );
    let dst = first_dropped(dst);
    assert!(
        matches!(dst, Err(TransportError::AuthenticationFailed { .. })),
        "{dst:?}"
    );
}

#[test]
fn matching_key_authenticates_and_carries_frames() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, psk(b"shared"));
    let src = SendSession::connect(addr, &psk(b"shared"), devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    assert!(src.agreed().authenticated && dst.agreed().authenticated);
    send_data(&src, 0, 0, 100);
    let f = dst.recv(Duration::from_secs(5)).unwrap();
    assert_eq!(f.payload.unwrap().as_slice(), &pattern(0, 0, 100)[..]);
}

#[test]
fn wrong_protocol_version_is_refused_with_version_error() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, cfg(1));
    let hs = ClientHandshake::with_version(client_params(Auth::None, 1), 99);
    let (_s, client) = raw_client(addr, hs);
    assert!(matches!(
        client,
        Err(HandshakeError::Refused { .. }) | Err(HandshakeError::VersionMismatch { .. })
    ));
    let dst = first_dropped(dst);
    assert!(
        matches!(
            dst,
            Err(TransportError::Handshake {
                source: HandshakeError::VersionMismatch {
                    ours: vfmig_wire::handshake::PROTOCOL_VERSION,
                    theirs: 99
                },
                ..
            })
        ),
        "{dst:?}"
    );
}

#[test]
fn truncated_handshake_is_peer_closed_during_handshake() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, cfg(1));
    let mut hs = ClientHandshake::new(client_params(Auth::None, 1));
    let hello = vfmig_wire::handshake::Handshake::take_output(&mut hs).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    drop(s);
    let dst = first_dropped(dst);
    assert!(
        matches!(
            dst,
            Err(TransportError::PeerClosed {
                conn: 0,
                during: FramePart::Handshake
            })
        ),
        "{dst:?}"
    );
}

#[test]
fn silent_peer_during_handshake_times_out() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(
        l,
        SessionConfig {
            timeout: Duration::from_millis(500),
            keepalive: Duration::from_millis(100),
            ..cfg(1)
        },
    );
    let _s = std::net::TcpStream::connect(addr).unwrap();
    let dst = first_dropped(dst);
    assert!(
        matches!(dst, Err(TransportError::Timeout { .. })),
        "{dst:?}"
    );
}

#[test]
fn garbage_instead_of_handshake_is_dropped_with_a_handshake_error() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, cfg(1));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let dst = first_dropped(dst);
    assert!(
        matches!(
            dst,
            Err(TransportError::Handshake {
                source: HandshakeError::BadMagic { .. },
                ..
            })
        ),
        "{dst:?}"
    );
}

#[test]
fn too_many_devices_are_refused_before_allocation() {
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, cfg(1));
    let mut p = client_params(Auth::None, 0);
    p.offer.devices = devices(vfmig_transport::config::MAX_DEVICES + 1);
    let (_s, client) = raw_client(addr, ClientHandshake::new(p));
    assert!(client.is_err());
    let dst = first_dropped(dst);
    assert!(
        matches!(
            dst,
            Err(TransportError::Handshake {
                source: HandshakeError::TooManyDevices { .. },
                ..
            })
        ),
        "{dst:?}"
    );
    // The source refuses to declare them in the first place.
    let (_l2, addr2) = listen();
    let src = SendSession::connect(
        addr2,
        &cfg(1),
        devices(vfmig_transport::config::MAX_DEVICES + 1),
    );
    assert!(matches!(
        src,
        Err(TransportError::TooMany {
            what: Limit::Devices,
            ..
        })
    ));
}

/// Handshakes a raw source with a real destination, writes `bytes`, and returns what the
/// destination's `recv` reports. The raw socket stays open until the result is in.
fn destination_sees(bytes: &[u8], then_close: bool) -> Result<Vec<FrameHeader>, TransportError> {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, cfg(1));
    let (mut s, agreed) = raw_client(addr, ClientHandshake::new(client_params(Auth::None, 1)));
    agreed.unwrap();
    let dst = dst.join().unwrap().unwrap();
    // The destination may already have refused what it read and closed: ignore write errors.
    let _ = s.write_all(bytes);
    if then_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut got = Vec::new();
    loop {
        match dst.recv(Duration::from_secs(8)) {
            Ok(f) => got.push(f.header),
            Err(TransportError::Closed) => return Ok(got),
            Err(e) => return Err(e),
        }
    }
}

fn one_frame() -> Vec<u8> {
    encoded(data_header(0, 0, 8), &pattern(0, 0, 8))
}

#[test]
fn valid_frame_from_raw_source_is_delivered_then_clean_close() {
    let got = destination_sees(&one_frame(), true).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, 0);
}

#[test]
fn garbage_after_handshake_is_a_corrupt_frame() {
    let r = destination_sees(&[0x5a; 100], false);
    assert!(
        matches!(
            r,
            Err(TransportError::Corrupt {
                source: WireError::BadFrameMagic { .. },
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn oversize_lengths_are_refused_before_reading_the_payload() {
    // Above the protocol's hard limit: the header does not even decode.
    let mut h = data_header(0, 0, MAX_PAYLOAD + 1);
    h.wire_len = MAX_PAYLOAD + 1;
    let mut raw = h.encode(&[]);
    raw[20..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let r = destination_sees(&raw, false);
    assert!(
        matches!(
            r,
            Err(TransportError::Corrupt {
                source: WireError::Oversize { .. },
                ..
            })
        ),
        "{r:?}"
    );
    // Within the protocol but above what this session agreed (64 KiB slots).
    let len = 1u32 << 20;
    let mut h = data_header(0, 0, len);
    h.wire_len = len;
    let r = destination_sees(&h.encode(&[]), false);
    assert!(
        matches!(
            r,
            Err(TransportError::TooMany {
                what: Limit::Payload,
                got: 1_048_576,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_bit_flipped_anywhere_in_a_frame_is_never_delivered() {
    let good = one_frame();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let r = destination_sees(&bad, true);
        match r {
            Err(TransportError::Corrupt { .. })
            | Err(TransportError::TooMany {
                what: Limit::Payload,
                ..
            })
            | Err(TransportError::PeerClosed { .. }) => {}
            other => panic!("bit {bit}: {other:?}"),
        }
    }
}

#[test]
fn connection_cut_mid_payload_is_peer_closed_during_payload() {
    let f = one_frame();
    let r = destination_sees(&f[..f.len() - 3], true);
    assert!(
        matches!(
            r,
            Err(TransportError::PeerClosed {
                during: FramePart::Payload,
                ..
            })
        ),
        "{r:?}"
    );
    let r = destination_sees(&f[..20], true);
    assert!(
        matches!(
            r,
            Err(TransportError::PeerClosed {
                during: FramePart::Header,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn clean_close_with_a_gap_in_sequence_is_an_incomplete_stream() {
    let mut bytes = encoded(data_header(0, 1, 8), &pattern(0, 1, 8));
    bytes.extend(encoded(data_header(0, 2, 8), &pattern(0, 2, 8)));
    let r = destination_sees(&bytes, true);
    assert!(
        matches!(
            r,
            Err(TransportError::IncompleteStream {
                device: 0,
                expected: 0
            })
        ),
        "{r:?}"
    );
}

#[test]
fn duplicate_sequence_number_is_out_of_sequence() {
    let mut bytes = one_frame();
    bytes.extend(one_frame());
    let r = destination_sees(&bytes, false);
    assert!(
        matches!(
            r,
            Err(TransportError::OutOfSequence {
                device: 0,
                seq: 0,
                expected: 1
            })
        ),
        "{r:?}"
    );
}

#[test]
fn silent_peer_is_detected_within_the_timeout() {
    let (l, addr) = listen();
    let c = SessionConfig {
        timeout: Duration::from_millis(600),
        keepalive: Duration::from_millis(100),
        ..cfg(1)
    };
    let dst = accept_in_thread(l, c);
    // The raw source never sends a keepalive.
    let (_s, agreed) = raw_client(addr, ClientHandshake::new(client_params(Auth::None, 1)));
    agreed.unwrap();
    let dst = dst.join().unwrap().unwrap();
    let r = dst.recv(Duration::from_secs(10));
    assert!(
        matches!(r, Err(TransportError::PeerSilent { conn: 0, .. })),
        "{r:?}"
    );
}

#[test]
fn idle_session_stays_alive_on_keepalives() {
    let (l, addr) = listen();
    let c = SessionConfig {
        timeout: Duration::from_millis(600),
        keepalive: Duration::from_millis(100),
        ..cfg(2)
    };
    let dst = accept_in_thread(l, c.clone());
    let src = SendSession::connect(addr, &c, devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    // Three timeouts' worth of silence from the application.
    assert!(matches!(
        dst.recv(Duration::from_millis(1800)),
        Err(TransportError::Timeout { .. })
    ));
    send_data(&src, 0, 0, 10);
    assert_eq!(dst.recv(Duration::from_secs(5)).unwrap().header.seq, 0);
    assert!(src.stats().keepalives_sent > 0);
    assert!(dst.stats().keepalives_sent > 0);
    src.close().unwrap();
}

#[test]
fn abort_reaches_the_peer_with_reason_and_detail() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, cfg(2));
    let src = SendSession::connect(addr, &cfg(2), devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    src.abort(AbortReason::SourceDevice, "device fell over");
    let r = dst.recv(Duration::from_secs(5));
    assert!(
        matches!(&r, Err(TransportError::PeerAborted { reason: AbortReason::SourceDevice, detail }) if detail == "device fell over"),
        "{r:?}"
    );
    assert!(matches!(
        src.send(data_header(0, 0, 1), None),
        Err(TransportError::Aborted {
            reason: AbortReason::SourceDevice
        })
    ));
}

/// Every abort code, sent either way, is read back by the peer as the same reason, under the
/// same name: one vocabulary on both sides (issue 17: a cancel once went out as a code the peer
/// read as an integrity failure).
#[test]
fn every_abort_reason_is_read_back_identically_by_the_peer_in_both_directions() {
    let reasons = AbortReason::ALL
        .into_iter()
        .chain([AbortReason::Unknown(4242)]);
    for (i, reason) in reasons.enumerate() {
        let (l, addr) = listen();
        let dst = accept_in_thread(l, cfg(1));
        let src = SendSession::connect(addr, &cfg(1), devices(1)).unwrap();
        let dst = dst.join().unwrap().unwrap();
        let detail = format!("{} {}", reason.name(), reason.code());
        let got = if i % 2 == 0 {
            src.abort(reason, &detail);
            dst.recv(Duration::from_secs(5)).map(|_| ())
        } else {
            dst.abort(reason, &detail);
            src.recv_control(Duration::from_secs(5)).map(|_| ())
        };
        match got {
            Err(TransportError::PeerAborted {
                reason: r,
                detail: d,
            }) => {
                assert_eq!(r, reason);
                assert_eq!(r.name(), reason.name());
                assert_eq!(d, detail);
            }
            other => panic!("{reason:?}: {other:?}"),
        }
    }
}

#[test]
fn control_frames_flow_back_to_the_source() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, cfg(3));
    let src = SendSession::connect(addr, &cfg(3), devices(2)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    let ack = FrameHeader {
        kind: FrameKind::DevicePrepared,
        codec: Codec::Raw,
        device: 1,
        seq: 0,
        raw_len: 0,
        wire_len: 0,
        arg: 1234,
        crc: 0,
    };
    dst.send_control(ack, &[]).unwrap();
    let f = src.recv_control(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(
        (f.header.kind, f.header.device, f.header.arg),
        (FrameKind::DevicePrepared, 1, 1234)
    );
    assert!(src
        .recv_control(Duration::from_millis(50))
        .unwrap()
        .is_none());
}

#[test]
fn destination_that_stops_reading_makes_send_time_out_not_grow() {
    let (l, addr) = listen();
    let c = SessionConfig {
        timeout: Duration::from_millis(800),
        keepalive: Duration::from_millis(100),
        ..cfg(2)
    };
    let dst = accept_in_thread(l, c.clone());
    let src = SendSession::connect(addr, &c, devices(1)).unwrap();
    let _dst = dst.join().unwrap().unwrap(); // never calls recv
    let mut seq = 0;
    let err = loop {
        let mut b = match src.pool().acquire(Duration::from_secs(2)) {
            Ok(b) => b,
            Err(e) => break TransportError::from(e),
        };
        b.set_len(b.capacity());
        if let Err(e) = src.send(data_header(0, seq, 64 << 10), Some(b)) {
            break e;
        }
        seq += 1;
        assert!(seq < 100_000, "send never pushed back");
    };
    assert!(
        matches!(
            err,
            TransportError::Timeout { .. } | TransportError::Pool(_)
        ),
        "{err:?}"
    );
}

#[test]
fn frames_above_the_agreed_payload_or_unknown_devices_are_refused_locally() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, cfg(1));
    let src = SendSession::connect(addr, &cfg(1), devices(1)).unwrap();
    let _dst = dst.join().unwrap().unwrap();
    let mut b = src.pool().try_acquire().unwrap();
    b.set_len(8);
    assert!(matches!(
        src.send(data_header(5, 0, 8), Some(b)),
        Err(TransportError::UnknownDevice {
            device: 5,
            devices: 1
        })
    ));
    let mut b = src.pool().try_acquire().unwrap();
    b.set_len(8);
    // raw_len disagrees with a Raw payload of 8 bytes.
    assert!(matches!(
        src.send(data_header(0, 0, 9), Some(b)),
        Err(TransportError::InvalidFrame { .. })
    ));
}

#[test]
fn dropping_a_session_without_close_aborts_the_peer() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, cfg(2));
    let src = SendSession::connect(addr, &cfg(2), devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    // Dropping is not closing: queued frames are discarded and the peer learns why.
    drop(src);
    let r = dst.recv(Duration::from_secs(5));
    assert!(
        matches!(&r, Err(TransportError::PeerAborted { reason: AbortReason::Cancelled, detail }) if detail == "session dropped"),
        "{r:?}"
    );
}

#[test]
fn source_refuses_a_destination_speaking_another_version() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let hs = vfmig_wire::handshake::ServerHandshake::with_version(server_params(), 7);
        raw_server(&l, hs).1
    });
    let r = SendSession::connect(addr, &cfg(1), devices(1));
    assert!(
        matches!(
            r,
            Err(TransportError::Handshake {
                source: HandshakeError::VersionMismatch { .. } | HandshakeError::Refused { .. },
                ..
            })
        ),
        "{r:?}"
    );
    assert!(srv.join().unwrap().is_err());
}

#[test]
fn garbage_from_the_destination_fails_the_source_with_a_corrupt_frame() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, a) = raw_server(
            &l,
            vfmig_wire::handshake::ServerHandshake::new(server_params()),
        );
        a.unwrap();
        s.write_all(&[0xee; 64]).unwrap();
        // Hold the connection until the source has given up.
        std::thread::sleep(Duration::from_millis(500));
    });
    let src = SendSession::connect(addr, &cfg(1), devices(1)).unwrap();
    let r = src.recv_control(Duration::from_secs(5));
    assert!(
        matches!(
            r,
            Err(TransportError::Corrupt {
                source: WireError::BadFrameMagic { .. },
                ..
            })
        ),
        "{r:?}"
    );
    // Every later call reports the same failure.
    assert!(matches!(
        src.send(data_header(0, 0, 1), None),
        Err(TransportError::Corrupt { .. })
    ));
    srv.join().unwrap();
}
