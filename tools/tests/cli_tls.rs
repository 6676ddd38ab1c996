//! The real `vfmig` binary with `--tls-cert/--tls-key/--tls-ca`: a migration over TLS 1.3 with
//! mutual certificates succeeds; a certificate from another CA is refused on both sides.

mod common;

use std::path::Path;

use common::*;
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = p.self_signed(&key).expect("self-signed");
    Ca { cert, key }
}

/// Writes `name`.crt, `name`.key (signed by `ca`) and `name`-ca.crt; returns the three paths.
fn leaf(dir: &Path, name: &str, ca: &Ca) -> [String; 3] {
    let p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    let paths = [
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}-ca.crt")),
    ];
    std::fs::write(&paths[0], cert.pem()).expect("write");
    std::fs::write(&paths[1], key.serialize_pem()).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&paths[1], std::fs::Permissions::from_mode(0o600))
            .expect("chmod key");
    }
    std::fs::write(&paths[2], ca.cert.pem()).expect("write");
    paths.map(|p| p.to_string_lossy().into_owned())
}

fn tls_args(files: &[String; 3]) -> Vec<&str> {
    vec![
        "--tls-cert",
        &files[0],
        "--tls-key",
        &files[1],
        "--tls-ca",
        &files[2],
    ]
}

#[test]
fn tls_migration_with_mutual_certificates_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca1 = ca("vfmig test ca");
    let server = leaf(dir.path(), "server", &ca1);
    let client = leaf(dir.path(), "client", &ca1);
    let dev = "emu:size=8M,profile=text";
    let mut rargs = vec!["--device", dev, "--require-client-cert", "--timeout", "20"];
    rargs.extend(tls_args(&server));
    let recv = Receiver::spawn(&rargs);
    let mut sargs = vec!["--device", dev, "--timeout", "20", "--json"];
    sargs.extend(tls_args(&client));
    let out = run(send(recv.addr, &sargs), None);
    let (rstatus, _, rlines) = recv.finish();
    assert!(
        out.status.success(),
        "send: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rstatus.success(), "recv: {rlines:?}");
    assert_eq!(json(&out.stdout)["outcome"], "ok");
}

#[test]
fn certificate_from_another_ca_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = leaf(dir.path(), "server", &ca("ca one"));
    let client = leaf(dir.path(), "client", &ca("ca two"));
    let dev = "emu:size=1M";
    let mut rargs = vec![
        "--device",
        dev,
        "--require-client-cert",
        "--timeout",
        "10",
        "--accept-timeout",
        "2",
    ];
    rargs.extend(tls_args(&server));
    let recv = Receiver::spawn(&rargs);
    let mut sargs = vec!["--device", dev, "--timeout", "10"];
    sargs.extend(tls_args(&client));
    let out = run(send(recv.addr, &sargs), None);
    let (rstatus, _, rlines) = recv.finish();
    assert_eq!(out.status.code(), Some(1));
    // The receiver drops the refused source with one line and waits on until --accept-timeout.
    assert_eq!(rstatus.code(), Some(1), "{rlines:?}");
    assert!(
        rlines
            .iter()
            .any(|l| l.starts_with("vfmig: dropped connection from") && l.contains("TLS")),
        "{rlines:?}"
    );
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("TLS"), "{lines:?}");
}

/// One side with TLS, the other with a PSK only: both name the mismatch.
fn tls_against_psk(tls_on_receiver: bool) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca1 = ca("vfmig test ca");
    let server = leaf(dir.path(), "server", &ca1);
    let client = leaf(dir.path(), "client", &ca1);
    let key = write_key(dir.path(), "key", "0123456789abcdef0123456789abcdef\n");
    let dev = "emu:size=1M";
    let mut rargs = vec!["--device", dev, "--timeout", "5", "--accept-timeout", "5"];
    let mut sargs = vec!["--device", dev, "--timeout", "5"];
    if tls_on_receiver {
        rargs.extend(tls_args(&server));
        sargs.extend(["--psk-file", key.as_str()]);
    } else {
        rargs.extend(["--psk-file", key.as_str()]);
        sargs.extend(tls_args(&client));
    }
    let recv = Receiver::spawn(&rargs);
    let out = run(send(recv.addr, &sargs), None);
    let (rstatus, _, rlines) = recv.finish();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(rstatus.code(), Some(1), "{rlines:?}");
    // The receiver names the mismatch, whether it then exits or waits on for its real source
    // (until --accept-timeout).
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        rlines
            .iter()
            .find(|l| l.contains("TLS"))
            .cloned()
            .unwrap_or_default(),
    )
}

#[test]
fn a_tls_sender_against_a_psk_receiver_is_named_on_both_sides() {
    let (s, r) = tls_against_psk(false);
    assert!(
        r.contains("speaks TLS"),
        "the receiver names what it got: {r}"
    );
    for line in [&s, &r] {
        assert!(
            line.contains("TLS") && line.contains("same security options"),
            "{line}"
        );
        assert!(!line.contains("magic"), "{line}");
    }
}

#[test]
fn a_psk_sender_against_a_tls_receiver_is_named_on_both_sides() {
    let (s, r) = tls_against_psk(true);
    assert!(
        s.contains("speaks TLS"),
        "the sender names what it got: {s}"
    );
    for line in [&s, &r] {
        assert!(
            line.contains("TLS") && line.contains("same security options"),
            "{line}"
        );
        assert!(!line.contains("magic"), "{line}");
    }
}
