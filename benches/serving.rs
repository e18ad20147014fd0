//! Completion serving throughput (run: `cargo bench --bench serving`):
//!
//! - **server**: `troupe_serve` in this process (max_batch 32, 2 intra-op threads) serving a
//!   freshly trained default model (4 layers, 128 wide, 128 context, vocab 2048); C client
//!   threads (C = 1, 8, 32), each with its own HTTP connection, send non-streaming
//!   completions back to back ("ROMEO.", max_tokens 64, temperature 0.8, top_k 40, a distinct
//!   seed each) for a fixed window after a warm-up.
//! - **engine** (a diagnosis): the server's own engine fed directly, without HTTP, at C = 1
//!   and 32; it splits the server's cost into HTTP/tokio and the engine loop.
//! - **bound**: the same weights generating in this process without the server: (a)
//!   `Gpt::generate` of 64 tokens, one sequence at a time; (b) an ideal batch-32 generator,
//!   32 sequences stepped in lockstep through `Gpt::next_token_logits` with the same sampling,
//!   and the same at batch 1 (the engine's own forward pass at C = 1: unlike
//!   `Gpt::generate`, it computes the output head for the last position only).
//!
//! The engine and bound rows run for half the window: they are steady loops with no arrival
//! process to average over, and the whole bench must stay within about 3 minutes.
//!
//! Tokens/s counts the tokens generated inside the window; a completion that straddles an
//! edge of it counts in proportion to its time inside (at C = 32 a completion takes seconds,
//! so counting whole completions would swing the result by a full batch). Latencies are those
//! of the completions that ended inside the window, as the client sees them.
//!
//! Reported: server / in-process ratios at C=1 and C=32 (against the server's own engine fed
//! directly — KV cache and batching, no HTTP — and against plain uncached generation), and the batching gain (server
//! tokens/s at C=32 over C=1). Target: gain ≥ 4×. `TROUPE_BENCH_SECONDS` sets the window per
//! row (default 20). The model is trained for a few steps by `troupe local` first (its
//! quality does not matter here, only its shape), then published into a fresh registry.
//! Writes target/bench/serving.md and .csv.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use troupe_common::model::{load_for_inference, Gpt, Rng, Sampling};
use troupe_common::registry::{Registry, Rollout};
use troupe_serve::engine::{Engine, GenEvent, Generation};

const LEVELS: [usize; 3] = [1, 8, 32];
const PROMPT: &str = "ROMEO.";
const MAX_TOKENS: usize = 64;
const TEMPERATURE: f64 = 0.8;
const TOP_K: usize = 40;
/// The engine's batch limit, and the batch of the in-process bound.
const MAX_BATCH: usize = 32;
const TRAIN_STEPS: &str = "10";

// The table's rows.
const SERVER: &str = "server (HTTP)";
const ENGINE: &str = "server's engine, no HTTP";
const SEQUENTIAL: &str = "in-process Gpt::generate";
const LOCKSTEP: &str = "in-process next_token_logits, lockstep";

/// One measured configuration: a table row and a CSV line.
struct Row {
    mode: &'static str,
    concurrency: usize,
    seconds: f64,
    /// Completions (and tokens) generated inside the window, edges prorated.
    completions: f64,
    tokens: f64,
    errors: usize,
    /// Seconds per completion that ended inside the window (per batch, for the lockstep bound).
    latencies: Vec<f64>,
    /// Mean sequences per forward pass.
    mean_batch: Option<f64>,
}

impl Row {
    fn tokens_per_s(&self) -> f64 {
        self.tokens / self.seconds
    }

    fn completions_per_s(&self) -> f64 {
        self.completions / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut v = self.latencies.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        // Nearest rank: the smallest value with at least p of the samples at or below it.
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
}

/// Trains the default model shape for a few steps with `troupe local` and returns the newest
/// checkpoint folder.
fn train(out: &Path) -> anyhow::Result<PathBuf> {
    let log = out.join("train.log");
    let log_file = std::fs::File::create(&log)?;
    // One worker: two training processes would only fight over the cores. No sample at the
    // end: the bench measures generation itself.
    let status = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["local", "--workers", "1", "--steps", TRAIN_STEPS, "--sample-tokens", "0", "--out"])
        .arg(out)
        .env("TROUPE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()?;
    let checkpoints = out.join("shakespeare/checkpoints");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&checkpoints)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join(troupe_common::checkpoint::MANIFEST).is_file()).collect())
        .unwrap_or_default();
    found.sort();
    match found.pop() {
        // Only the checkpoint matters here: `troupe local` may still report a failure after
        // the run has finished and checkpointed (its own business, not this bench's).
        Some(dir) => {
            if !status.success() {
                println!("note: troupe local exited with {status} after writing {} (see {})", dir.display(), log.display());
            }
            Ok(dir)
        }
        None => anyhow::bail!("troupe local ({status}) wrote no checkpoint under {}; see {}", checkpoints.display(), log.display()),
    }
}

fn sampling() -> Sampling {
    Sampling { temperature: TEMPERATURE, top_k: Some(TOP_K), top_p: 1.0 }
}

/// One completion over HTTP: its completion tokens, or the error.
fn complete_http(agent: &ureq::Agent, url: &str, seed: u64) -> Result<usize, String> {
    let body = serde_json::json!({
        "model": "shakespeare",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "top_k": TOP_K,
        "seed": seed,
        "stream": false,
    })
    .to_string();
    let mut response = agent.post(url).header("Content-Type", "application/json").send(body).map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {text}"));
    }
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    let tokens = value["usage"]["completion_tokens"].as_u64().ok_or_else(|| format!("no usage.completion_tokens in {text}"))?;
    Ok(tokens as usize)
}

/// One completion handed straight to the server's engine (no HTTP, JSON or tokio task): what
/// is left of the server's cost is the engine loop itself.
fn complete_engine(engine: &Engine, prompt: &[i64], seed: u64) -> Result<usize, String> {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let generation = Generation {
        prompt: prompt.to_vec(),
        max_tokens: MAX_TOKENS,
        sampling: sampling(),
        seed,
        stop: Vec::new(),
        logprobs: None,
        score_prompt: false,
        events,
    };
    engine.submit(generation).map_err(|e| e.to_string())?;
    while let Some(event) = rx.blocking_recv() {
        match event {
            GenEvent::Text(_) | GenEvent::Prompt(_) | GenEvent::Token(_) => {}
            GenEvent::Done { completion_tokens, .. } => return Ok(completion_tokens),
            GenEvent::Failed(e) => return Err(e),
        }
    }
    Err("the engine stopped mid-generation".into())
}

/// What one client saw: each completion's start, end and outcome.
type ClientLog = Vec<(Instant, Instant, Result<usize, String>)>;

/// `clients` threads run completions back to back (`make` builds each thread's caller, so a
/// client can hold its own connection; its argument is a distinct seed) from the start of the
/// warm-up until the first completion that ends after the window.
fn load<F, G>(mode: &'static str, server: &troupe_serve::Server, clients: usize, warmup: Duration, window: Duration, make: G) -> Row
where
    G: Fn() -> F,
    F: FnMut(u64) -> Result<usize, String> + Send + 'static,
{
    // +1: the main thread takes the start time once every client is ready to send.
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (mut one, barrier) = (make(), barrier.clone());
            std::thread::spawn(move || -> ClientLog {
                barrier.wait();
                let stop = Instant::now() + warmup + window;
                let mut log = Vec::new();
                for i in 0u64.. {
                    let began = Instant::now();
                    let result = one((clients as u64) << 40 | (c as u64) << 20 | i);
                    let ended = Instant::now();
                    log.push((began, ended, result));
                    if ended >= stop {
                        break;
                    }
                }
                log
            })
        })
        .collect();
    barrier.wait();
    let from = Instant::now() + warmup;
    let to = from + window;
    // The engine's batch-size histogram around the window gives the mean batch this load
    // produced.
    let batches = &server.metrics.batch_size;
    std::thread::sleep(warmup);
    let (sum0, count0) = (batches.get_sample_sum(), batches.get_sample_count());
    std::thread::sleep(window);
    let (sum1, count1) = (batches.get_sample_sum(), batches.get_sample_count());

    let mut row = Row {
        mode,
        concurrency: clients,
        seconds: window.as_secs_f64(),
        completions: 0.0,
        tokens: 0.0,
        errors: 0,
        latencies: Vec::new(),
        mean_batch: (count1 > count0).then(|| (sum1 - sum0) / (count1 - count0) as f64),
    };
    let mut first_error = None;
    for handle in handles {
        for (began, ended, result) in handle.join().expect("client thread") {
            let took = ended.duration_since(began).as_secs_f64();
            let inside = ended.min(to).saturating_duration_since(began.max(from)).as_secs_f64();
            let share = if took > 0.0 { inside / took } else { 0.0 };
            let ended_inside = ended >= from && ended <= to;
            match result {
                Ok(tokens) => {
                    // Tokens come at a steady pace through a completion (one per decoding
                    // step; the wait for a place in the batch is at most a step here).
                    row.tokens += tokens as f64 * share;
                    row.completions += share;
                    if ended_inside {
                        row.latencies.push(took);
                    }
                }
                Err(e) if ended_inside => {
                    row.errors += 1;
                    first_error.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{mode}, {clients} at once: {} errors, the first: {e}", row.errors);
    }
    row
}

/// (a) The bound at concurrency 1: `Gpt::generate`, one 64-token completion after another.
fn bound_sequential(model: &Gpt, prompt: &[i64], window: Duration) -> anyhow::Result<Row> {
    model.generate(prompt, MAX_TOKENS, TEMPERATURE, Some(TOP_K), 0)?; // warm-up
    let mut row = Row {
        mode: SEQUENTIAL,
        concurrency: 1,
        seconds: 0.0,
        completions: 0.0,
        tokens: 0.0,
        errors: 0,
        latencies: Vec::new(),
        mean_batch: Some(1.0),
    };
    let start = Instant::now();
    for seed in 1u64.. {
        let t = Instant::now();
        row.tokens += model.generate(prompt, MAX_TOKENS, TEMPERATURE, Some(TOP_K), seed)?.len() as f64;
        row.latencies.push(t.elapsed().as_secs_f64());
        row.completions += 1.0;
        if start.elapsed() >= window {
            break;
        }
    }
    // Whole completions only, so the window is the time they took.
    row.seconds = start.elapsed().as_secs_f64();
    Ok(row)
}

/// (b) An ideal batch generator: `size` sequences in lockstep, one `next_token_logits` pass
/// per step, each sequence sampled with its own stream as the engine does. No HTTP, no
/// detokenizing, no padding (the contexts always have the same length), no early stops.
fn bound_lockstep(model: &Gpt, prompt: &[i64], size: usize, window: Duration) -> anyhow::Result<Row> {
    let sampling = sampling();
    let batch = |seed: u64| -> anyhow::Result<usize> {
        let mut contexts: Vec<Vec<i64>> = vec![prompt.to_vec(); size];
        let mut rngs: Vec<Rng> = (0..size as u64).map(|i| Rng::new(seed * size as u64 + i)).collect();
        for _ in 0..MAX_TOKENS {
            let views: Vec<&[i64]> = contexts.iter().map(Vec::as_slice).collect();
            let rows = model.next_token_logits(&views)?;
            for ((context, rng), row) in contexts.iter_mut().zip(&mut rngs).zip(rows) {
                context.push(sampling.pick(&row, rng) as i64);
            }
        }
        Ok(size * MAX_TOKENS)
    };
    batch(0)?; // warm-up
    let mut row = Row {
        mode: LOCKSTEP,
        concurrency: size,
        seconds: 0.0,
        completions: 0.0,
        tokens: 0.0,
        errors: 0,
        latencies: Vec::new(),
        mean_batch: Some(size as f64),
    };
    let start = Instant::now();
    for seed in 1u64.. {
        let t = Instant::now();
        row.tokens += batch(seed)? as f64;
        // Every sequence of the batch completes when the batch does.
        row.latencies.push(t.elapsed().as_secs_f64());
        row.completions += size as f64;
        if start.elapsed() >= window {
            break;
        }
    }
    row.seconds = start.elapsed().as_secs_f64();
    Ok(row)
}

fn report(row: &Row) {
    println!(
        "{}, {} at once: {:.0} tokens/s, {:.2} completions/s, {} errors, mean batch {:.1}",
        row.mode,
        row.concurrency,
        row.tokens_per_s(),
        row.completions_per_s(),
        row.errors,
        row.mean_batch.unwrap_or(f64::NAN)
    );
}

/// The 1-minute load average: on a 2-core machine anything else running shows in the numbers.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("TROUPE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).filter(|s: &f64| *s > 0.0).unwrap_or(20.0);
    let window = Duration::from_secs_f64(seconds);
    // Long enough for the first completions to finish, so that the window sees the steady
    // state (arrivals staggered as the load makes them), not the synchronized start.
    let warmup = Duration::from_secs_f64((seconds / 5.0).clamp(0.5, 2.0));

    let out = PathBuf::from("target/bench/serving-run");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let t = Instant::now();
    let checkpoint = train(&out)?;
    println!("trained {} steps in {:.1} s: {}", TRAIN_STEPS, t.elapsed().as_secs_f64(), checkpoint.display());
    let registry = Registry::create(&out.join("registry"))?;
    let version = registry.publish(&checkpoint, None, "shakespeare", &Rollout::Direct, "bench", || {})?;
    let version_dir = registry.version_dir(version);

    // The server's engine and the bound compute with the same 2 intra-op threads.
    tch::set_num_threads(2);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = runtime.block_on(troupe_serve::start(troupe_serve::ServeOptions {
        admin_key: None,
        registry: registry.dir().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        model_name: "shakespeare".into(),
        api_key: None,
        max_batch: MAX_BATCH,
        max_tokens: 512,
        max_queue: 4096,
    }))?;
    anyhow::ensure!(
        server.deployment.live().stable.is_some(),
        "the server does not serve the published version: {:?}",
        server.deployment.load_error()
    );

    let load_before = load_average();
    let mut rows = Vec::new();
    let url = format!("{}/v1/completions", server.url());
    for clients in LEVELS {
        let row = load(SERVER, &server, clients, warmup, window, || {
            // A connection of its own (keep-alive): one client's requests never wait for
            // another's.
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(300))).build().into();
            let url = url.clone();
            move |seed| complete_http(&agent, &url, seed)
        });
        report(&row);
        anyhow::ensure!(row.tokens > 0.0, "no completion succeeded with {clients} clients");
        rows.push(row);
    }
    // Where the server's time goes: the same engine without HTTP, at both ends (a diagnosis,
    // not what the targets are about).
    let (engine, _) = server.deployment.route(None).expect("a stable version serves");
    let prompt: Vec<i64> = engine.tokenizer().encode(PROMPT)?.into_iter().map(i64::from).collect();
    for clients in [1, MAX_BATCH] {
        let row = load(ENGINE, &server, clients, warmup, window / 2, || {
            let (engine, prompt) = (engine.clone(), prompt.clone());
            move |seed| complete_engine(&engine, &prompt, seed)
        });
        report(&row);
        rows.push(row);
    }
    drop(engine);
    // The server's threads stay, idle, while the bound runs.
    let (model, _) = load_for_inference(&version_dir, tch::Device::Cpu)?;
    let half = window / 2;
    for row in [
        bound_sequential(&model, &prompt, half)?,
        bound_lockstep(&model, &prompt, 1, half)?,
        bound_lockstep(&model, &prompt, MAX_BATCH, half)?,
    ] {
        report(&row);
        rows.push(row);
    }

    let tps = |mode: &str, c: usize| rows.iter().find(|r| r.mode == mode && r.concurrency == c).map(Row::tokens_per_s).unwrap_or(f64::NAN);
    let (server1, server32) = (tps(SERVER, 1), tps(SERVER, MAX_BATCH));
    let (engine1, engine32) = (tps(ENGINE, 1), tps(ENGINE, MAX_BATCH));
    let (generate1, bound1, bound32) = (tps(SEQUENTIAL, 1), tps(LOCKSTEP, 1), tps(LOCKSTEP, MAX_BATCH));
    let gain = server32 / server1;
    let mut table = format!(
        "Completions of {PROMPT:?}: max_tokens {MAX_TOKENS}, temperature {TEMPERATURE}, top_k {TOP_K}; {seconds:.0} s per server row, \
         {:.0} s per engine and in-process row, after a {:.1} s warm-up; 2 intra-op threads; load average {load_before} before, {} after \
         (other work on the machine skews the numbers).\n\n\
         | mode | concurrency | completions | tokens/s | completions/s | p50 latency | p95 latency | mean batch |\n\
         |---|---|---|---|---|---|---|---|\n",
        seconds / 2.0,
        warmup.as_secs_f64(),
        load_average()
    );
    let mut csv =
        String::from("mode,concurrency,seconds,completions,errors,tokens,tokens_per_s,completions_per_s,p50_s,p95_s,mean_batch\n");
    for r in &rows {
        let batch = r.mean_batch.map_or("–".into(), |b| format!("{b:.1}"));
        let errors = if r.errors > 0 { format!(" ({} errors)", r.errors) } else { String::new() };
        // No completion ended inside a short window: no latency to show.
        let latency = |p: f64| if r.latencies.is_empty() { "–".to_string() } else { format!("{:.3} s", r.percentile(p)) };
        table.push_str(&format!(
            "| {} | {} | {:.0}{errors} | {:.0} | {:.2} | {} | {} | {batch} |\n",
            r.mode,
            r.concurrency,
            r.completions,
            r.tokens_per_s(),
            r.completions_per_s(),
            latency(0.5),
            latency(0.95)
        ));
        csv.push_str(&format!(
            "{},{},{:.3},{:.2},{},{:.1},{:.2},{:.3},{:.4},{:.4},{}\n",
            r.mode,
            r.concurrency,
            r.seconds,
            r.completions,
            r.errors,
            r.tokens,
            r.tokens_per_s(),
            r.completions_per_s(),
            r.percentile(0.5),
            r.percentile(0.95),
            r.mean_batch.map_or(String::new(), |b| format!("{b:.2}"))
        ));
    }
    table.push_str(&format!(
        "\nserver / the same engine in-process without HTTP (the bound): {:.2} at concurrency 1, {:.2} at {MAX_BATCH}\n\
         server / in-process without a KV cache: {:.2} at concurrency 1 (vs Gpt::generate; {:.2} vs lockstep batch 1), {:.2} at concurrency {MAX_BATCH} (vs lockstep batch {MAX_BATCH})\n\
         batching gain (server tokens/s at {MAX_BATCH} clients / at 1): {gain:.2}× (target ≥ 4×: {}); in-process lockstep {MAX_BATCH} / 1: {:.2}×\n",
        server1 / engine1,
        server32 / engine32,
        server1 / generate1,
        server1 / bound1,
        server32 / bound32,
        if gain >= 4.0 { "met" } else { "NOT met" },
        bound32 / bound1
    ));
    println!("\n{table}");
    std::fs::write("target/bench/serving.md", &table)?;
    std::fs::write("target/bench/serving.csv", csv)?;
    Ok(())
}
