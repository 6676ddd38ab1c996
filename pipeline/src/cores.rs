//! How many cores this process may use, and the defaults that follow from it (issue 12 item 3):
//! codec workers ([`crate::default_codec_workers`]) and TCP connections
//! ([`crate::default_streams`]).
//!
//! The budget is the CPU affinity mask (`sched_getaffinity`, what `taskset` and cpusets
//! restrict) intersected with the cgroup CPU quota (`cpu.max` of cgroup v2, or
//! `cpu.cfs_quota_us / cpu.cfs_period_us` of cgroup v1, the tightest of the process's cgroup and
//! its ancestors), rounded up: a quota of 2.5 CPUs allows three threads to make progress at
//! once, each a little slower. Everything is read from files and the affinity syscall; a value
//! that cannot be read is simply not a limit.

use std::fs;
use std::path::{Path, PathBuf};

/// What bounds this process's CPU use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoreBudget {
    /// CPUs in the affinity mask (`None` if unreadable).
    pub affinity: Option<usize>,
    /// The cgroup CPU quota in CPUs (`None`: no quota, or unreadable).
    pub quota: Option<f64>,
}

impl CoreBudget {
    /// Threads that can run at once: the affinity mask, capped by the quota rounded up; at
    /// least 1.
    pub fn cores(&self) -> usize {
        let from_quota = self.quota.map(|q| {
            // A finite positive quota (checked when parsed); a few thousand CPUs at most.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = q.ceil().max(1.0) as usize;
            n
        });
        match (self.affinity, from_quota) {
            (Some(a), Some(q)) => a.min(q),
            (Some(a), None) => a,
            (None, Some(q)) => q,
            (None, None) => 1,
        }
        .max(1)
    }
}

/// The budget of this process: its affinity mask and the quota of its cgroups under
/// `/sys/fs/cgroup`.
pub fn core_budget() -> CoreBudget {
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    CoreBudget {
        affinity: affinity_cpus(),
        quota: cgroup_quota(Path::new("/sys/fs/cgroup"), &cgroup),
    }
}

/// Cores this process may use: [`core_budget`]`.cores()`.
pub fn available_cores() -> usize {
    core_budget().cores()
}

/// CPUs in this thread's affinity mask.
fn affinity_cpus() -> Option<usize> {
    // `available_parallelism` is `sched_getaffinity`'s count when there is no cgroup quota; its
    // own quota reading is replaced by ours (which tests can point at a fake hierarchy). Read
    // the mask through /proc to count it without a quota: `Cpus_allowed_list`.
    let status = fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| fs::read_to_string("/proc/self/status"))
        .ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    count_cpu_list(list.trim())
}

/// Counts a kernel CPU list (`0-3,8,10-11`).
pub(crate) fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
            }
            None => {
                let _: usize = part.parse().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    (n > 0).then_some(n)
}

/// The tightest CPU quota (in CPUs) of the cgroups named in `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`) and their ancestors, under the cgroup mount `root`. `None` when no
/// cgroup on the path sets one.
pub fn cgroup_quota(root: &Path, proc_self_cgroup: &str) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut take = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
    };
    for line in proc_self_cgroup.lines() {
        // `hierarchy-id:controllers:path`; v2 is `0::/path`.
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            for dir in ancestors(root, rel) {
                take(read_cpu_max(&dir.join("cpu.max")));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            // v1: the controller's mount is `cpu,cpuacct` or `cpu` under `root`.
            for mount in ["cpu,cpuacct", "cpu", "cpuacct,cpu"] {
                let base = root.join(mount);
                if base.is_dir() {
                    for dir in ancestors(&base, rel) {
                        take(read_cfs_quota(&dir));
                    }
                    break;
                }
            }
        }
    }
    best
}

/// `root/rel`, then each of its parents up to `root` itself.
fn ancestors(root: &Path, rel: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut p = PathBuf::from(rel);
    loop {
        dirs.push(root.join(&p));
        if !p.pop() {
            break;
        }
    }
    if dirs.last().map(PathBuf::as_path) != Some(root) {
        dirs.push(root.to_path_buf());
    }
    dirs
}

/// cgroup v2 `cpu.max`: `QUOTA PERIOD` in microseconds, or `max PERIOD` for no limit.
fn read_cpu_max(path: &Path) -> Option<f64> {
    parse_cpu_max(&fs::read_to_string(path).ok()?)
}

/// Parses a `cpu.max` text into CPUs.
pub(crate) fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    let cpus = quota / period;
    (cpus.is_finite() && cpus > 0.0).then_some(cpus)
}

/// cgroup v1 `cpu.cfs_quota_us` (`-1`: no limit) over `cpu.cfs_period_us`.
fn read_cfs_quota(dir: &Path) -> Option<f64> {
    let quota: i64 = fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let period: i64 = fs::read_to_string(dir.join("cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if quota <= 0 || period <= 0 {
        return None;
    }
    Some(quota as f64 / period as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup mount in a fresh directory under the target's temp dir.
    fn fake_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vfmig-cores-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("temp dir");
        root
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        fs::write(path, text).expect("write");
    }

    #[test]
    fn cpu_max_parses_quota_and_max() {
        assert_eq!(parse_cpu_max("250000 100000\n"), Some(2.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cpu_max("0 100000"), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn cpu_list_counts_ranges_and_singles() {
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("5"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn v2_quota_is_the_tightest_on_the_path_to_the_root() {
        let root = fake_root("v2");
        write(&root.join("cpu.max"), "max 100000\n");
        write(&root.join("machine.slice/cpu.max"), "400000 100000\n");
        write(&root.join("machine.slice/vm1/cpu.max"), "max 100000\n");
        write(
            &root.join("machine.slice/vm1/mig/cpu.max"),
            "600000 100000\n",
        );
        let q = cgroup_quota(&root, "0::/machine.slice/vm1/mig\n");
        assert_eq!(q, Some(4.0));
        // A cgroup without any quota on its path.
        write(&root.join("free/cpu.max"), "max 100000\n");
        assert_eq!(cgroup_quota(&root, "0::/free\n"), None);
        // Missing files are no limit, not an error.
        assert_eq!(cgroup_quota(&root, "0::/nowhere/deep\n"), None);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_quota_is_read_from_the_cpu_controller() {
        let root = fake_root("v1");
        write(&root.join("cpu,cpuacct/job/cpu.cfs_quota_us"), "150000\n");
        write(&root.join("cpu,cpuacct/job/cpu.cfs_period_us"), "100000\n");
        write(&root.join("cpu,cpuacct/cpu.cfs_quota_us"), "-1\n");
        write(&root.join("cpu,cpuacct/cpu.cfs_period_us"), "100000\n");
        let cg = "12:memory:/job\n4:cpu,cpuacct:/job\n";
        assert_eq!(cgroup_quota(&root, cg), Some(1.5));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn budget_takes_the_smaller_of_affinity_and_rounded_up_quota() {
        let b = |affinity, quota| CoreBudget { affinity, quota }.cores();
        assert_eq!(b(Some(64), Some(2.5)), 3);
        assert_eq!(b(Some(2), Some(8.0)), 2);
        assert_eq!(b(Some(16), None), 16);
        assert_eq!(b(None, Some(0.2)), 1);
        assert_eq!(b(None, None), 1);
    }

    #[test]
    fn this_process_has_at_least_one_core() {
        let b = core_budget();
        assert!(b.cores() >= 1);
        assert!(b.affinity.is_some(), "Cpus_allowed_list readable on Linux");
    }
}
