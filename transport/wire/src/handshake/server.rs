//! The server (destination) side: two states, each a type taking its one message:
//! [`ExpectHello`] (`ClientHello`: send the challenge) and [`ExpectOffer`] (`ClientOffer`:
//! verify, parse under the limits, answer with the accept, agree).

use super::common::{Common, Stage, State};
use super::msgs::{encode_declarations, kind, parse_offer, Hello, Msg, MsgType, Terms};
use super::{
    default_protection, Agreed, HandshakeError, Limits, ServerParams, ACCEPT_BODY_LEN,
    CLIENT_MAC_LABEL, DEVICE_FIXED_LEN, HELLO_BODY_LEN, KNOWN_CODECS, MAX_DEVICES, MAX_DEVICE_NAME,
    OFFER_FIXED_LEN, PROTOCOL_VERSION, SERVER_MAC_LABEL,
};
use crate::codec::WireCodec;
use crate::declare::{check_devices, DeviceDecl, MAX_COMPAT};
use crate::frame::MAX_PAYLOAD;
use crate::seal::FrameProtection;

/// The server (destination) side.
#[derive(Debug)]
pub struct ServerHandshake {
    pub(super) common: Common,
    pub(super) state: ServerState,
}

/// Where the server is: waiting for `ClientHello`, then for `ClientOffer`.
pub(super) type ServerState = Stage<ExpectHello, ExpectOffer>;

/// What the server brings to every state.
#[derive(Debug)]
pub(super) struct Local {
    limits: Limits,
    /// Session id assigned when the client does not join.
    session_id: [u8; 16],
    /// Our declarations, or `None`.
    devices: Option<Vec<DeviceDecl>>,
}

/// Waits for `ClientHello`.
#[derive(Debug)]
pub(super) struct ExpectHello {
    nonce: [u8; 32],
    local: Local,
}

/// `ServerChallenge` sent; waits for `ClientOffer`.
#[derive(Debug)]
pub(super) struct ExpectOffer {
    local: Local,
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
        let mut common = Common::new(version, auth, protection);
        let l = &limits;
        let checked = common.check_local().and_then(|()| {
            if l.max_streams == 0
                || l.max_devices == 0
                || l.max_payload == 0
                || l.max_window_bytes == 0
            {
                Err(HandshakeError::BadLocalParams { what: "zero limit" })
            } else if devices
                .as_ref()
                .is_some_and(|d| d.len() > MAX_DEVICES || d.iter().any(|d| !d.is_valid()))
            {
                Err(HandshakeError::BadLocalParams {
                    what: "declared devices above MAX_DEVICES or MAX_COMPAT",
                })
            } else {
                Ok(())
            }
        });
        let state = match checked {
            Err(e) => {
                common.fail(e);
                Stage::Done
            }
            Ok(()) => Stage::First(ExpectHello {
                nonce,
                local: Local {
                    limits,
                    session_id,
                    devices,
                },
            }),
        };
        ServerHandshake { common, state }
    }

    /// The failure, if the handshake failed.
    pub fn error(&self) -> Option<&HandshakeError> {
        self.common.error()
    }
}

impl State for ExpectHello {
    type Takes = kind::ClientHello;
    type Next = ExpectOffer;

    fn max_body(&self, _: &Common) -> usize {
        HELLO_BODY_LEN
    }

    fn handle(
        self,
        common: &mut Common,
        msg: Msg<'_, kind::ClientHello>,
    ) -> Result<ExpectOffer, HandshakeError> {
        common.take_hello(&msg, &self.nonce, "client nonce equals server nonce")?;
        let challenge = Hello {
            nonce: self.nonce,
            mode: common.auth.mode().code(),
        };
        common.send(&challenge.message(common.version, MsgType::ServerChallenge));
        Ok(ExpectOffer { local: self.local })
    }
}

impl State for ExpectOffer {
    type Takes = kind::ClientOffer;
    type Next = Agreed;

    fn max_body(&self, common: &Common) -> usize {
        let devices = self.local.limits.max_devices.min(MAX_DEVICES);
        OFFER_FIXED_LEN
            + devices * (DEVICE_FIXED_LEN + MAX_DEVICE_NAME + MAX_COMPAT)
            + common.mac_len()
    }

    fn handle(
        self,
        common: &mut Common,
        msg: Msg<'_, kind::ClientOffer>,
    ) -> Result<Agreed, HandshakeError> {
        let Local {
            limits,
            session_id,
            devices: ours,
        } = self.local;
        // Authenticate before parsing: an unauthenticated client learns nothing about our
        // limits or parser.
        let mac_len = common.mac_len();
        if mac_len > 0 {
            common.verify(CLIENT_MAC_LABEL, msg.bytes())?;
        }
        let (f, devices) = parse_offer(msg.unsigned_body(mac_len), &limits)?;
        if f.checksum != common.protection.code() {
            return Err(HandshakeError::ProtectionMismatch {
                ours: common.protection,
                theirs: f.checksum,
            });
        }
        let streams = f.streams.min(limits.max_streams);
        let (session_id, conn_index) = if f.join == 1 {
            if f.conn_index == 0 || f.conn_index >= streams {
                return Err(HandshakeError::BadJoinIndex {
                    index: f.conn_index,
                    streams,
                });
            }
            (f.session_id, f.conn_index)
        } else {
            (session_id, 0)
        };
        let window_bytes = f.window_bytes.min(limits.max_window_bytes);
        let max_payload = f
            .max_payload
            .min(limits.max_payload)
            .min(MAX_PAYLOAD)
            .min(u32::try_from(window_bytes).unwrap_or(u32::MAX));
        let codecs = f.codecs & KNOWN_CODECS;
        let terms = Terms {
            streams,
            device_count: f.device_count,
            codecs,
            max_payload,
            checksum: common.protection.code(),
            join: f.join,
            conn_index,
            session_id,
            window_bytes,
        };
        common.record(msg.bytes());
        let mut body = Vec::with_capacity(ACCEPT_BODY_LEN + 2);
        terms.encode(&mut body);
        encode_declarations(ours.as_deref(), &mut body);
        common.send_signed(MsgType::ServerAccept, SERVER_MAC_LABEL, &body);
        // The client learns our declarations from the accept and stops by itself on a mismatch;
        // so do we, before anything is agreed.
        if let Some(ours) = &ours {
            let theirs: Vec<DeviceDecl> = devices.iter().map(|d| d.decl.clone()).collect();
            check_devices(&theirs, ours)?;
        }
        Ok(common.agreement(&terms, devices))
    }
}
