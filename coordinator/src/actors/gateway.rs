//! Gateway: accepts QUIC connections and starts a WorkerSession for each, supervised by the
//! Coordinator (so a session's end reaches the core as `WorkerLost`).

use super::coordinator::CoordinatorMsg;
use super::session::{SessionArgs, WorkerSession};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_common::metrics::CoordinatorMetrics;
use troupe_core::cluster::WorkerId;

pub struct Gateway;

pub struct GatewayArgs {
    pub endpoint: quinn::Endpoint,
    pub coordinator: ActorRef<CoordinatorMsg>,
    pub token: String,
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
        Ok(GatewayState { args, next_id: 1, accept_loop })
    }

    async fn handle(&self, _me: ActorRef<GatewayMsg>, msg: GatewayMsg, state: &mut GatewayState) -> Result<(), ActorProcessingErr> {
        let GatewayMsg::Incoming(incoming) = msg;
        let id = state.next_id;
        state.next_id += 1;
        let args = SessionArgs {
            id,
            incoming,
            coordinator: state.args.coordinator.clone(),
            token: state.args.token.clone(),
            heartbeat: state.args.heartbeat,
            metrics: state.args.metrics.clone(),
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
