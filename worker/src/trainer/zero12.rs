//! `zero1` and `zero2`: the whole model as one flat buffer (the model's parameters are views
//! into it), AdamW moments for this rank's shard only. The model computes on a fresh leaf over
//! the flat parameters, so the backward pass leaves one flat gradient (freed after the step).
//! `zero1` all-reduces it, `zero2` reduce-scatters it (the rank keeps its shard of the sum);
//! each rank updates its shard; the shards are all-gathered.
//!
//! Two paths with the same arithmetic: on the device when the collectives work there (NCCL),
//! or alone on a GPU; through host memory otherwise (the ring), which keeps `zero1`
//! bit-identical to `ddp`.

use std::time::Instant;

use tch::Tensor;
use troupe_common::collective::CollectiveOp;
use troupe_common::model;
use troupe_common::model::precision::with_autocast;

use super::state::{param_views, Shard};
use super::{host_vec, write_into, Batch, LossShare, StepContext, StepOutcome, Times, TrainerError};
use crate::comm::Comm;

pub(super) struct Zero12 {
    /// `zero2` (reduce-scatter the gradient) rather than `zero1` (all-reduce it).
    pub(super) zero2: bool,
    /// The whole model as one flat buffer (one unit, padded).
    pub(super) full: Tensor,
    /// This rank's shard; its parameters are a view into `full`.
    pub(super) shard: Shard,
}

impl Zero12 {
    /// One step: the update is applied unless the step's loss or gradient is not finite (then
    /// no rank updates its shard, and no rank all-gathers).
    pub(super) fn step(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        batches: &[Batch],
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<StepOutcome, TrainerError> {
        let t = Instant::now();
        let full = self.full.shallow_clone();
        let leaf = full.f_detach()?.f_set_requires_grad(true)?;
        let mut share = LossShare::default();
        {
            let step_model = cx.model.with_tensors(param_views(&leaf, &cx.model.param_shapes())?)?;
            for (x, y, weight) in batches {
                let loss = with_autocast(cx.bf16, || step_model.loss(x, y, true));
                (&loss * *weight).f_backward()?;
                share.add(&loss, *weight)?;
            }
        }
        let loss_share = share.value()?;
        cx.local.set_loss_share(loss_share);
        cx.note_local_grad(step, &leaf.grad())?;
        // The choice must be the same on every rank, since the two paths issue different
        // collectives: it depends on the generation's backend and world size only, never on
        // this rank's device.
        if comm.works_on_device() || (cx.world_size == 1 && cx.device.is_cuda()) {
            let grad = leaf.grad();
            drop(leaf);
            times.compute += t.elapsed().as_secs_f64();
            return self.step_on_device(cx, step, &grad, loss_share, lr, comm, times);
        }
        let flat = host_vec(&leaf.grad());
        drop(leaf);
        times.compute += t.elapsed().as_secs_f64();

        let (w, r) = (cx.world_size, cx.rank);
        let layout = self.shard.layout.clone();
        let chunk = layout.chunk_len(0);
        let numel = layout.numel();
        let (loss, norm, grad) = if !self.zero2 || w == 1 {
            let t = Instant::now();
            let mut flat = flat;
            let mut loss = loss_share;
            if w > 1 {
                flat.push(loss_share as f32);
                flat = cx.collective(step, comm, CollectiveOp::AllReduce, flat)?;
                loss = flat.pop().map_or(f64::NAN, f64::from);
            }
            times.comm += t.elapsed().as_secs_f64();
            // The norm of the whole reduced gradient, exactly as ddp computes it.
            let norm = model::flat_grad_norm(&flat[..numel], &cx.model.param_numels());
            (loss, norm, flat[r * chunk..(r + 1) * chunk].to_vec())
        } else {
            let t = Instant::now();
            let reduced = cx.collective(step, comm, CollectiveOp::ReduceScatter, flat)?;
            let mine = reduced[r * chunk..(r + 1) * chunk].to_vec();
            let (loss, norm) = cx.loss_and_norm_over_shards(step, loss_share, model::sum_of_squares(&mine), comm)?;
            times.comm += t.elapsed().as_secs_f64();
            (loss, norm, mine)
        };
        if let Some(skipped) = self.skip(cx, step, loss, norm) {
            return Ok(skipped);
        }
        let t = Instant::now();
        let grad = Tensor::f_from_slice(&grad)?.f_to_device(cx.device)?;
        self.shard.update(&grad, norm, lr, cx.config.train.grad_clip);
        let mine = host_vec(&self.shard.params);
        times.compute += t.elapsed().as_secs_f64();
        if w > 1 {
            let t = Instant::now();
            let mut gathered = vec![0f32; layout.padded_len(0)];
            gathered[r * chunk..(r + 1) * chunk].copy_from_slice(&mine);
            let gathered = cx.collective(step, comm, CollectiveOp::AllGather, gathered)?;
            write_into(&full, &gathered)?;
            times.comm += t.elapsed().as_secs_f64();
        }
        Ok(StepOutcome { loss, grad_norm: norm, skipped: None })
    }

    /// The outcome of a step that applies no update, if this one must not (every rank decides
    /// alike: `loss` and `norm` are global).
    fn skip(&mut self, cx: &StepContext, step: u64, loss: f64, norm: f64) -> Option<StepOutcome> {
        let skipped = cx.skip_reason(step, loss, norm)?;
        // The count moves on with the step, as in a run resumed after it.
        self.shard.optimizer.set_step_count(step + 1);
        Some(StepOutcome { loss, grad_norm: norm, skipped: Some(skipped) })
    }

    /// The step without leaving the device: the flat gradient `grad` is all-reduced (zero1)
    /// or reduce-scattered (zero2) in place, this rank's chunk of it updates its shard, which
    /// is a view into `full`, and `full` is all-gathered in place.
    #[allow(clippy::too_many_arguments)]
    fn step_on_device(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        grad: &Tensor,
        loss_share: f64,
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<StepOutcome, TrainerError> {
        let (chunk, numel) = (self.shard.layout.chunk_len(0) as i64, self.shard.layout.numel() as i64);
        let (w, r) = (cx.world_size, cx.rank as i64);
        let mine = grad.narrow(0, r * chunk, chunk);
        let t = Instant::now();
        let (loss, norm) = if !self.zero2 || w == 1 {
            if w > 1 {
                cx.collective_tensor(step, comm, CollectiveOp::AllReduce, grad)?;
            }
            let sum_sq = sum_of_squares(&grad.narrow(0, 0, numel))?;
            // The loss shares still need summing (the gradient's norm is already global).
            let (loss, _) = cx.loss_and_norm_over_shards(step, loss_share, 0.0, comm)?;
            (loss, sum_sq.sqrt())
        } else {
            cx.collective_tensor(step, comm, CollectiveOp::ReduceScatter, grad)?;
            cx.loss_and_norm_over_shards(step, loss_share, sum_of_squares(&mine)?, comm)?
        };
        times.comm += t.elapsed().as_secs_f64();
        if let Some(skipped) = self.skip(cx, step, loss, norm) {
            return Ok(skipped);
        }
        let t = Instant::now();
        self.shard.update(&mine, norm, lr, cx.config.train.grad_clip);
        times.compute += t.elapsed().as_secs_f64();
        if w > 1 {
            let t = Instant::now();
            cx.collective_tensor(step, comm, CollectiveOp::AllGather, &self.full)?;
            times.comm += t.elapsed().as_secs_f64();
        }
        Ok(StepOutcome { loss, grad_norm: norm, skipped: None })
    }
}

/// Σ x² of a shard of the gradient in f64: on the host in order for CPU tensors (the figure
/// the CPU ranks' bit-for-bit agreement rests on, see [`model::sum_of_squares`]), where it is
/// for GPU tensors (one scalar copied instead of the shard).
pub(super) fn sum_of_squares(t: &Tensor) -> Result<f64, TrainerError> {
    if t.device().is_cuda() {
        return Ok(t.f_square()?.f_sum(tch::Kind::Double)?.f_double_value(&[])?);
    }
    Ok(model::sum_of_squares(&host_vec(t)))
}
