//! CPU time (user + system, both sides of the session in this process) per GiB moved over
//! loopback, for 1, 2 and 4 connections and for `Send` vs `SendZc`, against a plain blocking
//! `TcpStream` loop. CPU time, unlike wall time, is not distorted by other load on a shared
//! machine. `cargo bench -p vfmig-transport --bench cpu_per_gib`.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // report arithmetic

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vfmig_transport::{DeviceDesc, Listener, SendSession, SessionConfig, TransportError};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

const FRAME: usize = 1 << 20;
const BYTES: usize = 1 << 30;
const ROUNDS: usize = 3;

/// User + system CPU seconds of this process so far (from /proc/self/stat, clock ticks).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn plain() -> (f64, f64) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; FRAME];
        while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    });
    let mut w = TcpStream::connect(addr).unwrap();
    let buf = vec![0x5au8; FRAME];
    let (c0, t0) = (cpu_seconds(), Instant::now());
    for _ in 0..BYTES / FRAME {
        w.write_all(&buf).unwrap();
    }
    drop(w);
    reader.join().unwrap();
    (cpu_seconds() - c0, t0.elapsed().as_secs_f64())
}

fn session(streams: usize, zerocopy_min: usize) -> (f64, f64) {
    let cfg = SessionConfig {
        streams,
        pool_slots: 64,
        slot_size: FRAME,
        window_bytes: 32 << 20,
        zerocopy_min,
        ..SessionConfig::default()
    };
    let l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr();
    let c2 = cfg.clone();
    let dst = std::thread::spawn(move || l.accept(&c2));
    let dev = vec![DeviceDesc {
        name: "d".into(),
        caps: 0,
        state_size_hint: 0,
        decl: Default::default(),
    }];
    let src = SendSession::connect(addr, &cfg, dev).unwrap();
    let dst = dst.join().unwrap().unwrap();
    let rx = std::thread::spawn(move || loop {
        match dst.recv(Duration::from_secs(30)) {
            Ok(_) => {}
            Err(TransportError::Closed) => return,
            Err(e) => panic!("{e}"),
        }
    });
    let (c0, t0) = (cpu_seconds(), Instant::now());
    for seq in 0..(BYTES / FRAME) as u64 {
        let mut b = src.pool().acquire(Duration::from_secs(30)).unwrap();
        b.set_len(FRAME);
        let h = FrameHeader {
            kind: FrameKind::StopCopyData,
            codec: Codec::Raw,
            device: 0,
            seq,
            raw_len: FRAME as u32,
            wire_len: 0,
            arg: 0,
            crc: 0,
        };
        src.send(h, Some(b)).unwrap();
    }
    src.close().unwrap();
    rx.join().unwrap();
    (cpu_seconds() - c0, t0.elapsed().as_secs_f64())
}

fn report(name: &str, f: impl Fn() -> (f64, f64)) {
    let runs: Vec<(f64, f64)> = (0..ROUNDS).map(|_| f()).collect();
    let cpu = runs.iter().map(|r| r.0).fold(f64::MAX, f64::min);
    let wall = runs.iter().map(|r| r.1).fold(f64::MAX, f64::min);
    println!(
        "{name:<22} cpu {cpu:6.2} s/GiB   best wall {:6.2} GiB/s",
        1.0 / wall
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    report("plain_tcp_write_loop", plain);
    report("vfmig_1conn_send", || session(1, usize::MAX));
    report("vfmig_1conn_sendzc", || session(1, 64 << 10));
    report("vfmig_2conn_send", || session(2, usize::MAX));
    report("vfmig_4conn_send", || session(4, usize::MAX));
}
