//! The codec stage: zero elision, a cheap incompressibility probe, zstd / lz4 into pool buffers,
//! and the adaptive choice of how hard to compress.
//!
//! Encoding never copies a chunk it does not compress: `Codec::Raw` frames carry the buffer the
//! reader filled, `Codec::Zero` frames carry nothing. Compressed output goes into a second pool
//! slot; when no slot is free right now, or the output would not be smaller, the chunk goes raw.
//! That fallback also means the codec stage can never deadlock on the pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vfmig_transport::{BufPool, PoolBuf};
use vfmig_wire::Codec;

/// What the source does with compressible chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compress {
    /// Choose per chunk from measured link and codec throughput.
    #[default]
    Auto,
    /// Never compress (zero chunks are still elided).
    None,
    /// Always LZ4 (block format).
    Lz4,
    /// Always zstd at this level.
    Zstd(i32),
}

/// One way to encode a compressible chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    Raw,
    Lz4,
    Zstd(i32),
}

/// Bits per byte above which a sampled chunk is treated as incompressible. Random bytes sample at
/// ~7.9 bits with 2 KiB of samples; anything with a zero run, text or structure is well below.
const ENTROPY_RAW_BITS: f64 = 7.5;
/// Bytes per probe sample and number of samples.
const SAMPLE: usize = 512;
const SAMPLES: usize = 4;
const SAMPLE_BYTES: u32 = 512;
/// Compressed output must save at least 1/32 of the chunk, or the chunk goes raw.
const MIN_SAVING_SHIFT: u32 = 5;

/// Raw bytes per chunk for a pool slot: 7/8 of the slot, which leaves room in one slot for
/// `lz4_flex`'s worst-case output bound (`1.1 n + 20`), which it insists on before compressing.
/// Page-aligned for slots that are multiples of 32 KiB.
pub(crate) fn chunk_len(slot_size: usize) -> usize {
    slot_size - slot_size / 8
}

/// Whether every byte is zero (checked a page at a time, so non-zero chunks exit early).
pub(crate) fn is_all_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Shannon entropy (bits per byte) of a few evenly spaced samples: a cheap guess at whether a
/// chunk is worth a compression attempt.
pub(crate) fn sampled_entropy(b: &[u8]) -> f64 {
    let mut hist = [0u32; 256];
    let mut n = 0u32;
    if b.len() <= SAMPLE * SAMPLES {
        for &x in b {
            hist[usize::from(x)] += 1;
        }
        n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    } else {
        let stride = (b.len() - SAMPLE) / (SAMPLES - 1);
        for i in 0..SAMPLES {
            for &x in &b[i * stride..i * stride + SAMPLE] {
                hist[usize::from(x)] += 1;
            }
            n += SAMPLE_BYTES;
        }
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether a chunk looks incompressible from its samples.
pub(crate) fn looks_incompressible(b: &[u8]) -> bool {
    sampled_entropy(b) > ENTROPY_RAW_BITS
}

/// How one chunk was encoded, for the report and the adaptive controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Zero,
    ProbedRaw,
    Compressed(Choice),
    /// Compression was tried (or had no buffer) and did not pay.
    FellBackRaw(Choice),
    Raw,
}

/// Per-worker encoder state (zstd context reused across chunks).
pub(crate) struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    zstd_level: i32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("zstd_level", &self.zstd_level)
            .finish()
    }
}

impl Encoder {
    pub fn new() -> std::io::Result<Encoder> {
        Ok(Encoder {
            zstd: zstd::bulk::Compressor::new(1)?,
            zstd_level: 1,
        })
    }

    /// Encodes `input` (its valid bytes) with `choice`. Returns the codec and the payload to send:
    /// `None` for zero chunks, `input` itself for raw, a new pool buffer for compressed data.
    pub fn encode(
        &mut self,
        input: PoolBuf,
        choice: Choice,
        pool: &BufPool,
    ) -> (Codec, Option<PoolBuf>, Outcome) {
        let data = input.as_slice();
        if is_all_zero(data) {
            return (Codec::Zero, None, Outcome::Zero);
        }
        if choice == Choice::Raw {
            return (Codec::Raw, Some(input), Outcome::Raw);
        }
        if looks_incompressible(data) {
            return (Codec::Raw, Some(input), Outcome::ProbedRaw);
        }
        let Some(mut out) = pool.try_acquire() else {
            return (Codec::Raw, Some(input), Outcome::FellBackRaw(choice));
        };
        let limit = data.len() - (data.len() >> MIN_SAVING_SHIFT);
        let written = match choice {
            // LZ4 insists on room for its worst case; `chunk_len` keeps that within a slot.
            Choice::Lz4 => lz4_flex::block::compress_into(data, out.spare_mut()).ok(),
            Choice::Zstd(level) => {
                if level != self.zstd_level && self.zstd.set_compression_level(level).is_ok() {
                    self.zstd_level = level;
                }
                self.zstd
                    .compress_to_buffer(data, &mut out.spare_mut()[..limit])
                    .ok()
            }
            Choice::Raw => None,
        };
        match written {
            Some(n) if n > 0 && n < limit => {
                out.set_len(n);
                let codec = match choice {
                    Choice::Lz4 => Codec::Lz4,
                    _ => Codec::Zstd,
                };
                (codec, Some(out), Outcome::Compressed(choice))
            }
            _ => (Codec::Raw, Some(input), Outcome::FellBackRaw(choice)),
        }
    }
}

/// Why a frame's payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeFailure {
    /// The compressed payload is malformed.
    #[error("the compressed payload is malformed")]
    Malformed,
    /// Decoded length differs from the header's `raw_len`.
    #[error("decoded {got} bytes, header says {raw_len}")]
    Length {
        /// Declared raw length.
        raw_len: u32,
        /// Bytes produced.
        got: usize,
    },
    /// `raw_len` exceeds the pool slot size.
    #[error("raw length {raw_len} exceeds the buffer size {slot}")]
    TooLarge {
        /// Declared raw length.
        raw_len: u32,
        /// Pool slot size.
        slot: usize,
    },
    /// A payload is missing, present where none may be, or has the wrong length.
    #[error("payload presence or length does not match the codec")]
    Payload,
    /// No pool buffer came free for the output.
    #[error("no buffer for the decoded payload")]
    NoBuffer,
}

/// Decoded chunk content.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// `len` zero bytes.
    Zero(usize),
    /// The raw bytes (the buffer's valid bytes).
    Data(PoolBuf),
}

/// Per-worker decoder state.
pub(crate) struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    pub fn new() -> std::io::Result<Decoder> {
        Ok(Decoder {
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decodes one payload of `raw_len` bytes encoded with `codec` into pool memory.
    pub fn decode(
        &mut self,
        codec: Codec,
        raw_len: u32,
        payload: Option<PoolBuf>,
        pool: &BufPool,
        timeout: Duration,
    ) -> Result<Decoded, DecodeFailure> {
        let raw = usize::try_from(raw_len).map_err(|_| DecodeFailure::TooLarge {
            raw_len,
            slot: pool.slot_size(),
        })?;
        if raw > pool.slot_size() {
            return Err(DecodeFailure::TooLarge {
                raw_len,
                slot: pool.slot_size(),
            });
        }
        match (codec, payload) {
            (Codec::Zero, None) => Ok(Decoded::Zero(raw)),
            (Codec::Zero, Some(p)) if p.is_empty() => Ok(Decoded::Zero(raw)),
            (Codec::Raw, Some(p)) if p.len() == raw => Ok(Decoded::Data(p)),
            (Codec::Lz4 | Codec::Zstd, Some(p)) if !p.is_empty() => {
                let mut out = pool.acquire(timeout).map_err(|_| DecodeFailure::NoBuffer)?;
                let dst = &mut out.spare_mut()[..raw];
                let got = if codec == Codec::Lz4 {
                    lz4_flex::block::decompress_into(p.as_slice(), dst)
                        .map_err(|_| DecodeFailure::Malformed)?
                } else {
                    self.zstd
                        .decompress_to_buffer(p.as_slice(), dst)
                        .map_err(|_| DecodeFailure::Malformed)?
                };
                if got != raw {
                    return Err(DecodeFailure::Length { raw_len, got });
                }
                out.set_len(raw);
                Ok(Decoded::Data(out))
            }
            _ => Err(DecodeFailure::Payload),
        }
    }
}

/// The rungs `Compress::Auto` chooses from, cheapest first.
const LADDER: [Choice; 5] = [
    Choice::Raw,
    Choice::Lz4,
    Choice::Zstd(1),
    Choice::Zstd(3),
    Choice::Zstd(7),
];
/// Prior codec speed (raw bytes per second per worker) and wire/raw ratio per rung, replaced by
/// measurements as they come in.
const PRIOR_RATE: [f64; 5] = [20e9, 1.5e9, 5e8, 2.5e8, 8e7];
const PRIOR_RATIO: [f64; 5] = [1.0, 0.6, 0.45, 0.42, 0.40];
/// Every `EXPLORE`-th compressible chunk tries a neighbouring rung to keep its figures fresh.
const EXPLORE: u64 = 16;
/// Weight of a new measurement in the moving averages.
const EWMA: f64 = 0.2;

#[derive(Debug)]
struct AdaptState {
    rate: [f64; 5],
    ratio: [f64; 5],
    current: usize,
    /// Wire bytes the sender handed to the transport and the time it spent blocked doing so.
    link_bytes: u64,
    link_busy: Duration,
    link_rate: f64,
}

/// Chooses the encoding per chunk: pinned by [`Compress`], or adaptive (Auto).
#[derive(Debug)]
pub(crate) struct Adaptive {
    pinned: Option<Choice>,
    workers: f64,
    chunks: AtomicU64,
    state: Mutex<AdaptState>,
}

impl Adaptive {
    pub fn new(compress: Compress, workers: usize) -> Adaptive {
        let pinned = match compress {
            Compress::Auto => None,
            Compress::None => Some(Choice::Raw),
            Compress::Lz4 => Some(Choice::Lz4),
            Compress::Zstd(l) => Some(Choice::Zstd(l)),
        };
        Adaptive {
            pinned,
            workers: workers.max(1) as f64,
            chunks: AtomicU64::new(0),
            state: Mutex::new(AdaptState {
                rate: PRIOR_RATE,
                ratio: PRIOR_RATIO,
                current: 1,
                link_bytes: 0,
                link_busy: Duration::ZERO,
                // Unknown until measured: assume a 10 Gbit/s link.
                link_rate: 1.25e9,
            }),
        }
    }

    /// The choice for the next chunk (and whether it is an exploration of another rung).
    pub fn choose(&self) -> Choice {
        if let Some(c) = self.pinned {
            return c;
        }
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
        let Ok(st) = self.state.lock() else {
            return Choice::Lz4;
        };
        let cur = st.current;
        let rung = if n % EXPLORE == EXPLORE - 1 {
            // Alternate between the rung below and the rung above.
            if (n / EXPLORE) % 2 == 0 {
                cur.saturating_sub(1)
            } else {
                (cur + 1).min(LADDER.len() - 1)
            }
        } else {
            cur
        };
        LADDER[rung]
    }

    /// Records a compression measured on one chunk.
    pub fn record(&self, choice: Choice, raw: usize, wire: usize, took: Duration) {
        if self.pinned.is_some() || raw == 0 {
            return;
        }
        let Some(i) = LADDER.iter().position(|&c| c == choice) else {
            return;
        };
        let secs = took.as_secs_f64().max(1e-7);
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let rate = raw as f64 / secs;
        let ratio = (wire as f64 / raw as f64).min(1.0);
        st.rate[i] = st.rate[i] * (1.0 - EWMA) + rate * EWMA;
        st.ratio[i] = st.ratio[i] * (1.0 - EWMA) + ratio * EWMA;
        Self::decide(&mut st, self.workers);
    }

    /// Records wire bytes handed to the transport and the time the sender was blocked doing it:
    /// their quotient estimates the link's capacity when the link is the bottleneck, and is large
    /// (favouring cheap codecs) when it is not.
    pub fn record_link(&self, wire: usize, blocked: Duration) {
        if self.pinned.is_some() {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.link_bytes += wire as u64;
        st.link_busy += blocked;
        // Decide every 4 MiB, or sooner on a slow link (100 ms blocked).
        if st.link_bytes >= 4 << 20 || st.link_busy >= Duration::from_millis(100) {
            let secs = st.link_busy.as_secs_f64().max(1e-4);
            let rate = st.link_bytes as f64 / secs;
            st.link_rate = st.link_rate * 0.5 + rate * 0.5;
            st.link_bytes = 0;
            st.link_busy = Duration::ZERO;
            Self::decide(&mut st, self.workers);
        }
    }

    fn decide(st: &mut AdaptState, workers: f64) {
        // Raw throughput each rung would sustain: the slower of the codec and the link.
        let mut best = 0;
        let mut best_rate = 0.0;
        for i in 0..LADDER.len() {
            let cpu = st.rate[i] * workers;
            let net = st.link_rate / st.ratio[i].max(0.01);
            let eff = cpu.min(net);
            // Prefer the cheaper rung unless the costlier one is clearly (5 %) better.
            if eff > best_rate * 1.05 {
                best = i;
                best_rate = eff;
            }
        }
        st.current = best;
    }

    /// The rung in use (for reports).
    pub fn current(&self) -> Choice {
        if let Some(c) = self.pinned {
            return c;
        }
        self.state
            .lock()
            .map(|s| LADDER[s.current])
            .unwrap_or(Choice::Lz4)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn fill(pool: &BufPool, data: &[u8]) -> PoolBuf {
        let mut b = pool.try_acquire().unwrap();
        b.spare_mut()[..data.len()].copy_from_slice(data);
        b.set_len(data.len());
        b
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn zero_chunks_are_elided_and_decode_to_zeros() {
        let pool = BufPool::new(4, 65536).unwrap();
        let mut enc = Encoder::new().unwrap();
        let (codec, payload, out) = enc.encode(fill(&pool, &[0u8; 65536]), Choice::Zstd(3), &pool);
        assert_eq!((codec, out), (Codec::Zero, Outcome::Zero));
        assert!(payload.is_none());
        assert_eq!(pool.free(), 4, "the input buffer went back to the pool");
        let mut dec = Decoder::new().unwrap();
        let d = dec
            .decode(Codec::Zero, 65536, None, &pool, Duration::from_secs(1))
            .unwrap();
        assert!(matches!(d, Decoded::Zero(65536)));
    }

    #[test]
    fn random_chunks_go_raw_in_the_same_buffer_without_a_compression_attempt() {
        let pool = BufPool::new(4, 65536).unwrap();
        let data = noise(65536, 7);
        let input = fill(&pool, &data);
        let index = input.index();
        let mut enc = Encoder::new().unwrap();
        let (codec, payload, out) = enc.encode(input, Choice::Zstd(3), &pool);
        assert_eq!((codec, out), (Codec::Raw, Outcome::ProbedRaw));
        let payload = payload.unwrap();
        assert_eq!(payload.index(), index, "no copy: the same slot is sent");
        assert_eq!(payload.as_slice(), &data[..]);
    }

    #[test]
    fn structured_chunks_round_trip_through_zstd_and_lz4() {
        let pool = BufPool::new(4, 65536).unwrap();
        let n = chunk_len(65536);
        let text: Vec<u8> = (0..n as u32)
            .map(|i| b"device register file "[(i % 21) as usize] ^ ((i / 4096) as u8))
            .collect();
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new().unwrap();
        for choice in [Choice::Lz4, Choice::Zstd(1), Choice::Zstd(7)] {
            let (codec, payload, out) = enc.encode(fill(&pool, &text), choice, &pool);
            assert_eq!(out, Outcome::Compressed(choice));
            let payload = payload.unwrap();
            assert!(payload.len() < text.len() / 4);
            let d = dec
                .decode(
                    codec,
                    n as u32,
                    Some(payload),
                    &pool,
                    Duration::from_secs(1),
                )
                .unwrap();
            let Decoded::Data(b) = d else {
                panic!("expected data")
            };
            assert_eq!(b.as_slice(), &text[..]);
        }
    }

    #[test]
    fn corrupt_or_lying_payloads_are_typed_decode_failures() {
        let pool = BufPool::new(4, 4096).unwrap();
        let mut dec = Decoder::new().unwrap();
        let t = Duration::from_millis(50);
        let garbage = fill(&pool, &noise(100, 3));
        assert_eq!(
            dec.decode(Codec::Zstd, 4096, Some(garbage), &pool, t)
                .unwrap_err(),
            DecodeFailure::Malformed
        );
        let short = fill(&pool, &[1, 2, 3]);
        assert_eq!(
            dec.decode(Codec::Raw, 4, Some(short), &pool, t)
                .unwrap_err(),
            DecodeFailure::Payload
        );
        assert!(matches!(
            dec.decode(Codec::Zero, 8192, None, &pool, t),
            Err(DecodeFailure::TooLarge { .. })
        ));
        let mut enc = Encoder::new().unwrap();
        let (_, p, _) = enc.encode(fill(&pool, &[5u8; 4096]), Choice::Lz4, &pool);
        assert!(matches!(
            dec.decode(Codec::Lz4, 2048, p, &pool, t),
            Err(DecodeFailure::Malformed | DecodeFailure::Length { .. })
        ));
    }

    #[test]
    fn adaptive_compresses_harder_on_a_slow_link_and_less_on_a_fast_one() {
        let a = Adaptive::new(Compress::Auto, 2);
        // A slow link: 100 MB/s measured by blocked send time.
        for _ in 0..4 {
            a.record_link(16 << 20, Duration::from_millis(168));
        }
        assert!(matches!(a.current(), Choice::Zstd(_)), "{:?}", a.current());
        let b = Adaptive::new(Compress::Auto, 2);
        // A link that never blocks: the codec is the bottleneck.
        for _ in 0..4 {
            b.record_link(16 << 20, Duration::from_micros(500));
        }
        assert_eq!(b.current(), Choice::Raw);
        let pinned = Adaptive::new(Compress::Zstd(5), 2);
        pinned.record_link(16 << 20, Duration::from_secs(10));
        assert_eq!(pinned.choose(), Choice::Zstd(5));
    }
}
