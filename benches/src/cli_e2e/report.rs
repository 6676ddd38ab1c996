//! Reporting: the log line of a row, the CSV and the markdown tables.

use std::fmt::Write as _;

use super::{Outcome, Row, GIB, MIB};

/// Sizes as the tables print them.
pub fn human(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} B")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / MIB as f64)
}

/// One line for the log.
pub fn row_line(r: &Row) -> String {
    format!(
        "{:>7} {:<6} {:<24} {:>8.1} MB/s e2e {:>8.1} ms  ratio {}  downtime {} ms  setup {} ms  exit {} ms  cpu {:.2}+{:.2} s  rss {}/{} MiB  {}",
        human(r.size),
        r.profile.name(),
        r.variant,
        r.run.throughput() / 1e6,
        r.run.e2e_s * 1e3,
        r.ratio().map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
        opt_ms(r.run.downtime_ms),
        opt_ms(r.run.setup_ms),
        opt_ms(r.run.exit_ms),
        r.run.send.cpu_s(),
        r.run.recv.cpu_s(),
        mib(r.run.send.maxrss),
        mib(r.run.recv.maxrss),
        if r.run.verified { "verified" } else { "NOT VERIFIED" }
    )
}

/// CSV of every row (rows, then scaling rows).
pub fn csv(o: &Outcome) -> String {
    let mut s = String::from(
        "kind,size_bytes,profile,variant,workers,streams,runs,e2e_s,throughput_mbps,ratio_to_loop,downtime_ms,setup_ms,exit_ms,send_cpu_s,recv_cpu_s,send_peak_rss,recv_peak_rss,wire_bytes,limiting_stage,busy_cores,cores,verified\n",
    );
    let f = |v: Option<f64>| v.map_or_else(String::new, |x| format!("{x:.3}"));
    for (kind, rows) in [("row", &o.rows), ("scaling", &o.scaling)] {
        for r in rows {
            let (w, st) = r
                .workers_streams
                .map_or((String::new(), String::new()), |(w, s)| {
                    (w.to_string(), s.to_string())
                });
            let _ = writeln!(
                s,
                "{kind},{},{},{},{w},{st},{},{:.6},{:.1},{},{},{},{},{:.3},{:.3},{},{},{},{},{:.2},{},{}",
                r.size,
                r.profile.name(),
                r.variant,
                r.runs,
                r.run.e2e_s,
                r.run.throughput() / 1e6,
                f(r.ratio()),
                f(r.run.downtime_ms),
                f(r.run.setup_ms),
                f(r.run.exit_ms),
                r.run.send.cpu_s(),
                r.run.recv.cpu_s(),
                r.run.send.maxrss,
                r.run.recv.maxrss,
                r.run.wire_bytes.map_or_else(String::new, |b| b.to_string()),
                r.run.limiting.as_deref().unwrap_or(""),
                r.busy_cores(),
                r.cores,
                r.run.verified
            );
        }
    }
    s
}

/// The markdown tables.
pub fn markdown(o: &Outcome, machine: &str, runs: usize) -> String {
    let mut s = format!(
        "Machine: {machine}.\n\n`file:` devices on tmpfs, sender and receiver as two processes over 127.0.0.1, \
         median of {runs} run(s) by end-to-end time; every run's output compared with its input (`cmp`). \
         End to end: the receiver's start to the later exit. Setup: the receiver's start to the first \
         data on the wire. Exit: the destination's final acknowledgement to the later exit. CPU: user + system \
         seconds of sender + receiver.\n\n\
         | size | content | variant | MB/s end to end | vs loop | end to end (ms) | downtime (ms) | setup (ms) | exit (ms) | CPU s (send + recv) | peak RSS MiB (send / recv) | verified |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    );
    for r in &o.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {} | {:.1} | {} | {} | {} | {:.2} + {:.2} | {} / {} | {} |",
            human(r.size),
            r.profile.name(),
            r.variant,
            r.run.throughput() / 1e6,
            r.ratio()
                .map_or_else(|| "-".to_owned(), |x| format!("**{x:.2}x**")),
            r.run.e2e_s * 1e3,
            opt_ms(r.run.downtime_ms),
            opt_ms(r.run.setup_ms),
            opt_ms(r.run.exit_ms),
            r.run.send.cpu_s(),
            r.run.recv.cpu_s(),
            mib(r.run.send.maxrss),
            mib(r.run.recv.maxrss),
            if r.run.verified { "yes" } else { "NO" }
        );
    }
    if !o.scaling.is_empty() {
        let first = &o.scaling[0];
        let _ = write!(
            s,
            "\nScaling: `--compress zstd`, mixed content, {} per run, `--workers W` on both sides, \
             `--streams S` on the sender; both processes under `taskset` on {} cores. Busy cores: CPU \
             seconds of both processes / wall time; limit: `cores` when at least 85 % of the cores \
             were busy, else the busiest vfmig stage.\n\n\
             | workers | streams | MB/s end to end | vs loop | wire ratio | busy cores (send + recv) | limit |\n\
             |---:|---:|---:|---:|---:|---|---|\n",
            human(first.size),
            first.cores
        );
        for r in &o.scaling {
            let (w, st) = r.workers_streams.unwrap_or((0, 0));
            let wire_ratio = r.run.wire_bytes.filter(|&b| b > 0).map_or_else(
                || "-".to_owned(),
                |b| format!("{:.2}:1", r.size as f64 / b as f64),
            );
            let e2e = r.run.e2e_s.max(1e-9);
            let _ = writeln!(
                s,
                "| {w} | {st} | {:.1} | {} | {wire_ratio} | {:.1} + {:.1} | {} |",
                r.run.throughput() / 1e6,
                r.ratio()
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
                r.run.send.cpu_s() / e2e,
                r.run.recv.cpu_s() / e2e,
                r.limit()
            );
        }
    }
    if !o.failed.is_empty() {
        s += "\nNot measured:\n\n";
        for l in &o.failed {
            let _ = writeln!(s, "- {l}");
        }
    }
    s
}
