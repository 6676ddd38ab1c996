//! `vfmig demo`: a receiver thread and a sender in one process over loopback, emulated devices
//! with P2P traffic between them, and a summary that proves the result (the destination devices
//! accepted their state and their state digests equal the sources').

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use vfmig_transport::{Listener, SessionConfig};
use vfmig_vfio::emulated::{EmulatedDevice, P2pFabric};
use vfmig_vfio::{DeviceState, MigrationDevice};

use crate::cli::DemoArgs;
use crate::devices::{emu_config, Side};
use crate::error::{CliError, DeviceLabel};
use crate::migrate::{self, DestinationPlan, SourcePlan};
use crate::progress::{self, Progress};
use crate::report::ReportJson;
use crate::signals::Cancel;
use crate::spec::{EmuSpec, Precopy};
use crate::units::human_bytes;

/// Bytes per second each running demo device dirties (pre-copy then sends them again).
const DEMO_DIRTY_RATE: u64 = 8 << 20;
/// P2P rounds per second between the running demo devices.
const DEMO_P2P_ROUNDS: u64 = 2000;

/// Least RESUMING capacity of a demo destination device. The P2P traffic of the demo keeps
/// re-dirtying a small device during pre-copy, so its stream can be many times its state; the
/// emulated default (four times the state) made `vfmig demo --size 64K` fail with ENOMEM.
const DEMO_MIN_RESUME_CAPACITY: u64 = 64 << 20;
/// Session timeout of the demo.
const DEMO_TIMEOUT: Duration = Duration::from_secs(30);

fn open_err(index: usize, e: vfmig_vfio::emulated::EmulatedError) -> CliError {
    CliError::Emulated { index, source: e }
}

/// `vfmig demo`.
pub fn run(a: DemoArgs, cancel: &Cancel) -> Result<(), CliError> {
    let n = usize::from(a.devices);
    let spec = EmuSpec {
        size: a.size.div_ceil(4096) * 4096,
        seed: None,
        profile: a.profile,
        precopy: if a.no_precopy {
            Precopy::Off
        } else {
            Precopy::Whole
        },
        dirty_rate: if a.no_precopy {
            None
        } else {
            Some(DEMO_DIRTY_RATE)
        },
        p2p: true,
        precopy_info_v2: false,
        reinit_after: None,
        read_error_at: None,
        slow: None,
        refuse_resume: false,
        data_fd: vfmig_vfio::emulated::DataFdBackend::Fuse,
    };

    let mut src_list: Vec<EmulatedDevice> = Vec::with_capacity(n);
    let mut dst_list: Vec<EmulatedDevice> = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for i in 0..n {
        let mut cfg = emu_config(&spec, i, Side::Source);
        cfg.resume_capacity = Some(spec.size.saturating_mul(4).max(DEMO_MIN_RESUME_CAPACITY));
        let src = EmulatedDevice::new(cfg).map_err(|e| open_err(i, e))?;
        let dst = src.destination().map_err(|e| open_err(i, e))?;
        ports.push(src.p2p_port());
        labels.push(DeviceLabel {
            name: src.name().to_owned(),
            kind: "emu",
        });
        src_list.push(src);
        dst_list.push(dst);
    }

    let mut session = SessionConfig::default();
    if let Some(s) = a.streams {
        session.streams = usize::from(s);
    }
    session.timeout = DEMO_TIMEOUT;
    session.accept_timeout = DEMO_TIMEOUT;
    let listener =
        Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(CliError::Transport)?;
    let addr = listener.local_addr();

    let show = progress::resolve(a.progress, a.json, false);
    if !a.json {
        say!(
            "vfmig demo: {n} emulated device{} x {} ({} content{}{}) over {addr}, {} connection{}",
            if n == 1 { "" } else { "s" },
            human_bytes(spec.size),
            a.profile_name(),
            if a.no_precopy {
                ""
            } else {
                ", pre-copy while dirtying 8 MiB/s"
            },
            if n > 1 {
                ", P2P traffic between the devices"
            } else {
                ""
            },
            session.streams,
            if session.streams == 1 { "" } else { "s" },
        );
    }
    let names: Vec<String> = labels.iter().map(|l| l.name.clone()).collect();
    let totals: Vec<Option<u64>> = vec![Some(spec.size); n];
    let progress = Progress::new(show, &names, &totals, "connecting", Duration::from_secs(5));

    // P2P traffic between the running source devices for the whole migration.
    let fabric = P2pFabric::new(ports);
    let traffic = if n > 1 {
        fabric.spawn(DEMO_P2P_ROUNDS).ok()
    } else {
        None
    };

    let workers = a
        .workers
        .map_or_else(vfmig_pipeline::default_codec_workers, usize::from);
    let dst_plan = DestinationPlan {
        session: session.clone(),
        timeout: DEMO_TIMEOUT,
        workers,
    };
    let dst_labels = labels.clone();
    let dst_cancel = cancel.clone();
    let receiver = std::thread::Builder::new()
        .name("vfmig-demo-recv".into())
        .spawn(move || {
            let quiet = Progress::hidden();
            migrate::run_destination(
                &dst_plan,
                &listener,
                dst_list,
                &dst_labels,
                &quiet,
                &dst_cancel,
                |_| {},
            )
        })
        .map_err(|_| CliError::Verification {
            what: "cannot start the receiver thread".into(),
        })?;

    let plan = SourcePlan {
        connect: vec![addr],
        host: addr.to_string(),
        session,
        compress: a.compress,
        precopy: !a.no_precopy,
        max_downtime: Duration::from_millis(300),
        max_precopy: Duration::from_secs(60),
        on_max_precopy: vfmig_pipeline::PrecopyLimit::Switchover,
        max_bandwidth: None,
        timeout: DEMO_TIMEOUT,
        allow_without_p2p: false,
        workers,
    };
    let started = Instant::now();
    let (src_result, _, src_devices) =
        migrate::run_source(&plan, src_list, &labels, &progress, cancel);
    let (dst_result, mut dst_devices) = receiver.join().unwrap_or_else(|_| {
        (
            Err(CliError::Verification {
                what: "the receiver thread stopped unexpectedly".into(),
            }),
            Vec::new(),
        )
    });
    drop(traffic);
    let wall = started.elapsed();
    let report = match (src_result, dst_result) {
        (Ok(r), Ok(_)) => r,
        (Err(e), _) | (Ok(_), Err(e)) => {
            progress.clear();
            return Err(e);
        }
    };
    let raw: Vec<u64> = report.devices.iter().map(|d| d.raw_bytes).collect();
    progress.complete(&raw, "done");

    // Verification, independent of what the pipeline says: every destination device accepted
    // its state (it is in STOP after RESUMING -> STOP) and holds the same state as its source.
    let mut problems = Vec::new();
    if dst_devices.len() != src_devices.len() {
        problems.push("the receiver lost its devices".to_owned());
    }
    for (i, (s, d)) in src_devices.iter().zip(dst_devices.iter_mut()).enumerate() {
        let state = d.state().ok();
        if state != Some(DeviceState::Stop) {
            problems.push(format!("destination device {i} is in {state:?}, not STOP"));
        }
        let (sd, dd) = (s.state_digest(), d.state_digest());
        if sd.is_none() || sd != dd {
            problems.push(format!("device {i}: state digests differ"));
        }
    }
    let p2p = fabric.stats();

    let mut j = migrate::report_json("demo", Some(addr), &report, &labels, problems.is_empty());
    if a.json {
        crate::out_line(&j.to_json());
    } else {
        crate::err_text(&demo_summary(
            &mut j,
            &report.codec,
            wall,
            p2p.sent,
            p2p.lost,
            n,
            &problems,
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Verification {
            what: problems.join("; "),
        })
    }
}

fn demo_summary(
    j: &mut ReportJson,
    codec: &str,
    wall: Duration,
    p2p_sent: u64,
    p2p_lost: u64,
    devices: usize,
    problems: &[String],
) -> String {
    j.role = "migration";
    let mut s = j.summary();
    s.push_str(&format!(
        "  compression at the end: {codec}; wall time including set-up: {:.2} s\n",
        wall.as_secs_f64()
    ));
    if codec == "none" {
        s.push_str(
            "  (--compress auto sends raw when the CPU, not the link, limits, as on loopback; try --compress zstd:3)\n",
        );
    }
    if devices > 1 {
        let why = if p2p_lost == 0 {
            "every device reached RUNNING_P2P before any stopped"
        } else {
            "writes reached a device that was already stopped"
        };
        s.push_str(&format!(
            "  P2P: {p2p_sent} writes between the running devices, {p2p_lost} lost ({why})\n"
        ));
    }
    if problems.is_empty() {
        s.push_str(
            "  verification: OK: every destination device accepted its state (RESUMING -> STOP) and its state digest equals the source's\n",
        );
    } else {
        s.push_str(&format!(
            "  verification: FAILED: {}\n",
            problems.join("; ")
        ));
    }
    s
}

impl DemoArgs {
    fn profile_name(&self) -> &'static str {
        self.profile.as_str()
    }
}
