//! The cluster state machine of the coordinator: no I/O, no async, no clock reads.
//!
//! [`Core::on`] takes the time and one [`Event`] (a worker joined, a message arrived, a
//! checkpoint committed, a timer tick) and returns the [`Command`]s the actors must carry out
//! (send a message, commit a checkpoint, record a run event, finish). Every scenario — a worker
//! lost mid-step, a checkpoint that fails to commit, a lease that expires — is therefore a fast,
//! deterministic unit test with simulated time.
//!
//! A run goes through these phases:
//! `Gathering` (wait for `cluster.workers` to join) → `Starting` (ranks assigned, wait until
//! every worker has built its model and formed the ring) → `Training` (one step at a time: send
//! `Step` to every rank, wait for every `StepDone`) → `Finishing` (wait for the last evaluation
//! and checkpoint) → `Done`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use troupe_common::checkpoint;
use troupe_common::config::Config;
use troupe_common::events::RunEvent;
use troupe_common::proto::{
    Assignment, Capabilities, EvalReport, FileDigest, RefusalKind, StepReport, ToCoordinator, ToWorker,
};

pub type WorkerId = u64;

/// Something that happened, as the actors saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker passed the handshake (version and token checked by its session).
    WorkerJoined { id: WorkerId, info: Capabilities },
    /// A worker's connection ended or its session failed.
    WorkerLost { id: WorkerId, reason: String },
    /// A message from a joined worker.
    FromWorker { id: WorkerId, msg: ToCoordinator },
    CheckpointCommitted { step: u64, path: String },
    CheckpointCommitFailed { step: u64, error: String },
    /// Periodic timer: leases are checked here.
    Tick,
    /// SIGINT/SIGTERM: finish the current step, checkpoint, stop.
    ShutdownRequested,
}

/// Something the actors must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Send { to: WorkerId, msg: ToWorker },
    /// Close the worker's connection (after any `Send` before it).
    Disconnect { id: WorkerId, reason: String },
    /// Check and commit the checkpoint the ranks wrote into its temporary folder.
    CommitCheckpoint { step: u64, world_size: u32, files: Vec<FileDigest> },
    /// Append to events.jsonl, update metrics, show progress.
    Record(RunEvent),
    /// The run is over.
    Finish { ok: bool, error: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Gathering,
    Starting,
    Training,
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
    pub rank: Option<u32>,
    pub ready: bool,
    pub last_seen: Instant,
    /// Its last step's data + compute + communication time.
    pub last_step_seconds: Option<f64>,
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
    resume: Option<ResumeFrom>,
    /// Completed optimizer steps.
    completed: u64,
    step_started_at: Option<Instant>,
    step_reports: BTreeMap<u32, StepReport>,
    eval: Option<(u64, BTreeMap<u32, EvalReport>)>,
    checkpoints: BTreeMap<u64, PendingCheckpoint>,
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
        Core {
            run_dir: config.run_dir(),
            config,
            phase: Phase::Gathering,
            workers: BTreeMap::new(),
            ranks: Vec::new(),
            generation: 0,
            resume,
            completed,
            step_started_at: None,
            step_reports: BTreeMap::new(),
            eval: None,
            checkpoints: BTreeMap::new(),
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

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase,
            completed_steps: self.completed,
            total_steps: self.config.train.steps,
            workers: self.workers.len(),
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
            Event::WorkerLost { id, reason } => self.on_lost(id, reason, &mut out),
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
            Event::Tick => self.check_leases(now, &mut out),
            Event::ShutdownRequested => self.request_stop(now, &mut out),
        }
        out
    }

    /// Stop at the next step boundary, after a last checkpoint.
    fn request_stop(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.stop_requested = true;
        match self.phase {
            Phase::Gathering | Phase::Starting => {
                self.finish(now, false, Some("stopped before training started".into()), out)
            }
            // Training: the next step boundary checkpoints and stops.
            _ => {}
        }
    }

    fn on_joined(&mut self, now: Instant, id: WorkerId, info: Capabilities, out: &mut Vec<Command>) {
        if self.phase != Phase::Gathering || self.workers.len() >= self.config.cluster.workers {
            let reason = format!(
                "the run already has its {} workers (phase {:?}); this worker is not needed",
                self.config.cluster.workers, self.phase
            );
            out.push(Command::Send { to: id, msg: ToWorker::Refused { kind: RefusalKind::ClusterFull, reason: reason.clone() } });
            out.push(Command::Disconnect { id, reason });
            return;
        }
        self.workers.insert(id, WorkerEntry { info, rank: None, ready: false, last_seen: now, last_step_seconds: None });
        out.push(Command::Send { to: id, msg: ToWorker::Welcome {
                worker_id: id,
                heartbeat_ms: self.config.cluster.heartbeat_ms,
                lease_ms: self.config.cluster.lease_ms,
            },
        });
        if self.workers.len() == self.config.cluster.workers {
            self.assign_ranks(out);
        }
    }

    /// Ranks in join order; each worker learns its ring successor.
    fn assign_ranks(&mut self, out: &mut Vec<Command>) {
        self.generation += 1;
        self.ranks = self.workers.keys().copied().collect();
        let world = self.ranks.len() as u32;
        for (rank, id) in self.ranks.iter().enumerate() {
            let successor_id = self.ranks[(rank + 1) % self.ranks.len()];
            let successor = self.workers[&successor_id].info.peer_addr;
            if let Some(w) = self.workers.get_mut(id) {
                w.rank = Some(rank as u32);
                w.ready = false;
            }
            out.push(Command::Send {
                to: *id,
                msg: ToWorker::Assign(Assignment {
                    rank: rank as u32,
                    world_size: world,
                    generation: self.generation,
                    successor,
                    config_toml: self.config.to_toml(),
                    run_dir: self.run_dir.display().to_string(),
                    resume_from: self.resume.as_ref().map(|r| r.dir.clone()),
                    start_step: self.completed,
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
        self.phase = Phase::Starting;
    }

    fn on_lost(&mut self, id: WorkerId, reason: String, out: &mut Vec<Command>) {
        let Some(entry) = self.workers.remove(&id) else { return };
        out.push(Command::Record(RunEvent::WorkerLeft { step: self.completed, rank: entry.rank, worker_id: id, reason: reason.clone() }));
        match self.phase {
            // Not started yet: the slot is simply free again.
            Phase::Gathering => {}
            Phase::Done => {}
            _ => {
                let error = format!(
                    "worker {id} (rank {}, {}) was lost: {reason}",
                    entry.rank.map_or("-".into(), |r| r.to_string()),
                    entry.info.peer_addr
                );
                self.abort(error, out);
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

    fn on_message(&mut self, now: Instant, id: WorkerId, msg: ToCoordinator, out: &mut Vec<Command>) {
        match msg {
            ToCoordinator::Hello(_) => {
                let reason = "protocol error: a second Hello on an established connection".to_string();
                self.on_lost(id, reason.clone(), out);
                out.push(Command::Disconnect { id, reason });
            }
            ToCoordinator::Heartbeat => {}
            ToCoordinator::Ready { generation } => {
                if generation != self.generation || self.phase != Phase::Starting {
                    return;
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.ready = true;
                }
                if self.ranks.iter().all(|r| self.workers.get(r).is_some_and(|w| w.ready)) {
                    self.phase = Phase::Training;
                    self.started_at = Some(now);
                    out.push(Command::Record(RunEvent::Started {
                        step: self.completed,
                        world_size: self.ranks.len() as u32,
                        resumed_from: self.resume.as_ref().map(|r| r.dir.clone()),
                        config: self.config.to_toml(),
                    }));
                    self.next_step(now, out);
                }
            }
            ToCoordinator::StepDone(report) => {
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
            ToCoordinator::EvalDone(report) => {
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
            ToCoordinator::CheckpointWritten { step, files } => {
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
                    out.push(Command::CommitCheckpoint { step, world_size: world as u32, files });
                }
            }
            ToCoordinator::CheckpointFailed { step, error } => {
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
                // Without elastic membership the run cannot go on short of a rank: it
                // checkpoints at the next step boundary and stops, to be resumed later.
                let rank = self.rank_of(id).map_or("-".to_string(), |r| r.to_string());
                out.push(Command::Record(RunEvent::Warning {
                    step: self.completed,
                    message: format!(
                        "worker {id} (rank {rank}) is leaving ({reason}): checkpointing and stopping the run at the next step boundary"
                    ),
                }));
                self.request_stop(now, out);
            }
            ToCoordinator::Failed { error } => {
                let rank = self.rank_of(id);
                self.abort(format!("worker {id} (rank {rank:?}) failed: {error}"), out);
            }
        }
    }

    fn complete_step(&mut self, now: Instant, out: &mut Vec<Command>) {
        let reports = std::mem::take(&mut self.step_reports);
        let loss: f64 = reports.values().map(|r| r.loss_share).sum();
        let tokens: u64 = reports.values().map(|r| r.tokens).sum();
        let first = reports.values().next().expect("a completed step has reports");
        let seconds = self
            .step_started_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let comm_seconds = reports.values().map(|r| r.comm_seconds).fold(0.0, f64::max);
        let tokens_per_sec = if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 };
        self.last_tokens_per_second = Some(tokens_per_sec);
        out.push(Command::Record(RunEvent::Step {
            step: self.completed,
            loss,
            lr: first.lr,
            tokens_per_sec,
            grad_norm: first.grad_norm,
            step_seconds: seconds,
            comm_seconds,
        }));
        self.last_loss = Some(loss);
        self.completed += 1;

        let total = self.config.train.steps;
        let last = self.completed >= total || self.stop_requested;
        let due = |interval: u64, completed: u64| interval > 0 && completed % interval == 0;
        if due(self.config.eval.interval, self.completed) || (last && self.completed >= total) {
            self.request_eval(out);
        }
        if due(self.config.checkpoint.interval, self.completed) || last {
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
        let dir = checkpoint::tmp_dir(&self.run_dir, step).display().to_string();
        self.checkpoints.insert(
            step,
            PendingCheckpoint { requested_at: now, reported: BTreeSet::new(), files: Vec::new(), committing: false },
        );
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

    fn check_leases(&mut self, now: Instant, out: &mut Vec<Command>) {
        let lease = Duration::from_millis(self.config.cluster.lease_ms);
        let expired: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > lease)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let reason = format!("no heartbeat for longer than the lease ({} ms)", lease.as_millis());
            out.push(Command::Disconnect { id, reason: reason.clone() });
            self.on_lost(id, reason, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_common::proto::FileDigest;

    fn config(workers: usize, steps: u64) -> Config {
        let mut c = Config::default_config();
        c.cluster.workers = workers;
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
            peer_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr: None,
        }
    }

    use std::net::SocketAddr;

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
        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
        }
        fn step_done(&mut self, id: WorkerId, step: u64, loss_share: f64) -> Vec<Command> {
            self.from(
                id,
                ToCoordinator::StepDone(StepReport {
                    step,
                    loss_share,
                    tokens: 100,
                    grad_norm: 1.0,
                    lr: 0.1,
                    data_seconds: 0.0,
                    compute_seconds: 0.1,
                    comm_seconds: 0.01,
                }),
            )
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
            sim.on(Event::WorkerJoined { id, info: caps(1000 + id as u16) });
        }
        for id in 1..=n {
            sim.from(id, ToCoordinator::Ready { generation: 1 });
        }
        assert_eq!(sim.core.phase(), Phase::Training);
    }

    #[test]
    fn ranks_follow_join_order_and_form_a_ring() {
        let mut sim = Sim::new(config(3, 4));
        let mut all = Vec::new();
        for id in 1..=3 {
            all.extend(sim.on(Event::WorkerJoined { id, info: caps(1000 + id as u16) }));
        }
        let assigns: Vec<_> = sends(&all)
            .into_iter()
            .filter_map(|(to, m)| match m {
                ToWorker::Assign(a) => Some((to, a)),
                _ => None,
            })
            .collect();
        assert_eq!(assigns.len(), 3);
        for (to, a) in &assigns {
            assert_eq!(a.rank as u64, to - 1);
            assert_eq!(a.world_size, 3);
            let successor_port = 1000 + ((a.rank as u16 + 1) % 3) + 1;
            assert_eq!(a.successor.port(), successor_port);
        }
        assert_eq!(sim.core.phase(), Phase::Starting);
        // A fourth worker is refused: the run has its workers.
        let cmds = sim.on(Event::WorkerJoined { id: 4, info: caps(1004) });
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
            let a = sim.step_done(1, step, 1.25);
            assert!(sends(&a).is_empty(), "waits for every rank");
            sim.advance(500);
            let cmds = sim.step_done(2, step, 1.5);
            events.extend(records(&cmds));
            let s = sends(&cmds);
            let completed = step + 1;
            let wants_eval = completed == 2 || completed == 3;
            assert_eq!(s.iter().filter(|(_, m)| matches!(m, ToWorker::Evaluate { .. })).count(), if wants_eval { 2 } else { 0 });
            for id in [1, 2] {
                if wants_eval {
                    sim.from(id, ToCoordinator::EvalDone(EvalReport { step: completed, loss_sum: 4.0, sequences: 2 }));
                }
                if s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { .. })) {
                    let files = if id == 1 { vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "x".into() }] } else { vec![] };
                    let c = sim.from(id, ToCoordinator::CheckpointWritten { step: completed, files });
                    commits.extend(c.into_iter().filter(|c| matches!(c, Command::CommitCheckpoint { .. })));
                }
            }
        }
        let steps: Vec<_> = events.iter().filter_map(|e| match e { RunEvent::Step { step, loss, .. } => Some((*step, *loss)), _ => None }).collect();
        assert_eq!(steps, vec![(0, 2.75), (1, 2.75), (2, 2.75)]);
        let tps = events.iter().find_map(|e| match e { RunEvent::Step { tokens_per_sec, .. } => Some(*tokens_per_sec), _ => None }).unwrap();
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
    fn a_worker_lost_mid_step_fails_the_run_and_stops_the_others() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        sim.step_done(1, 0, 1.0);
        let cmds = sim.on(Event::WorkerLost { id: 2, reason: "connection reset".into() });
        let rec = records(&cmds);
        assert!(rec.iter().any(|e| matches!(e, RunEvent::WorkerLeft { rank: Some(1), .. })));
        assert!(rec.iter().any(|e| matches!(e, RunEvent::Failed { error, .. } if error.contains("connection reset"))));
        assert!(matches!(sends(&cmds)[..], [(1, ToWorker::Stop { .. })]));
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, .. })));
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
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Failed { error, .. } if error.contains("lease"))));
    }

    #[test]
    fn a_failed_commit_keeps_training_and_is_recorded() {
        let mut sim = Sim::new(config(1, 4));
        start(&mut sim, 1);
        sim.step_done(1, 0, 1.0);
        let cmds = sim.step_done(1, 1, 1.0);
        assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 2 })));
        sim.from(1, ToCoordinator::CheckpointWritten { step: 2, files: vec![] });
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
        sim.from(1, ToCoordinator::CheckpointWritten { step: 1, files: vec![] });
        let cmds = sim.on(Event::CheckpointCommitted { step: 1, path: "p".into() });
        assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: true, .. })));
    }

    #[test]
    fn a_leaving_worker_stops_the_run_at_the_next_step_boundary() {
        let mut sim = Sim::new(config(2, 100));
        start(&mut sim, 2);
        sim.step_done(1, 0, 1.0);
        let cmds = sim.from(2, ToCoordinator::Leaving { reason: "SIGTERM".into() });
        assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("rank 1") && message.contains("SIGTERM"))));
        let cmds = sim.step_done(2, 0, 1.0);
        let s = sends(&cmds);
        assert_eq!(s.iter().filter(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 1, .. })).count(), 2);
        assert!(!s.iter().any(|(_, m)| matches!(m, ToWorker::Step { .. })));
    }

    #[test]
    fn resume_starts_at_the_checkpoint_step() {
        let mut core = Core::new(config(1, 10), Some(ResumeFrom { dir: "d".into(), step: 4 }));
        let now = Instant::now();
        let cmds = core.on(now, Event::WorkerJoined { id: 1, info: caps(1) });
        let a = sends(&cmds).into_iter().find_map(|(_, m)| match m { ToWorker::Assign(a) => Some(a), _ => None }).unwrap();
        assert_eq!(a.start_step, 4);
        assert_eq!(a.resume_from.as_deref(), Some("d"));
        let cmds = core.on(now, Event::FromWorker { id: 1, msg: ToCoordinator::Ready { generation: 1 } });
        assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 4 })));
    }

    #[test]
    fn stale_or_foreign_reports_are_ignored() {
        let mut sim = Sim::new(config(2, 10));
        start(&mut sim, 2);
        assert!(sim.step_done(1, 5, 1.0).is_empty(), "a report for another step");
        assert!(sim.step_done(99, 0, 1.0).is_empty(), "an unknown worker");
        assert!(sim.from(1, ToCoordinator::EvalDone(EvalReport { step: 0, loss_sum: 1.0, sequences: 1 })).is_empty());
        assert!(sim.from(1, ToCoordinator::CheckpointWritten { step: 7, files: vec![] }).is_empty());
    }
}
