//! One training step of the model alone, without the trainer around it: forward + backward of
//! the default model (configs/default.toml: 4 layers, 128 wide, vocabulary 2048, block 128) on
//! one micro-batch of random tokens (8 sequences), then the same with gradient clipping and
//! troupe's AdamW added, at 1 and 2 intra-op threads. What the step of `step_overhead` costs
//! before data loading, micro-batching and the trainer's bookkeeping. No target: a reference.
//!
//!   cargo bench --bench model_step
//!
//! Env: TROUPE_BENCH_STEPS (timed steps per row, default 20, after 3 warm-up steps).
//! Output: target/bench/model_step.{md,csv}.

use std::time::Instant;
use tch::{Device, Tensor};
use troupe_common::model::{clip_grad_norm, zero_grads, AdamW, Gpt, GptConfig};
use troupe_core::config::Config;

const WARMUP: usize = 3;

/// Random tokens and their next-token targets, shape [b, t].
fn batch(seed: i64, b: usize, t: usize, vocab: usize) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let all = Tensor::randint(vocab as i64, [b as i64, t as i64 + 1], (tch::Kind::Int64, Device::Cpu));
    (all.narrow(1, 0, t as i64), all.narrow(1, 1, t as i64))
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::var("TROUPE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20).max(1);
    let config = Config::default_config();
    let cfg = GptConfig::from_model_config(&config.model, config.data.vocab_size);
    let micro = config.train.micro_batch;
    let model = Gpt::new(&cfg, Device::Cpu, 1)?;
    let params = model.parameter_tensors();
    let mut opt = AdamW::new(&params, &config.train);
    let (x, y) = batch(1, micro, cfg.block_size, cfg.vocab_size);
    tch::set_num_interop_threads(1);
    println!("model: {} parameters; batch {micro} x {} tokens", model.num_params(), cfg.block_size);

    let mut md = format!(
        "One step of the default model alone ({} parameters, batch {micro} x {} tokens), median of {steps}.\n\n\
         | intra-op threads | forward+backward (ms) | + clip + AdamW (ms) |\n|---|---|---|\n",
        model.num_params(),
        cfg.block_size
    );
    let mut csv = String::from("threads,part,median_ms\n");
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        let mut step = |with_optimizer: bool| {
            zero_grads(&params);
            let loss = model.loss(&x, &y, true);
            loss.backward();
            loss.double_value(&[]);
            if with_optimizer {
                clip_grad_norm(&params, config.train.grad_clip);
                opt.step(&params, config.train.learning_rate);
            }
        };
        for _ in 0..WARMUP {
            step(true);
        }
        let mut medians = Vec::new();
        for with_optimizer in [false, true] {
            let mut times: Vec<f64> = (0..steps)
                .map(|_| {
                    let start = Instant::now();
                    step(with_optimizer);
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(|a, b| a.total_cmp(b));
            let ms = times[times.len() / 2];
            let part = if with_optimizer { "fwd_bwd_clip_adamw" } else { "fwd_bwd" };
            println!("threads {threads}: {part} {ms:.1} ms/step");
            csv.push_str(&format!("{threads},{part},{ms:.3}\n"));
            medians.push(ms);
        }
        md.push_str(&format!("| {threads} | {:.1} | {:.1} |\n", medians[0], medians[1]));
    }
    print!("\n{md}");
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/model_step.md", &md)?;
    std::fs::write("target/bench/model_step.csv", &csv)?;
    Ok(())
}
