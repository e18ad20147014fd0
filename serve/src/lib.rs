//! troupe-serve: a serving replica for the versions in a model registry.
//!
//! - [`api`]: the OpenAI-compatible request and response bodies, and request checks.
//! - [`engine`]: one loaded version generating for many requests with continuous batching.
//! - [`deployment`]: which versions serve (following the registry), canary routing and
//!   judgement, hot swaps.
//! - [`server`]: the axum HTTP server.
//! - [`metrics`]: its Prometheus metrics.
#![warn(unreachable_pub)]

pub mod api;
pub mod deployment;
pub mod engine;
pub mod metrics;
pub mod server;

pub use server::{start, ServeOptions, Server};
