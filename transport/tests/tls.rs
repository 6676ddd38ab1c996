//! TLS 1.3 sessions with real certificates (rcgen), real TCP on loopback.
#![allow(clippy::cast_possible_truncation)] // test data sizes are small

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use vfmig_transport::{SendSession, SessionConfig, TlsConfig, TransportError};

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// Writes `name`.crt / `name`.key signed by `ca`, and `name`-ca.crt, into `dir`.
fn leaf(dir: &Path, name: &str, ca: &Ca) -> (PathBuf, PathBuf, PathBuf) {
    let p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k, a) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}-ca.crt")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&a, ca.cert.pem()).unwrap();
    (c, k, a)
}

fn tls_cfg(streams: usize, files: (PathBuf, PathBuf, PathBuf), trust: &Path) -> SessionConfig {
    SessionConfig {
        tls: Some(TlsConfig {
            cert: files.0,
            key: files.1,
            ca: trust.to_path_buf(),
            server_name: None,
            require_client_cert: true,
        }),
        ..cfg(streams)
    }
}

#[test]
fn tls_round_trip_with_mutual_certificates_restores_order() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("ca1");
    let server = leaf(dir.path(), "server", &ca1);
    let client = leaf(dir.path(), "client", &ca1);
    let trust = server.2.clone();
    let (l, addr) = listen();
    // A PSK inside TLS as well: both layers authenticate.
    let psk = |c: SessionConfig| SessionConfig {
        auth: vfmig_transport::AuthConfig::Psk(b"inner key".to_vec()),
        ..c
    };
    let dst = accept_in_thread(l, psk(tls_cfg(3, server, &trust)));
    let src = SendSession::connect(addr, &psk(tls_cfg(3, client, &trust)), devices(2)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    assert_eq!(dst.agreed().streams, 3);
    assert!(dst.agreed().authenticated && src.agreed().authenticated);
    // Inside TLS the frames carry a CRC32C (TLS protects them); the PSK still keys the digest.
    for a in [dst.agreed(), src.agreed()] {
        assert_eq!(a.protection, vfmig_wire::FrameProtection::Crc32c);
        assert!(a.keys.is_some());
    }
    let rx = receive_in_order(dst, 2);
    for seq in 0..150u64 {
        for d in 0..2u16 {
            send_data(
                &src,
                d,
                seq,
                1 + (seq as usize * 4099 + usize::from(d)) % (64 << 10),
            );
        }
    }
    src.close().unwrap();
    assert_eq!(rx.join().unwrap(), [150, 150]);
}

#[test]
fn tls_source_refuses_destination_signed_by_an_unknown_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca("ca1"), ca("ca2"));
    let server = leaf(dir.path(), "server", &ca1);
    let client = leaf(dir.path(), "client", &ca2);
    let (client_trust, server_trust) = (client.2.clone(), server.2.clone());
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, tls_cfg(1, server, &server_trust));
    let src = SendSession::connect(addr, &tls_cfg(1, client, &client_trust), devices(1));
    assert!(
        matches!(
            src,
            Err(TransportError::Tls {
                source: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                ..
            })
        ),
        "{src:?}"
    );
    assert!(first_dropped(dst).is_err());
}

#[test]
fn tls_destination_refuses_source_certificate_from_an_unknown_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca("ca1"), ca("ca2"));
    let server = leaf(dir.path(), "server", &ca1);
    let client = leaf(dir.path(), "client", &ca2);
    // The source trusts the destination, the destination does not trust the source.
    let server_trust = server.2.clone();
    let (l, addr) = listen();
    let dst = dropping_in_thread(l, tls_cfg(1, server, &server_trust));
    let src = SendSession::connect(addr, &tls_cfg(1, client, &server_trust), devices(1));
    assert!(src.is_err(), "{src:?}");
    let dst = first_dropped(dst);
    assert!(
        matches!(
            dst,
            Err(TransportError::Tls {
                source: rustls::Error::InvalidCertificate(_),
                ..
            })
        ),
        "{dst:?}"
    );
}

#[test]
fn tls_config_with_missing_files_is_a_typed_error() {
    let (_l, addr) = listen();
    let c = SessionConfig {
        tls: Some(TlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
            server_name: None,
            require_client_cert: false,
        }),
        ..cfg(1)
    };
    let r = SendSession::connect(addr, &c, devices(1));
    assert!(matches!(r, Err(TransportError::TlsConfig { .. })), "{r:?}");
}
