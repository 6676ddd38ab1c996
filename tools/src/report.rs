//! The final report: one JSON object on stdout (`--json`), or a readable summary on stderr.
//!
//! JSON schema (stable; scripts read it):
//! ```text
//! { "outcome": "ok" | "failed" | "in-doubt", "role": "send" | "recv" | "demo",
//!   "error": null | "<the one-line message>", "exit_code": 0 | 1 | 2 | 3,
//!   "guidance": null | "<in doubt: which side holds valid state and how to finish>",
//!   "max_downtime_exceeded": bool,
//!   "peer": null | "ADDR", "elapsed_ms": f64, "downtime_ms": null | f64,
//!   "raw_bytes": u64, "wire_bytes": u64, "ratio": f64, "throughput_bytes_per_sec": f64,
//!   "limiting_stage": null | "device" | "codec" | "network",
//!   "stages_busy_ms": { "device": f64, "codec": f64, "network": f64, "buffer_wait": f64 },
//!   "devices": [ { "index": n, "name": s, "kind": "emu"|"file"|"vfio",
//!                  "raw_bytes": u64, "wire_bytes": u64, "precopy_bytes": u64, "ratio": f64,
//!                  "throughput_bytes_per_sec": f64, "downtime_ms": null | f64,
//!                  "accepted": bool, "final_state": null | "RUNNING" | "STOP" | ... } ],
//!   "started_at_ns": u64, "first_data_at_ns": null | u64, "final_ack_at_ns": null | u64 }
//! ```
//! The three instants are wall-clock (`CLOCK_REALTIME`) nanoseconds since the Unix epoch, for
//! lining this process up with others on the same host (`vfmig-bench cli` measures setup and
//! exit time from them): `started_at_ns` when `main` began; `first_data_at_ns` (send) when the
//! first device-state frame went to the transport; `final_ack_at_ns` when the destination's
//! final outcome arrived (send) or was sent (recv). Null where the instant did not happen.
//! `devices` is also filled on a migration failure (figures 0), so that `final_state` says
//! where each device was left: the kernel name of its VFIO state when the command ended (for
//! `file:` devices, the state the stream adapter models), or null if it could not be read.
//! `ratio` is raw / wire (2.5 means the wire carried 40 % of the bytes); 0 when nothing moved,
//! null for an all-zero stream (nothing on the wire). A device's throughput and downtime are over
//! the whole session: devices stream concurrently and stop together.
//! `accepted` is true only when the destination device accepted its state (RESUMING -> STOP; a
//! destination device resumed after the commit, final state RUNNING, had accepted it).

use serde::Serialize;

use crate::error::{describe, CliError};
use crate::units::{human_bits_f, human_bytes, human_bytes_f};

/// Per-device figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceJson {
    /// Position on the command line.
    pub index: usize,
    /// Name given to the library.
    pub name: String,
    /// `emu`, `file`, `vfio`.
    pub kind: &'static str,
    /// Bytes of device state (raw stream) moved.
    pub raw_bytes: u64,
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    /// Raw bytes moved while the device ran (PRE_COPY).
    pub precopy_bytes: u64,
    /// raw / wire.
    pub ratio: f64,
    /// Raw bytes per second over the device's transfer.
    pub throughput_bytes_per_sec: f64,
    /// Time the device was stopped (ms), if it was.
    pub downtime_ms: Option<f64>,
    /// Whether the destination device accepted its state.
    pub accepted: bool,
    /// The device's state when the command ended (`RUNNING`, `STOP`, ...), if it could be read.
    pub final_state: Option<&'static str>,
}

impl DeviceJson {
    /// A device that moved nothing (a failure report), left in `final_state`.
    pub fn untouched(
        index: usize,
        name: String,
        kind: &'static str,
        final_state: Option<&'static str>,
    ) -> DeviceJson {
        DeviceJson {
            index,
            name,
            kind,
            raw_bytes: 0,
            wire_bytes: 0,
            precopy_bytes: 0,
            ratio: 0.0,
            throughput_bytes_per_sec: 0.0,
            downtime_ms: None,
            accepted: false,
            final_state,
        }
    }
}

/// Busy time per stage, summed over its threads.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct StagesJson {
    /// Data-fd reads (source) or writes (destination).
    pub device: f64,
    /// Compression or decompression.
    pub codec: f64,
    /// Sending or receiving.
    pub network: f64,
    /// Waiting for a free buffer.
    pub buffer_wait: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReportJson {
    /// `ok`, `failed` or `in-doubt`.
    pub outcome: &'static str,
    /// `send`, `recv` or `demo`.
    pub role: &'static str,
    /// The failure line, if any.
    pub error: Option<String>,
    /// The exit status the command returns.
    pub exit_code: u8,
    /// In doubt: which side holds valid state and how to finish.
    pub guidance: Option<&'static str>,
    /// The measured downtime exceeded `--max-downtime` (source).
    pub max_downtime_exceeded: bool,
    /// The peer's address, once known.
    pub peer: Option<String>,
    /// Wall time of the migration (ms).
    pub elapsed_ms: f64,
    /// Downtime as the VMM sees it (ms): from the first device stopping to the destination's
    /// outcome after the commit.
    pub downtime_ms: Option<f64>,
    /// Sum over devices.
    pub raw_bytes: u64,
    /// Sum over devices.
    pub wire_bytes: u64,
    /// raw / wire over all devices.
    pub ratio: f64,
    /// Raw bytes per second over the whole migration.
    pub throughput_bytes_per_sec: f64,
    /// The stage with the most busy time.
    pub limiting_stage: Option<&'static str>,
    /// Busy time per stage (ms).
    pub stages_busy_ms: StagesJson,
    /// Per device.
    pub devices: Vec<DeviceJson>,
    /// When this process's `main` began (wall clock, ns since the epoch).
    pub started_at_ns: u64,
    /// Send: when the first device-state frame went to the transport (ns since the epoch).
    pub first_data_at_ns: Option<u64>,
    /// When the destination's final outcome arrived (send) or was sent (recv).
    pub final_ack_at_ns: Option<u64>,
}

/// When `main` began; set once by [`mark_process_start`].
static PROCESS_START: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// Notes the process's start (called first thing in `main`; later calls change nothing).
pub fn mark_process_start() {
    PROCESS_START.get_or_init(std::time::SystemTime::now);
}

/// A wall-clock instant as ns since the Unix epoch (0 before it).
pub fn epoch_ns(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// [`mark_process_start`]'s instant, in ns since the epoch (now, if it was never marked).
pub fn process_started_at_ns() -> u64 {
    epoch_ns(*PROCESS_START.get_or_init(std::time::SystemTime::now))
}

/// raw / wire, 0 when nothing moved.
pub fn ratio(raw: u64, wire: u64) -> f64 {
    if wire == 0 {
        if raw == 0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        raw as f64 / wire as f64
    }
}

/// Bytes per second, 0 for an empty interval.
pub fn per_sec(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

/// The stage with the most busy time, if any was busy.
pub fn limiting(stages: &StagesJson) -> Option<&'static str> {
    let all = [
        ("device", stages.device),
        ("codec", stages.codec),
        ("network", stages.network),
    ];
    all.iter()
        .filter(|(_, t)| *t > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, _)| *n)
}

impl ReportJson {
    /// A report for a failure before any figures exist.
    pub fn failure(role: &'static str, e: &CliError) -> ReportJson {
        let guidance = e.in_doubt_guidance();
        ReportJson {
            outcome: if guidance.is_some() {
                "in-doubt"
            } else {
                "failed"
            },
            role,
            error: Some(describe(e)),
            exit_code: e.exit_code(),
            guidance,
            max_downtime_exceeded: false,
            peer: None,
            elapsed_ms: 0.0,
            downtime_ms: None,
            raw_bytes: 0,
            wire_bytes: 0,
            ratio: 0.0,
            throughput_bytes_per_sec: 0.0,
            limiting_stage: None,
            stages_busy_ms: StagesJson::default(),
            devices: Vec::new(),
            started_at_ns: process_started_at_ns(),
            first_data_at_ns: None,
            final_ack_at_ns: None,
        }
    }

    /// Serialises to one line of JSON (infinite ratios become null).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"outcome\":\"failed\",\"error\":\"cannot serialise report: {e}\"}}")
        })
    }

    /// The readable summary (several lines, for stderr or the demo).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let secs = self.elapsed_ms / 1000.0;
        s.push_str(&format!(
            "{} {} in {:.2} s: {} of state, {} on the wire (ratio {}), {}\n",
            self.role,
            if self.outcome == "ok" {
                "succeeded"
            } else {
                "FAILED"
            },
            secs,
            human_bytes(self.raw_bytes),
            human_bytes(self.wire_bytes),
            fmt_ratio(self.ratio),
            fmt_rate(self.throughput_bytes_per_sec),
        ));
        if let Some(d) = self.downtime_ms {
            s.push_str(&format!("  downtime: {d:.1} ms\n"));
        }
        if let Some(l) = self.limiting_stage {
            let st = &self.stages_busy_ms;
            s.push_str(&format!(
                "  limited by: {l} (busy ms: device {:.0}, codec {:.0}, network {:.0}, buffer wait {:.0})\n",
                st.device, st.codec, st.network, st.buffer_wait
            ));
        }
        for d in &self.devices {
            s.push_str(&format!(
                "  device {} ({}, {}): {} raw, {} wire (ratio {}), {} pre-copy, {}{}{}\n",
                d.index,
                d.kind,
                d.name,
                human_bytes(d.raw_bytes),
                human_bytes(d.wire_bytes),
                fmt_ratio(d.ratio),
                human_bytes(d.precopy_bytes),
                fmt_rate(d.throughput_bytes_per_sec),
                d.downtime_ms
                    .map_or_else(String::new, |t| format!(", downtime {t:.1} ms")),
                if d.accepted {
                    ", accepted by the destination"
                } else {
                    ""
                },
            ));
        }
        s
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}:1")
    } else {
        "all zero".to_owned()
    }
}

fn fmt_rate(bytes_per_sec: f64) -> String {
    let b = bytes_per_sec.max(0.0);
    format!("{}/s ({})", human_bytes_f(b), human_bits_f(b * 8.0))
}

/// The JSON for a failure that has no report of its own.
pub fn failure_json(role: &'static str, e: &CliError) -> String {
    ReportJson::failure(role, e).to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UsageError;

    fn sample() -> ReportJson {
        ReportJson {
            outcome: "ok",
            role: "send",
            guidance: None,
            max_downtime_exceeded: false,
            error: None,
            exit_code: 0,
            peer: Some("127.0.0.1:7000".into()),
            elapsed_ms: 2000.0,
            downtime_ms: Some(120.5),
            raw_bytes: 1 << 30,
            wire_bytes: 1 << 29,
            ratio: 2.0,
            throughput_bytes_per_sec: 512.0 * 1024.0 * 1024.0,
            limiting_stage: Some("network"),
            stages_busy_ms: StagesJson {
                device: 100.0,
                codec: 900.0,
                network: 1900.0,
                buffer_wait: 0.0,
            },
            devices: vec![DeviceJson {
                index: 0,
                name: "emu0".into(),
                kind: "emu",
                raw_bytes: 1 << 30,
                wire_bytes: 1 << 29,
                precopy_bytes: 1 << 28,
                ratio: 2.0,
                throughput_bytes_per_sec: 512.0 * 1024.0 * 1024.0,
                downtime_ms: Some(120.5),
                accepted: true,
                final_state: Some("STOP"),
            }],
            started_at_ns: 1_700_000_000_000_000_000,
            first_data_at_ns: Some(1_700_000_000_100_000_000),
            final_ack_at_ns: Some(1_700_000_002_000_000_000),
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("valid JSON");
        for key in [
            "outcome",
            "role",
            "error",
            "exit_code",
            "peer",
            "elapsed_ms",
            "downtime_ms",
            "raw_bytes",
            "wire_bytes",
            "ratio",
            "throughput_bytes_per_sec",
            "limiting_stage",
            "stages_busy_ms",
            "devices",
            "started_at_ns",
            "first_data_at_ns",
            "final_ack_at_ns",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        let d = &v["devices"][0];
        for key in [
            "index",
            "name",
            "kind",
            "raw_bytes",
            "wire_bytes",
            "precopy_bytes",
            "ratio",
            "throughput_bytes_per_sec",
            "downtime_ms",
            "accepted",
        ] {
            assert!(d.get(key).is_some(), "missing devices[0].{key}");
        }
    }

    #[test]
    fn failure_json_carries_the_message_and_exit_code() {
        let e = CliError::Usage(UsageError::StdinTwice);
        let v: serde_json::Value = serde_json::from_str(&failure_json("send", &e)).expect("JSON");
        assert_eq!(v["outcome"], "failed");
        assert_eq!(v["exit_code"], 2);
        assert_eq!(v["error"], describe(&e));
    }

    #[test]
    fn limiting_stage_is_the_busiest_one() {
        assert_eq!(limiting(&sample().stages_busy_ms), Some("network"));
        assert_eq!(limiting(&StagesJson::default()), None);
    }

    #[test]
    fn ratio_handles_empty_and_all_zero_streams() {
        assert_eq!(ratio(0, 0), 0.0);
        assert!(ratio(10, 0).is_infinite());
        assert_eq!(ratio(10, 5), 2.0);
        let mut r = sample();
        r.ratio = f64::INFINITY;
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
        assert!(v["ratio"].is_null(), "infinite ratio serialises as null");
    }

    #[test]
    fn summary_mentions_sizes_ratio_downtime_and_limiting_stage() {
        let s = sample().summary();
        for needle in [
            "1.0 GiB",
            "2.00:1",
            "downtime: 120.5 ms",
            "limited by: network",
            "accepted",
        ] {
            assert!(s.contains(needle), "{needle} missing in {s}");
        }
    }
}
