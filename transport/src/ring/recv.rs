//! The receive path: header and payload reads, admission through the reorder window and the
//! pool, verification, and delivery to the consumer.
//!
//! Each connection reads the 40-byte header (`Recv`, `MSG_WAITALL`), asks the reorder window
//! whether the frame may be read now, then reads the payload straight into a pool buffer and
//! verifies the CRC32C before the frame goes anywhere. The payload read is a `Recv` with
//! `MSG_WAITALL` into the slot rather than `ReadFixed`: a read on a socket completes with
//! whatever is queued at that moment (read(2) semantics, no retry for sockets), so a 1 MiB
//! payload would take many completions and resubmissions instead of one. A frame that does not
//! fit in the window, or finds no free buffer, stays in the socket (the connection is parked)
//! until it does.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::TrySendError;
use vfmig_wire::seal::SEALED_HEAD_LEN;
use vfmig_wire::{AbortReason, FrameHeader, FrameKind, HeaderBytes};

use crate::error::{FramePart, TransportError};
use crate::pool::PoolBuf;
use crate::reorder::Admit;
use crate::stats::Counters;
use crate::uring::{Io, IoBuf, Sub};
use crate::Frame;

use super::frame::Head;
use super::{errno_err, ures, Engine, Op, Rx, READY_MAX};

impl Engine {
    /// A connection whose header is in waits for a free pool buffer (not for window room: that
    /// one is woken by the completions that deliver the frames before it).
    pub(super) fn waiting_for_buffer(&self) -> bool {
        self.conns.iter().any(|c| match &c.rx {
            Rx::Waiting { hdr, .. } => self.reorder.admit(hdr) != Admit::Park,
            _ => false,
        })
    }

    pub(super) fn reading_paused(&self) -> bool {
        self.ready.len() >= READY_MAX || self.aborting()
    }

    pub(super) fn post_header_recv(&mut self, i: usize) -> Result<(), TransportError> {
        if !matches!(self.conns[i].rx, Rx::Idle) || self.reading_paused() {
            return Ok(());
        }
        self.conns[i].rx = Rx::Busy;
        // A fresh header read: liveness counts from when we started listening again.
        self.live.read_posted(i, Instant::now());
        let buf = IoBuf::Heap(Box::new([0u8; SEALED_HEAD_LEN]));
        self.submit_recv_header(i, 0, buf)
    }

    /// Reads the rest of a header (`got` bytes of it are in `buf`).
    fn submit_recv_header(
        &mut self,
        conn: usize,
        got: usize,
        buf: IoBuf,
    ) -> Result<(), TransportError> {
        let io = Io::Recv {
            fd: self.conns[conn].sock.fd(),
            at: got,
            len: self.head_len.saturating_sub(got),
            flags: libc::MSG_WAITALL,
        };
        let owner = Op::RecvHeader { conn, got };
        self.push(vec![Sub { io, buf, owner }], false)
    }

    /// Reads the rest of a payload (`got` bytes of it are in `buf`).
    fn submit_recv_payload(&mut self, owner: Op, buf: PoolBuf) -> Result<(), TransportError> {
        let Op::RecvPayload { conn, hdr, got, .. } = &owner else {
            return Ok(());
        };
        let io = Io::Recv {
            fd: self.conns[*conn].sock.fd(),
            at: *got,
            len: (hdr.wire_len as usize).saturating_sub(*got),
            flags: libc::MSG_WAITALL,
        };
        let buf = IoBuf::Pool(buf);
        self.push(vec![Sub { io, buf, owner }], false)
    }

    /// A header read completed (in full, or `got` bytes of it so far).
    pub(super) fn complete_recv_header(
        &mut self,
        conn: usize,
        got: usize,
        res: i32,
        buf: IoBuf,
        now: Instant,
    ) -> Result<(), TransportError> {
        let counters = &self.shared.counters;
        if res <= 0 {
            let part = if got == 0 {
                FramePart::Between
            } else {
                FramePart::Header
            };
            if res < 0 {
                return Err(errno_err(conn, "receive frame header", part, res));
            }
            return self.on_eof(conn, part);
        }
        let n = ures(res);
        let got = got + n;
        Counters::add(&counters.bytes_received, n as u64);
        self.live.received(conn, now);
        if got < self.head_len {
            return self.submit_recv_header(conn, got, buf);
        }
        let mut raw: Head = [0u8; SEALED_HEAD_LEN];
        if let IoBuf::Heap(b) = &buf {
            let n = raw.len().min(b.len());
            raw[..n].copy_from_slice(&b[..n]);
        }
        self.on_header(conn, raw)?;
        Ok(())
    }

    /// A payload read completed (in full, or part of it so far).
    pub(super) fn complete_recv_payload(
        &mut self,
        owner: Op,
        res: i32,
        buf: IoBuf,
        now: Instant,
    ) -> Result<(), TransportError> {
        let Op::RecvPayload {
            conn,
            hdr,
            raw,
            got,
            reserved,
        } = owner
        else {
            return Ok(());
        };
        let counters = &self.shared.counters;
        let want = hdr.wire_len as usize;
        let Some(mut buf) = buf.into_pool() else {
            return Err(TransportError::Cancelled);
        };
        if res <= 0 {
            if reserved {
                self.reorder.unreserve(hdr.wire_len);
            }
            if res < 0 {
                return Err(errno_err(
                    conn,
                    "receive frame payload",
                    FramePart::Payload,
                    res,
                ));
            }
            return Err(TransportError::PeerClosed {
                conn,
                during: FramePart::Payload,
            });
        }
        let n = ures(res);
        let got = got + n;
        Counters::add(&counters.bytes_received, n as u64);
        self.live.received(conn, now);
        if got < want {
            let owner = Op::RecvPayload {
                conn,
                hdr,
                raw,
                got,
                reserved,
            };
            return self.submit_recv_payload(owner, buf);
        }
        if reserved {
            self.reorder.unreserve(hdr.wire_len);
        }
        buf.set_len(want);
        self.conns[conn].rx = Rx::Idle;
        self.on_frame(conn, hdr, &raw, Some(buf))?;
        Ok(())
    }

    fn on_eof(&mut self, conn: usize, part: FramePart) -> Result<(), TransportError> {
        let closing = self.closing();
        if part != FramePart::Between || !(self.p.peer_closes || closing) {
            return Err(TransportError::PeerClosed { conn, during: part });
        }
        self.conns[conn].rx = Rx::Eof;
        Ok(())
    }

    fn on_header(&mut self, conn: usize, raw: Head) -> Result<(), TransportError> {
        let h = HeaderBytes::of_head(&raw);
        let hdr = h.decode().map_err(|source| TransportError::Corrupt {
            conn,
            device: h.device(),
            seq: h.seq(),
            source,
        })?;
        let max = self
            .p
            .max_payload
            .min(u32::try_from(self.pool.slot_size()).unwrap_or(u32::MAX));
        if hdr.wire_len > max {
            return Err(TransportError::TooMany {
                what: crate::error::Limit::Payload,
                got: u64::from(hdr.wire_len),
                max: u64::from(max),
            });
        }
        self.conns[conn].rx = Rx::Waiting { hdr, raw };
        if self.reorder.admit(&hdr) == Admit::Park {
            Counters::add(&self.shared.counters.parks, 1);
        }
        self.try_admit(conn)
    }

    pub(super) fn admit_waiting(&mut self) -> Result<(), TransportError> {
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].rx, Rx::Waiting { .. }) {
                self.try_admit(i)?;
            }
        }
        Ok(())
    }

    /// Starts reading the payload of a connection whose header is in, if the window and the pool
    /// allow; otherwise the connection stays parked.
    fn try_admit(&mut self, conn: usize) -> Result<(), TransportError> {
        let Rx::Waiting { hdr, raw } = self.conns[conn].rx else {
            return Ok(());
        };
        let admit = self.reorder.admit(&hdr);
        if admit == Admit::Park {
            return Ok(());
        }
        if hdr.wire_len == 0 {
            self.conns[conn].rx = Rx::Idle;
            return self.on_frame(conn, hdr, &raw, None);
        }
        // Out-of-order frames leave a quarter of the pool for frames that are next.
        let reserve = (self.pool.slots() / 4).max(1);
        if admit == Admit::Window && self.pool.free() <= reserve {
            return Ok(());
        }
        let Some(buf) = self.pool.try_acquire() else {
            return Ok(());
        };
        let reserved = admit == Admit::Window;
        if reserved {
            self.reorder.reserve(hdr.wire_len);
        }
        self.conns[conn].rx = Rx::Busy;
        let owner = Op::RecvPayload {
            conn,
            hdr,
            raw,
            got: 0,
            reserved,
        };
        self.submit_recv_payload(owner, buf)
    }

    /// A whole frame is in: verify, then deliver, hold, or act on it.
    fn on_frame(
        &mut self,
        conn: usize,
        hdr: FrameHeader,
        raw: &Head,
        mut payload: Option<PoolBuf>,
    ) -> Result<(), TransportError> {
        // Nothing of a frame goes anywhere before its tag (sealed) or CRC verified.
        if let Some(s) = &mut self.conns[conn].sealing {
            let bytes = payload.as_mut().map_or(&mut [][..], |b| b.as_mut_slice());
            s.opener
                .open(raw, bytes)
                .map_err(|source| TransportError::Unauthentic {
                    conn,
                    device: hdr.device,
                    seq: hdr.seq,
                    source,
                })?;
        } else {
            let bytes = payload.as_ref().map_or(&[][..], |b| b.as_slice());
            HeaderBytes::of_head(raw)
                .verify(&hdr, bytes)
                .map_err(|source| TransportError::Corrupt {
                    conn,
                    device: hdr.device,
                    seq: hdr.seq,
                    source,
                })?;
        }
        let bytes = payload.as_ref().map_or(&[][..], |b| b.as_slice());
        Counters::add(&self.shared.counters.frames_received, 1);
        match hdr.kind {
            FrameKind::Keepalive => Ok(()),
            FrameKind::Abort => {
                let n = bytes.len().min(crate::config::MAX_ABORT_DETAIL);
                Err(TransportError::PeerAborted {
                    // The header's kind rules bound an Abort's `arg` to 16 bits.
                    reason: AbortReason::from_code(u16::try_from(hdr.arg).unwrap_or(u16::MAX)),
                    detail: String::from_utf8_lossy(&bytes[..n]).into_owned(),
                })
            }
            kind if kind.is_sequenced() => {
                let frame = Frame {
                    header: hdr,
                    payload,
                };
                if self.reorder.insert(frame, &mut self.ready)? > 0 {
                    self.live.delivered(Instant::now());
                } else {
                    Counters::add(&self.shared.counters.frames_held, 1);
                }
                Ok(())
            }
            _ => {
                self.ready.push_back(Frame {
                    header: hdr,
                    payload,
                });
                Ok(())
            }
        }
    }

    pub(super) fn deliver(&mut self) -> Result<(), TransportError> {
        if self.closing() {
            // close() is waiting for the flush; nobody reads inbound frames any more.
            self.ready.clear();
            return Ok(());
        }
        let Some(in_tx) = &self.in_tx else {
            self.ready.clear();
            return Ok(());
        };
        while let Some(f) = self.ready.pop_front() {
            match in_tx.try_send(f) {
                Ok(()) => {}
                Err(TrySendError::Full(f)) => {
                    self.shared.want_wake.store(true, Ordering::SeqCst);
                    // The consumer may have taken a frame before it could see the flag.
                    match in_tx.try_send(f) {
                        Ok(()) => continue,
                        Err(TrySendError::Full(f)) => self.ready.push_front(f),
                        Err(TrySendError::Disconnected(_)) => self.ready.clear(),
                    }
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.ready.clear();
                    break;
                }
            }
        }
        Ok(())
    }
}
