//! Typed control frames: the kinds whose meaning lives in `arg` and a small payload
//! (docs/PROTOCOL.md, "Frame kinds"). Data frames (`PreCopyData`, `StopCopyData`, `DirtyPages`)
//! are built by the pipeline directly from [`FrameHeader`].

use crate::deframer::Frame;
use crate::frame::{Codec, FrameHeader, FrameKind, DIGEST_LEN, HEADER_LEN, MAX_ABORT_DETAIL};
use crate::WireError;

vfmig_enum::int_enum! {
    /// Why a session is aborted: the code in the `arg` of an `Abort` frame (docs/PROTOCOL.md,
    /// section 5). This is the one abort vocabulary of vfmig: the transport sends it
    /// (`abort(AbortReason)`), reports it (`PeerAborted { reason }`), and the pipeline picks it.
    /// Codes this version does not know are [`AbortReason::Unknown`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum AbortReason: u16 {
        /// 1: the operator or the VMM cancelled the migration (also: a session handle dropped
        /// without closing).
        Cancelled = 1,
        /// 2: a source device or the source's pipeline failed (read, state transition, codec).
        SourceDevice = 2,
        /// 3: the destination could not set up or write to its device.
        DestinationDevice = 3,
        /// 4: the peer broke the protocol (bad frame, wrong order, unknown device).
        Protocol = 4,
        /// 5: a checksum, length, digest or decode check failed.
        Integrity = 5,
        /// 6: the peer was silent, or made no progress, past the timeout.
        Timeout = 6,
        /// 7: a bounded resource ran out (pool, window, queue) past its timeout.
        Resources = 7,
        /// 8: an internal error on the sender.
        Internal = 8,
        /// 9: a destination device refused its state (RESUMING -> STOP failed).
        DeviceRefused = 9,
        /// 10: the two sides were given different devices.
        DeviceMismatch = 10,
    }
    unknown Unknown;
    display manual;
}

/// Written here rather than by `int_enum!`: messages name the code too, `Cancelled (1)`.
impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortReason::Unknown(c) => write!(f, "unknown reason {c}"),
            r => write!(f, "{} ({})", r.name(), r.code()),
        }
    }
}

vfmig_enum::int_enum! {
    /// What the destination did after the source's commit (`arg` of an `Outcome` frame,
    /// docs/PROTOCOL.md, section 5.1). Codes this version does not know are
    /// [`FinalOutcome::Unknown`] (the source treats them as in doubt).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum FinalOutcome: u16 {
        /// 1: every destination device is RUNNING (resumed by the library or by the VMM).
        Resumed = 1,
        /// 2: every destination device holds the committed state in STOP; its owner resumes it.
        Held = 2,
        /// 3: resuming failed; the destination reset its devices before saying so, so the
        /// source holds the only valid state and may run again.
        ResumeFailed = 3,
    }
    unknown Unknown;
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
    /// Source -> destination: every byte of `device`'s initial pre-copy data precedes this.
    InitialDataSent {
        /// Device index.
        device: u16,
        /// Sequence number in the device's stream.
        seq: u64,
        /// Raw bytes of the stream before the marker.
        raw_bytes: u64,
    },
    /// Destination -> source: `device` has loaded its initial pre-copy data.
    SwitchoverAck {
        /// Device index.
        device: u16,
        /// Raw bytes received so far for that device.
        raw_bytes: u64,
    },
    /// Destination -> source: `device` is prepared (verified, RESUMING -> STOP succeeded; it
    /// waits in STOP for the decision).
    DevicePrepared {
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
    /// Source -> destination: the decision is *commit*.
    Commit,
    /// Destination -> source: what the destination did after the commit.
    Outcome {
        /// The outcome.
        outcome: FinalOutcome,
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
            Control::InitialDataSent { .. } => FrameKind::InitialDataSent,
            Control::SwitchoverAck { .. } => FrameKind::SwitchoverAck,
            Control::DevicePrepared { .. } => FrameKind::DevicePrepared,
            Control::Abort { .. } => FrameKind::Abort,
            Control::Keepalive { .. } => FrameKind::Keepalive,
            Control::Commit => FrameKind::Commit,
            Control::Outcome { .. } => FrameKind::Outcome,
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
            Control::InitialDataSent {
                device,
                seq,
                raw_bytes,
            } => (*device, *seq, *raw_bytes),
            Control::SwitchoverAck { device, raw_bytes } => (*device, 0, *raw_bytes),
            Control::DevicePrepared {
                device,
                total_raw_bytes,
            } => (*device, 0, *total_raw_bytes),
            Control::Abort { reason, .. } => (0, 0, u64::from(reason.code())),
            Control::Keepalive { millis } => (0, 0, *millis),
            Control::Commit => (0, 0, 0),
            Control::Outcome { outcome } => (0, 0, u64::from(outcome.code())),
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
            FrameKind::InitialDataSent => Control::InitialDataSent {
                device,
                seq,
                raw_bytes: arg,
            },
            FrameKind::SwitchoverAck => Control::SwitchoverAck {
                device,
                raw_bytes: arg,
            },
            FrameKind::DevicePrepared => Control::DevicePrepared {
                device,
                total_raw_bytes: arg,
            },
            FrameKind::Abort => Control::Abort {
                // `check_kind_rules` bounds an Abort's `arg` to 16 bits.
                reason: AbortReason::from_code(u16::try_from(arg).unwrap_or(u16::MAX)),
                detail: std::str::from_utf8(payload)
                    .map_err(|e| WireError::AbortDetailNotUtf8 {
                        valid_up_to: e.valid_up_to(),
                    })?
                    .to_owned(),
            },
            FrameKind::Keepalive => Control::Keepalive { millis: arg },
            FrameKind::Commit => Control::Commit,
            FrameKind::Outcome => Control::Outcome {
                // `check_kind_rules` bounds the code to 16 bits.
                outcome: FinalOutcome::from_code(u16::try_from(arg).unwrap_or(u16::MAX)),
            },
        })
    }
}

impl TryFrom<&Frame> for Control {
    type Error = WireError;

    fn try_from(f: &Frame) -> Result<Control, WireError> {
        Control::decode(&f.header, &f.payload)
    }
}
