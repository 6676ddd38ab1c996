//! `vfmig-bench cli` runs its smallest row (4 MiB, one run) for real: two `vfmig` processes and
//! two loop processes over 127.0.0.1, each output compared with its input. Checks that rows came
//! out verified; never looks at the timings.

use std::path::{Path, PathBuf};
use std::process::Command;

use vfmig_benches::cli_e2e::{self, LibCorpus, Profile, Programs, Variant};

const BENCH: &str = env!("CARGO_BIN_EXE_vfmig-bench");

/// The `vfmig` binary of the same profile, when it was built (`cargo test --workspace` builds
/// it; `cargo test -p vfmig-benches` alone may not).
fn vfmig() -> Option<PathBuf> {
    let p = Path::new(BENCH).parent()?.join("vfmig");
    p.is_file().then_some(p)
}

fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("vfmig-bench-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn loop_pair_moves_a_file_and_the_output_is_verified() {
    let dir = scratch("loop");
    let input = dir.join("in");
    let libs = LibCorpus::load(1 << 20).expect("shared libraries for the mixed profile");
    cli_e2e::write_state(&input, 4 << 20, Profile::Mixed, &libs).expect("state file");
    let psk = dir.join("psk");
    cli_e2e::write_psk(&psk).expect("psk");
    let p = Programs {
        bench: PathBuf::from(BENCH),
        vfmig: PathBuf::from("/nonexistent"),
        psk: Some(psk),
        cpus: None,
    };
    let r = cli_e2e::run_once(&p, &Variant::Loop, &input, &dir.join("out")).expect("loop run");
    assert!(r.verified);
    assert_eq!(r.bytes, 4 << 20);
    assert!(r.send.start_ns > 0 && r.recv.start_ns > 0);
    assert!(!dir.join("out").exists(), "a verified output is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smallest_row_runs_vfmig_and_the_loop_and_verifies_every_output() {
    let Some(vfmig) = vfmig() else {
        eprintln!(
            "skipped: {} not built (cargo build --release -p vfmig)",
            Path::new(BENCH).with_file_name("vfmig").display()
        );
        return;
    };
    let dir = scratch("row");
    let csv = dir.join("rows.csv");
    let out = Command::new(BENCH)
        .args(["cli", "--sizes", "4M", "--profiles", "mixed", "--runs", "1"])
        .arg("--dir")
        .arg(&dir)
        .arg("--vfmig")
        .arg(&vfmig)
        .arg("--csv")
        .arg(&csv)
        .output()
        .expect("vfmig-bench cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(&csv).expect("CSV written");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for variant in ["loop", "vfmig", "vfmig --compress none"] {
        let row = rows
            .iter()
            .find(|r| r[col("variant")] == variant)
            .unwrap_or_else(|| panic!("no {variant} row in\n{csv}\n{text}"));
        assert_eq!(row[col("size_bytes")], (4u64 << 20).to_string());
        assert_eq!(row[col("profile")], "mixed");
        assert_eq!(row[col("verified")], "true", "{variant}");
        assert_eq!(row[col("runs")], "1");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
