//! Handshake message encodings (docs/PROTOCOL.md, sections 2.1 to 2.7): the envelope, the hello
//! and challenge, the negotiated terms shared by offer and accept, the offer's devices, the
//! accept's declarations and the refusal; and [`Msg`], a received message typed by its message
//! type, which is what a state of either side takes.

use std::marker::PhantomData;

use super::{
    codec_bit, DeviceDesc, HandshakeError, Limits, Offer, ACCEPT_BODY_LEN, DEVICE_FIXED_LEN,
    ENVELOPE_LEN, HANDSHAKE_MAGIC, HELLO_BODY_LEN, MAX_DEVICES, MAX_DEVICE_NAME, NONCE_LEN,
    OFFER_FIXED_LEN, REFUSE_BODY_LEN, UNDECLARED,
};
use crate::codec::{Put, Reader, WireCodec};
use crate::declare::{DeviceDecl, DECL_FIXED_LEN};
use crate::frame::Codec;
use crate::seal::FrameProtection;

vfmig_enum::int_enum! {
    /// Handshake message types (envelope byte 6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MsgType: u8 {
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
}

vfmig_enum::int_enum! {
    /// Why a side refused (the `Refuse` message's code, docs/PROTOCOL.md, section 9). Codes
    /// this version does not know are [`RefuseCode::Unknown`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum RefuseCode: u16 {
        /// Protocol versions differ. Value: the refuser's version.
        VersionMismatch = 1,
        /// Auth modes differ. Value: the refuser's mode.
        AuthModeMismatch = 2,
        /// The peer's MAC did not verify. Value: 0.
        AuthenticationFailed = 3,
        /// A declared length is above a limit. Value: the limit.
        TooLarge = 4,
        /// Too many devices. Value: the limit.
        TooManyDevices = 5,
        /// A message could not be parsed. Value: 0.
        Malformed = 6,
        /// The offer lacks `Codec::Raw`. Value: 0.
        NoCommonCodec = 7,
        /// A message arrived out of order. Value: the type byte received.
        UnexpectedMessage = 8,
        /// A join asked for a connection index outside the session. Value: the agreed streams.
        BadJoinIndex = 9,
        /// The offer asks for another frame protection. Value: the refuser's protection byte.
        ProtectionMismatch = 10,
    }
    unknown Unknown;
}

vfmig_enum::int_enum! {
    /// Authentication mode as it appears on the wire.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum AuthMode: u8 {
        /// No authentication.
        None = 0 => "none",
        /// Pre-shared key.
        Psk = 1 => "PSK",
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope.

/// The 12-byte envelope before every message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Envelope {
    /// `VMHS`.
    pub(super) magic: [u8; 4],
    /// The sender's protocol version.
    pub(super) version: u16,
    /// The message type byte (unchecked).
    pub(super) ty: u8,
    /// Reserved, 0.
    pub(super) reserved: u8,
    /// Bytes of body after the envelope.
    pub(super) body_len: u32,
}

impl Envelope {
    /// The envelope of a message of type `ty` with `body_len` bytes of body.
    pub(super) fn new(version: u16, ty: MsgType, body_len: usize) -> Envelope {
        Envelope {
            magic: HANDSHAKE_MAGIC,
            version,
            ty: ty.code(),
            reserved: 0,
            // Body lengths are bounded by MAX_OFFER_BODY, far below u32::MAX.
            body_len: u32::try_from(body_len).unwrap_or(u32::MAX),
        }
    }

    /// The envelope at the start of `msg`, if its bytes are all there.
    pub(super) fn peek(msg: &[u8]) -> Option<Envelope> {
        Envelope::read(&mut Reader::new(msg)).ok()
    }
}

impl WireCodec for Envelope {
    type Error = HandshakeError;

    fn encode<P: Put + ?Sized>(&self, out: &mut P) {
        out.put(&self.magic);
        out.put_u16(self.version);
        out.put_u8(self.ty);
        out.put_u8(self.reserved);
        out.put_u32(self.body_len);
    }

    fn read(r: &mut Reader<'_>) -> Result<Envelope, HandshakeError> {
        Ok(Envelope {
            magic: r.array()?,
            version: r.u16()?,
            ty: r.u8()?,
            reserved: r.u8()?,
            body_len: r.u32()?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Typed received messages.

/// A message type, as a type: what a state takes.
pub(super) trait Kind {
    /// The envelope's type.
    const TYPE: MsgType;
}

/// Message types as types (never values).
pub(super) mod kind {
    use super::{Kind, MsgType};

    /// `ClientHello`.
    #[derive(Debug)]
    pub(in crate::handshake) enum ClientHello {}
    /// `ServerChallenge`.
    #[derive(Debug)]
    pub(in crate::handshake) enum ServerChallenge {}
    /// `ClientOffer`.
    #[derive(Debug)]
    pub(in crate::handshake) enum ClientOffer {}
    /// `ServerAccept`.
    #[derive(Debug)]
    pub(in crate::handshake) enum ServerAccept {}

    impl Kind for ClientHello {
        const TYPE: MsgType = MsgType::ClientHello;
    }
    impl Kind for ServerChallenge {
        const TYPE: MsgType = MsgType::ServerChallenge;
    }
    impl Kind for ClientOffer {
        const TYPE: MsgType = MsgType::ClientOffer;
    }
    impl Kind for ServerAccept {
        const TYPE: MsgType = MsgType::ServerAccept;
    }
}

/// Kinds laid out as a hello (`ClientHello`, `ServerChallenge`).
pub(super) trait HelloKind: Kind {}
impl HelloKind for kind::ClientHello {}
impl HelloKind for kind::ServerChallenge {}

/// A complete received message of kind `K`: its bytes, envelope included (the transcript and
/// the MACs cover them). Only [`Msg::new`] makes one, from a message whose envelope says `K`.
#[derive(Debug)]
pub(super) struct Msg<'a, K> {
    bytes: &'a [u8],
    kind: PhantomData<K>,
}

impl<'a, K: Kind> Msg<'a, K> {
    /// `bytes` as a `K`, if its type is `K`'s.
    pub(super) fn new(ty: MsgType, bytes: &'a [u8]) -> Option<Msg<'a, K>> {
        (ty == K::TYPE).then_some(Msg {
            bytes,
            kind: PhantomData,
        })
    }

    /// The whole message, envelope included.
    pub(super) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The body.
    pub(super) fn body(&self) -> &'a [u8] {
        self.bytes.get(ENVELOPE_LEN..).unwrap_or_default()
    }

    /// The body without its trailing MAC of `mac_len` bytes (`ClientOffer`, `ServerAccept`; the
    /// caller checked the body holds one).
    pub(super) fn unsigned_body(&self, mac_len: usize) -> &'a [u8] {
        let body = self.body();
        body.get(..body.len().saturating_sub(mac_len))
            .unwrap_or_default()
    }
}

impl<K: HelloKind> Msg<'_, K> {
    /// The hello's nonce and auth mode byte (the mode is the caller's to compare).
    pub(super) fn hello(&self) -> Result<Hello, HandshakeError> {
        Hello::parse(self.body())
    }
}

// ---------------------------------------------------------------------------------------------
// Hello and challenge.

/// `ClientHello` / `ServerChallenge` body: nonce, auth mode, 3 reserved bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) nonce: [u8; NONCE_LEN],
    /// The auth mode byte, unchecked.
    pub(super) mode: u8,
}

impl Hello {
    /// The whole message (envelope and body) of type `ty`.
    pub(super) fn message(&self, version: u16, ty: MsgType) -> Vec<u8> {
        let mut m = Vec::with_capacity(ENVELOPE_LEN + HELLO_BODY_LEN);
        Envelope::new(version, ty, HELLO_BODY_LEN).encode(&mut m);
        m.put(&self.nonce);
        m.put_u8(self.mode);
        m.put(&[0, 0, 0]);
        m
    }

    fn parse(body: &[u8]) -> Result<Hello, HandshakeError> {
        if body.len() != HELLO_BODY_LEN {
            return Err(HandshakeError::Malformed {
                what: "hello body length",
            });
        }
        let mut r = Reader::new(body);
        let nonce = r.array()?;
        let mode = r.u8()?;
        if r.take(3)? != [0, 0, 0] {
            return Err(HandshakeError::Malformed {
                what: "hello reserved bytes",
            });
        }
        Ok(Hello { nonce, mode })
    }
}

// ---------------------------------------------------------------------------------------------
// Offer and accept.

/// The fixed negotiated fields shared by `ClientOffer` and `ServerAccept` (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Terms {
    pub(super) streams: u16,
    pub(super) device_count: u16,
    pub(super) codecs: u32,
    pub(super) max_payload: u32,
    /// The frame protection byte (checked to be known).
    pub(super) checksum: u8,
    pub(super) join: u8,
    pub(super) conn_index: u16,
    pub(super) session_id: [u8; 16],
    pub(super) window_bytes: u64,
}

const _: () = assert!(2 + 2 + 4 + 4 + 1 + 1 + 2 + 16 + 8 == OFFER_FIXED_LEN);
const _: () = assert!(OFFER_FIXED_LEN == ACCEPT_BODY_LEN);

impl WireCodec for Terms {
    type Error = HandshakeError;

    fn encode<P: Put + ?Sized>(&self, out: &mut P) {
        out.put_u16(self.streams);
        out.put_u16(self.device_count);
        out.put_u32(self.codecs);
        out.put_u32(self.max_payload);
        out.put_u8(self.checksum);
        out.put_u8(self.join);
        out.put_u16(self.conn_index);
        out.put(&self.session_id);
        out.put_u64(self.window_bytes);
    }

    fn read(r: &mut Reader<'_>) -> Result<Terms, HandshakeError> {
        let t = Terms {
            streams: r.u16()?,
            device_count: r.u16()?,
            codecs: r.u32()?,
            max_payload: r.u32()?,
            checksum: r.u8()?,
            join: r.u8()?,
            conn_index: r.u16()?,
            session_id: r.array()?,
            window_bytes: r.u64()?,
        };
        let bad = |what| Err(HandshakeError::Malformed { what });
        if FrameProtection::from_code(t.checksum).is_none() {
            return bad("frame protection");
        }
        if t.join > 1 {
            return bad("join flag");
        }
        if t.join == 0 && t.conn_index != 0 {
            return bad("connection index without join");
        }
        if t.streams == 0 {
            return bad("zero streams");
        }
        if t.max_payload == 0 {
            return bad("zero max payload");
        }
        if t.window_bytes == 0 {
            return bad("zero window");
        }
        Ok(t)
    }
}

/// Validates and encodes an offer body (without MAC).
pub(super) fn encode_offer(
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
    let terms = Terms {
        streams: offer.streams,
        device_count,
        codecs: offer.codecs,
        max_payload: offer.max_payload,
        checksum: protection.code(),
        join: u8::from(join.is_some()),
        conn_index: join.map_or(0, |j| j.1),
        session_id: join.map_or([0; 16], |j| j.0),
        window_bytes: offer.window_bytes,
    };
    let mut body = Vec::with_capacity(OFFER_FIXED_LEN + offer.devices.len() * DEVICE_FIXED_LEN);
    terms.encode(&mut body);
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
        body.put_u16(len);
        body.put(d.name.as_bytes());
        body.put_u64(d.caps);
        body.put_u64(d.state_size_hint);
        d.decl.encode(&mut body);
    }
    Ok(body)
}

/// Parses an offer body (without MAC) under `limits`: counts and lengths are checked before any
/// allocation sized by them.
pub(super) fn parse_offer(
    body: &[u8],
    limits: &Limits,
) -> Result<(Terms, Vec<DeviceDesc>), HandshakeError> {
    let mut r = Reader::new(body);
    let t = r.read::<Terms>()?;
    let max_devices = limits.max_devices.min(MAX_DEVICES);
    let declared = usize::from(t.device_count);
    if declared > max_devices {
        return Err(HandshakeError::TooManyDevices {
            declared,
            limit: max_devices,
        });
    }
    // Each device takes at least DEVICE_FIXED_LEN + 1 bytes: a count the body cannot hold is
    // malformed, and is rejected before the allocation below.
    if declared.saturating_mul(DEVICE_FIXED_LEN + 1) > r.left() {
        return Err(HandshakeError::Malformed {
            what: "device count exceeds offer length",
        });
    }
    if t.codecs & codec_bit(Codec::Raw) == 0 {
        return Err(HandshakeError::NoCommonCodec { offered: t.codecs });
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
        let decl = r.read::<DeviceDecl>()?;
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
    Ok((t, devices))
}

/// Appends `ServerAccept`'s declarations: the count ([`UNDECLARED`] for `None`), then each.
pub(super) fn encode_declarations(decls: Option<&[DeviceDecl]>, out: &mut Vec<u8>) {
    match decls {
        None => out.put_u16(UNDECLARED),
        Some(d) => {
            // At most MAX_DEVICES (checked at construction).
            out.put_u16(u16::try_from(d.len()).unwrap_or(UNDECLARED));
            for decl in d {
                decl.encode(out);
            }
        }
    }
}

/// Parses `ServerAccept`'s declarations (count, then each) up to the end of `r`, which is
/// past the terms: `None` for [`UNDECLARED`].
pub(super) fn parse_declarations(
    r: &mut Reader<'_>,
) -> Result<Option<Vec<DeviceDecl>>, HandshakeError> {
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
    if n > MAX_DEVICES || n.saturating_mul(DECL_FIXED_LEN) > r.left() {
        return Err(HandshakeError::Malformed {
            what: "declaration count exceeds the accept",
        });
    }
    let mut decls = Vec::with_capacity(n);
    for _ in 0..n {
        decls.push(r.read::<DeviceDecl>()?);
    }
    if !r.is_empty() {
        return Err(HandshakeError::Malformed {
            what: "trailing bytes after the declarations",
        });
    }
    Ok(Some(decls))
}

// ---------------------------------------------------------------------------------------------
// Refuse.

/// A `Refuse` body: code, 2 reserved bytes (ignored on receipt), value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Refuse {
    pub(super) code: RefuseCode,
    pub(super) value: u64,
}

impl Refuse {
    /// The whole message.
    pub(super) fn message(&self, version: u16) -> Vec<u8> {
        let mut m = Vec::with_capacity(ENVELOPE_LEN + REFUSE_BODY_LEN);
        Envelope::new(version, MsgType::Refuse, REFUSE_BODY_LEN).encode(&mut m);
        self.encode(&mut m);
        m
    }

    /// Parses a received body.
    pub(super) fn parse(body: &[u8]) -> Result<Refuse, HandshakeError> {
        Refuse::read(&mut Reader::new(body)).map_err(|_| HandshakeError::Malformed {
            what: "refuse body",
        })
    }
}

impl WireCodec for Refuse {
    type Error = HandshakeError;

    fn encode<P: Put + ?Sized>(&self, out: &mut P) {
        out.put_u16(self.code.code());
        out.put_u16(0);
        out.put_u64(self.value);
    }

    fn read(r: &mut Reader<'_>) -> Result<Refuse, HandshakeError> {
        let code = RefuseCode::from_code(r.u16()?);
        let _reserved = r.u16()?;
        let value = r.u64()?;
        Ok(Refuse { code, value })
    }
}
