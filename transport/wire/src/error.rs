//! Typed protocol errors.

use crate::frame::Codec;

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
}
