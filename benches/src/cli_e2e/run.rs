//! One run: a receiver and a sender as two measured processes ([`run_once`]), their command
//! lines per [`Variant`], and the run's figures ([`RunResult`]) or why there are none
//! ([`RunError`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use super::Measured;

/// What runs on each side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `vfmig send/recv` with these extra options on both sides (`--workers`) and on the sender
    /// only (`--compress`, `--streams`).
    Vfmig {
        /// Label in tables (`vfmig`, `vfmig --compress none`).
        label: String,
        /// Options for both sides.
        both: Vec<String>,
        /// Options for the sender only.
        send: Vec<String>,
    },
    /// `vfmig-bench loop-send/loop-recv`.
    Loop,
}

impl Variant {
    /// The label in tables.
    pub fn label(&self) -> &str {
        match self {
            Variant::Vfmig { label, .. } => label,
            Variant::Loop => "loop",
        }
    }
}

/// Paths and programs of a run.
#[derive(Clone, Debug)]
pub struct Programs {
    /// `vfmig-bench` (for `measure` and the loop sides).
    pub bench: PathBuf,
    /// `vfmig`.
    pub vfmig: PathBuf,
    /// A PSK file (0600) for vfmig; `None`: no key (loopback only, frames not sealed).
    pub psk: Option<PathBuf>,
    /// `taskset -c LIST` prefix for both sides, if any.
    pub cpus: Option<String>,
}

/// One measured run.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    /// Bytes of state.
    pub bytes: u64,
    /// Receiver start to the later exit, seconds.
    pub e2e_s: f64,
    /// vfmig's downtime (sender's report), ms.
    pub downtime_ms: Option<f64>,
    /// Receiver start to the first data frame, ms.
    pub setup_ms: Option<f64>,
    /// Final acknowledgement to the later exit, ms.
    pub exit_ms: Option<f64>,
    /// The sender's process.
    pub send: Measured,
    /// The receiver's process.
    pub recv: Measured,
    /// Wire bytes (vfmig's report).
    pub wire_bytes: Option<u64>,
    /// vfmig's limiting stage (sender's report).
    pub limiting: Option<String>,
    /// The output equals the input (`cmp`).
    pub verified: bool,
}

impl RunResult {
    /// Bytes per second end to end.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.e2e_s.max(1e-9)
    }

    /// CPU seconds of both sides.
    pub fn cpu_s(&self) -> f64 {
        self.send.cpu_s() + self.recv.cpu_s()
    }
}

/// Why a run gave no result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Spawning, files.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The receiver never printed its listening address.
    #[error("the {0} receiver did not start listening within 30 s")]
    NotListening(String),
    /// A side ran past the limit and was killed (with its process group).
    #[error("the {what} did not finish within {limit:?}; killed")]
    Timeout {
        /// Which side.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// A side failed.
    #[error("the {what} exited with {code}: {stderr}")]
    Failed {
        /// Which side.
        what: &'static str,
        /// Exit code.
        code: i32,
        /// Its last stderr lines.
        stderr: String,
    },
    /// A side's output could not be read.
    #[error("the {what} gave no {missing}")]
    Missing {
        /// Which side.
        what: &'static str,
        /// What was missing.
        missing: &'static str,
    },
    /// The output file differs from the input.
    #[error("{out} differs from {input} (cmp)")]
    Differs {
        /// Input file.
        input: PathBuf,
        /// Output file.
        out: PathBuf,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// A side under `measure`, in its own process group; its stdout and stderr read by threads.
struct Side {
    what: &'static str,
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Side {
    /// Starts `argv` under `measure`; `listening` gets the address of a `... listening on ADDR`
    /// stderr line.
    fn spawn(
        what: &'static str,
        p: &Programs,
        argv: &[OsString],
        listening: Option<crossbeam_channel::Sender<SocketAddr>>,
    ) -> Result<Side, RunError> {
        let mut cmd = match &p.cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list]).arg(&p.bench);
                c
            }
            None => Command::new(&p.bench),
        };
        cmd.arg("measure")
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: a timeout ends the wrapper and the measured process together.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting the {what}")))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        let stdout = out.map(|mut o| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = o.read_to_string(&mut s);
                s
            })
        });
        let stderr = err.map(|e| {
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                for line in BufReader::new(e).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &listening {
                        if let Some(a) = line
                            .split_once("listening on ")
                            .and_then(|(_, a)| a.trim().parse::<SocketAddr>().ok())
                        {
                            let _ = tx.try_send(a);
                        }
                    }
                    lines.push(line);
                }
                lines
            })
        });
        Ok(Side {
            what,
            child,
            stdout,
            stderr,
        })
    }

    /// Waits until `deadline`; returns the measured figures and stdout.
    fn finish(
        mut self,
        deadline: Instant,
        limit: Duration,
    ) -> Result<(Measured, String), RunError> {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    self.kill();
                    return Err(RunError::Timeout {
                        what: self.what,
                        limit,
                    });
                }
            }
        }
        let out = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let m = err
            .iter()
            .rev()
            .find_map(|l| Measured::parse(l))
            .ok_or(RunError::Missing {
                what: self.what,
                missing: "MEASURE line",
            })?;
        if m.code != 0 {
            let tail: Vec<&str> = err
                .iter()
                .filter(|l| !l.starts_with("MEASURE "))
                .map(String::as_str)
                .collect();
            let tail = tail[tail.len().saturating_sub(3)..].join(" / ");
            return Err(RunError::Failed {
                what: self.what,
                code: m.code,
                stderr: tail,
            });
        }
        Ok((m, out))
    }

    /// Ends the wrapper's process group (ours: it was started here).
    fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn ns_diff_ms(later: u64, earlier: u64) -> f64 {
    (later as f64 - earlier as f64) / 1e6
}

/// `file:PATH` as an argument.
fn file_spec(path: &Path) -> OsString {
    let mut dev = OsString::from("file:");
    dev.push(path);
    dev
}

/// `--psk-file PATH`, or nothing without a key.
fn key_args(p: &Programs) -> Vec<OsString> {
    match &p.psk {
        Some(k) => vec![OsString::from("--psk-file"), k.clone().into_os_string()],
        None => Vec::new(),
    }
}

/// The receiver's command line.
fn recv_argv(p: &Programs, v: &Variant, output: &Path) -> Vec<OsString> {
    let os = OsString::from;
    match v {
        Variant::Vfmig { both, .. } => {
            let mut r = vec![
                p.vfmig.clone().into_os_string(),
                os("recv"),
                os("--listen"),
                os("127.0.0.1:0"),
                os("--json"),
                os("--device"),
                file_spec(output),
            ];
            r.extend(key_args(p));
            r.extend(both.iter().map(OsString::from));
            r
        }
        Variant::Loop => vec![
            p.bench.clone().into_os_string(),
            os("loop-recv"),
            os("--listen"),
            os("127.0.0.1:0"),
            os("--file"),
            output.as_os_str().to_owned(),
        ],
    }
}

/// The sender's command line, connecting to `addr`.
fn send_argv(p: &Programs, v: &Variant, input: &Path, addr: SocketAddr) -> Vec<OsString> {
    let os = OsString::from;
    match v {
        Variant::Vfmig { both, send, .. } => {
            let mut s = vec![
                p.vfmig.clone().into_os_string(),
                os("send"),
                os("--connect"),
                os(&addr.to_string()),
                os("--json"),
                os("--device"),
                file_spec(input),
            ];
            s.extend(key_args(p));
            s.extend(both.iter().chain(send).map(OsString::from));
            s
        }
        Variant::Loop => vec![
            p.bench.clone().into_os_string(),
            os("loop-send"),
            os("--connect"),
            os(&addr.to_string()),
            os("--file"),
            input.as_os_str().to_owned(),
        ],
    }
}

/// Runs one migration of `input` to `output` (removed first and after a successful check) and
/// compares them.
pub fn run_once(
    p: &Programs,
    v: &Variant,
    input: &Path,
    output: &Path,
) -> Result<RunResult, RunError> {
    let bytes = fs::metadata(input)
        .map_err(io_err(format!("reading {}", input.display())))?
        .len();
    match fs::remove_file(output) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", output.display()))(e)),
    }
    let recv_argv = recv_argv(p, v, output);
    // Generous: 60 s plus 50 MB/s; a stuck side is killed, never waited on forever.
    let limit = Duration::from_secs(60 + bytes / (50 * 1_000_000));
    let (tx, rx) = bounded(1);
    let recv = Side::spawn("receiver", p, &recv_argv, Some(tx))?;
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| RunError::NotListening(v.label().to_owned()))?;
    let deadline = Instant::now() + limit;
    let send = Side::spawn("sender", p, &send_argv(p, v, input, addr), None)?;
    let send_res = send.finish(deadline, limit);
    let (recv_m, _recv_out) = recv.finish(deadline, limit)?;
    let (send_m, send_out) = send_res?;
    let e2e_s = ns_diff_ms(send_m.exit_ns.max(recv_m.exit_ns), recv_m.start_ns) / 1e3;
    let last_exit = send_m.exit_ns.max(recv_m.exit_ns);
    let mut r = RunResult {
        bytes,
        e2e_s,
        send: send_m,
        recv: recv_m.clone(),
        ..RunResult::default()
    };
    match v {
        Variant::Vfmig { .. } => {
            let j: serde_json::Value = send_out
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .ok_or(RunError::Missing {
                    what: "sender",
                    missing: "JSON report",
                })?;
            r.downtime_ms = j["downtime_ms"].as_f64();
            r.wire_bytes = j["wire_bytes"].as_u64();
            r.limiting = j["limiting_stage"].as_str().map(str::to_owned);
            r.setup_ms = j["first_data_at_ns"]
                .as_u64()
                .map(|t| ns_diff_ms(t, recv_m.start_ns));
            r.exit_ms = j["final_ack_at_ns"]
                .as_u64()
                .map(|t| ns_diff_ms(last_exit, t));
        }
        Variant::Loop => {
            let kv: BTreeMap<&str, u64> = send_out
                .lines()
                .find_map(|l| l.strip_prefix("LOOP "))
                .map(|l| {
                    l.split_whitespace()
                        .filter_map(|f| f.split_once('='))
                        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                        .collect()
                })
                .unwrap_or_default();
            r.setup_ms = kv
                .get("first_data_ns")
                .filter(|&&t| t > 0)
                .map(|&t| ns_diff_ms(t, recv_m.start_ns));
            r.exit_ms = kv.get("final_ack_ns").map(|&t| ns_diff_ms(last_exit, t));
        }
    }
    let same = Command::new("cmp")
        .arg("-s")
        .arg(input)
        .arg(output)
        .status()
        .map_err(io_err("running cmp"))?;
    if !same.success() {
        return Err(RunError::Differs {
            input: input.to_path_buf(),
            out: output.to_path_buf(),
        });
    }
    r.verified = true;
    let _ = fs::remove_file(output);
    Ok(r)
}
