//! Deployer: applies the deploy policy to every evaluated checkpoint.
//!
//! A checkpoint whose validation loss beats the bar — the newest live version's (the canary's
//! while one runs, else the stable one's) — by at least `deploy.min_improvement` is published
//! to the registry as the next version, directly or as a canary (`deploy.strategy`), and the
//! serving replicas in `deploy.notify` are told to look. Anything else is recorded as skipped
//! with the numbers. The registry's own protocol (a `.tmp-*` folder renamed into place, the
//! state replaced atomically, all under its lock) keeps it consistent if this actor dies
//! half-way; the next publish removes the leftovers.

use super::coordinator::CoordinatorMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::path::PathBuf;
use std::time::Duration;
use troupe_common::fault::FaultHook;
use troupe_common::registry::{version_name, EvalResults, Registry, Rollout};
use troupe_core::config::DeployConfig;
use troupe_core::secret::Secret;

pub struct Deployer;

pub struct DeployerArgs {
    pub registry: PathBuf,
    pub run: String,
    pub config: DeployConfig,
    /// Bearer token of the serving replicas' admin API (their admin key, else their API key),
    /// if they need one.
    pub admin_key: Option<Secret>,
    pub coordinator: ActorRef<CoordinatorMsg>,
    /// The step of the candidate being handled (`super::IDLE` between candidates).
    pub current: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

pub enum DeployerMsg {
    Candidate { step: u64, checkpoint: PathBuf, results: EvalResults },
}

/// What became of a candidate.
#[derive(Debug, Clone)]
pub struct Decision {
    pub step: u64,
    /// published, skipped.
    pub action: &'static str,
    pub version: Option<u32>,
    pub reason: String,
}

impl Actor for Deployer {
    type Msg = DeployerMsg;
    type State = DeployerArgs;
    type Arguments = DeployerArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: DeployerArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let DeployerMsg::Candidate { step, checkpoint, results } = msg;
        state.current.store(step, std::sync::atomic::Ordering::SeqCst);
        let registry = state.registry.clone();
        let run = state.run.clone();
        let config = state.config.clone();
        let decision = tokio::task::spawn_blocking(move || consider(&registry, &run, &config, step, &checkpoint, &results)).await;
        let decision = match decision {
            Ok(Ok(decision)) => decision,
            Ok(Err(e)) => {
                state.coordinator.cast(CoordinatorMsg::DeployFailed { step, error: format!("{e:#}") })?;
                state.current.store(super::IDLE, std::sync::atomic::Ordering::SeqCst);
                return Ok(());
            }
            // A panic in the publishing thread is this actor's failure: the supervisor restarts it.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        if decision.version.is_some() {
            notify_replicas(&state.config.notify, state.admin_key.as_ref()).await;
        }
        state.coordinator.cast(CoordinatorMsg::Deployed(decision))?;
        state.current.store(super::IDLE, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The deploy policy for one evaluated checkpoint: publish it if it beats the live version, else
/// say why not. Also what `troupe sweep --deploy` applies to the best trial's best checkpoint.
/// A registry in object storage that another writer changed meanwhile is read again and the
/// decision taken again (a few times).
pub fn consider(
    registry_dir: &std::path::Path,
    run: &str,
    config: &DeployConfig,
    step: u64,
    checkpoint: &std::path::Path,
    results: &EvalResults,
) -> anyhow::Result<Decision> {
    let mut attempt = 0;
    loop {
        match consider_once(registry_dir, run, config, step, checkpoint, results) {
            Err(e) if attempt < 4 && matches!(e.downcast_ref(), Some(troupe_common::registry::RegistryError::Conflict(_))) => {
                tracing::info!("{e}");
                attempt += 1;
            }
            decided => return decided,
        }
    }
}

fn consider_once(
    registry_dir: &std::path::Path,
    run: &str,
    config: &DeployConfig,
    step: u64,
    checkpoint: &std::path::Path,
    results: &EvalResults,
) -> anyhow::Result<Decision> {
    if !results.val_loss.is_finite() {
        return Ok(Decision { step, action: "skipped", version: None, reason: format!("val loss {} is not finite", results.val_loss) });
    }
    let metric = config.metric.as_str();
    let Some(mine) = metric_of(metric, results).filter(|v| v.is_finite()) else {
        return Ok(Decision {
            step,
            action: "skipped",
            version: None,
            reason: format!("it has no {metric} to judge it by (deploy.metric; task scores need eval.task_items > 0)"),
        });
    };
    let registry = Registry::create(registry_dir)?;
    let state = registry.state()?;
    let (bar_version, bar) = match state.canary.as_ref().map(|c| c.version).or(state.stable) {
        Some(v) => (Some(v), registry.eval_results(v)?.and_then(|e| metric_of(metric, &e))),
        None => (None, None),
    };
    // The loss is better lower, a task's score higher.
    let lower_is_better = metric == "val_loss";
    if let Some(bar) = bar {
        let improvement = if lower_is_better { bar - mine } else { mine - bar };
        if !(improvement > 0.0 && improvement >= config.min_improvement) {
            return Ok(Decision {
                step,
                action: "skipped",
                version: None,
                reason: format!(
                    "{metric} {mine:.4} does not beat {}'s {bar:.4} by {} (deploy.min_improvement)",
                    bar_version.map_or("the serving version".into(), version_name),
                    if config.min_improvement > 0.0 { format!("at least {}", config.min_improvement) } else { "any margin".into() }
                ),
            });
        }
    }
    let rollout = match config.strategy.as_str() {
        "canary" => Rollout::Canary {
            fraction: config.canary_fraction,
            requests: config.canary_requests,
            max_error_rate_increase: config.canary_max_error_rate_increase,
            max_p95_ratio: config.canary_max_p95_ratio,
        },
        _ => Rollout::Direct,
    };
    static PANIC: FaultHook = FaultHook::new("TROUPE_FAULT_DEPLOYER_PANIC_AT_STEP");
    let version = registry.publish(checkpoint, Some(results), run, &rollout, "deployer", || {
        if PANIC.fires_at(step) {
            panic!("fault injection: the Deployer dies half-way through publishing the checkpoint of step {step}");
        }
    })?;
    let live = registry.state()?;
    let how = if live.canary.as_ref().is_some_and(|c| c.version == version) { "as a canary" } else { "as the stable version" };
    let reason = match (bar_version, bar) {
        (Some(v), Some(bar)) => format!("{metric} {mine:.4} beats {}'s {bar:.4}; live {how}", version_name(v)),
        (Some(v), None) => format!("{metric} {mine:.4}, and {} has none to compare with; live {how}", version_name(v)),
        (None, _) => format!("{metric} {mine:.4}, the first version; live {how}"),
    };
    Ok(Decision { step, action: "published", version: Some(version), reason })
}

/// A checkpoint's score on `metric` (`deploy.metric`): its validation loss or a task's score.
fn metric_of(metric: &str, results: &EvalResults) -> Option<f64> {
    if metric == "val_loss" {
        Some(results.val_loss)
    } else {
        results.tasks.get(metric).copied()
    }
}

/// Tells each replica to read the registry now (`POST /admin/reload`). Best effort: replicas
/// poll the registry anyway.
async fn notify_replicas(urls: &[String], admin_key: Option<&Secret>) {
    for url in urls {
        let endpoint = format!("{}/admin/reload", url.trim_end_matches('/'));
        let key = admin_key.map(|k| k.expose().to_string());
        let result = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
            let mut request = agent.post(&endpoint);
            if let Some(key) = key {
                request = request.header("Authorization", format!("Bearer {key}"));
            }
            request.send_empty().map(|_| ()).map_err(|e| format!("{endpoint}: {e}"))
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!("cannot notify a serving replica ({e}); it will notice the new version on its own");
        }
    }
}
