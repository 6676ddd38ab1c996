//! # vfmig-pipeline: moves device state from a source data fd to a destination data fd
//!
//! Owns: the io_uring data-fd reader and writer, the codec stage, the sessions a VMM drives
//! ([`SourceSession`], [`DestinationSession`]), the multi-device RUNNING_P2P ordering, rollback
//! and reports. Never touches: the wire format (vfmig-wire) or socket handling
//! (vfmig-transport); device ioctls stay behind [`vfmig_vfio::MigrationDevice`].
//!
//! Data in (source): each device's data fd, read with io_uring `ReadFixed` at offset -1 into the
//! transport's registered [`vfmig_transport::BufPool`]. Data out (source): frames handed to
//! [`vfmig_transport::SendSession::send`] in per-device sequence order. On the destination the
//! reverse: verified frames from [`vfmig_transport::RecvSession::recv`], decoded, written with
//! `WriteFixed` at offset -1 into each RESUMING data fd.
//!
//! ```text
//! reader (1 thread, 1 ring, 1 read in flight per fd) -> codec workers -> sender (resequence)
//!        -> transport ... transport -> receiver -> codec workers -> writer (resequence, 1 ring)
//! ```
//!
//! No `unsafe` here: io_uring submissions go through the transport's owned-buffer ring
//! (`vfmig_transport::uring`), the project's one audited io_uring module.
//!
//! # Features
//!
//! With default features the pipeline links `vfmig-vfio` without its `emulated` and `contract`
//! features: no emulated device and no FUSE server. Device DMA dirty tracking reads and writes
//! guest memory through [`GuestMemoryAccess`] (defined in `vfmig-vfio`, implemented by the VMM).
//! Feature `vm-memory` adds `VmGuestMemory`, that trait over vm-memory's `GuestMemory` (what
//! rust-vmm VMMs hold).
//!
//! # What a run guarantees
//!
//! - **Order.** One read in flight per data fd; chunks are numbered per device and handed to the
//!   transport in that order after the parallel codec stage; the destination writes them in the
//!   same order, one write in flight per fd.
//! - **Verification.** Every frame is CRC-checked by the transport; each stream ends with its
//!   length and stream digest, checked before the destination device is asked to validate its
//!   state (RESUMING -> STOP). Only then is `DevicePrepared` sent.
//! - **One decision point.** Once every device is prepared and every source device is in STOP, the
//!   source sends `Commit`; the destination resumes only after it and answers with its outcome,
//!   and only that counts as success on the source. Without a commit the destination resets. A
//!   side that cannot know the decision reports [`PipelineError::InDoubt`] and leaves its devices
//!   in STOP (docs/PROTOCOL.md, section 5.1): never both running, never the state lost.
//! - **Several devices.** Every source device reaches RUNNING_P2P (or PRE_COPY_P2P) before any
//!   stops; destination devices resume (if asked) STOP -> RUNNING_P2P for all before RUNNING for
//!   any. Devices without P2P are refused for multi-device runs unless overridden.
//! - **Failure.** Any failure before the decision (device, peer, timeout, cancel) aborts the
//!   session with an [`AbortReason`], walks source devices back to RUNNING (resetting those in
//!   ERROR) and resets destination devices; the error is a typed [`PipelineError`] and
//!   [`SourceSession::rollback_steps`] says what was done. The one exception is
//!   [`PipelineError::InDoubt`], where both sides keep their devices in STOP.
//! - **Memory.** Every queue is bounded and every buffer comes from the transport's fixed pool,
//!   so memory does not grow with the state size.
//!
//! # Example: migrate an emulated device over loopback
//!
//! A VMM runs [`SourceSession::run`] on its migration thread; the destination host runs
//! [`DestinationSession::run`]. Here both run in one process.
//!
//! ```
//! use std::time::Duration;
//! use vfmig_pipeline::{DestinationOptions, DestinationSession, SourceOptions, SourceSession};
//! use vfmig_transport::Listener;
//! use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice};
//! use vfmig_vfio::{DeviceState, MigrationDevice};
//!
//! let source = EmulatedDevice::new(EmulatedConfig { size: 4 << 20, ..Default::default() })?;
//! let target = source.destination()?;
//!
//! let listener = Listener::bind("127.0.0.1:0".parse()?)?;
//! let addr = listener.local_addr();
//! let destination = std::thread::spawn(move || {
//!     let mut session = DestinationSession::new(vec![target], DestinationOptions::default());
//!     let report = session.run(&listener);
//!     (report, session.into_devices())
//! });
//!
//! let mut session = SourceSession::new(vec![source], SourceOptions {
//!     max_downtime: Duration::from_millis(100),
//!     progress: Some(std::sync::Arc::new(|p: &vfmig_pipeline::Progress| {
//!         let _ = p.devices[0].raw_bytes;
//!     })),
//!     ..SourceOptions::default()
//! });
//! let report = session.run(addr)?;
//! let (dst_report, mut targets) = destination.join().expect("destination thread");
//! dst_report?;
//!
//! // The destination device validated the stream; both hold the same state.
//! let mut sources = session.into_devices();
//! assert_eq!(sources[0].state()?, DeviceState::Stop);
//! assert_eq!(targets[0].state()?, DeviceState::Stop);
//! assert_eq!(sources[0].state_digest(), targets[0].state_digest());
//! println!(
//!     "{} bytes, ratio {:.2}, downtime {:?}, limited by {:?}",
//!     report.raw_bytes, report.ratio, report.downtime, report.limiting_stage
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

//!
//! # Example: a VMM drives the switchover (step mode)
//!
//! The VMM streams two devices in pre-copy while its vCPUs run, polls
//! [`SourceSession::status`], pauses its vCPUs once the destination acknowledged the initial data
//! and the estimate fits, then calls [`SourceSession::switchover`] and
//! [`SourceSession::finish`]. The destination VMM resumes its devices after the commit
//! ([`DestinationSession::receive`], [`DestinationSession::resume`],
//! [`DestinationSession::finish`]); the source's report carries that outcome.
//! `examples/vmm_loop.rs` is the same with logging.
//!
//! ```
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! use vfmig_pipeline::{
//!     DestinationOptions, DestinationSession, FinalOutcome, SourceOptions, SourceSession,
//! };
//! use vfmig_transport::Listener;
//! use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice};
//! use vfmig_vfio::{DeviceState, MigrationDevice};
//!
//! let device = |name: &str, seed| EmulatedDevice::new(EmulatedConfig {
//!     name: name.into(), size: 2 << 20, seed, precopy: Some(u64::MAX), dirty_rate: 1 << 20,
//!     ..EmulatedConfig::default()
//! });
//! let sources = vec![device("gpu0", 1)?, device("nic0", 2)?];
//! let targets: Vec<_> = sources.iter().map(|d| d.destination()).collect::<Result<_, _>>()?;
//! let listener = Listener::bind("127.0.0.1:0".parse()?)?;
//! let addr = listener.local_addr();
//! let destination = std::thread::spawn(move || {
//!     let mut s = DestinationSession::new(targets, DestinationOptions::default());
//!     s.receive(&listener).expect("committed");
//!     // ... the VMM loads its RAM here ...
//!     s.resume().expect("devices resume");
//!     s.finish(FinalOutcome::Resumed).expect("outcome sent");
//! });
//!
//! let vcpus_paused = AtomicBool::new(false);
//! let mut s = SourceSession::new(sources, SourceOptions::default());
//! s.start(addr)?;
//! loop {
//!     let st = s.status()?;
//!     for d in s.devices_mut() {
//!         // Running vCPUs need running devices.
//!         assert!(vcpus_paused.load(Ordering::SeqCst) || d.state()?.is_running());
//!     }
//!     let initial_out = st.devices.iter().all(|d| d.initial_bytes == 0);
//!     if initial_out && st.switchover_acked && st.switchover_due {
//!         break;
//!     }
//! }
//! vcpus_paused.store(true, Ordering::SeqCst); // pause-before-switchover
//! s.switchover()?;
//! let report = s.finish()?;
//! destination.join().expect("destination");
//! assert_eq!(report.outcome, Some(FinalOutcome::Resumed));
//! for d in s.devices_mut() {
//!     assert_eq!(d.state()?, DeviceState::Stop);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]

mod adapt;
mod api;
mod codec;
pub mod cores;
mod destination;
mod digest;
mod dirty;
mod error;
mod guest;
mod initial;
mod reader;
mod report;
mod reseq;
mod rollback;
mod source;
mod stages;
mod stats;
mod status;
mod uring;
#[cfg(feature = "vm-memory")]
mod vm_memory;
mod watch;
mod writer;

#[cfg(test)]
mod flow_tests;

pub use api::{
    default_codec_workers, default_streams, streams_for_cores, workers_for_cores, CancelHandle,
    DestinationOptions, DeviceProgress, DeviceReport, Notice, NoticeFn, PrecopyLimit, Progress,
    ProgressFn, Rate, Report, RollbackAction, RollbackStep, SourceOptions, Stage, StageTimes,
    CORES_PER_STREAM, DEFAULT_CODEC_WORKERS_MAX, DEFAULT_STREAMS_MAX,
};
pub use codec::{Compress, DecodeFailure};
pub use destination::DestinationSession;
pub use dirty::{DirtyBitmap, DirtyReport, DirtySink, DirtyTracking, LoggingStarted};
pub use error::{Phase, PipelineError, Side};
pub use guest::{GuestMemoryAccess, GUEST_PAGE};
pub use reseq::SequenceError;
pub use source::SourceSession;
pub use status::{DeviceStatus, SourceStatus};
/// The one abort vocabulary (docs/PROTOCOL.md, section 5), re-exported from the wire crate.
pub use vfmig_wire::AbortReason;
/// What the destination did after the commit (docs/PROTOCOL.md, section 5.1).
pub use vfmig_wire::FinalOutcome;
#[cfg(feature = "vm-memory")]
pub use vm_memory::{VmGuestMemory, VmMemoryError};
