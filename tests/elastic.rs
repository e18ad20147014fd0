//! Elastic membership with real processes: a worker killed with SIGKILL or frozen with SIGSTOP
//! is dropped and the survivors carry on; a restarted worker rejoins; a coordinator killed
//! with SIGKILL and started again with `--resume` gets its workers back. Every test checks
//! that each step ran exactly once and, from the workers' sample traces, that no training
//! sample was lost or repeated.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use troupe_core::events::RunEvent;

const STEPS: u64 = 60;

/// The tiny config with a short lease and collective timeout, and elastic membership settings.
fn elastic_config(dir: &Path, data: &Path, workers: usize, min_workers: usize, extra: &str) -> PathBuf {
    let config = tiny_config(dir, data, workers, STEPS);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lease_ms = 5000", "lease_ms = 1500")
        .replace("collective_timeout_ms = 30000", "collective_timeout_ms = 2000")
        .replace(
            &format!("workers = {workers}\n"),
            &format!("workers = {workers}\nmin_workers = {min_workers}\nmax_workers = {workers}\n{extra}"),
        );
    std::fs::write(&config, text).unwrap();
    config
}

/// A worker whose sample trace goes to `trace` and whose log goes to `log`.
fn start_worker(addr: &str, trace: &Path, log: &Path) -> KillOnDrop {
    start_worker_with(addr, trace, log, &[])
}

fn start_worker_with(addr: &str, trace: &Path, log: &Path, env: &[(&str, &str)]) -> KillOnDrop {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = worker_command(addr)
        .envs(env.iter().copied())
        .env("TROUPE_TRACE_SAMPLES", trace)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start a worker");
    KillOnDrop(child)
}

/// A coordinator and `workers` traced workers on a fresh run of the elastic config.
struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    trace: PathBuf,
    run_dir: PathBuf,
    coordinator: CoordinatorProcess,
    addr: String,
    workers: Vec<KillOnDrop>,
}

impl Cluster {
    fn start(name: &str, workers: usize, min_workers: usize) -> Cluster {
        Cluster::start_with(name, workers, min_workers, &[])
    }

    /// As `start`, the last worker with `env` added (a fault hook).
    fn start_with(name: &str, workers: usize, min_workers: usize, env: &[(&str, &str)]) -> Cluster {
        let dir = scratch(name);
        let data = prepare_small_corpus(&dir);
        let config = elastic_config(&dir, &data, workers, min_workers, "");
        let trace = dir.join("trace");
        std::fs::create_dir_all(&trace).unwrap();
        let coordinator = CoordinatorProcess::start(&config, &[]);
        let addr = coordinator.addr.to_string();
        let workers = (0..workers)
            .map(|i| {
                let env = if i + 1 == workers { env } else { &[] };
                start_worker_with(&addr, &trace, &dir.join(format!("worker-{i}.log")), env)
            })
            .collect();
        let run_dir = dir.join("runs/tiny");
        Cluster { dir, data, trace, run_dir, coordinator, addr, workers }
    }

    /// Waits for the run to finish successfully and for every worker still held to exit 0;
    /// checks that every step ran once and that no sample was lost or repeated.
    fn finish(self) -> (String, BTreeMap<u64, (u64, u32)>) {
        let (status, log) = self.coordinator.wait();
        assert!(status.success(), "{log}");
        for mut w in self.workers {
            assert!(w.0.wait().unwrap().success());
        }
        let steps = steps_once(&self.run_dir, STEPS);
        assert_no_sample_lost_or_repeated(&self.trace, &self.data, &steps);
        (log, steps)
    }
}

/// Polls events.jsonl until `pred` holds for some event after the first `skip` events; the
/// time it was seen.
fn wait_for_event(run_dir: &Path, skip: usize, limit: Duration, what: &str, pred: impl Fn(&RunEvent) -> bool) -> Instant {
    let started = Instant::now();
    loop {
        let found = troupe_core::events::read_events(run_dir).map(|e| e.iter().skip(skip).any(&pred)).unwrap_or(false);
        if found {
            return Instant::now();
        }
        assert!(started.elapsed() < limit, "no {what} within {limit:?}: {:#?}", events(run_dir));
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn event_count(run_dir: &Path) -> usize {
    events(run_dir).len()
}

/// One of three workers SIGKILLed mid-training: the other two go on within 10 s; the killed
/// one, started again with the same command, rejoins; the run finishes with every sample
/// consumed exactly once.
#[test]
fn a_killed_worker_is_dropped_and_a_restarted_one_rejoins() {
    let mut cluster = Cluster::start("elastic-kill", 3, 2);
    let run_dir = cluster.run_dir.clone();
    wait_for_steps(&run_dir, 8, Duration::from_secs(120));

    let skip = event_count(&run_dir);
    cluster.workers[2].0.kill().unwrap(); // SIGKILL: no goodbye
    let killed_at = Instant::now();
    let regrouped = wait_for_event(&run_dir, skip, Duration::from_secs(30), "regroup to 2 workers", |e| {
        matches!(e, RunEvent::Regrouped { world_size: 2, .. })
    });
    let stepped = wait_for_event(&run_dir, skip, Duration::from_secs(30), "a step by 2 workers", |e| {
        matches!(e, RunEvent::Step { world_size: 2, .. })
    });
    let recovery = stepped.duration_since(killed_at);
    println!("kill -> regrouped {:?}, -> first step with 2 workers {recovery:?}", regrouped.duration_since(killed_at));
    assert!(recovery < Duration::from_secs(10), "the run went on with 2 workers only after {recovery:?}");

    // The same command again: it joins at a step boundary and gets the state from a peer.
    let skip = event_count(&run_dir);
    let _ = cluster.workers.pop();
    let again = start_worker(&cluster.addr, &cluster.trace, &cluster.dir.join("worker-2-again.log"));
    cluster.workers.push(again);
    wait_for_event(&run_dir, skip, Duration::from_secs(60), "regroup to 3 workers", |e| {
        matches!(e, RunEvent::Regrouped { world_size: 3, synced: true, .. })
    });
    wait_for_event(&run_dir, skip, Duration::from_secs(60), "a step by 3 workers", |e| matches!(e, RunEvent::Step { world_size: 3, .. }));

    let (log, steps) = cluster.finish();
    let worlds: Vec<u32> = steps.values().map(|(_, w)| *w).collect();
    assert!(worlds.contains(&2) && worlds.last() == Some(&3), "{worlds:?}");
    // Its port is closed: the host says so, and the coordinator need not wait out the lease.
    assert!(log.contains("was lost: its process is gone") || log.contains("was lost: no heartbeat"), "{log}");
}

/// A worker that stops answering without closing its connection (SIGSTOP) is detected by its
/// missing heartbeats, named with its rank, and dropped; the others go on.
#[test]
fn a_frozen_worker_is_detected_by_its_lease_named_and_dropped() {
    let mut cluster = Cluster::start("elastic-frozen", 3, 2);
    let run_dir = cluster.run_dir.clone();
    wait_for_steps(&run_dir, 8, Duration::from_secs(120));
    let skip = event_count(&run_dir);
    let frozen = cluster.workers.pop().unwrap();
    std::process::Command::new("kill").args(["-STOP", &frozen.0.id().to_string()]).status().unwrap();
    let frozen_at = Instant::now();
    let stepped = wait_for_event(&run_dir, skip, Duration::from_secs(30), "a step by 2 workers", |e| {
        matches!(e, RunEvent::Step { world_size: 2, .. })
    });
    println!("frozen -> first step with 2 workers {:?}", stepped.duration_since(frozen_at));
    assert!(stepped.duration_since(frozen_at) < Duration::from_secs(10));
    let left = events(&run_dir).into_iter().skip(skip).find_map(|e| match e {
        RunEvent::WorkerLeft { rank, reason, .. } => Some((rank, reason)),
        _ => None,
    });
    let (rank, reason) = left.expect("the frozen worker's departure is recorded");
    assert!(rank.is_some() && reason.contains("lease (1500 ms)"), "{rank:?} {reason}");

    let (log, _) = cluster.finish();
    assert!(log.contains(&format!("rank {}", rank.unwrap())) && log.contains("no heartbeat for longer than the lease"), "{log}");
    let _ = std::process::Command::new("kill").args(["-CONT", &frozen.0.id().to_string()]).status();
}

/// The coordinator SIGKILLed (and one of its 3 workers with it), then started again with
/// `--resume` on the same address. The surviving workers notice, stop training, rejoin on
/// their own, and the run finishes from the newest checkpoint without the missing worker (it
/// starts one lease after the last rejoin); every committed checkpoint verifies.
#[test]
fn a_killed_coordinator_restarted_with_resume_gets_its_workers_back() {
    let dir = scratch("elastic-coordinator");
    let data = prepare_small_corpus(&dir);
    let config = elastic_config(&dir, &data, 3, 2, "rejoin_ms = 60000\n");
    // The first coordinator binds port 0 (the config's 127.0.0.1:0) and says which port it got;
    // the restarted one listens on that same address, where the workers look for it.
    let mut coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr.to_string();
    let trace = dir.join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let mut workers: Vec<KillOnDrop> = (0..3).map(|i| start_worker(&addr, &trace, &dir.join(format!("worker-{i}.log")))).collect();
    let run_dir = dir.join("runs/tiny");
    // Checkpoints are written in the background: kill once the one of step 10 is committed.
    wait_for_event(
        &run_dir,
        0,
        Duration::from_secs(120),
        "the checkpoint of step 10",
        |e| matches!(e, RunEvent::Checkpoint { step, .. } if *step >= 10),
    );
    coordinator.process.0.kill().unwrap();
    let _ = coordinator.process.0.wait();
    let killed_at = Instant::now();
    let skip = event_count(&run_dir);
    workers.pop(); // this one goes down with the coordinator

    let coordinator = CoordinatorProcess::start(&config, &["--listen", &addr, "--resume"]);
    let stepped =
        wait_for_event(&run_dir, skip, Duration::from_secs(60), "a step after the restart", |e| matches!(e, RunEvent::Step { .. }));
    println!("coordinator killed -> first step after its restart {:?}", stepped.duration_since(killed_at));
    let (status, log) = coordinator.wait();
    assert!(status.success(), "{log}");
    for mut w in workers {
        assert!(w.0.wait().unwrap().success(), "the workers rejoined and finished");
    }
    assert!(log.contains("resuming with 2 of 3 workers"), "{log}");
    let resumed = events(&run_dir).into_iter().skip(skip).find_map(|e| match e {
        RunEvent::Started { resumed_from, step, .. } => Some((resumed_from, step)),
        _ => None,
    });
    let (from, step) = resumed.expect("the restarted coordinator started training");
    assert!(from.is_some() && step >= 10, "resumed from a checkpoint: {from:?} at step {step}");
    // Every committed checkpoint is intact.
    let mut verified = 0;
    for entry in std::fs::read_dir(run_dir.join("checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("MANIFEST").is_file() {
            troupe_common::checkpoint::verify(&path).unwrap_or_else(|e| panic!("{} is corrupt: {e}", path.display()));
            verified += 1;
        }
    }
    assert!(verified >= 3, "{verified} checkpoints");
    let last = events(&run_dir).into_iter().rev().find_map(|e| match e {
        RunEvent::Finished { step, .. } => Some(step),
        _ => None,
    });
    assert_eq!(last, Some(STEPS));
}

/// A fault injected into a worker's supervised Collective actor (it panics in step 5): the
/// failure is reported, the ring is re-formed with a fresh actor, and the run continues and
/// finishes with every step run once.
#[test]
fn a_panicking_collective_actor_is_replaced_and_the_run_continues() {
    let cluster = Cluster::start_with("elastic-fault", 2, 2, &[("TROUPE_FAULT_COLLECTIVE_PANIC_AT_STEP", "5")]);
    let (run_dir, dir) = (cluster.run_dir.clone(), cluster.dir.clone());
    cluster.finish();
    let events = events(&run_dir);
    // The one failure is reported three ways: by the faulty worker's supervisor (with the
    // panic's message), by its trainer's aborted step (the ring closed under it), and by its
    // peer, whose predecessor closed the ring. Whichever reaches the coordinator first starts
    // the regroup; the others are stale by then. The panic itself is checked in the log below.
    assert!(
        events.iter().any(|e| matches!(e, RunEvent::Warning { message, .. }
            if message.contains("failed collective")
                && (message.contains("fault injection")
                    || message.contains("(step 5): the ring of this generation closed")
                    || (message.contains("(step 5): predecessor") && message.contains("SHUTDOWN (0): ring closed"))))),
        "{events:#?}"
    );
    assert!(events.iter().any(|e| matches!(e, RunEvent::Regrouped { world_size: 2, .. })));
    let worker_log = std::fs::read_to_string(dir.join("worker-1.log")).unwrap();
    assert!(worker_log.contains("the collective failed") && worker_log.contains("re-forms the ring"), "{worker_log}");
}

/// A rank that stays alive (it heartbeats) but stalls inside a collective: its peer times out
/// after `collective_timeout_ms`, the coordinator logs who waited on whom in which collective,
/// every rank abandons it, and the re-formed ring carries on.
#[test]
fn a_stalled_collective_times_out_is_named_and_the_ring_is_re_formed() {
    let cluster = Cluster::start_with("elastic-stall", 2, 2, &[("TROUPE_FAULT_COLLECTIVE_STALL_AT_STEP", "5")]);
    let run_dir = cluster.run_dir.clone();
    let (log, _) = cluster.finish();
    assert!(
        log.contains("reports a failed collective (step 5)")
            && log.contains("timed out after 2s")
            && log.contains("waiting on predecessor rank"),
        "{log}"
    );
    let events = events(&run_dir);
    assert!(events.iter().any(|e| matches!(e, RunEvent::Regrouped { world_size: 2, .. })));
}
