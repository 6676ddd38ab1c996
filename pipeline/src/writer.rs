//! Destination last stage: write each device's decoded stream, in sequence order, into its
//! RESUMING data fd with io_uring `WriteFixed` at offset -1, one write in flight per fd, short
//! writes resubmitted. The stream digest (`crate::digest`) of what is written is folded here in
//! stream order from the decode workers' chunk hashes and checked with the length against the
//! source's `EndOfDevice`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use vfmig_transport::{BufPool, PoolBuf};

use crate::api::Notice;
use crate::codec::Decoded;
use crate::digest::StreamDigest;
use crate::error::{Phase, PipelineError};
use crate::guest::GuestMemoryAccess;
use crate::reseq::Resequencer;
use crate::stages::{InItem, Incoming, POLL};
use crate::stats::{Counters, DeviceCounters};
use crate::uring::DataRing;

/// What the writer tells the control thread.
#[derive(Debug)]
pub(crate) enum WriterEvent {
    /// The source left PRE_COPY; everything before was written.
    PreCopyDone {
        device: u16,
        raw: u64,
    },
    /// The device's initial pre-copy data is written (the `InitialDataSent` marker).
    InitialLoaded {
        device: u16,
        raw: u64,
    },
    /// Every byte was written and the length and digest match the source's.
    StreamVerified {
        device: u16,
        total: u64,
    },
    Failed(PipelineError),
}

/// A destination device as the writer sees it.
#[derive(Debug)]
pub(crate) struct WriterDevice {
    pub name: String,
    pub fd: Arc<OwnedFd>,
}

#[derive(Debug)]
struct WDev {
    name: String,
    fd: Arc<OwnedFd>,
    reseq: Resequencer<Incoming>,
    /// A buffer whose bytes `[at, len)` are still to be written, when no write is in flight.
    pending: Option<(PoolBuf, usize)>,
    digest: StreamDigest,
    /// Offset in the buffer of the write in flight.
    inflight_at: usize,
    /// Bytes of completed writes.
    written: u64,
    /// For a regular file: its position when the stream started. Writes then go to explicit
    /// offsets (`base + written`), never to offset -1 (see `DataRing::write`).
    file_base: Option<u64>,
    /// A regular file with nothing at or after `file_base` when the stream started (a second
    /// handle to it): zero chunks and zero 4 KiB pages are left as holes (the offset moves on,
    /// nothing is written; the pages that are not zero are written with `pwrite`), and the file
    /// is extended to its full length at the end. It reads back the same bytes; `cp --sparse`
    /// does the same. Never for stream fds: a device must be given every byte.
    sparse: Option<std::fs::File>,
    done: bool,
    last_progress: Instant,
    /// A zero-filled slot this device writes zero chunks from (taken while such a write is in
    /// flight), so writing never waits for a pool buffer.
    zero: Option<PoolBuf>,
    /// The write in flight (or pending) is from `zero`.
    writing_zero: bool,
}

/// Items a device may have parked out of order before the stream is declared broken.
const WINDOW: u64 = 256;

/// The writer loop; reports through `events` and returns when the input closes with every stream
/// ended, on `stop`, or after a failure.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    pool: BufPool,
    devices: Vec<WriterDevice>,
    guest: Option<Arc<dyn GuestMemoryAccess>>,
    items: Receiver<InItem>,
    events: Sender<WriterEvent>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    digest_key: Option<[u8; 32]>,
) {
    let mut ring = match DataRing::new(&pool, 64) {
        Ok(r) => r,
        Err(source) => {
            let _ = events.send(WriterEvent::Failed(PipelineError::Uring {
                op: "setup (writer)",
                source,
            }));
            return;
        }
    };
    if let Some(errno) = ring.unpinned_errno() {
        counters.notices.notify(Notice::UnpinnedBuffers {
            stage: "writer",
            errno,
        });
    }
    let mut devs = Vec::with_capacity(devices.len());
    for d in devices {
        let zero = match pool.acquire(timeout) {
            Ok(mut b) => {
                b.spare_mut().fill(0);
                b
            }
            Err(source) => {
                let _ = events.send(WriterEvent::Failed(PipelineError::Pool {
                    stage: "writer",
                    source,
                }));
                return;
            }
        };
        let file_base = regular_file_position(&d.fd);
        let sparse = file_base
            .filter(|&base| regular_file_len(&d.fd) == Some(base))
            .and_then(|_| d.fd.try_clone().ok())
            .map(std::fs::File::from);
        devs.push(WDev {
            name: d.name,
            file_base,
            sparse,
            fd: d.fd,
            reseq: Resequencer::new(WINDOW),
            pending: None,
            digest: StreamDigest::with_key(digest_key.as_ref()),
            inflight_at: 0,
            written: 0,
            done: false,
            last_progress: Instant::now(),
            zero: Some(zero),
            writing_zero: false,
        });
    }
    let ctx = Ctx {
        guest: guest.as_deref(),
        events: &events,
        counters: &counters,
        timeout,
    };
    let r = write_loop(&ctx, &mut ring, &mut devs, &items, &stop);
    if let Err(e) = r {
        let _ = events.send(WriterEvent::Failed(e));
    }
}

/// What every step of the writer needs.
struct Ctx<'a> {
    guest: Option<&'a dyn GuestMemoryAccess>,
    events: &'a Sender<WriterEvent>,
    counters: &'a Counters,
    timeout: Duration,
}

fn write_loop(
    ctx: &Ctx<'_>,
    ring: &mut DataRing,
    devs: &mut [WDev],
    items: &Receiver<InItem>,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let (counters, timeout) = (ctx.counters, ctx.timeout);
    let mut open = true;
    let mut done = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Take what has arrived.
        let mut got = false;
        while open {
            match items.try_recv() {
                Ok(it) => {
                    park(devs, it)?;
                    got = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Start the next write of every idle device.
        let t0 = Instant::now();
        for (i, dev) in devs.iter_mut().enumerate() {
            let device = u16::try_from(i).unwrap_or(u16::MAX);
            if dev.done || ring.is_in_flight(i as u64) {
                continue;
            }
            advance(device, dev, ctx, ring)?;
        }
        counters.fd_stage.add_since(t0);
        if !open && ring.in_flight() == 0 {
            // Input closed and nothing left to write (every stream ended, or the session is
            // ending the unfinished ones).
            return Ok(());
        }
        if ring.in_flight() == 0 {
            if !got && open {
                match items.recv_timeout(POLL) {
                    Ok(it) => park(devs, it)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            continue;
        }
        let wait = if items.is_empty() {
            Duration::from_millis(2)
        } else {
            Duration::ZERO
        };
        // Time waiting with writes in flight is time the devices take: it counts as busy.
        let t0 = Instant::now();
        ring.wait(wait, &mut done)
            .map_err(|source| PipelineError::Uring {
                op: "wait (writer)",
                source,
            })?;
        // Slots are pinned on first use, so a refusal shows up here, not at setup.
        if let Some(errno) = ring.unpinned_errno() {
            counters.notices.notify(Notice::UnpinnedBuffers {
                stage: "writer",
                errno,
            });
        }
        for c in done.drain(..) {
            let i = usize::try_from(c.key).unwrap_or(usize::MAX);
            let Some(dev) = devs.get_mut(i) else { continue };
            let device = u16::try_from(i).unwrap_or(u16::MAX);
            let at = dev.inflight_at;
            let buf = c.buf;
            if c.result > 0 {
                let n = usize::try_from(c.result).unwrap_or(0);
                dev.written += n as u64;
                dev.last_progress = Instant::now();
                if let Some(dc) = counters.device(device) {
                    DeviceCounters::add(&dc.raw, n);
                }
                if at + n < buf.len() {
                    dev.pending = Some((buf, at + n));
                } else if dev.writing_zero {
                    dev.writing_zero = false;
                    dev.zero = Some(buf);
                }
            } else if c.result == -libc::EINTR || c.result == -libc::EAGAIN {
                dev.pending = Some((buf, at));
            } else {
                let source = if c.result == 0 {
                    std::io::Error::from(std::io::ErrorKind::WriteZero)
                } else {
                    std::io::Error::from_raw_os_error(-c.result)
                };
                return Err(PipelineError::Write {
                    device: dev.name.clone(),
                    offset: dev.written,
                    source,
                });
            }
            // Submit the remainder (or the next item) right away.
            advance(device, dev, ctx, ring)?;
        }
        counters.fd_stage.add_since(t0);
        for (i, dev) in devs.iter().enumerate() {
            if ring.is_in_flight(i as u64) && dev.last_progress.elapsed() > timeout {
                return Err(PipelineError::Timeout {
                    phase: Phase::Resume,
                    what: "a data fd write",
                    waited: timeout,
                });
            }
        }
    }
}

/// The current position of `fd` if it is a regular file (a `file:` destination's temporary file);
/// `None` for stream fds (VFIO data fds, pipes, FUSE), which are written at offset -1.
fn regular_file_position(fd: &OwnedFd) -> Option<u64> {
    use std::io::Seek;
    let file = std::fs::File::from(fd.try_clone().ok()?);
    if !file.metadata().ok()?.file_type().is_file() {
        return None;
    }
    (&file).stream_position().ok()
}

/// The length of `fd` if it is a regular file.
fn regular_file_len(fd: &OwnedFd) -> Option<u64> {
    let file = std::fs::File::from(fd.try_clone().ok()?);
    let meta = file.metadata().ok()?;
    meta.file_type().is_file().then_some(meta.len())
}

/// Sparse pages: 4 KiB, the page size of every file system that holds holes at that grain.
const SPARSE_PAGE: usize = 4096;

fn page_is_zero(p: &[u8]) -> bool {
    let (words, rest) = p.split_at(p.len() / 8 * 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// For a sparse file: if `buf` holds zero pages, writes only its other pages, at their offsets,
/// with `pwrite` (a regular file; nothing else is in flight for this device) and returns true.
/// Returns false (nothing written) when every page holds data, or the file is not sparse: the
/// caller then writes the whole buffer through the ring.
fn write_sparse(dev: &WDev, buf: &PoolBuf) -> Result<bool, PipelineError> {
    use std::os::unix::fs::FileExt;
    let (Some(base), Some(file)) = (dev.file_base, dev.sparse.as_ref()) else {
        return Ok(false);
    };
    let data = buf.as_slice();
    // The first zero page; a chunk of data pages is usually known at its first word per page.
    let Some(first) = data.chunks(SPARSE_PAGE).position(page_is_zero) else {
        return Ok(false);
    };
    let at = base.saturating_add(dev.written);
    let mut run: Option<usize> = (first > 0).then_some(0);
    let write_run = |start: usize, end: usize| {
        file.write_all_at(&data[start..end], at + start as u64)
            .map_err(|source| PipelineError::Write {
                device: dev.name.clone(),
                offset: dev.written + start as u64,
                source,
            })
    };
    for (i, page) in data.chunks(SPARSE_PAGE).enumerate().skip(first) {
        let start = i * SPARSE_PAGE;
        match (page_is_zero(page), run) {
            (true, Some(r)) => {
                write_run(r, start)?;
                run = None;
            }
            (false, None) => run = Some(start),
            _ => {}
        }
    }
    if let Some(r) = run {
        write_run(r, data.len())?;
    }
    Ok(true)
}

/// At the end of a sparse stream: extends the file over trailing zero chunks left as a hole.
fn extend_sparse_file(dev: &WDev) -> Result<(), PipelineError> {
    let (Some(base), Some(file)) = (dev.file_base, dev.sparse.as_ref()) else {
        return Ok(());
    };
    let end = base.saturating_add(dev.written);
    let extend = || -> std::io::Result<()> {
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        Ok(())
    };
    extend().map_err(|source| PipelineError::Write {
        device: dev.name.clone(),
        offset: dev.written,
        source,
    })
}

fn park(devs: &mut [WDev], it: InItem) -> Result<(), PipelineError> {
    let device = it.device;
    let dev = devs
        .get_mut(usize::from(device))
        .ok_or(PipelineError::UnexpectedFrame {
            kind: vfmig_wire::FrameKind::StopCopyData,
            device,
            phase: Phase::Resume,
        })?;
    dev.reseq
        .push(it.seq, it.item)
        .map_err(|source| PipelineError::Sequence { device, source })
}

/// Writes decoded dirty pages into guest memory; returns the bytes written.
fn apply_pages(
    guest: &dyn GuestMemoryAccess,
    gpa: u64,
    data: &Decoded,
) -> Result<usize, PipelineError> {
    // `gpa` comes from the peer: a run whose last byte lies past the top of the IOVA space would
    // have the zero-fill loop below continue at IOVA 0.
    let len = match data {
        Decoded::Data(buf) => buf.len(),
        Decoded::Zero(n) => *n,
    };
    if u64::try_from(len)
        .ok()
        .and_then(|l| gpa.checked_add(l.saturating_sub(1)))
        .is_none()
    {
        return Err(PipelineError::Guest {
            gpa,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "page run ends beyond the 64-bit IOVA space",
            ),
        });
    }
    match data {
        Decoded::Data(buf) => {
            guest
                .write(gpa, buf.as_slice())
                .map_err(|source| PipelineError::Guest { gpa, source })?;
            Ok(buf.len())
        }
        Decoded::Zero(n) => {
            let zero = [0u8; 4096];
            let mut at = 0;
            while at < *n {
                let len = (*n - at).min(zero.len());
                // Cannot wrap: `gpa + n - 1` was checked above and `at < n`.
                let addr = gpa.wrapping_add(u64::try_from(at).unwrap_or(u64::MAX));
                guest
                    .write(addr, &zero[..len])
                    .map_err(|source| PipelineError::Guest { gpa: addr, source })?;
                at += len;
            }
            Ok(*n)
        }
    }
}

/// Keeps a device's fd busy: resubmits a partly written buffer, or takes the next items in order
/// (markers are handled on the spot) until one needs a write.
fn advance(
    device: u16,
    dev: &mut WDev,
    ctx: &Ctx<'_>,
    ring: &mut DataRing,
) -> Result<(), PipelineError> {
    let events = ctx.events;
    loop {
        if let Some((buf, at)) = dev.pending.take() {
            let len = buf.len() - at;
            dev.inflight_at = at;
            let offset = dev.file_base.map(|b| b + dev.written);
            ring.write(
                u64::from(device),
                dev.fd.as_raw_fd(),
                (buf, at, len),
                offset,
            )
            .map_err(|source| PipelineError::Uring {
                op: "submit write",
                source,
            })?;
            return Ok(());
        }
        let Some(item) = dev.reseq.pop() else {
            return Ok(());
        };
        match item {
            Incoming::Data(Decoded::Data(buf), hash) => {
                dev.digest.add(dev.digest.total(), buf.len(), hash);
                if !write_sparse(dev, &buf)? {
                    dev.pending = Some((buf, 0));
                    continue;
                }
                let n = buf.len();
                dev.written += n as u64;
                dev.last_progress = Instant::now();
                if let Some(c) = ctx.counters.device(device) {
                    DeviceCounters::add(&c.raw, n);
                }
            }
            Incoming::Data(Decoded::Zero(n), hash) if dev.sparse.is_some() => {
                // A hole: nothing to write, and nothing past this offset was ever written.
                dev.digest.add(dev.digest.total(), n, hash);
                dev.written += n as u64;
                dev.last_progress = Instant::now();
                if let Some(c) = ctx.counters.device(device) {
                    DeviceCounters::add(&c.raw, n);
                }
            }
            Incoming::Data(Decoded::Zero(n), hash) => {
                // Back in `zero` once written: one write in flight per device.
                let mut buf = dev
                    .zero
                    .take()
                    .ok_or(PipelineError::StageLost { stage: "writer" })?;
                buf.set_len(n);
                dev.digest.add(dev.digest.total(), n, hash);
                dev.pending = Some((buf, 0));
                dev.writing_zero = true;
            }
            Incoming::Pages { gpa, data } => {
                let guest = ctx.guest.ok_or(PipelineError::UnexpectedFrame {
                    kind: vfmig_wire::FrameKind::DirtyPages,
                    device,
                    phase: Phase::Resume,
                })?;
                let n = apply_pages(guest, gpa, &data)?;
                if let Some(c) = ctx.counters.device(device) {
                    DeviceCounters::add(&c.guest, n);
                }
            }
            Incoming::PreCopyDone { raw } => {
                let _ = events.send(WriterEvent::PreCopyDone { device, raw });
            }
            Incoming::InitialDone { raw } => {
                let _ = events.send(WriterEvent::InitialLoaded { device, raw });
            }
            Incoming::End { total, digest } => {
                let computed = dev.digest.finish();
                dev.done = true;
                extend_sparse_file(dev)?;
                if total != dev.written {
                    return Err(PipelineError::LengthMismatch {
                        device,
                        declared: total,
                        received: dev.written,
                    });
                }
                if computed != digest {
                    return Err(PipelineError::DigestMismatch {
                        device,
                        expected: digest,
                        computed,
                    });
                }
                let _ = events.send(WriterEvent::StreamVerified { device, total });
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Guest memory that accepts a write anywhere and records where it went.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<(u64, usize)>>);

    impl GuestMemoryAccess for Recorder {
        fn ranges(&self) -> Vec<vfmig_vfio::IovaRange> {
            Vec::new()
        }
        fn read(&self, _iova: u64, _buf: &mut [u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&self, iova: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((iova, data.len()));
            Ok(())
        }
    }

    #[test]
    fn zero_run_wrapping_past_the_top_of_iova_space_is_refused_before_any_write() {
        let guest = Recorder::default();
        let gpa = u64::MAX - 4095;
        let r = apply_pages(&guest, gpa, &Decoded::Zero(8192));
        assert!(
            matches!(r, Err(PipelineError::Guest { gpa: g, .. }) if g == gpa),
            "{r:?}"
        );
        assert!(guest.0.lock().unwrap().is_empty(), "nothing written");
        assert_eq!(
            apply_pages(&guest, gpa, &Decoded::Zero(4096)).unwrap(),
            4096
        );
    }
}
