//! The device contract suite (placeholder until the suite lands in this file).
