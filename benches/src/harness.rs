//! The link-scenario harness behind `vfmig-bench run`: runs each side of a migration as its own
//! process (inside a network namespace when the link is a rate-limited veth), collects what each
//! side measured, and turns it into rows with throughput ratios and the limit that applied.
//!
//! The protocol between the orchestrator and a side process is two stdout lines: the receiver
//! prints `LISTENING` once its socket is bound, and every side prints one `RESULT k=v ...` line at
//! the end ([`SideResult`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};

/// Which implementation moves the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Impl {
    /// The QEMU-style synchronous 1 MiB loop ([`crate::reference`]).
    Reference,
    /// vfmig's pipeline with default settings (auto compression, default streams).
    Vfmig,
}

impl Impl {
    /// The spelling on the command line and in results.
    pub const fn as_str(self) -> &'static str {
        match self {
            Impl::Reference => "ref",
            Impl::Vfmig => "vfmig",
        }
    }

    /// Parses [`Impl::as_str`].
    pub fn from_name(s: &str) -> Option<Impl> {
        match s {
            "ref" => Some(Impl::Reference),
            "vfmig" => Some(Impl::Vfmig),
            _ => None,
        }
    }
}

/// A link to run over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Link {
    /// 127.0.0.1, no rate limit: both sides compete only for CPU.
    Loopback,
    /// `tools/netns.sh` veth pair limited by tbf to this many bits per second.
    Veth {
        /// tbf rate in bits per second.
        bits_per_sec: u64,
    },
}

impl Link {
    /// The rate as `tc` spells it (`2500mbit`); `None` for loopback.
    pub fn tc_rate(self) -> Option<String> {
        match self {
            Link::Loopback => None,
            Link::Veth { bits_per_sec } => Some(format!("{}mbit", bits_per_sec / 1_000_000)),
        }
    }

    /// A short label for tables (`loopback`, `veth 2.5G`).
    pub fn label(self) -> String {
        match self {
            Link::Loopback => "loopback".to_owned(),
            Link::Veth { bits_per_sec } => {
                let g = bits_per_sec as f64 / 1e9;
                format!("veth {g}G")
            }
        }
    }
}

/// Which resource bounded a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The wire rate reached the tbf rate (within [`LINK_BOUND_FRACTION`]).
    Link,
    /// The wire rate stayed below the link: the sides (sharing the machine's cores) were the limit.
    Cpu,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Link => "link",
            Limit::Cpu => "CPU",
        })
    }
}

/// A row is link-limited when its TCP payload rate is at least this fraction of the tbf rate. tbf
/// counts Ethernet frames, so TCP/IP/Ethernet headers (~4-5% at MTU 1500) make ~0.95 the ceiling.
pub const LINK_BOUND_FRACTION: f64 = 0.85;

/// Classifies a row: `wire_bits_per_sec` against the link's rate.
pub fn classify(link: Link, wire_bits_per_sec: f64) -> Limit {
    match link {
        Link::Loopback => Limit::Cpu,
        Link::Veth { bits_per_sec } => {
            if wire_bits_per_sec >= LINK_BOUND_FRACTION * bits_per_sec as f64 {
                Limit::Link
            } else {
                Limit::Cpu
            }
        }
    }
}

/// What one side process reports in its `RESULT` line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SideResult {
    /// Device state bytes moved.
    pub raw_bytes: u64,
    /// Bytes put on (or taken off) the TCP connections, framing included.
    pub wire_bytes: u64,
    /// Source: STOP_COPY entry to the destination's acceptance. Destination: RESUMING entry to STOP.
    pub secs: f64,
    /// Peak RSS (`VmHWM`) of the side process, bytes.
    pub peak_rss: u64,
    /// Compression in use at the end (`none` for the reference loop).
    pub codec: String,
    /// The pipeline stage with the most busy time per thread (`-` for the reference loop).
    pub limiting: String,
}

impl SideResult {
    /// The `RESULT` line a side prints.
    pub fn to_line(&self) -> String {
        format!(
            "RESULT raw_bytes={} wire_bytes={} secs={:.6} peak_rss={} codec={} limiting={}",
            self.raw_bytes, self.wire_bytes, self.secs, self.peak_rss, self.codec, self.limiting
        )
    }

    /// Parses a `RESULT` line; `None` when it is not one or a field is missing or malformed.
    pub fn parse(line: &str) -> Option<SideResult> {
        let rest = line.strip_prefix("RESULT ")?;
        let kv: BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Some(SideResult {
            raw_bytes: kv.get("raw_bytes")?.parse().ok()?,
            wire_bytes: kv.get("wire_bytes")?.parse().ok()?,
            secs: kv
                .get("secs")?
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)?,
            peak_rss: kv.get("peak_rss")?.parse().ok()?,
            codec: kv.get("codec").unwrap_or(&"-").to_string(),
            limiting: kv.get("limiting").unwrap_or(&"-").to_string(),
        })
    }
}

/// One measured migration: one implementation, one content profile, one link.
#[derive(Clone, Debug)]
pub struct Row {
    /// The link.
    pub link: Link,
    /// Content profile name (`random`, `mixed`, `zero`).
    pub profile: String,
    /// The implementation.
    pub imp: Impl,
    /// The source side's result (its `secs` is the downtime a VMM would see).
    pub src: SideResult,
    /// The destination side's result.
    pub dst: SideResult,
}

impl Row {
    /// Device-state throughput, bytes per second, over the source's STOP_COPY-to-acceptance time.
    pub fn throughput(&self) -> f64 {
        self.src.raw_bytes as f64 / self.src.secs
    }

    /// TCP payload rate, bits per second.
    pub fn wire_bits_per_sec(&self) -> f64 {
        self.src.wire_bytes as f64 * 8.0 / self.src.secs
    }

    /// Raw / wire bytes (1.0 for uncompressed).
    pub fn ratio(&self) -> f64 {
        if self.src.wire_bytes == 0 {
            return f64::INFINITY;
        }
        self.src.raw_bytes as f64 / self.src.wire_bytes as f64
    }

    /// Which limit applied.
    pub fn limit(&self) -> Limit {
        classify(self.link, self.wire_bits_per_sec())
    }
}

/// Why a side process did not give a result.
#[derive(Debug, thiserror::Error)]
pub enum SideError {
    /// Spawning failed.
    #[error("spawning {what} failed: {source}")]
    Spawn {
        /// Which side.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The receiver never said `LISTENING`.
    #[error("the receiver did not start listening within {0:?}")]
    NotListening(Duration),
    /// A side ran past the deadline and was killed.
    #[error("{what} did not finish within {limit:?}; killed")]
    Timeout {
        /// Which side.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// A side exited without a `RESULT` line (its stderr went to ours).
    #[error("{what} exited with {status} without a result")]
    NoResult {
        /// Which side.
        what: &'static str,
        /// Exit status.
        status: std::process::ExitStatus,
    },
}

/// A spawned side process whose stdout lines arrive on a bounded channel.
struct SideProc {
    what: &'static str,
    child: Child,
    lines: Receiver<String>,
}

impl SideProc {
    fn spawn(what: &'static str, mut cmd: Command) -> Result<SideProc, SideError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| SideError::Spawn { what, source })?;
        let (tx, rx) = bounded(64);
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(SideProc {
            what,
            child,
            lines: rx,
        })
    }

    fn wait_line(&self, pred: impl Fn(&str) -> bool, deadline: Instant) -> Option<String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn finish(mut self, deadline: Instant, limit: Duration) -> Result<SideResult, SideError> {
        let line = self.wait_line(|l| l.starts_with("RESULT "), deadline);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(SideError::Timeout {
                        what: self.what,
                        limit,
                    });
                }
            }
        };
        line.as_deref()
            .and_then(SideResult::parse)
            .filter(|_| status.success())
            .ok_or(SideError::NoResult {
                what: self.what,
                status,
            })
    }
}

impl Drop for SideProc {
    fn drop(&mut self) {
        // Only reached with the child still running on an error path: end it (by pid, ours).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs one migration: `recv` is started first and must print `LISTENING` within 30 s, then
/// `send`; both must finish within `limit`.
pub fn run_pair(
    recv: Command,
    send: Command,
    limit: Duration,
) -> Result<(SideResult, SideResult), SideError> {
    let receiver = SideProc::spawn("receiver", recv)?;
    let listen_wait = Duration::from_secs(30);
    if receiver
        .wait_line(|l| l == "LISTENING", Instant::now() + listen_wait)
        .is_none()
    {
        return Err(SideError::NotListening(listen_wait));
    }
    let deadline = Instant::now() + limit;
    let sender = SideProc::spawn("sender", send)?;
    // A failed sender fails the pair at once: the receiver is ended (by its Drop) rather than
    // waited on until it times out on its own.
    let src = sender.finish(deadline, limit)?;
    let dst = receiver.finish(deadline, limit)?;
    Ok((src, dst))
}

/// Formats bytes per second as `MB/s` with one decimal (10^6 bytes).
pub fn mbps(bytes_per_sec: f64) -> String {
    format!("{:.1}", bytes_per_sec / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_round_trips() {
        let r = SideResult {
            raw_bytes: 1 << 30,
            wire_bytes: 400 << 20,
            secs: 1.25,
            peak_rss: 50 << 20,
            codec: "zstd:1".into(),
            limiting: "network".into(),
        };
        assert_eq!(SideResult::parse(&r.to_line()), Some(r));
    }

    #[test]
    fn result_parse_rejects_missing_fields_and_zero_time() {
        assert_eq!(
            SideResult::parse("RESULT raw_bytes=1 wire_bytes=1 secs=1"),
            None
        );
        assert_eq!(
            SideResult::parse("RESULT raw_bytes=1 wire_bytes=1 secs=0 peak_rss=1"),
            None
        );
        assert_eq!(
            SideResult::parse("raw_bytes=1 wire_bytes=1 secs=1 peak_rss=1"),
            None
        );
    }

    #[test]
    fn classify_calls_a_row_link_bound_only_near_the_tbf_rate() {
        let link = Link::Veth {
            bits_per_sec: 2_500_000_000,
        };
        assert_eq!(classify(link, 2.4e9), Limit::Link);
        assert_eq!(classify(link, 1.5e9), Limit::Cpu);
        assert_eq!(classify(Link::Loopback, 100e9), Limit::Cpu);
    }

    #[test]
    fn tc_rate_spells_fractional_gigabits_in_mbit() {
        let link = Link::Veth {
            bits_per_sec: 2_500_000_000,
        };
        assert_eq!(link.tc_rate().as_deref(), Some("2500mbit"));
        assert_eq!(link.label(), "veth 2.5G");
    }

    #[test]
    fn run_pair_collects_both_results_from_real_processes() {
        let mut recv = Command::new("sh");
        recv.args([
            "-c",
            "echo LISTENING; echo 'RESULT raw_bytes=10 wire_bytes=5 secs=0.5 peak_rss=7'",
        ]);
        let mut send = Command::new("sh");
        send.args([
            "-c",
            "echo 'RESULT raw_bytes=10 wire_bytes=5 secs=0.4 peak_rss=8'",
        ]);
        let (s, d) = run_pair(recv, send, Duration::from_secs(10)).expect("both sides report");
        assert_eq!(s.peak_rss, 8);
        assert_eq!(d.peak_rss, 7);
    }

    #[test]
    fn run_pair_reports_a_side_that_exits_without_result() {
        let mut recv = Command::new("sh");
        recv.args(["-c", "echo LISTENING; exit 3"]);
        let mut send = Command::new("sh");
        send.args([
            "-c",
            "echo 'RESULT raw_bytes=10 wire_bytes=5 secs=0.4 peak_rss=8'",
        ]);
        let err = run_pair(recv, send, Duration::from_secs(10)).expect_err("receiver failed");
        assert!(matches!(
            err,
            SideError::NoResult {
                what: "receiver",
                ..
            }
        ));
    }
}
