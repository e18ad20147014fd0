//! Coordinator: the root actor. It owns the sans-IO [`Core`], feeds it events (from sessions,
//! the Checkpointer and a timer) and carries out its commands: messages to workers, checkpoint
//! commits, events.jsonl lines, metrics and the progress display.
//!
//! Supervision: a WorkerSession that ends becomes `WorkerLost`; a Checkpointer, Evaluator or
//! Deployer that fails is restarted after a backoff that doubles with each crash and starts
//! over after a healthy minute, scheduled as a message rather than slept on (counted in
//! `troupe_actor_restarts_total`; see `children`); the Checkpointer's commit in flight is
//! reported failed, so training goes on. ractor's default — stop the parent when a child
//! exits — is overridden on purpose. `progress` is the terminal display.

use super::checkpointer::{Checkpointer, CheckpointerArgs, CheckpointerMsg};
use super::deployer::{Decision, Deployer, DeployerArgs, DeployerMsg};
use super::evaluator::{EvalJob, Evaluation, Evaluator, EvaluatorArgs, EvaluatorMsg, MeasuredBy};
use super::gateway::{Gateway, GatewayArgs};
use super::session::SessionMsg;
use crate::scrape_targets::{ScrapeTargets, WorkerEndpoints};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use troupe_common::metrics::CoordinatorMetrics;
use troupe_common::registry::{version_name, EvalResults};
use troupe_common::status::{RunStatus, SharedStatus, WorkerStatus};
use troupe_core::cluster::{Command, Core, EvaluatorNote, Event, Phase, ResumeFrom, Snapshot, WorkerId};
use troupe_core::config::Config;
use troupe_core::events::{EventLog, RunEvent};
use troupe_core::proto::{Capabilities, FileDigest, ToWorker};
use troupe_core::secret::Secret;

mod children;
mod progress;

pub use children::Supervised;
use children::{spawn_checkpointer, spawn_deployer, spawn_evaluator, Restarts};
use progress::Progress;

/// After the run finishes, how long to wait for workers to hang up before closing anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How stale `/status` and the worker gauges may get while nothing happens but heartbeats.
const STATUS_PERIOD: Duration = Duration::from_millis(500);
/// After the run finishes, how long the last evaluation and deployment may take.
const DEPLOY_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

pub struct CoordinatorOptions {
    pub config: Config,
    /// Bound and ready to accept.
    pub endpoint: quinn::Endpoint,
    pub resume: Option<ResumeFrom>,
    pub metrics: CoordinatorMetrics,
    /// Print progress lines to stdout.
    pub show_progress: bool,
    /// Kept up to date for `GET /status`.
    pub status: SharedStatus,
    /// Where the coordinator's `/metrics` is served, if it is: listed in the run's Prometheus
    /// targets file with the workers' and the serving replicas'.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub ok: bool,
    pub error: Option<String>,
    pub run_dir: PathBuf,
    pub snapshot: Snapshot,
}

pub enum CoordinatorMsg {
    Core(Event),
    /// A crashed child's backoff is over: start it again. Scheduled (never slept on in the
    /// supervision handler, which would hold up every other message, heartbeats included).
    Restart {
        child: Supervised,
        reason: String,
    },
    /// The timer armed for the core's `deadline` (see `CoordinatorState::arm_timer`) fired.
    Timeout {
        deadline: Instant,
    },
    /// A session passed the handshake.
    Joined {
        id: WorkerId,
        info: Capabilities,
        session: ActorRef<SessionMsg>,
    },
    /// Drain time is up: stop even if some worker has not hung up.
    ForceStop,
    /// The Evaluator's results for a checkpoint.
    Evaluated(Box<Evaluation>),
    /// From the Evaluator: a message for an eval worker.
    SendToWorker {
        id: WorkerId,
        msg: ToWorker,
    },
    /// From the Evaluator: an eval worker that stopped answering.
    DisconnectWorker {
        id: WorkerId,
        reason: String,
    },
    EvaluationFailed {
        step: u64,
        error: String,
    },
    /// The Evaluator left a checkpoint unevaluated, and says why.
    EvaluationSkipped {
        step: u64,
        reason: String,
    },
    /// The Deployer's decision on an evaluated checkpoint.
    Deployed(Decision),
    DeployFailed {
        step: u64,
        error: String,
    },
    /// The last evaluation and deployment took too long: stop without them.
    DeployDrainTimeout,
}

/// Steps whose checkpoints retention must keep (shared with the Checkpointer).
type Pinned = Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>;

/// A checkpoint on its way from commit to the registry, kept to resend after a crash of the
/// actor handling it.
#[derive(Debug, Clone)]
enum Release {
    Evaluating(EvalJob),
    Deploying { job: EvalJob, results: EvalResults },
}

pub struct Coordinator;

pub struct CoordinatorArgs {
    options: CoordinatorOptions,
    done: oneshot::Sender<RunOutcome>,
}

pub struct CoordinatorState {
    core: Core,
    config: Config,
    sessions: HashMap<WorkerId, ActorRef<SessionMsg>>,
    session_ids: HashMap<ActorId, WorkerId>,
    checkpointer: ActorRef<CheckpointerMsg>,
    checkpointer_restarts: Restarts,
    /// Children that died and whose restart is scheduled: work for them waits for it.
    restarting: std::collections::BTreeSet<Supervised>,
    /// Commits sent to the Checkpointer and not answered yet, kept to resend after a crash.
    commits_in_flight: BTreeMap<u64, (u64, u32, Vec<FileDigest>)>,
    evaluator: ActorRef<EvaluatorMsg>,
    deployer: ActorRef<DeployerMsg>,
    evaluator_restarts: Restarts,
    deployer_restarts: Restarts,
    /// The step each of them is handling (see `super::IDLE`).
    evaluator_current: Arc<AtomicU64>,
    deployer_current: Arc<AtomicU64>,
    /// Validation losses and committed checkpoints by step, until both are known.
    measured: BTreeMap<u64, (f64, u64)>,
    /// Steps whose evaluation the core gave to an eval worker: their checkpoints go to the
    /// Evaluator as soon as they are committed.
    off_path: BTreeSet<u64>,
    /// Connected eval workers (a restarted Evaluator is told about them).
    eval_workers: BTreeSet<WorkerId>,
    /// Eval workers were told to stop (the run is over and released).
    eval_workers_stopped: bool,
    committed: BTreeMap<u64, String>,
    /// Checkpoints being evaluated or deployed; the run ends only when this is empty.
    releases: BTreeMap<u64, Release>,
    /// Their steps, which checkpoint retention keeps until the release is over.
    pinned: Pinned,
    /// Workers that did not hang up within the drain time are no longer waited for.
    sessions_forced: bool,
    events: EventLog,
    metrics: CoordinatorMetrics,
    progress: Option<Progress>,
    outcome: Option<RunOutcome>,
    done: Option<oneshot::Sender<RunOutcome>>,
    status: SharedStatus,
    scrape_targets: ScrapeTargets,
    /// The deadline of the core's timer armed last (`None` once it fired): a timer is armed
    /// again only for an earlier deadline.
    timer: Option<Instant>,
    /// When the status and gauges were last rebuilt (see `apply`).
    status_at: Option<Instant>,
}

/// Runs a whole training run; returns when it is finished (or failed).
pub async fn run_coordinator(options: CoordinatorOptions) -> anyhow::Result<RunOutcome> {
    let endpoint = options.endpoint.clone();
    let (done_tx, done_rx) = oneshot::channel();
    let (coordinator, handle) = Actor::spawn(Some("coordinator".into()), Coordinator, CoordinatorArgs { options, done: done_tx }).await?;
    let shutdown = coordinator.clone();
    let signals = tokio::spawn(async move {
        troupe_common::signals::shutdown_signal().await;
        troupe_common::say_err!("shutdown requested: finishing the current step, writing a checkpoint, stopping the workers");
        let _ = shutdown.cast(CoordinatorMsg::Core(Event::ShutdownRequested));
    });
    let outcome = done_rx.await;
    signals.abort();
    let _ = handle.await;
    endpoint.close(troupe_common::net::close::SHUTDOWN, b"run finished");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    outcome.map_err(|_| anyhow::anyhow!("the coordinator stopped without an outcome"))
}

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(&self, me: ActorRef<CoordinatorMsg>, args: CoordinatorArgs) -> Result<CoordinatorState, ActorProcessingErr> {
        let CoordinatorOptions { config, endpoint, resume, metrics, show_progress, status, metrics_addr } = args.options;
        let scrape_targets = ScrapeTargets::new(&config, metrics_addr);
        let events = EventLog::open(&config.run_dir())?;
        let pinned = Pinned::default();
        let checkpointer = spawn_checkpointer(&me, &config, &pinned).await?;
        let evaluator_current = Arc::new(AtomicU64::new(super::IDLE));
        let deployer_current = Arc::new(AtomicU64::new(super::IDLE));
        let evaluator = spawn_evaluator(&me, &config, &evaluator_current, &BTreeSet::new()).await?;
        let deployer = spawn_deployer(&me, &config, &deployer_current).await?;
        Actor::spawn_linked(
            Some("gateway".into()),
            Gateway,
            GatewayArgs {
                endpoint,
                coordinator: me.clone(),
                token: config.cluster.token.clone(),
                heartbeat: Duration::from_millis(config.cluster.heartbeat_ms),
                metrics: metrics.clone(),
            },
            me.get_cell(),
        )
        .await?;
        let progress = show_progress.then(|| Progress::new(config.train.steps));
        let mut core = Core::new(config.clone(), resume);
        if !config.checkpoint.store.is_empty() {
            // Checkpoint attempts in the store are named by step and generation: this
            // coordinator's generations start above every earlier one's.
            let (url, run) = (config.checkpoint.store.clone(), config.run.name.clone());
            let highest = tokio::task::spawn_blocking(move || {
                troupe_common::checkpoint::store::CheckpointStore::open(&url, &run)?.highest_generation()
            })
            .await?
            .map_err(|e| format!("cannot list the checkpoint store: {e}"))?;
            core.start_generations_after(highest);
        }
        Ok(CoordinatorState {
            core,
            config,
            sessions: HashMap::new(),
            session_ids: HashMap::new(),
            checkpointer,
            checkpointer_restarts: Restarts::default(),
            restarting: Default::default(),
            commits_in_flight: BTreeMap::new(),
            evaluator,
            deployer,
            evaluator_restarts: Restarts::default(),
            deployer_restarts: Restarts::default(),
            evaluator_current,
            deployer_current,
            measured: BTreeMap::new(),
            off_path: BTreeSet::new(),
            eval_workers: BTreeSet::new(),
            eval_workers_stopped: false,
            committed: BTreeMap::new(),
            releases: BTreeMap::new(),
            pinned,
            sessions_forced: false,
            events,
            metrics,
            progress,
            outcome: None,
            done: Some(args.done),
            status,
            scrape_targets,
            timer: None,
            status_at: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Core(event) => {
                let commit_ended = matches!(event, Event::CheckpointCommitted { .. } | Event::CheckpointCommitFailed { .. });
                if let Event::CheckpointCommitted { step, .. } | Event::CheckpointCommitFailed { step, .. } = &event {
                    state.commits_in_flight.remove(step);
                }
                state.apply(&me, event);
                if commit_ended {
                    // A run that ended while a checkpoint was being committed stops now.
                    state.maybe_stop(&me);
                }
            }
            CoordinatorMsg::Restart { child, reason } => {
                state.restarting.remove(&child);
                match child {
                    Supervised::Checkpointer if state.outcome.is_none() => state.restart_checkpointer(&me, reason).await?,
                    Supervised::Checkpointer => {}
                    Supervised::Evaluator => state.restart_release_actor(&me, "evaluator", reason).await?,
                    Supervised::Deployer => state.restart_release_actor(&me, "deployer", reason).await?,
                }
            }
            CoordinatorMsg::Timeout { deadline } => {
                if state.timer == Some(deadline) {
                    state.timer = None;
                }
                // `apply` re-arms from the core's next deadline.
                state.apply(&me, Event::Timeout);
            }
            CoordinatorMsg::Joined { id, info, session } => {
                if let Some(p) = &state.progress {
                    p.line(&format!("worker {id} connected from {} ({}, pid {})", info.peer_addr, info.hostname, info.pid));
                }
                state.session_ids.insert(session.get_id(), id);
                state.sessions.insert(id, session);
                state.apply(&me, Event::WorkerJoined { id, info });
            }
            CoordinatorMsg::SendToWorker { id, msg } => state.execute(&me, Command::Send { to: id, msg }),
            CoordinatorMsg::DisconnectWorker { id, reason } => state.execute(&me, Command::Disconnect { id, reason }),
            CoordinatorMsg::ForceStop => {
                state.sessions_forced = true;
                state.maybe_stop(&me);
            }
            CoordinatorMsg::Evaluated(evaluation) => {
                let Evaluation { job, results, by, per_source } = *evaluation;
                let step = job.step;
                if !matches!(state.releases.get(&step), Some(Release::Evaluating(_))) {
                    return Ok(()); // an answer to a job given up after a crash
                }
                if by != MeasuredBy::Ranks {
                    // Measured off the training path: the run's record of the loss is this.
                    let per_source = per_source
                        .iter()
                        .filter(|p| p.sequences > 0)
                        .map(|p| (p.source.clone(), p.loss_sum / p.sequences as f64))
                        .collect();
                    state.record(RunEvent::Eval { step, val_loss: results.val_loss, sequences: results.sequences, per_source });
                    state.apply(&me, Event::MeasuredOffPath { step, val_loss: results.val_loss });
                }
                state.record(RunEvent::Evaluated {
                    step,
                    checkpoint: job.checkpoint.display().to_string(),
                    val_loss: results.val_loss,
                    perplexity: results.perplexity,
                    samples: results.samples.clone(),
                    tasks: results.tasks.clone(),
                    by: by.to_string(),
                });
                if state.config.deploy.enabled {
                    state.releases.insert(step, Release::Deploying { job: job.clone(), results: results.clone() });
                    let candidate = DeployerMsg::Candidate { step, checkpoint: job.checkpoint, results };
                    // While the Deployer is being restarted, the candidate waits for it (the
                    // restart sends every queued release again).
                    if state.deployer.cast(candidate).is_err() && !state.restarting.contains(&Supervised::Deployer) {
                        state.release_done(
                            &me,
                            RunEvent::Deployed {
                                step,
                                action: "failed".into(),
                                version: None,
                                reason: "the Deployer is not running".into(),
                            },
                        );
                    }
                } else {
                    state.releases.remove(&step);
                    state.pin_releases();
                    state.maybe_stop(&me);
                }
            }
            CoordinatorMsg::EvaluationFailed { step, error } => {
                if !matches!(state.releases.get(&step), Some(Release::Evaluating(_))) {
                    return Ok(());
                }
                state.release_done(
                    &me,
                    RunEvent::Warning { step, message: format!("evaluating the checkpoint of step {step} failed: {error}") },
                );
            }
            CoordinatorMsg::EvaluationSkipped { step, reason } => {
                if !matches!(state.releases.get(&step), Some(Release::Evaluating(_))) {
                    return Ok(());
                }
                state.release_done(
                    &me,
                    RunEvent::Warning { step, message: format!("the checkpoint of step {step} is not evaluated: {reason}") },
                );
            }
            CoordinatorMsg::Deployed(d) => {
                if !matches!(state.releases.get(&d.step), Some(Release::Deploying { .. })) {
                    return Ok(());
                }
                state.release_done(&me, RunEvent::Deployed { step: d.step, action: d.action.into(), version: d.version, reason: d.reason });
            }
            CoordinatorMsg::DeployFailed { step, error } => {
                if !matches!(state.releases.get(&step), Some(Release::Deploying { .. })) {
                    return Ok(());
                }
                state.release_done(&me, RunEvent::Deployed { step, action: "failed".into(), version: None, reason: error });
            }
            CoordinatorMsg::DeployDrainTimeout => {
                if !state.commits_in_flight.is_empty() {
                    tracing::warn!("a checkpoint commit did not finish within {:?}; stopping without it", state.drain_timeout());
                    state.commits_in_flight.clear();
                }
                if !state.releases.is_empty() {
                    tracing::warn!("the last evaluation/deployment did not finish within {:?}; stopping without it", state.drain_timeout());
                    state.releases.clear();
                    state.pin_releases();
                }
                state.maybe_stop(&me);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<CoordinatorMsg>,
        event: SupervisionEvent,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason): (ActorCell, String) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            _ => return Ok(()),
        };
        if let Some(id) = state.session_ids.remove(&cell.get_id()) {
            state.sessions.remove(&id);
            state.apply(&me, Event::WorkerLost { id, reason });
            state.maybe_stop(&me);
        } else if cell.get_id() == state.checkpointer.get_id() && state.outcome.is_none() {
            state.schedule_restart(&me, Supervised::Checkpointer, reason);
        } else if cell.get_id() == state.evaluator.get_id() {
            state.schedule_restart(&me, Supervised::Evaluator, reason);
        } else if cell.get_id() == state.deployer.get_id() {
            state.schedule_restart(&me, Supervised::Deployer, reason);
        }
        Ok(())
    }

    async fn post_stop(&self, me: ActorRef<CoordinatorMsg>, state: &mut CoordinatorState) -> Result<(), ActorProcessingErr> {
        me.stop_children(None);
        state.scrape_targets.remove();
        let mut outcome = state.outcome.take().unwrap_or_else(|| RunOutcome {
            ok: false,
            error: Some("the coordinator stopped before the run finished".into()),
            run_dir: state.config.run_dir(),
            snapshot: state.core.snapshot(),
        });
        // The last checkpoint's loss, measured off the training path after the run finished.
        outcome.snapshot.last_val_loss = state.core.snapshot().last_val_loss;
        if let Some(done) = state.done.take() {
            let _ = done.send(outcome);
        }
        Ok(())
    }
}

impl CoordinatorState {
    fn apply(&mut self, me: &ActorRef<CoordinatorMsg>, event: Event) {
        let now = Instant::now();
        let commands = self.core.on(now, event);
        let changed = !commands.is_empty();
        for command in commands {
            self.execute(me, command);
        }
        // The status and the gauges cost O(workers) to build. Most events (heartbeats, all
        // but the last rank's report of a step) change nothing the core acts on: rebuilding
        // them after each would cost O(workers²) per step (`cargo bench --bench
        // coordinator_load`). They are rebuilt when the core acted, else at most every
        // STATUS_PERIOD (so heartbeat ages stay fresh); the scrape targets change only with
        // membership, which always comes with commands.
        if changed || self.status_at.is_none_or(|at| now.saturating_duration_since(at) >= STATUS_PERIOD) {
            self.status_at = Some(now);
            self.update_worker_gauges();
            self.publish_status();
        }
        if changed {
            self.update_scrape_targets();
        }
        self.arm_timer(me);
    }

    /// Arms a timer for the core's next deadline (a lease expiry, a gathering deadline), as
    /// quinn-proto's `poll_timeout` is driven: no periodic tick. Only the core's events move
    /// that deadline, and every one goes through `apply`, which calls this after it. One timer
    /// is armed at a time, replaced (not cancelled) when the deadline comes earlier; a later
    /// deadline keeps the armed one, which then fires early. Early or stale firings are
    /// harmless: the core does nothing on a Timeout before its deadlines, and the firing
    /// re-arms from the deadline it has then.
    fn arm_timer(&mut self, me: &ActorRef<CoordinatorMsg>) {
        let Some(deadline) = self.core.poll_timeout() else { return };
        if self.timer.is_some_and(|armed| armed <= deadline) {
            return;
        }
        self.timer = Some(deadline);
        me.send_after(deadline.saturating_duration_since(Instant::now()), move || CoordinatorMsg::Timeout { deadline });
    }

    fn update_scrape_targets(&mut self) {
        let trainers = self.core.workers().values().map(|w| &w.info);
        let workers: Vec<WorkerEndpoints> = trainers
            .chain(self.core.eval_workers().map(|(_, info)| info))
            .map(|info| WorkerEndpoints { metrics: info.metrics_addr, peer: info.peer_addr })
            .collect();
        self.scrape_targets.update(&workers);
    }

    fn publish_status(&self) {
        let status = run_status(&self.core, &self.config.run.name, Instant::now());
        if let Ok(mut shared) = self.status.write() {
            *shared = status;
        }
    }

    fn execute(&mut self, me: &ActorRef<CoordinatorMsg>, command: Command) {
        match command {
            Command::Send { to, msg } => {
                if let Some(session) = self.sessions.get(&to) {
                    let _ = session.cast(SessionMsg::Send(msg));
                }
            }
            Command::Disconnect { id, reason } => {
                if let Some(session) = self.sessions.get(&id) {
                    let _ = session.cast(SessionMsg::Disconnect(reason));
                }
            }
            Command::CommitCheckpoint { step, generation, world_size, files } => {
                self.commits_in_flight.insert(step, (generation, world_size, files.clone()));
                let sent = self.checkpointer.cast(CheckpointerMsg::Commit { step, generation, world_size, files }).is_ok();
                // While the Checkpointer is being restarted, the commit waits in
                // commits_in_flight (the restart sends them again).
                if !sent && !self.restarting.contains(&Supervised::Checkpointer) {
                    self.commits_in_flight.remove(&step);
                    let error = "the Checkpointer is not running".to_string();
                    let _ = me.cast(CoordinatorMsg::Core(Event::CheckpointCommitFailed { step, error }));
                }
            }
            Command::DiscardCheckpoint { step, generation } => {
                let tmp = troupe_common::checkpoint::tmp_dir(&self.config.run_dir(), step, generation);
                tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&tmp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot remove {} of a failed checkpoint: {e}", tmp.display()),
                });
            }
            Command::Record(event) => self.record(event),
            Command::EvaluateOffPath { step } => {
                self.off_path.insert(step);
                // Its checkpoint may already be committed (an evaluation redone after a regroup).
                self.try_release(step);
            }
            Command::ToEvaluator(note) => {
                match &note {
                    EvaluatorNote::Joined { id, .. } => {
                        self.eval_workers.insert(*id);
                        if self.eval_workers_stopped {
                            // Came after the run was released: nothing left for it.
                            if let Some(session) = self.sessions.get(id) {
                                let _ = session.cast(SessionMsg::Send(ToWorker::Stop { reason: "the run is over".into() }));
                            }
                        }
                    }
                    EvaluatorNote::Lost { id, .. } => {
                        self.eval_workers.remove(id);
                    }
                    _ => {}
                }
                // While the Evaluator is being restarted, the restart tells it who is connected.
                let _ = self.evaluator.cast(EvaluatorMsg::EvalWorker(note));
            }
            Command::Finish { ok, error } => {
                self.outcome = Some(RunOutcome { ok, error, run_dir: self.config.run_dir(), snapshot: self.core.snapshot() });
                // Workers hang up when they get Stop, and the last checkpoint is still being
                // evaluated and deployed; wait for both, but not forever.
                if !self.sessions.is_empty() {
                    me.send_after(DRAIN_TIMEOUT, || CoordinatorMsg::ForceStop);
                }
                // A checkpoint every rank wrote is committed even when the run has failed: it
                // is what a resume starts from.
                if !self.releases.is_empty() || !self.commits_in_flight.is_empty() {
                    me.send_after(self.drain_timeout(), || CoordinatorMsg::DeployDrainTimeout);
                }
                self.maybe_stop(me);
            }
        }
    }

    fn record(&mut self, event: RunEvent) {
        if let Err(e) = self.events.append(&event) {
            tracing::warn!("cannot append to {}: {e}", self.events.path().display());
        }
        let m = &self.metrics;
        match &event {
            RunEvent::Step { step, loss, lr, tokens_per_sec, step_seconds, comm_seconds, .. } => {
                m.step.set(*step as i64 + 1);
                m.train_loss.set(*loss);
                m.learning_rate.set(*lr);
                m.tokens_per_second.set(*tokens_per_sec);
                m.step_seconds.observe(*step_seconds);
                m.allreduce_seconds.observe(*comm_seconds);
            }
            RunEvent::Eval { val_loss, per_source, .. } => {
                m.eval_loss.set(*val_loss);
                for (source, loss) in per_source {
                    m.eval_loss_by_source.with_label_values(&[source.as_str()]).set(*loss);
                }
            }
            RunEvent::Evaluated { perplexity, tasks, .. } => {
                m.eval_perplexity.set(*perplexity);
                for (metric, score) in tasks {
                    m.eval_task_score.with_label_values(&[metric.as_str()]).set(*score);
                }
            }
            RunEvent::Deployed { action, version, .. } => {
                m.deploys_total.with_label_values(&[action.as_str()]).inc();
                if let Some(v) = version {
                    m.deployed_version.set(i64::from(*v));
                }
            }
            RunEvent::Regrouped { seconds, .. } => {
                m.regroups_total.inc();
                m.regroup_seconds.observe(*seconds);
            }
            RunEvent::Checkpoint { seconds, .. } => {
                m.checkpoint_seconds.observe(*seconds);
                m.checkpoint_failures_in_a_row.set(0);
            }
            RunEvent::CheckpointFailed { step, error, in_a_row } => {
                m.checkpoint_failures_total.inc();
                m.checkpoint_failures_in_a_row.set(i64::from(*in_a_row));
                tracing::error!("checkpoint at step {step} failed ({in_a_row} in a row): {error}");
            }
            RunEvent::StepSkipped { step, reason, ranks, in_a_row, .. } => {
                m.steps_skipped_total.with_label_values(&[reason.as_str()]).inc();
                tracing::warn!("step {step} skipped on every rank ({reason}, {in_a_row} in a row); non-finite values from ranks {ranks:?}");
            }
            RunEvent::RankDisagreed { step, rank, what } => {
                m.rank_disagreements_total.inc();
                tracing::warn!("rank {rank} disagrees with the other ranks about step {step}: {what}");
            }
            _ => {}
        }
        if let Some(p) = self.progress.as_mut() {
            p.show(&event);
        }
        self.start_release(&event);
    }

    /// A checkpoint goes to the Evaluator once it is committed and its validation loss is
    /// known (the two arrive in either order), or, when an eval worker is to measure it, as
    /// soon as it is committed.
    fn start_release(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Eval { step, val_loss, sequences, .. } => {
                self.measured.insert(*step, (*val_loss, *sequences));
                self.try_release(*step);
            }
            RunEvent::Checkpoint { step, path, .. } => {
                self.committed.insert(*step, path.clone());
                self.try_release(*step);
            }
            _ => {}
        }
    }

    fn try_release(&mut self, step: u64) {
        let Some(path) = self.committed.get(&step) else { return };
        let measured = match self.measured.get(&step) {
            Some(&measured) => Some(measured),
            None if self.off_path.contains(&step) => None,
            None => return,
        };
        let job = EvalJob { step, checkpoint: PathBuf::from(path), measured };
        // Older halves will never be matched.
        self.measured.retain(|s, _| *s > step);
        self.committed.retain(|s, _| *s > step);
        self.off_path.retain(|s| *s > step);
        self.releases.insert(step, Release::Evaluating(job.clone()));
        self.pin_releases();
        if self.evaluator.cast(EvaluatorMsg::Evaluate(job)).is_err() && !self.restarting.contains(&Supervised::Evaluator) {
            self.releases.remove(&step);
            self.pin_releases();
            tracing::warn!("the Evaluator is not running; the checkpoint of step {step} is not evaluated");
        }
    }

    /// A checkpoint's release is over (deployed, skipped or failed): record it, and stop if
    /// the run was only waiting for this.
    fn release_done(&mut self, me: &ActorRef<CoordinatorMsg>, event: RunEvent) {
        self.releases.remove(&event.step());
        self.pin_releases();
        self.record(event);
        self.maybe_stop(me);
    }

    /// Tells checkpoint retention which checkpoints are still in use.
    fn pin_releases(&self) {
        if let Ok(mut pinned) = self.pinned.lock() {
            *pinned = self.releases.keys().copied().collect();
        }
    }

    /// How long the coordinator waits, once the run is over, for the last commits and
    /// releases: with eval workers, also as long as one may take before its job is given to
    /// the coordinator (`eval.worker_timeout_s` + `eval.worker_grace_s`).
    fn drain_timeout(&self) -> Duration {
        let off_path = self.releases.values().any(|r| matches!(r, Release::Evaluating(job) if job.measured.is_none()));
        if off_path || !self.eval_workers.is_empty() || !self.off_path.is_empty() {
            let eval = &self.config.eval;
            DEPLOY_DRAIN_TIMEOUT + Duration::from_secs(eval.worker_timeout_s + eval.worker_grace_s)
        } else {
            DEPLOY_DRAIN_TIMEOUT
        }
    }

    fn maybe_stop(&mut self, me: &ActorRef<CoordinatorMsg>) {
        if self.outcome.is_none() || !self.releases.is_empty() || !self.commits_in_flight.is_empty() {
            return;
        }
        if !self.eval_workers_stopped {
            // Nothing is left to evaluate: the eval workers may go.
            self.eval_workers_stopped = true;
            for command in self.core.stop_eval_workers("the run is over") {
                self.execute(me, command);
            }
            self.publish_status();
        }
        if self.sessions.is_empty() || self.sessions_forced {
            me.stop(None);
        }
    }

    fn update_worker_gauges(&self) {
        let phase = self.core.phase();
        let mut by_state: BTreeMap<&'static str, i64> =
            ["forming", "ready", "syncing", "training", "waiting", "leaving", "idle"].into_iter().map(|s| (s, 0)).collect();
        for w in self.core.workers().values() {
            *by_state.entry(w.state_name(phase)).or_default() += 1;
        }
        for (state, n) in by_state {
            self.metrics.workers.with_label_values(&[state]).set(n);
        }
        let snap = self.core.snapshot();
        self.metrics.world_size.set(snap.world_size as i64);
        self.metrics.generation.set(snap.generation as i64);
        self.metrics.paused.set(i64::from(phase == Phase::Paused));
    }
}

/// What `GET /status` shows: built from the core (O(workers)).
pub fn run_status(core: &Core, run: &str, now: Instant) -> RunStatus {
    let snap = core.snapshot();
    let phase = snap.phase.name().to_string();
    let workers = core
        .workers()
        .iter()
        .map(|(id, w)| WorkerStatus {
            worker_id: *id,
            rank: w.rank,
            addr: w.info.peer_addr.to_string(),
            hostname: w.info.hostname.clone(),
            state: w.state_name(snap.phase).into(),
            last_heartbeat_ms: now.saturating_duration_since(w.last_seen).as_millis() as u64,
            step_seconds: w.last_step_seconds,
            metrics: w.info.metrics_addr.map(|a| format!("http://{a}/metrics")),
        })
        .collect();
    RunStatus {
        run: run.to_string(),
        phase,
        step: snap.completed_steps,
        total_steps: snap.total_steps,
        loss: snap.last_loss,
        val_loss: snap.last_val_loss,
        tokens_per_second: snap.last_tokens_per_second,
        last_checkpoint: snap.last_checkpoint,
        world_size: snap.world_size as u32,
        generation: snap.generation,
        checkpoint_failures_in_a_row: snap.checkpoint_failures_in_a_row,
        skipped_steps_in_a_row: snap.skipped_steps_in_a_row,
        workers,
        eval_workers: core.eval_workers().count() as u32,
    }
}
