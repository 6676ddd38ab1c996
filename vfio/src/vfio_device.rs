//! [`VfioDevice`]: the real VFIO migration v2 device, a thin and exact wrapper over a VFIO device
//! fd. Every trait method is one ioctl (plus argument checks done before it); the ioctls
//! themselves live in [`crate::sys`].
//!
//! Ways to get one:
//! - [`VfioDevice::open`] dispatches on the path's shape:
//!   - `/dev/vfio/devices/vfioN`: the iommufd cdev ([`VfioDevice::open_cdev`]);
//!   - a sysfs device directory such as `/sys/bus/mdev/devices/<uuid>` or
//!     `/sys/bus/pci/devices/<bdf>`: the group is read from its `iommu_group` link and the device
//!     is opened through the group API ([`VfioDevice::open_group`]), or through its cdev when the
//!     kernel has no group char device for it.
//! - [`VfioDevice::open_group`]: `/dev/vfio/<group>` + the container `/dev/vfio/vfio`
//!   (`VFIO_GROUP_SET_CONTAINER`, `VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)`, `VFIO_GROUP_GET_DEVICE_FD`).
//! - [`VfioDevice::from_fd`]: adopt a device fd the VMM already owns (the usual case inside a VMM,
//!   which has set up DMA mappings itself).
//!
//! Region access ([`VfioDevice::region_read`], [`VfioDevice::region_write`]) is `pread`/`pwrite`
//! on the device fd at the offset `VFIO_DEVICE_GET_REGION_INFO` gives; it exists so tests and the
//! nested-guest harness can put bytes into a device and read them back.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio as b;

use crate::device::{MigrationDevice, PrecopyInfo};
use crate::dma::{validate_ranges, validate_report, DmaLoggingError, IovaRange};
use crate::error::DeviceError;
use crate::op;
use crate::state::{DeviceState, MigrationCaps};
use crate::sys::{self, argsz_of, FeatureBuf, FeatureOp, VFIO_DEVICE_FEATURE};

/// Where VFIO's char devices live.
pub const DEV_VFIO: &str = "/dev/vfio";

const OP_REGION_READ: &str = "pread(VFIO region)";
const OP_REGION_WRITE: &str = "pwrite(VFIO region)";

/// Optional features found with `VFIO_DEVICE_FEATURE_PROBE` when the device was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalFeatures {
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET).
    pub mig_data_size: bool,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET); STOP and REPORT come with it.
    pub dma_logging: bool,
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (SET).
    pub precopy_info_v2: bool,
}

/// `struct vfio_region_info` of one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (`VFIO_PCI_BAR0_REGION_INDEX` = 0, ...).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

impl RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_READ`.
    pub fn readable(&self) -> bool {
        self.flags & b::VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// `VFIO_REGION_INFO_FLAG_WRITE`.
    pub fn writable(&self) -> bool {
        self.flags & b::VFIO_REGION_INFO_FLAG_WRITE != 0
    }
}

/// How a path is opened, found from its shape and from sysfs; nothing is opened yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenPlan {
    /// The iommufd cdev (`/dev/vfio/devices/vfioN`), bound with `VFIO_DEVICE_BIND_IOMMUFD`.
    Cdev {
        /// The cdev path.
        path: PathBuf,
    },
    /// The group API: `VFIO_GROUP_GET_DEVICE_FD(device_name)` on `group_path`.
    Group {
        /// The IOMMU group number.
        group: u32,
        /// `/dev/vfio/<group>`.
        group_path: PathBuf,
        /// The device's name in the group (the sysfs name: mdev UUID or PCI BDF).
        device_name: String,
    },
}

/// A VFIO device with migration v2 support, over its device fd.
///
/// Holds the group, container or iommufd it was opened through for its whole life: closing them
/// would detach the device from its IOMMU context.
///
/// ```no_run
/// use vfmig_vfio::{DeviceState, MigrationDevice, VfioDevice};
///
/// let mut dev = VfioDevice::open("/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")?;
/// // RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY, one SET per arc; the last arc opens the data fd.
/// let data_fd = dev.set_state(DeviceState::StopCopy)?;
/// assert!(data_fd.is_some());
/// # Ok::<(), vfmig_vfio::DeviceError>(())
/// ```
#[derive(Debug)]
pub struct VfioDevice {
    name: String,
    device: File,
    _group: Option<OwnedFd>,
    _container: Option<OwnedFd>,
    _iommufd: Option<OwnedFd>,
    caps: MigrationCaps,
    features: OptionalFeatures,
    num_regions: u32,
    /// The ranges of the running DMA_LOGGING_START; `None` while logging is off.
    dma_logging: Option<Vec<IovaRange>>,
    /// `MIG_PRECOPY_INFOv2` was SET: `vfio_precopy_info.flags` is an output.
    precopy_info_v2: bool,
}

fn open_err(path: &Path, what: &'static str, source: io::Error) -> DeviceError {
    DeviceError::Open {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// The device-fd offset of `[offset, offset + len)` in the region, or `None` when the span leaves
/// the region or overflows.
fn region_span(info: &RegionInfo, offset: u64, len: usize) -> Option<u64> {
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    if end > info.size {
        return None;
    }
    info.offset.checked_add(offset)
}

fn open_rw(path: &Path) -> io::Result<File> {
    // std opens with O_CLOEXEC.
    OpenOptions::new().read(true).write(true).open(path)
}

impl VfioDevice {
    /// Opens the device at `path`, dispatching on its shape (see [`VfioDevice::resolve`]).
    pub fn open(path: impl AsRef<Path>) -> Result<VfioDevice, DeviceError> {
        let plan = VfioDevice::resolve(path.as_ref(), Path::new(DEV_VFIO))?;
        VfioDevice::open_plan(&plan)
    }

    /// Finds how `path` opens, with `dev_vfio` standing for `/dev/vfio`:
    /// - `<dev_vfio>/devices/<name>`: [`OpenPlan::Cdev`];
    /// - `<dev_vfio>/<number>`: an error, a group path names no device (use
    ///   [`VfioDevice::open_group`]);
    /// - a directory with an `iommu_group` link (a sysfs device): [`OpenPlan::Group`] for the
    ///   group the link names, or [`OpenPlan::Cdev`] when `<dev_vfio>/<group>` is absent and the
    ///   device has a `vfio-dev/vfioN` cdev;
    /// - anything else: [`DeviceError::NotVfio`], or [`DeviceError::Open`] if it does not exist.
    pub fn resolve(path: &Path, dev_vfio: &Path) -> Result<OpenPlan, DeviceError> {
        let parent = path.parent();
        if parent == Some(dev_vfio.join("devices").as_path()) {
            return Ok(OpenPlan::Cdev {
                path: path.to_path_buf(),
            });
        }
        let file_name = path.file_name().and_then(|n| n.to_str());
        if parent == Some(dev_vfio) && file_name.is_some_and(|n| n.parse::<u32>().is_ok()) {
            return Err(open_err(
                path,
                "a group path names no device: open it with VfioDevice::open_group(group, device name)",
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let meta = fs::metadata(path).map_err(|e| open_err(path, "stat device path", e))?;
        if !meta.is_dir() {
            return Err(DeviceError::NotVfio {
                path: path.display().to_string(),
                reason: "neither a sysfs device directory, a /dev/vfio/devices cdev nor a group"
                    .into(),
            });
        }
        let link = path.join("iommu_group");
        let target = match fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DeviceError::NotVfio {
                path: path.display().to_string(),
                reason:
                    "no iommu_group link: the device is in no IOMMU group (bound to a VFIO driver?)"
                        .into(),
            }),
            Err(e) => return Err(open_err(path, "read iommu_group link", e)),
        };
        let group = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| DeviceError::NotVfio {
                path: path.display().to_string(),
                reason: format!(
                    "iommu_group link points at {}, not a group number",
                    target.display()
                ),
            })?;
        let device_name = fs::canonicalize(path)
            .ok()
            .as_deref()
            .and_then(Path::file_name)
            .or_else(|| path.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| DeviceError::NotVfio {
                path: path.display().to_string(),
                reason: "the device directory has no UTF-8 name".into(),
            })?;
        let group_path = dev_vfio.join(group.to_string());
        if !group_path.exists() {
            // No group char device (kernel without VFIO_GROUP): use the device's cdev if any.
            if let Some(cdev) = fs::read_dir(path.join("vfio-dev"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(Result::ok)
            {
                let cdev = dev_vfio.join("devices").join(cdev.file_name());
                if cdev.exists() {
                    return Ok(OpenPlan::Cdev { path: cdev });
                }
            }
        }
        Ok(OpenPlan::Group {
            group,
            group_path,
            device_name,
        })
    }

    /// Opens a device as [`VfioDevice::resolve`] planned it.
    pub fn open_plan(plan: &OpenPlan) -> Result<VfioDevice, DeviceError> {
        match plan {
            OpenPlan::Cdev { path } => VfioDevice::open_cdev(path),
            OpenPlan::Group {
                group_path,
                device_name,
                ..
            } => VfioDevice::open_group(group_path, device_name),
        }
    }

    /// Opens `device_name` through the group API. The container is `vfio` next to the group
    /// (`/dev/vfio/vfio`); it gets `VFIO_TYPE1v2_IOMMU`. The group must not be open elsewhere
    /// (the kernel gives EBUSY).
    pub fn open_group(group_path: &Path, device_name: &str) -> Result<VfioDevice, DeviceError> {
        let group = open_rw(group_path).map_err(|e| open_err(group_path, "open VFIO group", e))?;
        let ioctl_err = |op: &'static str| {
            move |source| DeviceError::Ioctl {
                device: device_name.to_owned(),
                op,
                source,
            }
        };
        let status = group_status(group.as_fd(), device_name)?;
        if status & b::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(DeviceError::NotVfio {
                path: group_path.display().to_string(),
                reason: "group is not viable: every device in it must be bound to a VFIO driver"
                    .into(),
            });
        }
        let container_path = group_path
            .parent()
            .unwrap_or(Path::new(DEV_VFIO))
            .join("vfio");
        let container = open_rw(&container_path)
            .map_err(|e| open_err(&container_path, "open VFIO container", e))?;
        let version = sys::ioctl_val(container.as_fd(), sys::VFIO_GET_API_VERSION, 0)
            .map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if u32::try_from(version).ok() != Some(b::VFIO_API_VERSION) {
            return Err(DeviceError::NotVfio {
                path: container_path.display().to_string(),
                reason: format!(
                    "VFIO API version {version}, expected {}",
                    b::VFIO_API_VERSION
                ),
            });
        }
        let has_type1v2 = sys::ioctl_val(
            container.as_fd(),
            sys::VFIO_CHECK_EXTENSION,
            b::VFIO_TYPE1v2_IOMMU.into(),
        )
        .map_err(ioctl_err("VFIO_CHECK_EXTENSION"))?;
        if has_type1v2 <= 0 {
            return Err(DeviceError::Unsupported {
                device: device_name.to_owned(),
                op: "VFIO_SET_IOMMU",
                feature: "VFIO_TYPE1v2_IOMMU",
            });
        }
        if status & b::VFIO_GROUP_FLAGS_CONTAINER_SET == 0 {
            sys::group_set_container(group.as_fd(), container.as_fd())
                .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))?;
        }
        sys::ioctl_val(
            container.as_fd(),
            sys::VFIO_SET_IOMMU,
            b::VFIO_TYPE1v2_IOMMU.into(),
        )
        .map_err(ioctl_err("VFIO_SET_IOMMU"))?;
        let mut dev = device_in_group(group.into(), device_name)?;
        dev._container = Some(container.into());
        Ok(dev)
    }

    /// Adopts a VFIO group fd the caller owns (a VMM's: already in a container with its IOMMU
    /// set) and gets `device_name`'s device fd from it (`VFIO_GROUP_GET_DEVICE_FD`). The group
    /// fd is kept open as long as the device. A group that is not viable or has no container is
    /// refused ([`DeviceError::NotVfio`]): setting up DMA is the owner's business.
    pub fn from_group_fd(group: OwnedFd, device_name: &str) -> Result<VfioDevice, DeviceError> {
        let status = group_status(group.as_fd(), device_name)?;
        let needed = b::VFIO_GROUP_FLAGS_VIABLE | b::VFIO_GROUP_FLAGS_CONTAINER_SET;
        if status & needed != needed {
            return Err(DeviceError::NotVfio {
                path: device_name.to_owned(),
                reason: "the group fd is not viable or has no container with an IOMMU set".into(),
            });
        }
        device_in_group(group, device_name)
    }

    /// Opens an iommufd cdev (`/dev/vfio/devices/vfioN`) and binds it to a new iommufd
    /// (`/dev/iommu`) with `VFIO_DEVICE_BIND_IOMMUFD`. That is enough for the migration ioctls; DMA
    /// mappings (IOAS attach) are the VMM's business, so a VMM should rather adopt its own fd with
    /// [`VfioDevice::from_fd`].
    pub fn open_cdev(path: &Path) -> Result<VfioDevice, DeviceError> {
        let device = open_rw(path).map_err(|e| open_err(path, "open VFIO cdev", e))?;
        let iommu = Path::new("/dev/iommu");
        let iommufd = open_rw(iommu).map_err(|e| open_err(iommu, "open iommufd", e))?;
        let name = path.display().to_string();
        sys::bind_iommufd(device.as_fd(), iommufd.as_fd()).map_err(|source| {
            DeviceError::Ioctl {
                device: name.clone(),
                op: "VFIO_DEVICE_BIND_IOMMUFD",
                source,
            }
        })?;
        let mut dev = VfioDevice::from_fd(device.into(), name)?;
        dev._iommufd = Some(iommufd.into());
        Ok(dev)
    }

    /// Adopts a VFIO device fd the caller owns. Checks it is a VFIO device
    /// (`VFIO_DEVICE_GET_INFO`), reads its migration capabilities and probes the optional
    /// features. `name` is used in messages.
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> Result<VfioDevice, DeviceError> {
        let mut dev = VfioDevice {
            name: name.into(),
            device: File::from(fd),
            _group: None,
            _container: None,
            _iommufd: None,
            caps: MigrationCaps::NONE,
            features: OptionalFeatures::default(),
            num_regions: 0,
            dma_logging: None,
            precopy_info_v2: false,
        };
        let mut info = b::vfio_device_info {
            argsz: argsz_of::<b::vfio_device_info>(),
            ..Default::default()
        };
        sys::ioctl_ref(dev.device.as_fd(), sys::VFIO_DEVICE_GET_INFO, &mut info)
            .map_err(|source| dev.ioctl_err("VFIO_DEVICE_GET_INFO", source))?;
        dev.num_regions = info.num_regions;
        let mig = dev
            .feature(
                FeatureOp::Get,
                b::VFIO_DEVICE_FEATURE_MIGRATION,
                b::vfio_device_feature_migration::default(),
                op::MIGRATION,
            )
            .map_err(|e| match e.errno() {
                // The core answers ENOTTY when the driver has no migration ops.
                Some(libc::ENOTTY) => dev.unsupported(op::MIGRATION, op::FEATURE_STOP_COPY),
                _ => e,
            })?;
        dev.caps = MigrationCaps::from_bits_retain(mig.flags);
        if !dev.caps.contains(MigrationCaps::STOP_COPY) {
            return Err(dev.unsupported(op::MIGRATION, op::FEATURE_STOP_COPY));
        }
        dev.features = OptionalFeatures {
            mig_data_size: dev.probe(FeatureOp::ProbeGet, b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE),
            dma_logging: dev.probe(
                FeatureOp::ProbeSet,
                b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            ),
            precopy_info_v2: dev.probe(
                FeatureOp::ProbeSet,
                b::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
            ),
        };
        Ok(dev)
    }

    /// The VFIO group fd this device was opened through ([`VfioDevice::open_group`],
    /// [`VfioDevice::from_group_fd`]); `None` for a cdev or an adopted device fd. A VMM that
    /// opened its devices with `open_group` hands this fd (with the device name) to a migration
    /// helper: a group can be open in one process only, but its fd can be passed (`SCM_RIGHTS`).
    pub fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        self._group.as_ref().map(AsFd::as_fd)
    }

    /// The optional features the device supports.
    pub fn optional_features(&self) -> OptionalFeatures {
        self.features
    }

    /// Number of regions (`vfio_device_info::num_regions`).
    pub fn num_regions(&self) -> u32 {
        self.num_regions
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let mut info = b::vfio_region_info {
            argsz: argsz_of::<b::vfio_region_info>(),
            index,
            ..Default::default()
        };
        sys::ioctl_ref(
            self.device.as_fd(),
            sys::VFIO_DEVICE_GET_REGION_INFO,
            &mut info,
        )
        .map_err(|source| self.ioctl_err("VFIO_DEVICE_GET_REGION_INFO", source))?;
        Ok(RegionInfo {
            index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// Checks `[offset, offset + len)` lies in the region; returns the device-fd offset.
    fn region_pos(
        &self,
        info: &RegionInfo,
        offset: u64,
        len: usize,
        op: &'static str,
    ) -> Result<u64, DeviceError> {
        region_span(info, offset, len)
            .ok_or_else(|| self.ioctl_err(op, io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// Reads `buf.len()` bytes of region `index` at `offset` (one `pread` on the device fd).
    /// Returns the byte count the device gave. EINVAL if the span leaves the region.
    pub fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, DeviceError> {
        let info = self.region_info(index)?;
        if !info.readable() {
            return Err(self.unsupported(OP_REGION_READ, "VFIO_REGION_INFO_FLAG_READ"));
        }
        let pos = self.region_pos(&info, offset, buf.len(), OP_REGION_READ)?;
        self.device
            .read_at(buf, pos)
            .map_err(|source| self.ioctl_err(OP_REGION_READ, source))
    }

    /// Writes `buf` into region `index` at `offset` (one `pwrite` on the device fd). Returns the
    /// byte count the device took. EINVAL if the span leaves the region.
    pub fn region_write(&self, index: u32, offset: u64, buf: &[u8]) -> Result<usize, DeviceError> {
        let info = self.region_info(index)?;
        if !info.writable() {
            return Err(self.unsupported(OP_REGION_WRITE, "VFIO_REGION_INFO_FLAG_WRITE"));
        }
        let pos = self.region_pos(&info, offset, buf.len(), OP_REGION_WRITE)?;
        self.device
            .write_at(buf, pos)
            .map_err(|source| self.ioctl_err(OP_REGION_WRITE, source))
    }

    #[cold]
    fn ioctl_err(&self, op: &'static str, source: io::Error) -> DeviceError {
        DeviceError::Ioctl {
            device: self.name.clone(),
            op,
            source,
        }
    }

    #[cold]
    fn unsupported(&self, op: &'static str, feature: &'static str) -> DeviceError {
        DeviceError::Unsupported {
            device: self.name.clone(),
            op,
            feature,
        }
    }

    #[cold]
    fn dma_err(&self, source: DmaLoggingError) -> DeviceError {
        DeviceError::DmaLogging {
            device: self.name.clone(),
            source,
        }
    }

    /// One `VFIO_DEVICE_FEATURE` call with a payload; returns the payload as the kernel left it.
    fn feature_raw<T: Copy + sys::PlainArg>(
        &self,
        op: FeatureOp,
        feature: u32,
        payload: T,
    ) -> io::Result<T> {
        let mut buf = FeatureBuf::new(op, feature, payload);
        sys::ioctl_ref(self.device.as_fd(), VFIO_DEVICE_FEATURE, &mut buf)?;
        Ok(buf.payload)
    }

    fn feature<T: Copy + sys::PlainArg>(
        &self,
        op: FeatureOp,
        feature: u32,
        payload: T,
        name: &'static str,
    ) -> Result<T, DeviceError> {
        self.feature_raw(op, feature, payload)
            .map_err(|source| self.ioctl_err(name, source))
    }

    fn feature_no_payload(
        &self,
        op: FeatureOp,
        feature: u32,
        name: &'static str,
    ) -> Result<(), DeviceError> {
        let mut hdr = sys::feature_header(op, feature);
        sys::ioctl_ref(self.device.as_fd(), VFIO_DEVICE_FEATURE, &mut hdr)
            .map(drop)
            .map_err(|source| self.ioctl_err(name, source))
    }

    /// `VFIO_DEVICE_FEATURE_PROBE`: true when the kernel accepts `op` on `feature`.
    fn probe(&self, op: FeatureOp, feature: u32) -> bool {
        let mut hdr = sys::feature_header(op, feature);
        sys::ioctl_ref(self.device.as_fd(), VFIO_DEVICE_FEATURE, &mut hdr).is_ok()
    }
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags.
fn group_status(group: BorrowedFd<'_>, device_name: &str) -> Result<u32, DeviceError> {
    let mut status = b::vfio_group_status {
        argsz: argsz_of::<b::vfio_group_status>(),
        flags: 0,
    };
    sys::ioctl_ref(group, sys::VFIO_GROUP_GET_STATUS, &mut status).map_err(|source| {
        DeviceError::Ioctl {
            device: device_name.to_owned(),
            op: "VFIO_GROUP_GET_STATUS",
            source,
        }
    })?;
    Ok(status.flags)
}

/// `VFIO_GROUP_GET_DEVICE_FD` for `device_name`, adopted; the device keeps `group` open.
fn device_in_group(group: OwnedFd, device_name: &str) -> Result<VfioDevice, DeviceError> {
    let cname = CString::new(device_name).map_err(|_| DeviceError::NotVfio {
        path: device_name.to_owned(),
        reason: "device name contains a NUL byte".into(),
    })?;
    let fd =
        sys::group_get_device_fd(group.as_fd(), &cname).map_err(|source| DeviceError::Ioctl {
            device: device_name.to_owned(),
            op: "VFIO_GROUP_GET_DEVICE_FD",
            source,
        })?;
    let mut dev = VfioDevice::from_fd(fd, device_name)?;
    dev._group = Some(group);
    Ok(dev)
}

/// The sysfs directory of the device named `name` (a cdev path `/dev/vfio/devices/vfioN`, a PCI
/// BDF or an mdev UUID) under `sys` (normally `/sys`), if there is one.
pub fn sysfs_dir(sys: &Path, name: &str) -> Option<PathBuf> {
    let base = Path::new(name).file_name()?.to_str()?;
    [
        sys.join("class/vfio-dev").join(base).join("device"),
        sys.join("bus/pci/devices").join(base),
        sys.join("bus/mdev/devices").join(base),
    ]
    .into_iter()
    .find(|d| d.is_dir())
}

/// The compatibility identifier of the device whose sysfs directory is `dir`: the PCI vendor and
/// device IDs (`pci 8086:1572`) or the mdev type (`mdev mtty-2`), then the bound driver
/// (`driver vfio-pci`). Two devices whose identifiers differ cannot take each other's state;
/// equal identifiers do not promise it (the driver validates the state in RESUMING).
pub fn compat_id(dir: &Path) -> String {
    let read_hex = |f: &str| {
        fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|t| u32::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok())
    };
    let link_name = |f: &str| {
        fs::read_link(dir.join(f))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let mut parts = Vec::new();
    if let (Some(v), Some(d)) = (read_hex("vendor"), read_hex("device")) {
        parts.push(format!("pci {v:04x}:{d:04x}"));
    } else if let Some(t) = link_name("mdev_type") {
        parts.push(format!("mdev {t}"));
    }
    if let Some(d) = link_name("driver") {
        parts.push(format!("driver {d}"));
    }
    let mut id = parts.join(" ");
    // The wire carries at most 255 bytes; cut at a character boundary.
    while id.len() > 255 {
        id.pop();
    }
    id
}

impl MigrationDevice for VfioDevice {
    fn name(&self) -> &str {
        &self.name
    }

    /// PCI IDs or mdev type and driver from sysfs; the size is only known as an estimate
    /// (STOP_COPY_SIZE), which is not compared.
    fn identity(&self) -> crate::device::Identity {
        crate::device::Identity {
            class: crate::device::DeviceClass::Vfio,
            size: None,
            compat: sysfs_dir(Path::new("/sys"), &self.name)
                .map(|d| compat_id(&d))
                .unwrap_or_default(),
        }
    }

    fn capabilities(&self) -> MigrationCaps {
        self.caps
    }

    fn state(&mut self) -> Result<DeviceState, DeviceError> {
        let mig = self.feature(
            FeatureOp::Get,
            b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            b::vfio_device_feature_mig_state {
                device_state: 0,
                data_fd: -1,
            },
            op::MIG_DEVICE_STATE,
        )?;
        // A state outside the uAPI's eight is a kernel/driver bug: report it as EPROTO.
        DeviceState::from_raw(mig.device_state).ok_or_else(|| {
            self.ioctl_err(
                op::MIG_DEVICE_STATE,
                io::Error::from_raw_os_error(libc::EPROTO),
            )
        })
    }

    fn set_single_state(&mut self, next: DeviceState) -> Result<Option<OwnedFd>, io::Error> {
        sys::set_mig_state(self.device.as_fd(), next.as_raw())
    }

    fn precopy_info(&mut self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo, DeviceError> {
        let mut info = b::vfio_precopy_info {
            argsz: argsz_of::<b::vfio_precopy_info>(),
            ..Default::default()
        };
        sys::ioctl_ref(data_fd, sys::VFIO_MIG_GET_PRECOPY_INFO, &mut info)
            .map_err(|source| self.ioctl_err(op::PRECOPY_INFO, source))?;
        Ok(PrecopyInfo {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
            // Without the v2 opt-in `flags` is reserved: v1 drivers echo the input back.
            reinit: self.precopy_info_v2 && info.flags & b::VFIO_PRECOPY_INFO_REINIT != 0,
        })
    }

    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` SET, when the PROBE at open found it (the core
    /// answers a PROBE|SET of a feature it does not know with ENOTTY, and of this one on a device
    /// without PRE_COPY with EINVAL: both leave v1 in force).
    fn enable_precopy_info_v2(&mut self) -> Result<bool, DeviceError> {
        if !self.features.precopy_info_v2 {
            return Ok(false);
        }
        if !self.precopy_info_v2 {
            self.feature_no_payload(
                FeatureOp::Set,
                b::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
                op::PRECOPY_INFO_V2,
            )?;
            self.precopy_info_v2 = true;
        }
        Ok(true)
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        if !self.features.mig_data_size {
            return Err(self.unsupported(op::MIG_DATA_SIZE, op::MIG_DATA_SIZE));
        }
        let size = self.feature(
            FeatureOp::Get,
            b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            b::vfio_device_feature_mig_data_size::default(),
            op::MIG_DATA_SIZE,
        )?;
        Ok(size.stop_copy_length)
    }

    fn dma_logging_start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DeviceError> {
        validate_ranges(ranges, page_size).map_err(|e| self.dma_err(e))?;
        if self.dma_logging.is_some() {
            return Err(self.dma_err(DmaLoggingError::AlreadyStarted));
        }
        if !self.features.dma_logging {
            return Err(self.unsupported(op::DMA_LOGGING_START, op::DMA_LOGGING_START));
        }
        let list: Vec<b::vfio_device_feature_dma_logging_range> = ranges
            .iter()
            .map(|r| b::vfio_device_feature_dma_logging_range {
                iova: r.iova,
                length: r.length,
            })
            .collect();
        let chosen = sys::dma_logging_start(self.device.as_fd(), &list, page_size)
            .map_err(|source| self.ioctl_err(op::DMA_LOGGING_START, source))?;
        self.dma_logging = Some(ranges.to_vec());
        Ok(chosen)
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let Some(tracked) = self.dma_logging.as_deref() else {
            return Err(self.dma_err(DmaLoggingError::NotStarted));
        };
        validate_report(tracked, iova, length, page_size, bitmap.len())
            .map_err(|e| self.dma_err(e))?;
        sys::dma_logging_report(self.device.as_fd(), iova, length, page_size, bitmap)
            .map_err(|source| self.ioctl_err(op::DMA_LOGGING_REPORT, source))
    }

    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        if self.dma_logging.is_none() {
            return Err(self.dma_err(DmaLoggingError::NotStarted));
        }
        self.feature_no_payload(
            FeatureOp::Set,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            op::DMA_LOGGING_STOP,
        )?;
        self.dma_logging = None;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        sys::ioctl_val(self.device.as_fd(), sys::VFIO_DEVICE_RESET, 0)
            .map(drop)
            .map_err(|source| self.ioctl_err(op::DEVICE_RESET, source))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn compat_id_reads_pci_ids_or_mdev_type_and_the_driver_from_sysfs() {
        let sys = tempfile::tempdir().expect("tempdir");
        let pci = sys.path().join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&pci).expect("mkdir");
        std::fs::write(pci.join("vendor"), "0x10de\n").expect("write");
        std::fs::write(pci.join("device"), "0x2330\n").expect("write");
        std::os::unix::fs::symlink("../../../bus/pci/drivers/nvgrace-vfio", pci.join("driver"))
            .expect("symlink");
        let dir = sysfs_dir(sys.path(), "0000:01:00.0").expect("found");
        assert_eq!(compat_id(&dir), "pci 10de:2330 driver nvgrace-vfio");
        let mdev = sys
            .path()
            .join("bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        std::fs::create_dir_all(&mdev).expect("mkdir");
        std::os::unix::fs::symlink("../../types/mtty-2", mdev.join("mdev_type")).expect("link");
        std::os::unix::fs::symlink("../../drivers/vfio_mdev", mdev.join("driver")).expect("link");
        let dir = sysfs_dir(sys.path(), "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001").expect("found");
        assert_eq!(compat_id(&dir), "mdev mtty-2 driver vfio_mdev");
        assert_eq!(sysfs_dir(sys.path(), "/dev/vfio/devices/vfio9"), None);
    }

    use super::*;

    const BAR0: RegionInfo = RegionInfo {
        index: 0,
        flags: b::VFIO_REGION_INFO_FLAG_READ | b::VFIO_REGION_INFO_FLAG_WRITE,
        size: 8,
        offset: 1 << 40,
    };

    #[test]
    fn region_span_maps_in_bounds_accesses_to_the_region_offset() {
        assert_eq!(region_span(&BAR0, 0, 1), Some(1 << 40));
        assert_eq!(region_span(&BAR0, 5, 3), Some((1 << 40) + 5));
        assert_eq!(region_span(&BAR0, 8, 0), Some((1 << 40) + 8));
    }

    #[test]
    fn region_span_refuses_accesses_past_the_end_or_overflowing() {
        assert_eq!(region_span(&BAR0, 5, 4), None);
        assert_eq!(region_span(&BAR0, 9, 0), None);
        assert_eq!(region_span(&BAR0, u64::MAX, 1), None);
        let high = RegionInfo {
            offset: u64::MAX,
            size: u64::MAX,
            ..BAR0
        };
        assert_eq!(region_span(&high, 1, 1), None);
    }
}
