//! `vfmig send --control` and `vfmig recv --control` as real processes, driven by a test client
//! that plays the VMM (tests/control_client): it opens the files, hands their fds over with
//! SCM_RIGHTS, drives a step-mode migration over loopback and checks the bytes; and every kind
//! of bad input, which must get an error and leave the migration running.

mod common;
mod control_client;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{test_bytes, write_key, Receiver};
use control_client::{first_line, Client};
use serde_json::{json, Value};

const READY: &str = "vfmig: control socket at ";

/// A `vfmig recv --control` and a `vfmig send --control` pointed at it.
struct Pair {
    dst: Receiver,
    src: Receiver,
    dst_sock: PathBuf,
    src_sock: PathBuf,
}

fn pair(dir: &Path, send_args: &[&str], recv_args: &[&str]) -> Pair {
    let key = write_key(dir, "key", "control-socket-test-key-0123456789");
    let dst_sock = dir.join("dst.sock");
    let src_sock = dir.join("src.sock");
    let mut cmd = common::vfmig();
    cmd.arg("recv")
        .args(["--listen", "127.0.0.1:0", "--psk-file", &key, "--control"])
        .arg(format!("unix:{}", dst_sock.display()))
        .args(recv_args);
    let mut dst = Receiver::start(cmd);
    dst.wait_for_line(READY);
    let mut cmd = common::send(dst.addr, &["--psk-file", &key, "--control"]);
    cmd.arg(format!("unix:{}", src_sock.display()))
        .args(send_args);
    let src = Receiver::start_with(cmd, READY);
    Pair {
        dst,
        src,
        dst_sock,
        src_sock,
    }
}

fn emu_spec() -> Value {
    json!({ "spec": "emu:size=8M,precopy=4M,dirty-rate=1M/s" })
}

/// The state a source file holds, the source file, and the destination file (empty) with its
/// path.
fn files(dir: &Path, len: usize, seed: u64) -> (Vec<u8>, File, PathBuf, File) {
    let data = test_bytes(len, seed);
    std::fs::write(dir.join("src.bin"), &data).expect("write");
    let src_file = File::open(dir.join("src.bin")).expect("open");
    let dst_path = dir.join("dst.bin");
    let dst_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dst_path)
        .expect("create");
    (data, src_file, dst_path, dst_file)
}

/// Both clients connected, one emulated device each, both sides started.
fn started_emu(p: &Pair) -> (Client, Client) {
    let mut dst = Client::connect(&p.dst_sock);
    let mut src = Client::connect(&p.src_sock);
    dst.ok("add-device", emu_spec(), &[]);
    src.ok("add-device", emu_spec(), &[]);
    dst.ok("start", json!({}), &[]);
    src.ok("start", json!({}), &[]);
    (dst, src)
}

/// Quits a client whose migration is over and returns the process's exit code and stderr.
fn quit(mut c: Client, p: Receiver) -> (Option<i32>, Vec<String>) {
    c.ok("quit", json!({}), &[]);
    drop(c);
    let (status, _out, err) = p.finish();
    (status.code(), err)
}

#[test]
fn vmm_client_passes_file_fds_and_drives_a_step_mode_migration_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, src_file, dst_path, dst_file) = files(dir.path(), 3 << 20, 7);
    let p = pair(dir.path(), &[], &[]);
    for s in [&p.src_sock, &p.dst_sock] {
        let mode = std::fs::metadata(s).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", s.display());
    }

    let mut dst = Client::connect(&p.dst_sock);
    assert_eq!(dst.greeting["vfmig"]["role"], json!("destination"));
    let added = dst.ok(
        "add-device",
        json!({ "kind": "file", "name": "state" }),
        &[dst_file.as_raw_fd()],
    );
    assert_eq!(added["index"], json!(0));
    dst.ok("start", json!({}), &[]);

    let mut src = Client::connect(&p.src_sock);
    assert_eq!(src.greeting["vfmig"]["role"], json!("source"));
    src.ok(
        "add-device",
        json!({ "kind": "file", "name": "state" }),
        &[src_file.as_raw_fd()],
    );
    let started = src.ok("start", json!({}), &[]);
    assert_eq!(started["peer"], json!(p.dst.addr.to_string()));
    src.ok("switchover", json!({}), &[]);

    let committed = dst.wait_event("committed");
    assert_eq!(committed["data"]["devices"][0]["state"], json!("STOP"));
    dst.ok("resumed", json!({}), &[]);
    let done = src.wait_event("completed");
    assert_eq!(done["data"]["raw_bytes"], json!(data.len()));
    let done = dst.wait_event("completed");
    assert_eq!(done["data"]["devices"][0]["accepted"], json!(true));
    assert!(
        src.seen.iter().any(|e| e == "device-state"),
        "{:?}",
        src.seen
    );
    assert!(
        dst.seen.iter().any(|e| e == "device-state"),
        "{:?}",
        dst.seen
    );
    assert_eq!(
        src.ok("status", json!({}), &[])["state"],
        json!("completed")
    );

    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(0), "{err:?}");
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(0), "{err:?}");
    // The bytes landed in the file the client holds.
    let got = std::fs::read(&dst_path).expect("read");
    assert!(
        got == data,
        "destination file differs ({} bytes)",
        got.len()
    );
    assert!(
        !p.src_sock.exists() && !p.dst_sock.exists(),
        "sockets removed at exit"
    );
}

#[test]
fn emulated_devices_report_precopy_progress_and_switchover_ready_before_the_vmm_switches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(dir.path(), &["--precopy"], &[]);
    let mut dst = Client::connect(&p.dst_sock);
    let mut src = Client::connect(&p.src_sock);
    for _ in 0..2 {
        dst.ok("add-device", emu_spec(), &[]);
        src.ok("add-device", emu_spec(), &[]);
    }
    dst.ok("start", json!({}), &[]);
    src.ok("start", json!({}), &[]);
    let ready = src.wait_event("switchover-ready");
    assert_eq!(ready["data"]["switchover_acked"], json!(true));
    assert!(
        src.seen.iter().any(|e| e == "precopy-progress"),
        "{:?}",
        src.seen
    );
    let st = src.ok("status", json!({}), &[]);
    assert_eq!(st["state"], json!("pre-copy"), "{st}");
    assert_eq!(st["devices"].as_array().map(Vec::len), Some(2), "{st}");
    assert!(st["devices"][0]["raw_bytes"].as_u64() > Some(0), "{st}");
    src.ok("switchover", json!({}), &[]);
    dst.wait_event("committed");
    // The VMM asks vfmig to resume the (in-process) emulated devices.
    dst.ok("resumed", json!({ "resume-devices": true }), &[]);
    let done = src.wait_event("completed");
    assert_eq!(done["data"]["outcome"], json!("ok"));
    let done = dst.wait_event("completed");
    assert!(done["data"]["devices"][1]["raw_bytes"].as_u64() >= Some(8 << 20));
    // Resumed after the commit: RUNNING, and their state was accepted.
    for d in done["data"]["devices"].as_array().into_iter().flatten() {
        assert_eq!(d["final_state"], json!("RUNNING"), "{d}");
        assert_eq!(d["accepted"], json!(true), "{d}");
    }
    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(0), "{err:?}");
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(0), "{err:?}");
}

#[test]
fn bad_input_gets_json_errors_and_never_stops_the_migration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(dir.path(), &["--precopy"], &[]);
    let mut dst = Client::connect(&p.dst_sock);
    let mut src = Client::connect(&p.src_sock);
    let devnull = File::open("/dev/null").expect("open");
    let null = devnull.as_raw_fd();

    // Wrong step, missing and unexpected fds, bad arguments, before the start.
    assert_eq!(src.err("switchover", json!({}), &[]), "InvalidState");
    assert_eq!(src.err("cancel", json!({}), &[]), "InvalidState");
    assert_eq!(src.err("start", json!({}), &[]), "InvalidState");
    assert_eq!(
        src.err("add-device", json!({ "kind": "file", "name": "x" }), &[]),
        "FdError"
    );
    assert_eq!(src.err("add-device", emu_spec(), &[null]), "FdError");
    assert_eq!(
        src.err(
            "add-device",
            json!({ "spec": "emu:size=4M", "kind": "file" }),
            &[]
        ),
        "InvalidArgument"
    );
    assert_eq!(
        src.err("add-device", json!({ "spec": "nonsense:x" }), &[]),
        "InvalidArgument"
    );
    assert_eq!(
        src.err(
            "add-device",
            json!({ "kind": "warp-drive", "name": "x" }),
            &[null]
        ),
        "InvalidArgument"
    );
    assert_eq!(
        src.err("status", json!({ "verbose": true }), &[]),
        "InvalidArgument"
    );
    // An fd that is not what its kind says is refused, and nothing is added.
    for kind in ["vfio", "vfio-group"] {
        let args = json!({ "kind": kind, "name": "0000:00:01.0" });
        assert_eq!(
            src.err("add-device", args, &[null]),
            "DeviceError",
            "{kind}"
        );
    }
    let file = json!({ "kind": "file", "name": "x" });
    assert_eq!(dst.err("add-device", file.clone(), &[null]), "DeviceError");
    let sock = std::os::unix::net::UnixStream::pair().expect("pair").0;
    assert_eq!(
        src.err("add-device", file, &[sock.as_raw_fd()]),
        "DeviceError"
    );
    assert_eq!(src.ok("status", json!({}), &[])["devices"], json!([]));

    dst.ok("add-device", emu_spec(), &[]);
    src.ok("add-device", emu_spec(), &[]);
    assert_eq!(dst.err("resumed", json!({}), &[]), "InvalidState");
    dst.ok("start", json!({}), &[]);
    src.ok("start", json!({}), &[]);
    src.wait_event("precopy-progress");

    // During pre-copy: every kind of garbage.
    let raw_error = |c: &mut Client, bytes: &[u8], fds: &[i32]| -> String {
        c.send_raw(bytes, fds);
        let r = c.reply().unwrap_or_else(|| {
            panic!(
                "no reply to {:?} with {} fds",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)]),
                fds.len()
            )
        });
        control_client::error_class(&r).unwrap_or_else(|| panic!("not an error: {r}"))
    };
    assert_eq!(
        raw_error(&mut src, b"this is not json\n", &[]),
        "GenericError"
    );
    assert_eq!(raw_error(&mut src, b"[1,2,3]\n", &[]), "GenericError");
    assert_eq!(raw_error(&mut src, b"{\"id\":1}\n", &[]), "GenericError");
    assert_eq!(
        raw_error(&mut src, b"{\"execute\":\"frobnicate\"}\n", &[]),
        "CommandNotFound"
    );
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    assert_eq!(raw_error(&mut src, &long, &[]), "GenericError");
    assert_eq!(raw_error(&mut src, b"\n", &[null]), "FdError");
    let many: Vec<File> = (0..9)
        .map(|_| File::open("/dev/null").expect("open"))
        .collect();
    let many: Vec<i32> = many.iter().map(AsRawFd::as_raw_fd).collect();
    assert_eq!(
        raw_error(&mut src, b"{\"execute\":\"status\"}\n", &many),
        "FdError"
    );
    assert_eq!(src.err("status", json!({}), &[null]), "FdError");
    assert_eq!(src.err("add-device", emu_spec(), &[]), "InvalidState");
    assert_eq!(src.err("start", json!({}), &[]), "InvalidState");
    assert_eq!(src.err("resumed", json!({}), &[]), "CommandNotFound");
    assert_eq!(src.err("quit", json!({}), &[]), "InvalidState");
    assert_eq!(dst.err("failed", json!({}), &[]), "InvalidState");
    assert_eq!(
        dst.err("resumed", json!({ "resume-devices": 1 }), &[]),
        "InvalidArgument"
    );
    // A second client is refused politely, on both sides.
    for sock in [&p.src_sock, &p.dst_sock] {
        let (_s, first) = first_line(sock);
        assert_eq!(
            control_client::error_class(&first).as_deref(),
            Some("Busy"),
            "{first}"
        );
    }

    // The migration went on through all of it.
    assert_eq!(src.ok("status", json!({}), &[])["state"], json!("pre-copy"));
    src.ok("switchover", json!({}), &[]);
    assert_eq!(src.err("switchover", json!({}), &[]), "InvalidState");
    dst.wait_event("committed");
    dst.ok("resumed", json!({ "resume-devices": true }), &[]);
    assert_eq!(dst.err("resumed", json!({}), &[]), "InvalidState");
    src.wait_event("completed");
    dst.wait_event("completed");
    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(0), "{err:?}");
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(0), "{err:?}");
}

#[test]
fn a_source_client_that_vanishes_in_precopy_cancels_and_both_sides_roll_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(dir.path(), &["--precopy"], &[]);
    let (mut dst, mut src) = started_emu(&p);
    src.wait_event("precopy-progress");
    drop(src);

    let failed = dst.wait_event("failed");
    assert_eq!(failed["data"]["class"], json!("failed"), "{failed}");
    let (code, _, err) = p.src.finish();
    assert_eq!(code.code(), Some(1), "{err:?}");
    assert!(
        err.iter().any(|l| l.contains("left mid-migration")),
        "{err:?}"
    );
    assert!(err.iter().any(|l| l.contains("cancelled")), "{err:?}");
    // The source device was walked back from PRE_COPY to RUNNING.
    assert!(
        err.iter()
            .any(|l| l.starts_with("vfmig: rollback: ") && l.contains("PRE_COPY")),
        "{err:?}"
    );
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(1), "{err:?}");
}

#[test]
fn a_destination_client_that_vanishes_after_the_commit_resets_its_file_and_the_source_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, src_file, dst_path, dst_file) = files(dir.path(), 1 << 20, 3);
    let p = pair(dir.path(), &[], &[]);
    let mut dst = Client::connect(&p.dst_sock);
    let mut src = Client::connect(&p.src_sock);
    let file = json!({ "kind": "file", "name": "state" });
    dst.ok("add-device", file.clone(), &[dst_file.as_raw_fd()]);
    src.ok("add-device", file, &[src_file.as_raw_fd()]);
    dst.ok("start", json!({}), &[]);
    src.ok("start", json!({}), &[]);
    src.ok("switchover", json!({}), &[]);
    dst.wait_event("committed");
    assert_eq!(
        std::fs::metadata(&dst_path).expect("stat").len(),
        data.len() as u64,
        "the state was in the file at the commit"
    );
    drop(dst);

    let failed = src.wait_event("failed");
    let rollback = failed["data"]["rollback"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rollback.len(), 1, "{failed}");
    assert_eq!(rollback[0]["action"], json!("walked"), "{failed}");
    let (code, _, err) = p.dst.finish();
    assert_eq!(code.code(), Some(1), "{err:?}");
    assert_eq!(
        std::fs::metadata(&dst_path).expect("stat").len(),
        0,
        "a destination that did not resume keeps no state"
    );
    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(1), "{err:?}");
}

#[test]
fn a_client_of_another_user_is_refused_and_the_socket_stays_for_its_owner() {
    if !common::is_root() {
        return; // needs another uid to connect from
    }
    let dir = common::shared_tempdir();
    let sock = dir.path().join("ctl.sock");
    let mut cmd = common::unprivileged();
    cmd.args([
        "send",
        "--connect",
        "127.0.0.1:9",
        "--insecure",
        "--control",
    ])
    .arg(format!("unix:{}", sock.display()));
    let p = Receiver::start_with(cmd, READY);
    // Root may open the 0600 socket of `nobody`, but is not its owner.
    let (_s, first) = first_line(&sock);
    assert_eq!(
        control_client::error_class(&first).as_deref(),
        Some("PermissionDenied"),
        "{first}"
    );
    let mut child = p.child;
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn cancel_in_precopy_rolls_the_source_back_and_fails_the_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(dir.path(), &["--precopy"], &[]);
    let (mut dst, mut src) = started_emu(&p);
    src.wait_event("precopy-progress");
    src.ok("cancel", json!({}), &[]);
    let failed = src.wait_event("failed");
    assert_eq!(failed["data"]["class"], json!("cancelled"), "{failed}");
    assert_eq!(
        failed["data"]["rollback"][0]["action"],
        json!("walked"),
        "{failed}"
    );
    assert_eq!(
        failed["data"]["rollback"][0]["from"],
        json!("PRE_COPY"),
        "{failed}"
    );
    assert_eq!(src.err("cancel", json!({}), &[]), "InvalidState");
    assert_eq!(src.err("switchover", json!({}), &[]), "InvalidState");
    dst.wait_event("failed");
    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(1), "{err:?}");
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(1), "{err:?}");
}

#[test]
fn the_destination_vmm_saying_failed_resets_its_devices_and_the_source_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(dir.path(), &[], &[]);
    let (mut dst, mut src) = started_emu(&p);
    src.ok("switchover", json!({}), &[]);
    dst.wait_event("committed");
    dst.ok("failed", json!({}), &[]);
    let failed = dst.wait_event("failed");
    assert_eq!(failed["data"]["class"], json!("resume-failed"), "{failed}");
    let failed = src.wait_event("failed");
    assert_eq!(
        failed["data"]["rollback"][0]["action"],
        json!("walked"),
        "{failed}"
    );
    let (code, err) = quit(src, p.src);
    assert_eq!(code, Some(1), "{err:?}");
    let (code, err) = quit(dst, p.dst);
    assert_eq!(code, Some(1), "{err:?}");
}
