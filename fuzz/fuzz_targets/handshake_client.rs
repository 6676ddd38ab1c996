//! Client handshake: arbitrary server bytes must never panic and never complete a PSK handshake;
//! with `Auth::None` an accepted agreement never exceeds the client's offer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfmig_wire::handshake::{
    codec_bit, Auth, ClientHandshake, ClientParams, DeviceDesc, Handshake, Offer,
};
use vfmig_wire::declare::{DeviceDecl, DeviceKind};
use vfmig_wire::Codec;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let psk = sel & 1 == 1;
    let chunk = usize::from(sel >> 1) + 1;
    let offer = Offer {
        streams: 4,
        codecs: codec_bit(Codec::Raw) | codec_bit(Codec::Zstd),
        max_payload: 1 << 20,
        window_bytes: 8 << 20,
        devices: vec![DeviceDesc {
            name: "dev0".into(),
            caps: 1,
            state_size_hint: 0,
            decl: DeviceDecl {
                kind: DeviceKind::Emulated,
                size: Some(4096),
                compat: "seed=0".into(),
            },
        }],
    };
    let join = (sel & 2 == 2).then_some(([7u8; 16], 1u16));
    let mut c = ClientHandshake::new(ClientParams {
        auth: if psk {
            Auth::Psk(b"fuzz key".to_vec())
        } else {
            Auth::None
        },
        offer: offer.clone(),
        join,
        nonce: [3; 32],
    });
    let _ = c.take_output();
    for ch in rest.chunks(chunk) {
        match c.feed(ch) {
            Ok(n) => assert!(n <= ch.len()),
            Err(_) => {
                assert!(c.is_failed());
                break;
            }
        }
        let _ = c.take_output();
    }
    if let Some(a) = c.agreed() {
        assert!(!psk && !a.authenticated);
        assert!(a.streams <= offer.streams && a.max_payload <= offer.max_payload);
        assert!(a.window_bytes <= offer.window_bytes);
        assert_eq!(a.joined, join.is_some());
        assert_eq!(a.devices, offer.devices);
    }
});
