//! The collectives of a mixed generation: NCCL inside the group of CUDA workers that can use
//! it, the QUIC ring between that group's rank 0 and the workers that cannot.

use super::{Comm, CommError};
use troupe_common::collective::{CollectiveOp, CollectiveTag};

/// Every operation is a sum: reduced in the group, then over the ring (by the group's rank 0,
/// for the whole group), then broadcast in the group. A reduce-scatter is that sum (each rank
/// keeps its chunk) and an all-gather sums each rank's own chunk with zeros (exact): an
/// all-reduce's traffic each, but chunks stay numbered by the trainer's ranks, which neither
/// the group nor the ring numbers alike. Every rank of the generation uses one, whatever it
/// is part of.
pub struct Mixed {
    /// This rank's NCCL group, if it is in one.
    pub group: Option<Box<dyn Comm>>,
    /// The ring, if this rank is in it (the group's rank 0 and the other workers).
    pub ring: Option<Box<dyn Comm>>,
    pub rank: u32,
    pub world_size: u32,
}

impl Mixed {
    /// The sum over the whole generation: group, ring, group.
    fn sum(&mut self, mut data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, CommError> {
        if let Some(group) = &mut self.group {
            data = group.run(CollectiveOp::AllReduce, data, tag)?;
        }
        if let Some(ring) = &mut self.ring {
            data = ring.run(CollectiveOp::AllReduce, data, tag)?;
        }
        if let Some(group) = &mut self.group {
            data = group.run(CollectiveOp::Broadcast { root: 0 }, data, tag)?;
        }
        Ok(data)
    }
}

impl Comm for Mixed {
    fn run(&mut self, op: CollectiveOp, mut data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, CommError> {
        op.check(data.len(), self.world_size).map_err(|e| CommError::InvalidArgument(e.to_string()))?;
        match op {
            CollectiveOp::AllReduce | CollectiveOp::ReduceScatter => {}
            CollectiveOp::AllGather => {
                let chunk = data.len() / self.world_size as usize;
                let mine = self.rank as usize * chunk..(self.rank as usize + 1) * chunk;
                for (i, x) in data.iter_mut().enumerate() {
                    if !mine.contains(&i) {
                        *x = 0.0;
                    }
                }
            }
            CollectiveOp::Broadcast { root } => {
                if self.rank != root {
                    data.fill(0.0);
                }
            }
        }
        self.sum(data, tag)
    }
}
