//! Who is in the run: workers joining, leaving and being lost, their leases, a resumed run's
//! gathering deadline, pausing below `min_workers`, and forming a new generation.
//!
//! Every membership change ends in [`Core::form`] (or a pause): the generation's work in
//! flight is given up and the ranks are assigned again. Kept apart from `progress` because
//! these rules are about the workers, not about the steps they take.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{topology, Command, Core, Phase, WorkerId, MAX_FAILED_REGROUPS};
use crate::config::CollectiveBackend;
use crate::events::RunEvent;
use crate::proto::{Assignment, Capabilities, CollectiveKind, RefusalKind, ToWorker, NCCL_UNIQUE_ID_BYTES};

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

/// The workers, the current generation's layout, and the state of membership changes.
pub(super) struct Membership {
    pub(super) workers: BTreeMap<WorkerId, WorkerEntry>,
    /// rank → worker, for the current generation.
    pub(super) ranks: Vec<WorkerId>,
    pub(super) generation: u64,
    /// How the current generation's ranks combine gradients.
    pub(super) collective: CollectiveKind,
    /// The current generation's NCCL group (workers in rank order; empty for a ring).
    pub(super) nccl_group: Vec<WorkerId>,
    /// The group's unique id went out for the current generation (a second is ignored).
    pub(super) nccl_id_forwarded: bool,
    /// NCCL could not form a communicator in this run (`parallel.collective = "auto"`): the
    /// rest of the run uses the ring rather than fail the same way again.
    pub(super) nccl_failed: bool,
    /// When the current membership change began (for the `Regrouped` event).
    pub(super) regroup_started_at: Option<Instant>,
    pub(super) failed_regroups: u32,
    /// A resumed run (a restarted coordinator) may start without workers that did not come
    /// back: with `min_workers`, once this passes without a new join.
    pub(super) resumed: bool,
    pub(super) gather_deadline: Option<Instant>,
}

impl Membership {
    pub(super) fn new(resumed: bool) -> Membership {
        Membership {
            workers: BTreeMap::new(),
            ranks: Vec::new(),
            generation: 0,
            collective: CollectiveKind::Ring,
            nccl_group: Vec::new(),
            nccl_id_forwarded: false,
            nccl_failed: false,
            regroup_started_at: None,
            failed_regroups: 0,
            resumed,
            gather_deadline: None,
        }
    }

    pub(super) fn rank_of(&self, id: WorkerId) -> Option<u32> {
        self.workers.get(&id).and_then(|w| w.rank)
    }

    pub(super) fn describe(&self, id: WorkerId) -> String {
        match self.workers.get(&id) {
            Some(w) => format!("worker {id} (rank {}, {})", w.rank.map_or("-".into(), |r| r.to_string()), w.info.peer_addr),
            None => format!("worker {id}"),
        }
    }
}

impl Core {
    pub(super) fn on_joined(&mut self, now: Instant, id: WorkerId, info: Capabilities, out: &mut Vec<Command>) {
        let cluster = &self.settings.config.cluster;
        let workers = self.members.workers.len();
        let room = match self.phase {
            Phase::Gathering => workers < cluster.workers,
            Phase::Forming | Phase::Syncing | Phase::Training | Phase::Paused => workers < cluster.max_workers(),
            Phase::Finishing | Phase::Done => false,
        };
        if !room {
            let reason = format!("the run already has its {workers} workers (phase {:?}); this worker is not needed", self.phase);
            out.push(Command::Send { to: id, msg: ToWorker::Refused { kind: RefusalKind::ClusterFull, reason: reason.clone() } });
            out.push(Command::Disconnect { id, reason });
            return;
        }
        let addr = info.peer_addr;
        self.members.workers.insert(
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
        out.push(Command::Send { to: id, msg: self.welcome(id) });
        let workers = self.members.workers.len();
        match self.phase {
            Phase::Gathering if workers == cluster.workers => self.form(out),
            // Each join gives the others another lease to come back.
            Phase::Gathering if self.members.resumed && workers >= cluster.min_workers => {
                self.members.gather_deadline = Some(now + Duration::from_millis(cluster.lease_ms));
            }
            // Forming again at once includes the newcomer without waiting a whole generation.
            Phase::Forming | Phase::Syncing => {
                self.note_change(now, format!("worker {id} ({addr}) joined"), out);
                self.form(out)
            }
            Phase::Paused if workers >= cluster.min_workers => {
                self.note_change(now, format!("worker {id} ({addr}) joined"), out);
                self.form(out)
            }
            // Taken in at the next step boundary.
            _ => {}
        }
    }

    /// Records why membership changes (once per change) and starts its clock.
    pub(super) fn note_change(&mut self, now: Instant, why: String, out: &mut Vec<Command>) {
        self.members.regroup_started_at.get_or_insert(now);
        out.push(Command::Record(RunEvent::Warning { step: self.progress.completed, message: format!("membership change: {why}") }));
    }

    /// Starts a new generation with every worker present (except those leaving): ranks in
    /// join order, placed by [`topology::plan`]. Whatever the previous generation was doing is
    /// given up (and requested again once training resumes).
    pub(super) fn form(&mut self, out: &mut Vec<Command>) {
        let members: Vec<WorkerId> = self.members.workers.iter().filter(|(_, w)| !w.leaving).map(|(id, _)| *id).collect();
        if self.phase != Phase::Gathering && members.len() < self.settings.config.cluster.min_workers {
            self.pause(out);
            return;
        }
        self.abandon_work(out);
        self.members.generation += 1;
        self.members.ranks = members;
        let (resume_from, start_step) = self.starting_point(out);
        let world = self.members.ranks.len() as u32;
        let placed: Vec<(WorkerId, &Capabilities)> = self.members.ranks.iter().map(|id| (*id, &self.members.workers[id].info)).collect();
        let plan = match topology::plan(self.settings.config.parallel.collective, self.members.nccl_failed, &placed) {
            Ok(plan) => plan,
            Err(why) => return self.abort(why, out),
        };
        self.members.collective = plan.collective;
        self.members.nccl_id_forwarded = false;
        self.members.nccl_group = plan.nccl_group;
        let config_toml = self.settings.config.to_toml();
        let run_dir = self.settings.run_dir.display().to_string();
        for place in plan.places {
            if let Some(w) = self.members.workers.get_mut(&place.id) {
                w.rank = Some(place.rank);
                w.ready = false;
                w.synced = false;
                w.completed = None;
            }
            out.push(Command::Send {
                to: place.id,
                msg: ToWorker::Assign(Assignment {
                    rank: place.rank,
                    world_size: world,
                    generation: self.members.generation,
                    ring: place.ring,
                    nccl: place.nccl,
                    config_toml: config_toml.clone(),
                    run_dir: run_dir.clone(),
                    resume_from: resume_from.clone(),
                    start_step,
                }),
            });
        }
        for (rank, id) in self.members.ranks.iter().enumerate() {
            let info = &self.members.workers[id].info;
            out.push(Command::Record(RunEvent::WorkerJoined {
                step: self.progress.completed,
                rank: rank as u32,
                worker_id: *id,
                addr: info.peer_addr.to_string(),
                hostname: info.hostname.clone(),
            }));
        }
        self.phase = Phase::Forming;
    }

    /// Fewer than `min_workers`: everyone drops what it is doing and waits for workers.
    fn pause(&mut self, out: &mut Vec<Command>) {
        self.abandon_work(out);
        self.members.generation += 1;
        self.members.ranks.clear();
        let min_workers = self.settings.config.cluster.min_workers;
        let workers = self.members.workers.len();
        let reason = format!("{workers} of cluster.min_workers = {min_workers} workers: waiting for workers to join");
        let generation = self.members.generation;
        for (id, w) in self.members.workers.iter_mut() {
            w.rank = None;
            w.ready = false;
            out.push(Command::Send { to: *id, msg: ToWorker::Pause { generation, reason: reason.clone() } });
        }
        out.push(Command::Record(RunEvent::Paused {
            step: self.progress.completed,
            workers: workers as u32,
            min_workers: min_workers as u32,
            reason,
        }));
        self.phase = Phase::Paused;
    }

    /// Gives up the current generation's step, evaluation and unfinished checkpoints.
    fn abandon_work(&mut self, out: &mut Vec<Command>) {
        let progress = &mut self.progress;
        if let Some(report) = progress.step_reports.values().next() {
            if report.step == progress.completed {
                progress.partial_step = Some(report.clone());
            }
        }
        progress.step_reports.clear();
        if progress.eval.take().is_some() {
            progress.redo_eval = true;
        }
        if progress.retry_checkpoint_at.take().is_some() {
            progress.redo_checkpoint = true;
        }
        let abandoned: Vec<u64> = progress.checkpoints.iter().filter(|(_, p)| !p.committing).map(|(s, _)| *s).collect();
        for step in abandoned {
            progress.checkpoints.remove(&step);
            progress.redo_checkpoint = true;
            out.push(Command::Record(RunEvent::Warning {
                step,
                message: format!(
                    "the checkpoint at step {step} was not complete when membership changed: it is written again once training resumes"
                ),
            }));
        }
    }

    pub(super) fn on_lost(&mut self, now: Instant, id: WorkerId, reason: String, out: &mut Vec<Command>) {
        let Some(entry) = self.members.workers.remove(&id) else { return };
        out.push(Command::Record(RunEvent::WorkerLeft {
            step: self.progress.completed,
            rank: entry.rank,
            worker_id: id,
            reason: reason.clone(),
        }));
        let was_member = entry.rank.is_some() && self.members.ranks.contains(&id);
        let why =
            format!("worker {id} (rank {}, {}) was lost: {reason}", entry.rank.map_or("-".into(), |r| r.to_string()), entry.info.peer_addr);
        match self.phase {
            Phase::Gathering | Phase::Done | Phase::Paused => {}
            // It owed nothing (a joiner waiting for the next step boundary).
            _ if !was_member => {}
            // Finished stepping; only an unfinished evaluation or checkpoint needs the ranks.
            Phase::Finishing if self.progress.eval.is_none() && self.progress.checkpoints.values().all(|p| p.committing) => {
                self.members.ranks.retain(|r| *r != id);
                self.maybe_done(now, out);
            }
            _ => {
                self.note_change(now, why, out);
                self.form(out);
            }
        }
    }

    /// A new generation after a failed collective, unless too many in a row failed.
    fn regroup_after_failure(&mut self, now: Instant, why: String, out: &mut Vec<Command>) {
        self.members.failed_regroups += 1;
        if self.members.failed_regroups > MAX_FAILED_REGROUPS {
            self.abort(format!("{why}; {MAX_FAILED_REGROUPS} new rings in a row failed without completing a step"), out);
            return;
        }
        self.note_change(now, why, out);
        self.form(out);
    }

    pub(super) fn on_collective_failed(
        &mut self,
        now: Instant,
        id: WorkerId,
        generation: u64,
        step: Option<u64>,
        error: String,
        out: &mut Vec<Command>,
    ) {
        if generation != self.members.generation || !matches!(self.phase, Phase::Forming | Phase::Syncing | Phase::Training) {
            return;
        }
        let at = step.map_or("forming the ring".to_string(), |s| format!("step {s}"));
        let why = format!("{} reports a failed collective ({at}): {error}", self.members.describe(id));
        self.regroup_after_failure(now, why, out);
    }

    pub(super) fn on_nccl_failed(&mut self, now: Instant, id: WorkerId, generation: u64, error: String, out: &mut Vec<Command>) {
        if generation != self.members.generation || self.members.collective == CollectiveKind::Ring || self.phase != Phase::Forming {
            return;
        }
        let mut why = format!("{} could not set up NCCL: {error}", self.members.describe(id));
        if self.settings.config.parallel.collective == CollectiveBackend::Auto {
            // NCCL that cannot even form (two ranks on one GPU, no route between the
            // hosts, a library problem) would fail the same way again: fall back.
            self.members.nccl_failed = true;
            why.push_str("; the rest of the run averages over the QUIC ring (parallel.collective = \"auto\")");
        }
        self.regroup_after_failure(now, why, out);
    }

    pub(super) fn on_nccl_unique_id(&mut self, now: Instant, id: WorkerId, generation: u64, unique_id: Vec<u8>, out: &mut Vec<Command>) {
        // Only the current NCCL group's rank 0 hands out the id; anything else is an old
        // generation's (ignored).
        let m = &mut self.members;
        let current = generation == m.generation && self.phase == Phase::Forming && m.collective != CollectiveKind::Ring;
        if !current || m.nccl_group.first() != Some(&id) || m.nccl_id_forwarded {
            return;
        }
        m.nccl_id_forwarded = true;
        if unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            let reason = format!("protocol error: an ncclUniqueId of {} bytes (expected {NCCL_UNIQUE_ID_BYTES})", unique_id.len());
            out.push(Command::Disconnect { id, reason: reason.clone() });
            self.on_lost(now, id, reason, out);
            return;
        }
        for to in &m.nccl_group {
            out.push(Command::Send { to: *to, msg: ToWorker::NcclBootstrap { generation, id: unique_id.clone() } });
        }
    }

    pub(super) fn on_leaving(&mut self, id: WorkerId, reason: String, out: &mut Vec<Command>) {
        let who = self.members.describe(id);
        let Some(w) = self.members.workers.get_mut(&id) else { return };
        w.leaving = true;
        if w.rank.is_none() || self.phase == Phase::Paused {
            // Owes nothing: let it go now.
            out.push(Command::Send { to: id, msg: ToWorker::Stop { reason: "left as asked".into() } });
            return;
        }
        out.push(Command::Record(RunEvent::Warning {
            step: self.progress.completed,
            message: format!("{who} is leaving ({reason}): it leaves the run at the next step boundary"),
        }));
    }

    pub(super) fn on_worker_failed(&mut self, now: Instant, id: WorkerId, error: String, out: &mut Vec<Command>) {
        // Before training ever started, a failing member is a failing setup (bad data, a
        // config the worker rejects): waiting for a replacement would not help.
        if self.progress.started_at.is_none() && self.members.rank_of(id).is_some() {
            let who = self.members.describe(id);
            self.abort(format!("{who} failed: {error}"), out);
            return;
        }
        let reason = format!("it failed: {error}");
        out.push(Command::Disconnect { id, reason: reason.clone() });
        self.on_lost(now, id, reason, out);
    }

    /// When the worker's lease runs out if it stays silent: last heard from + `lease_ms`.
    /// It is lost at a [`super::Event::Timeout`] at or after this instant.
    /// The answer to a worker that joined (any role): its id and the link's timing.
    pub(super) fn welcome(&self, id: WorkerId) -> ToWorker {
        let cluster = &self.settings.config.cluster;
        ToWorker::Welcome { worker_id: id, heartbeat_ms: cluster.heartbeat_ms, lease_ms: cluster.lease_ms, rejoin_ms: cluster.rejoin_ms }
    }

    pub(super) fn lease_deadline(&self, w: &WorkerEntry) -> Option<Instant> {
        w.last_seen.checked_add(Duration::from_millis(self.settings.config.cluster.lease_ms))
    }

    /// The gathering deadline, while it can act: a resumed run still gathering, with at least
    /// `min_workers` present. (Below that only a join can help, and a join sets a new one.)
    pub(super) fn gather_due_at(&self) -> Option<Instant> {
        let enough = self.members.workers.len() >= self.settings.config.cluster.min_workers;
        self.members.gather_deadline.filter(|_| self.phase == Phase::Gathering && enough)
    }

    /// A resumed run whose workers did not all come back within a lease of the last join
    /// starts with those that did, if they are at least `min_workers`.
    pub(super) fn check_gathering(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.gather_due_at().is_none_or(|deadline| now < deadline) {
            return;
        }
        self.members.gather_deadline = None;
        let cluster = &self.settings.config.cluster;
        out.push(Command::Record(RunEvent::Warning {
            step: self.progress.completed,
            message: format!(
                "resuming with {} of {} workers: the others did not rejoin within the lease ({} ms)",
                self.members.workers.len(),
                cluster.workers,
                cluster.lease_ms
            ),
        }));
        self.form(out);
    }

    /// Workers not heard from within their lease are lost.
    pub(super) fn check_leases(&mut self, now: Instant, out: &mut Vec<Command>) {
        let expired: Vec<WorkerId> = self
            .members
            .workers
            .iter()
            .filter(|(_, w)| self.lease_deadline(w).is_some_and(|deadline| now >= deadline))
            .map(|(id, _)| *id)
            .collect();
        let lease_ms = self.settings.config.cluster.lease_ms;
        for id in expired {
            let reason = format!("no heartbeat for longer than the lease ({lease_ms} ms)");
            out.push(Command::Disconnect { id, reason: reason.clone() });
            self.on_lost(now, id, reason, out);
        }
    }
}
