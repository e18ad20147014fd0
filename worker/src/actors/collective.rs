//! Collective: owns this rank's ring of one membership generation and runs collectives one
//! at a time, in mailbox order, so every rank runs them in the same order. The trainer thread
//! sends a [`CollectiveMsg::Run`] (from `comm::RingHandle`) and blocks on its reply channel.
//!
//! A collective in flight is abandoned as soon as the Worker announces a newer generation (or
//! stops): the ring of a membership that no longer exists will never finish, and the trainer
//! must be free to join the new one. After a failure the ring is in an unknown state, so every
//! later call fails at once with the same error until the Worker replaces the actor.

use crate::comm::CommError;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::mpsc::SyncSender;
use troupe_common::collective::{CollectiveOp, CollectiveTag, RingCollective};
use troupe_common::fault::FaultHook;
use troupe_common::metrics::WorkerMetrics;

pub struct CollectiveActor;

pub struct CollectiveArgs {
    /// Formed by the Worker for `generation`.
    pub ring: RingCollective,
    pub generation: u64,
    pub metrics: WorkerMetrics,
    /// The Worker's current generation (`u64::MAX` once it stops).
    pub current_generation: tokio::sync::watch::Receiver<u64>,
}

/// Where the trainer thread waits for the result of its call.
pub type Reply = SyncSender<Result<Vec<f32>, CommError>>;

pub enum CollectiveMsg {
    /// Run `op` on `data` with the other ranks (see [`CollectiveOp`]); the result, or why it
    /// failed, goes to `reply`.
    Run { op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag, reply: Reply },
}

pub struct CollectiveState {
    ring: RingCollective,
    generation: u64,
    metrics: WorkerMetrics,
    current_generation: tokio::sync::watch::Receiver<u64>,
    /// The first failure of this ring: every later call fails with it.
    broken: Option<String>,
}

impl Actor for CollectiveActor {
    type Msg = CollectiveMsg;
    type State = CollectiveState;
    type Arguments = CollectiveArgs;

    async fn pre_start(&self, _me: ActorRef<CollectiveMsg>, a: CollectiveArgs) -> Result<CollectiveState, ActorProcessingErr> {
        Ok(CollectiveState {
            ring: a.ring,
            generation: a.generation,
            metrics: a.metrics,
            current_generation: a.current_generation,
            broken: None,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<CollectiveMsg>,
        msg: CollectiveMsg,
        state: &mut CollectiveState,
    ) -> Result<(), ActorProcessingErr> {
        let CollectiveMsg::Run { op, mut data, tag, reply } = msg;
        // Test hooks: a panic (the actor dies), or a stall (alive, but never takes part).
        static PANIC: FaultHook = FaultHook::new("TROUPE_FAULT_COLLECTIVE_PANIC_AT_STEP");
        static STALL: FaultHook = FaultHook::new("TROUPE_FAULT_COLLECTIVE_STALL_AT_STEP");
        if PANIC.fires_at(tag.step) {
            panic!("fault injection: the collective actor panics in step {}", tag.step);
        }
        if STALL.fires_at(tag.step) {
            // A rank that is alive (it still heartbeats) but never takes part: its peers time
            // out, and only a new generation releases it.
            tracing::warn!("fault injection: stalling collective {tag} until the generation ends");
            let generation = state.generation;
            let _ = state.current_generation.wait_for(|g| *g != generation).await;
            let _ = reply.send(Err(CommError::Stalled { tag }));
            return Ok(());
        }
        if let Some(error) = &state.broken {
            let _ = reply.send(Err(CommError::RingBroken { generation: state.generation, first: error.clone() }));
            return Ok(());
        }
        let generation = state.generation;
        let mut watch = state.current_generation.clone();
        let superseded = async move {
            let _ = watch.wait_for(|g| *g != generation).await;
        };
        let result = tokio::select! {
            result = state.ring.run(op, &mut data, tag) => result.map_err(CommError::Ring),
            _ = superseded => Err(CommError::Cancelled { generation, tag }),
        };
        match result {
            Ok(()) => {
                let bytes = op.ring_bytes_sent(data.len(), state.ring.world_size());
                state.metrics.bytes_sent_total.inc_by(bytes);
                let _ = reply.send(Ok(data));
            }
            Err(e) => {
                state.broken = Some(e.to_string());
                let _ = reply.send(Err(e));
            }
        }
        Ok(())
    }
}
