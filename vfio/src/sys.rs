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

/// Argument structs the kernel may read and write in place but that hold no user pointer the
/// kernel follows, so a reference to one is all an ioctl can touch.
///
/// # Safety
///
/// Implement only for plain `#[repr(C)]` data whose fields the VFIO ioctls it is passed to never
/// dereference as user pointers. Structs with pointer fields (DMA logging ranges and bitmap, the
/// bind token) are passed only by the dedicated functions below, which set those pointers from
/// borrows they hold for the whole call.
pub(crate) unsafe trait PlainArg {}

// SAFETY: an integer (the container fd of VFIO_GROUP_SET_CONTAINER).
unsafe impl PlainArg for libc::c_int {}
// SAFETY: `argsz`, `flags`, counts; no pointer.
unsafe impl PlainArg for b::vfio_device_info {}
// SAFETY: `argsz`, `flags`, `index`, `cap_offset`, `size`, `offset`; no pointer.
unsafe impl PlainArg for b::vfio_region_info {}
// SAFETY: `argsz` and `flags`; no pointer.
unsafe impl PlainArg for b::vfio_group_status {}
// SAFETY: `argsz`, `flags`, two byte counts; no pointer.
unsafe impl PlainArg for b::vfio_precopy_info {}
// SAFETY: the feature header (`argsz`, `flags`, a zero-length `data[]`); no pointer.
unsafe impl PlainArg for b::vfio_device_feature {}
// SAFETY: `flags` only.
unsafe impl PlainArg for b::vfio_device_feature_migration {}
// SAFETY: `device_state` and `data_fd` (an fd number the kernel writes, not a pointer).
unsafe impl PlainArg for b::vfio_device_feature_mig_state {}
// SAFETY: `stop_copy_length` only.
unsafe impl PlainArg for b::vfio_device_feature_mig_data_size {}
// SAFETY: a header and a payload that is itself `PlainArg`.
unsafe impl<T: PlainArg> PlainArg for FeatureBuf<T> {}

/// An ioctl whose argument points at `arg`, which the kernel may read and write up to
/// `size_of::<T>()` bytes of (every VFIO struct used here starts with its `argsz` or is fixed
/// size). `T: PlainArg` keeps pointer-carrying structs out: those have their own functions.
pub(crate) fn ioctl_ref<T: PlainArg>(fd: BorrowedFd<'_>, req: u32, arg: &mut T) -> io::Result<i32> {
    // SAFETY: `arg` is an exclusive reference to a live `T`, valid for reads and writes of
    // `size_of::<T>()` bytes for the whole call. Each caller sets `argsz` (where the struct has
    // one) to at most `size_of::<T>()`, and VFIO never accesses more than `argsz` bytes of it.
    // `T: PlainArg` holds no pointer the kernel follows, so nothing but `*arg` is touched. Type
    // ';' belongs to VFIO (Documentation/userspace-api/ioctl/ioctl-number.rst), so a non-VFIO fd
    // rejects the request (ENOTTY) rather than giving it another meaning.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::Ioctl::from(req), arg as *mut T) })
}

/// `VFIO_DEVICE_FEATURE` with a payload that carries user pointers: only the functions below,
/// which borrow what those pointers name for the whole call, use it.
///
/// # Safety
///
/// Every pointer in `buf.payload` must be valid, for the whole call, for what the feature reads
/// or writes through it.
unsafe fn feature_with_pointers<T>(
    device: BorrowedFd<'_>,
    buf: &mut FeatureBuf<T>,
) -> io::Result<i32> {
    // SAFETY: `buf` is exclusively borrowed and its `argsz` (set by `FeatureBuf::new`) is its
    // size; the pointers it carries are valid per this function's contract.
    cvt(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            libc::Ioctl::from(VFIO_DEVICE_FEATURE),
            buf as *mut FeatureBuf<T>,
        )
    })
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET) over `ranges`; returns the page size the device
/// chose. E2BIG for more ranges than a `u32` counts (the kernel refuses far fewer).
pub(crate) fn dma_logging_start(
    device: BorrowedFd<'_>,
    ranges: &[b::vfio_device_feature_dma_logging_range],
    page_size: u64,
) -> io::Result<u64> {
    let num_ranges =
        u32::try_from(ranges.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut buf = FeatureBuf::new(
        FeatureOp::Set,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        b::vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges,
            __reserved: 0,
            ranges: ranges.as_ptr() as u64,
        },
    );
    // SAFETY: the kernel reads `num_ranges` entries through `ranges`, which is exactly the slice
    // borrowed here for the whole call; it writes nothing through it.
    unsafe { feature_with_pointers(device, &mut buf) }?;
    Ok(buf.payload.page_size)
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET): the kernel sets bit i of `bitmap` for every
/// dirty page i of `[iova, iova + length)` and clears those pages in the device's log. EINVAL,
/// before the call, for a page size that is not a power of two of at least 4 KiB or a bitmap
/// shorter than the span's pages.
pub(crate) fn dma_logging_report(
    device: BorrowedFd<'_>,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    if page_size < 4096 || !page_size.is_power_of_two() {
        return Err(einval());
    }
    let words = u64::try_from(bitmap.len()).map_err(|_| einval())?;
    if length.div_ceil(page_size) > words.saturating_mul(64) {
        return Err(einval());
    }
    let mut buf = FeatureBuf::new(
        FeatureOp::Get,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        b::vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            bitmap: bitmap.as_mut_ptr() as u64,
        },
    );
    // SAFETY: the kernel writes the bits of ceil(length / page_size) pages (page_size a power of
    // two, checked above) through `bitmap`, in whole u64 words; the slice exclusively borrowed
    // here holds at least that many bits (checked above) for the whole call.
    unsafe { feature_with_pointers(device, &mut buf) }.map(drop)
}

/// `VFIO_DEVICE_BIND_IOMMUFD` of a device cdev to `iommufd`, without a token.
pub(crate) fn bind_iommufd(device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<()> {
    let mut bind = b::vfio_device_bind_iommufd {
        argsz: argsz_of::<b::vfio_device_bind_iommufd>(),
        // No VFIO_DEVICE_BIND_FLAG_TOKEN: the kernel does not follow `token_uuid_ptr`.
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is exclusively borrowed for the call and `argsz` is its size; without the
    // token flag its only pointer field is null and not followed; the kernel writes `out_devid`.
    cvt(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            libc::Ioctl::from(VFIO_DEVICE_BIND_IOMMUFD),
            &mut bind as *mut b::vfio_device_bind_iommufd,
        )
    })
    .map(drop)
}

/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET to `state`; returns the data fd the kernel created,
/// if it wrote one into `data_fd` (it leaves our -1 otherwise).
pub(crate) fn set_mig_state(device: BorrowedFd<'_>, state: u32) -> io::Result<Option<OwnedFd>> {
    let mut buf = FeatureBuf::new(
        FeatureOp::Set,
        b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        b::vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    );
    ioctl_ref(device, VFIO_DEVICE_FEATURE, &mut buf)?;
    let raw = buf.payload.data_fd;
    if raw < 0 {
        return Ok(None);
    }
    // SAFETY: we passed -1 and the SET succeeded, so a non-negative `data_fd` was written by the
    // kernel: a new descriptor installed in our table for the caller to own, that nothing else
    // refers to.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(raw) }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> Option<i32> {
        r.unwrap_err().raw_os_error()
    }

    #[test]
    fn dma_logging_report_refuses_a_short_bitmap_before_the_kernel_writes_through_it() {
        // /dev/null would answer the ioctl with ENOTTY: EINVAL proves nothing was issued.
        let null = File::open("/dev/null").unwrap();
        let mut one_word = [0u64; 1];
        let span = 65 * 4096;
        let r = dma_logging_report(null.as_fd(), 0, span, 4096, &mut one_word);
        assert_eq!(errno(r), Some(libc::EINVAL));
        let r = dma_logging_report(null.as_fd(), 0, 4096, 4096 + 512, &mut one_word);
        assert_eq!(errno(r), Some(libc::EINVAL), "page size not a power of two");
        let r = dma_logging_report(null.as_fd(), 0, 64 * 4096, 4096, &mut one_word);
        assert_eq!(
            errno(r),
            Some(libc::ENOTTY),
            "a bitmap that fits reaches the fd"
        );
    }

    #[test]
    fn pointer_carrying_feature_calls_reach_a_non_vfio_fd_as_enotty() {
        let null = File::open("/dev/null").unwrap();
        let ranges = [b::vfio_device_feature_dma_logging_range {
            iova: 0,
            length: 4096,
        }];
        assert_eq!(
            errno(dma_logging_start(null.as_fd(), &ranges, 4096)),
            Some(libc::ENOTTY)
        );
        assert_eq!(errno(set_mig_state(null.as_fd(), 1)), Some(libc::ENOTTY));
        assert_eq!(
            errno(bind_iommufd(null.as_fd(), null.as_fd())),
            Some(libc::ENOTTY)
        );
    }
}
