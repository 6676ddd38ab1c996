//! The suite: the rows (every size and profile, loop and vfmig variants alternating, median of
//! the runs) and the scaling grid ([`run_suite`]), and its settings and results.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{
    human, now_ns, row_line, run_once, write_state, LibCorpus, Profile, Programs, Rng, RunResult,
    Variant, PAGE,
};

/// One table row: the median run of a variant on one size and profile.
#[derive(Clone, Debug)]
pub struct Row {
    /// Bytes of state.
    pub size: u64,
    /// Content profile.
    pub profile: Profile,
    /// `vfmig`, `vfmig --compress none`, `loop`, or a scaling label.
    pub variant: String,
    /// Runs measured.
    pub runs: usize,
    /// The median run (by end to end time).
    pub run: RunResult,
    /// Median loop throughput of the same size and profile (for the ratio), if measured.
    pub loop_throughput: Option<f64>,
    /// Scaling rows: codec workers and connections.
    pub workers_streams: Option<(u16, u16)>,
    /// Cores the two processes could use.
    pub cores: usize,
}

impl Row {
    /// Throughput / the loop's.
    pub fn ratio(&self) -> Option<f64> {
        self.loop_throughput.map(|l| self.run.throughput() / l)
    }

    /// Cores busy on average over the run (both processes).
    pub fn busy_cores(&self) -> f64 {
        self.run.cpu_s() / self.run.e2e_s.max(1e-9)
    }

    /// What limited the run: `cores` when the two processes kept at least 85 % of the cores
    /// they could use busy; otherwise the busiest vfmig stage (a serial stage or a wait, not the
    /// machine).
    pub fn limit(&self) -> String {
        let busy = self.busy_cores();
        if busy >= 0.85 * self.cores as f64 {
            format!("cores ({busy:.1}/{} busy)", self.cores)
        } else {
            format!(
                "{} ({busy:.1}/{} cores busy)",
                self.run.limiting.as_deref().unwrap_or("serial"),
                self.cores
            )
        }
    }
}

/// Settings of `vfmig-bench cli`.
#[derive(Clone, Debug)]
pub struct Config {
    /// State sizes of the rows.
    pub sizes: Vec<u64>,
    /// Profiles of the rows.
    pub profiles: Vec<Profile>,
    /// Runs per row (median).
    pub runs: usize,
    /// Skip the rows (scaling only).
    pub rows: bool,
    /// Scaling grid: codec workers.
    pub workers: Vec<u16>,
    /// Scaling grid: connections.
    pub streams: Vec<u16>,
    /// Run the scaling grid.
    pub scaling: bool,
    /// Size of the scaling runs.
    pub scaling_size: u64,
    /// Runs per scaling cell.
    pub scaling_runs: usize,
    /// Directory of the state files (tmpfs).
    pub dir: PathBuf,
    /// Programs.
    pub programs: Programs,
    /// Cores the two processes may use (for the limit column).
    pub cores: usize,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows (loop and vfmig variants).
    pub rows: Vec<Row>,
    /// Scaling rows.
    pub scaling: Vec<Row>,
    /// Rows that failed or were skipped, and why.
    pub failed: Vec<String>,
}

fn median(mut runs: Vec<RunResult>) -> Option<RunResult> {
    runs.sort_by(|a, b| a.e2e_s.total_cmp(&b.e2e_s));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// The vfmig variants of the rows: CLI defaults, and `--compress none`.
pub fn row_variants() -> Vec<Variant> {
    vec![
        Variant::Vfmig {
            label: "vfmig".to_owned(),
            both: Vec::new(),
            send: Vec::new(),
        },
        Variant::Vfmig {
            label: "vfmig --compress none".to_owned(),
            both: Vec::new(),
            send: vec!["--compress".to_owned(), "none".to_owned()],
        },
    ]
}

/// Writes a 0600 PSK file of 32 random-looking bytes (hex) at `path`.
pub fn write_psk(path: &Path) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut rng = Rng::new(now_ns());
    let mut key = String::new();
    for _ in 0..4 {
        let _ = write!(key, "{:016x}", rng.next_u64());
    }
    writeln!(f, "{key}")
}

/// Runs the rows and the scaling grid; `log` gets one line per finished row.
pub fn run_suite(cfg: &Config, log: &mut dyn FnMut(&str)) -> io::Result<Outcome> {
    fs::create_dir_all(&cfg.dir)?;
    let mut out = Outcome::default();
    let needs_libs = cfg.profiles.contains(&Profile::Mixed) || cfg.scaling;
    let libs = if needs_libs {
        LibCorpus::load(64 << 20)?
    } else {
        LibCorpus {
            bytes: vec![0; PAGE],
        }
    };
    let input = cfg.dir.join("state.in");
    let output = cfg.dir.join("state.out");
    if cfg.rows {
        for &size in &cfg.sizes {
            for &profile in &cfg.profiles {
                write_state(&input, size, profile, &libs)?;
                let variants: Vec<Variant> = std::iter::once(Variant::Loop)
                    .chain(row_variants())
                    .collect();
                let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); variants.len()];
                let mut failed: Vec<Option<String>> = vec![None; variants.len()];
                // Alternate: a drift in machine load hits every variant alike.
                for _ in 0..cfg.runs.max(1) {
                    for (i, v) in variants.iter().enumerate() {
                        if failed[i].is_some() {
                            continue;
                        }
                        match run_once(&cfg.programs, v, &input, &output) {
                            Ok(r) => runs[i].push(r),
                            Err(e) => failed[i] = Some(e.to_string()),
                        }
                    }
                }
                let mut loop_tp = None;
                for ((v, rs), f) in variants.iter().zip(runs).zip(failed) {
                    let label = format!("{} {} {}", human(size), profile.name(), v.label());
                    if let Some(e) = f {
                        log(&format!("  {label}: FAILED: {e}"));
                        out.failed.push(format!("{label}: FAILED: {e}"));
                        continue;
                    }
                    let n = rs.len();
                    let Some(run) = median(rs) else { continue };
                    if *v == Variant::Loop {
                        loop_tp = Some(run.throughput());
                    }
                    let row = Row {
                        size,
                        profile,
                        variant: v.label().to_owned(),
                        runs: n,
                        run,
                        loop_throughput: loop_tp,
                        workers_streams: None,
                        cores: cfg.cores,
                    };
                    log(&format!("  {}", row_line(&row)));
                    out.rows.push(row);
                }
                let _ = fs::remove_file(&input);
            }
        }
    }
    if cfg.scaling {
        let size = cfg.scaling_size;
        write_state(&input, size, Profile::Mixed, &libs)?;
        let mut loop_runs = Vec::new();
        for _ in 0..cfg.scaling_runs.max(1) {
            match run_once(&cfg.programs, &Variant::Loop, &input, &output) {
                Ok(r) => loop_runs.push(r),
                Err(e) => out.failed.push(format!("scaling loop: FAILED: {e}")),
            }
        }
        let loop_tp = median(loop_runs).map(|r| r.throughput());
        for &w in &cfg.workers {
            for &s in &cfg.streams {
                let v = Variant::Vfmig {
                    label: format!("vfmig zstd w{w} s{s}"),
                    both: vec!["--workers".to_owned(), w.to_string()],
                    send: vec![
                        "--compress".to_owned(),
                        "zstd".to_owned(),
                        "--streams".to_owned(),
                        s.to_string(),
                    ],
                };
                let mut rs = Vec::new();
                let mut err = None;
                for _ in 0..cfg.scaling_runs.max(1) {
                    match run_once(&cfg.programs, &v, &input, &output) {
                        Ok(r) => rs.push(r),
                        Err(e) => {
                            err = Some(e.to_string());
                            break;
                        }
                    }
                }
                if let Some(e) = err {
                    log(&format!("  scaling w{w} s{s}: FAILED: {e}"));
                    out.failed.push(format!("scaling w{w} s{s}: FAILED: {e}"));
                    continue;
                }
                let n = rs.len();
                let Some(run) = median(rs) else { continue };
                let row = Row {
                    size,
                    profile: Profile::Mixed,
                    variant: v.label().to_owned(),
                    runs: n,
                    run,
                    loop_throughput: loop_tp,
                    workers_streams: Some((w, s)),
                    cores: cfg.cores,
                };
                log(&format!("  {}", row_line(&row)));
                out.scaling.push(row);
            }
        }
        let _ = fs::remove_file(&input);
    }
    let _ = fs::remove_file(&output);
    Ok(out)
}
