//! Inference with a trained [`Gpt`]: batched next-token logits, a key/value cache for
//! incremental decoding (what `troupe serve` runs), sampling, and log-probabilities (scoring
//! a text, as evaluation tools do through `echo` and `logprobs`).

use super::gpt::Gpt;
use super::rng::Rng;
use super::{ModelError, Result};
use tch::{Device, Kind, Tensor};

/// Keys and values of past positions, for a fixed number of sequences ("slots"), so that
/// generating a token computes one position instead of the whole context again.
///
/// Per layer it holds [slots, n_head, block_size, head_dim] keys and values, allocated once.
/// [`Gpt::prefill`] fills a slot from a context; [`Gpt::decode`] adds one token to each of
/// several slots at their own positions, in one batched pass.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Positions filled, per slot.
    filled: Vec<usize>,
}

impl KvCache {
    pub fn slots(&self) -> usize {
        self.filled.len()
    }

    /// Positions of `slot` that hold keys and values.
    pub fn filled(&self, slot: usize) -> usize {
        self.filled[slot]
    }
}

impl Gpt {
    /// The next-token logits of several contexts at once, one row of `vocab_size` per context:
    /// one forward pass for the whole batch (what a serving replica does per decoding step).
    ///
    /// Contexts of different lengths are padded on the right; attention is causal, so padding
    /// never reaches the positions that are read. Each context is cropped to its last
    /// `block_size` tokens. Token ids must be in the vocabulary (callers validate prompts).
    pub fn next_token_logits(&self, contexts: &[&[i64]]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.cfg.vocab_size;
        if contexts.is_empty() {
            return Ok(Vec::new());
        }
        let cropped: Vec<&[i64]> = contexts.iter().map(|c| &c[c.len().saturating_sub(self.cfg.block_size)..]).collect();
        if let Some(bad) = cropped.iter().flat_map(|c| c.iter()).find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(ModelError::InvalidArgument(format!("token {bad} is outside the vocabulary [0, {vocab})")));
        }
        if cropped.iter().any(|c| c.is_empty()) {
            return Err(ModelError::InvalidArgument("every context must hold at least one token".into()));
        }
        let width = cropped.iter().map(|c| c.len()).max().unwrap_or(1);
        let mut padded = vec![0i64; cropped.len() * width];
        let mut last = Vec::with_capacity(cropped.len());
        for (row, c) in cropped.iter().enumerate() {
            padded[row * width..row * width + c.len()].copy_from_slice(c);
            last.push((row * width + c.len() - 1) as i64);
        }
        let _no_grad = tch::no_grad_guard();
        let idx = Tensor::f_from_slice(&padded)?.f_view([cropped.len() as i64, width as i64])?;
        let hidden = self.hidden(&idx, false); // [B, T, C]
        let c = self.cfg.n_embd as i64;
        let rows = Tensor::f_from_slice(&last)?.f_to_device(self.device)?;
        let picked = hidden.f_view([-1, c])?.f_index_select(0, &rows)?; // [B, C]
        let logits = picked.f_linear(&self.wte, None::<Tensor>)?;
        let logits = logits.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let mut flat = vec![0f32; cropped.len() * vocab];
        let n = flat.len();
        logits.f_copy_data(&mut flat, n)?;
        Ok(flat.chunks(vocab).map(|r| r.to_vec()).collect())
    }

    /// A KV cache for `slots` sequences of up to `block_size` positions.
    pub fn kv_cache(&self, slots: usize) -> Result<KvCache> {
        let (h, t, d) = (self.cfg.n_head as i64, self.cfg.block_size as i64, self.cfg.head_dim() as i64);
        let zeros = || Tensor::f_zeros([slots as i64, h, t, d], (Kind::Float, self.device));
        let mut keys = Vec::with_capacity(self.h.len());
        let mut values = Vec::with_capacity(self.h.len());
        for _ in &self.h {
            keys.push(zeros()?);
            values.push(zeros()?);
        }
        Ok(KvCache { keys, values, filled: vec![0; slots] })
    }

    /// Runs a whole context (at most `block_size` tokens) through the model for `slot`,
    /// replacing what the slot held, and returns the next-token logits.
    pub fn prefill(&self, cache: &mut KvCache, slot: usize, context: &[i64]) -> Result<Vec<f32>> {
        let vocab = self.cfg.vocab_size;
        if context.is_empty() || context.len() > self.cfg.block_size || slot >= cache.slots() {
            return Err(ModelError::InvalidArgument(format!(
                "prefill needs 1..={} tokens and a slot below {} (got {} tokens, slot {slot})",
                self.cfg.block_size,
                cache.slots(),
                context.len()
            )));
        }
        if let Some(bad) = context.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(ModelError::InvalidArgument(format!("token {bad} is outside the vocabulary [0, {vocab})")));
        }
        let _no_grad = tch::no_grad_guard();
        let t = context.len() as i64;
        let idx = Tensor::f_from_slice(context)?.f_view([1, t])?;
        let mut x = self.embed(&idx, &Tensor::f_arange(t, (Kind::Int64, self.device))?);
        for (layer, block) in self.h.iter().enumerate() {
            let (y, k, v) = block.forward_with_kv(&x, false);
            cache.keys[layer].f_get(slot as i64)?.f_narrow(1, 0, t)?.f_copy_(&k.f_squeeze_dim(0)?)?;
            cache.values[layer].f_get(slot as i64)?.f_narrow(1, 0, t)?.f_copy_(&v.f_squeeze_dim(0)?)?;
            x = y;
        }
        cache.filled[slot] = context.len();
        let last = self.ln_f.forward(&x).f_select(1, -1)?.f_linear(&self.wte, None::<Tensor>)?;
        let last = last.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let mut row = vec![0f32; vocab];
        last.f_copy_data(&mut row, vocab)?;
        Ok(row)
    }

    /// Appends one token to each of `slots` (each at its own next position) in one batched
    /// pass, and returns each one's next-token logits. A slot must have room: fewer than
    /// `block_size` positions filled (callers re-prefill a sliding window past that).
    pub fn decode(&self, cache: &mut KvCache, slots: &[usize], tokens: &[i64]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.cfg.vocab_size;
        if slots.len() != tokens.len() {
            return Err(ModelError::LengthMismatch { what: "decode tokens", expected: slots.len(), found: tokens.len() });
        }
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        for (&slot, &token) in slots.iter().zip(tokens) {
            if slot >= cache.slots() || cache.filled[slot] == 0 || cache.filled[slot] >= self.cfg.block_size {
                return Err(ModelError::InvalidArgument(format!("slot {slot} cannot take another position")));
            }
            if token < 0 || token as usize >= vocab {
                return Err(ModelError::InvalidArgument(format!("token {token} is outside the vocabulary [0, {vocab})")));
            }
        }
        let _no_grad = tch::no_grad_guard();
        let b = slots.len() as i64;
        let positions: Vec<i64> = slots.iter().map(|&s| cache.filled[s] as i64).collect();
        let width = positions.iter().max().copied().unwrap_or(0) + 1;
        let slot_ids: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let slot_t = Tensor::f_from_slice(&slot_ids)?.f_to_device(self.device)?;
        let pos_t = Tensor::f_from_slice(&positions)?.f_to_device(self.device)?;
        let idx = Tensor::f_from_slice(tokens)?.f_view([b, 1])?;
        let mut x = self.embed(&idx, &pos_t.f_view([b, 1])?);
        for (layer, block) in self.h.iter().enumerate() {
            x = block.decode(&x, &mut cache.keys[layer], &mut cache.values[layer], &slot_t, &pos_t, width)?;
        }
        for &slot in slots {
            cache.filled[slot] += 1;
        }
        let logits = self.ln_f.forward(&x).f_view([b, -1])?.f_linear(&self.wte, None::<Tensor>)?;
        let logits = logits.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let mut flat = vec![0f32; slots.len() * vocab];
        let n = flat.len();
        logits.f_copy_data(&mut flat, n)?;
        Ok(flat.chunks(vocab).map(|r| r.to_vec()).collect())
    }

    /// Continues `prompt` by `max_new_tokens` tokens and returns only the new ones.
    ///
    /// The context is cropped to the last `block_size` tokens. `temperature` 0 picks the most
    /// likely token (greedy); otherwise tokens are sampled from softmax(logits / temperature),
    /// restricted to the `top_k` most likely when given (`Some(0)` means no restriction).
    /// Sampling uses its own generator seeded by `seed`: the same inputs give the same tokens.
    /// Prompts come from users, so bad ones are errors, not panics.
    pub fn generate(&self, prompt: &[i64], max_new_tokens: usize, temperature: f64, top_k: Option<usize>, seed: u64) -> Result<Vec<i64>> {
        let vocab = self.cfg.vocab_size;
        if prompt.is_empty() {
            return Err(ModelError::InvalidArgument("the prompt must hold at least one token".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(ModelError::InvalidArgument(format!("prompt token {bad} is outside the vocabulary [0, {vocab})")));
        }
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ModelError::InvalidArgument(format!("temperature {temperature} must be a finite number >= 0")));
        }
        let _no_grad = tch::no_grad_guard();
        let mut rng = Rng::new(seed);
        let mut tokens = prompt.to_vec();
        let mut out = Vec::with_capacity(max_new_tokens);
        let mut row = vec![0f32; vocab];
        for _ in 0..max_new_tokens {
            let start = tokens.len().saturating_sub(self.cfg.block_size);
            let ctx = Tensor::f_from_slice(&tokens[start..])?.f_view([1, -1])?;
            let last = self.forward(&ctx, false).f_select(1, -1)?.f_select(0, 0)?;
            let last = last.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
            last.f_copy_data(&mut row, vocab)?;
            let next = sample(&row, temperature, top_k, 1.0, &mut rng) as i64;
            tokens.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Index of the largest logit (the first one on ties; NaNs never win).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// How the next token is chosen from a row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (the most likely token); otherwise softmax(logits / temperature).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// reaches `top_p` (1.0: all).
    pub top_p: f64,
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: None, top_p: 1.0 }
    }

    /// Picks a token from one row of logits. Degenerate rows (NaN, infinities) fall back to
    /// the greedy choice rather than failing.
    pub fn pick(&self, logits: &[f32], rng: &mut Rng) -> usize {
        sample(logits, self.temperature, self.top_k, self.top_p, rng)
    }
}

/// Picks the next token from one row of logits (see [`Sampling`]).
fn sample(logits: &[f32], temperature: f64, top_k: Option<usize>, top_p: f64, rng: &mut Rng) -> usize {
    if temperature == 0.0 {
        return argmax(logits);
    }
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let mut threshold = match top_k {
        Some(k) if k > 0 && k < scaled.len() => {
            // The k-th largest logit, in linear time (a serving step does this per sequence).
            let mut values = scaled.clone();
            let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        }
        _ => f64::NEG_INFINITY,
    };
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if top_p < 1.0 && max.is_finite() {
        // The smallest prefix of the sorted distribution whose mass reaches top_p; its last
        // logit is the new threshold (ties at the threshold are all kept).
        let mut kept: Vec<f64> = scaled.iter().copied().filter(|&s| s >= threshold).collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = kept.iter().map(|&s| (s - max).exp()).sum();
        let mut mass = 0.0;
        for &s in &kept {
            mass += (s - max).exp();
            if mass >= top_p * total {
                threshold = threshold.max(s);
                break;
            }
        }
    }
    // Unnormalised softmax over the kept tokens; subtracting the max avoids overflow.
    let weights: Vec<f64> = scaled.iter().map(|&s| if s >= threshold { (s - max).exp() } else { 0.0 }).collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax(logits); // degenerate logits (NaN/inf): fall back to greedy
    }
    let mut u = rng.next_f64() * total;
    let mut last_kept = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if u < w {
                return i;
            }
            u -= w;
            last_kept = i;
        }
    }
    last_kept // only reached through rounding at the very top of the range
}

/// How likely one token was, and the likeliest alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogProb {
    pub id: u32,
    pub logprob: f32,
    /// The `top` likeliest tokens there, likeliest first.
    pub top: Vec<(u32, f32)>,
}

/// Natural-log probabilities of a row of logits (log-softmax), over its first `vocab_limit`
/// entries (a padded vocabulary's extra ids are not tokens), computed in f64.
pub fn log_probs(logits: &[f32], vocab_limit: usize) -> Vec<f32> {
    let row = &logits[..vocab_limit.min(logits.len())];
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    row.iter().map(|&x| (x as f64 - log_z) as f32).collect()
}

/// The score of token `id` in a row of log-probabilities, with the `top` likeliest.
pub fn score(log_probs: &[f32], id: u32, top: usize) -> TokenLogProb {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &lp) in log_probs.iter().enumerate() {
            if best.len() < top || lp > best[best.len() - 1].1 {
                let at = best.partition_point(|b| b.1 >= lp);
                best.insert(at, (i as u32, lp));
                best.truncate(top);
            }
        }
    }
    TokenLogProb { id, logprob: log_probs.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY), top: best }
}

impl Gpt {
    /// How likely each token of `tokens` is given the ones before it (positions 1.., so one
    /// fewer than `tokens`), with the `top` likeliest alternatives at each, from one forward
    /// pass over at most `block_size` tokens.
    pub fn score_tokens(&self, tokens: &[i64], top: usize, vocab_limit: usize) -> Result<Vec<TokenLogProb>> {
        let vocab = self.config().vocab_size;
        if tokens.is_empty() || tokens.len() > self.config().block_size {
            return Err(ModelError::InvalidArgument(format!(
                "scoring needs 1..={} tokens, got {}",
                self.config().block_size,
                tokens.len()
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(ModelError::InvalidArgument(format!("token {bad} is outside the vocabulary [0, {vocab})")));
        }
        let _no_grad = tch::no_grad_guard();
        let t = tokens.len() as i64;
        let idx = Tensor::f_from_slice(tokens)?.f_view([1, t])?.f_to_device(self.device())?;
        let logits = self.forward(&idx, false).f_squeeze_dim(0)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let flat: Vec<f32> = Vec::<f32>::try_from(logits.f_view([-1])?)?;
        let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
        for (pos, next) in tokens.iter().enumerate().skip(1) {
            let row = &flat[(pos - 1) * vocab..pos * vocab];
            out.push(score(&log_probs(row, vocab_limit), *next as u32, top));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod log_prob_tests {
    #[test]
    fn log_probs_sum_to_one_and_the_top_are_ordered() {
        let lp = super::log_probs(&[1.0, 3.0, 2.0, 0.5, 9.0], 4);
        assert_eq!(lp.len(), 4, "the padded id is left out");
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let s = super::score(&lp, 0, 2);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((s.logprob - lp[0]).abs() < 1e-9);
    }
}
