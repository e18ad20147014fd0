//! The coordinator and every worker serve Prometheus `/metrics` while a run is going.

mod common;

use common::*;
use std::io::BufRead;
use std::process::Stdio;
use std::time::Duration;

/// The value of a sample line `name{labels} value` (labels given exactly, or none).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[test]
fn coordinator_and_workers_export_metrics_during_a_run() {
    let dir = scratch("metrics");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 5000);
    let child = troupe()
        .arg("local")
        .arg("--config")
        .arg(&config)
        .args(["--sample-tokens", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let local_stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut coordinator_addr = None;
    for line in local_stdout.lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("coordinator metrics on http://") {
            coordinator_addr = Some(rest.trim_end_matches("/metrics").to_string());
        }
        if line.contains("training started") {
            break;
        }
    }
    let coordinator_addr = coordinator_addr.expect("the coordinator prints its metrics address");
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 5, Duration::from_secs(120));

    let body = http_get(&coordinator_addr, "/metrics");
    assert!(sample(&body, "troupe_step ") >= 5.0);
    assert!(sample(&body, "troupe_train_loss ") > 0.0);
    assert!(sample(&body, "troupe_tokens_per_second ") > 0.0);
    assert_eq!(sample(&body, "troupe_workers{state=\"training\"} "), 2.0);
    assert!(sample(&body, "troupe_allreduce_seconds_count ") >= 5.0);

    for i in 0..2 {
        let log = std::fs::read_to_string(run_dir.join(format!("logs/worker-{i}.log"))).unwrap();
        let addr = log
            .lines()
            .find_map(|l| l.split("worker metrics on http://").nth(1))
            .map(|rest| rest.trim_end_matches("/metrics").to_string())
            .unwrap_or_else(|| panic!("worker {i} logs its metrics address:\n{log}"));
        let body = http_get(&addr, "/metrics");
        let worker_label = body.lines().find_map(|l| l.strip_prefix("troupe_worker_step{")).expect("troupe_worker_step");
        assert!(worker_label.contains("worker="), "{worker_label}");
        assert!(body.contains("troupe_worker_step_seconds_count{phase=\"communication\""), "{body}");
        assert!(body.lines().any(|l| l.starts_with("troupe_bytes_sent_total") && !l.ends_with(" 0")), "{body}");
    }
    // `troupe status` shows the run and every worker.
    let mut cmd = troupe();
    cmd.args(["status", "--coordinator", &coordinator_addr, "--json"]);
    let out = run(cmd, Duration::from_secs(30));
    assert_success(&out);
    let status: troupe_common::status::RunStatus = serde_json::from_str(&stdout(&out)).expect("status JSON");
    assert_eq!(status.phase, "training");
    assert_eq!(status.run, "tiny");
    assert!(status.step >= 5 && status.loss.is_some() && status.tokens_per_second.is_some(), "{status:?}");
    let mut ranks: Vec<u32> = status.workers.iter().filter_map(|w| w.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1]);
    for w in &status.workers {
        assert_eq!(w.state, "training");
        assert!(w.last_heartbeat_ms < 5000, "{w:?}");
        assert!(w.step_seconds.is_some() && w.metrics.is_some(), "{w:?}");
    }
    let mut cmd = troupe();
    cmd.args(["status", "--coordinator", &coordinator_addr]);
    let table = stdout(&run(cmd, Duration::from_secs(30)));
    assert!(table.contains("run tiny | training") && table.contains("heartbeat"), "{table}");

    // Stop the run the way a user does: Ctrl-C checkpoints and stops the workers.
    std::process::Command::new("kill").args(["-INT", &child.0.id().to_string()]).status().unwrap();
    assert!(child.0.wait().unwrap().success());
}
