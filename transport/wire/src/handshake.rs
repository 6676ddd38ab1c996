//! Sans-IO handshake and authentication (docs/PROTOCOL.md, "Handshake").
//!
//! Four messages, each in a 12-byte envelope (magic `VMHS`, version, type, body length):
//!
//! ```text
//! client                                   server
//!   ClientHello    (nonce_c, auth mode)  ->
//!                                       <-  ServerChallenge (nonce_s, auth mode)
//!   ClientOffer    (offer, join, MAC_c)  ->                       server verifies MAC_c first
//!                                       <-  ServerAccept    (agreed, session, MAC_s)
//!   client verifies MAC_s
//! ```
//!
//! Either side may send `Refuse` (code + value) instead of its next message; the refusing side
//! fails with a typed error, the other side fails with the error mapped from the code.
//!
//! With [`Auth::Psk`], `MAC_c = HMAC-SHA-256(psk, CLIENT_LABEL || ClientHello || ServerChallenge ||
//! ClientOffer-without-MAC)` and `MAC_s = HMAC-SHA-256(psk, SERVER_LABEL || ClientHello ||
//! ServerChallenge || ClientOffer || ServerAccept-without-MAC)`, over the exact message bytes
//! (envelopes included). Both nonces, both roles, the offer, the answer, the session id and the
//! join request are therefore bound; a replayed `ClientOffer` fails against a fresh `nonce_s`, and
//! a reflected MAC fails because the labels differ. The client proves first, so the server reveals
//! nothing but its nonce (and a refusal) to a client that does not hold the key. With a PSK both
//! sides then derive the connection's keys from the PSK and the transcript
//! ([`SessionKeys::derive`]): frame keys per direction and the stream digest key.
//!
//! The driver (the transport) loops: write [`Handshake::take_output`] to the peer, read bytes,
//! [`Handshake::feed`] them, until [`Handshake::agreed`] is `Some` or `feed` fails. `feed` consumes
//! at most up to the end of the last handshake message, so bytes that follow (frames) stay with the
//! caller. After a failure, write the remaining `take_output` (a `Refuse` for the peer) and close.

use crate::declare::{check_devices, DeviceDecl, DeviceMismatch, DECL_FIXED_LEN, MAX_DECL_LEN};
use crate::frame::{Codec, MAX_PAYLOAD};
use crate::seal::{FrameProtection, SessionKeys};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The protocol version this crate speaks (envelope bytes 4..6 of every handshake message).
pub const PROTOCOL_VERSION: u16 = 3;
/// Magic at the start of every handshake message.
pub const HANDSHAKE_MAGIC: [u8; 4] = *b"VMHS";
/// Length of the envelope that precedes every handshake message body.
pub const ENVELOPE_LEN: usize = 12;
/// Length of a nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA-256 tag.
pub const MAC_LEN: usize = 32;
/// Hard wire cap on the number of devices in an offer, whatever the server's [`Limits`].
pub const MAX_DEVICES: usize = 256;
/// Hard cap on a device name, in bytes of UTF-8.
pub const MAX_DEVICE_NAME: usize = 255;
/// Frame protection byte for CRC32C ([`FrameProtection::Crc32c`]).
pub const CHECKSUM_CRC32C: u8 = FrameProtection::Crc32c as u8;

/// Body length of `ClientHello` and `ServerChallenge`.
pub const HELLO_BODY_LEN: usize = NONCE_LEN + 4;
/// Fixed part of the `ClientOffer` body (before the device list).
pub const OFFER_FIXED_LEN: usize = 40;
/// Fixed part of one device entry in `ClientOffer` (name length, caps, state size hint, and the
/// fixed part of its declaration).
pub const DEVICE_FIXED_LEN: usize = 2 + 8 + 8 + DECL_FIXED_LEN;
/// Body length of the fixed part of `ServerAccept` (without the declarations and the MAC).
pub const ACCEPT_BODY_LEN: usize = 40;
/// `ServerAccept`'s declaration count for a server that declares no devices (nothing compared).
pub const UNDECLARED: u16 = 0xFFFF;
/// Largest `ServerAccept` body without the MAC: fixed part, count, [`MAX_DEVICES`] declarations.
pub const MAX_ACCEPT_BODY: usize = ACCEPT_BODY_LEN + 2 + MAX_DEVICES * MAX_DECL_LEN;
/// Body length of `Refuse`.
pub const REFUSE_BODY_LEN: usize = 12;
/// Largest `ClientOffer` body any server accepts (all [`MAX_DEVICES`] with maximal names + MAC).
pub const MAX_OFFER_BODY: usize = OFFER_FIXED_LEN
    + MAX_DEVICES * (DEVICE_FIXED_LEN + MAX_DEVICE_NAME + crate::declare::MAX_COMPAT)
    + MAC_LEN;

/// Label prefixed to the client's MAC input (32 bytes).
pub const CLIENT_MAC_LABEL: &[u8; 32] = b"vfmig handshake v1 client proof\0";
/// Label prefixed to the server's MAC input (32 bytes).
pub const SERVER_MAC_LABEL: &[u8; 32] = b"vfmig handshake v1 server proof\0";

/// The frame protection a side uses unless told otherwise: AES-256-GCM with a PSK, CRC32C
/// without one.
pub fn default_protection(auth: &Auth) -> FrameProtection {
    match auth {
        Auth::None => FrameProtection::Crc32c,
        Auth::Psk(_) => FrameProtection::Aes256Gcm,
    }
}

/// Bit for `codec` in [`Offer::codecs`] / [`Agreed::codecs`].
pub fn codec_bit(codec: Codec) -> u32 {
    1u32 << (codec as u8)
}

/// All codecs this implementation knows (docs/PROTOCOL.md, section 6). A peer that knows fewer
/// drops the other bits from its answer, so a sender never uses a codec its receiver lacks.
pub const KNOWN_CODECS: u32 = 0b111_1111;

type HmacSha256 = Hmac<Sha256>;

/// A device as offered by the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Operator-visible name (1..=255 bytes of UTF-8).
    pub name: String,
    /// Device capability bits (opaque to the wire; the pipeline interprets them).
    pub caps: u64,
    /// Expected size of the device state in bytes (a hint; 0 if unknown).
    pub state_size_hint: u64,
    /// What the source declares about the device, compared with the destination's
    /// declaration in the handshake (see [`crate::declare`]).
    pub decl: DeviceDecl,
}

/// What the client (source) proposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// TCP connections per session the client wants (>= 1).
    pub streams: u16,
    /// Codecs the client may send: bit `1 << (Codec as u8)`. Must include `Codec::Raw`.
    pub codecs: u32,
    /// Largest frame payload the client will send (>= 1).
    pub max_payload: u32,
    /// Reorder window / outstanding bytes the client asks for (>= 1).
    pub window_bytes: u64,
    /// The devices to migrate, in device-index order.
    pub devices: Vec<DeviceDesc>,
}

/// Authentication mode; both sides must configure the same one. Deliberately not `PartialEq`
/// (a key comparison must be constant-time) and its `Debug` does not print the key.
#[derive(Clone)]
pub enum Auth {
    /// No authentication (the transport allows it on loopback or with `--insecure`, and inside
    /// TLS).
    None,
    /// Pre-shared key, mutual HMAC-SHA-256 challenge-response. Must not be empty.
    Psk(Vec<u8>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Psk(k) => write!(f, "Psk(<{} bytes redacted>)", k.len()),
        }
    }
}

impl Auth {
    fn mode(&self) -> AuthMode {
        match self {
            Auth::None => AuthMode::None,
            Auth::Psk(_) => AuthMode::Psk,
        }
    }
}

/// Authentication mode as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AuthMode {
    /// No authentication.
    None = 0,
    /// Pre-shared key.
    Psk = 1,
}

/// What the server accepts at most. An offer above a limit is clamped (streams, payload, window)
/// or refused (devices, lengths) before anything is allocated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections per session.
    pub max_streams: u16,
    /// Most devices per session (never above [`MAX_DEVICES`]).
    pub max_devices: usize,
    /// Largest frame payload (never above [`MAX_PAYLOAD`]).
    pub max_payload: u32,
    /// Largest reorder window / outstanding bytes.
    pub max_window_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams: 16,
            max_devices: 64,
            max_payload: MAX_PAYLOAD,
            max_window_bytes: 64 << 20,
        }
    }
}

/// Client (source) parameters.
#[derive(Clone, Debug)]
pub struct ClientParams {
    /// Authentication.
    pub auth: Auth,
    /// The offer.
    pub offer: Offer,
    /// `Some((session id, connection index))` to join an existing session as an extra connection.
    pub join: Option<([u8; 16], u16)>,
    /// Fresh random nonce (the caller draws it, e.g. with `getrandom`).
    pub nonce: [u8; 32],
}

/// Server (destination) parameters.
#[derive(Clone, Debug)]
pub struct ServerParams {
    /// Authentication.
    pub auth: Auth,
    /// Limits.
    pub limits: Limits,
    /// Session id assigned when the client does not join (fresh random).
    pub session_id: [u8; 16],
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// The destination's declaration of each of its devices, in device-index order, compared
    /// with the offer's ([`crate::declare::check_devices`]) on both sides; `None` declares
    /// nothing and compares nothing.
    pub devices: Option<Vec<DeviceDecl>>,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// Session id (the server's for a new session, the joined one otherwise).
    pub session_id: [u8; 16],
    /// Connection index in the session (0 for the first connection).
    pub conn_index: u16,
    /// This connection joins an existing session: the transport must check `session_id` is its
    /// live session (the sans-IO handshake cannot).
    pub joined: bool,
    /// Connections per session.
    pub streams: u16,
    /// Codecs the client may use (always includes `Codec::Raw`).
    pub codecs: u32,
    /// Largest frame payload either side sends.
    pub max_payload: u32,
    /// Reorder window / outstanding bytes.
    pub window_bytes: u64,
    /// Devices in device-index order.
    pub devices: Vec<DeviceDesc>,
    /// Both sides proved possession of the PSK.
    pub authenticated: bool,
    /// How this connection's frames are protected.
    pub protection: FrameProtection,
    /// This connection's keys, derived from the PSK and its handshake transcript (`None` without
    /// a PSK).
    pub keys: Option<SessionKeys>,
}

/// Handshake message types (envelope byte 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// Client -> server: nonce and auth mode.
    ClientHello = 1,
    /// Server -> client: nonce and auth mode.
    ServerChallenge = 2,
    /// Client -> server: offer, join request, client MAC.
    ClientOffer = 3,
    /// Server -> client: agreed parameters, session, server MAC.
    ServerAccept = 4,
    /// Either way: refusal with a code.
    Refuse = 5,
}

impl MsgType {
    /// Parses the type byte.
    pub fn from_u8(v: u8) -> Option<MsgType> {
        Some(match v {
            1 => MsgType::ClientHello,
            2 => MsgType::ServerChallenge,
            3 => MsgType::ClientOffer,
            4 => MsgType::ServerAccept,
            5 => MsgType::Refuse,
            _ => return None,
        })
    }
}

/// Why a side refused (the `Refuse` message's code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseCode {
    /// Protocol versions differ. Value: the refuser's version.
    VersionMismatch,
    /// Auth modes differ. Value: the refuser's mode.
    AuthModeMismatch,
    /// The peer's MAC did not verify. Value: 0.
    AuthenticationFailed,
    /// A declared length is above a limit. Value: the limit.
    TooLarge,
    /// Too many devices. Value: the limit.
    TooManyDevices,
    /// A message could not be parsed. Value: 0.
    Malformed,
    /// The offer lacks `Codec::Raw`. Value: 0.
    NoCommonCodec,
    /// A message arrived out of order. Value: the type byte received.
    UnexpectedMessage,
    /// A join asked for a connection index outside the session. Value: the agreed streams.
    BadJoinIndex,
    /// The offer asks for another frame protection. Value: the refuser's protection byte.
    ProtectionMismatch,
    /// A code this version does not know.
    Unknown(u16),
}

impl RefuseCode {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            RefuseCode::VersionMismatch => 1,
            RefuseCode::AuthModeMismatch => 2,
            RefuseCode::AuthenticationFailed => 3,
            RefuseCode::TooLarge => 4,
            RefuseCode::TooManyDevices => 5,
            RefuseCode::Malformed => 6,
            RefuseCode::NoCommonCodec => 7,
            RefuseCode::UnexpectedMessage => 8,
            RefuseCode::BadJoinIndex => 9,
            RefuseCode::ProtectionMismatch => 10,
            RefuseCode::Unknown(v) => v,
        }
    }

    /// Parses a wire value.
    pub fn from_u16(v: u16) -> RefuseCode {
        match v {
            1 => RefuseCode::VersionMismatch,
            2 => RefuseCode::AuthModeMismatch,
            3 => RefuseCode::AuthenticationFailed,
            4 => RefuseCode::TooLarge,
            5 => RefuseCode::TooManyDevices,
            6 => RefuseCode::Malformed,
            7 => RefuseCode::NoCommonCodec,
            8 => RefuseCode::UnexpectedMessage,
            9 => RefuseCode::BadJoinIndex,
            10 => RefuseCode::ProtectionMismatch,
            v => RefuseCode::Unknown(v),
        }
    }
}

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
    fn refusal(&self, version: u16) -> Option<(RefuseCode, u64)> {
        Some(match self {
            HandshakeError::BadMagic { .. } | HandshakeError::Malformed { .. } => {
                (RefuseCode::Malformed, 0)
            }
            HandshakeError::VersionMismatch { .. } => {
                (RefuseCode::VersionMismatch, u64::from(version))
            }
            HandshakeError::AuthModeMismatch { ours, .. } => {
                (RefuseCode::AuthModeMismatch, *ours as u64)
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
                (RefuseCode::ProtectionMismatch, *ours as u64)
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

/// One side of the handshake, driven by bytes.
pub trait Handshake {
    /// Next bytes to write to the peer (all queued messages), if any.
    fn take_output(&mut self) -> Option<Vec<u8>>;
    /// Feeds bytes read from the peer; returns how many were consumed. Bytes after the last
    /// handshake message are not consumed. A partial message is buffered (bounded by the message
    /// caps); a failure is sticky.
    fn feed(&mut self, input: &[u8]) -> Result<usize, HandshakeError>;
    /// The agreed parameters once the handshake completed.
    fn agreed(&self) -> Option<&Agreed>;
    /// The handshake failed (see [`ClientHandshake::error`] / [`ServerHandshake::error`]).
    fn is_failed(&self) -> bool;
}

// ---------------------------------------------------------------------------------------------
// Shared machinery: envelope reassembly, output queue, transcript, failure.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// State shared by both roles.
struct Core {
    role: Role,
    version: u16,
    auth: Auth,
    protection: FrameProtection,
    /// The message being reassembled: envelope, then body.
    rx: Vec<u8>,
    /// Body length of the message in `rx`, once its envelope is in and validated.
    rx_body: Option<(MsgType, usize)>,
    out: Vec<u8>,
    /// Exact bytes of every message exchanged so far (bounded by the message caps).
    transcript: Vec<u8>,
    failed: Option<HandshakeError>,
    agreed: Option<Agreed>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("role", &self.role)
            .field("version", &self.version)
            .field("auth", &self.auth)
            .field("protection", &self.protection)
            .field("rx_len", &self.rx.len())
            .field("out_len", &self.out.len())
            .field("failed", &self.failed)
            .field("agreed", &self.agreed)
            .finish()
    }
}

/// A complete message: its type and its bytes (envelope included).
type Complete = (MsgType, Vec<u8>);

/// What the state machine waits for: the expected type and the largest body it accepts.
struct Expect {
    ty: MsgType,
    max_body: usize,
}

impl Core {
    fn new(role: Role, version: u16, auth: Auth, protection: FrameProtection) -> Core {
        Core {
            role,
            version,
            auth,
            protection,
            rx: Vec::new(),
            rx_body: None,
            out: Vec::new(),
            transcript: Vec::new(),
            failed: None,
            agreed: None,
        }
    }

    /// The connection's keys once the transcript is complete (PSK only).
    fn keys(&self) -> Option<SessionKeys> {
        match &self.auth {
            Auth::None => None,
            Auth::Psk(k) => Some(SessionKeys::derive(k, &self.transcript)),
        }
    }

    /// A PSK without TLS protects frames with AES-256-GCM; no key cannot.
    fn check_protection(&self) -> Option<HandshakeError> {
        match (&self.auth, self.protection) {
            (Auth::None, FrameProtection::Aes256Gcm) => Some(HandshakeError::BadLocalParams {
                what: "frame encryption without a PSK",
            }),
            _ => None,
        }
    }

    fn mac_len(&self) -> usize {
        match self.auth {
            Auth::None => 0,
            Auth::Psk(_) => MAC_LEN,
        }
    }

    /// Records `err`, queues a refusal for the peer where one applies, and returns `err`.
    #[cold]
    fn fail(&mut self, err: HandshakeError) -> HandshakeError {
        if let Some((code, value)) = err.refusal(self.version) {
            let mut body = [0u8; REFUSE_BODY_LEN];
            body[0..2].copy_from_slice(&code.to_u16().to_le_bytes());
            body[4..12].copy_from_slice(&value.to_le_bytes());
            self.out
                .extend_from_slice(&envelope(self.version, MsgType::Refuse, body.len()));
            self.out.extend_from_slice(&body);
        }
        self.failed = Some(err.clone());
        err
    }

    /// Queues a message and appends it to the transcript.
    fn send(&mut self, msg: &[u8]) {
        self.out.extend_from_slice(msg);
        self.transcript.extend_from_slice(msg);
    }

    fn take_output(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    /// Pulls bytes of one message from `input` into `rx`. Returns bytes consumed and the complete
    /// message, if it is complete.
    fn pull(
        &mut self,
        input: &[u8],
        expect: &Expect,
    ) -> Result<(usize, Option<Complete>), HandshakeError> {
        let mut used = 0;
        if self.rx_body.is_none() {
            let take = (ENVELOPE_LEN - self.rx.len()).min(input.len());
            self.rx.extend_from_slice(&input[..take]);
            used += take;
            // Check the magic as soon as its bytes arrive, so garbage fails without waiting.
            let m = self.rx.len().min(4);
            if self.rx[..m] != HANDSHAKE_MAGIC[..m] {
                let mut found = [0u8; 4];
                found[..m].copy_from_slice(&self.rx[..m]);
                return Err(HandshakeError::BadMagic { found });
            }
            if self.rx.len() < ENVELOPE_LEN {
                return Ok((used, None));
            }
            let (ty, body_len) = self.check_envelope(expect)?;
            self.rx_body = Some((ty, body_len));
        }
        let Some((ty, body_len)) = self.rx_body else {
            return Ok((used, None));
        };
        let want = ENVELOPE_LEN + body_len - self.rx.len();
        let take = want.min(input.len() - used);
        self.rx.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.rx.len() < ENVELOPE_LEN + body_len {
            return Ok((used, None));
        }
        self.rx_body = None;
        Ok((used, Some((ty, std::mem::take(&mut self.rx)))))
    }

    /// Validates a complete envelope in `rx` against what the state expects, before any body
    /// byte is buffered.
    fn check_envelope(&self, expect: &Expect) -> Result<(MsgType, usize), HandshakeError> {
        let e = &self.rx;
        let version = u16::from_le_bytes([e[4], e[5]]);
        let ty_byte = e[6];
        let body_len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        if version != self.version {
            return Err(HandshakeError::VersionMismatch {
                ours: self.version,
                theirs: version,
            });
        }
        if e[7] != 0 {
            return Err(HandshakeError::Malformed {
                what: "envelope reserved byte",
            });
        }
        let ty = match MsgType::from_u8(ty_byte) {
            Some(MsgType::Refuse) => MsgType::Refuse,
            Some(t) if t == expect.ty => t,
            _ => {
                return Err(HandshakeError::UnexpectedMessage {
                    expected: expect.ty,
                    found: ty_byte,
                })
            }
        };
        let max = if ty == MsgType::Refuse {
            REFUSE_BODY_LEN
        } else {
            expect.max_body
        };
        let body_len = usize::try_from(body_len).unwrap_or(usize::MAX);
        if body_len > max {
            return Err(HandshakeError::TooLarge {
                what: "handshake message body",
                declared: u64::try_from(body_len).unwrap_or(u64::MAX),
                limit: max as u64,
            });
        }
        Ok((ty, body_len))
    }

    fn mac(&self, label: &[u8; 32], tail: &[u8]) -> Option<HmacSha256> {
        let Auth::Psk(key) = &self.auth else {
            return None;
        };
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut m = HmacSha256::new_from_slice(key).ok()?;
        m.update(label);
        m.update(&self.transcript);
        m.update(tail);
        Some(m)
    }

    /// Computes our MAC over `label || transcript || msg[..len - MAC_LEN]` and writes it into the
    /// last `MAC_LEN` bytes of `msg`.
    fn sign(&self, label: &[u8; 32], msg: &mut [u8]) {
        let split = msg.len() - MAC_LEN;
        if let Some(m) = self.mac(label, &msg[..split]) {
            msg[split..].copy_from_slice(&m.finalize().into_bytes());
        }
    }

    /// Verifies the peer's MAC in the last `MAC_LEN` bytes of `msg`, in constant time.
    fn verify(&self, label: &[u8; 32], msg: &[u8]) -> Result<(), HandshakeError> {
        let split = msg
            .len()
            .checked_sub(MAC_LEN)
            .filter(|&s| s >= ENVELOPE_LEN)
            .ok_or(HandshakeError::Malformed {
                what: "message too short for its MAC",
            })?;
        let m = self
            .mac(label, &msg[..split])
            .ok_or(HandshakeError::AuthenticationFailed)?;
        m.verify_slice(&msg[split..])
            .map_err(|_| HandshakeError::AuthenticationFailed)
    }

    /// Maps a received `Refuse` body to the error this side reports.
    fn refused(&self, body: &[u8]) -> HandshakeError {
        let mut r = Rd::new(body);
        let (Ok(code), Ok(_), Ok(value)) = (r.u16(), r.u16(), r.u64()) else {
            return HandshakeError::Malformed {
                what: "refuse body",
            };
        };
        match RefuseCode::from_u16(code) {
            RefuseCode::AuthenticationFailed => HandshakeError::AuthenticationFailed,
            RefuseCode::VersionMismatch => HandshakeError::VersionMismatch {
                ours: self.version,
                theirs: u16::try_from(value).unwrap_or(u16::MAX),
            },
            RefuseCode::AuthModeMismatch => HandshakeError::AuthModeMismatch {
                ours: self.auth.mode(),
                theirs: u8::try_from(value).unwrap_or(u8::MAX),
            },
            RefuseCode::ProtectionMismatch => HandshakeError::ProtectionMismatch {
                ours: self.protection,
                theirs: u8::try_from(value).unwrap_or(u8::MAX),
            },
            code => HandshakeError::Refused { code, value },
        }
    }

    /// Shared feed loop: reassembles messages and hands each complete one to `on_msg` while the
    /// handshake is neither complete nor failed.
    fn feed<S>(
        &mut self,
        state: &mut S,
        input: &[u8],
        expect: impl Fn(&S, &Core) -> Option<Expect>,
        on_msg: impl Fn(&mut S, &mut Core, MsgType, &[u8]) -> Result<(), HandshakeError>,
    ) -> Result<usize, HandshakeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut used = 0;
        while used < input.len() {
            let Some(ex) = expect(state, self) else {
                break; // complete: the rest is not ours
            };
            let (n, msg) = match self.pull(&input[used..], &ex) {
                Ok(v) => v,
                Err(e) => {
                    // A peer of another version may refuse us first: never answer a refusal.
                    if self.rx.len() >= ENVELOPE_LEN && self.rx[6] == MsgType::Refuse as u8 {
                        self.failed = Some(e.clone());
                        return Err(e);
                    }
                    return Err(self.fail(e));
                }
            };
            used += n;
            let Some((ty, msg)) = msg else {
                continue;
            };
            let body = &msg[ENVELOPE_LEN..];
            if ty == MsgType::Refuse {
                let e = self.refused(body);
                self.failed = Some(e.clone());
                return Err(e);
            }
            if let Err(e) = on_msg(state, self, ty, &msg) {
                return Err(self.fail(e));
            }
        }
        Ok(used)
    }
}

fn envelope(version: u16, ty: MsgType, body_len: usize) -> [u8; ENVELOPE_LEN] {
    let mut e = [0u8; ENVELOPE_LEN];
    e[0..4].copy_from_slice(&HANDSHAKE_MAGIC);
    e[4..6].copy_from_slice(&version.to_le_bytes());
    e[6] = ty as u8;
    // Body lengths are bounded by MAX_OFFER_BODY, far below u32::MAX.
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e
}

fn hello_msg(version: u16, ty: MsgType, nonce: &[u8; 32], mode: AuthMode) -> Vec<u8> {
    let mut m = Vec::with_capacity(ENVELOPE_LEN + HELLO_BODY_LEN);
    m.extend_from_slice(&envelope(version, ty, HELLO_BODY_LEN));
    m.extend_from_slice(nonce);
    m.extend_from_slice(&[mode as u8, 0, 0, 0]);
    m
}

/// Parses a `ClientHello` / `ServerChallenge` body: nonce, then checks the auth mode.
fn parse_hello(body: &[u8], ours: AuthMode) -> Result<[u8; 32], HandshakeError> {
    if body.len() != HELLO_BODY_LEN {
        return Err(HandshakeError::Malformed {
            what: "hello body length",
        });
    }
    let mut r = Rd::new(body);
    let nonce = r.arr32()?;
    let mode = r.u8()?;
    if r.take(3)? != [0, 0, 0] {
        return Err(HandshakeError::Malformed {
            what: "hello reserved bytes",
        });
    }
    if mode != ours as u8 {
        return Err(HandshakeError::AuthModeMismatch { ours, theirs: mode });
    }
    Ok(nonce)
}

/// Bounds-checked little-endian reader.
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8]) -> Rd<'a> {
        Rd { b }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.b.len() < n {
            return Err(HandshakeError::Malformed {
                what: "message shorter than its fields",
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, HandshakeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HandshakeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, HandshakeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, HandshakeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn arr16(&mut self) -> Result<[u8; 16], HandshakeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    fn arr32(&mut self) -> Result<[u8; 32], HandshakeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// The fixed negotiated fields shared by `ClientOffer` and `ServerAccept` (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fixed {
    streams: u16,
    device_count: u16,
    codecs: u32,
    max_payload: u32,
    checksum: u8,
    join: u8,
    conn_index: u16,
    session_id: [u8; 16],
    window_bytes: u64,
}

impl Fixed {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.streams.to_le_bytes());
        out.extend_from_slice(&self.device_count.to_le_bytes());
        out.extend_from_slice(&self.codecs.to_le_bytes());
        out.extend_from_slice(&self.max_payload.to_le_bytes());
        out.push(self.checksum);
        out.push(self.join);
        out.extend_from_slice(&self.conn_index.to_le_bytes());
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(&self.window_bytes.to_le_bytes());
    }

    fn read(r: &mut Rd<'_>) -> Result<Fixed, HandshakeError> {
        let f = Fixed {
            streams: r.u16()?,
            device_count: r.u16()?,
            codecs: r.u32()?,
            max_payload: r.u32()?,
            checksum: r.u8()?,
            join: r.u8()?,
            conn_index: r.u16()?,
            session_id: r.arr16()?,
            window_bytes: r.u64()?,
        };
        if FrameProtection::from_u8(f.checksum).is_none() {
            return Err(HandshakeError::Malformed {
                what: "frame protection",
            });
        }
        if f.join > 1 {
            return Err(HandshakeError::Malformed { what: "join flag" });
        }
        if f.join == 0 && f.conn_index != 0 {
            return Err(HandshakeError::Malformed {
                what: "connection index without join",
            });
        }
        if f.streams == 0 {
            return Err(HandshakeError::Malformed {
                what: "zero streams",
            });
        }
        if f.max_payload == 0 {
            return Err(HandshakeError::Malformed {
                what: "zero max payload",
            });
        }
        if f.window_bytes == 0 {
            return Err(HandshakeError::Malformed {
                what: "zero window",
            });
        }
        Ok(f)
    }
}

/// Validates and encodes an offer body (without MAC).
fn encode_offer(
    offer: &Offer,
    join: Option<([u8; 16], u16)>,
    protection: FrameProtection,
) -> Result<Vec<u8>, HandshakeError> {
    let bad = |what| Err(HandshakeError::BadLocalParams { what });
    let Ok(device_count) = u16::try_from(offer.devices.len()) else {
        return bad("more than MAX_DEVICES devices");
    };
    if offer.devices.len() > MAX_DEVICES {
        return bad("more than MAX_DEVICES devices");
    }
    if offer.streams == 0 || offer.max_payload == 0 || offer.window_bytes == 0 {
        return bad("zero streams, max payload or window");
    }
    if offer.codecs & codec_bit(Codec::Raw) == 0 {
        return bad("codecs without Raw");
    }
    if let Some((_, idx)) = join {
        if idx == 0 || idx >= offer.streams {
            return bad("join connection index outside 1..streams");
        }
    }
    let fixed = Fixed {
        streams: offer.streams,
        device_count,
        codecs: offer.codecs,
        max_payload: offer.max_payload,
        checksum: protection as u8,
        join: u8::from(join.is_some()),
        conn_index: join.map_or(0, |j| j.1),
        session_id: join.map_or([0; 16], |j| j.0),
        window_bytes: offer.window_bytes,
    };
    let mut body = Vec::with_capacity(OFFER_FIXED_LEN + offer.devices.len() * DEVICE_FIXED_LEN);
    fixed.write(&mut body);
    for d in &offer.devices {
        let Ok(len) = u16::try_from(d.name.len()) else {
            return bad("device name longer than MAX_DEVICE_NAME");
        };
        if d.name.is_empty() || d.name.len() > MAX_DEVICE_NAME {
            return bad("device name empty or longer than MAX_DEVICE_NAME");
        }
        if !d.decl.is_valid() {
            return bad("device compatibility identifier longer than MAX_COMPAT");
        }
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(d.name.as_bytes());
        body.extend_from_slice(&d.caps.to_le_bytes());
        body.extend_from_slice(&d.state_size_hint.to_le_bytes());
        d.decl.encode(&mut body);
    }
    Ok(body)
}

/// Parses an offer body (without MAC) under `limits`: counts and lengths are checked before any
/// allocation sized by them.
fn parse_offer(body: &[u8], limits: &Limits) -> Result<(Fixed, Vec<DeviceDesc>), HandshakeError> {
    let mut r = Rd::new(body);
    let f = Fixed::read(&mut r)?;
    let max_devices = limits.max_devices.min(MAX_DEVICES);
    let declared = usize::from(f.device_count);
    if declared > max_devices {
        return Err(HandshakeError::TooManyDevices {
            declared,
            limit: max_devices,
        });
    }
    // Each device takes at least DEVICE_FIXED_LEN + 1 bytes: a count the body cannot hold is
    // malformed, and is rejected before the allocation below.
    if declared.saturating_mul(DEVICE_FIXED_LEN + 1) > r.b.len() {
        return Err(HandshakeError::Malformed {
            what: "device count exceeds offer length",
        });
    }
    if f.codecs & codec_bit(Codec::Raw) == 0 {
        return Err(HandshakeError::NoCommonCodec { offered: f.codecs });
    }
    let mut devices = Vec::with_capacity(declared);
    for _ in 0..declared {
        let len = usize::from(r.u16()?);
        if len > MAX_DEVICE_NAME {
            return Err(HandshakeError::TooLarge {
                what: "device name",
                declared: len as u64,
                limit: MAX_DEVICE_NAME as u64,
            });
        }
        if len == 0 {
            return Err(HandshakeError::Malformed {
                what: "empty device name",
            });
        }
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| HandshakeError::Malformed {
                what: "device name not UTF-8",
            })?
            .to_owned();
        let caps = r.u64()?;
        let state_size_hint = r.u64()?;
        let (decl, used) = DeviceDecl::decode(r.b)?;
        r.take(used)?;
        devices.push(DeviceDesc {
            name,
            caps,
            state_size_hint,
            decl,
        });
    }
    if !r.is_empty() {
        return Err(HandshakeError::Malformed {
            what: "trailing bytes after devices",
        });
    }
    Ok((f, devices))
}

/// Parses `ServerAccept`'s declarations (count, then each) up to the end of `r`: `None` for
/// [`UNDECLARED`].
fn parse_declarations(r: &mut Rd<'_>) -> Result<Option<Vec<DeviceDecl>>, HandshakeError> {
    let n = r.u16()?;
    if n == UNDECLARED {
        if !r.is_empty() {
            return Err(HandshakeError::Malformed {
                what: "trailing bytes after the accept",
            });
        }
        return Ok(None);
    }
    let n = usize::from(n);
    if n > MAX_DEVICES || n.saturating_mul(DECL_FIXED_LEN) > r.b.len() {
        return Err(HandshakeError::Malformed {
            what: "declaration count exceeds the accept",
        });
    }
    let mut decls = Vec::with_capacity(n);
    for _ in 0..n {
        let (d, used) = DeviceDecl::decode(r.b)?;
        r.take(used)?;
        decls.push(d);
    }
    if !r.is_empty() {
        return Err(HandshakeError::Malformed {
            what: "trailing bytes after the declarations",
        });
    }
    Ok(Some(decls))
}

/// [`Handshake`] for a role type: both roles are the shared [`Core`] (envelopes, output,
/// transcript, failure) driven by their own side's `expect` / `on_msg` state machine.
macro_rules! impl_handshake {
    ($role:ty) => {
        impl Handshake for $role {
            fn take_output(&mut self) -> Option<Vec<u8>> {
                self.core.take_output()
            }

            fn feed(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
                self.core.feed(
                    &mut self.side,
                    input,
                    |s, c| s.expect(c),
                    |s, c, ty, m| s.on_msg(c, ty, m),
                )
            }

            fn agreed(&self) -> Option<&Agreed> {
                self.core.agreed.as_ref()
            }

            fn is_failed(&self) -> bool {
                self.core.failed.is_some()
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Client.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitChallenge,
    AwaitAccept,
    Done,
}

/// The client (source) side.
#[derive(Debug)]
pub struct ClientHandshake {
    core: Core,
    side: ClientSide,
}

#[derive(Debug)]
struct ClientSide {
    state: ClientState,
    nonce: [u8; 32],
    /// Encoded offer body without MAC (validated at construction).
    offer_body: Vec<u8>,
    offer: Offer,
    join: Option<([u8; 16], u16)>,
    protection: FrameProtection,
}

impl ClientHandshake {
    /// Starts a client: the `ClientHello` is queued for [`Handshake::take_output`]. Invalid local
    /// parameters (empty PSK, an offer outside the protocol's caps) give a client that is already
    /// failed with [`HandshakeError::BadLocalParams`] and has nothing to send.
    pub fn new(params: ClientParams) -> ClientHandshake {
        let p = default_protection(&params.auth);
        ClientHandshake::build(params, PROTOCOL_VERSION, p)
    }

    /// Like [`ClientHandshake::new`], but announces `version` in every envelope. For interop
    /// tests of version refusal; the message layouts stay those of this version.
    pub fn with_version(params: ClientParams, version: u16) -> ClientHandshake {
        let p = default_protection(&params.auth);
        ClientHandshake::build(params, version, p)
    }

    /// Like [`ClientHandshake::new`], with the frame protection given instead of the default for
    /// the auth mode (the transport asks for [`FrameProtection::Crc32c`] inside TLS).
    pub fn with_protection(params: ClientParams, protection: FrameProtection) -> ClientHandshake {
        ClientHandshake::build(params, PROTOCOL_VERSION, protection)
    }

    fn build(params: ClientParams, version: u16, protection: FrameProtection) -> ClientHandshake {
        let ClientParams {
            auth,
            offer,
            join,
            nonce,
        } = params;
        let mut core = Core::new(Role::Client, version, auth, protection);
        let offer_body = match (&core.auth, encode_offer(&offer, join, protection)) {
            (Auth::Psk(k), _) if k.is_empty() => {
                core.fail(HandshakeError::BadLocalParams { what: "empty PSK" });
                Vec::new()
            }
            _ if core.check_protection().is_some() => {
                if let Some(e) = core.check_protection() {
                    core.fail(e);
                }
                Vec::new()
            }
            (_, Err(e)) => {
                core.fail(e);
                Vec::new()
            }
            (_, Ok(b)) => {
                let hello = hello_msg(version, MsgType::ClientHello, &nonce, core.auth.mode());
                core.send(&hello);
                b
            }
        };
        ClientHandshake {
            core,
            side: ClientSide {
                state: ClientState::AwaitChallenge,
                nonce,
                offer_body,
                offer,
                join,
                protection,
            },
        }
    }

    /// The failure, if the handshake failed.
    pub fn error(&self) -> Option<&HandshakeError> {
        self.core.failed.as_ref()
    }
}

impl ClientSide {
    fn expect(&self, core: &Core) -> Option<Expect> {
        match self.state {
            ClientState::AwaitChallenge => Some(Expect {
                ty: MsgType::ServerChallenge,
                max_body: HELLO_BODY_LEN,
            }),
            ClientState::AwaitAccept => Some(Expect {
                ty: MsgType::ServerAccept,
                max_body: ACCEPT_BODY_LEN
                    + 2
                    + self.offer.devices.len().min(MAX_DEVICES) * MAX_DECL_LEN
                    + core.mac_len(),
            }),
            ClientState::Done => None,
        }
    }

    fn on_msg(&mut self, core: &mut Core, ty: MsgType, msg: &[u8]) -> Result<(), HandshakeError> {
        let body = &msg[ENVELOPE_LEN..];
        match (self.state, ty) {
            (ClientState::AwaitChallenge, MsgType::ServerChallenge) => {
                let nonce_s = parse_hello(body, core.auth.mode())?;
                if nonce_s == self.nonce {
                    return Err(HandshakeError::Malformed {
                        what: "server nonce equals client nonce",
                    });
                }
                core.transcript.extend_from_slice(msg);
                let mac_len = core.mac_len();
                let body_len = self.offer_body.len() + mac_len;
                let mut m = Vec::with_capacity(ENVELOPE_LEN + body_len);
                m.extend_from_slice(&envelope(core.version, MsgType::ClientOffer, body_len));
                m.extend_from_slice(&self.offer_body);
                m.resize(ENVELOPE_LEN + body_len, 0);
                if mac_len > 0 {
                    core.sign(CLIENT_MAC_LABEL, &mut m);
                }
                core.send(&m);
                self.state = ClientState::AwaitAccept;
                Ok(())
            }
            (ClientState::AwaitAccept, MsgType::ServerAccept) => {
                if body.len() < ACCEPT_BODY_LEN + 2 + core.mac_len() {
                    return Err(HandshakeError::Malformed {
                        what: "accept body length",
                    });
                }
                if core.mac_len() > 0 {
                    core.verify(SERVER_MAC_LABEL, msg)?;
                }
                let mut r = Rd::new(&body[..body.len() - core.mac_len()]);
                let a = Fixed::read(&mut r)?;
                self.check_accept(&a)?;
                let theirs = parse_declarations(&mut r)?;
                if let Some(theirs) = theirs {
                    let ours: Vec<DeviceDecl> =
                        self.offer.devices.iter().map(|d| d.decl.clone()).collect();
                    check_devices(&ours, &theirs)?;
                }
                core.transcript.extend_from_slice(msg);
                core.agreed = Some(Agreed {
                    session_id: a.session_id,
                    conn_index: a.conn_index,
                    joined: a.join == 1,
                    streams: a.streams,
                    codecs: a.codecs,
                    max_payload: a.max_payload,
                    window_bytes: a.window_bytes,
                    devices: self.offer.devices.clone(),
                    authenticated: core.mac_len() > 0,
                    protection: core.protection,
                    keys: core.keys(),
                });
                self.state = ClientState::Done;
                Ok(())
            }
            _ => Err(HandshakeError::UnexpectedMessage {
                expected: MsgType::ServerChallenge,
                found: ty as u8,
            }),
        }
    }

    /// The server may only narrow what the client offered.
    fn check_accept(&self, a: &Fixed) -> Result<(), HandshakeError> {
        let o = &self.offer;
        let bad = |what| Err(HandshakeError::Malformed { what });
        if a.streams > o.streams {
            return bad("accepted streams above offer");
        }
        if a.codecs & !o.codecs != 0 || a.codecs & codec_bit(Codec::Raw) == 0 {
            return bad("accepted codecs not a subset of the offer with Raw");
        }
        if a.max_payload > o.max_payload || a.max_payload > MAX_PAYLOAD {
            return bad("accepted max payload above offer");
        }
        if a.window_bytes > o.window_bytes {
            return bad("accepted window above offer");
        }
        if usize::from(a.device_count) != o.devices.len() {
            return bad("accepted device count differs from offer");
        }
        if a.checksum != self.protection as u8 {
            return bad("accepted frame protection differs from offer");
        }
        match self.join {
            Some((sid, idx)) => {
                if a.join != 1 || a.session_id != sid || a.conn_index != idx {
                    return bad("accept does not echo the join request");
                }
            }
            None => {
                if a.join != 0 {
                    return bad("accept claims a join the client did not ask for");
                }
            }
        }
        Ok(())
    }
}

impl_handshake!(ClientHandshake);

// ---------------------------------------------------------------------------------------------
// Server.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    AwaitHello,
    AwaitOffer,
    Done,
}

/// The server (destination) side.
#[derive(Debug)]
pub struct ServerHandshake {
    core: Core,
    side: ServerSide,
}

#[derive(Debug)]
struct ServerSide {
    state: ServerState,
    limits: Limits,
    session_id: [u8; 16],
    nonce: [u8; 32],
    devices: Option<Vec<DeviceDecl>>,
}

impl ServerHandshake {
    /// Starts a server; it waits for the `ClientHello`. Invalid local parameters (empty PSK, a
    /// zero limit) give a server that is already failed with [`HandshakeError::BadLocalParams`].
    pub fn new(params: ServerParams) -> ServerHandshake {
        let p = default_protection(&params.auth);
        ServerHandshake::build(params, PROTOCOL_VERSION, p)
    }

    /// Like [`ServerHandshake::new`], but announces `version`. For interop tests.
    pub fn with_version(params: ServerParams, version: u16) -> ServerHandshake {
        let p = default_protection(&params.auth);
        ServerHandshake::build(params, version, p)
    }

    /// Like [`ServerHandshake::new`], requiring `protection` of the client instead of the
    /// default for the auth mode (the transport requires [`FrameProtection::Crc32c`] inside TLS).
    pub fn with_protection(params: ServerParams, protection: FrameProtection) -> ServerHandshake {
        ServerHandshake::build(params, PROTOCOL_VERSION, protection)
    }

    fn build(params: ServerParams, version: u16, protection: FrameProtection) -> ServerHandshake {
        let ServerParams {
            auth,
            limits,
            session_id,
            nonce,
            devices,
        } = params;
        let mut core = Core::new(Role::Server, version, auth, protection);
        let l = &limits;
        if matches!(&core.auth, Auth::Psk(k) if k.is_empty()) {
            core.fail(HandshakeError::BadLocalParams { what: "empty PSK" });
        } else if let Some(e) = core.check_protection() {
            core.fail(e);
        } else if l.max_streams == 0
            || l.max_devices == 0
            || l.max_payload == 0
            || l.max_window_bytes == 0
        {
            core.fail(HandshakeError::BadLocalParams { what: "zero limit" });
        } else if devices
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DEVICES || d.iter().any(|d| !d.is_valid()))
        {
            core.fail(HandshakeError::BadLocalParams {
                what: "declared devices above MAX_DEVICES or MAX_COMPAT",
            });
        }
        ServerHandshake {
            core,
            side: ServerSide {
                state: ServerState::AwaitHello,
                limits,
                session_id,
                nonce,
                devices,
            },
        }
    }

    /// The failure, if the handshake failed.
    pub fn error(&self) -> Option<&HandshakeError> {
        self.core.failed.as_ref()
    }
}

impl ServerSide {
    fn max_offer_body(&self, core: &Core) -> usize {
        let devices = self.limits.max_devices.min(MAX_DEVICES);
        OFFER_FIXED_LEN
            + devices * (DEVICE_FIXED_LEN + MAX_DEVICE_NAME + crate::declare::MAX_COMPAT)
            + core.mac_len()
    }

    fn expect(&self, core: &Core) -> Option<Expect> {
        match self.state {
            ServerState::AwaitHello => Some(Expect {
                ty: MsgType::ClientHello,
                max_body: HELLO_BODY_LEN,
            }),
            ServerState::AwaitOffer => Some(Expect {
                ty: MsgType::ClientOffer,
                max_body: self.max_offer_body(core),
            }),
            ServerState::Done => None,
        }
    }

    fn on_msg(&mut self, core: &mut Core, ty: MsgType, msg: &[u8]) -> Result<(), HandshakeError> {
        let body = &msg[ENVELOPE_LEN..];
        match (self.state, ty) {
            (ServerState::AwaitHello, MsgType::ClientHello) => {
                let nonce_c = parse_hello(body, core.auth.mode())?;
                if nonce_c == self.nonce {
                    return Err(HandshakeError::Malformed {
                        what: "client nonce equals server nonce",
                    });
                }
                core.transcript.extend_from_slice(msg);
                let challenge = hello_msg(
                    core.version,
                    MsgType::ServerChallenge,
                    &self.nonce,
                    core.auth.mode(),
                );
                core.send(&challenge);
                self.state = ServerState::AwaitOffer;
                Ok(())
            }
            (ServerState::AwaitOffer, MsgType::ClientOffer) => {
                // Authenticate before parsing: an unauthenticated client learns nothing about
                // our limits or parser.
                let mac_len = core.mac_len();
                if mac_len > 0 {
                    core.verify(CLIENT_MAC_LABEL, msg)?;
                }
                let offer_body = &body[..body.len() - mac_len];
                let (f, devices) = parse_offer(offer_body, &self.limits)?;
                if f.checksum != core.protection as u8 {
                    return Err(HandshakeError::ProtectionMismatch {
                        ours: core.protection,
                        theirs: f.checksum,
                    });
                }
                let streams = f.streams.min(self.limits.max_streams);
                let (session_id, conn_index) = if f.join == 1 {
                    if f.conn_index == 0 || f.conn_index >= streams {
                        return Err(HandshakeError::BadJoinIndex {
                            index: f.conn_index,
                            streams,
                        });
                    }
                    (f.session_id, f.conn_index)
                } else {
                    (self.session_id, 0)
                };
                let window_bytes = f.window_bytes.min(self.limits.max_window_bytes);
                let max_payload = f
                    .max_payload
                    .min(self.limits.max_payload)
                    .min(MAX_PAYLOAD)
                    .min(u32::try_from(window_bytes).unwrap_or(u32::MAX));
                let codecs = f.codecs & KNOWN_CODECS;
                let a = Fixed {
                    streams,
                    device_count: f.device_count,
                    codecs,
                    max_payload,
                    checksum: core.protection as u8,
                    join: f.join,
                    conn_index,
                    session_id,
                    window_bytes,
                };
                core.transcript.extend_from_slice(msg);
                let mut decls = Vec::new();
                match &self.devices {
                    None => decls.extend_from_slice(&UNDECLARED.to_le_bytes()),
                    Some(d) => {
                        // At most MAX_DEVICES (checked at construction).
                        let n = u16::try_from(d.len()).unwrap_or(UNDECLARED);
                        decls.extend_from_slice(&n.to_le_bytes());
                        for decl in d {
                            decl.encode(&mut decls);
                        }
                    }
                }
                let body_len = ACCEPT_BODY_LEN + decls.len() + mac_len;
                let mut m = Vec::with_capacity(ENVELOPE_LEN + body_len);
                m.extend_from_slice(&envelope(core.version, MsgType::ServerAccept, body_len));
                a.write(&mut m);
                m.extend_from_slice(&decls);
                m.resize(ENVELOPE_LEN + body_len, 0);
                if mac_len > 0 {
                    core.sign(SERVER_MAC_LABEL, &mut m);
                }
                core.send(&m);
                // The client learns our declarations from the accept and stops by itself on a
                // mismatch; so do we, before anything is agreed.
                if let Some(ours) = &self.devices {
                    let theirs: Vec<DeviceDecl> = devices.iter().map(|d| d.decl.clone()).collect();
                    check_devices(&theirs, ours)?;
                }
                core.agreed = Some(Agreed {
                    session_id,
                    conn_index,
                    joined: f.join == 1,
                    streams,
                    codecs,
                    max_payload,
                    window_bytes,
                    devices,
                    authenticated: mac_len > 0,
                    protection: core.protection,
                    keys: core.keys(),
                });
                self.state = ServerState::Done;
                Ok(())
            }
            _ => Err(HandshakeError::UnexpectedMessage {
                expected: MsgType::ClientHello,
                found: ty as u8,
            }),
        }
    }
}

impl_handshake!(ServerHandshake);
