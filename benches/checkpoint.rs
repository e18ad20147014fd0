//! Sharded, asynchronous checkpoints (run: `cargo bench --bench checkpoint`).
//!
//! Why one file of ~700 lines: a bench is read as one report, claim by claim (A and B below),
//! each with its setup, its measurement and its target side by side.
//!
//! - **A, write throughput**: a checkpoint written the way a run writes one — W threads (the
//!   ranks, at the lowered priority of the trainer's writer thread) each call
//!   `checkpoint::write_shard` on their `ShardSnapshot` (hashing while writing, fsync), rank 0
//!   adds `state.json`, each fsyncs the folder, then
//!   `checkpoint::commit` (size checks, folder fsync, rename, MANIFEST) — against a plain
//!   sequential write (`File::write_all` + `sync_all`, one thread, one file) of the same number
//!   of bytes into the same folder. Default state: a 124 M-parameter model (GPT-2 small's
//!   size): parameters and both AdamW moments, float32, ≈ 1.5 GB over W = 2 shards. One
//!   untimed warm-up of each, then 3 rounds, the order alternating, files deleted (and `sync`)
//!   after each measurement; median of the rounds' ratios. Target: checkpoint bytes/s ≥ 0.8 ×
//!   plain bytes/s.
//! - **B, training with a checkpoint every step**: `troupe local` (real processes, 2 workers)
//!   trains the same run twice per round, once with `[checkpoint] interval = 1` and once with
//!   `interval = 0` (only at the end, after the timed steps), 3 rounds alternating. Median step
//!   time of each run (the coordinator's `step_seconds` in events.jsonl, first 5 steps
//!   warm-up); the claim is the median of the rounds' ratios (runs started back to back), the
//!   pooled medians are shown too. Target: under 5% slower. The model is the default one widened
//!   to n_embd 256 (3.7 M parameters: a 45 MB checkpoint). Every checkpoint is also evaluated
//!   (the core asks the ranks for the validation loss at each checkpoint step): both runs use
//!   `eval.sequences = 1` and no prompts, so that what differs is the checkpoint. The workers'
//!   `troupe_checkpoint_wait_seconds_total` is scraped from their /metrics while they run (the
//!   last scrape before they exit). A third run per round (diagnostic, no target;
//!   TROUPE_BENCH_EVAL_ONLY=0 skips it) evaluates every step without checkpointing, to tell
//!   the validation pass's share of the cost from the checkpoint's.
//!
//! Env: TROUPE_BENCH_PART (`a`, `b` or `ab`, default `ab`), TROUPE_BENCH_ROUNDS (3),
//! TROUPE_BENCH_CKPT_PARAMS (parameters of part A's model, default 124439808),
//! TROUPE_BENCH_CKPT_WRITERS (W of part A, default 2), TROUPE_BENCH_STEPS (part B, default 30).
//! Output: a table on stdout and target/bench/checkpoint.{md,csv}.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use troupe_common::checkpoint::{self, ShardSnapshot, TrainState};
use troupe_core::config::Config;
use troupe_core::events::{read_events, RunEvent};
use troupe_core::proto::FileDigest;
use troupe_core::shard::ShardLayout;

const WRITE_TARGET: f64 = 0.8;
const STEP_TARGET: f64 = 1.05;
const WARMUP_STEPS: u64 = 5;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// max / min − 1.
fn spread(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max) / v.iter().copied().fold(f64::MAX, f64::min) - 1.0
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

/// Bytes free for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills the struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        bail!("statvfs {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Flushes everything (e.g. the metadata of the files just deleted) so it is not written back
/// inside the next measurement.
fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// CPU accounting around a measurement, to tell how much else ran on the machine (as
/// benches/peers.rs does).
struct CpuSample {
    at: Instant,
    /// Busy (user, nice, system, irq, softirq) jiffies of the whole machine.
    busy: u64,
    /// User + system seconds of this process and of its waited-for descendants.
    own: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        let mut busy = 0;
        if let Some(line) = fs::read_to_string("/proc/stat").ok().and_then(|t| t.lines().next().map(str::to_string)) {
            let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            if f.len() >= 7 {
                busy = f[0] + f[1] + f[2] + f[5] + f[6];
            }
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        let mut own = 0.0;
        for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
            // SAFETY: getrusage only writes the struct it is given.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut ru) };
            own += secs(ru.ru_utime) + secs(ru.ru_stime);
        }
        CpuSample { at: Instant::now(), busy, own }
    }

    /// Cores other processes used on average since `self`.
    fn others_since(&self) -> f64 {
        let now = CpuSample::now();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = now.busy.saturating_sub(self.busy) as f64 / hz;
        (busy - (now.own - self.own)).max(0.0) / now.at.duration_since(self.at).as_secs_f64().max(1e-9)
    }
}

fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Deterministic, non-constant values (xorshift), roughly the spread of trained weights.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Part A: write throughput.

/// Writes one checkpoint of `snaps` as a run does and commits it; returns its bytes (every file
/// of the committed folder, MANIFEST included) and the seconds from the first byte to the
/// commit's return. Checks the result once (`verify`, untimed) when `verify` is set.
fn checkpoint_write(root: &Path, snaps: &[ShardSnapshot], layout: &ShardLayout, verify: bool) -> Result<(u64, f64, Option<f64>)> {
    let run = root.join("ckpt-run");
    let _ = fs::remove_dir_all(&run);
    fs::create_dir_all(checkpoint::checkpoints_dir(&run))?;
    sync_all();
    let step = snaps[0].step;
    let world = snaps.len() as u32;
    let tmp = checkpoint::tmp_dir(&run, step, 1);
    let started = Instant::now();
    let parts: Vec<Result<Vec<FileDigest>>> = std::thread::scope(|s| {
        let handles: Vec<_> = snaps
            .iter()
            .map(|snap| {
                let tmp = &tmp;
                s.spawn(move || -> Result<Vec<FileDigest>> {
                    // What the trainer's background writer does (write_checkpoint_part), at
                    // the priority it runs at.
                    checkpoint::lower_thread_priority();
                    fs::create_dir_all(tmp)?;
                    let mut files = vec![checkpoint::write_shard(tmp, snap, &|| ())?];
                    if snap.rank == 0 {
                        let state = TrainState {
                            step,
                            cursor: 0,
                            seed: 1,
                            world_size: world,
                            strategy: "ddp".into(),
                            tokens_seen: 0,
                            vocab_size: 50257,
                            layout: layout.clone(),
                        };
                        let path = tmp.join(checkpoint::STATE_FILE);
                        fs::write(&path, serde_json::to_vec_pretty(&state)?)?;
                        checkpoint::fsync_path(&path)?;
                        files.push(checkpoint::digest_file(&path)?);
                    }
                    checkpoint::fsync_path(tmp)?;
                    Ok(files)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer thread")).collect()
    });
    let mut files = Vec::new();
    for part in parts {
        files.extend(part?);
    }
    let dest = checkpoint::commit(&run, step, 1, world, &files)?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes: u64 = files.iter().map(|f| f.size).sum::<u64>() + fs::metadata(dest.join(checkpoint::MANIFEST))?.len();
    let mut verify_seconds = None;
    if verify {
        // Reads every file back (from the page cache) and hashes it, one thread: how fast
        // sha256 alone goes here, to explain the write's cost.
        let t = Instant::now();
        let manifest = checkpoint::verify(&dest).context("the benchmark's checkpoint does not verify")?;
        verify_seconds = Some(t.elapsed().as_secs_f64());
        ensure!(manifest.world_size == world && manifest.step == step, "unexpected MANIFEST {manifest:?}");
    }
    fs::remove_dir_all(&run)?;
    sync_all();
    Ok((bytes, seconds, verify_seconds))
}

/// Writes exactly `total` bytes (the shards' values, then zeros) into one file with
/// `write_all`, then `sync_all`; returns the seconds from create to the end of `sync_all`.
fn plain_write(root: &Path, snaps: &[ShardSnapshot], total: u64) -> Result<f64> {
    let path = root.join("plain.bin");
    let _ = fs::remove_file(&path);
    sync_all();
    let started = Instant::now();
    let mut file = File::create(&path)?;
    let mut left = total as usize;
    for snap in snaps {
        for part in [&snap.params, &snap.exp_avg, &snap.exp_avg_sq] {
            let bytes = f32_bytes(part);
            let n = bytes.len().min(left);
            file.write_all(&bytes[..n])?;
            left -= n;
        }
    }
    if left > 0 {
        file.write_all(&vec![0u8; left])?;
    }
    file.sync_all()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    ensure!(fs::metadata(&path)?.len() == total, "plain file has the wrong size");
    fs::remove_file(&path)?;
    sync_all();
    Ok(seconds)
}

struct WriteRound {
    bytes: u64,
    ckpt_s: f64,
    plain_s: f64,
    /// Cores used by other processes during the round.
    others: f64,
}

impl WriteRound {
    fn ckpt_mbs(&self) -> f64 {
        self.bytes as f64 / self.ckpt_s / 1e6
    }
    fn plain_mbs(&self) -> f64 {
        self.bytes as f64 / self.plain_s / 1e6
    }
    fn ratio(&self) -> f64 {
        self.plain_s / self.ckpt_s
    }
}

fn part_a(bench_dir: &Path, rounds: usize, md: &mut String, csv: &mut String) -> Result<()> {
    let writers = env_num("TROUPE_BENCH_CKPT_WRITERS", 2).max(1) as u32;
    let mut params = env_num("TROUPE_BENCH_CKPT_PARAMS", 124_439_808) as usize;
    let root = bench_dir.join("checkpoint-write");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    // At most one copy of the state is on disk at a time; keep a wide margin.
    let free = free_bytes(&root)?;
    let wanted = params as u64 * 12;
    if wanted * 3 > free {
        let fit = (free / 3 / 12) as usize;
        eprintln!(
            "checkpoint bench: {:.1} GB free on {}: {params} parameters ({:.2} GB of state) would not leave room; using {fit}",
            free as f64 / 1e9,
            root.display(),
            wanted as f64 / 1e9
        );
        params = fit;
    }
    ensure!(params >= writers as usize, "no room on disk for a checkpoint");
    let layout = ShardLayout::new(writers, vec![params]);
    let shard_len = layout.shard_len();
    eprintln!(
        "checkpoint bench A: {params} parameters, {writers} writers, shards of {shard_len} scalars × 3 ({:.2} GB in all) under {} ({:.1} GB free) …",
        (shard_len * 12 * writers as usize) as f64 / 1e9,
        root.display(),
        free as f64 / 1e9
    );
    let snaps: Vec<ShardSnapshot> = (0..writers)
        .map(|rank| ShardSnapshot {
            rank,
            step: 1000,
            params: values(shard_len, 3 * rank + 1),
            exp_avg: values(shard_len, 3 * rank + 2),
            exp_avg_sq: values(shard_len, 3 * rank + 3).into_iter().map(|v| v * v).collect(),
        })
        .collect();

    // Warm-up, untimed: the first writes of a process pay for page-cache allocation that
    // later ones do not; both kinds of write get one.
    let (warm_bytes, _, verify_s) = checkpoint_write(&root, &snaps, &layout, true)?;
    plain_write(&root, &snaps, warm_bytes)?;
    let verify_s = verify_s.expect("verified");
    let mut results = Vec::new();
    let mut bytes = Some(warm_bytes);
    for round in 0..rounds {
        let ckpt_first = round % 2 == 0;
        let (mut ckpt, mut plain) = (None, None);
        let cpu = CpuSample::now();
        for which in if ckpt_first { [true, false] } else { [false, true] } {
            if which {
                let (b, s, _) = checkpoint_write(&root, &snaps, &layout, false)?;
                bytes = Some(b);
                ckpt = Some((b, s));
            } else {
                plain = Some(plain_write(&root, &snaps, bytes.expect("a checkpoint was written first"))?);
            }
        }
        let ((b, ckpt_s), plain_s) = (ckpt.unwrap(), plain.unwrap());
        let r = WriteRound { bytes: b, ckpt_s, plain_s, others: cpu.others_since() };
        eprintln!(
            "checkpoint bench A: round {}/{rounds} ({} first): checkpoint {:.0} MB/s, plain {:.0} MB/s, ratio {:.3}, other processes {:.2} cores",
            round + 1,
            if ckpt_first { "checkpoint" } else { "plain" },
            r.ckpt_mbs(),
            r.plain_mbs(),
            r.ratio(),
            r.others
        );
        results.push(r);
    }
    let _ = fs::remove_dir_all(&root);

    let b = results[0].bytes;
    md.push_str(&format!(
        "### A. Checkpoint write throughput\n\n\
         State of a {params}-parameter model (parameters + 2 AdamW moments, float32) written by {writers} threads in parallel \
         (`write_shard`: hashing while writing, fsync; rank 0 adds state.json), then `commit` (folder fsync, rename, MANIFEST): \
         {} files, {:.2} GB. Plain: one `File::write_all` of the same number of bytes + `sync_all`, same folder ({}). \
         One untimed warm-up of each, then {rounds} rounds, order alternating, files deleted and `sync` between measurements.\n\n\
         | round | checkpoint s | checkpoint MB/s | plain s | plain MB/s | checkpoint / plain | other processes incl. kernel writeback (cores) |\n|---|---:|---:|---:|---:|---:|---:|\n",
        writers + 2,
        b as f64 / 1e9,
        root.display()
    ));
    for (i, r) in results.iter().enumerate() {
        md.push_str(&format!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.3} | {:.2} |\n",
            i + 1,
            r.ckpt_s,
            r.ckpt_mbs(),
            r.plain_s,
            r.plain_mbs(),
            r.ratio(),
            r.others
        ));
        csv.push_str(&format!(
            "write_throughput_MBps,{},{:.1},{:.1},{:.4},>={WRITE_TARGET},,{}\n",
            i + 1,
            r.ckpt_mbs(),
            r.plain_mbs(),
            r.ratio(),
            r.bytes
        ));
    }
    let ckpt_med = median(&results.iter().map(WriteRound::ckpt_mbs).collect::<Vec<_>>());
    let plain_med = median(&results.iter().map(WriteRound::plain_mbs).collect::<Vec<_>>());
    let ratio_med = median(&results.iter().map(WriteRound::ratio).collect::<Vec<_>>());
    let ok = ratio_med >= WRITE_TARGET;
    let plain_spread = spread(&results.iter().map(WriteRound::plain_mbs).collect::<Vec<_>>());
    md.push_str(&format!(
        "| **median** | | **{ckpt_med:.0}** | | **{plain_med:.0}** | **{ratio_med:.3}** | |\n\n\
         Checkpoint / plain write throughput (median of the rounds' ratios): {ratio_med:.3} (target ≥ {WRITE_TARGET}): **{}**\n\n\
         Noise: plain throughput varied by {:.0}% and checkpoint throughput by {:.0}% between rounds (fastest / slowest − 1). \
         For reference: reading the checkpoint back from the page cache and hashing it (`checkpoint::verify`, one thread) \
         ran at {:.0} MB/s; the checkpoint's writers hash every byte they write, in the writing thread.{}\n\n",
        verdict(ok),
        plain_spread * 100.0,
        spread(&results.iter().map(WriteRound::ckpt_mbs).collect::<Vec<_>>()) * 100.0,
        b as f64 / verify_s / 1e6,
        if plain_spread > 1.0 - WRITE_TARGET {
            format!(
                " **The disk's own throughput moved by more than the {:.0}% margin between rounds: the verdict is within noise \
                 (TROUPE_BENCH_ROUNDS raises the rounds).**",
                (1.0 - WRITE_TARGET) * 100.0
            )
        } else {
            String::new()
        }
    ));
    csv.push_str(&format!(
        "write_throughput_MBps,median,{ckpt_med:.1},{plain_med:.1},{ratio_med:.4},>={WRITE_TARGET},{},{b}\n",
        verdict(ok)
    ));
    csv.push_str(&format!("verify_read_and_hash_MBps,warmup,{:.1},,,,,{b}\n", b as f64 / verify_s / 1e6));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part B: step time with a checkpoint every step.

struct TrainRun {
    /// step_seconds of the steps after warm-up.
    step_seconds: Vec<f64>,
    /// Checkpoints committed, and their seconds from request to commit.
    checkpoint_seconds: Vec<f64>,
    /// Sum over the workers of troupe_checkpoint_wait_seconds_total at the last scrape.
    wait_seconds: Option<f64>,
    wall_seconds: f64,
    /// Cores used by other processes during the run.
    others: f64,
}

/// GET `http://addr/metrics`; the value of `name` (one series; its labels, such as the
/// worker's, are ignored).
fn scrape(addr: &str, name: &str) -> Option<f64> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = match rest.strip_prefix('{') {
            Some(labels) => labels.split_once('}')?.1,
            None => rest,
        };
        rest.strip_prefix(' ')?.split_whitespace().next()?.parse().ok()
    })
}

/// The workers' metrics addresses, from the "worker metrics on http://ADDR/metrics" line of
/// their logs.
fn worker_metrics_addrs(run_dir: &Path) -> Vec<String> {
    let mut addrs = Vec::new();
    let Ok(entries) = fs::read_dir(run_dir.join("logs")) else { return addrs };
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        if let Some(rest) = text.split("worker metrics on http://").nth(1) {
            if let Some(addr) = rest.split("/metrics").next() {
                addrs.push(addr.to_string());
            }
        }
    }
    addrs.sort();
    addrs
}

fn run_local(config_path: &Path, config: &Config) -> Result<TrainRun> {
    let run_dir = config.run_dir();
    let _ = fs::remove_dir_all(&config.run.out_dir);
    fs::create_dir_all(&config.run.out_dir)?;
    let log_path = config.run.out_dir.join("troupe-local.log");
    let log = File::create(&log_path)?;
    let cpu = CpuSample::now();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["local", "--sample-tokens", "0", "--config"])
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start troupe local")?;
    let mut waits: BTreeMap<String, f64> = BTreeMap::new();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("troupe local ran for more than 10 minutes; killed (see {})", log_path.display());
        }
        for addr in worker_metrics_addrs(&run_dir) {
            if let Some(v) = scrape(&addr, "troupe_checkpoint_wait_seconds_total") {
                waits.insert(addr, v);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    let others = cpu.others_since();
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("troupe local failed ({status}); the end of {}:\n{}", log_path.display(), tail.join("\n"));
    }
    let events = read_events(&run_dir).with_context(|| format!("reading {}/events.jsonl", run_dir.display()))?;
    let (mut steps, mut checkpoint_seconds) = (BTreeMap::new(), Vec::new());
    for e in &events {
        match e {
            RunEvent::Step { step, step_seconds, world_size, .. } => {
                ensure!(*world_size as usize == config.cluster.workers, "step {step} ran on {world_size} workers");
                ensure!(steps.insert(*step, *step_seconds).is_none(), "step {step} ran twice (a regroup?)");
            }
            RunEvent::Checkpoint { seconds, .. } => checkpoint_seconds.push(*seconds),
            RunEvent::CheckpointFailed { step, error, .. } => bail!("checkpoint {step} failed: {error}"),
            _ => {}
        }
    }
    ensure!(steps.len() as u64 == config.train.steps, "expected {} steps, got {}", config.train.steps, steps.len());
    let step_seconds = steps.iter().filter(|(s, _)| **s >= WARMUP_STEPS).map(|(_, t)| *t).collect();
    // The checkpoints are not needed any more (the events and logs are kept).
    let _ = fs::remove_dir_all(checkpoint::checkpoints_dir(&run_dir));
    let _ = fs::remove_dir_all(config.registry_dir());
    Ok(TrainRun { step_seconds, checkpoint_seconds, wait_seconds: (!waits.is_empty()).then(|| waits.values().sum()), wall_seconds, others })
}

fn part_b(bench_dir: &Path, rounds: usize, md: &mut String, csv: &mut String) -> Result<()> {
    let steps = env_num("TROUPE_BENCH_STEPS", 30).max(WARMUP_STEPS + 1);
    let out = bench_dir.join("checkpoint-train");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let mut base = Config::default_config();
    base.run.name = "ckpt".into();
    if base.data.dir.is_relative() {
        base.data.dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&base.data.dir);
    }
    let meta = troupe_coordinator::launch::ensure_data(&base)?;
    base.model.n_embd = 256;
    base.train.steps = steps;
    base.train.warmup_steps = base.train.warmup_steps.min(steps);
    base.eval.interval = 0;
    base.eval.sequences = 1;
    base.eval.prompts.clear();
    base.eval.sample_tokens = 0;
    base.deploy.enabled = false;
    base.cluster.workers = 2;
    base.checkpoint.keep_last = 3;
    let params = {
        let gpt = troupe_common::model::Gpt::new(
            &troupe_common::model::GptConfig::from_model_config(&base.model, meta.vocab_size),
            tch::Device::Cpu,
            0,
        )?;
        gpt.num_params()
    };
    // (key, checkpoint.interval, eval.interval). Key 2, a diagnostic outside the target: the
    // validation pass every checkpoint step brings, without the checkpoint
    // (TROUPE_BENCH_EVAL_ONLY=0 leaves it out).
    let with_eval_only = env_num("TROUPE_BENCH_EVAL_ONLY", 1) != 0;
    let modes: Vec<(u64, u64, u64)> = [(1, 1, 0), (2, 0, 1), (0, 0, 0)].into_iter().filter(|m| with_eval_only || m.0 != 2).collect();
    let mut runs: BTreeMap<u64, Vec<TrainRun>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = modes.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for (key, interval, eval_interval) in order {
            let mut config = base.clone();
            config.checkpoint.interval = interval;
            config.eval.interval = eval_interval;
            let name = format!("checkpoint{interval}-eval{eval_interval}");
            config.run.out_dir = out.join(format!("{name}-round{}", round + 1));
            let config_path = out.join(format!("{name}.toml"));
            fs::write(&config_path, config.to_toml())?;
            eprintln!(
                "checkpoint bench B: round {}/{rounds}: troupe local, 2 workers, {steps} steps, checkpoint.interval = {interval}, eval.interval = {eval_interval} …",
                round + 1
            );
            let run = run_local(&config_path, &config)?;
            eprintln!(
                "checkpoint bench B:   median step {:.4} s, {} checkpoints, wait {:?} s, {:.0} s wall, other processes {:.2} cores",
                median(&run.step_seconds),
                run.checkpoint_seconds.len(),
                run.wait_seconds,
                run.wall_seconds,
                run.others
            );
            runs.entry(key).or_default().push(run);
        }
    }
    let every = &runs[&1];
    let end = &runs[&0];
    md.push_str(&format!(
        "### B. Training with a checkpoint every step\n\n\
         `troupe local`, 2 workers, the default model widened to n_embd 256 ({params} parameters: {:.1} MB of checkpointed state), \
         global batch {} × {} tokens, {steps} steps (first {WARMUP_STEPS} warm-up), `checkpoint.interval` 1 vs 0 (0: only at the \
         end, after the timed steps), eval.sequences 1 and no prompts in both (each checkpoint step also gets its validation loss). \
         {rounds} rounds, order alternating. Step time: the coordinator's step_seconds. The claim is the median of the rounds' \
         ratios (each compares two runs started back to back, so slow drifts in what else runs on the machine cancel); \
         pooled medians alongside.\n\n\
         | round | median step, checkpoint every step (s) | median step, no checkpoint (s) | ratio | checkpoints committed | median request→commit (s) | checkpoint wait, sum over workers (s) | other processes, cores (every step / none) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        params as f64 * 12.0 / 1e6,
        base.train.global_batch,
        base.model.block_size
    ));
    for (i, (e, n)) in every.iter().zip(end).enumerate() {
        let (me, mn) = (median(&e.step_seconds), median(&n.step_seconds));
        let wait = e.wait_seconds.map_or("n/a".to_string(), |w| format!("{w:.3}"));
        md.push_str(&format!(
            "| {} | {me:.4} | {mn:.4} | {:.3} | {} | {:.3} | {wait} | {:.2} / {:.2} |\n",
            i + 1,
            me / mn,
            e.checkpoint_seconds.len(),
            median(&e.checkpoint_seconds),
            e.others,
            n.others
        ));
        csv.push_str(&format!(
            "step_seconds,{},{me:.5},{mn:.5},{:.4},<={STEP_TARGET},,{}\n",
            i + 1,
            me / mn,
            e.wait_seconds.map_or(String::new(), |w| format!("{w:.4}"))
        ));
    }
    let pool = |rs: &[TrainRun]| rs.iter().flat_map(|r| r.step_seconds.iter().copied()).collect::<Vec<_>>();
    let (pe, pn) = (median(&pool(every)), median(&pool(end)));
    let ratios: Vec<f64> = every.iter().zip(end).map(|(e, n)| median(&e.step_seconds) / median(&n.step_seconds)).collect();
    let ratio = median(&ratios);
    let ok = ratio < STEP_TARGET;
    let others = every.iter().chain(end).map(|r| r.others).fold(0.0, f64::max);
    // The noise floor: how much the same configuration's median step moves from run to run.
    let run_spread = |rs: &[TrainRun]| spread(&rs.iter().map(|r| median(&r.step_seconds)).collect::<Vec<_>>());
    let (spread_every, spread_end) = (run_spread(every), run_spread(end));
    let waits: Vec<f64> = every.iter().filter_map(|r| r.wait_seconds).collect();
    let wait_text = if waits.is_empty() {
        "the workers' metrics could not be scraped".to_string()
    } else {
        format!(
            "{:.3} s per run on average (sum over both workers, at the last scrape before they exit), {:.1} ms per checkpoint per worker",
            waits.iter().sum::<f64>() / waits.len() as f64,
            1e3 * waits.iter().sum::<f64>() / waits.len() as f64 / steps as f64 / 2.0
        )
    };
    md.push_str(&format!(
        "| **median of the rounds' ratios** | | | **{ratio:.3}** | | | | |\n\
         | pooled median | {pe:.4} | {pn:.4} | {:.3} | | | | |\n\n\
         Step time with a checkpoint every step / without (median of the rounds' ratios): {ratio:.3} ({:+.1}%; target < {:.0}% slower): **{}**. \
         Training waited for the previous write (`troupe_checkpoint_wait_seconds_total`): {wait_text}. \
         Noise: the median step of the same configuration varied by {:.1}% (every step) and {:.1}% (none) between rounds \
         (slowest / fastest − 1).{}\n",
        pe / pn,
        (ratio - 1.0) * 100.0,
        (STEP_TARGET - 1.0) * 100.0,
        verdict(ok),
        spread_every * 100.0,
        spread_end * 100.0,
        if others > 0.2 {
            format!(" **Other processes used up to {others:.2} cores during some runs: those rounds measured contention, not troupe; rerun on an idle machine.**")
        } else if spread_every.max(spread_end) > STEP_TARGET - 1.0 {
            format!(
                " **The spread between rounds exceeds the {:.0}% margin: the verdict is within run-to-run noise \
                 (TROUPE_BENCH_ROUNDS raises the rounds).**",
                (STEP_TARGET - 1.0) * 100.0
            )
        } else {
            String::new()
        }
    ));
    if let Some(eval_only) = runs.get(&2) {
        // Where the cost comes from: every checkpoint step also runs the validation pass.
        let eval_ratios: Vec<f64> = eval_only.iter().zip(end).map(|(v, n)| median(&v.step_seconds) / median(&n.step_seconds)).collect();
        let eval_ratio = median(&eval_ratios);
        md.push_str(&format!(
            "\nDiagnostic (no target): with `eval.interval = 1` and no checkpoint until the end, i.e. only the validation pass each \
             checkpoint step brings, the median step was {} s per round: {eval_ratio:.3} × the plain run (median of the rounds' \
             ratios); checkpoint every step minus evaluation every step: {:+.1} percentage points (of the {:+.1}% above).\n",
            eval_only.iter().map(|r| format!("{:.4}", median(&r.step_seconds))).collect::<Vec<_>>().join(", "),
            (ratio - eval_ratio) * 100.0,
            (ratio - 1.0) * 100.0
        ));
        for (i, r) in eval_ratios.iter().enumerate() {
            csv.push_str(&format!(
                "step_seconds_eval_only,{},{:.5},{:.5},{r:.4},,,\n",
                i + 1,
                median(&eval_only[i].step_seconds),
                median(&end[i].step_seconds)
            ));
        }
        csv.push_str(&format!("step_seconds_eval_only,median_of_round_ratios,,,{eval_ratio:.4},,,\n"));
    }
    csv.push_str(&format!("step_seconds,pooled_median,{pe:.5},{pn:.5},{:.4},<={STEP_TARGET},,\n", pe / pn));
    csv.push_str(&format!(
        "step_seconds,median_of_round_ratios,,,{ratio:.4},<={STEP_TARGET},{},{}\n",
        verdict(ok),
        if waits.is_empty() { String::new() } else { format!("{:.4}", waits.iter().sum::<f64>() / waits.len() as f64) }
    ));
    Ok(())
}

fn main() -> Result<()> {
    let started = Instant::now();
    let part = std::env::var("TROUPE_BENCH_PART").unwrap_or_else(|_| "ab".into()).to_lowercase();
    let rounds = env_num("TROUPE_BENCH_ROUNDS", 3).max(1) as usize;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let bench_dir = Path::new(&target).join("bench");
    fs::create_dir_all(&bench_dir)?;
    let bench_dir = bench_dir.canonicalize()?;
    let mut md =
        String::from("Sharded asynchronous checkpoints: what a checkpoint write costs against the disk, and against training.\n\n");
    // One schema for both parts: `checkpoint` and `baseline` are the measured values (MB/s for
    // the write, seconds for the step), `ratio` is checkpoint/baseline for throughput and
    // checkpoint-every-step/no-checkpoint for step time; `extra`: bytes written (A), the
    // workers' checkpoint wait in seconds (B).
    let mut csv = String::from("metric,round,checkpoint,baseline,ratio,target,verdict,extra\n");
    if part.contains('a') {
        part_a(&bench_dir, rounds, &mut md, &mut csv)?;
    }
    if part.contains('b') {
        part_b(&bench_dir, rounds, &mut md, &mut csv)?;
    }
    md.push_str(&format!("\nTotal bench time {:.0} s.\n", started.elapsed().as_secs_f64()));
    println!("{md}");
    fs::write(bench_dir.join("checkpoint.md"), &md)?;
    fs::write(bench_dir.join("checkpoint.csv"), &csv)?;
    eprintln!("wrote {}", bench_dir.join("checkpoint.{md,csv}").display());
    Ok(())
}
