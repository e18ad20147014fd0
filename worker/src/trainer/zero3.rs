//! `zero3`: parameters sharded too. A step runs the model stage by stage (embeddings, each
//! block, the head): each stage's parameters are all-gathered just before it computes and
//! dropped after. Only the stage inputs are kept from the forward pass; the backward pass
//! gathers each stage again, recomputes its forward from the kept input and back-propagates
//! through it (activation recomputation), then reduce-scatters the stage's gradient.

use std::time::Instant;

use tch::{Kind, Tensor};
use troupe_common::collective::CollectiveOp;
use troupe_common::model::precision::with_autocast;

use super::state::{param_views, Shard};
use super::zero12::sum_of_squares;
use super::{Batch, LossShare, StepContext, StepOutcome, Times, TrainerError};
use crate::comm::Comm;

pub(super) struct Zero3 {
    /// This rank's shard of every stage's parameters (one unit per stage), in its own buffer.
    pub(super) shard: Shard,
}

impl Zero3 {
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
        let acc = Tensor::f_zeros([self.shard.layout.shard_len() as i64], (Kind::Float, cx.device))?;
        let stages = cx.model.stage_params().len();
        let (inputs, head_inputs) = self.forward(cx, step, batches, true, comm)?;

        // The head: loss, the gradient of its input, and the head's parameter gradients.
        let (e_leaf, e) = self.gather_unit(cx, 0, step, comm, true)?;
        let (f_leaf, f) = self.gather_unit(cx, stages - 1, step, comm, true)?;
        let mut share = LossShare::default();
        let mut upstream = Vec::with_capacity(batches.len());
        for (x, (_, y, weight)) in head_inputs.iter().zip(batches) {
            let x = x.f_detach()?.f_set_requires_grad(true)?;
            let loss = with_autocast(cx.bf16, || cx.model.head_loss_stage(&e[0], &f, &x, y));
            (&loss * *weight).f_backward()?;
            share.add(&loss, *weight)?;
            upstream.push(x.grad());
        }
        let loss_share = share.value()?;
        cx.local.set_loss_share(loss_share);
        drop((e, f));
        self.scatter_unit_grad(cx, 0, &e_leaf, &acc, step, comm)?;
        self.scatter_unit_grad(cx, stages - 1, &f_leaf, &acc, step, comm)?;
        drop((e_leaf, f_leaf));

        // Blocks, last to first: gather, recompute from the kept input, back-propagate.
        for unit in (1..stages - 1).rev() {
            let (leaf, p) = self.gather_unit(cx, unit, step, comm, true)?;
            for (m, x) in inputs[unit].iter().enumerate() {
                let x = x.f_detach()?.f_set_requires_grad(true)?;
                seed_stage(cx, step, m, unit);
                let y = with_autocast(cx.bf16, || cx.model.block_stage(&p, &x, true));
                y.f_mul(&upstream[m])?.f_sum(Kind::Float)?.f_backward()?;
                upstream[m] = x.grad();
            }
            drop(p);
            self.scatter_unit_grad(cx, unit, &leaf, &acc, step, comm)?;
        }
        // The embeddings.
        let (leaf, e) = self.gather_unit(cx, 0, step, comm, true)?;
        for (m, (x, _, _)) in batches.iter().enumerate() {
            seed_stage(cx, step, m, 0);
            let y = with_autocast(cx.bf16, || cx.model.embed_stage(&e[0], &e[1], x, true));
            y.f_mul(&upstream[m])?.f_sum(Kind::Float)?.f_backward()?;
        }
        drop(e);
        self.scatter_unit_grad(cx, 0, &leaf, &acc, step, comm)?;
        drop(leaf);
        times.compute += t.elapsed().as_secs_f64();

        let (loss, norm) = cx.loss_and_norm_over_shards(step, loss_share, sum_of_squares(&acc)?, comm)?;
        let skipped = cx.skip_reason(step, loss, norm);
        match skipped {
            None => self.shard.update(&acc, norm, lr, cx.config.train.grad_clip),
            // The count moves on with the step, as in a run resumed after it.
            Some(_) => self.shard.optimizer.set_step_count(step + 1),
        }
        Ok(StepOutcome { loss, grad_norm: norm, skipped })
    }

    /// The validation loss of each micro-batch (every rank takes part in the gathers).
    pub(super) fn eval_losses(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        batches: &[Batch],
        comm: &mut dyn Comm,
    ) -> Result<Vec<Tensor>, TrainerError> {
        let stages = cx.model.stage_params().len();
        let (_, head_inputs) = self.forward(cx, step, batches, false, comm)?;
        let (_, e) = self.gather_unit(cx, 0, step, comm, false)?;
        let (_, f) = self.gather_unit(cx, stages - 1, step, comm, false)?;
        Ok(head_inputs
            .iter()
            .zip(batches)
            .map(|(x, (_, y, _))| with_autocast(cx.bf16, || cx.model.head_loss_stage(&e[0], &f, x, y)))
            .collect())
    }

    /// The stage inputs of the forward pass: `inputs[u][m]` is what stage `u` received for
    /// micro-batch `m` (stage 0 takes token ids), and the head's input.
    fn forward(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        batches: &[Batch],
        train: bool,
        comm: &mut dyn Comm,
    ) -> Result<(Vec<Vec<Tensor>>, Vec<Tensor>), TrainerError> {
        let _no_grad = tch::no_grad_guard();
        let stages = cx.model.stage_params().len();
        let (_, e) = self.gather_unit(cx, 0, step, comm, false)?;
        let mut xs: Vec<Tensor> = Vec::with_capacity(batches.len());
        for (m, (x, _, _)) in batches.iter().enumerate() {
            seed_stage(cx, step, m, 0);
            xs.push(with_autocast(cx.bf16, || cx.model.embed_stage(&e[0], &e[1], x, train)));
        }
        drop(e);
        let mut inputs = vec![Vec::new()];
        for unit in 1..stages - 1 {
            let (_, p) = self.gather_unit(cx, unit, step, comm, false)?;
            let mut next = Vec::with_capacity(xs.len());
            for (m, x) in xs.iter().enumerate() {
                seed_stage(cx, step, m, unit);
                next.push(with_autocast(cx.bf16, || cx.model.block_stage(&p, x, train)));
            }
            inputs.push(std::mem::replace(&mut xs, next));
        }
        Ok((inputs, xs))
    }

    /// All-gathers stage `unit`'s parameters into a fresh flat leaf (padded) that records
    /// gradients when `grad`, and returns it with its per-parameter views.
    fn gather_unit(
        &mut self,
        cx: &mut StepContext,
        unit: usize,
        step: u64,
        comm: &mut dyn Comm,
        grad: bool,
    ) -> Result<(Tensor, Vec<Tensor>), TrainerError> {
        let layout = &self.shard.layout;
        let (chunk, at) = (layout.chunk_len(unit) as i64, layout.shard_offset(unit) as i64);
        let flat = Tensor::f_zeros([layout.padded_len(unit) as i64], (Kind::Float, cx.device))?;
        flat.narrow(0, cx.rank as i64 * chunk, chunk).f_copy_(&self.shard.params.narrow(0, at, chunk))?;
        if cx.world_size > 1 {
            cx.collective_tensor(step, comm, CollectiveOp::AllGather, &flat)?;
        }
        let leaf = flat.f_set_requires_grad(grad)?;
        let range = cx.model.stage_params()[unit].clone();
        let views = param_views(&leaf, &cx.model.param_shapes()[range])?;
        Ok((leaf, views))
    }

    /// Reduce-scatters stage `unit`'s gradient and adds this rank's chunk to `acc`.
    fn scatter_unit_grad(
        &mut self,
        cx: &mut StepContext,
        unit: usize,
        leaf: &Tensor,
        acc: &Tensor,
        step: u64,
        comm: &mut dyn Comm,
    ) -> Result<(), TrainerError> {
        let (chunk, at) = (self.shard.layout.chunk_len(unit) as i64, self.shard.layout.shard_offset(unit) as i64);
        let grad = leaf.grad().f_contiguous()?;
        cx.note_local_grad(step, &grad)?;
        if cx.world_size > 1 {
            cx.collective_tensor(step, comm, CollectiveOp::ReduceScatter, &grad)?;
        }
        let _ = acc.narrow(0, at, chunk).f_add_(&grad.narrow(0, cx.rank as i64 * chunk, chunk))?;
        Ok(())
    }
}

/// Seeds dropout for one stage of one micro-batch, so that its recomputation in the backward
/// pass draws the very same mask.
fn seed_stage(cx: &StepContext, step: u64, micro: usize, unit: usize) {
    tch::manual_seed(cx.step_seed(step).wrapping_mul(31).wrapping_add((micro as i64) << 20).wrapping_add(unit as i64));
}
