//! Outgoing frames as the engine queues them: the header buffer (with room for the AEAD tag), the
//! payload, and the builders of the frames the engine makes itself (keepalive, abort).

use vfmig_wire::seal::SEALED_HEAD_LEN;
use vfmig_wire::{AbortReason, Codec, FrameHeader, FrameKind, HeaderBytes, HEADER_LEN};

use crate::pool::PoolBuf;

/// A frame's header bytes, with room for the AEAD tag that follows the header on a sealed
/// connection (only the first `Engine::head_len` bytes travel).
pub(crate) type Head = [u8; SEALED_HEAD_LEN];

/// Payload of an outgoing frame.
#[derive(Debug)]
pub(crate) enum OutPayload {
    Empty,
    Pool(PoolBuf),
    Heap(Vec<u8>),
}

impl OutPayload {
    pub(super) fn len(&self) -> usize {
        match self {
            OutPayload::Empty => 0,
            OutPayload::Pool(b) => b.len(),
            OutPayload::Heap(v) => v.len(),
        }
    }
}

/// An encoded frame ready for the wire.
#[derive(Debug)]
pub(crate) struct OutFrame {
    pub(crate) hdr: Box<Head>,
    pub(crate) payload: OutPayload,
}

/// A header in a [`Head`] buffer, tag room zero.
pub(crate) fn head(hdr: [u8; HEADER_LEN]) -> Box<Head> {
    Box::new(HeaderBytes::new(hdr).into_head())
}

/// A keepalive frame carrying the engine's uptime in milliseconds.
pub(super) fn keepalive_frame(ms: u64) -> OutFrame {
    let h = FrameHeader {
        kind: FrameKind::Keepalive,
        codec: Codec::Raw,
        device: 0,
        seq: 0,
        raw_len: 0,
        wire_len: 0,
        arg: ms,
        crc: 0,
    };
    OutFrame {
        hdr: head(h.encode(&[])),
        payload: OutPayload::Empty,
    }
}

/// Builds an abort frame (detail truncated to the limit by the caller).
pub(crate) fn abort_frame(reason: AbortReason, detail: Vec<u8>) -> OutFrame {
    let len = u32::try_from(detail.len()).unwrap_or(0);
    let h = FrameHeader {
        kind: FrameKind::Abort,
        codec: Codec::Raw,
        device: 0,
        seq: 0,
        raw_len: len,
        wire_len: len,
        arg: u64::from(reason.code()),
        crc: 0,
    };
    let payload = if len == 0 {
        OutPayload::Empty
    } else {
        OutPayload::Heap(detail)
    };
    OutFrame {
        hdr: head(h.encode(if len == 0 {
            &[]
        } else {
            detail_bytes(&payload)
        })),
        payload,
    }
}

fn detail_bytes(p: &OutPayload) -> &[u8] {
    match p {
        OutPayload::Heap(v) => v,
        _ => &[],
    }
}
