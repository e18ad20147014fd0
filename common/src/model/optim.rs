//! AdamW and the learning-rate schedule.
//!
//! AdamW is written out here rather than taken from tch because tch's optimizer hides its moment
//! estimates, and a resumed run must continue exactly where it stopped. The update is PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias correction). It uses only elementwise
//! multiply, add, divide and square root, whose results do not depend on how libtorch splits or
//! vectorises the loop, and the scalar factors are computed without libm: after the gradient
//! all-reduce every rank applies the very same update, and the replicas stay bit-identical.

use super::io::{self, Expected, RawTensor};
use super::{ModelError, Result};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;
use troupe_core::config::TrainConfig;

/// Hyper-parameters of [`AdamW`] that stay fixed for a run (the learning rate changes per step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_train_config(train: &TrainConfig) -> AdamWConfig {
        AdamWConfig { beta1: train.beta1, beta2: train.beta2, eps: train.eps, weight_decay: train.weight_decay }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Number of updates applied so far (PyTorch's `step`; drives bias correction).
    step: u64,
    /// First moment (running mean of gradients), one per parameter.
    exp_avg: Vec<Tensor>,
    /// Second moment (running mean of squared gradients), one per parameter.
    exp_avg_sq: Vec<Tensor>,
    /// Whether each parameter gets weight decay.
    decay: Vec<bool>,
}

impl AdamW {
    /// State for `params`, with weight decay on parameters of dimension >= 2 (weight matrices and
    /// embeddings) and none on biases and LayerNorm parameters, as in nanoGPT and GPT-2.
    pub fn new(params: &[Tensor], train: &TrainConfig) -> AdamW {
        let decay = params.iter().map(|p| p.dim() >= 2).collect();
        AdamW::with_decay(params, AdamWConfig::from_train_config(train), decay)
    }

    /// State for `params` with an explicit weight-decay choice per tensor (e.g. for flat shards,
    /// whose dimension no longer tells a matrix from a bias).
    pub fn with_decay(params: &[Tensor], cfg: AdamWConfig, decay: Vec<bool>) -> AdamW {
        assert_eq!(decay.len(), params.len(), "one weight-decay flag per parameter");
        let _no_grad = tch::no_grad_guard();
        AdamW {
            cfg,
            step: 0,
            exp_avg: params.iter().map(|p| p.zeros_like()).collect(),
            exp_avg_sq: params.iter().map(|p| p.zeros_like()).collect(),
            decay,
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Both moments, one tensor per parameter each (sharing storage with the state: writing
    /// into them changes the optimizer).
    pub fn moments(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        (self.exp_avg.iter().map(|t| t.shallow_clone()).collect(), self.exp_avg_sq.iter().map(|t| t.shallow_clone()).collect())
    }

    /// Sets the number of updates applied (with moments set from another replica).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    /// Which parameters get weight decay, in parameter order.
    pub fn decays(&self) -> &[bool] {
        &self.decay
    }

    /// One AdamW update of `params` (the same tensors, in the same order, as at construction)
    /// from their current gradients at learning rate `lr`. A parameter without a gradient is left
    /// alone, as in PyTorch.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        assert_eq!(params.len(), self.exp_avg.len(), "AdamW::step: parameter count changed");
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        let factors = Factors::new(&self.cfg, self.step, lr);
        for (i, p) in params.iter().enumerate() {
            let g = p.grad();
            if g.defined() {
                update(&factors, self.decay[i], p, &g, &mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            }
        }
    }

    /// The state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>` for each of `names`
    /// (the parameter names, in parameter order) and `step`, an int64 scalar.
    pub fn state_tensors<S: AsRef<str>>(&self, names: &[S]) -> Vec<(String, Tensor)> {
        assert_eq!(names.len(), self.exp_avg.len(), "one name per parameter");
        let mut out = Vec::with_capacity(2 * names.len() + 1);
        for (name, t) in names.iter().zip(&self.exp_avg) {
            out.push((format!("exp_avg.{}", name.as_ref()), t.shallow_clone()));
        }
        for (name, t) in names.iter().zip(&self.exp_avg_sq) {
            out.push((format!("exp_avg_sq.{}", name.as_ref()), t.shallow_clone()));
        }
        out.push(("step".to_string(), Tensor::from(self.step as i64)));
        out
    }

    /// The state as a safetensors file in memory (see [`AdamW::state_tensors`]).
    pub fn to_safetensors_bytes<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<u8>> {
        self.check_names(names)?;
        let mut raw = Vec::new();
        for (name, t) in self.state_tensors(names) {
            raw.push((name, RawTensor::from_tensor(&t)?));
        }
        io::serialize(raw)
    }

    pub fn save_safetensors<S: AsRef<str>>(&self, path: impl AsRef<Path>, names: &[S]) -> Result<()> {
        io::write_file(path.as_ref(), &self.to_safetensors_bytes(names)?)
    }

    /// Restores the state saved by [`AdamW::save_safetensors`] for the same parameters.
    pub fn load_safetensors<S: AsRef<str>>(&mut self, path: impl AsRef<Path>, names: &[S]) -> Result<()> {
        let path = path.as_ref();
        let bytes = io::read_file(path)?;
        self.load_safetensors_bytes(&bytes, &path.display().to_string(), names)
    }

    /// Like [`AdamW::load_safetensors`] from bytes in memory; `origin` names them in errors.
    /// Checks every name, dtype and shape first: a bad file leaves the state unchanged.
    pub fn load_safetensors_bytes<S: AsRef<str>>(&mut self, bytes: &[u8], origin: &str, names: &[S]) -> Result<()> {
        self.check_names(names)?;
        let expected: Vec<Expected> = self
            .state_tensors(names)
            .iter()
            .map(|(name, t)| Expected {
                name: name.clone(),
                dtype: if name == "step" { Dtype::I64 } else { Dtype::F32 },
                shape: t.size().iter().map(|&d| d as usize).collect(),
            })
            .collect();
        let views = io::parse_checked(bytes, origin, &expected)?;
        let n = names.len();
        let mut moments = Vec::with_capacity(2 * n);
        for (view, current) in views[..2 * n].iter().zip(self.exp_avg.iter().chain(&self.exp_avg_sq)) {
            moments.push(io::f32_tensor(view)?.f_to_device(current.device())?.f_to_kind(current.kind())?);
        }
        let step = io::i64_scalar(&views[2 * n])?;
        if step < 0 {
            return Err(ModelError::Format { origin: origin.into(), message: format!("negative step {step}") });
        }
        let _no_grad = tch::no_grad_guard();
        for (dst, src) in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()).zip(&moments) {
            dst.f_copy_(src)?;
        }
        self.step = step as u64;
        Ok(())
    }

    fn check_names<S: AsRef<str>>(&self, names: &[S]) -> Result<()> {
        if names.len() != self.exp_avg.len() {
            return Err(ModelError::LengthMismatch { what: "AdamW parameter names", expected: self.exp_avg.len(), found: names.len() });
        }
        Ok(())
    }
}

/// The parts of a flat buffer of parameters of `numels` scalars each (in order, from the start)
/// with each one's weight-decay choice: [`FlatAdamW`]'s segments for a whole model.
pub fn parameter_segments(numels: &[usize], decay: &[bool]) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut at = 0;
    numels
        .iter()
        .zip(decay)
        .map(|(&n, &d)| {
            at += n;
            (at - n..at, d)
        })
        .collect()
}

/// The scalars of AdamW update number `step` (1-based) at learning rate `lr`.
struct Factors {
    cfg: AdamWConfig,
    lr: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl Factors {
    fn new(cfg: &AdamWConfig, step: u64, lr: f64) -> Factors {
        let bias_correction1 = 1.0 - powu(cfg.beta1, step);
        let bias_correction2_sqrt = (1.0 - powu(cfg.beta2, step)).sqrt();
        Factors { cfg: *cfg, lr, step_size: lr / bias_correction1, bias_correction2_sqrt }
    }
}

/// One AdamW update of `p` in place from its gradient `g` and moments `m`, `v` (same shape).
/// In place, as PyTorch's AdamW: no temporaries but the squared gradient and the denominator
/// (each pass over a moment is a pass over the model's size in memory).
fn update(f: &Factors, decay: bool, p: &Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor) {
    let AdamWConfig { beta1, beta2, eps, weight_decay } = f.cfg;
    let mut p = p.shallow_clone();
    if decay && weight_decay != 0.0 {
        // Decoupled decay: shrink the weights directly, not through the gradient.
        let _ = p.g_mul_scalar_(1.0 - f.lr * weight_decay);
    }
    // m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    let _ = m.lerp_(g, 1.0 - beta1);
    let _ = v.lerp_(&g.square(), 1.0 - beta2);
    if f.step_size == 0.0 {
        return;
    }
    // p -= step_size m / (sqrt(v) / bias_correction2_sqrt + eps), as one addcdiv with the step
    // folded into the denominator.
    let mut denom = v.sqrt();
    let _ = denom.g_div_scalar_(f.bias_correction2_sqrt);
    let _ = denom.g_add_scalar_(eps);
    let _ = denom.g_mul_scalar_(-1.0 / f.step_size);
    let _ = p.addcdiv_(m, &denom);
}

/// AdamW over a flat buffer of parameters: the whole model under `ddp`, one rank's shard of it
/// under the ZeRO strategies. The same arithmetic as [`AdamW`], element for element, but each
/// operation runs over a large run of the buffer at once instead of one parameter at a time:
/// on a GPU over the whole buffer (about ten kernels a step, where the per-parameter loop
/// launches about ten per parameter: 1,500 for GPT-2 124M); on the CPU over chunks of 1 Mi
/// elements, which stay in the cache through the ten operations (over the whole buffer, each
/// operation streams the model through memory again: 1.4× slower than the per-parameter loop on
/// a 20M-parameter model). Every element gets [`AdamW`]'s value, bit for bit.
pub struct FlatAdamW {
    cfg: AdamWConfig,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Where weight decay applies: None when nowhere (or the weight decay is 0).
    decay: Option<Decay>,
    /// Elements per run of operations (see the type's docs).
    chunk: usize,
    /// Room for one chunk's temporaries (the squared gradient, the denominator, the decay
    /// factor), kept between steps so that a step allocates nothing.
    scratch: Tensor,
}

/// Elements per chunk on the CPU: the parameters, gradient, both moments and the scratch of a
/// chunk (5 × 4 MiB) stay in the last-level cache. Chosen by `cargo bench --bench optimizer`
/// with TROUPE_BENCH_CHUNK from 16 Ki to the whole buffer: 1 Mi was fastest on both models.
const CPU_CHUNK: usize = 1 << 20;

impl FlatAdamW {
    /// State for a flat buffer of `len` scalars on `device`; `segments` (inside it) are the
    /// parts that belong to one parameter each, with its weight-decay choice. Elements in no
    /// segment (padding) get no decay; their parameters and gradients stay zero.
    pub fn new(cfg: AdamWConfig, len: usize, segments: &[(std::ops::Range<usize>, bool)], device: tch::Device) -> FlatAdamW {
        assert!(segments.iter().all(|(r, _)| r.end <= len), "segments inside the buffer");
        let zeros = |n: usize| Tensor::zeros([n as i64], (tch::Kind::Float, device));
        let decay =
            (cfg.weight_decay != 0.0 && segments.iter().any(|(r, d)| *d && !r.is_empty())).then(|| Decay::new(len, segments, device));
        let chunk = if device.is_cuda() { len.max(1) } else { CPU_CHUNK.min(len.max(1)) };
        FlatAdamW { cfg, step: 0, exp_avg: zeros(len), exp_avg_sq: zeros(len), decay, chunk, scratch: zeros(chunk) }
    }

    /// Sets the elements per run of operations (for measuring; see the type's docs).
    pub fn set_chunk(&mut self, chunk: usize) {
        self.chunk = chunk.clamp(1, self.exp_avg.numel().max(1));
        self.scratch = Tensor::zeros([self.chunk as i64], (tch::Kind::Float, self.exp_avg.device()));
    }

    /// Applies weight decay through the GPU's per-element mask on any device (for testing that
    /// path on the CPU).
    #[cfg(test)]
    pub(crate) fn decay_by_mask(&mut self, segments: &[(std::ops::Range<usize>, bool)]) {
        if self.decay.is_some() {
            let len = self.exp_avg.numel();
            let mut mask = vec![false; len];
            for (r, d) in segments {
                mask[r.clone()].fill(*d);
            }
            self.decay = Some(Decay::Mask(Tensor::from_slice(&mask)));
        }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of `params` (the buffer, [len]) from `grads` ([len]).
    pub fn step(&mut self, params: &Tensor, grads: &Tensor, lr: f64) {
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        let f = Factors::new(&self.cfg, self.step, lr);
        let len = self.exp_avg.numel();
        let mut at = 0;
        while at < len {
            let n = self.chunk.min(len - at);
            let part = |t: &Tensor| t.narrow(0, at as i64, n as i64);
            let scratch = self.scratch.narrow(0, 0, n as i64);
            let p = part(params);
            if let Some(decay) = &self.decay {
                decay.apply(&p, at..at + n, 1.0 - f.lr * self.cfg.weight_decay, &scratch);
            }
            update_run(&f, &p, &part(grads), &part(&self.exp_avg), &part(&self.exp_avg_sq), scratch);
            at += n;
        }
    }

    /// Both moments ([len] each; writing into them changes the state).
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Sets the number of updates applied (with moments loaded from a checkpoint).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }
}

/// Where [`FlatAdamW`] applies weight decay, in the form each device handles best.
enum Decay {
    /// GPU: a per-element mask, turned into a factor each step (two kernels whatever the number
    /// of parameters).
    Mask(Tensor),
    /// CPU: the runs of decaying elements (adjacent decaying parameters merged), each scaled
    /// in place (a masked fill is not vectorised on the CPU and costs more than the update).
    Runs(Vec<std::ops::Range<usize>>),
}

impl Decay {
    fn new(len: usize, segments: &[(std::ops::Range<usize>, bool)], device: tch::Device) -> Decay {
        let mut sorted: Vec<_> = segments.iter().filter(|(r, d)| *d && !r.is_empty()).map(|(r, _)| r.clone()).collect();
        sorted.sort_by_key(|r| r.start);
        if device.is_cuda() {
            let mut mask = vec![false; len];
            for r in sorted {
                mask[r].fill(true);
            }
            return Decay::Mask(Tensor::from_slice(&mask).to_device(device));
        }
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for r in sorted {
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        }
        Decay::Runs(runs)
    }

    /// Multiplies the decaying elements of `p` (elements `range` of the buffer) by `factor`,
    /// as [`update`] does (libtorch rounds the factor to float); the others are left alone.
    fn apply(&self, p: &Tensor, range: std::ops::Range<usize>, factor: f64, scratch: &Tensor) {
        match self {
            Decay::Mask(mask) => {
                let mask = mask.narrow(0, range.start as i64, range.len() as i64);
                let (mut scratch, mut p) = (scratch.shallow_clone(), p.shallow_clone());
                let _ = scratch.fill_(1.0);
                let _ = scratch.masked_fill_(&mask, factor);
                let _ = p.g_mul_(&scratch);
            }
            Decay::Runs(runs) => {
                for r in runs {
                    let (lo, hi) = (r.start.max(range.start), r.end.min(range.end));
                    if lo < hi {
                        let _ = p.narrow(0, (lo - range.start) as i64, (hi - lo) as i64).g_mul_scalar_(factor);
                    }
                }
            }
        }
    }
}

/// [`update`] without its weight decay, on a run of a flat buffer: `p`, `g`, `m`, `v` and
/// `scratch` of one length. Each operation writes in place or into `scratch`, so nothing is
/// allocated.
fn update_run(f: &Factors, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, scratch: Tensor) {
    let AdamWConfig { beta1, beta2, eps, .. } = f.cfg;
    let (mut p, mut m, mut v, mut scratch) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone(), scratch);
    let _ = m.lerp_(g, 1.0 - beta1);
    let _ = g.square_out(&scratch);
    let _ = v.lerp_(&scratch, 1.0 - beta2);
    if f.step_size == 0.0 {
        return;
    }
    let _ = v.sqrt_out(&scratch);
    let _ = scratch.g_div_scalar_(f.bias_correction2_sqrt);
    let _ = scratch.g_add_scalar_(eps);
    let _ = scratch.g_mul_scalar_(-1.0 / f.step_size);
    let _ = p.addcdiv_(&m, &scratch);
}

/// base^n by repeated squaring: exact-rounded multiplies only, so the same on every platform.
fn powu(base: f64, mut n: u64) -> f64 {
    let (mut result, mut b) = (1.0, base);
    while n > 0 {
        if n & 1 == 1 {
            result *= b;
        }
        b *= b;
        n >>= 1;
    }
    result
}

/// cos(x) for x in [0, pi] from its Taylor series (no libm, so every rank computes the same
/// learning rate bit for bit). 18 terms put the truncation error below 1e-20 on that range.
fn portable_cos(x: f64) -> f64 {
    let x2 = x * x;
    let mut sum = 0.0;
    // Horner on sum_k (-1)^k x^(2k) / (2k)!, innermost term first.
    for k in (0..18u32).rev() {
        let (a, b) = (f64::from(2 * k + 1), f64::from(2 * k + 2));
        sum = 1.0 - x2 / (a * b) * sum;
    }
    sum
}

/// Learning rate for optimizer step `step` (0-based), as nanoGPT's `get_lr`: linear warmup from 0
/// over `warmup_steps`, then a cosine decay from `learning_rate` to `min_learning_rate` reached at
/// step `train.steps` (and held after it).
pub fn lr_at(step: u64, train: &TrainConfig) -> f64 {
    let (max_lr, min_lr) = (train.learning_rate, train.min_learning_rate);
    if step < train.warmup_steps {
        // (step + 1): the first step already learns (nanoGPT's schedule).
        return max_lr * (step + 1) as f64 / (train.warmup_steps + 1) as f64;
    }
    if step >= train.steps {
        return min_lr;
    }
    // Here warmup_steps <= step < steps, so the denominator is positive.
    let ratio = (step - train.warmup_steps) as f64 / (train.steps - train.warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + portable_cos(std::f64::consts::PI * ratio));
    // Written from the top so the peak is exactly `learning_rate` (coeff = 1 at ratio 0).
    max_lr - (1.0 - coeff) * (max_lr - min_lr)
}
