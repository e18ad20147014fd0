//! The training state in the form each strategy keeps it: built from the fresh model or from a
//! checkpoint (whatever world size and strategy wrote it), measured, and copied out for a
//! checkpoint.

use std::ops::Range;

use tch::{Device, Kind, Tensor};
use troupe_common::checkpoint::{ShardPart, ShardReader, ShardSnapshot};
use troupe_common::collective::gradient_buckets;
use troupe_common::model::{self, AdamWConfig, FlatAdamW, Gpt};
use troupe_core::config::Config;
use troupe_core::shard::{ShardLayout, Strategy};

use super::ddp::Ddp;
use super::zero12::Zero12;
use super::zero3::Zero3;
use super::{host_vec, write_into, TrainerError};

/// Bytes of training state a rank holds between steps, by kind (exported as
/// `troupe_memory_bytes{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub params: u64,
    pub grads: u64,
    pub optim: u64,
}

/// The state of `parallel.strategy`: the step of each lives in its own file.
pub(super) enum StrategyState {
    Ddp(Ddp),
    Zero12(Zero12),
    Zero3(Zero3),
}

/// This rank's shard of the parameters and its AdamW (`zero1`, `zero2`, `zero3`).
pub(super) struct Shard {
    pub(super) layout: ShardLayout,
    /// A view into the flat parameters (`zero1`/`zero2`), or its own buffer (`zero3`).
    pub(super) params: Tensor,
    pub(super) optimizer: FlatAdamW,
}

impl Shard {
    /// Clips this rank's shard of the gradient `grad` (in place) by the global `norm` and
    /// applies AdamW to this rank's shard of the parameters.
    pub(super) fn update(&mut self, grad: &Tensor, norm: f64, lr: f64, grad_clip: f64) {
        model::clip_tensor(grad, norm, grad_clip);
        self.optimizer.step(&self.params, grad, lr);
    }
}

impl StrategyState {
    pub(super) fn strategy(&self) -> Strategy {
        match self {
            StrategyState::Ddp(_) => Strategy::Ddp,
            StrategyState::Zero12(z) if z.zero2 => Strategy::Zero2,
            StrategyState::Zero12(_) => Strategy::Zero1,
            StrategyState::Zero3(_) => Strategy::Zero3,
        }
    }

    /// See [`super::Trainer::footprint`]; `num_params` is the model's.
    pub(super) fn footprint(&self, num_params: usize) -> Footprint {
        let n = num_params as u64 * 4;
        let shard_footprint = |shard: &Shard, full: Option<&Tensor>, whole_grad: bool| {
            let own = shard.layout.shard_len() as u64 * 4;
            let full = full.map_or(own, |f| f.numel() as u64 * 4);
            Footprint { params: full, grads: if whole_grad { full } else { own }, optim: 2 * own }
        };
        match self {
            StrategyState::Ddp(_) => Footprint { params: n, grads: n, optim: 2 * n },
            StrategyState::Zero12(z) => shard_footprint(&z.shard, Some(&z.full), !z.zero2),
            StrategyState::Zero3(z) => shard_footprint(&z.shard, None, false),
        }
    }

    /// The layout this rank's checkpoint shard follows: the strategy's own, or for `ddp` (whose
    /// ranks all hold everything) one unit split over the ranks, so that each writes 1/W.
    pub(super) fn checkpoint_layout(&self, world_size: usize, num_params: usize) -> ShardLayout {
        match self {
            StrategyState::Ddp(_) => ShardLayout::new(world_size as u32, vec![num_params]),
            StrategyState::Zero12(z) => z.shard.layout.clone(),
            StrategyState::Zero3(z) => z.shard.layout.clone(),
        }
    }

    /// This rank's part of the state after `step` steps, copied into host memory.
    pub(super) fn snapshot(&self, layout: &ShardLayout, rank: u32, step: u64) -> ShardSnapshot {
        let sharded = |s: &Shard| {
            let (m, v) = s.optimizer.moments();
            ShardSnapshot { rank, step, params: host_vec(&s.params), exp_avg: host_vec(m), exp_avg_sq: host_vec(v) }
        };
        match self {
            StrategyState::Ddp(ddp) => {
                let (m, v) = ddp.optimizer.moments();
                let mut parts = [vec![0f32; layout.shard_len()], vec![0f32; layout.shard_len()], vec![0f32; layout.shard_len()]];
                for piece in layout.owned(rank) {
                    let (at, n) = (piece.global.start as i64, piece.global.len() as i64);
                    for (out, flat) in parts.iter_mut().zip([&ddp.full, m, v]) {
                        out[piece.local..piece.local + piece.global.len()].copy_from_slice(&host_vec(&flat.narrow(0, at, n)));
                    }
                }
                let [params, exp_avg, exp_avg_sq] = parts;
                ShardSnapshot { rank, step, params, exp_avg, exp_avg_sq }
            }
            StrategyState::Zero12(z) => sharded(&z.shard),
            StrategyState::Zero3(z) => sharded(&z.shard),
        }
    }
}

/// Parts of a rank's shard that belong to one parameter each, with its weight-decay choice
/// (AdamW decays matrices and embeddings, not biases and LayerNorms).
pub(super) fn shard_segments(layout: &ShardLayout, rank: u32, numels: &[usize], decay: &[bool]) -> Vec<(Range<usize>, bool)> {
    let mut out = Vec::new();
    for piece in layout.owned(rank) {
        let mut offset = 0;
        for (&n, &d) in numels.iter().zip(decay) {
            let (lo, hi) = (piece.global.start.max(offset), piece.global.end.min(offset + n));
            if lo < hi {
                let local = piece.local + (lo - piece.global.start);
                out.push((local..local + (hi - lo), d));
            }
            offset += n;
        }
    }
    out
}

/// Copies the fresh model's parameters into the flat buffer `full` (in order, from the start),
/// without a host copy of the whole model in between, so that building needs no more than
/// twice the parameters' size.
fn copy_parameters_into(full: &Tensor, model: &Gpt) -> Result<(), TrainerError> {
    let _no_grad = tch::no_grad_guard();
    for (view, param) in param_views(full, &model.param_shapes())?.iter().zip(model.parameter_tensors()) {
        view.shallow_clone().f_copy_(&param)?;
    }
    Ok(())
}

/// Views of a flat buffer as the given parameter shapes (in order; a padding tail is left
/// out). Made with one `split`, so that their gradients come back as one flat gradient.
pub(super) fn param_views(flat: &Tensor, shapes: &[Vec<i64>]) -> Result<Vec<Tensor>, TrainerError> {
    let mut sizes: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
    let used: i64 = sizes.iter().sum();
    let padding = flat.size()[0] - used;
    if padding > 0 {
        sizes.push(padding);
    }
    let parts = flat.f_split_with_sizes(sizes.as_slice(), 0)?;
    shapes.iter().zip(parts).map(|(shape, part)| Ok(part.f_view(shape.as_slice())?)).collect()
}

fn tensor_of(values: &[f32], device: Device) -> Result<Tensor, TrainerError> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
}

/// Builds the training state `config.parallel.strategy` keeps, from the fresh model or from a
/// checkpoint. Returns the model the steps compute with (under `zero1`/`zero2` its parameters
/// view the flat buffer; under `zero3` they are released).
pub(super) fn build(
    mut model: Gpt,
    config: &Config,
    rank: u32,
    world: u32,
    reader: Option<&ShardReader>,
) -> Result<(Gpt, StrategyState), TrainerError> {
    let strategy = config.parallel.strategy;
    let numels = model.param_numels();
    let decay: Vec<bool> = model.param_shapes().iter().map(|s| s.len() >= 2).collect();
    let device = model.device();
    let adamw = AdamWConfig::from_train_config(&config.train);
    let numel = model.num_params();
    let read = |reader: &ShardReader, part: ShardPart, range: Range<usize>| -> Result<Vec<f32>, TrainerError> {
        Ok(reader.read_range(part, range)?)
    };
    if strategy == Strategy::Ddp {
        // The whole model as one flat buffer that the model's parameters view, with one
        // optimizer over all of it.
        let full = Tensor::f_zeros([numel as i64], (Kind::Float, device))?;
        let mut optimizer = FlatAdamW::new(adamw, numel, &model::parameter_segments(&numels, &decay), device);
        match reader {
            None => copy_parameters_into(&full, &model)?,
            Some(reader) => {
                model.release_parameters();
                write_into(&full, &read(reader, ShardPart::Params, 0..numel)?)?;
                let (m, v) = optimizer.moments();
                write_into(m, &read(reader, ShardPart::ExpAvg, 0..numel)?)?;
                write_into(v, &read(reader, ShardPart::ExpAvgSq, 0..numel)?)?;
                optimizer.set_step_count(reader.step());
            }
        }
        let model = model.with_tensors(param_views(&full, &model.param_shapes())?)?;
        let offsets: Vec<usize> = std::iter::once(0)
            .chain(numels.iter().scan(0, |at, n| {
                *at += n;
                Some(*at)
            }))
            .collect();
        let buckets = gradient_buckets(&numels, 4, config.parallel.bucket_bytes())
            .into_iter()
            .map(|params| offsets[params.start]..offsets[params.end])
            .collect();
        return Ok((model, StrategyState::Ddp(Ddp { full, optimizer, buckets, offsets })));
    }

    // zero1/2/3: the parameters as flat units (one for the whole model, or one per stage under
    // zero3), each split into one chunk per rank.
    let units: Vec<usize> = if strategy == Strategy::Zero3 {
        model.stage_params().iter().map(|r| numels[r.clone()].iter().sum()).collect()
    } else {
        vec![numel]
    };
    let layout = ShardLayout::new(world, units);
    let owned = layout.owned(rank);
    let params = model.parameter_tensors();
    // This rank's shard of a flat part: from the checkpoint, or from the fresh model (whose
    // moments are zero).
    let shard_of = |part: ShardPart| -> Result<Vec<f32>, TrainerError> {
        let mut out = vec![0f32; layout.shard_len()];
        for p in &owned {
            let values = match (reader, part) {
                (Some(reader), _) => read(reader, part, p.global.clone())?,
                (None, ShardPart::Params) => model::flatten_range(&params, p.global.clone()),
                (None, _) => continue,
            };
            out[p.local..p.local + values.len()].copy_from_slice(&values);
        }
        Ok(out)
    };
    let mut optimizer = FlatAdamW::new(adamw, layout.shard_len(), &shard_segments(&layout, rank, &numels, &decay), device);
    if let Some(reader) = reader {
        let (m, v) = optimizer.moments();
        write_into(m, &shard_of(ShardPart::ExpAvg)?)?;
        write_into(v, &shard_of(ShardPart::ExpAvgSq)?)?;
        optimizer.set_step_count(reader.step());
    }
    if strategy == Strategy::Zero3 {
        let shard = tensor_of(&shard_of(ShardPart::Params)?, device)?;
        drop(params);
        model.release_parameters();
        return Ok((model, StrategyState::Zero3(Zero3 { shard: Shard { layout, params: shard, optimizer } })));
    }
    // zero1/2: the whole model as one flat buffer (padded) that the model's parameters view.
    // Filled without a host copy of the whole model in between, so that building needs no
    // more than twice the parameters' size.
    let full = Tensor::f_zeros([layout.padded_len(0) as i64], (Kind::Float, device))?;
    drop(params);
    match reader {
        None => copy_parameters_into(&full, &model)?,
        Some(reader) => {
            model.release_parameters();
            write_into(&full.narrow(0, 0, numel as i64), &read(reader, ShardPart::Params, 0..numel)?)?;
        }
    }
    let model = model.with_tensors(param_views(&full, &model.param_shapes())?)?;
    let chunk = layout.chunk_len(0);
    let shard = full.narrow(0, (rank as usize * chunk) as i64, chunk as i64);
    let zero2 = strategy == Strategy::Zero2;
    Ok((model, StrategyState::Zero12(Zero12 { zero2, full, shard: Shard { layout, params: shard, optimizer } })))
}
