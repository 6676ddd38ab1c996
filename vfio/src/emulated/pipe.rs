//! The memory-speed data fd ([`DataFdBackend::Mem`](super::DataFdBackend::Mem)): one end of a
//! kernel pipe, the other end served by a device thread.
//!
//! - **Saving**: the caller gets the read end (`O_RDONLY`). A generator thread fills 1 MiB
//!   buffers from the device (the same record builder the FUSE fd uses) and hands them to the
//!   pipe (`F_SETPIPE_SZ` 1 MiB) by `vmsplice`, so the only copy is the caller's read (see
//!   [`Spliced`] for when a buffer is reused); when the device has nothing more to give (end of
//!   the STOP_COPY stream, or the stream ended) it closes the write end, so the caller's read
//!   returns 0 once the pipe is empty. As the pipe references the generator's pages until they
//!   are read, the fd must be read (`read`, `readv`, io_uring reads), not spliced or teed: pages
//!   moved into another pipe that way could change when the generator reuses its buffer. (A VFIO
//!   migration file cannot be spliced at all.)
//! - **Resuming**: the caller gets the write end (`O_WRONLY`). A consumer thread reads what
//!   arrives and feeds the device's stream parser; RESUMING -> STOP drains the pipe itself (under
//!   the resume stream's lock, so no byte written before the SET is missed) before validating.
//!
//! Both threads wait in `poll` on their pipe end and on an eventfd ([`Waker`]) the device signals
//! when the stream ends, so neither can be left blocked on a pipe no one reads or writes. The
//! generator blocks `SIGPIPE` for itself: a caller that closes the read end early makes its write
//! fail with EPIPE (the thread then ends) instead of signalling the process.
//!
//! The only `unsafe` here is plain syscalls on fds this module owns (`pipe2`, `fcntl`, `poll`,
//! `eventfd`, `ioctl(FIONREAD)`, `vmsplice` of the generator's own buffers) and
//! `pthread_sigmask` on the calling thread.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

/// Pipe capacity asked for with `F_SETPIPE_SZ` (the unprivileged maximum by default,
/// `/proc/sys/fs/pipe-max-size`); where refused the pipe keeps its default (64 KiB).
pub(crate) const PIPE_SIZE: libc::c_int = 1 << 20;
/// Bytes the generator builds per write, and the consumer's read size.
pub(crate) const CHUNK: usize = 1 << 20;

/// An eventfd a device signals to end a stream thread.
#[derive(Debug)]
pub(crate) struct Waker(OwnedFd);

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wakes the thread (idempotent: the counter only grows).
    pub(crate) fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to an eventfd we own. It cannot fail
        // short of the counter being saturated, in which case the thread is already woken.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Ends a stream thread when dropped (the device drops it with the stream).
#[derive(Debug)]
pub(crate) struct StreamStop(Arc<Waker>);

impl StreamStop {
    /// Ends the thread now.
    pub(crate) fn stop(&self) {
        self.0.wake();
    }
}

impl Drop for StreamStop {
    fn drop(&mut self) {
        self.0.wake();
    }
}

/// A pipe `(read end, write end)`, both `O_CLOEXEC`, with capacity [`PIPE_SIZE`] where allowed.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: fds[0] is a new fd owned by nothing else.
    let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, for fds[1].
    let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // Best effort: a smaller pipe only means more, smaller transfers.
    // SAFETY: fcntl(F_SETPIPE_SZ) on a pipe fd we own takes an int, no pointers.
    let _ = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((rd, wr))
}

/// Sets `O_NONBLOCK` on a pipe end the device keeps (its own open file description: the
/// caller's end is not affected).
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a valid fd; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl(F_SETFL) on a valid fd with an int argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`wait`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ready {
    /// The pipe end is ready (or hung up / in error: the next I/O says which).
    Io,
    /// The device asked the thread to end.
    Woken,
}

/// Waits until `fd` reports `events` (or hang-up / error), or the waker fires.
fn wait(fd: BorrowedFd<'_>, events: libc::c_short, waker: &Waker) -> io::Result<Ready> {
    let mut pfds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: waker.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `pfds` is a valid array of two pollfd structs that outlives the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfds[1].revents != 0 {
            return Ok(Ready::Woken);
        }
        if pfds[0].revents != 0 {
            return Ok(Ready::Io);
        }
    }
}

/// Blocks `SIGPIPE` in the calling thread (a write to a pipe without readers then fails with
/// EPIPE only; the signal stays pending on this thread, which ignores it).
fn block_sigpipe() {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: `set` was initialised above; sigaddset only writes into it.
    if unsafe { libc::sigaddset(set.as_mut_ptr(), libc::SIGPIPE) } != 0 {
        return;
    }
    // SAFETY: `set` is initialised; the old mask is not asked for; this thread only.
    let _ = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut()) };
}

/// Bytes the pipe holds now (`FIONREAD`).
fn unread(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on a pipe fd we own writes one int into `n`, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The pipe's capacity in bytes (`F_GETPIPE_SZ`).
fn capacity(fd: BorrowedFd<'_>) -> Option<usize> {
    // SAFETY: fcntl(F_GETPIPE_SZ) on a pipe fd we own; no pointers.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(n).ok()
}

/// `vmsplice` (non-blocking) of `data` into the pipe: the pipe then references these pages
/// instead of copying them. Returns the bytes spliced.
fn vmsplice(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `iov` describes `data`, which is live for the call; the kernel takes references
    // to its pages (they stay allocated as long as the pipe holds them, whatever we do with
    // the mapping) and only reads them. The caller keeps the bytes unchanged until the reader
    // has consumed them (see `Spliced`).
    let n = unsafe { libc::vmsplice(fd.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Two page-aligned 1 MiB buffers the generator fills in turn and hands to the pipe by
/// `vmsplice` (no copy on the way in). A buffer is refilled only once the reader has consumed
/// every byte it gave to the pipe: the stream offset where its bytes end is at most the bytes
/// spliced so far minus those still unread (`FIONREAD`). With the pipe at its 1 MiB capacity,
/// splicing one whole buffer can only complete once the other has been read, so the check holds
/// in normal operation; if it does not (the reader enlarged the pipe), the generator falls back
/// to copying writes for the rest of the stream and never touches the spliced pages again.
struct Spliced {
    bufs: [memmap2::MmapMut; 2],
    /// Stream offset at the end of each buffer's last splice.
    end: [u64; 2],
    /// Bytes spliced so far.
    total: u64,
    next: usize,
}

impl Spliced {
    fn new() -> io::Result<Spliced> {
        Ok(Spliced {
            bufs: [
                memmap2::MmapMut::map_anon(CHUNK)?,
                memmap2::MmapMut::map_anon(CHUNK)?,
            ],
            end: [0; 2],
            total: 0,
            next: 0,
        })
    }

    /// The next buffer, if the reader has consumed everything it last held.
    fn next_free(&mut self, fd: BorrowedFd<'_>) -> Option<&mut [u8]> {
        let consumed = self.total.checked_sub(unread(fd).ok()?)?;
        let k = self.next;
        (consumed >= self.end[k]).then(|| &mut self.bufs[k][..])
    }
}

/// Writes all of `data` into the non-blocking pipe `w` (by `vmsplice` when `splice`), waiting
/// for room; false when the stream must end (caller gone, device stopped it).
fn push(w: &File, data: &[u8], splice: bool, waker: &Waker) -> bool {
    let mut at = 0;
    while at < data.len() {
        let r = if splice {
            vmsplice(w.as_fd(), &data[at..])
        } else {
            (&*w).write(&data[at..])
        };
        match r {
            Ok(k) => at += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !matches!(wait(w.as_fd(), libc::POLLOUT, waker), Ok(Ready::Io)) {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the caller closed its end.
            Err(_) => return false,
        }
    }
    true
}

/// Starts a saving stream: returns the caller's read end and the handle that ends the generator.
/// `fill` fills the front of a buffer with the next stream bytes: `Ok(0)` or an error ends the
/// stream (the caller then reads what is in the pipe, then 0). Stream bytes reach the pipe by
/// `vmsplice` from two alternating buffers (see [`Spliced`]) where the pipe is at most 1 MiB,
/// else by copying writes.
pub(crate) fn spawn_saver(
    name: String,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, i32> + Send + 'static,
) -> io::Result<(OwnedFd, StreamStop)> {
    let (rd, wr) = pipe()?;
    set_nonblocking(wr.as_fd())?;
    // A pipe no larger than a buffer holds pages of one buffer at most once that buffer is
    // spliced whole (the reuse rule holds); a larger one is the caller's doing (they can resize
    // it too, which `Spliced` detects).
    let mut spliced = match capacity(wr.as_fd()) {
        Some(c) if c <= CHUNK => Some(Spliced::new()?),
        _ => None,
    };
    let waker = Arc::new(Waker::new()?);
    let thread_waker = waker.clone();
    std::thread::Builder::new().name(name).spawn(move || {
        block_sigpipe();
        let w = File::from(wr);
        let mut copy_buf: Vec<u8> = Vec::new();
        loop {
            let free = spliced.as_mut().and_then(|s| s.next_free(w.as_fd()));
            let splice = free.is_some();
            let buf = match free {
                Some(b) => b,
                None => {
                    // From here on copies only: spliced pages may still be in the pipe.
                    spliced = None;
                    copy_buf.resize(CHUNK, 0);
                    &mut copy_buf[..]
                }
            };
            let n = match fill(buf) {
                Ok(n) if n > 0 => n.min(buf.len()),
                _ => break,
            };
            if !push(&w, &buf[..n], splice, &thread_waker) {
                break;
            }
            if let Some(s) = &mut spliced {
                s.total += n as u64;
                s.end[s.next] = s.total;
                s.next ^= 1;
            }
        }
        // Dropping `w` closes the write end: the caller reads the rest, then 0.
    })?;
    Ok((rd, StreamStop(waker)))
}

/// The device's end of a resuming pipe.
#[derive(Debug)]
pub(crate) struct PipeIn {
    rd: Arc<File>,
    stop: StreamStop,
    /// The caller closed every write end and the pipe is empty: nothing more can come.
    pub(crate) eof: bool,
}

impl PipeIn {
    /// Reads what the pipe holds now (non-blocking), at most `max` bytes (or, with `None`, the
    /// bytes it held when called: what was written before), and hands it to `feed` piece by
    /// piece. Sets `eof` once the pipe is empty with no writer left.
    pub(crate) fn drain(
        &mut self,
        buf: &mut Vec<u8>,
        max: Option<u64>,
        mut feed: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let max = match max {
            Some(m) => m,
            None => unread(self.rd.as_fd())?,
        };
        if buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        let mut got = 0u64;
        // A zero-byte read is EOF only if the pipe is empty and writerless: at least one read.
        loop {
            match (&*self.rd).read(buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    feed(&buf[..n.min(buf.len())]);
                    got += n as u64;
                    if got >= max {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends the consumer thread (it also ends by itself at EOF).
    pub(crate) fn stop(&self) {
        self.stop.stop();
    }
}

/// Starts a resuming stream: returns the caller's write end and the device's end; the consumer
/// thread is started by [`PipeIn::spawn`].
pub(crate) fn resume_pipe() -> io::Result<(OwnedFd, PipeIn)> {
    let (rd, wr) = pipe()?;
    set_nonblocking(rd.as_fd())?;
    Ok((
        wr,
        PipeIn {
            rd: Arc::new(File::from(rd)),
            stop: StreamStop(Arc::new(Waker::new()?)),
            eof: false,
        },
    ))
}

impl PipeIn {
    /// Starts the consumer thread: it calls `on_readable` whenever the pipe has data (or hung
    /// up) and ends when that returns false or [`PipeIn::stop`] is called. `on_readable` is
    /// expected to call [`PipeIn::drain`] under the same lock RESUMING -> STOP drains with.
    pub(crate) fn spawn(
        &self,
        name: String,
        mut on_readable: impl FnMut() -> bool + Send + 'static,
    ) -> io::Result<()> {
        let (rd, waker) = (self.rd.clone(), self.stop.0.clone());
        std::thread::Builder::new().name(name).spawn(move || {
            while matches!(wait(rd.as_fd(), libc::POLLIN, &waker), Ok(Ready::Io)) && on_readable() {
            }
        })?;
        Ok(())
    }
}
