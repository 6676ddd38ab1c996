//! The middle stages: codec workers on both sides and the source's in-order sender.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use vfmig_transport::{BufPool, PoolBuf};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

use crate::adapt::Adaptive;
use crate::codec::{
    sampled_turn, Choice, DecodeFailure, Decoded, Decoder, Encoded, Encoder, Outcome,
};
use crate::digest::{self, StreamDigest};
use crate::error::{Phase, PipelineError};
use crate::reader::{header, Outgoing, RawChunk};
use crate::reseq::Resequencer;
use crate::stats::{Counters, DeviceCounters};

/// Starts a named stage thread.
pub(crate) fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, PipelineError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|source| PipelineError::Resource {
            what: "a stage thread",
            source,
        })
}

/// How long a stage waits on its input before checking `stop` again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Source codec worker: encodes chunks until its input closes or `stop` is set. `codecs` are the
/// agreed codec bits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_worker(
    rx: Receiver<RawChunk>,
    tx: Sender<Outgoing>,
    pool: BufPool,
    adaptive: Arc<Adaptive>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    codecs: u32,
) -> Result<(), PipelineError> {
    let mut enc = Encoder::new(codecs).map_err(|source| PipelineError::Resource {
        what: "a zstd context",
        source,
    })?;
    loop {
        let chunk = match rx.recv_timeout(POLL) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let t0 = Instant::now();
        let raw_len = chunk.buf.len();
        let choice = chunk.choice.unwrap_or_else(|| adaptive.choose());
        let state = matches!(chunk.kind, FrameKind::PreCopyData | FrameKind::StopCopyData);
        let dev = counters.device(chunk.device);
        let sampled = state
            && dev.is_some_and(|c| sampled_turn(c.raw_streak.load(Ordering::Relaxed), chunk.seq));
        let Encoded {
            codec,
            mut payload,
            outcome,
            hash,
        } = enc.encode_hashed(chunk.buf, choice, &pool, state, sampled);
        // Device state frames end with the raw bytes' hash (docs/PROTOCOL.md, section 4): the
        // destination checks the decoded bytes against it, and the CRC covers only the header
        // and the trailer, so each byte passes one integrity check per side.
        if let (Some(h), Some(p)) = (hash, payload.as_mut()) {
            append_trailer(p, h)?;
        }
        let took = t0.elapsed();
        counters.codec.add(took);
        let wire = payload.as_ref().map_or(0, PoolBuf::len);
        let rung = match outcome {
            Outcome::Compressed(c) | Outcome::FellBackRaw(c) => Some(c),
            // Raw's ratio too: below 1:1 where zero granules were left out.
            Outcome::Raw => Some(Choice::Raw),
            Outcome::Zero | Outcome::ProbedRaw => None,
        };
        adaptive.record(rung, raw_len, wire, took);
        if let Some(c) = dev {
            // Raw and unpacked: the stream may be settling as raw (`reader::direct`).
            if state && codec == Codec::Raw && matches!(outcome, Outcome::Raw | Outcome::ProbedRaw)
            {
                c.raw_streak.fetch_add(1, Ordering::Relaxed);
            } else if state {
                c.raw_streak.store(0, Ordering::Relaxed);
            }
            let n = match outcome {
                Outcome::Zero => &c.zero_chunks,
                Outcome::Compressed(_) => &c.compressed_chunks,
                _ => &c.raw_chunks,
            };
            DeviceCounters::add(n, 1);
        }
        let out = Outgoing {
            header: header(
                chunk.kind,
                codec,
                chunk.device,
                chunk.seq,
                raw_len,
                payload.as_ref(),
                chunk.offset,
            ),
            payload,
            hash,
        };
        tx.send_timeout(out, timeout)
            .map_err(|_| PipelineError::Timeout {
                phase: phase_of(chunk.kind),
                what: "the sender to take an encoded frame",
                waited: timeout,
            })?;
    }
}

/// Appends the hash trailer ([`vfmig_wire::HASH_TRAILER_LEN`] bytes, XXH3-128 LE) to an encoded
/// device state payload. A chunk is at most `max_payload - HASH_TRAILER_LEN` raw bytes and 7/8 of
/// its slot, and its encoded body is never longer, so the trailer always fits.
pub(crate) fn append_trailer(p: &mut PoolBuf, hash: u128) -> Result<(), PipelineError> {
    const N: usize = vfmig_wire::HASH_TRAILER_LEN;
    let len = p.len();
    let spare = p.spare_mut();
    let Some(t) = spare.get_mut(len..len + N) else {
        return Err(PipelineError::StageLost {
            stage: "codec (no room for the hash trailer)",
        });
    };
    t.copy_from_slice(&hash.to_le_bytes());
    p.set_len(len + N);
    Ok(())
}

/// Splits the hash trailer off a received device state payload: the body stays in `p`.
fn take_trailer(p: &mut PoolBuf) -> Option<u128> {
    const N: usize = vfmig_wire::HASH_TRAILER_LEN;
    let body = p.len().checked_sub(N).filter(|&b| b > 0)?;
    let mut t = [0u8; N];
    t.copy_from_slice(&p.as_slice()[body..]);
    p.set_len(body);
    Some(u128::from_le_bytes(t))
}

fn phase_of(kind: FrameKind) -> Phase {
    if kind == FrameKind::PreCopyData {
        Phase::PreCopy
    } else {
        Phase::StopCopy
    }
}

/// Where the sender hands frames (the transport's send session, in order per device).
pub(crate) trait FrameSink {
    fn send_frame(
        &self,
        header: FrameHeader,
        payload: Option<PoolBuf>,
    ) -> Result<(), PipelineError>;

    /// Sends a device state frame whose payload ends with its hash trailer
    /// ([`vfmig_wire::FLAG_HASH_TRAILER`]). Required (no default), so a sink that wraps another
    /// cannot forget to pass the trailer flag on.
    fn send_hash_trailer(&self, header: FrameHeader, payload: PoolBuf)
        -> Result<(), PipelineError>;

    /// The key of the session's stream digests (PSK sessions), `None` for an unkeyed digest.
    fn digest_key(&self) -> Option<[u8; 32]> {
        None
    }
}

/// A token bucket on wire bytes (`--max-bandwidth`).
#[derive(Debug)]
pub(crate) struct RateLimit {
    bytes_per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        let rate = bytes_per_sec as f64;
        RateLimit {
            bytes_per_sec: rate,
            // A burst of at most 50 ms worth.
            tokens: rate * 0.05,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may go (never longer than the bytes take at the configured rate).
    pub fn take(&mut self, bytes: usize, stop: &AtomicBool) {
        let now = Instant::now();
        let cap = self.bytes_per_sec * 0.05;
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.bytes_per_sec)
            .min(cap.max(bytes as f64));
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-self.tokens / self.bytes_per_sec);
            let until = now + wait;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep((until - Instant::now()).min(POLL));
            }
        }
    }
}

/// Source sender: restores each device's sequence order and hands frames to `sink`. Returns when
/// every producer is gone and everything was sent.
pub(crate) fn send_loop(
    rx: Receiver<Outgoing>,
    window: u64,
    sink: &dyn FrameSink,
    counters: &Counters,
    adaptive: &Adaptive,
    mut limit: Option<RateLimit>,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let mut reseq: Vec<Resequencer<Outgoing>> = counters
        .devices
        .iter()
        .map(|_| Resequencer::new(window))
        .collect();
    let key = sink.digest_key();
    let mut digests: Vec<StreamDigest> = counters
        .devices
        .iter()
        .map(|_| StreamDigest::with_key(key.as_ref()))
        .collect();
    loop {
        let out = match rx.recv_timeout(POLL) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // A frame still parked means an earlier one never came: a stage died.
                return if reseq.iter().any(|r| r.waiting() > 0) {
                    Err(PipelineError::StageLost { stage: "codec" })
                } else {
                    Ok(())
                };
            }
        };
        let device = out.header.device;
        let r = reseq
            .get_mut(usize::from(device))
            .ok_or(PipelineError::StageLost { stage: "sender" })?;
        r.push(out.header.seq, out)
            .map_err(|source| PipelineError::Sequence { device, source })?;
        while let Some(mut o) = r.pop() {
            if let Some(d) = digests.get_mut(usize::from(device)) {
                seal_digest(d, &mut o)?;
            }
            let wire = o.payload.as_ref().map_or(0, PoolBuf::len);
            // A rate limit is a slower link: its wait counts as time blocked on the network.
            let t0 = Instant::now();
            if let Some(l) = limit.as_mut() {
                l.take(wire + vfmig_wire::HEADER_LEN, stop);
            }
            // A device state frame with a payload carries its hash trailer (`encode_worker`).
            match (o.hash, o.payload) {
                (Some(_), Some(p)) => sink.send_hash_trailer(o.header, p)?,
                (_, payload) => sink.send_frame(o.header, payload)?,
            }
            let blocked = t0.elapsed();
            counters.net.add(blocked);
            adaptive.record_link(wire + vfmig_wire::HEADER_LEN, blocked);
            if let Some(c) = counters.device(device) {
                DeviceCounters::add(&c.wire, wire);
            }
        }
    }
}

/// Folds a device state frame into its device's digest, or writes the digest into the
/// `EndOfDevice` frame that ends the stream (in sequence order, so the fold order is the
/// stream's).
fn seal_digest(d: &mut StreamDigest, o: &mut Outgoing) -> Result<(), PipelineError> {
    let h = &o.header;
    if let Some(hash) = o.hash {
        d.add(h.arg, h.raw_len as usize, hash);
    } else if h.kind == FrameKind::EndOfDevice {
        let p = o
            .payload
            .as_mut()
            .filter(|p| p.len() == vfmig_wire::DIGEST_LEN)
            .ok_or(PipelineError::StageLost { stage: "reader" })?;
        p.as_mut_slice().copy_from_slice(&d.finish());
    }
    Ok(())
}

/// What the destination writer receives, per device in sequence order.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Decoded device state and [`digest::chunk_hash`] of it.
    Data(Decoded, u128),
    /// Decoded dirty guest pages starting at `gpa`.
    Pages { gpa: u64, data: Decoded },
    /// The source left PRE_COPY after `raw` bytes.
    PreCopyDone { raw: u64 },
    /// The device's initial pre-copy data ended after `raw` bytes.
    InitialDone { raw: u64 },
    /// The stream ended: the source's totals.
    End { total: u64, digest: [u8; 32] },
}

/// One item for the writer: device, sequence number, content.
#[derive(Debug)]
pub(crate) struct InItem {
    pub device: u16,
    pub seq: u64,
    pub item: Incoming,
}

/// A data frame received and verified by the transport, to be decoded.
#[derive(Debug)]
pub(crate) struct Received {
    pub header: FrameHeader,
    pub payload: Option<PoolBuf>,
}

/// Destination codec worker.
pub(crate) fn decode_worker(
    rx: Receiver<Received>,
    tx: Sender<InItem>,
    pool: BufPool,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
) -> Result<(), PipelineError> {
    let mut dec = Decoder::new().map_err(|source| PipelineError::Resource {
        what: "a zstd context",
        source,
    })?;
    loop {
        let r = match rx.recv_timeout(POLL) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let h = r.header;
        let t0 = Instant::now();
        let state = h.kind != FrameKind::DirtyPages;
        let mut payload = r.payload;
        // Device state payloads end with the source's hash of the raw bytes (version 4): split it
        // off; the decoded bytes must match it before they go on to the writer.
        let expect = match payload.as_mut() {
            Some(p) if state && h.codec != Codec::Zero => {
                Some(take_trailer(p).ok_or(PipelineError::Decode {
                    device: h.device,
                    seq: h.seq,
                    codec: h.codec,
                    failure: DecodeFailure::Payload,
                })?)
            }
            _ => None,
        };
        let decoded = dec
            .decode(h.codec, h.raw_len, payload, &pool)
            .map_err(|failure| PipelineError::Decode {
                device: h.device,
                seq: h.seq,
                codec: h.codec,
                failure,
            })?;
        let item = if state {
            let hash = match &decoded {
                Decoded::Data(b) => digest::chunk_hash(b.as_slice()),
                Decoded::Zero(n) => digest::zero_hash(*n),
            };
            if let Some(expected) = expect.filter(|&e| e != hash) {
                return Err(PipelineError::Decode {
                    device: h.device,
                    seq: h.seq,
                    codec: h.codec,
                    failure: DecodeFailure::HashMismatch {
                        expected,
                        computed: hash,
                    },
                });
            }
            Incoming::Data(decoded, hash)
        } else {
            Incoming::Pages {
                gpa: h.arg,
                data: decoded,
            }
        };
        counters.codec.add_since(t0);
        if let Some(c) = counters.device(h.device) {
            DeviceCounters::add(&c.wire, usize::try_from(h.wire_len).unwrap_or(0));
        }
        tx.send_timeout(
            InItem {
                device: h.device,
                seq: h.seq,
                item,
            },
            timeout,
        )
        .map_err(|_| PipelineError::Timeout {
            phase: Phase::Resume,
            what: "the writer to take a decoded chunk",
            waited: timeout,
        })?;
    }
}
