//! The real `vfmig` binary: usage errors exit 2, `--help` documents the contract.

mod common;

use common::*;

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &[],
        &["bogus"],
        &["send"],
        &["send", "--connect", "127.0.0.1:1"],
        &[
            "send",
            "--connect",
            "not-an-address",
            "--device",
            "emu:size=1M",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M,colour=red",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M,size=2M",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=12Q",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "tape:/dev/st0",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M",
            "--streams",
            "0",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M",
            "--compress",
            "zstd:99",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M",
            "--max-bandwidth",
            "fast",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "emu:size=1M",
            "--psk-file",
            "/nonexistent/key",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:1",
            "--device",
            "file:/nonexistent/state",
        ],
        &["recv", "--listen", "127.0.0.1:0", "--device", "file:-"],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "file:/nonexistent-dir/x",
        ],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "emu:size=1M",
            "--tls-cert",
            "c.pem",
        ],
        &["demo", "--size", "0"],
    ];
    for args in cases {
        let out = run(
            {
                let mut c = vfmig();
                c.args(*args);
                c
            },
            None,
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} says why");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn help_documents_specs_exit_status_and_examples() {
    for sub in ["send", "recv"] {
        let out = run(
            {
                let mut c = vfmig();
                c.args([sub, "--help"]);
                c
            },
            None,
        );
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "DEVICE SPECS",
            "EXIT STATUS",
            "EXAMPLES",
            "--max-bandwidth",
            "emu:size=",
        ] {
            if sub == "recv" && needle == "--max-bandwidth" {
                continue;
            }
            assert!(text.contains(needle), "`vfmig {sub} --help` lacks {needle}");
        }
    }
}
