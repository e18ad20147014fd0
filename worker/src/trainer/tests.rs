//! Two ranks in one process: the device and host paths of every strategy train alike, and
//! a mixed generation sums over its group and its ring.

use super::local_check::StepFaults;
use super::state::StrategyState;
use super::*;
use crate::comm::{Comm, CommError, Mixed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use troupe_common::collective::{CollectiveOp, CollectiveTag};

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
/// here through the default host implementation of [`Comm::run_tensor`].
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
    fn run(&mut self, op: CollectiveOp, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, CommError> {
        Ok(match op {
            // A reduce-scatter sums every chunk: chunk `rank` is what the caller keeps.
            CollectiveOp::AllReduce | CollectiveOp::ReduceScatter => {
                self.exchange(data, |s| s[0].iter().zip(&s[1]).map(|(a, b)| a + b).collect())
            }
            CollectiveOp::AllGather => self.exchange(data, |s| {
                let half = s[0].len() / 2;
                s[0][..half].iter().chain(&s[1][half..]).copied().collect()
            }),
            CollectiveOp::Broadcast { root } => self.exchange(data, |s| s[root as usize].clone()),
        })
    }
    fn works_on_device(&self) -> bool {
        self.on_device
    }
}

/// A prepared corpus, made once per test process: generated text (no download), enough for
/// a few steps of a tiny model.
fn data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("troupe-trainer-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let text = out.join("text");
        std::fs::create_dir_all(&text).unwrap();
        // Documents are files: ten, so that the validation split gets some.
        let inputs: Vec<PathBuf> = (0..10)
            .map(|i| {
                let path = text.join(format!("doc-{i}.txt"));
                std::fs::write(&path, troupe_common::data::generated_text(20_000, i)).unwrap();
                path
            })
            .collect();
        data::prepare(&data::PrepareOptions {
            vocab_size: 300,
            val_fraction: 0.2,
            seed: 3,
            ..data::PrepareOptions::new(inputs, out.join("prepared"))
        })
        .expect("prepare the test corpus");
        out.join("prepared")
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
    train_pair_with(StepFaults::default(), on_device, bucket_mb, strategy, steps)
        .into_iter()
        .map(|(params, _, reports, buckets)| (params, reports.iter().map(|r| r.loss).collect(), buckets))
        .collect()
}

/// A rank's parameters, its part of the AdamW moments, its reports and its bucket count.
type RankResult = (Vec<f32>, Vec<f32>, Vec<StepReport>, usize);

/// [`train_pair`] with fault hooks; returns each rank's parameters, its part of the AdamW
/// moments (as its checkpoint shard holds them), its reports and its bucket count.
fn train_pair_with(faults: StepFaults, on_device: bool, bucket_mb: f64, strategy: Strategy, steps: u64) -> Vec<RankResult> {
    train_pair_config(faults, on_device, config(bucket_mb, strategy), steps)
}

/// [`train_pair_with`] with a config of the caller's.
fn train_pair_config(faults: StepFaults, on_device: bool, config: Config, steps: u64) -> Vec<RankResult> {
    let slots = Arc::new(Mutex::new([Vec::new(), Vec::new()]));
    let barrier = Arc::new(Barrier::default());
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let mut comm = InMemory { rank, slots: slots.clone(), barrier: barrier.clone(), on_device };
            let faults = faults.clone();
            let setup = TrainerSetup { config: config.clone(), rank, world_size: 2, device: Device::Cpu, resume_from: None, start_step: 0 };
            std::thread::spawn(move || {
                let mut trainer = Trainer::new(setup).expect("trainer");
                trainer.cx.faults = faults;
                trainer.set_membership(1, rank, 2).unwrap();
                let reports: Vec<StepReport> = (0..steps).map(|s| trainer.step(s, &mut comm).expect("step")).collect();
                // Clipping takes part: every step's norm is above train.grad_clip.
                assert!(reports.iter().filter(|r| r.skipped.is_none()).all(|r| r.grad_norm > 0.05), "{reports:?}");
                let (params, buckets) = match &trainer.state {
                    StrategyState::Ddp(ddp) => (host_vec(&ddp.full), ddp.buckets.len()),
                    StrategyState::Zero12(z) => (host_vec(&z.shard.params), 0),
                    StrategyState::Zero3(z) => (host_vec(&z.shard.params), 0),
                };
                // The optimizer's moments too: a NaN must not have reached them either.
                let layout = trainer.state.checkpoint_layout(2, trainer.cx.model.num_params());
                let snapshot = trainer.state.snapshot(&layout, rank as u32, steps);
                let moments: Vec<f32> = snapshot.exp_avg.iter().chain(&snapshot.exp_avg_sq).copied().collect();
                (params, moments, reports, buckets)
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
    type Place = Option<(Pair, usize)>;
    let places: Vec<(Place, Place)> =
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
                let sum = m.run(CollectiveOp::AllReduce, own(1.0), tag(1)).unwrap();
                let scattered = m.run(CollectiveOp::ReduceScatter, own(10.0), tag(2)).unwrap();
                let gathered = m.run(CollectiveOp::AllGather, vec![rank as f32 + 1.0; 6], tag(3)).unwrap();
                let broadcast = m.run(CollectiveOp::Broadcast { root: 1 }, own(100.0), tag(4)).unwrap();
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

/// A NaN in one rank's gradient at step 1: under every strategy and path, both ranks skip
/// step 1 (rank 1 named as where it came from), and the parameters and AdamW moments after
/// the run are exactly those of a run told to skip step 1 — no NaN got anywhere.
#[test]
fn a_nan_on_one_rank_is_skipped_by_every_rank_and_changes_nothing_else() {
    let nan = StepFaults { nan_grad: Some((1, 1..=1)), skip: None };
    let told = StepFaults { nan_grad: None, skip: Some(1..=1) };
    for (strategy, on_device) in [
        (Strategy::Ddp, false),
        (Strategy::Ddp, true),
        (Strategy::Zero1, false),
        (Strategy::Zero2, false),
        (Strategy::Zero2, true),
        (Strategy::Zero3, false),
    ] {
        let with_nan = train_pair_with(nan.clone(), on_device, 25.0, strategy, 3);
        let skipped = train_pair_with(told.clone(), on_device, 25.0, strategy, 3);
        let plain = train_pair_with(StepFaults::default(), on_device, 25.0, strategy, 3);
        for rank in 0..2 {
            let reports = &with_nan[rank].2;
            assert_eq!(reports[1].skipped, Some(SkipReason::NonFiniteGradient), "{strategy} rank {rank}: {reports:?}");
            assert_eq!(reports[1].locally_finite, rank != 1, "{strategy} rank {rank}: the NaN came from rank 1");
            assert!(reports[0].skipped.is_none() && reports[2].skipped.is_none(), "{strategy} rank {rank}: {reports:?}");
            assert_eq!(skipped[rank].2[1].skipped, Some(SkipReason::Injected));
            let (state, told_state) = ((&with_nan[rank].0, &with_nan[rank].1), (&skipped[rank].0, &skipped[rank].1));
            assert!(state.0.iter().chain(state.1).all(|v| v.is_finite()), "{strategy} rank {rank}: a NaN reached the state");
            // Compared without printing: a failure would print a million floats.
            assert!(state == told_state, "{strategy} on_device={on_device} rank {rank}: not the state of a run told to skip step 1");
            assert!(state.0 != &plain[rank].0, "{strategy} rank {rank}: skipping step 1 changed nothing?");
            // The step after the skip is an ordinary one, with the same loss as the told run's.
            assert_eq!(with_nan[rank].2[2].loss, skipped[rank].2[2].loss, "{strategy} rank {rank}");
        }
    }
}

/// `ddp` on the flat buffer with the fused optimizer trains bit for bit like the loop it
/// replaced: the model's own parameters, a backward pass per micro-batch, per-parameter
/// clipping and the per-parameter AdamW, on the very batches the trainer draws (world 1,
/// 20 steps, clipping in every step).
#[test]
fn ddp_on_the_flat_buffer_trains_bit_for_bit_like_the_per_parameter_loop() {
    let config = config(25.0, Strategy::Ddp);
    let setup = TrainerSetup { config: config.clone(), rank: 0, world_size: 1, device: Device::Cpu, resume_from: None, start_step: 0 };
    let mut trainer = Trainer::new(setup).expect("trainer");
    let reference = trainer
        .cx
        .model
        .with_tensors(trainer.cx.model.parameter_tensors().iter().map(|p| p.detach().copy().set_requires_grad(true)).collect())
        .unwrap();
    let params = reference.parameter_tensors();
    let mut optimizer = model::AdamW::new(&params, &config.train);
    let (global_batch, micro) = (config.train.global_batch, config.train.micro_batch);
    for step in 0..20u64 {
        let ids = trainer.sampler.indices(step * global_batch as u64, global_batch, 0, 1);
        let batches: Vec<Batch> = ids
            .chunks(micro)
            .map(|chunk| {
                let (x, y) = trainer.cx.batch(&trainer.train, chunk).unwrap();
                (x, y, chunk.len() as f64 / global_batch as f64)
            })
            .collect();
        tch::manual_seed(trainer.cx.step_seed(step));
        for (x, y, weight) in &batches {
            (reference.loss(x, y, true) * *weight).backward();
        }
        let norm = model::clip_grad_norm(&params, config.train.grad_clip);
        optimizer.step(&params, model::lr_at(step, &config.train));
        model::zero_grads(&params);
        let report = trainer.step(step, &mut crate::comm::Alone).expect("step");
        assert_eq!(report.grad_norm, norm, "step {step}: the gradient norm");
    }
    let StrategyState::Ddp(ddp) = &trainer.state else { unreachable!() };
    assert!(host_vec(&ddp.full) == model::flatten(&params), "the parameters after 20 steps differ");
    let (m, v) = optimizer.moments();
    let (fm, fv) = ddp.optimizer.moments();
    assert!(host_vec(fm) == model::flatten(&m) && host_vec(fv) == model::flatten(&v), "the moments differ");
}

/// The overlapped backward pass (each stage's gradient all-reduced as soon as it is final)
/// trains bit for bit like one all-reduce after the whole backward pass: with several
/// micro-batches per rank and with one, with clipping, and with a NaN step skipped by both
/// ranks. (Without dropout: the two ranks are threads of one process here, which share
/// libtorch's random generator; `tests/training.rs` checks dropout across processes.)
#[test]
fn the_overlapped_backward_pass_trains_bit_for_bit_like_the_whole_one() {
    for micro_batch in [2, 4] {
        let run = |overlap: bool| {
            let mut config = config(25.0, Strategy::Ddp);
            config.train.micro_batch = micro_batch;
            config.parallel.overlap = overlap;
            let faults = StepFaults { nan_grad: Some((1, 2..=2)), skip: None };
            train_pair_config(faults, false, config, 5)
        };
        let (overlapped, whole) = (run(true), run(false));
        for rank in 0..2 {
            let (a, b) = (&overlapped[rank], &whole[rank]);
            assert!(a.2.iter().any(|r| r.skipped.is_some()), "the NaN step was skipped");
            assert!(a.0 == b.0, "micro-batch {micro_batch}, rank {rank}: the parameters differ");
            assert!(a.1 == b.1, "micro-batch {micro_batch}, rank {rank}: the moments differ");
            let losses = |r: &RankResult| r.2.iter().map(|s| (s.loss.to_bits(), s.grad_norm.to_bits())).collect::<Vec<_>>();
            assert_eq!(losses(a), losses(b), "micro-batch {micro_batch}, rank {rank}: losses and norms");
        }
    }
}
