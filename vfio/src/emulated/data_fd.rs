//! How a stream becomes a kernel data fd: a file on the process-wide FUSE mount served by
//! [`StreamHandler`]s (with the slow-device throttle), or a pipe served by a device thread
//! ([`DataFdBackend::Mem`](super::DataFdBackend::Mem)); opening the saving and resuming fds.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::device::EmulatedDevice;
use super::format;
use super::fuse::{next_stream_id, StreamHandler};
use super::model::{Core, Stream};
use super::resume::ResumeStream;
use super::{errno, lock, pipe, StopCopyFd};

/// Most bytes the memory-speed data fd's consumer feeds per wake-up, under the resume lock.
const CONSUMER_BURST: u64 = 8 << 20;

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

impl EmulatedDevice {
    pub(super) fn open_save(&self, c: &mut Core, precopy: bool) -> io::Result<OwnedFd> {
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

    pub(super) fn open_resume(&self, c: &mut Core) -> io::Result<OwnedFd> {
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
}
