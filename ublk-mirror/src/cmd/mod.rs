//! Subcommands of the `ublk-mirror` binary.

pub mod loadgen;
