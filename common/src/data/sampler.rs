//! The global-cursor sampler: which training samples each rank reads at each step.
//!
//! Correctness of data parallel training rests here. Training is described by one number, the
//! *global cursor*: how many samples the whole cluster has consumed since the run started,
//! across epochs. Position `p` of that stream is sample `perm(seed, p / n)[p % n]` (n samples
//! per epoch), and a step hands positions `[cursor, cursor + global_batch)` out to the ranks in
//! contiguous slices. Everything is a pure function of `(seed, cursor, global_batch, rank,
//! world)`, so a resumed run, or one that lost or gained workers, continues the very same
//! stream: no sample is skipped or repeated within an epoch, whatever happened to the cluster.

use std::ops::Range;

use super::error::{DataError, DataResult};
use super::tokens::TokenFile;

/// Sample `i` is the token window starting at `i * block_size`, `block_size + 1` tokens long
/// (the inputs plus the targets shifted by one). Windows overlap by one token so every token
/// but the first is a target exactly once per epoch.
pub fn num_samples(num_tokens: usize, block_size: usize) -> u64 {
    if block_size == 0 {
        return 0;
    }
    (num_tokens.saturating_sub(1) / block_size) as u64
}

/// The training-sample order for a run: `num_samples` per epoch, shuffled per epoch by `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    pub num_samples: u64,
    pub seed: u64,
}

impl Sampler {
    /// The sampler over a token file of `num_tokens` tokens; an error if not even one sample
    /// fits, since training on nothing is never what was meant.
    pub fn new(num_tokens: usize, block_size: usize, seed: u64) -> DataResult<Self> {
        let num_samples = num_samples(num_tokens, block_size);
        if num_samples == 0 {
            return Err(DataError::TooFewTokens { tokens: num_tokens, block_size });
        }
        Ok(Sampler { num_samples, seed })
    }

    /// The epoch that stream position `position` belongs to.
    pub fn epoch_of(&self, position: u64) -> u64 {
        position.checked_div(self.num_samples).unwrap_or(0)
    }

    /// The shuffled order of all samples in `epoch`.
    pub fn permutation(&self, epoch: u64) -> Vec<u64> {
        let n = self.num_samples;
        let mut order: Vec<u64> = (0..n).collect();
        let mut rng = SplitMix64::for_epoch(self.seed, epoch);
        // Fisher-Yates: each slot takes a uniformly chosen element of those not yet placed.
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }

    /// The sample ids rank `rank` of `world` trains on in the step that starts at `cursor`
    /// with `global_batch` samples in all. Pure: the same arguments always give the same ids.
    ///
    /// A rank outside the world (or an empty world, or a sampler with no samples) gets no
    /// samples rather than a panic; callers validate ranks where they are assigned.
    pub fn indices(&self, cursor: u64, global_batch: usize, rank: usize, world: usize) -> Vec<u64> {
        SamplerMemo::new(*self).indices(cursor, global_batch, rank, world)
    }
}

/// The same answers as [`Sampler::indices`], but keeping the current epoch's permutation
/// between calls, so a step costs its batch size instead of a whole epoch's shuffle.
#[derive(Clone, Debug)]
pub struct SamplerMemo {
    sampler: Sampler,
    cached: Option<(u64, Vec<u64>)>,
}

impl SamplerMemo {
    pub fn new(sampler: Sampler) -> Self {
        SamplerMemo { sampler, cached: None }
    }

    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    pub fn indices(&mut self, cursor: u64, global_batch: usize, rank: usize, world: usize) -> Vec<u64> {
        if self.sampler.num_samples == 0 {
            return Vec::new();
        }
        let mine = rank_range(global_batch, rank, world);
        (mine.start as u64..mine.end as u64).map(|offset| self.sample_at(cursor.saturating_add(offset))).collect()
    }

    /// The sample at stream position `position`; requires `num_samples > 0`.
    fn sample_at(&mut self, position: u64) -> u64 {
        let n = self.sampler.num_samples;
        let epoch = position / n;
        let slot = (position % n) as usize;
        match &self.cached {
            Some((cached_epoch, order)) if *cached_epoch == epoch => order[slot],
            _ => {
                let order = self.sampler.permutation(epoch);
                let sample = order[slot];
                self.cached = Some((epoch, order));
                sample
            }
        }
    }
}

/// The slice of a `global_batch` that rank `rank` of `world` takes: contiguous, in rank order,
/// sizes differing by at most one with the earlier ranks taking the larger ones.
/// An invalid rank (`rank >= world`) gets an empty range at the end of the batch.
pub fn rank_range(global_batch: usize, rank: usize, world: usize) -> Range<usize> {
    if rank >= world {
        return global_batch..global_batch;
    }
    let base = global_batch / world;
    let extra = global_batch % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Validation samples for an evaluation of `sequences` samples: the first ones of the
/// validation file, in order (the same every evaluation, so losses are comparable), split
/// over the ranks like a training batch.
pub fn eval_indices(num_val_samples: u64, sequences: usize, rank: usize, world: usize) -> Vec<u64> {
    let total = usize::try_from(num_val_samples).map_or(sequences, |n| n.min(sequences));
    let mine = rank_range(total, rank, world);
    (mine.start as u64..mine.end as u64).collect()
}

/// Reads the samples `sample_ids` as row-major `[n, block_size]` inputs and targets (the
/// targets are the inputs shifted left by one token). On a masked stream (chat data) a target
/// that is not trained on is -1, which the loss ignores.
pub fn load_batch(tokens: &TokenFile, block_size: usize, sample_ids: &[u64]) -> DataResult<(Vec<i64>, Vec<i64>)> {
    let rows = sample_ids.len();
    let mut inputs = Vec::with_capacity(rows.saturating_mul(block_size));
    let mut targets = Vec::with_capacity(rows.saturating_mul(block_size));
    let mut window = Vec::with_capacity(block_size.saturating_add(1));
    for &id in sample_ids {
        // An id too large to address saturates, which the bounds check then reports.
        let start = usize::try_from(id).unwrap_or(usize::MAX).saturating_mul(block_size);
        window.clear();
        tokens.extend_window(start, block_size.saturating_add(1), &mut window)?;
        inputs.extend_from_slice(&window[..block_size]);
        if tokens.is_masked() {
            let trained = tokens.trained(start + 1, block_size)?;
            targets.extend(window[1..].iter().zip(trained).map(|(&t, on)| if on { t } else { -1 }));
        } else {
            targets.extend_from_slice(&window[1..]);
        }
    }
    Ok((inputs, targets))
}

/// How many targets of the samples `sample_ids` are trained on: every one of an unmasked
/// stream, the mask's ones of a masked one.
pub fn trained_targets(tokens: &TokenFile, block_size: usize, sample_ids: &[u64]) -> DataResult<u64> {
    let mut n = 0;
    for &id in sample_ids {
        let start = usize::try_from(id).unwrap_or(usize::MAX).saturating_mul(block_size);
        n += tokens.trained(start.saturating_add(1), block_size)?.into_iter().filter(|&on| on).count() as u64;
    }
    Ok(n)
}

/// A tiny seeded generator (SplitMix64) so the sample order depends on nothing but the seed:
/// not on a `rand` version, platform or thread count.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// Each epoch gets an unrelated stream: the epoch is mixed in, not added to the state,
    /// so epoch e+1 is not epoch e shifted by one draw.
    fn for_epoch(seed: u64, epoch: u64) -> Self {
        SplitMix64 { state: mix64(seed ^ mix64(epoch.wrapping_add(Self::GAMMA))) }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        mix64(self.state)
    }

    /// Uniform in `[0, bound)` for `bound > 0`, without modulo bias (Lemire's method).
    fn below(&mut self, bound: u64) -> u64 {
        let mut product = u128::from(self.next_u64()) * u128::from(bound);
        if (product as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(bound);
            }
        }
        (product >> 64) as u64
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs training steps of `global_batch` from `cursor` for `steps` steps with `world`
    /// ranks, returning the stream of samples in global order (ranks concatenated).
    fn run(sampler: &Sampler, cursor: &mut u64, global_batch: usize, world: usize, steps: usize) -> Vec<u64> {
        let mut memos: Vec<SamplerMemo> = (0..world).map(|_| SamplerMemo::new(*sampler)).collect();
        let mut stream = Vec::new();
        for _ in 0..steps {
            for (rank, memo) in memos.iter_mut().enumerate() {
                let ids = memo.indices(*cursor, global_batch, rank, world);
                assert_eq!(ids, sampler.indices(*cursor, global_batch, rank, world), "memo must equal the pure function");
                assert_eq!(ids.len(), rank_range(global_batch, rank, world).len());
                stream.extend(ids);
            }
            *cursor += global_batch as u64;
        }
        stream
    }

    fn assert_each_epoch_is_a_permutation(stream: &[u64], n: u64) {
        for (epoch, chunk) in stream.chunks(n as usize).enumerate() {
            let mut seen = vec![0u32; n as usize];
            for &id in chunk {
                assert!(id < n, "sample {id} out of range {n}");
                seen[id as usize] += 1;
            }
            if chunk.len() == n as usize {
                assert!(seen.iter().all(|&c| c == 1), "epoch {epoch}: a sample was skipped or repeated");
            } else {
                assert!(seen.iter().all(|&c| c <= 1), "partial epoch {epoch}: a sample repeated");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn every_sample_once_per_epoch_across_resume_and_resize(
            n in 1u64..120,
            global_batch in 1usize..40,
            seed in any::<u64>(),
            world_before in 1usize..=3,
            world_after in 1usize..=3,
            resume_fraction in 0.0f64..1.0,
        ) {
            let sampler = Sampler { num_samples: n, seed };
            // Enough steps for two full epochs and a bit, so epoch boundaries inside a batch
            // are crossed as well.
            let total_steps = (2 * n as usize + 3).div_ceil(global_batch);
            let resume_step = (resume_fraction * total_steps as f64) as usize;

            let mut cursor = 0u64;
            let mut stream = run(&sampler, &mut cursor, global_batch, world_before, resume_step);
            // Resume: a cluster of another size starts from nothing but the saved cursor.
            let mut resumed_cursor = cursor;
            stream.extend(run(&sampler, &mut resumed_cursor, global_batch, world_after, total_steps - resume_step));

            assert_each_epoch_is_a_permutation(&stream, n);

            // The global order does not depend on how the cluster was shaped.
            let mut reference_cursor = 0u64;
            let reference = run(&sampler, &mut reference_cursor, global_batch, 1, total_steps);
            prop_assert_eq!(&stream, &reference);
            prop_assert_eq!(&stream[..n as usize], &sampler.permutation(0)[..]);
        }

        #[test]
        fn rank_ranges_partition_the_batch(global_batch in 0usize..500, world in 1usize..40) {
            let mut next = 0;
            let sizes: Vec<usize> = (0..world).map(|rank| {
                let r = rank_range(global_batch, rank, world);
                assert_eq!(r.start, next, "ranges must be contiguous and in rank order");
                next = r.end;
                r.len()
            }).collect();
            prop_assert_eq!(next, global_batch);
            prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
        }

        #[test]
        fn indices_are_pure(
            n in 1u64..5000,
            seed in any::<u64>(),
            cursor in 0u64..1_000_000,
            global_batch in 0usize..64,
            world in 1usize..8,
            rank_pick in 0usize..8,
        ) {
            let sampler = Sampler { num_samples: n, seed };
            let rank = rank_pick % world;
            let first = sampler.indices(cursor, global_batch, rank, world);
            let again = Sampler { num_samples: n, seed }.indices(cursor, global_batch, rank, world);
            prop_assert_eq!(&first, &again);
            let mut memo = SamplerMemo::new(sampler);
            memo.indices(cursor.wrapping_mul(7) % (3 * n), 5, 0, 1);
            prop_assert_eq!(&first, &memo.indices(cursor, global_batch, rank, world));
        }

        #[test]
        fn eval_indices_cover_the_first_samples_once(
            num_val in 0u64..300, sequences in 0usize..400, world in 1usize..6,
        ) {
            let all: Vec<u64> = (0..world).flat_map(|r| eval_indices(num_val, sequences, r, world)).collect();
            let expected: Vec<u64> = (0..num_val.min(sequences as u64)).collect();
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn permutations_differ_across_epochs_and_seeds() {
        let a = Sampler { num_samples: 64, seed: 1 };
        let b = Sampler { num_samples: 64, seed: 2 };
        assert_ne!(a.permutation(0), a.permutation(1));
        assert_ne!(a.permutation(0), b.permutation(0));
        assert_eq!(a.permutation(3), a.permutation(3));
    }

    #[test]
    fn the_order_is_pinned() {
        // Guards against an accidental change of the shuffle, which would silently change
        // which samples a resumed run sees.
        let s = Sampler { num_samples: 10, seed: 1234 };
        assert_eq!(s.permutation(0), [3, 4, 0, 8, 7, 2, 6, 1, 5, 9]);
    }

    #[test]
    fn invalid_ranks_and_empty_samplers_get_nothing() {
        let s = Sampler { num_samples: 10, seed: 0 };
        assert!(s.indices(0, 8, 3, 3).is_empty());
        assert!(s.indices(0, 8, 0, 0).is_empty());
        assert!(Sampler { num_samples: 0, seed: 0 }.indices(0, 8, 0, 1).is_empty());
        assert_eq!(rank_range(7, 0, 0), 7..7);
    }

    #[test]
    fn sample_counts() {
        assert_eq!(num_samples(0, 4), 0);
        assert_eq!(num_samples(4, 4), 0);
        assert_eq!(num_samples(5, 4), 1);
        assert_eq!(num_samples(9, 4), 2);
        assert_eq!(num_samples(10, 0), 0);
        assert!(matches!(Sampler::new(4, 4, 0), Err(DataError::TooFewTokens { .. })));
        assert_eq!(Sampler::new(9, 4, 7).map(|s| s.num_samples).ok(), Some(2));
    }

    #[test]
    fn batches_are_shifted_windows() -> DataResult<()> {
        let dir = crate::data::corpus::tests::scratch_dir("batch");
        let path = dir.join("t.bin");
        let ids: Vec<u16> = (100..110).collect();
        std::fs::write(&path, ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).ok();
        let tokens = TokenFile::open(&path)?;
        // 10 tokens, block 3: samples 0..3 start at 0, 3, 6.
        let (x, y) = load_batch(&tokens, 3, &[2, 0])?;
        assert_eq!(x, vec![106, 107, 108, 100, 101, 102]);
        assert_eq!(y, vec![107, 108, 109, 101, 102, 103]);
        assert!(matches!(load_batch(&tokens, 3, &[3]), Err(DataError::OutOfBounds { .. })));
        assert!(load_batch(&tokens, 3, &[u64::MAX]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
