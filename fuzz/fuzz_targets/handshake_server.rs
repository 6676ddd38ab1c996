//! Server handshake: arbitrary client bytes must never panic, never allocate past the caps, and
//! never authenticate a PSK client (the fuzzer cannot forge the MAC). With `Auth::None` the offer
//! parser is reachable and fuzzed. The first byte picks the mode, the chunk size and whether the
//! server declares a device (the declaration comparison is fuzzed too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfmig_wire::declare::{DeviceDecl, DeviceKind};
use vfmig_wire::handshake::{Auth, Handshake, Limits, ServerHandshake, ServerParams};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let psk = sel & 1 == 1;
    let chunk = usize::from(sel >> 1) + 1;
    let mut s = ServerHandshake::new(ServerParams {
        auth: if psk {
            Auth::Psk(b"fuzz key".to_vec())
        } else {
            Auth::None
        },
        limits: Limits {
            max_devices: 8,
            ..Limits::default()
        },
        session_id: [1; 16],
        nonce: [2; 32],
        // Bit 1 also makes the server declare a device, so the pairing check is reached.
        devices: (sel & 2 == 2).then(|| {
            vec![DeviceDecl {
                kind: DeviceKind::Emulated,
                size: Some(4096),
                compat: "seed=0".into(),
            }]
        }),
    });
    for c in rest.chunks(chunk) {
        match s.feed(c) {
            Ok(n) => assert!(n <= c.len()),
            Err(_) => {
                assert!(s.is_failed());
                break;
            }
        }
        let _ = s.take_output();
    }
    if let Some(a) = s.agreed() {
        assert!(!psk && !a.authenticated);
        assert!(a.devices.len() <= 8);
        assert!(a.streams >= 1 && a.max_payload >= 1 && a.window_bytes >= 1);
    }
});
