//! Collective operations between the ranks of a training job.
//!
//! [`Collective`] is what the worker's collective actor drives; [`RingCollective`] implements
//! it for CPU workers with a ring over QUIC. An NCCL implementation (GPU workers, feature
//! "cuda") implements the same trait later.

mod ring;
mod schedule;
mod wire;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::NetError;

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
    Timeout {
        rank: u32,
        tag: CollectiveTag,
        phase: String,
        peer: String,
        after: Duration,
    },
    #[error("rank {rank}: forming the ring timed out after {after:?}: {waiting_for}")]
    FormationTimeout {
        rank: u32,
        waiting_for: String,
        after: Duration,
    },
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
    fn all_reduce_sum(
        &mut self,
        data: &mut [f32],
        tag: CollectiveTag,
    ) -> impl Future<Output = Result<(), CollectiveError>> + Send;

    /// Make every rank's `data` equal to rank `root`'s. All ranks pass slices of the same
    /// length. The default sums `root`'s values with zeros from every other rank: exact in
    /// IEEE arithmetic (`x + 0.0 == x`; only a negative zero turns positive, on every rank
    /// alike), at twice the traffic of a dedicated broadcast. It is used to hand the training
    /// state to ranks that join or fell behind, which is rare.
    fn broadcast(
        &mut self,
        data: &mut [f32],
        root: u32,
        tag: CollectiveTag,
    ) -> impl Future<Output = Result<(), CollectiveError>> + Send {
        async move {
            if root >= self.world_size() {
                return Err(CollectiveError::InvalidArgument(format!(
                    "broadcast root {root} is not a rank of {}",
                    self.world_size()
                )));
            }
            if self.rank() != root {
                data.fill(0.0);
            }
            self.all_reduce_sum(data, tag).await
        }
    }
}
