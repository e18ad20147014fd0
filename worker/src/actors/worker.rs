//! Worker: the root actor of a worker process.
//!
//! `run_worker` connects to the coordinator (retrying while it is not up yet), says Hello
//! (protocol version, join-token proof, capabilities) and, once welcomed, hands the connection
//! to the Worker actor. The actor forwards the coordinator's orders to the trainer thread and
//! the trainer's reports back; a writer task owns the control stream's send side so that
//! heartbeats never wait behind anything else. If the coordinator goes away the worker stops:
//! no orphans holding a model.

use super::collective::{CollectiveActor, CollectiveArgs, CollectiveMsg};
use crate::trainer::{Trainer, TrainerSetup};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::{mpsc as tmpsc, oneshot};
use troupe_common::collective::CollectiveTag;
use troupe_common::config::Config;
use troupe_common::metrics::{self, WorkerMetrics};
use troupe_common::net::{self, close as close_code, NetOptions};
use troupe_common::proto::{
    Assignment, Capabilities, EvalReport, FileDigest, Hello, StepReport, ToCoordinator, ToWorker, PROTOCOL_VERSION,
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

    let conn = connect_with_retry(&endpoint, opts.coordinator, opts.connect_timeout).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
        anyhow::anyhow!("the coordinator at {} dropped the connection: {}", opts.coordinator, net::describe_connection_error(&e))
    })?;
    let join_proof = if opts.token.is_empty() { [0u8; 32] } else { net::join_proof(&conn, &opts.token)? };
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        join_proof,
        capabilities: Capabilities {
            hostname: hostname(),
            pid: std::process::id(),
            threads: threads as u32,
            device: format!("{:?}", opts.device).to_lowercase(),
            peer_addr,
            metrics_addr,
        },
    };
    net::write_frame(&mut send, &ToCoordinator::Hello(hello)).await?;
    let (worker_id, heartbeat_ms, lease_ms) = match net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await {
        Ok(Some(ToWorker::Welcome { worker_id, heartbeat_ms, lease_ms })) => (worker_id, heartbeat_ms, lease_ms),
        Ok(Some(ToWorker::Refused { kind, reason })) => anyhow::bail!("the coordinator refused this worker ({kind:?}): {reason}"),
        Ok(Some(other)) => anyhow::bail!("protocol error: expected Welcome, got {other:?}"),
        Ok(None) => anyhow::bail!("the coordinator closed the connection during the handshake"),
        Err(e) => anyhow::bail!("the coordinator closed the connection during the handshake: {e}"),
    };
    tracing::info!("joined the coordinator at {} as worker {worker_id}", opts.coordinator);
    if let Some(addr) = metrics_addr {
        tracing::info!("worker metrics on http://{addr}/metrics");
    }

    let (done_tx, done_rx) = oneshot::channel();
    let args = WorkerArgs {
        endpoint: endpoint.clone(),
        send,
        recv,
        token: opts.token.clone(),
        device: opts.device,
        heartbeat: Duration::from_millis(heartbeat_ms.clamp(10, 600_000)),
        lease: Duration::from_millis(lease_ms.clamp(20, 3_600_000)),
        metrics: worker_metrics,
        done: done_tx,
    };
    let (actor, handle) = Actor::spawn(Some("worker".into()), Worker, args).await?;
    // The first SIGINT/SIGTERM leaves at a step boundary; a second one leaves now.
    let signals = tokio::spawn(async move {
        let first = troupe_common::signals::shutdown_signal().await;
        let _ = actor.cast(WorkerMsg::LeaveRequested(first.to_string()));
        troupe_common::signals::shutdown_signal().await;
        actor.stop(Some("asked twice to stop".into()));
    });
    let result = done_rx.await.unwrap_or_else(|_| Err("the worker actor stopped unexpectedly".into()));
    let _ = handle.await;
    signals.abort();
    conn.close(close_code::SHUTDOWN, b"worker leaving");
    if result.is_ok() {
        // Let the close reach a coordinator that is still there (not worth waiting for
        // one that is gone).
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    result.map(WorkerExit::Stopped).map_err(|e| anyhow::anyhow!(e))
}

async fn connect_with_retry(endpoint: &quinn::Endpoint, addr: SocketAddr, timeout: Duration) -> anyhow::Result<quinn::Connection> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async { endpoint.connect(addr, net::TLS_SERVER_NAME)?.await.map_err(anyhow::Error::from) };
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
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub struct Worker;

pub struct WorkerArgs {
    endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    token: String,
    device: Device,
    heartbeat: Duration,
    lease: Duration,
    metrics: WorkerMetrics,
    done: oneshot::Sender<Result<String, String>>,
}

pub enum WorkerMsg {
    FromCoordinator(ToWorker),
    LinkClosed(String),
    Trainer(TrainerReport),
    /// SIGINT/SIGTERM: leave at the next step boundary.
    LeaveRequested(String),
}

/// What the trainer thread reports back.
pub enum TrainerReport {
    Built,
    StepDone(StepReport),
    EvalDone(EvalReport),
    CheckpointWritten { step: u64, files: Vec<FileDigest> },
    CheckpointFailed { step: u64, error: String },
    Failed(String),
}

enum TrainerCmd {
    Step(u64),
    Evaluate(u64),
    Checkpoint { step: u64, dir: PathBuf },
    Stop,
}

pub struct WorkerState {
    endpoint: quinn::Endpoint,
    token: String,
    device: Device,
    metrics: WorkerMetrics,
    outbox: tmpsc::UnboundedSender<ToCoordinator>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    trainer: Option<(mpsc::Sender<TrainerCmd>, std::thread::JoinHandle<()>)>,
    collective: Option<ActorRef<CollectiveMsg>>,
    abort_collective: Arc<tokio::sync::Notify>,
    /// The coordinator is gone: nothing queued for it can be delivered.
    link_lost: bool,
    generation: u64,
    world_size: u32,
    trainer_built: bool,
    done: Option<oneshot::Sender<Result<String, String>>>,
    result: Option<Result<String, String>>,
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
        let reader = tokio::spawn(async move {
            // Anything from the coordinator renews its lease; silence past the lease means it
            // is gone (killed, partitioned) and this worker must not linger holding a model.
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
            tasks: vec![writer, heartbeats, reader],
            trainer: None,
            collective: None,
            abort_collective: Arc::new(tokio::sync::Notify::new()),
            link_lost: false,
            generation: 0,
            world_size: 0,
            trainer_built: false,
            done: Some(a.done),
            result: None,
        })
    }

    async fn handle(&self, me: ActorRef<WorkerMsg>, msg: WorkerMsg, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::FromCoordinator(msg) => state.on_coordinator(&me, msg).await,
            WorkerMsg::LinkClosed(reason) => {
                state.link_lost = true;
                state.stop(&me, Err(reason))
            }
            WorkerMsg::Trainer(report) => state.on_trainer(&me, report),
            WorkerMsg::LeaveRequested(signal) => {
                if state.trainer.is_none() {
                    state.stop(&me, Ok(format!("{signal} before the run started")));
                } else {
                    tracing::info!("{signal}: leaving at the next step boundary (again to leave now)");
                    state.send(ToCoordinator::Leaving { reason: format!("{signal} on {}", hostname()) });
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, me: ActorRef<WorkerMsg>, event: SupervisionEvent, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        let reason = match event {
            SupervisionEvent::ActorFailed(_, e) => format!("the collective failed: {e}"),
            SupervisionEvent::ActorTerminated(_, _, reason) if state.result.is_none() => {
                format!("the collective stopped: {}", reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        state.fail(&me, reason);
        Ok(())
    }

    async fn post_stop(&self, me: ActorRef<WorkerMsg>, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        // Abort a collective in flight and stop the actor: that releases a trainer blocked in
        // an all-reduce, so the thread can be joined at once.
        state.abort_collective.notify_one();
        me.stop_children(None);
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
        let result = state.result.take().unwrap_or_else(|| Err("stopped".into()));
        if let Some(done) = state.done.take() {
            let _ = done.send(result);
        }
        Ok(())
    }
}

impl WorkerState {
    fn send(&self, msg: ToCoordinator) {
        let _ = self.outbox.send(msg);
    }

    fn stop(&mut self, me: &ActorRef<WorkerMsg>, result: Result<String, String>) {
        if self.result.is_none() {
            self.result = Some(result);
        }
        me.stop(None);
    }

    fn fail(&mut self, me: &ActorRef<WorkerMsg>, error: String) {
        tracing::error!("{error}");
        self.send(ToCoordinator::Failed { error: error.clone() });
        self.stop(me, Err(error));
    }

    fn trainer_cmd(&mut self, me: &ActorRef<WorkerMsg>, cmd: TrainerCmd) {
        let sent = self.trainer.as_ref().map(|(tx, _)| tx.send(cmd).is_ok()).unwrap_or(false);
        if !sent {
            self.fail(me, "protocol error: training command before the assignment, or the trainer has exited".into());
        }
    }

    async fn on_coordinator(&mut self, me: &ActorRef<WorkerMsg>, msg: ToWorker) {
        match msg {
            ToWorker::Assign(assignment) => {
                if let Err(e) = self.assign(me, assignment).await {
                    self.fail(me, e);
                }
            }
            ToWorker::Step { step } => self.trainer_cmd(me, TrainerCmd::Step(step)),
            ToWorker::Evaluate { step } => self.trainer_cmd(me, TrainerCmd::Evaluate(step)),
            ToWorker::Checkpoint { step, dir } => self.trainer_cmd(me, TrainerCmd::Checkpoint { step, dir: dir.into() }),
            ToWorker::Stop { reason } => {
                tracing::info!("stopping: {reason}");
                self.stop(me, Ok(reason));
            }
            ToWorker::Heartbeat => {}
            ToWorker::Welcome { .. } | ToWorker::Refused { .. } => {
                self.fail(me, "protocol error: a second Welcome/Refused".into());
            }
        }
    }

    async fn assign(&mut self, me: &ActorRef<WorkerMsg>, a: Assignment) -> Result<(), String> {
        if self.trainer.is_some() {
            return Err("re-assignment is not supported by this worker version".into());
        }
        let config = Config::from_toml_str(&a.config_toml, "the coordinator's assignment").map_err(|e| e.to_string())?;
        self.generation = a.generation;
        self.world_size = a.world_size;
        tracing::info!(rank = a.rank, world = a.world_size, "assigned");

        // The trainer thread builds the model while the ring forms.
        let collective = if a.world_size > 1 {
            let args = CollectiveArgs {
                endpoint: self.endpoint.clone(),
                rank: a.rank,
                world_size: a.world_size,
                generation: a.generation,
                successor: a.successor,
                token: self.token.clone(),
                timeout: Duration::from_millis(config.cluster.collective_timeout_ms),
                metrics: self.metrics.clone(),
                abort: self.abort_collective.clone(),
            };
            Some(args)
        } else {
            None
        };
        let setup = TrainerSetup {
            config,
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            device: self.device,
            resume_from: a.resume_from.map(PathBuf::from),
            start_step: a.start_step,
        };
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let reporter = me.clone();
        let (ring_tx, ring_rx) = std::sync::mpsc::channel::<ActorRef<CollectiveMsg>>();
        let metrics = self.metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("trainer-rank{}", a.rank))
            .spawn(move || trainer_thread(setup, cmd_rx, ring_rx, reporter, metrics))
            .map_err(|e| format!("cannot start the trainer thread: {e}"))?;
        self.trainer = Some((cmd_tx, thread));

        if let Some(args) = collective {
            let (actor, _) = Actor::spawn_linked(Some("collective".into()), CollectiveActor, args, me.get_cell())
                .await
                .map_err(|e| format!("cannot form the ring: {e}"))?;
            let _ = ring_tx.send(actor.clone());
            self.collective = Some(actor);
        }
        drop(ring_tx);
        self.maybe_ready();
        Ok(())
    }

    /// Ready once the model is built and, with more than one rank, the ring is formed.
    fn maybe_ready(&mut self) {
        let ring_ok = self.world_size == 1 || self.collective.is_some();
        if self.trainer_built && ring_ok {
            self.send(ToCoordinator::Ready { generation: self.generation });
        }
    }

    fn on_trainer(&mut self, me: &ActorRef<WorkerMsg>, report: TrainerReport) {
        match report {
            TrainerReport::Built => {
                self.trainer_built = true;
                self.maybe_ready();
            }
            TrainerReport::StepDone(r) => {
                self.metrics.step.set(r.step as i64 + 1);
                let phases = [("compute", r.compute_seconds), ("communication", r.comm_seconds), ("data", r.data_seconds)];
                for (phase, s) in phases {
                    self.metrics.step_seconds.with_label_values(&[phase]).observe(s);
                }
                self.send(ToCoordinator::StepDone(r));
            }
            TrainerReport::EvalDone(r) => self.send(ToCoordinator::EvalDone(r)),
            TrainerReport::CheckpointWritten { step, files } => self.send(ToCoordinator::CheckpointWritten { step, files }),
            TrainerReport::CheckpointFailed { step, error } => self.send(ToCoordinator::CheckpointFailed { step, error }),
            TrainerReport::Failed(error) => self.fail(me, error),
        }
    }
}

/// The trainer thread: builds the model, then runs commands until Stop.
fn trainer_thread(
    setup: TrainerSetup,
    cmds: mpsc::Receiver<TrainerCmd>,
    ring: mpsc::Receiver<ActorRef<CollectiveMsg>>,
    reporter: ActorRef<WorkerMsg>,
    _metrics: WorkerMetrics,
) {
    let report = |r: TrainerReport| {
        let _ = reporter.cast(WorkerMsg::Trainer(r));
    };
    let world = setup.world_size;
    let mut trainer = match Trainer::new(setup) {
        Ok(t) => t,
        Err(e) => return report(TrainerReport::Failed(format!("cannot start training: {e}"))),
    };
    report(TrainerReport::Built);
    // Blocks until the ring is formed (or will never be: world size 1 or a failure).
    let collective = if world > 1 { ring.recv().ok() } else { None };
    let mut reduce = |data: &mut Vec<f32>, tag: CollectiveTag| -> Result<(), String> {
        let Some(actor) = &collective else { return Err("no ring".into()) };
        let (tx, rx) = mpsc::sync_channel(1);
        actor
            .cast(CollectiveMsg::AllReduce { data: std::mem::take(data), tag, reply: tx })
            .map_err(|_| "the collective actor is gone".to_string())?;
        *data = rx.recv().map_err(|_| "the collective actor stopped during the all-reduce".to_string())??;
        Ok(())
    };
    while let Ok(cmd) = cmds.recv() {
        // libtorch reports some errors by panicking through tch; one must not take the
        // process down silently, so it becomes a reported failure.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_command(&mut trainer, cmd, &mut reduce, &report)));
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

/// Runs one command; false when the thread should end.
fn run_command(
    trainer: &mut Trainer,
    cmd: TrainerCmd,
    reduce: &mut dyn FnMut(&mut Vec<f32>, CollectiveTag) -> Result<(), String>,
    report: &dyn Fn(TrainerReport),
) -> bool {
    {
        match cmd {
            TrainerCmd::Step(step) => match trainer.step(step, reduce) {
                Ok(r) => report(TrainerReport::StepDone(r)),
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            },
            TrainerCmd::Evaluate(step) => match trainer.evaluate(step) {
                Ok(r) => report(TrainerReport::EvalDone(r)),
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            },
            TrainerCmd::Checkpoint { step, dir } => match trainer.save_checkpoint(step, &dir) {
                Ok(files) => report(TrainerReport::CheckpointWritten { step, files }),
                Err(e) => report(TrainerReport::CheckpointFailed { step, error: e.to_string() }),
            },
            TrainerCmd::Stop => return false,
        }
    }
    true
}
