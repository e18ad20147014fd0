//! The cluster state machine of the coordinator: no I/O, no async, no clock reads.
//!
//! [`Core::on`] takes the time and one [`Event`] (a worker joined, a message arrived, a
//! checkpoint committed, a deadline passed) and returns the [`Command`]s the actors must carry
//! out (send a message, commit a checkpoint, record a run event, finish). Every scenario — a
//! worker lost mid-step, a checkpoint that fails to commit, a lease that expires — is therefore
//! a fast, deterministic unit test with simulated time.
//!
//! Time works as in quinn-proto: the core never asks for a clock. [`Core::poll_timeout`] says
//! when it next needs to be woken (the earliest lease expiry, or a resumed run's gathering
//! deadline); the driver delivers [`Event::Timeout`] at or after that instant. A Timeout
//! before any deadline does nothing, so early or stale timer firings are harmless.
//!
//! A run goes through these phases:
//! `Gathering` (wait for `cluster.workers` to join) → `Forming` (ranks assigned for a new
//! membership *generation*; wait until every rank has its model and has formed the ring) →
//! `Syncing` (only when the ranks hold different states: one rank's parameters and optimizer
//! state are broadcast to the others) → `Training` (one step at a time: send `Step` to every
//! rank, wait for every `StepDone`) → `Finishing` (wait for the last evaluation and
//! checkpoint) → `Done`.
//!
//! Elastic membership: when a member is lost (connection closed, lease expired, collective
//! failed) or leaves, or a worker joins, the core starts a new generation — back to `Forming`
//! with the workers it has. Replicas are identical, so the survivors carry on from the state
//! they hold; the only subtlety is a step that some survivors completed and others did not
//! (the failure struck inside the all-reduce). Every rank tells in `Ready` how many steps it
//! has completed; the most advanced one is the truth (its all-reduce got every rank's
//! gradient), and the others are synced from it. The global batch and the sampler's cursor
//! depend on the step only, so no sample is lost or repeated whatever the world size. Below
//! `cluster.min_workers` the run is `Paused` until workers join. When no worker holds the
//! state (all were lost, or this coordinator was restarted), it is loaded from the newest
//! checkpoint.
//!
//! Layout, in the manner of quinn-proto's `connection` module:
//! - this file: the events, commands and phases, the [`Core`] with its state grouped by
//!   concern, event dispatch, [`Core::poll_timeout`], and how a run ends;
//! - `membership`: workers joining, leaving and being lost, leases, gathering, pausing, and
//!   forming a new generation;
//! - `topology`: the pure choice of collective and of each rank's place in the ring and the
//!   NCCL group;
//! - `progress`: ready/synced, steps, evaluations and checkpoints, up to the end of training;
//! - `evaluators`: eval workers (`--role eval`), which hold no rank: their leases, and the
//!   notes for the Evaluator that hands them checkpoints;
//! - `tests`: scenario tests on a simulated clock.

mod evaluators;
mod membership;
mod progress;
mod step_health;
mod topology;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::Config;
use crate::events::RunEvent;
use crate::proto::{Capabilities, FileDigest, ToCoordinator, ToWorker, WorkerRole};

use evaluators::EvalWorkers;
pub use evaluators::EvaluatorNote;
use membership::Membership;
pub use membership::WorkerEntry;
use progress::Progress;

pub type WorkerId = u64;

/// Re-forming after collective failures, without a step completed in between, gives up after
/// this many attempts: something is wrong that a new ring does not fix.
pub const MAX_FAILED_REGROUPS: u32 = 5;

/// Something that happened, as the actors saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker passed the handshake (version and token checked by its session).
    WorkerJoined {
        id: WorkerId,
        info: Capabilities,
    },
    /// A worker's connection ended or its session failed.
    WorkerLost {
        id: WorkerId,
        reason: String,
    },
    /// A message from a joined worker.
    FromWorker {
        id: WorkerId,
        msg: ToCoordinator,
    },
    CheckpointCommitted {
        step: u64,
        path: String,
    },
    CheckpointCommitFailed {
        step: u64,
        error: String,
    },
    /// A deadline from [`Core::poll_timeout`] may have passed: expired leases and the
    /// gathering deadline are checked here. Harmless at any other time.
    Timeout,
    /// SIGINT/SIGTERM: finish the current step, checkpoint, stop.
    ShutdownRequested,
    /// The validation loss of the checkpoint of `step`, measured off the training path (by an
    /// eval worker or the coordinator): the run's latest loss, as a sharded evaluation's is.
    MeasuredOffPath {
        step: u64,
        val_loss: f64,
    },
}

/// Something the actors must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Send {
        to: WorkerId,
        msg: ToWorker,
    },
    /// Close the worker's connection (after any `Send` before it).
    Disconnect {
        id: WorkerId,
        reason: String,
    },
    /// Check and commit the checkpoint the ranks wrote into its temporary folder.
    CommitCheckpoint {
        step: u64,
        generation: u64,
        world_size: u32,
        files: Vec<FileDigest>,
    },
    /// Remove the temporary folder of a checkpoint some rank failed to write (every rank has
    /// answered: nothing writes there any more).
    DiscardCheckpoint {
        step: u64,
        generation: u64,
    },
    /// Append to events.jsonl, update metrics, show progress.
    Record(RunEvent),
    /// The model after `step` completed steps is evaluated by an eval worker, from the
    /// step's checkpoint once it is committed: the ranks are not asked.
    EvaluateOffPath {
        step: u64,
    },
    /// For the Evaluator: an eval worker came, went, or answered.
    ToEvaluator(EvaluatorNote),
    /// The run is over.
    Finish {
        ok: bool,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Gathering,
    Forming,
    Syncing,
    Training,
    Paused,
    Finishing,
    Done,
}

impl Phase {
    /// One lowercase word, as `troupe status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Gathering => "gathering",
            Phase::Forming => "forming",
            Phase::Syncing => "syncing",
            Phase::Training => "training",
            Phase::Paused => "paused",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
        }
    }
}

/// Where a resumed run starts from (found by the actor, which may read the disk).
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeFrom {
    pub dir: String,
    pub step: u64,
}

/// What `troupe status` and the metrics show about the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub phase: Phase,
    pub completed_steps: u64,
    pub total_steps: u64,
    pub workers: usize,
    /// Ranks of the current generation.
    pub world_size: usize,
    pub generation: u64,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub last_tokens_per_second: Option<f64>,
    /// Checkpoints that failed in a row (0 once one commits).
    pub checkpoint_failures_in_a_row: u32,
    /// Steps skipped in a row because their loss or gradient was not finite.
    pub skipped_steps_in_a_row: u32,
}

pub struct Core {
    /// What the run was configured with; fixed for its lifetime.
    settings: Settings,
    phase: Phase,
    /// Who is in the run, the current generation's layout, and the timers of membership.
    members: Membership,
    /// Where training stands: steps, evaluations and checkpoints.
    progress: Progress,
    /// The most recent figures, for [`Snapshot`].
    latest: Latest,
    /// Eval workers: connected, never ranks.
    evaluators: EvalWorkers,
}

/// The run's configuration (limits, intervals, collective backend) and its folder.
struct Settings {
    config: Config,
    run_dir: PathBuf,
}

/// The most recent figures reported by the run.
#[derive(Default)]
struct Latest {
    loss: Option<f64>,
    val_loss: Option<f64>,
    /// The step `val_loss` was measured at.
    val_loss_step: Option<u64>,
    checkpoint: Option<String>,
    tokens_per_second: Option<f64>,
}

impl Core {
    pub fn new(config: Config, resume: Option<ResumeFrom>) -> Core {
        let resumed = resume.is_some();
        Core {
            settings: Settings { run_dir: config.run_dir(), config },
            phase: Phase::Gathering,
            members: Membership::new(resumed),
            progress: Progress::new(resume),
            latest: Latest::default(),
            evaluators: EvalWorkers::default(),
        }
    }

    /// Numbers this coordinator's membership generations from `generation + 1` on, above
    /// those an earlier coordinator of the run used (checkpoint attempts are named by step and
    /// generation). Only before the first worker joins.
    pub fn start_generations_after(&mut self, generation: u64) {
        if self.members.workers.is_empty() {
            self.members.generation = self.members.generation.max(generation);
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn workers(&self) -> &BTreeMap<WorkerId, WorkerEntry> {
        &self.members.workers
    }

    pub fn generation(&self) -> u64 {
        self.members.generation
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase,
            completed_steps: self.progress.completed,
            total_steps: self.settings.config.train.steps,
            workers: self.members.workers.len(),
            world_size: self.members.ranks.len(),
            generation: self.members.generation,
            last_loss: self.latest.loss,
            last_val_loss: self.latest.val_loss,
            last_checkpoint: self.latest.checkpoint.clone(),
            last_tokens_per_second: self.latest.tokens_per_second,
            checkpoint_failures_in_a_row: self.progress.checkpoint_failures,
            skipped_steps_in_a_row: self.progress.skips.in_a_row,
        }
    }

    pub fn config(&self) -> &Config {
        &self.settings.config
    }

    pub fn on(&mut self, now: Instant, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::WorkerJoined { id, info } if info.role == WorkerRole::Eval => self.on_eval_worker_joined(now, id, info, &mut out),
            Event::WorkerJoined { id, info } => self.on_joined(now, id, info, &mut out),
            Event::WorkerLost { id, reason } if self.is_eval_worker(id) => self.on_eval_worker_lost(id, reason, &mut out),
            Event::WorkerLost { id, reason } => self.on_lost(now, id, reason, &mut out),
            Event::FromWorker { id, msg } if self.is_eval_worker(id) => self.on_eval_worker_message(now, id, msg, &mut out),
            Event::FromWorker { id, msg } => {
                if let Some(w) = self.members.workers.get_mut(&id) {
                    w.last_seen = now;
                    self.on_message(now, id, msg, &mut out);
                }
            }
            Event::CheckpointCommitted { step, path } => self.on_checkpoint_committed(now, step, path, &mut out),
            Event::CheckpointCommitFailed { step, error } => self.on_checkpoint_commit_failed(now, step, error, &mut out),
            Event::Timeout => {
                self.check_leases(now, &mut out);
                self.check_eval_worker_leases(now, &mut out);
                self.check_gathering(now, &mut out);
                self.check_checkpoint_retry(now, &mut out);
            }
            Event::ShutdownRequested => self.request_stop(now, &mut out),
            Event::MeasuredOffPath { step, val_loss } => self.on_measured_off_path(step, val_loss),
        }
        out
    }

    /// The earliest instant at which the core needs an [`Event::Timeout`]; `None` while
    /// nothing is timed. It is the earliest of every worker's lease expiry (last heard from +
    /// `cluster.lease_ms`), for a resumed run gathering at least `min_workers` the gathering
    /// deadline, and the retry of a failed final checkpoint. A Timeout before it does
    /// nothing; one at or after it acts. Any event may move it, so the driver asks again
    /// after each.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let leases = self.members.workers.values().filter_map(|w| self.lease_deadline(w));
        leases.chain(self.eval_worker_leases()).chain(self.gather_due_at()).chain(self.progress.retry_checkpoint_at).min()
    }

    fn on_message(&mut self, now: Instant, id: WorkerId, msg: ToCoordinator, out: &mut Vec<Command>) {
        match msg {
            ToCoordinator::Hello(_) => {
                let reason = "protocol error: a second Hello on an established connection".to_string();
                out.push(Command::Disconnect { id, reason: reason.clone() });
                self.on_lost(now, id, reason, out);
            }
            ToCoordinator::Heartbeat => {}
            ToCoordinator::Ready { generation, completed_steps } => self.on_ready(now, id, generation, completed_steps, out),
            ToCoordinator::Synced { generation, step } => self.on_synced(now, id, generation, step, out),
            ToCoordinator::StepDone(report) => self.on_step_done(now, id, report, out),
            ToCoordinator::CollectiveFailed { generation, step, error } => self.on_collective_failed(now, id, generation, step, error, out),
            ToCoordinator::NcclFailed { generation, error } => self.on_nccl_failed(now, id, generation, error, out),
            ToCoordinator::EvalDone(report) => self.on_eval_done(now, id, report, out),
            ToCoordinator::CheckpointWritten { generation, step, files } => {
                self.on_checkpoint_written(now, id, generation, step, files, out)
            }
            ToCoordinator::CheckpointFailed { generation, step, error } => {
                self.on_checkpoint_write_failed(now, id, generation, step, error, out)
            }
            ToCoordinator::Leaving { reason } => self.on_leaving(id, reason, out),
            ToCoordinator::NcclUniqueId { generation, id: unique_id } => self.on_nccl_unique_id(now, id, generation, unique_id, out),
            ToCoordinator::Failed { error } => self.on_worker_failed(now, id, error, out),
            ToCoordinator::CheckpointEvaluated(_) | ToCoordinator::CheckpointEvalFailed { .. } => {
                let reason = "protocol error: a training worker sent an eval worker's answer".to_string();
                out.push(Command::Disconnect { id, reason: reason.clone() });
                self.on_lost(now, id, reason, out);
            }
        }
    }

    /// Stop at the next step boundary, after a last checkpoint.
    fn request_stop(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.progress.stop_requested = true;
        match self.phase {
            Phase::Gathering => self.finish(now, false, Some("stopped before training started".into()), out),
            Phase::Forming | Phase::Syncing if self.progress.started_at.is_none() => {
                self.finish(now, false, Some("stopped before training started".into()), out)
            }
            Phase::Paused => {
                let error = format!(
                    "stopped while paused ({} of cluster.min_workers = {} workers); `--resume` continues from the newest checkpoint",
                    self.members.workers.len(),
                    self.settings.config.cluster.min_workers
                );
                self.finish(now, false, Some(error), out)
            }
            // Training: the next step boundary checkpoints and stops. Forming/Syncing: as soon
            // as training resumes.
            _ => {}
        }
    }

    /// The run fails: every worker is stopped.
    fn abort(&mut self, error: String, out: &mut Vec<Command>) {
        out.push(Command::Record(RunEvent::Failed { step: self.progress.completed, error: error.clone() }));
        for id in self.members.workers.keys() {
            out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: format!("run failed: {error}") } });
        }
        self.phase = Phase::Done;
        out.push(Command::Finish { ok: false, error: Some(error) });
    }

    /// The run ends (finished, or stopped on request): every worker is stopped.
    fn finish(&mut self, now: Instant, ok: bool, error: Option<String>, out: &mut Vec<Command>) {
        for id in self.members.workers.keys() {
            out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: "the run is finished".into() } });
        }
        let seconds = self.progress.started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        out.push(Command::Record(RunEvent::Finished {
            step: self.progress.completed,
            final_loss: self.latest.loss,
            final_val_loss: self.latest.val_loss,
            seconds,
        }));
        self.phase = Phase::Done;
        out.push(Command::Finish { ok, error });
    }
}
