//! The only module that drives `vfmig-pipeline`: runs a source or destination session with
//! progress, cancellation and the report, for `send`, `recv` and `demo`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, Notice, Phase, PipelineError,
    Progress as PipelineProgress, Report, SourceOptions, SourceSession, Stage,
};
use vfmig_transport::{Listener, SessionConfig, TransportError};
use vfmig_vfio::{DeviceState, MigrationDevice};

use crate::cli::CompressArg;
use crate::error::{CliError, DeviceLabel};
use crate::progress::Progress;
use crate::report::{limiting, per_sec, DeviceJson, ReportJson, StagesJson};
use crate::signals::Cancel;

/// What the source side needs besides its devices.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// The receiver's addresses, tried in turn until one answers.
    pub connect: Vec<SocketAddr>,
    /// The receiver as the operator named it (for messages).
    pub host: String,
    /// Transport settings.
    pub session: SessionConfig,
    /// `--compress`.
    pub compress: CompressArg,
    /// `--precopy`.
    pub precopy: bool,
    /// `--max-downtime`.
    pub max_downtime: Duration,
    /// `--max-precopy-time`.
    pub max_precopy: Duration,
    /// `--on-max-precopy`.
    pub on_max_precopy: vfmig_pipeline::PrecopyLimit,
    /// `--max-bandwidth`.
    pub max_bandwidth: Option<vfmig_pipeline::Rate>,
    /// `--timeout`.
    pub timeout: Duration,
    /// `--allow-non-p2p`.
    pub allow_without_p2p: bool,
    /// `--workers`.
    pub workers: usize,
}

/// What the destination side needs besides its devices and listener.
#[derive(Debug, Clone)]
pub struct DestinationPlan {
    /// Transport settings.
    pub session: SessionConfig,
    /// `--timeout`.
    pub timeout: Duration,
    /// `--workers`.
    pub workers: usize,
}

fn compress(c: CompressArg) -> vfmig_pipeline::Compress {
    match c {
        CompressArg::Auto => vfmig_pipeline::Compress::Auto,
        CompressArg::None => vfmig_pipeline::Compress::None,
        CompressArg::Lz4 => vfmig_pipeline::Compress::Lz4,
        CompressArg::Zstd(l) => vfmig_pipeline::Compress::Zstd(l),
    }
}

/// The phase as both sides name it (see `progress`).
fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Setup => "handshake",
        Phase::PreCopy => "pre-copy",
        Phase::StopCopy => "stop-copy",
        Phase::Resume => "resuming",
        Phase::Acknowledge => "verifying",
        Phase::Commit => "committing",
        Phase::Done => "done",
        Phase::Rollback => "rollback",
    }
}

/// Prints each pipeline notice once per process (the demo runs both sides in one).
fn notice_fn(progress: &Progress) -> vfmig_pipeline::NoticeFn {
    static UNPINNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let bars = progress.clone();
    Arc::new(move |n: Notice| {
        if let Notice::UnpinnedBuffers { errno, .. } = n {
            if !UNPINNED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let why = nix::errno::Errno::from_raw(errno).desc().to_lowercase();
                bars.println(&format!(
                    "vfmig: notice: cannot pin the buffer pool ({why}: RLIMIT_MEMLOCK is below it and \
                     CAP_IPC_LOCK is missing); using unregistered buffers. Raise the limit \
                     (`ulimit -l`, systemd LimitMEMLOCK=) to pin them"
                ));
            }
        }
    })
}

fn progress_fn(progress: &Progress) -> Option<vfmig_pipeline::ProgressFn> {
    if !progress.is_enabled() {
        return None;
    }
    let bars = progress.clone();
    Some(Arc::new(move |p: &PipelineProgress| {
        for (i, d) in p.devices.iter().enumerate() {
            let phase = if d.done { "done" } else { phase_name(d.phase) };
            bars.update(i, d.raw_bytes, d.estimated_total, phase);
        }
    }))
}

/// The JSON/summary report of a finished session.
pub fn report_json(
    role: &'static str,
    peer: Option<SocketAddr>,
    report: &Report,
    labels: &[DeviceLabel],
    accepted: bool,
) -> ReportJson {
    let secs = report.elapsed.as_secs_f64();
    let downtime_ms = report.downtime.map(|d| d.as_secs_f64() * 1000.0);
    let stages = StagesJson {
        device: report.stages.data_fd.as_secs_f64() * 1000.0,
        codec: report.stages.codec.as_secs_f64() * 1000.0,
        network: report.stages.network.as_secs_f64() * 1000.0,
        buffer_wait: report.stages.waiting_downstream.as_secs_f64() * 1000.0,
    };
    let limiting_stage = Some(match report.limiting_stage {
        Stage::DataFd => "device",
        Stage::Codec => "codec",
        Stage::Network => "network",
    })
    .or_else(|| limiting(&stages));
    let devices = report
        .devices
        .iter()
        .enumerate()
        .map(|(index, d)| DeviceJson {
            index,
            name: d.name.clone(),
            kind: labels.get(index).map_or("?", |l| l.kind),
            raw_bytes: d.raw_bytes,
            wire_bytes: d.wire_bytes,
            precopy_bytes: d.precopy_bytes,
            ratio: crate::report::ratio(d.raw_bytes, d.wire_bytes),
            throughput_bytes_per_sec: per_sec(d.raw_bytes, secs),
            downtime_ms,
            // A destination device that accepted its state is in STOP, or RUNNING once the VMM
            // (or `resumed` with `resume-devices`) resumed it after the commit.
            accepted: accepted
                && (role != "recv"
                    || d.final_state
                        .is_none_or(|s| matches!(s, DeviceState::Stop | DeviceState::Running))),
            final_state: d.final_state.map(DeviceState::kernel_name),
        })
        .collect();
    ReportJson {
        outcome: if accepted { "ok" } else { "failed" },
        role,
        error: None,
        exit_code: if accepted {
            0
        } else {
            crate::error::EXIT_FAILED
        },
        guidance: None,
        max_downtime_exceeded: report.max_downtime_exceeded,
        peer: peer.map(|p| p.to_string()),
        elapsed_ms: secs * 1000.0,
        downtime_ms,
        raw_bytes: report.raw_bytes,
        wire_bytes: report.wire_bytes,
        ratio: crate::report::ratio(report.raw_bytes, report.wire_bytes),
        throughput_bytes_per_sec: report.throughput_bps,
        limiting_stage,
        stages_busy_ms: stages,
        devices,
        started_at_ns: crate::report::process_started_at_ns(),
        first_data_at_ns: report.first_data_at.map(crate::report::epoch_ns),
        final_ack_at_ns: report.final_ack_at.map(crate::report::epoch_ns),
    }
}

/// The source session's options for `plan` (progress bars and notices through `progress`).
pub fn source_options(plan: &SourcePlan, progress: &Progress) -> SourceOptions {
    SourceOptions {
        compress: compress(plan.compress),
        precopy: plan.precopy,
        max_downtime: plan.max_downtime,
        max_precopy: plan.max_precopy,
        on_max_precopy: plan.on_max_precopy,
        max_bandwidth: plan.max_bandwidth,
        timeout: plan.timeout,
        allow_without_p2p: plan.allow_without_p2p,
        codec_workers: plan.workers,
        session: plan.session.clone(),
        progress: progress_fn(progress),
        notice: Some(notice_fn(progress)),
        ..SourceOptions::default()
    }
}

/// The destination session's options for `plan` (progress bars and notices through
/// `progress`).
pub fn destination_options(plan: &DestinationPlan, progress: &Progress) -> DestinationOptions {
    DestinationOptions {
        timeout: plan.timeout,
        codec_workers: plan.workers,
        allow_without_p2p: true,
        session: plan.session.clone(),
        progress: progress_fn(progress),
        notice: Some(notice_fn(progress)),
        ..DestinationOptions::default()
    }
}

/// A pipeline failure as the CLI's error, naming the devices.
pub fn migration_error(e: PipelineError, labels: &[DeviceLabel]) -> CliError {
    CliError::Migration {
        error: Box::new(e),
        devices: labels.to_vec(),
        report_printed: false,
    }
}

/// Whether a source run failed at TCP connect, so that the receiver's next address may answer.
pub(crate) fn is_connect_failure(e: &PipelineError) -> bool {
    matches!(
        e,
        PipelineError::Transport {
            source: TransportError::Connect { .. },
            ..
        }
    )
}

/// Runs the source side to the destination's outcome, trying the receiver's
/// addresses in turn until one accepts the connection; gives back the address that answered
/// (or the last one tried) and the devices.
pub fn run_source<D: MigrationDevice>(
    plan: &SourcePlan,
    devices: Vec<D>,
    labels: &[DeviceLabel],
    progress: &Progress,
    cancel: &Cancel,
) -> (Result<Report, CliError>, Option<SocketAddr>, Vec<D>) {
    let opts = source_options(plan, progress);
    let mut session = SourceSession::new(devices, opts);
    let handle = session.cancel_handle();
    cancel.on_cancel(move || handle.cancel());
    let attempt = crate::addr::try_in_turn(
        &plan.connect,
        |a| session.run(a),
        |e| !is_connect_failure(e),
    );
    let (result, peer) = match attempt {
        Ok((a, report)) => (Ok(report), Some(a)),
        Err(mut failures) => {
            let peer = failures.last().map(|f| f.0);
            let e = if failures.len() > 1 && failures.iter().all(|f| is_connect_failure(&f.1)) {
                CliError::Unreachable {
                    host: plan.host.clone(),
                    attempts: failures
                        .into_iter()
                        .filter_map(|(a, e)| match e {
                            PipelineError::Transport { source, .. } => Some((a, source)),
                            _ => None,
                        })
                        .collect(),
                }
            } else {
                match failures.pop() {
                    Some((_, e)) => migration_error(e, labels),
                    None => CliError::Unreachable {
                        host: plan.host.clone(),
                        attempts: Vec::new(),
                    },
                }
            };
            (Err(e), peer)
        }
    };
    (result, peer, session.into_devices())
}

/// Accepts one source on `listener` (calling `on_connected` with its address once it is
/// authenticated) and runs the destination side to the end; gives the devices back.
pub fn run_destination<D: MigrationDevice>(
    plan: &DestinationPlan,
    listener: &Listener,
    devices: Vec<D>,
    labels: &[DeviceLabel],
    progress: &Progress,
    cancel: &Cancel,
    on_connected: impl FnOnce(SocketAddr),
) -> (Result<Report, CliError>, Vec<D>) {
    let opts = destination_options(plan, progress);
    let mut session = DestinationSession::new(devices, opts);
    // Declare the devices, so that a source whose devices cannot pair with them is refused in
    // the handshake, before any device on either side moves.
    let mut cfg = plan.session.clone();
    cfg.declared_devices = Some(session.declarations());
    // Strangers (port scans, other protocols, wrong keys) are dropped with one line each; the
    // wait for the real source goes on until --accept-timeout.
    let mut dropped = |peer: SocketAddr, e: &vfmig_transport::TransportError| {
        progress.println(&format!(
            "vfmig: dropped connection from {peer}: {}",
            crate::error::describe_transport(e)
        ));
    };
    let recv = match listener.accept_reporting(&cfg, &mut dropped) {
        Ok(r) => r,
        Err(e) => return (Err(CliError::Transport(e)), session.into_devices()),
    };
    on_connected(recv.peer());
    let handle = session.cancel_handle();
    cancel.on_cancel(move || handle.cancel());
    let result = session
        .run_session(recv)
        .map_err(|e| migration_error(e, labels));
    (result, session.into_devices())
}
