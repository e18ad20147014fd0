//! troupe-common: what the coordinator and the workers both speak and compute.
//!
//! - [`net`]: QUIC endpoints, TLS, length-prefixed frames.
//! - [`collective`]: the collective operations and the ring all-reduce over QUIC.
//! - [`model`]: the GPT (tch), AdamW, the learning-rate schedule, safetensors I/O.
//! - [`data`]: corpus preparation, tokenizer, token files, the global-cursor sampler.
//! - [`checkpoint`]: the on-disk checkpoint layout and its atomic commit.
//! - [`metrics`]: Prometheus registry and the `/metrics` server.
//! - [`http_server`]: HTTP serving with header and request timeouts and a connection limit.
//! - [`registry`]: the model registry: served versions, their state and history.
//! - [`fault`]: fault hooks for the failure tests.
#![warn(unreachable_pub)]

pub mod alloc;
pub mod checkpoint;
pub mod collective;
pub mod console;
pub mod data;
pub mod device;
pub mod evaluation;
pub mod fault;
pub mod http_server;
pub mod metrics;
pub mod model;
pub mod net;
pub mod registry;
pub mod signals;
pub mod status;
pub mod storage;
pub mod tasks;
