//! `ddp`: every rank holds the whole model, its per-parameter gradients and a full AdamW. The
//! gradients are summed over the ranks (the loss shares ride at the end of the same
//! all-reduce); every rank then applies the same clipping and update, so replicas stay
//! identical bit for bit.

use std::ops::Range;
use std::time::Instant;

use tch::Tensor;
use troupe_common::collective::CollectiveOp;
use troupe_common::model::precision::with_autocast;
use troupe_common::model::{self, AdamW};

use super::{Batch, LossShare, StepContext, StepOutcome, Times, TrainerError};
use crate::comm::{Comm, CommError};

pub(super) struct Ddp {
    /// The model's own parameters.
    pub(super) params: Vec<Tensor>,
    pub(super) optimizer: AdamW,
    /// Gradient buckets (ranges of parameters) for collectives that work on the device.
    pub(super) buckets: Vec<Range<usize>>,
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
        let t = Instant::now();
        let mut share = LossShare::default();
        for (x, y, weight) in batches {
            let loss = with_autocast(cx.bf16, || cx.model.loss(x, y, true));
            (&loss * *weight).f_backward()?;
            share.add(&loss, *weight)?;
        }
        let loss_share = share.value()?;
        cx.local.set_loss_share(loss_share);
        for p in &self.params {
            cx.note_local_grad(step, &p.grad())?;
        }
        times.compute += t.elapsed().as_secs_f64();
        let clip = cx.config.train.grad_clip;
        let mut loss = loss_share;
        let mut reduced_grad_norm = None;
        if cx.world_size > 1 && comm.works_on_device() {
            let t = Instant::now();
            let reduced = self.reduce_grads_on_device(cx, step, comm).and_then(|()| {
                let share = Tensor::f_from_slice(&[loss_share as f32])?.f_to_device(cx.device)?;
                comm.run_tensor(CollectiveOp::AllReduce, &share, cx.next_tag(step))?;
                Ok(share.f_double_value(&[0])?)
            });
            match reduced {
                Ok(total) => loss = total,
                Err(error) => {
                    model::zero_grads(&self.params);
                    return Err(TrainerError::Collective { step, error });
                }
            }
            times.comm += t.elapsed().as_secs_f64();
        } else if cx.world_size > 1 {
            let t = Instant::now();
            let mut flat = model::flat_grads(&self.params);
            flat.push(loss_share as f32);
            let mut flat = match cx.collective(step, comm, CollectiveOp::AllReduce, flat) {
                Ok(flat) => flat,
                Err(e) => {
                    // Nothing was applied: the parameters stay those after `step` steps, ready
                    // to redo this step in the next membership generation.
                    model::zero_grads(&self.params);
                    return Err(e);
                }
            };
            loss = flat.pop().map_or(f64::NAN, f64::from);
            times.comm += t.elapsed().as_secs_f64();
            // Norm and clipping on the host copy we already hold, before it is written back.
            let t = Instant::now();
            reduced_grad_norm = Some(model::clip_flat_grads(&self.params, &mut flat, clip)?);
            model::set_flat_grads(&self.params, &flat)?;
            times.compute += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        // With grad_clip <= 0, clip_grad_norm only measures.
        let grad_norm = match reduced_grad_norm {
            Some(norm) => norm,
            None => model::clip_grad_norm(&self.params, clip),
        };
        let skipped = cx.skip_reason(step, loss, grad_norm);
        match skipped {
            None => self.optimizer.step(&self.params, lr),
            // Nothing applied. The optimizer's count moves on with the step all the same, as
            // it would in a run resumed after this step (whose count is the step's).
            Some(_) => self.optimizer.set_step_count(step + 1),
        }
        model::zero_grads(&self.params);
        times.compute += t.elapsed().as_secs_f64();
        Ok(StepOutcome { loss, grad_norm, skipped })
    }

    /// Sums the gradients over the ranks where they are (NCCL), bucket by bucket in the order
    /// the backward pass finished them: each bucket is flattened into one buffer of its own
    /// size, reduced and copied back, so the extra memory is one bucket and the collectives
    /// are a handful, not one per parameter. NCCL runs on libtorch's stream, so each bucket's
    /// reduction is queued behind its copy and the host goes on queueing the next bucket
    /// meanwhile. (libtorch reports gradients to hooks tch does not expose, so buckets cannot
    /// start before the whole backward pass has finished.)
    fn reduce_grads_on_device(&self, cx: &mut StepContext, step: u64, comm: &mut dyn Comm) -> Result<(), CommError> {
        let _no_grad = tch::no_grad_guard();
        for range in self.buckets.clone() {
            let grads: Vec<Tensor> = self.params[range].iter().map(|p| p.grad()).collect();
            if grads.iter().any(|g| !g.defined()) {
                return Err(CommError::InvalidArgument("a parameter has no gradient after the backward pass".into()));
            }
            let flat = Tensor::f_cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0)?;
            comm.run_tensor(CollectiveOp::AllReduce, &flat, cx.next_tag(step))?;
            let mut offset = 0;
            for g in &grads {
                let n = g.numel() as i64;
                g.shallow_clone().f_copy_(&flat.narrow(0, offset, n).view_as(g))?;
                offset += n;
            }
        }
        Ok(())
    }

    /// Makes this rank's parameters and AdamW moments those of rank `source_rank`, which has
    /// completed `step` steps: one broadcast of all three.
    pub(super) fn sync(&mut self, cx: &mut StepContext, source_rank: u32, step: u64, comm: &mut dyn Comm) -> Result<(), TrainerError> {
        let is_source = cx.rank as u32 == source_rank;
        let moments = self.optimizer.moments();
        let groups: [&[Tensor]; 3] = [&self.params, &moments.0, &moments.1];
        let flat = if is_source {
            groups.iter().flat_map(|g| model::flatten(g)).collect()
        } else {
            vec![0f32; groups.iter().map(|g| model::total_numel(g)).sum()]
        };
        let flat = cx.collective(step, comm, CollectiveOp::Broadcast { root: source_rank }, flat)?;
        let mut offset = 0;
        for group in groups {
            let n = model::total_numel(group);
            model::unflatten_into(group, &flat[offset..offset + n])?;
            offset += n;
        }
        self.optimizer.set_step_count(step);
        Ok(())
    }
}
