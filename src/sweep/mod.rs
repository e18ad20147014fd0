//! `troupe sweep`: a hyperparameter search whose trials are whole troupe runs.
//!
//! Each trial is a whole troupe run (its own coordinator and workers) with the sweep's fixed
//! settings and the trial's parameters as `--set` overrides, in `sweeps/<name>/runs/trial-NNN`:
//! `troupe local` on this machine, or with `[cluster]` a `scripts/launch-ssh.sh` job on its
//! own group of the cluster's hosts. The driver, an actor, supervises one actor per running
//! trial: it starts up to `parallel` at
//! once, follows each trial's `events.jsonl`, stops trials the scheduler rules out (SIGTERM:
//! the trial checkpoints and exits), restarts a crashed trial from its newest checkpoint up to
//! `max_restarts` times, and appends every decision to `sweeps/<name>/study.jsonl`. `--resume`
//! after the driver was killed replays that file: ended trials are not run again, interrupted
//! ones continue from their checkpoints. Every decision depends only on the sweep file and the
//! trials' metrics, never on timing, so an interrupted sweep ends as an uninterrupted one would.
//!
//! - [`spec`]: the sweep file and its checks (before any trial starts);
//! - [`search`]: trial parameters (grid, random, TPE), pure;
//! - [`schedule`]: early stopping (ASHA, median rule), pure;
//! - [`study`]: the study log;
//! - [`report`]: table, ranking, results.csv, curves.svg;
//! - [`follow`]: reading a trial's events as they are written;
//! - [`trial`]: a trial's command (here or on the cluster) and the actor that supervises it;
//! - [`driver`]: the supervising actor, where every decision is taken;
//! - this file: the command, the metrics, the results, `--deploy`.

mod driver;
mod follow;
mod report;
mod schedule;
mod search;
mod spec;
mod study;
mod trial;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use troupe_core::config::Config;
use troupe_core::events::RunEvent;

use search::{is_model_based, must_have_ended, prior_params, tpe_params, trial_count, Observation, Params};
use spec::SweepSpec;
use study::{trial_name, Ended, Study};

#[derive(clap::Args)]
pub(crate) struct SweepArgs {
    /// The sweep file (TOML): base config, search space, trials, scheduler.
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// Folder that holds sweeps (each in <out>/<name>).
    #[arg(long, value_name = "DIR", default_value = "sweeps")]
    out: PathBuf,
    /// Continue an interrupted sweep from its study.jsonl.
    #[arg(long)]
    resume: bool,
    /// Override a config field for every trial (repeatable), like the sweep file's [set].
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// At the end, put the best trial's best checkpoint through the deploy policy into the
    /// registry (deploy.registry, or <out>/<name>/registry).
    #[arg(long)]
    deploy: bool,
    /// Serve the sweep's Prometheus metrics (troupe_sweep_trials, troupe_sweep_best_metric) here.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// The sweep's Prometheus metrics.
pub(crate) struct SweepMetrics {
    trials: prometheus::IntGaugeVec,
    best: prometheus::Gauge,
}

impl SweepMetrics {
    fn start(listen: Option<SocketAddr>, metric: &str) -> anyhow::Result<Option<SweepMetrics>> {
        let Some(listen) = listen else { return Ok(None) };
        let registry = prometheus::Registry::new();
        let trials =
            prometheus::IntGaugeVec::new(prometheus::Opts::new("troupe_sweep_trials", "Trials of the sweep by state"), &["state"])?;
        let best = prometheus::Gauge::with_opts(
            prometheus::Opts::new("troupe_sweep_best_metric", "The best metric of an ended trial so far").const_label("metric", metric),
        )?;
        registry.register(Box::new(trials.clone()))?;
        registry.register(Box::new(best.clone()))?;
        let addr = tokio::runtime::Handle::current()
            .block_on(troupe_common::metrics::serve(registry, listen, None))
            .with_context(|| format!("cannot serve metrics on {listen}"))?;
        troupe_common::say!("sweep metrics on http://{addr}/metrics");
        Ok(Some(SweepMetrics { trials, best }))
    }

    pub(crate) fn update(&self, study: &Study, running: &BTreeSet<usize>, minimize: bool) {
        for state in ["pending", "waiting", "running", "finished", "stopped", "failed"] {
            let n = study.trials.iter().enumerate().filter(|(i, t)| t.state(running.contains(i)) == state).count();
            self.trials.with_label_values(&[state]).set(n as i64);
        }
        if let Some((_, m)) = report::ranking(study, minimize).first() {
            self.best.set(*m);
        }
    }
}

pub(crate) fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let spec = SweepSpec::from_file(&args.file, &args.set)?;
    let dir = args.out.join(&spec.name);
    let n = trial_count(&spec);
    // Every trial whose parameters are known now is checked as a whole before any starts: a
    // value that clashes with another field (a learning rate below train.min_learning_rate)
    // is said now. TPE's later trials are checked when drawn.
    let mut data_dirs = BTreeSet::new();
    for trial in (0..n).filter(|&t| !is_model_based(&spec, t)) {
        let config = check_trial(&spec, trial, &prior_params(&spec, trial))?;
        // Trials side by side must not each prepare the same data: it is prepared once here.
        if data_dirs.insert(config.data.dir.clone()) {
            troupe_coordinator::launch::ensure_data(&config).with_context(|| format!("preparing the data of trial {trial}"))?;
        }
    }
    let minimize = spec.direction == "minimize";
    let study = Study::open(&dir, n, &spec.metric, args.resume)?;
    let metrics = SweepMetrics::start(args.metrics_listen, &spec.metric)?;
    let to_run = study.trials.iter().filter(|t| t.ended.is_none()).count();
    match &spec.cluster {
        None => troupe_common::say!("sweep {}: {n} trials ({to_run} to run), {} at once, in {}", spec.name, spec.parallel, dir.display()),
        Some(c) => troupe_common::say!(
            "sweep {}: {n} trials ({to_run} to run), {} at once, each on {} of the hosts {}, in {}",
            spec.name,
            spec.parallel,
            c.hosts_per_trial,
            c.hosts.join(","),
            dir.display()
        ),
    }
    let (done, end) = tokio::sync::oneshot::channel();
    let driver_args = driver::DriverArgs { spec: spec.clone(), study, metrics, done };
    let end = tokio::runtime::Handle::current().block_on(async move {
        let (_driver, handle) = ractor::Actor::spawn(None, driver::SweepDriver, driver_args).await?;
        handle.await?;
        end.await.context("the sweep driver ended without a result")?
    })?;
    let keys: Vec<&String> = spec.space.keys().collect();
    finish(&spec, &end.study, &keys, &end.furthest, minimize, args.deploy)
}

/// A new trial's parameters, and whether its whole config resolves: `None` while a
/// model-based draw still waits for results.
fn draw(spec: &SweepSpec, study: &Study, trial: usize) -> Option<(Params, anyhow::Result<()>)> {
    let params = if is_model_based(spec, trial) {
        let needed = must_have_ended(spec, trial);
        if study.trials[..needed].iter().any(|t| t.ended.is_none()) {
            return None;
        }
        let observed: Vec<Observation> = study.trials[..needed]
            .iter()
            .filter_map(|t| Some(Observation { params: t.params.clone()?, step: t.last()?.0, metric: t.last()?.1 }))
            .collect();
        tpe_params(spec, trial, &observed)
    } else {
        prior_params(spec, trial)
    };
    let checked = check_trial(spec, trial, &params).map(|_| ());
    Some((params, checked))
}

/// The step of a run's newest complete checkpoint (one with its MANIFEST).
fn newest_checkpoint(run_dir: &Path) -> Option<u64> {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("MANIFEST").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .max()
}

/// When a trial evaluates: (every so many steps, its last step).
fn eval_schedule(spec: &SweepSpec, study: &Study, trial: usize) -> (u64, u64) {
    let params = study.trials[trial].params.clone().unwrap_or_default();
    let Ok(config) = check_trial(spec, trial, &params) else { return (0, 0) };
    let every = if spec.scheduler.kind != "none" && !spec.sets_key("eval.interval") { spec.eval_interval() } else { config.eval.interval };
    (every, config.train.steps)
}

/// A trial's whole configuration, if it resolves.
fn check_trial(spec: &SweepSpec, trial: usize, params: &Params) -> anyhow::Result<Config> {
    let mut sets = spec.fixed_sets();
    sets.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
    Ok(Config::layered(spec.base.as_deref(), &sets).with_context(|| format!("trial {trial} ({}) would not start", sets.join(" ")))?.config)
}

/// The table, ranking, results.csv, curves.svg, and with `--deploy` the best checkpoint
/// through the deploy policy.
fn finish(
    spec: &SweepSpec,
    study: &Study,
    keys: &[&String],
    furthest: &BTreeMap<usize, u64>,
    minimize: bool,
    deploy: bool,
) -> anyhow::Result<ExitCode> {
    let ranked = report::ranking(study, minimize);
    let best = ranked.first().map(|r| r.0);
    std::fs::write(study.dir.join("results.csv"), report::csv(study, keys))?;
    std::fs::write(study.dir.join("curves.svg"), report::svg(study, best))?;
    troupe_common::say!("{}", report::table(study, keys, &BTreeSet::new()));
    // Steps trained over all trials, read from the runs (a stopped trial trains a little past
    // the step it is stopped at, until its checkpoint).
    let trained: u64 = (0..study.trials.len())
        .map(|t| {
            furthest.get(&t).copied().filter(|&s| s > 0).unwrap_or_else(|| {
                troupe_core::events::read_events(&study.run_dir(t)).map_or(0, |e| e.iter().map(RunEvent::step).max().unwrap_or(0))
            })
        })
        .sum();
    troupe_common::say!("{} steps trained over all trials; results.csv and curves.svg in {}", trained, study.dir.display());
    for (rank, (t, m)) in ranked.iter().enumerate() {
        let p: Vec<String> = keys
            .iter()
            .map(|k| format!("{k}={}", study.trials[*t].params.as_ref().and_then(|p| p.get(*k)).map_or("-".into(), study::show)))
            .collect();
        let state = study.trials[*t].ended.map_or("-", Ended::name);
        troupe_common::say!("{:>3}. trial {t:>3} {} {m:.4} ({state}) {}", rank + 1, spec.metric, p.join(" "));
    }
    let Some((t, m)) = ranked.first().copied() else {
        troupe_common::say_err!("error: no trial reported {}", spec.metric);
        return Ok(ExitCode::FAILURE);
    };
    troupe_common::say!("best: trial {t} ({} {m:.4}), run in {}", spec.metric, study.run_dir(t).display());
    if deploy {
        deploy_best(spec, study, t)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The best trial's best evaluated checkpoint goes through the same deploy policy as a
/// training run's: published to the registry if it beats the live version.
fn deploy_best(spec: &SweepSpec, study: &Study, trial: usize) -> anyhow::Result<()> {
    let params = study.trials[trial].params.clone().unwrap_or_default();
    let mut sets = spec.fixed_sets();
    sets.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
    let config = Config::layered(spec.base.as_deref(), &sets)?.config;
    let registry = if config.deploy.registry.as_os_str().is_empty() { study.dir.join("registry") } else { config.deploy.registry.clone() };
    let checkpoints = study.run_dir(trial).join("checkpoints");
    let mut best: Option<(f64, u64, PathBuf, troupe_common::registry::EvalResults)> = None;
    for entry in std::fs::read_dir(&checkpoints).with_context(|| format!("cannot read {}", checkpoints.display()))?.flatten() {
        let eval = entry.path().join(troupe_common::registry::EVAL_FILE);
        let Ok(bytes) = std::fs::read(&eval) else { continue };
        let results: troupe_common::registry::EvalResults =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not an evaluation", eval.display()))?;
        if results.val_loss.is_finite() && best.as_ref().is_none_or(|b| results.val_loss < b.0) {
            best = Some((results.val_loss, results.step, entry.path(), results));
        }
    }
    let Some((_, step, checkpoint, results)) = best else {
        anyhow::bail!("--deploy: trial {trial} has no evaluated checkpoint in {}", checkpoints.display());
    };
    let run = format!("{}/{}", spec.name, trial_name(trial));
    let decision = troupe_coordinator::actors::deployer::consider(&registry, &run, &config.deploy, step, &checkpoint, &results)?;
    troupe_common::say!(
        "deploy: {} {} of trial {trial} (step {step}) to {}: {}",
        decision.action,
        decision.version.map_or(String::new(), troupe_common::registry::version_name),
        registry.display(),
        decision.reason
    );
    Ok(())
}
