//! The optimizer step alone: troupe's per-parameter AdamW (one set of elementwise operations per
//! parameter, as `torch.optim.AdamW` without `foreach`) against the fused [`FlatAdamW`] the
//! trainer uses (each operation once over the flat buffer of all parameters), on the same
//! parameters and gradients, for the default model and a ~30M-parameter GPT (6 layers, 512
//! wide, block 256), on the CPU and, when there is one, on the GPU. Both give the same values
//! bit for bit (`model::tests::the_fused_optimizer_matches_the_per_parameter_one`); this says
//! what fusing saves.
//!
//!   cargo bench --bench optimizer
//!
//! Env: TROUPE_BENCH_STEPS (timed steps per row, default 20, after 3 warm-up steps),
//! TROUPE_BENCH_THREADS (intra-op threads on the CPU, default 1), TROUPE_BENCH_CHUNK (elements
//! per run of the fused optimizer, default its own choice).
//! Output: a markdown table on stdout and `target/bench/optimizer.{md,csv}`.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use troupe_common::model::{flatten, parameter_segments, set_flat_grads, AdamW, AdamWConfig, FlatAdamW, Gpt, GptConfig};
use troupe_core::config::Config;

const WARMUP: usize = 3;

/// Median milliseconds of `steps` calls of `f` (after the warm-up), synchronising the GPU.
fn median_ms(steps: usize, device: Device, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let start = Instant::now();
            f();
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::var("TROUPE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20).max(1);
    let threads: i32 = std::env::var("TROUPE_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    tch::set_num_threads(threads);
    tch::set_num_interop_threads(1);
    let config = Config::default_config();
    let default = GptConfig::from_model_config(&config.model, config.data.vocab_size);
    let medium = GptConfig { n_layer: 6, n_embd: 512, n_head: 8, block_size: 256, ..default.clone() };
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    let adamw = AdamWConfig::from_train_config(&config.train);
    let mut md = format!(
        "AdamW step alone, median of {steps} ({threads} intra-op thread(s) on the CPU): per-parameter against fused over the flat buffer.\n\n\
         | model | parameters | tensors | device | per-parameter (ms) | fused (ms) | speed-up |\n|---|---:|---:|---|---:|---:|---:|\n"
    );
    let mut csv = String::from("model,params,tensors,device,per_parameter_ms,fused_ms\n");
    for (name, cfg) in [("default (4 × 128)", &default), ("30M (6 × 512)", &medium)] {
        for &device in &devices {
            let model = Gpt::new(cfg, device, 1)?;
            let params = model.parameter_tensors();
            let numels = model.param_numels();
            let decay: Vec<bool> = model.param_shapes().iter().map(|s| s.len() >= 2).collect();
            tch::manual_seed(3);
            let total: usize = numels.iter().sum();
            let grads = Tensor::randn([total as i64], (Kind::Float, Device::Cpu)) * 0.01;
            let grad_values = flatten(std::slice::from_ref(&grads));
            set_flat_grads(&params, &grad_values)?;
            let mut per_parameter = AdamW::with_decay(&params, adamw, decay.clone());
            let per_ms = median_ms(steps, device, || per_parameter.step(&params, 1e-4));

            let flat = Tensor::from_slice(&flatten(&params)).to_device(device);
            let flat_grads = grads.to_device(device);
            let segments = parameter_segments(&numels, &decay);
            let mut fused = FlatAdamW::new(adamw, total, &segments, device);
            if let Some(chunk) = std::env::var("TROUPE_BENCH_CHUNK").ok().and_then(|s| s.parse().ok()) {
                fused.set_chunk(chunk);
            }
            let fused_ms = median_ms(steps, device, || fused.step(&flat, &flat_grads, 1e-4));
            let dev = if device.is_cuda() { "GPU" } else { "CPU" };
            println!("{name} on the {dev}: per-parameter {per_ms:.2} ms, fused {fused_ms:.2} ms");
            md.push_str(&format!(
                "| {name} | {total} | {} | {dev} | {per_ms:.2} | {fused_ms:.2} | {:.2}× |\n",
                numels.len(),
                per_ms / fused_ms
            ));
            csv.push_str(&format!("{name},{total},{},{dev},{per_ms:.4},{fused_ms:.4}\n", numels.len()));
        }
    }
    print!("\n{md}");
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/optimizer.md", &md)?;
    std::fs::write("target/bench/optimizer.csv", &csv)?;
    println!("wrote target/bench/optimizer.{{md,csv}}");
    Ok(())
}
