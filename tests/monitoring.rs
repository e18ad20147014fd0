//! Monitoring as users run it: a real `troupe local` (coordinator, 2 workers, a serving
//! endpoint), the run's Prometheus targets file, the shipped `deploy/prometheus/prometheus.yml`
//! in a real Prometheus (Debian's package; `scripts/test.sh` installs it where apt works), and
//! the shipped Grafana dashboard, whose every query must name metrics troupe exports and, in
//! Prometheus, return data from the run.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often the waits below look again (their checks read files and make HTTP requests).
const POLL: Duration = Duration::from_millis(250);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build().into()
}

fn get(agent: &ureq::Agent, url: &str) -> Option<String> {
    let mut response = agent.get(url).call().ok()?;
    (response.status() == 200).then(|| response.body_mut().read_to_string().ok()).flatten()
}

/// The dashboard's panels and every query of each (`targets[].expr`).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("every panel has a title").to_string();
        for target in panel["targets"].as_array().expect("every panel has targets") {
            out.push((title.clone(), target["expr"].as_str().expect("every target has an expr").to_string()));
        }
    }
    out
}

/// Metric names a PromQL expression reads (troupe's all start with `troupe_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("troupe_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Names of the series a `/metrics` page exposes (histograms with their _bucket/_sum/_count).
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) = (words.next(), words.next(), words.next(), words.next()) {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Grafana's variables, as the dashboard uses them, replaced by what they mean for one run.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$run", ".*")
}

/// The run's targets file: (component, host:port) for every target.
fn targets(file: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
    let Ok(groups) = serde_json::from_str::<Value>(&text) else { return Vec::new() };
    let mut out = Vec::new();
    for group in groups.as_array().into_iter().flatten() {
        let component = group["labels"]["component"].as_str().unwrap_or_default().to_string();
        for t in group["targets"].as_array().into_iter().flatten() {
            out.push((component.clone(), t.as_str().unwrap_or_default().to_string()));
        }
    }
    out
}

fn prometheus_installed() -> bool {
    Command::new("prometheus").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// The address Prometheus (started on port 0) serves on, from its log line
/// `msg="Listening on" address=HOST:PORT`; None until it has written that line.
fn prometheus_address(log: &str) -> Option<String> {
    log.lines().filter(|line| line.contains("msg=\"Listening on\"")).find_map(|line| {
        let at = line.find(" address=")? + " address=".len();
        Some(line[at..].split_whitespace().next()?.trim_matches('"').to_string())
    })
}

/// An instant query through Prometheus's HTTP API: the result's (labels, value) pairs.
fn query(agent: &ureq::Agent, prometheus: &str, promql: &str) -> Vec<(Value, f64)> {
    let mut response = match agent.get(&format!("{prometheus}/api/v1/query")).query("query", promql).call() {
        Ok(r) => r,
        Err(_) => return Vec::new(),
    };
    let body: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap_or_default()).unwrap_or(Value::Null);
    assert_ne!(body["status"], json!("error"), "Prometheus refused the query {promql:?}: {body}");
    body["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse::<f64>().ok()?)))
        .collect()
}

#[test]
fn prometheus_scrapes_a_running_job_and_every_dashboard_query_has_data() {
    let dir = scratch("monitoring");
    let data = prepare_small_corpus(&dir);
    // Long enough to outlast the checks (it is stopped with Ctrl-C after them); checkpoints,
    // evaluations and deployments every 20 steps so that every panel has something to show.
    let config = tiny_config(&dir, &data, 2, 1_000_000);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("interval = 10\n", "interval = 20\n")
        .replace("interval = 5\n", "interval = 20\n");
    std::fs::write(&config, text.replace("keep_last = 10", "keep_last = 2")).unwrap();
    let log = std::fs::File::create(dir.join("local.log")).unwrap();
    let mut local = KillOnDrop(
        local_command(&config).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("start troupe local"),
    );
    let targets_file = dir.join("runs/prometheus/tiny.json");
    let log_tail = || std::fs::read_to_string(dir.join("local.log")).unwrap_or_default();
    wait_until("the targets file lists the coordinator, 2 workers and the serving endpoint", Duration::from_secs(120), POLL, || {
        let t = targets(&targets_file);
        let count = |role: &str| t.iter().filter(|(r, _)| r == role).count();
        assert!(local.0.try_wait().unwrap().is_none(), "troupe local exited early:\n{}", log_tail());
        count("coordinator") == 1 && count("worker") == 2 && count("serve") == 1
    });
    let targets = targets(&targets_file);
    let serve_url = format!("http://{}", targets.iter().find(|(r, _)| r == "serve").unwrap().1);
    let agent = agent();

    // A version must be served before completions (and their latency series) exist.
    let complete = |agent: &ureq::Agent| -> bool {
        agent
            .post(&format!("{serve_url}/v1/completions"))
            .header("Content-Type", "application/json")
            .send(json!({"prompt": "ROMEO.", "max_tokens": 4}).to_string())
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    };
    wait_until("the first version is deployed and answers", Duration::from_secs(120), POLL, || complete(&agent));

    // Without Prometheus: every dashboard query names metrics the run's endpoints export.
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/troupe.json")).unwrap())
        .expect("deploy/grafana/troupe.json is valid JSON");
    let queries = dashboard_queries(&dashboard);
    let mut exported = BTreeSet::new();
    for (_, target) in &targets {
        let page = get(&agent, &format!("http://{target}/metrics")).unwrap_or_else(|| panic!("GET http://{target}/metrics"));
        exported.extend(exported_names(&page));
    }
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?} reads no troupe metric: {expr}");
        for name in names {
            assert!(exported.contains(&name), "panel {title:?} reads {name}, which no troupe endpoint exports");
            used.insert(name);
        }
    }
    for required in [
        "troupe_train_loss",
        "troupe_tokens_per_second",
        "troupe_workers",
        "troupe_allreduce_seconds_bucket",
        "troupe_checkpoint_seconds_bucket",
        "troupe_eval_loss",
        "troupe_deployed_version",
        "troupe_serve_request_seconds_bucket",
    ] {
        assert!(used.contains(required), "the dashboard shows {required}");
    }
    println!(
        "dashboard: {} panels, {} queries over {} metrics, all exported",
        dashboard["panels"].as_array().unwrap().len(),
        queries.len(),
        used.len()
    );

    if !prometheus_installed() {
        skip_or_fail("the Prometheus half: prometheus is not installed (scripts/test.sh installs it: apt-get install prometheus)");
        stop(&mut local);
        return;
    }

    // The shipped configuration, unchanged, in a checkout-shaped folder: its relative
    // `../../runs/prometheus/*.json` then reads this run's targets file.
    let config_dir = dir.join("deploy/prometheus");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::copy(root().join("deploy/prometheus/prometheus.yml"), config_dir.join("prometheus.yml")).unwrap();
    let prometheus_log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(prometheus_log.try_clone().unwrap())
            .stderr(prometheus_log)
            .spawn()
            .expect("start prometheus"),
    );
    let prometheus_tail = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let mut prometheus_url = String::new();
    wait_until("Prometheus logs the port it listens on", Duration::from_secs(60), POLL, || {
        assert!(prometheus.0.try_wait().unwrap().is_none(), "prometheus exited early:\n{}", prometheus_tail());
        prometheus_address(&prometheus_tail()).map(|addr| prometheus_url = format!("http://{addr}")).is_some()
    });

    wait_until("Prometheus scrapes all 4 targets", Duration::from_secs(90), POLL, || {
        query(&agent, &prometheus_url, r#"up{job="troupe", run="tiny"} == 1"#).len() == 4
    });
    let by_role = query(&agent, &prometheus_url, r#"count by (component) (up{job="troupe"} == 1)"#);
    let role_count = |role: &str| by_role.iter().find(|(m, _)| m["component"] == role).map(|(_, v)| *v).unwrap_or(0.0);
    assert_eq!((role_count("coordinator"), role_count("worker"), role_count("serve")), (1.0, 2.0, 1.0), "{by_role:?}");

    // Plausible values: a loss between 0 and a little over ln(vocabulary) (uniform guessing),
    // positive throughput, two workers training.
    let loss = query(&agent, &prometheus_url, r#"troupe_train_loss{component="coordinator"}"#);
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert!(loss[0].1 > 0.0 && loss[0].1 < (512f64).ln() + 1.0, "train loss {loss:?}");
    assert_eq!(loss[0].0["run"], "tiny");
    let tps = query(&agent, &prometheus_url, "troupe_tokens_per_second");
    assert!(tps.len() == 1 && tps[0].1 > 0.0, "tokens/s {tps:?}");
    let world = query(&agent, &prometheus_url, "troupe_world_size");
    assert!(world.len() == 1 && world[0].1 == 2.0, "world size {world:?}");
    let workers = query(&agent, &prometheus_url, "sum(troupe_workers)");
    assert!(workers.len() == 1 && workers[0].1 == 2.0, "workers {workers:?}");
    println!("Prometheus: train loss {:.3}, {:.0} tokens/s, 2 workers", loss[0].1, tps[0].1);

    // Every dashboard query returns data in Prometheus (rates need a few scrapes; the serving
    // panels need requests in the window, so a completion is sent every round).
    let mut pending: Vec<(String, String)> = queries.clone();
    let started = Instant::now();
    while !pending.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "dashboard queries without data after 120 s: {pending:#?}\nPrometheus log:\n{}",
            prometheus_tail()
        );
        complete(&agent);
        pending.retain(|(_, expr)| !query(&agent, &prometheus_url, &as_promql(expr)).iter().any(|(_, v)| v.is_finite()));
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("dashboard: all {} queries return data in Prometheus", queries.len());
    stop(&mut local);
    assert!(!targets_file.exists(), "the targets file is removed when the run ends");
}

/// Ctrl-C, as a user stops a run: it checkpoints and stops; killed if it takes too long.
fn stop(local: &mut KillOnDrop) {
    let _ = Command::new("kill").args(["-INT", &local.0.id().to_string()]).status();
    let started = Instant::now();
    while local.0.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(150), "troupe local did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}
