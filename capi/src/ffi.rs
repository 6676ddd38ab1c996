//! The `extern "C"` entry points: the only `unsafe` code of the crate. Each entry checks its
//! pointers (NULL gives `VFMIG_CODE_NULL_POINTER`), runs inside [`guard`] (no panic crosses the
//! boundary) and converts with the safe code of `types.rs`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vfmig_pipeline::{
    CancelHandle, DestinationSession, DirtyReport, DirtySink, DirtyTracking, LoggingStarted,
    Report, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::dma::MAX_LOGGING_RANGES;
use vfmig_vfio::{IovaRange, MigrationDevice, VfioDevice};

use crate::device::Device;
use crate::error::{guard, last_error_ptr, CapiError, VfmigCode};
use crate::stream::StreamDevice;
use crate::types::{
    VfmigDestinationOptions, VfmigDeviceReport, VfmigDeviceState, VfmigDeviceStatus,
    VfmigDirtyBitmap, VfmigDirtyEvent, VfmigDirtyExport, VfmigDirtyKind, VfmigReport, VfmigSide,
    VfmigSourceOptions, VfmigStatus, VfmigTransportOptions,
};

/// A device handed to a session: made by a `vfmig_device_*` constructor, consumed by
/// `vfmig_source_new` / `vfmig_destination_new`, or freed with `vfmig_device_free`.
#[derive(Debug)]
pub struct VfmigDevice {
    inner: Device,
}

/// A source session (the step API: start, status, switchover, finish, abort). Use it from one
/// thread at a time; it may move between threads. Free with `vfmig_source_free`.
#[derive(Debug)]
pub struct VfmigSource {
    session: SourceSession<Device>,
}

/// A destination session (receive, resume, finish). Use it from one thread at a time. Free with
/// `vfmig_destination_free`.
#[derive(Debug)]
pub struct VfmigDestination {
    session: DestinationSession<Device>,
}

/// A bound TCP listener for `vfmig_destination_receive`. Free with `vfmig_listener_free`.
#[derive(Debug)]
pub struct VfmigListener {
    inner: Listener,
}

/// Cancels a session's step in progress from any thread. Free with `vfmig_cancel_free` (it may
/// outlive its session).
#[derive(Debug)]
pub struct VfmigCancel {
    inner: CancelHandle,
}

// ---- pointer helpers (each documents what its caller must guarantee) ----

/// # Safety
/// `p` is NULL or points to a valid `T` that nothing mutates for `'a`.
unsafe fn borrow<'a, T>(p: *const T, arg: &'static str) -> Result<&'a T, CapiError> {
    // SAFETY: by this function's contract `p` is NULL (refused by as_ref) or valid for 'a.
    unsafe { p.as_ref() }.ok_or(CapiError::NullPointer { arg })
}

/// # Safety
/// `p` is NULL or points to a valid `T` that nothing else accesses for `'a`.
unsafe fn borrow_mut<'a, T>(p: *mut T, arg: &'static str) -> Result<&'a mut T, CapiError> {
    // SAFETY: by this function's contract `p` is NULL (refused by as_mut) or valid and
    // unaliased for 'a.
    unsafe { p.as_mut() }.ok_or(CapiError::NullPointer { arg })
}

/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for `'a`.
unsafe fn text<'a>(p: *const c_char, arg: &'static str) -> Result<&'a str, CapiError> {
    if p.is_null() {
        return Err(CapiError::NullPointer { arg });
    }
    // SAFETY: not NULL, and by this function's contract NUL-terminated and valid for 'a.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|_| CapiError::InvalidArgument {
        arg,
        reason: "not UTF-8",
    })
}

/// Refuses a NULL out-pointer before any work is done.
fn need<T>(p: *mut T, arg: &'static str) -> Result<(), CapiError> {
    if p.is_null() {
        Err(CapiError::NullPointer { arg })
    } else {
        Ok(())
    }
}

/// # Safety
/// `p` is not NULL (checked with [`need`]) and valid for writing a `T` (its old contents,
/// initialised or not, are overwritten without being read or dropped).
unsafe fn put<T>(p: *mut T, value: T) {
    // SAFETY: by this function's contract `p` is valid for a write of T.
    unsafe { p.write(value) }
}

/// Fills the caller's array with the first `capacity` entries of `items`.
///
/// # Safety
/// `dst` is NULL with `capacity` 0, or valid for writing `capacity` `U`s.
unsafe fn fill<T, U>(
    dst: *mut U,
    capacity: usize,
    items: &[T],
    arg: &'static str,
) -> Result<(), CapiError>
where
    for<'t> U: From<&'t T>,
{
    if capacity == 0 {
        return Ok(());
    }
    need(dst, arg)?;
    for (i, item) in items.iter().take(capacity).enumerate() {
        // SAFETY: i < capacity, and by this function's contract dst holds `capacity` writable
        // U's.
        unsafe { put(dst.wrapping_add(i), U::from(item)) };
    }
    Ok(())
}

/// Takes the devices out of the caller's array, setting each entry to NULL.
///
/// # Safety
/// `devices` is NULL with `count` 0, or points to `count` pointers, each NULL or made by a
/// `vfmig_device_*` constructor and not yet consumed or freed.
unsafe fn take_devices(
    devices: *mut *mut VfmigDevice,
    count: usize,
) -> Result<Vec<Device>, CapiError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    need(devices, "devices")?;
    let mut out = Vec::with_capacity(count);
    let mut missing = false;
    for i in 0..count {
        // SAFETY: i < count and `devices` holds `count` pointers (this function's contract).
        let slot = unsafe { &mut *devices.wrapping_add(i) };
        let p = std::mem::replace(slot, std::ptr::null_mut());
        if p.is_null() {
            missing = true;
        } else {
            // SAFETY: p came from Box::into_raw in a vfmig_device_* constructor and was not
            // consumed before (contract); the caller's entry is now NULL, so it is taken once.
            out.push(unsafe { Box::from_raw(p) }.inner);
        }
    }
    if missing {
        return Err(CapiError::NullPointer { arg: "devices[i]" });
    }
    Ok(out)
}

/// The key of a transport options struct, copied out of the caller's memory.
///
/// # Safety
/// `t.psk` is NULL or valid for reading `t.psk_len` bytes.
unsafe fn psk(t: &VfmigTransportOptions) -> Option<Vec<u8>> {
    if t.psk.is_null() {
        return None;
    }
    // SAFETY: not NULL, and by this function's contract valid for psk_len bytes.
    Some(unsafe { std::slice::from_raw_parts(t.psk, t.psk_len) }.to_vec())
}

/// The library's own duplicate of a caller's fd (`F_DUPFD_CLOEXEC`); the caller's stays open and
/// theirs.
fn dup_fd(fd: c_int) -> Result<OwnedFd, CapiError> {
    if fd < 0 {
        return Err(CapiError::InvalidArgument {
            arg: "fd",
            reason: "negative file descriptor",
        });
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory; on a descriptor that is not open it fails
    // with EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(CapiError::Dup {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `new` was just returned by fcntl, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Refuses a non-blocking fd that is not a regular file: the data-fd ring would get `EAGAIN`
/// where it waits for data. (The flag belongs to the caller's open file, so it is not changed.)
fn check_blocking(fd: &OwnedFd) -> Result<(), CapiError> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_GETFL) on an open descriptor reads no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let regular = fd
        .try_clone()
        .and_then(|f| std::fs::File::from(f).metadata())
        .is_ok_and(|m| m.is_file());
    if flags >= 0 && flags & libc::O_NONBLOCK != 0 && !regular {
        return Err(CapiError::InvalidArgument {
            arg: "fd",
            reason: "is non-blocking (O_NONBLOCK); a stream that is not a regular file must block",
        });
    }
    Ok(())
}

fn side_from(side: u32) -> Result<bool, CapiError> {
    match side {
        s if s == VfmigSide::Source as u32 => Ok(false),
        s if s == VfmigSide::Destination as u32 => Ok(true),
        _ => Err(CapiError::InvalidArgument {
            arg: "side",
            reason: "not a VfmigSide value",
        }),
    }
}

/// The VMM's dirty-log callback as a [`DirtySink`].
struct CSink {
    callback: unsafe extern "C" fn(*mut c_void, *const VfmigDirtyEvent),
    user: *mut c_void,
}

// SAFETY: the sink is called only from inside the `vfmig_source_*` call that drives the session
// (the pipeline calls sinks on the session's control thread, which in step mode is the caller's),
// and `user` is only passed back to the callback; `VfmigDirtyExport` makes the caller promise
// that both may be used from the thread driving the session.
unsafe impl Send for CSink {}
// SAFETY: as for Send: the sink holds no state of its own, and the calls are the caller's.
unsafe impl Sync for CSink {}

impl CSink {
    fn emit(&self, event: &VfmigDirtyEvent) {
        // SAFETY: `callback` is the caller's function with this signature (VfmigDirtyFn);
        // `event` and everything it points to live until it returns.
        unsafe { (self.callback)(self.user, event) }
    }
}

const NO_REPORT: VfmigDirtyEvent = VfmigDirtyEvent {
    kind: VfmigDirtyKind::Report,
    page_size: 0,
    tracked_devices: 0,
    untracked_names: std::ptr::null(),
    untracked_count: 0,
    round: 0,
    last: false,
    failed_reports: 0,
    bitmaps: std::ptr::null(),
    bitmap_count: 0,
};

impl DirtySink for CSink {
    fn logging_started(&self, started: &LoggingStarted) {
        let names: Vec<CString> = started
            .untracked
            .iter()
            .map(|n| CString::new(n.replace('\0', "?")).unwrap_or_default())
            .collect();
        let ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        self.emit(&VfmigDirtyEvent {
            kind: VfmigDirtyKind::Started,
            page_size: started.page_size,
            tracked_devices: started.tracked.len(),
            untracked_names: ptrs.as_ptr(),
            untracked_count: ptrs.len(),
            ..NO_REPORT
        });
    }

    fn dirty(&self, report: &DirtyReport) {
        let bitmaps: Vec<VfmigDirtyBitmap> = report
            .bitmaps
            .iter()
            .map(|b| VfmigDirtyBitmap {
                iova: b.range.iova,
                length: b.range.length,
                page_size: b.page_size,
                bits: b.bits.as_ptr(),
                words: b.bits.len(),
            })
            .collect();
        self.emit(&VfmigDirtyEvent {
            page_size: report.bitmaps.first().map_or(0, |b| b.page_size),
            round: report.round,
            last: report.last,
            failed_reports: report.failed_reports,
            bitmaps: bitmaps.as_ptr(),
            bitmap_count: bitmaps.len(),
            ..NO_REPORT
        });
    }
}

/// The export the caller asked for, with its ranges copied.
///
/// # Safety
/// `d.ranges` is NULL or valid for reading `d.range_count` ranges.
unsafe fn dirty_tracking(d: &VfmigDirtyExport) -> Result<DirtyTracking, CapiError> {
    let Some(callback) = d.callback else {
        return Ok(DirtyTracking::Off);
    };
    if d.range_count == 0 || d.range_count > MAX_LOGGING_RANGES {
        return Err(CapiError::InvalidArgument {
            arg: "dirty.range_count",
            reason: "must be 1..=256",
        });
    }
    if d.ranges.is_null() {
        return Err(CapiError::NullPointer {
            arg: "dirty.ranges",
        });
    }
    // SAFETY: not NULL, and valid for range_count entries (this function's contract).
    let ranges = unsafe { std::slice::from_raw_parts(d.ranges, d.range_count) };
    Ok(DirtyTracking::Export {
        ranges: ranges
            .iter()
            .map(|r| IovaRange {
                iova: r.iova,
                length: r.length,
            })
            .collect(),
        page_size: d.page_size,
        sink: Arc::new(CSink {
            callback,
            user: d.user,
        }),
    })
}

#[cfg(feature = "emulated")]
fn emulated(spec: &str, destination: bool) -> Result<VfmigDevice, CapiError> {
    let cfg = crate::spec::parse(spec, destination)?;
    Ok(VfmigDevice {
        inner: Device::Emulated(vfmig_vfio::emulated::EmulatedDevice::new(cfg)?),
    })
}

#[cfg(not(feature = "emulated"))]
fn emulated(_spec: &str, _destination: bool) -> Result<VfmigDevice, CapiError> {
    Err(CapiError::Unsupported {
        what: "an emulated device (the library was built without feature `emulated`)",
    })
}

fn resolve(address: &str) -> Result<SocketAddr, CapiError> {
    let err = |source| CapiError::Address {
        arg: "address",
        address: address.to_owned(),
        source,
    };
    address
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::NotFound)))
}

fn digest_of(d: &mut Device) -> Result<[u8; 32], CapiError> {
    d.state_digest().ok_or(CapiError::Unsupported {
        what: "a state digest (emulated devices with defined state only)",
    })
}

/// # Safety
/// `report` is NULL or valid for one `VfmigReport`; `devices` as for [`fill`].
unsafe fn put_report(
    r: &Report,
    report: *mut VfmigReport,
    devices: *mut VfmigDeviceReport,
    capacity: usize,
) -> Result<(), CapiError> {
    if !report.is_null() {
        // SAFETY: not NULL, valid for one VfmigReport (this function's contract).
        unsafe { put(report, VfmigReport::from(r)) };
    }
    // SAFETY: devices holds `capacity` entries (this function's contract).
    unsafe { fill(devices, capacity, &r.devices, "devices") }
}

/// Runs `make` and hands the object it made to the caller through `*out` (NULL on failure).
///
/// # Safety
/// `out` is NULL (refused) or valid for writing one pointer.
unsafe fn construct<T>(out: *mut *mut T, make: impl FnOnce() -> Result<T, CapiError>) -> VfmigCode {
    guard(|| {
        if !out.is_null() {
            // SAFETY: not NULL and valid for a pointer (this function's contract).
            unsafe { put(out, std::ptr::null_mut()) };
        }
        let value = make()?;
        need(out, "out")?;
        // SAFETY: checked not NULL; valid for a pointer (this function's contract).
        unsafe { put(out, Box::into_raw(Box::new(value))) };
        Ok(())
    })
}

/// Frees an object made by [`construct`]; NULL is ignored.
///
/// # Safety
/// `p` is NULL or came from [`construct`] and was not freed.
unsafe fn destroy<T>(p: *mut T) {
    let _ = guard(|| {
        if !p.is_null() {
            // SAFETY: from Box::into_raw in construct, not freed before (this function's
            // contract).
            drop(unsafe { Box::from_raw(p) });
        }
        Ok(())
    });
}

/// What the source and destination handles share.
trait Session {
    fn devices(&mut self) -> &mut [Device];
    fn cancel(&self) -> CancelHandle;
}

impl Session for VfmigSource {
    fn devices(&mut self) -> &mut [Device] {
        self.session.devices_mut()
    }
    fn cancel(&self) -> CancelHandle {
        self.session.cancel_handle()
    }
}

impl Session for VfmigDestination {
    fn devices(&mut self) -> &mut [Device] {
        self.session.devices_mut()
    }
    fn cancel(&self) -> CancelHandle {
        self.session.cancel_handle()
    }
}

/// Writes what `read` finds on the session's device `index` to `*out`.
///
/// # Safety
/// `session` is NULL or a live session not used by another thread; `out` is NULL or valid for
/// writing one `T`.
unsafe fn device_query<S: Session, T>(
    session: *mut S,
    index: usize,
    out: *mut T,
    read: impl FnOnce(&mut Device) -> Result<T, CapiError>,
) -> VfmigCode {
    guard(|| {
        need(out, "out")?;
        // SAFETY: NULL or a live session used by this thread only (this function's contract).
        let s = unsafe { borrow_mut(session, "session") }?;
        let devices = s.devices();
        let count = devices.len();
        let device = devices
            .get_mut(index)
            .ok_or(CapiError::NoDevice { index, count })?;
        let value = read(device)?;
        // SAFETY: `out` is not NULL and valid for one T (this function's contract).
        unsafe { put(out, value) };
        Ok(())
    })
}

fn state_of(d: &mut Device) -> Result<VfmigDeviceState, CapiError> {
    Ok(VfmigDeviceState::from(Some(d.state()?)))
}

/// # Safety
/// `session` is NULL or a live session; `out` is NULL or valid for writing one pointer.
unsafe fn cancel_handle<S: Session>(session: *const S, out: *mut *mut VfmigCancel) -> VfmigCode {
    let make = || {
        // SAFETY: NULL or a live session (this function's contract).
        let s = unsafe { borrow(session, "session") }?;
        Ok(VfmigCancel { inner: s.cancel() })
    };
    // SAFETY: `out` as this function's contract says.
    unsafe { construct(out, make) }
}

// ---- general ----

/// The ABI of this header: the version of its structs and function signatures, bumped
/// whenever any of them changes. A program compares `vfmig_abi_version()` with it at start-up:
/// a library built from another header would read and write structs of another layout.
pub const VFMIG_ABI_VERSION: u32 = 1;

/// The `VFMIG_ABI_VERSION` the library was built with.
#[no_mangle]
pub extern "C" fn vfmig_abi_version() -> u32 {
    VFMIG_ABI_VERSION
}

/// The library version, e.g. `"0.1.0"`: a static string, never freed.
#[no_mangle]
pub extern "C" fn vfmig_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed `vfmig_*` call on this thread (an empty string after a
/// success). Never NULL. The string belongs to the library and stays valid until the next
/// `vfmig_*` call on the same thread: copy it to keep it.
#[no_mangle]
pub extern "C" fn vfmig_last_error() -> *const c_char {
    last_error_ptr()
}

// ---- devices ----

/// Makes a device from a VFIO device fd that the caller owns (a `/dev/vfio/devices/vfioN` cdev
/// bound to an iommufd, or an fd from `VFIO_GROUP_GET_DEVICE_FD`): checks it is a VFIO device
/// with migration (`VFIO_DEVICE_GET_INFO`, `VFIO_DEVICE_FEATURE_MIGRATION`).
///
/// Ownership: `fd` stays the caller's. The library works on its own duplicate
/// (`F_DUPFD_CLOEXEC`), closed when the device (or the session it went into) is freed; the
/// caller may close `fd` at any time after this call. Both refer to the same open device: the
/// caller must not change the device's migration state while a session holds it.
/// `name` (used in messages and reports) is copied. On success `*out` is a new device, which
/// the caller frees with `vfmig_device_free` or hands to a session.
///
/// # Safety
/// `name` is a NUL-terminated string; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_device_vfio_from_fd(
    fd: c_int,
    name: *const c_char,
    out: *mut *mut VfmigDevice,
) -> VfmigCode {
    let make = || {
        // SAFETY: `name` is NUL-terminated (contract).
        let name = unsafe { text(name, "name") }?;
        let dev = VfioDevice::from_fd(dup_fd(fd)?, name)?;
        Ok(VfmigDevice {
            inner: Device::Vfio(dev),
        })
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// Makes an emulated device (a software device with the full VFIO migration v2 state machine
/// and a FUSE data fd; for tests and examples) from a spec string:
///
/// `[emu:]size=SIZE[,name=NAME][,seed=N][,profile=mixed|zero|random|text][,precopy=SIZE|off]`
/// `[,dirty-rate=SIZE][,p2p=on|off][,precopy-info=v1|v2][,reinit-after=SIZE]`
/// `[,guest=SIZE@IOVA[,guest-dma=PAGES_PER_SEC][,quiesce-dma=PAGES]][,data-fd=fuse|mem]`
///
/// `data-fd=mem` makes the data fd a pipe fed by a device thread (memory speed, no FUSE needed)
/// instead of a FUSE file; such a device is STOP_COPY-only: `precopy=` defaults to `off` and
/// `precopy=SIZE` is refused.
///
/// `guest=` gives the device guest memory that it writes by DMA while it runs (`guest-dma=`)
/// and as it quiesces (`quiesce-dma=`), with `DMA_LOGGING` support: for the dirty-page export.
///
/// SIZE takes K, M, G, T (binary). The keys are those of the CLI's `emu:` spec. Source and
/// destination must use the same size and seed; `side` is a `VfmigSide` value, and a
/// destination device never dirties its state. `spec` is copied. On success `*out` is a new
/// device, which the caller frees with `vfmig_device_free` or hands to a session. A library
/// built without its default feature `emulated` (no FUSE server) returns
/// `VFMIG_CODE_UNSUPPORTED`.
///
/// # Safety
/// `spec` is a NUL-terminated string; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_device_emulated(
    spec: *const c_char,
    side: u32,
    out: *mut *mut VfmigDevice,
) -> VfmigCode {
    let make = || {
        // SAFETY: `spec` is NUL-terminated (contract).
        let spec = unsafe { text(spec, "spec") }?;
        emulated(spec, side_from(side)?)
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// Makes a byte-stream device from an fd the caller owns: state the VMM migrates itself (a
/// file, a pipe, a socket) carried through the pipeline like device state. `side` is a
/// `VfmigSide`. Source: the stream is read from the fd's current position to end of file (a
/// pipe: until its writers closed) in STOP_COPY, once; it is not rewound after a failure.
/// Destination: the verified stream is written starting at the fd's position when receiving
/// begins (whether that position moves is not specified), and a regular file is flushed
/// (`fdatasync`) before the device reports its state accepted; after a failure the bytes
/// written so far remain and the caller discards them. A stream has no PRE_COPY and advertises
/// RUNNING_P2P, so it combines with other devices. Pair it with a stream device on the other
/// side. A pipe or socket must be in blocking mode (no `O_NONBLOCK`): a non-blocking one is
/// refused with `VFMIG_CODE_INVALID_ARGUMENT`.
///
/// Ownership as for `vfmig_device_vfio_from_fd`: `fd` stays the caller's; the library works on
/// a duplicate that shares its file position. `name` is copied.
///
/// # Safety
/// `name` is a NUL-terminated string; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_device_stream_from_fd(
    fd: c_int,
    name: *const c_char,
    side: u32,
    out: *mut *mut VfmigDevice,
) -> VfmigCode {
    let make = || {
        // SAFETY: `name` is NUL-terminated (contract).
        let name = unsafe { text(name, "name") }?.to_owned();
        let destination = side_from(side)?;
        let fd = dup_fd(fd)?;
        check_blocking(&fd)?;
        Ok(VfmigDevice {
            inner: Device::Stream(StreamDevice::new(fd, name, destination)),
        })
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// Frees a device that was not handed to a session (closes the library's duplicate fd). NULL
/// is accepted and ignored.
///
/// # Safety
/// `device` is NULL or a device from a `vfmig_device_*` constructor, not consumed or freed.
#[no_mangle]
pub unsafe extern "C" fn vfmig_device_free(device: *mut VfmigDevice) {
    // SAFETY: NULL or an object of this type not yet freed (contract).
    unsafe { destroy(device) }
}

// ---- cancel ----

/// Asks the session the handle came from to stop its step in progress; that step then fails
/// with `VFMIG_CODE_CANCELLED` after rolling back (or `VFMIG_CODE_IN_DOUBT` where the decision
/// may have been taken). Callable from any thread, also while another thread is inside a
/// `vfmig_source_*` / `vfmig_destination_*` call.
///
/// # Safety
/// `cancel` is NULL or a handle from a `*_cancel_handle` call, not freed.
#[no_mangle]
pub unsafe extern "C" fn vfmig_cancel(cancel: *const VfmigCancel) -> VfmigCode {
    guard(|| {
        // SAFETY: NULL or a live handle (contract).
        unsafe { borrow(cancel, "cancel") }?.inner.cancel();
        Ok(())
    })
}

/// Frees a cancel handle. NULL is accepted and ignored.
///
/// # Safety
/// `cancel` is NULL or a handle from a `*_cancel_handle` call, not freed.
#[no_mangle]
pub unsafe extern "C" fn vfmig_cancel_free(cancel: *mut VfmigCancel) {
    // SAFETY: NULL or an object of this type not yet freed (contract).
    unsafe { destroy(cancel) }
}

// ---- source ----

/// Fills `*out` with the default source options (300 ms max downtime, pre-copy, adaptive
/// compression, 2 codec workers, 1 connection, 30 s timeout, no key).
///
/// # Safety
/// `out` is valid for writing one `VfmigSourceOptions`.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_options_default(out: *mut VfmigSourceOptions) -> VfmigCode {
    guard(|| {
        need(out, "out")?;
        // SAFETY: not NULL and valid for one struct (contract).
        unsafe { put(out, VfmigSourceOptions::default()) };
        Ok(())
    })
}

/// Creates a source session over `count` devices, in session order (the destination pairs
/// them by position).
///
/// Ownership: every non-NULL entry of `devices` is consumed, whatever the result, and the
/// entry is set to NULL; the session frees the devices. `options` (NULL: defaults), the key and
/// the dirty ranges it points to are only read during this call; `options->dirty.callback` and
/// `options->dirty.user` are kept and must stay valid until the session is freed. On success
/// `*out` is a new session, freed with `vfmig_source_free`.
///
/// # Safety
/// `options` is NULL or a valid struct whose `transport.psk` is NULL or valid for `psk_len`
/// bytes; `devices` holds `count` entries, each NULL or an unconsumed device; `out` is valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_new(
    options: *const VfmigSourceOptions,
    devices: *mut *mut VfmigDevice,
    count: usize,
    out: *mut *mut VfmigSource,
) -> VfmigCode {
    let make = || {
        // SAFETY: `devices` holds `count` device pointers (contract).
        let devices = unsafe { take_devices(devices, count) }?;
        let defaults = VfmigSourceOptions::default();
        // SAFETY: NULL or a valid struct (contract).
        let o = unsafe { options.as_ref() }.unwrap_or(&defaults);
        // SAFETY: psk is NULL or valid for psk_len bytes (contract).
        let mut opts = o.library_options(unsafe { psk(&o.transport) })?;
        // SAFETY: dirty.ranges is NULL or valid for range_count entries (contract).
        opts.dirty_tracking = unsafe { dirty_tracking(&o.dirty) }?;
        Ok(VfmigSource {
            session: SourceSession::new(devices, opts),
        })
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// Step 1: checks the devices, connects to the destination at `address` (`"HOST:PORT"`, e.g.
/// `"127.0.0.1:7777"` or `"[::1]:7777"`), handshakes, and begins pre-copy (when enabled and
/// every device supports it). Blocks for the connection and handshake. On failure the devices
/// are rolled back to RUNNING. `address` is only read during the call.
///
/// # Safety
/// `source` is a live session not used by another thread; `address` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_start(
    source: *mut VfmigSource,
    address: *const c_char,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let s = unsafe { borrow_mut(source, "source") }?;
        // SAFETY: NUL-terminated (contract).
        let addr = resolve(unsafe { text(address, "address") }?)?;
        s.session.start(addr)?;
        Ok(())
    })
}

/// Step 2, repeated: runs one step of the session's control loop (at most about 10 ms) and
/// fills `*status` and the first `capacity` entries of `devices` (in session order;
/// `status->device_count` says how many there are). `devices` may be NULL when `capacity` is 0.
/// A failure aborts the session and rolls the devices back.
///
/// # Safety
/// `source` is a live session not used by another thread; `status` is valid for one struct;
/// `devices` is valid for `capacity` structs.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_status(
    source: *mut VfmigSource,
    status: *mut VfmigStatus,
    devices: *mut VfmigDeviceStatus,
    capacity: usize,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let s = unsafe { borrow_mut(source, "source") }?;
        need(status, "status")?;
        if capacity > 0 {
            need(devices, "devices")?;
        }
        let st = s.session.status()?;
        // SAFETY: `status` is not NULL and valid for one struct (contract).
        unsafe { put(status, VfmigStatus::from(&st)) };
        // SAFETY: `devices` is valid for `capacity` structs (contract).
        unsafe { fill(devices, capacity, &st.devices, "devices") }
    })
}

/// Step 3: the switchover, called after the VMM paused its vCPUs. Ends pre-copy, takes every
/// device through the RUNNING_P2P quiescing order and then STOP_COPY, and streams the rest in
/// the background; the downtime starts here.
///
/// # Safety
/// `source` is a live session not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_switchover(source: *mut VfmigSource) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        unsafe { borrow_mut(source, "source") }?
            .session
            .switchover()?;
        Ok(())
    })
}

/// Step 4: waits until every device is prepared on the destination and stopped here, sends the
/// commit, waits for the destination's outcome and fills the report: `*report` (may be NULL)
/// and the first `capacity` entries of `devices`. `VFMIG_CODE_IN_DOUBT` leaves the devices in
/// STOP (see the message); `VFMIG_CODE_DESTINATION_RESUME_FAILED` means the source rolled back.
///
/// # Safety
/// `source` is a live session not used by another thread; `report` is NULL or valid for one
/// struct; `devices` is valid for `capacity` structs.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_finish(
    source: *mut VfmigSource,
    report: *mut VfmigReport,
    devices: *mut VfmigDeviceReport,
    capacity: usize,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let s = unsafe { borrow_mut(source, "source") }?;
        if capacity > 0 {
            need(devices, "devices")?;
        }
        let r = s.session.finish()?;
        // SAFETY: `report` and `devices` as the contract says.
        unsafe { put_report(&r, report, devices, capacity) }
    })
}

/// Aborts the step in progress: tells the destination (which resets its devices), stops the
/// stages and walks the devices back to RUNNING. `*was_active` (may be NULL) says whether a
/// session was in progress. After `vfmig_source_finish` returned, there is nothing to abort.
///
/// # Safety
/// `source` is a live session not used by another thread; `was_active` is NULL or valid for one
/// bool.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_abort(
    source: *mut VfmigSource,
    was_active: *mut bool,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let active = unsafe { borrow_mut(source, "source") }?.session.abort();
        if !was_active.is_null() {
            // SAFETY: not NULL, valid for one bool (contract).
            unsafe { put(was_active, active) };
        }
        Ok(())
    })
}

/// A handle that cancels the session's step in progress from another thread (see
/// `vfmig_cancel`). `*out` is freed with `vfmig_cancel_free`.
///
/// # Safety
/// `source` is a live session; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_cancel_handle(
    source: *const VfmigSource,
    out: *mut *mut VfmigCancel,
) -> VfmigCode {
    // SAFETY: a live session and a valid out-pointer (contract).
    unsafe { cancel_handle(source, out) }
}

/// The migration state of the session's device `index` (session order), read from the device.
///
/// # Safety
/// `source` is a live session not used by another thread; `out` is valid for one value.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_device_state(
    source: *mut VfmigSource,
    index: usize,
    out: *mut VfmigDeviceState,
) -> VfmigCode {
    // SAFETY: a live session used by this thread only; `out` valid for one value (contract).
    unsafe { device_query(source, index, out, state_of) }
}

/// The state digest (32 bytes, BLAKE3 over the device's state) of the session's emulated device
/// `index`, to compare with the destination's. `VFMIG_CODE_UNSUPPORTED` for a VFIO device or
/// while the state is undefined.
///
/// # Safety
/// `source` is a live session not used by another thread; `out` is valid for 32 bytes.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_device_digest(
    source: *mut VfmigSource,
    index: usize,
    out: *mut u8,
) -> VfmigCode {
    // SAFETY: a live session used by this thread only; `out` valid for 32 bytes (contract).
    unsafe { device_query(source, index, out.cast::<[u8; 32]>(), digest_of) }
}

/// Frees a session and its devices. A step still in progress is aborted first (the devices are
/// rolled back to RUNNING and the destination told). NULL is accepted and ignored.
///
/// # Safety
/// `source` is NULL or a session from `vfmig_source_new`, not freed, not in use by another
/// thread.
#[no_mangle]
pub unsafe extern "C" fn vfmig_source_free(source: *mut VfmigSource) {
    // SAFETY: NULL or an object of this type not yet freed (contract).
    unsafe { destroy(source) }
}

// ---- destination ----

/// Fills `*out` with the default destination options (30 s timeout, 2 codec workers, 600 s
/// accept timeout, no key).
///
/// # Safety
/// `out` is valid for writing one `VfmigDestinationOptions`.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_options_default(
    out: *mut VfmigDestinationOptions,
) -> VfmigCode {
    guard(|| {
        need(out, "out")?;
        // SAFETY: not NULL and valid for one struct (contract).
        unsafe { put(out, VfmigDestinationOptions::default()) };
        Ok(())
    })
}

/// Binds a TCP listener at `address` (`"HOST:PORT"`; port 0 picks a free one, see
/// `vfmig_listener_port`). `address` is only read during the call. `*out` is freed with
/// `vfmig_listener_free`; the socket belongs to the listener.
///
/// # Safety
/// `address` is NUL-terminated; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_listener_bind(
    address: *const c_char,
    out: *mut *mut VfmigListener,
) -> VfmigCode {
    let make = || {
        // SAFETY: NUL-terminated (contract).
        let addr = resolve(unsafe { text(address, "address") }?)?;
        Ok(VfmigListener {
            inner: Listener::bind(addr)?,
        })
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// The port the listener is bound to.
///
/// # Safety
/// `listener` is a live listener; `port` is valid for one value.
#[no_mangle]
pub unsafe extern "C" fn vfmig_listener_port(
    listener: *const VfmigListener,
    port: *mut u16,
) -> VfmigCode {
    guard(|| {
        need(port, "port")?;
        // SAFETY: a live listener (contract).
        let l = unsafe { borrow(listener, "listener") }?;
        // SAFETY: `port` is not NULL and valid for one value (contract).
        unsafe { put(port, l.inner.local_addr().port()) };
        Ok(())
    })
}

/// Closes a listener. NULL is accepted and ignored.
///
/// # Safety
/// `listener` is NULL or a listener from `vfmig_listener_bind`, not freed, not in use.
#[no_mangle]
pub unsafe extern "C" fn vfmig_listener_free(listener: *mut VfmigListener) {
    // SAFETY: NULL or an object of this type not yet freed (contract).
    unsafe { destroy(listener) }
}

/// Creates a destination session over `count` devices, paired with the source's by position.
/// Ownership as for `vfmig_source_new`: every non-NULL entry of `devices` is consumed whatever
/// the result and set to NULL; `options` (NULL: defaults) is only read during the call. On
/// success `*out` is freed with `vfmig_destination_free`.
///
/// # Safety
/// As for `vfmig_source_new`.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_new(
    options: *const VfmigDestinationOptions,
    devices: *mut *mut VfmigDevice,
    count: usize,
    out: *mut *mut VfmigDestination,
) -> VfmigCode {
    let make = || {
        // SAFETY: `devices` holds `count` device pointers (contract).
        let devices = unsafe { take_devices(devices, count) }?;
        let defaults = VfmigDestinationOptions::default();
        // SAFETY: NULL or a valid struct (contract).
        let o = unsafe { options.as_ref() }.unwrap_or(&defaults);
        // SAFETY: psk is NULL or valid for psk_len bytes (contract).
        let opts = o.library_options(unsafe { psk(&o.transport) })?;
        Ok(VfmigDestination {
            session: DestinationSession::new(devices, opts),
        })
    };
    // SAFETY: `out` is valid for a pointer (contract).
    unsafe { construct(out, make) }
}

/// Step 1: accepts one source on `listener`, loads every device, lets each validate its state,
/// and waits for the source's decision. `VFMIG_CODE_OK`: the source committed; the devices are
/// in STOP with the migrated state, and the source's devices never run again. Load the RAM,
/// resume (`vfmig_destination_resume`, or the VMM itself), then call
/// `vfmig_destination_finish` promptly (the source waits at most its timeout).
/// `VFMIG_CODE_IN_DOUBT`: the devices stay in STOP (see the message). Any other error: the
/// migration failed before the decision, the devices were reset, and the source rolls back.
/// The listener is only borrowed; it can accept again.
///
/// # Safety
/// `destination` is a live session not used by another thread; `listener` is a live listener.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_receive(
    destination: *mut VfmigDestination,
    listener: *const VfmigListener,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let d = unsafe { borrow_mut(destination, "destination") }?;
        // SAFETY: a live listener (contract).
        let l = unsafe { borrow(listener, "listener") }?;
        d.session.receive(&l.inner)?;
        Ok(())
    })
}

/// Step 2 (optional; the VMM may resume the devices itself): moves every device STOP ->
/// RUNNING_P2P (all) -> RUNNING (all). Only after a successful `vfmig_destination_receive`.
///
/// # Safety
/// `destination` is a live session not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_resume(destination: *mut VfmigDestination) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        unsafe { borrow_mut(destination, "destination") }?
            .session
            .resume()?;
        Ok(())
    })
}

/// Step 3: tells the source what happened after the commit and ends the session. `outcome` is
/// a `VfmigOutcome`: `VFMIG_OUTCOME_RESUMED` (the devices run here), `VFMIG_OUTCOME_HELD`
/// (they hold the state in STOP for their owner) or `VFMIG_OUTCOME_RESUME_FAILED` (every
/// device is reset before the source learns it, so the source may run again). Fills `*report`
/// (may be NULL) and the first `capacity` entries of `devices`.
///
/// # Safety
/// `destination` is a live session not used by another thread; `report` is NULL or valid for
/// one struct; `devices` is valid for `capacity` structs.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_finish(
    destination: *mut VfmigDestination,
    outcome: u32,
    report: *mut VfmigReport,
    devices: *mut VfmigDeviceReport,
    capacity: usize,
) -> VfmigCode {
    guard(|| {
        // SAFETY: a live session used by this thread only (contract).
        let d = unsafe { borrow_mut(destination, "destination") }?;
        if capacity > 0 {
            need(devices, "devices")?;
        }
        let outcome = crate::types::VfmigOutcome::final_from(outcome)?;
        let r = d.session.finish(outcome)?;
        // SAFETY: `report` and `devices` as the contract says.
        unsafe { put_report(&r, report, devices, capacity) }
    })
}

/// A handle that cancels `vfmig_destination_receive` from another thread (see `vfmig_cancel`)
/// once a source has connected: loading is aborted (the devices are reset), and a cancel while
/// waiting for the decision leaves the session in doubt. It does not interrupt the wait for a
/// source to connect, which `transport.accept_timeout_ms` bounds. `*out` is freed with
/// `vfmig_cancel_free`.
///
/// # Safety
/// `destination` is a live session; `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_cancel_handle(
    destination: *const VfmigDestination,
    out: *mut *mut VfmigCancel,
) -> VfmigCode {
    // SAFETY: a live session and a valid out-pointer (contract).
    unsafe { cancel_handle(destination, out) }
}

/// The migration state of the session's device `index`, read from the device.
///
/// # Safety
/// `destination` is a live session not used by another thread; `out` is valid for one value.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_device_state(
    destination: *mut VfmigDestination,
    index: usize,
    out: *mut VfmigDeviceState,
) -> VfmigCode {
    // SAFETY: a live session used by this thread only; `out` valid for one value (contract).
    unsafe { device_query(destination, index, out, state_of) }
}

/// The state digest of the session's emulated device `index` (see
/// `vfmig_source_device_digest`): after a migration it equals the source device's.
///
/// # Safety
/// `destination` is a live session not used by another thread; `out` is valid for 32 bytes.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_device_digest(
    destination: *mut VfmigDestination,
    index: usize,
    out: *mut u8,
) -> VfmigCode {
    // SAFETY: a live session used by this thread only; `out` valid for 32 bytes (contract).
    unsafe { device_query(destination, index, out.cast::<[u8; 32]>(), digest_of) }
}

/// Frees a session and its devices. NULL is accepted and ignored. After a successful
/// `vfmig_destination_receive`, report the outcome with `vfmig_destination_finish` first: a
/// session freed without it leaves the source without an outcome (it reports in doubt), while
/// the devices here keep the state in STOP.
///
/// # Safety
/// `destination` is NULL or a session from `vfmig_destination_new`, not freed, not in use.
#[no_mangle]
pub unsafe extern "C" fn vfmig_destination_free(destination: *mut VfmigDestination) {
    // SAFETY: NULL or an object of this type not yet freed (contract).
    unsafe { destroy(destination) }
}
