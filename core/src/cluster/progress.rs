//! Where training stands: the ranks' `Ready` and `Synced`, each step's reports, evaluations
//! and checkpoints, and the way to `Finishing` and `Done`.
//!
//! Kept apart from `membership`: these rules run inside one generation and only care that its
//! ranks answer; a membership change gives up their work (see `abandon_work`) and this side
//! requests it again once training resumes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::step_health::SkipStreak;
use super::{Command, Core, Phase, ResumeFrom, WorkerId};
use crate::events::RunEvent;
use crate::proto::{EvalReport, FileDigest, StepReport, ToWorker};
use crate::run_dir;
use crate::shard::Strategy;

/// A checkpoint whose files the ranks are writing.
#[derive(Debug, Clone)]
pub(super) struct PendingCheckpoint {
    requested_at: Instant,
    reported: BTreeSet<u32>,
    files: Vec<FileDigest>,
    /// Every rank wrote its part; the commit is under way and survives membership changes.
    pub(super) committing: bool,
    /// A rank could not write its part: once every rank has answered, the folder is removed
    /// and the checkpoint counts as failed.
    failed: Option<String>,
}

/// Steps, evaluations and checkpoints.
pub(super) struct Progress {
    /// The newest committed checkpoint (at first, the one this run resumes from).
    pub(super) latest_checkpoint: Option<ResumeFrom>,
    /// Completed optimizer steps.
    pub(super) completed: u64,
    step_started_at: Option<Instant>,
    pub(super) step_reports: BTreeMap<u32, StepReport>,
    /// A report of step `completed` from a generation that did not finish it everywhere:
    /// if a survivor completed that step, this is its record.
    pub(super) partial_step: Option<StepReport>,
    pub(super) eval: Option<(u64, BTreeMap<u32, EvalReport>)>,
    pub(super) checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// Work abandoned by a membership change, to request again once training resumes.
    pub(super) redo_eval: bool,
    pub(super) redo_checkpoint: bool,
    pub(super) stop_requested: bool,
    pub(super) started_at: Option<Instant>,
    /// Steps skipped in a row (their loss or gradient was not finite).
    pub(super) skips: SkipStreak,
    /// Checkpoints that failed in a row (reset by a commit).
    pub(super) checkpoint_failures: u32,
    /// Tries of the final checkpoint that failed (it gets `checkpoint.max_failures` of its own).
    final_failures: u32,
    /// When to try the final checkpoint again after it failed.
    pub(super) retry_checkpoint_at: Option<Instant>,
}

impl Progress {
    pub(super) fn new(resume: Option<ResumeFrom>) -> Progress {
        Progress {
            completed: resume.as_ref().map_or(0, |r| r.step),
            latest_checkpoint: resume,
            step_started_at: None,
            step_reports: BTreeMap::new(),
            partial_step: None,
            eval: None,
            checkpoints: BTreeMap::new(),
            redo_eval: false,
            redo_checkpoint: false,
            stop_requested: false,
            started_at: None,
            skips: SkipStreak::default(),
            checkpoint_failures: 0,
            final_failures: 0,
            retry_checkpoint_at: None,
        }
    }
}

/// Whether work done every `interval` steps (0: never) is due once `step` steps are complete.
fn due(interval: u64, step: u64) -> bool {
    interval > 0 && step.is_multiple_of(interval)
}

impl Core {
    /// For a new generation: where its ranks' state comes from, as (checkpoint to load, step).
    /// Survivors carry the state on; only when none holds it does it come from disk. A sharded
    /// state (zero1/2/3) is split by world size and one member's part is gone with it: a new
    /// generation always starts from the newest checkpoint, resharded.
    pub(super) fn starting_point(&mut self, out: &mut Vec<Command>) -> (Option<String>, u64) {
        let replicas = self.settings.config.parallel.strategy == Strategy::Ddp;
        let holders = replicas && self.members.ranks.iter().any(|id| self.members.workers[id].holds_state);
        let p = &mut self.progress;
        if holders {
            return (None, p.completed);
        }
        match p.latest_checkpoint.clone() {
            Some(c) => {
                if c.step != p.completed {
                    out.push(Command::Record(RunEvent::Warning {
                        step: p.completed,
                        message: format!("no worker holds the training state: continuing from checkpoint {} (step {})", c.dir, c.step),
                    }));
                }
                p.completed = c.step;
                (Some(c.dir), c.step)
            }
            None => {
                if p.completed > 0 {
                    out.push(Command::Record(RunEvent::Warning {
                        step: p.completed,
                        message: "no worker holds the training state and there is no checkpoint: starting again from step 0".into(),
                    }));
                }
                p.completed = 0;
                (None, 0)
            }
        }
    }

    pub(super) fn on_ready(&mut self, now: Instant, id: WorkerId, generation: u64, completed_steps: u64, out: &mut Vec<Command>) {
        if generation != self.members.generation || self.phase != Phase::Forming || self.members.rank_of(id).is_none() {
            return;
        }
        if let Some(w) = self.members.workers.get_mut(&id) {
            w.ready = true;
            w.completed = Some(completed_steps);
        }
        if self.members.ranks.iter().all(|r| self.members.workers.get(r).is_some_and(|w| w.ready)) {
            self.all_ready(now, out);
        }
    }

    /// Every rank of the generation is ready: settle which state the run continues from.
    fn all_ready(&mut self, now: Instant, out: &mut Vec<Command>) {
        let held: Vec<u64> = self.members.ranks.iter().map(|id| self.members.workers[id].completed.unwrap_or(0)).collect();
        let target = held.iter().copied().max().unwrap_or(0);
        let completed = self.progress.completed;
        if target == completed + 1 {
            // Some survivor finished the step its generation was interrupted in: its
            // all-reduce had every rank's gradient, so that step counts.
            match self.progress.partial_step.take() {
                Some(report) if report.step == completed => {
                    // Its generation's ranks together trained on the whole global batch.
                    let tokens = report.tokens * u64::from(report.world_size);
                    self.record_step(now, &report, tokens, 0.0, out);
                }
                _ => out.push(Command::Record(RunEvent::Warning {
                    step: completed,
                    message: format!("step {completed} was completed by a survivor whose report was not received"),
                })),
            }
            self.progress.completed = target;
            self.progress.redo_eval |= due(self.settings.config.eval.interval, target);
            self.progress.redo_checkpoint |= due(self.settings.config.checkpoint.interval, target);
        } else if target != completed {
            let error = format!(
                "the ranks of generation {} hold states at steps {held:?}, but the run is at step {completed}: cannot continue consistently",
                self.members.generation
            );
            self.abort(error, out);
            return;
        }
        self.progress.partial_step = None;
        for (id, w) in self.members.workers.iter_mut() {
            if self.members.ranks.contains(id) {
                w.holds_state = true;
            }
        }
        if held.iter().all(|&c| c == target) {
            self.resume_training(now, false, out);
            return;
        }
        let source_rank = held.iter().position(|&c| c == target).expect("the maximum is held by someone") as u32;
        for id in &self.members.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Sync { generation: self.members.generation, source_rank, step: target } });
        }
        self.phase = Phase::Syncing;
    }

    pub(super) fn on_synced(&mut self, now: Instant, id: WorkerId, generation: u64, step: u64, out: &mut Vec<Command>) {
        if generation != self.members.generation || self.phase != Phase::Syncing || step != self.progress.completed {
            return;
        }
        if let Some(w) = self.members.workers.get_mut(&id) {
            w.synced = true;
        }
        if self.members.ranks.iter().all(|r| self.members.workers.get(r).is_some_and(|w| w.synced)) {
            self.resume_training(now, true, out);
        }
    }

    fn resume_training(&mut self, now: Instant, synced: bool, out: &mut Vec<Command>) {
        self.phase = Phase::Training;
        let world_size = self.members.ranks.len() as u32;
        let p = &mut self.progress;
        if p.started_at.is_none() {
            p.started_at = Some(now);
            out.push(Command::Record(RunEvent::Started {
                step: p.completed,
                world_size,
                resumed_from: p.latest_checkpoint.as_ref().filter(|c| c.step == p.completed && c.step > 0).map(|c| c.dir.clone()),
                config: self.settings.config.to_toml(),
            }));
        } else {
            let seconds = self.members.regroup_started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            out.push(Command::Record(RunEvent::Regrouped {
                step: p.completed,
                generation: self.members.generation,
                world_size,
                seconds,
                synced,
            }));
        }
        self.members.regroup_started_at = None;
        let already_saved = p.latest_checkpoint.as_ref().is_some_and(|c| c.step == p.completed);
        let redo_eval = std::mem::take(&mut p.redo_eval);
        let redo_checkpoint = (std::mem::take(&mut p.redo_checkpoint) || p.stop_requested) && !already_saved;
        if redo_eval {
            self.request_eval(redo_checkpoint, out);
        }
        if redo_checkpoint {
            self.request_checkpoint(now, out);
        }
        self.next_step(now, out);
    }

    pub(super) fn on_step_done(&mut self, now: Instant, id: WorkerId, report: StepReport, out: &mut Vec<Command>) {
        if report.generation != self.members.generation {
            // A survivor that completed the step its generation was interrupted in: kept, in
            // case that step turns out completed (see `all_ready`).
            if report.step == self.progress.completed {
                self.progress.partial_step = Some(report);
            }
            return;
        }
        let Some(rank) = self.members.rank_of(id) else { return };
        if self.phase != Phase::Training || report.step != self.progress.completed {
            return;
        }
        if let Some(w) = self.members.workers.get_mut(&id) {
            w.last_step_seconds = Some(report.data_seconds + report.compute_seconds + report.comm_seconds);
        }
        self.progress.step_reports.insert(rank, report);
        if self.progress.step_reports.len() == self.members.ranks.len() {
            self.complete_step(now, out);
        }
    }

    fn record_step(&mut self, now: Instant, report: &StepReport, tokens: u64, comm_seconds: f64, out: &mut Vec<Command>) {
        let seconds = self.progress.step_started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let tokens_per_sec = if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 };
        self.latest.tokens_per_second = Some(tokens_per_sec);
        out.push(Command::Record(RunEvent::Step {
            step: report.step,
            generation: report.generation,
            world_size: report.world_size,
            loss: report.loss,
            lr: report.lr,
            tokens_per_sec,
            grad_norm: report.grad_norm,
            step_seconds: seconds,
            comm_seconds,
        }));
        self.latest.loss = Some(report.loss);
    }

    fn complete_step(&mut self, now: Instant, out: &mut Vec<Command>) {
        let reports = std::mem::take(&mut self.progress.step_reports);
        if !self.check_agreement(&reports, out) {
            return;
        }
        let tokens: u64 = reports.values().map(|r| r.tokens).sum();
        let comm_seconds = reports.values().map(|r| r.comm_seconds).fold(0.0, f64::max);
        let first = reports.values().next().expect("a completed step has reports").clone();
        match first.skipped {
            // The step's data was consumed all the same: the run moves on to the next step.
            Some(reason) => {
                if !self.on_skipped_step(&reports, reason, out) {
                    return;
                }
            }
            None => {
                self.progress.skips.in_a_row = 0;
                self.record_step(now, &first, tokens, comm_seconds, out);
            }
        }
        self.progress.completed += 1;
        self.members.failed_regroups = 0;

        let config = &self.settings.config;
        let completed = self.progress.completed;
        let total = config.train.steps;
        let last = completed >= total || self.progress.stop_requested;
        let checkpoint_due = due(config.checkpoint.interval, completed) || last;
        // Every checkpoint is evaluated too: the Evaluator and the Deployer need its loss.
        let eval_due = due(config.eval.interval, completed) || checkpoint_due;

        // Membership changes wait for a step boundary: workers asked to leave go, workers
        // waiting to join come in.
        let workers = &mut self.members.workers;
        let leaving: Vec<WorkerId> = self.members.ranks.iter().copied().filter(|id| workers[id].leaving).collect();
        let joining = workers.values().any(|w| w.rank.is_none() && !w.leaving);
        if (!leaving.is_empty() || joining) && !last {
            let remaining = workers.values().filter(|w| !w.leaving).count();
            if remaining >= config.cluster.min_workers {
                for id in &leaving {
                    out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: "left at a step boundary, as asked".into() } });
                    if let Some(w) = workers.get_mut(id) {
                        w.rank = None;
                    }
                }
                let why = match (leaving.len(), joining) {
                    (0, _) => "workers are waiting to join".to_string(),
                    (n, false) => format!("{n} worker(s) left at a step boundary"),
                    (n, true) => format!("{n} worker(s) left and others are waiting to join"),
                };
                self.progress.redo_eval |= eval_due;
                self.progress.redo_checkpoint |= checkpoint_due;
                self.note_change(now, why, out);
                self.form(out);
                return;
            }
            // The run cannot go on without them: checkpoint and stop, to be resumed later.
            self.progress.stop_requested = true;
        }
        let last = completed >= total || self.progress.stop_requested;
        if eval_due || last {
            self.request_eval(checkpoint_due || last, out);
        }
        if checkpoint_due || last {
            self.request_checkpoint(now, out);
        }
        self.next_step(now, out);
    }

    /// Evaluates the model after the completed steps: sharded over the ranks (each computes
    /// its share now, so training waits for it), or, when the step is checkpointed and an
    /// eval worker is connected, by the eval worker from the committed checkpoint while
    /// training goes on.
    fn request_eval(&mut self, checkpointed: bool, out: &mut Vec<Command>) {
        let step = self.progress.completed;
        if checkpointed && self.has_eval_workers() {
            out.push(Command::EvaluateOffPath { step });
            return;
        }
        self.progress.eval = Some((step, BTreeMap::new()));
        for id in &self.members.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Evaluate { step } });
        }
    }

    pub(super) fn on_eval_done(&mut self, now: Instant, id: WorkerId, report: EvalReport, out: &mut Vec<Command>) {
        if report.generation != self.members.generation {
            return;
        }
        let Some(rank) = self.members.rank_of(id) else { return };
        let Some((step, reports)) = self.progress.eval.as_mut() else { return };
        if report.step != *step {
            return;
        }
        reports.insert(rank, report);
        if reports.len() == self.members.ranks.len() {
            let (step, reports) = self.progress.eval.take().expect("checked above");
            let loss_sum: f64 = reports.values().map(|r| r.loss_sum).sum();
            let sequences: u64 = reports.values().map(|r| r.sequences).sum();
            let val_loss = loss_sum / sequences.max(1) as f64;
            let mut by_source: BTreeMap<String, (f64, u64)> = BTreeMap::new();
            for part in reports.values().flat_map(|r| r.per_source.iter()) {
                let entry = by_source.entry(part.source.clone()).or_default();
                entry.0 += part.loss_sum;
                entry.1 += part.sequences;
            }
            let per_source: BTreeMap<String, f64> =
                by_source.into_iter().filter(|(_, (_, n))| *n > 0).map(|(source, (sum, n))| (source, sum / n as f64)).collect();
            if val_loss.is_finite() {
                self.latest.val_loss = Some(val_loss);
                self.latest.val_loss_step = Some(step);
                out.push(Command::Record(RunEvent::Eval { step, val_loss, sequences, per_source }));
            } else {
                // Not an evaluation: its checkpoint is never evaluated, retained as the best, or
                // published (and events.jsonl holds no NaN).
                out.push(Command::Record(RunEvent::Warning {
                    step,
                    message: format!("the validation loss after step {step} is {val_loss}: not recorded, and its checkpoint not released"),
                }));
            }
            self.maybe_done(now, out);
        }
    }

    fn request_checkpoint(&mut self, now: Instant, out: &mut Vec<Command>) {
        let step = self.progress.completed;
        if self.progress.checkpoints.contains_key(&step) {
            return;
        }
        let dir = run_dir::tmp_dir(&self.settings.run_dir, step, self.members.generation).display().to_string();
        self.progress.checkpoints.insert(
            step,
            PendingCheckpoint { requested_at: now, reported: BTreeSet::new(), files: Vec::new(), committing: false, failed: None },
        );
        for id in &self.members.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Checkpoint { step, dir: dir.clone() } });
        }
    }

    /// A rank wrote its part of a checkpoint; with every part in, the checkpoint is committed.
    pub(super) fn on_checkpoint_written(
        &mut self,
        now: Instant,
        id: WorkerId,
        generation: u64,
        step: u64,
        files: Vec<FileDigest>,
        out: &mut Vec<Command>,
    ) {
        self.on_checkpoint_part(now, id, generation, step, Ok(files), out);
    }

    pub(super) fn on_checkpoint_write_failed(
        &mut self,
        now: Instant,
        id: WorkerId,
        generation: u64,
        step: u64,
        error: String,
        out: &mut Vec<Command>,
    ) {
        self.on_checkpoint_part(now, id, generation, step, Err(error), out);
    }

    /// A rank's answer to `Checkpoint`. Once every rank has answered, the checkpoint is
    /// committed, or, if any rank failed, its folder is removed and it counts as failed
    /// (waiting for all of them first, so that no rank is still writing into the folder).
    fn on_checkpoint_part(
        &mut self,
        now: Instant,
        id: WorkerId,
        generation: u64,
        step: u64,
        part: Result<Vec<FileDigest>, String>,
        out: &mut Vec<Command>,
    ) {
        if generation != self.members.generation {
            return;
        }
        let Some(rank) = self.members.rank_of(id) else { return };
        let world = self.members.ranks.len();
        let Some(p) = self.progress.checkpoints.get_mut(&step) else { return };
        if p.committing || !p.reported.insert(rank) {
            return;
        }
        match part {
            Ok(files) => p.files.extend(files),
            Err(error) => {
                p.failed.get_or_insert(format!("rank {rank} could not write its part: {error}"));
            }
        }
        if p.reported.len() < world {
            return;
        }
        match p.failed.clone() {
            None => {
                p.committing = true;
                let files = p.files.clone();
                out.push(Command::CommitCheckpoint { step, generation, world_size: world as u32, files });
            }
            Some(error) => {
                self.progress.checkpoints.remove(&step);
                out.push(Command::DiscardCheckpoint { step, generation });
                self.checkpoint_failed(now, step, error, out);
            }
        }
    }

    pub(super) fn on_checkpoint_committed(&mut self, now: Instant, step: u64, path: String, out: &mut Vec<Command>) {
        if let Some(p) = self.progress.checkpoints.remove(&step) {
            let seconds = now.saturating_duration_since(p.requested_at).as_secs_f64();
            self.latest.checkpoint = Some(path.clone());
            self.progress.latest_checkpoint = Some(ResumeFrom { dir: path.clone(), step });
            self.progress.checkpoint_failures = 0;
            out.push(Command::Record(RunEvent::Checkpoint { step, path, seconds }));
        }
        self.maybe_done(now, out);
    }

    pub(super) fn on_checkpoint_commit_failed(&mut self, now: Instant, step: u64, error: String, out: &mut Vec<Command>) {
        if self.progress.checkpoints.remove(&step).is_some() {
            self.checkpoint_failed(now, step, error, out);
        } else {
            self.maybe_done(now, out);
        }
    }

    /// A checkpoint failed. While training, the previous checkpoint stays the newest and
    /// training goes on, up to `checkpoint.max_failures` failures in a row (a full disk does
    /// not empty itself). The final checkpoint is tried again with backoff while the workers
    /// wait; if it cannot be committed, the run fails saying what was lost.
    fn checkpoint_failed(&mut self, now: Instant, step: u64, error: String, out: &mut Vec<Command>) {
        let p = &mut self.progress;
        p.checkpoint_failures += 1;
        let in_a_row = p.checkpoint_failures;
        out.push(Command::Record(RunEvent::CheckpointFailed { step, error: error.clone(), in_a_row }));
        let max = self.settings.config.checkpoint.max_failures;
        let newest = match &p.latest_checkpoint {
            Some(c) => format!("the newest committed checkpoint is {} (step {})", c.dir, c.step),
            None => "no checkpoint of this run was committed".to_string(),
        };
        let since = p.latest_checkpoint.as_ref().map_or(0, |c| c.step);
        // The final checkpoint is the one at the last step; an earlier one's failure can be
        // reported late, while finishing, and is only counted.
        let is_final = self.phase == Phase::Finishing && step == p.completed;
        if is_final {
            p.final_failures += 1;
            let tries = p.final_failures;
            if tries < max {
                let backoff = Duration::from_secs(1 << (tries - 1).min(5));
                p.retry_checkpoint_at = Some(now + backoff);
                out.push(Command::Record(RunEvent::Warning {
                    step,
                    message: format!(
                        "the final checkpoint at step {step} failed (try {tries} of checkpoint.max_failures = {max}): \
                         trying again in {} s",
                        backoff.as_secs()
                    ),
                }));
                return;
            }
            let error = format!(
                "the final checkpoint at step {step} could not be committed after {tries} tries (last: {error}); \
                 {newest}, so steps {since}..{step} are lost. Make room on that disk (or fix it) and run again with `--resume`"
            );
            return self.abort(error, out);
        }
        if in_a_row >= max {
            let error = format!(
                "{in_a_row} checkpoints in a row failed (checkpoint.max_failures = {max}), the last at step {step}: {error}. \
                 Stopping rather than training on with nothing saved; {newest}. Make room on that disk (or fix it) and \
                 run again with `--resume`"
            );
            return self.abort(error, out);
        }
        out.push(Command::Record(RunEvent::Warning {
            step,
            message: format!(
                "checkpoint at step {step} failed ({in_a_row} in a row; the run stops at checkpoint.max_failures = {max}); \
                 {newest}"
            ),
        }));
    }

    /// The final checkpoint's retry is due (see `checkpoint_failed`).
    pub(super) fn check_checkpoint_retry(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.progress.retry_checkpoint_at.is_some_and(|at| now >= at) {
            self.progress.retry_checkpoint_at = None;
            let p = &self.progress;
            if p.latest_checkpoint.as_ref().is_some_and(|c| c.step == p.completed) {
                return self.maybe_done(now, out);
            }
            self.request_checkpoint(now, out);
        }
    }

    fn next_step(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.progress.completed >= self.settings.config.train.steps || self.progress.stop_requested {
            self.phase = Phase::Finishing;
            self.maybe_done(now, out);
            return;
        }
        self.progress.step_started_at = Some(now);
        for id in &self.members.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Step { step: self.progress.completed } });
        }
    }

    pub(super) fn maybe_done(&mut self, now: Instant, out: &mut Vec<Command>) {
        let p = &self.progress;
        if self.phase == Phase::Finishing && p.eval.is_none() && p.checkpoints.is_empty() && p.retry_checkpoint_at.is_none() {
            // A stop on request is a clean finish too: the last checkpoint has been written.
            self.finish(now, true, None, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn work_is_due_every_interval_steps_and_never_with_interval_0() {
        assert!(due(2, 2) && due(2, 4) && due(1, 7));
        assert!(!due(2, 3) && !due(3, 4));
        assert!(!due(0, 0) && !due(0, 5));
    }
}
