//! Pinned bytes: SHA-256 of everything both handshake sides write in a set of exchanges (PSK with
//! declarations and a join, no key, refusals), of the derived keys in use (a sealed frame), and
//! of every control frame's encoding. The digest was taken before the wire crate's codec /
//! handshake refactoring; a change here changes the bytes on the wire. Retaken for version 4
//! (the hash trailer, docs/PROTOCOL.md 4.3): the envelopes' version field is the only change in
//! these bytes.

use sha2::{Digest, Sha256};
use vfmig_wire::declare::{DeviceDecl, DeviceKind};
use vfmig_wire::handshake::*;
use vfmig_wire::seal::{FrameSealer, SEALED_HEAD_LEN};
use vfmig_wire::{AbortReason, Codec, Control, FinalOutcome, FrameHeader, FrameKind, HEADER_LEN};

fn offer(decl: DeviceDecl) -> Offer {
    Offer {
        streams: 3,
        codecs: codec_bit(Codec::Raw) | codec_bit(Codec::Lz4) | (1 << 20),
        max_payload: 1 << 21,
        window_bytes: 1 << 22,
        devices: vec![
            DeviceDesc {
                name: "gpu0".into(),
                caps: 0x1234_5678_9abc_def0,
                state_size_hint: 77,
                decl,
            },
            DeviceDesc {
                name: "nïc".into(),
                caps: 1,
                state_size_hint: 0,
                decl: DeviceDecl::default(),
            },
        ],
    }
}

/// Runs one exchange to its end; returns everything each side wrote, and the agreement.
fn exchange(
    auth_c: Auth,
    auth_s: Auth,
    join: Option<([u8; 16], u16)>,
    server_decls: Option<Vec<DeviceDecl>>,
    version_c: u16,
) -> (Vec<u8>, Vec<u8>, Option<Agreed>) {
    let decl = DeviceDecl {
        kind: DeviceKind::Emulated,
        size: Some(4096),
        compat: "seed=1 profile=mixed".into(),
    };
    let mut c = ClientHandshake::with_version(
        ClientParams {
            auth: auth_c,
            offer: offer(decl),
            join,
            nonce: [0x11; 32],
        },
        version_c,
    );
    let mut s = ServerHandshake::new(ServerParams {
        auth: auth_s,
        limits: Limits {
            max_streams: 2,
            ..Limits::default()
        },
        session_id: [0x5e; 16],
        nonce: [0x22; 32],
        devices: server_decls,
    });
    let (mut c_out, mut s_out) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let mut progressed = false;
        if let Some(b) = c.take_output() {
            progressed = true;
            if !s.is_failed() {
                let _ = s.feed(&b);
            }
            c_out.extend_from_slice(&b);
        }
        if let Some(b) = s.take_output() {
            progressed = true;
            if !c.is_failed() {
                let _ = c.feed(&b);
            }
            s_out.extend_from_slice(&b);
        }
        if !progressed {
            break;
        }
    }
    (c_out, s_out, c.agreed().cloned())
}

#[test]
fn handshake_seal_and_control_bytes_are_unchanged() {
    let key = || Auth::Psk(b"pinned key".to_vec());
    let same = DeviceDecl {
        kind: DeviceKind::Emulated,
        size: Some(4096),
        compat: "seed=1 profile=mixed".into(),
    };
    let mut h = Sha256::new();
    let mut put = |what: &str, b: &[u8]| {
        h.update(what.as_bytes());
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    let (c, s, agreed) = exchange(
        key(),
        key(),
        None,
        Some(vec![same.clone(), DeviceDecl::default()]),
        PROTOCOL_VERSION,
    );
    put("psk client", &c);
    put("psk server", &s);
    let agreed = agreed.expect("the PSK exchange agrees");
    // The keys: seal a frame with them.
    let keys = agreed.keys.expect("PSK keys");
    put("digest key", keys.digest_key());
    let hdr = FrameHeader {
        kind: FrameKind::StopCopyData,
        codec: Codec::Raw,
        device: 1,
        seq: 9,
        raw_len: 5,
        wire_len: 5,
        arg: 3,
        crc: 0,
    };
    let mut head = [0u8; SEALED_HEAD_LEN];
    head[..HEADER_LEN].copy_from_slice(&hdr.encode_unprotected());
    let mut payload = *b"state";
    FrameSealer::new(&keys, true, agreed.conn_index)
        .seal(&mut head, &mut payload)
        .unwrap();
    put("sealed head", &head);
    put("sealed payload", &payload);

    let v = PROTOCOL_VERSION;
    let (c, s, agreed) = exchange(Auth::None, Auth::None, Some(([7; 16], 1)), None, v);
    assert!(agreed.is_some_and(|a| a.joined));
    put("join client", &c);
    put("join server", &s);
    let other = DeviceDecl {
        size: Some(8192),
        ..same.clone()
    };
    let (c, s, agreed) = exchange(key(), key(), None, Some(vec![other]), v);
    assert!(agreed.is_none());
    put("mismatch client", &c);
    put("mismatch server", &s);
    for (ac, as_, v) in [
        (key(), Auth::Psk(b"other key".to_vec()), v),
        (key(), Auth::None, v),
        (Auth::None, Auth::None, v - 1),
        (Auth::None, Auth::None, v + 1),
    ] {
        let (c, s, agreed) = exchange(ac, as_, None, None, v);
        assert!(agreed.is_none());
        put("refused client", &c);
        put("refused server", &s);
    }
    for ctl in [
        Control::EndOfDevice {
            device: 2,
            seq: 40,
            total_raw_bytes: 1 << 33,
            digest: [0xd1; 32],
        },
        Control::PreCopyDone {
            device: 1,
            seq: 3,
            precopy_bytes: 99,
        },
        Control::InitialDataSent {
            device: 1,
            seq: 2,
            raw_bytes: 98,
        },
        Control::SwitchoverAck {
            device: 1,
            raw_bytes: 97,
        },
        Control::DevicePrepared {
            device: 3,
            total_raw_bytes: 96,
        },
        Control::Abort {
            reason: AbortReason::Unknown(300),
            detail: "ünïcode detail".into(),
        },
        Control::Abort {
            reason: AbortReason::Integrity,
            detail: String::new(),
        },
        Control::Keepalive { millis: 123_456 },
        Control::Commit,
        Control::Outcome {
            outcome: FinalOutcome::Held,
        },
        Control::Outcome {
            outcome: FinalOutcome::Unknown(9),
        },
    ] {
        put("control", &ctl.encode());
    }
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, PINNED, "wire bytes changed");
}

const PINNED: &str = "8c65aa0fa7070593c4c56ebf1151d4b11bcdae87e764a9a72ba5723569c683da";
