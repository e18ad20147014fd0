//! What `troupe status` shows: the coordinator publishes it as JSON on `GET /status`, beside
//! `/metrics`, and refreshes it on every event and timer tick.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: String,
    /// gathering | forming | syncing | training | paused | finishing | done
    pub phase: String,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub last_checkpoint: Option<String>,
    /// Ranks of the current membership generation, and that generation.
    #[serde(default)]
    pub world_size: u32,
    #[serde(default)]
    pub generation: u64,
    /// Checkpoints that failed in a row (0 once one commits): nothing is being saved.
    #[serde(default)]
    pub checkpoint_failures_in_a_row: u32,
    /// Steps skipped in a row because their loss or gradient was not finite.
    #[serde(default)]
    pub skipped_steps_in_a_row: u32,
    pub workers: Vec<WorkerStatus>,
    /// Eval workers connected (`troupe worker --role eval`).
    #[serde(default)]
    pub eval_workers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker_id: u64,
    pub rank: Option<u32>,
    /// Where ring peers reach it.
    pub addr: String,
    pub hostname: String,
    /// forming | ready | syncing | training | waiting (to be taken in) | leaving | idle
    pub state: String,
    /// Milliseconds since anything arrived from it.
    pub last_heartbeat_ms: u64,
    /// Its last step's data + compute + communication time.
    pub step_seconds: Option<f64>,
    pub metrics: Option<String>,
}

/// Written by the coordinator, read by the HTTP handler.
pub type SharedStatus = Arc<RwLock<RunStatus>>;
