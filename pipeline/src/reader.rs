//! Source stage 1: read every device's data fd with one io_uring, one read in flight per fd.
//!
//! Each read goes into the unfilled tail of a pool slot at offset -1. A slot is emitted as a chunk
//! when it is full, when the stream ends (STOP_COPY read returned 0), or when PRE_COPY has nothing
//! more for now (ENOMSG, EAGAIN, or 0 as the mtty sample driver does), so pre-copy data never waits
//! for a slot to fill. Chunks are numbered in stream order here and handed to the codec workers
//! (which hash them for the stream digest, `crate::digest`); the reader then immediately reads on
//! while they compress and send. `EndOfDevice` leaves with a placeholder digest that the in-order
//! sender fills in.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use vfmig_transport::{BufPool, PoolBuf};
use vfmig_wire::{Codec, FrameHeader, FrameKind};

use crate::adapt::Adaptive;
use crate::api::Notice;
use crate::codec::{chunk_len, sampled_turn, Choice, PageMap};
use crate::error::{Phase, PipelineError};
use crate::guest::{GuestMemoryAccess, Run, GUEST_PAGE};
use crate::stats::{Counters, DeviceCounters};
use crate::uring::DataRing;

/// A chunk of raw device state, in stream order per device.
#[derive(Debug)]
pub(crate) struct RawChunk {
    pub device: u16,
    pub seq: u64,
    pub kind: FrameKind,
    /// Stream offset of the first byte.
    pub offset: u64,
    pub buf: PoolBuf,
    /// The encoding the reader already chose for it (`direct`), else the codec worker chooses.
    pub choice: Option<Choice>,
}

/// A frame ready for the transport (data already encoded, or a marker).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub header: FrameHeader,
    pub payload: Option<PoolBuf>,
    /// For device state frames: [`crate::digest::chunk_hash`] of the raw bytes.
    pub hash: Option<u128>,
}

/// Builds a header; the transport fills in `crc` (and checks `wire_len`).
pub(crate) fn header(
    kind: FrameKind,
    codec: Codec,
    device: u16,
    seq: u64,
    raw_len: usize,
    payload: Option<&PoolBuf>,
    arg: u64,
) -> FrameHeader {
    FrameHeader {
        kind,
        codec,
        device,
        seq,
        raw_len: u32::try_from(raw_len).unwrap_or(u32::MAX),
        wire_len: payload.map_or(0, |p| u32::try_from(p.len()).unwrap_or(u32::MAX)),
        arg,
        crc: 0,
    }
}

/// How the data fd behaves right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Running: "no data now" (ENOMSG / EAGAIN / 0) means poll again later.
    PreCopy,
    /// Stopped: 0 means the end of the stream.
    StopCopy,
}

/// Commands from the session's control thread.
#[derive(Debug)]
pub(crate) enum ReaderCmd {
    /// Start reading a device's data fd.
    Add {
        device: u16,
        fd: Arc<OwnedFd>,
        mode: ReadMode,
    },
    /// Leave PRE_COPY: let the read in flight finish, emit what is buffered and `PreCopyDone`,
    /// then report [`ReaderEvent::PreCopyQuiesced`] and wait for [`ReaderCmd::StopCopy`].
    EndPreCopy { device: u16 },
    /// Every initial byte of the device has been read from its fd (`initial_bytes` reached 0):
    /// once the read in flight is in, emit what is buffered and `InitialDataSent`, read on.
    MarkInitial { device: u16 },
    /// The device is in STOP_COPY: read on (from a new fd if the SET returned one) until 0.
    StopCopy {
        device: u16,
        fd: Option<Arc<OwnedFd>>,
    },
    /// Ship these runs of guest pages (sorted, merged) on the carrier device's stream;
    /// `last`: no more will come (DMA has stopped). The reader queues the batch and ships it a
    /// few pieces per turn between device reads; [`GuestPages::batches_done`] counts the batches
    /// it has finished handing to the codec stage.
    DirtyPages { runs: Vec<Run>, last: bool },
}

/// What the reader tells the control thread.
#[derive(Debug)]
pub(crate) enum ReaderEvent {
    PreCopyQuiesced { device: u16 },
    Ended { device: u16, raw_bytes: u64 },
    Failed(PipelineError),
}

/// Channels and shared state of the reader thread.
#[derive(Debug)]
pub(crate) struct ReaderIo {
    pub cmds: Receiver<ReaderCmd>,
    pub chunks: Sender<RawChunk>,
    pub markers: Sender<Outgoing>,
    pub events: Sender<ReaderEvent>,
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    /// Guest memory for `DirtyPages` frames (`None`: no device DMA tracking).
    pub guest: Option<GuestPages>,
    /// The encoding controller: with it, chunks of a stream settled as raw skip the codec
    /// workers (`direct`); `None` sends every chunk through them.
    pub adaptive: Option<Arc<Adaptive>>,
}

/// Where the reader gets dirty guest pages and on which stream it ships them.
#[derive(Debug)]
pub(crate) struct GuestPages {
    pub memory: Arc<dyn GuestMemoryAccess>,
    /// The device whose stream carries the pages: its `EndOfDevice` waits for the
    /// [`ReaderCmd::DirtyPages`] batch with `last` set to be shipped.
    pub carrier: u16,
    /// `DirtyPages` batches whose every page was handed to the codec stage. The control thread
    /// reads the next dirty log only once the previous batch is out, so guest pages never queue
    /// up faster than they leave (the device's log keeps collecting meanwhile).
    pub batches_done: Arc<AtomicU64>,
}

/// First re-poll delay after PRE_COPY said "nothing now", and the most it backs off to.
const PRECOPY_POLL_MIN: Duration = Duration::from_millis(2);
const PRECOPY_POLL_MAX: Duration = Duration::from_millis(50);
/// Longest single wait of the loop, so commands and `stop` are noticed promptly.
const TICK: Duration = Duration::from_millis(20);
/// Most guest-page pieces (frames) shipped per turn of the loop, so a long dirty-page batch
/// never keeps the devices' data fds from being read.
const PAGE_PIECES_PER_TURN: usize = 8;

/// One `DirtyPages` command still being shipped.
#[derive(Debug)]
struct PageBatch {
    runs: VecDeque<Run>,
    last: bool,
}

/// Dirty guest pages waiting to be shipped on the carrier's stream, oldest batch first.
#[derive(Debug, Default)]
struct PageQueue {
    batches: VecDeque<PageBatch>,
    /// The batch with `last` set was shipped completely: the carrier's end may go.
    last_shipped: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DevPhase {
    Reading,
    WantQuiesce,
    Quiesced,
    /// STOP_COPY ended; `EndOfDevice` waits for the last dirty guest pages.
    EndHeld,
    Done,
}

#[derive(Debug)]
struct Dev {
    name: String,
    fd: Arc<OwnedFd>,
    mode: ReadMode,
    phase: DevPhase,
    /// Partially filled slot while no read is in flight.
    buf: Option<PoolBuf>,
    filled: usize,
    seq: u64,
    /// Raw bytes emitted so far (stream offset of the slot's first byte).
    emitted: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_progress: Instant,
    /// This device carries the dirty guest pages: its end waits for the last of them.
    hold_end: bool,
    /// A full chunk numbered but not yet handed over.
    full: Option<RawChunk>,
    /// The data fd is a regular file (a `file:` source): what it was when STOP_COPY began.
    file: Option<FileId>,
    /// `InitialDataSent` is due once no read is in flight.
    mark_initial: bool,
}

/// What identifies the contents of a regular file read as a data fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    size: u64,
    mtime: (i64, i64),
}

/// The identity of `fd` if it is a regular file (VFIO data fds are not).
fn file_id(fd: &OwnedFd) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::File::from(fd.try_clone().ok()?).metadata().ok()?;
    meta.file_type().is_file().then(|| FileId {
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
    })
}

/// At the end of a regular file's STOP_COPY stream: the file must be what it was when reading
/// began (no growth, truncation or rewrite meanwhile), so what was read is exactly the file. A
/// file whose size and mtime stay put was read whole: reads of a regular file end only at its
/// end. (An emulated device's FUSE stream file keeps constant attributes and passes.)
fn check_file_end(dev: &Dev) -> Result<(), PipelineError> {
    let Some(before) = dev.file else {
        return Ok(());
    };
    let read = dev.emitted + dev.filled as u64;
    let after = file_id(&dev.fd);
    if after == Some(before) {
        return Ok(());
    }
    Err(PipelineError::SourceChanged {
        device: dev.name.clone(),
        read,
        size_before: before.size,
        size_after: after.map_or(0, |a| a.size),
        modified: after.map(|a| a.mtime) != Some(before.mtime),
    })
}

/// The reader loop. Returns when every device it was given has ended and the command channel
/// closed, when `stop` is set, or after reporting a failure.
/// `chunk` is the most raw bytes per chunk (at most [`chunk_len`] of the slot size).
pub(crate) fn run(
    pool: BufPool,
    names: Vec<String>,
    io: ReaderIo,
    chunk: usize,
    timeout: Duration,
) {
    let mut ring = match DataRing::new(&pool, 64) {
        Ok(r) => r,
        Err(source) => {
            let _ = io.events.send(ReaderEvent::Failed(PipelineError::Uring {
                op: "setup (reader)",
                source,
            }));
            return;
        }
    };
    if let Some(errno) = ring.unpinned_errno() {
        io.counters.notices.notify(Notice::UnpinnedBuffers {
            stage: "reader",
            errno,
        });
    }
    let mut devs: Vec<Option<Dev>> = names.iter().map(|_| None).collect();
    let mut cmds_open = true;
    let chunk = chunk.clamp(1, chunk_len(pool.slot_size()));
    let ctx = Ctx {
        pool: &pool,
        names: &names,
        io: &io,
        chunk,
        timeout,
    };
    if let Err(e) = reader_loop(&ctx, &mut ring, &mut devs, &mut cmds_open) {
        let _ = io.events.send(ReaderEvent::Failed(e));
    }
}

/// What every step of the loop needs.
struct Ctx<'a> {
    pool: &'a BufPool,
    names: &'a [String],
    io: &'a ReaderIo,
    chunk: usize,
    timeout: Duration,
}

fn reader_loop(
    ctx: &Ctx<'_>,
    ring: &mut DataRing,
    devs: &mut [Option<Dev>],
    cmds_open: &mut bool,
) -> Result<(), PipelineError> {
    let (io, timeout) = (ctx.io, ctx.timeout);
    let mut done = Vec::new();
    let mut pages = PageQueue::default();
    loop {
        if io.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Commands. Each is cheap (dirty pages are only queued here), so a control thread
        // sending commands back to back cannot keep the loop from reading the devices.
        loop {
            match io.cmds.try_recv() {
                Ok(cmd) => apply(cmd, ctx, devs, &mut pages)?,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    *cmds_open = false;
                    break;
                }
            }
        }
        let all_done = devs
            .iter()
            .all(|d| d.as_ref().is_none_or(|d| d.phase == DevPhase::Done));
        if all_done && !*cmds_open {
            return Ok(());
        }

        // Submit one read per device that has none in flight, then hand over the chunk its last
        // read completed, so the device works while the chunk travels on.
        let now = Instant::now();
        let mut next_wake = now + TICK;
        for (i, slot) in devs.iter_mut().enumerate() {
            let Some(dev) = slot.as_mut() else { continue };
            if !ring.is_in_flight(i as u64) {
                if let Some(wake) = submit_next(i, dev, ring, ctx, now)? {
                    next_wake = next_wake.min(wake);
                }
            }
            hand_over(dev, ctx)?;
        }
        // A few pieces of the queued guest pages, then back to the devices.
        ship_some_pages(ctx, devs, &mut pages)?;
        if !pages.batches.is_empty() {
            // More pages to ship: only look for completions, do not sleep.
            next_wake = Instant::now();
        }

        // Wait for completions (or for commands when nothing is in flight).
        if ring.in_flight() == 0 {
            let wait = next_wake.saturating_duration_since(Instant::now());
            match io.cmds.recv_timeout(wait) {
                Ok(cmd) => apply(cmd, ctx, devs, &mut pages)?,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => *cmds_open = false,
            }
            continue;
        }
        let wait = next_wake.saturating_duration_since(Instant::now());
        // Time waiting with reads in flight is time the devices take: it counts as busy.
        let t0 = Instant::now();
        ring.wait(wait, &mut done)
            .map_err(|source| PipelineError::Uring {
                op: "wait (reader)",
                source,
            })?;
        // Slots are pinned on first use, so a refusal shows up here, not at setup.
        if let Some(errno) = ring.unpinned_errno() {
            io.counters.notices.notify(Notice::UnpinnedBuffers {
                stage: "reader",
                errno,
            });
        }
        for c in done.drain(..) {
            let i = usize::try_from(c.key).unwrap_or(usize::MAX);
            let Some(dev) = devs.get_mut(i).and_then(|d| d.as_mut()) else {
                continue;
            };
            completed(i, dev, c.result, c.buf, ctx)?;
        }
        io.counters.fd_stage.add_since(t0);
        for (i, slot) in devs.iter().enumerate() {
            if let Some(dev) = slot {
                if dev.phase == DevPhase::Reading
                    && ring.is_in_flight(i as u64)
                    && dev.last_progress.elapsed() > timeout
                {
                    return Err(PipelineError::Timeout {
                        phase: phase_of(dev.mode),
                        what: "a data fd read",
                        waited: timeout,
                    });
                }
            }
        }
    }
}

/// Starts the next read of an idle device (or its quiesce). Returns when to look again if the
/// device is waiting (PRE_COPY backoff).
fn submit_next(
    i: usize,
    dev: &mut Dev,
    ring: &mut DataRing,
    ctx: &Ctx<'_>,
    now: Instant,
) -> Result<Option<Instant>, PipelineError> {
    match dev.phase {
        DevPhase::Done | DevPhase::Quiesced | DevPhase::EndHeld => return Ok(None),
        DevPhase::WantQuiesce => {
            quiesce(i, dev, ctx)?;
            return Ok(None);
        }
        DevPhase::Reading => {}
    }
    if dev.mark_initial && dev.mode == ReadMode::PreCopy {
        mark_initial(i, dev, ctx)?;
    }
    if let Some(at) = dev.retry_at {
        if at > now {
            return Ok(Some(at));
        }
        dev.retry_at = None;
    }
    let buf = match dev.buf.take() {
        Some(b) => b,
        None => {
            let t0 = Instant::now();
            let got = ctx.pool.acquire(Duration::from_millis(5));
            ctx.io.counters.buffer_wait.add_since(t0);
            match got {
                Ok(b) => b,
                Err(source) if dev.last_progress.elapsed() > ctx.timeout => {
                    return Err(PipelineError::Pool {
                        stage: "reader",
                        source,
                    });
                }
                Err(_) => return Ok(None),
            }
        }
    };
    let want = ctx.chunk - dev.filled;
    let submitted = ring
        .read(
            i as u64,
            dev.fd.as_raw_fd(),
            buf,
            (dev.filled, want),
            dev.file.is_some(),
        )
        .and_then(|()| ring.submit());
    submitted.map_err(|source| PipelineError::Uring {
        op: "submit read",
        source,
    })?;
    Ok(None)
}

fn phase_of(mode: ReadMode) -> Phase {
    match mode {
        ReadMode::PreCopy => Phase::PreCopy,
        ReadMode::StopCopy => Phase::StopCopy,
    }
}

fn apply(
    cmd: ReaderCmd,
    ctx: &Ctx<'_>,
    devs: &mut [Option<Dev>],
    pages: &mut PageQueue,
) -> Result<(), PipelineError> {
    let names = ctx.names;
    let slot = |d: u16, devs: &mut [Option<Dev>]| -> Result<usize, PipelineError> {
        let i = usize::from(d);
        if i < devs.len() {
            Ok(i)
        } else {
            Err(PipelineError::StageLost { stage: "reader" })
        }
    };
    match cmd {
        ReaderCmd::Add { device, fd, mode } => {
            let i = slot(device, devs)?;
            let file = (mode == ReadMode::StopCopy).then(|| file_id(&fd)).flatten();
            devs[i] = Some(Dev {
                name: names[i].clone(),
                fd,
                mode,
                phase: DevPhase::Reading,
                buf: None,
                filled: 0,
                seq: 0,
                emitted: 0,
                retry_at: None,
                backoff: PRECOPY_POLL_MIN,
                last_progress: Instant::now(),
                hold_end: ctx.io.guest.as_ref().is_some_and(|g| g.carrier == device),
                full: None,
                file,
                mark_initial: false,
            });
        }
        ReaderCmd::EndPreCopy { device } => {
            let i = slot(device, devs)?;
            if let Some(d) = devs[i].as_mut() {
                if d.phase == DevPhase::Reading {
                    d.phase = DevPhase::WantQuiesce;
                }
            }
        }
        ReaderCmd::MarkInitial { device } => {
            let i = slot(device, devs)?;
            if let Some(d) = devs[i].as_mut() {
                // Once the device left pre-copy, `PreCopyDone` says more than this would.
                d.mark_initial = matches!(d.phase, DevPhase::Reading | DevPhase::WantQuiesce)
                    && d.mode == ReadMode::PreCopy;
            }
        }
        ReaderCmd::StopCopy { device, fd } => {
            let i = slot(device, devs)?;
            if let Some(d) = devs[i].as_mut() {
                if let Some(fd) = fd {
                    d.fd = fd;
                }
                d.file = file_id(&d.fd);
                d.mode = ReadMode::StopCopy;
                d.phase = DevPhase::Reading;
                d.retry_at = None;
                d.last_progress = Instant::now();
            }
        }
        ReaderCmd::DirtyPages { runs, last } => {
            let Some(g) = ctx.io.guest.as_ref() else {
                return Err(PipelineError::StageLost { stage: "reader" });
            };
            let i = slot(g.carrier, devs)?;
            if devs[i].is_none() {
                return Err(PipelineError::StageLost { stage: "reader" });
            }
            pages.batches.push_back(PageBatch {
                runs: runs.into_iter().filter(|&(_, n)| n > 0).collect(),
                last,
            });
        }
    }
    Ok(())
}

/// Ships up to [`PAGE_PIECES_PER_TURN`] pieces of the queued dirty guest pages, counts finished
/// batches in [`GuestPages::batches_done`], and lets the carrier's stream end once the last batch is
/// out.
fn ship_some_pages(
    ctx: &Ctx<'_>,
    devs: &mut [Option<Dev>],
    pages: &mut PageQueue,
) -> Result<(), PipelineError> {
    let Some(g) = ctx.io.guest.as_ref() else {
        return Ok(());
    };
    let Some(dev) = devs
        .get_mut(usize::from(g.carrier))
        .and_then(Option::as_mut)
    else {
        return Ok(());
    };
    let max_pages = (ctx.chunk as u64 / GUEST_PAGE).max(1);
    let mut shipped = 0;
    while let Some(batch) = pages.batches.front_mut() {
        if let Some((gpa, n)) = batch.runs.pop_front() {
            if shipped == PAGE_PIECES_PER_TURN {
                batch.runs.push_front((gpa, n));
                break;
            }
            let take = n.min(max_pages);
            if take < n {
                batch
                    .runs
                    .push_front((gpa.saturating_add(take * GUEST_PAGE), n - take));
            }
            ship_piece(g.carrier, dev, g.memory.as_ref(), gpa, take, ctx)?;
            shipped += 1;
        }
        if batch.runs.is_empty() {
            let last = batch.last;
            pages.batches.pop_front();
            g.batches_done.fetch_add(1, Ordering::SeqCst);
            pages.last_shipped |= last;
        }
    }
    if pages.last_shipped && dev.hold_end {
        dev.hold_end = false;
        if dev.phase == DevPhase::EndHeld {
            end_of_stream(g.carrier, dev, ctx)?;
        }
    }
    Ok(())
}

/// Reads `n` dirty guest pages at `gpa` into a pool slot and hands them to the codec stage as
/// a `DirtyPages` chunk of the carrier's stream.
fn ship_piece(
    device: u16,
    dev: &mut Dev,
    guest: &dyn GuestMemoryAccess,
    gpa: u64,
    n: u64,
    ctx: &Ctx<'_>,
) -> Result<(), PipelineError> {
    // The staged chunk has an earlier sequence number: it must reach the sender first, or the
    // sender would park these pages waiting for it while we wait for room behind them.
    hand_over(dev, ctx)?;
    let mut buf = ctx
        .pool
        .acquire(ctx.timeout)
        .map_err(|source| PipelineError::Pool {
            stage: "reader (guest pages)",
            source,
        })?;
    // `n <= max_pages`, so `len <= chunk`, a usize.
    let len = usize::try_from(n * GUEST_PAGE).unwrap_or(usize::MAX);
    guest
        .read(gpa, &mut buf.spare_mut()[..len])
        .map_err(|source| PipelineError::Guest { gpa, source })?;
    buf.set_len(len);
    if let Some(c) = ctx.io.counters.device(device) {
        DeviceCounters::add(&c.guest, len);
    }
    let chunk = RawChunk {
        device,
        seq: dev.seq,
        kind: FrameKind::DirtyPages,
        offset: gpa,
        buf,
        choice: None,
    };
    dev.seq += 1;
    ctx.io
        .chunks
        .send_timeout(chunk, ctx.timeout)
        .map_err(|_| PipelineError::Timeout {
            phase: phase_of(dev.mode),
            what: "the codec stage to take guest pages",
            waited: ctx.timeout,
        })?;
    Ok(())
}

fn completed(
    i: usize,
    dev: &mut Dev,
    result: i32,
    buf: PoolBuf,
    ctx: &Ctx<'_>,
) -> Result<(), PipelineError> {
    let device = u16::try_from(i).unwrap_or(u16::MAX);
    if result > 0 {
        dev.filled += usize::try_from(result).unwrap_or(0);
        dev.last_progress = Instant::now();
        dev.backoff = PRECOPY_POLL_MIN;
        if dev.filled >= ctx.chunk {
            // Hashed and handed over after the next read is submitted (`hand_over`).
            dev.full = Some(stage(device, dev, buf, ctx.io));
        } else {
            dev.buf = Some(buf);
        }
        return Ok(());
    }
    let errno = -result;
    let no_data_now = result == 0 || errno == libc::ENOMSG || errno == libc::EAGAIN;
    match dev.mode {
        ReadMode::PreCopy if no_data_now => {
            // Nothing pending now: ship what is buffered, poll again after a backoff.
            if dev.filled > 0 {
                emit(device, dev, buf, ctx)?;
            } else {
                dev.buf = Some(buf);
            }
            dev.retry_at = Some(Instant::now() + dev.backoff);
            dev.backoff = (dev.backoff * 2).min(PRECOPY_POLL_MAX);
        }
        ReadMode::StopCopy if result == 0 => {
            check_file_end(dev)?;
            if dev.filled > 0 {
                emit(device, dev, buf, ctx)?;
            } else {
                drop(buf);
            }
            if dev.hold_end {
                dev.phase = DevPhase::EndHeld;
            } else {
                end_of_stream(device, dev, ctx)?;
            }
        }
        ReadMode::StopCopy if errno == libc::EAGAIN => {
            // O_NONBLOCK drivers (mlx5): not ready yet.
            dev.buf = Some(buf);
            dev.retry_at = Some(Instant::now() + PRECOPY_POLL_MIN);
        }
        _ if errno == libc::EINTR || errno == libc::ECANCELED => {
            dev.buf = Some(buf);
        }
        _ => {
            return Err(PipelineError::Read {
                device: dev.name.clone(),
                phase: phase_of(dev.mode),
                offset: dev.emitted + dev.filled as u64,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
    }
    Ok(())
}

/// Makes the filled part of `buf` the device's next chunk: numbers it and counts it. The chunk
/// is handed to the codec stage by [`hand_over`].
fn stage(device: u16, dev: &mut Dev, mut buf: PoolBuf, io: &ReaderIo) -> RawChunk {
    buf.set_len(dev.filled);
    let len = dev.filled;
    let kind = match dev.mode {
        ReadMode::PreCopy => FrameKind::PreCopyData,
        ReadMode::StopCopy => FrameKind::StopCopyData,
    };
    let chunk = RawChunk {
        device,
        seq: dev.seq,
        kind,
        offset: dev.emitted,
        buf,
        choice: None,
    };
    dev.seq += 1;
    dev.emitted += len as u64;
    dev.filled = 0;
    if let Some(c) = io.counters.device(device) {
        DeviceCounters::add(&c.raw, len);
        if kind == FrameKind::PreCopyData {
            DeviceCounters::add(&c.precopy_raw, len);
        }
    }
    chunk
}

/// Hands the staged chunk to the codec stage, or, for a stream settled as raw, straight to the
/// sender (`direct`).
fn hand_over(dev: &mut Dev, ctx: &Ctx<'_>) -> Result<(), PipelineError> {
    let Some(chunk) = dev.full.take() else {
        return Ok(());
    };
    let chunk = match direct(chunk, ctx)? {
        Err(chunk) => chunk,
        Ok(out) => {
            let t0 = Instant::now();
            let sent = ctx.io.markers.send_timeout(out, ctx.timeout);
            ctx.io.counters.buffer_wait.add_since(t0);
            return sent.map_err(|_| PipelineError::Timeout {
                phase: phase_of(dev.mode),
                what: "the sender to take a raw frame",
                waited: ctx.timeout,
            });
        }
    };
    let t0 = Instant::now();
    let sent = ctx.io.chunks.send_timeout(chunk, ctx.timeout);
    ctx.io.counters.buffer_wait.add_since(t0);
    sent.map_err(|_| PipelineError::Timeout {
        phase: phase_of(dev.mode),
        what: "the codec stage to take a chunk",
        waited: ctx.timeout,
    })
}

/// The direct path for a device state chunk of a stream settled as raw
/// ([`crate::stats::DeviceCounters::raw_streak`] at least [`crate::codec::SETTLE_CHUNKS`]): when a sample of
/// its granules finds no zero one, it is not a periodic full-scan chunk, and the controller
/// chooses raw for it, the reader hashes it, appends the hash trailer and returns the frame for
/// the sender, saving a thread hop per chunk (the device read in flight goes on meanwhile).
/// Otherwise the chunk goes to the codec workers, with the controller's choice if it was made.
/// Returns the chunk back (`Err`) when it goes to the codec workers.
fn direct(mut chunk: RawChunk, ctx: &Ctx<'_>) -> Result<Result<Outgoing, RawChunk>, PipelineError> {
    let Some(adaptive) = ctx.io.adaptive.as_ref() else {
        return Ok(Err(chunk));
    };
    let Some(c) = ctx.io.counters.device(chunk.device) else {
        return Ok(Err(chunk));
    };
    let settled = matches!(chunk.kind, FrameKind::PreCopyData | FrameKind::StopCopyData)
        && sampled_turn(c.raw_streak.load(Ordering::Relaxed), chunk.seq)
        && !chunk.buf.is_empty();
    if !settled {
        return Ok(Err(chunk));
    }
    let t0 = Instant::now();
    if PageMap::sample_finds_zero(chunk.buf.as_slice()) {
        return Ok(Err(chunk));
    }
    let choice = adaptive.choose();
    if choice != Choice::Raw {
        chunk.choice = Some(choice);
        return Ok(Err(chunk));
    }
    let raw_len = chunk.buf.len();
    let hash = crate::digest::chunk_hash(chunk.buf.as_slice());
    let mut buf = chunk.buf;
    crate::stages::append_trailer(&mut buf, hash)?;
    let took = t0.elapsed();
    ctx.io.counters.codec.add(took);
    adaptive.record(Some(Choice::Raw), raw_len, raw_len, took);
    DeviceCounters::add(&c.raw_chunks, 1);
    DeviceCounters::add(&c.direct_chunks, 1);
    c.raw_streak.fetch_add(1, Ordering::Relaxed);
    Ok(Ok(Outgoing {
        header: header(
            chunk.kind,
            Codec::Raw,
            chunk.device,
            chunk.seq,
            raw_len,
            Some(&buf),
            chunk.offset,
        ),
        payload: Some(buf),
        hash: Some(hash),
    }))
}

/// Stages the filled part of `buf` and hands it over now.
fn emit(device: u16, dev: &mut Dev, buf: PoolBuf, ctx: &Ctx<'_>) -> Result<(), PipelineError> {
    hand_over(dev, ctx)?;
    dev.full = Some(stage(device, dev, buf, ctx.io));
    hand_over(dev, ctx)
}

fn marker(
    device: u16,
    dev: &mut Dev,
    kind: FrameKind,
    arg: u64,
    payload: Option<PoolBuf>,
    io: &ReaderIo,
    timeout: Duration,
) -> Result<(), PipelineError> {
    let raw_len = payload.as_ref().map_or(0, PoolBuf::len);
    let out = Outgoing {
        header: header(
            kind,
            Codec::Raw,
            device,
            dev.seq,
            raw_len,
            payload.as_ref(),
            arg,
        ),
        payload,
        hash: None,
    };
    dev.seq += 1;
    io.markers
        .send_timeout(out, timeout)
        .map_err(|_| PipelineError::Timeout {
            phase: phase_of(dev.mode),
            what: "the sender to take a marker frame",
            waited: timeout,
        })
}

/// With no read in flight: everything read so far goes out, then `InitialDataSent`.
fn mark_initial(i: usize, dev: &mut Dev, ctx: &Ctx<'_>) -> Result<(), PipelineError> {
    let device = u16::try_from(i).unwrap_or(u16::MAX);
    hand_over(dev, ctx)?;
    if let Some(buf) = dev.buf.take() {
        if dev.filled > 0 {
            emit(device, dev, buf, ctx)?;
        } else {
            dev.buf = Some(buf);
        }
    }
    let raw = dev.emitted;
    marker(
        device,
        dev,
        FrameKind::InitialDataSent,
        raw,
        None,
        ctx.io,
        ctx.timeout,
    )?;
    dev.mark_initial = false;
    Ok(())
}

fn quiesce(i: usize, dev: &mut Dev, ctx: &Ctx<'_>) -> Result<(), PipelineError> {
    let (io, timeout) = (ctx.io, ctx.timeout);
    let device = u16::try_from(i).unwrap_or(u16::MAX);
    hand_over(dev, ctx)?;
    if let Some(buf) = dev.buf.take() {
        if dev.filled > 0 {
            emit(device, dev, buf, ctx)?;
        }
    }
    let raw = dev.emitted;
    // `PreCopyDone` covers the initial data too: the destination acks on either.
    dev.mark_initial = false;
    marker(device, dev, FrameKind::PreCopyDone, raw, None, io, timeout)?;
    dev.phase = DevPhase::Quiesced;
    let _ = io.events.send(ReaderEvent::PreCopyQuiesced { device });
    Ok(())
}

fn end_of_stream(device: u16, dev: &mut Dev, ctx: &Ctx<'_>) -> Result<(), PipelineError> {
    hand_over(dev, ctx)?;
    let (pool, io, timeout) = (ctx.pool, ctx.io, ctx.timeout);
    let mut p = pool
        .acquire(timeout)
        .map_err(|source| PipelineError::Pool {
            stage: "reader",
            source,
        })?;
    // The sender writes the stream digest here, in stream order (`stages::send_loop`).
    p.spare_mut()[..vfmig_wire::DIGEST_LEN].fill(0);
    p.set_len(vfmig_wire::DIGEST_LEN);
    let total = dev.emitted;
    marker(
        device,
        dev,
        FrameKind::EndOfDevice,
        total,
        Some(p),
        io,
        timeout,
    )?;
    dev.phase = DevPhase::Done;
    let _ = io.events.send(ReaderEvent::Ended {
        device,
        raw_bytes: total,
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::thread;

    use crossbeam_channel::bounded;

    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// Guest memory whose every byte is the low byte of its page's IOVA.
    #[derive(Debug)]
    struct Pattern;

    impl GuestMemoryAccess for Pattern {
        fn ranges(&self) -> Vec<vfmig_vfio::IovaRange> {
            Vec::new()
        }
        fn read(&self, iova: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill((iova / GUEST_PAGE) as u8);
            Ok(())
        }
        fn write(&self, _iova: u64, _data: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The control thread may hand the reader dirty-page batches faster than the codec stage
    /// takes them. Every batch is queued before the reader starts here: a reader that shipped
    /// each batch whole while taking commands would read the device only after every page
    /// (pre-copy could then never drain `initial_bytes` while DMA goes on).
    #[test]
    fn queued_dirty_guest_pages_do_not_keep_the_device_state_from_being_read() {
        const BATCHES: u64 = 32;
        const RUNS: u64 = 16;
        const STATE: usize = 100_000;
        let pool = BufPool::new(16, 64 << 10).unwrap();
        let (mut dev, fd) = UnixStream::pair().unwrap();
        // The device's PRE_COPY data, then nothing more for now (reads return 0).
        dev.write_all(&[7u8; STATE]).unwrap();
        drop(dev);
        let (cmd_tx, cmd_rx) = bounded(BATCHES as usize + 1);
        cmd_tx
            .send(ReaderCmd::Add {
                device: 0,
                fd: Arc::new(OwnedFd::from(fd)),
                mode: ReadMode::PreCopy,
            })
            .unwrap();
        for b in 0..BATCHES {
            // Single pages two apart: every run is a frame of its own.
            let runs = (0..RUNS)
                .map(|k| (0x4000_0000 + (b * RUNS + k) * 2 * GUEST_PAGE, 1))
                .collect();
            let last = false;
            cmd_tx.send(ReaderCmd::DirtyPages { runs, last }).unwrap();
        }
        let (chunk_tx, chunk_rx) = bounded(4);
        let (marker_tx, _marker_rx) = bounded(4);
        let (ev_tx, _ev_rx) = bounded(8);
        let stop = Arc::new(AtomicBool::new(false));
        let batches_done = Arc::new(AtomicU64::new(0));
        let io = ReaderIo {
            cmds: cmd_rx,
            chunks: chunk_tx,
            markers: marker_tx,
            events: ev_tx,
            counters: Arc::new(Counters::new(1)),
            stop: stop.clone(),
            guest: Some(GuestPages {
                memory: Arc::new(Pattern),
                carrier: 0,
                batches_done: batches_done.clone(),
            }),
            adaptive: None,
        };
        let reader = {
            let pool = pool.clone();
            thread::spawn(move || run(pool, vec!["dev0".into()], io, usize::MAX, T))
        };
        let (mut kinds, mut seqs) = (Vec::new(), Vec::new());
        let (mut pages, mut state) = (0, 0);
        while pages < BATCHES * RUNS || state < STATE {
            let c = chunk_rx
                .recv_timeout(T)
                .expect("the reader hands over a chunk");
            if c.kind == FrameKind::DirtyPages {
                assert_eq!(c.buf.len() as u64, GUEST_PAGE);
                assert!(c
                    .buf
                    .as_slice()
                    .iter()
                    .all(|&b| b == (c.offset / GUEST_PAGE) as u8));
                pages += 1;
            } else {
                state += c.buf.len();
            }
            kinds.push(c.kind);
            seqs.push(c.seq);
        }
        stop.store(true, Ordering::SeqCst);
        drop(cmd_tx);
        reader.join().unwrap();
        let first_state = kinds.iter().position(|&k| k == FrameKind::PreCopyData);
        let last_pages = kinds.iter().rposition(|&k| k == FrameKind::DirtyPages);
        assert!(
            first_state < last_pages,
            "device state first came out at chunk {first_state:?}, after every queued page \
             ({last_pages:?})"
        );
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "one sequence, in order"
        );
        assert_eq!(batches_done.load(Ordering::SeqCst), BATCHES);
        assert_eq!(state, STATE);
    }
}
