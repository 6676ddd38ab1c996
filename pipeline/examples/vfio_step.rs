//! A VMM's migration loop over vfmig's step API on real VFIO devices, one process per host.
//!
//! ```text
//! vfio_step recv <listen addr> <device>...   the destination VMM
//! vfio_step send <dest addr> <device>...     the source VMM
//! ```
//!
//! `<device>` is a VFIO device path (`/sys/bus/mdev/devices/<uuid>`, `/sys/bus/pci/devices/<bdf>`
//! or `/dev/vfio/devices/vfioN`); both sides name their devices in the same order. Each process
//! opens its devices once, as a VMM does (a VFIO group is open in one process at a time).
//!
//! The source streams its devices in pre-copy while its (fake) vCPUs run, polls `status` like
//! QEMU's `info migrate`, and switches over itself once every device's initial data is out and
//! acknowledged by the destination and the downtime estimate fits: it pauses its vCPUs first,
//! then calls `switchover`, then `finish`. The destination receives, waits for the commit,
//! resumes its devices, then its vCPUs, and reports the outcome. A fake vCPU pause flag is
//! checked against the device states at every step: a device never stops while the vCPUs run,
//! the source's devices never run after the switchover, and the destination's devices run only
//! after the commit.
//!
//! The nested-guest harness (`tools/mtty-harness/guest-step.sh`) runs it on four real mtty
//! devices. Exit status 0 = the migration succeeded and every check held.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, FinalOutcome, Phase, SourceOptions, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::{DeviceState, MigrationDevice, VfioDevice};

type Error = Box<dyn std::error::Error>;

/// The downtime budget the source VMM switches over within.
const BUDGET: Duration = Duration::from_millis(300);
/// After this much pre-copy the source switches over even if the estimate does not fit (the
/// acks must be in regardless).
const PRECOPY_LIMIT: Duration = Duration::from_secs(5);
/// The longest the source waits for the switchover to become ready before it aborts.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How often the source polls `status` (the API asks for at least every 100 ms).
const POLL: Duration = Duration::from_millis(20);
/// Longest time without progress at any step (TCG guests are slow).
const TIMEOUT: Duration = Duration::from_secs(60);

/// The guest's vCPUs, as far as migration cares.
struct Vcpus {
    paused: bool,
}

/// The VMM's invariant: running vCPUs need running devices.
fn check_running(vcpus: &Vcpus, devices: &mut [VfioDevice]) -> Result<(), Error> {
    for d in devices {
        let state = d.state()?;
        if !vcpus.paused && !state.is_running() {
            return Err(format!("{} is {state} while the vCPUs run", d.name()).into());
        }
    }
    Ok(())
}

/// Every device is in `want` (and the vCPUs are paused unless `want` runs).
fn check_all(
    vcpus: &Vcpus,
    devices: &mut [VfioDevice],
    want: DeviceState,
    when: &str,
) -> Result<(), Error> {
    check_running(vcpus, devices)?;
    for d in devices {
        let state = d.state()?;
        if state != want {
            return Err(format!("{} is {state} {when}, expected {want}", d.name()).into());
        }
        println!("STEP {}: {state} {when}", d.name());
    }
    Ok(())
}

fn open(paths: &[String]) -> Result<Vec<VfioDevice>, Error> {
    paths
        .iter()
        .map(|p| VfioDevice::open(p).map_err(|e| format!("{p}: {e}").into()))
        .collect()
}

fn destination(addr: SocketAddr, paths: &[String]) -> Result<(), Error> {
    let listener = Listener::bind(addr)?;
    let devices = open(paths)?;
    // The destination's vCPUs start paused and run only after the commit.
    let mut vcpus = Vcpus { paused: true };
    let mut s = DestinationSession::new(
        devices,
        DestinationOptions {
            timeout: TIMEOUT,
            ..DestinationOptions::default()
        },
    );
    println!("STEP destination: listening on {}", listener.local_addr());
    s.receive(&listener)?;
    // Committed: the source's devices never run again. The state is loaded and validated.
    check_all(
        &vcpus,
        s.devices_mut(),
        DeviceState::Stop,
        "after the commit",
    )?;
    // Load RAM (here: nothing), resume the devices, then the vCPUs, then tell the source.
    if let Err(e) = s.resume() {
        // Resets every device before the source learns it, so the source may run again.
        let _ = s.finish(FinalOutcome::ResumeFailed);
        return Err(e.into());
    }
    vcpus.paused = false;
    check_all(
        &vcpus,
        s.devices_mut(),
        DeviceState::Running,
        "after resume",
    )?;
    let report = s.finish(FinalOutcome::Resumed)?;
    println!(
        "STEP destination: {} bytes loaded into {} devices, resumed",
        report.raw_bytes,
        report.devices.len()
    );
    Ok(())
}

fn source(addr: SocketAddr, paths: &[String]) -> Result<(), Error> {
    let devices = open(paths)?;
    let mut vcpus = Vcpus { paused: false };
    let mut s = SourceSession::new(
        devices,
        SourceOptions {
            max_downtime: BUDGET,
            timeout: TIMEOUT,
            ..SourceOptions::default()
        },
    );
    check_all(
        &vcpus,
        s.devices_mut(),
        DeviceState::Running,
        "before start",
    )?;
    s.start(addr)?;
    let result = precopy_then_switchover(&mut s, &mut vcpus);
    if result.is_err() {
        // Walk the devices back to RUNNING and tell the destination, as a VMM would.
        s.abort();
        return result;
    }
    check_running(&vcpus, s.devices_mut())?;
    let report = s.finish()?;
    check_all(&vcpus, s.devices_mut(), DeviceState::Stop, "after finish")?;
    println!(
        "STEP source: {} bytes ({} in pre-copy), downtime {:?} (budget exceeded: {}), destination {:?}",
        report.raw_bytes,
        report.devices.iter().map(|d| d.precopy_bytes).sum::<u64>(),
        report.downtime,
        report.max_downtime_exceeded,
        report.outcome,
    );
    if report.outcome != Some(FinalOutcome::Resumed) {
        return Err(format!("the destination reported {:?}", report.outcome).into());
    }
    Ok(())
}

/// Polls `status` until the switchover is ready, then pauses the vCPUs and switches over.
fn precopy_then_switchover(
    s: &mut SourceSession<VfioDevice>,
    vcpus: &mut Vcpus,
) -> Result<(), Error> {
    let begun = Instant::now();
    let mut polls = 0u32;
    let mut last: Option<(Phase, bool, bool)> = None;
    loop {
        let st = s.status()?;
        polls += 1;
        check_running(vcpus, s.devices_mut())?;
        if st.phase == Phase::PreCopy {
            for d in s.devices_mut() {
                let state = d.state()?;
                if !matches!(state, DeviceState::PreCopy | DeviceState::PreCopyP2p) {
                    return Err(format!("{} is {state} during pre-copy", d.name()).into());
                }
            }
        }
        let initial_out = st.devices.iter().all(|d| d.initial_bytes == 0);
        let fits = st.estimated_downtime.is_some_and(|t| t <= BUDGET);
        let now = (st.phase, initial_out, st.switchover_acked);
        if last != Some(now) {
            println!(
                "STEP source: poll {polls}: {:?}, {} bytes sent, initial data out {initial_out}, \
                 acked {}, downtime estimate {:?}",
                st.phase,
                st.devices.iter().map(|d| d.raw_bytes).sum::<u64>(),
                st.switchover_acked,
                st.estimated_downtime,
            );
            last = Some(now);
        }
        if st.phase == Phase::PreCopy
            && initial_out
            && st.switchover_acked
            && (fits || st.precopy_elapsed > PRECOPY_LIMIT)
        {
            println!(
                "STEP source: switchover ready after {polls} polls ({:?} in pre-copy, estimate \
                 fits: {fits})",
                st.precopy_elapsed
            );
            break;
        }
        if begun.elapsed() > READY_LIMIT {
            return Err(format!(
                "switchover not ready after {READY_LIMIT:?} ({:?}, acked {})",
                st.phase, st.switchover_acked
            )
            .into());
        }
        thread::sleep(POLL);
    }
    // pause-before-switchover: the vCPUs stop first, then the devices.
    vcpus.paused = true;
    s.switchover()?;
    check_running(vcpus, s.devices_mut())?;
    for d in s.devices_mut() {
        let state = d.state()?;
        if state.is_running() {
            return Err(format!("{} is {state} after the switchover", d.name()).into());
        }
        println!("STEP {}: {state} after the switchover", d.name());
    }
    let phase = s.status()?.phase;
    if phase != Phase::StopCopy {
        return Err(format!("the session is in {phase:?} after the switchover").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let (side, addr, paths) = match argv.as_slice() {
        [_, side, addr, paths @ ..] if (side == "send" || side == "recv") && !paths.is_empty() => {
            match addr.parse::<SocketAddr>() {
                Ok(a) => (side.as_str(), a, paths),
                Err(e) => {
                    eprintln!("vfio_step: bad address {addr}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => {
            eprintln!("usage: vfio_step send|recv <addr> <vfio device>...");
            return ExitCode::from(2);
        }
    };
    let result = match side {
        "send" => source(addr, paths),
        _ => destination(addr, paths),
    };
    match result {
        Ok(()) => {
            println!("STEP {side}: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("STEP {side}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
