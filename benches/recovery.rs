//! Recovery time, median of 5 each (run: `cargo bench --bench recovery`):
//!
//! - **lost worker**: 3 workers train the default model; one is killed with SIGKILL; the time
//!   from the kill to the first step completed by the 2 survivors: detection (the dead
//!   process's port answers "unreachable" to the coordinator's next probe, within a heartbeat)
//!   plus the regroup (new ring, no reload) plus the step itself.
//! - **restarted coordinator**: 2 workers; the coordinator is killed with SIGKILL and started
//!   again at once with `--resume`; the time from the kill to the first step after the
//!   restart: the workers notice (probe, or the new process's stateless reset), rejoin, load
//!   the newest checkpoint and form the ring.
//!
//! Target: under 5 s for a lost worker. `TROUPE_BENCH_LEASE_MS` sets `cluster.lease_ms`
//! (default 5000, as shipped); it bounds detection only when the probes get no answer (a
//! frozen process, a dead host or link).
//! Writes target/bench/recovery.md and .csv.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use troupe_core::events::{read_events, RunEvent};

const REPEATS: usize = 5;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn troupe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_troupe"));
    cmd.env("TROUPE_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

fn config(out: &Path, name: &str, workers: usize, lease_ms: u64) -> anyhow::Result<PathBuf> {
    let text = troupe_core::config::DEFAULT_CONFIG_TOML
        .replace("steps = 600", "steps = 100000")
        .replace("interval = 200\nsequences", "interval = 0\nsequences")
        .replace("[checkpoint]\ninterval = 200", "[checkpoint]\ninterval = 10")
        .replace("workers = 2\n", &format!("workers = {workers}\n"))
        .replace("min_workers = 1", &format!("min_workers = {}", workers - 1))
        .replace("lease_ms = 5000", &format!("lease_ms = {lease_ms}"))
        .replace("heartbeat_ms = 500", &format!("heartbeat_ms = {}", (lease_ms / 4).clamp(10, 500)))
        .replace("threads_per_worker = 0", "threads_per_worker = 1");
    let path = out.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Polls events.jsonl every 5 ms until `pred` holds for an event after the first `skip`.
fn wait_for(run_dir: &Path, skip: usize, limit: Duration, pred: impl Fn(&RunEvent) -> bool) -> anyhow::Result<Instant> {
    let started = Instant::now();
    loop {
        if read_events(run_dir).map(|e| e.iter().skip(skip).any(&pred)).unwrap_or(false) {
            return Ok(Instant::now());
        }
        anyhow::ensure!(started.elapsed() < limit, "timed out waiting in {}", run_dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count(run_dir: &Path) -> usize {
    read_events(run_dir).map(|e| e.len()).unwrap_or(0)
}

/// A coordinator listening on `listen` (port 0 for a fresh one), and the address it reports
/// having bound (its "coordinator listening on ADDR; …" line).
fn coordinator(config: &Path, out: &Path, listen: &str, resume: bool) -> anyhow::Result<(Killed, String)> {
    use std::io::BufRead;
    let mut cmd = troupe();
    cmd.args(["coordinator", "--listen", listen]).arg("--config").arg(config).arg("--out").arg(out).stdout(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    let mut child = Killed(cmd.spawn()?);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads every line, so that the coordinator never blocks on a full pipe; sends the address.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("coordinator listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(rest.split(';').next().unwrap_or_default().trim().to_string());
                }
            }
        }
    });
    // The first start may prepare the corpus before it listens.
    let limit = Duration::from_secs(600);
    let addr =
        rx.recv_timeout(limit).map_err(|_| anyhow::anyhow!("the coordinator exited or did not report its address within {limit:?}"))?;
    Ok((child, addr))
}

fn worker(addr: &str) -> anyhow::Result<Killed> {
    Ok(Killed(troupe().args(["worker", "--join", addr, "--threads", "1"]).spawn()?))
}

/// Kill one of 3 workers; seconds to the survivors' first step, and the regroup's own share.
fn lost_worker(out: &Path, rep: usize, lease_ms: u64) -> anyhow::Result<(f64, f64)> {
    let out = out.join(format!("worker-{rep}"));
    std::fs::create_dir_all(&out)?;
    let config = config(&out, "run", 3, lease_ms)?;
    let (_coordinator, addr) = coordinator(&config, &out, "127.0.0.1:0", false)?;
    let mut workers = (0..3).map(|_| worker(&addr)).collect::<anyhow::Result<Vec<_>>>()?;
    let run_dir = out.join("shakespeare");
    wait_for(&run_dir, 0, Duration::from_secs(300), |e| matches!(e, RunEvent::Step { step, .. } if *step >= 10))?;
    let skip = count(&run_dir);
    workers[2].0.kill()?;
    let killed = Instant::now();
    let stepped = wait_for(&run_dir, skip, Duration::from_secs(120), |e| matches!(e, RunEvent::Step { world_size: 2, .. }))?;
    let regroup = read_events(&run_dir)?
        .iter()
        .skip(skip)
        .find_map(|e| match e {
            RunEvent::Regrouped { seconds, .. } => Some(*seconds),
            _ => None,
        })
        .unwrap_or(f64::NAN);
    Ok((stepped.duration_since(killed).as_secs_f64(), regroup))
}

/// Kill the coordinator of 2 workers and restart it with --resume; seconds to the first step.
fn restarted_coordinator(out: &Path, rep: usize, lease_ms: u64) -> anyhow::Result<f64> {
    let out = out.join(format!("coordinator-{rep}"));
    std::fs::create_dir_all(&out)?;
    let config = config(&out, "run", 2, lease_ms)?;
    let (mut first, addr) = coordinator(&config, &out, "127.0.0.1:0", false)?;
    let _workers = (0..2).map(|_| worker(&addr)).collect::<anyhow::Result<Vec<_>>>()?;
    let run_dir = out.join("shakespeare");
    wait_for(&run_dir, 0, Duration::from_secs(300), |e| matches!(e, RunEvent::Checkpoint { step, .. } if *step >= 10))?;
    let skip = count(&run_dir);
    first.0.kill()?;
    let _ = first.0.wait();
    let killed = Instant::now();
    // Again on the address the workers know.
    let _second = coordinator(&config, &out, &addr, true)?;
    let stepped = wait_for(&run_dir, skip, Duration::from_secs(120), |e| matches!(e, RunEvent::Step { .. }))?;
    Ok(stepped.duration_since(killed).as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let lease_ms: u64 = std::env::var("TROUPE_BENCH_LEASE_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let out = PathBuf::from("target/bench/recovery").canonicalize().unwrap_or_else(|_| PathBuf::from("target/bench/recovery"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let mut csv = String::from("scenario,repeat,seconds,regroup_seconds,lease_ms\n");
    let (mut worker_s, mut coordinator_s) = (Vec::new(), Vec::new());
    for rep in 0..REPEATS {
        let (total, regroup) = lost_worker(&out, rep, lease_ms)?;
        println!("lost worker #{rep}: {total:.3} s to the next step (regroup {regroup:.3} s)");
        csv.push_str(&format!("lost_worker,{rep},{total:.4},{regroup:.4},{lease_ms}\n"));
        worker_s.push(total);
    }
    for rep in 0..REPEATS {
        let total = restarted_coordinator(&out, rep, lease_ms)?;
        println!("restarted coordinator #{rep}: {total:.3} s to the next step");
        csv.push_str(&format!("restarted_coordinator,{rep},{total:.4},,{lease_ms}\n"));
        coordinator_s.push(total);
    }
    let (w, c) = (median(worker_s), median(coordinator_s));
    let table = format!(
        "| scenario (lease {lease_ms} ms, median of {REPEATS}) | kill → next completed step |\n|---|---|\n\
         | worker SIGKILLed (3 → 2 workers) | {w:.2} s |\n| coordinator SIGKILLed, restarted with --resume | {c:.2} s |\n\n\
         lost worker target: < 5 s ({})\n",
        if w < 5.0 { "met" } else { "NOT met" }
    );
    println!("{table}");
    std::fs::write("target/bench/recovery.md", &table)?;
    std::fs::write("target/bench/recovery.csv", csv)?;
    Ok(())
}
