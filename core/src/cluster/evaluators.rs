//! Eval workers (`troupe worker --role eval`): connections that never hold a rank. The core
//! welcomes them, keeps their leases, and while at least one is connected hands the
//! evaluation of each checkpointed step to it ([`Command::EvaluateOffPath`]) instead of
//! pausing the ranks to evaluate. Which eval worker measures which checkpoint, and what
//! happens when one dies mid-job, is the Evaluator actor's business: the core only tells it
//! who came, who went, and what they answered ([`Command::ToEvaluator`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Command, Core, WorkerId};
use crate::proto::{Capabilities, RefusalKind, ToCoordinator, ToWorker};

/// Eval workers connected at once, at most: evaluation is one checkpoint at a time, so more
/// only wait; the cap keeps a misconfigured launcher from filling the coordinator.
const MAX_EVAL_WORKERS: usize = 16;

/// The connected eval workers.
#[derive(Default)]
pub(super) struct EvalWorkers {
    pub(super) workers: BTreeMap<WorkerId, EvalWorker>,
}

pub(super) struct EvalWorker {
    pub(super) info: Capabilities,
    pub(super) last_seen: Instant,
}

/// What the core tells the Evaluator about eval workers.
#[derive(Debug, Clone, PartialEq)]
pub enum EvaluatorNote {
    Joined { id: WorkerId, hostname: String },
    Lost { id: WorkerId, reason: String },
    Evaluated { id: WorkerId, eval: crate::proto::CheckpointEval },
    Failed { id: WorkerId, step: u64, error: String },
}

impl Core {
    pub(super) fn has_eval_workers(&self) -> bool {
        !self.evaluators.workers.is_empty()
    }

    /// The connected eval workers, for status and scrape targets.
    pub fn eval_workers(&self) -> impl Iterator<Item = (WorkerId, &Capabilities)> {
        self.evaluators.workers.iter().map(|(id, w)| (*id, &w.info))
    }

    pub(super) fn is_eval_worker(&self, id: WorkerId) -> bool {
        self.evaluators.workers.contains_key(&id)
    }

    /// An eval worker passed the handshake. It is welcome in every phase: the last
    /// checkpoint is evaluated after the last step, while the coordinator drains.
    pub(super) fn on_eval_worker_joined(&mut self, now: Instant, id: WorkerId, info: Capabilities, out: &mut Vec<Command>) {
        if self.evaluators.workers.len() >= MAX_EVAL_WORKERS {
            let reason = format!("the run already has {MAX_EVAL_WORKERS} eval workers; this one is not needed");
            out.push(Command::Send { to: id, msg: ToWorker::Refused { kind: RefusalKind::ClusterFull, reason: reason.clone() } });
            out.push(Command::Disconnect { id, reason });
            return;
        }
        out.push(Command::Send { to: id, msg: self.welcome(id) });
        out.push(Command::ToEvaluator(EvaluatorNote::Joined { id, hostname: info.hostname.clone() }));
        self.evaluators.workers.insert(id, EvalWorker { info, last_seen: now });
    }

    pub(super) fn on_eval_worker_message(&mut self, now: Instant, id: WorkerId, msg: ToCoordinator, out: &mut Vec<Command>) {
        let Some(worker) = self.evaluators.workers.get_mut(&id) else { return };
        worker.last_seen = now;
        match msg {
            ToCoordinator::Heartbeat => {}
            ToCoordinator::CheckpointEvaluated(eval) => out.push(Command::ToEvaluator(EvaluatorNote::Evaluated { id, eval })),
            ToCoordinator::CheckpointEvalFailed { step, error } => {
                out.push(Command::ToEvaluator(EvaluatorNote::Failed { id, step, error }))
            }
            ToCoordinator::Failed { error } => self.on_eval_worker_lost(id, format!("it failed: {error}"), out),
            ToCoordinator::Leaving { reason } => {
                out.push(Command::Send { to: id, msg: ToWorker::Stop { reason: "leaving, as asked".into() } });
                self.on_eval_worker_lost(id, format!("it left: {reason}"), out);
            }
            other => {
                let reason = format!("protocol error: an eval worker sent {}", message_name(&other));
                out.push(Command::Disconnect { id, reason: reason.clone() });
                self.on_eval_worker_lost(id, reason, out);
            }
        }
    }

    pub(super) fn on_eval_worker_lost(&mut self, id: WorkerId, reason: String, out: &mut Vec<Command>) {
        if self.evaluators.workers.remove(&id).is_some() {
            out.push(Command::ToEvaluator(EvaluatorNote::Lost { id, reason }));
        }
    }

    /// An off-path evaluation is the latest loss unless a later step's is already known.
    pub(super) fn on_measured_off_path(&mut self, step: u64, val_loss: f64) {
        if val_loss.is_finite() && self.latest.val_loss_step.is_none_or(|s| s <= step) {
            self.latest.val_loss = Some(val_loss);
            self.latest.val_loss_step = Some(step);
        }
    }

    pub(super) fn eval_worker_leases(&self) -> impl Iterator<Item = Instant> + '_ {
        let lease = Duration::from_millis(self.settings.config.cluster.lease_ms);
        self.evaluators.workers.values().filter_map(move |w| w.last_seen.checked_add(lease))
    }

    pub(super) fn check_eval_worker_leases(&mut self, now: Instant, out: &mut Vec<Command>) {
        let lease = Duration::from_millis(self.settings.config.cluster.lease_ms);
        let expired: Vec<WorkerId> = self
            .evaluators
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.checked_add(lease).is_some_and(|d| now >= d))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let reason = format!("no heartbeat for longer than the lease ({} ms)", lease.as_millis());
            out.push(Command::Disconnect { id, reason: reason.clone() });
            self.on_eval_worker_lost(id, reason, out);
        }
    }

    /// Stops every eval worker: the coordinator calls this once the run is over and the last
    /// checkpoint evaluated (or given up on).
    pub fn stop_eval_workers(&mut self, reason: &str) -> Vec<Command> {
        let ids: Vec<WorkerId> = std::mem::take(&mut self.evaluators.workers).into_keys().collect();
        ids.into_iter().map(|id| Command::Send { to: id, msg: ToWorker::Stop { reason: reason.to_string() } }).collect()
    }
}

/// A message's name, for an error that says what arrived without dumping it.
fn message_name(msg: &ToCoordinator) -> &'static str {
    match msg {
        ToCoordinator::Hello(_) => "a second Hello",
        ToCoordinator::Heartbeat => "Heartbeat",
        ToCoordinator::Ready { .. } => "Ready",
        ToCoordinator::Synced { .. } => "Synced",
        ToCoordinator::StepDone(_) => "StepDone",
        ToCoordinator::CollectiveFailed { .. } => "CollectiveFailed",
        ToCoordinator::EvalDone(_) => "EvalDone",
        ToCoordinator::CheckpointWritten { .. } => "CheckpointWritten",
        ToCoordinator::CheckpointFailed { .. } => "CheckpointFailed",
        ToCoordinator::Failed { .. } => "Failed",
        ToCoordinator::Leaving { .. } => "Leaving",
        ToCoordinator::NcclUniqueId { .. } => "NcclUniqueId",
        ToCoordinator::NcclFailed { .. } => "NcclFailed",
        ToCoordinator::CheckpointEvaluated(_) => "CheckpointEvaluated",
        ToCoordinator::CheckpointEvalFailed { .. } => "CheckpointEvalFailed",
    }
}
