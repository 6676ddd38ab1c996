//! Typed protocol errors.

use crate::frame::{Codec, FrameKind};

/// Something on the wire violated the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Frame does not start with `VMF1`.
    #[error("bad frame magic {found:02x?}")]
    BadFrameMagic {
        /// The 4 bytes found.
        found: [u8; 4],
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The byte found.
        kind: u8,
    },
    /// Unknown codec.
    #[error("unknown codec {codec}")]
    UnknownCodec {
        /// The byte found.
        codec: u8,
    },
    /// Reserved flags set.
    #[error("reserved frame flags {flags:#x} set")]
    ReservedFlags {
        /// The flags found.
        flags: u32,
    },
    /// Declared lengths exceed the hard limit.
    #[error("frame declares raw {raw_len} / wire {wire_len} bytes, limit {max}")]
    Oversize {
        /// Declared raw length.
        raw_len: u32,
        /// Declared wire length.
        wire_len: u32,
        /// The limit.
        max: u32,
    },
    /// Lengths inconsistent with the codec.
    #[error("codec {codec:?} with raw {raw_len} and wire {wire_len} bytes is inconsistent")]
    LengthMismatch {
        /// The codec.
        codec: Codec,
        /// Declared raw length.
        raw_len: u32,
        /// Declared wire length.
        wire_len: u32,
    },
    /// CRC32C mismatch.
    #[error("checksum mismatch on device {device} frame {seq}: header says {expected:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Device index.
        device: u16,
        /// Sequence number.
        seq: u64,
        /// CRC in the header.
        expected: u32,
        /// CRC computed.
        computed: u32,
    },
    /// The header breaks a rule of its kind (docs/PROTOCOL.md, "Frame kinds").
    #[error("{kind:?} frame breaks a kind rule: {what}")]
    KindRule {
        /// The kind.
        kind: FrameKind,
        /// Which rule.
        what: &'static str,
    },
    /// The stream ended inside a frame (connection cut mid-frame).
    #[error("stream ended mid-frame: {received} of {expected} bytes received")]
    Truncated {
        /// Bytes of the frame received.
        received: usize,
        /// Bytes the frame needs (header, or header plus declared payload).
        expected: usize,
    },
    /// An Abort detail is not UTF-8.
    #[error("abort detail is not UTF-8 (valid up to byte {valid_up_to})")]
    AbortDetailNotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// A data frame was given where a control frame was expected.
    #[error("{kind:?} is not a control frame")]
    NotControl {
        /// The kind.
        kind: FrameKind,
    },
}
