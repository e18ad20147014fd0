//! The cluster state machine of the coordinator: no I/O, no async, no clock reads.
//!
//! [`Core::on`] takes the time and one [`Event`] (a worker joined, a message arrived, a
//! checkpoint committed, a timer tick) and returns the [`Command`]s the actors must carry out
//! (send a message, commit a checkpoint, record a run event, finish). Every scenario — a worker
//! lost mid-step, a checkpoint that fails to commit, a lease that expires — is therefore a fast,
//! deterministic unit test with simulated time.
//!
//! A run goes through these phases:
//! `Gathering` (wait for `cluster.workers` to join) → `Forming` (ranks assigned for a new
//! membership *generation*; wait until every rank has its model and has formed the ring) →
//! `Syncing` (only when the ranks hold different states: one rank's parameters and optimizer
//! state are broadcast to the others) → `Training` (one step at a time: send `Step` to every
//! rank, wait for every `StepDone`) → `Finishing` (wait for the last evaluation and
//! checkpoint) → `Done`.
//!
//! Elastic membership: when a member is lost (connection closed, lease expired, collective
//! failed) or leaves, or a worker joins, the core starts a new generation — back to `Forming`
//! with the workers it has. Replicas are identical, so the survivors carry on from the state
//! they hold; the only subtlety is a step that some survivors completed and others did not
//! (the failure struck inside the all-reduce). Every rank tells in `Ready` how many steps it
//! has completed; the most advanced one is the truth (its all-reduce got every rank's
//! gradient), and the others are synced from it. The global batch and the sampler's cursor
//! depend on the step only, so no sample is lost or repeated whatever the world size. Below
//! `cluster.min_workers` the run is `Paused` until workers join. When no worker holds the
//! state (all were lost, or this coordinator was restarted), it is loaded from the newest
//! checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use crate::run_dir;
use crate::config::{CollectiveBackend, Config};
use crate::events::RunEvent;
use crate::proto::{
    Assignment, Capabilities, CollectiveKind, EvalReport, FileDigest, NcclPlace, RefusalKind, RingPlace, StepReport, ToCoordinator,
    ToWorker, NCCL_UNIQUE_ID_BYTES,
};

pub type WorkerId = u64;

/// Re-forming after collective failures, without a step completed in between, gives up after
/// this many attempts: something is wrong that a new ring does not fix.
pub const MAX_FAILED_REGROUPS: u32 = 5;

/// Something that happened, as the actors saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker passed the handshake (version and token checked by its session).
    WorkerJoined {
        id: WorkerId,
        info: Capabilities,
    },
    /// A worker's connection ended or its session failed.
    WorkerLost {
        id: WorkerId,
        reason: String,
    },
    /// A message from a joined worker.
    FromWorker {
        id: WorkerId,
        msg: ToCoordinator,
    },
    CheckpointCommitted {
        step: u64,
        path: String,
    },
    CheckpointCommitFailed {
        step: u64,
        error: String,
    },
    /// Periodic timer: leases are checked here.
    Tick,
    /// SIGINT/SIGTERM: finish the current step, checkpoint, stop.
    ShutdownRequested,
}

/// Something the actors must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Send {
        to: WorkerId,
        msg: ToWorker,
    },
    /// Close the worker's connection (after any `Send` before it).
    Disconnect {
        id: WorkerId,
        reason: String,
    },
    /// Check and commit the checkpoint the ranks wrote into its temporary folder.
    CommitCheckpoint {
        step: u64,
        generation: u64,
        world_size: u32,
        files: Vec<FileDigest>,
    },
    /// Append to events.jsonl, update metrics, show progress.
    Record(RunEvent),
    /// The run is over.
    Finish {
        ok: bool,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Gathering,
    Forming,
    Syncing,
    Training,
    Paused,
    Finishing,
    Done,
}

/// Where a resumed run starts from (found by the actor, which may read the disk).
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeFrom {
    pub dir: String,
    pub step: u64,
}

#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub info: Capabilities,
    /// Its rank in the current generation; `None` while it waits to be taken in.
    pub rank: Option<u32>,
    /// Has answered `Ready` for the current generation.
    pub ready: bool,
    /// Has answered `Synced` for the current generation.
    pub synced: bool,
    /// Completed steps of the state it holds, from its last `Ready`.
    pub completed: Option<u64>,
    /// Holds the run's training state (it was a ready member of some generation); a worker
    /// that just joined holds only a freshly initialised model.
    pub holds_state: bool,
    /// Asked to leave at the next step boundary.
    pub leaving: bool,
    pub last_seen: Instant,
    /// Its last step's data + compute + communication time.
    pub last_step_seconds: Option<f64>,
}

impl WorkerEntry {
    /// One word for `troupe status`.
    pub fn state_name(&self, phase: Phase) -> &'static str {
        match (self.rank, phase) {
            _ if self.leaving => "leaving",
            (None, _) => "waiting",
            (Some(_), Phase::Forming) if self.ready => "ready",
            (Some(_), Phase::Forming | Phase::Gathering) => "forming",
            (Some(_), Phase::Syncing) => "syncing",
            (Some(_), Phase::Training) => "training",
            (Some(_), _) => "idle",
        }
    }
}

/// A checkpoint whose files the ranks are writing.
#[derive(Debug, Clone)]
struct PendingCheckpoint {
    requested_at: Instant,
    reported: BTreeSet<u32>,
    files: Vec<FileDigest>,
    committing: bool,
}

/// What `troupe status` and the metrics show about the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub phase: Phase,
    pub completed_steps: u64,
    pub total_steps: u64,
    pub workers: usize,
    /// Ranks of the current generation.
    pub world_size: usize,
    pub generation: u64,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub last_tokens_per_second: Option<f64>,
}

pub struct Core {
    config: Config,
    run_dir: PathBuf,
    phase: Phase,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    /// rank → worker, for the current generation.
    ranks: Vec<WorkerId>,
    generation: u64,
    /// How the current generation's ranks combine gradients.
    collective: CollectiveKind,
    /// The current generation's NCCL group (workers in rank order; empty for a ring).
    nccl_group: Vec<WorkerId>,
    /// The group's unique id went out for the current generation (a second is ignored).
    nccl_id_forwarded: bool,
    /// NCCL could not form a communicator in this run (`parallel.collective = "auto"`): the
    /// rest of the run uses the ring rather than fail the same way again.
    nccl_failed: bool,
    /// The newest committed checkpoint (at first, the one this run resumes from).
    latest_checkpoint: Option<ResumeFrom>,
    /// Completed optimizer steps.
    completed: u64,
    step_started_at: Option<Instant>,
    step_reports: BTreeMap<u32, StepReport>,
    /// A report of step `completed` from a generation that did not finish it everywhere:
    /// if a survivor completed that step, this is its record.
    partial_step: Option<StepReport>,
    eval: Option<(u64, BTreeMap<u32, EvalReport>)>,
    checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// Work abandoned by a membership change, to request again once training resumes.
    redo_eval: bool,
    redo_checkpoint: bool,
    /// When the current membership change began (for the `Regrouped` event).
    regroup_started_at: Option<Instant>,
    failed_regroups: u32,
    /// A resumed run (a restarted coordinator) may start without workers that did not come
    /// back: with `min_workers`, once this passes without a new join.
    resumed: bool,
    gather_deadline: Option<Instant>,
    stop_requested: bool,
    started_at: Option<Instant>,
    last_loss: Option<f64>,
    last_val_loss: Option<f64>,
    last_checkpoint: Option<String>,
    last_tokens_per_second: Option<f64>,
}

impl Core {
    pub fn new(config: Config, resume: Option<ResumeFrom>) -> Core {
        let completed = resume.as_ref().map_or(0, |r| r.step);
        let resumed = resume.is_some();
        Core {
            run_dir: config.run_dir(),
            config,
            phase: Phase::Gathering,
            workers: BTreeMap::new(),
            collective: CollectiveKind::Ring,
            nccl_group: Vec::new(),
            nccl_id_forwarded: false,
            nccl_failed: false,
            ranks: Vec::new(),
            generation: 0,
            latest_checkpoint: resume,
            completed,
            step_started_at: None,
            step_reports: BTreeMap::new(),
            partial_step: None,
            eval: None,
            checkpoints: BTreeMap::new(),
            redo_eval: false,
            redo_checkpoint: false,
            regroup_started_at: None,
            failed_regroups: 0,
            resumed,
            gather_deadline: None,
            stop_requested: false,
            started_at: None,
            last_loss: None,
            last_val_loss: None,
            last_checkpoint: None,
            last_tokens_per_second: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn workers(&self) -> &BTreeMap<WorkerId, WorkerEntry> {
        &self.workers
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase,
            completed_steps: self.completed,
            total_steps: self.config.train.steps,
            workers: self.workers.len(),
            world_size: self.ranks.len(),
            generation: self.generation,
            last_loss: self.last_loss,
            last_val_loss: self.last_val_loss,
            last_checkpoint: self.last_checkpoint.clone(),
            last_tokens_per_second: self.last_tokens_per_second,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn on(&mut self, now: Instant, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::WorkerJoined { id, info } => self.on_joined(now, id, info, &mut out),
            Event::WorkerLost { id, reason } => self.on_lost(now, id, reason, &mut out),
            Event::FromWorker { id, msg } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.last_seen = now;
                    self.on_message(now, id, msg, &mut out);
                }
            }
            Event::CheckpointCommitted { step, path } => {
                if let Some(p) = self.checkpoints.remove(&step) {
                    let seconds = now.saturating_duration_since(p.requested_at).as_secs_f64();
                    self.last_checkpoint = Some(path.clone());
                    self.latest_checkpoint = Some(ResumeFrom { dir: path.clone(), step });
                    out.push(Command::Record(RunEvent::Checkpoint { step, path, seconds }));
                }
                self.maybe_done(now, &mut out);
            }
            Event::CheckpointCommitFailed { step, error } => {
                // The previous checkpoint stays the newest; training goes on.
                if self.checkpoints.remove(&step).is_some() {
                    out.push(Command::Record(RunEvent::CheckpointFailed { step, error }));
                }
                self.maybe_done(now, &mut out);
            }
            Event::Tick => {
                self.check_leases(now, &mut out);
                self.check_gathering(now, &mut out);
            }
            Event::ShutdownRequested => self.request_stop(now, &mut out),
        }
        out
    }

    /// Stop at the next step boundary, after a last checkpoint.
    fn request_stop(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.stop_requested = true;
        match self.phase {
            Phase::Gathering => self.finish(now, false, Some("stopped before training started".into()), out),
            Phase::Forming | Phase::Syncing if self.started_at.is_none() => {
                self.finish(now, false, Some("stopped before training started".into()), out)
            }
            Phase::Paused => {
                let error = format!(
                    "stopped while paused ({} of cluster.min_workers = {} workers); `--resume` continues from the newest checkpoint",
                    self.workers.len(),
                    self.config.cluster.min_workers
                );
                self.finish(now, false, Some(error), out)
            }
            // Training: the next step boundary checkpoints and stops. Forming/Syncing: as soon
            // as training resumes.
            _ => {}
        }
    }

    fn on_joined(&mut self, now: Instant, id: WorkerId, info: Capabilities, out: &mut Vec<Command>) {
        let cluster = &self.config.cluster;
        let room = match self.phase {
            Phase::Gathering => self.workers.len() < cluster.workers,
            Phase::Forming | Phase::Syncing | Phase::Training | Phase::Paused => self.workers.len() < cluster.max_workers(),
            Phase::Finishing | Phase::Done => false,
        };
        if !room {
            let reason =
                format!("the run already has its {} workers (phase {:?}); this worker is not needed", self.workers.len(), self.phase);
            out.push(Command::Send { to: id, msg: ToWorker::Refused { kind: RefusalKind::ClusterFull, reason: reason.clone() } });
            out.push(Command::Disconnect { id, reason });
            return;
        }
        self.workers.insert(
            id,
            WorkerEntry {
                info,
                rank: None,
                ready: false,
                synced: false,
                completed: None,
                holds_state: false,
                leaving: false,
                last_seen: now,
                last_step_seconds: None,
            },
        );
        out.push(Command::Send {
            to: id,
            msg: ToWorker::Welcome {
                worker_id: id,
                heartbeat_ms: self.config.cluster.heartbeat_ms,
                lease_ms: self.config.cluster.lease_ms,
                rejoin_ms: self.config.cluster.rejoin_ms,
            },
        });
        let addr = self.workers[&id].info.peer_addr;
        match self.phase {
            Phase::Gathering if self.workers.len() == self.config.cluster.workers => self.form(now, out),
            Phase::Gathering => {
                // Each join gives the others another lease to come back.
                if self.resumed && self.workers.len() >= self.config.cluster.min_workers {
                    self.gather_deadline = Some(now + Duration::from_millis(self.config.cluster.lease_ms));
                }
            }
            // Forming again at once includes the newcomer without waiting a whole generation.
            Phase::Forming | Phase::Syncing => {
                self.note_change(now, format!("worker {id} ({addr}) joined"), out);
                self.form(now, out)
            }
            Phase::Paused if self.workers.len() >= self.config.cluster.min_workers => {
                self.note_change(now, format!("worker {id} ({addr}) joined"), out);
                self.form(now, out)
            }
            // Taken in at the next step boundary.
            _ => {}
        }
    }

    /// Records why membership changes (once per change) and starts its clock.
    fn note_change(&mut self, now: Instant, why: String, out: &mut Vec<Command>) {
        self.regroup_started_at.get_or_insert(now);
        out.push(Command::Record(RunEvent::Warning { step: self.completed, message: format!("membership change: {why}") }));
    }

    /// Starts a new generation with every worker present (except those leaving): ranks in
    /// join order, each told its successor in the ring. Whatever the previous generation was
    /// doing is given up (and requested again once training resumes).
    fn form(&mut self, now: Instant, out: &mut Vec<Command>) {
        let members: Vec<WorkerId> = self.workers.iter().filter(|(_, w)| !w.leaving).map(|(id, _)| *id).collect();
        if self.phase != Phase::Gathering && members.len() < self.config.cluster.min_workers {
            self.pause(now, out);
            return;
        }
        self.abandon_work(out);
        self.generation += 1;
        self.ranks = members;
        // Survivors carry the state on; only when none holds it does it come from disk. A
        // sharded state (zero1/2/3) is split by world size and one member's part is gone with
        // it: a new generation always starts from the newest checkpoint, resharded.
        let replicas = self.config.parallel.strategy == crate::shard::Strategy::Ddp;
        let holders = replicas && self.ranks.iter().any(|id| self.workers[id].holds_state);
        let (resume_from, start_step) = if holders {
            (None, self.completed)
        } else {
            match self.latest_checkpoint.clone() {
                Some(c) => {
                    if c.step != self.completed {
                        out.push(Command::Record(RunEvent::Warning {
                            step: self.completed,
                            message: format!("no worker holds the training state: continuing from checkpoint {} (step {})", c.dir, c.step),
                        }));
                    }
                    self.completed = c.step;
                    (Some(c.dir), c.step)
                }
                None => {
                    if self.completed > 0 {
                        out.push(Command::Record(RunEvent::Warning {
                            step: self.completed,
                            message: "no worker holds the training state and there is no checkpoint: starting again from step 0".into(),
                        }));
                    }
                    self.completed = 0;
                    (None, 0)
                }
            }
        };
        let world = self.ranks.len() as u32;
        self.collective = match self.choose_collective() {
            Ok(kind) => kind,
            Err(why) => return self.abort(why, out),
        };
        // Who is in the NCCL group and who in the ring: everyone in the ring for a ring
        // generation; nobody for NCCL; for a mixed one, the group's rank 0 stands in the ring
        // for the whole group.
        let nccl_capable = |id: &WorkerId| self.workers[id].info.nccl;
        self.nccl_id_forwarded = false;
        self.nccl_group = match self.collective {
            CollectiveKind::Ring => Vec::new(),
            CollectiveKind::Nccl => self.ranks.clone(),
            CollectiveKind::Mixed => self.ranks.iter().copied().filter(nccl_capable).collect(),
        };
        let ring_members: Vec<WorkerId> = match self.collective {
            CollectiveKind::Ring => self.ranks.clone(),
            CollectiveKind::Nccl => Vec::new(),
            CollectiveKind::Mixed => {
                self.ranks.iter().copied().filter(|id| !nccl_capable(id) || Some(id) == self.nccl_group.first()).collect()
            }
        };
        for (rank, id) in self.ranks.iter().enumerate() {
            let ring = ring_members.iter().position(|m| m == id).map(|r| RingPlace {
                rank: r as u32,
                world_size: ring_members.len() as u32,
                successor: self.workers[&ring_members[(r + 1) % ring_members.len()]].info.peer_addr,
            });
            let nccl = self
                .nccl_group
                .iter()
                .position(|m| m == id)
                .map(|r| NcclPlace { rank: r as u32, world_size: self.nccl_group.len() as u32 });
            if let Some(w) = self.workers.get_mut(id) {
                w.rank = Some(rank as u32);
                w.ready = false;
                w.synced = false;
                w.completed = None;
            }
            out.push(Command::Send {
                to: *id,
                msg: ToWorker::Assign(Assignment {
                    rank: rank as u32,
                    world_size: world,
                    generation: self.generation,
                    ring,
                    nccl,
                    config_toml: self.config.to_toml(),
                    run_dir: self.run_dir.display().to_string(),
                    resume_from: resume_from.clone(),
                    start_step,
                }),
            });
        }
        for (rank, id) in self.ranks.iter().enumerate() {
            let info = &self.workers[id].info;
            out.push(Command::Record(RunEvent::WorkerJoined {
                step: self.completed,
                rank: rank as u32,
                worker_id: *id,
                addr: info.peer_addr.to_string(),
                hostname: info.hostname.clone(),
            }));
        }
        self.phase = Phase::Forming;
    }

    /// Fewer than `min_workers`: everyone drops what it is doing and waits for workers.
    fn pause(&mut self, _now: Instant, out: &mut Vec<Command>) {
        self.abandon_work(out);
        self.generation += 1;
        self.ranks.clear();
        let reason = format!(
            "{} of cluster.min_workers = {} workers: waiting for workers to join",
            self.workers.len(),
            self.config.cluster.min_workers
        );
        for (id, w) in self.workers.iter_mut() {
            w.rank = None;
            w.ready = false;
            out.push(Command::Send { to: *id, msg: ToWorker::Pause { generation: self.generation, reason: reason.clone() } });
        }
        out.push(Command::Record(RunEvent::Paused {
            step: self.completed,
            workers: self.workers.len() as u32,
            min_workers: self.config.cluster.min_workers as u32,
            reason,
        }));
        self.phase = Phase::Paused;
    }

    /// Gives up the current generation's step, evaluation and unfinished checkpoints.
    fn abandon_work(&mut self, out: &mut Vec<Command>) {
        if let Some(report) = self.step_reports.values().next() {
            if report.step == self.completed {
                self.partial_step = Some(report.clone());
            }
        }
        self.step_reports.clear();
        if self.eval.take().is_some() {
            self.redo_eval = true;
        }
        let abandoned: Vec<u64> = self.checkpoints.iter().filter(|(_, p)| !p.committing).map(|(s, _)| *s).collect();
        for step in abandoned {
            self.checkpoints.remove(&step);
            self.redo_checkpoint = true;
            out.push(Command::Record(RunEvent::Warning {
                step,
                message: format!(
                    "the checkpoint at step {step} was not complete when membership changed: it is written again once training resumes"
                ),
            }));
        }
    }

    fn on_lost(&mut self, now: Instant, id: WorkerId, reason: String, out: &mut Vec<Command>) {
        let Some(entry) = self.workers.remove(&id) else { return };
        out.push(Command::Record(RunEvent::WorkerLeft { step: self.completed, rank: entry.rank, worker_id: id, reason: reason.clone() }));
        let was_member = entry.rank.is_some() && self.ranks.contains(&id);
        let why =
            format!("worker {id} (rank {}, {}) was lost: {reason}", entry.rank.map_or("-".into(), |r| r.to_string()), entry.info.peer_addr);
        match self.phase {
            Phase::Gathering | Phase::Done | Phase::Paused => {}
            // It owed nothing (a joiner waiting for the next step boundary).
            _ if !was_member => {}
            // Finished stepping; only an unfinished evaluation or checkpoint needs the ranks.
            Phase::Finishing if self.eval.is_none() && self.checkpoints.values().all(|p| p.committing) => {
                self.ranks.retain(|r| *r != id);
                self.maybe_done(now, out);
            }
            _ => {
                self.note_change(now, why, out);
                self.form(now, out);
            }
        }
    }

    fn abort(&mut self, error: String, out: &mut Vec<Command>) {
        out.push(Command::Record(RunEvent::Failed { step: self.completed, error: error.clone() }));
        for id in self.workers.keys() {
            out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: format!("run failed: {error}") } });
        }
        self.phase = Phase::Done;
        out.push(Command::Finish { ok: false, error: Some(error) });
    }

    fn rank_of(&self, id: WorkerId) -> Option<u32> {
        self.workers.get(&id).and_then(|w| w.rank)
    }

    fn describe(&self, id: WorkerId) -> String {
        match self.workers.get(&id) {
            Some(w) => format!("worker {id} (rank {}, {})", w.rank.map_or("-".into(), |r| r.to_string()), w.info.peer_addr),
            None => format!("worker {id}"),
        }
    }

    /// NCCL when the configuration allows it and every member can join a communicator (a
    /// CUDA worker built with NCCL); with `auto`, mixed when at least two members can and
    /// others cannot (NCCL among those, the ring with the rest); the QUIC ring otherwise. A
    /// world of one needs neither. An error when `parallel.collective = "nccl"` and a member
    /// cannot use it.
    fn choose_collective(&self) -> Result<CollectiveKind, String> {
        let unable: Vec<String> = self
            .ranks
            .iter()
            .filter_map(|id| {
                let w = &self.workers[id];
                (!w.info.nccl).then(|| format!("worker {id} on {} ({})", w.info.hostname, w.info.device))
            })
            .collect();
        match self.config.parallel.collective {
            CollectiveBackend::Ring => Ok(CollectiveKind::Ring),
            _ if self.ranks.len() < 2 => Ok(CollectiveKind::Ring),
            CollectiveBackend::Auto if self.nccl_failed => Ok(CollectiveKind::Ring),
            CollectiveBackend::Auto if unable.is_empty() => Ok(CollectiveKind::Nccl),
            CollectiveBackend::Auto if self.ranks.len() - unable.len() >= 2 => Ok(CollectiveKind::Mixed),
            CollectiveBackend::Auto => Ok(CollectiveKind::Ring),
            CollectiveBackend::Nccl if unable.is_empty() => Ok(CollectiveKind::Nccl),
            CollectiveBackend::Nccl => Err(format!(
                "parallel.collective = \"nccl\", but {} cannot use NCCL (it needs a CUDA device, \
                 a troupe built with --features cuda, and libnccl); use \"auto\" to let such \
                 members average over the QUIC ring",
                unable.join(", ")
            )),
        }
    }

    /// A new generation after a failed collective, unless too many in a row failed.
    fn regroup_after_failure(&mut self, now: Instant, why: String, out: &mut Vec<Command>) {
        self.failed_regroups += 1;
        if self.failed_regroups > MAX_FAILED_REGROUPS {
            self.abort(format!("{why}; {MAX_FAILED_REGROUPS} new rings in a row failed without completing a step"), out);
            return;
        }
        self.note_change(now, why, out);
        self.form(now, out);
    }

    fn on_message(&mut self, now: Instant, id: WorkerId, msg: ToCoordinator, out: &mut Vec<Command>) {
        match msg {
            ToCoordinator::Hello(_) => {
                let reason = "protocol error: a second Hello on an established connection".to_string();
                out.push(Command::Disconnect { id, reason: reason.clone() });
                self.on_lost(now, id, reason, out);
            }
            ToCoordinator::Heartbeat => {}
            ToCoordinator::Ready { generation, completed_steps } => {
                if generation != self.generation || self.phase != Phase::Forming || self.rank_of(id).is_none() {
                    return;
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.ready = true;
                    w.completed = Some(completed_steps);
                }
                if self.ranks.iter().all(|r| self.workers.get(r).is_some_and(|w| w.ready)) {
                    self.all_ready(now, out);
                }
            }
            ToCoordinator::Synced { generation, step } => {
                if generation != self.generation || self.phase != Phase::Syncing || step != self.completed {
                    return;
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.synced = true;
                }
                if self.ranks.iter().all(|r| self.workers.get(r).is_some_and(|w| w.synced)) {
                    self.resume_training(now, true, out);
                }
            }
            ToCoordinator::StepDone(report) => {
                if report.generation != self.generation {
                    // A survivor that completed the step its generation was interrupted in:
                    // kept, in case that step turns out completed (see `all_ready`).
                    if report.step == self.completed {
                        self.partial_step = Some(report);
                    }
                    return;
                }
                let Some(rank) = self.rank_of(id) else { return };
                if self.phase != Phase::Training || report.step != self.completed {
                    return;
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.last_step_seconds = Some(report.data_seconds + report.compute_seconds + report.comm_seconds);
                }
                self.step_reports.insert(rank, report);
                if self.step_reports.len() == self.ranks.len() {
                    self.complete_step(now, out);
                }
            }
            ToCoordinator::CollectiveFailed { generation, step, error } => {
                if generation != self.generation || !matches!(self.phase, Phase::Forming | Phase::Syncing | Phase::Training) {
                    return;
                }
                let at = step.map_or("forming the ring".to_string(), |s| format!("step {s}"));
                let why = format!("{} reports a failed collective ({at}): {error}", self.describe(id));
                self.regroup_after_failure(now, why, out);
            }
            ToCoordinator::NcclFailed { generation, error } => {
                if generation != self.generation || self.collective == CollectiveKind::Ring || self.phase != Phase::Forming {
                    return;
                }
                let mut why = format!("{} could not set up NCCL: {error}", self.describe(id));
                if self.config.parallel.collective == CollectiveBackend::Auto {
                    // NCCL that cannot even form (two ranks on one GPU, no route between the
                    // hosts, a library problem) would fail the same way again: fall back.
                    self.nccl_failed = true;
                    why.push_str("; the rest of the run averages over the QUIC ring (parallel.collective = \"auto\")");
                }
                self.regroup_after_failure(now, why, out);
            }
            ToCoordinator::EvalDone(report) => {
                if report.generation != self.generation {
                    return;
                }
                let Some(rank) = self.rank_of(id) else { return };
                let Some((step, reports)) = self.eval.as_mut() else { return };
                if report.step != *step {
                    return;
                }
                reports.insert(rank, report);
                if reports.len() == self.ranks.len() {
                    let (step, reports) = self.eval.take().expect("checked above");
                    let loss_sum: f64 = reports.values().map(|r| r.loss_sum).sum();
                    let sequences: u64 = reports.values().map(|r| r.sequences).sum();
                    let val_loss = loss_sum / sequences.max(1) as f64;
                    self.last_val_loss = Some(val_loss);
                    out.push(Command::Record(RunEvent::Eval { step, val_loss, sequences }));
                    self.maybe_done(now, out);
                }
            }
            ToCoordinator::CheckpointWritten { generation, step, files } => {
                if generation != self.generation {
                    return;
                }
                let Some(rank) = self.rank_of(id) else { return };
                let world = self.ranks.len();
                let Some(p) = self.checkpoints.get_mut(&step) else { return };
                if p.committing || !p.reported.insert(rank) {
                    return;
                }
                p.files.extend(files);
                if p.reported.len() == world {
                    p.committing = true;
                    let files = p.files.clone();
                    out.push(Command::CommitCheckpoint { step, generation, world_size: world as u32, files });
                }
            }
            ToCoordinator::CheckpointFailed { generation, step, error } => {
                if generation != self.generation {
                    return;
                }
                if self.checkpoints.remove(&step).is_some() {
                    let rank = self.rank_of(id);
                    out.push(Command::Record(RunEvent::CheckpointFailed {
                        step,
                        error: format!("rank {rank:?} could not write its part: {error}"),
                    }));
                    self.maybe_done(now, out);
                }
            }
            ToCoordinator::Leaving { reason } => {
                let who = self.describe(id);
                let Some(w) = self.workers.get_mut(&id) else { return };
                w.leaving = true;
                if w.rank.is_none() || self.phase == Phase::Paused {
                    // Owes nothing: let it go now.
                    out.push(Command::Send { to: id, msg: ToWorker::Stop { reason: "left as asked".into() } });
                    return;
                }
                out.push(Command::Record(RunEvent::Warning {
                    step: self.completed,
                    message: format!("{who} is leaving ({reason}): it leaves the run at the next step boundary"),
                }));
            }
            ToCoordinator::NcclUniqueId { generation, id: unique_id } => {
                // Only the current NCCL group's rank 0 hands out the id; anything else is an
                // old generation's (ignored).
                let current = generation == self.generation && self.phase == Phase::Forming && self.collective != CollectiveKind::Ring;
                if !current || self.nccl_group.first() != Some(&id) || self.nccl_id_forwarded {
                    return;
                }
                self.nccl_id_forwarded = true;
                if unique_id.len() != NCCL_UNIQUE_ID_BYTES {
                    let reason = format!("protocol error: an ncclUniqueId of {} bytes (expected {NCCL_UNIQUE_ID_BYTES})", unique_id.len());
                    out.push(Command::Disconnect { id, reason: reason.clone() });
                    self.on_lost(now, id, reason, out);
                    return;
                }
                for to in &self.nccl_group {
                    out.push(Command::Send { to: *to, msg: ToWorker::NcclBootstrap { generation, id: unique_id.clone() } });
                }
            }
            ToCoordinator::Failed { error } => {
                // Before training ever started, a failing member is a failing setup (bad
                // data, a config the worker rejects): waiting for a replacement would not help.
                if self.started_at.is_none() && self.rank_of(id).is_some() {
                    let who = self.describe(id);
                    self.abort(format!("{who} failed: {error}"), out);
                    return;
                }
                let reason = format!("it failed: {error}");
                out.push(Command::Disconnect { id, reason: reason.clone() });
                self.on_lost(now, id, reason, out);
            }
        }
    }

    /// Every rank of the generation is ready: settle which state the run continues from.
    fn all_ready(&mut self, now: Instant, out: &mut Vec<Command>) {
        let held: Vec<u64> = self.ranks.iter().map(|id| self.workers[id].completed.unwrap_or(0)).collect();
        let target = held.iter().copied().max().unwrap_or(0);
        if target == self.completed + 1 {
            // Some survivor finished the step its generation was interrupted in: its
            // all-reduce had every rank's gradient, so that step counts.
            match self.partial_step.take() {
                Some(report) if report.step == self.completed => {
                    // Its generation's ranks together trained on the whole global batch.
                    let tokens = report.tokens * u64::from(report.world_size);
                    self.record_step(now, &report, tokens, 0.0, out);
                }
                _ => out.push(Command::Record(RunEvent::Warning {
                    step: self.completed,
                    message: format!("step {} was completed by a survivor whose report was not received", self.completed),
                })),
            }
            self.completed = target;
            let due = |interval: u64, completed: u64| interval > 0 && completed % interval == 0;
            self.redo_eval |= due(self.config.eval.interval, self.completed);
            self.redo_checkpoint |= due(self.config.checkpoint.interval, self.completed);
        } else if target != self.completed {
            let error = format!(
                "the ranks of generation {} hold states at steps {held:?}, but the run is at step {}: cannot continue consistently",
                self.generation, self.completed
            );
            self.abort(error, out);
            return;
        }
        self.partial_step = None;
        for (id, w) in self.workers.iter_mut() {
            if self.ranks.contains(id) {
                w.holds_state = true;
            }
        }
        if held.iter().all(|&c| c == target) {
            self.resume_training(now, false, out);
            return;
        }
        let source_rank = held.iter().position(|&c| c == target).expect("the maximum is held by someone") as u32;
        for id in &self.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Sync { generation: self.generation, source_rank, step: target } });
        }
        self.phase = Phase::Syncing;
    }

    fn resume_training(&mut self, now: Instant, synced: bool, out: &mut Vec<Command>) {
        self.phase = Phase::Training;
        let world_size = self.ranks.len() as u32;
        if self.started_at.is_none() {
            self.started_at = Some(now);
            out.push(Command::Record(RunEvent::Started {
                step: self.completed,
                world_size,
                resumed_from: self.latest_checkpoint.as_ref().filter(|c| c.step == self.completed && c.step > 0).map(|c| c.dir.clone()),
                config: self.config.to_toml(),
            }));
        } else {
            let seconds = self.regroup_started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            out.push(Command::Record(RunEvent::Regrouped {
                step: self.completed,
                generation: self.generation,
                world_size,
                seconds,
                synced,
            }));
        }
        self.regroup_started_at = None;
        let already_saved = self.latest_checkpoint.as_ref().is_some_and(|c| c.step == self.completed);
        if std::mem::take(&mut self.redo_eval) {
            self.request_eval(out);
        }
        if (std::mem::take(&mut self.redo_checkpoint) || self.stop_requested) && !already_saved {
            self.request_checkpoint(now, out);
        }
        self.next_step(now, out);
    }

    fn record_step(&mut self, now: Instant, report: &StepReport, tokens: u64, comm_seconds: f64, out: &mut Vec<Command>) {
        let seconds = self.step_started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let tokens_per_sec = if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 };
        self.last_tokens_per_second = Some(tokens_per_sec);
        out.push(Command::Record(RunEvent::Step {
            step: report.step,
            generation: report.generation,
            world_size: report.world_size,
            loss: report.loss,
            lr: report.lr,
            tokens_per_sec,
            grad_norm: report.grad_norm,
            step_seconds: seconds,
            comm_seconds,
        }));
        self.last_loss = Some(report.loss);
    }

    fn complete_step(&mut self, now: Instant, out: &mut Vec<Command>) {
        let reports = std::mem::take(&mut self.step_reports);
        let tokens: u64 = reports.values().map(|r| r.tokens).sum();
        let comm_seconds = reports.values().map(|r| r.comm_seconds).fold(0.0, f64::max);
        let first = reports.values().next().expect("a completed step has reports").clone();
        self.record_step(now, &first, tokens, comm_seconds, out);
        self.completed += 1;
        self.failed_regroups = 0;

        let total = self.config.train.steps;
        let last = self.completed >= total || self.stop_requested;
        let due = |interval: u64, completed: u64| interval > 0 && completed % interval == 0;
        let checkpoint_due = due(self.config.checkpoint.interval, self.completed) || last;
        // Every checkpoint is evaluated too: the Evaluator and the Deployer need its loss.
        let eval_due = due(self.config.eval.interval, self.completed) || checkpoint_due;

        // Membership changes wait for a step boundary: workers asked to leave go, workers
        // waiting to join come in.
        let leaving: Vec<WorkerId> = self.ranks.iter().copied().filter(|id| self.workers[id].leaving).collect();
        let joining = self.workers.values().any(|w| w.rank.is_none() && !w.leaving);
        if (!leaving.is_empty() || joining) && !last {
            let remaining = self.workers.values().filter(|w| !w.leaving).count();
            if remaining >= self.config.cluster.min_workers {
                for id in &leaving {
                    out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: "left at a step boundary, as asked".into() } });
                    if let Some(w) = self.workers.get_mut(id) {
                        w.rank = None;
                    }
                }
                let why = match (leaving.len(), joining) {
                    (0, _) => "workers are waiting to join".to_string(),
                    (n, false) => format!("{n} worker(s) left at a step boundary"),
                    (n, true) => format!("{n} worker(s) left and others are waiting to join"),
                };
                self.redo_eval |= eval_due;
                self.redo_checkpoint |= checkpoint_due;
                self.note_change(now, why, out);
                self.form(now, out);
                return;
            }
            // The run cannot go on without them: checkpoint and stop, to be resumed later.
            self.stop_requested = true;
        }
        let last = self.completed >= total || self.stop_requested;
        if eval_due || last {
            self.request_eval(out);
        }
        if checkpoint_due || last {
            self.request_checkpoint(now, out);
        }
        self.next_step(now, out);
    }

    fn request_eval(&mut self, out: &mut Vec<Command>) {
        let step = self.completed;
        self.eval = Some((step, BTreeMap::new()));
        for id in &self.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Evaluate { step } });
        }
    }

    fn request_checkpoint(&mut self, now: Instant, out: &mut Vec<Command>) {
        let step = self.completed;
        if self.checkpoints.contains_key(&step) {
            return;
        }
        let dir = run_dir::tmp_dir(&self.run_dir, step, self.generation).display().to_string();
        self.checkpoints
            .insert(step, PendingCheckpoint { requested_at: now, reported: BTreeSet::new(), files: Vec::new(), committing: false });
        for id in &self.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Checkpoint { step, dir: dir.clone() } });
        }
    }

    fn next_step(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.completed >= self.config.train.steps || self.stop_requested {
            self.phase = Phase::Finishing;
            self.maybe_done(now, out);
            return;
        }
        self.step_started_at = Some(now);
        for id in &self.ranks {
            out.push(Command::Send { to: *id, msg: ToWorker::Step { step: self.completed } });
        }
    }

    fn maybe_done(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.phase == Phase::Finishing && self.eval.is_none() && self.checkpoints.is_empty() {
            // A stop on request is a clean finish too: the last checkpoint has been written.
            self.finish(now, true, None, out);
        }
    }

    fn finish(&mut self, now: Instant, ok: bool, error: Option<String>, out: &mut Vec<Command>) {
        for id in self.workers.keys() {
            out.push(Command::Send { to: *id, msg: ToWorker::Stop { reason: "the run is finished".into() } });
        }
        let seconds = self.started_at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        out.push(Command::Record(RunEvent::Finished {
            step: self.completed,
            final_loss: self.last_loss,
            final_val_loss: self.last_val_loss,
            seconds,
        }));
        self.phase = Phase::Done;
        out.push(Command::Finish { ok, error });
    }

    /// A resumed run whose workers did not all come back within a lease of the last join
    /// starts with those that did, if they are at least `min_workers`.
    fn check_gathering(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(deadline) = self.gather_deadline else { return };
        if self.phase != Phase::Gathering || now < deadline || self.workers.len() < self.config.cluster.min_workers {
            return;
        }
        self.gather_deadline = None;
        out.push(Command::Record(RunEvent::Warning {
            step: self.completed,
            message: format!(
                "resuming with {} of {} workers: the others did not rejoin within the lease ({} ms)",
                self.workers.len(),
                self.config.cluster.workers,
                self.config.cluster.lease_ms
            ),
        }));
        self.form(now, out);
    }

    fn check_leases(&mut self, now: Instant, out: &mut Vec<Command>) {
        let lease = Duration::from_millis(self.config.cluster.lease_ms);
        let expired: Vec<WorkerId> =
            self.workers.iter().filter(|(_, w)| now.saturating_duration_since(w.last_seen) > lease).map(|(id, _)| *id).collect();
        for id in expired {
            let reason = format!("no heartbeat for longer than the lease ({} ms)", lease.as_millis());
            out.push(Command::Disconnect { id, reason: reason.clone() });
            self.on_lost(now, id, reason, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use crate::proto::FileDigest;

    fn config(workers: usize, steps: u64) -> Config {
        let mut c = Config::default_config();
        c.cluster.workers = workers;
        c.cluster.max_workers = 0;
        c.cluster.min_workers = 1;
        c.train.steps = steps;
        c.train.warmup_steps = 0;
        c.eval.interval = 2;
        c.checkpoint.interval = 2;
        c
    }

    fn caps(port: u16) -> Capabilities {
        Capabilities {
            hostname: "test".into(),
            pid: port as u32,
            threads: 1,
            device: "cpu".into(),
            nccl: false,
            peer_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr: None,
        }
    }

    /// A simulated clock and the core, with helpers to play the workers' part.
    struct Sim {
        core: Core,
        now: Instant,
    }

    impl Sim {
        fn new(config: Config) -> Sim {
            Sim { core: Core::new(config, None), now: Instant::now() }
        }
        fn on(&mut self, ev: Event) -> Vec<Command> {
            self.core.on(self.now, ev)
        }
        fn from(&mut self, id: WorkerId, msg: ToCoordinator) -> Vec<Command> {
            self.on(Event::FromWorker { id, msg })
        }
        fn join(&mut self, id: WorkerId) -> Vec<Command> {
            self.on(Event::WorkerJoined { id, info: caps(1000 + id as u16) })
        }
        fn lose(&mut self, id: WorkerId, reason: &str) -> Vec<Command> {
            self.on(Event::WorkerLost { id, reason: reason.into() })
        }
        fn ready(&mut self, id: WorkerId, completed_steps: u64) -> Vec<Command> {
            let generation = self.core.generation();
            self.from(id, ToCoordinator::Ready { generation, completed_steps })
        }
        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
        }
        fn step_done(&mut self, id: WorkerId, step: u64, loss: f64) -> Vec<Command> {
            let generation = self.core.generation();
            self.step_done_in(generation, id, step, loss)
        }
        fn step_done_in(&mut self, generation: u64, id: WorkerId, step: u64, loss: f64) -> Vec<Command> {
            let world_size = self.core.snapshot().world_size as u32;
            self.from(
                id,
                ToCoordinator::StepDone(StepReport {
                    generation,
                    world_size,
                    step,
                    loss,
                    tokens: 100,
                    grad_norm: 1.0,
                    lr: 0.1,
                    data_seconds: 0.0,
                    compute_seconds: 0.1,
                    comm_seconds: 0.01,
                }),
            )
        }
        fn written(&mut self, id: WorkerId, step: u64, files: Vec<FileDigest>) -> Vec<Command> {
            let generation = self.core.generation();
            self.from(id, ToCoordinator::CheckpointWritten { generation, step, files })
        }
    }

    fn sends(cmds: &[Command]) -> Vec<(WorkerId, ToWorker)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn assigns(cmds: &[Command]) -> Vec<(WorkerId, Assignment)> {
        sends(cmds)
            .into_iter()
            .filter_map(|(to, m)| match m {
                ToWorker::Assign(a) => Some((to, a)),
                _ => None,
            })
            .collect()
    }

    fn steps_sent(cmds: &[Command]) -> Vec<(WorkerId, u64)> {
        sends(cmds)
            .into_iter()
            .filter_map(|(to, m)| match m {
                ToWorker::Step { step } => Some((to, step)),
                _ => None,
            })
            .collect()
    }

    fn records(cmds: &[Command]) -> Vec<RunEvent> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Record(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn start(sim: &mut Sim, n: u64) {
        for id in 1..=n {
            sim.join(id);
        }
        for id in 1..=n {
            sim.ready(id, 0);
        }
        assert_eq!(sim.core.phase(), Phase::Training);
    }

    #[test]
    fn ranks_follow_join_order_and_form_a_ring() {
        let mut sim = Sim::new(config(3, 4));
        let mut all = Vec::new();
        for id in 1..=3 {
            all.extend(sim.join(id));
        }
        let assigns = assigns(&all);
        assert_eq!(assigns.len(), 3);
        for (to, a) in &assigns {
            assert_eq!(a.rank as u64, to - 1);
            assert_eq!(a.world_size, 3);
            assert_eq!(a.generation, 1);
            let successor_port = 1000 + ((a.rank as u16 + 1) % 3) + 1;
            assert_eq!(a.ring.unwrap().successor.port(), successor_port);
        }
        assert_eq!(sim.core.phase(), Phase::Forming);
        // A fourth worker is refused: the run has its workers (max_workers = workers).
        let cmds = sim.join(4);
        assert!(matches!(&sends(&cmds)[0], (4, ToWorker::Refused { kind: RefusalKind::ClusterFull, .. })));
        assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 4, .. })));
    }

    #[test]
    fn a_full_run_steps_evaluates_checkpoints_and_finishes() {
        let mut sim = Sim::new(config(2, 3));
        start(&mut sim, 2);
        let mut commits = Vec::new();
        let mut events = Vec::new();
        for step in 0..3 {
            let a = sim.step_done(1, step, 2.75);
            assert!(sends(&a).is_empty(), "waits for every rank");
            sim.advance(500);
            let cmds = sim.step_done(2, step, 2.75);
            events.extend(records(&cmds));
            let s = sends(&cmds);
            let completed = step + 1;
            let wants_eval = completed == 2 || completed == 3;
            assert_eq!(s.iter().filter(|(_, m)| matches!(m, ToWorker::Evaluate { .. })).count(), if wants_eval { 2 } else { 0 });
            for id in [1, 2] {
                if wants_eval {
                    sim.from(id, ToCoordinator::EvalDone(EvalReport { generation: 1, step: completed, loss_sum: 4.0, sequences: 2 }));
                }
                if s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { .. })) {
                    let files =
                        if id == 1 { vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "x".into() }] } else { vec![] };
                    let c = sim.written(id, completed, files);
                    commits.extend(c.into_iter().filter(|c| matches!(c, Command::CommitCheckpoint { .. })));
                }
            }
        }
        let steps: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                RunEvent::Step { step, loss, world_size, .. } => Some((*step, *loss, *world_size)),
                _ => None,
            })
            .collect();
        assert_eq!(steps, vec![(0, 2.75, 2), (1, 2.75, 2), (2, 2.75, 2)]);
        let tps = events
            .iter()
            .find_map(|e| match e {
                RunEvent::Step { tokens_per_sec, .. } => Some(*tokens_per_sec),
                _ => None,
            })
            .unwrap();
        assert!((tps - 400.0).abs() < 1e-9, "200 tokens in 0.5 s, got {tps}");
        assert_eq!(commits.len(), 2, "checkpoints after steps 2 and 3");
        assert_eq!(sim.core.phase(), Phase::Finishing, "waits for the last commit");
        let cmds = sim.on(Event::CheckpointCommitted { step: 2, path: "c2".into() });
        assert!(!cmds.iter().any(|c| matches!(c, Command::Finish { .. })));
        let cmds = sim.on(Event::CheckpointCommitted { step: 3, path: "c3".into() });
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: true, .. })));
        assert_eq!(sends(&cmds).iter().filter(|(_, m)| matches!(m, ToWorker::Stop { .. })).count(), 2);
        let snap = sim.core.snapshot();
        assert_eq!(snap.last_val_loss, Some(2.0));
        assert_eq!(snap.last_checkpoint.as_deref(), Some("c3"));
        assert_eq!(snap.completed_steps, 3);
    }

    #[test]
    fn under_a_sharded_strategy_a_new_generation_starts_from_the_newest_checkpoint() {
        let mut c = config(3, 10);
        c.parallel.strategy = crate::shard::Strategy::Zero2;
        let mut sim = Sim::new(c);
        start(&mut sim, 3);
        for step in 0..3 {
            for id in [1, 2, 3] {
                sim.step_done(id, step, 1.0);
            }
        }
        // Step 2's checkpoint is committed; step 3 is done when rank 2 is lost.
        for id in [1, 2, 3] {
            sim.written(id, 2, vec![]);
        }
        sim.on(Event::CheckpointCommitted { step: 2, path: "c2".into() });
        let cmds = sim.lose(3, "connection reset");
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        // The survivors hold the state of step 3, but a third of it was on the lost rank.
        assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.resume_from.as_deref() == Some("c2") && a.start_step == 2), "{a:?}");
        assert!(records(&cmds)
            .iter()
            .any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("continuing from checkpoint c2"))));
        sim.ready(1, 2);
        let cmds = sim.ready(2, 2);
        assert_eq!(steps_sent(&cmds), vec![(1, 2), (2, 2)], "step 2 again, resharded over 2 ranks");
    }

    #[test]
    fn a_worker_lost_mid_step_makes_the_survivors_regroup_and_redo_the_step() {
        let mut sim = Sim::new(config(3, 10));
        start(&mut sim, 3);
        sim.step_done(1, 0, 1.0);
        sim.step_done(1, 0, 1.0);
        sim.step_done(2, 0, 1.0);
        sim.step_done(3, 0, 1.0);
        // Step 1 is interrupted: rank 2 is lost before anyone finished it.
        sim.step_done(1, 1, 1.0);
        let cmds = sim.lose(3, "connection reset");
        let rec = records(&cmds);
        assert!(rec.iter().any(|e| matches!(e, RunEvent::WorkerLeft { rank: Some(2), .. })));
        assert!(!rec.iter().any(|e| matches!(e, RunEvent::Failed { .. })), "the run goes on");
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.generation == 2 && a.resume_from.is_none()));
        // The survivors form a ring of two: each is the other's successor.
        assert_eq!(a[0].1.ring.unwrap().successor.port(), 1002);
        assert_eq!(a[1].1.ring.unwrap().successor.port(), 1001);
        assert_eq!(sim.core.phase(), Phase::Forming);
        // Rank 0's old report for step 1 belonged to generation 1 and counts for nothing.
        sim.advance(700);
        sim.ready(1, 1);
        let cmds = sim.ready(2, 1);
        assert_eq!(steps_sent(&cmds), vec![(1, 1), (2, 1)], "step 1 again, with the new ring");
        let rec = records(&cmds);
        assert!(rec.iter().any(|e| matches!(e, RunEvent::Regrouped { step: 1, generation: 2, world_size: 2, synced: false, seconds } if (*seconds - 0.7).abs() < 1e-9)));
        assert!(!sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Sync { .. })), "identical replicas need no sync");
        sim.step_done(1, 1, 1.0);
        let cmds = sim.step_done(2, 1, 1.0);
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Step { step: 1, world_size: 2, generation: 2, .. })));
    }

    #[test]
    fn a_loss_during_the_all_reduce_that_some_survivor_completed_syncs_the_others_from_it() {
        let mut sim = Sim::new(config(3, 10));
        start(&mut sim, 3);
        // Worker 1 got through step 0's all-reduce (every gradient arrived) before worker 3
        // died; worker 2 did not.
        sim.step_done(1, 0, 3.5);
        let cmds = sim.lose(3, "lease expired");
        assert_eq!(assigns(&cmds).len(), 2);
        sim.ready(1, 1);
        let cmds = sim.ready(2, 0);
        let rec = records(&cmds);
        assert!(
            rec.iter().any(|e| matches!(e, RunEvent::Step { step: 0, loss, generation: 1, world_size: 3, .. } if *loss == 3.5)),
            "step 0 counts, recorded once, as the 3 ranks' step"
        );
        let syncs: Vec<_> = sends(&cmds).into_iter().filter(|(_, m)| matches!(m, ToWorker::Sync { .. })).collect();
        assert_eq!(syncs.len(), 2);
        assert!(syncs.iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 1 }));
        assert_eq!(sim.core.phase(), Phase::Syncing);
        assert!(steps_sent(&cmds).is_empty(), "no step before every rank is synced");
        sim.from(1, ToCoordinator::Synced { generation: 2, step: 1 });
        let cmds = sim.from(2, ToCoordinator::Synced { generation: 2, step: 1 });
        assert_eq!(steps_sent(&cmds), vec![(1, 1), (2, 1)]);
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Regrouped { synced: true, .. })));
        assert_eq!(sim.core.snapshot().completed_steps, 1);
    }

    #[test]
    fn a_loss_during_a_checkpoint_writes_it_again_with_the_new_ring() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        for step in 0..2 {
            sim.step_done(1, step, 1.0);
            sim.step_done(2, step, 1.0);
        }
        // Checkpoint at step 2 requested; rank 0 wrote its part, rank 1 is lost.
        sim.written(1, 2, vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "x".into() }]);
        let cmds = sim.lose(2, "killed");
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("checkpoint at step 2"))));
        assert!(!cmds.iter().any(|c| matches!(c, Command::CommitCheckpoint { .. })), "an incomplete checkpoint is never committed");
        let cmds = sim.ready(1, 2);
        let s = sends(&cmds);
        assert!(s.iter().any(|(to, m)| *to == 1 && matches!(m, ToWorker::Checkpoint { step: 2, .. })), "requested again");
        assert!(s.iter().any(|(to, m)| *to == 1 && matches!(m, ToWorker::Evaluate { step: 2 })), "the evaluation too");
        let cmds = sim.written(1, 2, vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "y".into() }]);
        assert!(cmds.iter().any(
            |c| matches!(c, Command::CommitCheckpoint { step: 2, world_size: 1, files, .. } if files.len() == 1 && files[0].sha256 == "y")
        ));
        // Reports from the old generation are ignored.
        assert!(sim.from(1, ToCoordinator::CheckpointWritten { generation: 1, step: 2, files: vec![] }).is_empty());
    }

    #[test]
    fn two_losses_in_a_row_regroup_twice_and_below_min_workers_the_run_pauses() {
        let mut c = config(3, 10);
        c.cluster.min_workers = 2;
        let mut sim = Sim::new(c);
        start(&mut sim, 3);
        sim.step_done(2, 0, 1.0);
        let cmds = sim.lose(3, "killed");
        assert_eq!(assigns(&cmds).len(), 2);
        sim.ready(1, 0);
        // The second loss strikes while the ring is forming again.
        let cmds = sim.lose(2, "killed");
        assert!(assigns(&cmds).is_empty());
        let s = sends(&cmds);
        assert!(matches!(&s[..], [(1, ToWorker::Pause { generation: 3, .. })]));
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Paused { workers: 1, min_workers: 2, .. })));
        assert_eq!(sim.core.phase(), Phase::Paused);
        assert_eq!(sim.core.snapshot().completed_steps, 0);
        // Worker 2 had completed step 0 before it was lost; its report names generation 1.
        // A new worker arrives: the run goes on, the newcomer synced from the survivor.
        let cmds = sim.join(4);
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, a)| a.generation == 4 && a.resume_from.is_none()));
        sim.ready(1, 0);
        let cmds = sim.ready(4, 0);
        assert_eq!(steps_sent(&cmds), vec![(1, 0), (4, 0)], "nobody completed step 0 among the members: no sync needed");
    }

    #[test]
    fn a_rejoin_racing_a_loss_is_taken_in_by_the_same_regroup_and_synced() {
        let mut c = config(2, 10);
        c.cluster.max_workers = 3;
        let mut sim = Sim::new(c);
        start(&mut sim, 2);
        for step in 0..3 {
            sim.step_done(1, step, 1.0);
            sim.step_done(2, step, 1.0);
        }
        // A worker arrives mid-step: it waits for the step boundary...
        let cmds = sim.join(3);
        assert!(matches!(&sends(&cmds)[..], [(3, ToWorker::Welcome { .. })]));
        assert!(assigns(&cmds).is_empty());
        // ...but a member is lost first: one regroup handles both.
        let cmds = sim.lose(2, "link down");
        let a = assigns(&cmds);
        assert_eq!(a.iter().map(|(id, a)| (*id, a.rank)).collect::<Vec<_>>(), vec![(1, 0), (3, 1)]);
        sim.ready(1, 3);
        let cmds = sim.ready(3, 0);
        assert!(sends(&cmds).iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 3 }));
        sim.from(1, ToCoordinator::Synced { generation: 2, step: 3 });
        let cmds = sim.from(3, ToCoordinator::Synced { generation: 2, step: 3 });
        assert_eq!(steps_sent(&cmds), vec![(1, 3), (3, 3)]);
    }

    #[test]
    fn a_new_worker_joins_at_the_next_step_boundary() {
        let mut c = config(2, 10);
        c.cluster.max_workers = 3;
        let mut sim = Sim::new(c);
        start(&mut sim, 2);
        sim.step_done(1, 0, 1.0);
        sim.join(3);
        let cmds = sim.step_done(2, 0, 1.0);
        assert!(steps_sent(&cmds).is_empty());
        let a = assigns(&cmds);
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|(_, a)| a.world_size == 3 && a.generation == 2));
        sim.ready(1, 1);
        sim.ready(2, 1);
        let cmds = sim.ready(3, 0);
        assert!(sends(&cmds).iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 1 }));
        assert_eq!(sends(&cmds).len(), 3);
    }

    #[test]
    fn silent_workers_are_declared_lost_after_the_lease() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        sim.advance(3000);
        sim.from(1, ToCoordinator::Heartbeat);
        assert!(sim.on(Event::Tick).is_empty(), "within the lease");
        sim.advance(2500); // worker 2 silent for 5.5 s > 5 s lease; worker 1 for 2.5 s
        let cmds = sim.on(Event::Tick);
        assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 2, .. })));
        assert!(!cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, .. })));
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::WorkerLeft { reason, rank: Some(1), .. } if reason.contains("lease"))));
        assert!(matches!(&assigns(&cmds)[..], [(1, Assignment { world_size: 1, .. })]));
    }

    #[test]
    fn failed_collectives_regroup_then_give_up() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        for attempt in 1..=MAX_FAILED_REGROUPS {
            let generation = sim.core.generation();
            let cmds = sim.from(
                2,
                ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "timed out waiting on predecessor rank 0".into() },
            );
            assert!(records(&cmds).iter().any(
                |e| matches!(e, RunEvent::Warning { message, .. } if message.contains("rank 1") && message.contains("predecessor rank 0"))
            ));
            assert_eq!(assigns(&cmds).len(), 2, "attempt {attempt}: a new ring");
            sim.ready(1, 0);
            sim.ready(2, 0);
        }
        // A stale report of an older generation is ignored.
        assert!(sim.from(2, ToCoordinator::CollectiveFailed { generation: 1, step: Some(0), error: "old".into() }).is_empty());
        let generation = sim.core.generation();
        let cmds = sim.from(1, ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "again".into() });
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("in a row"))));
    }

    #[test]
    fn when_no_worker_holds_the_state_it_comes_from_the_newest_checkpoint() {
        let mut sim = Sim::new(config(1, 10));
        start(&mut sim, 1);
        for step in 0..2 {
            sim.step_done(1, step, 1.0);
        }
        sim.written(1, 2, vec![]);
        sim.on(Event::CheckpointCommitted { step: 2, path: "runs/x/checkpoints/step-000002".into() });
        sim.step_done(1, 2, 1.0);
        let cmds = sim.lose(1, "killed");
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Paused { workers: 0, .. })));
        let cmds = sim.join(2);
        let a = assigns(&cmds);
        assert_eq!(a[0].1.resume_from.as_deref(), Some("runs/x/checkpoints/step-000002"));
        assert_eq!(a[0].1.start_step, 2);
        let cmds = sim.ready(2, 2);
        assert_eq!(steps_sent(&cmds), vec![(2, 2)]);
    }

    #[test]
    fn a_failed_commit_keeps_training_and_is_recorded() {
        let mut sim = Sim::new(config(1, 4));
        start(&mut sim, 1);
        sim.step_done(1, 0, 1.0);
        let cmds = sim.step_done(1, 1, 1.0);
        assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 2 })));
        sim.written(1, 2, vec![]);
        let cmds = sim.on(Event::CheckpointCommitFailed { step: 2, error: "disk full".into() });
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::CheckpointFailed { step: 2, .. })));
        assert_eq!(sim.core.phase(), Phase::Training);
        assert_eq!(sim.core.snapshot().last_checkpoint, None);
    }

    #[test]
    fn shutdown_checkpoints_at_the_next_step_boundary() {
        let mut sim = Sim::new(config(1, 100));
        start(&mut sim, 1);
        sim.on(Event::ShutdownRequested);
        let cmds = sim.step_done(1, 0, 1.0);
        let s = sends(&cmds);
        assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 1, .. })));
        assert!(!s.iter().any(|(_, m)| matches!(m, ToWorker::Step { .. })));
        assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Evaluate { step: 1 })), "every checkpoint is evaluated");
        sim.written(1, 1, vec![]);
        let cmds = sim.on(Event::CheckpointCommitted { step: 1, path: "p".into() });
        assert!(!cmds.iter().any(|c| matches!(c, Command::Finish { .. })), "the evaluation is still out");
        let cmds = sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 1, loss_sum: 1.0, sequences: 1 }));
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: true, .. })));
    }

    #[test]
    fn shutdown_while_paused_stops_at_once() {
        let mut c = config(2, 100);
        c.cluster.min_workers = 2;
        let mut sim = Sim::new(c);
        start(&mut sim, 2);
        sim.lose(2, "killed");
        assert_eq!(sim.core.phase(), Phase::Paused);
        let cmds = sim.on(Event::ShutdownRequested);
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("paused"))));
    }

    #[test]
    fn a_leaving_worker_leaves_at_the_next_step_boundary_and_the_rest_go_on() {
        let mut sim = Sim::new(config(2, 100));
        start(&mut sim, 2);
        sim.step_done(1, 0, 1.0);
        let cmds = sim.from(2, ToCoordinator::Leaving { reason: "SIGTERM".into() });
        assert!(records(&cmds)
            .iter()
            .any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("rank 1") && message.contains("SIGTERM"))));
        let cmds = sim.step_done(2, 0, 1.0);
        let s = sends(&cmds);
        assert!(s.iter().any(|(to, m)| *to == 2 && matches!(m, ToWorker::Stop { .. })));
        assert!(matches!(&assigns(&cmds)[..], [(1, Assignment { world_size: 1, generation: 2, .. })]));
        assert!(steps_sent(&cmds).is_empty());
        let cmds = sim.ready(1, 1);
        assert_eq!(steps_sent(&cmds), vec![(1, 1)]);
    }

    #[test]
    fn the_last_worker_leaving_checkpoints_and_stops_the_run() {
        let mut sim = Sim::new(config(1, 100));
        start(&mut sim, 1);
        sim.from(1, ToCoordinator::Leaving { reason: "SIGTERM".into() });
        let cmds = sim.step_done(1, 0, 1.0);
        let s = sends(&cmds);
        assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 1, .. })));
        assert!(!s.iter().any(|(_, m)| matches!(m, ToWorker::Step { .. })));
    }

    #[test]
    fn a_worker_failing_before_training_started_fails_the_run() {
        let mut sim = Sim::new(config(2, 10));
        sim.join(1);
        sim.join(2);
        let cmds = sim.from(2, ToCoordinator::Failed { error: "data folder missing".into() });
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("data folder missing"))));
    }

    #[test]
    fn resume_starts_at_the_checkpoint_step() {
        let mut core = Core::new(config(1, 10), Some(ResumeFrom { dir: "d".into(), step: 4 }));
        let now = Instant::now();
        let cmds = core.on(now, Event::WorkerJoined { id: 1, info: caps(1) });
        let a = assigns(&cmds).remove(0).1;
        assert_eq!(a.start_step, 4);
        assert_eq!(a.resume_from.as_deref(), Some("d"));
        let cmds = core.on(now, Event::FromWorker { id: 1, msg: ToCoordinator::Ready { generation: 1, completed_steps: 4 } });
        assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 4 })));
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Started { resumed_from: Some(d), .. } if d == "d")));
    }

    #[test]
    fn stale_or_foreign_reports_are_ignored() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        assert!(sim.step_done(1, 5, 1.0).is_empty(), "a report for another step");
        assert!(sim.step_done(99, 0, 1.0).is_empty(), "an unknown worker");
        assert!(sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 0, loss_sum: 1.0, sequences: 1 })).is_empty());
        assert!(sim.written(1, 7, vec![]).is_empty());
        assert!(sim.from(1, ToCoordinator::Ready { generation: 1, completed_steps: 9 }).is_empty(), "Ready outside Forming");
    }

    #[test]
    fn a_resumed_run_starts_without_workers_that_did_not_come_back() {
        let mut c = config(3, 10);
        c.cluster.min_workers = 2;
        let mut core = Core::new(c, Some(ResumeFrom { dir: "d".into(), step: 4 }));
        let t0 = Instant::now();
        core.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
        assert!(core.on(t0 + Duration::from_secs(4), Event::Tick).is_empty(), "one worker is below min_workers");
        let t1 = t0 + Duration::from_millis(4500);
        core.on(t1, Event::FromWorker { id: 1, msg: ToCoordinator::Heartbeat });
        core.on(t1, Event::WorkerJoined { id: 2, info: caps(2) });
        assert!(assigns(&core.on(t1 + Duration::from_millis(4900), Event::Tick)).is_empty(), "within a lease of the last join");
        for id in [1, 2] {
            core.on(t1 + Duration::from_millis(4900), Event::FromWorker { id, msg: ToCoordinator::Heartbeat });
        }
        let cmds = core.on(t1 + Duration::from_millis(5100), Event::Tick);
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("2 of 3 workers"))));
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.resume_from.as_deref() == Some("d")));
        // A fresh run waits for all its workers.
        let mut c = config(3, 10);
        c.cluster.min_workers = 2;
        let mut fresh = Core::new(c, None);
        fresh.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
        fresh.on(t0, Event::WorkerJoined { id: 2, info: caps(2) });
        assert!(assigns(&fresh.on(t0 + Duration::from_secs(600), Event::Tick)).is_empty());
    }

    fn join_gpu(sim: &mut Sim, id: WorkerId, nccl: bool) -> Vec<Command> {
        let info = Capabilities { device: if nccl { format!("cuda:{id}") } else { "cpu".into() }, nccl, ..caps(1000 + id as u16) };
        sim.on(Event::WorkerJoined { id, info })
    }

    #[test]
    fn cuda_workers_get_nccl_and_rank_0s_unique_id_reaches_every_rank() {
        let mut sim = Sim::new(config(2, 10));
        join_gpu(&mut sim, 1, true);
        let cmds = join_gpu(&mut sim, 2, true);
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl), "{a:?}");
        let generation = sim.core.generation();
        // Only rank 0 (worker 1) hands out the id; others and old generations are ignored.
        assert!(sim.from(2, ToCoordinator::NcclUniqueId { generation, id: vec![2; NCCL_UNIQUE_ID_BYTES] }).is_empty());
        assert!(sim.from(1, ToCoordinator::NcclUniqueId { generation: generation - 1, id: vec![1; NCCL_UNIQUE_ID_BYTES] }).is_empty());
        let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![7; NCCL_UNIQUE_ID_BYTES] });
        let boot: Vec<_> = sends(&cmds)
            .into_iter()
            .filter_map(|(to, m)| match m {
                ToWorker::NcclBootstrap { generation: g, id } => Some((to, g, id)),
                _ => None,
            })
            .collect();
        assert_eq!(boot.len(), 2);
        assert!(boot.iter().all(|(_, g, id)| *g == generation && *id == vec![7; NCCL_UNIQUE_ID_BYTES]));
        assert_eq!(boot.iter().map(|(to, _, _)| *to).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_malformed_unique_id_disconnects_its_sender() {
        let mut sim = Sim::new(config(2, 10));
        join_gpu(&mut sim, 1, true);
        join_gpu(&mut sim, 2, true);
        let generation = sim.core.generation();
        let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![0; 5] });
        assert!(
            cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, reason } if reason.contains("ncclUniqueId of 5 bytes"))),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_member_without_nccl_puts_the_generation_on_the_ring_or_fails_a_run_that_demands_nccl() {
        let mut sim = Sim::new(config(2, 10));
        join_gpu(&mut sim, 1, true);
        let cmds = join_gpu(&mut sim, 2, false);
        assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Ring));

        let mut c = config(2, 10);
        c.parallel.collective = CollectiveBackend::Ring;
        let mut sim = Sim::new(c);
        join_gpu(&mut sim, 1, true);
        let cmds = join_gpu(&mut sim, 2, true);
        assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Ring));

        let mut c = config(2, 10);
        c.parallel.collective = CollectiveBackend::Nccl;
        let mut sim = Sim::new(c);
        join_gpu(&mut sim, 1, true);
        let cmds = join_gpu(&mut sim, 2, false);
        let failed = cmds.iter().find_map(|c| match c {
            Command::Finish { ok: false, error: Some(e) } => Some(e.clone()),
            _ => None,
        });
        let failed = failed.expect("the run fails");
        assert!(failed.contains("parallel.collective = \"nccl\"") && failed.contains("worker 2 on test (cpu)"), "{failed}");
        // A world of one needs no collective at all.
        let mut c = config(1, 10);
        c.parallel.collective = CollectiveBackend::Nccl;
        let mut sim = Sim::new(c);
        let cmds = join_gpu(&mut sim, 1, false);
        assert!(matches!(&assigns(&cmds)[..], [(1, a)] if a.collective() == CollectiveKind::Ring));
    }

    #[test]
    fn under_auto_an_nccl_communicator_that_cannot_form_falls_back_to_the_ring() {
        let mut sim = Sim::new(config(2, 10));
        join_gpu(&mut sim, 1, true);
        join_gpu(&mut sim, 2, true);
        let generation = sim.core.generation();
        let cmds = sim.from(2, ToCoordinator::NcclFailed { generation, error: "ncclInvalidUsage: duplicate GPU".into() });
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. }
            if message.contains("could not set up NCCL") && message.contains("duplicate GPU") && message.contains("averages over the QUIC ring"))), "{cmds:?}");
        let a = assigns(&cmds);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, a)| a.collective() == CollectiveKind::Ring), "{a:?}");
        // A failed step, or a ring that did not form, is no reason to give NCCL up.
        let mut sim = Sim::new(config(2, 10));
        join_gpu(&mut sim, 1, true);
        join_gpu(&mut sim, 2, true);
        let generation = sim.core.generation();
        let cmds = sim.from(2, ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "timed out".into() });
        assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl));
        let generation = sim.core.generation();
        let cmds = sim.from(1, ToCoordinator::CollectiveFailed { generation, step: None, error: "ring peer unreachable".into() });
        assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl));
    }

    #[test]
    fn a_mixed_generation_puts_the_cuda_workers_in_an_nccl_group_whose_rank_0_joins_the_ring() {
        let mut sim = Sim::new(config(5, 10));
        let mut cmds = Vec::new();
        for (id, gpu) in [(1, true), (2, false), (3, true), (4, false), (5, true)] {
            cmds = join_gpu(&mut sim, id, gpu);
        }
        let a: BTreeMap<WorkerId, Assignment> = assigns(&cmds).into_iter().collect();
        assert_eq!(a.len(), 5);
        assert!(a.values().all(|a| a.collective() == CollectiveKind::Mixed && a.world_size == 5));
        // The NCCL group: workers 1, 3, 5 in rank order.
        let nccl: Vec<(WorkerId, NcclPlace)> = a.iter().filter_map(|(id, a)| a.nccl.map(|n| (*id, n))).collect();
        assert_eq!(
            nccl,
            vec![
                (1, NcclPlace { rank: 0, world_size: 3 }),
                (3, NcclPlace { rank: 1, world_size: 3 }),
                (5, NcclPlace { rank: 2, world_size: 3 })
            ]
        );
        // The ring: the group's rank 0 (worker 1) and the CPU workers 2 and 4, each pointing at the next.
        let ring: Vec<(WorkerId, u32, u32, u16)> =
            a.iter().filter_map(|(id, a)| a.ring.map(|r| (*id, r.rank, r.world_size, r.successor.port()))).collect();
        assert_eq!(ring, vec![(1, 0, 3, 1002), (2, 1, 3, 1004), (4, 2, 3, 1001)]);
        // Only the group's rank 0 hands out the id, and only the group gets it.
        let generation = sim.core.generation();
        assert!(sim.from(3, ToCoordinator::NcclUniqueId { generation, id: vec![3; NCCL_UNIQUE_ID_BYTES] }).is_empty());
        let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![1; NCCL_UNIQUE_ID_BYTES] });
        let to: Vec<WorkerId> =
            sends(&cmds).into_iter().filter(|(_, m)| matches!(m, ToWorker::NcclBootstrap { .. })).map(|(to, _)| to).collect();
        assert_eq!(to, vec![1, 3, 5]);
        // Forwarded once per generation.
        assert!(sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![1; NCCL_UNIQUE_ID_BYTES] }).is_empty());
    }
}
