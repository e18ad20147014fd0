//! WorkerSession: one per worker connection.
//!
//! A task owned by the session does the handshake (Hello: protocol version, join-token proof)
//! and then turns every incoming frame into a core event. The session itself owns the send
//! side and writes what the core sends. When the connection ends, or anything malformed
//! arrives, the session stops with the reason; its supervisor (the Coordinator) turns that into
//! `WorkerLost`. Nothing a peer sends can panic the process.

use super::coordinator::CoordinatorMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::net::SocketAddr;
use std::time::Duration;
use troupe_common::metrics::CoordinatorMetrics;
use troupe_common::net::{self, close as close_code};
use troupe_core::cluster::{Event, WorkerId};
use troupe_core::proto::{self, Hello, RefusalKind, ToCoordinator, ToWorker, PROTOCOL_VERSION};

/// A peer has this long to complete the QUIC handshake and send its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkerSession;

pub struct SessionArgs {
    pub id: WorkerId,
    pub incoming: quinn::Incoming,
    pub coordinator: ActorRef<CoordinatorMsg>,
    pub token: troupe_core::secret::Secret,
    pub heartbeat: Duration,
    pub metrics: CoordinatorMetrics,
    /// This connection's place among the handshakes in progress, freed once it is over.
    pub handshake: super::gateway::HandshakeSlot,
}

pub enum SessionMsg {
    /// Handshake done: keep the send side.
    Established {
        conn: quinn::Connection,
        send: quinn::SendStream,
    },
    Send(ToWorker),
    Disconnect(String),
}

pub struct SessionState {
    id: WorkerId,
    remote: SocketAddr,
    conn: Option<quinn::Connection>,
    send: Option<quinn::SendStream>,
    reader: Option<tokio::task::JoinHandle<()>>,
    heartbeat: Duration,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    probe: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for WorkerSession {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(&self, me: ActorRef<SessionMsg>, args: SessionArgs) -> Result<SessionState, ActorProcessingErr> {
        let remote = args.incoming.remote_address();
        let id = args.id;
        let heartbeat = args.heartbeat;
        // The handshake runs in its own task so that a slow or hostile peer never holds up
        // the Gateway or the Coordinator.
        let reader = tokio::spawn(async move {
            let reason = match serve_connection(&me, args).await {
                Ok(()) => "connection closed by the worker".to_string(),
                Err(e) => e,
            };
            me.stop(Some(reason));
        });
        Ok(SessionState { id, remote, conn: None, send: None, reader: Some(reader), heartbeat, heartbeats: None, probe: None })
    }

    async fn handle(&self, me: ActorRef<SessionMsg>, msg: SessionMsg, state: &mut SessionState) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Established { conn, send } => {
                state.conn = Some(conn);
                state.send = Some(send);
                let period = state.heartbeat;
                state.heartbeats = Some(me.send_interval(period, || SessionMsg::Send(ToWorker::Heartbeat)));
                // A worker whose process died is noticed within a tenth of a second when its host
                // says so (ICMP port unreachable), instead of after the whole lease.
                let (remote, me) = (state.remote, me.clone());
                state.probe = Some(tokio::spawn(async move {
                    let e = net::probe::until_port_closed(remote, net::probe::PROBE_PERIOD).await;
                    me.stop(Some(format!("its process is gone: its port {remote} is closed ({e})")));
                }));
            }
            SessionMsg::Send(msg) => {
                let Some(send) = state.send.as_mut() else { return Ok(()) };
                if let Err(e) = net::write_frame(send, &msg).await {
                    me.stop(Some(format!("cannot send to worker {} at {}: {e}", state.id, state.remote)));
                }
            }
            SessionMsg::Disconnect(reason) => {
                if let Some(conn) = &state.conn {
                    conn.close(close_code::SHUTDOWN, &close_code::reason_bytes(&reason));
                }
                me.stop(Some(reason));
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<SessionMsg>, state: &mut SessionState) -> Result<(), ActorProcessingErr> {
        if let Some(send) = state.send.as_mut() {
            // Let frames already written (a final Stop) reach the worker before we go.
            let _ = send.finish();
        }
        if let Some(reader) = state.reader.take() {
            reader.abort();
        }
        if let Some(heartbeats) = state.heartbeats.take() {
            heartbeats.abort();
        }
        if let Some(probe) = state.probe.take() {
            probe.abort();
        }
        Ok(())
    }
}

fn refusal_code(kind: RefusalKind) -> quinn::VarInt {
    match kind {
        RefusalKind::VersionMismatch => close_code::VERSION_MISMATCH,
        RefusalKind::BadToken => close_code::AUTH_FAILED,
        RefusalKind::ClusterFull => close_code::SHUTDOWN,
        RefusalKind::Protocol => close_code::PROTOCOL_ERROR,
    }
}

async fn serve_connection(me: &ActorRef<SessionMsg>, args: SessionArgs) -> Result<(), String> {
    let SessionArgs { id, incoming, coordinator, token, metrics, handshake: handshake_slot, .. } = args;
    let remote = incoming.remote_address();
    let refuse = |reason: &str| {
        metrics.refused_connections_total.with_label_values(&[reason]).inc();
    };
    let handshake = async {
        let conn = incoming.await.map_err(|e| {
            // A peer without a certificate from the cluster CA ends here, before any troupe
            // message: say so with its address, not just a TLS alert number.
            if net::is_tls_handshake_failure(&e) {
                format!("TLS handshake with {remote} failed, peer not admitted: {}", net::describe_connection_error(&e))
            } else {
                format!("QUIC handshake with {remote} failed: {}", net::describe_connection_error(&e))
            }
        })?;
        let (send, mut recv) =
            conn.accept_bi().await.map_err(|e| format!("{remote} opened no control stream: {}", net::describe_connection_error(&e)))?;
        let frame = net::read_frame_bytes(&mut recv, net::MAX_CONTROL_FRAME)
            .await
            .map_err(|e| {
                let code = match e {
                    net::NetError::FrameTooLarge { .. } => close_code::FRAME_TOO_LARGE,
                    _ => close_code::PROTOCOL_ERROR,
                };
                conn.close(code, &close_code::reason_bytes(&format!("malformed handshake: {e}")));
                format!("malformed handshake from {remote}: {e}")
            })?
            .ok_or_else(|| format!("{remote} closed the control stream before saying Hello"))?;
        Ok::<_, String>((conn, send, recv, frame))
    };
    let (conn, mut send, mut recv, frame) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            refuse("handshake");
            tracing::warn!("refused a connection: {e}");
            return Err(e);
        }
        Err(_) => {
            refuse("handshake_timeout");
            let e = format!("{remote} did not complete the handshake within {HANDSHAKE_TIMEOUT:?}");
            tracing::warn!("refused a connection: {e}");
            return Err(e);
        }
    };

    // Check the version before decoding the rest: a peer of another version may lay out the
    // remaining fields differently.
    let hello = match check_hello(frame.as_slice(), &conn, token.expose()) {
        Ok(hello) => hello,
        Err((kind, reason)) => {
            refuse(match kind {
                RefusalKind::VersionMismatch => "version",
                RefusalKind::BadToken => "token",
                _ => "protocol",
            });
            tracing::warn!("refused worker at {remote}: {reason}");
            let _ = net::write_frame(&mut send, &ToWorker::Refused { kind, reason: reason.clone() }).await;
            let _ = send.finish();
            // Give the refusal a moment to arrive before the close overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(refusal_code(kind), &close_code::reason_bytes(&reason));
            return Err(reason);
        }
    };

    // The worker checks the coordinator too, before it acts on anything: this side's proof of
    // the token goes first, ahead of anything the coordinator's core sends.
    let proof = if token.is_empty() { Ok([0u8; 32]) } else { net::join_proof(&conn, token.expose()) };
    let proof = proof.map_err(|e| format!("cannot prove the join token to {remote}: {e}"))?;
    net::write_frame(&mut send, &ToWorker::Authenticated { proof })
        .await
        .map_err(|e| format!("cannot answer the Hello of {remote}: {e}"))?;
    drop(handshake_slot);
    me.cast(SessionMsg::Established { conn: conn.clone(), send }).map_err(|_| "session stopped during the handshake".to_string())?;
    coordinator
        .cast(CoordinatorMsg::Joined { id, info: hello.capabilities, session: me.clone() })
        .map_err(|_| "the coordinator is gone".to_string())?;

    let mut budget = FrameBudget::new(std::time::Instant::now());
    loop {
        match net::read_frame::<ToCoordinator>(&mut recv, net::MAX_CONTROL_FRAME).await {
            Ok(Some(msg)) => {
                if !budget.take(std::time::Instant::now()) {
                    let reason = format!(
                        "worker {id} at {remote} sent more than {} messages a second (bursts of {}): no honest worker does",
                        FrameBudget::PER_SECOND,
                        FrameBudget::BURST
                    );
                    tracing::warn!("{reason}; closing its connection");
                    conn.close(close_code::PROTOCOL_ERROR, &close_code::reason_bytes(&reason));
                    return Err(reason);
                }
                if coordinator.cast(CoordinatorMsg::Core(Event::FromWorker { id, msg })).is_err() {
                    return Err("the coordinator is gone".into());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) if is_orderly_close(&e) => return Err(format!("worker {id} at {remote} left: {e}")),
            Err(e) => {
                let reason = format!("bad frame from worker {id} at {remote}: {e}");
                tracing::warn!("{reason}; closing its connection");
                conn.close(close_code::PROTOCOL_ERROR, &close_code::reason_bytes(&reason));
                return Err(reason);
            }
        }
    }
}

/// How many messages an authenticated worker may send. An honest worker sends a heartbeat
/// every few hundred milliseconds and a few reports per step, and no step takes under a
/// millisecond; a worker far above that (broken, or in hostile hands) would only fill the
/// coordinator's mailbox, so its connection is closed. A token bucket: `BURST` at once,
/// refilled at `PER_SECOND`.
struct FrameBudget {
    tokens: f64,
    refilled_at: std::time::Instant,
}

impl FrameBudget {
    const PER_SECOND: u32 = 5_000;
    const BURST: u32 = 20_000;

    fn new(now: std::time::Instant) -> FrameBudget {
        FrameBudget { tokens: f64::from(Self::BURST), refilled_at: now }
    }

    /// Spends one message; false when the budget is exhausted.
    fn take(&mut self, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(Self::PER_SECOND)).min(f64::from(Self::BURST));
        self.refilled_at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Longest hostname (as POSIX allows) and device name a Hello may carry.
const MAX_HELLO_HOSTNAME: usize = 255;
const MAX_HELLO_DEVICE: usize = 64;

fn check_hello(frame: &[u8], conn: &quinn::Connection, token: &str) -> Result<Hello, (RefusalKind, String)> {
    let hello = parse_hello(frame)?;
    let caps = &hello.capabilities;
    if caps.hostname.len() > MAX_HELLO_HOSTNAME || caps.device.len() > MAX_HELLO_DEVICE {
        return Err((
            RefusalKind::Protocol,
            format!(
                "the Hello's hostname ({} bytes) or device name ({} bytes) is longer than {MAX_HELLO_HOSTNAME} / {MAX_HELLO_DEVICE}",
                caps.hostname.len(),
                caps.device.len()
            ),
        ));
    }
    if !token.is_empty() {
        let valid = net::verify_peer_join_proof(conn, token, &hello.join_proof)
            .map_err(|e| (RefusalKind::Protocol, format!("cannot check the join token: {e}")))?;
        if !valid {
            return Err((RefusalKind::BadToken, "wrong join token: pass the cluster's token with --token or TROUPE_TOKEN".into()));
        }
    }
    Ok(hello)
}

/// The first frame of a connection, as a Hello of this protocol version: the version is read
/// before the rest is decoded, so a worker of another release gets a clear refusal.
fn parse_hello(frame: &[u8]) -> Result<Hello, (RefusalKind, String)> {
    match proto::peek_hello_version(frame) {
        Some(v) if v == PROTOCOL_VERSION => {}
        Some(v) => {
            return Err((
                RefusalKind::VersionMismatch,
                format!(
                    "protocol version mismatch: the coordinator speaks version {PROTOCOL_VERSION}, this worker speaks \
                     version {v}; run the same troupe release on every node"
                ),
            ))
        }
        None => return Err((RefusalKind::Protocol, "the first frame is not a Hello".into())),
    }
    match net::decode_frame::<ToCoordinator>(frame) {
        Ok(ToCoordinator::Hello(hello)) => Ok(hello),
        _ => Err((RefusalKind::Protocol, "the Hello frame is malformed".into())),
    }
}

/// The worker closed its connection on purpose (it was told to stop, or it is leaving).
fn is_orderly_close(e: &net::NetError) -> bool {
    match e {
        net::NetError::Read(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))) => {
            close.error_code == close_code::SHUTDOWN
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    //! The handshake's parsing, fuzzed: whatever bytes a peer sends as its first frame, the
    //! coordinator answers with a refusal (or accepts a well-formed Hello) and never panics.
    use super::*;
    use proptest::prelude::*;
    use troupe_core::proto::Capabilities;

    fn valid_hello() -> Vec<u8> {
        let hello = ToCoordinator::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            join_proof: [3; 32],
            capabilities: Capabilities {
                hostname: "host".into(),
                pid: 42,
                threads: 2,
                device: "cpu".into(),
                nccl: false,
                peer_addr: "10.0.0.2:7001".parse().unwrap(),
                metrics_addr: Some("10.0.0.2:9100".parse().unwrap()),
                role: Default::default(),
            },
        });
        postcard::to_allocvec(&hello).unwrap()
    }

    #[test]
    fn a_worker_may_burst_then_send_at_the_budget_rate_but_no_faster() {
        let start = std::time::Instant::now();
        let mut budget = FrameBudget::new(start);
        assert!((0..FrameBudget::BURST).all(|_| budget.take(start)), "a burst passes");
        assert!(!budget.take(start), "then the bucket is empty");
        // One second later: PER_SECOND more, not one more.
        let later = start + std::time::Duration::from_secs(1);
        assert!((0..FrameBudget::PER_SECOND).all(|_| budget.take(later)));
        assert!(!budget.take(later));
        // A steady honest rate (a message every millisecond) never runs out.
        let mut budget = FrameBudget::new(start);
        assert!((0..100_000u64).all(|i| budget.take(start + std::time::Duration::from_millis(i))));
    }

    #[test]
    fn a_valid_hello_parses_and_another_version_is_named() {
        assert_eq!(parse_hello(&valid_hello()).unwrap().capabilities.pid, 42);
        let mut other = valid_hello();
        other[1] = 99; // the version varint right after the variant index
        let (kind, reason) = parse_hello(&other).unwrap_err();
        assert_eq!(kind, RefusalKind::VersionMismatch);
        assert!(reason.contains("version 99"), "{reason}");
        assert_eq!(parse_hello(&[]).unwrap_err().0, RefusalKind::Protocol);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_first_frames_are_refused_without_panicking(frame in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(hello) = parse_hello(&frame) {
                prop_assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
            }
        }

        #[test]
        fn damaged_hellos_are_refused_without_panicking(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = valid_hello();
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            frame.truncate(cut.index(frame.len() + 1));
            match parse_hello(&frame) {
                Ok(hello) => prop_assert_eq!(hello.protocol_version, PROTOCOL_VERSION),
                Err((kind, reason)) => {
                    prop_assert!(matches!(kind, RefusalKind::Protocol | RefusalKind::VersionMismatch));
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}
