//! Evaluator: turns a committed checkpoint into evaluation results (`eval.json` next to it),
//! which the Deployer then judges.
//!
//! A checkpoint reaches it one of two ways:
//! - **measured by the ranks** (no eval worker connected when the step was checkpointed): the
//!   core asked every rank for its share of the validation loss at that step, so training
//!   paused for it. The Evaluator adds what needs the model file: the next-line task (when
//!   `eval.task_items` > 0) and the samples from `eval.prompts`, computed here on a blocking
//!   thread so the coordinator's mailbox never waits on it;
//! - **off the training path** (an eval worker connected): nothing was measured yet. The job
//!   goes to an eval worker (`troupe worker --role eval`), which loads the checkpoint and
//!   measures everything, loss included, while training goes on. One job at a time per
//!   Evaluator, in step order. An eval worker that is lost mid-job, or does not answer within
//!   `eval.worker_timeout_s`, loses the job: it goes to another eval worker, or waits
//!   `eval.worker_grace_s` for one to (re)join, and after that the Evaluator measures it here.
//!   An eval worker's error is answered the same way. Nothing waits forever.

use super::coordinator::CoordinatorMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use troupe_common::checkpoint;
use troupe_common::evaluation::{self, Loss, Measured};
use troupe_common::registry::{EvalResults, EVAL_FILE};
use troupe_core::cluster::{EvaluatorNote, WorkerId};
use troupe_core::config::Config;
use troupe_core::proto::{SourceLoss, ToWorker};

pub struct Evaluator;

/// Checkpoints waiting for an eval worker, at most. Evaluation slower than the checkpoint
/// interval would otherwise queue checkpoints without end (each pinned against retention), and
/// the newest, the one a deployment wants, would wait behind all of them: beyond this the oldest
/// waiting one is left unevaluated, with a warning.
const MAX_WAITING: usize = 4;

/// Drops the oldest jobs beyond [`MAX_WAITING`]; returns each with the newest job's step.
fn keep_newest(waiting: &mut VecDeque<EvalJob>) -> Vec<(EvalJob, u64)> {
    let newest = waiting.back().map_or(0, |j| j.step);
    let excess = waiting.len().saturating_sub(MAX_WAITING);
    waiting.drain(..excess).map(|job| (job, newest)).collect()
}

pub struct EvaluatorArgs {
    pub config: Config,
    pub coordinator: ActorRef<CoordinatorMsg>,
    /// The step of the job being handled (`super::IDLE` between jobs): after a crash, the
    /// supervisor knows which job it was.
    pub current: Arc<AtomicU64>,
    /// Eval workers connected when this Evaluator starts (a restarted one inherits them).
    pub eval_workers: BTreeSet<WorkerId>,
}

/// One checkpoint to evaluate.
#[derive(Debug, Clone)]
pub struct EvalJob {
    pub step: u64,
    pub checkpoint: PathBuf,
    /// The validation loss and its sequence count, when the ranks measured them; `None`: to
    /// be measured off the training path.
    pub measured: Option<(f64, u64)>,
}

/// Who measured a checkpoint's validation loss.
#[derive(Debug, Clone, PartialEq)]
pub enum MeasuredBy {
    Ranks,
    EvalWorker(WorkerId),
    /// The coordinator itself, when no eval worker could.
    Coordinator,
}

impl std::fmt::Display for MeasuredBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeasuredBy::Ranks => write!(f, "ranks"),
            MeasuredBy::EvalWorker(id) => write!(f, "eval worker {id}"),
            MeasuredBy::Coordinator => write!(f, "coordinator"),
        }
    }
}

/// What the Evaluator tells the coordinator about a job.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub job: EvalJob,
    pub results: EvalResults,
    pub by: MeasuredBy,
    /// Per-source losses, when measured off the training path on data with several sources.
    pub per_source: Vec<SourceLoss>,
}

pub enum EvaluatorMsg {
    Evaluate(EvalJob),
    /// An eval worker came, went or answered (from the core).
    EvalWorker(EvaluatorNote),
    /// `eval.worker_timeout_s` after job `attempt` was sent.
    Overdue {
        attempt: u64,
    },
    /// `eval.worker_grace_s` after the jobs waiting lost their last eval worker.
    GraceOver {
        attempt: u64,
    },
}

pub struct EvaluatorState {
    config: Config,
    coordinator: ActorRef<CoordinatorMsg>,
    current: Arc<AtomicU64>,
    workers: BTreeSet<WorkerId>,
    /// Jobs to measure off the training path, in step order, not yet sent.
    waiting: VecDeque<EvalJob>,
    /// The job an eval worker is measuring.
    sent: Option<Sent>,
    /// Numbers each sending and each grace period, so that a stale timer does nothing.
    attempts: u64,
    /// The grace period running, if any.
    grace: Option<u64>,
}

struct Sent {
    job: EvalJob,
    worker: WorkerId,
    attempt: u64,
}

impl Actor for Evaluator {
    type Msg = EvaluatorMsg;
    type State = EvaluatorState;
    type Arguments = EvaluatorArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: EvaluatorArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(EvaluatorState {
            config: args.config,
            coordinator: args.coordinator,
            current: args.current,
            workers: args.eval_workers,
            waiting: VecDeque::new(),
            sent: None,
            attempts: 0,
            grace: None,
        })
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            EvaluatorMsg::Evaluate(job) if job.measured.is_none() => {
                state.waiting.push_back(job);
                for (skipped, newest) in keep_newest(&mut state.waiting) {
                    let reason = format!(
                        "the eval workers are {MAX_WAITING} checkpoints behind; the newer ones go first (the newest is of step {newest})"
                    );
                    tracing::warn!("the checkpoint of step {} is not evaluated: {reason}", skipped.step);
                    state.coordinator.cast(CoordinatorMsg::EvaluationSkipped { step: skipped.step, reason })?;
                }
                state.dispatch(&me).await?;
            }
            EvaluatorMsg::Evaluate(job) => {
                state.current.store(job.step, Ordering::SeqCst);
                // Test hook: the Evaluator crashes on its first N jobs, however often restarted.
                static CRASHES: troupe_common::fault::FaultCount = troupe_common::fault::FaultCount::new("TROUPE_FAULT_EVALUATOR_CRASHES");
                if CRASHES.fires() {
                    panic!("fault injection: the Evaluator crashes on the checkpoint of step {}", job.step);
                }
                state.measure_here(job, Loss::Known).await?;
            }
            EvaluatorMsg::EvalWorker(note) => state.on_note(&me, note).await?,
            EvaluatorMsg::Overdue { attempt } => {
                let Some(sent) = state.sent.take_if(|s| s.attempt == attempt) else { return Ok(()) };
                let reason = format!(
                    "it did not evaluate the checkpoint of step {} within eval.worker_timeout_s = {} s",
                    sent.job.step, state.config.eval.worker_timeout_s
                );
                tracing::warn!("eval worker {}: {reason}; the coordinator evaluates it instead", sent.worker);
                state.workers.remove(&sent.worker);
                state.coordinator.cast(CoordinatorMsg::DisconnectWorker { id: sent.worker, reason })?;
                state.measure_here(sent.job, Loss::Measure).await?;
                state.dispatch(&me).await?;
            }
            EvaluatorMsg::GraceOver { attempt } => {
                if state.grace != Some(attempt) {
                    return Ok(());
                }
                state.grace = None;
                if state.workers.is_empty() {
                    while let Some(job) = state.waiting.pop_front() {
                        tracing::warn!(
                            "no eval worker joined within eval.worker_grace_s = {} s: the coordinator evaluates the checkpoint of step {}",
                            state.config.eval.worker_grace_s,
                            job.step
                        );
                        state.measure_here(job, Loss::Measure).await?;
                    }
                }
                state.dispatch(&me).await?;
            }
        }
        Ok(())
    }
}

impl EvaluatorState {
    async fn on_note(&mut self, me: &ActorRef<EvaluatorMsg>, note: EvaluatorNote) -> Result<(), ActorProcessingErr> {
        match note {
            EvaluatorNote::Joined { id, hostname } => {
                tracing::info!("eval worker {id} ({hostname}) joined: checkpoints are evaluated off the training path");
                self.workers.insert(id);
            }
            EvaluatorNote::Lost { id, reason } => {
                self.workers.remove(&id);
                if let Some(sent) = self.sent.take_if(|s| s.worker == id) {
                    tracing::warn!("eval worker {id} was lost ({reason}) while evaluating the checkpoint of step {}", sent.job.step);
                    self.waiting.push_front(sent.job);
                }
            }
            EvaluatorNote::Evaluated { id, eval } => {
                let Some(sent) = self.sent.take_if(|s| s.worker == id && s.job.step == eval.step) else { return Ok(()) };
                let measured = Measured {
                    loss: Some((eval.loss_sum, eval.sequences, eval.per_source)),
                    tasks: eval.tasks.into_iter().collect(),
                    samples: eval.samples,
                };
                self.finish(sent.job, measured, MeasuredBy::EvalWorker(id))?;
            }
            EvaluatorNote::Failed { id, step, error } => {
                let Some(sent) = self.sent.take_if(|s| s.worker == id && s.job.step == step) else { return Ok(()) };
                tracing::warn!("eval worker {id} could not evaluate the checkpoint of step {step} ({error}); the coordinator does");
                self.measure_here(sent.job, Loss::Measure).await?;
            }
        }
        self.dispatch(me).await
    }

    /// Sends the next waiting job to an eval worker, or, with none connected, starts the
    /// grace period after which the coordinator measures the waiting jobs itself.
    async fn dispatch(&mut self, me: &ActorRef<EvaluatorMsg>) -> Result<(), ActorProcessingErr> {
        if self.sent.is_some() || self.waiting.is_empty() {
            self.current.store(self.sent.as_ref().map_or(super::IDLE, |s| s.job.step), Ordering::SeqCst);
            return Ok(());
        }
        let Some(&worker) = self.workers.first() else {
            if self.grace.is_none() {
                self.attempts += 1;
                self.grace = Some(self.attempts);
                let attempt = self.attempts;
                me.send_after(Duration::from_secs(self.config.eval.worker_grace_s), move || EvaluatorMsg::GraceOver { attempt });
            }
            return Ok(());
        };
        self.grace = None;
        let job = self.waiting.pop_front().expect("checked above");
        self.attempts += 1;
        let attempt = self.attempts;
        let msg = ToWorker::EvaluateCheckpoint {
            step: job.step,
            checkpoint: job.checkpoint.display().to_string(),
            config_toml: self.config.to_toml(),
        };
        self.coordinator.cast(CoordinatorMsg::SendToWorker { id: worker, msg })?;
        self.current.store(job.step, Ordering::SeqCst);
        me.send_after(Duration::from_secs(self.config.eval.worker_timeout_s), move || EvaluatorMsg::Overdue { attempt });
        self.sent = Some(Sent { job, worker, attempt });
        Ok(())
    }

    /// Measures `job` in this process (on a blocking thread) and reports it. `current` names it
    /// meanwhile: if this crashes the Evaluator, the supervisor gives this job up instead of
    /// sending it again and again.
    async fn measure_here(&mut self, job: EvalJob, loss: Loss) -> Result<(), ActorProcessingErr> {
        self.current.store(job.step, Ordering::SeqCst);
        let (config, checkpoint) = (self.config.clone(), job.checkpoint.clone());
        let measured = tokio::task::spawn_blocking(move || evaluation::measure(&config, &checkpoint, loss, tch::Device::Cpu)).await?;
        self.current.store(self.sent.as_ref().map_or(super::IDLE, |s| s.job.step), Ordering::SeqCst);
        let by = if loss == Loss::Known { MeasuredBy::Ranks } else { MeasuredBy::Coordinator };
        match measured {
            Ok(measured) => self.finish(job, measured, by),
            Err(e) => Ok(self.coordinator.cast(CoordinatorMsg::EvaluationFailed { step: job.step, error: format!("{e:#}") })?),
        }
    }

    /// Writes `eval.json` and tells the coordinator.
    fn finish(&mut self, job: EvalJob, measured: Measured, by: MeasuredBy) -> Result<(), ActorProcessingErr> {
        let step = job.step;
        let outcome = results(&job, measured).and_then(|(results, per_source)| {
            let bytes = serde_json::to_vec_pretty(&results)?;
            checkpoint::write_atomic(&job.checkpoint.join(EVAL_FILE), &bytes)?;
            Ok((results, per_source))
        });
        let msg = match outcome {
            Ok((results, per_source)) => CoordinatorMsg::Evaluated(Box::new(Evaluation { job, results, by, per_source })),
            Err(e) => CoordinatorMsg::EvaluationFailed { step, error: format!("{e:#}") },
        };
        self.coordinator.cast(msg)?;
        Ok(())
    }
}

fn results(job: &EvalJob, measured: Measured) -> anyhow::Result<(EvalResults, Vec<SourceLoss>)> {
    let (val_loss, sequences, per_source) = match (job.measured, measured.loss) {
        (Some((loss, sequences)), _) => (loss, sequences, Vec::new()),
        (None, Some((loss_sum, sequences, per_source))) => (loss_sum / sequences.max(1) as f64, sequences, per_source),
        (None, None) => anyhow::bail!("nothing measured the validation loss"),
    };
    // A checkpoint whose loss is not finite is never recorded as evaluated, so it can be
    // neither the best one retention keeps nor a version the Deployer publishes.
    anyhow::ensure!(
        val_loss.is_finite(),
        "its validation loss is {val_loss}: not recorded and not published (see the run's skipped steps)"
    );
    let tasks: BTreeMap<String, f64> = measured.tasks;
    let results = EvalResults { step: job.step, val_loss, perplexity: val_loss.exp(), sequences, samples: measured.samples, tasks };
    Ok((results, per_source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_waiting_checkpoints_are_kept() {
        let job = |step| EvalJob { step, checkpoint: PathBuf::new(), measured: None };
        let mut waiting: VecDeque<EvalJob> = (1..=MAX_WAITING as u64).map(job).collect();
        assert!(keep_newest(&mut waiting).is_empty());
        waiting.push_back(job(10));
        waiting.push_back(job(11));
        let skipped: Vec<(u64, u64)> = keep_newest(&mut waiting).into_iter().map(|(j, newest)| (j.step, newest)).collect();
        assert_eq!(skipped, vec![(1, 11), (2, 11)]);
        assert_eq!(waiting.iter().map(|j| j.step).collect::<Vec<_>>(), vec![3, 4, 10, 11]);
    }
}
