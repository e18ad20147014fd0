//! Measuring a committed checkpoint from its files: the validation loss (per data source),
//! the next-line task and the samples from the config's fixed prompts.
//!
//! Two places run it: an eval worker (`troupe worker --role eval`), which measures everything,
//! loss included, so that training never pauses for evaluation; and the coordinator's
//! Evaluator, which adds the task and the samples to a loss the ranks measured (the sharded
//! path) or, when no eval worker could, measures the loss too. The loss is computed exactly as
//! the ranks compute their shares (`worker/src/trainer`): the same first `eval.sequences`
//! windows of each source, in micro-batches of `train.micro_batch`, each weighed by its
//! sequences (or, on chat data, its answer tokens); only the order of the sums differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind, Tensor};
use troupe_core::config::Config;
use troupe_core::events::Sample;
use troupe_core::proto::{CheckpointEval, SourceLoss};

use crate::data::{self, TokenFile, Tokenizer};
use crate::model::{self, precision::with_autocast, Gpt, Sampling};
use crate::tasks;

/// Longest greedy continuation of the next-line task's generated half (as `troupe tasks score`).
pub const TASK_GEN_TOKENS: usize = 32;
/// Seed of the next-line task's distractors: fixed, so every checkpoint of every run on the
/// same data is scored on the same items.
const TASK_SEED: u64 = 0;

/// What to measure besides the samples and the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The loss was measured elsewhere (by the ranks).
    Known,
    /// Measure it here.
    Measure,
}

/// A checkpoint's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Σ over the validation sequences of their mean token loss, how many, and per source
    /// (when the data has several); `None` with [`Loss::Known`].
    pub loss: Option<(f64, u64, Vec<SourceLoss>)>,
    /// Task metric → score.
    pub tasks: BTreeMap<String, f64>,
    pub samples: Vec<Sample>,
}

impl Measured {
    /// What an eval worker sends back for `step`.
    pub fn into_report(self, step: u64) -> anyhow::Result<CheckpointEval> {
        let (loss_sum, sequences, per_source) = self.loss.ok_or_else(|| anyhow::anyhow!("the loss was not measured"))?;
        Ok(CheckpointEval { step, loss_sum, sequences, per_source, tasks: self.tasks.into_iter().collect(), samples: self.samples })
    }
}

/// Measures the checkpoint in `checkpoint` as `config` says (see the module docs).
pub fn measure(config: &Config, checkpoint: &Path, loss: Loss, device: Device) -> anyhow::Result<Measured> {
    let _guard = tch::no_grad_guard();
    let (model, tokenizer) = model::load_for_inference(checkpoint, device)?;
    let needs_data = loss == Loss::Measure || config.eval.task_items > 0;
    let data_dir = if needs_data { Some(data_dir(config)?) } else { None };
    let loss = match (&data_dir, loss) {
        (Some(dir), Loss::Measure) => Some(validation_loss(config, &model, dir, device)?),
        _ => None,
    };
    let mut scores = BTreeMap::new();
    if let (Some(dir), true) = (&data_dir, config.eval.task_items > 0) {
        let items = tasks::build_items(dir, config.eval.task_items, model.config().block_size, TASK_SEED)
            .with_context(|| format!("building the next-line task (eval.task_items) from {}", dir.display()))?;
        let report = tasks::score(&model, &tokenizer, &items, TASK_GEN_TOKENS)?;
        scores.insert("next_line_acc".to_string(), report.next_line_acc);
        scores.insert("next_line_gen_exact_match".to_string(), report.next_line_gen_exact_match);
    }
    let samples = samples(&model, &tokenizer, &config.eval.prompts, config.eval.sample_tokens)?;
    Ok(Measured { loss, tasks: scores, samples })
}

/// The prepared data on this host: `data.dir`, or this host's cached copy of data in object
/// storage.
fn data_dir(config: &Config) -> anyhow::Result<PathBuf> {
    if crate::storage::is_remote(&config.data.dir) {
        let url = config.data.dir.to_string_lossy().into_owned();
        return Ok(data::remote::fetch_prepared(&url)?.dir);
    }
    Ok(config.data.dir.clone())
}

/// The loss over the first `eval.sequences` validation windows (shared equally between the
/// sources when there are several), as one rank holding all of them computes it.
fn validation_loss(config: &Config, model: &Gpt, dir: &Path, device: Device) -> anyhow::Result<(f64, u64, Vec<SourceLoss>)> {
    let meta = data::verify_prepared(dir)?;
    let sources = data::open_val_sources(dir, &meta)?;
    let several = sources.len() > 1;
    let per_source = if several { (config.eval.sequences / sources.len()).max(1) } else { config.eval.sequences };
    // bf16 where training has it (CUDA); an evaluator on the CPU measures in fp32 even when
    // the config asks training for bf16, which only CUDA offers.
    let bf16 = config.train.precision.bf16_on(device.is_cuda()).unwrap_or(false);
    let (mut loss_sum, mut sequences, mut parts) = (0.0, 0, Vec::new());
    for (source, val) in &sources {
        let (sum, n) = stream_loss(config, model, val, per_source, bf16, device)?;
        loss_sum += sum;
        sequences += n;
        if several {
            parts.push(SourceLoss { source: source.clone(), loss_sum: sum, sequences: n });
        }
    }
    Ok((loss_sum, sequences, parts))
}

fn stream_loss(config: &Config, model: &Gpt, val: &TokenFile, sequences: usize, bf16: bool, device: Device) -> anyhow::Result<(f64, u64)> {
    let block = config.model.block_size;
    let ids = data::eval_indices(data::num_samples(val.len(), block), sequences, 0, 1);
    let (mut loss_sum, mut count) = (0.0, 0u64);
    for chunk in ids.chunks(config.train.micro_batch.max(1)) {
        let (x, y) = data::load_batch(val, block, chunk)?;
        let n = chunk.len() as i64;
        let x = Tensor::f_from_slice(&x)?.f_view([n, block as i64])?.f_to_device(device)?;
        let y = Tensor::f_from_slice(&y)?.f_view([n, block as i64])?.f_to_device(device)?;
        let weight = if val.is_masked() { data::trained_targets(val, block, chunk)? as f64 } else { chunk.len() as f64 };
        let loss = with_autocast(bf16, || model.loss(&x, &y, false));
        loss_sum += loss.to_kind(Kind::Double).f_double_value(&[])? * weight;
        count += if val.is_masked() { weight as u64 } else { chunk.len() as u64 };
    }
    Ok((loss_sum, count))
}

/// Greedy continuations of `prompts` (each cut to the model's context).
pub fn samples(model: &Gpt, tokenizer: &Tokenizer, prompts: &[String], tokens: usize) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    if tokens == 0 {
        return Ok(samples);
    }
    for prompt in prompts {
        let mut context: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
        context.truncate(model.config().block_size);
        if context.is_empty() {
            continue;
        }
        let text = model::continuation(model, tokenizer, &context, tokens, Sampling::greedy(), 0)?;
        samples.push(Sample { prompt: prompt.clone(), text });
    }
    Ok(samples)
}
