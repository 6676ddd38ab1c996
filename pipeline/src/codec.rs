//! The codec stage: zero elision (whole chunks, and 512-byte granules with a page map), a cheap
//! incompressibility probe, and zstd / lz4. How hard to compress is `crate::adapt`'s choice.
//!
//! Encoding never copies a chunk it sends as it came: `Codec::Raw` frames carry the buffer the
//! reader filled, `Codec::Zero` frames carry nothing, and a chunk with zero granules moves only
//! the granules after its first zero one, within its slot. Compressed output goes to a per-worker
//! scratch buffer and is copied back over its input in the same slot (it is smaller), so the
//! source codec stage needs no second pool slot: it can neither wait for one nor deadlock on the
//! pool. Output that would not save 1/32 is dropped and the chunk goes raw.

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

/// Raw bytes per chunk for a pool slot: 7/8 of the slot (page-aligned for slots that are
/// multiples of 32 KiB). The rest of the slot has room for a page map; compression output no
/// longer needs it (it goes to the encoder's scratch), so a larger share is possible but has not
/// been measured.
pub(crate) fn chunk_len(slot_size: usize) -> usize {
    slot_size - slot_size / 8
}

/// A device's stream is *settled raw* once this many of its chunks in a row went raw and unpacked
/// (`DeviceCounters::raw_streak`); its chunks then get a sampled zero check ([`SAMPLED_GRANULES`]
/// granules) instead of a full scan, except those whose sequence number is a multiple of
/// [`FULL_SCAN_EVERY`] ([`sampled_turn`]). A sample that finds a zero granule means a full scan of
/// that chunk (and, if it is packed, the stream is no longer settled). Unsampled zero granules of
/// a settled stream go out as data (correct, just not elided).
pub(crate) const SETTLE_CHUNKS: u32 = 8;
/// Bytes hashed and then zero-scanned at a time when both run over a chunk (a multiple of the
/// granule that stays in the L1 cache between the two).
const FUSED_BLOCK: usize = 16 << 10;
const SAMPLED_GRANULES: usize = 16;
pub(crate) const FULL_SCAN_EVERY: u32 = 32;

/// Whether chunk `seq` of a stream whose raw streak is `streak` gets only a sampled zero check.
pub(crate) fn sampled_turn(streak: u32, seq: u64) -> bool {
    streak >= SETTLE_CHUNKS && seq % u64::from(FULL_SCAN_EVERY) != 0
}

/// Bytes per bit of the page map (docs/PROTOCOL.md, section 6): small enough that zero regions
/// at any alignment in the device's stream are elided almost whole.
const GRANULE: usize = vfmig_wire::MAP_GRANULE as usize;
/// Most granules in one chunk ([`vfmig_wire::MAX_PAYLOAD`] / [`GRANULE`]) and the most map bytes.
const MAX_GRANULES: usize = (vfmig_wire::MAX_PAYLOAD as usize).div_ceil(GRANULE);
const MAX_MAP: usize = MAX_GRANULES.div_ceil(8);

/// Whether every byte of `p` is zero. Most non-zero blocks show it in their first bytes; zero
/// blocks are read whole, in a form the compiler vectorises.
fn block_is_zero(p: &[u8]) -> bool {
    let head = p.len().min(64);
    or_words(&p[..head]) == 0 && or_words(&p[head..]) == 0
}

/// The OR of `b`'s bytes, 8 at a time (branch-free, so the compiler vectorises it; a byte-wise
/// early-exit loop over a zero granule's head cost as much as the rest of the scan).
#[inline]
fn or_words(b: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        // Always 8 bytes (`chunks_exact`): one load.
        if let Ok(a) = <[u8; 8]>::try_from(w) {
            acc |= u64::from_ne_bytes(a);
        }
    }
    for &x in words.remainder() {
        acc |= u64::from(x);
    }
    acc
}

/// Which granules of a chunk hold data: the page map of docs/PROTOCOL.md, section 6.
#[derive(Clone)]
pub(crate) struct PageMap {
    bits: [u8; MAX_MAP],
    granules: usize,
    present: usize,
}

impl PageMap {
    /// Scans `data`. Input longer than [`vfmig_wire::MAX_PAYLOAD`] is mapped as if every
    /// granule past the limit held data (and is never packed).
    pub fn scan(data: &[u8]) -> PageMap {
        let mut m = PageMap::empty(data.len());
        m.scan_at(0, data);
        m
    }

    /// Scans `data` and hashes it ([`crate::digest::chunk_hash`]) in one pass: block by block,
    /// each block hashed and scanned while it is in the L1 cache.
    pub fn scan_hashed(data: &[u8]) -> (PageMap, u128) {
        let mut m = PageMap::empty(data.len());
        let mut h = crate::digest::ChunkHasher::new();
        for (i, block) in data.chunks(FUSED_BLOCK).enumerate() {
            h.update(block);
            m.scan_at(i * FUSED_BLOCK / GRANULE, block);
        }
        (m, h.digest128())
    }

    fn empty(len: usize) -> PageMap {
        PageMap {
            bits: [0; MAX_MAP],
            granules: len.div_ceil(GRANULE),
            present: 0,
        }
    }

    /// Marks the granules of `data`, the first of which is granule `first` of the chunk.
    fn scan_at(&mut self, first: usize, data: &[u8]) {
        for (k, block) in data.chunks(GRANULE).enumerate() {
            let i = first + k;
            if i >= MAX_GRANULES || !block_is_zero(block) {
                if let Some(b) = self.bits.get_mut(i / 8) {
                    *b |= 1 << (i % 8);
                }
                self.present += 1;
            }
        }
    }

    /// A map of `len` bytes whose every granule is marked present (nothing is left out), for a
    /// chunk whose zero scan was sampled ([`Encoder::encode_hashed`]).
    fn all_present(len: usize) -> PageMap {
        let granules = len.div_ceil(GRANULE);
        PageMap {
            bits: [0; MAX_MAP],
            granules,
            present: granules,
        }
    }

    /// Whether any of a few evenly spaced granules of `data` (the first and the last among them)
    /// is all zero: the check a settled raw stream's chunks get instead of a full scan.
    pub(crate) fn sample_finds_zero(data: &[u8]) -> bool {
        let granules = data.len().div_ceil(GRANULE);
        if granules == 0 {
            return false;
        }
        let step = (granules / SAMPLED_GRANULES).max(1);
        (0..granules)
            .step_by(step)
            .chain(std::iter::once(granules - 1))
            .any(|g| block_is_zero(&data[g * GRANULE..((g + 1) * GRANULE).min(data.len())]))
    }

    fn map_len(&self) -> usize {
        self.granules.div_ceil(8)
    }

    /// Bytes of the paged body of `raw` bytes mapped by this map: present granules plus the map.
    fn body_len(&self, raw: usize) -> usize {
        let last = self.granules.saturating_sub(1);
        let short = GRANULE * self.granules - raw;
        let last_present = self
            .bits
            .get(last / 8)
            .is_some_and(|b| b >> (last % 8) & 1 == 1);
        let short = if last_present { short } else { 0 };
        self.present * GRANULE - short + self.map_len()
    }
}

/// Maximal runs of granules whose bit in `bits` is `present`, as `(first, end)` granule indices.
fn runs(bits: &[u8], granules: usize, present: bool) -> impl Iterator<Item = (usize, usize)> + '_ {
    let has = move |i: usize| {
        bits.get(i / 8)
            .is_some_and(|b| (b >> (i % 8) & 1 == 1) == present)
    };
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < granules && !has(i) {
            i += 1;
        }
        if i >= granules {
            return None;
        }
        let first = i;
        while i < granules && has(i) {
            i += 1;
        }
        Some((first, i))
    })
}

/// Packs the present granules of `buf` to its front and appends the page map (the paged body).
/// Data before the first zero granule does not move. Returns false (leaving `buf` as it was)
/// when `buf` lacks room for the map past its valid bytes; a pool slot holds `chunk_len` raw
/// bytes, far less than its size, so the pipeline's chunks always have room.
fn pack_pages(buf: &mut PoolBuf, map: &PageMap) -> bool {
    let raw = buf.len();
    let map_len = map.map_len();
    if raw + map_len > buf.capacity() || map.granules > MAX_GRANULES {
        return false;
    }
    let slot = buf.spare_mut();
    let mut at = 0;
    for (first, end) in runs(&map.bits, map.granules, true) {
        let (start, stop) = (first * GRANULE, (end * GRANULE).min(raw));
        if start != at {
            slot.copy_within(start..stop, at);
        }
        at += stop - start;
    }
    slot[at..at + map_len].copy_from_slice(&map.bits[..map_len]);
    buf.set_len(at + map_len);
    true
}

/// Expands a paged body in `buf` in place to `raw` bytes: present runs move to their places (last
/// first, so nothing is overwritten before it moved), absent ones become zeros.
fn unpack_pages(buf: &mut PoolBuf, raw: usize) -> Result<(), DecodeFailure> {
    let raw_len = u32::try_from(raw).map_err(|_| DecodeFailure::Payload)?;
    let map_len = vfmig_wire::page_map_len(raw_len) as usize;
    let granules = raw.div_ceil(GRANULE);
    let body = buf.len();
    if body < map_len || raw > buf.capacity() || map_len > MAX_MAP {
        return Err(DecodeFailure::Payload);
    }
    let mut bits = [0u8; MAX_MAP];
    bits[..map_len].copy_from_slice(&buf.as_slice()[body - map_len..]);
    // Bits past the last granule must be clear.
    if granules % 8 != 0 && bits[map_len - 1] >> (granules % 8) != 0 {
        return Err(DecodeFailure::Malformed);
    }
    let bytes = |(first, end): (usize, usize)| (end * GRANULE).min(raw) - first * GRANULE;
    let present: usize = runs(&bits, granules, true).map(bytes).sum();
    if present + map_len != body {
        return Err(DecodeFailure::Length {
            raw_len,
            got: body - map_len,
        });
    }
    let slot = buf.spare_mut();
    // Walk the present runs from the last one back.
    let has = |i: usize| bits[i / 8] >> (i % 8) & 1 == 1;
    let mut src_end = present;
    let mut end = granules;
    while end > 0 {
        if !has(end - 1) {
            end -= 1;
            continue;
        }
        let mut first = end - 1;
        while first > 0 && has(first - 1) {
            first -= 1;
        }
        let (dst, len) = (first * GRANULE, bytes((first, end)));
        src_end -= len;
        if src_end != dst {
            slot.copy_within(src_end..src_end + len, dst);
        }
        end = first;
    }
    for (first, end) in runs(&bits, granules, false) {
        slot[first * GRANULE..(end * GRANULE).min(raw)].fill(0);
    }
    buf.set_len(raw);
    Ok(())
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
    /// Compression was tried and did not pay.
    FellBackRaw(Choice),
    Raw,
}

/// One encoded chunk.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub codec: Codec,
    /// `None` for zero chunks, else the input's slot (raw, packed, or holding the compressed
    /// output).
    pub payload: Option<PoolBuf>,
    pub outcome: Outcome,
    /// [`crate::digest::chunk_hash`] of the raw bytes, when asked for.
    pub hash: Option<u128>,
}

/// Per-worker encoder state (zstd context and output scratch reused across chunks).
pub(crate) struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    /// Compressed output before it is copied back over its input (one slot's worth).
    scratch: Vec<u8>,
    zstd_level: i32,
    /// Codecs the receiver agreed to (`handshake::codec_bit` bits).
    codecs: u32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("zstd_level", &self.zstd_level)
            .field("codecs", &self.codecs)
            .finish()
    }
}

impl Encoder {
    /// An encoder that sends only `codecs` (the handshake's agreed bits; Raw is always allowed).
    pub fn new(codecs: u32) -> std::io::Result<Encoder> {
        Ok(Encoder {
            zstd: zstd::bulk::Compressor::new(1)?,
            zstd_level: 1,
            codecs,
            scratch: Vec::new(),
        })
    }

    fn allows(&self, codec: Codec) -> bool {
        codec == Codec::Raw || self.codecs & vfmig_wire::handshake::codec_bit(codec) != 0
    }

    /// Encodes `input` (its valid bytes) with `choice`.
    ///
    /// All-zero chunks become `Zero` frames. Chunks with some zero pages drop them (a paged body,
    /// when the receiver agreed to paged codecs). What is left goes raw if `choice` says so or it
    /// samples as incompressible, and is compressed otherwise; compression that does not save
    /// 1/32 falls back to raw.
    #[cfg(test)]
    pub fn encode(&mut self, input: PoolBuf, choice: Choice, pool: &BufPool) -> Encoded {
        self.encode_hashed(input, choice, pool, true, false)
    }

    /// [`Encoder::encode`], hashing the raw bytes only when `hash` is set (device state goes
    /// into the stream digest; guest pages do not). `sampled`: the chunk's stream is settled raw
    /// and this is not a full-scan turn ([`sampled_turn`]): a sample of its granules stands in
    /// for the zero scan unless it finds a zero one.
    pub fn encode_hashed(
        &mut self,
        input: PoolBuf,
        choice: Choice,
        pool: &BufPool,
        hash: bool,
        sampled: bool,
    ) -> Encoded {
        // A full scan runs fused with the hash (one pass over the chunk from memory).
        let data = input.as_slice();
        let settled = sampled && !PageMap::sample_finds_zero(data);
        let (map, hash) = match (settled, hash) {
            (true, h) => (
                PageMap::all_present(data.len()),
                h.then(|| crate::digest::chunk_hash(data)),
            ),
            (false, true) => {
                let (m, h) = PageMap::scan_hashed(data);
                (m, Some(h))
            }
            (false, false) => (PageMap::scan(data), None),
        };
        let e = self.encode_mapped(input, &map, choice, pool);
        Encoded {
            codec: e.0,
            payload: e.2,
            outcome: e.1,
            hash,
        }
    }

    /// Encodes `input` whose zero granules `map` marks.
    fn encode_mapped(
        &mut self,
        mut input: PoolBuf,
        map: &PageMap,
        choice: Choice,
        pool: &BufPool,
    ) -> (Codec, Outcome, Option<PoolBuf>) {
        let done = |codec, payload, outcome| (codec, outcome, payload);
        if map.present == 0 {
            return done(Codec::Zero, None, Outcome::Zero);
        }
        let choice = match choice {
            Choice::Lz4 if self.allows(Codec::Lz4) => Choice::Lz4,
            Choice::Zstd(l) if self.allows(Codec::Zstd) => Choice::Zstd(l),
            _ => Choice::Raw,
        };
        // Pack out zero granules when the body is smaller than the chunk and the receiver agreed
        // to both paged forms this chunk may take (PagedRaw if compression does not pay).
        let paged_variant = match choice {
            Choice::Raw => Codec::PagedRaw,
            Choice::Lz4 => Codec::PagedLz4,
            Choice::Zstd(_) => Codec::PagedZstd,
        };
        let paged = map.present < map.granules
            && map.body_len(input.len()) < input.len()
            && self.allows(Codec::PagedRaw)
            && self.allows(paged_variant)
            && pack_pages(&mut input, map);
        let raw_codec = if paged { Codec::PagedRaw } else { Codec::Raw };
        if choice == Choice::Raw {
            return done(raw_codec, Some(input), Outcome::Raw);
        }
        let data = input.as_slice();
        if looks_incompressible(data) {
            return done(raw_codec, Some(input), Outcome::ProbedRaw);
        }
        let limit = data.len() - (data.len() >> MIN_SAVING_SHIFT);
        // LZ4 insists on room for its worst case (`1.1 n + 20`).
        let room = pool.slot_size().max(data.len() + data.len() / 8 + 64);
        if self.scratch.len() < room {
            self.scratch.resize(room, 0);
        }
        let written = match choice {
            Choice::Lz4 => lz4_flex::block::compress_into(data, &mut self.scratch).ok(),
            Choice::Zstd(level) => {
                if level != self.zstd_level && self.zstd.set_compression_level(level).is_ok() {
                    self.zstd_level = level;
                }
                self.zstd
                    .compress_to_buffer(data, &mut self.scratch[..limit])
                    .ok()
            }
            Choice::Raw => None,
        };
        match written {
            Some(n) if n > 0 && n < limit => {
                // The output is smaller than the input: it goes back into the input's slot, so
                // a compressed chunk holds one slot, like a raw one, and compressing never waits
                // for (or falls back to raw for lack of) a second slot.
                let mut out = input;
                out.spare_mut()[..n].copy_from_slice(&self.scratch[..n]);
                out.set_len(n);
                let codec = match (choice, paged) {
                    (Choice::Lz4, false) => Codec::Lz4,
                    (Choice::Lz4, true) => Codec::PagedLz4,
                    (_, false) => Codec::Zstd,
                    (_, true) => Codec::PagedZstd,
                };
                done(codec, Some(out), Outcome::Compressed(choice))
            }
            _ => done(raw_codec, Some(input), Outcome::FellBackRaw(choice)),
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
    /// The decoded bytes differ from the frame's hash trailer: the payload was changed on the
    /// way (nothing of it was written).
    #[error("the decoded bytes do not match the frame's hash (XXH3-128 {expected:032x}, computed {computed:032x})")]
    HashMismatch {
        /// The hash the source sent.
        expected: u128,
        /// The hash of the decoded bytes.
        computed: u128,
    },
}

/// Decompresses `src` (LZ4 block or zstd frame) into `dst`; the bytes written.
fn decompress(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    lz4: bool,
    src: &PoolBuf,
    dst: &mut [u8],
) -> Result<usize, DecodeFailure> {
    if lz4 {
        lz4_flex::block::decompress_into(src.as_slice(), dst).map_err(|_| DecodeFailure::Malformed)
    } else {
        zstd.decompress_to_buffer(src.as_slice(), dst)
            .map_err(|_| DecodeFailure::Malformed)
    }
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
    /// Decompression output when the pool has no free slot (allocated once, one slot in size):
    /// the result is then copied back over the compressed input in its own slot, so decoding
    /// never waits for a buffer. Waiting could deadlock: the writer parks the decoded frames
    /// that follow a missing one, and those can hold every free slot.
    scratch: Vec<u8>,
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
            scratch: Vec::new(),
        })
    }

    /// Decodes one payload of `raw_len` bytes encoded with `codec` into pool memory.
    pub fn decode(
        &mut self,
        codec: Codec,
        raw_len: u32,
        payload: Option<PoolBuf>,
        pool: &BufPool,
    ) -> Result<Decoded, DecodeFailure> {
        let raw = usize::try_from(raw_len).map_err(|_| DecodeFailure::TooLarge {
            raw_len,
            slot: pool.slot_size(),
        })?;
        if raw == 0 {
            // Every data kind carries at least one byte (the wire checks it; so does this).
            return Err(DecodeFailure::Payload);
        }
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
            (Codec::PagedRaw, Some(mut p)) => {
                unpack_pages(&mut p, raw)?;
                Ok(Decoded::Data(p))
            }
            (Codec::Lz4 | Codec::Zstd | Codec::PagedLz4 | Codec::PagedZstd, Some(p))
                if !p.is_empty() =>
            {
                // A paged body is at most every page plus the map.
                let expect = if codec.is_paged() {
                    raw + vfmig_wire::page_map_len(raw_len) as usize
                } else {
                    raw
                };
                let lz4 = matches!(codec, Codec::Lz4 | Codec::PagedLz4);
                let mut out = match pool.try_acquire() {
                    // The usual case: decompress straight into a second slot, no copy.
                    Some(mut out) => {
                        let cap = expect.min(out.capacity());
                        let got = decompress(&mut self.zstd, lz4, &p, &mut out.spare_mut()[..cap])?;
                        drop(p);
                        out.set_len(got);
                        out
                    }
                    // No slot free: decompress into the scratch and copy the result back over
                    // the input, which is no longer needed.
                    None => {
                        let mut p = p;
                        if self.scratch.len() < p.capacity() {
                            self.scratch = vec![0; p.capacity()];
                        }
                        let cap = expect.min(p.capacity());
                        let dst = &mut self.scratch[..cap];
                        let got = decompress(&mut self.zstd, lz4, &p, dst)?;
                        p.spare_mut()[..got].copy_from_slice(&dst[..got]);
                        p.set_len(got);
                        p
                    }
                };
                let got = out.len();
                if codec.is_paged() {
                    unpack_pages(&mut out, raw)?;
                } else if got != raw {
                    return Err(DecodeFailure::Length { raw_len, got });
                }
                Ok(Decoded::Data(out))
            }
            _ => Err(DecodeFailure::Payload),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use vfmig_wire::handshake::{codec_bit, KNOWN_CODECS};

    const ALL: u32 = KNOWN_CODECS;

    fn decode_all(dec: &mut Decoder, e: Encoded, raw: usize, pool: &BufPool) -> Vec<u8> {
        match dec.decode(e.codec, raw as u32, e.payload, pool).unwrap() {
            Decoded::Data(b) => b.as_slice().to_vec(),
            Decoded::Zero(n) => vec![0; n],
        }
    }

    /// `len` bytes in which the 512-byte granules listed in `zero` are zero and the rest hold
    /// `kind` content (0 noise, 1 text).
    fn sparse(len: usize, zero: &[bool], kind: u8, seed: u64) -> Vec<u8> {
        let mut v = if kind == 0 {
            noise(len, seed)
        } else {
            (0..len)
                .map(|i| b"register file "[i % 14] ^ (seed as u8))
                .collect()
        };
        for (g, chunk) in v.chunks_mut(GRANULE).enumerate() {
            if zero.get(g % zero.len().max(1)).copied().unwrap_or(false) {
                chunk.fill(0);
            }
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any mix of zero and data granules, any length (also short last granules), every
        /// choice: the decoder gives back exactly the input, and the chunk hash is the input's.
        #[test]
        fn paged_chunks_round_trip_exactly(
            len in 1usize..60_000,
            zero in proptest::collection::vec(any::<bool>(), 1..40),
            kind in 0u8..2,
            choice in 0usize..4,
            seed in any::<u64>(),
        ) {
            let pool = BufPool::new(4, 65536).unwrap();
            let data = sparse(len, &zero, kind, seed);
            let choice = [Choice::Raw, Choice::Lz4, Choice::Zstd(1), Choice::Zstd(3)][choice];
            let mut enc = Encoder::new(ALL).unwrap();
            let mut dec = Decoder::new().unwrap();
            let e = enc.encode(fill(&pool, &data), choice, &pool);
            prop_assert_eq!(e.hash, Some(crate::digest::chunk_hash(&data)));
            let back = decode_all(&mut dec, e, len, &pool);
            prop_assert_eq!(back, data);
            prop_assert_eq!(pool.free(), 4, "no buffer leaked");
        }

        /// Whatever a peer sends (any codec, any declared length, any bytes), decoding returns
        /// exactly `raw_len` bytes or a typed failure: no panic, no buffer leaked.
        #[test]
        fn arbitrary_payloads_decode_to_raw_len_bytes_or_a_typed_failure(
            codec in 0u8..7,
            raw_len in 0u32..70_000,
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            tail in any::<u8>(),
        ) {
            let pool = BufPool::new(4, 65536).unwrap();
            let mut dec = Decoder::new().unwrap();
            let codec = Codec::from_code(codec).unwrap();
            // Half the cases end in a plausible page map byte.
            let mut payload = payload;
            if tail % 2 == 0 {
                payload.push(tail);
            }
            let p = (!payload.is_empty()).then(|| fill(&pool, &payload));
            match dec.decode(codec, raw_len, p, &pool) {
                Ok(Decoded::Data(b)) => prop_assert_eq!(b.len(), raw_len as usize),
                Ok(Decoded::Zero(n)) => prop_assert_eq!(n, raw_len as usize),
                Err(_) => {}
            }
            prop_assert_eq!(pool.free(), 4, "no buffer leaked");
        }
    }

    #[test]
    fn zero_granules_are_left_out_of_the_wire_at_any_alignment() {
        let pool = BufPool::new(4, 1 << 20).unwrap();
        let n = chunk_len(1 << 20);
        // Random data with one zero region of 100 KiB starting at an odd offset.
        let mut data = noise(n, 9);
        data[12_345..12_345 + 100 * 1024].fill(0);
        let mut enc = Encoder::new(ALL).unwrap();
        let e = enc.encode(fill(&pool, &data), Choice::Raw, &pool);
        assert_eq!(e.codec, Codec::PagedRaw);
        let wire = e.payload.as_ref().unwrap().len();
        // All but the partial granules at both ends of the region are dropped.
        assert!(
            wire <= n - 100 * 1024 + 2 * GRANULE + n / GRANULE / 8,
            "{wire}"
        );
        let mut dec = Decoder::new().unwrap();
        assert_eq!(decode_all(&mut dec, e, n, &pool), data);
    }

    #[test]
    fn a_receiver_without_paged_or_compressed_codecs_gets_only_what_it_agreed_to() {
        let pool = BufPool::new(4, 65536).unwrap();
        let mut data = sparse(50_000, &[false, true], 1, 3);
        data[..512].fill(1);
        let only_raw = codec_bit(Codec::Raw) | codec_bit(Codec::Zero);
        let mut enc = Encoder::new(only_raw).unwrap();
        for choice in [Choice::Raw, Choice::Lz4, Choice::Zstd(3)] {
            let e = enc.encode(fill(&pool, &data), choice, &pool);
            assert_eq!(e.codec, Codec::Raw, "{choice:?}");
            assert_eq!(e.payload.unwrap().as_slice(), &data[..]);
        }
        let mut enc = Encoder::new(only_raw | codec_bit(Codec::Zstd)).unwrap();
        let e = enc.encode(fill(&pool, &data), Choice::Lz4, &pool);
        assert_eq!(e.codec, Codec::Raw, "LZ4 was not agreed");
        let e = enc.encode(fill(&pool, &data), Choice::Zstd(1), &pool);
        assert_eq!(e.codec, Codec::Zstd, "zstd without page maps");
        // PagedRaw agreed but not PagedLz4 / PagedZstd: compressed chunks are not packed.
        let some = only_raw | codec_bit(Codec::Lz4) | codec_bit(Codec::PagedRaw);
        let mut enc = Encoder::new(some).unwrap();
        let e = enc.encode(fill(&pool, &data), Choice::Lz4, &pool);
        assert_eq!(e.codec, Codec::Lz4);
        let e = enc.encode(fill(&pool, &data), Choice::Raw, &pool);
        assert_eq!(e.codec, Codec::PagedRaw);
    }

    #[test]
    fn a_chunk_is_packed_only_when_its_paged_body_is_smaller() {
        let pool = BufPool::new(4, 65536).unwrap();
        let mut enc = Encoder::new(ALL).unwrap();
        // 4097 bytes whose 1-byte last granule is zero: the body (4096 + 2-byte map) is larger.
        let mut data = noise(4097, 5);
        data[4096] = 0;
        let e = enc.encode(fill(&pool, &data), Choice::Raw, &pool);
        assert_eq!(e.codec, Codec::Raw);
        assert_eq!(e.payload.unwrap().len(), 4097);
        // One zero granule in the middle of 4 KiB: 3584 + 1 < 4096, packed.
        let mut data = noise(4096, 6);
        data[512..1024].fill(0);
        let e = enc.encode(fill(&pool, &data), Choice::Raw, &pool);
        assert_eq!(e.codec, Codec::PagedRaw);
        assert_eq!(e.payload.unwrap().len(), 3584 + 1);
    }

    #[test]
    fn corrupt_page_maps_and_bodies_are_typed_failures_not_panics() {
        let pool = BufPool::new(8, 65536).unwrap();
        let mut dec = Decoder::new().unwrap();
        let raw = 4096usize; // 8 granules: a 1-byte map.
                             // Map says granules 0 and 2 present (1024 bytes), body holds 1024: valid.
        let mut ok = vec![7u8; 1024];
        ok.push(0b0000_0101);
        let Decoded::Data(b) = dec
            .decode(Codec::PagedRaw, raw as u32, Some(fill(&pool, &ok)), &pool)
            .unwrap()
        else {
            panic!("expected data")
        };
        assert_eq!(&b.as_slice()[..512], &[7u8; 512][..]);
        assert_eq!(&b.as_slice()[512..1024], &[0u8; 512][..]);
        assert_eq!(&b.as_slice()[1024..1536], &[7u8; 512][..]);
        drop(b);
        // Body shorter or longer than the map says.
        for body in [512usize, 1536] {
            let mut bad = vec![7u8; body];
            bad.push(0b0000_0101);
            assert!(matches!(
                dec.decode(Codec::PagedRaw, raw as u32, Some(fill(&pool, &bad)), &pool,),
                Err(DecodeFailure::Length { .. })
            ));
        }
        // Bits past the last granule (raw 1000 bytes = 2 granules).
        let bad = vec![7u8, 7, 7, 0b0000_0101];
        assert_eq!(
            dec.decode(Codec::PagedRaw, 1000, Some(fill(&pool, &bad)), &pool)
                .unwrap_err(),
            DecodeFailure::Malformed
        );
        // A payload shorter than its map, and a zstd frame that is garbage.
        assert!(dec
            .decode(Codec::PagedRaw, 65536, Some(fill(&pool, &[1])), &pool)
            .is_err());
        assert_eq!(
            dec.decode(
                Codec::PagedZstd,
                raw as u32,
                Some(fill(&pool, &noise(64, 1))),
                &pool,
            )
            .unwrap_err(),
            DecodeFailure::Malformed
        );
        // A zero-length Zero frame is refused in decode.
        assert_eq!(
            dec.decode(Codec::Zero, 0, None, &pool).unwrap_err(),
            DecodeFailure::Payload
        );
        assert_eq!(pool.free(), 8, "every buffer came back");
    }

    fn fill(pool: &BufPool, data: &[u8]) -> PoolBuf {
        let mut b = pool.try_acquire().unwrap();
        b.spare_mut()[..data.len()].copy_from_slice(data);
        b.set_len(data.len());
        b
    }

    /// `n` pseudo-random bytes from `seed` (xorshift64), for tests across the crate.
    pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
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
    fn a_granule_is_zero_only_when_every_byte_is() {
        for len in [1usize, 7, 8, 9, 63, 64, 65, 100, 511, 512] {
            assert!(block_is_zero(&vec![0u8; len]), "len {len}");
            for at in 0..len {
                let mut v = vec![0u8; len];
                v[at] = 0x80;
                assert!(!block_is_zero(&v), "len {len}, byte {at}");
            }
        }
    }

    #[test]
    fn the_fused_scan_and_hash_equal_the_separate_ones() {
        for (len, seed) in [
            (1, 1),
            (511, 2),
            (16 << 10, 3),
            ((16 << 10) + 513, 4),
            (917_504, 5),
        ] {
            let zero: Vec<bool> = (0..37u64).map(|i| (i * seed) % 3 == 0).collect();
            let data = sparse(len, &zero, 0, seed);
            let (m, h) = PageMap::scan_hashed(&data);
            let s = PageMap::scan(&data);
            assert_eq!(h, crate::digest::chunk_hash(&data), "len {len}");
            assert_eq!(
                (m.granules, m.present),
                (s.granules, s.present),
                "len {len}"
            );
            assert_eq!(m.bits[..], s.bits[..], "len {len}");
        }
    }

    /// A chunk of a stream settled as raw gets a sampled zero check: it stays exact (zero
    /// granules the samples miss go out as data), and a chunk the samples find zeros in is
    /// scanned and elided as without sampling.
    #[test]
    fn sampling_a_settled_raw_stream_loses_only_compression_never_bytes() {
        let pool = BufPool::new(4, 65536).unwrap();
        let n = chunk_len(65536);
        let mut enc = Encoder::new(ALL).unwrap();
        let mut dec = Decoder::new().unwrap();
        let sampled = |enc: &mut Encoder, data: &[u8]| {
            enc.encode_hashed(fill(&pool, data), Choice::Raw, &pool, true, true)
        };
        // Which chunks are sampled: settled streams, but not the full-scan turns.
        assert!(!sampled_turn(SETTLE_CHUNKS - 1, 1));
        assert!(sampled_turn(SETTLE_CHUNKS, 1));
        assert!(!sampled_turn(SETTLE_CHUNKS, u64::from(FULL_SCAN_EVERY) * 3));
        // Zero granules between the samples: not elided, but every byte arrives.
        let step = n.div_ceil(GRANULE) / SAMPLED_GRANULES;
        let mut data = noise(n, 99);
        data[GRANULE..GRANULE * step].fill(0);
        let e = sampled(&mut enc, &data);
        assert_eq!((e.codec, e.outcome), (Codec::Raw, Outcome::Raw));
        assert_eq!(e.hash, Some(crate::digest::chunk_hash(&data)));
        assert_eq!(decode_all(&mut dec, e, n, &pool), data);
        // The same chunk fully scanned: its zero granules are elided.
        let e = enc.encode(fill(&pool, &data), Choice::Raw, &pool);
        assert_eq!(e.codec, Codec::PagedRaw);
        assert_eq!(decode_all(&mut dec, e, n, &pool), data);
        // A zero chunk: the samples see zeros, the full scan makes it a Zero frame.
        let e = sampled(&mut enc, &vec![0u8; n]);
        assert_eq!((e.codec, e.outcome), (Codec::Zero, Outcome::Zero));
        assert_eq!(e.hash, Some(crate::digest::zero_hash(n)));
        // A zero granule a sample lands on (the last one) is found and elided.
        let mut data = noise(n, 5);
        data[n - GRANULE..].fill(0);
        let e = sampled(&mut enc, &data);
        assert_eq!(e.codec, Codec::PagedRaw);
        assert_eq!(decode_all(&mut dec, e, n, &pool), data);
        assert_eq!(pool.free(), 4, "no buffer leaked");
    }

    #[test]
    fn zero_chunks_are_elided_and_decode_to_zeros() {
        let pool = BufPool::new(4, 65536).unwrap();
        let mut enc = Encoder::new(ALL).unwrap();
        let Encoded {
            codec,
            payload,
            outcome: out,
            ..
        } = enc.encode(fill(&pool, &[0u8; 65536]), Choice::Zstd(3), &pool);
        assert_eq!((codec, out), (Codec::Zero, Outcome::Zero));
        assert!(payload.is_none());
        assert_eq!(pool.free(), 4, "the input buffer went back to the pool");
        let mut dec = Decoder::new().unwrap();
        let d = dec.decode(Codec::Zero, 65536, None, &pool).unwrap();
        assert!(matches!(d, Decoded::Zero(65536)));
    }

    #[test]
    fn random_chunks_go_raw_in_the_same_buffer_without_a_compression_attempt() {
        let pool = BufPool::new(4, 65536).unwrap();
        let data = noise(65536, 7);
        let input = fill(&pool, &data);
        let index = input.index();
        let mut enc = Encoder::new(ALL).unwrap();
        let Encoded {
            codec,
            payload,
            outcome: out,
            ..
        } = enc.encode(input, Choice::Zstd(3), &pool);
        assert_eq!((codec, out), (Codec::Raw, Outcome::ProbedRaw));
        let payload = payload.unwrap();
        assert_eq!(payload.index(), index, "no copy: the same slot is sent");
        assert_eq!(payload.as_slice(), &data[..]);
    }

    #[test]
    fn compressed_chunks_decode_in_place_when_the_pool_has_no_free_slot() {
        // Decoding must never wait for a second slot: the writer may be parking, in every other
        // slot, the frames that follow this one.
        let pool = BufPool::new(2, 65536).unwrap();
        let n = chunk_len(65536);
        let text: Vec<u8> = (0..n as u32)
            .map(|i| b"device register file "[(i % 21) as usize] ^ ((i / 4096) as u8))
            .collect();
        let mut enc = Encoder::new(ALL).unwrap();
        let mut dec = Decoder::new().unwrap();
        for choice in [Choice::Lz4, Choice::Zstd(3)] {
            let e = enc.encode(fill(&pool, &text), choice, &pool);
            assert_eq!(e.outcome, Outcome::Compressed(choice));
            let held = pool.try_acquire().unwrap();
            assert!(pool.try_acquire().is_none(), "the pool is exhausted");
            let Decoded::Data(b) = dec.decode(e.codec, n as u32, e.payload, &pool).unwrap() else {
                panic!("expected data")
            };
            assert_eq!(b.as_slice(), &text[..]);
            drop((b, held));
        }
    }

    #[test]
    fn structured_chunks_round_trip_through_zstd_and_lz4() {
        let pool = BufPool::new(4, 65536).unwrap();
        let n = chunk_len(65536);
        let text: Vec<u8> = (0..n as u32)
            .map(|i| b"device register file "[(i % 21) as usize] ^ ((i / 4096) as u8))
            .collect();
        let mut enc = Encoder::new(ALL).unwrap();
        let mut dec = Decoder::new().unwrap();
        for choice in [Choice::Lz4, Choice::Zstd(1), Choice::Zstd(7)] {
            let Encoded {
                codec,
                payload,
                outcome: out,
                ..
            } = enc.encode(fill(&pool, &text), choice, &pool);
            assert_eq!(out, Outcome::Compressed(choice));
            let payload = payload.unwrap();
            assert!(payload.len() < text.len() / 4);
            let d = dec.decode(codec, n as u32, Some(payload), &pool).unwrap();
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
        let garbage = fill(&pool, &noise(100, 3));
        assert_eq!(
            dec.decode(Codec::Zstd, 4096, Some(garbage), &pool)
                .unwrap_err(),
            DecodeFailure::Malformed
        );
        let short = fill(&pool, &[1, 2, 3]);
        assert_eq!(
            dec.decode(Codec::Raw, 4, Some(short), &pool).unwrap_err(),
            DecodeFailure::Payload
        );
        assert!(matches!(
            dec.decode(Codec::Zero, 8192, None, &pool),
            Err(DecodeFailure::TooLarge { .. })
        ));
        let mut enc = Encoder::new(ALL).unwrap();
        let p = enc
            .encode(fill(&pool, &[5u8; 4096]), Choice::Lz4, &pool)
            .payload;
        assert!(matches!(
            dec.decode(Codec::Lz4, 2048, p, &pool),
            Err(DecodeFailure::Malformed | DecodeFailure::Length { .. })
        ));
    }
}
