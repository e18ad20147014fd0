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
//! [`troupe_core::shard`] for the layout):
//!
//! - `ddp`: the whole model, its gradients and AdamW moments; gradients all-reduced; every rank
//!   applies the same update, so replicas stay identical.
//! - `zero1`: the whole model (as one flat buffer) and the whole gradient; AdamW moments for
//!   this rank's shard only. Gradients all-reduced, each rank updates its shard, the updated
//!   shards are all-gathered.
//! - `zero2`: as zero1, but gradients are reduce-scattered: the whole gradient exists only
//!   during the backward pass, the rank keeps its shard of the sum.
//! - `zero3`: parameters sharded too. A step runs the model stage by stage (embeddings, each
//!   block, the head): each stage's parameters are all-gathered just before it computes and
//!   dropped after. Only the stage inputs are kept from the forward pass; the backward pass
//!   gathers each stage again, recomputes its forward from the kept input and back-propagates
//!   through it (activation recomputation), then reduce-scatters the stage's gradient.
//!
//! Clipping uses the global norm over all shards, so it is the same under every strategy.
//! Checkpoints: each rank copies its shard of the state into host memory and a background
//! thread writes it (see [`Trainer::save_checkpoint`]).

use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use troupe_common::checkpoint::{self, ShardPart, ShardReader, ShardSnapshot, TrainState};
use troupe_common::collective::{check_chunked_len, CollectiveTag};
use troupe_core::config::Config;
use troupe_common::data::{self, Meta, SamplerMemo, TokenFile};
use troupe_common::model::precision::with_autocast;
use troupe_common::model::{self, AdamW, AdamWConfig, Gpt, GptConfig, ShardAdamW};
use troupe_core::proto::{EvalReport, FileDigest, StepReport};
use troupe_core::shard::{ShardLayout, Strategy};

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
    #[error("a collective failed at step {step}: {error}")]
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

/// The collectives of this rank's generation, blocking (the trainer thread waits on them).
/// Buffers move in and out, as they travel to the collective actor and back. See
/// [`troupe_common::collective::Collective`] for what each computes.
pub trait Comm {
    fn all_reduce(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String>;
    fn reduce_scatter(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String>;
    fn all_gather(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String>;
    fn broadcast(&mut self, data: Vec<f32>, root: u32, tag: CollectiveTag) -> Result<Vec<f32>, String>;

    /// Whether this group combines tensors where they are (NCCL on GPU memory). Then the
    /// trainer keeps gradients on the device and reduces them in buckets with
    /// [`Comm::all_reduce_tensor`]; otherwise it stages them through host memory once.
    fn works_on_device(&self) -> bool {
        false
    }

    /// Sums a contiguous float32 tensor over the ranks, in place. The defaults of the tensor
    /// methods go through host memory ([`through_host`]).
    fn all_reduce_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        through_host(t, |values| self.all_reduce(values, tag))
    }

    /// [`Comm::reduce_scatter`] of a contiguous float32 tensor, in place.
    fn reduce_scatter_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        through_host(t, |values| self.reduce_scatter(values, tag))
    }

    /// [`Comm::all_gather`] of a contiguous float32 tensor, in place.
    fn all_gather_tensor(&mut self, t: &Tensor, tag: CollectiveTag) -> Result<(), String> {
        through_host(t, |values| self.all_gather(values, tag))
    }
}

/// Runs the host-memory collective `op` on the values of `t` and writes its result back into
/// `t`: how a [`Comm`] combines a tensor it cannot work on where it is.
pub fn through_host(t: &Tensor, op: impl FnOnce(Vec<f32>) -> Result<Vec<f32>, String>) -> Result<(), String> {
    let result = op(host_vec(t))?;
    write_into(t, &result).map_err(|e| e.to_string())
}

/// The collectives of a world of one: nothing to combine (the trainer never calls them then).
pub struct Alone;

impl Comm for Alone {
    fn all_reduce(&mut self, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, String> {
        Ok(data)
    }
    fn reduce_scatter(&mut self, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, String> {
        Ok(data)
    }
    fn all_gather(&mut self, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, String> {
        Ok(data)
    }
    fn broadcast(&mut self, data: Vec<f32>, _: u32, _: CollectiveTag) -> Result<Vec<f32>, String> {
        Ok(data)
    }
}

/// The collectives of a mixed generation: NCCL inside the group of CUDA workers that can use
/// it, the QUIC ring between that group's rank 0 and the workers that cannot. Every operation
/// is a sum: reduced in the group, then over the ring (by the group's rank 0, for the whole
/// group), then broadcast in the group. A reduce-scatter is that sum (each rank keeps its
/// chunk) and an all-gather sums each rank's own chunk with zeros (exact): an all-reduce's
/// traffic each, but chunks stay numbered by the trainer's ranks, which neither the group nor
/// the ring numbers alike. Every rank of the generation uses one, whatever it is part of.
pub struct Mixed {
    /// This rank's NCCL group, if it is in one.
    pub group: Option<Box<dyn Comm>>,
    /// The ring, if this rank is in it (the group's rank 0 and the other workers).
    pub ring: Option<Box<dyn Comm>>,
    pub rank: u32,
    pub world_size: u32,
}

impl Comm for Mixed {
    fn all_reduce(&mut self, mut data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        if let Some(group) = &mut self.group {
            data = group.all_reduce(data, tag)?;
        }
        if let Some(ring) = &mut self.ring {
            data = ring.all_reduce(data, tag)?;
        }
        if let Some(group) = &mut self.group {
            data = group.broadcast(data, 0, tag)?;
        }
        Ok(data)
    }
    fn reduce_scatter(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        check_chunked_len("reduce_scatter", data.len(), self.world_size).map_err(|e| e.to_string())?;
        self.all_reduce(data, tag)
    }
    fn all_gather(&mut self, mut data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        check_chunked_len("all_gather", data.len(), self.world_size).map_err(|e| e.to_string())?;
        let chunk = data.len() / self.world_size as usize;
        let mine = self.rank as usize * chunk..(self.rank as usize + 1) * chunk;
        for (i, x) in data.iter_mut().enumerate() {
            if !mine.contains(&i) {
                *x = 0.0;
            }
        }
        self.all_reduce(data, tag)
    }
    fn broadcast(&mut self, mut data: Vec<f32>, root: u32, tag: CollectiveTag) -> Result<Vec<f32>, String> {
        if root >= self.world_size {
            return Err(format!("broadcast root {root} is not a rank of {}", self.world_size));
        }
        if self.rank != root {
            data.fill(0.0);
        }
        self.all_reduce(data, tag)
    }
}

/// Bytes of training state a rank holds between steps, by kind (exported as
/// `troupe_memory_bytes{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub params: u64,
    pub grads: u64,
    pub optim: u64,
}

/// Where a finished background checkpoint write reports: its files, or why it failed.
pub type WriteDone = Box<dyn FnOnce(Result<Vec<FileDigest>, String>) + Send>;

/// The training state in the form the strategy keeps it.
enum State {
    /// `ddp`: the model's own parameters (per-parameter gradients) and a full AdamW.
    Replica { params: Vec<Tensor>, optimizer: AdamW },
    /// `zero1`/`zero2`/`zero3`.
    Sharded(Sharded),
}

struct Sharded {
    layout: ShardLayout,
    /// `zero1`/`zero2`: the whole model as one flat buffer (one unit, padded); the model's
    /// parameters are views into it. `None` under `zero3`.
    full: Option<Tensor>,
    /// This rank's shard of the parameters: a view into `full`, or (`zero3`) its own buffer.
    shard: Tensor,
    optimizer: ShardAdamW,
}

pub struct Trainer {
    config: Config,
    strategy: Strategy,
    rank: usize,
    world_size: usize,
    device: Device,
    meta: Meta,
    gpt_config: GptConfig,
    /// Under `zero3` the parameters are released: only the stages and shapes are used.
    model: Gpt,
    state: State,
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
    /// The checkpoint being written in the background, if any.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Forward and backward under bf16 autocast (`train.precision`, CUDA only).
    bf16: bool,
    /// Gradient buckets (ranges of parameters) for collectives that work on the device (`ddp`).
    buckets: Vec<std::ops::Range<usize>>,
}

impl Drop for Trainer {
    fn drop(&mut self) {
        // A checkpoint being written is finished, not torn, when the trainer goes.
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Parts of a rank's shard that belong to one parameter each, with its weight-decay choice
/// (AdamW decays matrices and embeddings, not biases and LayerNorms).
fn shard_segments(layout: &ShardLayout, rank: u32, numels: &[usize], decay: &[bool]) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut out = Vec::new();
    for piece in layout.owned(rank) {
        let mut offset = 0;
        for (&n, &d) in numels.iter().zip(decay) {
            let (lo, hi) = (piece.global.start.max(offset), piece.global.end.min(offset + n));
            if lo < hi {
                let local = piece.local + (lo - piece.global.start);
                out.push((local..local + (hi - lo), d));
            }
            offset += n;
        }
    }
    out
}

/// Σ x² of a shard of the gradient in f64: on the host in order for CPU tensors (the figure
/// the CPU ranks' bit-for-bit agreement rests on, see [`model::sum_of_squares`]), where it is
/// for GPU tensors (one scalar copied instead of the shard).
fn sum_of_squares(t: &Tensor) -> Result<f64, TrainerError> {
    if t.device().is_cuda() {
        return Ok(t.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?);
    }
    Ok(model::sum_of_squares(&host_vec(t)))
}

/// A tensor's values on the host, as float32.
fn host_vec(t: &Tensor) -> Vec<f32> {
    model::flatten(std::slice::from_ref(t))
}

/// Overwrites the values of `t` with `values` (see [`model::unflatten_into`]).
fn write_into(t: &Tensor, values: &[f32]) -> Result<(), TrainerError> {
    Ok(model::unflatten_into(std::slice::from_ref(t), values)?)
}

fn tensor_of(values: &[f32], device: Device) -> Result<Tensor, TrainerError> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
}

/// Views of a flat buffer as the given parameter shapes (in order; a padding tail is left
/// out). Made with one `split`, so that their gradients come back as one flat gradient.
fn param_views(flat: &Tensor, shapes: &[Vec<i64>]) -> Result<Vec<Tensor>, TrainerError> {
    let mut sizes: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
    let used: i64 = sizes.iter().sum();
    let padding = flat.size()[0] - used;
    if padding > 0 {
        sizes.push(padding);
    }
    let parts = flat.f_split_with_sizes(sizes.as_slice(), 0)?;
    shapes.iter().zip(parts).map(|(shape, part)| Ok(part.f_view(shape.as_slice())?)).collect()
}

impl Trainer {
    /// Builds the model (identically on every rank: same seed) and loads the data; when
    /// resuming, loads this rank's part of the state from the checkpoint, whatever world size
    /// and strategy wrote it.
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
        let bf16 = config.train.precision.bf16_on(device.is_cuda()).map_err(TrainerError::Other)?;
        let gpt_config = GptConfig::from_model_config(&config.model, meta.vocab_size);
        let model = Gpt::new(&gpt_config, device, config.run.seed as i64)?;
        let buckets = troupe_common::collective::gradient_buckets(&model.param_numels(), 4, config.parallel.bucket_bytes());
        let reader = match &resume_from {
            Some(dir) => {
                let reader = ShardReader::open(dir)?;
                if reader.step() != start_step {
                    return Err(TrainerError::Other(format!(
                        "checkpoint {} is at step {}, the coordinator asked to start at {start_step}",
                        dir.display(),
                        reader.step()
                    )));
                }
                if reader.layout().numel() != model.num_params() {
                    return Err(TrainerError::Other(format!(
                        "checkpoint {} holds {} parameters, this run's model has {}: was it written for another model configuration?",
                        dir.display(),
                        reader.layout().numel(),
                        model.num_params()
                    )));
                }
                Some(reader)
            }
            None => None,
        };
        let strategy = config.parallel.strategy;
        let (model, state) = build_state(strategy, model, &config, rank as u32, world_size as u32, reader.as_ref())?;
        Ok(Trainer {
            config,
            strategy,
            rank,
            world_size,
            device,
            meta,
            gpt_config,
            model,
            state,
            train,
            val,
            sampler,
            step: reader.as_ref().map_or(0, |r| r.step()),
            generation: 0,
            collective_seq: 0,
            sample_trace: open_sample_trace()?,
            writer: None,
            bf16,
            buckets,
        })
    }

    pub fn completed_steps(&self) -> u64 {
        self.step
    }

    /// Training tokens consumed by the whole run: every step takes the global batch.
    pub fn tokens_seen(&self) -> u64 {
        self.step * (self.config.train.global_batch * self.config.model.block_size) as u64
    }

    /// Bytes of parameters, gradients and optimizer state this rank keeps between steps.
    /// (The whole gradient also exists during the backward pass under `zero2`, and one stage's
    /// parameters and gradient while it computes under `zero3`.)
    pub fn footprint(&self) -> Footprint {
        let n = self.model.num_params() as u64 * 4;
        match &self.state {
            State::Replica { .. } => Footprint { params: n, grads: n, optim: 2 * n },
            State::Sharded(s) => {
                let shard = s.layout.shard_len() as u64 * 4;
                let full = s.full.as_ref().map_or(shard, |f| f.numel() as u64 * 4);
                let grads = if self.strategy == Strategy::Zero1 { full } else { shard };
                Footprint { params: full, grads, optim: 2 * shard }
            }
        }
    }

    /// Takes this rank's place in a new membership generation. The global batch stays fixed:
    /// the sampler splits it over the new world size, so micro-batch counts adjust. Only
    /// `ddp` keeps its state across a change of world size (the sharded strategies are
    /// rebuilt from a checkpoint instead, see the Worker).
    pub fn set_membership(&mut self, generation: u64, rank: usize, world_size: usize) -> Result<(), TrainerError> {
        if matches!(self.state, State::Sharded(_)) && (rank, world_size) != (self.rank, self.world_size) {
            return Err(TrainerError::Other(format!(
                "a {} state is built for rank {} of {}; it cannot become rank {rank} of {world_size} without a rebuild",
                self.strategy, self.rank, self.world_size
            )));
        }
        self.generation = generation;
        self.rank = rank;
        self.world_size = world_size;
        self.collective_seq = 0;
        Ok(())
    }

    fn next_tag(&mut self, step: u64) -> CollectiveTag {
        self.collective_seq += 1;
        CollectiveTag { step, seq: self.collective_seq }
    }

    fn collective<T>(step: u64, r: Result<T, String>) -> Result<T, TrainerError> {
        r.map_err(|error| TrainerError::Collective { step, error })
    }

    /// Makes this rank's parameters and optimizer state those of rank `source_rank`, which has
    /// completed `step` steps: one broadcast of parameters and both AdamW moments (`ddp` only:
    /// a sharded state is never held whole by one rank, so it comes from a checkpoint).
    pub fn sync_state(&mut self, source_rank: u32, step: u64, comm: &mut dyn Comm) -> Result<(), TrainerError> {
        let is_source = self.rank as u32 == source_rank;
        if is_source && step != self.step {
            return Err(TrainerError::Other(format!("asked to be the sync source at step {step}, but {} steps are completed", self.step)));
        }
        let tag = self.next_tag(step);
        let State::Replica { params, optimizer } = &mut self.state else {
            return Err(TrainerError::Other(format!("{} state cannot be synced from a peer; it resumes from a checkpoint", self.strategy)));
        };
        let moments = optimizer.moments();
        let groups: [&[Tensor]; 3] = [params, &moments.0, &moments.1];
        let flat = if is_source {
            groups.iter().flat_map(|g| model::flatten(g)).collect()
        } else {
            vec![0f32; groups.iter().map(|g| model::total_numel(g)).sum()]
        };
        let flat = Self::collective(step, comm.broadcast(flat, source_rank, tag))?;
        let mut offset = 0;
        for group in groups {
            let n = model::total_numel(group);
            model::unflatten_into(group, &flat[offset..offset + n])?;
            offset += n;
        }
        optimizer.set_step_count(step);
        self.step = step;
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// One optimizer step. No collective is called when the world size is 1.
    pub fn step(&mut self, step: u64, comm: &mut dyn Comm) -> Result<StepReport, TrainerError> {
        if step != self.step {
            return Err(TrainerError::Other(format!("asked for step {step}, but {} steps are completed", self.step)));
        }
        let train = self.config.train.clone();
        let (seed, block_size) = (self.config.run.seed, self.config.model.block_size);
        let global_batch = train.global_batch;
        // Dropout masks depend on (seed, step, rank) only, so a resumed run draws the same ones.
        tch::manual_seed((seed as i64).wrapping_add((step as i64).wrapping_mul(1_000_003)).wrapping_add(self.rank as i64));
        let cursor = step * global_batch as u64;
        let mut times = Times::default();
        let t = Instant::now();
        let ids = self.sampler.indices(cursor, global_batch, self.rank, self.world_size);
        let mut batches = Vec::new();
        for chunk in ids.chunks(train.micro_batch) {
            let (x, y) = self.batch(&self.train, chunk)?;
            batches.push((x, y, chunk.len() as f64 / global_batch as f64));
        }
        times.data += t.elapsed().as_secs_f64();
        self.trace_samples(step, &ids);

        let lr = model::lr_at(step, &train);
        let (loss, grad_norm) = match self.strategy {
            Strategy::Ddp => self.ddp_step(step, &batches, lr, comm, &mut times)?,
            Strategy::Zero1 | Strategy::Zero2 => self.zero12_step(step, &batches, lr, comm, &mut times)?,
            Strategy::Zero3 => self.zero3_step(step, &batches, lr, comm, &mut times)?,
        };
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
            data_seconds: times.data,
            compute_seconds: times.compute,
            comm_seconds: times.comm,
        })
    }

    /// `ddp`: per-parameter gradients, one all-reduce (the loss shares ride at its end), the
    /// same clipping and AdamW update on every rank.
    fn ddp_step(
        &mut self,
        step: u64,
        batches: &[(Tensor, Tensor, f64)],
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<(f64, f64), TrainerError> {
        let t = Instant::now();
        let mut share = LossShare::default();
        for (x, y, weight) in batches {
            let loss = with_autocast(self.bf16, || self.model.loss(x, y, true));
            (&loss * *weight).f_backward()?;
            share.add(&loss, *weight)?;
        }
        let loss_share = share.value()?;
        times.compute += t.elapsed().as_secs_f64();
        let State::Replica { params, .. } = &self.state else { unreachable!("ddp keeps a replica") };
        let params: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
        let clip = self.config.train.grad_clip;
        let mut loss = loss_share;
        let mut reduced_grad_norm = None;
        if self.world_size > 1 && comm.works_on_device() {
            let t = Instant::now();
            if let Err(error) = self.reduce_grads_on_device(step, &params, comm).and_then(|()| {
                let share =
                    Tensor::f_from_slice(&[loss_share as f32]).and_then(|t| t.f_to_device(self.device)).map_err(|e| e.to_string())?;
                let tag = self.next_tag(step);
                comm.all_reduce_tensor(&share, tag)?;
                loss = share.f_double_value(&[0]).map_err(|e| e.to_string())?;
                Ok(())
            }) {
                model::zero_grads(&params);
                return Err(TrainerError::Collective { step, error });
            }
            times.comm += t.elapsed().as_secs_f64();
        } else if self.world_size > 1 {
            let t = Instant::now();
            let mut flat = model::flat_grads(&params);
            flat.push(loss_share as f32);
            let tag = self.next_tag(step);
            let reduced = comm.all_reduce(flat, tag);
            let mut flat = match reduced {
                Ok(flat) => flat,
                Err(error) => {
                    // Nothing was applied: the parameters stay those after `step` steps, ready
                    // to redo this step in the next membership generation.
                    model::zero_grads(&params);
                    return Err(TrainerError::Collective { step, error });
                }
            };
            loss = flat.pop().map_or(f64::NAN, f64::from);
            times.comm += t.elapsed().as_secs_f64();
            // Norm and clipping on the host copy we already hold, before it is written back.
            let t = Instant::now();
            reduced_grad_norm = Some(model::clip_flat_grads(&params, &mut flat, clip)?);
            model::set_flat_grads(&params, &flat)?;
            times.compute += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        // With grad_clip <= 0, clip_grad_norm only measures.
        let grad_norm = match reduced_grad_norm {
            Some(norm) => norm,
            None => model::clip_grad_norm(&params, clip),
        };
        let State::Replica { optimizer, .. } = &mut self.state else { unreachable!() };
        optimizer.step(&params, lr);
        model::zero_grads(&params);
        times.compute += t.elapsed().as_secs_f64();
        Ok((loss, grad_norm))
    }

    /// Sums the gradients of `params` over the ranks where they are (NCCL), bucket by bucket
    /// in the order the backward pass finished them: each bucket is flattened into one buffer
    /// of its own size, reduced and copied back, so the extra memory is one bucket and the
    /// collectives are a handful, not one per parameter. NCCL runs on libtorch's stream, so
    /// each bucket's reduction is queued behind its copy and the host goes on queueing the
    /// next bucket meanwhile. (libtorch reports gradients to hooks tch does not expose, so
    /// buckets cannot start before the whole backward pass has finished.)
    fn reduce_grads_on_device(&mut self, step: u64, params: &[Tensor], comm: &mut dyn Comm) -> Result<(), String> {
        let _no_grad = tch::no_grad_guard();
        for range in self.buckets.clone() {
            let grads: Vec<Tensor> = params[range].iter().map(|p| p.grad()).collect();
            if grads.iter().any(|g| !g.defined()) {
                return Err("a parameter has no gradient after the backward pass".into());
            }
            let flat = Tensor::f_cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0).map_err(|e| e.to_string())?;
            let tag = self.next_tag(step);
            comm.all_reduce_tensor(&flat, tag)?;
            let mut offset = 0;
            for g in &grads {
                let n = g.numel() as i64;
                g.shallow_clone().f_copy_(&flat.narrow(0, offset, n).view_as(g)).map_err(|e| e.to_string())?;
                offset += n;
            }
        }
        Ok(())
    }

    /// `zero1`/`zero2`: the model computes on a fresh leaf over the flat parameters, so the
    /// backward pass leaves one flat gradient (freed after the step). zero1 all-reduces it,
    /// zero2 reduce-scatters it; each rank updates its shard; the shards are all-gathered.
    fn zero12_step(
        &mut self,
        step: u64,
        batches: &[(Tensor, Tensor, f64)],
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<(f64, f64), TrainerError> {
        let t = Instant::now();
        let State::Sharded(s) = &self.state else { unreachable!("zero1/2 keep a shard") };
        let full = s.full.as_ref().expect("zero1/2 hold the flat parameters").shallow_clone();
        let layout = s.layout.clone();
        let leaf = full.f_detach()?.f_set_requires_grad(true)?;
        let mut share = LossShare::default();
        {
            let step_model = self.model.with_tensors(param_views(&leaf, &self.model.param_shapes())?)?;
            for (x, y, weight) in batches {
                let loss = with_autocast(self.bf16, || step_model.loss(x, y, true));
                (&loss * *weight).f_backward()?;
                share.add(&loss, *weight)?;
            }
        }
        let loss_share = share.value()?;
        if self.shards_on_device(comm) {
            let grad = leaf.grad();
            drop(leaf);
            times.compute += t.elapsed().as_secs_f64();
            return self.zero12_on_device(step, &full, &grad, loss_share, lr, comm, times);
        }
        let flat = host_vec(&leaf.grad());
        drop(leaf);
        times.compute += t.elapsed().as_secs_f64();

        let (w, r) = (self.world_size, self.rank);
        let chunk = layout.chunk_len(0);
        let numel = layout.numel();
        let (loss, norm, grad) = if self.strategy == Strategy::Zero1 || w == 1 {
            let t = Instant::now();
            let mut flat = flat;
            let mut loss = loss_share;
            if w > 1 {
                flat.push(loss_share as f32);
                let tag = self.next_tag(step);
                flat = Self::collective(step, comm.all_reduce(flat, tag))?;
                loss = flat.pop().map_or(f64::NAN, f64::from);
            }
            times.comm += t.elapsed().as_secs_f64();
            // The norm of the whole reduced gradient, exactly as ddp computes it.
            let norm = model::flat_grad_norm(&flat[..numel], &self.model.param_numels());
            (loss, norm, flat[r * chunk..(r + 1) * chunk].to_vec())
        } else {
            let t = Instant::now();
            let tag = self.next_tag(step);
            let reduced = Self::collective(step, comm.reduce_scatter(flat, tag))?;
            let mine = reduced[r * chunk..(r + 1) * chunk].to_vec();
            let (loss, norm) = self.loss_and_norm_over_shards(step, loss_share, model::sum_of_squares(&mine), comm)?;
            times.comm += t.elapsed().as_secs_f64();
            (loss, norm, mine)
        };
        let t = Instant::now();
        self.update_shard(&tensor_of(&grad, self.device)?, norm, lr)?;
        let State::Sharded(s) = &self.state else { unreachable!() };
        let mine = host_vec(&s.shard);
        times.compute += t.elapsed().as_secs_f64();
        if w > 1 {
            let t = Instant::now();
            let mut gathered = vec![0f32; layout.padded_len(0)];
            gathered[r * chunk..(r + 1) * chunk].copy_from_slice(&mine);
            let tag = self.next_tag(step);
            let gathered = Self::collective(step, comm.all_gather(gathered, tag))?;
            write_into(&full, &gathered)?;
            times.comm += t.elapsed().as_secs_f64();
        }
        Ok((loss, norm))
    }

    /// Whether the sharded strategies keep every buffer on the device: with collectives that
    /// work there (NCCL), or alone on a GPU. Otherwise (the ring) buffers go through host
    /// memory, and the host path keeps zero1 bit-identical to ddp. The choice must be the same
    /// on every rank, since the two zero1 paths issue different collectives: it depends on the
    /// generation's backend and world size only, never on this rank's device.
    fn shards_on_device(&self, comm: &dyn Comm) -> bool {
        comm.works_on_device() || (self.world_size == 1 && self.device.is_cuda())
    }

    /// `zero1`/`zero2` without leaving the device: the flat gradient `grad` is all-reduced
    /// (zero1) or reduce-scattered (zero2) in place, this rank's chunk of it updates its shard,
    /// which is a view into `full`, and `full` is all-gathered in place.
    #[allow(clippy::too_many_arguments)]
    fn zero12_on_device(
        &mut self,
        step: u64,
        full: &Tensor,
        grad: &Tensor,
        loss_share: f64,
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<(f64, f64), TrainerError> {
        let State::Sharded(s) = &self.state else { unreachable!("zero1/2 keep a shard") };
        let (chunk, numel) = (s.layout.chunk_len(0) as i64, s.layout.numel() as i64);
        let (w, r) = (self.world_size, self.rank as i64);
        let mine = grad.narrow(0, r * chunk, chunk);
        let t = Instant::now();
        let (loss, norm) = if self.strategy == Strategy::Zero1 || w == 1 {
            if w > 1 {
                let tag = self.next_tag(step);
                Self::collective(step, comm.all_reduce_tensor(grad, tag))?;
            }
            let sum_sq = sum_of_squares(&grad.narrow(0, 0, numel))?;
            // The loss shares still need summing (the gradient's norm is already global).
            let (loss, _) = self.loss_and_norm_over_shards(step, loss_share, 0.0, comm)?;
            (loss, sum_sq.sqrt())
        } else {
            let tag = self.next_tag(step);
            Self::collective(step, comm.reduce_scatter_tensor(grad, tag))?;
            self.loss_and_norm_over_shards(step, loss_share, sum_of_squares(&mine)?, comm)?
        };
        times.comm += t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.update_shard(&mine, norm, lr)?;
        times.compute += t.elapsed().as_secs_f64();
        if w > 1 {
            let t = Instant::now();
            let tag = self.next_tag(step);
            Self::collective(step, comm.all_gather_tensor(full, tag))?;
            times.comm += t.elapsed().as_secs_f64();
        }
        Ok((loss, norm))
    }

    /// All-gathers stage `unit`'s parameters (`zero3`) into a fresh flat leaf (padded) that
    /// records gradients, and returns it with its per-parameter views.
    fn gather_unit(&mut self, unit: usize, step: u64, comm: &mut dyn Comm, grad: bool) -> Result<(Tensor, Vec<Tensor>), TrainerError> {
        let State::Sharded(s) = &self.state else { unreachable!("zero3 keeps a shard") };
        let (chunk, at) = (s.layout.chunk_len(unit) as i64, s.layout.shard_offset(unit) as i64);
        let flat = Tensor::f_zeros([s.layout.padded_len(unit) as i64], (Kind::Float, self.device))?;
        flat.narrow(0, self.rank as i64 * chunk, chunk).f_copy_(&s.shard.narrow(0, at, chunk))?;
        if self.world_size > 1 {
            let tag = self.next_tag(step);
            Self::collective(step, comm.all_gather_tensor(&flat, tag))?;
        }
        let leaf = flat.f_set_requires_grad(grad)?;
        let range = self.model.stage_params()[unit].clone();
        let views = param_views(&leaf, &self.model.param_shapes()[range])?;
        Ok((leaf, views))
    }

    /// Reduce-scatters stage `unit`'s gradient (`zero3`) and adds this rank's chunk to `acc`.
    fn scatter_unit_grad(&mut self, unit: usize, leaf: &Tensor, acc: &Tensor, step: u64, comm: &mut dyn Comm) -> Result<(), TrainerError> {
        let State::Sharded(s) = &self.state else { unreachable!() };
        let (chunk, at) = (s.layout.chunk_len(unit) as i64, s.layout.shard_offset(unit) as i64);
        let grad = leaf.grad().f_contiguous()?;
        if self.world_size > 1 {
            let tag = self.next_tag(step);
            Self::collective(step, comm.reduce_scatter_tensor(&grad, tag))?;
        }
        let _ = acc.narrow(0, at, chunk).f_add_(&grad.narrow(0, self.rank as i64 * chunk, chunk))?;
        Ok(())
    }

    /// Seeds dropout for one stage of one micro-batch, so that its recomputation in the
    /// backward pass draws the very same mask.
    fn seed_stage(&self, step: u64, micro: usize, unit: usize) {
        let base = (self.config.run.seed as i64).wrapping_add((step as i64).wrapping_mul(1_000_003)).wrapping_add(self.rank as i64);
        tch::manual_seed(base.wrapping_mul(31).wrapping_add((micro as i64) << 20).wrapping_add(unit as i64));
    }

    /// The stage inputs of the forward pass under `zero3`: `inputs[u][m]` is what stage `u`
    /// received for micro-batch `m` (stage 0 takes token ids), and the head's input.
    fn zero3_forward(
        &mut self,
        step: u64,
        batches: &[(Tensor, Tensor, f64)],
        train: bool,
        comm: &mut dyn Comm,
    ) -> Result<(Vec<Vec<Tensor>>, Vec<Tensor>), TrainerError> {
        let _no_grad = tch::no_grad_guard();
        let stages = self.model.stage_params().len();
        let (_, e) = self.gather_unit(0, step, comm, false)?;
        let mut xs: Vec<Tensor> = Vec::with_capacity(batches.len());
        for (m, (x, _, _)) in batches.iter().enumerate() {
            self.seed_stage(step, m, 0);
            xs.push(with_autocast(self.bf16, || self.model.embed_stage(&e[0], &e[1], x, train)));
        }
        drop(e);
        let mut inputs = vec![Vec::new()];
        for unit in 1..stages - 1 {
            let (_, p) = self.gather_unit(unit, step, comm, false)?;
            let mut next = Vec::with_capacity(xs.len());
            for (m, x) in xs.iter().enumerate() {
                self.seed_stage(step, m, unit);
                next.push(with_autocast(self.bf16, || self.model.block_stage(&p, x, train)));
            }
            inputs.push(std::mem::replace(&mut xs, next));
        }
        Ok((inputs, xs))
    }

    /// `zero3`: see the module documentation.
    fn zero3_step(
        &mut self,
        step: u64,
        batches: &[(Tensor, Tensor, f64)],
        lr: f64,
        comm: &mut dyn Comm,
        times: &mut Times,
    ) -> Result<(f64, f64), TrainerError> {
        let t = Instant::now();
        let State::Sharded(s) = &self.state else { unreachable!() };
        let acc = Tensor::f_zeros([s.layout.shard_len() as i64], (Kind::Float, self.device))?;
        let stages = self.model.stage_params().len();
        let (inputs, head_inputs) = self.zero3_forward(step, batches, true, comm)?;

        // The head: loss, the gradient of its input, and the head's parameter gradients.
        let (e_leaf, e) = self.gather_unit(0, step, comm, true)?;
        let (f_leaf, f) = self.gather_unit(stages - 1, step, comm, true)?;
        let mut share = LossShare::default();
        let mut upstream = Vec::with_capacity(batches.len());
        for (x, (_, y, weight)) in head_inputs.iter().zip(batches) {
            let x = x.f_detach()?.f_set_requires_grad(true)?;
            let loss = with_autocast(self.bf16, || self.model.head_loss_stage(&e[0], &f, &x, y));
            (&loss * *weight).f_backward()?;
            share.add(&loss, *weight)?;
            upstream.push(x.grad());
        }
        let loss_share = share.value()?;
        drop((e, f));
        self.scatter_unit_grad(0, &e_leaf, &acc, step, comm)?;
        self.scatter_unit_grad(stages - 1, &f_leaf, &acc, step, comm)?;
        drop((e_leaf, f_leaf));

        // Blocks, last to first: gather, recompute from the kept input, back-propagate.
        for unit in (1..stages - 1).rev() {
            let (leaf, p) = self.gather_unit(unit, step, comm, true)?;
            for (m, x) in inputs[unit].iter().enumerate() {
                let x = x.f_detach()?.f_set_requires_grad(true)?;
                self.seed_stage(step, m, unit);
                let y = with_autocast(self.bf16, || self.model.block_stage(&p, &x, true));
                y.f_mul(&upstream[m])?.f_sum(Kind::Float)?.f_backward()?;
                upstream[m] = x.grad();
            }
            drop(p);
            self.scatter_unit_grad(unit, &leaf, &acc, step, comm)?;
        }
        // The embeddings.
        let (leaf, e) = self.gather_unit(0, step, comm, true)?;
        for (m, (x, _, _)) in batches.iter().enumerate() {
            self.seed_stage(step, m, 0);
            let y = with_autocast(self.bf16, || self.model.embed_stage(&e[0], &e[1], x, true));
            y.f_mul(&upstream[m])?.f_sum(Kind::Float)?.f_backward()?;
        }
        drop(e);
        self.scatter_unit_grad(0, &leaf, &acc, step, comm)?;
        drop(leaf);
        times.compute += t.elapsed().as_secs_f64();

        let (loss, norm) = self.loss_and_norm_over_shards(step, loss_share, sum_of_squares(&acc)?, comm)?;
        self.update_shard(&acc, norm, lr)?;
        Ok((loss, norm))
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
        let tag = self.next_tag(step);
        let totals = Self::collective(step, comm.all_reduce(vec![loss_share as f32, sum_sq as f32], tag))?;
        Ok((f64::from(totals[0]), f64::from(totals[1]).sqrt()))
    }

    /// Clips this rank's shard of the gradient `grad` (in place) by the global `norm` and
    /// applies AdamW to this rank's shard of the parameters.
    fn update_shard(&mut self, grad: &Tensor, norm: f64, lr: f64) -> Result<(), TrainerError> {
        model::clip_tensor(grad, norm, self.config.train.grad_clip);
        let State::Sharded(s) = &mut self.state else { unreachable!("only sharded states have a shard") };
        s.optimizer.step(&s.shard, grad, lr);
        Ok(())
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
    /// sequences, always the same ones, split over the ranks. Under `zero3` every rank takes
    /// part in the stage gathers, so it needs `comm` and must be called on every rank.
    pub fn evaluate(&mut self, step: u64, comm: &mut dyn Comm) -> Result<EvalReport, TrainerError> {
        let _guard = tch::no_grad_guard();
        let num_val = data::num_samples(self.val.len(), self.config.model.block_size);
        let ids = data::eval_indices(num_val, self.config.eval.sequences, self.rank, self.world_size);
        let mut batches = Vec::new();
        for chunk in ids.chunks(self.config.train.micro_batch) {
            let (x, y) = self.batch(&self.val, chunk)?;
            batches.push((x, y, chunk.len() as f64));
        }
        let mut loss_sum = 0.0;
        if self.strategy == Strategy::Zero3 {
            let stages = self.model.stage_params().len();
            let (_, head_inputs) = self.zero3_forward(step, &batches, false, comm)?;
            let (_, e) = self.gather_unit(0, step, comm, false)?;
            let (_, f) = self.gather_unit(stages - 1, step, comm, false)?;
            for (x, (_, y, n)) in head_inputs.iter().zip(&batches) {
                let loss = with_autocast(self.bf16, || self.model.head_loss_stage(&e[0], &f, x, y));
                loss_sum += loss.to_kind(Kind::Double).f_double_value(&[])? * n;
            }
        } else {
            for (x, y, n) in &batches {
                let loss = with_autocast(self.bf16, || self.model.loss(x, y, false));
                loss_sum += loss.to_kind(Kind::Double).f_double_value(&[])? * n;
            }
        }
        Ok(EvalReport { generation: self.generation, step, loss_sum, sequences: ids.len() as u64 })
    }

    /// The layout this rank's checkpoint shard follows: the strategy's own, or for `ddp` (whose
    /// ranks all hold everything) one unit split over the ranks, so that each writes 1/W.
    fn checkpoint_layout(&self) -> ShardLayout {
        match &self.state {
            State::Replica { .. } => ShardLayout::new(self.world_size as u32, vec![self.model.num_params()]),
            State::Sharded(s) => s.layout.clone(),
        }
    }

    /// Starts writing this rank's part of the checkpoint into `dir` (a temporary folder the
    /// coordinator commits later). The training loop pays only for copying its shard into host
    /// memory: the files are written, fsynced and hashed by a background thread, which calls
    /// `done` with what it wrote. If the previous write is still running, this waits for it
    /// first; the seconds waited are returned (a metric counts them).
    pub fn save_checkpoint(&mut self, step: u64, dir: &Path, done: WriteDone) -> Result<f64, TrainerError> {
        if step != self.step {
            return Err(TrainerError::Other(format!("asked to checkpoint step {step}, but {} steps are completed", self.step)));
        }
        let waited = match self.writer.take() {
            Some(writer) => {
                let t = Instant::now();
                let _ = writer.join();
                t.elapsed().as_secs_f64()
            }
            None => 0.0,
        };
        let layout = self.checkpoint_layout();
        let rank = self.rank as u32;
        let snapshot = match &self.state {
            State::Replica { params, optimizer } => {
                let (m, v) = optimizer.moments();
                let mut parts = [vec![0f32; layout.shard_len()], vec![0f32; layout.shard_len()], vec![0f32; layout.shard_len()]];
                for piece in layout.owned(rank) {
                    for (out, tensors) in parts.iter_mut().zip([params.as_slice(), &m, &v]) {
                        let values = model::flatten_range(tensors, piece.global.clone());
                        out[piece.local..piece.local + values.len()].copy_from_slice(&values);
                    }
                }
                let [params, exp_avg, exp_avg_sq] = parts;
                ShardSnapshot { rank, step, params, exp_avg, exp_avg_sq }
            }
            State::Sharded(s) => {
                let (m, v) = s.optimizer.moments();
                ShardSnapshot { rank, step, params: host_vec(&s.shard), exp_avg: host_vec(m), exp_avg_sq: host_vec(v) }
            }
        };
        // Rank 0 also writes what is not sharded: counters and layout, the model's shape, the
        // tokenizer.
        let mut extra: Vec<(String, Vec<u8>)> = Vec::new();
        if rank == 0 {
            let state = TrainState {
                step: self.step,
                cursor: self.step * self.config.train.global_batch as u64,
                seed: self.config.run.seed,
                world_size: self.world_size as u32,
                strategy: self.strategy.name().into(),
                tokens_seen: self.tokens_seen(),
                vocab_size: self.meta.vocab_size,
                layout,
            };
            extra.push((checkpoint::STATE_FILE.into(), json(&state)));
            extra.push((MODEL_CONFIG_FILE.into(), json(&self.gpt_config)));
            let tokenizer = std::fs::read(self.config.data.dir.join(TOKENIZER_FILE))
                .map_err(|e| TrainerError::Other(format!("cannot read the tokenizer: {e}")))?;
            extra.push((TOKENIZER_FILE.into(), tokenizer));
        }
        let dir = dir.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                checkpoint::lower_thread_priority();
                done(write_checkpoint_part(&dir, &snapshot, &extra).map_err(|e| e.to_string()))
            })
            .map_err(|e| TrainerError::Other(format!("cannot start the checkpoint writer: {e}")))?;
        self.writer = Some(writer);
        Ok(waited)
    }
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

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("plain data serialises")
}

/// The background half of [`Trainer::save_checkpoint`]: this rank's shard file and (rank 0)
/// the small files, each fsynced, then the folder.
fn write_checkpoint_part(dir: &Path, snapshot: &ShardSnapshot, extra: &[(String, Vec<u8>)]) -> Result<Vec<FileDigest>, TrainerError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::Other(format!("cannot create {}: {e}", dir.display())))?;
    // Test hook: `TROUPE_FAULT_KILL_DURING_CHECKPOINT=STEP:RANK` kills this process half-way
    // through that rank's shard file of that step, as a machine failure would.
    let fault = || {
        let wanted = std::env::var("TROUPE_FAULT_KILL_DURING_CHECKPOINT").ok();
        if wanted.as_deref() == Some(&format!("{}:{}", snapshot.step, snapshot.rank)) {
            eprintln!("fault injection: rank {} dies while writing its checkpoint shard of step {}", snapshot.rank, snapshot.step);
            std::process::abort();
        }
    };
    let mut files = vec![checkpoint::write_shard(dir, snapshot, &fault)?];
    for (name, bytes) in extra {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| TrainerError::Other(format!("cannot write {}: {e}", path.display())))?;
        checkpoint::fsync_path(&path)?;
        files.push(checkpoint::digest_file(&path)?);
    }
    checkpoint::fsync_path(dir)?;
    Ok(files)
}

/// Builds the training state the strategy keeps, from the fresh model or from a checkpoint.
fn build_state(
    strategy: Strategy,
    mut model: Gpt,
    config: &Config,
    rank: u32,
    world: u32,
    reader: Option<&ShardReader>,
) -> Result<(Gpt, State), TrainerError> {
    let numels = model.param_numels();
    let decay: Vec<bool> = model.param_shapes().iter().map(|s| s.len() >= 2).collect();
    let device = model.device();
    let adamw = AdamWConfig::from_train_config(&config.train);
    let numel = model.num_params();
    let read = |part: ShardPart, range: std::ops::Range<usize>| -> Result<Vec<f32>, TrainerError> {
        Ok(reader.expect("only called when resuming").read_range(part, range)?)
    };
    match strategy {
        Strategy::Ddp => {
            let params = model.parameter_tensors();
            let mut optimizer = AdamW::with_decay(&params, adamw, decay);
            if let Some(reader) = reader {
                model::unflatten_into(&params, &read(ShardPart::Params, 0..numel)?)?;
                let (m, v) = optimizer.moments();
                model::unflatten_into(&m, &read(ShardPart::ExpAvg, 0..numel)?)?;
                model::unflatten_into(&v, &read(ShardPart::ExpAvgSq, 0..numel)?)?;
                optimizer.set_step_count(reader.step());
            }
            Ok((model, State::Replica { params, optimizer }))
        }
        Strategy::Zero1 | Strategy::Zero2 | Strategy::Zero3 => {
            let units: Vec<usize> = if strategy == Strategy::Zero3 {
                model.stage_params().iter().map(|r| numels[r.clone()].iter().sum()).collect()
            } else {
                vec![numel]
            };
            let layout = ShardLayout::new(world, units);
            let owned = layout.owned(rank);
            let params = model.parameter_tensors();
            // This rank's shard of a flat part: from the checkpoint, or from the fresh model
            // (whose moments are zero).
            let shard_of = |part: ShardPart| -> Result<Vec<f32>, TrainerError> {
                let mut out = vec![0f32; layout.shard_len()];
                for p in &owned {
                    let values = match (reader, part) {
                        (Some(_), _) => read(part, p.global.clone())?,
                        (None, ShardPart::Params) => model::flatten_range(&params, p.global.clone()),
                        (None, _) => continue,
                    };
                    out[p.local..p.local + values.len()].copy_from_slice(&values);
                }
                Ok(out)
            };
            let mut optimizer = ShardAdamW::new(adamw, layout.shard_len(), shard_segments(&layout, rank, &numels, &decay), device);
            if let Some(reader) = reader {
                let (m, v) = optimizer.moments();
                write_into(m, &shard_of(ShardPart::ExpAvg)?)?;
                write_into(v, &shard_of(ShardPart::ExpAvgSq)?)?;
                optimizer.set_step_count(reader.step());
            }
            if strategy == Strategy::Zero3 {
                let shard = tensor_of(&shard_of(ShardPart::Params)?, device)?;
                drop(params);
                model.release_parameters();
                return Ok((model, State::Sharded(Sharded { layout, full: None, shard, optimizer })));
            }
            // zero1/2: the whole model as one flat buffer (padded) that the model's parameters
            // view. Filled without a host copy of the whole model in between, so that building
            // needs no more than twice the parameters' size.
            let full = Tensor::f_zeros([layout.padded_len(0) as i64], (Kind::Float, device))?;
            let views = param_views(&full, &model.param_shapes())?;
            match reader {
                None => {
                    let _no_grad = tch::no_grad_guard();
                    for (view, param) in views.iter().zip(&params) {
                        view.shallow_clone().f_copy_(param)?;
                    }
                }
                Some(_) => {
                    drop(params);
                    model.release_parameters();
                    write_into(&full.narrow(0, 0, numel as i64), &read(ShardPart::Params, 0..numel)?)?;
                }
            }
            let model = model.with_tensors(views)?;
            let chunk = layout.chunk_len(0);
            let shard = full.narrow(0, (rank as usize * chunk) as i64, chunk as i64);
            Ok((model, State::Sharded(Sharded { layout, full: Some(full), shard, optimizer })))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// A barrier for two threads that gives up (panics) after a minute, so that a rank that
    /// failed cannot leave the other waiting until the test runner's kill.
    #[derive(Default)]
    struct Barrier {
        /// (threads arrived in this round, rounds completed)
        state: Mutex<(usize, u64)>,
        turned: Condvar,
    }

    impl Barrier {
        fn wait(&self) {
            let mut state = self.state.lock().unwrap();
            let round = state.1;
            state.0 += 1;
            if state.0 == 2 {
                *state = (0, round + 1);
                self.turned.notify_all();
                return;
            }
            let (state, timeout) = self.turned.wait_timeout_while(state, Duration::from_secs(60), |s| s.1 == round).unwrap();
            assert!(!timeout.timed_out(), "the other rank never reached the barrier (round {})", state.1);
        }
    }

    /// Two ranks in one process, summing through shared memory. With `on_device` the trainer
    /// takes the path it takes with NCCL (gradients reduced as tensors, bucket by bucket),
    /// here through the default host implementation of [`Comm::all_reduce_tensor`].
    struct InMemory {
        rank: usize,
        slots: Arc<Mutex<[Vec<f32>; 2]>>,
        barrier: Arc<Barrier>,
        on_device: bool,
    }

    impl InMemory {
        /// Deposits `data`, then combines both ranks' buffers with `f` once both are there.
        fn exchange(&mut self, data: Vec<f32>, f: impl FnOnce(&[Vec<f32>; 2]) -> Vec<f32>) -> Vec<f32> {
            self.slots.lock().unwrap()[self.rank] = data;
            self.barrier.wait();
            let out = f(&self.slots.lock().unwrap());
            // Both have read before either deposits its next buffer.
            self.barrier.wait();
            out
        }
    }

    impl Comm for InMemory {
        fn all_reduce(&mut self, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, String> {
            Ok(self.exchange(data, |s| s[0].iter().zip(&s[1]).map(|(a, b)| a + b).collect()))
        }
        fn reduce_scatter(&mut self, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, String> {
            // Every chunk summed: chunk `rank` is what the caller keeps.
            self.all_reduce(data, tag)
        }
        fn all_gather(&mut self, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, String> {
            Ok(self.exchange(data, |s| {
                let half = s[0].len() / 2;
                s[0][..half].iter().chain(&s[1][half..]).copied().collect()
            }))
        }
        fn broadcast(&mut self, data: Vec<f32>, root: u32, _: CollectiveTag) -> Result<Vec<f32>, String> {
            Ok(self.exchange(data, |s| s[root as usize].clone()))
        }
        fn works_on_device(&self) -> bool {
            self.on_device
        }
    }

    /// A prepared corpus of two plays, once per test process.
    fn data_dir() -> PathBuf {
        static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        DIR.get_or_init(|| {
            let cache = std::env::var_os("TROUPE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/troupe"));
            let texts = data::fetch_shakespeare(&cache).expect("the Shakespeare corpus");
            let mut plays: Vec<PathBuf> = std::fs::read_dir(&texts)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with("_gut.txt"))
                .collect();
            plays.sort();
            plays.truncate(2);
            let out = std::env::temp_dir().join(format!("troupe-trainer-test-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&out);
            data::prepare(&data::PrepareOptions {
                inputs: plays,
                file_filter: None,
                out: out.clone(),
                vocab_size: 300,
                val_fraction: 0.2,
                seed: 3,
            })
            .expect("prepare the test corpus");
            out
        })
        .clone()
    }

    fn config(bucket_mb: f64, strategy: Strategy) -> Config {
        let mut config = Config::default_config();
        config.data.dir = data_dir();
        config.model.n_layer = 2;
        config.model.n_head = 2;
        config.model.n_embd = 32;
        config.model.block_size = 16;
        config.train.global_batch = 8;
        config.train.micro_batch = 2;
        config.train.warmup_steps = 1;
        // Clipping takes part: the norm of this tiny model's gradient is above it.
        config.train.grad_clip = 0.05;
        config.parallel.bucket_mb = bucket_mb;
        config.parallel.strategy = strategy;
        config
    }

    /// Trains `steps` steps with two ranks; returns each rank's parameters and the losses.
    fn train_pair(on_device: bool, bucket_mb: f64, strategy: Strategy, steps: u64) -> Vec<(Vec<f32>, Vec<f64>, usize)> {
        let slots = Arc::new(Mutex::new([Vec::new(), Vec::new()]));
        let barrier = Arc::new(Barrier::default());
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let mut comm = InMemory { rank, slots: slots.clone(), barrier: barrier.clone(), on_device };
                let setup = TrainerSetup {
                    config: config(bucket_mb, strategy),
                    rank,
                    world_size: 2,
                    device: Device::Cpu,
                    resume_from: None,
                    start_step: 0,
                };
                std::thread::spawn(move || {
                    let mut trainer = Trainer::new(setup).expect("trainer");
                    trainer.set_membership(1, rank, 2).unwrap();
                    let reports: Vec<StepReport> = (0..steps).map(|s| trainer.step(s, &mut comm).expect("step")).collect();
                    // Clipping takes part: every step's norm is above train.grad_clip.
                    assert!(reports.iter().all(|r| r.grad_norm > 0.05), "{reports:?}");
                    let losses: Vec<f64> = reports.iter().map(|r| r.loss).collect();
                    let params = match &trainer.state {
                        State::Replica { params, .. } => model::flatten(params),
                        State::Sharded(s) => host_vec(&s.shard),
                    };
                    (params, losses, trainer.buckets.len())
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }

    #[test]
    fn gradients_reduced_in_buckets_as_tensors_train_exactly_like_the_host_path() {
        // 16 KiB buckets: the 2-layer model's ~30 parameters fall into several.
        let bucketed = train_pair(true, 1.0 / 64.0, Strategy::Ddp, 3);
        let host = train_pair(false, 1.0 / 64.0, Strategy::Ddp, 3);
        assert!(bucketed[0].2 > 3, "{} buckets", bucketed[0].2);
        assert_eq!(bucketed[0].0, bucketed[1].0, "both ranks hold the same parameters");
        assert_eq!(bucketed[0].1, bucketed[1].1, "and report the same losses");
        assert_eq!(bucketed[0].0, host[0].0, "the bucketed path gives the host path's parameters, bit for bit");
        assert_eq!(bucketed[0].1, host[0].1);
        // One bucket for the whole model gives the same too.
        let one = train_pair(true, 1024.0, Strategy::Ddp, 3);
        assert_eq!(one[0].2, 1);
        assert_eq!(one[0].0, bucketed[0].0);
    }

    /// The sharded strategies' device path (flat buffers reduced, scattered and gathered in
    /// place, as under NCCL) against their host path: the same training, up to the order in
    /// which the gradient's norm is summed.
    #[test]
    fn sharded_strategies_train_alike_on_the_device_path_and_the_host_path() {
        for strategy in [Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
            let device = train_pair(true, 25.0, strategy, 3);
            let host = train_pair(false, 25.0, strategy, 3);
            for rank in 0..2 {
                let (a, b) = (&device[rank], &host[rank]);
                let diff = a.0.iter().zip(&b.0).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                println!("{strategy} rank {rank}: parameters differ by {diff} after 3 steps");
                assert!(diff < 1e-5, "{strategy} rank {rank}: parameters differ by {diff}");
                for (x, y) in a.1.iter().zip(&b.1) {
                    assert!((x - y).abs() < 1e-6, "{strategy}: losses {:?} and {:?}", a.1, b.1);
                }
            }
        }
    }

    /// A mixed world of three: ranks 0 and 1 an NCCL group (here an in-memory pair), rank 2 a
    /// CPU worker in a ring with the group's rank 0 (another pair). Every operation gives every
    /// rank what a single group of three would.
    #[test]
    fn a_mixed_generation_sums_over_the_group_and_the_ring() {
        type Pair = (Arc<Mutex<[Vec<f32>; 2]>>, Arc<Barrier>);
        let pair = || -> Pair { (Arc::new(Mutex::new([Vec::new(), Vec::new()])), Arc::new(Barrier::default())) };
        let (group, ring) = (pair(), pair());
        // (rank in the group, rank in the ring) of each of the three ranks.
        let places: Vec<(Option<(Pair, usize)>, Option<(Pair, usize)>)> =
            vec![(Some((group.clone(), 0)), Some((ring.clone(), 0))), (Some((group, 1)), None), (None, Some((ring, 1)))];
        let tag = |seq| CollectiveTag { step: 0, seq };
        let ranks: Vec<_> = places
            .into_iter()
            .enumerate()
            .map(|(rank, (group, ring))| {
                std::thread::spawn(move || {
                    let member = |place: Option<(Pair, usize)>| {
                        place.map(|((slots, barrier), rank)| Box::new(InMemory { rank, slots, barrier, on_device: false }) as Box<dyn Comm>)
                    };
                    let mut m = Mixed { group: member(group), ring: member(ring), rank: rank as u32, world_size: 3 };
                    let own = |v: f32| vec![v + rank as f32; 6];
                    let sum = m.all_reduce(own(1.0), tag(1)).unwrap();
                    let scattered = m.reduce_scatter(own(10.0), tag(2)).unwrap();
                    let gathered = m.all_gather(vec![rank as f32 + 1.0; 6], tag(3)).unwrap();
                    let broadcast = m.broadcast(own(100.0), 1, tag(4)).unwrap();
                    (rank, sum, scattered, gathered, broadcast)
                })
            })
            .collect();
        for handle in ranks {
            let (rank, sum, scattered, gathered, broadcast) = handle.join().unwrap();
            assert_eq!(sum, vec![6.0; 6], "rank {rank}: 1 + 2 + 3");
            assert_eq!(&scattered[rank * 2..rank * 2 + 2], &[33.0, 33.0], "rank {rank}: its chunk of 11 + 12 + 13");
            assert_eq!(gathered, vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0], "rank {rank}: every rank's own chunk");
            assert_eq!(broadcast, vec![101.0; 6], "rank {rank}: rank 1's values");
        }
    }

    #[test]
    fn bf16_is_refused_on_the_cpu_with_the_fix() {
        let mut config = config(25.0, Strategy::Ddp);
        config.train.precision = troupe_core::config::Precision::Bf16;
        let setup = TrainerSetup { config, rank: 0, world_size: 1, device: Device::Cpu, resume_from: None, start_step: 0 };
        let err = Trainer::new(setup).err().expect("refused").to_string();
        assert!(err.contains("train.precision = \"bf16\" needs a CUDA device") && err.contains("--device cuda:N"), "{err}");
    }
}
