//! Configuration of an [`EmulatedDevice`](super::EmulatedDevice).

use crate::emulated::content::Profile;
use crate::state::{MigrationCaps, Transition};

/// What a PRE_COPY read returns when nothing is pending right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrecopyEmptyRead {
    /// `ENOMSG`, as the uAPI text says.
    #[default]
    Enomsg,
    /// `0`, as mtty does (kernel 6.12).
    Zero,
}

/// What PRE_COPY_P2P (or PRE_COPY) -> STOP_COPY returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StopCopyFd {
    /// No fd (data_fd = -1): keep reading the PRE_COPY fd. mtty and most drivers.
    #[default]
    None,
    /// A duplicate of the PRE_COPY fd (same open file, same stream).
    Dup,
}

/// What kind of kernel fd an emulated device's data fd is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DataFdBackend {
    /// A file on the process-wide FUSE mount: every read and write is a FUSE request served by
    /// the device (one kernel round trip per request, at most 1 MiB). Every feature and quirk.
    #[default]
    Fuse,
    /// One end of a pipe fed (saving) or drained (resuming) by a device thread: reads and writes
    /// run at memory speed, with no request round trip. STOP_COPY-only: a config with PRE_COPY,
    /// `read_error_at` or `short_reads` is refused (see the module docs for why).
    Mem,
}

impl DataFdBackend {
    /// Every backend, in the order of [`DataFdBackend::NAMES`].
    pub const ALL: [DataFdBackend; 2] = [DataFdBackend::Fuse, DataFdBackend::Mem];
    /// The names `from_name` accepts.
    pub const NAMES: &'static [&'static str] = &["fuse", "mem"];

    /// `fuse` or `mem`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DataFdBackend::Fuse => "fuse",
            DataFdBackend::Mem => "mem",
        }
    }

    /// Parses `fuse` or `mem`.
    pub fn from_name(name: &str) -> Option<DataFdBackend> {
        match name {
            "fuse" => Some(DataFdBackend::Fuse),
            "mem" => Some(DataFdBackend::Mem),
            _ => None,
        }
    }
}

impl std::fmt::Display for DataFdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which pre-copy information behaviour the device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrecopyInfoVersion {
    /// A kernel or driver without `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`: the opt-in is
    /// refused, `initial_bytes` only decreases and new initial data shows up as `dirty_bytes`.
    #[default]
    V1,
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (Linux 7.1) is offered; once opted in,
    /// `VFIO_PRECOPY_INFO_REINIT` reports new initial data.
    V2,
}

/// Behaviours real drivers differ in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Quirks {
    /// PRE_COPY read with nothing pending.
    pub precopy_empty_read: PrecopyEmptyRead,
    /// The fd returned on the way into STOP_COPY from PRE_COPY.
    pub stop_copy_fd: StopCopyFd,
    /// Each read returns at most the rest of the current record (short reads everywhere).
    pub short_reads: bool,
    /// A refused RESUMING -> STOP leaves the device in RESUMING (mtty; a reset is needed)
    /// instead of ERROR.
    pub refusal_stays_resuming: bool,
    /// MMIO keeps working in every state but ERROR (mtty serves its UART in STOP) instead of
    /// discarding writes and reading zeros in STOP-like states (mlx5, the uAPI's model).
    pub stop_serves_mmio: bool,
}

impl Quirks {
    /// As the uAPI text describes: ENOMSG when drained, no new fd into STOP_COPY.
    pub const fn uapi() -> Quirks {
        Quirks {
            precopy_empty_read: PrecopyEmptyRead::Enomsg,
            stop_copy_fd: StopCopyFd::None,
            short_reads: false,
            refusal_stays_resuming: false,
            stop_serves_mmio: false,
        }
    }

    /// As mtty behaves on kernel 6.12: `0` when drained in PRE_COPY, no new fd into STOP_COPY,
    /// short reads, RESUMING kept after a refused resume, MMIO served in STOP.
    pub const fn mtty() -> Quirks {
        Quirks {
            precopy_empty_read: PrecopyEmptyRead::Zero,
            stop_copy_fd: StopCopyFd::None,
            short_reads: true,
            refusal_stays_resuming: true,
            stop_serves_mmio: true,
        }
    }
}

/// A SET that fails on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailArc {
    /// The arc whose SET fails (with EIO).
    pub arc: Transition,
    /// After the failure the device is in ERROR (true) or still in `arc.from` (false).
    pub to_error: bool,
    /// Fail only the first time (true) or every time (false).
    pub once: bool,
}

/// Injected faults. All off by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Faults {
    /// A read of the saving data fd fails with EIO once stream byte N is reached (the read that
    /// would cross N returns the bytes before N).
    pub read_error_at: Option<u64>,
    /// The saving data fd delivers at most this many bytes per second (replies are delayed on a
    /// device thread; the caller's other fds are not affected).
    pub slow_bytes_per_sec: Option<u64>,
    /// The saving stream ends (read returns 0 in STOP_COPY, "nothing pending" in PRE_COPY) at
    /// stream byte N, before the END record: a truncated stream.
    pub early_end_at: Option<u64>,
    /// RESUMING -> STOP fails with EINVAL (device goes to ERROR) even for a valid stream.
    pub refuse_resume: bool,
    /// A SET failure at a chosen arc.
    pub fail_arc: Option<FailArc>,
}

/// Guest memory the device writes by DMA while running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// IOVA of the region (page aligned).
    pub iova: u64,
    /// Size in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Guest pages written per second while the device runs (0: only explicit writes).
    pub dma_pages_per_sec: u64,
    /// Guest pages the device writes when it enters RUNNING_P2P or PRE_COPY_P2P: the DMA it
    /// still had outstanding, completed while quiescing (the last device writes before it
    /// stops).
    pub quiesce_dma_pages: u64,
}

/// Everything an emulated device is made of. Every field of the CLI spec
/// `emu:size=..,seed=..,profile=..,precopy=..,dirty-rate=..,p2p=..,data-fd=..` has a field here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedConfig {
    /// Device name for messages.
    pub name: String,
    /// State size in bytes: a non-zero multiple of 4096.
    pub size: u64,
    /// Content seed.
    pub seed: u64,
    /// Compressibility profile.
    pub profile: Profile,
    /// Streaming and dirtying unit (a multiple of 4096; clamped to `size`).
    pub block_size: u64,
    /// PRE_COPY support and its initial bytes: `None` = no `VFIO_MIGRATION_PRE_COPY`; `Some(n)` =
    /// the first `n` bytes of state (rounded up to blocks, clamped to `size`) stream as initial
    /// data in PRE_COPY, the rest only in STOP_COPY.
    pub precopy: Option<u64>,
    /// `VFIO_MIGRATION_P2P` (RUNNING_P2P, PRE_COPY_P2P).
    pub p2p: bool,
    /// State bytes dirtied per second while running (RUNNING, RUNNING_P2P, PRE_COPY*).
    pub dirty_rate: u64,
    /// Driver behaviours.
    pub quirks: Quirks,
    /// Injected faults.
    pub faults: Faults,
    /// Guest memory for DMA writes and dirty logging (`None`: no DMA logging support).
    pub guest: Option<GuestConfig>,
    /// Most bytes a RESUMING data fd accepts before writes fail with ENOMEM; `None` = four full
    /// streams' worth.
    pub resume_capacity: Option<u64>,
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` support (`precopy-info=v1|v2`).
    pub precopy_info: PrecopyInfoVersion,
    /// Re-initialisation in PRE_COPY (`reinit-after=SIZE`): once the PRE_COPY stream has
    /// delivered at least this many bytes and a `precopy_info` has reported `initial_bytes` = 0,
    /// the next `precopy_info` finds the device reconfigured (once per stream). The blocks of
    /// its initial region change and must be sent again: with the v2 opt-in they, and the
    /// blocks dirty so far, are new initial data (`VFIO_PRECOPY_INFO_REINIT` set once,
    /// `dirty_bytes` 0, as mlx5 does); without it they are counted as `dirty_bytes` (v1).
    pub reinit_after: Option<u64>,
    /// The kind of data fd (`data-fd=fuse|mem`); default FUSE.
    pub data_fd: DataFdBackend,
}

/// Default block size: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;

impl Default for EmulatedConfig {
    fn default() -> EmulatedConfig {
        EmulatedConfig {
            name: "emu0".to_owned(),
            size: 16 << 20,
            seed: 1,
            profile: Profile::Mixed,
            block_size: DEFAULT_BLOCK_SIZE,
            precopy: Some(u64::MAX),
            p2p: true,
            dirty_rate: 0,
            quirks: Quirks::default(),
            faults: Faults::default(),
            guest: None,
            resume_capacity: None,
            precopy_info: PrecopyInfoVersion::V1,
            reinit_after: None,
            data_fd: DataFdBackend::Fuse,
        }
    }
}

impl EmulatedConfig {
    /// A config with every capability, no dirtying, no faults.
    pub fn new(name: impl Into<String>, size: u64, seed: u64) -> EmulatedConfig {
        EmulatedConfig {
            name: name.into(),
            size,
            seed,
            ..EmulatedConfig::default()
        }
    }

    /// The migration capabilities this config gives.
    pub fn caps(&self) -> MigrationCaps {
        let mut caps = MigrationCaps::STOP_COPY;
        if self.p2p {
            caps = caps | MigrationCaps::P2P;
        }
        if self.precopy.is_some() {
            caps = caps | MigrationCaps::PRE_COPY;
        }
        caps
    }

    /// Sets the capabilities (STOP_COPY is always on); PRE_COPY keeps (or gets) all state as
    /// initial bytes.
    pub fn with_caps(mut self, caps: MigrationCaps) -> EmulatedConfig {
        self.p2p = caps.contains(MigrationCaps::P2P);
        self.precopy = match (caps.contains(MigrationCaps::PRE_COPY), self.precopy) {
            (true, Some(n)) => Some(n),
            (true, None) => Some(u64::MAX),
            (false, _) => None,
        };
        self
    }

    /// Sets the profile.
    pub fn with_profile(mut self, profile: Profile) -> EmulatedConfig {
        self.profile = profile;
        self
    }

    /// Sets the PRE_COPY initial bytes (`None`: no PRE_COPY capability).
    pub fn with_precopy(mut self, initial_bytes: Option<u64>) -> EmulatedConfig {
        self.precopy = initial_bytes;
        self
    }

    /// Sets P2P support.
    pub fn with_p2p(mut self, p2p: bool) -> EmulatedConfig {
        self.p2p = p2p;
        self
    }

    /// Sets the dirty rate in bytes per second.
    pub fn with_dirty_rate(mut self, bytes_per_sec: u64) -> EmulatedConfig {
        self.dirty_rate = bytes_per_sec;
        self
    }

    /// Sets the block size.
    pub fn with_block_size(mut self, block_size: u64) -> EmulatedConfig {
        self.block_size = block_size;
        self
    }

    /// Sets the quirks.
    pub fn with_quirks(mut self, quirks: Quirks) -> EmulatedConfig {
        self.quirks = quirks;
        self
    }

    /// Sets the faults.
    pub fn with_faults(mut self, faults: Faults) -> EmulatedConfig {
        self.faults = faults;
        self
    }

    /// Sets the pre-copy information behaviour and the re-initialisation trigger.
    pub fn with_precopy_info(
        mut self,
        version: PrecopyInfoVersion,
        reinit_after: Option<u64>,
    ) -> EmulatedConfig {
        self.precopy_info = version;
        self.reinit_after = reinit_after;
        self
    }

    /// Sets the kind of data fd.
    pub fn with_data_fd(mut self, data_fd: DataFdBackend) -> EmulatedConfig {
        self.data_fd = data_fd;
        self
    }

    /// Gives the device guest memory.
    pub fn with_guest(mut self, guest: GuestConfig) -> EmulatedConfig {
        self.guest = Some(guest);
        self
    }
}
