//! The VFIO migration v2 finite state machine, exactly as the kernel walks it.
//!
//! `DeviceState` mirrors `enum vfio_device_mig_state`; [`MigrationCaps`] mirrors the flags of
//! `VFIO_DEVICE_FEATURE_MIGRATION`. [`next_state`] is a transcription of the kernel's
//! `vfio_mig_get_next_state()` and [`path`] applies it until the target is reached, giving the arcs a
//! caller must `SET` one at a time (each a [`Transition`]). [`FsmError`] is what the table refuses.

use std::fmt;

vfmig_enum::int_enum! {
    /// A device migration state (`enum vfio_device_mig_state`). The discriminants are the uAPI
    /// values; the names (`name()`, `Display`) are the kernel's spelling, e.g. `RUNNING_P2P`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum DeviceState: u32 {
        /// `VFIO_DEVICE_STATE_ERROR`: never a legal target; left only through `VFIO_DEVICE_RESET`.
        Error = 0 => "ERROR",
        /// `VFIO_DEVICE_STATE_STOP`: no DMA, no working MMIO, state is quiescent.
        Stop = 1 => "STOP",
        /// `VFIO_DEVICE_STATE_RUNNING`: normal operation.
        Running = 2 => "RUNNING",
        /// `VFIO_DEVICE_STATE_STOP_COPY`: stopped; the data fd streams the complete device state.
        StopCopy = 3 => "STOP_COPY",
        /// `VFIO_DEVICE_STATE_RESUMING`: stopped; the data fd accepts a state stream.
        Resuming = 4 => "RESUMING",
        /// `VFIO_DEVICE_STATE_RUNNING_P2P`: RUNNING, but initiates no DMA / P2P to other devices.
        RunningP2p = 5 => "RUNNING_P2P",
        /// `VFIO_DEVICE_STATE_PRE_COPY`: RUNNING while the data fd streams initial and dirty state.
        PreCopy = 6 => "PRE_COPY",
        /// `VFIO_DEVICE_STATE_PRE_COPY_P2P`: RUNNING_P2P while the data fd keeps streaming.
        PreCopyP2p = 7 => "PRE_COPY_P2P",
    }
}

impl DeviceState {
    /// The uAPI value (`VFIO_DEVICE_STATE_*`): the uAPI's spelling of [`DeviceState::code`].
    pub const fn as_raw(self) -> u32 {
        self.code()
    }

    /// Parses a uAPI value; `None` for values the kernel does not define. The uAPI's spelling
    /// of [`DeviceState::from_code`].
    pub const fn from_raw(raw: u32) -> Option<DeviceState> {
        DeviceState::from_code(raw)
    }

    /// The kernel's spelling, e.g. `RUNNING_P2P`: [`DeviceState::name`].
    pub const fn kernel_name(self) -> &'static str {
        self.name()
    }

    /// The capabilities a device must have for this state to exist (`state_flags_table`).
    /// `None` for ERROR, which no capability set makes a legal state to be in or go to.
    pub const fn required_caps(self) -> Option<MigrationCaps> {
        Some(match self {
            DeviceState::Error => return None,
            DeviceState::Stop
            | DeviceState::Running
            | DeviceState::StopCopy
            | DeviceState::Resuming => MigrationCaps::STOP_COPY,
            DeviceState::RunningP2p => MigrationCaps::STOP_COPY.union(MigrationCaps::P2P),
            DeviceState::PreCopy => MigrationCaps::STOP_COPY.union(MigrationCaps::PRE_COPY),
            DeviceState::PreCopyP2p => MigrationCaps::ALL,
        })
    }

    /// Whether a device with `caps` supports this state.
    pub const fn supported_by(self, caps: MigrationCaps) -> bool {
        match self.required_caps() {
            Some(req) => caps.contains(req),
            None => false,
        }
    }

    /// States in which the data fd streams device state out (PRE_COPY, PRE_COPY_P2P, STOP_COPY).
    pub const fn is_saving(self) -> bool {
        matches!(
            self,
            DeviceState::PreCopy | DeviceState::PreCopyP2p | DeviceState::StopCopy
        )
    }

    /// States in which the device runs from the guest's point of view (it may change its state).
    pub const fn is_running(self) -> bool {
        matches!(
            self,
            DeviceState::Running
                | DeviceState::RunningP2p
                | DeviceState::PreCopy
                | DeviceState::PreCopyP2p
        )
    }

    /// States in which the device initiates P2P DMA to other devices (RUNNING and PRE_COPY).
    pub const fn initiates_p2p(self) -> bool {
        matches!(self, DeviceState::Running | DeviceState::PreCopy)
    }

    /// States in which the device's MMIO works (all running states). STOP-like states discard
    /// MMIO writes and read zeros.
    pub const fn mmio_works(self) -> bool {
        self.is_running()
    }
}

/// Migration capability flags from `VFIO_DEVICE_FEATURE_MIGRATION` (`VFIO_MIGRATION_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationCaps(u64);

impl MigrationCaps {
    /// `VFIO_MIGRATION_STOP_COPY` (1): the mandatory base.
    pub const STOP_COPY: MigrationCaps = MigrationCaps(1);
    /// `VFIO_MIGRATION_P2P` (2): RUNNING_P2P and PRE_COPY_P2P.
    pub const P2P: MigrationCaps = MigrationCaps(2);
    /// `VFIO_MIGRATION_PRE_COPY` (4): PRE_COPY and PRE_COPY_P2P.
    pub const PRE_COPY: MigrationCaps = MigrationCaps(4);
    /// Every capability the uAPI defines.
    pub const ALL: MigrationCaps = MigrationCaps(7);
    /// No capability (a device without migration support).
    pub const NONE: MigrationCaps = MigrationCaps(0);

    /// From the raw `flags` field; unknown bits are kept so they can be reported.
    pub const fn from_bits_retain(bits: u64) -> MigrationCaps {
        MigrationCaps(bits)
    }

    /// The raw flags.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether all flags of `other` are set.
    pub const fn contains(self, other: MigrationCaps) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bitwise union.
    pub const fn union(self, other: MigrationCaps) -> MigrationCaps {
        MigrationCaps(self.0 | other.0)
    }

    /// Bitwise difference: flags of `self` not in `other`.
    pub const fn difference(self, other: MigrationCaps) -> MigrationCaps {
        MigrationCaps(self.0 & !other.0)
    }

    /// Every subset of the defined flags, `NONE` first: the 8 capability sets a test must cover.
    pub fn all_subsets() -> impl Iterator<Item = MigrationCaps> {
        (0..8u64).map(MigrationCaps)
    }
}

impl std::ops::BitOr for MigrationCaps {
    type Output = MigrationCaps;
    fn bitor(self, rhs: MigrationCaps) -> MigrationCaps {
        self.union(rhs)
    }
}

impl fmt::Debug for MigrationCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for MigrationCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (flag, name) in [
            (MigrationCaps::STOP_COPY, "STOP_COPY"),
            (MigrationCaps::P2P, "P2P"),
            (MigrationCaps::PRE_COPY, "PRE_COPY"),
        ] {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !MigrationCaps::ALL.0;
        if unknown != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{unknown:#x}")?;
            first = false;
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

/// The state machine refused a request before any SET was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsmError {
    /// The state needs capabilities the device lacks (or is ERROR, which is never legal).
    #[error("state {state} is not supported by a device with migration capabilities {caps}")]
    UnsupportedState {
        /// The state asked for (or the current state).
        state: DeviceState,
        /// The device's capabilities.
        caps: MigrationCaps,
    },
    /// The kernel's table gives no legal path (e.g. STOP_COPY -> PRE_COPY).
    #[error("no legal path from {from} to {to} for a device with capabilities {caps}")]
    NoPath {
        /// Current state.
        from: DeviceState,
        /// Requested state.
        to: DeviceState,
        /// The device's capabilities.
        caps: MigrationCaps,
    },
}

/// One `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET: from one state to an adjacent one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transition {
    /// The state the device is in before the SET.
    pub from: DeviceState,
    /// The state the SET asks for.
    pub to: DeviceState,
}

impl Transition {
    /// Arcs on which the kernel creates a new data fd and returns it from the SET.
    pub const fn opens_data_fd(self) -> bool {
        matches!(
            (self.from, self.to),
            (DeviceState::Running, DeviceState::PreCopy)
                | (DeviceState::RunningP2p, DeviceState::PreCopyP2p)
                | (DeviceState::Stop, DeviceState::StopCopy)
                | (DeviceState::Stop, DeviceState::Resuming)
        )
    }

    /// Arcs on which the data fd's stream continues (the same fd; drivers return it again or -1):
    /// every arc between two saving states. PRE_COPY -> STOP_COPY is an arc only for devices
    /// without P2P (the others pass through PRE_COPY_P2P).
    pub const fn continues_data_fd(self) -> bool {
        matches!(
            (self.from, self.to),
            (DeviceState::PreCopy, DeviceState::PreCopyP2p)
                | (DeviceState::PreCopyP2p, DeviceState::PreCopy)
                | (DeviceState::PreCopyP2p, DeviceState::StopCopy)
                | (DeviceState::PreCopy, DeviceState::StopCopy)
        )
    }

    /// Arcs that end the data fd's stream (after them the old fd is useless).
    pub const fn closes_data_fd(self) -> bool {
        matches!(
            (self.from, self.to),
            (DeviceState::StopCopy, DeviceState::Stop)
                | (DeviceState::Resuming, DeviceState::Stop)
                | (DeviceState::PreCopy, DeviceState::Running)
                | (DeviceState::PreCopyP2p, DeviceState::RunningP2p)
        )
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

/// The kernel's `vfio_from_fsm_table[cur][new]`: the next state toward `target` assuming every
/// capability is present.
const fn table(cur: DeviceState, target: DeviceState) -> DeviceState {
    use DeviceState::*;
    if matches!(target, Error) {
        return Error;
    }
    if cur as u32 == target as u32 {
        return cur;
    }
    match cur {
        Stop => match target {
            StopCopy => StopCopy,
            Resuming => Resuming,
            _ => RunningP2p,
        },
        Running => match target {
            PreCopy => PreCopy,
            _ => RunningP2p,
        },
        PreCopy => match target {
            PreCopyP2p | StopCopy => PreCopyP2p,
            _ => Running,
        },
        PreCopyP2p => match target {
            PreCopy => PreCopy,
            StopCopy => StopCopy,
            _ => RunningP2p,
        },
        StopCopy => match target {
            PreCopy | PreCopyP2p => Error,
            _ => Stop,
        },
        Resuming => Stop,
        RunningP2p => match target {
            Stop | StopCopy | Resuming => Stop,
            Running | PreCopy => Running,
            _ => PreCopyP2p,
        },
        Error => Error,
    }
}

/// The kernel's `vfio_mig_get_next_state()`: the next state to SET on the way from `cur` to
/// `target` for a device with `caps`. Returns `cur` when `cur == target`.
pub fn next_state(
    cur: DeviceState,
    target: DeviceState,
    caps: MigrationCaps,
) -> Result<DeviceState, FsmError> {
    if !cur.supported_by(caps) {
        return Err(FsmError::UnsupportedState { state: cur, caps });
    }
    if !target.supported_by(caps) {
        return Err(FsmError::UnsupportedState {
            state: target,
            caps,
        });
    }
    let mut next = table(cur, target);
    // ERROR is never supported, so this loop ends at ERROR at the latest (ERROR maps to ERROR, but
    // ERROR's unsupported-ness is checked below before looping again).
    while !next.supported_by(caps) {
        if next == DeviceState::Error {
            break;
        }
        next = table(next, target);
    }
    if next == DeviceState::Error {
        return Err(FsmError::NoPath {
            from: cur,
            to: target,
            caps,
        });
    }
    Ok(next)
}

/// The longest path the table can produce (checked by the table test), plus headroom.
pub const MAX_PATH_ARCS: usize = 8;

/// The arcs from `cur` to `target`, in the order the kernel would take them. Empty when
/// `cur == target`.
pub fn path(
    cur: DeviceState,
    target: DeviceState,
    caps: MigrationCaps,
) -> Result<Vec<Transition>, FsmError> {
    let mut arcs = Vec::with_capacity(4);
    let mut at = cur;
    while at != target {
        let next = next_state(at, target, caps)?;
        // The table is acyclic toward any reachable target; a longer path is a transcription bug.
        assert!(
            arcs.len() < MAX_PATH_ARCS,
            "FSM path from {cur} to {target} exceeds {MAX_PATH_ARCS} arcs"
        );
        arcs.push(Transition { from: at, to: next });
        at = next;
    }
    // `next_state` checks support of cur and target; a same-state "path" must be checked too.
    if arcs.is_empty() && !cur.supported_by(caps) {
        return Err(FsmError::UnsupportedState { state: cur, caps });
    }
    Ok(arcs)
}

#[cfg(test)]
mod code_tests {
    use super::DeviceState;
    use vfio_bindings::bindings::vfio as b;

    #[test]
    fn states_round_trip_as_the_uapi_values_with_the_kernel_names() {
        let uapi = [
            (b::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR, "ERROR"),
            (b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP, "STOP"),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
                "RUNNING",
            ),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
                "STOP_COPY",
            ),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
                "RESUMING",
            ),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
                "RUNNING_P2P",
            ),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
                "PRE_COPY",
            ),
            (
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
                "PRE_COPY_P2P",
            ),
        ];
        assert_eq!(
            DeviceState::ALL.len(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_NR as usize
        );
        for (state, (value, name)) in DeviceState::ALL.into_iter().zip(uapi) {
            assert_eq!((state.as_raw(), u32::from(state)), (value, value));
            assert_eq!(DeviceState::try_from(value), Ok(state));
            assert_eq!(DeviceState::from_raw(value), Some(state));
            assert_eq!(
                (state.to_string().as_str(), state.kernel_name()),
                (name, name)
            );
        }
        let nr = b::vfio_device_mig_state_VFIO_DEVICE_STATE_NR;
        assert_eq!(DeviceState::try_from(nr).unwrap_err().value, nr);
        assert_eq!(DeviceState::from_raw(u32::MAX), None);
    }
}
