//! Evaluation off the training path (run: `cargo bench --bench evaluation`).
//!
//! The default model trained by one worker (1 thread), checkpointed and evaluated every 10
//! steps on `eval.sequences` = 512 validation sequences and the next-line task (16 items), twice
//! per round, alternating: with the evaluation sharded over the ranks (the worker evaluates
//! before its next step, so that step waits), and with an eval worker (1 thread, the other
//! core) doing it from each committed checkpoint; and, as the baseline, with next to no
//! evaluation (one sequence, no task, no samples), which leaves the cost of the checkpoint
//! itself (written in the background, committed by the coordinator). Reported: the mean wall time of the step
//! right after a checkpoint against the other steps, and the run's wall time to the last step.
//! Target: with an eval worker the steps after a checkpoint take no longer than with the
//! checkpoint alone.
//! `TROUPE_BENCH_ROUNDS` (default 2). Writes target/bench/evaluation.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use troupe_core::events::{read_events, RunEvent};

const STEPS: u64 = 60;
const INTERVAL: u64 = 10;

/// How a run evaluates.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Sharded over the ranks (one here), but of one sequence, no task and no samples: what a
    /// step after a checkpoint costs for the checkpoint alone.
    CheckpointOnly,
    Sharded,
    EvalWorker,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::CheckpointOnly => "checkpoint only",
            Mode::Sharded => "sharded over the ranks",
            Mode::EvalWorker => "eval worker",
        }
    }
}

fn config(out: &Path, mode: Mode) -> anyhow::Result<PathBuf> {
    let eval = match mode {
        Mode::CheckpointOnly => "interval = 0\nsequences = 1\ntask_items = 0",
        _ => "interval = 0\nsequences = 512\ntask_items = 16",
    };
    let text = troupe_core::config::DEFAULT_CONFIG_TOML
        .replace("steps = 600", &format!("steps = {STEPS}"))
        .replace("interval = 200\nsequences = 128", eval)
        .replace("[checkpoint]\ninterval = 200", &format!("[checkpoint]\ninterval = {INTERVAL}"))
        .replace("workers = 2\n", "workers = 1\n")
        .replace("threads_per_worker = 0", "threads_per_worker = 1");
    let text = if mode == Mode::CheckpointOnly { text.replace("sample_tokens = 32", "sample_tokens = 0") } else { text };
    anyhow::ensure!(text.contains("task_items = ") && text.contains("workers = 1\n"), "the default config changed: update this bench");
    let path = out.join("run.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

struct Figures {
    after_checkpoint: f64,
    others: f64,
    wall: f64,
    by: String,
}

fn run(out: &Path, mode: Mode) -> anyhow::Result<Figures> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let config = config(out, mode)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_troupe"));
    cmd.env("TROUPE_LOG", "warn").args(["local", "--sample-tokens", "0", "--out"]).arg(out).arg("--config").arg(&config);
    if mode == Mode::EvalWorker {
        cmd.arg("--eval-worker");
    }
    let status = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "troupe local failed ({status}) in {}", out.display());
    let events = read_events(&out.join("shakespeare"))?;
    let (mut after, mut others) = (Vec::new(), Vec::new());
    for e in &events {
        if let RunEvent::Step { step, step_seconds, .. } = e {
            // Steps count from 0: step k·INTERVAL is the one right after the checkpoint of
            // k·INTERVAL completed steps. Step 0 (warm-up) is left out.
            if *step > 0 && step % INTERVAL == 0 {
                after.push(*step_seconds);
            } else if *step > 0 {
                others.push(*step_seconds);
            }
        }
    }
    let wall = events
        .iter()
        .find_map(|e| match e {
            RunEvent::Finished { seconds, .. } => Some(*seconds),
            _ => None,
        })
        .unwrap_or(f64::NAN);
    let by: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Evaluated { by, .. } => Some(by.clone()),
            _ => None,
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(Figures { after_checkpoint: mean(&after), others: mean(&others), wall, by: by.first().cloned().unwrap_or_default() })
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("TROUPE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-evaluation");
    let mut rows = Vec::new();
    for round in 0..rounds {
        for (i, mode) in [Mode::CheckpointOnly, Mode::Sharded, Mode::EvalWorker].into_iter().enumerate() {
            let name = mode.name();
            let f = run(&out.join(format!("{round}-{i}")), mode)?;
            println!(
                "round {round}, {name:<22}: step after a checkpoint {:.3} s, others {:.3} s ({:.2}×); {:.1} s to the last step; measured by {}",
                f.after_checkpoint,
                f.others,
                f.after_checkpoint / f.others,
                f.wall,
                f.by
            );
            rows.push((round, name, f));
        }
    }
    let mut md = String::from(
        "# Evaluation off the training path\n\n`cargo bench --bench evaluation`: the default model, 1 training worker (1 thread), \
         a checkpoint and evaluation every 10 steps (512 validation sequences, 16 next-line items).\n\n\
         | round | evaluation | step after a checkpoint (s) | other steps (s) | ratio | run (s) |\n|---|---|---:|---:|---:|---:|\n",
    );
    for (round, name, f) in &rows {
        md.push_str(&format!(
            "| {round} | {name} | {:.3} | {:.3} | {:.2} | {:.1} |\n",
            f.after_checkpoint,
            f.others,
            f.after_checkpoint / f.others,
            f.wall
        ));
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("evaluation.md"), &md)?;
    println!("\n{md}");
    Ok(())
}
