//! See the suite's top (`adversary.rs`).
