//! The coordinator's actors. The tree:
//!
//! ```text
//! Coordinator (root, owns core::Core)
//!  ├─ Gateway        accepts QUIC connections, one WorkerSession each
//!  ├─ WorkerSession × N   handshake, then frames ⇄ core events (its end = WorkerLost)
//!  └─ Checkpointer   verifies and commits checkpoints (restarted with backoff on failure)
//! ```

pub mod checkpointer;
pub mod coordinator;
pub mod gateway;
pub mod session;

pub use coordinator::{run_coordinator, CoordinatorOptions, RunOutcome};
