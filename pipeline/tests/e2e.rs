//! End to end over loopback TCP: emulated devices (FUSE-backed data fds) on both sides, the real
//! transport, the whole pipeline. A transfer is proven correct by the destination device accepting
//! the stream (RESUMING -> STOP validates it) and by equal state digests.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfmig_pipeline::{
    AbortReason, Compress, DestinationOptions, DestinationSession, DirtyTracking,
    GuestMemoryAccess, PipelineError, Report, RollbackAction, SourceOptions, SourceSession,
    VmGuestMemory,
};
use vfmig_transport::Listener;

mod common;
use common::{destination_options, precopy_device, session_config, source_options};
use vfmig_vfio::emulated::{
    EmulatedConfig, EmulatedDevice, FailArc, Faults, GuestConfig, GuestMemory, P2pFabric, Profile,
    Quirks, StopCopyFd,
};
use vfmig_vfio::{DeviceError, DeviceState, MigrationDevice, Transition};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

fn device(name: &str, size: u64, profile: Profile, seed: u64) -> EmulatedDevice {
    EmulatedDevice::new(EmulatedConfig {
        name: name.to_owned(),
        size,
        seed,
        profile,
        precopy: None,
        ..EmulatedConfig::default()
    })
    .expect("emulated device")
}

type Outcome = (
    Result<Report, PipelineError>,
    Vec<EmulatedDevice>,
    Result<Report, PipelineError>,
    Vec<EmulatedDevice>,
);

/// Runs a source and a destination session over loopback.
fn migrate(
    sources: Vec<EmulatedDevice>,
    sopts: SourceOptions,
    dopts: DestinationOptions,
) -> Outcome {
    migrate_with(sources, sopts, dopts, |_| {})
}

/// Like [`migrate`], with a hook that arms faults on the destination devices.
fn migrate_with(
    sources: Vec<EmulatedDevice>,
    sopts: SourceOptions,
    dopts: DestinationOptions,
    arm: impl FnOnce(&[EmulatedDevice]),
) -> Outcome {
    let destinations: Vec<EmulatedDevice> = sources
        .iter()
        .map(|d| d.destination().expect("destination device"))
        .collect();
    arm(&destinations);
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = listener.local_addr();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(destinations, dopts);
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut src = SourceSession::new(sources, sopts);
    let sr = src.run(addr);
    let (dr, dsts) = dst.join().unwrap();
    (sr, src.into_devices(), dr, dsts)
}

fn state(d: &mut EmulatedDevice) -> DeviceState {
    d.state().unwrap()
}

#[test]
fn mixed_zero_and_random_devices_are_accepted_by_the_destination_with_equal_digests() {
    for (profile, compress) in [
        (Profile::Mixed, Compress::Auto),
        (Profile::Zero, Compress::Zstd(3)),
        (Profile::Random, Compress::Lz4),
        (Profile::Text, Compress::None),
    ] {
        let src = device("emu0", 8 << 20, profile, 11);
        let sopts = SourceOptions {
            compress,
            ..source_options()
        };
        let (sr, mut srcs, dr, mut dsts) = migrate(vec![src], sopts, destination_options());
        let report = sr.unwrap_or_else(|e| {
            panic!(
                "{profile:?}: source failed: {e}; destination device says {:?}",
                dsts[0].last_resume_error()
            )
        });
        let dreport = dr.unwrap_or_else(|e| panic!("{profile:?}: destination failed: {e}"));
        assert_eq!(state(&mut srcs[0]), DeviceState::Stop);
        assert_eq!(state(&mut dsts[0]), DeviceState::Stop);
        assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
        assert_eq!(report.raw_bytes, dreport.raw_bytes);
        assert!(report.raw_bytes >= 8 << 20);
        assert!(report.downtime.is_some());
        if profile == Profile::Zero {
            assert!(report.ratio > 10.0, "zero state compresses: {report:?}");
        }
        if profile == Profile::Random {
            assert!(report.ratio < 1.05, "random state goes raw: {report:?}");
        }
    }
}

fn faulty(faults: Faults) -> EmulatedDevice {
    let d = device("emu0", 8 << 20, Profile::Mixed, 5);
    d.set_faults(faults);
    d
}

/// The failure contract: the source device is RUNNING again, and the destination device was
/// reset (RUNNING, not left in RESUMING or ERROR).
fn assert_rolled_back(srcs: &mut [EmulatedDevice], dsts: &mut [EmulatedDevice]) {
    for d in srcs {
        assert_eq!(state(d), DeviceState::Running, "source {}", d.name());
    }
    for d in dsts {
        assert_eq!(state(d), DeviceState::Running, "destination {}", d.name());
    }
}

#[test]
fn two_devices_reach_running_p2p_before_either_stops_so_no_p2p_write_is_lost() {
    let a = device("gpu0", 4 << 20, Profile::Mixed, 1);
    let b = device("nic0", 6 << 20, Profile::Text, 2);
    let fabric = P2pFabric::new(vec![a.p2p_port(), b.p2p_port()]);
    let traffic = fabric.spawn(20_000).unwrap();
    let (sr, mut srcs, dr, mut dsts) = migrate(
        vec![a, b],
        SourceOptions {
            precopy: false,
            ..source_options()
        },
        destination_options(),
    );
    drop(traffic);
    let report = sr.unwrap();
    dr.unwrap();
    assert_eq!(report.devices.len(), 2);
    let stats = fabric.stats();
    assert!(stats.sent > 0, "the fabric ran");
    assert_eq!(
        stats.lost, 0,
        "a device stopped while a peer still sent P2P writes"
    );
    for (s, d) in srcs.iter_mut().zip(dsts.iter_mut()) {
        assert_eq!(state(s), DeviceState::Stop);
        assert_eq!(state(d), DeviceState::Stop);
        assert_eq!(s.state_digest(), d.state_digest());
    }
}

#[test]
fn several_devices_without_p2p_are_refused_before_any_device_is_touched() {
    let mut a = device("a", 1 << 20, Profile::Mixed, 1);
    let mut cfg = a.config();
    cfg.name = "b".into();
    cfg.p2p = false;
    let b = EmulatedDevice::new(cfg).unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut src = SourceSession::new(vec![a.destination().unwrap(), b], source_options());
    let err = src.run(listener.local_addr()).unwrap_err();
    assert!(
        matches!(&err, PipelineError::P2pRequired { device, .. } if device == "b"),
        "{err}"
    );
    for d in src.devices_mut() {
        assert_eq!(state(d), DeviceState::Running);
    }
    assert_eq!(state(&mut a), DeviceState::Running);
}

#[test]
fn precopy_streams_while_the_device_dirties_state_then_switches_over() {
    let mtty_dup = Quirks {
        stop_copy_fd: StopCopyFd::Dup,
        ..Quirks::mtty()
    };
    // ENOMSG when drained (uAPI); 0 when drained with short reads (mtty); a dup'ed fd into
    // STOP_COPY.
    for quirks in [Quirks::uapi(), Quirks::mtty(), mtty_dup] {
        let src = EmulatedDevice::new(EmulatedConfig {
            name: "emu0".into(),
            size: 8 << 20,
            precopy: Some(u64::MAX),
            dirty_rate: 4 << 20,
            quirks,
            ..EmulatedConfig::default()
        })
        .unwrap();
        let (sr, srcs, dr, mut dsts) = migrate(
            vec![src],
            SourceOptions {
                max_downtime: Duration::from_millis(50),
                max_precopy: Duration::from_secs(5),
                ..source_options()
            },
            destination_options(),
        );
        let report = sr.unwrap_or_else(|e| panic!("{quirks:?}: {e}"));
        let dreport = dr.unwrap();
        let dev = &report.devices[0];
        assert!(
            dev.precopy_bytes >= 8 << 20,
            "{quirks:?}: the initial state went in PRE_COPY: {dev:?}"
        );
        assert_eq!(
            dreport.devices[0].precopy_bytes, dev.precopy_bytes,
            "{quirks:?}: the destination reports the PRE_COPY bytes it received"
        );
        assert!(dev.raw_bytes > dev.precopy_bytes, "STOP_COPY sent the rest");
        assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
        assert_eq!(state(&mut dsts[0]), DeviceState::Stop);
    }
}

#[test]
fn two_devices_precopy_through_precopy_p2p_and_the_destination_resumes_both_in_p2p_order() {
    let (a, b) = (precopy_device("a", 1), precopy_device("b", 2));
    let fabric = P2pFabric::new(vec![a.p2p_port(), b.p2p_port()]);
    let traffic = fabric.spawn(20_000).unwrap();
    let (sr, srcs, dr, mut dsts) = migrate(
        vec![a, b],
        source_options(),
        DestinationOptions {
            resume_devices: true,
            ..destination_options()
        },
    );
    drop(traffic);
    let report = sr.unwrap();
    dr.unwrap();
    assert_eq!(fabric.stats().lost, 0);
    assert!(report.devices.iter().all(|d| d.precopy_bytes > 0));
    for (s, d) in srcs.iter().zip(dsts.iter_mut()) {
        assert_eq!(s.state_digest(), d.state_digest());
        assert_eq!(state(d), DeviceState::Running, "resumed on request");
    }
}

#[test]
fn read_error_at_byte_n_fails_typed_and_rolls_back_both_sides() {
    let n = 3 << 20;
    let src = faulty(Faults {
        read_error_at: Some(n),
        ..Faults::default()
    });
    let (sr, mut srcs, dr, mut dsts) = migrate(
        vec![src],
        SourceOptions {
            precopy: false,
            ..source_options()
        },
        destination_options(),
    );
    match sr.unwrap_err() {
        PipelineError::Read { offset, source, .. } => {
            assert_eq!(offset, n);
            assert_eq!(source.raw_os_error(), Some(libc_eio()));
        }
        e => panic!("unexpected error {e}"),
    }
    assert!(matches!(
        dr.unwrap_err(),
        PipelineError::PeerAborted {
            reason: AbortReason::SourceDevice,
            ..
        } | PipelineError::Transport { .. }
    ));
    assert_rolled_back(&mut srcs, &mut dsts);
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn early_end_of_stream_is_refused_by_the_destination_device_and_rolled_back() {
    let src = faulty(Faults {
        early_end_at: Some(2 << 20),
        ..Faults::default()
    });
    let (sr, mut srcs, dr, mut dsts) = migrate(vec![src], source_options(), destination_options());
    assert!(
        matches!(
            sr.as_ref().unwrap_err(),
            PipelineError::PeerAborted {
                reason: AbortReason::DeviceRefused,
                ..
            }
        ),
        "{:?}",
        sr.as_ref().err()
    );
    assert!(matches!(
        dr.unwrap_err(),
        PipelineError::DeviceRefused { .. }
    ));
    assert!(dsts[0].last_resume_error().is_some());
    assert_rolled_back(&mut srcs, &mut dsts);
}

#[test]
fn destination_refusing_resume_fails_typed_and_the_source_runs_again() {
    let src = device("emu0", 4 << 20, Profile::Mixed, 3);
    let (sr, mut srcs, dr, mut dsts) =
        migrate_with(vec![src], source_options(), destination_options(), |d| {
            d[0].set_faults(Faults {
                refuse_resume: true,
                ..Faults::default()
            })
        });
    assert!(matches!(
        sr.unwrap_err(),
        PipelineError::PeerAborted {
            reason: AbortReason::DeviceRefused,
            ..
        }
    ));
    assert!(matches!(
        dr.unwrap_err(),
        PipelineError::DeviceRefused { .. }
    ));
    assert_rolled_back(&mut srcs, &mut dsts);
}

#[test]
fn set_state_failure_at_a_chosen_arc_is_rolled_back_through_reset() {
    let src = faulty(Faults {
        fail_arc: Some(FailArc {
            arc: Transition {
                from: DeviceState::Stop,
                to: DeviceState::StopCopy,
            },
            to_error: true,
            once: true,
        }),
        ..Faults::default()
    });
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let dst_dev = src.destination().unwrap();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(vec![dst_dev], destination_options());
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut session = SourceSession::new(
        vec![src],
        SourceOptions {
            precopy: false,
            ..source_options()
        },
    );
    let err = session.run(addr).unwrap_err();
    match &err {
        PipelineError::Device {
            source: DeviceError::SetState { arc, .. },
            ..
        } => assert_eq!(arc.to, DeviceState::StopCopy),
        e => panic!("unexpected error {e}"),
    }
    assert!(matches!(
        session.rollback_steps()[0].action,
        RollbackAction::Reset {
            from: Some(DeviceState::Error)
        }
    ));
    let (dr, mut dsts) = dst.join().unwrap();
    assert!(dr.is_err());
    let mut srcs = session.into_devices();
    assert_rolled_back(&mut srcs, &mut dsts);
}

#[test]
fn destination_vanishing_mid_stream_fails_the_source_typed_and_rolls_back() {
    let src = device("emu0", 16 << 20, Profile::Random, 4);
    src.set_faults(Faults {
        slow_bytes_per_sec: Some(16 << 20),
        ..Faults::default()
    });
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    // A destination that takes a few frames and then disappears (its process died).
    let dst = thread::spawn(move || {
        let session = listener.accept(&session_config()).unwrap();
        for _ in 0..3 {
            let _ = session.recv(Duration::from_secs(5));
        }
        drop(session);
    });
    let mut session = SourceSession::new(
        vec![src],
        SourceOptions {
            precopy: false,
            ..source_options()
        },
    );
    let err = session.run(addr).unwrap_err();
    dst.join().unwrap();
    assert!(
        matches!(
            err,
            PipelineError::Transport { .. } | PipelineError::PeerAborted { .. }
        ),
        "{err}"
    );
    let mut srcs = session.into_devices();
    assert_eq!(state(&mut srcs[0]), DeviceState::Running);
}

#[test]
fn cancel_from_another_thread_rolls_back_both_sides() {
    let src = device("emu0", 16 << 20, Profile::Mixed, 6);
    src.set_faults(Faults {
        slow_bytes_per_sec: Some(8 << 20),
        ..Faults::default()
    });
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let dst_dev = src.destination().unwrap();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(vec![dst_dev], destination_options());
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut session = SourceSession::new(vec![src], source_options());
    let cancel = session.cancel_handle();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        cancel.cancel();
    });
    let err = session.run(addr).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, PipelineError::Cancelled { .. }), "{err}");
    let (dr, mut dsts) = dst.join().unwrap();
    assert!(matches!(
        dr.unwrap_err(),
        PipelineError::PeerAborted {
            reason: AbortReason::Cancelled,
            ..
        }
    ));
    let mut srcs = session.into_devices();
    assert_rolled_back(&mut srcs, &mut dsts);
}

/// A vm-memory mapping (MAP_SHARED) of an emulated guest's memfd, through the pipeline's
/// `vm-memory` adapter: the same bytes the device DMAs into, seen the way a rust-vmm VMM sees its
/// guest RAM.
fn vm_memory_view(g: &GuestMemory) -> Arc<dyn GuestMemoryAccess> {
    let file = File::from(g.fd().try_clone_to_owned().expect("dup memfd"));
    let len = usize::try_from(g.len()).unwrap();
    let region = (GuestAddress(g.iova()), len, Some(FileOffset::new(file, 0)));
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([region]).expect("map the memfd");
    Arc::new(VmGuestMemory::identity(Arc::new(mem)).expect("identity"))
}

#[test]
fn device_dma_dirty_pages_reach_the_destination_guest_memory() {
    // The pipeline reads and writes guest memory through the emulated guests themselves, or
    // through vm-memory mappings of them.
    for (precopy, vm_memory) in [(true, false), (false, false), (true, true)] {
        let src = EmulatedDevice::new(EmulatedConfig {
            name: "emu0".into(),
            size: 4 << 20,
            precopy: Some(u64::MAX),
            guest: Some(GuestConfig {
                iova: 0x4000_0000,
                len: 4 << 20,
                dma_pages_per_sec: 5000,
                quiesce_dma_pages: 0,
            }),
            ..EmulatedConfig::default()
        })
        .unwrap();
        let src_guest = src.guest_memory().unwrap();
        let dst = src.destination().unwrap();
        let dst_guest = dst.guest_memory().unwrap();
        let (src_mem, dg): (Arc<dyn GuestMemoryAccess>, Arc<dyn GuestMemoryAccess>) = if vm_memory {
            (vm_memory_view(&src_guest), vm_memory_view(&dst_guest))
        } else {
            (src_guest.clone(), dst_guest.clone())
        };
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let dest = thread::spawn(move || {
            let mut s = DestinationSession::new(
                vec![dst],
                DestinationOptions {
                    guest_memory: Some(dg),
                    ..destination_options()
                },
            );
            s.run(&listener)
        });
        // Let the device dirty some guest memory by DMA first.
        thread::sleep(Duration::from_millis(50));
        let mut session = SourceSession::new(
            vec![src],
            SourceOptions {
                precopy,
                dirty_tracking: DirtyTracking::ShipPages {
                    memory: src_mem,
                    full_copy: true,
                },
                ..source_options()
            },
        );
        let report = session.run(addr).unwrap();
        dest.join().unwrap().unwrap();
        let devs = session.into_devices();
        assert!(devs[0].stats().dma_pages_written > 0, "the device did DMA");
        assert!(report.devices[0].guest_page_bytes >= 4 << 20);
        assert_eq!(
            src_guest.digest(),
            dst_guest.digest(),
            "precopy={precopy} vm_memory={vm_memory}: guest memory differs"
        );
    }
}

#[test]
fn precopy_of_a_partial_initial_state_switches_over_once_nothing_is_left_to_drain() {
    let src = EmulatedDevice::new(EmulatedConfig {
        name: "emu0".into(),
        size: 8 << 20,
        precopy: Some(2 << 20),
        ..EmulatedConfig::default()
    })
    .unwrap();
    let (sr, srcs, dr, dsts) = migrate(
        vec![src],
        SourceOptions {
            // Far below what the STOP_COPY-only 6 MiB take: waiting in PRE_COPY cannot help.
            max_downtime: Duration::from_micros(1),
            ..source_options()
        },
        destination_options(),
    );
    let report = sr.unwrap();
    dr.unwrap();
    let dev = &report.devices[0];
    assert!(
        dev.precopy_bytes >= 2 << 20 && dev.precopy_bytes < 4 << 20,
        "{dev:?}"
    );
    assert!(dev.raw_bytes >= 8 << 20);
    assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
}

#[test]
fn adaptive_compression_compresses_when_the_link_is_the_bottleneck() {
    let src = device("emu0", 16 << 20, Profile::Mixed, 8);
    let (sr, srcs, dr, dsts) = migrate(
        vec![src],
        SourceOptions {
            precopy: false,
            compress: Compress::Auto,
            // A 24 MB/s link: far slower than any codec rung.
            max_bandwidth: vfmig_pipeline::Rate::from_bytes_per_sec(24_000_000),
            ..source_options()
        },
        destination_options(),
    );
    let report = sr.unwrap();
    dr.unwrap();
    assert!(report.codec.starts_with("zstd"), "{report:?}");
    assert!(report.ratio > 1.8, "{report:?}");
    assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
}

#[test]
fn device_count_mismatch_is_refused_in_the_handshake_and_the_source_runs_on() {
    let src = device("emu0", 1 << 20, Profile::Mixed, 9);
    let extra = device("emu1", 1 << 20, Profile::Mixed, 10);
    let targets = vec![src.destination().unwrap(), extra.destination().unwrap()];
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(targets, destination_options());
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut session = SourceSession::new(vec![src], source_options());
    let err = session.run(addr).unwrap_err();
    let (dr, mut dsts) = dst.join().unwrap();
    let count_mismatch = |e: &PipelineError| {
        matches!(
            e,
            PipelineError::Transport {
                source: vfmig_transport::TransportError::Handshake {
                    source: vfmig_wire::handshake::HandshakeError::DeviceCountMismatch {
                        source_count: 1,
                        destination_count: 2
                    },
                    ..
                },
                ..
            }
        )
    };
    let dr = dr.unwrap_err();
    assert!(count_mismatch(&dr), "{dr}");
    assert!(count_mismatch(&err), "{err}");
    assert!(
        matches!(
            err,
            PipelineError::PeerAborted {
                reason: AbortReason::DeviceMismatch,
                ..
            } | PipelineError::Transport { .. }
        ),
        "{err}"
    );
    let mut srcs = session.into_devices();
    assert_rolled_back(&mut srcs, &mut dsts);
}

#[test]
fn devices_that_cannot_pair_fail_the_handshake_on_both_sides_before_any_device_moves() {
    let src = device("emu0", 16 << 20, Profile::Mixed, 1);
    let smaller = device("emu0", 8 << 20, Profile::Mixed, 1);
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = listener.local_addr();
    let dst = thread::spawn(move || {
        let mut s = DestinationSession::new(vec![smaller], destination_options());
        let r = s.run(&listener);
        (r, s.into_devices())
    });
    let mut s = SourceSession::new(vec![src], source_options());
    let sr = s.run(addr);
    let (dr, mut dsts) = dst.join().unwrap();
    for r in [sr.map(drop), dr.map(drop)] {
        match r {
            Err(PipelineError::Transport {
                source:
                    vfmig_transport::TransportError::Handshake {
                        source: vfmig_wire::handshake::HandshakeError::DeviceMismatch(m),
                        ..
                    },
                ..
            }) => {
                assert_eq!(
                    (m.source.size, m.destination.size),
                    (Some(16 << 20), Some(8 << 20))
                );
            }
            other => panic!("a handshake device mismatch expected, got {other:?}"),
        }
    }
    assert_eq!(state(&mut s.into_devices()[0]), DeviceState::Running);
    assert_eq!(state(&mut dsts[0]), DeviceState::Running);
}

#[test]
fn a_destination_asked_for_more_codec_workers_than_its_pool_can_feed_runs_with_fewer() {
    // 64 workers would each hold up to two of the 48 slots beside the reorder window: the
    // destination runs as many as the pool can feed instead of refusing the session.
    let sopts = SourceOptions {
        compress: Compress::Zstd(1),
        codec_workers: 64,
        ..source_options()
    };
    let dopts = DestinationOptions {
        codec_workers: 64,
        ..destination_options()
    };
    let src = device("emu0", 8 << 20, Profile::Mixed, 5);
    let (sr, srcs, dr, dsts) = migrate(vec![src], sopts, dopts);
    let report = sr.unwrap_or_else(|e| panic!("source failed: {e}"));
    let dreport = dr.unwrap_or_else(|e| panic!("destination failed: {e}"));
    assert_eq!(srcs[0].state_digest(), dsts[0].state_digest());
    assert_eq!(report.raw_bytes, dreport.raw_bytes);
    // The instants `vfmig --json` reports (issue 12): the source's first data frame and the
    // destination's outcome, as each side saw them.
    assert!(report.first_data_at.is_some());
    assert!(report.final_ack_at.is_some());
    assert!(dreport.first_data_at.is_none());
    assert!(dreport.final_ack_at.is_some());
}

#[test]
fn default_codec_workers_follow_the_cores_within_their_bounds() {
    let cores = vfmig_pipeline::cores::available_cores();
    let w = vfmig_pipeline::default_codec_workers();
    assert_eq!(w, cores.clamp(2, vfmig_pipeline::DEFAULT_CODEC_WORKERS_MAX));
    assert_eq!(SourceOptions::default().codec_workers, w);
    assert_eq!(DestinationOptions::default().codec_workers, w);
}
