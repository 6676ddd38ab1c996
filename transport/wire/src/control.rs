//! Typed control frames: the kinds whose meaning lives in `arg` and a small payload
//! (docs/PROTOCOL.md, "Frame kinds"). Data frames (`PreCopyData`, `StopCopyData`, `DirtyPages`)
//! are built by the pipeline directly from [`FrameHeader`].

use crate::deframer::Frame;
use crate::frame::{Codec, FrameHeader, FrameKind, DIGEST_LEN, HEADER_LEN, MAX_ABORT_DETAIL};
use crate::WireError;

/// Why a session is aborted (`arg` of an `Abort` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// The operator or the VMM cancelled the migration.
    Cancelled,
    /// A source device failed (read, state transition).
    SourceDevice,
    /// A destination device failed or rejected its state.
    DestinationDevice,
    /// The peer broke the protocol (bad frame, wrong order, unknown device).
    Protocol,
    /// A checksum, length or digest did not match.
    Integrity,
    /// The peer was silent past the liveness timeout.
    Timeout,
    /// A bounded resource ran out (pool, window, queue) past its timeout.
    Resources,
    /// An internal error on the sender.
    Internal,
    /// A code this version does not know.
    Unknown(u64),
}

impl AbortReason {
    /// Wire value.
    pub fn to_u64(self) -> u64 {
        match self {
            AbortReason::Cancelled => 1,
            AbortReason::SourceDevice => 2,
            AbortReason::DestinationDevice => 3,
            AbortReason::Protocol => 4,
            AbortReason::Integrity => 5,
            AbortReason::Timeout => 6,
            AbortReason::Resources => 7,
            AbortReason::Internal => 8,
            AbortReason::Unknown(v) => v,
        }
    }

    /// Parses a wire value.
    pub fn from_u64(v: u64) -> AbortReason {
        match v {
            1 => AbortReason::Cancelled,
            2 => AbortReason::SourceDevice,
            3 => AbortReason::DestinationDevice,
            4 => AbortReason::Protocol,
            5 => AbortReason::Integrity,
            6 => AbortReason::Timeout,
            7 => AbortReason::Resources,
            8 => AbortReason::Internal,
            v => AbortReason::Unknown(v),
        }
    }
}

/// A control frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Source -> destination: the end of device `device`'s stream, at sequence `seq`.
    EndOfDevice {
        /// Device index.
        device: u16,
        /// Sequence number (one past the device's last data frame).
        seq: u64,
        /// Total raw bytes of the stream (pre-copy and stop-copy).
        total_raw_bytes: u64,
        /// Stream digest (docs/PROTOCOL.md, section 5).
        digest: [u8; DIGEST_LEN],
    },
    /// Source -> destination: pre-copy of `device` ends; stop-copy data follows.
    PreCopyDone {
        /// Device index.
        device: u16,
        /// Sequence number in the device's stream.
        seq: u64,
        /// Raw pre-copy bytes sent.
        precopy_bytes: u64,
    },
    /// Destination -> source: `device` has loaded its initial pre-copy data.
    SwitchoverAck {
        /// Device index.
        device: u16,
        /// Raw bytes received so far for that device.
        raw_bytes: u64,
    },
    /// Destination -> source: `device` accepted its state (RESUMING -> STOP succeeded).
    DeviceResumed {
        /// Device index.
        device: u16,
        /// Total raw bytes written to the device.
        total_raw_bytes: u64,
    },
    /// Either way: abort the session.
    Abort {
        /// Why.
        reason: AbortReason,
        /// Human-readable detail, at most [`MAX_ABORT_DETAIL`] bytes (longer is cut at a char
        /// boundary when encoding).
        detail: String,
    },
    /// Either way: liveness.
    Keepalive {
        /// The sender's monotonic clock in milliseconds.
        millis: u64,
    },
}

/// Cuts `s` to at most `max` bytes at a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Control {
    /// The frame kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Control::EndOfDevice { .. } => FrameKind::EndOfDevice,
            Control::PreCopyDone { .. } => FrameKind::PreCopyDone,
            Control::SwitchoverAck { .. } => FrameKind::SwitchoverAck,
            Control::DeviceResumed { .. } => FrameKind::DeviceResumed,
            Control::Abort { .. } => FrameKind::Abort,
            Control::Keepalive { .. } => FrameKind::Keepalive,
        }
    }

    /// The payload bytes (raw codec).
    pub fn payload(&self) -> &[u8] {
        match self {
            Control::EndOfDevice { digest, .. } => digest,
            Control::Abort { detail, .. } => cut(detail, MAX_ABORT_DETAIL).as_bytes(),
            _ => &[],
        }
    }

    /// The header (its `crc` is computed by [`FrameHeader::encode`]).
    pub fn header(&self) -> FrameHeader {
        let (device, seq, arg) = match self {
            Control::EndOfDevice {
                device,
                seq,
                total_raw_bytes,
                ..
            } => (*device, *seq, *total_raw_bytes),
            Control::PreCopyDone {
                device,
                seq,
                precopy_bytes,
            } => (*device, *seq, *precopy_bytes),
            Control::SwitchoverAck { device, raw_bytes } => (*device, 0, *raw_bytes),
            Control::DeviceResumed {
                device,
                total_raw_bytes,
            } => (*device, 0, *total_raw_bytes),
            Control::Abort { reason, .. } => (0, 0, reason.to_u64()),
            Control::Keepalive { millis } => (0, 0, *millis),
        };
        // Payloads are at most MAX_ABORT_DETAIL bytes.
        let len = u32::try_from(self.payload().len()).unwrap_or(u32::MAX);
        FrameHeader {
            kind: self.kind(),
            codec: Codec::Raw,
            device,
            seq,
            raw_len: len,
            wire_len: len,
            arg,
            crc: 0,
        }
    }

    /// Header and payload, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.payload();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.header().encode(payload));
        out.extend_from_slice(payload);
        out
    }

    /// Decodes a verified frame (as returned by the deframer, or a header from
    /// [`FrameHeader::decode`] plus its verified payload).
    pub fn decode(header: &FrameHeader, payload: &[u8]) -> Result<Control, WireError> {
        header.check_kind_rules()?;
        if payload.len() != header.wire_len as usize {
            return Err(WireError::LengthMismatch {
                codec: header.codec,
                raw_len: header.raw_len,
                wire_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            });
        }
        let (device, seq, arg) = (header.device, header.seq, header.arg);
        Ok(match header.kind {
            FrameKind::PreCopyData | FrameKind::StopCopyData | FrameKind::DirtyPages => {
                return Err(WireError::NotControl { kind: header.kind })
            }
            FrameKind::EndOfDevice => {
                let mut digest = [0u8; DIGEST_LEN];
                digest.copy_from_slice(payload);
                Control::EndOfDevice {
                    device,
                    seq,
                    total_raw_bytes: arg,
                    digest,
                }
            }
            FrameKind::PreCopyDone => Control::PreCopyDone {
                device,
                seq,
                precopy_bytes: arg,
            },
            FrameKind::SwitchoverAck => Control::SwitchoverAck {
                device,
                raw_bytes: arg,
            },
            FrameKind::DeviceResumed => Control::DeviceResumed {
                device,
                total_raw_bytes: arg,
            },
            FrameKind::Abort => Control::Abort {
                reason: AbortReason::from_u64(arg),
                detail: std::str::from_utf8(payload)
                    .map_err(|e| WireError::AbortDetailNotUtf8 {
                        valid_up_to: e.valid_up_to(),
                    })?
                    .to_owned(),
            },
            FrameKind::Keepalive => Control::Keepalive { millis: arg },
        })
    }
}

impl TryFrom<&Frame> for Control {
    type Error = WireError;

    fn try_from(f: &Frame) -> Result<Control, WireError> {
        Control::decode(&f.header, &f.payload)
    }
}
