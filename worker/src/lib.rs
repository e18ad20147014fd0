//! troupe-worker: a process that holds a model replica and trains it.
//!
//! - [`trainer`]: the training loop on its own OS thread (libtorch calls block).
//! - [`actors`]: the Worker (root; the coordinator link) and the Collective (owns the ring).
//! - [`nccl`]: NCCL collectives on CUDA tensors (GPU workers, feature `cuda`).

pub mod actors;
pub mod nccl;
pub mod trainer;

pub use actors::{run_worker, WorkerOptions};
