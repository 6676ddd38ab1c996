//! The end-to-end stream digest carried by `EndOfDevice` (docs/PROTOCOL.md, section 5).
//!
//! Each data frame's raw bytes are hashed with XXH3-128 where they already sit in cache and
//! in parallel (source: the codec worker, before encoding; destination: the decode worker, after
//! decoding), and the in-order stages fold one 32-byte record per frame into BLAKE3:
//! `offset u64 LE || raw_len u64 LE || xxh3_128 u128 LE`. So the serial stages hash 32 bytes per
//! chunk instead of every byte, and the digest still covers every byte, its position and the
//! order of the chunks.

use std::sync::OnceLock;

use twox_hash::XxHash3_128;

/// XXH3-128 of one chunk's raw bytes (twox-hash: AVX2 where the CPU has it, picked at run
/// time; about twice the SSE2 speed, the same values).
pub(crate) fn chunk_hash(raw: &[u8]) -> u128 {
    XxHash3_128::oneshot(raw)
}

/// [`chunk_hash`] fed in pieces (equal to it over the concatenation).
pub(crate) struct ChunkHasher(XxHash3_128);

impl ChunkHasher {
    pub fn new() -> ChunkHasher {
        ChunkHasher(XxHash3_128::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn digest128(&self) -> u128 {
        self.0.finish_128()
    }
}

/// XXH3-128 of `len` zero bytes (equal to `chunk_hash(&vec![0; len])`), without the buffer.
pub(crate) fn zero_hash(len: usize) -> u128 {
    static PAGE: [u8; 4096] = [0; 4096];
    // Chunks of one size dominate: remember the last length asked for.
    static LAST: OnceLock<std::sync::Mutex<(usize, u128)>> = OnceLock::new();
    let last = LAST.get_or_init(|| std::sync::Mutex::new((usize::MAX, 0)));
    if let Ok(l) = last.lock() {
        if l.0 == len {
            return l.1;
        }
    }
    let mut h = ChunkHasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(PAGE.len());
        h.update(&PAGE[..n]);
        left -= n;
    }
    let v = h.digest128();
    if let Ok(mut l) = last.lock() {
        *l = (len, v);
    }
    v
}

/// Folds per-chunk hashes, in stream order, into the device's stream digest: BLAKE3 keyed with
/// the session's digest key when the session has one (PSK), plain BLAKE3 otherwise.
#[derive(Debug, Default)]
pub(crate) struct StreamDigest {
    hasher: blake3::Hasher,
    /// Raw bytes folded in so far (the next chunk's offset).
    total: u64,
}

impl StreamDigest {
    #[cfg(test)]
    pub fn new() -> StreamDigest {
        StreamDigest::default()
    }

    /// A digest keyed with `key` (BLAKE3 keyed mode), or unkeyed for `None`.
    pub fn with_key(key: Option<&[u8; 32]>) -> StreamDigest {
        StreamDigest {
            hasher: key.map_or_else(blake3::Hasher::new, blake3::Hasher::new_keyed),
            total: 0,
        }
    }

    /// Adds the next chunk: `len` raw bytes at stream offset `offset` hashing to `hash`.
    pub fn add(&mut self, offset: u64, len: usize, hash: u128) {
        let mut rec = [0u8; 32];
        rec[..8].copy_from_slice(&offset.to_le_bytes());
        rec[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        rec[16..].copy_from_slice(&hash.to_le_bytes());
        self.hasher.update(&rec);
        self.total += len as u64;
    }

    /// Raw bytes folded in so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The digest of everything added so far.
    pub fn finish(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The chunk hash is the reference XXH3-128 (xxhash-rust, what protocol v4 peers
        /// compute) for any bytes and length, whole or fed in any pieces, whichever SIMD path
        /// this CPU takes: the hash trailer on the wire does not depend on the implementation.
        #[test]
        fn chunk_hashes_are_the_reference_xxh3_128(
            len in 0usize..300_000,
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            seed in any::<u64>(),
        ) {
            let data = crate::codec::tests::noise(len, seed);
            let reference = xxhash_rust::xxh3::xxh3_128(&data);
            prop_assert_eq!(chunk_hash(&data), reference);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            cuts.sort_unstable();
            let mut h = ChunkHasher::new();
            let mut at = 0;
            for c in cuts.into_iter().chain(std::iter::once(len)) {
                h.update(&data[at..c]);
                at = c;
            }
            prop_assert_eq!(h.digest128(), reference);
        }
    }

    #[test]
    fn zero_hash_equals_the_hash_of_zero_bytes_for_odd_and_repeated_lengths() {
        for len in [1usize, 4095, 4096, 4097, 917_504, 917_504, 1 << 20, 3] {
            assert_eq!(zero_hash(len), chunk_hash(&vec![0u8; len]), "len {len}");
        }
    }

    #[test]
    fn the_digest_depends_on_content_order_and_offsets() {
        let a = chunk_hash(b"first chunk");
        let b = chunk_hash(b"second chunk");
        let fold = |parts: &[(u64, usize, u128)]| {
            let mut d = StreamDigest::new();
            for &(o, l, h) in parts {
                d.add(o, l, h);
            }
            d.finish()
        };
        let base = fold(&[(0, 11, a), (11, 12, b)]);
        assert_ne!(base, fold(&[(0, 12, b), (12, 11, a)]), "order");
        assert_ne!(base, fold(&[(0, 11, a), (12, 12, b)]), "offset");
        assert_ne!(base, fold(&[(0, 11, a)]), "a missing chunk");
        assert_ne!(
            base,
            fold(&[(0, 11, chunk_hash(b"first chunK")), (11, 12, b)]),
            "content"
        );
        assert_eq!(base, fold(&[(0, 11, a), (11, 12, b)]));
    }

    #[test]
    fn a_keyed_digest_differs_from_the_unkeyed_one_and_between_keys() {
        let fold = |key: Option<&[u8; 32]>| {
            let mut d = StreamDigest::with_key(key);
            d.add(0, 5, chunk_hash(b"state"));
            d.finish()
        };
        let plain = fold(None);
        assert_eq!(plain, {
            let mut d = StreamDigest::new();
            d.add(0, 5, chunk_hash(b"state"));
            d.finish()
        });
        assert_ne!(plain, fold(Some(&[1; 32])));
        assert_ne!(fold(Some(&[1; 32])), fold(Some(&[2; 32])));
        assert_eq!(fold(Some(&[1; 32])), fold(Some(&[1; 32])));
    }
}
