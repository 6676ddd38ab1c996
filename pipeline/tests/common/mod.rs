//! Test helpers: a protocol-aware TCP proxy that injects link faults at chosen frames.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{DestinationOptions, SourceOptions};
use vfmig_transport::SessionConfig;
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice};
use vfmig_wire::{FrameKind, HeaderBytes};

/// A 4 MiB emulated device with pre-copy: its whole state is initial data, and it dirties
/// 1 MiB/s while running.
pub fn precopy_device(name: &str, seed: u64) -> EmulatedDevice {
    EmulatedDevice::new(EmulatedConfig {
        name: name.into(),
        size: 4 << 20,
        seed,
        precopy: Some(u64::MAX),
        dirty_rate: 1 << 20,
        ..EmulatedConfig::default()
    })
    .expect("emulated device")
}

/// Transport settings for loopback tests: small pool and window, 10 s timeout.
pub fn session_config() -> SessionConfig {
    SessionConfig {
        pool_slots: 48,
        slot_size: 256 << 10,
        window_bytes: 4 << 20,
        timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(1),
        ..SessionConfig::default()
    }
}

/// Source options over [`session_config`].
pub fn source_options() -> SourceOptions {
    SourceOptions {
        session: session_config(),
        timeout: Duration::from_secs(10),
        ..SourceOptions::default()
    }
}

/// Destination options over [`session_config`].
pub fn destination_options() -> DestinationOptions {
    DestinationOptions {
        session: session_config(),
        timeout: Duration::from_secs(10),
        ..DestinationOptions::default()
    }
}

/// What the proxy does to the session.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Cut both connections instead of forwarding the first frame of this kind from the source.
    CutToDestination(FrameKind),
    /// Cut both connections instead of forwarding the first frame of this kind from the
    /// destination.
    CutToSource(FrameKind),
    /// Flip one payload bit of the first data frame with a payload from the source.
    FlipData,
    /// Hold back every frame from the destination from the first of this kind on, until the flag
    /// is set (then forward them in order).
    HoldToSource(FrameKind, Arc<AtomicBool>),
    /// Count the frames of this kind from the destination (and forward them).
    CountToSource(FrameKind, Arc<AtomicU64>),
    /// Forward everything, recording the kind byte of every frame from the source; the flag is
    /// set once the source's side of the connection ended.
    RecordToDestination(Arc<std::sync::Mutex<Vec<u8>>>, Arc<AtomicBool>),
}

/// A one-connection TCP proxy that understands enough of the protocol (handshake envelopes, then
/// 40-byte frame headers) to act at a chosen frame.
pub fn proxy(to: SocketAddr, fault: Fault) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (client, _) = l.accept().unwrap();
        let server = TcpStream::connect(to).unwrap();
        let all = [client.try_clone().unwrap(), server.try_clone().unwrap()];
        let all2 = [client.try_clone().unwrap(), server.try_clone().unwrap()];
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let f2 = fault.clone();
        let up = thread::spawn(move || pump(client, server, true, &f2, &all));
        pump(s2, c2, false, &fault, &all2);
        let _ = up.join();
    });
    addr
}

fn cut(all: &[TcpStream]) {
    for s in all {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, up: bool, fault: &Fault, all: &[TcpStream]) {
    // Two handshake messages each way: a 12-byte envelope with the body length at offset 8.
    for _ in 0..2 {
        let mut env = [0u8; 12];
        if from.read_exact(&mut env).is_err() {
            return cut(all);
        }
        let len = u32::from_le_bytes(env[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() || to.write_all(&env).is_err() {
            return cut(all);
        }
        if to.write_all(&body).is_err() {
            return cut(all);
        }
    }
    let mut flipped = false;
    let mut held = false;
    loop {
        let mut h = [0u8; 40];
        if from.read_exact(&mut h).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            if let (Fault::RecordToDestination(_, ended), true) = (fault, up) {
                ended.store(true, Ordering::SeqCst);
            }
            return;
        }
        let head = HeaderBytes::new(h);
        let kind = FrameKind::from_code(head.kind_byte());
        let len = head.wire_len() as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            return cut(all);
        }
        match fault {
            Fault::CutToDestination(k) if up && kind == Some(*k) => return cut(all),
            Fault::CutToSource(k) if !up && kind == Some(*k) => return cut(all),
            Fault::RecordToDestination(kinds, _) if up => {
                kinds.lock().unwrap().push(head.kind_byte());
            }
            Fault::CountToSource(k, n) if !up && kind == Some(*k) => {
                n.fetch_add(1, Ordering::SeqCst);
            }
            Fault::HoldToSource(k, release) if !up && (held || kind == Some(*k)) => {
                held = true;
                while !release.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            Fault::FlipData
                if up
                    && !flipped
                    && len > 0
                    && matches!(kind, Some(FrameKind::PreCopyData | FrameKind::StopCopyData)) =>
            {
                payload[len / 2] ^= 0x10;
                flipped = true;
            }
            _ => {}
        }
        if to.write_all(&h).is_err() || to.write_all(&payload).is_err() {
            return cut(all);
        }
    }
}
