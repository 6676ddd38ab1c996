//! The standalone pair as an operator meets it (issue 16): no root needed for `file:` devices,
//! mistakes caught at the handshake, plain messages, safe files, honest exit codes and progress.
//! Every test runs the real binary as separate processes over loopback.

mod common;

use std::process::Command;

use common::*;

/// `vfmig recv` on loopback port 0 through `cmd` (a wrapper around the binary).
fn recv_via(mut cmd: Command, args: &[&str]) -> Receiver {
    cmd.arg("recv").args(["--listen", "127.0.0.1:0"]).args(args);
    Receiver::start(cmd)
}

/// `vfmig send` to `addr` through `cmd`.
fn send_via(mut cmd: Command, addr: std::net::SocketAddr, args: &[&str]) -> Command {
    cmd.arg("send")
        .args(["--connect", &addr.to_string()])
        .args(args);
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `file:` → `file:` round trip with both sides run by `wrap`: byte-identical, exit 0, and
/// the unpinned-buffer notice printed once per side.
fn file_round_trip_under(wrap: fn() -> Command) {
    let dir = shared_tempdir();
    let data = test_bytes((5 << 20) + 4321, 11);
    let src = dir.path().join("in.bin");
    write_public(&src, &data);
    let dst = dir.path().join("out.bin");
    let recv = recv_via(
        wrap(),
        &[
            "--device",
            &format!("file:{}", dst.display()),
            "--timeout",
            "30",
        ],
    );
    let out = run(
        send_via(
            wrap(),
            recv.addr,
            &[
                "--device",
                &format!("file:{}", src.display()),
                "--timeout",
                "30",
            ],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    let serr = text(&out.stderr);
    assert!(out.status.success(), "send failed: {:?} {serr}", out.status);
    assert!(rstatus.success(), "recv failed: {rstatus:?} {rlines:?}");
    assert_eq!(std::fs::read(&dst).expect("output"), data, "bytes differ");
    for (side, lines) in [
        ("send", serr.lines().map(str::to_owned).collect::<Vec<_>>()),
        ("recv", rlines),
    ] {
        let notices = lines
            .iter()
            .filter(|l| l.contains("cannot pin the buffer pool"))
            .count();
        assert_eq!(notices, 1, "{side}: one notice expected: {lines:?}");
    }
}

#[test]
fn file_transfer_works_as_an_unprivileged_user_with_unregistered_buffers() {
    file_round_trip_under(unprivileged);
}

#[test]
fn file_transfer_works_as_root_without_cap_ipc_lock_and_a_low_memlock_limit() {
    if !is_root() {
        return; // dropping a capability needs it first; the unprivileged test covers this case
    }
    file_round_trip_under(without_ipc_lock);
}

#[test]
fn demo_without_fuse_access_says_what_is_missing() {
    let mut c = unprivileged();
    c.args(["demo", "--size", "4M", "--devices", "1"]);
    let out = run(c, None);
    let err = text(&out.stderr);
    if out.status.success() {
        // This user may mount FUSE here (fusermount3 set up for it): nothing is missing.
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("need FUSE"), "{err}");
    assert!(!err.contains("not a VFIO device"), "{err}");
    assert_eq!(err.lines().count(), 1, "one failure line: {err}");
}

/// Runs `vfmig ARGS` to completion.
fn vfmig_run(args: &[&str]) -> std::process::Output {
    let mut c = vfmig();
    c.args(args);
    run(c, None)
}

/// A usage error: exit 2, the JSON failure object on stdout (with `--json`), and clap's or our
/// message on stderr. Returns the object's `error`.
fn usage_error_with_json(args: &[&str]) -> String {
    let out = vfmig_run(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let j = json(&out.stdout);
    assert_eq!(j["outcome"], "failed", "{j}");
    assert_eq!(j["exit_code"], 2, "{j}");
    j["error"].as_str().expect("error text").to_owned()
}

#[test]
fn a_rate_without_a_unit_is_a_usage_error_naming_the_units() {
    let e = usage_error_with_json(&[
        "send",
        "--connect",
        "127.0.0.1:1",
        "--device",
        "emu:size=1M",
        "--max-bandwidth",
        "10",
        "--json",
    ]);
    assert!(e.contains("no unit") && e.contains("Mbit/s"), "{e}");
}

#[test]
fn rates_in_mbit_gbit_mb_and_mib_per_second_are_accepted() {
    let dev = "emu:size=4M";
    for rate in ["100Mbit/s", "2.5Gbit/s", "300MB/s", "300MiB/s", "2.5G"] {
        let mut c = vfmig();
        c.args(["send", "--connect", "127.0.0.1:9", "--device", dev])
            .args(["--max-bandwidth", rate, "--timeout", "1"]);
        let o = run(c, None);
        assert_ne!(
            o.status.code(),
            Some(2),
            "{rate} refused: {}",
            text(&o.stderr)
        );
    }
    let recv = Receiver::spawn(&["--device", dev, "--max-bandwidth", "1Gbit/s"]);
    let out = run(
        send(
            recv.addr,
            &["--device", dev, "--max-bandwidth", "200MiB/s", "--json"],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
}

#[test]
fn an_emulated_device_larger_than_possible_is_a_usage_error() {
    let e = usage_error_with_json(&[
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--device",
        "emu:size=100T",
        "--json",
    ]);
    assert!(e.contains("100T") || e.contains("larger"), "{e}");
    assert!(!e.contains("VFIO"), "{e}");
}

#[test]
fn every_usage_error_prints_the_json_failure_object_when_asked() {
    for args in [
        &["send", "--connect", "127.0.0.1:1", "--json"][..],
        &[
            "send",
            "--json",
            "--connect",
            "127.0.0.1:1",
            "-d",
            "bogus:x",
        ],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "-d",
            "emu:size=1M",
            "--streams",
            "0",
            "--json",
        ],
        &["demo", "--json", "--size", "12Q"],
    ] {
        let e = usage_error_with_json(args);
        assert!(!e.is_empty(), "{args:?}");
    }
}

/// A receiver listening on `listen` (e.g. `:0`), emulated device `dev`.
fn recv_on(listen: &str, dev: &str) -> Receiver {
    let mut c = vfmig();
    c.args(["recv", "--listen", listen, "--device", dev]);
    Receiver::start(c)
}

fn send_to(target: &str, dev: &str) -> std::process::Output {
    let mut c = vfmig();
    c.args(["send", "--connect", target, "--device", dev, "--json"]);
    run(c, None)
}

#[test]
fn a_host_name_connects_and_a_bare_port_listens_on_every_address() {
    let dev = "emu:size=1M";
    for listen in [":0", "0"] {
        let recv = recv_on(listen, dev);
        assert!(
            recv.addr.ip().is_unspecified(),
            "{listen}: listening on {}",
            recv.addr
        );
        let out = send_to(&format!("localhost:{}", recv.addr.port()), dev);
        let (rstatus, _, rlines) = recv.finish();
        assert!(out.status.success(), "{listen}: {}", text(&out.stderr));
        assert!(rstatus.success(), "{rlines:?}");
        let peer = json(&out.stdout)["peer"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            peer.starts_with("127.0.0.1:"),
            "the address that answered: {peer}"
        );
    }
}

#[test]
fn ipv6_literals_work_on_both_sides() {
    let dev = "emu:size=1M";
    let recv = recv_on("[::1]:0", dev);
    assert!(recv.addr.is_ipv6(), "{}", recv.addr);
    let out = send_to(&format!("[::1]:{}", recv.addr.port()), dev);
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
    // The IPv6 wildcard of a bare port takes IPv6 peers too.
    let recv = recv_on(":0", dev);
    let out = send_to(&format!("[::1]:{}", recv.addr.port()), dev);
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
}

#[test]
fn an_occupied_port_is_named_in_the_failure() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let mut c = vfmig();
    c.args([
        "recv",
        "--listen",
        &addr,
        "--device",
        "emu:size=1M",
        "--json",
    ]);
    let out = run(c, None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&addr) && err.contains("address already in use"),
        "{err}"
    );
    assert_eq!(json(&out.stdout)["outcome"], "failed");
}

#[test]
fn sigint_exits_130_and_the_json_object_says_cancelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("state.out");
    let mut recv = Receiver::spawn(&["--device", &format!("file:{}", dst.display())]);
    let mut c = send(
        recv.addr,
        &[
            "--device",
            "emu:size=256M,profile=random",
            "--max-bandwidth",
            "400Mbit/s",
            "--compress",
            "none",
            "--json",
        ],
    );
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut sender = c.spawn().expect("spawn sender");
    recv.wait_for_line("vfmig: source ");
    let status = Command::new("kill")
        .args(["-INT", &sender.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let sstatus = wait_bounded(&mut sender);
    let mut out = String::new();
    use std::io::Read as _;
    let _ = sender
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let _ = recv.finish();
    assert_eq!(sstatus.code(), Some(130), "{out}");
    let j = json(out.as_bytes());
    assert_eq!(j["exit_code"], 130, "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled"),
        "{j}"
    );
}
