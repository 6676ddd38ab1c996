//! The pipeline's data-fd ring: reads from and writes to device data fds, into and out of
//! [`BufPool`] slots, on the transport's owned-buffer ring ([`vfmig_transport::uring::Uring`]),
//! which holds every buffer while the kernel may touch it and is the only `unsafe` involved.
//!
//! Slots are registered with the ring the first time they are used, so an operation runs as
//! `ReadFixed` / `WriteFixed` where the slot could be pinned. Pinning counts against
//! `RLIMIT_MEMLOCK` for a caller without `CAP_IPC_LOCK` (an unprivileged user, a container, a
//! systemd unit without `LimitMEMLOCK=`); where the kernel refuses (`ENOMEM`, `EPERM`), the slot
//! is used unregistered, with plain `Read` / `Write` (the kernel maps the pages per operation
//! instead of once), and [`DataRing::unpinned_errno`] says so; nothing else changes.

use std::collections::HashSet;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use vfmig_transport::uring::{Io, IoBuf, Sub, Uring};
use vfmig_transport::{BufPool, PoolBuf};

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

/// An io_uring instance whose operations work on [`BufPool`] slots, registered where they can
/// be pinned. Dropping it cancels what is in flight (see [`Uring`]).
#[derive(Debug)]
pub(crate) struct DataRing {
    ring: Uring<u64>,
    /// Keys of the operations in flight.
    keys: HashSet<u64>,
}

impl DataRing {
    /// Creates a ring with `entries` submission slots whose operations may use `pool`'s slots as
    /// registered buffers (each registered on first use).
    pub fn new(pool: &BufPool, entries: u32) -> io::Result<DataRing> {
        Ok(DataRing {
            ring: Uring::new(entries, Some(pool))?,
            keys: HashSet::new(),
        })
    }

    /// Like [`DataRing::new`] but never registers: for tests of the unregistered path.
    #[cfg(test)]
    fn unregistered(pool: &BufPool, entries: u32) -> io::Result<DataRing> {
        Ok(DataRing {
            ring: Uring::unregistered(entries, pool)?,
            keys: HashSet::new(),
        })
    }

    /// `None` while every slot used so far could be registered (pinned); otherwise the errno the
    /// kernel refused a registration with (`ENOMEM` or `EPERM`).
    pub fn unpinned_errno(&self) -> Option<i32> {
        self.ring.unpinned_errno()
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.keys.len()
    }

    /// Whether an operation with `key` is in flight.
    pub fn is_in_flight(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    /// Queues a read of up to `len` bytes from `fd` at its current position (offset -1: the data
    /// fd is a stream) into `buf[at..at + len]`. `buf` comes back in the [`Completion`] with `key`.
    /// `regular_file`: `fd` is a regular file (a `file:` source), whose reads may complete inline.
    pub fn read(
        &mut self,
        key: u64,
        fd: RawFd,
        buf: PoolBuf,
        (at, len): (usize, usize),
        regular_file: bool,
    ) -> io::Result<()> {
        self.check_new(key, &buf, at, len)?;
        u32::try_from(len).map_err(|_| invalid("read length"))?;
        // A data fd read goes straight to io-wq: it blocks in the driver (VFIO data fds have no
        // nowait path; FUSE would fail a nowait try and arm a poll first), so an inline attempt
        // only adds a round trip before every read. A regular file in the page cache or on tmpfs
        // is read inline, in the submitting thread, with no io-wq hand-off (and the bytes land
        // in that thread's cache, which hashes them next).
        let io = Io::Read {
            fd,
            at,
            len,
            offset: u64::MAX,
            punt: !regular_file,
        };
        self.push(key, io, buf)
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
        u32::try_from(len).map_err(|_| invalid("write length"))?;
        let io = Io::Write {
            fd,
            at,
            len,
            offset: offset.unwrap_or(u64::MAX),
            // Stream fds block in the driver: straight to io-wq (see `read`). A regular file
            // (given with its offset) is tried inline first.
            punt: offset.is_none(),
        };
        self.push(key, io, buf)
    }

    fn check_new(&self, key: u64, buf: &PoolBuf, at: usize, len: usize) -> io::Result<()> {
        if self.keys.contains(&key) {
            return Err(invalid("key already in flight"));
        }
        if len == 0 || at.checked_add(len).is_none_or(|end| end > buf.capacity()) {
            return Err(invalid("span outside the buffer"));
        }
        Ok(())
    }

    fn push(&mut self, key: u64, io: Io, buf: PoolBuf) -> io::Result<()> {
        let sub = Sub {
            io,
            buf: IoBuf::Pool(buf),
            owner: key,
        };
        // A refused submission comes back whole; its buffer returns to the pool when dropped.
        self.ring.push(sub).map_err(|r| r.error)?;
        self.keys.insert(key);
        Ok(())
    }

    /// Hands what is queued to the kernel now.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion (returns
    /// immediately if one is ready). Appends every completion reaped, possibly none, to `done`
    /// (a vector the caller reuses, so waiting does not allocate).
    pub fn wait(&mut self, timeout: Duration, done: &mut Vec<Completion>) -> io::Result<()> {
        let before = done.len();
        self.reap(done);
        if done.len() > before || self.keys.is_empty() {
            return self.ring.submit();
        }
        self.ring.wait(timeout)?;
        self.reap(done);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        while let Some(c) = self.ring.pop() {
            self.keys.remove(&c.owner);
            // Every submission of this ring carries a pool buffer.
            if let Some(buf) = c.buf.into_pool() {
                out.push(Completion {
                    key: c.owner,
                    result: c.result,
                    buf,
                });
            }
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
        ring.read(7, r.as_raw_fd(), buf, (0, 4096), false).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.key, c.result), (7, 6));
        w.write_all(b"world").unwrap();
        ring.read(7, r.as_raw_fd(), c.buf, (6, 4090), false)
            .unwrap();
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
        ring.read(2, w.as_raw_fd(), c.buf, (0, 4096), false)
            .unwrap();
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
        ring.read(1, r.as_raw_fd(), a, (0, 4096), false).unwrap();
        let b = pool.try_acquire().unwrap();
        assert!(ring.read(1, r.as_raw_fd(), b, (0, 4096), false).is_err());
        // Dropping the ring cancels the read parked on the empty socket and returns its buffer.
        drop(ring);
        assert_eq!(pool.free(), 2);
    }
}
