//! The coordinator's supervised children (Checkpointer, Evaluator, Deployer): starting them,
//! and restarting one that died after a backoff that is scheduled, never slept on, so the
//! coordinator's mailbox (heartbeats, leases) never waits for it.

use super::*;

pub(super) async fn spawn_checkpointer(
    me: &ActorRef<CoordinatorMsg>,
    config: &Config,
    pinned: &Pinned,
) -> Result<ActorRef<CheckpointerMsg>, ActorProcessingErr> {
    let args = CheckpointerArgs {
        run_dir: config.run_dir(),
        keep_last: config.checkpoint.keep_last,
        store: (!config.checkpoint.store.is_empty()).then(|| (config.checkpoint.store.clone(), config.run.name.clone())),
        coordinator: me.clone(),
        pinned: pinned.clone(),
    };
    let (actor, _) = Actor::spawn_linked(Some("checkpointer".into()), Checkpointer, args, me.get_cell()).await?;
    Ok(actor)
}

pub(super) async fn spawn_evaluator(
    me: &ActorRef<CoordinatorMsg>,
    config: &Config,
    current: &Arc<AtomicU64>,
    eval_workers: &BTreeSet<WorkerId>,
) -> Result<ActorRef<EvaluatorMsg>, ActorProcessingErr> {
    current.store(crate::actors::IDLE, Ordering::SeqCst);
    let args =
        EvaluatorArgs { config: config.clone(), coordinator: me.clone(), current: current.clone(), eval_workers: eval_workers.clone() };
    let (actor, _) = Actor::spawn_linked(Some("evaluator".into()), Evaluator, args, me.get_cell()).await?;
    Ok(actor)
}

pub(super) async fn spawn_deployer(
    me: &ActorRef<CoordinatorMsg>,
    config: &Config,
    current: &Arc<AtomicU64>,
) -> Result<ActorRef<DeployerMsg>, ActorProcessingErr> {
    current.store(crate::actors::IDLE, Ordering::SeqCst);
    // The replicas' admin API takes their admin key if they have one, else their API key.
    let from_env = |name: &str| std::env::var(name).ok().filter(|k| !k.is_empty()).map(Secret::new);
    let admin_key = from_env("TROUPE_ADMIN_KEY")
        .or_else(|| config.serve.admin_key.non_empty().cloned())
        .or_else(|| from_env("TROUPE_API_KEY"))
        .or_else(|| config.serve.api_key.non_empty().cloned());
    let args = DeployerArgs {
        registry: config.registry_dir(),
        run: config.run.name.clone(),
        config: config.deploy.clone(),
        admin_key,
        coordinator: me.clone(),
        current: current.clone(),
    };
    let (actor, _) = Actor::spawn_linked(Some("deployer".into()), Deployer, args, me.get_cell()).await?;
    Ok(actor)
}

/// A supervised child of the coordinator that is restarted when it dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Supervised {
    Checkpointer,
    Evaluator,
    Deployer,
}

/// After this long without a crash, a child's restart backoff starts over.
const HEALTHY_PERIOD: Duration = Duration::from_secs(60);

/// A supervised child's recent crashes: the backoff before its next restart doubles with each
/// (200 ms up to 6.4 s), and starts over once it has run for [`HEALTHY_PERIOD`].
#[derive(Debug, Default)]
pub(super) struct Restarts {
    count: u32,
    last: Option<Instant>,
}

impl Restarts {
    /// Counts a crash now; the backoff before restarting.
    pub(super) fn crashed(&mut self, now: Instant) -> Duration {
        if self.last.is_some_and(|last| now.duration_since(last) >= HEALTHY_PERIOD) {
            self.count = 0;
        }
        self.count += 1;
        self.last = Some(now);
        Duration::from_millis(100 * 2u64.pow(self.count.min(6)))
    }
}

impl CoordinatorState {
    /// Counts a child's crash and schedules its restart after its backoff.
    pub(super) fn schedule_restart(&mut self, me: &ActorRef<CoordinatorMsg>, child: Supervised, reason: String) {
        let (name, restarts) = match child {
            Supervised::Checkpointer => ("checkpointer", &mut self.checkpointer_restarts),
            Supervised::Evaluator => ("evaluator", &mut self.evaluator_restarts),
            Supervised::Deployer => ("deployer", &mut self.deployer_restarts),
        };
        let backoff = restarts.crashed(Instant::now());
        self.restarting.insert(child);
        self.metrics.actor_restarts_total.with_label_values(&[name]).inc();
        tracing::warn!("{name} {reason}; restarting it in {backoff:?}");
        me.send_after(backoff, move || CoordinatorMsg::Restart { child, reason });
    }

    pub(super) async fn restart_checkpointer(&mut self, me: &ActorRef<CoordinatorMsg>, reason: String) -> Result<(), ActorProcessingErr> {
        self.record(RunEvent::Warning { step: self.core.snapshot().completed_steps, message: format!("Checkpointer {reason}; restarted") });
        self.checkpointer = spawn_checkpointer(me, &self.config, &self.pinned).await?;
        // Commits run in order, so the oldest one in flight is the one it crashed on: that
        // checkpoint is given up (the previous one stays the newest). The others were still
        // queued in the dead actor's mailbox; their files are intact, so they are sent again.
        let mut in_flight = std::mem::take(&mut self.commits_in_flight).into_iter();
        if let Some((step, _)) = in_flight.next() {
            let error = format!("the Checkpointer crashed while committing this checkpoint ({reason})");
            self.apply(me, Event::CheckpointCommitFailed { step, error });
        }
        for (step, (generation, world_size, files)) in in_flight {
            self.commits_in_flight.insert(step, (generation, world_size, files.clone()));
            let _ = self.checkpointer.cast(CheckpointerMsg::Commit { step, generation, world_size, files });
        }
        Ok(())
    }

    /// Restarts a crashed Evaluator or Deployer. The job it was on (its `current` cell says
    /// which) is given up and recorded; jobs after it were still queued in the dead actor's
    /// mailbox and are sent again; jobs before it were answered (their answers may still be
    /// in this mailbox, behind the supervision event) and are left alone, except jobs for eval
    /// workers, which the Evaluator held whatever their order.
    pub(super) async fn restart_release_actor(
        &mut self,
        me: &ActorRef<CoordinatorMsg>,
        actor: &'static str,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let evaluator = actor == "evaluator";
        let current = if evaluator { &self.evaluator_current } else { &self.deployer_current }.load(Ordering::SeqCst);
        let mine = |r: &Release| if evaluator { matches!(r, Release::Evaluating(_)) } else { matches!(r, Release::Deploying { .. }) };
        // Jobs for eval workers were held by the dead actor whatever their step (one sent, the
        // others waiting): every one but the job it died on is sent again.
        let off_path = |r: &Release| matches!(r, Release::Evaluating(job) if job.measured.is_none());
        let queued: Vec<Release> = self
            .releases
            .iter()
            .filter(|(step, r)| mine(r) && (current == crate::actors::IDLE || **step > current || (off_path(r) && **step != current)))
            .map(|(_, r)| r.clone())
            .collect();
        if evaluator {
            self.evaluator = spawn_evaluator(me, &self.config, &self.evaluator_current, &self.eval_workers).await?;
        } else {
            self.deployer = spawn_deployer(me, &self.config, &self.deployer_current).await?;
        }
        if current != crate::actors::IDLE && self.releases.get(&current).is_some_and(mine) {
            let message = format!("the {actor} crashed while handling the checkpoint of step {current} ({reason}); restarted");
            self.release_done(me, RunEvent::Deployed { step: current, action: "failed".into(), version: None, reason: message });
        }
        for job in queued {
            let _ = match job {
                Release::Evaluating(job) => self.evaluator.cast(EvaluatorMsg::Evaluate(job)).map_err(|_| ()),
                Release::Deploying { job, results } => {
                    self.deployer.cast(DeployerMsg::Candidate { step: job.step, checkpoint: job.checkpoint, results }).map_err(|_| ())
                }
            };
        }
        Ok(())
    }
}
