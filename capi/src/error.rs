//! Error codes, the thread-local last-error message, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use vfmig_pipeline::PipelineError;
use vfmig_transport::TransportError;
#[cfg(feature = "emulated")]
use vfmig_vfio::emulated::EmulatedError;
use vfmig_vfio::DeviceError;

#[cfg(feature = "emulated")]
use crate::spec::SpecError;

/// What a `vfmig_*` call returned. `VFMIG_CODE_OK` (0) is success; every other code comes with
/// a message from `vfmig_last_error` on the same thread. The values are stable.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfmigCode {
    /// Success.
    Ok = 0,
    /// A pointer argument that must not be NULL was NULL. The call has no lasting effect,
    /// except that devices handed to `vfmig_*_new` are consumed whatever the result.
    NullPointer = 1,
    /// An argument is out of range or malformed (an address, a device spec, an option, a string
    /// that is not UTF-8). Nothing was done.
    InvalidArgument = 2,
    /// The call is not valid in the session's current step (e.g. `switchover` before `start`,
    /// `resume` before a committed `receive`). Nothing was changed.
    WrongStep = 3,
    /// A device refused or failed an operation (state change, data fd, validation of the state).
    Device = 4,
    /// The network or the peer failed (connection, handshake, authentication, peer gone).
    Transport = 5,
    /// Nothing happened within a timeout.
    Timeout = 6,
    /// The session was cancelled (`vfmig_cancel`, `vfmig_source_abort`).
    Cancelled = 7,
    /// The peer aborted the migration.
    PeerAborted = 8,
    /// The stream failed verification (corrupt frame, length or digest mismatch).
    Integrity = 9,
    /// The decision of the session cannot be known on this side (docs/PROTOCOL.md, section
    /// 5.1): this side's devices stay in STOP with valid state. The message says how to finish.
    InDoubt = 10,
    /// Source: the destination could not resume its devices after the commit; it reset them,
    /// and the source rolled back (its devices run again).
    DestinationResumeFailed = 11,
    /// Pre-copy reached `max_precopy_ms` without the downtime estimate fitting, and
    /// `VFMIG_PRECOPY_LIMIT_ABORT` was asked for. The devices were rolled back.
    PrecopyTooLong = 12,
    /// Out of a resource (threads, memory, io_uring, buffers).
    Resources = 13,
    /// The operation is not supported by this device (e.g. a state digest of a VFIO device).
    Unsupported = 14,
    /// A bug inside vfmig (a panic caught at the API boundary, a lost stage). The object the
    /// call was made on should only be freed afterwards.
    Internal = 15,
}

/// Everything a call can fail with, before it becomes a code and a message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CapiError {
    #[error("argument {arg} is NULL")]
    NullPointer { arg: &'static str },
    #[error("argument {arg}: {reason}")]
    InvalidArgument {
        arg: &'static str,
        reason: &'static str,
    },
    #[error("argument {arg}: cannot resolve address {address:?}: {source}")]
    Address {
        arg: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd}: cannot duplicate it: {source}")]
    Dup {
        fd: std::ffi::c_int,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "emulated")]
    #[error("device spec: {0}")]
    Spec(#[from] SpecError),
    #[cfg(feature = "emulated")]
    #[error(transparent)]
    Emulated(#[from] EmulatedError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("device {index} of {count}: no such device")]
    NoDevice { index: usize, count: usize },
    #[error("{what} is not supported by this device")]
    Unsupported { what: &'static str },
    #[error("internal error: a panic was caught at the C API boundary: {message}")]
    Panic { message: String },
}

impl CapiError {
    pub(crate) fn code(&self) -> VfmigCode {
        match self {
            CapiError::NullPointer { .. } => VfmigCode::NullPointer,
            CapiError::InvalidArgument { .. }
            | CapiError::Address { .. }
            | CapiError::Dup { .. }
            | CapiError::NoDevice { .. } => VfmigCode::InvalidArgument,
            #[cfg(feature = "emulated")]
            CapiError::Spec(_)
            | CapiError::Emulated(
                EmulatedError::BadConfig { .. } | EmulatedError::MemDataFd { .. },
            ) => VfmigCode::InvalidArgument,
            #[cfg(feature = "emulated")]
            CapiError::Emulated(_) => VfmigCode::Resources,
            CapiError::Device(_) => VfmigCode::Device,
            CapiError::Transport(_) => VfmigCode::Transport,
            CapiError::Pipeline(e) => pipeline_code(e),
            CapiError::Unsupported { .. } => VfmigCode::Unsupported,
            CapiError::Panic { .. } => VfmigCode::Internal,
        }
    }

    /// The message for `vfmig_last_error`: the error, then each underlying cause not already in
    /// its text, then (in doubt) how to finish.
    fn message(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let s = c.to_string();
            if !text.contains(&s) {
                text.push_str(": ");
                text.push_str(&s);
            }
            cause = c.source();
        }
        if let CapiError::Pipeline(e) = self {
            if let Some(g) = e.in_doubt_guidance() {
                text.push_str(". ");
                text.push_str(g);
            }
        }
        text
    }
}

fn pipeline_code(e: &PipelineError) -> VfmigCode {
    match e {
        PipelineError::Device { .. }
        | PipelineError::Read { .. }
        | PipelineError::Write { .. }
        | PipelineError::DeviceRefused { .. }
        | PipelineError::P2pRequired { .. }
        | PipelineError::WrongStartState { .. }
        | PipelineError::DeviceCount { .. }
        | PipelineError::NoDataFd { .. }
        | PipelineError::SourceChanged { .. }
        | PipelineError::Guest { .. } => VfmigCode::Device,
        PipelineError::Uring { .. }
        | PipelineError::Resource { .. }
        | PipelineError::Pool { .. } => VfmigCode::Resources,
        PipelineError::Transport { .. }
        | PipelineError::SourceGone { .. }
        | PipelineError::UnknownOutcome { .. } => VfmigCode::Transport,
        PipelineError::Decode { .. }
        | PipelineError::Sequence { .. }
        | PipelineError::UnexpectedFrame { .. }
        | PipelineError::LengthMismatch { .. }
        | PipelineError::DigestMismatch { .. } => VfmigCode::Integrity,
        PipelineError::PeerAborted { .. } => VfmigCode::PeerAborted,
        PipelineError::Timeout { .. } => VfmigCode::Timeout,
        PipelineError::Cancelled { .. } => VfmigCode::Cancelled,
        PipelineError::Options { .. } => VfmigCode::InvalidArgument,
        PipelineError::InDoubt { .. } => VfmigCode::InDoubt,
        PipelineError::DestinationResumeFailed => VfmigCode::DestinationResumeFailed,
        PipelineError::NotCommitted | PipelineError::WrongStep { .. } => VfmigCode::WrongStep,
        PipelineError::PrecopyTooLong { .. } => VfmigCode::PrecopyTooLong,
        _ => VfmigCode::Internal,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    // An interior NUL cannot end the C string early: replace it.
    let bytes: Vec<u8> = message
        .into_bytes()
        .into_iter()
        .map(|b| if b == 0 { b'?' } else { b })
        .collect();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The thread's last error message (empty after a success). The pointer stays valid until the
/// next `vfmig_*` call on this thread.
pub(crate) fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one entry point: clears the last error, catches any panic (nothing unwinds into C), and
/// turns the result into a code, leaving its message for `vfmig_last_error`.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), CapiError>) -> VfmigCode {
    set_last_error(String::new());
    let outcome = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        Err(CapiError::Panic { message })
    });
    match outcome {
        Ok(()) => VfmigCode::Ok,
        Err(e) => {
            let code = e.code();
            set_last_error(e.message());
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let code = guard(|| panic!("boom at the boundary"));
        assert_eq!(code, VfmigCode::Internal);
        assert!(last().contains("boom at the boundary"), "{}", last());
    }

    #[test]
    fn success_clears_the_previous_message() {
        let code = guard(|| Err(CapiError::NullPointer { arg: "out" }));
        assert_eq!(code, VfmigCode::NullPointer);
        assert_eq!(last(), "argument out is NULL");
        assert_eq!(guard(|| Ok(())), VfmigCode::Ok);
        assert_eq!(last(), "");
    }

    #[test]
    fn in_doubt_carries_its_guidance() {
        let e = CapiError::Pipeline(PipelineError::InDoubt {
            side: vfmig_pipeline::Side::Source,
            cause: Box::new(PipelineError::Cancelled {
                phase: vfmig_pipeline::Phase::Commit,
            }),
        });
        assert_eq!(e.code(), VfmigCode::InDoubt);
        assert!(
            e.message().contains("Ask the destination"),
            "{}",
            e.message()
        );
    }
}
