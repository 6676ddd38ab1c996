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
//!   fd but [`MigrationDevice::precopy_info`](crate::MigrationDevice::precopy_info), which
//!   recognises the fd by `fstat`.
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
//!
//! Files: [`EmulatedDevice`] and its FSM arcs (`device.rs`); the state model behind the device
//! lock (`model.rs`); the saving stream's records and sizes (`save.rs`); the resuming stream
//! (`resume.rs`); how a stream becomes a FUSE or pipe data fd (`data_fd.rs`, over `fuse.rs` and
//! `pipe.rs`); config, content, format, guest memory and P2P in their own modules.

mod bits;
pub mod config;
pub mod content;
mod data_fd;
mod device;
pub mod format;
mod fuse;
pub mod guest;
mod model;
mod p2p;
mod pipe;
mod resume;
mod save;

use std::io;
use std::sync::{Mutex, MutexGuard};

pub use self::config::{
    DataFdBackend, EmulatedConfig, FailArc, Faults, GuestConfig, PrecopyEmptyRead,
    PrecopyInfoVersion, Quirks, StopCopyFd, DEFAULT_BLOCK_SIZE,
};
pub use self::content::{Profile, PAGE_SIZE};
pub use self::device::{EmulatedDevice, EmulatedError, MAX_SIZE};
pub use self::format::StreamError;
pub use self::guest::{GuestMemory, GUEST_PAGE_SIZE};
pub(crate) use self::model::Core;
pub use self::model::{EmulatedStats, MMIO_REGS};
pub use self::p2p::{P2pFabric, P2pPort, P2pStats, P2pTraffic};

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
