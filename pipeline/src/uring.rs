//! The only `unsafe` of the pipeline: io_uring `ReadFixed` / `WriteFixed` on data fds, into and out
//! of the registered [`BufPool`] slots.
//!
//! Registering the pool pins it, which counts against `RLIMIT_MEMLOCK` for a caller without
//! `CAP_IPC_LOCK` (an unprivileged user, a container, a systemd unit without `LimitMEMLOCK=`).
//! When the kernel refuses (`ENOMEM`, `EPERM`), the ring runs on the same slots unregistered,
//! with plain `Read` / `Write` (the kernel maps the pages per operation instead of once) and
//! [`DataRing::is_pinned`] says so; nothing else changes.
//!
//! Invariant behind every `SAFETY` comment here: a buffer handed to the kernel is moved into the
//! in-flight table (`inflight`, keyed by the submission's `user_data`) and is given back only when
//! that submission's completion has been reaped. Until then nothing else can reach the slot (a
//! [`PoolBuf`] is exclusive) and the slot's memory stays mapped (the ring holds a [`BufPool`]
//! clone, dropped after the ring). If a ring is dropped with operations the kernel will not give
//! back, their buffers are leaked rather than returned to the pool, so the kernel can never write
//! into a slot that someone else owns.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use vfmig_transport::{BufPool, PoolBuf};

/// `user_data` bit that marks cancel submissions (their buffers are never in the table).
const CANCEL_BIT: u64 = 1 << 63;

/// How long `Drop` waits for cancelled operations before leaking their buffers.
const DROP_DRAIN: Duration = Duration::from_secs(2);

/// What one completed operation gave back.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The key the operation was submitted with.
    pub key: u64,
    /// The kernel's result: bytes transferred, or a negative errno.
    pub result: i32,
    /// The buffer, returned to the caller.
    pub buf: PoolBuf,
}

/// An io_uring instance with a [`BufPool`] registered as fixed buffers (or, where the pool
/// cannot be pinned, used unregistered).
pub(crate) struct DataRing {
    // Field order matters: the ring (and with it the registration) is dropped before the pool.
    ring: IoUring,
    inflight: HashMap<u64, PoolBuf>,
    pool: BufPool,
    /// The pool's slots are registered: use `ReadFixed` / `WriteFixed`.
    fixed: bool,
    /// Why registration was refused (an errno), when it was.
    unpinned_errno: Option<i32>,
}

impl std::fmt::Debug for DataRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataRing")
            .field("inflight", &self.inflight.len())
            .field("pool", &self.pool)
            .field("fixed", &self.fixed)
            .finish()
    }
}

impl DataRing {
    /// Creates a ring with `entries` submission slots and registers every slot of `pool`; if
    /// the kernel refuses to pin them (`ENOMEM`, `EPERM`: `RLIMIT_MEMLOCK`), the ring uses the
    /// slots unregistered (see [`DataRing::is_pinned`]).
    pub fn new(pool: &BufPool, entries: u32) -> io::Result<DataRing> {
        let ring = IoUring::new(entries)?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's mapping, which stays mapped as long as any
        // `BufPool` clone lives; `self.pool` is such a clone and is dropped after `self.ring`
        // (field order), which unregisters the buffers.
        let unpinned_errno = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => None,
            Err(e) => match e.raw_os_error() {
                Some(n @ (libc::ENOMEM | libc::EPERM)) => Some(n),
                _ => return Err(e),
            },
        };
        Ok(DataRing {
            ring,
            inflight: HashMap::new(),
            pool: pool.clone(),
            fixed: unpinned_errno.is_none(),
            unpinned_errno,
        })
    }

    /// Like [`DataRing::new`] but never registers: for tests of the unregistered path.
    #[cfg(test)]
    fn unregistered(pool: &BufPool, entries: u32) -> io::Result<DataRing> {
        Ok(DataRing {
            ring: IoUring::new(entries)?,
            inflight: HashMap::new(),
            pool: pool.clone(),
            fixed: false,
            unpinned_errno: Some(libc::ENOMEM),
        })
    }

    /// `None` when the pool is registered (pinned); otherwise the errno the kernel refused the
    /// registration with (`ENOMEM` or `EPERM`).
    pub fn unpinned_errno(&self) -> Option<i32> {
        self.unpinned_errno
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether an operation with `key` is in flight.
    pub fn is_in_flight(&self, key: u64) -> bool {
        self.inflight.contains_key(&key)
    }

    /// Queues a read of up to `len` bytes from `fd` at its current position (offset -1: the data
    /// fd is a stream) into `buf[at..at + len]`. `buf` comes back in the [`Completion`] with `key`.
    pub fn read(
        &mut self,
        key: u64,
        fd: RawFd,
        mut buf: PoolBuf,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        self.check_new(key, &buf, at, len)?;
        let len = u32::try_from(len).map_err(|_| invalid("read length"))?;
        // SAFETY: `at + len <= capacity` (checked), so the span stays inside the slot.
        let ptr = unsafe { buf.as_mut_ptr().add(at) };
        let sqe = if self.fixed {
            opcode::ReadFixed::new(types::Fd(fd), ptr, len, buf.index())
                .offset(u64::MAX)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(u64::MAX)
                .build()
        };
        let sqe = sqe
            // Straight to io-wq: a data fd read blocks in the driver (VFIO data fds have no
            // nowait path; FUSE would fail a nowait try and arm a poll first), so an inline
            // attempt only adds a round trip before every read.
            .flags(squeue::Flags::ASYNC)
            .user_data(key);
        self.push(key, buf, &sqe)
    }

    /// Queues a write of `buf[at..at + len]` to `fd` at file offset `offset`, or at its current
    /// position (offset -1) when `None`. Stream fds (VFIO data fds, pipes) take `None`; regular
    /// files should be given the offset: with offset -1, a kernel (seen on 6.18, tmpfs) reports
    /// a partial count again and again for a full file system instead of ENOSPC, so a
    /// resubmitting writer would count bytes that were never stored.
    pub fn write(
        &mut self,
        key: u64,
        fd: RawFd,
        (buf, at, len): (PoolBuf, usize, usize),
        offset: Option<u64>,
    ) -> io::Result<()> {
        self.check_new(key, &buf, at, len)?;
        let len32 = u32::try_from(len).map_err(|_| invalid("write length"))?;
        // SAFETY: `at + len <= capacity` (checked), so the span stays inside the slot.
        let ptr = unsafe { buf.as_ptr().add(at) };
        let sqe = if self.fixed {
            opcode::WriteFixed::new(types::Fd(fd), ptr, len32, buf.index())
                .offset(offset.unwrap_or(u64::MAX))
                .build()
        } else {
            opcode::Write::new(types::Fd(fd), ptr, len32)
                .offset(offset.unwrap_or(u64::MAX))
                .build()
        };
        let sqe = sqe.flags(squeue::Flags::ASYNC).user_data(key);
        self.push(key, buf, &sqe)
    }

    fn check_new(&self, key: u64, buf: &PoolBuf, at: usize, len: usize) -> io::Result<()> {
        if key & CANCEL_BIT != 0 || self.inflight.contains_key(&key) {
            return Err(invalid("key already in flight"));
        }
        if len == 0 || at.checked_add(len).is_none_or(|end| end > buf.capacity()) {
            return Err(invalid("span outside the buffer"));
        }
        Ok(())
    }

    fn push(&mut self, key: u64, buf: PoolBuf, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // The buffer enters the table before the kernel can see the entry.
        self.inflight.insert(key, buf);
        // SAFETY: the entry's buffer span lies inside a pool slot (registered or not) owned by the
        // table entry just inserted, which is removed only when this entry's completion is reaped.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        if pushed.is_err() {
            // Still full after a submit: take the buffer back, the kernel never saw the entry.
            let _ = self.inflight.remove(&key);
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(())
    }

    /// Hands what is queued to the kernel now.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion (returns
    /// immediately if one is ready). Appends every completion reaped, possibly none, to `done`
    /// (a vector the caller reuses, so waiting does not allocate).
    pub fn wait(&mut self, timeout: Duration, done: &mut Vec<Completion>) -> io::Result<()> {
        let before = done.len();
        self.reap(done);
        if done.len() > before || self.inflight.is_empty() {
            self.ring.submit()?;
            return Ok(());
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        self.reap(done);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let key = cqe.user_data();
            if key & CANCEL_BIT != 0 {
                continue;
            }
            if let Some(buf) = self.inflight.remove(&key) {
                out.push(Completion {
                    key,
                    result: cqe.result(),
                    buf,
                });
            }
        }
    }
}

impl Drop for DataRing {
    fn drop(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let keys: Vec<u64> = self.inflight.keys().copied().collect();
        for key in keys {
            let sqe = opcode::AsyncCancel::new(key)
                .build()
                .user_data(key | CANCEL_BIT);
            // SAFETY: a cancel entry references no memory.
            let _ = unsafe { self.ring.submission().push(&sqe) };
        }
        let deadline = Instant::now() + DROP_DRAIN;
        while !self.inflight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Completed buffers are dropped here: the kernel is done with them.
            let mut done = Vec::new();
            if self
                .wait(left.min(Duration::from_millis(100)), &mut done)
                .is_err()
            {
                break;
            }
        }
        // The kernel may still write into these slots: never give them back to the pool.
        for (_, buf) in self.inflight.drain() {
            std::mem::forget(buf);
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    fn wait_one(ring: &mut DataRing) -> Completion {
        let mut done = Vec::new();
        ring.wait(Duration::from_secs(5), &mut done).unwrap();
        done.pop().unwrap()
    }

    #[test]
    fn read_fixed_at_current_position_follows_a_socket_stream() {
        let pool = BufPool::new(2, 4096).unwrap();
        let mut ring = DataRing::new(&pool, 8).unwrap();
        let (mut r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        w.write_all(b"hello ").unwrap();
        let buf = pool.try_acquire().unwrap();
        ring.read(7, r.as_raw_fd(), buf, 0, 4096).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.key, c.result), (7, 6));
        w.write_all(b"world").unwrap();
        ring.read(7, r.as_raw_fd(), c.buf, 6, 4090).unwrap();
        let mut c = wait_one(&mut ring);
        assert_eq!(c.result, 5);
        c.buf.set_len(11);
        assert_eq!(c.buf.as_slice(), b"hello world");
        drop(w);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "the ring consumed exactly what was written"
        );
    }

    #[test]
    fn write_fixed_appends_in_order_to_a_stream() {
        let pool = BufPool::new(1, 4096).unwrap();
        let mut ring = DataRing::new(&pool, 8).unwrap();
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = pool.try_acquire().unwrap();
        buf.spare_mut()[..6].copy_from_slice(b"abcdef");
        ring.write(1, w.as_raw_fd(), (buf, 2, 4), None).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!(c.result, 4);
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"cdef");
    }

    #[test]
    fn unregistered_ring_reads_and_writes_the_same_bytes() {
        let pool = BufPool::new(2, 4096).unwrap();
        let mut ring = DataRing::unregistered(&pool, 8).unwrap();
        assert_eq!(ring.unpinned_errno(), Some(libc::ENOMEM));
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = pool.try_acquire().unwrap();
        buf.spare_mut()[..6].copy_from_slice(b"abcdef");
        ring.write(1, w.as_raw_fd(), (buf, 1, 4), None).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!(c.result, 4);
        let mut got = [0u8; 4];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"bcde");
        (&r).write_all(b"xyz").unwrap();
        ring.read(2, w.as_raw_fd(), c.buf, 0, 4096).unwrap();
        let mut c = wait_one(&mut ring);
        assert_eq!(c.result, 3);
        c.buf.set_len(3);
        assert_eq!(c.buf.as_slice(), b"xyz");
    }

    #[test]
    fn spans_outside_the_slot_and_duplicate_keys_are_refused() {
        let pool = BufPool::new(2, 4096).unwrap();
        let mut ring = DataRing::new(&pool, 8).unwrap();
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        let a = pool.try_acquire().unwrap();
        assert!(ring.write(1, r.as_raw_fd(), (a, 4000, 200), None).is_err());
        let a = pool.try_acquire().unwrap();
        ring.read(1, r.as_raw_fd(), a, 0, 4096).unwrap();
        let b = pool.try_acquire().unwrap();
        assert!(ring.read(1, r.as_raw_fd(), b, 0, 4096).is_err());
        // Dropping the ring cancels the read parked on the empty socket and returns its buffer.
        drop(ring);
        assert_eq!(pool.free(), 2);
    }
}
