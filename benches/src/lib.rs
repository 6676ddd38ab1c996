//! # vfmig-benches: benchmarks and the reference loop they are measured against.
