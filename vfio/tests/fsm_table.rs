//! The FSM path function against an independent transcription of the kernel's
//! `vfio_from_fsm_table` and `vfio_mig_get_next_state()` (drivers/vfio/vfio_main.c), for all 64
//! (from, to) pairs under all 8 capability sets.

use vfmig_vfio::{next_state, path, DeviceState, FsmError, MigrationCaps, Transition};

// Raw uAPI values, as the kernel's table is written.
const ERROR: usize = 0;
const STOP: usize = 1;
const RUNNING: usize = 2;
const STOP_COPY: usize = 3;
const RESUMING: usize = 4;
const RUNNING_P2P: usize = 5;
const PRE_COPY: usize = 6;
const PRE_COPY_P2P: usize = 7;

/// `vfio_from_fsm_table`, row = current, column = target, indexed by raw value.
/// Columns: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P.
const KERNEL_TABLE: [[usize; 8]; 8] = [
    /* ERROR */
    [ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR],
    /* STOP */
    [
        ERROR,
        STOP,
        RUNNING_P2P,
        STOP_COPY,
        RESUMING,
        RUNNING_P2P,
        RUNNING_P2P,
        RUNNING_P2P,
    ],
    /* RUNNING */
    [
        ERROR,
        RUNNING_P2P,
        RUNNING,
        RUNNING_P2P,
        RUNNING_P2P,
        RUNNING_P2P,
        PRE_COPY,
        RUNNING_P2P,
    ],
    /* STOP_COPY */
    [ERROR, STOP, STOP, STOP_COPY, STOP, STOP, ERROR, ERROR],
    /* RESUMING */
    [ERROR, STOP, STOP, STOP, RESUMING, STOP, STOP, STOP],
    /* RUNNING_P2P */
    [
        ERROR,
        STOP,
        RUNNING,
        STOP,
        STOP,
        RUNNING_P2P,
        RUNNING,
        PRE_COPY_P2P,
    ],
    /* PRE_COPY */
    [
        ERROR,
        RUNNING,
        RUNNING,
        PRE_COPY_P2P,
        RUNNING,
        RUNNING,
        PRE_COPY,
        PRE_COPY_P2P,
    ],
    /* PRE_COPY_P2P */
    [
        ERROR,
        RUNNING_P2P,
        RUNNING_P2P,
        STOP_COPY,
        RUNNING_P2P,
        RUNNING_P2P,
        PRE_COPY,
        PRE_COPY_P2P,
    ],
];

const STOP_COPY_F: u64 = 1;
const P2P_F: u64 = 2;
const PRE_COPY_F: u64 = 4;

/// `state_flags_table`; ERROR needs `~0` (never satisfiable).
const STATE_FLAGS: [u64; 8] = [
    u64::MAX,
    STOP_COPY_F,
    STOP_COPY_F,
    STOP_COPY_F,
    STOP_COPY_F,
    STOP_COPY_F | P2P_F,
    STOP_COPY_F | PRE_COPY_F,
    STOP_COPY_F | P2P_F | PRE_COPY_F,
];

fn supported(state: usize, flags: u64) -> bool {
    STATE_FLAGS[state] & flags == STATE_FLAGS[state]
}

/// The kernel's `vfio_mig_get_next_state()`, returning `Err(())` for -EINVAL.
fn kernel_next(cur: usize, new: usize, flags: u64) -> Result<usize, ()> {
    if !supported(cur, flags) || !supported(new, flags) {
        return Err(());
    }
    let mut next = KERNEL_TABLE[cur][new];
    while !supported(next, flags) {
        next = KERNEL_TABLE[next][new];
        if next == ERROR {
            break;
        }
    }
    if next == ERROR {
        Err(())
    } else {
        Ok(next)
    }
}

/// How a driver loop (`while (cur != new)`) walks the kernel's answer.
fn kernel_path(cur: usize, new: usize, flags: u64) -> Result<Vec<(usize, usize)>, ()> {
    let mut arcs = Vec::new();
    if !supported(cur, flags) || !supported(new, flags) {
        return Err(());
    }
    let mut at = cur;
    while at != new {
        let next = kernel_next(at, new, flags)?;
        arcs.push((at, next));
        at = next;
        assert!(arcs.len() <= 8, "kernel table loops from {cur} to {new}");
    }
    Ok(arcs)
}

fn raw(s: DeviceState) -> usize {
    s.as_raw() as usize
}

#[test]
fn path_matches_kernel_for_all_64_pairs_and_8_capability_sets() {
    let mut checked = 0;
    let mut legal = 0;
    let mut longest = 0;
    for caps in MigrationCaps::all_subsets() {
        for from in DeviceState::ALL {
            for to in DeviceState::ALL {
                let ours = path(from, to, caps);
                let theirs = kernel_path(raw(from), raw(to), caps.bits());
                match (&ours, &theirs) {
                    (Ok(arcs), Ok(kernel_arcs)) => {
                        let got: Vec<(usize, usize)> =
                            arcs.iter().map(|a| (raw(a.from), raw(a.to))).collect();
                        assert_eq!(&got, kernel_arcs, "{from} -> {to} with {caps}");
                        longest = longest.max(arcs.len());
                        legal += 1;
                    }
                    (Err(_), Err(())) => {}
                    _ => panic!("{from} -> {to} with {caps}: ours {ours:?}, kernel {theirs:?}"),
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8 * 64);
    // With every capability: 7 legal states, 49 legal pairs minus those with no path
    // (STOP_COPY -> PRE_COPY, STOP_COPY -> PRE_COPY_P2P) = 47; a sanity floor overall.
    assert!(legal > 47, "only {legal} legal pairs");
    assert!(longest <= vfmig_vfio::state::MAX_PATH_ARCS);
}

#[test]
fn every_state_and_arc_of_the_full_capability_set_is_exercised() {
    let caps = MigrationCaps::ALL;
    let mut arcs_seen = std::collections::HashSet::new();
    for from in DeviceState::ALL {
        for to in DeviceState::ALL {
            if let Ok(arcs) = path(from, to, caps) {
                arcs_seen.extend(arcs);
            }
        }
    }
    // The kernel's table has 15 distinct single-step arcs among the 7 legal states.
    let expected: Vec<Transition> = (1..8)
        .flat_map(|f| (1..8).map(move |t| (f, t)))
        .filter(|&(f, t)| f != t && KERNEL_TABLE[f][t] == t)
        .map(|(f, t)| Transition {
            from: DeviceState::from_raw(u32::try_from(f).unwrap()).unwrap(),
            to: DeviceState::from_raw(u32::try_from(t).unwrap()).unwrap(),
        })
        .collect();
    assert_eq!(expected.len(), 15);
    for arc in &expected {
        assert!(arcs_seen.contains(arc), "arc {arc} never used by any path");
    }
    assert_eq!(arcs_seen.len(), expected.len());
}

#[test]
fn error_is_never_a_legal_target_nor_a_state_to_leave_by_set() {
    for caps in MigrationCaps::all_subsets() {
        for s in DeviceState::ALL {
            assert!(path(s, DeviceState::Error, caps).is_err());
            assert!(path(DeviceState::Error, s, caps).is_err());
        }
    }
}

#[test]
fn stop_copy_to_pre_copy_has_no_path() {
    let err = path(
        DeviceState::StopCopy,
        DeviceState::PreCopy,
        MigrationCaps::ALL,
    )
    .unwrap_err();
    assert_eq!(
        err,
        FsmError::NoPath {
            from: DeviceState::StopCopy,
            to: DeviceState::PreCopy,
            caps: MigrationCaps::ALL
        }
    );
}

#[test]
fn running_to_stop_without_p2p_skips_running_p2p() {
    let arcs = path(
        DeviceState::Running,
        DeviceState::StopCopy,
        MigrationCaps::STOP_COPY,
    )
    .unwrap();
    let states: Vec<DeviceState> = arcs.iter().map(|a| a.to).collect();
    assert_eq!(states, [DeviceState::Stop, DeviceState::StopCopy]);
    let arcs = path(
        DeviceState::Running,
        DeviceState::StopCopy,
        MigrationCaps::ALL,
    )
    .unwrap();
    let states: Vec<DeviceState> = arcs.iter().map(|a| a.to).collect();
    assert_eq!(
        states,
        [
            DeviceState::RunningP2p,
            DeviceState::Stop,
            DeviceState::StopCopy
        ]
    );
}

#[test]
fn missing_capability_names_the_state() {
    let err = path(
        DeviceState::Running,
        DeviceState::PreCopy,
        MigrationCaps::STOP_COPY,
    )
    .unwrap_err();
    assert_eq!(
        err,
        FsmError::UnsupportedState {
            state: DeviceState::PreCopy,
            caps: MigrationCaps::STOP_COPY
        }
    );
}

#[test]
fn data_fd_arcs_follow_from_which_states_hold_a_data_fd() {
    // A state holds a data fd when it saves (PRE_COPY*, STOP_COPY) or resumes.
    let has_fd = |s: DeviceState| s.is_saving() || s == DeviceState::Resuming;
    for caps in MigrationCaps::all_subsets() {
        for from in DeviceState::ALL {
            for to in DeviceState::ALL {
                if from == to || next_state(from, to, caps).ok() != Some(to) {
                    continue;
                }
                let arc = Transition { from, to };
                assert_eq!(
                    arc.opens_data_fd(),
                    !has_fd(from) && has_fd(to),
                    "opens: caps {caps}: {arc}"
                );
                assert_eq!(
                    arc.continues_data_fd(),
                    has_fd(from) && has_fd(to),
                    "continues: caps {caps}: {arc}"
                );
                assert_eq!(
                    arc.closes_data_fd(),
                    has_fd(from) && !has_fd(to),
                    "closes: caps {caps}: {arc}"
                );
            }
        }
    }
}
