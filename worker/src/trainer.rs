//! The training loop of one rank, on its own OS thread (libtorch calls block).
//!
//! Data parallelism, the nanoGPT way but over processes: every step consumes `global_batch`
//! sequences chosen by the sampler from the global cursor; this rank takes its contiguous part,
//! runs forward/backward in micro-batches (gradient accumulation), each micro-batch's loss
//! scaled by its share of the *global* batch. Summing the gradients over ranks (the ring
//! all-reduce) then gives exactly the gradient of the mean loss over the global batch — the
//! same as one worker computing the whole batch — whatever the world size. Clipping and the
//! AdamW update run identically on every rank, so replicas stay identical.

use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use troupe_common::checkpoint::{self, TrainState};
use troupe_common::collective::CollectiveTag;
use troupe_common::config::Config;
use troupe_common::data::{self, Meta, SamplerMemo, TokenFile};
use troupe_common::model::{self, AdamW, Gpt, GptConfig};
use troupe_common::proto::{EvalReport, FileDigest, StepReport};

pub use troupe_common::checkpoint::{MODEL_CONFIG_FILE, TOKENIZER_FILE};

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
    #[error("gradient all-reduce failed at step {step}: {error}")]
    Collective { step: u64, error: String },
    #[error("{0}")]
    Other(String),
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

/// Sums a flat gradient over all ranks, in place (blocking).
pub type Reduce<'a> = dyn FnMut(&mut Vec<f32>, CollectiveTag) -> Result<(), String> + 'a;

/// Makes every rank's buffer equal to rank `root`'s, in place (blocking).
pub type Broadcast<'a> = dyn FnMut(&mut Vec<f32>, u32, CollectiveTag) -> Result<(), String> + 'a;

pub struct Trainer {
    config: Config,
    rank: usize,
    world_size: usize,
    device: Device,
    meta: Meta,
    gpt_config: GptConfig,
    model: Gpt,
    names: Vec<String>,
    params: Vec<Tensor>,
    optimizer: AdamW,
    train: TokenFile,
    val: TokenFile,
    sampler: SamplerMemo,
    /// Completed optimizer steps.
    step: u64,
    /// Membership generation this rank trains in; collective tags restart with each one.
    generation: u64,
    collective_seq: u64,
    /// `TROUPE_TRACE_SAMPLES`: a file where each step's sample indices are logged (tests).
    sample_trace: Option<std::fs::File>,
}

impl Trainer {
    /// Builds the model (identically on every rank: same seed) and loads the data; when
    /// resuming, loads parameters, optimizer state and counters from the checkpoint.
    pub fn new(setup: TrainerSetup) -> Result<Trainer, TrainerError> {
        let TrainerSetup { config, rank, world_size, device, resume_from, start_step } = setup;
        let data_dir = &config.data.dir;
        let meta = data::verify_prepared(data_dir)?;
        let train = TokenFile::open(&data_dir.join("train.bin"))?;
        let val = TokenFile::open(&data_dir.join("val.bin"))?;
        let block = config.model.block_size;
        let sampler = SamplerMemo::new(data::Sampler::new(train.len(), block, config.run.seed)?);
        if data::num_samples(val.len(), block) == 0 {
            return Err(TrainerError::Other(format!(
                "{} holds {} tokens, fewer than one validation sequence of model.block_size = {block}; \
                 use a larger corpus or a smaller block_size",
                data_dir.join("val.bin").display(),
                val.len()
            )));
        }
        let gpt_config = GptConfig::from_model_config(&config.model, meta.vocab_size);
        let mut model = Gpt::new(&gpt_config, device, config.run.seed as i64)?;
        let names = model.parameter_names();
        let mut optimizer = AdamW::new(&model.parameter_tensors(), &config.train);
        let mut step = 0;
        if let Some(dir) = &resume_from {
            model.load_safetensors(&dir.join(checkpoint::MODEL_FILE))?;
            optimizer.load_safetensors(&dir.join(checkpoint::optim_file(0)), &names)?;
            let state = read_state(dir)?;
            if state.step != start_step {
                return Err(TrainerError::Other(format!(
                    "checkpoint {} is at step {}, the coordinator asked to start at {start_step}",
                    dir.display(),
                    state.step
                )));
            }
            step = state.step;
        }
        let params = model.parameter_tensors();
        Ok(Trainer {
            config,
            rank,
            world_size,
            device,
            meta,
            gpt_config,
            model,
            names,
            params,
            optimizer,
            train,
            val,
            sampler,
            step,
            generation: 0,
            collective_seq: 0,
            sample_trace: open_sample_trace()?,
        })
    }

    pub fn completed_steps(&self) -> u64 {
        self.step
    }

    /// Training tokens consumed by the whole run: every step takes the global batch.
    pub fn tokens_seen(&self) -> u64 {
        self.step * (self.config.train.global_batch * self.config.model.block_size) as u64
    }

    /// Takes this rank's place in a new membership generation. The global batch stays fixed:
    /// the sampler splits it over the new world size, so micro-batch counts adjust.
    pub fn set_membership(&mut self, generation: u64, rank: usize, world_size: usize) {
        self.generation = generation;
        self.rank = rank;
        self.world_size = world_size;
        self.collective_seq = 0;
    }

    fn next_tag(&mut self, step: u64) -> CollectiveTag {
        self.collective_seq += 1;
        CollectiveTag { step, seq: self.collective_seq }
    }

    /// Makes this rank's parameters and optimizer state those of rank `source_rank`, which has
    /// completed `step` steps: one broadcast of parameters and both AdamW moments.
    pub fn sync_state(&mut self, source_rank: u32, step: u64, broadcast: &mut Broadcast<'_>) -> Result<(), TrainerError> {
        let is_source = self.rank as u32 == source_rank;
        if is_source && step != self.step {
            return Err(TrainerError::Other(format!("asked to be the sync source at step {step}, but {} steps are completed", self.step)));
        }
        let tag = self.next_tag(step);
        let moments = self.optimizer.moments();
        let groups: [&[Tensor]; 3] = [&self.params, &moments.0, &moments.1];
        let mut flat = if is_source {
            groups.iter().flat_map(|g| model::flatten(g)).collect()
        } else {
            vec![0f32; groups.iter().map(|g| model::total_numel(g)).sum()]
        };
        broadcast(&mut flat, source_rank, tag).map_err(|error| TrainerError::Collective { step, error })?;
        let mut offset = 0;
        for group in groups {
            let n = model::total_numel(group);
            model::unflatten_into(group, &flat[offset..offset + n])?;
            offset += n;
        }
        self.optimizer.set_step_count(step);
        self.step = step;
        Ok(())
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// One optimizer step. `reduce` is not called when the world size is 1.
    pub fn step(&mut self, step: u64, reduce: &mut Reduce<'_>) -> Result<StepReport, TrainerError> {
        if step != self.step {
            return Err(TrainerError::Other(format!("asked for step {step}, but {} steps are completed", self.step)));
        }
        // Plain numbers (no allocation): the loop below also calls `&mut self` methods.
        let train = self.config.train.clone();
        let (seed, block_size) = (self.config.run.seed, self.config.model.block_size);
        let global_batch = train.global_batch;
        // Dropout masks depend on (seed, step, rank) only, so a resumed run draws the same ones.
        tch::manual_seed((seed as i64).wrapping_add((step as i64).wrapping_mul(1_000_003)).wrapping_add(self.rank as i64));
        let cursor = step * global_batch as u64;
        let (mut data_s, mut compute_s, mut comm_s) = (0.0, 0.0, 0.0);
        let t = Instant::now();
        let ids = self.sampler.indices(cursor, global_batch, self.rank, self.world_size);
        data_s += t.elapsed().as_secs_f64();

        let mut loss_share = 0.0;
        for chunk in ids.chunks(train.micro_batch) {
            let t = Instant::now();
            let (x, y) = self.batch(&self.train, chunk)?;
            data_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let weight = chunk.len() as f64 / global_batch as f64;
            let loss = self.model.loss(&x, &y, true);
            (&loss * weight).f_backward()?;
            loss_share += loss.f_double_value(&[])? * weight;
            compute_s += t.elapsed().as_secs_f64();
        }

        self.trace_samples(step, &ids);
        let mut loss = loss_share;
        let mut reduced_grad_norm = None;
        if self.world_size > 1 {
            let t = Instant::now();
            // The loss shares ride at the end of the gradient: one collective, and every rank
            // learns the step's loss.
            let mut flat = model::flat_grads(&self.params);
            flat.push(loss_share as f32);
            let tag = self.next_tag(step);
            if let Err(error) = reduce(&mut flat, tag) {
                // Nothing was applied: the parameters stay those after `step` steps, ready to
                // redo this step in the next membership generation.
                model::zero_grads(&self.params);
                return Err(TrainerError::Collective { step, error });
            }
            loss = flat.pop().map_or(f64::NAN, f64::from);
            comm_s += t.elapsed().as_secs_f64();
            // Norm and clipping on the host copy we already hold, before it is written back.
            let t = Instant::now();
            reduced_grad_norm = Some(model::clip_flat_grads(&self.params, &mut flat, train.grad_clip)?);
            model::set_flat_grads(&self.params, &flat)?;
            compute_s += t.elapsed().as_secs_f64();
        }

        let t = Instant::now();
        // With grad_clip <= 0, clip_grad_norm only measures.
        let grad_norm = match reduced_grad_norm {
            Some(norm) => norm,
            None => model::clip_grad_norm(&self.params, train.grad_clip),
        };
        let lr = model::lr_at(step, &train);
        self.optimizer.step(&self.params, lr);
        model::zero_grads(&self.params);
        compute_s += t.elapsed().as_secs_f64();

        let tokens = (ids.len() * block_size) as u64;
        self.step += 1;
        Ok(StepReport {
            generation: self.generation,
            world_size: self.world_size as u32,
            step,
            loss,
            tokens,
            grad_norm,
            lr,
            data_seconds: data_s,
            compute_seconds: compute_s,
            comm_seconds: comm_s,
        })
    }

    fn batch(&self, tokens: &TokenFile, ids: &[u64]) -> Result<(Tensor, Tensor), TrainerError> {
        let block = self.config.model.block_size;
        let (x, y) = data::load_batch(tokens, block, ids)?;
        let n = ids.len() as i64;
        let x = Tensor::f_from_slice(&x)?.f_view([n, block as i64])?.f_to_device(self.device)?;
        let y = Tensor::f_from_slice(&y)?.f_view([n, block as i64])?.f_to_device(self.device)?;
        Ok((x, y))
    }

    /// This rank's share of the validation loss: the first `eval.sequences` validation
    /// sequences, always the same ones, split over the ranks.
    pub fn evaluate(&self, step: u64) -> Result<EvalReport, TrainerError> {
        let _guard = tch::no_grad_guard();
        let num_val = data::num_samples(self.val.len(), self.config.model.block_size);
        let ids = data::eval_indices(num_val, self.config.eval.sequences, self.rank, self.world_size);
        let mut loss_sum = 0.0;
        for chunk in ids.chunks(self.config.train.micro_batch) {
            let (x, y) = self.batch(&self.val, chunk)?;
            let loss = self.model.loss(&x, &y, false);
            loss_sum += loss.to_kind(Kind::Double).f_double_value(&[])? * chunk.len() as f64;
        }
        Ok(EvalReport { generation: self.generation, step, loss_sum, sequences: ids.len() as u64 })
    }

    /// Writes this rank's part of the checkpoint into `dir` (a temporary folder the
    /// coordinator commits later) and returns what it wrote. Under `ddp` every replica is
    /// identical, so rank 0 writes everything and the others write nothing.
    pub fn save_checkpoint(&self, step: u64, dir: &Path) -> Result<Vec<FileDigest>, TrainerError> {
        if step != self.step {
            return Err(TrainerError::Other(format!("asked to checkpoint step {step}, but {} steps are completed", self.step)));
        }
        if self.rank != 0 {
            return Ok(Vec::new());
        }
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::Other(format!("cannot create {}: {e}", dir.display())))?;
        let model_path = dir.join(checkpoint::MODEL_FILE);
        self.model.save_safetensors(&model_path)?;
        let optim_path = dir.join(checkpoint::optim_file(0));
        self.optimizer.save_safetensors(&optim_path, &self.names)?;
        let state = TrainState {
            step: self.step,
            cursor: self.step * self.config.train.global_batch as u64,
            seed: self.config.run.seed,
            world_size: self.world_size as u32,
            strategy: "ddp".into(),
            tokens_seen: self.tokens_seen(),
            vocab_size: self.meta.vocab_size,
        };
        write_json(&dir.join(checkpoint::STATE_FILE), &serde_json::to_vec_pretty(&state).map_err(|e| TrainerError::Other(e.to_string()))?)?;
        write_json(&dir.join(MODEL_CONFIG_FILE), &serde_json::to_vec_pretty(&self.gpt_config).map_err(|e| TrainerError::Other(e.to_string()))?)?;
        let tokenizer = std::fs::read(self.config.data.dir.join(TOKENIZER_FILE))
            .map_err(|e| TrainerError::Other(format!("cannot read the tokenizer: {e}")))?;
        write_json(&dir.join(TOKENIZER_FILE), &tokenizer)?;
        let mut files = Vec::new();
        for name in [checkpoint::MODEL_FILE.to_string(), checkpoint::optim_file(0), checkpoint::STATE_FILE.into(), MODEL_CONFIG_FILE.into(), TOKENIZER_FILE.into()] {
            let path = dir.join(&name);
            checkpoint::fsync_path(&path)?;
            files.push(checkpoint::digest_file(&path)?);
        }
        checkpoint::fsync_path(dir)?;
        Ok(files)
    }
}

/// `TROUPE_TRACE_SAMPLES=DIR`: each rank appends `generation step rank world_size indices…`
/// to `DIR/samples-<pid>.txt` for every step it contributes to, so tests can check that no
/// sample is lost or repeated across membership changes.
fn open_sample_trace() -> Result<Option<std::fs::File>, TrainerError> {
    let Some(dir) = std::env::var_os("TROUPE_TRACE_SAMPLES") else { return Ok(None) };
    let path = PathBuf::from(dir).join(format!("samples-{}.txt", std::process::id()));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(Some)
        .map_err(|e| TrainerError::Other(format!("cannot open the sample trace {}: {e}", path.display())))
}

impl Trainer {
    fn trace_samples(&mut self, step: u64, ids: &[u64]) {
        use std::io::Write;
        let Some(file) = self.sample_trace.as_mut() else { return };
        let mut line = format!("{} {step} {} {}", self.generation, self.rank, self.world_size);
        for id in ids {
            line.push_str(&format!(" {id}"));
        }
        line.push('\n');
        let _ = file.write_all(line.as_bytes());
    }
}

fn write_json(path: &Path, bytes: &[u8]) -> Result<(), TrainerError> {
    std::fs::write(path, bytes).map_err(|e| TrainerError::Other(format!("cannot write {}: {e}", path.display())))
}

pub fn read_state(dir: &Path) -> Result<TrainState, TrainerError> {
    let path = dir.join(checkpoint::STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainerError::Other(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| TrainerError::Other(format!("{} is not valid: {e}", path.display())))
}

