//! Incremental deframer: a byte stream in, verified `(FrameHeader, payload)` frames out.
//!
//! Used by the blocking/TLS path and the fuzzer. It holds at most one frame: a 40-byte header and
//! a payload buffer of at most the header's `wire_len`, which is checked against the session limit
//! before anything is allocated; the buffer grows as payload bytes arrive. Every frame's CRC32C is verified before it is returned. Any
//! error is sticky: the stream is out of sync and the connection must be dropped.
//!
//! ```
//! use vfmig_wire::{Codec, Deframer, FrameHeader, FrameKind, MAX_PAYLOAD};
//! let h = FrameHeader { kind: FrameKind::StopCopyData, codec: Codec::Raw, device: 0, seq: 0,
//!                       raw_len: 3, wire_len: 3, arg: 0, crc: 0 };
//! let mut wire = h.encode(b"abc").to_vec();
//! wire.extend_from_slice(b"abc");
//! let mut d = Deframer::new(MAX_PAYLOAD);
//! let (used, frame) = d.feed(&wire).unwrap();
//! assert_eq!(used, wire.len());
//! assert_eq!(frame.unwrap().payload, b"abc");
//! assert!(d.finish().is_ok());
//! ```

use crate::frame::{FrameHeader, FRAME_MAGIC, HEADER_LEN, MAX_PAYLOAD};
use crate::WireError;

/// Payload buffer reserved when a header arrives; the rest is allocated as bytes come in.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 << 10;

/// A verified frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The decoded header.
    pub header: FrameHeader,
    /// The payload as on the wire (`header.wire_len` bytes, still encoded by `header.codec`).
    pub payload: Vec<u8>,
}

/// Byte stream to frames, with hard limits and CRC32C verification.
#[derive(Debug)]
pub struct Deframer {
    max_payload: u32,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    /// The header of the frame whose payload is being received.
    cur: Option<FrameHeader>,
    payload: Vec<u8>,
    failed: Option<WireError>,
    frames: u64,
}

impl Deframer {
    /// A deframer refusing payloads above `max_payload` (clamped to [`MAX_PAYLOAD`]); pass the
    /// handshake's agreed `max_payload`.
    pub fn new(max_payload: u32) -> Deframer {
        Deframer {
            max_payload: max_payload.min(MAX_PAYLOAD),
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            cur: None,
            payload: Vec::new(),
            failed: None,
            frames: 0,
        }
    }

    /// Consumes bytes up to the end of the next frame. Returns the bytes consumed and the frame
    /// if one completed; call again with the rest of the input. A partial frame is kept (bounded
    /// by the payload limit) until more bytes come.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step(input) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn step(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), WireError> {
        let mut used = 0;
        if self.cur.is_none() {
            let take = (HEADER_LEN - self.hdr_len).min(input.len());
            self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[..take]);
            self.hdr_len += take;
            used += take;
            // Refuse garbage at its first byte rather than after 40.
            let m = self.hdr_len.min(FRAME_MAGIC.len());
            if self.hdr[..m] != FRAME_MAGIC[..m] {
                let mut found = [0u8; 4];
                found[..m].copy_from_slice(&self.hdr[..m]);
                return Err(WireError::BadFrameMagic { found });
            }
            if self.hdr_len < HEADER_LEN {
                return Ok((used, None));
            }
            let h = FrameHeader::decode_with_limit(&self.hdr, self.max_payload)?;
            // wire_len <= max_payload was checked by decode, so the buffer is bounded; it still
            // grows only as payload bytes arrive, so a declaration alone costs at most 64 KiB.
            self.payload = Vec::with_capacity((h.wire_len as usize).min(INITIAL_PAYLOAD_CAPACITY));
            self.cur = Some(h);
        }
        let Some(h) = self.cur else {
            return Ok((used, None));
        };
        let want = h.wire_len as usize - self.payload.len();
        let take = want.min(input.len() - used);
        self.payload.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.payload.len() < h.wire_len as usize {
            return Ok((used, None));
        }
        h.verify(&self.hdr, &self.payload)?;
        self.cur = None;
        self.hdr_len = 0;
        self.frames += 1;
        let payload = std::mem::take(&mut self.payload);
        Ok((used, Some(Frame { header: h, payload })))
    }

    /// Feeds all of `input`, handing every completed frame to `on_frame`.
    pub fn feed_all(
        &mut self,
        mut input: &[u8],
        mut on_frame: impl FnMut(Frame),
    ) -> Result<(), WireError> {
        while !input.is_empty() {
            let (used, frame) = self.feed(input)?;
            input = &input[used..];
            if let Some(f) = frame {
                on_frame(f);
            }
        }
        Ok(())
    }

    /// A frame has started but not completed.
    pub fn is_mid_frame(&self) -> bool {
        self.hdr_len > 0
    }

    /// Frames returned so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Call at end of stream: a stream cut mid-frame is [`WireError::Truncated`]; a failed
    /// deframer reports its error again.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.is_mid_frame() {
            return Ok(());
        }
        let (received, expected) = match &self.cur {
            Some(h) => (
                HEADER_LEN + self.payload.len(),
                HEADER_LEN + h.wire_len as usize,
            ),
            None => (self.hdr_len, HEADER_LEN),
        };
        Err(WireError::Truncated { received, expected })
    }
}
