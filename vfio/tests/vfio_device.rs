//! `VfioDevice` on a kernel without VFIO: ioctl numbers and feature-buffer encoding, typed errors
//! on non-VFIO fds, and path resolution against a fake sysfs tree. The real device is exercised by
//! `tools/mtty-harness` (nested guest with the mtty driver).

use std::fs::{self, File};
use std::mem::{offset_of, size_of};
use std::os::unix::fs::symlink;
use std::path::Path;

use vfio_bindings::bindings::vfio as b;
use vfmig_vfio::sys::{self, feature_header, FeatureBuf, FeatureOp};
use vfmig_vfio::{DeviceError, OpenPlan, VfioDevice};

#[test]
fn ioctl_numbers_match_vfio_h() {
    // _IO(';', 100 + n) as spelled in include/uapi/linux/vfio.h.
    let expect = [
        (sys::VFIO_GET_API_VERSION, 0x3b64),
        (sys::VFIO_CHECK_EXTENSION, 0x3b65),
        (sys::VFIO_SET_IOMMU, 0x3b66),
        (sys::VFIO_GROUP_GET_STATUS, 0x3b67),
        (sys::VFIO_GROUP_SET_CONTAINER, 0x3b68),
        (sys::VFIO_GROUP_GET_DEVICE_FD, 0x3b6a),
        (sys::VFIO_DEVICE_GET_INFO, 0x3b6b),
        (sys::VFIO_DEVICE_GET_REGION_INFO, 0x3b6c),
        (sys::VFIO_DEVICE_RESET, 0x3b6f),
        (sys::VFIO_DEVICE_FEATURE, 0x3b75),
        (sys::VFIO_DEVICE_BIND_IOMMUFD, 0x3b76),
        (sys::VFIO_MIG_GET_PRECOPY_INFO, 0x3b79),
    ];
    for (got, want) in expect {
        assert_eq!(got, want, "ioctl {got:#x} should be {want:#x}");
    }
}

#[test]
fn feature_op_flags_combine_op_bits_and_feature_index() {
    let f = b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    assert_eq!(FeatureOp::Get.flags(f), 0x1_0002);
    assert_eq!(FeatureOp::Set.flags(f), 0x2_0002);
    assert_eq!(FeatureOp::ProbeGet.flags(f), 0x5_0002);
    assert_eq!(FeatureOp::ProbeSet.flags(f), 0x6_0002);
    // Bits outside the feature mask never leak into the op bits.
    assert_eq!(FeatureOp::Get.flags(0xffff_0009), 0x1_0009);
}

#[test]
fn mig_state_feature_buffer_has_payload_at_data_and_argsz_covers_it() {
    type Buf = FeatureBuf<b::vfio_device_feature_mig_state>;
    let buf = Buf::new(
        FeatureOp::Set,
        b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        b::vfio_device_feature_mig_state {
            device_state: b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            data_fd: -1,
        },
    );
    assert_eq!(sys::FEATURE_HEADER_SIZE, 8);
    assert_eq!(offset_of!(Buf, payload), sys::FEATURE_HEADER_SIZE);
    assert_eq!(size_of::<Buf>(), 16);
    assert_eq!(buf.header.argsz, 16);
    assert_eq!(buf.header.flags, 0x2_0002);
    assert_eq!(buf.payload.device_state, 3);
    assert_eq!(buf.payload.data_fd, -1);
}

#[test]
fn every_feature_buffer_is_header_plus_payload_with_no_padding() {
    fn check<T: Copy + Default>(feature: u32, payload_size: usize) {
        let buf = FeatureBuf::new(FeatureOp::Get, feature, T::default());
        assert_eq!(size_of::<T>(), payload_size, "payload of feature {feature}");
        assert_eq!(offset_of!(FeatureBuf<T>, payload), 8, "feature {feature}");
        assert_eq!(
            size_of::<FeatureBuf<T>>(),
            8 + payload_size,
            "feature {feature}"
        );
        assert_eq!(
            buf.header.argsz as usize,
            8 + payload_size,
            "feature {feature}"
        );
    }
    check::<b::vfio_device_feature_migration>(b::VFIO_DEVICE_FEATURE_MIGRATION, 8);
    check::<b::vfio_device_feature_mig_state>(b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8);
    check::<b::vfio_device_feature_mig_data_size>(b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8);
    check::<b::vfio_device_feature_dma_logging_control>(
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        24,
    );
    check::<b::vfio_device_feature_dma_logging_report>(
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        32,
    );
    // The range list START points at: 16 bytes per range, 256 per 4 KiB page.
    assert_eq!(size_of::<b::vfio_device_feature_dma_logging_range>(), 16);
}

#[test]
fn payloadless_feature_calls_are_just_the_header() {
    let probe = feature_header(
        FeatureOp::ProbeSet,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    );
    assert_eq!(probe.argsz, 8);
    assert_eq!(probe.flags, 0x6_0006);
    let stop = feature_header(FeatureOp::Set, b::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
    assert_eq!(stop.argsz, 8);
    assert_eq!(stop.flags, 0x2_0007);
}

fn assert_ioctl_error(err: &DeviceError, want_op: &str, want_errno: i32) {
    match err {
        DeviceError::Ioctl { op, source, .. } => {
            assert_eq!(*op, want_op, "{err}");
            assert_eq!(source.raw_os_error(), Some(want_errno), "{err}");
        }
        other => panic!("expected an Ioctl error for {want_op}, got {other:?}"),
    }
    assert!(
        err.to_string().contains(want_op),
        "message names the op: {err}"
    );
}

#[test]
fn adopting_dev_null_fails_with_get_info_enotty() {
    let fd = File::open("/dev/null").expect("open /dev/null").into();
    let err = VfioDevice::from_fd(fd, "null").expect_err("/dev/null is not a VFIO device");
    assert_ioctl_error(&err, "VFIO_DEVICE_GET_INFO", libc::ENOTTY);
    assert_eq!(err.errno(), Some(libc::ENOTTY));
    assert!(
        err.to_string().contains("null"),
        "message names the device: {err}"
    );
}

#[test]
fn adopting_a_regular_file_fails_with_get_info_enotty() {
    let f = tempfile::tempfile().expect("tempfile");
    let err = VfioDevice::from_fd(f.into(), "plain file").expect_err("not a VFIO device");
    assert_ioctl_error(&err, "VFIO_DEVICE_GET_INFO", libc::ENOTTY);
}

#[test]
fn group_api_on_a_non_group_file_fails_with_group_get_status_enotty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = dir.path().join("7");
    fs::write(&group, b"").expect("fake group");
    let err = VfioDevice::open_group(&group, "0000:00:01.0").expect_err("not a VFIO group");
    assert_ioctl_error(&err, "VFIO_GROUP_GET_STATUS", libc::ENOTTY);
}

#[test]
fn group_api_with_a_missing_group_fails_to_open_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = VfioDevice::open_group(&dir.path().join("42"), "dev").expect_err("no group");
    match &err {
        DeviceError::Open { what, source, .. } => {
            assert_eq!(*what, "open VFIO group");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected Open, got {other:?}"),
    }
}

#[test]
fn cdev_open_of_a_missing_cdev_fails_naming_the_step() {
    let err =
        VfioDevice::open_cdev(Path::new("/nonexistent/vfio/devices/vfio0")).expect_err("no cdev");
    match &err {
        DeviceError::Open { what, source, .. } => {
            assert_eq!(*what, "open VFIO cdev");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected Open, got {other:?}"),
    }
}

/// A fake sysfs + /dev/vfio: `sys/devices/<parent>/<name>` with an `iommu_group` link to
/// `sys/kernel/iommu_groups/<group>`, and `sys/bus/<bus>/devices/<name>` linking to it.
struct FakeSys {
    root: tempfile::TempDir,
}

impl FakeSys {
    fn new() -> FakeSys {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("dev/vfio/devices")).expect("dev");
        FakeSys { root }
    }
    fn dev_vfio(&self) -> std::path::PathBuf {
        self.root.path().join("dev/vfio")
    }
    fn device(&self, bus: &str, name: &str, group: &str) -> std::path::PathBuf {
        let r = self.root.path();
        let real = r.join("sys/devices/virtual/parent").join(name);
        fs::create_dir_all(&real).expect("device dir");
        let g = r.join("sys/kernel/iommu_groups").join(group);
        fs::create_dir_all(&g).expect("group dir");
        symlink(&g, real.join("iommu_group")).expect("iommu_group link");
        let bus_dir = r.join("sys/bus").join(bus).join("devices");
        fs::create_dir_all(&bus_dir).expect("bus dir");
        let link = bus_dir.join(name);
        symlink(&real, &link).expect("bus link");
        link
    }
}

#[test]
fn mdev_sysfs_path_resolves_to_its_group_and_uuid() {
    let fake = FakeSys::new();
    let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let path = fake.device("mdev", uuid, "12");
    fs::write(fake.dev_vfio().join("12"), b"").expect("group node");
    let plan = VfioDevice::resolve(&path, &fake.dev_vfio()).expect("resolves");
    assert_eq!(
        plan,
        OpenPlan::Group {
            group: 12,
            group_path: fake.dev_vfio().join("12"),
            device_name: uuid.into(),
        }
    );
}

#[test]
fn pci_sysfs_path_resolves_to_its_group_and_bdf() {
    let fake = FakeSys::new();
    let bdf = "0000:3b:00.1";
    let path = fake.device("pci", bdf, "5");
    fs::write(fake.dev_vfio().join("5"), b"").expect("group node");
    match VfioDevice::resolve(&path, &fake.dev_vfio()).expect("resolves") {
        OpenPlan::Group {
            group, device_name, ..
        } => {
            assert_eq!(group, 5);
            assert_eq!(device_name, bdf);
        }
        other => panic!("expected a group plan, got {other:?}"),
    }
}

#[test]
fn sysfs_device_without_a_group_node_falls_back_to_its_cdev() {
    let fake = FakeSys::new();
    let path = fake.device("pci", "0000:00:04.0", "3");
    fs::create_dir_all(path.join("vfio-dev/vfio2")).expect("vfio-dev");
    fs::write(fake.dev_vfio().join("devices/vfio2"), b"").expect("cdev node");
    let plan = VfioDevice::resolve(&path, &fake.dev_vfio()).expect("resolves");
    assert_eq!(
        plan,
        OpenPlan::Cdev {
            path: fake.dev_vfio().join("devices/vfio2")
        }
    );
}

#[test]
fn opening_a_resolved_group_that_is_not_a_vfio_group_fails_at_group_get_status() {
    let fake = FakeSys::new();
    let path = fake.device("mdev", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002", "9");
    fs::write(fake.dev_vfio().join("9"), b"").expect("group node");
    let plan = VfioDevice::resolve(&path, &fake.dev_vfio()).expect("resolves");
    let err = VfioDevice::open_plan(&plan).expect_err("not VFIO");
    assert_ioctl_error(&err, "VFIO_GROUP_GET_STATUS", libc::ENOTTY);
}

#[test]
fn cdev_paths_resolve_by_shape_alone() {
    let dev = Path::new("/dev/vfio");
    let plan = VfioDevice::resolve(Path::new("/dev/vfio/devices/vfio0"), dev).expect("cdev");
    assert_eq!(
        plan,
        OpenPlan::Cdev {
            path: "/dev/vfio/devices/vfio0".into()
        }
    );
}

#[test]
fn a_bare_group_path_is_refused_because_it_names_no_device() {
    let err = VfioDevice::resolve(Path::new("/dev/vfio/12"), Path::new("/dev/vfio"))
        .expect_err("needs a device name");
    assert!(matches!(&err, DeviceError::Open { .. }), "{err:?}");
    assert_eq!(err.errno(), Some(libc::EINVAL));
}

#[test]
fn missing_paths_fail_with_enoent_naming_the_path() {
    let err = VfioDevice::open("/nonexistent/sys/bus/mdev/devices/x").expect_err("missing");
    match &err {
        DeviceError::Open { path, source, .. } => {
            assert_eq!(path, "/nonexistent/sys/bus/mdev/devices/x");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected Open, got {other:?}"),
    }
}

#[test]
fn a_char_device_that_is_not_vfio_is_refused_by_open() {
    let err = VfioDevice::open("/dev/null").expect_err("not VFIO");
    assert!(matches!(err, DeviceError::NotVfio { .. }), "{err:?}");
}

#[test]
fn a_directory_without_iommu_group_is_not_vfio() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = VfioDevice::resolve(dir.path(), Path::new("/dev/vfio")).expect_err("no group");
    assert!(matches!(err, DeviceError::NotVfio { .. }), "{err:?}");
}

#[test]
fn an_iommu_group_link_to_a_non_number_is_not_vfio() {
    let dir = tempfile::tempdir().expect("tempdir");
    symlink("../groups/abc", dir.path().join("iommu_group")).expect("link");
    let err = VfioDevice::resolve(dir.path(), Path::new("/dev/vfio")).expect_err("bad group");
    assert!(matches!(err, DeviceError::NotVfio { .. }), "{err:?}");
}
