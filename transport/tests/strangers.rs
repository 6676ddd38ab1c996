//! A destination assembling a session is not disturbed by strangers: failed handshakes and joins
//! that do not belong to the session are dropped (and reported), and the real connections
//! complete it. Real TCP on loopback.

mod common;

use std::time::Duration;

use common::*;
use vfmig_transport::{AuthConfig, SessionConfig, TransportError};
use vfmig_wire::handshake::{Auth, ClientHandshake, ClientParams, HandshakeError};

fn params(auth: Auth, join: Option<([u8; 16], u16)>) -> ClientParams {
    let mut p = client_params(auth, 1);
    p.offer.streams = 2;
    p.join = join;
    p
}

fn destination(auth: AuthConfig) -> (std::net::SocketAddr, Reporting) {
    let (l, addr) = listen();
    (
        addr,
        reporting_in_thread(l, SessionConfig { auth, ..cfg(2) }),
    )
}

#[test]
fn a_join_by_a_stranger_without_the_key_is_dropped_and_the_real_join_completes_the_session() {
    let (addr, dst) = destination(AuthConfig::Psk(b"k".to_vec()));
    let psk = |k: &[u8]| Auth::Psk(k.to_vec());
    let (_c0, a0) = raw_client(addr, ClientHandshake::new(params(psk(b"k"), None)));
    let a0 = a0.unwrap();
    // A stranger who saw the session id asks for the free index without the key.
    let (_x, stranger) = raw_client(
        addr,
        ClientHandshake::new(params(psk(b"guess"), Some((a0.session_id, 1)))),
    );
    assert_eq!(stranger.unwrap_err(), HandshakeError::AuthenticationFailed);
    let (_c1, a1) = raw_client(
        addr,
        ClientHandshake::new(params(psk(b"k"), Some((a0.session_id, 1)))),
    );
    assert_eq!(a1.unwrap().conn_index, 1);
    let (r, dropped) = dst.join().unwrap();
    let s = r.expect("the session is complete");
    assert_eq!(s.agreed().session_id, a0.session_id);
    assert!(
        matches!(dropped[..], [TransportError::AuthenticationFailed { .. }]),
        "{dropped:?}"
    );
}

#[test]
fn joins_of_another_session_and_second_new_sessions_are_dropped_while_assembling() {
    let (addr, dst) = destination(AuthConfig::None);
    let (_c0, a0) = raw_client(addr, ClientHandshake::new(params(Auth::None, None)));
    let a0 = a0.unwrap();
    // A guessed session id, and a second source starting a session of its own.
    let (_x, _) = raw_client(
        addr,
        ClientHandshake::new(params(Auth::None, Some(([0; 16], 1)))),
    );
    let (_y, _) = raw_client(addr, ClientHandshake::new(params(Auth::None, None)));
    // Give the destination time to see both before the real join arrives (the assertion below
    // only needs them dropped, in any order).
    std::thread::sleep(Duration::from_millis(100));
    let (_c1, a1) = raw_client(
        addr,
        ClientHandshake::new(params(Auth::None, Some((a0.session_id, 1)))),
    );
    a1.unwrap();
    let (r, dropped) = dst.join().unwrap();
    assert_eq!(r.expect("session").agreed().session_id, a0.session_id);
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped
            .iter()
            .all(|e| matches!(e, TransportError::NotInSession { .. })),
        "{dropped:?}"
    );
}

#[test]
fn more_silent_connections_than_the_pending_bound_do_not_lock_the_real_source_out() {
    let (l, addr) = listen();
    let dst = reporting_in_thread(l, cfg(2));
    // Silent strangers: more than can be pending at once, each holding its slot until its
    // handshake deadline unless a newer connection pushes it out.
    let silent: Vec<_> = (0..vfmig_transport::MAX_PENDING_HANDSHAKES + 16)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let src = vfmig_transport::SendSession::connect(addr, &cfg(2), devices(1)).unwrap();
    let (r, dropped) = dst.join().unwrap();
    let dst = r.expect("the real source got its session");
    assert_eq!(dst.agreed().session_id, src.agreed().session_id);
    assert!(
        dropped.iter().all(|e| matches!(
            e,
            TransportError::TooMany {
                what: vfmig_transport::Limit::PendingHandshakes,
                ..
            }
        )),
        "{dropped:?}"
    );
    drop(silent);
}
