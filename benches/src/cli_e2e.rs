//! `vfmig-bench cli` (issue 12): the CLI end to end, where users run it. `vfmig recv` and
//! `vfmig send` as two processes with `file:` devices on tmpfs over 127.0.0.1, against a plain
//! read/write loop that is also two processes (`vfmig-bench loop-send` / `loop-recv`), alternating,
//! with every output compared with its input.
//!
//! Each process runs under `vfmig-bench measure -- CMD...`, which starts CMD, waits for it and
//! prints one `MEASURE` line on stderr: its exit code, wall-clock start and exit
//! (`CLOCK_REALTIME` ns), user and system CPU seconds and peak RSS (`getrusage(RUSAGE_CHILDREN)`
//! of its one child). The wrapper adds nothing to the measured process: it only waits.
//!
//! Per run: end to end wall time (the receiver's start to the later exit), vfmig's downtime (its
//! `--json` report), CPU seconds of both sides, peak RSS per side, and for vfmig the setup time
//! (the receiver's start to the sender's first device-state frame, `first_data_at_ns`) and the
//! exit time (the destination's final outcome, `final_ack_at_ns`, to the later exit).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::bounded;

/// Bytes the loop moves per read and per write: QEMU's 1 MiB migration buffer.
pub const LOOP_CHUNK: usize = 1 << 20;
/// A page, the unit of the content profiles.
pub const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Wall clock now, ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Content.

/// splitmix64: a small deterministic generator for page content and page order.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` (a multiple of 8 bytes long) with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Content of a state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Incompressible.
    Random,
    /// Per group of 4 pages, in a random order: 2 zero, 1 shared-library bytes, 1 random.
    Mixed,
    /// 97% zero pages, 3% random ones (each page random with probability 3/100).
    Zero,
}

impl Profile {
    /// Parses `random`, `mixed`, `zero`.
    pub fn from_name(s: &str) -> Option<Profile> {
        match s {
            "random" => Some(Profile::Random),
            "mixed" => Some(Profile::Mixed),
            "zero" => Some(Profile::Zero),
            _ => None,
        }
    }

    /// The name [`Profile::from_name`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Random => "random",
            Profile::Mixed => "mixed",
            Profile::Zero => "zero",
        }
    }
}

/// Shared-library bytes for the `mixed` profile: the regular `*.so*` files of the system's
/// library directory, in name order, up to a cap; pages are taken from it in turn.
#[derive(Debug)]
pub struct LibCorpus {
    bytes: Vec<u8>,
}

impl LibCorpus {
    /// Reads up to `cap` bytes (whole pages) of libraries from the first of the usual library
    /// directories that has any.
    pub fn load(cap: usize) -> io::Result<LibCorpus> {
        let arch = std::env::consts::ARCH;
        let dirs = [
            format!("/usr/lib/{arch}-linux-gnu"),
            "/usr/lib64".to_owned(),
            "/usr/lib".to_owned(),
            "/lib64".to_owned(),
        ];
        for d in &dirs {
            let Ok(rd) = fs::read_dir(d) else { continue };
            let mut files: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(".so"))
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect();
            files.sort();
            let mut bytes = Vec::new();
            for f in files {
                if bytes.len() >= cap {
                    break;
                }
                let Ok(mut file) = File::open(&f) else {
                    continue;
                };
                let want = u64::try_from(cap - bytes.len()).unwrap_or(u64::MAX);
                let _ = (&mut file).take(want).read_to_end(&mut bytes);
            }
            bytes.truncate(bytes.len() / PAGE * PAGE);
            if !bytes.is_empty() {
                return Ok(LibCorpus { bytes });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no shared libraries (*.so*) found in {dirs:?} for the mixed profile"),
        ))
    }

    /// Page `i` of the corpus (cycling).
    fn page(&self, i: u64) -> &[u8] {
        let pages = (self.bytes.len() / PAGE).max(1) as u64;
        let at = usize::try_from(i % pages).unwrap_or(0) * PAGE;
        &self.bytes[at..at + PAGE]
    }
}

/// Writes `size` bytes (rounded up to whole pages) of `profile` content to `path`.
pub fn write_state(path: &Path, size: u64, profile: Profile, libs: &LibCorpus) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(LOOP_CHUNK, File::create(path)?);
    let pages = size.div_ceil(PAGE as u64);
    let mut rng = Rng::new(0x7f4a_7c15 ^ size ^ (profile as u64) << 56);
    let mut page = vec![0u8; PAGE];
    let zero = vec![0u8; PAGE];
    let mut lib_next = 0u64;
    // Page kinds of the current group (mixed: 0 zero, 1 library, 2 random).
    let mut group = [0u8; 4];
    for i in 0..pages {
        let kind = match profile {
            Profile::Random => 2,
            Profile::Zero => {
                if rng.below(100) < 3 {
                    2
                } else {
                    0
                }
            }
            Profile::Mixed => {
                let slot = usize::try_from(i % 4).unwrap_or(0);
                if slot == 0 {
                    group = [0, 0, 1, 2];
                    // Fisher-Yates: exactly 50/25/25 per group, in a random order.
                    for j in (1..4).rev() {
                        let k = usize::try_from(rng.below(j as u64 + 1)).unwrap_or(0);
                        group.swap(j, k);
                    }
                }
                group[slot]
            }
        };
        match kind {
            0 => f.write_all(&zero)?,
            1 => {
                f.write_all(libs.page(lib_next))?;
                lib_next += 1;
            }
            _ => {
                rng.fill(&mut page);
                f.write_all(&page)?;
            }
        }
    }
    f.flush()?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

// ---------------------------------------------------------------------------------------------
// The plain loop.

/// Socket timeouts of the loop: a dead peer ends a side instead of hanging it.
const LOOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `loop-send`: connects, then reads `file` 1 MiB at a time and writes each read to the socket;
/// at the end half-closes and waits for the receiver's one-byte acknowledgement (sent after its
/// fsync). Prints `LOOP first_data_ns=.. final_ack_ns=..` on stdout.
pub fn loop_send(addr: SocketAddr, file: &Path) -> io::Result<u64> {
    let mut f = File::open(file)?;
    let mut s = TcpStream::connect_timeout(&addr, LOOP_TIMEOUT)?;
    s.set_write_timeout(Some(LOOP_TIMEOUT))?;
    s.set_read_timeout(Some(LOOP_TIMEOUT))?;
    let mut buf = vec![0u8; LOOP_CHUNK];
    let mut total = 0u64;
    let mut first_data_ns = None;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
        first_data_ns.get_or_insert_with(now_ns);
        total += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let final_ack_ns = now_ns();
    if ack[0] != 1 {
        return Err(io::Error::other("the receiver refused the stream"));
    }
    println!(
        "LOOP bytes={total} first_data_ns={} final_ack_ns={final_ack_ns}",
        first_data_ns.unwrap_or(0)
    );
    Ok(total)
}

/// `loop-recv`: listens on `listen` (prints `loop-recv: listening on ADDR` on stderr), accepts
/// one connection, reads it 1 MiB at a time and writes each read to `file` (created 0600,
/// truncated), fsyncs at the end of the stream and acknowledges with one byte.
pub fn loop_recv(listen: SocketAddr, file: &Path) -> io::Result<u64> {
    let l = TcpListener::bind(listen)?;
    eprintln!("loop-recv: listening on {}", l.local_addr()?);
    let (mut s, _) = l.accept()?;
    s.set_read_timeout(Some(LOOP_TIMEOUT))?;
    s.set_write_timeout(Some(LOOP_TIMEOUT))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    let mut buf = vec![0u8; LOOP_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut s, &mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        total += n as u64;
    }
    f.sync_all()?;
    s.write_all(&[1])?;
    // Wait for the sender to close, so that our exit never resets the acknowledgement.
    let _ = s.read(&mut [0u8; 1]);
    Ok(total)
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// The measuring wrapper.

/// What `measure` reports about its child.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Exit code (128 + signal when killed by one).
    pub code: i32,
    /// Wall clock just before the child was started, ns since the epoch.
    pub start_ns: u64,
    /// Wall clock just after it was reaped.
    pub exit_ns: u64,
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Peak RSS, bytes.
    pub maxrss: u64,
}

impl Measured {
    /// The `MEASURE` line.
    pub fn to_line(&self) -> String {
        format!(
            "MEASURE code={} start_ns={} exit_ns={} user_s={:.6} sys_s={:.6} maxrss={}",
            self.code, self.start_ns, self.exit_ns, self.user_s, self.sys_s, self.maxrss
        )
    }

    /// Parses [`Measured::to_line`].
    pub fn parse(line: &str) -> Option<Measured> {
        let kv: BTreeMap<&str, &str> = line
            .strip_prefix("MEASURE ")?
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Some(Measured {
            code: kv.get("code")?.parse().ok()?,
            start_ns: kv.get("start_ns")?.parse().ok()?,
            exit_ns: kv.get("exit_ns")?.parse().ok()?,
            user_s: kv.get("user_s")?.parse().ok()?,
            sys_s: kv.get("sys_s")?.parse().ok()?,
            maxrss: kv.get("maxrss")?.parse().ok()?,
        })
    }

    /// User + system CPU seconds.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

/// `measure -- CMD ARGS...`: runs CMD with this process's stdio, waits for it, prints the
/// `MEASURE` line on stderr and returns its exit code.
pub fn measure(cmd: &[OsString]) -> io::Result<i32> {
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "measure: no command"))?;
    let start_ns = now_ns();
    let status = Command::new(prog).args(args).status()?;
    let exit_ns = now_ns();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(io::Error::from)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let m = Measured {
        code,
        start_ns,
        exit_ns,
        user_s: secs(usage.user_time()),
        sys_s: secs(usage.system_time()),
        // Linux counts ru_maxrss in KiB.
        maxrss: u64::try_from(usage.max_rss()).unwrap_or(0) * 1024,
    };
    eprintln!("{}", m.to_line());
    Ok(code)
}

// ---------------------------------------------------------------------------------------------
// One run: two measured processes.

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

// ---------------------------------------------------------------------------------------------
// The suite.

/// One table row: the median run of a variant on one size and profile.
#[derive(Clone, Debug)]
pub struct Row {
    /// Bytes of state.
    pub size: u64,
    /// Content profile.
    pub profile: Profile,
    /// `vfmig`, `vfmig --compress none`, `loop`, or a scaling label.
    pub variant: String,
    /// Runs measured.
    pub runs: usize,
    /// The median run (by end to end time).
    pub run: RunResult,
    /// Median loop throughput of the same size and profile (for the ratio), if measured.
    pub loop_throughput: Option<f64>,
    /// Scaling rows: codec workers and connections.
    pub workers_streams: Option<(u16, u16)>,
    /// Cores the two processes could use.
    pub cores: usize,
}

impl Row {
    /// Throughput / the loop's.
    pub fn ratio(&self) -> Option<f64> {
        self.loop_throughput.map(|l| self.run.throughput() / l)
    }

    /// Cores busy on average over the run (both processes).
    pub fn busy_cores(&self) -> f64 {
        self.run.cpu_s() / self.run.e2e_s.max(1e-9)
    }

    /// What limited the run: `cores` when the two processes kept at least 85 % of the cores
    /// they could use busy; otherwise the busiest vfmig stage (a serial stage or a wait, not the
    /// machine).
    pub fn limit(&self) -> String {
        let busy = self.busy_cores();
        if busy >= 0.85 * self.cores as f64 {
            format!("cores ({busy:.1}/{} busy)", self.cores)
        } else {
            format!(
                "{} ({busy:.1}/{} cores busy)",
                self.run.limiting.as_deref().unwrap_or("serial"),
                self.cores
            )
        }
    }
}

/// Settings of `vfmig-bench cli`.
#[derive(Clone, Debug)]
pub struct Config {
    /// State sizes of the rows.
    pub sizes: Vec<u64>,
    /// Profiles of the rows.
    pub profiles: Vec<Profile>,
    /// Runs per row (median).
    pub runs: usize,
    /// Skip the rows (scaling only).
    pub rows: bool,
    /// Scaling grid: codec workers.
    pub workers: Vec<u16>,
    /// Scaling grid: connections.
    pub streams: Vec<u16>,
    /// Run the scaling grid.
    pub scaling: bool,
    /// Size of the scaling runs.
    pub scaling_size: u64,
    /// Runs per scaling cell.
    pub scaling_runs: usize,
    /// Directory of the state files (tmpfs).
    pub dir: PathBuf,
    /// Programs.
    pub programs: Programs,
    /// Cores the two processes may use (for the limit column).
    pub cores: usize,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows (loop and vfmig variants).
    pub rows: Vec<Row>,
    /// Scaling rows.
    pub scaling: Vec<Row>,
    /// Rows that failed or were skipped, and why.
    pub failed: Vec<String>,
}

fn median(mut runs: Vec<RunResult>) -> Option<RunResult> {
    runs.sort_by(|a, b| a.e2e_s.total_cmp(&b.e2e_s));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// The vfmig variants of the rows: CLI defaults, and `--compress none`.
pub fn row_variants() -> Vec<Variant> {
    vec![
        Variant::Vfmig {
            label: "vfmig".to_owned(),
            both: Vec::new(),
            send: Vec::new(),
        },
        Variant::Vfmig {
            label: "vfmig --compress none".to_owned(),
            both: Vec::new(),
            send: vec!["--compress".to_owned(), "none".to_owned()],
        },
    ]
}

/// Writes a 0600 PSK file of 32 random-looking bytes (hex) at `path`.
pub fn write_psk(path: &Path) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut rng = Rng::new(now_ns());
    let mut key = String::new();
    for _ in 0..4 {
        let _ = write!(key, "{:016x}", rng.next_u64());
    }
    writeln!(f, "{key}")
}

/// Runs the rows and the scaling grid; `log` gets one line per finished row.
pub fn run_suite(cfg: &Config, log: &mut dyn FnMut(&str)) -> io::Result<Outcome> {
    fs::create_dir_all(&cfg.dir)?;
    let mut out = Outcome::default();
    let needs_libs = cfg.profiles.contains(&Profile::Mixed) || cfg.scaling;
    let libs = if needs_libs {
        LibCorpus::load(64 << 20)?
    } else {
        LibCorpus {
            bytes: vec![0; PAGE],
        }
    };
    let input = cfg.dir.join("state.in");
    let output = cfg.dir.join("state.out");
    if cfg.rows {
        for &size in &cfg.sizes {
            for &profile in &cfg.profiles {
                write_state(&input, size, profile, &libs)?;
                let variants: Vec<Variant> = std::iter::once(Variant::Loop)
                    .chain(row_variants())
                    .collect();
                let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); variants.len()];
                let mut failed: Vec<Option<String>> = vec![None; variants.len()];
                // Alternate: a drift in machine load hits every variant alike.
                for _ in 0..cfg.runs.max(1) {
                    for (i, v) in variants.iter().enumerate() {
                        if failed[i].is_some() {
                            continue;
                        }
                        match run_once(&cfg.programs, v, &input, &output) {
                            Ok(r) => runs[i].push(r),
                            Err(e) => failed[i] = Some(e.to_string()),
                        }
                    }
                }
                let mut loop_tp = None;
                for ((v, rs), f) in variants.iter().zip(runs).zip(failed) {
                    let label = format!("{} {} {}", human(size), profile.name(), v.label());
                    if let Some(e) = f {
                        log(&format!("  {label}: FAILED: {e}"));
                        out.failed.push(format!("{label}: FAILED: {e}"));
                        continue;
                    }
                    let n = rs.len();
                    let Some(run) = median(rs) else { continue };
                    if *v == Variant::Loop {
                        loop_tp = Some(run.throughput());
                    }
                    let row = Row {
                        size,
                        profile,
                        variant: v.label().to_owned(),
                        runs: n,
                        run,
                        loop_throughput: loop_tp,
                        workers_streams: None,
                        cores: cfg.cores,
                    };
                    log(&format!("  {}", row_line(&row)));
                    out.rows.push(row);
                }
                let _ = fs::remove_file(&input);
            }
        }
    }
    if cfg.scaling {
        let size = cfg.scaling_size;
        write_state(&input, size, Profile::Mixed, &libs)?;
        let mut loop_runs = Vec::new();
        for _ in 0..cfg.scaling_runs.max(1) {
            match run_once(&cfg.programs, &Variant::Loop, &input, &output) {
                Ok(r) => loop_runs.push(r),
                Err(e) => out.failed.push(format!("scaling loop: FAILED: {e}")),
            }
        }
        let loop_tp = median(loop_runs).map(|r| r.throughput());
        for &w in &cfg.workers {
            for &s in &cfg.streams {
                let v = Variant::Vfmig {
                    label: format!("vfmig zstd w{w} s{s}"),
                    both: vec!["--workers".to_owned(), w.to_string()],
                    send: vec![
                        "--compress".to_owned(),
                        "zstd".to_owned(),
                        "--streams".to_owned(),
                        s.to_string(),
                    ],
                };
                let mut rs = Vec::new();
                let mut err = None;
                for _ in 0..cfg.scaling_runs.max(1) {
                    match run_once(&cfg.programs, &v, &input, &output) {
                        Ok(r) => rs.push(r),
                        Err(e) => {
                            err = Some(e.to_string());
                            break;
                        }
                    }
                }
                if let Some(e) = err {
                    log(&format!("  scaling w{w} s{s}: FAILED: {e}"));
                    out.failed.push(format!("scaling w{w} s{s}: FAILED: {e}"));
                    continue;
                }
                let n = rs.len();
                let Some(run) = median(rs) else { continue };
                let row = Row {
                    size,
                    profile: Profile::Mixed,
                    variant: v.label().to_owned(),
                    runs: n,
                    run,
                    loop_throughput: loop_tp,
                    workers_streams: Some((w, s)),
                    cores: cfg.cores,
                };
                log(&format!("  {}", row_line(&row)));
                out.scaling.push(row);
            }
        }
        let _ = fs::remove_file(&input);
    }
    let _ = fs::remove_file(&output);
    Ok(out)
}

/// Sizes as the tables print them.
pub fn human(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} B")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / MIB as f64)
}

/// One line for the log.
pub fn row_line(r: &Row) -> String {
    format!(
        "{:>7} {:<6} {:<24} {:>8.1} MB/s e2e {:>8.1} ms  ratio {}  downtime {} ms  setup {} ms  exit {} ms  cpu {:.2}+{:.2} s  rss {}/{} MiB  {}",
        human(r.size),
        r.profile.name(),
        r.variant,
        r.run.throughput() / 1e6,
        r.run.e2e_s * 1e3,
        r.ratio().map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
        opt_ms(r.run.downtime_ms),
        opt_ms(r.run.setup_ms),
        opt_ms(r.run.exit_ms),
        r.run.send.cpu_s(),
        r.run.recv.cpu_s(),
        mib(r.run.send.maxrss),
        mib(r.run.recv.maxrss),
        if r.run.verified { "verified" } else { "NOT VERIFIED" }
    )
}

/// CSV of every row (rows, then scaling rows).
pub fn csv(o: &Outcome) -> String {
    let mut s = String::from(
        "kind,size_bytes,profile,variant,workers,streams,runs,e2e_s,throughput_mbps,ratio_to_loop,downtime_ms,setup_ms,exit_ms,send_cpu_s,recv_cpu_s,send_peak_rss,recv_peak_rss,wire_bytes,limiting_stage,busy_cores,cores,verified\n",
    );
    let f = |v: Option<f64>| v.map_or_else(String::new, |x| format!("{x:.3}"));
    for (kind, rows) in [("row", &o.rows), ("scaling", &o.scaling)] {
        for r in rows {
            let (w, st) = r
                .workers_streams
                .map_or((String::new(), String::new()), |(w, s)| {
                    (w.to_string(), s.to_string())
                });
            let _ = writeln!(
                s,
                "{kind},{},{},{},{w},{st},{},{:.6},{:.1},{},{},{},{},{:.3},{:.3},{},{},{},{},{:.2},{},{}",
                r.size,
                r.profile.name(),
                r.variant,
                r.runs,
                r.run.e2e_s,
                r.run.throughput() / 1e6,
                f(r.ratio()),
                f(r.run.downtime_ms),
                f(r.run.setup_ms),
                f(r.run.exit_ms),
                r.run.send.cpu_s(),
                r.run.recv.cpu_s(),
                r.run.send.maxrss,
                r.run.recv.maxrss,
                r.run.wire_bytes.map_or_else(String::new, |b| b.to_string()),
                r.run.limiting.as_deref().unwrap_or(""),
                r.busy_cores(),
                r.cores,
                r.run.verified
            );
        }
    }
    s
}

/// The markdown tables.
pub fn markdown(o: &Outcome, machine: &str, runs: usize) -> String {
    let mut s = format!(
        "Machine: {machine}.\n\n`file:` devices on tmpfs, sender and receiver as two processes over 127.0.0.1, \
         median of {runs} run(s) by end-to-end time; every run's output compared with its input (`cmp`). \
         End to end: the receiver's start to the later exit. Setup: the receiver's start to the first \
         data on the wire. Exit: the destination's final acknowledgement to the later exit. CPU: user + system \
         seconds of sender + receiver.\n\n\
         | size | content | variant | MB/s end to end | vs loop | end to end (ms) | downtime (ms) | setup (ms) | exit (ms) | CPU s (send + recv) | peak RSS MiB (send / recv) | verified |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    );
    for r in &o.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {} | {:.1} | {} | {} | {} | {:.2} + {:.2} | {} / {} | {} |",
            human(r.size),
            r.profile.name(),
            r.variant,
            r.run.throughput() / 1e6,
            r.ratio()
                .map_or_else(|| "-".to_owned(), |x| format!("**{x:.2}x**")),
            r.run.e2e_s * 1e3,
            opt_ms(r.run.downtime_ms),
            opt_ms(r.run.setup_ms),
            opt_ms(r.run.exit_ms),
            r.run.send.cpu_s(),
            r.run.recv.cpu_s(),
            mib(r.run.send.maxrss),
            mib(r.run.recv.maxrss),
            if r.run.verified { "yes" } else { "NO" }
        );
    }
    if !o.scaling.is_empty() {
        let first = &o.scaling[0];
        let _ = write!(
            s,
            "\nScaling: `--compress zstd`, mixed content, {} per run, `--workers W` on both sides, \
             `--streams S` on the sender; both processes under `taskset` on {} cores. Busy cores: CPU \
             seconds of both processes / wall time; limit: `cores` when at least 85 % of the cores \
             were busy, else the busiest vfmig stage.\n\n\
             | workers | streams | MB/s end to end | vs loop | wire ratio | busy cores (send + recv) | limit |\n\
             |---:|---:|---:|---:|---:|---|---|\n",
            human(first.size),
            first.cores
        );
        for r in &o.scaling {
            let (w, st) = r.workers_streams.unwrap_or((0, 0));
            let wire_ratio = r.run.wire_bytes.filter(|&b| b > 0).map_or_else(
                || "-".to_owned(),
                |b| format!("{:.2}:1", r.size as f64 / b as f64),
            );
            let e2e = r.run.e2e_s.max(1e-9);
            let _ = writeln!(
                s,
                "| {w} | {st} | {:.1} | {} | {wire_ratio} | {:.1} + {:.1} | {} |",
                r.run.throughput() / 1e6,
                r.ratio()
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
                r.run.send.cpu_s() / e2e,
                r.run.recv.cpu_s() / e2e,
                r.limit()
            );
        }
    }
    if !o.failed.is_empty() {
        s += "\nNot measured:\n\n";
        for l in &o.failed {
            let _ = writeln!(s, "- {l}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_line_round_trips() {
        let m = Measured {
            code: 0,
            start_ns: 1,
            exit_ns: 2,
            user_s: 0.5,
            sys_s: 0.25,
            maxrss: 4096,
        };
        assert_eq!(Measured::parse(&m.to_line()), Some(m));
        assert_eq!(Measured::parse("MEASURE code=0"), None);
    }

    #[test]
    fn mixed_profile_is_half_zero_pages_and_deterministic() {
        let dir = std::env::temp_dir().join(format!("vfmig-cli-e2e-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let libs = LibCorpus {
            bytes: (0..2 * PAGE)
                .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
                .collect(),
        };
        let (a, b) = (dir.join("a"), dir.join("b"));
        write_state(&a, 256 * PAGE as u64, Profile::Mixed, &libs).expect("write");
        write_state(&b, 256 * PAGE as u64, Profile::Mixed, &libs).expect("write");
        let da = fs::read(&a).expect("read");
        assert_eq!(da, fs::read(&b).expect("read"), "same content every time");
        assert_eq!(da.len(), 256 * PAGE);
        let zero = da
            .chunks(PAGE)
            .filter(|p| p.iter().all(|&x| x == 0))
            .count();
        assert_eq!(zero, 128, "exactly half the pages are zero");
        let lib = da
            .chunks(PAGE)
            .filter(|p| *p == &libs.bytes[..PAGE] || *p == &libs.bytes[PAGE..])
            .count();
        assert_eq!(lib, 64, "a quarter are library pages");
        let _ = fs::remove_dir_all(&dir);
    }
}
