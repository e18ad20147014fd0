//! `troupe sweep`: a hyperparameter search whose trials are whole troupe runs.
//!
//! Each trial is a `troupe local` process (its own coordinator and workers) with the sweep's
//! fixed settings and the trial's parameters as `--set` overrides, in
//! `sweeps/<name>/runs/trial-NNN`. The driver starts up to `parallel` trials at once, reads
//! each trial's `events.jsonl` as it grows, stops trials that successive halving (ASHA) rules
//! out (SIGTERM: the trial checkpoints and exits), restarts a crashed trial from its newest
//! checkpoint up to `max_restarts` times, and appends every decision to
//! `sweeps/<name>/study.jsonl`. `--resume` after the driver was killed replays that file:
//! finished trials are not run again, interrupted ones continue from their checkpoints. At the
//! end: a ranking, `results.csv`, the best trial.
//!
//! - [`spec`]: the sweep file and its checks (before any trial starts);
//! - [`plan`]: trial parameters (random, grid) and ASHA, pure;
//! - this file: the processes, the study log, the results.

mod plan;
mod spec;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use troupe_core::events::RunEvent;

use plan::{trial_params, Asha, Params};
use spec::SweepSpec;

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
}

/// One line of `study.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum StudyEvent {
    TrialStarted { trial: usize, params: BTreeMap<String, String> },
    Reported { trial: usize, step: u64, metric: f64 },
    Stopped { trial: usize, step: u64 },
    Restarted { trial: usize, attempt: u32, reason: String },
    Finished { trial: usize, step: u64, metric: Option<f64> },
    Failed { trial: usize, error: String },
}

/// What is known of a trial.
#[derive(Debug, Clone, Default)]
struct TrialState {
    started: bool,
    /// Finished, stopped or failed.
    done: Option<&'static str>,
    reported: BTreeSet<u64>,
    last: Option<(u64, f64)>,
    restarts: u32,
}

struct Running {
    child: Child,
    stopping: bool,
}

struct Study {
    dir: PathBuf,
    log: std::fs::File,
    trials: Vec<TrialState>,
}

impl Study {
    fn record(&mut self, event: StudyEvent) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&event)?;
        line.push('\n');
        self.log.write_all(line.as_bytes())?;
        self.log.sync_data()?;
        let say = match &event {
            StudyEvent::TrialStarted { trial, params } => {
                let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("trial {trial:>3} started: {}", p.join(" "))
            }
            StudyEvent::Reported { trial, step, metric } => format!("trial {trial:>3} step {step:>6}: val_loss {metric:.4}"),
            StudyEvent::Stopped { trial, step } => format!("trial {trial:>3} STOPPED at step {step} (ASHA)"),
            StudyEvent::Restarted { trial, attempt, reason } => format!("trial {trial:>3} restarted (attempt {attempt}): {reason}"),
            StudyEvent::Finished { trial, step, metric } => {
                format!("trial {trial:>3} finished at step {step}: val_loss {}", metric.map_or("-".into(), |m| format!("{m:.4}")))
            }
            StudyEvent::Failed { trial, error } => format!("trial {trial:>3} FAILED: {error}"),
        };
        troupe_common::say!("{say}");
        self.apply(&event);
        Ok(())
    }

    fn apply(&mut self, event: &StudyEvent) {
        match event {
            StudyEvent::TrialStarted { trial, .. } => self.trials[*trial].started = true,
            StudyEvent::Reported { trial, step, metric } => {
                let t = &mut self.trials[*trial];
                t.reported.insert(*step);
                t.last = Some((*step, *metric));
            }
            StudyEvent::Stopped { trial, .. } => self.trials[*trial].done = Some("stopped"),
            StudyEvent::Restarted { trial, attempt, .. } => self.trials[*trial].restarts = *attempt,
            StudyEvent::Finished { trial, .. } => self.trials[*trial].done = Some("finished"),
            StudyEvent::Failed { trial, .. } => self.trials[*trial].done = Some("failed"),
        }
    }

    fn run_dir(&self, trial: usize) -> PathBuf {
        self.dir.join("runs").join(trial_name(trial))
    }
}

fn trial_name(trial: usize) -> String {
    format!("trial-{trial:03}")
}

fn show(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let spec = SweepSpec::from_file(&args.file)?;
    let dir = args.out.join(&spec.name);
    let log_path = dir.join("study.jsonl");
    if log_path.exists() && !args.resume {
        anyhow::bail!("{} exists: continue it with --resume, or give the sweep another name", log_path.display());
    }
    std::fs::create_dir_all(dir.join("runs")).with_context(|| format!("cannot create {}", dir.display()))?;
    let params = trial_params(&spec);
    // Every trial's whole configuration is checked before any starts: a value that clashes
    // with another field (a learning rate below train.min_learning_rate) is said now.
    for (trial, p) in params.iter().enumerate() {
        let mut sets = spec.fixed_sets();
        sets.extend(p.iter().map(|(k, v)| format!("{k}={v}")));
        troupe_core::config::Config::layered(spec.base.as_deref(), &sets)
            .with_context(|| format!("trial {trial} ({}) would not start", sets.join(" ")))?;
    }
    let minimize = spec.direction == "minimize";
    let mut asha =
        (spec.scheduler.kind == "asha").then(|| Asha::new(spec.scheduler.grace_steps, spec.scheduler.reduction_factor, minimize));
    let earlier = if args.resume { std::fs::read_to_string(&log_path).unwrap_or_default() } else { String::new() };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut study = Study { dir: dir.clone(), log, trials: vec![TrialState::default(); params.len()] };
    for line in earlier.lines().filter(|l| !l.trim().is_empty()) {
        let event: StudyEvent = serde_json::from_str(line).with_context(|| format!("{}: bad line {line:?}", log_path.display()))?;
        if let (Some(asha), StudyEvent::Reported { step, metric, .. }) = (asha.as_mut(), &event) {
            asha.report(*step, *metric);
        }
        study.apply(&event);
    }
    let mut pending: VecDeque<usize> = (0..params.len()).filter(|&t| study.trials[t].done.is_none()).collect();
    let mut running: BTreeMap<usize, Running> = BTreeMap::new();
    troupe_common::say!(
        "sweep {}: {} trials ({} to run), {} at once, in {}",
        spec.name,
        params.len(),
        pending.len(),
        spec.parallel,
        dir.display()
    );
    loop {
        while running.len() < spec.parallel {
            let Some(trial) = pending.pop_front() else { break };
            if !study.trials[trial].started {
                let shown = params[trial].iter().map(|(k, v)| (k.clone(), show(v))).collect();
                study.record(StudyEvent::TrialStarted { trial, params: shown })?;
            }
            running.insert(trial, Running { child: start_trial(&spec, &study, trial, &params[trial])?, stopping: false });
        }
        if running.is_empty() {
            break;
        }
        let mut ended = Vec::new();
        for (&trial, run) in running.iter_mut() {
            for (step, metric) in new_evals(&study.run_dir(trial), &study.trials[trial].reported) {
                study.record(StudyEvent::Reported { trial, step, metric })?;
                let go_on = asha.as_mut().is_none_or(|a| a.report(step, metric));
                if !go_on && !run.stopping {
                    study.record(StudyEvent::Stopped { trial, step })?;
                    // SAFETY: a signal to our own child.
                    unsafe { libc::kill(run.child.id() as libc::pid_t, libc::SIGTERM) };
                    run.stopping = true;
                }
            }
            if let Some(status) = run.child.try_wait()? {
                ended.push((trial, status));
            }
        }
        for (trial, status) in ended {
            let run = running.remove(&trial).expect("a running trial");
            // Reports written just before it exited.
            for (step, metric) in new_evals(&study.run_dir(trial), &study.trials[trial].reported) {
                study.record(StudyEvent::Reported { trial, step, metric })?;
            }
            if run.stopping || study.trials[trial].done.is_some() {
                continue;
            }
            if status.success() {
                let last = study.trials[trial].last;
                study.record(StudyEvent::Finished { trial, step: last.map_or(0, |l| l.0), metric: last.map(|l| l.1) })?;
            } else if study.trials[trial].restarts < spec.max_restarts {
                let attempt = study.trials[trial].restarts + 1;
                study.record(StudyEvent::Restarted { trial, attempt, reason: format!("the run exited with {status}") })?;
                pending.push_front(trial);
            } else {
                study.record(StudyEvent::Failed {
                    trial,
                    error: format!("the run exited with {status} after {} restarts", spec.max_restarts),
                })?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    report(&spec, &study, &params, minimize)
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
    if !spec.set.contains_key("train.threads_per_worker") {
        // Trials side by side share the cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        sets.push(format!("train.threads_per_worker={}", (cores / (spec.parallel * spec.workers)).max(1)));
    }
    if spec.scheduler.kind == "asha" && !spec.set.contains_key("eval.interval") {
        sets.push(format!("eval.interval={}", spec.scheduler.grace_steps));
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
    let log = std::fs::OpenOptions::new().create(true).append(true).open(study.dir.join(format!("{}.log", trial_name(trial))))?;
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

/// Evaluations in a trial's events.jsonl not reported yet.
fn new_evals(run_dir: &Path, reported: &BTreeSet<u64>) -> Vec<(u64, f64)> {
    let Ok(events) = troupe_core::events::read_events(run_dir) else { return Vec::new() };
    events
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::Eval { step, val_loss, .. } if !reported.contains(&step) => Some((step, val_loss)),
            _ => None,
        })
        .collect::<BTreeMap<u64, f64>>()
        .into_iter()
        .collect()
}

/// The ranking, results.csv and the best trial.
fn report(spec: &SweepSpec, study: &Study, params: &[Params], minimize: bool) -> anyhow::Result<ExitCode> {
    let keys: Vec<&String> = spec.space.keys().collect();
    let mut csv = format!("trial,{},state,step,val_loss\n", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(","));
    let mut ranked: Vec<(usize, f64)> = Vec::new();
    for (t, state) in study.trials.iter().enumerate() {
        let values: Vec<String> = keys.iter().map(|k| show(&params[t][*k])).collect();
        let (step, metric) = state.last.map_or((String::new(), String::new()), |(s, m)| (s.to_string(), format!("{m}")));
        csv.push_str(&format!("{t},{},{},{step},{metric}\n", values.join(","), state.done.unwrap_or("interrupted")));
        if let (Some((_, m)), Some("finished" | "stopped")) = (state.last, state.done) {
            ranked.push((t, m));
        }
    }
    std::fs::write(study.dir.join("results.csv"), csv)?;
    ranked.sort_by(|a, b| if minimize { a.1.total_cmp(&b.1) } else { b.1.total_cmp(&a.1) });
    let steps: u64 = study.trials.iter().filter_map(|t| t.last.map(|l| l.0)).sum();
    troupe_common::say!("ranking ({} steps trained over all trials; results.csv in {}):", steps, study.dir.display());
    for (rank, (t, m)) in ranked.iter().enumerate() {
        let p: Vec<String> = keys.iter().map(|k| format!("{k}={}", show(&params[*t][*k]))).collect();
        troupe_common::say!("{:>3}. trial {t:>3} val_loss {m:.4} ({}) {}", rank + 1, study.trials[*t].done.unwrap_or("-"), p.join(" "));
    }
    match ranked.first() {
        Some((t, m)) => {
            troupe_common::say!("best: trial {t} (val_loss {m:.4}), run in {}", study.run_dir(*t).display());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            troupe_common::say_err!("error: no trial reported a validation loss");
            Ok(ExitCode::FAILURE)
        }
    }
}
