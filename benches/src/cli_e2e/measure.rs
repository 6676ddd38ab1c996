//! The measuring wrapper, `vfmig-bench measure -- CMD...`, and its `MEASURE` line
//! ([`Measured`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::now_ns;

/// What `measure` reports about its child.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Exit code (128 + signal when killed by one).
    pub code: i32,
    /// Wall clock just before the child was started, ns since the epoch.
    pub start_ns: u64,
    /// Wall clock just after it was reaped.
    pub exit_ns: u64,
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Peak RSS, bytes.
    pub maxrss: u64,
}

impl Measured {
    /// The `MEASURE` line.
    pub fn to_line(&self) -> String {
        format!(
            "MEASURE code={} start_ns={} exit_ns={} user_s={:.6} sys_s={:.6} maxrss={}",
            self.code, self.start_ns, self.exit_ns, self.user_s, self.sys_s, self.maxrss
        )
    }

    /// Parses [`Measured::to_line`].
    pub fn parse(line: &str) -> Option<Measured> {
        let kv: BTreeMap<&str, &str> = line
            .strip_prefix("MEASURE ")?
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Some(Measured {
            code: kv.get("code")?.parse().ok()?,
            start_ns: kv.get("start_ns")?.parse().ok()?,
            exit_ns: kv.get("exit_ns")?.parse().ok()?,
            user_s: kv.get("user_s")?.parse().ok()?,
            sys_s: kv.get("sys_s")?.parse().ok()?,
            maxrss: kv.get("maxrss")?.parse().ok()?,
        })
    }

    /// User + system CPU seconds.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

/// `measure -- CMD ARGS...`: runs CMD with this process's stdio, waits for it, prints the
/// `MEASURE` line on stderr and returns its exit code.
pub fn measure(cmd: &[OsString]) -> io::Result<i32> {
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "measure: no command"))?;
    let start_ns = now_ns();
    let status = Command::new(prog).args(args).status()?;
    let exit_ns = now_ns();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(io::Error::from)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let m = Measured {
        code,
        start_ns,
        exit_ns,
        user_s: secs(usage.user_time()),
        sys_s: secs(usage.system_time()),
        // Linux counts ru_maxrss in KiB.
        maxrss: u64::try_from(usage.max_rss()).unwrap_or(0) * 1024,
    };
    eprintln!("{}", m.to_line());
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_line_round_trips() {
        let m = Measured {
            code: 0,
            start_ns: 1,
            exit_ns: 2,
            user_s: 0.5,
            sys_s: 0.25,
            maxrss: 4096,
        };
        assert_eq!(Measured::parse(&m.to_line()), Some(m));
        assert_eq!(Measured::parse("MEASURE code=0"), None);
    }
}
