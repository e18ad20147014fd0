//! ZeRO strategies end to end, with real processes: the same training as `ddp`, the memory
//! they save (as exported), checkpoints that resume on any world size under any strategy, and
//! checkpoint failures (a rank killed mid-write, a flipped byte).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);
const STEPS: u64 = 20;

/// A tiny config for `workers` workers under `strategy`, written into `dir`.
fn config(dir: &Path, data: &Path, workers: usize, strategy: &str, steps: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = tiny_config(dir, data, workers, steps);
    // 12 sequences split evenly over 1, 2 and 3 workers, so every micro-batch holds 2.
    let text = std::fs::read_to_string(&path).unwrap().replace("global_batch = 8", "global_batch = 12");
    std::fs::write(&path, format!("{text}\n[parallel]\nstrategy = \"{strategy}\"\n")).unwrap();
    path
}

/// The loss of each step, the newest record of each (a resumed run records steps again).
fn last_losses(run_dir: &Path) -> std::collections::BTreeMap<u64, f64> {
    step_losses(run_dir).into_iter().collect()
}

fn assert_same_losses(
    what: &str,
    a: &std::collections::BTreeMap<u64, f64>,
    b: &std::collections::BTreeMap<u64, f64>,
    steps: std::ops::Range<u64>,
) {
    for s in steps {
        let (x, y) = (a[&s], b[&s]);
        assert!((x - y).abs() < 1e-4, "{what}: step {s}: loss {x} vs {y}");
    }
}

/// zero1, zero2 and zero3 with 2 and 3 workers reach the same parameters as ddp
/// after 20 steps (max abs difference < 1e-4) with the same losses.
#[test]
fn zero_strategies_train_exactly_like_ddp_with_2_and_3_workers() {
    let dir = scratch("zero-equivalence");
    let data = prepare_small_corpus(&dir);
    for workers in [2, 3] {
        let run = |strategy: &str| {
            let here = dir.join(format!("{strategy}-{workers}"));
            assert_success(&run_local(&config(&here, &data, workers, strategy, STEPS), &[]));
            here.join("runs/tiny")
        };
        let ddp = run("ddp");
        let reference = checkpoint_params(&ddp.join("checkpoints/step-000020"));
        let losses = last_losses(&ddp);
        assert_eq!(losses.len(), STEPS as usize);
        for strategy in ["zero1", "zero2", "zero3"] {
            let run_dir = run(strategy);
            let params = checkpoint_params(&run_dir.join("checkpoints/step-000020"));
            let diff = max_abs_diff(&reference, &params);
            println!("{strategy} with {workers} workers: max abs parameter difference from ddp after {STEPS} steps: {diff:e}");
            assert!(diff < 1e-4, "{strategy} with {workers} workers: {diff}");
            assert_same_losses(&format!("{strategy} with {workers} workers vs ddp"), &losses, &last_losses(&run_dir), 0..STEPS);
            let manifest = troupe_common::checkpoint::verify(&run_dir.join("checkpoints/step-000020")).unwrap();
            assert_eq!((manifest.strategy.as_str(), manifest.world_size), (strategy, workers as u32));
        }
    }
}

/// `ddp` on the QUIC ring with each stage's all-reduce overlapped with the backward pass (the
/// default) against one all-reduce after it (`parallel.overlap = false`), with dropout, 2 or 3
/// micro-batches per worker, real processes, 20 steps: 2 workers end with the same parameters
/// and losses bit for bit; 3 workers within 1e-4, as the ZeRO strategies against `ddp` (the
/// ring adds an element's three terms in an order that depends on where its bucket starts,
/// and AdamW amplifies those last-bit differences over the steps: 1.0e-5 when measured).
#[test]
fn overlapping_the_all_reduce_with_the_backward_pass_trains_the_same() {
    let dir = scratch("overlap");
    let data = prepare_small_corpus(&dir);
    for workers in [2, 3] {
        let run = |overlap: bool| {
            let here = dir.join(format!("overlap-{overlap}-{workers}"));
            let path = config(&here, &data, workers, "ddp", STEPS);
            let text = std::fs::read_to_string(&path).unwrap().replace("dropout = 0.0", "dropout = 0.1");
            // The [parallel] section is the file's last.
            std::fs::write(&path, format!("{text}overlap = {overlap}\n")).unwrap();
            assert_success(&run_local(&path, &[]));
            let run_dir = here.join("runs/tiny");
            (checkpoint_params(&run_dir.join("checkpoints/step-000020")), last_losses(&run_dir))
        };
        let ((on, on_losses), (off, off_losses)) = (run(true), run(false));
        let diff = max_abs_diff(&on, &off);
        println!("{workers} workers: max abs parameter difference, overlapped vs one all-reduce, after {STEPS} steps: {diff:e}");
        if workers == 2 {
            assert!(on == off, "2 workers: the parameters differ by up to {diff}");
            assert_eq!(on_losses, off_losses);
        } else {
            assert!(diff < 1e-4, "3 workers: {diff}");
            assert_same_losses("3 workers, overlapped vs one all-reduce", &on_losses, &off_losses, 0..STEPS);
        }
    }
}

/// The `troupe_memory_bytes{kind}` figures of every worker of a running job.
fn exported_memory(dir: &Path, workers: usize) -> Vec<[u64; 3]> {
    let targets_file = dir.join("runs/prometheus/tiny.json");
    let worker_targets = || -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(&targets_file) else { return Vec::new() };
        let Ok(groups) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
        let mut out = Vec::new();
        for group in groups.as_array().into_iter().flatten().filter(|g| g["labels"]["component"] == "worker") {
            out.extend(group["targets"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(String::from)));
        }
        out
    };
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
    let read = |target: &str| -> Option<[u64; 3]> {
        let page = agent.get(&format!("http://{target}/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
        let value = |kind: &str| {
            page.lines()
                .find(|l| l.starts_with("troupe_memory_bytes{") && l.contains(&format!("kind=\"{kind}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        Some([value("params")? as u64, value("grads")? as u64, value("optim")? as u64])
    };
    let mut figures = Vec::new();
    wait_until("every worker exports its memory figures", Duration::from_secs(120), Duration::from_millis(200), || {
        let targets = worker_targets();
        figures = targets.iter().filter_map(|t| read(t)).collect();
        targets.len() == workers && figures.len() == workers
    });
    figures
}

/// With 3 workers, each worker's optimizer state under zero1 is at most a third
/// of ddp's plus one slice, and its parameters under zero3 likewise — from the exported figures.
#[test]
fn with_3_workers_zero_keeps_a_third_of_the_state_per_worker() {
    let dir = scratch("zero-memory");
    let data = prepare_small_corpus(&dir);
    let mut figures = std::collections::BTreeMap::new();
    for strategy in ["ddp", "zero1", "zero2", "zero3"] {
        let here = dir.join(strategy);
        let config = config(&here, &data, 3, strategy, 1_000_000);
        let mut child = spawn_local(&config);
        let per_worker = exported_memory(&here, 3);
        assert!(per_worker.windows(2).all(|w| w[0] == w[1]), "{strategy}: every worker holds the same: {per_worker:?}");
        figures.insert(strategy, per_worker[0]);
        let _ = std::process::Command::new("kill").args(["-INT", &child.0.id().to_string()]).status();
        let started = Instant::now();
        while child.0.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("bytes held per worker [params, grads, optim]: {figures:?}");
    let [ddp_params, ddp_grads, ddp_optim] = figures["ddp"];
    // The model: 2 layers of 64, vocabulary 512, 32 positions (see tiny_config).
    let numel: usize = 512 * 64 + 32 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64;
    assert_eq!(ddp_params, 4 * numel as u64);
    assert_eq!((ddp_grads, ddp_optim), (ddp_params, 2 * ddp_params));
    // One slice: a third of the flat vector, rounded up (padding), in each kind's bytes.
    let slice = |bytes_per_scalar: u64| numel.div_ceil(3) as u64 * bytes_per_scalar;
    let [z1_params, z1_grads, z1_optim] = figures["zero1"];
    assert!(z1_optim <= ddp_optim / 3 + slice(8), "zero1 optimizer state {z1_optim} vs ddp {ddp_optim}");
    assert!(z1_optim * 3 >= ddp_optim, "the shards cover the state");
    assert!(z1_params >= ddp_params && z1_grads >= ddp_grads, "zero1 keeps the whole model and gradient");
    let [_, z2_grads, z2_optim] = figures["zero2"];
    assert!(z2_grads <= ddp_grads / 3 + slice(4) && z2_optim == z1_optim, "zero2 keeps a slice of the gradient");
    let [z3_params, z3_grads, z3_optim] = figures["zero3"];
    assert!(z3_params <= ddp_params / 3 + slice(4), "zero3 parameters {z3_params} vs ddp {ddp_params}");
    assert!(z3_grads <= ddp_grads / 3 + slice(4) && z3_optim <= ddp_optim / 3 + slice(8));
}

/// Checkpoints written by (ddp, 2), (zero2, 3) and (zero3, 2) resume under
/// (ddp, 1), (zero1, 2) and (zero3, 3), and the losses after resuming match an uninterrupted run.
#[test]
fn checkpoints_reshard_to_any_strategy_and_world_size() {
    let dir = scratch("reshard");
    let data = prepare_small_corpus(&dir);
    let reference_dir = dir.join("reference");
    assert_success(&run_local(&config(&reference_dir, &data, 1, "ddp", STEPS), &[]));
    let reference_run = reference_dir.join("runs/tiny");
    let reference = last_losses(&reference_run);
    let reference_params = checkpoint_params(&reference_run.join("checkpoints/step-000020"));

    for (write_strategy, write_workers) in [("ddp", 2), ("zero2", 3), ("zero3", 2)] {
        let written = dir.join(format!("write-{write_strategy}-{write_workers}"));
        assert_success(&run_local(&config(&written, &data, write_workers, write_strategy, STEPS), &[]));
        // As if the writer had stopped after step 10: its later checkpoints are gone.
        for step in [15, 20] {
            std::fs::remove_dir_all(written.join(format!("runs/tiny/checkpoints/step-{step:06}"))).unwrap();
        }
        for (strategy, workers) in [("ddp", 1), ("zero1", 2), ("zero3", 3)] {
            let here = dir.join(format!("{write_strategy}-{write_workers}-to-{strategy}-{workers}"));
            copy_dir(&written.join("runs"), &here.join("runs"));
            let config = config(&here, &data, workers, strategy, STEPS);
            let out = run_local(&config, &["--resume"]);
            assert_success(&out);
            assert!(stdout(&out).contains("training resumed at step 10"), "{}", stdout(&out));
            let run_dir = here.join("runs/tiny");
            let what = format!("written by ({write_strategy}, {write_workers}), resumed as ({strategy}, {workers})");
            assert_same_losses(&what, &reference, &last_losses(&run_dir), 10..STEPS);
            let diff = max_abs_diff(&reference_params, &checkpoint_params(&run_dir.join("checkpoints/step-000020")));
            println!("{what}: max abs parameter difference at step 20 from the uninterrupted run: {diff:e}");
            assert!(diff < 1e-4, "{what}: {diff}");
        }
    }
}

/// A rank killed in the middle of writing its shard leaves no MANIFEST for that
/// step, and resume uses the previous checkpoint.
#[test]
fn a_rank_killed_mid_checkpoint_leaves_no_manifest_and_resume_uses_the_previous_one() {
    let dir = scratch("kill-mid-write");
    let data = prepare_small_corpus(&dir);
    let config = config(&dir, &data, 2, "zero2", STEPS);
    // Two workers are needed: losing one pauses the run instead of going on with one.
    let text = std::fs::read_to_string(&config).unwrap().replace("[cluster]\n", "[cluster]\nmin_workers = 2\n");
    std::fs::write(&config, text).unwrap();
    let run_dir = dir.join("runs/tiny");
    // Not restarted (that is tests/supervision.rs): the run cannot go on without rank 1.
    let mut cmd = local_command(&config);
    cmd.args(["--max-restarts", "0"]).env("TROUPE_FAULT_KILL_DURING_CHECKPOINT", "10:1");
    let out = run(cmd, LIMIT);
    assert!(!out.status.success(), "the run cannot go on without rank 1");
    let err = stderr(&out);
    assert!(err.contains("fewer than cluster.min_workers") && err.contains("dies while writing its checkpoint shard of step 10"), "{err}");
    let ckpts = run_dir.join("checkpoints");
    assert!(!ckpts.join("step-000010").exists(), "no committed checkpoint at step 10");
    let partial: Vec<PathBuf> =
        std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains("step-000010.")).collect();
    assert!(!partial.is_empty() && partial.iter().all(|p| !p.join("MANIFEST").exists()), "{partial:?}");
    let newest = troupe_common::checkpoint::find_resumable(&run_dir).unwrap().unwrap();
    assert_eq!(newest.manifest.step, 5);

    let out = run_local(&config, &["--resume"]);
    assert_success(&out);
    assert!(stdout(&out).contains("training resumed at step 5"), "{}", stdout(&out));
    let reference_dir = dir.join("reference");
    assert_success(&run_local(&self::config(&reference_dir, &data, 2, "zero2", STEPS), &[]));
    assert_same_losses("killed at 10, resumed from 5", &last_losses(&reference_dir.join("runs/tiny")), &last_losses(&run_dir), 5..STEPS);
}

/// A flipped byte in one rank's shard is caught by sha256 at resume, the file is
/// named, and the previous checkpoint is used.
#[test]
fn a_flipped_byte_in_a_shard_is_named_and_the_previous_checkpoint_used() {
    let dir = scratch("flipped-shard");
    let data = prepare_small_corpus(&dir);
    let config = config(&dir, &data, 3, "zero3", 15);
    assert_success(&run_local(&config, &[]));
    let shard = dir.join("runs/tiny/checkpoints/step-000015/shard-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    let out = run_local(&config, &["--resume", "--steps", "20"]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("step-000015") && err.contains("shard-00002.safetensors is corrupted"), "{err}");
    assert!(stdout(&out).contains("training resumed at step 10"), "{}", stdout(&out));
}
