//! The saving side of a data fd: the stream's progress ([`SaveStream`]), the records it is
//! built from (HELLO, blocks in order: unsent, re-initialised, dirty; END), the PRE_COPY
//! re-initialisation, and the sizes `precopy_info` and `MIG_DATA_SIZE` report.

use std::os::fd::OwnedFd;

use xxhash_rust::xxh3::xxh3_64;

use crate::device::PrecopyInfo;
use crate::state::DeviceState;

use super::bits::BitSet;
use super::format::{self, Header, RecordKind, HEADER_LEN};
use super::model::{Core, Stream};
use super::{content, pipe, PrecopyEmptyRead};

/// Which part of the state a record belongs to (for precopy_info accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Initial,
    Dirty,
    StopCopyOnly,
}

/// The saving side of one data fd.
#[derive(Debug)]
pub(super) struct SaveStream {
    pub(super) id: u64,
    /// A dup of the data fd, kept only for the `StopCopyFd::Dup` quirk.
    pub(super) fd: Option<OwnedFd>,
    seq: u64,
    offset: u64,
    hello_sent: bool,
    end_sent: bool,
    /// Blocks not sent yet in this stream.
    pub(super) unsent: BitSet,
    unsent_cursor: u64,
    /// Blocks sent, then dirtied.
    pub(super) dirty: BitSet,
    dirty_cursor: u64,
    /// Blocks `< initial_blocks` are PRE_COPY initial data.
    initial_blocks: u64,
    /// Blocks that became initial data again when the device re-initialised (v2).
    pub(super) reinit: BitSet,
    /// The re-initialisation of `reinit_after` happened (once per stream).
    reinit_done: bool,
    /// `VFIO_PRECOPY_INFO_REINIT` is still to be reported.
    reinit_report: bool,
    /// A `precopy_info` reported `initial_bytes` = 0.
    zero_reported: bool,
    payload_bytes: u64,
    /// The record being read out.
    cur: Vec<u8>,
    cur_pos: usize,
    cur_class: Class,
    broken: bool,
    /// Memory-speed data fd: ends the generator thread when the stream is dropped.
    pub(super) mem: Option<pipe::StreamStop>,
}

impl Core {
    pub(super) fn new_save_stream(&self, id: u64, precopy: bool) -> SaveStream {
        let initial_blocks = match (precopy, self.cfg.precopy) {
            (true, Some(n)) => n.div_ceil(self.block_size).min(self.blocks),
            _ => 0,
        };
        SaveStream {
            id,
            fd: None,
            seq: 0,
            offset: 0,
            hello_sent: false,
            end_sent: false,
            unsent: BitSet::full(self.blocks),
            unsent_cursor: 0,
            dirty: BitSet::new(self.blocks),
            dirty_cursor: 0,
            initial_blocks,
            reinit: BitSet::new(self.blocks),
            reinit_done: false,
            reinit_report: false,
            zero_reported: false,
            payload_bytes: 0,
            cur: Vec::new(),
            cur_pos: 0,
            cur_class: Class::Initial,
            broken: false,
            mem: None,
        }
    }

    pub(super) fn save(&mut self) -> Option<&mut SaveStream> {
        match &mut self.stream {
            Some(Stream::Save(s)) => Some(s),
            _ => None,
        }
    }

    /// Builds the next record of the saving stream: appended to `out` when `direct` (it fits
    /// whole), else into `s.cur` to be read out piecewise. False when nothing is pending.
    fn next_record(&mut self, stop_copy: bool, out: &mut SliceSink<'_>, direct: bool) -> bool {
        let Some(Stream::Save(mut s)) = self.stream.take() else {
            return false;
        };
        let made = if direct {
            self.next_record_in(&mut s, stop_copy, out).is_some()
        } else {
            let mut cur = std::mem::take(&mut s.cur);
            cur.clear();
            s.cur_pos = 0;
            let class = self.next_record_in(&mut s, stop_copy, &mut cur);
            s.cur = cur;
            if let Some(c) = class {
                s.cur_class = c;
            }
            class.is_some()
        };
        self.stream = Some(Stream::Save(s));
        made
    }

    /// Appends the next record to `dst`; returns its class, `None` when nothing is pending.
    fn next_record_in(
        &mut self,
        s: &mut SaveStream,
        stop_copy: bool,
        dst: &mut dyn Sink,
    ) -> Option<Class> {
        if !s.hello_sent {
            let p = format::hello_payload(self.cfg.size, self.block_size, self.blocks);
            push_record(s, RecordKind::Hello, 0, &p, dst);
            s.hello_sent = true;
            return Some(Class::Initial);
        }
        let limit = if stop_copy {
            self.blocks
        } else {
            s.initial_blocks
        };
        let unsent = s.unsent.next_from(s.unsent_cursor).filter(|&i| i < limit);
        let (i, class) = if let Some(i) = unsent {
            s.unsent.remove(i);
            s.unsent_cursor = i + 1;
            (
                i,
                if i < s.initial_blocks {
                    Class::Initial
                } else {
                    Class::StopCopyOnly
                },
            )
        } else if let Some(i) = s.reinit.next_from(0) {
            s.reinit.remove(i);
            (i, Class::Initial)
        } else if let Some(i) = s.dirty.next_wrapping(s.dirty_cursor) {
            s.dirty.remove(i);
            s.dirty_cursor = i + 1;
            (i, Class::Dirty)
        } else if stop_copy && !s.end_sent {
            let digest = self.state_digest();
            let p = format::end_payload(s.seq, s.payload_bytes, self.blocks, &digest);
            push_record(s, RecordKind::End, 0, &p, dst);
            s.end_sent = true;
            return Some(Class::StopCopyOnly);
        } else {
            return None;
        };
        let len = Self::vidx(self.block_len(i));
        let k = Self::vidx(i);
        let version = self.versions[k];
        let rec = dst.grow(HEADER_LEN + len);
        let (hdr_slot, payload) = rec.split_at_mut(HEADER_LEN);
        content::fill_range(
            self.cfg.profile,
            self.cfg.seed,
            i * self.block_size,
            version,
            payload,
        );
        let h = xxh3_64(payload);
        self.hashes[k] = h;
        self.hashed[k] = version;
        let hdr = format::encode_header(&Header {
            kind: RecordKind::Block,
            seq: s.seq,
            index: i,
            // len <= block_size, checked to fit u32 at creation.
            len: u32::try_from(len).unwrap_or(u32::MAX),
            payload_hash: h,
        });
        hdr_slot.copy_from_slice(&hdr);
        s.seq += 1;
        s.payload_bytes += len as u64;
        Some(class)
    }

    /// A READ of `size` bytes on saving stream `id`.
    pub(super) fn read_stream(&mut self, id: u64, buf: &mut [u8]) -> Result<usize, i32> {
        let size = buf.len();
        self.tick();
        let state = self.state;
        let quirks = self.cfg.quirks;
        let faults = self.cfg.faults;
        let stop_copy = match state {
            DeviceState::StopCopy => true,
            DeviceState::PreCopy | DeviceState::PreCopyP2p => false,
            _ => return Err(libc::ENODEV),
        };
        let Some(s) = self.save() else {
            return Err(libc::ENODEV);
        };
        if s.id != id {
            return Err(libc::ENODEV);
        }
        if s.broken {
            return Err(libc::EIO);
        }
        let mut limit = size as u64;
        if let Some(n) = faults.read_error_at {
            if s.offset >= n {
                s.broken = true;
                return Err(libc::EIO);
            }
            limit = limit.min(n - s.offset);
        }
        if let Some(n) = faults.early_end_at {
            limit = limit.min(n.saturating_sub(s.offset));
        }
        let limit = usize::try_from(limit).unwrap_or(size);
        let max_record = HEADER_LEN + Self::vidx(self.block_size);
        let mut out = SliceSink { buf, len: 0 };
        while out.len < limit {
            let s = self.save().ok_or(libc::ENODEV)?;
            if s.cur_pos == s.cur.len() {
                if quirks.short_reads && out.len > 0 {
                    break;
                }
                // A record that fits whole is generated straight into the reply.
                let direct = !quirks.short_reads && limit - out.len >= max_record;
                if !self.next_record(stop_copy, &mut out, direct) {
                    break;
                }
                continue;
            }
            let take = (s.cur.len() - s.cur_pos).min(limit - out.len);
            out.extend(&s.cur[s.cur_pos..s.cur_pos + take]);
            s.cur_pos += take;
        }
        let s = self.save().ok_or(libc::ENODEV)?;
        s.offset += out.len as u64;
        if out.len == 0 && !stop_copy && size > 0 {
            return match quirks.precopy_empty_read {
                PrecopyEmptyRead::Enomsg => Err(libc::ENOMSG),
                PrecopyEmptyRead::Zero => Ok(0),
            };
        }
        Ok(out.len)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO`: the sizes, after the re-initialisation of `reinit_after`
    /// if it is due; `reinit` only once opted in to v2, once per re-initialisation.
    pub(super) fn precopy_info(&mut self) -> PrecopyInfo {
        self.tick();
        self.maybe_reinit();
        let mut info = self.precopy_sizes();
        let v2 = self.precopy_info_v2;
        if let Some(s) = self.save() {
            s.zero_reported |= info.initial_bytes == 0;
            info.reinit = v2 && std::mem::take(&mut s.reinit_report);
        }
        info
    }

    /// The device reconfigures itself in PRE_COPY (see
    /// [`EmulatedConfig::reinit_after`](super::EmulatedConfig::reinit_after)): the blocks of its
    /// initial region change and must be sent again.
    fn maybe_reinit(&mut self) {
        let Some(after) = self.cfg.reinit_after else {
            return;
        };
        if !matches!(self.state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
            return;
        }
        let v2 = self.precopy_info_v2;
        let Some(Stream::Save(mut s)) = self.stream.take() else {
            return;
        };
        if !s.reinit_done && s.zero_reported && s.offset >= after {
            s.reinit_done = true;
            self.stats.precopy_reinits += 1;
            let region = s.initial_blocks.clamp(1, self.blocks);
            for i in 0..region {
                let v = &mut self.versions[Self::vidx(i)];
                *v = match v.wrapping_add(1) {
                    u32::MAX => 0,
                    n => n,
                };
                // A block not sent yet goes out at its new version anyway.
                if !s.unsent.contains(i) {
                    let set = if v2 { &mut s.reinit } else { &mut s.dirty };
                    set.insert(i);
                }
            }
            if v2 {
                // As mlx5: what was dirty, and the rest of the record being read, precede the
                // new initial data on the stream and count as initial bytes; dirty_bytes is 0.
                let mut at = 0;
                while let Some(i) = s.dirty.next_from(at) {
                    s.dirty.remove(i);
                    s.reinit.insert(i);
                    at = i + 1;
                }
                if s.cur_class == Class::Dirty {
                    s.cur_class = Class::Initial;
                }
                s.reinit_report = true;
            }
        }
        self.stream = Some(Stream::Save(s));
    }

    /// `initial_bytes` and `dirty_bytes` of the saving stream now (no side effects).
    pub(super) fn precopy_sizes(&self) -> PrecopyInfo {
        let Some(Stream::Save(s)) = &self.stream else {
            return PrecopyInfo::default();
        };
        let rest = (s.cur.len() - s.cur_pos) as u64;
        let mut initial = 0;
        let mut dirty = 0;
        if !s.hello_sent {
            initial += (HEADER_LEN + format::HELLO_LEN) as u64;
        }
        // Unsent blocks below `initial_blocks`.
        let unsent_initial = s
            .initial_blocks
            .saturating_sub(s.unsent_cursor.min(s.initial_blocks));
        if unsent_initial > 0 {
            initial += unsent_initial * (HEADER_LEN as u64 + self.block_size);
            if s.initial_blocks == self.blocks && s.unsent.contains(self.blocks - 1) {
                initial -= self.block_size - self.block_len(self.blocks - 1);
            }
        }
        initial += self.set_bytes(&s.reinit);
        dirty += self.set_bytes(&s.dirty);
        match s.cur_class {
            Class::Initial => initial += rest,
            Class::Dirty => dirty += rest,
            Class::StopCopyOnly => {}
        }
        PrecopyInfo {
            initial_bytes: initial,
            dirty_bytes: dirty,
            reinit: false,
        }
    }

    pub(super) fn stop_copy_size(&mut self) -> u64 {
        self.tick();
        let end = (HEADER_LEN + format::END_LEN) as u64;
        let hello = (HEADER_LEN + format::HELLO_LEN) as u64;
        match &self.stream {
            Some(Stream::Save(s)) => {
                let mut n = self.set_bytes(&s.unsent) + self.set_bytes(&s.dirty);
                n += (s.cur.len() - s.cur_pos) as u64;
                if !s.hello_sent {
                    n += hello;
                }
                if !s.end_sent {
                    n += end;
                }
                n
            }
            _ => hello + self.set_bytes(&BitSet::full(self.blocks)) + end,
        }
    }

    pub(super) fn stop_copy_size_full(&self) -> u64 {
        (HEADER_LEN + format::HELLO_LEN) as u64
            + self.set_bytes(&BitSet::full(self.blocks))
            + (HEADER_LEN + format::END_LEN) as u64
    }
}

/// Where a record is built: the reply itself (a fixed slice) or the partial-record buffer.
trait Sink {
    /// Appends `n` bytes and returns them for the caller to fill completely.
    fn grow(&mut self, n: usize) -> &mut [u8];

    fn extend(&mut self, data: &[u8]) {
        self.grow(data.len()).copy_from_slice(data);
    }
}

impl Sink for Vec<u8> {
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let start = self.len();
        self.resize(start + n, 0);
        &mut self[start..]
    }
}

/// The front of a reply buffer, filled up to `len`.
struct SliceSink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Sink for SliceSink<'_> {
    fn grow(&mut self, n: usize) -> &mut [u8] {
        // Callers only build a whole record here after checking it fits (`max_record`).
        let start = self.len;
        self.len += n;
        &mut self.buf[start..start + n]
    }
}

fn push_record(
    s: &mut SaveStream,
    kind: RecordKind,
    index: u64,
    payload: &[u8],
    dst: &mut dyn Sink,
) {
    let hdr = format::encode_header(&Header {
        kind,
        seq: s.seq,
        index,
        // HELLO and END payloads are a few dozen bytes.
        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        payload_hash: xxh3_64(payload),
    });
    dst.extend(&hdr);
    dst.extend(payload);
    s.seq += 1;
}
