//! The sweep file: what to search over, how, and how to stop bad trials early. Checked as a
//! whole before any trial starts.
//!
//! ```toml
//! name = "lr"
//! base = "configs/my.toml"          # optional: the embedded default otherwise
//! trials = 8
//! parallel = 2                      # trials at once
//! workers = 1                       # workers per trial
//! seed = 1
//! metric = "val_loss"
//! direction = "minimize"
//! search = "tpe"                    # grid | random | tpe
//! startup_trials = 4                # TPE: random trials before the model takes over
//! [set]                             # fixed for every trial, like --set
//! "train.steps" = 60
//! [space."train.learning_rate"]
//! log_uniform = [1e-4, 3e-2]
//! [space."model.dropout"]
//! uniform = [0.0, 0.2]
//! [scheduler]
//! kind = "asha"                     # none | asha | median
//! grace_steps = 10
//! reduction_factor = 3
//! [cluster]                         # optional: trials on these hosts (over ssh), not here
//! hosts = ["node1", "node2", "node3", "node4"]
//! hosts_per_trial = 2               # trials side by side get disjoint hosts
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use troupe_core::config::Config;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SweepSpec {
    pub name: String,
    #[serde(default)]
    pub base: Option<PathBuf>,
    pub trials: usize,
    #[serde(default = "one")]
    pub parallel: usize,
    #[serde(default = "one")]
    pub workers: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "val_loss")]
    pub metric: String,
    #[serde(default = "minimize")]
    pub direction: String,
    #[serde(default = "random")]
    pub search: String,
    /// TPE: how many trials are drawn at random before the model takes over.
    #[serde(default)]
    pub startup_trials: Option<usize>,
    /// Points per range under grid search.
    #[serde(default = "three")]
    pub grid_points: usize,
    #[serde(default)]
    pub set: BTreeMap<String, toml::Value>,
    pub space: BTreeMap<String, Domain>,
    #[serde(default)]
    pub scheduler: SchedulerSpec,
    /// `--set KEY=VALUE` from the command line, after `[set]`.
    #[serde(skip)]
    pub cli_sets: Vec<String>,
    /// Restarts of a crashed trial (from its newest checkpoint) before it counts as failed.
    #[serde(default = "two")]
    pub max_restarts: u32,
    /// Trials on a cluster's hosts through `scripts/launch-ssh.sh` instead of `troupe local`
    /// on this machine.
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
}

/// Where trials run when they run on a cluster: each trial is one `scripts/launch-ssh.sh`
/// job (coordinator on the first of its hosts, workers on each) on its own group of hosts and
/// its own port, so trials side by side never share a host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterSpec {
    /// ssh destinations ([user@]host). Every host must see the sweep's folder and the prepared
    /// data at the same path as this machine (a shared filesystem), as for launch-ssh.sh.
    pub hosts: Vec<String>,
    #[serde(default = "one")]
    pub hosts_per_trial: usize,
    #[serde(default = "one")]
    pub workers_per_host: usize,
    /// The QUIC port of the first group of hosts; group g listens on port + g.
    #[serde(default = "port")]
    pub port: u16,
    /// The launcher (default: scripts/launch-ssh.sh beside the binary's source tree, or in
    /// the current folder).
    #[serde(default)]
    pub launcher: Option<PathBuf>,
    /// Where on the hosts each group keeps the binary, config and pid files (relative to the
    /// remote home): `<remote_dir>/group-<g>`, reused by the group's trials one after another.
    /// Default: .cache/troupe-launch/sweep-<name>.
    #[serde(default)]
    pub remote_dir: Option<String>,
    /// More arguments for every launch, e.g. ["--ssh-opt", "-i", "--ssh-opt", "~/.ssh/key",
    /// "--worker-args", "--threads 8"].
    #[serde(default)]
    pub launcher_args: Vec<String>,
}

fn port() -> u16 {
    7070
}

impl ClusterSpec {
    /// Groups of hosts, one per trial running at once.
    pub(crate) fn groups(&self) -> usize {
        self.hosts.len() / self.hosts_per_trial.max(1)
    }

    /// The hosts of group `g`.
    pub(crate) fn group(&self, g: usize) -> &[String] {
        &self.hosts[g * self.hosts_per_trial..(g + 1) * self.hosts_per_trial]
    }
}

fn one() -> usize {
    1
}
fn two() -> u32 {
    2
}
fn three() -> usize {
    3
}
fn val_loss() -> String {
    "val_loss".into()
}
fn minimize() -> String {
    "minimize".into()
}
fn random() -> String {
    "random".into()
}

/// Where one config field's values come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum Domain {
    Uniform([f64; 2]),
    LogUniform([f64; 2]),
    Int([i64; 2]),
    Choice(Vec<toml::Value>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SchedulerSpec {
    /// `none`, `asha` or `median`.
    pub kind: String,
    /// Every trial trains at least this many steps (ASHA: the first rung).
    #[serde(default = "ten")]
    pub grace_steps: u64,
    /// ASHA: each rung keeps the best 1/reduction_factor of the trials that reached it.
    #[serde(default = "three_u64")]
    pub reduction_factor: u64,
    /// Median rule: earlier trials that must have reported at a step before it stops anyone.
    #[serde(default = "three")]
    pub min_trials: usize,
}

fn ten() -> u64 {
    10
}
fn three_u64() -> u64 {
    3
}

impl Default for SchedulerSpec {
    fn default() -> Self {
        SchedulerSpec { kind: "none".into(), grace_steps: 10, reduction_factor: 3, min_trials: 3 }
    }
}

impl Domain {
    /// A value inside the domain (to check that the field takes it).
    pub(crate) fn example(&self) -> toml::Value {
        match self {
            Domain::Uniform([lo, _]) | Domain::LogUniform([lo, _]) => toml::Value::Float(*lo),
            Domain::Int([lo, _]) => toml::Value::Integer(*lo),
            Domain::Choice(values) => values.first().cloned().unwrap_or(toml::Value::Integer(0)),
        }
    }
}

impl SweepSpec {
    pub(crate) fn from_file(path: &Path, cli_sets: &[String]) -> anyhow::Result<SweepSpec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the sweep file {}", path.display()))?;
        let mut spec: SweepSpec = toml::from_str(&text).with_context(|| format!("invalid sweep file {}", path.display()))?;
        if let Some(base) = &spec.base {
            if base.is_relative() {
                spec.base = Some(path.parent().unwrap_or(Path::new(".")).join(base));
            }
        }
        spec.cli_sets = cli_sets.to_vec();
        spec.validate().with_context(|| format!("invalid sweep file {}", path.display()))?;
        if let Some(cluster) = &mut spec.cluster {
            spec.workers = cluster.hosts_per_trial * cluster.workers_per_host;
            if let Some(launcher) = cluster.launcher.as_mut().filter(|l| l.is_relative()) {
                *launcher = path.parent().unwrap_or(Path::new(".")).join(&launcher);
            }
        }
        Ok(spec)
    }

    /// TPE's random start-up trials: as set, or a quarter of the trials (at least 2, at least
    /// `parallel`).
    pub(crate) fn startup_trials(&self) -> usize {
        self.startup_trials.unwrap_or((self.trials / 4).max(2).max(self.parallel))
    }

    /// The per-source validation loss the metric names (`val_loss/<source>`), if it names one.
    pub(crate) fn metric_source(&self) -> Option<&str> {
        self.metric.strip_prefix("val_loss/")
    }

    /// `key=value` overrides for the fixed part of every trial.
    pub(crate) fn fixed_sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = self.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        sets.extend(self.cli_sets.iter().cloned());
        sets
    }

    /// Whether `[set]` or `--set` fixes this key.
    pub(crate) fn sets_key(&self, key: &str) -> bool {
        self.set.contains_key(key) || self.cli_sets.iter().any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    }

    /// Trials evaluate every `grace_steps` under a scheduler, unless the sweep sets
    /// eval.interval: ASHA's rungs are multiples of it, the median rule compares at each.
    pub(crate) fn eval_interval(&self) -> u64 {
        self.scheduler.grace_steps
    }

    /// Everything that can be said wrong before a trial starts.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("name {:?}: use letters, digits, '-' and '_'", self.name);
        }
        if self.trials == 0 || self.parallel == 0 || self.workers == 0 {
            bail!("trials, parallel and workers must be at least 1");
        }
        if self.metric != "val_loss" && self.metric_source().is_none_or(str::is_empty) {
            bail!(
                "metric {:?} is never reported by a trial; trials report \"val_loss\", and \"val_loss/<source>\" for each source of data with several (at every eval.interval)",
                self.metric
            );
        }
        if self.direction != "minimize" && self.direction != "maximize" {
            bail!("direction {:?}: use \"minimize\" or \"maximize\"", self.direction);
        }
        if !["random", "grid", "tpe"].contains(&self.search.as_str()) {
            bail!("search {:?}: use \"random\", \"grid\" or \"tpe\"", self.search);
        }
        if self.startup_trials == Some(0) {
            bail!("startup_trials must be at least 1: TPE needs results to model");
        }
        if let Some(cluster) = &self.cluster {
            if cluster.hosts.is_empty() || cluster.hosts_per_trial == 0 || cluster.workers_per_host == 0 {
                bail!("[cluster] needs hosts, and hosts_per_trial and workers_per_host of at least 1");
            }
            if cluster.groups() < self.parallel {
                bail!(
                    "[cluster]: {} trials at once need {} hosts ({} each), and hosts lists {}",
                    self.parallel,
                    self.parallel * cluster.hosts_per_trial,
                    cluster.hosts_per_trial,
                    cluster.hosts.len()
                );
            }
            let workers = cluster.hosts_per_trial * cluster.workers_per_host;
            if self.workers != 1 && self.workers != workers {
                bail!(
                    "workers = {} but [cluster] gives each trial {workers} ({} hosts × {} workers_per_host); leave workers out",
                    self.workers,
                    cluster.hosts_per_trial,
                    cluster.workers_per_host
                );
            }
            if usize::from(cluster.port) + self.parallel > 65536 {
                bail!("[cluster] port {} + {} trials at once runs past 65535", cluster.port, self.parallel);
            }
        }
        if self.space.is_empty() {
            bail!("[space] is empty: name at least one config field to search over");
        }
        match self.scheduler.kind.as_str() {
            "none" => {}
            "asha" if self.scheduler.grace_steps >= 1 && self.scheduler.reduction_factor >= 2 => {}
            "asha" => bail!("scheduler: asha needs grace_steps >= 1 and reduction_factor >= 2"),
            "median" if self.scheduler.min_trials >= 1 => {}
            "median" => bail!("scheduler: median needs min_trials >= 1"),
            other => bail!("scheduler.kind {other:?}: use \"none\", \"asha\" or \"median\""),
        }
        for (key, domain) in &self.space {
            match domain {
                Domain::Uniform([lo, hi]) if !(lo.is_finite() && hi.is_finite() && lo < hi) => {
                    bail!("space.{key:?}: the range [{lo}, {hi}] is empty; write [low, high] with low < high")
                }
                Domain::LogUniform([lo, hi]) if !(*lo > 0.0 && lo < hi && hi.is_finite()) => bail!(
                    "space.{key:?}: a log-uniform range must lie above zero with low < high, not [{lo}, {hi}]; use uniform for ranges through zero"
                ),
                Domain::Int([lo, hi]) if lo > hi => bail!("space.{key:?}: the range [{lo}, {hi}] is empty"),
                Domain::Choice(values) if values.is_empty() => bail!("space.{key:?}: choice has no values"),
                _ => {}
            }
            if self.sets_key(key) {
                bail!("space.{key:?} is also fixed in [set] or by --set");
            }
        }
        // Every field must be a config field that takes such values: resolve one trial.
        let mut sets = self.fixed_sets();
        sets.extend(self.space.iter().map(|(k, d)| format!("{k}={}", d.example())));
        let config = Config::layered(self.base.as_deref(), &sets)
            .map_err(|e| anyhow::anyhow!("the search space does not fit the run config: {e}"))?
            .config;
        // The scheduler compares at steps where trials evaluate: every grace_steps unless the
        // sweep fixes eval.interval, which must then fall on them.
        if self.scheduler.kind != "none" {
            if self.space.contains_key("eval.interval") {
                bail!("space.\"eval.interval\": with a scheduler, trials must evaluate at the same steps; fix it in [set] instead");
            }
            let every = config.eval.interval;
            if self.sets_key("eval.interval") && (every == 0 || !self.scheduler.grace_steps.is_multiple_of(every)) {
                bail!(
                    "eval.interval = {every} does not divide scheduler.grace_steps = {}: the scheduler would find no validation loss at the steps it compares",
                    self.scheduler.grace_steps
                );
            }
        }
        if let Some(source) = self.metric_source() {
            self.check_source(&config, source)?;
        }
        Ok(())
    }

    /// A per-source metric needs prepared data with that source among several.
    fn check_source(&self, config: &Config, source: &str) -> anyhow::Result<()> {
        // Data in object storage is checked in this host's cache, once it has been fetched.
        let dir = troupe_common::data::remote::local_dir(&config.data.dir);
        if troupe_common::storage::is_remote(&config.data.dir) && !troupe_common::data::is_prepared(&dir) {
            return Ok(());
        }
        let meta = troupe_common::data::load_meta(&dir).map_err(|e| {
            anyhow::anyhow!(
                "metric {:?} names a data source, so the data must be prepared before the sweep (troupe prepare --out {}): {e}",
                self.metric,
                dir.display()
            )
        })?;
        let names: Vec<&str> = meta.sources.iter().map(|s| s.name.as_str()).collect();
        if names.len() < 2 || !names.contains(&source) {
            bail!(
                "metric {:?} is never reported: trials report val_loss/<source> for data with several sources, and {} has {:?}",
                self.metric,
                dir.display(),
                names
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> anyhow::Result<SweepSpec> {
        let text = format!("name = \"t\"\ntrials = 4\n{extra}");
        let spec: SweepSpec = toml::from_str(&text)?;
        spec.validate()?;
        Ok(spec)
    }

    #[test]
    fn a_good_spec_passes_and_bad_ones_are_named_before_any_trial() {
        spec("[space.\"train.learning_rate\"]\nlog_uniform = [1e-3, 1e-2]\n[space.\"parallel.strategy\"]\nchoice = [\"ddp\", \"zero1\"]\n")
            .unwrap();
        for (extra, says) in [
            ("[space.\"train.lerning_rate\"]\nuniform = [0.1, 0.2]\n", "lerning_rate"),
            ("[space.\"train.learning_rate\"]\nuniform = [0.2, 0.1]\n", "is empty"),
            ("[space.\"train.learning_rate\"]\nlog_uniform = [0.0, 0.1]\n", "above zero"),
            ("[space.\"model.n_layer\"]\nint = [4, 2]\n", "is empty"),
            ("metric = \"accuracy\"\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "never reported"),
            ("metric = \"val_loss/\"\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "never reported"),
            ("search = \"bayes\"\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "tpe"),
            ("[scheduler]\nkind = \"hyperband\"\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "median"),
            ("[space.\"model.n_layer\"]\nchoice = []\n", "no values"),
            (
                "[scheduler]\nkind = \"asha\"\ngrace_steps = 10\n[set]\n\"eval.interval\" = 7\n[space.\"model.n_layer\"]\nint = [2, 4]\n",
                "does not divide",
            ),
            ("[scheduler]\nkind = \"median\"\n[space.\"eval.interval\"]\nint = [5, 10]\n", "fix it in [set]"),
            ("[space.\"model.n_layer\"]\nchoice = [\"two\"]\n", "n_layer"),
            ("parallel = 3\n[cluster]\nhosts = [\"a\", \"b\"]\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "need 3 hosts"),
            ("workers = 4\n[cluster]\nhosts = [\"a\"]\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "leave workers out"),
            ("[cluster]\nhosts = []\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "needs hosts"),
            ("parallel = 2\n[cluster]\nhosts = [\"a\", \"b\"]\nport = 65535\n[space.\"model.n_layer\"]\nint = [2, 4]\n", "past 65535"),
        ] {
            let err = format!("{:#}", spec(extra).unwrap_err());
            assert!(err.contains(says), "{extra}: {err}");
        }
    }
}
