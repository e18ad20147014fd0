//! The worker's actors:
//!
//! ```text
//! Worker (root: coordinator link, heartbeats, drives the trainer thread)
//!  ├─ Collective (owns the ring connections; collectives run in mailbox order)
//!  └─ Trainer    (an OS thread, not an actor: talks through channels)
//! ```

pub mod collective;
pub mod worker;

pub use worker::{run_worker, WorkerOptions};
