//! How the flat training state is split over ranks: the arithmetic of ZeRO sharding, without
//! tensors or I/O.
//!
//! All parameters, concatenated in canonical order, form one flat vector of `numel` scalars.
//! It is cut into *units*, contiguous ranges of whole parameters: one unit for the whole model
//! under `ddp`, `zero1` and `zero2`; under `zero3`, one per stage of the forward pass (the
//! embeddings, each block, the final LayerNorm), because a unit is what is gathered at once.
//!
//! Each unit is padded with zeros to a multiple of the world size W and split into W equal
//! chunks; rank r owns chunk r of every unit. Equal chunks are what NCCL's reduce-scatter and
//! all-gather need, and what the ring's take (see `collective`). A rank's *shard* is its chunks
//! of all units, concatenated: every rank's shard has the same length, [`ShardLayout::shard_len`].
//!
//! A checkpoint stores each rank's shard (parameters and both AdamW moments) plus this layout,
//! so a run can resume on any world size with any strategy: [`ShardLayout::locate`] says where
//! any range of the flat vector lives in the old shards.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The training strategy (`parallel.strategy`): what each rank keeps of the training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Full replica on every rank; gradients all-reduced.
    Ddp,
    /// Full parameters and gradients; each rank keeps and updates only its shard of the AdamW
    /// moments, then the updated parameters are all-gathered.
    Zero1,
    /// As zero1, but gradients are reduce-scattered: each rank keeps only its shard of them.
    Zero2,
    /// Parameters sharded too: each unit is all-gathered just before it computes, then freed.
    Zero3,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ddp => "ddp",
            Strategy::Zero1 => "zero1",
            Strategy::Zero2 => "zero2",
            Strategy::Zero3 => "zero3",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether each rank holds the whole model's parameters between steps.
    pub fn replicates_params(self) -> bool {
        self != Strategy::Zero3
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The split of the flat parameter vector over `world_size` ranks. Recorded in every
/// checkpoint's MANIFEST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    pub world_size: u32,
    /// Scalars in each unit, in flat order (units are contiguous and cover the vector).
    pub unit_numels: Vec<usize>,
}

/// A piece of the flat vector held by one rank: `global` in the flat vector is
/// `local..local + global.len()` in that rank's shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub rank: u32,
    pub global: Range<usize>,
    pub local: usize,
}

impl ShardLayout {
    pub fn new(world_size: u32, unit_numels: Vec<usize>) -> ShardLayout {
        assert!(world_size >= 1, "a layout needs at least one rank");
        ShardLayout { world_size, unit_numels }
    }

    /// Checks a layout read from a file before anything indexes with it.
    pub fn validate(&self) -> Result<(), String> {
        if self.world_size == 0 {
            return Err("world_size is 0".into());
        }
        if self.unit_numels.is_empty() || self.unit_numels.contains(&0) {
            return Err("every unit must hold at least one scalar".into());
        }
        self.unit_numels
            .iter()
            .try_fold(0usize, |acc, &n| acc.checked_add(n))
            .filter(|&n| n < (1usize << 40))
            .map(|_| ())
            .ok_or_else(|| "the units' sizes are implausibly large".to_string())
    }

    /// Scalars in the flat vector (no padding).
    pub fn numel(&self) -> usize {
        self.unit_numels.iter().sum()
    }

    fn w(&self) -> usize {
        self.world_size as usize
    }

    /// Chunk length of unit `u`: its size divided by W, rounded up.
    pub fn chunk_len(&self, u: usize) -> usize {
        self.unit_numels[u].div_ceil(self.w())
    }

    /// Length of unit `u` once padded: W chunks.
    pub fn padded_len(&self, u: usize) -> usize {
        self.chunk_len(u) * self.w()
    }

    /// Where unit `u` starts in the flat vector.
    pub fn unit_start(&self, u: usize) -> usize {
        self.unit_numels[..u].iter().sum()
    }

    /// Where rank r's chunk of unit `u` starts in its shard (the same for every rank).
    pub fn shard_offset(&self, u: usize) -> usize {
        (0..u).map(|k| self.chunk_len(k)).sum()
    }

    /// Length of every rank's shard, padding included.
    pub fn shard_len(&self) -> usize {
        (0..self.unit_numels.len()).map(|u| self.chunk_len(u)).sum()
    }

    /// The parts of the flat vector `rank` owns, each with its place in the shard. Padding
    /// is not part of any piece.
    pub fn owned(&self, rank: u32) -> Vec<Piece> {
        let mut out = Vec::new();
        for u in 0..self.unit_numels.len() {
            let (chunk, n) = (self.chunk_len(u), self.unit_numels[u]);
            let lo = (rank as usize * chunk).min(n);
            let hi = ((rank as usize + 1) * chunk).min(n);
            if lo < hi {
                let start = self.unit_start(u);
                out.push(Piece { rank, global: start + lo..start + hi, local: self.shard_offset(u) });
            }
        }
        out
    }

    /// Where the flat range `range` lives: the pieces of it each rank holds, in flat order.
    pub fn locate(&self, range: Range<usize>) -> Vec<Piece> {
        let mut out = Vec::new();
        for rank in 0..self.world_size {
            for p in self.owned(rank) {
                let lo = p.global.start.max(range.start);
                let hi = p.global.end.min(range.end);
                if lo < hi {
                    out.push(Piece { rank, global: lo..hi, local: p.local + (lo - p.global.start) });
                }
            }
        }
        out.sort_by_key(|p| p.global.start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scalar_is_owned_by_exactly_one_rank_at_one_place() {
        for world in 1..=5u32 {
            for units in [vec![1], vec![7], vec![10, 3, 1, 8], vec![5, 5, 5]] {
                let layout = ShardLayout::new(world, units.clone());
                let n = layout.numel();
                let mut seen = vec![None; n];
                for r in 0..world {
                    for p in layout.owned(r) {
                        assert!(p.local + p.global.len() <= layout.shard_len());
                        for (k, g) in p.global.clone().enumerate() {
                            assert!(seen[g].is_none(), "{g} owned twice");
                            seen[g] = Some((r, p.local + k));
                        }
                    }
                }
                assert!(seen.iter().all(|s| s.is_some()), "{world} {units:?}");
                // locate() agrees with owned(), for any range.
                for lo in 0..n {
                    for hi in lo + 1..=n {
                        let mut g = lo;
                        for p in layout.locate(lo..hi) {
                            assert_eq!(p.global.start, g);
                            for (k, x) in p.global.clone().enumerate() {
                                assert_eq!(seen[x], Some((p.rank, p.local + k)));
                            }
                            g = p.global.end;
                        }
                        assert_eq!(g, hi);
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_are_equal_and_padded() {
        let layout = ShardLayout::new(3, vec![10, 3]);
        assert_eq!((layout.chunk_len(0), layout.chunk_len(1)), (4, 1));
        assert_eq!(layout.shard_len(), 5);
        assert_eq!(layout.padded_len(0), 12);
        // Rank 2 holds 2 of unit 0 (8..10) and unit 1's third scalar.
        assert_eq!(layout.owned(2), vec![Piece { rank: 2, global: 8..10, local: 0 }, Piece { rank: 2, global: 12..13, local: 4 }]);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(ShardLayout { world_size: 0, unit_numels: vec![1] }.validate().is_err());
        assert!(ShardLayout { world_size: 1, unit_numels: vec![] }.validate().is_err());
        assert!(ShardLayout { world_size: 1, unit_numels: vec![3, 0] }.validate().is_err());
        assert!(ShardLayout { world_size: 1, unit_numels: vec![usize::MAX, 2] }.validate().is_err());
        assert!(ShardLayout { world_size: 2, unit_numels: vec![3, 4] }.validate().is_ok());
    }

    #[test]
    fn strategies_parse_and_print() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.name()), Some(s));
        }
        assert_eq!(Strategy::parse("zero4"), None);
    }
}
