//! Peak resident set size of this process, as the kernel counts it (`VmHWM` in
//! `/proc/self/status`).

use std::fs;

/// `VmHWM` of this process in bytes, or `None` when `/proc` cannot tell.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// Parses the `VmHWM:` line of a `/proc/PID/status` text into bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut it = line["VmHWM:".len()..].split_whitespace();
    let kib: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_vm_hwm_reads_kib_line_as_bytes() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(parse_vm_hwm(s), Some(2048 * 1024));
    }

    #[test]
    fn parse_vm_hwm_rejects_missing_or_malformed_line() {
        assert_eq!(parse_vm_hwm("VmRSS:\t10 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t10 MB\n"), None);
    }

    #[test]
    fn peak_rss_of_this_process_is_nonzero() {
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
