//! Tokens/s of the default model with the same global batch at 1 worker (2 threads) and at 2
//! workers (1 thread each) on this machine: what distribution costs when the workers share
//! the cores. Target: 2 workers ≥ 0.85× 1 worker. Run: `cargo bench --bench scaling`.
//! `TROUPE_BENCH_STEPS` sets the steps per run (default 40; the first 5 are warm-up).

use std::process::Command;
use troupe_common::events::{read_events, RunEvent};

fn run(workers: usize, threads: usize, steps: u64, out: &std::path::Path) -> anyhow::Result<f64> {
    let config = out.join(format!("scaling-{workers}.toml"));
    let text = troupe_common::config::DEFAULT_CONFIG_TOML
        .replace("threads_per_worker = 0", &format!("threads_per_worker = {threads}"))
        .replace("interval = 100", "interval = 0");
    std::fs::write(&config, text)?;
    let status = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["local", "--sample-tokens", "0", "--workers", &workers.to_string(), "--steps", &steps.to_string()])
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(out.join(format!("w{workers}")))
        .status()?;
    anyhow::ensure!(status.success(), "troupe local failed");
    let events = read_events(&out.join(format!("w{workers}/shakespeare")))?;
    let mut tps: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Step { step, tokens_per_sec, .. } if *step >= 5 => Some(*tokens_per_sec),
            _ => None,
        })
        .collect();
    tps.sort_by(|a, b| a.total_cmp(b));
    Ok(tps[tps.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::var("TROUPE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let out = std::path::PathBuf::from("target/bench/scaling");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let one = run(1, 2, steps, &out)?;
    let two = run(2, 1, steps, &out)?;
    let table = format!(
        "| workers × threads | median tokens/s |\n|---|---|\n| 1 × 2 | {one:.0} |\n| 2 × 1 | {two:.0} |\n\nratio 2 workers / 1 worker: {:.3} (target ≥ 0.85)\n",
        two / one
    );
    println!("{table}");
    std::fs::write("target/bench/scaling.md", table)?;
    Ok(())
}
