//! The `vfmig` command.
fn main() {}
