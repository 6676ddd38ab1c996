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
//!
//! Files: `content` (state-file content profiles), `plain_loop` (the loop sides), `measure` (the
//! wrapper and its `MEASURE` line), `run` (one receiver/sender pair), `suite` (rows and the
//! scaling grid), `report` (log line, CSV, markdown).

mod content;
mod measure;
mod plain_loop;
mod report;
mod run;
mod suite;

use std::time::{SystemTime, UNIX_EPOCH};

pub use content::{write_state, LibCorpus, Profile, Rng};
pub use measure::{measure, Measured};
pub use plain_loop::{loop_recv, loop_send};
pub use report::{csv, human, markdown, row_line};
pub use run::{run_once, Programs, RunError, RunResult, Variant};
pub use suite::{row_variants, run_suite, write_psk, Config, Outcome, Row};

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
