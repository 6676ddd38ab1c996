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
