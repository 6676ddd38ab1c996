//! Writes seed corpora for the cargo-fuzz targets in `fuzz/` (valid frames of every kind and
//! valid unauthenticated handshake exchanges), so the fuzzers start past the magic and envelope
//! checks. Usage: `cargo run -p vfmig-wire --example fuzz_seeds -- fuzz/seeds`.

use std::path::Path;
use vfmig_wire::declare::{DeviceDecl, DeviceKind};
use vfmig_wire::handshake::*;
use vfmig_wire::*;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

fn frames() -> Vec<Vec<u8>> {
    let data = |kind, codec, raw_len, wire: &[u8], arg| {
        let h = FrameHeader {
            kind,
            codec,
            device: 1,
            seq: 2,
            raw_len,
            wire_len: u32::try_from(wire.len()).unwrap_or(0),
            arg,
            crc: 0,
        };
        [&h.encode(wire)[..], wire].concat()
    };
    let mut v = vec![
        data(FrameKind::PreCopyData, Codec::Raw, 4, b"abcd", 0),
        data(FrameKind::StopCopyData, Codec::Zstd, 64, b"zz", 4),
        data(FrameKind::DirtyPages, Codec::Zero, 4096, b"", 0x2000),
    ];
    for c in [
        Control::EndOfDevice {
            device: 1,
            seq: 3,
            total_raw_bytes: 68,
            digest: [7; 32],
        },
        Control::PreCopyDone {
            device: 1,
            seq: 1,
            precopy_bytes: 4,
        },
        Control::SwitchoverAck {
            device: 1,
            raw_bytes: 4,
        },
        Control::DevicePrepared {
            device: 1,
            total_raw_bytes: 68,
        },
        Control::Abort {
            reason: AbortReason::Cancelled,
            detail: "stop".into(),
        },
        Control::Keepalive { millis: 5 },
        Control::Commit,
        Control::InitialDataSent {
            device: 1,
            seq: 1,
            raw_bytes: 4,
        },
        Control::Outcome {
            outcome: FinalOutcome::Resumed,
        },
    ] {
        v.push(c.encode());
    }
    v
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    let dir = Path::new(&dir);
    let all = frames();
    // First byte: chunk size selector (see fuzz_targets/deframer.rs).
    write(
        dir,
        "deframer",
        "all-kinds",
        &[[63u8].as_slice(), &all.concat()].concat(),
    )?;
    for (i, f) in all.iter().enumerate() {
        write(
            dir,
            "deframer",
            &format!("kind-{i}"),
            &[[0u8].as_slice(), f].concat(),
        )?;
    }

    // Unauthenticated exchanges; the nonces match the fuzz targets' fixed ones.
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
    // The server target declares a device when bit 1 of its first byte is set.
    for (join, declared, tag) in [
        (None, false, "new"),
        (Some(([7u8; 16], 1u16)), false, "join"),
        (None, true, "declared"),
    ] {
        let sel = 0xfcu8 | u8::from(declared) << 1;
        let mut c = ClientHandshake::new(ClientParams {
            auth: Auth::None,
            offer: offer.clone(),
            join,
            nonce: [3; 32],
        });
        let mut s = ServerHandshake::new(ServerParams {
            auth: Auth::None,
            limits: Limits {
                max_devices: 8,
                ..Limits::default()
            },
            session_id: [1; 16],
            nonce: [2; 32],
            devices: declared.then(|| offer.devices.iter().map(|d| d.decl.clone()).collect()),
        });
        let (mut to_server, mut to_client) =
            (vec![sel], vec![0xfc | u8::from(join.is_some()) << 1]);
        for _ in 0..3 {
            if let Some(b) = c.take_output() {
                let _ = s.feed(&b);
                to_server.extend_from_slice(&b);
            }
            if let Some(b) = s.take_output() {
                let _ = c.feed(&b);
                to_client.extend_from_slice(&b);
            }
        }
        write(dir, "handshake_server", tag, &to_server)?;
        write(dir, "handshake_client", tag, &to_client)?;
    }
    Ok(())
}
