//! The end of a session through the real binary: the link cut at the commit point leaves both
//! `vfmig` processes in doubt (exit status 3, `"outcome": "in-doubt"` with guidance), neither
//! resumes anything, and a `file:` destination keeps the committed copy at its path.

mod common;

use common::*;
use vfmig_wire::FrameKind;

/// The protocol-aware link-fault proxy of the pipeline's tests.
#[path = "../../pipeline/tests/common/mod.rs"]
mod link;

#[test]
fn link_cut_at_the_commit_makes_both_processes_exit_3_in_doubt_with_guidance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = test_bytes(2 << 20 | 777, 9);
    let src = dir.path().join("state.bin");
    std::fs::write(&src, &data).expect("write source");
    let dst = dir.path().join("state.out");
    let recv = Receiver::spawn(&[
        "--device",
        &format!("file:{}", dst.display()),
        "--json",
        "--timeout",
        "5",
    ]);
    let via = link::proxy(recv.addr, link::Fault::CutToDestination(FrameKind::Commit));
    let out = run(
        send(
            via,
            &[
                "--device",
                &format!("file:{}", src.display()),
                "--json",
                "--timeout",
                "5",
            ],
        ),
        None,
    );
    let (rstatus, rstdout, rlines) = recv.finish();
    assert_eq!(
        out.status.code(),
        Some(3),
        "send: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rstatus.code(), Some(3), "recv: {rlines:?}");
    for (side, v) in [
        ("send", json(&out.stdout)),
        ("recv", json(rstdout.as_bytes())),
    ] {
        assert_eq!(v["outcome"], "in-doubt", "{side}: {v}");
        assert_eq!(v["exit_code"], 3, "{side}: {v}");
        assert!(
            v["guidance"].as_str().is_some_and(|g| !g.is_empty()),
            "{side}: {v}"
        );
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("IN DOUBT on the")),
            "{side}: {v}"
        );
    }
    // The destination was prepared: its copy is complete and verified, and stays in place.
    assert_eq!(std::fs::read(&dst).expect("destination file"), data);
}
