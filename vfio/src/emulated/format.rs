//! The emulated device's own migration stream format, with its own integrity data (as real device
//! formats have): a sequence of records, each a 48-byte header followed by a payload.
//!
//! ```text
//! header (little endian)
//!   0  magic        u32  "VEMU"
//!   4  kind         u16  1 = HELLO, 2 = BLOCK, 3 = END
//!   6  version      u16  FORMAT_VERSION
//!   8  seq          u64  record number, from 0, no gaps
//!  16  index        u64  BLOCK: block index; HELLO/END: 0
//!  24  len          u32  payload length
//!  28  reserved     u32  0
//!  32  payload_hash u64  xxh3-64 of the payload
//!  40  header_hash  u64  xxh3-64 of bytes 0..40
//! HELLO payload: state size u64, block size u64, block count u64
//! BLOCK payload: the block's bytes (block size; the last block may be shorter)
//! END payload:   records before END u64, BLOCK payload bytes u64, block count u64,
//!                state digest [u8; 32]
//! ```
//!
//! The state digest is BLAKE3 over `state size, block size` and every block's xxh3-64 in block
//! order: the source computes it from the bytes it generated, the destination from the bytes it
//! received, and a successful RESUMING -> STOP means they agree.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Header size in bytes.
pub const HEADER_LEN: usize = 48;
/// `"VEMU"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VEMU");
/// Format version in every header.
pub const FORMAT_VERSION: u16 = 1;
/// HELLO payload length.
pub const HELLO_LEN: usize = 24;
/// END payload length.
pub const END_LEN: usize = 56;

vfmig_enum::int_enum! {
    /// A record kind.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum RecordKind: u16 {
        /// Stream start: geometry.
        Hello = 1,
        /// One block of state.
        Block = 2,
        /// Stream end: totals and the state digest.
        End = 3,
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Record kind.
    pub kind: RecordKind,
    /// Record sequence number.
    pub seq: u64,
    /// Block index (BLOCK), else 0.
    pub index: u64,
    /// Payload length.
    pub len: u32,
    /// xxh3-64 of the payload.
    pub payload_hash: u64,
}

/// Encodes a header.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&(h.kind as u16).to_le_bytes());
    b[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&h.seq.to_le_bytes());
    b[16..24].copy_from_slice(&h.index.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[32..40].copy_from_slice(&h.payload_hash.to_le_bytes());
    let hh = xxh3_64(&b[..40]);
    b[40..48].copy_from_slice(&hh.to_le_bytes());
    b
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Why a stream was refused by the destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A header's magic, version, kind or header hash is wrong.
    #[error("record at stream byte {offset}: bad header ({what})")]
    BadHeader {
        /// Stream offset of the header.
        offset: u64,
        /// Which check failed.
        what: &'static str,
    },
    /// A record's sequence number is not the next one (reordered, duplicated or lost record).
    #[error("record at stream byte {offset}: sequence {got}, expected {expected}")]
    Sequence {
        /// Stream offset of the header.
        offset: u64,
        /// Expected sequence number.
        expected: u64,
        /// Sequence number found.
        got: u64,
    },
    /// A payload does not match its hash.
    #[error("record {seq}: payload hash mismatch")]
    PayloadHash {
        /// Record sequence number.
        seq: u64,
    },
    /// The stream does not start with HELLO, or has a second HELLO.
    #[error("record {seq}: HELLO misplaced")]
    HelloMisplaced {
        /// Record sequence number.
        seq: u64,
    },
    /// The HELLO geometry differs from this device's.
    #[error("stream geometry (size {size}, block {block_size}) differs from the device's (size {want_size}, block {want_block_size})")]
    Geometry {
        /// Size in the stream.
        size: u64,
        /// Block size in the stream.
        block_size: u64,
        /// The device's size.
        want_size: u64,
        /// The device's block size.
        want_block_size: u64,
    },
    /// A BLOCK record's index or length does not fit the geometry.
    #[error("record {seq}: block {index} with length {len} does not fit the device")]
    BadBlock {
        /// Record sequence number.
        seq: u64,
        /// Block index.
        index: u64,
        /// Payload length.
        len: u32,
    },
    /// A payload length is wrong for its kind.
    #[error("record {seq}: payload length {len} is wrong for its kind")]
    BadLength {
        /// Record sequence number.
        seq: u64,
        /// Length found.
        len: u32,
    },
    /// The stream ended before the END record (truncated).
    #[error("stream truncated after {bytes} bytes ({records} records, END missing)")]
    Truncated {
        /// Bytes received.
        bytes: u64,
        /// Complete records received.
        records: u64,
    },
    /// The END record's totals differ from what was received.
    #[error("END totals ({records} records, {payload_bytes} bytes) differ from those received ({got_records}, {got_payload_bytes})")]
    Totals {
        /// Records claimed.
        records: u64,
        /// Payload bytes claimed.
        payload_bytes: u64,
        /// Records received.
        got_records: u64,
        /// Payload bytes received.
        got_payload_bytes: u64,
    },
    /// Some blocks never arrived.
    #[error("{missing} of {blocks} blocks never arrived")]
    MissingBlocks {
        /// Blocks never received.
        missing: u64,
        /// Blocks in the device.
        blocks: u64,
    },
    /// The rebuilt state's digest differs from the END record's.
    #[error("state digest mismatch")]
    Digest,
    /// Bytes arrived after the END record or past the resume capacity. A FUSE data fd refuses
    /// such writes (ENOMEM); a memory-speed (pipe) data fd cannot fail a write that the kernel
    /// already took, so its device counts them and refuses the stream at RESUMING -> STOP.
    #[error(
        "{bytes} bytes arrived after the END record or past the resume capacity ({capacity} bytes)"
    )]
    Overflow {
        /// Bytes not taken.
        bytes: u64,
        /// The resume capacity.
        capacity: u64,
    },
}

/// State digest over the per-block hashes (see the module docs).
pub fn state_digest(
    size: u64,
    block_size: u64,
    block_hashes: impl Iterator<Item = u64>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"vfmig-emu-state-v1");
    h.update(&size.to_le_bytes());
    h.update(&block_size.to_le_bytes());
    for bh in block_hashes {
        h.update(&bh.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The HELLO payload.
pub fn hello_payload(size: u64, block_size: u64, blocks: u64) -> [u8; HELLO_LEN] {
    let mut p = [0u8; HELLO_LEN];
    p[0..8].copy_from_slice(&size.to_le_bytes());
    p[8..16].copy_from_slice(&block_size.to_le_bytes());
    p[16..24].copy_from_slice(&blocks.to_le_bytes());
    p
}

/// The END payload.
pub fn end_payload(
    records: u64,
    payload_bytes: u64,
    blocks: u64,
    digest: &[u8; 32],
) -> [u8; END_LEN] {
    let mut p = [0u8; END_LEN];
    p[0..8].copy_from_slice(&records.to_le_bytes());
    p[8..16].copy_from_slice(&payload_bytes.to_le_bytes());
    p[16..24].copy_from_slice(&blocks.to_le_bytes());
    p[24..56].copy_from_slice(digest);
    p
}

/// Incremental parser of a stream written to the destination's data fd. Writes may split the
/// stream anywhere. Memory: one header, one small payload buffer and 8 bytes + 1 bit per block.
pub struct Parser {
    size: u64,
    block_size: u64,
    blocks: u64,
    /// xxh3-64 of each block as last received.
    block_hashes: Vec<u64>,
    received: Vec<u64>,
    received_count: u64,
    /// Bytes consumed so far.
    offset: u64,
    /// Partial header.
    hdr: [u8; HEADER_LEN],
    hdr_fill: usize,
    /// The record whose payload is being received.
    cur: Option<Header>,
    cur_left: u32,
    cur_hasher: Xxh3,
    /// Small payloads (HELLO, END) are kept.
    small: Vec<u8>,
    next_seq: u64,
    payload_bytes: u64,
    hello_seen: bool,
    end: Option<[u8; END_LEN]>,
    end_offset: u64,
    error: Option<StreamError>,
}

impl std::fmt::Debug for Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser")
            .field("blocks", &self.blocks)
            .field("offset", &self.offset)
            .field("next_seq", &self.next_seq)
            .field("received", &self.received_count)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Parser {
    /// A parser for a device of `size` bytes in blocks of `block_size`.
    pub fn new(size: u64, block_size: u64) -> Parser {
        let blocks = size.div_ceil(block_size);
        let n = usize::try_from(blocks).unwrap_or(usize::MAX);
        Parser {
            size,
            block_size,
            blocks,
            block_hashes: vec![0; n],
            received: vec![0; n.div_ceil(64)],
            received_count: 0,
            offset: 0,
            hdr: [0; HEADER_LEN],
            hdr_fill: 0,
            cur: None,
            cur_left: 0,
            cur_hasher: Xxh3::new(),
            small: Vec::with_capacity(END_LEN),
            next_seq: 0,
            payload_bytes: 0,
            hello_seen: false,
            end: None,
            end_offset: 0,
            error: None,
        }
    }

    /// The first error found, if any. After an error the rest of the stream is ignored.
    pub fn error(&self) -> Option<&StreamError> {
        self.error.as_ref()
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Feeds bytes; returns how many were consumed: all of them, except those after the END
    /// record (a complete stream takes no more). Errors are remembered (see [`Parser::finish`]);
    /// after an error bytes are consumed and ignored.
    pub fn feed(&mut self, mut data: &[u8]) -> usize {
        let total = data.len();
        while !data.is_empty() {
            if self.error.is_some() {
                self.offset += data.len() as u64;
                return total;
            }
            if self.end.is_some() {
                return total - data.len();
            }
            if let Some(h) = self.cur {
                let take = data.len().min(self.cur_left as usize);
                let (now, rest) = data.split_at(take);
                self.cur_hasher.update(now);
                if h.kind != RecordKind::Block {
                    self.small.extend_from_slice(now);
                }
                // `take` <= cur_left, a u32.
                #[allow(clippy::cast_possible_truncation)]
                let take32 = take as u32;
                self.cur_left -= take32;
                self.offset += take as u64;
                data = rest;
                if self.cur_left == 0 {
                    self.finish_record(h);
                }
                continue;
            }
            let take = data.len().min(HEADER_LEN - self.hdr_fill);
            self.hdr[self.hdr_fill..self.hdr_fill + take].copy_from_slice(&data[..take]);
            self.hdr_fill += take;
            self.offset += take as u64;
            data = &data[take..];
            if self.hdr_fill == HEADER_LEN {
                self.hdr_fill = 0;
                self.start_record(self.offset - HEADER_LEN as u64);
            }
        }
        total
    }

    fn fail(&mut self, e: StreamError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn start_record(&mut self, offset: u64) {
        let b = self.hdr;
        if le_u32(&b, 0) != MAGIC {
            return self.fail(StreamError::BadHeader {
                offset,
                what: "magic",
            });
        }
        if xxh3_64(&b[..40]) != le_u64(&b, 40) {
            return self.fail(StreamError::BadHeader {
                offset,
                what: "header hash",
            });
        }
        if le_u16(&b, 6) != FORMAT_VERSION {
            return self.fail(StreamError::BadHeader {
                offset,
                what: "version",
            });
        }
        let Some(kind) = RecordKind::from_code(le_u16(&b, 4)) else {
            return self.fail(StreamError::BadHeader {
                offset,
                what: "kind",
            });
        };
        let h = Header {
            kind,
            seq: le_u64(&b, 8),
            index: le_u64(&b, 16),
            len: le_u32(&b, 24),
            payload_hash: le_u64(&b, 32),
        };
        if h.seq != self.next_seq {
            return self.fail(StreamError::Sequence {
                offset,
                expected: self.next_seq,
                got: h.seq,
            });
        }
        match kind {
            RecordKind::Hello if h.seq != 0 || self.hello_seen => {
                return self.fail(StreamError::HelloMisplaced { seq: h.seq })
            }
            RecordKind::Hello if h.len as usize != HELLO_LEN => {
                return self.fail(StreamError::BadLength {
                    seq: h.seq,
                    len: h.len,
                })
            }
            RecordKind::End if h.len as usize != END_LEN => {
                return self.fail(StreamError::BadLength {
                    seq: h.seq,
                    len: h.len,
                })
            }
            RecordKind::Block | RecordKind::End if !self.hello_seen => {
                return self.fail(StreamError::HelloMisplaced { seq: h.seq })
            }
            RecordKind::Block => {
                let want = self.block_len(h.index);
                if want != Some(u64::from(h.len)) {
                    return self.fail(StreamError::BadBlock {
                        seq: h.seq,
                        index: h.index,
                        len: h.len,
                    });
                }
            }
            _ => {}
        }
        if kind == RecordKind::End {
            self.end_offset = offset;
        }
        self.cur = Some(h);
        self.cur_left = h.len;
        self.cur_hasher.reset();
        self.small.clear();
        if h.len == 0 {
            self.finish_record(h);
        }
    }

    fn block_len(&self, index: u64) -> Option<u64> {
        if index >= self.blocks {
            return None;
        }
        let start = index * self.block_size;
        Some(self.block_size.min(self.size - start))
    }

    fn finish_record(&mut self, h: Header) {
        self.cur = None;
        let hash = self.cur_hasher.digest();
        if hash != h.payload_hash {
            return self.fail(StreamError::PayloadHash { seq: h.seq });
        }
        self.next_seq += 1;
        match h.kind {
            RecordKind::Hello => {
                let (size, block_size) = (le_u64(&self.small, 0), le_u64(&self.small, 8));
                if size != self.size || block_size != self.block_size {
                    return self.fail(StreamError::Geometry {
                        size,
                        block_size,
                        want_size: self.size,
                        want_block_size: self.block_size,
                    });
                }
                self.hello_seen = true;
            }
            RecordKind::Block => {
                // Checked against `blocks` (which fits in usize) in start_record.
                let i = usize::try_from(h.index).unwrap_or(usize::MAX);
                if let Some(slot) = self.block_hashes.get_mut(i) {
                    *slot = hash;
                }
                let (w, bit) = (i / 64, 1u64 << (i % 64));
                if let Some(word) = self.received.get_mut(w) {
                    if *word & bit == 0 {
                        *word |= bit;
                        self.received_count += 1;
                    }
                }
                self.payload_bytes += u64::from(h.len);
            }
            RecordKind::End => {
                let mut e = [0u8; END_LEN];
                e.copy_from_slice(&self.small[..END_LEN]);
                self.end = Some(e);
            }
        }
    }

    /// The digest of the state rebuilt so far, when every block has arrived.
    pub fn state_digest(&self) -> Option<[u8; 32]> {
        (self.received_count == self.blocks).then(|| {
            state_digest(
                self.size,
                self.block_size,
                self.block_hashes.iter().copied(),
            )
        })
    }

    /// RESUMING -> STOP validation: the stream is complete, consistent and its digest matches.
    /// Returns the state digest.
    pub fn finish(&self) -> Result<[u8; 32], StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let Some(end) = self.end else {
            return Err(StreamError::Truncated {
                bytes: self.offset,
                records: self.next_seq,
            });
        };
        let (records, payload_bytes, blocks) = (le_u64(&end, 0), le_u64(&end, 8), le_u64(&end, 16));
        // END itself is record number `next_seq - 1`.
        let got_records = self.next_seq - 1;
        if records != got_records || payload_bytes != self.payload_bytes || blocks != self.blocks {
            return Err(StreamError::Totals {
                records,
                payload_bytes,
                got_records,
                got_payload_bytes: self.payload_bytes,
            });
        }
        if self.received_count != self.blocks {
            return Err(StreamError::MissingBlocks {
                missing: self.blocks - self.received_count,
                blocks: self.blocks,
            });
        }
        let digest = state_digest(
            self.size,
            self.block_size,
            self.block_hashes.iter().copied(),
        );
        if digest[..] != end[24..56] {
            return Err(StreamError::Digest);
        }
        Ok(digest)
    }
}
