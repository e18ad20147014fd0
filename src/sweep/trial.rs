//! One trial attempt: the process that runs it, and the actor that supervises that process.
//!
//! A trial runs either as `troupe local` on this machine (its own coordinator and workers as
//! processes here) or, with the sweep's `[cluster]`, as one `scripts/launch-ssh.sh` job on a
//! group of the cluster's hosts (coordinator on the first, workers on each), the way a user
//! runs `troupe coordinator` on a cluster. Either way the driver sees one process whose exit
//! is the trial's: `troupe local`'s, or the launcher's, which is its coordinator's.
//!
//! [`TrialActor`] supervises that process for one attempt: it passes on the scheduler's stop,
//! tells the driver how the process ended ([`DriverMsg::TrialExited`]) and stops; the driver,
//! its supervisor, decides what comes next (finished, restarted from the newest checkpoint,
//! failed). An attempt ends only when its process has: if the actor is stopped with the
//! process running, or fails, the process is stopped first (SIGTERM: the run checkpoints and
//! exits; SIGKILL after a grace), so that no two attempts of a trial ever run at once.

use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::driver::DriverMsg;
use super::search::Params;
use super::spec::{ClusterSpec, SweepSpec};
use super::study::{trial_name, Study};

/// How long a trial's process gets to checkpoint and exit after SIGTERM when its actor stops
/// before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// The command of one attempt of `trial`: `troupe local`, or with `[cluster]` the launcher
/// on host group `group`. `--resume` when its run has a checkpoint to continue from. It gets
/// SIGTERM if the driver dies, so that no trial runs on unsupervised.
pub(super) fn command(spec: &SweepSpec, study: &Study, trial: usize, params: &Params, group: usize) -> anyhow::Result<Command> {
    let mut sets = vec![format!("run.name={}", trial_name(trial)), "deploy.enabled=false".to_string()];
    if spec.cluster.is_none() && !spec.sets_key("train.threads_per_worker") {
        // Trials side by side share this machine's cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        sets.push(format!("train.threads_per_worker={}", (cores / (spec.parallel * spec.workers)).max(1)));
    }
    if spec.scheduler.kind != "none" && !spec.sets_key("eval.interval") {
        // Every step the scheduler compares at needs a validation loss.
        sets.push(format!("eval.interval={}", spec.eval_interval()));
    }
    sets.extend(spec.fixed_sets());
    sets.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
    let runs = std::path::absolute(study.dir.join("runs")).context("cannot resolve the sweep's folder")?;
    let resume = std::fs::read_dir(runs.join(trial_name(trial)).join("checkpoints"))
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-"))));

    let mut cmd = match &spec.cluster {
        None => {
            let mut cmd = Command::new(std::env::current_exe().context("cannot find the troupe binary")?);
            cmd.arg("local").arg("--out").arg(&runs).args(["--workers", &spec.workers.to_string(), "--sample-tokens", "0"]);
            if let Some(base) = &spec.base {
                cmd.arg("--config").arg(base);
            }
            cmd
        }
        Some(cluster) => {
            // The coordinator runs in the launcher's folder on a host: every path it is given
            // must be absolute (the hosts see this machine's paths through a shared filesystem).
            let config = super::check_trial(spec, trial, params)?;
            let data = &config.data.dir;
            if !troupe_common::storage::is_remote(data) && data.is_relative() {
                sets.push(format!("data.dir={}", std::path::absolute(data)?.display()));
            }
            let mut cmd = Command::new(launcher(cluster)?);
            cmd.arg("--hosts").arg(cluster.group(group).join(","));
            cmd.args(["--workers-per-host", &cluster.workers_per_host.to_string()]);
            cmd.args(["--port", &(usize::from(cluster.port) + group).to_string()]);
            cmd.arg("--binary").arg(std::env::current_exe().context("cannot find the troupe binary")?);
            let remote = cluster.remote_dir.clone().unwrap_or_else(|| format!(".cache/troupe-launch/sweep-{}", spec.name));
            cmd.arg("--remote-dir").arg(format!("{remote}/group-{group}"));
            // Each attempt's processes log to their own folder: a restart keeps the crash's logs.
            let attempt = study.trials[trial].restarts;
            cmd.arg("--logs").arg(std::path::absolute(study.dir.join(format!("{}-logs/attempt-{attempt}", trial_name(trial))))?);
            if let Some(base) = &spec.base {
                cmd.arg("--config").arg(base);
            }
            cmd.args(&cluster.launcher_args).arg("--").arg("--out").arg(&runs);
            cmd
        }
    };
    for set in sets {
        cmd.arg("--set").arg(set);
    }
    if resume {
        cmd.arg("--resume");
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(study, trial))?;
    cmd.stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
    // SAFETY: prctl in the child before exec, async-signal-safe. The death signal follows the
    // thread that spawns the child: a tokio worker thread, which lives as long as the driver.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Ok(cmd)
}

pub(super) fn log_path(study: &Study, trial: usize) -> PathBuf {
    study.dir.join(format!("{}.log", trial_name(trial)))
}

/// The launcher script: as the sweep file names it, or `scripts/launch-ssh.sh` of the source
/// tree the binary was built in, or of the current folder.
fn launcher(cluster: &ClusterSpec) -> anyhow::Result<PathBuf> {
    if let Some(path) = &cluster.launcher {
        anyhow::ensure!(path.is_file(), "[cluster] launcher {} does not exist", path.display());
        return Ok(path.clone());
    }
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/launch-ssh.sh");
    [built_in, PathBuf::from("scripts/launch-ssh.sh")]
        .into_iter()
        .find(|p| p.is_file())
        .context("cannot find scripts/launch-ssh.sh: name it in the sweep file ([cluster] launcher = \"…/launch-ssh.sh\")")
}

/// A trial attempt's process, as the driver and the trial's actor both see it.
#[derive(Clone)]
pub(super) struct TrialProcess {
    pid: u32,
    /// Its exit status, once it has been reaped (its pid may then be reused).
    status: tokio::sync::watch::Receiver<Option<ExitStatus>>,
}

impl TrialProcess {
    /// Starts the command and reaps it in the background.
    pub(super) fn spawn(command: Command) -> anyhow::Result<TrialProcess> {
        let mut child = tokio::process::Command::from(command).spawn().context("cannot start a trial")?;
        let pid = child.id().context("the trial's process ended before it could be watched")?;
        let (tx, status) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.unwrap_or_else(|e| {
                tracing::warn!("cannot wait for a trial's process {pid}: {e}");
                ExitStatus::from_raw(1 << 8)
            });
            let _ = tx.send(Some(status));
        });
        Ok(TrialProcess { pid, status })
    }

    /// Signals the process while it has not been reaped.
    fn signal(&self, signal: libc::c_int) {
        if self.status.borrow().is_none() {
            // SAFETY: a signal to our own child, not yet reaped, so its pid is still its own.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// How it ended, once it has.
    pub(super) async fn exited(&self) -> ExitStatus {
        let mut status = self.status.clone();
        let ended = status.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        ended.unwrap_or(ExitStatus::from_raw(1 << 8))
    }

    /// SIGTERM (the run checkpoints and exits), SIGKILL after [`STOP_GRACE`]; returns once it
    /// has ended.
    pub(super) async fn stop(&self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(STOP_GRACE, self.exited()).await {
            Ok(status) => status,
            Err(_) => {
                self.signal(libc::SIGKILL);
                self.exited().await
            }
        }
    }
}

pub(super) enum TrialMsg {
    /// The scheduler stopped the trial: SIGTERM, the run checkpoints and exits.
    Stop,
    /// The process ended.
    Exited(ExitStatus),
}

pub(super) struct TrialArgs {
    pub trial: usize,
    pub process: TrialProcess,
    pub driver: ActorRef<DriverMsg>,
}

pub(super) struct TrialActor;

impl Actor for TrialActor {
    type Msg = TrialMsg;
    type State = TrialArgs;
    type Arguments = TrialArgs;

    async fn pre_start(&self, me: ActorRef<TrialMsg>, args: TrialArgs) -> Result<TrialArgs, ActorProcessingErr> {
        let process = args.process.clone();
        tokio::spawn(async move {
            let status = process.exited().await;
            let _ = me.send_message(TrialMsg::Exited(status));
        });
        Ok(args)
    }

    async fn handle(&self, me: ActorRef<TrialMsg>, msg: TrialMsg, state: &mut TrialArgs) -> Result<(), ActorProcessingErr> {
        match msg {
            TrialMsg::Stop => state.process.signal(libc::SIGTERM),
            TrialMsg::Exited(status) => {
                let _ = state.driver.send_message(DriverMsg::TrialExited { trial: state.trial, status });
                me.stop(None);
            }
        }
        Ok(())
    }

    /// Stopped from outside while its process runs (the driver stops): the process stops
    /// first, checkpointing.
    async fn post_stop(&self, _me: ActorRef<TrialMsg>, state: &mut TrialArgs) -> Result<(), ActorProcessingErr> {
        state.process.stop().await;
        Ok(())
    }
}
