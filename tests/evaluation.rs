//! Evaluation off the training path: an eval worker (`troupe worker --role eval`, started by
//! `troupe local --eval-worker`) measures committed checkpoints exactly as the ranks do; the
//! deploy gate judges by a task's score when `deploy.metric` says so; an eval worker that dies
//! is restarted and its job redone, or, with none coming back, the coordinator measures the
//! checkpoint itself. Nothing waits forever.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use troupe_common::registry::EvalResults;
use troupe_core::events::RunEvent;

/// (val loss, task scores, who measured) of every evaluated checkpoint, by step.
fn evaluated(run_dir: &Path) -> BTreeMap<u64, (f64, BTreeMap<String, f64>, String)> {
    events(run_dir)
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::Evaluated { step, val_loss, tasks, by, .. } => Some((step, (val_loss, tasks, by))),
            _ => None,
        })
        .collect()
}

/// A config for these tests: the tiny model, checkpoints every 5 steps, the next-line task on
/// 8 items, and the deploy gate on its accuracy.
fn eval_config(dir: &Path, data: &Path, extra_eval: &str) -> std::path::PathBuf {
    let config = tiny_config(dir, data, 2, 20);
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[eval]\n", &format!("[eval]\ntask_items = 8\n{extra_eval}"), 1).replacen(
        "[checkpoint]\n",
        "[deploy]\nmetric = \"next_line_acc\"\n\n[checkpoint]\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// The same run with and without an eval worker: the same parameters at every checkpoint, so
/// the eval worker's measurement must be the ranks' (loss within 1e-5 relative, which is the
/// order of the sums; task scores equal), and in each run the Deployer published exactly the
/// checkpoints whose accuracy beat the serving version's.
#[test]
fn an_eval_worker_measures_checkpoints_as_the_ranks_do() {
    let dir = scratch("eval-worker");
    let data = prepare_small_corpus(&dir);
    let (sharded, off_path) = (dir.join("sharded"), dir.join("off-path"));
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::create_dir_all(&off_path).unwrap();
    assert_success(&run_local(&eval_config(&sharded, &data, ""), &[]));
    let out = run_local(&eval_config(&off_path, &data, ""), &["--eval-worker"]);
    assert_success(&out);
    let (run_a, run_b) = (sharded.join("runs/tiny"), off_path.join("runs/tiny"));

    let (a, b) = (evaluated(&run_a), evaluated(&run_b));
    let steps: Vec<u64> = vec![5, 10, 15, 20];
    assert_eq!(a.keys().copied().collect::<Vec<_>>(), steps, "every checkpoint evaluated (sharded)");
    assert_eq!(b.keys().copied().collect::<Vec<_>>(), steps, "every checkpoint evaluated (eval worker)\n{}", stdout(&out));
    assert!(a.values().all(|(_, _, by)| by == "ranks"), "{a:?}");
    // `troupe local --eval-worker` starts the training workers once the eval worker has
    // joined: it measures every checkpoint.
    assert!(b.values().all(|(_, _, by)| by.starts_with("eval worker")), "{b:?}");
    for step in &steps {
        let name = format!("checkpoints/step-{step:06}");
        let diff = max_abs_diff(&checkpoint_params(&run_a.join(&name)), &checkpoint_params(&run_b.join(&name)));
        assert_eq!(diff, 0.0, "step {step}: the eval worker changed training");
        let ((loss_a, tasks_a, _), (loss_b, tasks_b, by)) = (&a[step], &b[step]);
        println!("step {step}: val loss {loss_a:.6} (ranks) vs {loss_b:.6} ({by}); tasks {tasks_a:?} vs {tasks_b:?}");
        assert!((loss_a - loss_b).abs() <= 1e-5 * loss_a.abs(), "step {step}: {loss_a} vs {loss_b}");
        assert_eq!(tasks_a, tasks_b, "step {step}");
        assert!(tasks_a.contains_key("next_line_acc") && tasks_a.contains_key("next_line_gen_exact_match"));
        // eval.json holds the same.
        let json: EvalResults = serde_json::from_slice(&std::fs::read(run_b.join(&name).join("eval.json")).unwrap()).unwrap();
        assert_eq!((json.val_loss, &json.tasks), (*loss_b, tasks_b));
    }
    // The sweep follower and the metrics read the loss from `eval` events: one per evaluation;
    // the run's final report has the last one, measured after the last step.
    let evals = events(&run_b).into_iter().filter(|e| matches!(e, RunEvent::Eval { .. })).count();
    assert_eq!(evals, 4);
    let last = format!("final validation loss {:.4}", b[&20].0);
    assert!(stdout(&out).contains(&last), "{last}?\n{}", stdout(&out));

    for run in [&run_a, &run_b] {
        let acc: BTreeMap<u64, f64> = evaluated(run).into_iter().map(|(s, (_, t, _))| (s, t["next_line_acc"])).collect();
        let mut serving: Option<f64> = None;
        for e in events(run) {
            if let RunEvent::Deployed { step, action, reason, .. } = e {
                let score = acc[&step];
                let expected = if serving.is_none_or(|bar| score > bar) { "published" } else { "skipped" };
                assert_eq!(action, expected, "step {step}: accuracy {score} against {serving:?}: {reason}");
                assert!(reason.contains("next_line_acc"), "{reason}");
                if action == "published" {
                    serving = Some(score);
                }
            }
        }
        assert!(serving.is_some(), "the first checkpoint is published");
    }
}

/// The deploy gate on a task's score, decision by decision, on a real checkpoint: higher is
/// better, by at least `deploy.min_improvement`; a checkpoint without the score is skipped.
#[test]
fn the_deploy_gate_follows_the_metric_it_is_given() {
    let dir = scratch("deploy-metric");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 5);
    assert_success(&run_local(&config, &["--set", "deploy.enabled=false"]));
    let checkpoint = dir.join("runs/tiny/checkpoints/step-000005");
    let registry = dir.join("registry");
    let mut deploy = troupe_core::config::DeployConfig { metric: "next_line_acc".into(), min_improvement: 0.05, ..Default::default() };
    let results = |acc: Option<f64>, loss: f64| EvalResults {
        step: 5,
        val_loss: loss,
        perplexity: loss.exp(),
        sequences: 16,
        samples: vec![],
        tasks: acc.map(|a| [("next_line_acc".to_string(), a)].into_iter().collect()).unwrap_or_default(),
    };
    let decide = |deploy: &troupe_core::config::DeployConfig, acc: Option<f64>, loss: f64| {
        let d = troupe_coordinator::actors::deployer::consider(&registry, "tiny", deploy, 5, &checkpoint, &results(acc, loss)).unwrap();
        println!("{:?} {loss}: {} ({})", acc, d.action, d.reason);
        d.action
    };
    assert_eq!(decide(&deploy, Some(0.25), 5.0), "published", "the first version");
    assert_eq!(decide(&deploy, Some(0.27), 4.0), "skipped", "better, but by less than min_improvement (a lower loss does not count)");
    assert_eq!(decide(&deploy, Some(0.40), 6.0), "published", "better by more than min_improvement (a higher loss does not count)");
    assert_eq!(decide(&deploy, Some(0.10), 3.0), "skipped", "worse");
    assert_eq!(decide(&deploy, None, 3.0), "skipped", "no score to judge by");
    deploy.metric = "val_loss".into();
    deploy.min_improvement = 0.0;
    assert_eq!(decide(&deploy, None, 5.9), "published", "on the loss, lower is better");
    assert_eq!(decide(&deploy, Some(0.9), 5.95), "skipped", "on the loss, a higher one loses");
}

/// An eval worker that dies on its first job (a fault hook) is restarted by `troupe local`,
/// and the job is redone by the new one; with no restart, the coordinator measures the
/// checkpoint itself once `eval.worker_grace_s` has passed. Either way every checkpoint is
/// evaluated and the run ends.
#[test]
fn a_lost_eval_worker_is_restarted_or_its_job_done_by_the_coordinator() {
    let dir = scratch("eval-worker-lost");
    let data = prepare_small_corpus(&dir);
    for (name, restarts, grace) in [("restarted", "3", 120), ("not-restarted", "0", 2)] {
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir).unwrap();
        let marker = run_dir.join("eval-worker-died");
        let config = eval_config(&run_dir, &data, &format!("worker_grace_s = {grace}\n"));
        let mut cmd = local_command(&config);
        cmd.args(["--eval-worker", "--max-restarts", restarts]).env("TROUPE_FAULT_EVAL_WORKER_EXIT_ONCE", &marker);
        let out = run(cmd, std::time::Duration::from_secs(300));
        assert_success(&out);
        assert!(marker.exists(), "{name}: the eval worker got a job and died\n{}", stderr(&out));
        let evaluated = evaluated(&run_dir.join("runs/tiny"));
        assert_eq!(evaluated.keys().copied().collect::<Vec<_>>(), vec![5, 10, 15, 20], "{name}: {evaluated:?}\n{}", stdout(&out));
        let by: Vec<&str> = evaluated.values().map(|(_, _, by)| by.as_str()).collect();
        println!("{name}: measured by {by:?}");
        if restarts == "0" {
            // The lost job waited out the grace period, then the coordinator took it; later
            // checkpoints went back to the ranks (no eval worker left).
            assert!(by.contains(&"coordinator"), "{name}: {by:?}");
            assert!(!by.iter().any(|b| b.starts_with("eval worker")), "{name}: {by:?}");
        } else {
            assert!(stderr(&out).contains("restarting it"), "{name}: {}", stderr(&out));
            assert!(!by.contains(&"coordinator"), "{name}: the restarted eval worker redid the job: {by:?}");
            assert!(evaluated[&5].2.starts_with("eval worker"), "{name}: the job it died on was redone: {by:?}");
        }
    }
}
