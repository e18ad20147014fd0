//! Workers end cleanly: one whose coordinator dies (SIGKILL: no goodbye, no QUIC close) stops
//! on its own once the coordinator's lease runs out, and says why (no orphans); one asked to
//! stop (SIGTERM) leaves at a step boundary.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};
use troupe_common::events::RunEvent;

#[test]
fn a_worker_exits_when_its_coordinator_is_killed() {
    let dir = scratch("orphans");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 100_000);
    let text = std::fs::read_to_string(&config).unwrap().replace("lease_ms = 5000", "lease_ms = 1500");
    std::fs::write(&config, text).unwrap();

    let mut coordinator = CoordinatorProcess::start(&config, &["--listen", "127.0.0.1:0"]);
    let addr = coordinator.addr.to_string();
    let worker = troupe()
        .args(["worker", "--join", &addr, "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut worker = KillOnDrop(worker);

    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    coordinator.process.0.kill().unwrap();
    let killed_at = Instant::now();
    let mut stderr = worker.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let status = loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            break status;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(20), "the worker outlived its coordinator by 20 s");
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let gone_after = killed_at.elapsed();
    let log = reader.join().unwrap();
    println!("worker exited {gone_after:?} after the coordinator was killed");
    assert!(!status.success(), "losing the coordinator is an error exit");
    assert!(log.contains("silent for longer than its lease") || log.contains("lost the coordinator"), "{log}");
    assert!(gone_after < Duration::from_secs(10), "{gone_after:?}");
}

/// SIGTERM to a worker: it leaves at a step boundary; without elastic membership the run
/// checkpoints there and stops cleanly — every process exits 0 and nothing is lost.
#[test]
fn a_worker_asked_to_stop_leaves_at_a_step_boundary() {
    let dir = scratch("leave");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 100_000);
    let coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr.to_string();
    let workers = spawn_workers(&addr, 2);
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    std::process::Command::new("kill").args(["-TERM", &workers[1].0.id().to_string()]).status().unwrap();
    for mut w in workers {
        assert!(w.0.wait().unwrap().success(), "a worker asked to stop exits 0");
    }
    let (status, log) = coordinator.wait();
    assert!(status.success(), "{log}");
    let events = events(&run_dir);
    assert!(events.iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("is leaving (SIGTERM"))), "{events:?}");
    let stopped_at = step_losses(&run_dir).len() as u64;
    assert!(run_dir.join(format!("checkpoints/step-{stopped_at:06}/MANIFEST")).is_file(), "a checkpoint at step {stopped_at}");
}

/// A worker that stops answering without closing its connection (SIGSTOP) is detected by its
/// missing heartbeats within the lease; the coordinator names its rank, stops the others and
/// fails the run cleanly (re-forming without it is elastic membership, a later step).
#[test]
fn a_frozen_worker_is_detected_by_its_lease_and_named() {
    let dir = scratch("frozen");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 100_000);
    let text = std::fs::read_to_string(&config).unwrap().replace("lease_ms = 5000", "lease_ms = 1500");
    std::fs::write(&config, text).unwrap();
    let coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr.to_string();
    let mut workers = spawn_workers(&addr, 2);
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    let frozen = workers.pop().unwrap();
    std::process::Command::new("kill").args(["-STOP", &frozen.0.id().to_string()]).status().unwrap();
    let frozen_at = Instant::now();
    let (status, log) = coordinator.wait();
    let detected_after = frozen_at.elapsed();
    println!("the coordinator gave up {detected_after:?} after the worker froze");
    assert!(!status.success());
    assert!(log.contains("was lost: no heartbeat for longer than the lease (1500 ms)"), "{log}");
    // The lease (1.5 s), then the healthy worker's exit: its all-reduce with the frozen peer is
    // aborted when it stops, not waited out (30 s collective timeout).
    assert!(detected_after < Duration::from_secs(6), "{detected_after:?}");
    let events = events(&run_dir);
    let lost_rank = events.iter().find_map(|e| match e {
        RunEvent::WorkerLeft { rank, reason, .. } if reason.contains("lease") => Some(*rank),
        _ => None,
    });
    assert!(matches!(lost_rank, Some(Some(_))), "the lost worker's rank is recorded: {events:?}");
    // The healthy worker was told to stop and exits.
    let mut healthy = workers.pop().unwrap();
    let status = healthy.0.wait().unwrap();
    assert!(status.success() || status.code() == Some(1), "{status}");
    let _ = std::process::Command::new("kill").args(["-CONT", &frozen.0.id().to_string()]).status();
}
