//! Progress on stderr, as `--progress` asks:
//!
//! - `bar`: one indicatif bar per device with bytes, rate, ETA and phase;
//! - `log`: one plain line every `--progress-interval` seconds (default 5) with the bytes moved,
//!   the rate, the ETA and the phase, and a last line at the end: for journals and log files;
//! - `none`: nothing;
//! - `auto` (the default): `bar` when stderr is a terminal and neither `--json` nor `--quiet` was
//!   given, else `none`.
//!
//! Phases, named the same on both sides: listening (recv, until a source connects), connecting
//! (send), handshake, pre-copy, stop-copy, verifying, resuming, done, rollback.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::units::{human_bytes, human_bytes_f};

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal (and neither --json nor --quiet), else nothing.
    #[default]
    Auto,
    /// Bars on stderr, one per device.
    Bar,
    /// One line every --progress-interval seconds, and one at the end.
    Log,
    /// Nothing.
    None,
}

/// What `mode` means here: `Bar`, `Log` or `None` (never `Auto`).
pub fn resolve(mode: ProgressMode, json: bool, quiet: bool) -> ProgressMode {
    match mode {
        ProgressMode::Auto if !json && !quiet && std::io::stderr().is_terminal() => {
            ProgressMode::Bar
        }
        ProgressMode::Auto => ProgressMode::None,
        m => m,
    }
}

/// Per-device progress (or nothing), shared with the pipeline's callback thread.
#[derive(Debug, Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    log: Option<Arc<Mutex<LogState>>>,
}

/// The `log` mode's state.
#[derive(Debug)]
struct LogState {
    started: Instant,
    interval: Duration,
    last_line: Instant,
    bytes_at_last_line: u64,
    devices: Vec<DeviceLine>,
}

#[derive(Debug, Clone, Default)]
struct DeviceLine {
    done: u64,
    total: Option<u64>,
    phase: String,
}

const TEMPLATE_KNOWN: &str =
    "{prefix:<14.bold} {msg:<10} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}  ETA {eta}";
const TEMPLATE_UNKNOWN: &str =
    "{prefix:<14.bold} {msg:<10} {spinner} {bytes:>10} {bytes_per_sec:>12}";
/// Before any byte moved there is no rate: no ETA either.
const TEMPLATE_WAITING: &str = "{prefix:<14.bold} {msg:<10} {spinner}";

impl Progress {
    /// Progress for devices named `names` with `totals` (expected raw bytes, if known), in
    /// `mode` (resolved: see [`resolve`]), starting in `phase`; `log_interval` is the `log`
    /// mode's period.
    pub fn new(
        mode: ProgressMode,
        names: &[String],
        totals: &[Option<u64>],
        phase: &str,
        log_interval: Duration,
    ) -> Progress {
        match mode {
            ProgressMode::Bar => Progress::bars(names, totals, phase),
            ProgressMode::Log => Progress {
                multi: None,
                bars: Vec::new(),
                log: Some(Arc::new(Mutex::new(LogState {
                    started: Instant::now(),
                    interval: log_interval,
                    last_line: Instant::now(),
                    bytes_at_last_line: 0,
                    devices: names
                        .iter()
                        .enumerate()
                        .map(|(i, _)| DeviceLine {
                            done: 0,
                            total: totals.get(i).copied().flatten().filter(|t| *t > 0),
                            phase: phase.to_owned(),
                        })
                        .collect(),
                }))),
            },
            ProgressMode::Auto | ProgressMode::None => Progress::hidden(),
        }
    }

    /// Nothing shown.
    pub fn hidden() -> Progress {
        Progress {
            multi: None,
            bars: Vec::new(),
            log: None,
        }
    }

    fn bars(names: &[String], totals: &[Option<u64>], phase: &str) -> Progress {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let bars = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = totals.get(i).copied().flatten().filter(|t| *t > 0);
                let bar = match total {
                    Some(t) => ProgressBar::new(t),
                    None => ProgressBar::no_length(),
                }
                .with_style(style(TEMPLATE_WAITING));
                let bar = multi.add(bar);
                bar.set_prefix(format!("{i}:{name}"));
                bar.set_message(phase.to_owned());
                bar.enable_steady_tick(Duration::from_millis(250));
                bar
            })
            .collect();
        Progress {
            multi: Some(multi),
            bars,
            log: None,
        }
    }

    /// Whether anything is shown.
    pub fn is_enabled(&self) -> bool {
        self.multi.is_some() || self.log.is_some()
    }

    /// Sets every device's phase (before the pipeline reports: listening, handshake).
    pub fn set_phase(&self, phase: &str) {
        for bar in &self.bars {
            bar.set_message(phase.to_owned());
        }
        if let Some(l) = &self.log {
            let mut l = l.lock().unwrap_or_else(PoisonError::into_inner);
            for d in &mut l.devices {
                d.phase = phase.to_owned();
            }
        }
    }

    /// Sets device `idx`'s position (raw bytes moved), total if it changed, and phase.
    pub fn update(&self, idx: usize, done: u64, total: Option<u64>, phase: &str) {
        self.set(idx, done, total, phase, true);
    }

    /// [`Progress::update`]; `periodic`: a `log` line may be due.
    fn set(&self, idx: usize, done: u64, total: Option<u64>, phase: &str, periodic: bool) {
        if let Some(bar) = self.bars.get(idx) {
            let total = total.filter(|t| *t > 0);
            if let Some(t) = total {
                if bar.length() != Some(t) {
                    bar.set_length(t);
                }
            }
            if done > 0 {
                let template = if bar.length().is_some() {
                    TEMPLATE_KNOWN
                } else {
                    TEMPLATE_UNKNOWN
                };
                bar.set_style(style(template));
            }
            bar.set_position(done);
            if bar.message() != phase {
                bar.set_message(phase.to_owned());
            }
        }
        if let Some(l) = &self.log {
            let mut l = l.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(d) = l.devices.get_mut(idx) {
                d.done = done;
                if let Some(t) = total.filter(|t| *t > 0) {
                    d.total = Some(t);
                }
                phase.clone_into(&mut d.phase);
            }
            if periodic && l.last_line.elapsed() >= l.interval {
                let line = l.line(false);
                drop(l);
                say!("{line}");
            }
        }
    }

    /// Prints a line on stderr above the bars (or plainly when there are none).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| say!("{line}")),
            None => say!("{line}"),
        }
    }

    /// Stops every bar, leaving its last state on screen with `phase`; the cursor ends on a new
    /// line below the bars. In `log` mode, prints the last line.
    pub fn finish(&self, phase: &str) {
        for bar in &self.bars {
            bar.set_message(phase.to_owned());
            bar.finish();
        }
        if self.multi.is_some() {
            say!();
        }
        if let Some(l) = &self.log {
            let mut l = l.lock().unwrap_or_else(PoisonError::into_inner);
            for d in &mut l.devices {
                phase.clone_into(&mut d.phase);
            }
            let line = l.line(true);
            drop(l);
            say!("{line}");
        }
    }

    /// Sets every device's final byte count (from the report) and stops the bars.
    pub fn complete(&self, raw_bytes: &[u64], phase: &str) {
        for (i, b) in raw_bytes.iter().enumerate() {
            self.set(i, *b, Some(*b), phase, false);
        }
        self.finish(phase);
    }

    /// Removes every bar from the screen (used before a failure line).
    pub fn clear(&self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

impl LogState {
    /// `vfmig: progress: stop-copy, 1.2 GiB of 4.0 GiB (30%), 512.0 MiB/s, ETA 6 s`: the rate
    /// since the last line, or over the whole run for the `last` one; resets the period.
    fn line(&mut self, last: bool) -> String {
        let now = Instant::now();
        let since = if last { self.started } else { self.last_line };
        let secs = now.duration_since(since).as_secs_f64().max(1e-3);
        let done: u64 = self.devices.iter().map(|d| d.done).sum();
        let base = if last { 0 } else { self.bytes_at_last_line };
        let rate = done.saturating_sub(base) as f64 / secs;
        self.last_line = now;
        self.bytes_at_last_line = done;
        // The phase of the device furthest behind (the first one not yet done), else the last.
        let phase = self
            .devices
            .iter()
            .find(|d| d.phase != "done")
            .or(self.devices.last())
            .map_or("", |d| d.phase.as_str());
        let totals: Option<u64> = self.devices.iter().map(|d| d.total).sum();
        let mut line = format!("vfmig: progress: {phase}, {}", human_bytes(done));
        if let Some(t) = totals.filter(|t| *t > 0) {
            let pct = (done as f64 / t as f64 * 100.0).min(100.0);
            line.push_str(&format!(" of {} ({pct:.0}%)", human_bytes(t)));
        }
        line.push_str(&format!(", {}/s", human_bytes_f(rate)));
        match totals {
            Some(t) if rate > 0.0 && t > done && phase != "done" => {
                let eta = (t - done) as f64 / rate;
                line.push_str(&format!(", ETA {eta:.0} s"));
            }
            _ => line.push_str(", ETA -"),
        }
        line
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid_indicatif_templates() {
        assert!(ProgressStyle::with_template(TEMPLATE_KNOWN).is_ok());
        assert!(ProgressStyle::with_template(TEMPLATE_UNKNOWN).is_ok());
        assert!(ProgressStyle::with_template(TEMPLATE_WAITING).is_ok());
    }

    #[test]
    fn disabled_progress_draws_nothing_and_ignores_updates() {
        let p = Progress::hidden();
        assert!(!p.is_enabled());
        p.update(0, 5, Some(10), "stop-copy");
        p.update(7, 5, None, "stop-copy");
        p.finish("done");
    }

    #[test]
    fn a_log_line_has_bytes_rate_eta_and_phase() {
        let mut l = LogState {
            started: Instant::now() - Duration::from_secs(2),
            interval: Duration::from_secs(5),
            last_line: Instant::now() - Duration::from_secs(2),
            bytes_at_last_line: 0,
            devices: vec![
                DeviceLine {
                    done: 1 << 30,
                    total: Some(4 << 30),
                    phase: "stop-copy".into(),
                },
                DeviceLine {
                    done: 0,
                    total: None,
                    phase: "handshake".into(),
                },
            ],
        };
        let line = l.line(false);
        assert!(
            line.starts_with("vfmig: progress: stop-copy, 1.0 GiB"),
            "{line}"
        );
        assert!(line.contains("/s") && line.contains("ETA -"), "{line}");
        l.devices.truncate(1);
        l.devices[0].done = 2 << 30;
        let line = l.line(false);
        assert!(
            line.contains("of 4.0 GiB (50%)") && line.contains("ETA "),
            "{line}"
        );
        assert!(!line.contains("ETA -"), "{line}");
    }
}
