//! Peak resident memory per worker under `ddp`, `zero1`, `zero2` and `zero3` (run:
//! `cargo bench --bench memory`).
//!
//! `troupe local` (real processes) trains a GPT of ≥ 50 M parameters (8 layers, n_embd 768,
//! 12 heads, block 256, the prepared data's vocabulary) with 3 workers for a few steps with
//! small batches, once per strategy. While it runs, this process finds the worker processes
//! (children of `troupe local` whose command line is `troupe worker …`) and reads VmHWM and
//! VmRSS from /proc/<pid>/status every 100 ms. Reported per strategy: what the workers say
//! they hold between steps (their "worker holds … MiB" line, the same figures as
//! `troupe_memory_bytes{kind}`), VmHWM once the state is built (before the run's `started`
//! event), the lowest VmRSS between steps, the peak while training (VmHWM at the last poll
//! before the last step's event: it includes each step's transient buffers) and the peak of
//! the whole run (VmHWM at the end: adds the final evaluation and checkpoint's host copy), max
//! (and for the peaks mean) over workers. Every poll goes to
//! target/bench/memory/<strategy>/rss.csv.
//!
//! Target (the issue sets none; this is the claim the strategies make): each strategy's peak
//! RSS during training (max over workers) is below the previous one's (ddp > zero1 > zero2 >
//! zero3), by at least half of what the workers' own figures say it saves.
//!
//! Env: TROUPE_BENCH_MEM_WORKERS (default 3), TROUPE_BENCH_STEPS (default 4),
//! TROUPE_BENCH_STRATEGIES (default "ddp,zero1,zero2,zero3"). Output: a table on stdout and
//! target/bench/memory.{md,csv}.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use troupe_core::config::Config;
use troupe_core::shard::Strategy;

const MIB: f64 = (1u64 << 20) as f64;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

/// A field of /proc/<pid>/status in kB (VmHWM, VmRSS).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Processes whose parent is `parent` and whose command line is `… worker …`.
fn worker_pids(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid …: comm may hold spaces and parentheses, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == b"worker") {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

#[derive(Default, Clone, Copy)]
struct Peaks {
    /// VmHWM at the last poll (kB).
    hwm: u64,
    /// VmHWM at the last poll before the last step's event (kB).
    train_hwm: u64,
    /// VmHWM at the last poll before the run's `started` event (kB): the model and the
    /// training state built, no step yet.
    built_hwm: u64,
    /// Lowest VmRSS polled while training, after the first step (kB): what stays resident
    /// between steps (glibc keeps freed heap memory for reuse, see common/src/alloc.rs).
    floor_rss: Option<u64>,
}

/// What a worker says it holds between steps (MiB): params, grads, optim.
fn holds(log: &str) -> Option<[f64; 3]> {
    let rest = log.split("worker holds ").nth(1)?.lines().next()?;
    let nums: Vec<f64> = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (nums.len() == 3).then(|| [nums[0], nums[1], nums[2]])
}

struct StrategyRun {
    strategy: Strategy,
    /// Per worker: (pid, peaks).
    peaks: Vec<(u32, Peaks)>,
    /// The workers' own figures (from their logs), in MiB.
    holds: Vec<[f64; 3]>,
    wall_seconds: f64,
    median_step_seconds: f64,
}

impl StrategyRun {
    fn max_mean(&self, f: impl Fn(&Peaks) -> u64) -> (f64, f64) {
        let v: Vec<f64> = self.peaks.iter().map(|(_, p)| f(p) as f64 / 1024.0).collect();
        let max = v.iter().copied().fold(0.0, f64::max);
        (max, v.iter().sum::<f64>() / v.len().max(1) as f64)
    }
    /// The workers' own figures: the largest, summed over the kinds (MiB).
    fn held(&self) -> [f64; 3] {
        let mut out = [0.0; 3];
        for h in &self.holds {
            for k in 0..3 {
                out[k] = f64::max(out[k], h[k]);
            }
        }
        out
    }
}

fn run(strategy: Strategy, base: &Config, out: &Path) -> Result<StrategyRun> {
    let mut config = base.clone();
    config.parallel.strategy = strategy;
    config.run.out_dir = out.join(strategy.name());
    let _ = fs::remove_dir_all(&config.run.out_dir);
    fs::create_dir_all(&config.run.out_dir)?;
    let config_path = out.join(format!("{}.toml", strategy.name()));
    fs::write(&config_path, config.to_toml())?;
    let run_dir = config.run_dir();
    let events_path = run_dir.join("events.jsonl");
    let log_path = config.run.out_dir.join("troupe-local.log");
    let log = File::create(&log_path)?;
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["local", "--sample-tokens", "0", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start troupe local")?;
    let parent = child.id();
    let mut peaks: BTreeMap<u32, Peaks> = BTreeMap::new();
    // Every poll, for whoever wants to see where the peak happens (not in the report).
    let mut timeline = String::from("seconds,pid,steps_done,rss_mib,hwm_mib\n");
    let steps = config.train.steps as usize;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(480) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("troupe local ({strategy}) ran for more than 8 minutes; killed (see {})", log_path.display());
        }
        // Read the step count first: a VmHWM read after it still belongs to a poll where the
        // last step had not been reported.
        let events = fs::read_to_string(&events_path).unwrap_or_default();
        let steps_done = events.matches("\"event\":\"step\"").count();
        let started_yet = events.contains("\"event\":\"started\"");
        for pid in worker_pids(parent) {
            if let (Some(hwm), Some(rss)) = (status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")) {
                let p = peaks.entry(pid).or_default();
                p.hwm = p.hwm.max(hwm);
                if steps_done < steps {
                    p.train_hwm = p.train_hwm.max(hwm);
                }
                if !started_yet {
                    p.built_hwm = p.built_hwm.max(hwm);
                }
                if steps_done >= 1 && steps_done < steps {
                    p.floor_rss = Some(p.floor_rss.map_or(rss, |f| f.min(rss)));
                }
                timeline.push_str(&format!(
                    "{:.2},{pid},{steps_done},{:.1},{:.1}\n",
                    started.elapsed().as_secs_f64(),
                    rss as f64 / 1024.0,
                    hwm as f64 / 1024.0
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    fs::write(config.run.out_dir.join("rss.csv"), &timeline)?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("troupe local ({strategy}) failed ({status}); the end of {}:\n{}", log_path.display(), tail.join("\n"));
    }
    ensure!(
        peaks.len() == config.cluster.workers,
        "found {} worker processes of troupe local (pid {parent}), expected {}",
        peaks.len(),
        config.cluster.workers
    );
    let mut step_seconds = Vec::new();
    for e in troupe_core::events::read_events(&run_dir)? {
        if let troupe_core::events::RunEvent::Step { step, step_seconds: s, .. } = e {
            if step >= 1 {
                step_seconds.push(s);
            }
        }
    }
    step_seconds.sort_by(|a, b| a.total_cmp(b));
    let mut held = Vec::new();
    for i in 0..config.cluster.workers {
        let text = fs::read_to_string(run_dir.join("logs").join(format!("worker-{i}.log"))).unwrap_or_default();
        if let Some(h) = holds(&text) {
            held.push(h);
        }
    }
    // The final checkpoint (hundreds of MB) is not needed.
    let _ = fs::remove_dir_all(troupe_common::checkpoint::checkpoints_dir(&run_dir));
    let _ = fs::remove_dir_all(config.registry_dir());
    Ok(StrategyRun {
        strategy,
        peaks: peaks.into_iter().collect(),
        holds: held,
        wall_seconds,
        median_step_seconds: step_seconds.get(step_seconds.len() / 2).copied().unwrap_or(f64::NAN),
    })
}

fn main() -> Result<()> {
    let started = Instant::now();
    let workers = env_num("TROUPE_BENCH_MEM_WORKERS", 3).max(1) as usize;
    let steps = env_num("TROUPE_BENCH_STEPS", 4).max(2);
    let strategies: Vec<Strategy> = std::env::var("TROUPE_BENCH_STRATEGIES")
        .unwrap_or_else(|_| "ddp,zero1,zero2,zero3".into())
        .split(',')
        .map(|s| Strategy::parse(s.trim()).with_context(|| format!("unknown strategy {s:?} in TROUPE_BENCH_STRATEGIES")))
        .collect::<Result<_>>()?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let bench_dir = Path::new(&target).join("bench");
    let out = bench_dir.join("memory");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;

    let mut base = Config::default_config();
    base.run.name = "memory".into();
    if base.data.dir.is_relative() {
        base.data.dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&base.data.dir);
    }
    let meta = troupe_coordinator::launch::ensure_data(&base)?;
    base.model.n_layer = 8;
    base.model.n_embd = 768;
    base.model.n_head = 12;
    base.model.block_size = 256;
    base.train.steps = steps;
    base.train.warmup_steps = base.train.warmup_steps.min(steps);
    base.train.micro_batch = 1;
    base.train.global_batch = workers;
    base.eval.interval = 0;
    base.eval.sequences = 1;
    base.eval.prompts.clear();
    base.eval.sample_tokens = 0;
    base.checkpoint.interval = 0;
    base.checkpoint.keep_last = 1;
    base.deploy.enabled = false;
    base.cluster.workers = workers;
    // Big steps on shared cores: give the slow ranks room.
    base.cluster.lease_ms = 60_000;
    base.cluster.collective_timeout_ms = 600_000;
    base.validate()?;
    let params = troupe_common::model::Gpt::new(
        &troupe_common::model::GptConfig::from_model_config(&base.model, meta.vocab_size),
        tch::Device::Cpu,
        0,
    )?
    .num_params();
    ensure!(params >= 50_000_000, "the model has {params} parameters, fewer than 50 M");
    let mem_total = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok()))
        })
        .unwrap_or(0);
    eprintln!(
        "memory bench: {params} parameters ({:.0} MiB of float32), {workers} workers, {steps} steps, {:.1} GiB available …",
        params as f64 * 4.0 / MIB,
        mem_total as f64 / 1048576.0
    );

    let mut runs = Vec::new();
    for &strategy in &strategies {
        eprintln!("memory bench: {strategy} …");
        let r = run(strategy, &base, &out)?;
        let (m, _) = r.max_mean(|p| p.train_hwm);
        eprintln!("memory bench: {strategy}: peak RSS while training {m:.0} MiB (max over workers), {:.0} s", r.wall_seconds);
        runs.push(r);
    }

    let mut md = format!(
        "Resident memory per worker by strategy: a {params}-parameter GPT (8 layers, n_embd 768, 12 heads, block 256, vocab {}), \
         `troupe local` with {workers} worker processes ({} intra-op thread(s) each), global batch {} × 256 tokens, micro-batch 1, \
         {steps} steps, then the evaluation and checkpoint at the end. Held: what each worker reports it keeps between steps \
         (`troupe_memory_bytes{{kind}}`, largest over workers). Peak RSS: VmHWM of each worker process (/proc, polled every 100 ms); \
         *built*: at the last poll before the run's `started` event (model and training state built, no step yet); \
         *between steps*: the lowest VmRSS polled from the end of step 0 to the last step (what stays resident: the held \
         state, the process, and freed heap memory glibc keeps for reuse); \
         *training*: VmHWM at the last poll before the last step's event (includes each step's transient buffers); *run*: at the end (adds the final evaluation and the \
         checkpoint's host copy). Every poll is in target/bench/memory/<strategy>/rss.csv.\n\n\
         | strategy | params MiB | grads MiB | optim MiB | held total MiB | peak RSS built, max (MiB) | RSS between steps, max (MiB) | peak RSS training, max (MiB) | mean (MiB) | peak RSS run, max (MiB) | mean (MiB) | median step (s) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        meta.vocab_size,
        ((std::thread::available_parallelism().map_or(1, |n| n.get())) / workers).max(1),
        base.train.global_batch
    );
    // The target: each step down the list lowers the training peak by at least half of what
    // the workers' own figures say it saves.
    let mut verdicts = vec![String::new()];
    let mut lines = String::new();
    let mut all_ok = true;
    for pair in runs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let expected = a.held().iter().sum::<f64>() - b.held().iter().sum::<f64>();
        let measured = a.max_mean(|p| p.train_hwm).0 - b.max_mean(|p| p.train_hwm).0;
        let ok = expected > 0.0 && measured >= 0.5 * expected;
        all_ok &= ok;
        verdicts.push(if ok { "met" } else { "missed" }.to_string());
        lines.push_str(&format!(
            "- {} → {}: peak RSS while training {:+.0} MiB (max over workers); held state {:+.0} MiB: {}\n",
            a.strategy,
            b.strategy,
            -measured,
            -expected,
            if ok { "met" } else { "missed" }
        ));
    }
    let mut csv = String::from(
        "strategy,workers,params,params_mib,grads_mib,optim_mib,held_mib,built_peak_rss_max_mib,between_steps_rss_max_mib,train_peak_rss_max_mib,train_peak_rss_mean_mib,run_peak_rss_max_mib,run_peak_rss_mean_mib,median_step_seconds,verdict_vs_previous,per_worker_train_peak_mib\n",
    );
    for (r, verdict) in runs.iter().zip(&verdicts) {
        let h = r.held();
        let (tmax, tmean) = r.max_mean(|p| p.train_hwm);
        let (rmax, rmean) = r.max_mean(|p| p.hwm);
        let (bmax, _) = r.max_mean(|p| p.built_hwm);
        let (fmax, _) = r.max_mean(|p| p.floor_rss.unwrap_or(0));
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {bmax:.0} | {fmax:.0} | {tmax:.0} | {tmean:.0} | {rmax:.0} | {rmean:.0} | {:.2} |\n",
            r.strategy,
            h[0],
            h[1],
            h[2],
            h.iter().sum::<f64>(),
            r.median_step_seconds
        ));
        let per_worker: Vec<String> = r.peaks.iter().map(|(_, p)| format!("{:.0}", p.train_hwm as f64 / 1024.0)).collect();
        csv.push_str(&format!(
            "{},{workers},{params},{:.1},{:.1},{:.1},{:.1},{bmax:.1},{fmax:.1},{tmax:.1},{tmean:.1},{rmax:.1},{rmean:.1},{:.3},{verdict},{}\n",
            r.strategy,
            h[0],
            h[1],
            h[2],
            h.iter().sum::<f64>(),
            r.median_step_seconds,
            per_worker.join(";")
        ));
    }
    md.push('\n');
    md.push_str(&lines);
    if runs.len() >= 2 {
        md.push_str(&format!(
            "\nTarget: each strategy's peak RSS while training below the previous one's by at least half the held-state saving: **{}**\n",
            if all_ok { "met" } else { "missed" }
        ));
    }
    md.push_str(&format!("\nTotal bench time {:.0} s.\n", started.elapsed().as_secs_f64()));
    println!("{md}");
    fs::write(bench_dir.join("memory.md"), &md)?;
    fs::write(bench_dir.join("memory.csv"), &csv)?;
    eprintln!("wrote {}", bench_dir.join("memory.{md,csv}").display());
    Ok(())
}
