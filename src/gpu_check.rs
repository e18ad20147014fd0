//! `troupe gpu-check`: what one GPU machine can show about troupe's CUDA path, as one command
//! that a prebuilt binary runs where no toolchain is installed (scripts/gpu-check.sh wraps it
//! and adds the training run).
//!
//! Checks (each passes or fails with a reason): libtorch sees a CUDA device; autocast runs
//! matmuls in bf16 on the trainer's thread; the model's loss and gradient norm on CUDA match the
//! CPU's (fp32) and stay close under bf16; the fused AdamW step on GPT-2 124M's parameters agrees
//! with the per-parameter one and is timed against it; an NCCL communicator of one rank forms and its four
//! collectives leave the expected values; a CPU tensor is refused with a clear error. Then it
//! times the NCCL collectives at world size 1 from 64 MiB to 1 GiB (one GPU cannot host two
//! NCCL ranks, so these measure NCCL's local path, not a network). Figures go to `--out` as
//! JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tch::{Device, Kind, Tensor};
use troupe_common::collective::CollectiveOp;
use troupe_common::device::cuda_device_count;
use troupe_common::model::precision::{cuda_autocast_kind, with_autocast};
use troupe_common::model::{self, Gpt, GptConfig};
use troupe_worker::comm::nccl::{self, NcclComm};

#[derive(Args)]
pub(crate) struct GpuCheckArgs {
    /// Where to write the figures (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Largest NCCL buffer to time, MiB (from 64, doubling).
    #[arg(long, default_value_t = 1024)]
    pub nccl_max_mib: usize,
    /// Timed repetitions of each collective and size.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
}

/// The outcome of the checks so far.
struct Report {
    checks: Vec<serde_json::Value>,
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, outcome: anyhow::Result<String>) {
        let (ok, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(e) => (false, format!("{e:#}")),
        };
        println!("{} {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        self.failed += usize::from(!ok);
        self.checks.push(json!({ "check": name, "ok": ok, "detail": detail }));
    }
}

pub(crate) fn run(args: GpuCheckArgs) -> anyhow::Result<ExitCode> {
    let mut report = Report { checks: Vec::new(), failed: 0 };
    let count = cuda_device_count();
    report.check(
        "cuda device",
        if count > 0 { Ok(format!("{count} visible to libtorch")) } else { Err(anyhow::anyhow!("libtorch sees no CUDA device")) },
    );
    let mut timings = Vec::new();
    if count > 0 {
        let gpu = Device::Cuda(0);
        report.check("bf16 autocast", check_autocast(gpu));
        report.check("model on cuda matches cpu", check_model(gpu));
        report.check("fused AdamW, GPT-2 124M", check_optimizer(gpu));
        report.check("nccl available", nccl::available().map(|()| "libnccl and libcuda load".to_string()).map_err(Into::into));
        // Every failure below is a failed check, reported with the others, never an early exit.
        match nccl::unique_id().and_then(|id| NcclComm::init(&id, 0, 1, 0, Duration::from_secs(60))) {
            Ok(mut comm) => {
                report.check("nccl collectives (world 1)", check_collectives(&mut comm, gpu));
                report.check("nccl refuses a cpu tensor", check_refusal(&mut comm));
                match time_collectives(&mut comm, gpu, args.nccl_max_mib, args.repeats.max(1)) {
                    Ok(t) => timings = t,
                    Err(e) => report.check("nccl timings", Err(e)),
                }
            }
            Err(e) => report.check("nccl communicator (world 1)", Err(e.into())),
        }
    }
    let figures = json!({ "cuda_devices": count, "checks": report.checks, "nccl_world1": timings });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&figures)?).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("figures written to {}", args.out.display());
    Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Autocast is per thread: check on a fresh one, as the trainer thread is.
fn check_autocast(gpu: Device) -> anyhow::Result<String> {
    std::thread::spawn(move || {
        let a = Tensor::randn([64, 64], (Kind::Float, gpu));
        let y = with_autocast(true, || a.matmul(&a));
        anyhow::ensure!(y.kind() == Kind::BFloat16, "a matmul under autocast gave {:?}", y.kind());
        Ok(format!("matmul under autocast computes in {:?} (autocast dtype {:?})", y.kind(), cuda_autocast_kind()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the autocast check panicked"))?
}

/// The same small model on both devices: fp32 losses and gradient norms agree closely, bf16
/// within bf16's precision.
fn check_model(gpu: Device) -> anyhow::Result<String> {
    let run = |device: Device, bf16: bool| -> anyhow::Result<(f64, f64)> {
        let config = GptConfig { vocab_size: 512, block_size: 64, n_layer: 2, n_head: 4, n_embd: 128, dropout: 0.0, bias: true };
        let tokens: Vec<i64> = (0..4 * 65).map(|i| (i * 37 % 512) as i64).collect();
        let all = Tensor::from_slice(&tokens).view([4, 65]).to_device(device);
        let (x, y) = (all.narrow(1, 0, 64), all.narrow(1, 1, 64));
        let model = Gpt::new(&config, device, 7)?;
        let loss = with_autocast(bf16, || model.loss(&x, &y, true));
        loss.f_backward()?;
        let params = model.parameter_tensors();
        Ok((loss.f_double_value(&[])?, model::grad_norm(&params)))
    };
    let (cpu_loss, cpu_norm) = run(Device::Cpu, false)?;
    let (gpu_loss, gpu_norm) = run(gpu, false)?;
    let (bf16_loss, bf16_norm) = std::thread::spawn(move || run(gpu, true)).join().map_err(|_| anyhow::anyhow!("panicked"))??;
    anyhow::ensure!(
        (cpu_loss - gpu_loss).abs() < 1e-3 && (cpu_norm - gpu_norm).abs() < 1e-3 * cpu_norm.max(1.0),
        "fp32: cpu loss {cpu_loss} norm {cpu_norm}, cuda loss {gpu_loss} norm {gpu_norm}"
    );
    anyhow::ensure!(
        (cpu_loss - bf16_loss).abs() < 5e-2 && (cpu_norm - bf16_norm).abs() < 5e-2 * cpu_norm.max(1.0),
        "bf16: cpu loss {cpu_loss} norm {cpu_norm}, cuda bf16 loss {bf16_loss} norm {bf16_norm}"
    );
    Ok(format!(
        "loss cpu {cpu_loss:.6} / cuda {gpu_loss:.6} / cuda bf16 {bf16_loss:.6}; grad norm {cpu_norm:.6} / {gpu_norm:.6} / {bf16_norm:.6}"
    ))
}

/// The fused AdamW (`FlatAdamW`, what the trainer uses) against the per-parameter one on GPT-2
/// 124M's parameters and one random gradient: the same parameters after 5 steps (within 1e-6),
/// and the median time of a step of each.
fn check_optimizer(gpu: Device) -> anyhow::Result<String> {
    let config = GptConfig { vocab_size: 50257, block_size: 1024, n_layer: 12, n_head: 12, n_embd: 768, dropout: 0.0, bias: true };
    let model = Gpt::new(&config, gpu, 1)?;
    let params = model.parameter_tensors();
    let numels = model.param_numels();
    let decay: Vec<bool> = model.param_shapes().iter().map(|s| s.len() >= 2).collect();
    let total: usize = numels.iter().sum();
    let flat = Tensor::f_cat(&params.iter().map(|p| p.detach().reshape([-1])).collect::<Vec<_>>(), 0)?;
    let grads = Tensor::f_randn([total as i64], (Kind::Float, gpu))?.f_mul_scalar(1e-2)?;
    for p in &params {
        // A zero-valued backward allocates each gradient (tch has no setter).
        (p.f_sum(Kind::Float)? * 0.0).f_backward()?;
    }
    {
        let _no_grad = tch::no_grad_guard();
        let mut at = 0;
        for p in &params {
            let n = p.numel() as i64;
            p.grad().f_copy_(&grads.narrow(0, at, n).view_as(p))?;
            at += n;
        }
    }
    let cfg = model::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut per_parameter = model::AdamW::with_decay(&params, cfg, decay.clone());
    let segments = model::parameter_segments(&numels, &decay);
    let mut fused = model::FlatAdamW::new(cfg, total, &segments, gpu);
    let time = |f: &mut dyn FnMut()| {
        let mut ms: Vec<f64> = (0..10)
            .map(|_| {
                let start = Instant::now();
                f();
                if let Device::Cuda(i) = gpu {
                    tch::Cuda::synchronize(i as i64);
                }
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        ms[ms.len() / 2]
    };
    for _ in 0..5 {
        per_parameter.step(&params, 6e-4);
        fused.step(&flat, &grads, 6e-4);
    }
    let after = Tensor::f_cat(&params.iter().map(|p| p.detach().reshape([-1])).collect::<Vec<_>>(), 0)?;
    let diff = (after - &flat).f_abs()?.f_max()?.f_double_value(&[])?;
    anyhow::ensure!(diff <= 1e-6, "after 5 steps the fused optimizer's parameters differ from the per-parameter one's by {diff:e}");
    let per_ms = time(&mut || per_parameter.step(&params, 6e-4));
    let fused_ms = time(&mut || fused.step(&flat, &grads, 6e-4));
    Ok(format!(
        "{} tensors, {total} parameters: per-parameter {per_ms:.2} ms, fused {fused_ms:.2} ms ({:.1}× faster); max difference after 5 steps {diff:e}",
        params.len(),
        per_ms / fused_ms
    ))
}

/// The collectives checked and timed (broadcast from rank 0).
const COLLECTIVES: [CollectiveOp; 4] =
    [CollectiveOp::AllReduce, CollectiveOp::ReduceScatter, CollectiveOp::AllGather, CollectiveOp::Broadcast { root: 0 }];

/// With one rank every collective leaves its buffer as it was.
fn check_collectives(comm: &mut NcclComm, gpu: Device) -> anyhow::Result<String> {
    let values = Tensor::arange(1 << 20, (Kind::Float, gpu));
    for op in COLLECTIVES {
        let t = values.copy();
        comm.run(op, &t)?;
        anyhow::ensure!(t.equal(&values), "{op} changed the values of a world of one");
    }
    Ok("all_reduce, reduce_scatter, all_gather and broadcast leave 2^20 floats exact".into())
}

fn check_refusal(comm: &mut NcclComm) -> anyhow::Result<String> {
    match comm.run(CollectiveOp::AllReduce, &Tensor::ones([4], (Kind::Float, Device::Cpu))) {
        Ok(()) => anyhow::bail!("a CPU tensor was accepted"),
        Err(e) => Ok(format!("refused: {e}")),
    }
}

/// Mean time of each collective on buffers from 64 MiB to `max_mib`, after two warm-up calls.
fn time_collectives(comm: &mut NcclComm, gpu: Device, max_mib: usize, repeats: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    println!("{:>8} {:>16} {:>10} {:>12}", "MiB", "collective", "ms", "algbw GB/s");
    let mut mib = 64;
    while mib <= max_mib.max(64) {
        let t = Tensor::zeros([(mib << 20) as i64 / 4], (Kind::Float, gpu));
        for op in COLLECTIVES {
            comm.run(op, &t)?;
            comm.run(op, &t)?;
            let start = Instant::now();
            for _ in 0..repeats {
                comm.run(op, &t)?;
            }
            let seconds = start.elapsed().as_secs_f64() / repeats as f64;
            let gbps = (mib << 20) as f64 / seconds / 1e9;
            println!("{mib:>8} {op:>16} {:>10.3} {gbps:>12.1}", seconds * 1e3);
            out.push(json!({ "mib": mib, "op": op.name(), "seconds": seconds, "algbw_gb_per_s": gbps }));
        }
        mib *= 2;
    }
    Ok(out)
}
