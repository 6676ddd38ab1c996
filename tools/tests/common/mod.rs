//! Helpers shared by the integration tests: run the real binary with bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vfmig");
/// Upper bound on any one process in these tests (a hang fails the test instead of CI).
pub const PROCESS_LIMIT: Duration = Duration::from_secs(90);

/// The binary under test: [`BIN`], or `$VFMIG_TEST_BIN` (to run these tests against another
/// build, e.g. to show that a test fails on an older one).
pub fn bin() -> String {
    std::env::var("VFMIG_TEST_BIN").unwrap_or_else(|_| BIN.to_owned())
}

pub fn vfmig() -> Command {
    let mut c = Command::new(bin());
    c.stdin(Stdio::null());
    c
}

/// A `vfmig recv` child whose stderr is being collected.
pub struct Receiver {
    pub child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    stderr_thread: Option<JoinHandle<()>>,
    stdout_thread: Option<JoinHandle<String>>,
    seen: Vec<String>,
}

impl Receiver {
    /// Starts `vfmig recv --listen 127.0.0.1:0 ARGS` and waits for its `listening on` line.
    pub fn spawn(args: &[&str]) -> Receiver {
        let mut cmd = vfmig();
        cmd.arg("recv").args(["--listen", "127.0.0.1:0"]).args(args);
        Receiver::start(cmd)
    }

    /// Starts `cmd` (a `vfmig recv` with its `--listen`, possibly behind a wrapper such as
    /// [`unprivileged`]) and waits for its `listening on` line.
    pub fn start(mut cmd: Command) -> Receiver {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vfmig recv");
        let (lines, stderr_thread, stdout_thread) = collect_output(&mut child);
        let mut r = Receiver {
            child,
            addr: "127.0.0.1:0".parse().expect("addr"),
            lines,
            stderr_thread: Some(stderr_thread),
            stdout_thread: Some(stdout_thread),
            seen: Vec::new(),
        };
        let line = r.wait_for_line("vfmig: listening on ");
        r.addr = line
            .trim_start_matches("vfmig: listening on ")
            .parse()
            .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
        r
    }

    /// The stderr lines read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits (bounded) for a stderr line starting with `prefix`.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        self.wait_for(prefix, |l| l.starts_with(prefix))
    }

    /// Waits (bounded) for a stderr line containing `needle` (already seen ones count).
    pub fn wait_for_containing(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        self.wait_for(needle, |l| l.contains(needle))
    }

    fn wait_for(&mut self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let prefix = what;
        let deadline = Instant::now() + PROCESS_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!(
                        "no `{prefix}` line from vfmig recv ({e}); saw {:?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Waits (bounded) for the receiver to exit; returns status, stdout and all stderr lines.
    pub fn finish(mut self) -> (ExitStatus, String, Vec<String>) {
        let status = wait_bounded(&mut self.child);
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        self.seen.extend(self.lines.try_iter());
        let stdout = self
            .stdout_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        (status, stdout, self.seen)
    }
}

/// Takes a piped child's stderr (sent line by line on the channel) and stdout (read whole by the
/// second thread).
pub fn collect_output(
    child: &mut Child,
) -> (mpsc::Receiver<String>, JoinHandle<()>, JoinHandle<String>) {
    let stderr = child.stderr.take().expect("stderr");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    let stderr_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdout_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    (lines, stderr_thread, stdout_thread)
}

pub fn wait_bounded(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("vfmig did not exit within {PROCESS_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion (bounded), feeding `stdin` if given.
pub fn run(mut cmd: Command, stdin: Option<Vec<u8>>) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn vfmig");
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin");
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_bounded(&mut child);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

pub fn send(addr: SocketAddr, args: &[&str]) -> Command {
    let mut c = vfmig();
    c.arg("send")
        .args(["--connect", &addr.to_string()])
        .args(args);
    c
}

pub fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn json(stdout: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    })
}

/// Deterministic pseudo-random bytes (xorshift), mixed with runs of zeros and text.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match (v.len() / 65536) % 3 {
            0 => v.extend_from_slice(&x.to_le_bytes()),
            1 => v.extend_from_slice(&[0; 8]),
            _ => v.extend_from_slice(b"vfmig te"),
        }
    }
    v.truncate(len);
    v
}

pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes a key file readable by its owner only (mode 0600, as vfmig requires of keys).
pub fn write_key(dir: &Path, name: &str, key: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, key).expect("write key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    p.to_string_lossy().into_owned()
}

/// Whether the tests run as root (then [`unprivileged`] drops to `nobody`).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Locked-memory limit for [`unprivileged`] and [`without_ipc_lock`]: enough for io_uring's rings,
/// far below the 64 MiB buffer pool, so registering the pool must fail.
pub const LOW_MEMLOCK: &str = "--memlock=1048576:1048576";

/// `vfmig` as an unprivileged user: `nobody` (uid/gid 65534, no supplementary groups) when the
/// tests run as root, with [`LOW_MEMLOCK`] either way.
pub fn unprivileged() -> Command {
    let mut c = Command::new("prlimit");
    c.arg(LOW_MEMLOCK);
    if is_root() {
        c.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]);
    }
    c.arg(bin()).stdin(Stdio::null());
    c
}

/// `vfmig` as root without `CAP_IPC_LOCK` (dropped from the bounding and inheritable sets before
/// exec) and with [`LOW_MEMLOCK`]: the container / systemd-unit case.
pub fn without_ipc_lock() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--bounding-set=-ipc_lock",
        "--inh-caps=-ipc_lock",
        "prlimit",
        LOW_MEMLOCK,
        &bin(),
    ])
    .stdin(Stdio::null());
    c
}

/// A temporary directory every user may write (mode 1777), for [`unprivileged`] runs.
pub fn shared_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    d
}

/// Writes `data` to `path` readable by everyone (mode 0644).
pub fn write_public(path: &Path, data: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// Sends `signal` (e.g. `-INT`) to `child` with kill(1), then waits (bounded) for it to exit and
/// returns its status and what it wrote to `pipe` (its stdout or stderr, whichever was piped).
pub fn signal_and_collect(
    child: &mut Child,
    signal: &str,
    pipe: Option<impl Read>,
) -> (ExitStatus, String) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal}");
    let exit = wait_bounded(child);
    let mut text = String::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_string(&mut text);
    }
    (exit, text)
}
