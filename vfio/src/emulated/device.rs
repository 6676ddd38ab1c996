//! [`EmulatedDevice`], the type callers hold: creation and config checks, the test and
//! report hooks (dirtying, DMA, MMIO, counters), the FSM arcs a SET walks, and its
//! [`MigrationDevice`] implementation.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::device::{MigrationDevice, PrecopyInfo};
use crate::dma::IovaRange;
use crate::error::DeviceError;
use crate::op;
use crate::state::{path, DeviceState, MigrationCaps, Transition};

use super::fuse::FuseHost;
use super::guest::DmaLog;
use super::model::{Core, Stream, MMIO_REGS};
use super::{
    content, errno, lock, DataFdBackend, EmulatedConfig, EmulatedStats, Faults, GuestMemory,
    P2pPort, PrecopyInfoVersion, StreamError, GUEST_PAGE_SIZE, PAGE_SIZE,
};

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
    pub(super) core: Arc<Mutex<Core>>,
    /// The FUSE mount serving data fds (`None` with the memory-speed data fd).
    pub(super) host: Option<Arc<FuseHost>>,
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

    /// The digest of the device's current state (see [`format`](mod@super::format)). On a source
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
