//! The run history: `events.jsonl`, one JSON object per line, each with `"event"` and `"step"`.
//! Appended and flushed as things happen, so a crash loses at most the line being written.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    Started {
        step: u64,
        world_size: u32,
        resumed_from: Option<String>,
        config: String,
    },
    WorkerJoined {
        step: u64,
        rank: u32,
        worker_id: u64,
        addr: String,
        hostname: String,
    },
    WorkerLeft {
        step: u64,
        rank: Option<u32>,
        worker_id: u64,
        reason: String,
    },
    Step {
        step: u64,
        /// The membership generation whose ranks computed this step, and their number.
        #[serde(default)]
        generation: u64,
        #[serde(default)]
        world_size: u32,
        loss: f64,
        lr: f64,
        tokens_per_sec: f64,
        grad_norm: f64,
        step_seconds: f64,
        /// Slowest rank's time in the all-reduce this step.
        comm_seconds: f64,
    },
    /// No update was applied at this step (parameters and optimizer state untouched): its loss
    /// or gradient norm was not finite. `ranks`: those whose own loss or gradient was already
    /// not finite before the sum (empty when only the sum overflowed); `in_a_row`: skipped
    /// steps in a row up to this one.
    StepSkipped {
        step: u64,
        generation: u64,
        reason: String,
        ranks: Vec<u32>,
        in_a_row: u32,
    },
    /// A rank's report of a step differs from the other ranks' (the loss, the gradient norm
    /// and whether the step was skipped are the same on every rank by construction).
    RankDisagreed {
        step: u64,
        rank: u32,
        what: String,
    },
    Eval {
        step: u64,
        val_loss: f64,
        sequences: u64,
        /// Validation loss per source, when the data has several.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        per_source: std::collections::BTreeMap<String, f64>,
    },
    /// The Evaluator's results for a committed checkpoint (also in its eval.json).
    Evaluated {
        step: u64,
        checkpoint: String,
        val_loss: f64,
        perplexity: f64,
        samples: Vec<Sample>,
        /// Evaluation tasks' scores (`eval.task_items`), e.g. `next_line_acc`.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        tasks: std::collections::BTreeMap<String, f64>,
        /// Who measured the validation loss: `ranks` (training paused for it), `eval worker
        /// N`, or `coordinator` (no eval worker could).
        #[serde(default)]
        by: String,
    },
    /// What the Deployer did with an evaluated checkpoint: `published` (as `version`) or
    /// `skipped`, and why; `failed` with the error.
    Deployed {
        step: u64,
        action: String,
        version: Option<u32>,
        reason: String,
    },
    /// Membership changed (a worker lost, left or joined): the ranks of `generation` re-formed
    /// the ring and continue from `step`. `seconds`: from the change to training again.
    Regrouped {
        step: u64,
        generation: u64,
        world_size: u32,
        seconds: f64,
        synced: bool,
    },
    /// Fewer than `cluster.min_workers` remain: training waits for workers to join.
    Paused {
        step: u64,
        workers: u32,
        min_workers: u32,
        reason: String,
    },
    Checkpoint {
        step: u64,
        path: String,
        seconds: f64,
    },
    CheckpointFailed {
        step: u64,
        error: String,
        /// Failed checkpoints in a row, this one included.
        #[serde(default)]
        in_a_row: u32,
    },
    Warning {
        step: u64,
        message: String,
    },
    Failed {
        step: u64,
        error: String,
    },
    Finished {
        step: u64,
        final_loss: Option<f64>,
        final_val_loss: Option<f64>,
        seconds: f64,
    },
}

/// A continuation the Evaluator sampled from one of `eval.prompts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub text: String,
}

impl RunEvent {
    pub fn step(&self) -> u64 {
        match self {
            RunEvent::Started { step, .. }
            | RunEvent::WorkerJoined { step, .. }
            | RunEvent::WorkerLeft { step, .. }
            | RunEvent::Step { step, .. }
            | RunEvent::StepSkipped { step, .. }
            | RunEvent::RankDisagreed { step, .. }
            | RunEvent::Eval { step, .. }
            | RunEvent::Evaluated { step, .. }
            | RunEvent::Deployed { step, .. }
            | RunEvent::Regrouped { step, .. }
            | RunEvent::Paused { step, .. }
            | RunEvent::Checkpoint { step, .. }
            | RunEvent::CheckpointFailed { step, .. }
            | RunEvent::Warning { step, .. }
            | RunEvent::Failed { step, .. }
            | RunEvent::Finished { step, .. } => *step,
        }
    }
}

/// Appends events to `<run_dir>/events.jsonl`.
pub struct EventLog {
    path: PathBuf,
    file: File,
}

impl EventLog {
    pub fn open(run_dir: &Path) -> std::io::Result<EventLog> {
        crate::run_dir::create_private(run_dir)?;
        let path = run_dir.join("events.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(EventLog { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, event: &RunEvent) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()
    }
}

/// Reads every event of a run (for tests and tools); lines that do not parse are errors.
pub fn read_events(run_dir: &Path) -> std::io::Result<Vec<RunEvent>> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl"))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).map_err(std::io::Error::other)).collect()
}
