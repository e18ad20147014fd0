//! troupe-core: what the coordinator decides and what every process says, with no libtorch,
//! no networking and no async runtime, so that it builds and tests in seconds.
//!
//! - [`cluster`]: the coordinator's state machine (sans-IO: events and time in, commands out).
//! - [`proto`]: every control message between workers and the coordinator.
//! - [`config`]: the TOML run configuration, validated with errors that name the field.
//! - [`events`]: the run history `events.jsonl`.
//! - [`shard`]: how the ZeRO strategies split the flat training state over ranks.
//! - [`run_dir`]: where a run's checkpoints lie in its folder.
//! - [`secret`]: join tokens and API keys, which never print or serialise their value.

#![warn(unreachable_pub)]

pub mod cluster;
pub mod config;
pub mod events;
pub mod proto;
pub mod run_dir;
pub mod secret;
pub mod shard;
