//! Gateway: accepts QUIC connections and starts a WorkerSession for each, supervised by the
//! Coordinator (so a session's end reaches the core as `WorkerLost`).
//!
//! A connection that has not yet proven the join token may hold only so much: at most
//! [`MAX_HANDSHAKES`] are in their handshake at once, and [`MAX_HANDSHAKES_PER_ADDRESS`] from
//! one address; more are refused at once (QUIC's CONNECTION_REFUSED; a worker retries) and
//! counted as `troupe_refused_connections_total{reason="busy"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::coordinator::CoordinatorMsg;
use super::session::{SessionArgs, WorkerSession};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_common::metrics::CoordinatorMetrics;
use troupe_core::cluster::WorkerId;

/// Connections in their handshake (QUIC, TLS, Hello) at once, in total and from one address.
/// Every worker of `troupe local` connects from 127.0.0.1, and those refused retry.
pub const MAX_HANDSHAKES: usize = 256;
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;

/// The handshakes in progress, by address.
#[derive(Default)]
pub struct HandshakeSlots {
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake's place; dropping it (the handshake is over, either way) frees it.
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    address: IpAddr,
}

impl HandshakeSlots {
    fn take(self: &Arc<Self>, address: IpAddr) -> Option<HandshakeSlot> {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = by_address.values().sum();
        let mine = by_address.entry(address).or_default();
        if total >= MAX_HANDSHAKES || *mine >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *mine += 1;
        Some(HandshakeSlot { slots: self.clone(), address })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by_address = self.slots.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

pub struct Gateway;

pub struct GatewayArgs {
    pub endpoint: quinn::Endpoint,
    pub coordinator: ActorRef<CoordinatorMsg>,
    pub token: troupe_core::secret::Secret,
    /// How often sessions send the coordinator's heartbeat to their worker.
    pub heartbeat: std::time::Duration,
    pub metrics: CoordinatorMetrics,
}

pub enum GatewayMsg {
    Incoming(quinn::Incoming),
}

pub struct GatewayState {
    args: GatewayArgs,
    next_id: WorkerId,
    handshakes: Arc<HandshakeSlots>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(&self, me: ActorRef<GatewayMsg>, args: GatewayArgs) -> Result<GatewayState, ActorProcessingErr> {
        let endpoint = args.endpoint.clone();
        let accept_loop = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if me.cast(GatewayMsg::Incoming(incoming)).is_err() {
                    break;
                }
            }
        });
        Ok(GatewayState { args, next_id: 1, handshakes: Arc::default(), accept_loop })
    }

    async fn handle(&self, _me: ActorRef<GatewayMsg>, msg: GatewayMsg, state: &mut GatewayState) -> Result<(), ActorProcessingErr> {
        let GatewayMsg::Incoming(incoming) = msg;
        let Some(handshake) = state.handshakes.take(incoming.remote_address().ip()) else {
            state.args.metrics.refused_connections_total.with_label_values(&["busy"]).inc();
            tracing::debug!("refused a connection from {}: too many handshakes in progress", incoming.remote_address());
            incoming.refuse();
            return Ok(());
        };
        let id = state.next_id;
        state.next_id += 1;
        let args = SessionArgs {
            id,
            incoming,
            coordinator: state.args.coordinator.clone(),
            token: state.args.token.clone(),
            heartbeat: state.args.heartbeat,
            metrics: state.args.metrics.clone(),
            handshake,
        };
        // Spawning only starts the session's handshake task; it never waits on the peer.
        if let Err(e) = Actor::spawn_linked(None, WorkerSession, args, state.args.coordinator.get_cell()).await {
            tracing::warn!("cannot start a session for an incoming connection: {e}");
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<GatewayMsg>, state: &mut GatewayState) -> Result<(), ActorProcessingErr> {
        state.accept_loop.abort();
        Ok(())
    }
}
