//! Collective operations between the ranks of a training job.
//!
//! [`Collective`] is what the worker's collective actor drives; [`RingCollective`] implements
//! it for CPU workers with a ring over QUIC: all-reduce, and the reduce-scatter and all-gather
//! it is made of, with NCCL's in-place convention (rank `r` owns chunk `r`; the ring schedule
//! is numbered so that it does, see `schedule`). An NCCL implementation (GPU workers, feature
//! "cuda") implements the same trait later.

pub mod bucket;
mod ring;
mod schedule;
mod wire;

use std::future::Future;
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

/// A group of ranks that can combine tensors. Calls are made by every rank in the same order
/// with the same tags; a call returns when this rank has its result.
///
/// Methods return `impl Future + Send` (rather than boxing) so an NCCL implementation, whose
/// calls are mostly synchronous stream launches, pays nothing for the abstraction.
pub trait Collective: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> u32;
    /// Number of ranks.
    fn world_size(&self) -> u32;
    /// Sum `data` element-wise over all ranks, in place; every rank ends with identical values.
    /// All ranks must pass slices of the same length.
    fn all_reduce_sum(&mut self, data: &mut [f32], tag: CollectiveTag) -> impl Future<Output = Result<(), CollectiveError>> + Send;

    /// Sums `data` over all ranks and leaves chunk `rank` of the sum in place: `data.len()`
    /// must be a multiple of `world_size()` (otherwise [`CollectiveError::InvalidArgument`],
    /// on every rank, before any traffic); chunk i is `data[i*len/W .. (i+1)*len/W]`. Other
    /// chunks hold unspecified values afterwards. All ranks pass slices of the same length.
    /// With one rank it does nothing. This is NCCL's in-place `ncclReduceScatter` (whose
    /// receive buffer is chunk `rank` of the send buffer).
    fn reduce_scatter_sum(&mut self, data: &mut [f32], tag: CollectiveTag) -> impl Future<Output = Result<(), CollectiveError>> + Send;

    /// Every rank contributes chunk `rank` of `data` (same chunking and length rule as
    /// [`Collective::reduce_scatter_sum`]); afterwards every rank holds all chunks, bit for
    /// bit as their owners had them. The other chunks' incoming values are ignored. With one
    /// rank it does nothing. This is NCCL's in-place `ncclAllGather`. A reduce-scatter followed
    /// by an all-gather of the same buffer is an all-reduce.
    fn all_gather(&mut self, data: &mut [f32], tag: CollectiveTag) -> impl Future<Output = Result<(), CollectiveError>> + Send;

    /// Make every rank's `data` equal to rank `root`'s. All ranks pass slices of the same
    /// length. The default sums `root`'s values with zeros from every other rank: exact in
    /// IEEE arithmetic (`x + 0.0 == x`; only a negative zero turns positive, on every rank
    /// alike), at twice the traffic of a dedicated broadcast. It is used to hand the training
    /// state to ranks that join or fell behind, which is rare.
    fn broadcast(&mut self, data: &mut [f32], root: u32, tag: CollectiveTag) -> impl Future<Output = Result<(), CollectiveError>> + Send {
        async move {
            if root >= self.world_size() {
                return Err(CollectiveError::InvalidArgument(format!("broadcast root {root} is not a rank of {}", self.world_size())));
            }
            if self.rank() != root {
                data.fill(0.0);
            }
            self.all_reduce_sum(data, tag).await
        }
    }
}
