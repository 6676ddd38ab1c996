//! `vfmig send` and `vfmig recv`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vfmig_pipeline::Report;
use vfmig_transport::Listener;
use vfmig_vfio::{DeviceState, MigrationDevice};

use crate::addr::Endpoint;
use crate::cli::{PrecopyLimitArg, RecvArgs, SendArgs};
use crate::devices::{self, Side};
use crate::error::{CliError, DeviceLabel};
use crate::migrate::{self, DestinationPlan, SourcePlan};
use crate::progress::{self, Progress};
use crate::report::{DeviceJson, ReportJson};
use crate::signals::Cancel;

/// Where each device was left when the session ended (kernel state names; `None` if unreadable).
fn final_states(devices: &mut [Box<dyn MigrationDevice>]) -> Vec<Option<&'static str>> {
    devices
        .iter_mut()
        .map(|d| d.state().ok().map(DeviceState::kernel_name))
        .collect()
}

/// Prints the outcome of a session: the JSON report on stdout, or the summary on stderr. With
/// `--json`, a migration failure's object is printed here, with each device's `final_state`.
/// What [`finish`] reports on and where.
struct Output<'a> {
    labels: &'a [DeviceLabel],
    states: &'a [Option<&'static str>],
    progress: &'a Progress,
    json: bool,
    quiet: bool,
}

fn finish(
    role: &'static str,
    peer: Option<SocketAddr>,
    result: Result<Report, CliError>,
    out: &Output<'_>,
) -> Result<(), CliError> {
    let Output {
        labels,
        states,
        progress,
        json,
        quiet,
    } = *out;
    match result {
        Ok(report) => {
            let raw: Vec<u64> = report.devices.iter().map(|d| d.raw_bytes).collect();
            progress.complete(&raw, "done");
            let mut j = migrate::report_json(role, peer, &report, labels, true);
            for (d, s) in j.devices.iter_mut().zip(states) {
                d.final_state = *s;
            }
            if let (true, Some(d)) = (report.max_downtime_exceeded, report.downtime) {
                progress.println(&format!(
                    "vfmig: warning: downtime {:.1} ms exceeded --max-downtime",
                    d.as_secs_f64() * 1000.0
                ));
            }
            if json {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", j.to_json());
            } else if !quiet {
                crate::err_text(&j.summary());
            }
            Ok(())
        }
        Err(CliError::Migration {
            error,
            devices,
            report_printed: false,
        }) if json => {
            progress.clear();
            let e = CliError::Migration {
                error,
                devices,
                report_printed: true,
            };
            let mut j = ReportJson::failure(role, &e);
            j.peer = peer.map(|p| p.to_string());
            j.devices = labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    DeviceJson::untouched(
                        i,
                        l.name.clone(),
                        l.kind,
                        states.get(i).copied().flatten(),
                    )
                })
                .collect();
            crate::out_line(&j.to_json());
            Err(e)
        }
        Err(e) => {
            progress.clear();
            Err(e)
        }
    }
}

/// Reads where the devices were left and prints the outcome ([`finish`]).
fn conclude(
    role: &'static str,
    peer: Option<SocketAddr>,
    result: Result<Report, CliError>,
    labels: &[DeviceLabel],
    devices: &mut [Box<dyn MigrationDevice>],
    progress: &Progress,
    c: &crate::cli::CommonArgs,
) -> Result<(), CliError> {
    let states = final_states(devices);
    let out = Output {
        labels,
        states: &states,
        progress,
        json: c.json,
        quiet: c.quiet,
    };
    finish(role, peer, result, &out)
}

/// The progress display the options ask for, starting in `phase`.
fn progress_for(
    c: &crate::cli::CommonArgs,
    names: &[String],
    totals: &[Option<u64>],
    phase: &str,
) -> Progress {
    Progress::new(
        progress::resolve(c.progress, c.json, c.quiet),
        names,
        totals,
        phase,
        Duration::from_secs(c.progress_interval),
    )
}

/// `vfmig send`.
pub fn send(a: SendArgs, cancel: &Cancel) -> Result<(), CliError> {
    let c = &a.common;
    let session = devices::session_config(c, false)?;
    let timeout = Duration::from_secs(c.timeout);
    let devs = devices::open(&c.devices, Side::Source, timeout, false)?;
    let names: Vec<String> = devs.labels.iter().map(|l| l.name.clone()).collect();
    let progress = progress_for(c, &names, &devs.totals, "connecting");
    let connect = a.connect.resolve().map_err(|source| CliError::Resolve {
        host: a.connect.host.clone().unwrap_or_default(),
        source,
    })?;
    let plan = SourcePlan {
        connect,
        host: a.connect.to_string(),
        session,
        compress: a.compress,
        precopy: a.precopy,
        max_downtime: Duration::from_millis(a.max_downtime),
        max_precopy: Duration::from_secs(a.max_precopy_time),
        on_max_precopy: match a.on_max_precopy {
            PrecopyLimitArg::Switchover => vfmig_pipeline::PrecopyLimit::Switchover,
            PrecopyLimitArg::Abort => vfmig_pipeline::PrecopyLimit::Abort,
        },
        max_bandwidth: a.max_bandwidth,
        timeout,
        allow_without_p2p: a.allow_non_p2p,
        workers: c
            .workers
            .map_or_else(vfmig_pipeline::default_codec_workers, usize::from),
    };
    let labels = devs.labels;
    let (result, peer, mut devices) =
        migrate::run_source(&plan, devs.list, &labels, &progress, cancel);
    conclude("send", peer, result, &labels, &mut devices, &progress, c)
}

/// Binds the first address of `at` that takes it (every address: IPv6 wildcard, then IPv4).
fn bind(at: &Endpoint) -> Result<Listener, CliError> {
    let addrs = at.resolve().map_err(|source| CliError::Resolve {
        host: at.host.clone().unwrap_or_default(),
        source,
    })?;
    crate::addr::try_in_turn(&addrs, Listener::bind, |_| false)
        .map(|(_, l)| l)
        .map_err(|mut failures| {
            // The first address is the one asked for (or the dual-stack wildcard).
            if failures.is_empty() {
                return CliError::Resolve {
                    host: at.to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                };
            }
            let (addr, source) = failures.swap_remove(0);
            CliError::Bind {
                addr,
                source: Box::new(source),
            }
        })
}

/// `vfmig recv`.
pub fn recv(a: RecvArgs, cancel: &Cancel) -> Result<(), CliError> {
    let c = &a.common;
    let mut session = devices::session_config(c, a.require_client_cert)?;
    session.accept_timeout = Duration::from_secs(a.accept_timeout);
    let timeout = Duration::from_secs(c.timeout);
    let devs = devices::open(&c.devices, Side::Destination, timeout, a.force)?;
    let listener = bind(&a.listen)?;
    say!("vfmig: listening on {}", listener.local_addr());

    // Until a source is connected there is nothing to roll back: a signal ends the wait at once,
    // reported like any other failure (the one line, and with --json the failure object).
    let connected = Arc::new(AtomicBool::new(false));
    {
        let connected = connected.clone();
        let json = c.json;
        cancel.on_cancel(move || {
            if !connected.load(Ordering::SeqCst) {
                let e = CliError::Interrupted;
                crate::fail("recv", &e, json);
                let _ = std::io::stdout().lock().flush();
                std::process::exit(i32::from(e.exit_code()));
            }
        });
    }
    let names: Vec<String> = devs.labels.iter().map(|l| l.name.clone()).collect();
    let progress = progress_for(c, &names, &devs.totals, "listening");
    let plan = DestinationPlan {
        session,
        timeout,
        workers: c
            .workers
            .map_or_else(vfmig_pipeline::default_codec_workers, usize::from),
    };
    let labels = devs.labels;
    let mut peer = None;
    let (result, mut devices) = migrate::run_destination(
        &plan,
        &listener,
        devs.list,
        &labels,
        &progress,
        cancel,
        |addr| {
            connected.store(true, Ordering::SeqCst);
            peer = Some(addr);
            progress.println(&format!("vfmig: source {addr} connected"));
            progress.set_phase("handshake");
        },
    );
    conclude("recv", peer, result, &labels, &mut devices, &progress, c)
}
