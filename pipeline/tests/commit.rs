//! The end of a session (docs/PROTOCOL.md, section 5.1) under faults: a device refusing an arc
//! at the commit point, a destination failing to resume, the link cut on either side of the
//! commit, a bit flipped on the wire. Each case must end with exactly one side holding the state
//! (never both running it, never neither holding it), and both sides must agree on what
//! happened or both say they are in doubt.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    AbortReason, DestinationOptions, DestinationSession, FinalOutcome, Phase, PipelineError,
    Report, RollbackAction, Side, SourceOptions, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, FailArc, Faults, Profile};
use vfmig_vfio::{DeviceState, MigrationDevice, Transition};
use vfmig_wire::FrameKind;

mod common;
use common::{proxy, Fault};

fn source_options() -> SourceOptions {
    SourceOptions {
        timeout: Duration::from_secs(5),
        precopy: false,
        ..common::source_options()
    }
}

fn destination_options() -> DestinationOptions {
    DestinationOptions {
        timeout: Duration::from_secs(5),
        ..common::destination_options()
    }
}

fn device(name: &str, seed: u64) -> EmulatedDevice {
    EmulatedDevice::new(EmulatedConfig {
        name: name.to_owned(),
        size: 4 << 20,
        seed,
        profile: Profile::Mixed,
        precopy: None,
        ..EmulatedConfig::default()
    })
    .expect("emulated device")
}

struct Ended {
    source: Result<Report, PipelineError>,
    sources: Vec<EmulatedDevice>,
    destination: Result<Report, PipelineError>,
    destinations: Vec<EmulatedDevice>,
    /// Per destination device: whether the session reset it.
    reset: Vec<bool>,
}

/// Runs both sides; the source connects to `via(destination address)` (a proxy, or the
/// destination itself).
fn migrate(
    sources: Vec<EmulatedDevice>,
    sopts: SourceOptions,
    dopts: DestinationOptions,
    arm: impl FnOnce(&[EmulatedDevice]),
    via: impl FnOnce(SocketAddr) -> SocketAddr,
) -> Ended {
    let destinations: Vec<EmulatedDevice> = sources
        .iter()
        .map(|d| d.destination().expect("destination device"))
        .collect();
    arm(&destinations);
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = via(listener.local_addr());
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(destinations, dopts);
        let r = s.run(&listener);
        let reset = s
            .reset_steps()
            .iter()
            .map(|r| matches!(r.action, RollbackAction::Reset { .. }))
            .collect();
        (r, reset, s.into_devices())
    });
    let mut src = SourceSession::new(sources, sopts);
    let source = src.run(addr);
    let (destination, reset, destinations) = dst.join().unwrap();
    Ended {
        source,
        sources: src.into_devices(),
        destination,
        destinations,
        reset,
    }
}

fn state(d: &mut EmulatedDevice) -> DeviceState {
    d.state().unwrap()
}

/// The source runs again with its own state; the destination was reset (it holds no copy).
fn assert_source_holds_the_state(e: &mut Ended, digests: &[Option<[u8; 32]>]) {
    for (d, before) in e.sources.iter_mut().zip(digests) {
        assert_eq!(state(d), DeviceState::Running, "source {}", d.name());
        assert_eq!(
            &d.state_digest(),
            before,
            "source {} kept its state",
            d.name()
        );
    }
    // Reset, not resumed: a reset destination device holds none of the migrated state.
    assert_eq!(e.reset, vec![true; e.destinations.len()]);
    for d in &mut e.destinations {
        assert_eq!(state(d), DeviceState::Running, "destination {}", d.name());
    }
}

/// Both sides hold the state in STOP, neither runs it.
fn assert_both_hold_stopped(e: &mut Ended) {
    for (s, d) in e.sources.iter_mut().zip(e.destinations.iter_mut()) {
        assert_eq!(state(s), DeviceState::Stop, "source {}", s.name());
        assert_eq!(state(d), DeviceState::Stop, "destination {}", d.name());
        assert_eq!(s.state_digest(), d.state_digest());
    }
}

#[test]
fn source_device_failing_stop_copy_to_stop_after_the_destination_prepared_aborts_and_the_destination_resets(
) {
    let src = device("emu0", 3);
    let digests = vec![src.state_digest()];
    src.set_faults(Faults {
        fail_arc: Some(FailArc {
            arc: Transition {
                from: DeviceState::StopCopy,
                to: DeviceState::Stop,
            },
            to_error: false,
            once: true,
        }),
        ..Faults::default()
    });
    let mut e = migrate(
        vec![src],
        source_options(),
        destination_options(),
        |_| {},
        |a| a,
    );
    assert!(
        matches!(
            &e.source,
            Err(PipelineError::Device {
                phase: Phase::Acknowledge,
                ..
            })
        ),
        "{:?}",
        e.source
    );
    // The destination had prepared its device (RESUMING -> STOP passed) and then got the abort:
    // an ordinary failure, not in doubt, because no commit was ever sent.
    assert!(
        matches!(
            &e.destination,
            Err(PipelineError::PeerAborted {
                reason: AbortReason::SourceDevice,
                ..
            })
        ),
        "{:?}",
        e.destination
    );
    assert_source_holds_the_state(&mut e, &digests);
}

#[test]
fn destination_failing_to_resume_after_the_commit_resets_first_and_the_source_rolls_back() {
    // Two devices without P2P, allowed: the destination resumes them one by one, and the second
    // refuses STOP -> RUNNING.
    let mut cfg = device("a", 1).config();
    cfg.p2p = false;
    let a = EmulatedDevice::new(cfg.clone()).unwrap();
    cfg.name = "b".into();
    cfg.seed = 2;
    let b = EmulatedDevice::new(cfg).unwrap();
    let digests = vec![a.state_digest(), b.state_digest()];
    let mut e = migrate(
        vec![a, b],
        SourceOptions {
            allow_without_p2p: true,
            ..source_options()
        },
        DestinationOptions {
            allow_without_p2p: true,
            resume_devices: true,
            ..destination_options()
        },
        |d| {
            d[1].set_faults(Faults {
                fail_arc: Some(FailArc {
                    arc: Transition {
                        from: DeviceState::Stop,
                        to: DeviceState::Running,
                    },
                    to_error: true,
                    once: false,
                }),
                ..Faults::default()
            })
        },
        |a| a,
    );
    assert!(
        matches!(&e.source, Err(PipelineError::DestinationResumeFailed)),
        "{:?}",
        e.source
    );
    assert!(
        matches!(
            &e.destination,
            Err(PipelineError::Device {
                phase: Phase::Commit,
                ..
            })
        ),
        "{:?}",
        e.destination
    );
    for (d, before) in e.sources.iter_mut().zip(&digests) {
        assert_eq!(state(d), DeviceState::Running, "source {}", d.name());
        assert_eq!(&d.state_digest(), before);
    }
    // Device "a" had resumed before "b" failed: it was reset too, so nothing runs the
    // migrated state on the destination.
    assert_eq!(e.reset, vec![true, true]);
    for d in &mut e.destinations {
        assert_eq!(state(d), DeviceState::Running, "destination {}", d.name());
    }
}

#[test]
fn link_cut_as_the_commit_leaves_leaves_both_sides_in_doubt_holding_the_state_in_stop() {
    let src = device("emu0", 5);
    let mut e = migrate(
        vec![src],
        source_options(),
        destination_options(),
        |_| {},
        |a| proxy(a, Fault::CutToDestination(FrameKind::Commit)),
    );
    assert!(
        matches!(
            &e.source,
            Err(PipelineError::InDoubt {
                side: Side::Source,
                ..
            })
        ),
        "{:?}",
        e.source
    );
    assert!(
        matches!(
            &e.destination,
            Err(PipelineError::InDoubt {
                side: Side::Destination,
                ..
            })
        ),
        "{:?}",
        e.destination
    );
    assert!(e.source.as_ref().unwrap_err().in_doubt_guidance().is_some());
    assert_both_hold_stopped(&mut e);
    // Both in doubt means the source sent commit (docs/PROTOCOL.md, 5.1): the destination is
    // resumed, and its device accepts RUNNING with the migrated state.
    e.destinations[0].set_state(DeviceState::Running).unwrap();
    assert_eq!(
        e.sources[0].state_digest(),
        e.destinations[0].state_digest()
    );
}

#[test]
fn link_cut_before_the_outcome_reaches_the_source_leaves_only_the_source_in_doubt() {
    let src = device("emu0", 6);
    let mut e = migrate(
        vec![src],
        source_options(),
        destination_options(),
        |_| {},
        |a| proxy(a, Fault::CutToSource(FrameKind::Outcome)),
    );
    // The destination saw the commit: the decision is known there, and it holds the state.
    let report = e.destination.as_ref().expect("destination committed");
    assert_eq!(report.outcome, Some(FinalOutcome::Held));
    assert!(
        matches!(
            &e.source,
            Err(PipelineError::InDoubt {
                side: Side::Source,
                ..
            })
        ),
        "{:?}",
        e.source
    );
    assert_both_hold_stopped(&mut e);
}

#[test]
fn link_cut_before_the_last_prepared_reaches_the_source_aborts_there_and_the_destination_is_in_doubt(
) {
    let src = device("emu0", 7);
    let digests = vec![src.state_digest()];
    let mut e = migrate(
        vec![src],
        source_options(),
        destination_options(),
        |_| {},
        |a| proxy(a, Fault::CutToSource(FrameKind::DevicePrepared)),
    );
    // The source never had every device prepared: it decides abort and runs again.
    assert!(
        !matches!(&e.source, Ok(_) | Err(PipelineError::InDoubt { .. })),
        "{:?}",
        e.source
    );
    for (d, before) in e.sources.iter_mut().zip(&digests) {
        assert_eq!(state(d), DeviceState::Running);
        assert_eq!(&d.state_digest(), before);
    }
    // The destination prepared and cannot tell an abort from a lost commit: it keeps its copy in
    // STOP and does not run it.
    assert!(
        matches!(
            &e.destination,
            Err(PipelineError::InDoubt {
                side: Side::Destination,
                ..
            })
        ),
        "{:?}",
        e.destination
    );
    assert_eq!(state(&mut e.destinations[0]), DeviceState::Stop);
}

#[test]
fn a_bit_flipped_on_the_wire_fails_both_sides_and_the_source_keeps_the_state() {
    let src = device("emu0", 8);
    let digests = vec![src.state_digest()];
    let mut e = migrate(
        vec![src],
        source_options(),
        destination_options(),
        |_| {},
        |a| proxy(a, Fault::FlipData),
    );
    assert!(e.source.is_err(), "{:?}", e.source);
    assert!(e.destination.is_err(), "{:?}", e.destination);
    assert!(!matches!(&e.source, Err(PipelineError::InDoubt { .. })));
    assert!(!matches!(
        &e.destination,
        Err(PipelineError::InDoubt { .. })
    ));
    assert_source_holds_the_state(&mut e, &digests);
}

/// Both sessions after a run, with their results.
type Sessions = (
    SourceSession<EmulatedDevice>,
    Result<Report, PipelineError>,
    DestinationSession<EmulatedDevice>,
    Result<Report, PipelineError>,
);

/// Runs both sides through `fault` and gives back the sessions themselves, to finish an in-doubt
/// end with the library's calls.
fn migrate_keeping_sessions(
    seed: u64,
    fault: Fault,
    dopts: DestinationOptions,
    dst_faults: Faults,
) -> Sessions {
    let src = device("emu0", seed);
    let dst = src.destination().unwrap();
    dst.set_faults(dst_faults);
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let via = proxy(listener.local_addr(), fault);
    let d = thread::spawn(move || {
        let mut s = DestinationSession::new(vec![dst], dopts);
        let r = s.run(&listener);
        (s, r)
    });
    let mut s = SourceSession::new(vec![src], source_options());
    let r = s.run(via);
    let (ds, dr) = d.join().unwrap();
    (s, r, ds, dr)
}

/// [`migrate_keeping_sessions`] with default options and no device fault.
fn cut_keeping_sessions(seed: u64, fault: Fault) -> Sessions {
    migrate_keeping_sessions(seed, fault, destination_options(), Faults::default())
}

#[test]
fn both_in_doubt_is_finished_by_resuming_the_destination_and_never_the_source() {
    let (mut s, sr, mut d, dr) =
        cut_keeping_sessions(11, Fault::CutToDestination(FrameKind::Commit));
    assert!(matches!(sr, Err(PipelineError::InDoubt { .. })), "{sr:?}");
    assert!(matches!(dr, Err(PipelineError::InDoubt { .. })), "{dr:?}");
    // Neither side starts another migration over state that may be the only copy.
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(matches!(
        d.receive(&listener),
        Err(PipelineError::WrongStep { .. })
    ));
    assert!(matches!(
        s.start(listener.local_addr()),
        Err(PipelineError::WrongStep { .. })
    ));
    // The source sent commit: the destination resumes; the source may not also run.
    d.resume().unwrap();
    assert_eq!(d.devices_mut()[0].state().unwrap(), DeviceState::Running);
    assert!(matches!(
        d.reset_devices(),
        Err(PipelineError::WrongStep { .. })
    ));
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Stop);
    assert_eq!(s.devices()[0].state_digest(), d.devices()[0].state_digest());
}

#[test]
fn a_failed_source_and_an_in_doubt_destination_are_finished_by_resetting_the_destination() {
    let (mut s, sr, mut d, dr) =
        cut_keeping_sessions(12, Fault::CutToSource(FrameKind::DevicePrepared));
    assert!(
        !matches!(sr, Ok(_) | Err(PipelineError::InDoubt { .. })),
        "{sr:?}"
    );
    assert!(matches!(dr, Err(PipelineError::InDoubt { .. })), "{dr:?}");
    // Not in doubt on the source: nothing to roll back by hand (it already runs).
    assert!(matches!(
        s.roll_back_devices(),
        Err(PipelineError::WrongStep { .. })
    ));
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Running);
    let steps = d.reset_devices().unwrap();
    assert!(matches!(steps[0].action, RollbackAction::Reset { .. }));
    assert_eq!(d.devices_mut()[0].state().unwrap(), DeviceState::Running);
}

#[test]
fn a_source_in_doubt_whose_destination_failed_to_resume_is_rolled_back_by_the_library() {
    // The destination fails to resume after the commit, resets its device and says so; that
    // outcome is lost, so the source is in doubt. The destination's failure tells the operator
    // to roll the source back.
    let (mut s, sr, d, dr) = migrate_keeping_sessions(
        13,
        Fault::CutToSource(FrameKind::Outcome),
        DestinationOptions {
            resume_devices: true,
            ..destination_options()
        },
        Faults {
            fail_arc: Some(FailArc {
                arc: Transition {
                    from: DeviceState::Stop,
                    // A P2P device resumes through RUNNING_P2P.
                    to: DeviceState::RunningP2p,
                },
                to_error: true,
                once: false,
            }),
            ..Faults::default()
        },
    );
    assert!(
        matches!(
            dr,
            Err(PipelineError::Device {
                phase: Phase::Commit,
                ..
            })
        ),
        "{dr:?}"
    );
    assert!(matches!(
        d.reset_steps()[0].action,
        RollbackAction::Reset { .. }
    ));
    assert!(matches!(sr, Err(PipelineError::InDoubt { .. })), "{sr:?}");
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Stop);
    let steps = s.roll_back_devices().unwrap();
    assert!(matches!(steps[0].action, RollbackAction::Walked { .. }));
    assert_eq!(s.devices_mut()[0].state().unwrap(), DeviceState::Running);
}

#[test]
fn after_a_commit_the_source_closes_cleanly_and_sends_no_abort() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(AtomicBool::new(false));
    let fault = Fault::RecordToDestination(kinds.clone(), ended.clone());
    let e = migrate(
        vec![device("emu0", 21)],
        source_options(),
        destination_options(),
        |_| {},
        |a| proxy(a, fault),
    );
    e.source.as_ref().expect("source committed");
    e.destination.as_ref().expect("destination committed");
    // The source's side of the connection ends when its session is gone (bounded wait).
    for _ in 0..1000 {
        if ended.load(Ordering::SeqCst) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(ended.load(Ordering::SeqCst), "the source never closed");
    let kinds = kinds.lock().unwrap().clone();
    let commit = kinds
        .iter()
        .position(|&k| k == FrameKind::Commit as u8)
        .expect("a commit was sent");
    assert!(
        !kinds[commit..].contains(&(FrameKind::Abort as u8)),
        "an Abort followed the Commit: {kinds:?}"
    );
}
