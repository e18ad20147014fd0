//! Collective: owns this rank's ring of one membership generation and runs collectives one
//! at a time, in mailbox order, so every rank runs them in the same order. The trainer thread
//! asks for an all-reduce (or a broadcast, reduce-scatter or all-gather) and blocks on a reply
//! channel.
//!
//! A collective in flight is abandoned as soon as the Worker announces a newer generation (or
//! stops): the ring of a membership that no longer exists will never finish, and the trainer
//! must be free to join the new one. After a failure the ring is in an unknown state, so every
//! later call fails at once with the same error until the Worker replaces the actor.

use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::mpsc::SyncSender;
use troupe_common::collective::{Collective, CollectiveTag, RingCollective};
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

pub type Reply = SyncSender<Result<Vec<f32>, String>>;

pub enum CollectiveMsg {
    AllReduce {
        data: Vec<f32>,
        tag: CollectiveTag,
        reply: Reply,
    },
    /// Every rank ends with rank `root`'s data.
    Broadcast {
        data: Vec<f32>,
        root: u32,
        tag: CollectiveTag,
        reply: Reply,
    },
    /// The reply holds the sum over all ranks in chunk `rank` (of W equal chunks; the length
    /// must be a multiple of W); the other chunks are unspecified.
    ReduceScatter {
        data: Vec<f32>,
        tag: CollectiveTag,
        reply: Reply,
    },
    /// Every rank contributes chunk `rank` (same chunking); the reply holds all chunks.
    AllGather {
        data: Vec<f32>,
        tag: CollectiveTag,
        reply: Reply,
    },
}

/// What a message asks the ring to do.
#[derive(Clone, Copy)]
enum Op {
    AllReduce,
    Broadcast { root: u32 },
    ReduceScatter,
    AllGather,
}

impl Op {
    /// Bytes this rank sends for a buffer of `len` elements over `world` ranks.
    fn bytes_sent(self, len: usize, world: u32) -> u64 {
        let (bytes, world) = (len as u64 * 4, u64::from(world.max(1)));
        match self {
            // Ring all-reduce (and the broadcast built on it): 2(W-1)/W of the buffer.
            Op::AllReduce | Op::Broadcast { .. } => bytes * 2 * (world - 1) / world,
            // Each half of it: (W-1)/W.
            Op::ReduceScatter | Op::AllGather => bytes * (world - 1) / world,
        }
    }
}

pub struct CollectiveState {
    ring: RingCollective,
    generation: u64,
    metrics: WorkerMetrics,
    current_generation: tokio::sync::watch::Receiver<u64>,
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
        let (mut data, tag, op, reply) = match msg {
            CollectiveMsg::AllReduce { data, tag, reply } => (data, tag, Op::AllReduce, reply),
            CollectiveMsg::Broadcast { data, root, tag, reply } => (data, tag, Op::Broadcast { root }, reply),
            CollectiveMsg::ReduceScatter { data, tag, reply } => (data, tag, Op::ReduceScatter, reply),
            CollectiveMsg::AllGather { data, tag, reply } => (data, tag, Op::AllGather, reply),
        };
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
            let _ = reply.send(Err(format!("collective {tag} abandoned after a stall (fault injection)")));
            return Ok(());
        }
        if let Some(error) = &state.broken {
            let _ = reply.send(Err(format!("the ring of generation {} failed earlier: {error}", state.generation)));
            return Ok(());
        }
        let generation = state.generation;
        let mut watch = state.current_generation.clone();
        let superseded = async move {
            let _ = watch.wait_for(|g| *g != generation).await;
        };
        let result = tokio::select! {
            result = async {
                match op {
                    Op::AllReduce => state.ring.all_reduce_sum(&mut data, tag).await,
                    Op::Broadcast { root } => state.ring.broadcast(&mut data, root, tag).await,
                    Op::ReduceScatter => state.ring.reduce_scatter_sum(&mut data, tag).await,
                    Op::AllGather => state.ring.all_gather(&mut data, tag).await,
                }
            } => result.map_err(|e| e.to_string()),
            _ = superseded => Err(format!("collective {tag} abandoned: membership generation {generation} is over")),
        };
        match result {
            Ok(()) => {
                let bytes = op.bytes_sent(data.len(), state.ring.world_size());
                state.metrics.bytes_sent_total.inc_by(bytes);
                let _ = reply.send(Ok(data));
            }
            Err(e) => {
                state.broken = Some(e.clone());
                let _ = reply.send(Err(e));
            }
        }
        Ok(())
    }
}
