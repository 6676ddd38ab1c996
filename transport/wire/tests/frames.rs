//! Frames: round trips for every kind through the deframer, and typed errors (no panic) for a bit
//! flipped anywhere, truncation at every position, oversize lengths, garbage and kind rules.

use proptest::prelude::*;
use vfmig_wire::*;

fn data(kind: FrameKind, codec: Codec, raw_len: u32, wire: &[u8], arg: u64) -> Vec<u8> {
    // Session-wide kinds carry device 0 and seq 0.
    let (device, seq) = match kind {
        FrameKind::Abort | FrameKind::Keepalive => (0, 0),
        _ => (3, 17),
    };
    let h = FrameHeader {
        kind,
        codec,
        device,
        seq,
        raw_len,
        wire_len: wire.len().try_into().unwrap(),
        arg,
        crc: 0,
    };
    let mut v = h.encode(wire).to_vec();
    v.extend_from_slice(wire);
    v
}

/// One small valid frame of every kind.
fn one_of_each() -> Vec<Vec<u8>> {
    let mut v = vec![
        data(FrameKind::PreCopyData, Codec::Raw, 5, b"hello", 0),
        data(FrameKind::StopCopyData, Codec::Zstd, 100, b"zstdish", 5),
        data(FrameKind::StopCopyData, Codec::Zero, 4096, b"", 5),
        data(
            FrameKind::DirtyPages,
            Codec::Lz4,
            8192,
            b"lz4 bytes",
            0x1000,
        ),
    ];
    for c in [
        Control::EndOfDevice {
            device: 1,
            seq: 9,
            total_raw_bytes: 12345,
            digest: [0x5a; 32],
        },
        Control::PreCopyDone {
            device: 1,
            seq: 4,
            precopy_bytes: 99,
        },
        Control::SwitchoverAck {
            device: 2,
            raw_bytes: 77,
        },
        Control::DevicePrepared {
            device: 2,
            total_raw_bytes: 12345,
        },
        Control::Abort {
            reason: AbortReason::DestinationDevice,
            detail: "device refused its state".into(),
        },
        Control::Keepalive { millis: 1234 },
        Control::Commit,
        Control::Outcome {
            outcome: FinalOutcome::ResumeFailed,
        },
        Control::InitialDataSent {
            device: 1,
            seq: 2,
            raw_bytes: 4096,
        },
    ] {
        v.push(c.encode());
    }
    v
}

/// Feeds `bytes` then ends the stream; returns the frames and the first error (from `feed` or
/// from `finish`).
fn deframe(bytes: &[u8]) -> (Vec<Frame>, Option<WireError>) {
    let mut d = Deframer::new(MAX_PAYLOAD);
    let mut frames = Vec::new();
    let r = d
        .feed_all(bytes, |f| frames.push(f))
        .and_then(|()| d.finish());
    (frames, r.err())
}

#[test]
fn every_kind_decodes_back_to_what_was_encoded() {
    let all = one_of_each();
    let stream: Vec<u8> = all.concat();
    let (frames, err) = deframe(&stream);
    assert_eq!(err, None);
    assert_eq!(frames.len(), all.len());
    let kinds: Vec<FrameKind> = frames.iter().map(|f| f.header.kind).collect();
    for k in 1..=9 {
        assert!(
            kinds.contains(&FrameKind::from_code(k).unwrap()),
            "kind {k}"
        );
    }
    for (f, bytes) in frames.iter().zip(&all) {
        assert_eq!(&f.payload[..], &bytes[HEADER_LEN..]);
    }
}

/// The errors a flip at `offset` of the frame may legitimately produce.
fn allowed(offset: usize, e: &WireError) -> bool {
    use WireError::*;
    match offset {
        0..=3 => matches!(e, BadFrameMagic { .. }),
        4 => matches!(e, UnknownKind { .. } | KindRule { .. } | Checksum { .. }),
        5 => matches!(
            e,
            UnknownCodec { .. } | LengthMismatch { .. } | KindRule { .. } | Checksum { .. }
        ),
        6..=15 => matches!(e, KindRule { .. } | Checksum { .. }),
        16..=23 => matches!(
            e,
            Oversize { .. }
                | LengthMismatch { .. }
                | KindRule { .. }
                | Checksum { .. }
                | Truncated { .. }
                | BadFrameMagic { .. }
        ),
        24..=31 => matches!(e, KindRule { .. } | Checksum { .. }),
        32..=35 => matches!(e, ReservedFlags { .. }),
        _ => matches!(e, Checksum { .. }),
    }
}

#[test]
fn a_bit_flipped_anywhere_in_any_frame_gives_the_field_specific_typed_error() {
    for frame in one_of_each() {
        for bit in 0..frame.len() * 8 {
            let mut b = frame.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let (frames, err) = deframe(&b);
            let err = err.unwrap_or_else(|| panic!("flip of bit {bit} went unnoticed"));
            assert!(frames.is_empty(), "flip of bit {bit} still yielded a frame");
            assert!(allowed(bit / 8, &err), "bit {bit}: {err:?}");
        }
    }
}

#[test]
fn a_stream_cut_at_any_byte_of_a_frame_is_truncated_with_the_counts() {
    for frame in one_of_each() {
        for cut in 1..frame.len() {
            let (frames, err) = deframe(&frame[..cut]);
            assert!(frames.is_empty());
            let expected = if cut < HEADER_LEN {
                HEADER_LEN
            } else {
                frame.len()
            };
            assert_eq!(
                err,
                Some(WireError::Truncated {
                    received: cut,
                    expected
                })
            );
        }
    }
}

#[test]
fn an_empty_stream_and_a_stream_ending_on_a_frame_boundary_are_clean() {
    assert_eq!(deframe(&[]), (vec![], None));
    let two = [one_of_each()[0].clone(), one_of_each()[1].clone()].concat();
    let (frames, err) = deframe(&two);
    assert_eq!((frames.len(), err), (2, None));
}

#[test]
fn oversize_lengths_are_refused_from_the_header_before_the_payload_arrives() {
    let mut h = data(FrameKind::StopCopyData, Codec::Raw, 1, b"x", 0);
    h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    h[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut d = Deframer::new(MAX_PAYLOAD);
    assert_eq!(
        d.feed(&h[..HEADER_LEN]),
        Err(WireError::Oversize {
            raw_len: u32::MAX,
            wire_len: u32::MAX,
            max: MAX_PAYLOAD
        })
    );
    // The session's agreed limit applies too.
    let frame = data(FrameKind::StopCopyData, Codec::Raw, 8, b"12345678", 0);
    let mut d = Deframer::new(4);
    assert_eq!(
        d.feed(&frame),
        Err(WireError::Oversize {
            raw_len: 8,
            wire_len: 8,
            max: 4
        })
    );
    assert!(d.feed(&frame).is_err(), "errors are sticky");
    assert!(d.finish().is_err());
}

#[test]
fn paged_raw_lengths_are_checked_against_the_map_from_the_header() {
    // 5000 raw bytes: 10 granules, a 2-byte map.
    assert_eq!(page_map_len(5000), 2);
    assert_eq!(page_map_len(512), 1);
    assert_eq!(page_map_len(MAX_PAYLOAD), MAX_PAYLOAD / MAP_GRANULE / 8);
    let ok = |wire: usize| {
        let bytes = data(
            FrameKind::StopCopyData,
            Codec::PagedRaw,
            5000,
            &vec![1; wire],
            0,
        );
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&bytes[..HEADER_LEN]);
        FrameHeader::decode(&h)
    };
    assert!(ok(3).is_ok(), "map and one byte");
    assert!(ok(5002).is_ok(), "map and every byte");
    for wire in [1, 2, 5003] {
        assert!(
            matches!(
                ok(wire),
                Err(WireError::LengthMismatch {
                    codec: Codec::PagedRaw,
                    ..
                })
            ),
            "wire {wire}"
        );
    }
    for c in [Codec::PagedRaw, Codec::PagedZstd, Codec::PagedLz4] {
        assert!(c.is_paged());
        assert_eq!(Codec::from_code(c as u8), Some(c));
    }
    assert!(!Codec::Raw.is_paged());
    assert_eq!(Codec::from_code(7), None);
}

#[test]
fn garbage_is_refused_at_its_first_byte() {
    let mut d = Deframer::new(MAX_PAYLOAD);
    assert_eq!(
        d.feed(b"X"),
        Err(WireError::BadFrameMagic { found: *b"X\0\0\0" })
    );
    // A handshake message where a frame was expected is recognisable by its magic.
    let mut d = Deframer::new(MAX_PAYLOAD);
    assert_eq!(
        d.feed(b"VMHS\x01\x00"),
        Err(WireError::BadFrameMagic { found: *b"VMHS" })
    );
}

#[test]
fn kind_rules_are_enforced_from_the_header() {
    let rule = |b: Vec<u8>| match deframe(&b).1 {
        Some(WireError::KindRule { what, .. }) => what,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        rule(data(FrameKind::DirtyPages, Codec::Zero, 4096, b"", 0x1001)),
        "gpa not page aligned"
    );
    assert_eq!(
        rule(data(FrameKind::DirtyPages, Codec::Zero, 100, b"", 0)),
        "raw length not whole pages"
    );
    assert_eq!(
        rule(data(FrameKind::PreCopyData, Codec::Raw, 0, b"", 0)),
        "data frame with no data"
    );
    assert_eq!(
        rule(data(FrameKind::EndOfDevice, Codec::Raw, 3, b"abc", 0)),
        "payload must be the raw 32-byte digest"
    );
    assert_eq!(
        rule(data(FrameKind::Keepalive, Codec::Raw, 1, b"a", 0)),
        "payload must be empty"
    );
    let long = vec![b'a'; MAX_ABORT_DETAIL + 1];
    let len = long.len().try_into().unwrap();
    assert_eq!(
        rule(data(FrameKind::Abort, Codec::Raw, len, &long, 1)),
        "detail longer than MAX_ABORT_DETAIL"
    );
}

#[test]
fn abort_detail_that_is_not_utf8_is_a_typed_error_and_long_detail_is_cut_at_a_char_boundary() {
    let bytes = data(FrameKind::Abort, Codec::Raw, 3, b"a\xffb", 4);
    let (frames, err) = deframe(&bytes);
    assert_eq!(err, None);
    assert_eq!(
        Control::try_from(&frames[0]),
        Err(WireError::AbortDetailNotUtf8 { valid_up_to: 1 })
    );

    let detail = "é".repeat(MAX_ABORT_DETAIL); // 2 bytes each
    let c = Control::Abort {
        reason: AbortReason::Unknown(999),
        detail,
    };
    let (frames, err) = deframe(&c.encode());
    assert_eq!(err, None);
    match Control::try_from(&frames[0]) {
        Ok(Control::Abort { reason, detail }) => {
            assert_eq!(reason, AbortReason::Unknown(999));
            assert_eq!(detail.len(), MAX_ABORT_DETAIL);
            assert!(detail.chars().all(|ch| ch == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_abort_code_round_trips_through_a_frame_and_unknown_codes_keep_their_value() {
    for (i, reason) in AbortReason::ALL.into_iter().enumerate() {
        // Codes are dense from 1, in the order of docs/PROTOCOL.md.
        assert_eq!(usize::from(reason.code()), i + 1, "{reason:?}");
        assert_eq!(AbortReason::from_code(reason.code()), reason);
        assert_eq!(format!("{reason:?}"), reason.name());
        let c = Control::Abort {
            reason,
            detail: String::new(),
        };
        let (frames, err) = deframe(&c.encode());
        assert_eq!(err, None);
        assert_eq!(Control::try_from(&frames[0]), Ok(c));
    }
    for code in [0, 11, 999, u16::MAX] {
        assert_eq!(AbortReason::from_code(code), AbortReason::Unknown(code));
        assert_eq!(AbortReason::Unknown(code).code(), code);
    }
}

#[test]
fn every_final_outcome_round_trips_and_commit_carries_nothing() {
    for (i, outcome) in FinalOutcome::ALL.into_iter().enumerate() {
        assert_eq!(usize::from(outcome.code()), i + 1, "{outcome:?}");
        let c = Control::Outcome { outcome };
        let (frames, err) = deframe(&c.encode());
        assert_eq!(err, None);
        assert_eq!(Control::try_from(&frames[0]), Ok(c));
    }
    assert_eq!(FinalOutcome::from_code(77), FinalOutcome::Unknown(77));
    let mut h = Control::Commit.header();
    h.arg = 1;
    assert_eq!(
        FrameHeader::decode(&h.encode(&[])),
        Err(WireError::KindRule {
            kind: FrameKind::Commit,
            what: "arg must be 0"
        })
    );
}

#[test]
fn abort_reason_above_16_bits_is_a_kind_rule_error() {
    let mut h = Control::Abort {
        reason: AbortReason::Cancelled,
        detail: String::new(),
    }
    .header();
    h.arg = 1 << 16;
    let bytes = h.encode(&[]);
    assert_eq!(
        FrameHeader::decode(&bytes),
        Err(WireError::KindRule {
            kind: FrameKind::Abort,
            what: "reason code above 16 bits"
        })
    );
}

#[test]
fn data_frames_are_not_control_frames() {
    let (frames, _) = deframe(&one_of_each()[0]);
    assert_eq!(
        Control::try_from(&frames[0]),
        Err(WireError::NotControl {
            kind: FrameKind::PreCopyData
        })
    );
}

#[test]
fn header_decode_and_verify_serve_the_split_header_then_payload_path() {
    let frame = data(FrameKind::StopCopyData, Codec::Raw, 5, b"hello", 42);
    let hdr: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
    let h = FrameHeader::decode(&hdr).unwrap();
    assert_eq!((h.arg, h.wire_len), (42, 5));
    assert_eq!(h.verify(&hdr, b"hello"), Ok(()));
    assert!(matches!(
        h.verify(&hdr, b"hellO"),
        Err(WireError::Checksum {
            device: 3,
            seq: 17,
            ..
        })
    ));
}

fn arb_codec_payload(raw_len: u32) -> impl Strategy<Value = (Codec, Vec<u8>)> {
    let n = raw_len as usize;
    prop_oneof![
        prop::collection::vec(any::<u8>(), n..=n).prop_map(|p| (Codec::Raw, p)),
        Just((Codec::Zero, Vec::new())),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|p| (Codec::Zstd, p)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|p| (Codec::Lz4, p)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|p| (Codec::PagedZstd, p)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|p| (Codec::PagedLz4, p)),
        // A map plus some of the granules.
        (0..=n).prop_flat_map(move |k| {
            let map = page_map_len(raw_len) as usize;
            prop::collection::vec(any::<u8>(), map + k.max(1)..=map + k.max(1))
                .prop_map(|p| (Codec::PagedRaw, p))
        }),
    ]
}

fn arb_data_frame() -> impl Strategy<Value = (FrameHeader, Vec<u8>)> {
    let kind = prop_oneof![
        Just(FrameKind::PreCopyData),
        Just(FrameKind::StopCopyData),
        Just(FrameKind::DirtyPages),
    ];
    (kind, 1u32..600, any::<u16>(), any::<u64>(), any::<u64>()).prop_flat_map(
        |(kind, len, device, seq, arg)| {
            let (raw_len, arg) = if kind == FrameKind::DirtyPages {
                (len % 3 * 4096 + 4096, arg & !0xfff)
            } else {
                (len, arg)
            };
            arb_codec_payload(raw_len).prop_map(move |(codec, payload)| {
                let h = FrameHeader {
                    kind,
                    codec,
                    device,
                    seq,
                    raw_len,
                    wire_len: payload.len().try_into().unwrap(),
                    arg,
                    crc: 0,
                };
                (h, payload)
            })
        },
    )
}

fn arb_control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(
            |(device, seq, total_raw_bytes, digest)| Control::EndOfDevice {
                device,
                seq,
                total_raw_bytes,
                digest
            }
        ),
        (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(device, seq, precopy_bytes)| {
            Control::PreCopyDone {
                device,
                seq,
                precopy_bytes,
            }
        }),
        (any::<u16>(), any::<u64>())
            .prop_map(|(device, raw_bytes)| Control::SwitchoverAck { device, raw_bytes }),
        (any::<u16>(), any::<u64>()).prop_map(|(device, total_raw_bytes)| {
            Control::DevicePrepared {
                device,
                total_raw_bytes,
            }
        }),
        (any::<u16>(), "\\PC{0,200}").prop_map(|(r, detail)| Control::Abort {
            reason: AbortReason::from_code(r),
            detail
        }),
        any::<u64>().prop_map(|millis| Control::Keepalive { millis }),
        Just(Control::Commit),
        (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(device, seq, raw_bytes)| {
            Control::InitialDataSent {
                device,
                seq,
                raw_bytes,
            }
        }),
        any::<u16>().prop_map(|c| Control::Outcome {
            outcome: FinalOutcome::from_code(c)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Data frames of every data kind and codec round-trip through the deframer, whatever the
    /// chunking of the byte stream.
    #[test]
    fn data_frames_round_trip_through_the_deframer_in_any_chunking(
        frames in prop::collection::vec(arb_data_frame(), 1..6),
        chunk in 1usize..97,
    ) {
        let mut stream = Vec::new();
        for (h, p) in &frames {
            stream.extend_from_slice(&h.encode(p));
            stream.extend_from_slice(p);
        }
        let mut d = Deframer::new(MAX_PAYLOAD);
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            d.feed_all(c, |f| out.push(f)).unwrap();
        }
        prop_assert_eq!(d.finish(), Ok(()));
        prop_assert_eq!(out.len(), frames.len());
        for (f, (h, p)) in out.iter().zip(&frames) {
            let mut want = *h;
            want.crc = f.header.crc;
            prop_assert_eq!(f.header, want);
            prop_assert_eq!(&f.payload, p);
        }
    }

    /// Control frames of every control kind round-trip through encode, the deframer and decode.
    #[test]
    fn control_frames_round_trip_through_the_deframer(c in arb_control(), chunk in 1usize..50) {
        let bytes = c.encode();
        let mut d = Deframer::new(MAX_PAYLOAD);
        let mut out = Vec::new();
        for ch in bytes.chunks(chunk) {
            d.feed_all(ch, |f| out.push(f)).unwrap();
        }
        prop_assert_eq!(d.finish(), Ok(()));
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(Control::try_from(&out[0]), Ok(c));
    }

    /// Arbitrary bytes never panic the deframer and never yield a frame that fails its CRC.
    #[test]
    fn arbitrary_bytes_never_panic_the_deframer(bytes in prop::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
        let mut b = bytes;
        if magic { b.splice(0..0, *b"VMF1"); }
        let mut d = Deframer::new(MAX_PAYLOAD);
        let mut out = Vec::new();
        let _ = d.feed_all(&b, |f| out.push(f));
        for f in out {
            let _ = Control::try_from(&f);
        }
    }
}

#[test]
fn header_bytes_read_fields_of_headers_that_do_not_decode_and_find_the_header_in_a_head() {
    let h = FrameHeader {
        kind: FrameKind::DirtyPages,
        codec: Codec::Lz4,
        device: 0x0102,
        seq: 0x0304_0506_0708_090a,
        raw_len: 4096,
        wire_len: 17,
        arg: 0x2000,
        crc: 0,
    };
    let bytes = h.encode(&[7; 17]);
    let b = HeaderBytes::new(bytes);
    assert_eq!(b.decode(), FrameHeader::decode(&bytes));
    let fields = (b.kind_byte(), b.codec_byte(), b.device(), b.seq());
    assert_eq!(fields, (3, 3, 0x0102, 0x0304_0506_0708_090a));
    let lens = (b.raw_len(), b.wire_len(), b.arg(), b.flags());
    assert_eq!(lens, (4096, 17, 0x2000, 0));
    let d = b.decode().unwrap();
    assert_eq!(b.crc(), d.crc);
    assert_eq!(b.verify(&d, &[7; 17]), Ok(()));
    // An unknown kind: no header, but the device and sequence number can still be named.
    let mut bad = bytes;
    bad[4] = 0xee;
    let bad = HeaderBytes::new(bad);
    assert_eq!(bad.decode(), Err(WireError::UnknownKind { kind: 0xee }));
    assert_eq!((bad.device(), bad.seq()), (h.device, h.seq));
    // A head is the header, then the tag; clearing the CRC gives the unprotected encoding.
    let head = b.into_head();
    assert_eq!(HeaderBytes::of_head(&head), b);
    assert_eq!(HeaderBytes::from_head(&head), Some(b));
    assert_eq!(HeaderBytes::from_head(&head[..HEADER_LEN - 1]), None);
    let mut cleared = b;
    cleared.clear_crc();
    assert_eq!(cleared.crc(), 0);
    assert_eq!(cleared.into_array(), h.encode_unprotected());
}

/// A device state frame with a hash trailer: `body` then 16 trailer bytes, CRC over header and
/// trailer.
fn trailer_frame(codec: Codec, raw_len: u32, body: &[u8]) -> Vec<u8> {
    let mut payload = body.to_vec();
    payload.extend_from_slice(&0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128.to_le_bytes());
    let h = FrameHeader {
        kind: FrameKind::StopCopyData,
        codec,
        device: 1,
        seq: 5,
        raw_len,
        wire_len: payload.len().try_into().unwrap(),
        arg: 4096,
        crc: 0,
    };
    let mut v = h.encode_hash_trailer(&payload, false).unwrap().to_vec();
    assert_eq!(v[32..36], FLAG_HASH_TRAILER.to_le_bytes());
    v.extend_from_slice(&payload);
    v
}

#[test]
fn hash_trailer_frames_decode_and_their_crc_covers_header_and_trailer_but_not_the_body() {
    let body: Vec<u8> = (0..200u8).map(|i| i.wrapping_mul(7)).collect();
    let frame = trailer_frame(Codec::Raw, 200, &body);
    let (frames, err) = deframe(&frame);
    assert_eq!(err, None);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].header.wire_len as usize, 200 + HASH_TRAILER_LEN);
    assert_eq!(&frames[0].payload[..], &frame[HEADER_LEN..]);
    for bit in 0..frame.len() * 8 {
        let mut b = frame.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let (frames, err) = deframe(&b);
        let in_body = (HEADER_LEN..HEADER_LEN + body.len()).contains(&(bit / 8));
        if in_body {
            // The receiver's hash check of the decoded bytes catches these (pipeline tests).
            assert_eq!(err, None, "bit {bit}");
            assert_eq!(frames.len(), 1, "bit {bit}");
        } else {
            assert!(err.is_some(), "flip of bit {bit} went unnoticed");
            assert!(frames.is_empty(), "flip of bit {bit} still yielded a frame");
        }
    }
    // Any codec but Zero; compressed and paged bodies are checked against their own lengths.
    let (_, err) = deframe(&trailer_frame(Codec::Zstd, 5000, &body));
    assert_eq!(err, None);
    let (_, err) = deframe(&trailer_frame(Codec::Raw, 199, &body));
    assert!(
        matches!(err, Some(WireError::LengthMismatch { .. })),
        "{err:?}"
    );
}

#[test]
fn the_hash_trailer_flag_is_refused_where_it_may_not_be() {
    let trailer = [7u8; HASH_TRAILER_LEN];
    let flagged = |kind: FrameKind, codec: Codec, raw_len: u32, payload: &[u8]| {
        let h = FrameHeader {
            kind,
            codec,
            device: 0,
            seq: 0,
            raw_len,
            wire_len: payload.len().try_into().unwrap(),
            arg: 0,
            crc: 0,
        };
        // The encoder refuses these...
        assert_eq!(
            h.encode_hash_trailer(payload, false),
            None,
            "{kind:?} {codec:?}"
        );
        // ...and so does the decoder, when a peer sets the flag anyway.
        let mut b = h.encode(payload);
        b[32..36].copy_from_slice(&FLAG_HASH_TRAILER.to_le_bytes());
        let mut v = b.to_vec();
        v.extend_from_slice(payload);
        let (frames, err) = deframe(&v);
        assert!(frames.is_empty());
        assert!(
            matches!(err, Some(WireError::ReservedFlags { flags: 1 })),
            "{kind:?} {codec:?}: {err:?}"
        );
    };
    let mut p = vec![1u8; 4096];
    p.extend_from_slice(&trailer);
    flagged(FrameKind::DirtyPages, Codec::Raw, 4096, &p);
    flagged(FrameKind::EndOfDevice, Codec::Raw, 32, &[0u8; 32]);
    // A payload with no room for a body besides the trailer.
    flagged(FrameKind::PreCopyData, Codec::Lz4, 64, &trailer);
    // Other flag bits stay reserved on data frames too.
    let mut f = trailer_frame(Codec::Raw, 8, &[1u8; 8]);
    f[32] = 3;
    let (_, err) = deframe(&f);
    assert!(
        matches!(err, Some(WireError::ReservedFlags { flags: 3 })),
        "{err:?}"
    );
}
