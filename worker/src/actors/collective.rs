//! Collective: owns this rank's ring connections and runs collectives one at a time, in
//! mailbox order, so every rank runs them in the same order. The trainer thread asks for an
//! all-reduce and blocks on a reply channel.

use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use troupe_common::collective::{form_ring, Collective, CollectiveTag, RingCollective};
use troupe_common::metrics::WorkerMetrics;

pub struct CollectiveActor;

pub struct CollectiveArgs {
    pub endpoint: quinn::Endpoint,
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    pub successor: SocketAddr,
    pub token: String,
    pub timeout: Duration,
    pub metrics: WorkerMetrics,
    /// Fired by the Worker when it stops: a collective in flight gives up at once instead of
    /// waiting out its timeout (a stop cannot reach the mailbox while a handler runs).
    pub abort: Arc<Notify>,
}

pub enum CollectiveMsg {
    AllReduce { data: Vec<f32>, tag: CollectiveTag, reply: SyncSender<Result<Vec<f32>, String>> },
}

pub struct CollectiveState {
    ring: RingCollective,
    metrics: WorkerMetrics,
    abort: Arc<Notify>,
}

impl Actor for CollectiveActor {
    type Msg = CollectiveMsg;
    type State = CollectiveState;
    type Arguments = CollectiveArgs;

    async fn pre_start(&self, _me: ActorRef<CollectiveMsg>, a: CollectiveArgs) -> Result<CollectiveState, ActorProcessingErr> {
        let started = Instant::now();
        let ring = form_ring(&a.endpoint, a.rank, a.world_size, a.generation, a.successor, &a.token, a.timeout).await?;
        tracing::info!(rank = a.rank, world = a.world_size, "ring formed in {:?}", started.elapsed());
        Ok(CollectiveState { ring, metrics: a.metrics, abort: a.abort })
    }

    async fn handle(&self, _me: ActorRef<CollectiveMsg>, msg: CollectiveMsg, state: &mut CollectiveState) -> Result<(), ActorProcessingErr> {
        let CollectiveMsg::AllReduce { mut data, tag, reply } = msg;
        let world = state.ring.world_size() as u64;
        let result = tokio::select! {
            result = state.ring.all_reduce_sum(&mut data, tag) => result.map_err(|e| e.to_string()),
            _ = state.abort.notified() => Err(format!("collective {tag} aborted: the worker is stopping")),
        };
        let outcome = match result {
            Ok(()) => {
                // What a ring all-reduce sends per rank: 2(W-1)/W of the buffer.
                let bytes = (data.len() as u64 * 4) * 2 * (world - 1) / world.max(1);
                state.metrics.bytes_sent_total.inc_by(bytes);
                Ok(data)
            }
            Err(e) => Err(e),
        };
        let failed = outcome.is_err();
        let _ = reply.send(outcome);
        if failed {
            // A failed collective leaves the ring in an unknown state: the worker reports and exits.
            return Err("collective failed".into());
        }
        Ok(())
    }
}
