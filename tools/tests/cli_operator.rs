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
    let stdout = sender.stdout.take();
    let (sstatus, out) = signal_and_collect(&mut sender, "-INT", stdout);
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

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

#[test]
fn an_existing_destination_file_needs_force_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("state.bin");
    std::fs::write(&dst, b"old state").expect("write");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let spec = format!("file:{}", dst.display());

    let mut c = vfmig();
    c.args(["recv", "--listen", "127.0.0.1:0", "--device", &spec]);
    let out = run(c, None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--force") && err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&dst).expect("read"), b"old state");

    let src = dir.path().join("new.bin");
    let data = test_bytes(300_000, 5);
    std::fs::write(&src, &data).expect("write");
    let recv = Receiver::spawn(&["--device", &spec, "--force"]);
    let out = run(
        send(recv.addr, &["--device", &format!("file:{}", src.display())]),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
    assert_eq!(std::fs::read(&dst).expect("read"), data);
    assert_eq!(mode_of(&dst), 0o644, "the replaced file's mode is kept");
}

#[test]
fn recv_removes_the_temp_file_a_killed_receiver_left_and_only_that_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("state.bin");
    let spec = format!("file:{}", dst.display());
    // A temporary file of a live process (this test) for the same path, and a dead one's for
    // another path: neither is ours to remove.
    let live = dir
        .path()
        .join(format!(".state.bin.vfmig-{}-7.tmp", std::process::id()));
    std::fs::write(&live, b"live").expect("write");
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("wait");
    let other = dir
        .path()
        .join(format!(".other.bin.vfmig-{dead_pid}-0.tmp"));
    std::fs::write(&other, b"other").expect("write");

    let mut recv = Receiver::spawn(&["--device", &spec, "--timeout", "30"]);
    let mut sender = send(
        recv.addr,
        &[
            "--device",
            "emu:size=256M,profile=random",
            "--max-bandwidth",
            "200Mbit/s",
            "--compress",
            "none",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn sender");
    recv.wait_for_line("vfmig: source ");
    let prefix = format!(".state.bin.vfmig-{}-", recv.child.id());
    let deadline = std::time::Instant::now() + PROCESS_LIMIT;
    let left = loop {
        let found = dir_entries(dir.path())
            .into_iter()
            .find(|n| n.starts_with(&prefix));
        if let Some(n) = found {
            break dir.path().join(n);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no temp file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    recv.child.kill().expect("SIGKILL the receiver");
    let _ = recv.finish();
    let _ = sender.kill();
    let _ = wait_bounded(&mut sender);
    assert!(left.exists(), "SIGKILL leaves the temp file behind");

    // The clean-up happens before `listening on`, which `spawn` waited for.
    let again = Receiver::spawn(&["--device", &spec]);
    let seen = again.seen().join("\n");
    assert!(
        seen.contains(&format!("vfmig: removed {}", left.display())),
        "{seen}"
    );
    assert!(!left.exists(), "the dead receiver's temp file is gone");
    assert!(live.exists(), "a live PID's temp file stays");
    assert!(other.exists(), "another path's temp file stays");
    let mut again = again;
    again.child.kill().expect("kill");
    let _ = again.finish();
}

#[test]
fn a_key_file_readable_by_others_is_refused_unless_insecure_key_perms() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = write_key(dir.path(), "key", "0123456789abcdef0123456789abcdef\n");
    let open_key = dir.path().join("open-key");
    std::fs::copy(&key, &open_key).expect("copy");
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let open_key = open_key.display().to_string();

    let dev = "emu:size=1M";
    let mut c = vfmig();
    c.args(["send", "--connect", "127.0.0.1:1", "--device", dev])
        .args(["--psk-file", &open_key, "--json"]);
    let out = run(c, None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--insecure-key-perms") && err.contains("0644"),
        "{err}"
    );
    assert_eq!(json(&out.stdout)["exit_code"], 2);

    let recv = Receiver::spawn(&["--device", dev, "--psk-file", &key]);
    let out = run(
        send(
            recv.addr,
            &[
                "--device",
                dev,
                "--psk-file",
                &open_key,
                "--insecure-key-perms",
            ],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
}

/// Runs `send` with `src` devices against `recv` with `dst` devices; returns both exit codes
/// and failure lines.
fn mismatched(src: &[&str], dst: &[&str]) -> ((Option<i32>, String), (Option<i32>, String)) {
    let mut rargs = Vec::new();
    for d in dst {
        rargs.extend(["--device", d]);
    }
    let recv = Receiver::spawn(&rargs);
    let mut sargs = vec!["--json"];
    for d in src {
        sargs.extend(["--device", d]);
    }
    let out = run(send(recv.addr, &sargs), None);
    let (rstatus, _, rlines) = recv.finish();
    let j = json(&out.stdout);
    assert_eq!(j["raw_bytes"], 0, "nothing was streamed: {j}");
    (
        (out.status.code(), text(&out.stderr)),
        (rstatus.code(), rlines.last().cloned().unwrap_or_default()),
    )
}

#[test]
fn a_larger_source_device_is_refused_in_the_handshake_naming_both_sizes() {
    let ((s, serr), (r, rerr)) = mismatched(&["emu:size=128M"], &["emu:size=64M"]);
    for (code, line) in [(s, &serr), (r, &rerr)] {
        assert_eq!(code, Some(1), "{line}");
        assert!(
            line.contains("128.0 MiB") && line.contains("64.0 MiB") && line.contains("handshake"),
            "{line}"
        );
        assert!(
            !line.contains("RESUMING") && !line.contains("stop-copy"),
            "{line}"
        );
    }
}

#[test]
fn different_seeds_or_profiles_are_refused_in_the_handshake_naming_both() {
    for (src, dst, a, b) in [
        (
            "emu:size=4M,seed=1",
            "emu:size=4M,seed=2",
            "seed=1",
            "seed=2",
        ),
        (
            "emu:size=4M,profile=zero",
            "emu:size=4M,profile=text",
            "profile=zero",
            "profile=text",
        ),
    ] {
        let ((s, serr), (r, rerr)) = mismatched(&[src], &[dst]);
        for (code, line) in [(s, &serr), (r, &rerr)] {
            assert_eq!(code, Some(1), "{src} vs {dst}: {line}");
            assert!(line.contains(a) && line.contains(b), "{line}");
        }
    }
}

#[test]
fn a_device_count_mismatch_is_refused_in_the_handshake_not_in_stop_copy() {
    let ((s, serr), (r, rerr)) = mismatched(&["emu:size=4M"], &["emu:size=4M", "emu:size=4M"]);
    for (code, line) in [(s, &serr), (r, &rerr)] {
        assert_eq!(code, Some(1), "{line}");
        assert!(line.contains("1 devices") && line.contains("2"), "{line}");
        assert!(!line.contains("stop-copy"), "{line}");
    }
}

#[test]
fn a_file_pairs_with_any_device_kind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("emu.state");
    let recv = Receiver::spawn(&["--device", &format!("file:{}", dst.display())]);
    let out = run(send(recv.addr, &["--device", "emu:size=4M"]), None);
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
}

/// A client that sends `bytes` to a receiver and returns the receiver's last line.
/// Whether the receiver then exits or keeps waiting for its real source, it names the stranger.
fn stranger_sends(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut recv = Receiver::spawn(&["--device", "emu:size=1M", "--timeout", "5"]);
    let mut s = std::net::TcpStream::connect(recv.addr).expect("connect");
    let _ = s.write_all(bytes);
    let line = recv.wait_for_containing("not vfmig");
    drop(s);
    let _ = recv.child.kill();
    let _ = recv.finish();
    line
}

#[test]
fn a_non_vfmig_client_is_named_with_its_first_bytes_as_text() {
    for (bytes, shown, what) in [
        (&b"SSH-2.0-OpenSSH_9.6\r\n"[..], "SSH-", "SSH"),
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "GET ", "HTTP"),
    ] {
        let line = stranger_sends(bytes);
        assert!(
            line.contains("not vfmig") && line.contains(shown) && line.contains(what),
            "{line}"
        );
        assert!(!line.contains("magic"), "{line}");
    }
}

#[test]
fn a_fifo_without_a_writer_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("state.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let dst = dir.path().join("out");
    // The receiver's own fate is not this test's subject: bound its wait.
    let recv = Receiver::spawn(&[
        "--device",
        &format!("file:{}", dst.display()),
        "--timeout",
        "3",
    ]);
    let out = run(
        send(
            recv.addr,
            &[
                "--device",
                &format!("file:{}", fifo.display()),
                "--timeout",
                "1",
            ],
        ),
        None,
    );
    let _ = recv.finish();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no process opened the FIFO") && err.contains("--timeout"),
        "{err}"
    );
    assert!(!err.contains("STOP_COPY"), "{err}");
}

#[test]
fn bars_are_drawn_when_only_stderr_is_a_terminal() {
    let dev = "emu:size=4M";
    let recv = Receiver::spawn(&["--device", dev, "--quiet"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("send.out");
    // `script` gives the command a terminal; stdout goes to a file, as in `send ... > log`.
    let cmd = format!(
        "'{}' send --connect {} --device {dev} --max-bandwidth 16Mbit/s > '{}'",
        bin(),
        recv.addr,
        out_file.display()
    );
    let mut c = Command::new("script");
    c.args(["-qfec", &cmd, "/dev/null"]);
    let out = run(c, None);
    let _ = recv.finish();
    let tty = text(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("emu0") && tty.contains("MiB/4.00 MiB") && tty.contains("ETA"),
        "no bars on the terminal: {tty:?}"
    );
}

#[test]
fn log_progress_prints_lines_with_bytes_rate_eta_and_phase_on_both_sides() {
    let dev = "emu:size=4M,profile=random";
    let log = ["--progress", "log", "--progress-interval", "1"];
    let mut rargs = vec!["--device", dev];
    rargs.extend(log);
    let recv = Receiver::spawn(&rargs);
    let mut sargs = vec!["--device", dev, "--max-bandwidth", "16Mbit/s"];
    sargs.extend(log);
    let out = run(send(recv.addr, &sargs), None);
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
    let slines: Vec<String> = text(&out.stderr).lines().map(str::to_owned).collect();
    for (side, lines) in [("send", &slines), ("recv", &rlines)] {
        let progress: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("vfmig: progress: "))
            .collect();
        let last = progress
            .last()
            .unwrap_or_else(|| panic!("{side}: no progress line: {lines:?}"));
        assert!(
            last.starts_with("vfmig: progress: done, 4.0 MiB of 4.0 MiB (100%), "),
            "{side}: {last}"
        );
        for l in &progress {
            assert!(l.contains("/s, ETA "), "{side}: {l}");
            let phase = l["vfmig: progress: ".len()..]
                .split(',')
                .next()
                .unwrap_or_default();
            assert!(
                [
                    "handshake",
                    "pre-copy",
                    "stop-copy",
                    "verifying",
                    "resuming",
                    "done"
                ]
                .contains(&phase),
                "{side}: phase `{phase}` in {l}"
            );
        }
    }
}

#[test]
fn a_host_name_that_does_not_resolve_is_named() {
    let mut c = vfmig();
    c.args([
        "send",
        "--connect",
        "no-such-host.invalid:7000",
        "--device",
        "emu:size=1M",
    ])
    .arg("--json");
    let out = run(c, None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot resolve host no-such-host.invalid"),
        "{err}"
    );
    assert_eq!(json(&out.stdout)["outcome"], "failed");
}

#[test]
fn workers_set_on_both_sides_migrate_and_out_of_range_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    let bytes: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &bytes).expect("source file");
    // More workers than the receiver's pool can feed: it runs with fewer instead of failing.
    let recv = Receiver::spawn(&[
        "--device",
        &format!("file:{}", dst.display()),
        "--workers",
        "64",
    ]);
    let out = run(
        send(
            recv.addr,
            &[
                "--device",
                &format!("file:{}", src.display()),
                "--workers",
                "5",
                "--compress",
                "zstd",
            ],
        ),
        None,
    );
    let (rstatus, _, rlines) = recv.finish();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(rstatus.success(), "{rlines:?}");
    assert_eq!(std::fs::read(&dst).expect("destination file"), bytes);
    let e = usage_error_with_json(&[
        "send",
        "--connect",
        "127.0.0.1:1",
        "--device",
        "emu:size=1M",
        "--workers",
        "0",
        "--json",
    ]);
    assert!(e.contains("--workers"), "{e}");
}
