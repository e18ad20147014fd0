//! Joining a coordinator: `run_worker` connects (retrying while the coordinator is not up
//! yet), says Hello (protocol version, join-token proof, capabilities) and, once welcomed,
//! hands the connection to a [`Worker`] actor. If the coordinator goes away the worker stops
//! training (no orphan keeps a model busy) and tries to join a restarted coordinator for
//! `cluster.rejoin_ms`, then exits. SIGINT/SIGTERM leave at a step boundary; a second one
//! leaves now.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::Actor;
use tch::Device;
use tokio::sync::oneshot;
use troupe_common::metrics::{self, WorkerMetrics};
use troupe_common::net::{self, close as close_code, NetOptions};
use troupe_core::proto::{Capabilities, Hello, ToCoordinator, ToWorker, WorkerRole, PROTOCOL_VERSION};

use super::worker::{Outcome, Worker, WorkerArgs, WorkerMsg};

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
    /// Train (a rank) or evaluate checkpoints.
    pub role: WorkerRole,
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
    // With --listen …:0 the port is the system's pick: say which (ring peers connect there).
    tracing::info!("worker endpoint bound on {bound}");
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
        role: opts.role,
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
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.clamp(10, 600_000));
        let lease = Duration::from_millis(welcome.lease_ms.clamp(20, 3_600_000));
        let result = if opts.role == WorkerRole::Eval {
            let link =
                crate::eval_worker::EvalLink { send, recv, coordinator: conn.remote_address(), heartbeat, lease, device: opts.device };
            let leave = async {
                signals.requested().await;
                signals.reason()
            };
            crate::eval_worker::serve(link, leave).await
        } else {
            let (done_tx, done_rx) = oneshot::channel();
            let args = WorkerArgs {
                endpoint: endpoint.clone(),
                coordinator: conn.remote_address(),
                send,
                recv,
                token: opts.token.clone(),
                device: opts.device,
                heartbeat,
                lease,
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
            result
        };
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
                troupe_common::say_err!("lost the coordinator ({reason}); work stopped; trying to rejoin for {}s", window.as_secs());
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
    // The coordinator proves the token before this worker acts on anything it says: whoever
    // else answers on its address (a spoofed name, a process that took the port while the
    // workers retry) gets no obedience.
    let addr = opts.coordinator;
    match net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await {
        Ok(Some(ToWorker::Authenticated { proof })) => {
            if !opts.token.is_empty() && !net::verify_peer_join_proof(&conn, &opts.token, &proof)? {
                conn.close(close_code::AUTH_FAILED, b"the coordinator did not prove the join token");
                anyhow::bail!(
                    "refusing the coordinator at {addr}: it did not prove the join token, so it is not the coordinator \
                     this worker was told to join (or its token differs from this worker's); nothing it sent was acted on"
                );
            }
        }
        Ok(Some(ToWorker::Refused { kind, reason })) => anyhow::bail!("the coordinator refused this worker ({kind:?}): {reason}"),
        Ok(Some(other)) => anyhow::bail!("protocol error: the coordinator at {addr} sent {other:?} before proving the join token"),
        Ok(None) => anyhow::bail!("the coordinator closed the connection during the handshake"),
        Err(e) => anyhow::bail!("the coordinator closed the connection during the handshake: {e}"),
    }
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

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// Whether this worker can join an NCCL communicator; says why not when it computes on CUDA.
fn nccl_capable(device: Device) -> bool {
    if !device.is_cuda() {
        return false;
    }
    match crate::comm::nccl::available() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("this CUDA worker cannot use NCCL, so its gradients go over the QUIC ring: {e}");
            false
        }
    }
}
