//! Authentication is mutual in token mode: a real `troupe worker` process against a fake
//! coordinator on its coordinator's address. One that cannot prove the join token (it has a
//! valid TLS certificate, as anyone can make) is refused before the worker acts on anything it
//! says; one that can is still not obeyed when it names folders outside the run folder.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use troupe_common::net::{self, NetOptions};
use troupe_core::proto::{Assignment, ToCoordinator, ToWorker};

const TOKEN: &str = "the-real-cluster-join-token";

/// An order for the worker, and which of its answers to wait for before the next one.
type Order = (ToWorker, fn(&ToCoordinator) -> bool);

/// Answers one worker's connection on `endpoint`: reads its Hello, proves `proof_token` (as an
/// impostor would, with a token of its own guessing), then sends `orders` one by one, each
/// after reading frames until the worker sends what `wait_for` accepts (or the connection
/// ends). Returns every frame the worker sent.
async fn fake_coordinator(endpoint: quinn::Endpoint, proof_token: &str, orders: Vec<Order>) -> Vec<ToCoordinator> {
    let conn = endpoint.accept().await.expect("a worker connects").await.expect("TLS handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("the control stream");
    let mut seen = Vec::new();
    let hello = net::read_frame::<ToCoordinator>(&mut recv, net::MAX_CONTROL_FRAME).await.unwrap().expect("a Hello");
    seen.push(hello);
    let proof = net::join_proof(&conn, proof_token).unwrap();
    net::write_frame(&mut send, &ToWorker::Authenticated { proof }).await.unwrap();
    for (order, wait_for) in orders {
        if net::write_frame(&mut send, &order).await.is_err() {
            break;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(60), net::read_frame::<ToCoordinator>(&mut recv, net::MAX_CONTROL_FRAME)).await {
                Ok(Ok(Some(msg))) => {
                    let done = wait_for(&msg);
                    seen.push(msg);
                    if done {
                        break;
                    }
                }
                _ => return seen,
            }
        }
    }
    seen
}

fn welcome() -> ToWorker {
    ToWorker::Welcome { worker_id: 1, heartbeat_ms: 1000, lease_ms: 60_000, rejoin_ms: 0 }
}

fn assignment(config: &Path, run_dir: &Path, resume_from: Option<&str>) -> ToWorker {
    ToWorker::Assign(Assignment {
        rank: 0,
        world_size: 1,
        generation: 1,
        ring: None,
        nccl: None,
        config_toml: std::fs::read_to_string(config).unwrap(),
        run_dir: run_dir.display().to_string(),
        resume_from: resume_from.map(str::to_string),
        start_step: 0,
    })
}

/// `troupe worker` joining `addr` with the real token; its exit status and stderr.
fn worker(addr: std::net::SocketAddr) -> std::thread::JoinHandle<std::process::Output> {
    let mut cmd = worker_command(&addr.to_string());
    cmd.env("TROUPE_TOKEN", TOKEN);
    std::thread::spawn(move || run(cmd, Duration::from_secs(120)))
}

fn fake_endpoint(rt: &tokio::runtime::Runtime) -> (quinn::Endpoint, std::net::SocketAddr) {
    let endpoint = rt.block_on(async { net::make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions::default()).unwrap() });
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

#[test]
fn a_coordinator_that_cannot_prove_the_token_is_refused_before_anything_is_acted_on() {
    let dir = scratch("auth-impostor");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 4);
    let run_dir = dir.join("impostor-run");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, addr) = fake_endpoint(&rt);
    let worker = worker(addr);
    // It guesses a token, then orders what a real coordinator would.
    let checkpoint = run_dir.join("checkpoints/step-000000.g1.tmp");
    let orders: Vec<Order> = vec![
        (welcome(), |_| true),
        (assignment(&config, &run_dir, None), |_| true),
        (ToWorker::Checkpoint { step: 0, dir: checkpoint.display().to_string() }, |_| true),
    ];
    let seen = rt.block_on(fake_coordinator(endpoint, "a-guess-at-the-join-token", orders));
    let out = worker.join().unwrap();
    assert!(!out.status.success(), "the worker must refuse the impostor");
    let err = stderr(&out);
    assert!(err.contains("did not prove the join token") && err.contains(&addr.to_string()), "{err}");
    assert_eq!(seen.len(), 1, "the worker said nothing after its Hello: {seen:?}");
    assert!(!run_dir.exists(), "nothing was written for the impostor");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn folders_outside_the_run_folder_are_refused_even_from_the_real_coordinator() {
    let dir = scratch("auth-paths");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 4);
    let run_dir = dir.join("runs/tiny");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Resuming from a folder elsewhere: the assignment is refused, and the worker says why.
    let (endpoint, addr) = fake_endpoint(&rt);
    let worker_process = worker(addr);
    let orders: Vec<Order> =
        vec![(welcome(), |_| true), (assignment(&config, &run_dir, Some("/etc")), |m| matches!(m, ToCoordinator::Failed { .. }))];
    let seen = rt.block_on(fake_coordinator(endpoint, TOKEN, orders));
    let out = worker_process.join().unwrap();
    assert!(!out.status.success());
    let failed = seen.iter().find_map(|m| if let ToCoordinator::Failed { error } = m { Some(error.clone()) } else { None });
    let failed = failed.unwrap_or_else(|| panic!("no Failed report: {seen:?}\n{}", stderr(&out)));
    assert!(failed.contains("refused to resume from /etc") && failed.contains("not inside the run folder"), "{failed}");

    // A checkpoint folder elsewhere: refused and reported; nothing is created there; the
    // worker goes on and stops when told.
    let elsewhere: PathBuf = dir.join("elsewhere/step-000000");
    let (endpoint, addr) = fake_endpoint(&rt);
    let worker_process = worker(addr);
    let orders: Vec<Order> = vec![
        (welcome(), |_| true),
        (assignment(&config, &run_dir, None), |m| matches!(m, ToCoordinator::Ready { .. })),
        (ToWorker::Checkpoint { step: 0, dir: elsewhere.display().to_string() }, |m| matches!(m, ToCoordinator::CheckpointFailed { .. })),
        (ToWorker::Stop { reason: "test over".into() }, |_| false),
    ];
    let seen = rt.block_on(fake_coordinator(endpoint, TOKEN, orders));
    let out = worker_process.join().unwrap();
    let refusal = seen.iter().find_map(|m| if let ToCoordinator::CheckpointFailed { error, .. } = m { Some(error.clone()) } else { None });
    let refusal = refusal.unwrap_or_else(|| panic!("no CheckpointFailed: {seen:?}\n{}", stderr(&out)));
    assert!(refusal.contains("not inside the run folder"), "{refusal}");
    assert!(!elsewhere.exists() && !dir.join("elsewhere").exists(), "nothing was written outside the run folder");
    assert!(out.status.success(), "the worker stopped when told: {}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Peak resident memory of a process so far (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// 300 connections that finish TLS and then never say Hello, and 20 that send garbage, while
/// two workers train: the run goes on to its end, every one of them is closed (and counted in
/// the coordinator's log), and the coordinator's memory stays bounded (printed).
#[test]
fn connections_that_never_authenticate_are_closed_and_training_goes_on() {
    let dir = scratch("auth-flood");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 100_000);
    let coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr;
    let pid = coordinator.process.0.id();
    let workers = spawn_workers(&addr.to_string(), 2);
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 10, Duration::from_secs(120));
    let before = peak_rss_mib(pid);
    let flood_from = step_losses(&run_dir).len() as u64;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async move {
        let endpoint = net::make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions::default()).unwrap();
        // Garbage first, so that its connections get through the handshake limit.
        let mut garbage = Vec::new();
        for i in 0..20u8 {
            let conn = endpoint.connect(addr, net::TLS_SERVER_NAME).unwrap().await.expect("a handshake slot");
            garbage.push(tokio::spawn(async move {
                if let Ok((mut send, _recv)) = conn.open_bi().await {
                    let _ = send.write_all(&[0xff, 0xff, 0x0f, 0x00, i, i, i, i]).await;
                }
                tokio::time::timeout(Duration::from_secs(60), conn.closed()).await.is_ok()
            }));
        }
        let mut quiet = Vec::new();
        for _ in 0..300 {
            if let Ok(connecting) = endpoint.connect(addr, net::TLS_SERVER_NAME) {
                quiet.push(tokio::spawn(async move {
                    match connecting.await {
                        // Connected, then silent: the coordinator must close it.
                        Ok(conn) => tokio::time::timeout(Duration::from_secs(60), conn.closed()).await.is_ok(),
                        // Refused while too many handshakes are in progress.
                        Err(_) => true,
                    }
                }));
            }
        }
        let mut closed = 0;
        for task in garbage.into_iter().chain(quiet) {
            closed += task.await.unwrap() as usize;
        }
        closed
    });
    let during = peak_rss_mib(pid);
    let flood_to = step_losses(&run_dir).len() as u64;
    println!("coordinator peak RSS: {before} MiB before, {during} MiB after 320 unauthenticated connections");
    // Training speed under the flood, against the steps before it (a figure, not a timed
    // assertion: tests run side by side on shared cores).
    let tokens_per_sec = |from: u64, to: u64| {
        let rates: Vec<f64> = events(&run_dir)
            .iter()
            .filter_map(|e| match e {
                troupe_core::events::RunEvent::Step { step, tokens_per_sec, .. } if (from..to).contains(step) => Some(*tokens_per_sec),
                _ => None,
            })
            .collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    };
    // The same number of steps after the flood, undisturbed, is the reference.
    let after_to = flood_to + (flood_to - flood_from);
    wait_for_steps(&run_dir, after_to as usize, Duration::from_secs(120));
    let (flooded, undisturbed) = (tokens_per_sec(flood_from, flood_to), tokens_per_sec(flood_to, after_to));
    println!(
        "tokens/s: {flooded:.0} during the flood (steps {flood_from}..{flood_to}), {undisturbed:.0} after it (steps {flood_to}..{after_to}): {:.0} %",
        100.0 * flooded / undisturbed.max(1.0)
    );
    assert_eq!(closed, 320, "every unauthenticated connection was closed or refused");

    let still_training = !events(&run_dir).iter().any(|e| matches!(e, troupe_core::events::RunEvent::Finished { .. }));
    assert!(still_training, "the run ended during the flood: make it longer");
    // Measured: stop the run (a stop on request is a clean finish).
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    for mut w in workers {
        assert!(w.0.wait().unwrap().success());
    }
    let (status, log) = coordinator.wait();
    assert!(status.success(), "{log}");
    let refused = log.matches("refused a connection").count();
    println!("the coordinator logged {refused} refused connections");
    assert!(refused >= 20, "{log}");
    assert!(during < before + 200, "coordinator memory grew from {before} to {during} MiB");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// After a run with a join token and API keys, none of them appears in the run folder (events,
/// logs, checkpoints, registry), in the output, in `/status` or in `/metrics`; the run folder
/// is readable by its owner only.
#[test]
fn secrets_appear_in_no_file_log_or_endpoint_and_the_run_folder_is_private() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let (token, api_key, admin_key) =
        ("join-token-that-must-stay-secret", "api-key-that-must-stay-secret", "admin-key-that-must-stay-secret");
    let dir = scratch("auth-secrets");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 40);
    let text = std::fs::read_to_string(&config).unwrap().replace("token = \"\"", &format!("token = \"{token}\""));
    std::fs::write(&config, format!("{text}\n[serve]\napi_key = \"{api_key}\"\nadmin_key = \"{admin_key}\"\n")).unwrap();
    let mut local = troupe();
    local.arg("local").arg("--config").arg(&config).args(["--sample-tokens", "8"]);
    let mut child = KillOnDrop(local.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    let stderr_pipe = child.0.stderr.take().unwrap();
    let stderr_text = std::thread::spawn(move || std::io::read_to_string(stderr_pipe).unwrap_or_default());
    let mut stdout_lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut output = String::new();
    let metrics_url = loop {
        let line = stdout_lines.next().expect("troupe local prints its metrics address").unwrap();
        output.push_str(&line);
        output.push('\n');
        if let Some(rest) = line.strip_prefix("coordinator metrics on ") {
            break rest.trim().trim_end_matches("/metrics").to_string();
        }
    };
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    for path in ["/status", "/metrics"] {
        let body = agent.get(format!("{metrics_url}{path}")).call().unwrap().body_mut().read_to_string().unwrap();
        output.push_str(&body);
    }
    for line in stdout_lines {
        output.push_str(&line.unwrap_or_default());
        output.push('\n');
    }
    assert!(child.0.wait().unwrap().success(), "{output}");
    output.push_str(&stderr_text.join().unwrap());
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the run folder is private");
    let files = files_under(&run_dir);
    assert!(files.iter().any(|f| f.ends_with("events.jsonl")) && files.len() > 5, "{files:?}");
    for secret in [token, api_key, admin_key] {
        assert!(!output.contains(secret), "a secret in the output, /status or /metrics");
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "a secret in {}", file.display());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `troupe coordinator --token-file F` makes a strong token in F (0600) when F does not exist;
/// a worker given the file joins, and a token file others may read is refused with the fix.
#[test]
fn the_coordinator_makes_a_private_token_file_that_workers_join_with() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("auth-token-file");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 6);
    let token_file = dir.join("secrets/join.token");
    let coordinator = CoordinatorProcess::start(&config, &["--token-file", token_file.to_str().unwrap()]);
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is private");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim().len(), 64, "32 random bytes in hex");

    // A copy others may read is refused before anything is sent.
    let shared = dir.join("shared.token");
    std::fs::write(&shared, &token).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = run(
        {
            let mut cmd = worker_command(&coordinator.addr.to_string());
            cmd.arg("--token-file").arg(&shared);
            cmd
        },
        Duration::from_secs(60),
    );
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains(&format!("chmod 600 {}", shared.display())), "{}", stderr(&refused));

    let mut worker = worker_command(&coordinator.addr.to_string());
    worker.arg("--token-file").arg(&token_file);
    let worker = run(worker, Duration::from_secs(120));
    assert_success(&worker);
    let (status, output) = coordinator.wait();
    assert!(status.success(), "{output}");
    assert!(output.contains("made a new join token in") && !output.contains(token.trim()), "{output}");
    // Started again, it reads the same token instead of making another.
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), token);
}
