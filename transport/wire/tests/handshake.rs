//! Handshake and authentication: agreement, refusals, wrong keys, versions, replay, truncation,
//! garbage and oversize input. Every failure must be a typed error, never a panic.

use proptest::prelude::*;
use vfmig_wire::handshake::*;
use vfmig_wire::Codec;

const KEY: &[u8] = b"correct horse battery staple";

fn dev(name: &str) -> DeviceDesc {
    DeviceDesc {
        name: name.to_owned(),
        caps: 0x5,
        state_size_hint: 1 << 20,
        decl: Default::default(),
    }
}

fn offer() -> Offer {
    Offer {
        streams: 4,
        codecs: codec_bit(Codec::Raw) | codec_bit(Codec::Zero) | codec_bit(Codec::Zstd),
        max_payload: 1 << 20,
        window_bytes: 32 << 20,
        devices: vec![dev("gpu0"), dev("nic1")],
    }
}

fn client(auth: Auth, nonce: u8) -> ClientHandshake {
    ClientHandshake::new(ClientParams {
        auth,
        offer: offer(),
        join: None,
        nonce: [nonce; 32],
    })
}

fn server(auth: Auth, nonce: u8) -> ServerHandshake {
    ServerHandshake::new(ServerParams {
        auth,
        limits: Limits::default(),
        session_id: [0xab; 16],
        nonce: [nonce; 32],
        devices: None,
    })
}

fn psk(k: &[u8]) -> Auth {
    Auth::Psk(k.to_vec())
}

/// Shuttles bytes both ways until neither side has output. Returns what each side produced, in
/// order, so tests can replay or tamper with it.
fn pump(c: &mut ClientHandshake, s: &mut ServerHandshake) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut c_out, mut s_out) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let mut progressed = false;
        if let Some(b) = c.take_output() {
            progressed = true;
            if !s.is_failed() {
                let _ = s.feed(&b);
            }
            c_out.push(b);
        }
        if let Some(b) = s.take_output() {
            progressed = true;
            if !c.is_failed() {
                let _ = c.feed(&b);
            }
            s_out.push(b);
        }
        if !progressed {
            break;
        }
    }
    (c_out, s_out)
}

#[test]
fn psk_handshake_authenticates_both_sides_and_agrees_on_the_same_parameters() {
    let (mut c, mut s) = (client(psk(KEY), 1), server(psk(KEY), 2));
    pump(&mut c, &mut s);
    let (a, b) = (
        c.agreed().expect("client done"),
        s.agreed().expect("server done"),
    );
    assert_eq!(a, b);
    assert!(a.authenticated);
    assert_eq!(a.session_id, [0xab; 16]);
    assert_eq!((a.conn_index, a.joined), (0, false));
    assert_eq!(a.devices, offer().devices);
    assert_eq!(a.streams, 4);
    assert_eq!(a.max_payload, 1 << 20);
    assert_eq!(a.window_bytes, 32 << 20);
}

#[test]
fn server_limits_narrow_the_offer_to_the_minimum_of_both_sides() {
    let mut c = client(Auth::None, 1);
    let mut s = ServerHandshake::new(ServerParams {
        auth: Auth::None,
        limits: Limits {
            max_streams: 2,
            max_devices: 8,
            max_payload: 64 << 10,
            max_window_bytes: 1 << 20,
        },
        session_id: [7; 16],
        nonce: [2; 32],
        devices: None,
    });
    pump(&mut c, &mut s);
    let a = c.agreed().expect("client done");
    assert_eq!(Some(a), s.agreed());
    assert_eq!(
        (a.streams, a.max_payload, a.window_bytes),
        (2, 64 << 10, 1 << 20)
    );
    assert!(!a.authenticated);
}

#[test]
fn window_smaller_than_max_payload_clamps_max_payload_to_the_window() {
    let mut c = ClientHandshake::new(ClientParams {
        auth: Auth::None,
        offer: Offer {
            window_bytes: 4096,
            ..offer()
        },
        join: None,
        nonce: [1; 32],
    });
    let mut s = server(Auth::None, 2);
    pump(&mut c, &mut s);
    let a = c.agreed().expect("done");
    assert_eq!((a.window_bytes, a.max_payload), (4096, 4096));
}

#[test]
fn wrong_key_fails_with_authentication_failed_on_both_sides() {
    let (mut c, mut s) = (client(psk(b"key one"), 1), server(psk(b"key two"), 2));
    pump(&mut c, &mut s);
    assert_eq!(s.error(), Some(&HandshakeError::AuthenticationFailed));
    assert_eq!(c.error(), Some(&HandshakeError::AuthenticationFailed));
    assert!(c.agreed().is_none() && s.agreed().is_none());
}

#[test]
fn unauthenticated_client_learns_only_the_server_nonce_and_a_refusal() {
    let (mut c, mut s) = (client(psk(b"guess"), 1), server(psk(KEY), 2));
    let (_, s_out) = pump(&mut c, &mut s);
    // Challenge (12 + 36 bytes) then a 24-byte refusal: no limits, no session id, no devices.
    let sizes: Vec<usize> = s_out.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![48, 24]);
}

#[test]
fn wrong_version_is_a_typed_error_on_both_sides_in_both_directions() {
    let (v, next) = (PROTOCOL_VERSION, PROTOCOL_VERSION + 1);
    // A client of the next version against our server.
    let mut c = ClientHandshake::with_version(
        ClientParams {
            auth: psk(KEY),
            offer: offer(),
            join: None,
            nonce: [1; 32],
        },
        next,
    );
    let mut s = server(psk(KEY), 2);
    pump(&mut c, &mut s);
    assert_eq!(
        s.error(),
        Some(&HandshakeError::VersionMismatch {
            ours: v,
            theirs: next
        })
    );
    assert_eq!(
        c.error(),
        Some(&HandshakeError::VersionMismatch {
            ours: next,
            theirs: v
        })
    );

    // Our client against a version-7 server: the server refuses the hello, the client learns why.
    let mut c = client(psk(KEY), 1);
    let mut s = ServerHandshake::with_version(
        ServerParams {
            auth: psk(KEY),
            limits: Limits::default(),
            session_id: [0; 16],
            nonce: [2; 32],
            devices: None,
        },
        7,
    );
    pump(&mut c, &mut s);
    assert_eq!(
        s.error(),
        Some(&HandshakeError::VersionMismatch { ours: 7, theirs: v })
    );
    assert_eq!(
        c.error(),
        Some(&HandshakeError::VersionMismatch { ours: v, theirs: 7 })
    );
}

#[test]
fn a_refusal_from_a_peer_of_another_version_is_a_version_mismatch_and_is_not_answered() {
    let mut c = client(psk(KEY), 1);
    let _ = c.take_output();
    let mut refuse = b"VMHS".to_vec();
    refuse.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    refuse.extend_from_slice(&[5, 0]);
    refuse.extend_from_slice(&12u32.to_le_bytes());
    refuse.extend_from_slice(&1u16.to_le_bytes());
    refuse.extend_from_slice(&[0; 10]);
    assert_eq!(
        c.feed(&refuse),
        Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 1
        })
    );
    assert_eq!(c.take_output(), None);
}

#[test]
fn auth_mode_mismatch_is_a_typed_error_on_both_sides_and_never_downgrades() {
    for (c_auth, s_auth) in [(Auth::None, psk(KEY)), (psk(KEY), Auth::None)] {
        let (c_mode, s_mode) = (
            matches!(c_auth, Auth::Psk(_)),
            matches!(s_auth, Auth::Psk(_)),
        );
        let (mut c, mut s) = (client(c_auth, 1), server(s_auth, 2));
        pump(&mut c, &mut s);
        let mode = |psk| if psk { AuthMode::Psk } else { AuthMode::None };
        assert_eq!(
            s.error(),
            Some(&HandshakeError::AuthModeMismatch {
                ours: mode(s_mode),
                theirs: mode(c_mode) as u8
            })
        );
        assert_eq!(
            c.error(),
            Some(&HandshakeError::AuthModeMismatch {
                ours: mode(c_mode),
                theirs: mode(s_mode) as u8
            })
        );
        assert!(s.agreed().is_none() && c.agreed().is_none());
    }
}

#[test]
fn replayed_client_side_fails_authentication_against_a_fresh_server_nonce() {
    let (mut c, mut s) = (client(psk(KEY), 1), server(psk(KEY), 2));
    let (c_out, _) = pump(&mut c, &mut s);
    assert!(s.agreed().is_some());
    assert_eq!(c_out.len(), 2, "hello and offer");

    let mut fresh = server(psk(KEY), 3);
    assert_eq!(fresh.feed(&c_out[0]), Ok(c_out[0].len()));
    assert!(
        fresh.take_output().is_some(),
        "challenge with the fresh nonce"
    );
    assert_eq!(
        fresh.feed(&c_out[1]),
        Err(HandshakeError::AuthenticationFailed)
    );
    assert!(fresh.agreed().is_none());
}

#[test]
fn reflected_client_mac_does_not_authenticate_a_server() {
    // An attacker posing as server answers with the client's own MAC in the accept slot.
    let mut c = client(psk(KEY), 1);
    let mut s = server(psk(KEY), 2);
    let hello = c.take_output().expect("hello");
    s.feed(&hello).expect("hello ok");
    let challenge = s.take_output().expect("challenge");
    c.feed(&challenge).expect("challenge ok");
    let offer_msg = c.take_output().expect("offer");
    s.feed(&offer_msg).expect("offer ok");
    let mut accept = s.take_output().expect("accept");
    let n = accept.len();
    accept[n - 32..].copy_from_slice(&offer_msg[offer_msg.len() - 32..]);
    assert_eq!(c.feed(&accept), Err(HandshakeError::AuthenticationFailed));
}

#[test]
fn altered_offer_is_detected_by_the_server_mac_check() {
    let mut c = client(psk(KEY), 1);
    let mut s = server(psk(KEY), 2);
    s.feed(&c.take_output().expect("hello")).expect("hello");
    c.feed(&s.take_output().expect("challenge"))
        .expect("challenge");
    let mut offer_msg = c.take_output().expect("offer");
    offer_msg[12] ^= 1; // streams
    assert_eq!(
        s.feed(&offer_msg),
        Err(HandshakeError::AuthenticationFailed)
    );
}

#[test]
fn truncated_handshake_needs_more_bytes_and_completes_when_they_arrive() {
    let (mut c, mut s) = (client(psk(KEY), 1), server(psk(KEY), 2));
    // Deliver every message one byte at a time: no error, no completion until the last byte.
    for _ in 0..4 {
        if let Some(b) = c.take_output() {
            for (i, byte) in b.iter().enumerate() {
                assert_eq!(s.feed(std::slice::from_ref(byte)), Ok(1), "byte {i}");
            }
        }
        if let Some(b) = s.take_output() {
            for (i, byte) in b.iter().enumerate() {
                assert!(c.agreed().is_none());
                assert_eq!(c.feed(std::slice::from_ref(byte)), Ok(1), "byte {i}");
            }
        }
    }
    assert!(c.agreed().is_some() && s.agreed().is_some());
    assert_eq!(c.agreed(), s.agreed());
}

#[test]
fn bytes_after_the_last_handshake_message_are_left_to_the_caller() {
    let (mut c, mut s) = (client(Auth::None, 1), server(Auth::None, 2));
    s.feed(&c.take_output().expect("hello")).expect("hello");
    c.feed(&s.take_output().expect("challenge"))
        .expect("challenge");
    let mut offer_then_frames = c.take_output().expect("offer");
    let offer_len = offer_then_frames.len();
    offer_then_frames.extend_from_slice(b"VMF1 frame bytes");
    assert_eq!(s.feed(&offer_then_frames), Ok(offer_len));
    let mut accept = s.take_output().expect("accept");
    let accept_len = accept.len();
    accept.extend_from_slice(b"VMF1");
    assert_eq!(c.feed(&accept), Ok(accept_len));
    assert_eq!(c.feed(b"more"), Ok(0));
    assert!(c.agreed().is_some());
}

#[test]
fn garbage_input_gives_bad_magic_on_the_first_wrong_byte() {
    let mut s = server(psk(KEY), 2);
    assert_eq!(
        s.feed(b"GET / HTTP/1.1\r\n"),
        Err(HandshakeError::BadMagic { found: *b"GET " })
    );
    assert!(s.is_failed());
    // The failure is sticky and a refusal is queued for the peer.
    assert!(s.feed(b"VMHS").is_err());
    assert!(s.take_output().is_some());

    let mut c = client(psk(KEY), 1);
    let _ = c.take_output();
    assert_eq!(
        c.feed(b"VMX"),
        Err(HandshakeError::BadMagic { found: *b"VMX\0" })
    );
}

fn envelope(ty: u8, body_len: u32) -> Vec<u8> {
    let mut e = b"VMHS".to_vec();
    e.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    e.push(ty);
    e.push(0);
    e.extend_from_slice(&body_len.to_le_bytes());
    e
}

#[test]
fn oversize_declared_body_is_refused_before_the_body_is_buffered() {
    let mut s = server(Auth::None, 2);
    assert_eq!(
        s.feed(&envelope(1, u32::MAX)),
        Err(HandshakeError::TooLarge {
            what: "handshake message body",
            declared: u64::from(u32::MAX),
            limit: HELLO_BODY_LEN as u64
        })
    );
    // An offer body larger than the server's device limit allows.
    let mut c = client(Auth::None, 1);
    let mut s = server(Auth::None, 2);
    s.feed(&c.take_output().expect("hello")).expect("hello");
    c.feed(&s.take_output().expect("challenge"))
        .expect("challenge");
    let r = s.feed(&envelope(3, 1 << 30));
    assert!(
        matches!(r, Err(HandshakeError::TooLarge { declared, .. }) if declared == 1 << 30),
        "{r:?}"
    );
}

/// Runs hello/challenge with `Auth::None`, then feeds `patch(offer)` to the server.
fn feed_patched_offer(patch: impl FnOnce(&mut Vec<u8>)) -> (ServerHandshake, ClientHandshake) {
    let mut c = client(Auth::None, 1);
    let mut s = server(Auth::None, 2);
    s.feed(&c.take_output().expect("hello")).expect("hello");
    c.feed(&s.take_output().expect("challenge"))
        .expect("challenge");
    let mut m = c.take_output().expect("offer");
    patch(&mut m);
    let _ = s.feed(&m);
    if let Some(b) = s.take_output() {
        let _ = c.feed(&b);
    }
    (s, c)
}

#[test]
fn too_many_devices_is_refused_before_allocating_and_the_client_learns_the_limit() {
    let (s, c) = feed_patched_offer(|m| m[14..16].copy_from_slice(&60000u16.to_le_bytes()));
    assert_eq!(
        s.error(),
        Some(&HandshakeError::TooManyDevices {
            declared: 60000,
            limit: 64
        })
    );
    assert_eq!(
        c.error(),
        Some(&HandshakeError::Refused {
            code: RefuseCode::TooManyDevices,
            value: 64
        })
    );
}

#[test]
fn device_count_larger_than_the_body_is_malformed() {
    let (s, _) = feed_patched_offer(|m| m[14..16].copy_from_slice(&60u16.to_le_bytes()));
    assert!(matches!(s.error(), Some(HandshakeError::Malformed { .. })));
}

#[test]
fn oversize_device_name_length_is_refused() {
    // First device's name length field sits right after the 40-byte fixed part.
    let (s, _) = feed_patched_offer(|m| m[52..54].copy_from_slice(&1000u16.to_le_bytes()));
    assert_eq!(
        s.error(),
        Some(&HandshakeError::TooLarge {
            what: "device name",
            declared: 1000,
            limit: 255
        })
    );
}

#[test]
fn offer_without_raw_codec_is_refused() {
    let (s, c) = feed_patched_offer(|m| m[16..20].copy_from_slice(&0b100u32.to_le_bytes()));
    assert_eq!(
        s.error(),
        Some(&HandshakeError::NoCommonCodec { offered: 0b100 })
    );
    assert!(matches!(
        c.error(),
        Some(HandshakeError::Refused {
            code: RefuseCode::NoCommonCodec,
            ..
        })
    ));
}

#[test]
fn unexpected_message_order_is_refused() {
    let mut s = server(Auth::None, 2);
    let mut m = envelope(4, ACCEPT_BODY_LEN.try_into().unwrap());
    m.resize(12 + ACCEPT_BODY_LEN, 0);
    assert_eq!(
        s.feed(&m),
        Err(HandshakeError::UnexpectedMessage {
            expected: MsgType::ClientHello,
            found: 4
        })
    );
}

#[test]
fn join_reports_session_and_index_and_bad_index_is_refused() {
    let join = |idx| {
        let mut c = ClientHandshake::new(ClientParams {
            auth: psk(KEY),
            offer: offer(),
            join: Some(([0x42; 16], idx)),
            nonce: [1; 32],
        });
        let mut s = ServerHandshake::new(ServerParams {
            auth: psk(KEY),
            limits: Limits {
                max_streams: 2,
                ..Limits::default()
            },
            session_id: [0xab; 16],
            nonce: [2; 32],
            devices: None,
        });
        pump(&mut c, &mut s);
        (c, s)
    };
    let (c, s) = join(1);
    let a = s.agreed().expect("join ok");
    assert_eq!(
        (a.session_id, a.conn_index, a.joined),
        ([0x42; 16], 1, true)
    );
    assert_eq!(c.agreed(), Some(a));

    let (c, s) = join(3);
    assert_eq!(
        s.error(),
        Some(&HandshakeError::BadJoinIndex {
            index: 3,
            streams: 2
        })
    );
    assert!(matches!(
        c.error(),
        Some(HandshakeError::Refused {
            code: RefuseCode::BadJoinIndex,
            value: 2
        })
    ));
}

#[test]
fn invalid_local_parameters_fail_at_construction_without_output() {
    let mut c = client(Auth::Psk(Vec::new()), 1);
    assert!(c.is_failed());
    assert!(c.take_output().is_none());
    let mut bad = offer();
    bad.devices.push(dev(&"x".repeat(300)));
    let c = ClientHandshake::new(ClientParams {
        auth: Auth::None,
        offer: bad,
        join: None,
        nonce: [1; 32],
    });
    assert!(matches!(
        c.error(),
        Some(HandshakeError::BadLocalParams { .. })
    ));
    let s = ServerHandshake::new(ServerParams {
        auth: Auth::None,
        limits: Limits {
            max_devices: 0,
            ..Limits::default()
        },
        session_id: [0; 16],
        nonce: [2; 32],
        devices: None,
    });
    assert!(s.is_failed());
}

/// Runs a PSK exchange flipping `bit` of message `msg_idx` (0 hello, 1 challenge, 2 offer,
/// 3 accept) in flight; returns whether the flipped message existed.
fn exchange_with_flip(msg_idx: usize, bit: usize) -> Option<(ClientHandshake, ServerHandshake)> {
    let mut c = client(psk(KEY), 1);
    let mut s = server(psk(KEY), 2);
    let mut n = 0usize;
    let mut hit = false;
    for _ in 0..4 {
        for from_client in [true, false] {
            let out = if from_client {
                c.take_output()
            } else {
                s.take_output()
            };
            let Some(mut b) = out else { continue };
            if n == msg_idx && bit < b.len() * 8 {
                b[bit / 8] ^= 1 << (bit % 8);
                hit = true;
            }
            n += 1;
            let _ = if from_client { s.feed(&b) } else { c.feed(&b) };
        }
    }
    hit.then_some((c, s))
}

/// A bit flipped anywhere in any message of a PSK exchange (exhaustively) never yields an
/// agreement: the receiver fails with a typed error (MAC, auth mode, reserved, type, magic,
/// version) or, when the flip grew a length field, keeps waiting for bytes that never come. The
/// client completes last, so it never completes; the server completes only if the flip was in its
/// own final message.
#[test]
fn a_bit_flipped_anywhere_in_any_psk_message_prevents_agreement() {
    for msg_idx in 0..4 {
        let mut bit = 0;
        while let Some((c, s)) = exchange_with_flip(msg_idx, bit) {
            assert!(c.agreed().is_none(), "message {msg_idx} bit {bit}");
            assert!(
                s.agreed().is_none() || msg_idx == 3,
                "message {msg_idx} bit {bit}"
            );
            let waiting = !c.is_failed() && !s.is_failed();
            // Only a grown length field (envelope bytes 8..12) may leave both sides waiting.
            assert!(
                !waiting || (64..96).contains(&bit),
                "message {msg_idx} bit {bit}"
            );
            bit += 1;
        }
        assert!(bit >= 48 * 8, "message {msg_idx} was flipped bit by bit");
    }
}

fn arb_device() -> impl Strategy<Value = DeviceDesc> {
    ("[a-z0-9:._-]{1,40}|\\PC{1,20}", any::<u64>(), any::<u64>()).prop_map(|(name, caps, hint)| {
        DeviceDesc {
            name,
            caps,
            state_size_hint: hint,
            decl: Default::default(),
        }
    })
}

fn arb_offer() -> impl Strategy<Value = Offer> {
    (
        1u16..64,
        any::<u32>(),
        1u32..(8 << 20),
        1u64..(1 << 40),
        prop::collection::vec(arb_device(), 0..12),
    )
        .prop_map(
            |(streams, codecs, max_payload, window_bytes, devices)| Offer {
                streams,
                codecs: codecs | codec_bit(Codec::Raw),
                max_payload,
                window_bytes,
                devices,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every handshake message round-trips: whatever valid offer the client makes, both sides
    /// agree on the same parameters, the devices arrive intact and nothing exceeds either side.
    #[test]
    fn any_valid_offer_round_trips_through_all_four_messages(
        o in arb_offer(),
        use_psk in any::<bool>(),
        key in prop::collection::vec(any::<u8>(), 1..80),
        nc in any::<[u8; 32]>(),
        ns in any::<[u8; 32]>(),
        join_sid in any::<Option<[u8; 16]>>(),
        join_idx in any::<prop::sample::Index>(),
    ) {
        prop_assume!(nc != ns);
        let auth = if use_psk { Auth::Psk(key) } else { Auth::None };
        let limits = Limits::default();
        let streams = o.streams.min(limits.max_streams);
        // A join needs an index in 1..streams.
        let join = join_sid.filter(|_| streams > 1).map(|sid| {
            let idx = 1 + join_idx.index(usize::from(streams) - 1);
            (sid, u16::try_from(idx).unwrap())
        });
        let mut c = ClientHandshake::new(ClientParams {
            auth: auth.clone(), offer: o.clone(), join, nonce: nc,
        });
        let mut s = ServerHandshake::new(ServerParams {
            auth, limits: limits.clone(), session_id: [9; 16], nonce: ns, devices: None,
        });
        pump(&mut c, &mut s);
        let a = c.agreed().expect("client agreed");
        prop_assert_eq!(Some(a), s.agreed());
        prop_assert_eq!(&a.devices, &o.devices);
        prop_assert_eq!(a.authenticated, use_psk);
        prop_assert_eq!(a.streams, o.streams.min(limits.max_streams));
        prop_assert_eq!(a.window_bytes, o.window_bytes.min(limits.max_window_bytes));
        prop_assert!(a.max_payload <= o.max_payload && u64::from(a.max_payload) <= a.window_bytes);
        prop_assert_eq!(a.codecs, o.codecs & KNOWN_CODECS);
        match join {
            Some((sid, idx)) => prop_assert_eq!((a.session_id, a.conn_index, a.joined), (sid, idx, true)),
            None => prop_assert_eq!((a.session_id, a.conn_index, a.joined), ([9; 16], 0, false)),
        }
    }

    /// Arbitrary bytes never panic either side, consume at most what was given, and never
    /// complete a PSK handshake.
    #[test]
    fn arbitrary_bytes_never_panic_or_authenticate(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 0..6),
        prefix_magic in any::<bool>(),
    ) {
        let mut s = server(psk(KEY), 2);
        let mut c = client(psk(KEY), 1);
        let _ = c.take_output();
        for (i, ch) in chunks.iter().enumerate() {
            let mut b = ch.clone();
            if prefix_magic && i == 0 {
                let mut e = envelope(1, 36);
                e.extend_from_slice(&b);
                b = e;
            }
            if let Ok(n) = s.feed(&b) { prop_assert!(n <= b.len()); }
            if let Ok(n) = c.feed(&b) { prop_assert!(n <= b.len()); }
        }
        prop_assert!(c.agreed().is_none());
        prop_assert!(s.agreed().is_none());
    }
}

#[test]
fn psk_sessions_derive_equal_keys_on_both_sides_fresh_per_handshake_and_seal_frames() {
    let (mut c, mut s) = (client(psk(KEY), 1), server(psk(KEY), 2));
    pump(&mut c, &mut s);
    let (a, b) = (c.agreed().unwrap(), s.agreed().unwrap());
    assert_eq!(a.protection, vfmig_wire::FrameProtection::Aes256Gcm);
    let keys = a.keys.clone().expect("PSK derives keys");
    assert_eq!(Some(&keys), b.keys.as_ref());
    // Another handshake with the same key (fresh nonces) gives other keys.
    let (mut c2, mut s2) = (client(psk(KEY), 3), server(psk(KEY), 4));
    pump(&mut c2, &mut s2);
    assert_ne!(c2.agreed().unwrap().keys.as_ref(), Some(&keys));
    // Without a key: CRC32C and no keys.
    let (mut c3, mut s3) = (client(Auth::None, 1), server(Auth::None, 2));
    pump(&mut c3, &mut s3);
    let n = c3.agreed().unwrap();
    assert_eq!(
        (n.protection, n.keys.is_none()),
        (vfmig_wire::FrameProtection::Crc32c, true)
    );
}

#[test]
fn a_frame_protection_mismatch_is_refused_with_a_typed_error_on_both_sides() {
    use vfmig_wire::FrameProtection;
    let params = ClientParams {
        auth: psk(KEY),
        offer: offer(),
        join: None,
        nonce: [1; 32],
    };
    // A PSK client inside TLS (CRC32C) against a PSK server that wants sealed frames.
    let mut c = ClientHandshake::with_protection(params, FrameProtection::Crc32c);
    let mut s = server(psk(KEY), 2);
    pump(&mut c, &mut s);
    assert_eq!(
        s.error(),
        Some(&HandshakeError::ProtectionMismatch {
            ours: FrameProtection::Aes256Gcm,
            theirs: 1
        })
    );
    assert_eq!(
        c.error(),
        Some(&HandshakeError::ProtectionMismatch {
            ours: FrameProtection::Crc32c,
            theirs: 2
        })
    );
    // Sealed frames need a key.
    let c = ClientHandshake::with_protection(
        ClientParams {
            auth: Auth::None,
            offer: offer(),
            join: None,
            nonce: [1; 32],
        },
        FrameProtection::Aes256Gcm,
    );
    assert!(matches!(
        c.error(),
        Some(HandshakeError::BadLocalParams { .. })
    ));
}

fn emu_decl(size: u64, compat: &str) -> vfmig_wire::declare::DeviceDecl {
    vfmig_wire::declare::DeviceDecl {
        kind: vfmig_wire::declare::DeviceKind::Emulated,
        size: Some(size),
        compat: compat.into(),
    }
}

fn declaring_pair(
    client_decls: [vfmig_wire::declare::DeviceDecl; 2],
    server_decls: Option<Vec<vfmig_wire::declare::DeviceDecl>>,
) -> (ClientHandshake, ServerHandshake) {
    let mut o = offer();
    for (d, decl) in o.devices.iter_mut().zip(client_decls) {
        d.decl = decl;
    }
    let c = ClientHandshake::new(ClientParams {
        auth: psk(KEY),
        offer: o,
        join: None,
        nonce: [1; 32],
    });
    let s = ServerHandshake::new(ServerParams {
        auth: psk(KEY),
        limits: Limits::default(),
        session_id: [0xab; 16],
        nonce: [2; 32],
        devices: server_decls,
    });
    (c, s)
}

#[test]
fn mismatched_device_declarations_fail_both_sides_with_both_values() {
    let src = [emu_decl(128 << 20, "seed=0"), emu_decl(64 << 20, "seed=1")];
    let dst = vec![emu_decl(64 << 20, "seed=0"), emu_decl(64 << 20, "seed=1")];
    let (mut c, mut s) = declaring_pair(src.clone(), Some(dst.clone()));
    pump(&mut c, &mut s);
    assert!(c.agreed().is_none() && s.agreed().is_none());
    for e in [c.error(), s.error()] {
        let Some(HandshakeError::DeviceMismatch(m)) = e else {
            panic!("device mismatch expected, got {e:?}");
        };
        assert_eq!(m.index, 0);
        assert_eq!(m.field, vfmig_wire::declare::DeclField::Size);
        assert_eq!((&m.source, &m.destination), (&src[0], &dst[0]));
    }
    // A count mismatch is found by both sides too.
    let (mut c, mut s) = declaring_pair(src.clone(), Some(dst[..1].to_vec()));
    pump(&mut c, &mut s);
    for e in [c.error(), s.error()] {
        assert_eq!(
            e,
            Some(&HandshakeError::DeviceCountMismatch {
                source_count: 2,
                destination_count: 1
            })
        );
    }
}

#[test]
fn matching_or_undeclared_devices_agree() {
    let src = [emu_decl(64 << 20, "seed=0"), emu_decl(64 << 20, "seed=1")];
    for server_decls in [Some(src.to_vec()), None] {
        let (mut c, mut s) = declaring_pair(src.clone(), server_decls);
        pump(&mut c, &mut s);
        assert!(c.agreed().is_some(), "{:?}", c.error());
        assert!(s.agreed().is_some(), "{:?}", s.error());
        assert_eq!(
            s.agreed().map(|a| a.devices[0].decl.clone()),
            Some(src[0].clone())
        );
    }
}
