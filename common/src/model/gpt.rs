//! A GPT-2 style language model (decoder-only transformer) in tch.
//!
//! Structure and parameter names follow Hugging Face's `GPT2LMHeadModel`, so files written by
//! [`Gpt::save_safetensors`] load there unchanged:
//!
//! ```text
//! transformer.wte.weight [vocab, C]            token embedding, also the lm_head (tied)
//! transformer.wpe.weight [block, C]            position embedding
//! transformer.h.{i}.ln_1.{weight,bias}         pre-attention LayerNorm
//! transformer.h.{i}.attn.c_attn.{weight,bias}  q, k, v projections in one matrix
//! transformer.h.{i}.attn.c_proj.{weight,bias}  attention output projection
//! transformer.h.{i}.ln_2.{weight,bias}         pre-MLP LayerNorm
//! transformer.h.{i}.mlp.c_fc.{weight,bias}     C -> 4C
//! transformer.h.{i}.mlp.c_proj.{weight,bias}   4C -> C
//! transformer.ln_f.{weight,bias}               final LayerNorm
//! ```
//!
//! Inference (the KV cache, batched decoding, sampling) is in [`super::inference`].

use super::rng::Rng;
use super::{ModelError, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};
use troupe_core::config::ModelConfig;

/// GPT-2 and nanoGPT both use this LayerNorm epsilon.
const LN_EPS: f64 = 1e-5;
/// Standard deviation of every initial weight (GPT-2's `initializer_range`).
const INIT_STD: f64 = 0.02;

/// Shape of the network. Serialized next to saved weights so they can be rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length in tokens (number of learned positions).
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub dropout: f64,
    /// Biases in linear layers and LayerNorms (GPT-2 has them; Hugging Face needs them).
    pub bias: bool,
}

impl GptConfig {
    pub fn from_model_config(model: &ModelConfig, vocab_size: usize) -> GptConfig {
        GptConfig {
            vocab_size,
            block_size: model.block_size,
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_embd: model.n_embd,
            dropout: model.dropout,
            bias: model.bias,
        }
    }

    /// Checks the sizes; a config read from a file must pass this before it builds a model.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        // Cap sizes so that every product below fits comfortably in i64 and memory.
        let limit = 1usize << 24;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 || v > limit {
                return fail(format!("{field} = {v} must be between 1 and {limit}"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return fail(format!("n_embd = {} must be a multiple of n_head = {}", self.n_embd, self.n_head));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return fail(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The matching Hugging Face `config.json` (`GPT2Config`). With it next to a saved
    /// `model.safetensors`, `GPT2LMHeadModel.from_pretrained(dir)` reproduces this model's logits
    /// (same GELU approximation, LayerNorm epsilon and tied head). Needs `bias = true`.
    pub fn to_hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": LN_EPS,
            "initializer_range": INIT_STD,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        })
    }
}

/// One trainable tensor with its Hugging Face name.
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) tensor: Tensor,
    /// A weight of what Hugging Face implements as `Conv1D`: stored transposed in files.
    pub(crate) conv1d: bool,
    /// Its shape, kept apart from the tensor: under ZeRO-3 the tensor's storage is released.
    shape: Vec<i64>,
}

impl Param {
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }
}

pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    n: i64,
}

impl LayerNorm {
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.n], Some(&self.weight), self.bias.as_ref(), LN_EPS, true)
    }
}

struct CausalSelfAttention {
    /// Queries, keys and values for all heads in one matmul: [3C, C].
    c_attn: nn::Linear,
    c_proj: nn::Linear,
    n_head: i64,
    dropout: f64,
}

impl CausalSelfAttention {
    /// The forward pass, also returning this layer's keys and values [B, n_head, T, head_dim]
    /// (what a KV cache keeps).
    fn forward_with_kv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t, c) = dims3(x);
        let qkv = self.c_attn.forward(x).split(c, 2);
        // [B, T, C] -> [B, n_head, T, head_dim]: attention runs per head.
        let heads = |z: &Tensor| z.view([b, t, self.n_head, c / self.n_head]).transpose(1, 2);
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        let attn_dropout = if train { self.dropout } else { 0.0 };
        // libtorch picks a fused kernel (flash attention on CPU); is_causal masks the future.
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, attn_dropout, true, None, false);
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        (dropout(self.c_proj.forward(&y), self.dropout, train), k, v)
    }

    /// One new position per sequence, attending to its cached keys and values. `x` is
    /// [B, 1, C]; `slots` [B] and `positions` [B] say where each sequence's keys live and
    /// where the new one goes; `keys`/`values` are the layer's cache [slots, H, T, D].
    fn decode(&self, x: &Tensor, keys: &mut Tensor, values: &mut Tensor, slots: &Tensor, positions: &Tensor, width: i64) -> Result<Tensor> {
        let (b, _, c) = dims3(x);
        let qkv = self.c_attn.forward(x).split(c, 2);
        let heads = |z: &Tensor| z.view([b, 1, self.n_head, c / self.n_head]).transpose(1, 2);
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        // Store the new key and value at (slot, :, position): indexing dims 0 and 2 with [B]
        // tensors addresses [B, H, D] values.
        let at = [Some(slots.shallow_clone()), None, Some(positions.shallow_clone())];
        let _ = keys.f_index_put_(&at, &k.f_squeeze_dim(2)?, false)?;
        let _ = values.f_index_put_(&at, &v.f_squeeze_dim(2)?, false)?;
        // Each sequence attends to positions 0..=its own (the rest of the width is padding).
        let past_k = keys.f_narrow(2, 0, width)?.f_index_select(0, slots)?;
        let past_v = values.f_narrow(2, 0, width)?.f_index_select(0, slots)?;
        let mask =
            Tensor::f_arange(width, (Kind::Int64, x.device()))?.f_view([1, 1, 1, width])?.f_le_tensor(&positions.f_view([b, 1, 1, 1])?)?;
        let y = Tensor::f_scaled_dot_product_attention(&q, &past_k, &past_v, Some(mask), 0.0, false, None, false)?;
        let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, 1, c])?;
        Ok(self.c_proj.forward(&y))
    }
}

struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    dropout: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // The tanh approximation is GPT-2's "gelu_new": Hugging Face computes the same function.
        let h = self.c_fc.forward(x).gelu("tanh");
        dropout(self.c_proj.forward(&h), self.dropout, train)
    }
}

pub(super) struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with_kv(x, train).0
    }

    /// The forward pass, also returning the attention's keys and values (a KV cache keeps them).
    pub(super) fn forward_with_kv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let (y, k, v) = self.attn.forward_with_kv(&self.ln_1.forward(x), train);
        let x = x + y;
        (&x + self.mlp.forward(&self.ln_2.forward(&x), train), k, v)
    }

    /// One new position per sequence against the cache (see [`CausalSelfAttention::decode`]).
    pub(super) fn decode(
        &self,
        x: &Tensor,
        keys: &mut Tensor,
        values: &mut Tensor,
        slots: &Tensor,
        positions: &Tensor,
        width: i64,
    ) -> Result<Tensor> {
        let x = x + self.attn.decode(&self.ln_1.forward(x), keys, values, slots, positions, width)?;
        Ok(&x + self.mlp.forward(&self.ln_2.forward(&x), false))
    }
}

/// The GPT language model. Parameters live in a `VarStore` under their Hugging Face names.
pub struct Gpt {
    pub(super) cfg: GptConfig,
    pub(super) device: Device,
    pub(super) vs: nn::VarStore,
    pub(super) wte: Tensor,
    pub(super) wpe: Tensor,
    pub(super) h: Vec<Block>,
    pub(super) ln_f: LayerNorm,
    /// Every parameter once, in the canonical order (see [`Gpt::parameters`]).
    pub(crate) params: Vec<Param>,
}

enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Creates parameters in canonical order, drawing initial values from one seeded stream.
struct Builder<'a> {
    /// None: every weight is zero (a model about to be loaded from a file needs no draws).
    rng: Option<Rng>,
    device: Device,
    root: nn::Path<'a>,
    params: Vec<Param>,
}

impl Builder<'_> {
    /// Adds `transformer.<path>` with its initial values.
    fn var(&mut self, path: &str, shape: &[i64], init: Init, conv1d: bool) {
        let n: i64 = shape.iter().product();
        // Values are made on the host in plain Rust (see rng.rs), then moved to the device,
        // so the same seed gives the same bits on CPU and GPU workers alike.
        let values: Vec<f32> = match init {
            Init::Normal(std) => match &mut self.rng {
                Some(rng) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
                None => vec![0.0; n as usize],
            },
            Init::Zeros => vec![0.0; n as usize],
            Init::Ones => vec![1.0; n as usize],
        };
        let t = Tensor::from_slice(&values).view(shape).to_device(self.device);
        let (dir, name) = path.rsplit_once('.').unwrap_or(("", path));
        let group = dir.split('.').filter(|s| !s.is_empty()).fold(self.root.clone(), |p, part| p / part);
        let t = group.add(name, t, true);
        self.params.push(Param { name: group.path(name), tensor: t, conv1d, shape: shape.to_vec() });
    }

    /// tch's layout: weight [out, in], so the forward pass is x @ W^T + b.
    fn linear(&mut self, path: &str, n_in: usize, n_out: usize, std: f64, bias: bool) {
        self.var(&format!("{path}.weight"), &[n_out as i64, n_in as i64], Init::Normal(std), true);
        if bias {
            self.var(&format!("{path}.bias"), &[n_out as i64], Init::Zeros, false);
        }
    }

    fn layer_norm(&mut self, path: &str, n: usize, bias: bool) {
        self.var(&format!("{path}.weight"), &[n as i64], Init::Ones, false);
        if bias {
            self.var(&format!("{path}.bias"), &[n as i64], Init::Zeros, false);
        }
    }
}

/// Hands out tensors in canonical order to the structs that compute with them.
struct Take<'a> {
    tensors: std::slice::Iter<'a, Tensor>,
    bias: bool,
}

impl Take<'_> {
    fn next(&mut self) -> Tensor {
        self.tensors.next().expect("checked: one tensor per parameter").shallow_clone()
    }
    fn maybe(&mut self) -> Option<Tensor> {
        self.bias.then(|| self.next())
    }
    fn linear(&mut self) -> nn::Linear {
        let ws = self.next();
        nn::Linear { ws, bs: self.maybe() }
    }
    fn layer_norm(&mut self, n: usize) -> LayerNorm {
        let weight = self.next();
        LayerNorm { weight, bias: self.maybe(), n: n as i64 }
    }
    fn block(&mut self, cfg: &GptConfig) -> Block {
        let c = cfg.n_embd;
        let ln_1 = self.layer_norm(c);
        let attn = CausalSelfAttention { c_attn: self.linear(), c_proj: self.linear(), n_head: cfg.n_head as i64, dropout: cfg.dropout };
        let ln_2 = self.layer_norm(c);
        let mlp = Mlp { c_fc: self.linear(), c_proj: self.linear(), dropout: cfg.dropout };
        Block { ln_1, attn, ln_2, mlp }
    }
}

impl Gpt {
    /// Builds a model with GPT-2's initialisation: weights ~ N(0, 0.02), the two residual
    /// projections of each block ~ N(0, 0.02 / sqrt(2 n_layer)) (so the residual stream's variance
    /// does not grow with depth), zero biases, LayerNorm weights 1. The same seed gives
    /// bit-identical parameters in every process, on any device.
    pub fn new(cfg: &GptConfig, device: Device, seed: i64) -> Result<Gpt> {
        Gpt::build(cfg, device, Some(Rng::new(seed as u64)))
    }

    /// A model of this shape whose weights are zero (no random draws: about a second less per
    /// 100 M parameters), for loading weights into right away.
    pub fn for_loading(cfg: &GptConfig, device: Device) -> Result<Gpt> {
        Gpt::build(cfg, device, None)
    }

    fn build(cfg: &GptConfig, device: Device, rng: Option<Rng>) -> Result<Gpt> {
        cfg.validate()?;
        let c = cfg.n_embd;
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "transformer";
        let mut b = Builder { rng, device, root, params: Vec::new() };
        let resid_std = INIT_STD / ((2 * cfg.n_layer) as f64).sqrt();
        b.var("wte.weight", &[cfg.vocab_size as i64, c as i64], Init::Normal(INIT_STD), false);
        b.var("wpe.weight", &[cfg.block_size as i64, c as i64], Init::Normal(INIT_STD), false);
        for i in 0..cfg.n_layer {
            b.layer_norm(&format!("h.{i}.ln_1"), c, cfg.bias);
            b.linear(&format!("h.{i}.attn.c_attn"), c, 3 * c, INIT_STD, cfg.bias);
            b.linear(&format!("h.{i}.attn.c_proj"), c, c, resid_std, cfg.bias);
            b.layer_norm(&format!("h.{i}.ln_2"), c, cfg.bias);
            b.linear(&format!("h.{i}.mlp.c_fc"), c, 4 * c, INIT_STD, cfg.bias);
            b.linear(&format!("h.{i}.mlp.c_proj"), 4 * c, c, resid_std, cfg.bias);
        }
        b.layer_norm("ln_f", c, cfg.bias);
        let params = std::mem::take(&mut b.params);
        drop(b);
        Ok(Gpt::assemble(cfg, device, vs, params))
    }

    /// The network's structs over `params` (canonical order, shapes already checked).
    fn assemble(cfg: &GptConfig, device: Device, vs: nn::VarStore, params: Vec<Param>) -> Gpt {
        let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.shallow_clone()).collect();
        let mut take = Take { tensors: tensors.iter(), bias: cfg.bias };
        let wte = take.next();
        let wpe = take.next();
        let h = (0..cfg.n_layer).map(|_| take.block(cfg)).collect();
        let ln_f = take.layer_norm(cfg.n_embd);
        Gpt { cfg: cfg.clone(), device, vs, wte, wpe, h, ln_f, params }
    }

    /// The same network computing with `tensors` instead of its own parameters: one per
    /// parameter, canonical order, same shapes (views into a flat buffer, typically). The
    /// returned model shares those tensors; gradients flow back into them.
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> Result<Gpt> {
        if tensors.len() != self.params.len() {
            return Err(ModelError::LengthMismatch { what: "parameter tensors", expected: self.params.len(), found: tensors.len() });
        }
        let mut params = Vec::with_capacity(tensors.len());
        for (p, t) in self.params.iter().zip(tensors) {
            if t.size() != p.shape() {
                return Err(ModelError::InvalidArgument(format!("{} must have shape {:?}, got {:?}", p.name, p.shape(), t.size())));
            }
            params.push(Param { name: p.name.clone(), tensor: t, conv1d: p.conv1d, shape: p.shape() });
        }
        Ok(Gpt::assemble(&self.cfg, self.device, nn::VarStore::new(self.device), params))
    }

    /// Parameter index ranges (canonical order) of the stages the forward pass runs through:
    /// the embeddings (wte, wpe), each block, the final LayerNorm. ZeRO-3 gathers one stage's
    /// parameters at a time.
    pub fn stage_params(&self) -> Vec<std::ops::Range<usize>> {
        // A parameter's stage, from its name: transformer.h.<i>.… is block i's.
        let stage = |name: &str| match name.strip_prefix("transformer.h.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok()) {
            Some(block) => 1 + block,
            None if name.starts_with("transformer.ln_f.") => 1 + self.cfg.n_layer,
            None => 0,
        };
        let mut out: Vec<std::ops::Range<usize>> = Vec::with_capacity(self.cfg.n_layer + 2);
        for (i, p) in self.params.iter().enumerate() {
            let k = stage(&p.name);
            match out.get_mut(k) {
                Some(range) => range.end = i + 1,
                None => {
                    debug_assert_eq!(k, out.len(), "parameters come in stage order");
                    out.push(i..i + 1)
                }
            }
        }
        out
    }

    /// Stage 0: token plus position embeddings of `idx` [B, T] (with dropout when training).
    pub fn embed_stage(&self, wte: &Tensor, wpe: &Tensor, idx: &Tensor, train: bool) -> Tensor {
        let pos = Tensor::arange(idx.size()[1], (Kind::Int64, self.device));
        dropout(self.embed_with(wte, wpe, idx, &pos), self.cfg.dropout, train)
    }

    /// A block's forward pass with `tensors` (that block's parameters, canonical order).
    pub fn block_stage(&self, tensors: &[Tensor], x: &Tensor, train: bool) -> Tensor {
        Take { tensors: tensors.iter(), bias: self.cfg.bias }.block(&self.cfg).forward(x, train)
    }

    /// The last stage: final LayerNorm (`ln_f`: its parameters), the tied head `wte`, and the
    /// mean cross-entropy against `targets` [B, T] (as [`Gpt::loss`]).
    pub fn head_loss_stage(&self, wte: &Tensor, ln_f: &[Tensor], x: &Tensor, targets: &Tensor) -> Tensor {
        let ln = Take { tensors: ln_f.iter(), bias: self.cfg.bias }.layer_norm(self.cfg.n_embd);
        let logits = ln.forward(x).linear(wte, None::<Tensor>);
        cross_entropy(&logits, targets, self.cfg.vocab_size)
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The variables under their Hugging Face names (tch layout: linear weights are [out, in]).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Logits [B, T, vocab] for token ids `idx` [B, T] (T <= block_size). `train` turns dropout on.
    ///
    /// Panics if `idx` is not [B, T] with T <= block_size or holds ids outside the vocabulary:
    /// callers validate their data first ([`Gpt::generate`] does for user prompts).
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        let size = idx.size();
        assert!(size.len() == 2, "Gpt::forward expects token ids of shape [B, T], got {size:?}");
        let t = size[1];
        assert!(
            t >= 1 && t as usize <= self.cfg.block_size,
            "sequence length {t} must be between 1 and block_size {}",
            self.cfg.block_size
        );
        let x = self.hidden(idx, train);
        // The output head reuses the token embedding (weight tying, as in GPT-2).
        x.linear(&self.wte, None::<Tensor>)
    }

    /// Token plus position embeddings: `idx` [B, T] at `positions` ([T], or [B, T]).
    pub(super) fn embed(&self, idx: &Tensor, positions: &Tensor) -> Tensor {
        self.embed_with(&self.wte, &self.wpe, idx, positions)
    }

    /// Token plus position embeddings from the tables `wte` and `wpe`.
    fn embed_with(&self, wte: &Tensor, wpe: &Tensor, idx: &Tensor, positions: &Tensor) -> Tensor {
        // padding_idx -1: no padding token.
        let tok_emb = Tensor::embedding(wte, &idx.to_device(self.device), -1, false, false); // [B, T, C]
        tok_emb + Tensor::embedding(wpe, positions, -1, false, false)
    }

    /// The final hidden states [B, T, C] (after ln_f), before the output head.
    pub(super) fn hidden(&self, idx: &Tensor, train: bool) -> Tensor {
        let mut x = self.embed_stage(&self.wte, &self.wpe, idx, train);
        for block in &self.h {
            x = block.forward(&x, train);
        }
        self.ln_f.forward(&x)
    }

    /// Mean cross-entropy of predicting `targets` [B, T] from `idx` [B, T]. Targets equal to -1
    /// are ignored (as in nanoGPT).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        cross_entropy(&self.forward(idx, train), targets, self.cfg.vocab_size)
    }

    /// `(name, tensor)` for every parameter, in the canonical order every rank flattens gradients
    /// in: wte, wpe, then per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    /// (weight before bias), then ln_f. The tensors share storage with the model.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    /// The parameter tensors alone, in canonical order (what the gradient helpers and AdamW take).
    pub fn parameter_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.shallow_clone()).collect()
    }

    pub fn parameter_names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    /// Number of scalars in all parameters (the tied head counted once, positions included).
    pub fn num_params(&self) -> usize {
        self.param_numels().iter().sum()
    }

    /// Scalars in each parameter, canonical order.
    pub fn param_numels(&self) -> Vec<usize> {
        self.params.iter().map(|p| p.shape.iter().product::<i64>() as usize).collect()
    }

    /// Each parameter's shape, canonical order.
    pub fn param_shapes(&self) -> Vec<Vec<i64>> {
        self.params.iter().map(|p| p.shape()).collect()
    }

    /// Frees every parameter's storage (ZeRO-3 keeps only its shard and gathers stages into
    /// fresh tensors). Afterwards only [`Gpt::embed_stage`], [`Gpt::block_stage`],
    /// [`Gpt::head_loss_stage`] and the shape queries may be used.
    pub fn release_parameters(&mut self) {
        let _no_grad = tch::no_grad_guard();
        for p in &mut self.params {
            p.tensor.set_data(&Tensor::empty([0], (p.tensor.kind(), self.device)));
        }
    }
}

/// Mean cross-entropy of `logits` [B, T, vocab] against `targets` [B, T]; -1 targets ignored.
fn cross_entropy(logits: &Tensor, targets: &Tensor, vocab: usize) -> Tensor {
    let targets = targets.to_device(logits.device()).reshape([-1]);
    logits.view([-1, vocab as i64]).cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -1, 0.0)
}

fn dropout(x: Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 {
        x.dropout(p, true)
    } else {
        x
    }
}

fn dims3(x: &Tensor) -> (i64, i64, i64) {
    let s = x.size();
    (s[0], s[1], s[2])
}
