//! `troupe local` and `troupe coordinator`: start a coordinator (and, for `local`, worker
//! processes on loopback), run to the end, and report.

use crate::LocalArgs;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use troupe_common::metrics::{self, CoordinatorMetrics};
use troupe_common::status::SharedStatus;
use troupe_coordinator::{launch, run_coordinator, CoordinatorOptions, RunOutcome};
use troupe_core::config::Config;

/// Runs a coordinator to the end of the run. `on_listening` gets the bound address (workers
/// can be started from there).
pub(crate) async fn coordinate(
    config: Config,
    resume: bool,
    insecure: bool,
    on_listening: impl FnOnce(SocketAddr, SharedStatus),
) -> anyhow::Result<RunOutcome> {
    let mut config = config;
    let resume_from = prepare_run(&mut config, resume)?;
    coordinate_prepared(config, resume_from, insecure, on_listening).await
}

/// Prepares the data, finds the checkpoint to resume from (`resume`) or moves an earlier run
/// of the same name aside (a fresh run), and settles the weights to start from
/// (`model.init_from`).
fn prepare_run(config: &mut Config, resume: bool) -> anyhow::Result<Option<troupe_core::cluster::ResumeFrom>> {
    let meta = launch::ensure_data(config)?;
    let resume_from = if resume {
        launch::find_resume_point(config)?
    } else {
        launch::refuse_used_store(config)?;
        archive_previous_run(&config.run_dir())?;
        None
    };
    launch::resolve_init_from(config, &meta)?;
    Ok(resume_from)
}

/// As [`coordinate`], with the data prepared and the run folder settled by the caller.
async fn coordinate_prepared(
    config: Config,
    resume_from: Option<troupe_core::cluster::ResumeFrom>,
    insecure: bool,
    on_listening: impl FnOnce(SocketAddr, SharedStatus),
) -> anyhow::Result<RunOutcome> {
    let endpoint = launch::bind_endpoint(&config, insecure)?;
    let addr = endpoint.local_addr()?;
    let coordinator_metrics = CoordinatorMetrics::new();
    let status = SharedStatus::default();
    let mut metrics_addr = None;
    if !config.metrics.listen.is_empty() {
        let listen: SocketAddr = config.metrics.listen.parse().context("metrics.listen")?;
        let bound = metrics::serve(coordinator_metrics.registry.clone(), listen, Some(status.clone()))
            .await
            .with_context(|| format!("cannot serve metrics on {listen} (metrics.listen)"))?;
        troupe_common::say!("coordinator metrics on http://{bound}/metrics");
        troupe_common::say!("run status: troupe status --coordinator {bound}");
        metrics_addr = Some(bound);
    }
    on_listening(addr, status.clone());
    run_coordinator(CoordinatorOptions {
        config,
        endpoint,
        resume: resume_from,
        metrics: coordinator_metrics,
        show_progress: true,
        status,
        metrics_addr,
    })
    .await
}

/// A fresh run never mixes its files with an earlier run of the same name: the earlier one
/// is moved aside (nothing is deleted).
fn archive_previous_run(run_dir: &Path) -> anyhow::Result<()> {
    if !run_dir.exists() {
        return Ok(());
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut aside = run_dir.as_os_str().to_owned();
    aside.push(format!(".{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(run_dir, &aside).with_context(|| format!("cannot move the previous run {} aside", run_dir.display()))?;
    troupe_common::say!(
        "an earlier run was in {}; moved it to {} (use --resume to continue a run instead)",
        run_dir.display(),
        aside.display()
    );
    Ok(())
}

pub(crate) fn report_outcome(outcome: &RunOutcome) -> ExitCode {
    let s = &outcome.snapshot;
    if let Some(loss) = s.last_loss {
        troupe_common::say!("final train loss {loss:.4}");
    }
    if let Some(val) = s.last_val_loss {
        troupe_common::say!("final validation loss {val:.4}");
    }
    if let Some(ckpt) = &s.last_checkpoint {
        troupe_common::say!("last checkpoint: {ckpt}");
    }
    let failures = troupe_common::storage::request_failures_total();
    if failures > 0 {
        troupe_common::say!("object storage: {failures} requests failed and were retried (troupe_storage_request_failures_total)");
    }
    troupe_common::say!("run files: {} (events.jsonl, checkpoints/, logs/)", outcome.run_dir.display());
    match &outcome.error {
        Some(e) if !outcome.ok => {
            troupe_common::say_err!("error: the run failed: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

pub(crate) async fn run_local(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.run.load()?;
    if config.cluster.token.is_empty() {
        // Even on loopback, only the processes we start may join.
        config.cluster.token = random_token()?.into();
    }
    config.cluster.listen = "127.0.0.1:0".into();
    if config.tls.take().is_some() {
        // Every process of `troupe local` runs here on loopback and proves the random token
        // above; the spawned workers would need certificates of their own for [tls].
        troupe_common::say!("troupe local: ignoring [tls] (loopback only; the processes authenticate with a fresh join token)");
    }
    // One worker per GPU with --gpus; CPU workers otherwise (also on a machine with GPUs, so
    // the embedded default behaves the same everywhere).
    let devices: Vec<String> = match args.gpus {
        Some(gpus) => {
            let devices = gpus.devices(troupe_common::device::cuda_device_count())?;
            if args.run.workers.is_some_and(|n| n != devices.len()) {
                anyhow::bail!(
                    "--workers {} and --gpus ({} GPUs) disagree: --gpus starts one worker per GPU",
                    args.run.workers.unwrap_or(0),
                    devices.len()
                );
            }
            config.cluster.workers = devices.len();
            config.cluster.min_workers = config.cluster.min_workers.min(devices.len());
            config.validate().with_context(|| format!("with one worker per GPU ({} GPUs)", devices.len()))?;
            devices.into_iter().map(troupe_common::device::device_name).collect()
        }
        None => vec!["cpu".to_string(); config.cluster.workers],
    };
    let workers = config.cluster.workers;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if config.train.threads_per_worker > 0 { config.train.threads_per_worker } else { (cores / workers).max(1) };
    let logs = config.run_dir().join("logs");
    let token = config.cluster.token.clone();
    let exe = std::env::current_exe().context("cannot find the troupe executable to start workers")?;

    // While training, the cores belong to the workers: the Evaluator's samples and the
    // serving endpoint in this process use one thread.
    tch::set_num_threads(1);
    let resume_from = prepare_run(&mut config, args.run.resume)?;
    // The serving endpoint runs from the start: the Deployer tells it about every version it
    // publishes, and it answers the completion at the end.
    let api_key = crate::deploy::api_key(std::env::var("TROUPE_API_KEY").ok(), &config.serve.api_key);
    let admin_key = crate::deploy::api_key(std::env::var("TROUPE_ADMIN_KEY").ok(), &config.serve.admin_key);
    let serve_listen = config.serve.listen.parse().context("serve.listen")?;
    crate::deploy::check_listen_is_guarded(serve_listen, api_key.as_deref(), false).context("serve.listen")?;
    let server = troupe_serve::start(troupe_serve::ServeOptions {
        registry: config.registry_dir(),
        listen: serve_listen,
        model_name: config.run.name.clone(),
        api_key: api_key.clone(),
        admin_key,
        max_batch: config.serve.max_batch,
        max_tokens: config.serve.max_tokens,
        max_queue: config.serve.max_queue,
    })
    .await
    .context("cannot start the serving endpoint (serve.listen)")?;
    troupe_common::say!(
        "serving endpoint on {} (OpenAI-compatible /v1/completions; versions appear as checkpoints are promoted)",
        server.url()
    );
    config.deploy.notify.push(server.url());

    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let run = coordinate_prepared(config.clone(), resume_from, false, move |addr, status| {
        let _ = addr_tx.send((addr, status));
    });
    tokio::pin!(run);
    // Start the workers once the coordinator listens; watch them while it runs.
    let addr = tokio::select! {
        addr = addr_rx => addr.ok(),
        outcome = &mut run => {
            let outcome = outcome?;
            return Ok(report_outcome(&outcome));
        }
    };
    let Some((addr, status)) = addr else { anyhow::bail!("the coordinator did not start") };
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let on = if args.gpus.is_some() { format!("on {}", devices.join(", ")) } else { "on the CPU".to_string() };
    troupe_common::say!("starting {workers} worker processes {on} ({threads} threads each), logs in {}", logs.display());
    let eval_workers = usize::from(args.eval_worker);
    if args.eval_worker {
        troupe_common::say!("starting an eval worker (1 thread): checkpoints are evaluated off the training path");
    }
    let spawn: crate::supervise::Spawn = {
        let (exe, addr, devices, token) = (exe.clone(), addr.to_string(), devices.clone(), token.clone());
        Box::new(move |i, attempt, log_path| {
            // Appended to: a restarted worker's log follows its predecessor's.
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(attempt > 0)
                .truncate(attempt == 0)
                .open(log_path)
                .with_context(|| format!("cannot open {}", log_path.display()))?;
            if attempt > 0 {
                use std::io::Write;
                let _ = writeln!(log, "--- troupe local: restart {attempt} of worker {i} ---");
            }
            // Slots after the training workers' are the eval worker's.
            let eval = i >= devices.len();
            let (device, threads) = if eval { ("cpu", 1) } else { (devices[i].as_str(), threads) };
            let mut cmd = tokio::process::Command::new(&exe);
            // A worker outlives a killed `troupe local` only to find its coordinator gone:
            // it is told at once instead (the sweep driver restarts whole trials).
            // SAFETY: prctl in the child before exec, async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            cmd.args(["worker", "--join", &addr, "--threads", &threads.to_string(), "--device", device]);
            if eval {
                cmd.args(["--role", "eval"]);
            }
            cmd.env("TROUPE_TOKEN", token.expose())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                // Its own process group: a Ctrl-C in the terminal reaches only `troupe local`,
                // which then checkpoints and stops the workers in order.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start worker {i}"))
        })
    };
    let logs_dir = logs.clone();
    let starting = crate::supervise::Supervisor::start(
        workers,
        eval_workers,
        move |i| if i < workers { logs_dir.join(format!("worker-{i}.log")) } else { logs_dir.join("eval-worker.log") },
        args.max_restarts,
        config.cluster.min_workers,
        spawn,
        // The eval worker joins first, so that it measures every checkpoint from the first.
        async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while eval_workers > 0 && status.read().map(|s| s.eval_workers == 0).unwrap_or(true) {
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("the eval worker did not join within 60 s: see {}", logs.join("eval-worker.log").display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        },
    );
    // The coordinator runs on while the workers start (the eval worker's join is its doing).
    let mut workers_running = tokio::select! {
        started = starting => started?,
        outcome = &mut run => {
            let outcome = outcome?;
            return Ok(report_outcome(&outcome));
        }
    };
    let outcome = {
        let supervise = workers_running.supervise();
        tokio::pin!(supervise);
        tokio::select! {
            outcome = &mut run => outcome?,
            failure = &mut supervise => anyhow::bail!("{failure}"),
        }
    };
    // Workers exit on Stop; give them a moment, then make sure none is left behind.
    workers_running.stop(Duration::from_secs(10)).await;
    let restarts: u32 = workers_running.restarts().iter().sum();
    if restarts > 0 {
        troupe_common::say!("worker restarts during the run: {:?} (per worker)", workers_running.restarts());
    }
    let code = report_outcome(&outcome);
    if outcome.ok && args.sample_tokens > 0 {
        if config.deploy.enabled {
            let (url, model, prompt, key) = (server.url(), config.run.name.clone(), args.prompt.clone(), api_key.clone());
            let (tokens, seed) = (args.sample_tokens, config.run.seed);
            match tokio::task::spawn_blocking(move || complete_over_http(&url, &model, &prompt, tokens, seed, key.as_deref())).await? {
                Ok((version, text)) => troupe_common::say!(
                    "\ncompletion from {version} over HTTP (POST {}/v1/completions):\n----\n{}{text}\n----",
                    server.url(),
                    args.prompt
                ),
                Err(e) => troupe_common::say_err!("warning: the completion request failed: {e:#}"),
            }
        } else if let Some(ckpt) = &outcome.snapshot.last_checkpoint {
            // Nothing was published to serve: sample from the last checkpoint in this process.
            match generate(Path::new(ckpt), &args.prompt, args.sample_tokens, 0.8, 40, config.run.seed) {
                Ok(text) => troupe_common::say!("\nsample from the final checkpoint (deploy.enabled = false):\n----\n{text}\n----"),
                Err(e) => troupe_common::say_err!("warning: cannot generate a sample: {e:#}"),
            }
        }
    }
    let registry = config.registry_dir();
    troupe_common::say!("model registry: {} (troupe deploy status --registry {})", registry.display(), registry.display());
    if args.serve {
        troupe_common::say!("serving on {} until Ctrl-C", server.url());
        troupe_common::signals::shutdown_signal().await;
    } else {
        troupe_common::say!("serve it again with: troupe serve --registry {}", registry.display());
    }
    Ok(code)
}

/// Asks the serving endpoint for a completion, as any client would; returns the version
/// that answered and the text.
fn complete_over_http(
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    seed: u64,
    api_key: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let body =
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40, "seed": seed});
    let (status, text) = crate::http::call("POST", &format!("{url}/v1/completions"), Some(&body), api_key, Duration::from_secs(120))?;
    if status != 200 {
        anyhow::bail!("{url} answered {status}: {}", crate::http::error_message(&text));
    }
    let value: serde_json::Value = serde_json::from_str(&text).context("the completion is not JSON")?;
    let version = value["version"].as_str().unwrap_or("?").to_string();
    let completion = value["choices"][0]["text"].as_str().context("the completion has no choices[0].text")?.to_string();
    Ok((version, completion))
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("cannot read /dev/urandom for a join token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Generates text from a checkpoint folder.
pub(crate) fn generate(
    checkpoint: &Path,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
) -> anyhow::Result<String> {
    let (model, tokenizer) = troupe_common::model::load_for_inference(checkpoint, tch::Device::Cpu)?;
    let ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
    if ids.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let sampling = troupe_common::model::Sampling { temperature, top_k: (top_k > 0).then_some(top_k), top_p: 1.0 };
    let text = troupe_common::model::continuation(&model, &tokenizer, &ids, max_tokens, sampling, seed)?;
    Ok(format!("{prompt}{text}"))
}
