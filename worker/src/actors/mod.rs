//! The worker's actors:
//!
//! ```text
//! Worker (root: coordinator link, heartbeats, drives the trainer thread)
//!  ├─ Collective (owns the ring connections; collectives run in mailbox order)
//!  └─ Trainer    (an OS thread, not an actor: talks through channels)
//! ```
//!
//! - [`join`]: connecting to the coordinator, signals, rejoining a restarted coordinator.
//! - `link`: the control stream's writer and heartbeats (the eval worker uses them too).
//! - [`worker`]: the Worker actor.
//! - [`membership`]: the Worker's membership logic (assign, regroup, stale generations) as a
//!   plain type.
//! - [`trainer_thread`]: the trainer thread and the orders and reports it exchanges.
//! - [`collective`]: the Collective actor.

pub mod collective;
pub mod join;
pub(crate) mod link;
pub(crate) mod membership;
pub mod trainer_thread;
pub mod worker;

pub use join::{run_worker, WorkerExit, WorkerOptions};
