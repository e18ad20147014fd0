//! Worker: the root actor of a worker process.
//!
//! `run_worker` connects to the coordinator (retrying while it is not up yet), says Hello
//! (protocol version, join-token proof, capabilities) and, once welcomed, hands the connection
//! to a Worker actor. The actor forwards the coordinator's orders to the trainer thread and
//! the trainer's reports back; a writer task owns the control stream's send side so that
//! heartbeats never wait behind anything else.
//!
//! Membership generations: every `Assign` starts a new one. The worker abandons whatever the
//! previous generation was doing (a collective in flight fails at once, queued orders are
//! skipped), forms the new ring off the mailbox, moves the trainer to its new rank, and
//! answers `Ready` with the number of steps its state has completed.
//!
//! If the coordinator goes away the worker stops training (no orphan keeps a model busy) and
//! tries to join a restarted coordinator for `cluster.rejoin_ms`, then exits.

use super::collective::{CollectiveActor, CollectiveArgs, CollectiveMsg};
use crate::nccl::{NcclComm, NcclError};
use crate::trainer::{through_host, Alone, Comm, Footprint, Mixed, Trainer, TrainerError, TrainerSetup};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};
use tokio::sync::{mpsc as tmpsc, oneshot, watch};
use troupe_common::collective::{form_ring, CollectiveTag, RingCollective};
use troupe_core::config::Config;
use troupe_common::metrics::{self, WorkerMetrics};
use troupe_common::net::{self, close as close_code, NetOptions};
use troupe_core::proto::{
    Assignment, Capabilities, CollectiveKind, EvalReport, FileDigest, Hello, NcclPlace, RingPlace, StepReport, ToCoordinator, ToWorker,
    PROTOCOL_VERSION,
};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: SocketAddr,
    pub token: String,
    /// Where ring peers connect to this worker; port 0 picks one.
    pub listen: SocketAddr,
    /// The address peers should use, when `listen` is a wildcard.
    pub advertise: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Intra-op threads; 0 = all cores.
    pub threads: usize,
    pub device: Device,
    /// Keep retrying to reach the coordinator this long.
    pub connect_timeout: Duration,
    /// TLS of this worker's endpoint (towards the coordinator and the ring peers); must match
    /// the coordinator's: `ClusterCa` with a certificate from the same CA, or the default.
    pub tls: net::TlsSetup,
}

/// How a worker's participation ended.
#[derive(Debug)]
pub enum WorkerExit {
    /// The coordinator said Stop.
    Stopped(String),
}

pub async fn run_worker(opts: WorkerOptions) -> anyhow::Result<WorkerExit> {
    let threads = if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);

    let endpoint = net::make_endpoint(opts.listen, &NetOptions { tls: opts.tls.clone(), ..NetOptions::default() })?;
    let bound = endpoint.local_addr()?;
    let peer_addr = match opts.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => SocketAddr::new(local_ip_towards(opts.coordinator)?, bound.port()),
        None => bound,
    };
    let worker_metrics = WorkerMetrics::new(&format!("{}", std::process::id()));
    let metrics_addr = match opts.metrics_listen {
        Some(addr) => Some(metrics::serve(worker_metrics.registry.clone(), addr, None).await?),
        None => None,
    };
    if let Some(addr) = metrics_addr {
        tracing::info!("worker metrics on http://{addr}/metrics");
    }
    let capabilities = Capabilities {
        hostname: hostname(),
        pid: std::process::id(),
        threads: threads as u32,
        device: troupe_common::device::device_name(opts.device),
        nccl: nccl_capable(opts.device),
        peer_addr,
        metrics_addr,
    };

    // A SIGINT/SIGTERM leaves at a step boundary; a second one leaves now. The flag also
    // covers a signal that arrives while (re)connecting.
    let signals = Arc::new(SignalState::default());
    let signal_task = {
        let signals = signals.clone();
        tokio::spawn(async move {
            let first = troupe_common::signals::shutdown_signal().await;
            signals.note(first.to_string());
            troupe_common::signals::shutdown_signal().await;
            signals.note_twice();
        })
    };

    // Joins the coordinator; when it goes away (killed, restarted, partitioned), keeps
    // trying to join it again for its `rejoin_ms`, starting afresh: the restarted coordinator
    // hands out the state from the newest checkpoint.
    let mut rejoin: Option<(Instant, String)> = None;
    let outcome = loop {
        let timeout = match &rejoin {
            None => opts.connect_timeout,
            Some((deadline, _)) => deadline.saturating_duration_since(Instant::now()),
        };
        let joined = tokio::select! {
            joined = join(&endpoint, &opts, capabilities.clone(), timeout) => joined,
            _ = signals.requested() => break Ok(WorkerExit::Stopped("asked to stop before joining".into())),
        };
        let (conn, send, recv, welcome) = match (joined, &rejoin) {
            (Ok(j), _) => j,
            (Err(e), Some((_, lost))) => break Err(anyhow::anyhow!("{lost}; it did not come back: {e}")),
            (Err(e), None) => break Err(e),
        };
        if rejoin.is_some() {
            tracing::info!("rejoined the coordinator at {} as worker {}", opts.coordinator, welcome.worker_id);
        } else {
            tracing::info!("joined the coordinator at {} as worker {}", opts.coordinator, welcome.worker_id);
        }
        let (done_tx, done_rx) = oneshot::channel();
        let args = WorkerArgs {
            endpoint: endpoint.clone(),
            coordinator: conn.remote_address(),
            send,
            recv,
            token: opts.token.clone(),
            device: opts.device,
            heartbeat: Duration::from_millis(welcome.heartbeat_ms.clamp(10, 600_000)),
            lease: Duration::from_millis(welcome.lease_ms.clamp(20, 3_600_000)),
            metrics: worker_metrics.clone(),
            done: done_tx,
        };
        let (actor, handle) = Actor::spawn(None, Worker, args).await?;
        let forward = {
            let signals = signals.clone();
            let actor = actor.clone();
            tokio::spawn(async move {
                signals.requested().await;
                let reason = signals.reason();
                let _ = actor.cast(WorkerMsg::LeaveRequested(reason));
                signals.requested_twice().await;
                actor.stop(Some("asked twice to stop".into()));
            })
        };
        let result = done_rx.await.unwrap_or_else(|_| Outcome::Failed("the worker actor stopped unexpectedly".into()));
        let _ = handle.await;
        forward.abort();
        match result {
            Outcome::Stopped(reason) => {
                conn.close(close_code::SHUTDOWN, b"worker leaving");
                // Let the close reach a coordinator that is still there.
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                break Ok(WorkerExit::Stopped(reason));
            }
            Outcome::Failed(error) => {
                conn.close(close_code::SHUTDOWN, b"worker failed");
                break Err(anyhow::anyhow!(error));
            }
            Outcome::CoordinatorLost(reason) => {
                conn.close(close_code::SHUTDOWN, b"coordinator lost");
                let window = Duration::from_millis(welcome.rejoin_ms);
                if window.is_zero() || signals.was_requested() {
                    break Err(anyhow::anyhow!("{reason}"));
                }
                troupe_common::say_err!("lost the coordinator ({reason}); training stopped; trying to rejoin for {}s", window.as_secs());
                rejoin = Some((Instant::now() + window, format!("lost the coordinator at {} ({reason})", opts.coordinator)));
            }
        }
    };
    signal_task.abort();
    outcome
}

/// SIGINT/SIGTERM seen by this process, shared between the signal task and each session.
#[derive(Default)]
struct SignalState {
    reason: std::sync::Mutex<Option<String>>,
    once: tokio::sync::Notify,
    twice: tokio::sync::Notify,
    twice_seen: std::sync::atomic::AtomicBool,
}

impl SignalState {
    fn note(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            *r = Some(reason);
        }
        self.once.notify_waiters();
    }
    fn note_twice(&self) {
        self.twice_seen.store(true, Ordering::SeqCst);
        self.twice.notify_waiters();
    }
    fn was_requested(&self) -> bool {
        self.reason.lock().map(|r| r.is_some()).unwrap_or(false)
    }
    fn reason(&self) -> String {
        self.reason.lock().ok().and_then(|r| r.clone()).unwrap_or_else(|| "signal".into())
    }
    async fn requested(&self) {
        let notified = self.once.notified();
        if self.was_requested() {
            return;
        }
        notified.await
    }
    async fn requested_twice(&self) {
        let notified = self.twice.notified();
        if self.twice_seen.load(Ordering::SeqCst) {
            return;
        }
        notified.await
    }
}

struct Welcomed {
    worker_id: u64,
    heartbeat_ms: u64,
    lease_ms: u64,
    rejoin_ms: u64,
}

/// Connects (retrying while the coordinator is not up, within `timeout`) and says Hello.
async fn join(
    endpoint: &quinn::Endpoint,
    opts: &WorkerOptions,
    capabilities: Capabilities,
    timeout: Duration,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, Welcomed)> {
    let conn = connect_with_retry(endpoint, opts.coordinator, timeout).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
        anyhow::anyhow!("the coordinator at {} dropped the connection: {}", opts.coordinator, net::describe_connection_error(&e))
    })?;
    let join_proof = if opts.token.is_empty() { [0u8; 32] } else { net::join_proof(&conn, &opts.token)? };
    let hello = Hello { protocol_version: PROTOCOL_VERSION, join_proof, capabilities };
    net::write_frame(&mut send, &ToCoordinator::Hello(hello)).await?;
    let welcome = match net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await {
        Ok(Some(ToWorker::Welcome { worker_id, heartbeat_ms, lease_ms, rejoin_ms })) => {
            Welcomed { worker_id, heartbeat_ms, lease_ms, rejoin_ms }
        }
        Ok(Some(ToWorker::Refused { kind, reason })) => anyhow::bail!("the coordinator refused this worker ({kind:?}): {reason}"),
        Ok(Some(other)) => anyhow::bail!("protocol error: expected Welcome, got {other:?}"),
        Ok(None) => anyhow::bail!("the coordinator closed the connection during the handshake"),
        Err(e) => anyhow::bail!("the coordinator closed the connection during the handshake: {e}"),
    };
    Ok((conn, send, recv, welcome))
}

async fn connect_with_retry(endpoint: &quinn::Endpoint, addr: SocketAddr, timeout: Duration) -> anyhow::Result<quinn::Connection> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async { endpoint.connect(addr, net::TLS_SERVER_NAME)?.await.map_err(anyhow::Error::from) };
        // One attempt at a silent address lasts until QUIC's idle timeout: bound it by what is
        // left of ours.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let attempt =
            async { tokio::time::timeout(left, attempt).await.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {left:?}"))) };
        match attempt.await {
            Ok(conn) => return Ok(conn),
            // A refused certificate stays refused: fail now instead of retrying until the timeout.
            Err(e) if e.downcast_ref::<quinn::ConnectionError>().is_some_and(net::is_tls_handshake_failure) => {
                let detail = e.downcast_ref::<quinn::ConnectionError>().map(net::describe_connection_error).unwrap_or_default();
                anyhow::bail!("TLS handshake with the coordinator at {addr} failed: {detail}")
            }
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::debug!("coordinator at {addr} not reachable yet ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => anyhow::bail!("cannot reach the coordinator at {addr} within {timeout:?}: {e}"),
        }
    }
}

/// The local address the OS would use to reach `remote` (no packet is sent).
fn local_ip_towards(remote: SocketAddr) -> anyhow::Result<std::net::IpAddr> {
    let bind: SocketAddr = if remote.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(remote)?;
    Ok(socket.local_addr()?.ip())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// Whether this worker can join an NCCL communicator; says why not when it computes on CUDA.
fn nccl_capable(device: Device) -> bool {
    if !device.is_cuda() {
        return false;
    }
    match crate::nccl::available() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("this CUDA worker cannot use NCCL, so its gradients go over the QUIC ring: {e}");
            false
        }
    }
}

pub struct Worker;

pub struct WorkerArgs {
    endpoint: quinn::Endpoint,
    /// The coordinator's address, as this worker reaches it.
    coordinator: SocketAddr,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    token: String,
    device: Device,
    heartbeat: Duration,
    lease: Duration,
    metrics: WorkerMetrics,
    done: oneshot::Sender<Outcome>,
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
        ring: Result<RingCollective, String>,
    },
    /// SIGINT/SIGTERM: leave at the next step boundary.
    LeaveRequested(String),
}

/// What the trainer thread reports back.
pub enum TrainerReport {
    /// The model is built (and loaded); the thread now waits for its first `Regroup`.
    Built(Footprint),
    /// Training waited this long for the previous checkpoint write.
    CheckpointWaited(f64),
    /// Took its place in `generation`, holding the state after `completed_steps` steps.
    Regrouped {
        generation: u64,
        completed_steps: u64,
    },
    Synced {
        generation: u64,
        step: u64,
    },
    SyncFailed {
        generation: u64,
        error: String,
    },
    /// NCCL could not form the generation's communicator.
    LinkFailed {
        generation: u64,
        error: String,
    },
    StepDone(StepReport),
    /// The step's collective failed: nothing was applied.
    StepAborted {
        generation: u64,
        step: u64,
        error: String,
    },
    EvalDone(EvalReport),
    CheckpointWritten {
        generation: u64,
        step: u64,
        files: Vec<FileDigest>,
    },
    CheckpointFailed {
        generation: u64,
        step: u64,
        error: String,
    },
    Failed(String),
}

/// Orders for the trainer thread, each tagged with the membership generation it belongs to:
/// orders of a generation that is over are skipped.
enum TrainerCmd {
    /// Build the training state again for a new place in the run (sharded strategies, whose
    /// state is split by world size, after a membership change: from the newest checkpoint).
    Rebuild(Box<TrainerSetup>),
    Regroup {
        generation: u64,
        rank: u32,
        world_size: u32,
        link: LinkPlan,
    },
    Sync {
        generation: u64,
        source_rank: u32,
        step: u64,
    },
    Step {
        generation: u64,
        step: u64,
    },
    Evaluate {
        generation: u64,
        step: u64,
    },
    Checkpoint {
        generation: u64,
        step: u64,
        dir: PathBuf,
    },
    Stop,
}

/// How the trainer of a generation reaches the other ranks.
enum LinkPlan {
    /// A world of one.
    Alone,
    /// The generation's QUIC ring, through its collective actor.
    Ring(ActorRef<CollectiveMsg>),
    /// An NCCL communicator of every rank, joined with rank 0's unique id; operations give up
    /// after `timeout`.
    Nccl { id: Vec<u8>, place: NcclPlace, timeout: Duration },
    /// A mixed generation: this worker's NCCL group (if it is in it) and ring (if it is in
    /// it), see [`Mixed`].
    Mixed { nccl: Option<(Vec<u8>, NcclPlace)>, ring: Option<ActorRef<CollectiveMsg>>, timeout: Duration },
}

/// This worker's place in the current generation.
#[derive(Clone, Copy)]
struct Membership {
    rank: u32,
    world_size: u32,
    kind: CollectiveKind,
    ring: Option<RingPlace>,
    nccl: Option<NcclPlace>,
}

/// The parts of a generation's link that have arrived (the ring formed, the NCCL id handed
/// out); the trainer regroups once every part this worker needs is there.
#[derive(Default)]
struct PendingLink {
    ring: Option<ActorRef<CollectiveMsg>>,
    nccl_id: Option<Vec<u8>>,
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
    membership: Option<Membership>,
    pending: PendingLink,
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
        let (outbox, mut outbox_rx) = tmpsc::unbounded_channel::<ToCoordinator>();
        let mut send = a.send;
        let writer = tokio::spawn(async move {
            while let Some(msg) = outbox_rx.recv().await {
                if net::write_frame(&mut send, &msg).await.is_err() {
                    break;
                }
            }
            // Closing the connection discards unsent data: wait (briefly) until the
            // coordinator has read the last report before `run_worker` closes it.
            if send.finish().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            }
        });
        let heartbeats = {
            let outbox = outbox.clone();
            let period = a.heartbeat;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if outbox.send(ToCoordinator::Heartbeat).is_err() {
                        break;
                    }
                }
            })
        };
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
            membership: None,
            pending: PendingLink::default(),
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
                self.enter_generation(generation);
                self.membership = None;
            }
            ToWorker::Sync { generation, source_rank, step } => {
                if generation == self.generation() {
                    self.trainer_cmd(me, TrainerCmd::Sync { generation, source_rank, step });
                }
            }
            ToWorker::Step { step } => self.trainer_cmd(me, TrainerCmd::Step { generation, step }),
            ToWorker::Evaluate { step } => self.trainer_cmd(me, TrainerCmd::Evaluate { generation, step }),
            ToWorker::Checkpoint { step, dir } => self.trainer_cmd(me, TrainerCmd::Checkpoint { generation, step, dir: dir.into() }),
            ToWorker::Stop { reason } => {
                tracing::info!("stopping: {reason}");
                self.stop(me, Outcome::Stopped(reason));
            }
            ToWorker::NcclBootstrap { generation, id } => {
                if generation == self.generation() && self.membership.is_some_and(|m| m.nccl.is_some()) {
                    self.pending.nccl_id = Some(id);
                    self.regroup_when_linked(me, generation);
                }
            }
            ToWorker::Heartbeat => {}
            ToWorker::Welcome { .. } | ToWorker::Refused { .. } => {
                self.fail(me, "protocol error: a second Welcome/Refused".into());
            }
        }
    }

    /// Ends the previous generation: its orders are skipped, its collective in flight is
    /// abandoned, its ring closed.
    fn enter_generation(&mut self, generation: u64) {
        let _ = self.generation_watch.send_replace(generation);
        if let Some((_, actor)) = self.collective.take() {
            actor.stop(Some(format!("generation {generation} began")));
        }
    }

    fn assign(&mut self, me: &ActorRef<WorkerMsg>, a: Assignment) -> Result<(), String> {
        if a.generation <= self.generation() {
            return Err(format!("protocol error: assignment for generation {} after generation {}", a.generation, self.generation()));
        }
        let config = Config::from_toml_str(&a.config_toml, "the coordinator's assignment").map_err(|e| e.to_string())?;
        self.enter_generation(a.generation);
        self.collective_timeout = Duration::from_millis(config.cluster.collective_timeout_ms);
        let kind = a.collective();
        self.membership = Some(Membership { rank: a.rank, world_size: a.world_size, kind, ring: a.ring, nccl: a.nccl });
        self.pending = PendingLink::default();
        tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, collective = ?kind, "assigned");

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
            self.trainer_cmd(me, TrainerCmd::Regroup { generation: a.generation, rank: a.rank, world_size: 1, link: LinkPlan::Alone });
            return Ok(());
        }
        // The NCCL group's rank 0 makes the communicator's id; the coordinator hands it to every
        // member (NcclBootstrap), and each then joins on its trainer thread.
        if a.nccl.is_some_and(|n| n.rank == 0) {
            match crate::nccl::unique_id() {
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
                r = form_ring(&endpoint, place.rank, place.world_size, generation, place.successor, &token, timeout) => r.map_err(|e| e.to_string()),
                _ = watch.wait_for(|g| *g != generation) => return,
            };
            let _ = me.cast(WorkerMsg::RingFormed { generation, ring: formed });
        });
        Ok(())
    }

    async fn on_ring_formed(&mut self, me: &ActorRef<WorkerMsg>, generation: u64, ring: Result<RingCollective, String>) {
        if generation != self.generation() {
            return; // superseded: dropping the ring closes it
        }
        let Some(m) = self.membership else { return };
        let ring = match ring {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!("cannot form the ring of generation {generation}: {error}");
                self.send(ToCoordinator::CollectiveFailed { generation, step: None, error });
                return;
            }
        };
        if let Some(place) = m.ring {
            tracing::info!(rank = m.rank, ring_rank = place.rank, ring_world = place.world_size, generation, successor = %place.successor, "ring formed");
        }
        let args =
            CollectiveArgs { ring, generation, metrics: self.metrics.clone(), current_generation: self.generation_watch.subscribe() };
        match Actor::spawn_linked(None, CollectiveActor, args, me.get_cell()).await {
            Ok((actor, _)) => {
                self.collective = Some((generation, actor.clone()));
                self.pending.ring = Some(actor);
                self.regroup_when_linked(me, generation);
            }
            Err(e) => self.fail(me, format!("cannot start the collective actor: {e}")),
        }
    }

    /// Hands the trainer its link for `generation` once every part this worker needs has
    /// arrived: the ring (if it is in the ring) and the NCCL id (if it is in the NCCL group).
    fn regroup_when_linked(&mut self, me: &ActorRef<WorkerMsg>, generation: u64) {
        let Some(m) = self.membership else { return };
        let ring_ready = m.ring.is_none() || self.pending.ring.is_some();
        let nccl_ready = m.nccl.is_none() || self.pending.nccl_id.is_some();
        if !ring_ready || !nccl_ready {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let timeout = self.collective_timeout;
        let nccl = m.nccl.zip(pending.nccl_id).map(|(place, id)| (id, place));
        let link = match (m.kind, nccl, pending.ring) {
            (CollectiveKind::Ring, _, Some(actor)) => LinkPlan::Ring(actor),
            (CollectiveKind::Nccl, Some((id, place)), _) => LinkPlan::Nccl { id, place, timeout },
            (CollectiveKind::Mixed, nccl, ring) => LinkPlan::Mixed { nccl, ring, timeout },
            (kind, _, _) => return self.fail(me, format!("protocol error: a {kind:?} generation without its ring or NCCL group")),
        };
        self.trainer_cmd(me, TrainerCmd::Regroup { generation, rank: m.rank, world_size: m.world_size, link });
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

/// Blocking calls from the trainer thread into the collective actor of its generation.
struct RingHandle {
    actor: ActorRef<CollectiveMsg>,
}

impl RingHandle {
    fn call(&self, make: impl FnOnce(std::sync::mpsc::SyncSender<Result<Vec<f32>, String>>) -> CollectiveMsg) -> Result<Vec<f32>, String> {
        let actor = &self.actor;
        let (tx, rx) = mpsc::sync_channel(1);
        actor.cast(make(tx)).map_err(|_| "the ring of this generation is closed".to_string())?;
        rx.recv().map_err(|_| "the ring of this generation closed during the collective".to_string())?
    }
}

impl Comm for RingHandle {
    fn all_reduce(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.call(|reply| CollectiveMsg::AllReduce { data, tag, reply })
    }
    fn reduce_scatter(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.call(|reply| CollectiveMsg::ReduceScatter { data, tag, reply })
    }
    fn all_gather(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.call(|reply| CollectiveMsg::AllGather { data, tag, reply })
    }
    fn broadcast(&mut self, data: Vec<f32>, root: u32, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.call(|reply| CollectiveMsg::Broadcast { data, root, tag, reply })
    }
}

/// Joining an NCCL communicator may take this many collective timeouts.
const NCCL_JOIN_TIMEOUTS: u32 = 10;

/// The trainer's collectives over an NCCL communicator. Tensors on this worker's GPU are
/// combined where they are; host buffers (the small sums of loss and norm, state sync, and
/// every collective of a mixed generation) are copied to the GPU and back. NCCL has no tags: every
/// rank issues the same calls in the same order, which the trainer guarantees.
struct NcclLink {
    comm: NcclComm,
    device: Device,
}

impl NcclLink {
    /// Joins generation `generation`'s communicator. Every wait on it (joining, each
    /// collective) ends at once when `latest` moves past that generation, as the ring's
    /// collectives do: a rank blocked on a dead peer is released when the coordinator re-forms
    /// the group, not at the timeout.
    fn join(
        id: &[u8],
        place: NcclPlace,
        device: Device,
        timeout: Duration,
        generation: u64,
        latest: &watch::Receiver<u64>,
    ) -> Result<NcclLink, String> {
        let Device::Cuda(index) = device else {
            return Err(format!("NCCL needs a CUDA device, this worker computes on {}", troupe_common::device::device_name(device)));
        };
        let latest = latest.clone();
        let cancelled = Box::new(move || *latest.borrow() != generation);
        // Joining waits for the slowest rank to build its model (or load a checkpoint), so it
        // gets longer than one collective; a rank that died is noticed by the coordinator,
        // whose new generation cancels the wait.
        let join_timeout = timeout * NCCL_JOIN_TIMEOUTS;
        let comm = NcclComm::init_cancellable(id, place.rank, place.world_size, index, timeout, join_timeout, cancelled)
            .map_err(|e| e.to_string())?;
        Ok(NcclLink { comm, device })
    }

    /// Runs `op` on a host buffer staged through the GPU.
    fn staged(
        &mut self,
        mut data: Vec<f32>,
        tag: CollectiveTag,
        op: impl FnOnce(&mut NcclComm, &Tensor) -> Result<(), NcclError>,
    ) -> Result<Vec<f32>, String> {
        let n = data.len();
        let on_device = Tensor::f_from_slice(&data).and_then(|t| t.f_to_device(self.device)).map_err(|e| format!("{tag}: {e}"))?;
        op(&mut self.comm, &on_device).map_err(|e| format!("{tag}: {e}"))?;
        on_device.f_copy_data(&mut data, n).map_err(|e| format!("{tag}: {e}"))?;
        Ok(data)
    }
}

impl Comm for NcclLink {
    fn all_reduce(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.staged(data, tag, |c, t| c.all_reduce_sum(t))
    }
    fn reduce_scatter(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.staged(data, tag, |c, t| c.reduce_scatter_sum(t))
    }
    fn all_gather(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.staged(data, tag, |c, t| c.all_gather(t))
    }
    fn broadcast(&mut self, data: Vec<f32>, root: u32, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        self.staged(data, tag, |c, t| c.broadcast(t, root))
    }
    fn works_on_device(&self) -> bool {
        true
    }
    // A tensor that is not on this worker's GPU (none of the trainer's are) goes through a
    // host buffer and the staged collective.
    fn all_reduce_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        if t.device() != self.device {
            return through_host(t, |values| self.all_reduce(values, tag));
        }
        self.comm.all_reduce_sum(t).map_err(|e| format!("{tag}: {e}"))
    }
    fn reduce_scatter_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        if t.device() != self.device {
            return through_host(t, |values| self.reduce_scatter(values, tag));
        }
        self.comm.reduce_scatter_sum(t).map_err(|e| format!("{tag}: {e}"))
    }
    fn all_gather_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        if t.device() != self.device {
            return through_host(t, |values| self.all_gather(values, tag));
        }
        self.comm.all_gather(t).map_err(|e| format!("{tag}: {e}"))
    }
}

/// The trainer's collectives in its current generation.
enum Link {
    /// Before the first generation, and in a world of one.
    Alone(Alone),
    Ring(RingHandle),
    Nccl(NcclLink),
    Mixed(Mixed),
}

impl Link {
    fn comm(&mut self) -> &mut dyn Comm {
        match self {
            Link::Alone(a) => a,
            Link::Ring(r) => r,
            Link::Nccl(n) => n,
            Link::Mixed(m) => m,
        }
    }
}

/// The trainer thread: builds the model, then runs orders until Stop.
fn trainer_thread(setup: TrainerSetup, cmds: mpsc::Receiver<TrainerCmd>, latest: watch::Receiver<u64>, reporter: ActorRef<WorkerMsg>) {
    let report = |r| send_report(&reporter, r);
    let mut trainer = match Trainer::new(setup) {
        Ok(t) => t,
        Err(e) => return report(TrainerReport::Failed(format!("cannot start training: {e}"))),
    };
    report(TrainerReport::Built(trainer.footprint()));
    let mut link = Link::Alone(Alone);
    while let Ok(cmd) = cmds.recv() {
        // libtorch reports some errors by panicking through tch; one must not take the
        // process down silently, so it becomes a reported failure.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_command(&mut trainer, &mut link, cmd, &latest, &reporter)));
        match outcome {
            Ok(true) => {}
            Ok(false) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                return report(TrainerReport::Failed(format!("the training loop failed: {what}")));
            }
        }
    }
}

/// Hands a report from the trainer thread (or its checkpoint writer) to the Worker.
fn send_report(reporter: &ActorRef<WorkerMsg>, report: TrainerReport) {
    let _ = reporter.cast(WorkerMsg::Trainer(report));
}

/// Runs one order; false when the thread should end.
fn run_command(
    trainer: &mut Trainer,
    link: &mut Link,
    cmd: TrainerCmd,
    latest: &watch::Receiver<u64>,
    reporter: &ActorRef<WorkerMsg>,
) -> bool {
    let report = |r| send_report(reporter, r);
    let stale = |generation: u64| generation < *latest.borrow();
    match cmd {
        TrainerCmd::Rebuild(setup) => match Trainer::new(*setup) {
            Ok(rebuilt) => {
                *trainer = rebuilt;
                report(TrainerReport::Built(trainer.footprint()));
            }
            Err(e) => {
                report(TrainerReport::Failed(format!("cannot rebuild the training state: {e}")));
                return false;
            }
        },
        TrainerCmd::Regroup { generation, rank, world_size, link: plan } => {
            if stale(generation) {
                return true;
            }
            let link_failed = |error: String| {
                tracing::warn!("cannot join the NCCL communicator of generation {generation}: {error}");
                report(TrainerReport::LinkFailed { generation, error });
                true
            };
            if let Err(e) = trainer.set_membership(generation, rank as usize, world_size as usize) {
                report(TrainerReport::Failed(e.to_string()));
                return false;
            }
            // The previous generation's link goes first: an NCCL communicator is aborted
            // (never waited on: its peers may be gone) before the next one takes the GPU.
            *link = Link::Alone(Alone);
            *link = match plan {
                LinkPlan::Alone => Link::Alone(Alone),
                LinkPlan::Ring(actor) => Link::Ring(RingHandle { actor }),
                LinkPlan::Nccl { id, place, timeout } => match NcclLink::join(&id, place, trainer.device(), timeout, generation, latest) {
                    Ok(n) => Link::Nccl(n),
                    Err(error) => return link_failed(error),
                },
                LinkPlan::Mixed { nccl, ring, timeout } => {
                    // The group's members wait in its broadcast while its rank 0 runs the ring's
                    // all-reduce: the group gets twice the ring's limit, so that a slow or dead
                    // ring peer is reported by the ring, which names it.
                    let group = match nccl {
                        Some((id, place)) => match NcclLink::join(&id, place, trainer.device(), timeout * 2, generation, latest) {
                            Ok(n) => Some(Box::new(n) as Box<dyn Comm>),
                            Err(error) => return link_failed(error),
                        },
                        None => None,
                    };
                    let ring = ring.map(|actor| Box::new(RingHandle { actor }) as Box<dyn Comm>);
                    Link::Mixed(Mixed { group, ring, rank, world_size })
                }
            };
            report(TrainerReport::Regrouped { generation, completed_steps: trainer.completed_steps() });
        }
        TrainerCmd::Sync { generation, source_rank, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.sync_state(source_rank, step, link.comm()) {
                Ok(()) => report(TrainerReport::Synced { generation, step }),
                Err(e) => report(TrainerReport::SyncFailed { generation, error: e.to_string() }),
            }
        }
        TrainerCmd::Step { generation, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.step(step, link.comm()) {
                Ok(r) => report(TrainerReport::StepDone(r)),
                Err(TrainerError::Collective { step, error }) => report(TrainerReport::StepAborted { generation, step, error }),
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            }
        }
        TrainerCmd::Evaluate { generation, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.evaluate(step, link.comm()) {
                Ok(r) => report(TrainerReport::EvalDone(r)),
                // Under zero3 evaluation gathers parameters: a failed gather is a ring
                // failure like a failed step, and the generation is replaced.
                Err(TrainerError::Collective { step, error }) => report(TrainerReport::StepAborted { generation, step, error }),
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            }
        }
        TrainerCmd::Checkpoint { generation, step, dir } => {
            if stale(generation) {
                return true;
            }
            let reporter = reporter.clone();
            let done: crate::trainer::WriteDone = Box::new(move |result| {
                let r = match result {
                    Ok(files) => TrainerReport::CheckpointWritten { generation, step, files },
                    Err(error) => TrainerReport::CheckpointFailed { generation, step, error },
                };
                send_report(&reporter, r);
            });
            match trainer.save_checkpoint(step, &dir, done) {
                Ok(waited) => report(TrainerReport::CheckpointWaited(waited)),
                Err(e) => report(TrainerReport::CheckpointFailed { generation, step, error: e.to_string() }),
            }
        }
        TrainerCmd::Stop => return false,
    }
    true
}
