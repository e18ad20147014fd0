//! Tokens/s of the default model at 1, 2 and 3 workers with the same global batch, all on this
//! machine: what adding workers costs or gains when they share its cores. Each worker gets
//! cores / workers intra-op threads (at least 1), as `troupe local` gives them. Target: 2
//! workers ≥ 0.85× 1 worker on 2 cores (the same cores, split two ways, plus a ring).
//!
//!   cargo bench --bench scaling
//!
//! Env: TROUPE_BENCH_STEPS (steps per run, default 40; the first 5 are warm-up),
//! TROUPE_BENCH_WORKERS (default "1,2,3"). Output: target/bench/scaling.{md,csv}.

use std::process::Command;
use troupe_core::events::{read_events, RunEvent};

/// Median tokens/s over the steps after warm-up, and the last step's loss.
fn run(workers: usize, steps: u64, out: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    // The embedded default; evaluation and the checkpoint at the end only (interval 0), no
    // deployment: this measures training steps.
    let mut config = troupe_core::config::Config::default_config();
    config.eval.interval = 0;
    config.checkpoint.interval = 0;
    config.deploy.enabled = false;
    let config_path = out.join(format!("scaling-{workers}.toml"));
    std::fs::write(&config_path, config.to_toml())?;
    let status = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["local", "--sample-tokens", "0", "--workers", &workers.to_string(), "--steps", &steps.to_string()])
        .arg("--config")
        .arg(&config_path)
        .arg("--out")
        .arg(out.join(format!("w{workers}")))
        .status()?;
    anyhow::ensure!(status.success(), "troupe local with {workers} workers failed");
    let events = read_events(&out.join(format!("w{workers}/shakespeare")))?;
    let mut tps = Vec::new();
    let mut last_loss = f64::NAN;
    for e in &events {
        if let RunEvent::Step { step, tokens_per_sec, loss, .. } = e {
            last_loss = *loss;
            if *step >= 5 {
                tps.push(*tokens_per_sec);
            }
        }
    }
    anyhow::ensure!(!tps.is_empty(), "no steps after warm-up");
    tps.sort_by(|a, b| a.total_cmp(b));
    Ok((tps[tps.len() / 2], last_loss))
}

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::var("TROUPE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let worker_counts: Vec<usize> =
        std::env::var("TROUPE_BENCH_WORKERS").unwrap_or_else(|_| "1,2,3".into()).split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = std::path::PathBuf::from("target/bench/scaling");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut rows = Vec::new();
    for &workers in &worker_counts {
        let (tps, loss) = run(workers, steps, &out)?;
        rows.push((workers, (cores / workers).max(1), tps, loss));
    }
    let base = rows.first().map(|r| r.2).unwrap_or(f64::NAN);
    let mut table = format!(
        "Training throughput of the default model (global batch 32 × 128 tokens) by worker count, {steps} steps (first 5 warm-up), {cores} cores.\n\n\
         | workers × threads | median tokens/s | vs {} worker(s) | train loss of the last step |\n|---|---:|---:|---:|\n",
        rows.first().map(|r| r.0).unwrap_or(1)
    );
    let mut csv = String::from("workers,threads_per_worker,tokens_per_second,ratio_vs_first,last_loss\n");
    for (workers, threads, tps, loss) in &rows {
        table.push_str(&format!("| {workers} × {threads} | {tps:.0} | {:.3} | {loss:.4} |\n", tps / base));
        csv.push_str(&format!("{workers},{threads},{tps:.1},{:.4},{loss:.5}\n", tps / base));
    }
    if let (Some(one), Some(two)) = (rows.iter().find(|r| r.0 == 1), rows.iter().find(|r| r.0 == 2)) {
        let ratio = two.2 / one.2;
        table.push_str(&format!("\n2 workers / 1 worker: {ratio:.3} (target ≥ 0.85: {})\n", if ratio >= 0.85 { "met" } else { "missed" }));
    }
    println!("{table}");
    std::fs::write("target/bench/scaling.md", &table)?;
    std::fs::write("target/bench/scaling.csv", csv)?;
    Ok(())
}
