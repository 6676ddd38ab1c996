//! The data fd as a real kernel fd: one process-wide FUSE mount, served by `fuser`, in which every
//! emulated data fd is an `open()` of a fresh file.
//!
//! Files are opened with `FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM | FOPEN_NOFLUSH`, so
//! every read and write reaches the device (no page cache), `pread`/`pwrite` fail with ESPIPE and
//! the offset of a read at -1 (io_uring) is ignored, as on a VFIO migration file. There is no
//! `poll` handler: the kernel then reports the file always readable, like mtty. Replies to READ
//! come from a per-stream worker thread, so a slow device delays only its own fd; WRITEs are
//! parsed on the session thread under the resume stream's own lock (never the device lock, which
//! may be held across `open()` of a data fd).
//!
//! The mount lives at `$TMPDIR/vfmig-emu-<pid>-<n>` while at least one [`FuseHost`] reference is
//! held. When the last one goes, or when the process dies, a watchdog child process aborts the
//! connection, detaches the mount and removes the directory (see [`Watchdog`]). Mounts left by
//! dead or dying processes without a watchdog are cleaned up when a new host starts.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};

/// `FOPEN_DIRECT_IO`: bypass the page cache.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `FOPEN_NONSEEKABLE`: lseek/pread/pwrite give ESPIPE.
const FOPEN_NONSEEKABLE: u32 = 1 << 2;
/// `FOPEN_STREAM`: no file position at all.
const FOPEN_STREAM: u32 = 1 << 4;
/// `FOPEN_NOFLUSH`: `close()` sends no FLUSH. Without it, a process exiting with a data fd open
/// would wait forever for a FLUSH reply from its own, already killed, server thread.
const FOPEN_NOFLUSH: u32 = 1 << 5;
/// Flags of every data fd.
const OPEN_FLAGS: u32 = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM | FOPEN_NOFLUSH;

/// Inode of the mount's root directory.
const ROOT_INO: u64 = 1;
/// Queued READ requests per stream; beyond it READ fails with EBUSY (one in flight is normal).
const READ_QUEUE: usize = 8;
/// Size reported for stream files (see `attr`).
const STREAM_FILE_SIZE: u64 = 1 << 62;
/// Attribute cache time for stream files (their attributes never change).
const ATTR_TTL: Duration = Duration::from_secs(3600);

/// What a data fd is backed by: the device side of one stream.
pub(crate) trait StreamHandler: Send + Sync {
    /// Fills the front of `out` (the READ size); returns the bytes filled or an errno.
    /// `Ok(0)` is end of stream (read returns 0).
    fn read(&self, out: &mut [u8]) -> Result<usize, i32>;
    /// Consumes `data`; returns how many bytes were taken or an errno.
    fn write(&self, data: &[u8]) -> Result<usize, i32>;
}

struct Entry {
    handler: Arc<dyn StreamHandler>,
    /// Feeds the stream's read worker; dropped on RELEASE, which ends the worker.
    reads: Sender<(u32, ReplyData)>,
    opened: bool,
}

#[derive(Default)]
struct Registry {
    streams: Mutex<HashMap<u64, Entry>>,
    /// Largest READ request the kernel has sent (the negotiated read size in practice).
    max_read_request: AtomicU64,
    max_write_request: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic while holding the lock leaves a consistent map (single inserts/removes).
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Fs {
    registry: Arc<Registry>,
}

fn attr(ino: u64) -> FileAttr {
    let dir = ino == ROOT_INO;
    FileAttr {
        ino,
        // A huge size: the kernel's direct-IO path for non-sync kiocbs (io_uring) returns 0
        // without asking the server when the position is at or past i_size (0 on a stream).
        size: if dir { 0 } else { STREAM_FILE_SIZE },
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o700 } else { 0o600 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn stream_name(id: u64) -> String {
    format!("s{id}")
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, _config: &mut KernelConfig) -> Result<(), i32> {
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let id = name
            .to_str()
            .and_then(|n| n.strip_prefix('s'))
            .and_then(|n| n.parse::<u64>().ok());
        let found = parent == ROOT_INO
            && id.is_some_and(|id| self.registry.lock().get(&id).is_some_and(|e| !e.opened));
        match id {
            Some(id) if found => reply.entry(&Duration::ZERO, &attr(id + 1), 0),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        reply.attr(&ATTR_TTL, &attr(ino));
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let id = ino.wrapping_sub(1);
        let mut map = self.registry.lock();
        match map.get_mut(&id) {
            Some(e) if !e.opened => {
                e.opened = true;
                reply.opened(id, OPEN_FLAGS);
            }
            _ => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.registry
            .max_read_request
            .fetch_max(u64::from(size), Ordering::Relaxed);
        let tx = self.registry.lock().get(&fh).map(|e| e.reads.clone());
        match tx {
            // The stream's worker replies (possibly late: the slow-device fault).
            Some(tx) => match tx.try_send((size, reply)) {
                Ok(()) => {}
                // More than READ_QUEUE reads in flight on one stream fd: refuse rather than
                // block the session thread that serves every device.
                Err(crossbeam_channel::TrySendError::Full((_, reply))) => reply.error(libc::EBUSY),
                Err(crossbeam_channel::TrySendError::Disconnected((_, reply))) => {
                    reply.error(libc::ENODEV)
                }
            },
            None => reply.error(libc::ENODEV),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.registry
            .max_write_request
            .fetch_max(data.len() as u64, Ordering::Relaxed);
        let handler = self.registry.lock().get(&fh).map(|e| e.handler.clone());
        match handler.map(|h| h.write(data)) {
            // `n` <= data.len() <= the kernel's max_write (a u32).
            Some(Ok(n)) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(Err(errno)) => reply.error(errno),
            None => reply.error(libc::ENODEV),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.registry.lock().remove(&fh);
        reply.ok();
    }
}

/// Huge page size: the reply buffer is aligned to it so the kernel pins one folio, not 256 pages,
/// when it copies a 1 MiB reply.
const HUGE_PAGE: usize = 2 << 20;

/// A reply buffer of at least `len` bytes in a 2 MiB-aligned, `MADV_HUGEPAGE` anonymous mapping.
struct ReplyBuf {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

impl ReplyBuf {
    fn new(len: usize) -> io::Result<ReplyBuf> {
        let len = len.max(1).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let map = memmap2::MmapMut::map_anon(len + HUGE_PAGE)?;
        // Best effort: without transparent huge pages the buffer still works.
        let _ = map.advise(memmap2::Advice::HugePage);
        let start = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
        Ok(ReplyBuf { map, start, len })
    }

    fn get(&mut self, size: usize) -> io::Result<&mut [u8]> {
        if size > self.len {
            *self = ReplyBuf::new(size)?;
        }
        Ok(&mut self.map[self.start..self.start + size])
    }
}

fn read_worker(handler: Arc<dyn StreamHandler>, rx: Receiver<(u32, ReplyData)>) {
    let mut buf: Option<ReplyBuf> = None;
    for (size, reply) in rx {
        let size = size as usize;
        let slot = match &mut buf {
            Some(b) => b.get(size),
            None => ReplyBuf::new(size).and_then(|b| {
                let b = buf.insert(b);
                b.get(size)
            }),
        };
        let out = match slot {
            Ok(out) => out,
            Err(_) => {
                reply.error(libc::ENOMEM);
                continue;
            }
        };
        match handler.read(out) {
            Ok(n) => reply.data(&out[..n]),
            Err(errno) => reply.error(errno),
        }
    }
}

/// The process-wide FUSE mount. Devices hold an `Arc`; the last drop detaches the mount.
pub(crate) struct FuseHost {
    mountpoint: PathBuf,
    dev: u64,
    registry: Arc<Registry>,
    session: Mutex<Option<fuser::BackgroundSession>>,
    watchdog: Mutex<Option<Watchdog>>,
}

impl std::fmt::Debug for FuseHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseHost")
            .field("mountpoint", &self.mountpoint)
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

static HOST: Mutex<Weak<FuseHost>> = Mutex::new(Weak::new());
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);
static NEXT_MOUNT: AtomicU64 = AtomicU64::new(0);
static STALE_CLEANED: OnceLock<()> = OnceLock::new();

/// A fresh stream id (process-wide, never reused), for FUSE and pipe data fds alike.
pub(crate) fn next_stream_id() -> u64 {
    NEXT_STREAM.fetch_add(1, Ordering::Relaxed)
}

const MOUNT_PREFIX: &str = "vfmig-emu-";

impl FuseHost {
    /// The live host, or a new mount.
    pub(crate) fn get() -> io::Result<Arc<FuseHost>> {
        let mut g = HOST.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = g.upgrade() {
            return Ok(h);
        }
        STALE_CLEANED.get_or_init(cleanup_stale_mounts);
        let host = Arc::new(FuseHost::mount()?);
        *g = Arc::downgrade(&host);
        Ok(host)
    }

    fn mount() -> io::Result<FuseHost> {
        let n = NEXT_MOUNT.fetch_add(1, Ordering::Relaxed);
        let mountpoint =
            std::env::temp_dir().join(format!("{MOUNT_PREFIX}{}-{n}", std::process::id()));
        match std::fs::create_dir(&mountpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let registry = Arc::new(Registry::default());
        let fs = Fs {
            registry: registry.clone(),
        };
        let options = [
            MountOption::FSName("vfmig-emu".to_owned()),
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        let session = fuser::Session::new(fs, &mountpoint, &options)?;
        let bg = session.spawn()?;
        let dev = std::fs::metadata(&mountpoint)?.dev();
        // Without a watchdog a killed process could hang in exit; still usable, so not fatal.
        let watchdog = Watchdog::spawn(&mountpoint, dev).ok();
        Ok(FuseHost {
            mountpoint,
            dev,
            registry,
            session: Mutex::new(Some(bg)),
            watchdog: Mutex::new(watchdog),
        })
    }

    /// Registers a stream and opens its data fd (`O_RDONLY` for saving, `O_WRONLY` for resuming,
    /// as the kernel creates VFIO migration files).
    pub(crate) fn open_stream(
        &self,
        id: u64,
        handler: Arc<dyn StreamHandler>,
        write: bool,
    ) -> io::Result<OwnedFd> {
        let (tx, rx) = bounded(READ_QUEUE);
        let worker_handler = handler.clone();
        std::thread::Builder::new()
            .name(format!("vfmig-emu-s{id}"))
            .spawn(move || read_worker(worker_handler, rx))?;
        self.registry.lock().insert(
            id,
            Entry {
                handler,
                reads: tx,
                opened: false,
            },
        );
        let path = self.mountpoint.join(stream_name(id));
        let file = OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path);
        match file {
            Ok(f) => Ok(OwnedFd::from(f)),
            Err(e) => {
                self.registry.lock().remove(&id);
                Err(e)
            }
        }
    }

    /// The stream id behind `fd`, if `fd` is a data fd of this mount.
    pub(crate) fn stream_of(&self, fd: BorrowedFd<'_>) -> Option<u64> {
        let f = File::from(fd.try_clone_to_owned().ok()?);
        let md = f.metadata().ok()?;
        (md.dev() == self.dev && md.ino() > ROOT_INO).then(|| md.ino() - 1)
    }

    /// Largest READ and WRITE requests the kernel has sent so far (bytes).
    pub(crate) fn max_requests(&self) -> (u64, u64) {
        (
            self.registry.max_read_request.load(Ordering::Relaxed),
            self.registry.max_write_request.load(Ordering::Relaxed),
        )
    }

    /// The mount point.
    pub(crate) fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for FuseHost {
    fn drop(&mut self) {
        // The watchdog first: it aborts the connection by its fusectl number, which stays ours
        // only while the session below holds /dev/fuse open (a later mount could reuse it).
        let wd = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(wd);
        // Dropping the background session unmounts (falling back to MNT_DETACH); its thread ends
        // when the kernel ends the connection.
        let bg = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(bg);
        detach(&self.mountpoint);
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

/// Where the kernel's fusectl file system lives (`<conn>/abort` ends a FUSE connection).
const FUSECTL: &str = "/sys/fs/fuse/connections";
/// Longest [`Watchdog::spawn`] waits for `/bin/sh` to be started (the host works without it).
const WATCHDOG_SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The FUSE server runs in this process, so when the process dies with a request already read
/// by its (now killed) server thread, the requesting thread waits uninterruptibly for a reply
/// that never comes and the process never finishes exiting. A small child process guards
/// against that: it gets SIGTERM when the thread that spawned it dies (`PR_SET_PDEATHSIG`),
/// which happens when the process is killed or exits, and then aborts the FUSE connection
/// (`fusectl <conn>/abort`, mounting fusectl if needed), detaches the mount and removes its
/// directory. On a normal shutdown the same clean-up runs when the host is dropped.
struct Watchdog {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn spawn(mountpoint: &Path, dev: u64) -> io::Result<Watchdog> {
        let mp = mountpoint.display().to_string();
        if !mp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b))
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (major, conn) = (libc::major(dev), libc::minor(dev));
        // The abort is guarded by a check that the connection number still belongs to this
        // mount: once the mount is gone (e.g. detached by another process's stale-mount
        // clean-up) the number may already name a newer mount.
        let script = format!(
            "cleanup() {{ if grep -qF ' {major}:{conn} / {mp} ' /proc/self/mountinfo; then \
             [ -e {FUSECTL}/{conn}/abort ] || mount -t fusectl fusectl {FUSECTL}; \
             echo 1 > {FUSECTL}/{conn}/abort; umount -l {mp}; rmdir {mp}; fi; \
             trap - TERM; kill 0; exit 0; }} 2>/dev/null; \
             trap cleanup TERM; sleep 2147483647 & wait"
        );
        let (stop, stopped) = bounded::<()>(0);
        let (ready, spawned) = bounded::<io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("vfmig-emu-watch".to_owned())
            .spawn(move || {
                use std::os::unix::process::CommandExt;
                let mut cmd = std::process::Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(script)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    // Its own process group: `kill 0` in the script ends the shell and its
                    // `sleep` together, and a terminal's Ctrl-C does not reach it.
                    .process_group(0);
                // SAFETY: `set_pdeathsig` runs in the forked child before exec and only makes
                // async-signal-safe calls (sigemptyset, pthread_sigmask, signal, prctl) on its
                // own stack.
                unsafe { cmd.pre_exec(set_pdeathsig) };
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                // Until the host drops `stop`. If the process dies instead, this thread dies
                // with it and the child gets its parent-death SIGTERM.
                let _ = stopped.recv();
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: plain kill(2) of our own, not yet reaped, child.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                let _ = child.wait();
            })?;
        // On a timeout `stop` is dropped below, so the thread kills and reaps the child once
        // it has one.
        match spawned.recv_timeout(WATCHDOG_SPAWN_TIMEOUT) {
            Ok(Ok(())) => Ok(Watchdog {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::from_raw_os_error(libc::ECHILD)),
        }
    }
}

/// In the forked watchdog child, before exec: SIGTERM when the spawning thread dies
/// (`PR_SET_PDEATHSIG`), with SIGTERM deliverable (a VMM's signal thread design blocks or ignores
/// it in every thread, and the mask and ignored dispositions survive exec).
fn set_pdeathsig() -> io::Result<()> {
    let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    if unsafe { libc::sigemptyset(empty.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `empty` was initialised above; the old mask is not asked for.
    if unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: resets one signal's disposition to the default; no handler pointer is installed.
    if unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `umount2(path, MNT_DETACH)`, ignoring errors (not mounted, already gone).
fn detach(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; umount2 only reads it.
    let _ = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Whether process `pid` is gone, a zombie, or has a fatal SIGKILL pending (dying).
fn process_dead_or_dying(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_owned()
    };
    let sigkill = |mask: String| u64::from_str_radix(&mask, 16).is_ok_and(|m| m & (1 << 8) != 0);
    field("State:").starts_with('Z') || sigkill(field("ShdPnd:")) || sigkill(field("SigPnd:"))
}

/// Writes `1` to `fusectl/<conn>/abort`, mounting fusectl first if needed.
fn abort_connection(conn: &str) {
    let abort = format!("{FUSECTL}/{conn}/abort");
    if !Path::new(&abort).exists() {
        let (src, target, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
        // no data argument is passed.
        let _ = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    let _ = std::fs::write(abort, b"1");
}

/// Cleans up `vfmig-emu-<pid>-<n>` mounts whose process is gone or dying (killed while a request
/// was in flight, and no watchdog finished the job): aborts the connection, detaches the mount
/// and removes its directory.
fn cleanup_stale_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let tmp = std::env::temp_dir();
    for line in info.lines() {
        // Field 3 is major:minor (the minor is the fusectl connection), field 5 the mount point
        // (octal-escaped; our names need no escaping).
        let mut fields = line.split(' ');
        let (Some(devno), Some(mp)) = (fields.nth(2), fields.nth(1)) else {
            continue;
        };
        let path = Path::new(mp);
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(MOUNT_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if path.parent() != Some(tmp.as_path()) || pid == std::process::id() {
            continue;
        }
        if process_dead_or_dying(pid) {
            // Abort only if the mount is still there: once it is gone, its connection number
            // may belong to a new mount.
            let still = std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|now| now.lines().any(|l| l == line));
            if let (true, Some((_, conn))) = (still, devno.split_once(':')) {
                abort_connection(conn);
            }
            detach(path);
            let _ = std::fs::remove_dir(path);
        }
    }
}
