//! Training throughput of `troupe local` (2 workers, QUIC ring all-reduce) against PyTorch
//! DistributedDataParallel (gloo, 2 processes) training the same model on the same data:
//! `benches/ddp_reference.py` reproduces troupe's GPT, initial weights, sample order, global
//! batch, micro-batching, clipping, AdamW and learning-rate schedule, read from the same config
//! file, so both runs see the same sequences at every step from the same starting weights.
//!
//! Reports the median tokens/s after warm-up (global tokens per step / step wall time, as
//! troupe's events.jsonl defines it), the train loss averaged over the last 10 steps, the
//! final validation loss (the first `eval.sequences` windows of val.bin, evaluated after the
//! last step by both), and the ratio troupe / DDP. Target: ≥ 1.2×, and the same loss within
//! noise (|Δ| of the last-10 mean train loss ≤ the standard error of that mean). It also
//! measures how much CPU other processes used during each run and flags a busy machine.
//!
//!   cargo bench --bench peers
//!
//! troupe runs twice per round: with the gradient's all-reduce overlapped with the backward pass
//! (`parallel.overlap = true`, the default, the figures compared with DDP) and without it
//! (one all-reduce after the backward pass), which gives the share of the communication time
//! the overlap hides (1 − exposed all-reduce time with overlap / without).
//!
//! Env: TROUPE_BENCH_MODEL (`default`, or `30m`: a ~20M-parameter GPT of 6 layers, 512 wide,
//! block 256, global batch 8 and micro-batch 4, 12 steps unless TROUPE_BENCH_STEPS says),
//! TROUPE_BENCH_STEPS (steps per run, default 60; the first 5 are warm-up, and the lr
//! schedule is the default's compressed to these steps, as `troupe local --steps` does),
//! TROUPE_BENCH_ROUNDS (default 3: alternate troupe and DDP this many times and pool the
//! timed steps, which evens out slow phases of a shared machine), TROUPE_BENCH_THREADS
//! (intra-op threads per worker process on both sides, default 1), TROUPE_TORCH_PY (a folder
//! holding a Python-importable torch, see ddp_reference.py), TROUPE_BENCH_DDP=0 to skip the
//! PyTorch side.
//! Output: a markdown table on stdout, `target/bench/peers.{md,csv}` and the per-step losses
//! and times of both (first round) in `target/bench/peers_steps.csv`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use troupe_core::config::Config;
use troupe_core::events::{read_events, RunEvent};

const WORKERS: usize = 2;
const WARMUP: usize = 5;
const TARGET_RATIO: f64 = 1.2;
const LAST: usize = 10;
/// Above this many cores used by other processes on average, the numbers are flagged.
const BUSY_CORES: f64 = 0.15;

/// One system's runs: the first round's per-step losses and times and final validation loss,
/// and the post-warm-up step times of every round, pooled.
struct Run {
    losses: Vec<f64>,
    seconds: Vec<f64>,
    val_loss: Option<f64>,
    /// troupe only: the slowest rank's all-reduce seconds per step (DDP overlaps its
    /// all-reduce with the backward pass, so it has no such number).
    comm_seconds: Vec<f64>,
    /// Step seconds after the warm-up, all rounds.
    timed: Vec<f64>,
    timed_comm: Vec<f64>,
    /// Median tokens/s of each round.
    round_tps: Vec<f64>,
}

impl Run {
    fn new(losses: Vec<f64>, seconds: Vec<f64>, comm_seconds: Vec<f64>, val_loss: Option<f64>, tokens_per_step: f64) -> Run {
        let timed = after_warmup(&seconds);
        let timed_comm = after_warmup(&comm_seconds);
        let round_tps = vec![tokens_per_step / quantile(&timed, 0.5)];
        Run { losses, seconds, val_loss, comm_seconds, timed, timed_comm, round_tps }
    }

    /// Adds a later round's step times (its losses are the same: both sides are deterministic).
    fn absorb(&mut self, other: Run) {
        self.timed.extend(other.timed);
        self.timed_comm.extend(other.timed_comm);
        self.round_tps.extend(other.round_tps);
    }

    /// The `q` quantile of tokens/s over the timed steps of all rounds.
    fn tokens_per_sec(&self, tokens_per_step: f64, q: f64) -> f64 {
        // tokens/s falls as seconds rise: its q quantile is the (1 - q) quantile of seconds.
        tokens_per_step / quantile(&self.timed, 1.0 - q)
    }

    /// "p25–p75" of the per-step tokens/s: how much the steps vary.
    fn spread(&self, tokens_per_step: f64) -> String {
        format!("{:.0}–{:.0}", self.tokens_per_sec(tokens_per_step, 0.25), self.tokens_per_sec(tokens_per_step, 0.75))
    }

    fn last_losses(&self) -> &[f64] {
        &self.losses[self.losses.len().saturating_sub(LAST)..]
    }

    fn mean_last_loss(&self) -> f64 {
        let l = self.last_losses();
        l.iter().sum::<f64>() / l.len() as f64
    }

    /// Standard error of the last-10 mean: the step-to-step spread of the loss over the
    /// batches, which is the noise a single run's mean carries.
    fn last_loss_stderr(&self) -> f64 {
        let l = self.last_losses();
        if l.len() < 2 {
            return f64::NAN;
        }
        let m = self.mean_last_loss();
        let var = l.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (l.len() - 1) as f64;
        (var / l.len() as f64).sqrt()
    }
}

/// The steps after the warm-up (all of them if there are no more than the warm-up).
fn after_warmup(v: &[f64]) -> Vec<f64> {
    v[if v.len() > WARMUP { WARMUP } else { 0 }..].to_vec()
}

/// The `q` quantile (nearest rank) of `v`; NaN when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// CPU accounting around a run, to tell how much else was running on the machine.
struct CpuSample {
    at: Instant,
    /// Busy (user, nice, system, irq, softirq) and steal jiffies of the whole machine.
    busy: u64,
    steal: u64,
    /// User + system seconds of this process' waited-for descendants (the runs).
    children: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        let (mut busy, mut steal) = (0, 0);
        if let Ok(text) = std::fs::read_to_string("/proc/stat") {
            if let Some(line) = text.lines().next() {
                let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                if f.len() >= 8 {
                    busy = f[0] + f[1] + f[2] + f[5] + f[6];
                    steal = f[7];
                }
            }
        }
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        CpuSample { at: Instant::now(), busy, steal, children: secs(ru.ru_utime) + secs(ru.ru_stime) }
    }
}

/// CPU used by everything but the runs, accumulated over a system's rounds.
#[derive(Default)]
struct Others {
    cpu_seconds: f64,
    steal_seconds: f64,
    wall: f64,
}

impl Others {
    fn add(&mut self, before: &CpuSample, after: &CpuSample) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = after.busy.saturating_sub(before.busy) as f64 / hz;
        let own = after.children - before.children;
        self.cpu_seconds += (busy - own).max(0.0);
        self.steal_seconds += after.steal.saturating_sub(before.steal) as f64 / hz;
        self.wall += after.at.duration_since(before.at).as_secs_f64();
    }

    /// Cores used on average by other processes.
    fn cores(&self) -> f64 {
        self.cpu_seconds / self.wall.max(1e-9)
    }

    /// Share of the machine's CPU time the hypervisor took.
    fn steal(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.steal_seconds / (self.wall.max(1e-9) * cores)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// `troupe local` with `config`, its run folder under `out`.
fn run_troupe(config: &Path, steps: u64, out: &Path, tokens_per_step: f64) -> Result<Run> {
    std::fs::create_dir_all(out)?;
    let log = out.join("troupe-local.log");
    let file = std::fs::File::create(&log)?;
    let status = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["local", "--sample-tokens", "0", "--workers", &WORKERS.to_string(), "--steps", &steps.to_string()])
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .context("cannot start troupe local")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("troupe local failed ({status}); the end of {}:\n{}", log.display(), tail.join("\n"));
    }
    let run_dir = out.join(&Config::from_file(config)?.run.name);
    let events = read_events(&run_dir).with_context(|| format!("reading {}/events.jsonl", run_dir.display()))?;
    let mut steps_seen = Vec::new();
    let mut val_loss = None;
    for e in &events {
        match e {
            RunEvent::Step { step, loss, step_seconds, comm_seconds, world_size, .. } => {
                anyhow::ensure!(*world_size as usize == WORKERS, "step {step} ran with {world_size} workers, not {WORKERS}");
                steps_seen.push((*step, *loss, *step_seconds, *comm_seconds));
            }
            RunEvent::Eval { val_loss: v, .. } => val_loss = Some(*v),
            _ => {}
        }
    }
    steps_seen.sort_by_key(|s| s.0);
    anyhow::ensure!(
        steps_seen.len() as u64 == steps && steps_seen.iter().enumerate().all(|(i, s)| s.0 == i as u64),
        "expected steps 0..{steps} once each in events.jsonl, got {} step events (a regroup or a retried step?)",
        steps_seen.len()
    );
    Ok(Run::new(
        steps_seen.iter().map(|s| s.1).collect(),
        steps_seen.iter().map(|s| s.2).collect(),
        steps_seen.iter().map(|s| s.3).collect(),
        val_loss,
        tokens_per_step,
    ))
}

/// The PyTorch DDP run and a description of the torch it used, or why it was skipped.
type DdpResult = std::result::Result<(Run, String), String>;

fn run_ddp(config: &Path, threads: usize, tokens_per_step: f64) -> DdpResult {
    if std::env::var("TROUPE_BENCH_DDP").is_ok_and(|v| v == "0") {
        return Err("disabled by TROUPE_BENCH_DDP=0".into());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ddp_reference.py");
    let out = Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(script)
        .arg("--config")
        .arg(config)
        .args(["--world", &WORKERS.to_string(), "--threads", &threads.to_string()])
        // torch warns when numpy is missing; it does not need it here.
        .env("PYTHONWARNINGS", "ignore:Failed to initialize NumPy")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut losses, mut seconds, mut val_loss, mut torch, mut done) = (Vec::new(), Vec::new(), None, String::new(), false);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("SKIP") => return Err(line["SKIP ".len().min(line.len())..].to_string()),
            Some("TORCH") => torch = it.collect::<Vec<_>>().join(" "),
            Some("STEP") => {
                let v: Vec<f64> = it.filter_map(|x| x.parse().ok()).collect();
                if v.len() != 3 || v[0] as usize != losses.len() {
                    return Err(format!("bad line from ddp_reference.py: {line}"));
                }
                losses.push(v[1]);
                seconds.push(v[2]);
            }
            Some("VAL") => val_loss = it.next().and_then(|x| x.parse().ok()),
            Some("DONE") => done = true,
            _ => {}
        }
    }
    if !out.status.success() || !done || losses.is_empty() {
        return Err(format!("ddp_reference.py failed ({}): {}", out.status, text.trim()));
    }
    Ok((Run::new(losses, seconds, Vec::new(), val_loss, tokens_per_step), torch))
}

fn main() -> Result<()> {
    let started = Instant::now();
    let env_num = |name: &str, default: u64| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let medium = std::env::var("TROUPE_BENCH_MODEL").is_ok_and(|m| m == "30m");
    let steps = env_num("TROUPE_BENCH_STEPS", if medium { 12 } else { 60 });
    let rounds = env_num("TROUPE_BENCH_ROUNDS", 3).max(1) as usize;
    let threads = env_num("TROUPE_BENCH_THREADS", 1).max(1) as usize;
    anyhow::ensure!(steps >= 1, "TROUPE_BENCH_STEPS must be at least 1");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let bench_dir = Path::new(&target).join("bench");
    let out = bench_dir.join("peers");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;

    // The embedded default run, with the steps (and the schedule compressed to them, as
    // `troupe local --steps` does), the same intra-op threads as the DDP processes, and
    // nothing between steps: evaluation and the checkpoint only at the end (interval 0), no
    // deployment. ddp_reference.py reads this same file.
    let mut config = Config::default_config();
    config.train.steps = steps;
    config.train.warmup_steps = config.train.warmup_steps.min(steps);
    config.train.threads_per_worker = threads;
    config.eval.interval = 0;
    config.checkpoint.interval = 0;
    config.deploy.enabled = false;
    config.cluster.workers = WORKERS;
    if medium {
        (config.model.n_layer, config.model.n_embd, config.model.n_head, config.model.block_size) = (6, 512, 8, 256);
        (config.train.global_batch, config.train.micro_batch) = (8, 4);
    }
    if config.data.dir.is_relative() {
        config.data.dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&config.data.dir);
    }
    let config_path = out.join("peers.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let mut whole = config.clone();
    whole.parallel.overlap = false;
    let whole_path = out.join("peers-no-overlap.toml");
    std::fs::write(&whole_path, whole.to_toml())?;
    let tokens_per_step = (config.train.global_batch * config.model.block_size) as f64;

    let load_before = load_average();
    let (mut troupe, mut ddp): (Option<Run>, Option<DdpResult>) = (None, None);
    let mut troupe_whole: Option<Run> = None;
    let (mut others_troupe, mut others_ddp) = (Others::default(), Others::default());
    for round in 0..rounds {
        eprintln!(
            "peers bench: round {}/{rounds}: troupe local, {WORKERS} workers x {threads} thread(s), {steps} steps (load average {}) ...",
            round + 1,
            load_average()
        );
        let before = CpuSample::now();
        let run = run_troupe(&config_path, steps, &out.join(format!("troupe-{round}")), tokens_per_step)?;
        let after = CpuSample::now();
        others_troupe.add(&before, &after);
        match &mut troupe {
            None => troupe = Some(run),
            Some(t) => t.absorb(run),
        }
        eprintln!("peers bench: round {}/{rounds}: troupe local without overlap ...", round + 1);
        let run = run_troupe(&whole_path, steps, &out.join(format!("troupe-no-overlap-{round}")), tokens_per_step)?;
        match &mut troupe_whole {
            None => troupe_whole = Some(run),
            Some(t) => t.absorb(run),
        }
        if matches!(ddp, Some(Err(_))) {
            continue; // skipped once: no point trying again
        }
        eprintln!(
            "peers bench: round {}/{rounds}: PyTorch DDP (gloo), {WORKERS} processes x {threads} thread(s), {steps} steps (load average {}) ...",
            round + 1,
            load_average()
        );
        let before = CpuSample::now();
        let result = run_ddp(&config_path, threads, tokens_per_step);
        let after = CpuSample::now();
        match (&mut ddp, result) {
            (Some(Ok((d, _))), Ok((run, _))) => {
                others_ddp.add(&before, &after);
                d.absorb(run);
            }
            (Some(Ok(_)), Err(why)) => bail!("the DDP run of round {} failed after an earlier one worked: {why}", round + 1),
            (slot, result) => {
                if result.is_ok() {
                    others_ddp.add(&before, &after);
                }
                *slot = Some(result);
            }
        }
    }
    let load_after = load_average();
    let troupe = troupe.expect("at least one round");
    let troupe_whole = troupe_whole.expect("at least one round");
    let ddp = ddp.expect("at least one round");

    let troupe_tps = troupe.tokens_per_sec(tokens_per_step, 0.5);
    let fmt_val = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let n_last = troupe.last_losses().len();
    let rounds_text =
        if rounds == 1 { "one run of each".to_string() } else { format!("{rounds} alternating runs of each, timed steps pooled") };
    let mut md = format!(
        "Training throughput, {} model ({} layers, {} heads, n_embd {}, block {}), global batch {} × {} = {} tokens/step, micro-batch {}, {steps} steps (first {WARMUP} warm-up), {rounds_text}, {WORKERS} processes × {threads} intra-op thread(s) each, CPU, this machine ({cores} cores).\n\n",
        if medium { format!("~{:.0}M-parameter", (12 * config.model.n_layer * config.model.n_embd.pow(2) + (config.data.vocab_size + config.model.block_size) * config.model.n_embd) as f64 / 1e6) } else { "default".to_string() },
        config.model.n_layer,
        config.model.n_head,
        config.model.n_embd,
        config.model.block_size,
        config.train.global_batch,
        config.model.block_size,
        tokens_per_step,
        config.train.micro_batch,
    );
    md.push_str(&format!(
        "| system | median tokens/s | p25–p75 | loss at step 0 | train loss (mean of last {n_last}) | final val loss | troupe / DDP |\n"
    ));
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    md.push_str(&format!(
        "| troupe local (QUIC ring) | {troupe_tps:.0} | {} | {:.4} | {:.4} ± {:.4} | {} | |\n",
        troupe.spread(tokens_per_step),
        troupe.losses[0],
        troupe.mean_last_loss(),
        troupe.last_loss_stderr(),
        fmt_val(troupe.val_loss)
    ));
    let mut csv = String::from("system,median_tokens_per_sec,p25_tokens_per_sec,p75_tokens_per_sec,loss_step0,train_loss_last10_mean,train_loss_last10_stderr,final_val_loss,ratio_troupe_over_ddp,target_ratio,steps,rounds,threads,other_cores\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let row = |name: &str, r: &Run, ratio: String, others: &Others| {
        format!(
            "{name},{:.1},{:.1},{:.1},{:.6},{:.6},{:.6},{},{ratio},{TARGET_RATIO},{steps},{rounds},{threads},{:.3}\n",
            r.tokens_per_sec(tokens_per_step, 0.5),
            r.tokens_per_sec(tokens_per_step, 0.25),
            r.tokens_per_sec(tokens_per_step, 0.75),
            r.losses[0],
            r.mean_last_loss(),
            r.last_loss_stderr(),
            opt(r.val_loss),
            others.cores()
        )
    };
    md.push_str(&format!(
        "| troupe local, no overlap (one all-reduce after the backward pass) | {:.0} | {} | {:.4} | {:.4} ± {:.4} | {} | |\n",
        troupe_whole.tokens_per_sec(tokens_per_step, 0.5),
        troupe_whole.spread(tokens_per_step),
        troupe_whole.losses[0],
        troupe_whole.mean_last_loss(),
        troupe_whole.last_loss_stderr(),
        fmt_val(troupe_whole.val_loss)
    ));
    csv.push_str(&row("troupe_local", &troupe, String::new(), &others_troupe));
    csv.push_str(&row("troupe_local_no_overlap", &troupe_whole, String::new(), &others_troupe));
    let mut steps_csv = String::from("step,troupe_loss,troupe_seconds,troupe_comm_seconds,ddp_loss,ddp_seconds\n");
    let cell = |v: Option<&f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
    match &ddp {
        Ok((d, torch)) => {
            let ddp_tps = d.tokens_per_sec(tokens_per_step, 0.5);
            let ratio = troupe_tps / ddp_tps;
            md.push_str(&format!(
                "| PyTorch DDP (gloo), benches/ddp_reference.py | {ddp_tps:.0} | {} | {:.4} | {:.4} ± {:.4} | {} | {ratio:.2}× |\n\n",
                d.spread(tokens_per_step),
                d.losses[0],
                d.mean_last_loss(),
                d.last_loss_stderr(),
                fmt_val(d.val_loss)
            ));
            let verdict = if ratio >= TARGET_RATIO { "met" } else { "missed" };
            md.push_str(&format!("Throughput: troupe / DDP = {ratio:.2}× (target ≥ {TARGET_RATIO}×): **{verdict}**. "));
            if rounds > 1 {
                let list = |r: &Run| r.round_tps.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ");
                md.push_str(&format!("Median tokens/s per round: troupe {}; DDP {}.\n\n", list(&troupe), list(d)));
            } else {
                md.push_str("The p25–p75 columns show how much single steps vary; on a shared machine, repeated runs move the ratio by about as much (TROUPE_BENCH_ROUNDS pools several).\n\n");
            }
            let delta = troupe.mean_last_loss() - d.mean_last_loss();
            let noise = troupe.last_loss_stderr().max(d.last_loss_stderr());
            let same = if delta.abs() <= noise { "same within noise" } else { "differs by more than the noise" };
            let n = troupe.losses.len().min(d.losses.len());
            let (max_diff, at) =
                (0..n).map(|i| ((troupe.losses[i] - d.losses[i]).abs(), i)).fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
            md.push_str(&format!(
                "Loss: Δ(last-{n_last} mean train loss) = {delta:+.4} vs noise (standard error of that mean) {noise:.4}: **{same}**. Both runs start from the same weights and see the same sequences each step, so the per-step losses can be compared directly: largest |Δ| {max_diff:.2e} (step {at}); val loss Δ {}.\n\n",
                match (troupe.val_loss, d.val_loss) {
                    (Some(a), Some(b)) => format!("{:+.4}", a - b),
                    _ => "n/a".into(),
                }
            ));
            let (exposed, whole_comm) = (quantile(&troupe.timed_comm, 0.5), quantile(&troupe_whole.timed_comm, 0.5));
            md.push_str(&format!(
                "Median step: troupe {:.3} s, of which {exposed:.3} s waiting for the gradient all-reduce after the backward pass; without overlap {:.3} s, of which {whole_comm:.3} s in the all-reduce: the overlap hides {:.0}% of the communication time. DDP {:.3} s (its bucketed all-reduce overlaps the backward pass).\n\n",
                quantile(&troupe.timed, 0.5),
                quantile(&troupe_whole.timed, 0.5),
                100.0 * (1.0 - exposed / whole_comm.max(1e-9)),
                quantile(&d.timed, 0.5)
            ));
            md.push_str(&format!("PyTorch: {torch}.\n"));
            csv.push_str(&row("pytorch_ddp_gloo", d, format!("{ratio:.4}"), &others_ddp));
            for i in 0..troupe.losses.len().max(d.losses.len()) {
                steps_csv.push_str(&format!(
                    "{i},{},{},{},{},{}\n",
                    cell(troupe.losses.get(i), 7),
                    cell(troupe.seconds.get(i), 5),
                    cell(troupe.comm_seconds.get(i), 5),
                    cell(d.losses.get(i), 7),
                    cell(d.seconds.get(i), 5)
                ));
            }
        }
        Err(why) => {
            md.push_str("| PyTorch DDP (gloo) | n/a | n/a | n/a | n/a | n/a | n/a |\n\n");
            md.push_str(&format!("PyTorch DDP column missing: {why}. Target ≥ {TARGET_RATIO}× not measured.\n"));
            csv.push_str(&format!("pytorch_ddp_gloo,,,,,,,,,{TARGET_RATIO},{steps},{rounds},{threads},\n"));
            for i in 0..troupe.losses.len() {
                steps_csv.push_str(&format!("{i},{:.7},{:.5},{:.5},,\n", troupe.losses[i], troupe.seconds[i], troupe.comm_seconds[i]));
            }
        }
    }
    let ddp_others = if ddp.is_ok() { format!(" and {:.2} during the DDP runs", others_ddp.cores()) } else { String::new() };
    md.push_str(&format!(
        "\nOther processes on this machine used {:.2} cores on average during the troupe runs{ddp_others} (machine busy time from /proc/stat minus the runs' own CPU time); hypervisor steal {:.1}%{}. Load average (1/5/15 min) before: {load_before}; after: {load_after}. Total bench time {:.0} s.\n",
        others_troupe.cores(),
        others_troupe.steal() * 100.0,
        if ddp.is_ok() { format!(" / {:.1}%", others_ddp.steal() * 100.0) } else { String::new() },
        started.elapsed().as_secs_f64()
    ));
    if others_troupe.cores().max(if ddp.is_ok() { others_ddp.cores() } else { 0.0 }) > BUSY_CORES {
        md.push_str(&format!(
            "\n**Warning: the machine was busy** (other processes used more than {BUSY_CORES} cores on average during a run): the throughput numbers and the ratio are skewed; rerun on a quiet machine.\n"
        ));
    }
    print!("{md}");
    std::fs::write(bench_dir.join("peers.md"), &md)?;
    std::fs::write(bench_dir.join("peers.csv"), &csv)?;
    std::fs::write(bench_dir.join("peers_steps.csv"), &steps_csv)?;
    eprintln!("wrote {}", bench_dir.join("peers.{md,csv} and peers_steps.csv").display());
    Ok(())
}
