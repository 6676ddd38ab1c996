//! A VMM that keeps its VFIO devices and lets two `vfmig` processes migrate them through their
//! control sockets (docs/CONTROL.md), as a migration helper does for a VMM not written in Rust.
//!
//! ```text
//! vmm_control_client <source control socket> <destination control socket> \
//!     <source device>... <destination device>...      (as many of each; paths VfioDevice::open takes)
//! ```
//!
//! Started next to `vfmig recv --control unix:DST` and `vfmig send --precopy --control unix:SRC`
//! (`tools/mtty-harness/guest-control.sh` runs it on the kernel's `mtty` devices), it:
//!
//! 1. opens every device itself, as a VMM does: the VFIO group, a container with the type 1 IOMMU
//!    set, the device fd (`VfioDevice::open`); it keeps them all open to the end;
//! 2. empties the destination UART ports and puts a text into every source port (mtty: one UART
//!    per BAR), through its own device fds;
//! 3. hands the devices over with `SCM_RIGHTS`: the first of each side as `vfio-group` (the group
//!    fd and the device name), the others as `vfio` (its own device fd);
//! 4. drives the migration in steps: `start` on both sides, `status` polls until the source
//!    reports `switchover-ready`, pauses its (pretend) vCPUs, `switchover`, waits for the
//!    destination's `committed`, resumes the destination devices itself through its own fds
//!    (RUNNING_P2P for all, then RUNNING) and says `resumed`; waits for `completed` on both, `quit`;
//! 5. reads every destination UART port back through its own fds.
//!
//! The device states are read through the client's fds at every step. Every control line is
//! printed (`CTRL src >` sent, `CTRL dst <` received); exit status 0 when every check held.

use std::io::{BufRead, BufReader, ErrorKind, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::thread::sleep;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use vfmig_vfio::{DeviceState, MigrationDevice, VfioDevice};

#[path = "../../vfio/examples/mtty/uart.rs"]
mod uart;
use uart::{uart_drain, uart_put, FIFO};

/// Upper bound on waiting for any one line from a control socket.
const READ_LIMIT: Duration = Duration::from_secs(60);
/// Connecting: at most this many tries, this far apart (vfmig may still be starting).
const CONNECT_TRIES: u32 = 300;
const CONNECT_PAUSE: Duration = Duration::from_millis(100);
/// `status` polls before the switchover: at most this many, this far apart.
const MAX_POLLS: u32 = 600;
const POLL_PAUSE: Duration = Duration::from_millis(50);
/// A printed control line is cut at this many bytes.
const PRINT_MAX: usize = 300;
/// mtty-2: two UART ports, BARs 0 and 1.
const PORTS: u32 = 2;

type Result<T> = std::result::Result<T, String>;

/// One control socket, seen from the VMM.
struct Control {
    side: &'static str,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received and not yet taken.
    events: Vec<Value>,
}

impl Control {
    /// Connects (retrying while vfmig starts), reads the greeting and checks the role.
    fn connect(side: &'static str, path: &Path, role: &str) -> Result<Control> {
        let mut tries = 0;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if tries < CONNECT_TRIES => {
                    if e.kind() != ErrorKind::NotFound && e.kind() != ErrorKind::ConnectionRefused {
                        return Err(format!("connect {}: {e}", path.display()));
                    }
                    tries += 1;
                    sleep(CONNECT_PAUSE);
                }
                Err(e) => return Err(format!("connect {}: {e}", path.display())),
            }
        };
        stream
            .set_read_timeout(Some(READ_LIMIT))
            .map_err(|e| format!("{side}: read timeout: {e}"))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| format!("{side}: clone: {e}"))?,
        );
        let mut c = Control {
            side,
            stream,
            reader,
            events: Vec::new(),
        };
        let greeting = c.read_line()?;
        let got = &greeting["vfmig"]["role"];
        if got != role {
            return Err(format!("{side}: greeting {greeting}: role is not {role}"));
        }
        Ok(c)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{}: vfmig closed the control socket", self.side)),
            Ok(_) => {}
            Err(e) => return Err(format!("{}: no line within {READ_LIMIT:?}: {e}", self.side)),
        }
        let shown: String = line.trim_end().chars().take(PRINT_MAX).collect();
        println!("CTRL {} < {shown}", self.side);
        serde_json::from_str(&line).map_err(|e| format!("{}: {line:?}: {e}", self.side))
    }

    /// Sends one command (with `fds` attached to its first byte) and returns its `return`
    /// object; events that arrive first are kept.
    fn execute(&mut self, cmd: &str, args: Value, fds: &[RawFd]) -> Result<Value> {
        let mut line = json!({ "execute": cmd, "arguments": args, "id": cmd }).to_string();
        println!(
            "CTRL {} > {line}{}",
            self.side,
            if fds.is_empty() {
                String::new()
            } else {
                format!("   [+{} fd]", fds.len())
            }
        );
        line.push('\n');
        let bytes = line.as_bytes();
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("{}: sendmsg: {e}", self.side))?;
        self.stream
            .write_all(&bytes[sent..])
            .map_err(|e| format!("{}: write: {e}", self.side))?;
        loop {
            let v = self.read_line()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v["id"] != cmd {
                return Err(format!("{}: reply to another command: {v}", self.side));
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(format!("{}: {cmd} failed: {}", self.side, v["error"])),
            };
        }
    }

    /// Whether an event called `name` has arrived (it stays queued).
    fn has_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e["event"] == name)
    }

    /// The `failed` event's data, if one arrived.
    fn failure(&self) -> Option<String> {
        let f = self.events.iter().find(|e| e["event"] == "failed")?;
        Some(format!(
            "{}: the migration failed: {}",
            self.side, f["data"]
        ))
    }

    /// Waits for the next event called `name` and returns its data; a `failed` event while
    /// waiting for something else is an error.
    fn wait_event(&mut self, name: &str) -> Result<Value> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                let e = self.events.remove(i);
                self.events.drain(..i);
                return Ok(e["data"].clone());
            }
            if let Some(why) = self.failure() {
                return Err(format!("{why} (waiting for {name})"));
            }
            let v = self.read_line()?;
            if v.get("event").is_none() {
                return Err(format!("{}: unexpected reply: {v}", self.side));
            }
            self.events.push(v);
        }
    }
}

/// One device the VMM holds.
struct Held {
    dev: VfioDevice,
}

impl Held {
    fn open(path: &str) -> Result<Held> {
        let dev = VfioDevice::open(path).map_err(|e| format!("open {path}: {e}"))?;
        let how = if dev.group_fd().is_some() {
            "group, container with the type 1 IOMMU, device fd"
        } else {
            "device cdev bound to an iommufd"
        };
        println!("CTRL opened {} ({how})", dev.name());
        Ok(Held { dev })
    }

    /// The `add-device` arguments and fd: the group fd and device name for the first device of
    /// a side (when opened through a group), the device fd otherwise.
    fn handover(&self, index: usize) -> (Value, RawFd) {
        let name = self.dev.name();
        match self.dev.group_fd() {
            Some(group) if index == 0 => (
                json!({"kind": "vfio-group", "name": name}),
                group.as_raw_fd(),
            ),
            _ => (
                json!({"kind": "vfio", "name": name}),
                self.dev.as_fd().as_raw_fd(),
            ),
        }
    }

    /// Reads the device's state through the VMM's own fd and checks it is one of `want`.
    fn expect(&mut self, when: &str, want: &[DeviceState]) -> Result<DeviceState> {
        let name = self.dev.name().to_owned();
        let got = self
            .dev
            .state()
            .map_err(|e| format!("{name}: state: {e}"))?;
        println!("CTRL {name}: {got} {when} (the client's own fd)");
        if want.contains(&got) {
            Ok(got)
        } else {
            Err(format!("{name}: {got} {when}, expected one of {want:?}"))
        }
    }
}

/// The text put into port `port` of source device `index` (at most the FIFO depth).
fn message(index: usize, port: u32) -> Vec<u8> {
    let m = format!("ctl:d{index}-port{port}").into_bytes();
    debug_assert!(m.len() <= FIFO);
    m
}

fn add_devices(c: &mut Control, held: &[Held]) -> Result<()> {
    for (i, h) in held.iter().enumerate() {
        let (args, fd) = h.handover(i);
        let r = c.execute("add-device", args, &[fd])?;
        if r["index"] != i {
            return Err(format!("{}: device {i} got index {}", c.side, r["index"]));
        }
    }
    Ok(())
}

fn for_all(held: &mut [Held], when: &str, want: &[DeviceState]) -> Result<()> {
    held.iter_mut()
        .try_for_each(|h| h.expect(when, want).map(drop))
}

fn run(src_sock: &Path, dst_sock: &Path, src_paths: &[&str], dst_paths: &[&str]) -> Result<usize> {
    use DeviceState::{PreCopy, Running, RunningP2p, Stop, StopCopy};
    let mut src: Vec<Held> = src_paths
        .iter()
        .map(|p| Held::open(p))
        .collect::<Result<_>>()?;
    let mut dst: Vec<Held> = dst_paths
        .iter()
        .map(|p| Held::open(p))
        .collect::<Result<_>>()?;

    // The guest's "workload": bytes in every source port; the destination ports start empty.
    for (i, h) in dst.iter().enumerate() {
        for port in 0..PORTS {
            let left = uart_drain(&h.dev, port).map_err(|e| format!("drain: {e}"))?;
            if !uart_drain(&h.dev, port)
                .map_err(|e| format!("drain: {e}"))?
                .is_empty()
            {
                return Err(format!("destination {i} port {port} does not empty"));
            }
            println!(
                "CTRL destination {} port {port} emptied before the migration ({} stale bytes)",
                h.dev.name(),
                left.len()
            );
        }
    }
    for (i, h) in src.iter().enumerate() {
        for port in 0..PORTS {
            uart_drain(&h.dev, port).map_err(|e| format!("drain: {e}"))?;
            let m = message(i, port);
            uart_put(&h.dev, port, &m).map_err(|e| format!("uart put: {e}"))?;
            println!(
                "CTRL bytes put into source {} port {port}: {:?}",
                h.dev.name(),
                String::from_utf8_lossy(&m)
            );
        }
    }
    for_all(&mut src, "before start", &[Running])?;
    for_all(&mut dst, "before start", &[Running])?;

    let mut d = Control::connect("dst", dst_sock, "destination")?;
    let mut s = Control::connect("src", src_sock, "source")?;
    add_devices(&mut d, &dst)?;
    d.execute("start", json!({}), &[])?;
    add_devices(&mut s, &src)?;
    s.execute("start", json!({}), &[])?;
    for_all(&mut src, "after start", &[PreCopy])?;

    // Pre-copy: poll until every device's switchover-ack is in.
    let mut polls = 0;
    while !s.has_event("switchover-ready") {
        if polls == MAX_POLLS {
            return Err(format!("no switchover-ready after {polls} status polls"));
        }
        if let Some(why) = s.failure() {
            return Err(why);
        }
        let st = s.execute("status", json!({}), &[])?;
        polls += 1;
        println!("CTRL source: poll {polls}: state {}", st["state"]);
        sleep(POLL_PAUSE);
    }
    let ready = s.wait_event("switchover-ready")?;
    println!(
        "CTRL source: switchover ready after {polls} status polls (acked {}, estimated downtime {} ms)",
        ready["switchover_acked"], ready["estimated_downtime_ms"]
    );
    for_all(&mut src, "at switchover-ready", &[PreCopy])?;

    println!("CTRL source: vCPUs paused; switchover");
    s.execute("switchover", json!({}), &[])?;
    // The source may already have gone on to STOP.
    for_all(&mut src, "after the switchover", &[StopCopy, Stop])?;

    let committed = d.wait_event("committed")?;
    println!("CTRL destination: committed {}", committed["devices"]);
    for_all(&mut dst, "after the commit", &[Stop])?;
    // The VMM resumes its devices itself, through its own fds, in the P2P order.
    for step in [RunningP2p, Running] {
        for h in &mut dst {
            let name = h.dev.name().to_owned();
            h.dev
                .set_state(step)
                .map_err(|e| format!("{name}: resume to {step}: {e}"))?;
        }
    }
    for_all(&mut dst, "after the client resumed it", &[Running])?;
    d.execute("resumed", json!({}), &[])?;

    let src_report = s.wait_event("completed")?;
    let dst_report = d.wait_event("completed")?;
    println!(
        "CTRL completed: source outcome {} ({} bytes, downtime {} ms), destination outcome {}",
        src_report["outcome"],
        src_report["raw_bytes"],
        src_report["downtime_ms"],
        dst_report["outcome"]
    );
    for (side, report) in [("source", &src_report), ("destination", &dst_report)] {
        let all_accepted = report["devices"]
            .as_array()
            .is_some_and(|d| d.len() == src.len() && d.iter().all(|d| d["accepted"] == true));
        if report["outcome"] != "ok" || !all_accepted {
            return Err(format!(
                "{side} report: outcome {}, not every device accepted: {}",
                report["outcome"], report["devices"]
            ));
        }
    }
    for_all(&mut src, "after completed", &[Stop])?;
    for_all(&mut dst, "after completed", &[Running])?;
    s.execute("quit", json!({}), &[])?;
    d.execute("quit", json!({}), &[])?;

    // The proof: the destination devices, still held here, hold the source's bytes.
    let mut read_back = 0;
    for (i, h) in dst.iter().enumerate() {
        for port in 0..PORTS {
            let got = uart_drain(&h.dev, port).map_err(|e| format!("drain: {e}"))?;
            let want = message(i, port);
            println!(
                "CTRL bytes read back from destination {} port {port}: {:?}",
                h.dev.name(),
                String::from_utf8_lossy(&got)
            );
            if got != want {
                return Err(format!(
                    "destination {i} port {port}: {:?}, expected {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                ));
            }
            read_back += 1;
        }
    }
    // Only now are the devices closed.
    drop(src);
    drop(dst);
    Ok(read_back)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let [_, src_sock, dst_sock, devices @ ..] = argv.as_slice() else {
        eprintln!("usage: vmm_control_client <src socket> <dst socket> <src dev>... <dst dev>...");
        return ExitCode::from(2);
    };
    if devices.is_empty() || devices.len() % 2 != 0 {
        eprintln!("give as many destination devices as source devices (at least one)");
        return ExitCode::from(2);
    }
    let (src, dst) = devices.split_at(devices.len() / 2);
    match run(Path::new(src_sock), Path::new(dst_sock), src, dst) {
        Ok(n) => {
            println!(
                "CTRL PASS: {} devices migrated through the control sockets, {n} ports read back by the client",
                src.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("CTRL FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}
