//! The VMM-facing pre-copy and dirty-tracking behaviour, end to end over loopback with emulated
//! devices: a device whose `initial_bytes` grow again (`VFIO_PRECOPY_INFO_REINIT`) and the
//! export of device DMA dirty bitmaps to the VMM.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, DirtyReport, DirtySink, DirtyTracking, LoggingStarted,
    PipelineError, Report, SourceOptions, SourceSession,
};
use vfmig_transport::{Listener, SessionConfig};
use vfmig_vfio::emulated::{
    EmulatedConfig, EmulatedDevice, Faults, GuestConfig, GuestMemory, PrecopyInfoVersion,
    GUEST_PAGE_SIZE,
};
use vfmig_vfio::{DeviceState, IovaRange, MigrationDevice};

/// Both sides' options: a small pool and 10 s timeouts.
fn options() -> (SourceOptions, DestinationOptions) {
    let session = SessionConfig {
        pool_slots: 32,
        slot_size: 256 << 10,
        window_bytes: 4 << 20,
        timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(1),
        ..SessionConfig::default()
    };
    let timeout = Duration::from_secs(10);
    (
        SourceOptions {
            session: session.clone(),
            timeout,
            ..SourceOptions::default()
        },
        DestinationOptions {
            session,
            timeout,
            ..DestinationOptions::default()
        },
    )
}

/// Migrates `sources` to fresh destination devices; returns both reports and all devices.
fn migrate(
    sources: Vec<EmulatedDevice>,
    sopts: SourceOptions,
    dopts: DestinationOptions,
) -> (
    Result<Report, PipelineError>,
    Vec<EmulatedDevice>,
    Vec<EmulatedDevice>,
) {
    let targets: Vec<EmulatedDevice> = sources
        .iter()
        .map(|d| d.destination().expect("destination device"))
        .collect();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(targets, dopts);
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut src = SourceSession::new(sources, sopts);
    let report = src.run(addr);
    let (dr, targets) = dst.join().unwrap();
    if report.is_ok() {
        dr.expect("destination report");
    }
    (report, src.into_devices(), targets)
}

#[test]
fn a_device_whose_initial_bytes_grow_again_is_not_ready_until_they_drain_and_still_migrates() {
    for (version, v2) in [
        (PrecopyInfoVersion::V2, true),
        (PrecopyInfoVersion::V1, false),
    ] {
        // Holds the source in pre-copy: its 2 MiB of initial data come at 4 MiB/s.
        let slow = EmulatedDevice::new(EmulatedConfig {
            name: "slow".into(),
            size: 2 << 20,
            seed: 3,
            faults: Faults {
                slow_bytes_per_sec: Some(4 << 20),
                ..Faults::default()
            },
            ..EmulatedConfig::default()
        })
        .unwrap();
        // Re-initialises once the source has seen its initial_bytes at 0 (ready): its whole
        // state changes and is initial data again.
        let reinit = EmulatedDevice::new(
            EmulatedConfig::new("reinit", 256 << 10, 4)
                .with_block_size(16 << 10)
                .with_precopy_info(version, Some(0)),
        )
        .unwrap();
        let (sopts, dopts) = options();
        let (report, srcs, dsts) = migrate(vec![slow, reinit], sopts, dopts);
        let report = report.unwrap_or_else(|e| panic!("{version:?}: {e}"));
        for (s, d) in srcs.iter().zip(&dsts) {
            assert_eq!(
                s.state_digest(),
                d.state_digest(),
                "{version:?}: {}",
                s.name()
            );
        }
        let stats = srcs[1].stats();
        // The device only re-initialises after a precopy_info reported initial_bytes 0: the
        // source saw it ready before.
        assert_eq!(
            stats.precopy_reinits, 1,
            "{version:?}: the device re-initialised"
        );
        let dev = &report.devices[1];
        assert_eq!(
            dev.precopy_info_v2, v2,
            "{version:?}: v2 used exactly when offered"
        );
        assert!(!report.devices[0].precopy_info_v2);
        assert_eq!(dev.precopy_reinits, u64::from(v2), "{version:?}");
        // Not ready after the REINIT, ready again at the switchover: every new initial byte
        // was read in PRE_COPY.
        assert_eq!(stats.initial_bytes_at_precopy_exit, Some(0), "{version:?}");
        if v2 {
            assert!(
                dev.precopy_bytes >= 2 * (256 << 10),
                "the state went twice in PRE_COPY: {dev:?}"
            );
        }
    }
}

/// A VMM's side of bitmap export: snapshots guest memory when logging starts and merges every
/// report.
struct Vmm {
    guests: Vec<Arc<GuestMemory>>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    started: Option<LoggingStarted>,
    snapshots: Vec<Vec<u8>>,
    dirty: BTreeSet<u64>,
    reports: u64,
    last: Option<DirtyReport>,
    after_last: u64,
}

impl DirtySink for Vmm {
    fn logging_started(&self, started: &LoggingStarted) {
        let mut s = self.seen.lock().unwrap();
        s.started = Some(started.clone());
        s.snapshots = self
            .guests
            .iter()
            .map(|g| g.with_bytes(<[u8]>::to_vec))
            .collect();
    }

    fn dirty(&self, report: &DirtyReport) {
        let mut s = self.seen.lock().unwrap();
        assert_eq!(report.round, s.reports, "rounds are numbered in order");
        s.reports += 1;
        if s.last.is_some() {
            s.after_last += 1;
        }
        for b in &report.bitmaps {
            s.dirty.extend(b.dirty_iovas());
        }
        if report.last {
            s.last = Some(report.clone());
        }
    }
}

/// IOVAs of the pages of `g` that differ from `before`.
fn changed_pages(g: &GuestMemory, before: &[u8]) -> Vec<u64> {
    let page = usize::try_from(GUEST_PAGE_SIZE).unwrap();
    g.with_bytes(|now| {
        now.chunks(page)
            .zip(before.chunks(page))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| g.iova() + i as u64 * GUEST_PAGE_SIZE)
            .collect()
    })
}

#[test]
fn exported_bitmaps_hold_every_page_the_devices_wrote_including_while_they_quiesced() {
    for precopy in [true, false] {
        let dma = |name: &str, seed, iova| {
            EmulatedDevice::new(EmulatedConfig {
                name: name.into(),
                size: 1 << 20,
                seed,
                guest: Some(GuestConfig {
                    iova,
                    len: 2 << 20,
                    dma_pages_per_sec: 4000,
                    // Written on entering PRE_COPY_P2P / RUNNING_P2P: after the last pre-copy
                    // harvest, right before the devices stop.
                    quiesce_dma_pages: 8,
                }),
                ..EmulatedConfig::default()
            })
            .unwrap()
        };
        let a = dma("dma-a", 21, 0x4000_0000);
        let b = dma("dma-b", 22, 0x8000_0000);
        let no_dma = EmulatedDevice::new(EmulatedConfig::new("no-dma", 1 << 20, 23)).unwrap();
        let guests = vec![a.guest_memory().unwrap(), b.guest_memory().unwrap()];
        let ranges: Vec<IovaRange> = guests
            .iter()
            .map(|g| IovaRange {
                iova: g.iova(),
                length: g.len(),
            })
            .collect();
        let vmm = Arc::new(Vmm {
            guests: guests.clone(),
            seen: Mutex::new(Seen::default()),
        });
        let (sopts, dopts) = options();
        let sopts = SourceOptions {
            precopy,
            dirty_tracking: DirtyTracking::Export {
                ranges: ranges.clone(),
                page_size: GUEST_PAGE_SIZE,
                sink: vmm.clone(),
            },
            ..sopts
        };
        // Let the devices run (and DMA) for a while before and during pre-copy.
        thread::sleep(Duration::from_millis(30));
        let (report, srcs, _) = migrate(vec![a, b, no_dma], sopts, dopts);
        let report = report.unwrap_or_else(|e| panic!("precopy={precopy}: {e}"));
        let seen = vmm.seen.lock().unwrap();
        let started = seen.started.as_ref().expect("logging_started was called");
        assert_eq!(started.ranges, ranges);
        let tracked: Vec<&str> = started.tracked.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(tracked, ["dma-a", "dma-b"]);
        assert_eq!(
            started.untracked,
            ["no-dma"],
            "its DMA is not in any report"
        );
        let last = seen.last.as_ref().expect("a last report");
        assert_eq!(seen.after_last, 0, "nothing after the last report");
        assert!(
            last.count() > 0,
            "precopy={precopy}: the writes made while quiescing are in the last report"
        );
        let mut written = 0;
        for (g, before) in guests.iter().zip(&seen.snapshots) {
            for iova in changed_pages(g, before) {
                written += 1;
                assert!(
                    seen.dirty.contains(&iova),
                    "precopy={precopy}: page {iova:#x} was written but is in no bitmap"
                );
            }
        }
        assert!(
            written >= 16,
            "precopy={precopy}: the devices wrote {written} pages"
        );
        for d in &srcs[..2] {
            assert!(d.stats().dma_pages_written > 0);
        }
        for d in &report.devices {
            assert_eq!(d.guest_page_bytes, 0, "the VMM ships the pages, not vfmig");
        }
    }
}

#[test]
fn export_ranges_not_aligned_to_the_page_size_are_refused_before_connecting() {
    let dev = EmulatedDevice::new(EmulatedConfig::new("e", 1 << 20, 5)).unwrap();
    struct Nothing;
    impl DirtySink for Nothing {
        fn logging_started(&self, _: &LoggingStarted) {}
        fn dirty(&self, _: &DirtyReport) {}
    }
    let sopts = SourceOptions {
        dirty_tracking: DirtyTracking::Export {
            ranges: vec![IovaRange {
                iova: 0x1000,
                length: 0x10_0000,
            }],
            page_size: 0x20_0000,
            sink: Arc::new(Nothing),
        },
        ..options().0
    };
    let mut src = SourceSession::new(vec![dev], sopts);
    // Nothing listens there: only a check before connecting gives an options error.
    let report = src.run("127.0.0.1:1".parse().unwrap());
    assert!(
        matches!(report, Err(PipelineError::Options { .. })),
        "{report:?}"
    );
    assert_eq!(src.devices_mut()[0].state().unwrap(), DeviceState::Running);
}
