//! What both roles share: message reassembly under the state's caps, the output queue, the
//! transcript, MACs, key derivation and the sticky failure; the [`State`] / [`Side`] traits
//! through which a role's states take messages; and [`Stage`], the two-state shape of a role.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::msgs::{Envelope, HelloKind, Kind, Msg, MsgType, Refuse, Terms};
use super::{
    Agreed, Auth, DeviceDesc, HandshakeError, ENVELOPE_LEN, HANDSHAKE_MAGIC, MAC_LEN,
    REFUSE_BODY_LEN,
};
use crate::codec::WireCodec;
use crate::seal::{FrameProtection, SessionKeys};

type HmacSha256 = Hmac<Sha256>;

/// One state of a role, as a type: it takes exactly one message type and becomes `Next`. A
/// message of another type cannot reach it: [`step`] makes the typed [`Msg`] it takes only
/// from a message of its type.
pub(super) trait State: Sized {
    /// The message type this state takes.
    type Takes: Kind;
    /// What the state becomes.
    type Next;

    /// The largest body this state accepts for its message (checked from the envelope, before
    /// any body byte is buffered).
    fn max_body(&self, common: &Common) -> usize;

    /// Handles the message.
    fn handle(
        self,
        common: &mut Common,
        msg: Msg<'_, Self::Takes>,
    ) -> Result<Self::Next, HandshakeError>;
}

/// What a role's current state waits for: the type and the largest body.
#[derive(Clone, Copy, Debug)]
pub(super) struct Expect {
    pub(super) ty: MsgType,
    pub(super) max_body: usize,
}

impl Expect {
    /// What `state` waits for.
    pub(super) fn of<S: State>(state: &S, common: &Common) -> Expect {
        Expect {
            ty: S::Takes::TYPE,
            max_body: state.max_body(common),
        }
    }
}

/// Hands a complete message of type `ty` to `state`.
pub(super) fn step<S: State>(
    state: S,
    common: &mut Common,
    ty: MsgType,
    msg: &[u8],
) -> Result<S::Next, HandshakeError> {
    // The envelope check admitted only the expected type (or a Refuse, handled before).
    let msg = Msg::new(ty, msg).ok_or(HandshakeError::UnexpectedMessage {
        expected: S::Takes::TYPE,
        found: ty.code(),
    })?;
    state.handle(common, msg)
}

/// A role: its states, one at a time.
pub(super) trait Side {
    /// What the current state waits for; `None` once the handshake is complete.
    fn expect(&self, common: &Common) -> Option<Expect>;

    /// Hands a complete message of the type [`Side::expect`] asked for to the current state.
    fn handle(
        &mut self,
        common: &mut Common,
        ty: MsgType,
        msg: &[u8],
    ) -> Result<(), HandshakeError>;
}

/// A role's states, the same shape for both: the first state takes its message and becomes the
/// second, whose message completes the handshake. Each state is still its own type taking only
/// its one message ([`State`]); this only says which one is current.
#[derive(Debug)]
pub(super) enum Stage<First, Second> {
    /// Waits for the first message the role takes.
    First(First),
    /// Waits for the message that completes the handshake.
    Second(Second),
    /// Agreed or failed (or invalid local parameters): nothing more is taken.
    Done,
}

impl<A, B> Side for Stage<A, B>
where
    A: State<Next = B>,
    B: State<Next = Agreed>,
{
    fn expect(&self, common: &Common) -> Option<Expect> {
        match self {
            Stage::First(s) => Some(Expect::of(s, common)),
            Stage::Second(s) => Some(Expect::of(s, common)),
            Stage::Done => None,
        }
    }

    fn handle(
        &mut self,
        common: &mut Common,
        ty: MsgType,
        msg: &[u8],
    ) -> Result<(), HandshakeError> {
        *self = match std::mem::replace(self, Stage::Done) {
            Stage::First(s) => Stage::Second(step(s, common, ty, msg)?),
            Stage::Second(s) => {
                let agreed = step(s, common, ty, msg)?;
                common.agree(agreed);
                Stage::Done
            }
            Stage::Done => Stage::Done,
        };
        Ok(())
    }
}

/// State shared by both roles.
pub(super) struct Common {
    pub(super) version: u16,
    pub(super) auth: Auth,
    pub(super) protection: FrameProtection,
    /// The message being reassembled: envelope, then body.
    rx: Vec<u8>,
    /// Type and body length of the message in `rx`, once its envelope is in and validated.
    rx_body: Option<(MsgType, usize)>,
    out: Vec<u8>,
    /// Exact bytes of every message exchanged so far (bounded by the message caps).
    pub(super) transcript: Vec<u8>,
    failed: Option<HandshakeError>,
    agreed: Option<Agreed>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
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

impl Common {
    pub(super) fn new(version: u16, auth: Auth, protection: FrameProtection) -> Common {
        Common {
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

    /// The failure, if the handshake failed.
    pub(super) fn error(&self) -> Option<&HandshakeError> {
        self.failed.as_ref()
    }

    /// The agreement, once complete.
    pub(super) fn agreed(&self) -> Option<&Agreed> {
        self.agreed.as_ref()
    }

    /// Completes the handshake.
    pub(super) fn agree(&mut self, agreed: Agreed) {
        self.agreed = Some(agreed);
    }

    /// The agreement on `terms` (as sent in `ServerAccept`) for `devices`, keyed from the
    /// transcript so far (it must be complete).
    pub(super) fn agreement(&self, terms: &Terms, devices: Vec<DeviceDesc>) -> Agreed {
        Agreed {
            session_id: terms.session_id,
            conn_index: terms.conn_index,
            joined: terms.join == 1,
            streams: terms.streams,
            codecs: terms.codecs,
            max_payload: terms.max_payload,
            window_bytes: terms.window_bytes,
            devices,
            authenticated: self.mac_len() > 0,
            protection: self.protection,
            keys: self.keys(),
        }
    }

    /// Takes the peer's hello (`ClientHello` or `ServerChallenge`): it must name our auth mode
    /// and a nonce other than ours (`same_nonce` says which way round); then it joins the
    /// transcript.
    pub(super) fn take_hello<K: HelloKind>(
        &mut self,
        msg: &Msg<'_, K>,
        our_nonce: &[u8; 32],
        same_nonce: &'static str,
    ) -> Result<(), HandshakeError> {
        let hello = msg.hello()?;
        let ours = self.auth.mode();
        if hello.mode != ours.code() {
            return Err(HandshakeError::AuthModeMismatch {
                ours,
                theirs: hello.mode,
            });
        }
        if hello.nonce == *our_nonce {
            return Err(HandshakeError::Malformed { what: same_nonce });
        }
        self.record(msg.bytes());
        Ok(())
    }

    /// The connection's keys once the transcript is complete (PSK only).
    pub(super) fn keys(&self) -> Option<SessionKeys> {
        match &self.auth {
            Auth::None => None,
            Auth::Psk(k) => Some(SessionKeys::derive(k, &self.transcript)),
        }
    }

    /// Checks the local parameters both roles share: a PSK must not be empty; AES-256-GCM
    /// frame protection needs a PSK.
    pub(super) fn check_local(&self) -> Result<(), HandshakeError> {
        match (&self.auth, self.protection) {
            (Auth::Psk(k), _) if k.is_empty() => {
                Err(HandshakeError::BadLocalParams { what: "empty PSK" })
            }
            (Auth::None, FrameProtection::Aes256Gcm) => Err(HandshakeError::BadLocalParams {
                what: "frame encryption without a PSK",
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn mac_len(&self) -> usize {
        match self.auth {
            Auth::None => 0,
            Auth::Psk(_) => MAC_LEN,
        }
    }

    /// Records `err`, queues a refusal for the peer where one applies, and returns `err`.
    #[cold]
    pub(super) fn fail(&mut self, err: HandshakeError) -> HandshakeError {
        if let Some(refuse) = err.refusal(self.version) {
            self.out.extend_from_slice(&refuse.message(self.version));
        }
        self.failed = Some(err.clone());
        err
    }

    /// Queues a message and appends it to the transcript.
    pub(super) fn send(&mut self, msg: &[u8]) {
        self.out.extend_from_slice(msg);
        self.transcript.extend_from_slice(msg);
    }

    /// Queues a message of type `ty` with `body`, followed with a PSK by our MAC (under `label`)
    /// over the transcript and the message.
    pub(super) fn send_signed(&mut self, ty: MsgType, label: &[u8; 32], body: &[u8]) {
        let mac_len = self.mac_len();
        let body_len = body.len() + mac_len;
        let mut m = Vec::with_capacity(ENVELOPE_LEN + body_len);
        Envelope::new(self.version, ty, body_len).encode(&mut m);
        m.extend_from_slice(body);
        m.resize(ENVELOPE_LEN + body_len, 0);
        if mac_len > 0 {
            self.sign(label, &mut m);
        }
        self.send(&m);
    }

    /// Appends a received message to the transcript.
    pub(super) fn record(&mut self, msg: &[u8]) {
        self.transcript.extend_from_slice(msg);
    }

    pub(super) fn take_output(&mut self) -> Option<Vec<u8>> {
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
        expect: Expect,
    ) -> Result<(usize, Option<Complete>), HandshakeError> {
        let mut used = 0;
        if self.rx_body.is_none() {
            let take = (ENVELOPE_LEN - self.rx.len()).min(input.len());
            self.rx.extend_from_slice(&input[..take]);
            used += take;
            // Check the magic as soon as its bytes arrive, so garbage fails without waiting.
            let m = self.rx.len().min(HANDSHAKE_MAGIC.len());
            if self.rx[..m] != HANDSHAKE_MAGIC[..m] {
                let mut found = [0u8; 4];
                found[..m].copy_from_slice(&self.rx[..m]);
                return Err(HandshakeError::BadMagic { found });
            }
            let Some(envelope) = Envelope::peek(&self.rx) else {
                return Ok((used, None));
            };
            self.rx_body = Some(self.check_envelope(&envelope, expect)?);
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

    /// Validates a complete envelope against what the state expects, before any body byte is
    /// buffered.
    fn check_envelope(
        &self,
        e: &Envelope,
        expect: Expect,
    ) -> Result<(MsgType, usize), HandshakeError> {
        if e.version != self.version {
            return Err(HandshakeError::VersionMismatch {
                ours: self.version,
                theirs: e.version,
            });
        }
        if e.reserved != 0 {
            return Err(HandshakeError::Malformed {
                what: "envelope reserved byte",
            });
        }
        let ty = match MsgType::from_code(e.ty) {
            Some(MsgType::Refuse) => MsgType::Refuse,
            Some(t) if t == expect.ty => t,
            _ => {
                return Err(HandshakeError::UnexpectedMessage {
                    expected: expect.ty,
                    found: e.ty,
                })
            }
        };
        let max = if ty == MsgType::Refuse {
            REFUSE_BODY_LEN
        } else {
            expect.max_body
        };
        let body_len = usize::try_from(e.body_len).unwrap_or(usize::MAX);
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
    pub(super) fn verify(&self, label: &[u8; 32], msg: &[u8]) -> Result<(), HandshakeError> {
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
        match Refuse::parse(body) {
            Ok(r) => r.into_error(self.version, self.auth.mode(), self.protection),
            Err(e) => e,
        }
    }

    /// Reassembles messages and hands each complete one to `side` while the handshake is neither
    /// complete nor failed.
    pub(super) fn feed(
        &mut self,
        side: &mut impl Side,
        input: &[u8],
    ) -> Result<usize, HandshakeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut used = 0;
        while used < input.len() {
            let Some(ex) = side.expect(self) else {
                break; // complete: the rest is not ours
            };
            let (n, msg) = match self.pull(&input[used..], ex) {
                Ok(v) => v,
                Err(e) => {
                    // A peer of another version may refuse us first: never answer a refusal.
                    if Envelope::peek(&self.rx).is_some_and(|e| e.ty == MsgType::Refuse.code()) {
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
            if ty == MsgType::Refuse {
                let e = self.refused(&msg[ENVELOPE_LEN..]);
                self.failed = Some(e.clone());
                return Err(e);
            }
            if let Err(e) = side.handle(self, ty, &msg) {
                return Err(self.fail(e));
            }
        }
        Ok(used)
    }
}
