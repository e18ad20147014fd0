//! `ddp` on the QUIC ring with the gradient's communication overlapped with the backward pass
//! (`parallel.overlap`, on by default), as PyTorch DDP overlaps its buckets.
//!
//! tch exposes no autograd hooks, so the backward pass is driven by hand instead: the step's
//! last micro-batch runs its forward pass stage by stage (embeddings, each block, the head),
//! each stage on its own leaf over its part of the flat parameters and each stage's input kept
//! as a leaf; the backward pass then goes from the head down, feeding each stage the gradient
//! of its output. As soon as a stage's backward is done its gradient is final (the earlier
//! micro-batches' part plus this one's), and it goes to the collective actor, which all-reduces
//! it while the stages below compute. The head's bucket carries the loss share.
//!
//! The arithmetic is the whole-graph backward's: every stage runs the same operations on the
//! same values, dropout draws in the same order, a stage's output gradient passes through
//! `sum(y * g)` unchanged, and each parameter's gradient is added to the earlier
//! micro-batches' as autograd accumulates it. The tied token embedding gets both of its
//! contributions (the head's and the embeddings') summed first, as autograd sums them, then
//! added. With two ranks the sums are those of one all-reduce of the whole gradient, bit for
//! bit; with more, the ring adds each element's terms in an order that depends on where its
//! bucket starts, so the results differ from the single all-reduce in the last bits only.

use std::ops::Range;
use std::time::Instant;

use tch::{Kind, Tensor};
use troupe_common::collective::CollectiveOp;
use troupe_common::model;
use troupe_common::model::precision::with_autocast;

use super::ddp::Ddp;
use super::state::param_views;
use super::{host_vec, write_into, Batch, LossShare, StepContext, Times, TrainerError};
use crate::comm::{Comm, Pending};

/// The canonical name of the token embedding, which the head reuses (weight tying).
const WTE: &str = "transformer.wte.weight";

impl Ddp {
    /// The backward pass of one step with each stage's gradient all-reduced as soon as it is
    /// final (see the module docs). Returns the summed gradient, clipped (also written into a
    /// flat tensor for the update), the step's loss and the gradient's norm before clipping.
    pub(super) fn backward_overlapped(
        &mut self,
        cx: &mut StepContext,
        step: u64,
        batches: &[Batch],
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<(Tensor, f64, f64), TrainerError> {
        let t = Instant::now();
        let shapes = cx.model.param_shapes();
        let numels = cx.model.param_numels();
        let offsets = &self.offsets;
        let stages = cx.model.stage_params();
        let elements = |params: &Range<usize>| offsets[params.start]..offsets[params.end];
        let names = cx.model.parameter_names();
        let wte = names
            .iter()
            .position(|n| n == WTE)
            .ok_or_else(|| TrainerError::Model(model::ModelError::InvalidArgument(format!("no {WTE} among the parameters"))))?;
        if stages[0].len() != 2 || !stages[0].contains(&wte) || stages.len() < 3 {
            return Err(TrainerError::Model(model::ModelError::InvalidArgument(format!(
                "the overlapped backward pass expects stages (wte, wpe), blocks, ln_f; got {stages:?}"
            ))));
        }

        // The micro-batches but the last: one whole backward pass each, as without overlap.
        let (last, earlier) = batches.split_last().expect("the caller passes micro-batches");
        let leaf = self.full.f_detach()?.f_set_requires_grad(true)?;
        let mut share = LossShare::default();
        if !earlier.is_empty() {
            let step_model = cx.model.with_tensors(param_views(&leaf, &shapes)?)?;
            for (x, y, weight) in earlier {
                let loss = with_autocast(cx.bf16, || step_model.loss(x, y, true));
                (&loss * *weight).f_backward()?;
                share.add(&loss, *weight)?;
            }
        }
        let earlier_grad = leaf.grad();
        drop(leaf);

        // The last micro-batch, forward stage by stage: each stage on a leaf over its part of
        // the parameters, each stage's input a leaf of its own.
        let stage_leaves: Vec<Tensor> = stages
            .iter()
            .map(|r| {
                let range = elements(r);
                self.full.f_narrow(0, range.start as i64, range.len() as i64)?.f_detach()?.f_set_requires_grad(true)
            })
            .collect::<Result<_, _>>()?;
        let stage_views: Vec<Vec<Tensor>> =
            stages.iter().zip(&stage_leaves).map(|(r, l)| param_views(l, &shapes[r.clone()])).collect::<Result<_, _>>()?;
        let head_wte = self.full.f_narrow(0, offsets[wte] as i64, numels[wte] as i64)?.f_detach()?.f_set_requires_grad(true)?;
        let (x, y, weight) = last;
        let embed = &stage_views[0];
        let (wte_local, wpe_local) = (wte - stages[0].start, 1 - (wte - stages[0].start));
        let mut outputs = vec![with_autocast(cx.bf16, || cx.model.embed_stage(&embed[wte_local], &embed[wpe_local], x, true))];
        let mut inputs = Vec::with_capacity(stages.len());
        for views in &stage_views[1..stages.len() - 1] {
            let input = outputs.last().expect("the embeddings' output").f_detach()?.f_set_requires_grad(true)?;
            outputs.push(with_autocast(cx.bf16, || cx.model.block_stage(views, &input, true)));
            inputs.push(input);
        }
        let head_input = outputs.last().expect("the last block's output").f_detach()?.f_set_requires_grad(true)?;
        let head_view = head_wte.f_view(shapes[wte].as_slice())?;
        let loss = with_autocast(cx.bf16, || cx.model.head_loss_stage(&head_view, &stage_views[stages.len() - 1], &head_input, y));
        (&loss * *weight).f_backward()?;
        share.add(&loss, *weight)?;
        let loss_share = share.value()?;
        cx.local.set_loss_share(loss_share);

        // Backward from the head down; each stage's gradient leaves as soon as it is final.
        let mut pending: Vec<(Range<usize>, bool, Pending)> = Vec::with_capacity(stages.len());
        let mut send = |cx: &mut StepContext, range: Range<usize>, grad: Tensor, extra: Option<f32>| -> Result<(), TrainerError> {
            let grad = match grad.defined() {
                true => grad,
                // Nothing flowed into this stage (it cannot happen in a GPT, but a zero is right).
                false => Tensor::f_zeros([range.len() as i64], (Kind::Float, cx.device))?,
            };
            let grad = match earlier_grad.defined() {
                // As autograd accumulates: the earlier micro-batches' gradient plus this one's.
                true => earlier_grad.f_narrow(0, range.start as i64, range.len() as i64)?.f_add(&grad)?,
                false => grad,
            };
            cx.note_local_grad(step, &grad)?;
            let mut values = host_vec(&grad);
            values.extend(extra);
            let tag = cx.next_tag(step);
            pending.push((range, extra.is_some(), comm.start(CollectiveOp::AllReduce, values, tag)));
            Ok(())
        };
        let head = stages.len() - 1;
        send(cx, elements(&stages[head]), stage_leaves[head].grad(), Some(loss_share as f32))?;
        let mut upstream = head_input.grad();
        for unit in (1..head).rev() {
            outputs[unit].f_mul(&upstream)?.f_sum(Kind::Float)?.f_backward()?;
            upstream = inputs[unit - 1].grad();
            send(cx, elements(&stages[unit]), stage_leaves[unit].grad(), None)?;
        }
        outputs[0].f_mul(&upstream)?.f_sum(Kind::Float)?.f_backward()?;
        // The token embedding's two contributions, summed as autograd sums them, then the rest.
        let embed_grad = stage_leaves[0].grad().f_contiguous()?;
        let at = (offsets[wte] - offsets[stages[0].start]) as i64;
        let wte_part = embed_grad.f_narrow(0, at, numels[wte] as i64)?;
        let summed = wte_part.f_add(&head_wte.grad())?;
        wte_part.shallow_clone().f_copy_(&summed)?;
        send(cx, elements(&stages[0]), embed_grad, None)?;
        drop((outputs, inputs, stage_views, stage_leaves));
        times.compute += t.elapsed().as_secs_f64();

        // What is left of the communication once the backward pass is done.
        let t = Instant::now();
        let mut flat = vec![0f32; *offsets.last().unwrap_or(&0)];
        let mut loss = f64::NAN;
        for (range, carries_loss, started) in pending {
            let mut values = started.wait().map_err(|error| TrainerError::Collective { step, error })?;
            if carries_loss {
                loss = values.pop().map_or(f64::NAN, f64::from);
            }
            if values.len() != range.len() {
                return Err(TrainerError::Model(model::ModelError::LengthMismatch {
                    what: "reduced gradient bucket",
                    expected: range.len(),
                    found: values.len(),
                }));
            }
            flat[range].copy_from_slice(&values);
        }
        times.comm += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let norm = model::flat_grad_norm(&flat, &numels);
        model::clip_flat(&mut flat, norm, cx.config.train.grad_clip);
        let grad = Tensor::f_empty([flat.len() as i64], (Kind::Float, cx.device))?;
        write_into(&grad, &flat)?;
        times.compute += t.elapsed().as_secs_f64();
        Ok((grad, loss, norm))
    }
}
