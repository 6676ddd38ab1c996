//! The VFIO ioctl layer: ioctl numbers, the `VFIO_DEVICE_FEATURE` buffers built from the
//! `vfio-bindings` structs, and the few `unsafe` calls into the kernel. Everything above this
//! module ([`crate::vfio_device`]) is safe Rust.
//!
//! The VFIO ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)`: no size or direction bits, the argument
//! struct carries its own `argsz`. `vfio-bindings` has the structs and constants but not the ioctl
//! numbers, so they are derived here from its `VFIO_TYPE` and `VFIO_BASE`.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio as b;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)` (`include/uapi/linux/vfio.h`).
pub const fn vfio_io(n: u32) -> u32 {
    ((b::VFIO_TYPE as u32) << 8) | (b::VFIO_BASE + n)
}

/// `VFIO_GET_API_VERSION` (container).
pub const VFIO_GET_API_VERSION: u32 = vfio_io(0);
/// `VFIO_CHECK_EXTENSION` (container).
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
/// `VFIO_SET_IOMMU` (container).
pub const VFIO_SET_IOMMU: u32 = vfio_io(2);
/// `VFIO_GROUP_GET_STATUS` (group).
pub const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
/// `VFIO_GROUP_SET_CONTAINER` (group).
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
/// `VFIO_GROUP_GET_DEVICE_FD` (group).
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
/// `VFIO_DEVICE_GET_INFO` (device).
pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
/// `VFIO_DEVICE_GET_REGION_INFO` (device).
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
/// `VFIO_DEVICE_RESET` (device).
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
/// `VFIO_DEVICE_FEATURE` (device).
pub const VFIO_DEVICE_FEATURE: u32 = vfio_io(17);
/// `VFIO_DEVICE_BIND_IOMMUFD` (device cdev).
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio_io(18);
/// `VFIO_MIG_GET_PRECOPY_INFO` (data fd).
pub const VFIO_MIG_GET_PRECOPY_INFO: u32 = vfio_io(21);

/// Size of `struct vfio_device_feature` without its flexible `data[]`.
pub const FEATURE_HEADER_SIZE: usize = size_of::<b::vfio_device_feature>();

/// `argsz` of a struct: its size as the kernel's `u32`. Every VFIO struct is a few dozen bytes, so
/// the assertion only fires at compile time for an impossible type.
#[allow(clippy::cast_possible_truncation)] // checked by the assertion
pub const fn argsz_of<T>() -> u32 {
    assert!(size_of::<T>() <= u32::MAX as usize);
    size_of::<T>() as u32
}

/// What a `VFIO_DEVICE_FEATURE` call does with a feature (the `flags` high bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureOp {
    /// `VFIO_DEVICE_FEATURE_GET`.
    Get,
    /// `VFIO_DEVICE_FEATURE_SET`.
    Set,
    /// `VFIO_DEVICE_FEATURE_PROBE | GET`: does the device support GET of this feature?
    ProbeGet,
    /// `VFIO_DEVICE_FEATURE_PROBE | SET`: does the device support SET of this feature?
    ProbeSet,
}

impl FeatureOp {
    /// The `flags` bits for this op on `feature` (one of `VFIO_DEVICE_FEATURE_*`).
    pub const fn flags(self, feature: u32) -> u32 {
        let op = match self {
            FeatureOp::Get => b::VFIO_DEVICE_FEATURE_GET,
            FeatureOp::Set => b::VFIO_DEVICE_FEATURE_SET,
            FeatureOp::ProbeGet => b::VFIO_DEVICE_FEATURE_PROBE | b::VFIO_DEVICE_FEATURE_GET,
            FeatureOp::ProbeSet => b::VFIO_DEVICE_FEATURE_PROBE | b::VFIO_DEVICE_FEATURE_SET,
        };
        op | (feature & b::VFIO_DEVICE_FEATURE_MASK)
    }
}

/// A `struct vfio_device_feature` header immediately followed by the feature's payload struct, as
/// the kernel reads it: `argsz` covers header and payload, the payload starts at `data[0]`.
///
/// `T` is one of the `vfio-bindings` payload structs (all `Copy`, all 8-byte aligned at most); the
/// header is 8 bytes, so the payload sits at offset 8 with no padding in between.
#[repr(C)]
#[derive(Debug)]
pub struct FeatureBuf<T> {
    /// `argsz` and `flags`.
    pub header: b::vfio_device_feature,
    /// The feature's payload (`data[]`).
    pub payload: T,
}

impl<T: Copy> FeatureBuf<T> {
    /// A buffer for `op` on `feature` carrying `payload`; `argsz` is the whole struct.
    pub fn new(op: FeatureOp, feature: u32, payload: T) -> FeatureBuf<T> {
        FeatureBuf {
            header: b::vfio_device_feature {
                argsz: argsz_of::<FeatureBuf<T>>(),
                flags: op.flags(feature),
                data: Default::default(),
            },
            payload,
        }
    }
}

/// A feature call with no payload (PROBE, DMA_LOGGING_STOP, MIG_PRECOPY_INFOv2 SET).
pub fn feature_header(op: FeatureOp, feature: u32) -> b::vfio_device_feature {
    b::vfio_device_feature {
        argsz: argsz_of::<b::vfio_device_feature>(),
        flags: op.flags(feature),
        data: Default::default(),
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl whose argument is a plain integer (or unused): `VFIO_GET_API_VERSION`,
/// `VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`, `VFIO_DEVICE_RESET`.
pub(crate) fn ioctl_val(fd: BorrowedFd<'_>, req: u32, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: `fd` is a live borrowed descriptor. For these `_IO` requests VFIO takes the argument
    // by value and dereferences no pointer; a non-VFIO fd rejects the number (ENOTTY) or treats it
    // as its own request, and since `arg` is an integer no memory of ours can be touched.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::Ioctl::from(req), arg) })
}

/// An ioctl whose argument points at `arg`, which the kernel may read and write up to
/// `size_of::<T>()` bytes of (every VFIO struct used here starts with its `argsz` or is fixed size).
pub(crate) fn ioctl_ref<T>(fd: BorrowedFd<'_>, req: u32, arg: &mut T) -> io::Result<i32> {
    // SAFETY: `arg` is an exclusive reference to a live `T`, valid for reads and writes of
    // `size_of::<T>()` bytes for the whole call. Each caller sets `argsz` (where the struct has
    // one) to at most `size_of::<T>()`, and VFIO never accesses more than `argsz` bytes of it.
    // Pointers embedded in the payload (DMA logging ranges, bitmap) are set by the caller to
    // buffers that outlive this call and have the sizes the payload declares. Type ';' belongs to
    // VFIO (Documentation/userspace-api/ioctl/ioctl-number.rst), so a non-VFIO fd rejects the
    // request (ENOTTY) rather than giving it another meaning.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::Ioctl::from(req), arg as *mut T) })
}

/// `VFIO_GROUP_SET_CONTAINER`: the argument is a pointer to the container fd.
pub(crate) fn group_set_container(
    group: BorrowedFd<'_>,
    container: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut raw: libc::c_int = container.as_raw_fd();
    ioctl_ref(group, VFIO_GROUP_SET_CONTAINER, &mut raw).map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD`: returns a new device fd for `name` in the group.
pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string that lives for the whole call; the kernel only
    // reads it (strndup_user). The group ioctl does not write through the pointer.
    let fd = cvt(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            libc::Ioctl::from(VFIO_GROUP_GET_DEVICE_FD),
            name.as_ptr(),
        )
    })?;
    // SAFETY: on success GET_DEVICE_FD returns a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wraps a data fd returned in `vfio_device_feature_mig_state::data_fd`; -1 means none.
pub(crate) fn adopt_data_fd(raw: i32) -> Option<OwnedFd> {
    if raw < 0 {
        return None;
    }
    // SAFETY: a non-negative `data_fd` written by a successful MIG_DEVICE_STATE SET is a new
    // descriptor installed in our table for the caller to own; nothing else refers to it.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}
