//! The sweep driver: a ractor actor that supervises one [`TrialActor`] per running trial.
//!
//! Every 200 ms ([`DriverMsg::Tick`]) it starts trials into free slots (restarts first, then
//! the next new trial), reads the running trials' metrics in trial order and lets the
//! scheduler decide on them (a decision may wait on an earlier trial), stops the trials it
//! rules out, and settles the trials whose process ended: finished, restarted from the newest
//! checkpoint (up to `max_restarts`), or failed. A trial actor that fails counts as a crashed
//! attempt. Every decision is recorded in the study before it is acted on, and none depends on
//! timing, so a killed and resumed sweep ends as an uninterrupted one would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::follow::Follow;
use super::schedule::{Decision, Scheduler};
use super::spec::SweepSpec;
use super::study::{Study, StudyEvent};
use super::trial::{self, TrialActor, TrialArgs, TrialMsg, TrialProcess};
use super::{draw, eval_schedule, newest_checkpoint, report, SweepMetrics};

const TICK: Duration = Duration::from_millis(200);
/// The live table is printed at most this often, when something changed.
const TABLE_EVERY: Duration = Duration::from_secs(30);

pub(super) enum DriverMsg {
    Tick,
    /// A trial's process ended (sent by its actor, which then stops).
    TrialExited {
        trial: usize,
        status: ExitStatus,
    },
}

/// What the driver hands back when every trial has ended.
pub(super) struct DriverEnd {
    pub study: Study,
    /// Per trial, the furthest step its run reached.
    pub furthest: BTreeMap<usize, u64>,
}

pub(super) struct DriverArgs {
    pub spec: SweepSpec,
    pub study: Study,
    pub metrics: Option<SweepMetrics>,
    pub done: tokio::sync::oneshot::Sender<anyhow::Result<DriverEnd>>,
}

/// A trial attempt the driver supervises.
struct Running {
    actor: ActorRef<TrialMsg>,
    process: TrialProcess,
    /// Told to stop by the scheduler: its slot is free already (on this machine; a cluster
    /// group stays taken until the trial has checkpointed and its processes have ended).
    stopping: bool,
    /// Its host group under `[cluster]`.
    group: usize,
}

pub(super) struct DriverState {
    spec: SweepSpec,
    study: Option<Study>,
    scheduler: Scheduler,
    metrics: Option<SweepMetrics>,
    keys: Vec<String>,
    restart: VecDeque<usize>,
    running: BTreeMap<usize, Running>,
    actors: BTreeMap<ActorId, usize>,
    exited: BTreeMap<usize, ExitStatus>,
    follow: BTreeMap<usize, Follow>,
    schedules: BTreeMap<usize, (u64, u64)>,
    last_table: Instant,
    changed: bool,
    done: Option<tokio::sync::oneshot::Sender<anyhow::Result<DriverEnd>>>,
    error: Option<anyhow::Error>,
}

pub(super) struct SweepDriver;

impl Actor for SweepDriver {
    type Msg = DriverMsg;
    type State = DriverState;
    type Arguments = DriverArgs;

    async fn pre_start(&self, me: ActorRef<DriverMsg>, args: DriverArgs) -> Result<DriverState, ActorProcessingErr> {
        let n = args.study.trials.len();
        // Trials that were running when an earlier driver died continue from their checkpoints.
        let restart = (0..n).filter(|&t| args.study.trials[t].params.is_some() && args.study.trials[t].ended.is_none()).collect();
        me.send_interval(TICK, || DriverMsg::Tick);
        let _ = me.send_message(DriverMsg::Tick);
        Ok(DriverState {
            scheduler: Scheduler::new(&args.spec.scheduler, args.spec.direction == "minimize"),
            keys: args.spec.space.keys().cloned().collect(),
            spec: args.spec,
            study: Some(args.study),
            metrics: args.metrics,
            restart,
            running: BTreeMap::new(),
            actors: BTreeMap::new(),
            exited: BTreeMap::new(),
            follow: BTreeMap::new(),
            schedules: BTreeMap::new(),
            last_table: Instant::now(),
            changed: false,
            done: Some(args.done),
            error: None,
        })
    }

    async fn handle(&self, me: ActorRef<DriverMsg>, msg: DriverMsg, state: &mut DriverState) -> Result<(), ActorProcessingErr> {
        let result = match msg {
            DriverMsg::Tick => state.tick(&me).await,
            DriverMsg::TrialExited { trial, status } => {
                state.exited.entry(trial).or_insert(status);
                Ok(())
            }
        };
        if let Err(e) = result {
            // The study cannot be written (a full disk): stop, and the trials with it (their
            // actors stop their processes, which checkpoint); `--resume` continues.
            state.error = Some(e);
            me.stop(None);
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<DriverMsg>,
        event: SupervisionEvent,
        state: &mut DriverState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(trial) = state.actors.remove(&cell.get_id()) {
                    // A crashed attempt, over once its process has stopped (and checkpointed).
                    tracing::warn!("the supervisor of trial {trial} failed: {error}");
                    if let Some(process) = state.running.get(&trial).map(|r| r.process.clone()) {
                        tokio::spawn(async move {
                            process.stop().await;
                            let _ = me.send_message(DriverMsg::TrialExited { trial, status: ExitStatus::from_raw(1 << 8) });
                        });
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.actors.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(&self, me: ActorRef<DriverMsg>, state: &mut DriverState) -> Result<(), ActorProcessingErr> {
        // Trials still running (the driver stopped on an error) stop with it.
        for run in state.running.values() {
            run.actor.stop(None);
        }
        for run in std::mem::take(&mut state.running).into_values() {
            let _ = run.actor.wait(None).await;
        }
        me.stop_children(None);
        let end = match (state.error.take(), state.study.take()) {
            (Some(e), _) => Err(e),
            (None, Some(study)) => Ok(DriverEnd { study, furthest: state.follow.iter().map(|(t, f)| (*t, f.furthest)).collect() }),
            (None, None) => Err(anyhow::anyhow!("the sweep driver stopped twice")),
        };
        if let Some(done) = state.done.take() {
            let _ = done.send(end);
        }
        Ok(())
    }
}

impl DriverState {
    fn study(&self) -> &Study {
        self.study.as_ref().expect("the study is taken only when the driver stops")
    }

    fn study_mut(&mut self) -> &mut Study {
        self.study.as_mut().expect("the study is taken only when the driver stops")
    }

    fn schedule(&mut self, trial: usize) -> (u64, u64) {
        let (spec, study) = (&self.spec, self.study.as_ref().expect("study"));
        *self.schedules.entry(trial).or_insert_with(|| eval_schedule(spec, study, trial))
    }

    /// A host group no running trial holds (under `[cluster]`); group 0 on this machine.
    fn free_group(&self) -> Option<usize> {
        let Some(cluster) = &self.spec.cluster else { return Some(0) };
        (0..cluster.groups()).find(|g| !self.running.values().any(|r| r.group == *g))
    }

    async fn tick(&mut self, me: &ActorRef<DriverMsg>) -> anyhow::Result<()> {
        self.start_trials(me).await?;
        if self.running.is_empty()
            && self.exited.is_empty()
            && self.restart.is_empty()
            && self.study().trials.iter().all(|t| t.ended.is_some())
        {
            if let Some(m) = &self.metrics {
                m.update(self.study(), &BTreeSet::new(), self.spec.direction == "minimize");
            }
            me.stop(None);
            return Ok(());
        }
        self.decide_reports()?;
        self.settle_exits()?;
        let live: BTreeSet<usize> = self.running.iter().filter(|(_, r)| !r.stopping).map(|(t, _)| *t).collect();
        if let Some(m) = &self.metrics {
            m.update(self.study(), &live, self.spec.direction == "minimize");
        }
        if self.changed && self.last_table.elapsed() >= TABLE_EVERY {
            let keys: Vec<&String> = self.keys.iter().collect();
            troupe_common::say!("{}", report::table(self.study(), &keys, &live));
            (self.last_table, self.changed) = (Instant::now(), false);
        }
        Ok(())
    }

    /// Starts trials while there are free slots: restarts first, then the next new trial.
    async fn start_trials(&mut self, me: &ActorRef<DriverMsg>) -> anyhow::Result<()> {
        let n = self.study().trials.len();
        loop {
            let busy = self.running.values().filter(|r| !r.stopping).count();
            let Some(group) = self.free_group().filter(|_| busy < self.spec.parallel) else { break };
            let trial = if let Some(t) = self.restart.pop_front() {
                if self.study().trials[t].ended.is_some() {
                    continue; // stopped while it waited for a slot
                }
                // A run that already reached its last step (a driver died while its final
                // reports waited on an earlier trial) has nothing left to train: it is an exit.
                let last_step = self.schedule(t).1;
                if newest_checkpoint(&self.study().run_dir(t)).is_some_and(|s| s >= last_step) {
                    self.exited.insert(t, ExitStatus::from_raw(0));
                    continue;
                }
                t
            } else if let Some(t) = (0..n).find(|&t| self.study().trials[t].params.is_none()) {
                let Some((params, checked)) = draw(&self.spec, self.study(), t) else {
                    break; // TPE waits for the results it samples from
                };
                self.study_mut().record(StudyEvent::TrialStarted { trial: t, params })?;
                if let Err(e) = checked {
                    self.study_mut().record(StudyEvent::Failed { trial: t, error: format!("{e:#}") })?;
                    continue;
                }
                t
            } else {
                break;
            };
            let params = self.study().trials[trial].params.clone().unwrap_or_default();
            self.exited.remove(&trial);
            let process = trial::command(&self.spec, self.study(), trial, &params, group).and_then(TrialProcess::spawn);
            let process = match process {
                Ok(p) => p,
                // It could not start (no such launcher, no processes left): a failed attempt.
                Err(e) => {
                    troupe_common::say_err!("trial {trial} did not start: {e:#}");
                    self.exited.insert(trial, ExitStatus::from_raw(1 << 8));
                    continue;
                }
            };
            let args = TrialArgs { trial, process: process.clone(), driver: me.clone() };
            let (actor, _) = Actor::spawn_linked(None, TrialActor, args, me.get_cell()).await?;
            self.actors.insert(actor.get_id(), trial);
            self.running.insert(trial, Running { actor, process, stopping: false, group });
            self.changed = true;
        }
        Ok(())
    }

    /// Reports, in trial order: a decision may wait on an earlier trial's report.
    fn decide_reports(&mut self) -> anyhow::Result<()> {
        for trial in 0..self.study().trials.len() {
            let t = &self.study().trials[trial];
            if t.params.is_none() || t.ended.is_some() {
                continue;
            }
            let recorded_up_to = t.last().map(|l| l.0);
            let schedule = self.schedule(trial);
            let run_dir = self.study().run_dir(trial);
            let follow = self.follow.entry(trial).or_default();
            follow.read(&run_dir, &self.spec.metric, recorded_up_to, schedule);
            while let Some((&step, &metric)) = follow.unrecorded.first_key_value() {
                let study = self.study.as_mut().expect("study");
                let decision = self.scheduler.decide(trial, step, metric, |s| study.at_step(s, step));
                if decision == Decision::Wait {
                    break;
                }
                follow.unrecorded.remove(&step);
                study.record(StudyEvent::Reported { trial, step, metric })?;
                self.changed = true;
                if decision == Decision::Stop {
                    study.record(StudyEvent::Stopped { trial, step })?;
                    if let Some(run) = self.running.get_mut(&trial) {
                        let _ = run.actor.send_message(TrialMsg::Stop);
                        run.stopping = true;
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Exits. A trial that exited cleanly ends once its last reports are decided; one that
    /// crashed (or stopped before its last step) is restarted from its checkpoint, up to the
    /// limit.
    fn settle_exits(&mut self) -> anyhow::Result<()> {
        for trial in self.exited.keys().copied().collect::<Vec<_>>() {
            self.running.remove(&trial);
            let status = self.exited[&trial];
            if self.study().trials[trial].ended.is_some() {
                self.exited.remove(&trial);
                continue;
            }
            // Read once more: what it wrote just before exiting.
            let schedule = self.schedule(trial);
            let run_dir = self.study().run_dir(trial);
            let last = self.study().trials[trial].last();
            let follow = self.follow.entry(trial).or_default();
            follow.read(&run_dir, &self.spec.metric, last.map(|l| l.0), schedule);
            // A clean exit before train.steps (a SIGTERM from outside the driver) is not the
            // end of the trial: it continues from its checkpoint like a crashed one.
            let reached = newest_checkpoint(&run_dir).unwrap_or(0).max(follow.furthest);
            let pending = !follow.unrecorded.is_empty();
            let restarts = self.study().trials[trial].restarts;
            if status.success() && reached >= schedule.1 {
                if pending {
                    continue; // a decision still waits on an earlier trial
                }
                self.study_mut().record(StudyEvent::Finished { trial, step: last.map_or(0, |l| l.0), metric: last.map(|l| l.1) })?;
            } else if restarts < self.spec.max_restarts {
                let reason = if status.success() {
                    format!("the run stopped at step {reached} of {}", schedule.1)
                } else {
                    format!("the run exited with {status}")
                };
                self.study_mut().record(StudyEvent::Restarted { trial, attempt: restarts + 1, reason })?;
                self.restart.push_back(trial);
            } else {
                let error = format!(
                    "the run exited with {status} after {} restarts; see {}",
                    self.spec.max_restarts,
                    trial::log_path(self.study(), trial).display()
                );
                self.study_mut().record(StudyEvent::Failed { trial, error })?;
            }
            self.exited.remove(&trial);
            self.changed = true;
        }
        Ok(())
    }
}
