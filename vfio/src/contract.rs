//! The device contract suite: checks written once against [`MigrationDevice`], so they run
//! against the emulated device here and against a real kernel VFIO device (mtty in a nested
//! guest) elsewhere.
//!
//! [`run_all`] runs every check that applies to the device's capabilities; each check is also a
//! public function. Checks never need more than [`ContractOptions::max_stream_bytes`] of state, so
//! mtty's 96-byte state works as well as a large emulated one. Every loop is bounded.
//!
//! What is checked:
//! - every supported state is reachable from RUNNING along the kernel's path and every legal
//!   arc can be SET ([`check_states_and_arcs`]), with a data fd exactly on the arcs that open one;
//! - illegal targets are refused before any SET and leave the device where it was
//!   ([`check_illegal_transitions`]);
//! - data fd semantics: ESPIPE on `pread`/`pwrite`, short reads allowed, 0 at the end of
//!   STOP_COPY (and again after it), no ENOMSG in STOP_COPY, the saving fd is not writable
//!   ([`check_stop_copy_stream`]);
//! - PRE_COPY: `precopy_info` valid only in PRE_COPY states (EINVAL otherwise), `initial_bytes`
//!   never grows except with `VFIO_PRECOPY_INFO_REINIT`, which only comes after the
//!   `MIG_PRECOPY_INFOv2` opt-in and always with non-zero `initial_bytes` (new initial data is
//!   then read to the end too), ENOMSG (or 0, mtty) when drained, PRE_COPY -> STOP_COPY continues
//!   the stream on the same fd, and the whole stream resumes ([`check_precopy`]; v1 or v2 as
//!   [`ContractOptions::precopy_info_v2`] says);
//! - a full STOP_COPY -> RESUMING transfer, written in odd-sized pieces, is accepted
//!   ([`check_transfer`]); a truncated and a corrupted one are refused, and RESET leaves ERROR
//!   for RUNNING ([`check_truncated_refused`], [`check_corrupted_refused`]);
//! - MIG_DATA_SIZE works in every state ([`check_stop_copy_size`]);
//! - DMA logging arguments are validated, when the device logs DMA ([`check_dma_logging_args`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::device::{MigrationDevice, PrecopyInfo};
use crate::dma::{DmaLoggingError, IovaRange, MAX_LOGGING_RANGES};
use crate::error::DeviceError;
use crate::state::{next_state, path, DeviceState, FsmError, MigrationCaps, Transition};

/// Tuning of the suite for a device.
#[derive(Clone, Debug)]
pub struct ContractOptions {
    /// Largest stream a check reads to the end; a longer one fails the check
    /// ([`Violation::StreamTooLong`]). Keep device states small for the suite.
    pub max_stream_bytes: u64,
    /// Read size on the data fd.
    pub read_chunk: usize,
    /// Accept `0` as "no data for now" in PRE_COPY (mtty does this) besides ENOMSG.
    pub allow_precopy_zero: bool,
    /// MIG_DATA_SIZE must equal the STOP_COPY stream length (true for the emulated device; real
    /// devices only estimate).
    pub exact_stop_copy_size: bool,
    /// Check that a refused resume leaves the device in ERROR (a driver may stay in RESUMING).
    pub refusal_goes_to_error: bool,
    /// Most reads any loop issues before giving up.
    pub max_reads: u64,
    /// Opt in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` before the PRE_COPY check, when the
    /// device offers it (false: check the v1 behaviour, where REINIT must never be reported).
    pub precopy_info_v2: bool,
}

impl Default for ContractOptions {
    fn default() -> ContractOptions {
        ContractOptions {
            max_stream_bytes: 64 << 20,
            read_chunk: 64 << 10,
            allow_precopy_zero: true,
            exact_stop_copy_size: false,
            refusal_goes_to_error: true,
            max_reads: 1 << 20,
            precopy_info_v2: true,
        }
    }
}

/// What went wrong in a check.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// A device operation that must succeed failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// I/O on the data fd failed unexpectedly.
    #[error("{op} on the data fd failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device is not in the expected state.
    #[error("expected state {expected}, device is in {got}")]
    State {
        /// Expected.
        expected: DeviceState,
        /// Read back.
        got: DeviceState,
    },
    /// An operation gave the wrong errno (or succeeded: `got` is `None`).
    #[error("{op}: expected errno {expected:?}, got {got:?}")]
    Errno {
        /// The operation.
        op: &'static str,
        /// Acceptable errnos.
        expected: &'static [i32],
        /// The errno seen (`None`: the operation succeeded).
        got: Option<i32>,
    },
    /// An arc that must return a data fd returned none, or the reverse.
    #[error("{arc}: data fd returned = {returned}, expected {expected}")]
    DataFd {
        /// The arc.
        arc: Transition,
        /// Whether a fd came back.
        returned: bool,
        /// Whether one was expected.
        expected: bool,
    },
    /// A request the FSM must refuse was accepted (or refused with the wrong error).
    #[error("{from} -> {to}: expected the FSM to refuse, got {got}")]
    NotRefused {
        /// Current state.
        from: DeviceState,
        /// Requested target.
        to: DeviceState,
        /// What happened instead.
        got: &'static str,
    },
    /// A read returned more bytes than asked.
    #[error("read of {asked} bytes returned {got}")]
    OverRead {
        /// Bytes asked.
        asked: usize,
        /// Bytes returned.
        got: usize,
    },
    /// The stream is longer than `max_stream_bytes` or needed more than `max_reads` reads.
    #[error("stream not finished after {bytes} bytes / {reads} reads")]
    StreamTooLong {
        /// Bytes read.
        bytes: u64,
        /// Reads issued.
        reads: u64,
    },
    /// MIG_DATA_SIZE differs from the bytes streamed.
    #[error("MIG_DATA_SIZE said {estimate}, the STOP_COPY stream had {streamed} bytes")]
    StopCopySize {
        /// The estimate.
        estimate: u64,
        /// Bytes read.
        streamed: u64,
    },
    /// `initial_bytes` grew while reading in PRE_COPY.
    #[error("initial_bytes grew from {before} to {after}")]
    InitialBytesGrew {
        /// Earlier value.
        before: u64,
        /// Later value.
        after: u64,
    },
    /// `initial_bytes` did not reach 0 within the read budget.
    #[error("initial_bytes still {initial_bytes} after {reads} reads")]
    InitialNotDrained {
        /// Last value.
        initial_bytes: u64,
        /// Reads issued.
        reads: u64,
    },
    /// `VFIO_PRECOPY_INFO_REINIT` was reported without the `MIG_PRECOPY_INFOv2` opt-in.
    #[error("VFIO_PRECOPY_INFO_REINIT reported without the MIG_PRECOPY_INFOv2 opt-in")]
    ReinitWithoutOptIn,
    /// `VFIO_PRECOPY_INFO_REINIT` was reported with `initial_bytes` = 0 (it means new initial
    /// data is on the stream).
    #[error("VFIO_PRECOPY_INFO_REINIT reported with initial_bytes 0 (dirty_bytes {dirty_bytes})")]
    ReinitWithoutInitialBytes {
        /// The `dirty_bytes` reported with it.
        dirty_bytes: u64,
    },
    /// `precopy_info` succeeded outside PRE_COPY, or failed with something else than EINVAL.
    #[error("precopy_info in {state}: expected EINVAL, got {got}")]
    PrecopyInfoOutsidePrecopy {
        /// The state.
        state: DeviceState,
        /// What happened.
        got: String,
    },
    /// A stream that must be refused was accepted by RESUMING -> STOP.
    #[error("a {what} stream was accepted by RESUMING -> STOP")]
    BadStreamAccepted {
        /// Which damage.
        what: &'static str,
    },
    /// DMA logging accepted bad arguments or gave the wrong error.
    #[error("DMA logging {case}: expected {expected}, got {got}")]
    DmaLogging {
        /// The bad input.
        case: &'static str,
        /// The error expected.
        expected: &'static str,
        /// What happened.
        got: String,
    },
}

/// A failed check: its name and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("contract check `{check}` failed on {device}: {violation}")]
pub struct ContractFailure {
    /// The check.
    pub check: &'static str,
    /// The device name.
    pub device: String,
    /// What was wrong.
    #[source]
    pub violation: Violation,
}

/// What a run covered.
#[derive(Clone, Debug, Default)]
pub struct ContractReport {
    /// The device's capabilities.
    pub caps: MigrationCaps,
    /// Checks passed, in order.
    pub passed: Vec<&'static str>,
    /// Checks skipped, with why (missing capability or feature).
    pub skipped: Vec<(&'static str, &'static str)>,
    /// States visited.
    pub states: Vec<DeviceState>,
    /// Arcs SET one at a time.
    pub arcs: Vec<Transition>,
    /// Bytes of the last full STOP_COPY stream.
    pub stop_copy_bytes: u64,
    /// The PRE_COPY check ran with `MIG_PRECOPY_INFOv2` in force.
    pub precopy_info_v2: bool,
    /// `VFIO_PRECOPY_INFO_REINIT` reports seen by the PRE_COPY check.
    pub precopy_reinits: u64,
}

/// What [`check_precopy`] saw of the pre-copy information.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyCheck {
    /// `MIG_PRECOPY_INFOv2` was in force.
    pub v2: bool,
    /// `VFIO_PRECOPY_INFO_REINIT` reports seen.
    pub reinits: u64,
}

type CheckResult = Result<(), Violation>;

fn fail<D: MigrationDevice>(check: &'static str, dev: &D, violation: Violation) -> ContractFailure {
    ContractFailure {
        check,
        device: dev.name().to_owned(),
        violation,
    }
}

fn expect_state<D: MigrationDevice>(dev: &mut D, expected: DeviceState) -> CheckResult {
    let got = dev.state()?;
    if got != expected {
        return Err(Violation::State { expected, got });
    }
    Ok(())
}

/// Back to RUNNING, by RESET (works from any state, ERROR included).
fn to_running<D: MigrationDevice>(dev: &mut D) -> CheckResult {
    dev.reset()?;
    expect_state(dev, DeviceState::Running)
}

fn is_einval(e: &DeviceError) -> bool {
    e.errno() == Some(libc::EINVAL) || matches!(e, DeviceError::WrongState { .. })
}

/// Reads a data fd to the end of the STOP_COPY stream (read returns 0).
pub fn read_to_end(fd: &File, opts: &ContractOptions, out: &mut Vec<u8>) -> CheckResult {
    let mut buf = vec![0u8; opts.read_chunk.max(1)];
    let mut reads = 0;
    loop {
        if reads >= opts.max_reads || out.len() as u64 > opts.max_stream_bytes {
            return Err(Violation::StreamTooLong {
                bytes: out.len() as u64,
                reads,
            });
        }
        reads += 1;
        match (&*fd).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) if n > buf.len() => {
                return Err(Violation::OverRead {
                    asked: buf.len(),
                    got: n,
                })
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => {
                return Err(Violation::Errno {
                    op: "read in STOP_COPY",
                    expected: &[],
                    got: Some(libc::ENOMSG),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(Violation::Io { op: "read", source }),
        }
    }
}

/// Writes `data` to a RESUMING fd in pieces of varying size (writes may split anywhere).
/// Returns the first write error's errno, if any.
fn write_split(fd: &File, data: &[u8]) -> Result<Option<i32>, Violation> {
    let sizes = [1usize, 7, 48, 4093, 65536, 1 << 20];
    let mut at = 0;
    let mut k = 0;
    while at < data.len() {
        let n = sizes[k % sizes.len()].min(data.len() - at);
        k += 1;
        match (&*fd).write(&data[at..at + n]) {
            Ok(0) => return Ok(Some(libc::ENOSPC)),
            Ok(w) => at += w,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Ok(e.raw_os_error().or(Some(libc::EIO))),
        }
    }
    Ok(None)
}

fn supported_states(caps: MigrationCaps) -> Vec<DeviceState> {
    DeviceState::ALL
        .into_iter()
        .filter(|s| s.supported_by(caps))
        .collect()
}

/// Every supported state is reachable from RUNNING, and every legal arc (a SET the kernel's path
/// takes in one step) succeeds, returning a data fd exactly when [`Transition::opens_data_fd`] says
/// so (continuing arcs may return the same stream again). RESUMING -> STOP needs a valid stream and
/// is covered by [`check_transfer`].
pub fn check_states_and_arcs<D: MigrationDevice>(
    dev: &mut D,
    report: &mut ContractReport,
) -> CheckResult {
    let caps = dev.capabilities();
    let states = supported_states(caps);
    for &s in &states {
        to_running(dev)?;
        dev.set_state(s)?;
        expect_state(dev, s)?;
        if !report.states.contains(&s) {
            report.states.push(s);
        }
    }
    for &from in &states {
        for &to in &states {
            if from == to || next_state(from, to, caps).ok() != Some(to) {
                continue;
            }
            let arc = Transition { from, to };
            if arc
                == (Transition {
                    from: DeviceState::Resuming,
                    to: DeviceState::Stop,
                })
            {
                continue;
            }
            to_running(dev)?;
            dev.set_state(from)?;
            let fd = dev
                .set_single_state(to)
                .map_err(|source| DeviceError::SetState {
                    device: dev.name().to_owned(),
                    arc,
                    target: to,
                    now: None,
                    source,
                })?;
            expect_state(dev, to)?;
            let returned = fd.is_some();
            if returned != arc.opens_data_fd() && !arc.continues_data_fd() {
                return Err(Violation::DataFd {
                    arc,
                    returned,
                    expected: arc.opens_data_fd(),
                });
            }
            report.arcs.push(arc);
        }
    }
    to_running(dev)
}

/// A SET from `from` (where the device is) to `to` must be refused by the FSM with an error
/// `expected` accepts, before any SET, leaving the device in `from`.
fn expect_fsm_refusal<D: MigrationDevice>(
    dev: &mut D,
    from: DeviceState,
    to: DeviceState,
    expected: fn(&FsmError) -> bool,
) -> CheckResult {
    let got = match dev.set_state(to) {
        Err(DeviceError::Fsm(e)) if expected(&e) => return expect_state(dev, from),
        Err(_) => "another error",
        Ok(_) => "success",
    };
    Err(Violation::NotRefused { from, to, got })
}

/// Unsupported states, ERROR, and paths the kernel blocks (STOP_COPY -> PRE_COPY) are refused by
/// the FSM, and the device stays where it was.
pub fn check_illegal_transitions<D: MigrationDevice>(dev: &mut D) -> CheckResult {
    let caps = dev.capabilities();
    to_running(dev)?;
    let mut targets: Vec<DeviceState> = DeviceState::ALL
        .into_iter()
        .filter(|s| !s.supported_by(caps))
        .collect();
    targets.push(DeviceState::Error);
    for to in targets {
        expect_fsm_refusal(dev, DeviceState::Running, to, |e| {
            matches!(e, FsmError::UnsupportedState { .. })
        })?;
    }
    if caps.contains(MigrationCaps::PRE_COPY) {
        dev.set_state(DeviceState::StopCopy)?;
        for to in [DeviceState::PreCopy, DeviceState::PreCopyP2p] {
            if !to.supported_by(caps) {
                continue;
            }
            expect_fsm_refusal(dev, DeviceState::StopCopy, to, |e| {
                matches!(e, FsmError::NoPath { .. })
            })?;
        }
    }
    to_running(dev)
}

/// MIG_DATA_SIZE answers in every reachable state.
pub fn check_stop_copy_size<D: MigrationDevice>(dev: &mut D) -> CheckResult {
    for s in supported_states(dev.capabilities()) {
        to_running(dev)?;
        dev.set_state(s)?;
        dev.stop_copy_size()?;
    }
    to_running(dev)
}

fn expect_errno(op: &'static str, r: io::Result<usize>, expected: &'static [i32]) -> CheckResult {
    match r {
        Err(e) if e.raw_os_error().is_some_and(|c| expected.contains(&c)) => Ok(()),
        Err(e) => Err(Violation::Errno {
            op,
            expected,
            got: e.raw_os_error(),
        }),
        Ok(_) => Err(Violation::Errno {
            op,
            expected,
            got: None,
        }),
    }
}

/// SETs `to` along the kernel's path and returns the data fd its last arc, `from -> to`, opens.
fn set_state_for_fd<D: MigrationDevice>(
    dev: &mut D,
    from: DeviceState,
    to: DeviceState,
) -> Result<File, Violation> {
    dev.set_state(to)?.map(File::from).ok_or(Violation::DataFd {
        arc: Transition { from, to },
        returned: false,
        expected: true,
    })
}

/// Reads a full STOP_COPY stream from a device (from RUNNING) and returns it.
pub fn stop_copy_stream<D: MigrationDevice>(
    dev: &mut D,
    opts: &ContractOptions,
) -> Result<Vec<u8>, Violation> {
    to_running(dev)?;
    let estimate = dev.stop_copy_size()?;
    let fd = set_state_for_fd(dev, DeviceState::Stop, DeviceState::StopCopy)?;
    let mut data = Vec::new();
    read_to_end(&fd, opts, &mut data)?;
    if opts.exact_stop_copy_size && estimate != data.len() as u64 {
        return Err(Violation::StopCopySize {
            estimate,
            streamed: data.len() as u64,
        });
    }
    dev.set_state(DeviceState::Stop)?;
    Ok(data)
}

/// STOP_COPY data fd semantics: ESPIPE on `pread`, a read never returns more than asked (short
/// reads allowed), 0 at the end and again after it, never ENOMSG, not writable; STOP_COPY ->
/// STOP ends it. Returns the stream length.
pub fn check_stop_copy_stream<D: MigrationDevice>(
    dev: &mut D,
    opts: &ContractOptions,
) -> Result<u64, Violation> {
    to_running(dev)?;
    let estimate = dev.stop_copy_size()?;
    let fd = set_state_for_fd(dev, DeviceState::Stop, DeviceState::StopCopy)?;
    let mut small = [0u8; 7];
    expect_errno(
        "pread on the STOP_COPY fd",
        fd.read_at(&mut small, 0),
        &[libc::ESPIPE],
    )?;
    expect_errno(
        "write on the STOP_COPY fd",
        (&fd).write(&small),
        &[libc::EBADF, libc::EINVAL],
    )?;
    let n = (&fd)
        .read(&mut small)
        .map_err(|source| Violation::Io { op: "read", source })?;
    if n > small.len() {
        return Err(Violation::OverRead {
            asked: small.len(),
            got: n,
        });
    }
    let mut data = small[..n].to_vec();
    if n > 0 {
        read_to_end(&fd, opts, &mut data)?;
    }
    // At the end, read keeps returning 0.
    let again = (&fd).read(&mut small).map_err(|source| Violation::Io {
        op: "read after end",
        source,
    })?;
    if again != 0 {
        return Err(Violation::Errno {
            op: "read after the end of STOP_COPY",
            expected: &[],
            got: None,
        });
    }
    if opts.exact_stop_copy_size && estimate != data.len() as u64 {
        return Err(Violation::StopCopySize {
            estimate,
            streamed: data.len() as u64,
        });
    }
    dev.set_state(DeviceState::Stop)?;
    to_running(dev)?;
    Ok(data.len() as u64)
}

/// Writes `data` into a destination (from RUNNING to RESUMING) and SETs RESUMING -> STOP.
/// Returns the first write errno (if a write failed) and the SET result.
fn resume_with<D: MigrationDevice>(
    dst: &mut D,
    data: &[u8],
) -> Result<(Option<i32>, Result<(), DeviceError>), Violation> {
    to_running(dst)?;
    let f = set_state_for_fd(dst, DeviceState::Stop, DeviceState::Resuming)?;
    let mut probe = [0u8; 1];
    expect_errno(
        "pwrite on the RESUMING fd",
        f.write_at(&probe, 0),
        &[libc::ESPIPE],
    )?;
    expect_errno(
        "read on the RESUMING fd",
        (&f).read(&mut probe),
        &[libc::EBADF, libc::EINVAL],
    )?;
    let werr = write_split(&f, data)?;
    let set = dst.set_state(DeviceState::Stop).map(|_| ());
    Ok((werr, set))
}

/// A full STOP_COPY stream written to a destination in odd-sized pieces is accepted.
pub fn check_transfer<D: MigrationDevice>(
    src: &mut D,
    dst: &mut D,
    opts: &ContractOptions,
) -> Result<u64, Violation> {
    let data = stop_copy_stream(src, opts)?;
    let (werr, set) = resume_with(dst, &data)?;
    if let Some(e) = werr {
        return Err(Violation::Errno {
            op: "write of a valid stream",
            expected: &[],
            got: Some(e),
        });
    }
    set?;
    expect_state(dst, DeviceState::Stop)?;
    to_running(src)?;
    to_running(dst)?;
    Ok(data.len() as u64)
}

fn expect_refused<D: MigrationDevice>(
    dst: &mut D,
    data: &[u8],
    what: &'static str,
    opts: &ContractOptions,
) -> CheckResult {
    let (werr, set) = resume_with(dst, data)?;
    match (werr, set) {
        (None, Ok(())) => return Err(Violation::BadStreamAccepted { what }),
        // Refused at write time (mtty: EFAULT on a bad header): the SET may then fail or not.
        (Some(_), _) => {}
        (None, Err(e)) => {
            if !is_einval(&e) && e.errno().is_none() {
                return Err(Violation::Device(e));
            }
            if opts.refusal_goes_to_error {
                expect_state(dst, DeviceState::Error)?;
            }
        }
    }
    // RESET leaves ERROR (or wherever the refusal left the device) for RUNNING.
    to_running(dst)
}

/// A stream missing its last byte is refused; RESET then returns the device to RUNNING.
pub fn check_truncated_refused<D: MigrationDevice>(
    src: &mut D,
    dst: &mut D,
    opts: &ContractOptions,
) -> CheckResult {
    let data = stop_copy_stream(src, opts)?;
    to_running(src)?;
    let cut = data.len().saturating_sub(1);
    expect_refused(dst, &data[..cut], "truncated", opts)?;
    expect_refused(dst, &[], "empty", opts)
}

/// A stream with one flipped byte (in its first 24 bytes, where every format has a header) is
/// refused; RESET then returns the device to RUNNING.
pub fn check_corrupted_refused<D: MigrationDevice>(
    src: &mut D,
    dst: &mut D,
    opts: &ContractOptions,
) -> CheckResult {
    let mut data = stop_copy_stream(src, opts)?;
    to_running(src)?;
    if data.is_empty() {
        return Ok(());
    }
    let at = 1.min(data.len() - 1);
    data[at] ^= 0x5A;
    expect_refused(dst, &data, "corrupted", opts)
}

/// PRE_COPY: the fd, `precopy_info` rules, draining, and PRE_COPY -> STOP_COPY continuity; the
/// combined stream resumes on `dst`. The source must not dirty state faster than the check reads
/// it (it reads until `initial_bytes` is 0, a read finds nothing pending and one more
/// `precopy_info` reports no new initial data).
pub fn check_precopy<D: MigrationDevice>(
    src: &mut D,
    dst: &mut D,
    opts: &ContractOptions,
) -> Result<PrecopyCheck, Violation> {
    let caps = src.capabilities();
    to_running(src)?;
    let mut seen = PrecopyCheck {
        v2: opts.precopy_info_v2 && src.enable_precopy_info_v2()?,
        reinits: 0,
    };
    // Checks one report against the previous one; counts REINITs.
    let mut observe = |before: &PrecopyInfo, now: &PrecopyInfo| -> CheckResult {
        if now.reinit {
            if !seen.v2 {
                return Err(Violation::ReinitWithoutOptIn);
            }
            if now.initial_bytes == 0 {
                return Err(Violation::ReinitWithoutInitialBytes {
                    dirty_bytes: now.dirty_bytes,
                });
            }
            seen.reinits += 1;
        } else if now.initial_bytes > before.initial_bytes {
            return Err(Violation::InitialBytesGrew {
                before: before.initial_bytes,
                after: now.initial_bytes,
            });
        }
        Ok(())
    };
    // Outside PRE_COPY, precopy_info is EINVAL. A STOP_COPY fd serves as the fd argument.
    let fd = set_state_for_fd(src, DeviceState::Stop, DeviceState::StopCopy)?;
    match src.precopy_info(fd.as_fd()) {
        Err(e) if is_einval(&e) => {}
        other => {
            return Err(Violation::PrecopyInfoOutsidePrecopy {
                state: DeviceState::StopCopy,
                got: format!("{other:?}"),
            })
        }
    }
    drop(fd);
    to_running(src)?;
    let f = set_state_for_fd(src, DeviceState::Running, DeviceState::PreCopy)?;
    let mut small = [0u8; 7];
    expect_errno(
        "pread on the PRE_COPY fd",
        f.read_at(&mut small, 0),
        &[libc::ESPIPE],
    )?;
    let mut data = Vec::new();
    let mut buf = vec![0u8; opts.read_chunk.max(1)];
    let mut info = src.precopy_info(f.as_fd())?;
    let mut reads = 0u64;
    loop {
        if reads >= opts.max_reads || data.len() as u64 > opts.max_stream_bytes {
            return Err(Violation::InitialNotDrained {
                initial_bytes: info.initial_bytes,
                reads,
            });
        }
        reads += 1;
        let empty = match (&f).read(&mut buf) {
            Ok(0) if opts.allow_precopy_zero => true,
            Ok(0) => {
                return Err(Violation::Errno {
                    op: "read in PRE_COPY with nothing pending",
                    expected: &[libc::ENOMSG],
                    got: None,
                })
            }
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(source) => {
                return Err(Violation::Io {
                    op: "read in PRE_COPY",
                    source,
                })
            }
        };
        let now = src.precopy_info(f.as_fd())?;
        observe(&info, &now)?;
        info = now;
        if empty && info.initial_bytes == 0 {
            // Drained; a v2 device may have new initial data by the next report.
            let again = src.precopy_info(f.as_fd())?;
            observe(&info, &again)?;
            info = again;
            if info.initial_bytes == 0 {
                break;
            }
        }
    }
    if caps.contains(MigrationCaps::P2P) {
        // PRE_COPY -> PRE_COPY_P2P keeps the stream; precopy_info still works there.
        src.set_state(DeviceState::PreCopyP2p)?;
        src.precopy_info(f.as_fd())?;
    }
    // Into STOP_COPY: no new stream; a returned fd (if any) reads the same stream.
    let again = src.set_state(DeviceState::StopCopy)?;
    let rest_fd = match again {
        Some(fd) => File::from(fd),
        None => f,
    };
    match src.precopy_info(rest_fd.as_fd()) {
        Err(e) if is_einval(&e) => {}
        other => {
            return Err(Violation::PrecopyInfoOutsidePrecopy {
                state: DeviceState::StopCopy,
                got: format!("{other:?}"),
            })
        }
    }
    read_to_end(&rest_fd, opts, &mut data)?;
    src.set_state(DeviceState::Stop)?;
    let (werr, set) = resume_with(dst, &data)?;
    if let Some(e) = werr {
        return Err(Violation::Errno {
            op: "write of a valid PRE_COPY + STOP_COPY stream",
            expected: &[],
            got: Some(e),
        });
    }
    set?;
    to_running(src)?;
    to_running(dst)?;
    // Leaving PRE_COPY back to RUNNING ends the stream; precopy_info is then EINVAL.
    let fd = src.set_state(DeviceState::PreCopy)?;
    src.set_state(DeviceState::Running)?;
    if let Some(fd) = fd {
        match src.precopy_info(fd.as_fd()) {
            Err(e) if is_einval(&e) => {}
            other => {
                return Err(Violation::PrecopyInfoOutsidePrecopy {
                    state: DeviceState::Running,
                    got: format!("{other:?}"),
                })
            }
        }
    }
    Ok(seen)
}

/// DMA logging argument rules; `Ok(false)` when the device does not log DMA.
pub fn check_dma_logging_args<D: MigrationDevice>(dev: &mut D) -> Result<bool, Violation> {
    to_running(dev)?;
    let page = 4096u64;
    let dma_err = |r: Result<(), DeviceError>,
                   case: &'static str,
                   expected: &'static str,
                   ok: fn(&DmaLoggingError) -> bool|
     -> CheckResult {
        match r {
            Err(DeviceError::DmaLogging { source, .. }) if ok(&source) => Ok(()),
            Err(e) if e.errno().is_some() => Ok(()),
            other => Err(Violation::DmaLogging {
                case,
                expected,
                got: format!("{other:?}"),
            }),
        }
    };
    let mut bitmap = [0u64; 1];
    match dev.dma_logging_report(0, page, page, &mut bitmap) {
        Err(DeviceError::Unsupported { .. }) => return Ok(false),
        r => dma_err(r, "REPORT before START", "NotStarted", |e| {
            matches!(e, DmaLoggingError::NotStarted)
        })?,
    }
    let too_many: Vec<IovaRange> = (0..=MAX_LOGGING_RANGES as u64)
        .map(|i| IovaRange {
            iova: i * 2 * page,
            length: page,
        })
        .collect();
    dma_err(
        dev.dma_logging_start(&too_many, page).map(|_| ()),
        "too many ranges",
        "TooManyRanges",
        |e| matches!(e, DmaLoggingError::TooManyRanges { .. }),
    )?;
    dma_err(
        dev.dma_logging_start(
            &[IovaRange {
                iova: 100,
                length: page,
            }],
            page,
        )
        .map(|_| ()),
        "unaligned range",
        "Unaligned",
        |e| matches!(e, DmaLoggingError::Unaligned { .. }),
    )?;
    let overlap = [
        IovaRange {
            iova: 0,
            length: 4 * page,
        },
        IovaRange {
            iova: 2 * page,
            length: 4 * page,
        },
    ];
    dma_err(
        dev.dma_logging_start(&overlap, page).map(|_| ()),
        "overlapping ranges",
        "Overlap",
        |e| matches!(e, DmaLoggingError::Overlap { .. }),
    )?;
    dma_err(
        dev.dma_logging_start(
            &[IovaRange {
                iova: 0,
                length: page,
            }],
            1000,
        )
        .map(|_| ()),
        "page size 1000",
        "BadPageSize",
        |e| matches!(e, DmaLoggingError::BadPageSize { .. }),
    )?;
    dma_err(
        dev.dma_logging_stop(),
        "STOP before START",
        "NotStarted",
        |e| matches!(e, DmaLoggingError::NotStarted),
    )?;
    Ok(true)
}

/// Runs every check that applies to the device's capabilities. `make_source` and `make_dest`
/// are each called once; the devices are driven back to RUNNING (by RESET) between checks.
pub fn run_all<D: MigrationDevice>(
    mut make_source: impl FnMut() -> D,
    mut make_dest: impl FnMut() -> D,
    opts: &ContractOptions,
) -> Result<ContractReport, ContractFailure> {
    let mut src = make_source();
    let mut dst = make_dest();
    let caps = src.capabilities();
    let mut report = ContractReport {
        caps,
        ..ContractReport::default()
    };
    macro_rules! check {
        ($name:literal, $dev:expr, $e:expr) => {{
            match $e {
                Ok(v) => {
                    report.passed.push($name);
                    v
                }
                Err(v) => return Err(fail($name, $dev, v)),
            }
        }};
    }
    check!(
        "states_and_arcs",
        &src,
        check_states_and_arcs(&mut src, &mut report)
    );
    check!(
        "illegal_transitions",
        &src,
        check_illegal_transitions(&mut src)
    );
    check!("stop_copy_size", &src, check_stop_copy_size(&mut src));
    report.stop_copy_bytes = check!(
        "stop_copy_stream",
        &src,
        check_stop_copy_stream(&mut src, opts)
    );
    check!("transfer", &dst, check_transfer(&mut src, &mut dst, opts));
    // The one arc `check_states_and_arcs` leaves out, since it needs a valid stream.
    report.arcs.push(Transition {
        from: DeviceState::Resuming,
        to: DeviceState::Stop,
    });
    check!(
        "truncated_refused",
        &dst,
        check_truncated_refused(&mut src, &mut dst, opts)
    );
    check!(
        "corrupted_refused",
        &dst,
        check_corrupted_refused(&mut src, &mut dst, opts)
    );
    if caps.contains(MigrationCaps::PRE_COPY) {
        let seen = check!("precopy", &src, check_precopy(&mut src, &mut dst, opts));
        report.precopy_info_v2 = seen.v2;
        report.precopy_reinits = seen.reinits;
    } else {
        report.skipped.push(("precopy", "VFIO_MIGRATION_PRE_COPY"));
    }
    let logs = check!("dma_logging_args", &src, check_dma_logging_args(&mut src));
    if !logs {
        report.passed.pop();
        report
            .skipped
            .push(("dma_logging_args", "VFIO_DEVICE_FEATURE_DMA_LOGGING"));
    }
    // Leave both devices where a caller expects them.
    check!("final_reset", &src, to_running(&mut src));
    check!("final_reset", &dst, to_running(&mut dst));
    report.passed.dedup();
    // `path` is the reference for every walk above; make sure the report's arcs agree with it.
    debug_assert!(report.arcs.iter().all(|a| path(a.from, a.to, caps)
        .map(|p| p.len() == 1)
        .unwrap_or(false)));
    Ok(report)
}
