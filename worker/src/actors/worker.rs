//! Worker: the root actor of a worker process, once it has joined a coordinator (see
//! [`join`](super::join)). The actor forwards the coordinator's orders to the trainer thread
//! and the trainer's reports back; a writer task owns the control stream's send side so that
//! heartbeats never wait behind anything else.
//!
//! Membership generations: every `Assign` starts a new one ([`WorkerMembership`]). The worker
//! abandons whatever the previous generation was doing (a collective in flight fails at once,
//! queued orders are skipped), forms the new ring off the mailbox, moves the trainer to its
//! new rank, and answers `Ready` with the number of steps its state has completed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tch::Device;
use tokio::sync::{mpsc as tmpsc, oneshot, watch};
use troupe_common::collective::{form_ring, CollectiveError, RingCollective};
use troupe_common::metrics::WorkerMetrics;
use troupe_common::net;
use troupe_core::config::Config;
use troupe_core::proto::{Assignment, ToCoordinator, ToWorker};

use super::collective::{CollectiveActor, CollectiveArgs, CollectiveMsg};
use super::join::hostname;
use super::membership::{inside_run_dir, LinkPlan, WorkerMembership};
use super::trainer_thread::{trainer_thread, TrainerCmd, TrainerReport};
use crate::trainer::TrainerSetup;

pub struct Worker;

pub struct WorkerArgs {
    pub(super) endpoint: quinn::Endpoint,
    /// The coordinator's address, as this worker reaches it.
    pub(super) coordinator: SocketAddr,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) token: String,
    pub(super) device: Device,
    pub(super) heartbeat: Duration,
    pub(super) lease: Duration,
    pub(super) metrics: WorkerMetrics,
    pub(super) done: oneshot::Sender<Outcome>,
}

/// How one session with a coordinator ended.
#[derive(Debug)]
pub enum Outcome {
    /// The coordinator said Stop (or the worker was asked to stop and left).
    Stopped(String),
    /// This worker cannot go on.
    Failed(String),
    /// The coordinator went away; a restarted one may be joined again.
    CoordinatorLost(String),
}

pub enum WorkerMsg {
    FromCoordinator(ToWorker),
    LinkClosed(String),
    Trainer(TrainerReport),
    /// The ring of a generation is formed (or could not be).
    RingFormed {
        generation: u64,
        ring: Result<RingCollective, CollectiveError>,
    },
    /// SIGINT/SIGTERM: leave at the next step boundary.
    LeaveRequested(String),
}

pub struct WorkerState {
    endpoint: quinn::Endpoint,
    token: String,
    device: Device,
    metrics: WorkerMetrics,
    outbox: tmpsc::UnboundedSender<ToCoordinator>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    trainer: Option<(mpsc::Sender<TrainerCmd>, std::thread::JoinHandle<()>)>,
    /// The newest generation this worker was told about (`u64::MAX` once it stops): the
    /// trainer thread skips orders of older ones, and the collective actor and ring formation
    /// of an older one give up at once.
    generation_watch: watch::Sender<u64>,
    /// This worker's place in the current generation and the parts of its link that arrived.
    membership: WorkerMembership<ActorRef<CollectiveMsg>>,
    /// The run folder of the current assignment: the only place checkpoints are written to or
    /// resumed from.
    run_dir: PathBuf,
    collective_timeout: Duration,
    collective: Option<(u64, ActorRef<CollectiveMsg>)>,
    /// The coordinator is gone: nothing queued for it can be delivered.
    link_lost: bool,
    done: Option<oneshot::Sender<Outcome>>,
    outcome: Option<Outcome>,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(&self, me: ActorRef<WorkerMsg>, a: WorkerArgs) -> Result<WorkerState, ActorProcessingErr> {
        let (outbox, writer) = super::link::spawn_writer(a.send);
        let heartbeats = super::link::spawn_heartbeats(outbox.clone(), a.heartbeat);
        let mut recv = a.recv;
        let reader_me = me.clone();
        let lease = a.lease;
        let coordinator = a.coordinator;
        let probe_me = me.clone();
        // A coordinator whose process died is noticed within a heartbeat when its host says so
        // (ICMP port unreachable); otherwise by its silence, after the lease.
        let probe = tokio::spawn(async move {
            let e = net::probe::until_port_closed(coordinator, net::probe::PROBE_PERIOD).await;
            let _ =
                probe_me.cast(WorkerMsg::LinkClosed(format!("the coordinator's process is gone: its port {coordinator} is closed ({e})")));
        });
        let reader = tokio::spawn(async move {
            // Anything from the coordinator renews its lease; silence past the lease means it
            // is gone (killed, partitioned) and this worker must not go on training for it.
            let reason = loop {
                match tokio::time::timeout(lease, net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME)).await {
                    Ok(Ok(Some(ToWorker::Heartbeat))) => {}
                    Ok(Ok(Some(msg))) => {
                        if reader_me.cast(WorkerMsg::FromCoordinator(msg)).is_err() {
                            return;
                        }
                    }
                    Ok(Ok(None)) => break "the coordinator closed the control stream".to_string(),
                    Ok(Err(e)) => break format!("lost the coordinator: {e}"),
                    Err(_) => break format!("the coordinator has been silent for longer than its lease ({lease:?})"),
                }
            };
            let _ = reader_me.cast(WorkerMsg::LinkClosed(reason));
        });
        Ok(WorkerState {
            endpoint: a.endpoint,
            token: a.token,
            device: a.device,
            metrics: a.metrics,
            outbox,
            tasks: vec![writer, heartbeats, reader, probe],
            trainer: None,
            generation_watch: watch::channel(0).0,
            membership: WorkerMembership::default(),
            run_dir: PathBuf::new(),
            collective_timeout: Duration::from_secs(60),
            collective: None,
            link_lost: false,
            done: Some(a.done),
            outcome: None,
        })
    }

    async fn handle(&self, me: ActorRef<WorkerMsg>, msg: WorkerMsg, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::FromCoordinator(msg) => state.on_coordinator(&me, msg).await,
            WorkerMsg::LinkClosed(reason) => {
                state.link_lost = true;
                state.stop(&me, Outcome::CoordinatorLost(reason))
            }
            WorkerMsg::Trainer(report) => state.on_trainer(&me, report),
            WorkerMsg::RingFormed { generation, ring } => state.on_ring_formed(&me, generation, ring).await,
            WorkerMsg::LeaveRequested(signal) => {
                if state.trainer.is_none() {
                    state.stop(&me, Outcome::Stopped(format!("{signal} before the run started")));
                } else {
                    tracing::info!("{signal}: leaving at the next step boundary (again to leave now)");
                    state.send(ToCoordinator::Leaving { reason: format!("{signal} on {}", hostname()) });
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<WorkerMsg>,
        event: SupervisionEvent,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        // A collective actor that dies (a panic) takes its generation's ring with it: the
        // coordinator hears of it and forms a new one.
        let (cell, reason, panicked) = match event {
            SupervisionEvent::ActorFailed(cell, e) => (cell, format!("the collective failed: {e}"), true),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("the collective stopped: {}", reason.unwrap_or_default()), false)
            }
            _ => return Ok(()),
        };
        if state.outcome.is_some() {
            return Ok(());
        }
        match &state.collective {
            Some((generation, actor)) if actor.get_id() == cell.get_id() => {
                let generation = *generation;
                state.collective = None;
                // Replaced by the next generation's actor, which the coordinator starts now.
                state.metrics.actor_restarts_total.with_label_values(&["collective"]).inc();
                tracing::warn!("{reason}; the coordinator re-forms the ring");
                if generation == state.generation() {
                    state.send(ToCoordinator::CollectiveFailed { generation, step: None, error: reason });
                }
            }
            // A panic noticed after the coordinator had already moved on (the trainer's aborted
            // collective reached it first): still a failure, counted and logged.
            _ if panicked => {
                state.metrics.actor_restarts_total.with_label_values(&["collective"]).inc();
                tracing::warn!("{reason}; the coordinator re-forms the ring (already under way)");
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<WorkerMsg>, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        // End every generation: a collective in flight is abandoned and the ring formation
        // cancelled, which releases a trainer blocked in an all-reduce so the thread can be
        // joined at once.
        let _ = state.generation_watch.send_replace(u64::MAX);
        if let Some((_, actor)) = state.collective.take() {
            actor.stop(None);
        }
        if let Some((cmds, thread)) = state.trainer.take() {
            let _ = cmds.send(TrainerCmd::Stop);
            // The trainer finishes its current command (at most one step) and exits.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Let queued frames (a final report) leave before the connection closes.
        let writer = state.tasks.remove(0);
        for task in &state.tasks {
            task.abort();
        }
        drop(std::mem::replace(&mut state.outbox, tmpsc::unbounded_channel().0));
        if state.link_lost {
            writer.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        }
        let outcome = state.outcome.take().unwrap_or_else(|| Outcome::Failed("stopped".into()));
        if let Some(done) = state.done.take() {
            let _ = done.send(outcome);
        }
        Ok(())
    }
}

impl WorkerState {
    /// The current membership generation (0 before the first assignment).
    fn generation(&self) -> u64 {
        *self.generation_watch.borrow()
    }

    fn send(&self, msg: ToCoordinator) {
        let _ = self.outbox.send(msg);
    }

    fn stop(&mut self, me: &ActorRef<WorkerMsg>, outcome: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        me.stop(None);
    }

    fn fail(&mut self, me: &ActorRef<WorkerMsg>, error: String) {
        tracing::error!("{error}");
        self.send(ToCoordinator::Failed { error: error.clone() });
        self.stop(me, Outcome::Failed(error));
    }

    fn trainer_cmd(&mut self, me: &ActorRef<WorkerMsg>, cmd: TrainerCmd) {
        let sent = self.trainer.as_ref().map(|(tx, _)| tx.send(cmd).is_ok()).unwrap_or(false);
        if !sent {
            self.fail(me, "protocol error: training command before the assignment, or the trainer has exited".into());
        }
    }

    async fn on_coordinator(&mut self, me: &ActorRef<WorkerMsg>, msg: ToWorker) {
        let generation = self.generation();
        match msg {
            ToWorker::Assign(assignment) => {
                if let Err(e) = self.assign(me, assignment) {
                    self.fail(me, e);
                }
            }
            ToWorker::Pause { generation, reason } => {
                tracing::warn!("paused: {reason}");
                self.membership.pause(generation);
                self.enter_generation();
            }
            ToWorker::Sync { generation, source_rank, step } => {
                if generation == self.generation() {
                    self.trainer_cmd(me, TrainerCmd::Sync { generation, source_rank, step });
                }
            }
            ToWorker::Step { step } => self.trainer_cmd(me, TrainerCmd::Step { generation, step }),
            ToWorker::Evaluate { step } => self.trainer_cmd(me, TrainerCmd::Evaluate { generation, step }),
            ToWorker::Checkpoint { step, dir } => {
                let dir = PathBuf::from(dir);
                if inside_run_dir(&self.run_dir, &dir) {
                    self.trainer_cmd(me, TrainerCmd::Checkpoint { generation, step, dir });
                } else {
                    let error = format!(
                        "refused to write a checkpoint to {}: it is not inside the run folder {}",
                        dir.display(),
                        self.run_dir.display()
                    );
                    tracing::error!("{error}");
                    self.send(ToCoordinator::CheckpointFailed { generation, step, error });
                }
            }
            ToWorker::Stop { reason } => {
                tracing::info!("stopping: {reason}");
                self.stop(me, Outcome::Stopped(reason));
            }
            ToWorker::NcclBootstrap { generation, id } => {
                if generation == self.generation() && self.membership.nccl_id(generation, id) {
                    self.regroup_when_linked(me, generation);
                }
            }
            ToWorker::Heartbeat => {}
            ToWorker::Welcome { .. } | ToWorker::Refused { .. } | ToWorker::Authenticated { .. } => {
                self.fail(me, "protocol error: a second Welcome/Refused/Authenticated".into());
            }
            ToWorker::EvaluateCheckpoint { step, .. } => {
                self.fail(me, format!("protocol error: asked to evaluate the checkpoint of step {step}, as only an eval worker is"));
            }
        }
    }

    /// Ends the previous generation, now that the membership has moved on: its orders are
    /// skipped, its collective in flight is abandoned, its ring closed.
    fn enter_generation(&mut self) {
        let generation = self.membership.generation();
        let _ = self.generation_watch.send_replace(generation);
        if let Some((_, actor)) = self.collective.take() {
            actor.stop(Some(format!("generation {generation} began")));
        }
    }

    fn assign(&mut self, me: &ActorRef<WorkerMsg>, a: Assignment) -> Result<(), String> {
        let config = Config::from_toml_str(&a.config_toml, "the coordinator's assignment").map_err(|e| e.to_string())?;
        let run_dir = PathBuf::from(&a.run_dir);
        if let Some(resume) = a.resume_from.as_deref().filter(|r| !inside_run_dir(&run_dir, Path::new(r))) {
            return Err(format!("refused to resume from {resume}: it is not inside the run folder {}", run_dir.display()));
        }
        self.run_dir = run_dir;
        let place = self.membership.assign(&a)?;
        self.enter_generation();
        self.collective_timeout = Duration::from_millis(config.cluster.collective_timeout_ms);
        tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, collective = ?place.kind, "assigned");

        // The trainer thread builds the model (and loads the checkpoint) while the ring forms.
        let sharded = config.parallel.strategy != troupe_core::shard::Strategy::Ddp;
        let setup = TrainerSetup {
            config,
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            device: self.device,
            resume_from: a.resume_from.map(PathBuf::from),
            start_step: a.start_step,
        };
        if self.trainer.is_some() && sharded {
            // A sharded state does not survive a new world size: every member reloads what
            // the coordinator says (the newest checkpoint, or a fresh start).
            self.trainer_cmd(me, TrainerCmd::Rebuild(Box::new(setup)));
        } else if self.trainer.is_none() {
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let reporter = me.clone();
            let latest = self.generation_watch.subscribe();
            let thread = std::thread::Builder::new()
                .name("trainer".into())
                .spawn(move || trainer_thread(setup, cmd_rx, latest, reporter))
                .map_err(|e| format!("cannot start the trainer thread: {e}"))?;
            self.trainer = Some((cmd_tx, thread));
        }

        if a.world_size == 1 {
            let (generation, timeout) = (a.generation, self.collective_timeout);
            self.trainer_cmd(me, TrainerCmd::Regroup { generation, rank: a.rank, world_size: 1, link: LinkPlan::Alone, timeout });
            return Ok(());
        }
        // The NCCL group's rank 0 makes the communicator's id; the coordinator hands it to every
        // member (NcclBootstrap), and each then joins on its trainer thread.
        if a.nccl.is_some_and(|n| n.rank == 0) {
            match crate::comm::nccl::unique_id() {
                Ok(id) => self.send(ToCoordinator::NcclUniqueId { generation: a.generation, id }),
                Err(e) => {
                    let error = format!("the NCCL group's rank 0 cannot create the NCCL unique id: {e}");
                    tracing::warn!("{error}");
                    self.send(ToCoordinator::NcclFailed { generation: a.generation, error });
                }
            }
        }
        let Some(place) = a.ring else { return Ok(()) };
        // Formed off the mailbox, so that a newer generation (which cancels it) or a Stop is
        // not held up behind it.
        let endpoint = self.endpoint.clone();
        let token = self.token.clone();
        let timeout = self.collective_timeout;
        let generation = a.generation;
        let mut watch = self.generation_watch.subscribe();
        let me = me.clone();
        tokio::spawn(async move {
            let formed = tokio::select! {
                r = form_ring(&endpoint, place.rank, place.world_size, generation, place.successor, &token, timeout) => r,
                _ = watch.wait_for(|g| *g != generation) => return,
            };
            let _ = me.cast(WorkerMsg::RingFormed { generation, ring: formed });
        });
        Ok(())
    }

    async fn on_ring_formed(&mut self, me: &ActorRef<WorkerMsg>, generation: u64, ring: Result<RingCollective, CollectiveError>) {
        if generation != self.generation() || !self.membership.wants_ring(generation) {
            return; // superseded: dropping the ring closes it
        }
        let ring = match ring {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!("cannot form the ring of generation {generation}: {error}");
                self.send(ToCoordinator::CollectiveFailed { generation, step: None, error: error.to_string() });
                return;
            }
        };
        if let Some((m, place)) = self.membership.place().and_then(|m| Some((m, m.ring?))) {
            tracing::info!(rank = m.rank, ring_rank = place.rank, ring_world = place.world_size, generation, successor = %place.successor, "ring formed");
        }
        let args =
            CollectiveArgs { ring, generation, metrics: self.metrics.clone(), current_generation: self.generation_watch.subscribe() };
        match Actor::spawn_linked(None, CollectiveActor, args, me.get_cell()).await {
            Ok((actor, _)) => {
                self.collective = Some((generation, actor.clone()));
                if self.membership.ring_formed(generation, actor).is_ok() {
                    self.regroup_when_linked(me, generation);
                }
            }
            Err(e) => self.fail(me, format!("cannot start the collective actor: {e}")),
        }
    }

    /// Hands the trainer its link for `generation` once every part this worker needs has
    /// arrived: the ring (if it is in the ring) and the NCCL id (if it is in the NCCL group).
    fn regroup_when_linked(&mut self, me: &ActorRef<WorkerMsg>, generation: u64) {
        let Some(place) = self.membership.place() else { return };
        match self.membership.take_link() {
            None => {}
            Some(Ok(link)) => {
                let (rank, world_size, timeout) = (place.rank, place.world_size, self.collective_timeout);
                self.trainer_cmd(me, TrainerCmd::Regroup { generation, rank, world_size, link, timeout });
            }
            Some(Err(error)) => self.fail(me, error),
        }
    }

    fn on_trainer(&mut self, me: &ActorRef<WorkerMsg>, report: TrainerReport) {
        match report {
            TrainerReport::Built(f) => {
                for (kind, bytes) in [("params", f.params), ("grads", f.grads), ("optim", f.optim)] {
                    self.metrics.memory_bytes.with_label_values(&[kind]).set(bytes as i64);
                }
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                troupe_common::say!(
                    "worker holds {:.1} MiB of parameters, {:.1} MiB of gradients, {:.1} MiB of optimizer state",
                    mib(f.params),
                    mib(f.grads),
                    mib(f.optim)
                );
            }
            TrainerReport::CheckpointWaited(seconds) => self.metrics.checkpoint_wait_seconds_total.inc_by(seconds),
            TrainerReport::Regrouped { generation, completed_steps } => {
                if generation == self.generation() {
                    self.send(ToCoordinator::Ready { generation, completed_steps });
                }
            }
            TrainerReport::Synced { generation, step } => self.send(ToCoordinator::Synced { generation, step }),
            TrainerReport::SyncFailed { generation, error } => self.send(ToCoordinator::CollectiveFailed { generation, step: None, error }),
            TrainerReport::LinkFailed { generation, error } => self.send(ToCoordinator::NcclFailed { generation, error }),
            TrainerReport::StepDone(r) => {
                self.metrics.step.set(r.step as i64 + 1);
                let phases = [("compute", r.compute_seconds), ("communication", r.comm_seconds), ("data", r.data_seconds)];
                for (phase, s) in phases {
                    self.metrics.step_seconds.with_label_values(&[phase]).observe(s);
                }
                self.send(ToCoordinator::StepDone(r));
            }
            TrainerReport::StepAborted { generation, step, error } => {
                if generation == self.generation() {
                    tracing::warn!("step {step} abandoned: {error}");
                }
                self.send(ToCoordinator::CollectiveFailed { generation, step: Some(step), error });
            }
            TrainerReport::EvalDone(r) => self.send(ToCoordinator::EvalDone(r)),
            TrainerReport::CheckpointWritten { generation, step, files } => {
                self.send(ToCoordinator::CheckpointWritten { generation, step, files })
            }
            TrainerReport::CheckpointFailed { generation, step, error } => {
                self.send(ToCoordinator::CheckpointFailed { generation, step, error })
            }
            TrainerReport::Failed(error) => self.fail(me, error),
        }
    }
}
