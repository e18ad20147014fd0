//! End-to-end training with real processes: equivalence across world sizes, resume, and
//! falling back from a corrupted checkpoint.

mod common;

use common::*;
use std::time::Duration;
use troupe_core::events::RunEvent;

const LIMIT: Duration = Duration::from_secs(300);

/// The core correctness test: 2 workers with a ring all-reduce reach the same parameters and
/// losses as 1 worker computing the whole global batch.
#[test]
fn two_workers_match_one_worker() {
    let dir = scratch("equivalence");
    let data = prepare_small_corpus(&dir);
    let one = dir.join("one");
    let two = dir.join("two");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let out1 = run_local(&tiny_config(&one, &data, 1, 20), &[]);
    assert_success(&out1);
    let out2 = run_local(&tiny_config(&two, &data, 2, 20), &[]);
    assert_success(&out2);

    let run1 = one.join("runs/tiny");
    let run2 = two.join("runs/tiny");
    let l1 = step_losses(&run1);
    let l2 = step_losses(&run2);
    assert_eq!(l1.len(), 20);
    assert_eq!(l2.len(), 20);
    for ((s1, a), (s2, b)) in l1.iter().zip(&l2) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-4, "step {s1}: loss {a} (1 worker) vs {b} (2 workers)");
    }
    assert!(l1[19].1 < l1[0].1 - 0.5, "the model learns: {:?}", l1);

    let p1 = checkpoint_params(&run1.join("checkpoints/step-000020"));
    let p2 = checkpoint_params(&run2.join("checkpoints/step-000020"));
    assert_eq!(p1.len(), p2.len());
    let max_diff = max_abs_diff(&p1, &p2);
    println!("max abs parameter difference after 20 steps: {max_diff:e}");
    assert!(max_diff < 1e-4, "max abs parameter difference {max_diff}");

    // Both runs evaluated and checkpointed on schedule: every 10 steps, and at every
    // checkpoint (every 5), which the Evaluator and Deployer need.
    let evals: Vec<u64> =
        events(&run2).into_iter().filter_map(|e| if let RunEvent::Eval { step, .. } = e { Some(step) } else { None }).collect();
    assert_eq!(evals, vec![5, 10, 15, 20]);
    let joined = events(&run2).into_iter().filter(|e| matches!(e, RunEvent::WorkerJoined { .. })).count();
    assert_eq!(joined, 2);
    assert!(events(&run2).iter().any(|e| matches!(e, RunEvent::Finished { step: 20, .. })));
}

/// A run stopped (SIGINT) after a checkpoint and resumed gives the same losses for the
/// following steps as an uninterrupted run.
#[test]
fn resume_after_stop_continues_exactly() {
    let dir = scratch("resume");
    let data = prepare_small_corpus(&dir);
    let whole = dir.join("whole");
    let parts = dir.join("parts");
    std::fs::create_dir_all(&whole).unwrap();
    std::fs::create_dir_all(&parts).unwrap();
    let uninterrupted = run_local(&tiny_config(&whole, &data, 2, 16), &[]);
    assert_success(&uninterrupted);
    let reference = step_losses(&whole.join("runs/tiny"));

    // Stop the second run with SIGINT once it has done a few steps: the coordinator finishes
    // the step in flight, checkpoints and stops the workers.
    let config = tiny_config(&parts, &data, 2, 16);
    let run_dir = parts.join("runs/tiny");
    let mut child = spawn_local(&config);
    wait_for_steps(&run_dir, 3, LIMIT);
    if let Some(status) = child.0.try_wait().unwrap() {
        panic!("the run ended before it could be interrupted: {status}");
    }
    std::process::Command::new("kill").args(["-INT", &child.0.id().to_string()]).status().unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "a stop on request is a clean exit: {status}");
    let stopped_at = step_losses(&run_dir).len() as u64;
    assert!(stopped_at < 16, "stopped early, at {stopped_at}");
    let ckpt = run_dir.join(format!("checkpoints/step-{stopped_at:06}/MANIFEST"));
    assert!(ckpt.is_file(), "a checkpoint at the stop step {stopped_at}");

    let resumed = run_local(&config, &["--resume"]);
    assert_success(&resumed);
    assert!(stdout(&resumed).contains(&format!("training resumed at step {stopped_at}")), "{}", stdout(&resumed));
    let after = step_losses(&run_dir);
    assert_eq!(after.len(), 16, "each step once: {after:?}");
    for ((s1, a), (s2, b)) in reference.iter().zip(&after) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: uninterrupted {a} vs stopped-and-resumed {b}");
    }
}

/// A checkpoint with a corrupted or missing file is skipped: resume falls back to the previous
/// complete one and says so.
#[test]
fn resume_falls_back_from_a_corrupted_checkpoint() {
    let dir = scratch("fallback");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 15);
    assert_success(&run_local(&config, &[]));
    let ckpts = dir.join("runs/tiny/checkpoints");
    // Corrupt the newest (15), delete a file of the one before (10): resume must use 5.
    let shard15 = ckpts.join("step-000015/shard-00000.safetensors");
    let mut bytes = std::fs::read(&shard15).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard15, bytes).unwrap();
    std::fs::remove_file(ckpts.join("step-000010/shard-00000.safetensors")).unwrap();

    let out = run_local(&config, &["--resume", "--steps", "20"]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("step-000015") && err.contains("shard-00000.safetensors is corrupted"), "{err}");
    assert!(err.contains("step-000010") && err.contains("missing"), "{err}");
    assert!(stdout(&out).contains("falling back to the newest complete checkpoint"), "{}", stdout(&out));
    assert!(stdout(&out).contains("training resumed at step 5"), "{}", stdout(&out));
}

/// A failure in a supervised actor restarts it and training goes on: the Checkpointer panics
/// while committing step 5; that checkpoint is reported failed, the actor is restarted, and
/// the checkpoints at steps 10 and 15 commit as usual.
#[test]
fn a_crashed_checkpointer_is_restarted_and_training_goes_on() {
    let dir = scratch("supervision");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 15);
    let mut cmd = local_command(&config);
    cmd.env("TROUPE_FAULT_CHECKPOINTER_PANIC_AT_STEP", "5");
    let out = run(cmd, LIMIT);
    assert_success(&out);
    let run_dir = dir.join("runs/tiny");
    let events = events(&run_dir);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("Checkpointer") && message.contains("restarted"))),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e, RunEvent::CheckpointFailed { step: 5, .. })), "{events:?}");
    let committed: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Checkpoint { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(committed, vec![10, 15]);
    assert_eq!(step_losses(&run_dir).len(), 15);
    assert!(!run_dir.join("checkpoints/step-000005/MANIFEST").exists());
}

/// Sets `key = value` in the `[section]` of a config file the fixtures wrote.
fn set_in_config(config: &std::path::Path, section: &str, line: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no [{section}] in {}", config.display());
    std::fs::write(config, text.replacen(&header, &format!("{header}{line}\n"), 1)).unwrap();
}

/// A NaN put into rank 1's gradient at step 6 (a fault hook, as bad data or a flaky GPU would):
/// both ranks skip step 6, the run says so naming rank 1 and goes on, and its parameters at the
/// end are exactly those of a run told to skip step 6. NaNs in a row stop the run with exit
/// non-zero, naming the rank.
#[test]
fn a_nan_on_one_rank_is_skipped_everywhere_and_nans_in_a_row_stop_the_run() {
    let dir = scratch("nonfinite");
    let data = prepare_small_corpus(&dir);
    let run_with = |name: &str, var: &str, value: &str, max_skipped: Option<u32>| {
        let out_dir = dir.join(name);
        std::fs::create_dir_all(&out_dir).unwrap();
        let config = tiny_config(&out_dir, &data, 2, 12);
        if let Some(max) = max_skipped {
            set_in_config(&config, "train", &format!("max_skipped_steps = {max}"));
        }
        let mut cmd = local_command(&config);
        cmd.env(var, value);
        (run(cmd, LIMIT), out_dir.join("runs/tiny"))
    };
    let (nan, nan_run) = run_with("nan", "TROUPE_FAULT_NAN_GRAD", "1:6", None);
    assert_success(&nan);
    let (told, told_run) = run_with("told", "TROUPE_FAULT_SKIP_STEPS", "6", None);
    assert_success(&told);

    let events = events(&nan_run);
    let skipped: Vec<_> = events.iter().filter(|e| matches!(e, RunEvent::StepSkipped { .. })).collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        matches!(skipped[0], RunEvent::StepSkipped { step: 6, ranks, reason, in_a_row: 1, .. } if ranks == &vec![1] && reason == "nonfinite_gradient"),
        "{skipped:?}"
    );
    let stepped: Vec<u64> = step_losses(&nan_run).iter().map(|(s, _)| *s).collect();
    assert_eq!(stepped, (0..12).filter(|&s| s != 6).collect::<Vec<_>>(), "every other step is an ordinary one");
    assert!(stdout(&nan).contains("step 6 SKIPPED on every rank (nonfinite_gradient; 1 in a row): non-finite values from rank(s) [1]"));
    assert!(!events.iter().any(|e| matches!(e, RunEvent::RankDisagreed { .. })), "{events:?}");
    let (a, b) =
        (checkpoint_params(&nan_run.join("checkpoints/step-000012")), checkpoint_params(&told_run.join("checkpoints/step-000012")));
    assert!(a.iter().all(|v| v.is_finite()));
    assert!(a == b, "the parameters after a NaN at step 6 differ from a run told to skip step 6 by {}", max_abs_diff(&a, &b));

    // NaNs from step 3 on, three allowed in a row: steps 3, 4, 5 are skipped and the run stops.
    let (failed, failed_run) = run_with("streak", "TROUPE_FAULT_NAN_GRAD", "1:3-100", Some(3));
    assert!(!failed.status.success(), "{}", stdout(&failed));
    let said = format!("{}{}", stdout(&failed), stderr(&failed));
    assert!(said.contains("3 steps in a row (3..=5) were skipped") && said.contains("rank 1 (worker"), "{said}");
    assert_eq!(step_losses(&failed_run).len(), 3, "steps 0..3 trained");
    assert!(!failed_run.join("checkpoints/step-000006").exists(), "nothing after the NaNs is saved");
}

/// Unmounts a tmpfs the test mounted, however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Checkpoints on a small tmpfs that fills up: the error names the disk and the folder, no
/// partial folder is left, the committed checkpoints still verify, and the run exits non-zero
/// saying what was lost when its final checkpoint cannot be committed; once space is freed,
/// `--resume` continues from the newest good checkpoint.
#[test]
fn a_full_disk_fails_the_run_loudly_and_resume_continues_once_space_is_freed() {
    let dir = scratch("fulldisk");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 12);
    set_in_config(&config, "checkpoint", "max_failures = 2");
    let text = std::fs::read_to_string(&config).unwrap().replace("interval = 5\nkeep_last", "interval = 4\nkeep_last");
    std::fs::write(&config, text).unwrap();
    // The run folder (run.out_dir/tiny) on the small disk: a checkpoint of the tiny model is
    // ~1.6 MB and a write needs its size plus 1 MiB free, so 5 MiB take two (steps 4 and 8)
    // and the logs, not the third (12).
    let mount_point = dir.join("runs");
    std::fs::create_dir_all(&mount_point).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=5m", "tmpfs"]).arg(&mount_point).output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => return skip_or_fail(&format!("cannot mount a tmpfs (needs root): {}", String::from_utf8_lossy(&out.stderr))),
        Err(e) => return skip_or_fail(&format!("cannot run mount: {e}")),
    }
    let _unmount = Mounted(mount_point.clone());
    let run_dir = mount_point.join("tiny");
    let disk = run_dir.join("checkpoints");

    let out = run(local_command(&config), LIMIT);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "a run whose final checkpoint is lost must not exit 0: {said}");
    assert!(said.contains("the final checkpoint at step 12 could not be committed after 2 tries"), "{said}");
    assert!(said.contains("step-000008") && said.contains("steps 8..12 are lost"), "{said}");
    let events = events(&run_dir);
    let failures: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::CheckpointFailed { step: 12, error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 2, "{events:?}");
    let named = format!("no room for a checkpoint in {}", disk.display());
    assert!(failures[0].contains(&named), "{}", failures[0]);
    assert!(failures[0].contains(&format!("the disk mounted at {}", mount_point.display())), "{}", failures[0]);
    let left: Vec<String> = std::fs::read_dir(&disk).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(
        {
            let mut l = left.clone();
            l.sort();
            l
        },
        vec!["step-000004".to_string(), "step-000008".to_string()],
        "no partial folder is left"
    );
    for step in ["step-000004", "step-000008"] {
        troupe_common::checkpoint::verify(&disk.join(step)).unwrap_or_else(|e| panic!("{step} no longer verifies: {e}"));
    }

    // Space added (the operator grows the volume): the run resumes from step 8 and finishes.
    let grown = std::process::Command::new("mount").args(["-o", "remount,size=32m"]).arg(&mount_point).status().unwrap();
    assert!(grown.success());
    let resumed = run(
        {
            let mut cmd = local_command(&config);
            cmd.arg("--resume");
            cmd
        },
        LIMIT,
    );
    assert_success(&resumed);
    assert!(stdout(&resumed).contains("training resumed at step 8"), "{}", stdout(&resumed));
    troupe_common::checkpoint::verify(&disk.join("step-000012")).expect("the final checkpoint, written after the resume");
}

/// A word-level tokenizer.json with `n` words (`w0` …) and the separator: a vocabulary above
/// 65,536 ids without training one.
fn word_tokenizer(n: usize) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    vocab.insert("[UNK]".into(), 1.into());
    for i in 0..n {
        vocab.insert(format!("w{i}"), (i + 2).into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

/// `troupe prepare` mixing a JSONL source and a folder of text 3:1 with a given tokenizer of
/// 100,000 ids: the shards hold u32 ids, the report names both sources and the bad line, and
/// `troupe local` trains a few steps on them.
#[test]
fn a_mixture_with_a_100k_vocabulary_is_prepared_into_u32_shards_and_trains() {
    let dir = scratch("u32-mixture");
    std::fs::write(dir.join("tokenizer.json"), word_tokenizer(100_000)).unwrap();
    let words = |seed: u64, n: u64| -> String {
        (0..n).map(|j| format!("w{}", 50_000 + (seed * 7919 + j * 104_729) % 50_000)).collect::<Vec<_>>().join(" ")
    };
    let mut jsonl = String::new();
    for i in 0..300 {
        jsonl.push_str(&serde_json::json!({ "text": words(i, 80) }).to_string());
        jsonl.push('\n');
    }
    jsonl.push_str("{\"not_text\": 1}\n");
    std::fs::write(dir.join("web.jsonl"), jsonl).unwrap();
    std::fs::create_dir_all(dir.join("books")).unwrap();
    for i in 0..30 {
        std::fs::write(dir.join(format!("books/{i}.txt")), words(1000 + i, 400)).unwrap();
    }
    let data = dir.join("data");
    let mut prepare = troupe();
    prepare.arg("prepare").arg("--out").arg(&data).arg("--tokenizer").arg(dir.join("tokenizer.json"));
    prepare.arg("--source").arg(format!("web={}:0.75", dir.join("web.jsonl").display()));
    prepare.arg("--source").arg(format!("books={}:0.25", dir.join("books").display()));
    prepare.args(["--shard-tokens", "4000", "--val-fraction", "0.1"]);
    let out = run(prepare, Duration::from_secs(120));
    assert_success(&out);
    let said = stdout(&out);
    assert!(said.contains("U32") && said.contains("web") && said.contains("books"), "{said}");
    let meta = troupe_common::data::verify_prepared(&data).unwrap();
    assert_eq!(meta.dtype, troupe_common::data::TokenDtype::U32);
    assert!(meta.train.len() > 2, "several shards");
    assert_eq!(meta.sources[0].bad_records, 1);
    let web_share = meta.sources[0].mixed_tokens as f64 / meta.train_tokens as f64;
    assert!((web_share - 0.75).abs() < 0.01, "web's share {web_share}");

    let config = tiny_config(&dir, &data, 1, 6);
    let out = run_local(&config, &[]);
    assert_success(&out);
    let losses = step_losses(&dir.join("runs/tiny"));
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|(_, l)| l.is_finite() && *l > 5.0), "{losses:?}");
    // Each source's validation loss is reported on its own.
    let per_source: Vec<Vec<String>> = events(&dir.join("runs/tiny"))
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::Eval { per_source, .. } => Some(per_source.keys().cloned().collect()),
            _ => None,
        })
        .collect();
    assert!(!per_source.is_empty() && per_source.iter().all(|s| s == &vec!["books".to_string(), "web".to_string()]), "{per_source:?}");
}

/// Pids of the direct children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}

fn best_trial(out: &std::process::Output) -> String {
    let text = stdout(out);
    text.lines()
        .find(|l| l.starts_with("best: trial"))
        .unwrap_or_else(|| panic!("no best trial in:\n{text}"))
        .split(" (")
        .next()
        .unwrap()
        .to_string()
}

/// `troupe sweep` over the tiny model: four trials, two at a time, successive halving at
/// steps 5, 10, 20, 40. Run once undisturbed; then again with one trial's process killed with
/// -9 twice and the driver killed with -9 and resumed: the two studies are the same — every
/// trial ends the same way with the same metrics at the same steps (within 1e-4), and the same
/// trial is best — because early stopping decides in trial order, never by timing.
#[test]
fn a_sweep_ends_the_same_after_killed_trials_and_a_killed_driver() {
    let dir = scratch("sweep");
    let data = prepare_small_corpus(&dir);
    let base = tiny_config(&dir, &data, 1, 40);
    let sweep_file = |name: &str| {
        let path = dir.join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nbase = \"{}\"\ntrials = 4\nparallel = 2\nworkers = 1\nseed = 3\nmax_restarts = 3\n\
             [set]\n\"checkpoint.interval\" = 5\n\"train.threads_per_worker\" = 1\n\
             [space.\"train.learning_rate\"]\nlog_uniform = [1e-3, 3e-2]\n\
             [scheduler]\nkind = \"asha\"\ngrace_steps = 5\nreduction_factor = 2\n",
            base.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let sweeps = dir.join("sweeps");
    let mut cmd = troupe();
    cmd.arg("sweep").arg("--file").arg(sweep_file("calm")).arg("--out").arg(&sweeps).arg("--deploy");
    let calm = run(cmd, LIMIT);
    assert_success(&calm);
    // --deploy: the best trial's best checkpoint is the registry's first version.
    assert!(stdout(&calm).contains("deploy: published v1"), "{}", stdout(&calm));
    assert!(sweeps.join("calm/registry/v1").is_dir());
    let calm_events = study_events(&sweeps.join("calm"));
    for trial in 0..4 {
        assert_eq!(count(&calm_events, "trial_started", trial), 1, "{calm_events:?}");
        assert_eq!(count(&calm_events, "finished", trial) + count(&calm_events, "stopped", trial), 1, "trial {trial}: {calm_events:?}");
    }
    assert!(calm_events.iter().any(|e| e["event"] == "stopped"), "ASHA stopped someone: {calm_events:?}");
    assert_eq!(std::fs::read_to_string(sweeps.join("calm/results.csv")).unwrap().lines().count(), 5);
    let svg = std::fs::read_to_string(sweeps.join("calm/curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("(best)"), "{svg}");

    // Trial 0 goes through every rung (it has no earlier trial to lose to): kill its
    // `troupe local` twice, each time once it has reported again.
    let study = sweeps.join("crashy");
    let mut driver = troupe();
    driver.arg("sweep").arg("--file").arg(sweep_file("crashy")).arg("--out").arg(&sweeps);
    driver.args(["--metrics-listen", "127.0.0.1:0"]);
    let driver_out = std::fs::File::create(dir.join("crashy.out")).unwrap();
    let mut driver = KillOnDrop(driver.stdout(driver_out).stderr(std::process::Stdio::null()).spawn().unwrap());
    // The sweep's metrics while it runs.
    let mut metrics = String::new();
    wait_until("the sweep serves metrics", LIMIT, Duration::from_millis(20), || {
        let said = std::fs::read_to_string(dir.join("crashy.out")).unwrap_or_default();
        let Some(addr) = said.lines().find_map(|l| l.strip_prefix("sweep metrics on http://")).and_then(|a| a.strip_suffix("/metrics"))
        else {
            return false;
        };
        metrics = http_get(addr, "/metrics");
        metrics.contains("troupe_sweep_trials{state=\"running\"} 2")
    });
    assert!(metrics.contains("troupe_sweep_trials{state=\"pending\"} 2"), "{metrics}");
    for attempt in 1..=2 {
        let reported = |events: &[serde_json::Value]| count(events, "reported", 0);
        let before = reported(&study_events(&study));
        wait_until("trial 0 reports", LIMIT, Duration::from_millis(20), || reported(&study_events(&study)) > before);
        let trial0 = children_of(driver.0.id())
            .into_iter()
            .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("trial-000")))
            .expect("trial 0 runs");
        std::process::Command::new("kill").args(["-9", &trial0.to_string()]).status().unwrap();
        wait_until("the driver restarts trial 0", LIMIT, Duration::from_millis(20), || {
            count(&study_events(&study), "restarted", 0) == attempt
        });
    }
    // Then the driver, once a trial has ended; --resume finishes the rest.
    wait_until("a trial ends", LIMIT, Duration::from_millis(50), || {
        study_events(&study).iter().any(|e| e["event"] == "finished" || e["event"] == "stopped")
    });
    let trials = children_of(driver.0.id());
    std::process::Command::new("kill").args(["-9", &driver.0.id().to_string()]).status().unwrap();
    driver.0.wait().unwrap();
    // Its running trials are told to stop (SIGTERM on the driver's death) and checkpoint.
    wait_until("the orphaned trials stop", LIMIT, Duration::from_millis(50), || {
        trials.iter().all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
    let before = study_events(&study);
    let mut resume = troupe();
    resume.arg("sweep").arg("--file").arg(sweep_file("crashy")).arg("--out").arg(&sweeps).arg("--resume");
    let resumed = run(resume, LIMIT);
    assert_success(&resumed);
    let events = study_events(&study);
    for trial in 0..4 {
        assert_eq!(count(&events, "trial_started", trial), 1, "trial {trial} started once: {events:?}");
        if count(&before, "finished", trial) + count(&before, "stopped", trial) == 1 {
            assert_eq!(count(&events, "reported", trial), count(&before, "reported", trial), "trial {trial} ended before: not run again");
        }
    }
    assert_eq!(count(&events, "restarted", 0), 2, "{events:?}");
    let (calm_outcome, crashy_outcome) = (study_outcome(&calm_events), study_outcome(&events));
    assert_eq!(calm_outcome.len(), crashy_outcome.len());
    for (trial, (ended, metrics)) in &calm_outcome {
        let (crashy_ended, crashy_metrics) = &crashy_outcome[trial];
        assert_eq!(ended, crashy_ended, "trial {trial}");
        assert_eq!(metrics.keys().collect::<Vec<_>>(), crashy_metrics.keys().collect::<Vec<_>>(), "trial {trial}: the same steps");
        for (step, m) in metrics {
            assert!((m - crashy_metrics[step]).abs() < 1e-4, "trial {trial} step {step}: {m} against {}", crashy_metrics[step]);
        }
    }
    assert_eq!(best_trial(&calm), best_trial(&resumed));
}
