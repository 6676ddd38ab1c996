//! A VMM's migration loop over vfmig's step API, both hosts in one process over loopback.
//!
//! The source VMM streams two emulated devices in pre-copy while its (fake) vCPUs run, polls
//! `status` like QEMU's `info migrate`, and switches over itself once every device's initial data
//! is acknowledged by the destination and the estimated stop-copy time fits its budget: it pauses
//! its vCPUs first, then calls `switchover`. The destination VMM receives, waits for the commit,
//! "loads its RAM", resumes the devices and reports the outcome, which the source reports in turn.
//! A fake vCPU pause flag is checked against the device states at every step: a device never
//! stops while the vCPUs run, and never runs on the source after the switchover.
//!
//! Run: `cargo run --release -p vfmig-pipeline --example vmm_loop`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, FinalOutcome, Phase, SourceOptions, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice};
use vfmig_vfio::{DeviceState, MigrationDevice};

/// The guest's vCPUs, as far as migration cares.
#[derive(Clone, Default)]
struct Vcpus(Arc<AtomicBool>);

impl Vcpus {
    fn pause(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn resume(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    fn paused(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The VMM's invariant: running vCPUs need running devices (a stopped device behind running
/// vCPUs loses the guest's I/O).
fn check<D: MigrationDevice>(vcpus: &Vcpus, devices: &mut [D]) -> Result<(), String> {
    for d in devices {
        let state = d.state().map_err(|e| e.to_string())?;
        if !vcpus.paused() && !state.is_running() {
            return Err(format!("{} is {state} while the vCPUs run", d.name()));
        }
    }
    Ok(())
}

fn device(name: &str, seed: u64) -> Result<EmulatedDevice, Box<dyn std::error::Error>> {
    Ok(EmulatedDevice::new(EmulatedConfig {
        name: name.into(),
        size: 8 << 20,
        seed,
        // The whole state is initial data; the device keeps dirtying state while it runs.
        precopy: Some(u64::MAX),
        dirty_rate: 2 << 20,
        ..EmulatedConfig::default()
    })?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sources = vec![device("gpu0", 1)?, device("nic0", 2)?];
    let targets: Vec<EmulatedDevice> = sources
        .iter()
        .map(EmulatedDevice::destination)
        .collect::<Result<_, _>>()?;

    // Destination host: its vCPUs start paused and run only after the commit.
    let listener = Listener::bind("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr();
    let destination = thread::spawn(move || -> Result<Vec<EmulatedDevice>, String> {
        let vcpus = Vcpus::default();
        vcpus.pause();
        let mut s = DestinationSession::new(targets, DestinationOptions::default());
        s.receive(&listener).map_err(|e| e.to_string())?;
        // Committed: the source's devices never run again. Load RAM (here: nothing), resume
        // the devices, then the vCPUs, then tell the source.
        s.resume().map_err(|e| e.to_string())?;
        vcpus.resume();
        check(&vcpus, s.devices_mut())?;
        let report = s.finish(FinalOutcome::Resumed).map_err(|e| e.to_string())?;
        eprintln!("destination: {} bytes loaded, resumed", report.raw_bytes);
        Ok(s.into_devices())
    });

    // Source host.
    let vcpus = Vcpus::default();
    let budget = Duration::from_millis(100);
    let mut s = SourceSession::new(
        sources,
        SourceOptions {
            max_downtime: budget,
            ..SourceOptions::default()
        },
    );
    s.start(addr)?;
    loop {
        let st = s.status()?;
        check(&vcpus, s.devices_mut())?;
        let initial_out = st.devices.iter().all(|d| d.initial_bytes == 0);
        let fits = st.estimated_downtime.is_some_and(|t| t <= budget);
        eprintln!(
            "source: {:?} {:>9} bytes, rate {:>6.0} MB/s, acked {}, downtime estimate {:?}",
            st.phase,
            st.devices.iter().map(|d| d.raw_bytes).sum::<u64>(),
            st.rate_bps / 1e6,
            st.switchover_acked,
            st.estimated_downtime,
        );
        if initial_out
            && st.switchover_acked
            && (fits || st.precopy_elapsed > Duration::from_secs(5))
        {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    // pause-before-switchover: the vCPUs stop first, then the devices.
    vcpus.pause();
    s.switchover()?;
    check(&vcpus, s.devices_mut())?;
    assert_eq!(s.status()?.phase, Phase::StopCopy);
    let report = s.finish()?;
    for d in s.devices_mut() {
        assert_eq!(d.state()?, DeviceState::Stop, "the source never runs again");
    }
    eprintln!(
        "source: {} bytes ({} in pre-copy), downtime {:?} (budget exceeded: {}), destination {:?}",
        report.raw_bytes,
        report.devices.iter().map(|d| d.precopy_bytes).sum::<u64>(),
        report.downtime,
        report.max_downtime_exceeded,
        report.outcome,
    );
    let targets = destination.join().map_err(|_| "destination thread")??;
    for (a, b) in s.into_devices().iter().zip(&targets) {
        assert_eq!(a.state_digest(), b.state_digest());
    }
    Ok(())
}
