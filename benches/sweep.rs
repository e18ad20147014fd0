//! troupe's search against Optuna's over the same space, trial count and step budget:
//! `troupe sweep` (TPE, median stopping rule) and Optuna (TPE sampler, median pruner; from
//! PyPI, installed here) driving `troupe local --set …` (benches/optuna_sweep.py). Both run one
//! trial at a time on the embedded default (Shakespeare, the 4-layer model), searching the
//! learning rate (log-uniform 1e-4…3e-2, the floor of its schedule at 1e-5) and the warm-up
//! (5…60 steps).
//!
//!   cargo build --release && cargo bench --bench sweep
//!
//! Side by side: the best validation loss found, the steps trained over all trials (early
//! stopping saves steps), the trials stopped early, and the wall time.
//!
//! Env: TROUPE_BENCH_SWEEP_TRIALS (default 12), TROUPE_BENCH_SWEEP_STEPS (default 150),
//! TROUPE_BENCH_SWEEP_SEED (default 5). Output: target/bench/sweep.{md,csv}.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Optuna in the cache, installed with pip on first use.
fn optuna_path() -> anyhow::Result<PathBuf> {
    let cache = std::env::var("TROUPE_CACHE").unwrap_or_else(|_| format!("{}/.cache/troupe", std::env::var("HOME").unwrap_or_default()));
    let target = PathBuf::from(cache).join("python-optuna");
    let ok = |p: &Path| Command::new("python3").env("PYTHONPATH", p).args(["-c", "import optuna"]).status().is_ok_and(|s| s.success());
    if !ok(&target) {
        println!("installing optuna 5.1.0 into {} (pip)…", target.display());
        let status = Command::new("python3").args(["-m", "pip", "install", "-q", "--target"]).arg(&target).arg("optuna==5.1.0").status()?;
        anyhow::ensure!(status.success() && ok(&target), "pip could not install optuna into {}", target.display());
    }
    Ok(target)
}

struct Outcome {
    best: f64,
    steps: u64,
    stopped: usize,
    seconds: f64,
    params: String,
}

fn troupe_sweep(bin: &Path, dir: &Path, trials: u64, steps: u64, interval: u64, seed: u64) -> anyhow::Result<Outcome> {
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"troupe\"\ntrials = {trials}\nparallel = 1\nworkers = 1\nseed = {seed}\nsearch = \"tpe\"\nstartup_trials = {}\n\
             [set]\n\"train.steps\" = {steps}\n\"train.min_learning_rate\" = 1e-5\n\"eval.interval\" = {interval}\n\"checkpoint.interval\" = {steps}\n\
             [space.\"train.learning_rate\"]\nlog_uniform = [1e-4, 3e-2]\n[space.\"train.warmup_steps\"]\nint = [5, 60]\n\
             [scheduler]\nkind = \"median\"\ngrace_steps = {interval}\nmin_trials = 3\n",
            (trials / 4).max(2)
        ),
    )?;
    let _ = std::fs::remove_dir_all(dir.join("sweeps/troupe"));
    let started = Instant::now();
    let out = Command::new(bin).current_dir(dir).args(["sweep", "--file"]).arg(&file).output()?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "troupe sweep failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let steps_line = text.lines().find(|l| l.contains("steps trained over all trials")).unwrap_or_default();
    let steps_used = steps_line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let csv = std::fs::read_to_string(dir.join("sweeps/troupe/results.csv"))?;
    let (mut best, mut params, mut stopped) = (f64::INFINITY, String::new(), 0);
    for line in csv.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let (state, metric) = (cells[3], cells[5].parse::<f64>().unwrap_or(f64::INFINITY));
        stopped += usize::from(state == "stopped");
        if state == "finished" && metric < best {
            (best, params) = (metric, format!("lr {} warmup {}", cells[1], cells[2]));
        }
    }
    Ok(Outcome { best, steps: steps_used, stopped, seconds, params })
}

fn optuna_sweep(bin: &Path, dir: &Path, trials: u64, steps: u64, interval: u64, seed: u64) -> anyhow::Result<Outcome> {
    let pythonpath = optuna_path()?;
    let out_dir = dir.join("optuna");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = Command::new("python3")
        .current_dir(dir)
        .env("PYTHONPATH", &pythonpath)
        .arg(root().join("benches/optuna_sweep.py"))
        .arg(bin)
        .arg(&out_dir)
        .args([trials, steps, interval, seed, threads as u64].map(|n| n.to_string()))
        .output()?;
    anyhow::ensure!(out.status.success(), "the Optuna driver failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())?;
    Ok(Outcome {
        best: v["best"].as_f64().unwrap_or(f64::NAN),
        steps: v["total_steps"].as_u64().unwrap_or(0),
        stopped: v["pruned"].as_u64().unwrap_or(0) as usize,
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        params: format!(
            "lr {} warmup {}",
            v["params"]["train.learning_rate"].as_f64().map_or("?".into(), |x| format!("{x:.4e}")),
            v["params"]["train.warmup_steps"]
        ),
    })
}

fn main() -> anyhow::Result<()> {
    let (trials, steps, seed) =
        (env_u64("TROUPE_BENCH_SWEEP_TRIALS", 12), env_u64("TROUPE_BENCH_SWEEP_STEPS", 150), env_u64("TROUPE_BENCH_SWEEP_SEED", 5));
    let interval = (steps / 6).max(1);
    let bin = root().join("target/release/troupe");
    anyhow::ensure!(bin.is_file(), "build troupe first: cargo build --release");
    let dir = root().join("target/bench-sweep");
    std::fs::create_dir_all(&dir)?;
    println!("{trials} trials of up to {steps} steps, one at a time, evaluated every {interval}; seed {seed}");
    println!("troupe sweep (TPE, median stopping)…");
    let ours = troupe_sweep(&bin, &dir, trials, steps, interval, seed)?;
    println!("Optuna (TPESampler, MedianPruner) driving troupe local…");
    let theirs = optuna_sweep(&bin, &dir, trials, steps, interval, seed)?;
    let budget = trials * steps;
    let mut md = format!(
        "| search | best val loss | best trial's parameters | steps trained (of {budget}) | stopped early | wall s |\n|---|---|---|---|---|---|\n"
    );
    let mut csv = String::from("search,best_val_loss,steps,budget,stopped,seconds\n");
    for (name, o) in [("troupe sweep", &ours), ("Optuna", &theirs)] {
        md.push_str(&format!("| {name} | {:.4} | {} | {} | {} | {:.0} |\n", o.best, o.params, o.steps, o.stopped, o.seconds));
        csv.push_str(&format!("{name},{},{},{budget},{},{:.1}\n", o.best, o.steps, o.stopped, o.seconds));
    }
    println!("\n{md}");
    let bench = root().join("target/bench");
    std::fs::create_dir_all(&bench)?;
    std::fs::write(bench.join("sweep.md"), md)?;
    std::fs::write(bench.join("sweep.csv"), csv)?;
    Ok(())
}
