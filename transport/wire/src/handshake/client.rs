//! The client (source) side: `ClientHello` is sent at construction, then two states, each a
//! type taking its one message: [`ExpectChallenge`] (`ServerChallenge`: send the offer) and
//! [`ExpectAccept`] (`ServerAccept`: verify, check, agree).

use super::common::{Common, Stage, State};
use super::msgs::{encode_offer, kind, parse_declarations, Hello, Msg, MsgType, Terms};
use super::{
    codec_bit, default_protection, Agreed, ClientParams, HandshakeError, Offer, ACCEPT_BODY_LEN,
    CLIENT_MAC_LABEL, HELLO_BODY_LEN, MAX_DEVICES, PROTOCOL_VERSION, SERVER_MAC_LABEL,
};
use crate::codec::Reader;
use crate::declare::{check_devices, DeviceDecl, MAX_DECL_LEN};
use crate::frame::{Codec, MAX_PAYLOAD};
use crate::seal::FrameProtection;

/// The client (source) side.
#[derive(Debug)]
pub struct ClientHandshake {
    pub(super) common: Common,
    pub(super) state: ClientState,
}

/// Where the client is: waiting for `ServerChallenge`, then for `ServerAccept`.
pub(super) type ClientState = Stage<ExpectChallenge, ExpectAccept>;

/// What the client offered, kept to check the accept against.
#[derive(Debug)]
pub(super) struct Offered {
    offer: Offer,
    join: Option<([u8; 16], u16)>,
    protection: FrameProtection,
}

/// `ClientHello` sent; waits for `ServerChallenge`.
#[derive(Debug)]
pub(super) struct ExpectChallenge {
    nonce: [u8; 32],
    /// Encoded offer body without MAC (validated at construction).
    offer_body: Vec<u8>,
    offered: Offered,
}

/// `ClientOffer` sent; waits for `ServerAccept`.
#[derive(Debug)]
pub(super) struct ExpectAccept {
    offered: Offered,
}

impl ClientHandshake {
    /// Starts a client: the `ClientHello` is queued for [`super::Handshake::take_output`].
    /// Invalid local parameters (empty PSK, an offer outside the protocol's caps) give a client
    /// that is already failed with [`HandshakeError::BadLocalParams`] and has nothing to send.
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
        let mut common = Common::new(version, auth, protection);
        let offer_body = common
            .check_local()
            .and_then(|()| encode_offer(&offer, join, protection));
        let state = match offer_body {
            Err(e) => {
                common.fail(e);
                Stage::Done
            }
            Ok(offer_body) => {
                let hello = Hello {
                    nonce,
                    mode: common.auth.mode().code(),
                };
                common.send(&hello.message(version, MsgType::ClientHello));
                Stage::First(ExpectChallenge {
                    nonce,
                    offer_body,
                    offered: Offered {
                        offer,
                        join,
                        protection,
                    },
                })
            }
        };
        ClientHandshake { common, state }
    }

    /// The failure, if the handshake failed.
    pub fn error(&self) -> Option<&HandshakeError> {
        self.common.error()
    }
}

impl State for ExpectChallenge {
    type Takes = kind::ServerChallenge;
    type Next = ExpectAccept;

    fn max_body(&self, _: &Common) -> usize {
        HELLO_BODY_LEN
    }

    fn handle(
        self,
        common: &mut Common,
        msg: Msg<'_, kind::ServerChallenge>,
    ) -> Result<ExpectAccept, HandshakeError> {
        common.take_hello(&msg, &self.nonce, "server nonce equals client nonce")?;
        common.send_signed(MsgType::ClientOffer, CLIENT_MAC_LABEL, &self.offer_body);
        Ok(ExpectAccept {
            offered: self.offered,
        })
    }
}

impl State for ExpectAccept {
    type Takes = kind::ServerAccept;
    type Next = Agreed;

    fn max_body(&self, common: &Common) -> usize {
        ACCEPT_BODY_LEN
            + 2
            + self.offered.offer.devices.len().min(MAX_DEVICES) * MAX_DECL_LEN
            + common.mac_len()
    }

    fn handle(
        self,
        common: &mut Common,
        msg: Msg<'_, kind::ServerAccept>,
    ) -> Result<Agreed, HandshakeError> {
        let mac_len = common.mac_len();
        if msg.body().len() < ACCEPT_BODY_LEN + 2 + mac_len {
            return Err(HandshakeError::Malformed {
                what: "accept body length",
            });
        }
        if mac_len > 0 {
            common.verify(SERVER_MAC_LABEL, msg.bytes())?;
        }
        let mut r = Reader::new(msg.unsigned_body(mac_len));
        let terms = r.read::<Terms>()?;
        self.offered.check_accept(&terms)?;
        if let Some(theirs) = parse_declarations(&mut r)? {
            let ours: Vec<DeviceDecl> = self
                .offered
                .offer
                .devices
                .iter()
                .map(|d| d.decl.clone())
                .collect();
            check_devices(&ours, &theirs)?;
        }
        common.record(msg.bytes());
        Ok(common.agreement(&terms, self.offered.offer.devices))
    }
}

impl Offered {
    /// The server may only narrow what the client offered.
    fn check_accept(&self, a: &Terms) -> Result<(), HandshakeError> {
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
        if a.checksum != self.protection.code() {
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
