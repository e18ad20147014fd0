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
