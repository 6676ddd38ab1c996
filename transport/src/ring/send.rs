//! The send path: frames from the session queue onto the connections, keepalives, the send
//! submissions and their completions.
//!
//! Frames from the session's bounded queue are striped to the least-loaded connection (ties go
//! round-robin, so frames that trickle in one at a time still use every connection). Per
//! connection one frame is in flight at a time: a `Send` of the 40-byte header linked
//! (`IOSQE_IO_LINK`) to the payload send, both with `MSG_WAITALL` so that a short transfer is
//! retried by the kernel and the stream stays framed. Payloads of at least `zerocopy_min` bytes go
//! out with `SendZc` from the registered pool buffer (`IORING_RECVSEND_FIXED_BUF`; the slot is
//! registered with this ring the first time it goes out that way).
//!
//! Measured (`cargo bench -p vfmig-transport --bench throughput`, kernel 6.18, loopback, 2 shared
//! cores, 1 MiB frames, 128 MiB per iteration): one connection moved 2.0 GiB/s with `Send` and
//! 1.5 GiB/s with `SendZc` (1.6 vs 0.9 GiB/s in a second, noisier run); four connections 2.25 vs
//! 0.86 GiB/s. In CPU time (`--bench cpu_per_gib`, immune to the machine's other load) both
//! cost the same, 0.37-0.38 s per GiB for both sides, while `SendZc` took 1.8x the wall time
//! (1.23 vs 2.26 GiB/s). The notification reports every zero-copy send as copied
//! (`IORING_NOTIF_USAGE_ZC_COPIED`): loopback copies the pages anyway, so `SendZc` pays the copy
//! plus page pinning and a second completion per frame. Plain `Send` wins where we can measure,
//! so the default `zerocopy_min` is `usize::MAX` (off). On a real NIC with large frames `SendZc`
//! avoids the copy into the socket buffer; operators turn it on with
//! `SessionConfig::zerocopy_min` (the path is tested and counted in `TransportStats`).

use std::time::Instant;

use crate::error::{FramePart, TransportError};
use crate::liveness::Ending;
use crate::stats::Counters;
use crate::uring::{Io, IoBuf, Sub};

use super::frame::{keepalive_frame, OutPayload};
use super::{errno_err, ures, Engine, Op, Rx, CONN_QUEUE_MAX};

impl Engine {
    /// Moves frames from the session queue to the least-loaded connections.
    pub(super) fn take_frames(&mut self) {
        if self.aborting() {
            return;
        }
        let n = self.conns.len().max(1);
        loop {
            let (live, after) = (&self.live, self.last_pick + 1);
            // Least loaded; among equally loaded connections the next after the last one picked,
            // so that frames trickling in one at a time still spread over every connection.
            let Some(best) = self
                .conns
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.wr_shut && !matches!(c.rx, Rx::Eof))
                .min_by_key(|(i, c)| {
                    (
                        c.queue.len() + usize::from(live.sending(*i)),
                        c.queued_bytes,
                        (i + n - after % n) % n,
                    )
                })
                .map(|(i, _)| i)
            else {
                return;
            };
            if self.conns[best].queue.len() >= CONN_QUEUE_MAX
                || self.outstanding >= self.p.window_bytes
            {
                return;
            }
            match self.out_rx.try_recv() {
                Ok(f) => {
                    self.outstanding += f.payload.len() as u64;
                    self.last_pick = best;
                    let c = &mut self.conns[best];
                    c.queued_bytes += self.head_len + f.payload.len();
                    c.queue.push_back(f);
                }
                Err(_) => return,
            }
        }
    }

    pub(super) fn schedule_keepalives(&mut self, now: Instant) {
        if self.live.ending() != Ending::Open {
            return;
        }
        let ms = u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        let head_len = self.head_len;
        for (i, c) in self.conns.iter_mut().enumerate() {
            if !c.wr_shut && c.queue.is_empty() && self.live.keepalive_due(i, now) {
                c.queue.push_back(keepalive_frame(ms));
                c.queued_bytes += head_len;
                Counters::add(&self.shared.counters.keepalives_sent, 1);
            }
        }
    }

    pub(super) fn submit_send(&mut self, i: usize) -> Result<(), TransportError> {
        let c = &mut self.conns[i];
        if self.live.sending(i) || c.wr_shut {
            return Ok(());
        }
        let Some(mut frame) = c.queue.pop_front() else {
            return Ok(());
        };
        let fd = c.sock.fd();
        let plen = frame.payload.len();
        let head_len = self.head_len;
        c.queued_bytes = c.queued_bytes.saturating_sub(head_len + plen);
        if let Some(s) = &mut c.sealing {
            // Sealed in sending order, so the counter in the nonce is the frame's position on
            // this connection; the tag replaces the CRC.
            let payload: &mut [u8] = match &mut frame.payload {
                OutPayload::Empty => &mut [],
                OutPayload::Pool(b) => b.as_mut_slice(),
                OutPayload::Heap(v) => v,
            };
            s.sealer
                .seal(&mut frame.hdr, payload)
                .map_err(|source| TransportError::Sealing { conn: i, source })?;
        }
        let now = Instant::now();
        self.live.send_started(i, now);
        let base = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let hdr_flags = if plen > 0 {
            base | libc::MSG_MORE
        } else {
            base
        };
        let hdr = Sub {
            io: Io::Send {
                fd,
                at: 0,
                len: head_len,
                flags: hdr_flags,
            },
            buf: IoBuf::Heap(frame.hdr),
            owner: Op::SendHeader {
                conn: i,
                last: plen == 0,
            },
        };
        if plen == 0 {
            self.push(vec![hdr], false)?;
        } else {
            // Only slots of the engine's pool can go out as fixed buffers (registered on first
            // use; where the kernel refuses to pin, a plain `Send`).
            let zc = match &frame.payload {
                OutPayload::Pool(b) if plen >= self.p.zerocopy_min => self.ring.fix(b).is_some(),
                _ => false,
            };
            let buf = match frame.payload {
                OutPayload::Empty => IoBuf::Empty,
                OutPayload::Pool(b) => IoBuf::Pool(b),
                OutPayload::Heap(v) => IoBuf::Heap(v.into_boxed_slice()),
            };
            let io = if zc {
                Counters::add(&self.shared.counters.zerocopy_sends, 1);
                Io::SendZc {
                    fd,
                    at: 0,
                    len: plen,
                    flags: base,
                }
            } else {
                Io::Send {
                    fd,
                    at: 0,
                    len: plen,
                    flags: base,
                }
            };
            let payload = Sub {
                io,
                buf,
                owner: Op::SendPayload { conn: i, len: plen },
            };
            self.push(vec![hdr, payload], true)?;
        }
        if self.sends_in_flight == 0 {
            self.busy_since = Some(now);
        }
        self.sends_in_flight += 1;
        Ok(())
    }

    fn send_done(&mut self, conn: usize, now: Instant) {
        self.live.send_done(conn, now);
        self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
        if self.sends_in_flight == 0 {
            if let Some(t) = self.busy_since.take() {
                let ns = u64::try_from(now.duration_since(t).as_nanos()).unwrap_or(u64::MAX);
                Counters::add(&self.shared.counters.send_busy_ns, ns);
            }
        }
    }

    /// The header of a frame is on the wire (the whole frame, if it has no payload).
    pub(super) fn complete_send_header(
        &mut self,
        conn: usize,
        last: bool,
        res: i32,
        now: Instant,
    ) -> Result<(), TransportError> {
        let counters = &self.shared.counters;
        if res < 0 {
            return Err(errno_err(conn, "send frame header", FramePart::Header, res));
        }
        if ures(res) != self.head_len {
            return Err(TransportError::Short {
                op: "send frame header",
                conn,
                done: ures(res),
                wanted: self.head_len,
            });
        }
        Counters::add(&counters.bytes_sent, self.head_len as u64);
        if last {
            Counters::add(&counters.frames_sent, 1);
            self.send_done(conn, now);
        }
        Ok(())
    }

    /// The payload of a frame is on the wire.
    pub(super) fn complete_send_payload(
        &mut self,
        conn: usize,
        len: usize,
        res: i32,
        now: Instant,
    ) -> Result<(), TransportError> {
        let counters = &self.shared.counters;
        // A zero-copy payload stays with the ring until the kernel's notification.
        if res < 0 {
            return Err(errno_err(
                conn,
                "send frame payload",
                FramePart::Payload,
                res,
            ));
        }
        if ures(res) != len {
            return Err(TransportError::Short {
                op: "send frame payload",
                conn,
                done: ures(res),
                wanted: len,
            });
        }
        Counters::add(&counters.bytes_sent, len as u64);
        Counters::add(&counters.frames_sent, 1);
        self.outstanding = self.outstanding.saturating_sub(len as u64);
        self.send_done(conn, now);
        Ok(())
    }
}
