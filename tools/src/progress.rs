//! Progress bars: one indicatif bar per device on stderr, with bytes, rate, ETA and phase.
//!
//! Drawn only when both stdout and stderr are terminals (and neither `--json` nor `--quiet` was
//! given): a redirected stdout means a script is reading the result, and bars would only be
//! noise in its logs. Otherwise every method is a no-op.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether bars should be drawn, by the rule in the module doc.
pub fn wanted(json: bool, quiet: bool) -> bool {
    !json && !quiet && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// One bar per device (or nothing).
#[derive(Debug, Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
}

const TEMPLATE_KNOWN: &str =
    "{prefix:<14.bold} {msg:<10} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}  ETA {eta}";
const TEMPLATE_UNKNOWN: &str =
    "{prefix:<14.bold} {msg:<10} {spinner} {bytes:>10} {bytes_per_sec:>12}";

impl Progress {
    /// Bars for devices named `names`, with `totals` (expected raw bytes, if known); hidden
    /// entirely unless `enabled`.
    pub fn new(enabled: bool, names: &[String], totals: &[Option<u64>]) -> Progress {
        if !enabled {
            return Progress {
                multi: None,
                bars: Vec::new(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let bars = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = totals.get(i).copied().flatten().filter(|t| *t > 0);
                let bar = match total {
                    Some(t) => ProgressBar::new(t).with_style(style(TEMPLATE_KNOWN)),
                    None => ProgressBar::no_length().with_style(style(TEMPLATE_UNKNOWN)),
                };
                let bar = multi.add(bar);
                bar.set_prefix(format!("{i}:{name}"));
                bar.set_message("connecting");
                bar.enable_steady_tick(Duration::from_millis(250));
                bar
            })
            .collect();
        Progress {
            multi: Some(multi),
            bars,
        }
    }

    /// Whether anything is drawn.
    pub fn is_enabled(&self) -> bool {
        self.multi.is_some()
    }

    /// Sets device `idx`'s position (raw bytes moved), total if it changed, and phase.
    pub fn update(&self, idx: usize, done: u64, total: Option<u64>, phase: &str) {
        let Some(bar) = self.bars.get(idx) else {
            return;
        };
        if let Some(t) = total.filter(|t| *t > 0) {
            if bar.length() != Some(t) {
                bar.set_length(t);
                bar.set_style(style(TEMPLATE_KNOWN));
            }
        }
        bar.set_position(done);
        if bar.message() != phase {
            bar.set_message(phase.to_owned());
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
    /// line below the bars.
    pub fn finish(&self, phase: &str) {
        for bar in &self.bars {
            bar.set_message(phase.to_owned());
            bar.finish();
        }
        if self.multi.is_some() {
            say!();
        }
    }

    /// Sets every device's final byte count (from the report) and stops the bars.
    pub fn complete(&self, raw_bytes: &[u64], phase: &str) {
        for (i, b) in raw_bytes.iter().enumerate() {
            self.update(i, *b, Some(*b), phase);
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
    }

    #[test]
    fn disabled_progress_draws_nothing_and_ignores_updates() {
        let p = Progress::new(false, &["a".into()], &[Some(10)]);
        assert!(!p.is_enabled());
        p.update(0, 5, Some(10), "stop-copy");
        p.update(7, 5, None, "stop-copy");
        p.finish("done");
    }
}
