//! Typed handshake failures, and the refusals they map to in both directions
//! (docs/PROTOCOL.md, section 9).

use super::msgs::{AuthMode, MsgType, Refuse, RefuseCode};
use crate::codec::Short;
use crate::declare::DeviceMismatch;
use crate::seal::FrameProtection;

/// A handshake failure. Every variant carries the facts; none carries a formatted string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// A message did not start with `VMHS`. `found` holds the bytes seen so far (zero-padded).
    #[error("bad handshake magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version (detected locally or reported by the peer).
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer is configured with another authentication mode (detected locally or reported by
    /// the peer).
    #[error("authentication mode mismatch: ours {ours:?}, theirs {theirs}")]
    AuthModeMismatch {
        /// Ours.
        ours: AuthMode,
        /// The peer's mode byte.
        theirs: u8,
    },
    /// A MAC did not verify: the peer does not hold our key, or the exchange was replayed or
    /// altered. Reported by the side whose check failed and by its peer (from the refusal).
    #[error("authentication failed (wrong key, replayed or altered handshake)")]
    AuthenticationFailed,
    /// A declared length exceeds a limit; refused before allocating.
    #[error("{what} declares {declared} bytes, limit {limit}")]
    TooLarge {
        /// What was declared.
        what: &'static str,
        /// Declared value.
        declared: u64,
        /// Limit.
        limit: u64,
    },
    /// The offer declares more devices than allowed; refused before allocating.
    #[error("offer declares {declared} devices, limit {limit}")]
    TooManyDevices {
        /// Declared count.
        declared: usize,
        /// Limit.
        limit: usize,
    },
    /// A message could not be parsed or holds an invalid value.
    #[error("malformed handshake: {what}")]
    Malformed {
        /// Which field or rule.
        what: &'static str,
    },
    /// The offer does not include `Codec::Raw`.
    #[error("no common codec: offered {offered:#x}, Raw is required")]
    NoCommonCodec {
        /// The offered codec bits.
        offered: u32,
    },
    /// A join asked for a connection index the session cannot have.
    #[error("join with connection index {index}, session has {streams} streams")]
    BadJoinIndex {
        /// Requested index.
        index: u16,
        /// Agreed streams.
        streams: u16,
    },
    /// The peers are configured to protect frames differently (detected by the server or
    /// reported by it).
    #[error("frame protection mismatch: ours {ours:?}, theirs {theirs}")]
    ProtectionMismatch {
        /// Ours.
        ours: FrameProtection,
        /// The peer's protection byte.
        theirs: u8,
    },
    /// The peer refused with `code` (and a code-specific `value`, see [`RefuseCode`]).
    #[error("peer refused: {code:?} (value {value})")]
    Refused {
        /// Reason.
        code: RefuseCode,
        /// Code-specific value.
        value: u64,
    },
    /// A message arrived that this state does not expect.
    #[error("unexpected handshake message type {found}, expected {expected:?}")]
    UnexpectedMessage {
        /// What we wait for.
        expected: MsgType,
        /// The type byte received.
        found: u8,
    },
    /// The two sides declare different numbers of devices (found by both sides from the
    /// declarations; nothing is refused on the wire, each side stops by itself).
    #[error("the source declares {source_count} devices, the destination {destination_count}")]
    DeviceCountMismatch {
        /// The source's (client's) count.
        source_count: usize,
        /// The destination's (server's) count.
        destination_count: usize,
    },
    /// A device pair that cannot work (see [`crate::declare`]), found by both sides.
    #[error("device {} declarations differ in {:?}: source {:?}, destination {:?}", .0.index, .0.field, .0.source, .0.destination)]
    DeviceMismatch(Box<DeviceMismatch>),
    /// Our own parameters are unusable (empty PSK, invalid offer, zero limits).
    #[error("invalid local handshake parameters: {what}")]
    BadLocalParams {
        /// Which parameter.
        what: &'static str,
    },
}

impl HandshakeError {
    /// The refusal to send the peer for this (locally detected) error, with its value.
    pub(super) fn refusal(&self, version: u16) -> Option<Refuse> {
        let (code, value) = self.refusal_code(version)?;
        Some(Refuse { code, value })
    }

    fn refusal_code(&self, version: u16) -> Option<(RefuseCode, u64)> {
        Some(match self {
            HandshakeError::BadMagic { .. } | HandshakeError::Malformed { .. } => {
                (RefuseCode::Malformed, 0)
            }
            HandshakeError::VersionMismatch { .. } => {
                (RefuseCode::VersionMismatch, u64::from(version))
            }
            HandshakeError::AuthModeMismatch { ours, .. } => {
                (RefuseCode::AuthModeMismatch, u64::from(ours.code()))
            }
            HandshakeError::AuthenticationFailed => (RefuseCode::AuthenticationFailed, 0),
            HandshakeError::TooLarge { limit, .. } => (RefuseCode::TooLarge, *limit),
            HandshakeError::TooManyDevices { limit, .. } => {
                (RefuseCode::TooManyDevices, *limit as u64)
            }
            HandshakeError::NoCommonCodec { .. } => (RefuseCode::NoCommonCodec, 0),
            HandshakeError::BadJoinIndex { streams, .. } => {
                (RefuseCode::BadJoinIndex, u64::from(*streams))
            }
            HandshakeError::ProtectionMismatch { ours, .. } => {
                (RefuseCode::ProtectionMismatch, u64::from(ours.code()))
            }
            HandshakeError::UnexpectedMessage { found, .. } => {
                (RefuseCode::UnexpectedMessage, u64::from(*found))
            }
            // Never answer a refusal with a refusal; local parameter errors happen before any
            // exchange; device mismatches are found by both sides from the declarations (the
            // server sends its `ServerAccept` with them, then stops).
            HandshakeError::Refused { .. }
            | HandshakeError::BadLocalParams { .. }
            | HandshakeError::DeviceCountMismatch { .. }
            | HandshakeError::DeviceMismatch(_) => return None,
        })
    }
}

impl From<Short> for HandshakeError {
    fn from(_: Short) -> HandshakeError {
        HandshakeError::Malformed {
            what: "message shorter than its fields",
        }
    }
}

impl Refuse {
    /// The error a side reports on receiving this refusal, given its own version, auth mode
    /// and frame protection: codes 1 to 3 and 10 become the same typed error the refuser
    /// reports, so both ends of a wrong key or version say the same.
    pub(super) fn into_error(
        self,
        version: u16,
        auth: AuthMode,
        protection: FrameProtection,
    ) -> HandshakeError {
        let Refuse { code, value } = self;
        match code {
            RefuseCode::AuthenticationFailed => HandshakeError::AuthenticationFailed,
            RefuseCode::VersionMismatch => HandshakeError::VersionMismatch {
                ours: version,
                theirs: u16::try_from(value).unwrap_or(u16::MAX),
            },
            RefuseCode::AuthModeMismatch => HandshakeError::AuthModeMismatch {
                ours: auth,
                theirs: u8::try_from(value).unwrap_or(u8::MAX),
            },
            RefuseCode::ProtectionMismatch => HandshakeError::ProtectionMismatch {
                ours: protection,
                theirs: u8::try_from(value).unwrap_or(u8::MAX),
            },
            code => HandshakeError::Refused { code, value },
        }
    }
}
