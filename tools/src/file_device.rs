//! `file:PATH` devices: a [`MigrationDevice`] whose state stream is a file, so the pipeline moves
//! files exactly as it moves device state.
//!
//! - [`FileSource`]: PATH (a regular file, a FIFO, or `-` for stdin) *is* the state stream. Its fd is
//!   handed out as the data fd on STOP -> STOP_COPY; reads end with 0 at end of file / when the
//!   FIFO's last writer closes, as the uAPI's STOP_COPY requires.
//! - [`FileSink`]: on STOP -> RESUMING a temporary file (mode 0600) is created in PATH's directory
//!   and handed out as the data fd. RESUMING -> STOP, which the pipeline issues only after the
//!   whole stream verified (length and digest), fsyncs it, renames it onto PATH and fsyncs the
//!   directory. A reset, a failed RESUMING -> STOP or dropping the device removes the temporary
//!   file. The new file is kept only while the device stays in STOP: a reset or a walk from STOP
//!   back toward RUNNING (how a failed migration leaves its destination devices) undoes the
//!   rename, restoring what was at PATH before (kept as a hard link until then). So after a
//!   failure nothing new is left at PATH. A file already at PATH is replaced only when asked
//!   (`--force`), and the new file takes its mode (and, as root, its owner).
//!
//! A file initiates no DMA, so both advertise `VFIO_MIGRATION_P2P` (RUNNING_P2P is RUNNING) and
//! can be combined with other devices; neither has PRE_COPY or DMA dirty logging.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vfmig_vfio::{
    next_state, DeviceClass, DeviceError, DeviceState, Identity, MigrationCaps, MigrationDevice,
};

use crate::spec::FileTarget;

/// Capabilities of both file devices: STOP_COPY and P2P (a file never initiates DMA).
pub const FILE_CAPS: MigrationCaps = MigrationCaps::STOP_COPY.union(MigrationCaps::P2P);

/// Why a file device could not be set up (before any migration starts).
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    /// The source path could not be opened or inspected.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The source is neither a regular file nor a FIFO (a directory, a socket, a device node).
    #[error("{path} is a {what}, not a regular file or FIFO")]
    NotAStream {
        /// The path.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// `file:-` on the source while stdin is a terminal.
    #[error("refusing to read device state from a terminal on stdin (pipe or redirect it)")]
    StdinIsTerminal,
    /// `file:-` on the destination: stdout cannot be written atomically.
    #[error("the destination needs a file path: `-` (stdout) cannot be written atomically")]
    StdoutOnDestination,
    /// The destination file exists and `--force` was not given.
    #[error("{path} exists: pass --force to replace it")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The destination path has no usable parent directory or no file name.
    #[error("{path}: {what}")]
    BadDestination {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Checks that `next` is one legal SET away from `cur` for a device with [`FILE_CAPS`].
fn check_arc(cur: DeviceState, next: DeviceState) -> Result<(), io::Error> {
    match next_state(cur, next, FILE_CAPS) {
        Ok(n) if n == next && n != cur => Ok(()),
        _ => Err(errno(libc::EINVAL)),
    }
}

/// A regular file's identity at open: where it lives (device, inode) and what it holds (size,
/// modification time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// A `file:` source changed between its open and the start of STOP_COPY (see also the
/// pipeline's `SourceChanged`, which covers the read itself).
#[derive(Debug, thiserror::Error)]
#[error("the file changed since it was opened (size {len_then} -> {len_now} bytes, modified: {modified}, replaced: {replaced})")]
pub struct FileChanged {
    /// Size at open.
    pub len_then: u64,
    /// Size now.
    pub len_now: u64,
    /// The modification time differs.
    pub modified: bool,
    /// PATH now names another file (device or inode differ).
    pub replaced: bool,
}

enum SourceKind {
    /// Regular file: size known, can be reopened; its identity at open.
    Regular { len: u64, stamp: FileStamp },
    /// FIFO or stdin pipe, opened non-blocking; made blocking once a writer is there.
    Pipe { waited_for_writer: bool },
}

/// The source side of `file:PATH`.
pub struct FileSource {
    name: String,
    path: Option<PathBuf>,
    kind: SourceKind,
    /// The stream, until handed out on STOP -> STOP_COPY.
    fd: Option<OwnedFd>,
    state: DeviceState,
    writer_timeout: Duration,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("name", &self.name)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl FileSource {
    /// Opens the state stream. A FIFO is opened without blocking; STOP -> STOP_COPY then waits up to
    /// `writer_timeout` for a writer (ETIMEDOUT after it).
    pub fn open(target: &FileTarget, writer_timeout: Duration) -> Result<Self, FileDeviceError> {
        let (name, path, file) =
            match target {
                FileTarget::Stdio => {
                    let stdin = io::stdin();
                    if stdin.is_terminal() {
                        return Err(FileDeviceError::StdinIsTerminal);
                    }
                    let fd = stdin.as_fd().try_clone_to_owned().map_err(|source| {
                        FileDeviceError::Open {
                            path: "-".into(),
                            source,
                        }
                    })?;
                    ("stdin".to_owned(), None, File::from(fd))
                }
                FileTarget::Path(p) => {
                    let open_err = |source| FileDeviceError::Open {
                        path: p.clone(),
                        source,
                    };
                    let meta = fs::metadata(p).map_err(open_err)?;
                    let ft = meta.file_type();
                    let what = if ft.is_dir() {
                        Some("directory")
                    } else if ft.is_socket() {
                        Some("socket")
                    } else if ft.is_block_device() || ft.is_char_device() {
                        Some("device node")
                    } else {
                        None
                    };
                    if let Some(what) = what {
                        return Err(FileDeviceError::NotAStream {
                            path: p.clone(),
                            what,
                        });
                    }
                    // O_NONBLOCK only matters for a FIFO: its open then does not wait for a writer.
                    let file = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(p)
                        .map_err(open_err)?;
                    (display_name(p), Some(p.clone()), file)
                }
            };
        let meta = file.metadata().map_err(|source| FileDeviceError::Open {
            path: path.clone().unwrap_or_else(|| "-".into()),
            source,
        })?;
        let kind = if meta.file_type().is_file() {
            SourceKind::Regular {
                len: meta.len(),
                stamp: FileStamp::of(&meta),
            }
        } else {
            SourceKind::Pipe {
                waited_for_writer: false,
            }
        };
        let mut dev = FileSource {
            name,
            path,
            kind,
            fd: Some(OwnedFd::from(file)),
            state: DeviceState::Running,
            writer_timeout,
        };
        if let (SourceKind::Regular { .. }, Some(fd)) = (&dev.kind, dev.fd.as_ref()) {
            set_blocking(fd.as_fd()).map_err(|source| FileDeviceError::Open {
                path: dev.path.clone().unwrap_or_else(|| "-".into()),
                source,
            })?;
        }
        if matches!(target, FileTarget::Stdio) {
            // stdin may be a pipe whose writer is already there; it may also be non-blocking if
            // the parent left it so: the data fd must block.
            if let Some(fd) = dev.fd.as_ref() {
                set_blocking(fd.as_fd()).map_err(|source| FileDeviceError::Open {
                    path: "-".into(),
                    source,
                })?;
            }
            dev.kind = SourceKind::Pipe {
                waited_for_writer: true,
            };
        }
        Ok(dev)
    }

    /// The stream's fd for STOP_COPY: a FIFO first waits (bounded) for a writer or for data.
    fn take_stream(&mut self) -> Result<OwnedFd, io::Error> {
        let fd = match self.fd.take() {
            Some(fd) => fd,
            // Handed out before (a rolled-back earlier attempt): a regular file can be read again
            // from the start; a pipe's bytes are gone.
            None => match (&self.kind, &self.path) {
                (SourceKind::Regular { .. }, Some(p)) => OwnedFd::from(File::open(p)?),
                _ => return Err(errno(libc::ENODATA)),
            },
        };
        if let SourceKind::Regular { stamp, .. } = &self.kind {
            // What is read must be the file that was opened, as it was then.
            let now = FileStamp::of(&File::from(fd.try_clone()?).metadata()?);
            let at_path = match &self.path {
                Some(p) => FileStamp::of(&fs::metadata(p)?),
                None => now,
            };
            let replaced = (at_path.dev, at_path.ino) != (stamp.dev, stamp.ino)
                || (now.dev, now.ino) != (stamp.dev, stamp.ino);
            if replaced || now.len != stamp.len || now.mtime != stamp.mtime {
                return Err(io::Error::other(FileChanged {
                    len_then: stamp.len,
                    len_now: now.len,
                    modified: now.mtime != stamp.mtime,
                    replaced,
                }));
            }
        }
        if let SourceKind::Pipe { waited_for_writer } = &mut self.kind {
            if !*waited_for_writer {
                wait_for_writer(fd.as_fd(), self.writer_timeout)?;
                set_blocking(fd.as_fd())?;
                *waited_for_writer = true;
            }
        }
        Ok(fd)
    }
}

/// Waits until a FIFO opened O_RDONLY|O_NONBLOCK has data or its writer came and went. Until a
/// writer first connects, Linux reports neither POLLIN nor POLLHUP.
fn wait_for_writer(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), io::Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(errno(e as i32)),
        }
        if Instant::now() >= deadline {
            return Err(errno(libc::ETIMEDOUT));
        }
    }
}

fn set_blocking(fd: BorrowedFd<'_>) -> Result<(), io::Error> {
    let raw = fd.as_raw_fd();
    let flags = fcntl(raw, FcntlArg::F_GETFL).map_err(|e| errno(e as i32))?;
    let flags = OFlag::from_bits_truncate(flags).difference(OFlag::O_NONBLOCK);
    fcntl(raw, FcntlArg::F_SETFL(flags)).map_err(|e| errno(e as i32))?;
    Ok(())
}

fn display_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl MigrationDevice for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    /// A byte stream (pairs with any destination device); a regular file's length is exact.
    fn identity(&self) -> Identity {
        Identity {
            class: DeviceClass::Stream,
            size: match self.kind {
                SourceKind::Regular { len, .. } => Some(len),
                SourceKind::Pipe { .. } => None,
            },
            compat: String::new(),
        }
    }

    fn capabilities(&self) -> MigrationCaps {
        FILE_CAPS
    }

    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(self.state)
    }

    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        check_arc(self.state, next)?;
        let out = match (self.state, next) {
            (DeviceState::Stop, DeviceState::StopCopy) => Some(self.take_stream()?),
            (DeviceState::Stop, DeviceState::Resuming) => return Err(errno(libc::EOPNOTSUPP)),
            _ => None,
        };
        self.state = next;
        Ok(out)
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(match self.kind {
            SourceKind::Regular { len, .. } => len,
            SourceKind::Pipe { .. } => 0,
        })
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.state = DeviceState::Running;
        Ok(())
    }
}

/// The destination side of `file:PATH`: written atomically (temporary file, fsync, rename).
pub struct FileSink {
    name: String,
    path: PathBuf,
    dir: PathBuf,
    /// The temporary file while RESUMING (and after a failed commit, until removed).
    temp: Option<(PathBuf, File)>,
    /// Set by a successful RESUMING -> STOP until the device is dropped in STOP (kept) or leaves
    /// STOP toward RUNNING / is reset (the migration failed after all: undone).
    committed: Option<Commit>,
    state: DeviceState,
}

/// A commit that can still be undone.
#[derive(Debug)]
struct Commit {
    /// A hard link to the file that was at PATH before, restored if the commit is undone.
    backup: Option<PathBuf>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileSink {
    /// Prepares to write `target`; its directory must exist, and a file already at PATH is
    /// replaced only with `replace` (`--force`). Nothing is created until RESUMING.
    pub fn new(target: &FileTarget, replace: bool) -> Result<Self, FileDeviceError> {
        let path = match target {
            FileTarget::Stdio => return Err(FileDeviceError::StdoutOnDestination),
            FileTarget::Path(p) => p.clone(),
        };
        let bad = |what| FileDeviceError::BadDestination {
            path: path.clone(),
            what,
        };
        if path.file_name().is_none() {
            return Err(bad("has no file name"));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad("its parent is not a directory")),
            Err(_) => return Err(bad("its directory does not exist")),
        }
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(bad("is a directory"));
        }
        if !replace && fs::symlink_metadata(&path).is_ok() {
            return Err(FileDeviceError::Exists { path });
        }
        // The temporary file is created there only at RESUMING, after the source connected:
        // refuse an unwritable directory now (exit 2) rather than after the transfer started.
        let wx = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
        if nix::unistd::access(&dir, wx).is_err() {
            return Err(bad("its directory is not writable (permission denied)"));
        }
        Ok(FileSink {
            name: display_name(&path),
            path,
            dir,
            temp: None,
            committed: None,
            state: DeviceState::Running,
        })
    }

    fn side_name(&self, what: &str) -> PathBuf {
        let base = self
            .path
            .file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!(".{base}.vfmig-{}-{n}.{what}", std::process::id()))
    }

    fn create_temp(&mut self) -> Result<OwnedFd, io::Error> {
        self.remove_temp();
        let base = self
            .path
            .file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!(".{base}.vfmig-{}-{n}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)?;
        let data_fd = file.try_clone().map(OwnedFd::from);
        self.temp = Some((temp, file));
        match data_fd {
            Ok(fd) => Ok(fd),
            Err(e) => {
                self.remove_temp();
                Err(e)
            }
        }
    }

    /// fsync, keep a hard link to what is at PATH, rename onto PATH, fsync the directory. On
    /// error the temporary file is removed and PATH is as before.
    fn commit(&mut self) -> Result<(), io::Error> {
        let Some((temp, file)) = self.temp.take() else {
            return Err(errno(libc::EBADF));
        };
        // Whatever is at PATH (a file, a symlink: link(2) does not follow it) can come back.
        let backup = match fs::symlink_metadata(&self.path) {
            Ok(m) if !m.is_dir() => Some(self.side_name("old")),
            _ => None,
        };
        let result = keep_mode_and_owner(&file, &self.path)
            .and_then(|()| file.sync_all())
            .and_then(|()| match &backup {
                Some(b) => fs::hard_link(&self.path, b),
                None => Ok(()),
            })
            .and_then(|()| fs::rename(&temp, &self.path))
            .and_then(|()| File::open(&self.dir)?.sync_all());
        match result {
            Ok(()) => {
                self.committed = Some(Commit { backup });
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                if let Some(b) = backup {
                    let _ = fs::remove_file(b);
                }
                Err(e)
            }
        }
    }

    /// Undoes a commit: the file that was at PATH before comes back, or PATH is removed.
    fn uncommit(&mut self) {
        if let Some(c) = self.committed.take() {
            let _ = match c.backup {
                Some(b) => fs::rename(b, &self.path),
                None => fs::remove_file(&self.path),
            };
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
    }

    /// Makes a commit final: the old file's link goes.
    fn finalize(&mut self) {
        if let Some(Commit {
            backup: Some(b), ..
        }) = self.committed.take()
        {
            let _ = fs::remove_file(b);
        }
    }

    fn remove_temp(&mut self) {
        if let Some((temp, _)) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Gives the new file the mode (and, where permitted, the owner) of the regular file it replaces
/// at `path`, as `cp` onto an existing file does; a new path keeps the temporary file's 0600.
fn keep_mode_and_owner(file: &File, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(old) = fs::metadata(path) else {
        return Ok(());
    };
    if !old.is_file() {
        return Ok(());
    }
    // Best effort: only root (or the owner, for the group) may change ownership; the mode is
    // applied after, since chown may clear set-id bits.
    let _ = nix::unistd::fchown(
        file.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(old.uid())),
        Some(nix::unistd::Gid::from_raw(old.gid())),
    );
    file.set_permissions(fs::Permissions::from_mode(old.mode() & 0o7777))
}

/// Temporary files that a receiver which died (SIGKILL, power loss) left for `path`: the
/// `.NAME.vfmig-PID-N.tmp` names of this module whose PID is not a live process. A PID that is
/// alive, or reused by any process, is left alone.
pub fn stale_temps(path: &Path) -> Vec<PathBuf> {
    let (Some(name), dir) = (path.file_name(), path.parent()) else {
        return Vec::new();
    };
    let dir = match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{}.vfmig-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), true) = (
            pid.parse::<i32>(),
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        ) else {
            continue;
        };
        if pid <= 0 || pid == i32::try_from(std::process::id()).unwrap_or(0) {
            continue;
        }
        let dead = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if dead && e.file_type().is_ok_and(|t| t.is_file()) {
            stale.push(e.path());
        }
    }
    stale.sort();
    stale
}

impl Drop for FileSink {
    fn drop(&mut self) {
        self.remove_temp();
        // Dropped in STOP after RESUMING -> STOP: the migration succeeded, the new file stays.
        // Anywhere else a commit cannot be pending (leaving STOP undid it).
        self.finalize();
    }
}

impl MigrationDevice for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// A byte stream: takes any source device's state.
    fn identity(&self) -> Identity {
        Identity {
            class: DeviceClass::Stream,
            size: None,
            compat: String::new(),
        }
    }

    fn capabilities(&self) -> MigrationCaps {
        FILE_CAPS
    }

    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(self.state)
    }

    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        check_arc(self.state, next)?;
        let out = match (self.state, next) {
            (DeviceState::Stop, DeviceState::Resuming) => Some(self.create_temp()?),
            (DeviceState::Resuming, DeviceState::Stop) => {
                if let Err(e) = self.commit() {
                    // As a device that refuses its state: ERROR until reset.
                    self.state = DeviceState::Error;
                    return Err(e);
                }
                None
            }
            (DeviceState::Stop, DeviceState::StopCopy) => return Err(errno(libc::EOPNOTSUPP)),
            // The state is kept only while the device stays in STOP: going back toward RUNNING
            // is the failure path (how the pipeline leaves its destination devices after a
            // failure).
            (DeviceState::Stop, DeviceState::RunningP2p | DeviceState::Running) => {
                self.uncommit();
                None
            }
            _ => None,
        };
        self.state = next;
        Ok(out)
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(0)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.remove_temp();
        self.uncommit();
        self.state = DeviceState::Running;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn read_all(fd: OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        File::from(fd).read_to_end(&mut out).expect("read data fd");
        out
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn source_hands_out_the_file_as_data_fd_on_stop_to_stop_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.bin");
        fs::write(&p, b"device state bytes").expect("write");
        let mut src = FileSource::open(&FileTarget::Path(p), Duration::from_secs(5)).expect("open");
        assert_eq!(src.capabilities(), FILE_CAPS);
        assert_eq!(src.stop_copy_size().expect("size"), 18);
        let fd = src
            .set_state(DeviceState::StopCopy)
            .expect("walk")
            .expect("data fd");
        assert_eq!(src.state().expect("state"), DeviceState::StopCopy);
        assert_eq!(read_all(fd), b"device state bytes");
        assert!(src.set_state(DeviceState::Stop).expect("stop").is_none());
    }

    #[test]
    fn source_regular_file_can_be_read_again_after_a_rollback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        fs::write(&p, b"abc").expect("write");
        let mut src = FileSource::open(&FileTarget::Path(p), Duration::from_secs(5)).expect("open");
        let _ = src.set_state(DeviceState::StopCopy).expect("walk");
        src.set_state(DeviceState::Running)
            .expect("back to running");
        let fd = src
            .set_state(DeviceState::StopCopy)
            .expect("walk")
            .expect("fd");
        assert_eq!(read_all(fd), b"abc");
    }

    #[test]
    fn source_regular_file_changed_or_replaced_since_open_is_refused_at_stop_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let target = FileTarget::Path(p.clone());
        let to_stop_copy = |d: &mut FileSource| match d.set_state(DeviceState::StopCopy) {
            Err(DeviceError::SetState { source, .. }) => Err(source),
            Err(e) => panic!("{e:?}"),
            Ok(fd) => Ok(fd),
        };
        // Grown.
        fs::write(&p, b"0123456789").unwrap();
        let mut d = FileSource::open(&target, Duration::from_secs(1)).unwrap();
        fs::write(&p, b"0123456789abc").unwrap();
        let e = to_stop_copy(&mut d).unwrap_err();
        let c = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<FileChanged>())
            .unwrap();
        assert_eq!((c.len_then, c.len_now, c.replaced), (10, 13, false));
        // Replaced by another file at the same path.
        fs::write(&p, b"0123456789").unwrap();
        let mut d = FileSource::open(&target, Duration::from_secs(1)).unwrap();
        let q = dir.path().join("other");
        fs::write(&q, b"0123456789").unwrap();
        fs::rename(&q, &p).unwrap();
        let e = to_stop_copy(&mut d).unwrap_err();
        let c = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<FileChanged>())
            .unwrap();
        assert!(c.replaced);
        // Unchanged: the data fd is handed out.
        let mut d = FileSource::open(&target, Duration::from_secs(1)).unwrap();
        assert!(to_stop_copy(&mut d).unwrap().is_some());
    }

    #[test]
    fn source_fifo_waits_for_its_writer_and_ends_when_the_writer_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        // Opening the source must not block although no writer exists yet.
        let mut src =
            FileSource::open(&FileTarget::Path(p.clone()), Duration::from_secs(20)).expect("open");
        let writer = std::thread::spawn(move || {
            let mut w = OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open writer");
            w.write_all(&vec![7u8; 200_000]).expect("write");
        });
        let fd = src
            .set_state(DeviceState::StopCopy)
            .expect("walk")
            .expect("fd");
        let got = read_all(fd);
        writer.join().expect("writer thread");
        assert_eq!(got.len(), 200_000);
        assert!(got.iter().all(|b| *b == 7));
    }

    #[test]
    fn source_fifo_without_writer_times_out_instead_of_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let mut src =
            FileSource::open(&FileTarget::Path(p), Duration::from_millis(200)).expect("open");
        let err = src.set_state(DeviceState::StopCopy).expect_err("no writer");
        assert_eq!(err.errno(), Some(libc::ETIMEDOUT));
    }

    #[test]
    fn source_refuses_directories_and_missing_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = FileTarget::Path(dir.path().to_path_buf());
        assert!(matches!(
            FileSource::open(&t, Duration::from_secs(1)),
            Err(FileDeviceError::NotAStream {
                what: "directory",
                ..
            })
        ));
        let t = FileTarget::Path(dir.path().join("missing"));
        assert!(matches!(
            FileSource::open(&t, Duration::from_secs(1)),
            Err(FileDeviceError::Open { .. })
        ));
    }

    #[test]
    fn sink_renames_into_place_only_on_resuming_to_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"hello state").expect("write");
        assert!(!p.exists(), "nothing at PATH before RESUMING -> STOP");
        assert_eq!(
            files_in(dir.path()).len(),
            1,
            "one temporary file while RESUMING"
        );
        sink.set_state(DeviceState::Stop).expect("commit");
        assert_eq!(fs::read(&p).expect("read"), b"hello state");
        assert_eq!(files_in(dir.path()), vec!["out.bin".to_owned()]);
        drop(sink);
        assert!(p.exists(), "drop after commit keeps the file");
    }

    #[test]
    fn sink_reset_and_drop_remove_the_temporary_file_and_leave_nothing_at_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"partial").expect("write");
        sink.reset().expect("reset");
        assert_eq!(sink.state().expect("state"), DeviceState::Running);
        assert!(files_in(dir.path()).is_empty());

        let _fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk again")
            .expect("fd");
        drop(sink);
        assert!(
            files_in(dir.path()).is_empty(),
            "drop mid-RESUMING leaves nothing"
        );
    }

    #[test]
    fn sink_walked_back_to_running_after_commit_removes_the_new_file() {
        // How a failed migration leaves a destination device that was already in STOP (or one the
        // pipeline walks RESUMING -> STOP -> RUNNING instead of resetting).
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"partial").expect("write");
        sink.set_state(DeviceState::Stop).expect("commit");
        assert!(p.exists());
        sink.set_state(DeviceState::Running).expect("walk back");
        assert_eq!(
            files_in(dir.path()),
            Vec::<String>::new(),
            "nothing new left at PATH"
        );
    }

    #[test]
    fn sink_undo_restores_the_file_that_was_there_and_success_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        fs::write(&p, b"old").expect("write old");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"new").expect("write");
        sink.set_state(DeviceState::Stop).expect("commit");
        assert_eq!(fs::read(&p).expect("read"), b"new");
        sink.reset().expect("reset");
        assert_eq!(
            fs::read(&p).expect("read"),
            b"old",
            "reset restores the old file"
        );
        assert_eq!(files_in(dir.path()), vec!["out.bin".to_owned()]);

        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"newer").expect("write");
        sink.set_state(DeviceState::Stop).expect("commit");
        drop(sink);
        assert_eq!(
            fs::read(&p).expect("read"),
            b"newer",
            "dropped in STOP: kept"
        );
        assert_eq!(
            files_in(dir.path()),
            vec!["out.bin".to_owned()],
            "no backup left"
        );
    }

    #[test]
    fn sink_undo_restores_a_symlink_that_was_at_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        std::os::unix::fs::symlink("elsewhere", &p).expect("symlink");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        File::from(fd).write_all(b"new").expect("write");
        sink.set_state(DeviceState::Stop).expect("commit");
        sink.set_state(DeviceState::Running).expect("walk back");
        assert_eq!(
            fs::read_link(&p).expect("still a symlink"),
            Path::new("elsewhere")
        );
        assert_eq!(files_in(dir.path()), vec!["out.bin".to_owned()]);
    }

    #[test]
    fn sink_failed_commit_goes_to_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        let mut sink = FileSink::new(&FileTarget::Path(p.clone()), true).expect("sink");
        let _fd = sink
            .set_state(DeviceState::Resuming)
            .expect("walk")
            .expect("fd");
        // Make the rename fail: PATH becomes a non-empty directory.
        fs::create_dir(&p).expect("mkdir");
        fs::write(p.join("x"), b"x").expect("write");
        let err = sink
            .set_state(DeviceState::Stop)
            .expect_err("commit must fail");
        assert!(matches!(
            err,
            DeviceError::SetState {
                now: Some(DeviceState::Error),
                ..
            }
        ));
        assert_eq!(files_in(dir.path()), vec!["out.bin".to_owned()]);
        assert!(p.is_dir(), "what was at PATH is untouched");
    }

    #[test]
    fn sink_refuses_stdout_and_missing_directories() {
        assert!(matches!(
            FileSink::new(&FileTarget::Stdio, true),
            Err(FileDeviceError::StdoutOnDestination)
        ));
        assert!(matches!(
            FileSink::new(&FileTarget::Path("/nonexistent-dir-vfmig/x".into()), true),
            Err(FileDeviceError::BadDestination { .. })
        ));
    }

    #[test]
    fn illegal_single_arcs_fail_with_einval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sink = FileSink::new(&FileTarget::Path(dir.path().join("o")), true).expect("sink");
        // RUNNING -> STOP is not one arc for a P2P device (RUNNING_P2P comes first).
        let err = sink
            .set_single_state(DeviceState::Stop)
            .expect_err("not adjacent");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = sink
            .set_single_state(DeviceState::PreCopy)
            .expect_err("no PRE_COPY");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
