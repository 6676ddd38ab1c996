//! [`EmulatedDevice`]: a software VFIO migration v2 device that obeys the same contract as a
//! kernel driver, with a real kernel data fd.
//!
//! - **Data fd**: a file in a process-wide FUSE mount (`fuse.rs`), opened with
//!   `FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM | FOPEN_NOFLUSH`: every read and write
//!   (io_uring at offset -1 included) goes through the kernel to this device; `pread`/`pwrite`
//!   give ESPIPE; the offset of io_uring requests is ignored (as mtty does); reads may be short;
//!   a STOP_COPY read returns 0 at the end; a PRE_COPY read with nothing pending fails with
//!   ENOMSG (or returns 0 in the mtty quirk mode); the saving fd is `O_RDONLY` and the resuming
//!   fd `O_WRONLY` (EBADF the other way), and writes past the capacity or after the END record
//!   fail with ENOMEM. The kernel negotiates 1 MiB FUSE requests (`fs.fuse.max_pages_limit` =
//!   256 pages): a larger read is split by the kernel into sequential 1 MiB requests.
//!   Differences from a VFIO migration file that remain: the fd is a regular file on a `fuse`
//!   mount (not an anon inode); `epoll_ctl(ADD)` succeeds (mtty gives EPERM) while `poll`
//!   always reports readable, like mtty; and `VFIO_MIG_GET_PRECOPY_INFO` is not an ioctl on the
//!   fd but [`MigrationDevice::precopy_info`], which recognises the fd by `fstat`.
//! - **Memory-speed data fd** ([`DataFdBackend::Mem`], `data-fd=mem`): instead of a FUSE file,
//!   one end of a kernel pipe (`F_SETPIPE_SZ` 1 MiB) whose other end a device thread serves
//!   (`pipe.rs`; saving: records built into two alternating 1 MiB buffers that are `vmsplice`d
//!   into the pipe, so the caller's read is the only copy), with no FUSE request round trip. Kept: a
//!   real kernel fd that io_uring reads and writes at offset -1; `pread`/`pwrite` give ESPIPE;
//!   the saving fd is `O_RDONLY`, the resuming fd `O_WRONLY` (EBADF the other way); reads may be
//!   short; a STOP_COPY read returns 0 at the end of the stream, and again after it; the same
//!   record builder produces the stream and the same parser and END digest check validate it at
//!   RESUMING -> STOP (the device drains the pipe first), so a truncated or corrupt stream is
//!   still refused with EINVAL. Different: the device is STOP_COPY-only: a config with PRE_COPY
//!   is refused ([`EmulatedError::MemDataFd`]), because a pipe cannot fail a drained pre-copy
//!   read with ENOMSG (the read would block until more data came) and the up to 2 MiB it
//!   buffers ahead of the reader would make `precopy_info` count bytes as read that the caller
//!   has not read yet; `read_error_at` (a pipe cannot fail a read with EIO) and the
//!   `short_reads` quirk are refused too. Writes past the END record or the resume capacity
//!   are not failed with ENOMEM (the kernel has already taken them): they are counted and the
//!   stream is refused at RESUMING -> STOP ([`StreamError::Overflow`]). A stream that ends
//!   early (STOP_COPY -> STOP before the end, a reset, the device dropped) reads what the pipe
//!   holds, then 0, where a FUSE fd fails with ENODEV; once a resuming stream has ended, writes
//!   fail with EPIPE, raising SIGPIPE where it is not ignored, as any pipe (ENODEV on FUSE). MIG_DATA_SIZE during STOP_COPY does not count the bytes
//!   already in the pipe (up to 2 MiB). The fd must be read, not spliced or teed: pages spliced
//!   out of it could change when the generator reuses their buffer (a VFIO migration file cannot
//!   be spliced at all). No FUSE mount is needed, and the FUSE request counters in
//!   [`EmulatedStats`] stay 0.
//! - **Process exit**: the FUSE server runs in this process; a watchdog child process aborts the
//!   connection and unmounts if the process dies with a request in flight (otherwise the
//!   requester would wait forever). Mounts left by dead processes are cleaned up on start.
//! - **Content**: generated from `(seed, page, version)` ([`content`]), so memory does not grow
//!   with the state size: per block (64 KiB by default) the source keeps a version and a digest
//!   (16 bytes), the destination a digest and a bit.
//! - **Stream**: the device's own format ([`format`](mod@self::format)) with record sequence
//!   numbers, hashes and an END record carrying totals and the state digest. A destination device (created in RUNNING,
//!   moved to RESUMING) parses the stream incrementally and validates it on RESUMING -> STOP; any
//!   truncation, reordering, duplication or corruption makes that SET fail with EINVAL and leaves
//!   the device in ERROR. [`EmulatedDevice::state_digest`] on both sides proves the transfer.
//! - **Live state**: while running, state is dirtied at `dirty_rate` bytes/s (computed lazily
//!   from elapsed time on every device call and read), or explicitly with
//!   [`EmulatedDevice::dirty_blocks`]. PRE_COPY streams the initial blocks, then dirty ones.
//! - **P2P**: [`P2pFabric`] lets devices send MMIO writes to each other; devices in STOP-like
//!   states discard them (counted as lost), RUNNING_P2P accepts them but sends none.
//! - **DMA logging**: over a memfd guest region ([`GuestMemory`]), read-and-clear.
//! - **Faults**: see [`Faults`].

mod bits;
pub mod config;
pub mod content;
pub mod format;
mod fuse;
pub mod guest;
mod p2p;
mod pipe;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::device::{MigrationDevice, PrecopyInfo};
use crate::dma::IovaRange;
use crate::error::DeviceError;
use crate::op;
use crate::state::{path, DeviceState, MigrationCaps, Transition};

use self::bits::BitSet;
pub use self::config::{
    DataFdBackend, EmulatedConfig, FailArc, Faults, GuestConfig, PrecopyEmptyRead,
    PrecopyInfoVersion, Quirks, StopCopyFd, DEFAULT_BLOCK_SIZE,
};
pub use self::content::{Profile, PAGE_SIZE};
pub use self::format::StreamError;
use self::format::{Header, RecordKind, HEADER_LEN};
use self::fuse::{next_stream_id, FuseHost, StreamHandler};
use self::guest::DmaLog;
pub use self::guest::{GuestMemory, GUEST_PAGE_SIZE};
pub use self::p2p::{P2pFabric, P2pPort, P2pStats, P2pTraffic};

/// Why an emulated device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    /// A config field is out of range.
    #[error("emulated device config: {field} = {value} is invalid ({rule})")]
    BadConfig {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The FUSE mount that serves data fds could not be set up.
    #[error("emulated device data fd host (FUSE mount): {0}")]
    Host(#[source] io::Error),
    /// The guest memory could not be created.
    #[error("emulated device guest memory: {0}")]
    Guest(#[source] io::Error),
    /// The config asks the memory-speed data fd ([`DataFdBackend::Mem`]) for something a pipe
    /// cannot do faithfully.
    #[error("emulated device config: data-fd=mem does not support {feature}: {why}")]
    MemDataFd {
        /// What was asked for.
        feature: &'static str,
        /// Why a pipe cannot offer it.
        why: &'static str,
    },
}

/// Largest emulated state: 1 TiB (metadata is 16 bytes per block).
pub const MAX_SIZE: u64 = 1 << 40;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Which part of the state a record belongs to (for precopy_info accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Initial,
    Dirty,
    StopCopyOnly,
}

/// The saving side of one data fd.
#[derive(Debug)]
struct SaveStream {
    id: u64,
    /// A dup of the data fd, kept only for the `StopCopyFd::Dup` quirk.
    fd: Option<OwnedFd>,
    seq: u64,
    offset: u64,
    hello_sent: bool,
    end_sent: bool,
    /// Blocks not sent yet in this stream.
    unsent: BitSet,
    unsent_cursor: u64,
    /// Blocks sent, then dirtied.
    dirty: BitSet,
    dirty_cursor: u64,
    /// Blocks `< initial_blocks` are PRE_COPY initial data.
    initial_blocks: u64,
    /// Blocks that became initial data again when the device re-initialised (v2).
    reinit: BitSet,
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
    mem: Option<pipe::StreamStop>,
}

/// The resuming side of one data fd; locked by the FUSE session thread on writes (or by the
/// pipe's consumer thread), so it is not behind the device lock (no lock is held across `open()`
/// of a data fd).
#[derive(Debug)]
struct ResumeStream {
    id: u64,
    parser: format::Parser,
    capacity: u64,
    active: bool,
    /// Memory-speed data fd: the device's end of the pipe.
    mem: Option<pipe::PipeIn>,
    /// Read buffer for `mem`.
    buf: Vec<u8>,
    /// Memory-speed data fd: bytes that arrived after END or past `capacity` (a FUSE write of
    /// them fails with ENOMEM; a pipe cannot fail them, so the stream is refused at the end).
    overflow: u64,
}

impl ResumeStream {
    /// Feeds what a write gives: the bytes taken, or the errno a FUSE write fails with.
    fn accept(&mut self, data: &[u8]) -> Result<usize, i32> {
        if !self.active {
            return Err(libc::ENODEV);
        }
        let room = self.capacity.saturating_sub(self.parser.bytes());
        if room == 0 {
            return Err(libc::ENOMEM);
        }
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let used = self.parser.feed(&data[..take]);
        if used == 0 && take > 0 {
            // Everything after END is refused: the state is complete.
            return Err(libc::ENOMEM);
        }
        Ok(used)
    }

    /// Feeds all of `data` (pipe): what [`accept`](Self::accept) refuses counts as overflow.
    fn accept_all(&mut self, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            match self.accept(&data[at..]) {
                Ok(n) if n > 0 => at += n,
                _ => {
                    self.overflow += (data.len() - at) as u64;
                    return;
                }
            }
        }
    }

    /// Memory-speed data fd: feeds what the pipe holds now, at most `max` bytes (`None`: all it
    /// held when called). False when nothing more can come (the caller closed its end) or the
    /// pipe failed.
    fn drain_pipe(&mut self, max: Option<u64>) -> bool {
        let Some(mut p) = self.mem.take() else {
            return false;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let ok = p.drain(&mut buf, max, |d| self.accept_all(d)).is_ok();
        let more = ok && !p.eof;
        self.buf = buf;
        self.mem = Some(p);
        more
    }

    /// Ends the stream: writes fail with ENODEV (FUSE) or EPIPE once the consumer thread ends
    /// (pipe).
    fn deactivate(&mut self) {
        self.active = false;
        if let Some(p) = &self.mem {
            p.stop();
        }
    }
}

#[derive(Debug)]
enum Stream {
    Save(Box<SaveStream>),
    Resume(Arc<Mutex<ResumeStream>>),
}

impl Stream {
    fn id(&self) -> u64 {
        match self {
            Stream::Save(s) => s.id,
            Stream::Resume(r) => lock(r).id,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters of an emulated device (for tests and reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedStats {
    /// Blocks dirtied since creation.
    pub blocks_dirtied: u64,
    /// Guest pages written by DMA since creation.
    pub dma_pages_written: u64,
    /// MMIO writes received and applied.
    pub mmio_accepted: u64,
    /// MMIO writes received while MMIO did not work (discarded).
    pub mmio_lost: u64,
    /// Largest FUSE READ request seen by the process-wide mount (the negotiated read size).
    pub max_read_request: u64,
    /// Largest FUSE WRITE request seen by the process-wide mount.
    pub max_write_request: u64,
    /// Re-initialisations in PRE_COPY (`reinit_after`).
    pub precopy_reinits: u64,
    /// The `initial_bytes` a `precopy_info` would have reported when the device last left
    /// PRE_COPY for STOP_COPY (0: every initial byte was read in PRE_COPY).
    pub initial_bytes_at_precopy_exit: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Core {
    cfg: EmulatedConfig,
    caps: MigrationCaps,
    blocks: u64,
    block_size: u64,
    state: DeviceState,
    versions: Vec<u32>,
    hashes: Vec<u64>,
    /// Version each `hashes` entry was computed at (`u32::MAX`: none).
    hashed: Vec<u32>,
    stream: Option<Stream>,
    /// After a successful resume: the imported state's digest. The device then holds a state it
    /// cannot regenerate, and refuses to save until reset.
    imported: Option<[u8; 32]>,
    last_resume_error: Option<StreamError>,
    rng: content::WyRand,
    last_tick: Instant,
    dirty_carry: u128,
    dma_carry: u128,
    fail_arc_used: bool,
    guest: Option<Arc<GuestMemory>>,
    dma_log: DmaLog,
    dma_counter: u64,
    stats: EmulatedStats,
    /// The MMIO BAR: a small register file (not part of the migrated stream; an applied write
    /// also dirties a state block, which is).
    mmio: [u64; MMIO_REGS],
    /// `MIG_PRECOPY_INFOv2` was opted in to (lasts for the device's life, as for an open fd).
    precopy_info_v2: bool,
}

/// Most bytes the memory-speed data fd's consumer feeds per wake-up, under the resume lock.
const CONSUMER_BURST: u64 = 8 << 20;

/// 64-bit registers in the emulated MMIO BAR.
pub const MMIO_REGS: usize = 64;

impl Core {
    fn block_len(&self, i: u64) -> u64 {
        self.block_size.min(self.cfg.size - i * self.block_size)
    }

    /// Record bytes of the blocks in `set` (all full-size but possibly the last one).
    fn set_bytes(&self, set: &BitSet) -> u64 {
        let full = set.count() * (HEADER_LEN as u64 + self.block_size);
        let last = self.blocks - 1;
        if set.contains(last) {
            full - (self.block_size - self.block_len(last))
        } else {
            full
        }
    }

    fn vidx(i: u64) -> usize {
        // Block indices are < `blocks`, which was checked to fit in usize at creation.
        usize::try_from(i).unwrap_or(usize::MAX)
    }

    /// Lazily applies the time-driven activity since the last call: dirtying and DMA writes.
    fn tick(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_tick).as_nanos();
        self.last_tick = now;
        if !self.state.is_running() {
            return;
        }
        if self.cfg.dirty_rate > 0 {
            self.dirty_carry += elapsed * u128::from(self.cfg.dirty_rate);
            let per_block = u128::from(self.block_size) * 1_000_000_000;
            let n = (self.dirty_carry / per_block).min(u128::from(self.blocks));
            self.dirty_carry -= n * per_block;
            // n <= blocks, a u64.
            let n = u64::try_from(n).unwrap_or(self.blocks);
            if n >= self.blocks {
                // Everything is dirty already; do not carry a backlog.
                self.dirty_carry = 0;
            }
            self.dirty_random(n);
        }
        if let Some(g) = self.cfg.guest.filter(|g| g.dma_pages_per_sec > 0) {
            self.dma_carry += elapsed * u128::from(g.dma_pages_per_sec);
            let pages = g.len / GUEST_PAGE_SIZE;
            let n = (self.dma_carry / 1_000_000_000).min(u128::from(pages));
            self.dma_carry -= n * 1_000_000_000;
            self.dma_random(u64::try_from(n).unwrap_or(pages));
        }
    }

    fn dirty_random(&mut self, n: u64) {
        for _ in 0..n {
            let i = self.rng.below(self.blocks);
            self.dirty_block(i);
        }
    }

    fn dirty_block(&mut self, i: u64) {
        if i >= self.blocks {
            return;
        }
        let v = &mut self.versions[Self::vidx(i)];
        // Version u32::MAX is reserved for "no hash"; skip it.
        *v = match v.wrapping_add(1) {
            u32::MAX => 0,
            n => n,
        };
        self.stats.blocks_dirtied += 1;
        if let Some(Stream::Save(s)) = &mut self.stream {
            if !s.unsent.contains(i) && !s.reinit.contains(i) {
                s.dirty.insert(i);
            }
        }
    }

    fn dma_random(&mut self, n: u64) {
        let Some(g) = self.guest.clone() else { return };
        for _ in 0..n {
            let page = self.rng.below(g.pages());
            self.dma_write(&g, page);
        }
    }

    fn dma_write(&mut self, g: &GuestMemory, page: u64) {
        self.dma_counter += 1;
        if let Ok(iova) = g.dma_write_page(page, self.cfg.seed, self.dma_counter) {
            self.dma_log.record(iova, GUEST_PAGE_SIZE);
            self.stats.dma_pages_written += 1;
        }
    }

    /// The digest of block `i` at its current version, generating it if needed.
    fn block_hash(&mut self, i: u64, scratch: &mut Vec<u8>) -> u64 {
        let k = Self::vidx(i);
        if self.hashed[k] == self.versions[k] {
            return self.hashes[k];
        }
        let len = Self::vidx(self.block_len(i));
        scratch.resize(len, 0);
        content::fill_range(
            self.cfg.profile,
            self.cfg.seed,
            i * self.block_size,
            self.versions[k],
            scratch,
        );
        let h = xxh3_64(scratch);
        self.hashes[k] = h;
        self.hashed[k] = self.versions[k];
        h
    }

    fn state_digest(&mut self) -> [u8; 32] {
        if let Some(d) = self.imported {
            return d;
        }
        let mut scratch = Vec::new();
        for i in 0..self.blocks {
            self.block_hash(i, &mut scratch);
        }
        format::state_digest(self.cfg.size, self.block_size, self.hashes.iter().copied())
    }

    fn new_save_stream(&self, id: u64, precopy: bool) -> SaveStream {
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

    fn save(&mut self) -> Option<&mut SaveStream> {
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
    fn read_stream(&mut self, id: u64, buf: &mut [u8]) -> Result<usize, i32> {
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
    fn precopy_info(&mut self) -> PrecopyInfo {
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

    /// The device reconfigures itself in PRE_COPY (see [`EmulatedConfig::reinit_after`]): the
    /// blocks of its initial region change and must be sent again.
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
    fn precopy_sizes(&self) -> PrecopyInfo {
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

    fn stop_copy_size(&mut self) -> u64 {
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

struct SaveHandler {
    core: Arc<Mutex<Core>>,
    id: u64,
    slow: Option<Mutex<Throttle>>,
}

struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
}

/// Longest a slow device delays one reply.
const MAX_SLOW_DELAY: Duration = Duration::from_secs(10);

impl StreamHandler for SaveHandler {
    fn read(&self, out: &mut [u8]) -> Result<usize, i32> {
        let r = lock(&self.core).read_stream(self.id, out);
        if let (Some(t), Ok(n)) = (&self.slow, &r) {
            let due = {
                let mut t = lock(t);
                t.bytes += *n as u64;
                let nanos = u128::from(t.bytes) * 1_000_000_000 / u128::from(t.rate.max(1));
                t.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            };
            let wait = due
                .saturating_duration_since(Instant::now())
                .min(MAX_SLOW_DELAY);
            std::thread::sleep(wait);
        }
        r
    }

    fn write(&self, _data: &[u8]) -> Result<usize, i32> {
        Err(libc::EINVAL)
    }
}

struct ResumeHandler {
    stream: Arc<Mutex<ResumeStream>>,
}

impl StreamHandler for ResumeHandler {
    fn read(&self, _out: &mut [u8]) -> Result<usize, i32> {
        Err(libc::EINVAL)
    }

    fn write(&self, data: &[u8]) -> Result<usize, i32> {
        lock(&self.stream).accept(data)
    }
}

/// A software VFIO migration device; see the module docs.
///
/// ```no_run
/// use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};
/// use vfmig_vfio::{DeviceState, MigrationDevice};
/// let cfg = EmulatedConfig::new("gpu0", 64 << 20, 42).with_profile(Profile::Random);
/// let mut src = EmulatedDevice::new(cfg.clone()).unwrap();
/// let mut dst = src.destination().unwrap();
/// let data_fd = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
/// let resume_fd = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
/// // ... copy data_fd to resume_fd until read returns 0 ...
/// dst.set_state(DeviceState::Stop).unwrap();
/// assert_eq!(src.state_digest(), dst.state_digest());
/// ```
#[derive(Debug)]
pub struct EmulatedDevice {
    name: String,
    caps: MigrationCaps,
    core: Arc<Mutex<Core>>,
    /// The FUSE mount serving data fds (`None` with the memory-speed data fd).
    host: Option<Arc<FuseHost>>,
}

impl EmulatedDevice {
    /// Creates a device in RUNNING. Mounts the process-wide FUSE host on first use (FUSE data
    /// fd only; a [`DataFdBackend::Mem`] device needs no FUSE).
    pub fn new(cfg: EmulatedConfig) -> Result<EmulatedDevice, EmulatedError> {
        let bad = |field, value, rule| EmulatedError::BadConfig { field, value, rule };
        if cfg.data_fd == DataFdBackend::Mem {
            let refuse = |feature, why| Err(EmulatedError::MemDataFd { feature, why });
            if cfg.precopy.is_some() {
                return refuse(
                    "PRE_COPY (precopy)",
                    "a pipe cannot fail a drained pre-copy read with ENOMSG (it would block) and \
                     the bytes it buffers would skew precopy_info; use precopy=off (no PRE_COPY \
                     capability) or data-fd=fuse",
                );
            }
            if cfg.faults.read_error_at.is_some() {
                return refuse("read-error-at", "a pipe cannot fail a read with EIO");
            }
            if cfg.quirks.short_reads {
                return refuse(
                    "the short-reads quirk",
                    "a pipe read returns what the pipe holds, across record boundaries",
                );
            }
        }
        if cfg.size == 0 || cfg.size % PAGE_SIZE as u64 != 0 || cfg.size > MAX_SIZE {
            return Err(bad(
                "size",
                cfg.size,
                "a non-zero multiple of 4096, at most 1 TiB",
            ));
        }
        if cfg.block_size == 0 || cfg.block_size % PAGE_SIZE as u64 != 0 || cfg.block_size > 1 << 24
        {
            return Err(bad(
                "block_size",
                cfg.block_size,
                "a non-zero multiple of 4096, at most 16 MiB",
            ));
        }
        let block_size = cfg.block_size.min(cfg.size);
        let blocks = cfg.size.div_ceil(block_size);
        let n = usize::try_from(blocks).map_err(|_| bad("size", cfg.size, "too many blocks"))?;
        let guest = match cfg.guest {
            Some(g) => Some(Arc::new(
                GuestMemory::new(g.iova, g.len).map_err(EmulatedError::Guest)?,
            )),
            None => None,
        };
        let host = match cfg.data_fd {
            DataFdBackend::Fuse => Some(FuseHost::get().map_err(EmulatedError::Host)?),
            DataFdBackend::Mem => None,
        };
        let core = Core {
            caps: cfg.caps(),
            blocks,
            block_size,
            state: DeviceState::Running,
            versions: vec![0; n],
            hashes: vec![0; n],
            hashed: vec![u32::MAX; n],
            stream: None,
            imported: None,
            last_resume_error: None,
            rng: content::WyRand::new(content::mix64(cfg.seed ^ 0xD1B5_4A32_D192_ED03)),
            last_tick: Instant::now(),
            dirty_carry: 0,
            dma_carry: 0,
            fail_arc_used: false,
            guest,
            dma_log: DmaLog::default(),
            dma_counter: 0,
            mmio: [0; MMIO_REGS],
            precopy_info_v2: false,
            stats: EmulatedStats::default(),
            cfg,
        };
        Ok(EmulatedDevice {
            name: core.cfg.name.clone(),
            caps: core.caps,
            core: Arc::new(Mutex::new(core)),
            host,
        })
    }

    /// A destination device for this one: same config (size, block size, caps, quirks, guest
    /// memory size), no faults, no dirtying, in RUNNING; the caller moves it to RESUMING.
    pub fn destination(&self) -> Result<EmulatedDevice, EmulatedError> {
        let mut cfg = self.config();
        cfg.name = format!("{}-dst", cfg.name);
        cfg.faults = Faults::default();
        cfg.dirty_rate = 0;
        if let Some(g) = &mut cfg.guest {
            g.dma_pages_per_sec = 0;
        }
        EmulatedDevice::new(cfg)
    }

    /// The config the device was made with.
    pub fn config(&self) -> EmulatedConfig {
        lock(&self.core).cfg.clone()
    }

    /// Replaces the injected faults (e.g. to arm a fault after set-up).
    pub fn set_faults(&self, faults: Faults) {
        let mut c = lock(&self.core);
        c.cfg.faults = faults;
        c.fail_arc_used = false;
    }

    /// The digest of the device's current state (see [`format`](mod@self::format)). On a source
    /// it regenerates the blocks it has not hashed yet (cost: one pass over the state); on a
    /// destination it is the digest of the state it resumed (later writes to that state are not
    /// tracked: a resumed device holds digests, not bytes). `None` while a resume is incomplete
    /// and in ERROR (a refused resume or a failed SET leaves the state undefined until reset).
    pub fn state_digest(&self) -> Option<[u8; 32]> {
        let mut c = lock(&self.core);
        if matches!(c.stream, Some(Stream::Resume(_))) || c.state == DeviceState::Error {
            return None;
        }
        Some(c.state_digest())
    }

    /// Why the last RESUMING -> STOP failed, if it did.
    pub fn last_resume_error(&self) -> Option<StreamError> {
        lock(&self.core).last_resume_error.clone()
    }

    /// Dirties `n` pseudo-random blocks now, at most as many as the state has blocks per call
    /// (the device lock is held meanwhile); only while running. Returns how many were dirtied.
    pub fn dirty_blocks(&self, n: u64) -> u64 {
        let mut c = lock(&self.core);
        if !c.state.is_running() {
            return 0;
        }
        let n = n.min(c.blocks);
        c.dirty_random(n);
        n
    }

    /// The guest memory, when configured.
    pub fn guest_memory(&self) -> Option<Arc<GuestMemory>> {
        lock(&self.core).guest.clone()
    }

    /// Performs `n` device DMA writes to pseudo-random guest pages now, at most as many as the
    /// guest memory has pages per call; only while running. Returns the IOVAs written.
    pub fn dma_write_pages(&self, n: u64) -> Vec<u64> {
        let mut c = lock(&self.core);
        let Some(g) = c.guest.clone() else {
            return Vec::new();
        };
        if !c.state.is_running() {
            return Vec::new();
        }
        let n = n.min(g.pages());
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            let page = c.rng.below(g.pages());
            c.dma_write(&g, page);
            out.push(g.iova() + page * GUEST_PAGE_SIZE);
        }
        out
    }

    /// Counters.
    pub fn stats(&self) -> EmulatedStats {
        let mut s = lock(&self.core).stats;
        if let Some(host) = &self.host {
            let (r, w) = host.max_requests();
            s.max_read_request = r;
            s.max_write_request = w;
        }
        s
    }

    /// A port other devices' P2P writes reach this device through.
    pub fn p2p_port(&self) -> P2pPort {
        P2pPort::new(self.core.clone(), self.name.clone())
    }

    /// An MMIO write to this device: applied (dirtying device state) if MMIO works in the
    /// current state, otherwise discarded. Returns whether it was applied.
    pub fn mmio_write(&self, offset: u64, value: u64) -> bool {
        self.p2p_port().mmio_write(offset, value)
    }

    /// An MMIO read: the register at `offset` while MMIO works, zero in STOP-like states.
    pub fn mmio_read(&self, offset: u64) -> u64 {
        self.p2p_port().mmio_read(offset)
    }

    /// Where the FUSE host is mounted (for diagnostics); empty with the memory-speed data fd.
    pub fn data_fd_mountpoint(&self) -> std::path::PathBuf {
        self.host
            .as_ref()
            .map(|h| h.mountpoint().to_path_buf())
            .unwrap_or_default()
    }

    /// The kind of data fd this device hands out.
    pub fn data_fd_backend(&self) -> DataFdBackend {
        lock(&self.core).cfg.data_fd
    }

    fn no_dma_logging(&self, op: &'static str) -> DeviceError {
        DeviceError::Unsupported {
            device: self.name.clone(),
            op,
            feature: op::DMA_LOGGING_START,
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    /// Ends the current stream (the data fd then reads/writes ENODEV).
    fn end_stream(c: &mut Core) {
        if let Some(Stream::Resume(r)) = c.stream.take() {
            lock(&r).deactivate();
        }
    }

    fn open_save(&self, c: &mut Core, precopy: bool) -> io::Result<OwnedFd> {
        if c.imported.is_some() {
            // A resumed device holds state it cannot regenerate (it keeps digests only).
            return Err(errno(libc::EOPNOTSUPP));
        }
        let slow = c.cfg.faults.slow_bytes_per_sec.map(|rate| {
            Mutex::new(Throttle {
                rate,
                start: Instant::now(),
                bytes: 0,
            })
        });
        let id = next_stream_id();
        let handler = SaveHandler {
            core: self.core.clone(),
            id,
            slow,
        };
        let (fd, mem) = match &self.host {
            // The device lock is held across open(): the FUSE session thread never takes it
            // (reads are served by the stream's worker thread, writes use the resume stream's
            // lock).
            Some(host) => (host.open_stream(id, Arc::new(handler), false)?, None),
            // The generator takes the device lock per chunk, so it starts once this SET is done.
            None => {
                let (fd, stop) =
                    pipe::spawn_saver(format!("vfmig-emu-p{id}"), move |buf| handler.read(buf))?;
                (fd, Some(stop))
            }
        };
        let mut s = c.new_save_stream(id, precopy);
        s.mem = mem;
        if c.cfg.quirks.stop_copy_fd == StopCopyFd::Dup {
            s.fd = Some(fd.try_clone()?);
        }
        c.stream = Some(Stream::Save(Box::new(s)));
        Ok(fd)
    }

    fn open_resume(&self, c: &mut Core) -> io::Result<OwnedFd> {
        let full = c.stop_copy_size_full();
        let capacity = c.cfg.resume_capacity.unwrap_or(full.saturating_mul(4));
        let id = next_stream_id();
        let rs = Arc::new(Mutex::new(ResumeStream {
            id,
            parser: format::Parser::new(c.cfg.size, c.block_size),
            capacity,
            active: true,
            mem: None,
            buf: Vec::new(),
            overflow: 0,
        }));
        let fd = match &self.host {
            Some(host) => {
                let handler = Arc::new(ResumeHandler { stream: rs.clone() });
                host.open_stream(id, handler, true)?
            }
            None => {
                let (fd, pipe_in) = pipe::resume_pipe()?;
                // The consumer waits for this lock, so it sees `mem` set.
                let mut r = lock(&rs);
                let consumer = rs.clone();
                pipe_in.spawn(format!("vfmig-emu-p{id}"), move || {
                    let mut r = lock(&consumer);
                    // Bounded per wake-up; the next poll finds the rest.
                    r.drain_pipe(Some(CONSUMER_BURST)) && r.active
                })?;
                r.mem = Some(pipe_in);
                drop(r);
                fd
            }
        };
        c.stream = Some(Stream::Resume(rs));
        Ok(fd)
    }

    /// One arc. `Ok(Some(fd))` when the arc returns a data fd.
    fn step(&self, c: &mut Core, arc: Transition) -> io::Result<Option<OwnedFd>> {
        use DeviceState::*;
        if let Some(f) = c.cfg.faults.fail_arc {
            if f.arc == arc && !(f.once && c.fail_arc_used) {
                c.fail_arc_used = true;
                if f.to_error {
                    Self::end_stream(c);
                    c.state = Error;
                }
                return Err(errno(libc::EIO));
            }
        }
        if matches!(
            (arc.from, arc.to),
            (Running, RunningP2p) | (PreCopy, PreCopyP2p)
        ) {
            // Quiescing: the DMA still outstanding completes before the device holds still.
            let n = c.cfg.guest.map_or(0, |g| g.quiesce_dma_pages);
            c.dma_random(n);
        }
        if matches!(arc.from, PreCopy | PreCopyP2p) && arc.to == StopCopy {
            c.stats.initial_bytes_at_precopy_exit = Some(c.precopy_sizes().initial_bytes);
        }
        let fd = match (arc.from, arc.to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => Some(self.open_save(c, true)?),
            (Stop, StopCopy) => Some(self.open_save(c, false)?),
            (Stop, Resuming) => Some(self.open_resume(c)?),
            (PreCopy, PreCopyP2p) | (PreCopyP2p, PreCopy) => None,
            (PreCopyP2p, StopCopy) | (PreCopy, StopCopy) => match c.save() {
                Some(s) => match &s.fd {
                    Some(fd) => Some(fd.try_clone()?),
                    None => None,
                },
                None => None,
            },
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
                c.stream = None;
                None
            }
            (Resuming, Stop) => {
                self.finish_resume(c)?;
                None
            }
            _ => None,
        };
        c.state = arc.to;
        Ok(fd)
    }

    fn finish_resume(&self, c: &mut Core) -> io::Result<()> {
        let Some(Stream::Resume(rs)) = c.stream.take() else {
            return Ok(());
        };
        let refused = c.cfg.faults.refuse_resume;
        let result = {
            let mut r = lock(&rs);
            // A pipe may still hold bytes written before this SET: take them first.
            if r.mem.is_some() {
                r.drain_pipe(None);
            }
            // Bytes a FUSE fd would have refused at write time are the first failure.
            let result = match r.overflow {
                0 => r.parser.finish(),
                bytes => Err(StreamError::Overflow {
                    bytes,
                    capacity: r.capacity,
                }),
            };
            // Writes end with the stream, unless the device stays RESUMING with it (quirk).
            if !((result.is_err() || refused) && c.cfg.quirks.refusal_stays_resuming) {
                r.deactivate();
            }
            result
        };
        match result {
            Ok(digest) if !refused => {
                c.imported = Some(digest);
                c.last_resume_error = None;
                Ok(())
            }
            other => {
                c.last_resume_error = other.err();
                if c.cfg.quirks.refusal_stays_resuming {
                    // mtty: still RESUMING, the same (refused) stream; only a reset leaves.
                    c.stream = Some(Stream::Resume(rs));
                } else {
                    c.state = DeviceState::Error;
                }
                Err(errno(libc::EINVAL))
            }
        }
    }
}

impl Core {
    /// Whether MMIO works now (see [`Quirks::stop_serves_mmio`]).
    pub(crate) fn mmio_works(&self) -> bool {
        if self.cfg.quirks.stop_serves_mmio {
            self.state != DeviceState::Error
        } else {
            self.state.mmio_works()
        }
    }

    fn stop_copy_size_full(&self) -> u64 {
        (HEADER_LEN + format::HELLO_LEN) as u64
            + self.set_bytes(&BitSet::full(self.blocks))
            + (HEADER_LEN + format::END_LEN) as u64
    }
}

impl MigrationDevice for EmulatedDevice {
    fn name(&self) -> &str {
        &self.name
    }

    /// Its size, and its content (seed, profile) and record format (block size) as the
    /// compatibility identifier: a stream of another content fails validation at the end.
    fn identity(&self) -> crate::device::Identity {
        let c = self.core();
        crate::device::Identity {
            class: crate::device::DeviceClass::Emulated,
            size: Some(c.cfg.size),
            compat: format!(
                "seed={} profile={} block={}",
                c.cfg.seed,
                c.cfg.profile.as_str(),
                c.cfg.block_size
            ),
        }
    }

    fn capabilities(&self) -> MigrationCaps {
        self.caps
    }

    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        let mut c = self.core();
        c.tick();
        Ok(c.state)
    }

    /// Like a kernel driver's `migration_set_state`: a SET to a non-adjacent state walks the
    /// kernel's path internally, and only the last arc may return a data fd.
    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        let mut c = self.core();
        c.tick();
        let arcs = path(c.state, next, self.caps).map_err(|_| errno(libc::EINVAL))?;
        let last = arcs.len().saturating_sub(1);
        let mut out = None;
        for (k, arc) in arcs.into_iter().enumerate() {
            let fd = self.step(&mut c, arc)?;
            if fd.is_some() && k != last {
                return Err(errno(libc::EINVAL));
            }
            out = fd;
        }
        Ok(out)
    }

    fn precopy_info(&mut self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        // (A memory-speed device has no PRE_COPY, so the state check below refuses first.)
        let stream = self.host.as_ref().and_then(|h| h.stream_of(data_fd));
        let mut c = self.core();
        if !matches!(c.state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
            return Err(DeviceError::WrongState {
                device: self.name.clone(),
                op: op::PRECOPY_INFO,
                state: c.state,
            });
        }
        let current = c.stream.as_ref().map(Stream::id);
        match stream {
            Some(id) if Some(id) == current => Ok(c.precopy_info()),
            Some(_) => Err(DeviceError::Ioctl {
                device: self.name.clone(),
                op: op::PRECOPY_INFO,
                source: errno(libc::EINVAL),
            }),
            None => Err(DeviceError::Ioctl {
                device: self.name.clone(),
                op: op::PRECOPY_INFO,
                source: errno(libc::ENOTTY),
            }),
        }
    }

    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        let mut c = self.core();
        // As the kernel: only offered with v2 support, and refused without PRE_COPY (the
        // PROBE fails, so the caller keeps v1).
        let offered = c.cfg.precopy_info == PrecopyInfoVersion::V2
            && self.caps.contains(MigrationCaps::PRE_COPY);
        c.precopy_info_v2 |= offered;
        Ok(offered)
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(self.core().stop_copy_size())
    }

    fn dma_logging_start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DeviceError> {
        let mut c = self.core();
        if c.guest.is_none() {
            return Err(self.no_dma_logging(op::DMA_LOGGING_START));
        }
        c.tick();
        c.dma_log
            .start(ranges, page_size)
            .map_err(|source| DeviceError::DmaLogging {
                device: self.name.clone(),
                source,
            })
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let mut c = self.core();
        if c.guest.is_none() {
            return Err(self.no_dma_logging(op::DMA_LOGGING_REPORT));
        }
        c.tick();
        c.dma_log
            .report(iova, length, page_size, bitmap)
            .map_err(|source| DeviceError::DmaLogging {
                device: self.name.clone(),
                source,
            })
    }

    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        let mut c = self.core();
        if c.guest.is_none() {
            return Err(self.no_dma_logging(op::DMA_LOGGING_STOP));
        }
        c.dma_log.stop().map_err(|source| DeviceError::DmaLogging {
            device: self.name.clone(),
            source,
        })
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let mut c = self.core();
        Self::end_stream(&mut c);
        c.imported = None;
        c.state = DeviceState::Running;
        c.last_tick = Instant::now();
        Ok(())
    }
}

impl Drop for EmulatedDevice {
    fn drop(&mut self) {
        // Open data fds outlive the device: end their stream so they read/write ENODEV.
        Self::end_stream(&mut self.core());
    }
}
