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
//!
//! Inside: `msgs` holds the message encodings (envelope, hello, offer, accept, refuse) and the
//! typed received messages; `common` the machinery both roles share (reassembly, transcript,
//! MACs, failure); `client` and `server` each role's states, one type per state, each taking only
//! its one message type (as rustls's `client/hs.rs` does); `error` the typed failures and the
//! refusals they map to.

mod client;
mod common;
mod error;
mod msgs;
mod server;

pub use client::ClientHandshake;
pub use error::HandshakeError;
pub use msgs::{AuthMode, MsgType, RefuseCode};
pub use server::ServerHandshake;

use crate::declare::{DeviceDecl, DECL_FIXED_LEN, MAX_DECL_LEN};
use crate::frame::{Codec, MAX_PAYLOAD};
use crate::seal::{FrameProtection, SessionKeys};

/// The protocol version this crate speaks (envelope bytes 4..6 of every handshake message).
pub const PROTOCOL_VERSION: u16 = 4;
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
pub const CHECKSUM_CRC32C: u8 = FrameProtection::Crc32c.code();

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
    1u32 << codec.code()
}

/// All codecs this implementation knows (docs/PROTOCOL.md, section 6). A peer that knows fewer
/// drops the other bits from its answer, so a sender never uses a codec its receiver lacks.
pub const KNOWN_CODECS: u32 = 0b111_1111;

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
    pub(crate) fn mode(&self) -> AuthMode {
        match self {
            Auth::None => AuthMode::None,
            Auth::Psk(_) => AuthMode::Psk,
        }
    }
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

/// Both roles are driven alike: `common` holds the machinery, `state` the role's current state.
macro_rules! handshake_by_common {
    ($($role:ty),+) => {$(
        impl Handshake for $role {
            fn take_output(&mut self) -> Option<Vec<u8>> {
                self.common.take_output()
            }

            fn feed(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
                self.common.feed(&mut self.state, input)
            }

            fn agreed(&self) -> Option<&Agreed> {
                self.common.agreed()
            }

            fn is_failed(&self) -> bool {
                self.common.error().is_some()
            }
        }
    )+};
}

handshake_by_common!(ClientHandshake, ServerHandshake);
