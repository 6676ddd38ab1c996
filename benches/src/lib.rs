//! # vfmig-benches: benchmarks and the reference loop they are measured against.
//!
//! Owns: the QEMU-style reference loop ([`reference`](mod@reference)), the benchmark devices ([`devices`]), the
//! per-process peak-RSS probe ([`rss`]), and the `vfmig-bench` harness ([`harness`], binary in
//! `src/bin/`) that runs the link scenarios (loopback and the rate-limited network namespaces of
//! `tools/netns.sh`). The criterion suites live in `benches/benches/`. [`cli_e2e`] is
//! `vfmig-bench cli`: the `vfmig` CLI as two processes with `file:` devices on tmpfs, against a
//! plain read/write loop (issue 12).
//!
//! Never touches: anything in the product crates beyond their public API. Data comes in from
//! emulated devices' data fds and leaves through TCP sockets, exactly as in a migration.

#![forbid(unsafe_code)]

pub mod cli_e2e;
pub mod devices;
pub mod harness;
pub mod reference;
pub mod rss;
pub mod vfmig_side;
