//! Frame header: fixed 40 bytes, little-endian, CRC32C over header and payload.
//!
//! ```text
//! offset size field
//!  0     4    magic    b"VMF1"
//!  4     1    kind     FrameKind
//!  5     1    codec    Codec
//!  6     2    device   device index in the session (0-based)
//!  8     8    seq      per-device, per-stream sequence number (0-based, no gaps)
//! 16     4    raw_len  payload length after decoding (bytes of device state / pages)
//! 20     4    wire_len payload length on the wire (bytes following the header)
//! 24     8    arg      kind-specific (see FrameKind)
//! 32     4    flags    reserved, must be 0 in version 3
//! 36     4    crc      CRC32C over bytes 0..36 followed by the wire_len payload bytes;
//!                      0 on a connection with sealed frames (the AEAD tag covers them, `seal`)
//! ```

use crate::WireError;

/// Guest page size for [`FrameKind::DirtyPages`] (4 KiB in version 2).
pub const PAGE_SIZE: u64 = 4096;
/// Length of the stream digest in an [`FrameKind::EndOfDevice`] payload (docs/PROTOCOL.md,
/// section 5: BLAKE3 over one record per data frame, each carrying the XXH3-128 of its raw bytes).
pub const DIGEST_LEN: usize = 32;
/// Most bytes of UTF-8 detail in an [`FrameKind::Abort`] payload.
pub const MAX_ABORT_DETAIL: usize = 1024;

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"VMF1";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 40;
/// Hard limit on `raw_len` and `wire_len`: a peer declaring more is refused before anything is
/// allocated.
pub const MAX_PAYLOAD: u32 = 4 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Device state read in PRE_COPY. `arg`: stream offset of the first raw byte. `raw_len > 0`.
    PreCopyData = 1,
    /// Device state read in STOP_COPY. `arg`: stream offset of the first raw byte. `raw_len > 0`.
    StopCopyData = 2,
    /// Guest pages the device dirtied. `arg`: guest physical address of the first page
    /// ([`PAGE_SIZE`]-aligned); the raw payload is whole pages (`raw_len` a non-zero multiple of
    /// [`PAGE_SIZE`]), any codec.
    DirtyPages = 3,
    /// End of a device's stream. `arg`: total raw bytes; payload: the 32-byte stream digest
    /// ([`DIGEST_LEN`], codec Raw). Takes the next sequence number of the device's stream.
    EndOfDevice = 4,
    /// Destination -> source: the destination has loaded the initial pre-copy data
    /// (switchover may proceed). `arg`: raw bytes received so far. No payload, `seq` 0.
    SwitchoverAck = 5,
    /// Destination -> source: the destination device is *prepared*: length and digest verified,
    /// RESUMING -> STOP succeeded (the device validated its state); it stays in STOP until the
    /// source's [`FrameKind::Commit`]. `arg`: total raw bytes written to the device. No payload,
    /// `seq` 0.
    DevicePrepared = 6,
    /// Either way: abort the session. `arg`: reason code (`AbortReason`); payload: UTF-8 detail,
    /// at most [`MAX_ABORT_DETAIL`] bytes, codec Raw. `device` and `seq` 0.
    Abort = 7,
    /// Either way: liveness. `arg`: sender's monotonic milliseconds. No payload, `device` and
    /// `seq` 0.
    Keepalive = 8,
    /// Source -> destination: pre-copy of this device ends; STOP_COPY data follows. `arg`: raw
    /// pre-copy bytes sent. No payload; takes the next sequence number of the device's stream.
    PreCopyDone = 9,
    /// Source -> destination: the decision *commit*, sent once every device was prepared and
    /// every source device stopped for good. `arg` 0; no payload, `device` and `seq` 0.
    Commit = 10,
    /// Destination -> source: what the destination did after [`FrameKind::Commit`]. `arg`: the
    /// outcome code (`FinalOutcome`, 16 bits); no payload, `device` and `seq` 0.
    Outcome = 11,
    /// Source -> destination: every byte of this device's *initial* pre-copy data (the uAPI's
    /// `initial_bytes`) precedes this marker. `arg`: raw bytes of the stream before it. No
    /// payload; takes the next sequence number of the device's stream. The destination answers
    /// [`FrameKind::SwitchoverAck`] once everything before it is loaded.
    InitialDataSent = 12,
}

impl FrameKind {
    /// Parses the kind byte.
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::PreCopyData,
            2 => FrameKind::StopCopyData,
            3 => FrameKind::DirtyPages,
            4 => FrameKind::EndOfDevice,
            5 => FrameKind::SwitchoverAck,
            6 => FrameKind::DevicePrepared,
            7 => FrameKind::Abort,
            8 => FrameKind::Keepalive,
            9 => FrameKind::PreCopyDone,
            10 => FrameKind::Commit,
            11 => FrameKind::Outcome,
            12 => FrameKind::InitialDataSent,
            _ => return None,
        })
    }

    /// Kinds that carry a device's data stream and take a per-device sequence number.
    pub fn is_sequenced(self) -> bool {
        matches!(
            self,
            FrameKind::PreCopyData
                | FrameKind::StopCopyData
                | FrameKind::DirtyPages
                | FrameKind::EndOfDevice
                | FrameKind::PreCopyDone
                | FrameKind::InitialDataSent
        )
    }
}

/// How the payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Payload is the raw bytes (`wire_len == raw_len`).
    Raw = 0,
    /// All `raw_len` bytes are zero; no payload (`wire_len == 0`).
    Zero = 1,
    /// One zstd frame.
    Zstd = 2,
    /// One LZ4 block (lz4_flex block format, size known from `raw_len`).
    Lz4 = 3,
    /// A paged body (see [`page_map_len`]), sent as is.
    PagedRaw = 4,
    /// A paged body in one zstd frame.
    PagedZstd = 5,
    /// A paged body in one LZ4 block.
    PagedLz4 = 6,
}

impl Codec {
    /// Parses the codec byte.
    pub fn from_u8(v: u8) -> Option<Codec> {
        Some(match v {
            0 => Codec::Raw,
            1 => Codec::Zero,
            2 => Codec::Zstd,
            3 => Codec::Lz4,
            4 => Codec::PagedRaw,
            5 => Codec::PagedZstd,
            6 => Codec::PagedLz4,
            _ => return None,
        })
    }

    /// Whether the payload decodes to a paged body (zero pages left out, a page map at the end)
    /// rather than to the raw bytes themselves.
    pub fn is_paged(self) -> bool {
        matches!(self, Codec::PagedRaw | Codec::PagedZstd | Codec::PagedLz4)
    }
}

/// Bytes of raw data per bit of a page map.
pub const MAP_GRANULE: u32 = 512;

/// Bytes of the page map at the end of a paged body for `raw_len` raw bytes: one bit per
/// [`MAP_GRANULE`] bytes (the last granule may be short), least significant bit first.
///
/// A paged body is the present granules of the raw bytes, in order, followed by this map; bit
/// `i` (`map[i / 8] >> (i % 8) & 1`) set means granule `i` is in the body, clear means it is all
/// zero. Bits past the last granule are 0. A codec `Paged*` frame's payload decodes (for
/// `PagedRaw`: is) such a body; expanding it gives exactly `raw_len` bytes.
pub fn page_map_len(raw_len: u32) -> u32 {
    raw_len.div_ceil(MAP_GRANULE).div_ceil(8)
}

/// A decoded, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Payload encoding.
    pub codec: Codec,
    /// Device index in the session.
    pub device: u16,
    /// Per-device sequence number.
    pub seq: u64,
    /// Decoded payload length.
    pub raw_len: u32,
    /// Encoded payload length (bytes after the header).
    pub wire_len: u32,
    /// Kind-specific argument.
    pub arg: u64,
    /// CRC32C of header bytes 0..36 and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Writes the header with `crc` computed over it and `payload` (which must be `wire_len`
    /// bytes long).
    pub fn encode(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        let mut b = self.encode_fields();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..36]), payload);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Writes the header with its CRC field 0, for a connection whose frames are sealed
    /// ([`crate::seal`]): the AEAD tag covers header and payload instead of the CRC.
    pub fn encode_unprotected(&self) -> [u8; HEADER_LEN] {
        let mut b = self.encode_fields();
        b[36..40].fill(0);
        b
    }

    fn encode_fields(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.codec as u8;
        b[6..8].copy_from_slice(&self.device.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.wire_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.arg.to_le_bytes());
        // flags: reserved, zero.
        b
    }

    /// Parses and validates a header (magic, kind, codec, lengths, reserved flags). The CRC is
    /// checked separately by [`FrameHeader::verify`] once the payload is in.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, WireError> {
        FrameHeader::decode_with_limit(b, MAX_PAYLOAD)
    }

    /// Like [`FrameHeader::decode`], with the session's agreed payload limit (clamped to
    /// [`MAX_PAYLOAD`]) in place of the hard one.
    pub fn decode_with_limit(
        b: &[u8; HEADER_LEN],
        max_payload: u32,
    ) -> Result<FrameHeader, WireError> {
        let max = max_payload.min(MAX_PAYLOAD);
        if b[0..4] != FRAME_MAGIC {
            return Err(WireError::BadFrameMagic {
                found: [b[0], b[1], b[2], b[3]],
            });
        }
        let kind = FrameKind::from_u8(b[4]).ok_or(WireError::UnknownKind { kind: b[4] })?;
        let codec = Codec::from_u8(b[5]).ok_or(WireError::UnknownCodec { codec: b[5] })?;
        let device = u16::from_le_bytes([b[6], b[7]]);
        let seq = u64::from_le_bytes(le8(&b[8..16]));
        let raw_len = u32::from_le_bytes(le4(&b[16..20]));
        let wire_len = u32::from_le_bytes(le4(&b[20..24]));
        let arg = u64::from_le_bytes(le8(&b[24..32]));
        let flags = u32::from_le_bytes(le4(&b[32..36]));
        let crc = u32::from_le_bytes(le4(&b[36..40]));
        if flags != 0 {
            return Err(WireError::ReservedFlags { flags });
        }
        if raw_len > max || wire_len > max {
            return Err(WireError::Oversize {
                raw_len,
                wire_len,
                max,
            });
        }
        let consistent = match codec {
            Codec::Raw => wire_len == raw_len,
            Codec::Zero => wire_len == 0,
            Codec::Zstd | Codec::Lz4 | Codec::PagedZstd | Codec::PagedLz4 => wire_len > 0,
            // The map plus at most every page.
            Codec::PagedRaw => {
                let map = page_map_len(raw_len);
                wire_len > map && u64::from(wire_len) <= u64::from(raw_len) + u64::from(map)
            }
        };
        if !consistent {
            return Err(WireError::LengthMismatch {
                codec,
                raw_len,
                wire_len,
            });
        }
        let h = FrameHeader {
            kind,
            codec,
            device,
            seq,
            raw_len,
            wire_len,
            arg,
            crc,
        };
        h.check_kind_rules()?;
        Ok(h)
    }

    /// Checks the rules of the header's kind that the header alone decides (docs/PROTOCOL.md,
    /// "Frame kinds"), so a frame that breaks them is refused before its payload is read.
    pub fn check_kind_rules(&self) -> Result<(), WireError> {
        let rule = |ok: bool, what| {
            if ok {
                Ok(())
            } else {
                Err(WireError::KindRule {
                    kind: self.kind,
                    what,
                })
            }
        };
        let empty = self.raw_len == 0 && self.wire_len == 0;
        match self.kind {
            FrameKind::PreCopyData | FrameKind::StopCopyData => {
                rule(self.raw_len > 0, "data frame with no data")
            }
            FrameKind::DirtyPages => {
                rule(self.raw_len > 0, "dirty pages frame with no pages")?;
                rule(
                    u64::from(self.raw_len) % PAGE_SIZE == 0,
                    "raw length not whole pages",
                )?;
                rule(self.arg % PAGE_SIZE == 0, "gpa not page aligned")
            }
            FrameKind::EndOfDevice => rule(
                self.codec == Codec::Raw && self.raw_len as usize == DIGEST_LEN,
                "payload must be the raw 32-byte digest",
            ),
            FrameKind::PreCopyDone | FrameKind::InitialDataSent => {
                rule(empty, "payload must be empty")
            }
            FrameKind::SwitchoverAck | FrameKind::DevicePrepared => {
                rule(empty, "payload must be empty")?;
                rule(self.seq == 0, "seq must be 0")
            }
            FrameKind::Keepalive => {
                rule(empty, "payload must be empty")?;
                rule(
                    self.device == 0 && self.seq == 0,
                    "device and seq must be 0",
                )
            }
            FrameKind::Commit => {
                rule(empty, "payload must be empty")?;
                rule(
                    self.device == 0 && self.seq == 0,
                    "device and seq must be 0",
                )?;
                rule(self.arg == 0, "arg must be 0")
            }
            FrameKind::Outcome => {
                rule(empty, "payload must be empty")?;
                rule(
                    self.device == 0 && self.seq == 0,
                    "device and seq must be 0",
                )?;
                rule(
                    self.arg <= u64::from(u16::MAX),
                    "outcome code above 16 bits",
                )
            }
            FrameKind::Abort => {
                rule(self.codec == Codec::Raw, "detail must be raw UTF-8")?;
                rule(
                    self.raw_len as usize <= MAX_ABORT_DETAIL,
                    "detail longer than MAX_ABORT_DETAIL",
                )?;
                rule(self.arg <= u64::from(u16::MAX), "reason code above 16 bits")?;
                rule(
                    self.device == 0 && self.seq == 0,
                    "device and seq must be 0",
                )
            }
        }
    }

    /// Checks the CRC over the original header bytes and the payload.
    pub fn verify(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), WireError> {
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header[0..36]), payload);
        if computed != self.crc {
            return Err(WireError::Checksum {
                device: self.device,
                seq: self.seq,
                expected: self.crc,
                computed,
            });
        }
        Ok(())
    }
}

fn le4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    a
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    a
}
