//! One training step at world size 1 inside troupe (the Trainer: sampler, data loading,
//! micro-batches, clipping, AdamW) vs the same model and batch in a plain tch loop.
//! Target: under 3% overhead. Run: `cargo bench --bench step_overhead`.

use std::time::Instant;
use tch::{nn::OptimizerConfig, Device, Tensor};
use troupe_common::model::{Gpt, GptConfig};
use troupe_core::config::Config;
use troupe_worker::comm::Alone;
use troupe_worker::trainer::{Trainer, TrainerSetup};

const WARMUP: u64 = 3;
const STEPS: u64 = 12;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let config = Config::default_config();
    let meta = troupe_coordinator::launch::ensure_data(&config)?;
    tch::set_num_threads(2);
    tch::set_num_interop_threads(1);

    // troupe's trainer, world size 1 (no collective).
    let mut trainer = Trainer::new(TrainerSetup {
        config: config.clone(),
        rank: 0,
        world_size: 1,
        device: Device::Cpu,
        resume_from: None,
        start_step: 0,
    })?;
    let mut troupe_times = Vec::new();
    for step in 0..WARMUP + STEPS {
        let t = Instant::now();
        trainer.step(step, &mut Alone)?;
        if step >= WARMUP {
            troupe_times.push(t.elapsed().as_secs_f64());
        }
    }

    // A plain tch loop: the same model, micro-batches and global batch, tch's own AdamW,
    // random tokens made once up front.
    let gpt = Gpt::new(&GptConfig::from_model_config(&config.model, meta.vocab_size), Device::Cpu, 1)?;
    let mut opt = tch::nn::AdamW::default().build(gpt.var_store(), config.train.learning_rate)?;
    let micro = config.train.micro_batch as i64;
    let block = config.model.block_size as i64;
    let batches: Vec<(Tensor, Tensor)> = (0..config.train.global_batch as i64 / micro)
        .map(|_| {
            let x = Tensor::randint(meta.vocab_size as i64, [micro, block], (tch::Kind::Int64, Device::Cpu));
            let y = Tensor::randint(meta.vocab_size as i64, [micro, block], (tch::Kind::Int64, Device::Cpu));
            (x, y)
        })
        .collect();
    let mut plain_times = Vec::new();
    for step in 0..WARMUP + STEPS {
        let t = Instant::now();
        opt.zero_grad();
        for (x, y) in &batches {
            let loss = gpt.loss(x, y, true) * (micro as f64 / config.train.global_batch as f64);
            loss.backward();
        }
        opt.clip_grad_norm(config.train.grad_clip);
        opt.step();
        if step >= WARMUP {
            plain_times.push(t.elapsed().as_secs_f64());
        }
    }
    let troupe_step = median(troupe_times);
    let plain_step = median(plain_times);
    let overhead = (troupe_step / plain_step - 1.0) * 100.0;
    let table = format!(
        "| loop | median step (s) |\n|---|---|\n| plain tch | {plain_step:.4} |\n| troupe Trainer (world 1) | {troupe_step:.4} |\n\noverhead: {overhead:+.2}% (target < 3%)\n"
    );
    println!("{table}");
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/step_overhead.md", table)?;
    Ok(())
}
