//! The stage graph without a network: reader -> encoders -> in-order sender -> decoders -> writer,
//! between real kernel fds (socket pairs fed and drained by threads). The frames pass straight from
//! the sender to the decoders, so these tests pin down the pipeline's own ordering, codec and
//! digest logic; the sessions' tests add the transport.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use vfmig_transport::{BufPool, PoolBuf};
use vfmig_wire::handshake::KNOWN_CODECS;
use vfmig_wire::{Codec, FrameHeader, FrameKind};

use crate::adapt::Adaptive;
use crate::codec::Compress;
use crate::error::PipelineError;
use crate::reader::{self, ReadMode, ReaderCmd, ReaderEvent, ReaderIo};
use crate::stages::{self, FrameSink, InItem, Incoming, Received};
use crate::stats::Counters;
use crate::writer::{self, WriterDevice, WriterEvent};

const T: Duration = Duration::from_secs(10);

/// Forwards frames to the destination's decoders the way the receiving transport would hand them
/// over: data frames to the codec workers, markers straight to the writer.
struct Direct {
    data: Sender<Received>,
    markers: Sender<InItem>,
}

impl FrameSink for Direct {
    fn send_frame(
        &self,
        header: FrameHeader,
        payload: Option<PoolBuf>,
    ) -> Result<(), PipelineError> {
        let lost = || PipelineError::StageLost { stage: "test sink" };
        match header.kind {
            FrameKind::PreCopyData | FrameKind::StopCopyData => self
                .data
                .send(Received { header, payload })
                .map_err(|_| lost()),
            FrameKind::EndOfDevice => {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(payload.ok_or_else(lost)?.as_slice());
                self.markers
                    .send(InItem {
                        device: header.device,
                        seq: header.seq,
                        item: Incoming::End {
                            total: header.arg,
                            digest,
                        },
                    })
                    .map_err(|_| lost())
            }
            FrameKind::PreCopyDone | FrameKind::InitialDataSent => self
                .markers
                .send(InItem {
                    device: header.device,
                    seq: header.seq,
                    item: if header.kind == FrameKind::PreCopyDone {
                        Incoming::PreCopyDone { raw: header.arg }
                    } else {
                        Incoming::InitialDone { raw: header.arg }
                    },
                })
                .map_err(|_| lost()),
            _ => Err(lost()),
        }
    }

    fn send_hash_trailer(
        &self,
        header: FrameHeader,
        payload: PoolBuf,
    ) -> Result<(), PipelineError> {
        self.send_frame(header, Some(payload))
    }
}

fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = (out.len() / 4096) % 3;
        let take = (n - out.len()).min(4096);
        match block {
            0 => out.extend(std::iter::repeat_n(0u8, take)),
            1 => out.extend((0..take).map(|i| b"vfio state "[i % 11])),
            _ => out.extend((0..take).map(|i| (x >> (i % 57)) as u8 ^ i as u8)),
        }
    }
    out
}

/// Runs `sources` (one per device) through the whole graph; returns what each destination fd
/// received and the writer's events.
fn migrate(sources: Vec<Vec<u8>>, compress: Compress) -> (Vec<Vec<u8>>, Vec<WriterEvent>) {
    let n = sources.len();
    let pool = BufPool::new(32, 64 << 10).unwrap();
    let counters = Arc::new(Counters::new(n));
    let stop = Arc::new(AtomicBool::new(false));
    // Device side of each source socket: a thread writes the state in odd-sized pieces.
    let mut src_fds = Vec::new();
    let mut feeders = Vec::new();
    for data in sources {
        let (dev, pipe) = UnixStream::pair().unwrap();
        feeders.push(thread::spawn(move || {
            let mut dev = dev;
            for piece in data.chunks(7001) {
                dev.write_all(piece).unwrap();
            }
        }));
        src_fds.push(Arc::new(OwnedFd::from(pipe)));
    }
    let mut dst_fds = Vec::new();
    let mut drains = Vec::new();
    for _ in 0..n {
        let (dev, pipe) = UnixStream::pair().unwrap();
        drains.push(thread::spawn(move || {
            let mut dev = dev;
            let mut got = Vec::new();
            dev.read_to_end(&mut got).unwrap();
            got
        }));
        dst_fds.push(Arc::new(OwnedFd::from(pipe)));
    }

    let (cmd_tx, cmd_rx) = bounded(16);
    let (chunk_tx, chunk_rx) = bounded(4);
    let (out_tx, out_rx) = bounded(8);
    let (ev_tx, ev_rx) = bounded(64);
    let (recv_tx, recv_rx) = bounded(4);
    let (in_tx, in_rx) = bounded(8);
    let (wev_tx, wev_rx) = bounded(64);
    let adaptive = Arc::new(Adaptive::new(compress, 2));
    let names: Vec<String> = (0..n).map(|i| format!("dev{i}")).collect();

    let mut threads = Vec::new();
    {
        let io = ReaderIo {
            cmds: cmd_rx,
            chunks: chunk_tx,
            markers: out_tx.clone(),
            events: ev_tx,
            counters: counters.clone(),
            stop: stop.clone(),
            guest: None,
            adaptive: Some(adaptive.clone()),
        };
        let (pool, names) = (pool.clone(), names.clone());
        threads.push(thread::spawn(move || {
            reader::run(pool, names, io, usize::MAX, T)
        }));
    }
    for _ in 0..2 {
        let (rx, tx, p, a, c, s) = (
            chunk_rx.clone(),
            out_tx.clone(),
            pool.clone(),
            adaptive.clone(),
            counters.clone(),
            stop.clone(),
        );
        threads.push(thread::spawn(move || {
            stages::encode_worker(rx, tx, p, a, c, s, T, KNOWN_CODECS).unwrap();
        }));
        let (rx, tx, p, c, s) = (
            recv_rx.clone(),
            in_tx.clone(),
            pool.clone(),
            counters.clone(),
            stop.clone(),
        );
        threads.push(thread::spawn(move || {
            stages::decode_worker(rx, tx, p, c, s, T).unwrap();
        }));
    }
    drop((chunk_rx, out_tx, recv_rx));
    {
        let devices = names
            .iter()
            .zip(&dst_fds)
            .map(|(name, fd)| WriterDevice {
                name: name.clone(),
                fd: fd.clone(),
            })
            .collect();
        let (pool, c, s) = (pool.clone(), counters.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            writer::run(pool, devices, None, in_rx, wev_tx, c, s, T, None)
        }));
    }
    for (i, fd) in src_fds.iter().enumerate() {
        cmd_tx
            .send(ReaderCmd::Add {
                device: i as u16,
                fd: fd.clone(),
                mode: ReadMode::StopCopy,
            })
            .unwrap();
    }
    drop(cmd_tx);
    let sink = Direct {
        data: recv_tx,
        markers: in_tx,
    };
    stages::send_loop(out_rx, 64, &sink, &counters, &adaptive, None, &stop).unwrap();
    drop(sink);
    for t in threads {
        t.join().unwrap();
    }
    for f in feeders {
        f.join().unwrap();
    }
    let mut ended = 0;
    while let Ok(ev) = ev_rx.try_recv() {
        match ev {
            ReaderEvent::Ended { .. } => ended += 1,
            other => panic!("reader: {other:?}"),
        }
    }
    assert_eq!(ended, n);
    let events: Vec<WriterEvent> = wev_rx.try_iter().collect();
    drop(dst_fds);
    let got = drains.into_iter().map(|d| d.join().unwrap()).collect();
    assert_eq!(pool.free(), pool.slots(), "every pool buffer came back");
    (got, events)
}

#[test]
fn mixed_streams_of_two_devices_arrive_byte_identical_and_verified() {
    let a = content(1_300_000, 1);
    let b = content(700_001, 2);
    let (got, events) = migrate(vec![a.clone(), b.clone()], Compress::Zstd(3));
    assert!(got[0] == a && got[1] == b, "streams differ");
    let mut verified: Vec<(u16, u64)> = events
        .iter()
        .map(|e| match e {
            WriterEvent::StreamVerified { device, total } => (*device, *total),
            other => panic!("writer: {other:?}"),
        })
        .collect();
    verified.sort_unstable();
    assert_eq!(verified, [(0, a.len() as u64), (1, b.len() as u64)]);
}

#[test]
fn every_codec_setting_round_trips_and_an_empty_stream_is_verified() {
    for compress in [Compress::None, Compress::Lz4, Compress::Auto] {
        let a = content(400_000, 9);
        let (got, events) = migrate(vec![a.clone(), Vec::new()], compress);
        assert!(got[0] == a, "{compress:?}: stream differs");
        assert!(got[1].is_empty());
        assert_eq!(events.len(), 2, "{compress:?}: {events:?}");
    }
}

/// Feeds the writer a stream by hand and returns its first event.
fn write_by_hand(chunks: &[&[u8]], end: (u64, [u8; 32])) -> WriterEvent {
    let pool = BufPool::new(8, 4096).unwrap();
    let (dev, pipe) = UnixStream::pair().unwrap();
    let drain = thread::spawn(move || {
        let mut dev = dev;
        let mut got = Vec::new();
        dev.read_to_end(&mut got).unwrap();
        got
    });
    let fd = Arc::new(OwnedFd::from(pipe));
    let (tx, rx) = bounded(16);
    let (ev_tx, ev_rx) = bounded(16);
    let devices = vec![WriterDevice {
        name: "d".into(),
        fd: fd.clone(),
    }];
    let counters = Arc::new(Counters::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let pool = pool.clone();
        thread::spawn(move || writer::run(pool, devices, None, rx, ev_tx, counters, stop, T, None))
    };
    let mut seq = 0;
    // Out of order on purpose: the writer restores the order.
    let mut items = Vec::new();
    for c in chunks {
        let mut b = pool.try_acquire().unwrap();
        b.spare_mut()[..c.len()].copy_from_slice(c);
        b.set_len(c.len());
        items.push(InItem {
            device: 0,
            seq,
            item: Incoming::Data(crate::codec::Decoded::Data(b), crate::digest::chunk_hash(c)),
        });
        seq += 1;
    }
    items.push(InItem {
        device: 0,
        seq,
        item: Incoming::End {
            total: end.0,
            digest: end.1,
        },
    });
    items.reverse();
    for it in items {
        tx.send(it).unwrap();
    }
    drop(tx);
    let ev = ev_rx.recv_timeout(T).unwrap();
    w.join().unwrap();
    drop(fd);
    let got = drain.join().unwrap();
    assert_eq!(got, chunks.concat(), "written in sequence order");
    ev
}

#[test]
fn writer_verifies_length_and_digest_of_what_it_wrote() {
    let chunks: [&[u8]; 2] = [b"hello ", b"world"];
    // The source's fold of the same chunks (`stages::send_loop`).
    let mut d = crate::digest::StreamDigest::new();
    d.add(0, 6, crate::digest::chunk_hash(b"hello "));
    d.add(6, 5, crate::digest::chunk_hash(b"world"));
    let digest = d.finish();
    assert!(matches!(
        write_by_hand(&chunks, (11, digest)),
        WriterEvent::StreamVerified {
            device: 0,
            total: 11
        }
    ));
    assert!(matches!(
        write_by_hand(&chunks, (12, digest)),
        WriterEvent::Failed(PipelineError::LengthMismatch {
            declared: 12,
            received: 11,
            ..
        })
    ));
    assert!(matches!(
        write_by_hand(&chunks, (11, [7; 32])),
        WriterEvent::Failed(PipelineError::DigestMismatch { .. })
    ));
}

/// Encodes `data` as the source's codec stage does (hash trailer included) and returns the frame.
fn encoded_frame(data: &[u8], choice: crate::codec::Choice, pool: &BufPool) -> Received {
    let mut enc = crate::codec::Encoder::new(KNOWN_CODECS).unwrap();
    let mut b = pool.try_acquire().unwrap();
    b.spare_mut()[..data.len()].copy_from_slice(data);
    b.set_len(data.len());
    let e = enc.encode(b, choice, pool);
    let mut payload = e.payload;
    if let Some(p) = payload.as_mut() {
        stages::append_trailer(p, e.hash.unwrap()).unwrap();
    }
    let header = crate::reader::header(
        FrameKind::StopCopyData,
        e.codec,
        0,
        0,
        data.len(),
        payload.as_ref(),
        0,
    );
    Received { header, payload }
}

/// Runs one frame through a decode worker: what it hands the writer, or its error.
fn decode_one(frame: Received, pool: &BufPool) -> Result<Option<InItem>, PipelineError> {
    let (tx, rx) = bounded(1);
    let (out_tx, out_rx) = bounded(1);
    tx.send(frame).unwrap();
    drop(tx);
    let counters = Arc::new(Counters::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    stages::decode_worker(rx, out_tx, pool.clone(), counters, stop, T)?;
    Ok(out_rx.try_recv().ok())
}

/// The transport's CRC no longer covers a device state frame's body (only its header and hash
/// trailer): a body changed on the way must be refused by the decode stage, before the writer
/// (the device) sees any of it, for every encoding the source sends.
#[test]
fn a_changed_body_of_any_encoding_is_refused_before_the_writer() {
    use crate::codec::{Choice, DecodeFailure};
    let pool = BufPool::new(8, 64 << 10).unwrap();
    let random: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut sparse = random.clone();
    sparse[4096..20_000].fill(0);
    let text = content(50_000, 4);
    let cases: [(&[u8], Choice, Codec); 5] = [
        (&random, Choice::Raw, Codec::Raw),
        (&sparse, Choice::Raw, Codec::PagedRaw),
        (&text, Choice::Lz4, Codec::PagedLz4),
        (&text, Choice::Zstd(3), Codec::PagedZstd),
        (&random[..4096], Choice::Raw, Codec::Raw),
    ];
    for (data, choice, codec) in cases {
        // Unchanged, it decodes to the input.
        let f = encoded_frame(data, choice, &pool);
        assert_eq!(f.header.codec, codec);
        match decode_one(f, &pool).unwrap().map(|i| i.item) {
            Some(Incoming::Data(crate::codec::Decoded::Data(b), h)) => {
                assert_eq!(b.as_slice(), data);
                assert_eq!(h, crate::digest::chunk_hash(data));
            }
            other => panic!("{codec:?}: {other:?}"),
        }
        // Any one body byte changed (first, middle, last before the trailer): refused.
        let body = encoded_frame(data, choice, &pool).payload.unwrap().len()
            - vfmig_wire::HASH_TRAILER_LEN;
        for at in [0, body / 2, body - 1] {
            let mut f = encoded_frame(data, choice, &pool);
            f.payload.as_mut().unwrap().as_mut_slice()[at] ^= 0x10;
            match decode_one(f, &pool) {
                Err(PipelineError::Decode { failure, .. }) => {
                    // A changed page map may be refused as malformed before the hash check.
                    if codec == Codec::Raw || (codec == Codec::PagedRaw && at + 1 < body) {
                        assert!(
                            matches!(failure, DecodeFailure::HashMismatch { .. }),
                            "{codec:?} at {at}: {failure:?}"
                        );
                    }
                }
                other => panic!("{codec:?} at {at}: a changed body got through: {other:?}"),
            }
        }
        // A changed or missing trailer is refused too.
        let mut f = encoded_frame(data, choice, &pool);
        let p = f.payload.as_mut().unwrap();
        let last = p.len() - 1;
        p.as_mut_slice()[last] ^= 1;
        assert!(decode_one(f, &pool).is_err(), "{codec:?}: trailer changed");
        let mut f = encoded_frame(data, choice, &pool);
        let p = f.payload.as_mut().unwrap();
        p.set_len(p.len() - vfmig_wire::HASH_TRAILER_LEN);
        assert!(decode_one(f, &pool).is_err(), "{codec:?}: no trailer");
    }
    assert_eq!(pool.free(), pool.slots(), "every pool buffer came back");
}

/// A settled raw stream's chunks that reach a codec worker get a sampled zero check instead of
/// a full scan: a body changed on the way is still refused before the writer, and its unsampled
/// zero granules still arrive.
#[test]
fn a_settled_raw_stream_with_sampled_zero_checks_still_refuses_a_changed_body() {
    use crate::codec::{Choice, DecodeFailure, Encoder};
    let pool = BufPool::new(8, 64 << 10).unwrap();
    let mut enc = Encoder::new(KNOWN_CODECS).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data: Vec<u8> = (0..50_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // Zero granules between the samples: sent as data, decoded exactly.
    data[600..1500].fill(0);
    let sampled = |enc: &mut Encoder| {
        let mut b = pool.try_acquire().unwrap();
        b.spare_mut()[..data.len()].copy_from_slice(&data);
        b.set_len(data.len());
        let e = enc.encode_hashed(b, Choice::Raw, &pool, true, true);
        let mut payload = e.payload.unwrap();
        stages::append_trailer(&mut payload, e.hash.unwrap()).unwrap();
        let header = crate::reader::header(
            FrameKind::StopCopyData,
            e.codec,
            0,
            0,
            data.len(),
            Some(&payload),
            0,
        );
        Received {
            header,
            payload: Some(payload),
        }
    };
    let f = sampled(&mut enc);
    assert_eq!(f.header.codec, Codec::Raw, "not elided on a settled stream");
    match decode_one(f, &pool).unwrap().map(|i| i.item) {
        Some(Incoming::Data(crate::codec::Decoded::Data(b), _)) => assert_eq!(b.as_slice(), data),
        other => panic!("{other:?}"),
    }
    let mut f = sampled(&mut enc);
    f.payload.as_mut().unwrap().as_mut_slice()[1000] ^= 4;
    assert!(matches!(
        decode_one(f, &pool),
        Err(PipelineError::Decode {
            failure: DecodeFailure::HashMismatch { .. },
            ..
        })
    ));
    assert_eq!(pool.free(), pool.slots(), "every pool buffer came back");
}

/// The reader hands the chunks of a stream settled as raw straight to the sender (no codec
/// worker): they carry the right hash and trailer, and one changed on the way is refused before
/// the writer. Full-scan turns and chunks whose sampled granules hold zeros still go to the codec
/// workers.
#[test]
fn a_settled_raw_stream_goes_from_the_reader_to_the_sender_and_stays_checked() {
    use crate::codec::{chunk_len, DecodeFailure, SETTLE_CHUNKS};
    use std::sync::atomic::Ordering;
    const CHUNKS: usize = 40;
    let pool = BufPool::new(64, 64 << 10).unwrap();
    let chunk = chunk_len(64 << 10);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut data: Vec<u8> = (0..CHUNKS * chunk)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // Chunk 5 is all zero: its samples see it, so a codec worker scans (and elides) it.
    data[5 * chunk..6 * chunk].fill(0);
    let (dev, fd) = UnixStream::pair().unwrap();
    let feeder = {
        let data = data.clone();
        thread::spawn(move || {
            let mut dev = dev;
            dev.write_all(&data).unwrap();
        })
    };
    let counters = Arc::new(Counters::new(1));
    // As if the codec workers had seen the stream go raw for a while.
    counters.devices[0]
        .raw_streak
        .store(SETTLE_CHUNKS, Ordering::SeqCst);
    let (cmd_tx, cmd_rx) = bounded(4);
    let (chunk_tx, chunk_rx) = bounded(CHUNKS + 1);
    let (out_tx, out_rx) = bounded(CHUNKS + 2);
    let (ev_tx, _ev_rx) = bounded(8);
    let io = ReaderIo {
        cmds: cmd_rx,
        chunks: chunk_tx,
        markers: out_tx,
        events: ev_tx,
        counters: counters.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        guest: None,
        adaptive: Some(Arc::new(Adaptive::new(Compress::None, 1))),
    };
    cmd_tx
        .send(ReaderCmd::Add {
            device: 0,
            fd: Arc::new(OwnedFd::from(fd)),
            mode: ReadMode::StopCopy,
        })
        .unwrap();
    drop(cmd_tx);
    let reader = {
        let pool = pool.clone();
        thread::spawn(move || reader::run(pool, vec!["d".into()], io, usize::MAX, T))
    };
    reader.join().unwrap();
    feeder.join().unwrap();
    let to_workers: Vec<u64> = chunk_rx.try_iter().map(|c| c.seq).collect();
    assert_eq!(to_workers, [0, 5, 32], "full-scan turns and the zero chunk");
    let mut direct = Vec::new();
    for o in out_rx.try_iter() {
        if o.header.kind == FrameKind::EndOfDevice {
            continue;
        }
        let seq = o.header.seq as usize;
        let raw = &data[seq * chunk..(seq + 1) * chunk];
        assert_eq!(o.header.codec, Codec::Raw);
        assert_eq!(o.hash, Some(crate::digest::chunk_hash(raw)));
        let p = o.payload.as_ref().unwrap().as_slice();
        assert_eq!(&p[..chunk], raw, "chunk {seq}");
        assert_eq!(p[chunk..], o.hash.unwrap().to_le_bytes());
        direct.push(o);
    }
    assert_eq!(direct.len(), CHUNKS - 3);
    assert_eq!(
        counters.devices[0].direct_chunks.load(Ordering::SeqCst),
        (CHUNKS - 3) as u64
    );
    // Unchanged, a direct frame decodes to its chunk; with a body byte changed it is refused.
    let mut frames = direct.into_iter().map(|o| Received {
        header: o.header,
        payload: o.payload,
    });
    let good = frames.next().unwrap();
    assert!(decode_one(good, &pool).unwrap().is_some());
    let mut bad = frames.next().unwrap();
    bad.payload.as_mut().unwrap().as_mut_slice()[chunk / 2] ^= 0x40;
    assert!(matches!(
        decode_one(bad, &pool),
        Err(PipelineError::Decode {
            failure: DecodeFailure::HashMismatch { .. },
            ..
        })
    ));
}
