//! `ddp`: every rank holds the whole model, its gradient and a full AdamW. The model's
//! parameters are views into one flat buffer, as under `zero1`/`zero2`: the step computes on a
//! fresh leaf over it, so the backward pass leaves one flat gradient, which is summed over the
//! ranks in place (the loss shares ride at the end of the same all-reduce on the host path),
//! clipped, and applied by one [`FlatAdamW`] over the whole buffer. Every rank applies the same
//! update, so replicas stay identical bit for bit.

use std::ops::Range;
use std::time::Instant;

use tch::Tensor;
use troupe_common::collective::CollectiveOp;
use troupe_common::model::precision::with_autocast;
use troupe_common::model::{self, FlatAdamW};

use super::state::param_views;
use super::{host_vec, write_into, Batch, LossShare, StepContext, StepOutcome, Times, TrainerError};
use crate::comm::{Comm, CommError};

pub(super) struct Ddp {
    /// The whole model as one flat buffer (no padding); the model's parameters view it.
    pub(super) full: Tensor,
    pub(super) optimizer: FlatAdamW,
    /// Gradient buckets (ranges of the flat gradient, each whole parameters, in the order the
    /// backward pass finishes them) for collectives that work on the device.
    pub(super) buckets: Vec<Range<usize>>,
    /// Where each parameter starts in the flat buffer, and its end after the last.
    pub(super) offsets: Vec<usize>,
}

impl Ddp {
    /// One step: the update is applied unless the step's loss or gradient is not finite.
    pub(super) fn step(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        batches: &[Batch],
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<StepOutcome, TrainerError> {
        if cx.world_size > 1 && !comm.works_on_device() && cx.config.parallel.overlap && !batches.is_empty() {
            let (grad, loss, norm) = self.backward_overlapped(cx, step, batches, comm, times)?;
            return self.apply(cx, step, &grad, loss, Some(norm), lr, times);
        }
        let t = Instant::now();
        let leaf = self.full.f_detach()?.f_set_requires_grad(true)?;
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
        let grad = leaf.grad();
        drop(leaf);
        cx.note_local_grad(step, &grad)?;
        times.compute += t.elapsed().as_secs_f64();
        let clip = cx.config.train.grad_clip;
        let mut loss = loss_share;
        let mut reduced_grad_norm = None;
        if cx.world_size > 1 && comm.works_on_device() {
            let t = Instant::now();
            let reduced = self.reduce_grads_on_device(cx, step, &grad, comm).and_then(|()| {
                let share = Tensor::f_from_slice(&[loss_share as f32])?.f_to_device(cx.device)?;
                comm.run_tensor(CollectiveOp::AllReduce, &share, cx.next_tag(step))?;
                Ok(share.f_double_value(&[0])?)
            });
            match reduced {
                Ok(total) => loss = total,
                // Nothing was applied: the parameters stay those after `step` steps, ready to
                // redo this step in the next membership generation.
                Err(error) => return Err(TrainerError::Collective { step, error }),
            }
            times.comm += t.elapsed().as_secs_f64();
        } else if cx.world_size > 1 {
            let t = Instant::now();
            let mut flat = host_vec(&grad);
            flat.push(loss_share as f32);
            let mut flat = cx.collective(step, comm, CollectiveOp::AllReduce, flat)?;
            loss = flat.pop().map_or(f64::NAN, f64::from);
            times.comm += t.elapsed().as_secs_f64();
            // Norm and clipping on the host copy we already hold, before it is written back.
            let t = Instant::now();
            let norm = model::flat_grad_norm(&flat, &cx.model.param_numels());
            model::clip_flat(&mut flat, norm, clip);
            write_into(&grad, &flat)?;
            reduced_grad_norm = Some(norm);
            times.compute += t.elapsed().as_secs_f64();
        }
        self.apply(cx, step, &grad, loss, reduced_grad_norm, lr, times)
    }

    /// The end of a step, once `grad` is the sum over the ranks and `loss` the step's loss:
    /// clipping (already done on the host when `reduced_grad_norm` is given: the norm it
    /// measured) and the update, unless the step must be skipped.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        grad: &Tensor,
        loss: f64,
        reduced_grad_norm: Option<f64>,
        lr: f64,
        times: &mut Times,
    ) -> Result<StepOutcome, TrainerError> {
        let t = Instant::now();
        let grad_norm = match reduced_grad_norm {
            Some(norm) => norm,
            None => {
                // With grad_clip <= 0, only measured.
                let norm = flat_norm(grad, &cx.model.param_numels())?;
                model::clip_tensor(grad, norm, cx.config.train.grad_clip);
                norm
            }
        };
        let skipped = cx.skip_reason(step, loss, grad_norm);
        match skipped {
            None => self.optimizer.step(&self.full, grad, lr),
            // Nothing applied. The optimizer's count moves on with the step all the same, as
            // it would in a run resumed after this step (whose count is the step's).
            Some(_) => self.optimizer.set_step_count(step + 1),
        }
        times.compute += t.elapsed().as_secs_f64();
        Ok(StepOutcome { loss, grad_norm, skipped })
    }

    /// Sums the flat gradient over the ranks where it is (NCCL), bucket by bucket in the order
    /// the backward pass finished them: each bucket is a contiguous slice of the gradient,
    /// reduced in place, so there is nothing to copy and the collectives are a handful, not
    /// one per parameter. NCCL runs on libtorch's stream, so the host goes on queueing the
    /// next bucket meanwhile. (libtorch reports gradients to hooks tch does not expose, so
    /// buckets cannot start before the whole backward pass has finished.)
    fn reduce_grads_on_device(&self, cx: &mut StepContext, step: u64, grad: &Tensor, comm: &mut dyn Comm) -> Result<(), CommError> {
        let _no_grad = tch::no_grad_guard();
        if !grad.defined() {
            return Err(CommError::InvalidArgument("the model has no gradient after the backward pass".into()));
        }
        for range in &self.buckets {
            let bucket = grad.narrow(0, range.start as i64, range.len() as i64);
            comm.run_tensor(CollectiveOp::AllReduce, &bucket, cx.next_tag(step))?;
        }
        Ok(())
    }

    /// Makes this rank's parameters and AdamW moments those of rank `source_rank`, which has
    /// completed `step` steps: one broadcast of all three.
    pub(super) fn sync(&mut self, cx: &mut StepContext, source_rank: u32, step: u64, comm: &mut dyn Comm) -> Result<(), TrainerError> {
        let is_source = cx.rank as u32 == source_rank;
        let (m, v) = self.optimizer.moments();
        let groups = [self.full.shallow_clone(), m.shallow_clone(), v.shallow_clone()];
        let n = self.full.numel();
        let flat = if is_source { groups.iter().flat_map(host_vec).collect() } else { vec![0f32; 3 * n] };
        let flat = cx.collective(step, comm, CollectiveOp::Broadcast { root: source_rank }, flat)?;
        for (i, group) in groups.iter().enumerate() {
            write_into(group, &flat[i * n..(i + 1) * n])?;
        }
        self.optimizer.set_step_count(step);
        Ok(())
    }
}

/// The global norm of a flat gradient whose parameters hold `numels` scalars each: on the host
/// per parameter and in order for CPU tensors (bit for bit what the host path computes), where
/// it is for GPU tensors (one scalar copied instead of the gradient).
fn flat_norm(grad: &Tensor, numels: &[usize]) -> Result<f64, TrainerError> {
    if grad.device().is_cuda() {
        return Ok(super::zero12::sum_of_squares(grad)?.sqrt());
    }
    Ok(model::flat_grad_norm(&host_vec(grad), numels))
}
