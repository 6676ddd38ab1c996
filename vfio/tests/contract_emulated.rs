//! The device contract suite against EmulatedDevice, under every capability set that has
//! STOP_COPY and both quirk modes (uAPI text and mtty).

use vfmig_vfio::contract::{run_all, ContractOptions};
use vfmig_vfio::emulated::{
    DataFdBackend, EmulatedConfig, EmulatedDevice, GuestConfig, PrecopyInfoVersion, Profile, Quirks,
};
use vfmig_vfio::{DeviceState, MigrationCaps};

fn config(caps: MigrationCaps, quirks: Quirks, guest: bool) -> EmulatedConfig {
    let mut cfg = EmulatedConfig::new("contract", 1 << 20, 11)
        .with_profile(Profile::Mixed)
        .with_block_size(16 << 10)
        .with_caps(caps)
        .with_quirks(quirks);
    if caps.contains(MigrationCaps::PRE_COPY) {
        // Half the state is PRE_COPY initial data, the rest streams in STOP_COPY only.
        cfg.precopy = Some(512 << 10);
    }
    if guest {
        cfg.guest = Some(GuestConfig {
            iova: 1 << 30,
            len: 1 << 20,
            dma_pages_per_sec: 0,
            quiesce_dma_pages: 0,
        });
    }
    cfg
}

fn run(caps: MigrationCaps, quirks: Quirks, guest: bool) {
    run_with(config(caps, quirks, guest));
}

fn run_with(cfg: EmulatedConfig) {
    let (caps, quirks, guest) = (cfg.caps(), cfg.quirks, cfg.guest.is_some());
    let opts = ContractOptions {
        exact_stop_copy_size: true,
        allow_precopy_zero: quirks == Quirks::mtty(),
        refusal_goes_to_error: !quirks.refusal_stays_resuming,
        ..ContractOptions::default()
    };
    let src_cfg = cfg.clone();
    let report = run_all(
        || EmulatedDevice::new(src_cfg.clone()).expect("source device"),
        || EmulatedDevice::new(cfg.clone()).expect("destination device"),
        &opts,
    )
    .unwrap_or_else(|e| panic!("caps {caps}, quirks {quirks:?}: {e}"));
    let want_states = DeviceState::ALL
        .into_iter()
        .filter(|s| s.supported_by(caps))
        .count();
    assert_eq!(
        report.states.len(),
        want_states,
        "every supported state visited"
    );
    // Every arc the kernel's table allows for these caps was SET one at a time.
    let mut legal = Vec::new();
    for from in DeviceState::ALL
        .into_iter()
        .filter(|s| s.supported_by(caps))
    {
        for to in DeviceState::ALL
            .into_iter()
            .filter(|s| s.supported_by(caps))
        {
            if from != to && vfmig_vfio::next_state(from, to, caps).ok() == Some(to) {
                legal.push(vfmig_vfio::Transition { from, to });
            }
        }
    }
    for arc in &legal {
        assert!(
            report.arcs.contains(arc),
            "caps {caps}: arc {arc} not exercised"
        );
    }
    if caps.contains(MigrationCaps::PRE_COPY) {
        assert!(report.passed.contains(&"precopy"));
    }
    assert_eq!(report.passed.contains(&"dma_logging_args"), guest);
}

#[test]
fn contract_holds_for_every_capability_set_in_uapi_mode() {
    for caps in MigrationCaps::all_subsets().filter(|c| c.contains(MigrationCaps::STOP_COPY)) {
        run(caps, Quirks::uapi(), caps == MigrationCaps::ALL);
    }
}

#[test]
fn contract_holds_for_every_capability_set_in_mtty_mode() {
    for caps in MigrationCaps::all_subsets().filter(|c| c.contains(MigrationCaps::STOP_COPY)) {
        run(caps, Quirks::mtty(), false);
    }
}

#[test]
fn contract_holds_when_stop_copy_returns_a_duplicate_fd() {
    let quirks = Quirks {
        stop_copy_fd: vfmig_vfio::emulated::StopCopyFd::Dup,
        ..Quirks::uapi()
    };
    run(MigrationCaps::ALL, quirks, true);
    // Without P2P, PRE_COPY -> STOP_COPY is one arc that continues the stream (and returns the
    // duplicate): a legal continuation, not a data fd on a wrong arc.
    run(
        MigrationCaps::STOP_COPY | MigrationCaps::PRE_COPY,
        quirks,
        false,
    );
}

#[test]
fn contract_detects_a_device_that_refuses_valid_streams() {
    let cfg = config(MigrationCaps::ALL, Quirks::uapi(), false);
    let mut bad = cfg.clone();
    bad.faults.refuse_resume = true;
    let err = run_all(
        || EmulatedDevice::new(cfg.clone()).unwrap(),
        || EmulatedDevice::new(bad.clone()).unwrap(),
        &ContractOptions::default(),
    )
    .expect_err("a device refusing every resume must fail the suite");
    assert_eq!(err.check, "transfer");
}

#[test]
fn contract_detects_a_device_whose_stream_ends_early() {
    let cfg = config(MigrationCaps::STOP_COPY, Quirks::uapi(), false);
    let mut bad = cfg.clone();
    bad.faults.early_end_at = Some(100_000);
    let err = run_all(
        || EmulatedDevice::new(bad.clone()).unwrap(),
        || EmulatedDevice::new(cfg.clone()).unwrap(),
        &ContractOptions::default(),
    )
    .expect_err("a truncated stream must fail the suite");
    assert_eq!(err.check, "transfer");
}

#[test]
fn contract_detects_zero_reads_in_precopy_when_enomsg_is_required() {
    let cfg = config(MigrationCaps::ALL, Quirks::mtty(), false);
    let opts = ContractOptions {
        allow_precopy_zero: false,
        refusal_goes_to_error: false,
        ..ContractOptions::default()
    };
    let err = run_all(
        || EmulatedDevice::new(cfg.clone()).unwrap(),
        || EmulatedDevice::new(cfg.clone()).unwrap(),
        &opts,
    )
    .expect_err("0 in PRE_COPY must fail when ENOMSG is required");
    assert_eq!(err.check, "precopy");
}

/// One run of the suite over a PRE_COPY device that re-initialises once its initial data was
/// read, with the given pre-copy information version offered and the opt-in asked or not.
fn run_reinit(
    version: PrecopyInfoVersion,
    opt_in: bool,
    quirks: Quirks,
) -> vfmig_vfio::contract::ContractReport {
    let cfg = config(MigrationCaps::ALL, quirks, false).with_precopy_info(version, Some(0));
    let opts = ContractOptions {
        exact_stop_copy_size: true,
        allow_precopy_zero: quirks == Quirks::mtty(),
        refusal_goes_to_error: !quirks.refusal_stays_resuming,
        precopy_info_v2: opt_in,
        ..ContractOptions::default()
    };
    let src_cfg = cfg.clone();
    run_all(
        || EmulatedDevice::new(src_cfg.clone()).expect("source device"),
        || EmulatedDevice::new(cfg.clone()).expect("destination device"),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{version:?} opt-in {opt_in} {quirks:?}: {e}"))
}

#[test]
fn contract_holds_with_precopy_info_v2_and_a_reinit_is_reported_only_after_the_opt_in() {
    for quirks in [Quirks::uapi(), Quirks::mtty()] {
        let v2 = run_reinit(PrecopyInfoVersion::V2, true, quirks);
        assert!(v2.precopy_info_v2, "{quirks:?}: the opt-in took");
        assert_eq!(
            v2.precopy_reinits, 1,
            "{quirks:?}: the re-initialisation was reported, its initial data read and resumed"
        );
        // A v2 device not opted in behaves as v1: its new initial data is dirty data.
        let not_opted = run_reinit(PrecopyInfoVersion::V2, false, quirks);
        assert!(!not_opted.precopy_info_v2);
        assert_eq!(not_opted.precopy_reinits, 0, "{quirks:?}");
        // A v1 kernel refuses the opt-in; the suite falls back to the v1 rules.
        let v1 = run_reinit(PrecopyInfoVersion::V1, true, quirks);
        assert!(!v1.precopy_info_v2);
        assert_eq!(v1.precopy_reinits, 0, "{quirks:?}");
        assert!(v1.passed.contains(&"precopy"));
    }
}

#[test]
fn precopy_info_v2_opt_in_is_refused_without_pre_copy_as_the_kernel_does() {
    use vfmig_vfio::MigrationDevice;
    let cfg = config(MigrationCaps::STOP_COPY, Quirks::uapi(), false)
        .with_precopy_info(PrecopyInfoVersion::V2, None);
    let mut dev = EmulatedDevice::new(cfg).unwrap();
    assert!(!dev.enable_precopy_info_v2().unwrap());
}

/// Quirks the memory-speed data fd supports: all but `short_reads` (and the PRE_COPY-only ones,
/// which a STOP_COPY-only device never reaches).
fn mem_quirks() -> [Quirks; 2] {
    [
        Quirks::uapi(),
        Quirks {
            short_reads: false,
            ..Quirks::mtty()
        },
    ]
}

#[test]
fn contract_holds_for_the_memory_speed_data_fd_for_every_capability_set_it_supports() {
    // Every capability set without PRE_COPY (the memory-speed data fd refuses PRE_COPY).
    for caps in MigrationCaps::all_subsets()
        .filter(|c| c.contains(MigrationCaps::STOP_COPY) && !c.contains(MigrationCaps::PRE_COPY))
    {
        for quirks in mem_quirks() {
            for guest in [false, true] {
                run_with(config(caps, quirks, guest).with_data_fd(DataFdBackend::Mem));
            }
        }
    }
}

#[test]
fn contract_holds_between_a_fuse_and_a_memory_speed_data_fd_either_way() {
    let fuse = config(
        MigrationCaps::STOP_COPY | MigrationCaps::P2P,
        Quirks::uapi(),
        false,
    );
    let mem = fuse.clone().with_data_fd(DataFdBackend::Mem);
    let opts = ContractOptions {
        exact_stop_copy_size: true,
        ..ContractOptions::default()
    };
    for (a, b) in [(&fuse, &mem), (&mem, &fuse)] {
        run_all(
            || EmulatedDevice::new(a.clone()).expect("source device"),
            || EmulatedDevice::new(b.clone()).expect("destination device"),
            &opts,
        )
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", a.data_fd, b.data_fd));
    }
}

#[test]
fn contract_detects_a_memory_speed_device_whose_stream_ends_early_or_that_refuses() {
    let cfg =
        config(MigrationCaps::STOP_COPY, Quirks::uapi(), false).with_data_fd(DataFdBackend::Mem);
    let mut early = cfg.clone();
    early.faults.early_end_at = Some(100_000);
    let mut refusing = cfg.clone();
    refusing.faults.refuse_resume = true;
    for (src, dst) in [(&early, &cfg), (&cfg, &refusing)] {
        let err = run_all(
            || EmulatedDevice::new(src.clone()).unwrap(),
            || EmulatedDevice::new(dst.clone()).unwrap(),
            &ContractOptions::default(),
        )
        .expect_err("a truncated stream or a refusing device must fail the suite");
        assert_eq!(err.check, "transfer");
    }
}
