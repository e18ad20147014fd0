//! Gradient helpers for the data-parallel trainer.
//!
//! Every rank flattens its gradients in the same canonical parameter order
//! ([`super::Gpt::parameters`]), all-reduces the flat vector, and writes it back. After that the
//! ranks must stay bit-identical, so the norm here is summed on the host in a fixed order: its
//! value does not depend on libtorch's thread count or on the device.

use super::{ModelError, Result};
use tch::{Device, Kind, Tensor};

/// Total number of scalars in `params` (the length of [`flat_grads`]).
pub fn total_numel(params: &[Tensor]) -> usize {
    params.iter().map(|p| p.numel()).sum()
}

/// A parameter's gradient as a contiguous float32 host tensor, if it has one.
fn host_grad(p: &Tensor) -> Option<Tensor> {
    let g = p.grad();
    if !g.defined() {
        return None;
    }
    Some(g.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous())
}

/// All gradients concatenated in the order of `params`; a parameter without a gradient
/// contributes zeros, so the length is always [`total_numel`].
pub fn flat_grads(params: &[Tensor]) -> Vec<f32> {
    let mut out = vec![0f32; total_numel(params)];
    let mut offset = 0;
    for p in params {
        let n = p.numel();
        if let Some(g) = host_grad(p) {
            g.copy_data(&mut out[offset..offset + n], n);
        }
        offset += n;
    }
    out
}

/// Makes sure every parameter has a gradient tensor to write into: libtorch allocates them
/// lazily in backward, and tch has no setter, so a zero-valued backward creates the missing ones.
fn ensure_grads(params: &[Tensor]) -> Result<()> {
    let missing: Vec<&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    tch::with_grad(|| {
        let mut zeros = Vec::with_capacity(missing.len());
        for p in missing {
            if !p.requires_grad() {
                return Err(ModelError::InvalidArgument("cannot set the gradient of a tensor that does not require grad".into()));
            }
            zeros.push(p.f_sum(Kind::Float)?.f_mul_scalar(0.0)?.f_to_device(Device::Cpu)?);
        }
        Tensor::f_stack(&zeros, 0)?.f_sum(Kind::Float)?.f_backward()?;
        Ok(())
    })
}

/// The values of `tensors` (parameters, optimizer moments) concatenated as f32 on the host,
/// in order: what a broadcast of the training state sends.
pub fn flatten(tensors: &[Tensor]) -> Vec<f32> {
    flatten_range(tensors, 0..total_numel(tensors))
}

/// `range` of what [`flatten`] would return, copying only that range to the host (a rank's
/// shard of the state, for a checkpoint).
pub fn flatten_range(tensors: &[Tensor], range: std::ops::Range<usize>) -> Vec<f32> {
    let _no_grad = tch::no_grad_guard();
    let mut out = vec![0f32; range.len()];
    let mut offset = 0;
    for t in tensors {
        let n = t.numel();
        let (lo, hi) = (range.start.max(offset), range.end.min(offset + n));
        if lo < hi {
            let part = t.detach().reshape([-1]).narrow(0, (lo - offset) as i64, (hi - lo) as i64);
            let host = part.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            host.copy_data(&mut out[lo - range.start..hi - range.start], hi - lo);
        }
        offset += n;
    }
    out
}

/// Writes `flat` (as made by [`flatten`]) back into `tensors`, in place.
pub fn unflatten_into(tensors: &[Tensor], flat: &[f32]) -> Result<()> {
    let expected = total_numel(tensors);
    if flat.len() != expected {
        return Err(ModelError::LengthMismatch { what: "flat state", expected, found: flat.len() });
    }
    let _no_grad = tch::no_grad_guard();
    let mut offset = 0;
    for t in tensors {
        let n = t.numel();
        let values = &flat[offset..offset + n];
        if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
            // One copy straight into the tensor's memory, without a temporary tensor of its
            // size (the whole model, under zero1/2, every step).
            // SAFETY: a contiguous float32 CPU tensor of n elements owns n initialised f32s at
            // data_ptr, and the caller's thread is the only one using it during the copy.
            unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) }.copy_from_slice(values);
        } else {
            let src = Tensor::f_from_slice(values)?.f_view(t.size().as_slice())?.f_to_device(t.device())?.f_to_kind(t.kind())?;
            t.shallow_clone().f_copy_(&src)?;
        }
        offset += n;
    }
    Ok(())
}

/// Writes `flat` (as made by [`flat_grads`]) back into the gradients of `params`.
pub fn set_flat_grads(params: &[Tensor], flat: &[f32]) -> Result<()> {
    check_flat_grads_len(params, flat)?;
    ensure_grads(params)?;
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    unflatten_into(&grads, flat)
}

/// A flat gradient must hold exactly one value per parameter scalar.
fn check_flat_grads_len(params: &[Tensor], flat: &[f32]) -> Result<()> {
    let expected = total_numel(params);
    if flat.len() != expected {
        return Err(ModelError::LengthMismatch { what: "flat gradient", expected, found: flat.len() });
    }
    Ok(())
}

/// Global L2 norm of all gradients (missing ones count as zero), accumulated in f64 on the host
/// in parameter order so that every rank gets the same bits. CUDA gradients are measured where
/// they are (see [`device_grad_norm`]).
pub fn grad_norm(params: &[Tensor]) -> f64 {
    if params.first().is_some_and(|p| p.device().is_cuda()) {
        return device_grad_norm(params);
    }
    let mut sum_sq = 0f64;
    let mut buf = Vec::new();
    for p in params {
        if let Some(g) = host_grad(p) {
            let n = g.numel();
            buf.resize(n, 0f32);
            g.copy_data(&mut buf, n);
            sum_sq += sum_of_squares(&buf);
        }
    }
    sum_sq.sqrt()
}

/// The global gradient norm computed on the GPU: each parameter's sum of squares in f64, added
/// in parameter order, and one scalar copied to the host. Copying every gradient to the host
/// instead would cost more than the optimizer step on a large model. Ranks holding the same
/// (all-reduced) gradients on the same kind of GPU run the same kernels on the same values, so
/// they agree on the norm and clip alike.
fn device_grad_norm(params: &[Tensor]) -> f64 {
    let _no_grad = tch::no_grad_guard();
    let parts: Vec<Tensor> = params
        .iter()
        .filter_map(|p| {
            let g = p.grad();
            g.defined().then(|| g.detach().square().sum(Kind::Double))
        })
        .collect();
    if parts.is_empty() {
        return 0.0;
    }
    Tensor::stack(&parts, 0).sum(Kind::Double).sqrt().double_value(&[])
}

/// One parameter's share of the squared norm, in f64 and in order: the unit both norms add up,
/// so that [`grad_norm`] and [`clip_flat_grads`] agree to the bit.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    values.iter().map(|&x| (x as f64) * (x as f64)).sum()
}

/// As [`clip_grad_norm`], on gradients already flattened (and all-reduced) in the order of
/// `params`, before they are written back: the same norm and the same scaled values, bit for
/// bit, without reading the gradient tensors again.
pub fn clip_flat_grads(params: &[Tensor], flat: &mut [f32], max_norm: f64) -> Result<f64> {
    check_flat_grads_len(params, flat)?;
    let numels: Vec<usize> = params.iter().map(|p| p.numel()).collect();
    let norm = flat_grad_norm(flat, &numels);
    clip_flat(flat, norm, max_norm);
    Ok(norm)
}

/// The global norm of a flat gradient whose parameters hold `numels` scalars each, summed per
/// parameter in f64 and in order (what [`grad_norm`] computes from the tensors, bit for bit).
pub fn flat_grad_norm(flat: &[f32], numels: &[usize]) -> f64 {
    let mut sum_sq = 0f64;
    let mut offset = 0;
    for &n in numels {
        sum_sq += sum_of_squares(&flat[offset..offset + n]);
        offset += n;
    }
    sum_sq.sqrt()
}

/// Scales `flat` (a gradient, or a rank's shard of one, whose global norm is `norm`) down to
/// `max_norm`, as [`clip_scale`] says.
pub fn clip_flat(flat: &mut [f32], norm: f64, max_norm: f64) {
    if let Some(scale) = clip_scale(norm, max_norm) {
        // libtorch multiplies a float tensor by a double scalar in float, as here.
        let scale = scale as f32;
        for x in flat.iter_mut() {
            *x *= scale;
        }
    }
}

/// As [`clip_flat`], on a tensor (a rank's shard of the gradient, on any device), in place:
/// libtorch multiplies a float tensor by the scale in float, so on the CPU the values are
/// those of [`clip_flat`].
pub fn clip_tensor(t: &Tensor, norm: f64, max_norm: f64) {
    if let Some(scale) = clip_scale(norm, max_norm) {
        let _no_grad = tch::no_grad_guard();
        let _ = t.shallow_clone().g_mul_scalar_(scale);
    }
}

/// The factor that brings a gradient of global norm `norm` down to `max_norm` (PyTorch's
/// `clip_grad_norm_`, with its 1e-6 guard), or None when it needs no clipping: below the
/// threshold, clipping disabled (`max_norm` <= 0), or a non-finite norm (left for the caller).
fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm.is_finite() && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Scales all gradients so their global norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`, with its 1e-6 guard) and returns the norm before clipping.
/// `max_norm` <= 0 disables clipping. A non-finite norm leaves the gradients untouched: the
/// caller sees it and decides (skip the step, stop the run).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let norm = grad_norm(params);
    if let Some(scale) = clip_scale(norm, max_norm) {
        let _no_grad = tch::no_grad_guard();
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(scale);
            }
        }
    }
    norm
}

/// Sets every existing gradient to zero (keeps the tensors, so later writes reuse them).
pub fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}
