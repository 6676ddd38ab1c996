//! Transport throughput: 1 MiB raw frames from a `SendSession` to a `RecvSession` over loopback
//! TCP (io_uring send and receive paths, CRC32C on both sides), for 1, 2 and 4 connections.
//!
//! Each sample sends `FRAMES_PER_ITER` frames and waits until the destination has received them
//! all. Sessions are connected before anything is measured and closed after, so handshakes and
//! teardown stay outside the measurement.

use std::net::SocketAddr;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{bounded, Receiver, Sender};
use vfmig_transport::{DeviceDesc, Listener, SendSession, SessionConfig, TransportError};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

const FRAME_U32: u32 = 1 << 20;
const FRAME: usize = FRAME_U32 as usize;
const FRAMES_PER_ITER: u64 = 32;
const WAIT: Duration = Duration::from_secs(30);

/// A connected session: the source handle, and a destination thread that drops every frame
/// and reports each `FRAMES_PER_ITER` received.
struct Pair {
    streams: usize,
    src: SendSession,
    done: Receiver<u64>,
    receiver: JoinHandle<Result<(), TransportError>>,
    seq: u64,
}

fn receive(
    listener: &Listener,
    cfg: &SessionConfig,
    done: &Sender<u64>,
) -> Result<(), TransportError> {
    let dst = listener.accept(cfg)?;
    let mut got = 0u64;
    loop {
        match dst.recv(WAIT) {
            Ok(frame) => {
                drop(frame.payload);
                got += 1;
                if got % FRAMES_PER_ITER == 0 && done.send(got).is_err() {
                    break;
                }
            }
            Err(TransportError::Closed) => break,
            Err(e) => return Err(e),
        }
    }
    dst.close().map(|_| ())
}

fn pair(streams: usize) -> Pair {
    let cfg = SessionConfig {
        streams,
        ..SessionConfig::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let listener = Listener::bind(addr).expect("bind");
    let addr = listener.local_addr();
    let (tx, done) = bounded::<u64>(1024);
    let dst_cfg = cfg.clone();
    let receiver = thread::spawn(move || {
        let r = receive(&listener, &dst_cfg, &tx);
        if let Err(e) = &r {
            eprintln!("transport bench receiver: {e}");
        }
        r
    });
    let devices = vec![DeviceDesc {
        name: "bench0".into(),
        caps: 0,
        state_size_hint: 0,
    }];
    let src = SendSession::connect(addr, &cfg, devices).expect("connect");
    Pair {
        streams,
        src,
        done,
        receiver,
        seq: 0,
    }
}

impl Pair {
    fn send_batch(&mut self) {
        for _ in 0..FRAMES_PER_ITER {
            let mut buf = self.src.pool().acquire(WAIT).expect("pool buffer");
            buf.set_len(FRAME);
            let h = FrameHeader {
                kind: FrameKind::StopCopyData,
                codec: Codec::Raw,
                device: 0,
                seq: self.seq,
                raw_len: FRAME_U32,
                wire_len: 0,
                arg: self.seq * FRAME as u64,
                crc: 0,
            };
            self.src.send(h, Some(buf)).expect("send");
            self.seq += 1;
        }
        self.done
            .recv_timeout(WAIT)
            .expect("destination received the batch");
    }

    fn close(self) {
        self.src.close().expect("close");
        match self.receiver.join() {
            Ok(r) => r.expect("receiver"),
            Err(_) => panic!("receiver thread panicked"),
        }
    }
}

fn transport_throughput(c: &mut Criterion) {
    let mut pairs: Vec<Pair> = [1usize, 2, 4].into_iter().map(pair).collect();
    let mut g = c.benchmark_group("transport_loopback");
    g.throughput(Throughput::Bytes(FRAMES_PER_ITER * FRAME as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_millis(500));
    for p in &mut pairs {
        g.bench_function(BenchmarkId::new("streams", p.streams), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    p.send_batch();
                }
                start.elapsed()
            })
        });
    }
    g.finish();
    for p in pairs {
        p.close();
    }
}

criterion_group!(benches, transport_throughput);
criterion_main!(benches);
