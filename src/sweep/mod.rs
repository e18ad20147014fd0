//! `troupe sweep`: a hyperparameter search whose trials are whole troupe runs.
//!
//! Each trial is a `troupe local` process (its own coordinator and workers) with the sweep's
//! fixed settings and the trial's parameters as `--set` overrides, in
//! `sweeps/<name>/runs/trial-NNN`. The driver supervises them: it starts up to `parallel` at
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
//! - this file: the processes, the metrics, `--deploy`.

mod report;
mod schedule;
mod search;
mod spec;
mod study;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use troupe_core::config::Config;
use troupe_core::events::RunEvent;

use schedule::{Decision, Scheduler};
use search::{is_model_based, must_have_ended, prior_params, tpe_params, trial_count, Observation, Params};
use spec::SweepSpec;
use study::{trial_name, Ended, Study, StudyEvent};

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

/// A trial process the driver watches.
struct Running {
    child: Child,
    /// Told to stop by the scheduler: its slot is free already.
    stopping: bool,
}

/// The driver's view of one trial's `events.jsonl`: read incrementally.
#[derive(Default)]
struct Follow {
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
    /// Metrics read but not yet recorded (a decision waits on an earlier trial), by step.
    unrecorded: BTreeMap<u64, f64>,
    /// The furthest step any event of the run names: the steps it trained.
    furthest: u64,
}

impl Follow {
    /// Reads what the run appended since the last call. Only the evaluations the trial's
    /// schedule makes count (every `eval_every` steps and the last step): a run stopped by a
    /// signal also evaluates where it stopped, which an uninterrupted run would not.
    fn read(&mut self, run_dir: &Path, metric: &str, recorded_up_to: Option<u64>, schedule: (u64, u64)) {
        let (eval_every, last_step) = schedule;
        let Ok(mut file) = std::fs::File::open(run_dir.join("events.jsonl")) else { return };
        // A trial restarted before its first checkpoint starts a new run folder (the old one
        // is archived): a new file, read from its start.
        let inode = file.metadata().map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        if inode != self.inode {
            (self.inode, self.offset) = (inode, 0);
            self.partial.clear();
        }
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        // Bytes, not text: a read can end inside a character; lines are whole only up to the
        // last newline.
        let mut bytes = Vec::new();
        let Ok(n) = file.read_to_end(&mut bytes) else { return };
        self.offset += n as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
            let Ok(event) = serde_json::from_slice::<RunEvent>(line) else { continue };
            self.furthest = self.furthest.max(event.step());
            let scheduled = |step: u64| step == last_step || (eval_every > 0 && step.is_multiple_of(eval_every));
            if let RunEvent::Eval { step, val_loss, per_source, .. } = event.clone() {
                if !scheduled(step) {
                    continue;
                }
                let value = match metric.strip_prefix("val_loss/") {
                    Some(source) => per_source.get(source).copied(),
                    None => Some(val_loss),
                };
                // A run resumed from a checkpoint reports some steps again: the same values.
                if let (Some(v), true) = (value, recorded_up_to.is_none_or(|r| step > r)) {
                    self.unrecorded.insert(step, v);
                }
            }
        }
    }
}

/// The sweep's Prometheus metrics.
struct SweepMetrics {
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

    fn update(&self, study: &Study, running: &BTreeSet<usize>, minimize: bool) {
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
    let scheduler = Scheduler::new(&spec.scheduler, minimize);
    let mut study = Study::open(&dir, n, &spec.metric, args.resume)?;
    let metrics = SweepMetrics::start(args.metrics_listen, &spec.metric)?;
    let keys: Vec<&String> = spec.space.keys().collect();

    // Trials that were running when an earlier driver died continue from their checkpoints.
    let mut restart: VecDeque<usize> = (0..n).filter(|&t| study.trials[t].params.is_some() && study.trials[t].ended.is_none()).collect();
    let mut running: BTreeMap<usize, Running> = BTreeMap::new();
    let mut exited: BTreeMap<usize, ExitStatus> = BTreeMap::new();
    let mut follow: BTreeMap<usize, Follow> = BTreeMap::new();
    let mut schedules: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let to_run = study.trials.iter().filter(|t| t.ended.is_none()).count();
    troupe_common::say!("sweep {}: {n} trials ({to_run} to run), {} at once, in {}", spec.name, spec.parallel, dir.display());
    let mut last_table = Instant::now();
    let mut changed = false;
    loop {
        // Start trials while there are free slots: restarts first, then the next new trial.
        loop {
            let busy = running.values().filter(|r| !r.stopping).count();
            if busy >= spec.parallel {
                break;
            }
            let trial = if let Some(t) = restart.pop_front() {
                if study.trials[t].ended.is_some() {
                    continue; // stopped while it waited for a slot
                }
                // A run that already reached its last step (a driver died while its final
                // reports waited on an earlier trial) has nothing left to train: it is an exit.
                let last_step = schedules.entry(t).or_insert_with(|| eval_schedule(&spec, &study, t)).1;
                if newest_checkpoint(&study.run_dir(t)).is_some_and(|s| s >= last_step) {
                    exited.insert(t, std::os::unix::process::ExitStatusExt::from_raw(0));
                    continue;
                }
                t
            } else if let Some(t) = (0..n).find(|&t| study.trials[t].params.is_none()) {
                let Some((params, checked)) = draw(&spec, &study, t) else {
                    break; // TPE waits for the results it samples from
                };
                study.record(StudyEvent::TrialStarted { trial: t, params })?;
                if let Err(e) = checked {
                    study.record(StudyEvent::Failed { trial: t, error: format!("{e:#}") })?;
                    continue;
                }
                t
            } else {
                break;
            };
            let params = study.trials[trial].params.clone().unwrap_or_default();
            exited.remove(&trial);
            running.insert(trial, Running { child: start_trial(&spec, &study, trial, &params)?, stopping: false });
            changed = true;
        }
        if running.is_empty() && exited.is_empty() && restart.is_empty() && study.trials.iter().all(|t| t.ended.is_some()) {
            break;
        }

        // Reports, in trial order: a decision may wait on an earlier trial's report.
        for trial in 0..n {
            if study.trials[trial].params.is_none() || study.trials[trial].ended.is_some() {
                continue;
            }
            let recorded_up_to = study.trials[trial].last().map(|l| l.0);
            let schedule = *schedules.entry(trial).or_insert_with(|| eval_schedule(&spec, &study, trial));
            let f = follow.entry(trial).or_default();
            f.read(&study.run_dir(trial), &spec.metric, recorded_up_to, schedule);
            while let Some((&step, &metric)) = follow[&trial].unrecorded.first_key_value() {
                let decision = scheduler.decide(trial, step, metric, |s| study.at_step(s, step));
                if decision == Decision::Wait {
                    break;
                }
                follow.get_mut(&trial).expect("followed").unrecorded.remove(&step);
                study.record(StudyEvent::Reported { trial, step, metric })?;
                changed = true;
                if decision == Decision::Stop {
                    study.record(StudyEvent::Stopped { trial, step })?;
                    if let Some(run) = running.get_mut(&trial) {
                        // SAFETY: a signal to our own child.
                        unsafe { libc::kill(run.child.id() as libc::pid_t, libc::SIGTERM) };
                        run.stopping = true;
                    }
                    break;
                }
            }
        }

        // Exits. A trial that exited cleanly ends once its last reports are decided.
        for (&trial, run) in running.iter_mut() {
            if let Some(status) = run.child.try_wait()? {
                exited.insert(trial, status);
            }
        }
        for trial in exited.keys().copied().collect::<Vec<_>>() {
            running.remove(&trial);
            let status = exited[&trial];
            let t = &study.trials[trial];
            if t.ended.is_some() {
                exited.remove(&trial);
                continue;
            }
            // Read once more: what it wrote just before exiting.
            let schedule = *schedules.entry(trial).or_insert_with(|| eval_schedule(&spec, &study, trial));
            let f = follow.entry(trial).or_default();
            f.read(&study.run_dir(trial), &spec.metric, t.last().map(|l| l.0), schedule);
            // A clean exit before train.steps (a SIGTERM from outside the driver) is not the
            // end of the trial: it continues from its checkpoint like a crashed one.
            let reached = newest_checkpoint(&study.run_dir(trial)).unwrap_or(0).max(f.furthest);
            if status.success() && reached >= schedule.1 {
                if !f.unrecorded.is_empty() {
                    continue; // a decision still waits on an earlier trial
                }
                let last = t.last();
                study.record(StudyEvent::Finished { trial, step: last.map_or(0, |l| l.0), metric: last.map(|l| l.1) })?;
            } else if t.restarts < spec.max_restarts {
                let attempt = t.restarts + 1;
                let reason = if status.success() {
                    format!("the run stopped at step {reached} of {}", schedule.1)
                } else {
                    format!("the run exited with {status}")
                };
                study.record(StudyEvent::Restarted { trial, attempt, reason })?;
                restart.push_back(trial);
            } else {
                let error =
                    format!("the run exited with {status} after {} restarts; see {}", spec.max_restarts, log_path(&study, trial).display());
                study.record(StudyEvent::Failed { trial, error })?;
            }
            exited.remove(&trial);
            changed = true;
        }

        let live: BTreeSet<usize> = running.iter().filter(|(_, r)| !r.stopping).map(|(t, _)| *t).collect();
        if let Some(m) = &metrics {
            m.update(&study, &live, minimize);
        }
        if changed && last_table.elapsed() >= Duration::from_secs(30) {
            troupe_common::say!("{}", report::table(&study, &keys, &live));
            (last_table, changed) = (Instant::now(), false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(m) = &metrics {
        m.update(&study, &BTreeSet::new(), minimize);
    }
    finish(&spec, &study, &keys, &follow, minimize, args.deploy)
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

fn log_path(study: &Study, trial: usize) -> PathBuf {
    study.dir.join(format!("{}.log", trial_name(trial)))
}

/// `troupe local` for one trial: the sweep's base config, fixed settings and the trial's
/// parameters; `--resume` when its run has a checkpoint to continue from. It gets SIGTERM
/// if the driver dies, so that no trial runs on unsupervised.
fn start_trial(spec: &SweepSpec, study: &Study, trial: usize, params: &Params) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the troupe binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("local").arg("--out").arg(study.dir.join("runs")).args(["--workers", &spec.workers.to_string(), "--sample-tokens", "0"]);
    if let Some(base) = &spec.base {
        cmd.arg("--config").arg(base);
    }
    let mut sets = vec![format!("run.name={}", trial_name(trial)), "deploy.enabled=false".to_string()];
    if !spec.sets_key("train.threads_per_worker") {
        // Trials side by side share the cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        sets.push(format!("train.threads_per_worker={}", (cores / (spec.parallel * spec.workers)).max(1)));
    }
    if spec.scheduler.kind != "none" && !spec.sets_key("eval.interval") {
        // Every step the scheduler compares at needs a validation loss.
        sets.push(format!("eval.interval={}", spec.eval_interval()));
    }
    sets.extend(spec.fixed_sets());
    sets.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
    for set in sets {
        cmd.arg("--set").arg(set);
    }
    let checkpoints = study.run_dir(trial).join("checkpoints");
    if std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-")))) {
        cmd.arg("--resume");
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(study, trial))?;
    cmd.stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
    // SAFETY: prctl in the child before exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().context("cannot start a trial")
}

/// The table, ranking, results.csv, curves.svg, and with `--deploy` the best checkpoint
/// through the deploy policy.
fn finish(
    spec: &SweepSpec,
    study: &Study,
    keys: &[&String],
    follow: &BTreeMap<usize, Follow>,
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
            follow.get(&t).map(|f| f.furthest).filter(|&s| s > 0).unwrap_or_else(|| {
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
