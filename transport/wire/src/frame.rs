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
//! 32     4    flags    bit 0: FLAG_HASH_TRAILER (device state frames only); others 0
//! 36     4    crc      CRC32C over bytes 0..36 followed by the wire_len payload bytes (with
//!                      FLAG_HASH_TRAILER: by the payload's last 16 bytes only);
//!                      0 on a connection with sealed frames (the AEAD tag covers them, `seal`)
//! ```
//!
//! A frame with [`FLAG_HASH_TRAILER`] (version 4) ends its payload with the XXH3-128 of its raw
//! (decoded) bytes, 16 bytes little-endian: the receiver checks the decoded bytes against it
//! before they go anywhere, so the CRC need not cover the body a second time.

use crate::codec::{ArrayWriter, Put, Reader, Short};
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
/// Header flag (bytes 32..36): the payload ends with a [`HASH_TRAILER_LEN`]-byte trailer, the
/// XXH3-128 (little-endian) of the frame's raw bytes, and the CRC covers the header and that
/// trailer instead of the whole payload. Only on [`FrameKind::PreCopyData`] and
/// [`FrameKind::StopCopyData`] frames with a payload (never codec `Zero`).
pub const FLAG_HASH_TRAILER: u32 = 1;
/// Length of the hash trailer of a [`FLAG_HASH_TRAILER`] frame.
pub const HASH_TRAILER_LEN: usize = 16;
/// [`HASH_TRAILER_LEN`] as a header length field's type.
const TRAILER_U32: u32 = 16;
/// Hard limit on `raw_len` and `wire_len`: a peer declaring more is refused before anything is
/// allocated.
pub const MAX_PAYLOAD: u32 = 4 << 20;

vfmig_enum::int_enum! {
    /// What a frame carries.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum FrameKind: u8 {
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
}

impl FrameKind {
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

vfmig_enum::int_enum! {
    /// How the payload is encoded.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Codec: u8 {
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
}

impl Codec {
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

/// The header's fields in wire order, as they are before any check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawFields {
    magic: [u8; 4],
    kind: u8,
    codec: u8,
    device: u16,
    seq: u64,
    raw_len: u32,
    wire_len: u32,
    arg: u64,
    flags: u32,
    crc: u32,
}

/// Header bytes the CRC covers: every field before `crc`, the last one.
const CRC_COVERED: usize = HEADER_LEN - 4;
const _: () = assert!(4 + 1 + 1 + 2 + 8 + 4 + 4 + 8 + 4 == CRC_COVERED);

impl RawFields {
    /// Reads the fields of a whole header.
    fn of(b: &[u8; HEADER_LEN]) -> RawFields {
        // The fields add up to HEADER_LEN bytes (asserted above), so no read comes up short.
        RawFields::read(&mut Reader::new(b)).unwrap_or_default()
    }

    fn read(r: &mut Reader<'_>) -> Result<RawFields, Short> {
        Ok(RawFields {
            magic: r.array()?,
            kind: r.u8()?,
            codec: r.u8()?,
            device: r.u16()?,
            seq: r.u64()?,
            raw_len: r.u32()?,
            wire_len: r.u32()?,
            arg: r.u64()?,
            flags: r.u32()?,
            crc: r.u32()?,
        })
    }

    /// Writes every field but `crc` (the bytes the CRC covers).
    fn write_covered(&self, w: &mut impl Put) {
        w.put(&self.magic);
        w.put_u8(self.kind);
        w.put_u8(self.codec);
        w.put_u16(self.device);
        w.put_u64(self.seq);
        w.put_u32(self.raw_len);
        w.put_u32(self.wire_len);
        w.put_u64(self.arg);
        w.put_u32(self.flags);
    }
}

/// The bytes of a frame header, encoded or as received, with typed reads of its fields before
/// (or without) validation. A receiver uses it to name the device and sequence number of a frame
/// whose header does not decode, and to find the header in a frame's head: the wire crate is the
/// only place that knows the layout.
///
/// ```
/// use vfmig_wire::{Codec, FrameHeader, FrameKind, HeaderBytes};
/// let h = FrameHeader { kind: FrameKind::Keepalive, codec: Codec::Raw, device: 3, seq: 9,
///                       raw_len: 0, wire_len: 0, arg: 0, crc: 0 };
/// let b = HeaderBytes::new(h.encode(&[]));
/// assert_eq!((b.device(), b.seq()), (3, 9));
/// assert!(b.decode().is_err()); // a Keepalive names no device
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeaderBytes([u8; HEADER_LEN]);

impl HeaderBytes {
    /// Wraps header bytes.
    pub const fn new(bytes: [u8; HEADER_LEN]) -> HeaderBytes {
        HeaderBytes(bytes)
    }

    /// The header at the start of a frame's head (the header alone, or followed by the tag of a
    /// sealed frame, [`crate::seal`]); `None` if `head` is shorter than a header.
    pub fn from_head(head: &[u8]) -> Option<HeaderBytes> {
        Reader::new(head).array().ok().map(HeaderBytes)
    }

    /// The bytes.
    pub const fn as_array(&self) -> &[u8; HEADER_LEN] {
        &self.0
    }

    /// The bytes, by value.
    pub const fn into_array(self) -> [u8; HEADER_LEN] {
        self.0
    }

    /// The `kind` byte, unchecked.
    pub fn kind_byte(&self) -> u8 {
        RawFields::of(&self.0).kind
    }

    /// The `codec` byte, unchecked.
    pub fn codec_byte(&self) -> u8 {
        RawFields::of(&self.0).codec
    }

    /// The `device` field, unchecked.
    pub fn device(&self) -> u16 {
        RawFields::of(&self.0).device
    }

    /// The `seq` field, unchecked.
    pub fn seq(&self) -> u64 {
        RawFields::of(&self.0).seq
    }

    /// The `raw_len` field, unchecked.
    pub fn raw_len(&self) -> u32 {
        RawFields::of(&self.0).raw_len
    }

    /// The `wire_len` field, unchecked.
    pub fn wire_len(&self) -> u32 {
        RawFields::of(&self.0).wire_len
    }

    /// The `arg` field, unchecked.
    pub fn arg(&self) -> u64 {
        RawFields::of(&self.0).arg
    }

    /// The `flags` field, unchecked.
    pub fn flags(&self) -> u32 {
        RawFields::of(&self.0).flags
    }

    /// The `crc` field.
    pub fn crc(&self) -> u32 {
        RawFields::of(&self.0).crc
    }

    /// Sets the `crc` field to 0, as a sealed frame carries it ([`crate::seal`]).
    pub fn clear_crc(&mut self) {
        let mut w = ArrayWriter::<HEADER_LEN>::new();
        RawFields::of(&self.0).write_covered(&mut w);
        w.put_u32(0);
        self.0 = w.finish();
    }

    /// [`FrameHeader::decode`] of these bytes.
    pub fn decode(&self) -> Result<FrameHeader, WireError> {
        FrameHeader::decode(&self.0)
    }

    /// [`FrameHeader::decode_with_limit`] of these bytes.
    pub fn decode_with_limit(&self, max_payload: u32) -> Result<FrameHeader, WireError> {
        FrameHeader::decode_with_limit(&self.0, max_payload)
    }

    /// [`FrameHeader::verify`] of `header` (decoded from these bytes) and its payload.
    pub fn verify(&self, header: &FrameHeader, payload: &[u8]) -> Result<(), WireError> {
        header.verify(&self.0, payload)
    }
}

impl From<[u8; HEADER_LEN]> for HeaderBytes {
    fn from(bytes: [u8; HEADER_LEN]) -> HeaderBytes {
        HeaderBytes(bytes)
    }
}

impl FrameHeader {
    /// Writes the header with `crc` computed over it and `payload` (which must be `wire_len`
    /// bytes long).
    pub fn encode(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        let mut w = ArrayWriter::<HEADER_LEN>::new();
        self.raw_fields().write_covered(&mut w);
        let crc = crc32c::crc32c_append(crc32c::crc32c(w.written()), payload);
        w.put_u32(crc);
        w.finish()
    }

    /// Writes the header of a [`FLAG_HASH_TRAILER`] frame: `payload` (`wire_len` bytes) ends with
    /// the hash trailer, and the CRC covers the header and the trailer only. Returns `None` when
    /// the frame may not carry the flag (not device state, or a payload without room for a body
    /// and the trailer). `sealed`: the CRC field is 0 (the AEAD tag covers everything).
    pub fn encode_hash_trailer(&self, payload: &[u8], sealed: bool) -> Option<[u8; HEADER_LEN]> {
        let kind_ok = matches!(self.kind, FrameKind::PreCopyData | FrameKind::StopCopyData);
        if !kind_ok || self.codec == Codec::Zero || payload.len() <= HASH_TRAILER_LEN {
            return None;
        }
        let mut f = self.raw_fields();
        f.flags = FLAG_HASH_TRAILER;
        let mut w = ArrayWriter::<HEADER_LEN>::new();
        f.write_covered(&mut w);
        let crc = if sealed {
            0
        } else {
            let trailer = payload.get(payload.len() - HASH_TRAILER_LEN..)?;
            crc32c::crc32c_append(crc32c::crc32c(w.written()), trailer)
        };
        w.put_u32(crc);
        Some(w.finish())
    }

    /// Writes the header with its CRC field 0, for a connection whose frames are sealed
    /// ([`crate::seal`]): the AEAD tag covers header and payload instead of the CRC.
    pub fn encode_unprotected(&self) -> [u8; HEADER_LEN] {
        let mut w = ArrayWriter::<HEADER_LEN>::new();
        self.raw_fields().write_covered(&mut w);
        w.put_u32(0);
        w.finish()
    }

    fn raw_fields(&self) -> RawFields {
        RawFields {
            magic: FRAME_MAGIC,
            kind: self.kind.code(),
            codec: self.codec.code(),
            device: self.device,
            seq: self.seq,
            raw_len: self.raw_len,
            wire_len: self.wire_len,
            arg: self.arg,
            // Reserved, zero.
            flags: 0,
            crc: self.crc,
        }
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
        let RawFields {
            magic,
            kind,
            codec,
            device,
            seq,
            raw_len,
            wire_len,
            arg,
            flags,
            crc,
        } = RawFields::of(b);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadFrameMagic { found: magic });
        }
        let kind =
            FrameKind::try_from(kind).map_err(|e| WireError::UnknownKind { kind: e.value })?;
        let codec =
            Codec::try_from(codec).map_err(|e| WireError::UnknownCodec { codec: e.value })?;
        let trailer = flags == FLAG_HASH_TRAILER
            && matches!(kind, FrameKind::PreCopyData | FrameKind::StopCopyData)
            && codec != Codec::Zero
            && wire_len > TRAILER_U32;
        if flags != 0 && !trailer {
            return Err(WireError::ReservedFlags { flags });
        }
        if raw_len > max || wire_len > max {
            return Err(WireError::Oversize {
                raw_len,
                wire_len,
                max,
            });
        }
        // The encoded body: the payload before a hash trailer.
        let body = if trailer {
            wire_len - TRAILER_U32
        } else {
            wire_len
        };
        let consistent = match codec {
            Codec::Raw => body == raw_len,
            Codec::Zero => wire_len == 0,
            Codec::Zstd | Codec::Lz4 | Codec::PagedZstd | Codec::PagedLz4 => body > 0,
            // The map plus at most every page.
            Codec::PagedRaw => {
                let map = page_map_len(raw_len);
                body > map && u64::from(body) <= u64::from(raw_len) + u64::from(map)
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

    /// Checks the CRC over the original header bytes and the payload (with
    /// [`FLAG_HASH_TRAILER`] set in the header bytes: the payload's hash trailer only; the
    /// receiver checks the body against the trailer once decoded).
    pub fn verify(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), WireError> {
        let covered = header.get(..CRC_COVERED).unwrap_or_default();
        let trailer = RawFields::of(header).flags == FLAG_HASH_TRAILER;
        let payload = match payload.len().checked_sub(HASH_TRAILER_LEN) {
            Some(body) if trailer && body > 0 => payload.get(body..).unwrap_or_default(),
            _ => payload,
        };
        let computed = crc32c::crc32c_append(crc32c::crc32c(covered), payload);
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
