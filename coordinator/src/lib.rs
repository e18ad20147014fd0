//! troupe-coordinator: forms the cluster, drives training steps, commits checkpoints.
//!
//! The sans-IO state machine is `troupe_core::cluster`; [`actors`] are thin ractor shells that turn network
//! traffic and timers into core events and carry out the core's commands.
#![warn(unreachable_pub)]

pub mod actors;
pub mod launch;
pub mod scrape_targets;

pub use actors::{run_coordinator, CoordinatorOptions, RunOutcome};
