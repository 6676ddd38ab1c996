//! The final report of a session, built from the stage counters.

use std::time::Duration;

use vfmig_vfio::DeviceState;

use crate::api::{ratio, DeviceReport, Report, Stage, StageTimes};
use crate::codec::Choice;
use crate::stats::{Counters, DeviceCounters};

/// The codec in use, as the report names it.
pub(crate) fn describe(c: Choice) -> String {
    match c {
        Choice::Raw => "none".to_owned(),
        Choice::Lz4 => "lz4".to_owned(),
        Choice::Zstd(l) => format!("zstd:{l}"),
    }
}

/// Builds a report from the counters.
pub(crate) fn build_report(
    counters: &Counters,
    devices: Vec<(String, Option<DeviceState>)>,
    elapsed: Duration,
    downtime: Option<Duration>,
    workers: usize,
    codec: &str,
) -> Report {
    let devices: Vec<DeviceReport> = devices
        .into_iter()
        .zip(&counters.devices)
        .map(|((name, final_state), c)| {
            let raw = DeviceCounters::load(&c.raw);
            let wire = DeviceCounters::load(&c.wire);
            DeviceReport {
                name,
                raw_bytes: raw,
                precopy_bytes: DeviceCounters::load(&c.precopy_raw),
                wire_bytes: wire,
                ratio: ratio(raw, wire),
                zero_chunks: DeviceCounters::load(&c.zero_chunks),
                raw_chunks: DeviceCounters::load(&c.raw_chunks),
                compressed_chunks: DeviceCounters::load(&c.compressed_chunks),
                guest_page_bytes: DeviceCounters::load(&c.guest),
                precopy_info_v2: false,
                precopy_reinits: 0,
                final_state,
            }
        })
        .collect();
    let raw_bytes = devices.iter().map(|d| d.raw_bytes).sum();
    let wire_bytes = devices.iter().map(|d| d.wire_bytes).sum();
    let stages = StageTimes {
        data_fd: counters.fd_stage.get(),
        codec: counters.codec.get(),
        network: counters.net.get(),
        waiting_downstream: counters.buffer_wait.get(),
    };
    // Busy time per thread of each stage: the largest is the stage that limited the run.
    let per_thread = [
        (Stage::DataFd, stages.data_fd),
        (
            Stage::Codec,
            stages.codec / u32::try_from(workers.max(1)).unwrap_or(1),
        ),
        (Stage::Network, stages.network),
    ];
    let limiting_stage = per_thread
        .iter()
        .max_by_key(|(_, t)| *t)
        .map_or(Stage::Network, |(s, _)| *s);
    Report {
        devices,
        raw_bytes,
        wire_bytes,
        ratio: ratio(raw_bytes, wire_bytes),
        elapsed,
        throughput_bps: raw_bytes as f64 / elapsed.as_secs_f64().max(1e-6),
        downtime,
        stages,
        limiting_stage,
        codec: codec.to_owned(),
        outcome: None,
        max_downtime_exceeded: false,
        first_data_at: counters.first_send.get().copied(),
        final_ack_at: None,
    }
}

impl Counters {
    pub(crate) fn total_raw(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| DeviceCounters::load(&d.raw))
            .sum()
    }

    /// Device state and dirty guest page bytes moved so far: what the inactivity timeouts
    /// watch.
    pub(crate) fn total_moved(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| DeviceCounters::load(&d.raw).saturating_add(DeviceCounters::load(&d.guest)))
            .fold(0, u64::saturating_add)
    }
}
