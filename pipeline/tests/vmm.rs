//! The library as a VMM drives it (issue 13): the step API on the source, switchover-ack gating,
//! the phases the progress callback reports, the destination's VMM deciding when the devices
//! run and the source learning that outcome, and downtime honesty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, FinalOutcome, Phase, PipelineError, PrecopyLimit,
    Progress, SourceOptions, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, PrecopyInfoVersion};
use vfmig_vfio::{DeviceState, MigrationDevice};
use vfmig_wire::FrameKind;

mod common;
use common::{destination_options, precopy_device, proxy, source_options, Fault};

type DestinationThread = thread::JoinHandle<(
    Result<vfmig_pipeline::Report, PipelineError>,
    Vec<EmulatedDevice>,
)>;

/// Starts a destination thread that runs the whole session; returns its address and handle.
fn destination(
    sources: &[EmulatedDevice],
    opts: DestinationOptions,
) -> (std::net::SocketAddr, DestinationThread) {
    let targets: Vec<EmulatedDevice> = sources.iter().map(|d| d.destination().unwrap()).collect();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let h = thread::spawn(move || {
        let mut s = DestinationSession::new(targets, opts);
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    (addr, h)
}

#[test]
fn step_mode_switches_over_only_when_the_vmm_says_so_after_pausing_its_vcpus() {
    let sources = vec![precopy_device("a", 1), precopy_device("b", 2)];
    let (addr, dst) = destination(&sources, destination_options());
    let mut s = SourceSession::new(sources, source_options());
    let vcpus_paused = AtomicBool::new(false);
    s.start(addr).unwrap();
    // Pre-copy until every device's initial data is out and acknowledged; the library would
    // switch over by itself much earlier (`switchover_due`), but in step mode it waits.
    let mut polls_while_due = 0;
    loop {
        let st = s.status().unwrap();
        assert_eq!(st.phase, Phase::PreCopy);
        assert!(!vcpus_paused.load(Ordering::SeqCst));
        for d in s.devices_mut() {
            // The guest still runs: so do its devices.
            assert_eq!(d.state().unwrap(), DeviceState::PreCopy);
        }
        let initial_out = st.devices.iter().all(|d| d.initial_bytes == 0);
        if initial_out && st.switchover_acked && st.switchover_due {
            polls_while_due += 1;
            if polls_while_due == 20 {
                break;
            }
        }
    }
    vcpus_paused.store(true, Ordering::SeqCst);
    s.switchover().unwrap();
    for d in s.devices_mut() {
        assert!(vcpus_paused.load(Ordering::SeqCst));
        assert!(
            !d.state().unwrap().is_running(),
            "a device runs after the switchover"
        );
    }
    let st = s.status().unwrap();
    assert_eq!(st.phase, Phase::StopCopy);
    let report = s.finish().unwrap();
    assert_eq!(report.outcome, Some(FinalOutcome::Held));
    assert!(report.devices.iter().all(|d| d.precopy_bytes >= 4 << 20));
    let (dr, dsts) = dst.join().unwrap();
    dr.unwrap();
    let srcs = s.into_devices();
    for (a, b) in srcs.iter().zip(&dsts) {
        assert_eq!(a.state_digest(), b.state_digest());
    }
}

#[test]
fn automatic_switchover_is_held_back_until_the_destination_acks() {
    let sources = vec![precopy_device("a", 3)];
    let (addr, dst) = destination(&sources, destination_options());
    let release = Arc::new(AtomicBool::new(false));
    let via = proxy(
        addr,
        Fault::HoldToSource(FrameKind::SwitchoverAck, release.clone()),
    );
    let mut s = SourceSession::new(
        sources,
        SourceOptions {
            // A budget any estimate fits: only the missing ack can hold the switchover.
            max_downtime: Duration::from_secs(60),
            ..source_options()
        },
    );
    s.start(via).unwrap();
    let mut polls_after_initial = 0;
    while polls_after_initial < 50 {
        let st = s.status().unwrap();
        if st.devices.iter().all(|d| d.initial_bytes == 0) {
            polls_after_initial += 1;
        }
        assert!(!st.switchover_acked);
        assert!(!st.switchover_due, "switchover due without the ack: {st:?}");
    }
    release.store(true, Ordering::SeqCst);
    while !s.status().unwrap().switchover_due {}
    let st = s.status().unwrap();
    assert!(st.switchover_acked && st.devices[0].switchover_acked);
    s.switchover().unwrap();
    s.finish().unwrap();
    dst.join().unwrap().0.unwrap();
}

#[test]
fn new_initial_data_after_a_reinit_is_acknowledged_again_before_the_switchover() {
    // PRECOPY_INFOv2: once its initial_bytes was seen at 0 the device re-initialises, and its
    // whole state is initial data again.
    let src = EmulatedDevice::new(
        EmulatedConfig::new("reinit", 256 << 10, 4)
            .with_block_size(16 << 10)
            .with_precopy_info(PrecopyInfoVersion::V2, Some(0)),
    )
    .unwrap();
    let (addr, dst) = destination(std::slice::from_ref(&src), destination_options());
    let acks = Arc::new(AtomicU64::new(0));
    let via = proxy(
        addr,
        Fault::CountToSource(FrameKind::SwitchoverAck, acks.clone()),
    );
    let mut s = SourceSession::new(vec![src], source_options());
    let report = s.run(via).unwrap();
    dst.join().unwrap().0.unwrap();
    assert_eq!(report.devices[0].precopy_reinits, 1);
    // One InitialDataSent marker, and one ack, per round of initial data.
    assert_eq!(acks.load(Ordering::SeqCst), 2);
}

#[test]
fn progress_reports_every_phase_of_the_source_in_order_with_its_bytes() {
    let sources = vec![precopy_device("a", 4)];
    let (addr, dst) = destination(&sources, destination_options());
    let seen: Arc<Mutex<Vec<(Phase, u64)>>> = Arc::default();
    let log = seen.clone();
    let mut s = SourceSession::new(
        sources,
        SourceOptions {
            progress: Some(Arc::new(move |p: &Progress| {
                let bytes = p.devices.iter().map(|d| d.raw_bytes).sum();
                log.lock().unwrap().push((p.phase, bytes));
            })),
            ..source_options()
        },
    );
    let report = s.run(addr).unwrap();
    dst.join().unwrap().0.unwrap();
    let seen = seen.lock().unwrap();
    let mut phases: Vec<Phase> = seen.iter().map(|(p, _)| *p).collect();
    phases.dedup();
    assert_eq!(
        phases,
        [
            Phase::Setup,
            Phase::PreCopy,
            Phase::StopCopy,
            Phase::Commit,
            Phase::Done
        ]
    );
    // Bytes only grow, and the last report carries the final figure.
    assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1));
    assert_eq!(seen.last().unwrap().1, report.raw_bytes);
}

#[test]
fn the_destination_vmm_resumes_after_the_commit_and_the_source_reports_that_outcome() {
    let sources = vec![precopy_device("a", 5), precopy_device("b", 6)];
    let targets: Vec<EmulatedDevice> = sources.iter().map(|d| d.destination().unwrap()).collect();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let vmm_resumed = Arc::new(AtomicBool::new(false));
    let flag = vmm_resumed.clone();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(targets, destination_options());
        s.receive(&listener).unwrap();
        // Committed: the devices hold the state in STOP until the VMM (its RAM landed) says.
        for d in s.devices_mut() {
            assert_eq!(d.state().unwrap(), DeviceState::Stop);
        }
        s.resume().unwrap();
        for d in s.devices_mut() {
            assert_eq!(d.state().unwrap(), DeviceState::Running);
        }
        flag.store(true, Ordering::SeqCst);
        let report = s.finish(FinalOutcome::Resumed).unwrap();
        assert_eq!(report.outcome, Some(FinalOutcome::Resumed));
        s.into_devices()
    });
    let mut s = SourceSession::new(sources, source_options());
    let report = s.run(addr).unwrap();
    // The outcome reached the source only after the VMM resumed.
    assert!(vmm_resumed.load(Ordering::SeqCst));
    assert_eq!(report.outcome, Some(FinalOutcome::Resumed));
    let dsts = dst.join().unwrap();
    for (a, b) in s.into_devices().iter_mut().zip(&dsts) {
        assert_eq!(a.state().unwrap(), DeviceState::Stop);
        assert_eq!(a.state_digest(), b.state_digest());
    }
}

#[test]
fn a_downtime_above_max_downtime_is_reported_and_max_precopy_can_abort() {
    let sources = vec![precopy_device("a", 7)];
    let (addr, dst) = destination(&sources, destination_options());
    let mut s = SourceSession::new(
        sources,
        SourceOptions {
            precopy: false,
            max_downtime: Duration::from_nanos(1),
            ..source_options()
        },
    );
    let report = s.run(addr).unwrap();
    assert!(report.downtime.unwrap() > Duration::from_nanos(1));
    assert!(report.max_downtime_exceeded);
    dst.join().unwrap().0.unwrap();

    let sources = vec![precopy_device("b", 8)];
    let (addr, dst) = destination(&sources, destination_options());
    let mut s = SourceSession::new(
        sources,
        SourceOptions {
            max_precopy: Duration::ZERO,
            on_max_precopy: PrecopyLimit::Abort,
            // No STOP_COPY estimate fits (the device's state is never empty).
            max_downtime: Duration::from_nanos(1),
            ..source_options()
        },
    );
    let e = s.run(addr).unwrap_err();
    assert!(matches!(e, PipelineError::PrecopyTooLong { .. }), "{e:?}");
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Running);
    assert!(dst.join().unwrap().0.is_err());
}

#[test]
fn steps_out_of_order_are_refused_without_touching_the_devices() {
    let mut s = SourceSession::new(vec![precopy_device("a", 9)], source_options());
    assert!(matches!(
        s.switchover(),
        Err(PipelineError::WrongStep {
            step: "switchover",
            phase: None
        })
    ));
    assert!(matches!(
        s.finish(),
        Err(PipelineError::WrongStep { step: "finish", .. })
    ));
    assert!(!s.abort());
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Running);
}
