//! Pre-copy `initial_bytes` across a run: the `MIG_PRECOPY_INFOv2` opt-in and what
//! `VFIO_PRECOPY_INFO_REINIT` does to switchover readiness.
//!
//! A device is ready for STOP_COPY once its `initial_bytes` reached 0 (uAPI: leaving PRE_COPY
//! earlier may make things slower; the destination may need the initial data early). Under v1
//! `initial_bytes` only decreases, so readiness, once reached, stays. Under v2 (Linux 7.1, opted
//! in per device where offered, see [`MigrationDevice::enable_precopy_info_v2`]) a REINIT report
//! means new initial data is on the stream: the device is not ready again until `initial_bytes`
//! is back to 0, and the source keeps reading it in PRE_COPY. New initial data that appears
//! after the source has left its pre-copy loop (while the reader quiesces) travels in STOP_COPY.

use vfmig_vfio::{MigrationDevice, PrecopyInfo};

use crate::api::DeviceReport;

/// Per device of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Dev {
    v2: bool,
    reinits: u64,
}

/// Readiness of every device of a run, from their pre-copy information.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct InitialData {
    devs: Vec<Dev>,
}

impl InitialData {
    /// Opts every device in to `MIG_PRECOPY_INFOv2` where the kernel and the driver offer it.
    /// A device that refuses keeps v1, which is complete without REINIT; the report says
    /// which protocol each device ran.
    pub(crate) fn opt_in<D: MigrationDevice>(devices: &mut [D]) -> InitialData {
        InitialData {
            devs: devices
                .iter_mut()
                .map(|d| Dev {
                    v2: d.enable_precopy_info_v2().unwrap_or(false),
                    ..Dev::default()
                })
                .collect(),
        }
    }

    /// One `precopy_info` of device `i`. Returns true for a REINIT: the device has new initial
    /// data and is not ready for STOP_COPY until `initial_bytes` is 0 again (the caller's
    /// readiness test is `initial_bytes == 0`, which the REINIT report fails by definition; what
    /// it must reset is any accounting that assumed the initial data was done).
    pub(crate) fn observe(&mut self, i: usize, info: &PrecopyInfo) -> bool {
        let Some(d) = self.devs.get_mut(i) else {
            return false;
        };
        // `reinit` is only ever set after the opt-in (MigrationDevice::precopy_info).
        let reinit = d.v2 && info.reinit;
        if reinit {
            d.reinits += 1;
        }
        reinit
    }

    /// Puts what each device ran and saw into the report.
    pub(crate) fn fill(&self, devices: &mut [DeviceReport]) {
        for (r, d) in devices.iter_mut().zip(&self.devs) {
            r.precopy_info_v2 = d.v2;
            r.precopy_reinits = d.reinits;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(initial_bytes: u64, reinit: bool) -> PrecopyInfo {
        PrecopyInfo {
            initial_bytes,
            dirty_bytes: 0,
            reinit,
        }
    }

    #[test]
    fn a_reinit_after_the_opt_in_is_reported_and_counted_once() {
        let mut t = InitialData {
            devs: vec![Dev {
                v2: true,
                ..Dev::default()
            }],
        };
        assert!(!t.observe(0, &info(100, false)));
        assert!(!t.observe(0, &info(0, false)));
        assert!(
            t.observe(0, &info(50, true)),
            "REINIT is reported to the caller"
        );
        assert!(!t.observe(0, &info(0, false)));
        assert_eq!(t.devs[0].reinits, 1);
    }

    #[test]
    fn a_reinit_flag_from_a_device_without_the_opt_in_is_ignored() {
        let mut t = InitialData {
            devs: vec![Dev::default()],
        };
        assert!(!t.observe(0, &info(0, true)));
        assert_eq!(t.devs[0].reinits, 0);
        assert!(
            !t.observe(7, &info(0, true)),
            "an unknown device is ignored"
        );
    }
}
