//! The C example (`examples/c/vmm_loop.c`) builds with the system C compiler against this
//! crate's static library and migrates two emulated devices over loopback in step mode: the
//! destination resumes, the source reports that outcome, and the states are identical.
//!
//! `cc` (or `$CC`) is the system C compiler: the one rustc already links with, so wherever
//! `cargo test` runs (CI's `.ci/run` included) it is there.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `libvfmig.a` cargo built for this test's profile (next to the test binary's `deps/`).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let profile = deps.parent().expect("profile dir");
    [profile.join("libvfmig.a"), deps.join("libvfmig.a")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libvfmig.a not found in {}", profile.display()))
}

#[test]
fn c_vmm_loop_migrates_two_emulated_devices_in_step_mode() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm_loop");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let build = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("capi/include"))
        .arg("-o")
        .arg(&out)
        .arg(root.join("examples/c/vmm_loop.c"))
        .arg(static_lib())
        // What the Rust standard library needs (`rustc --print native-static-libs`).
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(
        build.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&out).output().expect("run vmm_loop");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "vmm_loop failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        stdout.contains("vmm_loop: OK: 2 devices") && stdout.contains("states identical"),
        "{stdout}\n{stderr}"
    );
    // The destination's outcome reached the source (docs/PROTOCOL.md, section 5.1).
    assert!(
        stderr.contains("destination outcome 1"),
        "{stdout}\n{stderr}"
    );
}
