//! The study: every decision of a sweep, appended to `study.jsonl` as it is made and replayed
//! by `--resume`, and what it says about each trial.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::schedule::{at_step, AtStep};

/// One line of `study.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum StudyEvent {
    TrialStarted { trial: usize, params: BTreeMap<String, toml::Value> },
    Reported { trial: usize, step: u64, metric: f64 },
    Stopped { trial: usize, step: u64 },
    Restarted { trial: usize, attempt: u32, reason: String },
    Finished { trial: usize, step: u64, metric: Option<f64> },
    Failed { trial: usize, error: String },
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Finished,
    Stopped,
    Failed,
}

impl Ended {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ended::Finished => "finished",
            Ended::Stopped => "stopped",
            Ended::Failed => "failed",
        }
    }
}

/// What is known of a trial.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trial {
    pub params: Option<BTreeMap<String, toml::Value>>,
    pub ended: Option<Ended>,
    /// Metric by step, as recorded.
    pub reports: BTreeMap<u64, f64>,
    pub restarts: u32,
}

impl Trial {
    pub(crate) fn last(&self) -> Option<(u64, f64)> {
        self.reports.last_key_value().map(|(s, m)| (*s, *m))
    }

    /// The trial's state for the table and the metrics.
    pub(crate) fn state(&self, running: bool) -> &'static str {
        match (self.ended, running, self.params.is_some()) {
            (Some(e), _, _) => e.name(),
            (None, true, _) => "running",
            (None, false, true) => "waiting",
            (None, false, false) => "pending",
        }
    }
}

pub(crate) struct Study {
    pub dir: PathBuf,
    log: std::fs::File,
    pub trials: Vec<Trial>,
    pub metric: String,
}

impl Study {
    /// Opens `<dir>/study.jsonl` for appending, replaying what it holds when resuming.
    pub(crate) fn open(dir: &Path, trials: usize, metric: &str, resume: bool) -> anyhow::Result<Study> {
        let path = dir.join("study.jsonl");
        if path.exists() && !resume {
            anyhow::bail!("{} exists: continue it with --resume, or give the sweep another name", path.display());
        }
        std::fs::create_dir_all(dir.join("runs")).with_context(|| format!("cannot create {}", dir.display()))?;
        let earlier = if resume && path.exists() {
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
        } else {
            Vec::new()
        };
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // A line cut short by a kill is dropped from the file too, so that the next event
        // starts a line of its own.
        let whole = earlier.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < earlier.len() {
            log.set_len(whole as u64).with_context(|| format!("cannot drop the cut-off last line of {}", path.display()))?;
        }
        let earlier = std::str::from_utf8(&earlier[..whole]).with_context(|| format!("{} is not UTF-8 text", path.display()))?;
        let mut study = Study { dir: dir.to_path_buf(), log, trials: vec![Trial::default(); trials], metric: metric.to_string() };
        for (n, line) in earlier.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let Ok(event) = serde_json::from_str::<StudyEvent>(line) else {
                anyhow::bail!("{}: line {} is not a study event: {line:?}", path.display(), n + 1);
            };
            anyhow::ensure!(event_trial(&event) < trials, "{}: line {} names a trial this sweep does not have", path.display(), n + 1);
            study.apply(&event);
        }
        Ok(study)
    }

    /// Appends an event (synced) and says it on the console.
    pub(crate) fn record(&mut self, event: StudyEvent) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&event)?;
        line.push('\n');
        self.log.write_all(line.as_bytes())?;
        self.log.sync_data()?;
        let metric = &self.metric;
        let say = match &event {
            StudyEvent::TrialStarted { trial, params } => {
                let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
                format!("trial {trial:>3} started: {}", p.join(" "))
            }
            StudyEvent::Reported { trial, step, metric: m } => format!("trial {trial:>3} step {step:>6}: {metric} {m:.4}"),
            StudyEvent::Stopped { trial, step } => format!("trial {trial:>3} STOPPED at step {step} (early stopping)"),
            StudyEvent::Restarted { trial, attempt, reason } => format!("trial {trial:>3} restarted (attempt {attempt}): {reason}"),
            StudyEvent::Finished { trial, step, metric: m } => {
                format!("trial {trial:>3} finished at step {step}: {metric} {}", m.map_or("-".into(), |m| format!("{m:.4}")))
            }
            StudyEvent::Failed { trial, error } => format!("trial {trial:>3} FAILED: {error}"),
        };
        troupe_common::say!("{say}");
        self.apply(&event);
        Ok(())
    }

    fn apply(&mut self, event: &StudyEvent) {
        match event {
            StudyEvent::TrialStarted { trial, params } => self.trials[*trial].params = Some(params.clone()),
            StudyEvent::Reported { trial, step, metric } => {
                self.trials[*trial].reports.insert(*step, *metric);
            }
            StudyEvent::Stopped { trial, .. } => self.trials[*trial].ended = Some(Ended::Stopped),
            StudyEvent::Restarted { trial, attempt, .. } => self.trials[*trial].restarts = *attempt,
            StudyEvent::Finished { trial, .. } => self.trials[*trial].ended = Some(Ended::Finished),
            StudyEvent::Failed { trial, .. } => self.trials[*trial].ended = Some(Ended::Failed),
        }
    }

    /// What trial `s` has at `step`, for the scheduler.
    pub(crate) fn at_step(&self, s: usize, step: u64) -> AtStep {
        let t = &self.trials[s];
        at_step(&t.reports, t.last().map(|l| l.0), t.ended.is_some(), step)
    }

    pub(crate) fn run_dir(&self, trial: usize) -> PathBuf {
        self.dir.join("runs").join(trial_name(trial))
    }
}

fn event_trial(event: &StudyEvent) -> usize {
    match event {
        StudyEvent::TrialStarted { trial, .. }
        | StudyEvent::Reported { trial, .. }
        | StudyEvent::Stopped { trial, .. }
        | StudyEvent::Restarted { trial, .. }
        | StudyEvent::Finished { trial, .. }
        | StudyEvent::Failed { trial, .. } => *trial,
    }
}

pub(crate) fn trial_name(trial: usize) -> String {
    format!("trial-{trial:03}")
}

/// A config value as `--set` and the console write it (strings without quotes).
pub(crate) fn show(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) if *f != 0.0 && (f.abs() < 1e-2 || f.abs() >= 1e5) => format!("{f:.4e}"),
        toml::Value::Float(f) => format!("{f:.4}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver killed mid-write leaves half a line: `--resume` drops it, and the study goes on
    /// with whole lines only.
    #[test]
    fn a_cut_off_last_line_is_dropped_on_resume() {
        let dir = std::env::temp_dir().join(format!("troupe-study-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut study = Study::open(&dir, 2, "val_loss", false).unwrap();
            study.record(StudyEvent::TrialStarted { trial: 0, params: BTreeMap::new() }).unwrap();
            study.record(StudyEvent::Reported { trial: 0, step: 5, metric: 3.5 }).unwrap();
        }
        let path = dir.join("study.jsonl");
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"event\":\"repo");
        std::fs::write(&path, &text).unwrap();
        assert!(Study::open(&dir, 2, "val_loss", false).is_err(), "an existing study needs --resume");
        let mut study = Study::open(&dir, 2, "val_loss", true).unwrap();
        assert_eq!(study.trials[0].last(), Some((5, 3.5)));
        study.record(StudyEvent::Finished { trial: 0, step: 5, metric: Some(3.5) }).unwrap();
        drop(study);
        let study = Study::open(&dir, 2, "val_loss", true).unwrap();
        assert_eq!(study.trials[0].ended, Some(Ended::Finished));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
