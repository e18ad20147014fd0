//! From checkpoint to service: evaluation-gated deployment, serving, hot swaps, canaries and
//! rollbacks — with real `troupe` processes, a real registry on disk, real HTTP clients
//! (ureq, and the official `openai` Python package).

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use troupe_common::registry::Registry;
use troupe_core::events::RunEvent;

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(20);

/// A `troupe serve` process and its URL.
struct ServeProcess {
    _process: KillOnDrop,
    url: String,
}

impl ServeProcess {
    fn start(registry: &Path, env: &[(&str, &str)], extra: &[&str]) -> ServeProcess {
        let mut cmd = troupe();
        cmd.arg("serve").arg("--registry").arg(registry).args(["--listen", "127.0.0.1:0", "--threads", "1"]).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (process, url) = start_server(cmd);
        ServeProcess { _process: process, url }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// POSTs JSON; the status and the parsed body (Null when it is not JSON).
fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let mut response = agent.post(url).header("Content-Type", "application/json").send(body.to_string()).expect("the server answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get_text(url: &str) -> String {
    agent().get(url).call().expect("GET").body_mut().read_to_string().expect("body")
}

fn complete(agent: &ureq::Agent, url: &str, seed: u64) -> (u16, Value) {
    post(agent, &format!("{url}/v1/completions"), &json!({"prompt": "ROMEO.", "max_tokens": 8, "temperature": 0.8, "seed": seed}))
}

/// A finished tiny run with checkpoints (each with its eval.json) every `interval` steps,
/// deployment off: the raw material for versions.
fn checkpoints(dir: &Path, steps: u64, interval: u64) -> Vec<PathBuf> {
    let data = prepare_small_corpus(dir);
    let config = tiny_config(dir, &data, 1, steps);
    let text = std::fs::read_to_string(&config).unwrap().replace("interval = 5\n", &format!("interval = {interval}\n"));
    std::fs::write(&config, format!("{text}\n[deploy]\nenabled = false\n")).unwrap();
    assert_success(&run_local(&config, &[]));
    let dir = dir.join("runs/tiny/checkpoints");
    let mut found: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("MANIFEST").is_file()).collect();
    found.sort();
    assert!(found.iter().all(|p| p.join("eval.json").is_file()), "the Evaluator wrote eval.json into every checkpoint");
    found
}

fn publish(registry: &Path, checkpoint: &Path, extra: &[&str]) {
    let mut cmd = troupe();
    cmd.args(["deploy", "publish", "--registry"]).arg(registry).arg("--checkpoint").arg(checkpoint).args(extra);
    assert_success(&run(cmd, Duration::from_secs(60)));
}

#[test]
fn troupe_local_publishes_only_checkpoints_that_beat_the_serving_one_and_answers_over_http() {
    let dir = scratch("serving-local");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 40);
    let min_improvement = 0.02;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[deploy]\nmin_improvement = {min_improvement}\n")).unwrap();
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&config).args(["--sample-tokens", "12", "--prompt", "ROMEO."]);
    let out = run(cmd, Duration::from_secs(300));
    assert_success(&out);
    let printed = stdout(&out);

    // Every checkpoint was evaluated, and each deploy decision followed the policy.
    let run_dir = dir.join("runs/tiny");
    let events = events(&run_dir);
    let evaluated: Vec<u64> =
        events.iter().filter_map(|e| if let RunEvent::Evaluated { step, .. } = e { Some(*step) } else { None }).collect();
    assert_eq!(evaluated, vec![5, 10, 15, 20, 25, 30, 35, 40], "{printed}");
    let loss_at = |s: u64| {
        events
            .iter()
            .find_map(|e| match e {
                RunEvent::Evaluated { step, val_loss, perplexity, samples, .. } if *step == s => {
                    assert!((perplexity - val_loss.exp()).abs() < 1e-6 * perplexity);
                    assert_eq!(samples.len(), 2, "one sample per configured prompt");
                    Some(*val_loss)
                }
                _ => None,
            })
            .unwrap()
    };
    let mut bar: Option<f64> = None;
    let mut published = Vec::new();
    for e in &events {
        if let RunEvent::Deployed { step, action, version, reason } = e {
            let loss = loss_at(*step);
            let beats = bar.is_none_or(|b| b - loss >= min_improvement && b - loss > 0.0);
            assert_eq!(action, if beats { "published" } else { "skipped" }, "step {step}: loss {loss} against {bar:?}: {reason}");
            if beats {
                bar = Some(loss);
                published.push((version.expect("a published version has a number"), *step, loss));
            }
        }
    }
    assert!(published.len() >= 2, "training improves the model more than once: {published:?}");
    assert!(
        events.iter().any(|e| matches!(e, RunEvent::Deployed { action, .. } if action == "skipped")),
        "some checkpoint did not beat its predecessor by {min_improvement}: {printed}"
    );

    // The registry holds exactly those versions, each intact, losses strictly falling.
    let registry = Registry::open(&run_dir.join("registry")).unwrap();
    let summaries = registry.summaries().unwrap();
    let in_registry: Vec<(u32, u64, f64)> =
        summaries.iter().map(|s| (s.version, s.source.as_ref().unwrap().step, s.val_loss.unwrap())).collect();
    assert_eq!(in_registry, published);
    for (v, _, _) in &published {
        registry.verify(*v).unwrap();
    }
    let newest = published.last().unwrap().0;
    assert_eq!(registry.state().unwrap().stable, Some(newest));

    // The run ended with a completion answered over HTTP by the newest version.
    assert!(printed.contains(&format!("completion from v{newest} over HTTP")), "{printed}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hot_swaps_under_load_fail_no_request_and_move_forward_in_order() {
    let dir = scratch("serving-swap");
    let ckpts = checkpoints(&dir, 15, 5);
    let registry = dir.join("registry");
    publish(&registry, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry, &[], &[]);
    let url = server.url.clone();

    // Clients send requests back to back and keep every answer's version, in order.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, seen, failures, url, answered) = (stop.clone(), seen.clone(), failures.clone(), url.clone(), answered.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut versions = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let (status, body) = complete(&agent, &url, c * 1000 + n);
                    match (status, body["version"].as_str()) {
                        (200, Some(v)) => {
                            versions.push(v.trim_start_matches('v').parse::<u32>().unwrap());
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => failures.lock().unwrap().push(format!("client {c}: {status} {body}")),
                    }
                }
                seen.lock().unwrap().push(versions);
            })
        })
        .collect();
    let serves = |v: u32| {
        let url = url.clone();
        move || get_text(&format!("{url}/readyz")).contains(&format!("\"v{v}\""))
    };
    // Each version answers a good number of requests before the next one comes.
    let answers_after = |n: usize| {
        let from = answered.load(Ordering::SeqCst);
        let answered = answered.clone();
        move || answered.load(Ordering::SeqCst) >= from + n
    };
    wait_until("requests flow", Duration::from_secs(30), POLL, answers_after(24));
    for (i, ckpt) in ckpts.iter().enumerate().skip(1) {
        publish(&registry, ckpt, &[]);
        let v = i as u32 + 1;
        wait_until(&format!("the server swaps to v{v}"), Duration::from_secs(30), POLL, serves(v));
        wait_until(&format!("v{v} answers"), Duration::from_secs(30), POLL, answers_after(24));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} failed requests during swaps: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let seen = seen.lock().unwrap();
    let total: usize = seen.iter().map(Vec::len).sum();
    for versions in seen.iter() {
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "a client saw versions go backwards: {versions:?}");
    }
    let mut all: Vec<u32> = seen.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, vec![1, 2, 3], "every version answered");
    let metrics = get_text(&format!("{}/metrics", server.url));
    assert!(metrics.contains("troupe_serve_swaps_total 3"), "{metrics}");
    eprintln!("{total} requests over 3 versions, none failed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_or_slow_canary_is_rolled_back_and_a_good_one_promoted() {
    let dir = scratch("serving-canary");
    let ckpts = checkpoints(&dir, 10, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    // Test-only hooks: every request v3 serves fails; v4 answers 300 ms late.
    let server =
        ServeProcess::start(&registry_dir, &[("TROUPE_FAULT_SERVE_FAIL_VERSION", "3"), ("TROUPE_FAULT_SERVE_DELAY_VERSION", "4:300")], &[]);
    let registry = Registry::open(&registry_dir).unwrap();
    let agent = agent();
    let mut seed = 0;
    // Drives traffic until the registry has a verdict on the canary.
    let mut drive_until_judged = |canary: u32| -> (String, String) {
        let started = Instant::now();
        loop {
            seed += 1;
            let (status, body) = complete(&agent, &server.url, seed);
            assert!(status == 200 || body["version"].is_null(), "only the faulty canary fails: {status} {body}");
            if let Some(t) = registry.history().unwrap().into_iter().rev().find(|t| t.version == Some(canary) && t.by == "serve") {
                return (t.action, t.reason);
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no verdict on v{canary}");
        }
    };
    let canary = ["--canary", "0.5", "--canary-requests", "20"];

    publish(&registry_dir, &ckpts[1], &canary);
    let (action, reason) = drive_until_judged(2);
    assert_eq!(action, "promote", "a good canary is promoted: {reason}");
    assert_eq!(registry.state().unwrap().stable, Some(2));

    publish(&registry_dir, &ckpts[1], &canary);
    let (action, reason) = drive_until_judged(3);
    assert_eq!(action, "rollback", "a failing canary is rolled back: {reason}");
    assert!(reason.contains("error rate 100.0%"), "{reason}");
    let state = registry.state().unwrap();
    assert_eq!((state.stable, state.canary.is_none()), (Some(2), true));

    publish(&registry_dir, &ckpts[1], &canary);
    let (action, reason) = drive_until_judged(4);
    assert_eq!(action, "rollback", "a slow canary is rolled back: {reason}");
    assert!(reason.contains("p95 latency"), "{reason}");
    assert_eq!(registry.state().unwrap().stable, Some(2));

    // After a rollback the stable version takes every request again.
    wait_until("the server follows the rollback", Duration::from_secs(10), POLL, || {
        get_text(&format!("{}/v1/models", server.url)).matches("tiny:v").count() == 1
    });
    for _ in 0..5 {
        seed += 1;
        let (status, body) = complete(&agent, &server.url, seed);
        assert_eq!((status, body["version"].as_str()), (200, Some("v2")));
    }
    let metrics = get_text(&format!("{}/metrics", server.url));
    assert!(metrics.contains("troupe_serve_canary_decisions_total{decision=\"promote\"} 1"), "{metrics}");
    assert!(metrics.contains("troupe_serve_canary_decisions_total{decision=\"rollback\"} 2"), "{metrics}");
    // The whole story is in the history, readable with `troupe deploy status`.
    let mut cmd = troupe();
    cmd.args(["deploy", "status", "--registry"]).arg(&registry_dir);
    let status = stdout(&run(cmd, Duration::from_secs(30)));
    assert!(status.contains("stable v2") && status.contains("canary failed: error rate"), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rollback_and_promote_through_a_running_server() {
    let dir = scratch("serving-admin");
    let ckpts = checkpoints(&dir, 10, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    publish(&registry_dir, &ckpts[1], &[]);
    let server = ServeProcess::start(&registry_dir, &[("TROUPE_API_KEY", "sesame")], &[]);
    let deploy = |args: &[&str]| {
        let mut cmd = troupe();
        cmd.args(["deploy"]).args(args).args(["--server", &server.url]).env("TROUPE_API_KEY", "sesame");
        run(cmd, Duration::from_secs(60))
    };
    let out = deploy(&["rollback"]);
    assert_success(&out);
    assert!(stdout(&out).contains("stable: v1"), "{}", stdout(&out));
    // The server answered only once it served v1.
    let agent = agent();
    let (status, body) = {
        let mut r = agent
            .post(format!("{}/v1/completions", server.url))
            .header("Authorization", "Bearer sesame")
            .send(json!({"prompt": "A", "max_tokens": 2}).to_string())
            .unwrap();
        (r.status().as_u16(), serde_json::from_str::<Value>(&r.body_mut().read_to_string().unwrap()).unwrap())
    };
    assert_eq!((status, body["version"].as_str()), (200, Some("v1")));
    assert_success(&deploy(&["promote", "--to", "v2"]));
    let out = deploy(&["status"]);
    assert!(stdout(&out).contains("this server serves: stable v2"), "{}", stdout(&out));
    let refused = deploy(&["promote", "--to", "v9"]);
    assert!(!refused.status.success() && stderr(&refused).contains("v9 is not a version"), "{}", stderr(&refused));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_get_openai_errors_are_counted_and_nothing_breaks() {
    let dir = scratch("serving-bad");
    let ckpts = checkpoints(&dir, 5, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry_dir, &[("TROUPE_API_KEY", "sesame")], &[]);
    let url = format!("{}/v1/completions", server.url);
    let agent = agent();
    let send = |body: &str, key: Option<&str>| {
        let mut req = agent.post(&url).header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut r = req.send(body.to_string()).unwrap();
        (r.status().as_u16(), serde_json::from_str::<Value>(&r.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null))
    };
    let long_prompt = json!({"prompt": "word ".repeat(200)}).to_string();
    for (body, key, status, code) in [
        (r#"{"prompt": "A"}"#, None, 401, "invalid_api_key"),
        (r#"{"prompt": "A"}"#, Some("wrong"), 401, "invalid_api_key"),
        ("{not json", Some("sesame"), 400, "invalid_json"),
        (r#"{"prompt": 7}"#, Some("sesame"), 400, "invalid_type"),
        (r#"{"prompt": "A", "max_tokens": "many"}"#, Some("sesame"), 400, "invalid_type"),
        (r#"{"prompt": "A", "max_tokens": 100000}"#, Some("sesame"), 400, "invalid_value"),
        (r#"{"prompt": "A", "temperature": -1}"#, Some("sesame"), 400, "invalid_value"),
        (r#"{"prompt": "A", "model": "gpt-4"}"#, Some("sesame"), 404, "model_not_found"),
        (r#"{"prompt": "A", "model": "tiny:v7"}"#, Some("sesame"), 404, "model_not_found"),
        (long_prompt.as_str(), Some("sesame"), 400, "context_length_exceeded"),
    ] {
        let (got, body) = send(body, key);
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    // The transport's own refusals have the same shape.
    let mut r = agent.get(&url).header("Authorization", "Bearer sesame").call().unwrap();
    let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!((r.status().as_u16(), body["error"]["code"].as_str()), (405, Some("method_not_allowed")), "{body}");
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(3 << 19));
    let (status, body) = send(&big, Some("sesame"));
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("request_too_large")), "{body}");
    // Garbage that is not HTTP at all, and a body cut short: the connection ends, the server lives.
    for garbage in [&b"\x00\x01\x02 not http\r\n\r\n"[..], &b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro"[..]] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
    let (status, body) = send(r#"{"prompt": "A", "max_tokens": 3, "model": "tiny"}"#, Some("sesame"));
    assert_eq!((status, body["usage"]["completion_tokens"].as_u64()), (200, Some(3)), "{body}");
    let metrics = get_text(&format!("{}/metrics", server.url));
    for (reason, n) in [
        ("invalid_api_key", 2),
        ("invalid_json", 1),
        ("invalid_type", 2),
        ("invalid_value", 2),
        ("model_not_found", 2),
        ("context_length_exceeded", 1),
        ("request_too_large", 1),
    ] {
        assert!(metrics.contains(&format!("troupe_serve_bad_requests_total{{reason=\"{reason}\"}} {n}")), "{reason}: {metrics}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_deployer_killed_mid_promotion_leaves_the_registry_consistent() {
    let dir = scratch("serving-deployer-crash");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 30);
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&config).args(["--sample-tokens", "4"]).env("TROUPE_FAULT_DEPLOYER_PANIC_AT_STEP", "10");
    let out = run(cmd, Duration::from_secs(300));
    assert_success(&out);
    let run_dir = dir.join("runs/tiny");
    let events = events(&run_dir);
    let deployed: Vec<(u64, String, Option<u32>)> = events
        .iter()
        .filter_map(
            |e| if let RunEvent::Deployed { step, action, version, .. } = e { Some((*step, action.clone(), *version)) } else { None },
        )
        .collect();
    assert_eq!(deployed[0], (5, "published".into(), Some(1)), "{deployed:?}");
    assert_eq!(deployed[1], (10, "failed".into(), None), "the promotion of step 10 died half-way: {deployed:?}");
    let reason = events.iter().find_map(|e| match e {
        RunEvent::Deployed { step: 10, reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(reason.as_deref().is_some_and(|r| r.contains("deployer crashed")), "{reason:?}");
    let later: Vec<u32> = deployed[2..].iter().filter_map(|(_, _, v)| *v).collect();
    assert!(!later.is_empty(), "a later promotion succeeded: {deployed:?}");
    assert_eq!(later[0], 2, "the half-made version took no number: {deployed:?}");

    let registry = Registry::open(&run_dir.join("registry")).unwrap();
    let versions = registry.versions().unwrap();
    assert_eq!(versions, (1..=versions.len() as u32).collect::<Vec<_>>());
    for v in &versions {
        registry.verify(*v).unwrap();
    }
    let leftovers: Vec<String> = std::fs::read_dir(registry.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the next publish removed the half-made folder: {leftovers:?}");
    assert!(registry.history().unwrap().iter().all(|t| t.version.is_some_and(|v| versions.contains(&v))));
    assert!(stdout(&out).contains(&format!("completion from v{} over HTTP", versions.last().unwrap())), "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the `openai` package is installed for this test (scripts/test.sh installs it there
/// first; the test installs it itself when run alone).
fn openai_python() -> Option<PathBuf> {
    python_package("python-openai", "openai", "openai==3.57.0")
}

/// The pinned Python package `spec`, installed once into the cache folder `dir` (scripts/test.sh
/// installs it before the suite; a test run alone installs it here): the folder to put on
/// PYTHONPATH, where `import {modules}` works; None where it cannot be installed.
fn python_package(dir: &str, modules: &str, spec: &str) -> Option<PathBuf> {
    let target = troupe_cache().join(dir);
    let importable = |t: &Path| {
        Command::new("python3").env("PYTHONPATH", t).args(["-c", &format!("import {modules}")]).status().is_ok_and(|s| s.success())
    };
    if importable(&target) {
        return Some(target);
    }
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts", "--target"])
        .arg(&target)
        .arg(spec)
        .status();
    (installed.is_ok_and(|s| s.success()) && importable(&target)).then_some(target)
}

#[test]
fn the_official_openai_python_client_completes_streaming_and_not() {
    let Some(pythonpath) = openai_python() else {
        skip_or_fail("the `openai` Python package cannot be installed here (no python3/pip or no PyPI; scripts/test.sh installs it)");
        return;
    };
    let dir = scratch("serving-openai");
    let ckpts = checkpoints(&dir, 5, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry_dir, &[("TROUPE_API_KEY", "sesame")], &[]);
    let script = root().join("tests/python/openai_client.py");
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &pythonpath).arg(&script).args([&server.url, "sesame", "tiny"]);
    let out = run(cmd, Duration::from_secs(120));
    assert_success(&out);
    let seen: Value = serde_json::from_str(stdout(&out).trim()).expect("the script prints JSON");
    assert_eq!(seen["model"], "tiny");
    assert_eq!(seen["fingerprint"], "v1", "the version that answered");
    assert_eq!(seen["finish_reason"], "length");
    assert_eq!(seen["completion_tokens"], 12);
    assert!(seen["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(seen["stream_text"], seen["text"], "greedy decoding streams the same text");
    assert!(seen["stream_chunks"].as_u64().unwrap() >= 2, "{seen}");
    assert_eq!(seen["stream_finish_reason"], "length");
    assert_eq!(seen["stream_usage"], 12, "stream_options.include_usage adds a usage chunk");
    assert_eq!(seen["models"], json!(["tiny", "tiny:v1"]));
    // Chat, with the default template (the tiny model was not tuned on chat data).
    assert_eq!((seen["chat_object"].as_str(), seen["chat_role"].as_str()), (Some("chat.completion"), Some("assistant")), "{seen}");
    assert!(seen["chat_tokens"].as_u64().is_some_and(|n| (1..=10).contains(&n)), "{seen}");
    assert_eq!(seen["chat_stream_text"], seen["chat_text"], "greedy chat streams the same text");
    // echo + logprobs: the prompt back, each token scored but the first.
    assert_eq!(seen["echo_text"], "ROMEO. What", "{seen}");
    let lps = seen["echo_token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null() && lps[1..].iter().all(|v| v.as_f64().is_some_and(|x| x <= 0.0)), "{seen}");
    assert_eq!(seen["echo_tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), "ROMEO. What");
    assert_eq!(seen["echo_top"].as_array().unwrap()[1], 1, "{seen}");
    // n = 3: three choices, each with its tokens scored.
    assert_eq!(seen["n_indices"], json!([0, 1, 2]));
    let counts: u64 = seen["n_logprob_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(Some(counts), seen["n_completion_tokens"].as_u64(), "a score per generated token: {seen}");
    for refusal in ["wrong_key", "unknown_model", "too_many_tokens"] {
        assert!(seen[refusal].as_str().is_some_and(|r| r.starts_with("refused")), "{refusal}: {seen}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A thousand clients that open a connection, send half a request and go quiet (slowloris):
/// `/healthz` and a completion still answer within 2 s, and the quiet connections are closed
/// at the server's header timeout (10 s) instead of being held forever.
#[test]
fn slow_clients_neither_take_the_server_down_nor_stay_connected() {
    use std::io::{Read, Write};
    let dir = scratch("serving-slow-clients");
    let ckpts = checkpoints(&dir, 5, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry_dir, &[], &[]);
    troupe_common::http_server::raise_open_files_limit();
    let addr = server.url.trim_start_matches("http://").to_string();
    let slow: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").expect("half a request");
            s
        })
        .collect();
    let t = Instant::now();
    assert_eq!(get_text(&format!("{}/healthz", server.url)), "ok\n");
    let (status, body) = complete(&agent(), &server.url, 1);
    let answered = t.elapsed();
    assert_eq!(status, 200, "{body}");
    println!("/healthz and a completion answered in {answered:?} with 1000 slow clients connected");
    assert!(answered < Duration::from_secs(2), "{answered:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    for mut s in slow {
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a slow client was still connected after {:?}: {e}", t.elapsed()),
        }
    }
    println!("every slow client was closed within {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin API has its own key: with one set, the completions key no longer opens it. A
/// server on a non-loopback address without an API key is refused unless `--insecure`.
#[test]
fn the_admin_api_takes_its_own_key_and_an_open_listen_address_needs_one() {
    let dir = scratch("serving-admin-key");
    let ckpts = checkpoints(&dir, 5, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry_dir, &[("TROUPE_API_KEY", "sesame"), ("TROUPE_ADMIN_KEY", "root-key")], &[]);
    let status_with = |env: &[(&str, &str)]| {
        let mut cmd = troupe();
        cmd.args(["deploy", "status", "--server", &server.url]).env_remove("TROUPE_API_KEY").env_remove("TROUPE_ADMIN_KEY");
        cmd.envs(env.iter().copied());
        run(cmd, Duration::from_secs(60))
    };
    let refused = status_with(&[("TROUPE_API_KEY", "sesame")]);
    assert!(!refused.status.success() && stderr(&refused).contains("admin key"), "{}", stderr(&refused));
    let admitted = status_with(&[("TROUPE_ADMIN_KEY", "root-key")]);
    assert_success(&admitted);
    assert!(stdout(&admitted).contains("this server serves: stable v1"), "{}", stdout(&admitted));
    // Completions still take the API key (and only it).
    let agent = agent();
    let call = |key: &str| {
        agent
            .post(format!("{}/v1/completions", server.url))
            .header("Authorization", &format!("Bearer {key}"))
            .send(json!({"prompt": "A", "max_tokens": 2}).to_string())
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!((call("sesame"), call("root-key")), (200, 401));

    // 0.0.0.0 without a key: refused, saying how to fix it; with --insecure it serves.
    let mut open = troupe();
    open.args(["serve", "--registry"]).arg(&registry_dir).args(["--listen", "0.0.0.0:0"]).env_remove("TROUPE_API_KEY");
    let out = run(open, Duration::from_secs(60));
    assert!(
        !out.status.success() && stderr(&out).contains("without an API key") && stderr(&out).contains("--insecure"),
        "{}",
        stderr(&out)
    );
    let mut insecure = troupe();
    insecure.args(["serve", "--registry"]).arg(&registry_dir).args(["--listen", "0.0.0.0:0", "--insecure", "--threads", "1"]);
    let mut insecure = KillOnDrop(insecure.env_remove("TROUPE_API_KEY").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let first = std::io::BufRead::lines(std::io::BufReader::new(insecure.0.stdout.take().unwrap())).next().unwrap().unwrap();
    assert!(first.starts_with("serving model") && first.contains("http://0.0.0.0:"), "{first}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log-probabilities the server returns for a prompt (`echo`, `max_tokens` 0, `logprobs`)
/// equal troupe's own forward pass over the same tokens (log-softmax in libtorch) within 1e-4;
/// `/tokenize` and `/detokenize` agree with each other and with the prompt; `n` completions
/// with one seed differ from each other and are the same when asked again.
#[test]
fn log_probabilities_match_the_forward_pass_and_tokenize_round_trips() {
    let dir = scratch("serving-logprobs");
    let ckpts = checkpoints(&dir, 5, 5);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let server = ServeProcess::start(&registry_dir, &[], &[]);
    let agent = agent();
    let text = "ROMEO. But soft, what light";
    let (status, tokens) = post(&agent, &format!("{}/tokenize", server.url), &json!({"prompt": text}));
    assert_eq!(status, 200, "{tokens}");
    let ids: Vec<i64> = tokens["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(tokens["count"].as_u64(), Some(ids.len() as u64));
    let (status, back) = post(&agent, &format!("{}/detokenize", server.url), &json!({"tokens": ids}));
    assert_eq!((status, back["prompt"].as_str()), (200, Some(text)), "{back}");
    let (status, bad) = post(&agent, &format!("{}/detokenize", server.url), &json!({"tokens": [1_000_000]}));
    assert_eq!(status, 400, "{bad}");

    let (status, scored) =
        post(&agent, &format!("{}/v1/completions", server.url), &json!({"prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 3}));
    assert_eq!(status, 200, "{scored}");
    let choice = &scored["choices"][0];
    assert_eq!(choice["text"].as_str(), Some(text), "token ids echo as their text");
    let served: Vec<Option<f64>> = choice["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64()).collect();
    assert_eq!(served.len(), ids.len());
    assert!(served[0].is_none(), "nothing precedes the first token");

    // troupe's own forward pass over the same tokens.
    let version = registry_dir.join("v1");
    let (model, _) = troupe_common::model::load_for_inference(&version, tch::Device::Cpu).unwrap();
    let _guard = tch::no_grad_guard();
    let idx = tch::Tensor::from_slice(&ids).view([1, ids.len() as i64]);
    let logp = model.forward(&idx, false).log_softmax(-1, tch::Kind::Double).squeeze_dim(0);
    let mut worst = 0f64;
    for pos in 1..ids.len() {
        let want = logp.double_value(&[pos as i64 - 1, ids[pos]]);
        let got = served[pos].unwrap();
        worst = worst.max((want - got).abs());
    }
    println!("largest difference between served and forward-pass log-probabilities: {worst:e}");
    assert!(worst < 1e-4, "{worst}");
    let tops = &choice["logprobs"]["top_logprobs"];
    assert!(tops[0].is_null() && tops[1].as_object().is_some_and(|m| !m.is_empty() && m.len() <= 3), "{tops}");

    let body = json!({"prompt": "ROMEO.", "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 3});
    let (_, first) = post(&agent, &format!("{}/v1/completions", server.url), &body);
    let (_, again) = post(&agent, &format!("{}/v1/completions", server.url), &body);
    let texts = |v: &Value| v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(texts(&first).len(), 3);
    assert_eq!(texts(&first), texts(&again), "the same seed gives the same n completions");
    assert!(texts(&first).iter().collect::<std::collections::BTreeSet<_>>().len() > 1, "{first}");
}

/// lm-evaluation-harness runs its `local-completions` model against `troupe serve` on the
/// repository's tasks (`evals/lm_eval`: the next line of the held-out split, as multiple choice
/// and generated, items from `troupe tasks build`) and reports the accuracy that troupe computes
/// for the same items itself (`troupe tasks score`, in process): the same figures, and item by
/// item the same log-likelihoods (within 1e-4) and the same generated text.
#[test]
fn lm_evaluation_harness_scores_the_served_model_as_troupe_does() {
    let Some(pythonpath) = python_package("python-lm-eval", "lm_eval, tenacity, datasets", "lm-eval[api]==0.4.13") else {
        skip_or_fail("lm-evaluation-harness cannot be installed here (no python3/pip or no PyPI; scripts/test.sh installs it)");
        return;
    };
    let dir = scratch("serving-lm-eval");
    let ckpts = checkpoints(&dir, 150, 150);
    let registry_dir = dir.join("registry");
    publish(&registry_dir, &ckpts[0], &[]);
    let work = dir.join("lm-eval");
    std::fs::create_dir_all(&work).unwrap();
    let items = work.join("items.jsonl");
    let mut cmd = troupe();
    // The tiny model's block is 32 tokens; the harness adds one.
    cmd.args(["tasks", "build", "--count", "30", "--max-tokens", "31", "--data"]).arg(dir.join("data")).arg("--out").arg(&items);
    assert_success(&run(cmd, Duration::from_secs(60)));
    let mut cmd = troupe();
    // 6 new tokens: the harness keeps the prompt within 31 - 6 tokens (it cuts longer ones from
    // the left), and every item's context and first word fit in that.
    cmd.args(["tasks", "score", "--max-gen-tokens", "6", "--checkpoint"]).arg(registry_dir.join("v1")).arg("--items").arg(&items);
    let out = run(cmd, Duration::from_secs(120));
    assert_success(&out);
    let ours: Value = serde_json::from_str(&stdout(&out)).expect("tasks score prints JSON");
    let n = ours["items"].as_array().unwrap().len();
    assert!(n >= 10, "only {n} items fit the tiny model's block");

    let server = ServeProcess::start(&registry_dir, &[], &[]);
    let mut cmd = Command::new("python3");
    cmd.current_dir(&work)
        .env("PYTHONPATH", &pythonpath)
        .env("HF_HOME", work.join("hf-home"))
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "lm_eval", "run", "--include_path"])
        .arg(root().join("evals/lm_eval"))
        .args(["--tasks", "troupe_next_line", "troupe_next_line_gen", "--model", "local-completions", "--model_args"])
        .arg(format!("base_url={}/v1/completions", server.url))
        .args(["model=tiny", "tokenizer_backend=remote", "max_length=32", "--gen_kwargs", "max_gen_toks=6"])
        .args(["--output_path", "out", "--log_samples"]);
    let out = run(cmd, Duration::from_secs(300));
    assert_success(&out);
    let results_dir = work.join("out/tiny");
    let file = |prefix: &str| -> PathBuf {
        std::fs::read_dir(&results_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {}", results_dir.display()))
    };
    let results: Value = serde_json::from_str(&std::fs::read_to_string(file("results_")).unwrap()).unwrap();
    let (acc, exact) =
        (&results["results"]["troupe_next_line"]["acc,none"], &results["results"]["troupe_next_line_gen"]["exact_match,none"]);
    println!(
        "{n} items: lm-evaluation-harness acc {acc}, exact_match {exact}; troupe {} and {}",
        ours["next_line_acc"], ours["next_line_gen_exact_match"]
    );
    assert_eq!(acc.as_f64(), ours["next_line_acc"].as_f64(), "multiple-choice accuracy");
    assert_eq!(exact.as_f64(), ours["next_line_gen_exact_match"].as_f64(), "generation exact match");

    let samples = |prefix: &str| -> Vec<Value> {
        std::fs::read_to_string(file(prefix)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let choice_samples = samples("samples_troupe_next_line_2");
    assert_eq!(choice_samples.len(), n);
    for s in &choice_samples {
        let item = &ours["items"][s["doc_id"].as_u64().unwrap() as usize];
        for (k, resp) in s["filtered_resps"].as_array().unwrap().iter().enumerate() {
            let theirs: f64 = resp[0].as_str().unwrap().parse().unwrap();
            let mine = item["loglikelihoods"][k].as_f64().unwrap();
            assert!((theirs - mine).abs() < 1e-4, "item {}: candidate {k}: {theirs} vs {mine}", s["doc_id"]);
        }
    }
    let generated = samples("samples_troupe_next_line_gen_");
    assert_eq!(generated.len(), n);
    let mut non_empty = 0;
    for s in &generated {
        let item = &ours["items"][s["doc_id"].as_u64().unwrap() as usize];
        assert_eq!(s["filtered_resps"][0], item["generated"], "item {}: the generated text", s["doc_id"]);
        non_empty += usize::from(!item["generated"].as_str().unwrap().is_empty());
    }
    println!("{non_empty} of {n} generated texts are not empty");
    assert!(non_empty * 3 >= n, "the model generated text for only {non_empty} of {n} items");
}
