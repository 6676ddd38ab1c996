//! Transport throughput on loopback against a plain blocking `TcpStream` write loop moving the
//! same bytes, and `Send` against `SendZc` for large frames.
//!
//! `cargo bench -p vfmig-transport --bench throughput`. Each iteration moves `BYTES` in frames of
//! `FRAME` bytes; the receiver verifies every CRC and drops the buffers. Figures are in the
//! transport's report and docs/BENCHMARKS.md.
#![allow(clippy::cast_possible_truncation)] // sizes are small constants

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vfmig_transport::{DeviceDesc, Listener, SendSession, SessionConfig, TransportError};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

const FRAME: usize = 1 << 20;
const BYTES: usize = 128 << 20;
const FRAMES: usize = BYTES / FRAME;

fn cfg(streams: usize, zerocopy_min: usize) -> SessionConfig {
    SessionConfig {
        streams,
        pool_slots: 64,
        slot_size: FRAME,
        window_bytes: 32 << 20,
        zerocopy_min,
        ..SessionConfig::default()
    }
}

/// Plain blocking TCP: one writer, one reader thread, 1 MiB writes.
fn plain_tcp(c: &mut Criterion) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; FRAME];
        let mut got = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    got += n;
                    if got >= BYTES {
                        got -= BYTES;
                        let _ = done_tx.send(());
                    }
                }
            }
        }
    });
    let mut w = TcpStream::connect(addr).unwrap();
    w.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; FRAME];
    let mut g = c.benchmark_group("throughput");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("plain_tcp_write_loop", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for _ in 0..FRAMES {
                    w.write_all(&buf).unwrap();
                }
                done_rx.recv().unwrap();
            }
            t.elapsed()
        });
    });
    g.finish();
    drop(w);
    reader.join().unwrap();
}

fn session(c: &mut Criterion, name: &str, streams: usize, zerocopy_min: usize) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr();
    let dst = std::thread::spawn(move || l.accept(&cfg(streams, zerocopy_min)));
    let devices = vec![DeviceDesc {
        name: "bench".into(),
        caps: 0,
        state_size_hint: BYTES as u64,
        decl: Default::default(),
    }];
    let src = SendSession::connect(addr, &cfg(streams, zerocopy_min), devices)
        .unwrap_or_else(|e| panic!("{name}: connect: {e}"));
    let dst = dst
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: accept: {e}"));
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let reader = std::thread::spawn(move || {
        let mut got = 0usize;
        loop {
            match dst.recv(Duration::from_secs(30)) {
                Ok(f) => {
                    drop(f);
                    got += 1;
                    if got == FRAMES {
                        got = 0;
                        let _ = done_tx.send(());
                    }
                }
                Err(TransportError::Closed) => return dst.stats(),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut seq = 0u64;
    let mut g = c.benchmark_group("throughput");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for _ in 0..FRAMES {
                    let mut buf = src.pool().acquire(Duration::from_secs(30)).unwrap();
                    buf.set_len(FRAME);
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
                    seq += 1;
                    src.send(h, Some(buf)).unwrap();
                }
                done_rx.recv().unwrap();
            }
            t.elapsed()
        });
    });
    g.finish();
    let s = src.close().unwrap();
    let r = reader.join().unwrap();
    eprintln!(
        "{name}: sent {} MiB, zerocopy sends {} (copied by the kernel: {}), send busy {:?}, received {} MiB",
        s.bytes_sent >> 20,
        s.zerocopy_sends,
        s.zerocopy_copied,
        s.send_busy,
        r.bytes_received >> 20
    );
}

fn transport(c: &mut Criterion) {
    plain_tcp(c);
    session(c, "vfmig_1conn_send", 1, usize::MAX);
    session(c, "vfmig_1conn_sendzc", 1, 64 << 10);
    session(c, "vfmig_2conn_send", 2, usize::MAX);
    session(c, "vfmig_4conn_send", 4, usize::MAX);
    session(c, "vfmig_4conn_sendzc", 4, 64 << 10);
}

criterion_group!(benches, transport);
criterion_main!(benches);
