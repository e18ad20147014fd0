//! Collective operations between the ranks of a training job.
//!
//! [`CollectiveOp`] names the four operations every backend runs. [`RingCollective`] runs them
//! over a ring of QUIC connections (CPU workers, and between hosts): all-reduce, and the
//! reduce-scatter and all-gather it is made of, with NCCL's in-place convention (rank `r` owns
//! chunk `r`; the ring schedule is numbered so that it does, see `schedule`). NCCL (GPU workers)
//! lives in the worker crate (`troupe_worker::comm::nccl`), and the trainer's view of both, the
//! `Comm` trait, in `troupe_worker::comm`.

pub mod bucket;
mod ring;
mod schedule;
mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::NetError;

pub use bucket::{gradient_buckets, DEFAULT_BUCKET_BYTES};
pub use ring::{form_ring, RingCollective, DEFAULT_PIECE_BYTES};
pub use wire::{HelloReply, PeerHello};

/// Identifies one collective call. Every rank must call collectives in the same order with
/// the same tags; the ring checks this on every call, so a rank that skipped or repeated a
/// call is caught instead of silently summing the wrong tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CollectiveTag {
    /// Training step.
    pub step: u64,
    /// Position of this call within the run (strictly increasing across calls).
    pub seq: u64,
}

impl std::fmt::Display for CollectiveTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} seq {}", self.step, self.seq)
    }
}

/// Why a collective (or forming the ring) failed. `peer` strings name the rank, its role in
/// the ring and its address, e.g. "successor rank 2 (10.0.0.3:7001)".
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: collective {tag} timed out after {after:?} in {phase}, waiting on {peer}")]
    Timeout { rank: u32, tag: CollectiveTag, phase: String, peer: String, after: Duration },
    #[error("rank {rank}: forming the ring timed out after {after:?}: {waiting_for}")]
    FormationTimeout { rank: u32, waiting_for: String, after: Duration },
    #[error("{peer}: connection closed: {reason}")]
    PeerClosed { peer: String, reason: String },
    #[error("{peer}: refused: {reason}")]
    Refused { peer: String, reason: String },
    #[error("collective protocol error: {0}")]
    Protocol(String),
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        #[source]
        source: NetError,
    },
    #[error("invalid collective argument: {0}")]
    InvalidArgument(String),
}

/// Refuses a reduce-scatter or all-gather (named `op`) whose buffer of `len` elements does not
/// split into `world` equal chunks. Implementations call it before any traffic, so every rank
/// refuses alike instead of some of them waiting for the others.
pub fn check_chunked_len(op: &str, len: usize, world: u32) -> Result<(), CollectiveError> {
    let w = world.max(1) as usize;
    if len.is_multiple_of(w) {
        return Ok(());
    }
    Err(CollectiveError::InvalidArgument(format!(
        "{op} of {len} elements over {world} ranks: the length must be a multiple of the world \
         size (each rank owns one equal chunk), {} elements are left over",
        len % w
    )))
}

/// One collective operation: what the QUIC ring, NCCL and every `Comm` of the trainer run.
/// Every rank calls the same operations in the same order, on buffers of the same length;
/// all work in place, with NCCL's convention for chunks (of W equal chunks, rank `r` owns
/// chunk `r`: `data[r*len/W .. (r+1)*len/W]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveOp {
    /// Sums the buffers element-wise; every rank ends with the same sum.
    AllReduce,
    /// Sums the buffers and leaves chunk `rank` of the sum in place; the other chunks hold
    /// unspecified values afterwards. NCCL's in-place `ncclReduceScatter`.
    ReduceScatter,
    /// Every rank contributes its chunk `rank`; afterwards every rank holds all chunks, bit for
    /// bit as their owners had them. NCCL's in-place `ncclAllGather`. A reduce-scatter followed
    /// by an all-gather of the same buffer is an all-reduce.
    AllGather,
    /// Every rank ends with rank `root`'s buffer.
    Broadcast { root: u32 },
}

impl std::fmt::Display for CollectiveOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl CollectiveOp {
    /// The name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveOp::AllReduce => "all_reduce_sum",
            CollectiveOp::ReduceScatter => "reduce_scatter_sum",
            CollectiveOp::AllGather => "all_gather",
            CollectiveOp::Broadcast { .. } => "broadcast",
        }
    }

    /// Whether the buffer is split into one chunk per rank (its length must be a multiple of
    /// the world size).
    pub fn is_chunked(self) -> bool {
        matches!(self, CollectiveOp::ReduceScatter | CollectiveOp::AllGather)
    }

    /// Refuses what no rank can run: a chunked op on a length `world` does not divide, a
    /// broadcast from a rank that does not exist. Every backend checks before any traffic, so
    /// every rank refuses alike instead of some of them waiting for the others.
    pub fn check(self, len: usize, world: u32) -> Result<(), CollectiveError> {
        match self {
            CollectiveOp::ReduceScatter | CollectiveOp::AllGather => check_chunked_len(self.name(), len, world),
            CollectiveOp::Broadcast { root } if root >= world.max(1) => {
                Err(CollectiveError::InvalidArgument(format!("broadcast root {root} is not a rank of {world}")))
            }
            _ => Ok(()),
        }
    }

    /// Bytes one rank sends for a buffer of `len` float32 over a ring of `world` ranks.
    pub fn ring_bytes_sent(self, len: usize, world: u32) -> u64 {
        let (bytes, world) = (len as u64 * 4, u64::from(world.max(1)));
        match self {
            // Ring all-reduce (and the broadcast built on it): 2(W-1)/W of the buffer.
            CollectiveOp::AllReduce | CollectiveOp::Broadcast { .. } => bytes * 2 * (world - 1) / world,
            // Each half of it: (W-1)/W.
            CollectiveOp::ReduceScatter | CollectiveOp::AllGather => bytes * (world - 1) / world,
        }
    }
}
