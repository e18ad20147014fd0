//! The coordinator's actors. The tree:
//!
//! ```text
//! Coordinator (root, owns core::Core)
//!  ├─ Gateway        accepts QUIC connections, one WorkerSession each
//!  ├─ WorkerSession × N   handshake, then frames ⇄ core events (its end = WorkerLost)
//!  ├─ Checkpointer   verifies and commits checkpoints (restarted with backoff on failure)
//!  ├─ Evaluator      per committed checkpoint: perplexity, samples from fixed prompts, eval.json
//!  └─ Deployer       publishes checkpoints that beat the serving version to the registry
//! ```
//! Every child but the sessions is restarted with backoff when it fails; the job it was on is
//! given up (and recorded), the ones queued behind it are sent again.

pub mod checkpointer;
pub mod coordinator;
pub mod deployer;
pub mod evaluator;
pub mod gateway;
pub mod session;

/// What an actor's `current` job cell holds between jobs.
pub const IDLE: u64 = u64::MAX;

pub use coordinator::{run_coordinator, CoordinatorOptions, RunOutcome};
