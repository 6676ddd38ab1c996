//! `Compress::Auto`: how hard to compress, chosen at run time from measured link throughput,
//! measured codec throughput and the CPU the machine has to spare.
//!
//! For each rung of [`LADDER`] the controller predicts the raw throughput it would sustain as the
//! slower of
//! - the link: the link's measured wire rate divided by the rung's measured wire/raw ratio, and
//! - the CPU: the rung's measured raw bytes per second per core times the cores the codec stage
//!   can have: the codec workers' own busy cores plus the machine's idle cores (`/proc/stat`),
//!   but at least the workers' fair share of a busy machine (cores / runnable threads), and at
//!   most one per worker.
//!
//! and picks the best (a costlier rung must be 5% better). The CPU term is what keeps a
//! machine whose cores are already busy with the devices and the TCP stack (loopback, a fast
//! link) from compressing: there, every core spent compressing is taken from moving bytes.
//! Neighbouring rungs are tried on a few chunks to keep their figures fresh, often when their
//! prediction is close to the current rung's and rarely when it is far off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::codec::{Choice, Compress};

/// The rungs `Compress::Auto` chooses from, cheapest first.
const LADDER: [Choice; 5] = [
    Choice::Raw,
    Choice::Lz4,
    Choice::Zstd(1),
    Choice::Zstd(3),
    Choice::Zstd(7),
];
/// Prior codec speed (raw bytes per second per core) and wire/raw ratio per rung, replaced by
/// measurements as they come in.
const PRIOR_RATE: [f64; 5] = [20e9, 1.5e9, 5e8, 2.5e8, 8e7];
const PRIOR_RATIO: [f64; 5] = [1.0, 0.6, 0.45, 0.42, 0.40];
/// One chunk in `EXPLORE` tries a neighbouring rung, alternately the one below and the one above
/// (so each side is tried on one chunk in 2 x `EXPLORE`). A neighbour whose prediction is not
/// within [`CLOSE`] of the current rung's is tried on one chunk in `EXPLORE_FAR`.
const EXPLORE: u64 = 16;
const EXPLORE_FAR: u64 = 128;
const CLOSE: f64 = 0.75;
/// Weight of a new measurement in the moving averages.
const EWMA: f64 = 0.2;
/// Shortest interval between two CPU samples (`/proc/stat` counts in 10 ms ticks).
const CPU_INTERVAL: Duration = Duration::from_millis(100);

/// What the machine's CPUs are doing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CpuSample {
    /// Idle cores (0 ..= `cpus`) since the previous sample.
    pub idle: f64,
    /// Threads runnable right now (at least 1: the one asking).
    pub runnable: f64,
    /// Cores in the machine.
    pub cpus: f64,
}

/// Where the controller learns how busy the machine is.
pub(crate) trait CpuSource: Send + std::fmt::Debug {
    /// The machine since the previous call; `None` when unknown (and on the first call).
    fn sample(&mut self) -> Option<CpuSample>;
}

/// The machine's idle time from the aggregate `cpu` line of `/proc/stat` (idle + iowait).
#[derive(Debug)]
pub(crate) struct ProcStat {
    last: Option<(u64, u64)>,
    cpus: f64,
}

impl ProcStat {
    pub fn new() -> ProcStat {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        ProcStat {
            last: None,
            cpus: cpus as f64,
        }
    }

    /// (idle ticks, total ticks, runnable threads) now.
    fn read() -> Option<(u64, u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let running = text
            .lines()
            .find_map(|l| l.strip_prefix("procs_running "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(1);
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((idle, total, running))
    }
}

impl CpuSource for ProcStat {
    fn sample(&mut self) -> Option<CpuSample> {
        let (idle_now, total_now, running) = ProcStat::read()?;
        let (idle_prev, total_prev) = self.last.replace((idle_now, total_now))?;
        let total = total_now.checked_sub(total_prev).filter(|&t| t > 0)?;
        let idle = idle_now.checked_sub(idle_prev)?;
        Some(CpuSample {
            idle: (idle as f64 / total as f64).clamp(0.0, 1.0) * self.cpus,
            runnable: (running as f64).max(1.0),
            cpus: self.cpus,
        })
    }
}

#[derive(Debug)]
struct AdaptState {
    rate: [f64; 5],
    ratio: [f64; 5],
    /// Which rungs' figures are measured (the others are priors).
    measured: [bool; 5],
    /// Whether a saturated link measurement came in (until then `link_rate` is the prior).
    link_measured: bool,
    current: usize,
    /// Whether the rung below / above is worth frequent tries.
    close: [bool; 2],
    /// Wire bytes the sender handed to the transport and the time it spent blocked doing so.
    link_bytes: u64,
    link_busy: Duration,
    link_rate: f64,
    /// Start of the current link measurement.
    link_since: Instant,
    /// Codec busy time since the last CPU sample, and the cores the codec stage may use.
    codec_busy: Duration,
    cpu_at: Instant,
    cores: f64,
}

/// Chooses the encoding per chunk: pinned by [`Compress`], or adaptive (Auto).
#[derive(Debug)]
pub(crate) struct Adaptive {
    pinned: Option<Choice>,
    workers: f64,
    chunks: AtomicU64,
    state: Mutex<AdaptState>,
    /// Read by the sender thread only, outside `state`'s lock (reading `/proc/stat` takes a
    /// while, and the codec workers take `state` for every chunk).
    cpu: Mutex<Box<dyn CpuSource>>,
}

impl Adaptive {
    pub fn new(compress: Compress, workers: usize) -> Adaptive {
        Adaptive::with_cpu(compress, workers, Box::new(ProcStat::new()))
    }

    /// With `cpu` as the source of idle time.
    pub fn with_cpu(compress: Compress, workers: usize, mut cpu: Box<dyn CpuSource>) -> Adaptive {
        let pinned = match compress {
            Compress::Auto => None,
            Compress::None => Some(Choice::Raw),
            Compress::Lz4 => Some(Choice::Lz4),
            Compress::Zstd(l) => Some(Choice::Zstd(l)),
        };
        // The first call only sets the baseline.
        let _ = cpu.sample();
        let workers = workers.max(1) as f64;
        Adaptive {
            pinned,
            workers,
            chunks: AtomicU64::new(0),
            cpu: Mutex::new(cpu),
            state: Mutex::new(AdaptState {
                rate: PRIOR_RATE,
                ratio: PRIOR_RATIO,
                measured: [false; 5],
                link_measured: false,
                current: 1,
                close: [true, true],
                link_bytes: 0,
                link_busy: Duration::ZERO,
                // Unknown until measured: assume a 1 Gbit/s link and every worker its core. The
                // link prior errs on the slow side: compressing the first few chunks on a fast
                // link costs a little CPU, sending them raw on a slow one costs link time, and
                // the first 20 ms of blocked sending replace the prior either way.
                link_rate: 1.25e8,
                link_since: Instant::now(),
                codec_busy: Duration::ZERO,
                cpu_at: Instant::now(),
                cores: workers,
            }),
        }
    }

    /// For a peer on this host (loopback): the "link" is the kernel copying memory, so there is
    /// no wire time for compression to save, only CPU to spend. Start from a 10 GB/s link prior
    /// and send raw until measurements say otherwise (a receiver that cannot keep up blocks the
    /// sender, and that is measured like any slow link).
    pub fn on_this_host(self) -> Adaptive {
        if let Ok(mut st) = self.state.lock() {
            st.link_rate = 1e10;
            self.decide(&mut st);
        }
        self
    }

    /// The choice for the next chunk (sometimes a neighbouring rung, to measure it).
    pub fn choose(&self) -> Choice {
        if let Some(c) = self.pinned {
            return c;
        }
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
        let Ok(st) = self.state.lock() else {
            return Choice::Raw;
        };
        let cur = st.current;
        // One chunk in EXPLORE tries a neighbour, alternating below and above; a neighbour whose
        // prediction is far off takes only one of every EXPLORE_FAR / EXPLORE / 2 of its turns.
        if n % EXPLORE != EXPLORE - 1 {
            return LADDER[cur];
        }
        let turn = n / EXPLORE;
        let (side, neighbour) = if turn % 2 == 0 {
            (0, cur.saturating_sub(1))
        } else {
            (1, (cur + 1).min(LADDER.len() - 1))
        };
        let far_turns = (EXPLORE_FAR / EXPLORE / 2).max(1);
        if st.close[side] || (turn / 2) % far_turns == 0 {
            LADDER[neighbour]
        } else {
            LADDER[cur]
        }
    }

    /// Records one chunk's codec time and, when it was encoded with a rung (`choice`), that
    /// rung's measured speed and ratio. One lock per chunk.
    pub fn record(&self, choice: Option<Choice>, raw: usize, wire: usize, took: Duration) {
        if self.pinned.is_some() {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.codec_busy += took;
        let Some(i) = choice.and_then(|c| LADDER.iter().position(|&l| l == c)) else {
            return;
        };
        if raw == 0 {
            return;
        }
        let secs = took.as_secs_f64().max(1e-7);
        let rate = raw as f64 / secs;
        let ratio = (wire as f64 / raw as f64).min(1.0);
        if st.measured[i] {
            st.rate[i] = st.rate[i] * (1.0 - EWMA) + rate * EWMA;
            st.ratio[i] = st.ratio[i] * (1.0 - EWMA) + ratio * EWMA;
        } else {
            // The first measurement replaces the prior.
            st.rate[i] = rate;
            st.ratio[i] = ratio;
            st.measured[i] = true;
        }
        self.decide(&mut st);
    }

    /// Records wire bytes handed to the transport and the time the sender was blocked doing it:
    /// their quotient estimates the link's capacity when the link is the bottleneck, and is large
    /// (favouring cheap codecs) when it is not.
    pub fn record_link(&self, wire: usize, blocked: Duration) {
        if self.pinned.is_some() {
            return;
        }
        // A CPU sample, when one is due, is taken before the state is locked.
        let sample = self.sample_cpu_if_due();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if let Some((m, wall)) = sample {
            self.apply_cpu(&mut st, m, wall);
        }
        st.link_bytes += wire as u64;
        st.link_busy += blocked;
        // Decide every 4 MiB, or sooner on a slow link (100 ms blocked; 20 ms while the link is
        // still the prior, so that a slow link is known before the first CPU sample can make
        // a loaded machine look too weak to compress for it).
        let busy_limit = if st.link_measured { 100 } else { 20 };
        if st.link_bytes >= 4 << 20 || st.link_busy >= Duration::from_millis(busy_limit) {
            let secs = st.link_busy.as_secs_f64().max(1e-4);
            let rate = st.link_bytes as f64 / secs;
            let wall = st.link_since.elapsed().as_secs_f64().max(1e-4);
            // A sender blocked most of the time saturates the link: bytes per blocked second is
            // its capacity. One mostly waiting for encoded chunks does not: the same quotient
            // then only says the link is faster than what it was given, so the estimate may
            // at most double per measurement (every 4 MiB) rather than jump (trusting it
            // outright would send raw whenever compression, not the link, is the bottleneck).
            // The first saturated measurement replaces the prior.
            let saturated = secs >= 0.5 * wall;
            st.link_rate = if saturated && !st.link_measured {
                rate
            } else if saturated {
                st.link_rate * 0.5 + rate * 0.5
            } else {
                rate.min(st.link_rate * 2.0)
            };
            st.link_measured |= saturated;
            st.link_since = Instant::now();
            st.link_bytes = 0;
            st.link_busy = Duration::ZERO;
            self.decide(&mut st);
        }
    }

    /// A sample of the machine and the wall time it covers, at most every [`CPU_INTERVAL`].
    fn sample_cpu_if_due(&self) -> Option<(CpuSample, Duration)> {
        let due = {
            let mut st = self.state.lock().ok()?;
            let wall = st.cpu_at.elapsed();
            (wall >= CPU_INTERVAL).then(|| {
                st.cpu_at = Instant::now();
                wall
            })
        }?;
        let m = self.cpu.lock().ok()?.sample()?;
        Some((m, due))
    }

    /// Updates the cores the codec stage may use from a machine sample covering `wall`.
    fn apply_cpu(&self, st: &mut AdaptState, m: CpuSample, wall: Duration) {
        let codec = std::mem::take(&mut st.codec_busy).as_secs_f64() / wall.as_secs_f64().max(1e-3);
        // A busy machine still gives each runnable thread its share of the cores.
        let fair = self.workers * (m.cpus / m.runnable).min(1.0);
        let cores = (m.idle + codec).max(fair).clamp(0.0, self.workers);
        st.cores = st.cores * 0.5 + cores * 0.5;
    }

    /// The ratio to expect from rung `i`: measured, or else the nearest measured rung's ratio
    /// scaled by the priors (the content decides how well anything compresses).
    fn ratio(st: &AdaptState, i: usize) -> f64 {
        // Raw is 1:1 until measured (it is less where zero granules are left out).
        if st.measured[i] || i == 0 {
            return st.ratio[i];
        }
        let nearest = (0..LADDER.len())
            .filter(|&j| j != 0 && st.measured[j])
            .min_by_key(|&j| j.abs_diff(i));
        match nearest {
            Some(j) => (st.ratio[j] * PRIOR_RATIO[i] / PRIOR_RATIO[j]).min(1.0),
            None => st.ratio[i],
        }
    }

    fn decide(&self, st: &mut AdaptState) {
        let effs: [f64; 5] = std::array::from_fn(|i| {
            let cpu = st.rate[i] * st.cores;
            let net = st.link_rate / Self::ratio(st, i).max(0.01);
            cpu.min(net)
        });
        let eff = |i: usize| effs[i];
        let mut best = 0;
        let mut best_rate = 0.0;
        for i in 0..LADDER.len() {
            let e = eff(i);
            // Prefer the cheaper rung unless the costlier one is clearly (5 %) better.
            if e > best_rate * 1.05 {
                best = i;
                best_rate = e;
            }
        }
        st.current = best;
        let near = |i: usize| eff(i) >= CLOSE * best_rate;
        st.close = [
            near(best.saturating_sub(1)),
            near((best + 1).min(LADDER.len() - 1)),
        ];
    }

    /// The rung in use (for reports).
    pub fn current(&self) -> Choice {
        if let Some(c) = self.pinned {
            return c;
        }
        self.state
            .lock()
            .map(|s| LADDER[s.current])
            .unwrap_or(Choice::Raw)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A 2-core machine as the test sets it: idle cores and runnable threads.
    #[derive(Debug, Clone, Default)]
    struct FakeCpu(Arc<Mutex<(f64, f64)>>);

    impl CpuSource for FakeCpu {
        fn sample(&mut self) -> Option<CpuSample> {
            let (idle, runnable) = *self.0.lock().unwrap();
            Some(CpuSample {
                idle,
                runnable,
                cpus: 2.0,
            })
        }
    }

    fn auto(idle: f64) -> Adaptive {
        auto_busy(idle, 2.0)
    }

    fn auto_busy(idle: f64, runnable: f64) -> Adaptive {
        let cpu = FakeCpu::default();
        *cpu.0.lock().unwrap() = (idle, runnable);
        let a = Adaptive::with_cpu(Compress::Auto, 2, Box::new(cpu));
        // Measured codecs: LZ4 1.2 GB/s per core at 0.6, zstd-1 0.8 GB/s at 0.42.
        for _ in 0..20 {
            a.record(
                Some(Choice::Lz4),
                1 << 20,
                629_146,
                Duration::from_micros(874),
            );
            a.record(
                Some(Choice::Zstd(1)),
                1 << 20,
                440_402,
                Duration::from_micros(1311),
            );
        }
        a
    }

    /// Sender blocked `blocked` per 16 MiB of wire bytes, over more than one CPU interval.
    fn link(a: &Adaptive, blocked: Duration) {
        for _ in 0..4 {
            a.record_link(16 << 20, blocked);
            std::thread::sleep(CPU_INTERVAL / 2);
        }
    }

    #[test]
    fn a_slow_link_with_idle_cores_gets_zstd() {
        let a = auto(1.5);
        // 100 MB/s.
        link(&a, Duration::from_millis(168));
        assert!(matches!(a.current(), Choice::Zstd(_)), "{:?}", a.current());
    }

    #[test]
    fn a_link_that_never_blocks_gets_no_compression() {
        let a = auto(1.5);
        link(&a, Duration::from_micros(500));
        assert_eq!(a.current(), Choice::Raw);
    }

    #[test]
    fn a_link_bound_sender_on_a_saturated_machine_does_not_compress() {
        // 2 GB/s accepted by the transport (loopback, receiver CPU-bound) and no idle core: any
        // compression would take cores from moving bytes.
        // Seven runnable threads (both sides' stages and devices) share the two cores.
        let a = auto_busy(0.05, 7.0);
        link(&a, Duration::from_millis(8));
        assert_eq!(a.current(), Choice::Raw);
        // The same link with both cores idle: LZ4 pays.
        let b = auto(2.0);
        link(&b, Duration::from_millis(8));
        assert_ne!(b.current(), Choice::Raw);
    }

    #[test]
    fn a_slow_link_on_a_busy_machine_still_gets_zstd_from_the_workers_fair_share() {
        // No idle time, 8 runnable threads on 2 cores: each worker gets a quarter of a core,
        // 200 MB/s of zstd-1 together, far above what a 24 MB/s link needs.
        let a = auto_busy(0.0, 8.0);
        link(&a, Duration::from_millis(700));
        assert!(matches!(a.current(), Choice::Zstd(_)), "{:?}", a.current());
    }

    #[test]
    fn a_sender_starved_by_its_codec_does_not_take_the_link_for_fast_and_go_raw() {
        let a = auto(1.5);
        // 100 MB/s, the sender blocked all the time.
        link(&a, Duration::from_millis(168));
        assert!(matches!(a.current(), Choice::Zstd(_)), "{:?}", a.current());
        // Now compression is the bottleneck: 4 MiB per 50 ms, 1 ms of it blocked. Taken
        // literally that is a 4 GB/s link.
        for _ in 0..3 {
            std::thread::sleep(CPU_INTERVAL / 2);
            a.record_link(4 << 20, Duration::from_millis(1));
        }
        assert!(matches!(a.current(), Choice::Zstd(_)), "{:?}", a.current());
        let st = a.state.lock().unwrap();
        assert!(st.link_rate < 100e6 * 8.0 * 1.01, "{}", st.link_rate);
    }

    #[test]
    fn a_peer_on_this_host_starts_raw_and_a_remote_one_starts_compressed() {
        assert_eq!(auto(2.0).on_this_host().current(), Choice::Raw);
        let remote = Adaptive::with_cpu(Compress::Auto, 2, Box::new(FakeCpu::default()));
        let first = remote.choose();
        assert_ne!(first, Choice::Raw);
    }

    #[test]
    fn far_off_rungs_are_tried_rarely_and_pinned_choices_never_change() {
        let a = auto_busy(0.0, 8.0);
        link(&a, Duration::from_micros(500));
        let tried = (0..1024).filter(|_| a.choose() != Choice::Raw).count();
        assert!(
            u64::try_from(tried).unwrap() <= 1024 / EXPLORE_FAR,
            "{tried}"
        );
        let pinned = Adaptive::new(Compress::Zstd(5), 2);
        pinned.record_link(16 << 20, Duration::from_secs(10));
        assert_eq!(pinned.choose(), Choice::Zstd(5));
    }

    #[test]
    fn far_off_neighbours_on_both_sides_are_still_tried_now_and_then() {
        let a = auto(1.5);
        {
            let mut st = a.state.lock().unwrap();
            st.current = 2;
            st.close = [false, false];
        }
        let picks: Vec<Choice> = (0..1024).map(|_| a.choose()).collect();
        let below = picks.iter().filter(|&&c| c == Choice::Lz4).count();
        let above = picks.iter().filter(|&&c| c == Choice::Zstd(3)).count();
        let per_side = usize::try_from(1024 / EXPLORE_FAR).unwrap();
        assert!((1..=per_side).contains(&below), "below {below}");
        assert!((1..=per_side).contains(&above), "above {above}");
        // Close neighbours: one chunk in EXPLORE, alternating.
        a.state.lock().unwrap().close = [true, true];
        let picks: Vec<Choice> = (0..1024).map(|_| a.choose()).collect();
        let tried = picks.iter().filter(|&&c| c != Choice::Zstd(1)).count();
        assert_eq!(tried, usize::try_from(1024 / EXPLORE).unwrap());
    }

    #[test]
    fn proc_stat_reports_idle_cores_within_the_machine() {
        let mut p = ProcStat::new();
        assert_eq!(p.sample(), None, "the first read is the baseline");
        std::thread::sleep(Duration::from_millis(50));
        let m = p.sample().expect("/proc/stat readable");
        assert!((0.0..=p.cpus).contains(&m.idle), "{m:?}");
        assert!(m.runnable >= 1.0, "this thread is running: {m:?}");
        assert_eq!(m.cpus, p.cpus);
    }
}
