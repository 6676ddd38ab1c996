//! Frame protection with a key (docs/PROTOCOL.md, sections 3.4 and 4.2): session keys derived
//! from the PSK handshake with HKDF-SHA-256, and AES-256-GCM on every frame.
//!
//! A connection that agreed [`FrameProtection::Aes256Gcm`] carries each frame as
//! `header (40) || tag (16) || ciphertext (wire_len)`. The header is the additional authenticated
//! data, the payload is encrypted, and the nonce is `conn_index u32 LE || counter u64 LE`, where
//! `counter` counts the frames sent on this connection in this direction (0, 1, 2, ...). The
//! counter is never sent: the receiver uses the next one it expects, so a frame that is replayed,
//! dropped, reordered or moved to another connection fails its tag. Keys are derived per
//! connection from that connection's handshake transcript, so they differ across connections,
//! directions and sessions.
//!
//! ```
//! use vfmig_wire::seal::{FrameOpener, FrameSealer, SessionKeys, TAG_LEN};
//! use vfmig_wire::{Codec, FrameHeader, FrameKind, HEADER_LEN};
//! let keys = SessionKeys::derive(b"psk", b"transcript");
//! let mut tx = FrameSealer::new(&keys, true, 3);
//! let mut rx = FrameOpener::new(&keys, false, 3);
//! let h = FrameHeader { kind: FrameKind::StopCopyData, codec: Codec::Raw, device: 0, seq: 0,
//!                       raw_len: 5, wire_len: 5, arg: 0, crc: 0 };
//! let mut head = [0u8; HEADER_LEN + TAG_LEN];
//! head[..HEADER_LEN].copy_from_slice(&h.encode_unprotected());
//! let mut payload = *b"hello";
//! tx.seal(&mut head, &mut payload).unwrap();
//! assert_ne!(&payload, b"hello");
//! rx.open(&head, &mut payload).unwrap();
//! assert_eq!(&payload, b"hello");
//! // The same bytes again (a replay) fail: the receiver's counter moved on.
//! assert!(rx.open(&head, &mut payload.clone()).is_err());
//! ```

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};

use crate::codec::{ArrayWriter, Put, Reader};
use crate::frame::{HeaderBytes, HEADER_LEN};

/// Length of the AES-256-GCM tag that follows the header of a protected frame.
pub const TAG_LEN: usize = 16;
/// Length of a derived key.
pub const KEY_LEN: usize = 32;
/// Bytes before the payload of a protected frame: the header and the tag.
pub const SEALED_HEAD_LEN: usize = HEADER_LEN + TAG_LEN;

/// HKDF-Expand `info` of the client -> server frame key (32 bytes).
pub const CLIENT_KEY_LABEL: &[u8; 32] = b"vfmig v3 frame key client->srv\0\0";
/// HKDF-Expand `info` of the server -> client frame key (32 bytes).
pub const SERVER_KEY_LABEL: &[u8; 32] = b"vfmig v3 frame key srv->client\0\0";
/// HKDF-Expand `info` of the stream digest key (32 bytes).
pub const DIGEST_KEY_LABEL: &[u8; 32] = b"vfmig v3 stream digest key\0\0\0\0\0\0";

vfmig_enum::int_enum! {
    /// How the frames of a connection are protected (the handshake's `protection` byte).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum FrameProtection: u8 {
        /// CRC32C over header and payload: detects faults, not attackers. Used without a key,
        /// and inside TLS (which protects the frames itself).
        Crc32c = 1 => "CRC32C",
        /// AES-256-GCM with keys derived from the PSK handshake: every frame authenticated,
        /// payloads encrypted, replay and reordering refused.
        Aes256Gcm = 2 => "AES-256-GCM",
    }
}

impl FrameProtection {
    /// Bytes before the payload of a frame: the header, plus the tag when sealed.
    pub fn head_len(self) -> usize {
        match self {
            FrameProtection::Crc32c => HEADER_LEN,
            FrameProtection::Aes256Gcm => SEALED_HEAD_LEN,
        }
    }
}

/// Keys of one connection, derived from the PSK and that connection's handshake transcript.
/// `Debug` does not print them; equality is compared in constant time.
#[derive(Clone)]
pub struct SessionKeys {
    client_to_server: [u8; KEY_LEN],
    server_to_client: [u8; KEY_LEN],
    digest: [u8; KEY_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

impl PartialEq for SessionKeys {
    fn eq(&self, other: &SessionKeys) -> bool {
        let pairs = [
            (&self.client_to_server, &other.client_to_server),
            (&self.server_to_client, &other.server_to_client),
            (&self.digest, &other.digest),
        ];
        let diff = pairs
            .iter()
            .flat_map(|(a, b)| a.iter().zip(b.iter()))
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        diff == 0
    }
}

impl Eq for SessionKeys {}

/// `ring::hkdf::Okm` needs a length type.
struct Len32;

impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

impl SessionKeys {
    /// `PRK = HKDF-Extract(salt = SHA-256(transcript), IKM = psk)`, then one HKDF-Expand of 32
    /// bytes per label. `transcript` is every handshake message of the connection, in order,
    /// envelopes and MACs included.
    pub fn derive(psk: &[u8], transcript: &[u8]) -> SessionKeys {
        let th = ring::digest::digest(&ring::digest::SHA256, transcript);
        let prk = Salt::new(HKDF_SHA256, th.as_ref()).extract(psk);
        let expand = |label: &[u8; 32]| {
            let mut k = [0u8; KEY_LEN];
            // Expand fails only for outputs above 255 hash lengths; 32 bytes is one.
            if let Ok(okm) = prk.expand(&[label], Len32) {
                let _ = okm.fill(&mut k);
            }
            k
        };
        SessionKeys {
            client_to_server: expand(CLIENT_KEY_LABEL),
            server_to_client: expand(SERVER_KEY_LABEL),
            digest: expand(DIGEST_KEY_LABEL),
        }
    }

    /// The key of the keyed BLAKE3 stream digest (docs/PROTOCOL.md, section 5).
    pub fn digest_key(&self) -> &[u8; KEY_LEN] {
        &self.digest
    }

    fn aead_key(&self, client_to_server: bool) -> LessSafeKey {
        let k = if client_to_server {
            &self.client_to_server
        } else {
            &self.server_to_client
        };
        // A 32-byte key is exactly what AES-256-GCM takes.
        let unbound = UnboundKey::new(&AES_256_GCM, k).unwrap_or_else(|_| {
            unreachable!("AES_256_GCM key length is {KEY_LEN}");
        });
        LessSafeKey::new(unbound)
    }
}

/// A protected frame failed its check. The connection is out of sync or under attack; it must be
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The tag did not verify: the header or payload was altered, or the frame was replayed,
    /// reordered, dropped before it or moved from another connection or session.
    #[error("frame {counter} on connection {conn} failed authentication")]
    BadTag {
        /// The connection index.
        conn: u16,
        /// The counter the receiver expected.
        counter: u64,
    },
    /// The payload is longer than AES-GCM can seal under one nonce (about 64 GiB; a frame is at
    /// most 4 MiB, so this does not happen).
    #[error("a {len}-byte payload is too long to seal on connection {conn}")]
    TooLong {
        /// The connection index.
        conn: u16,
        /// The payload length.
        len: usize,
    },
    /// The frame counter is exhausted (2^64 frames on one connection).
    #[error("frame counter exhausted on connection {conn}")]
    CounterExhausted {
        /// The connection index.
        conn: u16,
    },
}

/// `conn_index u32 LE || counter u64 LE`.
fn nonce(conn: u16, counter: u64) -> Nonce {
    let mut n = ArrayWriter::<NONCE_LEN>::new();
    n.put_u32(u32::from(conn));
    n.put_u64(counter);
    Nonce::assume_unique_for_key(n.finish())
}

/// A frame's head: its header, then (sealed) its tag.
impl HeaderBytes {
    /// The header at the start of a head buffer.
    pub fn of_head(head: &[u8; SEALED_HEAD_LEN]) -> HeaderBytes {
        HeaderBytes::new(split_head(head).0)
    }

    /// A head buffer holding this header and room for the tag (zero): what a sealed frame
    /// carries before its payload; a connection without sealing sends the first
    /// [`HEADER_LEN`] bytes.
    pub fn into_head(self) -> [u8; SEALED_HEAD_LEN] {
        let mut head = ArrayWriter::<SEALED_HEAD_LEN>::new();
        head.put(self.as_array());
        head.put(&[0; TAG_LEN]);
        head.finish()
    }
}

fn split_head(head: &[u8; SEALED_HEAD_LEN]) -> ([u8; HEADER_LEN], [u8; TAG_LEN]) {
    let mut r = Reader::new(head);
    // SEALED_HEAD_LEN is HEADER_LEN + TAG_LEN: neither read comes up short.
    (
        r.array().unwrap_or([0; HEADER_LEN]),
        r.array().unwrap_or([0; TAG_LEN]),
    )
}

/// Seals the frames one side sends on one connection, in sending order.
pub struct FrameSealer {
    key: LessSafeKey,
    conn: u16,
    counter: u64,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSealer")
            .field("conn", &self.conn)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl FrameSealer {
    /// The sealer of connection `conn` for the client (`client` true) or the server side.
    pub fn new(keys: &SessionKeys, client: bool, conn: u16) -> FrameSealer {
        FrameSealer {
            key: keys.aead_key(client),
            conn,
            counter: 0,
        }
    }

    /// Seals the next frame: `head` starts with the encoded header, the AAD (its CRC field is set
    /// to 0 here, as a sealed frame carries it), the tag goes after it, and `payload`
    /// (`wire_len` bytes) is encrypted in place.
    pub fn seal(
        &mut self,
        head: &mut [u8; SEALED_HEAD_LEN],
        payload: &mut [u8],
    ) -> Result<(), SealError> {
        let next = self
            .counter
            .checked_add(1)
            .ok_or(SealError::CounterExhausted { conn: self.conn })?;
        let mut header = HeaderBytes::of_head(head);
        header.clear_crc();
        let (hdr, tag_out) = head.split_at_mut(HEADER_LEN);
        hdr.copy_from_slice(header.as_array());
        let len = payload.len();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.conn, self.counter), Aad::from(&*hdr), payload)
            .map_err(|_| SealError::TooLong {
                conn: self.conn,
                len,
            })?;
        tag_out.copy_from_slice(tag.as_ref());
        self.counter = next;
        Ok(())
    }
}

/// Opens the frames one side receives on one connection, in arrival order.
pub struct FrameOpener {
    key: LessSafeKey,
    conn: u16,
    counter: u64,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameOpener")
            .field("conn", &self.conn)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl FrameOpener {
    /// The opener of connection `conn` for the client (`client` true) or the server side: it
    /// opens what the other side sealed.
    pub fn new(keys: &SessionKeys, client: bool, conn: u16) -> FrameOpener {
        FrameOpener {
            key: keys.aead_key(!client),
            conn,
            counter: 0,
        }
    }

    /// Verifies the next frame (`head`: header and tag as received) and decrypts `payload` in
    /// place. On failure the payload is garbage and the connection must be dropped.
    pub fn open(
        &mut self,
        head: &[u8; SEALED_HEAD_LEN],
        payload: &mut [u8],
    ) -> Result<(), SealError> {
        let next = self
            .counter
            .checked_add(1)
            .ok_or(SealError::CounterExhausted { conn: self.conn })?;
        let (hdr, tag) = split_head(head);
        self.key
            .open_in_place_separate_tag(
                nonce(self.conn, self.counter),
                Aad::from(hdr),
                Tag::from(tag),
                payload,
                0..,
            )
            .map_err(|_| SealError::BadTag {
                conn: self.conn,
                counter: self.counter,
            })?;
        self.counter = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Codec, FrameHeader, FrameKind};

    fn frame(seq: u64, payload: &[u8]) -> ([u8; SEALED_HEAD_LEN], Vec<u8>) {
        let len = u32::try_from(payload.len()).unwrap();
        let h = FrameHeader {
            kind: FrameKind::StopCopyData,
            codec: Codec::Raw,
            device: 0,
            seq,
            raw_len: len,
            wire_len: len,
            arg: 0,
            crc: 0,
        };
        let mut head = [0u8; SEALED_HEAD_LEN];
        head[..HEADER_LEN].copy_from_slice(&h.encode_unprotected());
        (head, payload.to_vec())
    }

    fn keys() -> SessionKeys {
        SessionKeys::derive(b"a key", b"a transcript")
    }

    #[test]
    fn every_altered_bit_of_header_tag_or_payload_is_refused() {
        let k = keys();
        let (mut head, mut p) = frame(7, b"device state");
        FrameSealer::new(&k, true, 0)
            .seal(&mut head, &mut p)
            .unwrap();
        for bit in 0..(head.len() + p.len()) * 8 {
            let (mut h2, mut p2) = (head, p.clone());
            let i = bit / 8;
            if i < h2.len() {
                h2[i] ^= 1 << (bit % 8);
            } else {
                p2[i - h2.len()] ^= 1 << (bit % 8);
            }
            let r = FrameOpener::new(&k, false, 0).open(&h2, &mut p2);
            assert_eq!(
                r,
                Err(SealError::BadTag {
                    conn: 0,
                    counter: 0
                }),
                "bit {bit}"
            );
        }
        FrameOpener::new(&k, false, 0).open(&head, &mut p).unwrap();
        assert_eq!(p, b"device state");
    }

    #[test]
    fn the_sealer_sends_the_crc_field_as_zero_whatever_it_is_given() {
        let k = keys();
        let (mut zero, mut p0) = frame(3, b"payload");
        let (mut crc, mut p1) = frame(3, b"payload");
        let h = HeaderBytes::of_head(&crc);
        let with_crc = h.decode().unwrap().encode(b"payload");
        crc[..HEADER_LEN].copy_from_slice(&with_crc);
        assert_ne!(HeaderBytes::of_head(&crc).crc(), 0);
        FrameSealer::new(&k, true, 0)
            .seal(&mut zero, &mut p0)
            .unwrap();
        FrameSealer::new(&k, true, 0)
            .seal(&mut crc, &mut p1)
            .unwrap();
        assert_eq!((zero, &p0), (crc, &p1));
        assert_eq!(HeaderBytes::of_head(&crc).crc(), 0);
    }

    #[test]
    fn replayed_reordered_or_moved_frames_are_refused() {
        let k = keys();
        let mut tx = FrameSealer::new(&k, true, 1);
        let (mut h0, mut p0) = frame(0, b"zero");
        let (mut h1, mut p1) = frame(1, b"one!");
        tx.seal(&mut h0, &mut p0).unwrap();
        tx.seal(&mut h1, &mut p1).unwrap();
        // Reordered: frame 1 first.
        assert!(FrameOpener::new(&k, false, 1)
            .open(&h1, &mut p1.clone())
            .is_err());
        // Moved to another connection.
        assert!(FrameOpener::new(&k, false, 2)
            .open(&h0, &mut p0.clone())
            .is_err());
        // Opened by the wrong direction (reflected back to its sender).
        assert!(FrameOpener::new(&k, true, 1)
            .open(&h0, &mut p0.clone())
            .is_err());
        // Another session's keys.
        let other = SessionKeys::derive(b"a key", b"another transcript");
        assert!(FrameOpener::new(&other, false, 1)
            .open(&h0, &mut p0.clone())
            .is_err());
        // In order it opens; a replay of frame 0 after it does not.
        let mut rx = FrameOpener::new(&k, false, 1);
        rx.open(&h0, &mut p0.clone()).unwrap();
        assert!(rx.open(&h0, &mut p0.clone()).is_err());
        let mut rx = FrameOpener::new(&k, false, 1);
        rx.open(&h0, &mut p0).unwrap();
        rx.open(&h1, &mut p1).unwrap();
        assert_eq!((&p0[..], &p1[..]), (&b"zero"[..], &b"one!"[..]));
    }

    #[test]
    fn keys_differ_per_direction_and_label_and_debug_hides_them() {
        let k = keys();
        assert_ne!(k.client_to_server, k.server_to_client);
        assert_ne!(k.client_to_server, k.digest);
        assert_eq!(k, keys());
        assert_ne!(k, SessionKeys::derive(b"another key", b"a transcript"));
        assert_eq!(format!("{k:?}"), "SessionKeys(<redacted>)");
    }
}
