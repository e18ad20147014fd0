//! troupe-worker: a process that holds a model replica and trains it.
//!
//! - [`trainer`]: the training loop on its own OS thread (libtorch calls block), one file per
//!   strategy.
//! - [`comm`]: how the trainer reaches the other ranks: the `Comm` trait and its
//!   implementations (alone, the QUIC ring, NCCL, mixed).
//! - [`actors`]: the Worker (root; the coordinator link) and the Collective (owns the ring).
//! - `eval_worker`: the `--role eval` worker, which measures committed checkpoints instead of
//!   training.
#![warn(unreachable_pub)]

pub mod actors;
pub mod comm;
mod eval_worker;
pub mod trainer;

pub use actors::{run_worker, WorkerOptions};
