//! The training loop of one rank, on its own OS thread (libtorch calls block).
//!
//! Data parallelism, the nanoGPT way but over processes: every step consumes `global_batch`
//! sequences chosen by the sampler from the global cursor; this rank takes its contiguous part,
//! runs forward/backward in micro-batches (gradient accumulation), each micro-batch's loss
//! scaled by its share of the *global* batch. Summing the gradients over ranks then gives
//! exactly the gradient of the mean loss over the global batch — the same as one worker
//! computing the whole batch — whatever the world size.
//!
//! What a rank keeps of the training state depends on `parallel.strategy` (see
//! [`troupe_core::shard`] for the layout), one file each:
//!
//! - [`ddp`]: the whole model, its gradients and AdamW moments; gradients all-reduced; every
//!   rank applies the same update, so replicas stay identical.
//! - [`zero12`]: `zero1` keeps the whole model (as one flat buffer) and the whole gradient, and
//!   AdamW moments for this rank's shard only: gradients all-reduced, each rank updates its
//!   shard, the updated shards are all-gathered. `zero2` is the same, but gradients are
//!   reduce-scattered: the whole gradient exists only during the backward pass.
//! - [`zero3`]: parameters sharded too, gathered stage by stage just before they compute.
//!
//! [`state`] builds the training state of each strategy (fresh or from a checkpoint, whatever
//! world size and strategy wrote it); [`checkpoint_writer`] writes a rank's part of a
//! checkpoint in the background. Clipping uses the global norm over all shards, so it is the
//! same under every strategy. The trainer reaches the other ranks through a
//! [`Comm`](crate::comm::Comm).
//!
//! A step whose summed loss or global gradient norm is NaN or infinite applies no update
//! ([`SkipReason`]): both figures are the same on every rank (NaN and infinities survive the
//! sums), so every rank skips the same steps without another collective, and parameters and
//! optimizer state stay those before the step. [`LocalCheck`] tells which rank the bad values
//! came from.

mod checkpoint_writer;
mod ddp;
mod local_check;
mod overlap;
mod state;
#[cfg(test)]
mod tests;
mod zero12;
mod zero3;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use troupe_common::checkpoint::{self, ShardReader};
use troupe_common::collective::{CollectiveOp, CollectiveTag};
use troupe_common::data::{self, Meta, SamplerMemo, TokenFile};
use troupe_common::model::precision::with_autocast;
use troupe_common::model::{self, Gpt, GptConfig};
use troupe_core::config::Config;
use troupe_core::proto::{EvalReport, SkipReason, SourceLoss, StepReport};
use troupe_core::shard::Strategy;

use crate::comm::{Comm, CommError};
use checkpoint_writer::CheckpointWriter;
use local_check::{LocalCheck, StepFaults};
use state::StrategyState;

pub use checkpoint_writer::WriteDone;
pub use state::Footprint;
pub use troupe_common::checkpoint::{MODEL_CONFIG_FILE, TOKENIZER_FILE};

/// Why the trainer could not build its state or run an order. Only `Collective` leaves the
/// trainer able to go on (nothing was applied; the step is redone in the next generation).
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("a collective failed at step {step}: {error}")]
    Collective { step: u64, error: CommError },
    #[error(
        "the validation split of {} holds {tokens} tokens, fewer than one validation sequence of model.block_size = {block_size}; \
         use a larger corpus, a larger val_fraction or a smaller block_size",
        path.display()
    )]
    TooLittleValidation { path: PathBuf, tokens: usize, block_size: usize },
    /// `train.precision` cannot be honoured on this device (the message says how to fix it).
    #[error("{0}")]
    Precision(String),
    #[error("checkpoint {} is at step {found}, the coordinator asked to start at {asked}", dir.display())]
    ResumeStep { dir: PathBuf, found: u64, asked: u64 },
    #[error(
        "checkpoint {} holds {found} parameters, this run's model has {expected}: was it written for another model configuration?",
        dir.display()
    )]
    ResumeModel { dir: PathBuf, found: usize, expected: usize },
    #[error(
        "{} holds conversations padded to {sample_tokens} tokens (one per sample), but model.block_size is {block_size}; \
         set model.block_size = {sample_tokens}, or prepare the data again with --block-size {block_size}",
        path.display()
    )]
    SampleTokens { path: PathBuf, sample_tokens: usize, block_size: usize },
    #[error("model.init_from {}: {message}", dir.display())]
    InitFrom { dir: PathBuf, message: String },
    /// An order for another step than the one the state is at (a protocol error).
    #[error("asked {what} {asked}, but {completed} steps are completed")]
    OutOfOrder { what: &'static str, asked: u64, completed: u64 },
    #[error("a {strategy} state is built for rank {rank} of {world}; it cannot become rank {new_rank} of {new_world} without a rebuild")]
    NeedsRebuild { strategy: Strategy, rank: usize, world: usize, new_rank: usize, new_world: usize },
    #[error("{strategy} state cannot be synced from a peer; it resumes from a checkpoint")]
    NotSyncable { strategy: Strategy },
    #[error("cannot {what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot start the checkpoint writer: {0}")]
    WriterThread(std::io::Error),
    /// The state to be checkpointed holds NaN or infinite values: it is not written, so that
    /// it can never be resumed from, retained or published.
    #[error("rank {rank}'s {what} at step {step} hold {count} non-finite values; the checkpoint is not written")]
    NonFinite { rank: u32, step: u64, what: &'static str, count: usize },
}

/// What the trainer needs to know about its place in the run.
#[derive(Debug, Clone)]
pub struct TrainerSetup {
    pub config: Config,
    pub rank: usize,
    pub world_size: usize,
    pub device: Device,
    pub resume_from: Option<PathBuf>,
    pub start_step: u64,
}

/// What every strategy reads while it steps (the run's config, this rank's place, the model),
/// and the counter its collective tags are drawn from.
struct StepContext {
    config: Config,
    rank: usize,
    world_size: usize,
    device: Device,
    /// Under `zero3` the parameters are released: only the stages and shapes are used.
    model: Gpt,
    /// Forward and backward under bf16 autocast (`train.precision`, CUDA only).
    bf16: bool,
    /// Membership generation this rank trains in; collective tags restart with each one.
    generation: u64,
    collective_seq: u64,
    /// This rank's own loss and gradient in the current step, before the sums.
    local: LocalCheck,
    /// Test hooks: a NaN put into this rank's gradient, steps every rank is told to skip.
    faults: StepFaults,
}

/// What a strategy's step computed: the step's loss and the gradient's global norm before
/// clipping (both the same on every rank), and why no update was applied, if none was.
struct StepOutcome {
    loss: f64,
    grad_norm: f64,
    skipped: Option<SkipReason>,
}

impl StepContext {
    fn next_tag(&mut self, step: u64) -> CollectiveTag {
        self.collective_seq += 1;
        CollectiveTag { step, seq: self.collective_seq }
    }

    /// Runs one collective of step `step` on a host buffer.
    fn collective(&mut self, step: u64, comm: &mut dyn Comm, op: CollectiveOp, data: Vec<f32>) -> Result<Vec<f32>, TrainerError> {
        let tag = self.next_tag(step);
        comm.run(op, data, tag).map_err(|error| TrainerError::Collective { step, error })
    }

    /// Runs one collective of step `step` on a tensor, in place.
    fn collective_tensor(&mut self, step: u64, comm: &mut dyn Comm, op: CollectiveOp, t: &Tensor) -> Result<(), TrainerError> {
        let tag = self.next_tag(step);
        comm.run_tensor(op, t, tag).map_err(|error| TrainerError::Collective { step, error })
    }

    /// The dropout seed of `step` on this rank: it depends on (seed, step, rank) only, so a
    /// resumed run draws the same masks.
    fn step_seed(&self, step: u64) -> i64 {
        (self.config.run.seed as i64).wrapping_add((step as i64).wrapping_mul(1_000_003)).wrapping_add(self.rank as i64)
    }

    /// The step's loss and the gradient's global norm from every rank's loss share and its
    /// shard's sum of squares `sum_sq` (one small all-reduce of both; none in a world of one).
    fn loss_and_norm_over_shards(
        &mut self,
        step: u64,
        loss_share: f64,
        sum_sq: f64,
        comm: &mut dyn Comm,
    ) -> Result<(f64, f64), TrainerError> {
        if self.world_size == 1 {
            return Ok((loss_share, sum_sq.sqrt()));
        }
        let totals = self.collective(step, comm, CollectiveOp::AllReduce, vec![loss_share as f32, sum_sq as f32])?;
        Ok((f64::from(totals[0]), f64::from(totals[1]).sqrt()))
    }

    /// Whether step `step`, whose global loss and gradient norm are these, applies its update.
    /// Every rank holds the same figures, so every rank decides alike.
    fn skip_reason(&self, step: u64, loss: f64, grad_norm: f64) -> Option<SkipReason> {
        SkipReason::of_step(loss, grad_norm).or(self.faults.told_to_skip(step).then_some(SkipReason::Injected))
    }

    /// Notes a gradient of this rank's own, before it is summed with the other ranks' (and
    /// puts the fault hook's NaN into it when one is due).
    fn note_local_grad(&mut self, step: u64, grad: &Tensor) -> Result<(), TrainerError> {
        if self.faults.nan_due(step, self.rank) && self.local.first_grad_of(step) {
            let _ = grad.f_view([-1])?.f_narrow(0, 0, 1)?.f_fill_(f64::NAN)?;
        }
        self.local.add_grad(grad)
    }

    fn batch(&self, tokens: &TokenFile, ids: &[u64]) -> Result<(Tensor, Tensor), TrainerError> {
        let block = self.config.model.block_size;
        let (x, y) = data::load_batch(tokens, block, ids)?;
        let n = ids.len() as i64;
        let x = Tensor::f_from_slice(&x)?.f_view([n, block as i64])?.f_to_device(self.device)?;
        let y = Tensor::f_from_slice(&y)?.f_view([n, block as i64])?.f_to_device(self.device)?;
        Ok((x, y))
    }
}

/// One micro-batch: inputs, targets and its weight in the step's loss.
type Batch = (Tensor, Tensor, f64);

pub struct Trainer {
    cx: StepContext,
    state: StrategyState,
    meta: Meta,
    gpt_config: GptConfig,
    train: TokenFile,
    /// Each data source's validation stream (one for data prepared from one source).
    val_sources: Vec<(String, TokenFile)>,
    sampler: SamplerMemo,
    /// Completed optimizer steps.
    step: u64,
    /// `TROUPE_TRACE_SAMPLES`: a file where each step's sample indices are logged (tests).
    sample_trace: Option<std::fs::File>,
    /// The checkpoint being written in the background, if any.
    writer: CheckpointWriter,
}

/// A fine-tuning run's starting weights: the model of a troupe model folder (an import, a
/// registry version) or a checkpoint's, whatever strategy wrote it.
fn load_initial_weights(model: &mut Gpt, dir: &Path) -> Result<(), TrainerError> {
    let failed = |message: String| TrainerError::InitFrom { dir: dir.to_path_buf(), message };
    let single = dir.join(checkpoint::MODEL_FILE);
    if single.is_file() {
        return Ok(model.load_safetensors(&single)?);
    }
    let base = checkpoint::load_model(dir, Device::Cpu).map_err(|e| failed(format!("{e:#}")))?;
    model.load_safetensors_bytes(&base.to_safetensors_bytes()?, &dir.display().to_string())?;
    Ok(())
}

impl Trainer {
    /// Builds the model (identically on every rank: same seed) and loads the data; when
    /// resuming, loads this rank's part of the state from the checkpoint, whatever world size
    /// and strategy wrote it.
    pub fn new(setup: TrainerSetup) -> Result<Trainer, TrainerError> {
        let TrainerSetup { mut config, rank, world_size, device, resume_from, start_step } = setup;
        if troupe_common::storage::is_remote(&config.data.dir) {
            // Data in object storage: this host's cached copy (fetched once per host).
            let url = config.data.dir.to_string_lossy().into_owned();
            config.data.dir = data::remote::fetch_prepared(&url)?.dir;
        }
        let data_dir = &config.data.dir;
        let meta = data::verify_prepared(data_dir)?;
        let train = data::open_train(data_dir, &meta)?;
        let val_sources = data::open_val_sources(data_dir, &meta)?;
        let block_size = config.model.block_size;
        let sampler = SamplerMemo::new(data::Sampler::new(train.len(), block_size, config.run.seed)?);
        if val_sources.iter().all(|(_, val)| data::num_samples(val.len(), block_size) == 0) {
            let tokens = val_sources.iter().map(|(_, val)| val.len()).sum();
            return Err(TrainerError::TooLittleValidation { path: data_dir.clone(), tokens, block_size });
        }
        if let Some(n) = meta.sample_tokens.filter(|&n| n != block_size) {
            return Err(TrainerError::SampleTokens { path: data_dir.clone(), sample_tokens: n, block_size });
        }
        let bf16 = config.train.precision.bf16_on(device.is_cuda()).map_err(TrainerError::Precision)?;
        let gpt_config = GptConfig::from_model_config(&config.model, meta.vocab_size);
        let mut model = Gpt::new(&gpt_config, device, config.run.seed as i64)?;
        if resume_from.is_none() && !config.model.init_from.is_empty() {
            load_initial_weights(&mut model, Path::new(&config.model.init_from))?;
        }
        // With a store, a resume reads from there, only the byte ranges this rank needs: the
        // coordinator's run folder need not be visible here. One committed before the store was
        // set is read where the coordinator says.
        let reader = match resume_from {
            Some(dir) => {
                let stored = (!config.checkpoint.store.is_empty())
                    .then(|| checkpoint::store::CheckpointStore::open(&config.checkpoint.store, &config.run.name))
                    .transpose()?
                    .map(|store| store.reader(start_step));
                let reader = match stored {
                    Some(Ok(reader)) => reader,
                    Some(Err(e)) if !dir.join(checkpoint::MANIFEST).is_file() => return Err(e.into()),
                    _ => ShardReader::open(&dir)?,
                };
                if reader.step() != start_step {
                    return Err(TrainerError::ResumeStep { dir: dir.clone(), found: reader.step(), asked: start_step });
                }
                if reader.layout().numel() != model.num_params() {
                    return Err(TrainerError::ResumeModel {
                        dir: dir.clone(),
                        found: reader.layout().numel(),
                        expected: model.num_params(),
                    });
                }
                Some(reader)
            }
            None => None,
        };
        let (model, state) = state::build(model, &config, rank as u32, world_size as u32, reader.as_ref())?;
        if let Some(fetched) = reader.as_ref().map(ShardReader::fetched_bytes).filter(|&b| b > 0) {
            tracing::info!("resumed from the checkpoint store: fetched {fetched} bytes by ranged reads");
        }
        Ok(Trainer {
            cx: StepContext {
                config,
                rank,
                world_size,
                device,
                model,
                bf16,
                generation: 0,
                collective_seq: 0,
                local: LocalCheck::default(),
                faults: StepFaults::from_env(),
            },
            state,
            meta,
            gpt_config,
            train,
            val_sources,
            sampler,
            step: reader.as_ref().map_or(0, |r| r.step()),
            sample_trace: open_sample_trace()?,
            writer: CheckpointWriter::default(),
        })
    }

    pub fn completed_steps(&self) -> u64 {
        self.step
    }

    /// Training tokens consumed by the whole run: every step takes the global batch.
    pub fn tokens_seen(&self) -> u64 {
        self.step * (self.cx.config.train.global_batch * self.cx.config.model.block_size) as u64
    }

    /// Bytes of parameters, gradients and optimizer state this rank keeps between steps.
    /// (The whole gradient also exists during the backward pass under `zero2`, and one stage's
    /// parameters and gradient while it computes under `zero3`.)
    pub fn footprint(&self) -> Footprint {
        self.state.footprint(self.cx.model.num_params())
    }

    pub fn device(&self) -> Device {
        self.cx.device
    }

    pub fn model(&self) -> &Gpt {
        &self.cx.model
    }

    /// Takes this rank's place in a new membership generation. The global batch stays fixed:
    /// the sampler splits it over the new world size, so micro-batch counts adjust. Only
    /// `ddp` keeps its state across a change of world size (the sharded strategies are
    /// rebuilt from a checkpoint instead, see the Worker).
    pub fn set_membership(&mut self, generation: u64, rank: usize, world_size: usize) -> Result<(), TrainerError> {
        let cx = &mut self.cx;
        if !matches!(self.state, StrategyState::Ddp(_)) && (rank, world_size) != (cx.rank, cx.world_size) {
            return Err(TrainerError::NeedsRebuild {
                strategy: self.state.strategy(),
                rank: cx.rank,
                world: cx.world_size,
                new_rank: rank,
                new_world: world_size,
            });
        }
        cx.generation = generation;
        cx.rank = rank;
        cx.world_size = world_size;
        cx.collective_seq = 0;
        Ok(())
    }

    /// Makes this rank's parameters and optimizer state those of rank `source_rank`, which has
    /// completed `step` steps (`ddp` only: a sharded state is never held whole by one rank, so
    /// it comes from a checkpoint).
    pub fn sync_state(&mut self, source_rank: u32, step: u64, comm: &mut dyn Comm) -> Result<(), TrainerError> {
        let is_source = self.cx.rank as u32 == source_rank;
        if is_source && step != self.step {
            return Err(TrainerError::OutOfOrder { what: "to be the sync source at step", asked: step, completed: self.step });
        }
        let StrategyState::Ddp(ddp) = &mut self.state else {
            return Err(TrainerError::NotSyncable { strategy: self.state.strategy() });
        };
        ddp.sync(&mut self.cx, source_rank, step, comm)?;
        self.step = step;
        Ok(())
    }

    /// One optimizer step. No collective is called when the world size is 1.
    pub fn step(&mut self, step: u64, comm: &mut dyn Comm) -> Result<StepReport, TrainerError> {
        if step != self.step {
            return Err(TrainerError::OutOfOrder { what: "for step", asked: step, completed: self.step });
        }
        let train = self.cx.config.train.clone();
        let global_batch = train.global_batch;
        tch::manual_seed(self.cx.step_seed(step));
        let cursor = step * global_batch as u64;
        let mut times = Times::default();
        let t = Instant::now();
        let ids = self.sampler.indices(cursor, global_batch, self.cx.rank, self.cx.world_size);
        // A micro-batch's weight is its share of the global batch's trained targets: all of
        // its tokens, or on chat data only the answers (every rank counts those of the whole
        // global batch from the masks, so the step's loss is the mean over every answer token
        // whatever the world size, with no collective).
        let block = self.cx.config.model.block_size;
        let masked_total = match self.train.is_masked() {
            true => Some(data::trained_targets(&self.train, block, &self.sampler.indices(cursor, global_batch, 0, 1))?.max(1)),
            false => None,
        };
        let mut batches = Vec::new();
        for chunk in ids.chunks(train.micro_batch) {
            let (x, y) = self.cx.batch(&self.train, chunk)?;
            let weight = match masked_total {
                Some(total) => data::trained_targets(&self.train, block, chunk)? as f64 / total as f64,
                None => chunk.len() as f64 / global_batch as f64,
            };
            batches.push((x, y, weight));
        }
        times.data += t.elapsed().as_secs_f64();
        self.trace_samples(step, &ids);

        let lr = model::lr_at(step, &train);
        let cx = &mut self.cx;
        cx.local.start(step);
        let StepOutcome { loss, grad_norm, skipped } = match &mut self.state {
            StrategyState::Ddp(ddp) => ddp.step(cx, step, &batches, lr, comm, &mut times)?,
            StrategyState::Zero12(z) => z.step(cx, step, &batches, lr, comm, &mut times)?,
            StrategyState::Zero3(z) => z.step(cx, step, &batches, lr, comm, &mut times)?,
        };
        // Read only for a skipped step: on a GPU, reading it waits for the device.
        let locally_finite = skipped.is_none() || cx.local.finite()?;
        if let Some(reason) = skipped {
            let whose = if locally_finite { "not" } else { "" };
            tracing::warn!(
                "step {step} skipped on rank {} ({}): no update applied; this rank's own values were {whose} among the non-finite ones",
                cx.rank,
                reason.label()
            );
        }
        let tokens = (ids.len() * self.cx.config.model.block_size) as u64;
        self.step += 1;
        Ok(StepReport {
            generation: self.cx.generation,
            world_size: self.cx.world_size as u32,
            step,
            loss,
            tokens,
            grad_norm,
            lr,
            data_seconds: times.data,
            compute_seconds: times.compute,
            comm_seconds: times.comm,
            skipped,
            locally_finite,
        })
    }

    /// This rank's share of the validation loss: the first `eval.sequences` validation
    /// sequences, always the same ones, split over the ranks. With several data sources, each
    /// source gets an equal share of the sequences and its own loss in the report. Under
    /// `zero3` every rank takes part in the stage gathers, so it needs `comm` and must be
    /// called on every rank.
    pub fn evaluate(&mut self, step: u64, comm: &mut dyn Comm) -> Result<EvalReport, TrainerError> {
        let _guard = tch::no_grad_guard();
        let cx = &mut self.cx;
        let several = self.val_sources.len() > 1;
        let per_source = if several { (cx.config.eval.sequences / self.val_sources.len()).max(1) } else { cx.config.eval.sequences };
        let mut report = EvalReport { generation: cx.generation, step, loss_sum: 0.0, sequences: 0, per_source: Vec::new() };
        for (source, val) in &self.val_sources {
            let (loss_sum, sequences) = evaluate_stream(cx, &mut self.state, val, per_source, step, comm)?;
            report.loss_sum += loss_sum;
            report.sequences += sequences;
            if several {
                report.per_source.push(SourceLoss { source: source.clone(), loss_sum, sequences });
            }
        }
        Ok(report)
    }

    fn trace_samples(&mut self, step: u64, ids: &[u64]) {
        use std::io::Write;
        let Some(file) = self.sample_trace.as_mut() else { return };
        let mut line = format!("{} {step} {} {}", self.cx.generation, self.cx.rank, self.cx.world_size);
        for id in ids {
            line.push_str(&format!(" {id}"));
        }
        line.push('\n');
        let _ = file.write_all(line.as_bytes());
    }
}

/// This rank's share of the loss over the first `sequences` windows of `val`: (Σ of their
/// losses, how many this rank evaluated).
fn evaluate_stream(
    cx: &mut StepContext,
    state: &mut StrategyState,
    val: &TokenFile,
    sequences: usize,
    step: u64,
    comm: &mut dyn Comm,
) -> Result<(f64, u64), TrainerError> {
    let num_val = data::num_samples(val.len(), cx.config.model.block_size);
    let ids = data::eval_indices(num_val, sequences, cx.rank, cx.world_size);
    // Each micro-batch's mean loss weighs by what it averages over: its sequences, or on chat
    // data its answer tokens (then the second figure returned counts those, and the
    // coordinator's division gives the mean over answer tokens).
    let mut batches = Vec::new();
    for chunk in ids.chunks(cx.config.train.micro_batch) {
        let (x, y) = cx.batch(val, chunk)?;
        let weight =
            if val.is_masked() { data::trained_targets(val, cx.config.model.block_size, chunk)? as f64 } else { chunk.len() as f64 };
        batches.push((x, y, weight));
    }
    let losses = match state {
        StrategyState::Zero3(z) => z.eval_losses(cx, step, &batches, comm)?,
        StrategyState::Ddp(_) | StrategyState::Zero12(_) => {
            batches.iter().map(|(x, y, _)| with_autocast(cx.bf16, || cx.model.loss(x, y, false))).collect()
        }
    };
    let mut loss_sum = 0.0;
    for (loss, (_, _, n)) in losses.iter().zip(&batches) {
        loss_sum += loss.to_kind(Kind::Double).f_double_value(&[])? * n;
    }
    let count = if val.is_masked() { batches.iter().map(|b| b.2 as u64).sum() } else { ids.len() as u64 };
    Ok((loss_sum, count))
}

/// This rank's share of a step's loss: Σ over micro-batches of loss × weight, in f64. It is
/// summed where the losses are: on a GPU, reading each micro-batch's loss to the host would
/// wait for its backward pass and leave the GPU idle while the next one is queued, so it is
/// read once per step.
#[derive(Default)]
struct LossShare(Option<Tensor>);

impl LossShare {
    fn add(&mut self, loss: &Tensor, weight: f64) -> Result<(), TrainerError> {
        let weighted = loss.f_detach()?.f_to_kind(Kind::Double)?.f_mul_scalar(weight)?;
        self.0 = Some(match self.0.take() {
            Some(sum) => sum.f_add(&weighted)?,
            None => weighted,
        });
        Ok(())
    }

    fn value(&self) -> Result<f64, TrainerError> {
        Ok(match &self.0 {
            Some(sum) => sum.f_double_value(&[])?,
            None => 0.0,
        })
    }
}

/// Step time by phase.
#[derive(Default)]
struct Times {
    data: f64,
    compute: f64,
    comm: f64,
}

/// A tensor's values on the host, as float32.
fn host_vec(t: &Tensor) -> Vec<f32> {
    model::flatten(std::slice::from_ref(t))
}

/// Overwrites the values of `t` with `values` (see [`model::unflatten_into`]).
fn write_into(t: &Tensor, values: &[f32]) -> Result<(), TrainerError> {
    Ok(model::unflatten_into(std::slice::from_ref(t), values)?)
}

/// `TROUPE_TRACE_SAMPLES=DIR`: each rank appends `generation step rank world_size indices…`
/// to `DIR/samples-<pid>.txt` for every step it contributes to, so tests can check that no
/// sample is lost or repeated across membership changes.
fn open_sample_trace() -> Result<Option<std::fs::File>, TrainerError> {
    let Some(dir) = std::env::var_os("TROUPE_TRACE_SAMPLES") else { return Ok(None) };
    let path = PathBuf::from(dir).join(format!("samples-{}.txt", std::process::id()));
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(file) => Ok(Some(file)),
        Err(source) => Err(TrainerError::Io { what: "open the sample trace", path, source }),
    }
}
