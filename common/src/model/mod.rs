//! The model and the optimizer math, in the spirit of nanoGPT's `model.py`.
//!
//! - [`Gpt`]: a GPT-2 style decoder in tch, parameters named as Hugging Face GPT-2 names them.
//! - [`io`]: safetensors files in Hugging Face's layout (Conv1D weights stored transposed), so a
//!   saved model loads in `transformers.GPT2LMHeadModel`.
//! - [`grads`]: gradient flattening (the unit of the data-parallel all-reduce), clipping.
//! - [`hf`]: importing a Hugging Face GPT-2 folder (the inverse of `troupe export`).
//! - [`AdamW`]: written by hand so its state can be checkpointed exactly; [`lr_at`]: the schedule.
//!
//! Nothing here depends on the rest of the crate except the config structs.

pub mod gpt;
pub mod grads;
pub mod hf;
pub mod inference;
pub mod io;
pub mod optim;
pub mod precision;
pub mod rng;

pub use gpt::{Gpt, GptConfig};
pub use grads::{
    clip_flat, clip_flat_grads, clip_grad_norm, clip_tensor, flat_grad_norm, flat_grads, flatten, flatten_range, grad_norm, set_flat_grads,
    sum_of_squares, total_numel, unflatten_into, zero_grads,
};
pub use inference::{log_probs, score, KvCache, Sampling, TokenLogProb};
pub use optim::{lr_at, parameter_segments, AdamW, AdamWConfig, FlatAdamW};
pub use rng::Rng;

use std::path::PathBuf;

/// Everything that can go wrong building, loading or saving a model or optimizer state.
/// File problems always come back as one of these, never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{origin} is not a valid safetensors file: {message}")]
    Format { origin: String, message: String },
    #[error(
        "{origin}: missing tensor `{name}` (expected shape {expected:?}){hint}; \
             the file was written for a different model or optimizer configuration"
    )]
    MissingTensor { origin: String, name: String, expected: Vec<usize>, hint: String },
    #[error(
        "{origin}: unexpected tensor `{name}`; the file was written for a different model \
             or optimizer configuration"
    )]
    UnexpectedTensor { origin: String, name: String },
    #[error(
        "{origin}: tensor `{name}` has shape {found:?}, expected {expected:?}; the file was \
             written for a different model configuration"
    )]
    WrongShape { origin: String, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error(
        "{origin}: tensor `{name}` has dtype {found}, expected {expected}; convert the file \
             (e.g. to float32) before loading it"
    )]
    WrongDtype { origin: String, name: String, expected: String, found: String },
    #[error("{what}: expected {expected} values, got {found}")]
    LengthMismatch { what: &'static str, expected: usize, found: usize },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Loads a model folder (a checkpoint or a registry version) for inference: `model.json`,
/// the weights (`model.safetensors`, or a checkpoint's shards) and `tokenizer.json`. Every
/// problem is an error naming the file.
pub fn load_for_inference(dir: &std::path::Path, device: tch::Device) -> anyhow::Result<(Gpt, crate::data::Tokenizer)> {
    warm_up_libtorch();
    let model = crate::checkpoint::load_model(dir, device)?;
    let config = model.config().clone();
    let tokenizer = crate::data::Tokenizer::load(&dir.join(crate::checkpoint::TOKENIZER_FILE))?;
    if tokenizer.vocab_size() > config.vocab_size {
        anyhow::bail!("{}: the tokenizer has {} tokens but the model only {}", dir.display(), tokenizer.vocab_size(), config.vocab_size);
    }
    Ok((model, tokenizer))
}

/// Continues the token ids `context` by up to `max_tokens` tokens (see [`Gpt::generate`]) and
/// returns the new text. Ids the tokenizer does not know (a padded model vocabulary) are left
/// out of the text.
pub fn continuation(
    model: &Gpt,
    tokenizer: &crate::data::Tokenizer,
    context: &[i64],
    max_tokens: usize,
    sampling: Sampling,
    seed: u64,
) -> anyhow::Result<String> {
    let out = model.generate(context, max_tokens, sampling.temperature, sampling.top_k, seed)?;
    let known = tokenizer.vocab_size();
    let ids: Vec<u32> = out.into_iter().filter_map(|t| u32::try_from(t).ok()).filter(|&t| (t as usize) < known).collect();
    Ok(tokenizer.decode(&ids)?)
}

/// Runs one tiny forward pass, once per process, before any thread generates.
///
/// Why: libtorch initialises parts of its global context (e.g. the float32 precision table
/// that `scaled_dot_product_attention` and matmul consult) lazily, and two threads doing their
/// first forward at the same time — a serving engine and the Evaluator — were seen to fail
/// once with `Invalid (backend, op) pair` from `at::Context::float32Precision`. Doing the first
/// forward on one thread, before the others start, takes that race away.
pub fn warm_up_libtorch() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cfg = GptConfig { vocab_size: 8, block_size: 4, n_layer: 1, n_head: 2, n_embd: 8, dropout: 0.0, bias: true };
        if let Ok(model) = Gpt::new(&cfg, tch::Device::Cpu, 0) {
            let _no_grad = tch::no_grad_guard();
            let _ = model.next_token_logits(&[&[1, 2, 3], &[4]]);
        }
    });
}

#[cfg(test)]
mod tests;
